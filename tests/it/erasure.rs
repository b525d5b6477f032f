//! The right to be forgotten across services: once the profile service has erased a
//! customer and pushed their identifiers to ingestion, their new events are accepted (an
//! SDK must not retry them) but dropped and counted at the door, and no profile returns.

use std::collections::BTreeSet;

use serde_json::json;
use tonic::Code;
use waymark_proto::ingest::v1::GetStatsRequest;
use waymark_proto::profile::v1::{DeleteProfileRequest, ListSuppressionsRequest};
use waymark_testkit::platform::Platform;
use waymark_testkit::{Backend, admin};

use crate::*;

async fn an_erased_customer_stays_erased(backend: Backend) {
    let (platform, _sink) = boot(backend).await;
    let robin = || {
        json!([
            {"type": "identify", "userId": "cust-3003", "anonymousId": "web-robin",
             "traits": {"email": "Robin@Example.org"}, "context": {"library": {"name": "analytics.js"}}},
            {"type": "track", "userId": "cust-3003", "event": "Order Completed",
             "properties": {"revenue": 40}},
            {"type": "page", "anonymousId": "web-robin", "name": "Account"},
        ])
    };
    send(&platform, robin()).await;
    let before = profile_with_events(&platform, by_identity("email", "robin@example.org"), 3).await;

    let mut client = platform.profile.client().await;
    let deleted = client
        .delete_profile(admin(DeleteProfileRequest {
            profile_id: before.profile_id.clone(),
            reason: "DSR-2024-17".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.profile_id, before.profile_id);
    assert_eq!(deleted.timeline_entries, 3);
    let suppressed: BTreeSet<(String, String)> = deleted
        .suppressed
        .into_iter()
        .map(|i| (i.r#type, i.value))
        .collect();
    let expected: BTreeSet<(String, String)> = [
        ("anonymous_id", "web-robin"),
        ("email", "robin@example.org"),
        ("user_id", "cust-3003"),
    ]
    .into_iter()
    .map(|(t, v)| (t.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(suppressed, expected);

    eventually("the suppressions pushed to ingestion", async || {
        let page = client
            .list_suppressions(admin(ListSuppressionsRequest::default()))
            .await
            .unwrap()
            .into_inner();
        (page.suppressions.len() == 3 && page.suppressions.iter().all(|s| s.synced_to_ingest))
            .then_some(())
    })
    .await;

    assert_eq!(ingest_counts(&platform).await, (3, 0));

    // The same customer comes back on the website and in the shop.
    send(&platform, robin()).await;
    assert_eq!(
        ingest_counts(&platform).await,
        (3, 3),
        "dropped and counted at ingestion"
    );

    // Anything ingestion had let through would reach the profile service before an event
    // committed after it: once this one is applied, nothing of Robin's is on its way.
    send(
        &platform,
        json!([{"type": "track", "userId": "cust-4004", "event": "Signed Up"}]),
    )
    .await;
    profile_with_events(&platform, by_identity("user_id", "cust-4004"), 1).await;
    for request in [
        by_id(&before.profile_id),
        by_identity("email", "robin@example.org"),
        by_identity("user_id", "cust-3003"),
        by_identity("anonymous_id", "web-robin"),
    ] {
        let error = get_profile(&platform, request.clone()).await.unwrap_err();
        assert_eq!(error.code(), Code::NotFound, "{request:?}");
    }
    platform.stop().await;
}
waymark_testkit::on_both_backends!(an_erased_customer_stays_erased);

/// Ingestion's (accepted, suppressed) counters over every source.
async fn ingest_counts(platform: &Platform) -> (u64, u64) {
    let total = platform
        .ingest
        .clone()
        .get_stats(admin(GetStatsRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .total
        .unwrap_or_default();
    (total.accepted, total.suppressed)
}
