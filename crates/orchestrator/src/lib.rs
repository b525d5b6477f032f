//! Waymark orchestrator: runs journeys in real time on the profile service's resolved
//! events (entries, condition and random splits, delays, waits for events, messages,
//! webhooks, trait updates and escalations) under one contact policy shared by every
//! journey, with durable timers and outbound actions that take effect once per step.

pub mod engine;
pub mod error;
pub mod grpc;
pub mod journey;
mod metrics;
pub mod model;
pub mod policy;
pub mod schedule;
pub mod service;
pub mod store;
pub mod template;
pub mod webhook;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sea_orm::DatabaseConnection;
use tokio::net::TcpListener;
use waymark_kit::CancellationToken;
use waymark_kit::config::Config;
use waymark_kit::grpc::ServeOptions;
use waymark_kit::outbox::{RelayConfig, Wakeup};
use waymark_kit::service::{Runtime, Schema};
use waymark_kit::sink::EventSinkServer;
use waymark_profile_cache::ProfileCache;
use waymark_proto::orchestration::v1::orchestration_service_server::OrchestrationServiceServer;

pub use service::{Clock, Orchestrator, Peers, Settings};

/// Name under which migrations are recorded.
pub const SERVICE: &str = "orchestrator";
/// The gRPC service name, for health checks.
pub const GRPC_SERVICE: &str = "waymark.orchestration.v1.OrchestrationService";
/// Consumers of journey step events.
pub const CONSUMERS: [&str; 1] = ["analytics"];
/// The emotion labels, mildest last, as the profile service names them.
pub const EMOTION_LABELS: [&str; 5] = ["upset", "unhappy", "neutral", "satisfied", "delighted"];

/// The orchestrator, connected but not yet serving.
pub struct OrchestratorServer {
    config: Config,
    db: DatabaseConnection,
    core: Orchestrator,
    wakeup: Wakeup,
    relay: RelayConfig,
}

impl OrchestratorServer {
    /// Opens the database pool (lazily), the profile cache and the outbound channels.
    pub async fn new(config: Config) -> anyhow::Result<Self> {
        Self::with_clock(config, Clock::default()).await
    }

    /// As [`OrchestratorServer::new`], with time taken from `clock` (tests move it).
    pub async fn with_clock(config: Config, clock: Clock) -> anyhow::Result<Self> {
        let relay = config.relay(SERVICE, CONSUMERS[0], &config.analytics_endpoint)?;
        let db = waymark_kit::db::connect(
            &config.orchestrator_database(),
            SERVICE,
            config.database_max_connections,
        )
        .await
        .context("opening the orchestrator database")?;
        let ttl = Duration::from_secs(config.profile_cache_ttl_secs);
        let cache = match &config.redis_url {
            Some(url) => ProfileCache::redis(url, &config.profile_cache_key_prefix, ttl)
                .context("opening the profile cache")?
                .with_near_cache(
                    config.profile_near_cache_capacity,
                    Duration::from_millis(config.profile_near_cache_ttl_ms),
                )
                .with_identifier_hasher(config.identifier_hasher()),
            None => ProfileCache::in_memory(config.profile_cache_capacity, ttl),
        };
        let signer = webhook::Signer::new(config.webhook_secret.expose())
            .map_err(|e| anyhow::anyhow!("invalid setting `webhook_secret`: {e}"))?;
        let sender =
            webhook::WebhookSender::new(signer, Duration::from_secs(config.webhook_timeout_secs));
        let peers = Peers::new(
            sender,
            config.message_webhook_url.clone(),
            config.escalation_webhook_url.clone(),
            Some(&config.profile_endpoint),
            Some(&config.ingest_endpoint),
            config.admin_token.clone(),
        )?;
        let settings = Settings {
            emotion: waymark_profile::emotion::EmotionRules {
                half_life: Duration::from_secs(config.emotion_half_life_secs),
            },
            dedupe_window_us: waymark_kit::time::duration_micros(Duration::from_secs(
                config.outbox_retention_secs.max(config.dedupe_window_secs),
            )),
            ..Settings::default()
        };
        let wakeup = Wakeup::default();
        let consumers = CONSUMERS.iter().map(|c| (*c).to_owned()).collect();
        let core = Orchestrator::new(
            db.clone(),
            cache,
            peers,
            clock,
            settings,
            consumers,
            wakeup.clone(),
        );
        Ok(Self {
            config,
            db,
            core,
            wakeup,
            relay,
        })
    }

    /// The core, for in-process callers.
    pub fn core(&self) -> &Orchestrator {
        &self.core
    }

    /// Applies pending migrations.
    pub async fn migrate(&self) -> anyhow::Result<usize> {
        SCHEMA.migrate(&self.db).await
    }

    /// Serves gRPC (OrchestrationService and EventSink) on `grpc` until `shutdown`, with
    /// the timers, the action dispatcher and the relay of step events to analytics.
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
        runtime.relay(vec![self.relay], &self.wakeup);
        let core = self.core.clone();
        runtime.spawn_when_serving(move |shutdown| async move { core.run_timers(shutdown).await });
        let core = self.core.clone();
        runtime
            .spawn_when_serving(move |shutdown| async move { core.run_dispatcher(shutdown).await });
        let core = self.core.clone();
        runtime.spawn_when_serving(
            move |shutdown| async move { core.run_housekeeping(shutdown).await },
        );

        let adapter = grpc::OrchestratorGrpc::new(self.core.clone());
        let limit = waymark_kit::grpc::MAX_MESSAGE_BYTES;
        let routes = tonic::service::Routes::new(
            OrchestrationServiceServer::new(adapter.clone())
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

/// The orchestrator's schema.
pub const SCHEMA: Schema = Schema {
    service: SERVICE,
    migrations: store::MIGRATIONS,
};

/// Applies the orchestrator's pending migrations to `db`.
pub async fn migrate(db: &DatabaseConnection) -> anyhow::Result<usize> {
    SCHEMA.migrate(db).await
}
