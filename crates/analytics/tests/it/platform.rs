//! Analytics behind the real ingestion and profile services: events sent to ingestion
//! reach analytics resolved, an anonymous visitor who identifies later is one customer,
//! and journey-map stages are written back to the profile.

use serde_json::json;
use tokio::net::TcpListener;
use waymark_proto::analytics::v1::*;
use waymark_proto::common::v1::Identity;
use waymark_proto::profile::v1::GetProfileRequest;
use waymark_testkit::platform::Platform;
use waymark_testkit::{PATIENCE, eventually};

use crate::support::*;

fn stage_map() -> JourneyMap {
    JourneyMap {
        id: "shop".into(),
        name: "Shop".into(),
        stages: vec![
            stage("research", "Product Searched", "1h"),
            stage("select", "Product Viewed", "30d"),
        ],
        write_back: true,
        ..JourneyMap::default()
    }
}

async fn stages_reach_the_profile_of_a_visitor_who_identified_later(backend: Backend) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let analytics_url = format!("http://{}", listener.local_addr().unwrap());
    let platform = Platform::start_with(backend, "http://127.0.0.1:9", &analytics_url, None).await;
    let db = TestDb::new(backend).await;
    let server = TestAnalytics::start_on(listener, config(&db.url, &platform.profile.url())).await;
    let now = now_secs();
    let status = platform
        .post_batch(json!({"batch": [
            {"type": "track", "anonymousId": "anon-7", "event": "Product Searched",
             "timestamp": iso(now - 2 * HOUR)},
            {"type": "identify", "anonymousId": "anon-7", "userId": "u7",
             "traits": {"email": "u7@example.com"}, "timestamp": iso(now - HOUR)},
            {"type": "track", "userId": "u7", "event": "Product Viewed",
             "timestamp": iso(now - HOUR + 60)},
            {"type": "track", "userId": "u8", "event": "Product Searched",
             "timestamp": iso(now - 3 * HOUR)},
        ]}))
        .await;
    assert_eq!(status, 200);
    let request = GetFunnelRequest {
        steps: steps(&["Product Searched", "Product Viewed"]),
        window: "1d".into(),
        ..GetFunnelRequest::default()
    };
    eventually("both customers in the funnel", PATIENCE, async || {
        let total = server.funnel(request.clone()).await.total.unwrap();
        (reached(&total) == vec![2, 1])
            .then_some(())
            .ok_or(reached(&total))
    })
    .await;
    server
        .client()
        .await
        .put_journey_map(admin(PutJourneyMapRequest {
            map: Some(stage_map()),
        }))
        .await
        .unwrap();
    assert_eq!(server.core.write_back().await.unwrap(), 2);
    // Nothing changed since: nothing is written again.
    assert_eq!(server.core.write_back().await.unwrap(), 0);
    let profiles = platform.profile.client().await;
    let traits = |user: &str| {
        let request = admin(GetProfileRequest {
            identity: Some(Identity {
                r#type: "user_id".into(),
                value: user.into(),
            }),
            ..GetProfileRequest::default()
        });
        let mut profiles = profiles.clone();
        async move {
            let profile = profiles
                .get_profile(request)
                .await
                .unwrap()
                .into_inner()
                .profile
                .unwrap();
            waymark_proto::json::struct_to_json(&profile.traits.unwrap_or_default())
        }
    };
    let u7 = traits("u7").await;
    assert_eq!(
        (u7["stage_shop"].clone(), u7["stuck_shop"].clone()),
        (json!("select"), json!(false))
    );
    let u8 = traits("u8").await;
    assert_eq!(
        (u8["stage_shop"].clone(), u8["stuck_shop"].clone()),
        (json!("research"), json!(true))
    );
    server.stop().await;
    platform.stop().await;
}
waymark_testkit::on_both_backends!(stages_reach_the_profile_of_a_visitor_who_identified_later);

/// Now, in seconds since the epoch.
fn now_secs() -> i64 {
    waymark_kit::time::now_micros() / 1_000_000
}

/// An RFC 3339 time of `secs` since the epoch.
fn iso(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0)
        .expect("a time in range")
        .to_rfc3339()
}
