//! The Segment wire format (which RudderStack SDKs speak too): JSON messages to `Event`s
//! and back, for the CLI. This is the structural half of validation (types of fields,
//! timestamp syntax); the semantic rules live in [`crate::validate`].

use chrono::{DateTime, NaiveDateTime, Utc};
use prost::Message;
use prost_types::{Struct, Timestamp};
use serde_json::{Map, Value};
use waymark_kit::error::FieldViolation;
use waymark_proto::common::v1::{Event, EventType};
use waymark_proto::json::struct_from_json;

/// Batch-level fields that apply to every message lacking its own. They are converted
/// once; a message gets its copy only when it is parsed.
#[derive(Debug, Default, Clone)]
pub struct BatchDefaults {
    /// `sentAt` of the batch.
    pub sent_at: Option<Timestamp>,
    /// `context` of the batch.
    pub context: Option<Struct>,
    /// `integrations` of the batch.
    pub integrations: Option<Struct>,
}

impl BatchDefaults {
    /// The encoded bytes `message` would gain from the batch's context and integrations.
    pub fn inherited_bytes(&self, message: &Map<String, Value>) -> usize {
        let lacks = |key: &str| matches!(message.get(key), None | Some(Value::Null));
        [
            ("context", &self.context),
            ("integrations", &self.integrations),
        ]
        .into_iter()
        .filter(|(key, _)| lacks(key))
        .filter_map(|(_, value)| value.as_ref())
        .map(Message::encoded_len)
        .sum()
    }
}

/// Parses a message type name.
pub fn parse_type(name: &str) -> Option<EventType> {
    Some(match name {
        "track" => EventType::Track,
        "identify" => EventType::Identify,
        "page" => EventType::Page,
        "screen" => EventType::Screen,
        "group" => EventType::Group,
        "alias" => EventType::Alias,
        _ => return None,
    })
}

/// The Segment name of a message type.
pub fn type_name(kind: EventType) -> &'static str {
    match kind {
        EventType::Track => "track",
        EventType::Identify => "identify",
        EventType::Page => "page",
        EventType::Screen => "screen",
        EventType::Group => "group",
        EventType::Alias => "alias",
        EventType::Unspecified => "",
    }
}

/// Converts one message. `prefix` (e.g. `batch[3].`) starts every violation's field
/// path; `forced_type` is the type implied by a single-message endpoint.
pub fn parse_message(
    mut message: Map<String, Value>,
    prefix: &str,
    forced_type: Option<EventType>,
    defaults: &BatchDefaults,
) -> Result<Event, Vec<FieldViolation>> {
    let mut violations = Vec::new();
    let mut event = Event::default();
    let field = |name: &str| format!("{prefix}{name}");

    let kind = match forced_type {
        Some(kind) => Some(kind),
        None => match message.get("type") {
            Some(Value::String(name)) => {
                let kind = parse_type(name);
                if kind.is_none() {
                    violations.push(FieldViolation::new(
                        field("type"),
                        format!("unknown message type {name:?}; expected track, identify, page, screen, group or alias"),
                    ));
                }
                kind
            }
            Some(_) => {
                violations.push(FieldViolation::new(field("type"), "must be a string"));
                None
            }
            None => {
                violations.push(FieldViolation::new(field("type"), "is required"));
                None
            }
        },
    };
    if let Some(kind) = kind {
        event.set_type(kind);
    }

    let mut take_string = |key: &str, allow_number: bool, violations: &mut Vec<FieldViolation>| {
        match message.remove(key) {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s,
            // Segment accepts numeric ids and treats them as strings.
            Some(Value::Number(n)) if allow_number => n.to_string(),
            Some(_) => {
                let expected = if allow_number {
                    "a string or number"
                } else {
                    "a string"
                };
                violations.push(FieldViolation::new(
                    field(key),
                    format!("must be {expected}"),
                ));
                String::new()
            }
        }
    };
    event.message_id = take_string("messageId", true, &mut violations);
    event.event = take_string("event", false, &mut violations);
    event.name = take_string("name", false, &mut violations);
    event.user_id = take_string("userId", true, &mut violations);
    event.anonymous_id = take_string("anonymousId", true, &mut violations);
    event.previous_id = take_string("previousId", true, &mut violations);
    event.group_id = take_string("groupId", true, &mut violations);

    let mut take_object =
        |key: &str, violations: &mut Vec<FieldViolation>| match message.remove(key) {
            None | Some(Value::Null) => None,
            Some(Value::Object(map)) => Some(map),
            Some(_) => {
                violations.push(FieldViolation::new(field(key), "must be an object"));
                None
            }
        };
    event.properties = take_object("properties", &mut violations).map(struct_from_json);
    event.traits = take_object("traits", &mut violations).map(struct_from_json);
    event.context = take_object("context", &mut violations)
        .map(struct_from_json)
        .or_else(|| defaults.context.clone());
    event.integrations = take_object("integrations", &mut violations)
        .map(struct_from_json)
        .or_else(|| defaults.integrations.clone());

    let mut take_time = |key: &str, violations: &mut Vec<FieldViolation>| match message.remove(key)
    {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => match parse_timestamp(&s) {
            Some(t) => Some(t),
            None => {
                violations.push(FieldViolation::new(
                    field(key),
                    format!("must be an ISO-8601 timestamp, got {s:?}"),
                ));
                None
            }
        },
        Some(_) => {
            violations.push(FieldViolation::new(
                field(key),
                "must be an ISO-8601 timestamp string",
            ));
            None
        }
    };
    // The client's own clock: Segment SDKs send it as `timestamp`, some as `originalTimestamp`.
    let original = take_time("originalTimestamp", &mut violations);
    let timestamp = take_time("timestamp", &mut violations);
    event.original_timestamp = original.or(timestamp);
    event.sent_at = take_time("sentAt", &mut violations).or(defaults.sent_at);

    if violations.is_empty() {
        Ok(event)
    } else {
        Err(violations)
    }
}

