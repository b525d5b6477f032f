//! Segment membership: which segments a profile belongs to, decided by each segment's
//! condition over the profile's variables (see `Segment.condition` in profile.proto).

use std::collections::BTreeMap;

use prost_types::value::Kind;
use waymark_condition::{Condition, Type, Value, Variables};
use waymark_kit::time::micros;
use waymark_proto::common::v1::Channel;
use waymark_proto::profile::v1::{ComputedTraits, Emotion, Profile, Segment};

use crate::emotion::EmotionRules;

/// The variables a segment condition can read, with their types (see [`variables`]):
/// conditions are type-checked against them when they are saved. Traits are whatever the
/// customer's events set, so only their being a map is known.
pub fn declarations() -> Vec<(&'static str, Type)> {
    let strings = || Type::List(Box::new(Type::String));
    vec![
        ("traits", Type::Map(Box::new(Type::Dyn))),
        (
            "computed",
            Type::object([
                ("first_seen", Type::Timestamp),
                ("last_seen", Type::Timestamp),
                ("event_counts", Type::Map(Box::new(Type::Int))),
                ("channels", strings()),
                ("last_channel", Type::String),
                ("lifetime_value", Type::Double),
                ("total_events", Type::Int),
                ("aggregates", Type::Map(Box::new(Type::Dyn))),
            ]),
        ),
        (
            "emotion",
            Type::object([("score", Type::Double), ("label", Type::String)]),
        ),
        ("consent", Type::Map(Box::new(Type::Bool))),
        ("identities", Type::Map(Box::new(strings()))),
        ("now", Type::Timestamp),
    ]
}

const MAX_ID_CHARS: usize = 64;
const MAX_NAME_CHARS: usize = 200;

/// A validated segment, its condition compiled.
#[derive(Debug, Clone)]
pub struct SegmentDefinition {
    pub segment_id: String,
    pub name: String,
    pub description: String,
    pub condition: Condition,
    /// The condition reads `now` or `emotion` (which decays), so membership changes with
    /// time alone and is re-evaluated periodically as well as on every event.
    pub time_based: bool,
}

/// Checks a segment as given to PutSegment. The error names the field and the problem.
pub fn validate_segment(segment: &Segment) -> Result<SegmentDefinition, (&'static str, String)> {
    let id = &segment.segment_id;
    if id.is_empty()
        || id.len() > MAX_ID_CHARS
        || !id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    {
        return Err((
            "segment_id",
            format!("must be 1-{MAX_ID_CHARS} characters of a-z, 0-9, `_` and `-`"),
        ));
    }
    if segment.name.chars().count() > MAX_NAME_CHARS {
        return Err((
            "name",
            format!("must be at most {MAX_NAME_CHARS} characters"),
        ));
    }
    let condition = Condition::compile_typed(&segment.condition, &declarations())
        .map_err(|e| ("condition", e.to_string()))?;
    Ok(SegmentDefinition {
        segment_id: segment.segment_id.clone(),
        name: segment.name.clone(),
        description: segment.description.clone(),
        // Emotion decays between signals, so a condition on it moves with time as well.
        time_based: condition.uses("now") || condition.uses("emotion"),
        condition,
    })
}

/// The names of the profile's variables, as [`declarations`] lists them.
pub const VARIABLES: [&str; 6] = [
    "traits",
    "computed",
    "emotion",
    "consent",
    "identities",
    "now",
];

/// The variables of `profile` at `now_us` (microseconds since the Unix epoch).
pub fn variables(profile: &Profile, now_us: i64, emotion_rules: &EmotionRules) -> Variables {
    let mut vars = Variables::new();
    for name in VARIABLES {
        if let Some(value) = variable(profile, name, now_us, emotion_rules) {
            vars.set(name, value);
        }
    }
    vars
}

