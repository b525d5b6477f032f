//! The ingestion test server and request helpers; the shared harness is `waymark_testkit`.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::Request;
use tonic::transport::Channel;
use waymark_ingest::{IngestServer, Ingestor};
use waymark_kit::CancellationToken;
use waymark_kit::config::Config;
use waymark_kit::secret::Secret;
use waymark_proto::common::v1::Event;
use waymark_proto::ingest::v1::ingest_service_client::IngestServiceClient;
use waymark_proto::ingest::v1::{CreateSourceRequest, GetStatsRequest, IngestRequest};
pub use waymark_testkit::{
    ADMIN_TOKEN, Backend, PATIENCE, Proxy, Sink, TestDb, admin, eventually, with_key,
};

/// Config for a test server: loopback ports, auto-migration, no drain delay.
pub fn config(database_url: &str, profile_endpoint: &str) -> Config {
    Config {
        database_url: database_url.to_owned(),
        admin_token: Some(Secret::new(ADMIN_TOKEN)),
        profile_endpoint: profile_endpoint.to_owned(),
        auto_migrate: true,
        drain_secs: 0,
        relay_max_backoff_ms: 500,
        database_max_connections: 8,
        log_filter: "warn".into(),
        ..Config::default()
    }
}

/// A running ingestion server.
pub struct TestServer {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub core: Ingestor,
    shutdown: CancellationToken,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    pub async fn start(config: Config) -> Self {
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (grpc_addr, http_addr) = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
        // Logs show in failing tests' output; RUST_LOG overrides the level.
        std::mem::forget(waymark_kit::telemetry::init(
            &config.telemetry("ingest-test"),
        ));
        let service = IngestServer::new(config).await.expect("service");
        let core = service.core().clone();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(service.serve(grpc, http, shutdown.clone()));
        let server = Self {
            grpc_addr,
            http_addr,
            core,
            shutdown,
            handle: Some(handle),
        };
        server.wait_serving(true).await;
        server
    }

    /// Waits until `/health` reports `serving` (or not).
    pub async fn wait_serving(&self, serving: bool) {
        let url = format!("http://{}/health", self.http_addr);
        let what = if serving { "serving" } else { "not serving" };
        eventually(&format!("the server to be {what}"), PATIENCE, async || {
            let ok = matches!(reqwest::get(&url).await, Ok(r) if r.status().is_success());
            ok == serving
        })
        .await;
    }

    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http_addr)
    }

    pub async fn client(&self) -> IngestServiceClient<Channel> {
        IngestServiceClient::connect(self.grpc_url())
            .await
            .expect("connect")
    }

    /// Creates a source through the admin RPC and returns (source_id, write_key).
    pub async fn create_source(&self, name: &str, rate_limit: u32) -> (String, String) {
        let created = self
            .client()
            .await
            .create_source(admin(CreateSourceRequest {
                name: name.into(),
                rate_limit_per_second: rate_limit,
            }))
            .await
            .expect("create source")
            .into_inner();
        (created.source.unwrap().source_id, created.write_key)
    }

    /// Waits until the outbox holds nothing for any consumer.
    pub async fn wait_outbox_empty(&self, what: &str) {
        waymark_testkit::eventually(what, waymark_testkit::PATIENCE, async || {
            let stats = self
                .client()
                .await
                .get_stats(waymark_testkit::admin(GetStatsRequest::default()))
                .await
                .unwrap()
                .into_inner();
            if stats.pending.is_empty() {
                Ok(())
            } else {
                Err(stats.pending)
            }
        })
        .await;
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(handle) = self.handle.take() {
            handle.await.expect("join").expect("server result");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub fn ingest_request(events: Vec<Event>, key: &str) -> Request<IngestRequest> {
    with_key(IngestRequest { events }, key)
}

/// A track event with a fixed message id.
pub fn track(message_id: &str, user_id: &str, name: &str) -> Event {
    let mut event = Event {
        message_id: message_id.into(),
        user_id: user_id.into(),
        event: name.into(),
        ..Event::default()
    };
    event.set_type(waymark_proto::common::v1::EventType::Track);
    event
}

/// Gzips bytes.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}
