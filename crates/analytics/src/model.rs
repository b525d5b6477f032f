//! The compact in-memory representation every query runs on.
//!
//! Each profile keeps its events ordered by (time, event id), with names, property keys and
//! string values dictionary-encoded, and its properties in one arena of its own. A customer
//! is a root profile together with the profiles merged into it: a merge moves members
//! between roots and an unmerge moves them back, without touching a single event, so every
//! query sees merges at once. Journey step events are kept per enrollment; segment
//! memberships per profile as intervals.

use std::collections::HashMap;

use prost_types::value::Kind;
use waymark_condition::Value;
use waymark_proto::common::v1::Event;

use crate::report::JourneyStep;

/// Interned strings: each distinct string once, named by its index.
#[derive(Default)]
pub struct Dict {
    ids: HashMap<Box<str>, u32>,
    strings: Vec<Box<str>>,
}

impl Dict {
    /// The id of `s`, interning it when new.
    pub fn intern(&mut self, s: &str) -> u32 {
        if let Some(&id) = self.ids.get(s) {
            return id;
        }
        let id = u32::try_from(self.strings.len()).unwrap_or(u32::MAX);
        self.strings.push(s.into());
        self.ids.insert(s.into(), id);
        id
    }

    /// The id of `s`, when it was ever seen.
    pub fn get(&self, s: &str) -> Option<u32> {
        self.ids.get(s).copied()
    }

    /// The string of `id`.
    pub fn name(&self, id: u32) -> &str {
        self.strings.get(id as usize).map_or("", |s| s)
    }

    /// How many strings.
    pub fn len(&self) -> usize {
        self.strings.len()
    }

    /// Whether no string was interned.
    pub fn is_empty(&self) -> bool {
        self.strings.is_empty()
    }
}

/// A property value, encoded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Val {
    Null,
    Bool(bool),
    Num(f64),
    /// An interned string.
    Str(u32),
    /// A list or an object, as interned JSON text (rarely compared, never indexed).
    Json(u32),
}

impl Val {
    /// A key for hashing and equality (numbers by their bits).
    pub fn key(self) -> (u8, u64) {
        match self {
            Val::Null => (0, 0),
            Val::Bool(b) => (1, u64::from(b)),
            Val::Num(n) => (2, n.to_bits()),
            Val::Str(s) => (3, u64::from(s)),
            Val::Json(s) => (4, u64::from(s)),
        }
    }
}

impl Val {
    /// The value a [`Val::key`] was taken of.
    pub fn from_key((tag, bits): (u8, u64)) -> Val {
        match tag {
            1 => Val::Bool(bits != 0),
            2 => Val::Num(f64::from_bits(bits)),
            3 => Val::Str(bits as u32),
            4 => Val::Json(bits as u32),
            _ => Val::Null,
        }
    }
}

/// One property of an event: 16 bytes (a `Val` beside its key would take 24), since
/// scans are bound by how many bytes of properties they pull from memory.
#[derive(Debug, Clone, Copy)]
pub struct Prop {
    pub key: u32,
    tag: u8,
    bits: u64,
}

impl Prop {
    pub fn new(key: u32, val: Val) -> Prop {
        let (tag, bits) = val.key();
        Prop { key, tag, bits }
    }

    pub fn val(&self) -> Val {
        Val::from_key(self.value_key())
    }

    /// The value as [`Val::key`] gives it, without decoding it.
    pub fn value_key(&self) -> (u8, u64) {
        (self.tag, self.bits)
    }
}

/// One event of a profile.
#[derive(Debug, Clone, Copy)]
pub struct Ev {
    /// Event time, microseconds since the epoch.
    pub at: i64,
    /// Orders events of the same microsecond: the event id's low 64 bits.
    pub tie: u64,
    /// Interned event name.
    pub name: u32,
    /// The canonical channel (`waymark.common.v1.Channel` value).
    pub channel: u8,
    /// Its properties: `[start..start + len]` of the model's arena, or of the profile's
    /// own `props` when `start` has the [`RECENT`] bit.
    pub start: u32,
    pub len: u16,
}

