//! Telemetry of `waymark serve ingest` and `waymark serve profile` as separate processes,
//! exporting to a real OTLP/gRPC receiver (the collector's trace and metrics services)
//! while logging only warnings: spans arrive from both, the profile service's delivery span
//! links to the HTTP request that brought the event in, and the on-call metrics arrive.

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use tonic::{Request, Response, Status};
use waymark_proto::ingest::v1::CreateSourceRequest;
use waymark_proto::ingest::v1::ingest_service_client::IngestServiceClient;
use waymark_testkit::{ADMIN_TOKEN, Backend, PATIENCE, TestDb, admin, eventually};

use crate::support::{Process, free_port};

/// What the receiver got: spans with the service that sent them, and metric names.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
    metrics: Arc<Mutex<HashSet<String>>>,
}

fn service_name(resource: Option<&opentelemetry_proto::tonic::resource::v1::Resource>) -> String {
    resource
        .into_iter()
        .flat_map(|r| r.attributes.iter())
        .find(|a| a.key == "service.name")
        .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            let service = service_name(resource.resource.as_ref());
            for scope in resource.scope_spans {
                spans.extend(scope.spans.into_iter().map(|s| (service.clone(), s)));
            }
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        let mut metrics = self.metrics.lock().unwrap();
        for resource in request.into_inner().resource_metrics {
            for scope in resource.scope_metrics {
                metrics.extend(scope.metrics.into_iter().map(|m| m.name));
            }
        }
        Ok(Response::new(ExportMetricsServiceResponse::default()))
    }
}

impl Collector {
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(self.clone()))
                .add_service(MetricsServiceServer::new(self.clone()))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        format!("http://{addr}")
    }
}

/// A `waymark` process, killed when dropped.
fn attribute<'a>(span: &'a Span, key: &str) -> Option<&'a str> {
    span.attributes.iter().find(|a| a.key == key).and_then(|a| {
        match a.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.as_str()),
            _ => None,
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_cross_services_whatever_the_log_level_and_metrics_arrive() {
    let collector = Collector::default();
    let otlp = collector.start().await;
    let db = TestDb::new(Backend::Postgres).await;
    let (ingest_grpc, ingest_http, profile_grpc) = (free_port(), free_port(), free_port());
    let serve = |service: &str| {
        let child = Command::new(env!("CARGO_BIN_EXE_waymark"))
            .args(["serve", service])
            .env("WAYMARK_DATABASE_URL", &db.url)
            .env("WAYMARK_AUTO_MIGRATE", "true")
            .env("WAYMARK_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("WAYMARK_OTLP_ENDPOINT", &otlp)
            .env("WAYMARK_LOG_FILTER", "warn")
            .env("WAYMARK_DRAIN_SECS", "0")
            .env(
                "WAYMARK_INGEST_GRPC_ADDR",
                format!("127.0.0.1:{ingest_grpc}"),
            )
            .env(
                "WAYMARK_INGEST_HTTP_ADDR",
                format!("127.0.0.1:{ingest_http}"),
            )
            .env(
                "WAYMARK_PROFILE_GRPC_ADDR",
                format!("127.0.0.1:{profile_grpc}"),
            )
            .env(
                "WAYMARK_INGEST_ENDPOINT",
                format!("http://127.0.0.1:{ingest_grpc}"),
            )
            .env(
                "WAYMARK_PROFILE_ENDPOINT",
                format!("http://127.0.0.1:{profile_grpc}"),
            )
            .env("OTEL_METRIC_EXPORT_INTERVAL", "300")
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .env_remove("RUST_LOG")
            .stdout(Stdio::inherit())
            .spawn()
            .expect("the waymark binary");
        Process(child)
    };
    let _profile = serve("profile");
    let _ingest = serve("ingest");

    let health = format!("http://127.0.0.1:{ingest_http}/health");
    // Two processes starting and migrating: twice the usual patience.
    let what = "ingestion to report serving once migrated";
    eventually(what, 2 * PATIENCE, async || {
        let response = reqwest::get(&health).await;
        response.is_ok_and(|r| r.status().is_success())
    })
    .await;
    let mut ingest = IngestServiceClient::connect(format!("http://127.0.0.1:{ingest_grpc}"))
        .await
        .expect("ingestion answers");
    let write_key = eventually("a source", PATIENCE, async || {
        ingest
            .create_source(admin(CreateSourceRequest {
                name: "web".into(),
                rate_limit_per_second: 0,
            }))
            .await
            .map(|created| created.into_inner().write_key)
    })
    .await;
    let status = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{ingest_http}/v1/batch"))
        .basic_auth(&write_key, Some(""))
        .body(
            serde_json::json!({ "batch": [
                { "type": "track", "event": "Signed Up", "userId": "otel-user", "messageId": "otel-1" }
            ]})
            .to_string(),
        )
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status.as_u16(), 200);

    let wanted_metrics = [
        "rpc.server.requests",
        "rpc.server.duration",
        "http.server.request.duration",
        "ingest.events",
        "outbox.delivered",
        "outbox.backlog",
        "outbox.lag",
        "outbox.dead_letters",
        "profile.events",
        "db.client.connection.count",
    ];
    let what = "the delivery span linked to the ingest request's trace, and every metric";
    eventually(what, PATIENCE + PATIENCE / 2, async || {
        let linked = {
            let spans = collector.spans.lock().unwrap();
            let request_traces: HashSet<&[u8]> = spans
                .iter()
                .filter(|(service, span)| {
                    service == "waymark-ingest" && attribute(span, "path") == Some("/v1/batch")
                })
                .map(|(_, span)| span.trace_id.as_slice())
                .collect();
            spans.iter().any(|(service, span)| {
                service == "waymark-profile"
                    && span.name.ends_with("EventSink/Deliver")
                    && span
                        .links
                        .iter()
                        .any(|l| request_traces.contains(l.trace_id.as_slice()))
            })
        };
        let metrics = collector.metrics.lock().unwrap().clone();
        let missing: Vec<&str> = wanted_metrics
            .into_iter()
            .filter(|m| !metrics.contains(*m))
            .collect();
        if linked && missing.is_empty() {
            Ok(())
        } else {
            Err(format!("linked: {linked}, metrics missing: {missing:?}"))
        }
    })
    .await;
    let services: HashSet<String> = collector
        .spans
        .lock()
        .unwrap()
        .iter()
        .map(|(service, _)| service.clone())
        .collect();
    assert!(
        services.contains("waymark-ingest") && services.contains("waymark-profile"),
        "spans from both services at log level warn: {services:?}"
    );
}
