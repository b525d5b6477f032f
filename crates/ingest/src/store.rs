//! The ingestion service's tables: the event log (which is also the dedupe index), sources,
//! per-source counters and the suppression list, plus the outbox from the kit.
//!
//! Times are Unix microseconds (BIGINT) on both backends.

use std::collections::{HashMap, HashSet};

use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr, FromQueryResult,
    TransactionTrait, Value,
};
use waymark_kit::db::Migration;
use waymark_kit::sql::{self, Column, Insert};
use waymark_proto::common::v1::Event;

/// Schema of the ingestion service, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "event log, sources, stats, suppressions",
        postgres: "
            CREATE TABLE events (
                seq BIGSERIAL PRIMARY KEY,
                event_id TEXT NOT NULL,
                source_id TEXT NOT NULL,
                message_id TEXT NOT NULL,
                event_type SMALLINT NOT NULL,
                user_id TEXT NOT NULL,
                anonymous_id TEXT NOT NULL,
                received_at BIGINT NOT NULL,
                event_time BIGINT NOT NULL,
                payload BYTEA
            );
            CREATE UNIQUE INDEX events_dedupe ON events (source_id, message_id);
            CREATE INDEX events_received_at ON events USING BRIN (received_at);
            CREATE INDEX events_user ON events (user_id, seq) WHERE user_id <> '';
            CREATE INDEX events_anonymous ON events (anonymous_id, seq) WHERE anonymous_id <> '';
            CREATE TABLE sources (
                source_id TEXT PRIMARY KEY,
                name TEXT NOT NULL,
                key_hash TEXT NOT NULL UNIQUE,
                created_at BIGINT NOT NULL,
                revoked_at BIGINT,
                rate_limit BIGINT NOT NULL
            );
            CREATE UNIQUE INDEX sources_live_name ON sources (name) WHERE revoked_at IS NULL;
            CREATE TABLE source_stats (
                source_id TEXT NOT NULL,
                shard INTEGER NOT NULL,
                accepted BIGINT NOT NULL DEFAULT 0,
                duplicates BIGINT NOT NULL DEFAULT 0,
                rejected BIGINT NOT NULL DEFAULT 0,
                suppressed BIGINT NOT NULL DEFAULT 0,
                PRIMARY KEY (source_id, shard)
            );
            CREATE TABLE suppressions (
                id_type TEXT NOT NULL,
                id_value TEXT NOT NULL,
                created_at BIGINT NOT NULL,
                PRIMARY KEY (id_type, id_value)
            );",
        sqlite: "
            CREATE TABLE events (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                event_id TEXT NOT NULL,
                source_id TEXT NOT NULL,
                message_id TEXT NOT NULL,
                event_type SMALLINT NOT NULL,
                user_id TEXT NOT NULL,
                anonymous_id TEXT NOT NULL,
                received_at BIGINT NOT NULL,
                event_time BIGINT NOT NULL,
                payload BLOB
            );
            CREATE UNIQUE INDEX events_dedupe ON events (source_id, message_id);
            CREATE INDEX events_received_at ON events (received_at);
            CREATE INDEX events_user ON events (user_id, seq) WHERE user_id <> '';
            CREATE INDEX events_anonymous ON events (anonymous_id, seq) WHERE anonymous_id <> '';
            CREATE TABLE sources (
                source_id TEXT PRIMARY KEY,
                name TEXT NOT NULL,
                key_hash TEXT NOT NULL UNIQUE,
                created_at BIGINT NOT NULL,
                revoked_at BIGINT,
                rate_limit BIGINT NOT NULL
            );
            CREATE UNIQUE INDEX sources_live_name ON sources (name) WHERE revoked_at IS NULL;
            CREATE TABLE source_stats (
                source_id TEXT NOT NULL,
                shard INTEGER NOT NULL,
                accepted BIGINT NOT NULL DEFAULT 0,
                duplicates BIGINT NOT NULL DEFAULT 0,
                rejected BIGINT NOT NULL DEFAULT 0,
                suppressed BIGINT NOT NULL DEFAULT 0,
                PRIMARY KEY (source_id, shard)
            );
            CREATE TABLE suppressions (
                id_type TEXT NOT NULL,
                id_value TEXT NOT NULL,
                created_at BIGINT NOT NULL,
                PRIMARY KEY (id_type, id_value)
            );",
    },
    waymark_kit::outbox::migration(2),
    waymark_kit::outbox::keyed_by_consumer(3),
    waymark_kit::outbox::packs(4),
    Migration {
        version: 5,
        name: "suppressions stored as keyed hashes",
        // Existing rows are clear; the service hashes them at start-up
        // (`hash_clear_suppressions`), since neither backend has HMAC built in.
        postgres: "ALTER TABLE suppressions ADD COLUMN hashed BOOLEAN NOT NULL DEFAULT FALSE",
        sqlite: "ALTER TABLE suppressions ADD COLUMN hashed BOOLEAN NOT NULL DEFAULT FALSE",
    },
    waymark_kit::outbox::dead_letters::migration(6),
    waymark_kit::outbox::trace_links(7),
];

