//! What ingestion refuses because downstream could not take it, and what hostile requests
//! may cost: each worst case gets its status, and the peak resident memory of the test
//! process (server and client) while it is served stays under [`MEMORY_BOUND`].

use std::io::Write;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use prost::Message;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use waymark_ingest::validate::{
    MAX_BATCH_MESSAGES, MAX_DEPTH, MAX_EXPANDED_BATCH_BYTES, MAX_NAME_BYTES,
};
use waymark_proto::common::v1::{Event, EventType};
use waymark_proto::ingest::v1::GetStatsRequest;
use waymark_proto::json::struct_from_json;
use waymark_testkit::PeakMemory;

use super::{bytes, post};
use crate::support::*;

/// Most the peak resident size may rise while one hostile request is served. Each case
/// cost several times this before requests were bounded (gigabytes for the batch context).
const MEMORY_BOUND: u64 = 16 * 1024 * 1024;

/// `levels` objects and arrays, alternating, the outermost an object.
fn nested(levels: usize) -> Value {
    let mut v = json!(1);
    for level in (1..levels).rev() {
        v = if level % 2 == 0 {
            json!([v])
        } else {
            json!({ "k": v })
        };
    }
    json!({ "k": v })
}

async fn http_and_grpc_refuse_what_downstream_cannot_take(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = TestServer::start(waymark_kit::config::Config {
        custom_identity_types: vec!["loyalty_id".into()],
        ..config(&db.url, "http://127.0.0.1:9")
    })
    .await;
    let (source_id, key) = server.create_source("limits", 0).await;
    let batch = server.http_url("/v1/batch");
    let refused = |json: &Value| {
        (
            json["field"].as_str().unwrap_or_default().to_owned(),
            json["reason"].as_str().unwrap_or_default().to_owned(),
        )
    };

    // Nesting that prost could not decode again downstream, named down to the field.
    let body = json!({"batch": [
        {"type": "track", "userId": "u", "event": "Fine", "messageId": "l-1"},
        {"type": "track", "userId": "u", "event": "Deep", "properties": nested(MAX_DEPTH + 1)}
    ]});
    let (status, _, json) = post(&batch, Some(&key), bytes(&body), false).await;
    assert_eq!(status, 400, "{json}");
    let (field, reason) = refused(&json);
    assert!(field.starts_with("batch[1].properties.k.k[0].k"), "{field}");
    assert!(reason.contains("16 levels"), "{reason}");
    let body = json!({"batch": [{"type": "identify", "userId": "u", "traits": nested(MAX_DEPTH)}]});
    let (status, _, json) = post(&batch, Some(&key), bytes(&body), false).await;
    assert_eq!(status, 200, "{MAX_DEPTH} levels are fine: {json}");

    // JSON too deep to parse at all is a 400, not a crash of the parser's stack.
    let deep_body = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let (status, _, json) = post(&batch, Some(&key), deep_body.into_bytes(), false).await;
    assert_eq!(
        (status, json["field"].as_str()),
        (400, Some("body")),
        "{json}"
    );
    let deep_message = format!(
        r#"{{"batch": [{{"type": "track", "userId": "u", "event": "e", "properties": {{"a": {}1{}}}}}]}}"#,
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let (status, _, json) = post(&batch, Some(&key), deep_message.into_bytes(), false).await;
    assert_eq!(
        (status, json["field"].as_str()),
        (400, Some("batch[0]")),
        "{json}"
    );
    assert!(refused(&json).1.contains("recursion limit"), "{json}");

    // Identifiers a btree index could not hold, names, keys and consent purposes.
    let long = "x".repeat(3000);
    let cases = [
        (
            json!({"type": "identify", "userId": "u", "traits": {"email": format!("{long}@example.com")}}),
            "batch[0].traits.email",
        ),
        (
            json!({"type": "identify", "userId": "u", "context": {"traits": {"loyalty_id": long}}}),
            "batch[0].context.traits.loyalty_id",
        ),
        (
            json!({"type": "track", "anonymousId": "a", "event": "e", "context": {"device": {"id": long}}}),
            "batch[0].context.device.id",
        ),
        (
            json!({"type": "track", "userId": long, "event": "e"}),
            "batch[0].userId",
        ),
        (
            json!({"type": "track", "userId": "u", "event": "e".repeat(MAX_NAME_BYTES + 1)}),
            "batch[0].event",
        ),
        (
            json!({"type": "screen", "userId": "u", "name": "n".repeat(MAX_NAME_BYTES + 1)}),
            "batch[0].name",
        ),
        (
            json!({"type": "track", "userId": "u", "event": "e", "properties": {"nested": {"k".repeat(300): 1}}}),
            "batch[0].properties.nested",
        ),
        (
            json!({"type": "track", "userId": "u", "event": "Consent Granted", "properties": {"purpose": "p".repeat(65)}}),
            "batch[0].properties.purpose",
        ),
    ];
    for (message, expected) in cases {
        let (status, _, json) = post(
            &batch,
            Some(&key),
            bytes(&json!({"batch": [message]})),
            false,
        )
        .await;
        assert_eq!(status, 400, "{expected}: {json}");
        assert_eq!(refused(&json).0, expected, "{json}");
    }

    // Too many messages for one request, however small.
    let many = vec![json!({}); MAX_BATCH_MESSAGES + 1];
    let (status, _, json) = post(&batch, Some(&key), bytes(&json!({"batch": many})), false).await;
    assert_eq!(status, 413, "{json}");
    assert!(json["error"].as_str().unwrap().contains("2500"), "{json}");

    // gRPC keeps the valid events and names the refused ones.
    let mut deep = track("g-1", "u", "Deep");
    deep.properties = Some(struct_from_json(
        nested(MAX_DEPTH + 1).as_object().unwrap().clone(),
    ));
    let mut email = track("g-2", "u", "Identified");
    email.set_type(EventType::Identify);
    email.traits = Some(struct_from_json(
        json!({"email": format!("{}@example.com", "e".repeat(300))})
            .as_object()
            .unwrap()
            .clone(),
    ));
    let response = server
        .client()
        .await
        .ingest(ingest_request(
            vec![deep, email, track("g-3", "u", "Fine")],
            &key,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.accepted, 1);
    let rejected: Vec<_> = response
        .rejected
        .iter()
        .map(|r| (r.index, r.field.as_str()))
        .collect();
    assert_eq!(rejected.len(), 2, "{rejected:?}");
    assert_eq!(rejected[0].0, 0);
    assert!(rejected[0].1.starts_with("properties.k"), "{rejected:?}");
    assert_eq!(rejected[1], (1, "traits.email"));

    let stats = server
        .client()
        .await
        .get_stats(admin(GetStatsRequest { source_id }))
        .await
        .unwrap()
        .into_inner()
        .total
        .unwrap();
    assert_eq!(
        stats.accepted, 2,
        "the identify of 16 levels and one gRPC event"
    );
    server.stop().await;
}
waymark_testkit::on_both_backends!(http_and_grpc_refuse_what_downstream_cannot_take);

/// A gzip stream of `inflated` zero bytes.
fn gzip_bomb(inflated: usize) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![0u8; 1024 * 1024];
    for _ in 0..inflated / zeros.len() {
        encoder.write_all(&zeros).unwrap();
    }
    encoder.finish().unwrap()
}

/// An `Ingest` request as one gRPC frame of at least `size` bytes: `event` repeated,
/// written straight into one buffer (the client allocates nothing per event).
fn grpc_frame(event: &Event, size: usize) -> Bytes {
    let one = event.encode_to_vec();
    let mut entry = Vec::new();
    // Field 1 (events), length-delimited.
    prost::encoding::encode_key(1, prost::encoding::WireType::LengthDelimited, &mut entry);
    prost::encoding::encode_varint(one.len() as u64, &mut entry);
    entry.extend_from_slice(&one);
    let count = size / entry.len() + 1;
    let mut frame = Vec::with_capacity(5 + count * entry.len());
    frame.push(0);
    frame.extend_from_slice(&((count * entry.len()) as u32).to_be_bytes());
    for _ in 0..count {
        frame.extend_from_slice(&entry);
    }
    Bytes::from(frame)
}

/// Sends `frame` to `Ingest` over a bare HTTP/2 stream (the body is sent from the given
/// buffer, never copied) and returns the `grpc-status`.
async fn raw_ingest(addr: std::net::SocketAddr, key: Option<&str>, frame: Bytes) -> i32 {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!(
            "http://{addr}/waymark.ingest.v1.IngestService/Ingest"
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(key) = key {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    let (response, mut stream) = client
        .send_request(request.body(()).unwrap(), false)
        .unwrap();
    // The server may answer and reset the stream before taking it all.
    let _ = stream.send_data(frame, true);
    let response = response.await.unwrap();
    let status = |headers: &http::HeaderMap| {
        headers
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().parse::<i32>().unwrap())
    };
    if let Some(code) = status(response.headers()) {
        return code;
    }
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        let _ = chunk.unwrap();
    }
    let trailers = std::future::poll_fn(|cx| body.poll_trailers(cx))
        .await
        .unwrap()
        .expect("trailers");
    status(&trailers).expect("grpc-status")
}

/// Holds a connection that sends the start of a request and then a header byte at a
/// time; returns once the server closes it, or after `patience`.
async fn slow_loris(addr: std::net::SocketAddr, patience: Duration) -> bool {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"POST /v1/batch HTTP/1.1\r\nhost: x\r\nx-slow: ")
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + patience;
    let mut buf = [0u8; 512];
    loop {
        tokio::select! {
            read = tcp.read(&mut buf) => match read {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            },
            // The slow client's pace, a header byte every 100 ms, not a wait for anything.
            () = tokio::time::sleep(Duration::from_millis(100)) => {
                if tcp.write_all(b"a").await.is_err() {
                    return true;
                }
            }
            () = tokio::time::sleep_until(deadline) => return false,
        }
    }
}

