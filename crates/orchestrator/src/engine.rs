//! The journey engine: moves one enrollment through its journey's steps when it enters,
//! when an event arrives, when its wait falls due, or when its webhook settles. It is pure:
//! it reads the facts the service loaded (the profile, its recent contacts, open cases)
//! and writes what happened into [`Effects`], which the service commits in one
//! transaction. Nothing here touches a network or a database, so every decision is
//! unit-tested and a step is applied exactly when its transaction commits.

use std::collections::BTreeMap;

use chrono_tz::Tz;
use serde_json::{Map, Value as Json, json};
use sha2::{Digest, Sha256};
use waymark_condition::{Condition, Value, Variables};
use waymark_kit::time::micros;
use waymark_proto::common::v1::Event;
use waymark_proto::json::struct_to_json;
use waymark_proto::profile::v1::Profile;

use crate::journey::{DelayUntil, Journey, Matcher, Step, TraitValue};
use crate::model::{
    Action, ActionKind, ActionStatus, Case, Contact, Enrollment, Status, StepRecord, Waiting,
};
use crate::policy::{self, Decision, Policy};
use crate::schedule;

/// The most steps one run takes without waiting; compilation refuses loops without a
/// wait, so only a very long straight path reaches it.
pub const MAX_STEPS_PER_RUN: usize = 64;

/// What the engine knows about one profile while it runs: loaded once per profile per
/// batch, and updated as steps act (a message sent counts towards the next cap check).
pub struct Facts {
    pub profile: Profile,
    /// The condition variables set so far: the profile's are converted only when a
    /// condition first reads them, `event` and `enrollment` per evaluation.
    vars: Variables,
    profile_vars: Vec<&'static str>,
    /// The profile as templates see it, made when a template first needs it.
    template_profile: Option<Json>,
    pub time_zone: Option<Tz>,
    pub emotion_label: String,
    emotion_score: f64,
    pub contacts: Vec<Contact>,
    pub open_case: bool,
    /// What `vars` holds as `event` and `enrollment` now (event id; enrollment id and step),
    /// so that evaluating many conditions on one event converts it once.
    event_set: Option<String>,
    enrollment_set: Option<(String, i64)>,
    now_us: i64,
    emotion: waymark_profile::emotion::EmotionRules,
}

impl Facts {
    /// The facts of `profile` at `now_us`.
    pub fn new(profile: Profile, contacts: Vec<Contact>, open_case: bool, env: &Env<'_>) -> Facts {
        let (emotion_score, label) = profile.emotion.as_ref().map_or((0.0, ""), |e| {
            let (score, label) = waymark_profile::emotion::current(e, env.now_us, &env.emotion);
            (score, waymark_profile::emotion::label_name(label))
        });
        let time_zone = profile
            .traits
            .as_ref()
            .and_then(|t| t.fields.get("timezone"))
            .and_then(|v| match &v.kind {
                Some(prost_types::value::Kind::StringValue(tz)) => {
                    schedule::parse_time_zone(tz).ok()
                }
                _ => None,
            });
        Facts {
            vars: Variables::new(),
            profile_vars: Vec::new(),
            template_profile: None,
            time_zone,
            emotion_label: label.to_owned(),
            emotion_score,
            contacts,
            open_case,
            profile,
            event_set: None,
            enrollment_set: None,
            now_us: env.now_us,
            emotion: env.emotion,
        }
    }

    /// Sets the profile's variables that `condition` reads and are not set yet.
    fn prepare(&mut self, condition: &Condition) {
        for name in waymark_profile::segment::VARIABLES {
            if !condition.uses(name) || self.profile_vars.contains(&name) {
                continue;
            }
            if let Some(value) =
                waymark_profile::segment::variable(&self.profile, name, self.now_us, &self.emotion)
            {
                self.vars.set(name, value);
            }
            self.profile_vars.push(name);
        }
    }

    /// The profile as templates see it.
    fn template_profile(&mut self) -> &Json {
        let (profile, label, score) = (&self.profile, &self.emotion_label, self.emotion_score);
        self.template_profile.get_or_insert_with(|| {
            json!({
                "profile_id": profile.profile_id,
                "traits": profile.traits.as_ref().map(struct_to_json).unwrap_or_default(),
                "emotion": { "label": label, "score": score },
            })
        })
    }

    /// A trait's value when it is a string.
    fn trait_text(&self, name: &str) -> Option<&str> {
        match &self.profile.traits.as_ref()?.fields.get(name)?.kind {
            Some(prost_types::value::Kind::StringValue(s)) => Some(s),
            _ => None,
        }
    }

    fn consent(&self, key: &str) -> Option<bool> {
        self.profile
            .consents
            .iter()
            .find(|c| format!("{}/{}", c.channel, c.purpose) == key)
            .map(|c| c.granted)
    }

    /// The user id to name the customer by: the profile's, else the event's.
    fn user_id<'a>(&'a self, event: Option<&'a Event>) -> Option<&'a str> {
        self.identifier("user_id")
            .or_else(|| event.map(|e| e.user_id.as_str()).filter(|u| !u.is_empty()))
    }

