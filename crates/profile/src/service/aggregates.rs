//! Aggregates added to or changed in the configuration count each profile's history, not
//! just the events after the change.
//!
//! The database remembers, per aggregate name, the definition (fingerprint) it was last
//! computed for (`aggregate_specs`). At start-up [`Profiles::reconcile_aggregates`] marks
//! new and changed aggregates, and configured ones that are gone, as not backfilled; the
//! background then goes through every profile a page at a time
//! ([`Profiles::backfill_aggregates`]), each page in its own transaction under the
//! applier, which is released between pages. For each live profile it replays the stored
//! timeline into the aggregates due and replaces their state with the result, drops
//! removed aggregates, and re-evaluates segments when the values moved. The last profile
//! id done is committed with each page, so an interrupted backfill resumes after it; an
//! aggregate is marked backfilled only in the transaction that finds no profile left.
//!
//! Why events applied meanwhile are counted exactly once: deliveries observe the new
//! definition from start-up on. A profile's page holds the applier, so no event reaches it
//! half-way; the page reads the timeline after taking it, so it sees every event applied
//! before, and it *replaces* what deliveries counted so far rather than adding to it.
//! Events after the page are observed on top of the full history. A merge during the
//! backfill of a profile already done with one not yet done would add only the latter's
//! recent count: so a page also rebuilds the live survivor of each profile in it that was
//! merged away since the backfill started (its timeline holds both sides' events).

use std::collections::HashSet;

use sea_orm::TransactionTrait;

use waymark_kit::time::{from_micros, now_micros};
use waymark_proto::profile::v1::AggregateStatus;

use super::segments::{events_of, reevaluate};
use super::{ProfileError, Profiles};
use crate::aggregate::AggregateSpec;
use crate::resolve::{AggregateReplay, Record, entry_time_us};
use crate::store::{self, AggregateRow};

/// Profiles per backfill transaction: each is replayed from its whole timeline, so fewer
/// than a segment sweep takes.
pub const AGGREGATE_BACKFILL_PAGE: u32 = 100;
/// Stored events a backfill transaction replays at most (a profile with more goes alone).
pub const AGGREGATE_BACKFILL_EVENTS: u64 = 20_000;
/// Timeline events read per query while replaying one profile.
const HISTORY_PAGE: u32 = 1000;
/// How far another replica's clock may run behind or ahead of this one's when it stamps
/// a merge or creates a profile.
const MERGE_CLOCK_MARGIN_US: i64 = 600 * 1_000_000;

impl Profiles {
    /// At start-up: compares the configured aggregates with the definitions the database
    /// remembers. A new or changed one is recorded as not backfilled, from the first
    /// profile; one no longer configured as removed, to be dropped from every profile.
    /// Returns how many await their backfill.
    pub async fn reconcile_aggregates(&self) -> Result<usize, ProfileError> {
        let _guard = self.exclusive_applier().await;
        let now = now_micros();
        let txn = self.inner.db.begin().await?;
        self.lock_applier(&txn).await?;
        let rows = store::aggregate_rows(&txn).await?;
        let specs = &self.inner.rules.aggregates;
        let restart = |name: &str, definition: String, removed: bool| AggregateRow {
            name: name.to_owned(),
            definition,
            removed,
            backfilled: false,
            done_through: String::new(),
            profiles_done: 0,
            started_at: now,
        };
        let mut pending = 0;
        for spec in specs {
            let definition = spec.fingerprint();
            match rows.iter().find(|r| r.name == spec.name) {
                Some(row) if !row.removed && row.definition == definition => {
                    pending += usize::from(!row.backfilled);
                }
                found => {
                    tracing::info!(
                        aggregate = %spec.name,
                        changed = found.is_some(),
                        "aggregate to backfill from the stored timelines"
                    );
                    store::put_aggregate_row(&txn, &restart(&spec.name, definition, false)).await?;
                    pending += 1;
                }
            }
        }
        for row in rows
            .iter()
            .filter(|r| !specs.iter().any(|s| s.name == r.name))
        {
            if !row.removed {
                tracing::info!(aggregate = %row.name, "aggregate removed; dropping it from profiles");
                store::put_aggregate_row(&txn, &restart(&row.name, row.definition.clone(), true))
                    .await?;
            }
            // A removed aggregate's row goes once no profile holds it.
            pending += 1;
        }
        txn.commit().await?;
        Ok(pending)
    }

