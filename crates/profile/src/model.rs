//! What an event does to a profile: traits by event time, computed traits, consent,
//! emotion; and how two profiles combine in a merge.

use prost_types::value::Kind;
use prost_types::{Struct, Timestamp, Value};
use waymark_proto::common::v1::{Channel, Event, EventType};
use waymark_proto::profile::v1::{ComputedTraits, Consent, Profile, TimelineEntry};

use waymark_kit::time::micros;

use crate::emotion::{self, EmotionChange, EmotionRules};

/// The name an event is counted and shown under.
pub fn event_name(event: &Event) -> String {
    match event.r#type() {
        EventType::Track => event.event.clone(),
        EventType::Page => "Page Viewed".into(),
        EventType::Screen => "Screen Viewed".into(),
        EventType::Identify => "Identify".into(),
        EventType::Group => "Group".into(),
        EventType::Alias => "Alias".into(),
        EventType::Unspecified => String::new(),
    }
}

/// Distinct trait keys one profile holds (counting removed keys, whose time is kept so an
/// older event cannot set them again): a key beyond it is ignored, the keys held keep
/// updating.
pub const MAX_TRAIT_KEYS: usize = 256;
/// Distinct event names `event_counts` counts by name: events of a name beyond it are
/// counted under [`OTHER_EVENTS`].
pub const MAX_EVENT_NAMES: usize = 256;
/// The name `event_counts` counts events under once [`MAX_EVENT_NAMES`] names are held.
pub const OTHER_EVENTS: &str = "(other)";
/// Distinct (channel, purpose) consent decisions one profile holds; see [`set_consent`]
/// for a decision beyond it.
pub const MAX_CONSENTS: usize = 64;

/// A trait key and its old and new values.
pub type TraitChange = (String, Option<Value>, Option<Value>);

/// Sets traits observed at `at`; a key last set by a later event keeps its value, and a
/// new key is ignored once the profile holds [`MAX_TRAIT_KEYS`]. Returns the keys that
/// changed.
pub fn set_traits(profile: &mut Profile, traits: &Struct, at: &Timestamp) -> Vec<TraitChange> {
    let mut changes = Vec::new();
    let current = profile.traits.get_or_insert_with(Struct::default);
    for (key, value) in &traits.fields {
        match profile.trait_times.get(key) {
            Some(t) if micros(t) > micros(at) => continue,
            None if profile.trait_times.len() >= MAX_TRAIT_KEYS => continue,
            _ => {}
        }
        profile.trait_times.insert(key.clone(), *at);
        let removing = matches!(value.kind, None | Some(Kind::NullValue(_)));
        let old = if removing {
            current.fields.remove(key)
        } else {
            current.fields.insert(key.clone(), value.clone())
        };
        let new = (!removing).then(|| value.clone());
        if old != new {
            changes.push((key.clone(), old, new));
        }
    }
    changes
}

/// A finite number property, also when sent as a numeric string: `"NaN"` or `"inf"`
/// would otherwise poison every sum they join (lifetime value, aggregates) for good.
pub(crate) fn number(properties: Option<&Struct>, key: &str) -> Option<f64> {
    let n = match properties?.fields.get(key)?.kind.as_ref()? {
        Kind::NumberValue(n) => *n,
        Kind::StringValue(s) => s.trim().parse().ok()?,
        _ => return None,
    };
    n.is_finite().then_some(n)
}

fn text(properties: Option<&Struct>, key: &str) -> Option<String> {
    match properties?.fields.get(key)?.kind.as_ref()? {
        Kind::StringValue(s) if !s.trim().is_empty() => Some(s.trim().to_lowercase()),
        _ => None,
    }
}

/// What applying an event changed that others may want to hear about.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Effects {
    /// Traits set or removed.
    pub trait_changes: Vec<TraitChange>,
    /// The emotion label moved.
    pub emotion_change: Option<EmotionChange>,
}

