//! The analytics service's own instruments; request counts and latencies per RPC come
//! from the kit's gRPC layer.

use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};
use waymark_proto::common::v1::DeliverResponse;

/// Instruments bound to the global meter `waymark`.
pub(crate) struct Metrics {
    /// Delivered events, by outcome (applied, duplicate, suppressed, unattributed, rejected).
    events: Counter<u64>,
    /// How long a query ran in memory, by query and outcome.
    query_duration: Histogram<f64>,
    /// Traits written back to profiles, by outcome.
    write_backs: Counter<u64>,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let meter = opentelemetry::global::meter("waymark");
        Self {
            events: meter
                .u64_counter("analytics.events")
                .with_description("delivered events, by outcome")
                .build(),
            query_duration: meter
                .f64_histogram("analytics.query.duration")
                .with_unit("s")
                .with_description("how long a query ran over memory, by query and outcome")
                .build(),
            write_backs: meter
                .u64_counter("analytics.write_backs")
                .with_description("stage and stuck traits written back to profiles, by outcome")
                .build(),
        }
    }

    pub(crate) fn delivered(&self, r: &DeliverResponse) {
        for (outcome, n) in [
            ("applied", r.applied),
            ("duplicate", r.duplicates),
            ("suppressed", r.suppressed),
            ("unattributed", r.unattributed),
            ("rejected", r.rejected.len() as u32),
        ] {
            if n > 0 {
                self.events
                    .add(u64::from(n), &[KeyValue::new("outcome", outcome)]);
            }
        }
    }

    pub(crate) fn query(&self, query: &'static str, took: Duration, ok: bool) {
        self.query_duration.record(
            took.as_secs_f64(),
            &[
                KeyValue::new("query", query),
                KeyValue::new("outcome", if ok { "ok" } else { "error" }),
            ],
        );
    }

    pub(crate) fn written_back(&self, outcome: &'static str, n: u64) {
        if n > 0 {
            self.write_backs
                .add(n, &[KeyValue::new("outcome", outcome)]);
        }
    }
}
