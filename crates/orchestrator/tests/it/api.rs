//! The admin API at its edges: every problem of a journey named by node and field, bad
//! requests refused with the field at fault, events without an id rejected alone, and
//! pages that add up to the whole list.

use serde_json::json;
use tonic::Code;
use waymark_proto::orchestration::v1::*;

use crate::support::*;

/// The fields a refused request's BadRequest details name.
fn violated_fields(status: &tonic::Status) -> Vec<String> {
    tonic_types::StatusExt::get_details_bad_request(status)
        .expect("field violations")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect()
}

/// A journey wrong in three places: its id, its start and a wait's timeout.
fn broken_journey() -> JourneyDefinition {
    waymark_proto::proto_json::from_json(&json!({
        "journeyId": "Not An Id",
        "entry": {"trigger": {"event": "Signed Up"}, "start": "missing"},
        "nodes": [
            {"id": "hello", "message": {"channel": "email", "variants": [{"body": "hi"}], "next": "wait"}},
            {"id": "wait", "wait": {"branches": [{"match": {"event": "Order Completed"}}], "timeout": "two days"}}
        ]
    }))
    .unwrap()
}

/// ValidateJourney lists every problem with its node and field; PutJourney of the same
/// journey is refused with one field violation per problem, under `journey.`.
async fn every_problem_of_a_journey_is_named(backend: Backend) {
    let rig = Rig::start(backend).await;
    let mut client = rig.server.client().await;
    let problems = client
        .validate_journey(admin(ValidateJourneyRequest {
            journey: Some(broken_journey()),
        }))
        .await
        .unwrap()
        .into_inner()
        .problems;
    let mut found: Vec<(&str, &str)> = problems
        .iter()
        .map(|p| (p.node_id.as_str(), p.field.as_str()))
        .collect();
    found.sort_unstable();
    assert_eq!(
        found,
        [
            ("", "entry.start"),
            ("", "journey_id"),
            ("wait", "nodes[1].wait.timeout"),
        ],
        "{problems:?}"
    );
    assert!(problems.iter().all(|p| !p.problem.is_empty()));

    let refused = client
        .put_journey(admin(PutJourneyRequest {
            journey: Some(broken_journey()),
        }))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    let mut fields = violated_fields(&refused);
    fields.sort();
    assert_eq!(
        fields,
        [
            "journey.entry.start",
            "journey.journey_id",
            "journey.nodes[1].wait.timeout"
        ]
    );
    let listed = client
        .list_journeys(admin(ListJourneysRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .journeys;
    assert!(listed.is_empty(), "nothing was saved: {listed:?}");
}
waymark_testkit::on_both_backends!(every_problem_of_a_journey_is_named);

/// Requests that cannot be served are refused with the code and field that say why.
async fn bad_requests_are_refused_with_the_field_at_fault(backend: Backend) {
    let rig = Rig::start(backend).await;
    let mut client = rig.server.client().await;

    let empty_id = client
        .get_journey(admin(GetJourneyRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(empty_id.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&empty_id), ["journey_id"]);

    let unknown = client
        .get_journey(admin(GetJourneyRequest {
            journey_id: "nope".into(),
            version: 0,
        }))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    let draft = waymark_proto::proto_json::from_json(&json!({
        "journeyId": "draft",
        "entry": {"trigger": {"event": "Signed Up"}, "start": "bye"},
        "nodes": [{"id": "bye", "exit": {}}]
    }))
    .unwrap();
    client
        .put_journey(admin(PutJourneyRequest {
            journey: Some(draft),
        }))
        .await
        .unwrap();
    let not_live = client
        .pause_journey(admin(PauseJourneyRequest {
            journey_id: "draft".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(not_live.code(), Code::FailedPrecondition, "{not_live:?}");

    for (journey_id, profile_id) in [("draft", "p-1"), ("", "")] {
        let ambiguous = client
            .list_enrollments(admin(ListEnrollmentsRequest {
                journey_id: journey_id.into(),
                profile_id: profile_id.into(),
                ..ListEnrollmentsRequest::default()
            }))
            .await
            .unwrap_err();
        assert_eq!(ambiguous.code(), Code::InvalidArgument);
        assert_eq!(violated_fields(&ambiguous), ["journey_id"]);
    }
    let too_large = client
        .list_enrollments(admin(ListEnrollmentsRequest {
            profile_id: "p-1".into(),
            page_size: 1001,
            ..ListEnrollmentsRequest::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(too_large.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&too_large), ["page_size"]);
    client
        .list_enrollments(admin(ListEnrollmentsRequest {
            profile_id: "p-1".into(),
            page_size: 1000,
            ..ListEnrollmentsRequest::default()
        }))
        .await
        .expect("1000 is the largest page");

    let policy = waymark_proto::proto_json::from_json(
        &json!({"caps": [{"channel": "email", "maxMessages": 1, "window": "a while"}]}),
    )
    .unwrap();
    let bad_window = client
        .put_contact_policy(admin(PutContactPolicyRequest {
            policy: Some(policy),
        }))
        .await
        .unwrap_err();
    assert_eq!(bad_window.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&bad_window), ["policy.caps[0].window"]);
}
waymark_testkit::on_both_backends!(bad_requests_are_refused_with_the_field_at_fault);

/// An event without an id cannot be applied once: it alone is rejected, naming its
/// position, and the events around it apply.
async fn an_event_without_an_id_is_rejected_alone(backend: Backend) {
    let rig = Rig::start(backend).await;
    let s = &rig.server;
    s.publish(json!({
        "journeyId": "hello",
        "entry": {"trigger": {"event": "Signed Up"}, "start": "hi"},
        "nodes": [{"id": "hi", "message": {"channel": "email", "variants": [{"body": "hi"}]}}]
    }))
    .await;
    let mut nameless = track("Signed Up", "p-nameless", json!({}));
    nameless.event_id.clear();
    let response = s
        .deliver(vec![
            track("Signed Up", "p-first", json!({})),
            nameless,
            track("Signed Up", "p-last", json!({})),
        ])
        .await;
    assert_eq!(response.applied, 2);
    assert_eq!(response.rejected.len(), 1, "{:?}", response.rejected);
    assert_eq!(response.rejected[0].index, 1);
    assert_eq!(response.rejected[0].field, "events[1].event_id");
    assert_eq!(s.enrollments_of("p-first").await.len(), 1);
    assert_eq!(s.enrollments_of("p-last").await.len(), 1);
    assert!(s.enrollments_of("p-nameless").await.is_empty());
}
waymark_testkit::on_both_backends!(an_event_without_an_id_is_rejected_alone);

/// Five actions, two a page: every action once, newest first, and no token after the
/// last page. Two pairs share a creation time, so the order within a time holds too.
async fn actions_page_through_without_gaps_or_repeats(backend: Backend) {
    let rig = Rig::start(backend).await;
    let s = &rig.server;
    s.publish(json!({
        "journeyId": "ping",
        "entry": {"trigger": {"event": "Ping"}, "start": "pong", "reentry": "REENTRY_ALWAYS", "maxConcurrent": 10},
        "nodes": [{"id": "pong", "message": {"channel": "email", "variants": [{"body": "pong"}]}}]
    }))
    .await;
    let ping = || track("Ping", "p-1", json!({}));
    s.deliver(vec![ping(), ping()]).await;
    s.advance(HOUR).await;
    s.deliver(vec![ping()]).await;
    s.advance(HOUR).await;
    s.deliver(vec![ping(), ping()]).await;

    let mut client = s.client().await;
    let mut seen: Vec<Action> = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = client
            .list_actions(admin(ListActionsRequest {
                profile_id: "p-1".into(),
                page_size: 2,
                page_token: token,
                ..ListActionsRequest::default()
            }))
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.actions.len() <= 2);
        seen.extend(page.actions);
        if page.next_page_token.is_empty() {
            break;
        }
        assert!(pages < 5, "paging does not end");
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    let mut ids: Vec<&str> = seen.iter().map(|a| a.action_id.as_str()).collect();
    assert_eq!(ids.len(), 5);
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 5, "no action twice");
    let created: Vec<i64> = seen
        .iter()
        .map(|a| waymark_kit::time::micros(a.created_at.as_ref().unwrap()))
        .collect();
    assert_eq!(
        created,
        [
            START_US + 2 * 3_600_000_000,
            START_US + 2 * 3_600_000_000,
            START_US + 3_600_000_000,
            START_US,
            START_US,
        ],
        "newest first"
    );
}
waymark_testkit::on_both_backends!(actions_page_through_without_gaps_or_repeats);
