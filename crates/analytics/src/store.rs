//! The analytics tables, on PostgreSQL or SQLite: every event received (the source of
//! truth memory is rebuilt from, in arrival order), the profiles erased, the journey maps
//! and what was last written back to each profile.
//!
//! Events carry no index by profile: it would cost every insert about as much as the row
//! itself, for erasures, which are rare. An erasure is recorded at once and its events
//! are deleted afterwards by one scan for every erasure pending ([`scrub`]).

use std::collections::HashSet;

use sea_orm::{ConnectionTrait, DbErr, FromQueryResult};
use waymark_kit::db::Migration;
use waymark_kit::sql::{self, Column, Insert};

const TABLES: &str = "
    CREATE TABLE analytics_erased (
        profile_id TEXT PRIMARY KEY,
        erased_at BIGINT NOT NULL
    );
    CREATE TABLE analytics_maps (
        map_id TEXT PRIMARY KEY,
        definition BYTEA NOT NULL,
        updated_at BIGINT NOT NULL
    );
    CREATE TABLE analytics_written (
        map_id TEXT NOT NULL,
        profile_id TEXT NOT NULL,
        stage_id TEXT NOT NULL,
        stuck SMALLINT NOT NULL,
        PRIMARY KEY (map_id, profile_id)
    );
";

// The arrival order is the replay order; each backend has its own auto-increment.
const EVENTS_POSTGRES: &str = "
    CREATE TABLE analytics_events (
        seq BIGSERIAL PRIMARY KEY,
        event_id TEXT NOT NULL UNIQUE,
        profile_id TEXT NOT NULL,
        kind SMALLINT NOT NULL,
        body BYTEA NOT NULL
    );
    CREATE INDEX analytics_events_profile ON analytics_events (profile_id);
";
const EVENTS_SQLITE: &str = "
    CREATE TABLE analytics_events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        event_id TEXT NOT NULL UNIQUE,
        profile_id TEXT NOT NULL,
        kind SMALLINT NOT NULL,
        body BYTEA NOT NULL
    );
    CREATE INDEX analytics_events_profile ON analytics_events (profile_id);
";

/// The analytics service's migrations.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "erased profiles, journey maps, written-back stages",
        postgres: TABLES,
        sqlite: TABLES,
    },
    Migration {
        version: 2,
        name: "events received",
        postgres: EVENTS_POSTGRES,
        sqlite: EVENTS_SQLITE,
    },
    Migration {
        version: 3,
        name: "events without a profile index; erasures scrubbed afterwards",
        postgres: SCRUB_LATER,
        sqlite: SCRUB_LATER,
    },
];

// Erasures recorded before this migration deleted their events at once.
const SCRUB_LATER: &str = "
    DROP INDEX analytics_events_profile;
    ALTER TABLE analytics_erased ADD COLUMN scrubbed SMALLINT NOT NULL DEFAULT 1;
";

/// What a stored event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Customer = 0,
    JourneyStep = 1,
    Notice = 2,
}

/// An event to store.
pub struct NewEvent {
    pub event_id: String,
    pub profile_id: String,
    pub kind: Kind,
    pub body: Vec<u8>,
}

#[derive(FromQueryResult)]
struct Id {
    event_id: String,
}

#[derive(FromQueryResult)]
struct Seq {
    seq: i64,
}

/// Stores `events`, skipping those already stored; returns the ids stored now. Their
/// `seq` follows the order given, which replay follows.
pub async fn insert_events<C: ConnectionTrait>(
    conn: &C,
    mut events: Vec<NewEvent>,
) -> Result<HashSet<String>, DbErr> {
    if events.is_empty() {
        return Ok(HashSet::new());
    }
    let postgres = conn.get_database_backend() == sea_orm::DbBackend::Postgres;
    let mut seqs = Vec::new();
    if postgres {
        // Concurrent deliveries may share redelivered ids. Each inserts in id order, so
        // that none waits for another's id while holding one the other wants (a
        // deadlock); seqs are drawn first and given out in the order of `events`.
        seqs = sql::query_as::<Seq, _>(
            conn,
            "SELECT nextval(pg_get_serial_sequence('analytics_events', 'seq')) AS seq \
             FROM generate_series(1, ?)",
            vec![(events.len() as i64).into()],
        )
        .await?
        .into_iter()
        .map(|s| s.seq)
        .collect();
        seqs.sort_unstable();
        let mut numbered: Vec<(i64, NewEvent)> = seqs.into_iter().zip(events).collect();
        numbered.sort_unstable_by(|a, b| a.1.event_id.cmp(&b.1.event_id));
        (seqs, events) = numbered.into_iter().unzip();
    }
    let mut columns = Vec::with_capacity(5);
    if postgres {
        columns.push(Column::Int8(seqs));
    }
    let (mut ids, mut profiles, mut kinds, mut bodies) = (
        Vec::with_capacity(events.len()),
        Vec::with_capacity(events.len()),
        Vec::with_capacity(events.len()),
        Vec::with_capacity(events.len()),
    );
    for e in events {
        ids.push(e.event_id);
        profiles.push(e.profile_id);
        kinds.push(e.kind as i16);
        bodies.push(e.body);
    }
    columns.extend([
        Column::Text(ids),
        Column::Text(profiles),
        Column::Int2(kinds),
        Column::Bytea(bodies),
    ]);
    let insert = if postgres {
        Insert::new(
            "INSERT INTO analytics_events (seq, event_id, profile_id, kind, body)",
            columns,
        )
    } else {
        Insert::new(
            "INSERT INTO analytics_events (event_id, profile_id, kind, body)",
            columns,
        )
        .in_order()
    };
    let fresh = insert
        .suffix("ON CONFLICT (event_id) DO NOTHING RETURNING event_id")
        .returning::<Id, _>(conn)
        .await?;
    Ok(fresh.into_iter().map(|r| r.event_id).collect())
}

