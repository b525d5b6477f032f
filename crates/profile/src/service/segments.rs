//! Segments: definitions with CEL conditions, membership after every delivered batch for
//! each profile the batch changed, a background backfill for new definitions and a
//! periodic sweep for conditions that use `now`, with `Segment Entered` / `Segment
//! Exited` events downstream.
//!
//! Within one batch a profile's transitions collapse: a customer who enters and leaves a
//! segment inside the same delivery emits neither event.

use std::collections::HashSet;
use std::sync::Arc;

use sea_orm::{DatabaseTransaction, TransactionTrait};
use waymark_kit::time::{from_micros, now_micros};
use waymark_proto::common::v1::Event;
use waymark_proto::profile::v1::{Profile, Segment};

use super::privacy::page_size;
use super::{ProfileError, Profiles, invalid, notice, string_value};
use crate::emotion::{self, EmotionRules};
use crate::resolve::{Record, WorkingSet, emotion_change_fields};
use crate::segment::{SegmentDefinition, evaluate_memberships, validate_segment};
use crate::store::{self, MembershipChange, SegmentRow};

/// Profiles per sweep transaction: short enough not to hold up event delivery long.
const SWEEP_PAGE: u32 = 500;

/// One profile's membership change, for the index and the downstream events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Transition {
    pub profile_id: String,
    pub entered: Vec<String>,
    pub exited: Vec<String>,
}

/// The API view of a stored segment.
pub(crate) fn segment_message(row: SegmentRow) -> Segment {
    Segment {
        segment_id: row.segment_id,
        name: row.name,
        description: row.description,
        condition: row.condition,
        created_at: Some(from_micros(row.created_at)),
        updated_at: Some(from_micros(row.updated_at)),
        member_count: row.member_count,
        backfilled: row.backfilled_generation >= row.generation,
    }
}

fn segment_event(name: &str, profile_id: &str, segment: &str, label: &str, now_us: i64) -> Event {
    notice(
        name,
        profile_id,
        [
            ("segment_id", string_value(segment)),
            ("segment_name", string_value(label)),
        ],
        now_us,
    )
}

/// Re-evaluates `only` (or every segment when `None`) for `profile`, updating its
/// membership list. Segments outside `only` keep their membership.
pub(super) fn reevaluate(
    profile: &mut Profile,
    definitions: &[SegmentDefinition],
    only: Option<&HashSet<String>>,
    now_us: i64,
    emotion: &EmotionRules,
) -> Option<Transition> {
    let membership = match only {
        Some(ids) => {
            let chosen: Vec<SegmentDefinition> = definitions
                .iter()
                .filter(|d| ids.contains(&d.segment_id))
                .cloned()
                .collect();
            evaluate_memberships(profile, &chosen, now_us, emotion)
        }
        None => evaluate_memberships(profile, definitions, now_us, emotion),
    };
    if membership.entered.is_empty() && membership.exited.is_empty() {
        return None;
    }
    profile.segments = membership.members;
    Some(Transition {
        profile_id: profile.profile_id.clone(),
        entered: membership.entered,
        exited: membership.exited,
    })
}

/// Compiles stored definitions. A stored condition that no longer compiles is logged and
/// left out rather than stopping the service.
fn compile(rows: Vec<SegmentRow>) -> Vec<SegmentDefinition> {
    let mut compiled = Vec::with_capacity(rows.len());
    for row in rows {
        let message = segment_message(row);
        match validate_segment(&message) {
            Ok(definition) => compiled.push(definition),
            Err((field, problem)) => tracing::error!(
                segment_id = %message.segment_id,
                field,
                problem,
                "stored segment does not compile; skipped"
            ),
        }
    }
    compiled
}

/// The compiled definitions a replica evaluates, with the generation they were loaded at.
pub(crate) struct Definitions {
    generation: i64,
    compiled: Arc<Vec<SegmentDefinition>>,
}

impl Default for Definitions {
    /// Nothing loaded yet: below every stored generation, so the first lock loads them.
    fn default() -> Self {
        Self {
            generation: -1,
            compiled: Arc::default(),
        }
    }
}

impl Profiles {
    /// The compiled definitions in force.
    pub(crate) fn definitions(&self) -> Arc<Vec<SegmentDefinition>> {
        self.inner
            .segments
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .compiled
            .clone()
    }

