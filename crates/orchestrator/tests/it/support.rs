//! A real orchestrator in-process on port 0, with a manual clock the tests move, a real
//! webhook receiver for its messages and escalations, and a real EventSink for its step
//! events.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use waymark_kit::CancellationToken;
use waymark_kit::config::Config;
use waymark_kit::secret::Secret;
use waymark_orchestrator::{Clock, Orchestrator, OrchestratorServer};
use waymark_proto::common::v1::event_sink_client::EventSinkClient;
use waymark_proto::common::v1::{DeliverRequest, DeliverResponse, Event};
use waymark_proto::orchestration::v1::orchestration_service_client::OrchestrationServiceClient;
use waymark_proto::orchestration::v1::*;
pub use waymark_testkit::webhooks::WebhookReceiver;
pub use waymark_testkit::{
    ADMIN_TOKEN, Backend, EventBuilder, PATIENCE, Sink, TestDb, admin, eventually,
};

/// Monday 2 March 2026, 09:00 UTC: where the manual clock starts.
pub const START_US: i64 = 1_772_442_000_000_000;
pub const HOUR: Duration = Duration::from_secs(3600);
pub const DAY: Duration = Duration::from_secs(86_400);
/// The secret outbound webhooks are signed with.
pub const WEBHOOK_SECRET: &str = waymark_kit::config::DEV_WEBHOOK_SECRET;

/// Config for an orchestrator on `database_url` posting messages and escalations to
/// `receiver` and step events to `sink`. No profile service or ingestion runs: profiles
/// the cache lacks are empty.
pub fn config(database_url: &str, receiver: &str, sink: &str) -> Config {
    Config {
        database_url: database_url.to_owned(),
        admin_token: Some(Secret::new(ADMIN_TOKEN)),
        analytics_endpoint: sink.to_owned(),
        profile_endpoint: "http://127.0.0.1:9".into(),
        ingest_endpoint: "http://127.0.0.1:9".into(),
        message_webhook_url: Some(format!("{receiver}/messages")),
        escalation_webhook_url: Some(format!("{receiver}/cases")),
        auto_migrate: true,
        drain_secs: 0,
        relay_max_backoff_ms: 500,
        database_max_connections: 8,
        log_filter: "warn".into(),
        profile_cache_key_prefix: format!("test-{}:", uuid::Uuid::new_v4().simple()),
        ..Config::default()
    }
}

