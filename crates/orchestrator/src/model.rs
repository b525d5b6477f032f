//! The orchestrator's records as plain Rust: enrollments, the steps they take, outbound
//! actions and escalation cases. The store persists them; the engine decides them.

use serde_json::{Map, Value as Json};
use waymark_proto::orchestration::v1 as pb;

/// An enrollment's state (`EnrollmentStatus` in the proto).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Active = 1,
    Completed = 2,
    Converted = 3,
    Exited = 4,
    Errored = 5,
}

impl Status {
    pub fn from_i32(n: i32) -> Status {
        match n {
            2 => Status::Completed,
            3 => Status::Converted,
            4 => Status::Exited,
            5 => Status::Errored,
            _ => Status::Active,
        }
    }

    pub fn proto(self) -> pb::EnrollmentStatus {
        match self {
            Status::Active => pb::EnrollmentStatus::Active,
            Status::Completed => pb::EnrollmentStatus::Completed,
            Status::Converted => pb::EnrollmentStatus::Converted,
            Status::Exited => pb::EnrollmentStatus::Exited,
            Status::Errored => pb::EnrollmentStatus::Errored,
        }
    }
}

/// What an active enrollment is waiting for at its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Waiting {
    /// Running (between steps); never stored.
    Nothing,
    /// A delay, until `waiting_until`.
    Time,
    /// One of a wait's events, or its timeout at `waiting_until`.
    Event,
    /// A message deferred by quiet hours until `waiting_until`; the action's id.
    Deferred(String),
    /// A webhook's outcome; the action's id.
    Action(String),
    /// Runs its node afresh when `waiting_until` comes (an enrollment moved to a new
    /// version at a node that is not a wait).
    Resume,
    /// Held out of a random split: nothing happens until the goal, an exit, or
    /// `waiting_until` (the holdout window) ends it.
    Holdout,
}

impl Waiting {
    /// The stored form: a kind and the action id it refers to.
    pub fn encode(&self) -> (i16, &str) {
        match self {
            Waiting::Nothing => (0, ""),
            Waiting::Time => (1, ""),
            Waiting::Event => (2, ""),
            Waiting::Deferred(a) => (3, a),
            Waiting::Action(a) => (4, a),
            Waiting::Resume => (5, ""),
            Waiting::Holdout => (6, ""),
        }
    }

    pub fn decode(kind: i16, action: String) -> Waiting {
        match kind {
            1 => Waiting::Time,
            2 => Waiting::Event,
            3 => Waiting::Deferred(action),
            4 => Waiting::Action(action),
            5 => Waiting::Resume,
            6 => Waiting::Holdout,
            _ => Waiting::Nothing,
        }
    }
}

/// One profile's passage through one journey version.
#[derive(Debug, Clone, PartialEq)]
pub struct Enrollment {
    pub enrollment_id: String,
    pub journey_id: String,
    pub version: u32,
    pub profile_id: String,
    /// The profile's user id as last seen (the profile's, else the events'), carried by the
    /// step events; empty while the customer is anonymous.
    pub user_id: String,
    /// The entry key; empty for an unkeyed entry.
    pub key: String,
    pub status: Status,
    pub node_id: String,
    pub waiting: Waiting,
    /// When the wait ends (a delay, a timeout, a deferral); `None` otherwise.
    pub waiting_until: Option<i64>,
    pub entered_at: i64,
    pub ended_at: Option<i64>,
    pub reason: String,
    /// The triggering event's properties, plus what steps added.
    pub context: Map<String, Json>,
    /// Steps recorded so far: the next step's number, and the optimistic lock that keeps
    /// two replicas from moving one enrollment at once.
    pub seq: i64,
}

impl Enrollment {
    pub fn is_active(&self) -> bool {
        self.status == Status::Active
    }
}

/// One recorded step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepRecord {
    pub enrollment_id: String,
    pub seq: i64,
    pub node_id: String,
    pub outcome: String,
    pub decision: String,
    pub detail: Map<String, Json>,
    pub at: i64,
}

/// What an outbound action is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActionKind {
    Message,
    Webhook,
    UpdateTraits,
    Escalate,
}

impl ActionKind {
    pub fn name(self) -> &'static str {
        match self {
            ActionKind::Message => "message",
            ActionKind::Webhook => "webhook",
            ActionKind::UpdateTraits => "update_traits",
            ActionKind::Escalate => "escalate",
        }
    }

    pub fn parse(name: &str) -> Option<ActionKind> {
        [
            ActionKind::Message,
            ActionKind::Webhook,
            ActionKind::UpdateTraits,
            ActionKind::Escalate,
        ]
        .into_iter()
        .find(|k| k.name() == name)
    }
}

/// An action's state (`ActionStatus` in the proto).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActionStatus {
    Pending = 1,
    Sent = 2,
    Deferred = 3,
    Suppressed = 4,
    Failed = 5,
}

impl ActionStatus {
    pub fn from_i32(n: i32) -> ActionStatus {
        match n {
            2 => ActionStatus::Sent,
            3 => ActionStatus::Deferred,
            4 => ActionStatus::Suppressed,
            5 => ActionStatus::Failed,
            _ => ActionStatus::Pending,
        }
    }
}

/// An outbound action a step decided. Its id is the idempotency key
/// `<enrollment>:<node>:<step number>`: the same step always makes the same id, so a
/// retried step or a redelivered event cannot act twice.
#[derive(Debug, Clone, PartialEq)]
pub struct Action {
    pub action_id: String,
    pub enrollment_id: String,
    pub journey_id: String,
    pub node_id: String,
    pub profile_id: String,
    pub kind: ActionKind,
    /// A message's channel, a webhook's URL.
    pub target: String,
    pub status: ActionStatus,
    pub reason: String,
    pub due_at: i64,
    pub payload: Json,
    /// A marketing message counts towards contact caps.
    pub marketing: bool,
    pub priority: u32,
}

/// An escalation to a human.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    pub case_id: String,
    pub profile_id: String,
    pub journey_id: String,
    pub enrollment_id: String,
    pub priority: String,
    pub reason: String,
    pub opened_at: i64,
}

/// A marketing message sent to a profile, as contact caps count it.
#[derive(Debug, Clone, PartialEq)]
pub struct Contact {
    pub channel: String,
    pub at: i64,
}
