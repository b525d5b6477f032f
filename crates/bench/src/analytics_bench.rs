//! The analytics benchmark: `waymark serve analytics` as a separate process on a fresh
//! PostgreSQL database, fed resolved events over `EventSink` the way the profile service's
//! relays feed it, then asked a 5-step funnel over everything it holds.
//!
//! The stream is a retail customer base's over five weeks, generated deterministically to
//! a file first (so the clients measure the service, not the generator, and the bench's
//! memory stays bounded): Zipf-like activity (a few customers with 10k+ events, most with
//! a handful), a tenth of the customers anonymous visitors identified later (their
//! anonymous profile merged into the known one by a `Profile Merged` notice), some events
//! late by hours and some redelivered with the same event id.
//!
//! Each figure stands next to its ceiling from the same run: the aggregation rate next to
//! the same rows inserted straight into a table of the same shape with the same batches
//! and clients; `GetFunnel` next to the fastest SQL we know for the same funnel over the
//! same events in a table designed for it.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use prost::Message;
use sea_orm::{ConnectionTrait, DatabaseConnection, FromQueryResult, TransactionTrait};
use serde_json::{Value, json};
use waymark_kit::sql::{self, Column, Insert};
use waymark_proto::analytics::v1::analytics_service_client::AnalyticsServiceClient;
use waymark_proto::analytics::v1::{
    Breakdown, EventMatcher, FunnelCounting, FunnelGroup, FunnelOrder, GetFunnelRequest,
    GetFunnelResponse, breakdown,
};
use waymark_proto::common::v1::{
    Channel, DeliverResponse, EncodedDeliverRequest, Event, EventType,
};

use crate::profile_bench::wait_serving;
use crate::system_bench::{TOKEN, ensure_binary, free_port, serve};
use crate::{BenchDb, Run, report};

/// Events per delivery, as the relays send them.
const BATCH: usize = 500;
/// Concurrent delivering clients (the profile relays and the orchestrator's).
const CLIENTS: usize = 4;
/// Days the stream covers.
const DAYS: i64 = 35;
/// 2026-01-01T00:00:00Z, where the stream starts.
const START_US: i64 = 1_767_225_600_000_000;
const DAY_US: i64 = 86_400_000_000;
const HOUR_US: i64 = 3_600_000_000;
/// Share of the customers who start anonymous and identify later.
const ANONYMOUS_SHARE: u64 = 10;
/// Share of the events that arrive hours late, in percent.
const LATE_PERCENT: f64 = 3.0;
/// Share of the events redelivered with the same id, in percent.
const DUPLICATE_PERCENT: f64 = 2.0;
/// Share of the events of every customer evenly spread; the rest follows a Zipf law.
const EVEN_SHARE: f64 = 0.6;
/// Recent deliveries a duplicate is drawn from.
const RECENT: usize = 4096;
/// `GetFunnel` calls timed once the service is idle after the load, after the warm-up.
const FUNNEL_RUNS: usize = 100;
/// `GetFunnel` calls timed right after the load, while memory is compacted.
const AFTER_LOAD_RUNS: usize = 30;
const WARM_UP: usize = 3;
/// SQL runs, of which the median counts.
const SQL_RUNS: usize = 3;
/// Rows per insert when the SQL baseline table is loaded.
const LOAD_BATCH: usize = 10_000;

const CATEGORIES: [&str; 10] = [
    "shoes",
    "apparel",
    "electronics",
    "home",
    "beauty",
    "toys",
    "sports",
    "books",
    "garden",
    "grocery",
];
const PRICES: [f64; 9] = [4.99, 9.99, 14.99, 19.99, 24.99, 39.99, 59.99, 99.99, 149.99];
const TOPICS: [&str; 3] = ["delivery", "refund", "account"];
const PLANS: [&str; 3] = ["free", "plus", "premium"];
const PRODUCTS: u64 = 400;

/// The event names, by their code in the baseline file.
const NAMES: [&str; 12] = [
    "Page Viewed",
    "Product Searched",
    "Product Viewed",
    "Added To Cart",
    "Checkout Started",
    "Order Completed",
    "Support Ticket Created",
    "Email Opened",
    "Email Clicked",
    "Subscription Started",
    "Identify",
    "Product Reviewed",
];
const PAGE: u8 = 0;
const SEARCHED: u8 = 1;
const VIEWED: u8 = 2;
const ADDED: u8 = 3;
const CHECKOUT: u8 = 4;
const ORDERED: u8 = 5;
const TICKET: u8 = 6;
const EMAIL_OPENED: u8 = 7;
const EMAIL_CLICKED: u8 = 8;
const SUBSCRIBED: u8 = 9;
const IDENTIFY: u8 = 10;
const REVIEWED: u8 = 11;

/// The funnel asked of both: steps (name code, price floor in cents on that step).
const FUNNEL: [(u8, Option<i64>); 5] = [
    (SEARCHED, None),
    (VIEWED, None),
    (ADDED, Some(2000)),
    (CHECKOUT, None),
    (ORDERED, None),
];
const WINDOW_US: i64 = 30 * DAY_US;

