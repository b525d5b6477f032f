//! Journeys end to end: events posted to ingestion reach the orchestrator through the
//! profile service, drive a published journey to a signed webhook personalised from the
//! profile, and a simulation of the same events counts what the live run did.

use std::collections::BTreeMap;

use serde_json::json;
use tokio::net::TcpListener;
use waymark_kit::CancellationToken;
use waymark_kit::secret::Secret;
use waymark_orchestrator::OrchestratorServer;
use waymark_proto::orchestration::v1::orchestration_service_client::OrchestrationServiceClient;
use waymark_proto::orchestration::v1::*;
use waymark_testkit::platform::{Platform, wait_serving};
use waymark_testkit::webhooks::WebhookReceiver;
use waymark_testkit::{ADMIN_TOKEN, Backend, PATIENCE, Sink, admin, eventually, redis_url};

use crate::send;

const BUYERS: usize = 24;

async fn journey_from_the_sdk_to_a_webhook_and_its_simulation(backend: Backend) {
    let redis = match backend {
        Backend::Postgres => Some(redis_url()),
        Backend::Sqlite => None,
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let orchestrator_url = format!("http://{}", listener.local_addr().unwrap());
    let analytics = Sink::default();
    let platform = Platform::start_with(
        backend,
        &orchestrator_url,
        &analytics.start().await,
        redis.as_deref(),
    )
    .await;
    let receiver = WebhookReceiver::start(waymark_kit::config::DEV_WEBHOOK_SECRET).await;
    let config = waymark_kit::config::Config {
        database_url: platform.database_url.clone(),
        admin_token: Some(Secret::new(ADMIN_TOKEN)),
        redis_url: redis.clone(),
        profile_cache_key_prefix: platform.profile.cache_prefix.clone(),
        profile_endpoint: platform.profile.url(),
        ingest_endpoint: platform.ingest_url.clone(),
        analytics_endpoint: "http://127.0.0.1:9".into(),
        message_webhook_url: Some(format!("{}/messages", receiver.url())),
        auto_migrate: true,
        drain_secs: 0,
        relay_max_backoff_ms: 500,
        database_max_connections: 8,
        log_filter: "warn".into(),
        ..waymark_kit::config::Config::default()
    };
    let server = OrchestratorServer::new(config).await.unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.serve(listener, shutdown.clone()));
    wait_serving(&orchestrator_url).await;
    let mut client = OrchestrationServiceClient::connect(orchestrator_url.clone())
        .await
        .unwrap();

    let journey: JourneyDefinition = waymark_proto::proto_json::from_json(&json!({
        "journeyId": "thank-buyers",
        "entry": {"trigger": {"event": "Order Completed", "condition": "event.properties.total > 10"}, "start": "test"},
        "nodes": [
            {"id": "test", "randomSplit": {"arms": [{"name": "a", "weight": 1, "next": "size"}, {"name": "b", "weight": 1}]}},
            {"id": "size", "split": {"branches": [{"name": "big", "condition": "event.properties.total >= 500", "next": "big"}],
                                     "otherwise": "small"}},
            {"id": "big", "message": {"channel": "email", "variants": [{"body": "Thank you, {{ profile.traits.name }}, for a big order"}]}},
            {"id": "small", "message": {"channel": "email", "variants": [{"body": "Thank you, {{ profile.traits.name }}"}]}}
        ]
    }))
    .unwrap();
    client
        .put_journey(admin(PutJourneyRequest {
            journey: Some(journey.clone()),
        }))
        .await
        .unwrap();
    client
        .publish_journey(admin(PublishJourneyRequest {
            journey_id: "thank-buyers".into(),
            ..PublishJourneyRequest::default()
        }))
        .await
        .unwrap();

    let from = waymark_kit::time::from_micros(waymark_kit::time::now_micros() - 1_000_000);
    let mut batch = Vec::new();
    for i in 0..BUYERS {
        batch.push(json!({"type": "identify", "userId": format!("buyer-{i}"), "traits": {"name": format!("Buyer {i}")}}));
    }
    send(&platform, json!(batch)).await;
    let orders: Vec<_> = (0..BUYERS)
        .map(|i| json!({"type": "track", "userId": format!("buyer-{i}"), "event": "Order Completed",
                        "properties": {"total": if i % 3 == 0 { 900 } else { 50 } + i}}))
        .chain([json!({"type": "track", "userId": "buyer-0", "event": "Order Completed", "properties": {"total": 5}})])
        .collect();
    send(&platform, json!(orders)).await;

    let live = eventually("every buyer's enrollment to end", PATIENCE, async || {
        let list = client
            .list_enrollments(admin(ListEnrollmentsRequest {
                journey_id: "thank-buyers".into(),
                ..ListEnrollmentsRequest::default()
            }))
            .await
            .map_err(|e| e.to_string())?
            .into_inner()
            .enrollments;
        let ended = list
            .iter()
            .all(|e| e.status != EnrollmentStatus::Active as i32);
        if list.len() == BUYERS && ended {
            Ok(list)
        } else {
            Err(format!("{} enrollments", list.len()))
        }
    })
    .await;
    let sent = live
        .iter()
        .filter(|e| e.node_id == "big" || e.node_id == "small")
        .count();
    let messages = receiver.wait_for(sent).await;
    assert!(
        sent > 0 && sent < BUYERS,
        "both arms taken: {sent} of {BUYERS}"
    );
    assert!(
        messages.iter().all(|m| m.body["body"]
            .as_str()
            .unwrap()
            .starts_with("Thank you, Buyer ")),
        "personalised from the profile"
    );
    assert_eq!(receiver.invalid_signatures(), 0);

    let to = waymark_kit::time::from_micros(waymark_kit::time::now_micros() + 1_000_000);
    let simulated = client
        .simulate_journey(admin(SimulateJourneyRequest {
            journey: Some(journey),
            from: Some(from),
            to: Some(to),
            ..SimulateJourneyRequest::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(simulated.entered, BUYERS as u64, "the same entries");
    let live_by_node: BTreeMap<String, u64> = live.iter().fold(BTreeMap::new(), |mut m, e| {
        *m.entry(e.node_id.clone()).or_default() += 1;
        m
    });
    for node in ["big", "small"] {
        let count = simulated.nodes.iter().find(|n| n.node_id == node).unwrap();
        assert_eq!(
            count.reached,
            live_by_node.get(node).copied().unwrap_or(0),
            "node {node}"
        );
    }
    let arms = &simulated
        .nodes
        .iter()
        .find(|n| n.node_id == "test")
        .unwrap()
        .branches;
    assert_eq!(
        arms.get("a").copied().unwrap_or(0),
        sent as u64,
        "the same arms"
    );

    shutdown.cancel();
    task.await.unwrap().unwrap();
    platform.stop().await;
}
waymark_testkit::on_both_backends!(journey_from_the_sdk_to_a_webhook_and_its_simulation);
