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
use waymark_kit::outbox::{RelayConfig, Wakeup};
use waymark_kit::service::{Runtime, Schema};
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
        let core = self.core.clone();
        let mut runtime = Runtime::start(
            self.db.clone(),
            SCHEMA,
            self.config.auto_migrate,
            &[GRPC_SERVICE],
            shutdown,
            move || {
                let core = core.clone();
                async move { Ok(core.refresh_suppressions().await?) }
            },
        )
        .await;
        runtime.relay(vec![self.relay], &self.wakeup);
        let (core, readiness) = (self.core.clone(), runtime.readiness().clone());
        runtime.spawn_when_serving(move |shutdown| housekeeping(core, readiness, shutdown));

        let read_timeout = Duration::from_secs(self.config.ingest_read_timeout_secs);
        let drain = Duration::from_secs(self.config.drain_secs);
        let readiness = runtime.readiness().clone();
        let http_app = http::router(self.core.clone(), read_timeout).route(
            "/health",
            get(move || async move {
                if readiness.is_serving() {
                    (axum::http::StatusCode::OK, "serving")
                } else {
                    (axum::http::StatusCode::SERVICE_UNAVAILABLE, "not serving")
                }
            }),
        );
        tracing::info!(addr = ?http.local_addr().ok(), "http server listening");
        let http_server = http::serve(http, http_app, read_timeout, {
            let shutdown = runtime.shutdown().clone();
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
            drain,
        };
        let routes =
            tonic::service::Routes::new(grpc::WriteKeyAuth::new(self.core.clone(), grpc_service));
        runtime
            .serve(grpc, routes, options, async {
                http_server.await;
                Ok(())
            })
            .await
    }
}

/// The ingestion service's schema.
pub const SCHEMA: Schema = Schema {
    service: SERVICE,
    migrations: store::MIGRATIONS,
};

/// Applies the ingestion service's pending migrations to `db`.
pub async fn migrate(db: &DatabaseConnection) -> anyhow::Result<usize> {
    SCHEMA.migrate(db).await
}

/// Retention every minute and suppression refresh every ten seconds, while serving.
async fn housekeeping(core: Ingestor, readiness: Readiness, shutdown: CancellationToken) {
    // Start-up has just refreshed the suppressions, so the first refresh is one period away.
    let period = Duration::from_secs(10);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
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
