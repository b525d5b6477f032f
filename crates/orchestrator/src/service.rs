//! The orchestrator's core: applies delivered events to journeys (entries, exits, goals,
//! waits), fires due waits, dispatches outbound actions, and answers the admin API. Each
//! change is one transaction holding the enrollments, their steps, the actions they
//! decided and the step events for analytics, so a step happens exactly when it commits.

mod admin;
mod catalog;
mod dispatch;
mod simulate;
mod timers;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use prost_types::value::Kind;
use sea_orm::{DatabaseConnection, DbErr};
use tokio::sync::Notify;
use waymark_kit::outbox::Wakeup;
use waymark_profile_cache::ProfileCache;
use waymark_proto::common::v1::{DeliverResponse, Event, EventType, RejectedEvent};
use waymark_proto::profile::v1::Profile;

pub use catalog::Catalog;
pub use dispatch::Peers;

use crate::engine::{self, Effects, Env, Facts};
use crate::journey::{Journey, Reentry};
use crate::model::{Enrollment, StepRecord};
use crate::store::{self, Changed, EntryHistory};

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum OrchestratorError {
    #[error("invalid {field}: {problem}")]
    Invalid { field: String, problem: String },
    /// A journey with problems; each names its node and field.
    #[error("the journey has {} problems", .0.len())]
    InvalidJourney(Vec<crate::journey::Problem>),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl From<DbErr> for OrchestratorError {
    fn from(e: DbErr) -> Self {
        if waymark_kit::db::is_unavailable(&e) {
            OrchestratorError::Unavailable(e.to_string())
        } else {
            OrchestratorError::Internal(e.to_string())
        }
    }
}

/// `Invalid` naming `field`.
pub(crate) fn invalid(field: &str, problem: impl Into<String>) -> OrchestratorError {
    OrchestratorError::Invalid {
        field: field.to_owned(),
        problem: problem.into(),
    }
}

/// Where time comes from: the system clock, or one that tests move by hand.
#[derive(Clone, Default)]
pub struct Clock(Option<Arc<AtomicI64>>);

impl Clock {
    /// A clock stopped at `now_us` that only [`Clock::advance`] moves.
    pub fn manual(now_us: i64) -> Clock {
        Clock(Some(Arc::new(AtomicI64::new(now_us))))
    }

    pub fn now_us(&self) -> i64 {
        match &self.0 {
            Some(t) => t.load(Ordering::SeqCst),
            None => waymark_kit::time::now_micros(),
        }
    }

    /// Moves a manual clock on; the system clock cannot be moved.
    pub fn advance(&self, by: std::time::Duration) {
        if let Some(t) = &self.0 {
            t.fetch_add(waymark_kit::time::duration_micros(by), Ordering::SeqCst);
        }
    }
}

/// The orchestrator's settings.
#[derive(Clone)]
pub struct Settings {
    pub emotion: waymark_profile::emotion::EmotionRules,
    /// Attempts of an outbound action before it fails for good.
    pub max_attempts: u32,
    /// How long a claimed timer or action is held before another replica may take it.
    pub lease_us: i64,
    /// How long ids of applied events are kept to skip redeliveries.
    pub dedupe_window_us: i64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            emotion: waymark_profile::emotion::EmotionRules::default(),
            max_attempts: 8,
            lease_us: 30_000_000,
            dedupe_window_us: 7 * 86_400_000_000,
        }
    }
}

/// The orchestrator, cheap to clone.
#[derive(Clone)]
pub struct Orchestrator {
    inner: Arc<Inner>,
}

struct Inner {
    db: DatabaseConnection,
    cache: ProfileCache,
    peers: Peers,
    catalog: Catalog,
    clock: Clock,
    settings: Settings,
    consumers: Vec<String>,
    relay: Wakeup,
    timers: Notify,
    actions: Notify,
    /// Pending actions this replica just committed, claimed for it: the dispatcher sends
    /// them without claiming them again.
    handoff: tokio::sync::mpsc::UnboundedSender<Vec<store::ActionRow>>,
    handed: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Vec<store::ActionRow>>>>,
    metrics: crate::metrics::Metrics,
}

