//! What happens to enrollments around them: a journey paused, resumed and archived, an
//! enrollment ended by hand, profiles merged and erased, keyed waits, and the step events
//! analytics reads.

use serde_json::json;
use tonic::Code;
use waymark_proto::orchestration::v1::*;

use crate::support::*;

/// One hour, then a message; unsubscribing ends it.
fn reminder(id: &str, trigger: &str) -> serde_json::Value {
    json!({
        "journeyId": id,
        "entry": {"trigger": {"event": trigger}, "start": "later"},
        "exits": [{"event": "Unsubscribed"}],
        "nodes": [
            {"id": "later", "delay": {"duration": "1h", "next": "mail"}},
            {"id": "mail", "message": {"channel": "email", "variants": [{"body": id}]}}
        ]
    })
}

/// A journey that says `marker` at once: sent after what must not be sent, it is the
/// first message the receiver sees when nothing else went.
fn marker() -> serde_json::Value {
    json!({
        "journeyId": "marker",
        "entry": {"trigger": {"event": "Marker"}, "start": "say", "reentry": "REENTRY_ALWAYS"},
        "nodes": [{"id": "say", "message": {"channel": "email", "variants": [{"body": "marker"}]}}]
    })
}

/// While paused, a journey enrolls nobody, its due waits hold and events do not move its
/// enrollments on, but its exit criteria still end them; resumed, the held waits fire.
async fn a_paused_journey_holds_its_waits_until_resumed(backend: Backend) {
    let rig = Rig::start(backend).await;
    let s = &rig.server;
    s.publish(json!({
        "journeyId": "first-order",
        "entry": {"trigger": {"event": "Trial Started"}, "start": "order"},
        "exits": [{"event": "Unsubscribed"}],
        "nodes": [
            {"id": "order", "wait": {
                "branches": [{"name": "bought", "match": {"event": "Order Completed"}, "next": "thanks"}],
                "timeout": "1h", "timeoutNext": "nudge"}},
            {"id": "thanks", "message": {"channel": "email", "variants": [{"body": "thanks"}]}},
            {"id": "nudge", "message": {"channel": "email", "variants": [{"body": "nudge"}]}}
        ]
    }))
    .await;
    s.publish(marker()).await;
    s.deliver(vec![
        track("Trial Started", "p-held", json!({})),
        track("Trial Started", "p-buying", json!({})),
        track("Trial Started", "p-leaving", json!({})),
    ])
    .await;
    let mut client = s.client().await;
    let paused = client
        .pause_journey(admin(PauseJourneyRequest {
            journey_id: "first-order".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(paused.journey.unwrap().status, JourneyStatus::Paused as i32);

    s.deliver(vec![track("Trial Started", "p-late", json!({}))])
        .await;
    assert!(
        s.enrollments_of("p-late").await.is_empty(),
        "a paused journey enrolls nobody"
    );
    s.deliver(vec![track("Order Completed", "p-buying", json!({}))])
        .await;
    let buying = &s.enrollments_of("p-buying").await[0];
    assert_eq!(buying.status, EnrollmentStatus::Active as i32);
    assert_eq!(buying.node_id, "order", "held where it was");
    s.clock.advance(2 * HOUR);
    assert_eq!(s.core.fire_due().await.unwrap(), 0, "due, but paused");
    s.deliver(vec![track("Unsubscribed", "p-leaving", json!({}))])
        .await;
    let leaving = &s.enrollments_of("p-leaving").await[0];
    assert_eq!(leaving.status, EnrollmentStatus::Exited as i32);
    assert_eq!(leaving.reason, "exit criterion: Unsubscribed");
    s.deliver(vec![track("Marker", "p-marker", json!({}))])
        .await;
    assert_eq!(
        rig.receiver.wait_for(1).await[0].body["body"],
        "marker",
        "nothing was sent while paused"
    );

    client
        .resume_journey(admin(ResumeJourneyRequest {
            journey_id: "first-order".into(),
        }))
        .await
        .unwrap();
    s.core.fire_due().await.unwrap();
    let sent = rig.receiver.wait_for(3).await;
    let mut nudged: Vec<String> = sent[1..]
        .iter()
        .map(|r| format!("{}:{}", r.body["profile_id"], r.body["body"]))
        .collect();
    nudged.sort();
    assert_eq!(nudged, [r#""p-buying":"nudge""#, r#""p-held":"nudge""#]);
    assert_eq!(
        rig.receiver.received().len(),
        3,
        "the exited enrollment said nothing"
    );
}
waymark_testkit::on_both_backends!(a_paused_journey_holds_its_waits_until_resumed);

/// Archiving ends every active enrollment (reason `archived`) and freezes the journey:
/// its draft can no longer be replaced.
async fn archiving_ends_enrollments_and_freezes_the_journey(backend: Backend) {
    let rig = Rig::start(backend).await;
    let s = &rig.server;
    s.publish(reminder("remind", "Trial Started")).await;
    s.deliver(vec![
        track("Trial Started", "p-1", json!({})),
        track("Trial Started", "p-2", json!({})),
    ])
    .await;
    let mut client = s.client().await;
    let archived = client
        .archive_journey(admin(ArchiveJourneyRequest {
            journey_id: "remind".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(archived.exited, 2);
    assert_eq!(
        archived.journey.unwrap().status,
        JourneyStatus::Archived as i32
    );
    for p in ["p-1", "p-2"] {
        let e = &s.enrollments_of(p).await[0];
        assert_eq!(e.status, EnrollmentStatus::Exited as i32, "{p}");
        assert_eq!(e.reason, "archived", "{p}");
    }
    s.advance(2 * HOUR).await;
    assert!(
        s.actions("").await.is_empty(),
        "nothing sent after archiving"
    );
    s.deliver(vec![track("Trial Started", "p-3", json!({}))])
        .await;
    assert!(s.enrollments_of("p-3").await.is_empty());

    let again = client
        .put_journey(admin(PutJourneyRequest {
            journey: Some(
                waymark_proto::proto_json::from_json(&reminder("remind", "Trial Started")).unwrap(),
            ),
        }))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition, "{again:?}");
}
waymark_testkit::on_both_backends!(archiving_ends_enrollments_and_freezes_the_journey);

/// An operator ends an enrollment with a reason; ending it again is refused.
async fn an_enrollment_is_ended_by_hand_once(backend: Backend) {
    let rig = Rig::start(backend).await;
    let s = &rig.server;
    s.publish(reminder("remind", "Trial Started")).await;
    s.deliver(vec![track("Trial Started", "p-1", json!({}))])
        .await;
    let id = s.enrollments_of("p-1").await[0].enrollment_id.clone();
    let mut client = s.client().await;
    let ended = client
        .exit_enrollment(admin(ExitEnrollmentRequest {
            enrollment_id: id.clone(),
            reason: "asked support to stop".into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .enrollment
        .unwrap();
    assert_eq!(ended.status, EnrollmentStatus::Exited as i32);
    assert_eq!(ended.reason, "asked support to stop");
    let stored = &s.enrollments_of("p-1").await[0];
    assert_eq!(stored.status, EnrollmentStatus::Exited as i32);
    assert_eq!(stored.reason, "asked support to stop");
    assert_eq!(
        s.path(&id).await.last().unwrap(),
        "later:exited:asked support to stop"
    );

    let twice = client
        .exit_enrollment(admin(ExitEnrollmentRequest {
            enrollment_id: id,
            reason: "again".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(twice.code(), Code::FailedPrecondition);
    let unknown = client
        .exit_enrollment(admin(ExitEnrollmentRequest {
            enrollment_id: "nope".into(),
            reason: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    s.advance(2 * HOUR).await;
    assert!(
        s.actions("p-1").await.is_empty(),
        "nothing sent after the exit"
    );
}
waymark_testkit::on_both_backends!(an_enrollment_is_ended_by_hand_once);

/// A merge moves the merged profile's wait to the survivor, whose purchase then resumes
/// it; an erasure removes the erased profiles' enrollments and actions.
async fn merges_move_enrollments_and_erasures_remove_them(backend: Backend) {
    let rig = Rig::start(backend).await;
    let s = &rig.server;
    s.publish(json!({
        "journeyId": "first-order",
        "entry": {"trigger": {"event": "Trial Started"}, "start": "hello"},
        "nodes": [
            {"id": "hello", "message": {"channel": "email", "variants": [{"body": "welcome"}], "next": "order"}},
            {"id": "order", "wait": {
                "branches": [{"name": "bought", "match": {"event": "Order Completed"}, "next": "thanks"}],
                "timeout": "7d"}},
            {"id": "thanks", "message": {"channel": "email", "variants": [{"body": "thanks"}]}}
        ]
    }))
    .await;
    s.deliver(vec![
        track("Trial Started", "p-anonymous", json!({})),
        track("Trial Started", "p-erased", json!({})),
        track("Trial Started", "p-live", json!({})),
    ])
    .await;
    rig.receiver.wait_for(3).await;

    // As the profile service tells it: on the survivor, naming both.
    s.deliver(vec![track(
        "Profile Merged",
        "p-known",
        json!({"merged_profile_id": "p-anonymous", "survivor_profile_id": "p-known", "merge_id": "m-1"}),
    )])
    .await;
    assert!(s.enrollments_of("p-anonymous").await.is_empty());
    let moved = &s.enrollments_of("p-known").await[0];
    assert_eq!(moved.status, EnrollmentStatus::Active as i32);
    assert_eq!(moved.node_id, "order");
    s.deliver(vec![track("Order Completed", "p-known", json!({}))])
        .await;
    let thanked = rig.receiver.wait_for(4).await;
    assert_eq!(thanked[3].body["profile_id"], "p-known");
    assert_eq!(thanked[3].body["body"], "thanks");
    assert_eq!(
        s.enrollments_of("p-known").await[0].status,
        EnrollmentStatus::Completed as i32
    );
    assert!(
        s.path(&moved.enrollment_id)
            .await
            .contains(&"order:resumed:bought".to_owned())
    );

    s.deliver(vec![track(
        "Profile Deleted",
        "p-live",
        json!({"erased_profile_ids": ["p-erased"]}),
    )])
    .await;
    for p in ["p-erased", "p-live"] {
        assert!(s.enrollments_of(p).await.is_empty(), "{p}'s enrollments");
        assert!(s.actions(p).await.is_empty(), "{p}'s actions");
    }
    s.advance(8 * DAY).await;
    assert_eq!(
        rig.receiver.received().len(),
        4,
        "nothing more for the erased profiles"
    );
    assert_eq!(s.actions("p-known").await.len(), 2, "the survivor's stay");
}
waymark_testkit::on_both_backends!(merges_move_enrollments_and_erasures_remove_them);

/// A keyed wait's branch with `sameKey: false` takes another cart's order; a keyed entry
/// whose event lacks the key enrolls nobody.
async fn a_wait_may_accept_any_key(backend: Backend) {
    let rig = Rig::start(backend).await;
    let s = &rig.server;
    s.publish(json!({
        "journeyId": "cart",
        "entry": {"trigger": {"event": "Cart Updated"}, "start": "wait", "keyProperty": "cart_id"},
        "nodes": [
            {"id": "wait", "wait": {
                "branches": [{"name": "any order", "match": {"event": "Order Completed"}, "sameKey": false}],
                "timeout": "4h", "timeoutNext": "remind"}},
            {"id": "remind", "message": {"channel": "email", "variants": [{"body": "cart {{ enrollment.key }}"}]}}
        ]
    }))
    .await;
    s.deliver(vec![
        track("Cart Updated", "p-1", json!({"cart_id": "A"})),
        track("Cart Updated", "p-2", json!({"items": 3})),
    ])
    .await;
    assert!(
        s.enrollments_of("p-2").await.is_empty(),
        "no key, no enrollment"
    );
    s.deliver(vec![track(
        "Order Completed",
        "p-1",
        json!({"cart_id": "B"}),
    )])
    .await;
    let e = &s.enrollments_of("p-1").await[0];
    assert_eq!(e.key, "A");
    assert_eq!(e.status, EnrollmentStatus::Completed as i32);
    assert!(
        s.path(&e.enrollment_id)
            .await
            .contains(&"wait:resumed:any order".to_owned())
    );
    s.advance(4 * HOUR).await;
    assert!(s.actions("p-1").await.is_empty(), "no reminder");
}
waymark_testkit::on_both_backends!(a_wait_may_accept_any_key);

/// Entering, each step, reaching the goal and exiting are told to analytics as events
/// on the profile, with the journey, enrollment and node.
async fn steps_are_told_to_analytics(backend: Backend) {
    let rig = Rig::start(backend).await;
    let s = &rig.server;
    s.publish(json!({
        "journeyId": "trial",
        "entry": {"trigger": {"event": "Trial Started"}, "start": "later"},
        "goal": {"event": "Subscribed"},
        "exits": [{"event": "Unsubscribed"}],
        "nodes": [{"id": "later", "delay": {"duration": "3d"}}]
    }))
    .await;
    s.deliver(vec![
        track("Trial Started", "p-buyer", json!({})),
        track("Trial Started", "p-leaver", json!({})),
    ])
    .await;
    s.deliver(vec![
        track("Subscribed", "p-buyer", json!({})),
        track("Unsubscribed", "p-leaver", json!({})),
    ])
    .await;
    let buyer = s.enrollments_of("p-buyer").await[0].clone();
    assert_eq!(buyer.status, EnrollmentStatus::Converted as i32);
    let leaver = s.enrollments_of("p-leaver").await[0].clone();

    let string = |e: &waymark_proto::common::v1::Event, key: &str| {
        waymark_proto::json::string_at(e.properties.as_ref().unwrap(), &[key])
            .unwrap_or_default()
            .to_owned()
    };
    for (name, profile, enrollment, node) in [
        ("Journey Entered", "p-buyer", &buyer, "later"),
        ("Journey Step", "p-buyer", &buyer, "later"),
        ("Journey Goal Reached", "p-buyer", &buyer, "later"),
        ("Journey Entered", "p-leaver", &leaver, "later"),
        ("Journey Exited", "p-leaver", &leaver, "later"),
    ] {
        let e = rig
            .sink
            .wait_for_event(&format!("{name} of {profile}"), |e| {
                e.event == name && e.profile_id == profile
            })
            .await;
        assert_eq!(e.user_id, format!("user-{profile}"));
        assert_eq!(e.source_id, "orchestrator");
        assert_eq!(string(&e, "journey_id"), "trial", "{name}");
        assert_eq!(string(&e, "enrollment_id"), enrollment.enrollment_id);
        assert_eq!(string(&e, "node_id"), node, "{name}");
        let version = &e.properties.as_ref().unwrap().fields["version"];
        assert_eq!(
            waymark_proto::json::value_to_json(version).as_f64(),
            Some(1.0)
        );
    }
    let exited = rig
        .sink
        .wait_for_event("the exit", |e| e.event == "Journey Exited")
        .await;
    assert_eq!(string(&exited, "outcome"), "exited");
    assert_eq!(string(&exited, "decision"), "exit criterion: Unsubscribed");
    let goal = rig
        .sink
        .wait_for_event("the goal", |e| e.event == "Journey Goal Reached")
        .await;
    assert_eq!(string(&goal, "decision"), "goal: Subscribed");
}
waymark_testkit::on_both_backends!(steps_are_told_to_analytics);

/// A random split's arm step carries the split's weights, the order of its arms and the
/// holdout percentage, in the enrollment's steps and in the event analytics receives, so
/// analytics knows the shares to expect.
async fn an_arm_step_carries_the_split_weights(backend: Backend) {
    let rig = Rig::start(backend).await;
    let s = &rig.server;
    s.publish(json!({
        "journeyId": "offer",
        "entry": {"trigger": {"event": "Signed Up"}, "start": "split"},
        "nodes": [
            {"id": "split", "randomSplit": {"holdoutPercent": 10, "arms": [
                {"name": "treatment", "weight": 3, "next": "hello"},
                {"name": "control", "weight": 1, "next": "hello"}]}},
            {"id": "hello", "message": {"channel": "email", "variants": [{"body": "hi"}]}}
        ]
    }))
    .await;
    s.deliver(vec![track("Signed Up", "p-1", json!({}))]).await;
    let enrollment = s.enrollments_of("p-1").await[0].clone();
    let steps = s
        .client()
        .await
        .get_enrollment(admin(GetEnrollmentRequest {
            enrollment_id: enrollment.enrollment_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner()
        .steps;
    let arm = steps
        .iter()
        .find(|step| step.outcome == "arm")
        .expect("an arm step");
    let recorded = serde_json::Value::Object(waymark_proto::json::struct_to_json(
        arm.detail.as_ref().unwrap(),
    ));
    let sent = rig
        .sink
        .wait_for_event("the arm step", |e| {
            e.properties
                .as_ref()
                .and_then(|p| waymark_proto::json::string_at(p, &["outcome"]))
                == Some("arm")
        })
        .await;
    let sent = waymark_proto::json::struct_to_json(sent.properties.as_ref().unwrap());
    for (detail, place) in [(&recorded, "the step"), (&sent["detail"], "the event")] {
        let number = |path: &[&str]| {
            path.iter()
                .try_fold(detail, |v, key| v.get(*key))
                .and_then(serde_json::Value::as_f64)
        };
        assert_eq!(number(&["weights", "treatment"]), Some(3.0), "{place}");
        assert_eq!(number(&["weights", "control"]), Some(1.0), "{place}");
        assert_eq!(number(&["holdout_percent"]), Some(10.0), "{place}");
        assert_eq!(detail["arms"], json!(["treatment", "control"]), "{place}");
    }
}
waymark_testkit::on_both_backends!(an_arm_step_carries_the_split_weights);

/// A held-out profile receives nothing but stays for the holdout window, so the goal
/// converts it as it would an arm's, and the window's end completes it.
async fn a_holdout_waits_for_the_goal_without_being_contacted(backend: Backend) {
    let rig = Rig::start(backend).await;
    let s = &rig.server;
    s.publish(json!({
        "journeyId": "held",
        "entry": {"trigger": {"event": "Signed Up"}, "start": "split"},
        "goal": {"event": "Order Completed"},
        "nodes": [
            {"id": "split", "randomSplit": {"holdoutPercent": 100, "holdoutWindow": "7d",
                "arms": [{"name": "treatment", "weight": 1, "next": "hello"}]}},
            {"id": "hello", "message": {"channel": "email", "variants": [{"body": "hi"}]}}
        ]
    }))
    .await;
    s.deliver(vec![
        track("Signed Up", "buyer", json!({})),
        track("Signed Up", "idle", json!({})),
    ])
    .await;
    let buyer = s.enrollments_of("buyer").await[0].clone();
    assert_eq!(buyer.status(), EnrollmentStatus::Active);
    s.advance(DAY).await;
    s.deliver(vec![track("Order Completed", "buyer", json!({}))])
        .await;
    let buyer = s.enrollments_of("buyer").await[0].clone();
    assert_eq!(buyer.status(), EnrollmentStatus::Converted);
    assert_eq!(
        s.path(&buyer.enrollment_id).await,
        vec![
            "split:entered:Signed Up",
            "split:arm:holdout",
            "split:goal:goal: Order Completed"
        ]
    );
    s.advance(7 * DAY).await;
    let idle = s.enrollments_of("idle").await[0].clone();
    assert_eq!(
        (idle.status(), idle.reason.as_str()),
        (EnrollmentStatus::Completed, "holdout")
    );
    assert!(s.actions("buyer").await.is_empty());
    assert!(s.actions("idle").await.is_empty());
}
waymark_testkit::on_both_backends!(a_holdout_waits_for_the_goal_without_being_contacted);

/// Two profiles waiting in the same journey become one customer: the enrollment that
/// entered first goes on, the other exits, and the customer is thanked once.
async fn a_merge_leaves_one_enrollment_per_journey(backend: Backend) {
    let rig = Rig::start(backend).await;
    let s = &rig.server;
    s.publish(json!({
        "journeyId": "first-order",
        "entry": {"trigger": {"event": "Trial Started"}, "start": "order"},
        "nodes": [
            {"id": "order", "wait": {
                "branches": [{"name": "bought", "match": {"event": "Order Completed"}, "next": "thanks"}],
                "timeout": "7d"}},
            {"id": "thanks", "message": {"channel": "email", "variants": [{"body": "thanks"}]}}
        ]
    }))
    .await;
    s.deliver(vec![track("Trial Started", "p-known", json!({}))])
        .await;
    s.advance(HOUR).await;
    s.deliver(vec![track("Trial Started", "p-anonymous", json!({}))])
        .await;
    s.deliver(vec![
        track(
            "Profile Merged",
            "p-known",
            json!({"merged_profile_id": "p-anonymous", "survivor_profile_id": "p-known", "merge_id": "m-1"}),
        ),
        track("Order Completed", "p-known", json!({})),
    ])
    .await;
    let list = s.enrollments_of("p-known").await;
    assert_eq!(list.len(), 2);
    let newer = list
        .iter()
        .find(|e| e.status == EnrollmentStatus::Exited as i32)
        .unwrap();
    assert_eq!(
        newer.reason,
        "merged into another enrollment of the same customer"
    );
    let older = list
        .iter()
        .find(|e| e.status == EnrollmentStatus::Completed as i32)
        .unwrap();
    let at = |e: &Enrollment| waymark_kit::time::micros(e.entered_at.as_ref().unwrap());
    assert!(at(older) < at(newer), "the first to enter goes on");
    rig.receiver.wait_for(1).await;
    s.deliver(vec![track("Trial Started", "p-marker", json!({}))])
        .await;
    s.deliver(vec![track("Order Completed", "p-marker", json!({}))])
        .await;
    assert_eq!(
        rig.receiver.wait_for(2).await.len(),
        2,
        "thanked once, then the marker"
    );
    assert_eq!(rig.receiver.received().len(), 2);
}
waymark_testkit::on_both_backends!(a_merge_leaves_one_enrollment_per_journey);