/// One event row, ready to insert.
#[derive(Debug, Clone)]
pub struct EventRow {
    pub event_id: String,
    pub source_id: String,
    pub message_id: String,
    pub event_type: i16,
    pub user_id: String,
    pub anonymous_id: String,
    pub received_at: i64,
    pub event_time: i64,
    /// The encoded `waymark.common.v1.Event`.
    pub payload: Vec<u8>,
}

/// Lifetime counters of one source.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    pub accepted: u64,
    pub duplicates: u64,
    pub rejected: u64,
    pub suppressed: u64,
}

impl Counters {
    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &Counters) {
        self.accepted += other.accepted;
        self.duplicates += other.duplicates;
        self.rejected += other.rejected;
        self.suppressed += other.suppressed;
    }
}

/// A stored source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceRow {
    pub source_id: String,
    pub name: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
    pub rate_limit: u32,
}

/// Inserts the rows that are new; returns the (source_id, message_id) keys inserted.
/// Rows whose key exists already are duplicates and are left untouched.
pub async fn insert_events(
    txn: &DatabaseTransaction,
    rows: &[&EventRow],
) -> Result<HashSet<(String, String)>, DbErr> {
    #[derive(FromQueryResult)]
    struct Key {
        source_id: String,
        message_id: String,
    }
    let text =
        |f: fn(&EventRow) -> &str| Column::Text(rows.iter().map(|r| f(r).to_owned()).collect());
    let int8 = |f: fn(&EventRow) -> i64| Column::Int8(rows.iter().map(|r| f(r)).collect());
    let inserted: Vec<Key> = Insert::new(
        "INSERT INTO events (event_id, source_id, message_id, event_type, user_id, anonymous_id, received_at, event_time, payload)",
        vec![
            text(|r| &r.event_id),
            text(|r| &r.source_id),
            text(|r| &r.message_id),
            Column::Int2(rows.iter().map(|r| r.event_type).collect()),
            text(|r| &r.user_id),
            text(|r| &r.anonymous_id),
            int8(|r| r.received_at),
            int8(|r| r.event_time),
            Column::Bytea(rows.iter().map(|r| r.payload.clone()).collect()),
        ],
    )
    .suffix("ON CONFLICT (source_id, message_id) DO NOTHING RETURNING source_id, message_id")
    .returning(txn)
    .await?;
    Ok(inserted
        .into_iter()
        .map(|key| (key.source_id, key.message_id))
        .collect())
}

/// Adds counters per source. Each committer writes its own `shard` row so concurrent
/// transactions never wait on one another's counter row lock.
pub async fn add_counters(
    txn: &DatabaseTransaction,
    shard: i32,
    counters: &HashMap<String, Counters>,
) -> Result<(), DbErr> {
    for (source_id, c) in counters {
        sql::execute(
            txn,
            "INSERT INTO source_stats (source_id, shard, accepted, duplicates, rejected, suppressed)
             VALUES (?, ?, ?, ?, ?, ?)
             ON CONFLICT (source_id, shard) DO UPDATE SET
                accepted = source_stats.accepted + excluded.accepted,
                duplicates = source_stats.duplicates + excluded.duplicates,
                rejected = source_stats.rejected + excluded.rejected,
                suppressed = source_stats.suppressed + excluded.suppressed",
            [
                source_id.as_str().into(),
                shard.into(),
                (c.accepted as i64).into(),
                (c.duplicates as i64).into(),
                (c.rejected as i64).into(),
                (c.suppressed as i64).into(),
            ],
        )
        .await?;
    }
    Ok(())
}

