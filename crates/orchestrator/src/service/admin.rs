//! The admin API's rules: journeys and their versions, enrollments, actions, cases and the
//! contact policy.

use std::collections::HashMap;

use sea_orm::DbErr;
use waymark_kit::time::from_micros;
use waymark_proto::json::struct_from_json;
use waymark_proto::orchestration::v1 as pb;

use super::{Orchestrator, OrchestratorError, invalid};
use crate::engine::{self, Effects};
use crate::journey;
use crate::model::{ActionStatus, Enrollment, Status, StepRecord};
use crate::policy::Policy;
use crate::store::{self, ActionFilter, ActionRow, CaseRow, Changed, EnrollmentFilter, JourneyRow};

/// Page sizes: 0 means the default, more than the maximum is refused.
const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;
/// Steps GetEnrollment returns.
const MAX_STEPS: u64 = 500;

fn page_size(field: &str, n: u32) -> Result<u64, OrchestratorError> {
    match n {
        0 => Ok(u64::from(DEFAULT_PAGE)),
        n if n > MAX_PAGE => Err(invalid(field, format!("must be at most {MAX_PAGE}"))),
        n => Ok(u64::from(n)),
    }
}

fn token(field: &str, t: &str) -> Result<Option<(i64, String)>, OrchestratorError> {
    if t.is_empty() {
        return Ok(None);
    }
    store::parse_page_token(t)
        .map(Some)
        .ok_or_else(|| invalid(field, "is not a token this service returned"))
}

/// One page of `rows` (read with one more than `limit` to know whether more follow): the
/// first `limit` as the API shows them, and the token of the next page (empty on the last).
fn page<T, U>(
    rows: Vec<T>,
    limit: u64,
    token_of: impl Fn(&T) -> String,
    show: impl Fn(&T) -> U,
) -> (Vec<U>, String) {
    let more = rows.len() as u64 > limit;
    let rows = &rows[..rows.len().min(limit as usize)];
    let next = match rows.last() {
        Some(last) if more => token_of(last),
        _ => String::new(),
    };
    (rows.iter().map(show).collect(), next)
}

fn summary(row: &JourneyRow, active: i64) -> pb::JourneySummary {
    pb::JourneySummary {
        journey_id: row.journey_id.clone(),
        name: row.name.clone(),
        status: i32::from(row.status),
        live_version: u32::try_from(row.live_version).unwrap_or(0),
        draft_changed: row.draft_changed != 0,
        active_enrollments: u64::try_from(active).unwrap_or(0),
        updated_at: Some(from_micros(row.updated_at)),
    }
}

/// An enrollment as the API shows it.
pub fn enrollment_proto(e: &Enrollment) -> pb::Enrollment {
    pb::Enrollment {
        enrollment_id: e.enrollment_id.clone(),
        journey_id: e.journey_id.clone(),
        version: e.version,
        profile_id: e.profile_id.clone(),
        key: e.key.clone(),
        status: e.status.proto() as i32,
        node_id: e.node_id.clone(),
        waiting_until: e.waiting_until.map(from_micros),
        entered_at: Some(from_micros(e.entered_at)),
        ended_at: e.ended_at.map(from_micros),
        reason: e.reason.clone(),
        context: Some(struct_from_json(e.context.clone())),
    }
}

fn step_proto(s: &StepRecord) -> pb::Step {
    pb::Step {
        node_id: s.node_id.clone(),
        outcome: s.outcome.clone(),
        decision: s.decision.clone(),
        detail: Some(struct_from_json(s.detail.clone())),
        at: Some(from_micros(s.at)),
    }
}

fn action_proto(a: &ActionRow) -> pb::Action {
    let payload = a.payload().ok().and_then(|p| match p {
        serde_json::Value::Object(m) => Some(struct_from_json(m)),
        _ => None,
    });
    pb::Action {
        action_id: a.action_id.clone(),
        enrollment_id: a.enrollment_id.clone(),
        journey_id: a.journey_id.clone(),
        node_id: a.node_id.clone(),
        profile_id: a.profile_id.clone(),
        kind: a.kind.clone(),
        target: a.target.clone(),
        status: i32::from(a.status),
        reason: a.reason.clone(),
        attempts: u32::try_from(a.attempts).unwrap_or(0),
        created_at: Some(from_micros(a.created_at)),
        due_at: Some(from_micros(a.due_at)),
        sent_at: a.sent_at.map(from_micros),
        payload,
    }
}

