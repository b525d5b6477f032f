//! Journey maps: named stages entered by events, each with a standard time; where
//! customers are now, how long stages and interactions take against their standard
//! times, who is stuck, and where sessions dead-end.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use waymark_proto::analytics::v1::{
    DeadEnd, GetSlaBreachesRequest, GetSlaBreachesResponse, GetStageDistributionResponse,
    JourneyMap, SlaReport, StageCount, StuckCustomer,
};

use crate::error::AnalyticsError;
use crate::funnel::range_of;
use crate::matcher::{Matcher, Memo};
use crate::model::{Ev, Model, Slot};
use crate::scan::{self, Budget, Customer};
use crate::stats;
use crate::store::Written;

/// The longest map id (it becomes part of trait names).
const MAX_ID: usize = 64;
/// A gap between two events longer than this ends a session.
pub const SESSION_GAP_US: i64 = 30 * 60 * 1_000_000;
/// Stuck customers listed per stage when the request does not say.
const DEFAULT_STUCK: usize = 100;

/// A saved map, with its standard times read.
pub struct CompiledMap {
    pub map: JourneyMap,
    /// Per stage, its standard time in microseconds (none: never stuck).
    standard: Vec<Option<i64>>,
    interaction_standard: Vec<i64>,
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

fn standard_time(text: &str) -> Option<i64> {
    waymark_kit::time::parse_duration(text)
        .ok()
        .map(waymark_kit::time::duration_micros)
}

/// Every problem of a map, each with its field.
pub fn validate(map: &JourneyMap) -> Result<(), AnalyticsError> {
    let mut problems: Vec<(String, String)> = Vec::new();
    let id_rule = "must be 1 to 64 of lowercase letters, digits, `_` and `-`";
    if !valid_id(&map.id) {
        problems.push(("map.id".into(), id_rule.into()));
    }
    if map.stages.is_empty() {
        problems.push(("map.stages".into(), "needs at least one stage".into()));
    }
    let check_matcher = |problems: &mut Vec<(String, String)>,
                         field: String,
                         m: &waymark_proto::analytics::v1::EventMatcher| {
        if m.event.trim().is_empty() {
            problems.push((format!("{field}.event"), "is required".into()));
        }
        if !m.condition.trim().is_empty()
            && let Err(e) =
                waymark_condition::Condition::compile(&m.condition, &crate::matcher::VARIABLES)
        {
            problems.push((format!("{field}.condition"), e.to_string()));
        }
    };
    let mut seen = Vec::new();
    for (i, stage) in map.stages.iter().enumerate() {
        let field = format!("map.stages[{i}]");
        if !valid_id(&stage.id) {
            problems.push((format!("{field}.id"), id_rule.into()));
        } else if seen.contains(&stage.id.as_str()) {
            problems.push((
                format!("{field}.id"),
                format!("repeats the stage id {:?}", stage.id),
            ));
        }
        seen.push(&stage.id);
        if stage.entered_by.is_empty() {
            problems.push((
                format!("{field}.entered_by"),
                "needs at least one event".into(),
            ));
        }
        for (j, m) in stage.entered_by.iter().enumerate() {
            check_matcher(&mut problems, format!("{field}.entered_by[{j}]"), m);
        }
        if !stage.standard_time.trim().is_empty()
            && let Err(e) = waymark_kit::time::parse_duration(&stage.standard_time)
        {
            problems.push((format!("{field}.standard_time"), e));
        }
    }
    let mut seen = Vec::new();
    for (i, x) in map.interactions.iter().enumerate() {
        let field = format!("map.interactions[{i}]");
        if !valid_id(&x.id) {
            problems.push((format!("{field}.id"), id_rule.into()));
        } else if seen.contains(&x.id.as_str()) {
            problems.push((
                format!("{field}.id"),
                format!("repeats the interaction id {:?}", x.id),
            ));
        }
        seen.push(&x.id);
        match &x.start {
            Some(m) => check_matcher(&mut problems, format!("{field}.start"), m),
            None => problems.push((format!("{field}.start"), "is required".into())),
        }
        match &x.end {
            Some(m) => check_matcher(&mut problems, format!("{field}.end"), m),
            None => problems.push((format!("{field}.end"), "is required".into())),
        }
        if let Err(e) = waymark_kit::time::parse_duration(&x.standard_time) {
            problems.push((format!("{field}.standard_time"), e));
        }
    }
    for (i, m) in map.dead_ends.iter().enumerate() {
        check_matcher(&mut problems, format!("map.dead_ends[{i}]"), m);
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(AnalyticsError::Invalid(problems))
    }
}

impl CompiledMap {
    /// A validated map.
    pub fn new(map: JourneyMap) -> CompiledMap {
        CompiledMap {
            standard: map
                .stages
                .iter()
                .map(|s| standard_time(&s.standard_time))
                .collect(),
            interaction_standard: map
                .interactions
                .iter()
                .map(|x| standard_time(&x.standard_time).unwrap_or(i64::MAX))
                .collect(),
            map,
        }
    }

