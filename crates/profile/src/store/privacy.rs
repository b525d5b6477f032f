//! Erasure, export and the suppression list.

use sea_orm::{ConnectionTrait, DatabaseTransaction, DbErr, FromQueryResult, Value};
use waymark_kit::sql::{MAX_PARAMS, execute, in_list, insert_rows, query, query_as};

use super::idents::ident_pairs;
use crate::identity::Ident;

/// An identifier as its table stores it.
#[derive(FromQueryResult)]
struct IdentRow {
    id_type: String,
    id_value: String,
}

impl From<IdentRow> for Ident {
    fn from(r: IdentRow) -> Self {
        (r.id_type, r.id_value)
    }
}

/// The profile and every profile merged into it, directly or through earlier merges.
pub async fn merge_tree<C: ConnectionTrait>(conn: &C, live_id: &str) -> Result<Vec<String>, DbErr> {
    let rows = query(
        conn,
        "WITH RECURSIVE tree(profile_id) AS (
             SELECT ?
             UNION SELECT p.profile_id FROM profiles p JOIN tree t ON p.merged_into = t.profile_id
         ) SELECT profile_id FROM tree",
        [live_id.into()],
    )
    .await?;
    rows.iter().map(|r| r.try_get("", "profile_id")).collect()
}

/// Identifiers pointing at a profile.
pub async fn identities_of<C: ConnectionTrait>(
    conn: &C,
    profile_id: &str,
) -> Result<Vec<Ident>, DbErr> {
    let rows: Vec<IdentRow> = query_as(
        conn,
        "SELECT id_type, id_value FROM identities WHERE profile_id = ? ORDER BY id_type, id_value",
        [profile_id.into()],
    )
    .await?;
    Ok(rows.into_iter().map(Ident::from).collect())
}

/// Rows erased with a profile.
#[derive(Debug, Default, Clone, Copy)]
pub struct Erased {
    pub timeline_entries: u64,
}

/// Erases the profiles of `tree` (a live profile and those merged into it) with their
/// identifiers, timeline, merge audit, the pairs kept apart holding for them and segment
/// memberships.
pub async fn erase(
    txn: &DatabaseTransaction,
    tree: &[String],
    identities: &[Ident],
) -> Result<Erased, DbErr> {
    let mut timeline_entries = 0;
    // Chunks keep every statement under SQLite's bound-parameter limit, however many
    // profiles were merged into the erased one (the merge audit binds each id twice).
    for chunk in tree.chunks(MAX_PARAMS / 2) {
        let ids: Vec<Value> = chunk.iter().map(|id| id.as_str().into()).collect();
        let list = in_list(ids.len());
        timeline_entries += execute(
            txn,
            &format!("DELETE FROM timeline WHERE profile_id IN ({list})"),
            ids.clone(),
        )
        .await?;
        for table in ["segment_members", "identities", "profiles"] {
            execute(
                txn,
                &format!("DELETE FROM {table} WHERE profile_id IN ({list})"),
                ids.clone(),
            )
            .await?;
        }
        // The audit names the identifiers that linked the profiles: it goes with them.
        execute(
            txn,
            &format!("DELETE FROM merges WHERE survivor_id IN ({list}) OR merged_id IN ({list})"),
            ids.iter().chain(&ids).cloned(),
        )
        .await?;
        // A pair names the profiles and the identifiers that once linked them.
        execute(
            txn,
            &format!(
                "DELETE FROM do_not_merge WHERE live_survivor IN ({list}) OR live_restored IN ({list})"
            ),
            ids.iter().chain(&ids).cloned(),
        )
        .await?;
    }
    // Identifiers only the profile's state listed: erasure leaves none behind.
    for chunk in identities.chunks(MAX_PARAMS / 2) {
        let (pairs, values) = ident_pairs(chunk);
        execute(
            txn,
            &format!("DELETE FROM identities WHERE (id_type, id_value) IN ({pairs})"),
            values,
        )
        .await?;
    }
    Ok(Erased { timeline_entries })
}

