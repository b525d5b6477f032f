//! Configured aggregates of a profile's events (`ComputedTraits.aggregates`): count, sum,
//! min, max, first, last or distinct count of an event property, for ever or over a
//! sliding window of event time. Pure logic; the caller stores the state.
//!
//! How to use it:
//! - Load the specs (the `profile_aggregates` setting, a list of [`AggregateSpec`]) and
//!   reject bad configuration at start-up with [`validate`].
//! - Keep one [`AggregateState`] per profile. It is a prost message, so
//!   `prost::Message::encode_to_vec` / `AggregateState::decode` store it as bytes.
//! - [`observe`] every event applied to the profile; [`merge`] the merged profile's state
//!   into the survivor's; [`values`] gives what goes into `ComputedTraits.aggregates` as of
//!   a time (a windowed value can drop with no new event, so recompute it when a
//!   condition uses `now`); [`prune`] before storing drops expired samples and the state of
//!   aggregates no longer configured.
//!
//! Semantics:
//! - An event matches when its name (as counted in `event_counts`: the track event name,
//!   "Page Viewed", "Identify", …) equals `event`. Its time is `timestamp`, else
//!   `received_at`; an event with neither is not observed.
//! - `property` is a dotted path into the event's properties (traits for identify and
//!   group), e.g. `order.total`; a key containing a dot cannot be addressed. With a
//!   property set, an event without it (or with null) is skipped, so `count` with a property
//!   counts the events that carry it. Sum, min and max take numbers and numeric strings and
//!   skip anything else; first, last and distinct count take any value.
//! - First and last go by event time, so a late older event still becomes the first; of
//!   two events at the same time the one observed later is the last.
//! - An aggregate appears in [`values`] once an event has contributed. Over an empty
//!   window count, sum and distinct count are 0, min, max, first and last are left out.
//!   Windows count samples with `now - window < time` (no upper bound, so an event from a
//!   client whose clock runs ahead is not hidden).
//! - Bounds: a distinct count remembers at most [`MAX_DISTINCT`] values; past that new
//!   values are not recorded (a merge past it keeps the lowest in canonical JSON order), so
//!   the count stays at 10,000 and reads as "at least". A
//!   window keeps at most [`MAX_SAMPLES`] samples; past that the oldest are dropped early,
//!   so a window busier than that under-counts.
//! - Changing a spec (function, event, property or window) under the same name restarts
//!   that aggregate from scratch: its old state is ignored and replaced on the next
//!   matching event. History is replayed by the service, not here: at start-up it
//!   backfills new and changed aggregates from each profile's stored timeline
//!   (`service::aggregates`).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use prost_types::value::Kind;
use prost_types::{Struct, Value};
use serde::{Deserialize, Deserializer};
use waymark_kit::time::micros;
use waymark_proto::common::v1::{Event, EventType};
use waymark_proto::json::value_to_json;

use crate::model::event_name;

/// Distinct values remembered per aggregate.
pub const MAX_DISTINCT: usize = 10_000;
/// Samples kept per windowed aggregate.
pub const MAX_SAMPLES: usize = 10_000;
/// The longest aggregate name.
const MAX_NAME: usize = 64;

/// What an aggregate computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Function {
    Count,
    Sum,
    Min,
    Max,
    First,
    Last,
    DistinctCount,
}

/// One configured aggregate, e.g.
/// `{ name = "orders_30d", event = "Order Completed", function = "count", window_secs = 2592000 }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateSpec {
    /// The key in `ComputedTraits.aggregates`.
    pub name: String,
    /// The event name to match.
    pub event: String,
    /// Dotted path into the properties; None to count events.
    #[serde(default)]
    pub property: Option<String>,
    pub function: Function,
    /// A sliding window over event time (`window_secs`); None for all time.
    #[serde(default, rename = "window_secs", deserialize_with = "window_secs")]
    pub window: Option<Duration>,
}

fn window_secs<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    Ok(Option::<u64>::deserialize(d)?.map(Duration::from_secs))
}

/// A spec that cannot work, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("aggregate {spec}: {problem}")]
pub struct SpecError {
    /// The spec's name, or `#index` in the list when it has none.
    pub spec: String,
    pub problem: String,
}

