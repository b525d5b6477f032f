//! Aggregates added to or changed in the configuration count the stored history: the
//! backfill after start-up, its status, its resumption, and events applied while it runs.

use std::time::Duration;

use prost_types::value::Kind;
use serde_json::json;
use waymark_kit::config::Config;
use waymark_profile::ProfileServer;
use waymark_proto::common::v1::Event;
use waymark_proto::profile::v1::*;

use crate::support::*;
use crate::{by_identity, get, redis_url};

const ORDERS: &str = r#"{ name = "orders", event = "Order Completed", function = "count" }"#;
const REVENUE: &str =
    r#"{ name = "orders", event = "Order Completed", property = "revenue", function = "sum" }"#;

/// `base` with the aggregates of `specs` (TOML inline tables), as an operator writes them.
fn with_aggregates(base: &Config, specs: &[&str]) -> Config {
    let file = std::env::temp_dir().join(format!("waymark-{}.toml", uuid::Uuid::new_v4()));
    std::fs::write(
        &file,
        format!("profile_aggregates = [{}]", specs.join(", ")),
    )
    .unwrap();
    let loaded = Config::load(Some(&file)).unwrap();
    std::fs::remove_file(file).ok();
    Config {
        profile_aggregates: loaded.profile_aggregates,
        ..base.clone()
    }
}

fn order(user_id: &str, anonymous_id: &str, revenue: i64, at: i64) -> Event {
    EventBuilder::track("Order Completed")
        .user(user_id)
        .anonymous(anonymous_id)
        .properties(json!({ "revenue": revenue }))
        .at(at)
        .build()
}

fn aggregate(profile: &Profile, name: &str) -> Option<f64> {
    match profile
        .computed
        .as_ref()?
        .aggregates
        .get(name)?
        .kind
        .as_ref()?
    {
        Kind::NumberValue(n) => Some(*n),
        _ => None,
    }
}

async fn status(server: &TestProfile) -> Vec<AggregateStatus> {
    server
        .client()
        .await
        .get_aggregate_status(admin(GetAggregateStatusRequest {}))
        .await
        .unwrap()
        .into_inner()
        .aggregates
}

/// Waits until every aggregate listed is backfilled and none is being removed.
async fn wait_backfilled(server: &TestProfile) -> Vec<AggregateStatus> {
    eventually("every aggregate backfilled", PATIENCE, async || {
        let all = status(server).await;
        if all.iter().all(|a| a.backfilled && !a.removed) {
            Ok(all)
        } else {
            Err(all)
        }
    })
    .await
}

async fn buyer(server: &TestProfile, user_id: &str) -> Profile {
    get(server, by_identity("user_id", user_id)).await.unwrap()
}

/// Five orders before `orders` is configured, then a restart with it: the profile counts
/// all five (not 1 after the next order), enters the segment the history qualifies it for,
/// and the next order makes 6.
async fn an_aggregate_added_later_counts_the_history(backend: Backend) {
    let sink = Sink::default();
    let db = TestDb::new(backend).await;
    let base = config(&db.url, &sink.start().await, Some(&redis_url()));
    let server = TestProfile::start(base.clone()).await;
    server
        .put_segment("repeat", "computed.aggregates.orders >= 5")
        .await;
    let now = waymark_kit::time::now_micros() / 1_000_000;
    server
        .deliver(
            (0..5)
                .map(|n| order("five", "", 10, now - 100 + n))
                .collect(),
        )
        .await;
    assert!(status(&server).await.is_empty(), "no aggregate configured");
    server.stop().await;

    let server = TestProfile::start(with_aggregates(&base, &[ORDERS])).await;
    let done = wait_backfilled(&server).await;
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].name, "orders");
    assert_eq!(done[0].definition, "Count|Order Completed||0");
    assert_eq!(done[0].profiles_backfilled, 1);
    let p = buyer(&server, "five").await;
    assert_eq!(aggregate(&p, "orders"), Some(5.0), "the history counts");
    assert_eq!(p.segments, ["repeat"]);
    sink.wait_for_event("Segment Entered", |e| {
        e.event == "Segment Entered" && e.profile_id == p.profile_id
    })
    .await;

    server.deliver(vec![order("five", "", 10, now)]).await;
    assert_eq!(
        aggregate(&buyer(&server, "five").await, "orders"),
        Some(6.0)
    );
    server.stop().await;

    // Started again with the same definition: nothing to backfill, nothing recounted.
    let server = TestProfile::start(with_aggregates(&base, &[ORDERS])).await;
    assert!(status(&server).await.iter().all(|a| a.backfilled));
    assert_eq!(
        aggregate(&buyer(&server, "five").await, "orders"),
        Some(6.0)
    );
    server.stop().await;
}
waymark_testkit::on_both_backends!(an_aggregate_added_later_counts_the_history);

