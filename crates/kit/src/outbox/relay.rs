//! The relay: workers that claim a consumer's rows and push them to its
//! `EventSink.Deliver`.
//!
//! Each claim takes the oldest free rows under a lease with a token of its own, so
//! acknowledging or releasing a claim touches exactly its rows, and an acknowledgement
//! after the lease expired (another worker may hold the rows now) deletes nothing: the
//! rows go out again and the consumer, idempotent by event id, applies them once.
//!
//! Ordering: per consumer, rows are claimed in commit order. Rows that failed and wait
//! for their retry, or are being retried, block every row after them, so later events
//! never overtake failed ones. Only batches already in flight together (at most the
//! workers of every replica) may be applied in either order, and a batch whose worker
//! died is retried when its lease expires.
//!
//! Failures: a transient error (the consumer or the network is down) releases the claim
//! with exponential backoff, forever (until the outbox retention moves it to the dead
//! letters). Any other error is retried too, but once a claim has failed `max_attempts`
//! times the relay splits it in halves, again and again, to find the events at fault:
//! those become dead letters and the rest is delivered. Events the consumer rejects one
//! by one (`DeliverResponse.rejected`) become dead letters at once.

use std::time::Duration;

use opentelemetry::KeyValue;
use rand::Rng;
use sea_orm::{DatabaseConnection, DbBackend, DbErr, FromQueryResult, TransactionTrait};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use waymark_proto::common::v1::{DeliverResponse, EncodedDeliverRequest};

use super::dead_letters::{self, Rejected};
use super::{Wakeup, unpack};
use crate::secret::Secret;
use crate::sql;
use crate::time::{duration_micros, now_micros};

/// Where and how one consumer is delivered to.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The producing service, sent in `DeliverRequest.producer`.
    pub producer: String,
    /// The consumer name used in outbox rows.
    pub consumer: String,
    /// The consumer's gRPC endpoint.
    pub endpoint: String,
    /// Bearer token the consumer checks (every Waymark consumer requires one).
    pub token: Secret,
    /// Events per delivery; a single row packing more still goes out whole.
    pub batch_size: u32,
    /// Longest pause after repeated failures.
    pub max_backoff: Duration,
    /// Concurrent workers for this consumer in this process.
    pub workers: usize,
    /// Poll interval when idle, to pick up rows committed by other replicas and expired
    /// leases.
    pub idle_poll: Duration,
    /// How long a claim stays invisible to other workers.
    pub lease: Duration,
    /// How long one `Deliver` call may take; well under the lease (a third of it by
    /// default), so a live worker acknowledges within its lease.
    pub delivery_timeout: Duration,
    /// Failed deliveries (other than transient ones) after which a batch is split to set
    /// the events at fault aside.
    pub max_attempts: u32,
    /// How long a row may wait undelivered before it is moved to the dead letters.
    pub retention: Duration,
    /// How long dead letters are kept.
    pub dead_letter_retention: Duration,
}

