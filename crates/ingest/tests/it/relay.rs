//! The outbox relay under faults, against the ingestion schema: the database cut between
//! two statements by a proxy, a consumer that fails on command, an expired lease and a
//! killed relay. Afterwards every event has reached the consumer at least once, nothing
//! is left behind, later rows never overtook failed ones, and events a consumer cannot
//! take are dead letters instead of a stalled queue.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use prost::Message;
use sea_orm::{DatabaseConnection, TransactionTrait};
use tokio::task::JoinHandle;
use waymark_kit::CancellationToken;
use waymark_kit::outbox::dead_letters::{self, Selection};
use waymark_kit::outbox::{self, RelayConfig, Wakeup};
use waymark_kit::secret::Secret;
use waymark_proto::common::v1::Event;
use waymark_proto::common::v1::outbox_service_client::OutboxServiceClient;
use waymark_proto::common::v1::{
    DropDeadLettersRequest, GetOutboxStatsRequest, ListDeadLettersRequest, RetryDeadLettersRequest,
};

use super::support::*;

/// An outbox in a fresh ingestion schema, read directly by the test and, for the relay,
/// through a proxy that can cut PostgreSQL (SQLite is a file: no proxy).
struct Outbox {
    _db: TestDb,
    conn: DatabaseConnection,
    relay_conn: DatabaseConnection,
    proxy: Option<Arc<Proxy>>,
}

impl Outbox {
    async fn new(backend: Backend) -> Self {
        let db = TestDb::new(backend).await;
        let conn = waymark_kit::db::connect(&db.url, "ingest", 4)
            .await
            .unwrap();
        waymark_kit::db::migrate(&conn, "ingest", waymark_ingest::store::MIGRATIONS)
            .await
            .unwrap();
        let (relay_conn, proxy) = match backend {
            Backend::Postgres => {
                let proxy = Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
                let name = db.url.rsplit_once('/').unwrap().1;
                let url = format!("postgres://postgres@{}/{name}", proxy.addr);
                let relay_conn = waymark_kit::db::connect(&url, "ingest", 4).await.unwrap();
                (relay_conn, Some(Arc::new(proxy)))
            }
            Backend::Sqlite => (conn.clone(), None),
        };
        Self {
            _db: db,
            conn,
            relay_conn,
            proxy,
        }
    }

    fn proxy(&self) -> Arc<Proxy> {
        self.proxy.clone().expect("a PostgreSQL test")
    }

    /// When the first delivery reaches `sink`, the relay's database goes away for 300 ms:
    /// whatever the relay writes after that delivery (its release or acknowledgement)
    /// fails.
    fn cut_database_at_first_delivery(&self, sink: &Sink) {
        let proxy = self.proxy();
        let cut_once = std::sync::atomic::AtomicBool::new(false);
        *sink.on_delivery.lock().unwrap() = Some(Box::new(move || {
            if !cut_once.swap(true, Ordering::SeqCst) {
                proxy.cut();
                let proxy = proxy.clone();
                tokio::spawn(async move {
                    // The outage itself: the test waits for its effects, not for this.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    proxy.restore();
                });
            }
        }));
    }

    /// Queues events `ids` (message id and event id `o-{i}`) in one transaction: one pack.
    async fn queue(&self, ids: std::ops::Range<usize>) {
        let payloads: Vec<Vec<u8>> = ids.map(|i| event(i).encode_to_vec()).collect();
        let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
        let txn = self.conn.begin().await.unwrap();
        outbox::enqueue(&txn, &["profile".to_owned()], &refs)
            .await
            .unwrap();
        txn.commit().await.unwrap();
    }

    fn relay(&self, config: RelayConfig) -> Relay {
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(outbox::run_relay(
            self.relay_conn.clone(),
            config,
            Wakeup::default(),
            shutdown.clone(),
        ));
        Relay { shutdown, handle }
    }

    async fn backlog(&self) -> (u64, u64) {
        outbox::backlog(&self.conn)
            .await
            .unwrap()
            .iter()
            .fold((0, 0), |(p, d), b| (p + b.pending, d + b.dead_letters))
    }

    /// Waits until nothing is pending; returns the dead letters' event count.
    async fn drained(&self) -> u64 {
        eventually("the outbox to drain", PATIENCE, async || {
            let (pending, dead_letters) = self.backlog().await;
            if pending == 0 {
                Ok(dead_letters)
            } else {
                Err(format!("{pending} events pending"))
            }
        })
        .await
    }
}

