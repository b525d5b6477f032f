//! The merge audit, and what a merge does to the stored rows besides the profiles (the
//! merged profile's timeline and the pairs kept apart pass to the survivor).

use sea_orm::{ConnectionTrait, DatabaseTransaction, DbBackend, DbErr, FromQueryResult, Value};
use waymark_kit::sql::{execute, insert_rows, query_as};
use waymark_kit::time::from_micros;
use waymark_proto::common::v1::Identity;
use waymark_proto::profile::v1::Merge;

use crate::resolve::MergeRecord;

/// A merge's evidence as stored: `[{"type": ..., "value": ...}]`.
pub(super) fn evidence_json(evidence: &[Identity]) -> String {
    let entries: Vec<serde_json::Value> = evidence
        .iter()
        .map(|i| serde_json::json!({"type": i.r#type, "value": i.value}))
        .collect();
    serde_json::Value::Array(entries).to_string()
}

/// Stored evidence read back; what does not parse reads as no evidence.
pub(super) fn evidence_from_json(text: &str) -> Vec<Identity> {
    let entries: Vec<serde_json::Value> = serde_json::from_str(text).unwrap_or_default();
    entries
        .iter()
        .map(|e| Identity {
            r#type: e["type"].as_str().unwrap_or_default().to_owned(),
            value: e["value"].as_str().unwrap_or_default().to_owned(),
        })
        .collect()
}

/// The audit rows of `merges`, for [`insert_merges`].
pub(super) fn merge_rows(merges: &[MergeRecord]) -> Vec<Vec<Value>> {
    merges
        .iter()
        .map(|m| {
            vec![
                m.merge_id.as_str().into(),
                m.survivor_id.as_str().into(),
                m.merged_id.as_str().into(),
                m.event_id.as_str().into(),
                evidence_json(&m.evidence).into(),
                m.at_us.into(),
            ]
        })
        .collect()
}

/// Records merges in the audit (rows from [`merge_rows`]).
pub(super) async fn insert_merges(
    txn: &DatabaseTransaction,
    rows: Vec<Vec<Value>>,
) -> Result<(), DbErr> {
    insert_rows(
        txn,
        "INSERT INTO merges (merge_id, survivor_id, merged_id, event_id, evidence, merged_at)",
        "",
        rows,
    )
    .await?;
    Ok(())
}

/// Moves the timeline rows of each merged profile to its survivor ((survivor, merged)
/// pairs; a profile is merged once, so each row moves at most once): on PostgreSQL in one
/// statement, as a batch linking many visits to their customers merges many.
pub(super) async fn move_timelines(
    txn: &DatabaseTransaction,
    moved: Vec<(String, String)>,
) -> Result<(), DbErr> {
    if moved.is_empty() {
        return Ok(());
    }
    if txn.get_database_backend() == DbBackend::Postgres {
        let (survivors, merged): (Vec<String>, Vec<String>) = moved.into_iter().unzip();
        // `= ANY` on the merged ids, redundant with the join, gives the planner an index
        // condition: without it, before the table's first ANALYZE (a new deployment) it
        // estimates thousands of rows per profile and scans the whole timeline instead.
        execute(
            txn,
            "UPDATE timeline t SET profile_id = m.s FROM UNNEST(?::text[], ?::text[]) AS m(s, d)
             WHERE t.profile_id = m.d AND t.profile_id = ANY(?::text[])",
            [survivors.into(), merged.clone().into(), merged.into()],
        )
        .await?;
        return Ok(());
    }
    for (survivor, merged) in moved {
        execute(
            txn,
            "UPDATE timeline SET profile_id = ? WHERE profile_id = ?",
            [survivor.into(), merged.into()],
        )
        .await?;
    }
    Ok(())
}

/// Points the pairs kept apart that hold for `from` at `to`, which now holds it.
pub(super) async fn pass_kept_apart<C: ConnectionTrait>(
    conn: &C,
    from: &str,
    to: &str,
) -> Result<(), DbErr> {
    for column in ["live_survivor", "live_restored"] {
        execute(
            conn,
            &format!("UPDATE do_not_merge SET {column} = ? WHERE {column} = ?"),
            [to.into(), from.into()],
        )
        .await?;
    }
    Ok(())
}

/// The merge history of `live_id`, oldest first: merges into it and, through merges not
/// undone, into every profile it absorbed (A into B, then B into C: both show for C).
pub async fn merges<C: ConnectionTrait>(conn: &C, live_id: &str) -> Result<Vec<Merge>, DbErr> {
    #[derive(FromQueryResult)]
    struct Stored {
        merge_id: String,
        survivor_id: String,
        merged_id: String,
        event_id: String,
        evidence: String,
        merged_at: i64,
        unmerged_at: Option<i64>,
    }
    let rows: Vec<Stored> = query_as(
        conn,
        "WITH RECURSIVE tree(profile_id) AS (
             SELECT ?
             UNION SELECT m.merged_id FROM merges m JOIN tree t ON m.survivor_id = t.profile_id
                   WHERE m.unmerged_at IS NULL
         )
         SELECT merge_id, survivor_id, merged_id, event_id, evidence, merged_at, unmerged_at
         FROM merges WHERE survivor_id IN (SELECT profile_id FROM tree)
         ORDER BY merged_at, merge_id",
        [live_id.into()],
    )
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| Merge {
            merge_id: r.merge_id,
            survivor_id: r.survivor_id,
            merged_id: r.merged_id,
            event_id: r.event_id,
            evidence: evidence_from_json(&r.evidence),
            merged_at: Some(from_micros(r.merged_at)),
            unmerged_at: r.unmerged_at.map(from_micros),
        })
        .collect())
}
