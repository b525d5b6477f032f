//! `waymark dev`: the platform in one process for a laptop.

use std::path::PathBuf;

use anyhow::Context;
use waymark_kit::CancellationToken;
use waymark_kit::config::Config;
use waymark_kit::secret::Secret;

pub async fn run(mut config: Config, data_dir: PathBuf) -> anyhow::Result<()> {
    let _telemetry = waymark_kit::telemetry::init(&config.telemetry("waymark-dev"))?;
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    // The config gives each service its own file beside this one.
    if std::env::var_os("WAYMARK_DATABASE_URL").is_none() {
        config.database_url = format!("sqlite://{}/waymark.db?mode=rwc", data_dir.display());
    }
    config.auto_migrate = true;
    let admin_token = config
        .admin_token
        .get_or_insert_with(|| Secret::new(format!("dev-admin-{}", uuid::Uuid::new_v4().simple())))
        .clone();

    let shutdown = CancellationToken::new();
    waymark_kit::grpc::cancel_on_signal(shutdown.clone());
    let grpc = crate::bind(config.ingest_grpc_addr).await?;
    let http = crate::bind(config.ingest_http_addr).await?;
    let profile_grpc = crate::bind(config.profile_grpc_addr).await?;
    let orchestrator_grpc = crate::bind(config.orchestrator_grpc_addr).await?;
    let analytics_grpc = crate::bind(config.analytics_grpc_addr).await?;
    let (grpc_addr, http_addr, profile_addr, orchestrator_addr, analytics_addr) = (
        grpc.local_addr()?,
        http.local_addr()?,
        profile_grpc.local_addr()?,
        orchestrator_grpc.local_addr()?,
        analytics_grpc.local_addr()?,
    );
    // Ingestion relays to the profile service in this same process, which pushes the
    // suppressions of erased profiles back to ingestion and relays resolved events to the
    // orchestrator and analytics; the orchestrator relays its steps to analytics, which
    // writes journey-map stages back to the profile service.
    config.profile_endpoint = format!("http://127.0.0.1:{}", profile_addr.port());
    config.ingest_endpoint = format!("http://127.0.0.1:{}", grpc_addr.port());
    config.orchestrator_endpoint = format!("http://127.0.0.1:{}", orchestrator_addr.port());
    config.analytics_endpoint = format!("http://127.0.0.1:{}", analytics_addr.port());
    let analytics = waymark_analytics::AnalyticsServer::new(config.clone()).await?;
    let analytics_migrations = analytics.migrate().await?;
    let orchestrator = waymark_orchestrator::OrchestratorServer::new(config.clone()).await?;
    let orchestrator_migrations = orchestrator.migrate().await?;
    let profile = waymark_profile::ProfileServer::new(config.clone()).await?;
    let profile_migrations = profile.migrate().await?;
    let dev_key = config.dev_write_key.clone();
    let ingest = waymark_ingest::IngestServer::new(config.clone()).await?;
    let ingest_migrations = ingest.migrate().await?;
    let (source_id, write_key) = ingest
        .core()
        .ensure_source_with_key("dev", dev_key.as_ref().map(Secret::expose))
        .await
        .context("creating the dev source")?;

    println!();
    println!("  Waymark dev is running (data in {})", data_dir.display());
    println!("  ingest gRPC      {grpc_addr}");
    println!("  ingest HTTP      http://{http_addr}/v1/batch");
    println!("  profile gRPC     {profile_addr}");
    println!(
        "  orchestrator     {orchestrator_addr} (messages on the `dev` channel are logged here)"
    );
    println!("  analytics        {analytics_addr}");
    println!(
        "  profile cache    {}",
        if config.redis_url.is_some() {
            "redis"
        } else {
            "in-process"
        }
    );
    println!(
        "  ingest database  {}",
        redact_password(&config.ingest_database())
    );
    println!(
        "  profile database {}",
        redact_password(&config.profile_database())
    );
    println!(
        "  orchestrator db  {}",
        redact_password(&config.orchestrator_database())
    );
    println!(
        "  analytics db     {}",
        redact_password(&config.analytics_database())
    );
    println!(
        "  migrations       {} applied now (ingest {ingest_migrations}, profile {profile_migrations}, orchestrator {orchestrator_migrations}, analytics {analytics_migrations}); the list is in the debug log",
        ingest_migrations + profile_migrations + orchestrator_migrations + analytics_migrations
    );
    println!("  dev source       {source_id}");
    println!("  dev write key    {write_key}");
    println!(
        "  admin token      export WAYMARK_ADMIN_TOKEN={}",
        admin_token.expose()
    );
    println!();
    println!(
        "  try: curl -u {write_key}: http://{http_addr}/v1/track -d '{{\"userId\":\"u1\",\"event\":\"Signed Up\"}}'"
    );
    println!();
    let (ingest_result, profile_result, orchestrator_result, analytics_result) = tokio::join!(
        ingest.serve(grpc, http, shutdown.clone()),
        profile.serve(profile_grpc, shutdown.clone()),
        orchestrator.serve(orchestrator_grpc, shutdown.clone()),
        analytics.serve(analytics_grpc, shutdown.clone())
    );
    ingest_result
        .and(profile_result)
        .and(orchestrator_result)
        .and(analytics_result)
}

/// The URL without its credentials, for printing.
fn redact_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***{}", &url[..scheme], &url[at..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn credentials_are_not_printed() {
        assert_eq!(
            super::redact_password("postgres://u:secret@db:5432/w"),
            "postgres://***@db:5432/w"
        );
        assert_eq!(
            super::redact_password("sqlite://.waymark/w.db"),
            "sqlite://.waymark/w.db"
        );
    }
}
