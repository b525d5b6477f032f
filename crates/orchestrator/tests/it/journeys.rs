//! Journeys driven by events and time: keyed entries, re-entry rules, exits that interrupt
//! waits, escalations, and versions published under each in-flight policy.

use serde_json::json;
use waymark_proto::orchestration::v1::*;

use crate::support::*;

/// Two carts, two enrollments: buying one cart ends only its own, and the other is
/// reminded of with its own id.
async fn abandoned_carts_are_tracked_per_cart(backend: Backend) {
    let rig = Rig::start(backend).await;
    let s = &rig.server;
    s.publish(json!({
        "journeyId": "cart",
        "entry": {"trigger": {"event": "Cart Updated"}, "start": "wait",
                  "keyProperty": "cart_id", "reentry": "REENTRY_ALWAYS", "maxConcurrent": 5},
        "nodes": [
            {"id": "wait", "wait": {
                "branches": [{"name": "bought", "match": {"event": "Order Completed"}}],
                "timeout": "4h", "timeoutNext": "remind"}},
            {"id": "remind", "message": {"channel": "email",
                "variants": [{"body": "Your cart {{ enrollment.key }} is waiting"}]}}
        ]
    }))
    .await;
    s.deliver(vec![
        track("Cart Updated", "p-1", json!({"cart_id": "A"})),
        track("Cart Updated", "p-1", json!({"cart_id": "B"})),
        track("Cart Updated", "p-1", json!({"cart_id": "A"})),
    ])
    .await;
    let enrollments = s.enrollments_of("p-1").await;
    let mut keys: Vec<&str> = enrollments.iter().map(|e| e.key.as_str()).collect();
    keys.sort();
    assert_eq!(keys, ["A", "B"], "one enrollment per cart");

    s.deliver(vec![track(
        "Order Completed",
        "p-1",
        json!({"cart_id": "A"}),
    )])
    .await;
    let by_key =
        |key: &str, list: &[Enrollment]| list.iter().find(|e| e.key == key).cloned().unwrap();
    let after = s.enrollments_of("p-1").await;
    assert_eq!(
        by_key("A", &after).status,
        EnrollmentStatus::Completed as i32
    );
    assert_eq!(by_key("B", &after).status, EnrollmentStatus::Active as i32);

    s.advance(4 * HOUR).await;
    let reminders = rig.receiver.wait_for(1).await;
    assert_eq!(reminders[0].body["body"], "Your cart B is waiting");
    assert_eq!(
        rig.receiver.received().len(),
        1,
        "no reminder for the cart bought"
    );
}
waymark_testkit::on_both_backends!(abandoned_carts_are_tracked_per_cart);

/// Once, always (up to the cap), after exit and after a cool-down, each as promised.
async fn each_reentry_rule_holds(backend: Backend) {
    let rig = Rig::start(backend).await;
    let s = &rig.server;
    for (id, rule, extra) in [
        ("once", "REENTRY_ONCE", json!({})),
        ("always", "REENTRY_ALWAYS", json!({"maxConcurrent": 2})),
        ("after-exit", "REENTRY_AFTER_EXIT", json!({})),
        (
            "cooldown",
            "REENTRY_AFTER_COOLDOWN",
            json!({"cooldown": "1d"}),
        ),
    ] {
        let mut entry =
            json!({"trigger": {"event": format!("Ping {id}")}, "start": "hold", "reentry": rule});
        entry
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        s.publish(json!({
            "journeyId": id,
            "entry": entry,
            "nodes": [{"id": "hold", "delay": {"duration": "1h"}}]
        }))
        .await;
    }
    let ping = |id: &str| track(&format!("Ping {id}"), "p-1", json!({}));
    let count = async |journey: &str| {
        s.enrollments_of("p-1")
            .await
            .iter()
            .filter(|e| e.journey_id == journey)
            .count()
    };
    for id in ["once", "always", "after-exit", "cooldown"] {
        s.deliver(vec![ping(id), ping(id), ping(id)]).await;
    }
    assert_eq!(count("once").await, 1);
    assert_eq!(count("always").await, 2, "always, up to two at a time");
    assert_eq!(
        count("after-exit").await,
        1,
        "not while the first is active"
    );
    assert_eq!(count("cooldown").await, 1);

    s.advance(2 * HOUR).await;
    for id in ["once", "after-exit", "cooldown"] {
        s.deliver(vec![ping(id)]).await;
    }
    assert_eq!(count("once").await, 1, "once is once");
    assert_eq!(count("after-exit").await, 2, "again after the first ended");
    assert_eq!(count("cooldown").await, 1, "not within the cool-down");

    s.advance(DAY).await;
    s.deliver(vec![ping("cooldown")]).await;
    assert_eq!(count("cooldown").await, 2, "again after the cool-down");
}
waymark_testkit::on_both_backends!(each_reentry_rule_holds);

