//! Paths: what customers did after (or before) an anchor step within a session, as the
//! links of a Sankey diagram, and the most common paths to drop-off.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use waymark_proto::analytics::v1::{
    GetPathsRequest, GetPathsResponse, PathCount, PathDirection, PathLink, PathNodeKind,
};

use crate::error::AnalyticsError;
use crate::funnel::{duration_field, range_of};
use crate::maps::{self, CompiledMap, Matchers};
use crate::matcher::{Matcher, Memo};
use crate::model::{Ev, Model, Slot};
use crate::scan::{self, Budget, Customer};

const ANCHOR: u64 = u64::MAX;
const END: u64 = u64::MAX - 1;
const CONVERTED: u64 = u64::MAX - 2;
/// The deepest a path may go.
const MAX_DEPTH: u32 = 20;
const DEFAULT_DEPTH: u32 = 5;
const DEFAULT_LIMIT: usize = 50;
/// Distinct full paths one query may hold before it is refused.
const MAX_DISTINCT_PATHS: usize = 2_000_000;

/// A compiled paths query.
pub struct Paths {
    anchor: Option<Matcher>,
    goal: Option<Matcher>,
    before: bool,
    depth: usize,
    kind: PathNodeKind,
    map: Option<(Arc<CompiledMap>, Matchers)>,
    gap_us: i64,
    range: (i64, i64),
    collapse: bool,
    limit: usize,
}

#[derive(Default)]
struct Part {
    paths: u64,
    converted: u64,
    links: HashMap<(u32, u64, u64), u64>,
    drop_offs: HashMap<Vec<u64>, u64>,
}

impl Paths {
    pub fn compile(
        model: &Model,
        maps: &BTreeMap<String, Arc<CompiledMap>>,
        req: &GetPathsRequest,
    ) -> Result<Paths, AnalyticsError> {
        let mut problems = Vec::new();
        let mut keep = |r: Result<(), AnalyticsError>| {
            if let Err(AnalyticsError::Invalid(p)) = r {
                problems.extend(p);
            }
        };
        let anchor = match req
            .anchor
            .as_ref()
            .map(|m| Matcher::compile(model, m, "anchor"))
        {
            Some(Err(e)) => {
                keep(Err(e));
                None
            }
            Some(Ok(m)) => Some(m),
            None => None,
        };
        let goal = match req
            .goal
            .as_ref()
            .map(|m| Matcher::compile(model, m, "goal"))
        {
            Some(Err(e)) => {
                keep(Err(e));
                None
            }
            Some(Ok(m)) => Some(m),
            None => None,
        };
        if req.depth > MAX_DEPTH {
            keep(Err(AnalyticsError::invalid(
                "depth",
                format!("must be 1 to {MAX_DEPTH} (0 for {DEFAULT_DEPTH})"),
            )));
        }
        let direction = PathDirection::try_from(req.direction);
        if direction.is_err() {
            keep(Err(AnalyticsError::invalid(
                "direction",
                "is not a PathDirection",
            )));
        }
        let kind = PathNodeKind::try_from(req.node_kind).unwrap_or(PathNodeKind::Unspecified);
        if PathNodeKind::try_from(req.node_kind).is_err() {
            keep(Err(AnalyticsError::invalid(
                "node_kind",
                "is not a PathNodeKind",
            )));
        }
        let mut map = None;
        if kind == PathNodeKind::Stage {
            match maps.get(&req.map_id) {
                None if req.map_id.is_empty() => keep(Err(AnalyticsError::invalid(
                    "map_id",
                    "is required for stage nodes",
                ))),
                None => keep(Err(AnalyticsError::invalid(
                    "map_id",
                    format!("no journey map {:?}", req.map_id),
                ))),
                Some(m) => match Matchers::compile(model, m) {
                    Ok(matchers) => map = Some((m.clone(), matchers)),
                    Err(e) => keep(Err(e)),
                },
            }
        }
        let gap_us = match duration_field(&req.session_gap, "session_gap", maps::SESSION_GAP_US) {
            Ok(g) => g,
            Err(e) => {
                keep(Err(e));
                0
            }
        };
        if !problems.is_empty() {
            return Err(AnalyticsError::Invalid(problems));
        }
        Ok(Paths {
            anchor,
            goal,
            before: direction == Ok(PathDirection::Before),
            depth: if req.depth == 0 {
                DEFAULT_DEPTH
            } else {
                req.depth
            } as usize,
            kind,
            map,
            gap_us,
            range: range_of(req.range.as_ref()),
            collapse: req.collapse_repeats.unwrap_or(true),
            limit: if req.limit == 0 {
                DEFAULT_LIMIT
            } else {
                req.limit as usize
            },
        })
    }

    pub fn run(&self, model: &Model, budget: &Budget) -> Result<GetPathsResponse, AnalyticsError> {
        let started = Instant::now();
        let memos = || {
            (
                Memo::default(),
                Memo::default(),
                self.map.as_ref().map(|(_, m)| m.memos()),
                Part::default(),
            )
        };
        let parts = scan::customers(
            model,
            budget,
            memos,
            |(anchor, goal, stage, part), customer| {
                self.customer(model, budget, customer, anchor, goal, stage.as_mut(), part)
            },
        )?;
        let mut all = Part::default();
        for (_, _, _, p) in parts {
            all.paths += p.paths;
            all.converted += p.converted;
            for (k, n) in p.links {
                *all.links.entry(k).or_default() += n;
            }
            for (k, n) in p.drop_offs {
                *all.drop_offs.entry(k).or_default() += n;
            }
        }
        let mut links: Vec<PathLink> = all
            .links
            .into_iter()
            .map(|((depth, from, to), count)| PathLink {
                depth,
                from: self.label(model, from),
                to: self.label(model, to),
                count,
            })
            .collect();
        links.sort_by(|a, b| {
            (a.depth, std::cmp::Reverse(a.count), &a.from, &a.to).cmp(&(
                b.depth,
                std::cmp::Reverse(b.count),
                &b.from,
                &b.to,
            ))
        });
        let mut per_depth: HashMap<u32, usize> = HashMap::new();
        links.retain(|l| {
            let n = per_depth.entry(l.depth).or_default();
            *n += 1;
            *n <= self.limit
        });
        let mut drop_offs: Vec<(Vec<u64>, u64)> = all.drop_offs.into_iter().collect();
        drop_offs.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        drop_offs.truncate(self.limit);
        Ok(GetPathsResponse {
            paths: all.paths,
            converted: all.converted,
            links,
            top_drop_off_paths: drop_offs
                .into_iter()
                .map(|(nodes, count)| PathCount {
                    nodes: nodes.into_iter().map(|n| self.label(model, n)).collect(),
                    count,
                })
                .collect(),
            took_micros: u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        })
    }

