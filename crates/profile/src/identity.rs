//! Identifiers: extraction from events, normalisation, blocked values, per-type limits and
//! the priority order used when a merge would break a limit.

use waymark_proto::common::v1::{Event, EventType};
use waymark_proto::json::string_at;

/// An identifier: (type, normalised value).
pub type Ident = (String, String);

/// Values that never identify anyone (SDK defaults and placeholders).
const BLOCKED: &[&str] = &[
    "null",
    "none",
    "nil",
    "anonymous",
    "undefined",
    "unknown",
    "-1",
    "n/a",
    "test",
];

/// True for values that must never be matched.
pub fn is_blocked(value: &str) -> bool {
    let v = value.trim().to_ascii_lowercase();
    v.is_empty()
        || BLOCKED.contains(&v.as_str())
        // All zeros, e.g. the iOS advertising id when tracking is off.
        || v.chars().all(|c| c == '0' || c == '-' || c == ':')
}

/// Normalises a value for its type; None when it cannot identify anyone.
pub fn normalise(id_type: &str, value: &str) -> Option<String> {
    let value = value.trim();
    if is_blocked(value) {
        return None;
    }
    match id_type {
        "email" => {
            let v = value.to_lowercase();
            (v.contains('@') && !v.starts_with('@') && !v.ends_with('@')).then_some(v)
        }
        "phone" => normalise_phone(value),
        _ => Some(value.to_owned()),
    }
}

/// E.164: `+` and 8 to 15 digits. Accepts spaces, dashes, dots, parentheses and a `00`
/// international prefix; a number without a country code cannot be normalised.
pub fn normalise_phone(value: &str) -> Option<String> {
    let trimmed = value.trim();
    let international = trimmed.starts_with('+') || trimmed.starts_with("00");
    let mut digits: String = trimmed.chars().filter(char::is_ascii_digit).collect();
    if trimmed.starts_with("00") {
        digits.drain(..2);
    }
    (international && (8..=15).contains(&digits.len())).then(|| format!("+{digits}"))
}

/// Per-type limits and priorities.
#[derive(Debug, Clone, Default)]
pub struct IdentityRules {
    /// Trait keys (in `traits` or `context.traits`) that are identifiers of the same name.
    pub custom_types: Vec<String>,
}

impl IdentityRules {
    /// How many identifiers of a type one profile may hold.
    pub fn limit(&self, id_type: &str) -> usize {
        match id_type {
            "user_id" => 1,
            "email" | "phone" => 5,
            _ => usize::MAX,
        }
    }

    /// Higher is more trustworthy; the lowest is dropped first when a limit would break.
    pub fn priority(&self, id_type: &str) -> u8 {
        match id_type {
            "user_id" => 6,
            "email" => 5,
            "phone" => 4,
            "device_id" => 2,
            "anonymous_id" => 1,
            _ => 3,
        }
    }

    /// The identifiers an event carries, highest priority first, without duplicates.
    pub fn extract(&self, event: &Event) -> Vec<Ident> {
        let mut out: Vec<Ident> = Vec::new();
        let mut push = |id_type: &str, value: &str| {
            if let Some(v) = normalise(id_type, value) {
                let ident = (id_type.to_owned(), v);
                if !out.contains(&ident) {
                    out.push(ident);
                }
            }
        };
        push("user_id", &event.user_id);
        push("anonymous_id", &event.anonymous_id);
        if event.r#type() == EventType::Alias {
            // The earlier id of an alias is usually an anonymous id.
            push("anonymous_id", &event.previous_id);
        }
        let context_traits =
            event
                .context
                .as_ref()
                .and_then(|c| match c.fields.get("traits")?.kind.as_ref()? {
                    prost_types::value::Kind::StructValue(s) => Some(s),
                    _ => None,
                });
        for traits in [event.traits.as_ref(), context_traits]
            .into_iter()
            .flatten()
        {
            if let Some(email) = string_at(traits, &["email"]) {
                push("email", email);
            }
            if let Some(phone) = string_at(traits, &["phone"]) {
                push("phone", phone);
            }
            for custom in &self.custom_types {
                if let Some(v) = string_at(traits, &[custom.as_str()]) {
                    push(custom, v);
                }
            }
        }
        if let Some(device) = event
            .context
            .as_ref()
            .and_then(|c| string_at(c, &["device", "id"]))
        {
            push("device_id", device);
        }
        out.sort_by_key(|(t, _)| std::cmp::Reverse(self.priority(t)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use waymark_proto::json::struct_from_json;

    fn rules() -> IdentityRules {
        IdentityRules {
            custom_types: vec!["loyalty_id".into()],
        }
    }

    #[test]
    fn blocked_values_never_identify() {
        for v in [
            "null",
            "Anonymous",
            "undefined",
            "-1",
            "00000000-0000-0000-0000-000000000000",
            "",
            "  ",
        ] {
            assert!(is_blocked(v), "{v:?}");
        }
        assert!(!is_blocked("u-123"));
    }

    #[test]
    fn emails_and_phones_are_normalised() {
        assert_eq!(
            normalise("email", " Ada@Example.COM "),
            Some("ada@example.com".into())
        );
        assert_eq!(normalise("email", "not-an-email"), None);
        assert_eq!(
            normalise_phone("+49 (151) 234-56789"),
            Some("+4915123456789".into())
        );
        assert_eq!(
            normalise_phone("0049 151 23456789"),
            Some("+4915123456789".into())
        );
        assert_eq!(normalise_phone("0151 23456789"), None, "no country code");
    }

    #[test]
    fn extraction_covers_ids_traits_context_and_custom_types() {
        let serde_json::Value::Object(traits) =
            serde_json::json!({"email": "A@x.io", "loyalty_id": "L-7"})
        else {
            unreachable!()
        };
        let serde_json::Value::Object(context) =
            serde_json::json!({"traits": {"phone": "+1 415 555 0100"}, "device": {"id": "dev-1"}})
        else {
            unreachable!()
        };
        let mut event = Event {
            user_id: "u-1".into(),
            anonymous_id: "null".into(),
            traits: Some(struct_from_json(traits)),
            context: Some(struct_from_json(context)),
            ..Event::default()
        };
        event.set_type(EventType::Identify);
        let ids = rules().extract(&event);
        let types: Vec<&str> = ids.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(
            types,
            ["user_id", "email", "phone", "loyalty_id", "device_id"]
        );
        assert!(ids.contains(&("phone".into(), "+14155550100".into())));
    }
}
