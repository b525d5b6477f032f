//! A real HTTP server standing in for a customer's webhook endpoint: it records every
//! request, checks its Standard Webhooks signature on its own (HMAC-SHA256 of
//! `{id}.{timestamp}.{body}`, written here rather than borrowed from the sender, so a
//! sender's mistake cannot cancel out), and fails on command.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::net::TcpListener;

use crate::{PATIENCE, eventually};

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct WebhookRequest {
    pub path: String,
    /// The `webhook-id`, `webhook-timestamp` and `webhook-signature` headers, when sent.
    pub id: Option<String>,
    pub timestamp: Option<String>,
    pub signature: Option<String>,
    /// The body as JSON, or as a JSON string of its text when it is not JSON.
    pub body: serde_json::Value,
    /// Whether one of the signatures is this request's under the receiver's secret.
    pub signature_valid: bool,
    /// The status the receiver answered.
    pub status: u16,
    pub received_at: Instant,
}

#[derive(Default)]
struct Inner {
    attempts: Vec<WebhookRequest>,
    fail_next: usize,
    status: Option<u16>,
    /// Requests still to be answered late, and how late.
    delay_next: usize,
    delay: std::time::Duration,
}

#[derive(Clone)]
struct Shared {
    key: Arc<Vec<u8>>,
    inner: Arc<Mutex<Inner>>,
}

/// A webhook endpoint on a loopback port that answers 200 unless told otherwise.
pub struct WebhookReceiver {
    url: String,
    shared: Shared,
}