fn case_proto(c: &CaseRow) -> pb::Case {
    pb::Case {
        case_id: c.case_id.clone(),
        profile_id: c.profile_id.clone(),
        journey_id: c.journey_id.clone(),
        enrollment_id: c.enrollment_id.clone(),
        priority: c.priority.clone(),
        reason: c.reason.clone(),
        open: c.open != 0,
        opened_at: Some(from_micros(c.opened_at)),
        closed_at: c.closed_at.map(from_micros),
        resolution: c.resolution.clone(),
    }
}

fn problems_proto(problems: Vec<journey::Problem>) -> Vec<pb::JourneyProblem> {
    problems
        .into_iter()
        .map(|p| pb::JourneyProblem {
            node_id: p.node_id,
            field: p.field,
            problem: p.problem,
        })
        .collect()
}

impl Orchestrator {
    /// Every problem of `definition`; empty when it is valid.
    pub fn validate_journey(
        &self,
        definition: Option<&pb::JourneyDefinition>,
    ) -> Result<Vec<pb::JourneyProblem>, OrchestratorError> {
        let definition = definition.ok_or_else(|| invalid("journey", "is required"))?;
        Ok(match journey::compile(definition, 0) {
            Ok(_) => Vec::new(),
            Err(problems) => problems_proto(problems),
        })
    }

    /// Saves a draft.
    pub async fn put_journey(
        &self,
        definition: Option<pb::JourneyDefinition>,
    ) -> Result<pb::JourneySummary, OrchestratorError> {
        let definition = definition.ok_or_else(|| invalid("journey", "is required"))?;
        journey::compile(&definition, 0).map_err(OrchestratorError::InvalidJourney)?;
        let existing = store::journey(self.db(), &definition.journey_id).await?;
        if existing
            .as_ref()
            .is_some_and(|j| j.status == pb::JourneyStatus::Archived as i16)
        {
            return Err(OrchestratorError::FailedPrecondition(format!(
                "journey `{}` is archived",
                definition.journey_id
            )));
        }
        let row = store::put_draft(self.db(), &definition, self.now()).await?;
        let active = store::active_enrollments(self.db(), &row.journey_id).await?;
        Ok(summary(&row, active))
    }

    async fn journey_row(&self, journey_id: &str) -> Result<JourneyRow, OrchestratorError> {
        if journey_id.is_empty() {
            return Err(invalid("journey_id", "is required"));
        }
        store::journey(self.db(), journey_id)
            .await?
            .ok_or_else(|| OrchestratorError::NotFound(format!("no journey `{journey_id}`")))
    }

    /// A journey with its draft (or a version) and its versions.
    pub async fn get_journey(
        &self,
        journey_id: &str,
        version: u32,
    ) -> Result<pb::GetJourneyResponse, OrchestratorError> {
        let row = self.journey_row(journey_id).await?;
        let definition = if version == 0 {
            store::draft(self.db(), journey_id).await?
        } else {
            Some(
                store::version(self.db(), journey_id, version)
                    .await?
                    .ok_or_else(|| {
                        OrchestratorError::NotFound(format!(
                            "journey `{journey_id}` has no version {version}"
                        ))
                    })?,
            )
        };
        let versions = store::versions(self.db(), journey_id).await?;
        let active = versions.iter().map(|v| v.active).sum();
        Ok(pb::GetJourneyResponse {
            journey: Some(summary(&row, active)),
            definition,
            versions: versions
                .iter()
                .map(|v| pb::JourneyVersion {
                    version: u32::try_from(v.version).unwrap_or(0),
                    published_at: Some(from_micros(v.published_at)),
                    in_flight: i32::from(v.in_flight),
                    active_enrollments: u64::try_from(v.active).unwrap_or(0),
                })
                .collect(),
        })
    }

    /// Journeys by id, paged.
    pub async fn list_journeys(
        &self,
        size: u32,
        page_token: &str,
    ) -> Result<pb::ListJourneysResponse, OrchestratorError> {
        let limit = page_size("page_size", size)?;
        let rows = store::list(self.db(), page_token, limit + 1).await?;
        let (journeys, next_page_token) = page(
            rows,
            limit,
            |(row, _)| row.journey_id.clone(),
            |(row, active)| summary(row, *active),
        );
        Ok(pb::ListJourneysResponse {
            journeys,
            next_page_token,
        })
    }

