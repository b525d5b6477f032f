//! Database connection (PostgreSQL or SQLite through sea-orm) and the migration runner.
//!
//! Migrations are plain SQL per backend, versioned per service in `waymark_migrations`:
//! DDL differences between PostgreSQL and SQLite stay explicit and reviewable.
//!
//! Each service owns a namespace, so services can share one database without their table
//! names meeting (every service has an `outbox`, for one): on PostgreSQL a schema named
//! after the service, selected by the connection's `search_path`; on SQLite its own file
//! (see `Config::service_database`).

use std::time::Duration;

use crate::time::now_micros;

use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, DbErr,
    TransactionTrait,
};

/// One schema change of a service.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Increasing version within the service, starting at 1.
    pub version: i64,
    /// Short description.
    pub name: &'static str,
    /// SQL for PostgreSQL (several statements allowed).
    pub postgres: &'static str,
    /// SQL for SQLite (several statements allowed).
    pub sqlite: &'static str,
}

/// Opens a pool for `service` at `url`. The pool connects lazily so a service can start,
/// report NotServing and recover while its database is unreachable.
pub async fn connect(
    url: &str,
    service: &str,
    max_connections: u32,
) -> Result<DatabaseConnection, DbErr> {
    let mut options = ConnectOptions::new(url.to_owned());
    options
        .connect_timeout(Duration::from_secs(3))
        // Fail fast so callers get UNAVAILABLE instead of hanging while the database is down.
        .acquire_timeout(Duration::from_secs(3))
        .sqlx_logging(false)
        // A connection in steady use is not pinged each time it is handed out (a round
        // trip on every transaction); one idle long enough to have gone stale still is.
        .test_before_acquire_if_idle_for(Duration::from_secs(5))
        .connect_lazy(true);
    if url.starts_with("sqlite:") {
        // SQLite has one writer; a single connection avoids "database is locked" errors,
        // and synchronous=FULL keeps acknowledged commits across power loss.
        options.max_connections(1).min_connections(0);
        options.map_sqlx_sqlite_opts(|o| {
            o.journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Full)
                // Deleted content is overwritten with zeros, not left in free space:
                // an erasure must leave nothing of a person in the file.
                .pragma("secure_delete", "ON")
                .busy_timeout(Duration::from_secs(5))
                .create_if_missing(true)
        });
    } else {
        options
            .max_connections(max_connections)
            .min_connections(0)
            .set_schema_search_path(service);
    }
    Database::connect(options).await
}

/// True when the database answers a trivial query.
pub async fn ping(db: &DatabaseConnection) -> bool {
    db.execute_unprepared("SELECT 1").await.is_ok()
}

/// Begins a transaction that reads before it writes. On SQLite it takes the write lock at
/// once (`BEGIN IMMEDIATE`): a deferred transaction that must upgrade from reading to
/// writing while another connection writes fails at once instead of waiting. PostgreSQL
/// ignores the mode.
pub async fn begin_write(db: &DatabaseConnection) -> Result<sea_orm::DatabaseTransaction, DbErr> {
    use sea_orm::{SqliteTransactionMode, TransactionOptions, TransactionTrait};
    db.begin_with_options(TransactionOptions {
        sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
        ..TransactionOptions::default()
    })
    .await
}

/// `db.client.connection.count{state=idle|used}`, the OpenTelemetry semantic convention
/// for a connection pool's use.
pub struct PoolGauge(opentelemetry::metrics::Gauge<u64>);

impl PoolGauge {
    /// The gauge on the global meter.
    pub fn new() -> Self {
        let meter = opentelemetry::global::meter("waymark");
        Self(
            meter
                .u64_gauge("db.client.connection.count")
                .with_description("connections of the pool by state")
                .build(),
        )
    }

    /// Records the pool's connections now.
    pub fn record(&self, db: &DatabaseConnection) {
        let (size, idle) = match db.get_database_backend() {
            DbBackend::Postgres => {
                let pool = db.get_postgres_connection_pool();
                (pool.size(), pool.num_idle() as u32)
            }
            DbBackend::Sqlite => {
                let pool = db.get_sqlite_connection_pool();
                (pool.size(), pool.num_idle() as u32)
            }
            _ => return,
        };
        use opentelemetry::KeyValue;
        self.0
            .record(u64::from(idle), &[KeyValue::new("state", "idle")]);
        self.0.record(
            u64::from(size.saturating_sub(idle)),
            &[KeyValue::new("state", "used")],
        );
    }
}

