//! The profile core: applies delivered batches and serves reads through the cache. No
//! tonic here; the adapter maps [`ProfileError`] in `error.rs`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use prost_types::Struct;
use sea_orm::{DatabaseConnection, DatabaseTransaction, DbErr, TransactionTrait};
use waymark_kit::outbox::Wakeup;
use waymark_kit::time::{duration_micros, from_micros, now_micros};
use waymark_profile_cache::ProfileCache;
use waymark_proto::common::v1::{Channel, Event, EventType};
use waymark_proto::profile::v1::{DoNotMerge, Merge, Profile, TimelineEntry};

use crate::applier::ApplierMemory;
use crate::emotion::EmotionRules;
use crate::identity::{Ident, IdentHasher};
use crate::metrics::Metrics;
use crate::model::{TRUSTED_SOURCE_PREFIX, address, apply_event};
use crate::resolve::trait_changed_event;
use crate::resolve::{Record, Rules};
use crate::store::{self, TimelineFilter};

mod aggregates;
mod apply;
mod privacy;
mod segments;
mod unmerge;

pub use aggregates::{AGGREGATE_BACKFILL_EVENTS, AGGREGATE_BACKFILL_PAGE};
pub use privacy::{Deleted, Export, identity};

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("invalid {field}: {problem}")]
    Invalid {
        field: std::borrow::Cow<'static, str>,
        problem: String,
    },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl From<DbErr> for ProfileError {
    fn from(e: DbErr) -> Self {
        if waymark_kit::db::is_unavailable(&e) {
            ProfileError::Unavailable(e.to_string())
        } else {
            ProfileError::Internal(e.to_string())
        }
    }
}

/// An event the profile service emits on its own account rather than because of one
/// delivered event: Segment Entered / Exited, Profile Deleted, Profile Unmerged.
pub(crate) fn notice(
    name: &str,
    profile_id: &str,
    properties: impl IntoIterator<Item = (&'static str, prost_types::Value)>,
    now_us: i64,
) -> Event {
    let event_id = uuid::Uuid::now_v7().to_string();
    let mut event = Event {
        message_id: event_id.clone(),
        event_id,
        event: name.to_owned(),
        profile_id: profile_id.to_owned(),
        properties: Some(Struct {
            fields: properties
                .into_iter()
                .map(|(key, value)| (key.to_owned(), value))
                .collect(),
        }),
        timestamp: Some(from_micros(now_us)),
        received_at: Some(from_micros(now_us)),
        source_id: "profile".into(),
        ..Event::default()
    };
    event.set_type(EventType::Track);
    event.set_channel(Channel::Other);
    event
}

/// Addresses each of `events` to its profile among `profiles` (see [`address`]) and
/// queues them for every consumer in `txn`.
pub(crate) async fn emit(
    txn: &DatabaseTransaction,
    consumers: &[String],
    events: &mut [Event],
    profiles: &[&Profile],
) -> Result<(), DbErr> {
    if events.is_empty() {
        return Ok(());
    }
    let by_id: HashMap<&str, &Profile> = profiles
        .iter()
        .map(|p| (p.profile_id.as_str(), *p))
        .collect();
    let payloads: Vec<Vec<u8>> = events
        .iter_mut()
        .map(|event| {
            if let Some(profile) = by_id.get(event.profile_id.as_str()) {
                address(event, &profile.profile_id, profile);
            }
            prost::Message::encode_to_vec(event)
        })
        .collect();
    let payloads: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
    waymark_kit::outbox::enqueue(txn, consumers, &payloads).await
}

/// Writes `records` in `txn`, each encoded and with when decay next moves its emotion
/// label under `emotion`.
pub(crate) async fn save_profiles(
    txn: &DatabaseTransaction,
    records: &[&Record],
    emotion: &EmotionRules,
    now_us: i64,
) -> Result<(), DbErr> {
    let rows = records
        .iter()
        .map(|record| store::ProfileRow {
            record,
            state: prost::Message::encode_to_vec(&record.profile),
            emotion_due_at: record.emotion_due(emotion),
        })
        .collect();
    store::save_profiles(txn, rows, now_us).await
}

/// A string as a protobuf value.
pub(crate) fn string_value(s: &str) -> prost_types::Value {
    prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue(s.to_owned())),
    }
}

