//! Bounded profiles: identifier types that keep their most recent identifiers, and the
//! caps on event names, trait keys and consent decisions.

use serde_json::json;
use waymark_profile::model::{MAX_CONSENTS, MAX_EVENT_NAMES, MAX_TRAIT_KEYS, OTHER_EVENTS};
use waymark_proto::common::v1::Event;
use waymark_proto::profile::v1::*;

use crate::support::*;
use crate::{by_identity, get};

/// The anonymous ids the profile holds, oldest use first.
fn anonymous_ids(profile: &Profile) -> Vec<String> {
    profile
        .identities
        .iter()
        .filter(|i| i.r#type == "anonymous_id")
        .map(|i| i.value.clone())
        .collect()
}

fn call(n: usize, at: i64) -> Event {
    EventBuilder::track("Call Started")
        .user("caller-1")
        .anonymous(&format!("call-{n}"))
        .at(at)
        .build()
}

/// A contact centre mints an anonymous id per call: the profile keeps the 25 it used
/// most recently, a given-up id resolves to nobody (database and cache alike), and an
/// event carrying it alone starts a profile of its own.
async fn anonymous_ids_keep_the_most_recent(backend: Backend) {
    let sink = Sink::default();
    let db = TestDb::new(backend).await;
    let server = TestProfile::start(config(&db.url, &sink.start().await, Some(&redis_url()))).await;
    // 25 calls, the limit, in two batches.
    server
        .deliver((0..20).map(|n| call(n, n as i64)).collect())
        .await;
    server
        .deliver((20..25).map(|n| call(n, n as i64)).collect())
        .await;
    let full = get(&server, by_identity("user_id", "caller-1"))
        .await
        .unwrap();
    assert_eq!(anonymous_ids(&full).len(), 25);
    // Resolved through the cache before it is given up.
    assert_eq!(
        get(&server, by_identity("anonymous_id", "call-3"))
            .await
            .unwrap()
            .profile_id,
        full.profile_id
    );
    // call-0 comes back: used again, it is the most recent now.
    server.deliver(vec![call(0, 100)]).await;
    // Five new calls, one batch: call-1 to call-5 are given up.
    server
        .deliver((25..30).map(|n| call(n, 100 + n as i64)).collect())
        .await;
    let p = get(&server, by_identity("user_id", "caller-1"))
        .await
        .unwrap();
    let mut expected: Vec<String> = (6..25).map(|n| format!("call-{n}")).collect();
    expected.push("call-0".into());
    expected.extend((25..30).map(|n| format!("call-{n}")));
    assert_eq!(anonymous_ids(&p), expected);
    assert_eq!(p.computed.as_ref().unwrap().total_events, 31);
    for gone in 1..=5 {
        let error = get(
            &server,
            by_identity("anonymous_id", &format!("call-{gone}")),
        )
        .await
        .unwrap_err();
        assert_eq!(error.code(), tonic::Code::NotFound, "call-{gone}");
    }
    for kept in ["call-0", "call-6", "call-29"] {
        let found = get(&server, by_identity("anonymous_id", kept))
            .await
            .unwrap();
        assert_eq!(found.profile_id, p.profile_id, "{kept}");
    }
    // A given-up id alone is a stranger now.
    server
        .deliver(vec![
            EventBuilder::page("Pricing")
                .anonymous("call-3")
                .at(200)
                .build(),
        ])
        .await;
    let stranger = get(&server, by_identity("anonymous_id", "call-3"))
        .await
        .unwrap();
    assert_ne!(stranger.profile_id, p.profile_id);
    assert_eq!(stranger.computed.unwrap().total_events, 1);
    let p = get(&server, by_identity("user_id", "caller-1"))
        .await
        .unwrap();
    assert_eq!(
        p.computed.unwrap().total_events,
        31,
        "nothing more landed on it"
    );
    server.stop().await;
}
waymark_testkit::on_both_backends!(anonymous_ids_keep_the_most_recent);

/// Device ids keep the most recent too, with the limit from configuration; a type that
/// refuses (user_id) is untouched by it.
async fn device_ids_keep_the_most_recent_within_the_configured_limit(backend: Backend) {
    let sink = Sink::default();
    let db = TestDb::new(backend).await;
    let mut settings = config(&db.url, &sink.start().await, None);
    settings.identity_limits = [("device_id".to_owned(), 2)].into();
    let server = TestProfile::start(settings).await;
    let on_device = |device: &str, at: i64| {
        EventBuilder::track("App Opened")
            .user("owner-1")
            .context(json!({"device": {"id": device}}))
            .at(at)
            .build()
    };
    for (n, device) in ["phone-a", "tablet-b", "watch-c"].into_iter().enumerate() {
        server.deliver(vec![on_device(device, n as i64)]).await;
    }
    let p = get(&server, by_identity("user_id", "owner-1"))
        .await
        .unwrap();
    let devices: Vec<&str> = p
        .identities
        .iter()
        .filter(|i| i.r#type == "device_id")
        .map(|i| i.value.as_str())
        .collect();
    assert_eq!(devices, ["tablet-b", "watch-c"]);
    assert_eq!(
        get(&server, by_identity("device_id", "phone-a"))
            .await
            .unwrap_err()
            .code(),
        tonic::Code::NotFound
    );
    assert_eq!(p.computed.unwrap().total_events, 3);
    server.stop().await;
}
waymark_testkit::on_both_backends!(device_ids_keep_the_most_recent_within_the_configured_limit);

/// Event names beyond the cap are counted under `(other)`; trait keys beyond it are
/// ignored while the keys held keep updating; a consent decision beyond it takes the
/// place of the oldest grant.
async fn event_names_trait_keys_and_consents_are_capped(backend: Backend) {
    let sink = Sink::default();
    let db = TestDb::new(backend).await;
    let server = TestProfile::start(config(&db.url, &sink.start().await, Some(&redis_url()))).await;
    let extra = 10;
    let names = (0..MAX_EVENT_NAMES + extra)
        .map(|n| {
            EventBuilder::track(&format!("Step {n:03}"))
                .user("busy-1")
                .at(n as i64)
                .build()
        })
        .collect();
    server.deliver(names).await;
    let step_0 = EventBuilder::track("Step 000")
        .user("busy-1")
        .at(5000)
        .build();
    server.deliver(vec![step_0]).await;
    let p = get(&server, by_identity("user_id", "busy-1"))
        .await
        .unwrap();
    let computed = p.computed.as_ref().unwrap();
    assert_eq!(computed.event_counts.len(), MAX_EVENT_NAMES + 1);
    assert_eq!(computed.event_counts[OTHER_EVENTS], extra as u64);
    assert_eq!(
        computed.event_counts["Step 000"], 2,
        "a held name still counts"
    );
    assert_eq!(computed.total_events, (MAX_EVENT_NAMES + extra + 1) as u64);

    let mut many = serde_json::Map::new();
    for n in 0..MAX_TRAIT_KEYS + extra {
        many.insert(format!("k{n:03}"), json!(n));
    }
    server
        .deliver(vec![
            EventBuilder::identify()
                .user("busy-1")
                .traits(serde_json::Value::Object(many))
                .at(6000)
                .build(),
        ])
        .await;
    server
        .deliver(vec![
            EventBuilder::identify()
                .user("busy-1")
                .traits(json!({"k000": "updated", "brand_new": true}))
                .at(6001)
                .build(),
        ])
        .await;
    let p = get(&server, by_identity("user_id", "busy-1"))
        .await
        .unwrap();
    let traits = &p.traits.as_ref().unwrap().fields;
    assert_eq!(traits.len(), MAX_TRAIT_KEYS);
    assert_eq!(p.trait_times.len(), MAX_TRAIT_KEYS);
    assert!(!traits.contains_key("brand_new") && !traits.contains_key("k265"));
    assert_eq!(
        traits["k000"].kind,
        Some(prost_types::value::Kind::StringValue("updated".into()))
    );

    let consent = |name: &str, channel: &str, at: i64| {
        EventBuilder::track(name)
            .user("busy-1")
            .properties(json!({ "channel": channel }))
            .at(at)
            .build()
    };
    // One denial, then grants up to the cap.
    let mut decisions = vec![consent("Unsubscribed", "fax", 7000)];
    decisions.extend(
        (1..MAX_CONSENTS).map(|n| consent("Subscribed", &format!("c{n}"), 7000 + n as i64)),
    );
    server.deliver(decisions).await;
    // A new denial at the cap replaces the oldest grant (c1), never a denial.
    server
        .deliver(vec![consent("Unsubscribed", "pigeon", 8000)])
        .await;
    let p = get(&server, by_identity("user_id", "busy-1"))
        .await
        .unwrap();
    let held = |channel: &str| p.consents.iter().find(|c| c.channel == channel);
    assert_eq!(p.consents.len(), MAX_CONSENTS);
    assert!(held("c1").is_none(), "the oldest grant made room");
    assert!(!held("pigeon").unwrap().granted);
    assert!(!held("fax").unwrap().granted, "a denial is never displaced");
    assert!(held("c2").unwrap().granted);
    server.stop().await;
}
waymark_testkit::on_both_backends!(event_names_trait_keys_and_consents_are_capped);