/// Runs the suite with `events` events over `customers` customers.
pub async fn run(
    postgres: &str,
    binary: &Path,
    events: usize,
    customers: usize,
) -> anyhow::Result<()> {
    ensure_binary(binary)?;
    anyhow::ensure!(
        customers >= 100 && events >= customers,
        "--analytics-customers must be at least 100 and at most --analytics-events"
    );
    let wall = Instant::now();
    println!(
        "analytics benchmark: `waymark serve analytics` as a process on PostgreSQL, {events} events over {customers} \
         customers and {DAYS} days delivered over EventSink in batches of {BATCH} by {CLIENTS} clients; retail \
         sessions ({}) on web, app, e-mail and contact-centre channels with category, price, cart_id and plan \
         properties; {:.0}% of events spread evenly, the rest Zipf over customers; {ANONYMOUS_SHARE}% of customers \
         anonymous until their second session (then `Profile Merged` into the known profile); {LATE_PERCENT}% of \
         events 1-6 h late, {DUPLICATE_PERCENT}% redelivered with the same event id",
        NAMES.join(", "),
        EVEN_SHARE * 100.0
    );
    let dir = std::env::temp_dir().join(format!("waymark-analytics-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let files = Files {
        deliveries: dir.join("deliveries.bin"),
        baseline: dir.join("baseline.bin"),
    };
    let outcome = measure(postgres, binary, events, customers, &files).await;
    std::fs::remove_dir_all(&dir).ok();
    outcome?;
    println!(
        "  analytics benchmark wall time {:.1} s",
        wall.elapsed().as_secs_f64()
    );
    Ok(())
}

struct Files {
    /// Every delivery: the event id, profile id, kind and encoded event, length-prefixed.
    deliveries: PathBuf,
    /// Every distinct customer event, typed, for the SQL baseline.
    baseline: PathBuf,
}

async fn measure(
    postgres: &str,
    binary: &Path,
    events: usize,
    customers: usize,
    files: &Files,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let shape = generate(events, customers, files)?;
    println!(
        "  generated in {:.1} s: {} deliveries ({} distinct events, {} redelivered duplicates, {} late, {} merges), \
         {} customers seen over {:.1} days, the busiest with {} events, median {} per customer; mean encoded event {} bytes",
        started.elapsed().as_secs_f64(),
        shape.deliveries,
        shape.deliveries - shape.duplicates,
        shape.duplicates,
        shape.late,
        shape.merges,
        shape.customers_seen,
        (shape.last_us - shape.first_us) as f64 / DAY_US as f64,
        shape.busiest,
        shape.median,
        shape.bytes / shape.deliveries.max(1) as u64,
    );

    let ceiling_db = BenchDb::create(postgres).await?;
    let db = waymark_kit::db::connect(&ceiling_db.url, waymark_analytics::SERVICE, 16).await?;
    waymark_analytics::migrate(&db).await?;
    ceiling_db.checkpoint().await?;
    let ceiling = raw_insert(&db, &files.deliveries).await;
    db.close().await.ok();
    ceiling_db.drop().await?;
    let ceiling = ceiling?;
    report(
        "ceiling: UNNEST insert into analytics_events",
        &ceiling,
        &[],
    );

    let service_db = BenchDb::create(postgres).await?;
    service_db.checkpoint().await?;
    let measured = with_service(binary, &service_db.url, files, &shape, &ceiling).await;
    service_db.drop().await?;
    let funnel = measured?;

    let sql_db = BenchDb::create(postgres).await?;
    let baseline = sql_baseline(&sql_db.url, &files.baseline, &shape).await;
    sql_db.drop().await?;
    let (sql_median, sql_counts) = baseline?;
    println!(
        "{:<52} median {:>8.1} ms of {SQL_RUNS}   GetFunnel p50 {:.1} ms is {:.1}x faster (goal: at least 20x)",
        "SQL baseline: the same funnel in PostgreSQL",
        sql_median.as_secs_f64() * 1e3,
        funnel.p50.as_secs_f64() * 1e3,
        sql_median.as_secs_f64() / funnel.p50.as_secs_f64()
    );
    compare(&funnel.counts, &sql_counts)
}

/// What the generator produced.
#[derive(Default)]
struct Shape {
    deliveries: usize,
    duplicates: usize,
    late: usize,
    merges: usize,
    customers_seen: usize,
    busiest: u32,
    median: u32,
    bytes: u64,
    first_us: i64,
    last_us: i64,
    /// Customers whose anonymous profile was merged into the known one.
    merged: Vec<bool>,
}

/// xorshift64*: fast, and the same stream every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, p: f64) -> bool {
        self.uniform() < p
    }

    /// Exponentially distributed with this mean.
    fn exponential(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.uniform()).ln()
    }
}

fn known_profile(c: u64) -> String {
    uuid::Uuid::from_u64_pair(0x0190_0000_0000_7000, 0x8000_0000_0000_0000 | c).to_string()
}

fn anonymous_profile(c: u64) -> String {
    uuid::Uuid::from_u64_pair(0x0190_0000_0001_7000, 0x8000_0000_0000_0000 | c).to_string()
}

/// The baseline's key of a profile: the customer, or the customer's anonymous profile.
fn profile_key(c: u64, anonymous: bool) -> i64 {
    c as i64 | if anonymous { 1 << 40 } else { 0 }
}

fn starts_anonymous(c: u64) -> bool {
    c % ANONYMOUS_SHARE == 7
}

/// One event as the baseline table holds it.
struct Typed {
    profile: i64,
    at: i64,
    tie: i64,
    name: u8,
    category: u8,
    channel: u8,
    price_cents: i64,
}

const TYPED_BYTES: usize = 35;
const NO_CATEGORY: u8 = u8::MAX;

impl Typed {
    fn write(&self, out: &mut impl Write) -> std::io::Result<()> {
        let mut b = [0u8; TYPED_BYTES];
        b[0..8].copy_from_slice(&self.profile.to_le_bytes());
        b[8..16].copy_from_slice(&self.at.to_le_bytes());
        b[16..24].copy_from_slice(&self.tie.to_le_bytes());
        b[24..32].copy_from_slice(&self.price_cents.to_le_bytes());
        b[32] = self.name;
        b[33] = self.category;
        b[34] = self.channel;
        out.write_all(&b)
    }

    fn read(input: &mut impl Read) -> std::io::Result<Option<Typed>> {
        let mut b = [0u8; TYPED_BYTES];
        match input.read_exact(&mut b) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let word = |i: usize| i64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default());
        Ok(Some(Typed {
            profile: word(0),
            at: word(8),
            tie: word(16),
            price_cents: word(24),
            name: b[32],
            category: b[33],
            channel: b[34],
        }))
    }
}

/// One delivery record of the deliveries file.
struct Delivery {
    event_id: String,
    profile_id: String,
    kind: i16,
    body: Vec<u8>,
}

impl Delivery {
    fn write(&self, out: &mut impl Write) -> std::io::Result<()> {
        let len = 1 + 1 + self.event_id.len() + 1 + self.profile_id.len() + self.body.len();
        out.write_all(&(len as u32).to_le_bytes())?;
        out.write_all(&[self.kind as u8, self.event_id.len() as u8])?;
        out.write_all(self.event_id.as_bytes())?;
        out.write_all(&[self.profile_id.len() as u8])?;
        out.write_all(self.profile_id.as_bytes())?;
        out.write_all(&self.body)
    }

