//! The transactional outbox and its relay.
//!
//! A producer inserts outbox rows in the same transaction as its own writes, so an event
//! is queued if and only if it is committed. A row packs many of the transaction's events
//! for one consumer, so queueing costs a row per pack, not per event. Relay workers claim
//! rows with a lease (`FOR UPDATE SKIP LOCKED` on PostgreSQL, so replicas never claim the
//! same rows), push them to the consumer's `EventSink.Deliver`, and delete them once
//! acknowledged. A failed delivery releases the rows with an exponential backoff; each
//! consumer has its own workers, so one that is down delays only its own deliveries.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::KeyValue;
use rand::Rng;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, DbErr, Statement, Value};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use waymark_proto::common::v1::DeliverResponse;

use crate::config::Secret;
use crate::db::{Migration, now_micros, sql};

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

/// Several encoded events in one outbox payload: a repeated bytes field, so unpacking
/// copies the events without decoding them.
#[derive(Clone, PartialEq, prost::Message)]
struct EventPack {
    #[prost(bytes = "vec", repeated, tag = "1")]
    events: Vec<Vec<u8>>,
}

/// `payloads` encoded as an [`EventPack`], without copying them into owned buffers first.
fn pack(payloads: &[&[u8]]) -> Vec<u8> {
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
fn unpack(payload: Vec<u8>, pack_size: Option<i32>) -> Result<Vec<Vec<u8>>, DbErr> {
    use prost::Message;
    match pack_size {
        None => Ok(vec![payload]),
        Some(_) => EventPack::decode(payload.as_slice())
            .map(|pack| pack.events)
            .map_err(|e| DbErr::Custom(format!("outbox pack does not decode: {e}"))),
    }
}

/// Events per pack at most, and the relay's default batch (`relay_batch_size`): a
/// delivery stays that size whatever the producer's transaction holds.
pub const MAX_PACK_EVENTS: usize = 500;
/// Bytes per pack at most (an event larger than this travels alone), well under the gRPC
/// message limit.
pub const MAX_PACK_BYTES: usize = 4 * 1024 * 1024;

/// Queues encoded `waymark.common.v1.Event`s for each consumer, inside the caller's
/// transaction: per consumer, packs of them in order (one row each, see
/// [`MAX_PACK_EVENTS`] and [`MAX_PACK_BYTES`]). Call [`Wakeup::notify`] after the commit.
pub async fn enqueue<C: ConnectionTrait>(
    conn: &C,
    consumers: &[String],
    payloads: &[&[u8]],
) -> Result<(), DbErr> {
    let backend = conn.get_database_backend();
    let statement = if backend == DbBackend::Postgres {
        postgres_insert(consumers, payloads, 1)
    } else {
        values_insert(consumers, payloads)
    };
    let Some((text, values)) = statement else {
        return Ok(());
    };
    // Each text is written for its backend already: `$n` on PostgreSQL, `?` on SQLite.
    conn.execute_raw(Statement::from_sql_and_values(backend, text, values))
        .await?;
    Ok(())
}

/// The rows [`enqueue`] writes, in id order: pack by pack, each for every consumer, so
/// each consumer's rows get ids in the events' order.
struct Rows {
    consumers: Vec<String>,
    packs: Vec<Vec<u8>>,
    sizes: Vec<i32>,
}

impl Rows {
    fn push(&mut self, consumer: &str, pack: Vec<u8>, size: i32) {
        self.consumers.push(consumer.to_owned());
        self.packs.push(pack);
        self.sizes.push(size);
    }
}

fn rows(consumers: &[String], payloads: &[&[u8]]) -> Option<Rows> {
    if payloads.is_empty() {
        return None;
    }
    let (last, others) = consumers.split_last()?;
    let packs = split_into_packs(payloads);
    let n = packs.len() * consumers.len();
    let mut rows = Rows {
        consumers: Vec::with_capacity(n),
        packs: Vec::with_capacity(n),
        sizes: Vec::with_capacity(n),
    };
    for chunk in packs {
        // Encoded once; the last consumer's row takes it, the others a copy.
        let packed = pack(chunk);
        let size = chunk.len() as i32;
        for consumer in others {
            rows.push(consumer, packed.clone(), size);
        }
        rows.push(last, packed, size);
    }
    Some(rows)
}

/// [`enqueue`] on PostgreSQL as one `INSERT` with its parameters numbered from `$first`,
/// so a producer can make it one part of a larger statement (a data-modifying `WITH`) and
/// write a whole transaction in one round trip. None when there is nothing to queue.
pub fn postgres_insert(
    consumers: &[String],
    payloads: &[&[u8]],
    first: usize,
) -> Option<(String, Vec<Value>)> {
    let rows = rows(consumers, payloads)?;
    let (c, p, s, t) = (first, first + 1, first + 2, first + 3);
    // Ordered by position, so ids follow the events' order whatever the plan.
    let text = format!(
        "INSERT INTO outbox (consumer, payload, pack_size, created_at, available_at)
         SELECT c, p, s, ${t}, ${t}
         FROM UNNEST(${c}::text[], ${p}::bytea[], ${s}::int4[]) WITH ORDINALITY AS q(c, p, s, n)
         ORDER BY n"
    );
    let values = vec![
        rows.consumers.into(),
        rows.packs.into(),
        rows.sizes.into(),
        now_micros().into(),
    ];
    Some((text, values))
}

/// [`enqueue`] as a multi-row `VALUES` insert with `?` placeholders (SQLite).
fn values_insert(consumers: &[String], payloads: &[&[u8]]) -> Option<(String, Vec<Value>)> {
    let rows = rows(consumers, payloads)?;
    let now = now_micros();
    let mut text = String::from(
        "INSERT INTO outbox (consumer, payload, pack_size, created_at, available_at) VALUES ",
    );
    let mut values: Vec<Value> = Vec::with_capacity(rows.sizes.len() * 5);
    let all = rows.consumers.into_iter().zip(rows.packs).zip(rows.sizes);
    for (i, ((consumer, packed), size)) in all.enumerate() {
        if i > 0 {
            text.push_str(", ");
        }
        text.push_str("(?, ?, ?, ?, ?)");
        values.extend([
            consumer.into(),
            packed.into(),
            size.into(),
            now.into(),
            now.into(),
        ]);
    }
    Some((text, values))
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

/// Events waiting for one consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backlog {
    /// Consumer name.
    pub consumer: String,
    /// Events not yet acknowledged.
    pub pending: u64,
    /// Enqueue time of the oldest, in Unix microseconds.
    pub oldest_micros: Option<i64>,
}

/// The backlog of every consumer with pending rows.
pub async fn backlog<C: ConnectionTrait>(conn: &C) -> Result<Vec<Backlog>, DbErr> {
    let rows = conn
        .query_all_raw(Statement::from_string(
            conn.get_database_backend(),
            "SELECT consumer, SUM(COALESCE(pack_size, 1)), MIN(created_at) FROM outbox GROUP BY consumer ORDER BY consumer",
        ))
        .await?;
    rows.iter()
        .map(|row| {
            Ok(Backlog {
                consumer: row.try_get_by_index(0)?,
                pending: row.try_get_by_index::<i64>(1)?.max(0) as u64,
                oldest_micros: row.try_get_by_index(2)?,
            })
        })
        .collect()
}

/// Where and how one consumer is delivered to.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The producing service, sent in `DeliverRequest.producer`.
    pub producer: String,
    /// The consumer name used in outbox rows.
    pub consumer: String,
    /// The consumer's gRPC endpoint.
    pub endpoint: String,
    /// Bearer token for the consumer, when it requires one.
    pub token: Option<Secret>,
    /// Events per delivery; a single row packing more still goes out whole.
    pub batch_size: u32,
    /// Longest pause after repeated failures.
    pub max_backoff: Duration,
    /// Concurrent workers for this consumer in this process.
    pub workers: usize,
    /// Poll interval when idle, to pick up rows committed by other replicas and expired
    /// leases.
    pub idle_poll: Duration,
}

