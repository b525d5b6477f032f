//! CX metrics: CSAT, NPS, sentiment, complaints and escalations by stage, channel or
//! touchpoint and time bucket, read with the profile service's signal conventions
//! (`waymark_profile::emotion`): `CSAT Submitted` / `Survey Submitted` carry `csat` (or
//! `score`) 1-5, `NPS Submitted` / `Survey Submitted` carry `nps` (or `score`) 0-10, and
//! the free text of complaints, feedback, chats, reviews, tickets and calls is scored for
//! sentiment.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use waymark_proto::analytics::v1::{
    CxGrouping, CxMetrics, GetCxMetricsRequest, GetCxMetricsResponse,
};

use crate::error::AnalyticsError;
use crate::funnel::{duration_field, range_of};
use crate::maps::{CompiledMap, Matchers};
use crate::model::{Model, Slot, Val};
use crate::scan::{self, Budget};

const COMPLAINT: &str = "Complaint Filed";
const NO_GROUP: u64 = u64::MAX;

#[derive(Default, Clone, Copy)]
struct Acc {
    csat_n: u64,
    csat_sum: f64,
    csat_satisfied: u64,
    nps_n: u64,
    promoters: u64,
    detractors: u64,
    sentiment_n: u64,
    sentiment_sum: f64,
    complaints: u64,
    escalations: u64,
}

impl Acc {
    fn absorb(&mut self, o: &Acc) {
        self.csat_n += o.csat_n;
        self.csat_sum += o.csat_sum;
        self.csat_satisfied += o.csat_satisfied;
        self.nps_n += o.nps_n;
        self.promoters += o.promoters;
        self.detractors += o.detractors;
        self.sentiment_n += o.sentiment_n;
        self.sentiment_sum += o.sentiment_sum;
        self.complaints += o.complaints;
        self.escalations += o.escalations;
    }
}

/// The interned ids the pass looks for.
struct Names {
    csat: Option<u32>,
    nps: Option<u32>,
    survey: Option<u32>,
    complaint: Option<u32>,
    texts: Vec<u32>,
    key_csat: Option<u32>,
    key_nps: Option<u32>,
    key_score: Option<u32>,
    text_keys: Vec<u32>,
}

fn number(model: &Model, slot: &Slot, ev: &crate::model::Ev, key: Option<u32>) -> Option<f64> {
    let key = key?;
    match model.props(slot, ev).iter().find(|p| p.key == key)?.val() {
        Val::Num(n) => Some(n),
        _ => None,
    }
}

