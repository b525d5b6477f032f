//! Shared integration-test harness: a fresh database per test (PostgreSQL or SQLite), a
//! real `EventSink` server standing in for a downstream service, a TCP proxy that can
//! cut a dependency off, a Redis server to stop and restart, a webhook endpoint
//! (`webhooks`), the real services booted in-process (`platform`), the one way tests wait
//! (`poll`) and an event builder (`event`).

pub mod event;
pub mod platform;
pub mod poll;
pub mod webhooks;

pub use event::EventBuilder;
pub use poll::{PATIENCE, eventually};
pub use webhooks::{WebhookReceiver, WebhookRequest};

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use sea_orm::{ConnectionTrait, Database};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tonic::{Request, Response, Status};
use waymark_proto::common::v1::event_sink_server::{EventSink, EventSinkServer};
use waymark_proto::common::v1::{DeliverRequest, DeliverResponse, Event, RejectedEvent};

/// The admin and service-to-service token of test servers.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// A database that exists for one test: dropped with it, unless the test failed (then it
/// is kept for a look, and its name printed).
pub struct TestDb {
    pub url: String,
    cleanup: Cleanup,
}

enum Cleanup {
    /// Drop this database through the admin URL.
    Postgres { admin_url: String, name: String },
    /// Remove this directory.
    Sqlite(std::path::PathBuf),
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test database kept for inspection: {}", self.url);
            return;
        }
        match &self.cleanup {
            Cleanup::Sqlite(dir) => {
                let _ = std::fs::remove_dir_all(dir);
            }
            Cleanup::Postgres { admin_url, name } => {
                let (admin_url, name) = (admin_url.clone(), name.clone());
                // Drop runs inside the test's runtime, which must not block on itself: a
                // thread of its own with its own runtime does the work.
                let dropped = std::thread::spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .ok()?;
                    runtime.block_on(async {
                        let admin = Database::connect(admin_url.as_str()).await.ok()?;
                        // FORCE ends the connections pools of the test may still hold.
                        let result = admin
                            .execute_unprepared(&format!(
                                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                            ))
                            .await;
                        admin.close().await.ok();
                        result.ok()
                    })
                });
                let _ = dropped.join();
            }
        }
    }
}

impl TestDb {
    pub async fn new(backend: Backend) -> Self {
        let name = format!("wm_test_{}", uuid::Uuid::new_v4().simple());
        match backend {
            Backend::Postgres => {
                let admin_url = std::env::var("WAYMARK_TEST_POSTGRES_URL")
                    .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
                let admin = Database::connect(admin_url.as_str())
                    .await
                    .expect("connect to PostgreSQL");
                admin
                    .execute_unprepared(&format!("CREATE DATABASE {name}"))
                    .await
                    .expect("create test database");
                admin.close().await.ok();
                let base = admin_url
                    .rsplit_once('/')
                    .map_or(admin_url.as_str(), |(b, _)| b);
                Self {
                    url: format!("{base}/{name}"),
                    cleanup: Cleanup::Postgres {
                        admin_url: admin_url.clone(),
                        name,
                    },
                }
            }
            Backend::Sqlite => {
                let dir = std::env::temp_dir().join(&name);
                std::fs::create_dir_all(&dir).expect("temp dir");
                Self {
                    url: format!("sqlite://{}/waymark.db?mode=rwc", dir.display()),
                    cleanup: Cleanup::Sqlite(dir),
                }
            }
        }
    }
}

/// The Redis the tests share (`WAYMARK_TEST_REDIS_URL`); servers keep apart by key prefix.
pub fn redis_url() -> String {
    std::env::var("WAYMARK_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A request carrying the admin token.
pub fn admin<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {ADMIN_TOKEN}").parse().unwrap(),
    );
    request
}

/// A request carrying `key` as bearer token.
pub fn with_key<T>(message: T, key: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    request
}

/// What a [`Sink`] runs when a delivery arrives.
pub type DeliveryHook = Box<dyn Fn() + Send + Sync>;