    fn identifier(&self, id_type: &str) -> Option<&str> {
        self.profile
            .identities
            .iter()
            .find(|i| i.r#type == id_type)
            .map(|i| i.value.as_str())
    }
}

/// The settings a run reads.
pub struct Env<'a> {
    pub now_us: i64,
    pub policy: &'a Policy,
    pub emotion: waymark_profile::emotion::EmotionRules,
}

/// What runs decided, for the service to commit.
#[derive(Debug, Default)]
pub struct Effects {
    pub steps: Vec<StepRecord>,
    pub actions: Vec<Action>,
    /// Deferred actions that are now due (pending), suppressed or deferred again.
    pub action_updates: Vec<ActionUpdate>,
    pub cases: Vec<Case>,
}

/// A deferred message decided again when its quiet hours end.
#[derive(Debug, Clone, PartialEq)]
pub struct ActionUpdate {
    pub action_id: String,
    pub status: ActionStatus,
    pub reason: String,
    pub due_at: i64,
    /// Rendered again, with what the profile is now.
    pub payload: Json,
    /// The message goes now and counts towards contact caps.
    pub counts_as_contact: bool,
}

/// The `event` variable of conditions.
pub fn event_value(event: &Event) -> Value {
    let map = |s: &Option<prost_types::Struct>| {
        s.as_ref().map_or_else(
            || Value::Map(BTreeMap::new()),
            waymark_profile::segment::struct_value,
        )
    };
    let mut m = BTreeMap::from([
        ("name".to_owned(), Value::String(event.event.clone())),
        ("properties".to_owned(), map(&event.properties)),
        ("context".to_owned(), map(&event.context)),
        (
            "channel".to_owned(),
            Value::String(waymark_profile::segment::channel_name(event.channel)),
        ),
    ]);
    if let Some(t) = event.timestamp.as_ref().or(event.received_at.as_ref()) {
        m.insert("timestamp".to_owned(), Value::Timestamp(micros(t)));
    }
    Value::Map(m)
}

/// The key property of `event`, as text; `None` when the event does not carry it.
pub fn event_key(event: &Event, property: &str) -> Option<String> {
    let v = event.properties.as_ref()?.fields.get(property)?;
    match waymark_proto::json::value_to_json(v) {
        Json::String(s) if !s.is_empty() => Some(s),
        Json::Number(n) => Some(n.to_string()),
        Json::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Where a stable draw for `profile_id` at a random split falls, in [0, 1): a hash of
/// (journey, node, profile, salt), the same in every version and every replica.
fn draw(journey_id: &str, node_id: &str, profile_id: &str, salt: &str) -> f64 {
    let mut h = Sha256::new();
    for part in [journey_id, node_id, profile_id, salt] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    let bytes: [u8; 8] = h.finalize()[..8].try_into().unwrap_or_default();
    // 53 bits give every double in [0, 1) an equal chance.
    (u64::from_be_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

/// The arm of a weighted split for a profile, by weighted rendezvous hashing: each arm
/// draws `-ln(u) / weight` and the smallest wins. Each arm wins in proportion to its
/// weight, and changing one arm's weight only moves profiles to or from that arm.
pub fn pick_arm<'a>(
    journey_id: &str,
    node_id: &str,
    profile_id: &str,
    arms: &'a [crate::journey::Arm],
    holdout_percent: u32,
) -> Option<&'a crate::journey::Arm> {
    if f64::from(holdout_percent) / 100.0 > draw(journey_id, node_id, profile_id, "holdout") {
        return None;
    }
    arms.iter()
        .map(|arm| {
            let u = draw(journey_id, node_id, profile_id, &arm.name).max(f64::MIN_POSITIVE);
            (-u.ln() / f64::from(arm.weight), arm)
        })
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, arm)| arm)
}

/// What an `arm` step records: the split's weights by arm, the arms in the split's order
/// (the first is control unless one is named so, and an object's keys keep no order on
/// their way to analytics) and the holdout percentage, from which analytics knows the
/// shares to expect and checks the assignment against them.
fn arm_detail(arms: &[crate::journey::Arm], holdout_percent: u32) -> Map<String, Json> {
    Map::from_iter([
        (
            "weights".to_owned(),
            Json::Object(
                arms.iter()
                    .map(|a| (a.name.clone(), json!(a.weight)))
                    .collect(),
            ),
        ),
        (
            "arms".to_owned(),
            json!(arms.iter().map(|a| &a.name).collect::<Vec<_>>()),
        ),
        ("holdout_percent".to_owned(), json!(holdout_percent)),
    ])
}

/// One enrollment's run: the journey, the facts and the effects it writes to.
struct Run<'a, 'b> {
    journey: &'a Journey,
    enrollment: &'a mut Enrollment,
    facts: &'a mut Facts,
    env: &'a Env<'b>,
    fx: &'a mut Effects,
    /// The event that entered or resumed the enrollment, if any.
    event: Option<&'a Event>,
}