/// `source_id` prefix of the events that record a trusted service's change (UpdateTraits,
/// SetConsent), followed by the service's name. They are kept in the timeline so a profile
/// can be rebuilt from its events, but they are not customer activity: computed traits
/// and aggregates ignore them.
pub const TRUSTED_SOURCE_PREFIX: &str = "api:";

/// The calling service, for an event that records a trusted change.
pub fn trusted_source(event: &Event) -> Option<&str> {
    event.source_id.strip_prefix(TRUSTED_SOURCE_PREFIX)
}

/// Applies one event's effects (traits, computed traits, consent, emotion).
pub fn apply_event(profile: &mut Profile, event: &Event, emotion_rules: &EmotionRules) -> Effects {
    let at = event.timestamp.or(event.received_at).unwrap_or_default();
    let mut changes = Vec::new();
    if matches!(event.r#type(), EventType::Identify)
        && let Some(traits) = &event.traits
    {
        changes = set_traits(profile, traits, &at);
    }
    if event.r#type() == EventType::Group && !event.group_id.is_empty() {
        // The account the customer belongs to: its id, and its traits as one object (the
        // latest group call's), so conditions can read e.g. `traits.group.plan`.
        let mut fields = std::collections::BTreeMap::from([(
            "group_id".to_owned(),
            Value {
                kind: Some(Kind::StringValue(event.group_id.clone())),
            },
        )]);
        if let Some(traits) = event.traits.as_ref().filter(|t| !t.fields.is_empty()) {
            fields.insert(
                "group".to_owned(),
                Value {
                    kind: Some(Kind::StructValue(traits.clone())),
                },
            );
        }
        changes = set_traits(profile, &Struct { fields }, &at);
    }
    if trusted_source(event).is_none() {
        count_activity(profile, event, &at);
    }

    if event.r#type() == EventType::Track {
        let granted = match event.event.as_str() {
            "Consent Granted" | "Subscribed" => Some(true),
            "Consent Denied" | "Unsubscribed" | "Consent Revoked" => Some(false),
            _ => None,
        };
        if let Some(granted) = granted {
            let props = event.properties.as_ref();
            set_consent(
                profile,
                Consent {
                    channel: text(props, "channel").unwrap_or_else(|| "*".into()),
                    purpose: text(props, "purpose").unwrap_or_else(|| "marketing".into()),
                    granted,
                    updated_at: Some(at),
                    source: trusted_source(event).unwrap_or(&event.event_id).to_owned(),
                },
            );
        }
    }
    let emotion_change = emotion::signal(event)
        .and_then(|signal| emotion::observe(&mut profile.emotion, signal, emotion_rules));
    Effects {
        trait_changes: changes,
        emotion_change,
    }
}

/// Computed traits: first and last seen, counts, channels, lifetime value.
fn count_activity(profile: &mut Profile, event: &Event, at: &Timestamp) {
    let computed = profile.computed.get_or_insert_with(ComputedTraits::default);
    if computed.first_seen.is_none_or(|t| micros(&t) > micros(at)) {
        computed.first_seen = Some(*at);
    }
    let latest = computed.last_seen.is_none_or(|t| micros(&t) <= micros(at));
    if latest {
        computed.last_seen = Some(*at);
        computed.last_channel = event.channel;
    }
    count_name(&mut computed.event_counts, event_name(event), 1);
    if !computed.channels.contains(&event.channel) && event.channel != Channel::Unspecified as i32 {
        computed.channels.push(event.channel);
    }
    computed.total_events += 1;
    if event.r#type() == EventType::Track && event.event == "Order Completed" {
        let props = event.properties.as_ref();
        computed.lifetime_value += number(props, "revenue")
            .or_else(|| number(props, "total"))
            .unwrap_or(0.0);
    }
}