/// Counters per source (all sources when `source_id` is None).
pub async fn read_counters(
    db: &DatabaseConnection,
    source_id: Option<&str>,
) -> Result<Vec<(String, Counters)>, DbErr> {
    #[derive(FromQueryResult)]
    struct Sums {
        source_id: String,
        accepted: i64,
        duplicates: i64,
        rejected: i64,
        suppressed: i64,
    }
    let mut text = String::from(
        "SELECT source_id, CAST(SUM(accepted) AS BIGINT) AS accepted,
                CAST(SUM(duplicates) AS BIGINT) AS duplicates,
                CAST(SUM(rejected) AS BIGINT) AS rejected,
                CAST(SUM(suppressed) AS BIGINT) AS suppressed
         FROM source_stats",
    );
    let mut values: Vec<Value> = Vec::new();
    if let Some(id) = source_id {
        text.push_str(" WHERE source_id = ?");
        values.push(id.into());
    }
    text.push_str(" GROUP BY source_id ORDER BY source_id");
    let rows: Vec<Sums> = sql::query_as(db, &text, values).await?;
    let count = |n: i64| n.max(0) as u64;
    Ok(rows
        .into_iter()
        .map(|r| {
            (
                r.source_id,
                Counters {
                    accepted: count(r.accepted),
                    duplicates: count(r.duplicates),
                    rejected: count(r.rejected),
                    suppressed: count(r.suppressed),
                },
            )
        })
        .collect())
}

/// Creates a source with the hash of its write key.
pub async fn create_source(
    db: &DatabaseConnection,
    source: &SourceRow,
    key_hash: &str,
) -> Result<(), DbErr> {
    sql::execute(
        db,
        "INSERT INTO sources (source_id, name, key_hash, created_at, revoked_at, rate_limit) VALUES (?, ?, ?, ?, NULL, ?)",
        [
            source.source_id.as_str().into(),
            source.name.as_str().into(),
            key_hash.into(),
            source.created_at.into(),
            i64::from(source.rate_limit).into(),
        ],
    )
    .await
    .map(|_| ())
}

/// Replaces the write key of the live source named `name`; false when there is none.
pub async fn rotate_key(
    db: &DatabaseConnection,
    name: &str,
    key_hash: &str,
) -> Result<bool, DbErr> {
    let updated = sql::execute(
        db,
        "UPDATE sources SET key_hash = ? WHERE name = ? AND revoked_at IS NULL",
        [key_hash.into(), name.into()],
    )
    .await?;
    Ok(updated > 0)
}

const SOURCE_COLUMNS: &str = "source_id, name, created_at, revoked_at, rate_limit";

/// A `sources` row as [`SOURCE_COLUMNS`] reads it.
#[derive(FromQueryResult)]
struct StoredSource {
    source_id: String,
    name: String,
    created_at: i64,
    revoked_at: Option<i64>,
    rate_limit: i64,
}

impl From<StoredSource> for SourceRow {
    fn from(row: StoredSource) -> Self {
        SourceRow {
            source_id: row.source_id,
            name: row.name,
            created_at: row.created_at,
            revoked_at: row.revoked_at,
            rate_limit: row.rate_limit.clamp(0, i64::from(u32::MAX)) as u32,
        }
    }
}

/// The live source whose key hashes to `key_hash`.
pub async fn find_live_source_by_key(
    db: &DatabaseConnection,
    key_hash: &str,
) -> Result<Option<SourceRow>, DbErr> {
    let row: Option<StoredSource> = sql::query_one_as(
        db,
        &format!("SELECT {SOURCE_COLUMNS} FROM sources WHERE key_hash = ? AND revoked_at IS NULL"),
        [key_hash.into()],
    )
    .await?;
    Ok(row.map(SourceRow::from))
}

