//! A bare tonic server answering `GetProfile` with a profile held in memory: no Redis, no
//! auth, no telemetry. It is tonic's own floor for the very call, path and message sizes
//! the profile service answers, so the benchmark can show how much of a `GetProfile` is
//! transport and how much is the service.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tonic::server::{NamedService, UnaryService};
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use waymark_kit::CancellationToken;
use waymark_proto::profile::v1::{GetProfileRequest, GetProfileResponse, Profile};

#[derive(Clone)]
struct Echo(Arc<GetProfileResponse>);

impl UnaryService<GetProfileRequest> for Echo {
    type Response = GetProfileResponse;
    type Future = Ready<Result<tonic::Response<GetProfileResponse>, tonic::Status>>;

    fn call(&mut self, _request: tonic::Request<GetProfileRequest>) -> Self::Future {
        ready(Ok(tonic::Response::new(GetProfileResponse::clone(&self.0))))
    }
}

impl tower_service::Service<http::Request<tonic::body::Body>> for Echo {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let echo = self.clone();
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
            Ok(grpc.unary(echo, request).await)
        })
    }
}

/// Served under the profile service's name, so a `ProfileServiceClient` calls it as is.
impl NamedService for Echo {
    const NAME: &'static str = "waymark.profile.v1.ProfileService";
}

/// Serves `profile` as every `GetProfile` answer on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    profile: Profile,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let echo = Echo(Arc::new(GetProfileResponse {
        profile: Some(profile),
    }));
    Server::builder()
        .add_service(echo)
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown.cancelled_owned(),
        )
        .await?;
    Ok(())
}