/// One of [`VARIABLES`] of `profile` at `now_us`, for a caller that sets only those its
/// conditions read; `None` for another name.
pub fn variable(
    profile: &Profile,
    name: &str,
    now_us: i64,
    emotion_rules: &EmotionRules,
) -> Option<Value> {
    Some(match name {
        "traits" => profile
            .traits
            .as_ref()
            .map_or_else(|| Value::Map(BTreeMap::new()), struct_value),
        "computed" => computed(profile.computed.as_ref()),
        "emotion" => emotion(profile.emotion.as_ref(), now_us, emotion_rules),
        "consent" => Value::Map(
            profile
                .consents
                .iter()
                .map(|c| (format!("{}/{}", c.channel, c.purpose), c.granted.into()))
                .collect(),
        ),
        "identities" => {
            let mut identities = BTreeMap::<String, Vec<Value>>::new();
            for identity in &profile.identities {
                identities
                    .entry(identity.r#type.clone())
                    .or_default()
                    .push(identity.value.as_str().into());
            }
            Value::Map(
                identities
                    .into_iter()
                    .map(|(k, v)| (k, Value::List(v)))
                    .collect(),
            )
        }
        "now" => Value::Timestamp(now_us),
        _ => return None,
    })
}

fn computed(computed: Option<&ComputedTraits>) -> Value {
    let default = ComputedTraits::default();
    let c = computed.unwrap_or(&default);
    let mut m = BTreeMap::new();
    // Unset times stay absent: a condition on them is false rather than true for 1970.
    if let Some(t) = &c.first_seen {
        m.insert("first_seen".into(), Value::Timestamp(micros(t)));
    }
    if let Some(t) = &c.last_seen {
        m.insert("last_seen".into(), Value::Timestamp(micros(t)));
    }
    m.insert(
        "event_counts".into(),
        Value::Map(
            c.event_counts
                .iter()
                .map(|(name, n)| (name.clone(), count(*n)))
                .collect(),
        ),
    );
    m.insert(
        "channels".into(),
        Value::List(
            c.channels
                .iter()
                .map(|ch| channel_name(*ch).into())
                .collect(),
        ),
    );
    m.insert("last_channel".into(), channel_name(c.last_channel).into());
    m.insert("lifetime_value".into(), c.lifetime_value.into());
    m.insert("total_events".into(), count(c.total_events));
    m.insert(
        "aggregates".into(),
        Value::Map(
            c.aggregates
                .iter()
                .map(|(name, v)| (name.clone(), value(v)))
                .collect(),
        ),
    );
    Value::Map(m)
}

/// Counts as CEL ints, which the integer literals of conditions are: a uint would not add
/// to or subtract from them.
fn count(n: u64) -> Value {
    Value::Int(i64::try_from(n).unwrap_or(i64::MAX))
}

/// A channel as conditions name it ("web", "mobile_app", "contact_center"): the enum name
/// without `CHANNEL_`, lower-cased.
pub fn channel_name(channel: i32) -> String {
    let channel = Channel::try_from(channel).unwrap_or(Channel::Unspecified);
    let name = channel.as_str_name();
    name.strip_prefix("CHANNEL_")
        .unwrap_or(name)
        .to_ascii_lowercase()
}

/// The score decayed to now and its label. No emotion yet leaves the map empty, so
/// conditions on it are false.
fn emotion(emotion: Option<&Emotion>, now_us: i64, rules: &EmotionRules) -> Value {
    let Some(e) = emotion else {
        return Value::Map(BTreeMap::new());
    };
    let (score, label) = crate::emotion::current(e, now_us, rules);
    Value::Map(BTreeMap::from([
        ("score".to_owned(), score.into()),
        ("label".to_owned(), crate::emotion::label_name(label).into()),
    ]))
}

/// A protobuf `Struct` (traits, event properties) as condition data.
pub fn struct_value(s: &prost_types::Struct) -> Value {
    Value::Map(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), value(v)))
            .collect(),
    )
}

fn value(v: &prost_types::Value) -> Value {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::NumberValue(n)) => Value::Double(*n),
        Some(Kind::StringValue(s)) => s.as_str().into(),
        Some(Kind::BoolValue(b)) => (*b).into(),
        Some(Kind::StructValue(s)) => struct_value(s),
        Some(Kind::ListValue(l)) => Value::List(l.values.iter().map(value).collect()),
    }
}