    /// Publishes the draft as a new version and applies `in_flight` to enrollments on
    /// earlier versions.
    pub async fn publish_journey(
        &self,
        journey_id: &str,
        in_flight: pb::InFlightPolicy,
        node_map: &HashMap<String, String>,
    ) -> Result<pb::PublishJourneyResponse, OrchestratorError> {
        let row = self.journey_row(journey_id).await?;
        if row.status == pb::JourneyStatus::Archived as i16 {
            return Err(OrchestratorError::FailedPrecondition(format!(
                "journey `{journey_id}` is archived"
            )));
        }
        let draft = store::draft(self.db(), journey_id)
            .await?
            .ok_or_else(|| OrchestratorError::NotFound(format!("no journey `{journey_id}`")))?;
        let version = u32::try_from(row.live_version).unwrap_or(0) + 1;
        let compiled =
            journey::compile(&draft, version).map_err(OrchestratorError::InvalidJourney)?;
        for (from, to) in node_map {
            if !compiled.nodes.contains_key(to) {
                return Err(invalid(
                    &format!("node_map[{from}]"),
                    format!("names node `{to}`, which the new version does not have"),
                ));
            }
        }
        let now = self.now();
        let txn = waymark_kit::db::begin_write(self.db()).await?;
        store::publish(&txn, journey_id, version, in_flight, now).await?;
        let mut moved = 0;
        let mut exited = 0;
        let mut in_flight_enrollments =
            store::active_on_other_versions(&txn, journey_id, version).await?;
        let loaded: Vec<i64> = in_flight_enrollments.iter().map(|e| e.seq).collect();
        let mut fx = Effects::default();
        for e in &mut in_flight_enrollments {
            match in_flight {
                pb::InFlightPolicy::Unspecified | pb::InFlightPolicy::Stay => {}
                pb::InFlightPolicy::Exit => {
                    engine::end(
                        e,
                        Status::Exited,
                        &format!("version {version} published"),
                        now,
                        &mut fx,
                    );
                    exited += 1;
                }
                pb::InFlightPolicy::Migrate => {
                    let target = node_map
                        .get(&e.node_id)
                        .cloned()
                        .unwrap_or_else(|| e.node_id.clone());
                    if compiled.nodes.contains_key(&target) {
                        engine::migrate(&compiled, e, &target, now, &mut fx);
                        moved += 1;
                    } else {
                        engine::end(
                            e,
                            Status::Exited,
                            &format!("node `{}` is not in version {version}", e.node_id),
                            now,
                            &mut fx,
                        );
                        exited += 1;
                    }
                }
            }
        }
        let changed: Vec<Changed> = in_flight_enrollments
            .iter()
            .zip(&loaded)
            .filter(|(e, seq)| e.seq != **seq)
            .map(|(e, seq)| Changed {
                enrollment: e,
                loaded_seq: Some(*seq),
            })
            .collect();
        self.commit_run(&txn, &changed, &fx).await?;
        txn.commit().await?;
        self.after_commit(&changed, &fx);
        self.inner.catalog.reload().await?;
        let row = self.journey_row(journey_id).await?;
        let active = store::active_enrollments(self.db(), journey_id).await?;
        Ok(pb::PublishJourneyResponse {
            journey: Some(summary(&row, active)),
            version,
            moved,
            exited,
        })
    }

    /// Pauses or resumes a journey.
    pub async fn set_paused(
        &self,
        journey_id: &str,
        paused: bool,
    ) -> Result<pb::JourneySummary, OrchestratorError> {
        let row = self.journey_row(journey_id).await?;
        let (from, to) = if paused {
            (pb::JourneyStatus::Live, pb::JourneyStatus::Paused)
        } else {
            (pb::JourneyStatus::Paused, pb::JourneyStatus::Live)
        };
        if row.status != from as i16 {
            return Err(OrchestratorError::FailedPrecondition(format!(
                "journey `{journey_id}` is {}, not {}",
                status_name(row.status),
                status_name(from as i16)
            )));
        }
        store::set_status(self.db(), journey_id, to, self.now()).await?;
        self.inner.catalog.reload().await?;
        if !paused {
            self.inner.timers.notify_one();
        }
        let row = self.journey_row(journey_id).await?;
        let active = store::active_enrollments(self.db(), journey_id).await?;
        Ok(summary(&row, active))
    }