/// A real `EventSink` server that records what it receives and can be told to fail.
#[derive(Clone, Default)]
pub struct Sink {
    pub received: Arc<Mutex<Vec<Event>>>,
    pub failing: Arc<AtomicBool>,
    pub attempts: Arc<AtomicUsize>,
    pub producers: Arc<Mutex<HashMap<String, usize>>>,
    /// How many events each accepted delivery carried, in order.
    pub deliveries: Arc<Mutex<Vec<usize>>>,
    /// Message ids the sink rejects one by one (`DeliverResponse.rejected`).
    pub rejecting: Arc<Mutex<HashSet<String>>>,
    /// Message ids that make the sink fail a whole batch: with `Internal`, as a consumer
    /// that cannot take an event would; after they are cleared it takes them.
    pub choking: Arc<Mutex<HashSet<String>>>,
    /// Message ids that make the sink fail a whole batch with `Unavailable` (transient).
    pub refusing: Arc<Mutex<HashSet<String>>>,
    /// Milliseconds the sink holds each delivery before answering.
    pub delay_ms: Arc<AtomicU64>,
    /// Runs when a delivery arrives, before it is answered (e.g. cut the database).
    pub on_delivery: Arc<std::sync::Mutex<Option<DeliveryHook>>>,
}

#[tonic::async_trait]
impl EventSink for Sink {
    async fn deliver(
        &self,
        request: Request<DeliverRequest>,
    ) -> Result<Response<DeliverResponse>, Status> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        let has_token = request
            .metadata()
            .get("authorization")
            .is_some_and(|v| v.to_str().unwrap_or_default() == format!("Bearer {ADMIN_TOKEN}"));
        if !has_token {
            return Err(Status::unauthenticated("relay must send the service token"));
        }
        if let Some(hook) = self.on_delivery.lock().unwrap().as_ref() {
            hook();
        }
        let delay = self.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if self.failing.load(Ordering::SeqCst) {
            return Err(Status::unavailable("sink is down"));
        }
        let request = request.into_inner();
        let has =
            |set: &HashSet<String>| request.events.iter().any(|e| set.contains(&e.message_id));
        if has(&*self.choking.lock().await) {
            return Err(Status::internal("sink cannot take this batch"));
        }
        if has(&*self.refusing.lock().await) {
            return Err(Status::unavailable("sink refuses this batch for now"));
        }
        let rejecting = self.rejecting.lock().await.clone();
        let rejected: Vec<RejectedEvent> = request
            .events
            .iter()
            .enumerate()
            .filter(|(_, e)| rejecting.contains(&e.message_id))
            .map(|(i, e)| RejectedEvent {
                index: i as u32,
                event_id: e.event_id.clone(),
                field: format!("events[{i}].message_id"),
                reason: "the sink rejects this message id".into(),
            })
            .collect();
        *self
            .producers
            .lock()
            .await
            .entry(request.producer)
            .or_default() += 1;
        let n = (request.events.len() - rejected.len()) as u32;
        self.deliveries.lock().await.push(request.events.len());
        self.received.lock().await.extend(
            request
                .events
                .into_iter()
                .filter(|e| !rejecting.contains(&e.message_id)),
        );
        Ok(Response::new(DeliverResponse {
            applied: n,
            rejected,
            ..DeliverResponse::default()
        }))
    }
}

impl Sink {
    /// Starts the sink on a loopback port; returns its endpoint URL.
    pub async fn start(&self) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // As large a request as a real consumer accepts.
        let service = EventSinkServer::new(self.clone())
            .max_decoding_message_size(waymark_kit::grpc::MAX_MESSAGE_BYTES);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        format!("http://{addr}")
    }

    /// Waits until at least `n` events arrived; returns what arrived.
    pub async fn wait_for(&self, n: usize) -> Vec<Event> {
        eventually(&format!("{n} events at the sink"), PATIENCE, async || {
            let received = self.received.lock().await;
            if received.len() >= n {
                Ok(received.clone())
            } else {
                Err(format!("{} events", received.len()))
            }
        })
        .await
    }

    /// Waits for an event that satisfies `wanted`; `what` names it in the failure.
    pub async fn wait_for_event(&self, what: &str, wanted: impl Fn(&Event) -> bool) -> Event {
        eventually(
            &format!("the sink to receive {what}"),
            PATIENCE,
            async || {
                self.received
                    .lock()
                    .await
                    .iter()
                    .find(|e| wanted(e))
                    .cloned()
            },
        )
        .await
    }
}

/// A TCP proxy in front of PostgreSQL that can cut every connection, to make the database
/// unreachable without touching the real server, or lose one reply on its way back.
pub struct Proxy {
    pub addr: SocketAddr,
    open: Arc<AtomicBool>,
    connections: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    lose: Arc<std::sync::Mutex<Option<Loss>>>,
}

