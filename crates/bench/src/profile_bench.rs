//! Profile benchmarks: events applied per second (resolution, traits, timeline, outbox) on
//! PostgreSQL, and `GetProfile` over gRPC from the Redis cache next to raw Redis reads of
//! the same bytes by as many clients.

use std::time::{Duration, Instant};

use prost::Message;
use tokio::net::TcpListener;
use waymark_kit::CancellationToken;
use waymark_kit::config::{Config, Secret};
use waymark_proto::common::v1::event_sink_client::EventSinkClient;
use waymark_proto::common::v1::{Channel, DeliverRequest, Event, EventType};
use waymark_proto::profile::v1::profile_service_client::ProfileServiceClient;
use waymark_proto::profile::v1::{GetProfileRequest, Profile};

use crate::{Run, fresh_database_url, report};

const TOKEN: &str = "bench-admin-token-0123456789";
const USERS: usize = 5_000;

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

/// Waits until health reports SERVING: the migrations are applied.
async fn wait_serving(endpoint: &str) -> anyhow::Result<()> {
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
    anyhow::bail!("the profile service never reported serving")
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
    let config = Config {
        database_url: fresh_database_url(postgres).await?,
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
    let server = waymark_profile::ProfileServer::new(config).await?;
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.serve(listener, shutdown.clone()));

    let mut sink = loop {
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
    let start = Instant::now();
    let mut latencies = Vec::new();
    for batch in batches {
        let t = Instant::now();
        sink.deliver(authed(DeliverRequest {
            producer: "bench".into(),
            events: batch,
        })?)
        .await?;
        latencies.push(t.elapsed());
    }
    report(
        "events applied (one relay, batches of 500)",
        &Run {
            events,
            elapsed: start.elapsed(),
            latencies,
        },
        None,
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
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (endpoint, ids) = (endpoint.clone(), ids.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = ProfileServiceClient::connect(endpoint).await?;
            let mut lat = Vec::with_capacity(per_client);
            for i in 0..per_client {
                let id = ids[(c * 7919 + i) % ids.len()].clone();
                let t = Instant::now();
                client
                    .get_profile(authed(GetProfileRequest {
                        profile_id: id,
                        identity: None,
                    })?)
                    .await?;
                lat.push(t.elapsed());
            }
            anyhow::Ok(lat)
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await??);
    }
    let grpc = Run {
        events: per_client * clients,
        elapsed: start.elapsed(),
        latencies,
    };

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
    report(
        "ceiling: raw Redis HGET + decode of the same bytes",
        &ceiling,
        None,
    );
    report("GetProfile over gRPC from the cache", &grpc, Some(&ceiling));
    shutdown.cancel();
    task.await??;
    Ok(())
}
