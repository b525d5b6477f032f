//! Delivery: a batch from a relay is applied in one transaction under the applier, which
//! serialises every writer of profiles (in process by its mutex, across replicas by the
//! `applier_epoch` row lock). Grouping concurrent deliveries into one transaction was
//! measured and gained nothing: the cost is per row, not per transaction.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use prost::Message;
use sea_orm::{DbErr, TransactionTrait};
use waymark_kit::db::now_micros;
use waymark_profile_cache::CacheWrite;
use waymark_proto::common::v1::{Event, Identity};

use super::{Applied, ProfileError, Profiles, invalid, segments};
use crate::identity::Ident;
use crate::resolve::{Record, WorkingSet};
use crate::store;

impl Profiles {
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
        let mut candidates: Vec<(Event, Vec<Ident>)> = events
            .into_iter()
            .filter(|e| seen.insert(e.event_id.clone()))
            .map(|e| {
                let ids = self.inner.rules.identity.extract(&e);
                (e, ids)
            })
            .collect();
        let mut outcome = Applied {
            duplicates: total - candidates.len() as u32,
            ..Applied::default()
        };
        // Most batches hold no event applied before, so they skip looking their events up
        // and let the timeline's key tell; one that does is resolved again, looking first,
        // as is every batch for a while after it: redeliveries come in runs.
        let mut check = self.inner.look_up_applied_until.load(Ordering::Relaxed) > now_micros();
        loop {
            match self.apply_candidates(candidates, outcome, check).await? {
                Attempt::Applied(outcome) => return Ok(outcome),
                Attempt::SeenBefore(again, so_far) => {
                    let until = now_micros() + LOOK_UP_AFTER_REDELIVERY.as_micros() as i64;
                    self.inner
                        .look_up_applied_until
                        .store(until, Ordering::Relaxed);
                    (candidates, outcome, check) = (again, so_far, true);
                }
            }
        }
    }

    /// One attempt at applying `candidates` (distinct events with their identifiers);
    /// `outcome` holds what was counted before. Unless `check`, events applied before are
    /// only found when the timeline refuses them, and the attempt is rolled back.
    async fn apply_candidates(
        &self,
        candidates: Vec<(Event, Vec<Ident>)>,
        mut outcome: Applied,
        check: bool,
    ) -> Result<Attempt, ProfileError> {
        let event_ids: Vec<String> = if check {
            candidates.iter().map(|(e, _)| e.event_id.clone()).collect()
        } else {
            Vec::new()
        };
        let idents: Vec<Ident> = {
            let all: HashSet<&Ident> = candidates.iter().flat_map(|(_, ids)| ids).collect();
            all.into_iter().cloned().collect()
        };
        let mut applier = self.inner.applier.lock().await;
        let now = now_micros();
        let txn = self.inner.db.begin().await?;
        let (lock, done) = self.lock_applier_checking(&txn, &event_ids).await?;
        let epoch = lock.epoch;
        // Ingestion drops these too, but events committed before the erasure reached it
        // may still be in flight. The list is current: the lock just checked.
        let (_, suppressed) = self.suppressed();
        let mut fresh = Vec::with_capacity(candidates.len());
        for (event, ids) in candidates {
            if done.contains(&event.event_id) {
                outcome.duplicates += 1;
            } else if ids.iter().any(|id| suppressed.contains(id)) {
                outcome.suppressed += 1;
            } else {
                fresh.push((event, ids));
            }
        }
        if outcome.suppressed > 0 {
            tracing::info!(
                events = outcome.suppressed,
                "events of erased profiles dropped"
            );
        }
        let metrics = &self.inner.metrics;
        if fresh.is_empty() {
            txn.rollback().await?;
            metrics.delivered("duplicate", outcome.duplicates as usize);
            metrics.delivered("suppressed", outcome.suppressed as usize);
            return Ok(Attempt::Applied(outcome));
        }
        // Only an attempt that may be rolled back needs the order to resolve again in.
        let order: Vec<String> = if check {
            Vec::new()
        } else {
            fresh.iter().map(|(e, _)| e.event_id.clone()).collect()
        };
        // The batch resolves in the applier's memory itself; should it not commit, the
        // memory knows to forget everything at the next batch.
        let set = applier.begin(epoch);
        let unknown = set.unknown(&idents);
        set.add(store::load_owners(&txn, &unknown).await?);
        for (event, ids) in fresh {
            set.apply(&self.inner.rules, event, ids, now);
        }
        if !set.unattributed.is_empty() {
            tracing::warn!(
                events = set.unattributed.len(),
                "events without a usable identifier were not attributed"
            );
        }
        let transitions = self.evaluate_batch(set, now);
        // Each changed profile is encoded once, for its row and for the cache.
        let dirty: Vec<(&Record, Vec<u8>)> = set
            .dirty
            .iter()
            .filter_map(|id| set.records.get(id))
            .map(|record| (record, record.profile.encode_to_vec()))
            .collect();
        let taken = store::BatchWrite::new(set, &dirty, &self.inner.rules.emotion, now)
            .execute(&txn, &self.inner.consumers)
            .await?;
        if taken < set.applied.len() as u64 {
            if check {
                return Err(DbErr::Custom(
                    "the timeline refused events the applier found new under its lock".into(),
                )
                .into());
            }
            tracing::info!(
                events = set.applied.len() as u64 - taken,
                "batch holds events applied before; resolving it again"
            );
            txn.rollback().await?;
            // The memory, never told the batch committed, forgets it at the next batch.
            let again = self.resolve_again(order, set.take_batch());
            return Ok(Attempt::SeenBefore(again, outcome));
        }
        segments::save_transitions(&txn, &transitions, now).await?;
        for merge in &set.merges {
            store::drop_memberships(&txn, &merge.merged_id).await?;
        }
        // Should the commit fail, it may have happened all the same; only the database
        // knows now, and the memory, never told it committed, forgets everything.
        txn.commit().await?;
        let cache = CacheChanges::of(set, dirty);
        let batch = applier.committed(epoch);
        // The next batch may resolve while this one writes the cache: cached versions only
        // ever move forward, whichever write lands first.
        drop(applier);
        self.inner.wakeup.notify();
        outcome.applied = batch.applied.len() as u32;
        outcome.unattributed = batch.unattributed.len() as u32;
        metrics.delivered("applied", batch.applied.len());
        metrics.delivered("duplicate", outcome.duplicates as usize);
        metrics.delivered("suppressed", outcome.suppressed as usize);
        metrics.delivered("unattributed", batch.unattributed.len());
        metrics.emitted(
            batch
                .synthetic
                .iter()
                .map(|(event, _)| event)
                .chain(&batch.merged_away_exits),
        );
        // Answered after the cache write, so a caller reads its own writes.
        self.refresh_cache(cache).await;
        Ok(Attempt::Applied(outcome))
    }

    /// The events of a rolled-back attempt (`batch`), in their delivered `order`, with
    /// their identifiers, for the next attempt.
    fn resolve_again(&self, order: Vec<String>, batch: WorkingSet) -> Vec<(Event, Vec<Ident>)> {
        let mut by_id: HashMap<String, Event> = batch
            .applied
            .into_iter()
            .map(|(event, _)| event)
            .chain(batch.unattributed)
            .map(|event| (event.event_id.clone(), event))
            .collect();
        order
            .into_iter()
            .filter_map(|id| by_id.remove(&id))
            .map(|event| {
                let ids = self.inner.rules.identity.extract(&event);
                (event, ids)
            })
            .collect()
    }

    /// After a commit: newer versions into the cache (one round trip), merged-away
    /// profiles out of it.
    async fn refresh_cache(&self, changes: CacheChanges) {
        for (id, version) in &changes.merged {
            self.inner.cache.invalidate(id, *version, &[]).await;
        }
        let writes: Vec<CacheWrite<'_>> = changes
            .live
            .iter()
            .map(|(profile, state, moved)| CacheWrite {
                profile_id: &profile.profile_id,
                version: profile.version,
                encoded: state,
                identities: moved.iter().collect(),
            })
            .collect();
        self.inner.cache.put_encoded(&writes).await;
    }
}

