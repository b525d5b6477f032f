//! Integration tests of the profile service against real PostgreSQL, SQLite and Redis.

mod aggregates;
mod cx;
mod emitted;
mod limits;
mod privacy;
mod segments;
mod support;
mod unmerge;

use prost_types::value::Kind;
use serde_json::json;
use support::*;
use tonic::Code;
use waymark_proto::common::v1::event_sink_client::EventSinkClient;
use waymark_proto::common::v1::{Channel, DeliverRequest, Identity};
use waymark_proto::profile::v1::*;

fn trait_str(profile: &Profile, key: &str) -> Option<String> {
    match profile.traits.as_ref()?.fields.get(key)?.kind.as_ref()? {
        Kind::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

/// The profile's identifiers as `type:value`, sorted.
fn identities(profile: &Profile) -> Vec<String> {
    let mut all: Vec<String> = profile
        .identities
        .iter()
        .map(|i| format!("{}:{}", i.r#type, i.value))
        .collect();
    all.sort();
    all
}

fn by_identity(t: &str, v: &str) -> GetProfileRequest {
    GetProfileRequest {
        profile_id: String::new(),
        identity: Some(Identity {
            r#type: t.into(),
            value: v.into(),
        }),
    }
}

async fn get(server: &TestProfile, request: GetProfileRequest) -> Result<Profile, tonic::Status> {
    server
        .client()
        .await
        .get_profile(admin(request))
        .await
        .map(|r| r.into_inner().profile.unwrap())
}

/// Anonymous web visit, sign-up in the app, then a call to the contact centre, all through
/// the real ingestion service and its relay: one profile, one timeline, three channels.
async fn one_customer_across_web_app_and_contact_centre(backend: Backend) {
    let sink = Sink::default();
    let platform = Platform::start(backend, &sink.start().await, Some(&redis_url())).await;
    let profile = &platform.profile;
    let batch = json!({"batch": [
        {"type": "page", "anonymousId": "web-anon-1", "name": "Pricing", "context": {"userAgent": "Mozilla/5.0"}},
        {"type": "identify", "userId": "cust-42", "anonymousId": "app-install-9",
         "traits": {"email": "Ada@Example.com", "plan": "trial"}, "context": {"library": {"name": "analytics-ios"}}},
        {"type": "alias", "userId": "cust-42", "previousId": "web-anon-1"},
        {"type": "track", "anonymousId": "call-77", "event": "Call Started",
         "context": {"channel": "contact_center", "traits": {"email": "ada@example.com"}}}
    ]});
    assert_eq!(platform.post_batch(batch).await, 200);

    let customer = eventually("all four events on one profile", PATIENCE, async || {
        get(profile, by_identity("email", " ADA@example.com"))
            .await
            .ok()
            .filter(|p| p.computed.as_ref().is_some_and(|c| c.total_events == 4))
    })
    .await;
    for (t, v) in [
        ("anonymous_id", "web-anon-1"),
        ("user_id", "cust-42"),
        ("anonymous_id", "call-77"),
        ("phone", "none"),
    ] {
        let owner = get(profile, by_identity(t, v)).await;
        if t == "phone" {
            assert_eq!(
                owner.unwrap_err().code(),
                Code::InvalidArgument,
                "blocked values are refused"
            );
        } else {
            assert_eq!(owner.unwrap().profile_id, customer.profile_id, "{t} {v}");
        }
    }
    let timeline = profile
        .client()
        .await
        .get_timeline(admin(GetTimelineRequest {
            profile_id: customer.profile_id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .entries;
    let mut channels: Vec<i32> = timeline.iter().map(|e| e.channel).collect();
    channels.sort_unstable();
    channels.dedup();
    // The alias carries no context, so its channel is "other".
    assert_eq!(
        channels,
        [
            Channel::Web as i32,
            Channel::MobileApp as i32,
            Channel::ContactCenter as i32,
            Channel::Other as i32
        ],
        "the timeline holds every channel"
    );
    let only_calls = profile
        .client()
        .await
        .get_timeline(admin(GetTimelineRequest {
            profile_id: customer.profile_id.clone(),
            channels: vec![Channel::ContactCenter as i32],
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(only_calls.len(), 1);
    assert_eq!(only_calls[0].name, "Call Started");

    // Downstream: each of the four applied events, with its profile id.
    let applied = eventually("the four applied events downstream", PATIENCE, async || {
        let applied: std::collections::HashMap<_, _> = sink
            .received
            .lock()
            .await
            .iter()
            .filter(|e| e.source_id != "profile")
            .map(|e| (e.event_id.clone(), e.clone()))
            .collect();
        if applied.len() == 4 {
            Ok(applied)
        } else {
            Err(applied)
        }
    })
    .await;
    assert!(applied.values().all(|e| !e.profile_id.is_empty()));
    let call = applied
        .values()
        .find(|e| e.event == "Call Started")
        .unwrap();
    assert_eq!(call.profile_id, customer.profile_id);
    platform.stop().await;
}
waymark_testkit::on_both_backends!(one_customer_across_web_app_and_contact_centre);

async fn shared_email_merges_into_the_oldest_with_an_audit(backend: Backend) {
    let sink = Sink::default();
    let db = TestDb::new(backend).await;
    let server = TestProfile::start(config(&db.url, &sink.start().await, Some(&redis_url()))).await;
    // The oldest of all, joined in last: a store visit with a loyalty phone number.
    server
        .deliver(vec![
            EventBuilder::identify()
                .anonymous("pos-7")
                .traits(json!({"phone": "+44 20 7946 0000"}))
                .at(50)
                .build(),
        ])
        .await;
    let older = EventBuilder::identify()
        .anonymous("anon-a")
        .traits(json!({"email": "kim@example.com", "plan": "free"}))
        .at(100)
        .build();
    let newer = EventBuilder::identify()
        .anonymous("anon-b")
        .traits(json!({"phone": "+44 20 7946 0958"}))
        .at(200)
        .build();
    server.deliver(vec![older]).await;
    server.deliver(vec![newer]).await;
    let a = get(&server, by_identity("anonymous_id", "anon-a"))
        .await
        .unwrap();
    let b = get(&server, by_identity("anonymous_id", "anon-b"))
        .await
        .unwrap();
    assert_ne!(a.profile_id, b.profile_id);

    let link = EventBuilder::identify()
        .anonymous("anon-b")
        .traits(json!({"email": "KIM@example.com", "plan": "pro"}))
        .at(300)
        .build();
    let link_id = link.event_id.clone();
    server.deliver(vec![link]).await;
    let merged = get(
        &server,
        GetProfileRequest {
            profile_id: b.profile_id.clone(),
            identity: None,
        },
    )
    .await
    .unwrap();
    assert_eq!(
        merged.profile_id, a.profile_id,
        "the newer profile's id resolves to the survivor"
    );
    assert!(merged.version > a.version);
    assert_eq!(trait_str(&merged, "plan").as_deref(), Some("pro"));
    assert_eq!(merged.computed.as_ref().unwrap().total_events, 3);
    let phone_owner = get(&server, by_identity("phone", "+442079460958"))
        .await
        .unwrap();
    assert_eq!(phone_owner.profile_id, a.profile_id);

    let merges = server
        .client()
        .await
        .list_merges(admin(ListMergesRequest {
            profile_id: a.profile_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner()
        .merges;
    assert_eq!(merges.len(), 1);
    assert_eq!(
        (merges[0].survivor_id.as_str(), merges[0].merged_id.as_str()),
        (a.profile_id.as_str(), b.profile_id.as_str())
    );
    assert_eq!(merges[0].event_id, link_id);
    let evidence: Vec<_> = merges[0]
        .evidence
        .iter()
        .map(|i| (i.r#type.as_str(), i.value.as_str()))
        .collect();
    assert!(
        evidence.contains(&("email", "kim@example.com"))
            && evidence.contains(&("anonymous_id", "anon-b")),
        "{evidence:?}"
    );

    let timeline = server
        .client()
        .await
        .get_timeline(admin(GetTimelineRequest {
            profile_id: a.profile_id.clone(),
            page_size: 2,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(timeline.entries.len(), 2);
    let rest = server
        .client()
        .await
        .get_timeline(admin(GetTimelineRequest {
            profile_id: a.profile_id.clone(),
            page_token: timeline.next_page_token,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        rest.entries.len(),
        1,
        "the merged profile's timeline moved to the survivor"
    );

    sink.wait_for_event("Profile Merged", |e| {
        e.event == "Profile Merged" && e.profile_id == a.profile_id
    })
    .await;

    // The store's profile is the oldest: the survivor of the first merge merges into it,
    // and the history of both merges shows for it, asked by any of the three ids.
    let store = get(&server, by_identity("anonymous_id", "pos-7"))
        .await
        .unwrap();
    server
        .deliver(vec![
            EventBuilder::identify()
                .anonymous("pos-7")
                .traits(json!({"email": "kim@example.com"}))
                .at(400)
                .build(),
        ])
        .await;
    for id in [&store.profile_id, &a.profile_id, &b.profile_id] {
        let history = server
            .client()
            .await
            .list_merges(admin(ListMergesRequest {
                profile_id: id.clone(),
            }))
            .await
            .unwrap()
            .into_inner()
            .merges;
        let pairs: Vec<(&str, &str)> = history
            .iter()
            .map(|m| (m.survivor_id.as_str(), m.merged_id.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                (a.profile_id.as_str(), b.profile_id.as_str()),
                (store.profile_id.as_str(), a.profile_id.as_str())
            ],
            "asked by {id}"
        );
    }

    // The shared cache agrees: every identifier points at the survivor, and the merged
    // profiles' entries are tombstones that no read returns.
    let mut redis = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for (t, v) in [
        ("email", "kim@example.com"),
        ("anonymous_id", "anon-a"),
        ("anonymous_id", "anon-b"),
        ("phone", "+442079460958"),
    ] {
        let owner: Option<String> = redis::AsyncCommands::get(
            &mut redis,
            format!(
                "{}{}",
                server.cache_prefix,
                waymark_profile_cache::identity_key(
                    &waymark_profile::identity::IdentHasher::default(),
                    t,
                    v
                )
            ),
        )
        .await
        .unwrap();
        assert_eq!(owner.as_deref(), Some(store.profile_id.as_str()), "{t} {v}");
    }
    for merged in [&a.profile_id, &b.profile_id] {
        let payload: Option<Vec<u8>> = redis::AsyncCommands::hget(
            &mut redis,
            format!(
                "{}{}",
                server.cache_prefix,
                waymark_profile_cache::profile_key(merged)
            ),
            "p",
        )
        .await
        .unwrap();
        assert!(
            payload.is_none_or(|p| p.is_empty()),
            "{merged} is a tombstone"
        );
    }
    let live = get(&server, by_identity("email", "kim@example.com"))
        .await
        .unwrap();
    assert_eq!(live.profile_id, store.profile_id);
    assert_eq!(live.computed.unwrap().total_events, 5);
    server.stop().await;
}
waymark_testkit::on_both_backends!(shared_email_merges_into_the_oldest_with_an_audit);

async fn blocked_values_and_limits_prevent_wrong_merges(backend: Backend) {
    let sink = Sink::default();
    let db = TestDb::new(backend).await;
    let server = TestProfile::start(config(&db.url, &sink.start().await, None)).await;
    server
        .deliver(vec![
            EventBuilder::track("A")
                .user("u-1")
                .anonymous("undefined")
                .at(1)
                .build(),
        ])
        .await;
    server
        .deliver(vec![
            EventBuilder::track("B")
                .user("u-2")
                .anonymous("undefined")
                .at(2)
                .build(),
        ])
        .await;
    let one = get(&server, by_identity("user_id", "u-1")).await.unwrap();
    let two = get(&server, by_identity("user_id", "u-2")).await.unwrap();
    assert_ne!(
        one.profile_id, two.profile_id,
        "a blocked anonymous id links nobody"
    );
    // Nothing but blocked values: acknowledged, attributed to nobody, and said so.
    let nobody = server
        .deliver(vec![
            EventBuilder::track("Ghost")
                .user("null")
                .anonymous("00000000-0000-0000-0000-000000000000")
                .at(2)
                .build(),
        ])
        .await;
    assert_eq!((nobody.applied, nobody.unattributed), (0, 1));
    // Without an event id a redelivery could not be recognised, and an event nested past
    // prost's recursion limit cannot be decoded: each is rejected on its own, by position,
    // and the rest of the batch is applied.
    let mut anonymous = EventBuilder::track("X").user("u-3").at(2).build();
    anonymous.event_id.clear();
    let mut nested = json!("leaf");
    for _ in 0..60 {
        nested = json!({ "deeper": nested });
    }
    let too_deep = EventBuilder::track("Deep")
        .user("u-4")
        .properties(json!({ "p": nested }))
        .at(2)
        .build();
    // An identifier too long for the index would fail the whole batch's insert.
    let too_long = EventBuilder::track("Long")
        .user(&"x".repeat(3000))
        .at(2)
        .build();
    let response = EventSinkClient::connect(server.url())
        .await
        .unwrap()
        .deliver(admin(DeliverRequest {
            producer: "test".into(),
            events: vec![
                EventBuilder::track("Y").user("u-3").at(2).build(),
                anonymous,
                too_deep,
                too_long,
            ],
        }))
        .await
        .expect("a batch with bad events is still acknowledged")
        .into_inner();
    assert_eq!(response.applied, 1);
    let rejected: Vec<(u32, &str)> = response
        .rejected
        .iter()
        .map(|r| (r.index, r.field.as_str()))
        .collect();
    assert_eq!(
        rejected,
        [
            (1, "events[1].event_id"),
            (2, "events[2]"),
            (3, "events[3].userId")
        ]
    );
    assert!(
        response.rejected[1].reason.contains("does not decode"),
        "{}",
        response.rejected[1].reason
    );
    get(&server, by_identity("user_id", "u-3"))
        .await
        .expect("the valid event was applied");
    assert_eq!(
        get(&server, by_identity("user_id", "u-4"))
            .await
            .unwrap_err()
            .code(),
        tonic::Code::NotFound,
        "the undecodable event was not"
    );

    // A shared device would give one profile two user ids: the device id is left out.
    server
        .deliver(vec![
            EventBuilder::track("C")
                .user("u-1")
                .anonymous("shared-device")
                .at(3)
                .build(),
        ])
        .await;
    server
        .deliver(vec![
            EventBuilder::track("D")
                .user("u-2")
                .anonymous("shared-device")
                .at(4)
                .build(),
        ])
        .await;
    let one = get(&server, by_identity("user_id", "u-1")).await.unwrap();
    let two = get(&server, by_identity("user_id", "u-2")).await.unwrap();
    assert_ne!(one.profile_id, two.profile_id);
    assert_eq!(
        one.identities
            .iter()
            .filter(|i| i.r#type == "user_id")
            .count(),
        1
    );
    assert_eq!(
        two.computed.unwrap().total_events,
        2,
        "the event still lands on u-2"
    );
    let merges = server
        .client()
        .await
        .list_merges(admin(ListMergesRequest {
            profile_id: one.profile_id,
        }))
        .await
        .unwrap();
    assert!(merges.into_inner().merges.is_empty());

    // A family tablet: five people sign in with their e-mails and the tablet's anonymous
    // id joins them (e-mail allows five per profile). The sixth would break the limit, so
    // the least trustworthy identifier, the shared anonymous id, gives way: the sixth
    // person gets a profile of their own.
    for (i, name) in ["a", "b", "c", "d", "e", "f"].into_iter().enumerate() {
        server
            .deliver(vec![
                EventBuilder::identify()
                    .anonymous("family-tablet")
                    .traits(json!({"email": format!("{name}@family.io")}))
                    .at(10 + i as i64)
                    .build(),
            ])
            .await;
    }
    let shared = get(&server, by_identity("email", "a@family.io"))
        .await
        .unwrap();
    let emails = |p: &Profile| p.identities.iter().filter(|i| i.r#type == "email").count();
    assert_eq!(emails(&shared), 5);
    assert_eq!(
        get(&server, by_identity("anonymous_id", "family-tablet"))
            .await
            .unwrap()
            .profile_id,
        shared.profile_id
    );
    let sixth = get(&server, by_identity("email", "f@family.io"))
        .await
        .unwrap();
    assert_ne!(sixth.profile_id, shared.profile_id);
    assert_eq!(emails(&sixth), 1);
    assert_eq!(sixth.identities.len(), 1, "the tablet's id was left out");
    assert_eq!(sixth.computed.unwrap().total_events, 1);
    server.stop().await;
}
waymark_testkit::on_both_backends!(blocked_values_and_limits_prevent_wrong_merges);

/// Limits and priorities come from configuration, custom identifier types included.
async fn configured_limits_and_priorities_hold(backend: Backend) {
    let sink = Sink::default();
    let db = TestDb::new(backend).await;
    let mut settings = config(&db.url, &sink.start().await, None);
    settings.custom_identity_types = vec!["loyalty_id".into()];
    settings.identity_limits = [("loyalty_id".to_owned(), 1), ("email".to_owned(), 0)].into();
    // The loyalty card outranks everything: it wins over a user id when they conflict.
    settings.identity_priority = vec!["loyalty_id".into()];
    let server = TestProfile::start(settings).await;
    let card = |user: &str, card: &str, t: i64| {
        EventBuilder::identify()
            .user(user)
            .traits(json!({"loyalty_id": card}))
            .at(t)
            .build()
    };
    server.deliver(vec![card("u-1", "L-1", 1)]).await;
    server.deliver(vec![card("u-2", "L-2", 2)]).await;
    // u-1 shows L-2: joining would give one profile two cards and two user ids, so the
    // user id (now below the card) is left out and the event lands on L-2's profile.
    server.deliver(vec![card("u-1", "L-2", 3)]).await;
    let l2 = get(&server, by_identity("loyalty_id", "L-2"))
        .await
        .unwrap();
    let l1 = get(&server, by_identity("loyalty_id", "L-1"))
        .await
        .unwrap();
    assert_ne!(l1.profile_id, l2.profile_id);
    assert_eq!(l2.computed.unwrap().total_events, 2);
    assert_eq!(l1.computed.unwrap().total_events, 1);
    // E-mail is unlimited here: seven addresses on one profile.
    for i in 0..7 {
        server
            .deliver(vec![
                EventBuilder::identify()
                    .user("u-1")
                    .traits(json!({"email": format!("n{i}@x.io")}))
                    .at(10 + i)
                    .build(),
            ])
            .await;
    }
    let u1 = get(&server, by_identity("user_id", "u-1")).await.unwrap();
    assert_eq!(
        u1.identities.iter().filter(|i| i.r#type == "email").count(),
        7
    );
    server.stop().await;
}
waymark_testkit::on_both_backends!(configured_limits_and_priorities_hold);

async fn late_events_and_redelivery_change_nothing_they_should_not(backend: Backend) {
    let sink = Sink::default();
    let db = TestDb::new(backend).await;
    let server = TestProfile::start(config(&db.url, &sink.start().await, Some(&redis_url()))).await;
    let new_plan = EventBuilder::identify()
        .user("u-9")
        .traits(json!({"plan": "enterprise"}))
        .at(500)
        .build();
    let order = EventBuilder::track("Order Completed")
        .user("u-9")
        .properties(json!({"revenue": 120.5}))
        .at(400)
        .build();
    let batch = vec![new_plan, order];
    assert_eq!(server.deliver(batch.clone()).await.applied, 2);
    let again = server.deliver(batch).await;
    assert_eq!(
        (again.applied, again.duplicates),
        (0, 2),
        "a redelivered batch changes nothing"
    );
    let late = EventBuilder::identify()
        .user("u-9")
        .traits(json!({"plan": "trial", "city": "Lyon"}))
        .at(100)
        .build();
    server.deliver(vec![late]).await;
    let p = get(&server, by_identity("user_id", "u-9")).await.unwrap();
    assert_eq!(
        trait_str(&p, "plan").as_deref(),
        Some("enterprise"),
        "an older event never overwrites a newer trait"
    );
    assert_eq!(trait_str(&p, "city").as_deref(), Some("Lyon"));
    let c = p.computed.unwrap();
    assert_eq!((c.total_events, c.lifetime_value), (3, 120.5));
    assert_eq!(c.first_seen.unwrap().seconds, 100);
    assert_eq!(c.last_seen.unwrap().seconds, 500);
    server.stop().await;
}
waymark_testkit::on_both_backends!(late_events_and_redelivery_change_nothing_they_should_not);

async fn a_batch_partly_applied_before_applies_only_its_new_events(backend: Backend) {
    let sink = Sink::default();
    let db = TestDb::new(backend).await;
    let server = TestProfile::start(config(&db.url, &sink.start().await, Some(&redis_url()))).await;
    let viewed = EventBuilder::track("Viewed").user("u-5").at(100).build();
    assert_eq!(server.deliver(vec![viewed.clone()]).await.applied, 1);

    // A fresh replica does not look events up first; the timeline tells, and the batch is
    // resolved again without the one it already holds.
    let blocked = EventBuilder::track("Viewed")
        .user("anonymous")
        .at(150)
        .build();
    let order = EventBuilder::track("Order Completed")
        .user("u-5")
        .properties(json!({"revenue": 10.0}))
        .at(200)
        .build();
    let identify = EventBuilder::identify()
        .user("u-5")
        .traits(json!({"plan": "pro"}))
        .at(300)
        .build();
    let ids = [&viewed, &order, &identify].map(|e| e.event_id.clone());
    let outcome = server
        .deliver(vec![viewed.clone(), blocked, order, identify])
        .await;
    assert_eq!(
        (outcome.applied, outcome.duplicates, outcome.unattributed),
        (2, 1, 1),
        "{outcome:?}"
    );
    let p = get(&server, by_identity("user_id", "u-5")).await.unwrap();
    assert_eq!(trait_str(&p, "plan").as_deref(), Some("pro"));
    let c = p.computed.unwrap();
    assert_eq!((c.total_events, c.lifetime_value), (3, 10.0));
    assert_eq!(c.last_seen.unwrap().seconds, 300);

    // Downstream gets each applied event once per consumer (both relay to this sink): the
    // first delivery's event, then the batch's two new ones and its Trait Changed.
    sink.wait_for(8).await;
    // A marker behind them: a third copy of any would have arrived before it.
    let marker = EventBuilder::track("Marker").user("u-6").at(400).build();
    deliver_marker(&server, &sink, marker).await;
    let received = sink.received.lock().await.clone();
    for id in &ids {
        let copies = received.iter().filter(|e| &e.event_id == id).count();
        assert_eq!(copies, 2, "{id} emitted {copies} times");
    }
    server.stop().await;
}
waymark_testkit::on_both_backends!(a_batch_partly_applied_before_applies_only_its_new_events);

async fn trusted_updates_consent_and_errors(backend: Backend) {
    let sink = Sink::default();
    let db = TestDb::new(backend).await;
    let server = TestProfile::start(config(&db.url, &sink.start().await, Some(&redis_url()))).await;
    server
        .deliver(vec![
            EventBuilder::track("Unsubscribed")
                .user("u-5")
                .properties(json!({"channel": "email"}))
                .at(10)
                .build(),
        ])
        .await;
    let p = get(&server, by_identity("user_id", "u-5")).await.unwrap();
    assert_eq!(p.consents.len(), 1);
    assert!(!p.consents[0].granted);
    let mut client = server.client().await;
    let serde_json::Value::Object(stage) = json!({"journey_stage": "loyalty"}) else {
        unreachable!()
    };
    let updated = client
        .update_traits(admin(UpdateTraitsRequest {
            profile_id: p.profile_id.clone(),
            traits: Some(waymark_proto::json::struct_from_json(stage)),
            source: "analytics".into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .profile
        .unwrap();
    assert_eq!(
        trait_str(&updated, "journey_stage").as_deref(),
        Some("loyalty")
    );
    let consented = client
        .set_consent(admin(SetConsentRequest {
            profile_id: p.profile_id.clone(),
            channel: "SMS".into(),
            purpose: "marketing".into(),
            granted: true,
            source: "preference-centre".into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .profile
        .unwrap();
    assert_eq!(consented.consents.len(), 2);
    // Reads see the newest version at once (the cache never goes back).
    let read = get(
        &server,
        GetProfileRequest {
            profile_id: p.profile_id.clone(),
            identity: None,
        },
    )
    .await
    .unwrap();
    assert_eq!(read.version, consented.version);

    let err = client
        .set_consent(admin(SetConsentRequest {
            profile_id: p.profile_id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("channel"));
    // The limits ingestion applies hold for trusted updates too, and nothing is written.
    let err = client
        .set_consent(admin(SetConsentRequest {
            profile_id: p.profile_id.clone(),
            channel: "email".into(),
            purpose: "p".repeat(65),
            granted: true,
            source: "preference-centre".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("purpose"), "{}", err.message());
    let serde_json::Value::Object(long_email) =
        json!({"email": format!("{}@example.com", "a".repeat(300))})
    else {
        unreachable!()
    };
    let err = client
        .update_traits(admin(UpdateTraitsRequest {
            profile_id: p.profile_id.clone(),
            traits: Some(waymark_proto::json::struct_from_json(long_email)),
            source: "analytics".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("traits.email"), "{}", err.message());
    let serde_json::Value::Object(long_key) = json!({"prefs": {"k".repeat(300): true}}) else {
        unreachable!()
    };
    let err = client
        .update_traits(admin(UpdateTraitsRequest {
            profile_id: p.profile_id.clone(),
            traits: Some(waymark_proto::json::struct_from_json(long_key)),
            source: "analytics".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("traits.prefs"), "{}", err.message());
    let unchanged = get(&server, by_identity("user_id", "u-5")).await.unwrap();
    assert_eq!(unchanged.version, consented.version);
    let err = get(&server, GetProfileRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = get(
        &server,
        GetProfileRequest {
            profile_id: "nope".into(),
            identity: None,
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = client
        .get_profile(GetProfileRequest {
            profile_id: p.profile_id.clone(),
            identity: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    // Times at the ends of what a Timestamp can say are a range, not a crash.
    let extreme = |seconds: i64, nanos: i32| Some(prost_types::Timestamp { seconds, nanos });
    let page = client
        .get_timeline(admin(GetTimelineRequest {
            profile_id: p.profile_id.clone(),
            start_time: extreme(i64::MIN, -999_999_999),
            end_time: extreme(i64::MAX, 999_999_999),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(!page.entries.is_empty());
    sink.wait_for_event("Trait Changed", |e| {
        e.event == "Trait Changed" && e.profile_id == p.profile_id
    })
    .await;
    server.stop().await;
}
waymark_testkit::on_both_backends!(trusted_updates_consent_and_errors);

/// The cached version of a profile, straight from Redis.
async fn cached_version(redis_url: &str, prefix: &str, profile_id: &str) -> Option<u64> {
    let mut redis = redis::Client::open(redis_url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("HGET")
        .arg(format!(
            "{prefix}{}",
            waymark_profile_cache::profile_key(profile_id)
        ))
        .arg("v")
        .query_async(&mut redis)
        .await
        .unwrap()
}

/// Polls until Redis holds `version` of the profile (the cache reconnects on its own).
async fn wait_cached(redis_url: &str, prefix: &str, server: &TestProfile, id: &str, version: u64) {
    let what = format!("the cache to hold version {version} of {id}");
    eventually(&what, PATIENCE, async || {
        // Reads find Redis back (one attempt per reconnect pause) and refill it on a miss.
        let read = get(
            server,
            GetProfileRequest {
                profile_id: id.into(),
                identity: None,
            },
        )
        .await
        .unwrap();
        assert_eq!(read.version, version, "reads never go back");
        match cached_version(redis_url, prefix, id).await {
            Some(cached) if cached == version => Ok(()),
            cached => Err(cached),
        }
    })
    .await;
}

/// A network partition from Redis (which keeps its now stale keys): the service keeps
/// answering from the database, and once Redis is reachable the stale keys are dropped
/// before the cache is trusted again.
async fn redis_partition_falls_back_to_the_database_and_refills(backend: Backend) {
    let redis_addr: std::net::SocketAddr =
        redis_url().trim_start_matches("redis://").parse().unwrap();
    let proxy = Proxy::start(redis_addr).await;
    let sink = Sink::default();
    let db = TestDb::new(backend).await;
    let proxied = format!("redis://{}", proxy.addr);
    let config = config(&db.url, &sink.start().await, Some(&proxied));
    let prefix = config.profile_cache_key_prefix.clone();
    let server = TestProfile::start(config).await;
    server
        .deliver(vec![
            EventBuilder::identify()
                .user("r-1")
                .traits(json!({"tier": "gold"}))
                .at(1)
                .build(),
        ])
        .await;
    let p = get(&server, by_identity("user_id", "r-1")).await.unwrap();
    assert_eq!(
        cached_version(&redis_url(), &prefix, &p.profile_id).await,
        Some(p.version),
        "written to Redis after the commit"
    );

    proxy.cut();
    server
        .deliver(vec![
            EventBuilder::identify()
                .user("r-1")
                .traits(json!({"tier": "platinum"}))
                .at(2)
                .build(),
        ])
        .await;
    let during = get(&server, by_identity("user_id", "r-1")).await.unwrap();
    assert_eq!(
        trait_str(&during, "tier").as_deref(),
        Some("platinum"),
        "served from the database"
    );
    assert_eq!(
        cached_version(&redis_url(), &prefix, &p.profile_id).await,
        Some(p.version),
        "Redis still holds the old version"
    );

    proxy.restore();
    wait_cached(
        &redis_url(),
        &prefix,
        &server,
        &p.profile_id,
        during.version,
    )
    .await;
    server.stop().await;
}
waymark_testkit::on_both_backends!(redis_partition_falls_back_to_the_database_and_refills);

/// Redis stopped and started again mid-test (empty, its script cache too): the service
/// answers from the database meanwhile and fills the new Redis once it is back.
async fn redis_restart_is_survived_and_the_cache_refills(backend: Backend) {
    let mut redis = waymark_testkit::RedisServer::start().await;
    let sink = Sink::default();
    let db = TestDb::new(backend).await;
    let config = config(&db.url, &sink.start().await, Some(&redis.url()));
    let prefix = config.profile_cache_key_prefix.clone();
    let server = TestProfile::start(config).await;
    let identify = |tier: &str, at: i64| {
        EventBuilder::identify()
            .user("r-2")
            .traits(json!({"tier": tier}))
            .at(at)
            .build()
    };
    server.deliver(vec![identify("gold", 1)]).await;
    let before = get(&server, by_identity("user_id", "r-2")).await.unwrap();
    assert_eq!(
        cached_version(&redis.url(), &prefix, &before.profile_id).await,
        Some(before.version)
    );

    redis.stop();
    server.deliver(vec![identify("platinum", 2)]).await;
    let during = get(&server, by_identity("user_id", "r-2")).await.unwrap();
    assert_eq!(trait_str(&during, "tier").as_deref(), Some("platinum"));
    assert!(during.version > before.version);

    redis.restart().await;
    assert_eq!(
        cached_version(&redis.url(), &prefix, &before.profile_id).await,
        None,
        "the restarted Redis is empty"
    );
    wait_cached(
        &redis.url(),
        &prefix,
        &server,
        &before.profile_id,
        during.version,
    )
    .await;
    // Writes work again too: the script is loaded afresh in the same pipeline.
    server.deliver(vec![identify("diamond", 3)]).await;
    let after = get(&server, by_identity("user_id", "r-2")).await.unwrap();
    assert_eq!(trait_str(&after, "tier").as_deref(), Some("diamond"));
    assert_eq!(
        cached_version(&redis.url(), &prefix, &before.profile_id).await,
        Some(after.version)
    );
    server.stop().await;
}
waymark_testkit::on_both_backends!(redis_restart_is_survived_and_the_cache_refills);

/// The applier remembers the profiles it wrote; writes by another replica or by a trusted
/// update in between must be seen, never overwritten from that memory.
async fn replicas_and_trusted_updates_see_each_others_writes(backend: Backend) {
    let sink = Sink::default();
    let (a, b, _db) = two_replicas(backend, &sink.start().await).await;

    a.deliver(vec![
        EventBuilder::identify()
            .user("u-1")
            .anonymous("a-1")
            .at(10)
            .build(),
    ])
    .await;
    b.deliver(vec![
        EventBuilder::identify()
            .user("u-1")
            .traits(json!({"email": "e@x.io", "plan": "pro"}))
            .at(20)
            .build(),
    ])
    .await;
    // A remembers u-1's profile from before B's write.
    a.deliver(vec![
        EventBuilder::track("Clicked").user("u-1").at(25).build(),
    ])
    .await;
    let p = get(&a, by_identity("user_id", "u-1")).await.unwrap();
    assert_eq!(
        trait_str(&p, "plan").as_deref(),
        Some("pro"),
        "B's write kept"
    );
    let serde_json::Value::Object(stage) = json!({"journey_stage": "loyalty"}) else {
        unreachable!()
    };
    a.client()
        .await
        .update_traits(admin(UpdateTraitsRequest {
            profile_id: p.profile_id.clone(),
            traits: Some(waymark_proto::json::struct_from_json(stage)),
            source: "analytics".into(),
        }))
        .await
        .unwrap();
    // Only replica B wrote the e-mail: A must not take it for a new customer.
    let by_email = EventBuilder::track("Clicked")
        .anonymous("a-2")
        .context(json!({"traits": {"email": "e@x.io"}}))
        .at(30)
        .build();
    a.deliver(vec![by_email]).await;
    a.deliver(vec![
        EventBuilder::track("Clicked").user("u-1").at(40).build(),
    ])
    .await;

    let p = get(&b, by_identity("anonymous_id", "a-2")).await.unwrap();
    assert_eq!(
        get(&a, by_identity("email", "e@x.io"))
            .await
            .unwrap()
            .profile_id,
        p.profile_id,
        "one customer"
    );
    assert_eq!(trait_str(&p, "plan").as_deref(), Some("pro"));
    assert_eq!(trait_str(&p, "journey_stage").as_deref(), Some("loyalty"));
    assert_eq!(p.computed.as_ref().unwrap().total_events, 5);
    assert_eq!(
        identities(&p),
        [
            "anonymous_id:a-1",
            "anonymous_id:a-2",
            "email:e@x.io",
            "user_id:u-1"
        ]
    );
    a.stop().await;
    b.stop().await;
}
waymark_testkit::on_both_backends!(replicas_and_trusted_updates_see_each_others_writes);

/// Deliveries arriving at once: the same batch delivered twice at once (a relay retrying
/// while its first attempt is still running) still applies once, and every delivery is
/// told exactly what became of its events.
async fn concurrent_deliveries_apply_each_event_once(backend: Backend) {
    let sink = Sink::default();
    let db = TestDb::new(backend).await;
    let server = TestProfile::start(config(&db.url, &sink.start().await, Some(&redis_url()))).await;
    let batch = |b: usize| -> Vec<_> {
        (0..50)
            .map(|i| {
                EventBuilder::track(&format!("Step {b}"))
                    .user(&format!("c-{}", i % 10))
                    .at(i as i64)
                    .build()
            })
            .collect()
    };
    let mut batches: Vec<Vec<_>> = (0..7).map(batch).collect();
    batches.push(batches[0].clone());
    let deliveries = batches.into_iter().map(|events| server.deliver(events));
    let outcomes = futures::future::join_all(deliveries).await;
    let applied: u32 = outcomes.iter().map(|o| o.applied).sum();
    let duplicates: u32 = outcomes.iter().map(|o| o.duplicates).sum();
    assert_eq!((applied, duplicates), (350, 50), "{outcomes:?}");
    for o in &outcomes {
        assert_eq!(o.applied + o.duplicates, 50, "{o:?}");
    }
    for user in 0..10 {
        let p = get(&server, by_identity("user_id", &format!("c-{user}")))
            .await
            .unwrap();
        assert_eq!(p.computed.unwrap().total_events, 35, "c-{user}");
    }
    server.stop().await;
}
waymark_testkit::on_both_backends!(concurrent_deliveries_apply_each_event_once);

/// A relay whose lease ran out sends a batch again while the first attempt is still being
/// applied, and the two land on different replicas: the batch still applies once.
async fn one_batch_on_two_replicas_at_once_applies_once(backend: Backend) {
    let sink = Sink::default();
    let (a, b, _db) = two_replicas(backend, &sink.start().await).await;
    for round in 0..20 {
        let batch: Vec<_> = (0..50)
            .map(|i| {
                EventBuilder::track("Tick")
                    .user(&format!("r-{}", i % 5))
                    .at(round * 100 + i)
                    .build()
            })
            .collect();
        let (first, second) = tokio::join!(a.deliver(batch.clone()), b.deliver(batch));
        assert_eq!(first.applied + second.applied, 50, "round {round}");
        assert_eq!(first.duplicates + second.duplicates, 50, "round {round}");
    }
    for user in 0..5 {
        let p = get(&a, by_identity("user_id", &format!("r-{user}")))
            .await
            .unwrap();
        assert_eq!(p.computed.unwrap().total_events, 200, "r-{user}");
    }
    a.stop().await;
    b.stop().await;
}
waymark_testkit::on_both_backends!(one_batch_on_two_replicas_at_once_applies_once);

/// Batches resolved ahead build on batches still writing, on two replicas at once: four
/// batches per customer, delivered together, that only join into one profile through one
/// another. Whatever order they land in, and however often a batch built on a stale state
/// is resolved again, each customer ends as one profile holding every identifier and
/// event, and every event goes downstream once per consumer.
async fn merges_across_batches_in_flight_leave_one_exact_profile(backend: Backend) {
    let sink = Sink::default();
    let (a, b, _db) = two_replicas(backend, &sink.start().await).await;
    const EVENTS: usize = 10;
    let batch = |user: &str, anon: &str, email: &str, at: i64| -> Vec<_> {
        (0..EVENTS)
            .map(|i| {
                let traits = match email {
                    "" => json!({}),
                    _ => json!({"email": email}),
                };
                EventBuilder::identify()
                    .user(user)
                    .anonymous(anon)
                    .traits(traits)
                    .at(at + i as i64)
                    .build()
            })
            .collect()
    };
    let mut sent = Vec::new();
    for round in 0..8i64 {
        let (anon_0, anon_1) = (format!("w-{round}-0"), format!("w-{round}-1"));
        let (email, user) = (format!("c{round}@x.io"), format!("m-{round}"));
        let batches = [
            batch("", &anon_0, "", round * 100),
            batch("", &anon_1, &email, round * 100 + 20),
            batch("", &anon_0, &email, round * 100 + 40),
            batch(&user, &anon_1, "", round * 100 + 60),
        ];
        sent.extend(batches.iter().flatten().map(|e| e.event_id.clone()));
        let [first, second, third, fourth] = batches;
        let outcomes = tokio::join!(
            a.deliver(first),
            b.deliver(second),
            a.deliver(third),
            b.deliver(fourth)
        );
        let applied = [outcomes.0, outcomes.1, outcomes.2, outcomes.3].map(|o| o.applied);
        assert_eq!(applied, [EVENTS as u32; 4], "round {round}");
    }
    for round in 0..8 {
        let p = get(&a, by_identity("anonymous_id", &format!("w-{round}-0")))
            .await
            .unwrap();
        assert_eq!(
            identities(&p),
            [
                format!("anonymous_id:w-{round}-0"),
                format!("anonymous_id:w-{round}-1"),
                format!("email:c{round}@x.io"),
                format!("user_id:m-{round}"),
            ],
            "round {round}"
        );
        assert_eq!(
            p.computed.unwrap().total_events,
            4 * EVENTS as u64,
            "round {round}"
        );
        for (t, v) in [
            ("user_id", format!("m-{round}")),
            ("email", format!("c{round}@x.io")),
        ] {
            let other = get(&b, by_identity(t, &v)).await.unwrap();
            assert_eq!(other.profile_id, p.profile_id, "{t} {v}");
        }
    }
    // Both consumers relay to this sink: two copies of each event, never more. The sink
    // also gets the merge notices, so its count alone can reach twice the events sent
    // while some copies are still on their way.
    let received = eventually("two copies of every event sent", PATIENCE, async || {
        let received = sink.received.lock().await;
        let ids: std::collections::HashSet<&String> = sent.iter().collect();
        let arrived = received
            .iter()
            .filter(|e| ids.contains(&e.event_id))
            .count();
        if arrived >= 2 * sent.len() {
            Ok(received.clone())
        } else {
            Err(format!("{arrived} of {} copies", 2 * sent.len()))
        }
    })
    .await;
    for id in &sent {
        let copies = received.iter().filter(|e| &e.event_id == id).count();
        assert_eq!(copies, 2, "{id} emitted {copies} times");
    }
    a.stop().await;
    b.stop().await;
}
waymark_testkit::on_both_backends!(merges_across_batches_in_flight_leave_one_exact_profile);

/// Looking a profile up by a malformed identifier names the rule it breaks.
async fn identifier_errors_name_the_rule(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sink = Sink::default();
    let server = TestProfile::start(config(&db.url, &sink.start().await, None)).await;
    for (id_type, value, rule) in [
        ("phone", "020 7946 0958", "needs its country code"),
        ("phone", "+44 12", "has 4 digits"),
        ("email", "ada.example.com", "no @"),
        ("email", "ada@", "nothing comes after the @"),
        ("anonymous_id", "anonymous", "placeholder"),
    ] {
        let error = get(&server, by_identity(id_type, value)).await.unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument);
        let details =
            tonic_types::StatusExt::get_details_bad_request(&error).expect("field violations");
        assert_eq!(details.field_violations[0].field, "identity.value");
        assert!(
            details.field_violations[0].description.contains(rule),
            "{value}: {}",
            details.field_violations[0].description
        );
    }
    server.stop().await;
}
waymark_testkit::on_both_backends!(identifier_errors_name_the_rule);
