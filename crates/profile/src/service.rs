//! The profile core: applies delivered batches and serves reads through the cache. No
//! tonic here; the adapter maps [`ProfileError`] in `error.rs`.

use std::collections::HashSet;
use std::sync::Arc;

use prost_types::Struct;
use sea_orm::{DatabaseConnection, DbErr, TransactionTrait};
use waymark_kit::db::now_micros;
use waymark_kit::outbox::Wakeup;
use waymark_profile_cache::ProfileCache;
use waymark_proto::common::v1::{Channel, Event, EventType};
use waymark_proto::profile::v1::{Merge, Profile, TimelineEntry};

use crate::applier::ApplierMemory;
use crate::identity::{Ident, normalise};
use crate::metrics::Metrics;
use crate::model::{TRUSTED_SOURCE_PREFIX, apply_event, from_micros};
use crate::resolve::trait_changed_event;
use crate::resolve::{Record, Rules, WorkingSet};
use crate::store::{self, TimelineFilter};

mod privacy;
mod segments;
mod unmerge;

pub use privacy::{Deleted, Export, INGEST_IDENTITY_TYPES, identity};

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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    pub applied: u32,
    pub duplicates: u32,
    /// Acknowledged but dropped: they carry an identifier of an erased profile.
    pub suppressed: u32,
    /// Acknowledged but attributed to nobody: no identifier that is not blocked.
    pub unattributed: u32,
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
    consumers: Vec<String>,
    wakeup: Wakeup,
    /// One applier per process; replicas serialise on a database lock. It guards what
    /// the applier remembers of the profiles it wrote.
    applier: tokio::sync::Mutex<ApplierMemory>,
    /// Compiled segment definitions, replaced whole when one changes.
    segments: std::sync::RwLock<segments::Definitions>,
    /// Signalled when a definition changed, to start its backfill.
    segments_changed: tokio::sync::Notify,
    /// Signalled when an erasure added suppressions for ingestion.
    suppressions_pending: tokio::sync::Notify,
    metrics: Metrics,
}