/// Enrolls the profile of `facts` in `journey`, triggered by `event` with entry `key`,
/// and runs it to its first wait or its end.
pub fn enter(
    journey: &Journey,
    event: &Event,
    key: &str,
    facts: &mut Facts,
    env: &Env<'_>,
    fx: &mut Effects,
) -> Enrollment {
    let mut enrollment = Enrollment {
        enrollment_id: uuid::Uuid::now_v7().to_string(),
        journey_id: journey.journey_id.clone(),
        version: journey.version,
        profile_id: facts.profile.profile_id.clone(),
        user_id: facts.user_id(Some(event)).unwrap_or_default().to_owned(),
        key: key.to_owned(),
        status: Status::Active,
        node_id: journey.entry.start.clone(),
        waiting: Waiting::Nothing,
        waiting_until: None,
        entered_at: env.now_us,
        ended_at: None,
        reason: String::new(),
        context: event
            .properties
            .as_ref()
            .map(struct_to_json)
            .unwrap_or_default(),
        seq: 0,
    };
    let mut run = Run {
        journey,
        enrollment: &mut enrollment,
        facts,
        env,
        fx,
        event: Some(event),
    };
    let start = journey.entry.start.clone();
    run.record(
        &start,
        "entered",
        event.event.clone(),
        Map::from_iter([
            ("event".to_owned(), json!(event.event)),
            ("event_id".to_owned(), json!(event.event_id)),
            ("key".to_owned(), json!(key)),
        ]),
    );
    run.go(Some(start));
    enrollment
}

/// Whether `matcher` takes `event` for this enrollment; an evaluation error is recorded
/// on the enrollment and counts as no.
pub fn matches(
    matcher: &Matcher,
    event: &Event,
    enrollment: Option<&Enrollment>,
    facts: &mut Facts,
) -> Result<bool, String> {
    if matcher.event != event.event {
        return Ok(false);
    }
    let Some(condition) = &matcher.condition else {
        return Ok(true);
    };
    evaluate(condition, Some(event), enrollment, facts)
}

fn evaluate(
    condition: &Condition,
    event: Option<&Event>,
    enrollment: Option<&Enrollment>,
    facts: &mut Facts,
) -> Result<bool, String> {
    facts.prepare(condition);
    let event_id = event.map(|e| e.event_id.clone());
    if facts.event_set != event_id || event.is_none() {
        facts.vars.set(
            "event",
            event.map_or_else(|| Value::Map(BTreeMap::new()), event_value),
        );
        facts.event_set = event_id;
    }
    let enrollment_key = enrollment.map(|e| (e.enrollment_id.clone(), e.seq));
    if facts.enrollment_set != enrollment_key || enrollment.is_none() {
        let enrollment_value = enrollment.map_or_else(
            || Value::Map(BTreeMap::new()),
            |e| {
                Value::Map(BTreeMap::from([
                    ("key".to_owned(), Value::String(e.key.clone())),
                    (
                        "context".to_owned(),
                        json_value(&Json::Object(e.context.clone())),
                    ),
                    ("journey_id".to_owned(), Value::String(e.journey_id.clone())),
                    ("version".to_owned(), Value::Int(i64::from(e.version))),
                ]))
            },
        );
        facts.vars.set("enrollment", enrollment_value);
        facts.enrollment_set = enrollment_key;
    }
    condition.evaluate(&facts.vars).map_err(|e| e.to_string())
}

fn json_value(j: &Json) -> Value {
    match j {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => Value::Double(n.as_f64().unwrap_or(0.0)),
        Json::String(s) => Value::String(s.clone()),
        Json::Array(a) => Value::List(a.iter().map(json_value).collect()),
        Json::Object(o) => Value::Map(o.iter().map(|(k, v)| (k.clone(), json_value(v))).collect()),
    }
}