struct Relay {
    shutdown: CancellationToken,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl Relay {
    async fn stop(self) {
        self.shutdown.cancel();
        self.handle.await.unwrap().unwrap();
    }
}

fn event(i: usize) -> Event {
    Event {
        event_id: format!("o-{i}"),
        message_id: format!("o-{i}"),
        event: "Tick".into(),
        user_id: "u".into(),
        ..Event::default()
    }
}

/// A relay that retries fast, with a short lease so a lost claim comes back in a second.
fn relay_config(endpoint: String) -> RelayConfig {
    RelayConfig {
        max_backoff: Duration::from_millis(200),
        idle_poll: Duration::from_millis(20),
        lease: Duration::from_secs(1),
        delivery_timeout: Duration::from_millis(300),
        max_attempts: 2,
        ..RelayConfig::new("ingest", "profile", endpoint, Secret::new(ADMIN_TOKEN))
    }
}

/// Waits until the sink has received each of `ids` at least once; returns how many
/// times it received each.
async fn received_all(sink: &Sink, ids: std::ops::Range<usize>) -> HashMap<String, usize> {
    let wanted: Vec<String> = ids.map(|i| format!("o-{i}")).collect();
    eventually("the sink to receive every event", PATIENCE, async || {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for e in sink.received.lock().await.iter() {
            *counts.entry(e.message_id.clone()).or_default() += 1;
        }
        if wanted.iter().all(|id| counts.contains_key(id)) {
            Ok(counts)
        } else {
            Err(format!("{} distinct events", counts.len()))
        }
    })
    .await
}

/// The claim commits but its reply is lost: the rows come back when the lease expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_claim_reply_delays_but_loses_nothing() {
    let outbox = Outbox::new(Backend::Postgres).await;
    outbox.queue(0..5).await;
    outbox.proxy().lose_reply_containing(b"UPDATE ");
    let sink = Sink::default();
    let relay = outbox.relay(relay_config(sink.start().await));
    received_all(&sink, 0..5).await;
    assert_eq!(outbox.drained().await, 0);
    relay.stop().await;
}

/// A delivery fails and so does the release (the database is cut at that moment); a
/// later successful delivery must not acknowledge the rows that were never delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_release_never_lets_a_later_ack_delete_undelivered_rows() {
    let outbox = Outbox::new(Backend::Postgres).await;
    let sink = Sink::default();
    sink.refusing.lock().await.insert("o-0".into());
    outbox.cut_database_at_first_delivery(&sink);
    outbox.queue(0..3).await;
    let relay = outbox.relay(relay_config(sink.start().await));
    eventually("the first delivery failed", PATIENCE, async || {
        sink.attempts.load(Ordering::SeqCst) >= 1
    })
    .await;
    outbox.queue(3..6).await;
    eventually("the failed batch was retried", PATIENCE, async || {
        sink.attempts.load(Ordering::SeqCst) >= 3
    })
    .await;
    sink.refusing.lock().await.clear();
    received_all(&sink, 0..6).await;
    assert_eq!(outbox.drained().await, 0);
    relay.stop().await;
}

/// The consumer took the batch but the acknowledgement never reached the database: the
/// batch is delivered again, and nothing stays queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_ack_delivers_again() {
    let outbox = Outbox::new(Backend::Postgres).await;
    let sink = Sink::default();
    outbox.cut_database_at_first_delivery(&sink);
    outbox.queue(0..4).await;
    let relay = outbox.relay(relay_config(sink.start().await));
    eventually("the batch was delivered twice", PATIENCE, async || {
        sink.deliveries.lock().await.len() >= 2
    })
    .await;
    let counts = received_all(&sink, 0..4).await;
    assert!(counts.values().all(|n| *n == 2), "{counts:?}");
    assert_eq!(outbox.drained().await, 0);
    relay.stop().await;
}

