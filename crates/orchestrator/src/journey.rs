//! A journey checked and compiled: every condition, template, duration and time zone of a
//! `JourneyDefinition` parsed once, with every problem reported at once (node and field),
//! so a journey that is saved can always run.

use std::collections::{BTreeSet, HashMap};

use chrono::NaiveTime;
use chrono_tz::Tz;
use waymark_condition::{Condition, Type};
use waymark_proto::orchestration::v1 as pb;
use waymark_proto::orchestration::v1::node::Kind;

use crate::schedule;
use crate::template::Template;

/// The longest id of a journey, node, branch or arm.
pub const MAX_ID_CHARS: usize = 64;
const MAX_NAME_CHARS: usize = 200;
const MAX_DESCRIPTION_CHARS: usize = 2000;
/// The most nodes a journey has.
pub const MAX_NODES: usize = 200;
/// The most enrollments one profile may hold in one journey at a time.
pub const MAX_CONCURRENT: u32 = 100;
const MAX_BRANCHES: usize = 32;
const MAX_ARM_WEIGHT: u32 = 10_000;
/// How long a held-out enrollment waits for the goal when the split does not say.
const DEFAULT_HOLDOUT_WINDOW_US: i64 = 30 * 86_400_000_000;

/// One problem of a definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub node_id: String,
    pub field: String,
    pub problem: String,
}

/// An event a journey reacts to.
#[derive(Clone)]
pub struct Matcher {
    pub event: String,
    pub condition: Option<Condition>,
}

/// When a profile may enter again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reentry {
    Once,
    Always,
    AfterExit,
    AfterCooldown(i64),
}

/// How customers enter.
#[derive(Clone)]
pub struct Entry {
    pub trigger: Matcher,
    pub start: String,
    pub reentry: Reentry,
    /// The event property that keys enrollments; `None` for one key per profile.
    pub key_property: Option<String>,
    pub max_concurrent: u32,
}

/// A conditional way out of a split.
#[derive(Clone)]
pub struct Branch {
    pub name: String,
    pub condition: Condition,
    pub next: Option<String>,
}

/// One arm of a random split.
#[derive(Debug, Clone)]
pub struct Arm {
    pub name: String,
    pub weight: u32,
    pub next: Option<String>,
}

/// What a delay waits for.
#[derive(Debug, Clone)]
pub enum DelayUntil {
    Duration(i64),
    LocalTime(NaiveTime),
    Trait { name: String, exit_when_past: bool },
}

/// One event a wait waits for.
#[derive(Clone)]
pub struct WaitBranch {
    pub name: String,
    pub matcher: Matcher,
    pub same_key: bool,
    pub next: Option<String>,
}

/// One version of a message's content.
#[derive(Clone)]
pub struct Variant {
    pub name: String,
    pub emotions: Vec<String>,
    pub subject: Template,
    pub body: Template,
}

/// A trait an UpdateTraits step sets: a template for strings, the value otherwise.
#[derive(Clone)]
pub enum TraitValue {
    Template(Template),
    Value(prost_types::Value),
}

/// What a step does.
#[derive(Clone)]
pub enum Step {
    Split {
        branches: Vec<Branch>,
        otherwise: Option<String>,
    },
    Random {
        arms: Vec<Arm>,
        holdout_percent: u32,
        /// How long a held-out enrollment waits for the goal.
        holdout_window_us: i64,
    },
    Delay {
        until: DelayUntil,
        next: Option<String>,
    },
    Wait {
        branches: Vec<WaitBranch>,
        timeout_us: i64,
        timeout_next: Option<String>,
    },
    Message {
        channel: String,
        transactional: bool,
        variants: Vec<Variant>,
        skip_in_quiet_hours: bool,
        next: Option<String>,
    },
    Webhook {
        url: String,
        body: Option<Template>,
        next: Option<String>,
        on_failure: Option<String>,
    },
    UpdateTraits {
        traits: Vec<(String, TraitValue)>,
        next: Option<String>,
    },
    Escalate {
        priority: String,
        reason: Template,
        next: Option<String>,
    },
    Exit {
        reason: String,
    },
}

