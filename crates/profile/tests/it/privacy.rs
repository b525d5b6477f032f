//! The right to be forgotten and the right of access, through the real ingestion service.

use serde_json::json;
use tonic::Code;
use waymark_proto::ingest::v1::GetStatsRequest;
use waymark_proto::profile::v1::*;

use crate::support::*;
use crate::{by_identity, get, redis_url};

async fn wait_for_events(platform: &Platform, email: &str, events: u64) -> Profile {
    let what = format!("{events} events on the profile of {email}");
    eventually(&what, PATIENCE, async || {
        get(&platform.profile, by_identity("email", email))
            .await
            .ok()
            .filter(|p| {
                p.computed
                    .as_ref()
                    .is_some_and(|c| c.total_events == events)
            })
    })
    .await
}

/// Export everything, erase, and make sure nothing comes back: not through ingestion
/// (suppressed there once pushed) and not through events already in flight.
async fn erased_profiles_stay_erased(backend: Backend) {
    let sink = Sink::default();
    let platform = Platform::start(backend, &sink.start().await, Some(&redis_url())).await;
    // A web visit and an order as two profiles, then the identify that merges them.
    for (batch, identity) in [
        (
            json!({"type": "page", "anonymousId": "gdpr-anon", "name": "Home"}),
            ("anonymous_id", "gdpr-anon"),
        ),
        (
            json!({"type": "track", "userId": "gdpr-1", "event": "Order Completed",
                   "properties": {"revenue": 12.5}}),
            ("user_id", "gdpr-1"),
        ),
    ] {
        assert_eq!(platform.post_batch(json!({ "batch": [batch] })).await, 200);
        let what = format!("{identity:?} to reach the profile service");
        eventually(&what, PATIENCE, async || {
            get(&platform.profile, by_identity(identity.0, identity.1)).await
        })
        .await;
    }
    let visitor = get(&platform.profile, by_identity("anonymous_id", "gdpr-anon"))
        .await
        .unwrap();
    let status = platform
        .post_batch(json!({"batch": [
            {"type": "identify", "userId": "gdpr-1", "anonymousId": "gdpr-anon",
             "traits": {"email": "Forget@Me.io", "name": "Robin", "loyalty_id": "L-9"}}
        ]}))
        .await;
    assert_eq!(status, 200);
    let before = wait_for_events(&platform, "forget@me.io", 3).await;
    let mut client = platform.profile.client().await;

    let export = client
        .export_profile(admin(ExportProfileRequest {
            profile_id: before.profile_id.clone(),
            ..ExportProfileRequest::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        export.profile.as_ref().unwrap().profile_id,
        before.profile_id
    );
    assert_eq!(
        export.timeline.len(),
        3,
        "the export holds the whole timeline"
    );
    assert_eq!(export.merges.len(), 1, "and the merge audit");
    assert!(export.next_page_token.is_empty(), "on one page");

    let deleted = client
        .delete_profile(admin(DeleteProfileRequest {
            profile_id: before.profile_id.clone(),
            reason: "ticket 17".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.profile_id, before.profile_id);
    assert_eq!(deleted.timeline_entries, 3);
    let mut suppressed: Vec<(String, String)> = deleted
        .suppressed
        .iter()
        .map(|i| (i.r#type.clone(), i.value.clone()))
        .collect();
    suppressed.sort();
    assert_eq!(
        suppressed,
        [
            ("anonymous_id".to_owned(), "gdpr-anon".to_owned()),
            ("email".to_owned(), "forget@me.io".to_owned()),
            ("loyalty_id".to_owned(), "L-9".to_owned()),
            ("user_id".to_owned(), "gdpr-1".to_owned()),
        ]
    );

    for request in [
        GetProfileRequest {
            profile_id: before.profile_id.clone(),
            identity: None,
        },
        GetProfileRequest {
            profile_id: visitor.profile_id.clone(),
            identity: None,
        },
        by_identity("email", "forget@me.io"),
        by_identity("user_id", "gdpr-1"),
    ] {
        let error = get(&platform.profile, request).await.unwrap_err();
        assert_eq!(
            error.code(),
            Code::NotFound,
            "erased from cache and database"
        );
    }
    let timeline = client
        .get_timeline(admin(GetTimelineRequest {
            profile_id: before.profile_id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(timeline.code(), Code::NotFound);
    let mut redis = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let cached: Option<Vec<u8>> = redis::cmd("HGET")
        .arg(format!(
            "{}{}",
            platform.profile.cache_prefix,
            waymark_profile_cache::profile_key(&before.profile_id)
        ))
        .arg("p")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(
        cached.is_none_or(|bytes| bytes.is_empty()),
        "only a tombstone is left in Redis"
    );

    // An event committed by ingestion before the erasure reached it: dropped here.
    let in_flight = EventBuilder::track("Clicked").user("gdpr-1").at(50).build();
    let outcome = platform.profile.deliver(vec![in_flight]).await;
    assert_eq!((outcome.applied, outcome.suppressed), (0, 1));

    // Ingestion learns the suppressions from the profile service.
    let what = "every suppression to reach ingestion";
    eventually(what, PATIENCE, async || {
        let page = client
            .list_suppressions(admin(ListSuppressionsRequest::default()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(page.suppressions.len(), 4);
        page.suppressions.iter().all(|s| s.synced_to_ingest)
    })
    .await;
    let status = platform
        .post_batch(json!({"batch": [
            {"type": "identify", "anonymousId": "fresh-device", "traits": {"email": "forget@me.io"}},
            {"type": "identify", "anonymousId": "other-device", "traits": {"loyalty_id": "L-9"}}
        ]}))
        .await;
    assert_eq!(status, 200);
    let mut ingest = platform.ingest.clone();
    let stats = ingest
        .get_stats(admin(GetStatsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        stats.total.unwrap().suppressed,
        2,
        "dropped and counted at ingestion, custom identifier types too"
    );
    // A marker sent after them: once it has reached the profile service, so would have
    // anything ingestion let through before it.
    let marker = json!({"type": "track", "userId": "after-erasure", "event": "Marker"});
    assert_eq!(platform.post_batch(json!({ "batch": [marker] })).await, 200);
    let what = "the marker to reach the profile service";
    eventually(what, PATIENCE, async || {
        get(&platform.profile, by_identity("user_id", "after-erasure")).await
    })
    .await;
    let error = get(&platform.profile, by_identity("email", "forget@me.io"))
        .await
        .unwrap_err();
    assert_eq!(
        error.code(),
        Code::NotFound,
        "the person does not come back"
    );

    // Paging of the suppression list.
    let first = client
        .list_suppressions(admin(ListSuppressionsRequest {
            page_size: 2,
            page_token: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.suppressions.len(), 2);
    let rest = client
        .list_suppressions(admin(ListSuppressionsRequest {
            page_size: 2,
            page_token: first.next_page_token,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.suppressions.len(), 2);
    assert!(rest.next_page_token.is_empty());
    let bad = client
        .list_suppressions(admin(ListSuppressionsRequest {
            page_size: 2,
            page_token: "garbage".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);

    // Downstream services are told, without the identifiers.
    let notice = sink
        .wait_for_event("Profile Deleted", |e| e.event == "Profile Deleted")
        .await;
    assert_eq!(notice.profile_id, before.profile_id);
    assert!(notice.user_id.is_empty() && notice.anonymous_id.is_empty());

    let missing = client
        .delete_profile(admin(DeleteProfileRequest {
            profile_id: before.profile_id.clone(),
            reason: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    platform.stop().await;
}
waymark_testkit::on_both_backends!(erased_profiles_stay_erased);

/// An erasure through one replica holds on the other at its very next delivery, though
/// that one keeps the suppression list in memory.
async fn an_erasure_on_one_replica_holds_on_the_other(backend: Backend) {
    let sink = Sink::default();
    let (a, b, _db) = two_replicas(backend, &sink.start().await).await;
    let visit = |at: i64| {
        EventBuilder::track("Visited")
            .user("gone-1")
            .properties(serde_json::json!({}))
            .at(at)
            .build()
    };
    // B has loaded the (empty) list before the erasure.
    b.deliver(vec![visit(1)]).await;
    let p = crate::get(&a, crate::by_identity("user_id", "gone-1"))
        .await
        .unwrap();
    a.client()
        .await
        .delete_profile(admin(DeleteProfileRequest {
            profile_id: p.profile_id,
            reason: "customer request".into(),
        }))
        .await
        .unwrap();
    let after = b.deliver(vec![visit(2)]).await;
    assert_eq!((after.applied, after.suppressed), (0, 1));
    assert_eq!(
        crate::get(&b, crate::by_identity("user_id", "gone-1"))
            .await
            .unwrap_err()
            .code(),
        tonic::Code::NotFound
    );
    a.stop().await;
    b.stop().await;
}
waymark_testkit::on_both_backends!(an_erasure_on_one_replica_holds_on_the_other);

/// An erasure while Redis is unreachable, then a restart before Redis is back: the new
/// process knows from the database that the cached profile is stale, answers from the
/// database meanwhile, and writes the tombstone once Redis is back.
async fn an_erasure_while_redis_is_away_survives_a_restart(backend: Backend) {
    let redis_addr: std::net::SocketAddr =
        redis_url().trim_start_matches("redis://").parse().unwrap();
    let proxy = Proxy::start(redis_addr).await;
    let sink = Sink::default();
    let db = TestDb::new(backend).await;
    let config = config(
        &db.url,
        &sink.start().await,
        Some(&format!("redis://{}", proxy.addr)),
    );
    let prefix = config.profile_cache_key_prefix.clone();
    let server = TestProfile::start(config.clone()).await;
    server
        .deliver(vec![
            EventBuilder::identify()
                .user("gone-away")
                .traits(json!({"email": "away@example.org"}))
                .at(1)
                .build(),
        ])
        .await;
    let p = get(&server, by_identity("user_id", "gone-away"))
        .await
        .unwrap();
    assert_eq!(
        crate::cached_version(&redis_url(), &prefix, &p.profile_id).await,
        Some(p.version),
        "cached before the erasure"
    );

    proxy.cut();
    server
        .client()
        .await
        .delete_profile(admin(DeleteProfileRequest {
            profile_id: p.profile_id.clone(),
            reason: "customer request".into(),
        }))
        .await
        .unwrap();
    server.stop().await;
    assert_eq!(
        crate::cached_version(&redis_url(), &prefix, &p.profile_id).await,
        Some(p.version),
        "Redis still holds the erased profile"
    );

    let server = TestProfile::start(config).await;
    proxy.restore();
    let not_found = async |request: GetProfileRequest| {
        let error = get(&server, request.clone()).await.unwrap_err();
        assert_eq!(error.code(), Code::NotFound, "{request:?}");
    };
    let by_id = GetProfileRequest {
        profile_id: p.profile_id.clone(),
        identity: None,
    };
    not_found(by_id.clone()).await;
    not_found(by_identity("user_id", "gone-away")).await;
    let what = "the tombstone to reach Redis once it is back";
    eventually(what, PATIENCE, async || {
        let cached = crate::cached_version(&redis_url(), &prefix, &p.profile_id).await;
        if cached == Some(u64::MAX) {
            Ok(())
        } else {
            Err(cached)
        }
    })
    .await;
    not_found(by_id).await;
    not_found(by_identity("email", "away@example.org")).await;
    server.stop().await;
}
waymark_testkit::on_both_backends!(an_erasure_while_redis_is_away_survives_a_restart);

/// A browser two people used: the anonymous id of the erased one is not suppressed, since
/// the other person's events carried it too, and their later events with it still apply.
/// What the erased person held alone is suppressed.
async fn an_identifier_shared_with_another_person_is_not_suppressed(backend: Backend) {
    let sink = Sink::default();
    let db = TestDb::new(backend).await;
    let server = TestProfile::start(config(&db.url, &sink.start().await, None)).await;
    let visit = |user: &str, at: i64| {
        EventBuilder::track("Visited")
            .user(user)
            .anonymous("family-tablet")
            .at(at)
            .build()
    };
    server
        .deliver(vec![
            EventBuilder::identify()
                .user("alone-a")
                .anonymous("family-tablet")
                .traits(json!({"email": "a@example.org"}))
                .at(1)
                .build(),
            // One user id per profile: the tablet's id stays with A, B gets a profile.
            visit("other-b", 2),
        ])
        .await;
    let a = get(&server, by_identity("user_id", "alone-a"))
        .await
        .unwrap();
    let b = get(&server, by_identity("user_id", "other-b"))
        .await
        .unwrap();
    assert_ne!(a.profile_id, b.profile_id);
    assert_eq!(
        get(&server, by_identity("anonymous_id", "family-tablet"))
            .await
            .unwrap()
            .profile_id,
        a.profile_id
    );
    let deleted = server
        .client()
        .await
        .delete_profile(admin(DeleteProfileRequest {
            profile_id: a.profile_id.clone(),
            reason: "customer request".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    let mut suppressed: Vec<(String, String)> = deleted
        .suppressed
        .into_iter()
        .map(|i| (i.r#type, i.value))
        .collect();
    suppressed.sort();
    assert_eq!(
        suppressed,
        [
            ("email".to_owned(), "a@example.org".to_owned()),
            ("user_id".to_owned(), "alone-a".to_owned()),
        ]
    );

    let later = server.deliver(vec![visit("other-b", 3)]).await;
    assert_eq!((later.applied, later.suppressed), (1, 0));
    let b = get(&server, by_identity("user_id", "other-b"))
        .await
        .unwrap();
    assert_eq!(b.computed.unwrap().total_events, 2);
    let back = server
        .deliver(vec![
            EventBuilder::track("Visited").user("alone-a").at(4).build(),
        ])
        .await;
    assert_eq!((back.applied, back.suppressed), (0, 1));
    server.stop().await;
}
waymark_testkit::on_both_backends!(an_identifier_shared_with_another_person_is_not_suppressed);

/// A timeline larger than one gRPC message (16 MiB) is exported in pages that each fit,
/// and together hold every entry once, newest first; the profile comes with the first.
async fn an_export_larger_than_one_message_comes_in_pages(backend: Backend) {
    use prost::Message;
    let sink = Sink::default();
    let db = TestDb::new(backend).await;
    let server = TestProfile::start(config(&db.url, &sink.start().await, None)).await;
    const EVENTS: i64 = 600;
    let note = "n".repeat(32_000);
    for batch in (0..EVENTS).collect::<Vec<_>>().chunks(100) {
        let events = batch
            .iter()
            .map(|i| {
                EventBuilder::track("Note Taken")
                    .user("big-history")
                    .properties(json!({"note": note, "n": i}))
                    .at(1_000 + i)
                    .build()
            })
            .collect();
        server.deliver(events).await;
    }
    let p = get(&server, by_identity("user_id", "big-history"))
        .await
        .unwrap();
    let mut client = server.client().await;
    let mut pages = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .export_profile(admin(ExportProfileRequest {
                profile_id: p.profile_id.clone(),
                page_size: 0,
                page_token: page_token.clone(),
            }))
            .await
            .unwrap()
            .into_inner();
        assert!(page.encoded_len() < waymark_kit::grpc::MAX_MESSAGE_BYTES);
        page_token = page.next_page_token.clone();
        pages.push(page);
        if page_token.is_empty() {
            break;
        }
        assert!(pages.len() < 100, "the pages end");
    }
    let total: usize = pages.iter().map(|p| p.encoded_len()).sum();
    assert!(
        total > waymark_kit::grpc::MAX_MESSAGE_BYTES,
        "more than one message could hold: {total}"
    );
    assert!(pages[0].profile.is_some());
    assert!(pages[1..].iter().all(|p| p.profile.is_none()));
    let seconds: Vec<i64> = pages
        .iter()
        .flat_map(|p| &p.timeline)
        .map(|e| e.timestamp.as_ref().unwrap().seconds)
        .collect();
    let newest_first: Vec<i64> = (0..EVENTS).rev().map(|i| 1_000 + i).collect();
    assert_eq!(seconds, newest_first, "every entry once, newest first");

    let bad = client
        .export_profile(admin(ExportProfileRequest {
            profile_id: p.profile_id.clone(),
            page_size: 0,
            page_token: "not-a-token".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    server.stop().await;
}
waymark_testkit::on_both_backends!(an_export_larger_than_one_message_comes_in_pages);

/// Suppressions stored in clear by a release before hashing are replaced by their keyed
/// hashes when the service starts, keep when they were suppressed and synced, and still
/// drop the events that carry them.
async fn clear_suppressions_are_hashed_at_start_up(backend: Backend) {
    use sea_orm::ConnectionTrait;
    let sink = Sink::default();
    let db = TestDb::new(backend).await;
    let config = config(&db.url, &sink.start().await, None);
    let conn = waymark_kit::db::connect(&config.profile_database(), "profile", 1)
        .await
        .unwrap();
    waymark_profile::migrate(&conn).await.unwrap();
    conn.execute_unprepared(
        "INSERT INTO suppressions (id_type, id_value, suppressed_at, synced_at)
         VALUES ('email', 'old@example.org', 7000000, 7000001)",
    )
    .await
    .unwrap();
    let server = TestProfile::start(config).await;
    let page = server
        .client()
        .await
        .list_suppressions(admin(ListSuppressionsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let hash = waymark_profile::identity::IdentHasher::default().hash("email", "old@example.org");
    let listed: Vec<(String, String, i64, bool)> = page
        .suppressions
        .iter()
        .map(|s| {
            let identity = s.identity.clone().unwrap();
            (
                identity.r#type,
                identity.value,
                s.suppressed_at.unwrap().seconds,
                s.synced_to_ingest,
            )
        })
        .collect();
    assert_eq!(listed, [("email".to_owned(), hash, 7, true)]);
    let back = server
        .deliver(vec![
            EventBuilder::identify()
                .anonymous("old-anon")
                .traits(json!({"email": "Old@Example.org"}))
                .at(1)
                .build(),
        ])
        .await;
    assert_eq!((back.applied, back.suppressed), (0, 1));
    server.stop().await;
}
waymark_testkit::on_both_backends!(clear_suppressions_are_hashed_at_start_up);
