//! Outbound webhooks as Standard Webhooks (standardwebhooks.com) describes them, so a
//! receiver verifies ours with any of its libraries: each request carries `webhook-id`
//! (the same on every retry, for the receiver's idempotency), `webhook-timestamp` (when
//! this attempt was signed) and `webhook-signature`, an HMAC-SHA256 of
//! `{id}.{timestamp}.{body}`. [`WebhookSender`] makes one attempt and says whether to try
//! again; [`backoff`] says when.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use rand::Rng;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The prefix of a secret in the standard form: the key follows, in base64.
const SECRET_PREFIX: &str = "whsec_";

/// The version of the signature scheme, written before each signature.
const SCHEME: &str = "v1";

/// The first retry's ceiling; each later attempt doubles it.
const BACKOFF_BASE: Duration = Duration::from_secs(1);

/// No wait between attempts is longer, however many failed before.
const BACKOFF_CAP: Duration = Duration::from_secs(10 * 60);

/// Signs and verifies webhook payloads under one key.
#[derive(Clone)]
pub struct Signer {
    key: Vec<u8>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(***)")
    }
}

impl Signer {
    /// A signer for `secret`: `whsec_<base64>` (the standard form) is decoded to its key;
    /// any other non-empty string is the key's bytes as they are.
    pub fn new(secret: &str) -> Result<Signer, String> {
        let key = match secret.strip_prefix(SECRET_PREFIX) {
            Some(encoded) => STANDARD.decode(encoded).map_err(|e| {
                format!("a {SECRET_PREFIX} secret must be base64 after the prefix: {e}")
            })?,
            None => secret.as_bytes().to_vec(),
        };
        if key.is_empty() {
            return Err("the webhook secret is empty".into());
        }
        Ok(Signer { key })
    }

    /// The `webhook-signature` header for one attempt: `v1,<base64 HMAC>`.
    pub fn sign(&self, id: &str, timestamp_secs: i64, body: &[u8]) -> String {
        let mac = self.mac(id, timestamp_secs, body).finalize().into_bytes();
        format!("{SCHEME},{}", STANDARD.encode(mac))
    }

    /// True when any space-separated `v1,<base64>` entry of `header` is the signature of
    /// this message (several entries appear while a receiver's key is being rotated).
    /// Entries of other schemes and malformed ones match nothing. The comparison takes
    /// the same time wherever a wrong signature differs. Whether the timestamp is recent
    /// enough is the caller's rule, not a property of the signature.
    pub fn verify(&self, id: &str, timestamp_secs: i64, body: &[u8], header: &str) -> bool {
        header.split(' ').any(|entry| {
            let Some((SCHEME, encoded)) = entry.split_once(',') else {
                return false;
            };
            let Ok(signature) = STANDARD.decode(encoded) else {
                return false;
            };
            self.mac(id, timestamp_secs, body)
                .verify_slice(&signature)
                .is_ok()
        })
    }

    fn mac(&self, id: &str, timestamp_secs: i64, body: &[u8]) -> HmacSha256 {
        let mut mac =
            HmacSha256::new_from_slice(&self.key).expect("HMAC takes a key of any length");
        mac.update(format!("{id}.{timestamp_secs}.").as_bytes());
        mac.update(body);
        mac
    }
}

/// What one attempt to deliver a webhook came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// The receiver answered 2xx.
    Delivered { status: u16 },
    /// The receiver (or the way to it) failed in a way that may pass: try again later.
    Retry { reason: String },
    /// The receiver refused this request and would refuse it again: do not retry.
    Rejected { reason: String },
}

/// Delivers signed webhooks over HTTP, one attempt per call.
#[derive(Debug, Clone)]
pub struct WebhookSender {
    client: reqwest::Client,
    signer: Signer,
}

impl WebhookSender {
    /// A sender signing with `signer`; each attempt, from connecting to the response's
    /// headers, is given up after `timeout`.
    pub fn new(signer: Signer, timeout: Duration) -> WebhookSender {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            // A redirect would turn the POST into a GET to wherever the receiver points,
            // unsigned for that address; a receiver that moved is told by its 3xx.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("an HTTP client without custom TLS settings builds");
        WebhookSender { client, signer }
    }

    /// POSTs `body` (JSON) to `url`, signed with a fresh timestamp, and classifies the
    /// outcome: 2xx is delivered; 408, 409, 425, 429, 5xx, timeouts and connection errors
    /// are worth retrying; any other answer is rejected. The reason names the status or
    /// the error, never the response's body, and never the URL (it may carry a token).
    pub async fn send(&self, url: &str, id: &str, body: &[u8]) -> Delivery {
        let timestamp = chrono::Utc::now().timestamp();
        let response = self
            .client
            .post(url)
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", self.signer.sign(id, timestamp, body))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_vec())
            .send()
            .await;
        match response {
            Ok(response) => classify(response.status().as_u16()),
            Err(error) => classify_error(error.without_url()),
        }
    }
}

