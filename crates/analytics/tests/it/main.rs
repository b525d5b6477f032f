//! Integration tests of the analytics service through its public gRPC API, on PostgreSQL
//! and SQLite: synthetic customers with known paths give exact answers.

mod maps;
mod platform;
mod support;

use serde_json::json;
use support::*;
use waymark_proto::analytics::v1::*;
use waymark_proto::common::v1::DeliverRequest;
use waymark_proto::common::v1::event_sink_client::EventSinkClient;

fn funnel(names: &[&str], order: FunnelOrder, window: &str) -> GetFunnelRequest {
    GetFunnelRequest {
        steps: steps(names),
        order: order as i32,
        window: window.to_owned(),
        ..GetFunnelRequest::default()
    }
}

/// Four customers whose paths tell the orderings apart.
async fn each_ordering_counts_what_it_promises(backend: Backend) {
    let rig = Rig::start(backend).await;
    let e = json!({});
    let response = rig
        .server
        .deliver(vec![
            track("c1", "A", 0, e.clone()),
            track("c1", "B", 10, e.clone()),
            track("c1", "C", 20, e.clone()),
            track("c2", "A", 0, e.clone()),
            track("c2", "X", 5, e.clone()),
            track("c2", "B", 10, e.clone()),
            track("c2", "C", 40, e.clone()),
            track("c3", "B", 0, e.clone()),
            track("c3", "A", 10, e.clone()),
            track("c3", "C", 20, e.clone()),
            track("c4", "A", 0, e.clone()),
            track("c4", "B", 8 * DAY, e.clone()),
            track("c5", "X", 0, e.clone()),
        ])
        .await;
    assert_eq!(response.applied, 13);
    let abc = ["A", "B", "C"];
    let cases = [
        (FunnelOrder::Ordered, vec![4, 2, 2]),
        (FunnelOrder::Unspecified, vec![4, 2, 2]),
        (FunnelOrder::Strict, vec![4, 1, 1]),
        (FunnelOrder::Any, vec![4, 3, 3]),
        (FunnelOrder::Anchored, vec![4, 3, 2]),
    ];
    for (order, expected) in cases {
        let answer = rig.server.funnel(funnel(&abc, order, "7d")).await;
        let total = answer.total.unwrap();
        assert_eq!(reached(&total), expected, "{order:?}");
        assert_eq!(answer.customers_scanned, 5, "{order:?}");
    }
    // A wider window lets c4 reach B.
    let wide = rig
        .server
        .funnel(funnel(&abc, FunnelOrder::Ordered, "9d"))
        .await;
    assert_eq!(reached(&wide.total.unwrap()), vec![4, 3, 2]);

    let ordered = rig
        .server
        .funnel(funnel(&abc, FunnelOrder::Ordered, "7d"))
        .await;
    let total = ordered.total.unwrap();
    let b = &total.steps[1];
    assert_eq!((b.dropped, b.conversion_from_previous), (2, 0.5));
    assert_eq!(b.drop_off_percent, 50.0);
    let to_c = total.steps[2].time_to_convert.as_ref().unwrap();
    // c1 took 10 s from B to C, c2 30 s.
    assert_eq!((to_c.count, to_c.mean_seconds), (2, 20.0));
    assert_eq!(total.steps[0].event, "A");
}
waymark_testkit::on_both_backends!(each_ordering_counts_what_it_promises);

/// Five customers from view to purchase in 1, 2, 3, 4 and 100 minutes.
async fn time_to_convert_has_its_median_and_histogram(backend: Backend) {
    let rig = Rig::start(backend).await;
    let mut events = Vec::new();
    for (i, minutes) in [1, 2, 3, 4, 100].into_iter().enumerate() {
        let who = format!("t{i}");
        events.push(track(&who, "Product Viewed", 0, json!({})));
        events.push(track(&who, "Order Completed", minutes * MINUTE, json!({})));
    }
    rig.server.deliver(events).await;
    let answer = rig
        .server
        .funnel(funnel(
            &["Product Viewed", "Order Completed"],
            FunnelOrder::Ordered,
            "1d",
        ))
        .await;
    let d = answer.total.unwrap().steps[1]
        .time_to_convert
        .clone()
        .unwrap();
    assert_eq!(d.count, 5);
    assert_eq!(d.median_seconds, 180.0);
    assert_eq!(d.mean_seconds, 110.0 * 60.0 / 5.0);
    let counts: Vec<(f64, u64)> = d
        .histogram
        .iter()
        .map(|b| (b.upper_bound_seconds, b.count))
        .filter(|(_, n)| *n > 0)
        .collect();
    assert_eq!(counts, vec![(60.0, 1), (300.0, 3), (21_600.0, 1)]);
}
waymark_testkit::on_both_backends!(time_to_convert_has_its_median_and_histogram);

