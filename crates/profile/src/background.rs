//! The profile service's background work while serving: pushing suppressions to
//! ingestion, the segment sweeper (backfills and time-based conditions) and the backfill
//! of aggregates new or changed in the configuration.

use std::time::Duration;

use tonic::transport::Channel;
use waymark_kit::CancellationToken;
use waymark_kit::secret::Secret;
use waymark_proto::ingest::v1::SuppressIdentitiesRequest;
use waymark_proto::ingest::v1::ingest_service_client::IngestServiceClient;

use crate::service::{
    AGGREGATE_BACKFILL_EVENTS, AGGREGATE_BACKFILL_PAGE, ProfileError, Profiles, identity,
};

/// Suppressions per `SuppressIdentities` call.
const PUSH_BATCH: u32 = 500;
/// Longest pause between attempts while ingestion is unreachable.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Keeps ingestion's suppression list in step with erasures: pushes every suppression it
/// has not acknowledged, at once after an erasure, and again after failures with backoff.
pub async fn push_suppressions(
    core: Profiles,
    endpoint: String,
    token: Option<Secret>,
    shutdown: CancellationToken,
) {
    let channel = match waymark_kit::grpc::channel(&endpoint) {
        Ok(channel) => channel,
        Err(error) => {
            tracing::error!(%endpoint, error = %format!("{error:#}"), "suppression push disabled");
            return;
        }
    };
    let mut client = IngestServiceClient::new(channel);
    let mut backoff = Duration::from_millis(200);
    loop {
        let pause = match push_once(&core, &mut client, token.as_ref()).await {
            Ok(0) => {
                backoff = Duration::from_millis(200);
                // Also poll: another replica may have erased a profile.
                tokio::select! {
                    () = core.suppressions_added() => continue,
                    () = tokio::time::sleep(Duration::from_secs(30)) => continue,
                    () = shutdown.cancelled() => return,
                }
            }
            Ok(_) => Duration::ZERO,
            Err(error) => {
                tracing::warn!(%endpoint, %error, retry_in_ms = backoff.as_millis() as u64, "pushing suppressions to ingestion failed");
                let pause = backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                pause
            }
        };
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// Pushes one batch; returns how many suppressions it settled.
async fn push_once(
    core: &Profiles,
    client: &mut IngestServiceClient<Channel>,
    token: Option<&Secret>,
) -> anyhow::Result<usize> {
    let push = core.unsynced_suppressions(PUSH_BATCH).await?;
    if !push.is_empty() {
        let mut request = tonic::Request::new(SuppressIdentitiesRequest {
            identities: push.iter().map(identity).collect(),
            // The list holds keyed hashes only; ingestion stores them as they are.
            hashed: true,
        });
        if let Some(token) = token {
            request
                .metadata_mut()
                .insert("authorization", waymark_kit::grpc::bearer(token));
        }
        waymark_kit::telemetry::inject_trace_context(request.metadata_mut());
        client.suppress_identities(request).await?;
        core.mark_suppressions_synced(&push).await?;
        tracing::info!(identities = push.len(), "suppressions pushed to ingestion");
    }
    Ok(push.len())
}

/// Every second, writes the cache tombstones of erased profiles that did not reach Redis
/// (on any replica), so a profile erased while Redis was away is out of it once it is back.
pub async fn settle_tombstones(core: Profiles, shutdown: CancellationToken) {
    loop {
        match core.settle_tombstones().await {
            Ok(0) => {}
            Ok(pending) => tracing::debug!(pending, "cache tombstones still pending"),
            Err(error) => tracing::warn!(%error, "settling cache tombstones failed"),
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// Logs a periodic pass over profiles; true when it succeeded.
fn logged(outcome: Result<usize, ProfileError>, pass: &str) -> bool {
    match outcome {
        Ok(0) => true,
        Ok(changed) => {
            tracing::info!(profiles = changed, pass, "periodic pass changed profiles");
            true
        }
        Err(error) => {
            tracing::warn!(%error, pass, "periodic pass failed; retrying");
            false
        }
    }
}

/// Loads the segment definitions, then backfills changed ones as soon as they change, and
/// every `every` re-evaluates time-based ones and settles emotion labels decay has moved.
pub async fn sweep_segments(core: Profiles, every: Duration, shutdown: CancellationToken) {
    loop {
        match core.reload_segments().await {
            Ok(()) => break,
            Err(error) => {
                tracing::warn!(%error, "loading segments failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = shutdown.cancelled() => return,
                }
            }
        }
    }
    loop {
        let swept = logged(core.sweep_segments().await, "segment sweep");
        let settled = logged(core.settle_emotions().await, "emotion settling");
        let pause = if swept && settled {
            every
        } else {
            Duration::from_secs(5).min(every)
        };
        tokio::select! {
            () = core.segments_changed() => {}
            () = tokio::time::sleep(pause) => {
                // Definitions may have changed on another replica.
                if let Err(error) = core.reload_segments().await {
                    tracing::warn!(%error, "reloading segments failed");
                }
            }
            () = shutdown.cancelled() => return,
        }
    }
}

/// Backfills the aggregates start-up found new, changed or removed, a page of profiles at
/// a time, until none is left; retries after failures. A process stopped half-way leaves
/// them not backfilled, and the next start goes on from the last page committed.
pub async fn backfill_aggregates(core: Profiles, shutdown: CancellationToken) {
    loop {
        let pause = match core
            .backfill_aggregates(AGGREGATE_BACKFILL_PAGE, AGGREGATE_BACKFILL_EVENTS)
            .await
        {
            Ok(true) => Duration::ZERO,
            Ok(false) => return,
            Err(error) => {
                tracing::warn!(%error, "aggregate backfill failed; retrying");
                Duration::from_secs(5)
            }
        };
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = shutdown.cancelled() => return,
        }
    }
}
