//! Analytics end to end: events posted to ingestion reach analytics resolved by the
//! profile service, and the orchestrator's steps reach it through its own relay. A visitor
//! who identifies later is one customer, a journey's report agrees with the enrollments
//! the orchestrator shows, and an erased customer leaves the answers.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::json;
use tokio::net::TcpListener;
use tonic::transport::Channel;
use waymark_analytics::AnalyticsServer;
use waymark_kit::CancellationToken;
use waymark_kit::config::Config;
use waymark_kit::secret::Secret;
use waymark_orchestrator::OrchestratorServer;
use waymark_proto::analytics::v1::analytics_service_client::AnalyticsServiceClient;
use waymark_proto::analytics::v1::{
    EventMatcher, GetFunnelRequest, GetJourneyReportRequest, GetJourneyReportResponse,
};
use waymark_proto::orchestration::v1::orchestration_service_client::OrchestrationServiceClient;
use waymark_proto::orchestration::v1::*;
use waymark_proto::profile::v1::DeleteProfileRequest;
use waymark_testkit::platform::{Platform, wait_serving};
use waymark_testkit::{ADMIN_TOKEN, Backend, PATIENCE, admin, eventually, redis_url};

use crate::{by_identity, get_profile, send};

const JOURNEY: &str = "welcome";
/// Customers who sign up from the back-end, known by their user id from the start.
const MEMBERS: usize = 10;

/// What a journey's enrollments came to, as the orchestrator shows them and as the
/// analytics report counts them.
#[derive(Debug, PartialEq, Default)]
struct Readout {
    enrollments: u64,
    converted: u64,
    /// Per arm of the split: enrollments and conversions.
    arms: BTreeMap<String, (u64, u64)>,
    /// Per node: enrollments that reached it.
    entered: BTreeMap<String, u64>,
    /// Per node: enrollments that reached the goal there.
    goals: BTreeMap<String, u64>,
}

/// The readout of the orchestrator: every enrollment of the journey and its steps.
async fn orchestrator_readout(client: &mut OrchestrationServiceClient<Channel>) -> Readout {
    let mut readout = Readout::default();
    for enrollment in enrollments(client).await {
        let steps = client
            .get_enrollment(admin(GetEnrollmentRequest {
                enrollment_id: enrollment.enrollment_id.clone(),
            }))
            .await
            .unwrap()
            .into_inner()
            .steps;
        let converted = enrollment.status == EnrollmentStatus::Converted as i32;
        readout.enrollments += 1;
        readout.converted += u64::from(converted);
        if let Some(arm) = steps.iter().find(|s| s.outcome == "arm") {
            let counts = readout.arms.entry(arm.decision.clone()).or_default();
            counts.0 += 1;
            counts.1 += u64::from(converted);
        }
        let nodes: BTreeSet<&str> = steps.iter().map(|s| s.node_id.as_str()).collect();
        for node in nodes {
            *readout.entered.entry(node.to_owned()).or_default() += 1;
        }
        if let Some(goal) = steps.iter().find(|s| s.outcome == "goal") {
            *readout.goals.entry(goal.node_id.clone()).or_default() += 1;
        }
    }
    readout
}

fn analytics_readout(report: &GetJourneyReportResponse) -> Readout {
    let mut readout = Readout {
        enrollments: report.enrollments,
        converted: report.converted,
        ..Readout::default()
    };
    for split in &report.splits {
        for variant in &split.variants {
            readout.arms.insert(
                variant.arm.clone(),
                (variant.enrollments, variant.conversions),
            );
        }
    }
    for node in &report.nodes {
        readout.entered.insert(node.node_id.clone(), node.entered);
        if node.goal_reached > 0 {
            readout
                .goals
                .insert(node.node_id.clone(), node.goal_reached);
        }
    }
    readout
}