/// A changed definition under the same name is recomputed from the history; a removed
/// aggregate leaves every profile.
async fn a_changed_aggregate_is_recomputed_and_a_removed_one_dropped(backend: Backend) {
    let sink = Sink::default();
    let db = TestDb::new(backend).await;
    let base = config(&db.url, &sink.start().await, Some(&redis_url()));
    let server = TestProfile::start(with_aggregates(&base, &[ORDERS])).await;
    let now = waymark_kit::time::now_micros() / 1_000_000;
    server
        .deliver(vec![
            order("changing", "", 10, now - 3),
            order("changing", "", 20, now - 2),
            order("changing", "", 30, now - 1),
        ])
        .await;
    wait_backfilled(&server).await;
    assert_eq!(
        aggregate(&buyer(&server, "changing").await, "orders"),
        Some(3.0)
    );
    server.stop().await;

    let server = TestProfile::start(with_aggregates(&base, &[REVENUE])).await;
    let done = wait_backfilled(&server).await;
    assert_eq!(done[0].definition, "Sum|Order Completed|revenue|0");
    assert_eq!(
        aggregate(&buyer(&server, "changing").await, "orders"),
        Some(60.0),
        "the sum of every order, not of those after the change"
    );
    server.stop().await;

    let server = TestProfile::start(base.clone()).await;
    eventually("the removed aggregate's row to go", PATIENCE, async || {
        let all = status(&server).await;
        if all.is_empty() { Ok(()) } else { Err(all) }
    })
    .await;
    let p = buyer(&server, "changing").await;
    assert!(
        p.computed.as_ref().unwrap().aggregates.is_empty(),
        "{:?}",
        p.computed
    );
    server.stop().await;
}
waymark_testkit::on_both_backends!(a_changed_aggregate_is_recomputed_and_a_removed_one_dropped);

/// Three profiles with five orders each, stored before `orders` was configured.
async fn three_buyers(base: &Config) {
    let server = TestProfile::start(base.clone()).await;
    let now = waymark_kit::time::now_micros() / 1_000_000;
    for user in ["b-1", "b-2", "b-3"] {
        server
            .deliver((0..5).map(|n| order(user, "", 1, now - 10 + n)).collect())
            .await;
    }
    server.stop().await;
}

/// The service's core with `config`, migrated and prepared as at start-up but neither
/// serving nor running its background work, so a test decides when each page runs.
async fn core(config: Config) -> ProfileServer {
    let server = ProfileServer::new(config).await.unwrap();
    server.migrate().await.unwrap();
    server.core().prepare().await.unwrap();
    server
}

async fn count_of(server: &ProfileServer, user_id: &str) -> Option<f64> {
    let p = server
        .core()
        .get_by_identity("user_id", user_id)
        .await
        .unwrap();
    aggregate(&p, "orders")
}

/// A process that committed one page of the backfill and stopped: the aggregate is not
/// reported backfilled, and the next start finishes the rest.
async fn an_interrupted_backfill_resumes(backend: Backend) {
    let sink = Sink::default();
    let db = TestDb::new(backend).await;
    let base = config(&db.url, &sink.start().await, Some(&redis_url()));
    three_buyers(&base).await;
    let configured = with_aggregates(&base, &[ORDERS]);

    let stopped = core(configured.clone()).await;
    assert!(
        stopped
            .core()
            .backfill_aggregates(1, u64::MAX)
            .await
            .unwrap()
    );
    let half = stopped.core().aggregate_status().await.unwrap();
    assert_eq!(
        (half[0].backfilled, half[0].profiles_backfilled),
        (false, 1)
    );
    // Profiles are created, and backfilled, in id order.
    assert_eq!(count_of(&stopped, "b-1").await, Some(5.0));
    assert_eq!(count_of(&stopped, "b-2").await, None);
    drop(stopped);

    let server = TestProfile::start(configured).await;
    let done = wait_backfilled(&server).await;
    assert_eq!(
        done[0].profiles_backfilled, 3,
        "resumed after the first page"
    );
    for user in ["b-1", "b-2", "b-3"] {
        assert_eq!(aggregate(&buyer(&server, user).await, "orders"), Some(5.0));
    }
    server.stop().await;
}
waymark_testkit::on_both_backends!(an_interrupted_backfill_resumes);