/// The request as the relay sends it: wire-identical to `waymark.common.v1.DeliverRequest`
/// (a repeated message field and a repeated bytes field encode the same way), so stored
/// payloads go out without being decoded and re-encoded.
#[derive(Clone, PartialEq, prost::Message)]
struct RawDeliverRequest {
    #[prost(string, tag = "1")]
    producer: String,
    #[prost(bytes = "vec", repeated, tag = "2")]
    events: Vec<Vec<u8>>,
}

/// How long a claimed batch stays invisible to other workers; longer than the delivery
/// timeout, so a live worker never loses its lease mid-delivery.
const LEASE: Duration = Duration::from_secs(60);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// Runs the relay workers for one consumer until `shutdown`.
pub async fn run_relay(
    db: DatabaseConnection,
    config: RelayConfig,
    wakeup: Wakeup,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let channel = crate::grpc::channel(&config.endpoint)?;
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..config.workers.max(1) {
        let worker = Worker {
            db: db.clone(),
            config: config.clone(),
            channel: channel.clone(),
            owner: uuid::Uuid::now_v7().to_string(),
            metrics: RelayMetrics::new(),
        };
        workers.spawn(worker.run(wakeup.clone(), shutdown.clone()));
    }
    while workers.join_next().await.is_some() {}
    Ok(())
}

