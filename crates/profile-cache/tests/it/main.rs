//! The cache against a real Redis and in process: versions never go back, tombstones keep
//! stale writers out, identifiers resolve.

use std::time::Duration;

use waymark_profile_cache::{CacheWrite, ProfileCache};
use waymark_proto::common::v1::Identity;
use waymark_proto::profile::v1::Profile;
use waymark_testkit::{PATIENCE, eventually};

fn redis_url() -> String {
    std::env::var("WAYMARK_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn profile(id: &str, version: u64, email: &str) -> Profile {
    Profile {
        profile_id: id.into(),
        version,
        identities: vec![Identity {
            r#type: "email".into(),
            value: email.into(),
        }],
        ..Profile::default()
    }
}

async fn versions_never_go_back(cache: ProfileCache) {
    let id = uuid::Uuid::new_v4().to_string();
    assert!(cache.get(&id).await.is_none());
    cache.put(&profile(&id, 5, "new@x.io")).await;
    cache.put(&profile(&id, 3, "old@x.io")).await;
    assert_eq!(
        cache.get(&id).await.unwrap().version,
        5,
        "an older write is ignored"
    );
    assert_eq!(
        cache.resolve("email", "new@x.io").await.as_deref(),
        Some(id.as_str())
    );
    cache.put(&profile(&id, 6, "new@x.io")).await;
    assert_eq!(cache.get(&id).await.unwrap().version, 6);

    // Merged away or deleted: a tombstone at version 7 keeps a slow writer of 6 out.
    cache
        .invalidate(&id, 7, &[("email".into(), "new@x.io".into())])
        .await;
    cache.put(&profile(&id, 6, "new@x.io")).await;
    assert!(cache.get(&id).await.is_none());
    assert!(cache.resolve("email", "new@x.io").await.is_none());
    cache.put(&profile(&id, 8, "back@x.io")).await;
    assert_eq!(
        cache.get(&id).await.unwrap().version,
        8,
        "a newer write replaces the tombstone"
    );
}

/// Batches repoint only the identifiers they added or moved; readers restore a missing
/// pointer without overwriting one a writer set.
async fn only_changed_identifiers_are_repointed(cache: ProfileCache) {
    let id = uuid::Uuid::new_v4().to_string();
    let other = uuid::Uuid::new_v4().to_string();
    let mut p = profile(&id, 1, &format!("{id}@x.io"));
    p.identities.push(Identity {
        r#type: "user_id".into(),
        value: format!("u-{id}"),
    });
    let many: Vec<Profile> = (0..150)
        .map(|i| profile(&format!("{id}-{i}"), 1, &format!("{id}-{i}@x.io")))
        .collect();
    let encoded: Vec<Vec<u8>> = many
        .iter()
        .chain([&p])
        .map(prost::Message::encode_to_vec)
        .collect();
    let mut writes: Vec<CacheWrite<'_>> = many
        .iter()
        .zip(&encoded)
        .map(|(m, bytes)| CacheWrite {
            profile_id: &m.profile_id,
            version: m.version,
            encoded: bytes,
            identities: m.identities.iter().collect(),
        })
        .collect();
    writes.push(CacheWrite {
        profile_id: &p.profile_id,
        version: p.version,
        encoded: &encoded[150],
        identities: vec![&p.identities[1]],
    });
    cache.put_encoded(&writes).await;
    assert_eq!(cache.get(&id).await.map(|p| p.version), Some(1));
    assert_eq!(
        cache
            .resolve("user_id", &format!("u-{id}"))
            .await
            .as_deref(),
        Some(id.as_str())
    );
    assert_eq!(cache.resolve("email", &format!("{id}@x.io")).await, None);
    assert_eq!(
        cache.resolve("email", &format!("{id}-149@x.io")).await,
        Some(format!("{id}-149")),
        "every script call of the pipeline ran"
    );

    cache
        .remember_identity("email", &format!("{id}@x.io"), &id)
        .await;
    assert_eq!(
        cache
            .resolve("email", &format!("{id}@x.io"))
            .await
            .as_deref(),
        Some(id.as_str())
    );
    cache
        .remember_identity("user_id", &format!("u-{id}"), &other)
        .await;
    assert_eq!(
        cache
            .resolve("user_id", &format!("u-{id}"))
            .await
            .as_deref(),
        Some(id.as_str()),
        "a reader never overwrites a pointer"
    );
}

#[tokio::test]
async fn redis_repoints_only_changed_identifiers() {
    let prefix = format!("test-{}:", uuid::Uuid::new_v4().simple());
    let cache = ProfileCache::redis(&redis_url(), &prefix, Duration::from_secs(60)).unwrap();
    only_changed_identifiers_are_repointed(cache).await;
}

#[tokio::test]
async fn in_process_repoints_only_changed_identifiers() {
    only_changed_identifiers_are_repointed(ProfileCache::in_memory(1000, Duration::from_secs(60)))
        .await;
}

#[tokio::test]
async fn redis_versions_never_go_back() {
    let prefix = format!("test-{}:", uuid::Uuid::new_v4().simple());
    let cache = ProfileCache::redis(&redis_url(), &prefix, Duration::from_secs(60)).unwrap();
    assert!(cache.is_shared());
    versions_never_go_back(cache).await;
}

#[tokio::test]
async fn in_process_versions_never_go_back() {
    versions_never_go_back(ProfileCache::in_memory(10, Duration::from_secs(60))).await;
}

#[tokio::test]
async fn in_process_cache_is_bounded() {
    let cache = ProfileCache::in_memory(2, Duration::from_secs(60));
    cache.put(&profile("a", 1, "a@x.io")).await;
    cache.put(&profile("b", 1, "b@x.io")).await;
    // Rewriting a profile makes it the most recently written, however often it happens.
    for version in 2..50 {
        cache.put(&profile("a", version, "a@x.io")).await;
    }
    cache.put(&profile("c", 1, "c@x.io")).await;
    assert!(
        cache.get("b").await.is_none(),
        "the least recently written entry was evicted"
    );
    assert!(cache.resolve("email", "b@x.io").await.is_none());
    assert_eq!(cache.get("a").await.map(|p| p.version), Some(49));
    assert!(cache.get("c").await.is_some());
    assert_eq!(cache.resolve("email", "a@x.io").await.as_deref(), Some("a"));
}

#[tokio::test]
async fn in_process_entries_expire_like_redis_keys() {
    let cache = ProfileCache::in_memory(10, Duration::from_millis(20));
    cache.put(&profile("a", 3, "a@x.io")).await;
    assert!(cache.get("a").await.is_some());
    // Waits out the TTL on purpose: too short a wait fails, never passes.
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert!(cache.get("a").await.is_none(), "past its TTL");
    assert!(cache.resolve("email", "a@x.io").await.is_none());
    // An expired entry no longer guards its version, as an expired Redis key would not.
    cache.put(&profile("a", 1, "a@x.io")).await;
    assert_eq!(cache.get("a").await.map(|p| p.version), Some(1));
}

#[tokio::test]
async fn unreachable_redis_means_misses_not_errors() {
    let cache = ProfileCache::redis("redis://127.0.0.1:1", "", Duration::from_secs(60)).unwrap();
    cache.put(&profile("p", 1, "p@x.io")).await;
    assert!(cache.get("p").await.is_none());
    assert!(cache.resolve("email", "p@x.io").await.is_none());
}

/// Polls `cache` until `id` reads as `version` (or as nothing); announcements between
/// processes take a moment, up to seconds while the whole suite shares two cores.
async fn reads_as(cache: &ProfileCache, id: &str, version: Option<u64>) {
    let what = format!("{id} to read as {version:?}");
    eventually(&what, PATIENCE, async || {
        let read = cache.get(id).await.map(|p| p.version);
        if read == version { Ok(()) } else { Err(read) }
    })
    .await;
}

/// Writes straight into Redis, behind every cache's back: nothing is announced.
async fn write_unannounced(prefix: &str, profile: &Profile) {
    let mut redis = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let key = format!(
        "{prefix}{}",
        waymark_profile_cache::profile_key(&profile.profile_id)
    );
    let () = redis::cmd("HSET")
        .arg(&key)
        .arg("v")
        .arg(profile.version)
        .arg("p")
        .arg(prost::Message::encode_to_vec(profile))
        .query_async(&mut redis)
        .await
        .unwrap();
}

fn email(profile: Option<Profile>) -> Option<String> {
    Some(profile?.identities.first()?.value.clone())
}

/// Two processes with near caches over one Redis: each answers repeated reads from
/// memory, a write through either reaches the other's reads as soon as its announcement
/// arrives, and the writer reads its own write at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_caches_follow_every_write() {
    let prefix = format!("test-{}:", uuid::Uuid::new_v4().simple());
    let open = || {
        ProfileCache::redis(&redis_url(), &prefix, Duration::from_secs(60))
            .unwrap()
            .with_near_cache(100, Duration::from_secs(60))
    };
    let (a, b) = (open(), open());
    let id = uuid::Uuid::new_v4().to_string();
    a.put(&profile(&id, 1, "first@x.io")).await;
    // B's near cache holds what it read once it follows the channel: a change made
    // behind its back then goes unseen, which shows the reads come from memory. Each try
    // writes a value never written before, so only a read from memory can miss it.
    let mut attempt = 0;
    eventually("B to serve from its near cache", PATIENCE, async || {
        attempt += 1;
        let seen = b.get(&id).await;
        assert_eq!(seen.as_ref().map(|p| p.version), Some(1));
        let behind = format!("behind-{attempt}@x.io");
        write_unannounced(&prefix, &profile(&id, 1, &behind)).await;
        email(b.get(&id).await) == email(seen)
    })
    .await;

    a.put(&profile(&id, 2, "second@x.io")).await;
    assert_eq!(
        email(a.get(&id).await).as_deref(),
        Some("second@x.io"),
        "the writer reads its write"
    );
    reads_as(&b, &id, Some(2)).await;
    // Merged away: a tombstone everywhere.
    a.invalidate(&id, 3, &[]).await;
    reads_as(&b, &id, None).await;
    assert!(a.get(&id).await.is_none());
}