/// Every source, oldest first.
pub async fn list_sources(db: &DatabaseConnection) -> Result<Vec<SourceRow>, DbErr> {
    let rows: Vec<StoredSource> = sql::query_as(
        db,
        &format!("SELECT {SOURCE_COLUMNS} FROM sources ORDER BY created_at, source_id"),
        [],
    )
    .await?;
    Ok(rows.into_iter().map(SourceRow::from).collect())
}

/// Revokes a source; returns it, or None when it does not exist.
pub async fn revoke_source(
    db: &DatabaseConnection,
    source_id: &str,
    now: i64,
) -> Result<Option<SourceRow>, DbErr> {
    sql::execute(
        db,
        "UPDATE sources SET revoked_at = ? WHERE source_id = ? AND revoked_at IS NULL",
        [now.into(), source_id.into()],
    )
    .await?;
    let row: Option<StoredSource> = sql::query_one_as(
        db,
        &format!("SELECT {SOURCE_COLUMNS} FROM sources WHERE source_id = ?"),
        [source_id.into()],
    )
    .await?;
    Ok(row.map(SourceRow::from))
}

/// Filters for reading the log back.
#[derive(Debug, Default, Clone)]
pub struct EventFilter {
    pub source_id: Option<String>,
    pub user_id: Option<String>,
    pub anonymous_id: Option<String>,
    pub start: Option<i64>,
    pub end: Option<i64>,
    /// Only rows with `seq` below this (the page token).
    pub before_seq: Option<i64>,
    pub limit: u32,
}

/// Payloads of matching events newest first, with their `seq` for paging. Rows whose
/// payload retention has expired are skipped.
pub async fn list_events(
    db: &DatabaseConnection,
    filter: &EventFilter,
) -> Result<Vec<(i64, Vec<u8>)>, DbErr> {
    #[derive(FromQueryResult)]
    struct Logged {
        seq: i64,
        payload: Vec<u8>,
    }
    let mut text = String::from("SELECT seq, payload FROM events WHERE payload IS NOT NULL");
    let mut values: Vec<Value> = Vec::new();
    let mut clause = |condition: &str, value: Value| {
        text.push_str(" AND ");
        text.push_str(condition);
        values.push(value);
    };
    if let Some(v) = &filter.source_id {
        clause("source_id = ?", v.as_str().into());
    }
    if let Some(v) = &filter.user_id {
        clause("user_id = ?", v.as_str().into());
    }
    if let Some(v) = &filter.anonymous_id {
        clause("anonymous_id = ?", v.as_str().into());
    }
    if let Some(v) = filter.start {
        clause("received_at >= ?", v.into());
    }
    if let Some(v) = filter.end {
        clause("received_at < ?", v.into());
    }
    if let Some(v) = filter.before_seq {
        clause("seq < ?", v.into());
    }
    text.push_str(" ORDER BY seq DESC LIMIT ?");
    values.push(i64::from(filter.limit).into());
    let rows: Vec<Logged> = sql::query_as(db, &text, values).await?;
    Ok(rows.into_iter().map(|r| (r.seq, r.payload)).collect())
}

/// Queues stored events of a time range for `consumer` again; returns how many.
pub async fn replay(
    txn: &DatabaseTransaction,
    consumer: &str,
    start: i64,
    end: i64,
    source_id: Option<&str>,
    now: i64,
) -> Result<u64, DbErr> {
    let mut text = String::from(
        "INSERT INTO outbox (consumer, payload, created_at, available_at)
         SELECT ?, payload, ?, ? FROM events
         WHERE payload IS NOT NULL AND received_at >= ? AND received_at < ?",
    );
    let mut values: Vec<Value> = vec![
        consumer.into(),
        now.into(),
        now.into(),
        start.into(),
        end.into(),
    ];
    if let Some(id) = source_id {
        text.push_str(" AND source_id = ?");
        values.push(id.into());
    }
    text.push_str(" ORDER BY seq");
    sql::execute(txn, &text, values).await
}

