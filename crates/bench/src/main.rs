//! `make bench`: ingestion throughput and acknowledgement latency through gRPC and
//! `/v1/batch` into PostgreSQL, next to the ceiling measured in the same run: the same
//! rows (event log + outbox) inserted straight into PostgreSQL by as many clients, one
//! transaction per batch, with the fastest statements we know (array-parameter INSERTs).
//! The profile suite is `profile_bench`, the whole platform as processes `system_bench`,
//! journeys (end-to-end latency and the engine's throughput) `journey_bench`, analytics
//! (aggregation rate and funnel latency against PostgreSQL) `analytics_bench`.

mod analytics_bench;
mod echo;
mod journey_bench;
mod lean;
mod profile_bench;
mod system_bench;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use prost::Message;
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, TransactionTrait};
use tokio::net::TcpListener;
use waymark_ingest::store::{self, EventRow};
use waymark_kit::CancellationToken;
use waymark_kit::config::Config;
use waymark_kit::secret::Secret;
use waymark_proto::common::v1::{Event, EventType};
use waymark_proto::ingest::v1::ingest_service_client::IngestServiceClient;
use waymark_proto::ingest::v1::{CreateSourceRequest, IngestRequest};

/// The allocator `waymark` serves with, so the figures are the served binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ADMIN_TOKEN: &str = "bench-admin-token-0123456789";

#[derive(Parser)]
struct Args {
    /// PostgreSQL server URL with a database that can CREATE DATABASE.
    #[arg(
        long,
        env = "WAYMARK_TEST_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    postgres: String,
    /// Events per run.
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    /// Events per batch.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Which benchmarks: ingest, profile, system, journeys, analytics or all.
    #[arg(long, default_value = "all")]
    suite: String,
    /// Redis for the profile cache.
    #[arg(
        long,
        env = "WAYMARK_TEST_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    redis: String,
    /// Events applied by the profile benchmark.
    #[arg(long, default_value_t = 50_000)]
    profile_events: usize,
    /// GetProfile calls in the profile benchmark.
    #[arg(long, default_value_t = 50_000)]
    reads: usize,
    /// Events per run of the system benchmark (whole batches of 100): enough for the hot
    /// customer's history to grow as a day's would.
    #[arg(long, default_value_t = 300_000)]
    system_events: usize,
    /// Customers in the system benchmark's stream.
    #[arg(long, default_value_t = 20_000)]
    customers: usize,
    /// Seconds of sustained load in the journey benchmark's latency part (0 skips it).
    #[arg(long, default_value_t = 30)]
    journey_seconds: u64,
    /// Events per second posted in the journey benchmark's latency part.
    #[arg(long, default_value_t = 2000)]
    journey_rate: usize,
    /// Resolved events delivered in the journey benchmark's throughput part.
    #[arg(long, default_value_t = 100_000)]
    engine_events: usize,
    /// Events delivered to the analytics service in the analytics benchmark.
    #[arg(long, default_value_t = 10_000_000)]
    analytics_events: usize,
    /// Customers in the analytics benchmark's stream.
    #[arg(long, default_value_t = 1_000_000)]
    analytics_customers: usize,
    /// The `waymark` binary the system benchmark runs (default: beside this one).
    #[arg(long)]
    waymark_bin: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        [
            "all",
            "ingest",
            "profile",
            "system",
            "journeys",
            "analytics"
        ]
        .contains(&args.suite.as_str()),
        "--suite must be ingest, profile, system, journeys, analytics or all, not {:?}",
        args.suite
    );
    anyhow::ensure!(
        args.customers >= 100,
        "--customers must be at least 100, not {}",
        args.customers
    );
    let binary = args
        .waymark_bin
        .clone()
        .unwrap_or_else(system_bench::default_binary);
    if args.suite == "all" || args.suite == "analytics" {
        analytics_bench::run(
            &args.postgres,
            &binary,
            args.analytics_events,
            args.analytics_customers,
        )
        .await?;
    }
    if args.suite == "analytics" {
        return Ok(());
    }
    if args.suite == "all" || args.suite == "journeys" {
        journey_bench::run(
            &args.postgres,
            &args.redis,
            &binary,
            args.journey_seconds,
            args.journey_rate,
            args.engine_events,
            args.customers,
        )
        .await?;
    }
    if args.suite == "journeys" {
        return Ok(());
    }
    if args.suite == "all" || args.suite == "system" {
        system_bench::run(
            &args.postgres,
            &args.redis,
            &binary,
            args.system_events,
            args.customers,
        )
        .await?;
    }
    if args.suite == "system" {
        return Ok(());
    }
    if args.suite == "all" || args.suite == "profile" {
        profile_bench::run(
            &args.postgres,
            &args.redis,
            args.profile_events,
            args.reads,
            args.clients,
        )
        .await?;
    }
    if args.suite == "profile" {
        return Ok(());
    }
    println!(
        "ingest benchmark: {} events, batches of {}, {} concurrent clients, PostgreSQL, 2-core machine",
        args.events, args.batch, args.clients
    );

    let ceiling_db = BenchDb::create(&args.postgres).await?;
    let db = waymark_kit::db::connect(&ceiling_db.url, waymark_ingest::SERVICE, 16).await?;
    waymark_ingest::migrate(&db).await?;
    ceiling_db.checkpoint().await?;
    let ceiling = raw_insert(&db, &args).await?;
    db.close().await.ok();
    ceiling_db.drop().await?;
    report(
        "ceiling: multi-row INSERT of events + outbox rows",
        &ceiling,
        &[],
    );

    let grpc_db = BenchDb::create(&args.postgres).await?;
    grpc_db.checkpoint().await?;
    let grpc = through_service(&grpc_db.url, &args, Transport::Grpc).await?;
    grpc_db.drop().await?;
    report(
        "waymark gRPC Ingest (durable ack)",
        &grpc,
        &[("ceiling", &ceiling)],
    );

    let http_db = BenchDb::create(&args.postgres).await?;
    http_db.checkpoint().await?;
    let http = through_service(&http_db.url, &args, Transport::Http).await?;
    http_db.drop().await?;
    report(
        "waymark HTTP /v1/batch (durable ack)",
        &http,
        &[("ceiling", &ceiling)],
    );
    Ok(())
}