struct RelayMetrics {
    delivered: opentelemetry::metrics::Counter<u64>,
    failures: opentelemetry::metrics::Counter<u64>,
}

impl RelayMetrics {
    fn new() -> Self {
        let meter = opentelemetry::global::meter("waymark");
        Self {
            delivered: meter.u64_counter("outbox.delivered").build(),
            failures: meter.u64_counter("outbox.delivery_failures").build(),
        }
    }
}

struct Worker {
    db: DatabaseConnection,
    config: RelayConfig,
    channel: tonic::transport::Channel,
    owner: String,
    metrics: RelayMetrics,
}

impl Worker {
    async fn run(self, wakeup: Wakeup, shutdown: CancellationToken) {
        let mut failures: u32 = 0;
        let attrs = [KeyValue::new("consumer", self.config.consumer.clone())];
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            // Register for wake-ups before looking, so a commit between the claim and the
            // wait is not missed.
            let notified = wakeup.0.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();

            // After a failure, ask the consumer first: claiming and releasing rows for a
            // consumer that is down only churns the database.
            if failures > 0 && !self.consumer_ready().await {
                failures = failures.saturating_add(1);
                let delay = backoff(failures, self.config.max_backoff);
                tracing::debug!(consumer = %self.config.consumer, retry_in_ms = delay.as_millis() as u64, "consumer still not ready");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
                continue;
            }

            let pause = match self.claim().await {
                Ok(batch) if batch.is_empty() => Some(self.config.idle_poll),
                Ok(batch) => {
                    let count = batch.len();
                    match self.deliver(batch).await {
                        Ok(()) => {
                            failures = 0;
                            self.metrics.delivered.add(count as u64, &attrs);
                            if let Err(error) = self.ack().await {
                                tracing::warn!(consumer = %self.config.consumer, %error, "outbox ack failed; batch will be redelivered");
                            }
                            None
                        }
                        Err(status) => {
                            failures = failures.saturating_add(1);
                            self.metrics.failures.add(1, &attrs);
                            let delay = backoff(failures, self.config.max_backoff);
                            tracing::warn!(
                                consumer = %self.config.consumer,
                                code = ?status.code(),
                                message = status.message(),
                                events = count,
                                retry_in_ms = delay.as_millis() as u64,
                                "delivery failed"
                            );
                            if let Err(error) = self.release(delay).await {
                                tracing::warn!(consumer = %self.config.consumer, %error, "outbox release failed; lease will expire");
                            }
                            tokio::select! {
                                () = shutdown.cancelled() => return,
                                () = tokio::time::sleep(delay) => {}
                            }
                            None
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(consumer = %self.config.consumer, %error, "outbox claim failed");
                    Some(self.config.idle_poll)
                }
            };
            if let Some(pause) = pause {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = &mut notified => {}
                    () = tokio::time::sleep(pause) => {}
                }
            }
        }
    }