/// The near cache serves nothing while its subscription is down: with Redis gone, reads
/// miss instead of answering from memory that may be stale, and after Redis is back the
/// near cache starts over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_cache_goes_dark_without_its_subscription() {
    let mut redis = waymark_testkit::RedisServer::start().await;
    let cache = ProfileCache::redis(&redis.url(), "", Duration::from_secs(60))
        .unwrap()
        .with_near_cache(100, Duration::from_secs(60));
    let id = uuid::Uuid::new_v4().to_string();
    cache.put(&profile(&id, 1, "d@x.io")).await;
    reads_as(&cache, &id, Some(1)).await;
    redis.stop();
    // The near cache goes dark once it notices the subscription is gone.
    reads_as(&cache, &id, None).await;
    redis.restart().await;
    // The restarted Redis is empty; once the cache reconnects, a write lands there and
    // reads find it again.
    eventually("the cache to come back", PATIENCE, async || {
        cache.put(&profile(&id, 2, "d@x.io")).await;
        let read = cache.get(&id).await.map(|p| p.version);
        if read == Some(2) { Ok(()) } else { Err(read) }
    })
    .await;
}

/// A batch of profiles in one read: the cached ones, none of the others.
async fn many_are_read_at_once(cache: ProfileCache) {
    cache.put(&profile("m1", 3, "m1@x.io")).await;
    cache.put(&profile("m2", 1, "m2@x.io")).await;
    let ids = ["m1", "missing", "m2"].map(String::from);
    let found = cache.get_many(&ids).await;
    assert_eq!(found.len(), 2);
    assert_eq!(found["m1"].version, 3);
    assert_eq!(found["m2"].version, 1);
    assert!(!found.contains_key("missing"));
}

#[tokio::test]
async fn redis_reads_many_at_once() {
    let prefix = format!("test-{}:", uuid::Uuid::new_v4().simple());
    let cache = ProfileCache::redis(&redis_url(), &prefix, Duration::from_secs(60))
        .unwrap()
        .with_near_cache(10, Duration::from_secs(5));
    many_are_read_at_once(cache).await;
}

#[tokio::test]
async fn in_process_reads_many_at_once() {
    many_are_read_at_once(ProfileCache::in_memory(10, Duration::from_secs(60))).await;
}