impl AggregateSpec {
    /// Checks the spec on its own.
    pub fn validate(&self) -> Result<(), SpecError> {
        let fail = |problem: &str| {
            Err(SpecError {
                spec: format!("{:?}", self.name),
                problem: problem.to_owned(),
            })
        };
        if self.name.is_empty() {
            return fail("the name is empty");
        }
        // The name is read as a field in segment conditions: computed.aggregates.orders_30d.
        if self.name.len() > MAX_NAME
            || self.name.starts_with(|c: char| c.is_ascii_digit())
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return fail("the name must be 1-64 letters, digits or `_`, not starting with a digit");
        }
        if self.event.trim().is_empty() {
            return fail("the event name is empty");
        }
        match &self.property {
            None if self.function != Function::Count => {
                return fail("this function needs a property");
            }
            Some(path) if path.split('.').any(str::is_empty) => {
                return fail("the property path has an empty segment");
            }
            _ => {}
        }
        if self.window == Some(Duration::ZERO) {
            return fail("the window must be longer than 0 seconds");
        }
        Ok(())
    }

    /// Identifies what the state was computed for (`function|event|property|window in
    /// microseconds`), so a changed spec starts afresh; stored to tell, at start-up, which
    /// aggregates are new or changed and need their backfill.
    pub fn fingerprint(&self) -> String {
        format!(
            "{:?}|{}|{}|{}",
            self.function,
            self.event,
            self.property.as_deref().unwrap_or(""),
            self.window.map_or(0, |w| w.as_micros()),
        )
    }

    /// What `event` contributes: None when it does not match, Some(None) for a bare count.
    fn input(&self, event: &Event) -> Option<Option<Value>> {
        if event_name(event) != self.event {
            return None;
        }
        let Some(path) = &self.property else {
            return Some(None);
        };
        let source = match event.r#type() {
            EventType::Identify | EventType::Group => event.traits.as_ref(),
            _ => event.properties.as_ref(),
        };
        let value = lookup(source?, path)?;
        match self.function {
            Function::Sum | Function::Min | Function::Max => Some(Some(num(numeric(value)?))),
            _ => Some(Some(value.clone())),
        }
    }
}

/// Validates every spec and that no two share a name.
pub fn validate(specs: &[AggregateSpec]) -> Result<(), SpecError> {
    let mut names = HashSet::new();
    for (i, spec) in specs.iter().enumerate() {
        spec.validate().map_err(|mut e| {
            if spec.name.is_empty() {
                e.spec = format!("#{i}");
            }
            e
        })?;
        if !names.insert(spec.name.as_str()) {
            return Err(SpecError {
                spec: format!("{:?}", spec.name),
                problem: "the name is used by another aggregate".into(),
            });
        }
    }
    Ok(())
}

/// Every aggregate's state, by name.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AggregateState {
    #[prost(map = "string, message", tag = "1")]
    pub aggregates: HashMap<String, Accumulator>,
}

/// One aggregate's state; only the fields its function (and window) needs are used.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Accumulator {
    /// The spec it was computed for (see `AggregateSpec::key`).
    #[prost(string, tag = "1")]
    pub spec: String,
    #[prost(uint64, tag = "2")]
    pub count: u64,
    #[prost(double, tag = "3")]
    pub sum: f64,
    #[prost(double, optional, tag = "4")]
    pub min: Option<f64>,
    #[prost(double, optional, tag = "5")]
    pub max: Option<f64>,
    #[prost(message, optional, tag = "6")]
    pub first: Option<Sample>,
    #[prost(message, optional, tag = "7")]
    pub last: Option<Sample>,
    /// Distinct values as canonical JSON, sorted.
    #[prost(string, repeated, tag = "8")]
    pub distinct: Vec<String>,
    /// Windowed aggregates: the contributing events, oldest first.
    #[prost(message, repeated, tag = "9")]
    pub samples: Vec<Sample>,
}

/// A value at an event time.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Sample {
    #[prost(int64, tag = "1")]
    pub at_us: i64,
    /// Unset for a bare count.
    #[prost(message, optional, tag = "2")]
    pub value: Option<Value>,
}

