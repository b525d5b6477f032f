//! The report and map verbs against a real `waymark serve analytics` fed synthetic
//! resolved events over its EventSink: the example map is applied, listed and read back
//! as written; every report prints the counts the events imply, as a table and as JSON;
//! a funnel is drawn as a well-formed SVG; a bad step is refused naming its field.

use std::process::{Command, Output, Stdio};

use serde_json::{Value, json};
use waymark_proto::common::v1::event_sink_client::EventSinkClient;
use waymark_proto::common::v1::{Channel, DeliverRequest, Event, EventType};
use waymark_testkit::{ADMIN_TOKEN, Backend, PATIENCE, TestDb, admin, eventually};

use crate::support::{Process, examples, free_port, ok, run_client};

/// Monday 2 March 2026, 09:00 UTC, in seconds: where the synthetic histories start, long
/// enough ago that every open stage with a standard time is past it.
const T0: i64 = 1_772_442_000;
const MINUTE: i64 = 60;
const HOUR: i64 = 3600;
const DAY: i64 = 86_400;

fn waymark(endpoint: &str, args: &[&str]) -> Output {
    run_client("WAYMARK_ANALYTICS_ENDPOINT", endpoint, args)
}

fn json_of(output: Output) -> Value {
    let stdout = ok(output);
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// A resolved track event of `profile` at `T0 + secs`, as the profile service relays it.
fn track(profile: &str, name: &str, secs: i64, properties: Value, channel: Channel) -> Event {
    let mut event = Event {
        event_id: uuid::Uuid::now_v7().to_string(),
        message_id: uuid::Uuid::new_v4().to_string(),
        event: name.to_owned(),
        profile_id: profile.to_owned(),
        user_id: profile.to_owned(),
        properties: Some(waymark_proto::json::struct_from_json(
            properties.as_object().cloned().unwrap_or_default(),
        )),
        timestamp: Some(prost_types::Timestamp {
            seconds: T0 + secs,
            nanos: 0,
        }),
        source_id: "profile".into(),
        ..Event::default()
    };
    event.set_type(EventType::Track);
    event.set_channel(channel);
    event
}

/// Six customers whose histories give every report a known answer:
/// - c1 views, starts checkout 10 minutes later, orders 10 minutes after that, and rates
///   the service 5 on the web 20 days on;
/// - c2 views, starts checkout an hour later, orders 8 days after the view (outside a 7-day
///   window), and rates the service 2 on the web;
/// - c3 views, starts checkout 20 minutes later, and files a complaint in chat;
/// - c4 only views;
/// - c5 has a support ticket resolved in 2 days (its standard is 24 hours), then gives an
///   NPS of 10 by email (advocacy);
/// - c6 searches and finds nothing (a dead end), entering no stage.
fn histories() -> Vec<Event> {
    let none = || json!({});
    let web = Channel::Web;
    vec![
        track("c1", "Product Viewed", 0, none(), web),
        track("c1", "Checkout Started", 10 * MINUTE, none(), web),
        track("c1", "Order Completed", 20 * MINUTE, none(), web),
        track("c1", "CSAT Submitted", 20 * DAY, json!({"csat": 5}), web),
        track("c2", "Product Viewed", 0, none(), web),
        track("c2", "Checkout Started", HOUR, none(), web),
        track("c2", "Order Completed", 8 * DAY, none(), web),
        track("c2", "CSAT Submitted", 20 * DAY, json!({"csat": 2}), web),
        track("c3", "Product Viewed", 0, none(), web),
        track("c3", "Checkout Started", 20 * MINUTE, none(), web),
        track(
            "c3",
            "Complaint Filed",
            20 * DAY,
            json!({"text": "terrible service, awful and slow"}),
            Channel::Chat,
        ),
        track("c4", "Product Viewed", 0, none(), web),
        track("c5", "Support Ticket Created", 0, none(), web),
        track("c5", "Support Ticket Resolved", 2 * DAY, none(), web),
        track(
            "c5",
            "NPS Submitted",
            2 * DAY + MINUTE,
            json!({"score": 10}),
            Channel::Email,
        ),
        track("c6", "Product Search No Results", 0, none(), web),
    ]
}

/// The cells of the first table row labelled `label`, after the label, without the bar.
fn row(table: &str, label: &str) -> Vec<String> {
    let line = table
        .lines()
        .find_map(|l| {
            let (_, rest) = l.split_once(&format!("{label}  "))?;
            Some(rest)
        })
        .unwrap_or_else(|| panic!("no row {label:?} in\n{table}"));
    // Bars are drawn with the block elements from a full block to one eighth of one.
    line.split_whitespace()
        .filter(|cell| !cell.chars().all(|c| ('█'..='▏').contains(&c)))
        .map(str::to_owned)
        .collect()
}

fn number(value: &Value) -> f64 {
    value
        .as_f64()
        .unwrap_or_else(|| panic!("{value} is not a number"))
}

/// `value[key]` of the element of `array` whose `field` is `name`.
fn find<'a>(array: &'a Value, field: &str, name: &str) -> &'a Value {
    array
        .as_array()
        .and_then(|a| a.iter().find(|e| e[field] == name))
        .unwrap_or_else(|| panic!("no {field} {name:?} in {array}"))
}