impl RelayConfig {
    /// The defaults every service uses, for `consumer` at `endpoint`.
    pub fn new(producer: &str, consumer: &str, endpoint: String, token: Secret) -> Self {
        Self {
            producer: producer.to_owned(),
            consumer: consumer.to_owned(),
            endpoint,
            token,
            batch_size: DEFAULT_BATCH_EVENTS,
            max_backoff: Duration::from_secs(30),
            workers: 1,
            idle_poll: Duration::from_secs(1),
            lease: Duration::from_secs(60),
            delivery_timeout: Duration::from_secs(20),
            max_attempts: 8,
            retention: Duration::from_secs(7 * 24 * 3600),
            dead_letter_retention: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// Events per delivery by default (`relay_batch_size`): four packs. A consumer applies a
/// delivery in one transaction, so fewer, larger deliveries cost it fewer commits; past
/// this size the system benchmark gained nothing more.
pub const DEFAULT_BATCH_EVENTS: u32 = 2000;

/// Stored bytes per delivery at most (beyond the first row), well under the gRPC message
/// limit every consumer accepts, so a large `batch_size` never builds a request a consumer
/// must refuse.
pub const MAX_DELIVERY_BYTES: usize = crate::grpc::MAX_MESSAGE_BYTES / 2;

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const LONGEST_SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Runs the relay workers for one consumer until `shutdown`, and the sweep that moves
/// rows past the retention to the dead letters.
pub async fn run_relay(
    db: DatabaseConnection,
    config: RelayConfig,
    wakeup: Wakeup,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let channel = crate::grpc::channel(&config.endpoint)?;
    let metrics = RelayMetrics::new(&config.consumer);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..config.workers.max(1) {
        let worker = Worker {
            db: db.clone(),
            config: config.clone(),
            channel: channel.clone(),
            metrics: metrics.clone(),
        };
        workers.spawn(worker.run(wakeup.clone(), shutdown.clone()));
    }
    workers.spawn(report_backlog(
        db.clone(),
        config.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    workers.spawn(sweep_expired(db, config, metrics, shutdown));
    while workers.join_next().await.is_some() {}
    Ok(())
}

/// How often each relay measures its consumer's backlog for the gauges.
const BACKLOG_INTERVAL: Duration = Duration::from_secs(5);

/// Records the consumer's backlog, the age of its oldest event (the lag) and its dead
/// letters as gauges, every few seconds.
async fn report_backlog(
    db: DatabaseConnection,
    config: RelayConfig,
    metrics: RelayMetrics,
    shutdown: CancellationToken,
) {
    loop {
        match super::backlog(&db).await {
            Ok(all) => {
                let mine = all.into_iter().find(|b| b.consumer == config.consumer);
                let (pending, oldest, dead) = mine
                    .map(|b| (b.pending, b.oldest_micros, b.dead_letters))
                    .unwrap_or_default();
                let lag = oldest.map_or(0.0, |t| (now_micros() - t).max(0) as f64 / 1e6);
                metrics.backlog.record(pending, &metrics.attrs);
                metrics.lag.record(lag, &metrics.attrs);
                metrics.dead_letters.record(dead, &metrics.attrs);
            }
            Err(error) => {
                tracing::debug!(consumer = %config.consumer, %error, "measuring the outbox backlog failed");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(BACKLOG_INTERVAL) => {}
        }
    }
}

/// Moves rows older than the retention to the dead letters, and deletes dead letters past
/// theirs, now and then.
async fn sweep_expired(
    db: DatabaseConnection,
    config: RelayConfig,
    metrics: RelayMetrics,
    shutdown: CancellationToken,
) {
    let every = (config.retention / 4).clamp(Duration::from_millis(50), LONGEST_SWEEP_INTERVAL);
    let reason = format!(
        "not delivered within the outbox retention ({} s)",
        config.retention.as_secs()
    );
    loop {
        let cutoff = now_micros() - duration_micros(config.retention);
        match dead_letters::expire(&db, &config.consumer, cutoff, &reason).await {
            Ok(0) => {}
            Ok(events) => {
                metrics.dead_lettered.add(events, &metrics.attrs);
                tracing::warn!(consumer = %config.consumer, events, "outbox rows past their retention moved to the dead letters");
            }
            Err(error) => {
                tracing::warn!(consumer = %config.consumer, %error, "outbox retention sweep failed");
            }
        }
        let cutoff = now_micros() - duration_micros(config.dead_letter_retention);
        match dead_letters::purge_older_than(&db, cutoff).await {
            Ok(0) => {}
            Ok(events) => tracing::info!(events, "dead letters past their retention deleted"),
            Err(error) => tracing::warn!(%error, "dead-letter retention sweep failed"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}

#[derive(Clone)]
struct RelayMetrics {
    attrs: [KeyValue; 1],
    delivered: opentelemetry::metrics::Counter<u64>,
    failures: opentelemetry::metrics::Counter<u64>,
    dead_lettered: opentelemetry::metrics::Counter<u64>,
    backlog: opentelemetry::metrics::Gauge<u64>,
    lag: opentelemetry::metrics::Gauge<f64>,
    dead_letters: opentelemetry::metrics::Gauge<u64>,
}

impl RelayMetrics {
    fn new(consumer: &str) -> Self {
        let meter = opentelemetry::global::meter("waymark");
        Self {
            attrs: [KeyValue::new("consumer", consumer.to_owned())],
            delivered: meter.u64_counter("outbox.delivered").build(),
            failures: meter.u64_counter("outbox.delivery_failures").build(),
            dead_lettered: meter.u64_counter("outbox.dead_lettered").build(),
            backlog: meter
                .u64_gauge("outbox.backlog")
                .with_description("events waiting for delivery")
                .build(),
            lag: meter
                .f64_gauge("outbox.lag")
                .with_unit("s")
                .with_description("age of the oldest event waiting for delivery")
                .build(),
            dead_letters: meter.u64_gauge("outbox.dead_letters").build(),
        }
    }
}

/// Rows one worker holds under one lease.
struct Claim {
    /// The lease token: only this claim's acknowledgement or release touches its rows.
    token: String,
    lease_until: i64,
    rows: u64,
    /// The events of the rows, in order, each with the time its row was queued.
    events: Vec<Vec<u8>>,
    queued_at: Vec<i64>,
    /// The most failed deliveries of any of its rows.
    attempts: i32,
    /// The `traceparent`s its events were committed under.
    trace_links: Vec<String>,
}

/// How a claim's delivery ended.
enum Delivery {
    /// The consumer took every event but these (position, reason).
    Taken(Vec<(usize, String)>),
    /// Nothing may be acknowledged; retry the claim later.
    Failed(tonic::Status),
}

struct Worker {
    db: DatabaseConnection,
    config: RelayConfig,
    channel: tonic::transport::Channel,
    metrics: RelayMetrics,
}

impl Worker {
    async fn run(self, wakeup: Wakeup, shutdown: CancellationToken) {
        let mut failures: u32 = 0;
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
                Ok(None) => Some(self.config.idle_poll),
                Ok(Some(claim)) => match self.deliver_claim(&claim).await {
                    Delivery::Taken(rejected) => {
                        failures = 0;
                        self.settle(claim, rejected).await;
                        None
                    }
                    Delivery::Failed(status) => {
                        failures = failures.saturating_add(1);
                        self.metrics.failures.add(1, &self.metrics.attrs);
                        let delay = backoff(failures, self.config.max_backoff);
                        tracing::warn!(
                            consumer = %self.config.consumer,
                            code = ?status.code(),
                            message = status.message(),
                            events = claim.events.len(),
                            attempts = claim.attempts + 1,
                            retry_in_ms = delay.as_millis() as u64,
                            "delivery failed"
                        );
                        self.release(&claim, delay, &shutdown).await;
                        tokio::select! {
                            () = shutdown.cancelled() => return,
                            () = tokio::time::sleep(delay) => {}
                        }
                        None
                    }
                },
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

    /// Leases the oldest free rows up to `batch_size` events and [`MAX_DELIVERY_BYTES`]
    /// (always the first one, however many it packs), none of them behind a row that failed
    /// and waits for, or is in, its retry.
    async fn claim(&self) -> Result<Option<Claim>, DbErr> {
        let backend = self.db.get_database_backend();
        let now = now_micros();
        let token = uuid::Uuid::now_v7().to_string();
        let lease_until = now.saturating_add(duration_micros(self.config.lease));
        let skip_locked = if backend == DbBackend::Postgres {
            " FOR UPDATE SKIP LOCKED"
        } else {
            ""
        };
        let bytes = if backend == DbBackend::Postgres {
            "octet_length(payload)"
        } else {
            "length(payload)"
        };
        // The window runs over the rows already locked.
        let text = format!(
            "UPDATE outbox SET lease_owner = ?, lease_until = ? WHERE consumer = ? AND id IN (
                SELECT id FROM (
                    SELECT id, SUM(COALESCE(pack_size, 1)) OVER (ORDER BY id) AS upto,
                           SUM(size) OVER (ORDER BY id) AS bytes_upto,
                           ROW_NUMBER() OVER (ORDER BY id) AS n
                    FROM (SELECT id, pack_size, {bytes} AS size FROM outbox
                          WHERE consumer = ? AND available_at <= ? AND lease_until <= ?
                            AND id < COALESCE((SELECT MIN(id) FROM outbox
                                               WHERE consumer = ? AND attempts > 0
                                                 AND (available_at > ? OR lease_until > ?)),
                                              9223372036854775807)
                          ORDER BY id LIMIT ?{skip_locked}) AS free
                ) AS running WHERE (upto <= ? AND bytes_upto <= ?) OR n = 1)
             RETURNING id, payload, pack_size, attempts, created_at, trace_links"
        );
        let batch_size = i64::from(self.config.batch_size);
        let consumer = self.config.consumer.as_str();
        #[derive(FromQueryResult)]
        struct Claimed {
            id: i64,
            payload: Vec<u8>,
            pack_size: Option<i32>,
            attempts: i32,
            created_at: i64,
            trace_links: Option<String>,
        }
        let mut batch: Vec<Claimed> = sql::query_as(
            &self.db,
            &text,
            [
                token.as_str().into(),
                lease_until.into(),
                consumer.into(),
                consumer.into(),
                now.into(),
                now.into(),
                consumer.into(),
                now.into(),
                now.into(),
                batch_size.into(),
                batch_size.into(),
                (MAX_DELIVERY_BYTES as i64).into(),
            ],
        )
        .await?;
        if batch.is_empty() {
            return Ok(None);
        }
        // RETURNING does not promise order; deliver in commit order.
        batch.sort_unstable_by_key(|row| row.id);
        let mut claim = Claim {
            token,
            lease_until,
            rows: batch.len() as u64,
            events: Vec::new(),
            queued_at: Vec::new(),
            attempts: 0,
            trace_links: Vec::new(),
        };
        for Claimed {
            payload,
            pack_size,
            attempts,
            created_at,
            trace_links,
            ..
        } in batch
        {
            for link in trace_links.iter().flat_map(|l| l.split(',')) {
                let room = claim.trace_links.len() < crate::telemetry::MAX_TRACE_LINKS;
                if room && !claim.trace_links.iter().any(|l| l == link) {
                    claim.trace_links.push(link.to_owned());
                }
            }
            let events = unpack(payload, pack_size)?;
            claim
                .queued_at
                .extend(std::iter::repeat_n(created_at, events.len()));
            claim.events.extend(events);
            claim.attempts = claim.attempts.max(attempts);
        }
        Ok(Some(claim))
    }

    /// Delivers the claim whole; once it has failed `max_attempts` times with errors that
    /// are not transient, splits it to find the events at fault.
    async fn deliver_claim(&self, claim: &Claim) -> Delivery {
        let status = match self.deliver(claim, &claim.events).await {
            Ok(rejected) => return Delivery::Taken(rejected),
            Err(status) => status,
        };
        let exhausted = u32::try_from(claim.attempts + 1).unwrap_or(0) >= self.config.max_attempts;
        if is_transient(&status) || !exhausted {
            return Delivery::Failed(status);
        }
        tracing::warn!(
            consumer = %self.config.consumer,
            code = ?status.code(),
            message = status.message(),
            events = claim.events.len(),
            "batch keeps failing; splitting it to find the events at fault"
        );
        // Depth first, left half first, so the parts go out in order.
        let mut rejected = Vec::new();
        let mut parts = vec![(0, claim.events.len())];
        while let Some((start, end)) = parts.pop() {
            // Never deliver what could not be acknowledged under this lease.
            let timeout = duration_micros(self.config.delivery_timeout);
            if now_micros() + timeout > claim.lease_until {
                return Delivery::Failed(tonic::Status::deadline_exceeded(
                    "the claim's lease would expire before the batch is split to the end",
                ));
            }
            match self.deliver(claim, &claim.events[start..end]).await {
                Ok(part) => rejected.extend(part.into_iter().map(|(i, why)| (start + i, why))),
                Err(status) if is_transient(&status) => return Delivery::Failed(status),
                Err(status) if end - start == 1 => {
                    rejected.push((start, format!("{:?}: {}", status.code(), status.message())));
                }
                Err(_) => {
                    let middle = start + (end - start) / 2;
                    parts.push((middle, end));
                    parts.push((start, middle));
                }
            }
        }
        Delivery::Taken(rejected)
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

    /// One `Deliver` call; the consumer's rejections by position in `events`.
    async fn deliver(
        &self,
        claim: &Claim,
        events: &[Vec<u8>],
    ) -> Result<Vec<(usize, String)>, tonic::Status> {
        let span = tracing::info_span!(
            "outbox.deliver",
            consumer = %self.config.consumer,
            events = events.len(),
            otel.kind = "client"
        );
        // One delivery carries the events of many requests: it links to each of their
        // traces rather than continuing one of them.
        crate::telemetry::link_span(&span, claim.trace_links.iter().map(String::as_str));
        let response = async {
            let mut grpc = tonic::client::Grpc::new(self.channel.clone())
                .max_encoding_message_size(crate::grpc::MAX_MESSAGE_BYTES);
            grpc.ready()
                .await
                .map_err(|e| tonic::Status::unavailable(format!("consumer not ready: {e}")))?;
            let mut request = tonic::Request::new(EncodedDeliverRequest {
                producer: self.config.producer.clone(),
                events: events.to_vec(),
            });
            request.set_timeout(self.config.delivery_timeout);
            crate::telemetry::inject_trace_context(request.metadata_mut());
            if !claim.trace_links.is_empty()
                && let Ok(links) = claim.trace_links.join(",").parse()
            {
                request
                    .metadata_mut()
                    .insert(crate::telemetry::TRACE_LINKS_HEADER, links);
            }
            request
                .metadata_mut()
                .insert("authorization", crate::grpc::bearer(&self.config.token));
            let path = http::uri::PathAndQuery::from_static("/waymark.common.v1.EventSink/Deliver");
            let codec =
                tonic_prost::ProstCodec::<EncodedDeliverRequest, DeliverResponse>::default();
            grpc.unary(request, path, codec).await
        }
        .instrument(span)
        .await?
        .into_inner();
        let mut rejected = Vec::with_capacity(response.rejected.len());
        for r in response.rejected {
            let index = r.index as usize;
            if index >= events.len() {
                return Err(tonic::Status::internal(format!(
                    "the consumer rejected event {index} of a batch of {}",
                    events.len()
                )));
            }
            let field = if r.field.is_empty() {
                String::new()
            } else {
                format!("{}: ", r.field)
            };
            rejected.push((
                index,
                format!("rejected by the consumer: {field}{}", r.reason),
            ));
        }
        Ok(rejected)
    }

    /// Sets the rejected events aside and deletes the claim's rows, in one transaction,
    /// unless the lease expired meanwhile: then nothing changes and the rows go out again.
    async fn settle(&self, claim: Claim, rejected: Vec<(usize, String)>) {
        let delivered = (claim.events.len() - rejected.len()) as u64;
        let dead = rejected.len() as u64;
        match self.try_settle(&claim, rejected).await {
            Ok(true) => {
                self.metrics.delivered.add(delivered, &self.metrics.attrs);
                if dead > 0 {
                    self.metrics.dead_lettered.add(dead, &self.metrics.attrs);
                    tracing::warn!(consumer = %self.config.consumer, events = dead, "events set aside as dead letters");
                }
            }
            Ok(false) => {
                tracing::warn!(consumer = %self.config.consumer, "lease expired before the acknowledgement; the batch will be delivered again");
            }
            Err(error) => {
                tracing::warn!(consumer = %self.config.consumer, %error, "outbox acknowledgement failed; the batch will be delivered again when its lease expires");
            }
        }
    }

    async fn try_settle(
        &self,
        claim: &Claim,
        rejected: Vec<(usize, String)>,
    ) -> Result<bool, DbErr> {
        let txn = self.db.begin().await?;
        let rejected = rejected
            .into_iter()
            .map(|(i, reason)| Rejected {
                payload: claim.events[i].clone(),
                reason,
                attempts: claim.attempts + 1,
                created_at: claim.queued_at[i],
            })
            .collect::<Vec<_>>();
        dead_letters::insert(&txn, &self.config.consumer, rejected).await?;
        let deleted = sql::execute(
            &txn,
            "DELETE FROM outbox WHERE lease_owner = ? AND lease_until > ?",
            [claim.token.as_str().into(), now_micros().into()],
        )
        .await?;
        if deleted != claim.rows {
            txn.rollback().await?;
            return Ok(false);
        }
        txn.commit().await?;
        Ok(true)
    }

    /// Releases the claim's rows for a retry after `delay`. While the database cannot be
    /// reached this is tried again (until the lease expires, which releases them anyway),
    /// so the failed rows keep blocking the rows behind them.
    async fn release(&self, claim: &Claim, delay: Duration, shutdown: &CancellationToken) {
        let mut pause = FIRST_BACKOFF;
        loop {
            let result = sql::execute(
                &self.db,
                "UPDATE outbox SET lease_owner = NULL, lease_until = 0, attempts = attempts + 1, available_at = ?
                 WHERE lease_owner = ?",
                [
                    now_micros().saturating_add(duration_micros(delay)).into(),
                    claim.token.as_str().into(),
                ],
            )
            .await;
            let Err(error) = result else { return };
            if now_micros().saturating_add(duration_micros(pause)) >= claim.lease_until {
                tracing::warn!(consumer = %self.config.consumer, %error, "outbox release failed; the lease will expire");
                return;
            }
            tracing::debug!(consumer = %self.config.consumer, %error, "outbox release failed; trying again");
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }
}

/// Errors that say nothing about the events: the consumer, its dependencies or the
/// network are down or misconfigured. Retried until the retention, never blamed on an
/// event.
fn is_transient(status: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(
        status.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::Unknown
            | Code::Unauthenticated
            | Code::PermissionDenied
            | Code::Unimplemented
    )
}

/// Exponential backoff with ±20 % jitter, so failing replicas do not retry in lockstep.
fn backoff(failures: u32, max: Duration) -> Duration {
    let exp = FIRST_BACKOFF.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    let base = exp.min(max);
    let jitter = rand::rng().random_range(0.8..1.2);
    base.mul_f64(jitter).min(max)
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
    fn only_errors_about_the_events_count_toward_splitting() {
        assert!(is_transient(&tonic::Status::unavailable("down")));
        assert!(is_transient(&tonic::Status::unauthenticated("token")));
        assert!(!is_transient(&tonic::Status::invalid_argument("bad")));
        assert!(!is_transient(&tonic::Status::internal(
            "index row too large"
        )));
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
        let raw = EncodedDeliverRequest {
            producer: "ingest".into(),
            events: vec![event.encode_to_vec()],
        };
        let decoded = DeliverRequest::decode(raw.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded.producer, "ingest");
        assert_eq!(decoded.events, vec![event]);
    }
}