/// A worker whose lease expires while its delivery hangs (a stalled replica) loses the
/// rows to another replica; its late acknowledgement deletes nothing, not even the rows
/// queued meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_after_the_lease_expired_deletes_nothing() {
    let outbox = Outbox::new(Backend::Postgres).await;
    let sink = Sink::default();
    let endpoint = sink.start().await;
    let delay = sink.delay_ms.clone();
    let first = std::sync::atomic::AtomicBool::new(true);
    *sink.on_delivery.lock().unwrap() = Some(Box::new(move || {
        let stall = first.swap(false, Ordering::SeqCst);
        delay.store(if stall { 2000 } else { 0 }, Ordering::SeqCst);
    }));
    outbox.queue(0..3).await;
    let stalled = outbox.relay(RelayConfig {
        delivery_timeout: Duration::from_secs(5),
        lease: Duration::from_millis(500),
        ..relay_config(endpoint.clone())
    });
    eventually("the stalled delivery started", PATIENCE, async || {
        sink.attempts.load(Ordering::SeqCst) >= 1
    })
    .await;
    let other = outbox.relay(relay_config(endpoint));
    received_all(&sink, 0..3).await;
    other.stop().await;
    outbox.queue(3..6).await;
    eventually("the stalled delivery ended", PATIENCE, async || {
        sink.deliveries.lock().await.len() >= 2
    })
    .await;
    let counts = received_all(&sink, 3..6).await;
    assert!(
        (0..3).all(|i| counts[&format!("o-{i}")] == 2),
        "both replicas delivered the first rows: {counts:?}"
    );
    assert_eq!(outbox.drained().await, 0);
    stalled.stop().await;
}

/// A relay killed mid-delivery: another one delivers its rows once the lease expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_mid_delivery_loses_nothing() {
    let outbox = Outbox::new(Backend::Postgres).await;
    let sink = Sink::default();
    let endpoint = sink.start().await;
    sink.delay_ms.store(3000, Ordering::SeqCst);
    outbox.queue(0..4).await;
    let doomed = outbox.relay(RelayConfig {
        delivery_timeout: Duration::from_secs(5),
        ..relay_config(endpoint.clone())
    });
    eventually("the delivery started", PATIENCE, async || {
        sink.attempts.load(Ordering::SeqCst) >= 1
    })
    .await;
    doomed.handle.abort();
    let _ = doomed.handle.await;
    sink.delay_ms.store(0, Ordering::SeqCst);
    let relay = outbox.relay(relay_config(endpoint));
    received_all(&sink, 0..4).await;
    assert_eq!(outbox.drained().await, 0);
    relay.stop().await;
}

/// After a failure, later rows wait behind the failed ones, even with two workers.
async fn later_rows_never_overtake_failed_ones(backend: Backend) {
    let outbox = Outbox::new(backend).await;
    let sink = Sink::default();
    sink.refusing.lock().await.insert("o-0".into());
    outbox.queue(0..3).await;
    let relay = outbox.relay(RelayConfig {
        workers: 2,
        ..relay_config(sink.start().await)
    });
    // Its second attempt means the first failure is recorded.
    let what = "the first batch failed and was retried";
    eventually(what, PATIENCE, async || {
        sink.attempts.load(Ordering::SeqCst) >= 2
    })
    .await;
    outbox.queue(3..6).await;
    let attempts = sink.attempts.load(Ordering::SeqCst);
    eventually("the relay tried again twice", PATIENCE, async || {
        sink.attempts.load(Ordering::SeqCst) >= attempts + 2
    })
    .await;
    assert!(
        sink.received.lock().await.is_empty(),
        "nothing after the failed batch was delivered"
    );
    sink.refusing.lock().await.clear();
    received_all(&sink, 0..6).await;
    let order: Vec<String> = sink
        .received
        .lock()
        .await
        .iter()
        .map(|e| e.message_id.clone())
        .collect();
    let expected: Vec<String> = (0..6).map(|i| format!("o-{i}")).collect();
    assert_eq!(order, expected);
    relay.stop().await;
}
waymark_testkit::on_both_backends!(later_rows_never_overtake_failed_ones);