/// A journey-wide exit ends a thirty-day wait the moment its event comes.
async fn an_exit_interrupts_a_long_wait(backend: Backend) {
    let rig = Rig::start(backend).await;
    let s = &rig.server;
    s.publish(json!({
        "journeyId": "drip",
        "entry": {"trigger": {"event": "Signed Up"}, "start": "later"},
        "exits": [{"event": "Unsubscribed", "condition": "event.properties.list == \"news\""}],
        "nodes": [
            {"id": "later", "delay": {"duration": "30d", "next": "mail"}},
            {"id": "mail", "message": {"channel": "email", "variants": [{"body": "news"}]}}
        ]
    }))
    .await;
    s.deliver(vec![track("Signed Up", "p-1", json!({}))]).await;
    s.deliver(vec![track(
        "Unsubscribed",
        "p-1",
        json!({"list": "offers"}),
    )])
    .await;
    assert_eq!(
        s.enrollments_of("p-1").await[0].status,
        EnrollmentStatus::Active as i32,
        "another list"
    );
    s.deliver(vec![track("Unsubscribed", "p-1", json!({"list": "news"}))])
        .await;
    let e = &s.enrollments_of("p-1").await[0];
    assert_eq!(e.status, EnrollmentStatus::Exited as i32);
    assert_eq!(e.reason, "exit criterion: Unsubscribed");
    s.advance(31 * DAY).await;
    assert!(
        s.actions("p-1").await.is_empty(),
        "nothing sent after the exit"
    );
}
waymark_testkit::on_both_backends!(an_exit_interrupts_a_long_wait);