/// Puts identifiers, as `(type, keyed hash)`, on the suppression list (already listed
/// ones stay as they were).
pub async fn suppress(
    txn: &DatabaseTransaction,
    hashed: &[Ident],
    now_us: i64,
) -> Result<(), DbErr> {
    let rows = hashed
        .iter()
        .map(|(t, h)| {
            vec![
                t.as_str().into(),
                h.as_str().into(),
                now_us.into(),
                true.into(),
            ]
        })
        .collect();
    insert_rows(
        txn,
        "INSERT INTO suppressions (id_type, id_value, suppressed_at, hashed)",
        "ON CONFLICT (id_type, id_value) DO NOTHING",
        rows,
    )
    .await?;
    Ok(())
}

/// Replaces suppression rows stored in clear (by releases before schema 12) with their
/// keyed hashes, keeping when they were suppressed and synced; returns how many.
pub async fn hash_clear_suppressions(
    txn: &DatabaseTransaction,
    hash: impl Fn(&Ident) -> Ident,
) -> Result<u64, DbErr> {
    let rows: Vec<SuppressionRow> = query_as(
        txn,
        "SELECT id_type, id_value, suppressed_at, synced_at FROM suppressions WHERE NOT hashed",
        [],
    )
    .await?;
    let count = rows.len() as u64;
    for row in rows {
        let clear: Ident = (row.id_type, row.id_value);
        let (id_type, id_hash) = hash(&clear);
        execute(
            txn,
            "INSERT INTO suppressions (id_type, id_value, suppressed_at, synced_at, hashed)
             VALUES (?, ?, ?, ?, TRUE) ON CONFLICT (id_type, id_value) DO NOTHING",
            [
                id_type.into(),
                id_hash.into(),
                row.suppressed_at.into(),
                row.synced_at.into(),
            ],
        )
        .await?;
        execute(
            txn,
            "DELETE FROM suppressions WHERE id_type = ? AND id_value = ? AND NOT hashed",
            [clear.0.into(), clear.1.into()],
        )
        .await?;
    }
    Ok(count)
}

/// The identifiers suppressed at or after `since`, with when.
pub async fn suppressed_since<C: ConnectionTrait>(
    conn: &C,
    since: i64,
) -> Result<Vec<(Ident, i64)>, DbErr> {
    #[derive(FromQueryResult)]
    struct Suppressed {
        #[sea_orm(nested)]
        ident: IdentRow,
        suppressed_at: i64,
    }
    let rows: Vec<Suppressed> = query_as(
        conn,
        "SELECT id_type, id_value, suppressed_at FROM suppressions WHERE suppressed_at >= ?",
        [since.into()],
    )
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.ident.into(), r.suppressed_at))
        .collect())
}

/// One row of the suppression list, read by column name.
#[derive(Debug, Clone, PartialEq, Eq, FromQueryResult)]
pub struct SuppressionRow {
    pub id_type: String,
    pub id_value: String,
    pub suppressed_at: i64,
    pub synced_at: Option<i64>,
}

/// A page of the suppression list, newest first, after the `(suppressed_at, type, value)`
/// of the previous page's last row.
pub async fn suppressions<C: ConnectionTrait>(
    conn: &C,
    after: Option<&(i64, String, String)>,
    limit: u32,
) -> Result<Vec<SuppressionRow>, DbErr> {
    let mut text =
        String::from("SELECT id_type, id_value, suppressed_at, synced_at FROM suppressions");
    let mut values: Vec<Value> = Vec::new();
    if let Some((at, t, v)) = after {
        text.push_str(
            " WHERE suppressed_at < ? OR (suppressed_at = ? AND (id_type > ? OR (id_type = ? AND id_value > ?)))",
        );
        values.extend([
            Value::from(*at),
            Value::from(*at),
            t.as_str().into(),
            t.as_str().into(),
            v.as_str().into(),
        ]);
    }
    text.push_str(" ORDER BY suppressed_at DESC, id_type, id_value LIMIT ?");
    values.push(i64::from(limit).into());
    query_as(conn, &text, values).await
}