    fn label(&self, model: &Model, node: u64) -> String {
        match node {
            ANCHOR => "(anchor)".into(),
            END => "(end)".into(),
            CONVERTED => "(converted)".into(),
            _ => match self.kind {
                PathNodeKind::Touchpoint => format!(
                    "{}: {}",
                    waymark_profile::segment::channel_name((node >> 32) as i32),
                    model.names.name(node as u32)
                ),
                PathNodeKind::Stage => self
                    .map
                    .as_ref()
                    .map(|(m, _)| m.stage_name(node as usize))
                    .unwrap_or_default(),
                _ => model.names.name(node as u32).to_owned(),
            },
        }
    }

    fn node(
        &self,
        model: &Model,
        slot: &Slot,
        ev: &Ev,
        stage: Option<&mut maps::Memos>,
    ) -> Option<u64> {
        match self.kind {
            PathNodeKind::Touchpoint => Some((u64::from(ev.channel) << 32) | u64::from(ev.name)),
            PathNodeKind::Stage => {
                let (_, matchers) = self.map.as_ref()?;
                matchers.stage_of(model, slot, ev, stage?).map(|s| s as u64)
            }
            _ => Some(u64::from(ev.name)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn customer(
        &self,
        model: &Model,
        budget: &Budget,
        customer: &Customer<'_>,
        anchor_memo: &mut Memo,
        goal_memo: &mut Memo,
        mut stage: Option<&mut maps::Memos>,
        part: &mut Part,
    ) -> Result<(), AnalyticsError> {
        let events = &customer.events;
        let (lo, hi) = self.range;
        let mut session_start = 0;
        while session_start < events.len() {
            let mut session_end = session_start + 1;
            while session_end < events.len()
                && events[session_end].1.at - events[session_end - 1].1.at <= self.gap_us
            {
                session_end += 1;
            }
            let session = &events[session_start..session_end];
            session_start = session_end;
            let anchor = match &self.anchor {
                Some(m) => session.iter().position(|(slot, ev)| {
                    ev.at >= lo && ev.at < hi && m.matches(model, slot, ev, anchor_memo)
                }),
                None => session
                    .first()
                    .filter(|(_, ev)| ev.at >= lo && ev.at < hi)
                    .map(|_| 0),
            };
            let Some(a) = anchor else { continue };
            let mut nodes: Vec<u64> = Vec::with_capacity(self.depth + 1);
            let first = if self.anchor.is_some() {
                ANCHOR
            } else {
                match self.node(model, session[a].0, &session[a].1, stage.as_deref_mut()) {
                    Some(n) => n,
                    None => continue,
                }
            };
            let mut converted = false;
            let mut ended = true;
            let steps: Box<dyn Iterator<Item = &(&Slot, Ev)>> = if self.before {
                Box::new(session[..a].iter().rev())
            } else {
                Box::new(session[a + 1..].iter())
            };
            for (slot, ev) in steps {
                if !self.before
                    && self
                        .goal
                        .as_ref()
                        .is_some_and(|g| g.matches(model, slot, ev, goal_memo))
                {
                    converted = true;
                    break;
                }
                let Some(node) = self.node(model, slot, ev, stage.as_deref_mut()) else {
                    continue;
                };
                let previous = nodes.last().copied().unwrap_or(first);
                if self.collapse && previous == node {
                    continue;
                }
                if nodes.len() == self.depth {
                    ended = false;
                    break;
                }
                nodes.push(node);
            }
            part.paths += 1;
            let mut previous = first;
            for (i, node) in nodes.iter().enumerate() {
                *part
                    .links
                    .entry((i as u32 + 1, previous, *node))
                    .or_default() += 1;
                previous = *node;
            }
            let terminal = if converted {
                Some(CONVERTED)
            } else if ended && nodes.len() < self.depth {
                Some(END)
            } else {
                None
            };
            if let Some(terminal) = terminal {
                *part
                    .links
                    .entry((nodes.len() as u32 + 1, previous, terminal))
                    .or_default() += 1;
            }
            if converted {
                part.converted += 1;
            } else {
                let mut path = Vec::with_capacity(nodes.len() + 1);
                if first != ANCHOR {
                    path.push(first);
                }
                path.extend(&nodes);
                let entry = part.drop_offs.entry(path).or_default();
                if *entry == 0 {
                    budget.charge((nodes.len() + 1) * 8 + 48)?;
                }
                *entry += 1;
                if part.drop_offs.len() > MAX_DISTINCT_PATHS {
                    return Err(AnalyticsError::Budget(format!(
                        "more than {MAX_DISTINCT_PATHS} distinct paths; lower the depth or narrow the range"
                    )));
                }
            }
        }
        Ok(())
    }
}