    fn read(input: &mut impl Read) -> anyhow::Result<Option<Delivery>> {
        let mut len = [0u8; 4];
        match input.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let mut record = vec![0u8; u32::from_le_bytes(len) as usize];
        input.read_exact(&mut record)?;
        let kind = i16::from(record[0]);
        let id_end = 2 + usize::from(record[1]);
        let event_id = String::from_utf8(record[2..id_end].to_vec())?;
        let profile_end = id_end + 1 + usize::from(record[id_end]);
        let profile_id = String::from_utf8(record[id_end + 1..profile_end].to_vec())?;
        let body = record[profile_end..].to_vec();
        Ok(Some(Delivery {
            event_id,
            profile_id,
            kind,
            body,
        }))
    }
}

/// The stream's state while it is written.
struct Generator {
    rng: Rng,
    /// Follow-up sessions per microsecond, by customer.
    rates: Vec<f64>,
    /// Sessions so far, by customer.
    sessions: Vec<u32>,
    /// Events so far, by customer.
    counts: Vec<u32>,
    merged: Vec<bool>,
    recent: Vec<(Vec<u8>, String, String, i16)>,
    shape: Shape,
}

/// What one session is about.
enum Intent {
    Shopping,
    Support,
    Email,
    Subscription,
}

impl Generator {
    /// A session of customer `c` starting at `t`: its events, each (name, at, channel,
    /// properties).
    fn session(&mut self, c: u64, t: i64) -> Vec<(u8, i64, Channel, Value)> {
        let rng = &mut self.rng;
        let mut out = Vec::new();
        let mut at = t;
        let mut step = |rng: &mut Rng| {
            at += 5_000_000 + rng.below(170_000_000) as i64;
            at
        };
        let channel = match rng.below(10) {
            0..=5 => Channel::Web,
            _ => Channel::MobileApp,
        };
        let intent = match rng.below(100) {
            0..=79 => Intent::Shopping,
            80..=87 => Intent::Support,
            88..=94 => Intent::Email,
            _ => Intent::Subscription,
        };
        match intent {
            Intent::Shopping => {
                out.push((PAGE, step(rng), channel, json!({"path": "/", "url": "https://shop.example.com/", "title": "Home", "referrer": "https://www.google.com/"})));
                let category = CATEGORIES[rng.below(CATEGORIES.len() as u64) as usize];
                out.push((SEARCHED, step(rng), channel, json!({"query": format!("{category} deals"), "category": category, "results": rng.below(200)})));
                let cart = format!("cart-{c:x}-{t:x}");
                let mut total = 0.0;
                for _ in 0..1 + rng.below(3) {
                    let product = rng.below(PRODUCTS);
                    let price = PRICES[(product % PRICES.len() as u64) as usize];
                    let category = CATEGORIES[(product % CATEGORIES.len() as u64) as usize];
                    out.push((VIEWED, step(rng), channel, json!({"product_id": format!("p-{product}"), "sku": format!("SKU-{product:05}"), "name": format!("Product {product}"), "category": category, "price": price, "currency": "USD"})));
                    if rng.chance(0.35) {
                        total += price;
                        out.push((ADDED, step(rng), channel, json!({"cart_id": cart, "product_id": format!("p-{product}"), "category": category, "price": price, "quantity": 1, "currency": "USD"})));
                    }
                    if rng.chance(0.05) {
                        out.push((REVIEWED, step(rng), channel, json!({"product_id": format!("p-{product}"), "rating": 1 + rng.below(5)})));
                    }
                }
                if total > 0.0 && rng.chance(0.55) {
                    out.push((
                        CHECKOUT,
                        step(rng),
                        channel,
                        json!({"cart_id": cart, "value": total, "price": total, "currency": "USD"}),
                    ));
                    if rng.chance(0.65) {
                        let plan = PLANS[(c % PLANS.len() as u64) as usize];
                        out.push((ORDERED, step(rng), channel, json!({"order_id": format!("o-{c:x}-{t:x}"), "cart_id": cart, "revenue": total, "price": total, "currency": "USD", "plan": plan})));
                    }
                }
            }
            Intent::Support => {
                out.push((PAGE, step(rng), channel, json!({"path": "/help", "url": "https://shop.example.com/help", "title": "Help"})));
                out.push((TICKET, step(rng), Channel::ContactCenter, json!({"ticket_id": format!("t-{c:x}-{t:x}"), "topic": TOPICS[rng.below(3) as usize], "priority": "normal"})));
            }
            Intent::Email => {
                let campaign = format!("spring-{}", rng.below(20));
                out.push((
                    EMAIL_OPENED,
                    step(rng),
                    Channel::Email,
                    json!({"campaign_id": campaign, "subject": "New arrivals for you"}),
                ));
                if rng.chance(0.4) {
                    out.push((
                        EMAIL_CLICKED,
                        step(rng),
                        Channel::Email,
                        json!({"campaign_id": campaign, "link": "https://shop.example.com/new"}),
                    ));
                    out.push((PAGE, step(rng), Channel::Web, json!({"path": "/new", "url": "https://shop.example.com/new", "title": "New arrivals"})));
                }
            }
            Intent::Subscription => {
                let plan = PLANS[1 + rng.below(2) as usize];
                out.push((PAGE, step(rng), channel, json!({"path": "/plans", "url": "https://shop.example.com/plans", "title": "Plans"})));
                out.push((SUBSCRIBED, step(rng), channel, json!({"plan": plan, "price": if plan == "plus" { 9.99 } else { 19.99 }, "currency": "USD"})));
            }
        }
        out
    }
}

fn context(channel: Channel, c: u64) -> Value {
    let ip = format!("203.0.{}.{}", (c >> 8) % 256, c % 256);
    if channel == Channel::MobileApp {
        json!({"app": {"name": "Shop", "version": "5.12.1", "build": "5121"}, "device": {"manufacturer": "Apple", "model": "iPhone15,2", "type": "ios"},
               "os": {"name": "iOS", "version": "17.4"}, "library": {"name": "analytics-ios", "version": "4.1.3"}, "ip": ip, "locale": "en-US", "timezone": "America/New_York"})
    } else {
        json!({"library": {"name": "analytics.js", "version": "5.2.0"}, "ip": ip, "locale": "en-US",
               "userAgent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.3 Safari/605.1.15"})
    }
}

fn timestamp(us: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: us.div_euclid(1_000_000),
        nanos: (us.rem_euclid(1_000_000) * 1000) as i32,
    }
}