    /// A stage's name for people: its name, else its id.
    pub fn stage_name(&self, stage: usize) -> String {
        self.map.stages.get(stage).map_or_else(String::new, |s| {
            if s.name.is_empty() {
                s.id.clone()
            } else {
                s.name.clone()
            }
        })
    }
}

/// A map's matchers, compiled against the model's names.
pub struct Matchers {
    /// (stage, matcher), in stage order.
    stages: Vec<(usize, Matcher)>,
    interactions: Vec<(Matcher, Matcher)>,
    dead_ends: Vec<Matcher>,
}

/// Per-thread memos of a map's matchers.
pub struct Memos {
    stages: Vec<Memo>,
    interactions: Vec<(Memo, Memo)>,
    dead_ends: Vec<Memo>,
}

impl Matchers {
    pub fn compile(model: &Model, map: &CompiledMap) -> Result<Matchers, AnalyticsError> {
        let mut stages = Vec::new();
        for (i, s) in map.map.stages.iter().enumerate() {
            for (j, m) in s.entered_by.iter().enumerate() {
                stages.push((
                    i,
                    Matcher::compile(model, m, &format!("map.stages[{i}].entered_by[{j}]"))?,
                ));
            }
        }
        let mut interactions = Vec::new();
        for (i, x) in map.map.interactions.iter().enumerate() {
            let start = x.start.clone().unwrap_or_default();
            let end = x.end.clone().unwrap_or_default();
            interactions.push((
                Matcher::compile(model, &start, &format!("map.interactions[{i}].start"))?,
                Matcher::compile(model, &end, &format!("map.interactions[{i}].end"))?,
            ));
        }
        let dead_ends = map
            .map
            .dead_ends
            .iter()
            .enumerate()
            .map(|(i, m)| Matcher::compile(model, m, &format!("map.dead_ends[{i}]")))
            .collect::<Result<_, _>>()?;
        Ok(Matchers {
            stages,
            interactions,
            dead_ends,
        })
    }

    pub fn memos(&self) -> Memos {
        Memos {
            stages: self.stages.iter().map(|_| Memo::default()).collect(),
            interactions: self
                .interactions
                .iter()
                .map(|_| (Memo::default(), Memo::default()))
                .collect(),
            dead_ends: self.dead_ends.iter().map(|_| Memo::default()).collect(),
        }
    }

    /// The stage `ev` enters, if any (the first in the map's order).
    pub fn stage_of(
        &self,
        model: &Model,
        slot: &Slot,
        ev: &Ev,
        memos: &mut Memos,
    ) -> Option<usize> {
        for ((stage, m), memo) in self.stages.iter().zip(memos.stages.iter_mut()) {
            if m.matches(model, slot, ev, memo) {
                return Some(*stage);
            }
        }
        None
    }
}

/// One stay in a stage.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Visit {
    pub stage: usize,
    pub start: i64,
    /// When the next stage was entered; none while the customer is still in it.
    pub end: Option<i64>,
}

