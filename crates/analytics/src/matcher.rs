//! Which events a step, stage, exclusion or dead end matches: an event name plus an
//! optional CEL condition over `properties` and `channel`, compiled once per query.
//!
//! Values are dictionary-encoded, so a condition that reads a few named properties is
//! evaluated once per distinct combination of their values and remembered: a funnel
//! over millions of events runs the interpreter a few thousand times.

use std::sync::LazyLock;

use rustc_hash::FxHashMap;

use waymark_condition::{Condition, Value, Variables};
use waymark_proto::analytics::v1::EventMatcher;

use crate::error::AnalyticsError;
use crate::model::{Ev, Model, Prop, Slot, Val};

/// The variables a matcher's condition may read.
pub const VARIABLES: [&str; 2] = ["properties", "channel"];

/// At most this many properties make a remembered combination.
const MEMO_KEYS: usize = 4;

/// The properties a condition names: `properties.x` and `properties["x"]`.
static NAMED: LazyLock<regex::Regex> = LazyLock::new(|| {
    regex::Regex::new(
        r#"properties\s*(?:\.\s*([A-Za-z_][A-Za-z0-9_]*)|\[\s*(?:"([^"\\]*)"|'([^'\\]*)')\s*\])"#,
    )
    .unwrap_or_else(|e| unreachable!("the pattern is constant: {e}"))
});

/// A compiled matcher.
#[derive(Clone)]
pub struct Matcher {
    /// The interned name; none when no event ever had it (matches nothing).
    name: Option<u32>,
    condition: Option<Compiled>,
}

#[derive(Clone)]
struct Compiled {
    condition: Condition,
    /// The interned keys it reads, when it reads named properties only (few enough to
    /// remember); a key never seen is `None` (always missing).
    memo_keys: Option<Vec<Option<u32>>>,
    channel: bool,
}

/// A remembered combination: each named property's value (tag 255 when missing) and the
/// channel.
type MemoKey = [(u8, u64); MEMO_KEYS + 1];

/// Remembered results of one matcher, for one thread.
#[derive(Default)]
pub struct Memo {
    /// For a condition that reads one property and not the channel: by that value alone,
    /// a fifth of the bytes to hash and compare of a whole [`MemoKey`].
    by_value: FxHashMap<(u8, u64), bool>,
    results: FxHashMap<MemoKey, bool>,
}

impl Matcher {
    /// Compiles `m`, reporting problems under `field` (e.g. `steps[2]`).
    pub fn compile(
        model: &Model,
        m: &EventMatcher,
        field: &str,
    ) -> Result<Matcher, AnalyticsError> {
        if m.event.trim().is_empty() {
            return Err(AnalyticsError::invalid(
                format!("{field}.event"),
                "is required",
            ));
        }
        let condition = if m.condition.trim().is_empty() {
            None
        } else {
            let condition = Condition::compile(&m.condition, &VARIABLES).map_err(|e| {
                AnalyticsError::invalid(format!("{field}.condition"), e.to_string())
            })?;
            Some(Compiled {
                memo_keys: memo_keys(model, &m.condition),
                channel: condition.uses("channel"),
                condition,
            })
        };
        Ok(Matcher {
            name: model.names.get(&m.event),
            condition,
        })
    }

    /// Whether it has a condition (else the name decides).
    pub fn has_condition(&self) -> bool {
        self.condition.is_some()
    }

    /// The interned name it matches, if any event had it.
    pub fn name(&self) -> Option<u32> {
        self.name
    }

    /// Whether `ev` of profile `slot` matches.
    pub fn matches(&self, model: &Model, slot: &Slot, ev: &Ev, memo: &mut Memo) -> bool {
        self.matches_props(model, ev.name, ev.channel, model.props(slot, ev), memo)
    }

    /// Whether an event named `name` on `channel` with `props` matches.
    pub fn matches_props(
        &self,
        model: &Model,
        name: u32,
        channel: u8,
        props: &[Prop],
        memo: &mut Memo,
    ) -> bool {
        if self.name != Some(name) {
            return false;
        }
        let Some(c) = &self.condition else {
            return true;
        };
        let Some(keys) = &c.memo_keys else {
            return evaluate(model, c, props, channel, None);
        };
        if let [wanted] = keys.as_slice()
            && !c.channel
        {
            let value = wanted
                .and_then(|w| props.iter().find(|p| p.key == w))
                .map_or((255, 0), Prop::value_key);
            if let Some(&hit) = memo.by_value.get(&value) {
                return hit;
            }
            let result = evaluate(model, c, props, channel, Some(keys));
            memo.by_value.insert(value, result);
            return result;
        }
        let mut key: MemoKey = [(255, 0); MEMO_KEYS + 1];
        for (k, wanted) in key.iter_mut().zip(keys) {
            if let Some(p) = wanted.and_then(|w| props.iter().find(|p| p.key == w)) {
                *k = p.value_key();
            }
        }
        if c.channel {
            key[MEMO_KEYS] = (0, u64::from(channel));
        }
        if let Some(&hit) = memo.results.get(&key) {
            return hit;
        }
        let result = evaluate(model, c, props, channel, Some(keys));
        memo.results.insert(key, result);
        result
    }
}

/// The keys to remember results by, or none when the condition reads `properties` as a
/// whole (or too many of them).
fn memo_keys(model: &Model, source: &str) -> Option<Vec<Option<u32>>> {
    let mut names: Vec<&str> = NAMED
        .captures_iter(source)
        .filter_map(|c| c.get(1).or(c.get(2)).or(c.get(3)).map(|m| m.as_str()))
        .collect();
    names.sort_unstable();
    names.dedup();
    let rest = NAMED.replace_all(source, "");
    if rest.contains("properties") || names.len() > MEMO_KEYS {
        return None;
    }
    Some(names.into_iter().map(|n| model.keys.get(n)).collect())
}

fn evaluate(
    model: &Model,
    c: &Compiled,
    props: &[Prop],
    channel: u8,
    only: Option<&[Option<u32>]>,
) -> bool {
    let properties: std::collections::BTreeMap<String, Value> = props
        .iter()
        .filter(|p| only.is_none_or(|keys| keys.contains(&Some(p.key))))
        .map(|p| (model.keys.name(p.key).to_owned(), model.decode(p.val())))
        .collect();
    let mut vars = Variables::new();
    vars.set("properties", Value::Map(properties));
    vars.set(
        "channel",
        waymark_profile::segment::channel_name(i32::from(channel)),
    );
    c.condition.evaluate(&vars).unwrap_or(false)
}

/// A property value as a group label: strings as they are, numbers without a trailing
/// `.0`, missing as "(none)".
pub fn label(model: &Model, val: Option<Val>) -> String {
    match val {
        None | Some(Val::Null) => "(none)".to_owned(),
        Some(Val::Bool(b)) => b.to_string(),
        Some(Val::Num(n)) if n.fract() == 0.0 && n.abs() < 1e15 => format!("{}", n as i64),
        Some(Val::Num(n)) => n.to_string(),
        Some(Val::Str(s) | Val::Json(s)) => model.strings.name(s).to_owned(),
    }
}