fn object(v: Value) -> Option<prost_types::Struct> {
    match v {
        Value::Object(map) => Some(waymark_proto::json::struct_from_json(map)),
        _ => None,
    }
}

/// Writes the stream: every delivery to `files.deliveries` in delivery order, every
/// distinct customer event typed to `files.baseline`.
fn generate(events: usize, customers: usize, files: &Files) -> anyhow::Result<Shape> {
    let mut deliveries = BufWriter::with_capacity(1 << 20, File::create(&files.deliveries)?);
    let mut baseline = BufWriter::with_capacity(1 << 20, File::create(&files.baseline)?);
    let span = (DAYS * DAY_US) as f64;
    let mut g = Generator {
        rng: Rng(0x9E37_79B9_7F4A_7C15),
        rates: Vec::with_capacity(customers),
        sessions: vec![0; customers],
        counts: vec![0; customers],
        merged: vec![false; customers],
        recent: Vec::with_capacity(RECENT),
        shape: Shape::default(),
    };
    // Every customer has a first session somewhere in the span; the other sessions come
    // at a rate by activity: an even part and a Zipf part (1 / (rank + 10)).
    let mean_session = {
        let mut probe = Generator {
            rng: Rng(0x2545_F491_4F6C_DD1D),
            rates: Vec::new(),
            sessions: Vec::new(),
            counts: Vec::new(),
            merged: Vec::new(),
            recent: Vec::new(),
            shape: Shape::default(),
        };
        (0..10_000)
            .map(|c| probe.session(c, 0).len())
            .sum::<usize>() as f64
            / 10_000.0
    };
    let distinct = events as f64 / (1.0 + DUPLICATE_PERCENT / 100.0);
    let follow_up = (distinct - customers as f64 * mean_session).max(0.0) / mean_session;
    let harmonic: f64 = (0..customers).map(|c| 1.0 / (c as f64 + 10.0)).sum();
    for c in 0..customers {
        let share =
            EVEN_SHARE / customers as f64 + (1.0 - EVEN_SHARE) / (c as f64 + 10.0) / harmonic;
        // A uniform first session leaves half the span on average for the others.
        g.rates.push(2.0 * follow_up * share / span);
    }
    let mut queue = BinaryHeap::with_capacity(customers);
    for c in 0..customers {
        let first = START_US + (g.rng.uniform() * span) as i64;
        queue.push(Reverse((first, c as u32)));
    }
    g.shape.first_us = i64::MAX;
    while g.shape.deliveries < events {
        let Some(Reverse((t, c))) = queue.pop() else {
            break;
        };
        let c64 = u64::from(c);
        let ci = c as usize;
        let mut session = g.session(c64, t);
        if starts_anonymous(c64) && !g.merged[ci] && g.sessions[ci] > 0 {
            // The second session starts with signing in: the profile service merges the
            // visitor's anonymous profile into the known one, then the identify follows.
            g.merged[ci] = true;
            g.shape.merges += 1;
            session.insert(0, (IDENTIFY, t, Channel::Web, json!({})));
            notice(&mut g, c64, t, &mut deliveries)?;
        }
        g.sessions[ci] += 1;
        let anonymous = starts_anonymous(c64) && !g.merged[ci];
        for (name, at, channel, properties) in session {
            if g.shape.deliveries >= events {
                break;
            }
            emit(
                &mut g,
                c64,
                anonymous,
                (name, at, channel, properties),
                &mut deliveries,
                &mut baseline,
            )?;
        }
        let next = t + g.rng.exponential(1.0 / g.rates[ci]).min(1e17) as i64 + 600_000_000;
        queue.push(Reverse((next, c)));
    }
    deliveries.flush()?;
    baseline.flush()?;
    let mut counts: Vec<u32> = g.counts.iter().copied().filter(|n| *n > 0).collect();
    counts.sort_unstable();
    g.shape.customers_seen = counts.len();
    g.shape.busiest = counts.last().copied().unwrap_or(0);
    g.shape.median = counts.get(counts.len() / 2).copied().unwrap_or(0);
    g.shape.merged = g.merged;
    Ok(g.shape)
}

/// A deterministic UUIDv7 for an event delivered at `at`.
fn event_id(rng: &mut Rng, at: i64) -> uuid::Uuid {
    let mut random = [0u8; 10];
    random[..8].copy_from_slice(&rng.next().to_le_bytes());
    random[8..].copy_from_slice(&rng.next().to_le_bytes()[..2]);
    uuid::Builder::from_unix_timestamp_millis((at / 1000) as u64, &random).into_uuid()
}

/// The profile service's `Profile Merged` notice for customer `c` at `t`.
fn notice(g: &mut Generator, c: u64, t: i64, out: &mut impl Write) -> anyhow::Result<()> {
    let id = event_id(&mut g.rng, t);
    let survivor = known_profile(c);
    let mut event = Event {
        event_id: id.to_string(),
        message_id: format!("{}:Profile Merged", uuid::Uuid::from_u64_pair(c, t as u64)),
        event: "Profile Merged".into(),
        user_id: format!("user-{c}"),
        anonymous_id: format!("anon-{c:x}"),
        properties: object(json!({
            "merged_profile_id": anonymous_profile(c),
            "survivor_profile_id": survivor,
            "merge_id": uuid::Uuid::from_u64_pair(0x0190_0000_0002_7000, 0x8000_0000_0000_0000 | c).to_string(),
        })),
        timestamp: Some(timestamp(t)),
        received_at: Some(timestamp(t)),
        channel: Channel::Web as i32,
        source_id: "profile".into(),
        profile_id: survivor,
        ..Event::default()
    };
    event.set_type(EventType::Track);
    push(g, id.to_string(), event, 2, out)
}

/// Writes one delivery, and now and then a redelivery of a recent one.
fn push(
    g: &mut Generator,
    event_id: String,
    event: Event,
    kind: i16,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let delivery = Delivery {
        event_id,
        profile_id: event.profile_id.clone(),
        kind,
        body: event.encode_to_vec(),
    };
    delivery.write(out)?;
    g.shape.deliveries += 1;
    g.shape.bytes += delivery.body.len() as u64;
    let slot = (delivery.event_id, delivery.profile_id, delivery.kind);
    if g.recent.len() < RECENT {
        g.recent.push((delivery.body, slot.0, slot.1, slot.2));
    } else {
        let i = g.rng.below(RECENT as u64) as usize;
        g.recent[i] = (delivery.body, slot.0, slot.1, slot.2);
    }
    if g.rng.chance(DUPLICATE_PERCENT / 100.0) {
        let i = g.rng.below(g.recent.len() as u64) as usize;
        let (body, event_id, profile_id, kind) = g.recent[i].clone();
        Delivery {
            event_id,
            profile_id,
            kind,
            body,
        }
        .write(out)?;
        g.shape.deliveries += 1;
        g.shape.duplicates += 1;
    }
    Ok(())
}

