//! Layered configuration: built-in defaults, then an optional TOML file, then `WAYMARK_*`
//! environment variables. Every setting is validated at start-up and errors name the
//! setting and its environment variable.

use std::net::SocketAddr;
use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::secret::Secret;
use crate::telemetry::{LogFormat, TelemetryConfig};

/// Every setting of the platform. Services read the ones they need; per-service
/// overrides (e.g. `ingest_database_url`) win over the shared value.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Shared database URL: `postgres://...` or `sqlite://path?mode=rwc`.
    pub database_url: String,
    /// Database for the ingestion service only; falls back to `database_url`.
    pub ingest_database_url: Option<String>,
    /// Connections per database pool (PostgreSQL; SQLite always uses one writer).
    pub database_max_connections: u32,
    /// Redis for the shared profile cache; an in-process cache when unset.
    pub redis_url: Option<String>,
    /// Bearer token for admin and service-to-service RPCs.
    pub admin_token: Option<Secret>,
    /// OTLP/gRPC collector endpoint, e.g. `http://127.0.0.1:4317`; no export when unset.
    pub otlp_endpoint: Option<String>,
    /// `pretty` or `json`.
    pub log_format: LogFormat,
    /// Log filter directives (RUST_LOG syntax); RUST_LOG wins when set.
    pub log_filter: String,
    /// Which spans are exported over OTLP (RUST_LOG syntax), independent of the log
    /// filter.
    pub trace_filter: String,
    /// Fraction of new traces exported, 0 to 1; a call inside a sampled trace is always
    /// exported.
    pub trace_sample_ratio: f64,
    /// Ingestion gRPC listen address.
    pub ingest_grpc_addr: SocketAddr,
    /// Ingestion Segment-compatible HTTP listen address.
    pub ingest_http_addr: SocketAddr,
    /// The profile service's EventSink, where ingestion relays committed events.
    pub profile_endpoint: String,
    /// Profile gRPC listen address.
    pub profile_grpc_addr: SocketAddr,
    /// Database for the profile service only; falls back to `database_url`.
    pub profile_database_url: Option<String>,
    /// The ingestion service's gRPC API, where the profile service pushes the identifiers
    /// of deleted profiles (`SuppressIdentities`).
    pub ingest_endpoint: String,
    /// Seconds between sweeps that re-evaluate time-based segment conditions (those that
    /// use `now`) and sliding-window aggregates for every profile.
    pub segment_sweep_secs: u64,
    /// Seconds after which a customer's emotion score has halved without new signals.
    pub emotion_half_life_secs: u64,
    /// Aggregates kept on every profile (`ComputedTraits.aggregates`), e.g.
    /// `[{ name = "orders_30d", event = "Order Completed", function = "count",
    /// window_secs = 2592000 }]`. Their shape is checked by the profile service at
    /// start-up ([`Config::profile_aggregate_specs`]).
    pub profile_aggregates: Vec<figment::value::Value>,
    /// The orchestrator's EventSink, where the profile service relays resolved events.
    pub orchestrator_endpoint: String,
    /// The analytics service's EventSink, where the profile service relays resolved events
    /// and the orchestrator its step events.
    pub analytics_endpoint: String,
    /// Orchestrator gRPC listen address.
    pub orchestrator_grpc_addr: SocketAddr,
    /// Database for the orchestrator only; falls back to `database_url`.
    pub orchestrator_database_url: Option<String>,
    /// Analytics gRPC listen address.
    pub analytics_grpc_addr: SocketAddr,
    /// Database for analytics only; falls back to `database_url`.
    pub analytics_database_url: Option<String>,
    /// Milliseconds an analytics query may run before it is stopped with an error.
    pub analytics_query_budget_ms: u64,
    /// Mebibytes an analytics query may hold (groups, paths, durations) before it is
    /// stopped with an error.
    pub analytics_query_memory_mib: u64,
    /// Seconds between write-backs of journey-map stages and stuck flags to profiles.
    pub analytics_write_back_secs: u64,
    /// Where journey messages on channels other than `dev` are posted (signed webhooks).
    pub message_webhook_url: Option<String>,
    /// Where escalations to a human are posted (signed webhooks).
    pub escalation_webhook_url: Option<String>,
    /// The Standard Webhooks secret that signs every outbound webhook (`whsec_` and
    /// base64, or any string of at least 24 characters).
    pub webhook_secret: Secret,
    /// Seconds an outbound webhook attempt may take.
    pub webhook_timeout_secs: u64,
    /// Seconds a profile stays in the shared cache without being rewritten.
    pub profile_cache_ttl_secs: u64,
    /// Prepended to every Redis key, so several environments can share one Redis.
    pub profile_cache_key_prefix: String,
    /// Profiles held by the in-process cache (when no Redis URL is set).
    pub profile_cache_capacity: usize,
    /// Profiles read recently that each process keeps in front of Redis, dropped as soon
    /// as any process announces a newer version; 0 turns the near cache off.
    pub profile_near_cache_capacity: usize,
    /// Longest a profile stays in the near cache, whatever the announcements say.
    pub profile_near_cache_ttl_ms: u64,
    /// Profiles the profile service's applier remembers between batches, so events of
    /// recently active customers resolve without reading them back; 0 turns it off.
    pub applier_memory_profiles: usize,
    /// Trait keys that are identifiers too (e.g. `loyalty_id`), matched like e-mails.
    pub custom_identity_types: Vec<String>,
    /// Key of the HMAC-SHA256 under which identifiers that outlive an erasure
    /// (suppression lists, cache key names) are stored. The same on every replica of
    /// every service, and never changed: hashes under another key match nothing.
    pub identifier_hash_key: Secret,
    /// How many identifiers of a type one profile may hold, overriding the defaults
    /// (`{ user_id = 1, email = 5, phone = 5 }`; 0 means unlimited).
    pub identity_limits: std::collections::BTreeMap<String, u32>,
    /// Identifier types, most trustworthy first: when a merge would break a limit, the
    /// event's least trustworthy identifier is left out. Unlisted types follow in the
    /// default order (user_id, email, phone, custom types, device_id, anonymous_id).
    pub identity_priority: Vec<String>,
    /// Seconds within which a repeated messageId of a source is a duplicate.
    pub dedupe_window_secs: u64,
    /// Seconds the raw event log keeps payloads.
    pub retention_secs: u64,
    /// Events per second per source when a source sets no limit of its own.
    pub default_rate_limit_per_second: u32,
    /// Seconds an HTTP client of ingestion may take to send a request's headers, and again
    /// its body, before the connection is closed (slow clients hold a connection each).
    pub ingest_read_timeout_secs: u64,
    /// Write key `waymark dev` gives its dev source; a fresh one is printed when unset.
    pub dev_write_key: Option<Secret>,
    /// Events per delivery from the outbox relay (deliveries also stay under
    /// `outbox::MAX_DELIVERY_BYTES`).
    pub relay_batch_size: u32,
    /// Longest pause between delivery retries to a failing consumer, in milliseconds.
    pub relay_max_backoff_ms: u64,
    /// Failed deliveries of a batch (other than transient errors such as a consumer that
    /// is down) after which the relay splits it to set the events at fault aside as dead
    /// letters.
    pub relay_max_attempts: u32,
    /// Seconds a relay's claim on outbox rows lasts; one delivery may take a third of it.
    pub relay_lease_secs: u64,
    /// Seconds an event may wait in an outbox undelivered before it is moved to the dead
    /// letters (e.g. a consumer that was never deployed).
    pub outbox_retention_secs: u64,
    /// Seconds dead letters are kept for an operator to retry or drop them.
    pub dead_letter_retention_secs: u64,
    /// Seconds to keep serving in-flight requests after SIGTERM while reporting NotServing.
    pub drain_secs: u64,
    /// Apply pending migrations at start-up (`waymark dev` does); otherwise a service
    /// reports NotServing until `waymark migrate` has run.
    pub auto_migrate: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            database_url: "sqlite://.waymark/waymark.db?mode=rwc".into(),
            ingest_database_url: None,
            database_max_connections: 16,
            redis_url: None,
            admin_token: None,
            otlp_endpoint: None,
            log_format: LogFormat::Pretty,
            log_filter: "info".into(),
            trace_filter: "info".into(),
            trace_sample_ratio: 1.0,
            ingest_grpc_addr: ([0, 0, 0, 0], 50051).into(),
            ingest_http_addr: ([0, 0, 0, 0], 8080).into(),
            profile_endpoint: "http://127.0.0.1:50052".into(),
            profile_grpc_addr: ([0, 0, 0, 0], 50052).into(),
            profile_database_url: None,
            ingest_endpoint: "http://127.0.0.1:50051".into(),
            segment_sweep_secs: 300,
            emotion_half_life_secs: 7 * 24 * 3600,
            profile_aggregates: Vec::new(),
            orchestrator_endpoint: "http://127.0.0.1:50053".into(),
            analytics_endpoint: "http://127.0.0.1:50054".into(),
            orchestrator_grpc_addr: ([0, 0, 0, 0], 50053).into(),
            orchestrator_database_url: None,
            analytics_grpc_addr: ([0, 0, 0, 0], 50054).into(),
            analytics_database_url: None,
            analytics_query_budget_ms: 10_000,
            analytics_query_memory_mib: 1024,
            analytics_write_back_secs: 60,
            message_webhook_url: None,
            escalation_webhook_url: None,
            webhook_secret: Secret::new(DEV_WEBHOOK_SECRET),
            webhook_timeout_secs: 10,
            profile_cache_ttl_secs: 24 * 3600,
            profile_cache_key_prefix: String::new(),
            profile_cache_capacity: 100_000,
            profile_near_cache_capacity: 10_000,
            profile_near_cache_ttl_ms: 5_000,
            applier_memory_profiles: 20_000,
            custom_identity_types: Vec::new(),
            identifier_hash_key: Secret::new(waymark_identity::DEV_HASH_KEY),
            identity_limits: std::collections::BTreeMap::new(),
            identity_priority: Vec::new(),
            dedupe_window_secs: 7 * 24 * 3600,
            retention_secs: 30 * 24 * 3600,
            default_rate_limit_per_second: 50_000,
            ingest_read_timeout_secs: 30,
            dev_write_key: None,
            relay_batch_size: crate::outbox::DEFAULT_BATCH_EVENTS,
            relay_max_backoff_ms: 30_000,
            relay_max_attempts: 8,
            relay_lease_secs: 60,
            outbox_retention_secs: 7 * 24 * 3600,
            dead_letter_retention_secs: 30 * 24 * 3600,
            drain_secs: 5,
            auto_migrate: false,
        }
    }
}

