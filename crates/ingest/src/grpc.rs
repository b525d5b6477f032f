//! The gRPC adapter: `waymark.ingest.v1.IngestService` over the ingestion core.

use std::task::{Context, Poll};

use base64::Engine;
use futures::future::BoxFuture;
use tonic::server::NamedService;
use tonic::{Request, Response, Status};
use waymark_kit::time::{from_micros, micros};
use waymark_proto::ingest::v1::ingest_service_server::IngestService;
use waymark_proto::ingest::v1::*;

use crate::service::{AuthedSource, BatchMode, Ingestor};
use crate::store::{Counters, EventFilter, SourceRow};

/// The method that checks a write key.
const INGEST_METHOD: &str = "/waymark.ingest.v1.IngestService/Ingest";
/// Full method paths callable without the admin token (they check a write key instead).
pub const PUBLIC_METHODS: &[&str] = &[INGEST_METHOD];

/// Checks the write key of `Ingest` calls from their headers, before the body is read,
/// decompressed or decoded, so an unauthenticated client costs no more than its headers.
/// The source goes to the handler as a request extension.
#[derive(Clone)]
pub struct WriteKeyAuth<S> {
    core: Ingestor,
    inner: S,
}

impl<S> WriteKeyAuth<S> {
    /// Wraps the generated service.
    pub fn new(core: Ingestor, inner: S) -> Self {
        Self { core, inner }
    }
}

impl<S: NamedService> NamedService for WriteKeyAuth<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower_service::Service<http::Request<B>> for WriteKeyAuth<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The clone takes the place of the service that was polled ready.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if request.uri().path() != INGEST_METHOD {
            return Box::pin(inner.call(request));
        }
        let core = self.core.clone();
        Box::pin(async move {
            let key = write_key(request.headers());
            match core.authenticate(&key).await {
                Ok(source) => {
                    request.extensions_mut().insert(source);
                    inner.call(request).await
                }
                Err(error) => Ok(Status::from(error).into_http()),
            }
        })
    }
}

/// Implements `IngestService`.
#[derive(Clone)]
pub struct IngestGrpc {
    core: Ingestor,
}

impl IngestGrpc {
    /// Wraps the core.
    pub fn new(core: Ingestor) -> Self {
        Self { core }
    }
}

/// The write key from `authorization: Bearer <key>` or `Basic base64(<key>:)`.
fn write_key(headers: &http::HeaderMap) -> String {
    let Some(value) = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return String::new();
    };
    if let Some(key) = value.strip_prefix("Bearer ") {
        return key.trim().to_owned();
    }
    value
        .strip_prefix("Basic ")
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|raw| String::from_utf8(raw).ok())
        .map(|user_pass| user_pass.split(':').next().unwrap_or_default().to_owned())
        .unwrap_or_default()
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn source_message(s: SourceRow) -> Source {
    Source {
        source_id: s.source_id,
        name: s.name,
        created_at: Some(from_micros(s.created_at)),
        revoked_at: s.revoked_at.map(from_micros),
        rate_limit_per_second: s.rate_limit,
    }
}

fn stats_message(source_id: String, c: &Counters) -> SourceStats {
    SourceStats {
        source_id,
        accepted: c.accepted,
        duplicates: c.duplicates,
        rejected: c.rejected,
        suppressed: c.suppressed,
    }
}

