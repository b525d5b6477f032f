//! Dead letters: events a consumer could not take, set aside so they never hold back the
//! events behind them. A row holds one event the consumer refused (or that was found at
//! fault by splitting a failing batch), or a whole outbox row whose retention passed
//! undelivered. Nothing leaves this table but by an operator (retry or drop) or by the
//! dead-letter retention.

use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbErr, FromQueryResult, TransactionTrait, Value,
};

use crate::db::Migration;
use crate::sql::{self, Column, Insert};
use crate::time::now_micros;

/// The dead-letter table of an outbox, and the index the relay's ordering rule reads (rows
/// waiting to be retried after a failure; new rows have no attempts, so it costs the
/// producer nothing).
pub const fn migration(version: i64) -> Migration {
    Migration {
        version,
        name: "outbox dead letters",
        postgres: "CREATE TABLE outbox_dead_letters (
                id BIGSERIAL PRIMARY KEY,
                consumer TEXT NOT NULL,
                payload BYTEA NOT NULL,
                pack_size INTEGER,
                reason TEXT NOT NULL,
                attempts INTEGER NOT NULL,
                created_at BIGINT NOT NULL,
                dead_at BIGINT NOT NULL
            );
            CREATE INDEX outbox_dead_letters_consumer ON outbox_dead_letters (consumer, id);
            CREATE INDEX outbox_retrying ON outbox (consumer, id) WHERE attempts > 0;",
        sqlite: "CREATE TABLE outbox_dead_letters (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                consumer TEXT NOT NULL,
                payload BLOB NOT NULL,
                pack_size INTEGER,
                reason TEXT NOT NULL,
                attempts INTEGER NOT NULL,
                created_at BIGINT NOT NULL,
                dead_at BIGINT NOT NULL
            );
            CREATE INDEX outbox_dead_letters_consumer ON outbox_dead_letters (consumer, id);
            CREATE INDEX outbox_retrying ON outbox (consumer, id) WHERE attempts > 0;",
    }
}

/// One event to set aside.
pub(crate) struct Rejected {
    pub payload: Vec<u8>,
    pub reason: String,
    pub attempts: i32,
    pub created_at: i64,
}

/// Inserts `rejected` as single-event dead letters of `consumer`, inside the caller's
/// transaction.
pub(crate) async fn insert<C: ConnectionTrait>(
    conn: &C,
    consumer: &str,
    rejected: Vec<Rejected>,
) -> Result<(), DbErr> {
    let n = rejected.len();
    let (mut payloads, mut reasons, mut attempts, mut created_at) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for r in rejected {
        payloads.push(r.payload);
        reasons.push(r.reason);
        attempts.push(r.attempts);
        created_at.push(r.created_at);
    }
    let now = now_micros();
    Insert::new(
        "INSERT INTO outbox_dead_letters (payload, reason, attempts, created_at, consumer, dead_at)",
        vec![
            Column::Bytea(payloads),
            Column::Text(reasons),
            Column::Int4(attempts),
            Column::Int8(created_at),
        ],
    )
    .constant(consumer)
    .constant(now)
    .in_order()
    .execute(conn)
    .await?;
    Ok(())
}

/// Moves `consumer`'s rows queued before `cutoff` (Unix microseconds) and not leased to
/// the dead letters, whole; returns how many events moved.
pub(crate) async fn expire(
    db: &DatabaseConnection,
    consumer: &str,
    cutoff: i64,
    reason: &str,
) -> Result<u64, DbErr> {
    let txn = db.begin().await?;
    let now = now_micros();
    let moved = sql::query_one_as::<Events, _>(
        &txn,
        "SELECT COALESCE(SUM(COALESCE(pack_size, 1)), 0) AS events FROM outbox
         WHERE consumer = ? AND created_at < ? AND lease_until <= ?",
        [consumer.into(), cutoff.into(), now.into()],
    )
    .await?
    .map_or(0, |row| row.events);
    if moved == 0 {
        return Ok(0);
    }
    sql::execute(
        &txn,
        "INSERT INTO outbox_dead_letters (consumer, payload, pack_size, reason, attempts, created_at, dead_at)
         SELECT consumer, payload, pack_size, ?, attempts, created_at, ? FROM outbox
         WHERE consumer = ? AND created_at < ? AND lease_until <= ? ORDER BY id",
        [
            reason.into(),
            now.into(),
            consumer.into(),
            cutoff.into(),
            now.into(),
        ],
    )
    .await?;
    sql::execute(
        &txn,
        "DELETE FROM outbox WHERE consumer = ? AND created_at < ? AND lease_until <= ?",
        [consumer.into(), cutoff.into(), now.into()],
    )
    .await?;
    txn.commit().await?;
    Ok(moved.max(0) as u64)
}

/// Deletes dead letters set aside before `cutoff`; returns how many events went.
pub async fn purge_older_than<C: ConnectionTrait>(conn: &C, cutoff: i64) -> Result<u64, DbErr> {
    let events = count_where(conn, "dead_at < ?", vec![cutoff.into()]).await?;
    sql::execute(
        conn,
        "DELETE FROM outbox_dead_letters WHERE dead_at < ?",
        [cutoff.into()],
    )
    .await?;
    Ok(events)
}