/// Counts `n` events of `name`, under [`OTHER_EVENTS`] once [`MAX_EVENT_NAMES`] other
/// names are counted.
fn count_name(counts: &mut std::collections::HashMap<String, u64>, name: String, n: u64) {
    let held = counts.len() - usize::from(counts.contains_key(OTHER_EVENTS));
    let name = if counts.contains_key(&name) || held < MAX_EVENT_NAMES {
        name
    } else {
        OTHER_EVENTS.to_owned()
    };
    *counts.entry(name).or_default() += n;
}

/// The timeline name of an event: the track event, the page or screen name, or nothing.
pub fn timeline_name(event: &Event) -> &str {
    match event.r#type() {
        EventType::Track => &event.event,
        EventType::Page | EventType::Screen => &event.name,
        _ => "",
    }
}

/// Records a consent decision unless a later one for the same channel and purpose exists.
///
/// A profile holds at most [`MAX_CONSENTS`] decisions. Beyond that, a decision for a new
/// channel and purpose takes the place of the oldest grant, and is not stored when every
/// decision held is a denial. An absent decision reads as not granted (a condition on it
/// is false), so the cap can only ever withdraw consent, never give it.
pub fn set_consent(profile: &mut Profile, consent: Consent) {
    let at = consent.updated_at.as_ref().map_or(0, micros);
    let updated = |c: &Consent| c.updated_at.as_ref().map_or(0, micros);
    let held = profile.consents.len();
    match profile
        .consents
        .iter_mut()
        .find(|c| c.channel == consent.channel && c.purpose == consent.purpose)
    {
        Some(existing) if updated(existing) > at => {}
        Some(existing) => *existing = consent,
        None if held < MAX_CONSENTS => profile.consents.push(consent),
        None => {
            if let Some(oldest_grant) = profile
                .consents
                .iter_mut()
                .filter(|c| c.granted)
                .min_by_key(|c| updated(c))
            {
                *oldest_grant = consent;
            }
        }
    }
}

/// Folds `other` into `survivor`: identities, traits (latest per key), computed traits,
/// consent and emotion (the newer state). The timeline moves in storage.
pub fn merge_into(survivor: &mut Profile, other: &Profile) {
    for identity in &other.identities {
        if !survivor.identities.contains(identity) {
            survivor.identities.push(identity.clone());
        }
    }
    if let Some(traits) = &other.traits {
        for (key, value) in &traits.fields {
            let at = other.trait_times.get(key).copied().unwrap_or_default();
            let single = Struct {
                fields: [(key.clone(), value.clone())].into(),
            };
            set_traits(survivor, &single, &at);
        }
    }
    if let Some(theirs) = &other.computed {
        let ours = survivor
            .computed
            .get_or_insert_with(ComputedTraits::default);
        if let Some(first) = theirs.first_seen
            && ours.first_seen.is_none_or(|t| micros(&t) > micros(&first))
        {
            ours.first_seen = Some(first);
        }
        if let Some(last) = theirs.last_seen
            && ours.last_seen.is_none_or(|t| micros(&t) < micros(&last))
        {
            ours.last_seen = Some(last);
            ours.last_channel = theirs.last_channel;
        }
        for (name, n) in &theirs.event_counts {
            count_name(&mut ours.event_counts, name.clone(), *n);
        }
        for c in &theirs.channels {
            if !ours.channels.contains(c) {
                ours.channels.push(*c);
            }
        }
        ours.lifetime_value += theirs.lifetime_value;
        ours.total_events += theirs.total_events;
    }
    for consent in &other.consents {
        set_consent(survivor, consent.clone());
    }
    if let Some(theirs) = &other.emotion {
        emotion::merge(&mut survivor.emotion, theirs);
    }
}

