//! The gRPC server every service runs: health (NotServing until the database answers and
//! while draining), reflection for all Waymark services, an admin-token auth layer,
//! per-RPC telemetry, message limits sized for batches, tuned HTTP/2 windows and graceful
//! shutdown on SIGTERM/SIGINT.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use futures::future::BoxFuture;
use sea_orm::DatabaseConnection;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::secret::Secret;
use crate::telemetry::GrpcTelemetryLayer;

/// Largest gRPC message accepted or sent: room for a few thousand events per batch.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// Requests one HTTP/2 connection may have in flight: with the connection's flow-control
/// window (16 MiB) this bounds what a single client can make the server buffer.
pub const MAX_CONCURRENT_STREAMS: u32 = 64;
/// Largest header block of a request (HTTP/2 `SETTINGS_MAX_HEADER_LIST_SIZE`).
pub const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;

/// Health state of one server, shared with the tasks that decide it.
#[derive(Clone)]
pub struct Readiness {
    reporter: HealthReporter,
    services: Arc<Vec<String>>,
    database_ok: Arc<AtomicBool>,
    draining: Arc<AtomicBool>,
}

impl Readiness {
    /// Starts NotServing for the overall server ("") and each named gRPC service.
    pub async fn new(reporter: HealthReporter, services: &[&str]) -> Self {
        let readiness = Self {
            reporter,
            services: Arc::new(services.iter().map(|s| (*s).to_owned()).collect()),
            database_ok: Arc::new(AtomicBool::new(false)),
            draining: Arc::new(AtomicBool::new(false)),
        };
        readiness.publish().await;
        readiness
    }

    /// Records whether the database is reachable.
    pub async fn set_database(&self, ok: bool) {
        if self.database_ok.swap(ok, Ordering::SeqCst) != ok {
            if ok {
                tracing::info!("database reachable, serving");
            } else {
                tracing::warn!("database unreachable, not serving");
            }
            self.publish().await;
        }
    }

    /// From now on the server reports NotServing so load balancers move traffic away.
    pub async fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.publish().await;
    }

    /// Waits until the server reports Serving (or `shutdown`); background work that needs
    /// the schema starts after this.
    pub async fn wait_serving(&self, shutdown: &CancellationToken) {
        while !self.is_serving() && !shutdown.is_cancelled() {
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }

    /// True when the server reports Serving.
    pub fn is_serving(&self) -> bool {
        self.database_ok.load(Ordering::SeqCst) && !self.draining.load(Ordering::SeqCst)
    }

    async fn publish(&self) {
        let status = if self.is_serving() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.reporter.set_service_status("", status).await;
        for service in self.services.iter() {
            self.reporter.set_service_status(service, status).await;
        }
    }
}

/// Pings the database every `interval` and publishes the result (and the pool's use, as a
/// gauge), until `shutdown`.
/// `on_reachable` runs each time the database becomes reachable (e.g. pending migrations);
/// the service reports Serving only after it succeeds.
pub async fn watch_database<F, Fut>(
    db: DatabaseConnection,
    readiness: Readiness,
    interval: Duration,
    shutdown: CancellationToken,
    on_reachable: F,
) where
    F: Fn() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let mut prepared = false;
    let pool = crate::db::PoolGauge::new();
    loop {
        pool.record(&db);
        let mut ok = crate::db::ping(&db).await;
        if ok && !prepared {
            match on_reachable().await {
                Ok(()) => prepared = true,
                Err(error) => {
                    tracing::warn!(error = %format!("{error:#}"), "database reachable but not ready");
                    ok = false;
                }
            }
        }
        readiness.set_database(ok).await;
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}

/// How to run one gRPC server.
#[derive(Clone)]
pub struct ServeOptions {
    /// Full method paths (`/pkg.Service/Method`) callable without the admin token; health
    /// and reflection are always public.
    pub public_methods: Vec<&'static str>,
    /// Token required by every other method; when unset those methods are refused.
    pub admin_token: Option<Secret>,
    /// How long to keep serving in-flight requests after shutdown begins.
    pub drain: Duration,
}

/// Serves `routes` plus health and reflection on `listener` until `shutdown` is cancelled,
/// then reports NotServing, waits `drain`, and stops accepting.
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    readiness: Readiness,
    options: ServeOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(waymark_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;
    let routes = routes.add_service(health).add_service(reflection);
    let auth = AdminAuthLayer::new(options.admin_token.clone(), &options.public_methods);
    let local = listener.local_addr().ok();
    tracing::info!(addr = ?local, "grpc server listening");
    let drain = options.drain;
    let stopped = async move {
        shutdown.cancelled().await;
        readiness.start_draining().await;
        tracing::info!(drain_secs = drain.as_secs_f64(), "draining grpc server");
        tokio::time::sleep(drain).await;
    };
    Server::builder()
        // Batches are large; wider windows keep a single stream from stalling on flow control.
        .initial_stream_window_size(Some(4 * 1024 * 1024))
        .initial_connection_window_size(Some(16 * 1024 * 1024))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .max_concurrent_streams(Some(MAX_CONCURRENT_STREAMS))
        .http2_max_header_list_size(Some(MAX_HEADER_LIST_BYTES))
        .layer(GrpcTelemetryLayer::new())
        .layer(auth)
        .add_routes(routes)
        // The builder's tcp_nodelay applies only to sockets tonic binds itself; without
        // it, Nagle holds back the last frames of a response for the peer's delayed ACK.
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            stopped,
        )
        .await
        .context("grpc server")?;
    tracing::info!(addr = ?local, "grpc server stopped");
    Ok(())
}