pub fn metrics(
    model: &Model,
    maps: &BTreeMap<String, Arc<CompiledMap>>,
    req: &GetCxMetricsRequest,
    budget: &Budget,
) -> Result<GetCxMetricsResponse, AnalyticsError> {
    let grouping = CxGrouping::try_from(req.group_by)
        .map_err(|_| AnalyticsError::invalid("group_by", "is not a CxGrouping"))?;
    let map = if grouping == CxGrouping::Stage {
        if req.map_id.is_empty() {
            return Err(AnalyticsError::invalid(
                "map_id",
                "is required to group by stage",
            ));
        }
        let map = maps.get(&req.map_id).ok_or_else(|| {
            AnalyticsError::invalid("map_id", format!("no journey map {:?}", req.map_id))
        })?;
        Some((map.clone(), Matchers::compile(model, map)?))
    } else {
        None
    };
    let width = if req.bucket.trim().is_empty() {
        None
    } else {
        Some(duration_field(&req.bucket, "bucket", 0)?)
    };
    let (lo, hi) = range_of(req.range.as_ref());
    let names = Names {
        csat: model.names.get("CSAT Submitted"),
        nps: model.names.get("NPS Submitted"),
        survey: model.names.get("Survey Submitted"),
        complaint: model.names.get(COMPLAINT),
        texts: waymark_profile::emotion::TEXT_EVENTS
            .iter()
            .filter_map(|n| model.names.get(n))
            .collect(),
        key_csat: model.keys.get("csat"),
        key_nps: model.keys.get("nps"),
        key_score: model.keys.get("score"),
        text_keys: waymark_profile::emotion::TEXT_KEYS
            .iter()
            .filter_map(|k| model.keys.get(k))
            .collect(),
    };
    let mut escalations: HashMap<u32, Vec<i64>> = HashMap::new();
    for journey in model.journeys.values() {
        for e in journey.values() {
            for s in e.steps.iter().filter(|s| s.outcome == "escalated") {
                escalations
                    .entry(model.slot(e.profile).root)
                    .or_default()
                    .push(s.at_us);
            }
        }
    }
    let bucket_of = |at: i64| width.map_or(0, |w| at.div_euclid(w) * w);
    let parts = scan::customers(
        model,
        budget,
        || {
            (
                map.as_ref().map(|(_, m)| m.memos()),
                HashMap::<(u64, i64), Acc>::new(),
                HashMap::<u32, Option<f64>>::new(),
            )
        },
        |(memos, acc, sentiments), customer| {
            let events = &customer.events;
            // The group each event's signal falls in, as of that event.
            let mut stage = NO_GROUP;
            let mut groups = Vec::with_capacity(events.len());
            for (i, (slot, ev)) in events.iter().enumerate() {
                if let (Some((_, m)), Some(memos)) = (&map, memos.as_mut())
                    && let Some(s) = m.stage_of(model, slot, ev, memos)
                {
                    stage = s as u64;
                }
                groups.push(match grouping {
                    CxGrouping::Unspecified => 0,
                    CxGrouping::Stage => stage,
                    CxGrouping::Channel => u64::from(ev.channel),
                    CxGrouping::Touchpoint => i
                        .checked_sub(1)
                        .map_or(NO_GROUP, |p| u64::from(events[p].1.name)),
                });
            }
            for (i, (slot, ev)) in events.iter().enumerate() {
                if ev.at < lo || ev.at >= hi {
                    continue;
                }
                let name = Some(ev.name);
                let mut a = Acc::default();
                let csat = if name == names.csat {
                    number(model, slot, ev, names.key_csat)
                        .or_else(|| number(model, slot, ev, names.key_score))
                } else if name == names.survey {
                    number(model, slot, ev, names.key_csat).or_else(|| {
                        number(model, slot, ev, names.key_nps)
                            .is_none()
                            .then(|| number(model, slot, ev, names.key_score))
                            .flatten()
                    })
                } else {
                    None
                };
                if let Some(c) = csat.filter(|c| (1.0..=5.0).contains(c)) {
                    a.csat_n = 1;
                    a.csat_sum = c;
                    a.csat_satisfied = u64::from(c >= 4.0);
                }
                let nps = if name == names.nps {
                    number(model, slot, ev, names.key_nps)
                        .or_else(|| number(model, slot, ev, names.key_score))
                } else if name == names.survey {
                    number(model, slot, ev, names.key_nps)
                } else {
                    None
                };
                if let Some(n) = nps.filter(|n| (0.0..=10.0).contains(n)) {
                    a.nps_n = 1;
                    a.promoters = u64::from(n >= 9.0);
                    a.detractors = u64::from(n <= 6.0);
                }
                if names.texts.contains(&ev.name) {
                    let props = model.props(slot, ev);
                    let text = names.text_keys.iter().find_map(|k| {
                        props
                            .iter()
                            .find(|p| p.key == *k)
                            .and_then(|p| match p.val() {
                                Val::Str(s) => Some(s),
                                _ => None,
                            })
                    });
                    if let Some(s) = text {
                        let score = *sentiments.entry(s).or_insert_with(|| {
                            waymark_profile::emotion::sentiment(model.strings.name(s))
                        });
                        if let Some(score) = score {
                            a.sentiment_n = 1;
                            a.sentiment_sum = score;
                        }
                    }
                }
                a.complaints = u64::from(name == names.complaint);
                if a.csat_n + a.nps_n + a.sentiment_n + a.complaints > 0 {
                    acc.entry((groups[i], bucket_of(ev.at)))
                        .or_default()
                        .absorb(&a);
                }
            }
            for &at in escalations.get(&customer.root).into_iter().flatten() {
                if at < lo || at >= hi {
                    continue;
                }
                let before = events.partition_point(|(_, e)| e.at <= at);
                let group = match grouping {
                    CxGrouping::Unspecified => 0,
                    CxGrouping::Touchpoint => before
                        .checked_sub(1)
                        .map_or(NO_GROUP, |p| u64::from(events[p].1.name)),
                    _ => before.checked_sub(1).map_or(NO_GROUP, |p| groups[p]),
                };
                acc.entry((group, bucket_of(at))).or_default().escalations += 1;
            }
            Ok(())
        },
    )?;
    let mut all: BTreeMap<(String, i64), Acc> = BTreeMap::new();
    for (_, part, _) in parts {
        for ((group, bucket), a) in part {
            let label = match (grouping, group) {
                (CxGrouping::Unspecified, _) => "(all)".to_owned(),
                (_, NO_GROUP) => "(none)".to_owned(),
                (CxGrouping::Stage, s) => map
                    .as_ref()
                    .map(|(m, _)| m.stage_name(s as usize))
                    .unwrap_or_default(),
                (CxGrouping::Channel, c) => waymark_profile::segment::channel_name(c as i32),
                (CxGrouping::Touchpoint, n) => model.names.name(n as u32).to_owned(),
            };
            all.entry((label, bucket)).or_default().absorb(&a);
        }
    }
    let ratio = |n: f64, d: u64| if d == 0 { 0.0 } else { n / d as f64 };
    Ok(GetCxMetricsResponse {
        metrics: all
            .into_iter()
            .map(|((group, bucket), a)| CxMetrics {
                group,
                bucket_start: width.map(|_| waymark_kit::time::from_micros(bucket)),
                csat_responses: a.csat_n,
                csat_mean: ratio(a.csat_sum, a.csat_n),
                csat_satisfied_percent: 100.0 * ratio(a.csat_satisfied as f64, a.csat_n),
                nps_responses: a.nps_n,
                nps: 100.0 * ratio(a.promoters as f64 - a.detractors as f64, a.nps_n),
                sentiment_samples: a.sentiment_n,
                sentiment_mean: ratio(a.sentiment_sum, a.sentiment_n),
                complaints: a.complaints,
                escalations: a.escalations,
            })
            .collect(),
    })
}
