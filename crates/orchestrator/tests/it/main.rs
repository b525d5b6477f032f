//! Integration tests of the orchestrator through its public gRPC API, on PostgreSQL and
//! SQLite, with a real webhook receiver and a real EventSink for step events.

mod api;
mod durability;
mod journeys;
mod lifecycle;
mod policy;
mod profiles;
mod support;

use serde_json::json;
use support::*;

/// Sign-up, then two days or the first purchase, whichever comes first, then a message:
/// the purchaser is thanked at once, the other is nudged when two days have passed.
async fn welcome_waits_for_a_purchase_or_two_days(backend: Backend) {
    let rig = Rig::start(backend).await;
    let s = &rig.server;
    s.publish(json!({
        "journeyId": "welcome",
        "name": "Welcome",
        "entry": {"trigger": {"event": "Signed Up"}, "start": "first_order"},
        "nodes": [
            {"id": "first_order", "wait": {
                "branches": [{"name": "bought", "match": {"event": "Order Completed"}, "next": "thanks"}],
                "timeout": "2d", "timeoutNext": "nudge"}},
            {"id": "thanks", "message": {"channel": "email",
                "variants": [{"subject": "Thanks", "body": "Thank you for your order of {{ event.properties.total }}"}]}},
            {"id": "nudge", "message": {"channel": "email",
                "variants": [{"subject": "Welcome", "body": "Have a look around"}]}}
        ]
    }))
    .await;

    s.deliver(vec![
        track("Signed Up", "p-buyer", json!({})),
        track("Signed Up", "p-browser", json!({})),
    ])
    .await;
    s.deliver(vec![track(
        "Order Completed",
        "p-buyer",
        json!({"total": 42}),
    )])
    .await;
    let thanked = rig.receiver.wait_for(1).await;
    assert_eq!(thanked[0].body["profile_id"], "p-buyer");
    assert_eq!(thanked[0].body["body"], "Thank you for your order of 42");

    s.advance(DAY).await;
    assert!(
        s.actions("p-browser").await.is_empty(),
        "one day is not two"
    );
    s.advance(DAY).await;
    let both = rig.receiver.wait_for(2).await;
    assert_eq!(both[1].body["profile_id"], "p-browser");
    assert_eq!(both[1].body["subject"], "Welcome");

    let browser = &s.enrollments_of("p-browser").await[0];
    assert_eq!(
        s.path(&browser.enrollment_id).await,
        [
            "first_order:entered:Signed Up",
            "first_order:waiting:events",
            "first_order:timeout:timeout",
            &format!("nudge:sent:{}:nudge:3", browser.enrollment_id),
            "nudge:completed:completed",
        ]
    );
    let steps = rig
        .sink
        .wait_for_event("the nudge's step event", |e| {
            e.event == "Journey Exited" && e.profile_id == "p-browser"
        })
        .await;
    assert_eq!(steps.user_id, "user-p-browser");
}
waymark_testkit::on_both_backends!(welcome_waits_for_a_purchase_or_two_days);