fn emit(
    g: &mut Generator,
    c: u64,
    anonymous: bool,
    (name, at, channel, properties): (u8, i64, Channel, Value),
    deliveries: &mut impl Write,
    baseline: &mut impl Write,
) -> anyhow::Result<()> {
    let id = event_id(&mut g.rng, at);
    // A late event happened hours before it is delivered (an app that was offline).
    let happened = if g.rng.chance(LATE_PERCENT / 100.0) {
        g.shape.late += 1;
        at - HOUR_US - g.rng.below(5 * HOUR_US as u64) as i64
    } else {
        at
    };
    let profile_id = if anonymous {
        anonymous_profile(c)
    } else {
        known_profile(c)
    };
    let category = properties["category"]
        .as_str()
        .and_then(|s| CATEGORIES.iter().position(|x| *x == s))
        .map_or(NO_CATEGORY, |i| i as u8);
    let price_cents = properties["price"]
        .as_f64()
        .map_or(i64::MIN, |p| (p * 100.0).round() as i64);
    let mut event = Event {
        event_id: id.to_string(),
        message_id: uuid::Uuid::from_u64_pair(g.rng.next(), g.rng.next()).to_string(),
        user_id: if anonymous {
            String::new()
        } else {
            format!("user-{c}")
        },
        anonymous_id: format!("anon-{c:x}"),
        context: object(context(channel, c)),
        timestamp: Some(timestamp(happened)),
        original_timestamp: Some(timestamp(happened)),
        sent_at: Some(timestamp(at)),
        received_at: Some(timestamp(at)),
        channel: channel as i32,
        source_id: if channel == Channel::MobileApp {
            "src-ios".into()
        } else {
            "src-web".into()
        },
        profile_id,
        ..Event::default()
    };
    match name {
        PAGE => {
            event.set_type(EventType::Page);
            event.properties = object(properties);
        }
        IDENTIFY => {
            event.set_type(EventType::Identify);
            event.traits = object(
                json!({"email": format!("customer{c}@example.com"), "plan": PLANS[(c % 3) as usize], "first_name": "Alex"}),
            );
        }
        _ => {
            event.set_type(EventType::Track);
            event.event = NAMES[usize::from(name)].into();
            event.properties = object(properties);
        }
    }
    Typed {
        profile: profile_key(c, anonymous),
        at: happened,
        // The service orders events of the same microsecond by the id's low 64 bits,
        // unsigned: flipping the top bit keeps that order in a signed column.
        tie: (id.as_u64_pair().1 ^ (1 << 63)) as i64,
        name,
        category,
        channel: channel as u8,
        price_cents,
    }
    .write(baseline)?;
    g.counts[c as usize] += 1;
    g.shape.first_us = g.shape.first_us.min(happened);
    g.shape.last_us = g.shape.last_us.max(happened);
    push(g, id.to_string(), event, 0, deliveries)
}

/// One batch of deliveries.
struct Batch {
    ids: Vec<String>,
    profiles: Vec<String>,
    kinds: Vec<i16>,
    bodies: Vec<Vec<u8>>,
}

/// Reads the deliveries file on a thread of its own, a few batches ahead of the clients.
fn batches(
    path: &Path,
) -> anyhow::Result<Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Batch>>>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Batch>(4 * CLIENTS);
    let mut input = BufReader::with_capacity(1 << 20, File::open(path)?);
    std::thread::spawn(move || {
        loop {
            let mut batch = Batch {
                ids: Vec::with_capacity(BATCH),
                profiles: Vec::with_capacity(BATCH),
                kinds: Vec::with_capacity(BATCH),
                bodies: Vec::with_capacity(BATCH),
            };
            while batch.bodies.len() < BATCH {
                match Delivery::read(&mut input) {
                    Ok(Some(d)) => {
                        batch.ids.push(d.event_id);
                        batch.profiles.push(d.profile_id);
                        batch.kinds.push(d.kind);
                        batch.bodies.push(d.body);
                    }
                    Ok(None) => break,
                    Err(error) => {
                        eprintln!("reading the deliveries: {error}");
                        break;
                    }
                }
            }
            if batch.bodies.is_empty() || tx.blocking_send(batch).is_err() {
                return;
            }
        }
    });
    Ok(Arc::new(tokio::sync::Mutex::new(rx)))
}

/// The ceiling: the same rows inserted straight into `analytics_events`, one UNNEST
/// statement per batch by as many clients.
async fn raw_insert(db: &DatabaseConnection, deliveries: &Path) -> anyhow::Result<Run> {
    let feed = batches(deliveries)?;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (db, feed) = (db.clone(), feed.clone());
        tasks.push(tokio::spawn(async move {
            let (mut latencies, mut events) = (Vec::new(), 0);
            loop {
                let Some(batch) = feed.lock().await.recv().await else {
                    return anyhow::Ok((latencies, events));
                };
                events += batch.bodies.len();
                // Concurrent batches share redelivered ids: taking their locks in one
                // order (the service takes one delivery at a time) keeps them from
                // deadlocking on the unique index.
                let mut rows: Vec<(String, String, i16, Vec<u8>)> = batch
                    .ids
                    .into_iter()
                    .zip(batch.profiles)
                    .zip(batch.kinds)
                    .zip(batch.bodies)
                    .map(|(((i, p), k), b)| (i, p, k, b))
                    .collect();
                rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
                let (mut ids, mut profiles, mut kinds, mut bodies) =
                    (Vec::new(), Vec::new(), Vec::new(), Vec::new());
                for (i, p, k, b) in rows {
                    ids.push(i);
                    profiles.push(p);
                    kinds.push(k);
                    bodies.push(b);
                }
                let t = Instant::now();
                Insert::new(
                    "INSERT INTO analytics_events (event_id, profile_id, kind, body)",
                    vec![
                        Column::Text(ids),
                        Column::Text(profiles),
                        Column::Int2(kinds),
                        Column::Bytea(bodies),
                    ],
                )
                .in_order()
                .suffix("ON CONFLICT (event_id) DO NOTHING")
                .execute(&db)
                .await?;
                latencies.push(t.elapsed());
            }
        }));
    }
    let (mut latencies, mut events) = (Vec::new(), 0);
    for t in tasks {
        let (l, n) = t.await??;
        latencies.extend(l);
        events += n;
    }
    Ok(Run {
        events,
        elapsed: start.elapsed(),
        latencies,
    })
}