    /// Archives a journey: its active enrollments exit.
    pub async fn archive_journey(
        &self,
        journey_id: &str,
    ) -> Result<pb::ArchiveJourneyResponse, OrchestratorError> {
        self.journey_row(journey_id).await?;
        let now = self.now();
        let txn = waymark_kit::db::begin_write(self.db()).await?;
        store::set_status(&txn, journey_id, pb::JourneyStatus::Archived, now).await?;
        let mut active = store::active_of_journey(&txn, journey_id).await?;
        let loaded: Vec<i64> = active.iter().map(|e| e.seq).collect();
        let mut fx = Effects::default();
        for e in &mut active {
            engine::end(e, Status::Exited, "archived", now, &mut fx);
        }
        let changed: Vec<Changed> = active
            .iter()
            .zip(&loaded)
            .map(|(e, seq)| Changed {
                enrollment: e,
                loaded_seq: Some(*seq),
            })
            .collect();
        self.commit_run(&txn, &changed, &fx).await?;
        txn.commit().await?;
        self.after_commit(&changed, &fx);
        self.inner.catalog.reload().await?;
        let row = self.journey_row(journey_id).await?;
        Ok(pb::ArchiveJourneyResponse {
            journey: Some(summary(&row, 0)),
            exited: active.len() as u64,
        })
    }

    /// Enrollments of a journey or a profile, newest first.
    pub async fn list_enrollments(
        &self,
        r: &pb::ListEnrollmentsRequest,
    ) -> Result<pb::ListEnrollmentsResponse, OrchestratorError> {
        if r.journey_id.is_empty() == r.profile_id.is_empty() {
            return Err(invalid(
                "journey_id",
                "give exactly one of journey_id and profile_id",
            ));
        }
        let limit = page_size("page_size", r.page_size)?;
        let status = match pb::EnrollmentStatus::try_from(r.status) {
            Ok(pb::EnrollmentStatus::Unspecified) => None,
            Ok(s) => Some(Status::from_i32(s as i32)),
            Err(_) => return Err(invalid("status", "is not an EnrollmentStatus")),
        };
        let filter = EnrollmentFilter {
            journey_id: (!r.journey_id.is_empty()).then_some(r.journey_id.as_str()),
            profile_id: (!r.profile_id.is_empty()).then_some(r.profile_id.as_str()),
            status,
            before: token("page_token", &r.page_token)?,
            limit: limit + 1,
        };
        let rows = store::list_enrollments(self.db(), &filter).await?;
        let (enrollments, next_page_token) = page(
            rows,
            limit,
            |e| store::page_token(e.entered_at, &e.enrollment_id),
            enrollment_proto,
        );
        Ok(pb::ListEnrollmentsResponse {
            enrollments,
            next_page_token,
        })
    }

    /// One enrollment and its path.
    pub async fn get_enrollment(
        &self,
        enrollment_id: &str,
    ) -> Result<pb::GetEnrollmentResponse, OrchestratorError> {
        let e = self.enrollment(enrollment_id).await?;
        let steps = store::steps(self.db(), enrollment_id, MAX_STEPS).await?;
        Ok(pb::GetEnrollmentResponse {
            enrollment: Some(enrollment_proto(&e)),
            steps: steps.iter().map(step_proto).collect(),
        })
    }

    async fn enrollment(&self, enrollment_id: &str) -> Result<Enrollment, OrchestratorError> {
        if enrollment_id.is_empty() {
            return Err(invalid("enrollment_id", "is required"));
        }
        store::enrollment(self.db(), enrollment_id)
            .await?
            .ok_or_else(|| OrchestratorError::NotFound(format!("no enrollment `{enrollment_id}`")))
    }

    /// Ends an active enrollment by hand.
    pub async fn exit_enrollment(
        &self,
        enrollment_id: &str,
        reason: &str,
    ) -> Result<pb::Enrollment, OrchestratorError> {
        for _ in 0..5 {
            let mut e = self.enrollment(enrollment_id).await?;
            if !e.is_active() {
                return Err(OrchestratorError::FailedPrecondition(format!(
                    "enrollment `{enrollment_id}` has ended already"
                )));
            }
            let loaded = e.seq;
            let mut fx = Effects::default();
            let reason = if reason.is_empty() {
                "exited by an operator"
            } else {
                reason
            };
            engine::end(&mut e, Status::Exited, reason, self.now(), &mut fx);
            let txn = waymark_kit::db::begin_write(self.db()).await?;
            let changed = [Changed {
                enrollment: &e,
                loaded_seq: Some(loaded),
            }];
            match self.commit_run(&txn, &changed, &fx).await {
                Err(DbErr::RecordNotUpdated) => continue,
                other => other?,
            }
            txn.commit().await?;
            self.after_commit(&changed, &fx);
            return Ok(enrollment_proto(&e));
        }
        Err(OrchestratorError::Unavailable(
            "the enrollment kept changing; retry".into(),
        ))
    }