/// Parses RFC 3339 / ISO-8601 date-times; a time without an offset is taken as UTC.
pub fn parse_timestamp(text: &str) -> Option<Timestamp> {
    let parsed = DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .or_else(|_| {
            NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f").map(|t| t.and_utc())
        })
        .ok()?;
    Some(Timestamp {
        seconds: parsed.timestamp(),
        nanos: parsed.timestamp_subsec_nanos() as i32,
    })
}

/// Formats a timestamp as RFC 3339 with milliseconds, as Segment does.
pub fn format_timestamp(t: &Timestamp) -> String {
    DateTime::<Utc>::from_timestamp(t.seconds, t.nanos.max(0) as u32)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// An `Event` as Segment-spec JSON, for the CLI and debuggers.
pub fn event_to_json(event: &Event) -> Value {
    use waymark_proto::json::struct_to_json;
    let mut out = Map::new();
    let mut put = |k: &str, v: &str| {
        if !v.is_empty() {
            out.insert(k.to_owned(), Value::String(v.to_owned()));
        }
    };
    put("eventId", &event.event_id);
    put("messageId", &event.message_id);
    put("type", type_name(event.r#type()));
    put("event", &event.event);
    put("name", &event.name);
    put("userId", &event.user_id);
    put("anonymousId", &event.anonymous_id);
    put("previousId", &event.previous_id);
    put("groupId", &event.group_id);
    put("sourceId", &event.source_id);
    put("profileId", &event.profile_id);
    put("channel", crate::channel::channel_name(event.channel()));
    for (key, value) in [
        ("properties", &event.properties),
        ("traits", &event.traits),
        ("context", &event.context),
        ("integrations", &event.integrations),
    ] {
        if let Some(s) = value {
            out.insert(key.to_owned(), Value::Object(struct_to_json(s)));
        }
    }
    for (key, value) in [
        ("timestamp", &event.timestamp),
        ("originalTimestamp", &event.original_timestamp),
        ("sentAt", &event.sent_at),
        ("receivedAt", &event.received_at),
    ] {
        if let Some(t) = value {
            out.insert(key.to_owned(), Value::String(format_timestamp(t)));
        }
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("object"),
        }
    }

    #[test]
    fn parses_a_track_message() {
        let msg = object(serde_json::json!({
            "type": "track", "event": "Order Completed", "userId": 42, "messageId": "m-1",
            "properties": {"total": 10.5}, "timestamp": "2026-01-02T03:04:05.678Z"
        }));
        let e = parse_message(msg, "", None, &BatchDefaults::default()).unwrap();
        assert_eq!(e.r#type(), EventType::Track);
        assert_eq!(e.user_id, "42");
        assert_eq!(e.event, "Order Completed");
        let t = e.original_timestamp.unwrap();
        assert_eq!(format_timestamp(&t), "2026-01-02T03:04:05.678Z");
    }

    #[test]
    fn structural_errors_name_every_field() {
        let msg = object(serde_json::json!({
            "type": "track", "event": 5, "properties": [1], "timestamp": "yesterday"
        }));
        let errors = parse_message(msg, "batch[1].", None, &BatchDefaults::default()).unwrap_err();
        let fields: Vec<_> = errors.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "batch[1].event",
                "batch[1].properties",
                "batch[1].timestamp"
            ]
        );
        assert!(errors[2].description.contains("ISO-8601"));
    }

    #[test]
    fn unknown_type_and_missing_type_are_reported() {
        let e = parse_message(
            object(serde_json::json!({"type": "click"})),
            "",
            None,
            &BatchDefaults::default(),
        )
        .unwrap_err();
        assert_eq!(e[0].field, "type");
        let e = parse_message(
            object(serde_json::json!({})),
            "",
            None,
            &BatchDefaults::default(),
        )
        .unwrap_err();
        assert_eq!(e[0].description, "is required");
    }

    #[test]
    fn timestamps_with_offsets_and_without() {
        let a = parse_timestamp("2026-01-02T04:04:05+01:00").unwrap();
        let b = parse_timestamp("2026-01-02T03:04:05").unwrap();
        assert_eq!(a, b);
        assert!(parse_timestamp("2026-13-02T03:04:05Z").is_none());
    }

    #[test]
    fn batch_defaults_fill_missing_fields() {
        let defaults = BatchDefaults {
            sent_at: parse_timestamp("2026-01-01T00:00:00Z"),
            context: Some(struct_from_json(object(
                serde_json::json!({"channel": "sms"}),
            ))),
            integrations: None,
        };
        let e = parse_message(
            object(serde_json::json!({"type": "identify", "userId": "u"})),
            "",
            None,
            &defaults,
        )
        .unwrap();
        assert_eq!(e.sent_at, defaults.sent_at);
        assert!(e.context.is_some());
    }
}
