//! Orchestration messages as text: journey and contact-policy files read from YAML or JSON,
//! and replies printed as JSON or YAML. Both go through the descriptors of the contracts,
//! so the text is the proto3 JSON mapping itself (lowerCamelCase or original field names,
//! enums by name, times as RFC 3339, unknown fields refused) rather than a second,
//! hand-written shape that could drift from the protos.

use std::io::Write;
use std::path::Path;
use std::sync::LazyLock;

use anyhow::{Context, anyhow, bail};
use prost::Message;
use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, Kind, MessageDescriptor, SerializeOptions,
};
use serde::{Serialize, Serializer};
use serde_path_to_error::Segment;
use waymark_proto::orchestration::v1::*;

/// Every Waymark contract with the well-known types they import.
static POOL: LazyLock<DescriptorPool> = LazyLock::new(|| {
    DescriptorPool::decode(waymark_proto::FILE_DESCRIPTOR_SET)
        .expect("the descriptor set built with the contracts decodes")
});

/// A generated message whose descriptor is in the contracts' pool.
pub trait Named: Message + Default {
    /// The full protobuf name, e.g. `waymark.orchestration.v1.JourneyDefinition`.
    const NAME: &'static str;

    fn descriptor() -> MessageDescriptor {
        POOL.get_message_by_name(Self::NAME)
            .unwrap_or_else(|| panic!("{} is in the contracts' descriptor set", Self::NAME))
    }
}

macro_rules! named {
    ($($message:ident),* $(,)?) => {
        $(impl Named for $message {
            const NAME: &'static str = concat!("waymark.orchestration.v1.", stringify!($message));
        })*
    };
}

named!(
    JourneyDefinition,
    ContactPolicy,
    JourneyProblem,
    SimulateJourneyResponse,
    JourneySummary,
    PublishJourneyResponse,
    ArchiveJourneyResponse,
    Enrollment,
    GetEnrollmentResponse,
    Action,
    Case,
);

/// How a file is written: JSON for `.json`, YAML (which JSON text also is) otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    Yaml,
}

impl Format {
    fn of(path: &Path) -> Self {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("json") => Self::Json,
            _ => Self::Yaml,
        }
    }
}

/// Reads a message from a YAML or JSON file; errors name the file and, for content that
/// does not fit the message, the path of the field in it.
pub fn read<T: Named>(path: &Path) -> anyhow::Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    decode(&text, Format::of(path))
        .with_context(|| format!("{} is not a valid {}", path.display(), short_name::<T>()))
}

/// Decodes a message from YAML or JSON text in the proto3 JSON mapping.
pub fn decode<T: Named>(text: &str, format: Format) -> anyhow::Result<T> {
    let value: serde_json::Value = match format {
        Format::Json => serde_json::from_str(text).context("not JSON")?,
        Format::Yaml => serde_norway::from_str(text).context("not YAML")?,
    };
    if !value.is_object() {
        bail!(
            "expected a mapping of {} fields, found {}",
            short_name::<T>(),
            kind_of(&value)
        );
    }
    let descriptor = T::descriptor();
    let mut track = serde_path_to_error::Track::new();
    // Unknown fields are refused (the proto3 JSON default, kept on purpose): a misspelt
    // field would otherwise vanish and leave the journey doing something else.
    let decoded = DynamicMessage::deserialize_with_options(
        descriptor.clone(),
        serde_path_to_error::Deserializer::new(value, &mut track),
        &DeserializeOptions::new().deny_unknown_fields(true),
    );
    let message = match decoded {
        Ok(message) => message,
        Err(error) => {
            let path = track.path();
            let mut text = error.to_string();
            if let Some(hint) = expected_at(&descriptor, &path, &text) {
                text = format!("{text} (expected one of: {hint})");
            }
            return Err(if path.iter().next().is_none() {
                anyhow!(text)
            } else {
                anyhow!("{path}: {text}")
            });
        }
    };
    Ok(message.transcode_to::<T>()?)
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

fn short_name<T: Named>() -> &'static str {
    T::NAME.rsplit('.').next().unwrap_or(T::NAME)
}

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

/// How a message is shown.
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

/// A message with the options it is serialized with, in the proto's field order.
pub struct Shown {
    message: DynamicMessage,
    options: SerializeOptions,
}

impl Shown {
    pub fn new<T: Named>(message: &T, style: Style) -> Self {
        let mut dynamic = DynamicMessage::new(T::descriptor());
        dynamic
            .transcode_from(message)
            .expect("a generated message decodes as its own descriptor");
        Self {
            message: dynamic,
            options: style.options(),
        }
    }
}

