//! The right to be forgotten across services: once the profile service has erased a
//! customer and pushed their identifiers to ingestion, their new events are accepted (an
//! SDK must not retry them) but dropped and counted at the door, and no profile returns.

use std::collections::BTreeSet;

use prost::Message;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement, TransactionTrait};
use serde_json::json;
use tonic::Code;
use waymark_kit::sql;
use waymark_kit::time::now_micros;
use waymark_proto::common::v1::Event;
use waymark_proto::ingest::v1::GetStatsRequest;
use waymark_proto::profile::v1::{DeleteProfileRequest, ListSuppressionsRequest};
use waymark_testkit::platform::Platform;
use waymark_testkit::{Backend, EventBuilder, admin, redis_url};

use crate::*;

async fn an_erased_customer_stays_erased(backend: Backend) {
    let (platform, _sink) = boot(backend).await;
    let robin = || {
        json!([
            {"type": "identify", "userId": "cust-3003", "anonymousId": "web-robin",
             "traits": {"email": "Robin@Example.org"}, "context": {"library": {"name": "analytics.js"}}},
            {"type": "track", "userId": "cust-3003", "event": "Order Completed",
             "properties": {"revenue": 40}},
            {"type": "page", "anonymousId": "web-robin", "name": "Account"},
        ])
    };
    send(&platform, robin()).await;
    let before = profile_with_events(&platform, by_identity("email", "robin@example.org"), 3).await;

    let mut client = platform.profile.client().await;
    let deleted = client
        .delete_profile(admin(DeleteProfileRequest {
            profile_id: before.profile_id.clone(),
            reason: "DSR-2024-17".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.profile_id, before.profile_id);
    assert_eq!(deleted.timeline_entries, 3);
    let suppressed: BTreeSet<(String, String)> = deleted
        .suppressed
        .into_iter()
        .map(|i| (i.r#type, i.value))
        .collect();
    let expected: BTreeSet<(String, String)> = [
        ("anonymous_id", "web-robin"),
        ("email", "robin@example.org"),
        ("user_id", "cust-3003"),
    ]
    .into_iter()
    .map(|(t, v)| (t.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(suppressed, expected);

    let what = "the suppressions pushed to ingestion";
    eventually(what, PATIENCE, async || {
        let page = client
            .list_suppressions(admin(ListSuppressionsRequest::default()))
            .await
            .unwrap()
            .into_inner();
        let synced = page.suppressions.iter().all(|s| s.synced_to_ingest);
        page.suppressions.len() == 3 && synced
    })
    .await;

    assert_eq!(ingest_counts(&platform).await, (3, 0));

    // The same customer comes back on the website and in the shop.
    send(&platform, robin()).await;
    assert_eq!(
        ingest_counts(&platform).await,
        (3, 3),
        "dropped and counted at ingestion"
    );

    // Anything ingestion had let through would reach the profile service before an event
    // committed after it: once this one is applied, nothing of Robin's is on its way.
    send(
        &platform,
        json!([{"type": "track", "userId": "cust-4004", "event": "Signed Up"}]),
    )
    .await;
    profile_with_events(&platform, by_identity("user_id", "cust-4004"), 1).await;
    for request in [
        by_id(&before.profile_id),
        by_identity("email", "robin@example.org"),
        by_identity("user_id", "cust-3003"),
        by_identity("anonymous_id", "web-robin"),
    ] {
        let error = get_profile(&platform, request.clone()).await.unwrap_err();
        assert_eq!(error.code(), Code::NotFound, "{request:?}");
    }
    platform.stop().await;
}
waymark_testkit::on_both_backends!(an_erased_customer_stays_erased);

/// Ingestion's (accepted, suppressed) counters over every source.
async fn ingest_counts(platform: &Platform) -> (u64, u64) {
    let total = platform
        .ingest
        .clone()
        .get_stats(admin(GetStatsRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .total
        .unwrap_or_default();
    (total.accepted, total.suppressed)
}

/// Nothing of an erased customer stays in clear in either service's database (every
/// row of every table as text, binary columns as hex) or in Redis (every key of the
/// profile cache, name and value): not in the ingestion log, however the events were
/// linked to them, not in ingestion's outbox, not in the profile service's outboxes to
/// downstream services that are not reading yet, and not in the suppression lists, which
/// hold keyed hashes. On SQLite not even in the files' free space or write-ahead logs.
/// Another customer's queued events stay.
async fn erasure_leaves_no_copy(backend: Backend) {
    // Downstream services are down: the profile service's outbox rows stay queued.
    let redis = (backend == Backend::Postgres).then(redis_url);
    let platform = Platform::start(backend, "http://127.0.0.1:9", redis.as_deref()).await;
    let kim = json!([
        {"type": "identify", "userId": "cust-7007", "anonymousId": "web-kim-0001",
         "traits": {"email": "kim.zed@example.org", "phone": "+4915123456789",
                    "loyalty_id": "L-kim-7731", "name": "Kimberly Zedmore"},
         "context": {"device": {"id": "dev-kim-8842"}}},
        {"type": "track", "userId": "cust-7007", "event": "Order Completed",
         "properties": {"revenue": 40, "note": "Kimberly Zedmore's order"}},
    ]);
    send(&platform, kim).await;
    send(
        &platform,
        json!([{"type": "track", "userId": "cust-other", "event": "Signed Up"}]),
    )
    .await;
    let before =
        profile_with_events(&platform, by_identity("email", "kim.zed@example.org"), 2).await;
    profile_with_events(&platform, by_identity("user_id", "cust-other"), 1).await;

    // An event ingestion accepted but has not delivered yet (its delivery is backing off),
    // linked to Kim only by her e-mail, packed with another customer's event.
    let ingest_db = connect(&platform.database_url, "ingest").await;
    let kiosk = EventBuilder::track("Coupon Scanned")
        .message_id("m-1")
        .event_id("evt-m-1")
        .anonymous("kiosk-5510")
        .context(json!({"traits": {"email": "kim.zed@example.org"}}))
        .build();
    let other = EventBuilder::track("Coupon Scanned")
        .message_id("m-2")
        .event_id("evt-m-2")
        .anonymous("kiosk-other")
        .build();
    queue_in_ingest(&ingest_db, &[&kiosk, &other]).await;

    let mut client = platform.profile.client().await;
    client
        .delete_profile(admin(DeleteProfileRequest {
            profile_id: before.profile_id.clone(),
            reason: "DSR-2026-3".into(),
        }))
        .await
        .unwrap();
    let what = "the suppressions pushed to ingestion";
    eventually(what, PATIENCE, async || {
        let page = client
            .list_suppressions(admin(ListSuppressionsRequest::default()))
            .await
            .unwrap()
            .into_inner();
        let synced = page.suppressions.iter().all(|s| s.synced_to_ingest);
        !page.suppressions.is_empty() && synced
    })
    .await;

    let profile_db = connect(&platform.database_url, "profile").await;
    let mut dumps = vec![
        ("ingest", dump(&ingest_db, "ingest").await),
        ("profile", dump(&profile_db, "profile").await),
    ];
    if let Some(url) = &redis {
        dumps.push((
            "redis",
            dump_redis(url, &platform.profile.cache_prefix).await,
        ));
    }
    if backend == Backend::Sqlite {
        dumps.push(("the SQLite files", sqlite_files(&platform.database_url)));
    }
    for (what, dump) in &dumps {
        for needle in [
            "cust-7007",
            "web-kim-0001",
            "kim.zed@example.org",
            "+4915123456789",
            "L-kim-7731",
            "dev-kim-8842",
            "Kimberly Zedmore",
            "kiosk-5510",
        ] {
            let hex: String = needle.bytes().map(|b| format!("{b:02x}")).collect();
            let dump = dump.to_lowercase();
            assert!(
                !dump.contains(&needle.to_lowercase()) && !dump.contains(&hex),
                "{needle:?} is still in {what}"
            );
        }
    }
    // What is not Kim's is still there: the other customer's queued events and log rows.
    let (ingest_dump, profile_dump) = (&dumps[0].1, &dumps[1].1);
    assert!(
        ingest_dump.contains("kiosk-other"),
        "the other customer's row stays"
    );
    let other_hex: String = "cust-other".bytes().map(|b| format!("{b:02x}")).collect();
    assert!(
        profile_dump.to_lowercase().contains(&other_hex),
        "the other customer's events stay queued downstream"
    );
    let packs = waymark_kit::outbox::backlog(&ingest_db).await.unwrap();
    assert_eq!(
        packs.iter().map(|b| b.pending).sum::<u64>(),
        1,
        "the shared pack keeps one event: {packs:?}"
    );
    platform.stop().await;
}
waymark_testkit::on_both_backends!(erasure_leaves_no_copy);

/// Commits `events` to ingestion's log and one outbox pack for the profile service that
/// the relay will not claim for a day, as a delivery backing off leaves it.
async fn queue_in_ingest(db: &DatabaseConnection, events: &[&Event]) {
    let payloads: Vec<Vec<u8>> = events.iter().map(|e| e.encode_to_vec()).collect();
    let txn = db.begin().await.unwrap();
    for (event, payload) in events.iter().zip(&payloads) {
        sql::execute(
            &txn,
            "INSERT INTO events (event_id, source_id, message_id, event_type, user_id, anonymous_id, received_at, event_time, payload)
             VALUES (?, ?, ?, 1, '', ?, ?, ?, ?)",
            [
                event.event_id.as_str().into(),
                event.source_id.as_str().into(),
                event.message_id.as_str().into(),
                event.anonymous_id.as_str().into(),
                now_micros().into(),
                now_micros().into(),
                payload.clone().into(),
            ],
        )
        .await
        .unwrap();
    }
    let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
    waymark_kit::outbox::enqueue(&txn, &["profile".to_owned()], &refs)
        .await
        .unwrap();
    sql::execute(
        &txn,
        "UPDATE outbox SET available_at = ?",
        [(now_micros() + 86_400_000_000).into()],
    )
    .await
    .unwrap();
    txn.commit().await.unwrap();
}

/// A service's own database (its schema, or its file beside the shared SQLite one).
async fn connect(database_url: &str, service: &str) -> DatabaseConnection {
    let config = waymark_kit::config::Config {
        database_url: database_url.to_owned(),
        ..waymark_kit::config::Config::default()
    };
    let url = if service == "ingest" {
        config.ingest_database()
    } else {
        config.profile_database()
    };
    waymark_kit::db::connect(&url, service, 2).await.unwrap()
}

/// Every row of every table of the service's database, one line each, as the database
/// renders it: binary columns as hex (`\x..` on PostgreSQL, `X'..'` on SQLite).
async fn dump(db: &DatabaseConnection, schema: &str) -> String {
    let backend = db.get_database_backend();
    let text = |s: &str| Statement::from_string(backend, s.to_owned());
    let names = |rows: Vec<sea_orm::QueryResult>| -> Vec<String> {
        rows.iter()
            .map(|r| r.try_get_by_index::<String>(0).unwrap())
            .collect()
    };
    let tables = if backend == DbBackend::Postgres {
        names(
            db.query_all_raw(text(&format!(
                "SELECT table_name::text FROM information_schema.tables
                 WHERE table_schema = '{schema}' AND table_type = 'BASE TABLE'"
            )))
            .await
            .unwrap(),
        )
    } else {
        names(
            db.query_all_raw(text(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
            ))
            .await
            .unwrap(),
        )
    };
    assert!(
        tables.iter().any(|t| t == "outbox") && tables.iter().any(|t| t == "suppressions"),
        "{tables:?}"
    );
    let mut out = String::new();
    for table in &tables {
        let select = if backend == DbBackend::Postgres {
            format!("SELECT t::text FROM \"{schema}\".\"{table}\" t")
        } else {
            let columns = names(
                db.query_all_raw(text(&format!(
                    "SELECT name FROM pragma_table_info('{table}')"
                )))
                .await
                .unwrap(),
            );
            let quoted: Vec<String> = columns.iter().map(|c| format!("quote(\"{c}\")")).collect();
            format!("SELECT {} FROM \"{table}\"", quoted.join(" || '|' || "))
        };
        for row in db.query_all_raw(text(&select)).await.unwrap() {
            out.push_str(table);
            out.push(':');
            out.push_str(&row.try_get_by_index::<String>(0).unwrap());
            out.push('\n');
        }
    }
    out
}

/// The raw bytes of every file beside the shared SQLite database (each service's file,
/// write-ahead log and shared memory), as text where they are text.
fn sqlite_files(database_url: &str) -> String {
    let path = database_url
        .trim_start_matches("sqlite://")
        .split('?')
        .next()
        .unwrap();
    let dir = std::path::Path::new(path).parent().unwrap();
    let mut out = String::new();
    let mut files = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        out.push_str(&String::from_utf8_lossy(
            &std::fs::read(entry.path()).unwrap(),
        ));
        files += 1;
    }
    assert!(files >= 2, "both services' files are there");
    out
}

/// Every key of the profile cache under `prefix`, with its value (strings and hashes).
async fn dump_redis(url: &str, prefix: &str) -> String {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<Vec<u8>> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!keys.is_empty(), "the cache holds keys under {prefix}");
    let mut out = String::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        let values: Vec<Vec<u8>> = match kind.as_str() {
            "string" => vec![
                redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
                    .unwrap(),
            ],
            "hash" => redis::cmd("HGETALL")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap(),
            "none" => continue,
            other => panic!("unexpected {other} at a cache key"),
        };
        out.push_str(&String::from_utf8_lossy(&key));
        for value in values {
            out.push(' ');
            out.push_str(&String::from_utf8_lossy(&value));
            out.push(' ');
            out.extend(value.iter().map(|b| format!("{b:02x}")));
        }
        out.push('\n');
    }
    out
}
