//! Outbound actions leave here. A step commits its action in the ledger first; the
//! dispatcher claims due actions under a lease and performs each: a message on its
//! channel, a webhook, a trait update through the profile service, an escalation. Every
//! attempt of one action carries the same idempotency key (`webhook-id`), so a receiver
//! that dedupes by it sees each step once however often delivery is retried; failures
//! retry with backoff until the attempts run out.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value as Json, json};
use tonic::transport::Channel;
use waymark_kit::CancellationToken;
use waymark_kit::secret::Secret;
use waymark_proto::common::v1::Identity;
use waymark_proto::ingest::v1::ListEventsRequest;
use waymark_proto::ingest::v1::ingest_service_client::IngestServiceClient;
use waymark_proto::profile::v1::profile_service_client::ProfileServiceClient;
use waymark_proto::profile::v1::{
    BatchGetProfilesRequest, GetProfileRequest, GetTimelineRequest, Profile, UpdateTraitsRequest,
};

use super::Orchestrator;
use crate::model::{ActionKind, ActionStatus};
use crate::store::{self, ActionRow, Settlement};
use crate::webhook::{Delivery, WebhookSender, backoff};

/// Actions claimed per round, and sent at once.
const CLAIM: u64 = 256;
const CONCURRENCY: usize = 32;
/// The longest the loop sleeps without looking (retries fall due, other replicas' work).
const IDLE: Duration = Duration::from_millis(200);
/// Timeline entries an escalation carries.
const CASE_TIMELINE: u32 = 20;

/// Whom the orchestrator talks to: the outbound webhook sender, the message and
/// escalation endpoints, the profile service (trait updates, profiles the cache lacks,
/// timelines for cases) and ingestion (past events for simulations).
#[derive(Clone)]
pub struct Peers {
    pub sender: WebhookSender,
    /// Messages on every channel but `dev` are posted here.
    pub message_webhook_url: Option<String>,
    /// Escalations are posted here.
    pub escalation_webhook_url: Option<String>,
    profiles: Option<ProfileServiceClient<Channel>>,
    ingest: Option<IngestServiceClient<Channel>>,
    admin_token: Option<Secret>,
}

impl Peers {
    /// `profile_endpoint` serves ProfileService and `ingest_endpoint` IngestService;
    /// `None` leaves out what needs them.
    pub fn new(
        sender: WebhookSender,
        message_webhook_url: Option<String>,
        escalation_webhook_url: Option<String>,
        profile_endpoint: Option<&str>,
        ingest_endpoint: Option<&str>,
        admin_token: Option<Secret>,
    ) -> anyhow::Result<Peers> {
        let ingest = ingest_endpoint
            .map(waymark_kit::grpc::channel)
            .transpose()?
            .map(|c| {
                IngestServiceClient::new(c)
                    .max_decoding_message_size(waymark_kit::grpc::MAX_MESSAGE_BYTES)
            });
        let profiles = profile_endpoint
            .map(waymark_kit::grpc::channel)
            .transpose()?
            .map(|c| {
                ProfileServiceClient::new(c)
                    .max_decoding_message_size(waymark_kit::grpc::MAX_MESSAGE_BYTES)
            });
        Ok(Peers {
            sender,
            message_webhook_url,
            escalation_webhook_url,
            profiles,
            ingest,
            admin_token,
        })
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(Duration::from_secs(5));
        if let Some(token) = &self.admin_token {
            request
                .metadata_mut()
                .insert("authorization", waymark_kit::grpc::bearer(token));
        }
        request
    }

    /// A page of ingestion's log (newest first) and the next page's token.
    pub async fn past_events(
        &self,
        from: prost_types::Timestamp,
        to: prost_types::Timestamp,
        page_token: String,
    ) -> Result<(Vec<waymark_proto::common::v1::Event>, String), String> {
        let Some(mut client) = self.ingest.clone() else {
            return Err("no ingestion endpoint is configured".into());
        };
        let request = self.request(ListEventsRequest {
            start_time: Some(from),
            end_time: Some(to),
            page_size: 1000,
            page_token,
            ..ListEventsRequest::default()
        });
        match client.list_events(request).await {
            Ok(r) => {
                let r = r.into_inner();
                Ok((r.events, r.next_page_token))
            }
            Err(s) => Err(format!("ingestion: {:?} {}", s.code(), s.message())),
        }
    }

