//! The transactional outbox, its relay and its dead letters.
//!
//! A producer inserts outbox rows in the same transaction as its own writes, so an event
//! is queued if and only if it is committed. A row packs many of the transaction's events
//! for one consumer, so queueing costs a row per pack, not per event. The relay
//! ([`run_relay`]) delivers them; events a consumer can never take end in the dead-letter
//! table ([`dead_letters`]), where an operator lists, retries or drops them.

pub mod admin;
pub mod dead_letters;
mod relay;

use std::sync::Arc;

use sea_orm::{ConnectionTrait, DbErr, FromQueryResult, Value};
use tokio::sync::Notify;

pub use relay::{DEFAULT_BATCH_EVENTS, MAX_DELIVERY_BYTES, RelayConfig, run_relay};

use crate::db::Migration;
use crate::sql::{self, Column, Insert};
use crate::time::now_micros;

/// The outbox table; each service lists it among its own migrations.
pub const fn migration(version: i64) -> Migration {
    Migration {
        version,
        name: "outbox",
        postgres: "CREATE TABLE outbox (
                id BIGSERIAL PRIMARY KEY,
                consumer TEXT NOT NULL,
                payload BYTEA NOT NULL,
                created_at BIGINT NOT NULL,
                available_at BIGINT NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0,
                lease_owner TEXT,
                lease_until BIGINT NOT NULL DEFAULT 0
            );
            CREATE INDEX outbox_consumer_id ON outbox (consumer, id);
            CREATE INDEX outbox_lease_owner ON outbox (lease_owner) WHERE lease_owner IS NOT NULL;",
        sqlite: "CREATE TABLE outbox (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                consumer TEXT NOT NULL,
                payload BLOB NOT NULL,
                created_at BIGINT NOT NULL,
                available_at BIGINT NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0,
                lease_owner TEXT,
                lease_until BIGINT NOT NULL DEFAULT 0
            );
            CREATE INDEX outbox_consumer_id ON outbox (consumer, id);
            CREATE INDEX outbox_lease_owner ON outbox (lease_owner) WHERE lease_owner IS NOT NULL;",
    }
}

/// On PostgreSQL, makes `(consumer, id)` the outbox's primary key in place of `id` and a
/// second index on `(consumer, id)`: every query names the consumer, and each queued row
/// then maintains one index fewer. (SQLite keeps its rowid table as it is.)
pub const fn keyed_by_consumer(version: i64) -> Migration {
    Migration {
        version,
        name: "outbox keyed by consumer",
        postgres: "ALTER TABLE outbox DROP CONSTRAINT outbox_pkey;
            ALTER TABLE outbox ADD PRIMARY KEY (consumer, id);
            DROP INDEX outbox_consumer_id;",
        sqlite: "SELECT 1",
    }
}

/// Adds `pack_size`: how many events a row's payload packs. Rows from before (and
/// replays, which copy stored events one by one) leave it NULL: their payload is one event.
/// On PostgreSQL a pack is stored out of line uncompressed: compressing one costs the
/// producer's transaction more than the bytes it saves, and it is read once.
pub const fn packs(version: i64) -> Migration {
    Migration {
        version,
        name: "outbox rows carry packs of events",
        postgres: "ALTER TABLE outbox ADD COLUMN pack_size INTEGER;
            ALTER TABLE outbox ALTER COLUMN payload SET STORAGE EXTERNAL;",
        sqlite: "ALTER TABLE outbox ADD COLUMN pack_size INTEGER",
    }
}

/// Adds `trace_links`: the W3C `traceparent`s (comma-separated) of the requests whose
/// events a row packs, so the consumer's span links to them.
pub const fn trace_links(version: i64) -> Migration {
    Migration {
        version,
        name: "outbox rows carry the trace contexts that committed them",
        postgres: "ALTER TABLE outbox ADD COLUMN trace_links TEXT",
        sqlite: "ALTER TABLE outbox ADD COLUMN trace_links TEXT",
    }
}

/// The `trace_links` of a row: at most [`crate::telemetry::MAX_TRACE_LINKS`] distinct
/// contexts, None when there are none.
fn joined_links(links: &[String]) -> Option<String> {
    let mut distinct: Vec<&str> = Vec::new();
    for link in links {
        if distinct.len() == crate::telemetry::MAX_TRACE_LINKS {
            break;
        }
        if !distinct.contains(&link.as_str()) {
            distinct.push(link);
        }
    }
    (!distinct.is_empty()).then(|| distinct.join(","))
}