    /// The generation of the definitions in force.
    pub(crate) fn definitions_generation(&self) -> i64 {
        self.inner
            .segments
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .generation
    }

    /// Reloads the definitions at `generation` through `txn`, which holds the applier
    /// lock: no definition can change until it ends.
    pub(crate) async fn reload_segments_at(
        &self,
        txn: &DatabaseTransaction,
        generation: i64,
    ) -> Result<(), ProfileError> {
        self.install_segments(generation, compile(store::segments(txn).await?));
        Ok(())
    }

    /// Loads and compiles every stored definition. A stored condition that no longer
    /// compiles is logged and left out rather than stopping the service.
    pub async fn reload_segments(&self) -> Result<(), ProfileError> {
        // The generation first: rows read after it are at least that new.
        let generation = store::definitions_generation(&self.inner.db).await?;
        let compiled = compile(store::segments(&self.inner.db).await?);
        self.install_segments(generation, compiled);
        Ok(())
    }

    /// Installs definitions unless newer ones are installed already (reloads may finish
    /// out of order).
    fn install_segments(&self, generation: i64, compiled: Vec<SegmentDefinition>) {
        let mut installed = self
            .inner
            .segments
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if generation >= installed.generation {
            *installed = Definitions {
                generation,
                compiled: Arc::new(compiled),
            };
        }
    }

    /// Evaluates every segment for each live profile a batch changed: updates their
    /// membership lists and queues `Segment Entered` / `Segment Exited`. A profile merged
    /// away exits all its segments; the survivor is evaluated on its own, so every
    /// profile id's stream of entries and exits stays whole downstream.
    pub(crate) fn evaluate_batch(&self, set: &mut WorkingSet, now_us: i64) -> Vec<Transition> {
        let definitions = self.definitions();
        let mut transitions = Vec::new();
        let mut merged_away = Vec::new();
        for id in &set.dirty {
            let Some(record) = set.records.get_mut(id) else {
                continue;
            };
            if record.merged_into.is_some() {
                if !record.profile.segments.is_empty() {
                    merged_away.push(Transition {
                        profile_id: id.clone(),
                        entered: Vec::new(),
                        exited: std::mem::take(&mut record.profile.segments),
                    });
                }
                continue;
            }
            if definitions.is_empty() && record.profile.segments.is_empty() {
                continue;
            }
            if let Some(t) = reevaluate(
                &mut record.profile,
                &definitions,
                None,
                now_us,
                &self.inner.rules.emotion,
            ) {
                transitions.push(t);
            }
        }
        for t in &transitions {
            set.synthetic
                .extend(transition_events(t, &definitions, now_us));
        }
        for t in &merged_away {
            set.merged_away_exits.extend(
                transition_events(t, &definitions, now_us)
                    .into_iter()
                    .map(|(event, _)| event),
            );
        }
        transitions.extend(merged_away);
        transitions
    }

    /// Evaluates every segment for one profile changed outside event delivery; returns the
    /// transition (if any) and its events.
    pub(crate) fn evaluate_profile(
        &self,
        profile: &mut Profile,
        now_us: i64,
    ) -> (Vec<Transition>, Vec<Event>) {
        let definitions = self.definitions();
        match reevaluate(
            profile,
            &definitions,
            None,
            now_us,
            &self.inner.rules.emotion,
        ) {
            Some(t) => {
                let events = transition_events(&t, &definitions, now_us)
                    .into_iter()
                    .map(|(event, _)| event)
                    .collect();
                (vec![t], events)
            }
            None => (Vec::new(), Vec::new()),
        }
    }

    /// Creates or replaces a segment; membership follows in the background.
    pub async fn put_segment(&self, segment: Segment) -> Result<Segment, ProfileError> {
        let definition = validate_segment(&segment)
            .map_err(|(field, problem)| invalid(request_field(field), problem))?;
        let now = now_micros();
        let txn = waymark_kit::db::begin_write(&self.inner.db).await?;
        if store::segment(&txn, &definition.segment_id)
            .await?
            .is_none()
            && store::has_members(&txn, &definition.segment_id).await?
        {
            return Err(ProfileError::FailedPrecondition(format!(
                "segment {:?} is still being deleted: call DeleteSegment again to finish",
                definition.segment_id
            )));
        }
        store::put_segment(
            &txn,
            &SegmentRow {
                segment_id: definition.segment_id.clone(),
                name: segment.name,
                description: segment.description,
                condition: segment.condition,
                created_at: now,
                updated_at: now,
                generation: 0,
                backfilled_generation: 0,
                member_count: 0,
            },
            now,
        )
        .await?;
        store::bump_definitions(&txn).await?;
        txn.commit().await?;
        self.reload_segments().await?;
        self.inner.segments_changed.notify_one();
        tracing::info!(segment_id = %definition.segment_id, time_based = definition.time_based, "segment stored");
        self.get_segment(&definition.segment_id).await
    }

