//! Journey maps (stages, standard times, stuck customers, dead ends), paths, journey
//! reports and CX metrics over synthetic customers with known histories.

use serde_json::json;
use waymark_proto::analytics::v1::*;
use waymark_proto::common::v1::{Channel, Event};

use crate::support::*;

/// A track event `secs_ago` seconds before now.
fn ago(profile: &str, name: &str, secs_ago: i64) -> Event {
    let now = waymark_kit::time::now_micros() / 1_000_000;
    track(profile, name, now - secs_ago - T0, json!({}))
}

fn retail() -> JourneyMap {
    JourneyMap {
        id: "retail".into(),
        name: "Retail".into(),
        stages: vec![
            stage("research", "Product Searched", "1d"),
            stage("select", "Product Viewed", "2d"),
            stage("convert", "Order Completed", ""),
            stage("own", "Order Delivered", "3d"),
        ],
        interactions: vec![Interaction {
            id: "support".into(),
            name: "Support ticket".into(),
            start: Some(matcher("Support Ticket Created", "")),
            end: Some(matcher("Support Ticket Resolved", "")),
            standard_time: "1d".into(),
        }],
        dead_ends: vec![matcher("Product Search No Results", "")],
        write_back: true,
    }
}

/// Five customers at known stages for known times.
fn histories() -> Vec<Event> {
    vec![
        ago("s1", "Product Searched", 10 * DAY),
        ago("s1", "Product Viewed", 7 * DAY),
        ago("s1", "Order Completed", 7 * DAY - HOUR),
        ago("s1", "Support Ticket Created", 6 * DAY),
        ago("s1", "Support Ticket Resolved", 4 * DAY),
        ago("s2", "Product Searched", 5 * DAY),
        ago("s2", "Support Ticket Created", 3 * DAY),
        ago("s3", "Product Searched", 3 * HOUR),
        ago("s3", "Support Ticket Created", 2 * HOUR),
        ago("s4", "Product Viewed", 3 * DAY),
        ago("s5", "Page Viewed", HOUR),
        ago("s5", "Product Search No Results", HOUR - MINUTE),
    ]
}

