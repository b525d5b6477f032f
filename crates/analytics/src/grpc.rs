//! The gRPC adapter: `waymark.analytics.v1.AnalyticsService` and
//! `waymark.common.v1.EventSink` over the core.

use tonic::{Request, Response, Status};
use waymark_kit::sink::EventConsumer;
use waymark_proto::analytics::v1::analytics_service_server::AnalyticsService;
use waymark_proto::analytics::v1::*;
use waymark_proto::common::v1::{DeliverResponse, Event};

use crate::service::Analytics;

/// Implements both services over the core.
#[derive(Clone)]
pub struct AnalyticsGrpc {
    core: Analytics,
}

impl AnalyticsGrpc {
    pub fn new(core: Analytics) -> Self {
        Self { core }
    }
}

#[tonic::async_trait]
impl EventConsumer for AnalyticsGrpc {
    #[tracing::instrument(skip_all, fields(producer, events = events.len()))]
    async fn deliver(&self, producer: &str, events: Vec<Event>) -> Result<DeliverResponse, Status> {
        tracing::Span::current().record("producer", producer);
        Ok(self.core.deliver(events).await?)
    }
}

#[tonic::async_trait]
impl AnalyticsService for AnalyticsGrpc {
    #[tracing::instrument(skip_all, fields(steps = request.get_ref().steps.len()))]
    async fn get_funnel(
        &self,
        request: Request<GetFunnelRequest>,
    ) -> Result<Response<GetFunnelResponse>, Status> {
        Ok(Response::new(self.core.funnel(request.into_inner()).await?))
    }

    #[tracing::instrument(skip_all, fields(depth = request.get_ref().depth))]
    async fn get_paths(
        &self,
        request: Request<GetPathsRequest>,
    ) -> Result<Response<GetPathsResponse>, Status> {
        Ok(Response::new(self.core.paths(request.into_inner()).await?))
    }

    #[tracing::instrument(skip_all)]
    async fn put_journey_map(
        &self,
        request: Request<PutJourneyMapRequest>,
    ) -> Result<Response<PutJourneyMapResponse>, Status> {
        let map = self.core.put_map(request.into_inner().map).await?;
        Ok(Response::new(PutJourneyMapResponse { map: Some(map) }))
    }

    #[tracing::instrument(skip_all, fields(map_id = %request.get_ref().id))]
    async fn get_journey_map(
        &self,
        request: Request<GetJourneyMapRequest>,
    ) -> Result<Response<GetJourneyMapResponse>, Status> {
        let map = self.core.map(&request.into_inner().id)?;
        Ok(Response::new(GetJourneyMapResponse { map: Some(map) }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_journey_maps(
        &self,
        _request: Request<ListJourneyMapsRequest>,
    ) -> Result<Response<ListJourneyMapsResponse>, Status> {
        Ok(Response::new(ListJourneyMapsResponse {
            maps: self.core.maps()?,
        }))
    }

    #[tracing::instrument(skip_all, fields(map_id = %request.get_ref().map_id))]
    async fn get_stage_distribution(
        &self,
        request: Request<GetStageDistributionRequest>,
    ) -> Result<Response<GetStageDistributionResponse>, Status> {
        Ok(Response::new(
            self.core.stage_distribution(request.into_inner()).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(map_id = %request.get_ref().map_id))]
    async fn get_sla_breaches(
        &self,
        request: Request<GetSlaBreachesRequest>,
    ) -> Result<Response<GetSlaBreachesResponse>, Status> {
        Ok(Response::new(
            self.core.sla_breaches(request.into_inner()).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(journey_id = %request.get_ref().journey_id))]
    async fn get_journey_report(
        &self,
        request: Request<GetJourneyReportRequest>,
    ) -> Result<Response<GetJourneyReportResponse>, Status> {
        Ok(Response::new(
            self.core.journey_report(request.into_inner()).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(group_by = request.get_ref().group_by))]
    async fn get_cx_metrics(
        &self,
        request: Request<GetCxMetricsRequest>,
    ) -> Result<Response<GetCxMetricsResponse>, Status> {
        Ok(Response::new(
            self.core.cx_metrics(request.into_inner()).await?,
        ))
    }
}
