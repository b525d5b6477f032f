//! The system benchmark: the real `waymark` binary as separate processes (`waymark serve
//! ingest`, `waymark serve profile`) on a fresh PostgreSQL database and Redis, fed through
//! the public HTTP API as SDKs feed it: gzip `/v1/batch` requests of 100 events over 8
//! connections. The stream is a customer base's: anonymous web visits that identify later,
//! calls known only by a phone number and e-mail clicks known only by an address (each with
//! a fresh anonymous id, as contact centres and e-mail systems send them), app events by
//! user id; 5% of the customers send 30% of the events. A second run of the same stream
//! sends 10% of all events to one customer (a test account, a shared device, a busy
//! contact-centre caller), whose profile then takes a share of every batch.
//!
//! Applied events are counted by the profile service's timeline (every applied event has
//! its row), polled once the last request was acknowledged. The ceiling of each run is its
//! own acknowledgement rate: events cannot be applied end to end faster than ingestion
//! accepts them.

use std::io::Write;
use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use sea_orm::{ConnectionTrait, Database};
use serde_json::{Value, json};
use waymark_proto::ingest::v1::CreateSourceRequest;
use waymark_proto::ingest::v1::ingest_service_client::IngestServiceClient;

use crate::BenchDb;
use crate::profile_bench::{drop_keys, wait_serving};

pub(crate) const TOKEN: &str = "bench-admin-token-0123456789";
/// Events per request, as SDKs batch them.
const BATCH: usize = 100;
/// Concurrent HTTP connections posting.
const CONNECTIONS: usize = 8;
/// Share of the customers that are busy, and the share of events they send.
const BUSY_CUSTOMERS: f64 = 0.05;
const BUSY_SHARE: f64 = 0.30;
/// Share of all events the hot customer receives in the hot variant.
const HOT_SHARE: f64 = 0.10;
/// Events of one web visit before the next visit's fresh anonymous id.
const VISIT_EVENTS: u32 = 8;
/// The longest the profile service may take to apply what was acknowledged.
const APPLY_TIMEOUT: Duration = Duration::from_secs(900);

/// What one variant measured.
struct Outcome {
    events: usize,
    acked: Duration,
    applied: Duration,
}

impl Outcome {
    fn acked_rate(&self) -> f64 {
        self.events as f64 / self.acked.as_secs_f64()
    }

    fn applied_rate(&self) -> f64 {
        self.events as f64 / self.applied.as_secs_f64()
    }
}

/// Runs both variants with `events` events each over `customers` customers, with the
/// `waymark` binary at `binary`.
pub async fn run(
    postgres: &str,
    redis_url: &str,
    binary: &Path,
    events: usize,
    customers: usize,
) -> anyhow::Result<()> {
    ensure_binary(binary)?;
    println!(
        "system benchmark: `waymark serve ingest` and `waymark serve profile` as processes, PostgreSQL + Redis, \
         {events} events over {customers} customers posted to /v1/batch gzip in batches of {BATCH} by {CONNECTIONS} connections; \
         per event 45% anonymous page view (fresh anonymous id every {VISIT_EVENTS} events of a customer), 10% identify \
         (user id, visit's anonymous id, e-mail, phone), 15% app track by user id, 15% call known only by phone, \
         15% e-mail click known only by address (calls and clicks each with a fresh anonymous id); \
         {:.0}% of customers send {:.0}% of events",
        BUSY_CUSTOMERS * 100.0,
        BUSY_SHARE * 100.0
    );
    let normal = variant(postgres, redis_url, binary, events, customers, false).await?;
    print_outcome("system, every customer a share", &normal, None);
    let hot = variant(postgres, redis_url, binary, events, customers, true).await?;
    print_outcome(
        &format!("system, one customer {:.0}% of events", HOT_SHARE * 100.0),
        &hot,
        Some(&normal),
    );
    println!(
        "  goals on this machine: at least 20000 events/s applied end to end; the hot-customer run at least 0.80 of the other (measured {:.2})",
        hot.applied_rate() / normal.applied_rate()
    );
    Ok(())
}

