//! Group commit: concurrent requests are gathered into one transaction, so throughput does
//! not depend on one fsync per request. A request is answered only after its transaction
//! committed; if the transaction fails, every request in it fails and nothing is written.

use std::collections::HashMap;
use std::sync::Arc;

use sea_orm::{DatabaseConnection, TransactionTrait};
use tokio::sync::{Mutex, mpsc, oneshot};
use tracing::Instrument;
use waymark_kit::outbox::{self, Wakeup};

use crate::metrics::EventMetrics;
use crate::store::{self, Counters, EventRow};

/// Upper bound on events in one transaction, to keep statements and latency bounded.
const MAX_GROUP_EVENTS: usize = 8192;

/// What a committed request achieved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitOutcome {
    /// Events written for the first time.
    pub accepted: u32,
    /// Events whose key was already in the log.
    pub duplicates: u32,
}

/// Why a commit failed; nothing of the request was written.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct CommitError {
    /// The database could not be reached: the client should retry.
    pub unavailable: bool,
    pub message: String,
}

struct CommitRequest {
    source_id: String,
    rows: Vec<EventRow>,
    counters: Counters,
    /// The request's `traceparent`, so the consumer's span links to it.
    trace: Option<String>,
    reply: oneshot::Sender<Result<CommitOutcome, CommitError>>,
}

/// Handle to the committer tasks.
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<CommitRequest>,
}

impl Committer {
    /// Starts `workers` committer tasks (one for SQLite, a few for PostgreSQL so one
    /// group's fsync overlaps the next group's inserts). They stop when every handle is
    /// dropped, after committing what was queued.
    pub fn spawn(
        db: DatabaseConnection,
        consumers: Vec<String>,
        wakeup: Wakeup,
        workers: usize,
    ) -> Self {
        let (tx, rx) = mpsc::channel::<CommitRequest>(4096);
        let rx = Arc::new(Mutex::new(rx));
        let consumers = Arc::new(consumers);
        for shard in 0..workers.max(1) {
            let worker = Worker {
                db: db.clone(),
                consumers: consumers.clone(),
                wakeup: wakeup.clone(),
                shard: shard as i32,
                events: EventMetrics::new(),
            };
            tokio::spawn(worker.run(rx.clone()));
        }
        Self { tx }
    }

    /// Commits `rows` of one source along with `counters` (rejections and suppressions
    /// the caller already counted) and returns once durable.
    pub async fn commit(
        &self,
        source_id: &str,
        rows: Vec<EventRow>,
        counters: Counters,
    ) -> Result<CommitOutcome, CommitError> {
        let (reply, answer) = oneshot::channel();
        let stopped = || CommitError {
            unavailable: true,
            message: "committer stopped".into(),
        };
        self.tx
            .send(CommitRequest {
                source_id: source_id.to_owned(),
                rows,
                counters,
                trace: waymark_kit::telemetry::current_traceparent(),
                reply,
            })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

struct Worker {
    db: DatabaseConnection,
    consumers: Arc<Vec<String>>,
    wakeup: Wakeup,
    shard: i32,
    events: EventMetrics,
}

impl Worker {
    /// Counts a committed request's events in `ingest.events{outcome}`; rejections are
    /// counted where they are decided, with their reason.
    fn count(&self, request: &CommitRequest, outcome: CommitOutcome) {
        self.events.counted("accepted", u64::from(outcome.accepted));
        self.events
            .counted("duplicate", u64::from(outcome.duplicates));
        self.events
            .counted("suppressed", request.counters.suppressed);
    }
}

impl Worker {
    async fn run(self, rx: Arc<Mutex<mpsc::Receiver<CommitRequest>>>) {
        loop {
            let group = {
                let mut rx = rx.lock().await;
                let Some(first) = rx.recv().await else { return };
                let mut events = first.rows.len();
                let mut group = vec![first];
                while events < MAX_GROUP_EVENTS {
                    match rx.try_recv() {
                        Ok(next) => {
                            events += next.rows.len();
                            group.push(next);
                        }
                        Err(_) => break,
                    }
                }
                group
            };
            let span = tracing::debug_span!(
                "ingest.group_commit",
                requests = group.len(),
                shard = self.shard
            );
            match self.commit_group(&group).instrument(span).await {
                Ok(outcomes) => {
                    self.wakeup.notify();
                    for (request, outcome) in group.into_iter().zip(outcomes) {
                        self.count(&request, outcome);
                        let _ = request.reply.send(Ok(outcome));
                    }
                }
                Err(error) => {
                    let error = CommitError {
                        unavailable: waymark_kit::db::is_unavailable(&error),
                        message: error.to_string(),
                    };
                    tracing::warn!(error = %error.message, unavailable = error.unavailable, "group commit failed");
                    for request in group {
                        let _ = request.reply.send(Err(error.clone()));
                    }
                }
            }
        }
    }

    async fn commit_group(
        &self,
        group: &[CommitRequest],
    ) -> Result<Vec<CommitOutcome>, sea_orm::DbErr> {
        let txn = self.db.begin().await?;
        let rows: Vec<&EventRow> = group.iter().flat_map(|r| r.rows.iter()).collect();
        let mut inserted = if rows.is_empty() {
            Default::default()
        } else {
            store::insert_events(&txn, &rows).await?
        };
        let mut payloads: Vec<&[u8]> = Vec::with_capacity(inserted.len());
        let mut counters: HashMap<String, Counters> = HashMap::new();
        let mut outcomes = Vec::with_capacity(group.len());
        for request in group {
            let mut outcome = CommitOutcome::default();
            for row in &request.rows {
                // The first request in the group holding a new key gets it; any other
                // holder of the same key in this group is a duplicate.
                let key = (row.source_id.clone(), row.message_id.clone());
                if inserted.remove(&key) {
                    outcome.accepted += 1;
                    payloads.push(&row.payload);
                } else {
                    outcome.duplicates += 1;
                }
            }
            let c = counters.entry(request.source_id.clone()).or_default();
            c.add(&request.counters);
            c.accepted += u64::from(outcome.accepted);
            c.duplicates += u64::from(outcome.duplicates);
            outcomes.push(outcome);
        }
        if !payloads.is_empty() {
            let links: Vec<String> = group.iter().filter_map(|r| r.trace.clone()).collect();
            outbox::enqueue_linked(&txn, &self.consumers, &payloads, &links).await?;
        }
        store::add_counters(&txn, self.shard, &counters).await?;
        txn.commit().await?;
        Ok(outcomes)
    }
}
