//! Integration tests of the ingestion service against real PostgreSQL and SQLite.

mod limits;
mod relay;
mod sql;
mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::*;
use tonic::Code;
use waymark_proto::common::v1::{Channel, EventType, Identity};
use waymark_proto::ingest::v1::ingest_service_client::IngestServiceClient;
use waymark_proto::ingest::v1::*;

async fn post(
    url: &str,
    key: Option<&str>,
    body: Vec<u8>,
    gzip_it: bool,
) -> (u16, Option<String>, Value) {
    let client = reqwest::Client::new();
    let mut request = client.post(url).header("content-type", "application/json");
    if let Some(key) = key {
        request = request.basic_auth(key, Some(""));
    }
    let body = if gzip_it {
        request = request.header("content-encoding", "gzip");
        gzip(&body)
    } else {
        body
    };
    let response = request.body(body).send().await.expect("http request");
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let text = response.text().await.unwrap();
    let json = serde_json::from_str(&text).unwrap_or_else(|_| panic!("JSON body, got {text:?}"));
    (status, retry_after, json)
}

fn bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap()
}

async fn grpc_ingest_validates_commits_and_lists(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = TestServer::start(config(&db.url, "http://127.0.0.1:9")).await;
    let (source_id, key) = server.create_source("web", 0).await;
    let mut client = server.client().await;

    let mut page = track("m-1", "u-1", "Viewed Pricing");
    page.set_type(EventType::Page);
    page.event.clear();
    page.name = "Pricing".into();
    let mut bad = track("m-2", "u-1", "");
    bad.event.clear();
    let mut orphan = track("m-3", "", "Clicked");
    orphan.user_id.clear();
    let response = client
        .ingest(ingest_request(
            vec![page, bad, orphan, track("m-4", "u-2", "Order Completed")],
            &key,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.accepted, 2);
    assert_eq!(response.duplicates, 0);
    let rejected: Vec<_> = response
        .rejected
        .iter()
        .map(|r| (r.index, r.message_id.as_str(), r.field.as_str()))
        .collect();
    assert_eq!(rejected, [(1, "m-2", "event"), (2, "m-3", "userId")]);

    let listed = client
        .list_events(admin(ListEventsRequest {
            user_id: "u-1".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.events.len(), 1);
    let event = &listed.events[0];
    assert_eq!(event.message_id, "m-1");
    assert_eq!(event.source_id, source_id);
    assert_eq!(
        event.channel(),
        Channel::Web,
        "a page view is a web interaction"
    );
    assert!(event.received_at.is_some() && event.timestamp.is_some() && !event.event_id.is_empty());

    let stats = client
        .get_stats(admin(GetStatsRequest {
            source_id: source_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    let total = stats.total.unwrap();
    assert_eq!(
        (total.accepted, total.rejected, total.duplicates),
        (2, 2, 0)
    );
    let pending: Vec<_> = stats
        .pending
        .iter()
        .map(|p| (p.consumer.as_str(), p.pending))
        .collect();
    assert_eq!(
        pending,
        [("profile", 2)],
        "committed events wait for the profile service"
    );

    // Paging: one per page, newest first, until the token runs out.
    let mut token = String::new();
    let mut ids = Vec::new();
    loop {
        let page = client
            .list_events(admin(ListEventsRequest {
                page_size: 1,
                page_token: token.clone(),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        ids.extend(page.events.into_iter().map(|e| e.message_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(ids, ["m-4", "m-1"]);

    let bad_page = client
        .list_events(admin(ListEventsRequest {
            page_size: 5000,
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(bad_page.code(), Code::InvalidArgument);
    assert!(bad_page.message().contains("page_size"));
    server.stop().await;
}
waymark_testkit::on_both_backends!(grpc_ingest_validates_commits_and_lists);

async fn http_endpoints_accept_segment_sdk_requests(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = TestServer::start(config(&db.url, "http://127.0.0.1:9")).await;
    let (_, key) = server.create_source("sdk", 0).await;

    // analytics-node style: Basic auth, batch with sentAt; client clock 1 hour fast.
    let now = chrono::Utc::now();
    let fast = now + chrono::Duration::hours(1);
    let body = json!({
        "batch": [
            {"type": "identify", "userId": "u-9", "traits": {"email": "ada@example.com"}, "messageId": "h-1",
             "timestamp": (fast - chrono::Duration::seconds(30)).to_rfc3339(),
             "context": {"library": {"name": "analytics-node", "version": "1"}}},
            {"type": "track", "userId": "u-9", "event": "Signed Up", "messageId": "h-2",
             "context": {"library": {"name": "analytics-ios"}}}
        ],
        "sentAt": fast.to_rfc3339()
    });
    let (status, _, json) = post(
        &server.http_url("/v1/batch"),
        Some(&key),
        bytes(&body),
        false,
    )
    .await;
    assert_eq!((status, json), (200, json!({"success": true})));

    // analytics.js style: single endpoint, writeKey in the body, gzip.
    let single = json!({"writeKey": key, "anonymousId": "anon-1", "name": "Home", "messageId": "h-3",
                        "context": {"userAgent": "Mozilla/5.0"}});
    let (status, _, _) = post(&server.http_url("/v1/p"), None, bytes(&single), true).await;
    assert_eq!(status, 200);
    for (path, body) in [
        (
            "/v1/track",
            json!({"userId": "u-9", "event": "Called Support", "messageId": "h-4", "context": {"channel": "phone"}}),
        ),
        ("/v1/identify", json!({"userId": "u-9", "messageId": "h-5"})),
        (
            "/v1/screen",
            json!({"userId": "u-9", "name": "Cart", "messageId": "h-6"}),
        ),
        (
            "/v1/group",
            json!({"userId": "u-9", "groupId": "acme", "messageId": "h-7"}),
        ),
        (
            "/v1/alias",
            json!({"userId": "u-9", "previousId": "anon-1", "messageId": "h-8"}),
        ),
    ] {
        let (status, _, json) = post(&server.http_url(path), Some(&key), bytes(&body), false).await;
        assert_eq!(status, 200, "{path}: {json}");
    }

    let mut client = server.client().await;
    let events = client
        .list_events(admin(ListEventsRequest {
            page_size: 100,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(events.len(), 8);
    let by_id = |id: &str| events.iter().find(|e| e.message_id == id).unwrap().clone();
    let identify = by_id("h-1");
    assert_eq!(identify.r#type(), EventType::Identify);
    // Skew correction: the event happened ~30 s before receipt, whatever the client clock said.
    let received = identify.received_at.unwrap().seconds;
    let happened = identify.timestamp.unwrap().seconds;
    assert!(
        (received - happened - 30).abs() <= 2,
        "corrected time {happened} vs received {received}"
    );
    assert_eq!(by_id("h-2").channel(), Channel::MobileApp);
    assert_eq!(by_id("h-3").channel(), Channel::Web);
    assert_eq!(by_id("h-3").r#type(), EventType::Page);
    assert_eq!(by_id("h-4").channel(), Channel::Phone);
    assert_eq!(by_id("h-8").previous_id, "anon-1");
    server.stop().await;
}
waymark_testkit::on_both_backends!(http_endpoints_accept_segment_sdk_requests);

async fn http_errors_have_clear_statuses_and_bodies(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = TestServer::start(config(&db.url, "http://127.0.0.1:9")).await;
    let (source_id, key) = server.create_source("errors", 0).await;
    let batch = server.http_url("/v1/batch");

    // 400: a field is missing; nothing of the batch is written.
    let body = json!({"batch": [
        {"type": "track", "userId": "u", "event": "Fine", "messageId": "e-1"},
        {"type": "track", "userId": "u", "messageId": "e-2"}
    ]});
    let (status, _, json) = post(&batch, Some(&key), bytes(&body), false).await;
    assert_eq!(status, 400);
    assert_eq!(json["success"], false);
    assert_eq!(json["field"], "batch[1].event");
    assert_eq!(json["reason"], "is required for track");

    let (status, _, json) = post(&batch, Some(&key), b"{not json".to_vec(), false).await;
    assert_eq!(status, 400);
    assert_eq!(json["field"], "body");
    let (status, _, json) = post(&batch, Some(&key), bytes(&json!({"batch": [{"type": "track", "userId": "u", "event": "x", "timestamp": "noon"}]})), false).await;
    assert_eq!(
        (status, json["field"].as_str()),
        (400, Some("batch[0].timestamp"))
    );
    let (status, _, json) = post(
        &server.http_url("/v1/track"),
        Some(&key),
        bytes(&json!({"userId": "u"})),
        false,
    )
    .await;
    assert_eq!((status, json["field"].as_str()), (400, Some("event")));

    // 401: no key, unknown key.
    let ok_body = bytes(&json!({"batch": [{"type": "track", "userId": "u", "event": "x"}]}));
    let (status, _, json) = post(&batch, None, ok_body.clone(), false).await;
    assert_eq!(status, 401);
    assert!(json["error"].as_str().unwrap().contains("write key"));
    let (status, _, _) = post(&batch, Some("wk_nope"), ok_body.clone(), false).await;
    assert_eq!(status, 401);

    // 413: one event over 32 KB; a batch over 500 KB, plain or inflated from gzip.
    let big_event = json!({"batch": [{"type": "track", "userId": "u", "event": "x", "properties": {"blob": "x".repeat(33 * 1024)}}]});
    let (status, _, json) = post(&batch, Some(&key), bytes(&big_event), false).await;
    assert_eq!(status, 413);
    assert!(json["error"].as_str().unwrap().contains("32 KB"));
    let many: Vec<Value> = (0..40)
        .map(|i| json!({"type": "track", "userId": "u", "event": "x", "messageId": format!("big-{i}"), "properties": {"blob": "y".repeat(15 * 1024)}}))
        .collect();
    let big_batch = bytes(&json!({"batch": many}));
    let (status, _, _) = post(&batch, Some(&key), big_batch.clone(), false).await;
    assert_eq!(status, 413);
    let (status, _, _) = post(&batch, Some(&key), big_batch, true).await;
    assert_eq!(status, 413, "the inflated size counts");

    let stats = server
        .client()
        .await
        .get_stats(admin(GetStatsRequest {
            source_id: source_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner()
        .total
        .unwrap();
    assert_eq!(stats.accepted, 0, "no partial writes");
    assert_eq!(
        stats.rejected, 3,
        "events refused by validation are counted: {stats:?}"
    );

    // 429 with Retry-After beyond the source's rate.
    let (_, slow_key) = server.create_source("slow", 5).await;
    let five: Vec<Value> = (0..5).map(|i| json!({"type": "track", "userId": "u", "event": "x", "messageId": format!("r-{i}")})).collect();
    let (status, _, _) = post(
        &batch,
        Some(&slow_key),
        bytes(&json!({"batch": five})),
        false,
    )
    .await;
    assert_eq!(status, 200);
    let (status, retry_after, json) = post(&batch, Some(&slow_key), ok_body.clone(), false).await;
    assert_eq!(status, 429, "{json}");
    assert!(retry_after.unwrap().parse::<u64>().unwrap() >= 1);

    // A revoked key stops working at once.
    server
        .client()
        .await
        .revoke_source(admin(RevokeSourceRequest { source_id }))
        .await
        .unwrap();
    let (status, _, _) = post(&batch, Some(&key), ok_body, false).await;
    assert_eq!(status, 401);
    server.stop().await;
}
waymark_testkit::on_both_backends!(http_errors_have_clear_statuses_and_bodies);

async fn admin_rpcs_need_the_admin_token(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = TestServer::start(config(&db.url, "http://127.0.0.1:9")).await;
    let mut client = server.client().await;
    let err = client
        .list_sources(ListSourcesRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = client
        .list_sources(with_key(ListSourcesRequest {}, "wrong-token"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = client
        .ingest(IngestRequest {
            events: vec![track("a", "u", "x")],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = client
        .ingest(ingest_request(vec![track("a", "u", "x")], "wk_unknown"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    let (_, key) = server.create_source("dup-name", 0).await;
    let err = client
        .create_source(admin(CreateSourceRequest {
            name: "dup-name".into(),
            rate_limit_per_second: 0,
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    let err = client
        .create_source(admin(CreateSourceRequest {
            name: " ".into(),
            rate_limit_per_second: 0,
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("name"));
    // A write key is not an admin token.
    let err = client
        .list_sources(with_key(ListSourcesRequest {}, &key))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let sources = client
        .list_sources(admin(ListSourcesRequest {}))
        .await
        .unwrap()
        .into_inner()
        .sources;
    assert_eq!(sources.len(), 1);
    server.stop().await;
}
waymark_testkit::on_both_backends!(admin_rpcs_need_the_admin_token);

async fn dedupe_survives_a_restart(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = TestServer::start(config(&db.url, "http://127.0.0.1:9")).await;
    let (_, key) = server.create_source("dedupe", 0).await;
    let batch = vec![
        track("d-1", "u", "A"),
        track("d-2", "u", "B"),
        track("d-1", "u", "A again"),
    ];
    let first = server
        .client()
        .await
        .ingest(ingest_request(batch, &key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (first.accepted, first.duplicates),
        (2, 1),
        "a repeat inside one batch is a duplicate"
    );
    server.stop().await;

    let server = TestServer::start(config(&db.url, "http://127.0.0.1:9")).await;
    let again = vec![track("d-1", "u", "A"), track("d-3", "u", "C")];
    let second = server
        .client()
        .await
        .ingest(ingest_request(again, &key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((second.accepted, second.duplicates), (1, 1));
    // HTTP sees the same log.
    let body = bytes(
        &json!({"batch": [{"type": "track", "userId": "u", "event": "A", "messageId": "d-2"}]}),
    );
    let (status, _, _) = post(&server.http_url("/v1/batch"), Some(&key), body, false).await;
    assert_eq!(status, 200);
    let stats = server
        .client()
        .await
        .get_stats(admin(GetStatsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let total = stats.total.unwrap();
    assert_eq!((total.accepted, total.duplicates), (3, 3));
    server.stop().await;
}
waymark_testkit::on_both_backends!(dedupe_survives_a_restart);

async fn relay_delivers_until_acknowledged(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sink = Sink::default();
    sink.failing
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let endpoint = sink.start().await;
    let server = TestServer::start(config(&db.url, &endpoint)).await;
    let (_, key) = server.create_source("relay", 0).await;
    let events: Vec<_> = (0..30)
        .map(|i| track(&format!("r-{i}"), "u", "Tick"))
        .collect();
    let response = server
        .client()
        .await
        .ingest(ingest_request(events, &key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.accepted, 30);

    // The consumer is down: attempts are made and nothing is lost or acknowledged.
    eventually("the relay to retry", PATIENCE, async || {
        sink.attempts.load(std::sync::atomic::Ordering::SeqCst) >= 2
    })
    .await;
    assert!(sink.received.lock().await.is_empty());
    let stats = server
        .client()
        .await
        .get_stats(admin(GetStatsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.pending[0].pending, 30);

    // It recovers: every event arrives, in commit order, and the backlog drains.
    sink.failing
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let received = sink.wait_for(30).await;
    let ids: Vec<_> = received.iter().map(|e| e.message_id.clone()).collect();
    let expected: Vec<_> = (0..30).map(|i| format!("r-{i}")).collect();
    assert_eq!(ids, expected);
    assert!(
        received
            .iter()
            .all(|e| !e.event_id.is_empty() && e.received_at.is_some())
    );
    assert_eq!(
        sink.producers
            .lock()
            .await
            .keys()
            .cloned()
            .collect::<Vec<_>>(),
        ["ingest"]
    );
    server
        .wait_outbox_empty("acknowledged rows to leave the outbox")
        .await;

    // Replay re-queues a time range for the consumer.
    let replay = server
        .client()
        .await
        .replay(admin(ReplayRequest {
            consumer: "profile".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replay.queued, 30);
    assert_eq!(sink.wait_for(60).await.len(), 60);
    let err = server
        .client()
        .await
        .replay(admin(ReplayRequest {
            consumer: "nobody".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    server.stop().await;
}
waymark_testkit::on_both_backends!(relay_delivers_until_acknowledged);

async fn two_relays_on_one_database_do_not_double_send(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sink = Sink::default();
    let endpoint = sink.start().await;
    let a = TestServer::start(config(&db.url, &endpoint)).await;
    let b = TestServer::start(config(&db.url, &endpoint)).await;
    let (_, key) = a.create_source("two", 0).await;
    let mut tasks = Vec::new();
    for round in 0..10 {
        let client_url = if round % 2 == 0 {
            a.grpc_url()
        } else {
            b.grpc_url()
        };
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = IngestServiceClient::connect(client_url).await.unwrap();
            let events = (0..40)
                .map(|i| track(&format!("t-{round}-{i}"), "u", "Tick"))
                .collect();
            client
                .ingest(ingest_request(events, &key))
                .await
                .unwrap()
                .into_inner()
                .accepted
        }));
    }
    let mut accepted = 0;
    for t in tasks {
        accepted += t.await.unwrap();
    }
    assert_eq!(accepted, 400);
    let received = sink.wait_for(400).await;
    // A double send is a row claimed by both relays. Once nothing is pending no row is
    // left to claim twice, and a marker through each server, sent after that, takes a
    // whole relay round behind whatever was already on its way.
    a.wait_outbox_empty("the outbox to drain").await;
    for (server, marker) in [(&a, "marker-a"), (&b, "marker-b")] {
        let events = vec![track(marker, "u", "Marker")];
        let mut client = server.client().await;
        client.ingest(ingest_request(events, &key)).await.unwrap();
    }
    eventually("both markers at the sink", PATIENCE, async || {
        let received = sink.received.lock().await;
        received.iter().filter(|e| e.event == "Marker").count() == 2
    })
    .await;
    let ticks = sink
        .received
        .lock()
        .await
        .iter()
        .filter(|e| e.event == "Tick")
        .count();
    assert_eq!(
        ticks, 400,
        "each event delivered exactly once when nothing fails"
    );
    let distinct: std::collections::HashSet<_> =
        received.iter().map(|e| e.message_id.clone()).collect();
    assert_eq!(distinct.len(), 400);
    a.stop().await;
    b.stop().await;
}
waymark_testkit::on_both_backends!(two_relays_on_one_database_do_not_double_send);

async fn suppressed_identities_are_dropped_and_counted(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = TestServer::start(config(&db.url, "http://127.0.0.1:9")).await;
    let (_, key) = server.create_source("privacy", 0).await;
    let mut client = server.client().await;
    // Logged before the erasure: its copy in the log must go with it.
    client
        .ingest(ingest_request(
            vec![track("before-1", "forgotten", "Bought")],
            &key,
        ))
        .await
        .unwrap();
    let erasure = client
        .suppress_identities(admin(SuppressIdentitiesRequest {
            identities: vec![
                Identity {
                    r#type: "email".into(),
                    value: " Gone@Example.com".into(),
                },
                Identity {
                    r#type: "user_id".into(),
                    value: "forgotten".into(),
                },
            ],
            hashed: false,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((erasure.added, erasure.erased_events), (2, 1));
    let kept = client
        .list_events(admin(ListEventsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(
        kept.events.iter().all(|e| e.message_id != "before-1"),
        "the log no longer holds it"
    );
    let bad = client
        .suppress_identities(admin(SuppressIdentitiesRequest {
            identities: vec![Identity {
                r#type: "shoe".into(),
                value: "42".into(),
            }],
            hashed: false,
        }))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    let details = tonic_types::StatusExt::get_details_bad_request(&bad).expect("field violations");
    assert_eq!(details.field_violations[0].field, "identities[0].type");
    let not_a_hash = client
        .suppress_identities(admin(SuppressIdentitiesRequest {
            identities: vec![Identity {
                r#type: "email".into(),
                value: "gone@example.com".into(),
            }],
            hashed: true,
        }))
        .await
        .unwrap_err();
    assert_eq!(not_a_hash.code(), Code::InvalidArgument);
    let details =
        tonic_types::StatusExt::get_details_bad_request(&not_a_hash).expect("field violations");
    assert_eq!(details.field_violations[0].field, "identities[0].value");
    // Only keyed hashes are stored.
    let stored = suppression_rows(&db).await;
    assert_eq!(stored.len(), 2);
    for (id_type, value) in &stored {
        assert!(waymark_identity::is_hash(value), "{id_type}: {value}");
    }

    let body = json!({"batch": [
        {"type": "identify", "anonymousId": "a-1", "traits": {"email": "gone@example.com"}},
        {"type": "track", "userId": "forgotten", "event": "Back"},
        {"type": "track", "userId": "someone-else", "event": "Hello"}
    ]});
    let (status, _, _) = post(
        &server.http_url("/v1/batch"),
        Some(&key),
        bytes(&body),
        false,
    )
    .await;
    assert_eq!(status, 200);
    let total = client
        .get_stats(admin(GetStatsRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .total
        .unwrap();
    // The event logged before the erasure was accepted then; its copy is gone since.
    assert_eq!((total.accepted, total.suppressed), (2, 2));
    server.stop().await;
}
waymark_testkit::on_both_backends!(suppressed_identities_are_dropped_and_counted);

async fn retention_sweep_erases_old_events(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut cfg = config(&db.url, "http://127.0.0.1:9");
    cfg.retention_secs = 1;
    cfg.dedupe_window_secs = 1;
    let server = TestServer::start(cfg).await;
    let (_, key) = server.create_source("short", 0).await;
    let mut client = server.client().await;
    client
        .ingest(ingest_request(vec![track("old-1", "u", "A")], &key))
        .await
        .unwrap();
    // Waits out the one-second retention on purpose: too short a wait fails, never passes.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_, deleted) = server.core.sweep().await.unwrap();
    assert_eq!(deleted, 1);
    let listed = client
        .list_events(admin(ListEventsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.events.is_empty());
    let again = client
        .ingest(ingest_request(vec![track("old-1", "u", "A")], &key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        again.accepted, 1,
        "past the dedupe window the id is new again"
    );
    server.stop().await;
}
waymark_testkit::on_both_backends!(retention_sweep_erases_old_events);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_unreachable_means_not_serving_and_unavailable() {
    let db = TestDb::new(Backend::Postgres).await;
    let upstream: std::net::SocketAddr = "127.0.0.1:5432".parse().unwrap();
    let proxy = Proxy::start(upstream).await;
    let url = db
        .url
        .replacen("127.0.0.1:5432", &proxy.addr.to_string(), 1);
    assert_ne!(url, db.url, "test database URL goes through the proxy");
    let server = TestServer::start(config(&url, "http://127.0.0.1:9")).await;
    let (_, key) = server.create_source("outage", 0).await;
    let channel = tonic::transport::Channel::from_shared(server.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let check = |service: &str| tonic_health::pb::HealthCheckRequest {
        service: service.into(),
    };
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    assert_eq!(
        health
            .check(check("waymark.ingest.v1.IngestService"))
            .await
            .unwrap()
            .into_inner()
            .status,
        serving
    );

    proxy.cut();
    server.wait_serving(false).await;
    let status = health.check(check("")).await.unwrap().into_inner().status;
    assert_ne!(status, serving);
    let err = server
        .client()
        .await
        .ingest(ingest_request(vec![track("o-1", "u", "A")], &key))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let body = bytes(
        &json!({"batch": [{"type": "track", "userId": "u", "event": "A", "messageId": "o-2"}]}),
    );
    let (status, retry_after, json) = post(
        &server.http_url("/v1/batch"),
        Some(&key),
        body.clone(),
        false,
    )
    .await;
    assert_eq!(status, 503, "{json}");
    assert!(retry_after.is_some());

    proxy.restore();
    server.wait_serving(true).await;
    let (status, _, _) = post(&server.http_url("/v1/batch"), Some(&key), body, false).await;
    assert_eq!(status, 200);
    let ok = server
        .client()
        .await
        .ingest(ingest_request(vec![track("o-1", "u", "A")], &key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.accepted, 1, "nothing was half-written during the outage");
    server.stop().await;
}

/// A replica that has not heard of an erasure yet accepts the customer's events; at its
/// next refresh it drops them from the log all the same.
async fn a_replica_late_to_an_erasure_erases_what_it_accepted(backend: Backend) {
    let db = TestDb::new(backend).await;
    let a = TestServer::start(config(&db.url, "http://127.0.0.1:9")).await;
    let b = TestServer::start(config(&db.url, "http://127.0.0.1:9")).await;
    let (_, key) = a.create_source("late", 0).await;
    a.client()
        .await
        .suppress_identities(admin(SuppressIdentitiesRequest {
            identities: vec![Identity {
                r#type: "user_id".into(),
                value: "gone-late".into(),
            }],
            hashed: false,
        }))
        .await
        .unwrap();
    let accepted = IngestServiceClient::connect(b.grpc_url())
        .await
        .unwrap()
        .ingest(ingest_request(
            vec![track("late-1", "gone-late", "Bought")],
            &key,
        ))
        .await
        .unwrap()
        .into_inner()
        .accepted;
    assert_eq!(accepted, 1, "B did not know yet");
    b.core.refresh_suppressions().await.unwrap();
    let listed = a
        .client()
        .await
        .list_events(admin(ListEventsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed.events.iter().all(|e| e.message_id != "late-1"),
        "erased at B's refresh"
    );
    a.stop().await;
    b.stop().await;
}
waymark_testkit::on_both_backends!(a_replica_late_to_an_erasure_erases_what_it_accepted);

/// The ingestion service's own database, as a server started on `db` opens it.
async fn ingest_database(db: &TestDb) -> sea_orm::DatabaseConnection {
    let url = config(&db.url, "http://127.0.0.1:9").ingest_database();
    waymark_kit::db::connect(&url, "ingest", 1).await.unwrap()
}

/// The suppression rows as stored: (type, value).
async fn suppression_rows(db: &TestDb) -> Vec<(String, String)> {
    use sea_orm::ConnectionTrait;
    let conn = ingest_database(db).await;
    conn.query_all_raw(sea_orm::Statement::from_string(
        conn.get_database_backend(),
        "SELECT id_type, id_value FROM suppressions ORDER BY id_type",
    ))
    .await
    .unwrap()
    .iter()
    .map(|r| {
        (
            r.try_get_by_index(0).unwrap(),
            r.try_get_by_index(1).unwrap(),
        )
    })
    .collect()
}

/// Suppressions stored in clear by a release before hashing are replaced by their hashes
/// when the service starts, and still apply.
async fn clear_suppressions_are_hashed_at_start_up(backend: Backend) {
    use sea_orm::ConnectionTrait;
    let db = TestDb::new(backend).await;
    let conn = ingest_database(&db).await;
    waymark_kit::db::migrate(&conn, "ingest", waymark_ingest::store::MIGRATIONS)
        .await
        .unwrap();
    conn.execute_unprepared(
        "INSERT INTO suppressions (id_type, id_value, created_at) VALUES ('user_id', 'old-erased', 1)",
    )
    .await
    .unwrap();
    let server = TestServer::start(config(&db.url, "http://127.0.0.1:9")).await;
    let stored = suppression_rows(&db).await;
    let hash = waymark_identity::IdentHasher::default().hash("user_id", "old-erased");
    assert_eq!(stored, [("user_id".to_owned(), hash)]);
    let (_, key) = server.create_source("old", 0).await;
    let outcome = server
        .client()
        .await
        .ingest(ingest_request(
            vec![track("old-1", "old-erased", "Back")],
            &key,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((outcome.accepted, outcome.suppressed), (0, 1));
    server.stop().await;
}
waymark_testkit::on_both_backends!(clear_suppressions_are_hashed_at_start_up);

/// The outbox under the ingestion schema: packed rows (one per transaction) and rows of
/// one event (as replays, and releases from before packs, write them) go out in commit order,
/// each delivery holding at most the batch size of events unless one pack alone is more.
async fn outbox_packs_go_out_in_order_within_the_batch_size(backend: Backend) {
    use prost::Message;
    use sea_orm::TransactionTrait;
    use waymark_kit::outbox::{self, RelayConfig, Wakeup};

    let db = TestDb::new(backend).await;
    let conn = waymark_kit::db::connect(&db.url, "ingest", 4)
        .await
        .unwrap();
    waymark_kit::db::migrate(&conn, "ingest", waymark_ingest::store::MIGRATIONS)
        .await
        .unwrap();
    let encoded = |i: usize| track(&format!("o-{i}"), "u", "Tick").encode_to_vec();
    let consumers = ["profile".to_owned()];
    let mut next = 0;
    let mut commit_pack = async |n: usize| {
        let payloads: Vec<Vec<u8>> = (next..next + n).map(encoded).collect();
        next += n;
        let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
        let txn = conn.begin().await.unwrap();
        outbox::enqueue(&txn, &consumers, &refs).await.unwrap();
        txn.commit().await.unwrap();
    };
    commit_pack(3).await;
    commit_pack(6).await;
    for i in 9..12 {
        waymark_kit::sql::execute(
            &conn,
            "INSERT INTO outbox (consumer, payload, created_at, available_at) VALUES (?, ?, ?, 0)",
            [
                "profile".into(),
                encoded(i).into(),
                waymark_kit::time::now_micros().into(),
            ],
        )
        .await
        .unwrap();
    }
    let backlog = outbox::backlog(&conn).await.unwrap();
    assert_eq!(
        backlog[0].pending, 12,
        "the backlog counts events, not rows"
    );

    let sink = Sink::default();
    let endpoint = sink.start().await;
    let shutdown = waymark_kit::CancellationToken::new();
    let relay = tokio::spawn(outbox::run_relay(
        conn.clone(),
        RelayConfig {
            batch_size: 4,
            max_backoff: Duration::from_millis(200),
            idle_poll: Duration::from_millis(20),
            ..RelayConfig::new(
                "ingest",
                "profile",
                endpoint,
                waymark_kit::secret::Secret::new(ADMIN_TOKEN),
            )
        },
        Wakeup::default(),
        shutdown.clone(),
    ));
    let received = sink.wait_for(12).await;
    let ids: Vec<_> = received.iter().map(|e| e.message_id.clone()).collect();
    let expected: Vec<_> = (0..12).map(|i| format!("o-{i}")).collect();
    assert_eq!(ids, expected);
    assert_eq!(
        *sink.deliveries.lock().await,
        [3, 6, 3],
        "a pack of 3, a pack of 6 over the batch size on its own, then single rows up to 4"
    );
    shutdown.cancel();
    relay.await.unwrap().unwrap();
    let what = "acknowledged rows to leave the outbox";
    eventually(what, PATIENCE, async || {
        let backlog = outbox::backlog(&conn).await.unwrap();
        if backlog.is_empty() {
            Ok(())
        } else {
            Err(backlog)
        }
    })
    .await;
}
waymark_testkit::on_both_backends!(outbox_packs_go_out_in_order_within_the_batch_size);

/// A malformed e-mail or phone is kept as a trait but identifies nobody: the answer says
/// which identifier and which rule, over HTTP (still a success) and gRPC alike.
async fn malformed_identifiers_are_named_with_their_rule(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = TestServer::start(config(&db.url, "http://127.0.0.1:9")).await;
    let (_, key) = server.create_source("sdk", 0).await;
    let body = json!({"batch": [
        {"type": "identify", "userId": "u-1", "messageId": "m-1",
         "traits": {"email": "ada@example.com", "phone": "020 7946 0958"}},
        {"type": "identify", "userId": "u-2", "messageId": "m-2",
         "context": {"traits": {"email": "grace.example.com"}}}
    ]});
    let (status, _, json) = post(
        &server.http_url("/v1/batch"),
        Some(&key),
        bytes(&body),
        false,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(json["success"], true);
    let warnings = json["warnings"].as_array().expect("warnings");
    assert_eq!(warnings.len(), 2, "{json}");
    assert_eq!(warnings[0]["field"], "batch[0].traits.phone");
    assert!(
        warnings[0]["reason"]
            .as_str()
            .unwrap()
            .contains("needs its country code"),
        "{json}"
    );
    assert_eq!(warnings[1]["field"], "batch[1].context.traits.email");
    assert!(
        warnings[1]["reason"].as_str().unwrap().contains("no @"),
        "{json}"
    );

    let mut phone = track("m-3", "u-3", "Called");
    let serde_json::Value::Object(traits) = json!({"phone": "+44 12"}) else {
        unreachable!()
    };
    phone.traits = Some(waymark_proto::json::struct_from_json(traits));
    let response = server
        .client()
        .await
        .ingest(ingest_request(vec![phone], &key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.accepted, 1);
    assert_eq!(response.ignored_identifiers.len(), 1);
    let ignored = &response.ignored_identifiers[0];
    assert_eq!((ignored.index, ignored.field.as_str()), (0, "traits.phone"));
    assert!(
        ignored.reason.contains("has 4 digits"),
        "{}",
        ignored.reason
    );
    server.stop().await;
}
waymark_testkit::on_both_backends!(malformed_identifiers_are_named_with_their_rule);
