//! Emotion from CX signals and configured aggregates, through the service, feeding a
//! segment: the "upset repeat buyer" an agent should call back.

use prost_types::value::Kind;
use serde_json::json;
use waymark_kit::config::Config;
use waymark_proto::profile::v1::*;

use crate::support::*;
use crate::{by_identity, get, redis_url};

const DAY: i64 = 24 * 3600;

/// Aggregates as an operator writes them in the TOML file.
fn with_aggregates(base: Config) -> Config {
    let file = std::env::temp_dir().join(format!("waymark-{}.toml", uuid::Uuid::new_v4()));
    std::fs::write(
        &file,
        r#"profile_aggregates = [
            { name = "orders_30d", event = "Order Completed", function = "count", window_secs = 2592000 },
            { name = "revenue", event = "Order Completed", property = "revenue", function = "sum" },
            { name = "products_seen", event = "Product Viewed", property = "product_id", function = "distinct_count" },
        ]"#,
    )
    .unwrap();
    let loaded = Config::load(Some(&file)).unwrap();
    std::fs::remove_file(file).ok();
    Config {
        profile_aggregates: loaded.profile_aggregates,
        ..base
    }
}

fn number(profile: &Profile, name: &str) -> Option<f64> {
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

async fn emotion_changes(sink: &Sink, profile_id: &str) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    sink.received
        .lock()
        .await
        .iter()
        .filter(|e| e.event == "Emotion Changed" && e.profile_id == profile_id)
        .filter(|e| seen.insert(e.event_id.clone()))
        .filter_map(|e| {
            waymark_proto::json::string_at(e.properties.as_ref()?, &["label"]).map(str::to_owned)
        })
        .collect()
}

async fn upset_repeat_buyers_are_found(backend: Backend) {
    let sink = Sink::default();
    let db = TestDb::new(backend).await;
    let config = with_aggregates(config(&db.url, &sink.start().await, Some(&redis_url())));
    let server = TestProfile::start(config).await;
    let now = waymark_kit::time::now_micros() / 1_000_000;
    server
        .put_segment(
            "call-back",
            r#"emotion.label == "upset" && computed.aggregates.orders_30d >= 2"#,
        )
        .await;

    let order = |revenue: i64, at: i64| {
        EventBuilder::track("Order Completed")
            .user("cx-1")
            .properties(json!({"revenue": revenue}))
            .at(at)
            .build()
    };
    let viewed = |product: &str| {
        EventBuilder::track("Product Viewed")
            .user("cx-1")
            .properties(json!({"product_id": product}))
            .at(now)
            .build()
    };
    server
        .deliver(vec![
            order(100, now - 40 * DAY),
            order(10, now - DAY),
            order(20, now),
            viewed("p1"),
            viewed("p1"),
            viewed("p2"),
        ])
        .await;
    let bought = get(&server, by_identity("user_id", "cx-1")).await.unwrap();
    assert_eq!(
        number(&bought, "orders_30d"),
        Some(2.0),
        "the 40-day-old order is outside the window"
    );
    assert_eq!(number(&bought, "revenue"), Some(130.0));
    assert_eq!(number(&bought, "products_seen"), Some(2.0));
    assert!(bought.segments.is_empty(), "not upset yet");

    server
        .deliver(vec![EventBuilder::track("Complaint Filed").user("cx-1").properties(json!({"text": "I've been waiting two weeks and nobody answers, this is terrible"})).at(now).build()])
        .await;
    let upset = get(&server, by_identity("user_id", "cx-1")).await.unwrap();
    let emotion = upset
        .emotion
        .clone()
        .expect("an emotion from the complaint");
    assert_eq!(emotion.label(), EmotionLabel::Upset, "{emotion:?}");
    assert!(emotion.score < -0.6);
    assert_eq!(emotion.last_signal.as_ref().unwrap().kind, "sentiment");
    assert_eq!(upset.segments, ["call-back"]);

    // A 5-star CSAT after the call-back makes them delighted, and they leave the segment.
    server
        .deliver(vec![
            EventBuilder::track("CSAT Submitted")
                .user("cx-1")
                .properties(json!({"csat": 5}))
                .at(now + 60)
                .build(),
        ])
        .await;
    let happy = get(&server, by_identity("user_id", "cx-1")).await.unwrap();
    assert_eq!(
        happy.emotion.as_ref().unwrap().label(),
        EmotionLabel::Delighted
    );
    assert!(happy.segments.is_empty());

    let mut labels = eventually("two Emotion Changed events", PATIENCE, async || {
        let labels = emotion_changes(&sink, &happy.profile_id).await;
        if labels.len() == 2 {
            Ok(labels)
        } else {
            Err(labels)
        }
    })
    .await;
    labels.sort();
    assert_eq!(
        labels,
        ["delighted", "upset"],
        "Emotion Changed on each new label"
    );
    server.stop().await;
}
waymark_testkit::on_both_backends!(upset_repeat_buyers_are_found);