/// An event on the enrolled profile: a journey exit or the goal ends the enrollment
/// whatever it waits for; otherwise a wait whose branch takes the event resumes. Returns
/// whether anything changed. A paused journey's enrollments only end.
pub fn on_event(
    journey: &Journey,
    enrollment: &mut Enrollment,
    event: &Event,
    paused: bool,
    facts: &mut Facts,
    env: &Env<'_>,
    fx: &mut Effects,
) -> bool {
    if !enrollment.is_active() {
        return false;
    }
    if let Some(user_id) = facts.user_id(Some(event)) {
        user_id.clone_into(&mut enrollment.user_id);
    }
    let mut run = Run {
        journey,
        enrollment,
        facts,
        env,
        fx,
        event: Some(event),
    };
    for exit in &journey.exits {
        if run.test(exit, event) {
            run.end(Status::Exited, &format!("exit criterion: {}", exit.event));
            return true;
        }
    }
    if let Some(goal) = &journey.goal
        && run.test(goal, event)
    {
        run.end(Status::Converted, &format!("goal: {}", goal.event));
        return true;
    }
    if paused {
        return false;
    }
    let node_id = run.enrollment.node_id.clone();
    match (&run.enrollment.waiting, journey.step(&node_id)) {
        (Waiting::Event, Some(Step::Wait { branches, .. })) => {
            for branch in branches {
                if branch.same_key
                    && journey.entry.key_property.as_ref().is_some_and(|p| {
                        event_key(event, p).as_deref() != Some(run.enrollment.key.as_str())
                    })
                {
                    continue;
                }
                if run.test(&branch.matcher, event) {
                    run.record(
                        &node_id,
                        "resumed",
                        branch.name.clone(),
                        Map::from_iter([
                            ("event".to_owned(), json!(event.event)),
                            ("event_id".to_owned(), json!(event.event_id)),
                        ]),
                    );
                    run.go(branch.next.clone());
                    return true;
                }
            }
            false
        }
        (
            Waiting::Time,
            Some(Step::Delay {
                until: DelayUntil::LocalTime(time),
                ..
            }),
        ) if event.event == "Trait Changed" && changes_time_zone(event) => {
            // The customer moved: the local time is re-read in their new zone.
            let tz = time_zone_of(event)
                .or(journey.default_time_zone)
                .unwrap_or(env.policy.default_time_zone);
            let due = schedule::next_local_time(env.now_us, *time, tz);
            run.enrollment.waiting_until = Some(due);
            run.record(
                &node_id,
                "rescheduled",
                tz.name().to_owned(),
                Map::from_iter([("until".to_owned(), json!(due))]),
            );
            true
        }
        _ => false,
    }
}

fn changes_time_zone(event: &Event) -> bool {
    event
        .properties
        .as_ref()
        .and_then(|p| p.fields.get("changes"))
        .and_then(|c| match &c.kind {
            Some(prost_types::value::Kind::StructValue(s)) => {
                Some(s.fields.contains_key("timezone"))
            }
            _ => None,
        })
        .unwrap_or(false)
}

fn time_zone_of(event: &Event) -> Option<Tz> {
    let changes = struct_to_json(event.properties.as_ref()?);
    let tz = changes
        .get("changes")?
        .get("timezone")?
        .get("new")?
        .as_str()?;
    schedule::parse_time_zone(tz).ok()
}

/// The enrollment's wait fell due: a delay ends, a wait for events times out, a deferred
/// message is decided again.
pub fn on_timer(
    journey: &Journey,
    enrollment: &mut Enrollment,
    facts: &mut Facts,
    env: &Env<'_>,
    fx: &mut Effects,
) -> bool {
    if !enrollment.is_active() {
        return false;
    }
    if let Some(user_id) = facts.user_id(None) {
        user_id.clone_into(&mut enrollment.user_id);
    }
    let node_id = enrollment.node_id.clone();
    let waiting = enrollment.waiting.clone();
    let mut run = Run {
        journey,
        enrollment,
        facts,
        env,
        fx,
        event: None,
    };
    match (waiting, journey.step(&node_id)) {
        (Waiting::Resume, Some(_)) => {
            run.record(&node_id, "resumed", "moved".into(), Map::new());
            run.go(Some(node_id));
        }
        (Waiting::Time, Some(Step::Delay { next, .. })) => {
            run.record(&node_id, "resumed", "delay".into(), Map::new());
            run.go(next.clone());
        }
        (Waiting::Event, Some(Step::Wait { timeout_next, .. })) => {
            run.record(&node_id, "timeout", "timeout".into(), Map::new());
            run.go(timeout_next.clone());
        }
        (Waiting::Deferred(action_id), Some(step @ Step::Message { next, .. })) => {
            if run.send_message(step, Some(action_id)) {
                run.go(next.clone());
            }
        }
        (Waiting::Holdout, Some(_)) => run.end(Status::Completed, "holdout"),
        _ => return false,
    }
    true
}

/// The webhook the enrollment waits for has settled: on to `next` when it was
/// delivered, else (`Err` with the last failure) to `on_failure`, else the enrollment
/// errors.
pub fn on_action_settled(
    journey: &Journey,
    enrollment: &mut Enrollment,
    action_id: &str,
    outcome: Result<(), &str>,
    facts: &mut Facts,
    env: &Env<'_>,
    fx: &mut Effects,
) -> bool {
    if !enrollment.is_active() || enrollment.waiting != Waiting::Action(action_id.to_owned()) {
        return false;
    }
    let node_id = enrollment.node_id.clone();
    let Some(Step::Webhook {
        next, on_failure, ..
    }) = journey.step(&node_id)
    else {
        return false;
    };
    let mut run = Run {
        journey,
        enrollment,
        facts,
        env,
        fx,
        event: None,
    };
    let reason = match outcome {
        Ok(()) => {
            run.record(&node_id, "delivered", action_id.to_owned(), Map::new());
            run.go(next.clone());
            return true;
        }
        Err(reason) => reason,
    };
    if let Some(failure) = on_failure {
        run.record(
            &node_id,
            "failed",
            action_id.to_owned(),
            Map::from_iter([("reason".to_owned(), json!(reason))]),
        );
        run.go(Some(failure.clone()));
    } else {
        run.end(Status::Errored, &format!("webhook failed: {reason}"));
    }
    true
}

