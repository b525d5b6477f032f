//! Semantic validation per message type, clock-skew correction and the fields ingestion
//! assigns (event id, receivedAt, source, channel).

use prost::Message;
use prost_types::Timestamp;
use waymark_identity::{IdentityRules, MAX_CONSENT_NAME_BYTES, MAX_IDENTIFIER_BYTES, check_object};
use waymark_kit::error::FieldViolation;
use waymark_proto::common::v1::{Channel, Event, EventType};
use waymark_proto::json::string_at;

use crate::channel::derive_channel;

/// Largest accepted event, as Segment allows.
pub const MAX_EVENT_BYTES: usize = 32 * 1024;
/// Largest accepted HTTP batch body, as Segment allows, measured after gzip inflation.
pub const MAX_BATCH_BYTES: usize = 500 * 1024;
/// Most messages in one request (HTTP batch or gRPC `Ingest`): a 500 KB body of tiny
/// messages would otherwise be a hundred thousand events to parse, check and commit at once.
/// Segment SDKs flush at 100 or so; a bulk import fits many full batches.
pub const MAX_BATCH_MESSAGES: usize = 2_500;
/// Largest a batch may grow to once its batch-level `context` and `integrations` are
/// copied into every message lacking its own: what a request may make the server hold,
/// whatever it saved by sharing. The size of the outbox packs that relay it.
pub const MAX_EXPANDED_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Deepest nesting of properties, traits, context and integrations: shared with the
/// profile service's trusted updates, so it lives in `waymark-identity`.
pub use waymark_identity::MAX_DEPTH;
/// Longest event name (track) or page / screen name, in bytes: names are counted per
/// profile and matched by segment conditions, they are never prose.
pub const MAX_NAME_BYTES: usize = 200;
/// Track events whose `properties.channel` and `properties.purpose` name a consent, as the
/// profile service reads them.
const CONSENT_EVENTS: [&str; 5] = [
    "Subscribed",
    "Unsubscribed",
    "Consent Granted",
    "Consent Denied",
    "Consent Revoked",
];

/// Checks the size, the limits and the rules of the event's type. Field names follow
/// Segment's JSON.
pub fn validate(event: &Event, rules: &IdentityRules) -> Result<(), FieldViolation> {
    if event.encoded_len() > MAX_EVENT_BYTES {
        return Err(FieldViolation::new(
            "",
            format!("event is larger than {} KB", MAX_EVENT_BYTES / 1024),
        ));
    }
    let kind = event.r#type();
    if kind == EventType::Unspecified {
        return Err(FieldViolation::new("type", "is required"));
    }
    if event.message_id.len() > MAX_IDENTIFIER_BYTES {
        return Err(FieldViolation::new(
            "messageId",
            format!("is longer than {MAX_IDENTIFIER_BYTES} bytes"),
        ));
    }
    if let Some((field, len)) = rules.oversized_identifier(event) {
        return Err(FieldViolation::new(
            field,
            format!(
                "is {len} bytes, longer than the {MAX_IDENTIFIER_BYTES} bytes an identifier may have"
            ),
        ));
    }
    for (name, value) in [("event", &event.event), ("name", &event.name)] {
        if value.len() > MAX_NAME_BYTES {
            return Err(FieldViolation::new(
                name,
                format!("is longer than {MAX_NAME_BYTES} bytes"),
            ));
        }
    }
    for (name, object) in [
        ("properties", &event.properties),
        ("traits", &event.traits),
        ("context", &event.context),
        ("integrations", &event.integrations),
    ] {
        if let Some(object) = object {
            check_object(name, object)
                .map_err(|(field, problem)| FieldViolation::new(field, problem))?;
        }
    }
    if kind == EventType::Track
        && CONSENT_EVENTS.contains(&event.event.as_str())
        && let Some(properties) = &event.properties
    {
        for key in ["channel", "purpose"] {
            if string_at(properties, &[key]).is_some_and(|v| v.len() > MAX_CONSENT_NAME_BYTES) {
                return Err(FieldViolation::new(
                    format!("properties.{key}"),
                    format!("is longer than {MAX_CONSENT_NAME_BYTES} bytes"),
                ));
            }
        }
    }
    if event.user_id.trim().is_empty() && event.anonymous_id.trim().is_empty() {
        return Err(FieldViolation::new(
            "userId",
            "userId or anonymousId is required",
        ));
    }
    match kind {
        EventType::Track if event.event.trim().is_empty() => {
            Err(FieldViolation::new("event", "is required for track"))
        }
        EventType::Alias if event.previous_id.trim().is_empty() => {
            Err(FieldViolation::new("previousId", "is required for alias"))
        }
        EventType::Alias if event.user_id.trim().is_empty() => {
            Err(FieldViolation::new("userId", "is required for alias"))
        }
        EventType::Group if event.group_id.trim().is_empty() => {
            Err(FieldViolation::new("groupId", "is required for group"))
        }
        _ => Ok(()),
    }
}