/// The webhook secret `waymark dev` and tests use when none is configured. It is public,
/// so a deployment sets its own (`WAYMARK_WEBHOOK_SECRET`).
pub const DEV_WEBHOOK_SECRET: &str = "whsec_d2F5bWFyay1kZXYtd2ViaG9vay1zZWNyZXQtbm90LWZvci1wcm9k";

/// A setting that failed validation.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or an environment variable could not be parsed.
    #[error("configuration: {0}")]
    Parse(Box<figment::Error>),
    /// A value parsed but is not acceptable.
    #[error("invalid setting `{setting}` (env WAYMARK_{env}): {problem}")]
    Invalid {
        setting: String,
        env: String,
        problem: String,
    },
}

/// `WAYMARK_*` variables that belong to the `waymark` binary rather than to a service:
/// the configuration file and the client verbs' endpoint and write key.
pub const CLIENT_VARIABLES: [&str; 3] = ["config", "endpoint", "write_key"];

impl Config {
    /// Loads defaults, then `file` when given, then `WAYMARK_*` variables, and validates.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        // WAYMARK_CONFIG names the file itself, the client verbs' variables are theirs, and
        // WAYMARK_TEST_* belongs to the test suite; any other unknown WAYMARK_* variable is
        // an error, so typos do not pass silently.
        figment = figment.merge(
            Env::prefixed("WAYMARK_")
                .ignore(&CLIENT_VARIABLES)
                .filter(|key| !key.as_str().to_ascii_lowercase().starts_with("test_")),
        );
        let config: Config = figment
            .extract()
            .map_err(|e| ConfigError::Parse(Box::new(e)))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let databases = [
            ("database_url", Some(&self.database_url)),
            ("ingest_database_url", self.ingest_database_url.as_ref()),
            ("profile_database_url", self.profile_database_url.as_ref()),
            (
                "orchestrator_database_url",
                self.orchestrator_database_url.as_ref(),
            ),
            (
                "analytics_database_url",
                self.analytics_database_url.as_ref(),
            ),
        ];
        for (setting, url) in databases {
            if let Some(url) = url {
                check_database_url(setting, url)?;
            }
        }
        let endpoints = [
            ("orchestrator_endpoint", Some(&self.orchestrator_endpoint)),
            ("analytics_endpoint", Some(&self.analytics_endpoint)),
            ("ingest_endpoint", Some(&self.ingest_endpoint)),
            ("profile_endpoint", Some(&self.profile_endpoint)),
            ("otlp_endpoint", self.otlp_endpoint.as_ref()),
            ("message_webhook_url", self.message_webhook_url.as_ref()),
            (
                "escalation_webhook_url",
                self.escalation_webhook_url.as_ref(),
            ),
        ];
        for (setting, endpoint) in endpoints {
            if endpoint.is_some_and(|e| !e.starts_with("http")) {
                return Err(invalid(setting, "must be an http:// or https:// URL"));
            }
        }
        if let Some(url) = &self.redis_url
            && !(url.starts_with("redis://") || url.starts_with("rediss://"))
        {
            return Err(invalid(
                "redis_url",
                "must start with redis:// or rediss://",
            ));
        }
        let positive = [
            ("emotion_half_life_secs", self.emotion_half_life_secs),
            ("segment_sweep_secs", self.segment_sweep_secs),
            ("profile_cache_ttl_secs", self.profile_cache_ttl_secs),
            (
                "database_max_connections",
                self.database_max_connections.into(),
            ),
            ("dedupe_window_secs", self.dedupe_window_secs),
            ("retention_secs", self.retention_secs),
            (
                "default_rate_limit_per_second",
                self.default_rate_limit_per_second.into(),
            ),
            ("ingest_read_timeout_secs", self.ingest_read_timeout_secs),
            ("webhook_timeout_secs", self.webhook_timeout_secs),
            ("analytics_query_budget_ms", self.analytics_query_budget_ms),
            (
                "analytics_query_memory_mib",
                self.analytics_query_memory_mib,
            ),
            ("analytics_write_back_secs", self.analytics_write_back_secs),
            ("relay_max_attempts", self.relay_max_attempts.into()),
            ("outbox_retention_secs", self.outbox_retention_secs),
            (
                "dead_letter_retention_secs",
                self.dead_letter_retention_secs,
            ),
        ];
        for (setting, value) in positive {
            if value == 0 {
                return Err(invalid(setting, "must be greater than 0"));
            }
        }
        if self.profile_near_cache_ttl_ms == 0 {
            return Err(invalid(
                "profile_near_cache_ttl_ms",
                "must be greater than 0 (set profile_near_cache_capacity to 0 to turn the near cache off)",
            ));
        }
        if !(1..=5000).contains(&self.relay_batch_size) {
            return Err(invalid("relay_batch_size", "must be between 1 and 5000"));
        }
        if self.relay_lease_secs < 3 {
            return Err(invalid("relay_lease_secs", "must be at least 3"));
        }
        if !(0.0..=1.0).contains(&self.trace_sample_ratio) {
            return Err(invalid("trace_sample_ratio", "must be between 0 and 1"));
        }
        if let Err(error) = tracing_subscriber::EnvFilter::try_new(&self.trace_filter) {
            return Err(invalid("trace_filter", &error.to_string()));
        }
        if self
            .admin_token
            .as_ref()
            .is_some_and(|token| token.expose().len() < 16)
        {
            return Err(invalid("admin_token", "must be at least 16 characters"));
        }
        // 32 bytes is the strength of the hash itself; a shorter key is the weak point.
        if self.identifier_hash_key.expose().len() < 32 {
            return Err(invalid(
                "identifier_hash_key",
                "must be at least 32 characters",
            ));
        }
        if self.webhook_secret.expose().len() < 24 {
            return Err(invalid("webhook_secret", "must be at least 24 characters"));
        }
        self.identity_rules()?;
        Ok(())
    }

    /// `profile_aggregates` read as the profile service's spec type; the error names the
    /// entry that does not fit.
    pub fn profile_aggregate_specs<T: serde::de::DeserializeOwned>(
        &self,
    ) -> Result<Vec<T>, ConfigError> {
        self.profile_aggregates
            .iter()
            .enumerate()
            .map(|(i, value)| {
                value.deserialize().map_err(|e| ConfigError::Invalid {
                    setting: format!("profile_aggregates[{i}]"),
                    env: "PROFILE_AGGREGATES".into(),
                    problem: e.to_string(),
                })
            })
            .collect()
    }

    /// The keyed hash of identifiers both ingestion and the profile service store.
    pub fn identifier_hasher(&self) -> waymark_identity::IdentHasher {
        waymark_identity::IdentHasher::new(self.identifier_hash_key.expose().as_bytes())
    }

    /// The identifier types, limits and priorities both ingestion and the profile service
    /// apply; the error names the setting at fault.
    pub fn identity_rules(&self) -> Result<waymark_identity::IdentityRules, ConfigError> {
        waymark_identity::IdentityRules::new(
            self.custom_identity_types.clone(),
            &self.identity_limits,
            &self.identity_priority,
        )
        .map_err(|e| invalid(e.setting, &e.problem))
    }

    /// How `producer` relays to `consumer` at `endpoint`. Every consumer checks the admin
    /// token, so a service whose relay has none stops at start-up instead of accepting
    /// events it could never deliver.
    pub fn relay(
        &self,
        producer: &str,
        consumer: &str,
        endpoint: &str,
    ) -> Result<crate::outbox::RelayConfig, ConfigError> {
        let Some(token) = self.admin_token.clone() else {
            return Err(invalid(
                "admin_token",
                &format!(
                    "is required: the {producer} service relays events to {consumer} ({endpoint}), which accepts them only with this token"
                ),
            ));
        };
        let mut relay =
            crate::outbox::RelayConfig::new(producer, consumer, endpoint.to_owned(), token);
        relay.batch_size = self.relay_batch_size;
        relay.max_backoff = std::time::Duration::from_millis(self.relay_max_backoff_ms);
        relay.max_attempts = self.relay_max_attempts;
        relay.lease = std::time::Duration::from_secs(self.relay_lease_secs);
        relay.delivery_timeout = relay.lease / 3;
        relay.retention = std::time::Duration::from_secs(self.outbox_retention_secs);
        relay.dead_letter_retention =
            std::time::Duration::from_secs(self.dead_letter_retention_secs);
        Ok(relay)
    }

    /// The ingestion service's database URL.
    pub fn ingest_database(&self) -> String {
        self.service_database("ingest", self.ingest_database_url.as_deref())
    }

    /// The profile service's database URL.
    pub fn profile_database(&self) -> String {
        self.service_database("profile", self.profile_database_url.as_deref())
    }

    /// The orchestrator's database URL.
    pub fn orchestrator_database(&self) -> String {
        self.service_database("orchestrator", self.orchestrator_database_url.as_deref())
    }

    /// The analytics database URL.
    pub fn analytics_database(&self) -> String {
        self.service_database("analytics", self.analytics_database_url.as_deref())
    }

    /// A service's database: its own setting, else the shared `database_url`. A shared
    /// SQLite file becomes one file per service beside it (`waymark.db` gives
    /// `waymark-ingest.db`), since SQLite has no schemas to keep services apart.
    fn service_database(&self, service: &str, own: Option<&str>) -> String {
        if let Some(url) = own {
            return url.to_owned();
        }
        let shared = &self.database_url;
        if !shared.starts_with("sqlite:") {
            return shared.clone();
        }
        let (path, query) = shared.split_once('?').unwrap_or((shared, ""));
        let stem = path.strip_suffix(".db").unwrap_or(path);
        let query = if query.is_empty() {
            String::new()
        } else {
            format!("?{query}")
        };
        format!("{stem}-{service}.db{query}")
    }

    /// Telemetry settings for one service.
    pub fn telemetry(&self, service_name: &str) -> TelemetryConfig {
        TelemetryConfig {
            service_name: service_name.to_owned(),
            log_format: self.log_format,
            log_filter: self.log_filter.clone(),
            trace_filter: self.trace_filter.clone(),
            trace_sample_ratio: self.trace_sample_ratio,
            otlp_endpoint: self.otlp_endpoint.clone(),
        }
    }
}