/// What `GetFunnel` answered and how fast.
struct FunnelFigures {
    p50: Duration,
    /// Reached per step, by group ("" for the total).
    counts: BTreeMap<String, Vec<u64>>,
}

async fn with_service(
    binary: &Path,
    database_url: &str,
    files: &Files,
    shape: &Shape,
    ceiling: &Run,
) -> anyhow::Result<FunnelFigures> {
    let port = free_port()?;
    let nowhere = format!("http://127.0.0.1:{}", free_port()?);
    let process = serve(
        binary,
        "analytics",
        &[
            ("WAYMARK_DATABASE_URL", database_url.to_owned()),
            ("WAYMARK_ANALYTICS_GRPC_ADDR", format!("127.0.0.1:{port}")),
            ("WAYMARK_PROFILE_ENDPOINT", nowhere),
            // The benchmark measures how long the funnel takes, not the refusal at the
            // default budget.
            ("WAYMARK_ANALYTICS_QUERY_BUDGET_MS", "600000".into()),
        ],
    )?;
    let endpoint = format!("http://127.0.0.1:{port}");
    wait_serving(&endpoint).await?;

    let feed = batches(&files.deliveries)?;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let feed = feed.clone();
        let channel = tonic::transport::Endpoint::from_shared(endpoint.clone())?
            .connect()
            .await?;
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut sum = DeliverResponse::default();
            let mut events = 0;
            loop {
                let Some(batch) = feed.lock().await.recv().await else {
                    return anyhow::Ok((latencies, sum, events));
                };
                events += batch.bodies.len();
                let mut grpc = tonic::client::Grpc::new(channel.clone())
                    .max_encoding_message_size(waymark_kit::grpc::MAX_MESSAGE_BYTES);
                grpc.ready().await?;
                let mut request = tonic::Request::new(EncodedDeliverRequest {
                    producer: "profile".into(),
                    events: batch.bodies,
                });
                request
                    .metadata_mut()
                    .insert("authorization", format!("Bearer {TOKEN}").parse()?);
                let path =
                    http::uri::PathAndQuery::from_static("/waymark.common.v1.EventSink/Deliver");
                let codec =
                    tonic_prost::ProstCodec::<EncodedDeliverRequest, DeliverResponse>::default();
                let t = Instant::now();
                let response = grpc.unary(request, path, codec).await?.into_inner();
                latencies.push(t.elapsed());
                anyhow::ensure!(
                    response.rejected.is_empty(),
                    "rejected: {:?}",
                    response.rejected.first()
                );
                sum.applied += response.applied;
                sum.duplicates += response.duplicates;
                sum.unattributed += response.unattributed;
            }
        }));
    }
    let (mut latencies, mut sum, mut events) = (Vec::new(), DeliverResponse::default(), 0);
    for t in tasks {
        let (l, s, n) = t.await??;
        latencies.extend(l);
        sum.applied += s.applied;
        sum.duplicates += s.duplicates;
        sum.unattributed += s.unattributed;
        events += n;
    }
    let service = Run {
        events,
        elapsed: start.elapsed(),
        latencies,
    };
    report(
        "waymark EventSink/Deliver into analytics",
        &service,
        &[("ceiling", ceiling)],
    );
    println!(
        "  applied {:.0} events/s: {} applied (merge notices included), {} duplicates counted of {} redelivered, {} unattributed (goal: at least 50000/s)",
        f64::from(sum.applied) / service.elapsed.as_secs_f64(),
        sum.applied,
        sum.duplicates,
        shape.duplicates,
        sum.unattributed,
    );
    println!(
        "  analytics process resident memory after loading: {}",
        resident(process.id())
    );

    let mut client = AnalyticsServiceClient::connect(endpoint).await?;
    let (after_load, _) = time_funnel(&mut client, AFTER_LOAD_RUNS).await?;
    let pct = |latencies: &[Duration], p: f64| {
        latencies[((latencies.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e3
    };
    println!(
        "  GetFunnel right after the load, beside the compaction it starts once deliveries pause: p50 {:.1} ms   p99 {:.1} ms   max {:.1} ms of {AFTER_LOAD_RUNS}",
        pct(&after_load, 0.5),
        pct(&after_load, 0.99),
        pct(&after_load, 1.0),
    );
    let waited = wait_idle(process.id()).await;
    println!(
        "  waited {:.1} s for the service to go idle (its CPU time still for a second)",
        waited.as_secs_f64()
    );
    let (latencies, answer) = time_funnel(&mut client, FUNNEL_RUNS).await?;
    let total = answer.total.clone().unwrap_or_default();
    println!(
        "GetFunnel {} (ordered, 30d, unique customers, by category) over {} customers, {} events, service idle: p50 {:.1} ms   p99 {:.1} ms   max {:.1} ms of {FUNNEL_RUNS} (goal: p99 under 250 ms)",
        FUNNEL
            .iter()
            .map(|(n, floor)| match floor {
                Some(c) => format!("{} [price > {}]", NAMES[usize::from(*n)], c / 100),
                None => NAMES[usize::from(*n)].to_owned(),
            })
            .collect::<Vec<_>>()
            .join(" -> "),
        answer.customers_scanned,
        answer.events_scanned,
        pct(&latencies, 0.5),
        pct(&latencies, 0.99),
        pct(&latencies, 1.0),
    );
    println!(
        "  reached per step: {}",
        reached(&total)
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(" -> ")
    );
    drop(process);
    Ok(FunnelFigures {
        p50: latencies[latencies.len() / 2],
        counts: counts_of(&answer),
    })
}

/// The latencies of `runs` calls of the benchmark's funnel after [`WARM_UP`] untimed ones,
/// sorted, and the last answer.
async fn time_funnel(
    client: &mut AnalyticsServiceClient<tonic::transport::Channel>,
    runs: usize,
) -> anyhow::Result<(Vec<Duration>, GetFunnelResponse)> {
    let request = funnel_request();
    let mut latencies = Vec::with_capacity(runs);
    let mut answer = None;
    for i in 0..WARM_UP + runs {
        let mut r = tonic::Request::new(request.clone());
        r.metadata_mut()
            .insert("authorization", format!("Bearer {TOKEN}").parse()?);
        let t = Instant::now();
        let response = client.get_funnel(r).await?.into_inner();
        if i >= WARM_UP {
            latencies.push(t.elapsed());
        }
        answer = Some(response);
    }
    latencies.sort_unstable();
    Ok((latencies, answer.context("no GetFunnel answer")?))
}

/// Waits until process `pid` has used under 2% of a core for a second (two minutes at
/// most); returns how long that took.
async fn wait_idle(pid: u32) -> Duration {
    let cpu_ticks = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the parenthesised command name: utime and stime are the 12th and
        // 13th.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
    };
    let started = Instant::now();
    let mut last = cpu_ticks();
    while started.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = cpu_ticks();
        match (last, now) {
            (Some(a), Some(b)) if b.saturating_sub(a) <= 2 => break,
            (_, None) => break,
            _ => last = now,
        }
    }
    started.elapsed()
}