impl Step {
    /// Every node this step can go to.
    fn successors(&self) -> Vec<&str> {
        let mut out: Vec<Option<&String>> = Vec::new();
        match self {
            Step::Split {
                branches,
                otherwise,
            } => {
                out.extend(branches.iter().map(|b| b.next.as_ref()));
                out.push(otherwise.as_ref());
            }
            Step::Random { arms, .. } => out.extend(arms.iter().map(|a| a.next.as_ref())),
            Step::Delay { next, .. }
            | Step::Message { next, .. }
            | Step::UpdateTraits { next, .. }
            | Step::Escalate { next, .. } => out.push(next.as_ref()),
            Step::Wait {
                branches,
                timeout_next,
                ..
            } => {
                out.extend(branches.iter().map(|b| b.next.as_ref()));
                out.push(timeout_next.as_ref());
            }
            Step::Webhook {
                next, on_failure, ..
            } => {
                out.push(next.as_ref());
                out.push(on_failure.as_ref());
            }
            Step::Exit { .. } => {}
        }
        out.into_iter().flatten().map(String::as_str).collect()
    }

    /// The step holds the enrollment until time passes or an event comes.
    fn waits(&self) -> bool {
        matches!(self, Step::Delay { .. } | Step::Wait { .. })
    }
}

/// A journey version, compiled.
#[derive(Clone)]
pub struct Journey {
    pub journey_id: String,
    pub version: u32,
    pub name: String,
    pub priority: u32,
    /// For profiles without a `timezone` trait; `None` defers to the contact policy's.
    pub default_time_zone: Option<Tz>,
    pub entry: Entry,
    pub nodes: HashMap<String, Step>,
    /// Node ids in definition order, for reports.
    pub order: Vec<String>,
    pub exits: Vec<Matcher>,
    pub goal: Option<Matcher>,
    /// Every event name the journey reacts to once someone is enrolled: exits, the goal
    /// and what its waits wait for.
    pub listens_to: BTreeSet<String>,
}

impl Journey {
    /// The step `node_id`, which compilation guarantees for every id a journey names.
    pub fn step(&self, node_id: &str) -> Option<&Step> {
        self.nodes.get(node_id)
    }
}

/// The variables a journey condition reads, with their types: the event, the enrollment,
/// and the profile's variables exactly as segment conditions see them.
pub fn declarations() -> Vec<(&'static str, Type)> {
    let mut vars = waymark_profile::segment::declarations();
    vars.push((
        "event",
        Type::object([
            ("name", Type::String),
            ("properties", Type::Map(Box::new(Type::Dyn))),
            ("context", Type::Map(Box::new(Type::Dyn))),
            ("channel", Type::String),
            ("timestamp", Type::Timestamp),
        ]),
    ));
    vars.push((
        "enrollment",
        Type::object([
            ("key", Type::String),
            ("context", Type::Map(Box::new(Type::Dyn))),
            ("journey_id", Type::String),
            ("version", Type::Int),
        ]),
    ));
    vars
}

struct Checker {
    problems: Vec<Problem>,
    variables: Vec<(&'static str, Type)>,
}

impl Checker {
    fn problem(&mut self, node_id: &str, field: impl Into<String>, problem: impl Into<String>) {
        self.problems.push(Problem {
            node_id: node_id.to_owned(),
            field: field.into(),
            problem: problem.into(),
        });
    }

    fn condition(&mut self, node_id: &str, field: &str, source: &str) -> Option<Condition> {
        match Condition::compile_typed(source, &self.variables) {
            Ok(c) => Some(c),
            Err(e) => {
                self.problem(node_id, field, e.to_string());
                None
            }
        }
    }

