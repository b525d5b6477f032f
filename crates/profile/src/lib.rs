//! Waymark customer profile service: resolves every event to one profile (identity
//! resolution with merges, an audit and unmerge), keeps traits, computed traits, emotion,
//! consent, segment memberships and the unified timeline, writes the shared profile cache
//! after each commit, and relays resolved events (plus `Profile Merged`, `Trait Changed`,
//! `Emotion Changed`, `Segment Entered` / `Segment Exited`, `Profile Unmerged` and
//! `Profile Deleted`) to the orchestrator and analytics. Erasure suppresses identifiers
//! here and, pushed in the background, at ingestion.

pub mod aggregate;
mod applier;
pub mod background;
pub mod emotion;
pub mod error;
/// Identifiers, shared with ingestion so both agree on what identifies a customer.
pub use waymark_identity as identity;
pub mod grpc;
mod metrics;
pub mod model;
pub mod resolve;
pub mod segment;
pub mod service;
pub mod store;

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
use waymark_proto::profile::v1::profile_service_server::ProfileServiceServer;

pub use service::Profiles;

/// Name under which migrations are recorded.
pub const SERVICE: &str = "profile";
/// The gRPC service name, for health checks.
pub const GRPC_SERVICE: &str = "waymark.profile.v1.ProfileService";
/// Consumers of resolved events.
pub const CONSUMERS: [&str; 2] = ["orchestrator", "analytics"];

/// The profile service, connected but not yet serving.
pub struct ProfileServer {
    config: Config,
    db: DatabaseConnection,
    core: Profiles,
    wakeup: Wakeup,
    relays: Vec<RelayConfig>,
}

impl ProfileServer {
    /// Opens the database pool (lazily) and the cache (Redis when configured). Fails on
    /// aggregate specs that cannot work, naming the setting.
    pub async fn new(config: Config) -> anyhow::Result<Self> {
        let rules = rules(&config)?;
        let relays = [
            (CONSUMERS[0], &config.orchestrator_endpoint),
            (CONSUMERS[1], &config.analytics_endpoint),
        ]
        .into_iter()
        .map(|(consumer, endpoint)| config.relay(SERVICE, consumer, endpoint))
        .collect::<Result<Vec<_>, _>>()?;
        let db = waymark_kit::db::connect(
            &config.profile_database(),
            SERVICE,
            config.database_max_connections,
        )
        .await
        .context("opening the profile database")?;
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
        let wakeup = Wakeup::default();
        let consumers = CONSUMERS.iter().map(|c| (*c).to_owned()).collect();
        let core = Profiles::new(
            db.clone(),
            cache,
            rules,
            config.identifier_hasher(),
            consumers,
            wakeup.clone(),
            config.applier_memory_profiles,
        );
        Ok(Self {
            config,
            db,
            core,
            wakeup,
            relays,
        })
    }

    /// The core, for in-process callers.
    pub fn core(&self) -> &Profiles {
        &self.core
    }

    /// Applies pending migrations.
    pub async fn migrate(&self) -> anyhow::Result<usize> {
        migrate(&self.db).await
    }

    /// Serves gRPC (ProfileService and EventSink) on `grpc` until `shutdown`, relaying
    /// resolved events to the orchestrator and analytics.
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
        runtime.relay(self.relays, &self.wakeup);
        let (core, endpoint, token) = (
            self.core.clone(),
            self.config.ingest_endpoint.clone(),
            self.config.admin_token.clone(),
        );
        runtime.spawn_when_serving(move |shutdown| {
            background::push_suppressions(core, endpoint, token, shutdown)
        });
        let core = self.core.clone();
        runtime.spawn_when_serving(move |shutdown| background::settle_tombstones(core, shutdown));
        let (core, every) = (
            self.core.clone(),
            Duration::from_secs(self.config.segment_sweep_secs),
        );
        runtime
            .spawn_when_serving(move |shutdown| background::sweep_segments(core, every, shutdown));
        let core = self.core.clone();
        runtime.spawn_when_serving(move |shutdown| background::backfill_aggregates(core, shutdown));

        let adapter = grpc::ProfileGrpc::new(self.core.clone());
        let limit = waymark_kit::grpc::MAX_MESSAGE_BYTES;
        let routes = tonic::service::Routes::new(
            ProfileServiceServer::new(adapter.clone())
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
        )
        .add_service(EventSinkServer::new(std::sync::Arc::new(adapter)));
        let options = ServeOptions {
            public_methods: Vec::new(),
            admin_token: self.config.admin_token.clone(),
            drain: Duration::from_secs(self.config.drain_secs),
        };
        runtime.serve(grpc, routes, options, async { Ok(()) }).await
    }
}

/// The domain settings of `config`, checked.
pub fn rules(config: &Config) -> anyhow::Result<resolve::Rules> {
    let aggregates: Vec<aggregate::AggregateSpec> = config.profile_aggregate_specs()?;
    aggregate::validate(&aggregates)
        .map_err(|e| anyhow::anyhow!("invalid setting `profile_aggregates`: {e}"))?;
    Ok(resolve::Rules {
        identity: config.identity_rules()?,
        emotion: emotion::EmotionRules {
            half_life: Duration::from_secs(config.emotion_half_life_secs),
        },
        aggregates,
    })
}

/// The profile service's schema.
pub const SCHEMA: Schema = Schema {
    service: SERVICE,
    migrations: store::MIGRATIONS,
};

/// Applies the profile service's pending migrations to `db`.
pub async fn migrate(db: &DatabaseConnection) -> anyhow::Result<usize> {
    SCHEMA.migrate(db).await
}
