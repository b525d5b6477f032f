//! Waymark ingestion: Segment-compatible HTTP and gRPC intake. Events are validated,
//! deduplicated by messageId, committed durably (group commit) together with their outbox
//! rows, and relayed to the profile service's `EventSink`.

pub mod channel;
pub mod committer;
pub mod error;
pub mod grpc;
pub mod http;
mod metrics;
pub mod service;
pub mod store;
pub mod validate;
pub mod wire;

use std::time::Duration;

use anyhow::Context;
use axum::routing::get;
use sea_orm::DatabaseConnection;
use tokio::net::TcpListener;
use waymark_kit::CancellationToken;
use waymark_kit::config::Config;
use waymark_kit::grpc::{Readiness, ServeOptions};
use waymark_kit::outbox::admin::OutboxAdmin;
use waymark_kit::outbox::{RelayConfig, Wakeup};
use waymark_proto::ingest::v1::ingest_service_server::IngestServiceServer;

pub use service::{IngestSettings, Ingestor};

/// Name under which migrations are recorded.
pub const SERVICE: &str = "ingest";
/// The consumer every committed event is relayed to.
pub const PROFILE_CONSUMER: &str = "profile";
/// The gRPC service name, for health checks.
pub const GRPC_SERVICE: &str = "waymark.ingest.v1.IngestService";

/// The ingestion service, connected but not yet serving.
pub struct IngestServer {
    config: Config,
    db: DatabaseConnection,
    core: Ingestor,
    wakeup: Wakeup,
    relay: RelayConfig,
}

impl IngestServer {
    /// Opens the database pool (lazily: the service starts even while it is down) and
    /// builds the core.
    pub async fn new(config: Config) -> anyhow::Result<Self> {
        let db = waymark_kit::db::connect(
            &config.ingest_database(),
            SERVICE,
            config.database_max_connections,
        )
        .await
        .context("opening the ingest database")?;
        let mut relay = config.relay(SERVICE, PROFILE_CONSUMER, &config.profile_endpoint)?;
        let wakeup = Wakeup::default();
        let concurrent = store::concurrent_writers(&db);
        relay.workers = if concurrent { 2 } else { 1 };
        let settings = IngestSettings {
            dedupe_window: Duration::from_secs(config.dedupe_window_secs),
            retention: Duration::from_secs(config.retention_secs),
            default_rate_limit: config.default_rate_limit_per_second,
            consumers: vec![PROFILE_CONSUMER.to_owned()],
            committers: if concurrent { 3 } else { 1 },
            identity: config.identity_rules()?,
            hasher: config.identifier_hasher(),
        };
        let core = Ingestor::new(db.clone(), settings, wakeup.clone());
        Ok(Self {
            config,
            db,
            core,
            wakeup,
            relay,
        })
    }

    /// The ingestion core, for in-process callers such as `waymark dev`.
    pub fn core(&self) -> &Ingestor {
        &self.core
    }

    /// Applies pending migrations.
    pub async fn migrate(&self) -> anyhow::Result<usize> {
        migrate(&self.db).await
    }