/// Events in dead letters per consumer.
pub(crate) async fn counts<C: ConnectionTrait>(conn: &C) -> Result<Vec<(String, u64)>, DbErr> {
    #[derive(FromQueryResult)]
    struct Count {
        consumer: String,
        events: i64,
    }
    let rows: Vec<Count> = sql::query_as(
        conn,
        "SELECT consumer, SUM(COALESCE(pack_size, 1)) AS events FROM outbox_dead_letters GROUP BY consumer",
        [],
    )
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| (row.consumer, row.events.max(0) as u64))
        .collect())
}

/// One dead letter as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub id: i64,
    pub consumer: String,
    /// The encoded events it holds, in order.
    pub events: Vec<Vec<u8>>,
    pub reason: String,
    pub attempts: i32,
    /// When the events were first queued, Unix microseconds.
    pub created_at: i64,
    /// When they were set aside, Unix microseconds.
    pub dead_at: i64,
}

/// Up to `limit` dead letters with ids above `after`, oldest first, of one consumer or of
/// all.
pub async fn list<C: ConnectionTrait>(
    conn: &C,
    consumer: Option<&str>,
    after: i64,
    limit: u32,
) -> Result<Vec<DeadLetter>, DbErr> {
    #[derive(FromQueryResult)]
    struct Stored {
        id: i64,
        consumer: String,
        payload: Vec<u8>,
        pack_size: Option<i32>,
        reason: String,
        attempts: i32,
        created_at: i64,
        dead_at: i64,
    }
    let mut text = String::from(
        "SELECT id, consumer, payload, pack_size, reason, attempts, created_at, dead_at
         FROM outbox_dead_letters WHERE id > ?",
    );
    let mut values: Vec<Value> = vec![after.into()];
    if let Some(consumer) = consumer {
        text.push_str(" AND consumer = ?");
        values.push(consumer.into());
    }
    text.push_str(" ORDER BY id LIMIT ?");
    values.push(i64::from(limit).into());
    let rows: Vec<Stored> = sql::query_as(conn, &text, values).await?;
    rows.into_iter()
        .map(|row| {
            Ok(DeadLetter {
                id: row.id,
                consumer: row.consumer,
                events: super::unpack(row.payload, row.pack_size)?,
                reason: row.reason,
                attempts: row.attempts,
                created_at: row.created_at,
                dead_at: row.dead_at,
            })
        })
        .collect()
}

/// Which dead letters an operator acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// These ids.
    Ids(Vec<i64>),
    /// Every dead letter, or every one of a consumer.
    All { consumer: Option<String> },
}

impl Selection {
    fn condition(&self) -> (String, Vec<Value>) {
        match self {
            Selection::Ids(ids) => {
                let marks = vec!["?"; ids.len()].join(", ");
                (
                    format!("id IN ({marks})"),
                    ids.iter().map(|id| (*id).into()).collect(),
                )
            }
            Selection::All { consumer: None } => ("1 = 1".into(), Vec::new()),
            Selection::All {
                consumer: Some(consumer),
            } => ("consumer = ?".into(), vec![consumer.as_str().into()]),
        }
    }
}

/// Puts the selected dead letters back at the end of their consumer's queue, in their
/// order, queued now (so the outbox retention counts from now); returns how many events.
pub async fn retry(db: &DatabaseConnection, selection: &Selection) -> Result<u64, DbErr> {
    if matches!(selection, Selection::Ids(ids) if ids.is_empty()) {
        return Ok(0);
    }
    let (condition, values) = selection.condition();
    let txn = db.begin().await?;
    let events = count_where(&txn, &condition, values.clone()).await?;
    let now = now_micros();
    let mut insert_values: Vec<Value> = vec![now.into(), now.into()];
    insert_values.extend(values.clone());
    sql::execute(
        &txn,
        &format!(
            "INSERT INTO outbox (consumer, payload, pack_size, created_at, available_at)
             SELECT consumer, payload, pack_size, ?, ? FROM outbox_dead_letters
             WHERE {condition} ORDER BY id"
        ),
        insert_values,
    )
    .await?;
    delete_where(&txn, &condition, values).await?;
    txn.commit().await?;
    Ok(events)
}

/// Deletes the selected dead letters; returns how many events went.
pub async fn drop(db: &DatabaseConnection, selection: &Selection) -> Result<u64, DbErr> {
    if matches!(selection, Selection::Ids(ids) if ids.is_empty()) {
        return Ok(0);
    }
    let (condition, values) = selection.condition();
    let txn = db.begin().await?;
    let events = count_where(&txn, &condition, values.clone()).await?;
    delete_where(&txn, &condition, values).await?;
    txn.commit().await?;
    Ok(events)
}

/// A count of events, named so it is read by name.
#[derive(FromQueryResult)]
struct Events {
    events: i64,
}

async fn count_where<C: ConnectionTrait>(
    conn: &C,
    condition: &str,
    values: Vec<Value>,
) -> Result<u64, DbErr> {
    let text = format!(
        "SELECT COALESCE(SUM(COALESCE(pack_size, 1)), 0) AS events FROM outbox_dead_letters WHERE {condition}"
    );
    let events = sql::query_one_as::<Events, _>(conn, &text, values)
        .await?
        .map_or(0, |row| row.events);
    Ok(events.max(0) as u64)
}

async fn delete_where<C: ConnectionTrait>(
    conn: &C,
    condition: &str,
    values: Vec<Value>,
) -> Result<(), DbErr> {
    sql::execute(
        conn,
        &format!("DELETE FROM outbox_dead_letters WHERE {condition}"),
        values,
    )
    .await
    .map(|_| ())
}
