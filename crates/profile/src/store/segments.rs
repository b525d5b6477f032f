//! Segment definitions and the membership index. A profile's own state lists its
//! segments (that is what the cache serves); `segment_members` mirrors it in the same
//! transaction so members can be listed and counted without reading every profile.

use sea_orm::{ConnectionTrait, DatabaseTransaction, DbErr, FromQueryResult, Value};
use waymark_kit::sql::{
    MAX_PARAMS, execute, in_list, insert_rows, query, query_as, query_one, query_one_as,
};

use super::records::{RECORD_COLUMNS, query_records};
use crate::resolve::Record;

/// A stored segment.
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentRow {
    pub segment_id: String,
    pub name: String,
    pub description: String,
    pub condition: String,
    pub created_at: i64,
    pub updated_at: i64,
    /// Bumped by every change of the definition.
    pub generation: i64,
    /// The generation whose membership has been computed for every profile.
    pub backfilled_generation: i64,
    pub member_count: u64,
}

const SELECT_SEGMENTS: &str =
    "SELECT s.segment_id, s.name, s.description, s.condition, s.created_at,
        s.updated_at, s.generation, s.backfilled_generation,
        (SELECT COUNT(*) FROM segment_members m WHERE m.segment_id = s.segment_id) AS member_count
    FROM segments s";

/// A segment as [`SELECT_SEGMENTS`] reads it.
#[derive(FromQueryResult)]
struct StoredSegment {
    segment_id: String,
    name: String,
    description: String,
    condition: String,
    created_at: i64,
    updated_at: i64,
    generation: i64,
    backfilled_generation: i64,
    member_count: i64,
}

impl From<StoredSegment> for SegmentRow {
    fn from(r: StoredSegment) -> Self {
        SegmentRow {
            segment_id: r.segment_id,
            name: r.name,
            description: r.description,
            condition: r.condition,
            created_at: r.created_at,
            updated_at: r.updated_at,
            generation: r.generation,
            backfilled_generation: r.backfilled_generation,
            member_count: r.member_count.max(0) as u64,
        }
    }
}

/// Every segment, by id.
pub async fn segments<C: ConnectionTrait>(conn: &C) -> Result<Vec<SegmentRow>, DbErr> {
    let rows: Vec<StoredSegment> = query_as(
        conn,
        &format!("{SELECT_SEGMENTS} ORDER BY s.segment_id"),
        [],
    )
    .await?;
    Ok(rows.into_iter().map(SegmentRow::from).collect())
}

/// One segment.
pub async fn segment<C: ConnectionTrait>(
    conn: &C,
    segment_id: &str,
) -> Result<Option<SegmentRow>, DbErr> {
    let row: Option<StoredSegment> = query_one_as(
        conn,
        &format!("{SELECT_SEGMENTS} WHERE s.segment_id = ?"),
        [segment_id.into()],
    )
    .await?;
    Ok(row.map(SegmentRow::from))
}

/// Creates or replaces a segment; a new generation awaits its backfill.
pub async fn put_segment(
    txn: &DatabaseTransaction,
    segment: &SegmentRow,
    now_us: i64,
) -> Result<(), DbErr> {
    execute(
        txn,
        "INSERT INTO segments (segment_id, name, description, condition, created_at, updated_at,
             generation, backfilled_generation)
         VALUES (?, ?, ?, ?, ?, ?, 1, 0)
         ON CONFLICT (segment_id) DO UPDATE SET name = excluded.name,
             description = excluded.description, condition = excluded.condition,
             updated_at = excluded.updated_at, generation = segments.generation + 1",
        [
            segment.segment_id.as_str().into(),
            segment.name.as_str().into(),
            segment.description.as_str().into(),
            segment.condition.as_str().into(),
            now_us.into(),
            now_us.into(),
        ],
    )
    .await?;
    Ok(())
}

/// Removes a segment definition; its membership index stays until every member has
/// exited ([`drop_members`]).
pub async fn delete_segment(txn: &DatabaseTransaction, segment_id: &str) -> Result<bool, DbErr> {
    let deleted = execute(
        txn,
        "DELETE FROM segments WHERE segment_id = ?",
        [segment_id.into()],
    )
    .await?;
    Ok(deleted > 0)
}

/// Whether the membership index lists anyone in the segment.
pub async fn has_members<C: ConnectionTrait>(conn: &C, segment_id: &str) -> Result<bool, DbErr> {
    let row = query_one(
        conn,
        "SELECT 1 FROM segment_members WHERE segment_id = ? LIMIT 1",
        [segment_id.into()],
    )
    .await?;
    Ok(row.is_some())
}