/// Corrects the event time for the client's clock skew, as Segment does:
/// `timestamp = receivedAt - (sentAt - originalTimestamp)`. Without `sentAt` the client's
/// time is kept (e.g. historical imports); without either, the event happened on receipt.
pub fn corrected_timestamp(
    original: Option<Timestamp>,
    sent_at: Option<Timestamp>,
    received_at: Timestamp,
) -> Timestamp {
    match (original, sent_at) {
        (Some(original), Some(sent)) => {
            let skew = nanos(&sent) - nanos(&original);
            from_nanos(nanos(&received_at) - skew)
        }
        (Some(original), None) => original,
        _ => received_at,
    }
}

/// Fills in what ingestion assigns to a valid event.
pub fn prepare(mut event: Event, source_id: &str, received_at: Timestamp) -> Event {
    if event.message_id.is_empty() {
        event.message_id = uuid::Uuid::now_v7().to_string();
    }
    event.event_id = uuid::Uuid::now_v7().to_string();
    event.source_id = source_id.to_owned();
    event.profile_id.clear();
    if event.original_timestamp.is_none() {
        // gRPC clients may put the client time in `timestamp` alone.
        event.original_timestamp = event.timestamp.take();
    }
    event.timestamp = Some(corrected_timestamp(
        event.original_timestamp,
        event.sent_at,
        received_at,
    ));
    event.received_at = Some(received_at);
    if event.channel() == Channel::Unspecified {
        let channel = derive_channel(&event);
        event.set_channel(channel);
    }
    event
}

fn nanos(t: &Timestamp) -> i128 {
    i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos)
}

