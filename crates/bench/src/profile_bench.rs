//! Profile benchmarks: events applied per second (resolution, traits, timeline, outbox) on
//! PostgreSQL, delivered as ingestion's relay does, next to the rows every applied event
//! must write inserted straight into PostgreSQL; and `GetProfile` over gRPC from the Redis
//! cache next to raw Redis reads of the same bytes by as many clients.

use std::time::{Duration, Instant};

use prost::Message;
use tokio::net::TcpListener;
use waymark_kit::CancellationToken;
use waymark_kit::config::Config;
use waymark_kit::secret::Secret;
use waymark_proto::common::v1::event_sink_client::EventSinkClient;
use waymark_proto::common::v1::{Channel, DeliverRequest, Event, EventType};
use waymark_proto::profile::v1::profile_service_client::ProfileServiceClient;
use waymark_proto::profile::v1::{GetProfileRequest, Profile};

use crate::lean::LeanClient;
use crate::{BenchDb, Run, report};

const GET_PROFILE: &str = "/waymark.profile.v1.ProfileService/GetProfile";

const TOKEN: &str = "bench-admin-token-0123456789";
const USERS: usize = 5_000;
/// Concurrent deliveries: ingestion's relay to the profile service runs two workers on
/// PostgreSQL.
const RELAY_WORKERS: usize = 2;

fn authed<T>(message: T) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse()?);
    Ok(request)
}

fn event(i: usize) -> Event {
    let user = i % USERS;
    let mut e = Event {
        event_id: uuid::Uuid::now_v7().to_string(),
        message_id: format!("p-{i}"),
        user_id: format!("user-{user}"),
        anonymous_id: format!("device-{user}"),
        timestamp: Some(prost_types::Timestamp {
            seconds: 1_700_000_000 + i as i64,
            nanos: 0,
        }),
        ..Event::default()
    };
    if i.is_multiple_of(10) {
        e.set_type(EventType::Identify);
        let serde_json::Value::Object(traits) =
            serde_json::json!({"email": format!("user{user}@example.com"), "plan": "pro"})
        else {
            unreachable!()
        };
        e.traits = Some(waymark_proto::json::struct_from_json(traits));
    } else {
        e.set_type(EventType::Track);
        e.event = "Product Viewed".into();
    }
    e.set_channel(Channel::Web);
    e
}

/// The least an applied event must write, with the same batches and concurrency: its
/// timeline row (event bytes included) and its share of the batch's outbox rows (one per
/// downstream consumer holding every event), in one transaction per batch, into tables of
/// the same shape.
async fn insert_ceiling(url: &str, batches: usize, batch: usize) -> anyhow::Result<Run> {
    use sea_orm::{ConnectionTrait, DbBackend, Statement, TransactionTrait};
    let db = waymark_kit::db::connect(url, "ceiling", 16).await?;
    db.execute_unprepared("CREATE SCHEMA IF NOT EXISTS ceiling")
        .await?;
    db.execute_unprepared(
        "CREATE TABLE ceiling.timeline (event_id TEXT PRIMARY KEY, profile_id TEXT NOT NULL,
             ts BIGINT NOT NULL, event BYTEA NOT NULL);
         CREATE INDEX ON ceiling.timeline (profile_id, ts);
         CREATE TABLE ceiling.outbox (id BIGSERIAL PRIMARY KEY, consumer TEXT NOT NULL,
             payload BYTEA NOT NULL, created_at BIGINT NOT NULL);
         ALTER TABLE ceiling.outbox ALTER COLUMN payload SET STORAGE EXTERNAL;",
    )
    .await?;
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..RELAY_WORKERS {
        let (db, next) = (db.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < batches {
                let events: Vec<Event> = (0..batch).map(event).collect();
                let t = Instant::now();
                let ids: Vec<String> = events.iter().map(|e| e.event_id.clone()).collect();
                let owners: Vec<String> = events.iter().map(|e| e.user_id.clone()).collect();
                let times: Vec<i64> = events
                    .iter()
                    .map(|e| e.timestamp.map_or(0, |t| t.seconds))
                    .collect();
                let payloads: Vec<Vec<u8>> = events.iter().map(Message::encode_to_vec).collect();
                let packed = payloads.concat();
                let txn = db.begin().await?;
                txn.execute_raw(Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    "INSERT INTO ceiling.timeline SELECT * FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::bytea[])",
                    [ids.into(), owners.into(), times.into(), payloads.into()],
                ))
                .await?;
                txn.execute_raw(Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    "INSERT INTO ceiling.outbox (consumer, payload, created_at)
                     SELECT c, $2, 0 FROM UNNEST($1::text[]) AS k(c)",
                    [
                        vec!["orchestrator".to_owned(), "analytics".to_owned()].into(),
                        packed.into(),
                    ],
                ))
                .await?;
                txn.commit().await?;
                latencies.push(t.elapsed());
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(worker.await??);
    }
    Ok(Run {
        events: batches * batch,
        elapsed: start.elapsed(),
        latencies,
    })
}