/// A customer's stays, in order: a new stay begins at each event entering a stage other
/// than the current one.
pub fn visits(
    model: &Model,
    m: &Matchers,
    memos: &mut Memos,
    customer: &Customer<'_>,
) -> Vec<Visit> {
    let mut out: Vec<Visit> = Vec::new();
    for (slot, ev) in &customer.events {
        let Some(stage) = m.stage_of(model, slot, ev, memos) else {
            continue;
        };
        if out.last().is_some_and(|v| v.stage == stage) {
            continue;
        }
        if let Some(last) = out.last_mut() {
            last.end = Some(ev.at);
        }
        out.push(Visit {
            stage,
            start: ev.at,
            end: None,
        });
    }
    out
}

/// How many customers are at each stage now.
pub fn distribution(
    model: &Model,
    map: &CompiledMap,
    now: i64,
    budget: &Budget,
) -> Result<GetStageDistributionResponse, AnalyticsError> {
    let matchers = Matchers::compile(model, map)?;
    let n = map.map.stages.len();
    let parts = scan::customers(
        model,
        budget,
        || (matchers.memos(), vec![(0u64, 0u64, Vec::new()); n], 0u64),
        |(memos, counts, without), customer| {
            match visits(model, &matchers, memos, customer).last() {
                Some(v) => {
                    let since = (now - v.start).max(0);
                    let c = &mut counts[v.stage];
                    c.0 += 1;
                    if map.standard[v.stage].is_some_and(|s| since > s) {
                        c.1 += 1;
                    }
                    c.2.push(since as f64 / 1e6);
                }
                None => *without += 1,
            }
            Ok(())
        },
    )?;
    let mut counts = vec![(0u64, 0u64, Vec::new()); n];
    let mut without = 0;
    for (_, part, w) in parts {
        without += w;
        for (total, p) in counts.iter_mut().zip(part) {
            total.0 += p.0;
            total.1 += p.1;
            total.2.extend(p.2);
        }
    }
    Ok(GetStageDistributionResponse {
        stages: counts
            .into_iter()
            .enumerate()
            .map(|(i, (customers, stuck, mut times))| StageCount {
                stage_id: map.map.stages[i].id.clone(),
                name: map.stage_name(i),
                customers,
                stuck,
                time_in_stage: Some(stats::distribution(&mut times)),
            })
            .collect(),
        without_stage: without,
    })
}

#[derive(Default)]
struct SlaPart {
    stage_done: Vec<Vec<f64>>,
    stage_breached: Vec<u64>,
    stage_open_past: Vec<u64>,
    inter_done: Vec<Vec<f64>>,
    inter_breached: Vec<u64>,
    inter_open_past: Vec<u64>,
    stuck: Vec<StuckCustomer>,
    sessions: u64,
    /// dead-end index → (sessions, customers).
    dead: Vec<(u64, u64)>,
}

