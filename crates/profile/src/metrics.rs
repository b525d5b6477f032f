//! The profile service's own counters; request counts and latencies per RPC come from the
//! kit's gRPC layer, cache hits and misses from the cache.

use opentelemetry::KeyValue;
use opentelemetry::metrics::Counter;
use waymark_proto::common::v1::Event;

/// Counters bound to the global meter `waymark`.
pub(crate) struct Metrics {
    /// Delivered events by outcome: applied, duplicate, suppressed, unattributed.
    events: Counter<u64>,
    /// Events the service itself emits, by name: Trait Changed, Emotion Changed, Segment
    /// Entered / Exited, Profile Merged / Unmerged / Deleted.
    emitted: Counter<u64>,
    /// Identifiers of delivered events that break their type's rule, by type and rule.
    identifiers_dropped: Counter<u64>,
    /// Events whose identifiers pointed at profiles an Unmerge keeps apart: applied to
    /// one, without merging.
    kept_apart: Counter<u64>,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let meter = opentelemetry::global::meter("waymark");
        Self {
            events: meter
                .u64_counter("profile.events")
                .with_description("delivered events by outcome")
                .build(),
            emitted: meter
                .u64_counter("profile.emitted_events")
                .with_description("events the profile service emitted, by name")
                .build(),
            identifiers_dropped: meter
                .u64_counter("profile.identifiers_dropped")
                .with_description("identifiers that break their type's rule, by type and rule")
                .build(),
            kept_apart: meter
                .u64_counter("profile.merges_kept_apart")
                .with_description(
                    "events linking profiles an unmerge keeps apart, applied without merging",
                )
                .build(),
        }
    }

    pub(crate) fn kept_apart(&self, count: usize) {
        if count > 0 {
            self.kept_apart.add(count as u64, &[]);
        }
    }

    pub(crate) fn delivered(&self, outcome: &'static str, count: usize) {
        if count > 0 {
            self.events
                .add(count as u64, &[KeyValue::new("outcome", outcome)]);
        }
    }

    pub(crate) fn identifier_dropped(&self, id_type: &str, rule: &'static str) {
        self.identifiers_dropped.add(
            1,
            &[
                KeyValue::new("type", id_type.to_owned()),
                KeyValue::new("rule", rule),
            ],
        );
    }

    pub(crate) fn emitted<'a>(&self, events: impl IntoIterator<Item = &'a Event>) {
        for event in events {
            self.emitted
                .add(1, &[KeyValue::new("name", event.event.clone())]);
        }
    }
}