/// Moves an active enrollment to `node_id` of the newly published `journey`. A wait of
/// the same kind keeps its due time; any other node runs afresh at once (by its timer).
pub fn migrate(
    journey: &Journey,
    enrollment: &mut Enrollment,
    node_id: &str,
    now_us: i64,
    fx: &mut Effects,
) {
    let keeps_wait = matches!(
        (&enrollment.waiting, journey.step(node_id)),
        (Waiting::Time, Some(Step::Delay { .. })) | (Waiting::Event, Some(Step::Wait { .. }))
    );
    if !keeps_wait {
        enrollment.waiting = Waiting::Resume;
        enrollment.waiting_until = Some(now_us);
    }
    let from = std::mem::replace(&mut enrollment.node_id, node_id.to_owned());
    fx.steps.push(StepRecord {
        enrollment_id: enrollment.enrollment_id.clone(),
        seq: enrollment.seq,
        node_id: node_id.to_owned(),
        outcome: "moved".to_owned(),
        decision: format!("version {}", journey.version),
        detail: Map::from_iter([
            ("from_version".to_owned(), json!(enrollment.version)),
            ("from_node".to_owned(), json!(from)),
        ]),
        at: now_us,
    });
    enrollment.version = journey.version;
    enrollment.seq += 1;
}

/// Ends an enrollment from outside a run (an operator, archiving, a version).
pub fn end(
    enrollment: &mut Enrollment,
    status: Status,
    reason: &str,
    now_us: i64,
    fx: &mut Effects,
) {
    let node_id = enrollment.node_id.clone();
    enrollment.status = status;
    enrollment.ended_at = Some(now_us);
    enrollment.reason = reason.to_owned();
    enrollment.waiting = Waiting::Nothing;
    enrollment.waiting_until = None;
    fx.steps.push(StepRecord {
        enrollment_id: enrollment.enrollment_id.clone(),
        seq: enrollment.seq,
        node_id,
        outcome: outcome_of(status).to_owned(),
        decision: reason.to_owned(),
        detail: Map::new(),
        at: now_us,
    });
    enrollment.seq += 1;
}

fn outcome_of(status: Status) -> &'static str {
    match status {
        Status::Active => "active",
        Status::Completed => "completed",
        Status::Converted => "goal",
        Status::Exited => "exited",
        Status::Errored => "errored",
    }
}

impl Run<'_, '_> {
    fn record(
        &mut self,
        node_id: &str,
        outcome: &'static str,
        decision: String,
        detail: Map<String, Json>,
    ) {
        self.fx.steps.push(StepRecord {
            enrollment_id: self.enrollment.enrollment_id.clone(),
            seq: self.enrollment.seq,
            node_id: node_id.to_owned(),
            outcome: outcome.to_owned(),
            decision,
            detail,
            at: self.env.now_us,
        });
        self.enrollment.seq += 1;
    }

    /// Whether `matcher` takes `event`; an evaluation error is kept as the reason.
    fn test(&mut self, matcher: &Matcher, event: &Event) -> bool {
        match matches(matcher, event, Some(self.enrollment), self.facts) {
            Ok(yes) => yes,
            Err(e) => {
                self.enrollment.reason = format!("condition on `{}`: {e}", matcher.event);
                false
            }
        }
    }

    fn end(&mut self, status: Status, reason: &str) {
        end(self.enrollment, status, reason, self.env.now_us, self.fx);
    }

    fn action_id(&self, node_id: &str) -> String {
        format!(
            "{}:{}:{}",
            self.enrollment.enrollment_id, node_id, self.enrollment.seq
        )
    }

    /// The recipient's time zone: their `timezone` trait, else the journey's default,
    /// else the contact policy's.
    fn time_zone(&self) -> Tz {
        self.facts
            .time_zone
            .or(self.journey.default_time_zone)
            .unwrap_or(self.env.policy.default_time_zone)
    }

    fn template_context(&mut self) -> Json {
        let event = self.event.map_or(Json::Null, |e| {
            json!({
                "name": e.event,
                "properties": e.properties.as_ref().map(struct_to_json).unwrap_or_default(),
            })
        });
        json!({
            "profile": self.facts.template_profile().clone(),
            "event": event,
            "enrollment": {
                "id": self.enrollment.enrollment_id,
                "key": self.enrollment.key,
                "context": self.enrollment.context,
                "journey_id": self.enrollment.journey_id,
            },
        })
    }

    fn action(&self, node_id: &str, kind: ActionKind, target: &str, payload: Json) -> Action {
        Action {
            action_id: self.action_id(node_id),
            enrollment_id: self.enrollment.enrollment_id.clone(),
            journey_id: self.journey.journey_id.clone(),
            node_id: node_id.to_owned(),
            profile_id: self.enrollment.profile_id.clone(),
            kind,
            target: target.to_owned(),
            status: ActionStatus::Pending,
            reason: String::new(),
            due_at: self.env.now_us,
            payload,
            marketing: false,
            priority: self.journey.priority,
        }
    }

