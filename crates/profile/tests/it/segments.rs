//! Segments: CEL conditions, backfill, membership on events and trusted updates, the
//! periodic sweep of time-based conditions, deletion, and the events they emit.

use serde_json::json;
use tonic::Code;
use waymark_proto::common::v1::Event;
use waymark_proto::profile::v1::*;

use crate::support::*;
use crate::{by_identity, get, redis_url};

fn segment(id: &str, condition: &str) -> PutSegmentRequest {
    PutSegmentRequest {
        segment: Some(Segment {
            segment_id: id.into(),
            name: format!("{id} customers"),
            description: String::new(),
            condition: condition.into(),
            ..Default::default()
        }),
    }
}

async fn members(server: &TestProfile, id: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut token = String::new();
    loop {
        let page = server
            .client()
            .await
            .list_segment_members(admin(ListSegmentMembersRequest {
                segment_id: id.into(),
                page_size: 1,
                page_token: token,
            }))
            .await
            .unwrap()
            .into_inner();
        ids.extend(page.profile_ids);
        if page.next_page_token.is_empty() {
            return ids;
        }
        token = page.next_page_token;
    }
}

async fn wait_backfilled(server: &TestProfile, id: &str) -> Segment {
    eventually(&format!("segment {id} backfilled"), PATIENCE, async || {
        let s = server
            .client()
            .await
            .get_segment(admin(GetSegmentRequest {
                segment_id: id.into(),
            }))
            .await
            .unwrap()
            .into_inner()
            .segment
            .unwrap();
        if s.backfilled { Ok(s) } else { Err(s) }
    })
    .await
}

fn is_segment_event(e: &Event, name: &str, profile_id: &str, segment_id: &str) -> bool {
    e.event == name
        && e.profile_id == profile_id
        && waymark_proto::json::string_at(e.properties.as_ref().unwrap(), &["segment_id"])
            == Some(segment_id)
}

/// Distinct events: the orchestrator and analytics relays both deliver to the one sink.
async fn segment_events(sink: &Sink, name: &str, profile_id: &str, segment_id: &str) -> usize {
    sink.received
        .lock()
        .await
        .iter()
        .filter(|e| is_segment_event(e, name, profile_id, segment_id))
        .map(|e| e.event_id.as_str())
        .collect::<std::collections::HashSet<_>>()
        .len()
}

async fn wait_segment_event(sink: &Sink, name: &str, profile_id: &str, segment_id: &str) {
    sink.wait_for_event(name, |e| is_segment_event(e, name, profile_id, segment_id))
        .await;
}