/// An `Emotion Changed` to upset opens a case at once (posted to the escalation
/// webhook) and holds every journey's marketing until the case is closed.
async fn an_upset_customer_is_escalated_and_not_marketed_to(backend: Backend) {
    let rig = Rig::start(backend).await;
    let s = &rig.server;
    s.publish(json!({
        "journeyId": "upset",
        "priority": 90,
        "entry": {"trigger": {"event": "Emotion Changed", "condition": "event.properties.label == \"upset\""},
                  "start": "human", "reentry": "REENTRY_AFTER_EXIT"},
        "nodes": [{"id": "human", "escalate": {"priority": "high", "reason": "upset after {{ event.properties.signal_kind }}"}}]
    }))
    .await;
    s.publish(json!({
        "journeyId": "promo",
        "entry": {"trigger": {"event": "Page Viewed"}, "start": "offer", "reentry": "REENTRY_ALWAYS"},
        "nodes": [{"id": "offer", "message": {"channel": "email", "variants": [{"body": "20% off"}]}}]
    }))
    .await;
    s.deliver(vec![track(
        "Emotion Changed",
        "p-1",
        json!({"label": "upset", "signal_kind": "support_ticket"}),
    )])
    .await;
    let case = rig.receiver.wait_for(1).await;
    assert!(case[0].path.ends_with("/cases"), "{}", case[0].path);
    assert_eq!(case[0].body["priority"], "high");
    assert_eq!(case[0].body["reason"], "upset after support_ticket");

    s.deliver(vec![track("Page Viewed", "p-1", json!({}))])
        .await;
    let held = s.actions("p-1").await;
    let offer = held.iter().find(|a| a.node_id == "offer").unwrap();
    assert_eq!(offer.status, ActionStatus::Suppressed as i32);
    assert_eq!(offer.reason, "an escalation is open");

    let mut client = s.client().await;
    let cases = client
        .list_cases(admin(ListCasesRequest {
            open_only: true,
            ..ListCasesRequest::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .cases;
    assert_eq!(cases.len(), 1);
    client
        .close_case(admin(CloseCaseRequest {
            case_id: cases[0].case_id.clone(),
            resolution: "called back".into(),
        }))
        .await
        .unwrap();
    s.deliver(vec![track("Page Viewed", "p-1", json!({}))])
        .await;
    let sent = rig.receiver.wait_for(2).await;
    assert_eq!(sent[1].body["body"], "20% off");
}
waymark_testkit::on_both_backends!(an_upset_customer_is_escalated_and_not_marketed_to);

/// A promoter (NPS 9-10) is asked for a review; a passive is not.
async fn promoters_are_asked_for_a_review(backend: Backend) {
    let rig = Rig::start(backend).await;
    let s = &rig.server;
    s.publish(json!({
        "journeyId": "nps-review",
        "entry": {"trigger": {"event": "NPS Submitted", "condition": "event.properties.score >= 9"}, "start": "ask"},
        "nodes": [{"id": "ask", "message": {"channel": "email",
            "variants": [{"subject": "Would you review us?", "body": "You gave us {{ event.properties.score }}"}]}}]
    }))
    .await;
    s.deliver(vec![
        track("NPS Submitted", "p-promoter", json!({"score": 10})),
        track("NPS Submitted", "p-passive", json!({"score": 7})),
    ])
    .await;
    let asked = rig.receiver.wait_for(1).await;
    assert_eq!(asked[0].body["profile_id"], "p-promoter");
    assert_eq!(asked[0].body["body"], "You gave us 10");
    assert!(s.enrollments_of("p-passive").await.is_empty());
}
waymark_testkit::on_both_backends!(promoters_are_asked_for_a_review);

/// Publishing a new version: enrollments in flight stay on theirs, move to the new one at
/// the same node, or exit, as the publisher chose.
async fn a_new_version_treats_enrollments_in_flight_as_chosen(backend: Backend) {
    let rig = Rig::start(backend).await;
    let s = &rig.server;
    let version = |text: &str| {
        json!({
            "journeyId": "v",
            "entry": {"trigger": {"event": "Signed Up"}, "start": "wait", "reentry": "REENTRY_ALWAYS", "maxConcurrent": 3},
            "nodes": [
                {"id": "wait", "delay": {"duration": "1d", "next": "say"}},
                {"id": "say", "message": {"channel": "email", "variants": [{"body": text}]}}
            ]
        })
    };
    let mut client = s.client().await;
    let mut publish = async |text: &str, in_flight: InFlightPolicy| {
        let definition = waymark_proto::proto_json::from_json(&version(text)).unwrap();
        client
            .put_journey(admin(PutJourneyRequest {
                journey: Some(definition),
            }))
            .await
            .unwrap();
        client
            .publish_journey(admin(PublishJourneyRequest {
                journey_id: "v".into(),
                in_flight: in_flight as i32,
                node_map: Default::default(),
            }))
            .await
            .unwrap()
            .into_inner()
    };
    let receiver = &rig.receiver;
    let said = async |n: usize| {
        receiver
            .wait_for(n)
            .await
            .iter()
            .map(|r| {
                format!(
                    "{}:{}",
                    r.body["profile_id"].as_str().unwrap(),
                    r.body["body"].as_str().unwrap()
                )
            })
            .collect::<Vec<_>>()
    };
    publish("one", InFlightPolicy::Stay).await;
    s.deliver(vec![track("Signed Up", "p-a", json!({}))]).await;
    let two = publish("two", InFlightPolicy::Stay).await;
    assert_eq!((two.version, two.moved, two.exited), (2, 0, 0));
    s.deliver(vec![track("Signed Up", "p-b", json!({}))]).await;
    s.advance(DAY).await;
    let mut heard = said(2).await;
    heard.sort();
    assert_eq!(
        heard,
        ["p-a:one", "p-b:two"],
        "each stayed on the version it entered"
    );

    s.deliver(vec![track("Signed Up", "p-c", json!({}))]).await;
    let three = publish("three", InFlightPolicy::Migrate).await;
    assert_eq!((three.version, three.moved, three.exited), (3, 1, 0));
    s.advance(DAY).await;
    assert_eq!(
        said(3).await[2],
        "p-c:three",
        "moved to the new version at its node"
    );
    let moved = &s.enrollments_of("p-c").await[0];
    assert_eq!(moved.version, 3);
    assert!(
        s.path(&moved.enrollment_id)
            .await
            .iter()
            .any(|p| p == "wait:moved:version 3")
    );

    s.deliver(vec![track("Signed Up", "p-d", json!({}))]).await;
    let four = publish("four", InFlightPolicy::Exit).await;
    assert_eq!((four.version, four.exited), (4, 1));
    s.advance(DAY).await;
    assert_eq!(
        rig.receiver.received().len(),
        3,
        "the enrollment that exited said nothing"
    );
    assert_eq!(
        s.enrollments_of("p-d").await[0].reason,
        "version 4 published"
    );
}
waymark_testkit::on_both_backends!(a_new_version_treats_enrollments_in_flight_as_chosen);