async fn reports_and_maps_go_through_the_cli(backend: Backend) {
    let db = TestDb::new(backend).await;
    let port = free_port();
    let _analytics = Process(
        Command::new(env!("CARGO_BIN_EXE_waymark"))
            .args(["serve", "analytics"])
            .env("WAYMARK_DATABASE_URL", &db.url)
            .env("WAYMARK_AUTO_MIGRATE", "true")
            .env("WAYMARK_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("WAYMARK_LOG_FILTER", "warn")
            .env("WAYMARK_DRAIN_SECS", "0")
            // The map writes stages back to profiles; no profile service runs here, and
            // the first write-back would come after the test.
            .env("WAYMARK_PROFILE_ENDPOINT", "http://127.0.0.1:9")
            .env("WAYMARK_ANALYTICS_WRITE_BACK_SECS", "3600")
            .env("WAYMARK_ANALYTICS_GRPC_ADDR", format!("127.0.0.1:{port}"))
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .spawn()
            .expect("the waymark binary"),
    );
    let endpoint = format!("http://127.0.0.1:{port}");
    eventually("analytics to serve", 2 * PATIENCE, async || {
        waymark(&endpoint, &["maps", "list"]).status.success()
    })
    .await;
    let events = histories();
    let delivered = EventSinkClient::connect(endpoint.clone())
        .await
        .unwrap()
        .deliver(admin(DeliverRequest {
            producer: "profile".into(),
            events: events.clone(),
        }))
        .await
        .expect("deliver")
        .into_inner();
    assert_eq!(delivered.applied as usize, events.len());

    // The example map is saved as written and read back the same.
    let file = examples().join("maps/retail.yaml");
    let applied = json_of(waymark(
        &endpoint,
        &["maps", "apply", "-f", file.to_str().unwrap()],
    ));
    assert_eq!(applied["id"], "retail");
    assert_eq!(applied["stages"].as_array().unwrap().len(), 7);
    let listed = ok(waymark(&endpoint, &["maps", "list"]));
    assert_eq!(
        row(&listed, "retail"),
        ["Retail", "customer", "journey", "7", "2", "4", "yes"],
        "{listed}"
    );
    let listed = json_of(waymark(&endpoint, &["maps", "list", "--format", "json"]));
    assert_eq!(listed, json!([applied]));
    let written: Value = serde_norway::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let read_back = json_of(waymark(
        &endpoint,
        &["maps", "get", "retail", "--format", "json"],
    ));
    assert_eq!(read_back, written);
    let yaml = ok(waymark(&endpoint, &["maps", "get", "retail"]));
    let yaml: Value = serde_norway::from_str(&yaml).unwrap();
    assert_eq!(yaml, written);

    // View, checkout, order within 7 days: c1 to the end, c2 and c3 to checkout, c4 only
    // viewed. From checkout: c1 10 minutes, c3 20, c2 an hour.
    let funnel = [
        "report",
        "funnel",
        "--step",
        "Product Viewed",
        "--step",
        "Checkout Started",
        "--step",
        "Order Completed",
        "--window",
        "7d",
    ];
    let table = ok(waymark(&endpoint, &funnel));
    assert!(
        table.starts_with("6 customers and 16 events scanned in "),
        "{table}"
    );
    assert_eq!(
        row(&table, "Product Viewed")[..4],
        ["4", "100.0%", "-", "-"]
    );
    assert_eq!(
        row(&table, "Checkout Started")[..4],
        ["3", "75.0%", "25.0%", "20m"]
    );
    assert_eq!(
        row(&table, "Order Completed"),
        ["1", "25.0%", "66.7%", "10m", "10m"]
    );
    let svg_file = std::env::temp_dir().join(format!("funnel-{}.svg", uuid::Uuid::new_v4()));
    let svg_path = svg_file.to_str().unwrap();
    let answer = json_of(waymark(
        &endpoint,
        &[&funnel[..], &["--format", "json", "--svg", svg_path]].concat(),
    ));
    let steps = answer["total"]["steps"].as_array().unwrap();
    let reached: Vec<&Value> = steps.iter().map(|s| &s["reached"]).collect();
    assert_eq!(reached, [4, 3, 1]);
    let dropped: Vec<&Value> = steps.iter().map(|s| &s["dropped"]).collect();
    assert_eq!(dropped, [0, 1, 2]);
    assert_eq!(number(&steps[1]["timeToConvert"]["medianSeconds"]), 1200.0);
    assert_eq!(answer["customersScanned"], 6);
    let svg = std::fs::read_to_string(&svg_file).unwrap();
    std::fs::remove_file(&svg_file).ok();
    let document = roxmltree::Document::parse(&svg).unwrap_or_else(|e| panic!("{e}: {svg}"));
    let root = document.root_element();
    assert_eq!(root.tag_name().name(), "svg");
    assert_eq!(
        root.tag_name().namespace(),
        Some("http://www.w3.org/2000/svg")
    );
    let bars = root.children().filter(|n| n.has_tag_name("rect")).count();
    assert_eq!(bars, 3, "{svg}");
    let texts: Vec<&str> = root
        .descendants()
        .filter(|n| n.has_tag_name("text"))
        .filter_map(|n| n.text())
        .collect();
    assert!(texts.contains(&"2. Checkout Started"), "{texts:?}");
    assert!(
        texts.contains(&"1 · 25.0% of first · 33.3% of previous"),
        "{texts:?}"
    );

    // After a view, within a 30-minute session: c1 checks out and orders (converted), c3
    // checks out and stops, c2 (an hour later) and c4 stop at once.
    let paths = json_of(waymark(
        &endpoint,
        &[
            "report",
            "paths",
            "--anchor",
            "Product Viewed",
            "--goal",
            "Order Completed",
            "--format",
            "json",
        ],
    ));
    assert_eq!(
        (&paths["paths"], &paths["converted"]),
        (&json!(4), &json!(1))
    );
    let mut links: Vec<(u64, String, String, u64)> = paths["links"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["depth"].as_u64().unwrap(),
                l["from"].as_str().unwrap().to_owned(),
                l["to"].as_str().unwrap().to_owned(),
                l["count"].as_u64().unwrap(),
            )
        })
        .collect();
    links.sort();
    let link = |depth, from: &str, to: &str, count| (depth, from.into(), to.into(), count);
    assert_eq!(
        links,
        [
            link(1, "(anchor)", "(end)", 2),
            link(1, "(anchor)", "Checkout Started", 2),
            link(2, "Checkout Started", "(converted)", 1),
            link(2, "Checkout Started", "(end)", 1),
        ]
    );
    let table = ok(waymark(
        &endpoint,
        &[
            "report",
            "paths",
            "--anchor",
            "Product Viewed",
            "--goal",
            "Order Completed",
        ],
    ));
    assert!(
        table.starts_with("4 paths, 1 converted (25.0%), in "),
        "{table}"
    );

    // Each customer's latest stage: c1 and c2 own (ordered), c3 convert, c4 select, c5
    // advocacy (NPS 10); c6 none. All but advocacy (no standard time) are past theirs.
    let stages = json_of(waymark(
        &endpoint,
        &["report", "stages", "--map", "retail", "--format", "json"],
    ));
    let counts: Vec<(&str, u64, u64)> = stages["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["stageId"].as_str().unwrap(),
                s["customers"].as_u64().unwrap(),
                s["stuck"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        counts,
        [
            ("need", 0, 0),
            ("research", 0, 0),
            ("select", 1, 1),
            ("convert", 1, 1),
            ("own", 2, 2),
            ("loyalty", 0, 0),
            ("advocacy", 1, 0),
        ]
    );
    assert_eq!(stages["withoutStage"], 1);
    let table = ok(waymark(&endpoint, &["report", "stages", "--map", "retail"]));
    assert_eq!(row(&table, "Own (own)")[..3], ["2", "2", "(100.0%)"]);
    assert_eq!(
        row(&table, "Advocacy (advocacy)")[..3],
        ["1", "0", "(0.0%)"]
    );
    assert!(table.ends_with("1 customers without a stage\n"), "{table}");

    // Stays: select ends for c1, c2, c3 within its 2 days; convert ends for c1 in 10
    // minutes and for c2 after 8 days less an hour (past its hour). Still open past their
    // standard: c4 in select, c3 in convert, c1 and c2 in own. The ticket took 2 days of
    // its 24 hours; both orders wait for a delivery past 5 days.
    let sla = json_of(waymark(
        &endpoint,
        &["report", "sla", "--map", "retail", "--format", "json"],
    ));
    let report = |group: &str, id: &str| {
        let r = find(&sla[group], "id", id);
        (
            r["completed"]["count"].as_u64().unwrap(),
            r["breached"].as_u64().unwrap(),
            r["openPastStandard"].as_u64().unwrap(),
        )
    };
    assert_eq!(sla["stages"].as_array().unwrap().len(), 6, "{sla}");
    assert_eq!(report("stages", "select"), (3, 0, 1));
    assert_eq!(report("stages", "convert"), (2, 1, 1));
    assert_eq!(report("stages", "own"), (0, 0, 2));
    assert_eq!(report("stages", "need"), (0, 0, 0));
    assert_eq!(
        number(&find(&sla["stages"], "id", "convert")["breachPercent"]),
        50.0
    );
    assert_eq!(report("interactions", "support-ticket"), (1, 1, 0));
    assert_eq!(report("interactions", "delivery"), (0, 0, 2));
    let stuck: Vec<(&str, &str)> = sla["stuck"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["profileId"].as_str().unwrap(),
                s["stageId"].as_str().unwrap(),
            )
        })
        .collect();
    // Most overdue first: c3 an hour after 20 minutes, c4 two days after 0, c1 14 days
    // after 20 minutes, c2 14 days after 8 days.
    assert_eq!(
        stuck,
        [
            ("c3", "convert"),
            ("c4", "select"),
            ("c1", "own"),
            ("c2", "own")
        ]
    );
    // Sessions (split by gaps over 30 minutes): c1 2, c2 4, c3 2, c4 1, c5 2, c6 1; one
    // ends on a search without results.
    assert_eq!(sla["sessions"], 12);
    assert_eq!(
        sla["deadEnds"],
        json!([{"event": "Product Search No Results", "sessions": 1, "customers": 1}])
    );
    let table = ok(waymark(&endpoint, &["report", "sla", "--map", "retail"]));
    let convert = row(&table, "Convert");
    assert_eq!(convert[..2], ["1.0h", "2"], "{table}");
    assert_eq!(convert[4..], ["1", "(50.0%)", "1"], "{table}");
    assert!(table.contains("Dead ends, of 12 sessions"), "{table}");

    // Two CSAT answers on the web (5 and 2), an NPS of 10 by email, a complaint in chat.
    let cx = json_of(waymark(
        &endpoint,
        &["report", "cx", "--by", "channel", "--format", "json"],
    ));
    let groups: Vec<&str> = cx["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["group"].as_str().unwrap())
        .collect();
    assert_eq!(groups, ["chat", "email", "web"]);
    let web = find(&cx["metrics"], "group", "web");
    assert_eq!(web["csatResponses"], 2);
    assert_eq!(
        (
            number(&web["csatMean"]),
            number(&web["csatSatisfiedPercent"])
        ),
        (3.5, 50.0)
    );
    let email = find(&cx["metrics"], "group", "email");
    assert_eq!(email["npsResponses"], 1);
    assert_eq!(number(&email["nps"]), 100.0);
    let chat = find(&cx["metrics"], "group", "chat");
    assert_eq!(
        (&chat["complaints"], &chat["sentimentSamples"]),
        (&json!(1), &json!(1))
    );
    assert!(number(&chat["sentimentMean"]) < 0.0, "{chat}");
    let table = ok(waymark(&endpoint, &["report", "cx", "--by", "channel"]));
    assert_eq!(row(&table, "web")[..2], ["3.50", "(2)"]);
    assert_eq!(row(&table, "email")[..3], ["-", "-", "+100"]);

    // A condition that does not parse is refused by the service, naming the step.
    let refused = waymark(
        &endpoint,
        &[
            "report",
            "funnel",
            "--step",
            "Product Viewed",
            "--step",
            "Order Completed|properties.total >",
        ],
    );
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("invalid steps[1].condition"), "{stderr}");
    let missing = waymark(&endpoint, &["report", "stages", "--map", "nope"]);
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.contains("not found"), "{stderr}");
}
waymark_testkit::on_both_backends!(reports_and_maps_go_through_the_cli);
