//! Semantic validation per message type, clock-skew correction and the fields ingestion
//! assigns (event id, receivedAt, source, channel).

use prost::Message;
use prost_types::Timestamp;
use waymark_kit::error::FieldViolation;
use waymark_proto::common::v1::{Channel, Event, EventType};

use crate::channel::derive_channel;

/// Largest accepted event, as Segment allows.
pub const MAX_EVENT_BYTES: usize = 32 * 1024;
/// Largest accepted HTTP batch body, as Segment allows.
pub const MAX_BATCH_BYTES: usize = 500 * 1024;
/// Longest accepted id (messageId, userId, ...).
const MAX_ID_CHARS: usize = 255;

/// Checks the size and the rules of the event's type. Field names follow Segment's JSON.
pub fn validate(event: &Event) -> Result<(), FieldViolation> {
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
    for (name, value) in [
        ("messageId", &event.message_id),
        ("userId", &event.user_id),
        ("anonymousId", &event.anonymous_id),
        ("previousId", &event.previous_id),
        ("groupId", &event.group_id),
    ] {
        if value.chars().count() > MAX_ID_CHARS {
            return Err(FieldViolation::new(
                name,
                format!("is longer than {MAX_ID_CHARS} characters"),
            ));
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

/// Microseconds since the epoch, the stored form of times.
pub fn micros(t: &Timestamp) -> i64 {
    (nanos(t) / 1000) as i64
}

/// A timestamp from stored microseconds.
pub fn from_micros(us: i64) -> Timestamp {
    from_nanos(i128::from(us) * 1000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::parse_timestamp;

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
        assert_eq!(validate(&e).unwrap_err().field, "event");

        let mut e = track();
        e.anonymous_id.clear();
        assert_eq!(validate(&e).unwrap_err().field, "userId");

        let mut e = track();
        e.set_type(EventType::Alias);
        e.user_id = "u1".into();
        assert_eq!(validate(&e).unwrap_err().field, "previousId");
        e.previous_id = "a1".into();
        assert!(validate(&e).is_ok());

        let mut e = track();
        e.set_type(EventType::Group);
        assert_eq!(validate(&e).unwrap_err().field, "groupId");

        let mut e = track();
        e.set_type(EventType::Unspecified);
        assert_eq!(validate(&e).unwrap_err().field, "type");

        let mut e = track();
        e.message_id = "x".repeat(300);
        assert_eq!(validate(&e).unwrap_err().field, "messageId");
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
        let err = validate(&e).unwrap_err();
        assert!(err.description.contains("32 KB"));
    }

    #[test]
    fn micros_round_trip() {
        let t = ts("2026-01-01T00:00:00.123456Z");
        assert_eq!(from_micros(micros(&t)), t);
    }
}
