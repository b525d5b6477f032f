//! Identity resolution over a batch, in memory: the store loads every profile the batch's
//! identifiers point to, this module decides (create, add, merge), and the store writes
//! the result in one transaction.

use std::collections::{HashMap, HashSet};

use prost_types::value::Kind;
use prost_types::{Struct, Value};
use waymark_kit::time::{from_micros, micros};
use waymark_proto::common::v1::{Event, EventType, Identity};
use waymark_proto::profile::v1::{ComputedTraits, Profile};

use crate::aggregate::{self, AggregateSpec, AggregateState};
use crate::emotion::{EmotionChange, EmotionRules, label_name, next_change_at};
use crate::identity::{Ident, IdentityRules};
use crate::model::{TraitChange, apply_event, merge_into, trusted_source};

/// Everything configurable about what events do to profiles.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    pub identity: IdentityRules,
    pub emotion: EmotionRules,
    /// The configured aggregates (`profile_aggregates`), validated.
    pub aggregates: Vec<AggregateSpec>,
}

/// A profile as loaded or created in this batch.
#[derive(Debug, Clone)]
pub struct Record {
    pub profile: Profile,
    pub created_us: i64,
    /// Set when merged into another profile.
    pub merged_into: Option<String>,
    /// What the configured aggregates remember; stored beside the profile, not cached.
    pub aggregates: AggregateState,
}

impl Record {
    /// When decay next moves its emotion label under `rules`: stored with the profile so
    /// the settling pass finds it. None when nothing will, and for a merged-away profile.
    pub fn emotion_due(&self, rules: &EmotionRules) -> Option<i64> {
        match (&self.merged_into, &self.profile.emotion) {
            (None, Some(emotion)) => next_change_at(emotion, rules),
            _ => None,
        }
    }

    /// Observes an event for the configured aggregates and refreshes their values.
    pub fn observe_aggregates(&mut self, specs: &[AggregateSpec], event: &Event, now_us: i64) {
        if specs.is_empty() || trusted_source(event).is_some() {
            return;
        }
        aggregate::observe(&mut self.aggregates, specs, event);
        self.refresh_aggregates(specs, now_us);
    }

    /// Recomputes the aggregate values as of `now_us` (windows slide with time); true
    /// when they changed.
    pub fn refresh_aggregates(&mut self, specs: &[AggregateSpec], now_us: i64) -> bool {
        aggregate::prune(&mut self.aggregates, specs, now_us);
        let values: std::collections::HashMap<String, Value> =
            aggregate::values(&self.aggregates, specs, now_us);
        let computed = self
            .profile
            .computed
            .get_or_insert_with(ComputedTraits::default);
        if computed.aggregates == values {
            return false;
        }
        computed.aggregates = values;
        true
    }

    /// Replaces what the replayed aggregates remember with what `replay` computed from the
    /// profile's whole history, drops the state of aggregates no longer in `specs`, and
    /// recomputes the values as of `now_us`.
    pub fn install_replay(
        &mut self,
        replay: AggregateReplay,
        specs: &[AggregateSpec],
        now_us: i64,
    ) -> Installed {
        let before = self.aggregates.clone();
        for spec in &replay.specs {
            self.aggregates.aggregates.remove(&spec.name);
        }
        self.aggregates.aggregates.extend(replay.state.aggregates);
        let values = self.refresh_aggregates(specs, now_us);
        Installed {
            state: values || self.aggregates != before,
            values,
        }
    }
}

/// What [`Record::install_replay`] changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Installed {
    /// Something stored changed: the profile needs writing.
    pub state: bool,
    /// `computed.aggregates` changed: segments may see the profile differently.
    pub values: bool,
}

/// Some aggregates computed afresh from a profile's stored events, oldest first, as
/// [`Record::observe_aggregates`] would have computed them had they been configured all
/// along (a trusted service's changes do not count).
#[derive(Debug, Clone)]
pub struct AggregateReplay {
    specs: Vec<AggregateSpec>,
    state: AggregateState,
}

impl AggregateReplay {
    /// A replay of `specs`, before any event.
    pub fn new(specs: Vec<AggregateSpec>) -> Self {
        Self {
            specs,
            state: AggregateState::default(),
        }
    }

    /// Folds in the next stored event.
    pub fn observe(&mut self, event: &Event) {
        if trusted_source(event).is_none() {
            aggregate::observe(&mut self.state, &self.specs, event);
        }
    }
}