fn from_nanos(n: i128) -> Timestamp {
    Timestamp {
        seconds: n.div_euclid(1_000_000_000) as i64,
        nanos: n.rem_euclid(1_000_000_000) as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::parse_timestamp;
    use prost_types::Struct;
    use waymark_identity::MAX_KEY_BYTES;

    fn ts(s: &str) -> Timestamp {
        parse_timestamp(s).unwrap()
    }

    fn track() -> Event {
        let mut e = Event {
            event: "Viewed".into(),
            anonymous_id: "a1".into(),
            ..Event::default()
        };
        e.set_type(EventType::Track);
        e
    }

    #[test]
    fn skew_is_corrected_from_sent_at() {
        // The client clock runs 10 minutes fast: sentAt and originalTimestamp both carry it.
        let corrected = corrected_timestamp(
            Some(ts("2026-01-01T12:09:00Z")),
            Some(ts("2026-01-01T12:10:00Z")),
            ts("2026-01-01T12:00:00.500Z"),
        );
        assert_eq!(corrected, ts("2026-01-01T11:59:00.500Z"));
    }

    #[test]
    fn without_sent_at_the_client_time_is_kept_and_without_any_receipt_time_is_used() {
        let original = ts("2020-05-05T00:00:00Z");
        let received = ts("2026-01-01T00:00:00Z");
        assert_eq!(
            corrected_timestamp(Some(original), None, received),
            original
        );
        assert_eq!(
            corrected_timestamp(None, Some(original), received),
            received
        );
    }

    #[test]
    fn rules_per_type() {
        let mut e = track();
        e.event.clear();
        assert_eq!(validate(&e, &rules()).unwrap_err().field, "event");

        let mut e = track();
        e.anonymous_id.clear();
        assert_eq!(validate(&e, &rules()).unwrap_err().field, "userId");

        let mut e = track();
        e.set_type(EventType::Alias);
        e.user_id = "u1".into();
        assert_eq!(validate(&e, &rules()).unwrap_err().field, "previousId");
        e.previous_id = "a1".into();
        assert!(validate(&e, &rules()).is_ok());

        let mut e = track();
        e.set_type(EventType::Group);
        assert_eq!(validate(&e, &rules()).unwrap_err().field, "groupId");

        let mut e = track();
        e.set_type(EventType::Unspecified);
        assert_eq!(validate(&e, &rules()).unwrap_err().field, "type");

        let mut e = track();
        e.message_id = "x".repeat(300);
        assert_eq!(validate(&e, &rules()).unwrap_err().field, "messageId");
    }

    fn rules() -> IdentityRules {
        IdentityRules::new(vec!["loyalty_id".into()], &Default::default(), &[]).unwrap()
    }

    fn object(v: serde_json::Value) -> Struct {
        waymark_proto::json::struct_from_json(v.as_object().unwrap().clone())
    }

    /// `levels` objects and arrays, alternating, the outermost an object.
    fn nested(levels: usize) -> serde_json::Value {
        let mut v = serde_json::json!(1);
        for level in (1..levels).rev() {
            v = if level % 2 == 0 {
                serde_json::json!([v])
            } else {
                serde_json::json!({ "k": v })
            };
        }
        serde_json::json!({ "k": v })
    }

    #[test]
    fn nesting_is_limited_and_the_deep_field_named() {
        let mut e = track();
        e.properties = Some(object(nested(MAX_DEPTH)));
        assert!(validate(&e, &rules()).is_ok());
        e.properties = Some(object(nested(MAX_DEPTH + 1)));
        let err = validate(&e, &rules()).unwrap_err();
        assert!(
            err.field.starts_with("properties.k.k[0].k"),
            "{}",
            err.field
        );
        assert!(err.description.contains("16 levels"), "{}", err.description);
        let mut e = track();
        e.context = Some(object(serde_json::json!({"a": {"b": nested(MAX_DEPTH)}})));
        assert!(
            validate(&e, &rules())
                .unwrap_err()
                .field
                .starts_with("context.a.b.k")
        );
    }

    #[test]
    fn names_keys_and_identifiers_have_limits() {
        let mut e = track();
        e.event = "e".repeat(MAX_NAME_BYTES + 1);
        assert_eq!(validate(&e, &rules()).unwrap_err().field, "event");
        let mut e = track();
        e.set_type(EventType::Page);
        e.name = "é".repeat(MAX_NAME_BYTES / 2 + 1);
        assert_eq!(
            validate(&e, &rules()).unwrap_err().field,
            "name",
            "bytes, not characters"
        );
        let mut e = track();
        e.traits = Some(object(
            serde_json::json!({"a": {"k".repeat(MAX_KEY_BYTES + 1): 1}}),
        ));
        let err = validate(&e, &rules()).unwrap_err();
        assert_eq!(err.field, "traits.a");
        assert!(err.description.contains("key longer than 256 bytes"));
        let mut e = track();
        e.context = Some(object(
            serde_json::json!({"traits": {"loyalty_id": "l".repeat(2000)}}),
        ));
        let err = validate(&e, &rules()).unwrap_err();
        assert_eq!(err.field, "context.traits.loyalty_id");
        assert!(
            err.description.contains("2000 bytes"),
            "{}",
            err.description
        );
        let mut e = track();
        e.event = "Unsubscribed".into();
        e.properties = Some(object(serde_json::json!({"channel": "c".repeat(65)})));
        assert_eq!(
            validate(&e, &rules()).unwrap_err().field,
            "properties.channel"
        );
        e.event = "Viewed".into();
        assert!(
            validate(&e, &rules()).is_ok(),
            "only consent events name a channel"
        );
    }

    #[test]
    fn prepare_assigns_ids_times_and_channel() {
        let received = ts("2026-03-01T00:00:00Z");
        let e = prepare(track(), "src-1", received);
        assert!(!e.message_id.is_empty());
        assert!(!e.event_id.is_empty());
        assert_eq!(e.source_id, "src-1");
        assert_eq!(e.received_at, Some(received));
        assert_eq!(e.timestamp, Some(received));
        assert_eq!(e.channel(), Channel::Other);
    }

    #[test]
    fn oversized_events_are_rejected() {
        let mut e = track();
        e.event = "x".repeat(40 * 1024);
        let err = validate(&e, &rules()).unwrap_err();
        assert!(err.description.contains("32 KB"));
    }
}
