//! Orchestration messages as text: journey and contact-policy files read from YAML or JSON,
//! and replies printed as JSON or YAML. The text is the proto3 JSON mapping itself
//! (`waymark_proto::proto_json`), so YAML is only another spelling of the same values; this
//! module adds what is about files and the terminal.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use prost::{Message, Name};
use serde::Serialize;
use waymark_proto::proto_json::{self, Style};

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
pub fn read<T: Message + Name + Default>(path: &Path) -> anyhow::Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    decode(&text, Format::of(path))
        .with_context(|| format!("{} is not a valid {}", path.display(), T::NAME))
}

/// Decodes a message from YAML or JSON text in the proto3 JSON mapping.
pub fn decode<T: Message + Name + Default>(text: &str, format: Format) -> anyhow::Result<T> {
    let value: serde_json::Value = match format {
        Format::Json => serde_json::from_str(text).context("not JSON")?,
        Format::Yaml => serde_norway::from_str(text).context("not YAML")?,
    };
    Ok(proto_json::from_json(&value)?)
}

/// Prints a reply as indented JSON.
pub fn print<T: Message + Name>(message: &T) -> anyhow::Result<()> {
    print_json(&proto_json::to_json(message, Style::Reply))
}

/// Prints replies as an indented JSON array.
pub fn print_all<T: Message + Name>(messages: &[T]) -> anyhow::Result<()> {
    let shown: Vec<_> = messages
        .iter()
        .map(|m| proto_json::to_json(m, Style::Reply))
        .collect();
    print_json(&shown)
}

/// Prints a document as indented JSON, or as YAML.
pub fn print_document<T: Message + Name>(message: &T, format: Format) -> anyhow::Result<()> {
    let shown = proto_json::to_json(message, Style::Document);
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
    use waymark_proto::orchestration::v1::*;

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
    fn a_mistake_in_yaml_is_named_with_its_path_in_the_file() {
        let text = YAML.replace("timeoutNext: nudge", "timeoutNxt: nudge");
        let error = journey(&text, Format::Yaml).unwrap_err().to_string();
        assert!(error.starts_with("nodes[0].wait: "), "{error}");
        assert!(error.contains("'timeoutNxt'"), "{error}");
        assert!(error.contains("timeoutNext"), "{error}");
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
    fn a_document_printed_as_json_or_yaml_reads_back_equal() {
        let definition = journey(YAML, Format::Yaml).unwrap();
        let shown = proto_json::to_json(&definition, Style::Document);
        let json = serde_json::to_string_pretty(&shown).unwrap();
        assert_eq!(journey(&json, Format::Json).unwrap(), definition);
        let yaml = serde_norway::to_string(&shown).unwrap();
        assert!(
            yaml.starts_with("journeyId: cart\nname: Abandoned cart\n"),
            "{yaml}"
        );
        assert_eq!(journey(&yaml, Format::Yaml).unwrap(), definition);
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