/// The bit of `Ev::start` that places its properties in the profile's `props`.
pub const RECENT: u32 = 1 << 31;

/// One profile. Laid out in declaration order, 128 bytes: what a scan reads of every
/// profile (root, arena range, members, recent events) shares its first cache line.
#[derive(Default)]
#[repr(C)]
pub struct Slot {
    /// The root profile of the customer this profile belongs to (itself when a root).
    pub root: u32,
    /// Its events as of the last compaction: `Model::arena_events[base..base + base_len]`,
    /// ordered by (at, tie).
    pub base: u32,
    pub base_len: u32,
    /// Erased: holds nothing and takes nothing more.
    pub erased: bool,
    /// The profiles of the customer, when this is a root (itself first).
    pub members: Vec<u32>,
    /// Events since the last compaction, ordered by (at, tie).
    pub events: Vec<Ev>,
    /// The properties of `events`.
    pub props: Vec<Prop>,
    /// Segment memberships: (segment, entered at, exited at or `i64::MAX`).
    pub segments: Vec<(u32, i64, i64)>,
    pub id: Box<str>,
}

#[cfg(target_pointer_width = "64")]
const _: () =
    assert!(std::mem::size_of::<Slot>() == 128 && std::mem::offset_of!(Slot, props) == 64);

/// One journey enrollment's steps, in order.
pub struct Enrollment {
    pub profile: u32,
    pub version: u32,
    /// Each step's sequence number within the enrollment, ascending.
    pub seqs: Vec<i64>,
    pub steps: Vec<JourneyStep>,
}

/// What the profile service says about identities.
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    Merged {
        merge_id: String,
        merged: String,
        survivor: String,
    },
    Unmerged {
        merge_id: String,
        survivor: String,
        restored: String,
    },
    Deleted {
        profiles: Vec<String>,
    },
}

/// The events of one delivery, classified.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// A customer's event (including segment and trait notices).
    Customer(Event),
    /// A step the orchestrator took.
    JourneyStep(Event),
    /// A merge, an unmerge or an erasure.
    Notice(Notice),
}

/// Events that change identities rather than describe the customer.
const MERGED: &str = "Profile Merged";
const UNMERGED: &str = "Profile Unmerged";
const DELETED: &str = "Profile Deleted";
/// The orchestrator's step events.
pub const STEP_EVENTS: [&str; 6] = [
    "Journey Entered",
    "Journey Step",
    "Journey Goal Reached",
    "Journey Exited",
    "Journey Errored",
    "Message Suppressed",
];

fn text(event: &Event, key: &str) -> String {
    match event
        .properties
        .as_ref()
        .and_then(|p| p.fields.get(key))
        .and_then(|v| v.kind.as_ref())
    {
        Some(Kind::StringValue(s)) => s.clone(),
        _ => String::new(),
    }
}

/// The name an event is counted under: `event` for track events, `name` for pages and
/// screens (a nameless page is "Page Viewed").
pub fn event_name(event: &Event) -> &str {
    use waymark_proto::common::v1::EventType;
    match event.r#type() {
        EventType::Track => &event.event,
        EventType::Page if event.name.is_empty() => "Page Viewed",
        EventType::Screen if event.name.is_empty() => "Screen Viewed",
        EventType::Page | EventType::Screen => &event.name,
        EventType::Identify => "Identify",
        EventType::Group => "Group",
        EventType::Alias => "Alias",
        _ => &event.event,
    }
}