/// A batch the consumer keeps failing is split until the one event at fault is found:
/// it becomes a dead letter, every other event is delivered once, and a retry after the
/// consumer is fixed delivers it too.
async fn a_batch_the_consumer_cannot_take_loses_only_the_event_at_fault(backend: Backend) {
    let outbox = Outbox::new(backend).await;
    let sink = Sink::default();
    sink.choking.lock().await.insert("o-2".into());
    outbox.queue(0..8).await;
    let relay = outbox.relay(relay_config(sink.start().await));
    assert_eq!(outbox.drained().await, 1);
    let counts = received_all(&sink, 0..2).await;
    let expected: HashMap<String, usize> = [0, 1, 3, 4, 5, 6, 7]
        .iter()
        .map(|i| (format!("o-{i}"), 1))
        .collect();
    assert_eq!(counts, expected);
    let letters = dead_letters::list(&outbox.conn, None, 0, 10).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].events, vec![event(2).encode_to_vec()]);
    assert!(
        letters[0].reason.contains("cannot take"),
        "{}",
        letters[0].reason
    );
    assert_eq!(letters[0].attempts, 2);

    sink.choking.lock().await.clear();
    let all = Selection::All {
        consumer: Some("profile".into()),
    };
    assert_eq!(dead_letters::retry(&outbox.conn, &all).await.unwrap(), 1);
    received_all(&sink, 2..3).await;
    assert_eq!(outbox.drained().await, 0);
    relay.stop().await;
}
waymark_testkit::on_both_backends!(a_batch_the_consumer_cannot_take_loses_only_the_event_at_fault);

/// However many events a delivery may carry, it stays under the byte limit consumers
/// accept: large events go a few at a time.
async fn deliveries_stay_under_the_message_limit(backend: Backend) {
    let outbox = Outbox::new(backend).await;
    let sink = Sink::default();
    // Six events of 3 MiB: each its own pack, 18 MiB in all, past the gRPC limit.
    let payloads: Vec<Vec<u8>> = (0..6)
        .map(|i| {
            let mut big = event(i);
            big.name = "x".repeat(3 * 1024 * 1024);
            big.encode_to_vec()
        })
        .collect();
    let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
    let txn = outbox.conn.begin().await.unwrap();
    outbox::enqueue(&txn, &["profile".to_owned()], &refs)
        .await
        .unwrap();
    txn.commit().await.unwrap();
    let relay = outbox.relay(RelayConfig {
        batch_size: 5000,
        ..relay_config(sink.start().await)
    });
    received_all(&sink, 0..6).await;
    let deliveries = sink.deliveries.lock().await.clone();
    // Half the gRPC limit, as documented: two of these events.
    let per_delivery = waymark_kit::grpc::MAX_MESSAGE_BYTES / 2 / (3 * 1024 * 1024);
    assert!(
        deliveries.iter().all(|&n| n <= per_delivery),
        "events per delivery: {deliveries:?}"
    );
    assert_eq!(deliveries.iter().sum::<usize>(), 6, "each once");
    assert_eq!(outbox.drained().await, 0);
    relay.stop().await;
}
waymark_testkit::on_both_backends!(deliveries_stay_under_the_message_limit);

/// Events the consumer rejects one by one are dead letters at once; the rest of their
/// batch is delivered in the same attempt.
async fn rejected_events_are_dead_letters_at_once(backend: Backend) {
    let outbox = Outbox::new(backend).await;
    let sink = Sink::default();
    sink.rejecting.lock().await.insert("o-1".into());
    outbox.queue(0..3).await;
    let relay = outbox.relay(relay_config(sink.start().await));
    assert_eq!(outbox.drained().await, 1);
    assert_eq!(sink.attempts.load(Ordering::SeqCst), 1);
    let ids: Vec<String> = sink
        .received
        .lock()
        .await
        .iter()
        .map(|e| e.message_id.clone())
        .collect();
    assert_eq!(ids, ["o-0", "o-2"]);
    let letters = dead_letters::list(&outbox.conn, Some("profile"), 0, 10)
        .await
        .unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(
        letters[0].reason,
        "rejected by the consumer: events[1].message_id: the sink rejects this message id"
    );
    let one = Selection::Ids(vec![letters[0].id]);
    assert_eq!(dead_letters::drop(&outbox.conn, &one).await.unwrap(), 1);
    assert_eq!(outbox.backlog().await, (0, 0));
    relay.stop().await;
}
waymark_testkit::on_both_backends!(rejected_events_are_dead_letters_at_once);

/// Rows for a consumer that never answers are not kept forever: past the retention they
/// are dead letters.
async fn rows_past_their_retention_become_dead_letters(backend: Backend) {
    let outbox = Outbox::new(backend).await;
    let nobody = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", nobody.local_addr().unwrap());
    drop(nobody);
    outbox.queue(0..3).await;
    let relay = outbox.relay(RelayConfig {
        retention: Duration::from_millis(300),
        ..relay_config(endpoint)
    });
    assert_eq!(outbox.drained().await, 3);
    let letters = dead_letters::list(&outbox.conn, None, 0, 10).await.unwrap();
    assert_eq!(letters.len(), 1, "the row moves whole");
    assert_eq!(letters[0].events.len(), 3);
    assert!(
        letters[0].reason.contains("retention"),
        "{}",
        letters[0].reason
    );
    relay.stop().await;
}
waymark_testkit::on_both_backends!(rows_past_their_retention_become_dead_letters);