fn carts() -> Vec<waymark_proto::common::v1::Event> {
    let cart =
        |who: &str, name: &str, secs, id: i64| track(who, name, secs, json!({"cart_id": id}));
    vec![
        cart("d1", "Product Viewed", 0, 1),
        cart("d1", "Added To Cart", 10, 1),
        cart("d1", "Order Completed", 20, 1),
        cart("d2", "Product Viewed", 0, 1),
        cart("d2", "Added To Cart", 10, 2),
        cart("d2", "Order Completed", 20, 2),
        cart("d3", "Product Viewed", 0, 3),
        cart("d3", "Added To Cart", 10, 3),
        track(
            "d3",
            "Cart Abandoned",
            15,
            json!({"cart_id": 3, "reason": "price"}),
        ),
        cart("d3", "Order Completed", 20, 3),
        cart("d4", "Product Viewed", 0, 4),
        cart("d4", "Added To Cart", 10, 4),
        track(
            "d4",
            "Cart Abandoned",
            15,
            json!({"cart_id": 4, "reason": "other"}),
        ),
        cart("d4", "Order Completed", 20, 4),
    ]
}

/// The same cart from view to purchase, and an exclusion that filters on a property.
async fn exclusions_filter_on_properties_and_holds_keep_the_same_cart(backend: Backend) {
    let rig = Rig::start(backend).await;
    rig.server.deliver(carts()).await;
    let exclusion = FunnelExclusion {
        event: Some(matcher("Cart Abandoned", r#"properties.reason == "price""#)),
        from_step: 1,
        to_step: 2,
    };
    let names = ["Product Viewed", "Added To Cart", "Order Completed"];
    let mut request = funnel(&names, FunnelOrder::Ordered, "1h");
    request.exclusions = vec![exclusion];
    let without_hold = rig.server.funnel(request.clone()).await;
    assert_eq!(reached(&without_hold.total.unwrap()), vec![3, 3, 3]);
    request.hold_constant = vec!["cart_id".into()];
    let held = rig.server.funnel(request.clone()).await;
    assert_eq!(reached(&held.total.unwrap()), vec![3, 2, 2]);
    // Without the exclusion d3 counts too.
    request.exclusions.clear();
    let all = rig.server.funnel(request).await;
    assert_eq!(reached(&all.total.unwrap()), vec![4, 3, 3]);
}
waymark_testkit::on_both_backends!(exclusions_filter_on_properties_and_holds_keep_the_same_cart);

/// Unique customers against every attempt, broken down by a property of the first step,
/// and a step with a condition.
async fn totals_count_attempts_and_breakdowns_split_them(backend: Backend) {
    let rig = Rig::start(backend).await;
    rig.server
        .deliver(vec![
            track("e1", "A", 0, json!({"plan": "pro"})),
            track("e1", "B", 10, json!({"total": 50})),
            track("e1", "A", DAY, json!({"plan": "pro"})),
            track("e1", "B", DAY + 10, json!({"total": 500})),
            track("e1", "A", 2 * DAY, json!({"plan": "pro"})),
            track("e2", "A", 0, json!({"plan": "free"})),
        ])
        .await;
    let mut request = funnel(&["A", "B"], FunnelOrder::Ordered, "1h");
    request.breakdown = Some(Breakdown {
        by: Some(breakdown::By::Property("plan".into())),
    });
    let unique = rig.server.funnel(request.clone()).await;
    assert_eq!(reached(unique.total.as_ref().unwrap()), vec![2, 1]);
    let by_group = groups(&unique);
    assert_eq!(
        by_group,
        vec![("free".into(), vec![1, 0]), ("pro".into(), vec![1, 1])]
    );
    request.counting = FunnelCounting::Totals as i32;
    let totals = rig.server.funnel(request.clone()).await;
    assert_eq!(reached(&totals.total.unwrap()), vec![4, 2]);
    request.steps[1].condition = "properties.total > 100".into();
    let big = rig.server.funnel(request).await;
    assert_eq!(reached(&big.total.unwrap()), vec![4, 1]);
}
waymark_testkit::on_both_backends!(totals_count_attempts_and_breakdowns_split_them);

/// A merge makes two profiles one customer in every answer; an unmerge splits them back.
async fn merges_reattribute_history_and_unmerges_split_it(backend: Backend) {
    let rig = Rig::start(backend).await;
    let s = &rig.server;
    s.deliver(vec![
        track("anon", "A", 0, json!({})),
        track("known", "B", 10, json!({})),
    ])
    .await;
    let ab = || funnel(&["A", "B"], FunnelOrder::Ordered, "1d");
    assert_eq!(reached(&s.funnel(ab()).await.total.unwrap()), vec![1, 0]);
    s.deliver(vec![merged("m1", "anon", "known")]).await;
    let after = s.funnel(ab()).await;
    assert_eq!(reached(&after.total.unwrap()), vec![1, 1]);
    assert_eq!(after.customers_scanned, 1);
    s.deliver(vec![notice(
        "Profile Unmerged",
        "known",
        json!({"merge_id": "m1", "survivor_profile_id": "known", "restored_profile_id": "anon"}),
    )])
    .await;
    let split = s.funnel(ab()).await;
    assert_eq!(reached(&split.total.unwrap()), vec![1, 0]);
    assert_eq!(split.customers_scanned, 2);
}
waymark_testkit::on_both_backends!(merges_reattribute_history_and_unmerges_split_it);

/// An erased customer leaves every answer and the store, and stays out when their events
/// are delivered again or memory is rebuilt.
async fn an_erased_customer_disappears_for_good(backend: Backend) {
    let rig = Rig::start(backend).await;
    let mine = vec![
        track("gone", "A", 0, json!({"email": "gone@example.com"})),
        track("gone", "B", 10, json!({})),
    ];
    let mut events = mine.clone();
    events.push(track("stays", "A", 0, json!({})));
    events.push(track("stays", "B", 10, json!({})));
    events.push(track("merged-in", "A", 5, json!({})));
    events.push(merged("m1", "merged-in", "gone"));
    rig.server.deliver(events).await;
    let ab = || funnel(&["A", "B"], FunnelOrder::Ordered, "1d");
    assert_eq!(
        reached(&rig.server.funnel(ab()).await.total.unwrap()),
        vec![2, 2]
    );
    rig.server
        .deliver(vec![notice(
            "Profile Deleted",
            "gone",
            json!({"erased_profile_ids": ["gone", "merged-in"]}),
        )])
        .await;
    assert_eq!(
        reached(&rig.server.funnel(ab()).await.total.unwrap()),
        vec![1, 1]
    );
    let again = rig.server.deliver(mine).await;
    assert_eq!((again.applied, again.suppressed), (0, 2));
    let db = analytics_db(&rig.db.url).await;
    waymark_testkit::eventually("events scrubbed", waymark_testkit::PATIENCE, async || {
        stored_of(&db, &["gone", "merged-in"]).await == 0
    })
    .await;
    let url = rig.db.url.clone();
    rig.server.stop().await;
    let restarted = TestAnalytics::start(config(&url, "http://127.0.0.1:9")).await;
    let answer = restarted.funnel(ab()).await;
    assert_eq!(reached(&answer.total.unwrap()), vec![1, 1]);
    assert_eq!(answer.customers_scanned, 1);
}
waymark_testkit::on_both_backends!(an_erased_customer_disappears_for_good);

#[derive(sea_orm::FromQueryResult)]
struct Count {
    n: i64,
}

async fn analytics_db(url: &str) -> sea_orm::DatabaseConnection {
    let url = config(url, "").analytics_database();
    waymark_kit::db::connect(&url, "analytics", 1)
        .await
        .unwrap()
}

/// Events stored for `profiles`.
async fn stored_of(db: &sea_orm::DatabaseConnection, profiles: &[&str]) -> i64 {
    let list = waymark_kit::sql::in_list(profiles.len());
    let values: Vec<sea_orm::Value> = profiles.iter().map(|p| (*p).into()).collect();
    let rows: Vec<Count> = waymark_kit::sql::query_as(
        db,
        &format!("SELECT COUNT(*) AS n FROM analytics_events WHERE profile_id IN ({list})"),
        values,
    )
    .await
    .unwrap();
    rows[0].n
}

/// An erasure whose events could not be deleted (PostgreSQL cut as they were) is kept in
/// no answer meanwhile, none after a restart (memory skips its events), and its events
/// are deleted once the store is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_cut_from_postgres_is_scrubbed_later() {
    let (db, proxy, url) = postgres_behind_proxy().await;
    let server = TestAnalytics::start(config(&url, "http://127.0.0.1:9")).await;
    server
        .deliver(vec![
            track("gone", "A", 0, json!({})),
            track("gone", "B", 10, json!({})),
            track("stays", "A", 0, json!({})),
        ])
        .await;
    // The scrub marks the profile done as the last statement before its commit; every
    // attempt fails, so one that comes at once (woken twice) cannot succeed either.
    proxy.lose_every_reply_containing(b"UPDATE 1");
    server
        .deliver(vec![notice(
            "Profile Deleted",
            "gone",
            json!({"erased_profile_ids": ["gone"]}),
        )])
        .await;
    waymark_testkit::eventually("the scrub cut", waymark_testkit::PATIENCE, async || {
        proxy.replies_lost() > 0
    })
    .await;
    let ab = || funnel(&["A", "B"], FunnelOrder::Ordered, "1d");
    assert_eq!(
        reached(&server.funnel(ab()).await.total.unwrap()),
        vec![1, 0]
    );
    let direct = analytics_db(&db.url).await;
    assert_eq!(
        stored_of(&direct, &["gone"]).await,
        2,
        "the cut scrub was rolled back"
    );
    server.stop().await;
    proxy.keep_replies();
    let restarted = TestAnalytics::start(config(&url, "http://127.0.0.1:9")).await;
    let answer = restarted.funnel(ab()).await;
    assert_eq!(reached(&answer.total.unwrap()), vec![1, 0]);
    assert_eq!(answer.customers_scanned, 1);
    waymark_testkit::eventually("events scrubbed", waymark_testkit::PATIENCE, async || {
        stored_of(&direct, &["gone"]).await == 0
    })
    .await;
    assert_eq!(stored_of(&direct, &["stays"]).await, 1);
}

/// Deliveries that run at once and share events (a relay resending a batch while its
/// first attempt is still stored, in another order) all succeed, and each event counts
/// once.
async fn concurrent_deliveries_of_the_same_events_count_each_once(backend: Backend) {
    let rig = Rig::start(backend).await;
    let events: Vec<_> = (0..200)
        .map(|i| {
            let name = if i < 100 { "A" } else { "B" };
            track(&format!("c{}", i % 40), name, i, json!({}))
        })
        .collect();
    let deliveries = (0..8).map(|d| {
        let mut batch = events.clone();
        if d % 2 == 1 {
            batch.reverse();
        }
        let server = &rig.server;
        async move { server.deliver(batch).await }
    });
    let answers = futures::future::join_all(deliveries).await;
    let applied: u32 = answers.iter().map(|a| a.applied).sum();
    let duplicates: u32 = answers.iter().map(|a| a.duplicates).sum();
    assert_eq!((applied, duplicates), (200, 7 * 200));
    let answer = rig
        .server
        .funnel(funnel(&["A", "B"], FunnelOrder::Ordered, "1d"))
        .await;
    assert_eq!(reached(&answer.total.unwrap()), vec![40, 40]);
    assert_eq!(answer.events_scanned, 200);
}
waymark_testkit::on_both_backends!(concurrent_deliveries_of_the_same_events_count_each_once);

/// A redelivered event counts once, a late one is placed by its event time, and memory
/// compacted when deliveries pause, or rebuilt at start-up, gives the same answers.
async fn late_and_duplicate_events_count_once_in_time_order(backend: Backend) {
    let rig = Rig::start(backend).await;
    let a_late = track("l1", "A", 100, json!({}));
    let b = track("l1", "B", 50, json!({}));
    let first = rig.server.deliver(vec![a_late.clone(), b.clone()]).await;
    assert_eq!((first.applied, first.duplicates), (2, 0));
    let again = rig.server.deliver(vec![a_late.clone(), a_late, b]).await;
    assert_eq!((again.applied, again.duplicates), (0, 3));
    let ab = || funnel(&["A", "B"], FunnelOrder::Ordered, "1d");
    assert_eq!(
        reached(&rig.server.funnel(ab()).await.total.unwrap()),
        vec![1, 0]
    );
    rig.server
        .deliver(vec![track("l1", "A", 10, json!({}))])
        .await;
    let answer = rig.server.funnel(ab()).await;
    assert_eq!(reached(answer.total.as_ref().unwrap()), vec![1, 1]);
    // Once deliveries pause, what arrived is compacted, and answers stay the same.
    let core = &rig.server.core;
    waymark_testkit::eventually("memory compacted", waymark_testkit::PATIENCE, async || {
        core.uncompacted().await == 0
    })
    .await;
    assert_eq!(rig.server.funnel(ab()).await.total, answer.total);
    let url = rig.db.url.clone();
    rig.server.stop().await;
    let restarted = TestAnalytics::start(config(&url, "http://127.0.0.1:9")).await;
    let rebuilt = restarted.funnel(ab()).await;
    assert_eq!(rebuilt.total, answer.total);
    assert_eq!(rebuilt.events_scanned, 3);
}
waymark_testkit::on_both_backends!(late_and_duplicate_events_count_once_in_time_order);

/// Every problem of a request is named with its field; nothing is half-answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_funnel_names_every_field_at_fault() {
    let rig = Rig::start(Backend::Sqlite).await;
    rig.server
        .deliver(vec![track("x", "A", 0, json!({}))])
        .await;
    let mut client = rig.server.client().await;
    let request = GetFunnelRequest {
        steps: vec![
            matcher("A", ""),
            matcher("B", "properties.total >"),
            matcher("", ""),
        ],
        window: "7x".into(),
        exclusions: vec![FunnelExclusion {
            event: Some(matcher("C", "")),
            from_step: 2,
            to_step: 1,
        }],
        ..GetFunnelRequest::default()
    };
    let status = client.get_funnel(admin(request)).await.unwrap_err();
    let fields: Vec<String> = violations(&status).into_iter().map(|(f, _)| f).collect();
    assert_eq!(
        fields,
        vec![
            "steps[1].condition",
            "steps[2].event",
            "window",
            "exclusions[0].to_step"
        ]
    );
    let one_step = client
        .get_funnel(admin(funnel(&["A"], FunnelOrder::Ordered, "")))
        .await
        .unwrap_err();
    assert_eq!(violations(&one_step)[0].0, "steps");
    let status = client
        .get_stage_distribution(admin(GetStageDistributionRequest {
            map_id: "nope".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
}

/// A query past its time budget stops with RESOURCE_EXHAUSTED naming the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_past_its_budget_is_stopped_with_a_clear_error() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut config = config(&db.url, "http://127.0.0.1:9");
    config.analytics_query_budget_ms = 1;
    let server = TestAnalytics::start(config).await;
    for batch in 0..5 {
        let events = (0..1000)
            .map(|i| {
                let n = batch * 1000 + i;
                track(&format!("p{n}"), "A", n, json!({"n": n}))
            })
            .collect();
        server.deliver(events).await;
    }
    let mut request = funnel(&["A", "B"], FunnelOrder::Ordered, "1d");
    request.steps[0].condition = "properties.n >= 0 && properties.n < 1000000".into();
    let status = server
        .client()
        .await
        .get_funnel(admin(request))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("time budget of 1 ms"),
        "{status:?}"
    );
}

/// Until memory is rebuilt from the store (here: held back by a pending migration) every
/// call is UNAVAILABLE, never an empty answer; once it is, the stored events count.
async fn nothing_is_answered_before_memory_is_rebuilt(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = TestAnalytics::start(config(&db.url, "http://127.0.0.1:9")).await;
    server
        .deliver(vec![
            track("r1", "A", 0, json!({})),
            track("r1", "B", 10, json!({})),
        ])
        .await;
    server.stop().await;
    let mut held = config(&db.url, "http://127.0.0.1:9");
    held.auto_migrate = false;
    let url = held.analytics_database();
    let store = waymark_kit::db::connect(&url, "analytics", 1)
        .await
        .unwrap();
    // With its last migration's record gone, the restarted service waits for it to be
    // applied before it rebuilds memory.
    let forget = "DELETE FROM waymark_migrations WHERE service = 'analytics' AND version = 2";
    assert_eq!(
        waymark_kit::sql::execute(&store, forget, vec![])
            .await
            .unwrap(),
        1
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = waymark_kit::CancellationToken::new();
    let restarted = tokio::spawn(
        waymark_analytics::AnalyticsServer::new(held)
            .await
            .unwrap()
            .serve(listener, shutdown.clone()),
    );
    let url = format!("http://{addr}");
    let mut client = analytics_service_client::AnalyticsServiceClient::connect(url.clone())
        .await
        .unwrap();
    let ab = || funnel(&["A", "B"], FunnelOrder::Ordered, "1d");
    let status = client.get_funnel(admin(ab())).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("starting"), "{status:?}");
    let status = client
        .list_journey_maps(admin(ListJourneyMapsRequest {}))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    // A relay's delivery is refused too, to be retried once memory holds what is stored.
    let status = EventSinkClient::connect(url.clone())
        .await
        .unwrap()
        .deliver(admin(DeliverRequest {
            producer: "profile".into(),
            events: vec![track("r2", "A", 0, json!({}))],
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");

    let restore = "INSERT INTO waymark_migrations (service, version, name, applied_at) \
                   VALUES ('analytics', 2, 'events received', 0)";
    waymark_kit::sql::execute(&store, restore, vec![])
        .await
        .unwrap();
    waymark_testkit::platform::wait_serving(&url).await;
    let answer = client.get_funnel(admin(ab())).await.unwrap().into_inner();
    assert_eq!(reached(&answer.total.unwrap()), vec![1, 1]);
    assert_eq!(answer.events_scanned, 2);
    shutdown.cancel();
    restarted.await.unwrap().unwrap();
}
waymark_testkit::on_both_backends!(nothing_is_answered_before_memory_is_rebuilt);

/// Breakdowns by segment membership at the time and by the arm of a journey's split, and
/// a funnel counted per enrollment.
async fn breakdowns_by_segment_and_variant_and_enrollment_counting(backend: Backend) {
    let rig = Rig::start(backend).await;
    let segment =
        |who: &str, name: &str, secs| track(who, name, secs, json!({"segment_id": "vip"}));
    let detail = json!({"weights": {"control": 1, "offer": 1}, "arms": ["control", "offer"], "holdout_percent": 0});
    rig.server
        .deliver(vec![
            segment("v1", "Segment Entered", 0),
            track("v1", "A", 10, json!({})),
            track("v1", "B", 20, json!({})),
            segment("v1", "Segment Exited", 30),
            track("v1", "A", 40, json!({})),
            track("v2", "A", 10, json!({})),
            step(
                "v1",
                "promo",
                "e1",
                0,
                "split",
                "entered",
                "A",
                5,
                json!({}),
            ),
            step(
                "v1",
                "promo",
                "e1",
                1,
                "split",
                "arm",
                "offer",
                5,
                detail.clone(),
            ),
            step(
                "v2",
                "promo",
                "e2",
                0,
                "split",
                "entered",
                "A",
                5,
                json!({}),
            ),
            step("v2", "promo", "e2", 1, "split", "arm", "control", 5, detail),
            step(
                "v2",
                "promo",
                "e3",
                0,
                "split",
                "entered",
                "A",
                35,
                json!({}),
            ),
        ])
        .await;
    let mut request = funnel(&["A", "B"], FunnelOrder::Ordered, "1d");
    request.breakdown = Some(Breakdown {
        by: Some(breakdown::By::Segments(SegmentList {
            segment_ids: vec!["vip".into()],
        })),
    });
    let by_segment = rig.server.funnel(request.clone()).await;
    let by_group = groups(&by_segment);
    // v1's best attempt started at 10 s, inside the segment; v2 was never in it.
    assert_eq!(
        by_group,
        vec![("(none)".into(), vec![1, 0]), ("vip".into(), vec![1, 1])]
    );
    request.breakdown = Some(Breakdown {
        by: Some(breakdown::By::JourneyVariant(JourneyVariant {
            journey_id: "promo".into(),
            node_id: String::new(),
        })),
    });
    let by_arm = rig.server.funnel(request.clone()).await;
    let by_group = groups(&by_arm);
    assert_eq!(
        by_group,
        vec![("control".into(), vec![1, 0]), ("offer".into(), vec![1, 1])]
    );
    request.breakdown = None;
    request.counting = FunnelCounting::Enrollments as i32;
    request.journey_id = "promo".into();
    // e1 (from 5 s: A at 10, B at 20), e2 (from 5 s: A at 10), e3 (from 35 s: nothing).
    let per_enrollment = rig.server.funnel(request.clone()).await;
    assert_eq!(reached(&per_enrollment.total.unwrap()), vec![2, 1]);
    request.journey_id.clear();
    let status = rig
        .server
        .client()
        .await
        .get_funnel(admin(request))
        .await
        .unwrap_err();
    assert_eq!(violations(&status)[0].0, "journey_id");
}
waymark_testkit::on_both_backends!(breakdowns_by_segment_and_variant_and_enrollment_counting);

/// A query that would hold more than its memory budget stops with RESOURCE_EXHAUSTED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_past_its_memory_budget_is_stopped_with_a_clear_error() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut config = config(&db.url, "http://127.0.0.1:9");
    config.analytics_query_memory_mib = 1;
    let server = TestAnalytics::start(config).await;
    for batch in 0..25 {
        let events = (0..1000)
            .map(|i| {
                let n = batch * 1000 + i;
                track(&format!("p{n}"), &format!("Page {n}"), n, json!({}))
            })
            .collect();
        server.deliver(events).await;
    }
    let status = server
        .client()
        .await
        .get_paths(admin(GetPathsRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("memory budget of 1 MiB"),
        "{status:?}"
    );
}

/// A delivery that fails while PostgreSQL is cut is applied when it comes again, without
/// rebuilding memory (nothing was stored); one whose commit reply is lost (stored, but the
/// service cannot know) is in every answer once it comes again, and counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_cut_from_postgres_is_applied_once_when_it_comes_again() {
    let (_db, proxy, url) = postgres_behind_proxy().await;
    let server = TestAnalytics::start(config(&url, "http://127.0.0.1:9")).await;
    let sink = waymark_proto::common::v1::event_sink_client::EventSinkClient::connect(server.url())
        .await
        .unwrap();
    let deliver = async |events: &[waymark_proto::common::v1::Event]| {
        sink.clone()
            .deliver(admin(waymark_proto::common::v1::DeliverRequest {
                producer: "profile".into(),
                events: events.to_vec(),
            }))
            .await
            .map(tonic::Response::into_inner)
    };
    // As a relay does: the same batch again until it is taken (the pool finds its cut
    // connections one at a time).
    let redeliver = async |events: &[waymark_proto::common::v1::Event]| {
        waymark_testkit::eventually("the batch taken", waymark_testkit::PATIENCE, async || {
            deliver(events).await
        })
        .await
    };
    let first = vec![
        track("f1", "A", 0, json!({})),
        track("f1", "B", 10, json!({})),
    ];
    proxy.cut();
    let refused = deliver(&first).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    proxy.restore();
    let again = redeliver(&first).await;
    assert_eq!((again.applied, again.duplicates), (2, 0));
    assert_eq!(
        server.core.rebuilds(),
        1,
        "a delivery cut before its commit stored nothing: memory is not rebuilt for it"
    );

    let second = vec![
        track("f2", "A", 0, json!({})),
        track("f2", "B", 10, json!({})),
    ];
    proxy.lose_reply_containing(b"COMMIT");
    assert!(
        deliver(&second).await.is_err(),
        "the lost reply fails the delivery"
    );
    let again = redeliver(&second).await;
    assert_eq!((again.applied, again.duplicates), (0, 2));
    assert_eq!(
        server.core.rebuilds(),
        2,
        "rebuilt after the unknown commit"
    );
    let answer = server
        .funnel(funnel(&["A", "B"], FunnelOrder::Ordered, "1d"))
        .await;
    assert_eq!(reached(answer.total.as_ref().unwrap()), vec![2, 2]);
    assert_eq!(answer.events_scanned, 4);
}
