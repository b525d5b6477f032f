//! The Segment-compatible HTTP adapter: `/v1/batch` and the single-message endpoints, with
//! write keys as HTTP Basic user names (or `writeKey` in the body) and gzip bodies.
//! Success is exactly 200 with a small JSON body, since some SDKs retry anything else.

use std::io::Read;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use waymark_kit::error::{Error, FieldViolation};
use waymark_proto::common::v1::EventType;

use crate::segment::{BatchDefaults, parse_message, parse_timestamp};
use crate::service::{BatchMode, IngestError, Ingestor};
use crate::validate::{MAX_BATCH_BYTES, MAX_EVENT_BYTES};

/// The HTTP routes, ready to serve.
pub fn router(core: Ingestor) -> Router {
    let single = |kind: EventType| {
        post(
            move |State(core): State<Ingestor>, request: Request| async move {
                handle(core, request, Some(kind)).await
            },
        )
    };
    let batch = post(
        |State(core): State<Ingestor>, request: Request| async move {
            handle(core, request, None).await
        },
    );
    Router::new()
        .route("/v1/batch", batch.clone())
        .route("/v1/import", batch)
        .route("/v1/track", single(EventType::Track))
        .route("/v1/t", single(EventType::Track))
        .route("/v1/identify", single(EventType::Identify))
        .route("/v1/i", single(EventType::Identify))
        .route("/v1/page", single(EventType::Page))
        .route("/v1/p", single(EventType::Page))
        .route("/v1/screen", single(EventType::Screen))
        .route("/v1/s", single(EventType::Screen))
        .route("/v1/group", single(EventType::Group))
        .route("/v1/g", single(EventType::Group))
        .route("/v1/alias", single(EventType::Alias))
        .route("/v1/a", single(EventType::Alias))
        .with_state(core)
        .layer(axum::middleware::from_fn(cors))
}

/// Browser SDKs call from other origins; answer preflights and allow any origin (the
/// write key, not the origin, authorises).
async fn cors(request: Request, next: axum::middleware::Next) -> Response {
    let mut response = if request.method() == Method::OPTIONS {
        StatusCode::NO_CONTENT.into_response()
    } else {
        next.run(request).await
    };
    let h = response.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("POST, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("authorization, content-type, content-encoding"),
    );
    response
}

/// An HTTP failure with its JSON body.
struct Failure {
    status: StatusCode,
    message: String,
    violations: Vec<FieldViolation>,
    retry_after: Option<u64>,
}

impl Failure {
    fn bad_request(violations: Vec<FieldViolation>) -> Self {
        let error = Error::invalid_fields(violations);
        Self {
            status: StatusCode::BAD_REQUEST,
            message: error.message,
            violations: error.violations,
            retry_after: None,
        }
    }
}

impl From<IngestError> for Failure {
    fn from(error: IngestError) -> Self {
        let too_large = matches!(error, IngestError::TooLarge(_));
        let error = Error::from(error);
        let status = if too_large {
            StatusCode::PAYLOAD_TOO_LARGE
        } else {
            StatusCode::from_u16(error.kind.http_status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
        };
        Self {
            status,
            message: error.message,
            violations: error.violations,
            retry_after: error.retry_after.map(|d| d.as_secs().max(1)),
        }
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let errors: Vec<Value> = self
            .violations
            .iter()
            .map(|v| json!({"field": v.field, "reason": v.description}))
            .collect();
        let mut body = json!({"success": false, "error": self.message});
        if let Some(first) = self.violations.first() {
            body["field"] = json!(first.field);
            body["reason"] = json!(first.description);
            body["errors"] = Value::Array(errors);
        }
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&secs.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        response
    }
}

#[derive(Deserialize)]
struct BatchBody<'a> {
    #[serde(borrow)]
    batch: Option<Vec<&'a RawValue>>,
    #[serde(rename = "writeKey")]
    write_key: Option<String>,
    #[serde(rename = "sentAt")]
    sent_at: Option<Value>,
    context: Option<Map<String, Value>>,
    integrations: Option<Map<String, Value>>,
}

#[tracing::instrument(skip_all, fields(path = %request.uri().path(), events, source_id))]
async fn handle(core: Ingestor, request: Request, single: Option<EventType>) -> Response {
    match ingest(core, request, single).await {
        Ok(()) => (StatusCode::OK, axum::Json(json!({"success": true}))).into_response(),
        Err(failure) => {
            tracing::debug!(status = failure.status.as_u16(), error = %failure.message, "http ingest refused");
            failure.into_response()
        }
    }
}