/// Suppressions ingestion has not acknowledged yet, oldest first.
pub async fn unsynced_suppressions<C: ConnectionTrait>(
    conn: &C,
    limit: u32,
) -> Result<Vec<Ident>, DbErr> {
    let rows: Vec<IdentRow> = query_as(
        conn,
        "SELECT id_type, id_value FROM suppressions WHERE synced_at IS NULL
         ORDER BY suppressed_at, id_type, id_value LIMIT ?",
        [i64::from(limit).into()],
    )
    .await?;
    Ok(rows.into_iter().map(Ident::from).collect())
}

/// Marks suppressions as acknowledged by ingestion.
pub async fn mark_synced<C: ConnectionTrait>(
    conn: &C,
    identities: &[Ident],
    now_us: i64,
) -> Result<(), DbErr> {
    for chunk in identities.chunks(MAX_PARAMS / 2) {
        let (pairs, values) = ident_pairs(chunk);
        execute(
            conn,
            &format!(
                "UPDATE suppressions SET synced_at = ? WHERE (id_type, id_value) IN ({pairs})"
            ),
            std::iter::once(Value::from(now_us)).chain(values),
        )
        .await?;
    }
    Ok(())
}

/// Records, in the erasure's transaction, that the cache entries of `ids` must become
/// tombstones: the rows stay until a tombstone has reached the cache.
pub async fn add_pending_tombstones(
    txn: &DatabaseTransaction,
    ids: &[String],
    now_us: i64,
) -> Result<(), DbErr> {
    let rows = ids
        .iter()
        .map(|id| vec![id.as_str().into(), now_us.into()])
        .collect();
    insert_rows(
        txn,
        "INSERT INTO pending_tombstones (profile_id, erased_at)",
        "ON CONFLICT (profile_id) DO NOTHING",
        rows,
    )
    .await?;
    Ok(())
}

/// Erased profiles whose tombstone has not reached the cache yet.
pub async fn pending_tombstones<C: ConnectionTrait>(conn: &C) -> Result<Vec<String>, DbErr> {
    let rows = query(
        conn,
        "SELECT profile_id FROM pending_tombstones ORDER BY erased_at, profile_id",
        [],
    )
    .await?;
    rows.iter().map(|r| r.try_get("", "profile_id")).collect()
}

/// Forgets pending tombstones that have reached the cache.
pub async fn drop_pending_tombstones<C: ConnectionTrait>(
    conn: &C,
    ids: &[String],
) -> Result<(), DbErr> {
    for chunk in ids.chunks(MAX_PARAMS) {
        let values: Vec<Value> = chunk.iter().map(|id| id.as_str().into()).collect();
        execute(
            conn,
            &format!(
                "DELETE FROM pending_tombstones WHERE profile_id IN ({})",
                in_list(values.len())
            ),
            values,
        )
        .await?;
    }
    Ok(())
}

/// Up to `limit` timeline rows, after event id `after` in key order, whose stored event
/// holds the bytes of one of `needles` anywhere: candidates for identifiers another
/// profile's events carried, which the caller checks exactly. Returns (event id, profile
/// id, event).
pub async fn events_containing<C: ConnectionTrait>(
    conn: &C,
    needles: &[&str],
    after: &str,
    limit: u32,
) -> Result<Vec<(String, String, Vec<u8>)>, DbErr> {
    let contains = if conn.get_database_backend() == sea_orm::DbBackend::Postgres {
        "position(? IN event) > 0"
    } else {
        "instr(event, ?) > 0"
    };
    let any = vec![contains; needles.len()].join(" OR ");
    let values = std::iter::once(Value::from(after))
        .chain(needles.iter().map(|n| Value::from(n.as_bytes().to_vec())))
        .chain(std::iter::once(Value::from(i64::from(limit))));
    #[derive(FromQueryResult)]
    struct Candidate {
        event_id: String,
        profile_id: String,
        event: Vec<u8>,
    }
    let rows: Vec<Candidate> = query_as(
        conn,
        &format!(
            "SELECT event_id, profile_id, event FROM timeline
             WHERE event IS NOT NULL AND event_id > ? AND ({any})
             ORDER BY event_id LIMIT ?"
        ),
        values,
    )
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.event_id, r.profile_id, r.event))
        .collect())
}
