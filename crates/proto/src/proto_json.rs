//! The proto3 JSON mapping of any Waymark message, the form journey and policy files take
//! (YAML files are parsed to JSON first) and the form the CLI prints: field names in
//! lowerCamelCase or as declared, enums by name, well-known types in their JSON forms, and
//! an unknown field refused by name, so a typo in a file is an error rather than a
//! silently missing setting. Both directions go through the contracts' descriptors, so the
//! text cannot drift from the protos.

use std::fmt;
use std::sync::LazyLock;

use prost::{Message, Name};
use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, Kind, MessageDescriptor, SerializeOptions,
};
use serde::{Serialize, Serializer};
use serde_path_to_error::Segment;

/// Every Waymark contract with the well-known types they import.
static POOL: LazyLock<DescriptorPool> = LazyLock::new(|| {
    DescriptorPool::decode(crate::FILE_DESCRIPTOR_SET)
        .expect("the descriptor set built with these types decodes")
});

/// The descriptor of a generated Waymark message.
///
/// # Panics
///
/// When `T` is not one of the contracts' messages (or a well-known type they import).
fn descriptor<T: Name>() -> MessageDescriptor {
    let name = T::full_name();
    POOL.get_message_by_name(&name)
        .unwrap_or_else(|| panic!("{name} is not in the contracts' descriptor set"))
}

/// Content that does not fit a message: where in it, and what is wrong there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    /// The field path, `nodes[0].wait`; empty for the whole message.
    path: String,
    problem: String,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.problem)
        } else {
            write!(f, "{}: {}", self.path, self.problem)
        }
    }
}

impl std::error::Error for DecodeError {}

/// `json` read as a `T` by the proto3 JSON mapping. The error gives the path of the field
/// that does not fit and, for an unknown field or enum value, the names that would.
///
/// # Panics
///
/// When `T` is not one of the contracts' messages.
pub fn from_json<T: Message + Name + Default>(json: &serde_json::Value) -> Result<T, DecodeError> {
    let descriptor = descriptor::<T>();
    // The well-known types have JSON forms of their own (a time is text); every other
    // message is a mapping of its fields, and saying so beats serde's "expected a map".
    if !json.is_object() && descriptor.package_name() != "google.protobuf" {
        return Err(DecodeError {
            path: String::new(),
            problem: format!(
                "expected a mapping of {} fields, found {}",
                T::NAME,
                kind_of(json)
            ),
        });
    }
    let mut track = serde_path_to_error::Track::new();
    // Unknown fields are refused (the proto3 JSON default, kept on purpose): a misspelt
    // field would otherwise vanish and leave the journey doing something else.
    let decoded = DynamicMessage::deserialize_with_options(
        descriptor.clone(),
        serde_path_to_error::Deserializer::new(json, &mut track),
        &DeserializeOptions::new().deny_unknown_fields(true),
    );
    match decoded {
        Ok(message) => Ok(message
            .transcode_to::<T>()
            .expect("a message decodes as the type its descriptor describes")),
        Err(error) => {
            let path = track.path();
            let mut problem = error.to_string();
            if let Some(hint) = expected_at(&descriptor, &path, &problem) {
                problem = format!("{problem} (expected one of: {hint})");
            }
            Err(DecodeError {
                path: path.to_string(),
                problem,
            })
        }
    }
}

/// For an unknown field or enum value, the names that would have fitted there.
fn expected_at(
    root: &MessageDescriptor,
    path: &serde_path_to_error::Path,
    error: &str,
) -> Option<String> {
    let mut kind = Kind::Message(root.clone());
    for segment in path {
        match segment {
            // A list's items have the kind of the list field itself.
            Segment::Seq { .. } => {}
            Segment::Map { key } => {
                let Kind::Message(message) = &kind else {
                    return None;
                };
                let field = message
                    .get_field_by_json_name(key)
                    .or_else(|| message.get_field_by_name(key))?;
                if field.is_map() {
                    return None;
                }
                kind = field.kind();
            }
            _ => return None,
        }
    }
    let names: Vec<String> = match kind {
        Kind::Message(message) if error.starts_with("unrecognized field name") => {
            message.fields().map(|f| f.json_name().to_owned()).collect()
        }
        Kind::Enum(values) if error.starts_with("unrecognized enum value") => {
            values.values().map(|v| v.name().to_owned()).collect()
        }
        _ => return None,
    };
    Some(names.join(", "))
}