/// Adds identifiers, as `(type, keyed hash)`, to the suppression list and, in the same
/// transaction, erases what the service holds of the erased customer: log rows whose
/// event (or, past payload retention, whose user or anonymous id) `carries` picks lose
/// their payload and those ids, and queued outbox events that `carries` picks are
/// removed. A log row's dedupe key stays, so a message an SDK sends again is still a
/// duplicate. Returns (identifiers newly added, log rows erased, outbox events removed).
pub async fn add_suppressions(
    db: &DatabaseConnection,
    hashed: &[(String, String)],
    now: i64,
    carries: impl Fn(&Event) -> bool,
) -> Result<(u32, u64, u64), DbErr> {
    let txn = db.begin().await?;
    let added = insert_suppressions(&txn, hashed, now).await?;
    let erased = erase_carrying(&txn, None, &carries).await?;
    let removed = waymark_kit::outbox::scrub(&txn, &carries).await?;
    txn.commit().await?;
    waymark_kit::db::forget_overwritten(db).await?;
    Ok((added, erased, removed))
}

async fn insert_suppressions<C: ConnectionTrait>(
    conn: &C,
    hashed: &[(String, String)],
    now: i64,
) -> Result<u32, DbErr> {
    let added = Insert::new(
        "INSERT INTO suppressions (id_type, id_value, created_at, hashed)",
        vec![
            Column::Text(hashed.iter().map(|(t, _)| t.clone()).collect()),
            Column::Text(hashed.iter().map(|(_, h)| h.clone()).collect()),
        ],
    )
    .constant(now)
    .constant(true)
    .suffix("ON CONFLICT (id_type, id_value) DO NOTHING")
    .execute(conn)
    .await?;
    Ok(added as u32)
}

/// A suppression row as stored: a keyed hash, or (before schema 5) the identifier.
#[derive(FromQueryResult)]
struct Suppression {
    id_type: String,
    id_value: String,
}

/// Replaces suppression rows stored in clear (by releases before schema 5) with their
/// keyed hashes, in one transaction; returns how many. Runs at start-up, before the list
/// is loaded.
pub async fn hash_clear_suppressions(
    db: &DatabaseConnection,
    hash: impl Fn(&(String, String)) -> (String, String),
) -> Result<u64, DbErr> {
    #[derive(FromQueryResult)]
    struct Clear {
        id_type: String,
        id_value: String,
        created_at: i64,
    }
    let txn = db.begin().await?;
    let rows: Vec<Clear> = sql::query_as(
        &txn,
        "SELECT id_type, id_value, created_at FROM suppressions WHERE NOT hashed",
        [],
    )
    .await?;
    for row in &rows {
        let clear = (row.id_type.clone(), row.id_value.clone());
        insert_suppressions(&txn, &[hash(&clear)], row.created_at).await?;
        sql::execute(
            &txn,
            "DELETE FROM suppressions WHERE id_type = ? AND id_value = ? AND NOT hashed",
            [clear.0.as_str().into(), clear.1.as_str().into()],
        )
        .await?;
    }
    txn.commit().await?;
    Ok(rows.len() as u64)
}

/// Log rows read at a time when looking inside their events.
const SCAN_PAGE_ROWS: i64 = 500;