/// Waits until health reports SERVING: the migrations are applied.
pub(crate) async fn wait_serving(endpoint: &str) -> anyhow::Result<()> {
    use tonic_health::pb::health_check_response::ServingStatus;
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned())?.connect_lazy();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    for _ in 0..400 {
        let check = tonic_health::pb::HealthCheckRequest::default();
        if health
            .check(check)
            .await
            .is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32)
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("the service at {endpoint} never reported serving")
}

pub async fn run(
    postgres: &str,
    redis_url: &str,
    events: usize,
    reads: usize,
    clients: usize,
) -> anyhow::Result<()> {
    println!(
        "profile benchmark: {events} events applied, {reads} GetProfile calls by {clients} clients, PostgreSQL + Redis"
    );
    let prefix = format!("bench-{}:", uuid::Uuid::new_v4().simple());
    let bench_db = BenchDb::create(postgres).await?;
    let database_url = bench_db.url.clone();
    let config = Config {
        database_url: database_url.clone(),
        redis_url: Some(redis_url.to_owned()),
        profile_cache_key_prefix: prefix.clone(),
        admin_token: Some(Secret::new(TOKEN)),
        auto_migrate: true,
        drain_secs: 0,
        log_filter: "error".into(),
        ..Config::default()
    };
    // Server-side errors would otherwise only show as an opaque status here.
    let _telemetry = waymark_kit::telemetry::init(&config.telemetry("waymark-bench"))?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    // A second replica with no near cache, reading every profile from Redis.
    let far_listener = TcpListener::bind("127.0.0.1:0").await?;
    let far_endpoint = format!("http://{}", far_listener.local_addr()?);
    let far_server = waymark_profile::ProfileServer::new(Config {
        profile_near_cache_capacity: 0,
        ..config.clone()
    })
    .await?;
    let server = waymark_profile::ProfileServer::new(config).await?;
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.serve(listener, shutdown.clone()));
    let far_task = tokio::spawn(far_server.serve(far_listener, shutdown.clone()));

    let sink = loop {
        match EventSinkClient::connect(endpoint.clone()).await {
            Ok(c) => break c.max_encoding_message_size(waymark_kit::grpc::MAX_MESSAGE_BYTES),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let batches: Vec<Vec<Event>> = (0..events)
        .collect::<Vec<_>>()
        .chunks(500)
        .map(|c| c.iter().map(|i| event(*i)).collect())
        .collect();
    wait_serving(&endpoint).await?;
    bench_db.checkpoint().await?;
    let batch_count = batches.len();
    let queue = std::sync::Arc::new(std::sync::Mutex::new(batches));
    let start = Instant::now();
    let mut senders = Vec::new();
    for _ in 0..RELAY_WORKERS {
        let (queue, mut sink) = (queue.clone(), sink.clone());
        senders.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let Some(batch) = queue.lock().unwrap_or_else(|e| e.into_inner()).pop() else {
                    return anyhow::Ok(latencies);
                };
                let t = Instant::now();
                sink.deliver(authed(DeliverRequest {
                    producer: "bench".into(),
                    events: batch,
                })?)
                .await?;
                latencies.push(t.elapsed());
            }
        }));
    }
    let mut latencies = Vec::new();
    for sender in senders {
        latencies.extend(sender.await??);
    }
    let applied = Run {
        events,
        elapsed: start.elapsed(),
        latencies,
    };
    bench_db.checkpoint().await?;
    let ceiling = insert_ceiling(&database_url, batch_count, events / batch_count.max(1)).await?;
    report(
        "ceiling: timeline + outbox rows inserted directly",
        &ceiling,
        &[],
    );
    report(
        "events applied (relay with 2 workers, batches of 500)",
        &applied,
        &[("ceiling", &ceiling)],
    );

    // Collect profile ids and warm the cache.
    let mut client = ProfileServiceClient::connect(endpoint.clone()).await?;
    let mut ids = Vec::with_capacity(1000);
    for u in 0..1000 {
        let request = GetProfileRequest {
            profile_id: String::new(),
            identity: Some(waymark_proto::common::v1::Identity {
                r#type: "user_id".into(),
                value: format!("user-{u}"),
            }),
        };
        let profile = client
            .get_profile(authed(request)?)
            .await?
            .into_inner()
            .profile
            .unwrap_or_default();
        ids.push(profile.profile_id);
    }

    let per_client = reads / clients;
    // Warm: every profile once through the near cache.
    get_profiles(&endpoint, &ids, 1, ids.len()).await?;
    let grpc = get_profiles(&endpoint, &ids, clients, per_client).await?;
    wait_serving(&far_endpoint).await?;
    let far = get_profiles(&far_endpoint, &ids, clients, per_client).await?;

    // The ceiling: the same cached bytes read straight from Redis, same concurrency.
    let redis = redis::Client::open(redis_url)?;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (redis, ids, prefix) = (redis.clone(), ids.clone(), prefix.clone());
        tasks.push(tokio::spawn(async move {
            let mut con = redis.get_multiplexed_async_connection().await?;
            let mut lat = Vec::with_capacity(per_client);
            for i in 0..per_client {
                let key = format!(
                    "{prefix}{}",
                    waymark_profile_cache::profile_key(&ids[(c * 7919 + i) % ids.len()])
                );
                let t = Instant::now();
                let bytes: Vec<u8> = redis::cmd("HGET")
                    .arg(&key)
                    .arg("p")
                    .query_async(&mut con)
                    .await?;
                let _ = Profile::decode(bytes.as_slice())?;
                lat.push(t.elapsed());
            }
            anyhow::Ok(lat)
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await??);
    }
    let ceiling = Run {
        events: per_client * clients,
        elapsed: start.elapsed(),
        latencies,
    };
    let redis = ceiling;

    // The other ceiling: tonic alone answering the same call with the same bytes.
    let cached = client
        .get_profile(authed(GetProfileRequest {
            profile_id: ids[0].clone(),
            identity: None,
        })?)
        .await?
        .into_inner()
        .profile
        .unwrap_or_default();
    let echo_listener = TcpListener::bind("127.0.0.1:0").await?;
    let echo_endpoint = format!("http://{}", echo_listener.local_addr()?);
    let echo_task = tokio::spawn(crate::echo::serve(echo_listener, cached, shutdown.clone()));
    let echo = get_profiles(&echo_endpoint, &ids, clients, per_client).await?;

    report(
        "ceiling: raw Redis HGET + decode of the same bytes",
        &redis,
        &[],
    );
    report("ceiling: bare tonic answering from memory", &echo, &[]);
    report(
        "GetProfile over gRPC, near cache (default)",
        &grpc,
        &[("Redis", &redis), ("bare tonic", &echo)],
    );
    report(
        "GetProfile over gRPC, near cache off: Redis",
        &far,
        &[("Redis", &redis), ("bare tonic", &echo)],
    );
    shutdown.cancel();
    task.await??;
    far_task.await??;
    echo_task.await??;
    bench_db.drop().await?;
    drop_keys(redis_url, &prefix).await
}

