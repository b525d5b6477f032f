//! Customer identifiers: extraction from events, normalisation, blocked values, per-type
//! limits and the priority order used when a merge would break a limit.
//!
//! A limit works one of two ways. Identifiers that name a person (user ids, e-mails,
//! phones, custom types) *refuse*: an event or merge that would give a profile one too
//! many leaves out its least trustworthy identifier instead. Identifiers that name a
//! browser or a device ([`RECENT_TYPES`]: anonymous and device ids, which contact centres,
//! e-mail links and shared devices mint afresh all the time) *keep the most recent*: the
//! profile takes the new one and gives up the one it used least recently, which from then
//! on resolves to no profile.
//!
//! Ingestion (to drop the events of erased customers) and the profile service (to resolve
//! them) must agree exactly on what an event's identifiers are, so both use this crate.

use std::collections::{BTreeMap, HashMap, HashSet};

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

/// Identifier types every deployment has.
pub const BUILT_IN_TYPES: [&str; 5] = ["user_id", "email", "phone", "device_id", "anonymous_id"];

/// Types whose limit keeps a profile's most recently used identifiers rather than refusing
/// a new one.
pub const RECENT_TYPES: [&str; 2] = ["device_id", "anonymous_id"];

/// The default limits per type.
const DEFAULT_LIMITS: [(&str, usize); 5] = [
    ("user_id", 1),
    ("email", 5),
    ("phone", 5),
    ("device_id", 10),
    ("anonymous_id", 25),
];

/// A setting of the identity rules that cannot work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RulesError {
    /// `custom_identity_types`, `identity_limits` or `identity_priority`.
    pub setting: &'static str,
    pub problem: String,
}

impl std::fmt::Display for RulesError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid setting `{}`: {}", self.setting, self.problem)
    }
}

impl std::error::Error for RulesError {}

/// Which identifier types exist, how many of each one profile may hold, and which
/// identifier gives way first when a merge would break a limit.
#[derive(Debug, Clone)]
pub struct IdentityRules {
    /// Trait keys (in `traits` or `context.traits`) that are identifiers of the same name.
    custom_types: Vec<String>,
    /// Types with a limit; the others are unlimited.
    limits: HashMap<String, usize>,
    /// Every type, most trustworthy first.
    priority: Vec<String>,
}

impl Default for IdentityRules {
    fn default() -> Self {
        Self::new(Vec::new(), &BTreeMap::new(), &[]).expect("the defaults are valid")
    }
}

impl IdentityRules {
    /// Rules with `custom_types` besides the built-in ones. `limits` overrides the default
    /// limits per type (user_id 1, email 5, phone 5, device_id 10, anonymous_id 25; 0 means
    /// unlimited). `priority` lists
    /// types most trustworthy first; types it leaves out follow in the default order
    /// (user_id, email, phone, the custom types as declared, device_id, anonymous_id).
    pub fn new(
        custom_types: Vec<String>,
        limits: &BTreeMap<String, u32>,
        priority: &[String],
    ) -> Result<Self, RulesError> {
        let error = |setting, problem: String| RulesError { setting, problem };
        let mut seen = HashSet::new();
        for t in &custom_types {
            if t.is_empty() || t.contains(':') || BUILT_IN_TYPES.contains(&t.as_str()) {
                return Err(error(
                    "custom_identity_types",
                    format!("{t:?} is empty, built in, or contains ':'"),
                ));
            }
            if !seen.insert(t.as_str()) {
                return Err(error(
                    "custom_identity_types",
                    format!("{t:?} is declared twice"),
                ));
            }
        }
        let known = |t: &str| BUILT_IN_TYPES.contains(&t) || custom_types.iter().any(|c| c == t);
        let mut all_limits: HashMap<String, usize> = DEFAULT_LIMITS
            .into_iter()
            .map(|(t, n)| (t.to_owned(), n))
            .collect();
        for (t, n) in limits {
            if !known(t) {
                return Err(error(
                    "identity_limits",
                    format!("{t:?} is not an identifier type (built in or custom_identity_types)"),
                ));
            }
            match n {
                0 => all_limits.remove(t),
                n => all_limits.insert(t.clone(), *n as usize),
            };
        }
        let mut order: Vec<String> = Vec::new();
        for t in priority {
            if !known(t) {
                return Err(error(
                    "identity_priority",
                    format!("{t:?} is not an identifier type (built in or custom_identity_types)"),
                ));
            }
            if order.contains(t) {
                return Err(error("identity_priority", format!("{t:?} is listed twice")));
            }
            order.push(t.clone());
        }
        let defaults = ["user_id", "email", "phone"]
            .into_iter()
            .map(str::to_owned)
            .chain(custom_types.iter().cloned())
            .chain(["device_id".to_owned(), "anonymous_id".to_owned()]);
        for t in defaults {
            if !order.contains(&t) {
                order.push(t);
            }
        }
        Ok(Self {
            custom_types,
            limits: all_limits,
            priority: order,
        })
    }