/// How a profile's segment memberships change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Membership {
    /// Segments the profile joins, sorted.
    pub entered: Vec<String>,
    /// Segments the profile leaves, sorted.
    pub exited: Vec<String>,
    /// Every segment the profile is in afterwards, sorted: the new `Profile.segments`.
    pub members: Vec<String>,
}

/// Evaluates `segments` for `profile` at `now_us` against its current `profile.segments`.
///
/// Memberships of segments not in `segments` are kept, so a caller can re-evaluate only
/// the time-based ones; deleting a segment removes its members itself. A condition that
/// fails for this profile counts as not matching and is logged: one bad segment never
/// fails the event.
pub fn evaluate_memberships(
    profile: &Profile,
    segments: &[SegmentDefinition],
    now_us: i64,
    emotion_rules: &EmotionRules,
) -> Membership {
    let vars = variables(profile, now_us, emotion_rules);
    let mut entered = Vec::new();
    let mut exited = Vec::new();
    let mut members: Vec<String> = profile
        .segments
        .iter()
        .filter(|id| !segments.iter().any(|s| &s.segment_id == *id))
        .cloned()
        .collect();
    for segment in segments {
        let matches = segment.condition.evaluate(&vars).unwrap_or_else(|error| {
            tracing::warn!(
                segment_id = %segment.segment_id,
                profile_id = %profile.profile_id,
                %error,
                "segment condition failed; counted as not matching"
            );
            false
        });
        let was = profile.segments.contains(&segment.segment_id);
        if matches {
            members.push(segment.segment_id.clone());
            if !was {
                entered.push(segment.segment_id.clone());
            }
        } else if was {
            exited.push(segment.segment_id.clone());
        }
    }
    for ids in [&mut entered, &mut exited, &mut members] {
        ids.sort();
        ids.dedup();
    }
    Membership {
        entered,
        exited,
        members,
    }
}

#[cfg(test)]
mod tests {
    use prost_types::Timestamp;
    use waymark_proto::common::v1::Identity;
    use waymark_proto::json::struct_from_json;
    use waymark_proto::profile::v1::{Consent, EmotionLabel};

    use super::*;
    use waymark_kit::time::from_micros;

    const DAY_US: i64 = 86_400_000_000;
    const NOW_US: i64 = 1_767_225_600_000_000; // 2026-01-01T00:00:00Z

    fn segment(id: &str, condition: &str) -> SegmentDefinition {
        validate_segment(&Segment {
            segment_id: id.into(),
            name: id.replace('-', " "),
            condition: condition.into(),
            ..Segment::default()
        })
        .unwrap()
    }

    /// The declared types are the types [`variables`] gives a full profile, field by field.
    #[test]
    fn declarations_match_the_variables() {
        use waymark_condition::Type;
        let rules = EmotionRules {
            half_life: std::time::Duration::from_secs(3600),
        };
        let vars = variables(&ana(), NOW_US, &rules);
        for (name, declared) in declarations() {
            let Type::Object(fields) = declared else {
                continue;
            };
            let source = fields
                .keys()
                .map(|field| format!("has({name}.{field})"))
                .collect::<Vec<_>>()
                .join(" && ");
            let all_present = Condition::compile(&source, &[name]).unwrap();
            assert!(
                all_present.evaluate(&vars).unwrap(),
                "{name} lacks a declared field"
            );
            let undeclared = format!("size({name}) == {}", fields.len());
            let no_more = Condition::compile(&undeclared, &[name]).unwrap();
            assert!(
                no_more.evaluate(&vars).unwrap(),
                "{name} has a field not declared"
            );
        }
    }

    fn at(days_ago: i64) -> Option<Timestamp> {
        Some(from_micros(NOW_US - days_ago * DAY_US))
    }