/// How long deliveries look their events up first after one held events applied before.
const LOOK_UP_AFTER_REDELIVERY: Duration = Duration::from_secs(60);

/// The end of one attempt at a batch.
enum Attempt {
    Applied(Applied),
    /// It held events applied before and was rolled back: its events to resolve again,
    /// and the outcome counted so far.
    SeenBefore(Vec<(Event, Vec<Ident>)>, Applied),
}

/// What a committed batch must change in the cache, detached from the applier's memory so
/// the applier is released before the cache write.
struct CacheChanges {
    /// Live profiles: id and version, encoded state, and the identifiers the batch added
    /// or moved to them.
    live: Vec<(ProfileHead, Vec<u8>, Vec<Identity>)>,
    /// Profiles merged away, with their last version.
    merged: Vec<(String, u64)>,
}

/// The little of a profile the cache write needs besides its encoding.
struct ProfileHead {
    profile_id: String,
    version: u64,
}

impl CacheChanges {
    fn of(set: &WorkingSet, dirty: Vec<(&Record, Vec<u8>)>) -> Self {
        // The identifiers the batch added or moved, by the live profile now owning them:
        // few, so this costs nothing per identifier a profile already had.
        let mut moved: HashMap<String, Vec<Identity>> = HashMap::new();
        for ((id_type, value), owner) in &set.dirty_identities {
            moved
                .entry(set.live(owner).to_owned())
                .or_default()
                .push(Identity {
                    r#type: id_type.clone(),
                    value: value.clone(),
                });
        }
        let mut changes = CacheChanges {
            live: Vec::with_capacity(dirty.len()),
            merged: Vec::new(),
        };
        for (record, state) in dirty {
            let profile = &record.profile;
            if record.merged_into.is_some() {
                changes
                    .merged
                    .push((profile.profile_id.clone(), profile.version));
                continue;
            }
            let head = ProfileHead {
                profile_id: profile.profile_id.clone(),
                version: profile.version,
            };
            let moved = moved.remove(&profile.profile_id).unwrap_or_default();
            changes.live.push((head, state, moved));
        }
        changes
    }
}
