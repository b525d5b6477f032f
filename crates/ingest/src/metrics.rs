//! `ingest.events{outcome, reason}`: what happened to each event ingestion received.
//! Request counts and latencies come from the kit's gRPC layer.

use opentelemetry::KeyValue;
use opentelemetry::metrics::Counter;

/// The counters, bound to the global meter `waymark` when created.
#[derive(Clone)]
pub(crate) struct EventMetrics(Counter<u64>, Counter<u64>);

impl EventMetrics {
    pub(crate) fn new() -> Self {
        let meter = opentelemetry::global::meter("waymark");
        Self(
            meter
                .u64_counter("ingest.events")
                .with_description("events received, by outcome (and reason, when rejected)")
                .build(),
            meter
                .u64_counter("ingest.identifiers_dropped")
                .with_description("identifiers of accepted events that break their type's rule")
                .build(),
        )
    }

    /// Counts an identifier that identifies nobody because it breaks `rule`.
    pub(crate) fn identifier_dropped(&self, id_type: &str, rule: &'static str) {
        self.1.add(
            1,
            &[
                KeyValue::new("type", id_type.to_owned()),
                KeyValue::new("rule", rule),
            ],
        );
    }

    /// Counts `n` events with `outcome`: accepted, duplicate or suppressed.
    pub(crate) fn counted(&self, outcome: &'static str, n: u64) {
        if n > 0 {
            self.0.add(n, &[KeyValue::new("outcome", outcome)]);
        }
    }

    /// Counts `n` rejected events for `reason`.
    pub(crate) fn rejected(&self, reason: String, n: u64) {
        if n > 0 {
            self.0.add(
                n,
                &[
                    KeyValue::new("outcome", "rejected"),
                    KeyValue::new("reason", reason),
                ],
            );
        }
    }
}

/// A field violation's reason as a metric attribute: the top-level Segment field it
/// concerns, without the message's index or any deeper path (`batch[3].properties.a.b` is
/// `properties`), so the attribute's values stay few.
pub(crate) fn reason(field: &str) -> String {
    let per_message = field.starts_with("batch[") || field.starts_with("events[");
    let within = match field.find("].") {
        Some(i) if per_message => &field[i + 2..],
        _ if per_message => "",
        _ => field,
    };
    within
        .split(['.', '['])
        .next()
        .filter(|s| !s.is_empty())
        .unwrap_or("message")
        .to_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn reasons_are_top_level_fields() {
        assert_eq!(
            super::reason("batch[3].properties.cart.items[2]"),
            "properties"
        );
        assert_eq!(super::reason("events[0].userId"), "userId");
        assert_eq!(super::reason("batch[1]"), "message");
        assert_eq!(super::reason("writeKey"), "writeKey");
    }
}
