//! Funnels defined by the query: steps, ordering, window, exclusions, properties held
//! constant, counting and breakdown, evaluated per customer over their ordered events.

use std::collections::HashMap;
use std::time::Instant;

use rustc_hash::FxHashMap;

use waymark_proto::analytics::v1::{
    Breakdown, FunnelCounting, FunnelGroup, FunnelOrder, FunnelStep, GetFunnelRequest,
    GetFunnelResponse, breakdown,
};

use crate::error::AnalyticsError;
use crate::matcher::{self, Matcher, Memo};
use crate::model::{Ev, Model, Prop, Slot, Val};
use crate::scan::{self, Budget};
use crate::stats;

/// The most steps a funnel may have (one bit each).
pub const MAX_STEPS: usize = 64;
/// The most exclusions (one bit each).
const MAX_EXCLUSIONS: usize = 64;
/// The default conversion window.
const DEFAULT_WINDOW_US: i64 = 30 * 86_400_000_000;
/// Breakdown groups reported when the request does not say.
const DEFAULT_GROUPS: usize = 25;
/// Distinct breakdown values one query may hold before it is refused.
const MAX_DISTINCT_GROUPS: usize = 100_000;

/// A group of a breakdown, before it is named: a value's key.
type GroupKey = (u8, u64);

/// What the breakdown reads.
enum By {
    Nothing,
    Property(Option<u32>),
    Channel,
    Segments(Vec<Option<u32>>),
    /// root → the arm's index in `arms`.
    Variant(HashMap<u32, u32>, Vec<String>),
}

/// A compiled funnel.
pub struct Funnel {
    steps: Vec<Matcher>,
    names: Vec<String>,
    order: FunnelOrder,
    counting: FunnelCounting,
    window_us: i64,
    exclusions: Vec<(Matcher, usize, usize)>,
    hold: Vec<Option<u32>>,
    range: (i64, i64),
    by: By,
    /// root → entry times of its enrollments, for enrollment counting.
    enrollments: HashMap<u32, Vec<i64>>,
    limit: usize,
    /// By interned event name: the steps and exclusions without a condition it matches,
    /// and whether one with a condition names it.
    by_name: Vec<Mark>,
    /// Whose properties counting reads beyond the events a condition reads.
    reads: Reads,
}

/// The hits whose properties counting reads, besides those a condition reads.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reads {
    Nothing,
    /// Those that may start an attempt: a breakdown by property reads its first event's.
    Starts,
    /// Every hit: held properties are compared on every step.
    All,
}

/// The range's bounds in microseconds, open ends as the extremes.
pub fn range_of(range: Option<&waymark_proto::analytics::v1::TimeRange>) -> (i64, i64) {
    let start = range
        .and_then(|r| r.start.as_ref())
        .map(waymark_kit::time::micros)
        .unwrap_or(i64::MIN);
    let end = range
        .and_then(|r| r.end.as_ref())
        .map(waymark_kit::time::micros)
        .unwrap_or(i64::MAX);
    (start, end)
}

/// A duration field (`7d`), or `default` when empty.
pub fn duration_field(text: &str, field: &str, default: i64) -> Result<i64, AnalyticsError> {
    if text.trim().is_empty() {
        return Ok(default);
    }
    let d =
        waymark_kit::time::parse_duration(text).map_err(|e| AnalyticsError::invalid(field, e))?;
    if d.is_zero() {
        return Err(AnalyticsError::invalid(field, "must be longer than zero"));
    }
    Ok(waymark_kit::time::duration_micros(d))
}