#[tonic::async_trait]
impl IngestService for IngestGrpc {
    #[tracing::instrument(skip_all, fields(events = request.get_ref().events.len(), source_id))]
    async fn ingest(
        &self,
        request: Request<IngestRequest>,
    ) -> Result<Response<IngestResponse>, Status> {
        let source = request
            .extensions()
            .get::<AuthedSource>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("missing write key"))?;
        tracing::Span::current().record("source_id", source.source_id.as_str());
        let events = request.into_inner().events;
        let outcome = self
            .core
            .ingest(&source, events, BatchMode::Partial)
            .await?;
        Ok(Response::new(IngestResponse {
            accepted: outcome.accepted,
            duplicates: outcome.duplicates,
            suppressed: outcome.suppressed,
            rejected: outcome
                .rejected
                .into_iter()
                .map(|r| RejectedEvent {
                    index: r.index,
                    message_id: r.message_id,
                    field: r.violation.field,
                    reason: r.violation.description,
                })
                .collect(),
            ignored_identifiers: outcome
                .ignored
                .into_iter()
                .map(|i| IgnoredIdentifier {
                    index: i.index,
                    message_id: i.message_id,
                    field: i.field,
                    reason: i.reason,
                })
                .collect(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_events(
        &self,
        request: Request<ListEventsRequest>,
    ) -> Result<Response<ListEventsResponse>, Status> {
        let r = request.into_inner();
        let filter = EventFilter {
            source_id: non_empty(r.source_id),
            user_id: non_empty(r.user_id),
            anonymous_id: non_empty(r.anonymous_id),
            start: r.start_time.as_ref().map(micros),
            end: r.end_time.as_ref().map(micros),
            before_seq: None,
            limit: r.page_size,
        };
        let (events, next_page_token) = self.core.list_events(filter, &r.page_token).await?;
        Ok(Response::new(ListEventsResponse {
            events,
            next_page_token,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_stats(
        &self,
        request: Request<GetStatsRequest>,
    ) -> Result<Response<GetStatsResponse>, Status> {
        let source_id = non_empty(request.into_inner().source_id);
        let stats = self.core.stats(source_id.as_deref()).await?;
        Ok(Response::new(GetStatsResponse {
            total: Some(stats_message(String::new(), &stats.total)),
            sources: stats
                .sources
                .iter()
                .map(|(id, c)| stats_message(id.clone(), c))
                .collect(),
            pending: stats
                .backlog
                .into_iter()
                .map(|b| ConsumerBacklog {
                    consumer: b.consumer,
                    pending: b.pending,
                    oldest: b.oldest_micros.map(from_micros),
                    dead_letters: b.dead_letters,
                })
                .collect(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn create_source(
        &self,
        request: Request<CreateSourceRequest>,
    ) -> Result<Response<CreateSourceResponse>, Status> {
        let r = request.into_inner();
        let created = self
            .core
            .create_source(&r.name, r.rate_limit_per_second)
            .await?;
        tracing::info!(source_id = %created.source.source_id, name = %created.source.name, "source created");
        Ok(Response::new(CreateSourceResponse {
            source: Some(source_message(created.source)),
            write_key: created.write_key,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_sources(
        &self,
        _request: Request<ListSourcesRequest>,
    ) -> Result<Response<ListSourcesResponse>, Status> {
        let sources = self.core.list_sources().await?;
        Ok(Response::new(ListSourcesResponse {
            sources: sources.into_iter().map(source_message).collect(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn revoke_source(
        &self,
        request: Request<RevokeSourceRequest>,
    ) -> Result<Response<RevokeSourceResponse>, Status> {
        let source = self
            .core
            .revoke_source(&request.into_inner().source_id)
            .await?;
        tracing::info!(source_id = %source.source_id, "source revoked");
        Ok(Response::new(RevokeSourceResponse {
            source: Some(source_message(source)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn replay(
        &self,
        request: Request<ReplayRequest>,
    ) -> Result<Response<ReplayResponse>, Status> {
        let r = request.into_inner();
        let source_id = non_empty(r.source_id);
        let queued = self
            .core
            .replay(&r.consumer, r.start_time, r.end_time, source_id.as_deref())
            .await?;
        tracing::info!(consumer = %r.consumer, queued, "replay queued");
        Ok(Response::new(ReplayResponse { queued }))
    }

    #[tracing::instrument(skip_all)]
    async fn suppress_identities(
        &self,
        request: Request<SuppressIdentitiesRequest>,
    ) -> Result<Response<SuppressIdentitiesResponse>, Status> {
        let request = request.into_inner();
        let identities = request
            .identities
            .into_iter()
            .map(|i| (i.r#type, i.value))
            .collect();
        let (added, erased_events) = self.core.suppress(identities, request.hashed).await?;
        Ok(Response::new(SuppressIdentitiesResponse {
            added,
            erased_events,
        }))
    }
}