/// Folds `event` into every aggregate it matches.
pub fn observe(state: &mut AggregateState, specs: &[AggregateSpec], event: &Event) {
    let Some(at_us) = event.timestamp.or(event.received_at).as_ref().map(micros) else {
        return;
    };
    for spec in specs {
        let Some(value) = spec.input(event) else {
            continue;
        };
        let acc = accumulator(state, spec);
        let sample = Sample { at_us, value };
        if spec.window.is_some() {
            insert_sample(&mut acc.samples, sample);
            continue;
        }
        let number = sample.value.as_ref().and_then(numeric);
        match spec.function {
            Function::Count => acc.count += 1,
            Function::Sum => acc.sum += number.unwrap_or_default(),
            Function::Min => acc.min = min(acc.min, number),
            Function::Max => acc.max = max(acc.max, number),
            Function::First => {
                if acc.first.as_ref().is_none_or(|f| at_us < f.at_us) {
                    acc.first = Some(sample);
                }
            }
            Function::Last => {
                if acc.last.as_ref().is_none_or(|l| at_us >= l.at_us) {
                    acc.last = Some(sample);
                }
            }
            Function::DistinctCount => {
                if let Some(value) = &sample.value {
                    insert_distinct(&mut acc.distinct, canonical(value));
                }
            }
        }
    }
}

/// Folds a merged profile's state into the survivor's.
pub fn merge(into: &mut AggregateState, other: &AggregateState, specs: &[AggregateSpec]) {
    for spec in specs {
        let Some(theirs) = other
            .aggregates
            .get(&spec.name)
            .filter(|a| a.spec == spec.fingerprint())
        else {
            continue;
        };
        let ours = accumulator(into, spec);
        ours.count += theirs.count;
        ours.sum += theirs.sum;
        ours.min = min(ours.min, theirs.min);
        ours.max = max(ours.max, theirs.max);
        if let Some(first) = &theirs.first
            && ours.first.as_ref().is_none_or(|f| first.at_us < f.at_us)
        {
            ours.first = Some(first.clone());
        }
        if let Some(last) = &theirs.last
            && ours.last.as_ref().is_none_or(|l| last.at_us > l.at_us)
        {
            ours.last = Some(last.clone());
        }
        if !theirs.distinct.is_empty() {
            ours.distinct.extend(theirs.distinct.iter().cloned());
            ours.distinct.sort_unstable();
            ours.distinct.dedup();
            ours.distinct.truncate(MAX_DISTINCT);
        }
        if !theirs.samples.is_empty() {
            // Stable: at equal times the survivor's samples stay first.
            ours.samples.extend(theirs.samples.iter().cloned());
            ours.samples.sort_by_key(|s| s.at_us);
            let excess = ours.samples.len().saturating_sub(MAX_SAMPLES);
            ours.samples.drain(..excess);
        }
    }
}

/// Each aggregate's value as of `now_us`, by name.
pub fn values(
    state: &AggregateState,
    specs: &[AggregateSpec],
    now_us: i64,
) -> HashMap<String, Value> {
    let mut out = HashMap::new();
    for spec in specs {
        let Some(acc) = state
            .aggregates
            .get(&spec.name)
            .filter(|a| a.spec == spec.fingerprint())
        else {
            continue;
        };
        let value = match spec.window {
            Some(window) => windowed(spec.function, live(&acc.samples, now_us, window)),
            None => match spec.function {
                Function::Count => Some(num(acc.count as f64)),
                Function::Sum => Some(num(acc.sum)),
                Function::Min => acc.min.map(num),
                Function::Max => acc.max.map(num),
                Function::First => acc.first.as_ref().and_then(|s| s.value.clone()),
                Function::Last => acc.last.as_ref().and_then(|s| s.value.clone()),
                Function::DistinctCount => Some(num(acc.distinct.len() as f64)),
            },
        };
        if let Some(value) = value {
            out.insert(spec.name.clone(), value);
        }
    }
    out
}

