//! The gRPC adapters: `waymark.profile.v1.ProfileService` and `waymark.common.v1.EventSink`.

use tonic::{Request, Response, Status};
use waymark_proto::common::v1::event_sink_server::EventSink;
use waymark_proto::common::v1::{DeliverRequest, DeliverResponse};
use waymark_proto::profile::v1::profile_service_server::ProfileService;
use waymark_proto::profile::v1::*;

use crate::model::micros;
use crate::service::Profiles;
use crate::store::TimelineFilter;

/// Implements both services over the core.
#[derive(Clone)]
pub struct ProfileGrpc {
    core: Profiles,
}

impl ProfileGrpc {
    /// Wraps the core.
    pub fn new(core: Profiles) -> Self {
        Self { core }
    }
}

#[tonic::async_trait]
impl EventSink for ProfileGrpc {
    #[tracing::instrument(skip_all, fields(producer = %request.get_ref().producer, events = request.get_ref().events.len()))]
    async fn deliver(
        &self,
        request: Request<DeliverRequest>,
    ) -> Result<Response<DeliverResponse>, Status> {
        let applied = self.core.apply(request.into_inner().events).await?;
        Ok(Response::new(DeliverResponse {
            applied: applied.applied,
            duplicates: applied.duplicates,
        }))
    }
}

#[tonic::async_trait]
impl ProfileService for ProfileGrpc {
    #[tracing::instrument(skip_all)]
    async fn get_profile(
        &self,
        request: Request<GetProfileRequest>,
    ) -> Result<Response<GetProfileResponse>, Status> {
        let r = request.into_inner();
        let profile = match (r.profile_id.is_empty(), r.identity) {
            (false, _) => self.core.get(&r.profile_id).await?,
            (true, Some(identity)) => {
                self.core
                    .get_by_identity(&identity.r#type, &identity.value)
                    .await?
            }
            (true, None) => {
                return Err(waymark_kit::error::Error::invalid(
                    "profile_id",
                    "profile_id or identity is required",
                )
                .into());
            }
        };
        Ok(Response::new(GetProfileResponse {
            profile: Some(profile),
        }))
    }

    #[tracing::instrument(skip_all, fields(ids = request.get_ref().profile_ids.len()))]
    async fn batch_get_profiles(
        &self,
        request: Request<BatchGetProfilesRequest>,
    ) -> Result<Response<BatchGetProfilesResponse>, Status> {
        let profiles = self
            .core
            .batch_get(&request.into_inner().profile_ids)
            .await?;
        Ok(Response::new(BatchGetProfilesResponse { profiles }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_timeline(
        &self,
        request: Request<GetTimelineRequest>,
    ) -> Result<Response<GetTimelineResponse>, Status> {
        let r = request.into_inner();
        let filter = TimelineFilter {
            profile_id: r.profile_id,
            channels: r.channels,
            types: r.types,
            name: (!r.name.is_empty()).then_some(r.name),
            start: r.start_time.as_ref().map(micros),
            end: r.end_time.as_ref().map(micros),
            before: None,
            limit: r.page_size,
        };
        let (entries, next_page_token) = self.core.timeline(filter, &r.page_token).await?;
        Ok(Response::new(GetTimelineResponse {
            entries,
            next_page_token,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn update_traits(
        &self,
        request: Request<UpdateTraitsRequest>,
    ) -> Result<Response<UpdateTraitsResponse>, Status> {
        let r = request.into_inner();
        let profile = self
            .core
            .update_traits(&r.profile_id, r.traits.unwrap_or_default(), &r.source)
            .await?;
        Ok(Response::new(UpdateTraitsResponse {
            profile: Some(profile),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn set_consent(
        &self,
        request: Request<SetConsentRequest>,
    ) -> Result<Response<SetConsentResponse>, Status> {
        let r = request.into_inner();
        let profile = self
            .core
            .set_consent(&r.profile_id, &r.channel, &r.purpose, r.granted, &r.source)
            .await?;
        Ok(Response::new(SetConsentResponse {
            profile: Some(profile),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_merges(
        &self,
        request: Request<ListMergesRequest>,
    ) -> Result<Response<ListMergesResponse>, Status> {
        let merges = self.core.merges(&request.into_inner().profile_id).await?;
        Ok(Response::new(ListMergesResponse { merges }))
    }
}
