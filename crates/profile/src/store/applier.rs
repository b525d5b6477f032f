//! The applier counter (`applier_epoch`): the row lock that serialises appliers across
//! replicas, and the generations of the segment definitions and the suppression list that
//! every replica learns of when it takes it.

use std::collections::HashSet;

use sea_orm::{ConnectionTrait, DatabaseTransaction, DbBackend, DbErr, FromQueryResult, Value};
use waymark_kit::sql::{MAX_PARAMS, execute, in_list, query, query_one, query_one_as};

/// What taking the applier lock tells the taker: the counter row's columns, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromQueryResult)]
pub struct ApplierLock {
    /// The counter this transaction advanced: whether anyone else wrote since the
    /// applier's own last commit.
    pub epoch: i64,
    /// The generation of the segment definitions: whether any replica changed them since
    /// this one loaded its own.
    pub definitions: i64,
    /// The generation of the suppression list, likewise.
    pub suppressions: i64,
}

/// Serialises appliers across replicas (the counter's row stays locked until the
/// transaction ends; SQLite has one writer anyway). Also returns which of `event_ids`
/// were applied before, asked only once the lock is held: a statement that waited for
/// the lock still reads with the snapshot it started with, which would miss what the
/// transaction it waited for committed.
pub async fn lock_applier(
    txn: &DatabaseTransaction,
    event_ids: &[String],
) -> Result<(ApplierLock, HashSet<String>), DbErr> {
    let text = if txn.get_database_backend() == DbBackend::Postgres {
        // Releases before schema 7 serialised on this advisory lock alone; taking it too
        // keeps them out while both run during a rolling upgrade.
        "WITH legacy AS (SELECT pg_advisory_xact_lock(7263542002))
         UPDATE applier_epoch SET epoch = epoch + 1 FROM legacy WHERE id = 1
         RETURNING epoch, definitions, suppressions"
    } else {
        "UPDATE applier_epoch SET epoch = epoch + 1 WHERE id = 1
         RETURNING epoch, definitions, suppressions"
    };
    let lock: ApplierLock = query_one_as(txn, text, [])
        .await?
        .ok_or_else(|| DbErr::RecordNotFound("the applier counter row is missing".into()))?;
    let applied = if event_ids.is_empty() {
        HashSet::new()
    } else {
        already_applied(txn, event_ids).await?
    };
    Ok((lock, applied))
}

/// Records that segment definitions changed, in the transaction that changes them.
pub async fn bump_definitions(txn: &DatabaseTransaction) -> Result<(), DbErr> {
    execute(
        txn,
        "UPDATE applier_epoch SET definitions = definitions + 1 WHERE id = 1",
        [],
    )
    .await?;
    Ok(())
}

/// Records that the suppression list grew, in the transaction that adds to it.
pub async fn bump_suppressions(txn: &DatabaseTransaction) -> Result<(), DbErr> {
    execute(
        txn,
        "UPDATE applier_epoch SET suppressions = suppressions + 1 WHERE id = 1",
        [],
    )
    .await?;
    Ok(())
}

/// The generation of the segment definitions.
pub async fn definitions_generation<C: ConnectionTrait>(conn: &C) -> Result<i64, DbErr> {
    query_one(
        conn,
        "SELECT definitions FROM applier_epoch WHERE id = 1",
        [],
    )
    .await?
    .ok_or_else(|| DbErr::RecordNotFound("the applier counter row is missing".into()))?
    .try_get("", "definitions")
}

/// The event ids of `ids` applied before: they are in the timeline.
async fn already_applied<C: ConnectionTrait>(
    conn: &C,
    ids: &[String],
) -> Result<HashSet<String>, DbErr> {
    if conn.get_database_backend() == DbBackend::Postgres {
        let rows = query(
            conn,
            "SELECT event_id FROM timeline WHERE event_id = ANY(?::text[])",
            [ids.to_vec().into()],
        )
        .await?;
        return rows.iter().map(|row| row.try_get("", "event_id")).collect();
    }
    let mut found = HashSet::new();
    for chunk in ids.chunks(MAX_PARAMS) {
        let text = format!(
            "SELECT event_id FROM timeline WHERE event_id IN ({})",
            in_list(chunk.len())
        );
        let values = chunk.iter().map(|s| Value::from(s.as_str()));
        for row in query(conn, &text, values).await? {
            found.insert(row.try_get("", "event_id")?);
        }
    }
    Ok(found)
}