/// One merge, for the audit log.
#[derive(Debug, Clone)]
pub struct MergeRecord {
    pub merge_id: String,
    pub survivor_id: String,
    pub merged_id: String,
    pub event_id: String,
    pub evidence: Vec<Identity>,
    pub at_us: i64,
}

/// An event whose identifiers pointed at profiles kept apart: it went to `profile_id`,
/// and the identifiers the others own (`left_out`) stayed with them.
#[derive(Debug, Clone)]
pub struct KeptApart {
    pub event_id: String,
    pub profile_id: String,
    pub apart: Vec<String>,
    pub left_out: Vec<Ident>,
}

/// Everything a batch changed.
#[derive(Debug, Default)]
pub struct WorkingSet {
    pub records: HashMap<String, Record>,
    pub index: HashMap<Ident, String>,
    pub dirty: HashSet<String>,
    pub dirty_identities: HashMap<Ident, String>,
    /// Identifiers profiles gave up to stay within the limit of a type that keeps the most
    /// recent ones: they stop resolving.
    pub evicted: HashSet<Ident>,
    pub merges: Vec<MergeRecord>,
    /// For each live profile held that an Unmerge keeps apart from others, those others
    /// (a pair is listed on the side of each profile held; either side tells).
    pub apart: HashMap<String, HashSet<String>>,
    /// (merged, survivor) of the merges whose merged profile was kept apart from others:
    /// its pairs passed to the survivor.
    pub apart_moved: Vec<(String, String)>,
    /// Events whose identifiers pointed at profiles kept apart.
    pub kept_apart: Vec<KeptApart>,
    /// (event, profile id at the time) of each applied event, in order.
    pub applied: Vec<(Event, String)>,
    /// Synthetic events (Profile Merged, Trait Changed, Emotion Changed, Segment Entered
    /// and Exited), each with the profile it happened to; sent with its live profile.
    pub synthetic: Vec<(Event, String)>,
    /// `Segment Exited` of profiles merged away in the batch: about the merged profile
    /// itself, so they keep its id.
    pub merged_away_exits: Vec<Event>,
    /// Events no identifier could attribute (every value blocked), kept so the batch can
    /// be resolved again.
    pub unattributed: Vec<Event>,
}

impl WorkingSet {
    /// Starts from loaded profiles (their identities form the index).
    pub fn new(records: Vec<Record>) -> Self {
        let mut set = WorkingSet::default();
        set.add(records);
        set
    }

