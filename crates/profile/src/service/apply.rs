//! Delivery: a batch from a relay is applied in one transaction under the applier, which
//! serialises every writer of profiles (in process by its mutex, across replicas by the
//! `applier_epoch` row lock). Grouping concurrent deliveries into one transaction was
//! measured and gained nothing: the cost is per row, not per transaction.

use std::collections::HashSet;

use sea_orm::TransactionTrait;
use waymark_kit::db::now_micros;
use waymark_proto::common::v1::Event;

use super::{Applied, ProfileError, Profiles, invalid, segments};
use crate::identity::Ident;
use crate::resolve::WorkingSet;
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
        // Ingestion drops these too, but events committed before the erasure reached it
        // may still be in flight. The list is current: the lock just checked.
        let (_, suppressed) = self.suppressed();
        let mut outcome = Applied {
            duplicates: total - candidates.len() as u32,
            ..Applied::default()
        };
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
            return Ok(outcome);
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
        outcome.applied = set.applied.len() as u32;
        outcome.unattributed = set.unattributed as u32;
        metrics.delivered("applied", set.applied.len());
        metrics.delivered("duplicate", outcome.duplicates as usize);
        metrics.delivered("suppressed", outcome.suppressed as usize);
        metrics.delivered("unattributed", set.unattributed);
        metrics.emitted(
            set.synthetic
                .iter()
                .map(|(event, _)| event)
                .chain(&set.merged_away_exits),
        );
        // Answered after the cache write, so a caller reads its own writes.
        self.refresh_cache(&set).await;
        Ok(outcome)
    }

    /// After a commit: newer versions into the cache (one round trip), with the keys of
    /// the identifiers the batch added or moved; merged-away profiles out of it.
    async fn refresh_cache(&self, set: &WorkingSet) {
        let mut live = Vec::with_capacity(set.dirty.len());
        for record in set.dirty.iter().filter_map(|id| set.records.get(id)) {
            match &record.merged_into {
                None => {
                    let id = &record.profile.profile_id;
                    let moved = record
                        .profile
                        .identities
                        .iter()
                        .filter(|i| {
                            set.dirty_identities
                                .get(&(i.r#type.clone(), i.value.clone()))
                                .is_some_and(|owner| set.live(owner) == *id)
                        })
                        .collect();
                    live.push((&record.profile, moved));
                }
                Some(_) => {
                    self.inner
                        .cache
                        .invalidate(&record.profile.profile_id, record.profile.version, &[])
                        .await
                }
            }
        }
        self.inner.cache.put_changed(&live).await;
    }
}