    /// Whether `id_type` is an identifier type of this deployment.
    pub fn is_type(&self, id_type: &str) -> bool {
        self.priority.iter().any(|t| t == id_type)
    }

    /// How many identifiers of a type one profile may hold.
    pub fn limit(&self, id_type: &str) -> usize {
        self.limits.get(id_type).copied().unwrap_or(usize::MAX)
    }

    /// Whether a profile over the type's limit gives up its least recently used identifier
    /// of the type (anonymous and device ids) rather than refusing the new one.
    pub fn keeps_recent(&self, id_type: &str) -> bool {
        RECENT_TYPES.contains(&id_type) && self.limits.contains_key(id_type)
    }

    /// The type's rank: 0 is the most trustworthy; the highest rank gives way first when
    /// a limit would break.
    pub fn rank(&self, id_type: &str) -> usize {
        self.priority
            .iter()
            .position(|t| t == id_type)
            .unwrap_or(self.priority.len())
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
        out.sort_by_key(|(t, _)| self.rank(t));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use waymark_proto::json::struct_from_json;

    fn rules() -> IdentityRules {
        IdentityRules::new(vec!["loyalty_id".into()], &BTreeMap::new(), &[]).unwrap()
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

    #[test]
    fn limits_and_priorities_are_configurable_and_checked() {
        let defaults = IdentityRules::default();
        assert_eq!(defaults.limit("user_id"), 1);
        assert_eq!(defaults.limit("email"), 5);
        assert_eq!(defaults.limit("anonymous_id"), 25);
        assert_eq!(defaults.limit("device_id"), 10);
        assert!(defaults.keeps_recent("anonymous_id") && defaults.keeps_recent("device_id"));
        assert!(!defaults.keeps_recent("email") && !defaults.keeps_recent("user_id"));
        assert!(defaults.rank("user_id") < defaults.rank("email"));
        assert!(defaults.rank("device_id") < defaults.rank("anonymous_id"));

        let limits = BTreeMap::from([("email".to_owned(), 2), ("phone".to_owned(), 0)]);
        let rules = IdentityRules::new(
            vec!["loyalty_id".into()],
            &limits,
            &["loyalty_id".into(), "user_id".into()],
        )
        .unwrap();
        assert_eq!(rules.limit("email"), 2);
        assert_eq!(rules.limit("phone"), usize::MAX, "0 is unlimited");
        let unlimited = BTreeMap::from([("anonymous_id".to_owned(), 0)]);
        let rules_unlimited = IdentityRules::new(Vec::new(), &unlimited, &[]).unwrap();
        assert_eq!(rules_unlimited.limit("anonymous_id"), usize::MAX);
        assert!(
            !rules_unlimited.keeps_recent("anonymous_id"),
            "nothing to give up"
        );
        assert_eq!(rules.limit("user_id"), 1, "defaults stay for unnamed types");
        assert_eq!(rules.rank("loyalty_id"), 0);
        assert_eq!(rules.rank("user_id"), 1);
        assert!(rules.rank("email") < rules.rank("anonymous_id"));
        assert!(rules.is_type("loyalty_id") && !rules.is_type("shoe_size"));

        let unknown = BTreeMap::from([("shoe_size".to_owned(), 1)]);
        let error = IdentityRules::new(Vec::new(), &unknown, &[]).unwrap_err();
        assert_eq!(error.setting, "identity_limits");
        assert!(error.problem.contains("shoe_size"), "{error}");
        let error = IdentityRules::new(
            Vec::new(),
            &BTreeMap::new(),
            &["email".into(), "email".into()],
        )
        .unwrap_err();
        assert_eq!(error.setting, "identity_priority");
        let error = IdentityRules::new(vec!["email".into()], &BTreeMap::new(), &[]).unwrap_err();
        assert_eq!(error.setting, "custom_identity_types");
    }
}
