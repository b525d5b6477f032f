//! Dead letters: events a consumer could not take, set aside so they never hold back the
//! events behind them. A row holds one event the consumer refused (or that was found at
//! fault by splitting a failing batch), or a whole outbox row whose retention passed
//! undelivered. Nothing leaves this table but by an operator (retry or drop) or by the
//! dead-letter retention.

use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, DbErr, Statement, TransactionTrait, Value,
};

use crate::db::{Migration, sql};
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
    let backend = conn.get_database_backend();
    let now = now_micros();
    for chunk in rejected.chunks(500) {
        let mut text = String::from(
            "INSERT INTO outbox_dead_letters (consumer, payload, reason, attempts, created_at, dead_at) VALUES ",
        );
        let mut values: Vec<Value> = Vec::with_capacity(chunk.len() * 6);
        for (i, r) in chunk.iter().enumerate() {
            if i > 0 {
                text.push_str(", ");
            }
            text.push_str("(?, ?, ?, ?, ?, ?)");
            values.extend([
                consumer.into(),
                r.payload.clone().into(),
                r.reason.clone().into(),
                r.attempts.into(),
                r.created_at.into(),
                now.into(),
            ]);
        }
        conn.execute_raw(Statement::from_sql_and_values(
            backend,
            sql(backend, &text),
            values,
        ))
        .await?;
    }
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
    let backend = txn.get_database_backend();
    let now = now_micros();
    let moved = txn
        .query_one_raw(Statement::from_sql_and_values(
            backend,
            sql(
                backend,
                "SELECT COALESCE(SUM(COALESCE(pack_size, 1)), 0) FROM outbox
                 WHERE consumer = ? AND created_at < ? AND lease_until <= ?",
            ),
            [consumer.into(), cutoff.into(), now.into()],
        ))
        .await?
        .map(|row| row.try_get_by_index::<i64>(0))
        .transpose()?
        .unwrap_or(0);
    if moved == 0 {
        return Ok(0);
    }
    txn.execute_raw(Statement::from_sql_and_values(
        backend,
        sql(
            backend,
            "INSERT INTO outbox_dead_letters (consumer, payload, pack_size, reason, attempts, created_at, dead_at)
             SELECT consumer, payload, pack_size, ?, attempts, created_at, ? FROM outbox
             WHERE consumer = ? AND created_at < ? AND lease_until <= ? ORDER BY id",
        ),
        [
            reason.into(),
            now.into(),
            consumer.into(),
            cutoff.into(),
            now.into(),
        ],
    ))
    .await?;
    txn.execute_raw(Statement::from_sql_and_values(
        backend,
        sql(
            backend,
            "DELETE FROM outbox WHERE consumer = ? AND created_at < ? AND lease_until <= ?",
        ),
        [consumer.into(), cutoff.into(), now.into()],
    ))
    .await?;
    txn.commit().await?;
    Ok(moved.max(0) as u64)
}

/// Deletes dead letters set aside before `cutoff`; returns how many events went.
pub async fn purge_older_than<C: ConnectionTrait>(conn: &C, cutoff: i64) -> Result<u64, DbErr> {
    let backend = conn.get_database_backend();
    let events = count_where(conn, "dead_at < ?", vec![cutoff.into()]).await?;
    conn.execute_raw(Statement::from_sql_and_values(
        backend,
        sql(backend, "DELETE FROM outbox_dead_letters WHERE dead_at < ?"),
        [cutoff.into()],
    ))
    .await?;
    Ok(events)
}

/// Events in dead letters per consumer.
pub(crate) async fn counts<C: ConnectionTrait>(conn: &C) -> Result<Vec<(String, u64)>, DbErr> {
    let rows = conn
        .query_all_raw(Statement::from_string(
            conn.get_database_backend(),
            "SELECT consumer, SUM(COALESCE(pack_size, 1)) FROM outbox_dead_letters GROUP BY consumer",
        ))
        .await?;
    rows.iter()
        .map(|row| {
            Ok((
                row.try_get_by_index(0)?,
                row.try_get_by_index::<i64>(1)?.max(0) as u64,
            ))
        })
        .collect()
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
    let backend = conn.get_database_backend();
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
    let rows = conn
        .query_all_raw(Statement::from_sql_and_values(
            backend,
            sql(backend, &text),
            values,
        ))
        .await?;
    rows.into_iter()
        .map(|row| {
            let payload: Vec<u8> = row.try_get_by_index(2)?;
            Ok(DeadLetter {
                id: row.try_get_by_index(0)?,
                consumer: row.try_get_by_index(1)?,
                events: super::unpack(payload, row.try_get_by_index(3)?)?,
                reason: row.try_get_by_index(4)?,
                attempts: row.try_get_by_index(5)?,
                created_at: row.try_get_by_index(6)?,
                dead_at: row.try_get_by_index(7)?,
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
    let backend = txn.get_database_backend();
    let events = count_where(&txn, &condition, values.clone()).await?;
    let now = now_micros();
    let mut insert_values: Vec<Value> = vec![now.into(), now.into()];
    insert_values.extend(values.clone());
    txn.execute_raw(Statement::from_sql_and_values(
        backend,
        sql(
            backend,
            &format!(
                "INSERT INTO outbox (consumer, payload, pack_size, created_at, available_at)
                 SELECT consumer, payload, pack_size, ?, ? FROM outbox_dead_letters
                 WHERE {condition} ORDER BY id"
            ),
        ),
        insert_values,
    ))
    .await?;
    delete_where(&txn, backend, &condition, values).await?;
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
    let backend = txn.get_database_backend();
    let events = count_where(&txn, &condition, values.clone()).await?;
    delete_where(&txn, backend, &condition, values).await?;
    txn.commit().await?;
    Ok(events)
}

async fn count_where<C: ConnectionTrait>(
    conn: &C,
    condition: &str,
    values: Vec<Value>,
) -> Result<u64, DbErr> {
    let backend = conn.get_database_backend();
    let text = format!(
        "SELECT COALESCE(SUM(COALESCE(pack_size, 1)), 0) FROM outbox_dead_letters WHERE {condition}"
    );
    let row = conn
        .query_one_raw(Statement::from_sql_and_values(
            backend,
            sql(backend, &text),
            values,
        ))
        .await?;
    Ok(row
        .map(|r| r.try_get_by_index::<i64>(0))
        .transpose()?
        .unwrap_or(0)
        .max(0) as u64)
}

async fn delete_where<C: ConnectionTrait>(
    conn: &C,
    backend: DbBackend,
    condition: &str,
    values: Vec<Value>,
) -> Result<(), DbErr> {
    conn.execute_raw(Statement::from_sql_and_values(
        backend,
        sql(
            backend,
            &format!("DELETE FROM outbox_dead_letters WHERE {condition}"),
        ),
        values,
    ))
    .await
    .map(|_| ())
}
