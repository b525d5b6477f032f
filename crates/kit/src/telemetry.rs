//! Logs, traces and metrics. `tracing` renders pretty or JSON logs; when an OTLP endpoint is
//! configured, spans and metrics are exported over OTLP/gRPC as well. W3C trace context is
//! propagated across our gRPC calls in both directions.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use serde::{Deserialize, Serialize};
use tracing::Instrument as _;
use tracing::instrument::Instrumented;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// How log lines are rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable, for terminals.
    #[default]
    Pretty,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// Telemetry settings of one process.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// `service.name` of exported spans and metrics, e.g. `waymark-ingest`.
    pub service_name: String,
    /// Log rendering.
    pub log_format: LogFormat,
    /// `EnvFilter` directives for log lines, e.g. `info,waymark=debug`; `RUST_LOG` wins
    /// when set.
    pub log_filter: String,
    /// `EnvFilter` directives for exported spans, independent of the log filter: a service
    /// that logs only warnings still exports its traces.
    pub trace_filter: String,
    /// Fraction of new traces exported (parent-based: a span whose caller's trace was
    /// sampled is always exported, one whose caller's was not never is).
    pub trace_sample_ratio: f64,
    /// OTLP/gRPC endpoint, e.g. `http://127.0.0.1:4317`; no export at all when unset.
    pub otlp_endpoint: Option<String>,
}

/// Flushes and shuts down the OTel providers on drop. Drop it inside the Tokio runtime: the
/// OTLP exporters send their last batch through a tonic channel driven by that runtime.
#[derive(Default)]
pub struct TelemetryGuard {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(tracer) = self.tracer.take()
            && let Err(error) = tracer.shutdown_with_timeout(Duration::from_secs(5))
        {
            tracing::warn!(%error, "shutting down span export");
        }
        if let Some(meter) = self.meter.take()
            && let Err(error) = meter.shutdown()
        {
            tracing::warn!(%error, "shutting down metric export");
        }
    }
}

/// Installs the global subscriber (fmt layer, `EnvFilter`, and with an endpoint an OTLP span
/// layer plus an OTLP meter provider) and the W3C propagator. Must run inside a Tokio runtime
/// when an endpoint is set. A later call in the same process (tests) keeps the first
/// installation and returns a guard that does nothing.
pub fn init(cfg: &TelemetryConfig) -> anyhow::Result<TelemetryGuard> {
    use tracing_subscriber::Layer as _;
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let log_filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => EnvFilter::try_new(&directives)
            .with_context(|| format!("invalid RUST_LOG {directives:?}"))?,
        _ => EnvFilter::try_new(&cfg.log_filter)
            .with_context(|| format!("invalid log filter {:?}", cfg.log_filter))?,
    };
    let trace_filter = EnvFilter::try_new(&cfg.trace_filter)
        .with_context(|| format!("invalid trace filter {:?}", cfg.trace_filter))?;

    let mut providers = TelemetryGuard::default();
    let otel_layer = match &cfg.otlp_endpoint {
        None => None,
        Some(endpoint) => {
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name(cfg.service_name.clone())
                .build();
            let spans = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()
                .context("building the otlp span exporter")?;
            let sampler =
                Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(cfg.trace_sample_ratio)));
            let tracer_provider = SdkTracerProvider::builder()
                .with_batch_exporter(spans)
                .with_sampler(sampler)
                .with_resource(resource.clone())
                .build();
            let metrics = opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()
                .context("building the otlp metric exporter")?;
            let meter_provider = SdkMeterProvider::builder()
                .with_periodic_exporter(metrics)
                .with_resource(resource)
                .build();
            let tracer = tracer_provider.tracer("waymark");
            providers.tracer = Some(tracer_provider);
            providers.meter = Some(meter_provider);
            Some(
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_filter(trace_filter),
            )
        }
    };
    // Each layer has its own filter: the log filter on the registry would silence the
    // span export too.
    let log_layer = match cfg.log_format {
        LogFormat::Pretty => tracing_subscriber::fmt::layer().boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .boxed(),
    };
    let installed = tracing_subscriber::registry()
        .with(log_layer.with_filter(log_filter))
        .with(otel_layer)
        .try_init();
    if installed.is_err() {
        // Someone (an earlier test) installed a subscriber already: keep theirs, and drop
        // our unused providers without touching the global meter provider.
        return Ok(TelemetryGuard::default());
    }
    // Only now: a failed second call must not swap the meter provider of the first.
    if let Some(meter) = &providers.meter {
        opentelemetry::global::set_meter_provider(meter.clone());
    }
    if let Some(endpoint) = &cfg.otlp_endpoint {
        tracing::info!(endpoint, service = %cfg.service_name, "exporting telemetry over otlp");
    }
    Ok(providers)
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // Propagator keys are lowercase ASCII; anything unrepresentable is skipped, not fatal.
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            value.parse(),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// Writes the current span's trace context (`traceparent`, `tracestate`) into outgoing gRPC
/// metadata so the callee continues the trace.
pub fn inject_trace_context(metadata: &mut tonic::metadata::MetadataMap) {
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&context, &mut MetadataInjector(metadata));
    });
}

