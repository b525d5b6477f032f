//! What Unmerge reads and rewrites: one merge of the audit, the events of both sides a page
//! at a time, identifier ownership and the timeline rows of the profiles being split back
//! out; and the pairs of profiles it keeps apart (`do_not_merge`), which AllowMerge lifts.

use sea_orm::{ConnectionTrait, DatabaseTransaction, DbErr, FromQueryResult, Value};
use waymark_kit::sql::{MAX_PARAMS, execute, in_list, insert_rows, query_as, query_one_as};
use waymark_proto::common::v1::Event;
use waymark_proto::profile::v1::DoNotMerge;

use super::timeline::OriginEvent;
use crate::identity::Ident;

/// One merge of the audit, read by column name.
#[derive(Debug, Clone, PartialEq, Eq, FromQueryResult)]
pub struct MergeRow {
    pub merge_id: String,
    pub survivor_id: String,
    pub merged_id: String,
    pub merged_at: i64,
    pub unmerged_at: Option<i64>,
    /// The identifiers that linked the two, as the audit stores them (JSON).
    pub evidence: String,
}

/// A merge by its audit id.
pub async fn merge_by_id<C: ConnectionTrait>(
    conn: &C,
    merge_id: &str,
) -> Result<Option<MergeRow>, DbErr> {
    query_one_as(
        conn,
        "SELECT merge_id, survivor_id, merged_id, merged_at, unmerged_at, evidence
         FROM merges WHERE merge_id = ?",
        [merge_id.into()],
    )
    .await
}

/// Records that a merge was undone.
pub async fn mark_unmerged(
    txn: &DatabaseTransaction,
    merge_id: &str,
    now_us: i64,
) -> Result<(), DbErr> {
    execute(
        txn,
        "UPDATE merges SET unmerged_at = ? WHERE merge_id = ?",
        [now_us.into(), merge_id.into()],
    )
    .await?;
    Ok(())
}

/// Points identifiers at `owner`.
pub async fn assign_identities(
    txn: &DatabaseTransaction,
    identities: &[Ident],
    owner: &str,
) -> Result<(), DbErr> {
    let rows = identities
        .iter()
        .map(|(t, v)| vec![t.as_str().into(), v.as_str().into(), owner.into()])
        .collect();
    insert_rows(
        txn,
        "INSERT INTO identities (id_type, id_value, profile_id)",
        "ON CONFLICT (id_type, id_value) DO UPDATE SET profile_id = excluded.profile_id",
        rows,
    )
    .await?;
    Ok(())
}

/// Moves the timeline rows first applied to any of `origins` to `owner`. While merged,
/// every such row sits on another profile than its origin, so the partial origin index
/// finds them all.
pub async fn move_timeline(
    txn: &DatabaseTransaction,
    origins: &[String],
    owner: &str,
) -> Result<u64, DbErr> {
    let values =
        std::iter::once(Value::from(owner)).chain(origins.iter().map(|o| Value::from(o.as_str())));
    execute(
        txn,
        &format!(
            "UPDATE timeline SET profile_id = ?
             WHERE origin_profile_id IN ({}) AND origin_profile_id <> profile_id",
            in_list(origins.len())
        ),
        values,
    )
    .await
}

/// A page of the events first applied to any of `origins`, in replay order (event time,
/// then id) after `after`, with their origin: [`super::events_of`] a page at a time.
pub async fn events_page<C: ConnectionTrait>(
    conn: &C,
    origins: &[String],
    after: &(i64, String),
    limit: u32,
) -> Result<Vec<(String, Event)>, DbErr> {
    if origins.is_empty() {
        return Ok(Vec::new());
    }
    if origins.len() > MAX_PARAMS / 2 - 8 {
        return Err(DbErr::Custom(format!(
            "a merge tree of {} profiles is too large to page through",
            origins.len()
        )));
    }
    // The two halves of `events_of`, each from where the last page ended.
    let list = in_list(origins.len());
    let text = format!(
        "SELECT origin_profile_id, event, ts, event_id FROM timeline
         WHERE profile_id IN ({list}) AND origin_profile_id = profile_id AND event IS NOT NULL
           AND (ts > ? OR (ts = ? AND event_id > ?))
         UNION ALL
         SELECT origin_profile_id, event, ts, event_id FROM timeline
         WHERE origin_profile_id IN ({list}) AND origin_profile_id <> profile_id
           AND event IS NOT NULL AND (ts > ? OR (ts = ? AND event_id > ?))
         ORDER BY ts, event_id LIMIT ?"
    );
    let (ts, id) = after;
    let half = || {
        origins.iter().map(|o| Value::from(o.as_str())).chain([
            Value::from(*ts),
            Value::from(*ts),
            Value::from(id.as_str()),
        ])
    };
    let values = half().chain(half()).chain([Value::from(i64::from(limit))]);
    query_as::<OriginEvent, _>(conn, &text, values)
        .await?
        .into_iter()
        .map(OriginEvent::decode)
        .collect()
}