    async fn claim(&self) -> Result<Vec<Vec<u8>>, DbErr> {
        let backend = self.db.get_database_backend();
        let now = now_micros();
        let skip_locked = if backend == DbBackend::Postgres {
            " FOR UPDATE SKIP LOCKED"
        } else {
            ""
        };
        // The oldest free rows up to `batch_size` events, and always the first one however
        // many it packs. The window runs over the rows already locked.
        let text = format!(
            "UPDATE outbox SET lease_owner = ?, lease_until = ? WHERE consumer = ? AND id IN (
                SELECT id FROM (
                    SELECT id, SUM(COALESCE(pack_size, 1)) OVER (ORDER BY id) AS upto,
                           ROW_NUMBER() OVER (ORDER BY id) AS n
                    FROM (SELECT id, pack_size FROM outbox
                          WHERE consumer = ? AND available_at <= ? AND lease_until <= ?
                          ORDER BY id LIMIT ?{skip_locked}) AS free
                ) AS running WHERE upto <= ? OR n = 1)
             RETURNING id, payload, pack_size"
        );
        let batch_size = i64::from(self.config.batch_size);
        let rows = self
            .db
            .query_all_raw(Statement::from_sql_and_values(
                backend,
                sql(backend, &text),
                [
                    self.owner.as_str().into(),
                    (now + LEASE.as_micros() as i64).into(),
                    self.config.consumer.as_str().into(),
                    self.config.consumer.as_str().into(),
                    now.into(),
                    now.into(),
                    batch_size.into(),
                    batch_size.into(),
                ],
            ))
            .await?;
        let mut batch = rows
            .iter()
            .map(|r| {
                Ok((
                    r.try_get_by_index::<i64>(0)?,
                    r.try_get_by_index::<Vec<u8>>(1)?,
                    r.try_get_by_index::<Option<i32>>(2)?,
                ))
            })
            .collect::<Result<Vec<_>, DbErr>>()?;
        // RETURNING does not promise order; deliver in commit order.
        batch.sort_unstable_by_key(|(id, _, _)| *id);
        let mut events = Vec::new();
        for (_, payload, pack_size) in batch {
            events.extend(unpack(payload, pack_size)?);
        }
        Ok(events)
    }

    /// Whether the consumer answers and reports Serving. A consumer without the health
    /// service counts as ready: the delivery itself will tell.
    async fn consumer_ready(&self) -> bool {
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        if grpc.ready().await.is_err() {
            return false;
        }
        let path = http::uri::PathAndQuery::from_static("/grpc.health.v1.Health/Check");
        let codec = tonic_prost::ProstCodec::<HealthCheckRequest, HealthCheckResponse>::default();
        let request = tonic::Request::new(HealthCheckRequest::default());
        match grpc.unary(request, path, codec).await {
            Ok(response) => response.into_inner().status == ServingStatus::Serving as i32,
            Err(status) => !matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
            ),
        }
    }

    async fn deliver(&self, events: Vec<Vec<u8>>) -> Result<(), tonic::Status> {
        let span = tracing::info_span!(
            "outbox.deliver",
            consumer = %self.config.consumer,
            events = events.len(),
            otel.kind = "client"
        );
        async {
            let mut grpc = tonic::client::Grpc::new(self.channel.clone())
                .max_encoding_message_size(crate::grpc::MAX_MESSAGE_BYTES);
            grpc.ready()
                .await
                .map_err(|e| tonic::Status::unavailable(format!("consumer not ready: {e}")))?;
            let mut request = tonic::Request::new(RawDeliverRequest {
                producer: self.config.producer.clone(),
                events,
            });
            crate::telemetry::inject_trace_context(request.metadata_mut());
            if let Some(token) = &self.config.token {
                request
                    .metadata_mut()
                    .insert("authorization", crate::grpc::bearer(token));
            }
            let path = http::uri::PathAndQuery::from_static("/waymark.common.v1.EventSink/Deliver");
            let codec = tonic_prost::ProstCodec::<RawDeliverRequest, DeliverResponse>::default();
            grpc.unary(request, path, codec).await.map(|_| ())
        }
        .instrument(span)
        .await
    }

    async fn ack(&self) -> Result<(), DbErr> {
        let backend = self.db.get_database_backend();
        self.db
            .execute_raw(Statement::from_sql_and_values(
                backend,
                sql(backend, "DELETE FROM outbox WHERE lease_owner = ?"),
                [self.owner.as_str().into()],
            ))
            .await
            .map(|_| ())
    }

    async fn release(&self, delay: Duration) -> Result<(), DbErr> {
        let backend = self.db.get_database_backend();
        self.db
            .execute_raw(Statement::from_sql_and_values(
                backend,
                sql(
                    backend,
                    "UPDATE outbox SET lease_owner = NULL, lease_until = 0, attempts = attempts + 1, available_at = ?
                     WHERE lease_owner = ?",
                ),
                [
                    (now_micros() + delay.as_micros() as i64).into(),
                    self.owner.as_str().into(),
                ],
            ))
            .await
            .map(|_| ())
    }
}