fn print_outcome(name: &str, outcome: &Outcome, normal: Option<&Outcome>) {
    let lag = outcome.applied.saturating_sub(outcome.acked);
    print!(
        "{name:<44} acked {:>8.0} events/s   applied {:>8.0} events/s end to end   lag after last ack {:>6.2} s   ratio {:.2} of acked (ceiling)",
        outcome.acked_rate(),
        outcome.applied_rate(),
        lag.as_secs_f64(),
        outcome.applied_rate() / outcome.acked_rate(),
    );
    if let Some(normal) = normal {
        print!(
            "   ratio {:.2} of the run without a hot customer ({:.0}/s)",
            outcome.applied_rate() / normal.applied_rate(),
            normal.applied_rate()
        );
    }
    println!();
}

/// Fails with a hint when the `waymark` binary a benchmark runs is not built.
pub(crate) fn ensure_binary(binary: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(
        binary.exists(),
        "no waymark binary at {} (make bench builds it; or pass --waymark-bin)",
        binary.display()
    );
    Ok(())
}

/// A free local port (bound, then released for the process to take).
pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A service process, stopped when dropped (also when the run fails half-way).
pub(crate) struct Process(Child);

impl Process {
    /// The process id, to read its resident memory.
    pub(crate) fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

/// Starts `waymark serve <service>` with `env` on top of the benchmark's common settings.
pub(crate) fn serve(
    binary: &Path,
    service: &str,
    env: &[(&str, String)],
) -> anyhow::Result<Process> {
    let mut command = Command::new(binary);
    command
        .args(["serve", service])
        .env("WAYMARK_ADMIN_TOKEN", TOKEN)
        .env("WAYMARK_AUTO_MIGRATE", "true")
        .env("WAYMARK_LOG_FILTER", "warn")
        .env("WAYMARK_DRAIN_SECS", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (key, value) in env {
        command.env(key, value);
    }
    let child = command
        .spawn()
        .with_context(|| format!("starting {} serve {service}", binary.display()))?;
    Ok(Process(child))
}

async fn variant(
    postgres: &str,
    redis_url: &str,
    binary: &Path,
    events: usize,
    customers: usize,
    hot: bool,
) -> anyhow::Result<Outcome> {
    let bench_db = BenchDb::create(postgres).await?;
    bench_db.checkpoint().await?;
    let prefix = format!("bench-{}:", uuid::Uuid::new_v4().simple());
    let (ingest_grpc, ingest_http, profile_grpc) = (free_port()?, free_port()?, free_port()?);
    let nowhere = format!("http://127.0.0.1:{}", free_port()?);
    let profile = serve(
        binary,
        "profile",
        &[
            ("WAYMARK_DATABASE_URL", bench_db.url.clone()),
            ("WAYMARK_REDIS_URL", redis_url.to_owned()),
            ("WAYMARK_PROFILE_CACHE_KEY_PREFIX", prefix.clone()),
            (
                "WAYMARK_PROFILE_GRPC_ADDR",
                format!("127.0.0.1:{profile_grpc}"),
            ),
            (
                "WAYMARK_INGEST_ENDPOINT",
                format!("http://127.0.0.1:{ingest_grpc}"),
            ),
            // Downstream services do not exist yet: their rows are kept, as in production.
            ("WAYMARK_ORCHESTRATOR_ENDPOINT", nowhere.clone()),
            ("WAYMARK_ANALYTICS_ENDPOINT", nowhere),
        ],
    )?;
    let ingest = serve(
        binary,
        "ingest",
        &[
            ("WAYMARK_DATABASE_URL", bench_db.url.clone()),
            (
                "WAYMARK_INGEST_GRPC_ADDR",
                format!("127.0.0.1:{ingest_grpc}"),
            ),
            (
                "WAYMARK_INGEST_HTTP_ADDR",
                format!("127.0.0.1:{ingest_http}"),
            ),
            (
                "WAYMARK_PROFILE_ENDPOINT",
                format!("http://127.0.0.1:{profile_grpc}"),
            ),
            ("WAYMARK_DEFAULT_RATE_LIMIT_PER_SECOND", "100000000".into()),
        ],
    )?;
    let measured = measure(
        &bench_db.url,
        ingest_grpc,
        ingest_http,
        profile_grpc,
        events,
        customers,
        hot,
    )
    .await;
    drop((ingest, profile));
    bench_db.drop().await?;
    drop_keys(redis_url, &prefix).await?;
    measured
}

async fn measure(
    database_url: &str,
    ingest_grpc: u16,
    ingest_http: u16,
    profile_grpc: u16,
    events: usize,
    customers: usize,
    hot: bool,
) -> anyhow::Result<Outcome> {
    let ingest_endpoint = format!("http://127.0.0.1:{ingest_grpc}");
    wait_serving(&ingest_endpoint).await?;
    wait_serving(&format!("http://127.0.0.1:{profile_grpc}")).await?;
    let mut admin = IngestServiceClient::connect(ingest_endpoint).await?;
    let mut request = tonic::Request::new(CreateSourceRequest {
        name: "bench".into(),
        rate_limit_per_second: 0,
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse()?);
    let key = admin.create_source(request).await?.into_inner().write_key;

    // Every body is built and compressed first, so the clients measure the services.
    let bodies = Arc::new(Stream::new(customers, hot).bodies(events)?);
    let total = bodies.len() * BATCH;
    let next = Arc::new(AtomicUsize::new(0));
    let url = format!("http://127.0.0.1:{ingest_http}/v1/batch");
    let start = Instant::now();
    let mut posters = Vec::new();
    for _ in 0..CONNECTIONS {
        let (bodies, next, url, key) = (bodies.clone(), next.clone(), url.clone(), key.clone());
        posters.push(tokio::spawn(async move {
            // One client each: its own keep-alive connection.
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .build()?;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(body) = bodies.get(i) else {
                    return anyhow::Ok(());
                };
                let response = client
                    .post(&url)
                    .basic_auth(&key, Some(""))
                    .header("content-type", "application/json")
                    .header("content-encoding", "gzip")
                    .body(body.clone())
                    .send()
                    .await?;
                let status = response.status();
                let text = response.text().await?;
                anyhow::ensure!(status.as_u16() == 200, "status {status}: {text}");
            }
        }));
    }
    for poster in posters {
        poster.await??;
    }
    let acked = start.elapsed();
    let applied = wait_applied(database_url, total as i64, start).await?;
    Ok(Outcome {
        events: total,
        acked,
        applied,
    })
}

/// Waits until the profile service's timeline holds `total` events; returns when, from
/// `start`.
async fn wait_applied(database_url: &str, total: i64, start: Instant) -> anyhow::Result<Duration> {
    let db = Database::connect(database_url).await?;
    let mut last = -1;
    let mut last_change = Instant::now();
    loop {
        let row = db
            .query_one_raw(sea_orm::Statement::from_string(
                sea_orm::DbBackend::Postgres,
                "SELECT count(*) FROM profile.timeline",
            ))
            .await?
            .context("count returned no row")?;
        let applied: i64 = row.try_get_by_index(0)?;
        if applied >= total {
            let at = start.elapsed();
            db.close().await.ok();
            return Ok(at);
        }
        if applied != last {
            (last, last_change) = (applied, Instant::now());
        }
        anyhow::ensure!(
            last_change.elapsed() < APPLY_TIMEOUT,
            "the profile service applied {applied} of {total} events and stopped"
        );
        // A count reads the whole table: often enough only near the end, where it sets
        // the figure, so that counting does not take the database from the service.
        let near_the_end = applied * 100 >= total * 97;
        tokio::time::sleep(Duration::from_millis(if near_the_end { 50 } else { 1000 })).await;
    }
}

/// The benchmark's stream, generated deterministically.
pub(crate) struct Stream {
    customers: usize,
    hot: bool,
    /// Events each customer has produced so far (its web visits roll over with them).
    produced: Vec<u32>,
    rng: u64,
}

impl Stream {
    pub(crate) fn new(customers: usize, hot: bool) -> Self {
        Self {
            customers,
            hot,
            produced: vec![0; customers],
            rng: 0x9E37_79B9_7F4A_7C15,
        }
    }

    /// A uniform number in [0, 1).
    pub(crate) fn uniform(&mut self) -> f64 {
        // xorshift64*: fast, and the same stream every run.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }

    fn customer(&mut self) -> usize {
        if self.hot && self.uniform() < HOT_SHARE {
            return 0;
        }
        let busy = ((self.customers as f64 * BUSY_CUSTOMERS) as usize).max(1);
        // Customer 0 is the hot one: the others share the rest as the normal run does.
        let pick = self.uniform();
        if self.uniform() < BUSY_SHARE {
            1 + (pick * busy as f64) as usize % busy
        } else {
            1 + busy + (pick * (self.customers - busy - 1) as f64) as usize
        }
    }

    pub(crate) fn event(&mut self, i: usize) -> Value {
        let c = self.customer();
        let seen = self.produced[c];
        self.produced[c] += 1;
        let visit = format!("web-{c}-{}", seen / VISIT_EVENTS);
        let (user, email, phone) = (
            format!("cust-{c}"),
            format!("customer{c}@example.com"),
            format!("+1415{c:07}"),
        );
        let message_id = format!("m-{i}");
        let kind = self.uniform();
        if kind < 0.45 {
            json!({"type": "page", "anonymousId": visit, "name": "Pricing", "messageId": message_id})
        } else if kind < 0.55 {
            json!({"type": "identify", "userId": user, "anonymousId": visit, "messageId": message_id,
                   "traits": {"email": email, "phone": phone, "plan": "pro"}})
        } else if kind < 0.70 {
            let (name, properties) = match i % 3 {
                0 => ("Order Completed", json!({"revenue": 42.5})),
                1 => ("Added to Cart", json!({"sku": "sku-7"})),
                _ => ("Product Viewed", json!({"sku": "sku-7"})),
            };
            json!({"type": "track", "userId": user, "event": name, "properties": properties,
                   "messageId": message_id, "context": {"library": {"name": "analytics-ios"}}})
        } else if kind < 0.85 {
            json!({"type": "track", "anonymousId": format!("call-{i}"), "event": "Call Started",
                   "messageId": message_id,
                   "context": {"channel": "contact_center", "traits": {"phone": phone}}})
        } else {
            json!({"type": "track", "anonymousId": format!("click-{i}"), "event": "Email Clicked",
                   "messageId": message_id,
                   "context": {"channel": "email", "traits": {"email": email}}})
        }
    }

    /// `events` events (rounded down to whole batches) as gzip `/v1/batch` bodies.
    fn bodies(mut self, events: usize) -> anyhow::Result<Vec<bytes::Bytes>> {
        let mut bodies = Vec::with_capacity(events / BATCH);
        for b in 0..events / BATCH {
            let batch: Vec<Value> = (0..BATCH).map(|i| self.event(b * BATCH + i)).collect();
            let json = serde_json::to_vec(&json!({ "batch": batch }))?;
            let mut gzip =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            gzip.write_all(&json)?;
            bodies.push(gzip.finish()?.into());
        }
        Ok(bodies)
    }
}

/// Where `make bench` builds the `waymark` binary: beside this benchmark's own.
pub fn default_binary() -> PathBuf {
    std::env::current_exe()
        .map(|exe| exe.with_file_name("waymark"))
        .unwrap_or_else(|_| PathBuf::from("target/release/waymark"))
}