    /// One segment.
    pub async fn get_segment(&self, segment_id: &str) -> Result<Segment, ProfileError> {
        if segment_id.is_empty() {
            return Err(invalid("segment_id", "is required"));
        }
        store::segment(&self.inner.db, segment_id)
            .await?
            .map(segment_message)
            .ok_or_else(|| ProfileError::NotFound(format!("no segment {segment_id:?}")))
    }

    /// Every segment.
    pub async fn list_segments(&self) -> Result<Vec<Segment>, ProfileError> {
        Ok(store::segments(&self.inner.db)
            .await?
            .into_iter()
            .map(segment_message)
            .collect())
    }

    /// A page of members and the next page token.
    pub async fn segment_members(
        &self,
        segment_id: &str,
        page_size_requested: u32,
        page_token: &str,
    ) -> Result<(Vec<String>, String), ProfileError> {
        let limit = page_size(page_size_requested)?;
        self.get_segment(segment_id).await?;
        let mut ids = store::members(&self.inner.db, segment_id, page_token, limit + 1).await?;
        let next = if ids.len() > limit as usize {
            ids.truncate(limit as usize);
            ids.last().cloned().unwrap_or_default()
        } else {
            String::new()
        };
        Ok((ids, next))
    }

    /// Deletes a segment; every member exits it. The definition goes first, in a
    /// transaction of its own, so no replica evaluates it any more; then the members exit
    /// a page at a time, each page in its own transaction under the applier, which is
    /// released between pages: deliveries never wait for a whole membership. Should it
    /// stop half-way, the segment is gone but some profiles still list it; calling it
    /// again finishes the job.
    pub async fn delete_segment(&self, segment_id: &str) -> Result<u64, ProfileError> {
        if segment_id.is_empty() {
            return Err(invalid("segment_id", "is required"));
        }
        let name = {
            let _guard = self.exclusive_applier().await;
            let txn = self.inner.db.begin().await?;
            self.lock_applier(&txn).await?;
            match store::segment(&txn, segment_id).await? {
                Some(row) => {
                    store::delete_segment(&txn, segment_id).await?;
                    store::bump_definitions(&txn).await?;
                    txn.commit().await?;
                    row.name
                }
                // A deletion that stopped half-way: its members still exit.
                None if store::has_members(&txn, segment_id).await? => {
                    txn.rollback().await?;
                    String::new()
                }
                None => return Err(ProfileError::NotFound(format!("no segment {segment_id:?}"))),
            }
        };
        self.reload_segments().await?;
        let mut exited = 0;
        loop {
            let _guard = self.exclusive_applier().await;
            let now = now_micros();
            let txn = self.inner.db.begin().await?;
            self.lock_applier(&txn).await?;
            // Each page leaves the index, so the next one starts from the beginning.
            let ids = store::members(&txn, segment_id, "", SWEEP_PAGE).await?;
            if ids.is_empty() {
                txn.rollback().await?;
                break;
            }
            let mut records = store::load_records(&txn, &ids).await?;
            let mut events = Vec::with_capacity(records.len());
            for record in &mut records {
                record.profile.segments.retain(|s| s != segment_id);
                record.profile.version += 1;
                record.profile.updated_at = Some(from_micros(now));
                events.push(segment_event(
                    "Segment Exited",
                    &record.profile.profile_id,
                    segment_id,
                    &name,
                    now,
                ));
            }
            store::drop_members(&txn, segment_id, &ids).await?;
            self.commit_page(txn, &records, &[], &mut events, now)
                .await?;
            exited += records.len() as u64;
        }
        tracing::info!(segment_id, exited, "segment deleted");
        Ok(exited)
    }