    /// Replaces the contact policy.
    pub async fn put_contact_policy(
        &self,
        policy: Option<pb::ContactPolicy>,
    ) -> Result<pb::ContactPolicy, OrchestratorError> {
        let policy = policy.ok_or_else(|| invalid("policy", "is required"))?;
        Policy::compile(&policy)
            .map_err(|(field, problem)| invalid(&format!("policy.{field}"), problem))?;
        store::put_contact_policy(self.db(), &policy, self.now()).await?;
        self.inner.catalog.reload().await?;
        Ok(policy)
    }

    /// The contact policy in force.
    pub async fn get_contact_policy(&self) -> Result<pb::ContactPolicy, OrchestratorError> {
        Ok(store::contact_policy(self.db()).await?.unwrap_or_default())
    }

    /// Actions, newest first.
    pub async fn list_actions(
        &self,
        r: &pb::ListActionsRequest,
    ) -> Result<pb::ListActionsResponse, OrchestratorError> {
        let limit = page_size("page_size", r.page_size)?;
        let status = match pb::ActionStatus::try_from(r.status) {
            Ok(pb::ActionStatus::Unspecified) => None,
            Ok(s) => Some(ActionStatus::from_i32(s as i32)),
            Err(_) => return Err(invalid("status", "is not an ActionStatus")),
        };
        let some = |s: &str| (!s.is_empty()).then_some(s.to_owned());
        let (journey, profile, enrollment) = (
            some(&r.journey_id),
            some(&r.profile_id),
            some(&r.enrollment_id),
        );
        let filter = ActionFilter {
            journey_id: journey.as_deref(),
            profile_id: profile.as_deref(),
            enrollment_id: enrollment.as_deref(),
            status,
            before: token("page_token", &r.page_token)?,
            limit: limit + 1,
        };
        let rows = store::list_actions(self.db(), &filter).await?;
        let (actions, next_page_token) = page(
            rows,
            limit,
            |a| store::page_token(a.created_at, &a.action_id),
            action_proto,
        );
        Ok(pb::ListActionsResponse {
            actions,
            next_page_token,
        })
    }

    /// Cases, newest first.
    pub async fn list_cases(
        &self,
        r: &pb::ListCasesRequest,
    ) -> Result<pb::ListCasesResponse, OrchestratorError> {
        let limit = page_size("page_size", r.page_size)?;
        let profile = (!r.profile_id.is_empty()).then_some(r.profile_id.as_str());
        let rows = store::list_cases(
            self.db(),
            r.open_only,
            profile,
            token("page_token", &r.page_token)?,
            limit + 1,
        )
        .await?;
        let (cases, next_page_token) = page(
            rows,
            limit,
            |c| store::page_token(c.opened_at, &c.case_id),
            case_proto,
        );
        Ok(pb::ListCasesResponse {
            cases,
            next_page_token,
        })
    }

    /// Closes a case.
    pub async fn close_case(
        &self,
        case_id: &str,
        resolution: &str,
    ) -> Result<pb::Case, OrchestratorError> {
        if case_id.is_empty() {
            return Err(invalid("case_id", "is required"));
        }
        let txn = waymark_kit::db::begin_write(self.db()).await?;
        let closed = store::close_case(&txn, case_id, resolution, self.now()).await?;
        txn.commit().await?;
        let case = store::case(self.db(), case_id)
            .await?
            .ok_or_else(|| OrchestratorError::NotFound(format!("no case `{case_id}`")))?;
        if !closed {
            return Err(OrchestratorError::FailedPrecondition(format!(
                "case `{case_id}` is closed already"
            )));
        }
        Ok(case_proto(&case))
    }
}

fn status_name(status: i16) -> &'static str {
    match pb::JourneyStatus::try_from(i32::from(status)).unwrap_or_default() {
        pb::JourneyStatus::Unspecified => "unknown",
        pb::JourneyStatus::Draft => "a draft",
        pb::JourneyStatus::Live => "live",
        pb::JourneyStatus::Paused => "paused",
        pb::JourneyStatus::Archived => "archived",
    }
}
