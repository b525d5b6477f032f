//! The contact policy across journeys: shared caps with priorities, quiet hours in the
//! recipient's time zone across a daylight-saving change.

use serde_json::json;
use waymark_proto::orchestration::v1::*;

use crate::support::*;

/// Saturday 28 March 2026, 23:00 in Europe/Berlin (22:00 UTC): the clocks go forward
/// at 02:00 that night.
const SATURDAY_LATE_BERLIN: i64 = 1_774_735_200_000_000;

fn offer(id: &str, trigger: &str, priority: u32) -> serde_json::Value {
    json!({
        "journeyId": id,
        "priority": priority,
        "entry": {"trigger": {"event": trigger}, "start": "offer"},
        "nodes": [{"id": "offer", "message": {"channel": "email", "variants": [{"body": id}]}}]
    })
}

/// Two journeys share one e-mail cap: the first message goes, the second is suppressed
/// with the cap as its reason, and the suppression is emitted for analytics.
async fn a_cap_is_shared_by_every_journey(backend: Backend) {
    let rig = Rig::start(backend).await;
    let s = &rig.server;
    put_policy(
        s,
        json!({"caps": [{"channel": "email", "maxMessages": 1, "window": "1d"}]}),
    )
    .await;
    s.publish(offer("spring-sale", "Sale Viewed", 10)).await;
    s.publish(offer("newsletter", "Article Read", 10)).await;
    s.deliver(vec![track("Sale Viewed", "p-1", json!({}))])
        .await;
    s.deliver(vec![track("Article Read", "p-1", json!({}))])
        .await;
    let sent = rig.receiver.wait_for(1).await;
    assert_eq!(sent[0].body["body"], "spring-sale");
    let actions = s.actions("p-1").await;
    let newsletter = actions
        .iter()
        .find(|a| a.journey_id == "newsletter")
        .unwrap();
    assert_eq!(newsletter.status, ActionStatus::Suppressed as i32);
    assert!(
        newsletter.reason.starts_with("contact cap"),
        "{}",
        newsletter.reason
    );
    let emitted = rig
        .sink
        .wait_for_event("Message Suppressed", |e| e.event == "Message Suppressed")
        .await;
    assert_eq!(emitted.profile_id, "p-1");

    s.advance(DAY).await;
    s.deliver(vec![track("Article Read", "p-2", json!({}))])
        .await;
    assert_eq!(
        rig.receiver.wait_for(2).await[1].body["profile_id"],
        "p-2",
        "the cap is per profile"
    );
}
waymark_testkit::on_both_backends!(a_cap_is_shared_by_every_journey);

/// A message at 23:00 in Berlin waits for the end of quiet hours at 08:00 local time,
/// which after the spring change is eight hours later, not nine; then it goes.
async fn quiet_hours_defer_across_a_clock_change(backend: Backend) {
    let rig = Rig::start_at(backend, SATURDAY_LATE_BERLIN).await;
    let s = &rig.server;
    put_policy(
        s,
        json!({
            "quietHours": {"start": "21:00", "end": "08:00"},
            "defaultTimeZone": "Europe/Berlin"
        }),
    )
    .await;
    s.publish(offer("late", "Browsed", 0)).await;
    s.deliver(vec![track("Browsed", "p-1", json!({}))]).await;
    let deferred = &s.actions("p-1").await[0];
    assert_eq!(deferred.status, ActionStatus::Deferred as i32);
    let due = waymark_kit::time::micros(deferred.due_at.as_ref().unwrap());
    assert_eq!(
        due,
        SATURDAY_LATE_BERLIN + 8 * 3_600_000_000,
        "08:00 CEST is 06:00 UTC"
    );

    s.advance(8 * HOUR - std::time::Duration::from_secs(60))
        .await;
    assert_eq!(
        s.actions("p-1").await[0].status,
        ActionStatus::Deferred as i32
    );
    s.advance(std::time::Duration::from_secs(60)).await;
    let sent = rig.receiver.wait_for(1).await;
    assert_eq!(sent[0].body["body"], "late");
    let e = &s.enrollments_of("p-1").await[0];
    assert_eq!(e.status, EnrollmentStatus::Completed as i32);
}
waymark_testkit::on_both_backends!(quiet_hours_defer_across_a_clock_change);