/// The outcome of an answer with `status`.
fn classify(status: u16) -> Delivery {
    match status {
        200..=299 => Delivery::Delivered { status },
        408 | 409 | 425 | 429 | 500..=599 => Delivery::Retry {
            reason: format!("the receiver answered {status}"),
        },
        300..=499 => Delivery::Rejected {
            reason: format!("the receiver answered {status}"),
        },
        _ => Delivery::Retry {
            reason: format!("the receiver answered an unexpected status {status}"),
        },
    }
}

/// The outcome of a request that got no answer.
fn classify_error(error: reqwest::Error) -> Delivery {
    let reason = error_chain(&error);
    // A URL the client cannot use (malformed, or a scheme it does not speak) fails the
    // same way every time.
    if error.is_builder() {
        Delivery::Rejected { reason }
    } else {
        Delivery::Retry { reason }
    }
}

/// The error and its causes, outermost first ("error sending request: connection
/// refused").
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// How long to wait before attempt `attempt + 1`, after attempt `attempt` (1-based)
/// failed: a uniformly random time up to 1 s doubled for each earlier attempt, and never
/// above 10 minutes. The randomness ("full jitter") spreads out receivers' retries after
/// an outage instead of sending them all back at once.
pub fn backoff(attempt: u32) -> Duration {
    let doublings = attempt.saturating_sub(1).min(31);
    let ceiling = BACKOFF_BASE
        .saturating_mul(1u32 << doublings)
        .min(BACKOFF_CAP);
    let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::rng().random_range(0..=millis))
}

#[cfg(test)]
mod tests {
    use waymark_testkit::WebhookReceiver;

    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TIMESTAMP: i64 = 1614265330;
    const BODY: &[u8] = br#"{"test": 2432232314}"#;
    const EXPECTED: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn signs_the_standard_webhooks_reference_vector() {
        let signer = Signer::new(SECRET).unwrap();
        assert_eq!(signer.sign(ID, TIMESTAMP, BODY), EXPECTED);
        assert!(signer.verify(ID, TIMESTAMP, BODY, EXPECTED));
    }

    #[test]
    fn verify_finds_a_match_among_several_entries() {
        let signer = Signer::new(SECRET).unwrap();
        let header = format!("v1,bm9wZQ== v2,{} {EXPECTED}", &EXPECTED[3..]);
        assert!(signer.verify(ID, TIMESTAMP, BODY, &header));
    }