/// Where a map's standard times are broken.
pub fn sla(
    model: &Model,
    map: &CompiledMap,
    req: &GetSlaBreachesRequest,
    now: i64,
    budget: &Budget,
) -> Result<GetSlaBreachesResponse, AnalyticsError> {
    let matchers = Matchers::compile(model, map)?;
    let (lo, hi) = range_of(req.range.as_ref());
    let stages = map.map.stages.len();
    let interactions = map.map.interactions.len();
    let limit = if req.stuck_limit == 0 {
        DEFAULT_STUCK
    } else {
        req.stuck_limit as usize
    };
    let init = || {
        (
            matchers.memos(),
            SlaPart {
                stage_done: vec![Vec::new(); stages],
                stage_breached: vec![0; stages],
                stage_open_past: vec![0; stages],
                inter_done: vec![Vec::new(); interactions],
                inter_breached: vec![0; interactions],
                inter_open_past: vec![0; interactions],
                dead: vec![(0, 0); matchers.dead_ends.len()],
                ..SlaPart::default()
            },
        )
    };
    let parts = scan::customers(model, budget, init, |(memos, part), customer| {
        for v in visits(model, &matchers, memos, customer) {
            if v.start < lo || v.start >= hi {
                continue;
            }
            let standard = map.standard[v.stage];
            match v.end {
                Some(end) => {
                    let took = end - v.start;
                    part.stage_done[v.stage].push(took as f64 / 1e6);
                    if standard.is_some_and(|s| took > s) {
                        part.stage_breached[v.stage] += 1;
                    }
                }
                None => {
                    if let Some(s) = standard.filter(|s| now - v.start > *s) {
                        part.stage_open_past[v.stage] += 1;
                        part.stuck.push(StuckCustomer {
                            profile_id: model.customer_id(customer.root).to_owned(),
                            stage_id: map.map.stages[v.stage].id.clone(),
                            since: Some(waymark_kit::time::from_micros(v.start)),
                            overdue_seconds: (now - v.start - s) as f64 / 1e6,
                        });
                    }
                }
            }
        }
        for (i, (start, end)) in matchers.interactions.iter().enumerate() {
            let (start_memo, end_memo) = &mut memos.interactions[i];
            let mut open: Option<i64> = None;
            for (slot, ev) in &customer.events {
                if let Some(began) = open {
                    if end.matches(model, slot, ev, end_memo) {
                        let took = ev.at - began;
                        part.inter_done[i].push(took as f64 / 1e6);
                        if took > map.interaction_standard[i] {
                            part.inter_breached[i] += 1;
                        }
                        open = None;
                    }
                } else if ev.at >= lo && ev.at < hi && start.matches(model, slot, ev, start_memo) {
                    open = Some(ev.at);
                }
            }
            if open.is_some_and(|began| now - began > map.interaction_standard[i]) {
                part.inter_open_past[i] += 1;
            }
        }
        let mut dead_hit = vec![false; matchers.dead_ends.len()];
        let events = &customer.events;
        for (j, (slot, ev)) in events.iter().enumerate() {
            let last_of_session = events
                .get(j + 1)
                .is_none_or(|(_, next)| next.at - ev.at > SESSION_GAP_US);
            if !last_of_session || ev.at < lo || ev.at >= hi {
                continue;
            }
            part.sessions += 1;
            if let Some(d) = matchers
                .dead_ends
                .iter()
                .zip(memos.dead_ends.iter_mut())
                .position(|(m, memo)| m.matches(model, slot, ev, memo))
            {
                part.dead[d].0 += 1;
                dead_hit[d] = true;
            }
        }
        for (d, hit) in dead_hit.into_iter().enumerate() {
            part.dead[d].1 += u64::from(hit);
        }
        Ok(())
    })?;
    let mut all = init().1;
    for (_, p) in parts {
        for i in 0..stages {
            all.stage_done[i].extend(&p.stage_done[i]);
            all.stage_breached[i] += p.stage_breached[i];
            all.stage_open_past[i] += p.stage_open_past[i];
        }
        for i in 0..interactions {
            all.inter_done[i].extend(&p.inter_done[i]);
            all.inter_breached[i] += p.inter_breached[i];
            all.inter_open_past[i] += p.inter_open_past[i];
        }
        all.stuck.extend(p.stuck);
        all.sessions += p.sessions;
        for (a, b) in all.dead.iter_mut().zip(&p.dead) {
            a.0 += b.0;
            a.1 += b.1;
        }
    }
    let report =
        |id: &str, name: String, standard: i64, done: &mut Vec<f64>, breached: u64, open: u64| {
            let completed = stats::distribution(done);
            SlaReport {
                id: id.to_owned(),
                name,
                standard_seconds: standard as f64 / 1e6,
                breach_percent: if completed.count == 0 {
                    0.0
                } else {
                    100.0 * breached as f64 / completed.count as f64
                },
                completed: Some(completed),
                breached,
                open_past_standard: open,
            }
        };
    let stage_reports = (0..stages)
        .filter_map(|i| {
            let standard = map.standard[i]?;
            Some(report(
                &map.map.stages[i].id,
                map.stage_name(i),
                standard,
                &mut all.stage_done[i],
                all.stage_breached[i],
                all.stage_open_past[i],
            ))
        })
        .collect();
    let interaction_reports = (0..interactions)
        .map(|i| {
            let x = &map.map.interactions[i];
            let name = if x.name.is_empty() {
                x.id.clone()
            } else {
                x.name.clone()
            };
            report(
                &x.id,
                name,
                map.interaction_standard[i],
                &mut all.inter_done[i],
                all.inter_breached[i],
                all.inter_open_past[i],
            )
        })
        .collect();
    // Most overdue first, at most `limit` per stage.
    all.stuck.sort_by(|a, b| {
        b.overdue_seconds
            .total_cmp(&a.overdue_seconds)
            .then(a.profile_id.cmp(&b.profile_id))
    });
    let mut per_stage: HashMap<String, usize> = HashMap::new();
    all.stuck.retain(|s| {
        let n = per_stage.entry(s.stage_id.clone()).or_default();
        *n += 1;
        *n <= limit
    });
    let mut dead_ends: Vec<DeadEnd> = all
        .dead
        .iter()
        .enumerate()
        .filter(|(_, (sessions, _))| *sessions > 0)
        .map(|(i, (sessions, customers))| DeadEnd {
            event: map.map.dead_ends[i].event.clone(),
            sessions: *sessions,
            customers: *customers,
        })
        .collect();
    dead_ends.sort_by(|a, b| b.sessions.cmp(&a.sessions).then(a.event.cmp(&b.event)));
    Ok(GetSlaBreachesResponse {
        stages: stage_reports,
        interactions: interaction_reports,
        stuck: all.stuck,
        dead_ends,
        sessions: all.sessions,
    })
}