/// Drops window samples that expired by `now_us` and the state of aggregates that are no
/// longer configured (or were configured differently).
pub fn prune(state: &mut AggregateState, specs: &[AggregateSpec], now_us: i64) {
    state.aggregates.retain(|name, acc| {
        let Some(spec) = specs.iter().find(|s| &s.name == name) else {
            return false;
        };
        if acc.spec != spec.fingerprint() {
            return false;
        }
        if let Some(window) = spec.window {
            let expired = acc.samples.len() - live(&acc.samples, now_us, window).len();
            acc.samples.drain(..expired);
        }
        true
    });
}

/// The accumulator of `spec`, fresh when missing or computed for another spec.
fn accumulator<'a>(state: &'a mut AggregateState, spec: &AggregateSpec) -> &'a mut Accumulator {
    let key = spec.fingerprint();
    let acc = state.aggregates.entry(spec.name.clone()).or_default();
    if acc.spec != key {
        *acc = Accumulator {
            spec: key,
            ..Accumulator::default()
        };
    }
    acc
}

/// The samples inside the window ending at `now_us`.
fn live(samples: &[Sample], now_us: i64, window: Duration) -> &[Sample] {
    let cutoff = now_us.saturating_sub(i64::try_from(window.as_micros()).unwrap_or(i64::MAX));
    &samples[samples.partition_point(|s| s.at_us <= cutoff)..]
}

fn windowed(function: Function, samples: &[Sample]) -> Option<Value> {
    // Sum, min and max only ever store numbers.
    let numbers = || {
        samples
            .iter()
            .filter_map(|s| match s.value.as_ref()?.kind.as_ref()? {
                Kind::NumberValue(n) => Some(*n),
                _ => None,
            })
    };
    match function {
        Function::Count => Some(num(samples.len() as f64)),
        Function::Sum => Some(num(numbers().sum())),
        Function::Min => numbers().reduce(f64::min).map(num),
        Function::Max => numbers().reduce(f64::max).map(num),
        Function::First => samples.first()?.value.clone(),
        Function::Last => samples.last()?.value.clone(),
        Function::DistinctCount => {
            let distinct: HashSet<String> = samples
                .iter()
                .filter_map(|s| s.value.as_ref().map(canonical))
                .collect();
            Some(num(distinct.len() as f64))
        }
    }
}

/// Inserts by time (after samples of the same time), dropping the oldest past the bound.
fn insert_sample(samples: &mut Vec<Sample>, sample: Sample) {
    let at = samples.partition_point(|s| s.at_us <= sample.at_us);
    samples.insert(at, sample);
    if samples.len() > MAX_SAMPLES {
        samples.remove(0);
    }
}

fn insert_distinct(distinct: &mut Vec<String>, value: String) {
    if let Err(at) = distinct.binary_search(&value)
        && distinct.len() < MAX_DISTINCT
    {
        distinct.insert(at, value);
    }
}

fn min(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn max(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// The non-null value at a dotted path.
fn lookup<'a>(properties: &'a Struct, path: &str) -> Option<&'a Value> {
    let mut segments = path.split('.');
    let mut value = properties.fields.get(segments.next()?)?;
    for segment in segments {
        match value.kind.as_ref()? {
            Kind::StructValue(inner) => value = inner.fields.get(segment)?,
            _ => return None,
        }
    }
    match value.kind {
        None | Some(Kind::NullValue(_)) => None,
        Some(_) => Some(value),
    }
}

/// A finite number, also from a numeric string.
fn numeric(value: &Value) -> Option<f64> {
    let n = match value.kind.as_ref()? {
        Kind::NumberValue(n) => *n,
        Kind::StringValue(s) => s.trim().parse().ok()?,
        _ => return None,
    };
    n.is_finite().then_some(n)
}

fn num(n: f64) -> Value {
    Value {
        kind: Some(Kind::NumberValue(n)),
    }
}