/// The `source_id` of a trusted change made by `service` (the caller's name, "api" when
/// it gave none).
fn trusted_source_id(service: &str) -> String {
    let service = service.trim();
    format!(
        "{TRUSTED_SOURCE_PREFIX}{}",
        if service.is_empty() { "api" } else { service }
    )
}

fn invalid(
    field: impl Into<std::borrow::Cow<'static, str>>,
    problem: impl Into<String>,
) -> ProfileError {
    ProfileError::Invalid {
        field: field.into(),
        problem: problem.into(),
    }
}

/// The outcome of a delivery.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    pub applied: u32,
    pub duplicates: u32,
    /// Acknowledged but dropped: they carry an identifier of an erased profile.
    pub suppressed: u32,
    /// Acknowledged but attributed to nobody: no identifier that is not blocked.
    pub unattributed: u32,
    /// Refused for good, by position in the delivered batch: the producer sets them
    /// aside as dead letters.
    pub rejected: Vec<RejectedEvent>,
}

/// One delivered event the service can never apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedEvent {
    /// Position in the delivered batch.
    pub index: usize,
    /// Its `event_id`, when it has one.
    pub event_id: String,
    /// The field at fault, within the event (`userId`).
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

/// How far behind another replica's clock may run when it stamps a suppression.
const SUPPRESSION_CLOCK_MARGIN: std::time::Duration = std::time::Duration::from_secs(600);

/// The suppression list as this process holds it.
struct Suppressed {
    /// The generation it was loaded at; -1 before it is.
    generation: i64,
    identities: Arc<HashSet<Ident>>,
    /// When the latest entry held was suppressed: the next load starts there.
    latest: i64,
}

impl Default for Suppressed {
    fn default() -> Self {
        Self {
            generation: -1,
            identities: Arc::default(),
            latest: i64::MIN,
        }
    }
}

/// The profile core.
#[derive(Clone)]
pub struct Profiles {
    inner: Arc<Inner>,
}

struct Inner {
    db: DatabaseConnection,
    cache: ProfileCache,
    rules: Rules,
    /// The keyed hash identifiers are kept as once erased (suppressions).
    hasher: IdentHasher,
    consumers: Vec<String>,
    wakeup: Wakeup,
    /// One applier per process; replicas serialise on a database lock. It guards what
    /// the applier remembers of the profiles it wrote.
    applier: tokio::sync::Mutex<ApplierMemory>,
    /// Until when (Unix microseconds) deliveries look their events up before applying
    /// them: set when one held events applied before.
    look_up_applied_until: std::sync::atomic::AtomicI64,
    /// Compiled segment definitions, replaced whole when one changes.
    segments: std::sync::RwLock<segments::Definitions>,
    /// The suppression list, so deliveries check it without a query.
    suppressed: std::sync::RwLock<Suppressed>,
    /// Signalled when a definition changed, to start its backfill.
    segments_changed: tokio::sync::Notify,
    /// Signalled when an erasure added suppressions for ingestion.
    suppressions_pending: tokio::sync::Notify,
    /// Erased profiles whose tombstone has not reached the cache (`pending_tombstones`):
    /// the cache may still hold them, so their reads skip it. None until the table has
    /// been read at start-up: until then no read trusts the cache.
    pending_tombstones: std::sync::RwLock<Option<HashSet<String>>>,
    /// Held by an erasure from before its commit until its tombstones are settled, and by
    /// [`Profiles::settle_tombstones`], so neither forgets what the other is doing.
    tombstones: tokio::sync::Mutex<()>,
    metrics: Metrics,
}