/// A tonic client interceptor that propagates the trace context.
pub fn propagate_trace(
    mut request: tonic::Request<()>,
) -> Result<tonic::Request<()>, tonic::Status> {
    inject_trace_context(request.metadata_mut());
    Ok(request)
}

/// The gRPC metadata key that carries the trace contexts a delivery's events were committed
/// under (comma-separated W3C `traceparent`s): the consumer's span links to each.
pub const TRACE_LINKS_HEADER: &str = "waymark-trace-links";

/// Links at most this many contexts to one span (the OpenTelemetry default limit is 128).
pub const MAX_TRACE_LINKS: usize = 32;

/// The W3C `traceparent` of the current span, when it belongs to an exported trace.
pub fn current_traceparent() -> Option<String> {
    use opentelemetry::trace::TraceContextExt as _;
    let context = tracing::Span::current().context();
    let span = context.span();
    let span_context = span.span_context();
    span_context.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            span_context.trace_id(),
            span_context.span_id(),
            span_context.trace_flags().to_u8()
        )
    })
}

/// The span context a W3C `traceparent` names; None when it is malformed.
pub fn parse_traceparent(traceparent: &str) -> Option<opentelemetry::trace::SpanContext> {
    use opentelemetry::trace::TraceContextExt as _;
    let carrier: std::collections::HashMap<String, String> =
        [("traceparent".to_owned(), traceparent.trim().to_owned())].into();
    let context = TraceContextPropagator::new().extract(&carrier);
    let span_context = context.span().span_context().clone();
    span_context.is_valid().then_some(span_context)
}

/// Links `span` to each of `traceparents` (at most [`MAX_TRACE_LINKS`]).
pub fn link_span<'a>(span: &tracing::Span, traceparents: impl IntoIterator<Item = &'a str>) {
    for link in traceparents
        .into_iter()
        .filter_map(parse_traceparent)
        .take(MAX_TRACE_LINKS)
    {
        span.add_link(link);
    }
}

/// `("pkg.Service", "Method")` from a gRPC path `/pkg.Service/Method`.
fn rpc_names(path: &str) -> (String, String) {
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or((path.trim_start_matches('/'), ""));
    (service.to_owned(), method.to_owned())
}