impl Funnel {
    /// Checks and compiles `req` against the names `model` knows; every problem is
    /// reported with its field.
    pub fn compile(model: &Model, req: &GetFunnelRequest) -> Result<Funnel, AnalyticsError> {
        let mut problems = Vec::new();
        let mut note = |r: Result<(), AnalyticsError>| {
            if let Err(AnalyticsError::Invalid(p)) = r {
                problems.extend(p);
            }
        };
        if req.steps.len() < 2 {
            note(Err(AnalyticsError::invalid(
                "steps",
                "needs at least two steps",
            )));
        }
        if req.steps.len() > MAX_STEPS {
            note(Err(AnalyticsError::invalid(
                "steps",
                format!(
                    "has {} steps; at most {MAX_STEPS} are allowed",
                    req.steps.len()
                ),
            )));
        }
        let mut steps = Vec::new();
        for (i, s) in req.steps.iter().enumerate() {
            match Matcher::compile(model, s, &format!("steps[{i}]")) {
                Ok(m) => steps.push(m),
                Err(e) => note(Err(e)),
            }
        }
        let order = FunnelOrder::try_from(req.order).unwrap_or(FunnelOrder::Unspecified);
        if FunnelOrder::try_from(req.order).is_err() {
            note(Err(AnalyticsError::invalid(
                "order",
                "is not a FunnelOrder",
            )));
        }
        let counting =
            FunnelCounting::try_from(req.counting).unwrap_or(FunnelCounting::Unspecified);
        if FunnelCounting::try_from(req.counting).is_err() {
            note(Err(AnalyticsError::invalid(
                "counting",
                "is not a FunnelCounting",
            )));
        }
        let window_us = match duration_field(&req.window, "window", DEFAULT_WINDOW_US) {
            Ok(w) => w,
            Err(e) => {
                note(Err(e));
                0
            }
        };
        if req.exclusions.len() > MAX_EXCLUSIONS {
            note(Err(AnalyticsError::invalid(
                "exclusions",
                format!("at most {MAX_EXCLUSIONS} are allowed"),
            )));
        }
        let mut exclusions = Vec::new();
        for (i, x) in req.exclusions.iter().enumerate() {
            let field = format!("exclusions[{i}]");
            let from = x.from_step as usize;
            let to = x.to_step as usize;
            if to <= from || to >= req.steps.len() {
                note(Err(AnalyticsError::invalid(
                    format!("{field}.to_step"),
                    format!(
                        "must be after from_step ({from}) and a step of the funnel (0 to {})",
                        req.steps.len().saturating_sub(1)
                    ),
                )));
                continue;
            }
            match x.event.as_ref() {
                None => note(Err(AnalyticsError::invalid(
                    format!("{field}.event"),
                    "is required",
                ))),
                Some(m) => match Matcher::compile(model, m, &format!("{field}.event")) {
                    Ok(m) => exclusions.push((m, from, to)),
                    Err(e) => note(Err(e)),
                },
            }
        }
        for (i, h) in req.hold_constant.iter().enumerate() {
            if h.trim().is_empty() {
                note(Err(AnalyticsError::invalid(
                    format!("hold_constant[{i}]"),
                    "is empty",
                )));
            }
        }
        let hold: Vec<Option<u32>> = req
            .hold_constant
            .iter()
            .map(|h| model.keys.get(h))
            .collect();
        let mut enrollments: HashMap<u32, Vec<i64>> = HashMap::new();
        if counting == FunnelCounting::Enrollments {
            if req.journey_id.is_empty() {
                note(Err(AnalyticsError::invalid(
                    "journey_id",
                    "is required to count enrollments",
                )));
            }
            if let Some(journey) = model.journeys.get(&req.journey_id) {
                for e in journey.values() {
                    if let Some(first) = e.steps.first() {
                        let root = model.slot(e.profile).root;
                        enrollments.entry(root).or_default().push(first.at_us);
                    }
                }
                for entries in enrollments.values_mut() {
                    entries.sort_unstable();
                }
            }
        }
        let by = match by(model, req.breakdown.as_ref()) {
            Ok(by) => by,
            Err(e) => {
                note(Err(e));
                By::Nothing
            }
        };
        if !problems.is_empty() {
            return Err(AnalyticsError::Invalid(problems));
        }
        let mut by_name = vec![Mark::default(); model.names.len()];
        for (i, step) in steps.iter().enumerate() {
            if let Some(mark) = step.name().and_then(|n| by_name.get_mut(n as usize)) {
                if step.has_condition() {
                    mark.conditioned = true;
                } else {
                    mark.steps |= 1 << i;
                }
            }
        }
        for (i, (x, _, _)) in exclusions.iter().enumerate() {
            if let Some(mark) = x.name().and_then(|n| by_name.get_mut(n as usize)) {
                if x.has_condition() {
                    mark.conditioned = true;
                } else {
                    mark.exclusions |= 1 << i;
                }
            }
        }
        Ok(Funnel {
            by_name,
            reads: if !hold.is_empty() {
                Reads::All
            } else if matches!(by, By::Property(_)) {
                Reads::Starts
            } else {
                Reads::Nothing
            },
            names: req.steps.iter().map(|s| s.event.clone()).collect(),
            steps,
            order,
            counting,
            window_us,
            exclusions,
            hold,
            range: range_of(req.range.as_ref()),
            by,
            enrollments,
            limit: if req.breakdown_limit == 0 {
                DEFAULT_GROUPS
            } else {
                req.breakdown_limit as usize
            },
        })
    }