    /// Profiles from the profile service; none when it cannot be reached.
    pub async fn fetch_profiles(&self, ids: &[String]) -> Vec<Profile> {
        let Some(mut client) = self.profiles.clone() else {
            return Vec::new();
        };
        let request = self.request(BatchGetProfilesRequest {
            profile_ids: ids.to_vec(),
        });
        match client.batch_get_profiles(request).await {
            Ok(r) => r.into_inner().profiles,
            Err(status) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "profiles could not be read from the profile service");
                Vec::new()
            }
        }
    }

    /// The profile that owns an identifier, by the profile service; `None` when it is
    /// unknown or the service cannot be reached.
    pub async fn resolve_profile(&self, id_type: &str, value: &str) -> Option<String> {
        let mut client = self.profiles.clone()?;
        let request = self.request(GetProfileRequest {
            profile_id: String::new(),
            identity: Some(Identity {
                r#type: id_type.to_owned(),
                value: value.to_owned(),
            }),
        });
        let profile = client
            .get_profile(request)
            .await
            .ok()?
            .into_inner()
            .profile?;
        Some(profile.profile_id)
    }

    async fn update_traits(&self, payload: &Json) -> Delivery {
        let Some(mut client) = self.profiles.clone() else {
            return Delivery::Rejected {
                reason: "no profile service configured".into(),
            };
        };
        let traits = payload["traits"].as_object().cloned().unwrap_or_default();
        let request = self.request(UpdateTraitsRequest {
            profile_id: payload["profile_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            traits: Some(waymark_proto::json::struct_from_json(traits)),
            source: "orchestrator".into(),
        });
        match client.update_traits(request).await {
            Ok(_) => Delivery::Delivered { status: 200 },
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::InvalidArgument | tonic::Code::NotFound
                ) =>
            {
                Delivery::Rejected {
                    reason: format!("profile service: {}", s.message()),
                }
            }
            Err(s) => Delivery::Retry {
                reason: format!("profile service: {:?} {}", s.code(), s.message()),
            },
        }
    }

    async fn recent_timeline(&self, profile_id: &str) -> Json {
        let Some(mut client) = self.profiles.clone() else {
            return Json::Array(Vec::new());
        };
        let request = self.request(GetTimelineRequest {
            profile_id: profile_id.to_owned(),
            page_size: CASE_TIMELINE,
            ..GetTimelineRequest::default()
        });
        match client.get_timeline(request).await {
            Ok(r) => Json::Array(
                r.into_inner()
                    .entries
                    .iter()
                    .map(|e| {
                        json!({
                            "event_id": e.event_id,
                            "name": e.name,
                            "properties": e.properties.as_ref().map(waymark_proto::json::struct_to_json),
                            "timestamp": e.timestamp.as_ref().map(waymark_kit::time::micros),
                        })
                    })
                    .collect(),
            ),
            Err(_) => Json::Array(Vec::new()),
        }
    }

    /// Performs one action; the same `action_id` on every attempt.
    async fn perform(&self, action: &ActionRow, payload: Json) -> Delivery {
        match action.kind() {
            Some(ActionKind::Message) if action.target == "dev" => {
                tracing::info!(target: "waymark::dev_channel", message = %payload, "dev message");
                Delivery::Delivered { status: 200 }
            }
            Some(ActionKind::Message) => match &self.message_webhook_url {
                Some(url) => self.post(url, &action.action_id, &payload).await,
                None => Delivery::Rejected {
                    reason: format!(
                        "channel `{}` needs WAYMARK_MESSAGE_WEBHOOK_URL, which is not set",
                        action.target
                    ),
                },
            },
            Some(ActionKind::Webhook) => {
                self.post(&action.target, &action.action_id, &payload).await
            }
            Some(ActionKind::UpdateTraits) => self.update_traits(&payload).await,
            Some(ActionKind::Escalate) => match &self.escalation_webhook_url {
                Some(url) => {
                    let mut payload = payload;
                    payload["timeline"] = self.recent_timeline(&action.profile_id).await;
                    self.post(url, &action.action_id, &payload).await
                }
                // The case is recorded and listed; without an endpoint there is nobody
                // else to tell.
                None => Delivery::Delivered { status: 0 },
            },
            None => Delivery::Rejected {
                reason: format!("unknown action kind `{}`", action.kind),
            },
        }
    }

    async fn post(&self, url: &str, id: &str, payload: &Json) -> Delivery {
        let body = serde_json::to_vec(payload).unwrap_or_default();
        self.sender.send(url, id, &body).await
    }
}

