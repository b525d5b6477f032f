//! The unified profile cache every service reads profiles through.
//!
//! Keys are versioned and typed: `wm:v1:profile:{id}` holds the protobuf-encoded
//! `waymark.profile.v1.Profile` with its version, `wm:v1:ident:{type}:{hmac}` the id of the
//! profile owning an identifier (its value as a keyed hash, never in clear). The profile service writes after its database commit; a
//! write with a version not newer than the cached one is ignored (compared atomically in
//! Redis by a Lua script), so the cache never goes back in time. Redis being down degrades
//! to misses (counted and logged), never to errors; the cache refills once it is back.
//! Without a Redis URL an in-process backend with the same semantics serves `waymark dev`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::Counter;
use prost::Message;
use waymark_identity::IdentHasher;
use waymark_proto::common::v1::Identity;
use waymark_proto::profile::v1::Profile;

mod memory;
mod near;
mod redis_backend;

use memory::MemoryBackend;
use near::Near;
use redis_backend::{PUT_IF_NEWER, RedisBackend};

/// Version of the key schema; bump when a value's encoding changes incompatibly.
pub const KEY_SCHEMA: &str = "wm:v1";

/// The key of a profile (before the deployment's prefix).
pub fn profile_key(profile_id: &str) -> String {
    format!("{KEY_SCHEMA}:profile:{profile_id}")
}

/// The key of an identifier: its value as a keyed hash, so the key names of a Redis (and
/// its dumps and logs) show no e-mail or phone number in clear.
pub fn identity_key(hasher: &IdentHasher, id_type: &str, value: &str) -> String {
    format!(
        "{KEY_SCHEMA}:ident:{id_type}:{}",
        hasher.hash(id_type, value)
    )
}

/// The channel where writes are announced (before the deployment's prefix): the near
/// caches of every process drop what they hold of an older version. Besides the script's
/// lines, a process back from a Redis outage announces `id purge` for every profile key
/// it deletes because its write was lost.
pub const CHANGES_CHANNEL: &str = "wm:v1:changes";

/// One profile to cache, already encoded.
pub struct CacheWrite<'a> {
    pub profile_id: &'a str,
    pub version: u64,
    /// The encoded `Profile`.
    pub encoded: &'a [u8],
    /// The identifiers whose keys must point at this profile.
    pub identities: Vec<&'a Identity>,
}

/// Profiles per script call: a script blocks Redis while it runs, so a batch's writes go
/// as several short calls in one pipeline rather than one long one.
const PROFILES_PER_CALL: usize = 64;

/// The cache, backed by Redis or by process memory.
pub struct ProfileCache {
    backend: Backend,
    /// Prepended to every key, so environments can share one Redis.
    prefix: String,
    /// Keys whose writes failed while Redis was down: they may hold stale values, so they
    /// are deleted before the cache is trusted again.
    missed: Mutex<std::collections::HashSet<String>>,
    ttl: Duration,
    /// `CHANGES_CHANNEL` with the prefix.
    channel: String,
    /// In front of Redis, when enabled: profiles read recently, in process.
    near: Option<Arc<Near>>,
    /// Hashes identifier values into their key names.
    hasher: IdentHasher,
    hits: Counter<u64>,
    misses: Counter<u64>,
    errors: Counter<u64>,
}

enum Backend {
    Redis(RedisBackend),
    Memory(Mutex<MemoryBackend>),
}

