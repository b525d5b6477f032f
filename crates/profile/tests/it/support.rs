//! Events as ingestion delivers them; the servers and the shared harness are
//! `waymark_testkit`.

use waymark_proto::common::v1::{Event, EventType};
pub use waymark_testkit::platform::{Platform, TestProfile, config};
pub use waymark_testkit::{Backend, Proxy, Sink, TestDb, admin, redis_url};

/// Two profile replicas on one database sharing one Redis cache, as a deployment runs
/// them, relaying downstream to `sink_url`; the database lives as long as the `TestDb`.
pub async fn two_replicas(backend: Backend, sink_url: &str) -> (TestProfile, TestProfile, TestDb) {
    let db = TestDb::new(backend).await;
    let a = TestProfile::start(config(&db.url, sink_url, Some(&redis_url()))).await;
    let mut b_config = config(&db.url, sink_url, Some(&redis_url()));
    b_config.profile_cache_key_prefix = a.cache_prefix.clone();
    let b = TestProfile::start(b_config).await;
    (a, b, db)
}

/// An event as ingestion would deliver it.
pub fn event(
    kind: EventType,
    user_id: &str,
    anonymous_id: &str,
    name: &str,
    json: serde_json::Value,
    at_secs: i64,
) -> Event {
    let serde_json::Value::Object(map) = json else {
        panic!("object")
    };
    let structure = Some(waymark_proto::json::struct_from_json(map));
    let mut e = Event {
        event_id: uuid::Uuid::now_v7().to_string(),
        message_id: uuid::Uuid::now_v7().to_string(),
        user_id: user_id.into(),
        anonymous_id: anonymous_id.into(),
        timestamp: Some(prost_types::Timestamp {
            seconds: at_secs,
            nanos: 0,
        }),
        received_at: Some(prost_types::Timestamp {
            seconds: at_secs,
            nanos: 0,
        }),
        source_id: "src".into(),
        ..Event::default()
    };
    e.set_type(kind);
    match kind {
        EventType::Track => {
            e.event = name.into();
            e.properties = structure;
        }
        EventType::Identify => e.traits = structure,
        _ => e.name = name.into(),
    }
    e
}