/// Cancels `token` on SIGTERM or SIGINT.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => tracing::info!("interrupt received, shutting down"),
            () = term => tracing::info!("terminate received, shutting down"),
        }
        token.cancel();
    });
}

/// A lazily connecting channel to another service, tuned like the server.
pub fn channel(endpoint: &str) -> anyhow::Result<Channel> {
    let endpoint = Endpoint::from_shared(endpoint.to_owned())
        .with_context(|| format!("invalid endpoint {endpoint}"))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(4 * 1024 * 1024))
        .initial_connection_window_size(Some(16 * 1024 * 1024))
        .http2_keep_alive_interval(Duration::from_secs(30));
    Ok(endpoint.connect_lazy())
}

/// Adds `authorization: Bearer <token>` to outgoing requests.
pub fn bearer(token: &Secret) -> tonic::metadata::MetadataValue<tonic::metadata::Ascii> {
    format!("Bearer {}", token.expose())
        .parse()
        .unwrap_or_else(|_| tonic::metadata::MetadataValue::from_static(""))
}

/// Requires the admin token on every method that is not public.
#[derive(Clone)]
pub struct AdminAuthLayer {
    token: Option<Arc<str>>,
    public: Arc<HashSet<String>>,
}

impl AdminAuthLayer {
    /// `public` lists full method paths open without the token.
    pub fn new(token: Option<Secret>, public: &[&str]) -> Self {
        Self {
            token: token.map(|t| Arc::from(t.expose())),
            public: Arc::new(public.iter().map(|s| (*s).to_owned()).collect()),
        }
    }

    fn check(&self, path: &str, headers: &http::HeaderMap) -> Result<(), tonic::Status> {
        if path.starts_with("/grpc.health.")
            || path.starts_with("/grpc.reflection.")
            || self.public.contains(path)
        {
            return Ok(());
        }
        let Some(expected) = &self.token else {
            return Err(tonic::Status::permission_denied(
                "admin token not configured on this server (WAYMARK_ADMIN_TOKEN)",
            ));
        };
        let presented = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match presented {
            None => Err(tonic::Status::unauthenticated("missing admin bearer token")),
            Some(p) if constant_time_eq(p.as_bytes(), expected.as_bytes()) => Ok(()),
            Some(_) => Err(tonic::Status::unauthenticated("invalid admin token")),
        }
    }
}

/// Compares secrets without an early exit, so timing does not reveal a matching prefix.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl<S> tower_layer::Layer<S> for AdminAuthLayer {
    type Service = AdminAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AdminAuth {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`AdminAuthLayer`].
#[derive(Clone)]
pub struct AdminAuth<S> {
    inner: S,
    layer: AdminAuthLayer,
}

impl<S, B, R> tower_service::Service<http::Request<B>> for AdminAuth<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>> + Send,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        match self.layer.check(request.uri().path(), request.headers()) {
            Ok(()) => Box::pin(self.inner.call(request)),
            Err(status) => {
                tracing::warn!(path = request.uri().path(), code = ?status.code(), "rpc refused by auth");
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: Option<&str>) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        if let Some(a) = auth {
            h.insert(http::header::AUTHORIZATION, a.parse().unwrap());
        }
        h
    }

    #[test]
    fn admin_methods_need_the_token_and_public_ones_do_not() {
        let layer = AdminAuthLayer::new(Some(Secret::new("0123456789abcdef")), &["/a.B/Public"]);
        assert!(layer.check("/a.B/Public", &headers(None)).is_ok());
        assert!(
            layer
                .check("/grpc.health.v1.Health/Check", &headers(None))
                .is_ok()
        );
        let missing = layer.check("/a.B/Admin", &headers(None)).unwrap_err();
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);
        let wrong = layer
            .check("/a.B/Admin", &headers(Some("Bearer nope")))
            .unwrap_err();
        assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
        assert!(
            layer
                .check("/a.B/Admin", &headers(Some("Bearer 0123456789abcdef")))
                .is_ok()
        );
    }

    #[test]
    fn without_a_configured_token_admin_methods_are_refused() {
        let layer = AdminAuthLayer::new(None, &[]);
        let err = layer
            .check("/a.B/Admin", &headers(Some("Bearer x")))
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
    }
}