/// Events applied while the backfill runs count once, whether their profile's page came
/// before them or comes after; so does a merge of a profile already backfilled with one
/// not yet backfilled.
async fn events_during_a_backfill_count_once(backend: Backend) {
    let sink = Sink::default();
    let db = TestDb::new(backend).await;
    let base = config(&db.url, &sink.start().await, Some(&redis_url()));
    three_buyers(&base).await;
    {
        // Created after the three buyers, so backfilled after them: a known customer with
        // two orders and an anonymous visitor with three, one person.
        let server = TestProfile::start(base.clone()).await;
        let now = waymark_kit::time::now_micros() / 1_000_000;
        server
            .deliver(vec![order("known", "", 1, now), order("known", "", 1, now)])
            .await;
        // A millisecond later at least: the visitor's profile id (a UUIDv7) sorts after
        // the known customer's, so the backfill pages reach them in that order.
        tokio::time::sleep(Duration::from_millis(5)).await;
        server
            .deliver((0..3).map(|_| order("", "visitor", 1, now)).collect())
            .await;
        server.stop().await;
    }
    let server = core(with_aggregates(&base, &[ORDERS])).await;
    let profiles = server.core();
    assert!(profiles.backfill_aggregates(1, u64::MAX).await.unwrap());
    // b-1's page is done; b-2's and b-3's are to come.
    let now = waymark_kit::time::now_micros() / 1_000_000;
    let one_more = ["b-1", "b-2", "b-3"].map(|u| order(u, "", 1, now)).to_vec();
    profiles.apply(one_more).await.unwrap();
    assert_eq!(count_of(&server, "b-1").await, Some(6.0));
    assert_eq!(
        count_of(&server, "b-2").await,
        Some(1.0),
        "only the new order until its page"
    );
    assert!(profiles.backfill_aggregates(1, u64::MAX).await.unwrap());
    assert!(profiles.backfill_aggregates(1, u64::MAX).await.unwrap());
    assert!(profiles.backfill_aggregates(1, u64::MAX).await.unwrap());
    // `known` is backfilled, `visitor` not: an order linking both merges the visitor
    // into the older `known`.
    assert_eq!(count_of(&server, "known").await, Some(2.0));
    profiles
        .apply(vec![order("known", "visitor", 1, now)])
        .await
        .unwrap();
    while profiles.backfill_aggregates(1, u64::MAX).await.unwrap() {}
    assert!(profiles.aggregate_status().await.unwrap()[0].backfilled);
    for user in ["b-1", "b-2", "b-3"] {
        assert_eq!(count_of(&server, user).await, Some(6.0), "{user}");
    }
    assert_eq!(
        count_of(&server, "known").await,
        Some(6.0),
        "both histories and the linking order"
    );
    let merged = profiles
        .get_by_identity("anonymous_id", "visitor")
        .await
        .unwrap();
    assert_eq!(aggregate(&merged, "orders"), Some(6.0));
}
waymark_testkit::on_both_backends!(events_during_a_backfill_count_once);

/// The three buyers stored before `orders` was configured, then the core configured with
/// it and not yet backfilling.
async fn buyers_then_orders_configured(backend: Backend) -> (TestDb, Config, ProfileServer) {
    let sink = Sink::default();
    let db = TestDb::new(backend).await;
    let base = config(&db.url, &sink.start().await, Some(&redis_url()));
    three_buyers(&base).await;
    let server = core(with_aggregates(&base, &[ORDERS])).await;
    (db, base, server)
}