/// Anger fades: with no new signal, decay walks the label back to neutral one step at a
/// time, each step reported, and the upset segment lets the customer go.
async fn upset_customers_calm_down_with_time(backend: Backend) {
    let sink = Sink::default();
    let db = TestDb::new(backend).await;
    let mut config = config(&db.url, &sink.start().await, Some(&redis_url()));
    config.emotion_half_life_secs = 1;
    config.segment_sweep_secs = 1;
    let server = TestProfile::start(config).await;
    server
        .put_segment("escalate", r#"emotion.label == "upset""#)
        .await;
    let mut csat = EventBuilder::track("CSAT Submitted")
        .user("cx-2")
        .properties(json!({"csat": 1}))
        .at(0)
        .build();
    // To the microsecond: decay is measured from the signal's time.
    csat.timestamp = Some(waymark_kit::time::from_micros(
        waymark_kit::time::now_micros(),
    ));
    server.deliver(vec![csat]).await;
    let upset = get(&server, by_identity("user_id", "cx-2")).await.unwrap();
    sink.wait_for_event("Segment Entered", |e| {
        e.event == "Segment Entered" && e.profile_id == upset.profile_id
    })
    .await;

    // -1 reaches -0.6 after 0.74 s and -0.2 after 2.3 s; the sweep runs every second, so
    // it normally sees the unhappy step, but a stalled machine may skip straight on.
    let changes = eventually("the emotion to decay to neutral", PATIENCE, async || {
        let changes = emotion_changes(&sink, &upset.profile_id).await;
        if changes.last().is_some_and(|l| l == "neutral") {
            Ok(changes)
        } else {
            Err(changes)
        }
    })
    .await;
    assert!(
        changes == ["upset", "unhappy", "neutral"] || changes == ["upset", "neutral"],
        "{changes:?}"
    );
    // Both downstream relays deliver to the one sink: each event counts once.
    let mut seen = std::collections::HashSet::new();
    let decayed: Vec<String> = sink
        .received
        .lock()
        .await
        .iter()
        .filter(|e| e.event == "Emotion Changed" && e.profile_id == upset.profile_id)
        .filter(|e| seen.insert(e.event_id.clone()))
        .filter_map(|e| {
            waymark_proto::json::string_at(e.properties.as_ref()?, &["signal_kind"])
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(decayed.len(), changes.len());
    assert!(decayed.iter().skip(1).all(|k| k == "decay"), "{decayed:?}");
    sink.wait_for_event("Segment Exited", |e| {
        e.event == "Segment Exited" && e.profile_id == upset.profile_id
    })
    .await;
    let calm = get(&server, by_identity("user_id", "cx-2")).await.unwrap();
    let emotion = calm.emotion.unwrap();
    assert_eq!(emotion.label(), EmotionLabel::Neutral);
    assert_eq!(
        emotion.score, -1.0,
        "the score stays the anchor decay starts from"
    );
    assert!(calm.segments.is_empty());
    server.stop().await;
}
waymark_testkit::on_both_backends!(upset_customers_calm_down_with_time);