fn reached(group: &FunnelGroup) -> Vec<u64> {
    group.steps.iter().map(|s| s.reached).collect()
}

/// Reached per step of a funnel's answer, by group ("" for the total).
fn counts_of(answer: &GetFunnelResponse) -> BTreeMap<String, Vec<u64>> {
    let mut counts = BTreeMap::new();
    counts.insert(
        String::new(),
        reached(&answer.total.clone().unwrap_or_default()),
    );
    for g in &answer.groups {
        counts.insert(g.group.clone(), reached(g));
    }
    counts
}

fn resident(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(|l| l.trim_start_matches("VmRSS:").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn funnel_request() -> GetFunnelRequest {
    GetFunnelRequest {
        steps: FUNNEL
            .iter()
            .map(|(name, floor)| EventMatcher {
                event: NAMES[usize::from(*name)].into(),
                condition: floor
                    .map(|c| format!("properties.price > {:.1}", c as f64 / 100.0))
                    .unwrap_or_default(),
            })
            .collect(),
        order: FunnelOrder::Ordered as i32,
        window: "30d".into(),
        counting: FunnelCounting::UniqueCustomers as i32,
        breakdown: Some(Breakdown {
            by: Some(breakdown::By::Property("category".into())),
        }),
        breakdown_limit: CATEGORIES.len() as u32 + 1,
        ..GetFunnelRequest::default()
    }
}

/// Loads the baseline table, indexes and analyzes it, and runs the funnel's SQL: its
/// median time and reached per step by group.
async fn sql_baseline(
    url: &str,
    path: &Path,
    shape: &Shape,
) -> anyhow::Result<(Duration, BTreeMap<String, Vec<u64>>)> {
    // A plain connection: the table is the benchmark's own, in the default schema.
    let db = sea_orm::Database::connect(
        sea_orm::ConnectOptions::new(url)
            .max_connections(8)
            .to_owned(),
    )
    .await?;
    db.execute_unprepared(
        "CREATE TABLE funnel_events (
            customer_id BIGINT NOT NULL,
            at BIGINT NOT NULL,
            tie BIGINT NOT NULL,
            name TEXT NOT NULL,
            category TEXT NOT NULL,
            price_cents BIGINT,
            channel SMALLINT NOT NULL
        )",
    )
    .await?;
    let loading = Instant::now();
    let mut input = BufReader::with_capacity(1 << 20, File::open(path)?);
    let mut rows = 0usize;
    let mut pending = Vec::new();
    loop {
        let mut columns = BaselineRows::default();
        while columns.customers.len() < LOAD_BATCH {
            let Some(t) = Typed::read(&mut input)? else {
                break;
            };
            // Customer ids resolved through the merges: an anonymous profile that was
            // merged is its customer.
            let c = t.profile & ((1 << 40) - 1);
            let customer = if shape.merged[c as usize] {
                c
            } else {
                t.profile
            };
            columns.customers.push(customer);
            columns.ats.push(t.at);
            columns.ties.push(t.tie);
            columns.names.push(NAMES[usize::from(t.name)].to_owned());
            columns.categories.push(
                CATEGORIES
                    .get(usize::from(t.category))
                    .map_or(String::new(), |c| (*c).to_owned()),
            );
            columns
                .prices
                .push((t.price_cents != i64::MIN).then_some(t.price_cents));
            columns.channels.push(i16::from(t.channel));
        }
        if columns.customers.is_empty() {
            break;
        }
        rows += columns.customers.len();
        let db = db.clone();
        pending.push(tokio::spawn(async move {
            Insert::new(
                "INSERT INTO funnel_events (customer_id, at, tie, name, category, price_cents, channel)",
                vec![
                    Column::Int8(columns.customers),
                    Column::Int8(columns.ats),
                    Column::Int8(columns.ties),
                    Column::Text(columns.names),
                    Column::Text(columns.categories),
                    Column::NullableInt8(columns.prices),
                    Column::Int2(columns.channels),
                ],
            )
            .execute(&db)
            .await
        }));
        if pending.len() >= CLIENTS {
            for p in pending.drain(..) {
                p.await??;
            }
        }
    }
    for p in pending {
        p.await??;
    }
    db.execute_unprepared(
        "CREATE INDEX funnel_events_steps ON funnel_events (name, customer_id, at, tie) INCLUDE (price_cents, category)",
    )
    .await?;
    db.execute_unprepared("VACUUM ANALYZE funnel_events")
        .await?;
    println!(
        "  SQL baseline table: {rows} distinct events (customer ids resolved through merges, duplicates removed) loaded, \
         indexed on (name, customer_id, at, tie) INCLUDE (price_cents, category) and analyzed in {:.1} s",
        loading.elapsed().as_secs_f64()
    );
    let query = funnel_sql();
    let mut times = Vec::new();
    let mut counts = BTreeMap::new();
    for _ in 0..SQL_RUNS {
        let txn = db.begin().await?;
        txn.execute_unprepared("SET LOCAL work_mem = '256MB'")
            .await?;
        let t = Instant::now();
        let result: Vec<SqlGroup> = sql::query_as(&txn, &query, vec![]).await?;
        times.push(t.elapsed());
        txn.commit().await?;
        counts = result
            .into_iter()
            .map(|g| {
                let label = if g.total {
                    String::new()
                } else if g.grp.is_empty() {
                    "(none)".to_owned()
                } else {
                    g.grp
                };
                (
                    label,
                    vec![
                        g.r1 as u64,
                        g.r2 as u64,
                        g.r3 as u64,
                        g.r4 as u64,
                        g.r5 as u64,
                    ],
                )
            })
            .collect();
    }
    db.close().await.ok();
    times.sort_unstable();
    Ok((times[SQL_RUNS / 2], counts))
}

/// One insert's worth of baseline rows, column by column.
#[derive(Default)]
struct BaselineRows {
    customers: Vec<i64>,
    ats: Vec<i64>,
    ties: Vec<i64>,
    names: Vec<String>,
    categories: Vec<String>,
    prices: Vec<Option<i64>>,
    channels: Vec<i16>,
}

#[derive(FromQueryResult)]
struct SqlGroup {
    total: bool,
    grp: String,
    r1: i64,
    r2: i64,
    r3: i64,
    r4: i64,
    r5: i64,
}

/// The funnel in SQL, with the service's semantics: per customer every attempt starting at
/// a first-step event, each later step the first matching event after the previous one
/// (ordered by time, then id) no later than 30 days after the first; the customer counted
/// by their furthest attempt, the earliest of equals, under its first step's category.
fn funnel_sql() -> String {
    let name = |i: usize| NAMES[usize::from(FUNNEL[i].0)];
    let mut laterals = String::new();
    for (i, (_, floor)) in FUNNEL.iter().enumerate().skip(1) {
        let previous = if i == 1 {
            "s".to_owned()
        } else {
            format!("s{i}")
        };
        let floor = floor
            .map(|c| format!(" AND e.price_cents > {c}"))
            .unwrap_or_default();
        laterals.push_str(&format!(
            " LEFT JOIN LATERAL (SELECT e.at, e.tie FROM funnel_events e \
               WHERE e.name = '{}' AND e.customer_id = s.customer_id{floor} \
               AND (e.at, e.tie) > ({previous}.at, {previous}.tie) AND e.at <= s.at + {WINDOW_US} \
               ORDER BY e.at, e.tie LIMIT 1) s{} ON true",
            name(i),
            i + 1
        ));
    }
    let reached = (2..=FUNNEL.len())
        .map(|i| format!("(s{i}.at IS NOT NULL)::int"))
        .collect::<Vec<_>>()
        .join(" + ");
    let counts = (1..=FUNNEL.len())
        .map(|k| format!("count(*) FILTER (WHERE reached >= {k}) AS r{k}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "WITH attempts AS (
            SELECT s.customer_id, s.at, s.tie, s.category, 1 + {reached} AS reached
            FROM funnel_events s{laterals}
            WHERE s.name = '{}'
        ), best AS (
            SELECT DISTINCT ON (customer_id) customer_id, category, reached
            FROM attempts ORDER BY customer_id, reached DESC, at, tie
        )
        SELECT GROUPING(category) = 1 AS total, COALESCE(category, '') AS grp, {counts}
        FROM best GROUP BY ROLLUP (category)",
        name(0)
    )
}

/// Fails loudly when SQL and `GetFunnel` disagree on any step of any group.
fn compare(
    service: &BTreeMap<String, Vec<u64>>,
    sql: &BTreeMap<String, Vec<u64>>,
) -> anyhow::Result<()> {
    let mut mismatches = Vec::new();
    for (group, counts) in sql {
        let label = if group.is_empty() { "total" } else { group };
        match service.get(group) {
            Some(s) if s == counts => {}
            other => mismatches.push(format!("{label}: GetFunnel {other:?}, SQL {counts:?}")),
        }
    }
    for group in service.keys().filter(|g| !sql.contains_key(*g)) {
        mismatches.push(format!("{group}: only in GetFunnel"));
    }
    if mismatches.is_empty() {
        println!(
            "  SQL and GetFunnel agree on every step of the total and of {} groups",
            sql.len() - 1
        );
        return Ok(());
    }
    eprintln!("!!! MISMATCH between GetFunnel and the SQL baseline:");
    for m in &mismatches {
        eprintln!("!!!   {m}");
    }
    anyhow::bail!(
        "GetFunnel and the SQL baseline disagree on {} groups",
        mismatches.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SQL baseline only means something when it answers what `GetFunnel` answers: a
    /// small stream through the analytics core in this process and through the SQL.
    #[tokio::test]
    async fn the_sql_baseline_counts_what_get_funnel_counts() -> anyhow::Result<()> {
        let postgres = std::env::var("WAYMARK_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let dir = std::env::temp_dir().join(format!(
            "waymark-analytics-sql-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir)?;
        let files = Files {
            deliveries: dir.join("deliveries.bin"),
            baseline: dir.join("baseline.bin"),
        };
        let shape = generate(30_000, 1_000, &files)?;

        let service_db = BenchDb::create(&postgres).await?;
        let db = waymark_kit::db::connect(&service_db.url, waymark_analytics::SERVICE, 4).await?;
        waymark_analytics::migrate(&db).await?;
        let core = waymark_analytics::Analytics::new(db.clone(), Default::default(), None);
        core.prepare().await?;
        let mut input = BufReader::new(File::open(&files.deliveries)?);
        let mut batch = Vec::new();
        loop {
            let next = Delivery::read(&mut input)?;
            if let Some(d) = &next {
                batch.push(Event::decode(d.body.as_slice())?);
            }
            if batch.len() == BATCH || (next.is_none() && !batch.is_empty()) {
                core.deliver(std::mem::take(&mut batch)).await?;
            }
            if next.is_none() {
                break;
            }
        }
        let service = counts_of(&core.funnel(funnel_request()).await?);
        db.close().await.ok();
        service_db.drop().await?;

        let sql_db = BenchDb::create(&postgres).await?;
        let baseline = sql_baseline(&sql_db.url, &files.baseline, &shape).await;
        sql_db.drop().await?;
        std::fs::remove_dir_all(&dir).ok();
        let (_, sql) = baseline?;
        let total = &sql[""];
        assert!(
            total[4] > 0 && total[4] < total[0] && sql.len() > 2,
            "the funnel must have converting and dropping customers in several groups: {sql:?}"
        );
        compare(&service, &sql)
    }
}