/// Erases the payload and ids of every log row (received at or after `since`, when
/// given) whose event `carries` picks; a row past payload retention is judged by its user
/// and anonymous ids alone. Suppressions are hashes and e-mail, phone, device and custom
/// identifiers live only inside the encoded event, so rows are read page by page in `seq`
/// order and judged here.
async fn erase_carrying<C: ConnectionTrait>(
    conn: &C,
    since: Option<i64>,
    carries: &impl Fn(&Event) -> bool,
) -> Result<u64, DbErr> {
    use prost::Message;
    #[derive(FromQueryResult)]
    struct Logged {
        seq: i64,
        payload: Option<Vec<u8>>,
        user_id: String,
        anonymous_id: String,
    }
    let mut after = 0i64;
    let mut erased = 0;
    loop {
        let mut text = String::from(
            "SELECT seq, payload, user_id, anonymous_id FROM events
             WHERE seq > ? AND (payload IS NOT NULL OR user_id <> '' OR anonymous_id <> '')",
        );
        let mut values: Vec<Value> = vec![after.into()];
        if let Some(since) = since {
            text.push_str(" AND received_at >= ?");
            values.push(since.into());
        }
        text.push_str(" ORDER BY seq LIMIT ?");
        values.push(SCAN_PAGE_ROWS.into());
        let rows: Vec<Logged> = sql::query_as(conn, &text, values).await?;
        let Some(last) = rows.last() else {
            return Ok(erased);
        };
        after = last.seq;
        let mut matched: Vec<Value> = Vec::new();
        for row in rows {
            let event = match row.payload {
                Some(payload) => Event::decode(payload.as_slice())
                    .map_err(|e| DbErr::Custom(format!("log event does not decode: {e}")))?,
                None => Event {
                    user_id: row.user_id,
                    anonymous_id: row.anonymous_id,
                    ..Event::default()
                },
            };
            if carries(&event) {
                matched.push(row.seq.into());
            }
        }
        if !matched.is_empty() {
            let list = vec!["?"; matched.len()].join(", ");
            erased += sql::execute(
                conn,
                &format!(
                    "UPDATE events SET payload = NULL, user_id = '', anonymous_id = '' WHERE seq IN ({list})"
                ),
                matched,
            )
            .await?;
        }
    }
}

/// Identifiers, as `(type, keyed hash)`, suppressed at or after `since`.
pub async fn suppressed_since(
    db: &DatabaseConnection,
    since: i64,
) -> Result<Vec<(String, String)>, DbErr> {
    let rows: Vec<Suppression> = sql::query_as(
        db,
        "SELECT id_type, id_value FROM suppressions WHERE created_at >= ?",
        [since.into()],
    )
    .await?;
    Ok(rows.into_iter().map(|r| (r.id_type, r.id_value)).collect())
}

/// Erases again what the service holds of identifiers suppressed recently: events that
/// passed the check on a replica that had not learned of them yet, or were still on their
/// way to the database when the suppression was added. Log rows received at or after
/// `since` and queued outbox events that `carries` picks go, in one transaction.
/// Returns (log rows erased, outbox events removed).
pub async fn erase_recently_suppressed(
    db: &DatabaseConnection,
    since: i64,
    carries: impl Fn(&Event) -> bool,
) -> Result<(u64, u64), DbErr> {
    let txn = db.begin().await?;
    let erased = erase_carrying(&txn, Some(since), &carries).await?;
    let removed = waymark_kit::outbox::scrub(&txn, &carries).await?;
    txn.commit().await?;
    if erased > 0 || removed > 0 {
        waymark_kit::db::forget_overwritten(db).await?;
    }
    Ok((erased, removed))
}

/// The whole suppression list, as `(type, keyed hash)`.
pub async fn load_suppressions(db: &DatabaseConnection) -> Result<Vec<(String, String)>, DbErr> {
    let rows: Vec<Suppression> =
        sql::query_as(db, "SELECT id_type, id_value FROM suppressions", []).await?;
    Ok(rows.into_iter().map(|r| (r.id_type, r.id_value)).collect())
}

/// Applies retention: payloads older than `payload_cutoff` are erased, and whole rows
/// (the dedupe keys) older than `key_cutoff` are deleted. Returns (erased, deleted).
pub async fn sweep(
    db: &DatabaseConnection,
    payload_cutoff: i64,
    key_cutoff: i64,
) -> Result<(u64, u64), DbErr> {
    let deleted = sql::execute(
        db,
        "DELETE FROM events WHERE received_at < ?",
        [key_cutoff.into()],
    )
    .await?;
    let erased = if payload_cutoff > key_cutoff {
        sql::execute(
            db,
            "UPDATE events SET payload = NULL WHERE received_at < ? AND payload IS NOT NULL",
            [payload_cutoff.into()],
        )
        .await?
    } else {
        0
    };
    Ok((erased, deleted))
}

/// True for PostgreSQL, where several committers can run at once.
pub fn concurrent_writers(db: &DatabaseConnection) -> bool {
    db.get_database_backend() == DbBackend::Postgres
}