    /// Runs the funnel over every customer.
    pub fn run(&self, model: &Model, budget: &Budget) -> Result<GetFunnelResponse, AnalyticsError> {
        let started = Instant::now();
        let parts = scan::blocks(
            model,
            budget,
            || Partial::new(self),
            |acc, roots| self.block(model, budget, acc, roots),
        )?;
        let mut all = Partial::new(self);
        for p in parts {
            all.absorb(p);
        }
        if self.one_group_each() {
            for agg in all.groups.values() {
                all.total.absorb_copy(agg);
            }
        }
        let group_label = |key: GroupKey| self.label(model, key);
        let mut groups: Vec<(String, Agg)> = all
            .groups
            .into_iter()
            .map(|(k, agg)| (group_label(k), agg))
            .collect();
        groups.sort_by(|a, b| b.1.reached[0].cmp(&a.1.reached[0]).then(a.0.cmp(&b.0)));
        groups.truncate(self.limit);
        let has_groups = !matches!(self.by, By::Nothing);
        let mut jobs = vec![(String::new(), all.total)];
        if has_groups {
            jobs.extend(groups);
        }
        let mut reports = scan::map_parallel(
            jobs,
            |(_, agg)| agg.values(),
            |(g, agg)| self.report(g, agg),
        )
        .into_iter();
        Ok(GetFunnelResponse {
            total: reports.next(),
            groups: reports.collect(),
            customers_scanned: all.customers,
            events_scanned: all.events,
            took_micros: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        })
    }

    /// Whether every attempt falls in exactly one breakdown group, so the total is the
    /// groups' sum and need not be counted on its own.
    fn one_group_each(&self) -> bool {
        matches!(self.by, By::Property(_) | By::Channel | By::Variant(..))
    }

    fn label(&self, model: &Model, key: GroupKey) -> String {
        if key.0 == NONE_GROUP {
            return "(none)".to_owned();
        }
        match &self.by {
            By::Nothing => String::new(),
            By::Property(_) => matcher::label(model, val_of_key(key)),
            By::Channel => waymark_profile::segment::channel_name(key.1 as i32),
            By::Segments(_) => model.segment_ids.name(key.1 as u32).to_owned(),
            By::Variant(_, arms) => arms.get(key.1 as usize).cloned().unwrap_or_default(),
        }
    }

    fn report(&self, group: String, agg: Agg) -> FunnelGroup {
        let first = agg.reached.first().copied().unwrap_or(0);
        let steps = agg
            .times
            .into_iter()
            .enumerate()
            .map(|(i, mut times)| {
                let reached = agg.reached[i];
                let previous = if i == 0 { reached } else { agg.reached[i - 1] };
                let ratio = |n: u64, d: u64| if d == 0 { 0.0 } else { n as f64 / d as f64 };
                let dropped = previous - reached;
                FunnelStep {
                    event: self.names[i].clone(),
                    reached,
                    conversion_from_previous: if i == 0 {
                        1.0
                    } else {
                        ratio(reached, previous)
                    },
                    conversion_from_first: ratio(reached, first),
                    dropped,
                    drop_off_percent: 100.0 * ratio(dropped, previous),
                    time_to_convert: Some(stats::distribution(&mut times)),
                }
            })
            .collect();
        FunnelGroup { group, steps }
    }

