//! What the configured aggregates were last computed for, and how far their backfill from
//! the stored timelines has come: one row per aggregate name, shared by every replica.

use std::collections::HashMap;

use prost::Message;
use sea_orm::{ConnectionTrait, DatabaseTransaction, DbErr, FromQueryResult, Value};
use waymark_kit::sql::{MAX_PARAMS, execute, in_list, query, query_as};
use waymark_proto::common::v1::Event;

use super::records::{RECORD_COLUMNS, query_records};
use crate::resolve::Record;

/// One aggregate as last configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AggregateRow {
    pub name: String,
    /// The fingerprint of its definition (`AggregateSpec::fingerprint`).
    pub definition: String,
    /// No longer configured: the backfill drops it from every profile, then the row goes.
    pub removed: bool,
    /// Every profile's state covers its whole stored timeline (or, when removed, no
    /// profile holds it any more).
    pub backfilled: bool,
    /// The last profile id the backfill finished; '' before the first page.
    pub done_through: String,
    /// Profiles the backfill went through so far.
    pub profiles_done: u64,
    /// When the definition took effect (Unix microseconds): merges from then on may have
    /// joined a backfilled profile to one not yet backfilled.
    pub started_at: i64,
}

/// Every row, by name.
pub async fn aggregate_rows<C: ConnectionTrait>(conn: &C) -> Result<Vec<AggregateRow>, DbErr> {
    #[derive(FromQueryResult)]
    struct Stored {
        name: String,
        definition: String,
        removed: bool,
        backfilled: bool,
        done_through: String,
        profiles_done: i64,
        started_at: i64,
    }
    let rows: Vec<Stored> = query_as(
        conn,
        "SELECT name, definition, removed, backfilled, done_through, profiles_done, started_at
         FROM aggregate_specs ORDER BY name",
        [],
    )
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| AggregateRow {
            name: r.name,
            definition: r.definition,
            removed: r.removed,
            backfilled: r.backfilled,
            done_through: r.done_through,
            profiles_done: r.profiles_done.max(0) as u64,
            started_at: r.started_at,
        })
        .collect())
}

/// Writes a row (insert or replace).
pub async fn put_aggregate_row(txn: &DatabaseTransaction, row: &AggregateRow) -> Result<(), DbErr> {
    execute(
        txn,
        "INSERT INTO aggregate_specs
             (name, definition, removed, backfilled, done_through, profiles_done, started_at)
         VALUES (?, ?, ?, ?, ?, ?, ?)
         ON CONFLICT (name) DO UPDATE SET definition = excluded.definition,
             removed = excluded.removed, backfilled = excluded.backfilled,
             done_through = excluded.done_through, profiles_done = excluded.profiles_done,
             started_at = excluded.started_at",
        [
            row.name.as_str().into(),
            row.definition.as_str().into(),
            row.removed.into(),
            row.backfilled.into(),
            row.done_through.as_str().into(),
            (row.profiles_done as i64).into(),
            row.started_at.into(),
        ],
    )
    .await?;
    Ok(())
}

/// Deletes a row.
pub async fn delete_aggregate_row(txn: &DatabaseTransaction, name: &str) -> Result<(), DbErr> {
    execute(
        txn,
        "DELETE FROM aggregate_specs WHERE name = ?",
        [name.into()],
    )
    .await?;
    Ok(())
}

/// A page of profiles, live and merged away, ascending by id after `after`, created
/// before `created_before`.
pub async fn profiles_after<C: ConnectionTrait>(
    conn: &C,
    after: &str,
    created_before: i64,
    limit: u32,
) -> Result<Vec<Record>, DbErr> {
    query_records(
        conn,
        &format!(
            "SELECT {RECORD_COLUMNS} FROM profiles WHERE profile_id > ? AND created_at < ?
             ORDER BY profile_id LIMIT ?"
        ),
        [after.into(), created_before.into(), i64::from(limit).into()],
    )
    .await
}

/// Those of `merged_ids` merged away at or after `since_us` (by a merge still standing).
pub async fn merged_since<C: ConnectionTrait>(
    conn: &C,
    merged_ids: &[String],
    since_us: i64,
) -> Result<Vec<String>, DbErr> {
    if merged_ids.is_empty() {
        return Ok(Vec::new());
    }
    let text = format!(
        "SELECT DISTINCT merged_id FROM merges
         WHERE merged_id IN ({}) AND merged_at >= ? AND unmerged_at IS NULL",
        in_list(merged_ids.len())
    );
    let values = merged_ids
        .iter()
        .map(|s| Value::from(s.as_str()))
        .chain([Value::from(since_us)]);
    query(conn, &text, values)
        .await?
        .iter()
        .map(|r| r.try_get("", "merged_id"))
        .collect()
}

/// How many events each of `profile_ids` has on its timeline (none listed: none).
pub async fn timeline_sizes<C: ConnectionTrait>(
    conn: &C,
    profile_ids: &[String],
) -> Result<HashMap<String, u64>, DbErr> {
    #[derive(FromQueryResult)]
    struct Size {
        profile_id: String,
        events: i64,
    }
    let mut sizes = HashMap::with_capacity(profile_ids.len());
    for chunk in profile_ids.chunks(MAX_PARAMS) {
        let text = format!(
            "SELECT profile_id, count(*) AS events FROM timeline
             WHERE profile_id IN ({}) GROUP BY profile_id",
            in_list(chunk.len())
        );
        let values = chunk.iter().map(|id| Value::from(id.as_str()));
        for size in query_as::<Size, _>(conn, &text, values).await? {
            sizes.insert(size.profile_id, size.events.max(0) as u64);
        }
    }
    Ok(sizes)
}

/// A page of the events on a live profile's timeline (its own and those of every profile
/// merged into it), oldest first, after `after` (ts, event_id). Rows written before schema
/// version 3 hold no event and are left out.
pub async fn history_page<C: ConnectionTrait>(
    conn: &C,
    profile_id: &str,
    after: &(i64, String),
    limit: u32,
) -> Result<Vec<Event>, DbErr> {
    let (ts, id) = after;
    let rows = query(
        conn,
        "SELECT event FROM timeline
         WHERE profile_id = ? AND event IS NOT NULL AND (ts > ? OR (ts = ? AND event_id > ?))
         ORDER BY ts, event_id LIMIT ?",
        [
            profile_id.into(),
            (*ts).into(),
            (*ts).into(),
            id.as_str().into(),
            i64::from(limit).into(),
        ],
    )
    .await?;
    rows.iter()
        .map(|row| {
            let bytes: Vec<u8> = row.try_get("", "event")?;
            Event::decode(bytes.as_slice())
                .map_err(|e| DbErr::Custom(format!("stored event does not decode: {e}")))
        })
        .collect()
}