/// What a JSON value is, in the words of someone writing a file.
fn kind_of(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "nothing",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "text",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "a mapping",
    }
}

/// Which fields a message is written with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// A reply: every scalar field present (a script can rely on the shape), counts as
    /// numbers. Unset messages and times are left out, as proto3 JSON does.
    Reply,
    /// A document to edit and apply again (a definition, the contact policy): only the
    /// fields set, as a person writes the file.
    Document,
}

impl Style {
    fn options(self) -> SerializeOptions {
        SerializeOptions::new()
            .stringify_64_bit_integers(false)
            .skip_default_fields(self == Style::Document)
    }
}

/// A message in the proto3 JSON mapping, for any serde serializer (JSON text, YAML, a
/// `serde_json::Value`), with field names in lowerCamelCase in the proto's field order.
pub struct JsonMessage {
    message: DynamicMessage,
    options: SerializeOptions,
}

/// `message` ready to serialize in the proto3 JSON mapping, in the given style.
///
/// # Panics
///
/// When `T` is not one of the contracts' messages.
pub fn to_json<T: Message + Name>(message: &T, style: Style) -> JsonMessage {
    let mut dynamic = DynamicMessage::new(descriptor::<T>());
    dynamic
        .transcode_from(message)
        .expect("a generated message decodes as its own descriptor");
    JsonMessage {
        message: dynamic,
        options: style.options(),
    }
}

impl Serialize for JsonMessage {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.message
            .serialize_with_options(serializer, &self.options)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::orchestration::v1::*;
    use serde_json::json;

    fn journey() -> serde_json::Value {
        json!({
            "journeyId": "cart",
            "name": "Abandoned cart",
            "entry": {
                "trigger": {"event": "Cart Updated"},
                "start": "wait",
                "reentry": "REENTRY_ALWAYS",
                "key_property": "cart_id",
                "maxConcurrent": 5
            },
            "nodes": [
                {"id": "wait", "wait": {
                    "branches": [{"match": {"event": "Order Completed"}, "sameKey": true}],
                    "timeout": "4h", "timeoutNext": "nudge"}},
                {"id": "nudge", "message": {"channel": "dev",
                    "category": "MESSAGE_CATEGORY_MARKETING",
                    "variants": [{"body": "Your cart misses you"}]}}
            ],
            "goal": {"event": "Order Completed"},
            "priority": 10
        })
    }

    /// `journey()` with the value at `pointer` (a JSON pointer) replaced by `value`.
    fn changed(pointer: &str, value: serde_json::Value) -> serde_json::Value {
        let mut journey = journey();
        *journey.pointer_mut(pointer).unwrap() = value;
        journey
    }

    fn error_of(json: &serde_json::Value) -> String {
        from_json::<JourneyDefinition>(json)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn journeys_read_in_camel_case_or_declared_names_and_refuse_unknown_fields() {
        let camel = json!({
            "journeyId": "welcome",
            "entry": {"trigger": {"event": "Signed Up"}, "start": "hello", "reentry": "REENTRY_AFTER_EXIT"},
            "nodes": [{"id": "hello", "exit": {}}]
        });
        let declared = json!({
            "journey_id": "welcome",
            "entry": {"trigger": {"event": "Signed Up"}, "start": "hello", "reentry": "REENTRY_AFTER_EXIT"},
            "nodes": [{"id": "hello", "exit": {}}]
        });
        let a: JourneyDefinition = from_json(&camel).unwrap();
        let b: JourneyDefinition = from_json(&declared).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.entry.as_ref().unwrap().reentry, 3);

        let typo = json!({"journeyId": "welcome", "entrie": {}});
        let error = from_json::<JourneyDefinition>(&typo)
            .unwrap_err()
            .to_string();
        assert!(error.contains("entrie"), "{error}");
    }