    /// Adds loaded profiles; their identities join the index.
    pub fn add(&mut self, records: impl IntoIterator<Item = Record>) {
        for record in records {
            for identity in &record.profile.identities {
                self.index.insert(
                    (identity.r#type.clone(), identity.value.clone()),
                    record.profile.profile_id.clone(),
                );
            }
            self.records
                .insert(record.profile.profile_id.clone(), record);
        }
    }

    /// Adds loaded pairs of live profiles an Unmerge keeps apart, on the side of each
    /// profile held (add the profiles first).
    pub fn keep_apart(&mut self, pairs: impl IntoIterator<Item = (String, String)>) {
        for (a, b) in pairs {
            for (side, other) in [(&a, &b), (&b, &a)] {
                if self.records.contains_key(side) {
                    self.apart
                        .entry(side.clone())
                        .or_default()
                        .insert(other.clone());
                }
            }
        }
    }

    /// Forgets a profile (no longer held) and the pairs listed on its side.
    pub fn forget(&mut self, id: &str) -> Option<Record> {
        self.apart.remove(id);
        self.records.remove(id)
    }

    /// Whether an Unmerge keeps the live profiles `a` and `b` apart.
    fn kept_apart_pair(&self, a: &str, b: &str) -> bool {
        let listed = |x: &str, y: &str| self.apart.get(x).is_some_and(|others| others.contains(y));
        listed(a, b) || listed(b, a)
    }

    /// Those of `idents` no profile in the set holds.
    pub fn unknown(&self, idents: &[Ident]) -> Vec<Ident> {
        idents
            .iter()
            .filter(|ident| !self.index.contains_key(*ident))
            .cloned()
            .collect()
    }

    /// Moves out what the batch changed (everything but the profiles, their index and
    /// their pairs kept apart), leaving the set ready for the next batch.
    pub fn take_batch(&mut self) -> WorkingSet {
        WorkingSet {
            records: HashMap::new(),
            index: HashMap::new(),
            dirty: std::mem::take(&mut self.dirty),
            dirty_identities: std::mem::take(&mut self.dirty_identities),
            evicted: std::mem::take(&mut self.evicted),
            merges: std::mem::take(&mut self.merges),
            apart: HashMap::new(),
            apart_moved: std::mem::take(&mut self.apart_moved),
            kept_apart: std::mem::take(&mut self.kept_apart),
            applied: std::mem::take(&mut self.applied),
            synthetic: std::mem::take(&mut self.synthetic),
            merged_away_exits: std::mem::take(&mut self.merged_away_exits),
            unattributed: std::mem::take(&mut self.unattributed),
        }
    }

    /// Follows merges to the live profile.
    pub fn live<'a>(&'a self, id: &'a str) -> &'a str {
        let mut current = id;
        for _ in 0..64 {
            match self
                .records
                .get(current)
                .and_then(|r| r.merged_into.as_deref())
            {
                Some(next) => current = next,
                None => break,
            }
        }
        current
    }

    /// Resolves `event`, carrying `ids` (its identifiers as [`IdentityRules::extract`]
    /// gives them), to a profile (creating or merging as needed) and applies it.
    pub fn apply(&mut self, rules: &Rules, mut event: Event, mut ids: Vec<Ident>, now_us: i64) {
        if ids.is_empty() {
            self.unattributed.push(event);
            return;
        }
        let mut kept_apart: Option<KeptApart> = None;
        let profile_id = loop {
            let matched = self.matching(&ids);
            if let Some(kept) = self.split_apart(&event, &ids, &matched) {
                // Leave out the identifiers of the profiles kept apart and resolve again.
                ids.retain(|ident| !kept.left_out.contains(ident));
                kept_apart = Some(kept);
                continue;
            }
            if self.fits(&rules.identity, &ids, &matched) {
                let id = self.resolve(&ids, matched, &event, &rules.aggregates, now_us);
                self.keep_recent(&rules.identity, &id, &ids);
                break id;
            }
            // Leave out the event's lowest-priority identifier and try again.
            ids.pop();
            if ids.is_empty() {
                self.unattributed.push(event);
                return;
            }
        };
        let record = self
            .records
            .get_mut(&profile_id)
            .expect("resolved profile is loaded");
        let effects = apply_event(&mut record.profile, &event, &rules.emotion);
        record.observe_aggregates(&rules.aggregates, &event, now_us);
        record.profile.version += 1;
        record.profile.updated_at = Some(from_micros(now_us));
        self.dirty.insert(profile_id.clone());
        if !effects.trait_changes.is_empty() {
            self.synthetic.push((
                trait_changed_event(&event, &effects.trait_changes),
                profile_id.clone(),
            ));
        }
        if let Some(change) = &effects.emotion_change {
            self.synthetic
                .push((emotion_changed_event(&event, change), profile_id.clone()));
        }
        if let Some(mut kept) = kept_apart {
            kept.profile_id = profile_id.clone();
            self.kept_apart.push(kept);
        }
        event.profile_id = profile_id.clone();
        self.applied.push((event, profile_id));
    }

    /// Distinct live profiles owning any of `ids`, oldest first, with the identifiers that
    /// matched each.
    fn matching(&self, ids: &[Ident]) -> Vec<(String, Vec<Ident>)> {
        let mut found: Vec<(String, Vec<Ident>)> = Vec::new();
        for ident in ids {
            if let Some(owner) = self.index.get(ident) {
                let owner = self.live(owner);
                match found.iter_mut().find(|(id, _)| id == owner) {
                    Some((_, evidence)) => evidence.push(ident.clone()),
                    None => found.push((owner.to_owned(), vec![ident.clone()])),
                }
            }
        }
        found.sort_by_key(|(id, _)| {
            (
                self.records.get(id).map_or(i64::MAX, |r| r.created_us),
                id.clone(),
            )
        });
        found
    }

    /// When `matched` holds profiles an Unmerge keeps apart: the profile owning the
    /// event's highest-priority identifier (`ids` come highest first) stays, then each
    /// other one in the order of the best identifier it owns, unless it is kept apart from
    /// one that stays. Returns the profiles that do not stay and the identifiers they own,
    /// to leave out (the event then goes to those that stay, merged as usual).
    fn split_apart(
        &self,
        event: &Event,
        ids: &[Ident],
        matched: &[(String, Vec<Ident>)],
    ) -> Option<KeptApart> {
        if self.apart.is_empty() || matched.len() < 2 {
            return None;
        }
        // Each profile's evidence lists its identifiers in the order of `ids`.
        let best = |evidence: &[Ident]| {
            evidence
                .first()
                .and_then(|first| ids.iter().position(|i| i == first))
        };
        let mut by_priority: Vec<&(String, Vec<Ident>)> = matched.iter().collect();
        by_priority.sort_by_key(|(_, evidence)| best(evidence));
        let mut staying: Vec<&str> = Vec::new();
        let mut apart = Vec::new();
        let mut left_out = Vec::new();
        for (id, evidence) in by_priority {
            if staying.iter().any(|s| self.kept_apart_pair(s, id)) {
                apart.push(id.clone());
                left_out.extend(evidence.iter().cloned());
            } else {
                staying.push(id);
            }
        }
        if apart.is_empty() {
            return None;
        }
        Some(KeptApart {
            event_id: event.event_id.clone(),
            // Known once the event is resolved.
            profile_id: String::new(),
            apart,
            left_out,
        })
    }

    /// Whether the profiles and the event's identifiers together stay within every limit
    /// that refuses (a type that keeps the most recent identifiers gives up old ones
    /// instead: [`Self::keep_recent`]).
    fn fits(&self, rules: &IdentityRules, ids: &[Ident], matched: &[(String, Vec<Ident>)]) -> bool {
        let mut all: HashSet<(&str, &str)> =
            ids.iter().map(|(t, v)| (t.as_str(), v.as_str())).collect();
        for (id, _) in matched {
            if let Some(r) = self.records.get(id) {
                all.extend(
                    r.profile
                        .identities
                        .iter()
                        .map(|i| (i.r#type.as_str(), i.value.as_str())),
                );
            }
        }
        let mut per_type: HashMap<&str, usize> = HashMap::new();
        for (t, _) in all {
            *per_type.entry(t).or_default() += 1;
        }
        per_type
            .into_iter()
            .all(|(t, n)| n <= rules.limit(t) || rules.keeps_recent(t))
    }

    /// Keeps `profile_id` within the limits of the types that keep the most recent
    /// identifiers: the event's own identifiers (`ids`) of those types become the most
    /// recently used, and the least recently used beyond the limit are given up. A given-up
    /// identifier no longer resolves to the profile; an event carrying it alone later
    /// starts a profile of its own.
    fn keep_recent(&mut self, rules: &IdentityRules, profile_id: &str, ids: &[Ident]) {
        let record = self
            .records
            .get_mut(profile_id)
            .expect("resolved profile is loaded");
        let identities = &mut record.profile.identities;
        for (t, v) in ids.iter().filter(|(t, _)| rules.keeps_recent(t)) {
            if let Some(at) = identities
                .iter()
                .position(|i| &i.r#type == t && &i.value == v)
                && at + 1 < identities.len()
            {
                let used = identities.remove(at);
                identities.push(used);
            }
        }
        let mut given_up: Vec<Ident> = Vec::new();
        for t in crate::identity::RECENT_TYPES {
            if !rules.keeps_recent(t) {
                continue;
            }
            let held = identities.iter().filter(|i| i.r#type == t).count();
            let mut excess = held.saturating_sub(rules.limit(t));
            if excess == 0 {
                continue;
            }
            // Oldest first: identifiers are appended when added or used.
            identities.retain(|i| {
                if excess > 0 && i.r#type == t {
                    excess -= 1;
                    given_up.push((i.r#type.clone(), i.value.clone()));
                    return false;
                }
                true
            });
        }
        for ident in given_up {
            self.index.remove(&ident);
            self.dirty_identities.remove(&ident);
            self.evicted.insert(ident);
        }
    }

    fn resolve(
        &mut self,
        ids: &[Ident],
        matched: Vec<(String, Vec<Ident>)>,
        event: &Event,
        aggregates: &[AggregateSpec],
        now_us: i64,
    ) -> String {
        let survivor = match matched.first() {
            Some((id, _)) => id.clone(),
            None => {
                let id = uuid::Uuid::now_v7().to_string();
                let profile = Profile {
                    profile_id: id.clone(),
                    created_at: Some(from_micros(now_us)),
                    ..Profile::default()
                };
                self.records.insert(
                    id.clone(),
                    Record {
                        profile,
                        created_us: now_us,
                        merged_into: None,
                        aggregates: AggregateState::default(),
                    },
                );
                id
            }
        };
        for (other, evidence) in matched.iter().skip(1) {
            // What matched the survivor and what matched the merged profile.
            let evidence = matched[0].1.iter().chain(evidence).cloned().collect();
            self.merge(&survivor, other, event, evidence, aggregates, now_us);
        }
        for ident in ids {
            if !self.index.contains_key(ident) {
                self.evicted.remove(ident);
                self.index.insert(ident.clone(), survivor.clone());
                self.dirty_identities
                    .insert(ident.clone(), survivor.clone());
                let record = self.records.get_mut(&survivor).expect("survivor loaded");
                record.profile.identities.push(Identity {
                    r#type: ident.0.clone(),
                    value: ident.1.clone(),
                });
            }
        }
        survivor
    }

    fn merge(
        &mut self,
        survivor: &str,
        other: &str,
        event: &Event,
        evidence: Vec<Ident>,
        aggregates: &[AggregateSpec],
        now_us: i64,
    ) {
        let Some(mut merged) = self.records.remove(other) else {
            return;
        };
        // The survivor now holds the merged profile's pairs kept apart. Every side listing
        // it is looked at, not only those it lists: a profile read from the database while
        // a batch merging its partner away was still writing lists the partner's old id,
        // and only the partner's survivor, held here, lists it.
        if !self.apart.is_empty() {
            for others in self.apart.values_mut() {
                if others.remove(other) {
                    others.insert(survivor.to_owned());
                }
            }
            if let Some(others) = self.apart.remove(other) {
                self.apart
                    .entry(survivor.to_owned())
                    .or_default()
                    .extend(others);
                self.apart_moved
                    .push((other.to_owned(), survivor.to_owned()));
            }
        }
        for identity in &merged.profile.identities {
            let ident = (identity.r#type.clone(), identity.value.clone());
            self.index.insert(ident.clone(), survivor.to_owned());
            self.dirty_identities.insert(ident, survivor.to_owned());
        }
        let record = self.records.get_mut(survivor).expect("survivor loaded");
        merge_into(&mut record.profile, &merged.profile);
        if !aggregates.is_empty() {
            aggregate::merge(&mut record.aggregates, &merged.aggregates, aggregates);
            record.refresh_aggregates(aggregates, now_us);
        }
        // The older first_seen of both is the profile's creation as far as anyone can tell.
        if merged.created_us < record.created_us {
            record.created_us = merged.created_us;
        }
        merged.merged_into = Some(survivor.to_owned());
        merged.profile.version += 1;
        self.records.insert(other.to_owned(), merged);
        self.dirty.insert(other.to_owned());
        self.dirty.insert(survivor.to_owned());
        let to_identity = |(t, v): &Ident| Identity {
            r#type: t.clone(),
            value: v.clone(),
        };
        let evidence: Vec<Identity> = evidence.iter().map(to_identity).collect();
        let merge = MergeRecord {
            merge_id: uuid::Uuid::now_v7().to_string(),
            survivor_id: survivor.to_owned(),
            merged_id: other.to_owned(),
            event_id: event.event_id.clone(),
            evidence,
            at_us: now_us,
        };
        self.synthetic
            .push((profile_merged(event, &merge), survivor.to_owned()));
        self.merges.push(merge);
    }
}

fn string(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_owned())),
    }
}

fn synthetic(cause: &Event, name: &str, properties: Struct) -> Event {
    let mut event = Event {
        event_id: uuid::Uuid::now_v7().to_string(),
        message_id: format!("{}:{}", cause.event_id, name),
        event: name.to_owned(),
        user_id: cause.user_id.clone(),
        anonymous_id: cause.anonymous_id.clone(),
        properties: Some(properties),
        timestamp: cause.timestamp.or(cause.received_at),
        received_at: cause.received_at,
        channel: cause.channel,
        source_id: "profile".into(),
        ..Event::default()
    };
    event.set_type(EventType::Track);
    event
}

fn profile_merged(cause: &Event, merge: &MergeRecord) -> Event {
    let properties = Struct {
        fields: [
            ("merged_profile_id".to_owned(), string(&merge.merged_id)),
            ("survivor_profile_id".to_owned(), string(&merge.survivor_id)),
            ("merge_id".to_owned(), string(&merge.merge_id)),
        ]
        .into(),
    };
    synthetic(cause, "Profile Merged", properties)
}

/// A `Trait Changed` event describing `changes`, caused by `cause`.
pub fn trait_changed_event(cause: &Event, changes: &[TraitChange]) -> Event {
    let null = || Value {
        kind: Some(Kind::NullValue(0)),
    };
    let changed = changes
        .iter()
        .map(|(key, old, new)| {
            let entry = Struct {
                fields: [
                    ("old".to_owned(), old.clone().unwrap_or_else(null)),
                    ("new".to_owned(), new.clone().unwrap_or_else(null)),
                ]
                .into(),
            };
            (
                key.clone(),
                Value {
                    kind: Some(Kind::StructValue(entry)),
                },
            )
        })
        .collect();
    let properties = Struct {
        fields: [(
            "changes".to_owned(),
            Value {
                kind: Some(Kind::StructValue(Struct { fields: changed })),
            },
        )]
        .into(),
    };
    synthetic(cause, "Trait Changed", properties)
}

/// An `Emotion Changed` event for a label change caused by `cause`.
fn emotion_changed_event(cause: &Event, change: &EmotionChange) -> Event {
    let properties = Struct {
        fields: emotion_change_fields(change)
            .into_iter()
            .map(|(key, value)| (key.to_owned(), value))
            .collect(),
    };
    synthetic(cause, "Emotion Changed", properties)
}

/// The properties of `Emotion Changed`; a change decay made has signal kind `decay`.
pub(crate) fn emotion_change_fields(change: &EmotionChange) -> [(&'static str, Value); 5] {
    [
        ("previous_label", string(label_name(change.previous))),
        ("label", string(label_name(change.label))),
        (
            "score",
            Value {
                kind: Some(Kind::NumberValue(change.score)),
            },
        ),
        (
            "signal_kind",
            string(change.signal.as_ref().map_or("decay", |s| s.kind.as_str())),
        ),
        (
            "signal_event_id",
            string(change.signal.as_ref().map_or("", |s| s.event_id.as_str())),
        ),
    ]
}

/// The timeline entry of an applied event, for storage.
pub fn entry_time_us(event: &Event) -> i64 {
    event
        .timestamp
        .or(event.received_at)
        .as_ref()
        .map_or(0, micros)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules::default()
    }

    fn event(user: &str, anon: &str, email: Option<&str>) -> Event {
        let mut e = Event {
            event_id: uuid::Uuid::now_v7().to_string(),
            user_id: user.into(),
            anonymous_id: anon.into(),
            ..Event::default()
        };
        if let Some(email) = email {
            let serde_json::Value::Object(m) = serde_json::json!({"email": email}) else {
                unreachable!()
            };
            e.traits = Some(waymark_proto::json::struct_from_json(m));
            e.set_type(EventType::Identify);
        } else {
            e.event = "Clicked".into();
            e.set_type(EventType::Track);
        }
        e
    }

    fn apply(set: &mut WorkingSet, event: Event, now_us: i64) {
        let rules = rules();
        let ids = rules.identity.extract(&event);
        set.apply(&rules, event, ids, now_us);
    }

    #[test]
    fn no_match_creates_one_match_adds_several_merge_into_the_oldest() {
        let mut set = WorkingSet::default();
        apply(&mut set, event("", "anon-1", None), 1);
        apply(&mut set, event("", "anon-2", Some("a@x.io")), 2);
        assert_eq!(set.records.len(), 2);
        let first = set.index[&("anonymous_id".into(), "anon-1".into())].clone();
        // Links anon-1 and the e-mail: the two profiles merge into the older one.
        apply(&mut set, event("", "anon-1", Some("a@x.io")), 3);
        let live: HashSet<&str> = set.records.keys().map(|id| set.live(id)).collect();
        assert_eq!(live.len(), 1);
        assert_eq!(
            set.live(&set.index[&("email".into(), "a@x.io".into())]),
            first
        );
        assert_eq!(set.merges.len(), 1);
        assert_eq!(set.merges[0].survivor_id, first);
        assert_eq!(
            set.records[&first]
                .profile
                .computed
                .as_ref()
                .unwrap()
                .total_events,
            3
        );
    }

    #[test]
    fn a_merge_that_would_give_a_profile_two_user_ids_drops_the_weakest_identifier() {
        let mut set = WorkingSet::default();
        apply(&mut set, event("u-1", "device-a", None), 1);
        apply(&mut set, event("u-2", "device-b", None), 2);
        // u-2 on device-a: merging would join u-1 and u-2; the anonymous id is dropped.
        apply(&mut set, event("u-2", "device-a", None), 3);
        assert!(set.merges.is_empty());
        let u1 = set.index[&("user_id".into(), "u-1".into())].clone();
        let u2 = set.index[&("user_id".into(), "u-2".into())].clone();
        assert_ne!(u1, u2);
        assert_eq!(set.applied.last().unwrap().1, u2);
    }

    fn owner(set: &WorkingSet, t: &str, v: &str) -> String {
        set.live(&set.index[&(t.to_owned(), v.to_owned())])
            .to_owned()
    }

    #[test]
    fn profiles_kept_apart_never_merge_and_the_event_goes_to_its_strongest_identifier() {
        let mut set = WorkingSet::default();
        apply(&mut set, event("", "anon-a", Some("a@x.io")), 1);
        apply(&mut set, event("", "anon-b", None), 2);
        let (a, b) = (
            owner(&set, "email", "a@x.io"),
            owner(&set, "anonymous_id", "anon-b"),
        );
        set.keep_apart([(a.clone(), b.clone())]);
        let linking = event("", "anon-b", Some("a@x.io"));
        let linking_id = linking.event_id.clone();
        apply(&mut set, linking, 3);
        assert!(set.merges.is_empty());
        assert_eq!(owner(&set, "anonymous_id", "anon-b"), b, "not moved");
        assert_eq!(set.applied.last().unwrap().1, a, "the e-mail outranks");
        assert_eq!(set.kept_apart.len(), 1);
        let kept = &set.kept_apart[0];
        assert_eq!(
            (&kept.event_id, &kept.profile_id, &kept.apart),
            (&linking_id, &a, &vec![b.clone()])
        );
        assert_eq!(kept.left_out, [("anonymous_id".into(), "anon-b".into())]);
    }

    #[test]
    fn a_pair_passes_to_the_profile_a_side_is_merged_into() {
        let mut set = WorkingSet::default();
        apply(&mut set, event("", "anon-c", None), 1);
        apply(&mut set, event("", "anon-a", Some("a@x.io")), 2);
        apply(&mut set, event("", "anon-b", None), 3);
        let (a, b, c) = (
            owner(&set, "email", "a@x.io"),
            owner(&set, "anonymous_id", "anon-b"),
            owner(&set, "anonymous_id", "anon-c"),
        );
        set.keep_apart([(a.clone(), b.clone())]);
        // b and c are not kept apart: b merges into c, the older, which takes the pair.
        apply(&mut set, event("", "anon-c", Some("b@x.io")), 4);
        apply(&mut set, event("", "anon-b", Some("b@x.io")), 5);
        assert_eq!(owner(&set, "anonymous_id", "anon-b"), c);
        assert_eq!(set.apart_moved, [(b.clone(), c.clone())]);
        assert!(set.apart[&c].contains(&a) && set.apart[&a].contains(&c));
        apply(&mut set, event("", "anon-c", Some("a@x.io")), 6);
        assert_eq!(set.merges.len(), 1, "only b into c");
        assert_eq!(owner(&set, "anonymous_id", "anon-c"), c);
        assert_eq!(set.applied.last().unwrap().1, a);
    }

    #[test]
    fn a_pair_read_before_its_partner_was_merged_away_still_holds() {
        let mut set = WorkingSet::default();
        for (n, anon) in ["anon-z", "anon-y", "anon-x", "anon-p"].iter().enumerate() {
            apply(&mut set, event("", anon, None), n as i64 + 1);
        }
        let [z, y, x, p] =
            ["anon-z", "anon-y", "anon-x", "anon-p"].map(|a| owner(&set, "anonymous_id", a));
        // p is not held when x, kept apart from it, merges into y (the older): y takes the
        // pair, and the merged x is forgotten, as the applier does once the batch is done.
        let p_record = set.forget(&p).unwrap();
        set.index
            .remove(&("anonymous_id".to_owned(), "anon-p".to_owned()));
        set.keep_apart([(x.clone(), p.clone())]);
        apply(&mut set, event("", "anon-y", Some("x@x.io")), 5);
        apply(&mut set, event("", "anon-x", Some("x@x.io")), 6);
        assert_eq!(owner(&set, "anonymous_id", "anon-x"), y);
        set.forget(&x);
        // p is read from the database before that merge is written: its pair names x.
        set.add([p_record]);
        set.keep_apart([(p.clone(), x.clone())]);
        // p merges into z (the older), which y is then kept apart from.
        apply(&mut set, event("", "anon-z", Some("p@x.io")), 7);
        apply(&mut set, event("", "anon-p", Some("p@x.io")), 8);
        assert_eq!(owner(&set, "anonymous_id", "anon-p"), z);
        apply(&mut set, event("", "anon-y", Some("p@x.io")), 9);
        assert_eq!(set.merges.len(), 2, "x into y and p into z only");
        assert_eq!(owner(&set, "anonymous_id", "anon-y"), y);
    }

    #[test]
    fn blocked_values_never_merge() {
        let mut set = WorkingSet::default();
        apply(&mut set, event("u-1", "undefined", None), 1);
        apply(&mut set, event("u-2", "undefined", None), 2);
        assert!(set.merges.is_empty());
        assert_eq!(set.records.len(), 2);
    }

    #[test]
    fn a_label_change_emits_emotion_changed_and_a_steady_label_does_not() {
        let survey = |csat: i64| {
            let serde_json::Value::Object(m) = serde_json::json!({"csat": csat}) else {
                unreachable!()
            };
            let mut e = event("u-1", "", None);
            e.event = "CSAT Submitted".into();
            e.properties = Some(waymark_proto::json::struct_from_json(m));
            e
        };
        let mut set = WorkingSet::default();
        let first = survey(1);
        apply(&mut set, first.clone(), 1);
        apply(&mut set, survey(1), 2);
        assert_eq!(
            set.synthetic.len(),
            1,
            "the second 1-star CSAT keeps the label"
        );
        let (changed, profile_id) = &set.synthetic[0];
        assert_eq!(changed.event, "Emotion Changed");
        assert_eq!(profile_id, &set.applied[0].1);
        let props = waymark_proto::json::struct_to_json(changed.properties.as_ref().unwrap());
        assert_eq!(
            serde_json::Value::Object(props),
            serde_json::json!({
                "previous_label": "unspecified",
                "label": "upset",
                "score": -1,
                "signal_kind": "csat",
                "signal_event_id": first.event_id,
            })
        );
    }

    #[test]
    fn a_replay_replaces_what_the_aggregate_counted_since_it_was_configured() {
        let spec = |name: &str| -> AggregateSpec {
            serde_json::from_value(serde_json::json!(
                {"name": name, "event": "Clicked", "function": "count"}
            ))
            .unwrap()
        };
        let (clicks, old) = (vec![spec("clicks")], vec![spec("gone")]);
        let mut set = WorkingSet::default();
        let history: Vec<Event> = (0..3).map(|_| event("u1", "", None)).collect();
        for e in &history {
            apply(&mut set, e.clone(), 1);
        }
        let record = set.records.values_mut().next().unwrap();
        record.aggregates = AggregateState::default();
        // One event applied with `clicks` configured counts 1, and `gone` is still stored.
        let mut latest = event("u1", "", None);
        latest.timestamp = Some(from_micros(1));
        record.observe_aggregates(&[clicks.clone(), old].concat(), &latest, 1);
        assert_eq!(
            record.profile.computed.as_ref().unwrap().aggregates["clicks"],
            number(1.0)
        );
        let mut trusted = latest.clone();
        trusted.source_id = format!("{}svc", crate::model::TRUSTED_SOURCE_PREFIX);
        let mut replay = AggregateReplay::new(clicks.clone());
        for e in history.iter().chain([&latest, &trusted]) {
            let mut e = e.clone();
            e.timestamp = Some(from_micros(1));
            replay.observe(&e);
        }
        let installed = record.install_replay(replay, &clicks, 1);
        assert_eq!(
            installed,
            Installed {
                state: true,
                values: true
            }
        );
        let computed = record.profile.computed.as_ref().unwrap();
        assert_eq!(
            computed.aggregates,
            [("clicks".to_owned(), number(4.0))].into(),
            "the whole history once, the trusted change not at all, `gone` dropped"
        );
        assert_eq!(
            record.aggregates.aggregates.keys().collect::<Vec<_>>(),
            ["clicks"]
        );
    }

    fn number(n: f64) -> Value {
        Value {
            kind: Some(Kind::NumberValue(n)),
        }
    }
}