/// `payloads` encoded as an `EventPack` (`waymark.common.v1`), without copying them into
/// owned buffers first.
pub(crate) fn pack(payloads: &[&[u8]]) -> Vec<u8> {
    use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
    let len = payloads
        .iter()
        .map(|p| key_len(1) + encoded_len_varint(p.len() as u64) + p.len())
        .sum();
    let mut buf = Vec::with_capacity(len);
    for payload in payloads {
        encode_key(1, WireType::LengthDelimited, &mut buf);
        encode_varint(payload.len() as u64, &mut buf);
        buf.extend_from_slice(payload);
    }
    buf
}

/// The events of a claimed row: its pack, or its one event.
pub(crate) fn unpack(payload: Vec<u8>, pack_size: Option<i32>) -> Result<Vec<Vec<u8>>, DbErr> {
    use prost::Message;
    use waymark_proto::common::v1::EventPack;
    match pack_size {
        None => Ok(vec![payload]),
        Some(_) => EventPack::decode(payload.as_slice())
            .map(|pack| pack.events)
            .map_err(|e| DbErr::Custom(format!("outbox pack does not decode: {e}"))),
    }
}

/// Events per pack at most: a producer's large transaction still goes out in deliveries
/// of the relay's batch size.
pub const MAX_PACK_EVENTS: usize = 500;
/// Bytes per pack at most (an event larger than this travels alone), well under the gRPC
/// message limit.
pub const MAX_PACK_BYTES: usize = 4 * 1024 * 1024;

/// Queues encoded `waymark.common.v1.Event`s for each consumer, inside the caller's
/// transaction: per consumer, packs of them in order (one row each, see
/// [`MAX_PACK_EVENTS`] and [`MAX_PACK_BYTES`]), linked to the current span's trace. Call
/// [`Wakeup::notify`] after the commit.
pub async fn enqueue<C: ConnectionTrait>(
    conn: &C,
    consumers: &[String],
    payloads: &[&[u8]],
) -> Result<(), DbErr> {
    enqueue_linked(conn, consumers, payloads, &current_trace()).await
}

/// [`enqueue`] for events that several requests brought in (a group commit): each row
/// keeps `trace_links`, the `traceparent`s of those requests.
pub async fn enqueue_linked<C: ConnectionTrait>(
    conn: &C,
    consumers: &[String],
    payloads: &[&[u8]],
    trace_links: &[String],
) -> Result<(), DbErr> {
    if let Some(insert) = insert(consumers, payloads, trace_links) {
        insert.execute(conn).await?;
    }
    Ok(())
}

/// [`enqueue`] on PostgreSQL as one `INSERT` with its parameters numbered from `$first`,
/// so a producer can make it one part of a larger statement (a data-modifying `WITH`) and
/// write a whole transaction in one round trip. None when there is nothing to queue.
pub fn postgres_insert(
    consumers: &[String],
    payloads: &[&[u8]],
    first: usize,
) -> Option<(String, Vec<Value>)> {
    // The columns are built the same length, which is all `postgres` checks.
    insert(consumers, payloads, &current_trace())?
        .postgres(first)
        .ok()
}

/// The current span's `traceparent`, as the one trace link of what it queues.
fn current_trace() -> Vec<String> {
    crate::telemetry::current_traceparent()
        .into_iter()
        .collect()
}

/// The rows [`enqueue`] writes, in id order: pack by pack, each for every consumer, so
/// each consumer's rows get ids in the events' order. None when there is nothing to queue.
fn insert(consumers: &[String], payloads: &[&[u8]], trace_links: &[String]) -> Option<Insert> {
    if payloads.is_empty() {
        return None;
    }
    let (last, others) = consumers.split_last()?;
    let packs = split_into_packs(payloads);
    let n = packs.len() * consumers.len();
    let (mut names, mut packed, mut sizes) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for chunk in packs {
        // Encoded once; the last consumer's row takes it, the others a copy.
        let pack = pack(chunk);
        let size = chunk.len() as i32;
        for consumer in others {
            names.push(consumer.clone());
            packed.push(pack.clone());
            sizes.push(size);
        }
        names.push(last.clone());
        packed.push(pack);
        sizes.push(size);
    }
    let now = now_micros();
    Some(
        Insert::new(
            "INSERT INTO outbox (consumer, payload, pack_size, created_at, available_at, trace_links)",
            vec![
                Column::Text(names),
                Column::Bytea(packed),
                Column::Int4(sizes),
            ],
        )
        .constant(now)
        .constant(now)
        .constant(joined_links(trace_links))
        .in_order(),
    )
}