impl Default for PoolGauge {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether an error means the database could not be reached (retryable) rather than a
/// bad statement.
pub fn is_unavailable(error: &DbErr) -> bool {
    use sea_orm::RuntimeErr;
    use sea_orm::sqlx::Error as SqlxError;
    match error {
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => true,
        DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e)) => {
            match e.as_ref() {
                SqlxError::Io(_)
                | SqlxError::Tls(_)
                | SqlxError::Protocol(_)
                | SqlxError::PoolTimedOut
                | SqlxError::PoolClosed
                | SqlxError::WorkerCrashed => true,
                // Server shutting down, too many connections, or SQLite busy.
                SqlxError::Database(db) => matches!(
                    db.code().as_deref(),
                    Some("57P01" | "57P02" | "57P03" | "53300" | "5" | "6")
                ),
                _ => false,
            }
        }
        _ => false,
    }
}

/// Applies the service's pending migrations, each in its own transaction. On PostgreSQL an
/// advisory lock serialises replicas that start at the same time.
pub async fn migrate(
    db: &DatabaseConnection,
    service: &str,
    migrations: &[Migration],
) -> Result<usize, DbErr> {
    let backend = db.get_database_backend();
    if backend == DbBackend::Postgres {
        // The connection's search_path names this schema (see `connect`).
        db.execute_unprepared(&format!("CREATE SCHEMA IF NOT EXISTS \"{service}\""))
            .await?;
    }
    db.execute_unprepared(
        "CREATE TABLE IF NOT EXISTS waymark_migrations (
            service TEXT NOT NULL,
            version BIGINT NOT NULL,
            name TEXT NOT NULL,
            applied_at BIGINT NOT NULL,
            PRIMARY KEY (service, version)
        )",
    )
    .await?;
    let mut applied = 0;
    for migration in migrations {
        let txn = db.begin().await?;
        if backend == DbBackend::Postgres {
            txn.execute_unprepared("SELECT pg_advisory_xact_lock(7263542001)")
                .await?;
        }
        let done = crate::sql::query_one(
            &txn,
            "SELECT 1 FROM waymark_migrations WHERE service = ? AND version = ?",
            [service.into(), migration.version.into()],
        )
        .await?
        .is_some();
        if done {
            txn.rollback().await?;
            continue;
        }
        let script = match backend {
            DbBackend::Postgres => migration.postgres,
            _ => migration.sqlite,
        };
        txn.execute_unprepared(script).await?;
        crate::sql::execute(
            &txn,
            "INSERT INTO waymark_migrations (service, version, name, applied_at) VALUES (?, ?, ?, ?)",
            [
                service.into(),
                migration.version.into(),
                migration.name.into(),
                now_micros().into(),
            ],
        )
        .await?;
        txn.commit().await?;
        tracing::debug!(
            service,
            version = migration.version,
            name = migration.name,
            "migration applied"
        );
        applied += 1;
    }
    Ok(applied)
}

/// Versions of `migrations` not yet applied for `service`.
pub async fn pending(
    db: &DatabaseConnection,
    service: &str,
    migrations: &[Migration],
) -> Result<Vec<i64>, DbErr> {
    #[derive(sea_orm::FromQueryResult)]
    struct Applied {
        version: i64,
    }
    let applied: Vec<i64> = match crate::sql::query_as::<Applied, _>(
        db,
        "SELECT version FROM waymark_migrations WHERE service = ?",
        [service.into()],
    )
    .await
    {
        Ok(rows) => rows.into_iter().map(|r| r.version).collect(),
        // No migrations table yet: everything is pending.
        Err(e) if !is_unavailable(&e) => Vec::new(),
        Err(e) => return Err(e),
    };
    Ok(migrations
        .iter()
        .map(|m| m.version)
        .filter(|v| !applied.contains(v))
        .collect())
}

/// After an erasure on SQLite, copies the write-ahead log into the database file and
/// empties it: the log still holds the pages as they were before the erasure. Nothing to
/// do on PostgreSQL, whose dead rows are not readable through the database.
pub async fn forget_overwritten(db: &DatabaseConnection) -> Result<(), DbErr> {
    if db.get_database_backend() == sea_orm::DbBackend::Sqlite {
        db.execute_unprepared("PRAGMA wal_checkpoint(TRUNCATE)")
            .await?;
    }
    Ok(())
}