impl Serialize for Shown {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.message
            .serialize_with_options(serializer, &self.options)
    }
}

/// Prints a reply as indented JSON.
pub fn print<T: Named>(message: &T) -> anyhow::Result<()> {
    print_json(&Shown::new(message, Style::Reply))
}

/// Prints replies as an indented JSON array.
pub fn print_all<T: Named>(messages: &[T]) -> anyhow::Result<()> {
    let shown: Vec<Shown> = messages
        .iter()
        .map(|m| Shown::new(m, Style::Reply))
        .collect();
    print_json(&shown)
}

/// Prints a document as indented JSON, or as YAML.
pub fn print_document<T: Named>(message: &T, format: Format) -> anyhow::Result<()> {
    let shown = Shown::new(message, Style::Document);
    match format {
        Format::Json => print_json(&shown),
        Format::Yaml => write_stdout(serde_norway::to_string(&shown)?.as_bytes()),
    }
}

fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    let mut text = serde_json::to_vec_pretty(value)?;
    text.push(b'\n');
    write_stdout(&text)
}

/// Writes to standard output; a closed pipe (`| head`) is not an error.
pub fn write_stdout(text: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = r#"
journeyId: cart
name: Abandoned cart
entry:
  trigger: { event: Cart Updated }
  start: wait
  reentry: REENTRY_ALWAYS
  key_property: cart_id
  maxConcurrent: 5
nodes:
  - id: wait
    wait:
      branches:
        - match: { event: Order Completed }
          sameKey: true
      timeout: 4h
      timeoutNext: nudge
  - id: nudge
    message:
      channel: dev
      category: MESSAGE_CATEGORY_MARKETING
      variants:
        - body: "Your cart misses you"
  - id: note
    update_traits:
      traits: { nudged: true, carts: 2 }
goal: { event: Order Completed }
priority: 10
"#;

    const JSON: &str = r#"{
  "journey_id": "cart",
  "name": "Abandoned cart",
  "entry": {
    "trigger": {"event": "Cart Updated"},
    "start": "wait",
    "reentry": "REENTRY_ALWAYS",
    "keyProperty": "cart_id",
    "max_concurrent": 5
  },
  "nodes": [
    {"id": "wait", "wait": {
      "branches": [{"match": {"event": "Order Completed"}, "same_key": true}],
      "timeout": "4h", "timeout_next": "nudge"}},
    {"id": "nudge", "message": {"channel": "dev", "category": 1,
      "variants": [{"body": "Your cart misses you"}]}},
    {"id": "note", "updateTraits": {"traits": {"carts": 2, "nudged": true}}}
  ],
  "goal": {"event": "Order Completed"},
  "priority": 10
}"#;

    fn journey(text: &str, format: Format) -> anyhow::Result<JourneyDefinition> {
        decode(text, format)
    }

    #[test]
    fn yaml_and_json_of_one_journey_decode_equal() {
        let from_yaml = journey(YAML, Format::Yaml).unwrap();
        let from_json = journey(JSON, Format::Json).unwrap();
        assert_eq!(from_yaml, from_json);
        let entry = from_yaml.entry.as_ref().unwrap();
        assert_eq!(entry.reentry, Reentry::Always as i32);
        assert_eq!(entry.key_property, "cart_id");
        assert_eq!(entry.max_concurrent, 5);
        let Some(node::Kind::Wait(wait)) = &from_yaml.nodes[0].kind else {
            panic!("a wait: {:?}", from_yaml.nodes[0])
        };
        assert_eq!(wait.branches[0].same_key, Some(true));
        // JSON text is YAML too.
        assert_eq!(journey(JSON, Format::Yaml).unwrap(), from_json);
    }

    #[test]
    fn an_unknown_field_is_named_with_its_path_and_the_fields_there() {
        let text = YAML.replace("timeoutNext: nudge", "timeoutNxt: nudge");
        let error = journey(&text, Format::Yaml).unwrap_err().to_string();
        assert!(error.starts_with("nodes[0].wait: "), "{error}");
        assert!(error.contains("'timeoutNxt'"), "{error}");
        assert!(error.contains("timeoutNext"), "{error}");
        let error = journey("journeyId: a\nsteps: []\n", Format::Yaml)
            .unwrap_err()
            .to_string();
        assert!(error.contains("'steps'"), "{error}");
        assert!(error.contains("nodes"), "{error}");
    }

    #[test]
    fn a_wrong_enum_name_is_named_with_its_path_and_the_names_there() {
        let text = YAML.replace("REENTRY_ALWAYS", "ALWAYS");
        let error = journey(&text, Format::Yaml).unwrap_err().to_string();
        assert!(error.starts_with("entry.reentry: "), "{error}");
        assert!(error.contains("'ALWAYS'"), "{error}");
        assert!(error.contains("REENTRY_ALWAYS"), "{error}");
    }

    #[test]
    fn a_wrong_type_is_named_with_its_path() {
        let text = YAML.replace("maxConcurrent: 5", "maxConcurrent: many");
        let error = journey(&text, Format::Yaml).unwrap_err().to_string();
        assert!(error.starts_with("entry.maxConcurrent: "), "{error}");
    }

    #[test]
    fn text_that_is_not_a_journey_is_refused() {
        let error = journey("nodes: [unclosed\n", Format::Yaml).unwrap_err();
        assert!(format!("{error:#}").starts_with("not YAML: "), "{error:#}");
        let error = journey("{\"journeyId\": \"a\",}", Format::Json).unwrap_err();
        assert!(format!("{error:#}").contains("line 1 column"), "{error:#}");
        let error = journey("just some words\n", Format::Yaml).unwrap_err();
        assert_eq!(
            error.to_string(),
            "expected a mapping of JourneyDefinition fields, found text"
        );
    }

    #[test]
    fn a_file_names_itself_and_its_format_comes_from_the_extension() {
        let dir = std::env::temp_dir().join(format!("waymark-journey-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let json = dir.join("cart.json");
        std::fs::write(&json, JSON).unwrap();
        assert_eq!(read::<JourneyDefinition>(&json).unwrap().journey_id, "cart");
        let yaml = dir.join("cart.yaml");
        std::fs::write(&yaml, "journeyId: [").unwrap();
        let error = format!("{:#}", read::<JourneyDefinition>(&yaml).unwrap_err());
        assert!(
            error.starts_with(&format!(
                "{} is not a valid JourneyDefinition: not YAML",
                yaml.display()
            )),
            "{error}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_document_prints_as_proto3_json_and_yaml_that_read_back_equal() {
        let definition = journey(YAML, Format::Yaml).unwrap();
        let shown = Shown::new(&definition, Style::Document);
        let json = serde_json::to_string(&shown).unwrap();
        assert!(
            json.starts_with(r#"{"journeyId":"cart","name":"Abandoned cart","entry":{"#),
            "{json}"
        );
        assert!(json.contains(r#""reentry":"REENTRY_ALWAYS""#), "{json}");
        assert!(
            !json.contains("description"),
            "defaults are left out: {json}"
        );
        assert_eq!(journey(&json, Format::Json).unwrap(), definition);
        let yaml = serde_norway::to_string(&shown).unwrap();
        assert_eq!(journey(&yaml, Format::Yaml).unwrap(), definition);
    }

    #[test]
    fn a_reply_has_every_scalar_and_counts_as_numbers() {
        let summary = JourneySummary {
            journey_id: "cart".into(),
            status: JourneyStatus::Live as i32,
            active_enrollments: 12,
            ..JourneySummary::default()
        };
        let json = serde_json::to_string(&Shown::new(&summary, Style::Reply)).unwrap();
        assert_eq!(
            json,
            concat!(
                r#"{"journeyId":"cart","name":"","status":"JOURNEY_STATUS_LIVE","#,
                r#""liveVersion":0,"draftChanged":false,"activeEnrollments":12}"#
            )
        );
    }

    #[test]
    fn every_named_message_is_in_the_descriptor_set() {
        fn check<T: Named>() {
            let shown = Shown::new(&T::default(), Style::Reply);
            serde_json::to_string(&shown).unwrap();
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
    }

    #[test]
    fn the_example_journeys_and_contact_policy_are_valid() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
        let mut journeys = 0;
        for entry in std::fs::read_dir(root.join("journeys")).unwrap() {
            let path = entry.unwrap().path();
            let journey = read::<JourneyDefinition>(&path).unwrap_or_else(|e| panic!("{e:#}"));
            let stem = path.file_stem().unwrap().to_str().unwrap();
            assert_eq!(journey.journey_id, stem, "{}", path.display());
            if let Err(problems) = waymark_orchestrator::journey::compile(&journey, 1) {
                panic!("{}: {problems:?}", path.display());
            }
            journeys += 1;
        }
        assert!(journeys >= 4, "{journeys} example journeys");
        let policy = read::<ContactPolicy>(&root.join("contact-policy.yaml"))
            .unwrap_or_else(|e| panic!("{e:#}"));
        assert!(!policy.caps.is_empty());
        waymark_orchestrator::policy::Policy::compile(&policy).unwrap();
    }
}
