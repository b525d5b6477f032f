//! What journeys read from the profile: the time zone a local-time delay waits in, a
//! date trait a delay waits for, and, from the shared profile cache, consent, traits for
//! templates and splits, and the emotion that picks a message's variant.

use std::time::Duration;

use chrono::TimeZone;
use serde_json::json;
use waymark_profile_cache::ProfileCache;
use waymark_proto::orchestration::v1::*;
use waymark_proto::profile::v1::{Consent, Emotion, EmotionLabel, Profile};

use crate::support::*;

/// An instant given in UTC, in microseconds since the epoch.
fn utc_us(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> i64 {
    chrono::Utc
        .with_ymd_and_hms(y, mo, d, h, mi, 0)
        .unwrap()
        .timestamp_micros()
}

fn waiting_until(e: &Enrollment) -> i64 {
    waymark_kit::time::micros(e.waiting_until.as_ref().expect("a due time"))
}

/// 10:00 in New York on the day the clocks go forward there (Sunday 8 March 2026) is
/// 14:00 UTC, not 15:00; when the customer's time zone changes to Berlin while waiting,
/// the wait moves to 10:00 in Berlin.
async fn a_local_time_delay_follows_the_clocks_and_the_customer(backend: Backend) {
    // Saturday 7 March 2026, 11:00 in New York (16:00 UTC): 10:00 has passed today.
    let saturday = utc_us(2026, 3, 7, 16, 0);
    let rig = Rig::start_at(backend, saturday).await;
    let s = &rig.server;
    s.publish(json!({
        "journeyId": "morning",
        "defaultTimeZone": "America/New_York",
        "entry": {"trigger": {"event": "Signed Up"}, "start": "ten"},
        "nodes": [
            {"id": "ten", "delay": {"untilLocalTime": "10:00", "next": "hello"}},
            {"id": "hello", "message": {"channel": "email", "variants": [{"body": "good morning"}]}}
        ]
    }))
    .await;
    s.deliver(vec![
        track("Signed Up", "p-stays", json!({})),
        track("Signed Up", "p-moves", json!({})),
    ])
    .await;
    let new_york_sunday_ten = utc_us(2026, 3, 8, 14, 0);
    for p in ["p-stays", "p-moves"] {
        assert_eq!(
            waiting_until(&s.enrollments_of(p).await[0]),
            new_york_sunday_ten,
            "10:00 EDT, the first morning of daylight saving time"
        );
    }

    s.deliver(vec![track(
        "Trait Changed",
        "p-moves",
        json!({"changes": {"timezone": {"old": null, "new": "Europe/Berlin"}}}),
    )])
    .await;
    let moved = &s.enrollments_of("p-moves").await[0];
    let berlin_sunday_ten = utc_us(2026, 3, 8, 9, 0);
    assert_eq!(
        waiting_until(moved),
        berlin_sunday_ten,
        "10:00 CET, still winter time in Berlin"
    );
    assert!(
        s.path(&moved.enrollment_id)
            .await
            .contains(&"ten:rescheduled:Europe/Berlin".to_owned())
    );

    s.advance(Duration::from_micros(
        (berlin_sunday_ten - saturday).unsigned_abs(),
    ))
    .await;
    let sent = rig.receiver.wait_for(1).await;
    assert_eq!(sent[0].body["profile_id"], "p-moves");
    assert_eq!(
        s.enrollments_of("p-stays").await[0].status,
        EnrollmentStatus::Active as i32
    );
    s.advance(5 * HOUR).await;
    assert_eq!(
        rig.receiver.wait_for(2).await[1].body["profile_id"],
        "p-stays"
    );
}
waymark_testkit::on_both_backends!(a_local_time_delay_follows_the_clocks_and_the_customer);

/// A delay until a date trait the profile lacks: with `PAST_DATE_EXIT` the enrollment
/// exits at the delay (reason `date passed`); by default it goes straight on.
async fn a_missing_date_trait_exits_or_goes_on_as_chosen(backend: Backend) {
    let rig = Rig::start(backend).await;
    let s = &rig.server;
    for (id, when_past) in [
        ("strict", json!("PAST_DATE_EXIT")),
        ("lenient", serde_json::Value::Null),
    ] {
        let mut delay = json!({"untilTrait": "renewal_date", "next": "remind"});
        if !when_past.is_null() {
            delay["whenPast"] = when_past;
        }
        s.publish(json!({
            "journeyId": id,
            "entry": {"trigger": {"event": "Plan Bought"}, "start": "renewal"},
            "nodes": [
                {"id": "renewal", "delay": delay},
                {"id": "remind", "message": {"channel": "email", "variants": [{"body": id}]}}
            ]
        }))
        .await;
    }
    s.deliver(vec![track("Plan Bought", "p-1", json!({}))])
        .await;
    let enrollments = s.enrollments_of("p-1").await;
    let of = |journey: &str| {
        enrollments
            .iter()
            .find(|e| e.journey_id == journey)
            .unwrap()
            .clone()
    };
    let strict = of("strict");
    assert_eq!(strict.status, EnrollmentStatus::Exited as i32);
    assert_eq!(
        strict.reason, "date passed",
        "the reason the contract names"
    );
    assert_eq!(
        s.path(&strict.enrollment_id).await,
        ["renewal:entered:Plan Bought", "renewal:exited:date passed",]
    );
    let lenient = of("lenient");
    assert_eq!(lenient.status, EnrollmentStatus::Completed as i32);
    assert_eq!(
        s.path(&lenient.enrollment_id).await,
        [
            "renewal:entered:Plan Bought",
            "renewal:resumed:no wait",
            &format!("remind:sent:{}:remind:2", lenient.enrollment_id),
            "remind:completed:completed",
        ]
    );
    let sent = rig.receiver.wait_for(1).await;
    assert_eq!(sent[0].body["body"], "lenient");
}
waymark_testkit::on_both_backends!(a_missing_date_trait_exits_or_goes_on_as_chosen);

/// A rig whose orchestrator reads profiles from the shared Redis cache, and the cache to
/// put them in.
async fn rig_with_cache(backend: Backend) -> (Rig, ProfileCache) {
    let db = TestDb::new(backend).await;
    let receiver = WebhookReceiver::start(WEBHOOK_SECRET).await;
    let sink = Sink::default();
    let sink_url = sink.start().await;
    let mut config = config(&db.url, &receiver.url(), &sink_url);
    config.redis_url = Some(waymark_testkit::redis_url());
    let cache = ProfileCache::redis(
        &waymark_testkit::redis_url(),
        &config.profile_cache_key_prefix,
        Duration::from_secs(600),
    )
    .unwrap();
    let server =
        TestOrchestrator::start(config, waymark_orchestrator::Clock::manual(START_US)).await;
    let rig = Rig {
        server,
        receiver,
        sink,
        db,
    };
    (rig, cache)
}

fn cached_profile(id: &str, traits: serde_json::Value) -> Profile {
    Profile {
        profile_id: id.into(),
        version: 1,
        traits: Some(waymark_proto::json::struct_from_json(
            traits.as_object().unwrap().clone(),
        )),
        ..Profile::default()
    }
}

/// From cached profiles: a recorded refusal of marketing e-mail suppresses the offer,
/// a split reads `traits.plan`, the body is personalised from traits, and an upset
/// customer gets the apologetic variant.
async fn cached_profiles_decide_consent_branches_and_variants(backend: Backend) {
    let (rig, cache) = rig_with_cache(backend).await;
    let s = &rig.server;
    let mut refused = cached_profile("p-refused", json!({"first_name": "Ada", "plan": "pro"}));
    refused.consents.push(Consent {
        channel: "email".into(),
        purpose: "marketing".into(),
        granted: false,
        ..Consent::default()
    });
    let pro = cached_profile("p-pro", json!({"first_name": "Cy", "plan": "pro"}));
    let mut upset = cached_profile("p-upset", json!({"first_name": "Bo", "plan": "free"}));
    upset.emotion = Some(Emotion {
        score: -0.9,
        label: EmotionLabel::Upset as i32,
        updated_at: Some(waymark_kit::time::from_micros(START_US)),
        ..Emotion::default()
    });
    for p in [&refused, &pro, &upset] {
        cache.put(p).await;
    }
    let variants = json!([
        {"name": "sorry", "emotions": ["upset", "unhappy"], "body": "Sorry, {{ profile.traits.first_name }}"},
        {"name": "plain", "body": "Hi {{ profile.traits.first_name }}, on {{ profile.traits.plan }}"}
    ]);
    s.publish(json!({
        "journeyId": "offer",
        "entry": {"trigger": {"event": "Pricing Viewed"}, "start": "plan"},
        "nodes": [
            {"id": "plan", "split": {"branches": [{"name": "pro", "condition": "traits.plan == \"pro\"", "next": "pro_offer"}],
                                      "otherwise": "basic_offer"}},
            {"id": "pro_offer", "message": {"channel": "email", "variants": variants}},
            {"id": "basic_offer", "message": {"channel": "email", "variants": variants}}
        ]
    }))
    .await;
    s.deliver(vec![
        track("Pricing Viewed", "p-refused", json!({})),
        track("Pricing Viewed", "p-pro", json!({})),
        track("Pricing Viewed", "p-upset", json!({})),
    ])
    .await;

    let sent = rig.receiver.wait_for(2).await;
    let to = |p: &str| {
        sent.iter()
            .find(|r| r.body["profile_id"] == p)
            .unwrap_or_else(|| panic!("a message to {p}"))
            .body
            .clone()
    };
    let pro_message = to("p-pro");
    assert_eq!(pro_message["node_id"], "pro_offer");
    assert_eq!(pro_message["variant"], "plain");
    assert_eq!(pro_message["body"], "Hi Cy, on pro");
    let upset_message = to("p-upset");
    assert_eq!(upset_message["node_id"], "basic_offer");
    assert_eq!(upset_message["variant"], "sorry");
    assert_eq!(upset_message["body"], "Sorry, Bo");

    let held = &s.actions("p-refused").await[0];
    assert_eq!(held.node_id, "pro_offer");
    assert_eq!(held.status, ActionStatus::Suppressed as i32);
    assert_eq!(held.reason, "no consent for email/marketing");
    assert_eq!(
        rig.receiver.received().len(),
        2,
        "nothing to the profile that refused"
    );
    let refused_enrollment = &s.enrollments_of("p-refused").await[0];
    assert_eq!(
        s.path(&refused_enrollment.enrollment_id).await[1],
        "plan:branch:pro"
    );
}
waymark_testkit::on_both_backends!(cached_profiles_decide_consent_branches_and_variants);

/// With the profile's own `timezone` trait (from the cache): a date trait is waited for
/// until midnight there, a past one exits, and a local time of day is read there rather
/// than in the journey's default zone.
async fn the_profile_time_zone_places_dates_and_local_times(backend: Backend) {
    let (rig, cache) = rig_with_cache(backend).await;
    let s = &rig.server;
    for (id, renewal) in [("p-future", "2026-03-05"), ("p-past", "2026-03-01")] {
        cache
            .put(&cached_profile(
                id,
                json!({"timezone": "Asia/Tokyo", "renewal_date": renewal}),
            ))
            .await;
    }
    s.publish(json!({
        "journeyId": "renewal",
        "defaultTimeZone": "America/New_York",
        "entry": {"trigger": {"event": "Plan Bought"}, "start": "renewal"},
        "nodes": [
            {"id": "renewal", "delay": {"untilTrait": "renewal_date", "whenPast": "PAST_DATE_EXIT", "next": "ten"}},
            {"id": "ten", "delay": {"untilLocalTime": "10:00", "next": "remind"}},
            {"id": "remind", "message": {"channel": "email", "variants": [{"body": "renew"}]}}
        ]
    }))
    .await;
    s.deliver(vec![
        track("Plan Bought", "p-future", json!({})),
        track("Plan Bought", "p-past", json!({})),
    ])
    .await;
    let past = &s.enrollments_of("p-past").await[0];
    assert_eq!(past.status, EnrollmentStatus::Exited as i32);
    assert_eq!(past.reason, "date passed");
    let future = &s.enrollments_of("p-future").await[0];
    let tokyo_midnight = utc_us(2026, 3, 4, 15, 0);
    assert_eq!(waiting_until(future), tokyo_midnight, "5 March 00:00 JST");

    s.advance(Duration::from_micros(
        (tokyo_midnight - START_US).unsigned_abs(),
    ))
    .await;
    let at_ten = &s.enrollments_of("p-future").await[0];
    assert_eq!(at_ten.node_id, "ten");
    assert_eq!(
        waiting_until(at_ten),
        utc_us(2026, 3, 5, 1, 0),
        "5 March 10:00 JST, not 10:00 in New York"
    );
}
waymark_testkit::on_both_backends!(the_profile_time_zone_places_dates_and_local_times);
