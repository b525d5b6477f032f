//! What every service does around its own API, written once: follow the database
//! (apply or check migrations, then the service's own preparation, before reporting
//! Serving), run the outbox relays and background tasks once serving, serve gRPC with
//! health, reflection, admin auth and the outbox admin service, drain, and stop every
//! task on the way out.

use std::future::Future;
use std::time::Duration;

use sea_orm::DatabaseConnection;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

use crate::db::Migration;
use crate::grpc::{Readiness, ServeOptions};
use crate::outbox::admin::OutboxAdmin;
use crate::outbox::{RelayConfig, Wakeup};

/// How often the database is checked while serving.
const DATABASE_CHECK_EVERY: Duration = Duration::from_secs(1);

/// A service's schema: its name in the migrations table and its migrations.
#[derive(Clone, Copy)]
pub struct Schema {
    pub service: &'static str,
    pub migrations: &'static [Migration],
}

impl Schema {
    /// Applies the pending migrations; returns how many.
    pub async fn migrate(&self, db: &DatabaseConnection) -> anyhow::Result<usize> {
        use anyhow::Context;
        crate::db::migrate(db, self.service, self.migrations)
            .await
            .with_context(|| format!("migrating the {} database", self.service))
    }

    /// Applies the pending migrations when `auto_migrate`; otherwise fails while any is
    /// pending, so the service stays NotServing until `waymark migrate` has run.
    async fn ready(&self, db: &DatabaseConnection, auto_migrate: bool) -> anyhow::Result<()> {
        if auto_migrate {
            self.migrate(db).await?;
            return Ok(());
        }
        let pending = crate::db::pending(db, self.service, self.migrations).await?;
        anyhow::ensure!(
            pending.is_empty(),
            "schema versions {pending:?} not applied; run `waymark migrate`"
        );
        Ok(())
    }
}

/// A service on its way to serving: its readiness, the tasks that run beside its API,
/// and the shutdown they all follow.
pub struct Runtime {
    db: DatabaseConnection,
    readiness: Readiness,
    health: tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>,
    tasks: JoinSet<()>,
    shutdown: CancellationToken,
}

impl Runtime {
    /// Reports `grpc_services` NotServing, then follows the database: whenever it is
    /// reachable again, the schema is made current (see [`Schema`]) and `prepare` runs,
    /// and only then does the service report Serving.
    pub async fn start<F, Fut>(
        db: DatabaseConnection,
        schema: Schema,
        auto_migrate: bool,
        grpc_services: &[&str],
        shutdown: CancellationToken,
        prepare: F,
    ) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let reporter = tonic_health::server::HealthReporter::new();
        let health = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(reporter.clone()),
        );
        let readiness = Readiness::new(reporter, grpc_services).await;
        let mut tasks = JoinSet::new();
        let check_db = db.clone();
        tasks.spawn(crate::grpc::watch_database(
            db.clone(),
            readiness.clone(),
            DATABASE_CHECK_EVERY,
            shutdown.clone(),
            move || {
                let db = check_db.clone();
                let prepared = prepare();
                async move {
                    schema.ready(&db, auto_migrate).await?;
                    prepared.await
                }
            },
        ));
        Self {
            db,
            readiness,
            health,
            tasks,
            shutdown,
        }
    }

    /// Whether the service reports Serving, for handlers outside gRPC (an HTTP health
    /// route) and tasks that pause while it does not.
    pub fn readiness(&self) -> &Readiness {
        &self.readiness
    }

    /// The shutdown every task follows.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Runs `task` beside the API once the service first reports Serving; it is given the
    /// shutdown token and must return soon after it is cancelled.
    pub fn spawn_when_serving<F, Fut>(&mut self, task: F)
    where
        F: FnOnce(CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (readiness, shutdown) = (self.readiness.clone(), self.shutdown.clone());
        self.tasks.spawn(async move {
            readiness.wait_serving(&shutdown).await;
            task(shutdown).await;
        });
    }

    /// Delivers the outbox to each relay's consumer once serving.
    pub fn relay(&mut self, relays: Vec<RelayConfig>, wakeup: &Wakeup) {
        for relay in relays {
            let (db, wakeup) = (self.db.clone(), wakeup.clone());
            self.spawn_when_serving(move |shutdown| async move {
                if let Err(error) = crate::outbox::run_relay(db, relay, wakeup, shutdown).await {
                    tracing::error!(error = %format!("{error:#}"), "relay stopped");
                }
            });
        }
    }

    /// Serves `routes` (plus the outbox admin service, health and reflection) on
    /// `listener`, and `alongside` (an HTTP server that also stops on shutdown, or
    /// nothing) at the same time, until shutdown; then drains, stops every task and
    /// returns the first error.
    pub async fn serve(
        mut self,
        listener: TcpListener,
        routes: Routes,
        options: ServeOptions,
        alongside: impl Future<Output = anyhow::Result<()>>,
    ) -> anyhow::Result<()> {
        let routes = routes.add_service(OutboxAdmin::server(self.db.clone()));
        let grpc = crate::grpc::serve(
            listener,
            routes,
            self.health,
            self.readiness.clone(),
            options,
            self.shutdown.clone(),
        );
        let (grpc_result, other_result) = tokio::join!(grpc, alongside);
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
        grpc_result.and(other_result)
    }
}
