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

mod hash;

use std::collections::{BTreeMap, HashMap, HashSet};

pub use hash::{DEV_HASH_KEY, IdentHasher, is_hash};

use prost_types::Struct;
use prost_types::value::Kind;
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

/// Why a value cannot identify anyone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unusable {
    /// Empty, or a placeholder such as `anonymous`, `null` or all zeros: expected from
    /// SDKs, and never an error.
    Blocked,
    /// A value that breaks the rule of its type, which the message names.
    Malformed {
        /// A short name for metrics: `email_no_at`, `phone_no_country_code`, ...
        rule: &'static str,
        /// The rule as a sentence, for the caller.
        message: String,
    },
}

impl std::fmt::Display for Unusable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unusable::Blocked => f.write_str(
                "is empty or a placeholder that identifies nobody (null, anonymous, unknown, all zeros, ...)",
            ),
            Unusable::Malformed { message, .. } => f.write_str(message),
        }
    }
}

fn malformed(rule: &'static str, message: impl Into<String>) -> Unusable {
    Unusable::Malformed {
        rule,
        message: message.into(),
    }
}

/// Normalises a value for its type, or says which rule it breaks.
pub fn check(id_type: &str, value: &str) -> Result<String, Unusable> {
    let value = value.trim();
    if is_blocked(value) {
        return Err(Unusable::Blocked);
    }
    match id_type {
        "email" => {
            let v = value.to_lowercase();
            match v.split_once('@') {
                None => Err(malformed(
                    "email_no_at",
                    "is not an e-mail address: it has no @",
                )),
                Some(("", _)) => Err(malformed(
                    "email_no_local_part",
                    "is not an e-mail address: nothing comes before the @",
                )),
                Some((_, domain)) if domain.is_empty() || v.ends_with('@') => Err(malformed(
                    "email_no_domain",
                    "is not an e-mail address: nothing comes after the @",
                )),
                Some(_) => Ok(v),
            }
        }
        "phone" => check_phone(value),
        _ => Ok(value.to_owned()),
    }
}

/// Normalises a value for its type; None when it cannot identify anyone.
pub fn normalise(id_type: &str, value: &str) -> Option<String> {
    check(id_type, value).ok()
}

/// E.164: `+` and 8 to 15 digits. Accepts spaces, dashes, dots, parentheses and a `00`
/// international prefix; a number without a country code cannot be normalised.
pub fn normalise_phone(value: &str) -> Option<String> {
    check_phone(value).ok()
}

fn check_phone(value: &str) -> Result<String, Unusable> {
    let trimmed = value.trim();
    let international = trimmed.starts_with('+') || trimmed.starts_with("00");
    let mut digits: String = trimmed.chars().filter(char::is_ascii_digit).collect();
    if trimmed.starts_with("00") {
        digits.drain(..2);
    }
    if !international {
        return Err(malformed(
            "phone_no_country_code",
            "is not a phone number in E.164 form: it needs its country code, starting with + or 00 (e.g. +44 20 7946 0958)",
        ));
    }
    if !(8..=15).contains(&digits.len()) {
        return Err(malformed(
            "phone_digits",
            format!(
                "is not a phone number in E.164 form: it has {} digits with its country code; E.164 numbers have 8 to 15",
                digits.len()
            ),
        ));
    }
    Ok(format!("+{digits}"))
}

/// An identifier an event carried that breaks the rule of its type, so it identifies
/// nobody (the value stays a trait).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    /// Where it was, in Segment's JSON naming (`traits.email`).
    pub field: String,
    /// Its type.
    pub id_type: String,
    /// The rule's short name, for metrics.
    pub rule: &'static str,
    /// The rule as a sentence.
    pub message: String,
}