/// The trait a map's stage is written to.
pub fn stage_trait(map_id: &str) -> String {
    format!("stage_{map_id}")
}

/// The trait a map's stuck flag is written to.
pub fn stuck_trait(map_id: &str) -> String {
    format!("stuck_{map_id}")
}

/// Stages and stuck flags that differ from what was last written, on maps that write
/// back; one row per (map, customer).
pub fn changes(
    model: &Model,
    maps: &BTreeMap<String, Arc<CompiledMap>>,
    written: &[Written],
    now: i64,
    budget: &Budget,
) -> Result<Vec<Written>, AnalyticsError> {
    let before: HashMap<(&str, &str), (&str, i16)> = written
        .iter()
        .map(|w| {
            (
                (w.map_id.as_str(), w.profile_id.as_str()),
                (w.stage_id.as_str(), w.stuck),
            )
        })
        .collect();
    let mut out = Vec::new();
    for map in maps.values().filter(|m| m.map.write_back) {
        let matchers = Matchers::compile(model, map)?;
        let parts = scan::customers(
            model,
            budget,
            || (matchers.memos(), Vec::new()),
            |(memos, found), customer| {
                let Some(v) = visits(model, &matchers, memos, customer).pop() else {
                    return Ok(());
                };
                let stage = map.map.stages[v.stage].id.as_str();
                let stuck = i16::from(map.standard[v.stage].is_some_and(|s| now - v.start > s));
                let profile = model.customer_id(customer.root);
                if before.get(&(map.map.id.as_str(), profile)) != Some(&(stage, stuck)) {
                    found.push(Written {
                        map_id: map.map.id.clone(),
                        profile_id: profile.to_owned(),
                        stage_id: stage.to_owned(),
                        stuck,
                    });
                }
                Ok(())
            },
        )?;
        out.extend(parts.into_iter().flat_map(|(_, found)| found));
    }
    Ok(out)
}