/// The operator's RPCs: stats (also in `GetStats`), a page of dead letters with their
/// event ids, retry and drop, and clear errors for requests that name nothing.
async fn dead_letters_are_listed_retried_and_dropped_over_grpc(backend: Backend) {
    let db = TestDb::new(backend).await;
    let sink = Sink::default();
    sink.rejecting.lock().await.insert("dl-1".into());
    sink.rejecting.lock().await.insert("dl-2".into());
    let server = TestServer::start(config(&db.url, &sink.start().await)).await;
    let (_, key) = server.create_source("web", 0).await;
    let events = (0..4)
        .map(|i| track(&format!("dl-{i}"), "u1", "Tick"))
        .collect();
    server
        .client()
        .await
        .ingest(ingest_request(events, &key))
        .await
        .unwrap();
    let mut admin_client = OutboxServiceClient::connect(server.grpc_url())
        .await
        .unwrap();
    let stats = async |client: &mut OutboxServiceClient<_>| {
        client
            .get_outbox_stats(admin(GetOutboxStatsRequest::default()))
            .await
            .unwrap()
            .into_inner()
            .consumers
    };
    let what = "two dead letters and nothing pending";
    eventually(what, PATIENCE, async || {
        let consumers = stats(&mut admin_client).await;
        let settled =
            consumers.len() == 1 && (consumers[0].pending, consumers[0].dead_letters) == (0, 2);
        if settled { Ok(()) } else { Err(consumers) }
    })
    .await;
    let ingest_stats = server
        .client()
        .await
        .get_stats(admin(waymark_proto::ingest::v1::GetStatsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ingest_stats.pending[0].dead_letters, 2);

    let page = admin_client
        .list_dead_letters(admin(ListDeadLettersRequest {
            page_size: 1,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.dead_letters.len(), 1);
    assert_eq!(page.dead_letters[0].consumer, "profile");
    assert_eq!(page.dead_letters[0].event_ids.len(), 1);
    assert!(
        page.dead_letters[0]
            .reason
            .contains("rejected by the consumer")
    );
    let second = admin_client
        .list_dead_letters(admin(ListDeadLettersRequest {
            page_size: 1,
            page_token: page.next_page_token.clone(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.dead_letters.len(), 1);
    assert_ne!(second.dead_letters[0].id, page.dead_letters[0].id);

    let refused = admin_client
        .retry_dead_letters(admin(RetryDeadLettersRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("ids"), "{}", refused.message());
    let unauthenticated = admin_client
        .drop_dead_letters(DropDeadLettersRequest {
            all: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(unauthenticated.code(), tonic::Code::Unauthenticated);

    sink.rejecting.lock().await.remove("dl-1");
    let requeued = admin_client
        .retry_dead_letters(admin(RetryDeadLettersRequest {
            ids: vec![page.dead_letters[0].id],
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(requeued.requeued, 1);
    sink.wait_for_event("the retried dead letter", |e| e.message_id == "dl-1")
        .await;
    let dropped = admin_client
        .drop_dead_letters(admin(DropDeadLettersRequest {
            all: true,
            consumer: "profile".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dropped.dropped, 1);
    let consumers = stats(&mut admin_client).await;
    assert!(
        consumers.iter().all(|c| c.dead_letters == 0),
        "{consumers:?}"
    );
    server.stop().await;
}
waymark_testkit::on_both_backends!(dead_letters_are_listed_retried_and_dropped_over_grpc);

/// A service whose relay needs the admin token refuses to start without it, naming the
/// setting, instead of acknowledging events it could never deliver.
#[tokio::test]
async fn a_relay_without_the_admin_token_stops_the_service_at_start_up() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut config = config(&db.url, "http://127.0.0.1:9");
    config.admin_token = None;
    let error = match waymark_ingest::IngestServer::new(config).await {
        Ok(_) => panic!("the service started without the token its relay needs"),
        Err(error) => format!("{error:#}"),
    };
    assert!(error.contains("admin_token"), "{error}");
    assert!(error.contains("WAYMARK_ADMIN_TOKEN"), "{error}");
}