    /// Serves gRPC on `grpc` and HTTP on `http` until `shutdown`, with the relay to the
    /// profile service and the retention sweeper running alongside.
    pub async fn serve(
        self,
        grpc: TcpListener,
        http: TcpListener,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let (reporter, health) = tonic_health::server::health_reporter();
        let readiness = Readiness::new(reporter, &[GRPC_SERVICE]).await;
        let mut tasks = tokio::task::JoinSet::new();

        let (db, core, auto_migrate) =
            (self.db.clone(), self.core.clone(), self.config.auto_migrate);
        tasks.spawn(waymark_kit::grpc::watch_database(
            self.db.clone(),
            readiness.clone(),
            Duration::from_secs(1),
            shutdown.clone(),
            move || {
                let (db, core) = (db.clone(), core.clone());
                async move {
                    if auto_migrate {
                        migrate(&db).await?;
                    } else {
                        let pending =
                            waymark_kit::db::pending(&db, SERVICE, store::MIGRATIONS).await?;
                        anyhow::ensure!(
                            pending.is_empty(),
                            "schema versions {pending:?} not applied; run `waymark migrate`"
                        );
                    }
                    core.refresh_suppressions().await?;
                    Ok(())
                }
            },
        ));

        let relay = self.relay;
        tasks.spawn({
            let (db, wakeup, shutdown) = (self.db.clone(), self.wakeup.clone(), shutdown.clone());
            let readiness = readiness.clone();
            async move {
                readiness.wait_serving(&shutdown).await;
                if let Err(error) =
                    waymark_kit::outbox::run_relay(db, relay, wakeup, shutdown).await
                {
                    tracing::error!(error = %format!("{error:#}"), "relay stopped");
                }
            }
        });
        tasks.spawn(housekeeping(
            self.core.clone(),
            readiness.clone(),
            shutdown.clone(),
        ));

        let read_timeout = Duration::from_secs(self.config.ingest_read_timeout_secs);
        let http_app = http::router(self.core.clone(), read_timeout).route(
            "/health",
            get({
                let readiness = readiness.clone();
                move || async move {
                    if readiness.is_serving() {
                        (axum::http::StatusCode::OK, "serving")
                    } else {
                        (axum::http::StatusCode::SERVICE_UNAVAILABLE, "not serving")
                    }
                }
            }),
        );
        tracing::info!(addr = ?http.local_addr().ok(), "http server listening");
        let http_server = http::serve(http, http_app, read_timeout, {
            let shutdown = shutdown.clone();
            let drain = Duration::from_secs(self.config.drain_secs);
            async move {
                shutdown.cancelled().await;
                tokio::time::sleep(drain).await;
            }
        });

        // A request may make the server hold what an HTTP batch may grow to, counted after
        // decompression (tonic stops inflating at the limit).
        let grpc_service = IngestServiceServer::new(grpc::IngestGrpc::new(self.core.clone()))
            .max_decoding_message_size(validate::MAX_EXPANDED_BATCH_BYTES)
            .max_encoding_message_size(waymark_kit::grpc::MAX_MESSAGE_BYTES)
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
            .send_compressed(tonic::codec::CompressionEncoding::Gzip);
        let options = ServeOptions {
            public_methods: grpc::PUBLIC_METHODS.to_vec(),
            admin_token: self.config.admin_token.clone(),
            drain: Duration::from_secs(self.config.drain_secs),
        };
        let grpc_server = waymark_kit::grpc::serve(
            grpc,
            tonic::service::Routes::new(grpc::WriteKeyAuth::new(self.core.clone(), grpc_service))
                .add_service(OutboxAdmin::server(self.db.clone())),
            health,
            readiness,
            options,
            shutdown.clone(),
        );
        let (http_result, grpc_result) = tokio::join!(
            async {
                http_server.await;
                anyhow::Ok(())
            },
            grpc_server
        );
        shutdown.cancel();
        while tasks.join_next().await.is_some() {}
        http_result?;
        grpc_result
    }
}

/// Applies the ingestion service's pending migrations to `db`.
pub async fn migrate(db: &DatabaseConnection) -> anyhow::Result<usize> {
    waymark_kit::db::migrate(db, SERVICE, store::MIGRATIONS)
        .await
        .context("migrating the ingest database")
}

/// Retention every minute and suppression refresh every ten seconds, while serving.
async fn housekeeping(core: Ingestor, readiness: Readiness, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if !readiness.is_serving() {
            continue;
        }
        if let Err(error) = core.refresh_suppressions().await {
            tracing::warn!(%error, "suppression refresh failed");
        }
        if n.is_multiple_of(6) {
            match core.sweep().await {
                Ok((erased, deleted)) if erased + deleted > 0 => {
                    tracing::info!(erased, deleted, "retention sweep")
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "retention sweep failed"),
            }
        }
        n += 1;
    }
}
