//! Profile service messages as JSON for the terminal and for scripts: camelCase keys as in
//! the protobuf JSON mapping, in the proto's field order (structs rather than
//! `serde_json::Value`, whose objects sort their keys), enums as the lower-case names
//! segment conditions use ("web", "upset"), times as RFC 3339, counts as numbers, and every
//! key present (`null` when unset) so a script can rely on the shape.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Map, Value};
use waymark_ingest::channel::channel_name;
use waymark_ingest::wire::{format_timestamp, type_name};
use waymark_profile::emotion::label_name;
use waymark_proto::common::v1::{Channel, EventType, Identity};
use waymark_proto::json::{struct_to_json, value_to_json};
use waymark_proto::profile::v1::{
    AggregateStatus, ComputedTraits, Consent, DoNotMerge, Emotion, EmotionLabel, EmotionSignal,
    Merge, Profile, Segment, TimelineEntry,
};

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProfileView<'a> {
    profile_id: &'a str,
    version: u64,
    identities: Vec<IdentityView<'a>>,
    traits: Map<String, Value>,
    trait_times: BTreeMap<&'a str, String>,
    computed: Option<ComputedView<'a>>,
    consents: Vec<ConsentView<'a>>,
    created_at: Option<String>,
    updated_at: Option<String>,
    emotion: Option<EmotionView<'a>>,
    segments: &'a [String],
}

impl<'a> From<&'a Profile> for ProfileView<'a> {
    fn from(p: &'a Profile) -> Self {
        Self {
            profile_id: &p.profile_id,
            version: p.version,
            identities: p.identities.iter().map(IdentityView::from).collect(),
            traits: p.traits.as_ref().map_or_else(Map::new, struct_to_json),
            trait_times: p
                .trait_times
                .iter()
                .map(|(k, t)| (k.as_str(), format_timestamp(t)))
                .collect(),
            computed: p.computed.as_ref().map(ComputedView::from),
            consents: p.consents.iter().map(ConsentView::from).collect(),
            created_at: time(p.created_at.as_ref()),
            updated_at: time(p.updated_at.as_ref()),
            emotion: p.emotion.as_ref().map(EmotionView::from),
            segments: &p.segments,
        }
    }
}

#[derive(Serialize)]
pub struct IdentityView<'a> {
    r#type: &'a str,
    value: &'a str,
}