/// Replies to lose: those containing `pattern`, the first one or every one, and how many
/// were lost so far.
struct Loss {
    pattern: Vec<u8>,
    every: bool,
    lost: usize,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let connections: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let lose: Arc<std::sync::Mutex<Option<Loss>>> = Arc::default();
        let (open2, connections2, lose2) = (open.clone(), connections.clone(), lose.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if !open2.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let lose = lose2.clone();
                let task = tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        relay_connection(client, server, lose).await;
                    }
                });
                connections2.lock().unwrap().push(task.abort_handle());
            }
        });
        Self {
            addr,
            open,
            connections,
            lose,
        }
    }

    /// Refuses new connections and cuts the existing ones.
    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for c in self.connections.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }

    /// Once: the first reply from the server that contains `pattern` (e.g. the
    /// `UPDATE 3` that completes a statement) never reaches the client, and that
    /// connection is cut. The server has done the work; the client cannot know.
    pub fn lose_reply_containing(&self, pattern: &[u8]) {
        self.lose(pattern, false);
    }

    /// As [`Proxy::lose_reply_containing`], for every such reply until
    /// [`Proxy::keep_replies`]: a client that retries at once fails again.
    pub fn lose_every_reply_containing(&self, pattern: &[u8]) {
        self.lose(pattern, true);
    }

    /// Loses no more replies.
    pub fn keep_replies(&self) {
        *self.lose.lock().unwrap() = None;
    }

    /// Replies lost since the last call to lose some.
    pub fn replies_lost(&self) -> usize {
        self.lose.lock().unwrap().as_ref().map_or(0, |l| l.lost)
    }

    fn lose(&self, pattern: &[u8], every: bool) {
        *self.lose.lock().unwrap() = Some(Loss {
            pattern: pattern.to_vec(),
            every,
            lost: 0,
        });
    }
}

async fn relay_connection(
    client: TcpStream,
    server: TcpStream,
    lose: Arc<std::sync::Mutex<Option<Loss>>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upstream = async {
        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
    };
    let downstream = async {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = match server_read.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let chunk = &buffer[..n];
            {
                let mut lose = lose.lock().unwrap();
                if let Some(loss) = lose.as_mut()
                    && (loss.every || loss.lost == 0)
                    && chunk
                        .windows(loss.pattern.len())
                        .any(|w| w == loss.pattern.as_slice())
                {
                    loss.lost += 1;
                    return;
                }
            }
            if client_write.write_all(chunk).await.is_err() {
                return;
            }
        }
    };
    // Whichever side ends first ends the connection, as a cut would.
    tokio::select! {
        () = upstream => {}
        () = downstream => {}
    }
}

/// A Redis server of the test's own, on a free loopback port, that the test can stop and
/// start again: a restart loses every key and the script cache, as a real one does.
pub struct RedisServer {
    port: u16,
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl RedisServer {
    /// Starts `redis-server` (from PATH; `make services` installs it) and waits for PING.
    pub async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = std::env::temp_dir().join(format!("wm-redis-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("redis dir");
        let mut server = Self {
            port,
            dir,
            child: None,
        };
        server.restart().await;
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server: connections drop, every key is gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, empty, and waits until it answers.
    pub async fn restart(&mut self) {
        self.stop();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server on PATH (make services installs it)");
        self.child = Some(child);
        let client = redis::Client::open(self.url()).expect("redis url");
        let what = format!("redis-server on port {} to answer PING", self.port);
        eventually(&what, PATIENCE, async || {
            let mut connection = client.get_multiplexed_async_connection().await.ok()?;
            redis::cmd("PING")
                .query_async::<String>(&mut connection)
                .await
                .ok()
        })
        .await;
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The peak resident memory of this process from a starting point, read from
/// `/proc/self/status`, for tests that bound what a request may cost a server running in
/// the test process. Prepare inputs (and keep them alive) before [`PeakMemory::start`]:
/// the peak then counts what the server, and the client sending, allocated and touched.
/// Each test runs in a process of its own under nextest, so no other test is counted.
pub struct PeakMemory {
    start_kb: u64,
}

impl PeakMemory {
    /// Resets the kernel's peak (VmHWM) to the current resident size (VmRSS) and starts
    /// measuring from there.
    pub fn start() -> Self {
        std::fs::write("/proc/self/clear_refs", "5").expect("reset the peak resident size");
        Self {
            start_kb: status_kb("VmRSS"),
        }
    }

    /// Bytes the peak resident size rose above the start.
    pub fn grown_bytes(&self) -> u64 {
        status_kb("VmHWM").saturating_sub(self.start_kb) * 1024
    }
}

/// A `kB` field of `/proc/self/status`.
fn status_kb(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/self/status"))
}

/// Runs an async test body once per backend.
#[macro_export]
macro_rules! on_both_backends {
    ($name:ident) => {
        mod $name {
            use super::*;
            use $crate::Backend;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name(Backend::Postgres).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name(Backend::Sqlite).await;
            }
        }
    };
}