    /// Moves the emotion labels that decay has carried across a threshold since their last
    /// signal, page by page: each emits `Emotion Changed` (signal kind `decay`) and has its
    /// segments re-evaluated. Returns the number of profiles whose label moved.
    pub async fn settle_emotions(&self) -> Result<usize, ProfileError> {
        let rules = &self.inner.rules.emotion;
        // One instant for the whole pass; pages follow ids, so each due profile is seen once.
        let now = now_micros();
        let mut settled = 0;
        let mut after = String::new();
        loop {
            let _guard = self.exclusive_applier().await;
            let txn = self.inner.db.begin().await?;
            self.lock_applier(&txn).await?;
            let page = store::emotion_due(&txn, now, &after, SWEEP_PAGE).await?;
            let Some(last) = page.last() else {
                txn.rollback().await?;
                break;
            };
            after = last.profile.profile_id.clone();
            let definitions = self.definitions();
            let mut records = Vec::with_capacity(page.len());
            let mut transitions = Vec::new();
            let mut events = Vec::new();
            for mut record in page {
                let profile = &mut record.profile;
                if let Some(change) = profile
                    .emotion
                    .as_mut()
                    .and_then(|e| emotion::settle(e, now, rules))
                {
                    settled += 1;
                    events.push(notice(
                        "Emotion Changed",
                        &profile.profile_id,
                        emotion_change_fields(&change),
                        now,
                    ));
                    if let Some(t) = reevaluate(profile, &definitions, None, now, rules) {
                        events.extend(
                            transition_events(&t, &definitions, now)
                                .into_iter()
                                .map(|(event, _)| event),
                        );
                        transitions.push(t);
                    }
                }
                // Rewritten even when floating point left the label a hair short of its
                // threshold: the due time is recomputed, and the next pass settles it.
                profile.version += 1;
                profile.updated_at = Some(from_micros(now));
                records.push(record);
            }
            self.commit_page(txn, &records, &transitions, &mut events, now)
                .await?;
        }
        Ok(settled)
    }

    /// Computes membership of every segment that awaits its backfill or uses `now`, and
    /// slides windowed aggregates, for every live profile, page by page. A profile whose
    /// aggregates moved is evaluated for every segment. Returns the number of profiles
    /// that changed.
    pub async fn sweep_segments(&self) -> Result<usize, ProfileError> {
        // The generation first: rows read after it are at least that new.
        let generation = store::definitions_generation(&self.inner.db).await?;
        let rows = store::segments(&self.inner.db).await?;
        // Compiled from the very rows whose generations it marks backfilled: definitions
        // installed a moment earlier or later could belong to another generation.
        let definitions = compile(rows.clone());
        let pending: Vec<&SegmentRow> = rows
            .iter()
            .filter(|r| r.backfilled_generation < r.generation)
            .collect();
        let mut due: HashSet<String> = pending.iter().map(|r| r.segment_id.clone()).collect();
        due.extend(
            definitions
                .iter()
                .filter(|d| d.time_based)
                .map(|d| d.segment_id.clone()),
        );
        let specs = &self.inner.rules.aggregates;
        let windowed = specs.iter().any(|s| s.window.is_some());
        if due.is_empty() && !windowed {
            return Ok(0);
        }
        let mut changed = 0;
        let mut after = String::new();
        loop {
            let _guard = self.exclusive_applier().await;
            let now = now_micros();
            let txn = self.inner.db.begin().await?;
            let (lock, _) = self.lock_applier_checking(&txn, &[]).await?;
            if lock.definitions != generation {
                // A segment changed or went since these definitions were read: evaluating
                // them now could put members back into a deleted segment. The change
                // wakes the sweep again, with the definitions as they are; until then
                // nothing is marked backfilled, as the pages after this one were not
                // evaluated.
                txn.rollback().await?;
                return Ok(changed);
            }
            let mut page = store::live_profiles(&txn, &after, SWEEP_PAGE).await?;
            let Some(last) = page.last() else {
                txn.rollback().await?;
                break;
            };
            after = last.profile.profile_id.clone();
            let mut records: Vec<Record> = Vec::new();
            let mut transitions = Vec::new();
            for mut record in page.drain(..) {
                let slid = windowed && record.refresh_aggregates(specs, now);
                let only = (!slid).then_some(&due);
                let transition = reevaluate(
                    &mut record.profile,
                    &definitions,
                    only,
                    now,
                    &self.inner.rules.emotion,
                );
                if slid || transition.is_some() {
                    record.profile.version += 1;
                    record.profile.updated_at = Some(from_micros(now));
                    transitions.extend(transition);
                    records.push(record);
                }
            }
            let mut events = events_of(&transitions, &definitions, now);
            self.commit_page(txn, &records, &transitions, &mut events, now)
                .await?;
            changed += records.len();
        }
        for row in pending {
            store::mark_backfilled(&self.inner.db, &row.segment_id, row.generation).await?;
        }
        Ok(changed)
    }

