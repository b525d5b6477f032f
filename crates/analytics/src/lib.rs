//! Waymark analytics: answers funnels, paths, journey maps (stages with standard times),
//! journey reports and CX metrics from a compact in-memory representation of every event
//! the profile service resolved and every step the orchestrator took. PostgreSQL (SQLite
//! for `waymark dev`) holds what arrived and is the source of truth; memory is rebuilt
//! from it at start-up and kept current as events arrive.

pub mod cx;
pub mod error;
pub mod funnel;
pub mod grpc;
pub mod journeys;
pub mod maps;
pub mod matcher;
mod metrics;
pub mod model;
pub mod paths;
pub mod report;
pub mod scan;
pub mod service;
pub mod stats;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sea_orm::DatabaseConnection;
use tokio::net::TcpListener;
use waymark_kit::CancellationToken;
use waymark_kit::config::Config;
use waymark_kit::grpc::ServeOptions;
use waymark_kit::service::{Runtime, Schema};
use waymark_kit::sink::EventSinkServer;
use waymark_proto::analytics::v1::analytics_service_server::AnalyticsServiceServer;

pub use service::{Analytics, ProfileWriter};

/// Name under which migrations are recorded.
pub const SERVICE: &str = "analytics";
/// The gRPC service name, for health checks.
pub const GRPC_SERVICE: &str = "waymark.analytics.v1.AnalyticsService";

/// How long deliveries must pause before what arrived since the last compaction is
/// compacted.
const COMPACT_WHEN_QUIET: Duration = Duration::from_secs(2);

/// The analytics service, connected but not yet serving.
pub struct AnalyticsServer {
    config: Config,
    db: DatabaseConnection,
    core: Analytics,
}

impl AnalyticsServer {
    /// Opens the database pool (lazily) and the profile service client.
    pub async fn new(config: Config) -> anyhow::Result<Self> {
        let db = waymark_kit::db::connect(
            &config.analytics_database(),
            SERVICE,
            config.database_max_connections,
        )
        .await
        .context("opening the analytics database")?;
        let writer = ProfileWriter::new(&config.profile_endpoint, config.admin_token.clone())?;
        let limits = scan::Limits {
            time: Duration::from_millis(config.analytics_query_budget_ms),
            memory_bytes: usize::try_from(config.analytics_query_memory_mib)
                .unwrap_or(usize::MAX)
                .saturating_mul(1 << 20),
        };
        let core = Analytics::new(db.clone(), limits, Some(writer));
        Ok(Self { config, db, core })
    }

    /// The core, for in-process callers.
    pub fn core(&self) -> &Analytics {
        &self.core
    }

    /// Applies pending migrations.
    pub async fn migrate(&self) -> anyhow::Result<usize> {
        SCHEMA.migrate(&self.db).await
    }

    /// Serves gRPC (AnalyticsService and EventSink) on `grpc` until `shutdown`, with the
    /// periodic write-back of stages to profiles, compaction once deliveries pause and the
    /// scrub of erased profiles' events. Memory is rebuilt from the store before
    /// the service reports Serving; until then every call is UNAVAILABLE, to be retried.
    pub async fn serve(self, grpc: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
        let core = self.core.clone();
        let mut runtime = Runtime::start(
            self.db.clone(),
            SCHEMA,
            self.config.auto_migrate,
            &[GRPC_SERVICE, "waymark.common.v1.EventSink"],
            shutdown,
            move || {
                let core = core.clone();
                async move { Ok(core.prepare().await?) }
            },
        )
        .await;
        let core = self.core.clone();
        let every = Duration::from_secs(self.config.analytics_write_back_secs);
        runtime.spawn_when_serving(move |shutdown| async move {
            core.run_write_back(every, shutdown).await;
        });
        let core = self.core.clone();
        runtime.spawn_when_serving(move |shutdown| async move {
            core.run_compaction(COMPACT_WHEN_QUIET, shutdown).await;
        });
        let core = self.core.clone();
        runtime.spawn_when_serving(move |shutdown| async move {
            core.run_scrub(shutdown).await;
        });
        let adapter = grpc::AnalyticsGrpc::new(self.core.clone());
        let limit = waymark_kit::grpc::MAX_MESSAGE_BYTES;
        let routes = tonic::service::Routes::new(
            AnalyticsServiceServer::new(adapter.clone())
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
        )
        .add_service(EventSinkServer::new(Arc::new(adapter)));
        let options = ServeOptions {
            public_methods: Vec::new(),
            admin_token: self.config.admin_token.clone(),
            drain: Duration::from_secs(self.config.drain_secs),
        };
        runtime.serve(grpc, routes, options, async { Ok(()) }).await
    }
}

/// The analytics schema.
pub const SCHEMA: Schema = Schema {
    service: SERVICE,
    migrations: store::MIGRATIONS,
};

/// Applies the analytics service's pending migrations to `db`.
pub async fn migrate(db: &DatabaseConnection) -> anyhow::Result<usize> {
    SCHEMA.migrate(db).await
}
