//! A real analytics service in-process on port 0, fed through its EventSink as the
//! profile service's and the orchestrator's relays feed it.

use std::net::SocketAddr;

use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use waymark_analytics::{Analytics, AnalyticsServer};
use waymark_kit::CancellationToken;
use waymark_kit::config::Config;
use waymark_kit::secret::Secret;
use waymark_proto::analytics::v1::analytics_service_client::AnalyticsServiceClient;
use waymark_proto::analytics::v1::*;
use waymark_proto::common::v1::event_sink_client::EventSinkClient;
use waymark_proto::common::v1::{DeliverRequest, DeliverResponse, Event, EventType};
pub use waymark_testkit::{ADMIN_TOKEN, Backend, TestDb, admin};

/// Monday 2 March 2026, 09:00 UTC, in seconds: where synthetic histories start.
pub const T0: i64 = 1_772_442_000;
pub const MINUTE: i64 = 60;
pub const HOUR: i64 = 3600;
pub const DAY: i64 = 86_400;

/// Config for analytics on `database_url`, writing stages back to `profile_endpoint`.
pub fn config(database_url: &str, profile_endpoint: &str) -> Config {
    Config {
        database_url: database_url.to_owned(),
        admin_token: Some(Secret::new(ADMIN_TOKEN)),
        profile_endpoint: profile_endpoint.to_owned(),
        auto_migrate: true,
        drain_secs: 0,
        database_max_connections: 4,
        log_filter: "warn".into(),
        analytics_write_back_secs: 3600,
        ..Config::default()
    }
}

/// A running analytics service.
pub struct TestAnalytics {
    pub addr: SocketAddr,
    pub core: Analytics,
    shutdown: CancellationToken,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestAnalytics {
    pub async fn start(config: Config) -> Self {
        Self::start_on(TcpListener::bind("127.0.0.1:0").await.unwrap(), config).await
    }

    /// Serves on `listener`, bound earlier so that producers can be told its address.
    pub async fn start_on(listener: TcpListener, config: Config) -> Self {
        let addr = listener.local_addr().unwrap();
        let server = AnalyticsServer::new(config).await.expect("analytics");
        let core = server.core().clone();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(server.serve(listener, shutdown.clone()));
        let this = Self {
            addr,
            core,
            shutdown,
            handle: Some(handle),
        };
        waymark_testkit::platform::wait_serving(&this.url()).await;
        this
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn client(&self) -> AnalyticsServiceClient<Channel> {
        AnalyticsServiceClient::connect(self.url()).await.unwrap()
    }

    /// Delivers events as a relay would.
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

    pub async fn funnel(&self, request: GetFunnelRequest) -> GetFunnelResponse {
        self.client()
            .await
            .get_funnel(admin(request))
            .await
            .expect("funnel")
            .into_inner()
    }

    /// Stops serving and waits until it has.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(handle) = self.handle.take() {
            handle.await.unwrap().unwrap();
        }
    }
}

