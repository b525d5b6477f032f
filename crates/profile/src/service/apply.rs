//! Delivery: a batch from a relay is applied in one transaction under the applier, which
//! serialises every writer of profiles (in process by its mutex, across replicas by the
//! `applier_epoch` row lock). Grouping concurrent deliveries into one transaction was
//! measured and gained nothing: the cost is per row, not per transaction.
//!
//! A batch normally resolves *ahead* (see [`crate::applier`]): under the mutex but before
//! the database lock, on top of batches still writing, so one batch's resolution overlaps
//! the previous one's statements and commit. It then takes the database lock behind them
//! and commits only if they did and nobody else wrote in between; otherwise it is
//! resolved again under the lock, as every batch was before.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use prost::Message;
use sea_orm::{DbErr, TransactionTrait};
use tokio::sync::MutexGuard;
use waymark_kit::time::{duration_micros, now_micros};
use waymark_profile_cache::CacheWrite;
use waymark_proto::common::v1::{Event, Identity};

use super::{Applied, ProfileError, Profiles, RejectedEvent, segments};
use crate::applier::{ApplierMemory, Reserved};
use crate::emotion::EmotionRules;
use crate::identity::Ident;
use crate::model::{address, is_addressed};
use crate::resolve::{Record, WorkingSet};
use crate::store;