fn invalid(setting: &'static str, problem: &str) -> ConfigError {
    ConfigError::Invalid {
        setting: setting.to_owned(),
        env: setting.to_uppercase(),
        problem: problem.to_owned(),
    }
}

fn check_database_url(setting: &'static str, url: &str) -> Result<(), ConfigError> {
    if url.starts_with("postgres://")
        || url.starts_with("postgresql://")
        || url.starts_with("sqlite:")
    {
        Ok(())
    } else {
        Err(invalid(
            setting,
            "must start with postgres://, postgresql:// or sqlite:",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn services_share_postgres_but_get_their_own_sqlite_file() {
        let postgres = Config {
            database_url: "postgres://db/waymark".into(),
            ..Config::default()
        };
        assert_eq!(postgres.ingest_database(), "postgres://db/waymark");
        assert_eq!(postgres.profile_database(), "postgres://db/waymark");
        let sqlite = Config {
            database_url: "sqlite://.waymark/waymark.db?mode=rwc".into(),
            profile_database_url: Some("sqlite:///var/profile.db".into()),
            ..Config::default()
        };
        assert_eq!(
            sqlite.ingest_database(),
            "sqlite://.waymark/waymark-ingest.db?mode=rwc"
        );
        assert_eq!(sqlite.profile_database(), "sqlite:///var/profile.db");
    }

    #[test]
    fn errors_name_the_setting_and_its_variable() {
        let config = Config {
            database_url: "mysql://x".into(),
            ..Config::default()
        };
        let message = config.validate().unwrap_err().to_string();
        assert!(message.contains("`database_url`"), "{message}");
        assert!(message.contains("WAYMARK_DATABASE_URL"), "{message}");
    }

    #[test]
    // Jail's closure signature is figment's, error size included.
    #[allow(clippy::result_large_err)]
    fn aggregate_entries_that_do_not_fit_are_named() {
        #[derive(Debug, PartialEq, serde::Deserialize)]
        struct Spec {
            name: String,
            window_secs: Option<u64>,
        }
        figment::Jail::expect_with(|jail| {
            jail.set_env(
                "WAYMARK_PROFILE_AGGREGATES",
                r#"[{name = "a", window_secs = 60}]"#,
            );
            let specs: Vec<Spec> = Config::load(None)
                .expect("loads")
                .profile_aggregate_specs()
                .expect("fits");
            let expected = Spec {
                name: "a".into(),
                window_secs: Some(60),
            };
            assert_eq!(specs, [expected]);
            jail.set_env(
                "WAYMARK_PROFILE_AGGREGATES",
                r#"[{name = "a", window_secs = 60}, {name = "b", window_secs = "soon"}]"#,
            );
            let config = Config::load(None).expect("loads");
            let message = config
                .profile_aggregate_specs::<Spec>()
                .unwrap_err()
                .to_string();
            assert!(message.contains("`profile_aggregates[1]`"), "{message}");
            assert!(message.contains("WAYMARK_PROFILE_AGGREGATES"), "{message}");
            Ok(())
        });
    }

    #[test]
    // Jail's closure signature is figment's, error size included.
    #[allow(clippy::result_large_err)]
    fn file_then_environment_override_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "waymark.toml",
                "dedupe_window_secs = 60\nretention_secs = 120\n",
            )?;
            jail.set_env("WAYMARK_RETENTION_SECS", "240");
            jail.set_env("WAYMARK_TEST_POSTGRES_URL", "postgres://ignored");
            jail.set_env("WAYMARK_WRITE_KEY", "wk_for_the_client_verbs");
            let config = Config::load(Some(Path::new("waymark.toml"))).expect("loads");
            assert_eq!(config.dedupe_window_secs, 60);
            assert_eq!(config.retention_secs, 240);
            jail.set_env("WAYMARK_RETENTON_SECS", "1");
            let typo = Config::load(None).unwrap_err().to_string();
            assert!(typo.contains("retenton_secs"), "{typo}");
            Ok(())
        });
    }

    #[test]
    fn secrets_are_not_debug_printed() {
        let config = Config {
            admin_token: Some(Secret::new("super-secret-admin-token")),
            ..Config::default()
        };
        assert!(!format!("{config:?}").contains("super-secret"));
    }

    #[test]
    fn identifier_hash_key_is_checked_and_used() {
        let short = Config {
            identifier_hash_key: Secret::new("too-short"),
            ..Config::default()
        };
        let error = short.validate().unwrap_err().to_string();
        assert!(error.contains("identifier_hash_key"), "{error}");
        assert!(!format!("{short:?}").contains("too-short"));
        let own = Config {
            identifier_hash_key: Secret::new("an-own-key-of-at-least-32-characters"),
            ..Config::default()
        };
        own.validate().unwrap();
        assert_ne!(
            own.identifier_hasher().hash("email", "ada@example.com"),
            Config::default()
                .identifier_hasher()
                .hash("email", "ada@example.com")
        );
    }
}