/// How long a claim loop sleeps: until `next_due` (microseconds), at most `idle`.
fn sleep_until(
    next_due: Option<i64>,
    now_us: i64,
    idle: std::time::Duration,
) -> std::time::Duration {
    next_due.map_or(idle, |due| {
        let wait = due.saturating_sub(now_us).max(0);
        std::time::Duration::from_micros(u64::try_from(wait).unwrap_or(0)).min(idle)
    })
}

/// The step events of a run, by name: what analytics reads.
fn step_event_name(outcome: &str) -> &'static str {
    match outcome {
        "entered" => "Journey Entered",
        "goal" => "Journey Goal Reached",
        "exited" | "completed" => "Journey Exited",
        "suppressed" => "Message Suppressed",
        "errored" => "Journey Errored",
        _ => "Journey Step",
    }
}

fn string(s: &str) -> prost_types::Value {
    prost_types::Value {
        kind: Some(Kind::StringValue(s.to_owned())),
    }
}

impl Orchestrator {
    pub fn new(
        db: DatabaseConnection,
        cache: ProfileCache,
        peers: Peers,
        clock: Clock,
        settings: Settings,
        consumers: Vec<String>,
        relay: Wakeup,
    ) -> Orchestrator {
        let (handoff, handed) = tokio::sync::mpsc::unbounded_channel();
        Orchestrator {
            inner: Arc::new(Inner {
                handoff,
                handed: std::sync::Mutex::new(Some(handed)),
                catalog: Catalog::new(db.clone()),
                db,
                cache,
                peers,
                clock,
                settings,
                consumers,
                relay,
                timers: Notify::new(),
                actions: Notify::new(),
                metrics: crate::metrics::Metrics::new(),
            }),
        }
    }

    pub fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    fn now(&self) -> i64 {
        self.inner.clock.now_us()
    }

    fn db(&self) -> &DatabaseConnection {
        &self.inner.db
    }

    /// Loads the journeys and the contact policy before serving.
    pub async fn prepare(&self) -> Result<(), OrchestratorError> {
        self.inner.catalog.reload().await?;
        Ok(())
    }