/// `payloads` in order, cut into packs within both limits.
fn split_into_packs<'a, 'b>(payloads: &'a [&'b [u8]]) -> Vec<&'a [&'b [u8]]> {
    let mut packs = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, payload) in payloads.iter().enumerate() {
        let full = i - start == MAX_PACK_EVENTS || bytes + payload.len() > MAX_PACK_BYTES;
        if i > start && full {
            packs.push(&payloads[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += payload.len();
    }
    packs.push(&payloads[start..]);
    packs
}

/// Wakes this process's relay workers when new rows are committed, so delivery starts at
/// once instead of on the next poll.
#[derive(Clone, Default)]
pub struct Wakeup(Arc<Notify>);

impl Wakeup {
    /// Wakes every waiting worker.
    pub fn notify(&self) {
        self.0.notify_waiters();
    }
}

/// What one consumer's queue holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backlog {
    /// Consumer name.
    pub consumer: String,
    /// Events not yet acknowledged.
    pub pending: u64,
    /// Enqueue time of the oldest, in Unix microseconds.
    pub oldest_micros: Option<i64>,
    /// Events set aside as dead letters.
    pub dead_letters: u64,
}

/// The backlog of every consumer with pending rows or dead letters, by consumer name.
pub async fn backlog<C: ConnectionTrait>(conn: &C) -> Result<Vec<Backlog>, DbErr> {
    #[derive(FromQueryResult)]
    struct Queued {
        consumer: String,
        events: i64,
        oldest: Option<i64>,
    }
    let rows: Vec<Queued> = sql::query_as(
        conn,
        "SELECT consumer, SUM(COALESCE(pack_size, 1)) AS events, MIN(created_at) AS oldest
         FROM outbox GROUP BY consumer",
        [],
    )
    .await?;
    let mut by_consumer = std::collections::BTreeMap::new();
    for row in rows {
        by_consumer.insert(
            row.consumer.clone(),
            Backlog {
                consumer: row.consumer,
                pending: row.events.max(0) as u64,
                oldest_micros: row.oldest,
                dead_letters: 0,
            },
        );
    }
    for (consumer, events) in dead_letters::counts(conn).await? {
        by_consumer
            .entry(consumer.clone())
            .or_insert_with(|| Backlog {
                consumer,
                pending: 0,
                oldest_micros: None,
                dead_letters: 0,
            })
            .dead_letters = events;
    }
    Ok(by_consumer.into_values().collect())
}

/// Rows an erasure reads at a time: a pack is at most [`MAX_PACK_BYTES`], so a page stays
/// within a few tens of MiB however large the backlog.
const SCRUB_PAGE_ROWS: i64 = 16;

/// Removes the events `erase` picks from the outbox and its dead letters, inside the
/// caller's transaction (see [`scrub_table`]). Returns the events removed.
pub async fn scrub<C: ConnectionTrait>(
    conn: &C,
    mut erase: impl FnMut(&waymark_proto::common::v1::Event) -> bool,
) -> Result<u64, DbErr> {
    let mut removed = 0;
    for table in ["outbox", "outbox_dead_letters"] {
        removed += scrub_table(conn, table, &mut erase).await?;
    }
    Ok(removed)
}

/// Rewrites every row of `table` (an outbox, or a table of the same shape such as its
/// dead letters: `consumer`, `id`, `payload`, `pack_size`) without the events `erase`
/// picks, inside the caller's transaction: a pack keeps its other events in order with
/// `pack_size` set to what it now holds, and a row left with no event is deleted. Returns
/// the events removed.
///
/// Every row is read (in pages, in key order) because what identifies a person is inside
/// the encoded events; erasure is rare and a backlog is meant to be short. A row a relay
/// holds under lease is rewritten too: the relay's acknowledgement deletes it by key, and
/// a release sends what is left.
async fn scrub_table<C: ConnectionTrait>(
    conn: &C,
    table: &str,
    mut erase: impl FnMut(&waymark_proto::common::v1::Event) -> bool,
) -> Result<u64, DbErr> {
    use prost::Message;
    use waymark_proto::common::v1::Event;
    #[derive(FromQueryResult)]
    struct Stored {
        consumer: String,
        id: i64,
        payload: Vec<u8>,
        pack_size: Option<i32>,
    }
    let mut removed = 0u64;
    let mut after: Option<(String, i64)> = None;
    loop {
        let (filter, mut values) = match &after {
            None => (String::new(), Vec::new()),
            Some((consumer, id)) => (
                " WHERE consumer > ? OR (consumer = ? AND id > ?)".to_owned(),
                vec![
                    Value::from(consumer.as_str()),
                    Value::from(consumer.as_str()),
                    Value::from(*id),
                ],
            ),
        };
        values.push(SCRUB_PAGE_ROWS.into());
        let rows: Vec<Stored> = sql::query_as(
            conn,
            &format!(
                "SELECT consumer, id, payload, pack_size FROM {table}{filter} ORDER BY consumer, id LIMIT ?"
            ),
            values,
        )
        .await?;
        let Some(last) = rows.last() else {
            return Ok(removed);
        };
        after = Some((last.consumer.clone(), last.id));
        for Stored {
            consumer,
            id,
            payload,
            pack_size,
        } in rows
        {
            let events = unpack(payload, pack_size)?;
            let before = events.len();
            let mut kept = Vec::with_capacity(before);
            for encoded in events {
                let event = Event::decode(encoded.as_slice())
                    .map_err(|e| DbErr::Custom(format!("outbox event does not decode: {e}")))?;
                if !erase(&event) {
                    kept.push(encoded);
                }
            }
            if kept.len() == before {
                continue;
            }
            removed += (before - kept.len()) as u64;
            let key = vec![Value::from(consumer.as_str()), Value::from(id)];
            if kept.is_empty() {
                sql::execute(
                    conn,
                    &format!("DELETE FROM {table} WHERE consumer = ? AND id = ?"),
                    key,
                )
                .await?;
            } else {
                let slices: Vec<&[u8]> = kept.iter().map(Vec::as_slice).collect();
                let mut values = vec![
                    Value::from(pack(&slices)),
                    Value::from(i32::try_from(kept.len()).unwrap_or(i32::MAX)),
                ];
                values.extend(key);
                sql::execute(
                    conn,
                    &format!(
                        "UPDATE {table} SET payload = ?, pack_size = ? WHERE consumer = ? AND id = ?"
                    ),
                    values,
                )
                .await?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_keep_order_within_both_limits_and_unpack_whole() {
        let small = vec![7u8; 10];
        let payloads: Vec<&[u8]> = vec![small.as_slice(); MAX_PACK_EVENTS * 2 + 1];
        let packs = split_into_packs(&payloads);
        let sizes: Vec<usize> = packs.iter().map(|p| p.len()).collect();
        assert_eq!(sizes, [MAX_PACK_EVENTS, MAX_PACK_EVENTS, 1]);
        let unpacked = unpack(pack(packs[2]), Some(1)).unwrap();
        assert_eq!(unpacked, std::slice::from_ref(&small));

        let big = vec![1u8; MAX_PACK_BYTES / 2 + 1];
        let huge = vec![2u8; MAX_PACK_BYTES + 1];
        let payloads: Vec<&[u8]> = vec![&big, &big, &huge, &small];
        let sizes: Vec<usize> = split_into_packs(&payloads)
            .iter()
            .map(|p| p.len())
            .collect();
        assert_eq!(
            sizes,
            [1, 1, 1, 1],
            "over the byte limit a pack closes; a huge event goes alone"
        );
        let mixed: Vec<&[u8]> = vec![&small, &big, &small];
        let packs = split_into_packs(&mixed);
        assert_eq!(packs.len(), 1);
        let unpacked = unpack(pack(packs[0]), Some(3)).unwrap();
        assert_eq!(unpacked, [small.clone(), big.clone(), small.clone()]);
        assert_eq!(unpack(small.clone(), None).unwrap(), [small]);
    }
}
