//! The ingestion core, shared by the gRPC and HTTP adapters: write-key authentication,
//! per-source rate limits, validation, suppression, group commit, and the admin operations.
//! Nothing here knows about tonic or axum.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use base64::Engine;
use prost::Message;
use prost_types::Timestamp;
use rand::RngCore;
use sea_orm::{DatabaseConnection, DbErr, SqlErr, TransactionTrait};
use sha2::{Digest, Sha256};
use waymark_identity::{IdentHasher, IdentityRules, is_hash, normalise};
use waymark_kit::error::FieldViolation;
use waymark_kit::outbox::{self, Backlog, Wakeup};
use waymark_kit::time::{duration_micros, from_micros, micros, now_micros};
use waymark_proto::common::v1::Event;

use crate::committer::{CommitError, Committer};
use crate::metrics::{EventMetrics, reason};
use crate::store::{self, Counters, EventFilter, EventRow, SourceRow};
use crate::validate::{MAX_BATCH_MESSAGES, prepare, validate};

/// What went wrong in an ingestion operation.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// Missing, unknown or revoked write key.
    #[error("{0}")]
    Unauthenticated(String),
    /// The source sent more than its rate limit.
    #[error("rate limit exceeded; retry in {} s", retry_after.as_secs())]
    RateLimited { retry_after: Duration },
    /// Invalid request fields.
    #[error("invalid request")]
    Invalid(Vec<FieldViolation>),
    /// An event or batch over the size limits.
    #[error("{0}")]
    TooLarge(String),
    /// The named thing does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The thing to create exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The store is unreachable; nothing was written.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Anything else; logged where it happens.
    #[error("{0}")]
    Internal(String),
}

impl IngestError {
    fn invalid(field: &str, description: impl Into<String>) -> Self {
        Self::Invalid(vec![FieldViolation::new(field, description)])
    }
}

impl From<DbErr> for IngestError {
    fn from(error: DbErr) -> Self {
        if waymark_kit::db::is_unavailable(&error) {
            IngestError::Unavailable(error.to_string())
        } else {
            IngestError::Internal(error.to_string())
        }
    }
}

impl From<CommitError> for IngestError {
    fn from(error: CommitError) -> Self {
        if error.unavailable {
            IngestError::Unavailable(error.message)
        } else {
            IngestError::Internal(error.message)
        }
    }
}

/// Settings of the ingestion core.
#[derive(Debug, Clone)]
pub struct IngestSettings {
    /// Repeated messageIds within this window are duplicates.
    pub dedupe_window: Duration,
    /// How long payloads stay in the log.
    pub retention: Duration,
    /// Events per second for sources without their own limit.
    pub default_rate_limit: u32,
    /// Consumer names that receive every committed event.
    pub consumers: Vec<String>,
    /// Group-commit workers.
    pub committers: usize,
    /// What identifies a customer, as the profile service sees it, so the events of an
    /// erased customer are recognised here exactly as they would be there.
    pub identity: IdentityRules,
    /// The keyed hash suppressions are stored as (the profile service's, too).
    pub hasher: IdentHasher,
}

/// An authenticated source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthedSource {
    pub source_id: String,
    pub rate_limit: u32,
}

/// Whether a batch is committed partly (gRPC: valid events are kept, the rest listed) or
/// not at all when any event is invalid (HTTP: SDKs see one status for the whole batch).
/// Either way the outcome lists the rejections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchMode {
    Partial,
    AllOrNothing,
}

/// One refused event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub index: u32,
    pub message_id: String,
    pub violation: FieldViolation,
}

/// The outcome of a batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngestOutcome {
    pub accepted: u32,
    pub duplicates: u32,
    pub suppressed: u32,
    pub rejected: Vec<Rejection>,
    /// Identifiers of accepted events that identify nobody because they break the rule
    /// of their type; the event is kept, the value stays a trait.
    pub ignored: Vec<IgnoredIdentifier>,
}

/// An identifier an accepted event carried that breaks the rule of its type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IgnoredIdentifier {
    pub index: u32,
    pub message_id: String,
    pub field: String,
    pub reason: String,
}