    /// Runs from `next` until a step waits or the enrollment ends.
    fn go(&mut self, mut next: Option<String>) {
        for _ in 0..MAX_STEPS_PER_RUN {
            let Some(node_id) = next.take() else {
                self.end(Status::Completed, "completed");
                return;
            };
            let journey = self.journey;
            let Some(step) = journey.step(&node_id) else {
                self.end(
                    Status::Errored,
                    &format!("node `{node_id}` is not in version {}", journey.version),
                );
                return;
            };
            self.enrollment.node_id = node_id.clone();
            self.enrollment.waiting = Waiting::Nothing;
            self.enrollment.waiting_until = None;
            match step {
                Step::Split {
                    branches,
                    otherwise,
                } => {
                    let mut taken = None;
                    let mut errors = Vec::new();
                    for branch in branches {
                        match evaluate(
                            &branch.condition,
                            self.event,
                            Some(self.enrollment),
                            self.facts,
                        ) {
                            Ok(true) => {
                                taken = Some(branch);
                                break;
                            }
                            Ok(false) => {}
                            Err(e) => errors.push(json!({ "branch": branch.name, "error": e })),
                        }
                    }
                    if let Some(e) = errors.last() {
                        self.enrollment.reason = format!("condition: {}", e["error"]);
                    }
                    let (name, condition) = taken.map_or(("otherwise", ""), |b| {
                        (b.name.as_str(), b.condition.source())
                    });
                    let mut detail = Map::from_iter([("condition".to_owned(), json!(condition))]);
                    if !errors.is_empty() {
                        detail.insert("errors".to_owned(), Json::Array(errors));
                    }
                    self.record(&node_id, "branch", name.to_owned(), detail);
                    next = taken.map_or_else(|| otherwise.clone(), |b| b.next.clone());
                }
                Step::Random {
                    arms,
                    holdout_percent,
                    holdout_window_us,
                } => {
                    let arm = pick_arm(
                        &journey.journey_id,
                        &node_id,
                        &self.enrollment.profile_id,
                        arms,
                        *holdout_percent,
                    );
                    let name = arm.map_or("holdout", |a| a.name.as_str()).to_owned();
                    self.enrollment
                        .context
                        .insert(format!("arm:{node_id}"), json!(name));
                    self.record(&node_id, "arm", name, arm_detail(arms, *holdout_percent));
                    let Some(arm) = arm else {
                        self.enrollment.waiting = Waiting::Holdout;
                        self.enrollment.waiting_until =
                            Some(self.env.now_us.saturating_add(*holdout_window_us));
                        return;
                    };
                    next = arm.next.clone();
                }
                Step::Delay { until, next: after } => {
                    let due = match until {
                        DelayUntil::Duration(us) => Some(self.env.now_us.saturating_add(*us)),
                        DelayUntil::LocalTime(time) => Some(schedule::next_local_time(
                            self.env.now_us,
                            *time,
                            self.time_zone(),
                        )),
                        DelayUntil::Trait {
                            name,
                            exit_when_past,
                        } => {
                            let tz = self.time_zone();
                            let date = self
                                .facts
                                .trait_text(name)
                                .and_then(|s| schedule::parse_trait_date(s, tz));
                            match date {
                                Some(d) if d > self.env.now_us => Some(d),
                                _ if *exit_when_past => {
                                    self.end(Status::Exited, "date passed");
                                    return;
                                }
                                _ => None,
                            }
                        }
                    };
                    match due {
                        Some(due) if due > self.env.now_us => {
                            self.enrollment.waiting = Waiting::Time;
                            self.enrollment.waiting_until = Some(due);
                            self.record(
                                &node_id,
                                "waiting",
                                "delay".into(),
                                Map::from_iter([("until".to_owned(), json!(due))]),
                            );
                            return;
                        }
                        _ => {
                            self.record(&node_id, "resumed", "no wait".into(), Map::new());
                            next = after.clone();
                        }
                    }
                }
                Step::Wait { timeout_us, .. } => {
                    let due = self.env.now_us.saturating_add(*timeout_us);
                    self.enrollment.waiting = Waiting::Event;
                    self.enrollment.waiting_until = Some(due);
                    self.record(
                        &node_id,
                        "waiting",
                        "events".into(),
                        Map::from_iter([("until".to_owned(), json!(due))]),
                    );
                    return;
                }
                step @ Step::Message { next: after, .. } => {
                    if !self.send_message(step, None) {
                        return;
                    }
                    next = after.clone();
                }
                Step::Webhook { url, body, .. } => {
                    let payload = match body {
                        None => json!({
                            "type": "journey.step",
                            "journey_id": journey.journey_id,
                            "version": journey.version,
                            "node_id": node_id,
                            "enrollment_id": self.enrollment.enrollment_id,
                            "profile_id": self.enrollment.profile_id,
                            "key": self.enrollment.key,
                            "event": self.template_context()["event"],
                        }),
                        Some(t) => match t.render(&self.template_context()) {
                            Ok(text) => serde_json::from_str(&text).unwrap_or(Json::String(text)),
                            Err(e) => {
                                self.end(Status::Errored, &format!("webhook body: {e}"));
                                return;
                            }
                        },
                    };
                    let action = self.action(&node_id, ActionKind::Webhook, url, payload);
                    self.enrollment.waiting = Waiting::Action(action.action_id.clone());
                    self.record(
                        &node_id,
                        "called",
                        action.action_id.clone(),
                        Map::from_iter([("url".to_owned(), json!(url))]),
                    );
                    self.fx.actions.push(action);
                    return;
                }
                Step::UpdateTraits {
                    traits,
                    next: after,
                } => {
                    let context = self.template_context();
                    let mut set = Map::new();
                    for (key, value) in traits {
                        let value = match value {
                            TraitValue::Value(v) => waymark_proto::json::value_to_json(v),
                            TraitValue::Template(t) => match t.render(&context) {
                                Ok(text) => Json::String(text),
                                Err(e) => {
                                    self.end(Status::Errored, &format!("trait `{key}`: {e}"));
                                    return;
                                }
                            },
                        };
                        set.insert(key.clone(), value);
                    }
                    let action = self.action(
                        &node_id,
                        ActionKind::UpdateTraits,
                        "profile",
                        json!({ "profile_id": self.enrollment.profile_id, "traits": set }),
                    );
                    self.record(&node_id, "updated", action.action_id.clone(), Map::new());
                    self.fx.actions.push(action);
                    next = after.clone();
                }
                Step::Escalate {
                    priority,
                    reason,
                    next: after,
                } => {
                    let reason = match reason.render(&self.template_context()) {
                        Ok(r) => r,
                        Err(e) => {
                            self.end(Status::Errored, &format!("escalation reason: {e}"));
                            return;
                        }
                    };
                    let case = Case {
                        case_id: uuid::Uuid::now_v7().to_string(),
                        profile_id: self.enrollment.profile_id.clone(),
                        journey_id: journey.journey_id.clone(),
                        enrollment_id: self.enrollment.enrollment_id.clone(),
                        priority: priority.clone(),
                        reason: reason.clone(),
                        opened_at: self.env.now_us,
                    };
                    let payload = json!({
                        "type": "case.opened",
                        "case_id": case.case_id,
                        "priority": priority,
                        "reason": reason,
                        "journey_id": journey.journey_id,
                        "enrollment_id": self.enrollment.enrollment_id,
                        "profile": self.facts.template_profile().clone(),
                        "identities": self.facts.profile.identities.iter()
                            .map(|i| json!({ "type": i.r#type, "value": i.value }))
                            .collect::<Vec<_>>(),
                    });
                    let action = self.action(&node_id, ActionKind::Escalate, "escalation", payload);
                    self.facts.open_case = true;
                    self.record(
                        &node_id,
                        "escalated",
                        case.case_id.clone(),
                        Map::from_iter([("priority".to_owned(), json!(priority))]),
                    );
                    self.fx.actions.push(action);
                    self.fx.cases.push(case);
                    next = after.clone();
                }
                Step::Exit { reason } => {
                    self.end(Status::Exited, reason);
                    return;
                }
            }
        }
        self.end(
            Status::Errored,
            &format!("more than {MAX_STEPS_PER_RUN} steps without a wait"),
        );
    }

    /// Decides and records a message at the current node. Returns whether the run goes
    /// on (sent or suppressed) rather than waiting (deferred). `deferred` is the id of the
    /// action a quiet-hours deferral made earlier.
    fn send_message(&mut self, step: &Step, deferred: Option<String>) -> bool {
        let Step::Message {
            channel,
            transactional,
            variants,
            skip_in_quiet_hours,
            ..
        } = step
        else {
            return true;
        };
        let node_id = self.enrollment.node_id.clone();
        let variant = variants
            .iter()
            .find(|v| v.emotions.is_empty() || v.emotions.contains(&self.facts.emotion_label));
        let Some(variant) = variant else {
            self.record(
                &node_id,
                "suppressed",
                "no variant".into(),
                Map::from_iter([("reason".to_owned(), json!("no variant for the emotion"))]),
            );
            return true;
        };
        let context = self.template_context();
        let (subject, body) = match (
            variant.subject.render(&context),
            variant.body.render(&context),
        ) {
            (Ok(s), Ok(b)) => (s, b),
            (Err(e), _) | (_, Err(e)) => {
                self.end(Status::Errored, &format!("message template: {e}"));
                return false;
            }
        };
        let decision = {
            let facts = &*self.facts;
            let consent = |key: &str| facts.consent(key);
            policy::decide(
                self.env.policy,
                &policy::Message {
                    channel,
                    transactional: *transactional,
                    skip_in_quiet_hours: *skip_in_quiet_hours,
                    priority: self.journey.priority,
                },
                &policy::Recipient {
                    time_zone: self.time_zone(),
                    contacts: &facts.contacts,
                    open_case: facts.open_case,
                    consent: &consent,
                },
                self.env.now_us,
            )
        };
        let payload = json!({
            "channel": channel,
            "category": if *transactional { "transactional" } else { "marketing" },
            "variant": variant.name,
            "subject": subject,
            "body": body,
            "journey_id": self.journey.journey_id,
            "node_id": node_id,
            "enrollment_id": self.enrollment.enrollment_id,
            "profile_id": self.enrollment.profile_id,
            "to": {
                "user_id": self.facts.identifier("user_id"),
                "email": self.facts.identifier("email"),
                "phone": self.facts.identifier("phone"),
            },
        });
        let mut action = self.action(&node_id, ActionKind::Message, channel, payload);
        action.marketing = !*transactional;
        let (outcome, goes_on) = match &decision {
            Decision::Send => {
                if action.marketing {
                    self.facts.contacts.push(Contact {
                        channel: channel.clone(),
                        at: self.env.now_us,
                    });
                }
                ("sent", true)
            }
            Decision::Defer(until) => {
                action.status = ActionStatus::Deferred;
                action.reason = "quiet hours".into();
                action.due_at = *until;
                ("deferred", false)
            }
            Decision::Suppress(reason) => {
                action.status = ActionStatus::Suppressed;
                action.reason = reason.clone();
                ("suppressed", true)
            }
        };
        let mut detail = Map::from_iter([
            ("channel".to_owned(), json!(channel)),
            ("variant".to_owned(), json!(variant.name)),
        ]);
        if !action.reason.is_empty() {
            detail.insert("reason".to_owned(), json!(action.reason));
        }
        match deferred {
            // The action made at deferral keeps its id: its row is updated, not doubled.
            Some(id) => {
                if let Decision::Defer(until) = decision {
                    self.enrollment.waiting = Waiting::Deferred(id.clone());
                    self.enrollment.waiting_until = Some(until);
                }
                self.fx.action_updates.push(ActionUpdate {
                    action_id: id.clone(),
                    status: action.status,
                    reason: action.reason.clone(),
                    due_at: action.due_at,
                    payload: action.payload.clone(),
                    counts_as_contact: action.marketing && decision == Decision::Send,
                });
                self.record(&node_id, outcome, id, detail);
            }
            None => {
                if let Decision::Defer(until) = decision {
                    self.enrollment.waiting = Waiting::Deferred(action.action_id.clone());
                    self.enrollment.waiting_until = Some(until);
                }
                self.record(&node_id, outcome, action.action_id.clone(), detail);
                self.fx.actions.push(action);
            }
        }
        goes_on
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journey::Arm;

    fn arms(weights: &[(&str, u32)]) -> Vec<Arm> {
        weights
            .iter()
            .map(|(name, weight)| Arm {
                name: (*name).to_owned(),
                weight: *weight,
                next: None,
            })
            .collect()
    }

    fn assign(arms: &[Arm], holdout: u32, n: usize) -> Vec<String> {
        (0..n)
            .map(|i| {
                pick_arm("j", "split", &format!("profile-{i}"), arms, holdout)
                    .map_or("holdout".to_owned(), |a| a.name.clone())
            })
            .collect()
    }

    #[test]
    fn random_splits_follow_their_weights_and_hold_out_a_share() {
        let n = 40_000;
        let picks = assign(&arms(&[("a", 1), ("b", 1), ("c", 2)]), 10, n);
        let share = |name: &str| picks.iter().filter(|p| *p == name).count() as f64 / n as f64;
        // Expected: holdout 10 %, then a 22.5 %, b 22.5 %, c 45 %; 40,000 draws keep each
        // share within one percentage point (over six standard deviations).
        for (name, expected) in [("holdout", 0.10), ("a", 0.225), ("b", 0.225), ("c", 0.45)] {
            let got = share(name);
            assert!(
                (got - expected).abs() < 0.01,
                "{name}: {got} against {expected}"
            );
        }
    }

    #[test]
    fn changing_one_weight_moves_profiles_only_to_or_from_that_arm() {
        let n = 20_000;
        let before = assign(&arms(&[("a", 1), ("b", 1), ("c", 1)]), 0, n);
        let after = assign(&arms(&[("a", 1), ("b", 1), ("c", 3)]), 0, n);
        let mut moved = 0;
        for (b, a) in before.iter().zip(&after) {
            if b != a {
                moved += 1;
                assert_eq!(
                    a, "c",
                    "a profile moved from {b} to {a}, not to the heavier arm"
                );
            }
        }
        assert!(moved > n / 5, "the heavier arm took profiles: {moved}");
        assert_eq!(
            before,
            assign(&arms(&[("a", 1), ("b", 1), ("c", 1)]), 0, n),
            "stable"
        );
    }
}
