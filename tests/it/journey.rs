//! One customer across channels: browsing the website anonymously, signing up in the app,
//! calling the contact centre, then complaining by e-mail.

use std::collections::BTreeSet;

use serde_json::json;
use waymark_proto::common::v1::Channel;
use waymark_proto::json::string_at;
use waymark_proto::profile::v1::{
    EmotionLabel, GetSegmentRequest, GetTimelineRequest, ListMergesRequest,
    ListSegmentMembersRequest,
};
use waymark_testkit::{Backend, admin};

use crate::*;

const SEGMENT: &str = "upset-customers";

async fn a_journey_across_channels_becomes_one_upset_customer(backend: Backend) {
    let (platform, sink) = boot(backend).await;
    // Defined before any event: membership follows the events as they arrive.
    platform
        .profile
        .put_segment(SEGMENT, r#"emotion.label == "upset""#)
        .await;

    // Each channel's system sends its own events, in the order they happened.
    let web = json!({"library": {"name": "analytics.js"}, "userAgent": "Mozilla/5.0 (Macintosh)"});
    let app = json!({"library": {"name": "analytics-ios"}, "app": {"name": "Shop"}});
    send(
        &platform,
        json!([
            {"type": "page", "anonymousId": "web-7f3a", "name": "Pricing", "context": web},
            {"type": "page", "anonymousId": "web-7f3a", "name": "Returns Policy", "context": web},
        ]),
    )
    .await;
    send(
        &platform,
        json!([
            {"type": "identify", "userId": "cust-1001", "anonymousId": "app-9c1e",
             "traits": {"email": "Grace.Hopper@Example.com", "firstName": "Grace"}, "context": app},
            {"type": "track", "userId": "cust-1001", "event": "Signed Up", "context": app},
        ]),
    )
    .await;
    // She logs in on the website: the web visitor is her.
    send(
        &platform,
        json!([{"type": "alias", "userId": "cust-1001", "previousId": "web-7f3a", "context": web}]),
    )
    .await;
    // The contact centre knows the caller by the e-mail address she gives.
    send(
        &platform,
        json!([{"type": "track", "anonymousId": "call-55501", "event": "Call Started",
                "properties": {"queue": "billing"},
                "context": {"channel": "contact_center",
                            "traits": {"email": "grace.hopper@example.com"}}}]),
    )
    .await;
    send(
        &platform,
        json!([{"type": "track", "userId": "cust-1001", "event": "Complaint Filed",
                "properties": {"text": "I am furious. Charged twice: the worst, most useless service."},
                "context": {"channel": "email"}}]),
    )
    .await;
    // Another customer, happy, who must stay out of the segment.
    send(
        &platform,
        json!([{"type": "track", "userId": "cust-2002", "event": "Review Submitted",
                "properties": {"text": "Great service, fast delivery, love it"}, "context": web}]),
    )
    .await;

    let grace = profile_with_events(
        &platform,
        by_identity("email", "grace.hopper@example.com"),
        7,
    )
    .await;
    let happy = profile_with_events(&platform, by_identity("user_id", "cust-2002"), 1).await;
    assert_ne!(happy.profile_id, grace.profile_id);
    assert_eq!(
        happy.emotion.as_ref().map(|e| e.label()),
        Some(EmotionLabel::Delighted)
    );

    // One profile, whichever identifier (or merged-away id) asks for it.
    let mut client = platform.profile.client().await;
    let merges = client
        .list_merges(admin(ListMergesRequest {
            profile_id: grace.profile_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner()
        .merges;
    assert_eq!(
        merges.len(),
        1,
        "the app profile merged into the web visitor's"
    );
    assert_eq!(merges[0].survivor_id, grace.profile_id);
    let mut requests = vec![by_id(&merges[0].merged_id)];
    for (t, v) in [
        ("user_id", "cust-1001"),
        ("anonymous_id", "web-7f3a"),
        ("anonymous_id", "app-9c1e"),
        ("anonymous_id", "call-55501"),
        ("email", "Grace.Hopper@Example.com"),
    ] {
        requests.push(by_identity(t, v));
    }
    for request in requests {
        let found = get_profile(&platform, request.clone()).await.unwrap();
        assert_eq!(found.profile_id, grace.profile_id, "{request:?}");
    }

    // The timeline holds every interaction on every channel.
    let timeline = client
        .get_timeline(admin(GetTimelineRequest {
            profile_id: grace.profile_id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .entries;
    let mut entries: Vec<(String, Channel)> = timeline
        .iter()
        .map(|e| (e.name.clone(), e.channel()))
        .collect();
    entries.sort();
    assert_eq!(
        entries,
        [
            (String::new(), Channel::Web),       // the alias
            (String::new(), Channel::MobileApp), // the identify
            ("Call Started".into(), Channel::ContactCenter),
            ("Complaint Filed".into(), Channel::Email),
            ("Pricing".into(), Channel::Web),
            ("Returns Policy".into(), Channel::Web),
            ("Signed Up".into(), Channel::MobileApp),
        ]
    );
    let computed = grace.computed.as_ref().unwrap();
    let channels: BTreeSet<Channel> = computed.channels().collect();
    assert_eq!(
        channels,
        BTreeSet::from([
            Channel::Web,
            Channel::MobileApp,
            Channel::Email,
            Channel::ContactCenter
        ])
    );

    // The complaint made her upset, and that put her in the segment.
    let emotion = grace.emotion.as_ref().expect("an emotion");
    assert_eq!(emotion.label(), EmotionLabel::Upset);
    assert!(emotion.score < -0.6, "score {}", emotion.score);
    assert_eq!(
        emotion.last_signal.as_ref().unwrap().event_name,
        "Complaint Filed"
    );
    assert_eq!(grace.segments, [SEGMENT]);
    let members = client
        .list_segment_members(admin(ListSegmentMembersRequest {
            segment_id: SEGMENT.into(),
            page_size: 100,
            page_token: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(members.profile_ids, [grace.profile_id.as_str()]);
    let segment = client
        .get_segment(admin(GetSegmentRequest {
            segment_id: SEGMENT.into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .segment
        .unwrap();
    assert_eq!(segment.member_count, 1);

    // Downstream services hear about it.
    eventually("Segment Entered at the consumer", PATIENCE, async || {
        let received = sink.received.lock().await;
        received
            .iter()
            .any(|e| {
                e.event == "Segment Entered"
                    && e.profile_id == grace.profile_id
                    && e.properties
                        .as_ref()
                        .and_then(|p| string_at(p, &["segment_id"]))
                        == Some(SEGMENT)
            })
            .then_some(())
    })
    .await;
    platform.stop().await;
}
waymark_testkit::on_both_backends!(a_journey_across_channels_becomes_one_upset_customer);