/// Sorts an event into what it is for analytics.
pub fn classify(event: Event) -> Incoming {
    match event.event.as_str() {
        MERGED => Incoming::Notice(Notice::Merged {
            merge_id: text(&event, "merge_id"),
            merged: text(&event, "merged_profile_id"),
            survivor: text(&event, "survivor_profile_id"),
        }),
        UNMERGED => Incoming::Notice(Notice::Unmerged {
            merge_id: text(&event, "merge_id"),
            survivor: text(&event, "survivor_profile_id"),
            restored: text(&event, "restored_profile_id"),
        }),
        DELETED => {
            let mut profiles: Vec<String> = match event
                .properties
                .as_ref()
                .and_then(|p| p.fields.get("erased_profile_ids"))
                .and_then(|v| v.kind.as_ref())
            {
                Some(Kind::ListValue(list)) => list
                    .values
                    .iter()
                    .filter_map(|v| match &v.kind {
                        Some(Kind::StringValue(s)) => Some(s.clone()),
                        _ => None,
                    })
                    .collect(),
                _ => Vec::new(),
            };
            if !event.profile_id.is_empty() && !profiles.contains(&event.profile_id) {
                profiles.push(event.profile_id.clone());
            }
            Incoming::Notice(Notice::Deleted { profiles })
        }
        name if event.source_id == "orchestrator" && STEP_EVENTS.contains(&name) => {
            Incoming::JourneyStep(event)
        }
        _ => Incoming::Customer(event),
    }
}

/// A compacted arena, built apart from the memory it lays out.
pub struct Layout {
    events: Vec<Ev>,
    props: Vec<Prop>,
    /// Each profile's place in `events`: (profile, start, length).
    ranges: Vec<(u32, u32, u32)>,
    /// The events memory held when it was built.
    as_of: u64,
}

/// The memory a [`Model::install`] replaced, freed when dropped.
pub struct Replaced {
    _events: Vec<Ev>,
    _props: Vec<Prop>,
    _recent: Vec<(Vec<Ev>, Vec<Prop>)>,
}

/// Everything queries read.
#[derive(Default)]
pub struct Model {
    pub names: Dict,
    pub keys: Dict,
    pub strings: Dict,
    pub segment_ids: Dict,
    slots: Vec<Slot>,
    by_id: HashMap<Box<str>, u32>,
    /// merge id → (the profiles it moved, the root they came from).
    merges: HashMap<String, (Vec<u32>, u32)>,
    /// journey id → enrollment id → enrollment.
    pub journeys: HashMap<String, HashMap<String, Enrollment>>,
    events: u64,
    compacted_at: u64,
    /// Every profile's events as of the last compaction, customer after customer, and
    /// their properties: a scan over customers reads memory in order.
    arena_events: Vec<Ev>,
    arena_props: Vec<Prop>,
}

/// A JSON value as conditions read it.
pub fn json_value(json: &serde_json::Value) -> Value {
    match json {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => n
            .as_i64()
            .map_or_else(|| Value::Double(n.as_f64().unwrap_or(0.0)), Value::Int),
        serde_json::Value::String(s) => Value::String(s.clone()),
        serde_json::Value::Array(items) => Value::List(items.iter().map(json_value).collect()),
        serde_json::Value::Object(map) => Value::Map(
            map.iter()
                .map(|(k, v)| (k.clone(), json_value(v)))
                .collect(),
        ),
    }
}

/// The time an event is placed at: when it happened, else when it was received.
pub fn event_time(event: &Event) -> i64 {
    event
        .timestamp
        .as_ref()
        .or(event.received_at.as_ref())
        .map_or(0, waymark_kit::time::micros)
}

fn tie_of(event_id: &str) -> u64 {
    uuid::Uuid::parse_str(event_id).map_or_else(
        |_| {
            event_id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
            })
        },
        |u| u.as_u64_pair().1,
    )
}

impl Model {
    /// The slot of `profile_id`, created (as its own customer) when new.
    pub fn slot_of(&mut self, profile_id: &str) -> u32 {
        if let Some(&i) = self.by_id.get(profile_id) {
            return i;
        }
        let i = u32::try_from(self.slots.len()).unwrap_or(u32::MAX);
        self.slots.push(Slot {
            id: profile_id.into(),
            root: i,
            members: vec![i],
            ..Slot::default()
        });
        self.by_id.insert(profile_id.into(), i);
        i
    }

    /// The slot of `profile_id`, when known.
    pub fn find(&self, profile_id: &str) -> Option<u32> {
        self.by_id.get(profile_id).copied()
    }

    pub fn slot(&self, i: u32) -> &Slot {
        &self.slots[i as usize]
    }

