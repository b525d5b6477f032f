//! The orchestrator's own instruments; request counts and latencies per RPC come from the
//! kit's gRPC layer.

use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};

use crate::model::{ActionStatus, StepRecord};

/// Instruments bound to the global meter `waymark`.
pub(crate) struct Metrics {
    /// Enrollments made, by journey.
    entered: Counter<u64>,
    /// Steps taken, by outcome (`branch`, `sent`, `suppressed`, `goal`...).
    steps: Counter<u64>,
    /// Outbound action attempts, by kind and outcome (sent, pending = will retry, failed).
    actions: Counter<u64>,
    /// How long an outbound action attempt took, by kind.
    action_duration: Histogram<f64>,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let meter = opentelemetry::global::meter("waymark");
        Self {
            entered: meter
                .u64_counter("orchestrator.enrollments")
                .with_description("enrollments made, by journey")
                .build(),
            steps: meter
                .u64_counter("orchestrator.steps")
                .with_description("journey steps taken, by outcome")
                .build(),
            actions: meter
                .u64_counter("orchestrator.actions")
                .with_description("outbound action attempts, by kind and outcome")
                .build(),
            action_duration: meter
                .f64_histogram("orchestrator.action.duration")
                .with_unit("s")
                .with_description("how long an outbound action attempt took, by kind")
                .build(),
        }
    }

    pub(crate) fn entered(&self, journey_id: &str) {
        self.entered
            .add(1, &[KeyValue::new("journey", journey_id.to_owned())]);
    }

    pub(crate) fn steps(&self, steps: &[StepRecord]) {
        for s in steps {
            self.steps
                .add(1, &[KeyValue::new("outcome", s.outcome.clone())]);
        }
    }

    pub(crate) fn action(&self, kind: &str, status: ActionStatus, took: Duration) {
        let outcome = match status {
            ActionStatus::Sent => "sent",
            ActionStatus::Failed => "failed",
            _ => "retry",
        };
        let kind = KeyValue::new("kind", kind.to_owned());
        self.actions
            .add(1, &[kind.clone(), KeyValue::new("outcome", outcome)]);
        self.action_duration.record(took.as_secs_f64(), &[kind]);
    }
}