    fn matcher(
        &mut self,
        node_id: &str,
        field: &str,
        m: Option<&pb::EventMatch>,
    ) -> Option<Matcher> {
        let Some(m) = m else {
            self.problem(node_id, field, "is required");
            return None;
        };
        if m.event.trim().is_empty() || m.event.chars().count() > MAX_NAME_CHARS {
            self.problem(
                node_id,
                format!("{field}.event"),
                format!("must be an event name of 1-{MAX_NAME_CHARS} characters"),
            );
            return None;
        }
        let condition = if m.condition.trim().is_empty() {
            None
        } else {
            Some(self.condition(node_id, &format!("{field}.condition"), &m.condition)?)
        };
        Some(Matcher {
            event: m.event.clone(),
            condition,
        })
    }

    fn template(&mut self, node_id: &str, field: &str, source: &str) -> Option<Template> {
        match Template::compile(source) {
            Ok(t) => Some(t),
            Err(e) => {
                self.problem(node_id, field, e);
                None
            }
        }
    }

    fn duration(&mut self, node_id: &str, field: &str, text: &str) -> Option<i64> {
        match schedule::parse_duration(text) {
            Ok(d) => Some(waymark_kit::time::duration_micros(d)),
            Err(e) => {
                self.problem(node_id, field, e);
                None
            }
        }
    }