/// Equal values give equal strings: 1 and 1.0 are one value, "1" another.
fn canonical(value: &Value) -> String {
    value_to_json(value).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use waymark_proto::json::struct_from_json;

    const DAY_US: i64 = 86_400_000_000;

    fn specs(json: serde_json::Value) -> Vec<AggregateSpec> {
        serde_json::from_value(json).unwrap()
    }

    fn spec(
        name: &str,
        function: &str,
        property: Option<&str>,
        window_days: Option<u64>,
    ) -> AggregateSpec {
        specs(serde_json::json!([{
            "name": name,
            "event": "Order Completed",
            "function": function,
            "property": property,
            "window_secs": window_days.map(|d| d * 86_400),
        }]))
        .remove(0)
    }

    fn order(at_us: i64, properties: serde_json::Value) -> Event {
        let serde_json::Value::Object(m) = properties else {
            unreachable!()
        };
        let mut e = Event {
            event: "Order Completed".into(),
            properties: Some(struct_from_json(m)),
            timestamp: Some(waymark_kit::time::from_micros(at_us)),
            ..Event::default()
        };
        e.set_type(EventType::Track);
        e
    }

    fn json(values: &HashMap<String, Value>) -> serde_json::Value {
        serde_json::Value::Object(
            values
                .iter()
                .map(|(k, v)| (k.clone(), value_to_json(v)))
                .collect(),
        )
    }

    fn all_functions(window_days: Option<u64>) -> Vec<AggregateSpec> {
        let p = Some("order.total");
        vec![
            spec("count", "count", None, window_days),
            spec("sum", "sum", p, window_days),
            spec("min", "min", p, window_days),
            spec("max", "max", p, window_days),
            spec("first", "first", Some("sku"), window_days),
            spec("last", "last", Some("sku"), window_days),
            spec("skus", "distinct_count", Some("sku"), window_days),
        ]
    }

    #[test]
    fn specs_load_from_config_and_bad_ones_are_named() {
        let loaded = specs(serde_json::json!([
            {"name": "orders_30d", "event": "Order Completed", "function": "count", "window_secs": 2_592_000},
            {"name": "revenue", "event": "Order Completed", "property": "revenue", "function": "sum"},
        ]));
        assert_eq!(loaded[0].window, Some(Duration::from_secs(2_592_000)));
        assert_eq!(loaded[1].function, Function::Sum);
        assert_eq!(validate(&loaded), Ok(()));
        let typo =
            serde_json::json!([{"name": "x", "event": "E", "function": "count", "windows": 1}]);
        assert!(serde_json::from_value::<Vec<AggregateSpec>>(typo).is_err());
        let bad_function = serde_json::json!([{"name": "x", "event": "E", "function": "avg"}]);
        assert!(serde_json::from_value::<Vec<AggregateSpec>>(bad_function).is_err());

        let problem = |s: AggregateSpec| validate(&[loaded[0].clone(), s]).unwrap_err();
        let mut unnamed = loaded[0].clone();
        unnamed.name.clear();
        assert_eq!(
            problem(unnamed).to_string(),
            "aggregate #1: the name is empty"
        );
        let mut spaced = loaded[0].clone();
        spaced.name = "orders 30d".into();
        assert!(problem(spaced).problem.contains("letters, digits"));
        let e = problem(spec("revenue", "sum", None, None));
        assert_eq!(
            e.to_string(),
            "aggregate \"revenue\": this function needs a property"
        );
        assert!(
            problem(spec("a", "max", Some("order..total"), None))
                .problem
                .contains("empty segment")
        );
        assert!(
            problem(spec("a", "count", None, Some(0)))
                .problem
                .contains("window")
        );
        let mut no_event = spec("a", "count", None, None);
        no_event.event = " ".into();
        assert!(problem(no_event).problem.contains("event"));
        let e = problem(spec("orders_30d", "count", None, None));
        assert_eq!(
            e.to_string(),
            "aggregate \"orders_30d\": the name is used by another aggregate"
        );
    }

    #[test]
    fn every_function_over_all_time() {
        let specs = all_functions(None);
        let mut state = AggregateState::default();
        observe(
            &mut state,
            &specs,
            &order(20, serde_json::json!({"order": {"total": 30}, "sku": "B"})),
        );
        observe(
            &mut state,
            &specs,
            &order(
                30,
                serde_json::json!({"order": {"total": "12.5"}, "sku": "C"}),
            ),
        );
        // A late, older event: the new first.
        observe(
            &mut state,
            &specs,
            &order(10, serde_json::json!({"order": {"total": 7}, "sku": "A"})),
        );
        // Not a number: counted, but not summed.
        observe(
            &mut state,
            &specs,
            &order(
                25,
                serde_json::json!({"order": {"total": "n/a"}, "sku": "B"}),
            ),
        );
        let mut other = order(40, serde_json::json!({"order": {"total": 1000}}));
        other.event = "Order Refunded".into();
        observe(&mut state, &specs, &other);
        assert_eq!(
            json(&values(&state, &specs, 0)),
            serde_json::json!({
                "count": 4, "sum": 49.5, "min": 7, "max": 30,
                "first": "A", "last": "C", "skus": 3,
            })
        );
    }

    #[test]
    fn an_aggregate_appears_once_an_event_contributed() {
        let specs = all_functions(None);
        let mut state = AggregateState::default();
        assert!(values(&state, &specs, 0).is_empty());
        observe(
            &mut state,
            &specs,
            &order(1, serde_json::json!({"sku": null})),
        );
        assert_eq!(
            json(&values(&state, &specs, 0)),
            serde_json::json!({"count": 1})
        );
        let mut timeless = order(1, serde_json::json!({}));
        timeless.timestamp = None;
        observe(&mut state, &specs, &timeless);
        assert_eq!(
            json(&values(&state, &specs, 0)),
            serde_json::json!({"count": 1})
        );
    }

    #[test]
    fn windows_slide_with_now() {
        let specs = all_functions(Some(30));
        let mut state = AggregateState::default();
        observe(
            &mut state,
            &specs,
            &order(
                DAY_US,
                serde_json::json!({"order": {"total": 5}, "sku": "A"}),
            ),
        );
        observe(
            &mut state,
            &specs,
            &order(
                10 * DAY_US,
                serde_json::json!({"order": {"total": 20}, "sku": "B"}),
            ),
        );
        observe(
            &mut state,
            &specs,
            &order(
                5 * DAY_US,
                serde_json::json!({"order": {"total": 1}, "sku": "A"}),
            ),
        );
        assert_eq!(
            json(&values(&state, &specs, 20 * DAY_US)),
            serde_json::json!({
                "count": 3, "sum": 26, "min": 1, "max": 20,
                "first": "A", "last": "B", "skus": 2,
            })
        );
        // Day 1 leaves the window on day 31: the value drops with no new event.
        assert_eq!(
            json(&values(&state, &specs, 31 * DAY_US)),
            serde_json::json!({
                "count": 2, "sum": 21, "min": 1, "max": 20,
                "first": "A", "last": "B", "skus": 2,
            })
        );
        assert_eq!(
            json(&values(&state, &specs, 41 * DAY_US)),
            serde_json::json!({"count": 0, "sum": 0, "skus": 0})
        );
    }

    #[test]
    fn prune_drops_expired_samples_and_unconfigured_aggregates() {
        let specs = vec![
            spec("orders_30d", "count", None, Some(30)),
            spec("n", "count", None, None),
        ];
        let mut state = AggregateState::default();
        for day in [1, 2, 40] {
            observe(
                &mut state,
                &specs,
                &order(day * DAY_US, serde_json::json!({})),
            );
        }
        let before = values(&state, &specs, 45 * DAY_US);
        prune(&mut state, &specs, 45 * DAY_US);
        assert_eq!(state.aggregates["orders_30d"].samples.len(), 1);
        assert_eq!(values(&state, &specs, 45 * DAY_US), before);
        prune(&mut state, &specs[1..], 45 * DAY_US);
        assert_eq!(state.aggregates.keys().collect::<Vec<_>>(), ["n"]);
    }

    #[test]
    fn a_changed_spec_starts_afresh() {
        let mut specs = vec![spec("orders", "count", None, None)];
        let mut state = AggregateState::default();
        observe(
            &mut state,
            &specs,
            &order(1, serde_json::json!({"revenue": 10})),
        );
        specs[0] = spec("orders", "sum", Some("revenue"), None);
        assert!(values(&state, &specs, 0).is_empty(), "a count is no sum");
        observe(
            &mut state,
            &specs,
            &order(2, serde_json::json!({"revenue": 4})),
        );
        assert_eq!(
            json(&values(&state, &specs, 0)),
            serde_json::json!({"orders": 4})
        );
    }

    #[test]
    fn merges_combine_both_profiles() {
        for window in [None, Some(30)] {
            let specs = all_functions(window);
            let (mut ours, mut theirs) = (AggregateState::default(), AggregateState::default());
            observe(
                &mut ours,
                &specs,
                &order(20, serde_json::json!({"order": {"total": 3}, "sku": "B"})),
            );
            observe(
                &mut theirs,
                &specs,
                &order(10, serde_json::json!({"order": {"total": 9}, "sku": "A"})),
            );
            observe(
                &mut theirs,
                &specs,
                &order(30, serde_json::json!({"order": {"total": -1}, "sku": "B"})),
            );
            merge(&mut ours, &theirs, &specs);
            assert_eq!(
                json(&values(&ours, &specs, 40)),
                serde_json::json!({
                    "count": 3, "sum": 11, "min": -1, "max": 9,
                    "first": "A", "last": "B", "skus": 2,
                }),
                "window {window:?}"
            );
        }
        // Only what the specs name, computed for the same spec, is merged.
        let specs = vec![spec("n", "count", None, None)];
        let mut theirs = AggregateState::default();
        observe(
            &mut theirs,
            &[spec("n", "sum", Some("x"), None)],
            &order(1, serde_json::json!({"x": 1})),
        );
        let mut ours = AggregateState::default();
        merge(&mut ours, &theirs, &specs);
        assert!(ours.aggregates.is_empty());
    }

    #[test]
    fn distinct_values_and_window_samples_are_bounded() {
        let specs = vec![
            spec("skus", "distinct_count", Some("sku"), None),
            spec("recent", "count", None, Some(365)),
        ];
        let mut state = AggregateState::default();
        let n = MAX_DISTINCT as i64 + 5;
        for i in 0..n {
            observe(
                &mut state,
                &specs,
                &order(i + 1, serde_json::json!({"sku": i})),
            );
        }
        let v = values(&state, &specs, n);
        assert_eq!(json(&v)["skus"], MAX_DISTINCT);
        assert_eq!(json(&v)["recent"], MAX_SAMPLES);
        let samples = &state.aggregates["recent"].samples;
        assert_eq!(samples[0].at_us, 6, "the oldest went first");
        // A late sample older than all kept ones is dropped straight away.
        observe(&mut state, &specs, &order(1, serde_json::json!({"sku": 0})));
        assert_eq!(state.aggregates["recent"].samples[0].at_us, 6);
        // Merging two full states stays within the bounds.
        let copy = state.clone();
        merge(&mut state, &copy, &specs);
        assert_eq!(state.aggregates["skus"].distinct.len(), MAX_DISTINCT);
        assert_eq!(state.aggregates["recent"].samples.len(), MAX_SAMPLES);
    }

    #[test]
    fn distinct_values_keep_their_type_and_identify_events_use_traits() {
        let specs = vec![AggregateSpec {
            name: "plans".into(),
            event: "Identify".into(),
            property: Some("plan".into()),
            function: Function::DistinctCount,
            window: None,
        }];
        let mut state = AggregateState::default();
        for plan in [
            serde_json::json!(1),
            serde_json::json!(1.0),
            serde_json::json!("1"),
        ] {
            let serde_json::Value::Object(m) = serde_json::json!({"plan": plan}) else {
                unreachable!()
            };
            let mut e = Event {
                traits: Some(struct_from_json(m)),
                received_at: Some(waymark_kit::time::from_micros(1)),
                ..Event::default()
            };
            e.set_type(EventType::Identify);
            observe(&mut state, &specs, &e);
        }
        assert_eq!(
            json(&values(&state, &specs, 0)),
            serde_json::json!({"plans": 2})
        );
    }

    #[test]
    fn the_state_round_trips_as_bytes() {
        let specs = all_functions(Some(30));
        let mut state = AggregateState::default();
        observe(
            &mut state,
            &specs,
            &order(5, serde_json::json!({"order": {"total": 2}, "sku": "A"})),
        );
        let decoded = AggregateState::decode(state.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded, state);
    }
}
