//! The gRPC adapters: `waymark.profile.v1.ProfileService` and `waymark.common.v1.EventSink`.

use tonic::{Request, Response, Status};
use waymark_kit::sink::EventConsumer;
use waymark_kit::time::{from_micros, micros};
use waymark_proto::common::v1::{DeliverResponse, RejectedEvent};
use waymark_proto::profile::v1::profile_service_server::ProfileService;
use waymark_proto::profile::v1::*;

use crate::service::{Profiles, identity};
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
impl EventConsumer for ProfileGrpc {
    #[tracing::instrument(skip_all, fields(producer = %producer, events = events.len()))]
    async fn deliver(
        &self,
        producer: &str,
        events: Vec<waymark_proto::common::v1::Event>,
    ) -> Result<DeliverResponse, Status> {
        let applied = self.core.apply(events).await?;
        Ok(DeliverResponse {
            applied: applied.applied,
            duplicates: applied.duplicates,
            suppressed: applied.suppressed,
            unattributed: applied.unattributed,
            rejected: applied
                .rejected
                .into_iter()
                .map(|r| RejectedEvent {
                    index: r.index as u32,
                    event_id: r.event_id,
                    field: r.field,
                    reason: r.reason,
                })
                .collect(),
        })
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
        let (merges, do_not_merge) = self.core.merges(&request.into_inner().profile_id).await?;
        Ok(Response::new(ListMergesResponse {
            merges,
            do_not_merge,
        }))
    }

    #[tracing::instrument(skip_all, fields(merge_id = %request.get_ref().merge_id))]
    async fn unmerge(
        &self,
        request: Request<UnmergeRequest>,
    ) -> Result<Response<UnmergeResponse>, Status> {
        let (survivor, restored) = self.core.unmerge(&request.into_inner().merge_id).await?;
        Ok(Response::new(UnmergeResponse {
            survivor: Some(survivor),
            restored: Some(restored),
        }))
    }

    #[tracing::instrument(skip_all, fields(merge_id = %request.get_ref().merge_id))]
    async fn allow_merge(
        &self,
        request: Request<AllowMergeRequest>,
    ) -> Result<Response<AllowMergeResponse>, Status> {
        let allowed = self
            .core
            .allow_merge(&request.into_inner().merge_id)
            .await?;
        Ok(Response::new(AllowMergeResponse {
            allowed: Some(allowed),
        }))
    }

    #[tracing::instrument(skip_all, fields(profile_id = %request.get_ref().profile_id))]
    async fn delete_profile(
        &self,
        request: Request<DeleteProfileRequest>,
    ) -> Result<Response<DeleteProfileResponse>, Status> {
        let r = request.into_inner();
        let deleted = self.core.delete(&r.profile_id, &r.reason).await?;
        Ok(Response::new(DeleteProfileResponse {
            profile_id: deleted.profile_id,
            suppressed: deleted.suppressed.iter().map(identity).collect(),
            timeline_entries: deleted.timeline_entries,
        }))
    }

    #[tracing::instrument(skip_all, fields(profile_id = %request.get_ref().profile_id))]
    async fn export_profile(
        &self,
        request: Request<ExportProfileRequest>,
    ) -> Result<Response<ExportProfileResponse>, Status> {
        let r = request.into_inner();
        let export = self
            .core
            .export(&r.profile_id, r.page_size, &r.page_token)
            .await?;
        Ok(Response::new(ExportProfileResponse {
            profile: export.profile,
            timeline: export.timeline,
            merges: export.merges,
            do_not_merge: export.do_not_merge,
            segments: export.segments,
            next_page_token: export.next_page_token,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_suppressions(
        &self,
        request: Request<ListSuppressionsRequest>,
    ) -> Result<Response<ListSuppressionsResponse>, Status> {
        let r = request.into_inner();
        let (rows, next_page_token) = self.core.suppressions(r.page_size, &r.page_token).await?;
        let suppressions = rows
            .into_iter()
            .map(|row| Suppression {
                identity: Some(identity(&(row.id_type, row.id_value))),
                suppressed_at: Some(from_micros(row.suppressed_at)),
                synced_to_ingest: row.synced_at.is_some(),
            })
            .collect();
        Ok(Response::new(ListSuppressionsResponse {
            suppressions,
            next_page_token,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn put_segment(
        &self,
        request: Request<PutSegmentRequest>,
    ) -> Result<Response<PutSegmentResponse>, Status> {
        let Some(segment) = request.into_inner().segment else {
            return Err(waymark_kit::error::Error::invalid("segment", "is required").into());
        };
        let segment = self.core.put_segment(segment).await?;
        Ok(Response::new(PutSegmentResponse {
            segment: Some(segment),
        }))
    }

    #[tracing::instrument(skip_all, fields(segment_id = %request.get_ref().segment_id))]
    async fn get_segment(
        &self,
        request: Request<GetSegmentRequest>,
    ) -> Result<Response<GetSegmentResponse>, Status> {
        let segment = self
            .core
            .get_segment(&request.into_inner().segment_id)
            .await?;
        Ok(Response::new(GetSegmentResponse {
            segment: Some(segment),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_segments(
        &self,
        _request: Request<ListSegmentsRequest>,
    ) -> Result<Response<ListSegmentsResponse>, Status> {
        let segments = self.core.list_segments().await?;
        Ok(Response::new(ListSegmentsResponse { segments }))
    }

    #[tracing::instrument(skip_all, fields(segment_id = %request.get_ref().segment_id))]
    async fn delete_segment(
        &self,
        request: Request<DeleteSegmentRequest>,
    ) -> Result<Response<DeleteSegmentResponse>, Status> {
        let exited = self
            .core
            .delete_segment(&request.into_inner().segment_id)
            .await?;
        Ok(Response::new(DeleteSegmentResponse { exited }))
    }

    #[tracing::instrument(skip_all, fields(segment_id = %request.get_ref().segment_id))]
    async fn list_segment_members(
        &self,
        request: Request<ListSegmentMembersRequest>,
    ) -> Result<Response<ListSegmentMembersResponse>, Status> {
        let r = request.into_inner();
        let (profile_ids, next_page_token) = self
            .core
            .segment_members(&r.segment_id, r.page_size, &r.page_token)
            .await?;
        Ok(Response::new(ListSegmentMembersResponse {
            profile_ids,
            next_page_token,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_aggregate_status(
        &self,
        _request: Request<GetAggregateStatusRequest>,
    ) -> Result<Response<GetAggregateStatusResponse>, Status> {
        let aggregates = self.core.aggregate_status().await?;
        Ok(Response::new(GetAggregateStatusResponse { aggregates }))
    }
}