    /// Counts the attempts of a block of customers. Their events are gathered first, only
    /// those a step or exclusion names, and the properties the funnel will read are loaded
    /// for the whole block at once: the loads then overlap instead of each customer
    /// waiting on its own.
    fn block<'m>(
        &self,
        model: &'m Model,
        budget: &Budget,
        acc: &mut Partial<'m>,
        roots: &[u32],
    ) -> Result<(), AnalyticsError> {
        let mut hits = std::mem::take(&mut acc.hits);
        let mut spans = std::mem::take(&mut acc.spans);
        hits.clear();
        spans.clear();
        for &root in roots {
            let start = hits.len();
            let mut span = Span {
                root,
                start,
                end: start,
                events: 0,
                in_range: false,
            };
            let members = model.members(root);
            let mut sorted = members.len() == 1;
            for &m in members {
                let slot = model.slot(m);
                let (base, recent) = model.events_of(slot);
                sorted &= base.is_empty() || recent.is_empty();
                span.events += (base.len() + recent.len()) as u64;
                span.in_range |= self.gather(model, slot, base, &mut hits);
                span.in_range |= self.gather(model, slot, recent, &mut hits);
            }
            span.end = hits.len();
            if !sorted {
                hits[start..span.end].sort_unstable_by_key(|h| (h.at, h.tie));
            }
            spans.push(span);
        }
        // Reading one property of each hit whose properties will be read starts all of the
        // block's loads from memory before the first one is waited on. Only those: the
        // others would cost memory bandwidth for nothing.
        let mut touched = 0;
        for hit in hits.iter().filter(|h| self.props_read(h)) {
            touched ^= hit.props.first().map_or(0, |p| p.key);
        }
        std::hint::black_box(touched);
        for span in &spans {
            if span.in_range {
                self.customer(model, acc, span, &mut hits[span.start..span.end])?;
            }
        }
        acc.hits = hits;
        acc.spans = spans;
        // Once per block: the budget's counter is shared by every core, and charging it
        // per customer had them fight over its cache line.
        budget.charge(std::mem::take(&mut acc.uncharged))
    }

    /// Whether counting may read `hit`'s properties.
    fn props_read(&self, hit: &Hit<'_>) -> bool {
        hit.mark.conditioned
            || match self.reads {
                Reads::Nothing => false,
                Reads::Starts => self.may_start(hit.mark.steps),
                Reads::All => true,
            }
    }

    /// Whether an event matching `steps` may start an attempt.
    fn may_start(&self, steps: u64) -> bool {
        if self.order == FunnelOrder::Any {
            steps != 0
        } else {
            steps & 1 != 0
        }
    }

    /// Appends the events of one profile's ordered `events` that a step or exclusion
    /// names (all of them for a strict funnel, where any other event breaks an attempt);
    /// returns whether any of `events` falls in the range.
    fn gather<'m>(
        &self,
        model: &'m Model,
        slot: &'m Slot,
        events: &'m [Ev],
        hits: &mut Vec<Hit<'m>>,
    ) -> bool {
        let keep_all = self.order == FunnelOrder::Strict;
        for ev in events {
            let mark = self
                .by_name
                .get(ev.name as usize)
                .copied()
                .unwrap_or_default();
            if keep_all || !mark.is_empty() {
                hits.push(Hit {
                    at: ev.at,
                    tie: ev.tie,
                    name: ev.name,
                    channel: ev.channel,
                    mark,
                    props: model.props(slot, ev),
                });
            }
        }
        let (lo, hi) = self.range;
        let first = events.partition_point(|e| e.at < lo);
        events.get(first).is_some_and(|e| e.at < hi)
    }

    /// Counts one customer's attempts over its events a step or exclusion names.
    fn customer(
        &self,
        model: &Model,
        acc: &mut Partial<'_>,
        span: &Span,
        hits: &mut [Hit<'_>],
    ) -> Result<(), AnalyticsError> {
        acc.customers += 1;
        acc.events += span.events;
        self.resolve(model, hits, &mut acc.memos);
        let mut scratch = std::mem::take(&mut acc.scratch);
        let mut groups = std::mem::take(&mut acc.group_keys);
        let mut bytes = 0;
        self.attempts(span.root, hits, &mut scratch, |start, times| {
            bytes += times.len() * 8;
            if !self.one_group_each() {
                acc.total.add(times);
            }
            groups.clear();
            self.groups_of(model, span.root, &hits[start], &mut groups);
            for g in &groups {
                acc.groups
                    .entry(*g)
                    .or_insert_with(|| Agg::new(self.steps.len()))
                    .add(times);
            }
        });
        acc.scratch = scratch;
        acc.group_keys = groups;
        if acc.groups.len() > MAX_DISTINCT_GROUPS {
            return Err(AnalyticsError::Budget(format!(
                "the breakdown has more than {MAX_DISTINCT_GROUPS} distinct values; break down by something coarser"
            )));
        }
        acc.uncharged += bytes * (1 + usize::from(!acc.groups.is_empty()));
        Ok(())
    }

    /// Runs the conditions of the steps and exclusions a hit's name has, adding the bits
    /// of those it meets; conditions run only on their own event.
    fn resolve(&self, model: &Model, hits: &mut [Hit<'_>], memos: &mut Memos) {
        let steps = self.steps.iter();
        let exclusions = self.exclusions.iter().map(|(x, _, _)| x);
        for hit in hits.iter_mut().filter(|h| h.mark.conditioned) {
            hit.mark.steps |= hit.conditions_met(model, steps.clone(), &mut memos.steps);
            hit.mark.exclusions |=
                hit.conditions_met(model, exclusions.clone(), &mut memos.exclusions);
            hit.mark.conditioned = false;
        }
    }

    /// Calls `count` with the first-step index and the step times of each attempt to
    /// count for one customer.
    fn attempts(
        &self,
        root: u32,
        hits: &[Hit<'_>],
        scratch: &mut Scratch,
        mut count: impl FnMut(usize, &[i64]),
    ) {
        let (lo, hi) = self.range;
        let can_start = |i: usize| {
            let hit = &hits[i];
            self.may_start(hit.mark.steps) && hit.at >= lo && hit.at < hi
        };
        let Scratch { times, best, held } = scratch;
        match self.counting {
            FunnelCounting::Unspecified | FunnelCounting::UniqueCustomers => {
                // Once an attempt reaches the furthest any can, later starts cannot do
                // better: a very active customer costs one pass here, not one per start.
                let furthest = self.furthest_reachable(hits);
                let mut best_start = None;
                for i in (0..hits.len()).filter(|&i| can_start(i)) {
                    if !self.attempt(hits, i, held, times) {
                        continue;
                    }
                    if best_start.is_none() || times.len() > best.len() {
                        best.clone_from(times);
                        best_start = Some(i);
                        if best.len() >= furthest {
                            break;
                        }
                    }
                }
                if let Some(start) = best_start {
                    count(start, best);
                }
            }
            FunnelCounting::Totals => {
                let mut free_after = i64::MIN;
                for i in (0..hits.len()).filter(|&i| can_start(i)) {
                    let at = hits[i].at;
                    if at <= free_after || !self.attempt(hits, i, held, times) {
                        continue;
                    }
                    free_after = if times.len() == self.steps.len() {
                        times[times.len() - 1]
                    } else {
                        at.saturating_add(self.window_us)
                    };
                    count(i, times);
                }
            }
            FunnelCounting::Enrollments => {
                let Some(entries) = self.enrollments.get(&root) else {
                    return;
                };
                for &entry in entries.iter().filter(|&&entry| entry >= lo && entry < hi) {
                    let first = hits.partition_point(|h| h.at < entry);
                    let Some(start) = (first..hits.len()).find(|&i| hits[i].mark.steps & 1 != 0)
                    else {
                        continue;
                    };
                    if self.attempt(hits, start, held, times) {
                        count(start, times);
                    }
                }
            }
        }
    }

    /// An upper bound of the steps any attempt of this customer reaches, in one pass: per
    /// step, the latest start of a chain that got there within the window (a later start
    /// leaves more of the window). Exact for ordered funnels without exclusions or held
    /// properties, which only lower what an attempt reaches; the step count otherwise.
    fn furthest_reachable(&self, hits: &[Hit<'_>]) -> usize {
        let k = self.steps.len();
        if !matches!(
            self.order,
            FunnelOrder::Unspecified | FunnelOrder::Ordered | FunnelOrder::Strict
        ) {
            return k;
        }
        let (lo, hi) = self.range;
        let mut chain_start = [i64::MIN; MAX_STEPS];
        for hit in hits {
            let steps = hit.mark.steps;
            if steps == 0 {
                continue;
            }
            // From the last step down, so one event never takes two steps of one chain.
            let mut later = steps & !1;
            while later != 0 {
                let j = 63 - later.leading_zeros() as usize;
                later &= !(1 << j);
                let from = chain_start[j - 1];
                if from != i64::MIN && hit.at.saturating_sub(from) <= self.window_us {
                    chain_start[j] = chain_start[j].max(from);
                }
            }
            if steps & 1 != 0 && hit.at >= lo && hit.at < hi {
                chain_start[0] = hit.at;
            }
        }
        chain_start[..k]
            .iter()
            .rposition(|&s| s != i64::MIN)
            .map_or(0, |j| j + 1)
    }

    /// The attempt starting at `start`: the times of the steps it reached, into `times`;
    /// false when an exclusion disqualified it.
    fn attempt(
        &self,
        hits: &[Hit<'_>],
        start: usize,
        held: &mut Vec<Option<GroupKey>>,
        times: &mut Vec<i64>,
    ) -> bool {
        let k = self.steps.len();
        held.clear();
        held.extend(
            self.hold
                .iter()
                .map(|key| value_in(hits[start].props, *key).map(Val::key)),
        );
        let holds = |i: usize| {
            self.hold
                .iter()
                .zip(held.iter())
                .all(|(key, want)| value_in(hits[i].props, *key).map(Val::key) == *want)
        };
        let first = if self.order == FunnelOrder::Any {
            hits[start].mark.steps.trailing_zeros() as usize
        } else {
            0
        };
        let mut done: u64 = 1 << first;
        times.clear();
        times.push(hits[start].at);
        let end = hits[start].at.saturating_add(self.window_us);
        for (i, hit) in hits.iter().enumerate().skip(start + 1) {
            if times.len() == k || hit.at > end {
                break;
            }
            let reached = times.len();
            let mark = hit.mark;
            if mark.steps == 0 && mark.exclusions == 0 {
                if self.order == FunnelOrder::Strict {
                    break;
                }
                continue;
            }
            if mark.exclusions != 0 {
                let excluded = self
                    .exclusions
                    .iter()
                    .enumerate()
                    .any(|(x, (_, from, to))| {
                        mark.exclusions & (1 << x) != 0 && *from < reached && reached <= *to
                    });
                if excluded && holds(i) {
                    return false;
                }
            }
            let next = match self.order {
                FunnelOrder::Unspecified | FunnelOrder::Ordered | FunnelOrder::Strict => {
                    (mark.steps & (1 << reached) != 0).then_some(reached)
                }
                FunnelOrder::Any | FunnelOrder::Anchored => {
                    let free = mark.steps & !done;
                    (free != 0).then(|| free.trailing_zeros() as usize)
                }
            };
            match next {
                Some(step) if holds(i) => {
                    done |= 1 << step;
                    times.push(hit.at);
                }
                _ if self.order == FunnelOrder::Strict => break,
                _ => {}
            }
        }
        true
    }

    /// The breakdown groups of the attempt starting at `start`, into `groups`.
    fn groups_of(&self, model: &Model, root: u32, start: &Hit<'_>, groups: &mut Vec<GroupKey>) {
        match &self.by {
            By::Nothing => {}
            By::Property(key) => {
                groups.push(value_in(start.props, *key).map_or((NONE_GROUP, 0), Val::key));
            }
            By::Channel => groups.push((0, u64::from(start.channel))),
            By::Segments(wanted) => {
                groups.extend(
                    model
                        .slot(root)
                        .members
                        .iter()
                        .flat_map(|m| model.slot(*m).segments.iter())
                        .filter(|(s, from, until)| {
                            wanted.contains(&Some(*s)) && *from <= start.at && start.at < *until
                        })
                        .map(|(s, _, _)| (0, u64::from(*s))),
                );
                groups.sort_unstable();
                groups.dedup();
                if groups.is_empty() {
                    groups.push((NONE_GROUP, 0));
                }
            }
            By::Variant(arms, _) => groups.push(
                arms.get(&root)
                    .map_or((NONE_GROUP, 0), |a| (0, u64::from(*a))),
            ),
        }
    }
}

/// The group of customers without a value.
const NONE_GROUP: u8 = 254;

fn val_of_key(key: GroupKey) -> Option<Val> {
    (key.0 != NONE_GROUP).then(|| Val::from_key(key))
}

/// The value of property `key` among an event's properties.
fn value_in(props: &[Prop], key: Option<u32>) -> Option<Val> {
    let key = key?;
    props.iter().find(|p| p.key == key).map(Prop::val)
}

fn by(model: &Model, breakdown: Option<&Breakdown>) -> Result<By, AnalyticsError> {
    Ok(match breakdown.and_then(|b| b.by.as_ref()) {
        None => By::Nothing,
        Some(breakdown::By::Property(p)) if p.trim().is_empty() => {
            return Err(AnalyticsError::invalid("breakdown.property", "is empty"));
        }
        Some(breakdown::By::Property(p)) => By::Property(model.keys.get(p)),
        Some(breakdown::By::Channel(_)) => By::Channel,
        Some(breakdown::By::Segments(list)) => {
            if list.segment_ids.is_empty() {
                return Err(AnalyticsError::invalid(
                    "breakdown.segments.segment_ids",
                    "needs at least one segment",
                ));
            }
            By::Segments(
                list.segment_ids
                    .iter()
                    .map(|s| model.segment_ids.get(s))
                    .collect(),
            )
        }
        Some(breakdown::By::JourneyVariant(v)) => {
            if v.journey_id.is_empty() {
                return Err(AnalyticsError::invalid(
                    "breakdown.journey_variant.journey_id",
                    "is required",
                ));
            }
            let (assigned, arms) = variants(model, &v.journey_id, &v.node_id);
            By::Variant(assigned, arms)
        }
    })
}

/// The arm of a journey's random split each customer was first assigned to.
pub fn variants(
    model: &Model,
    journey_id: &str,
    node_id: &str,
) -> (HashMap<u32, u32>, Vec<String>) {
    let mut arms: Vec<String> = Vec::new();
    let mut first: HashMap<u32, (i64, u32)> = HashMap::new();
    for e in model
        .journeys
        .get(journey_id)
        .into_iter()
        .flat_map(|j| j.values())
    {
        let Some(step) = e
            .steps
            .iter()
            .find(|s| s.outcome == "arm" && (node_id.is_empty() || s.node_id == node_id))
        else {
            continue;
        };
        let arm = match arms.iter().position(|a| *a == step.decision) {
            Some(i) => i as u32,
            None => {
                arms.push(step.decision.clone());
                (arms.len() - 1) as u32
            }
        };
        let root = model.slot(e.profile).root;
        let entry = first.entry(root).or_insert((step.at_us, arm));
        if step.at_us < entry.0 {
            *entry = (step.at_us, arm);
        }
    }
    (first.into_iter().map(|(r, (_, a))| (r, a)).collect(), arms)
}

#[derive(Default, Clone, Copy)]
struct Mark {
    steps: u64,
    exclusions: u64,
    /// Some matcher of this name has a condition still to run.
    conditioned: bool,
}

impl Mark {
    /// Whether no step or exclusion can match.
    fn is_empty(&self) -> bool {
        self.steps == 0 && self.exclusions == 0 && !self.conditioned
    }
}

/// One customer's event that a step or exclusion names, with what it matches.
#[derive(Clone, Copy)]
struct Hit<'m> {
    at: i64,
    tie: u64,
    name: u32,
    channel: u8,
    mark: Mark,
    props: &'m [Prop],
}

impl Hit<'_> {
    /// The bits of the `matchers` with a condition that this event meets.
    fn conditions_met<'a>(
        &self,
        model: &Model,
        matchers: impl Iterator<Item = &'a Matcher>,
        memos: &mut [Memo],
    ) -> u64 {
        let mut bits = 0;
        for (i, (m, memo)) in matchers.zip(memos).enumerate() {
            if m.has_condition()
                && m.matches_props(model, self.name, self.channel, self.props, memo)
            {
                bits |= 1 << i;
            }
        }
        bits
    }
}

/// Where one customer's hits are in the block's.
struct Span {
    root: u32,
    start: usize,
    end: usize,
    /// All its events, named by a step or not.
    events: u64,
    /// Whether any of its events falls in the funnel's range.
    in_range: bool,
}

/// Buffers one worker reuses from customer to customer.
#[derive(Default)]
struct Scratch {
    times: Vec<i64>,
    best: Vec<i64>,
    held: Vec<Option<GroupKey>>,
}

struct Agg {
    reached: Vec<u64>,
    /// Seconds from the previous step, per step (empty for the first).
    times: Vec<Vec<f64>>,
}

impl Agg {
    fn new(k: usize) -> Agg {
        Agg {
            reached: vec![0; k],
            times: vec![Vec::new(); k],
        }
    }

    /// Counts an attempt that reached a step at each of `times`.
    fn add(&mut self, times: &[i64]) {
        for i in 0..times.len() {
            self.reached[i] += 1;
            if i > 0 {
                self.times[i].push((times[i] - times[i - 1]) as f64 / 1e6);
            }
        }
    }

    /// How many times it holds.
    fn values(&self) -> usize {
        self.times.iter().map(Vec::len).sum()
    }

    /// Adds `other`'s counts and times, leaving it as it is.
    fn absorb_copy(&mut self, other: &Agg) {
        for (i, (n, t)) in other.reached.iter().zip(&other.times).enumerate() {
            self.reached[i] += n;
            self.times[i].extend_from_slice(t);
        }
    }

    fn absorb(&mut self, other: Agg) {
        for (i, (n, t)) in other.reached.into_iter().zip(other.times).enumerate() {
            self.reached[i] += n;
            // The smaller list goes into the larger: the first absorbed moves, not copies.
            let mine = &mut self.times[i];
            if mine.capacity() < t.capacity() {
                let smaller = std::mem::replace(mine, t);
                mine.extend(smaller);
            } else {
                mine.extend(t);
            }
        }
    }
}

struct Memos {
    steps: Vec<Memo>,
    exclusions: Vec<Memo>,
}

/// One worker's counts, and the buffers it reuses from block to block.
struct Partial<'m> {
    total: Agg,
    groups: FxHashMap<GroupKey, Agg>,
    memos: Memos,
    customers: u64,
    events: u64,
    hits: Vec<Hit<'m>>,
    spans: Vec<Span>,
    scratch: Scratch,
    group_keys: Vec<GroupKey>,
    /// Bytes held but not charged to the budget yet.
    uncharged: usize,
}

impl Partial<'_> {
    fn new<'m>(f: &Funnel) -> Partial<'m> {
        Partial {
            total: Agg::new(f.steps.len()),
            groups: FxHashMap::default(),
            memos: Memos {
                steps: f.steps.iter().map(|_| Memo::default()).collect(),
                exclusions: f.exclusions.iter().map(|_| Memo::default()).collect(),
            },
            customers: 0,
            events: 0,
            hits: Vec::new(),
            spans: Vec::new(),
            scratch: Scratch::default(),
            group_keys: Vec::new(),
            uncharged: 0,
        }
    }

    fn absorb(&mut self, other: Partial<'_>) {
        self.total.absorb(other.total);
        for (k, agg) in other.groups {
            match self.groups.get_mut(&k) {
                Some(mine) => mine.absorb(agg),
                None => {
                    self.groups.insert(k, agg);
                }
            }
        }
        self.customers += other.customers;
        self.events += other.events;
    }
}
