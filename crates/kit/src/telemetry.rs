//! Logs, traces and metrics. `tracing` renders pretty or JSON logs; when an OTLP endpoint is
//! configured, spans and metrics are exported over OTLP/gRPC as well. W3C trace context is
//! propagated across our gRPC calls in both directions.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use anyhow::Context as _;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde::{Deserialize, Serialize};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

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
    /// `service.name` of exported spans and metrics.
    pub service_name: String,
    /// Log rendering.
    pub log_format: LogFormat,
    /// Filter directives; `RUST_LOG` wins when set.
    pub log_filter: String,
    /// OTLP/gRPC endpoint; no export when unset.
    pub otlp_endpoint: Option<String>,
}

/// Flushes and shuts down the exporters when dropped.
#[derive(Default)]
pub struct TelemetryGuard {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(t) = self.tracer.take() {
            let _ = t.shutdown();
        }
        if let Some(m) = self.meter.take() {
            let _ = m.shutdown();
        }
    }
}

/// Installs the global subscriber, propagator and (with an endpoint) OTLP exporters. A
/// second call in the same process (tests) leaves the first installation in place.
pub fn init(cfg: &TelemetryConfig) -> anyhow::Result<TelemetryGuard> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.log_filter))
        .with_context(|| format!("invalid log filter {:?}", cfg.log_filter))?;
    let mut guard = TelemetryGuard::default();
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
                .context("building the OTLP span exporter")?;
            let tracer_provider = SdkTracerProvider::builder()
                .with_batch_exporter(spans)
                .with_resource(resource.clone())
                .build();
            let metrics = opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()
                .context("building the OTLP metric exporter")?;
            let meter_provider = SdkMeterProvider::builder()
                .with_periodic_exporter(metrics)
                .with_resource(resource)
                .build();
            opentelemetry::global::set_meter_provider(meter_provider.clone());
            let tracer = tracer_provider.tracer("waymark");
            guard.tracer = Some(tracer_provider);
            guard.meter = Some(meter_provider);
            Some(tracing_opentelemetry::layer().with_tracer(tracer))
        }
    };
    let (pretty, json) = match cfg.log_format {
        LogFormat::Pretty => (
            Some(tracing_subscriber::fmt::layer().with_target(false)),
            None,
        ),
        LogFormat::Json => (
            None,
            Some(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true),
            ),
        ),
    };
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(pretty)
        .with(json)
        .with(otel_layer)
        .try_init();
    if installed.is_err() {
        // Already installed in this process: keep that one, export nothing twice.
        return Ok(TelemetryGuard::default());
    }
    if let Some(endpoint) = &cfg.otlp_endpoint {
        tracing::info!(endpoint, service = %cfg.service_name, "exporting telemetry over otlp");
    }
    Ok(guard)
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
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            value.parse(),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// Writes the current span's trace context into outgoing gRPC metadata.
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

/// `("pkg.Service", "Method")` from a gRPC path `/pkg.Service/Method`.
fn rpc_names(path: &str) -> (String, String) {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let service = parts.next().unwrap_or_default().to_owned();
    let method = parts.next().unwrap_or_default().to_owned();
    (service, method)
}

struct RpcMetrics {
    requests: Counter<u64>,
    errors: Counter<u64>,
    duration: Histogram<f64>,
}

/// Tower layer for tonic servers: a span per RPC (continuing the caller's trace) and
/// request count, latency and error metrics per RPC.
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
    /// Creates the instruments once, on the global meter provider.
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

impl<S, B, R> tower_service::Service<http::Request<B>> for GrpcTelemetry<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    R: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

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
            otel.name = %format!("{service}/{method}"),
            otel.kind = "server",
            rpc.service = %service,
            rpc.method = %method,
            rpc.grpc.status_code = tracing::field::Empty,
        );
        let _ = span.set_parent(parent);
        let metrics = self.metrics.clone();
        let started = Instant::now();
        let future = self.inner.call(request);
        let record_span = span.clone();
        Box::pin(
            async move {
                let result = future.await;
                let code = match &result {
                    Ok(response) => response
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i64>().ok())
                        .unwrap_or(0),
                    Err(_) => 13,
                };
                record_span.record("rpc.grpc.status_code", code);
                let attrs = [
                    KeyValue::new("rpc.service", service),
                    KeyValue::new("rpc.method", method),
                    KeyValue::new("rpc.grpc.status_code", code),
                ];
                metrics.requests.add(1, &attrs);
                metrics
                    .duration
                    .record(started.elapsed().as_secs_f64() * 1000.0, &attrs);
                if code != 0 {
                    metrics.errors.add(1, &attrs);
                }
                result
            }
            .instrument(span),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TraceContextExt;

    #[test]
    fn rpc_names_come_from_the_path() {
        assert_eq!(
            rpc_names("/waymark.ingest.v1.IngestService/Ingest"),
            (
                "waymark.ingest.v1.IngestService".to_owned(),
                "Ingest".to_owned()
            )
        );
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
            let mut metadata = tonic::metadata::MetadataMap::new();
            inject_trace_context(&mut metadata);
            let traceparent = metadata
                .get("traceparent")
                .expect("traceparent")
                .to_str()
                .unwrap()
                .to_owned();
            let trace_id = span.context().span().span_context().trace_id().to_string();
            assert!(
                traceparent.contains(&trace_id),
                "{traceparent} carries {trace_id}"
            );
        });
    }

    #[tokio::test]
    async fn layer_passes_responses_through() {
        use tower::ServiceExt;
        let inner = tower::service_fn(|_req: http::Request<()>| async {
            let mut response = http::Response::new(());
            response
                .headers_mut()
                .insert("grpc-status", http::HeaderValue::from_static("5"));
            Ok::<_, std::convert::Infallible>(response)
        });
        let service = tower_layer::Layer::layer(&GrpcTelemetryLayer::new(), inner);
        let request = http::Request::builder().uri("/a.B/C").body(()).unwrap();
        let response = service.oneshot(request).await.unwrap();
        assert_eq!(response.headers()["grpc-status"], "5");
    }
}
