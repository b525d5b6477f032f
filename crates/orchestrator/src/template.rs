//! Personalised text (message bodies, webhook payloads) from templates that journey
//! authors write, in Jinja syntax (minijinja): `Hi {{ profile.traits.first_name |
//! default("there") }}`. An author's template runs inside the orchestrator, so it is
//! sandboxed: it sees only the context it is given, cannot load other templates
//! (`include`, `import`, `extends` are not part of the language here), and each render
//! is bounded in steps, memory (fuel) and output.
//!
//! Anything missing renders empty: a profile without `first_name` gets `Hi ` rather than
//! a failed step, and a lookup through something missing (`profile.traits.address.city`
//! without an address) is missing too. Authors choose a fallback with `default`.
//! Nothing is escaped on output; a JSON payload quotes its values with `tojson`.

use std::io::{self, Write};
use std::sync::Arc;

use minijinja::{AutoEscape, Environment, ErrorKind, UndefinedBehavior};

/// The longest template source, in bytes.
pub const MAX_SOURCE_BYTES: usize = 16 * 1024;

/// The longest rendered output, in bytes.
pub const MAX_OUTPUT_BYTES: usize = 64 * 1024;

/// The steps one render may take. minijinja charges each instruction and each 64 bytes
/// it allocates, so this also bounds a render's memory (to a few MB); a message template
/// looping over a few hundred items uses a small part of it.
const FUEL: u64 = 100_000;

/// The name the one template has in its environment (it appears in no message).
const NAME: &str = "template";

/// A compiled template, ready to render many times, from any thread.
#[derive(Clone)]
pub struct Template {
    environment: Arc<Environment<'static>>,
}

impl std::fmt::Debug for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let source = self
            .environment
            .get_template(NAME)
            .map(|t| t.source().to_owned())
            .unwrap_or_default();
        f.debug_tuple("Template").field(&source).finish()
    }
}

impl Template {
    /// Compiles `source` (at most 16 KiB). A syntax error names its line, and its column
    /// when the parser knows where it is.
    pub fn compile(source: &str) -> Result<Template, String> {
        if source.len() > MAX_SOURCE_BYTES {
            return Err(format!(
                "the template is {} bytes, more than the {MAX_SOURCE_BYTES} allowed",
                source.len()
            ));
        }
        let mut environment = Environment::new();
        environment.set_undefined_behavior(UndefinedBehavior::Chainable);
        environment.set_auto_escape_callback(|_| AutoEscape::None);
        environment.set_fuel(Some(FUEL));
        environment
            .add_template_owned(NAME, source.to_owned())
            .map_err(|e| describe(&e, source))?;
        Ok(Template {
            environment: Arc::new(environment),
        })
    }

    /// Renders the template against `context`, a JSON object whose keys are the
    /// template's variables (`profile`, `event`, `enrollment`, ...). Fails when the
    /// output would pass 64 KiB, when the render runs out of steps, or on an operation
    /// that cannot be done (`1 / 0`, adding a number to a list).
    pub fn render(&self, context: &serde_json::Value) -> Result<String, String> {
        if !context.is_object() {
            return Err("the template context must be a JSON object".into());
        }
        let template = self
            .environment
            .get_template(NAME)
            .map_err(|e| e.to_string())?;
        let mut output = LimitedOutput::default();
        let rendered = template.render_captured_to(minijinja::value::Serde(context), &mut output);
        if output.overflowed {
            return Err(format!(
                "the rendered output passes the {MAX_OUTPUT_BYTES} bytes allowed"
            ));
        }
        rendered.map_err(|e| describe(&e, template.source()))?;
        // minijinja writes whole strings, and the limit refuses a write whole, so the
        // bytes kept are valid UTF-8.
        String::from_utf8(output.bytes).map_err(|e| format!("the output is not UTF-8: {e}"))
    }
}

/// Keeps what a render writes, up to [`MAX_OUTPUT_BYTES`]; a write past that fails the
/// render, so a runaway template stops there instead of filling memory.
#[derive(Default)]
struct LimitedOutput {
    bytes: Vec<u8>,
    overflowed: bool,
}

