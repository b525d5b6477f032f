//! Promises under faults: timers survive a restart, a redelivered event acts once, and a
//! replica that dies between claiming, sending and recording an action never makes the
//! receiver see one step twice.

use serde_json::json;
use waymark_orchestrator::store;
use waymark_proto::orchestration::v1::*;

use crate::support::*;

fn reminder() -> serde_json::Value {
    json!({
        "journeyId": "remind",
        "entry": {"trigger": {"event": "Trial Started"}, "start": "later"},
        "nodes": [
            {"id": "later", "delay": {"duration": "1d", "next": "mail"}},
            {"id": "mail", "message": {"channel": "email", "variants": [{"body": "trial ends soon"}]}}
        ]
    })
}

/// A wait set before a restart fires after it, once.
async fn timers_survive_a_restart(backend: Backend) {
    let rig = Rig::start(backend).await;
    rig.server.publish(reminder()).await;
    rig.server
        .deliver(vec![track("Trial Started", "p-1", json!({}))])
        .await;
    let Rig {
        server,
        receiver,
        sink: _sink,
        db,
    } = rig;
    let clock = server.clock.clone();
    server.stop().await;

    clock.advance(DAY);
    let again = TestOrchestrator::start(
        config(&db.url, &receiver.url(), "http://127.0.0.1:9"),
        clock,
    )
    .await;
    again.core.fire_due().await.unwrap();
    assert_eq!(
        receiver.wait_for(1).await[0].body["body"],
        "trial ends soon"
    );
    assert_eq!(again.core.fire_due().await.unwrap(), 0, "fired once");
    again.stop().await;
    assert_eq!(receiver.received().len(), 1);
}
waymark_testkit::on_both_backends!(timers_survive_a_restart);

/// The same event delivered twice (a relay retry) enrolls once and sends once.
async fn a_redelivered_event_acts_once(backend: Backend) {
    let rig = Rig::start(backend).await;
    let s = &rig.server;
    s.publish(json!({
        "journeyId": "hello",
        "entry": {"trigger": {"event": "Signed Up"}, "start": "hi", "reentry": "REENTRY_ALWAYS", "maxConcurrent": 5},
        "nodes": [{"id": "hi", "message": {"channel": "email", "variants": [{"body": "hi"}]}}]
    }))
    .await;
    let event = track("Signed Up", "p-1", json!({}));
    let first = s.deliver(vec![event.clone()]).await;
    let second = s.deliver(vec![event.clone(), event]).await;
    assert_eq!((first.applied, first.duplicates), (1, 0));
    assert_eq!((second.applied, second.duplicates), (0, 2));
    assert_eq!(s.enrollments_of("p-1").await.len(), 1);
    rig.receiver.wait_for(1).await;
    // A marker behind it: anything sent twice would have arrived before the marker's.
    s.deliver(vec![track("Signed Up", "p-marker", json!({}))])
        .await;
    rig.receiver.wait_for(2).await;
    assert_eq!(rig.receiver.received().len(), 2);
}
waymark_testkit::on_both_backends!(a_redelivered_event_acts_once);

/// A replica claims the due timer and dies: the timer is held until the lease ends, then
/// another fires it, once.
async fn a_timer_claimed_by_a_dead_replica_fires_once_after_its_lease(backend: Backend) {
    let rig = Rig::start(backend).await;
    let s = &rig.server;
    s.publish(reminder()).await;
    s.deliver(vec![track("Trial Started", "p-1", json!({}))])
        .await;
    // The dead replica claims it as due a day from now, before this one's clock gets
    // there (its own timer loop would otherwise fire it first).
    let dead = rig.store().await;
    let due = s.clock.now_us() + 86_400_000_000;
    let claimed = store::claim_due(&dead, due, 30_000_000, 10).await.unwrap();
    assert_eq!(claimed.len(), 1, "the dead replica took it");
    s.clock.advance(DAY);
    assert_eq!(s.core.fire_due().await.unwrap(), 0, "held by the lease");
    s.advance(std::time::Duration::from_secs(31)).await;
    assert_eq!(rig.receiver.wait_for(1).await.len(), 1);
    s.advance(DAY).await;
    assert_eq!(rig.receiver.received().len(), 1);
}
waymark_testkit::on_both_backends!(a_timer_claimed_by_a_dead_replica_fires_once_after_its_lease);