async fn enrollments(client: &mut OrchestrationServiceClient<Channel>) -> Vec<Enrollment> {
    client
        .list_enrollments(admin(ListEnrollmentsRequest {
            journey_id: JOURNEY.into(),
            page_size: 1000,
            ..ListEnrollmentsRequest::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .enrollments
}

/// Waits until the journey has `total` enrollments, `converted` of them converted and the
/// rest waiting at the wait node.
async fn wait_for_enrollments(
    client: &mut OrchestrationServiceClient<Channel>,
    total: usize,
    converted: usize,
) {
    let what = format!("{total} enrollments, {converted} converted");
    eventually(&what, PATIENCE, async || {
        let list = enrollments(client).await;
        let done = list
            .iter()
            .filter(|e| e.status == EnrollmentStatus::Converted as i32)
            .count();
        let waiting = list
            .iter()
            .filter(|e| e.status == EnrollmentStatus::Active as i32 && e.node_id == "wait")
            .count();
        if list.len() == total && done == converted && waiting == total - converted {
            Ok(())
        } else {
            Err(format!(
                "{} enrollments, {done} converted, {waiting} waiting",
                list.len()
            ))
        }
    })
    .await;
}

/// Customers who viewed a product, and of them those who then ordered.
async fn view_to_order(analytics: &mut AnalyticsServiceClient<Channel>) -> Vec<u64> {
    let step = |event: &str| EventMatcher {
        event: event.into(),
        condition: String::new(),
    };
    let funnel = analytics
        .get_funnel(admin(GetFunnelRequest {
            steps: vec![step("Product Viewed"), step("Order Completed")],
            window: "1d".into(),
            ..GetFunnelRequest::default()
        }))
        .await
        .unwrap()
        .into_inner();
    funnel
        .total
        .unwrap_or_default()
        .steps
        .iter()
        .map(|s| s.reached)
        .collect()
}

async fn journey_report(analytics: &mut AnalyticsServiceClient<Channel>) -> Readout {
    let report = analytics
        .get_journey_report(admin(GetJourneyReportRequest {
            journey_id: JOURNEY.into(),
            ..GetJourneyReportRequest::default()
        }))
        .await
        .unwrap()
        .into_inner();
    analytics_readout(&report)
}

async fn analytics_follows_customers_and_journeys_from_the_sdk(backend: Backend) {
    let redis = match backend {
        Backend::Postgres => Some(redis_url()),
        Backend::Sqlite => None,
    };
    let analytics_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let analytics_url = format!("http://{}", analytics_listener.local_addr().unwrap());
    let orchestrator_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let orchestrator_url = format!("http://{}", orchestrator_listener.local_addr().unwrap());
    let platform =
        Platform::start_with(backend, &orchestrator_url, &analytics_url, redis.as_deref()).await;
    let shutdown = CancellationToken::new();
    let analytics_config = Config {
        database_url: platform.database_url.clone(),
        admin_token: Some(Secret::new(ADMIN_TOKEN)),
        profile_endpoint: platform.profile.url(),
        auto_migrate: true,
        drain_secs: 0,
        database_max_connections: 4,
        log_filter: "warn".into(),
        // Stages are not written back in this scenario (no map writes back); the task
        // stays idle.
        analytics_write_back_secs: 3600,
        ..Config::default()
    };
    let analytics_task = tokio::spawn(
        AnalyticsServer::new(analytics_config)
            .await
            .unwrap()
            .serve(analytics_listener, shutdown.clone()),
    );
    let orchestrator_config = Config {
        database_url: platform.database_url.clone(),
        admin_token: Some(Secret::new(ADMIN_TOKEN)),
        redis_url: redis.clone(),
        profile_cache_key_prefix: platform.profile.cache_prefix.clone(),
        profile_endpoint: platform.profile.url(),
        ingest_endpoint: platform.ingest_url.clone(),
        analytics_endpoint: analytics_url.clone(),
        auto_migrate: true,
        drain_secs: 0,
        relay_max_backoff_ms: 500,
        database_max_connections: 8,
        log_filter: "warn".into(),
        ..Config::default()
    };
    let orchestrator_task = tokio::spawn(
        OrchestratorServer::new(orchestrator_config)
            .await
            .unwrap()
            .serve(orchestrator_listener, shutdown.clone()),
    );
    wait_serving(&analytics_url).await;
    wait_serving(&orchestrator_url).await;
    let mut orchestrator = OrchestrationServiceClient::connect(orchestrator_url)
        .await
        .unwrap();
    let mut analytics = AnalyticsServiceClient::connect(analytics_url)
        .await
        .unwrap();

    // Everyone who signs up is split at random and waits; an order is the goal.
    let journey: JourneyDefinition = waymark_proto::proto_json::from_json(&json!({
        "journeyId": JOURNEY,
        "entry": {"trigger": {"event": "Signed Up"}, "start": "split"},
        "goal": {"event": "Order Completed"},
        "nodes": [
            {"id": "split", "randomSplit": {"arms": [
                {"name": "control", "weight": 1, "next": "wait"},
                {"name": "offer", "weight": 1, "next": "wait"}
            ]}},
            {"id": "wait", "wait": {"branches": [{"match": {"event": "Account Closed"}}],
                                    "timeout": "30d"}}
        ]
    }))
    .unwrap();
    orchestrator
        .put_journey(admin(PutJourneyRequest {
            journey: Some(journey),
        }))
        .await
        .unwrap();
    orchestrator
        .publish_journey(admin(PublishJourneyRequest {
            journey_id: JOURNEY.into(),
            ..PublishJourneyRequest::default()
        }))
        .await
        .unwrap();

    // Members sign up; three visitors browse anonymously, and one member ("known") will
    // turn out to be the second visitor.
    let mut batch: Vec<_> = (0..MEMBERS)
        .map(|i| json!({"type": "track", "userId": format!("member-{i}"), "event": "Signed Up"}))
        .collect();
    batch.push(json!({"type": "track", "userId": "known", "event": "Signed Up"}));
    for visitor in ["visitor-1", "visitor-2", "visitor-3"] {
        batch.push(json!({"type": "track", "anonymousId": visitor, "event": "Product Viewed"}));
    }
    send(&platform, json!(batch)).await;
    wait_for_enrollments(&mut orchestrator, MEMBERS + 1, 0).await;

    // The first visitor signs up, the second logs in as "known" (two profiles merge); the
    // third stays anonymous.
    send(
        &platform,
        json!([
            {"type": "identify", "anonymousId": "visitor-1", "userId": "newcomer",
             "traits": {"email": "newcomer@example.com"}},
            {"type": "identify", "anonymousId": "visitor-2", "userId": "known"},
        ]),
    )
    .await;
    send(
        &platform,
        json!([{"type": "track", "userId": "newcomer", "event": "Signed Up"}]),
    )
    .await;
    wait_for_enrollments(&mut orchestrator, MEMBERS + 2, 0).await;

    let buyers: Vec<String> = (0..MEMBERS)
        .step_by(3)
        .map(|i| format!("member-{i}"))
        .chain(["newcomer".to_owned(), "known".to_owned()])
        .collect();
    let orders: Vec<_> = buyers
        .iter()
        .map(|user| json!({"type": "track", "userId": user, "event": "Order Completed"}))
        .collect();
    send(&platform, json!(orders)).await;
    wait_for_enrollments(&mut orchestrator, MEMBERS + 2, buyers.len()).await;

    // Both visitors who identified viewed while anonymous and ordered once known: each is
    // one customer, who converts.
    eventually(
        "views and orders of one customer each",
        PATIENCE,
        async || {
            let reached = view_to_order(&mut analytics).await;
            (reached == [3, 2])
                .then_some(())
                .ok_or(format!("{reached:?}"))
        },
    )
    .await;

    let shown = orchestrator_readout(&mut orchestrator).await;
    assert_eq!(
        (shown.enrollments, shown.converted),
        ((MEMBERS + 2) as u64, buyers.len() as u64)
    );
    assert_eq!(shown.entered.get("split"), Some(&shown.enrollments));
    eventually(
        "the journey report to match the enrollments",
        PATIENCE,
        async || {
            let counted = journey_report(&mut analytics).await;
            (counted == shown)
                .then_some(())
                .ok_or(format!("report {counted:?}, orchestrator {shown:?}"))
        },
    )
    .await;

    // The newcomer is erased: gone from the funnel, and their enrollment from both the
    // orchestrator and the report.
    let newcomer = get_profile(&platform, by_identity("user_id", "newcomer"))
        .await
        .unwrap();
    platform
        .profile
        .client()
        .await
        .delete_profile(admin(DeleteProfileRequest {
            profile_id: newcomer.profile_id,
            reason: "erasure request".into(),
        }))
        .await
        .unwrap();
    eventually("the newcomer to leave the funnel", PATIENCE, async || {
        let reached = view_to_order(&mut analytics).await;
        (reached == [2, 1])
            .then_some(())
            .ok_or(format!("{reached:?}"))
    })
    .await;
    wait_for_enrollments(&mut orchestrator, MEMBERS + 1, buyers.len() - 1).await;
    let shown = orchestrator_readout(&mut orchestrator).await;
    eventually("the report without the newcomer", PATIENCE, async || {
        let counted = journey_report(&mut analytics).await;
        (counted == shown)
            .then_some(())
            .ok_or(format!("report {counted:?}, orchestrator {shown:?}"))
    })
    .await;

    shutdown.cancel();
    orchestrator_task.await.unwrap().unwrap();
    analytics_task.await.unwrap().unwrap();
    platform.stop().await;
}
waymark_testkit::on_both_backends!(analytics_follows_customers_and_journeys_from_the_sdk);