impl Write for LimitedOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.bytes.len() + buf.len() > MAX_OUTPUT_BYTES {
            self.overflowed = true;
            return Err(io::Error::other("template output limit"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// An error in the author's terms: what went wrong and where ("syntax error: unexpected
/// end of input (line 2, column 5)").
fn describe(error: &minijinja::Error, source: &str) -> String {
    let mut text = match error.kind() {
        ErrorKind::OutOfFuel => "the template takes too many steps to render".to_owned(),
        kind => match error.detail() {
            Some(detail) => format!("{kind}: {detail}"),
            None => kind.to_string(),
        },
    };
    if let Some(line) = error.line() {
        let column = error
            .range()
            .and_then(|range| source.get(..range.start))
            .map(|before| before.chars().rev().take_while(|&c| c != '\n').count() + 1);
        match column {
            Some(column) => text.push_str(&format!(" (line {line}, column {column})")),
            None => text.push_str(&format!(" (line {line})")),
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use waymark_testkit::PeakMemory;

    use super::*;

    fn context() -> serde_json::Value {
        json!({
            "profile": {"traits": {"first_name": "Ada", "plan": "pro", "tags": ["a", "b"]}},
            "event": {"name": "Order Completed", "properties": {"revenue": 42.5}},
            "enrollment": {"id": "en-1"},
        })
    }

    fn render(source: &str) -> Result<String, String> {
        Template::compile(source)?.render(&context())
    }

    #[test]
    fn personalises_from_traits_and_event() {
        assert_eq!(
            render(
                "Hi {{ profile.traits.first_name }}, thanks for {{ event.properties.revenue }}!"
            )
            .unwrap(),
            "Hi Ada, thanks for 42.5!"
        );
        assert_eq!(
            render("{% for t in profile.traits.tags %}[{{ t | upper }}]{% endfor %}").unwrap(),
            "[A][B]"
        );
        assert_eq!(
            render(
                r#"{"plan": {{ profile.traits.plan | tojson }}, "e": {{ enrollment.id | tojson }}}"#
            )
            .unwrap(),
            r#"{"plan": "pro", "e": "en-1"}"#
        );
    }

    #[test]
    fn missing_traits_render_empty_or_their_default() {
        assert_eq!(render("Hi {{ profile.traits.nickname }}!").unwrap(), "Hi !");
        assert_eq!(render("[{{ profile.traits.address.city }}]").unwrap(), "[]");
        assert_eq!(render("[{{ nowhere.at.all }}]").unwrap(), "[]");
        assert_eq!(
            render(r#"Hi {{ profile.traits.nickname | default("there") }}!"#).unwrap(),
            "Hi there!"
        );
        assert_eq!(
            render("{% if profile.traits.vip %}VIP{% else %}regular{% endif %}").unwrap(),
            "regular"
        );
    }

    #[test]
    fn a_loop_bomb_runs_out_of_fuel_quickly_in_bounded_memory() {
        // Ten billion iterations: without the fuel these would not end.
        let memory = PeakMemory::start();
        // Writes nothing, so only the fuel can stop it.
        let silent = Template::compile(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        )
        .unwrap();
        let error = silent.render(&context()).unwrap_err();
        assert!(error.contains("too many steps"), "{error}");
        let noisy = Template::compile(
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
        )
        .unwrap();
        let error = noisy.render(&context()).unwrap_err();
        assert!(
            error.contains("too many steps") || error.contains("output passes"),
            "{error}"
        );
        assert!(
            memory.grown_bytes() < 32 * 1024 * 1024,
            "grew {} bytes",
            memory.grown_bytes()
        );
    }

    #[test]
    fn memory_bombs_run_out_of_fuel() {
        for source in [
            r#"{{ "x" * 100000000 }}"#,
            r#"{% set ns = namespace(s="xxxxxxxxxxxxxxxx") %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}"#,
            "{{ range(100000) | list | length }}{{ range(100000) | list | length }}",
        ] {
            let error = render(source).unwrap_err();
            assert!(error.contains("too many steps"), "{source}: {error}");
        }
    }

    #[test]
    fn output_is_limited() {
        let error = render(r#"{% for i in range(70) %}{{ "x" * 1000 }}{% endfor %}"#).unwrap_err();
        assert!(error.contains("output passes the 65536 bytes"), "{error}");
        let fits = render(r#"{% for i in range(60) %}{{ "x" * 1000 }}{% endfor %}"#).unwrap();
        assert_eq!(fits.len(), 60_000);
    }

    #[test]
    fn syntax_errors_name_line_and_column() {
        let error = Template::compile("Hello\n{{ profile.traits.first_name }\n").unwrap_err();
        assert!(error.starts_with("syntax error"), "{error}");
        assert!(error.contains("line 2"), "{error}");
        assert!(error.contains("column"), "{error}");
        let error = Template::compile("{% if x %}\nopen\n").unwrap_err();
        assert!(error.contains("syntax error"), "{error}");
    }

    #[test]
    fn other_templates_cannot_be_reached() {
        for source in [
            r#"{% include "secrets.txt" %}"#,
            r#"{% import "macros.j2" as m %}"#,
            r#"{% from "macros.j2" import m %}"#,
            r#"{% extends "base.html" %}"#,
        ] {
            let error = Template::compile(source).unwrap_err();
            assert!(error.contains("syntax error"), "{source}: {error}");
        }
    }

    #[test]
    fn oversized_sources_and_deep_nesting_are_errors() {
        let error = Template::compile(&"x".repeat(MAX_SOURCE_BYTES + 1)).unwrap_err();
        assert!(error.contains("16384"), "{error}");
        let deep = format!("{{{{ {}1{} }}}}", "(".repeat(5000), ")".repeat(5000));
        assert!(Template::compile(&deep).is_err());
        let deep = format!(
            "{}{}",
            "{% if true %}".repeat(1000),
            "{% endif %}".repeat(1000)
        );
        assert!(
            Template::compile(&deep)
                .and_then(|t| t.render(&context()))
                .is_err()
        );
    }

    #[test]
    fn runtime_errors_are_errors() {
        assert!(render("{{ 1 / 0 }}").unwrap_err().contains("line 1"));
        assert!(render("{{ profile.traits.tags + 1 }}").is_err());
        assert!(Template::compile("x").unwrap().render(&json!([1])).is_err());
    }

    #[test]
    fn a_template_is_shared_across_threads() {
        let template = Template::compile("{{ n }}").unwrap();
        let handles: Vec<_> = (0..4)
            .map(|n| {
                let template = template.clone();
                std::thread::spawn(move || template.render(&json!({"n": n})).unwrap())
            })
            .collect();
        let outputs: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(outputs, ["0", "1", "2", "3"]);
    }
}
