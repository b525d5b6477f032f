//! The analytics tables, on PostgreSQL or SQLite: every event received (the source of
//! truth memory is rebuilt from, in arrival order), the profiles erased, the journey maps
//! and what was last written back to each profile.

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
];

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

/// Stores `events`, skipping those already stored; returns the ids stored now.
pub async fn insert_events<C: ConnectionTrait>(
    conn: &C,
    events: Vec<NewEvent>,
) -> Result<HashSet<String>, DbErr> {
    if events.is_empty() {
        return Ok(HashSet::new());
    }
    let mut ids = Vec::with_capacity(events.len());
    let mut profiles = Vec::with_capacity(events.len());
    let mut kinds = Vec::with_capacity(events.len());
    let mut bodies = Vec::with_capacity(events.len());
    for e in events {
        ids.push(e.event_id);
        profiles.push(e.profile_id);
        kinds.push(e.kind as i16);
        bodies.push(e.body);
    }
    let fresh = Insert::new(
        "INSERT INTO analytics_events (event_id, profile_id, kind, body)",
        vec![
            Column::Text(ids),
            Column::Text(profiles),
            Column::Int2(kinds),
            Column::Bytea(bodies),
        ],
    )
    .in_order()
    .suffix("ON CONFLICT (event_id) DO NOTHING RETURNING event_id")
    .returning::<Id, _>(conn)
    .await?;
    Ok(fresh.into_iter().map(|r| r.event_id).collect())
}

/// Forgets every event of `profiles` and remembers them as erased.
pub async fn erase<C: ConnectionTrait>(
    conn: &C,
    profiles: &[String],
    now: i64,
) -> Result<(), DbErr> {
    if profiles.is_empty() {
        return Ok(());
    }
    for chunk in profiles.chunks(500) {
        let list = sql::in_list(chunk.len());
        let values: Vec<sea_orm::Value> = chunk.iter().map(|p| p.clone().into()).collect();
        sql::execute(
            conn,
            &format!("DELETE FROM analytics_events WHERE profile_id IN ({list})"),
            values.clone(),
        )
        .await?;
        sql::execute(
            conn,
            &format!("DELETE FROM analytics_written WHERE profile_id IN ({list})"),
            values,
        )
        .await?;
    }
    Insert::new(
        "INSERT INTO analytics_erased (profile_id, erased_at)",
        vec![Column::Text(profiles.to_vec())],
    )
    .constant(now)
    .suffix("ON CONFLICT (profile_id) DO NOTHING")
    .execute(conn)
    .await?;
    Ok(())
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