/// Counters and backlog.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub total: Counters,
    pub sources: Vec<(String, Counters)>,
    pub backlog: Vec<Backlog>,
}

/// A newly created source and its write key.
#[derive(Debug, Clone)]
pub struct NewSource {
    pub source: SourceRow,
    pub write_key: String,
}

/// The ingestion core.
#[derive(Clone)]
pub struct Ingestor {
    inner: Arc<Inner>,
}

struct Inner {
    db: DatabaseConnection,
    settings: IngestSettings,
    committer: Committer,
    wakeup: Wakeup,
    keys: KeyCache,
    limiter: RateLimiter,
    suppressions: Suppressions,
    metrics: EventMetrics,
}

impl Ingestor {
    /// Builds the core and starts its committers.
    pub fn new(db: DatabaseConnection, settings: IngestSettings, wakeup: Wakeup) -> Self {
        let committer = Committer::spawn(
            db.clone(),
            settings.consumers.clone(),
            wakeup.clone(),
            settings.committers,
        );
        Self {
            inner: Arc::new(Inner {
                db,
                settings,
                committer,
                wakeup,
                keys: KeyCache::default(),
                limiter: RateLimiter::default(),
                metrics: EventMetrics::new(),
                suppressions: Suppressions::default(),
            }),
        }
    }

    /// The database this core writes to.
    pub fn db(&self) -> &DatabaseConnection {
        &self.inner.db
    }

    /// Resolves a write key to its live source.
    pub async fn authenticate(&self, write_key: &str) -> Result<AuthedSource, IngestError> {
        if write_key.is_empty() {
            return Err(IngestError::Unauthenticated("missing write key".into()));
        }
        let hash = hash_key(write_key);
        if let Some(cached) = self.inner.keys.get(&hash) {
            return cached.ok_or_else(|| IngestError::Unauthenticated("unknown write key".into()));
        }
        let found = store::find_live_source_by_key(&self.inner.db, &hash)
            .await?
            .map(|s| AuthedSource {
                rate_limit: if s.rate_limit == 0 {
                    self.inner.settings.default_rate_limit
                } else {
                    s.rate_limit
                },
                source_id: s.source_id,
            });
        self.inner.keys.put(hash, found.clone());
        found.ok_or_else(|| IngestError::Unauthenticated("unknown write key".into()))
    }

    /// Validates and commits a batch from `source`.
    pub async fn ingest(
        &self,
        source: &AuthedSource,
        events: Vec<Event>,
        mode: BatchMode,
    ) -> Result<IngestOutcome, IngestError> {
        if events.len() > MAX_BATCH_MESSAGES {
            self.inner
                .metrics
                .rejected("too_many_messages".into(), events.len() as u64);
            return Err(IngestError::TooLarge(format!(
                "batch has {} messages, more than {MAX_BATCH_MESSAGES}",
                events.len()
            )));
        }
        if let Err(limited) =
            self.inner
                .limiter
                .acquire(&source.source_id, source.rate_limit, events.len())
        {
            self.inner
                .metrics
                .rejected("rate_limited".into(), events.len() as u64);
            return Err(limited);
        }
        let received_at = from_micros(now_micros());
        let received_us = micros(&received_at);
        let check_suppression = !self.inner.suppressions.is_empty();
        let mut outcome = IngestOutcome::default();
        let mut rows = Vec::with_capacity(events.len());
        for (index, event) in events.into_iter().enumerate() {
            if let Err(violation) = validate(&event, &self.inner.settings.identity) {
                self.inner.metrics.rejected(reason(&violation.field), 1);
                outcome.rejected.push(Rejection {
                    index: index as u32,
                    message_id: event.message_id,
                    violation,
                });
                continue;
            }
            for dropped in self.inner.settings.identity.malformed(&event) {
                self.inner
                    .metrics
                    .identifier_dropped(&dropped.id_type, dropped.rule);
                outcome.ignored.push(IgnoredIdentifier {
                    index: index as u32,
                    message_id: event.message_id.clone(),
                    field: dropped.field,
                    reason: dropped.message,
                });
            }
            if check_suppression
                && self.inner.suppressions.matches(
                    &self.inner.settings.identity,
                    &self.inner.settings.hasher,
                    &event,
                )
            {
                outcome.suppressed += 1;
                continue;
            }
            let event = prepare(event, &source.source_id, received_at);
            rows.push(EventRow {
                event_time: event.timestamp.as_ref().map_or(received_us, micros),
                received_at: received_us,
                event_type: event.r#type as i16,
                payload: event.encode_to_vec(),
                event_id: event.event_id,
                source_id: event.source_id,
                message_id: event.message_id,
                user_id: event.user_id,
                anonymous_id: event.anonymous_id,
            });
        }
        let rejected = outcome.rejected.len() as u64;
        if mode == BatchMode::AllOrNothing && rejected > 0 {
            // Nothing is written; the caller reports the rejections.
            self.count_rejected_in_stats(&source.source_id, rejected)
                .await;
            return Ok(outcome);
        }
        let counters = Counters {
            rejected,
            suppressed: u64::from(outcome.suppressed),
            ..Counters::default()
        };
        let committed = self
            .inner
            .committer
            .commit(&source.source_id, rows, counters)
            .await?;
        outcome.accepted = committed.accepted;
        outcome.duplicates = committed.duplicates;
        Ok(outcome)
    }

