//! The near cache: profiles read recently, held in process in front of Redis.
//!
//! It is trusted only while this process follows the changes channel. Every write through
//! the cache, from any process, announces the versions it stored there (in the same Lua
//! script, so no write goes unannounced), and the follower drops what the near cache holds
//! of an older version. Until the subscription is confirmed, and from the moment it drops,
//! the near cache serves nothing; going live again starts it empty, since announcements
//! may have been missed meanwhile. A read that raced a write cannot put an older version
//! back: an announcement turns a held profile of an older version into a tombstone, and a
//! read during which any write was announced or made here is not kept (rare enough that
//! the hit rate does not notice, and it spares a record of every profile ever written).

use std::sync::{Mutex, Weak};
use std::time::Duration;

use futures::StreamExt;
use waymark_proto::profile::v1::Profile;

use crate::lock;
use crate::memory::MemoryBackend;
use crate::redis_backend::RECONNECT_EVERY;

/// How often a quiet subscription checks whether its cache still exists.
const CHECK_EVERY: Duration = Duration::from_secs(1);

pub(crate) struct Near {
    state: Mutex<State>,
}

struct State {
    /// Whether the changes channel is followed right now.
    live: bool,
    /// Advanced whenever the near cache empties and whenever a write is announced or
    /// made here: a read begun before is not kept.
    generation: u64,
    profiles: MemoryBackend,
}

impl Near {
    pub(crate) fn new(capacity: usize, ttl: Duration) -> Self {
        Self {
            state: Mutex::new(State {
                live: false,
                generation: 0,
                profiles: MemoryBackend::new(capacity, ttl),
            }),
        }
    }

    /// The profile, if held and the near cache is live.
    pub(crate) fn get(&self, profile_id: &str) -> Option<Profile> {
        let mut state = lock(&self.state);
        if !state.live {
            return None;
        }
        state.profiles.get_profile(profile_id)
    }

    /// The generation to hand to [`keep`](Self::keep) for a read about to start.
    pub(crate) fn generation(&self) -> u64 {
        lock(&self.state).generation
    }

    /// Keeps `profile`, read from Redis by a read that started at `generation`, unless
    /// anything was written or the near cache emptied since.
    pub(crate) fn keep(&self, generation: u64, profile: &Profile) {
        let mut state = lock(&self.state);
        if state.live && state.generation == generation {
            state.profiles.put(profile, &[]);
        }
    }

    /// Versions of `profile_id` below `version` are stale.
    pub(crate) fn superseded(&self, profile_id: &str, version: u64) {
        self.tombstone(profile_id, version.saturating_sub(1));
    }

    /// Versions of `profile_id` up to `version` are stale.
    pub(crate) fn tombstone(&self, profile_id: &str, version: u64) {
        let mut state = lock(&self.state);
        state.generation += 1;
        state.profiles.forget_up_to(profile_id, version);
    }

    /// Starts or stops serving; either way, everything held so far is forgotten.
    fn set_live(&self, live: bool) {
        let mut state = lock(&self.state);
        state.live = live;
        state.generation += 1;
        state.profiles.clear();
    }

    /// Forgets whatever it holds of `profile_id`.
    fn purge(&self, profile_id: &str) {
        let mut state = lock(&self.state);
        state.generation += 1;
        state.profiles.remove(profile_id);
    }

    /// Applies one announcement: lines of `id version`, with ` dead` after a tombstone, or
    /// `id purge`.
    fn apply(&self, announcement: &str) {
        for line in announcement.lines() {
            let mut parts = line.split(' ');
            let (Some(id), Some(second)) = (parts.next(), parts.next()) else {
                continue;
            };
            if second == "purge" {
                self.purge(id);
                continue;
            }
            let Ok(version) = second.parse() else {
                continue;
            };
            match parts.next() {
                Some("dead") => self.tombstone(id, version),
                _ => self.superseded(id, version),
            }
        }
    }
}