/// Longest identifier value accepted anywhere (user, anonymous, previous and group ids,
/// e-mail, phone, device id, custom identifier traits), in bytes of UTF-8. Identifiers
/// are keys of btree indexes in both services, and PostgreSQL refuses an index entry over
/// about 2,700 bytes; 256 leaves room for the type and the ids stored beside the value,
/// and no real e-mail address (254 at most) or id is longer.
pub const MAX_IDENTIFIER_BYTES: usize = 256;
/// Longest trait or property key, in bytes: keys become profile trait names and segment
/// variables, and a key is never prose.
pub const MAX_KEY_BYTES: usize = 256;
/// Longest consent channel or purpose name, in bytes: each pair is a key of the profile's
/// consent map (`email/marketing`).
pub const MAX_CONSENT_NAME_BYTES: usize = 64;

/// Deepest nesting of objects and arrays in an event's properties, traits, context and
/// integrations (and a trusted update's traits), the object itself being level 1.
/// Consumers decode events and profiles with prost, which refuses messages nested more
/// than 100 deep, and every JSON level costs about three of its levels (Struct, Value, the
/// next Struct or ListValue) below the envelope (request, event, profile): 16 levels stay
/// far inside, and no real payload comes near.
pub const MAX_DEPTH: usize = 16;

/// Checks that `object`, the top-level field `name` (e.g. `properties`), nests at most
/// [`MAX_DEPTH`] levels and has no key longer than [`MAX_KEY_BYTES`] at any depth. The
/// error is the field path (`properties.cart.items[2]`) and the problem. The recursion
/// stops at the limit, so it stays shallow whatever it is given.
pub fn check_object(name: &str, object: &Struct) -> Result<(), (String, String)> {
    walk_object(object, 1).map_err(|(mut path, problem)| {
        path.reverse();
        let mut field = name.to_owned();
        for step in path {
            if !step.starts_with('[') {
                field.push('.');
            }
            field.push_str(&step);
        }
        (field, problem)
    })
}

/// The path to a problem, innermost step first, and the problem.
type Found = (Vec<String>, String);

fn too_deep() -> Found {
    (
        Vec::new(),
        format!("nests objects and arrays more than {MAX_DEPTH} levels deep"),
    )
}

fn walk_object(object: &Struct, depth: usize) -> Result<(), Found> {
    if depth > MAX_DEPTH {
        return Err(too_deep());
    }
    for (key, value) in &object.fields {
        if key.len() > MAX_KEY_BYTES {
            let start: String = key.chars().take(32).collect();
            return Err((
                Vec::new(),
                format!("has a key longer than {MAX_KEY_BYTES} bytes: {start:?}..."),
            ));
        }
        walk_value(value, depth).map_err(|(mut path, problem)| {
            path.push(key.clone());
            (path, problem)
        })?;
    }
    Ok(())
}