async fn ingest(
    core: Ingestor,
    request: Request,
    single: Option<EventType>,
) -> Result<(), Failure> {
    let (parts, body) = request.into_parts();
    let body = read_body(&parts.headers, body).await?;

    let (raw_messages, defaults, body_key) = if single.is_some() {
        let raw: &RawValue = serde_json::from_slice(&body).map_err(json_error)?;
        let object: Map<String, Value> = serde_json::from_str(raw.get()).map_err(|_| {
            Failure::bad_request(vec![FieldViolation::new("body", "must be a JSON object")])
        })?;
        let key = object
            .get("writeKey")
            .and_then(Value::as_str)
            .map(str::to_owned);
        (vec![raw], BatchDefaults::default(), key)
    } else {
        let parsed: BatchBody = serde_json::from_slice(&body).map_err(json_error)?;
        let Some(batch) = parsed.batch else {
            return Err(Failure::bad_request(vec![FieldViolation::new(
                "batch",
                "is required and must be an array",
            )]));
        };
        let sent_at = match parsed.sent_at {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(parse_timestamp(&s).ok_or_else(|| {
                Failure::bad_request(vec![FieldViolation::new(
                    "sentAt",
                    "must be an ISO-8601 timestamp",
                )])
            })?),
            Some(_) => {
                return Err(Failure::bad_request(vec![FieldViolation::new(
                    "sentAt",
                    "must be an ISO-8601 timestamp string",
                )]));
            }
        };
        let defaults = BatchDefaults {
            sent_at,
            context: parsed.context,
            integrations: parsed.integrations,
        };
        (batch, defaults, parsed.write_key)
    };
    tracing::Span::current().record("events", raw_messages.len());

    let key = basic_user(&parts.headers).or(body_key).unwrap_or_default();
    let source = core.authenticate(&key).await?;
    tracing::Span::current().record("source_id", source.source_id.as_str());

    let mut events = Vec::with_capacity(raw_messages.len());
    let mut violations = Vec::new();
    for (index, raw) in raw_messages.iter().enumerate() {
        let prefix = if single.is_some() {
            String::new()
        } else {
            format!("batch[{index}].")
        };
        if raw.get().len() > MAX_EVENT_BYTES {
            let what = if single.is_some() {
                "event".to_owned()
            } else {
                format!("batch[{index}]")
            };
            return Err(Failure::from(IngestError::TooLarge(format!(
                "{what} is larger than {} KB",
                MAX_EVENT_BYTES / 1024
            ))));
        }
        let Ok(Value::Object(message)) = serde_json::from_str::<Value>(raw.get()) else {
            violations.push(FieldViolation::new(
                prefix.trim_end_matches('.'),
                "must be a JSON object",
            ));
            continue;
        };
        match parse_message(message, &prefix, single, &defaults) {
            Ok(event) => events.push(event),
            Err(mut v) => violations.append(&mut v),
        }
    }
    if !violations.is_empty() {
        core.count_rejected(
            &source.source_id,
            raw_messages.len().min(violations.len()) as u64,
        )
        .await;
        return Err(Failure::bad_request(violations));
    }
    let outcome = core
        .ingest(&source, events, BatchMode::AllOrNothing)
        .await?;
    if outcome.rejected.is_empty() {
        return Ok(());
    }
    Err(Failure::bad_request(
        outcome
            .rejected
            .into_iter()
            .map(|r| {
                let field = match (single.is_some(), r.violation.field.is_empty()) {
                    (true, _) => r.violation.field,
                    (false, true) => format!("batch[{}]", r.index),
                    (false, false) => format!("batch[{}].{}", r.index, r.violation.field),
                };
                FieldViolation::new(field, r.violation.description)
            })
            .collect(),
    ))
}

fn json_error(error: serde_json::Error) -> Failure {
    Failure::bad_request(vec![FieldViolation::new(
        "body",
        format!(
            "invalid JSON at line {} column {}: {error}",
            error.line(),
            error.column()
        ),
    )])
}

/// Reads the body within the batch limit, inflating gzip; an over-limit body is a 413,
/// checked on the inflated size so a small gzip bomb cannot get past it.
async fn read_body(headers: &HeaderMap, body: Body) -> Result<Bytes, Failure> {
    let too_large = || {
        Failure::from(IngestError::TooLarge(format!(
            "batch is larger than {} KB",
            MAX_BATCH_BYTES / 1024
        )))
    };
    let raw = axum::body::to_bytes(body, MAX_BATCH_BYTES + 1)
        .await
        .map_err(|_| too_large())?;
    let gzip = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("gzip"));
    if !gzip {
        return Ok(raw);
    }
    let mut inflated = Vec::with_capacity(raw.len() * 4);
    flate2::read::GzDecoder::new(raw.as_ref())
        .take(MAX_BATCH_BYTES as u64 + 1)
        .read_to_end(&mut inflated)
        .map_err(|e| {
            Failure::bad_request(vec![FieldViolation::new(
                "body",
                format!("invalid gzip: {e}"),
            )])
        })?;
    if inflated.len() > MAX_BATCH_BYTES {
        return Err(too_large());
    }
    Ok(Bytes::from(inflated))
}

/// The user name of HTTP Basic auth: Segment's way of sending the write key.
fn basic_user(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let user = text.split(':').next()?.to_owned();
    (!user.is_empty()).then_some(user)
}