    /// Backfills one page of at most `page_size` profiles, and of no more than
    /// `page_events` stored events unless its first profile alone has more, for every
    /// aggregate this replica is configured for whose backfill is pending. A page holds the
    /// applier while it replays, so both bounds are what deliveries may wait. Returns false
    /// once there is nothing left to do (the aggregates are then marked backfilled, removed
    /// ones forgotten).
    pub async fn backfill_aggregates(
        &self,
        page_size: u32,
        page_events: u64,
    ) -> Result<bool, ProfileError> {
        let specs = &self.inner.rules.aggregates;
        let _guard = self.exclusive_applier().await;
        let now = now_micros();
        let txn = self.inner.db.begin().await?;
        self.lock_applier(&txn).await?;
        // Read under the lock: another replica may be backfilling the same aggregates, a
        // page at a time too; each page goes on from wherever the last one ended.
        let mut rows: Vec<AggregateRow> = store::aggregate_rows(&txn)
            .await?
            .into_iter()
            .filter(|r| !r.backfilled && configured_as(specs, r))
            .collect();
        let Some(after) = rows.iter().map(|r| r.done_through.clone()).min() else {
            txn.rollback().await?;
            return Ok(false);
        };
        // A profile created after the backfill began has had every event observed under
        // the new definitions: it needs no replay, and skipping it lets the backfill end
        // under steady traffic. The margin covers replica clocks that run ahead.
        let started = rows.iter().map(|r| r.started_at).min().unwrap_or(now);
        let created_before = started.saturating_add(MERGE_CLOCK_MARGIN_US);
        let mut page = store::profiles_after(&txn, &after, created_before, page_size).await?;
        let ids: Vec<String> = page.iter().map(|r| r.profile.profile_id.clone()).collect();
        let sizes = store::timeline_sizes(&txn, &ids).await?;
        let mut events = 0;
        let within = page
            .iter()
            .position(|r| {
                events += sizes.get(&r.profile.profile_id).copied().unwrap_or(0);
                events > page_events
            })
            .unwrap_or(page.len())
            .max(1);
        page.truncate(within);
        let Some(last) = page.last().map(|r| r.profile.profile_id.clone()) else {
            for row in &mut rows {
                if row.removed {
                    store::delete_aggregate_row(&txn, &row.name).await?;
                } else {
                    row.backfilled = true;
                    store::put_aggregate_row(&txn, row).await?;
                }
            }
            txn.commit().await?;
            let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
            tracing::info!(aggregates = ?names, "aggregate backfill finished");
            return Ok(false);
        };
        // The aggregates to replay, each with the last profile its backfill finished.
        let replayed: Vec<(&str, &AggregateSpec)> = rows
            .iter()
            .filter(|r| !r.removed)
            .filter_map(|r| {
                Some((
                    r.done_through.as_str(),
                    specs.iter().find(|s| s.name == r.name)?,
                ))
            })
            .collect();
        let due = |id: &str| -> Vec<AggregateSpec> {
            replayed
                .iter()
                .filter(|(done_through, _)| *done_through < id)
                .map(|(_, spec)| (*spec).clone())
                .collect()
        };
        let mut targets: Vec<(Record, Vec<AggregateSpec>)> = Vec::new();
        let mut merged = Vec::new();
        for record in page.iter().cloned() {
            let id = record.profile.profile_id.clone();
            if record.merged_into.is_some() {
                merged.push(id);
            } else if rows.iter().any(|r| r.done_through < id) {
                targets.push((record, due(&id)));
            }
        }
        let since = rows.iter().map(|r| r.started_at).min().unwrap_or(now) - MERGE_CLOCK_MARGIN_US;
        let mut survivors = HashSet::new();
        for merged_id in store::merged_since(&txn, &merged, since).await? {
            if let Some(live) = store::load_live(&txn, &merged_id).await?
                && survivors.insert(live.profile.profile_id.clone())
            {
                // Its whole history, whatever its own place in the backfill.
                let all: Vec<AggregateSpec> =
                    replayed.iter().map(|(_, spec)| (*spec).clone()).collect();
                match targets
                    .iter_mut()
                    .find(|(r, _)| r.profile.profile_id == live.profile.profile_id)
                {
                    Some(target) => target.1 = all,
                    None => targets.push((live, all)),
                }
            }
        }

        let definitions = self.definitions();
        let emotion = &self.inner.rules.emotion;
        let (mut records, mut transitions) = (Vec::new(), Vec::new());
        for (mut record, due) in targets {
            let mut replay = AggregateReplay::new(due.clone());
            if !due.is_empty() {
                let mut at = (i64::MIN, String::new());
                loop {
                    let events =
                        store::history_page(&txn, &record.profile.profile_id, &at, HISTORY_PAGE)
                            .await?;
                    for event in &events {
                        replay.observe(event);
                    }
                    match events.last() {
                        Some(e) if events.len() == HISTORY_PAGE as usize => {
                            at = (entry_time_us(e), e.event_id.clone());
                        }
                        _ => break,
                    }
                }
            }
            let installed = record.install_replay(replay, specs, now);
            let transition = if installed.values {
                reevaluate(&mut record.profile, &definitions, None, now, emotion)
            } else {
                None
            };
            if installed.state || transition.is_some() {
                record.profile.version += 1;
                record.profile.updated_at = Some(from_micros(now));
                transitions.extend(transition);
                records.push(record);
            }
        }
        for row in &mut rows {
            if row.done_through < last {
                let done = page
                    .iter()
                    .filter(|r| r.profile.profile_id > row.done_through)
                    .count();
                row.profiles_done += done as u64;
                row.done_through.clone_from(&last);
                store::put_aggregate_row(&txn, row).await?;
            }
        }
        let mut events = events_of(&transitions, &definitions, now);
        self.commit_page(txn, &records, &transitions, &mut events, now)
            .await?;
        Ok(true)
    }

    /// Every aggregate the database remembers, by name, with its backfill.
    pub async fn aggregate_status(&self) -> Result<Vec<AggregateStatus>, ProfileError> {
        Ok(store::aggregate_rows(&self.inner.db)
            .await?
            .into_iter()
            .map(|r| AggregateStatus {
                name: r.name,
                definition: r.definition,
                removed: r.removed,
                backfilled: r.backfilled,
                profiles_backfilled: r.profiles_done,
            })
            .collect())
    }
}

/// Whether this replica's configuration is what `row` is to be backfilled for: the same
/// definition, or, for a removed aggregate, none. Replicas configured otherwise (during a
/// change of configuration) leave it to the others.
fn configured_as(specs: &[AggregateSpec], row: &AggregateRow) -> bool {
    let spec = specs.iter().find(|s| s.name == row.name);
    match (row.removed, spec) {
        (true, spec) => spec.is_none(),
        (false, Some(spec)) => spec.fingerprint() == row.definition,
        (false, None) => false,
    }
}