    /// Resolves when a definition changed, so the backfill starts at once.
    pub async fn segments_changed(&self) {
        self.inner.segments_changed.notified().await;
    }
}

/// The events of `transitions`, in order.
pub(super) fn events_of(
    transitions: &[Transition],
    definitions: &[SegmentDefinition],
    now_us: i64,
) -> Vec<Event> {
    transitions
        .iter()
        .flat_map(|t| transition_events(t, definitions, now_us))
        .map(|(event, _)| event)
        .collect()
}

/// The events of one transition, each with the profile it belongs to.
pub(super) fn transition_events(
    t: &Transition,
    definitions: &[SegmentDefinition],
    now_us: i64,
) -> Vec<(Event, String)> {
    let name_of = |id: &str| {
        definitions
            .iter()
            .find(|d| d.segment_id == id)
            .map(|d| d.name.clone())
            .unwrap_or_default()
    };
    let entered = t.entered.iter().map(|s| ("Segment Entered", s));
    let exited = t.exited.iter().map(|s| ("Segment Exited", s));
    entered
        .chain(exited)
        .map(|(name, segment)| {
            (
                segment_event(name, &t.profile_id, segment, &name_of(segment), now_us),
                t.profile_id.clone(),
            )
        })
        .collect()
}

impl Profiles {
    /// Commits a sweep's page of changed profiles (their rows, membership index and
    /// events), then wakes the relays, counts the events and writes the cache.
    pub(super) async fn commit_page(
        &self,
        txn: DatabaseTransaction,
        records: &[Record],
        transitions: &[Transition],
        events: &mut [Event],
        now_us: i64,
    ) -> Result<(), ProfileError> {
        let inner = &self.inner;
        let (consumers, emotion) = (&inner.consumers, &inner.rules.emotion);
        save_changed(
            &txn,
            consumers,
            emotion,
            records,
            transitions,
            events,
            now_us,
        )
        .await?;
        txn.commit().await?;
        if !events.is_empty() {
            inner.wakeup.notify();
            inner.metrics.emitted(&*events);
        }
        let profiles: Vec<&Profile> = records.iter().map(|r| &r.profile).collect();
        inner.cache.put_many(&profiles).await;
        Ok(())
    }
}

/// Writes profiles changed outside event delivery, their index rows and their events.
async fn save_changed(
    txn: &DatabaseTransaction,
    consumers: &[String],
    emotion: &EmotionRules,
    records: &[Record],
    transitions: &[Transition],
    events: &mut [Event],
    now_us: i64,
) -> Result<(), ProfileError> {
    let refs: Vec<&Record> = records.iter().collect();
    super::save_profiles(txn, &refs, emotion, now_us).await?;
    save_transitions(txn, transitions, now_us).await?;
    let profiles: Vec<&Profile> = records.iter().map(|r| &r.profile).collect();
    super::emit(txn, consumers, events, &profiles).await?;
    Ok(())
}

/// Mirrors transitions into the membership index.
pub(crate) async fn save_transitions(
    txn: &DatabaseTransaction,
    transitions: &[Transition],
    now_us: i64,
) -> Result<(), sea_orm::DbErr> {
    let changes: Vec<MembershipChange<'_>> = transitions
        .iter()
        .map(|t| MembershipChange {
            profile_id: &t.profile_id,
            entered: &t.entered,
            exited: &t.exited,
        })
        .collect();
    store::save_memberships(txn, &changes, now_us).await
}

/// The request field a segment validation problem is about.
fn request_field(field: &str) -> &'static str {
    match field {
        "segment_id" => "segment.segment_id",
        "name" => "segment.name",
        "description" => "segment.description",
        "condition" => "segment.condition",
        _ => "segment",
    }
}