impl Profiles {
    /// Builds the core.
    pub fn new(
        db: DatabaseConnection,
        cache: ProfileCache,
        rules: Rules,
        hasher: IdentHasher,
        consumers: Vec<String>,
        wakeup: Wakeup,
        applier_memory_profiles: usize,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                db,
                cache,
                rules,
                hasher,
                consumers,
                wakeup,
                applier: tokio::sync::Mutex::new(ApplierMemory::new(applier_memory_profiles)),
                look_up_applied_until: std::sync::atomic::AtomicI64::new(0),
                segments: std::sync::RwLock::default(),
                suppressed: std::sync::RwLock::default(),
                segments_changed: tokio::sync::Notify::new(),
                suppressions_pending: tokio::sync::Notify::new(),
                pending_tombstones: std::sync::RwLock::new(None),
                tombstones: tokio::sync::Mutex::new(()),
                metrics: Metrics::new(),
            }),
        }
    }

    /// The database.
    pub fn db(&self) -> &DatabaseConnection {
        &self.inner.db
    }

    /// Takes the applier lock in `txn` and, when any replica changed the segment
    /// definitions or the suppression list since this one loaded them, reloads them there
    /// and then (nothing can change them while the lock is held), so no batch is
    /// evaluated against stale definitions or lets an erased customer back in. Returns
    /// the applier counter.
    pub(crate) async fn lock_applier(
        &self,
        txn: &sea_orm::DatabaseTransaction,
    ) -> Result<i64, ProfileError> {
        Ok(self.lock_applier_checking(txn, &[]).await?.0.epoch)
    }

    /// [`lock_applier`](Self::lock_applier), returning the whole lock and which of
    /// `event_ids` were applied before.
    pub(crate) async fn lock_applier_checking(
        &self,
        txn: &sea_orm::DatabaseTransaction,
        event_ids: &[String],
    ) -> Result<(store::ApplierLock, HashSet<String>), ProfileError> {
        let (lock, applied) = store::lock_applier(txn, event_ids).await?;
        if lock.definitions != self.definitions_generation() {
            self.reload_segments_at(txn, lock.definitions).await?;
        }
        let (generation, latest) = {
            let held = self.read_suppressed();
            (held.generation, held.latest)
        };
        if lock.suppressions != generation {
            // The list only grows: what was added since the latest entry held is enough,
            // with a margin for replicas whose clocks run behind.
            let since = latest.saturating_sub(duration_micros(SUPPRESSION_CLOCK_MARGIN));
            let added = store::suppressed_since(txn, since).await?;
            let mut guard = self
                .inner
                .suppressed
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let held = &mut *guard;
            let identities = Arc::make_mut(&mut held.identities);
            for (ident, at) in added {
                held.latest = held.latest.max(at);
                identities.insert(ident);
            }
            held.generation = lock.suppressions;
        }
        Ok((lock, applied))
    }

    /// The suppression list as last loaded, with its generation.
    fn suppressed(&self) -> (i64, Arc<HashSet<Ident>>) {
        let held = self.read_suppressed();
        (held.generation, held.identities.clone())
    }

    fn read_suppressed(&self) -> std::sync::RwLockReadGuard<'_, Suppressed> {
        self.inner
            .suppressed
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A profile by id (following merges), from the cache when it has it.
    pub async fn get(&self, profile_id: &str) -> Result<Profile, ProfileError> {
        if profile_id.is_empty() {
            return Err(invalid("profile_id", "is required"));
        }
        if self.cache_trusted_for(profile_id)
            && let Some(p) = self.inner.cache.get(profile_id).await
        {
            return Ok(p);
        }
        let record = store::load_live(&self.inner.db, profile_id)
            .await?
            .ok_or_else(|| ProfileError::NotFound(format!("no profile {profile_id:?}")))?;
        self.inner.cache.put(&record.profile).await;
        Ok(record.profile)
    }

    /// A profile by identifier.
    pub async fn get_by_identity(
        &self,
        id_type: &str,
        value: &str,
    ) -> Result<Profile, ProfileError> {
        if id_type.is_empty() {
            return Err(invalid("identity.type", "is required"));
        }
        let value = waymark_identity::check(id_type, value)
            .map_err(|problem| invalid("identity.value", problem.to_string()))?;
        let id = match self.inner.cache.resolve(id_type, &value).await {
            Some(id) => id,
            None => {
                let id = store::owner_of(&self.inner.db, id_type, &value)
                    .await?
                    .ok_or_else(|| {
                        ProfileError::NotFound(format!("no profile with {id_type} {value:?}"))
                    })?;
                // Batches only rewrite the keys of identifiers they add or move; one that
                // expired meanwhile is restored by the first reader to miss it.
                self.inner
                    .cache
                    .remember_identity(id_type, &value, &id)
                    .await;
                id
            }
        };
        self.get(&id).await
    }

    /// Several profiles; unknown ids are left out.
    pub async fn batch_get(&self, ids: &[String]) -> Result<Vec<Profile>, ProfileError> {
        if ids.len() > 1000 {
            return Err(invalid("profile_ids", "at most 1000 per call"));
        }
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            match self.get(id).await {
                Ok(p) => out.push(p),
                Err(ProfileError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// A timeline page and the next page token.
    pub async fn timeline(
        &self,
        mut filter: TimelineFilter,
        page_token: &str,
    ) -> Result<(Vec<TimelineEntry>, String), ProfileError> {
        let live = self.get(&filter.profile_id).await?;
        filter.profile_id = live.profile_id;
        if !page_token.is_empty() {
            let (ts, id) = page_token
                .split_once('/')
                .and_then(|(ts, id)| Some((ts.parse::<i64>().ok()?, id.to_owned())))
                .ok_or_else(|| invalid("page_token", "is not a token from a previous page"))?;
            filter.before = Some((ts, id));
        }
        filter.limit = match filter.limit {
            0 => 100,
            n if n > 1000 => return Err(invalid("page_size", "must be at most 1000")),
            n => n,
        };
        let limit = filter.limit as usize;
        filter.limit += 1;
        let rows = store::timeline(&self.inner.db, &filter).await?;
        let next = if rows.len() > limit {
            format!("{}/{}", rows[limit - 1].0, rows[limit - 1].1)
        } else {
            String::new()
        };
        Ok((
            rows.into_iter().take(limit).map(|(_, _, e)| e).collect(),
            next,
        ))
    }

    /// Applies a trusted service's change to one live profile, under the applier lock.
    /// The change is an event (see [`TRUSTED_SOURCE_PREFIX`]) kept in the timeline, so
    /// rebuilding the profile from its events (Unmerge) keeps it.
    async fn apply_trusted(
        &self,
        profile_id: &str,
        mut change: Event,
    ) -> Result<Profile, ProfileError> {
        if profile_id.is_empty() {
            return Err(invalid("profile_id", "is required"));
        }
        let _guard = self.exclusive_applier().await;
        let now = now_micros();
        let at = from_micros(now);
        (change.timestamp, change.received_at) = (Some(at), Some(at));
        change.event_id = uuid::Uuid::now_v7().to_string();
        change.message_id.clone_from(&change.event_id);
        change.set_channel(Channel::Other);
        let txn = self.inner.db.begin().await?;
        self.lock_applier(&txn).await?;
        let mut record: Record = store::load_live(&txn, profile_id)
            .await?
            .ok_or_else(|| ProfileError::NotFound(format!("no profile {profile_id:?}")))?;
        let live_id = record.profile.profile_id.clone();
        change.profile_id.clone_from(&live_id);
        let effects = apply_event(&mut record.profile, &change, &self.inner.rules.emotion);
        let mut emitted = Vec::new();
        if !effects.trait_changes.is_empty() {
            let mut event = trait_changed_event(&change, &effects.trait_changes);
            event.profile_id.clone_from(&live_id);
            emitted.push(event);
        }
        let (transitions, segment_events) = self.evaluate_profile(&mut record.profile, now);
        emitted.extend(segment_events);
        record.profile.version += 1;
        record.profile.updated_at = Some(at);
        save_profiles(&txn, &[&record], &self.inner.rules.emotion, now).await?;
        store::insert_timeline(
            &txn,
            &[store::TimelineRow {
                event: &change,
                owner: live_id.clone(),
                origin: &live_id,
                encoded: &prost::Message::encode_to_vec(&change),
            }],
        )
        .await?;
        segments::save_transitions(&txn, &transitions, now).await?;
        emit(
            &txn,
            &self.inner.consumers,
            &mut emitted,
            &[&record.profile],
        )
        .await?;
        txn.commit().await?;
        self.inner.wakeup.notify();
        self.inner.metrics.emitted(&emitted);
        self.inner.cache.put(&record.profile).await;
        tracing::info!(
            profile_id = %live_id,
            source = %change.source_id,
            changed_traits = effects.trait_changes.len(),
            "trusted update applied"
        );
        Ok(record.profile)
    }

    /// Sets traits from a trusted service; emits `Trait Changed` when something changed.
    pub async fn update_traits(
        &self,
        profile_id: &str,
        traits: Struct,
        source: &str,
    ) -> Result<Profile, ProfileError> {
        if traits.fields.is_empty() {
            return Err(invalid("traits", "must set at least one trait"));
        }
        // The limits ingestion applies to the traits of an event.
        waymark_identity::check_object("traits", &traits)
            .map_err(|(field, problem)| invalid(field, problem))?;
        let mut change = Event {
            traits: Some(traits),
            source_id: trusted_source_id(source),
            ..Event::default()
        };
        change.set_type(EventType::Identify);
        if let Some((field, len)) = self.inner.rules.identity.oversized_identifier(&change) {
            return Err(invalid(
                field,
                format!(
                    "is {len} bytes, longer than the {} bytes an identifier may have",
                    waymark_identity::MAX_IDENTIFIER_BYTES
                ),
            ));
        }
        self.apply_trusted(profile_id, change).await
    }

    /// Records a consent decision.
    pub async fn set_consent(
        &self,
        profile_id: &str,
        channel: &str,
        purpose: &str,
        granted: bool,
        source: &str,
    ) -> Result<Profile, ProfileError> {
        let channel = channel.trim().to_lowercase();
        let purpose = purpose.trim().to_lowercase();
        if channel.is_empty() {
            return Err(invalid("channel", "is required (\"*\" for every channel)"));
        }
        if purpose.is_empty() {
            return Err(invalid("purpose", "is required"));
        }
        for (field, name) in [("channel", &channel), ("purpose", &purpose)] {
            if name.len() > waymark_identity::MAX_CONSENT_NAME_BYTES {
                return Err(invalid(
                    field,
                    format!(
                        "is longer than {} bytes",
                        waymark_identity::MAX_CONSENT_NAME_BYTES
                    ),
                ));
            }
        }
        let mut change = Event {
            event: if granted {
                "Consent Granted"
            } else {
                "Consent Denied"
            }
            .into(),
            properties: Some(Struct {
                fields: [
                    ("channel".to_owned(), string_value(&channel)),
                    ("purpose".to_owned(), string_value(&purpose)),
                ]
                .into(),
            }),
            source_id: trusted_source_id(source),
            ..Event::default()
        };
        change.set_type(EventType::Track);
        self.apply_trusted(profile_id, change).await
    }

    /// The merge history of the live profile `profile_id` is or was merged into, and the
    /// pairs kept apart that hold for it.
    pub async fn merges(
        &self,
        profile_id: &str,
    ) -> Result<(Vec<Merge>, Vec<DoNotMerge>), ProfileError> {
        let live = self.get(profile_id).await?;
        let db = &self.inner.db;
        Ok((
            store::merges(db, &live.profile_id).await?,
            store::kept_apart_from(db, &live.profile_id).await?,
        ))
    }
}