impl Profiles {
    /// Builds the core.
    pub fn new(
        db: DatabaseConnection,
        cache: ProfileCache,
        rules: Rules,
        consumers: Vec<String>,
        wakeup: Wakeup,
        applier_memory_profiles: usize,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                db,
                cache,
                rules,
                consumers,
                wakeup,
                applier: tokio::sync::Mutex::new(ApplierMemory::new(applier_memory_profiles)),
                segments: std::sync::RwLock::default(),
                segments_changed: tokio::sync::Notify::new(),
                suppressions_pending: tokio::sync::Notify::new(),
                metrics: Metrics::new(),
            }),
        }
    }

    /// The database.
    pub fn db(&self) -> &DatabaseConnection {
        &self.inner.db
    }

    /// Applies a delivered batch: idempotent by event id, all or nothing.
    pub async fn apply(&self, events: Vec<Event>) -> Result<Applied, ProfileError> {
        if let Some(i) = events.iter().position(|e| e.event_id.is_empty()) {
            return Err(invalid(
                format!("events[{i}].event_id"),
                "is required: it is what makes a redelivered event apply only once",
            ));
        }
        let total = events.len() as u32;
        // Everything that needs no database runs before the applier is taken: the
        // serialised section is the critical path of every replica's batches.
        let mut seen = HashSet::new();
        let candidates: Vec<(Event, Vec<Ident>)> = events
            .into_iter()
            .filter(|e| seen.insert(e.event_id.clone()))
            .map(|e| {
                let ids = self.inner.rules.identity.extract(&e);
                (e, ids)
            })
            .collect();
        let event_ids: Vec<String> = candidates.iter().map(|(e, _)| e.event_id.clone()).collect();
        let idents: Vec<Ident> = {
            let all: HashSet<&Ident> = candidates.iter().flat_map(|(_, ids)| ids).collect();
            all.into_iter().cloned().collect()
        };
        let mut applier = self.inner.applier.lock().await;
        let now = now_micros();
        let txn = self.inner.db.begin().await?;
        let epoch = self.lock_applier(&txn).await?;
        applier.begin(epoch);
        let done = store::already_applied(&txn, &event_ids).await?;
        let fresh: Vec<(Event, Vec<Ident>)> = candidates
            .into_iter()
            .filter(|(e, _)| !done.contains(&e.event_id))
            .collect();
        let duplicates = total - fresh.len() as u32;
        // Ingestion drops these too, but events committed before the erasure reached it
        // may still be in flight.
        let suppressed = store::suppressed_among(&txn, &idents).await?;
        let before = fresh.len();
        let fresh: Vec<(Event, Vec<Ident>)> = if suppressed.is_empty() {
            fresh
        } else {
            fresh
                .into_iter()
                .filter(|(_, ids)| !ids.iter().any(|id| suppressed.contains(id)))
                .collect()
        };
        let suppressed_count = (before - fresh.len()) as u32;
        if suppressed_count > 0 {
            tracing::info!(
                events = suppressed_count,
                "events of erased profiles dropped"
            );
        }
        if fresh.is_empty() {
            txn.rollback().await?;
            self.inner
                .metrics
                .delivered("duplicate", duplicates as usize);
            self.inner
                .metrics
                .delivered("suppressed", suppressed_count as usize);
            return Ok(Applied {
                applied: 0,
                duplicates,
                suppressed: suppressed_count,
                unattributed: 0,
            });
        }
        let (mut records, unknown) = applier.take(&idents);
        records.extend(store::load_owners(&txn, &unknown).await?);
        let mut set = WorkingSet::new(records);
        for (event, ids) in fresh {
            set.apply(&self.inner.rules, event, ids, now);
        }
        if set.unattributed > 0 {
            tracing::warn!(
                events = set.unattributed,
                "events without a usable identifier were not attributed"
            );
        }
        let transitions = self.evaluate_batch(&mut set, now);
        store::save_batch(
            &txn,
            &set,
            &self.inner.consumers,
            &self.inner.rules.emotion,
            now,
        )
        .await?;
        segments::save_transitions(&txn, &transitions, now).await?;
        for merge in &set.merges {
            store::drop_memberships(&txn, &merge.merged_id).await?;
        }
        if let Err(error) = txn.commit().await {
            // The commit may have happened all the same; only the database knows now.
            applier.clear();
            return Err(error.into());
        }
        applier.committed(epoch, &set);
        // The next batch may resolve while this one writes the cache: cached versions only
        // ever move forward, whichever write lands first.
        drop(applier);
        self.inner.wakeup.notify();
        let metrics = &self.inner.metrics;
        metrics.delivered("applied", set.applied.len());
        metrics.delivered("duplicate", duplicates as usize);
        metrics.delivered("suppressed", suppressed_count as usize);
        metrics.delivered("unattributed", set.unattributed);
        metrics.emitted(
            set.synthetic
                .iter()
                .map(|(event, _)| event)
                .chain(&set.merged_away_exits),
        );
        self.refresh_cache(&set).await;
        Ok(Applied {
            applied: set.applied.len() as u32,
            duplicates,
            suppressed: suppressed_count,
            unattributed: set.unattributed as u32,
        })
    }

    /// After a commit: newer versions into the cache (one round trip), merged-away
    /// profiles out of it.
    async fn refresh_cache(&self, set: &WorkingSet) {
        let mut live = Vec::with_capacity(set.dirty.len());
        for record in set.dirty.iter().filter_map(|id| set.records.get(id)) {
            match &record.merged_into {
                None => live.push(&record.profile),
                Some(_) => {
                    self.inner
                        .cache
                        .invalidate(&record.profile.profile_id, record.profile.version, &[])
                        .await
                }
            }
        }
        self.inner.cache.put_many(&live).await;
    }

    /// A profile by id (following merges), from the cache when it has it.
    pub async fn get(&self, profile_id: &str) -> Result<Profile, ProfileError> {
        if profile_id.is_empty() {
            return Err(invalid("profile_id", "is required"));
        }
        if let Some(p) = self.inner.cache.get(profile_id).await {
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
        let value = normalise(id_type, value).ok_or_else(|| {
            invalid(
                "identity.value",
                "is empty, blocked or malformed for its type",
            )
        })?;
        let id = match self.inner.cache.resolve(id_type, &value).await {
            Some(id) => id,
            None => store::owner_of(&self.inner.db, id_type, &value)
                .await?
                .ok_or_else(|| {
                    ProfileError::NotFound(format!("no profile with {id_type} {value:?}"))
                })?,
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
        let _guard = self.inner.applier.lock().await;
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
        store::save_records(&txn, &[&record], &self.inner.rules.emotion, now).await?;
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
        let payloads: Vec<Vec<u8>> = emitted.iter().map(prost::Message::encode_to_vec).collect();
        let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
        if !refs.is_empty() {
            waymark_kit::outbox::enqueue(&txn, &self.inner.consumers, &refs).await?;
        }
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
        let mut change = Event {
            traits: Some(traits),
            source_id: trusted_source_id(source),
            ..Event::default()
        };
        change.set_type(EventType::Identify);
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

    /// The merge history of the live profile `profile_id` is or was merged into.
    pub async fn merges(&self, profile_id: &str) -> Result<Vec<Merge>, ProfileError> {
        let live = self.get(profile_id).await?;
        Ok(store::merges(&self.inner.db, &live.profile_id).await?)
    }
}