async fn segments_follow_conditions(backend: Backend) {
    let sink = Sink::default();
    let db = TestDb::new(backend).await;
    let mut config = config(&db.url, &sink.start().await, Some(&redis_url()));
    config.segment_sweep_secs = 1;
    let server = TestProfile::start(config).await;
    let now = waymark_kit::time::now_micros() / 1_000_000;
    server
        .deliver(vec![
            EventBuilder::identify()
                .user("vip-a")
                .traits(json!({"plan": "pro"}))
                .at(now)
                .build(),
            EventBuilder::track("Order Completed")
                .user("vip-a")
                .properties(json!({"revenue": 150}))
                .at(now)
                .build(),
            EventBuilder::identify()
                .user("vip-b")
                .traits(json!({"plan": "free"}))
                .at(now)
                .build(),
            EventBuilder::identify()
                .user("vip-c")
                .traits(json!({"plan": "pro"}))
                .at(now)
                .build(),
            EventBuilder::track("Order Completed")
                .user("vip-c")
                .properties(json!({"revenue": 20}))
                .at(now)
                .build(),
        ])
        .await;
    let a = get(&server, by_identity("user_id", "vip-a")).await.unwrap();
    let c = get(&server, by_identity("user_id", "vip-c")).await.unwrap();
    let mut client = server.client().await;

    // Validation names the field and the problem.
    for (request, field) in [
        (segment("VIP!", "true"), "segment.segment_id"),
        (segment("vip", "traits.plan == "), "segment.condition"),
        (
            segment("vip", "shell.exec('rm -rf /')"),
            "segment.condition",
        ),
        (segment("vip", ""), "segment.condition"),
    ] {
        let error = client.put_segment(admin(request)).await.unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument);
        let details =
            tonic_types::StatusExt::get_details_bad_request(&error).expect("field violations");
        assert_eq!(details.field_violations[0].field, field, "{error:?}");
    }
    // Conditions are type-checked against the profile's variables when saved: one that
    // can never be true is refused with where it fails, instead of staying empty forever.
    for (condition, problem) in [
        (
            "computed.lifetime_value",
            "line 1, column 9: the condition yields a double, never a boolean",
        ),
        (
            "emotion.label == 3",
            "line 1, column 15: compares a string with a int: they are never equal",
        ),
        (
            r#""a" * 1000000 == """#,
            "line 1, column 5: cannot multiply a string and a int",
        ),
    ] {
        let error = client
            .put_segment(admin(segment("typed", condition)))
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument);
        let details =
            tonic_types::StatusExt::get_details_bad_request(&error).expect("field violations");
        assert_eq!(details.field_violations[0].field, "segment.condition");
        assert_eq!(details.field_violations[0].description, problem);
    }

    // Backfill: existing profiles are evaluated as soon as the segment is stored.
    let stored = client
        .put_segment(admin(segment(
            "vip",
            r#"traits.plan == "pro" && computed.lifetime_value > 100.0"#,
        )))
        .await
        .unwrap()
        .into_inner()
        .segment
        .unwrap();
    assert_eq!(stored.segment_id, "vip");
    let backfilled = wait_backfilled(&server, "vip").await;
    assert_eq!(backfilled.member_count, 1);
    assert_eq!(members(&server, "vip").await, [a.profile_id.as_str()]);
    let a_now = get(&server, by_identity("user_id", "vip-a")).await.unwrap();
    assert_eq!(
        a_now.segments,
        ["vip"],
        "the cached profile lists its segments"
    );
    wait_segment_event(&sink, "Segment Entered", &a.profile_id, "vip").await;

    // An event moves a profile in.
    server
        .deliver(vec![
            EventBuilder::track("Order Completed")
                .user("vip-c")
                .properties(json!({"revenue": 200}))
                .at(now)
                .build(),
        ])
        .await;
    let c_now = get(&server, by_identity("user_id", "vip-c")).await.unwrap();
    assert_eq!(c_now.segments, ["vip"]);
    wait_segment_event(&sink, "Segment Entered", &c.profile_id, "vip").await;
    let mut expected = vec![a.profile_id.clone(), c.profile_id.clone()];
    expected.sort();
    assert_eq!(members(&server, "vip").await, expected);

    // A trusted update moves a profile out.
    let updated = client
        .update_traits(admin(UpdateTraitsRequest {
            profile_id: a.profile_id.clone(),
            traits: Some(waymark_proto::json::struct_from_json(
                json!({"plan": "free"}).as_object().unwrap().clone(),
            )),
            source: "test".into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .profile
        .unwrap();
    assert!(updated.segments.is_empty());
    wait_segment_event(&sink, "Segment Exited", &a.profile_id, "vip").await;
    assert_eq!(members(&server, "vip").await, [c.profile_id.as_str()]);

    // A redelivered batch changes nothing: no second Segment Entered.
    let again = EventBuilder::track("Order Completed")
        .user("vip-c")
        .properties(json!({"revenue": 1}))
        .at(now)
        .build();
    server.deliver(vec![again.clone()]).await;
    server.deliver(vec![again]).await;
    let marker = EventBuilder::track("Marker").user("vip-c").at(now).build();
    deliver_marker(&server, &sink, marker).await;
    assert_eq!(
        segment_events(&sink, "Segment Entered", &c.profile_id, "vip").await,
        1
    );

    // Time-based: nobody is lapsed yet; two seconds later everybody is, with no event.
    client
        .put_segment(admin(segment(
            "quiet",
            r#"now - computed.last_seen > duration("2s")"#,
        )))
        .await
        .unwrap();
    assert_eq!(wait_backfilled(&server, "quiet").await.member_count, 0);
    let what = "the sweep to re-evaluate conditions that use now: three lapsed";
    eventually(what, PATIENCE, async || {
        let lapsed = members(&server, "quiet").await.len();
        if lapsed == 3 { Ok(()) } else { Err(lapsed) }
    })
    .await;

    // A profile merged away exits its segments under its own id; the survivor keeps its
    // own membership.
    server
        .deliver(vec![
            EventBuilder::track("Page Viewed")
                .anonymous("anon-z")
                .at(now - 60)
                .build(),
        ])
        .await;
    let z = get(&server, by_identity("anonymous_id", "anon-z"))
        .await
        .unwrap();
    wait_segment_event(&sink, "Segment Entered", &z.profile_id, "quiet").await;
    server
        .deliver(vec![
            EventBuilder::identify()
                .user("vip-c")
                .anonymous("anon-z")
                .at(now - 60)
                .build(),
        ])
        .await;
    wait_segment_event(&sink, "Segment Exited", &z.profile_id, "quiet").await;
    let quiet = members(&server, "quiet").await;
    assert!(!quiet.contains(&z.profile_id), "{quiet:?}");
    assert!(quiet.contains(&c.profile_id), "{quiet:?}");
    assert_eq!(
        segment_events(&sink, "Segment Exited", &c.profile_id, "quiet").await,
        0
    );

    // Listing and deletion.
    let listed: Vec<String> = client
        .list_segments(admin(ListSegmentsRequest {}))
        .await
        .unwrap()
        .into_inner()
        .segments
        .into_iter()
        .map(|s| s.segment_id)
        .collect();
    assert_eq!(listed, ["quiet", "vip"]);
    let deleted = client
        .delete_segment(admin(DeleteSegmentRequest {
            segment_id: "vip".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.exited, 1);
    wait_segment_event(&sink, "Segment Exited", &c.profile_id, "vip").await;
    let c_after = get(&server, by_identity("user_id", "vip-c")).await.unwrap();
    assert_eq!(c_after.segments, ["quiet"]);
    let gone = client
        .get_segment(admin(GetSegmentRequest {
            segment_id: "vip".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    server.stop().await;
}
waymark_testkit::on_both_backends!(segments_follow_conditions);

/// Two replicas: a segment stored through one counts in the very next batch the other
/// applies, with no sweep in between.
async fn a_segment_stored_on_one_replica_counts_on_the_other_at_once(backend: Backend) {
    let sink = Sink::default();
    let (a, b, _db) = two_replicas(backend, &sink.start().await).await;
    let now = waymark_kit::time::now_micros() / 1_000_000;
    let plan = |plan: &str| {
        EventBuilder::identify()
            .user("rep-1")
            .traits(json!({ "plan": plan }))
            .at(now)
            .build()
    };
    b.deliver(vec![plan("free")]).await;
    a.put_segment("enterprise", r#"traits.plan == "enterprise""#)
        .await;
    assert_eq!(wait_backfilled(&a, "enterprise").await.member_count, 0);

    b.deliver(vec![plan("enterprise")]).await;
    let p = get(&b, by_identity("user_id", "rep-1")).await.unwrap();
    assert_eq!(p.segments, ["enterprise"], "replica B knew the new segment");
    wait_segment_event(&sink, "Segment Entered", &p.profile_id, "enterprise").await;

    let deleted = b
        .client()
        .await
        .delete_segment(admin(DeleteSegmentRequest {
            segment_id: "enterprise".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.exited, 1);
    // A must not put the customer back into a segment that no longer exists.
    a.deliver(vec![plan("enterprise")]).await;
    let p = get(&a, by_identity("user_id", "rep-1")).await.unwrap();
    assert!(p.segments.is_empty(), "{:?}", p.segments);
    a.stop().await;
    b.stop().await;
}
waymark_testkit::on_both_backends!(a_segment_stored_on_one_replica_counts_on_the_other_at_once);

/// Segments stored in a quick loop: each definition interrupts the backfill of the ones
/// before it, and every one of them still ends backfilled with exactly its members.
async fn segments_put_in_a_quick_loop_all_get_their_members(backend: Backend) {
    let sink = Sink::default();
    let db = TestDb::new(backend).await;
    let server = TestProfile::start(config(&db.url, &sink.start().await, Some(&redis_url()))).await;
    let now = waymark_kit::time::now_micros() / 1_000_000;
    let customers = 40;
    server
        .deliver(
            (0..customers)
                .map(|n| {
                    EventBuilder::identify()
                        .user(&format!("loop-{n}"))
                        .traits(json!({ "n": n }))
                        .at(now)
                        .build()
                })
                .collect(),
        )
        .await;
    let segments = 12;
    for k in 0..segments {
        server
            .put_segment(&format!("at-least-{k}"), &format!("traits.n >= {k}.0"))
            .await;
    }
    for k in 0..segments {
        let id = format!("at-least-{k}");
        let segment = wait_backfilled(&server, &id).await;
        let expected = customers - k;
        assert_eq!(segment.member_count, expected as u64, "{id}");
        assert_eq!(members(&server, &id).await.len(), expected, "{id}");
    }
    server.stop().await;
}
waymark_testkit::on_both_backends!(segments_put_in_a_quick_loop_all_get_their_members);

fn gold(n: usize, at: i64) -> Event {
    EventBuilder::identify()
        .user(&format!("gold-{n}"))
        .traits(json!({"tier": "gold"}))
        .at(at)
        .build()
}

async fn delete(server: &TestProfile, id: &str) -> Result<u64, tonic::Status> {
    server
        .client()
        .await
        .delete_segment(admin(DeleteSegmentRequest {
            segment_id: id.into(),
        }))
        .await
        .map(|r| r.into_inner().exited)
}

/// Members exit a page at a time: more members than a page, deliveries to them while
/// they exit, and each still exits exactly once and is never put back.
async fn a_large_segment_is_deleted_page_by_page(backend: Backend) {
    let sink = Sink::default();
    let db = TestDb::new(backend).await;
    let server = TestProfile::start(config(&db.url, &sink.start().await, Some(&redis_url()))).await;
    let now = waymark_kit::time::now_micros() / 1_000_000;
    let customers = 1_100;
    for chunk in (0..customers).collect::<Vec<_>>().chunks(500) {
        server
            .deliver(chunk.iter().map(|&n| gold(n, now)).collect())
            .await;
    }
    server.put_segment("gold", r#"traits.tier == "gold""#).await;
    assert_eq!(
        wait_backfilled(&server, "gold").await.member_count,
        customers as u64
    );
    let (exited, ()) = tokio::join!(delete(&server, "gold"), async {
        for n in (0..customers).step_by(100) {
            server.deliver(vec![gold(n, now + 1)]).await;
        }
    });
    assert_eq!(exited.unwrap(), customers as u64);
    assert_eq!(
        delete(&server, "gold").await.unwrap_err().code(),
        Code::NotFound
    );
    for n in (0..customers).step_by(100).chain([customers - 1]) {
        let p = get(&server, by_identity("user_id", &format!("gold-{n}")))
            .await
            .unwrap();
        assert!(p.segments.is_empty(), "gold-{n}: {:?}", p.segments);
    }
    eventually("every member's Segment Exited", PATIENCE, async || {
        let exits = sink
            .received
            .lock()
            .await
            .iter()
            .filter(|e| e.event == "Segment Exited")
            .map(|e| e.profile_id.clone())
            .collect::<std::collections::HashSet<_>>()
            .len();
        assert!(exits <= customers);
        if exits == customers {
            Ok(())
        } else {
            Err(exits)
        }
    })
    .await;
    let distinct = sink
        .received
        .lock()
        .await
        .iter()
        .filter(|e| e.event == "Segment Exited")
        .map(|e| e.event_id.clone())
        .collect::<std::collections::HashSet<_>>()
        .len();
    assert_eq!(distinct, customers, "each member exits once");
    server.stop().await;
}
waymark_testkit::on_both_backends!(a_large_segment_is_deleted_page_by_page);

/// A deletion that stopped after removing the definition (the process died between
/// pages): the segment is gone, a new one of that id is refused until the deletion is
/// finished, and calling DeleteSegment again lets the remaining members exit.
async fn a_deletion_stopped_half_way_finishes_when_called_again(backend: Backend) {
    let sink = Sink::default();
    let db = TestDb::new(backend).await;
    let settings = config(&db.url, &sink.start().await, Some(&redis_url()));
    let database = settings.profile_database();
    let server = TestProfile::start(settings).await;
    let now = waymark_kit::time::now_micros() / 1_000_000;
    server.deliver((0..3).map(|n| gold(n, now)).collect()).await;
    server.put_segment("gold", r#"traits.tier == "gold""#).await;
    assert_eq!(wait_backfilled(&server, "gold").await.member_count, 3);
    // What the first step of a deletion commits on its own.
    let conn = waymark_kit::db::connect(&database, "profile", 1)
        .await
        .unwrap();
    let txn = sea_orm::TransactionTrait::begin(&conn).await.unwrap();
    assert!(
        waymark_profile::store::delete_segment(&txn, "gold")
            .await
            .unwrap()
    );
    waymark_profile::store::bump_definitions(&txn)
        .await
        .unwrap();
    txn.commit().await.unwrap();
    conn.close().await.ok();

    let refused = server
        .client()
        .await
        .put_segment(admin(segment("gold", "true")))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(delete(&server, "gold").await.unwrap(), 3);
    for n in 0..3 {
        let p = get(&server, by_identity("user_id", &format!("gold-{n}")))
            .await
            .unwrap();
        assert!(p.segments.is_empty(), "gold-{n}: {:?}", p.segments);
    }
    assert_eq!(
        delete(&server, "gold").await.unwrap_err().code(),
        Code::NotFound
    );
    server.put_segment("gold", r#"traits.tier == "gold""#).await;
    assert_eq!(wait_backfilled(&server, "gold").await.member_count, 3);
    server.stop().await;
}
waymark_testkit::on_both_backends!(a_deletion_stopped_half_way_finishes_when_called_again);