    /// The step events of `steps` for analytics, each carrying its profile.
    fn step_events(
        &self,
        steps: &[StepRecord],
        enrollments: &HashMap<&str, &Enrollment>,
    ) -> Vec<Vec<u8>> {
        let now = waymark_kit::time::from_micros(self.now());
        steps
            .iter()
            .filter_map(|s| {
                let e = enrollments.get(s.enrollment_id.as_str())?;
                let mut fields: std::collections::BTreeMap<String, prost_types::Value> = [
                    ("journey_id", e.journey_id.as_str()),
                    ("enrollment_id", e.enrollment_id.as_str()),
                    ("node_id", s.node_id.as_str()),
                    ("outcome", s.outcome.as_str()),
                    ("decision", s.decision.as_str()),
                    ("key", e.key.as_str()),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), string(v)))
                .collect();
                fields.insert(
                    "version".into(),
                    prost_types::Value {
                        kind: Some(Kind::NumberValue(f64::from(e.version))),
                    },
                );
                fields.insert(
                    "detail".into(),
                    prost_types::Value {
                        kind: Some(Kind::StructValue(waymark_proto::json::struct_from_json(
                            s.detail.clone(),
                        ))),
                    },
                );
                let mut event = Event {
                    event_id: uuid::Uuid::now_v7().to_string(),
                    message_id: format!("{}:{}", s.enrollment_id, s.seq),
                    event: step_event_name(&s.outcome).to_owned(),
                    user_id: e.user_id.clone(),
                    profile_id: e.profile_id.clone(),
                    properties: Some(prost_types::Struct { fields }),
                    timestamp: Some(waymark_kit::time::from_micros(s.at)),
                    received_at: Some(now),
                    source_id: "orchestrator".into(),
                    ..Event::default()
                };
                event.set_type(EventType::Track);
                Some(prost::Message::encode_to_vec(&event))
            })
            .collect()
    }

    /// Commits one run: the enrollments it changed, their effects and step events.
    async fn commit_run(
        &self,
        txn: &sea_orm::DatabaseTransaction,
        changed: &[Changed<'_>],
        fx: &Effects,
    ) -> Result<(), DbErr> {
        let now = self.now();
        store::write_run(
            txn,
            changed,
            fx,
            now,
            now.saturating_add(self.inner.settings.lease_us),
        )
        .await?;
        let by_id: HashMap<&str, &Enrollment> = changed
            .iter()
            .map(|c| (c.enrollment.enrollment_id.as_str(), c.enrollment))
            .collect();
        let events = self.step_events(&fx.steps, &by_id);
        let payloads: Vec<&[u8]> = events.iter().map(Vec::as_slice).collect();
        waymark_kit::outbox::enqueue(txn, &self.inner.consumers, &payloads).await
    }

    /// After a commit: wake whoever has new work.
    fn after_commit(&self, changed: &[Changed<'_>], fx: &Effects) {
        self.inner.metrics.steps(&fx.steps);
        if !fx.steps.is_empty() {
            self.inner.relay.notify();
        }
        let now = self.now();
        let fresh: Vec<store::ActionRow> = fx
            .actions
            .iter()
            .filter(|a| a.status == crate::model::ActionStatus::Pending)
            .map(|a| store::ActionRow::claimed(a, now))
            .collect();
        if !fresh.is_empty() {
            // The receiver lives as long as the service; were it gone, the lease would end
            // and any replica would claim these.
            let _ = self.inner.handoff.send(fresh);
        }
        if fx
            .action_updates
            .iter()
            .any(|u| u.status == crate::model::ActionStatus::Pending)
        {
            self.inner.actions.notify_one();
        }
        if changed.iter().any(|c| c.enrollment.waiting_until.is_some()) {
            self.inner.timers.notify_one();
        }
    }

    /// Profiles, from the shared cache, else from the profile service; a profile found
    /// nowhere runs as an empty one (no traits, no consent).
    async fn profiles(&self, ids: &[String]) -> HashMap<String, Profile> {
        let mut found = self.inner.cache.get_many(ids).await;
        let missing: Vec<String> = ids
            .iter()
            .filter(|id| !found.contains_key(*id))
            .cloned()
            .collect();
        if !missing.is_empty() {
            for p in self.inner.peers.fetch_profiles(&missing).await {
                found.insert(p.profile_id.clone(), p);
            }
        }
        for id in ids {
            found.entry(id.clone()).or_insert_with(|| Profile {
                profile_id: id.clone(),
                ..Profile::default()
            });
        }
        found
    }

    /// What the engine needs about `ids`, loaded together. Profiles come from
    /// `prefetched` (read before the transaction began, so no network call holds it
    /// open), else from the cache or the profile service.
    async fn facts(
        &self,
        conn: &impl sea_orm::ConnectionTrait,
        ids: &[String],
        mut prefetched: HashMap<String, Profile>,
        env: &Env<'_>,
    ) -> Result<HashMap<String, Facts>, DbErr> {
        let missing: Vec<String> = ids
            .iter()
            .filter(|id| !prefetched.contains_key(*id))
            .cloned()
            .collect();
        if !missing.is_empty() {
            prefetched.extend(self.profiles(&missing).await);
        }
        let since = env.now_us.saturating_sub(env.policy.lookback_us());
        let mut contacts = store::contacts_since(conn, ids, since).await?;
        let open = store::open_cases(conn, ids).await?;
        Ok(ids
            .iter()
            .filter_map(|id| {
                let p = prefetched.remove(id)?;
                let c = contacts.remove(id).unwrap_or_default();
                Some((id.clone(), Facts::new(p, c, open.contains(id), env)))
            })
            .collect())
    }

    /// Applies delivered events: each once, in order per profile. An event without an id
    /// cannot be applied once, so it is rejected alone.
    #[tracing::instrument(skip_all, fields(events = events.len()))]
    pub async fn deliver(&self, events: Vec<Event>) -> Result<DeliverResponse, OrchestratorError> {
        let rejected: Vec<RejectedEvent> = events
            .iter()
            .enumerate()
            .filter(|(_, e)| e.event_id.is_empty())
            .map(|(i, _)| RejectedEvent {
                index: u32::try_from(i).unwrap_or(u32::MAX),
                event_id: String::new(),
                field: "event_id".into(),
                reason: "is required: events are applied once by their id".into(),
            })
            .collect();
        let events: Vec<Event> = events
            .into_iter()
            .filter(|e| !e.event_id.is_empty())
            .collect();
        let mut attempt = 0;
        loop {
            match self.try_deliver(&events).await {
                Err(DbErr::RecordNotUpdated) if attempt < 5 => attempt += 1,
                result => {
                    let mut response = result?;
                    response.rejected = rejected;
                    return Ok(response);
                }
            }
        }
    }

    async fn try_deliver(&self, events: &[Event]) -> Result<DeliverResponse, DbErr> {
        self.inner.catalog.refresh_if_stale().await?;
        let now = self.now();
        let policy = self.inner.catalog.policy();
        let env = Env {
            now_us: now,
            policy: &policy,
            emotion: self.inner.settings.emotion,
        };
        // Profiles of events that may enter or move a journey, read before the
        // transaction so that no cache miss holds it open.
        let snapshot = self.inner.catalog.snapshot();
        let mut interesting: Vec<String> = events
            .iter()
            .filter(|e| !e.profile_id.is_empty() && snapshot.is_listened(&e.event))
            .map(|e| e.profile_id.clone())
            .collect();
        interesting.sort();
        interesting.dedup();
        let prefetched = self.profiles(&interesting).await;

        let txn = waymark_kit::db::begin_write(self.db()).await?;
        let ids: Vec<String> = events.iter().map(|e| e.event_id.clone()).collect();
        let fresh = store::mark_applied(&txn, &ids, now).await?;
        let mut seen = HashSet::new();
        let events: Vec<&Event> = events
            .iter()
            .filter(|e| fresh.contains(&e.event_id) && seen.insert(e.event_id.as_str()))
            .collect();
        let duplicates = ids.len() - events.len();

        // Identity changes first: a merge moves enrollments to the survivor.
        let mut erased = Vec::new();
        let mut survivors: HashSet<String> = HashSet::new();
        for e in &events {
            match e.event.as_str() {
                "Profile Merged" => {
                    let p = e.properties.as_ref();
                    let get = |k: &str| {
                        p.and_then(|p| waymark_proto::json::string_at(p, &[k]))
                            .unwrap_or_default()
                    };
                    let (merged, survivor) = (get("merged_profile_id"), get("survivor_profile_id"));
                    if !merged.is_empty() && !survivor.is_empty() {
                        store::repoint_profile(&txn, merged, survivor).await?;
                        survivors.insert(survivor.to_owned());
                    }
                }
                "Profile Deleted" => {
                    erased.push(e.profile_id.clone());
                    if let Some(Kind::ListValue(l)) = e
                        .properties
                        .as_ref()
                        .and_then(|p| p.fields.get("erased_profile_ids"))
                        .and_then(|v| v.kind.clone())
                    {
                        erased.extend(l.values.iter().filter_map(|v| match &v.kind {
                            Some(Kind::StringValue(s)) => Some(s.clone()),
                            _ => None,
                        }));
                    }
                }
                _ => {}
            }
        }
        if !erased.is_empty() {
            store::erase_profiles(&txn, &erased).await?;
        }
        let erased: HashSet<String> = erased.into_iter().collect();

        let catalog = snapshot;
        let mut profile_ids: Vec<String> = events
            .iter()
            .filter(|e| !e.profile_id.is_empty() && !erased.contains(&e.profile_id))
            .map(|e| e.profile_id.clone())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        profile_ids.sort();
        let active = store::active_for(&txn, &profile_ids).await?;
        let versions = self
            .inner
            .catalog
            .versions_for(
                &active
                    .iter()
                    .map(|e| (e.journey_id.clone(), e.version))
                    .collect::<Vec<_>>(),
            )
            .await?;
        let mut by_profile: HashMap<String, Vec<(Enrollment, Option<i64>)>> = HashMap::new();
        for e in active {
            let seq = e.seq;
            by_profile
                .entry(e.profile_id.clone())
                .or_default()
                .push((e, Some(seq)));
        }
        let mut fx = Effects::default();
        for survivor in &survivors {
            if let Some(list) = by_profile.get_mut(survivor) {
                end_merged_duplicates(list, &versions, now, &mut fx);
            }
        }

        // Only profiles that can enter a journey or move one on need their facts.
        let mut needed: HashSet<&str> = HashSet::new();
        let mut candidates: HashSet<String> = HashSet::new();
        for e in &events {
            if erased.contains(&e.profile_id) || e.profile_id.is_empty() {
                continue;
            }
            let entries = catalog.entries(&e.event);
            if !entries.is_empty() {
                needed.insert(&e.profile_id);
                candidates.extend(entries.iter().map(|j| j.journey_id.clone()));
            }
            let listened = by_profile.get(&e.profile_id).is_some_and(|list| {
                list.iter().any(|(en, _)| {
                    versions
                        .get(&(en.journey_id.clone(), en.version))
                        .is_some_and(|j| {
                            j.listens_to.contains(&e.event) || e.event == "Trait Changed"
                        })
                })
            });
            if listened {
                needed.insert(&e.profile_id);
            }
        }
        let applied = u32::try_from(events.len()).unwrap_or(u32::MAX);
        let duplicates = u32::try_from(duplicates).unwrap_or(u32::MAX);
        if needed.is_empty() && fx.steps.is_empty() {
            txn.commit().await?;
            return Ok(DeliverResponse {
                applied,
                duplicates,
                ..DeliverResponse::default()
            });
        }
        let needed: Vec<String> = needed.into_iter().map(str::to_owned).collect();
        let mut facts = self.facts(&txn, &needed, prefetched, &env).await?;
        let candidates: Vec<String> = candidates.into_iter().collect();
        let mut history = EntryBook::new(store::entry_history(&txn, &needed, &candidates).await?);

        for event in &events {
            let Some(f) = facts.get_mut(&event.profile_id) else {
                continue;
            };
            let list = by_profile.entry(event.profile_id.clone()).or_default();
            // Enrollments first (those an earlier event of the batch made included), then
            // entries: the event that enrolls a profile does not also move it on.
            for (enrollment, _) in list.iter_mut() {
                let journey = versions
                    .get(&(enrollment.journey_id.clone(), enrollment.version))
                    .cloned()
                    .or_else(|| catalog.version(&enrollment.journey_id, enrollment.version));
                if let Some(journey) = journey {
                    let paused = catalog.is_paused(&enrollment.journey_id);
                    engine::on_event(&journey, enrollment, event, paused, f, &env, &mut fx);
                }
            }
            for journey in catalog.entries(&event.event) {
                if let Some(enrollment) =
                    self.try_enter(journey, event, f, &env, &mut fx, &mut history)
                {
                    list.push((enrollment, None));
                }
            }
        }
        let changed: Vec<Changed> = by_profile
            .values()
            .flatten()
            .filter(|(e, loaded)| Some(e.seq) != *loaded)
            .map(|(e, loaded)| Changed {
                enrollment: e,
                loaded_seq: *loaded,
            })
            .collect();
        self.commit_run(&txn, &changed, &fx).await?;
        txn.commit().await?;
        self.after_commit(&changed, &fx);
        Ok(DeliverResponse {
            applied,
            duplicates,
            ..DeliverResponse::default()
        })
    }

    /// Enrolls the event's profile in `journey` when its trigger, re-entry rule and
    /// concurrency cap allow.
    fn try_enter(
        &self,
        journey: &Journey,
        event: &Event,
        facts: &mut Facts,
        env: &Env<'_>,
        fx: &mut Effects,
        history: &mut EntryBook,
    ) -> Option<Enrollment> {
        match engine::matches(&journey.entry.trigger, event, None, facts) {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => {
                tracing::debug!(journey = %journey.journey_id, error = %e, "entry condition failed");
                return None;
            }
        }
        let key = match &journey.entry.key_property {
            None => String::new(),
            Some(p) => engine::event_key(event, p)?,
        };
        let profile_id = facts.profile.profile_id.clone();
        if !history.admits(journey, &profile_id, &key, env.now_us) {
            return None;
        }
        let enrollment = engine::enter(journey, event, &key, facts, env, fx);
        history.entered(
            journey,
            &profile_id,
            &key,
            enrollment.is_active(),
            env.now_us,
        );
        self.inner.metrics.entered(&journey.journey_id);
        Some(enrollment)
    }
}

/// How profiles have been in journeys, per entry key: what re-entry rules and caps read,
/// kept up to date as a delivery enrolls.
#[derive(Default)]
pub(crate) struct EntryBook {
    by_key: HashMap<(String, String, String), EntryHistory>,
    /// Active enrollments per (profile, journey), over every key.
    active: HashMap<(String, String), i64>,
}

impl EntryBook {
    pub(crate) fn new(history: Vec<EntryHistory>) -> EntryBook {
        let mut book = EntryBook::default();
        for h in history {
            *book
                .active
                .entry((h.profile_id.clone(), h.journey_id.clone()))
                .or_default() += h.active;
            book.by_key.insert(
                (
                    h.profile_id.clone(),
                    h.journey_id.clone(),
                    h.entry_key.clone(),
                ),
                h,
            );
        }
        book
    }

    /// Whether the re-entry rule and the concurrency cap let `profile_id` enter `journey`
    /// with `key` at `now_us`. One enrollment per key at a time; an unkeyed journey that
    /// is always re-entered runs several at once, up to its cap.
    pub(crate) fn admits(
        &self,
        journey: &Journey,
        profile_id: &str,
        key: &str,
        now_us: i64,
    ) -> bool {
        let active_in_journey = self
            .active
            .get(&(profile_id.to_owned(), journey.journey_id.clone()))
            .copied()
            .unwrap_or(0);
        let h = self.by_key.get(&(
            profile_id.to_owned(),
            journey.journey_id.clone(),
            key.to_owned(),
        ));
        let allowed = match (journey.entry.reentry, h) {
            (_, None) => true,
            (Reentry::Once, Some(h)) => h.total == 0,
            (Reentry::Always, _) => true,
            (Reentry::AfterExit, Some(h)) => h.active == 0,
            (Reentry::AfterCooldown(c), Some(h)) => {
                h.active == 0 && now_us.saturating_sub(h.last_entered) >= c
            }
        };
        let keyed = journey.entry.key_property.is_some();
        let under_cap = active_in_journey < i64::from(journey.entry.max_concurrent)
            && h.is_none_or(|h| {
                h.active == 0 || (!keyed && journey.entry.reentry == Reentry::Always)
            });
        allowed && under_cap
    }

    /// Records an entry.
    pub(crate) fn entered(
        &mut self,
        journey: &Journey,
        profile_id: &str,
        key: &str,
        active: bool,
        now_us: i64,
    ) {
        let entry = self
            .by_key
            .entry((
                profile_id.to_owned(),
                journey.journey_id.clone(),
                key.to_owned(),
            ))
            .or_insert_with(|| EntryHistory {
                profile_id: profile_id.to_owned(),
                journey_id: journey.journey_id.clone(),
                entry_key: key.to_owned(),
                active: 0,
                total: 0,
                last_entered: 0,
            });
        entry.total += 1;
        entry.last_entered = now_us;
        if active {
            entry.active += 1;
            *self
                .active
                .entry((profile_id.to_owned(), journey.journey_id.clone()))
                .or_default() += 1;
        }
    }
}

/// After a merge, the survivor may hold two active enrollments that are one customer's
/// place in one journey (same journey and key): the one that entered first goes on, the
/// other exits, so that the customer is not messaged twice for one step.
fn end_merged_duplicates(
    list: &mut [(Enrollment, Option<i64>)],
    versions: &HashMap<(String, u32), Arc<Journey>>,
    now_us: i64,
    fx: &mut Effects,
) {
    list.sort_by_key(|(e, _)| e.entered_at);
    let mut kept: HashSet<(String, String)> = HashSet::new();
    for (e, _) in list.iter_mut() {
        // An unkeyed journey that is always re-entered holds several on purpose.
        let concurrent = versions
            .get(&(e.journey_id.clone(), e.version))
            .is_some_and(|j| j.entry.key_property.is_none() && j.entry.reentry == Reentry::Always);
        if concurrent || kept.insert((e.journey_id.clone(), e.key.clone())) {
            continue;
        }
        engine::end(
            e,
            crate::model::Status::Exited,
            "merged into another enrollment of the same customer",
            now_us,
            fx,
        );
    }
}