async fn stages_standard_times_and_dead_ends_are_reported(backend: Backend) {
    let rig = Rig::start(backend).await;
    let mut client = rig.server.client().await;
    client
        .put_journey_map(admin(PutJourneyMapRequest {
            map: Some(retail()),
        }))
        .await
        .expect("put map");
    rig.server.deliver(histories()).await;

    let listed = client
        .list_journey_maps(admin(ListJourneyMapsRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.maps, vec![retail()]);

    let stages = client
        .get_stage_distribution(admin(GetStageDistributionRequest {
            map_id: "retail".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    let counts: Vec<(&str, u64, u64)> = stages
        .stages
        .iter()
        .map(|s| (s.stage_id.as_str(), s.customers, s.stuck))
        .collect();
    assert_eq!(
        counts,
        vec![
            ("research", 2, 1),
            ("select", 1, 1),
            ("convert", 1, 0),
            ("own", 0, 0)
        ]
    );
    assert_eq!(stages.without_stage, 1);

    let sla = client
        .get_sla_breaches(admin(GetSlaBreachesRequest {
            map_id: "retail".into(),
            ..GetSlaBreachesRequest::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let reports: Vec<(&str, u64, u64, u64)> = sla
        .stages
        .iter()
        .map(|r| {
            let done = r.completed.as_ref().unwrap().count;
            (r.id.as_str(), done, r.breached, r.open_past_standard)
        })
        .collect();
    // research: s1 took 3 days (breached), s2 is 5 days in; select: s1 took an hour, s4
    // is 3 days in; own has no visits.
    assert_eq!(
        reports,
        vec![("research", 1, 1, 1), ("select", 1, 0, 1), ("own", 0, 0, 0)]
    );
    assert_eq!(sla.stages[0].breach_percent, 100.0);
    let support = &sla.interactions[0];
    assert_eq!(
        (
            support.completed.as_ref().unwrap().count,
            support.breached,
            support.open_past_standard
        ),
        (1, 1, 1)
    );
    let stuck: Vec<(&str, &str)> = sla
        .stuck
        .iter()
        .map(|s| (s.profile_id.as_str(), s.stage_id.as_str()))
        .collect();
    assert_eq!(stuck, vec![("s2", "research"), ("s4", "select")]);
    assert!((sla.stuck[0].overdue_seconds - 4.0 * DAY as f64).abs() < 60.0);
    assert_eq!(sla.dead_ends.len(), 1);
    assert_eq!(
        (
            sla.dead_ends[0].event.as_str(),
            sla.dead_ends[0].sessions,
            sla.dead_ends[0].customers
        ),
        ("Product Search No Results", 1, 1)
    );
    assert_eq!(sla.sessions, 11);

    // Paths by stage over each customer's whole history: events entering no stage are
    // skipped, and s5, whose history starts outside any stage, has no path.
    let paths = client
        .get_paths(admin(GetPathsRequest {
            node_kind: PathNodeKind::Stage as i32,
            map_id: "retail".into(),
            session_gap: "30d".into(),
            ..GetPathsRequest::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let found = links(&paths);
    assert_eq!(
        found,
        vec![
            (1, "research", "(end)", 2),
            (1, "research", "select", 1),
            (1, "select", "(end)", 1),
            (2, "select", "convert", 1),
            (3, "convert", "(end)", 1),
        ]
    );
}
waymark_testkit::on_both_backends!(stages_standard_times_and_dead_ends_are_reported);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_map_names_every_field_at_fault() {
    let rig = Rig::start(Backend::Sqlite).await;
    let mut map = retail();
    map.id = "Retail Map".into();
    map.stages[1].id = "research".into();
    map.stages[2].entered_by[0].condition = "properties.total >".into();
    map.stages[3].standard_time = "3 days".into();
    map.interactions[0].end = None;
    let status = rig
        .server
        .client()
        .await
        .put_journey_map(admin(PutJourneyMapRequest { map: Some(map) }))
        .await
        .unwrap_err();
    let fields: Vec<String> = violations(&status).into_iter().map(|(f, _)| f).collect();
    assert_eq!(
        fields,
        vec![
            "map.id",
            "map.stages[1].id",
            "map.stages[2].entered_by[0].condition",
            "map.stages[3].standard_time",
            "map.interactions[0].end",
        ]
    );
    let missing = rig
        .server
        .client()
        .await
        .get_journey_map(admin(GetJourneyMapRequest {
            id: "retail".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
}

async fn paths_run_after_and_before_an_anchor(backend: Backend) {
    let rig = Rig::start(backend).await;
    let e = || json!({});
    rig.server
        .deliver(vec![
            track("q1", "Home", 0, e()),
            track("q1", "Search", 10, e()),
            track("q1", "Product", 20, e()),
            track("q1", "Cart", 30, e()),
            track("q1", "Order", 40, e()),
            track("q2", "Home", 0, e()),
            track("q2", "Search", 10, e()),
            track("q2", "Search", 15, e()),
            track("q2", "Product", 20, e()),
            track("q3", "Home", 0, e()),
            track("q3", "Product", 10, e()),
            track("q3", "Home", 2 * HOUR, e()),
        ])
        .await;
    let mut client = rig.server.client().await;
    let after = client
        .get_paths(admin(GetPathsRequest {
            anchor: Some(matcher("Home", "")),
            depth: 3,
            goal: Some(matcher("Order", "")),
            ..GetPathsRequest::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((after.paths, after.converted), (4, 1));
    let found = links(&after);
    assert_eq!(
        found,
        vec![
            (1, "(anchor)", "Search", 2),
            (1, "(anchor)", "(end)", 1),
            (1, "(anchor)", "Product", 1),
            (2, "Search", "Product", 2),
            (2, "Product", "(end)", 1),
            (3, "Product", "(end)", 1),
            (3, "Product", "Cart", 1),
            (4, "Cart", "(converted)", 1),
        ]
    );
    let mut drop_offs: Vec<(Vec<String>, u64)> = after
        .top_drop_off_paths
        .iter()
        .map(|p| (p.nodes.clone(), p.count))
        .collect();
    drop_offs.sort();
    assert_eq!(
        drop_offs,
        vec![
            (vec![], 1),
            (vec!["Product".to_owned()], 1),
            (vec!["Search".to_owned(), "Product".to_owned()], 1),
        ]
    );

    let before = client
        .get_paths(admin(GetPathsRequest {
            anchor: Some(matcher("Product", "")),
            direction: PathDirection::Before as i32,
            depth: 2,
            ..GetPathsRequest::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let found = links(&before);
    assert_eq!(
        found,
        vec![
            (1, "(anchor)", "Search", 2),
            (1, "(anchor)", "Home", 1),
            (2, "Search", "Home", 2),
            (2, "Home", "(end)", 1),
        ]
    );
}
waymark_testkit::on_both_backends!(paths_run_after_and_before_an_anchor);

/// A split of 40 control and 60 treatment enrollments converting 10 and 24 times, and a
/// split whose assignments are far from its weights.
async fn a_journey_report_reads_out_each_arm_against_control(backend: Backend) {
    let rig = Rig::start(backend).await;
    let weights = json!({"weights": {"control": 50, "treatment": 50}, "arms": ["control", "treatment"], "holdout_percent": 0});
    let mut events = Vec::new();
    let mut enroll = |journey: &str, i: usize, arm: &str, converts: bool| {
        let who = format!("{journey}-p{i}");
        let enrollment = format!("{journey}-e{i}");
        let at = i as i64;
        events.push(step(
            &who,
            journey,
            &enrollment,
            0,
            "split",
            "entered",
            "Signed Up",
            at,
            json!({}),
        ));
        events.push(step(
            &who,
            journey,
            &enrollment,
            1,
            "split",
            "arm",
            arm,
            at,
            weights.clone(),
        ));
        events.push(step(
            &who,
            journey,
            &enrollment,
            2,
            "msg",
            "sent",
            "a1",
            at + 1,
            json!({}),
        ));
        let (outcome, reason) = if converts {
            ("goal", "Order Completed")
        } else {
            ("completed", "end")
        };
        events.push(step(
            &who,
            journey,
            &enrollment,
            3,
            "msg",
            outcome,
            reason,
            at + 60,
            json!({}),
        ));
    };
    for i in 0..100 {
        let (arm, converts) = if i < 40 {
            ("control", i < 10)
        } else {
            ("treatment", i < 64)
        };
        enroll("promo", i, arm, converts);
    }
    for i in 0..1100 {
        enroll(
            "skewed",
            i,
            if i < 450 { "control" } else { "treatment" },
            false,
        );
    }
    for chunk in events.chunks(1000) {
        rig.server.deliver(chunk.to_vec()).await;
    }
    let mut client = rig.server.client().await;
    let report = client
        .get_journey_report(admin(GetJourneyReportRequest {
            journey_id: "promo".into(),
            ..GetJourneyReportRequest::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((report.enrollments, report.converted), (100, 34));
    let msg = report.nodes.iter().find(|n| n.node_id == "msg").unwrap();
    assert_eq!((msg.entered, msg.goal_reached), (100, 34));
    let split = &report.splits[0];
    assert_eq!(split.node_id, "split");
    let control = &split.variants[0];
    let treatment = split
        .variants
        .iter()
        .find(|v| v.arm == "treatment")
        .unwrap();
    assert!(control.is_control && control.arm == "control");
    assert_eq!((control.enrollments, control.conversions), (40, 10));
    assert_eq!((treatment.enrollments, treatment.conversions), (60, 24));
    // Reference values from Python's statistics.NormalDist (see the stats unit tests).
    let close = |a: f64, b: f64| (a - b).abs() < 1e-6;
    assert!(close(treatment.uplift, 0.15), "{treatment:?}");
    assert!(
        close(treatment.p_value, 0.120_838_653_114_181_63),
        "{treatment:?}"
    );
    assert!(
        close(treatment.uplift_ci_low, -0.032_681_891_562_300_7),
        "{treatment:?}"
    );
    assert!(
        close(treatment.uplift_ci_high, 0.332_681_891_562_300_77),
        "{treatment:?}"
    );
    assert!(
        close(split.srm_p_value, 0.045_500_263_896_358_396),
        "{split:?}"
    );
    assert!(!split.sample_ratio_mismatch);

    let skewed = client
        .get_journey_report(admin(GetJourneyReportRequest {
            journey_id: "skewed".into(),
            ..GetJourneyReportRequest::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let split = &skewed.splits[0];
    assert!(
        (split.srm_chi_squared - 36.363_636_363_636_37).abs() < 1e-9,
        "{split:?}"
    );
    assert!(split.sample_ratio_mismatch, "{split:?}");
}
waymark_testkit::on_both_backends!(a_journey_report_reads_out_each_arm_against_control);

async fn cx_metrics_group_by_channel_and_bucket(backend: Backend) {
    let rig = Rig::start(backend).await;
    let on = |mut e: Event, channel: Channel| {
        e.set_channel(channel);
        e
    };
    rig.server
        .deliver(vec![
            on(
                track("w1", "CSAT Submitted", 0, json!({"csat": 5})),
                Channel::Web,
            ),
            on(
                track("w2", "CSAT Submitted", 10, json!({"csat": 3})),
                Channel::Web,
            ),
            on(
                track("w1", "NPS Submitted", DAY, json!({"nps": 10})),
                Channel::Web,
            ),
            on(
                track("w2", "NPS Submitted", DAY, json!({"nps": 6})),
                Channel::Web,
            ),
            on(
                track("w3", "NPS Submitted", DAY, json!({"nps": 8})),
                Channel::Web,
            ),
            on(
                track(
                    "m1",
                    "Complaint Filed",
                    0,
                    json!({"text": "terrible service, I am very angry"}),
                ),
                Channel::Email,
            ),
            step(
                "m1",
                "care",
                "m1-e",
                3,
                "escalate",
                "escalated",
                "case-1",
                60,
                json!({}),
            ),
        ])
        .await;
    let mut client = rig.server.client().await;
    let all = client
        .get_cx_metrics(admin(GetCxMetricsRequest {
            group_by: CxGrouping::Channel as i32,
            ..GetCxMetricsRequest::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let email = all.metrics.iter().find(|m| m.group == "email").unwrap();
    assert_eq!(
        (email.complaints, email.escalations, email.sentiment_samples),
        (1, 1, 1)
    );
    assert!(email.sentiment_mean < -0.3, "{email:?}");
    let web = all.metrics.iter().find(|m| m.group == "web").unwrap();
    assert_eq!(
        (
            web.csat_responses,
            web.csat_mean,
            web.csat_satisfied_percent
        ),
        (2, 4.0, 50.0)
    );
    assert_eq!((web.nps_responses, web.nps), (3, 0.0));

    let daily = client
        .get_cx_metrics(admin(GetCxMetricsRequest {
            group_by: CxGrouping::Channel as i32,
            bucket: "1d".into(),
            ..GetCxMetricsRequest::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let web_days: Vec<(i64, u64, u64)> = daily
        .metrics
        .iter()
        .filter(|m| m.group == "web")
        .map(|m| {
            (
                m.bucket_start.unwrap().seconds,
                m.csat_responses,
                m.nps_responses,
            )
        })
        .collect();
    let day0 = T0 - T0.rem_euclid(DAY);
    assert_eq!(web_days, vec![(day0, 2, 0), (day0 + DAY, 0, 3)]);
}
waymark_testkit::on_both_backends!(cx_metrics_group_by_channel_and_bucket);