    /// Every profile.
    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// The customers: root profiles with their members.
    pub fn roots(&self) -> impl Iterator<Item = (u32, &Slot)> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(i, _)| self.is_root(*i as u32))
            .map(|(i, s)| (i as u32, s))
    }

    /// Whether profile `i` is the root of a customer (erased profiles are none).
    pub fn is_root(&self, i: u32) -> bool {
        let slot = &self.slots[i as usize];
        slot.root == i && !slot.members.is_empty()
    }

    /// The profiles of the customer rooted at `root`, itself first. Most customers are one
    /// profile: their answer comes without reading `members` from the heap, which a scan
    /// over a million customers would otherwise wait on once per customer.
    pub fn members(&self, root: u32) -> &[u32] {
        let slot = &self.slots[root as usize];
        if slot.members.len() == 1 && slot.root == root {
            std::slice::from_ref(&slot.root)
        } else {
            &slot.members
        }
    }

    /// Whether the customer rooted at `root` holds any event.
    pub fn customer_has_events(&self, root: u32) -> bool {
        self.members(root)
            .iter()
            .any(|m| self.has_events(self.slot(*m)))
    }

    /// The profile id a customer is reported under: its root's.
    pub fn customer_id(&self, root: u32) -> &str {
        &self.slots[root as usize].id
    }

    /// Lays every profile's events and properties out afresh in one arena, customer
    /// after customer. Events arrive interleaved across customers, so per-profile vectors
    /// end up scattered over the heap and a scan would wait on memory at every customer.
    /// Run after memory is rebuilt and when much has arrived since.
    pub fn compact(&mut self) {
        let layout = self.layout();
        drop(self.install(layout));
    }

    /// The compacted arena of what memory holds now, built without changing it (so
    /// queries can go on reading meanwhile); [`Model::install`] puts it in place.
    pub fn layout(&self) -> Layout {
        let mut events = Vec::with_capacity(self.events as usize);
        let mut props = Vec::with_capacity(self.arena_props.len() + self.recent_props());
        let mut ranges = Vec::with_capacity(self.slots.len());
        let mut merged: Vec<Ev> = Vec::new();
        for (root, _) in self.roots() {
            for &m in self.members(root) {
                let slot = &self.slots[m as usize];
                let base = u32::try_from(events.len()).unwrap_or(u32::MAX);
                let (old, recent) = self.events_of(slot);
                // Each part is already in order: only a profile with both needs merging.
                let ordered = if recent.is_empty() {
                    old
                } else if old.is_empty() {
                    recent
                } else {
                    merged.clear();
                    merged.extend_from_slice(old);
                    merged.extend_from_slice(recent);
                    merged.sort_by_key(|e| (e.at, e.tie));
                    &merged
                };
                for ev in ordered {
                    let from = self.props(slot, ev);
                    let mut ev = *ev;
                    ev.start = u32::try_from(props.len()).unwrap_or(u32::MAX);
                    props.extend_from_slice(from);
                    events.push(ev);
                }
                let len = u32::try_from(events.len()).unwrap_or(u32::MAX) - base;
                ranges.push((m, base, len));
            }
        }
        Layout {
            events,
            props,
            ranges,
            as_of: self.events,
        }
    }

    /// Puts a [`Model::layout`] in place. Memory must not have changed since it was built.
    /// Returns what it replaced, to be freed once queries may read again: freeing a
    /// gigabyte arena and a million small vectors takes a while.
    pub fn install(&mut self, layout: Layout) -> Replaced {
        let mut recent = Vec::new();
        for (m, base, len) in layout.ranges {
            let slot = &mut self.slots[m as usize];
            slot.base = base;
            slot.base_len = len;
            if slot.events.capacity() > 0 || slot.props.capacity() > 0 {
                recent.push((
                    std::mem::take(&mut slot.events),
                    std::mem::take(&mut slot.props),
                ));
            }
        }
        self.compacted_at = layout.as_of;
        Replaced {
            _events: std::mem::replace(&mut self.arena_events, layout.events),
            _props: std::mem::replace(&mut self.arena_props, layout.props),
            _recent: recent,
        }
    }

    fn recent_props(&self) -> usize {
        self.slots.iter().map(|s| s.props.len()).sum()
    }

    /// A profile's events: those of the arena and those since, each ordered.
    pub fn events_of<'a>(&'a self, slot: &'a Slot) -> (&'a [Ev], &'a [Ev]) {
        let start = slot.base as usize;
        let base = self
            .arena_events
            .get(start..start + slot.base_len as usize)
            .unwrap_or(&[]);
        (base, &slot.events)
    }

    /// Whether a profile holds any event.
    pub fn has_events(&self, slot: &Slot) -> bool {
        slot.base_len > 0 || !slot.events.is_empty()
    }

    /// Events added since the last compaction.
    pub fn added_since_compaction(&self) -> u64 {
        self.events.saturating_sub(self.compacted_at)
    }

    /// Events held, over every profile.
    pub fn event_count(&self) -> u64 {
        self.events
    }

    /// Adds a customer event to its profile, in time order.
    pub fn add_event(&mut self, event: &Event) {
        if event.profile_id.is_empty() {
            return;
        }
        let slot = self.slot_of(&event.profile_id);
        if self.slots[slot as usize].erased {
            return;
        }
        let at = event_time(event);
        let tie = tie_of(&event.event_id);
        let name = self.names.intern(event_name(event));
        let mut props = Vec::new();
        if let Some(p) = &event.properties {
            for (k, v) in &p.fields {
                let key = self.keys.intern(k);
                let val = self.encode(v);
                props.push(Prop::new(key, val));
            }
        }
        match event.event.as_str() {
            "Segment Entered" | "Segment Exited" => {
                let segment = self.segment_ids.intern(&text(event, "segment_id"));
                let memberships = &mut self.slots[slot as usize].segments;
                if event.event == "Segment Entered" {
                    memberships.push((segment, at, i64::MAX));
                } else if let Some(open) = memberships
                    .iter_mut()
                    .rev()
                    .find(|(s, _, until)| *s == segment && *until == i64::MAX)
                {
                    open.2 = at;
                }
            }
            _ => {}
        }
        let s = &mut self.slots[slot as usize];
        let start = u32::try_from(s.props.len()).unwrap_or(u32::MAX) | RECENT;
        let len = u16::try_from(props.len()).unwrap_or(u16::MAX);
        s.props.extend(props.into_iter().take(usize::from(len)));
        let ev = Ev {
            at,
            tie,
            name,
            channel: u8::try_from(event.channel).unwrap_or(0),
            start,
            len,
        };
        // Events mostly arrive in order: the common case appends.
        let pos = s
            .events
            .partition_point(|e| (e.at, e.tie) <= (ev.at, ev.tie));
        s.events.insert(pos, ev);
        self.events += 1;
    }

    fn encode(&mut self, value: &prost_types::Value) -> Val {
        match &value.kind {
            None | Some(Kind::NullValue(_)) => Val::Null,
            Some(Kind::BoolValue(b)) => Val::Bool(*b),
            Some(Kind::NumberValue(n)) => Val::Num(*n),
            Some(Kind::StringValue(s)) => Val::Str(self.strings.intern(s)),
            Some(_) => {
                let json = waymark_proto::json::value_to_json(value).to_string();
                Val::Json(self.strings.intern(&json))
            }
        }
    }

    /// A property value as conditions read it.
    pub fn decode(&self, val: Val) -> Value {
        match val {
            Val::Null => Value::Null,
            Val::Bool(b) => Value::Bool(b),
            Val::Num(n) => Value::Double(n),
            Val::Str(s) => Value::String(self.strings.name(s).to_owned()),
            Val::Json(s) => serde_json::from_str::<serde_json::Value>(self.strings.name(s))
                .map_or(Value::Null, |j| json_value(&j)),
        }
    }

    /// The properties of `ev` of profile `slot`.
    pub fn props<'a>(&'a self, slot: &'a Slot, ev: &Ev) -> &'a [Prop] {
        let (arena, start) = if ev.start & RECENT == 0 {
            (&self.arena_props, ev.start as usize)
        } else {
            (&slot.props, (ev.start & !RECENT) as usize)
        };
        arena.get(start..start + usize::from(ev.len)).unwrap_or(&[])
    }

    /// Adds a journey step event.
    pub fn add_step(&mut self, event: &Event) {
        let journey = text(event, "journey_id");
        let enrollment_id = text(event, "enrollment_id");
        if journey.is_empty() || enrollment_id.is_empty() || event.profile_id.is_empty() {
            return;
        }
        let profile = self.slot_of(&event.profile_id);
        if self.slots[profile as usize].erased {
            return;
        }
        let fields = event.properties.as_ref().map(|p| &p.fields);
        let number = |key: &str| match fields
            .and_then(|f| f.get(key))
            .and_then(|v| v.kind.as_ref())
        {
            Some(Kind::NumberValue(n)) => *n,
            _ => 0.0,
        };
        let detail = fields
            .and_then(|f| f.get("detail"))
            .and_then(|v| match &v.kind {
                Some(Kind::StructValue(s)) => Some(s),
                _ => None,
            });
        // The order of the arms comes from `arms`: a Struct keeps no key order, and the
        // first arm is control when none is named so.
        let weight_of = |arm: &str| {
            detail
                .and_then(|d| d.fields.get("weights"))
                .and_then(|v| match &v.kind {
                    Some(Kind::StructValue(s)) => s.fields.get(arm),
                    _ => None,
                })
                .and_then(|v| match v.kind {
                    Some(Kind::NumberValue(n)) => Some(n),
                    _ => None,
                })
        };
        let weights = match detail
            .and_then(|d| d.fields.get("arms"))
            .and_then(|v| v.kind.as_ref())
        {
            Some(Kind::ListValue(arms)) => arms
                .values
                .iter()
                .filter_map(|a| match &a.kind {
                    Some(Kind::StringValue(arm)) => Some((arm.clone(), weight_of(arm)?)),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        let holdout_percent = detail
            .and_then(|d| d.fields.get("holdout_percent"))
            .and_then(|v| match v.kind {
                Some(Kind::NumberValue(n)) => Some(n),
                _ => None,
            })
            .unwrap_or(0.0);
        let seq = event
            .message_id
            .rsplit_once(':')
            .and_then(|(_, s)| s.parse::<i64>().ok())
            .unwrap_or(0);
        let step = JourneyStep {
            node_id: text(event, "node_id"),
            outcome: text(event, "outcome"),
            decision: text(event, "decision"),
            at_us: event_time(event),
            weights,
            holdout_percent,
        };
        let version = u32::try_from(number("version") as i64).unwrap_or(0);
        let enrollment = self
            .journeys
            .entry(journey)
            .or_default()
            .entry(enrollment_id)
            .or_insert_with(|| Enrollment {
                profile,
                version,
                seqs: Vec::new(),
                steps: Vec::new(),
            });
        // A migration moves an enrollment to a newer version.
        enrollment.version = enrollment.version.max(version);
        let pos = enrollment.seqs.partition_point(|s| *s <= seq);
        enrollment.seqs.insert(pos, seq);
        enrollment.steps.insert(pos, step);
    }

    /// Applies a merge, an unmerge or an erasure.
    pub fn apply_notice(&mut self, notice: &Notice) {
        match notice {
            Notice::Merged {
                merge_id,
                merged,
                survivor,
            } => {
                let (merged, survivor) = (self.slot_of(merged), self.slot_of(survivor));
                let from = self.slots[merged as usize].root;
                let to = self.slots[survivor as usize].root;
                if from == to {
                    return;
                }
                let moved = std::mem::take(&mut self.slots[from as usize].members);
                for &m in &moved {
                    self.slots[m as usize].root = to;
                }
                self.slots[to as usize].members.extend(&moved);
                self.merges.insert(merge_id.clone(), (moved, from));
            }
            Notice::Unmerged {
                merge_id, restored, ..
            } => {
                let Some((moved, from)) = self.merges.remove(merge_id) else {
                    return;
                };
                let back = self.find(restored).unwrap_or(from);
                for &m in &moved {
                    let root = self.slots[m as usize].root;
                    self.slots[root as usize].members.retain(|x| *x != m);
                    self.slots[m as usize].root = back;
                }
                let is_root = self.slots[back as usize].root == back;
                let members = &mut self.slots[back as usize].members;
                for m in moved {
                    if !members.contains(&m) {
                        members.push(m);
                    }
                }
                // A root lists itself first: `members` relies on it.
                if is_root {
                    match members.iter().position(|&m| m == back) {
                        Some(p) => members.swap(0, p),
                        None => members.insert(0, back),
                    }
                }
            }
            Notice::Deleted { profiles } => {
                for id in profiles {
                    self.erase(id);
                }
            }
        }
    }

    /// Forgets everything about one profile and every profile merged into it; later
    /// events of those profiles are dropped.
    fn erase(&mut self, profile_id: &str) {
        let Some(i) = self.find(profile_id) else {
            return;
        };
        let root = self.slots[i as usize].root;
        let members = std::mem::take(&mut self.slots[root as usize].members);
        for m in members.into_iter().chain([i]) {
            let slot = &mut self.slots[m as usize];
            self.events = self
                .events
                .saturating_sub(slot.events.len() as u64 + u64::from(slot.base_len));
            *slot = Slot {
                id: std::mem::take(&mut slot.id),
                root: m,
                erased: true,
                ..Slot::default()
            };
        }
        let slots = &self.slots;
        for journey in self.journeys.values_mut() {
            journey.retain(|_, e| !slots[e.profile as usize].erased);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(profile: &str, name: &str, at_secs: i64, price: f64) -> Event {
        let mut e = Event {
            event_id: uuid::Uuid::now_v7().to_string(),
            event: name.into(),
            profile_id: profile.into(),
            properties: Some(waymark_proto::json::struct_from_json(
                serde_json::json!({"price": price})
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
            )),
            timestamp: Some(prost_types::Timestamp {
                seconds: at_secs,
                nanos: 0,
            }),
            ..Event::default()
        };
        e.set_type(waymark_proto::common::v1::EventType::Track);
        e
    }

    /// What a profile holds, as (time, name, price), in order.
    fn held(model: &Model, profile: &str) -> Vec<(i64, String, f64)> {
        let slot = model.slot(model.find(profile).unwrap());
        let (base, recent) = model.events_of(slot);
        let mut all: Vec<Ev> = base.iter().chain(recent).copied().collect();
        all.sort_by_key(|e| (e.at, e.tie));
        all.iter()
            .map(|e| {
                let price = match model.props(slot, e)[0].val() {
                    Val::Num(n) => n,
                    _ => f64::NAN,
                };
                (e.at / 1_000_000, model.names.name(e.name).to_owned(), price)
            })
            .collect()
    }

    #[test]
    fn compaction_keeps_every_event_with_its_properties_and_late_ones_in_order() {
        let mut model = Model::default();
        model.add_event(&event("a", "View", 10, 1.0));
        model.add_event(&event("b", "View", 11, 2.0));
        model.add_event(&event("a", "Buy", 30, 3.0));
        model.compact();
        model.add_event(&event("a", "Late", 20, 4.0));
        model.add_event(&event("b", "Buy", 40, 5.0));
        let before = (held(&model, "a"), held(&model, "b"));
        assert_eq!(
            before.0,
            vec![
                (10, "View".into(), 1.0),
                (20, "Late".into(), 4.0),
                (30, "Buy".into(), 3.0)
            ]
        );
        assert_eq!(model.added_since_compaction(), 2);
        model.compact();
        assert_eq!((held(&model, "a"), held(&model, "b")), before);
        assert_eq!(
            (model.event_count(), model.added_since_compaction()),
            (5, 0)
        );
        let a = model.slot(model.find("a").unwrap());
        assert!(a.events.is_empty() && a.base_len == 3);
    }
}