/// Removes `profile_ids` from the segment's membership index.
pub async fn drop_members(
    txn: &DatabaseTransaction,
    segment_id: &str,
    profile_ids: &[String],
) -> Result<(), DbErr> {
    for chunk in profile_ids.chunks(MAX_PARAMS - 1) {
        let values = std::iter::once(Value::from(segment_id))
            .chain(chunk.iter().map(|id| Value::from(id.as_str())));
        execute(
            txn,
            &format!(
                "DELETE FROM segment_members WHERE segment_id = ? AND profile_id IN ({})",
                in_list(chunk.len())
            ),
            values,
        )
        .await?;
    }
    Ok(())
}

/// Records that `generation` of a segment has been computed for every profile, unless
/// the definition changed meanwhile.
pub async fn mark_backfilled<C: ConnectionTrait>(
    conn: &C,
    segment_id: &str,
    generation: i64,
) -> Result<(), DbErr> {
    execute(
        conn,
        "UPDATE segments SET backfilled_generation = ? WHERE segment_id = ? AND generation = ?",
        [generation.into(), segment_id.into(), generation.into()],
    )
    .await?;
    Ok(())
}

/// Membership changes of one profile.
pub struct MembershipChange<'a> {
    pub profile_id: &'a str,
    pub entered: &'a [String],
    pub exited: &'a [String],
}

/// Mirrors membership changes into the index.
pub async fn save_memberships(
    txn: &DatabaseTransaction,
    changes: &[MembershipChange<'_>],
    now_us: i64,
) -> Result<(), DbErr> {
    let entered = changes
        .iter()
        .flat_map(|c| {
            c.entered.iter().map(|s| {
                vec![
                    Value::from(s.as_str()),
                    Value::from(c.profile_id),
                    now_us.into(),
                ]
            })
        })
        .collect();
    insert_rows(
        txn,
        "INSERT INTO segment_members (segment_id, profile_id, entered_at)",
        "ON CONFLICT (segment_id, profile_id) DO NOTHING",
        entered,
    )
    .await?;
    for change in changes {
        for segment_id in change.exited {
            execute(
                txn,
                "DELETE FROM segment_members WHERE segment_id = ? AND profile_id = ?",
                [segment_id.as_str().into(), change.profile_id.into()],
            )
            .await?;
        }
    }
    Ok(())
}

/// Drops every membership of profiles that were merged away, in one statement: each
/// survivor is evaluated afresh and holds the memberships from then on.
pub async fn drop_memberships(
    txn: &DatabaseTransaction,
    profile_ids: &[String],
) -> Result<(), DbErr> {
    for chunk in profile_ids.chunks(MAX_PARAMS) {
        execute(
            txn,
            &format!(
                "DELETE FROM segment_members WHERE profile_id IN ({})",
                in_list(chunk.len())
            ),
            chunk.iter().map(|id| Value::from(id.as_str())),
        )
        .await?;
    }
    Ok(())
}

/// A page of members, ascending after `after`.
pub async fn members<C: ConnectionTrait>(
    conn: &C,
    segment_id: &str,
    after: &str,
    limit: u32,
) -> Result<Vec<String>, DbErr> {
    let rows = query(
        conn,
        "SELECT profile_id FROM segment_members WHERE segment_id = ? AND profile_id > ?
         ORDER BY profile_id LIMIT ?",
        [segment_id.into(), after.into(), i64::from(limit).into()],
    )
    .await?;
    rows.iter().map(|r| r.try_get("", "profile_id")).collect()
}

/// A page of live profiles, ascending by id after `after`, for sweeps over every profile.
pub async fn live_profiles<C: ConnectionTrait>(
    conn: &C,
    after: &str,
    limit: u32,
) -> Result<Vec<Record>, DbErr> {
    query_records(
        conn,
        &format!(
            "SELECT {RECORD_COLUMNS} FROM profiles
             WHERE merged_into IS NULL AND profile_id > ? ORDER BY profile_id LIMIT ?"
        ),
        [after.into(), i64::from(limit).into()],
    )
    .await
}

/// A page of live profiles whose emotion label decay has moved by `now_us`, ascending by id
/// after `after`.
pub async fn emotion_due<C: ConnectionTrait>(
    conn: &C,
    now_us: i64,
    after: &str,
    limit: u32,
) -> Result<Vec<Record>, DbErr> {
    query_records(
        conn,
        &format!(
            "SELECT {RECORD_COLUMNS} FROM profiles
             WHERE emotion_due_at <= ? AND merged_into IS NULL AND profile_id > ?
             ORDER BY profile_id LIMIT ?"
        ),
        [now_us.into(), after.into(), i64::from(limit).into()],
    )
    .await
}