    #[test]
    fn verify_rejects_tampering() {
        let signer = Signer::new(SECRET).unwrap();
        assert!(!signer.verify(ID, TIMESTAMP, br#"{"test": 2432232315}"#, EXPECTED));
        assert!(!signer.verify("msg_other", TIMESTAMP, BODY, EXPECTED));
        assert!(!signer.verify(ID, TIMESTAMP + 1, BODY, EXPECTED));
        let other = Signer::new("whsec_bm90IHRoZSBzYW1lIGtleQ==").unwrap();
        assert!(!other.verify(ID, TIMESTAMP, BODY, EXPECTED));
        // The same signature under another scheme name, or mangled, matches nothing.
        assert!(!signer.verify(ID, TIMESTAMP, BODY, &EXPECTED.replace("v1,", "v1a,")));
        assert!(!signer.verify(ID, TIMESTAMP, BODY, &EXPECTED.replace("v1,", "")));
        assert!(!signer.verify(ID, TIMESTAMP, BODY, "v1,not base64!"));
        assert!(!signer.verify(ID, TIMESTAMP, BODY, ""));
    }

    #[test]
    fn a_secret_without_the_prefix_is_the_raw_key() {
        let raw = Signer::new("plain-text-key").unwrap();
        let signature = raw.sign(ID, TIMESTAMP, BODY);
        let encoded = Signer::new(&format!("whsec_{}", STANDARD.encode("plain-text-key"))).unwrap();
        assert_eq!(encoded.sign(ID, TIMESTAMP, BODY), signature);
    }

    #[test]
    fn unusable_secrets_say_why() {
        assert!(Signer::new("").unwrap_err().contains("empty"));
        assert!(Signer::new("whsec_").unwrap_err().contains("empty"));
        assert!(
            Signer::new("whsec_not*base64")
                .unwrap_err()
                .contains("base64")
        );
    }

    #[test]
    fn statuses_are_classified() {
        assert_eq!(classify(200), Delivery::Delivered { status: 200 });
        assert_eq!(classify(204), Delivery::Delivered { status: 204 });
        for retry in [408, 409, 425, 429, 500, 502, 503, 599] {
            assert!(matches!(classify(retry), Delivery::Retry { .. }), "{retry}");
        }
        for rejected in [301, 400, 401, 403, 404, 410, 413, 422] {
            assert!(
                matches!(classify(rejected), Delivery::Rejected { .. }),
                "{rejected}"
            );
        }
    }

    #[tokio::test]
    async fn sends_what_a_receiver_verifies() {
        let receiver = WebhookReceiver::start(SECRET).await;
        let sender = WebhookSender::new(Signer::new(SECRET).unwrap(), Duration::from_secs(5));
        let before = chrono::Utc::now().timestamp();
        let body = br#"{"profile": {"traits": {"plan": "pro"}}}"#;
        assert_eq!(
            sender.send(&receiver.url(), "wh-1", body).await,
            Delivery::Delivered { status: 200 }
        );
        let received = receiver.wait_for(1).await;
        assert_eq!(receiver.invalid_signatures(), 0);
        assert_eq!(received[0].id.as_deref(), Some("wh-1"));
        assert_eq!(
            received[0].body,
            serde_json::json!({"profile": {"traits": {"plan": "pro"}}})
        );
        let timestamp: i64 = received[0].timestamp.as_deref().unwrap().parse().unwrap();
        assert!((before..=chrono::Utc::now().timestamp()).contains(&timestamp));
    }

    #[tokio::test]
    async fn answers_are_classified() {
        let receiver = WebhookReceiver::start(SECRET).await;
        let sender = WebhookSender::new(Signer::new(SECRET).unwrap(), Duration::from_secs(5));
        receiver.fail_next(1);
        let Delivery::Retry { reason } = sender.send(&receiver.url(), "wh-1", b"{}").await else {
            panic!("a 503 is retried");
        };
        assert!(reason.contains("503"), "{reason}");
        receiver.set_status(404);
        let Delivery::Rejected { reason } = sender.send(&receiver.url(), "wh-1", b"{}").await
        else {
            panic!("a 404 is rejected");
        };
        assert!(reason.contains("404"), "{reason}");
        receiver.set_status(429);
        assert!(matches!(
            sender.send(&receiver.url(), "wh-1", b"{}").await,
            Delivery::Retry { .. }
        ));
        assert_eq!(receiver.attempts().len(), 3);
        assert_eq!(receiver.invalid_signatures(), 0);
    }

    #[tokio::test]
    async fn unreachable_and_silent_receivers_are_retried() {
        let sender = WebhookSender::new(Signer::new(SECRET).unwrap(), Duration::from_millis(300));
        // A port nobody listens on any more: the connection is refused.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/hook?token=secret-token",
            closed.local_addr().unwrap()
        );
        drop(closed);
        let Delivery::Retry { reason } = sender.send(&url, "wh-1", b"{}").await else {
            panic!("a refused connection is retried");
        };
        assert!(!reason.contains("secret-token"), "{reason}");
        // An https URL is attempted the same way (the client speaks TLS).
        let Delivery::Retry { reason } = sender
            .send(&url.replace("http:", "https:"), "wh-1", b"{}")
            .await
        else {
            panic!("a refused https connection is retried");
        };
        assert!(reason.contains("refused"), "{reason}");
        // A server that accepts and never answers: the attempt times out.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", silent.local_addr().unwrap());
        let held = tokio::spawn(async move {
            let mut connections = Vec::new();
            while let Ok((connection, _)) = silent.accept().await {
                connections.push(connection);
            }
        });
        let Delivery::Retry { reason } = sender.send(&url, "wh-1", b"{}").await else {
            panic!("a timeout is retried");
        };
        assert!(reason.contains("timed out"), "{reason}");
        held.abort();
    }

    #[tokio::test]
    async fn unusable_urls_are_rejected() {
        let sender = WebhookSender::new(Signer::new(SECRET).unwrap(), Duration::from_secs(1));
        assert!(matches!(
            sender.send("not a url", "wh-1", b"{}").await,
            Delivery::Rejected { .. }
        ));
    }

    #[test]
    fn backoff_stays_within_its_doubling_ceiling() {
        for attempt in 0..=64u32 {
            let ceiling = match attempt {
                0 | 1 => Duration::from_secs(1),
                n if n < 11 => Duration::from_secs(1 << (n - 1)),
                _ => BACKOFF_CAP,
            };
            for _ in 0..50 {
                assert!(backoff(attempt) <= ceiling, "attempt {attempt}");
            }
        }
    }

    #[test]
    fn backoff_is_jittered() {
        let waits: std::collections::HashSet<Duration> = (0..20).map(|_| backoff(12)).collect();
        assert!(waits.len() > 1, "20 waits of attempt 12 were all {waits:?}");
    }
}