impl Orchestrator {
    /// Sends every action due now; returns how many settled.
    pub async fn dispatch_due(&self) -> Result<usize, sea_orm::DbErr> {
        let mut settled = 0;
        loop {
            let now = self.now();
            let claimed =
                store::claim_actions(self.db(), now, self.inner.settings.lease_us, CLAIM).await?;
            let n = claimed.len();
            settled += self.send(claimed).await?;
            if n < CLAIM as usize {
                return Ok(settled);
            }
        }
    }

    /// Sends claimed actions at once, records how each attempt ended in one statement,
    /// and moves on the enrollments whose webhook step settled; returns how many settled.
    async fn send(&self, claimed: Vec<ActionRow>) -> Result<usize, sea_orm::DbErr> {
        if claimed.is_empty() {
            return Ok(0);
        }
        let attempts: Vec<(ActionRow, Settlement)> = futures::stream::iter(claimed)
            .map(|action| async move {
                let settlement = self.attempt(&action).await;
                (action, settlement)
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        let settlements: Vec<Settlement> = attempts.iter().map(|(_, s)| s.clone()).collect();
        let counted: std::collections::HashSet<String> =
            store::settle_actions(self.db(), &settlements, self.now())
                .await?
                .into_iter()
                .collect();
        // A webhook step waits for its outcome: move its enrollment on.
        for (action, s) in &attempts {
            if s.retry_at.is_none()
                && counted.contains(&s.action_id)
                && action.kind() == Some(ActionKind::Webhook)
            {
                let outcome = if s.status == ActionStatus::Sent {
                    Ok(())
                } else {
                    Err(s.reason.as_str())
                };
                self.action_settled(&action.enrollment_id, &action.action_id, outcome)
                    .await?;
            }
        }
        Ok(counted.len())
    }

    /// One attempt at a claimed action, and how it ended.
    #[tracing::instrument(skip_all, fields(action = %action.action_id, kind = %action.kind, attempt = action.attempts))]
    async fn attempt(&self, action: &ActionRow) -> Settlement {
        let settlement = |status, reason: String, retry_at| Settlement {
            action_id: action.action_id.clone(),
            status,
            reason,
            retry_at,
        };
        let payload = match action.payload() {
            Ok(p) => p,
            Err(e) => return settlement(ActionStatus::Failed, e.to_string(), None),
        };
        let started = std::time::Instant::now();
        let outcome = self.inner.peers.perform(action, payload).await;
        let attempts = u32::try_from(action.attempts).unwrap_or(u32::MAX);
        let (status, reason, retry_at) = match outcome {
            Delivery::Delivered { .. } => (ActionStatus::Sent, String::new(), None),
            Delivery::Retry { reason } if attempts < self.inner.settings.max_attempts => {
                let wait = waymark_kit::time::duration_micros(backoff(attempts));
                (
                    ActionStatus::Pending,
                    reason,
                    Some(self.now().saturating_add(wait)),
                )
            }
            Delivery::Retry { reason } | Delivery::Rejected { reason } => {
                (ActionStatus::Failed, reason, None)
            }
        };
        self.inner
            .metrics
            .action(action.kind.as_str(), status, started.elapsed());
        if !reason.is_empty() {
            tracing::info!(action = %action.action_id, kind = %action.kind, attempts, %reason, retrying = retry_at.is_some(), "action not delivered");
        }
        settlement(status, reason, retry_at)
    }

    /// Sends due actions until `shutdown`: those this replica just committed as they are
    /// handed over, the rest (retries, deferred messages, other replicas' expired claims)
    /// as they fall due.
    pub async fn run_dispatcher(&self, shutdown: CancellationToken) {
        let handed = self
            .inner
            .handed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(mut handed) = handed else {
            tracing::error!("the dispatcher runs once per service");
            return;
        };
        loop {
            if let Err(error) = self.dispatch_due().await {
                tracing::warn!(%error, "dispatching actions failed");
            }
            let next = store::next_action_due(self.db()).await.ok().flatten();
            let sleep = super::sleep_until(next, self.now(), IDLE);
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.inner.actions.notified() => {}
                () = tokio::time::sleep(sleep) => {}
                Some(mut fresh) = handed.recv() => {
                    while let Ok(more) = handed.try_recv() {
                        fresh.extend(more);
                    }
                    if let Err(error) = self.send(fresh).await {
                        tracing::warn!(%error, "sending actions failed; they go again when their claim ends");
                    }
                }
            }
        }
    }
}
