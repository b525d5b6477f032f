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
use waymark_kit::grpc::{Readiness, ServeOptions};
use waymark_kit::outbox::admin::OutboxAdmin;
use waymark_kit::outbox::{RelayConfig, Wakeup};
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
        let (reporter, health) = tonic_health::server::health_reporter();
        let readiness =
            Readiness::new(reporter, &[GRPC_SERVICE, "waymark.common.v1.EventSink"]).await;
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
                    core.prepare().await?;
                    Ok(())
                }
            },
        ));
        for relay in self.relays {
            let (db, wakeup, shutdown, readiness) = (
                self.db.clone(),
                self.wakeup.clone(),
                shutdown.clone(),
                readiness.clone(),
            );
            tasks.spawn(async move {
                readiness.wait_serving(&shutdown).await;
                if let Err(error) =
                    waymark_kit::outbox::run_relay(db, relay, wakeup, shutdown).await
                {
                    tracing::error!(error = %format!("{error:#}"), "relay stopped");
                }
            });
        }
        {
            let (core, shutdown, readiness) =
                (self.core.clone(), shutdown.clone(), readiness.clone());
            let (endpoint, token) = (
                self.config.ingest_endpoint.clone(),
                self.config.admin_token.clone(),
            );
            tasks.spawn(async move {
                readiness.wait_serving(&shutdown).await;
                background::push_suppressions(core, endpoint, token, shutdown).await;
            });
        }
        {
            let (core, shutdown, readiness) =
                (self.core.clone(), shutdown.clone(), readiness.clone());
            tasks.spawn(async move {
                readiness.wait_serving(&shutdown).await;
                background::settle_tombstones(core, shutdown).await;
            });
        }
        {
            let (core, shutdown, readiness) =
                (self.core.clone(), shutdown.clone(), readiness.clone());
            let every = Duration::from_secs(self.config.segment_sweep_secs);
            tasks.spawn(async move {
                readiness.wait_serving(&shutdown).await;
                background::sweep_segments(core, every, shutdown).await;
            });
        }
        {
            let (core, shutdown, readiness) =
                (self.core.clone(), shutdown.clone(), readiness.clone());
            tasks.spawn(async move {
                readiness.wait_serving(&shutdown).await;
                background::backfill_aggregates(core, shutdown).await;
            });
        }
        let adapter = grpc::ProfileGrpc::new(self.core.clone());
        let limit = waymark_kit::grpc::MAX_MESSAGE_BYTES;
        let routes = tonic::service::Routes::new(
            ProfileServiceServer::new(adapter.clone())
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
        )
        .add_service(EventSinkServer::new(std::sync::Arc::new(adapter)))
        .add_service(OutboxAdmin::server(self.db.clone()));
        let options = ServeOptions {
            public_methods: Vec::new(),
            admin_token: self.config.admin_token.clone(),
            drain: Duration::from_secs(self.config.drain_secs),
        };
        let result =
            waymark_kit::grpc::serve(grpc, routes, health, readiness, options, shutdown.clone())
                .await;
        shutdown.cancel();
        while tasks.join_next().await.is_some() {}
        result
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

/// Applies the profile service's pending migrations to `db`.
pub async fn migrate(db: &DatabaseConnection) -> anyhow::Result<usize> {
    waymark_kit::db::migrate(db, SERVICE, store::MIGRATIONS)
        .await
        .context("migrating the profile database")
}
