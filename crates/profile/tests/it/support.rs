//! Two replicas sharing a database; the servers, events and the rest of the harness are
//! `waymark_testkit`.

use waymark_proto::common::v1::Event;
pub use waymark_testkit::platform::{Platform, TestProfile, config};
pub use waymark_testkit::{
    Backend, EventBuilder, PATIENCE, Proxy, Sink, TestDb, admin, eventually, redis_url,
};

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

/// Delivers `marker` and waits until every consumer's relay has passed it on to `sink`.
/// Each relay delivers in commit order, so whatever the server queued downstream before
/// the marker has reached the sink by then: a "nothing else was sent" check after this
/// cannot pass by luck.
pub async fn deliver_marker(server: &TestProfile, sink: &Sink, marker: Event) {
    let id = marker.event_id.clone();
    server.deliver(vec![marker]).await;
    let consumers = waymark_profile::CONSUMERS.len();
    eventually("the marker from every consumer", PATIENCE, async || {
        let copies = sink
            .received
            .lock()
            .await
            .iter()
            .filter(|e| e.event_id == id)
            .count();
        if copies >= consumers {
            Ok(())
        } else {
            Err(format!("{copies} of {consumers} copies"))
        }
    })
    .await;
}