/// Follows `channel` for `near` until the cache it belongs to is dropped, resubscribing
/// after every disconnection.
pub(crate) async fn follow_changes(client: redis::Client, channel: String, near: Weak<Near>) {
    loop {
        if near.strong_count() == 0 {
            return;
        }
        match subscribe(&client, &channel).await {
            Ok(mut pubsub) => {
                let Some(cache) = near.upgrade() else { return };
                cache.set_live(true);
                drop(cache);
                tracing::info!("profile near cache following changes");
                let mut messages = pubsub.on_message();
                loop {
                    tokio::select! {
                        message = messages.next() => {
                            let Some(message) = message else { break };
                            let Some(cache) = near.upgrade() else { return };
                            match message.get_payload::<String>() {
                                Ok(announcement) => cache.apply(&announcement),
                                // Unreadable: what it announced is unknown, so nothing held
                                // can be trusted.
                                Err(_) => cache.set_live(true),
                            }
                        }
                        () = tokio::time::sleep(CHECK_EVERY) => {
                            if near.strong_count() == 0 {
                                return;
                            }
                        }
                    }
                }
                if let Some(cache) = near.upgrade() {
                    cache.set_live(false);
                }
                tracing::warn!("profile near cache lost the changes channel; reads go to Redis");
            }
            Err(error) => {
                tracing::debug!(%error, "subscribing to profile changes failed");
            }
        }
        tokio::time::sleep(RECONNECT_EVERY).await;
    }
}

async fn subscribe(
    client: &redis::Client,
    channel: &str,
) -> redis::RedisResult<redis::aio::PubSub> {
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(channel).await?;
    Ok(pubsub)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(id: &str, version: u64) -> Profile {
        Profile {
            profile_id: id.into(),
            version,
            ..Profile::default()
        }
    }

    fn live() -> Near {
        let near = Near::new(10, Duration::from_secs(60));
        near.set_live(true);
        near
    }

    #[test]
    fn serves_only_while_live() {
        let near = Near::new(10, Duration::from_secs(60));
        near.keep(near.generation(), &profile("a", 1));
        assert!(near.get("a").is_none(), "not live yet: nothing kept");
        near.set_live(true);
        near.keep(near.generation(), &profile("a", 1));
        assert_eq!(near.get("a").map(|p| p.version), Some(1));
        near.set_live(false);
        assert!(near.get("a").is_none());
    }

    #[test]
    fn a_read_begun_before_the_cache_emptied_is_not_kept() {
        let near = live();
        let generation = near.generation();
        // The subscription dropped and came back while the read was at Redis.
        near.set_live(false);
        near.set_live(true);
        near.keep(generation, &profile("a", 1));
        assert!(near.get("a").is_none());
    }

    #[test]
    fn announcements_drop_older_versions_and_keep_them_out() {
        let near = live();
        near.keep(near.generation(), &profile("a", 3));
        near.keep(near.generation(), &profile("c", 7));
        let before = near.generation();
        near.apply("a 4\nb 9\nmalformed\nc 7\n");
        assert!(near.get("a").is_none(), "3 is stale once 4 is announced");
        assert_eq!(near.get("c").map(|p| p.version), Some(7), "still current");
        // A read that fetched version 3 before the announcement lost the race.
        near.keep(before, &profile("a", 3));
        assert!(near.get("a").is_none());
        // A slow writer of version 3 after the announcement is kept out by the tombstone.
        near.keep(near.generation(), &profile("a", 3));
        assert!(near.get("a").is_none());
        near.keep(near.generation(), &profile("a", 4));
        assert_eq!(near.get("a").map(|p| p.version), Some(4));
        near.apply("a 4 dead");
        near.keep(near.generation(), &profile("a", 4));
        assert!(
            near.get("a").is_none(),
            "a tombstone keeps its own version out"
        );
        near.keep(near.generation(), &profile("c", 8));
        near.apply("c purge");
        assert!(near.get("c").is_none(), "purged");
    }

    #[test]
    fn a_write_here_during_a_read_keeps_the_read_out() {
        let near = live();
        let generation = near.generation();
        // This process wrote version 2 while its read of version 1 was at Redis.
        near.superseded("a", 2);
        near.keep(generation, &profile("a", 1));
        assert!(near.get("a").is_none(), "the reader must see its own write");
    }
}