impl<'a> From<&'a Identity> for IdentityView<'a> {
    fn from(i: &'a Identity) -> Self {
        Self {
            r#type: &i.r#type,
            value: &i.value,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ComputedView<'a> {
    first_seen: Option<String>,
    last_seen: Option<String>,
    event_counts: BTreeMap<&'a str, u64>,
    channels: Vec<Option<&'static str>>,
    last_channel: Option<&'static str>,
    lifetime_value: f64,
    total_events: u64,
    aggregates: BTreeMap<&'a str, Value>,
}

impl<'a> From<&'a ComputedTraits> for ComputedView<'a> {
    fn from(c: &'a ComputedTraits) -> Self {
        Self {
            first_seen: time(c.first_seen.as_ref()),
            last_seen: time(c.last_seen.as_ref()),
            event_counts: c
                .event_counts
                .iter()
                .map(|(k, n)| (k.as_str(), *n))
                .collect(),
            channels: c.channels.iter().map(|&ch| channel(ch)).collect(),
            last_channel: channel(c.last_channel),
            lifetime_value: c.lifetime_value,
            total_events: c.total_events,
            aggregates: c
                .aggregates
                .iter()
                .map(|(k, v)| (k.as_str(), value_to_json(v)))
                .collect(),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsentView<'a> {
    channel: &'a str,
    purpose: &'a str,
    granted: bool,
    updated_at: Option<String>,
    source: &'a str,
}

impl<'a> From<&'a Consent> for ConsentView<'a> {
    fn from(c: &'a Consent) -> Self {
        Self {
            channel: &c.channel,
            purpose: &c.purpose,
            granted: c.granted,
            updated_at: time(c.updated_at.as_ref()),
            source: &c.source,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EmotionView<'a> {
    score: f64,
    label: &'static str,
    updated_at: Option<String>,
    last_signal: Option<SignalView<'a>>,
}

impl<'a> From<&'a Emotion> for EmotionView<'a> {
    fn from(e: &'a Emotion) -> Self {
        Self {
            score: e.score,
            label: label_name(EmotionLabel::try_from(e.label).unwrap_or_default()),
            updated_at: time(e.updated_at.as_ref()),
            last_signal: e.last_signal.as_ref().map(SignalView::from),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SignalView<'a> {
    event_id: &'a str,
    event_name: &'a str,
    kind: &'a str,
    score: f64,
    timestamp: Option<String>,
}

impl<'a> From<&'a EmotionSignal> for SignalView<'a> {
    fn from(s: &'a EmotionSignal) -> Self {
        Self {
            event_id: &s.event_id,
            event_name: &s.event_name,
            kind: &s.kind,
            score: s.score,
            timestamp: time(s.timestamp.as_ref()),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TimelineEntryView<'a> {
    event_id: &'a str,
    r#type: &'static str,
    name: &'a str,
    channel: Option<&'static str>,
    properties: Map<String, Value>,
    timestamp: Option<String>,
    source_id: &'a str,
}

impl<'a> From<&'a TimelineEntry> for TimelineEntryView<'a> {
    fn from(e: &'a TimelineEntry) -> Self {
        Self {
            event_id: &e.event_id,
            r#type: type_name(EventType::try_from(e.r#type).unwrap_or_default()),
            name: &e.name,
            channel: channel(e.channel),
            properties: e.properties.as_ref().map_or_else(Map::new, struct_to_json),
            timestamp: time(e.timestamp.as_ref()),
            source_id: &e.source_id,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MergeView<'a> {
    merge_id: &'a str,
    survivor_id: &'a str,
    merged_id: &'a str,
    event_id: &'a str,
    evidence: Vec<IdentityView<'a>>,
    merged_at: Option<String>,
    unmerged_at: Option<String>,
}

impl<'a> From<&'a Merge> for MergeView<'a> {
    fn from(m: &'a Merge) -> Self {
        Self {
            merge_id: &m.merge_id,
            survivor_id: &m.survivor_id,
            merged_id: &m.merged_id,
            event_id: &m.event_id,
            evidence: m.evidence.iter().map(IdentityView::from).collect(),
            merged_at: time(m.merged_at.as_ref()),
            unmerged_at: time(m.unmerged_at.as_ref()),
        }
    }
}

/// A pair of profiles an unmerge keeps apart.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DoNotMergeView<'a> {
    merge_id: &'a str,
    survivor_id: &'a str,
    restored_id: &'a str,
    evidence: Vec<IdentityView<'a>>,
    unmerged_at: Option<String>,
}

impl<'a> From<&'a DoNotMerge> for DoNotMergeView<'a> {
    fn from(d: &'a DoNotMerge) -> Self {
        Self {
            merge_id: &d.merge_id,
            survivor_id: &d.survivor_id,
            restored_id: &d.restored_id,
            evidence: d.evidence.iter().map(IdentityView::from).collect(),
            unmerged_at: time(d.unmerged_at.as_ref()),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SegmentView<'a> {
    segment_id: &'a str,
    name: &'a str,
    description: &'a str,
    condition: &'a str,
    created_at: Option<String>,
    updated_at: Option<String>,
    member_count: u64,
    backfilled: bool,
}

impl<'a> From<&'a Segment> for SegmentView<'a> {
    fn from(s: &'a Segment) -> Self {
        Self {
            segment_id: &s.segment_id,
            name: &s.name,
            description: &s.description,
            condition: &s.condition,
            created_at: time(s.created_at.as_ref()),
            updated_at: time(s.updated_at.as_ref()),
            member_count: s.member_count,
            backfilled: s.backfilled,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AggregateStatusView<'a> {
    name: &'a str,
    definition: &'a str,
    removed: bool,
    backfilled: bool,
    profiles_backfilled: u64,
}

impl<'a> From<&'a AggregateStatus> for AggregateStatusView<'a> {
    fn from(a: &'a AggregateStatus) -> Self {
        Self {
            name: &a.name,
            definition: &a.definition,
            removed: a.removed,
            backfilled: a.backfilled,
            profiles_backfilled: a.profiles_backfilled,
        }
    }
}

/// Views of every item, for lists.
pub fn all<'a, T: 'a, V: From<&'a T>>(items: &'a [T]) -> Vec<V> {
    items.iter().map(V::from).collect()
}

fn time(t: Option<&prost_types::Timestamp>) -> Option<String> {
    t.map(format_timestamp)
}

/// A channel's name; `None` when unspecified (no event yet).
fn channel(ch: i32) -> Option<&'static str> {
    Some(channel_name(Channel::try_from(ch).unwrap_or_default())).filter(|n| !n.is_empty())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use prost_types::Timestamp;

    use super::*;

    #[test]
    fn a_profile_has_a_stable_camel_case_shape_in_proto_order() {
        let at = |seconds| Some(Timestamp { seconds, nanos: 0 });
        let mut traits = Map::new();
        traits.insert("plan".into(), "pro".into());
        let p = Profile {
            profile_id: "p-1".into(),
            version: 3,
            identities: vec![Identity {
                r#type: "email".into(),
                value: "ada@example.com".into(),
            }],
            traits: Some(waymark_proto::json::struct_from_json(traits)),
            trait_times: HashMap::from([("plan".to_owned(), at(0).unwrap())]),
            computed: Some(ComputedTraits {
                first_seen: at(0),
                last_seen: at(60),
                event_counts: HashMap::from([("Page Viewed".to_owned(), 2)]),
                channels: vec![Channel::Web as i32, Channel::ContactCenter as i32],
                last_channel: Channel::ContactCenter as i32,
                lifetime_value: 12.5,
                total_events: 2,
                aggregates: HashMap::new(),
            }),
            emotion: Some(Emotion {
                score: -0.75,
                label: EmotionLabel::Upset as i32,
                updated_at: at(60),
                last_signal: None,
            }),
            segments: vec!["upset".into()],
            ..Profile::default()
        };
        let text = serde_json::to_string(&ProfileView::from(&p)).unwrap();
        assert_eq!(
            text,
            concat!(
                r#"{"profileId":"p-1","version":3,"#,
                r#""identities":[{"type":"email","value":"ada@example.com"}],"#,
                r#""traits":{"plan":"pro"},"traitTimes":{"plan":"1970-01-01T00:00:00.000Z"},"#,
                r#""computed":{"firstSeen":"1970-01-01T00:00:00.000Z","#,
                r#""lastSeen":"1970-01-01T00:01:00.000Z","eventCounts":{"Page Viewed":2},"#,
                r#""channels":["web","contact_center"],"lastChannel":"contact_center","#,
                r#""lifetimeValue":12.5,"totalEvents":2,"aggregates":{}},"#,
                r#""consents":[],"createdAt":null,"updatedAt":null,"#,
                r#""emotion":{"score":-0.75,"label":"upset","#,
                r#""updatedAt":"1970-01-01T00:01:00.000Z","lastSignal":null},"#,
                r#""segments":["upset"]}"#
            )
        );
    }
}