pub(crate) struct Run {
    events: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

/// Prints `run`'s rate and latency, and its ratio to each named ceiling.
pub(crate) fn report(name: &str, run: &Run, ceilings: &[(&str, &Run)]) {
    let rate = run.events as f64 / run.elapsed.as_secs_f64();
    let mut lat = run.latencies.clone();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    print!(
        "{name:<52} {rate:>10.0} ops/s   p50 {:>7.2} ms   p99 {:>7.2} ms",
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3
    );
    for (ceiling, c) in ceilings {
        let c_rate = c.events as f64 / c.elapsed.as_secs_f64();
        print!("   ratio {:.2} of {ceiling} ({c_rate:.0}/s)", rate / c_rate);
    }
    println!();
}

/// A database of the benchmark's own, dropped when the run is done.
pub(crate) struct BenchDb {
    admin_url: String,
    name: String,
    pub url: String,
}

impl BenchDb {
    pub(crate) async fn create(admin_url: &str) -> anyhow::Result<Self> {
        let name = format!("wm_bench_{}", uuid::Uuid::new_v4().simple());
        let admin = Database::connect(admin_url)
            .await
            .context("connecting to PostgreSQL")?;
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await?;
        admin.close().await.ok();
        let base = admin_url.rsplit_once('/').map_or(admin_url, |(b, _)| b);
        Ok(Self {
            admin_url: admin_url.to_owned(),
            url: format!("{base}/{name}"),
            name,
        })
    }

    /// Flushes what earlier runs wrote, so that a checkpoint they made due does not land
    /// in the middle of the next measurement.
    pub(crate) async fn checkpoint(&self) -> anyhow::Result<()> {
        let admin = Database::connect(self.admin_url.as_str()).await?;
        if let Err(error) = admin.execute_unprepared("CHECKPOINT").await {
            println!("  (no CHECKPOINT before the run: {error})");
        }
        admin.close().await.ok();
        Ok(())
    }