/// A running orchestrator.
pub struct TestOrchestrator {
    pub addr: SocketAddr,
    pub core: Orchestrator,
    pub clock: Clock,
    shutdown: CancellationToken,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestOrchestrator {
    pub async fn start(config: Config, clock: Clock) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = OrchestratorServer::with_clock(config, clock.clone())
            .await
            .expect("orchestrator");
        let core = server.core().clone();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(server.serve(listener, shutdown.clone()));
        let this = Self {
            addr,
            core,
            clock,
            shutdown,
            handle: Some(handle),
        };
        waymark_testkit::platform::wait_serving(&this.url()).await;
        this
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn client(&self) -> OrchestrationServiceClient<Channel> {
        OrchestrationServiceClient::connect(self.url())
            .await
            .unwrap()
    }

    /// Delivers events as the profile service's relay would.
    pub async fn deliver(&self, events: Vec<Event>) -> DeliverResponse {
        EventSinkClient::connect(self.url())
            .await
            .unwrap()
            .deliver(admin(DeliverRequest {
                producer: "profile".into(),
                events,
            }))
            .await
            .expect("deliver")
            .into_inner()
    }

    /// Saves and publishes a journey given in its JSON form; returns the version.
    pub async fn publish(&self, journey: serde_json::Value) -> u32 {
        let definition: JourneyDefinition =
            waymark_proto::proto_json::from_json(&journey).expect("a journey in proto3 JSON");
        let id = definition.journey_id.clone();
        let mut client = self.client().await;
        client
            .put_journey(admin(PutJourneyRequest {
                journey: Some(definition),
            }))
            .await
            .expect("put journey");
        client
            .publish_journey(admin(PublishJourneyRequest {
                journey_id: id,
                ..PublishJourneyRequest::default()
            }))
            .await
            .expect("publish journey")
            .into_inner()
            .version
    }

    /// Moves the clock on and fires what fell due.
    pub async fn advance(&self, by: Duration) {
        self.clock.advance(by);
        self.core.fire_due().await.expect("fire due waits");
    }

    /// Enrollments of a profile, newest first.
    pub async fn enrollments_of(&self, profile_id: &str) -> Vec<Enrollment> {
        self.client()
            .await
            .list_enrollments(admin(ListEnrollmentsRequest {
                profile_id: profile_id.into(),
                ..ListEnrollmentsRequest::default()
            }))
            .await
            .unwrap()
            .into_inner()
            .enrollments
    }

    /// The path of an enrollment, as `node:outcome:decision`.
    pub async fn path(&self, enrollment_id: &str) -> Vec<String> {
        self.client()
            .await
            .get_enrollment(admin(GetEnrollmentRequest {
                enrollment_id: enrollment_id.into(),
            }))
            .await
            .unwrap()
            .into_inner()
            .steps
            .iter()
            .map(|s| format!("{}:{}:{}", s.node_id, s.outcome, s.decision))
            .collect()
    }

    /// Actions, newest first, optionally of one profile.
    pub async fn actions(&self, profile_id: &str) -> Vec<Action> {
        self.client()
            .await
            .list_actions(admin(ListActionsRequest {
                profile_id: profile_id.into(),
                ..ListActionsRequest::default()
            }))
            .await
            .unwrap()
            .into_inner()
            .actions
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(h) = self.handle.take() {
            h.await.unwrap().unwrap();
        }
    }
}

impl Drop for TestOrchestrator {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Puts the contact policy.
pub async fn put_policy(server: &TestOrchestrator, policy: serde_json::Value) {
    let policy: ContactPolicy =
        waymark_proto::proto_json::from_json(&policy).expect("a policy in proto3 JSON");
    server
        .client()
        .await
        .put_contact_policy(admin(PutContactPolicyRequest {
            policy: Some(policy),
        }))
        .await
        .expect("put policy");
}

/// A track event of `profile_id`.
pub fn track(name: &str, profile_id: &str, properties: serde_json::Value) -> Event {
    let mut e = EventBuilder::track(name)
        .user(&format!("user-{profile_id}"))
        .properties(properties)
        .build();
    e.profile_id = profile_id.to_owned();
    e
}

/// Everything needed to run one scenario: a database, a receiver, a sink and the server.
pub struct Rig {
    pub server: TestOrchestrator,
    pub receiver: WebhookReceiver,
    pub sink: Sink,
    pub db: TestDb,
}

impl Rig {
    pub async fn start(backend: Backend) -> Rig {
        Rig::start_at(backend, START_US).await
    }

    /// A rig whose clock starts at `now_us`.
    pub async fn start_at(backend: Backend, now_us: i64) -> Rig {
        let db = TestDb::new(backend).await;
        let receiver = WebhookReceiver::start(WEBHOOK_SECRET).await;
        let sink = Sink::default();
        let sink_url = sink.start().await;
        let server = TestOrchestrator::start(
            config(&db.url, &receiver.url(), &sink_url),
            Clock::manual(now_us),
        )
        .await;
        Rig {
            server,
            receiver,
            sink,
            db,
        }
    }

    /// A connection to the orchestrator's own database, as the server opens it: what a
    /// replica that dies mid-step leaves behind is written through it.
    pub async fn store(&self) -> sea_orm::DatabaseConnection {
        let url = config(&self.db.url, "", "").orchestrator_database();
        waymark_kit::db::connect(&url, "orchestrator", 2)
            .await
            .unwrap()
    }

    /// A second server on the same database, as another replica.
    pub async fn replica(&self) -> TestOrchestrator {
        TestOrchestrator::start(
            config(&self.db.url, &self.receiver.url(), "http://127.0.0.1:9"),
            self.server.clock.clone(),
        )
        .await
    }
}