/// The gRPC status of a response at header time: tonic sends errors trailers-only, with
/// `grpc-status` in the headers; without it the call has not failed (yet).
fn grpc_status<B>(response: &http::Response<B>) -> i64 {
    response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// gRPC UNKNOWN: the inner service failed without producing any gRPC status.
const UNKNOWN: i64 = 2;

struct RpcMetrics {
    requests: Counter<u64>,
    errors: Counter<u64>,
    duration: Histogram<f64>,
}

/// Tower layer for tonic servers: a span per RPC (continuing the caller's trace) and
/// request count, latency and error metrics per RPC. Build it after [`init`]: the
/// instruments bind to the meter provider that is global at that moment.
#[derive(Clone)]
pub struct GrpcTelemetryLayer {
    metrics: Arc<RpcMetrics>,
}

impl Default for GrpcTelemetryLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl GrpcTelemetryLayer {
    /// Creates the instruments once, on the global meter `waymark`.
    pub fn new() -> Self {
        let meter = opentelemetry::global::meter("waymark");
        Self {
            metrics: Arc::new(RpcMetrics {
                requests: meter.u64_counter("rpc.server.requests").build(),
                errors: meter.u64_counter("rpc.server.errors").build(),
                duration: meter
                    .f64_histogram("rpc.server.duration")
                    .with_unit("ms")
                    .build(),
            }),
        }
    }
}

impl<S> tower_layer::Layer<S> for GrpcTelemetryLayer {
    type Service = GrpcTelemetry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcTelemetry {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service made by [`GrpcTelemetryLayer`].
#[derive(Clone)]
pub struct GrpcTelemetry<S> {
    inner: S,
    metrics: Arc<RpcMetrics>,
}

impl<S, B, ResBody> tower_service::Service<http::Request<B>> for GrpcTelemetry<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<ResBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = GrpcTelemetryFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let (service, method) = rpc_names(request.uri().path());
        let parent = opentelemetry::global::get_text_map_propagator(|p| {
            p.extract(&HeaderExtractor(request.headers()))
        });
        let span = tracing::info_span!(
            "grpc",
            otel.name = %format_args!("{service}/{method}"),
            otel.kind = "server",
            rpc.service = service.as_str(),
            rpc.method = method.as_str(),
            rpc.grpc.status_code = tracing::field::Empty,
        );
        // Fails only when no OTel layer is installed; then there is no trace to continue.
        let _ = span.set_parent(parent);
        if let Some(links) = request
            .headers()
            .get(TRACE_LINKS_HEADER)
            .and_then(|v| v.to_str().ok())
        {
            link_span(&span, links.split(','));
        }
        let future = {
            // Entered so that anything the inner service does synchronously in `call` is
            // attributed to this RPC too.
            let _entered = span.enter();
            self.inner.call(request)
        };
        GrpcTelemetryFuture {
            inner: future.instrument(span),
            pending: Some(Pending {
                metrics: self.metrics.clone(),
                service,
                method,
                started: Instant::now(),
            }),
        }
    }
}

/// What the future still has to record once the response headers are known.
struct Pending {
    metrics: Arc<RpcMetrics>,
    service: String,
    method: String,
    started: Instant,
}

pin_project_lite::pin_project! {
    /// Response future of [`GrpcTelemetry`]: runs the inner future inside the RPC span and
    /// records status and metrics when it completes.
    pub struct GrpcTelemetryFuture<F> {
        #[pin]
        inner: Instrumented<F>,
        pending: Option<Pending>,
    }
}

impl<F, ResBody, E> Future for GrpcTelemetryFuture<F>
where
    F: Future<Output = Result<http::Response<ResBody>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let result = ready!(this.inner.as_mut().poll(cx));
        if let Some(pending) = this.pending.take() {
            let code = match &result {
                Ok(response) => grpc_status(response),
                Err(_) => UNKNOWN,
            };
            this.inner.span().record("rpc.grpc.status_code", code);
            let attributes = [
                KeyValue::new("rpc.service", pending.service),
                KeyValue::new("rpc.method", pending.method),
                KeyValue::new("rpc.grpc.status_code", code),
            ];
            let metrics = &pending.metrics;
            metrics.requests.add(1, &attributes);
            metrics.duration.record(
                pending.started.elapsed().as_secs_f64() * 1000.0,
                &attributes,
            );
            if code != 0 {
                metrics.errors.add(1, &attributes);
            }
        }
        Poll::Ready(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TraceContextExt as _;
    use std::sync::Mutex;
    use tower_service::Service as _;

    #[test]
    fn rpc_names_come_from_the_path() {
        assert_eq!(
            rpc_names("/waymark.ingest.v1.IngestService/Ingest"),
            (
                "waymark.ingest.v1.IngestService".to_owned(),
                "Ingest".to_owned()
            )
        );
        assert_eq!(rpc_names("/health"), ("health".to_owned(), String::new()));
        assert_eq!(rpc_names("/"), (String::new(), String::new()));
    }

    #[test]
    fn trace_context_is_injected_inside_a_span() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("outgoing");
            let _entered = span.enter();
            let request = propagate_trace(tonic::Request::new(())).unwrap();
            let traceparent = request.metadata().get("traceparent").expect("traceparent");
            let trace_id = span.context().span().span_context().trace_id();
            assert_ne!(trace_id, opentelemetry::trace::TraceId::INVALID);
            assert!(
                traceparent
                    .to_str()
                    .unwrap()
                    .contains(&trace_id.to_string()),
                "{traceparent:?} carries {trace_id}"
            );
        });
    }

    /// Captures the status code the layer records on its span.
    #[derive(Clone, Default)]
    struct StatusCapture(Arc<Mutex<Option<i64>>>);

    impl tracing::field::Visit for StatusCapture {
        fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
            if field.name() == "rpc.grpc.status_code" {
                *self.0.lock().unwrap() = Some(value);
            }
        }

        fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
    }

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for StatusCapture {
        fn on_record(
            &self,
            _: &tracing::span::Id,
            values: &tracing::span::Record<'_>,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            values.record(&mut self.clone());
        }
    }

    #[tokio::test]
    async fn layer_continues_the_trace_and_records_the_status() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let provider = SdkTracerProvider::builder().build();
        let status = StatusCapture::default();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
            .with(status.clone());
        // Current-thread test runtime: the scoped subscriber covers the whole call.
        let _default = tracing::subscriber::set_default(subscriber);

        let inner = tower::service_fn(|_request: http::Request<()>| async {
            let trace_id = tracing::Span::current()
                .context()
                .span()
                .span_context()
                .trace_id();
            let mut response = http::Response::new(trace_id.to_string());
            response
                .headers_mut()
                .insert("grpc-status", http::HeaderValue::from_static("5"));
            Ok::<_, std::convert::Infallible>(response)
        });
        let mut service = tower_layer::Layer::layer(&GrpcTelemetryLayer::new(), inner);
        let request = http::Request::builder()
            .uri("/waymark.profile.v1.ProfileService/GetProfile")
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .body(())
            .unwrap();
        std::future::poll_fn(|cx| service.poll_ready(cx))
            .await
            .unwrap();
        let response = service.call(request).await.unwrap();

        assert_eq!(response.headers()["grpc-status"], "5");
        assert_eq!(response.body(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(*status.0.lock().unwrap(), Some(5));
    }
}