/// A page stops at its budget of stored events, so a page of long histories holds the
/// applier no longer than one of short ones; a profile over the budget goes alone.
async fn a_backfill_page_replays_no_more_than_its_events(backend: Backend) {
    let (_db, _, server) = buyers_then_orders_configured(backend).await;
    let profiles = server.core();
    let mut done = Vec::new();
    // Five events each: a budget of six takes one buyer a page, a budget of one still one.
    for budget in [6, 1, 6] {
        assert!(profiles.backfill_aggregates(100, budget).await.unwrap());
        done.push(profiles.aggregate_status().await.unwrap()[0].profiles_backfilled);
    }
    assert_eq!(done, [1, 2, 3]);
    assert!(!profiles.backfill_aggregates(100, 6).await.unwrap());
    for user in ["b-1", "b-2", "b-3"] {
        assert_eq!(count_of(&server, user).await, Some(5.0), "{user}");
    }
}
waymark_testkit::on_both_backends!(a_backfill_page_replays_no_more_than_its_events);

/// Profiles created after the backfill began had every event counted as it arrived: the
/// backfill passes over them, so steady traffic of new customers cannot keep it from
/// finishing.
async fn a_backfill_passes_over_profiles_created_after_it_began(backend: Backend) {
    let (_db, base, server) = buyers_then_orders_configured(backend).await;
    let profiles = server.core();
    // As if the buyers had come an hour ago and the backfill had begun eleven minutes ago,
    // past the clock margin.
    let conn = waymark_kit::db::connect(&base.profile_database(), "profile", 1)
        .await
        .unwrap();
    let minutes = |n: i64| n * 60 * 1_000_000;
    for (table, column, by) in [
        ("profiles", "created_at", minutes(60)),
        ("aggregate_specs", "started_at", minutes(11)),
    ] {
        waymark_kit::sql::execute(
            &conn,
            &format!("UPDATE {table} SET {column} = {column} - ?"),
            [by.into()],
        )
        .await
        .unwrap();
    }
    let now = waymark_kit::time::now_micros() / 1_000_000;
    profiles
        .apply(vec![order("late", "", 1, now), order("late", "", 1, now)])
        .await
        .unwrap();
    let mut pages = 0;
    while profiles.backfill_aggregates(1, u64::MAX).await.unwrap() {
        pages += 1;
    }
    assert_eq!(pages, 3, "one page per buyer, none for the new customer");
    let status = profiles.aggregate_status().await.unwrap();
    assert_eq!(
        (status[0].backfilled, status[0].profiles_backfilled),
        (true, 3)
    );
    assert_eq!(count_of(&server, "late").await, Some(2.0));
    for user in ["b-1", "b-2", "b-3"] {
        assert_eq!(count_of(&server, user).await, Some(5.0), "{user}");
    }
}
waymark_testkit::on_both_backends!(a_backfill_passes_over_profiles_created_after_it_began);

/// The same through the running service: orders delivered while the background backfill
/// goes through 300 profiles (three pages) leave each profile with exactly its orders. How
/// many deliveries overlap the backfill depends on the machine; the message says.
async fn orders_delivered_while_the_service_backfills_count_once(backend: Backend) {
    let sink = Sink::default();
    let db = TestDb::new(backend).await;
    let base = config(&db.url, &sink.start().await, Some(&redis_url()));
    let users: Vec<String> = (0..300).map(|n| format!("busy-{n:03}")).collect();
    let now = waymark_kit::time::now_micros() / 1_000_000;
    let orders = |at: i64| -> Vec<Event> { users.iter().map(|u| order(u, "", 1, at)).collect() };
    let server = TestProfile::start(base.clone()).await;
    server.deliver(orders(now - 2)).await;
    server.deliver(orders(now - 1)).await;
    server.stop().await;

    let server = TestProfile::start(with_aggregates(&base, &[ORDERS])).await;
    let mut during = 0;
    // Newest profiles first: their pages come last, so their orders arrive before them.
    let mut third = orders(now);
    third.reverse();
    for chunk in third.chunks(30) {
        during += usize::from(!status(&server).await[0].backfilled);
        server.deliver(chunk.to_vec()).await;
    }
    let done = wait_backfilled(&server).await;
    assert_eq!(done[0].profiles_backfilled, 300);
    for user in &users {
        assert_eq!(
            aggregate(&buyer(&server, user).await, "orders"),
            Some(3.0),
            "{user} ({during} of 10 deliveries during the backfill)"
        );
    }
    server.stop().await;
}
waymark_testkit::on_both_backends!(orders_delivered_while_the_service_backfills_count_once);