/// Exponential backoff with ±20 % jitter, so failing replicas do not retry in lockstep.
fn backoff(failures: u32, max: Duration) -> Duration {
    let exp = FIRST_BACKOFF.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    let base = exp.min(max);
    let jitter = rand::rng().random_range(0.8..1.2);
    base.mul_f64(jitter).min(max)
}

/// Rows an erasure reads at a time: a pack is at most [`MAX_PACK_BYTES`], so a page stays
/// within a few tens of MiB however large the backlog.
const SCRUB_PAGE_ROWS: i64 = 16;

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
pub async fn scrub<C: ConnectionTrait>(
    conn: &C,
    table: &str,
    mut erase: impl FnMut(&waymark_proto::common::v1::Event) -> bool,
) -> Result<u64, DbErr> {
    use prost::Message;
    use waymark_proto::common::v1::Event;
    let backend = conn.get_database_backend();
    let statement = |text: &str, values: Vec<Value>| {
        Statement::from_sql_and_values(backend, sql(backend, text), values)
    };
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
        let rows = conn
            .query_all_raw(statement(
                &format!(
                    "SELECT consumer, id, payload, pack_size FROM {table}{filter} ORDER BY consumer, id LIMIT ?"
                ),
                values,
            ))
            .await?;
        let Some(last) = rows.last() else {
            return Ok(removed);
        };
        after = Some((last.try_get_by_index(0)?, last.try_get_by_index(1)?));
        for row in &rows {
            let consumer: String = row.try_get_by_index(0)?;
            let id: i64 = row.try_get_by_index(1)?;
            let pack_size: Option<i32> = row.try_get_by_index(3)?;
            let events = unpack(row.try_get_by_index(2)?, pack_size)?;
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
                conn.execute_raw(statement(
                    &format!("DELETE FROM {table} WHERE consumer = ? AND id = ?"),
                    key,
                ))
                .await?;
            } else {
                let slices: Vec<&[u8]> = kept.iter().map(Vec::as_slice).collect();
                let mut values = vec![
                    Value::from(pack(&slices)),
                    Value::from(i32::try_from(kept.len()).unwrap_or(i32::MAX)),
                ];
                values.extend(key);
                conn.execute_raw(statement(
                    &format!(
                        "UPDATE {table} SET payload = ?, pack_size = ? WHERE consumer = ? AND id = ?"
                    ),
                    values,
                ))
                .await?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let max = Duration::from_secs(5);
        let first = backoff(1, max);
        assert!(first >= Duration::from_millis(80) && first <= Duration::from_millis(120));
        let fourth = backoff(4, max);
        assert!(fourth >= Duration::from_millis(640) && fourth <= Duration::from_millis(960));
        assert!(backoff(40, max) <= max);
    }

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

    #[test]
    fn raw_request_is_wire_compatible_with_deliver_request() {
        use prost::Message;
        use waymark_proto::common::v1::{DeliverRequest, Event};
        let event = Event {
            message_id: "m1".into(),
            event: "Signed Up".into(),
            ..Event::default()
        };
        let raw = RawDeliverRequest {
            producer: "ingest".into(),
            events: vec![event.encode_to_vec()],
        };
        let decoded = DeliverRequest::decode(raw.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded.producer, "ingest");
        assert_eq!(decoded.events, vec![event]);
    }
}