impl Drop for TestAnalytics {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A database and an analytics service on it.
pub struct Rig {
    pub db: TestDb,
    pub server: TestAnalytics,
}

impl Rig {
    pub async fn start(backend: Backend) -> Rig {
        let db = TestDb::new(backend).await;
        let server = TestAnalytics::start(config(&db.url, "http://127.0.0.1:9")).await;
        Rig { db, server }
    }
}

/// A PostgreSQL database, a proxy in front of it that a test can cut, and the database's
/// URL through the proxy.
pub async fn postgres_behind_proxy() -> (TestDb, waymark_testkit::Proxy, String) {
    let db = TestDb::new(Backend::Postgres).await;
    let proxy = waymark_testkit::Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let url = db
        .url
        .replacen("127.0.0.1:5432", &proxy.addr.to_string(), 1);
    assert_ne!(url, db.url, "the database URL goes through the proxy");
    (db, proxy, url)
}

/// A resolved track event of `profile` at `T0 + secs`.
pub fn track(profile: &str, name: &str, secs: i64, properties: serde_json::Value) -> Event {
    let mut event = Event {
        event_id: uuid::Uuid::now_v7().to_string(),
        message_id: uuid::Uuid::new_v4().to_string(),
        event: name.to_owned(),
        profile_id: profile.to_owned(),
        user_id: profile.to_owned(),
        properties: Some(waymark_proto::json::struct_from_json(
            properties.as_object().cloned().unwrap_or_default(),
        )),
        timestamp: Some(prost_types::Timestamp {
            seconds: T0 + secs,
            nanos: 0,
        }),
        source_id: "profile".into(),
        ..Event::default()
    };
    event.set_type(EventType::Track);
    event
}

/// A profile service notice (merge, unmerge, erasure).
pub fn notice(name: &str, profile: &str, properties: serde_json::Value) -> Event {
    track(profile, name, 0, properties)
}

pub fn merged(merge_id: &str, merged: &str, survivor: &str) -> Event {
    notice(
        "Profile Merged",
        survivor,
        json!({"merge_id": merge_id, "merged_profile_id": merged, "survivor_profile_id": survivor}),
    )
}

/// A step the orchestrator took (`Journey Step` and friends) at `T0 + secs`.
#[allow(clippy::too_many_arguments)]
pub fn step(
    profile: &str,
    journey: &str,
    enrollment: &str,
    seq: i64,
    node: &str,
    outcome: &str,
    decision: &str,
    secs: i64,
    detail: serde_json::Value,
) -> Event {
    let name = match outcome {
        "entered" => "Journey Entered",
        "goal" => "Journey Goal Reached",
        "exited" | "completed" => "Journey Exited",
        "suppressed" => "Message Suppressed",
        "errored" => "Journey Errored",
        _ => "Journey Step",
    };
    let mut event = track(
        profile,
        name,
        secs,
        json!({"journey_id": journey, "enrollment_id": enrollment, "node_id": node,
               "outcome": outcome, "decision": decision, "version": 1, "key": "",
               "detail": detail}),
    );
    event.message_id = format!("{enrollment}:{seq}");
    event.source_id = "orchestrator".into();
    event
}

pub fn matcher(event: &str, condition: &str) -> EventMatcher {
    EventMatcher {
        event: event.to_owned(),
        condition: condition.to_owned(),
    }
}

pub fn steps(names: &[&str]) -> Vec<EventMatcher> {
    names.iter().map(|n| matcher(n, "")).collect()
}

/// Each breakdown group of a funnel with `reached` of each step.
pub fn groups(response: &GetFunnelResponse) -> Vec<(String, Vec<u64>)> {
    response
        .groups
        .iter()
        .map(|g| (g.group.clone(), reached(g)))
        .collect()
}

/// The links of paths as (depth, from, to, count).
pub fn links(response: &GetPathsResponse) -> Vec<(u32, &str, &str, u64)> {
    response
        .links
        .iter()
        .map(|l| (l.depth, l.from.as_str(), l.to.as_str(), l.count))
        .collect()
}

/// A journey-map stage entered by one event.
pub fn stage(id: &str, event: &str, standard_time: &str) -> Stage {
    Stage {
        id: id.into(),
        name: String::new(),
        entered_by: vec![matcher(event, "")],
        standard_time: standard_time.into(),
    }
}

/// `reached` of each step of a funnel group.
pub fn reached(group: &FunnelGroup) -> Vec<u64> {
    group.steps.iter().map(|s| s.reached).collect()
}

/// The field violations of an INVALID_ARGUMENT status, as (field, description).
pub fn violations(status: &tonic::Status) -> Vec<(String, String)> {
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    tonic_types::StatusExt::get_details_bad_request(status)
        .map(|b| {
            b.field_violations
                .into_iter()
                .map(|v| (v.field, v.description))
                .collect()
        })
        .unwrap_or_default()
}