    pub(crate) async fn drop(self) -> anyhow::Result<()> {
        let admin = Database::connect(self.admin_url.as_str()).await?;
        admin
            .execute_unprepared(&format!("DROP DATABASE {} WITH (FORCE)", self.name))
            .await?;
        admin.close().await.ok();
        Ok(())
    }
}

fn event(i: usize) -> Event {
    let mut e = Event {
        message_id: format!("m-{i}-{}", uuid::Uuid::now_v7().simple()),
        user_id: format!("user-{}", i % 10_000),
        event: "Product Viewed".into(),
        ..Event::default()
    };
    e.set_type(EventType::Track);
    e
}

/// The ceiling: the same rows the service writes, inserted directly.
async fn raw_insert(db: &DatabaseConnection, args: &Args) -> anyhow::Result<Run> {
    let per_client = args.events / args.clients;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..args.clients {
        let db = db.clone();
        let batch = args.batch;
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let consumers = vec!["profile".to_owned()];
            for b in 0..per_client / batch {
                let rows: Vec<EventRow> = (0..batch)
                    .map(|i| {
                        let e = event(c * per_client + b * batch + i);
                        EventRow {
                            event_id: uuid::Uuid::now_v7().to_string(),
                            source_id: "bench".into(),
                            message_id: e.message_id.clone(),
                            event_type: e.r#type as i16,
                            user_id: e.user_id.clone(),
                            anonymous_id: String::new(),
                            received_at: waymark_kit::time::now_micros(),
                            event_time: waymark_kit::time::now_micros(),
                            payload: e.encode_to_vec(),
                        }
                    })
                    .collect();
                let t = Instant::now();
                let txn = db.begin().await?;
                let refs: Vec<&EventRow> = rows.iter().collect();
                store::insert_events(&txn, &refs).await?;
                let payloads: Vec<&[u8]> = rows.iter().map(|r| r.payload.as_slice()).collect();
                waymark_kit::outbox::enqueue(&txn, &consumers, &payloads).await?;
                txn.commit().await?;
                latencies.push(t.elapsed());
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await??);
    }
    Ok(Run {
        events: per_client / args.batch * args.batch * args.clients,
        elapsed: start.elapsed(),
        latencies,
    })
}

#[derive(Clone, Copy, PartialEq)]
enum Transport {
    Grpc,
    Http,
}

async fn through_service(url: &str, args: &Args, transport: Transport) -> anyhow::Result<Run> {
    let config = Config {
        database_url: url.to_owned(),
        admin_token: Some(Secret::new(ADMIN_TOKEN)),
        auto_migrate: true,
        drain_secs: 0,
        default_rate_limit_per_second: 10_000_000,
        log_filter: "warn".into(),
        ..Config::default()
    };
    let grpc = TcpListener::bind("127.0.0.1:0").await?;
    let http = TcpListener::bind("127.0.0.1:0").await?;
    let (grpc_addr, http_addr) = (grpc.local_addr()?, http.local_addr()?);
    let service = waymark_ingest::IngestServer::new(config).await?;
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(service.serve(grpc, http, shutdown.clone()));
    let endpoint = format!("http://{grpc_addr}");
    let mut admin = wait_for(&endpoint).await?;
    let mut request = tonic::Request::new(CreateSourceRequest {
        name: "bench".into(),
        rate_limit_per_second: 0,
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {ADMIN_TOKEN}").parse()?);
    let key = admin.create_source(request).await?.into_inner().write_key;

    let per_client = args.events / args.clients;
    let batches = per_client / args.batch;
    // Build every request body first so the clients measure the service, not the generator.
    let mut bodies: Vec<Vec<Vec<Event>>> = Vec::new();
    for c in 0..args.clients {
        bodies.push(
            (0..batches)
                .map(|b| {
                    (0..args.batch)
                        .map(|i| event(c * per_client + b * args.batch + i))
                        .collect()
                })
                .collect(),
        );
    }
    let key = Arc::new(key);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for client_batches in bodies {
        let key = key.clone();
        let endpoint = endpoint.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(client_batches.len());
            match transport {
                Transport::Grpc => {
                    let mut client = IngestServiceClient::connect(endpoint).await?;
                    for events in client_batches {
                        let mut request = tonic::Request::new(IngestRequest { events });
                        request
                            .metadata_mut()
                            .insert("authorization", format!("Bearer {key}").parse()?);
                        let t = Instant::now();
                        let response = client.ingest(request).await?.into_inner();
                        latencies.push(t.elapsed());
                        anyhow::ensure!(
                            response.rejected.is_empty(),
                            "rejected: {:?}",
                            response.rejected
                        );
                    }
                }
                Transport::Http => {
                    let client = reqwest::Client::new();
                    let url = format!("http://{http_addr}/v1/batch");
                    let bodies: Vec<Vec<u8>> =
                        client_batches.iter().map(|b| segment_body(b)).collect();
                    for body in bodies {
                        let t = Instant::now();
                        let response = client
                            .post(&url)
                            .basic_auth(key.as_str(), Some(""))
                            .header("content-type", "application/json")
                            .body(body)
                            .send()
                            .await?;
                        anyhow::ensure!(
                            response.status().as_u16() == 200,
                            "status {}",
                            response.status()
                        );
                        response.bytes().await?;
                        latencies.push(t.elapsed());
                    }
                }
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await??);
    }
    let elapsed = start.elapsed();
    shutdown.cancel();
    server.await??;
    Ok(Run {
        events: batches * args.batch * args.clients,
        elapsed,
        latencies,
    })
}

fn segment_body(events: &[Event]) -> Vec<u8> {
    let batch: Vec<serde_json::Value> = events
        .iter()
        .map(|e| serde_json::json!({"type": "track", "event": e.event, "userId": e.user_id, "messageId": e.message_id}))
        .collect();
    serde_json::to_vec(&serde_json::json!({"batch": batch})).unwrap_or_default()
}

/// Connects once the service answers admin calls (its schema is migrated).
async fn wait_for(
    endpoint: &str,
) -> anyhow::Result<IngestServiceClient<tonic::transport::Channel>> {
    // Serving means migrated: asking before would only log the missing tables.
    profile_bench::wait_serving(endpoint).await?;
    Ok(IngestServiceClient::connect(endpoint.to_owned()).await?)
}