impl WebhookReceiver {
    /// Starts a receiver that checks signatures under `secret` (`whsec_<base64>`, or any
    /// other string as the key's bytes, as senders take it).
    pub async fn start(secret: &str) -> WebhookReceiver {
        let key = match secret.strip_prefix("whsec_") {
            Some(encoded) => STANDARD.decode(encoded).expect("a whsec_ secret is base64"),
            None => secret.as_bytes().to_vec(),
        };
        let shared = Shared {
            key: Arc::new(key),
            inner: Arc::default(),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().fallback(receive).with_state(shared.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        WebhookReceiver {
            url: format!("http://{addr}/webhook"),
            shared,
        }
    }

    /// Where to send webhooks (any other path on the same address is taken too, and
    /// recorded with its path).
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// Answers 503 to the next `n` requests (recorded as attempts), as an endpoint that
    /// is briefly down would.
    pub fn fail_next(&self, n: usize) {
        self.inner().fail_next = n;
    }

    /// Takes the next `n` requests (recorded with the status they get) but answers only
    /// after `delay`, as an endpoint whose reply is lost to the sender's timeout.
    pub fn delay_next(&self, n: usize, delay: std::time::Duration) {
        let mut inner = self.inner();
        inner.delay_next = n;
        inner.delay = delay;
    }

    /// Answers `status` to every request from now on (once `fail_next` has run out).
    pub fn set_status(&self, status: u16) {
        self.inner().status = Some(status);
    }

    /// Every request, in arrival order, whatever it was answered.
    pub fn attempts(&self) -> Vec<WebhookRequest> {
        self.inner().attempts.clone()
    }

    /// The requests answered 2xx, in arrival order.
    pub fn received(&self) -> Vec<WebhookRequest> {
        self.inner()
            .attempts
            .iter()
            .filter(|r| is_success(r.status))
            .cloned()
            .collect()
    }

    /// How many requests carried no valid signature.
    pub fn invalid_signatures(&self) -> usize {
        self.inner()
            .attempts
            .iter()
            .filter(|r| !r.signature_valid)
            .count()
    }

    /// How many distinct `webhook-id`s were answered 2xx: the deliveries, with retries
    /// of one webhook counted once.
    pub fn unique_ids(&self) -> usize {
        self.received()
            .into_iter()
            .filter_map(|r| r.id)
            .collect::<HashSet<_>>()
            .len()
    }

    /// How many requests with `webhook-id` `id` were answered 2xx.
    pub fn count_of(&self, id: &str) -> usize {
        self.received()
            .iter()
            .filter(|r| r.id.as_deref() == Some(id))
            .count()
    }

    /// Waits until at least `n` requests were answered 2xx; returns them.
    pub async fn wait_for(&self, n: usize) -> Vec<WebhookRequest> {
        eventually(
            &format!("{n} webhooks answered 2xx"),
            PATIENCE,
            async || {
                let received = self.received();
                if received.len() >= n {
                    Ok(received)
                } else {
                    Err(format!(
                        "{} answered 2xx of {} attempts",
                        received.len(),
                        self.inner().attempts.len()
                    ))
                }
            },
        )
        .await
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.shared.inner.lock().unwrap()
    }
}

fn is_success(status: u16) -> bool {
    (200..300).contains(&status)
}

async fn receive(
    State(shared): State<Shared>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (id, timestamp, signature) = (
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
    );
    let signature_valid = match (&id, &timestamp, &signature) {
        (Some(id), Some(timestamp), Some(signature)) => {
            signed(&shared.key, id, timestamp, &body, signature)
        }
        _ => false,
    };
    let (status, delay) = {
        let mut inner = shared.inner.lock().unwrap();
        let delay = if inner.delay_next > 0 {
            inner.delay_next -= 1;
            Some(inner.delay)
        } else {
            None
        };
        let status = if inner.fail_next > 0 {
            inner.fail_next -= 1;
            503
        } else {
            inner.status.unwrap_or(200)
        };
        inner.attempts.push(WebhookRequest {
            path: uri.path().to_owned(),
            id,
            timestamp,
            signature,
            body: serde_json::from_slice(&body)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned().into()),
            signature_valid,
            status,
            received_at: Instant::now(),
        });
        (status, delay)
    };
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// Whether a `v1,<base64>` entry of the space-separated `header` is the HMAC-SHA256 of
/// `{id}.{timestamp}.{body}` under `key`.
fn signed(key: &[u8], id: &str, timestamp: &str, body: &[u8], header: &str) -> bool {
    header.split(' ').any(|entry| {
        let Some(signature) = entry
            .strip_prefix("v1,")
            .and_then(|encoded| STANDARD.decode(encoded).ok())
        else {
            return false;
        };
        let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        mac.verify_slice(&signature).is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // The Standard Webhooks reference vector.
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TIMESTAMP: &str = "1614265330";
    const BODY: &str = r#"{"test": 2432232314}"#;
    const SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    async fn post(url: &str, body: &str, signature: Option<&str>) -> u16 {
        let mut request = reqwest::Client::new()
            .post(url)
            .header("content-type", "application/json")
            .body(body.to_owned());
        if let Some(signature) = signature {
            request = request
                .header("webhook-id", ID)
                .header("webhook-timestamp", TIMESTAMP)
                .header("webhook-signature", signature);
        }
        request.send().await.unwrap().status().as_u16()
    }

    #[tokio::test]
    async fn records_and_verifies_requests() {
        let receiver = WebhookReceiver::start(SECRET).await;
        let url = receiver.url();
        assert_eq!(post(&url, BODY, Some(SIGNATURE)).await, 200);
        let rotated = format!("v1,bm9wZQ== {SIGNATURE}");
        assert_eq!(post(&url, BODY, Some(&rotated)).await, 200);
        assert_eq!(post(&url, r#"{"test": 1}"#, Some(SIGNATURE)).await, 200);
        assert_eq!(post(&url, BODY, None).await, 200);
        let other = url.replace("/webhook", "/elsewhere");
        assert_eq!(post(&other, "not json", None).await, 200);

        let received = receiver.wait_for(5).await;
        let valid: Vec<bool> = received.iter().map(|r| r.signature_valid).collect();
        assert_eq!(valid, [true, true, false, false, false]);
        assert_eq!(receiver.invalid_signatures(), 3);
        assert_eq!(received[0].path, "/webhook");
        assert_eq!(received[0].id.as_deref(), Some(ID));
        assert_eq!(received[0].timestamp.as_deref(), Some(TIMESTAMP));
        assert_eq!(received[0].signature.as_deref(), Some(SIGNATURE));
        assert_eq!(received[0].body, serde_json::json!({"test": 2432232314u64}));
        assert_eq!(received[3].id, None);
        assert_eq!(received[4].path, "/elsewhere");
        assert_eq!(received[4].body, serde_json::json!("not json"));
        assert_eq!(receiver.unique_ids(), 1);
        assert_eq!(receiver.count_of(ID), 3);
    }

    #[tokio::test]
    async fn fails_on_command() {
        let receiver = WebhookReceiver::start("a raw key").await;
        let url = receiver.url();
        receiver.fail_next(2);
        assert_eq!(post(&url, BODY, Some(SIGNATURE)).await, 503);
        assert_eq!(post(&url, BODY, Some(SIGNATURE)).await, 503);
        assert_eq!(post(&url, BODY, Some(SIGNATURE)).await, 200);
        receiver.set_status(410);
        receiver.fail_next(1);
        assert_eq!(post(&url, BODY, Some(SIGNATURE)).await, 503);
        assert_eq!(post(&url, BODY, Some(SIGNATURE)).await, 410);
        assert_eq!(post(&url, BODY, Some(SIGNATURE)).await, 410);

        let statuses: Vec<u16> = receiver.attempts().iter().map(|r| r.status).collect();
        assert_eq!(statuses, [503, 503, 200, 503, 410, 410]);
        assert_eq!(receiver.received().len(), 1);
        assert_eq!(receiver.count_of(ID), 1);
        assert_eq!(receiver.unique_ids(), 1);
        // Signed with the reference secret, not this receiver's key.
        assert_eq!(receiver.invalid_signatures(), 6);
    }
}