impl Profiles {
    /// Applies a delivered batch: idempotent by event id, all or nothing but for the events
    /// it can never apply, which it lists as rejected instead of failing the batch.
    pub async fn apply(&self, events: Vec<Event>) -> Result<Applied, ProfileError> {
        let mut rejected = Vec::new();
        let events: Vec<Event> = events
            .into_iter()
            .enumerate()
            .filter_map(
                |(index, event)| match refusal(index, &event, &self.inner.rules.identity) {
                    Some(refusal) => {
                        rejected.push(refusal);
                        None
                    }
                    None => Some(event),
                },
            )
            .collect();
        let total = events.len() as u32;
        // Everything that needs no database runs before the applier is taken: the
        // serialised section is the critical path of every replica's batches.
        let mut seen = HashSet::new();
        let mut candidates: Vec<(Event, Vec<Ident>)> = events
            .into_iter()
            .filter(|e| seen.insert(e.event_id.clone()))
            .map(|e| {
                let (ids, dropped) = self.inner.rules.identity.extract_checked(&e);
                for d in &dropped {
                    self.inner.metrics.identifier_dropped(&d.id_type, d.rule);
                }
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
        let mut ahead = true;
        loop {
            let attempt = self
                .apply_candidates(candidates, outcome, check, ahead)
                .await?;
            match attempt {
                Attempt::Applied(outcome) => {
                    self.inner.metrics.delivered("rejected", rejected.len());
                    return Ok(Applied {
                        rejected,
                        ..outcome
                    });
                }
                Attempt::SeenBefore(again, so_far) => {
                    let until =
                        now_micros().saturating_add(duration_micros(LOOK_UP_AFTER_REDELIVERY));
                    self.inner
                        .look_up_applied_until
                        .store(until, Ordering::Relaxed);
                    (candidates, outcome, check) = (again, so_far, true);
                }
                Attempt::Stale(again, so_far) => (candidates, outcome) = (again, so_far),
            }
            ahead = false;
        }
    }

    /// One attempt at applying `candidates` (distinct events with their identifiers);
    /// `outcome` holds what was counted before. Unless `check`, events applied before are
    /// only found when the timeline refuses them, and the attempt is rolled back. With
    /// `ahead`, the attempt resolves ahead when the applier's memory allows it.
    async fn apply_candidates(
        &self,
        candidates: Vec<(Event, Vec<Ident>)>,
        outcome: Applied,
        check: bool,
        ahead: bool,
    ) -> Result<Attempt, ProfileError> {
        let idents: Vec<Ident> = {
            let all: HashSet<&Ident> = candidates.iter().flat_map(|(_, ids)| ids).collect();
            all.into_iter().cloned().collect()
        };
        let mut applier = self.inner.applier.lock().await;
        let epoch = if ahead && !check {
            applier.begin_ahead()
        } else {
            None
        };
        match epoch {
            Some(epoch) => {
                self.apply_ahead(applier, epoch, candidates, &idents, outcome)
                    .await
            }
            None => {
                self.settle_ahead(&mut applier).await;
                self.apply_under_lock(applier, candidates, &idents, outcome, check)
                    .await
            }
        }
    }

    /// Waits, holding the applier, until every batch resolved ahead has settled, and
    /// tells the memory how they ended, so it forgets the changes of any that failed.
    /// Whoever takes the database lock holding the applier does this first: the counter
    /// alone cannot tell that a batch in flight rolled back if another replica's write
    /// advanced it after.
    pub(crate) async fn settle_ahead(&self, applier: &mut ApplierMemory) {
        let mut all_committed = true;
        for mut stage in applier.unsettled() {
            all_committed &= stage.committed().await;
        }
        applier.settled(all_committed);
    }

    /// The applier, once no batch resolved ahead is still writing: for every writer of
    /// profiles that holds it through its own transaction.
    pub(crate) async fn exclusive_applier(&self) -> MutexGuard<'_, ApplierMemory> {
        let mut applier = self.inner.applier.lock().await;
        self.settle_ahead(&mut applier).await;
        applier
    }

    /// Resolves the batch ahead, in the applier's memory at `epoch` (the counter value it
    /// must find), then writes it behind the batches still writing.
    async fn apply_ahead(
        &self,
        mut applier: MutexGuard<'_, ApplierMemory>,
        epoch: i64,
        candidates: Vec<(Event, Vec<Ident>)>,
        idents: &[Ident],
        mut outcome: Applied,
    ) -> Result<Attempt, ProfileError> {
        let now = now_micros();
        // What the batch is evaluated against; the lock tells whether they are current.
        let definitions = self.definitions_generation();
        let (suppressions, suppressed) = self.suppressed();
        let (fresh, order) = self.drop_suppressed(candidates, &suppressed, &mut outcome, false);
        if fresh.is_empty() {
            applier.abandon();
            return Ok(self.nothing_to_apply(outcome));
        }
        // Identifiers the memory does not hold were not touched by the batches still
        // writing (theirs are all in memory), so the committed rows are current for them.
        let unknown = applier.set().unknown(idents);
        let (owners, apart) = store::load_owners(&self.inner.db, &unknown).await?;
        let set = applier.set();
        set.add(owners);
        set.keep_apart(apart);
        let prepared = self.resolve_batch(set, fresh, now);
        let Reserved {
            batch,
            mut ahead,
            settle,
        } = applier.reserve(epoch);
        drop(applier);

        // Queue behind the batch ahead at the database, never before it.
        if let Some(stage) = ahead.as_mut()
            && !stage.locked().await
        {
            return Ok(self.stale(order, batch, outcome));
        }
        let txn = self.inner.db.begin().await?;
        let (lock, _) = store::lock_applier(&txn, &[]).await?;
        settle.locked();
        let built_on_committed = match ahead.as_mut() {
            Some(stage) => stage.committed().await,
            None => true,
        };
        let current = built_on_committed
            && lock.epoch == epoch
            && lock.definitions == definitions
            && lock.suppressions == suppressions;
        if !current {
            txn.rollback().await?;
            tracing::debug!(
                epoch,
                found = lock.epoch,
                built_on_committed,
                "batch resolved ahead is stale; resolving it again under the lock"
            );
            return Ok(self.stale(order, batch, outcome));
        }
        let taken = prepared.write.execute(&txn, &self.inner.consumers).await?;
        if taken < batch.applied.len() as u64 {
            tracing::info!(
                events = batch.applied.len() as u64 - taken,
                "batch holds events applied before; resolving it again"
            );
            txn.rollback().await?;
            // The batches resolved on top of it see it failed and are resolved again too.
            let again = self.resolve_again(order, batch);
            return Ok(Attempt::SeenBefore(again, outcome));
        }
        segments::save_transitions(&txn, &prepared.transitions, now).await?;
        store::drop_memberships(&txn, &merged_away(&batch)).await?;
        // Should the commit fail, the batches on top of it take it as failed and start
        // from the database.
        txn.commit().await?;
        settle.committed();
        Ok(self.applied(batch, prepared.cache, outcome).await)
    }

    /// The events of `batch`, resolved ahead on a state that did not hold, to resolve
    /// again under the lock.
    fn stale(&self, order: Vec<String>, batch: WorkingSet, outcome: Applied) -> Attempt {
        Attempt::Stale(self.resolve_again(order, batch), outcome)
    }

    /// Leaves out the events of erased customers (counted in `outcome`); returns the
    /// others, with their ids in order when `check` is false (an attempt that may be
    /// rolled back needs them to resolve again).
    fn drop_suppressed(
        &self,
        candidates: Vec<(Event, Vec<Ident>)>,
        suppressed: &HashSet<Ident>,
        outcome: &mut Applied,
        check: bool,
    ) -> (Vec<(Event, Vec<Ident>)>, Vec<String>) {
        let mut fresh = Vec::with_capacity(candidates.len());
        let mut dropped = 0;
        // The list holds keyed hashes: an event's identifiers are hashed only when
        // there is anything to compare them with.
        let hasher = &self.inner.hasher;
        for (event, ids) in candidates {
            if !suppressed.is_empty()
                && ids.iter().any(|id| suppressed.contains(&hasher.hashed(id)))
            {
                dropped += 1;
            } else {
                fresh.push((event, ids));
            }
        }
        if dropped > 0 {
            outcome.suppressed += dropped;
            tracing::info!(events = dropped, "events of erased profiles dropped");
        }
        let order = if check {
            Vec::new()
        } else {
            fresh.iter().map(|(e, _)| e.event_id.clone()).collect()
        };
        (fresh, order)
    }

    /// Resolves `fresh` in `set` and computes everything the batch writes.
    fn resolve_batch(
        &self,
        set: &mut WorkingSet,
        fresh: Vec<(Event, Vec<Ident>)>,
        now: i64,
    ) -> Prepared {
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
        let write = batch_write(set, &dirty, &self.inner.rules.emotion, now);
        let cache = CacheChanges::of(set, dirty);
        Prepared {
            transitions,
            write,
            cache,
        }
    }

    /// A batch whose every event was a duplicate or an erased customer's: counts it.
    fn nothing_to_apply(&self, outcome: Applied) -> Attempt {
        let metrics = &self.inner.metrics;
        metrics.delivered("duplicate", outcome.duplicates as usize);
        metrics.delivered("suppressed", outcome.suppressed as usize);
        Attempt::Applied(outcome)
    }

    /// After a batch committed: counts it, wakes the relays, writes the cache.
    async fn applied(
        &self,
        batch: WorkingSet,
        cache: CacheChanges,
        mut outcome: Applied,
    ) -> Attempt {
        self.inner.wakeup.notify();
        let metrics = &self.inner.metrics;
        outcome.applied = batch.applied.len() as u32;
        outcome.unattributed = batch.unattributed.len() as u32;
        metrics.delivered("applied", batch.applied.len());
        metrics.delivered("duplicate", outcome.duplicates as usize);
        metrics.delivered("suppressed", outcome.suppressed as usize);
        metrics.delivered("unattributed", batch.unattributed.len());
        metrics.kept_apart(batch.kept_apart.len());
        for kept in &batch.kept_apart {
            let left_out: Vec<&str> = kept.left_out.iter().map(|(t, _)| t.as_str()).collect();
            tracing::info!(
                event_id = %kept.event_id,
                profile_id = %kept.profile_id,
                kept_apart = ?kept.apart,
                left_out = ?left_out,
                "event linked profiles an unmerge keeps apart; applied without merging"
            );
        }
        metrics.emitted(
            batch
                .synthetic
                .iter()
                .map(|(event, _)| event)
                .chain(&batch.merged_away_exits),
        );
        // Answered after the cache write, so a caller reads its own writes.
        self.refresh_cache(cache).await;
        Attempt::Applied(outcome)
    }

    /// Resolves and writes the batch holding the database lock throughout.
    async fn apply_under_lock(
        &self,
        mut applier: MutexGuard<'_, ApplierMemory>,
        mut candidates: Vec<(Event, Vec<Ident>)>,
        idents: &[Ident],
        mut outcome: Applied,
        check: bool,
    ) -> Result<Attempt, ProfileError> {
        let event_ids: Vec<String> = if check {
            candidates.iter().map(|(e, _)| e.event_id.clone()).collect()
        } else {
            Vec::new()
        };
        let now = now_micros();
        let txn = self.inner.db.begin().await?;
        let (lock, done) = self.lock_applier_checking(&txn, &event_ids).await?;
        let epoch = lock.epoch;
        if !done.is_empty() {
            candidates.retain(|(event, _)| !done.contains(&event.event_id));
            outcome.duplicates += done.len() as u32;
        }
        // Ingestion drops these too, but events committed before the erasure reached it
        // may still be in flight. The list is current: the lock just checked.
        let (_, suppressed) = self.suppressed();
        let (fresh, order) = self.drop_suppressed(candidates, &suppressed, &mut outcome, check);
        if fresh.is_empty() {
            txn.rollback().await?;
            return Ok(self.nothing_to_apply(outcome));
        }
        // The batch resolves in the applier's memory itself; should it not commit, the
        // memory knows to forget everything at the next batch.
        let set = applier.begin(epoch);
        let unknown = set.unknown(idents);
        let (owners, apart) = store::load_owners(&txn, &unknown).await?;
        set.add(owners);
        set.keep_apart(apart);
        let prepared = self.resolve_batch(set, fresh, now);
        let taken = prepared.write.execute(&txn, &self.inner.consumers).await?;
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
        segments::save_transitions(&txn, &prepared.transitions, now).await?;
        store::drop_memberships(&txn, &merged_away(set)).await?;
        // Should the commit fail, it may have happened all the same; only the database
        // knows now, and the memory, never told it committed, forgets everything.
        txn.commit().await?;
        let batch = applier.committed(epoch);
        // The next batch may resolve while this one writes the cache: cached versions only
        // ever move forward, whichever write lands first.
        drop(applier);
        Ok(self.applied(batch, prepared.cache, outcome).await)
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
        self.inner.cache.forget_identities(&changes.evicted).await;
    }
}

/// Why the event at `index` can never be applied, if it cannot: no event id, or an
/// identifier too long to index (ingestion refuses those, but other producers and rows
/// queued before its limits may still carry them).
fn refusal(
    index: usize,
    event: &Event,
    rules: &waymark_identity::IdentityRules,
) -> Option<RejectedEvent> {
    let refuse = |field: String, reason: String| RejectedEvent {
        index,
        event_id: event.event_id.clone(),
        field,
        reason,
    };
    if event.event_id.is_empty() {
        return Some(refuse(
            "event_id".into(),
            "is required: it is what makes a redelivered event apply only once".into(),
        ));
    }
    rules.oversized_identifier(event).map(|(field, length)| {
        refuse(
            field,
            format!(
                "is {length} bytes; identifiers are at most {} bytes",
                waymark_identity::MAX_IDENTIFIER_BYTES
            ),
        )
    })
}

/// What `set` writes; `dirty` holds its changed profiles, each with its encoded state.
fn batch_write(
    set: &WorkingSet,
    dirty: &[(&Record, Vec<u8>)],
    emotion: &EmotionRules,
    now_us: i64,
) -> store::BatchWrite {
    // Each applied event is encoded once: the timeline's copy is also what goes
    // downstream, unless a later merge in the batch moved it to another profile.
    let encoded: Vec<Vec<u8>> = set.applied.iter().map(|(e, _)| e.encode_to_vec()).collect();
    let rows = store::BatchRows {
        profiles: dirty
            .iter()
            .map(|(record, state)| store::ProfileRow {
                record,
                state: state.clone(),
                emotion_due_at: record.emotion_due(emotion),
            })
            .collect(),
        identities: set
            .dirty_identities
            .iter()
            .map(|(ident, owner)| (ident, set.live(owner)))
            .collect(),
        evicted: set.evicted.iter().cloned().collect(),
        moved: set
            .merges
            .iter()
            .map(|m| (set.live(&m.survivor_id).to_owned(), m.merged_id.clone()))
            .collect(),
        merges: &set.merges,
        apart_moved: set
            .apart_moved
            .iter()
            .map(|(merged, survivor)| (merged.clone(), set.live(survivor).to_owned()))
            .collect(),
        timeline: set
            .applied
            .iter()
            .zip(&encoded)
            .map(|((event, owner), bytes)| store::TimelineRow {
                event,
                owner: set.live(owner).to_owned(),
                origin: owner,
                encoded: bytes,
            })
            .collect(),
        outbox: downstream(set, &encoded),
    };
    store::BatchWrite::new(rows, now_us)
}

/// Every event `set` sends downstream, encoded: its applied events (`encoded`, in order),
/// then its synthetic events and the exits of profiles it merged away. Each is addressed
/// to its live profile, with that profile's user id.
fn downstream(set: &WorkingSet, encoded: &[Vec<u8>]) -> Vec<Vec<u8>> {
    // Copied and encoded again only when addressing changes it: most events already name
    // their live profile and its user id.
    let addressed = |event: &Event, owner: &str| -> Option<Vec<u8>> {
        let live = set.live(owner);
        let profile = &set.records.get(live)?.profile;
        if is_addressed(event, live, profile) {
            return None;
        }
        let mut event = event.clone();
        address(&mut event, live, profile);
        Some(event.encode_to_vec())
    };
    set.applied
        .iter()
        .zip(encoded)
        .map(|((event, origin), bytes)| addressed(event, origin).unwrap_or_else(|| bytes.clone()))
        .chain(
            set.synthetic.iter().map(|(event, owner)| {
                addressed(event, owner).unwrap_or_else(|| event.encode_to_vec())
            }),
        )
        .chain(set.merged_away_exits.iter().map(|event| {
            // About the merged profile itself, so it keeps that id; the user id is the
            // one customer's, now held by the survivor.
            let mut copy = event.clone();
            if let Some(survivor) = set.records.get(set.live(&event.profile_id)) {
                address(&mut copy, &event.profile_id, &survivor.profile);
            }
            copy.encode_to_vec()
        }))
        .collect()
}

/// The profiles a batch merged away.
fn merged_away(batch: &WorkingSet) -> Vec<String> {
    batch.merges.iter().map(|m| m.merged_id.clone()).collect()
}

/// How long deliveries look their events up first after one held events applied before.
const LOOK_UP_AFTER_REDELIVERY: Duration = Duration::from_secs(60);

/// The end of one attempt at a batch.
enum Attempt {
    Applied(Applied),
    /// It held events applied before and was rolled back: its events to resolve again,
    /// and the outcome counted so far.
    SeenBefore(Vec<(Event, Vec<Ident>)>, Applied),
    /// It was resolved ahead on a state that did not hold (a batch it built on failed,
    /// or another writer came first): its events to resolve again under the lock, and
    /// the outcome counted so far.
    Stale(Vec<(Event, Vec<Ident>)>, Applied),
}

/// What a resolved batch writes, to the database and then to the cache.
struct Prepared {
    transitions: Vec<segments::Transition>,
    write: store::BatchWrite,
    cache: CacheChanges,
}

/// What a committed batch must change in the cache, detached from the applier's memory so
/// the applier is released before the cache write.
struct CacheChanges {
    /// Live profiles: id and version, encoded state, and the identifiers the batch added
    /// or moved to them.
    live: Vec<(ProfileHead, Vec<u8>, Vec<Identity>)>,
    /// Profiles merged away, with their last version.
    merged: Vec<(String, u64)>,
    /// Identifiers their profiles gave up, whose keys go.
    evicted: Vec<(String, String)>,
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
            evicted: set.evicted.iter().cloned().collect(),
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