/// Records that the two profiles `merge` joined, split apart by undoing it, are two
/// people: resolution never merges them again. The pair names the merge's own survivor
/// (so undoing a later merge of that survivor hands the pair back to it) and holds, for
/// now, for `holder`, the live profile the survivor lives in.
pub async fn keep_apart(
    txn: &DatabaseTransaction,
    merge: &MergeRow,
    holder: &str,
    restored: &str,
    now_us: i64,
) -> Result<(), DbErr> {
    execute(
        txn,
        "INSERT INTO do_not_merge (merge_id, survivor_id, restored_id, live_survivor,
             live_restored, evidence, unmerged_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            merge.merge_id.as_str().into(),
            merge.survivor_id.as_str().into(),
            restored.into(),
            holder.into(),
            restored.into(),
            merge.evidence.as_str().into(),
            now_us.into(),
        ],
    )
    .await?;
    Ok(())
}

/// After an unmerge restored `owner` with the profiles of `origins` inside it: the pairs
/// naming any of them hold for `owner` again rather than for the profile it left.
pub async fn restore_kept_apart(
    txn: &DatabaseTransaction,
    origins: &[String],
    owner: &str,
) -> Result<(), DbErr> {
    for chunk in origins.chunks(MAX_PARAMS / 2) {
        let list = in_list(chunk.len());
        for (live, named) in [
            ("live_survivor", "survivor_id"),
            ("live_restored", "restored_id"),
        ] {
            let values = std::iter::once(Value::from(owner))
                .chain(chunk.iter().map(|o| Value::from(o.as_str())));
            execute(
                txn,
                &format!("UPDATE do_not_merge SET {live} = ? WHERE {named} IN ({list})"),
                values,
            )
            .await?;
        }
    }
    Ok(())
}

const DO_NOT_MERGE_COLUMNS: &str = "merge_id, survivor_id, restored_id, evidence, unmerged_at";

/// A pair kept apart, as [`DO_NOT_MERGE_COLUMNS`] select it.
#[derive(FromQueryResult)]
struct DoNotMergeRow {
    merge_id: String,
    survivor_id: String,
    restored_id: String,
    evidence: String,
    unmerged_at: i64,
}

impl From<DoNotMergeRow> for DoNotMerge {
    fn from(r: DoNotMergeRow) -> Self {
        DoNotMerge {
            merge_id: r.merge_id,
            survivor_id: r.survivor_id,
            restored_id: r.restored_id,
            evidence: super::merges::evidence_from_json(&r.evidence),
            unmerged_at: Some(waymark_kit::time::from_micros(r.unmerged_at)),
        }
    }
}

/// The pairs kept apart that hold for the live profile `live_id`, oldest first.
pub async fn kept_apart_from<C: ConnectionTrait>(
    conn: &C,
    live_id: &str,
) -> Result<Vec<DoNotMerge>, DbErr> {
    let rows: Vec<DoNotMergeRow> = query_as(
        conn,
        &format!(
            "SELECT {DO_NOT_MERGE_COLUMNS} FROM do_not_merge
             WHERE live_survivor = ? OR live_restored = ? ORDER BY unmerged_at, merge_id"
        ),
        [live_id.into(), live_id.into()],
    )
    .await?;
    Ok(rows.into_iter().map(DoNotMerge::from).collect())
}

/// Lifts the pair recorded by undoing `merge_id`; returns it, or None when there is none.
pub async fn allow_merge(
    txn: &DatabaseTransaction,
    merge_id: &str,
) -> Result<Option<DoNotMerge>, DbErr> {
    let row: Option<DoNotMergeRow> = query_one_as(
        txn,
        &format!("SELECT {DO_NOT_MERGE_COLUMNS} FROM do_not_merge WHERE merge_id = ?"),
        [merge_id.into()],
    )
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    execute(
        txn,
        "DELETE FROM do_not_merge WHERE merge_id = ?",
        [merge_id.into()],
    )
    .await?;
    Ok(Some(row.into()))
}