/// An action whose attempt failed, and one whose reply was lost to the sender's timeout
/// after the receiver acted, are sent again with the same `webhook-id`: a receiver that
/// dedupes by it counts each step once.
async fn a_resent_action_keeps_its_idempotency_key(backend: Backend) {
    let db = TestDb::new(backend).await;
    let receiver = WebhookReceiver::start(WEBHOOK_SECRET).await;
    let mut config = config(&db.url, &receiver.url(), "http://127.0.0.1:9");
    config.webhook_timeout_secs = 1;
    let s = TestOrchestrator::start(config, waymark_orchestrator::Clock::manual(START_US)).await;
    s.publish(json!({
        "journeyId": "hook",
        "entry": {"trigger": {"event": "Signed Up"}, "start": "call"},
        "nodes": [{"id": "call", "webhook": {"url": format!("{}/hook", receiver.url())}}]
    }))
    .await;

    receiver.fail_next(1);
    s.deliver(vec![track("Signed Up", "p-failed", json!({}))])
        .await;
    // The sender records the failure and schedules the retry from its clock's now, so the
    // clock moves only once that is recorded.
    eventually("the failed attempt to be recorded", PATIENCE, async || {
        let recorded = s
            .actions("p-failed")
            .await
            .first()
            .is_some_and(|a| !a.reason.is_empty());
        (receiver.attempts().len() == 1 && recorded).then_some(())
    })
    .await;
    // Its retry falls due after the backoff, on the manual clock.
    s.clock.advance(std::time::Duration::from_secs(600));
    let delivered = receiver.wait_for(1).await;
    assert_eq!(
        delivered[0].id,
        receiver.attempts()[0].id,
        "the retry carries the same id"
    );

    // The receiver acts, but answers after the sender gave up (1 s): the reply is lost.
    receiver.delay_next(1, std::time::Duration::from_secs(2));
    s.deliver(vec![track("Signed Up", "p-lost-reply", json!({}))])
        .await;
    eventually("the attempt whose reply is lost", PATIENCE, async || {
        receiver.received().len() == 2
    })
    .await;
    let lost = s.actions("p-lost-reply").await;
    eventually("the sender to count the timeout", PATIENCE, async || {
        let actions = s.actions("p-lost-reply").await;
        actions
            .first()
            .is_some_and(|a| !a.reason.is_empty())
            .then_some(())
    })
    .await;
    s.clock.advance(std::time::Duration::from_secs(600));
    eventually("the resend", PATIENCE, async || {
        receiver.received().len() == 3
    })
    .await;
    let id = &lost[0].action_id;
    assert_eq!(receiver.count_of(id), 2, "sent twice, under one key");
    assert_eq!(receiver.unique_ids(), 2, "two steps, two keys");
    assert_eq!(receiver.invalid_signatures(), 0);
    for profile in ["p-failed", "p-lost-reply"] {
        eventually(
            &format!("{profile} to go on once delivered"),
            PATIENCE,
            async || {
                s.enrollments_of(profile).await[0].status == EnrollmentStatus::Completed as i32
            },
        )
        .await;
    }
}
waymark_testkit::on_both_backends!(a_resent_action_keeps_its_idempotency_key);

/// Two replicas fire the same due waits at once: each fires exactly once.
async fn replicas_share_due_timers_without_firing_one_twice(backend: Backend) {
    let rig = Rig::start(backend).await;
    let s = &rig.server;
    s.publish(reminder()).await;
    let n = 40;
    s.deliver(
        (0..n)
            .map(|i| track("Trial Started", &format!("p-{i}"), json!({})))
            .collect(),
    )
    .await;
    let other = rig.replica().await;
    s.clock.advance(DAY);
    // Both replicas' timer loops fire too; whoever fires a wait, it fires once.
    let (a, b) = tokio::join!(s.core.fire_due(), other.core.fire_due());
    assert!(a.unwrap() + b.unwrap() <= n);
    assert_eq!(rig.receiver.wait_for(n).await.len(), n);
    // A marker behind them: a double would have been sent before it.
    s.deliver(vec![track("Trial Started", "p-marker", json!({}))])
        .await;
    s.advance(DAY).await;
    rig.receiver.wait_for(n + 1).await;
    assert_eq!(rig.receiver.received().len(), n + 1);
    assert_eq!(rig.receiver.unique_ids(), n + 1);
    other.stop().await;
}
waymark_testkit::on_both_backends!(replicas_share_due_timers_without_firing_one_twice);

/// A replica commits a step's action (claimed for itself, as every replica writes them)
/// and dies before sending it: nobody sends it while its claim holds, and another replica
/// sends it, once, when the claim ends.
async fn an_action_whose_replica_died_before_sending_goes_out_after_its_lease(backend: Backend) {
    let rig = Rig::start(backend).await;
    let s = &rig.server;
    let dead = rig.store().await;
    let now = s.clock.now_us();
    let action = waymark_orchestrator::model::Action {
        action_id: "e-dead:hello:1".into(),
        enrollment_id: "e-dead".into(),
        journey_id: "welcome".into(),
        node_id: "hello".into(),
        profile_id: "p-1".into(),
        kind: waymark_orchestrator::model::ActionKind::Message,
        target: "email".into(),
        status: waymark_orchestrator::model::ActionStatus::Pending,
        reason: String::new(),
        due_at: now,
        payload: json!({"profile_id": "p-1", "channel": "email", "body": "hello"}),
        marketing: true,
        priority: 0,
    };
    let fx = waymark_orchestrator::engine::Effects {
        actions: vec![action],
        ..Default::default()
    };
    store::write_run(&dead, &[], &fx, now, now + 30_000_000)
        .await
        .unwrap();

    assert_eq!(
        s.core.dispatch_due().await.unwrap(),
        0,
        "held by the dead replica's claim"
    );
    s.clock.advance(std::time::Duration::from_secs(31));
    let sent = rig.receiver.wait_for(1).await;
    assert_eq!(sent[0].id.as_deref(), Some("e-dead:hello:1"));
    assert_eq!(sent[0].body["body"], "hello");
    eventually("the action to be recorded as sent", PATIENCE, async || {
        s.actions("p-1").await[0].status == ActionStatus::Sent as i32
    })
    .await;
    assert_eq!(s.core.dispatch_due().await.unwrap(), 0, "sent once");
    assert_eq!(rig.receiver.received().len(), 1);
}
waymark_testkit::on_both_backends!(
    an_action_whose_replica_died_before_sending_goes_out_after_its_lease
);