    /// A pro customer who last bought 40 days ago, opted into marketing e-mail, and whose
    /// latest call left them upset.
    fn ana() -> Profile {
        let serde_json::Value::Object(traits) = serde_json::json!({
            "plan": "pro",
            "email": "ana@example.com",
            "company": {"name": "Acme", "employees": 120},
            "tags": ["beta"],
        }) else {
            unreachable!()
        };
        Profile {
            profile_id: "0194c5a2-ana".into(),
            identities: vec![
                Identity {
                    r#type: "email".into(),
                    value: "ana@example.com".into(),
                },
                Identity {
                    r#type: "device_id".into(),
                    value: "ios-1".into(),
                },
                Identity {
                    r#type: "device_id".into(),
                    value: "web-7".into(),
                },
            ],
            traits: Some(struct_from_json(traits)),
            computed: Some(ComputedTraits {
                first_seen: at(400),
                last_seen: at(40),
                event_counts: [("Order Completed".to_owned(), 7)].into(),
                channels: vec![Channel::Web as i32, Channel::ContactCenter as i32],
                last_channel: Channel::ContactCenter as i32,
                lifetime_value: 1_250.0,
                total_events: 93,
                aggregates: [(
                    "orders_90d".to_owned(),
                    prost_types::Value {
                        kind: Some(Kind::NumberValue(2.0)),
                    },
                )]
                .into(),
            }),
            consents: vec![
                Consent {
                    channel: "email".into(),
                    purpose: "marketing".into(),
                    granted: true,
                    ..Consent::default()
                },
                Consent {
                    channel: "sms".into(),
                    purpose: "marketing".into(),
                    granted: false,
                    ..Consent::default()
                },
            ],
            emotion: Some(Emotion {
                score: -0.9,
                label: EmotionLabel::Upset as i32,
                updated_at: at(1),
                last_signal: None,
            }),
            ..Profile::default()
        }
    }

    fn matches(profile: &Profile, condition: &str) -> bool {
        let m = evaluate_memberships(
            profile,
            &[segment("s", condition)],
            NOW_US,
            &EmotionRules::default(),
        );
        m.members == ["s"]
    }

    #[test]
    fn segments_are_validated() {
        let ok = Segment {
            segment_id: "high-value_2".into(),
            name: "High value".into(),
            description: "LTV over 1000".into(),
            condition: "computed.lifetime_value > 1000".into(),
            ..Segment::default()
        };
        let def = validate_segment(&ok).unwrap();
        assert_eq!(def.segment_id, "high-value_2");
        assert!(!def.time_based);
        for id in ["", "High", "a b", "café", &"a".repeat(65)] {
            let bad = Segment {
                segment_id: id.into(),
                ..ok.clone()
            };
            assert_eq!(
                validate_segment(&bad).unwrap_err().0,
                "segment_id",
                "{id:?}"
            );
        }
        let long_name = Segment {
            name: "é".repeat(201),
            ..ok.clone()
        };
        assert_eq!(validate_segment(&long_name).unwrap_err().0, "name");
        let typo = Segment {
            condition: "computed.lifetime_value > 1000 && trait.plan == \"pro\"".into(),
            ..ok.clone()
        };
        let (field, problem) = validate_segment(&typo).unwrap_err();
        assert_eq!(field, "condition");
        assert!(
            problem.starts_with("line 1, column 35: unknown variable `trait`"),
            "{problem}"
        );
        let empty = Segment {
            condition: String::new(),
            ..ok
        };
        assert_eq!(validate_segment(&empty).unwrap_err().0, "condition");
    }

