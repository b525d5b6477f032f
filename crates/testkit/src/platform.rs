//! The real services in-process on port 0: a profile server alone, or ingestion and the
//! profile service wired both ways (`Platform`), as the profile suite and the end-to-end
//! suite boot them.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use waymark_kit::CancellationToken;
use waymark_kit::config::Config;
use waymark_kit::secret::Secret;
use waymark_profile::ProfileServer;
use waymark_proto::common::v1::event_sink_client::EventSinkClient;
use waymark_proto::common::v1::{DeliverRequest, DeliverResponse, Event};
use waymark_proto::profile::v1::profile_service_client::ProfileServiceClient;
use waymark_proto::profile::v1::{PutSegmentRequest, Segment};

use crate::{ADMIN_TOKEN, Backend, PATIENCE, TestDb, admin, eventually};

/// Config for a profile test server relaying to `sink` (orchestrator and analytics).
pub fn config(database_url: &str, sink: &str, redis_url: Option<&str>) -> Config {
    Config {
        database_url: database_url.to_owned(),
        admin_token: Some(Secret::new(ADMIN_TOKEN)),
        orchestrator_endpoint: sink.to_owned(),
        analytics_endpoint: sink.to_owned(),
        redis_url: redis_url.map(str::to_owned),
        auto_migrate: true,
        drain_secs: 0,
        relay_max_backoff_ms: 500,
        database_max_connections: 8,
        log_filter: "warn".into(),
        // Tests share one Redis: a prefix per server keeps their identities apart.
        profile_cache_key_prefix: format!("test-{}:", uuid::Uuid::new_v4().simple()),
        ..Config::default()
    }
}

/// A running profile server.
pub struct TestProfile {
    pub addr: SocketAddr,
    /// The Redis key prefix of this server's cache entries.
    pub cache_prefix: String,
    shutdown: CancellationToken,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestProfile {
    pub async fn start(config: Config) -> Self {
        std::mem::forget(waymark_kit::telemetry::init(
            &config.telemetry("profile-test"),
        ));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cache_prefix = config.profile_cache_key_prefix.clone();
        let server = ProfileServer::new(config).await.expect("profile server");
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(server.serve(listener, shutdown.clone()));
        let this = Self {
            addr,
            cache_prefix,
            shutdown,
            handle: Some(handle),
        };
        wait_serving(&this.url()).await;
        this
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn client(&self) -> ProfileServiceClient<Channel> {
        ProfileServiceClient::connect(self.url()).await.unwrap()
    }

    /// Delivers events as ingestion's relay would.
    pub async fn deliver(&self, events: Vec<Event>) -> DeliverResponse {
        let mut client = EventSinkClient::connect(self.url()).await.unwrap();
        client
            .deliver(admin(DeliverRequest {
                producer: "test".into(),
                events,
            }))
            .await
            .expect("deliver")
            .into_inner()
    }

    /// Stores a segment.
    pub async fn put_segment(&self, id: &str, condition: &str) -> Segment {
        self.client()
            .await
            .put_segment(admin(PutSegmentRequest {
                segment: Some(Segment {
                    segment_id: id.into(),
                    name: id.into(),
                    condition: condition.into(),
                    ..Segment::default()
                }),
            }))
            .await
            .expect("put segment")
            .into_inner()
            .segment
            .unwrap()
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(h) = self.handle.take() {
            h.await.unwrap().unwrap();
        }
    }
}

impl Drop for TestProfile {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Waits until a server's gRPC health reports SERVING: its migrations are applied.
pub async fn wait_serving(url: &str) {
    let serving = tonic_health_serving();
    eventually(&format!("{url} to be serving"), PATIENCE, async || {
        let channel = Channel::from_shared(url.to_owned())
            .unwrap()
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        let check = tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        };
        let status = health
            .check(check)
            .await
            .map_err(|e| e.to_string())?
            .into_inner()
            .status;
        if status == serving {
            Ok(())
        } else {
            Err(format!("health status {status}"))
        }
    })
    .await;
}

fn tonic_health_serving() -> i32 {
    tonic_health::pb::health_check_response::ServingStatus::Serving as i32
}

/// The real ingestion service and a profile service wired both ways: ingestion relays to
/// the profile service, which pushes suppressions back to ingestion.
pub struct Platform {
    pub profile: TestProfile,
    pub http: SocketAddr,
    pub ingest: waymark_proto::ingest::v1::ingest_service_client::IngestServiceClient<Channel>,
    pub write_key: String,
    /// Ingestion's gRPC endpoint.
    pub ingest_url: String,
    /// The database both services share (each in its own schema or file).
    pub database_url: String,
    shutdown: CancellationToken,
    ingest_task: JoinHandle<anyhow::Result<()>>,
    _db: TestDb,
}

impl Platform {
    /// Boots both on `backend`, with `loyalty_id` a custom identifier type; the profile
    /// service relays downstream to `sink` and caches in Redis at `redis_url`, or in
    /// process without one.
    pub async fn start(backend: Backend, sink: &str, redis_url: Option<&str>) -> Self {
        Self::start_with(backend, sink, sink, redis_url).await
    }

    /// As [`Platform::start`], relaying resolved events to `orchestrator` and `analytics`
    /// separately.
    pub async fn start_with(
        backend: Backend,
        orchestrator: &str,
        analytics: &str,
        redis_url: Option<&str>,
    ) -> Self {
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (grpc_addr, http_addr) = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
        // One database for both, as a deployment with one database URL has: each service
        // keeps to its own schema (PostgreSQL) or file (SQLite).
        let db = TestDb::new(backend).await;
        // Both read one configuration in a deployment, custom identifier types included.
        let custom_types = vec!["loyalty_id".to_owned()];
        let mut profile_config = config(&db.url, analytics, redis_url);
        profile_config.orchestrator_endpoint = orchestrator.to_owned();
        profile_config.ingest_endpoint = format!("http://{grpc_addr}");
        profile_config
            .custom_identity_types
            .clone_from(&custom_types);
        let profile = TestProfile::start(profile_config).await;

        let mut ingest_config = config(&db.url, analytics, None);
        ingest_config.profile_endpoint = profile.url();
        ingest_config.custom_identity_types = custom_types;
        let ingest = waymark_ingest::IngestServer::new(ingest_config)
            .await
            .unwrap();
        let shutdown = CancellationToken::new();
        let ingest_task = tokio::spawn(ingest.serve(grpc, http, shutdown.clone()));
        let ingest_url = format!("http://{grpc_addr}");
        wait_serving(&ingest_url).await;
        let mut client =
            waymark_proto::ingest::v1::ingest_service_client::IngestServiceClient::connect(
                ingest_url.clone(),
            )
            .await
            .unwrap();
        let write_key = client
            .create_source(admin(waymark_proto::ingest::v1::CreateSourceRequest {
                name: "all".into(),
                rate_limit_per_second: 0,
            }))
            .await
            .expect("create a source")
            .into_inner()
            .write_key;
        Self {
            profile,
            http: http_addr,
            ingest: client,
            write_key,
            ingest_url,
            database_url: db.url.clone(),
            shutdown,
            ingest_task,
            _db: db,
        }
    }

    /// Posts a Segment batch to `/v1/batch`; returns the HTTP status.
    pub async fn post_batch(&self, batch: serde_json::Value) -> u16 {
        reqwest::Client::new()
            .post(format!("http://{}/v1/batch", self.http))
            .basic_auth(&self.write_key, Some(""))
            .body(serde_json::to_vec(&batch).unwrap())
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.ingest_task.await.unwrap().unwrap();
        self.profile.stop().await;
    }
}