/// The profile's user id, if it has one (resolution keeps at most one).
pub fn user_id_of(profile: &Profile) -> Option<&str> {
    profile
        .identities
        .iter()
        .find(|i| i.r#type == "user_id")
        .map(|i| i.value.as_str())
}

/// Whether `event` already names `profile_id` and the profile's user id, as [`address`]
/// would make it.
pub fn is_addressed(event: &Event, profile_id: &str, profile: &Profile) -> bool {
    event.profile_id == profile_id && user_id_of(profile).is_none_or(|u| event.user_id == u)
}

/// Addresses an event the service emits about `profile`: downstream services find the
/// customer by its profile id and, when the profile has one, its user id, whatever the
/// event was sent with.
pub fn address(event: &mut Event, profile_id: &str, profile: &Profile) {
    if let Some(user_id) = user_id_of(profile) {
        user_id.clone_into(&mut event.user_id);
    }
    profile_id.clone_into(&mut event.profile_id);
}

/// The timeline entry of an event.
pub fn timeline_entry(event: &Event) -> TimelineEntry {
    let name = timeline_name(event).to_owned();
    let properties = match event.r#type() {
        EventType::Identify | EventType::Group => event.traits.clone(),
        _ => event.properties.clone(),
    };
    TimelineEntry {
        event_id: event.event_id.clone(),
        r#type: event.r#type,
        name,
        channel: event.channel,
        properties,
        timestamp: event.timestamp.or(event.received_at),
        source_id: event.source_id.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use waymark_proto::json::struct_from_json;

    fn traits(json: serde_json::Value) -> Struct {
        let serde_json::Value::Object(m) = json else {
            unreachable!()
        };
        struct_from_json(m)
    }

    fn ts(s: i64) -> Timestamp {
        Timestamp {
            seconds: s,
            nanos: 0,
        }
    }

    #[test]
    fn a_late_older_event_never_overwrites_a_newer_trait() {
        let mut p = Profile::default();
        set_traits(
            &mut p,
            &traits(serde_json::json!({"plan": "pro"})),
            &ts(200),
        );
        let changes = set_traits(
            &mut p,
            &traits(serde_json::json!({"plan": "free", "city": "Oslo"})),
            &ts(100),
        );
        let t = &p.traits.as_ref().unwrap().fields;
        assert_eq!(t["plan"].kind, Some(Kind::StringValue("pro".into())));
        assert_eq!(t["city"].kind, Some(Kind::StringValue("Oslo".into())));
        assert_eq!(changes.len(), 1, "only city changed");
    }

    #[test]
    fn computed_traits_follow_events() {
        let mut p = Profile::default();
        let mut order = Event {
            event: "Order Completed".into(),
            timestamp: Some(ts(50)),
            properties: Some(traits(serde_json::json!({"revenue": 30.5}))),
            ..Event::default()
        };
        order.set_type(EventType::Track);
        order.set_channel(Channel::Web);
        let mut call = Event {
            event: "Called".into(),
            timestamp: Some(ts(10)),
            ..Event::default()
        };
        call.set_type(EventType::Track);
        call.set_channel(Channel::Phone);
        apply_event(&mut p, &order, &EmotionRules::default());
        apply_event(&mut p, &order, &EmotionRules::default());
        apply_event(&mut p, &call, &EmotionRules::default());
        for junk in ["NaN", "inf", "-infinity"] {
            let mut bogus = order.clone();
            bogus.properties = Some(traits(serde_json::json!({"revenue": junk})));
            apply_event(&mut p, &bogus, &EmotionRules::default());
        }
        let c = p.computed.unwrap();
        assert_eq!(c.lifetime_value, 61.0, "non-finite amounts are ignored");
        assert_eq!(c.event_counts["Order Completed"], 5);
        assert_eq!(c.first_seen, Some(ts(10)));
        assert_eq!(c.last_seen, Some(ts(50)));
        assert_eq!(
            c.last_channel,
            Channel::Web as i32,
            "the late, older call does not become the last channel"
        );
        assert_eq!(c.total_events, 6);
    }

    #[test]
    fn group_calls_set_the_account_and_its_traits() {
        let mut p = Profile::default();
        let mut group = Event {
            group_id: "acme".into(),
            timestamp: Some(ts(10)),
            traits: Some(traits(
                serde_json::json!({"name": "Acme", "plan": "enterprise"}),
            )),
            ..Event::default()
        };
        group.set_type(EventType::Group);
        let effects = apply_event(&mut p, &group, &EmotionRules::default());
        let t = &p.traits.as_ref().unwrap().fields;
        assert_eq!(t["group_id"].kind, Some(Kind::StringValue("acme".into())));
        let Some(Kind::StructValue(account)) = &t["group"].kind else {
            panic!("group traits as an object: {t:?}")
        };
        assert_eq!(
            account.fields["plan"].kind,
            Some(Kind::StringValue("enterprise".into()))
        );
        assert_eq!(effects.trait_changes.len(), 2);
    }

    #[test]
    fn unsubscribe_events_deny_consent_and_later_decisions_win() {
        let mut p = Profile::default();
        let mut unsub = Event {
            event: "Unsubscribed".into(),
            timestamp: Some(ts(100)),
            properties: Some(traits(serde_json::json!({"channel": "Email"}))),
            ..Event::default()
        };
        unsub.set_type(EventType::Track);
        apply_event(&mut p, &unsub, &EmotionRules::default());
        set_consent(
            &mut p,
            Consent {
                channel: "email".into(),
                purpose: "marketing".into(),
                granted: true,
                updated_at: Some(ts(50)),
                source: "api".into(),
            },
        );
        assert_eq!(p.consents.len(), 1);
        assert!(
            !p.consents[0].granted,
            "an older grant does not override a newer denial"
        );
    }

    fn track(name: &str, properties: serde_json::Value, at: i64) -> Event {
        let mut e = Event {
            event_id: format!("{name}-{at}"),
            event: name.into(),
            timestamp: Some(ts(at)),
            properties: Some(traits(properties)),
            ..Event::default()
        };
        e.set_type(EventType::Track);
        e
    }

    #[test]
    fn signal_events_move_the_emotion_and_report_label_changes() {
        use waymark_proto::profile::v1::EmotionLabel;
        let rules = EmotionRules::default();
        let mut p = Profile::default();
        let csat = track("CSAT Submitted", serde_json::json!({"csat": 5}), 100);
        let change = apply_event(&mut p, &csat, &rules).emotion_change.unwrap();
        assert_eq!(
            (change.previous, change.label),
            (EmotionLabel::Unspecified, EmotionLabel::Delighted)
        );
        let order = track("Order Completed", serde_json::json!({"revenue": 5}), 200);
        assert_eq!(apply_event(&mut p, &order, &rules), Effects::default());
        let complaint = track(
            "Complaint Filed",
            serde_json::json!({"comment": "Absolutely furious, the worst support ever!!"}),
            300,
        );
        let change = apply_event(&mut p, &complaint, &rules)
            .emotion_change
            .unwrap();
        assert_eq!(change.label, EmotionLabel::Upset);
        assert_eq!(change.signal.unwrap().event_id, complaint.event_id);
        let emotion = p.emotion.as_ref().unwrap();
        assert_eq!(emotion.label(), EmotionLabel::Upset);
        assert_eq!(emotion.last_signal.as_ref().unwrap().kind, "sentiment");
    }

    #[test]
    fn a_merge_keeps_the_newer_emotion() {
        let rules = EmotionRules::default();
        let (mut survivor, mut other) = (Profile::default(), Profile::default());
        let happy = track("NPS Submitted", serde_json::json!({"nps": 10}), 100);
        let angry = track("NPS Submitted", serde_json::json!({"nps": 0}), 200);
        apply_event(&mut survivor, &happy, &rules);
        apply_event(&mut other, &angry, &rules);
        merge_into(&mut survivor, &other);
        assert_eq!(survivor.emotion, other.emotion);
    }
}