/// Checks a value found in an object at `depth`.
fn walk_value(value: &prost_types::Value, depth: usize) -> Result<(), Found> {
    match &value.kind {
        Some(Kind::StructValue(object)) => walk_object(object, depth + 1),
        Some(Kind::ListValue(list)) => {
            if depth + 1 > MAX_DEPTH {
                return Err(too_deep());
            }
            for (i, item) in list.values.iter().enumerate() {
                walk_value(item, depth + 1).map_err(|(mut path, problem)| {
                    path.push(format!("[{i}]"));
                    (path, problem)
                })?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
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

    /// The first identifier value of the event longer than [`MAX_IDENTIFIER_BYTES`], as its
    /// field path in Segment's JSON (`traits.email`, `context.device.id`) and its length.
    /// Raw values are measured, wherever [`Self::extract`] reads one, and the group id too.
    pub fn oversized_identifier(&self, event: &Event) -> Option<(String, usize)> {
        let too_long = |value: &str| value.len() > MAX_IDENTIFIER_BYTES;
        for (field, value) in [
            ("userId", &event.user_id),
            ("anonymousId", &event.anonymous_id),
            ("previousId", &event.previous_id),
            ("groupId", &event.group_id),
        ] {
            if too_long(value) {
                return Some((field.to_owned(), value.len()));
            }
        }
        let context_traits = event.context.as_ref().and_then(|c| struct_at(c, "traits"));
        for (prefix, traits) in [
            ("traits", event.traits.as_ref()),
            ("context.traits", context_traits),
        ] {
            let Some(traits) = traits else { continue };
            let types = ["email", "phone"]
                .into_iter()
                .chain(self.custom_types.iter().map(String::as_str));
            for id_type in types {
                if let Some(value) = string_at(traits, &[id_type])
                    && too_long(value)
                {
                    return Some((format!("{prefix}.{id_type}"), value.len()));
                }
            }
        }
        match event
            .context
            .as_ref()
            .and_then(|c| string_at(c, &["device", "id"]))
        {
            Some(device) if too_long(device) => {
                Some(("context.device.id".to_owned(), device.len()))
            }
            _ => None,
        }
    }

    /// The identifiers an event carries, highest priority first, without duplicates.
    pub fn extract(&self, event: &Event) -> Vec<Ident> {
        self.extract_checked(event).0
    }

    /// The e-mail and phone identifiers of `event` that break their type's rule (the only
    /// types with one), without extracting the rest: cheap enough for every ingested event.
    pub fn malformed(&self, event: &Event) -> Vec<Dropped> {
        let mut dropped = Vec::new();
        let context_traits = event.context.as_ref().and_then(|c| struct_at(c, "traits"));
        for (prefix, traits) in [
            ("traits", event.traits.as_ref()),
            ("context.traits", context_traits),
        ] {
            let Some(traits) = traits else { continue };
            for id_type in ["email", "phone"] {
                if let Some(value) = string_at(traits, &[id_type])
                    && let Err(Unusable::Malformed { rule, message }) = check(id_type, value)
                {
                    dropped.push(Dropped {
                        field: format!("{prefix}.{id_type}"),
                        id_type: id_type.to_owned(),
                        rule,
                        message,
                    });
                }
            }
        }
        dropped
    }

    /// [`Self::extract`], and the identifiers it left out because they break the rule of
    /// their type (blocked placeholders are not counted: SDKs send them on purpose).
    pub fn extract_checked(&self, event: &Event) -> (Vec<Ident>, Vec<Dropped>) {
        let mut out: Vec<Ident> = Vec::new();
        let mut dropped: Vec<Dropped> = Vec::new();
        let mut push = |field: &str, id_type: &str, value: &str| match check(id_type, value) {
            Ok(v) => {
                let ident = (id_type.to_owned(), v);
                if !out.contains(&ident) {
                    out.push(ident);
                }
            }
            Err(Unusable::Malformed { rule, message }) => dropped.push(Dropped {
                field: field.to_owned(),
                id_type: id_type.to_owned(),
                rule,
                message,
            }),
            Err(Unusable::Blocked) => {}
        };
        push("userId", "user_id", &event.user_id);
        push("anonymousId", "anonymous_id", &event.anonymous_id);
        if event.r#type() == EventType::Alias {
            // The earlier id of an alias is usually an anonymous id.
            push("previousId", "anonymous_id", &event.previous_id);
        }
        let context_traits = event.context.as_ref().and_then(|c| struct_at(c, "traits"));
        for (prefix, traits) in [
            ("traits", event.traits.as_ref()),
            ("context.traits", context_traits),
        ] {
            let Some(traits) = traits else { continue };
            if let Some(email) = string_at(traits, &["email"]) {
                push(&format!("{prefix}.email"), "email", email);
            }
            if let Some(phone) = string_at(traits, &["phone"]) {
                push(&format!("{prefix}.phone"), "phone", phone);
            }
            for custom in &self.custom_types {
                if let Some(v) = string_at(traits, &[custom.as_str()]) {
                    push(&format!("{prefix}.{custom}"), custom, v);
                }
            }
        }
        if let Some(device) = event
            .context
            .as_ref()
            .and_then(|c| string_at(c, &["device", "id"]))
        {
            push("context.device.id", "device_id", device);
        }
        out.sort_by_key(|(t, _)| self.rank(t));
        (out, dropped)
    }
}

/// The object under `key`, if it is one.
fn struct_at<'a>(s: &'a Struct, key: &str) -> Option<&'a Struct> {
    match s.fields.get(key)?.kind.as_ref()? {
        Kind::StructValue(s) => Some(s),
        _ => None,
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
        let rule = |t: &str, v: &str| match check(t, v) {
            Err(Unusable::Malformed { rule, message }) => (rule, message),
            other => panic!("{t} {v:?}: {other:?}"),
        };
        assert_eq!(rule("email", "ada.example.com").0, "email_no_at");
        assert_eq!(rule("email", "@example.com").0, "email_no_local_part");
        assert_eq!(rule("email", "ada@").0, "email_no_domain");
        let (name, message) = rule("phone", "020 7946 0958");
        assert_eq!(name, "phone_no_country_code");
        assert!(message.contains("country code"), "{message}");
        let (name, message) = rule("phone", "+44 12");
        assert_eq!(name, "phone_digits");
        assert!(message.contains("has 4 digits"), "{message}");
        assert_eq!(check("anonymous_id", "anonymous"), Err(Unusable::Blocked));
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

    #[test]
    fn oversized_identifiers_are_named_by_field() {
        let rules = rules();
        let long = "x".repeat(MAX_IDENTIFIER_BYTES + 1);
        let mut event = Event {
            user_id: "x".repeat(MAX_IDENTIFIER_BYTES),
            ..Event::default()
        };
        assert_eq!(
            rules.oversized_identifier(&event),
            None,
            "the limit itself is fine"
        );
        event.group_id = long.clone();
        assert_eq!(
            rules.oversized_identifier(&event),
            Some(("groupId".to_owned(), MAX_IDENTIFIER_BYTES + 1))
        );
        event.group_id.clear();
        event.context = Some(struct_from_json(
            serde_json::json!({"traits": {"loyalty_id": long}})
                .as_object()
                .unwrap()
                .clone(),
        ));
        let (field, _) = rules.oversized_identifier(&event).unwrap();
        assert_eq!(field, "context.traits.loyalty_id");
        event.context = Some(struct_from_json(
            serde_json::json!({"device": {"id": long}, "traits": {"note": long}})
                .as_object()
                .unwrap()
                .clone(),
        ));
        let (field, _) = rules.oversized_identifier(&event).unwrap();
        assert_eq!(
            field, "context.device.id",
            "traits that are not identifiers are not checked"
        );
        event.context = None;
        event.traits = Some(struct_from_json(
            serde_json::json!({"email": format!("{long}@example.com")})
                .as_object()
                .unwrap()
                .clone(),
        ));
        let (field, _) = rules.oversized_identifier(&event).unwrap();
        assert_eq!(field, "traits.email");
    }

    #[test]
    fn objects_are_checked_for_depth_and_key_length_at_every_level() {
        let object = |v: serde_json::Value| struct_from_json(v.as_object().unwrap().clone());
        // 16 levels: the object, the list in `a`, then 14 objects.
        let mut deep = serde_json::json!(1);
        for _ in 0..14 {
            deep = serde_json::json!({ "k": deep });
        }
        let fine = object(serde_json::json!({"a": [deep.clone()]}));
        assert_eq!(check_object("traits", &fine), Ok(()));
        let too_deep = object(serde_json::json!({"a": [{ "k": deep }]}));
        let (field, problem) = check_object("traits", &too_deep).unwrap_err();
        assert!(field.starts_with("traits.a[0].k.k"), "{field}");
        assert!(problem.contains("16 levels"), "{problem}");
        let long_key = object(serde_json::json!({"a": [1, {"k".repeat(MAX_KEY_BYTES + 1): 1}]}));
        let (field, problem) = check_object("properties", &long_key).unwrap_err();
        assert_eq!(field, "properties.a[1]");
        assert!(problem.contains("key longer than 256 bytes"), "{problem}");
    }
}