    #[test]
    fn an_unknown_field_is_named_with_its_path_and_the_fields_there() {
        let mut typo = journey();
        let wait = typo.pointer_mut("/nodes/0/wait").unwrap();
        let next = wait.as_object_mut().unwrap().remove("timeoutNext").unwrap();
        wait["timeoutNxt"] = next;
        let error = error_of(&typo);
        assert!(error.starts_with("nodes[0].wait: "), "{error}");
        assert!(error.contains("'timeoutNxt'"), "{error}");
        assert!(error.contains("timeoutNext"), "{error}");

        let error = error_of(&json!({"journeyId": "a", "steps": []}));
        assert!(error.contains("'steps'"), "{error}");
        assert!(error.contains("nodes"), "{error}");
    }

    #[test]
    fn a_wrong_enum_name_is_named_with_its_path_and_the_names_there() {
        let error = error_of(&changed("/entry/reentry", json!("ALWAYS")));
        assert!(error.starts_with("entry.reentry: "), "{error}");
        assert!(error.contains("'ALWAYS'"), "{error}");
        assert!(error.contains("REENTRY_ALWAYS"), "{error}");
    }

    #[test]
    fn a_wrong_type_is_named_with_its_path() {
        let error = error_of(&changed("/entry/maxConcurrent", json!("many")));
        assert!(error.starts_with("entry.maxConcurrent: "), "{error}");
    }

    #[test]
    fn a_value_that_is_not_a_mapping_is_refused_by_what_it_is() {
        assert_eq!(
            error_of(&json!("just some words")),
            "expected a mapping of JourneyDefinition fields, found text"
        );
        assert_eq!(
            error_of(&json!([])),
            "expected a mapping of JourneyDefinition fields, found a list"
        );
    }

    #[test]
    fn a_document_has_the_fields_set_in_the_proto_order_and_reads_back_equal() {
        let definition: JourneyDefinition = from_json(&journey()).unwrap();
        let json = serde_json::to_string(&to_json(&definition, Style::Document)).unwrap();
        assert!(
            json.starts_with(r#"{"journeyId":"cart","name":"Abandoned cart","entry":{"#),
            "{json}"
        );
        assert!(json.contains(r#""reentry":"REENTRY_ALWAYS""#), "{json}");
        assert!(
            !json.contains("description"),
            "defaults are left out: {json}"
        );
        let value = serde_json::to_value(to_json(&definition, Style::Document)).unwrap();
        assert_eq!(from_json::<JourneyDefinition>(&value).unwrap(), definition);
    }

    #[test]
    fn a_reply_has_every_scalar_and_counts_as_numbers() {
        let summary = JourneySummary {
            journey_id: "cart".into(),
            status: JourneyStatus::Live as i32,
            active_enrollments: 12,
            ..JourneySummary::default()
        };
        let json = serde_json::to_string(&to_json(&summary, Style::Reply)).unwrap();
        assert_eq!(
            json,
            concat!(
                r#"{"journeyId":"cart","name":"","status":"JOURNEY_STATUS_LIVE","#,
                r#""liveVersion":0,"draftChanged":false,"activeEnrollments":12}"#
            )
        );
    }

    #[test]
    fn generated_type_names_find_their_descriptors() {
        fn check<T: Message + Name + Default + PartialEq + fmt::Debug>() {
            let value = serde_json::to_value(to_json(&T::default(), Style::Reply)).unwrap();
            assert_eq!(from_json::<T>(&value).unwrap(), T::default());
        }
        check::<JourneyDefinition>();
        check::<ContactPolicy>();
        check::<JourneyProblem>();
        check::<SimulateJourneyResponse>();
        check::<JourneySummary>();
        check::<PublishJourneyResponse>();
        check::<ArchiveJourneyResponse>();
        check::<Enrollment>();
        check::<GetEnrollmentResponse>();
        check::<Action>();
        check::<Case>();
        check::<crate::common::v1::Event>();
        check::<crate::prost_types::Timestamp>();
    }
}