/// Removes the run's cache keys, as its database is dropped: keys left by earlier runs
/// would make each run's Redis larger and slower than the last.
pub(crate) async fn drop_keys(redis_url: &str, prefix: &str) -> anyhow::Result<()> {
    let mut con = redis::Client::open(redis_url)?
        .get_multiplexed_async_connection()
        .await?;
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut con)
            .await?;
        if !keys.is_empty() {
            redis::cmd("UNLINK")
                .arg(&keys)
                .query_async::<()>(&mut con)
                .await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// `per_client` GetProfile calls by each of `clients`, each on its own connection, through
/// the lean client so the figure is the server's.
async fn get_profiles(
    endpoint: &str,
    ids: &[String],
    clients: usize,
    per_client: usize,
) -> anyhow::Result<Run> {
    let addr: std::net::SocketAddr = endpoint.trim_start_matches("http://").parse()?;
    let token = format!("Bearer {TOKEN}");
    let frames: Vec<bytes::Bytes> = ids
        .iter()
        .map(|id| {
            LeanClient::frame(&GetProfileRequest {
                profile_id: id.clone(),
                identity: None,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (frames, token) = (frames.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = LeanClient::connect(addr).await?;
            let mut lat = Vec::with_capacity(per_client);
            for i in 0..per_client {
                let frame = frames[(c * 7919 + i) % frames.len()].clone();
                let t = Instant::now();
                let response = client.call(GET_PROFILE, &token, frame).await?;
                anyhow::ensure!(response.len() > 5, "an empty GetProfile response");
                lat.push(t.elapsed());
            }
            anyhow::Ok(lat)
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await??);
    }
    Ok(Run {
        events: per_client * clients,
        elapsed: start.elapsed(),
        latencies,
    })
}
