//! End-to-end: the real ingestion and profile services in-process on port 0, wired both
//! ways, driven only through their public APIs (Segment HTTP with a write key, gRPC with
//! the admin token) the way a customer's systems would. Every scenario runs on PostgreSQL
//! with the shared Redis cache (production) and on SQLite with the in-process cache (the
//! `waymark dev` default).

mod analytics;
mod erasure;
mod journey;
mod orchestration;

use tonic::Status;
use waymark_proto::common::v1::Identity;
use waymark_proto::profile::v1::{GetProfileRequest, Profile};
use waymark_testkit::platform::Platform;
use waymark_testkit::{Backend, PATIENCE, Sink, admin, eventually, redis_url};

/// The platform with a real `EventSink` consumer downstream of the profile service.
async fn boot(backend: Backend) -> (Platform, Sink) {
    let sink = Sink::default();
    let redis = match backend {
        Backend::Postgres => Some(redis_url()),
        Backend::Sqlite => None,
    };
    let platform = Platform::start(backend, &sink.start().await, redis.as_deref()).await;
    (platform, sink)
}

/// Posts one Segment batch, as an SDK or a back-end would, and expects it accepted.
async fn send(platform: &Platform, batch: serde_json::Value) {
    let status = platform
        .post_batch(serde_json::json!({ "batch": batch }))
        .await;
    assert_eq!(status, 200, "the batch is accepted");
}

fn by_identity(t: &str, value: &str) -> GetProfileRequest {
    GetProfileRequest {
        profile_id: String::new(),
        identity: Some(Identity {
            r#type: t.into(),
            value: value.into(),
        }),
    }
}

fn by_id(profile_id: &str) -> GetProfileRequest {
    GetProfileRequest {
        profile_id: profile_id.into(),
        identity: None,
    }
}

async fn get_profile(platform: &Platform, request: GetProfileRequest) -> Result<Profile, Status> {
    let response = platform
        .profile
        .client()
        .await
        .get_profile(admin(request))
        .await?;
    Ok(response.into_inner().profile.unwrap_or_default())
}

/// The profile found by `request` once it holds `events` events.
async fn profile_with_events(
    platform: &Platform,
    request: GetProfileRequest,
    events: u64,
) -> Profile {
    let what = format!("{events} events on one profile");
    eventually(&what, PATIENCE, async || {
        get_profile(platform, request.clone())
            .await
            .ok()
            .filter(|p| {
                p.computed
                    .as_ref()
                    .is_some_and(|c| c.total_events == events)
            })
    })
    .await
}
