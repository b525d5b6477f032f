//! Two replicas sharing a database; the servers, events and the rest of the harness are
//! `waymark_testkit`.

pub use waymark_testkit::platform::{Platform, TestProfile, config};
pub use waymark_testkit::{Backend, EventBuilder, Proxy, Sink, TestDb, admin, redis_url};

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