async fn hostile_requests_cost_bounded_memory(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = TestServer::start(waymark_kit::config::Config {
        ingest_read_timeout_secs: 1,
        ..config(&db.url, "http://127.0.0.1:9")
    })
    .await;
    let (_, key) = server.create_source("hostile", 0).await;
    let batch = server.http_url("/v1/batch");

    // Every input is built, and kept, before its measurement starts.
    let bomb = gzip_bomb(64 * 1024 * 1024);
    let mut context_batch = format!(
        r#"{{"context": {{"blob": "{}"}}, "batch": ["#,
        "c".repeat(30_000)
    );
    for i in 0..MAX_BATCH_MESSAGES - 100 {
        if i > 0 {
            context_batch.push(',');
        }
        context_batch.push_str(r#"{"type": "track", "anonymousId": "a", "event": "e"}"#);
    }
    context_batch.push_str("]}");
    let mut event = track("", "u", "Blob");
    event.properties = Some(struct_from_json(
        json!({"blob": "b".repeat(1000)})
            .as_object()
            .unwrap()
            .clone(),
    ));
    let frame = grpc_frame(&event, 15 * 1024 * 1024);
    let gzip_request = |key: &str| {
        reqwest::Client::new()
            .post(&batch)
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .basic_auth(key, Some(""))
            .body(bomb.clone())
    };

    // A gzip bomb with an unknown key is refused before its body is read; with a valid
    // one it is cut off at the batch limit while inflating.
    let peak = PeakMemory::start();
    let status = gzip_request("wk_unknown").send().await.unwrap().status();
    assert_eq!(status, 401);
    let status = gzip_request(&key).send().await.unwrap().status();
    assert_eq!(status, 413);
    let grown = peak.grown_bytes();
    assert!(grown < MEMORY_BOUND, "gzip bomb: peak rose {grown} bytes");

    // Tiny messages sharing a large batch context: the batch may not grow past its
    // expanded size, whatever it saved by sharing.
    let peak = PeakMemory::start();
    let response = reqwest::Client::new()
        .post(&batch)
        .header("content-type", "application/json")
        .basic_auth(&key, Some(""))
        .body(context_batch.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 413);
    let json: Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    let limit = format!("{} MB", MAX_EXPANDED_BATCH_BYTES / (1024 * 1024));
    assert!(json["error"].as_str().unwrap().contains(&limit), "{json}");
    let grown = peak.grown_bytes();
    assert!(
        grown < MEMORY_BOUND,
        "batch context: peak rose {grown} bytes"
    );

    // 16 MiB of gRPC without a key is refused from its headers; with a key it is over
    // the decoding limit, which counts before anything is buffered or inflated.
    let peak = PeakMemory::start();
    let code = raw_ingest(server.grpc_addr, None, frame.clone()).await;
    assert_eq!(code, tonic::Code::Unauthenticated as i32);
    let grown = peak.grown_bytes();
    assert!(
        grown < MEMORY_BOUND,
        "gRPC without a key: peak rose {grown} bytes"
    );
    let code = raw_ingest(server.grpc_addr, Some(&key), frame.clone()).await;
    assert!(
        [
            tonic::Code::OutOfRange as i32,
            tonic::Code::ResourceExhausted as i32
        ]
        .contains(&code),
        "gRPC over the limit: code {code}"
    );

    // Slow loris: connections trickling their headers are closed after the read timeout.
    let peak = PeakMemory::start();
    let lorises: Vec<_> = (0..50)
        .map(|_| tokio::spawn(slow_loris(server.http_addr, Duration::from_secs(20))))
        .collect();
    for loris in lorises {
        assert!(loris.await.unwrap(), "a slow connection was held open");
    }
    let grown = peak.grown_bytes();
    assert!(grown < MEMORY_BOUND, "slow loris: peak rose {grown} bytes");

    // A body that trickles is a 408 after the read timeout.
    let mut tcp = TcpStream::connect(server.http_addr).await.unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{key}:"));
    tcp.write_all(
        format!(
            "POST /v1/batch HTTP/1.1\r\nhost: x\r\nauthorization: Basic {auth}\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{{"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut response = Vec::new();
    let mut buf = [0u8; 1024];
    // A byte every 100 ms for at most 20 s: the trickle, not a wait for anything.
    for _ in 0..200 {
        tokio::select! {
            read = tcp.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    response.extend_from_slice(&buf[..n]);
                    if response.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            },
            () = tokio::time::sleep(Duration::from_millis(100)) => {
                let _ = tcp.write_all(b" ").await;
            }
        }
    }
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    server.stop().await;
}
waymark_testkit::on_both_backends!(hostile_requests_cost_bounded_memory);
