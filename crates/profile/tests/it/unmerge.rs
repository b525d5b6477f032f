//! Unmerge: a merge split back out from its audit, both sides rebuilt from their events.

use serde_json::json;
use tonic::Code;
use waymark_proto::profile::v1::*;

use crate::support::*;
use crate::{by_identity, get, redis_url, trait_str};

fn by_id(id: &str) -> GetProfileRequest {
    GetProfileRequest {
        profile_id: id.into(),
        identity: None,
    }
}

async fn timeline_len(server: &TestProfile, id: &str) -> usize {
    server
        .client()
        .await
        .get_timeline(admin(GetTimelineRequest {
            profile_id: id.into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .entries
        .len()
}

async fn unmerge_restores_both_sides(backend: Backend) {
    let sink = Sink::default();
    let db = TestDb::new(backend).await;
    let server = TestProfile::start(config(&db.url, &sink.start().await, Some(&redis_url()))).await;
    server
        .deliver(vec![
            EventBuilder::identify()
                .anonymous("anon-a")
                .traits(json!({"email": "kim@example.com", "city": "Oslo"}))
                .at(100)
                .build(),
        ])
        .await;
    server
        .deliver(vec![
            EventBuilder::identify()
                .anonymous("anon-b")
                .traits(json!({"phone": "+44 20 7946 0958", "plan": "pro"}))
                .at(200)
                .build(),
            EventBuilder::track("Order Completed")
                .anonymous("anon-b")
                .properties(json!({"revenue": 50}))
                .at(210)
                .build(),
        ])
        .await;
    let a = get(&server, by_identity("anonymous_id", "anon-a"))
        .await
        .unwrap();
    let b = get(&server, by_identity("anonymous_id", "anon-b"))
        .await
        .unwrap();
    // The wrong link: device b claims Kim's e-mail.
    server
        .deliver(vec![
            EventBuilder::identify()
                .anonymous("anon-b")
                .traits(json!({"email": "kim@example.com"}))
                .at(300)
                .build(),
        ])
        .await;
    let merged = get(&server, by_id(&b.profile_id)).await.unwrap();
    assert_eq!(merged.profile_id, a.profile_id);
    assert_eq!(trait_str(&merged, "plan").as_deref(), Some("pro"));
    assert_eq!(merged.computed.as_ref().unwrap().lifetime_value, 50.0);

    let mut client = server.client().await;
    // Analytics writes a stage and the customer opts into SMS: trusted changes that must
    // survive the rebuild without counting as activity.
    client
        .update_traits(admin(UpdateTraitsRequest {
            profile_id: a.profile_id.clone(),
            traits: Some(waymark_proto::json::struct_from_json(
                json!({"stage": "loyalty"}).as_object().unwrap().clone(),
            )),
            source: "analytics".into(),
        }))
        .await
        .unwrap();
    client
        .set_consent(admin(SetConsentRequest {
            profile_id: a.profile_id.clone(),
            channel: "sms".into(),
            purpose: "marketing".into(),
            granted: true,
            source: "preference-centre".into(),
        }))
        .await
        .unwrap();
    let merges = client
        .list_merges(admin(ListMergesRequest {
            profile_id: a.profile_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner()
        .merges;
    assert_eq!(merges.len(), 1);
    let response = client
        .unmerge(admin(UnmergeRequest {
            merge_id: merges[0].merge_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    let (survivor, restored) = (response.survivor.unwrap(), response.restored.unwrap());
    assert_eq!(survivor.profile_id, a.profile_id);
    assert_eq!(restored.profile_id, b.profile_id);

    // The survivor is rebuilt from its own events: the linking identify stays with it.
    assert_eq!(trait_str(&survivor, "city").as_deref(), Some("Oslo"));
    assert_eq!(trait_str(&survivor, "plan"), None);
    let computed = survivor.computed.as_ref().unwrap();
    assert_eq!((computed.total_events, computed.lifetime_value), (2, 0.0));
    assert_eq!(trait_str(&survivor, "stage").as_deref(), Some("loyalty"));
    let sms = survivor
        .consents
        .iter()
        .find(|c| c.channel == "sms")
        .expect("the consent survives");
    assert!(sms.granted);
    assert_eq!(sms.source, "preference-centre");
    // The restored profile is what it was before the merge.
    assert_eq!(trait_str(&restored, "plan").as_deref(), Some("pro"));
    let computed = restored.computed.as_ref().unwrap();
    assert_eq!((computed.total_events, computed.lifetime_value), (2, 50.0));

    // Reads (cache and database) and identifiers follow.
    for (request, owner) in [
        (by_id(&b.profile_id), &b.profile_id),
        (by_id(&a.profile_id), &a.profile_id),
        (by_identity("phone", "+442079460958"), &b.profile_id),
        (by_identity("anonymous_id", "anon-b"), &b.profile_id),
        (by_identity("email", "kim@example.com"), &a.profile_id),
    ] {
        assert_eq!(&get(&server, request).await.unwrap().profile_id, owner);
    }
    assert_eq!(timeline_len(&server, &b.profile_id).await, 2);
    assert_eq!(
        timeline_len(&server, &a.profile_id).await,
        4,
        "two events and two trusted changes"
    );

    // The audit keeps the merge, marked undone; undoing it twice is refused.
    let merges = client
        .list_merges(admin(ListMergesRequest {
            profile_id: a.profile_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner()
        .merges;
    assert!(merges[0].unmerged_at.is_some());
    let again = client
        .unmerge(admin(UnmergeRequest {
            merge_id: merges[0].merge_id.clone(),
        }))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);
    for (merge_id, code) in [("", Code::InvalidArgument), ("nope", Code::NotFound)] {
        let error = client
            .unmerge(admin(UnmergeRequest {
                merge_id: merge_id.into(),
            }))
            .await
            .unwrap_err();
        assert_eq!(error.code(), code);
    }

    sink.wait_for_event("Profile Unmerged", |e| {
        e.event == "Profile Unmerged" && e.profile_id == a.profile_id
    })
    .await;
    server.stop().await;
}
waymark_testkit::on_both_backends!(unmerge_restores_both_sides);

/// A merge of a long history split while the survivor keeps receiving events: both sides
/// are replayed a page at a time outside the applier, the events that arrive meanwhile
/// stay with the survivor, and nothing is lost or counted twice.
async fn unmerge_of_a_long_timeline_while_events_arrive(backend: Backend) {
    let sink = Sink::default();
    let db = TestDb::new(backend).await;
    let server = TestProfile::start(config(&db.url, &sink.start().await, Some(&redis_url()))).await;
    let kim = |n: i64| {
        EventBuilder::track("Product Viewed")
            .user("kim")
            .at(1_000 + n)
            .build()
    };
    let history: i64 = 2_500;
    for chunk in (0..history).collect::<Vec<_>>().chunks(500) {
        server
            .deliver(chunk.iter().map(|&n| kim(n)).collect())
            .await;
    }
    server
        .deliver(vec![
            EventBuilder::identify()
                .user("kim")
                .traits(json!({"email": "kim@example.com"}))
                .at(10)
                .build(),
        ])
        .await;
    let other = (0..3)
        .map(|n| {
            EventBuilder::track("Order Completed")
                .anonymous("anon-b")
                .properties(json!({"revenue": 10}))
                .at(20 + n)
                .build()
        })
        .collect();
    server.deliver(other).await;
    let b = get(&server, by_identity("anonymous_id", "anon-b"))
        .await
        .unwrap();
    // The wrong link.
    server
        .deliver(vec![
            EventBuilder::identify()
                .anonymous("anon-b")
                .traits(json!({"email": "kim@example.com"}))
                .at(30)
                .build(),
        ])
        .await;
    let a = get(&server, by_identity("user_id", "kim")).await.unwrap();
    assert_ne!(a.profile_id, b.profile_id);
    assert_eq!(
        get(&server, by_id(&b.profile_id)).await.unwrap().profile_id,
        a.profile_id
    );
    let merge_id = server
        .client()
        .await
        .list_merges(admin(ListMergesRequest {
            profile_id: a.profile_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner()
        .merges[0]
        .merge_id
        .clone();
    let arriving: i64 = 20;
    let (unmerged, ()) = tokio::join!(
        async {
            server
                .client()
                .await
                .unmerge(admin(UnmergeRequest { merge_id }))
                .await
        },
        async {
            for n in 0..arriving {
                server.deliver(vec![kim(history + n)]).await;
            }
        }
    );
    let response = unmerged.unwrap().into_inner();
    assert_eq!(response.restored.unwrap().profile_id, b.profile_id);
    let survivor = get(&server, by_id(&a.profile_id)).await.unwrap();
    let restored = get(&server, by_id(&b.profile_id)).await.unwrap();
    assert_eq!(restored.profile_id, b.profile_id, "split back out");
    // Kim's history, the identify, the linking identify and every event that arrived.
    assert_eq!(
        survivor.computed.unwrap().total_events,
        (history + 2 + arriving) as u64
    );
    let restored_computed = restored.computed.unwrap();
    assert_eq!(
        (
            restored_computed.total_events,
            restored_computed.lifetime_value
        ),
        (3, 30.0)
    );
    assert_eq!(
        get(&server, by_identity("anonymous_id", "anon-b"))
            .await
            .unwrap()
            .profile_id,
        b.profile_id
    );
    server.stop().await;
}
waymark_testkit::on_both_backends!(unmerge_of_a_long_timeline_while_events_arrive);

/// Kim (anonymous `anon-a`, her e-mail) and a second visitor (`anon-b`, a phone), merged
/// wrongly by `anon-b` claiming Kim's e-mail, then split by Unmerge: (Kim, the visitor,
/// the undone merge's id).
async fn wrongly_merged_then_unmerged(server: &TestProfile) -> (Profile, Profile, String) {
    server
        .deliver(vec![
            EventBuilder::identify()
                .anonymous("anon-a")
                .traits(json!({"email": "kim@example.com"}))
                .at(100)
                .build(),
        ])
        .await;
    server
        .deliver(vec![
            EventBuilder::identify()
                .anonymous("anon-b")
                .traits(json!({"phone": "+44 20 7946 0958"}))
                .at(200)
                .build(),
        ])
        .await;
    server.deliver(vec![wrong_link(300)]).await;
    let merges = list_merges(server, "anon-a").await;
    assert_eq!(merges.merges.len(), 1);
    let merge_id = merges.merges[0].merge_id.clone();
    let split = server
        .client()
        .await
        .unmerge(admin(UnmergeRequest {
            merge_id: merge_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    (split.survivor.unwrap(), split.restored.unwrap(), merge_id)
}

/// The identify that linked the two: `anon-b` with Kim's e-mail.
fn wrong_link(at_secs: i64) -> waymark_proto::common::v1::Event {
    EventBuilder::identify()
        .anonymous("anon-b")
        .traits(json!({"email": "kim@example.com"}))
        .at(at_secs)
        .build()
}

/// ListMerges of the profile holding an anonymous id.
async fn list_merges(server: &TestProfile, anonymous_id: &str) -> ListMergesResponse {
    let live = get(server, by_identity("anonymous_id", anonymous_id))
        .await
        .unwrap();
    server
        .client()
        .await
        .list_merges(admin(ListMergesRequest {
            profile_id: live.profile_id,
        }))
        .await
        .unwrap()
        .into_inner()
}

async fn total_events(server: &TestProfile, id: &str) -> u64 {
    let profile = get(server, by_id(id)).await.unwrap();
    profile.computed.unwrap().total_events
}

/// After an Unmerge the same evidence no longer merges the two: the event goes to the
/// profile owning its strongest identifier (the e-mail: Kim's), `anon-b` stays with the
/// visitor, and ListMerges shows the pair on both sides, until AllowMerge lifts it.
async fn an_unmerge_sticks_until_allow_merge(backend: Backend) {
    let sink = Sink::default();
    let db = TestDb::new(backend).await;
    let server = TestProfile::start(config(&db.url, &sink.start().await, Some(&redis_url()))).await;
    let (kim, visitor, merge_id) = wrongly_merged_then_unmerged(&server).await;
    let (kim_events, visitor_events) = (
        total_events(&server, &kim.profile_id).await,
        total_events(&server, &visitor.profile_id).await,
    );
    // Twice: first loading both profiles from the database, then from the applier's
    // memory of them.
    for n in 1..=2 {
        server.deliver(vec![wrong_link(400 + n)]).await;
        for (request, owner) in [
            (by_identity("anonymous_id", "anon-b"), &visitor.profile_id),
            (by_identity("email", "kim@example.com"), &kim.profile_id),
            (by_id(&visitor.profile_id), &visitor.profile_id),
        ] {
            assert_eq!(&get(&server, request).await.unwrap().profile_id, owner);
        }
        assert_eq!(
            total_events(&server, &kim.profile_id).await,
            kim_events + n as u64
        );
        assert_eq!(
            total_events(&server, &visitor.profile_id).await,
            visitor_events
        );
    }
    for side in ["anon-a", "anon-b"] {
        let listed = list_merges(&server, side).await;
        assert_eq!(listed.do_not_merge.len(), 1, "{side}");
        let pair = &listed.do_not_merge[0];
        assert_eq!(pair.merge_id, merge_id);
        assert_eq!(
            (pair.survivor_id.as_str(), pair.restored_id.as_str()),
            (kim.profile_id.as_str(), visitor.profile_id.as_str())
        );
        assert!(pair.unmerged_at.is_some());
        assert!(
            pair.evidence
                .iter()
                .any(|i| i.r#type == "email" && i.value == "kim@example.com")
        );
    }
    let merges = list_merges(&server, "anon-a").await.merges;
    assert_eq!(merges.len(), 1, "no new merge");

    let mut client = server.client().await;
    let error = client
        .allow_merge(admin(AllowMergeRequest {
            merge_id: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    let details =
        tonic_types::StatusExt::get_details_bad_request(&error).expect("field violations");
    assert_eq!(details.field_violations[0].field, "merge_id");
    let error = client
        .allow_merge(admin(AllowMergeRequest {
            merge_id: "nope".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::NotFound);
    let allowed = client
        .allow_merge(admin(AllowMergeRequest {
            merge_id: merge_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner()
        .allowed
        .unwrap();
    assert_eq!(allowed.merge_id, merge_id);
    assert!(list_merges(&server, "anon-b").await.do_not_merge.is_empty());
    let again = client
        .allow_merge(admin(AllowMergeRequest {
            merge_id: merge_id.clone(),
        }))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::NotFound);

    // The same evidence merges them again, under a new merge.
    server.deliver(vec![wrong_link(500)]).await;
    assert_eq!(
        get(&server, by_identity("anonymous_id", "anon-b"))
            .await
            .unwrap()
            .profile_id,
        kim.profile_id
    );
    let merges = list_merges(&server, "anon-a").await.merges;
    assert_eq!(merges.len(), 2);
    assert!(merges[1].unmerged_at.is_none());
    server.stop().await;
}
waymark_testkit::on_both_backends!(an_unmerge_sticks_until_allow_merge);

/// A side of a pair merged into a third profile later passes the pair on to it: the
/// third profile and the other side are kept apart too.
async fn a_pair_holds_for_the_profile_a_side_is_merged_into(backend: Backend) {
    let sink = Sink::default();
    let db = TestDb::new(backend).await;
    let server = TestProfile::start(config(&db.url, &sink.start().await, Some(&redis_url()))).await;
    // A third visitor, older than the other two but Kim.
    server
        .deliver(vec![
            EventBuilder::track("Page Viewed")
                .anonymous("anon-c")
                .at(50)
                .build(),
        ])
        .await;
    let third = get(&server, by_identity("anonymous_id", "anon-c"))
        .await
        .unwrap();
    let (kim, visitor, merge_id) = wrongly_merged_then_unmerged(&server).await;
    // The visitor turns out to be the third one (the visitor's phone on its device):
    // merged into it, the older.
    server
        .deliver(vec![
            EventBuilder::identify()
                .anonymous("anon-c")
                .traits(json!({"phone": "+44 20 7946 0958"}))
                .at(610)
                .build(),
        ])
        .await;
    assert_eq!(
        get(&server, by_id(&visitor.profile_id))
            .await
            .unwrap()
            .profile_id,
        third.profile_id
    );
    let listed = list_merges(&server, "anon-c").await;
    assert_eq!(listed.do_not_merge.len(), 1);
    assert_eq!(listed.do_not_merge[0].merge_id, merge_id);
    // Kim's e-mail on the third profile's device: kept apart, the event goes to Kim.
    let kim_events = total_events(&server, &kim.profile_id).await;
    server
        .deliver(vec![
            EventBuilder::identify()
                .anonymous("anon-c")
                .traits(json!({"email": "kim@example.com"}))
                .at(700)
                .build(),
        ])
        .await;
    assert_eq!(
        get(&server, by_identity("anonymous_id", "anon-c"))
            .await
            .unwrap()
            .profile_id,
        third.profile_id
    );
    assert_eq!(total_events(&server, &kim.profile_id).await, kim_events + 1);
    assert!(
        list_merges(&server, "anon-a")
            .await
            .merges
            .iter()
            .all(|m| m.merged_id != third.profile_id && m.survivor_id != third.profile_id)
    );

    // Undoing the visitor's merge into the third profile passes the pair back to the
    // visitor, and keeps the visitor and the third one apart in turn.
    let merged_in = list_merges(&server, "anon-c")
        .await
        .merges
        .into_iter()
        .find(|m| m.merged_id == visitor.profile_id && m.unmerged_at.is_none())
        .expect("the visitor's merge into the third profile");
    server
        .client()
        .await
        .unmerge(admin(UnmergeRequest {
            merge_id: merged_in.merge_id.clone(),
        }))
        .await
        .unwrap();
    let on_visitor: Vec<String> = list_merges(&server, "anon-b")
        .await
        .do_not_merge
        .into_iter()
        .map(|d| d.merge_id)
        .collect();
    assert_eq!(on_visitor, [merge_id.clone(), merged_in.merge_id.clone()]);
    let on_third: Vec<String> = list_merges(&server, "anon-c")
        .await
        .do_not_merge
        .into_iter()
        .map(|d| d.merge_id)
        .collect();
    assert_eq!(on_third, [merged_in.merge_id]);
    // Kim's e-mail on the visitor's device again: still kept apart from Kim.
    server.deliver(vec![wrong_link(800)]).await;
    assert_eq!(
        get(&server, by_identity("anonymous_id", "anon-b"))
            .await
            .unwrap()
            .profile_id,
        visitor.profile_id
    );
    assert_eq!(total_events(&server, &kim.profile_id).await, kim_events + 2);
    server.stop().await;
}
waymark_testkit::on_both_backends!(a_pair_holds_for_the_profile_a_side_is_merged_into);

/// The pair names the two profiles the undone merge joined, even when that merge's
/// survivor lived inside a third profile at the time: undoing the outer merge later hands
/// the pair back to the inner survivor, which the same evidence then still cannot merge;
/// and the identifiers the inner unmerge gave back stay with their profile.
async fn a_pair_follows_the_inner_survivor_out_of_an_outer_merge(backend: Backend) {
    let sink = Sink::default();
    let db = TestDb::new(backend).await;
    let server = TestProfile::start(config(&db.url, &sink.start().await, Some(&redis_url()))).await;
    let identify = |anonymous: &str, traits: serde_json::Value, at: i64| {
        EventBuilder::identify()
            .anonymous(anonymous)
            .traits(traits)
            .at(at)
            .build()
    };
    // The oldest, H; then S with an e-mail and a phone; then M, a visitor.
    server
        .deliver(vec![identify("anon-h", json!({"city": "Oslo"}), 10)])
        .await;
    server
        .deliver(vec![identify(
            "anon-s",
            json!({"email": "sam@example.com", "phone": "+44 20 7946 0111"}),
            20,
        )])
        .await;
    server
        .deliver(vec![identify("anon-m", json!({"city": "Bergen"}), 30)])
        .await;
    let m = get(&server, by_identity("anonymous_id", "anon-m"))
        .await
        .unwrap();
    let s = get(&server, by_identity("anonymous_id", "anon-s"))
        .await
        .unwrap();
    // M into S by the e-mail (the wrong merge), then S into H by the phone.
    server
        .deliver(vec![identify(
            "anon-m",
            json!({"email": "sam@example.com"}),
            40,
        )])
        .await;
    server
        .deliver(vec![identify(
            "anon-h",
            json!({"phone": "+44 20 7946 0111"}),
            50,
        )])
        .await;
    let merges = list_merges(&server, "anon-h").await.merges;
    let inner = merges
        .iter()
        .find(|x| x.merged_id == m.profile_id)
        .expect("M's merge into S")
        .merge_id
        .clone();
    let outer = merges
        .iter()
        .find(|x| x.merged_id == s.profile_id)
        .expect("S's merge into H")
        .merge_id
        .clone();
    let mut client = server.client().await;
    for merge_id in [inner.clone(), outer.clone()] {
        client
            .unmerge(admin(UnmergeRequest { merge_id }))
            .await
            .unwrap();
    }
    // S is kept apart from M (the inner merge's pair, S's again) and from H (the outer).
    let on_s = list_merges(&server, "anon-s").await.do_not_merge;
    let pair_ids = |pairs: &[DoNotMerge]| -> Vec<String> {
        pairs.iter().map(|p| p.merge_id.clone()).collect()
    };
    assert_eq!(pair_ids(&on_s), [inner.clone(), outer.clone()]);
    assert_eq!(on_s[0].survivor_id, s.profile_id);
    let on_h = list_merges(&server, "anon-h").await.do_not_merge;
    assert_eq!(pair_ids(&on_h), [outer], "H holds no pair of M's");
    // The wrong merge's evidence again: S and M stay two people.
    server
        .deliver(vec![identify(
            "anon-m",
            json!({"email": "sam@example.com"}),
            60,
        )])
        .await;
    assert_eq!(
        get(&server, by_identity("anonymous_id", "anon-m"))
            .await
            .unwrap()
            .profile_id,
        m.profile_id
    );
    assert_eq!(
        get(&server, by_identity("email", "sam@example.com"))
            .await
            .unwrap()
            .profile_id,
        s.profile_id
    );
    server.stop().await;
}
waymark_testkit::on_both_backends!(a_pair_follows_the_inner_survivor_out_of_an_outer_merge);

/// Erasing either side removes the pair: it names the person and the identifiers that
/// linked them.
async fn an_erasure_removes_the_pair(backend: Backend) {
    let sink = Sink::default();
    let db = TestDb::new(backend).await;
    let server = TestProfile::start(config(&db.url, &sink.start().await, Some(&redis_url()))).await;
    let (_, visitor, merge_id) = wrongly_merged_then_unmerged(&server).await;
    assert_eq!(list_merges(&server, "anon-a").await.do_not_merge.len(), 1);
    let mut client = server.client().await;
    // What is held about the visitor includes the pair.
    let export = client
        .export_profile(admin(ExportProfileRequest {
            profile_id: visitor.profile_id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(export.do_not_merge.len(), 1);
    assert_eq!(export.do_not_merge[0].merge_id, merge_id);
    // The evidence was Kim's e-mail: the visitor's export does not show it, the operator's
    // ListMerges does.
    let kims = |evidence: &[waymark_proto::common::v1::Identity]| {
        evidence.iter().any(|i| i.value == "kim@example.com")
    };
    assert!(!kims(&export.do_not_merge[0].evidence));
    assert!(kims(
        &list_merges(&server, "anon-b").await.do_not_merge[0].evidence
    ));
    client
        .delete_profile(admin(DeleteProfileRequest {
            profile_id: visitor.profile_id.clone(),
            reason: "ticket 7".into(),
        }))
        .await
        .unwrap();
    assert!(list_merges(&server, "anon-a").await.do_not_merge.is_empty());
    let error = client
        .allow_merge(admin(AllowMergeRequest { merge_id }))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::NotFound);
    server.stop().await;
}
waymark_testkit::on_both_backends!(an_erasure_removes_the_pair);