/// Remembers `profiles` as erased; their events are deleted by the next [`scrub`].
pub async fn erase<C: ConnectionTrait>(
    conn: &C,
    profiles: &[String],
    now: i64,
) -> Result<(), DbErr> {
    if profiles.is_empty() {
        return Ok(());
    }
    Insert::new(
        "INSERT INTO analytics_erased (profile_id, erased_at, scrubbed)",
        vec![Column::Text(profiles.to_vec())],
    )
    .constant(now)
    .constant(0i16)
    .suffix("ON CONFLICT (profile_id) DO NOTHING")
    .execute(conn)
    .await?;
    Ok(())
}

/// Erased profiles scrubbed per scan: bounds the statement, not the scans.
const SCRUB_BATCH: usize = 1000;

/// Deletes the events and written-back stages of erased profiles not yet scrubbed, in
/// one transaction per [`SCRUB_BATCH`] of them; returns how many profiles were scrubbed.
pub async fn scrub(db: &sea_orm::DatabaseConnection) -> Result<usize, DbErr> {
    let mut scrubbed = 0;
    loop {
        let txn = waymark_kit::db::begin_write(db).await?;
        let pending: Vec<ErasedRow> = sql::query_as(
            &txn,
            "SELECT profile_id FROM analytics_erased WHERE scrubbed = 0 ORDER BY profile_id LIMIT ?",
            vec![(SCRUB_BATCH as i64).into()],
        )
        .await?;
        if pending.is_empty() {
            return Ok(scrubbed);
        }
        let list = sql::in_list(pending.len());
        let values: Vec<sea_orm::Value> = pending
            .iter()
            .map(|p| p.profile_id.clone().into())
            .collect();
        for table in ["analytics_events", "analytics_written"] {
            sql::execute(
                &txn,
                &format!("DELETE FROM {table} WHERE profile_id IN ({list})"),
                values.clone(),
            )
            .await?;
        }
        sql::execute(
            &txn,
            &format!("UPDATE analytics_erased SET scrubbed = 1 WHERE profile_id IN ({list})"),
            values,
        )
        .await?;
        txn.commit().await?;
        scrubbed += pending.len();
    }
}

#[derive(FromQueryResult)]
struct ErasedRow {
    profile_id: String,
}

/// Every erased profile.
pub async fn erased<C: ConnectionTrait>(conn: &C) -> Result<HashSet<String>, DbErr> {
    let rows: Vec<ErasedRow> =
        sql::query_as(conn, "SELECT profile_id FROM analytics_erased", vec![]).await?;
    Ok(rows.into_iter().map(|r| r.profile_id).collect())
}

/// A stored event, for replay.
#[derive(FromQueryResult)]
pub struct StoredEvent {
    pub seq: i64,
    pub kind: i16,
    pub body: Vec<u8>,
}

/// Up to `limit` stored events after `after`, in arrival order.
pub async fn events_after<C: ConnectionTrait>(
    conn: &C,
    after: i64,
    limit: u32,
) -> Result<Vec<StoredEvent>, DbErr> {
    sql::query_as(
        conn,
        "SELECT seq, kind, body FROM analytics_events WHERE seq > ? ORDER BY seq LIMIT ?",
        vec![after.into(), i64::from(limit).into()],
    )
    .await
}

#[derive(FromQueryResult)]
pub struct MapRow {
    pub map_id: String,
    pub definition: Vec<u8>,
}

/// Saves a journey map.
pub async fn put_map<C: ConnectionTrait>(
    conn: &C,
    map_id: &str,
    definition: Vec<u8>,
    now: i64,
) -> Result<(), DbErr> {
    sql::execute(
        conn,
        "INSERT INTO analytics_maps (map_id, definition, updated_at) VALUES (?, ?, ?) \
         ON CONFLICT (map_id) DO UPDATE SET definition = excluded.definition, \
         updated_at = excluded.updated_at",
        vec![map_id.into(), definition.into(), now.into()],
    )
    .await?;
    Ok(())
}

/// Every journey map.
pub async fn maps<C: ConnectionTrait>(conn: &C) -> Result<Vec<MapRow>, DbErr> {
    sql::query_as(
        conn,
        "SELECT map_id, definition FROM analytics_maps ORDER BY map_id",
        vec![],
    )
    .await
}

/// What was last written back to a profile for a map.
#[derive(FromQueryResult, Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub map_id: String,
    pub profile_id: String,
    pub stage_id: String,
    pub stuck: i16,
}

/// Everything written back so far.
pub async fn written<C: ConnectionTrait>(conn: &C) -> Result<Vec<Written>, DbErr> {
    sql::query_as(
        conn,
        "SELECT map_id, profile_id, stage_id, stuck FROM analytics_written",
        vec![],
    )
    .await
}

/// Records what was written back.
pub async fn record_written<C: ConnectionTrait>(conn: &C, rows: &[Written]) -> Result<(), DbErr> {
    if rows.is_empty() {
        return Ok(());
    }
    Insert::new(
        "INSERT INTO analytics_written (map_id, profile_id, stage_id, stuck)",
        vec![
            Column::Text(rows.iter().map(|r| r.map_id.clone()).collect()),
            Column::Text(rows.iter().map(|r| r.profile_id.clone()).collect()),
            Column::Text(rows.iter().map(|r| r.stage_id.clone()).collect()),
            Column::Int2(rows.iter().map(|r| r.stuck).collect()),
        ],
    )
    .suffix(
        "ON CONFLICT (map_id, profile_id) DO UPDATE SET stage_id = excluded.stage_id, \
         stuck = excluded.stuck",
    )
    .execute(conn)
    .await?;
    Ok(())
}
