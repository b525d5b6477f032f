//! Simulation: a journey run against past events (ingestion's log) in memory, with time
//! taken from the events, acting on nothing. The same engine decides, so the counts are
//! what a live run over the same events would show.

use std::collections::{BTreeMap, HashMap};

use waymark_kit::time::micros;
use waymark_proto::common::v1::Event;
use waymark_proto::orchestration::v1 as pb;
use waymark_proto::profile::v1::Profile;

use super::{EntryBook, Orchestrator, OrchestratorError, invalid};
use crate::engine::{self, Effects, Env, Facts};
use crate::journey::{self, Journey};
use crate::model::{Enrollment, Waiting};
use crate::store;

const DEFAULT_EVENTS: u32 = 100_000;
const MAX_EVENTS: u32 = 1_000_000;

/// Outcomes that mean the enrollment reached a node (rather than left or resumed it).
fn reaches(outcome: &str) -> bool {
    matches!(
        outcome,
        "branch"
            | "arm"
            | "waiting"
            | "sent"
            | "deferred"
            | "suppressed"
            | "called"
            | "updated"
            | "escalated"
    )
}

fn event_time(e: &Event) -> i64 {
    e.timestamp
        .as_ref()
        .or(e.received_at.as_ref())
        .map_or(0, micros)
}

impl Orchestrator {
    /// Runs a journey (the given draft, or the saved one) over the events of a past time
    /// range without acting.
    pub async fn simulate(
        &self,
        r: pb::SimulateJourneyRequest,
        in_flight: pb::InFlightPolicy,
    ) -> Result<pb::SimulateJourneyResponse, OrchestratorError> {
        let definition = match r.journey {
            Some(d) => d,
            None if r.journey_id.is_empty() => {
                return Err(invalid(
                    "journey",
                    "give a journey or the journey_id of a saved one",
                ));
            }
            None => store::draft(self.db(), &r.journey_id)
                .await?
                .ok_or_else(|| {
                    OrchestratorError::NotFound(format!("no journey `{}`", r.journey_id))
                })?,
        };
        let journey =
            journey::compile(&definition, 0).map_err(OrchestratorError::InvalidJourney)?;
        let from = r.from.ok_or_else(|| invalid("from", "is required"))?;
        let to = r.to.ok_or_else(|| invalid("to", "is required"))?;
        let (from_us, to_us) = (micros(&from), micros(&to));
        if to_us <= from_us {
            return Err(invalid("to", "must be after `from`"));
        }
        let max = match r.max_events {
            0 => DEFAULT_EVENTS,
            n if n > MAX_EVENTS => {
                return Err(invalid(
                    "max_events",
                    format!("must be at most {MAX_EVENTS}"),
                ));
            }
            n => n,
        } as usize;

        let mut events = Vec::new();
        let mut token = String::new();
        loop {
            let (page, next) = self
                .inner
                .peers
                .past_events(from, to, token)
                .await
                .map_err(OrchestratorError::Unavailable)?;
            events.extend(page);
            if next.is_empty() || events.len() >= max {
                break;
            }
            token = next;
        }
        events.truncate(max);
        let mut report = pb::SimulateJourneyResponse {
            events: events.len() as u64,
            ..pb::SimulateJourneyResponse::default()
        };

        // One person per profile the cache knows, else per identifier.
        let mut people: BTreeMap<String, Vec<Event>> = BTreeMap::new();
        for mut e in events {
            let person = self.person_of(&e).await;
            e.profile_id = person.clone();
            people.entry(person).or_default().push(e);
        }
        let policy = self.inner.catalog.policy();
        let mut node_counts: HashMap<String, pb::NodeCount> = HashMap::new();
        for (person, mut events) in people {
            events.sort_by_key(event_time);
            let profile = self
                .profiles(std::slice::from_ref(&person))
                .await
                .remove(&person)
                .unwrap_or_else(|| Profile {
                    profile_id: person.clone(),
                    ..Profile::default()
                });
            let env = |now_us| Env {
                now_us,
                policy: &policy,
                emotion: self.inner.settings.emotion,
            };
            let mut facts = Facts::new(profile, Vec::new(), false, &env(from_us));
            let mut enrollments: Vec<Enrollment> = Vec::new();
            let mut history = EntryBook::default();
            let mut fx = Effects::default();
            for event in &events {
                let at = event_time(event).clamp(from_us, to_us);
                fire_until(
                    &journey,
                    &mut enrollments,
                    &mut facts,
                    &policy,
                    self,
                    at,
                    &mut fx,
                );
                let env = env(at);
                for e in enrollments.iter_mut() {
                    engine::on_event(&journey, e, event, false, &mut facts, &env, &mut fx);
                }
                if let Some(e) =
                    self.try_enter(&journey, event, &mut facts, &env, &mut fx, &mut history)
                {
                    enrollments.push(e);
                }
                settle_webhooks(&journey, &mut enrollments, &mut facts, &env, &mut fx);
            }
            fire_until(
                &journey,
                &mut enrollments,
                &mut facts,
                &policy,
                self,
                to_us,
                &mut fx,
            );
            report.still_waiting += enrollments.iter().filter(|e| e.is_active()).count() as u64;
            for step in &fx.steps {
                match step.outcome.as_str() {
                    "entered" => report.entered += 1,
                    "goal" => report.converted += 1,
                    "exited" => report.exited += 1,
                    "suppressed" => report.suppressed += 1,
                    _ => {}
                }
                let count =
                    node_counts
                        .entry(step.node_id.clone())
                        .or_insert_with(|| pb::NodeCount {
                            node_id: step.node_id.clone(),
                            ..pb::NodeCount::default()
                        });
                if reaches(&step.outcome) {
                    count.reached += 1;
                }
                let branch = match step.outcome.as_str() {
                    "branch" | "arm" => Some(step.decision.clone()),
                    "resumed" if step.decision != "delay" && step.decision != "no wait" => {
                        Some(step.decision.clone())
                    }
                    "timeout" => Some("timeout".to_owned()),
                    _ => None,
                };
                if let Some(b) = branch {
                    *count.branches.entry(b).or_default() += 1;
                }
            }
        }
        report.nodes = journey
            .order
            .iter()
            .map(|id| {
                node_counts.remove(id).unwrap_or_else(|| pb::NodeCount {
                    node_id: id.clone(),
                    ..pb::NodeCount::default()
                })
            })
            .collect();
        self.preview_publish(&journey, in_flight, &r.node_map, &mut report)
            .await?;
        Ok(report)
    }

