//! The gRPC adapters: `waymark.orchestration.v1.OrchestrationService` and
//! `waymark.common.v1.EventSink`.

use tonic::{Request, Response, Status};
use waymark_kit::sink::EventConsumer;
use waymark_proto::common::v1::{DeliverResponse, Event};
use waymark_proto::orchestration::v1::orchestration_service_server::OrchestrationService;
use waymark_proto::orchestration::v1::*;

use crate::service::Orchestrator;

/// Implements both services over the core.
#[derive(Clone)]
pub struct OrchestratorGrpc {
    core: Orchestrator,
}

impl OrchestratorGrpc {
    /// Wraps the core.
    pub fn new(core: Orchestrator) -> Self {
        Self { core }
    }
}

#[tonic::async_trait]
impl EventConsumer for OrchestratorGrpc {
    #[tracing::instrument(skip_all, fields(producer = %producer, events = events.len()))]
    async fn deliver(&self, producer: &str, events: Vec<Event>) -> Result<DeliverResponse, Status> {
        Ok(self.core.deliver(events).await?)
    }
}

fn policy(value: i32) -> Result<InFlightPolicy, Status> {
    InFlightPolicy::try_from(value).map_err(|_| {
        waymark_kit::error::Error::invalid("in_flight", "is not an InFlightPolicy").into()
    })
}

#[tonic::async_trait]
impl OrchestrationService for OrchestratorGrpc {
    #[tracing::instrument(skip_all)]
    async fn validate_journey(
        &self,
        request: Request<ValidateJourneyRequest>,
    ) -> Result<Response<ValidateJourneyResponse>, Status> {
        let r = request.into_inner();
        let problems = self.core.validate_journey(r.journey.as_ref())?;
        Ok(Response::new(ValidateJourneyResponse { problems }))
    }

    #[tracing::instrument(skip_all, fields(journey = %request.get_ref().journey_id))]
    async fn simulate_journey(
        &self,
        request: Request<SimulateJourneyRequest>,
    ) -> Result<Response<SimulateJourneyResponse>, Status> {
        let r = request.into_inner();
        let in_flight = policy(r.in_flight)?;
        Ok(Response::new(self.core.simulate(r, in_flight).await?))
    }

    #[tracing::instrument(skip_all)]
    async fn put_journey(
        &self,
        request: Request<PutJourneyRequest>,
    ) -> Result<Response<PutJourneyResponse>, Status> {
        let journey = self.core.put_journey(request.into_inner().journey).await?;
        Ok(Response::new(PutJourneyResponse {
            journey: Some(journey),
        }))
    }

    #[tracing::instrument(skip_all, fields(journey = %request.get_ref().journey_id))]
    async fn get_journey(
        &self,
        request: Request<GetJourneyRequest>,
    ) -> Result<Response<GetJourneyResponse>, Status> {
        let r = request.into_inner();
        Ok(Response::new(
            self.core.get_journey(&r.journey_id, r.version).await?,
        ))
    }

    #[tracing::instrument(skip_all)]
    async fn list_journeys(
        &self,
        request: Request<ListJourneysRequest>,
    ) -> Result<Response<ListJourneysResponse>, Status> {
        let r = request.into_inner();
        Ok(Response::new(
            self.core.list_journeys(r.page_size, &r.page_token).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(journey = %request.get_ref().journey_id))]
    async fn publish_journey(
        &self,
        request: Request<PublishJourneyRequest>,
    ) -> Result<Response<PublishJourneyResponse>, Status> {
        let r = request.into_inner();
        let in_flight = policy(r.in_flight)?;
        let node_map = r.node_map.into_iter().collect();
        Ok(Response::new(
            self.core
                .publish_journey(&r.journey_id, in_flight, &node_map)
                .await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(journey = %request.get_ref().journey_id))]
    async fn pause_journey(
        &self,
        request: Request<PauseJourneyRequest>,
    ) -> Result<Response<PauseJourneyResponse>, Status> {
        let journey = self
            .core
            .set_paused(&request.into_inner().journey_id, true)
            .await?;
        Ok(Response::new(PauseJourneyResponse {
            journey: Some(journey),
        }))
    }

    #[tracing::instrument(skip_all, fields(journey = %request.get_ref().journey_id))]
    async fn resume_journey(
        &self,
        request: Request<ResumeJourneyRequest>,
    ) -> Result<Response<ResumeJourneyResponse>, Status> {
        let journey = self
            .core
            .set_paused(&request.into_inner().journey_id, false)
            .await?;
        Ok(Response::new(ResumeJourneyResponse {
            journey: Some(journey),
        }))
    }

    #[tracing::instrument(skip_all, fields(journey = %request.get_ref().journey_id))]
    async fn archive_journey(
        &self,
        request: Request<ArchiveJourneyRequest>,
    ) -> Result<Response<ArchiveJourneyResponse>, Status> {
        let r = request.into_inner();
        Ok(Response::new(
            self.core.archive_journey(&r.journey_id).await?,
        ))
    }

    #[tracing::instrument(skip_all)]
    async fn list_enrollments(
        &self,
        request: Request<ListEnrollmentsRequest>,
    ) -> Result<Response<ListEnrollmentsResponse>, Status> {
        Ok(Response::new(
            self.core.list_enrollments(request.get_ref()).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(enrollment = %request.get_ref().enrollment_id))]
    async fn get_enrollment(
        &self,
        request: Request<GetEnrollmentRequest>,
    ) -> Result<Response<GetEnrollmentResponse>, Status> {
        let r = request.into_inner();
        Ok(Response::new(
            self.core.get_enrollment(&r.enrollment_id).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(enrollment = %request.get_ref().enrollment_id))]
    async fn exit_enrollment(
        &self,
        request: Request<ExitEnrollmentRequest>,
    ) -> Result<Response<ExitEnrollmentResponse>, Status> {
        let r = request.into_inner();
        let enrollment = self
            .core
            .exit_enrollment(&r.enrollment_id, &r.reason)
            .await?;
        Ok(Response::new(ExitEnrollmentResponse {
            enrollment: Some(enrollment),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn put_contact_policy(
        &self,
        request: Request<PutContactPolicyRequest>,
    ) -> Result<Response<PutContactPolicyResponse>, Status> {
        let policy = self
            .core
            .put_contact_policy(request.into_inner().policy)
            .await?;
        Ok(Response::new(PutContactPolicyResponse {
            policy: Some(policy),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_contact_policy(
        &self,
        _request: Request<GetContactPolicyRequest>,
    ) -> Result<Response<GetContactPolicyResponse>, Status> {
        let policy = self.core.get_contact_policy().await?;
        Ok(Response::new(GetContactPolicyResponse {
            policy: Some(policy),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_actions(
        &self,
        request: Request<ListActionsRequest>,
    ) -> Result<Response<ListActionsResponse>, Status> {
        Ok(Response::new(
            self.core.list_actions(request.get_ref()).await?,
        ))
    }

    #[tracing::instrument(skip_all)]
    async fn list_cases(
        &self,
        request: Request<ListCasesRequest>,
    ) -> Result<Response<ListCasesResponse>, Status> {
        Ok(Response::new(
            self.core.list_cases(request.get_ref()).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(case = %request.get_ref().case_id))]
    async fn close_case(
        &self,
        request: Request<CloseCaseRequest>,
    ) -> Result<Response<CloseCaseResponse>, Status> {
        let r = request.into_inner();
        let case = self.core.close_case(&r.case_id, &r.resolution).await?;
        Ok(Response::new(CloseCaseResponse { case: Some(case) }))
    }
}