impl ProfileCache {
    /// A Redis-backed cache. Never fails: when Redis is unreachable the cache misses and
    /// keeps trying to reconnect.
    pub fn redis(url: &str, prefix: &str, ttl: Duration) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(url)?;
        Ok(Self::with_backend(
            Backend::Redis(RedisBackend {
                client,
                connection: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
                last_attempt: Mutex::new(None),
                script: redis::Script::new(PUT_IF_NEWER),
            }),
            prefix,
            ttl,
        ))
    }

    /// An in-process cache holding at most `capacity` profiles.
    pub fn in_memory(capacity: usize, ttl: Duration) -> Self {
        Self::with_backend(
            Backend::Memory(Mutex::new(MemoryBackend::new(capacity, ttl))),
            "",
            ttl,
        )
    }

    fn with_backend(backend: Backend, prefix: &str, ttl: Duration) -> Self {
        let meter = opentelemetry::global::meter("waymark");
        Self {
            backend,
            missed: Mutex::new(std::collections::HashSet::new()),
            prefix: prefix.to_owned(),
            ttl,
            channel: format!("{prefix}{CHANGES_CHANNEL}"),
            near: None,
            hasher: IdentHasher::default(),
            hits: meter.u64_counter("profile_cache.hits").build(),
            misses: meter.u64_counter("profile_cache.misses").build(),
            errors: meter.u64_counter("profile_cache.errors").build(),
        }
    }

    /// Names identifier keys with `hasher` (`identifier_hash_key`) instead of the
    /// development key. Every process sharing the Redis must use the same key.
    pub fn with_identifier_hasher(mut self, hasher: IdentHasher) -> Self {
        self.hasher = hasher;
        self
    }

    /// Keeps up to `capacity` recently read profiles in process, in front of Redis, each
    /// for at most `ttl`: a read of one of them costs no round trip. Every write through
    /// any process is announced on the changes channel, and this process drops what it
    /// holds of an older version as the announcement arrives; the near cache serves
    /// nothing unless that subscription is live, and forgets everything whenever it
    /// drops. Needs a Tokio runtime (the subscription runs as a task); no effect on the
    /// in-process backend.
    pub fn with_near_cache(mut self, capacity: usize, ttl: Duration) -> Self {
        if let Backend::Redis(r) = &self.backend
            && capacity > 0
        {
            let near = Arc::new(Near::new(capacity, ttl));
            tokio::spawn(near::follow_changes(
                r.client.clone(),
                self.channel.clone(),
                Arc::downgrade(&near),
            ));
            self.near = Some(near);
        }
        self
    }

    fn tier(&self) -> &'static str {
        match self.backend {
            Backend::Redis(_) => "redis",
            Backend::Memory(_) => "memory",
        }
    }

    /// True when backed by Redis.
    pub fn is_shared(&self) -> bool {
        matches!(self.backend, Backend::Redis(_))
    }

    /// The cached profile, if any.
    pub async fn get(&self, profile_id: &str) -> Option<Profile> {
        let found = match &self.backend {
            Backend::Memory(m) => lock(m).get_profile(profile_id),
            Backend::Redis(r) => {
                if let Some(profile) = self.near.as_ref().and_then(|n| n.get(profile_id)) {
                    self.hits.add(1, &[KeyValue::new("tier", "near")]);
                    return Some(profile);
                }
                let generation = self.near.as_ref().map(|n| n.generation());
                let key = format!("{}{}", self.prefix, profile_key(profile_id));
                if !self.recovered(r).await {
                    return None;
                }
                let found = match r.run(redis::cmd("HGET").arg(&key).arg("p")).await {
                    Ok(Some(bytes)) => decode(&bytes),
                    Ok(None) => None,
                    Err(error) => {
                        self.failed("get", &error);
                        None
                    }
                };
                if let (Some(near), Some(generation), Some(profile)) =
                    (&self.near, generation, &found)
                {
                    near.keep(generation, profile);
                }
                found
            }
        };
        match found {
            Some(_) => self.hits.add(1, &[KeyValue::new("tier", self.tier())]),
            None => self.misses.add(1, &[]),
        }
        found
    }

    /// The cached profiles among `profile_ids`, read in one round trip (the near cache
    /// first): a consumer that needs a batch's profiles pays one call, not one per profile.
    pub async fn get_many(&self, profile_ids: &[String]) -> HashMap<String, Profile> {
        let mut found = HashMap::new();
        let r = match &self.backend {
            Backend::Memory(m) => {
                let mut m = lock(m);
                for id in profile_ids {
                    if let Some(p) = m.get_profile(id) {
                        found.insert(id.clone(), p);
                    }
                }
                drop(m);
                self.count_reads(found.len(), profile_ids.len());
                return found;
            }
            Backend::Redis(r) => r,
        };
        let mut wanted = Vec::new();
        for id in profile_ids {
            match self.near.as_ref().and_then(|n| n.get(id)) {
                Some(p) => {
                    self.hits.add(1, &[KeyValue::new("tier", "near")]);
                    found.insert(id.clone(), p);
                }
                None => wanted.push(id),
            }
        }
        if wanted.is_empty() || !self.recovered(r).await {
            return found;
        }
        let generation = self.near.as_ref().map(|n| n.generation());
        let mut pipe = redis::pipe();
        for id in &wanted {
            pipe.cmd("HGET")
                .arg(format!("{}{}", self.prefix, profile_key(id)))
                .arg("p");
        }
        match r.pipe_values(&pipe).await {
            Ok(values) => {
                let mut hits = 0;
                for (id, value) in wanted.iter().zip(values) {
                    let Some(profile) = value.as_deref().and_then(decode) else {
                        continue;
                    };
                    if let (Some(near), Some(generation)) = (&self.near, generation) {
                        near.keep(generation, &profile);
                    }
                    hits += 1;
                    found.insert((*id).clone(), profile);
                }
                self.count_reads(hits, wanted.len());
            }
            Err(error) => self.failed("get_many", &error),
        }
        found
    }

    fn count_reads(&self, hits: usize, asked: usize) {
        if hits > 0 {
            self.hits
                .add(hits as u64, &[KeyValue::new("tier", self.tier())]);
        }
        if asked > hits {
            self.misses.add((asked - hits) as u64, &[]);
        }
    }

    /// The id of the profile owning an identifier, if cached.
    pub async fn resolve(&self, id_type: &str, value: &str) -> Option<String> {
        match &self.backend {
            Backend::Memory(m) => lock(m).resolve(id_type, value),
            Backend::Redis(r) => {
                if !self.recovered(r).await {
                    return None;
                }
                match r
                    .run_string(redis::cmd("GET").arg(format!(
                        "{}{}",
                        self.prefix,
                        identity_key(&self.hasher, id_type, value)
                    )))
                    .await
                {
                    Ok(id) => id,
                    Err(error) => {
                        self.failed("resolve", &error);
                        None
                    }
                }
            }
        }
    }

    /// Caches `profile` (and its identifiers) unless a same or newer version is cached.
    pub async fn put(&self, profile: &Profile) {
        self.put_many(&[profile]).await;
    }

    /// Caches several profiles in one round trip to Redis; each is written, with every
    /// one of its identifiers, only when newer than what is cached.
    pub async fn put_many(&self, profiles: &[&Profile]) {
        let encoded: Vec<Vec<u8>> = profiles.iter().map(|p| p.encode_to_vec()).collect();
        let writes: Vec<CacheWrite<'_>> = profiles
            .iter()
            .zip(&encoded)
            .map(|(p, bytes)| CacheWrite {
                profile_id: &p.profile_id,
                version: p.version,
                encoded: bytes,
                identities: p.identities.iter().collect(),
            })
            .collect();
        self.put_encoded(&writes).await;
    }

    /// Caches profiles already encoded, each only when newer than what is cached,
    /// repointing only the identifiers each write lists (those new or moved to it): the
    /// keys of the others already point there, and one that expired is restored by the
    /// reader that misses it ([`remember_identity`](Self::remember_identity)).
    pub async fn put_encoded(&self, writes: &[CacheWrite<'_>]) {
        let ttl_ms = (self.ttl.as_millis() as u64).max(1);
        // This process knows of these versions now: its own reads must not serve older
        // ones until their announcement comes back.
        if let Some(near) = &self.near {
            for write in writes {
                near.superseded(write.profile_id, write.version);
            }
        }
        match &self.backend {
            Backend::Memory(m) => {
                let mut memory = lock(m);
                for write in writes {
                    if let Some(profile) = decode(write.encoded) {
                        memory.put(&profile, &write.identities);
                    }
                }
            }
            Backend::Redis(r) => {
                if writes.is_empty() {
                    return;
                }
                let keys_of = |write: &CacheWrite<'_>| {
                    std::iter::once(format!("{}{}", self.prefix, profile_key(write.profile_id)))
                        .chain(write.identities.iter().map(|i| {
                            format!(
                                "{}{}",
                                self.prefix,
                                identity_key(&self.hasher, &i.r#type, &i.value)
                            )
                        }))
                        .collect::<Vec<String>>()
                };
                let all_keys = || writes.iter().flat_map(keys_of);
                if !self.recovered(r).await {
                    self.remember_missed(all_keys());
                    return;
                }
                // Loading the script first in the same pipeline keeps EVALSHA working after
                // Redis restarted with an empty script cache.
                let mut pipe = redis::pipe();
                pipe.cmd("SCRIPT").arg("LOAD").arg(PUT_IF_NEWER).ignore();
                for chunk in writes.chunks(PROFILES_PER_CALL) {
                    let keys: Vec<String> = chunk.iter().flat_map(keys_of).collect();
                    let call = pipe
                        .cmd("EVALSHA")
                        .arg(r.script.get_hash())
                        .arg(keys.len())
                        .arg(&keys)
                        .arg(ttl_ms)
                        .arg(&self.channel);
                    for write in chunk {
                        call.arg(write.version)
                            .arg(write.encoded)
                            .arg(write.profile_id)
                            .arg(write.identities.len());
                    }
                    call.ignore();
                }
                if let Err(error) = r.pipe(&pipe).await {
                    self.failed("put", &error);
                    self.remember_missed(all_keys());
                }
                // Again once written: a read of this process that fetched the older version
                // meanwhile must not be kept, nor stay if it was.
                if let Some(near) = &self.near {
                    for write in writes {
                        near.superseded(write.profile_id, write.version);
                    }
                }
            }
        }
    }

    /// Points an identifier found in the database at its profile, unless its key holds a
    /// pointer already (a concurrent write knows better than this reader).
    pub async fn remember_identity(&self, id_type: &str, value: &str, profile_id: &str) {
        match &self.backend {
            Backend::Memory(m) => lock(m).remember_identity(id_type, value, profile_id),
            Backend::Redis(r) => {
                if !self.recovered(r).await {
                    return;
                }
                let key = format!(
                    "{}{}",
                    self.prefix,
                    identity_key(&self.hasher, id_type, value)
                );
                let ttl_ms = (self.ttl.as_millis() as u64).max(1);
                let mut pipe = redis::pipe();
                pipe.cmd("SET")
                    .arg(&key)
                    .arg(profile_id)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl_ms)
                    .ignore();
                if let Err(error) = r.pipe(&pipe).await {
                    self.failed("remember identity", &error);
                    self.remember_missed(std::iter::once(key));
                }
            }
        }
    }

    /// Drops a profile that was merged away or deleted, leaving a tombstone at `version` so
    /// a slower writer cannot bring the old state back. Identifier keys are removed.
    /// Returns whether the tombstone reached the cache: false when Redis did not take it,
    /// in which case this process deletes the key once Redis is back, but a process
    /// started meanwhile does not know (callers that must not lose it keep it themselves).
    pub async fn invalidate(
        &self,
        profile_id: &str,
        version: u64,
        identities: &[(String, String)],
    ) -> bool {
        match &self.backend {
            Backend::Memory(m) => {
                lock(m).invalidate(profile_id, version, identities);
                true
            }
            Backend::Redis(r) => {
                // Whatever becomes of the Redis write, this process serves it no more.
                if let Some(near) = &self.near {
                    near.tombstone(profile_id, version);
                }
                let key = format!("{}{}", self.prefix, profile_key(profile_id));
                let all_keys = || {
                    std::iter::once(key.clone()).chain(identities.iter().map(|(t, v)| {
                        format!("{}{}", self.prefix, identity_key(&self.hasher, t, v))
                    }))
                };
                if !self.recovered(r).await {
                    self.remember_missed(all_keys());
                    return false;
                }
                let written = r
                    .tombstone(
                        &key,
                        &self.channel,
                        profile_id,
                        version,
                        self.ttl.as_millis() as u64,
                    )
                    .await;
                if let Some(near) = &self.near {
                    near.tombstone(profile_id, version);
                }
                if let Err(error) = written {
                    self.failed("invalidate", &error);
                    self.remember_missed(all_keys());
                    return false;
                }
                if !identities.is_empty() {
                    let mut pipe = redis::pipe();
                    for (t, v) in identities {
                        pipe.cmd("DEL")
                            .arg(format!(
                                "{}{}",
                                self.prefix,
                                identity_key(&self.hasher, t, v)
                            ))
                            .ignore();
                    }
                    if let Err(error) = r.pipe(&pipe).await {
                        self.failed("invalidate identities", &error);
                        self.remember_missed(all_keys());
                    }
                }
                // An identifier key left behind names only the profile id, whose
                // tombstone is in place.
                true
            }
        }
    }

    /// Drops the keys of identifiers that resolve to no profile any more (their profile
    /// gave them up). Whoever owns one next finds it missing and its owner in the
    /// database, so dropping a key a newer write had set costs a read, never a wrong one.
    pub async fn forget_identities(&self, identities: &[(String, String)]) {
        if identities.is_empty() {
            return;
        }
        match &self.backend {
            Backend::Memory(m) => lock(m).forget_identities(identities),
            Backend::Redis(r) => {
                let keys = || {
                    identities.iter().map(|(t, v)| {
                        format!("{}{}", self.prefix, identity_key(&self.hasher, t, v))
                    })
                };
                if !self.recovered(r).await {
                    self.remember_missed(keys());
                    return;
                }
                let mut pipe = redis::pipe();
                for key in keys() {
                    pipe.cmd("DEL").arg(key).ignore();
                }
                if let Err(error) = r.pipe(&pipe).await {
                    self.failed("forget identities", &error);
                    self.remember_missed(keys());
                }
            }
        }
    }

    fn remember_missed(&self, keys: impl Iterator<Item = String>) {
        lock(&self.missed).extend(keys);
    }

    /// True when no missed write is outstanding, deleting the keys of missed writes first
    /// once Redis answers again.
    async fn recovered(&self, r: &RedisBackend) -> bool {
        let keys: Vec<String> = {
            let missed = lock(&self.missed);
            if missed.is_empty() {
                return true;
            }
            missed.iter().cloned().collect()
        };
        let mut pipe = redis::pipe();
        for key in &keys {
            pipe.cmd("DEL").arg(key).ignore();
        }
        // Other processes' near caches may hold what these keys held: they drop it.
        let profile_keys = format!("{}{}", self.prefix, profile_key(""));
        let purged: Vec<String> = keys
            .iter()
            .filter_map(|key| key.strip_prefix(&profile_keys))
            .map(|id| format!("{id} purge"))
            .collect();
        if !purged.is_empty() {
            pipe.cmd("PUBLISH")
                .arg(&self.channel)
                .arg(purged.join("\n"))
                .ignore();
        }
        match r.pipe(&pipe).await {
            Ok(()) => {
                let mut missed = lock(&self.missed);
                for key in &keys {
                    missed.remove(key);
                }
                tracing::info!(
                    keys = keys.len(),
                    "profile cache back; dropped entries written while it was down"
                );
                missed.is_empty()
            }
            Err(_) => false,
        }
    }

    fn failed(&self, operation: &str, error: &redis::RedisError) {
        self.errors.add(1, &[]);
        tracing::warn!(operation, %error, "profile cache unavailable; serving from the database");
    }
}

fn decode(bytes: &[u8]) -> Option<Profile> {
    if bytes.is_empty() {
        return None;
    }
    Profile::decode(bytes).ok()
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