    #[test]
    fn variables_follow_the_proto_spec() {
        let p = ana();
        for condition in [
            r#"traits.plan == "pro" && traits.company.employees >= 100"#,
            r#""beta" in traits.tags"#,
            r#"computed.channels == ["web", "contact_center"]"#,
            r#"computed.last_channel == "contact_center""#,
            r#"computed.event_counts["Order Completed"] >= 5"#,
            "computed.total_events - 90 == 3",
            "computed.aggregates.orders_90d == 2",
            r#"computed.first_seen < computed.last_seen"#,
            r#"consent["email/marketing"] && !consent["sms/marketing"]"#,
            r#"identities.device_id == ["ios-1", "web-7"]"#,
            r#"identities.email.exists(e, e.endsWith("@example.com"))"#,
            r#"emotion.label == "upset" && emotion.score < -0.6"#,
            r#"now == timestamp("2026-01-01T00:00:00Z")"#,
        ] {
            assert!(matches(&p, condition), "{condition}");
        }
        let blank = Profile::default();
        for condition in [
            "has(traits.plan)",
            r#"emotion.label != "upset""#,
            "computed.last_seen < now",
            r#"consent["email/marketing"]"#,
            "has(identities.email)",
        ] {
            assert!(!matches(&blank, condition), "{condition}");
        }
        assert!(matches(&blank, r#"computed.last_channel == "unspecified""#));
    }

    #[test]
    fn realistic_segments() {
        let segments = [
            segment(
                "pro-high-ltv",
                r#"traits.plan == "pro" && computed.lifetime_value > 1000.0"#,
            ),
            segment("email-marketing", r#"consent["email/marketing"] == true"#),
            segment("sms-marketing", r#"consent["sms/marketing"] == true"#),
            segment("upset", r#"emotion.label == "upset""#),
            segment(
                "lapsed-30d",
                r#"now - computed.last_seen > duration("720h")"#,
            ),
            segment("enterprise", r#"traits.plan == "enterprise""#),
        ];
        let time_based: Vec<&str> = segments
            .iter()
            .filter(|s| s.time_based)
            .map(|s| s.segment_id.as_str())
            .collect();
        assert_eq!(time_based, ["upset", "lapsed-30d"], "emotion decays");
        let m = evaluate_memberships(&ana(), &segments, NOW_US, &EmotionRules::default());
        assert_eq!(
            m.members,
            ["email-marketing", "lapsed-30d", "pro-high-ltv", "upset"]
        );
        assert_eq!(m.entered, m.members);
        assert!(m.exited.is_empty());

        // Ten days earlier she had been active in the last 30 days.
        let m = evaluate_memberships(
            &ana(),
            &segments,
            NOW_US - 20 * DAY_US,
            &EmotionRules::default(),
        );
        assert!(!m.members.contains(&"lapsed-30d".to_owned()));
    }

    #[test]
    fn entering_and_exiting() {
        let segments = [
            segment("pro", r#"traits.plan == "pro""#),
            segment(
                "lapsed-30d",
                r#"now - computed.last_seen > duration("720h")"#,
            ),
            segment("upset", r#"emotion.label == "upset""#),
            segment("broken", "traits.plan > 3"),
        ];
        let mut p = ana();
        p.segments = vec!["broken".into(), "deleted-later".into(), "pro".into()];
        // She comes back today, calmer.
        p.computed.as_mut().unwrap().last_seen = at(0);
        let calm = p.emotion.as_mut().unwrap();
        (calm.score, calm.label) = (0.1, EmotionLabel::Neutral as i32);
        let m = evaluate_memberships(&p, &segments, NOW_US, &EmotionRules::default());
        assert_eq!(m.entered, Vec::<String>::new());
        assert_eq!(
            m.exited,
            ["broken"],
            "a failing condition counts as not matching"
        );
        assert_eq!(m.members, ["deleted-later", "pro"], "others are left alone");

        p.segments = m.members;
        // A furious call on the day she lapses.
        let upset = p.emotion.as_mut().unwrap();
        (upset.score, upset.label, upset.updated_at) = (-0.9, EmotionLabel::Upset as i32, at(-31));
        let m = evaluate_memberships(
            &p,
            &segments,
            NOW_US + 31 * DAY_US,
            &EmotionRules::default(),
        );
        assert_eq!(m.entered, ["lapsed-30d", "upset"]);
        assert!(m.exited.is_empty());
        assert_eq!(m.members, ["deleted-later", "lapsed-30d", "pro", "upset"]);

        let downgraded = {
            let mut p = p.clone();
            p.segments = m.members;
            let traits = p.traits.as_mut().unwrap();
            traits.fields.remove("plan");
            p
        };
        let m = evaluate_memberships(
            &downgraded,
            &segments,
            NOW_US + 31 * DAY_US,
            &EmotionRules::default(),
        );
        assert_eq!(
            m.exited,
            ["pro"],
            "a removed trait exits, it does not error"
        );
    }
}