    fn next(
        &mut self,
        node_id: &str,
        field: &str,
        next: &str,
        ids: &BTreeSet<String>,
    ) -> Option<String> {
        if next.is_empty() {
            return None;
        }
        if !ids.contains(next) {
            self.problem(
                node_id,
                field,
                format!("names node `{next}`, which does not exist"),
            );
        }
        Some(next.to_owned())
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_CHARS
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Checks `definition` and compiles it as `version`, or returns every problem found.
pub fn compile(definition: &pb::JourneyDefinition, version: u32) -> Result<Journey, Vec<Problem>> {
    let mut c = Checker {
        problems: Vec::new(),
        variables: declarations(),
    };
    let id_rule = format!("must be 1-{MAX_ID_CHARS} characters of a-z, 0-9, `_` and `-`");
    if !valid_id(&definition.journey_id) {
        c.problem("", "journey_id", id_rule.clone());
    }
    if definition.name.chars().count() > MAX_NAME_CHARS {
        c.problem(
            "",
            "name",
            format!("must be at most {MAX_NAME_CHARS} characters"),
        );
    }
    if definition.description.chars().count() > MAX_DESCRIPTION_CHARS {
        c.problem(
            "",
            "description",
            format!("must be at most {MAX_DESCRIPTION_CHARS} characters"),
        );
    }
    if definition.priority > 100 {
        c.problem("", "priority", "must be 0 to 100");
    }
    let default_time_zone = if definition.default_time_zone.is_empty() {
        None
    } else {
        schedule::parse_time_zone(&definition.default_time_zone)
            .map_err(|e| c.problem("", "default_time_zone", e))
            .ok()
    };
    if definition.nodes.is_empty() {
        c.problem("", "nodes", "must hold at least one node");
    }
    if definition.nodes.len() > MAX_NODES {
        c.problem("", "nodes", format!("must hold at most {MAX_NODES} nodes"));
    }
    let mut ids = BTreeSet::new();
    for (i, node) in definition.nodes.iter().enumerate() {
        if !valid_id(&node.id) {
            c.problem(&node.id, format!("nodes[{i}].id"), id_rule.clone());
        } else if !ids.insert(node.id.clone()) {
            c.problem(
                &node.id,
                format!("nodes[{i}].id"),
                "is used by an earlier node",
            );
        }
    }

    let entry = definition.entry.as_ref();
    let entry = match entry {
        None => {
            c.problem("", "entry", "is required");
            None
        }
        Some(e) => compile_entry(&mut c, e, &ids),
    };
    let exits: Vec<Matcher> = definition
        .exits
        .iter()
        .enumerate()
        .filter_map(|(i, m)| c.matcher("", &format!("exits[{i}]"), Some(m)))
        .collect();
    let goal = definition
        .goal
        .as_ref()
        .and_then(|g| c.matcher("", "goal", Some(g)));

    let mut nodes = HashMap::new();
    for (i, node) in definition.nodes.iter().enumerate() {
        let field = format!("nodes[{i}]");
        if let Some(step) = compile_node(&mut c, node, &field, &ids) {
            nodes.insert(node.id.clone(), step);
        }
    }
    if c.problems.is_empty() {
        check_cycles(&mut c, &nodes, definition);
    }
    let Some(entry) = entry.filter(|_| c.problems.is_empty()) else {
        return Err(c.problems);
    };

    let mut listens_to: BTreeSet<String> = exits.iter().map(|m| m.event.clone()).collect();
    listens_to.extend(goal.iter().map(|m| m.event.clone()));
    for step in nodes.values() {
        if let Step::Wait { branches, .. } = step {
            listens_to.extend(branches.iter().map(|b| b.matcher.event.clone()));
        }
    }
    Ok(Journey {
        journey_id: definition.journey_id.clone(),
        version,
        name: definition.name.clone(),
        priority: definition.priority,
        default_time_zone,
        entry,
        order: definition.nodes.iter().map(|n| n.id.clone()).collect(),
        nodes,
        exits,
        goal,
        listens_to,
    })
}

fn compile_entry(c: &mut Checker, e: &pb::Entry, ids: &BTreeSet<String>) -> Option<Entry> {
    let trigger = c.matcher("", "entry.trigger", e.trigger.as_ref());
    let start = if e.start.is_empty() {
        c.problem("", "entry.start", "is required: the first node");
        None
    } else {
        c.next("", "entry.start", &e.start, ids)
    };
    let reentry = match pb::Reentry::try_from(e.reentry).unwrap_or(pb::Reentry::Unspecified) {
        pb::Reentry::Unspecified | pb::Reentry::Once => Reentry::Once,
        pb::Reentry::Always => Reentry::Always,
        pb::Reentry::AfterExit => Reentry::AfterExit,
        pb::Reentry::AfterCooldown => {
            if e.cooldown.is_empty() {
                c.problem(
                    "",
                    "entry.cooldown",
                    "is required with REENTRY_AFTER_COOLDOWN",
                );
                Reentry::Once
            } else {
                Reentry::AfterCooldown(c.duration("", "entry.cooldown", &e.cooldown).unwrap_or(0))
            }
        }
    };
    if !e.cooldown.is_empty() && !matches!(reentry, Reentry::AfterCooldown(_)) {
        c.problem(
            "",
            "entry.cooldown",
            "is only read with REENTRY_AFTER_COOLDOWN",
        );
    }
    let key_property = (!e.key_property.is_empty()).then(|| e.key_property.clone());
    if let Some(k) = &key_property
        && k.chars().count() > MAX_NAME_CHARS
    {
        c.problem(
            "",
            "entry.key_property",
            format!("must be at most {MAX_NAME_CHARS} characters"),
        );
    }
    if e.max_concurrent > MAX_CONCURRENT {
        c.problem(
            "",
            "entry.max_concurrent",
            format!("must be at most {MAX_CONCURRENT}"),
        );
    }
    let max_concurrent = match e.max_concurrent {
        0 if key_property.is_some() => 10,
        0 => 1,
        n => n,
    };
    Some(Entry {
        trigger: trigger?,
        start: start?,
        reentry,
        key_property,
        max_concurrent,
    })
}

fn compile_node(
    c: &mut Checker,
    node: &pb::Node,
    field: &str,
    ids: &BTreeSet<String>,
) -> Option<Step> {
    let id = node.id.as_str();
    let before = c.problems.len();
    let step = match &node.kind {
        None => {
            c.problem(id, field, "needs a kind: split, randomSplit, delay, wait, message, webhook, updateTraits, escalate or exit");
            return None;
        }
        Some(Kind::Split(s)) => {
            let f = format!("{field}.split");
            if s.branches.is_empty() || s.branches.len() > MAX_BRANCHES {
                c.problem(
                    id,
                    format!("{f}.branches"),
                    format!("must hold 1-{MAX_BRANCHES} branches"),
                );
            }
            let branches = s
                .branches
                .iter()
                .enumerate()
                .filter_map(|(i, b)| {
                    let bf = format!("{f}.branches[{i}]");
                    let next = c.next(id, &format!("{bf}.next"), &b.next, ids);
                    let condition = if b.condition.trim().is_empty() {
                        c.problem(id, format!("{bf}.condition"), "is required");
                        None
                    } else {
                        c.condition(id, &format!("{bf}.condition"), &b.condition)
                    };
                    Some(Branch {
                        name: if b.name.is_empty() {
                            format!("branches[{i}]")
                        } else {
                            b.name.clone()
                        },
                        condition: condition?,
                        next,
                    })
                })
                .collect();
            let otherwise = c.next(id, &format!("{f}.otherwise"), &s.otherwise, ids);
            Step::Split {
                branches,
                otherwise,
            }
        }
        Some(Kind::RandomSplit(r)) => {
            let f = format!("{field}.random_split");
            if r.arms.is_empty() || r.arms.len() > MAX_BRANCHES {
                c.problem(
                    id,
                    format!("{f}.arms"),
                    format!("must hold 1-{MAX_BRANCHES} arms"),
                );
            }
            if r.holdout_percent > 100 {
                c.problem(id, format!("{f}.holdout_percent"), "must be 0 to 100");
            }
            let mut names = BTreeSet::new();
            let arms = r
                .arms
                .iter()
                .enumerate()
                .map(|(i, a)| {
                    let af = format!("{f}.arms[{i}]");
                    if a.name.is_empty() || a.name.chars().count() > MAX_ID_CHARS {
                        c.problem(
                            id,
                            format!("{af}.name"),
                            format!("must be 1-{MAX_ID_CHARS} characters"),
                        );
                    } else if a.name == "holdout" || !names.insert(a.name.clone()) {
                        c.problem(
                            id,
                            format!("{af}.name"),
                            "must be unique in the split and not `holdout`",
                        );
                    }
                    if a.weight == 0 || a.weight > MAX_ARM_WEIGHT {
                        c.problem(
                            id,
                            format!("{af}.weight"),
                            format!("must be 1 to {MAX_ARM_WEIGHT}"),
                        );
                    }
                    Arm {
                        name: a.name.clone(),
                        weight: a.weight,
                        next: c.next(id, &format!("{af}.next"), &a.next, ids),
                    }
                })
                .collect();
            let holdout_window_us = if r.holdout_window.trim().is_empty() {
                DEFAULT_HOLDOUT_WINDOW_US
            } else {
                c.duration(id, &format!("{f}.holdout_window"), &r.holdout_window)
                    .unwrap_or(DEFAULT_HOLDOUT_WINDOW_US)
            };
            Step::Random {
                arms,
                holdout_percent: r.holdout_percent,
                holdout_window_us,
            }
        }
        Some(Kind::Delay(d)) => {
            let f = format!("{field}.delay");
            let given = [
                !d.duration.is_empty(),
                !d.until_local_time.is_empty(),
                !d.until_trait.is_empty(),
            ];
            let until = if given.iter().filter(|g| **g).count() != 1 {
                c.problem(
                    id,
                    f.clone(),
                    "needs exactly one of `duration`, `until_local_time` and `until_trait`",
                );
                None
            } else if !d.duration.is_empty() {
                c.duration(id, &format!("{f}.duration"), &d.duration)
                    .map(DelayUntil::Duration)
            } else if !d.until_local_time.is_empty() {
                match schedule::parse_time_of_day(&d.until_local_time) {
                    Ok(t) => Some(DelayUntil::LocalTime(t)),
                    Err(e) => {
                        c.problem(id, format!("{f}.until_local_time"), e);
                        None
                    }
                }
            } else {
                Some(DelayUntil::Trait {
                    name: d.until_trait.clone(),
                    exit_when_past: d.when_past == pb::PastDate::Exit as i32,
                })
            };
            let next = c.next(id, &format!("{f}.next"), &d.next, ids);
            Step::Delay {
                until: until?,
                next,
            }
        }
        Some(Kind::Wait(w)) => {
            let f = format!("{field}.wait");
            if w.branches.is_empty() || w.branches.len() > MAX_BRANCHES {
                c.problem(
                    id,
                    format!("{f}.branches"),
                    format!("must hold 1-{MAX_BRANCHES} branches"),
                );
            }
            let branches = w
                .branches
                .iter()
                .enumerate()
                .filter_map(|(i, b)| {
                    let bf = format!("{f}.branches[{i}]");
                    let matcher = c.matcher(id, &format!("{bf}.match"), b.r#match.as_ref());
                    let next = c.next(id, &format!("{bf}.next"), &b.next, ids);
                    let matcher = matcher?;
                    Some(WaitBranch {
                        name: if b.name.is_empty() {
                            matcher.event.clone()
                        } else {
                            b.name.clone()
                        },
                        matcher,
                        same_key: b.same_key.unwrap_or(true),
                        next,
                    })
                })
                .collect();
            let timeout = if w.timeout.is_empty() {
                c.problem(id, format!("{f}.timeout"), "is required: how long to wait");
                None
            } else {
                c.duration(id, &format!("{f}.timeout"), &w.timeout)
            };
            let timeout_next = c.next(id, &format!("{f}.timeout_next"), &w.timeout_next, ids);
            Step::Wait {
                branches,
                timeout_us: timeout?,
                timeout_next,
            }
        }
        Some(Kind::Message(m)) => {
            let f = format!("{field}.message");
            if m.channel.is_empty() || !valid_id(&m.channel) {
                c.problem(id, format!("{f}.channel"), format!("must be a channel name, 1-{MAX_ID_CHARS} characters of a-z, 0-9, `_` and `-`"));
            }
            if m.variants.is_empty() {
                c.problem(
                    id,
                    format!("{f}.variants"),
                    "must hold at least one variant",
                );
            }
            let variants = m
                .variants
                .iter()
                .enumerate()
                .filter_map(|(i, v)| {
                    let vf = format!("{f}.variants[{i}]");
                    for (j, e) in v.emotions.iter().enumerate() {
                        if !crate::EMOTION_LABELS.contains(&e.as_str()) {
                            c.problem(
                                id,
                                format!("{vf}.emotions[{j}]"),
                                format!("must be one of {}", crate::EMOTION_LABELS.join(", ")),
                            );
                        }
                    }
                    let subject = c.template(id, &format!("{vf}.subject"), &v.subject);
                    let body = c.template(id, &format!("{vf}.body"), &v.body);
                    Some(Variant {
                        name: if v.name.is_empty() {
                            format!("variants[{i}]")
                        } else {
                            v.name.clone()
                        },
                        emotions: v.emotions.clone(),
                        subject: subject?,
                        body: body?,
                    })
                })
                .collect();
            Step::Message {
                channel: m.channel.clone(),
                transactional: m.category == pb::MessageCategory::Transactional as i32,
                variants,
                skip_in_quiet_hours: m.quiet_hours == pb::QuietHoursAction::Skip as i32,
                next: c.next(id, &format!("{f}.next"), &m.next, ids),
            }
        }
        Some(Kind::Webhook(w)) => {
            let f = format!("{field}.webhook");
            if !(w.url.starts_with("http://") || w.url.starts_with("https://"))
                || w.url.len() > 2048
            {
                c.problem(
                    id,
                    format!("{f}.url"),
                    "must be an http or https URL of at most 2048 bytes",
                );
            }
            let body = if w.body.is_empty() {
                None
            } else {
                c.template(id, &format!("{f}.body"), &w.body)
            };
            Step::Webhook {
                url: w.url.clone(),
                body,
                next: c.next(id, &format!("{f}.next"), &w.next, ids),
                on_failure: c.next(id, &format!("{f}.on_failure"), &w.on_failure, ids),
            }
        }
        Some(Kind::UpdateTraits(u)) => {
            let f = format!("{field}.update_traits");
            let fields = u.traits.as_ref().map(|t| &t.fields);
            if fields.is_none_or(|t| t.is_empty()) {
                c.problem(id, format!("{f}.traits"), "must set at least one trait");
            }
            let traits = fields
                .into_iter()
                .flatten()
                .filter_map(|(k, v)| match &v.kind {
                    Some(prost_types::value::Kind::StringValue(s)) => c
                        .template(id, &format!("{f}.traits.{k}"), s)
                        .map(|t| (k.clone(), TraitValue::Template(t))),
                    _ => Some((k.clone(), TraitValue::Value(v.clone()))),
                })
                .collect();
            Step::UpdateTraits {
                traits,
                next: c.next(id, &format!("{f}.next"), &u.next, ids),
            }
        }
        Some(Kind::Escalate(e)) => {
            let f = format!("{field}.escalate");
            let priority = if e.priority.is_empty() {
                "normal".to_owned()
            } else {
                e.priority.clone()
            };
            if !["low", "normal", "high", "urgent"].contains(&priority.as_str()) {
                c.problem(
                    id,
                    format!("{f}.priority"),
                    "must be low, normal, high or urgent",
                );
            }
            let reason = c.template(id, &format!("{f}.reason"), &e.reason);
            Step::Escalate {
                priority,
                reason: reason?,
                next: c.next(id, &format!("{f}.next"), &e.next, ids),
            }
        }
        Some(Kind::Exit(e)) => Step::Exit {
            reason: if e.reason.is_empty() {
                "exit node".to_owned()
            } else {
                e.reason.clone()
            },
        },
    };
    (c.problems.len() == before).then_some(step)
}

/// A loop of steps that never waits would run forever within one event: every cycle must
/// pass a delay or a wait.
fn check_cycles(
    c: &mut Checker,
    nodes: &HashMap<String, Step>,
    definition: &pb::JourneyDefinition,
) {
    // Depth-first search over the instantaneous steps only.
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    let mut marks: HashMap<&str, Mark> = nodes.keys().map(|k| (k.as_str(), Mark::New)).collect();
    for start in &definition.nodes {
        if marks.get(start.id.as_str()) != Some(&Mark::New) {
            continue;
        }
        let mut stack: Vec<(&str, usize)> = vec![(start.id.as_str(), 0)];
        marks.insert(start.id.as_str(), Mark::Open);
        while let Some((id, i)) = stack.pop() {
            let step = &nodes[id];
            let next = if step.waits() {
                None
            } else {
                step.successors().get(i).copied()
            };
            match next {
                None => {
                    marks.insert(id, Mark::Done);
                }
                Some(n) => {
                    stack.push((id, i + 1));
                    match marks.get(n).copied() {
                        Some(Mark::New) => {
                            marks.insert(n, Mark::Open);
                            stack.push((n, 0));
                        }
                        Some(Mark::Open) => {
                            c.problem(
                                n,
                                "nodes",
                                format!("node `{n}` is part of a loop without a delay or a wait, which would never stop"),
                            );
                            return;
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn definition(json: serde_json::Value) -> pb::JourneyDefinition {
        waymark_proto::proto_json::from_json(&json).unwrap()
    }

    fn problems(json: serde_json::Value) -> Vec<(String, String, String)> {
        match compile(&definition(json), 1) {
            Ok(_) => Vec::new(),
            Err(p) => p
                .into_iter()
                .map(|p| (p.node_id, p.field, p.problem))
                .collect(),
        }
    }

    #[test]
    fn every_problem_is_reported_with_its_node_and_field() {
        let found = problems(serde_json::json!({
            "journeyId": "Bad Id",
            "entry": {"trigger": {"event": "Signed Up", "condition": "event.properties.plan =="}, "start": "missing"},
            "nodes": [
                {"id": "split", "split": {"branches": [{"condition": "traits.vip", "next": "nowhere"}]}},
                {"id": "wait", "wait": {"branches": [{"match": {"event": "Order Completed"}}], "timeout": "2 days"}},
                {"id": "send", "message": {"channel": "email", "variants": [{"emotions": ["grumpy"], "body": "hi"}]}},
                {"id": "send", "exit": {}}
            ]
        }));
        let has = |node: &str, field: &str| found.iter().any(|(n, f, _)| n == node && f == field);
        assert!(has("", "journey_id"), "{found:?}");
        assert!(has("", "entry.trigger.condition"), "{found:?}");
        assert!(has("", "entry.start"), "{found:?}");
        assert!(has("split", "nodes[0].split.branches[0].next"), "{found:?}");
        assert!(has("wait", "nodes[1].wait.timeout"), "{found:?}");
        assert!(
            has("send", "nodes[2].message.variants[0].emotions[0]"),
            "{found:?}"
        );
        assert!(has("send", "nodes[3].id"), "{found:?}");
        let condition = found
            .iter()
            .find(|(_, f, _)| f == "entry.trigger.condition")
            .unwrap();
        assert!(
            condition.2.contains("line 1"),
            "a parse error says where: {}",
            condition.2
        );
    }

    #[test]
    fn conditions_are_type_checked_like_segments() {
        let found = problems(serde_json::json!({
            "journeyId": "typed",
            "entry": {"trigger": {"event": "Emotion Changed", "condition": "emotion.label == 3"}, "start": "done"},
            "nodes": [{"id": "done", "exit": {}}]
        }));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].1, "entry.trigger.condition");
    }

    #[test]
    fn a_loop_must_pass_a_wait() {
        let looping = serde_json::json!({
            "journeyId": "loop",
            "entry": {"trigger": {"event": "Signed Up"}, "start": "a"},
            "nodes": [
                {"id": "a", "split": {"branches": [{"condition": "true", "next": "b"}]}},
                {"id": "b", "updateTraits": {"traits": {"seen": true}, "next": "a"}}
            ]
        });
        let found = problems(looping);
        assert!(
            found.iter().any(|(_, _, p)| p.contains("loop")),
            "{found:?}"
        );

        let waiting = serde_json::json!({
            "journeyId": "loop",
            "entry": {"trigger": {"event": "Signed Up"}, "start": "a"},
            "nodes": [
                {"id": "a", "split": {"branches": [{"condition": "true", "next": "b"}]}},
                {"id": "b", "delay": {"duration": "1d", "next": "a"}}
            ]
        });
        assert_eq!(problems(waiting), Vec::new());
    }

    #[test]
    fn keyed_entries_default_to_ten_concurrent_and_plain_ones_to_one() {
        let keyed = compile(
            &definition(serde_json::json!({
                "journeyId": "cart",
                "entry": {"trigger": {"event": "Cart Updated"}, "start": "x", "keyProperty": "cart_id"},
                "nodes": [{"id": "x", "exit": {}}]
            })),
            1,
        )
        .ok()
        .unwrap();
        assert_eq!(keyed.entry.max_concurrent, 10);
        assert_eq!(keyed.entry.key_property.as_deref(), Some("cart_id"));
    }
}