    /// The profile (or, unknown to the cache, the identifier) an event belongs to.
    async fn person_of(&self, e: &Event) -> String {
        for (id_type, value) in [("user_id", &e.user_id), ("anonymous_id", &e.anonymous_id)] {
            if value.is_empty() {
                continue;
            }
            if let Some(profile_id) = self.inner.cache.resolve(id_type, value).await {
                return profile_id;
            }
            if let Some(profile_id) = self.inner.peers.resolve_profile(id_type, value).await {
                return profile_id;
            }
            return format!("{id_type}:{value}");
        }
        format!("event:{}", e.event_id)
    }

    /// Where enrollments in flight on the saved journey would land under `policy`.
    async fn preview_publish(
        &self,
        journey: &Journey,
        policy: pb::InFlightPolicy,
        node_map: &HashMap<String, String>,
        report: &mut pb::SimulateJourneyResponse,
    ) -> Result<(), OrchestratorError> {
        let active = store::active_of_journey(self.db(), &journey.journey_id).await?;
        report.in_flight = active.len() as u64;
        for e in &active {
            match policy {
                pb::InFlightPolicy::Unspecified | pb::InFlightPolicy::Stay => {
                    report.would_stay += 1
                }
                pb::InFlightPolicy::Exit => report.would_exit += 1,
                pb::InFlightPolicy::Migrate => {
                    let target = node_map.get(&e.node_id).unwrap_or(&e.node_id);
                    if journey.nodes.contains_key(target) {
                        *report.would_move_to.entry(target.clone()).or_default() += 1;
                    } else {
                        report.would_exit += 1;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Fires, in order, every simulated wait due by `until`.
fn fire_until(
    journey: &Journey,
    enrollments: &mut [Enrollment],
    facts: &mut Facts,
    policy: &crate::policy::Policy,
    core: &Orchestrator,
    until: i64,
    fx: &mut Effects,
) {
    loop {
        let next = enrollments
            .iter()
            .enumerate()
            .filter(|(_, e)| e.is_active())
            .filter_map(|(i, e)| e.waiting_until.map(|due| (due, i)))
            .filter(|(due, _)| *due <= until)
            .min();
        let Some((due, i)) = next else {
            return;
        };
        let env = Env {
            now_us: due,
            policy,
            emotion: core.inner.settings.emotion,
        };
        let e = &mut enrollments[i];
        if !engine::on_timer(journey, e, facts, &env, fx) {
            // Nothing to fire: never look at it again in this simulation.
            e.waiting_until = None;
        }
        settle_webhooks(journey, enrollments, facts, &env, fx);
    }
}

/// A simulation acts on nothing: webhooks count as delivered at once.
fn settle_webhooks(
    journey: &Journey,
    enrollments: &mut [Enrollment],
    facts: &mut Facts,
    env: &Env<'_>,
    fx: &mut Effects,
) {
    for e in enrollments.iter_mut() {
        while let Waiting::Action(id) = e.waiting.clone() {
            if !engine::on_action_settled(journey, e, &id, Ok(()), facts, env, fx) {
                break;
            }
        }
    }
}