    /// Records events refused before they reached [`Ingestor::ingest`] (malformed JSON
    /// messages). Best effort: the caller's answer does not depend on it.
    pub async fn count_rejected(&self, source_id: &str, rejected: u64) {
        self.inner.metrics.rejected("malformed".into(), rejected);
        self.count_rejected_in_stats(source_id, rejected).await;
    }

    async fn count_rejected_in_stats(&self, source_id: &str, rejected: u64) {
        let counters = Counters {
            rejected,
            ..Counters::default()
        };
        if let Err(error) = self
            .inner
            .committer
            .commit(source_id, Vec::new(), counters)
            .await
        {
            tracing::warn!(source_id, error = %error, "could not count rejected events");
        }
    }

    /// Creates a source and its write key.
    pub async fn create_source(
        &self,
        name: &str,
        rate_limit: u32,
    ) -> Result<NewSource, IngestError> {
        let name = name.trim();
        if name.is_empty() || name.len() > 100 {
            return Err(IngestError::invalid("name", "must be 1 to 100 characters"));
        }
        let write_key = new_write_key();
        let source = SourceRow {
            source_id: uuid::Uuid::now_v7().to_string(),
            name: name.to_owned(),
            created_at: now_micros(),
            revoked_at: None,
            rate_limit: if rate_limit == 0 {
                self.inner.settings.default_rate_limit
            } else {
                rate_limit
            },
        };
        match store::create_source(&self.inner.db, &source, &hash_key(&write_key)).await {
            Ok(()) => Ok(NewSource { source, write_key }),
            Err(e) if matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) => Err(
                IngestError::AlreadyExists(format!("a live source named {name:?} exists already")),
            ),
            Err(e) => Err(e.into()),
        }
    }

    /// Makes sure the source `name` exists and accepts `write_key` (a new random key when
    /// None); returns the key. Used by `waymark dev`.
    pub async fn ensure_source_with_key(
        &self,
        name: &str,
        write_key: Option<&str>,
    ) -> Result<(String, String), IngestError> {
        let key = write_key.map_or_else(new_write_key, str::to_owned);
        let hash = hash_key(&key);
        if store::rotate_key(&self.inner.db, name, &hash).await? {
            self.inner.keys.clear();
            let source = store::list_sources(&self.inner.db)
                .await?
                .into_iter()
                .find(|s| s.name == name && s.revoked_at.is_none())
                .ok_or_else(|| IngestError::Internal("rotated source vanished".into()))?;
            return Ok((source.source_id, key));
        }
        let source = SourceRow {
            source_id: uuid::Uuid::now_v7().to_string(),
            name: name.to_owned(),
            created_at: now_micros(),
            revoked_at: None,
            rate_limit: self.inner.settings.default_rate_limit,
        };
        store::create_source(&self.inner.db, &source, &hash).await?;
        Ok((source.source_id, key))
    }

    /// Every source.
    pub async fn list_sources(&self) -> Result<Vec<SourceRow>, IngestError> {
        Ok(store::list_sources(&self.inner.db).await?)
    }

    /// Revokes a source; its key stops working at once here.
    pub async fn revoke_source(&self, source_id: &str) -> Result<SourceRow, IngestError> {
        if source_id.is_empty() {
            return Err(IngestError::invalid("source_id", "is required"));
        }
        let source = store::revoke_source(&self.inner.db, source_id, now_micros())
            .await?
            .ok_or_else(|| IngestError::NotFound(format!("no source {source_id:?}")))?;
        self.inner.keys.clear();
        Ok(source)
    }

    /// Reads the committed log back, newest first; returns the events and the next page
    /// token.
    pub async fn list_events(
        &self,
        mut filter: EventFilter,
        page_token: &str,
    ) -> Result<(Vec<Event>, String), IngestError> {
        if !page_token.is_empty() {
            let seq = page_token.parse::<i64>().map_err(|_| {
                IngestError::invalid("page_token", "is not a token from a previous page")
            })?;
            filter.before_seq = Some(seq);
        }
        if let (Some(start), Some(end)) = (filter.start, filter.end)
            && start >= end
        {
            return Err(IngestError::invalid("end_time", "must be after start_time"));
        }
        filter.limit = match filter.limit {
            0 => 100,
            n if n > 1000 => return Err(IngestError::invalid("page_size", "must be at most 1000")),
            n => n,
        };
        let limit = filter.limit as usize;
        filter.limit += 1;
        let rows = store::list_events(&self.inner.db, &filter).await?;
        let next = if rows.len() > limit {
            rows[limit - 1].0.to_string()
        } else {
            String::new()
        };
        let events = rows
            .into_iter()
            .take(limit)
            .map(|(_, payload)| {
                Event::decode(payload.as_slice()).map_err(|e| {
                    IngestError::Internal(format!("stored event does not decode: {e}"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok((events, next))
    }

    /// Counters (one source or all) and the delivery backlog.
    pub async fn stats(&self, source_id: Option<&str>) -> Result<Stats, IngestError> {
        let sources = store::read_counters(&self.inner.db, source_id).await?;
        let mut total = Counters::default();
        for (_, c) in &sources {
            total.add(c);
        }
        let backlog = outbox::backlog(&self.inner.db).await?;
        Ok(Stats {
            total,
            sources,
            backlog,
        })
    }

    /// Queues the events of `[start, end)` for `consumer` again.
    pub async fn replay(
        &self,
        consumer: &str,
        start: Option<Timestamp>,
        end: Option<Timestamp>,
        source_id: Option<&str>,
    ) -> Result<u64, IngestError> {
        if !self.inner.settings.consumers.iter().any(|c| c == consumer) {
            return Err(IngestError::invalid(
                "consumer",
                format!(
                    "unknown consumer {consumer:?}; configured: {}",
                    self.inner.settings.consumers.join(", ")
                ),
            ));
        }
        let start = start.as_ref().map_or(0, micros);
        let end = end.as_ref().map_or_else(now_micros, micros);
        if start >= end {
            return Err(IngestError::invalid("end_time", "must be after start_time"));
        }
        let txn = self.inner.db.begin().await?;
        let queued = store::replay(&txn, consumer, start, end, source_id, now_micros()).await?;
        txn.commit().await?;
        self.inner.wakeup.notify();
        Ok(queued)
    }

    /// Adds identifiers to the suppression list and erases the log's and the outbox's
    /// copies of the events that carry them; returns (identifiers newly added, log rows
    /// erased). With `hashed`, each value is already the keyed hash of the normalised
    /// identifier (as the profile service pushes them); otherwise it is the identifier
    /// itself, normalised and hashed here. Only the hashes are stored.
    pub async fn suppress(
        &self,
        identities: Vec<(String, String)>,
        hashed: bool,
    ) -> Result<(u32, u64), IngestError> {
        let mut stored = Vec::with_capacity(identities.len());
        let rules = &self.inner.settings.identity;
        let hasher = &self.inner.settings.hasher;
        for (i, (id_type, value)) in identities.into_iter().enumerate() {
            if !rules.is_type(&id_type) {
                return Err(IngestError::invalid(
                    &format!("identities[{i}].type"),
                    format!(
                        "{id_type:?} is not an identifier type (built in or custom_identity_types)"
                    ),
                ));
            }
            let hash = if hashed {
                if !is_hash(&value) {
                    return Err(IngestError::invalid(
                        &format!("identities[{i}].value"),
                        "is not a keyed hash (64 lower-case hex digits)",
                    ));
                }
                value
            } else {
                let value = waymark_identity::check(&id_type, &value).map_err(|problem| {
                    IngestError::invalid(&format!("identities[{i}].value"), problem.to_string())
                })?;
                hasher.hash(&id_type, &value)
            };
            stored.push((id_type, hash));
        }
        let set: HashSet<(String, String)> = stored.iter().cloned().collect();
        let (added, erased, removed) =
            store::add_suppressions(&self.inner.db, &stored, now_micros(), |event| {
                carries(&set, rules, hasher, event)
            })
            .await?;
        self.inner.suppressions.extend(stored);
        if erased > 0 || removed > 0 {
            tracing::info!(
                erased,
                removed,
                "log entries and queued events of erased customers erased"
            );
        }
        Ok((added, erased))
    }

    /// Reloads the suppression list from the database (other replicas may have added to
    /// it; rows stored in clear by earlier releases are hashed first), then erases what
    /// the log and the outbox may still hold of the identifiers suppressed in the last
    /// minute: this replica may have accepted their events before it knew.
    pub async fn refresh_suppressions(&self) -> Result<(), IngestError> {
        let hasher = &self.inner.settings.hasher;
        let rewritten = store::hash_clear_suppressions(&self.inner.db, |(t, v)| {
            // A clear row was normalised when stored.
            (t.clone(), hasher.hash(t, v))
        })
        .await?;
        if rewritten > 0 {
            tracing::info!(
                rewritten,
                "suppressions stored in clear replaced by their hashes"
            );
        }
        let all = store::load_suppressions(&self.inner.db).await?;
        self.inner.suppressions.replace(all);
        let since = now_micros() - duration_micros(RECENT_SUPPRESSIONS);
        let recent: HashSet<(String, String)> = store::suppressed_since(&self.inner.db, since)
            .await?
            .into_iter()
            .collect();
        if recent.is_empty() {
            return Ok(());
        }
        // A row accepted before the suppression was added was received at most a commit
        // earlier; a full window back covers it with room to spare.
        let rules = &self.inner.settings.identity;
        let (erased, removed) = store::erase_recently_suppressed(
            &self.inner.db,
            since - duration_micros(RECENT_SUPPRESSIONS),
            |event| carries(&recent, rules, hasher, event),
        )
        .await?;
        if erased > 0 || removed > 0 {
            tracing::info!(
                erased,
                removed,
                "log entries and queued events of erased customers erased"
            );
        }
        Ok(())
    }

    /// Applies retention now; returns (payloads erased, rows deleted).
    pub async fn sweep(&self) -> Result<(u64, u64), IngestError> {
        let now = now_micros();
        let retention = duration_micros(self.inner.settings.retention);
        let keys = retention.max(duration_micros(self.inner.settings.dedupe_window));
        Ok(store::sweep(&self.inner.db, now - retention, now - keys).await?)
    }
}

/// SHA-256 of a write key. Keys are 192 random bits, so a fast hash is enough: there is
/// nothing to brute-force.
pub fn hash_key(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn new_write_key() -> String {
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    format!(
        "wk_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// How long after a suppression every refresh erases its events from the log again: well
/// beyond the refresh interval and the time an accepted batch takes to commit.
const RECENT_SUPPRESSIONS: Duration = Duration::from_secs(60);

/// Write keys resolved recently. Revocation clears it on this replica; other replicas see
/// it within [`KEY_TTL`]. Unknown keys are held apart and bounded
/// ([`MAX_UNKNOWN_KEYS`]), so a flood of random keys can neither evict the live ones nor
/// grow the cache: when full, the unknown keys alone are forgotten. Live keys are bounded
/// by the sources that exist.
#[derive(Default)]
struct KeyCache {
    live: RwLock<HashMap<String, (AuthedSource, Instant)>>,
    unknown: RwLock<HashMap<String, Instant>>,
}

const KEY_TTL: Duration = Duration::from_secs(30);
/// Unknown keys are remembered briefly so a client hammering with a bad key does not
/// reach the database on every request.
const UNKNOWN_KEY_TTL: Duration = Duration::from_secs(5);
/// Most unknown keys remembered at once (about 1 MB).
const MAX_UNKNOWN_KEYS: usize = 10_000;

impl KeyCache {
    fn get(&self, hash: &str) -> Option<Option<AuthedSource>> {
        let live = self.live.read().unwrap_or_else(|e| e.into_inner());
        if let Some((source, at)) = live.get(hash)
            && at.elapsed() < KEY_TTL
        {
            return Some(Some(source.clone()));
        }
        drop(live);
        let unknown = self.unknown.read().unwrap_or_else(|e| e.into_inner());
        unknown
            .get(hash)
            .is_some_and(|at| at.elapsed() < UNKNOWN_KEY_TTL)
            .then_some(None)
    }

    fn put(&self, hash: String, source: Option<AuthedSource>) {
        match source {
            Some(source) => {
                let mut live = self.live.write().unwrap_or_else(|e| e.into_inner());
                live.insert(hash, (source, Instant::now()));
            }
            None => {
                let mut unknown = self.unknown.write().unwrap_or_else(|e| e.into_inner());
                if unknown.len() >= MAX_UNKNOWN_KEYS {
                    unknown.retain(|_, at| at.elapsed() < UNKNOWN_KEY_TTL);
                    if unknown.len() >= MAX_UNKNOWN_KEYS {
                        unknown.clear();
                    }
                }
                unknown.insert(hash, Instant::now());
            }
        }
    }

    fn clear(&self) {
        self.live.write().unwrap_or_else(|e| e.into_inner()).clear();
        self.unknown
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    #[cfg(test)]
    fn len(&self) -> (usize, usize) {
        let live = self.live.read().unwrap_or_else(|e| e.into_inner()).len();
        let unknown = self.unknown.read().unwrap_or_else(|e| e.into_inner()).len();
        (live, unknown)
    }
}

/// Token buckets per source, refilled at the source's rate with one second of burst. A
/// batch larger than the burst is let through when the bucket is full and leaves a debt,
/// so the average rate still holds.
#[derive(Default)]
struct RateLimiter(Mutex<HashMap<String, Bucket>>);

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    fn acquire(&self, source_id: &str, rate: u32, events: usize) -> Result<(), IngestError> {
        let rate = f64::from(rate.max(1));
        let now = Instant::now();
        let mut buckets = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = buckets.entry(source_id.to_owned()).or_insert(Bucket {
            tokens: rate,
            at: now,
        });
        bucket.tokens =
            (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * rate).min(rate);
        bucket.at = now;
        let needed = (events as f64).min(rate);
        if bucket.tokens >= needed {
            bucket.tokens -= events as f64;
            Ok(())
        } else {
            let wait = (needed - bucket.tokens) / rate;
            Err(IngestError::RateLimited {
                retry_after: Duration::from_secs_f64(wait.ceil().max(1.0)),
            })
        }
    }
}

/// The suppression list, held in memory so checking an event costs a few hash lookups.
#[derive(Default)]
struct Suppressions(RwLock<HashSet<(String, String)>>);

impl Suppressions {
    fn is_empty(&self) -> bool {
        self.0.read().unwrap_or_else(|e| e.into_inner()).is_empty()
    }

    fn extend(&self, identities: Vec<(String, String)>) {
        self.0
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .extend(identities);
    }

    fn replace(&self, identities: Vec<(String, String)>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = identities.into_iter().collect();
    }

    /// Whether any identifier of `event` is suppressed (see [`carries`]).
    fn matches(&self, rules: &IdentityRules, hasher: &IdentHasher, event: &Event) -> bool {
        let set = self.0.read().unwrap_or_else(|e| e.into_inner());
        !set.is_empty() && carries(&set, rules, hasher, event)
    }
}

/// Whether `event` carries one of the identifiers `set` holds as `(type, keyed hash)`,
/// as `waymark-identity` extracts them (the profile service reads events the same way).
/// An alias's previousId is checked as a user id too: resolution reads it as an anonymous
/// id, but an erased customer's user id must not come back through an alias either.
fn carries(
    set: &HashSet<(String, String)>,
    rules: &IdentityRules,
    hasher: &IdentHasher,
    event: &Event,
) -> bool {
    rules
        .extract(event)
        .iter()
        .any(|ident| set.contains(&hasher.hashed(ident)))
        || normalise("user_id", &event.previous_id)
            .is_some_and(|v| set.contains(&hasher.hashed(&("user_id".to_owned(), v))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limiter_refuses_beyond_the_rate_and_allows_big_batches_once() {
        let limiter = RateLimiter::default();
        assert!(limiter.acquire("s", 10, 6).is_ok());
        assert!(limiter.acquire("s", 10, 4).is_ok());
        match limiter.acquire("s", 10, 5) {
            Err(IngestError::RateLimited { retry_after }) => {
                assert!(retry_after >= Duration::from_secs(1))
            }
            other => panic!("expected rate limit, got {other:?}"),
        }
        // Another source has its own bucket; a batch over the burst passes when full.
        assert!(limiter.acquire("t", 10, 50).is_ok());
        assert!(limiter.acquire("t", 10, 1).is_err());
    }

    #[test]
    fn suppression_matches_ids_and_traits() {
        let s = Suppressions::default();
        let h = IdentHasher::default();
        s.extend(vec![h.hashed(&("email".into(), "ada@example.com".into()))]);
        let mut e = Event {
            anonymous_id: "a".into(),
            ..Event::default()
        };
        let rules = IdentityRules::default();
        assert!(!s.matches(&rules, &h, &e));
        let serde_json::Value::Object(traits) = serde_json::json!({"email": "ADA@example.com"})
        else {
            unreachable!()
        };
        e.traits = Some(waymark_proto::json::struct_from_json(traits));
        assert!(s.matches(&rules, &h, &e));
        // Normalised as the profile service does: an international prefix of 00 is +.
        s.extend(vec![h.hashed(&("phone".into(), "+4915123456789".into()))]);
        let serde_json::Value::Object(traits) = serde_json::json!({"phone": "0049 151 23456789"})
        else {
            unreachable!()
        };
        let e = Event {
            traits: Some(waymark_proto::json::struct_from_json(traits)),
            ..Event::default()
        };
        assert!(s.matches(&rules, &h, &e));
    }

    #[test]
    fn a_flood_of_unknown_keys_neither_evicts_live_keys_nor_grows_the_cache() {
        let cache = KeyCache::default();
        let source = AuthedSource {
            source_id: "src".into(),
            rate_limit: 1,
        };
        cache.put(hash_key("live"), Some(source.clone()));
        for i in 0..3 * MAX_UNKNOWN_KEYS {
            cache.put(hash_key(&format!("random-{i}")), None);
        }
        let (live, unknown) = cache.len();
        assert_eq!(live, 1);
        assert!(unknown <= MAX_UNKNOWN_KEYS, "{unknown} unknown keys held");
        assert_eq!(cache.get(&hash_key("live")), Some(Some(source)));
        let last = hash_key(&format!("random-{}", 3 * MAX_UNKNOWN_KEYS - 1));
        assert_eq!(
            cache.get(&last),
            Some(None),
            "unknown keys are still remembered"
        );
    }

    #[test]
    fn write_keys_are_random_and_hashed() {
        let a = new_write_key();
        assert!(a.starts_with("wk_") && a.len() > 30);
        assert_ne!(a, new_write_key());
        assert_eq!(hash_key(&a).len(), 64);
        assert_ne!(hash_key(&a), a);
    }
}
