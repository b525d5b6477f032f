//! What the profile service sends downstream names the customer the same way in every
//! event: the live profile id and, once the profile has one, its user id.

use serde_json::json;
use waymark_proto::common::v1::Event;
use waymark_proto::profile::v1::{ListMergesRequest, UnmergeRequest, UpdateTraitsRequest};

use super::support::*;
use super::{by_identity, get};

fn changes_key(event: &Event, key: &str) -> bool {
    event
        .properties
        .as_ref()
        .and_then(|p| p.fields.get("changes"))
        .and_then(|c| match &c.kind {
            Some(prost_types::value::Kind::StructValue(s)) => Some(s.fields.contains_key(key)),
            _ => None,
        })
        .unwrap_or(false)
}

async fn every_emitted_event_names_the_profile_and_its_user(backend: Backend) {
    let sink = Sink::default();
    let db = TestDb::new(backend).await;
    let server = TestProfile::start(config(&db.url, &sink.start().await, Some(&redis_url()))).await;
    server.put_segment("pros", r#"traits.plan == "pro""#).await;

    // An anonymous visit, before the profile has a user id.
    let visit = EventBuilder::track("Page Viewed")
        .anonymous("anon-v")
        .at(10)
        .build();
    let visit_id = visit.event_id.clone();
    server.deliver(vec![visit]).await;
    let identify = EventBuilder::identify()
        .user("u-7")
        .anonymous("anon-v")
        .traits(json!({"email": "v@example.com", "plan": "pro"}))
        .at(20)
        .build();
    server.deliver(vec![identify]).await;
    let customer = get(&server, by_identity("user_id", "u-7")).await.unwrap();
    let p = customer.profile_id.as_str();

    // Later events from the browser carry only the anonymous id.
    let cart = EventBuilder::track("Cart Viewed")
        .anonymous("anon-v")
        .at(30)
        .build();
    let cart_id = cart.event_id.clone();
    let csat = EventBuilder::track("CSAT Submitted")
        .anonymous("anon-v")
        .properties(json!({"csat": 1}))
        .at(40)
        .build();
    server.deliver(vec![cart, csat]).await;
    // A second device, anonymous until it gives the same e-mail: a merge.
    server
        .deliver(vec![
            EventBuilder::track("App Opened")
                .anonymous("anon-w")
                .at(50)
                .build(),
        ])
        .await;
    server
        .deliver(vec![
            EventBuilder::identify()
                .anonymous("anon-w")
                .traits(json!({"email": "v@example.com"}))
                .at(60)
                .build(),
        ])
        .await;
    let mut client = server.client().await;
    let serde_json::Value::Object(tier) = json!({"tier": "gold"}) else {
        unreachable!()
    };
    client
        .update_traits(admin(UpdateTraitsRequest {
            profile_id: p.to_owned(),
            traits: Some(waymark_proto::json::struct_from_json(tier)),
            source: "crm".into(),
        }))
        .await
        .unwrap();
    let merges = client
        .list_merges(admin(ListMergesRequest {
            profile_id: p.to_owned(),
        }))
        .await
        .unwrap()
        .into_inner()
        .merges;
    assert_eq!(merges.len(), 1);
    client
        .unmerge(admin(UnmergeRequest {
            merge_id: merges[0].merge_id.clone(),
        }))
        .await
        .unwrap();

    let names_the_customer = |name: &str, found: Event| {
        assert_eq!(
            (found.profile_id.as_str(), found.user_id.as_str()),
            (p, "u-7"),
            "{name} names the customer"
        );
    };
    for name in [
        "Segment Entered",
        "Emotion Changed",
        "Profile Merged",
        "Profile Unmerged",
    ] {
        let found = sink.wait_for_event(name, |e| e.event == name).await;
        names_the_customer(name, found);
    }
    let found = sink
        .wait_for_event("Cart Viewed", |e| e.event_id == cart_id)
        .await;
    names_the_customer("Cart Viewed", found);
    for key in ["plan", "tier"] {
        let found = sink
            .wait_for_event("Trait Changed", |e| {
                e.event == "Trait Changed" && changes_key(e, key)
            })
            .await;
        names_the_customer("Trait Changed", found);
    }
    let visit = sink
        .wait_for_event("Page Viewed", |e| e.event_id == visit_id)
        .await;
    assert_eq!(
        (visit.profile_id.as_str(), visit.user_id.as_str()),
        (p, ""),
        "an event applied before the profile had a user id goes out without one"
    );
    let opened = sink
        .wait_for_event("App Opened", |e| e.event == "App Opened")
        .await;
    assert!(!opened.profile_id.is_empty() && opened.profile_id != p);
    assert_eq!(opened.user_id, "", "the second device was anonymous then");
    server.stop().await;
}
waymark_testkit::on_both_backends!(every_emitted_event_names_the_profile_and_its_user);
