//! The Segment-compatible HTTP adapter: `/v1/batch` and the single-message endpoints, with
//! write keys as HTTP Basic user names (or `writeKey` in the body) and gzip bodies.
//! Success is exactly 200 with a small JSON body, since some SDKs retry anything else.
//!
//! What a request can cost is bounded before it is spent: a write key in the headers is
//! checked before the body is read, bodies are read within a time and a size (inflated
//! size for gzip, cut off while inflating), a batch's messages are counted before they
//! are parsed, and the batch context is converted once and copied into a message only
//! within the batch's expanded size.

use std::future::Future;
use std::io::Read;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use waymark_kit::error::{Error, FieldViolation};
use waymark_proto::common::v1::EventType;
use waymark_proto::json::struct_from_json;

use crate::service::{AuthedSource, BatchMode, IngestError, Ingestor};
use crate::validate::{
    MAX_BATCH_BYTES, MAX_BATCH_MESSAGES, MAX_EVENT_BYTES, MAX_EXPANDED_BATCH_BYTES,
};
use crate::wire::{BatchDefaults, parse_message, parse_timestamp};

/// The router's state: the core and how long a body may take to arrive.
#[derive(Clone)]
struct Http {
    core: Ingestor,
    read_timeout: Duration,
}

/// Every route with the message type it takes; `None` is a batch.
const ROUTES: [(&str, Option<EventType>); 14] = [
    ("/v1/batch", None),
    ("/v1/import", None),
    ("/v1/track", Some(EventType::Track)),
    ("/v1/t", Some(EventType::Track)),
    ("/v1/identify", Some(EventType::Identify)),
    ("/v1/i", Some(EventType::Identify)),
    ("/v1/page", Some(EventType::Page)),
    ("/v1/p", Some(EventType::Page)),
    ("/v1/screen", Some(EventType::Screen)),
    ("/v1/s", Some(EventType::Screen)),
    ("/v1/group", Some(EventType::Group)),
    ("/v1/g", Some(EventType::Group)),
    ("/v1/alias", Some(EventType::Alias)),
    ("/v1/a", Some(EventType::Alias)),
];

/// The HTTP routes, ready to serve; a request body must arrive within `read_timeout`.
pub fn router(core: Ingestor, read_timeout: Duration) -> Router {
    let state = Http {
        core: core.clone(),
        read_timeout,
    };
    let mut router = Router::new();
    for (path, kind) in ROUTES {
        router = router.route(
            path,
            post(
                move |State(http): State<Http>, request: Request| async move {
                    handle(http, request, kind).await
                },
            ),
        );
    }
    let duration = opentelemetry::global::meter("waymark")
        .f64_histogram("http.server.request.duration")
        .with_unit("s")
        .with_description("HTTP requests by route, method and status")
        .build();
    router
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(core, authenticate))
        .layer(axum::middleware::from_fn(cors))
        .layer(axum::middleware::from_fn(
            move |request: Request, next: axum::middleware::Next| {
                let duration = duration.clone();
                measured(duration, request, next)
            },
        ))
}

/// Records `http.server.request.duration` (OpenTelemetry's semantic convention) for every
/// request, whatever answers it, including a refused write key.
async fn measured(
    duration: opentelemetry::metrics::Histogram<f64>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    use opentelemetry::KeyValue;
    let started = std::time::Instant::now();
    // Only known routes name themselves, so a scan of random paths adds no series.
    let route = ROUTES
        .iter()
        .find(|(path, _)| *path == request.uri().path())
        .map_or("other", |(path, _)| path);
    let method = request.method().as_str().to_owned();
    let response = next.run(request).await;
    duration.record(
        started.elapsed().as_secs_f64(),
        &[
            KeyValue::new("http.route", route),
            KeyValue::new("http.request.method", method),
            KeyValue::new(
                "http.response.status_code",
                i64::from(response.status().as_u16()),
            ),
        ],
    );
    response
}

/// Serves `app` on `listener` (HTTP/1.1) until `shutdown` completes, then lets requests
/// in flight finish. A client gets `read_timeout` to send a request's headers: a
/// connection that trickles them (slow loris) is closed instead of held for ever.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    read_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(read_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors, usually: pause rather than spin.
                    tracing::warn!(%error, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let connection =
            builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "http connection ended");
            }
        });
    }
    graceful.shutdown().await;
}

/// Checks a write key sent in the headers before the body is read, so a client without
/// a valid key costs no more than its headers; the source goes to the handler as a
/// request extension. A key sent as `writeKey` in the body can only be checked once the
/// body is read, within the size and time limits.
async fn authenticate(
    State(core): State<Ingestor>,
    mut request: Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(key) = basic_user(request.headers()) {
        match core.authenticate(&key).await {
            Ok(source) => {
                request.extensions_mut().insert(source);
            }
            Err(error) => return Failure::from(error).into_response(),
        }
    }
    next.run(request).await
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
        let (status, error) = crate::error::for_http(error);
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
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
async fn handle(http: Http, request: Request, single: Option<EventType>) -> Response {
    match ingest(http, request, single).await {
        Ok(ignored) if ignored.is_empty() => {
            (StatusCode::OK, axum::Json(json!({"success": true}))).into_response()
        }
        // Still a success (SDKs must not retry); the warnings say which identifiers
        // link the events to nobody.
        Ok(ignored) => (
            StatusCode::OK,
            axum::Json(json!({"success": true, "warnings": ignored})),
        )
            .into_response(),
        Err(failure) => {
            tracing::debug!(status = failure.status.as_u16(), error = %failure.message, "http ingest refused");
            failure.into_response()
        }
    }
}

/// Ingests the request; on success, a warning for each identifier that breaks the rule of
/// its type.
async fn ingest(
    http: Http,
    request: Request,
    single: Option<EventType>,
) -> Result<Vec<Value>, Failure> {
    let core = http.core;
    let (parts, body) = request.into_parts();
    let body = read_body(&parts.headers, body, http.read_timeout).await?;

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
        if batch.len() > MAX_BATCH_MESSAGES {
            return Err(Failure::from(IngestError::TooLarge(format!(
                "batch has {} messages, more than {MAX_BATCH_MESSAGES}",
                batch.len()
            ))));
        }
        // Converted once: a message lacking its own gets a copy only once it is known
        // to fit (below).
        let defaults = BatchDefaults {
            sent_at,
            context: parsed.context.map(struct_from_json),
            integrations: parsed.integrations.map(struct_from_json),
        };
        (batch, defaults, parsed.write_key)
    };
    tracing::Span::current().record("events", raw_messages.len());

    let source = match parts.extensions.get::<AuthedSource>() {
        Some(source) => source.clone(),
        None => core.authenticate(&body_key.unwrap_or_default()).await?,
    };
    tracing::Span::current().record("source_id", source.source_id.as_str());

    let mut events = Vec::with_capacity(raw_messages.len());
    let mut violations = Vec::new();
    let mut expanded = 0;
    for (index, raw) in raw_messages.iter().enumerate() {
        let prefix = if single.is_some() {
            String::new()
        } else {
            format!("batch[{index}].")
        };
        let what = || {
            if single.is_some() {
                "event".to_owned()
            } else {
                format!("batch[{index}]")
            }
        };
        if raw.get().len() > MAX_EVENT_BYTES {
            return Err(Failure::from(IngestError::TooLarge(format!(
                "{} is larger than {} KB",
                what(),
                MAX_EVENT_BYTES / 1024
            ))));
        }
        // serde_json stops at 128 levels of nesting, so no message can overflow the
        // stack here; validation then refuses more than `MAX_DEPTH`.
        let message = match serde_json::from_str::<Value>(raw.get()) {
            Ok(Value::Object(message)) => message,
            Ok(_) => {
                violations.push(FieldViolation::new(
                    prefix.trim_end_matches('.'),
                    "must be a JSON object",
                ));
                continue;
            }
            Err(error) => {
                violations.push(FieldViolation::new(
                    prefix.trim_end_matches('.'),
                    format!("invalid JSON: {error}"),
                ));
                continue;
            }
        };
        let inherited = defaults.inherited_bytes(&message);
        if raw.get().len() + inherited > MAX_EVENT_BYTES {
            return Err(Failure::from(IngestError::TooLarge(format!(
                "{} with the batch's context and integrations is larger than {} KB",
                what(),
                MAX_EVENT_BYTES / 1024
            ))));
        }
        expanded += raw.get().len() + inherited;
        if expanded > MAX_EXPANDED_BATCH_BYTES {
            return Err(Failure::from(IngestError::TooLarge(format!(
                "batch with the batch's context and integrations in every message is larger than {} MB",
                MAX_EXPANDED_BATCH_BYTES / (1024 * 1024)
            ))));
        }
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
        return Ok(outcome
            .ignored
            .into_iter()
            .map(|i| {
                let field = match single {
                    Some(_) => i.field,
                    None => format!("batch[{}].{}", i.index, i.field),
                };
                json!({"field": field, "reason": i.reason})
            })
            .collect());
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

/// Reads the body within the batch limit and `timeout`, inflating gzip; an over-limit
/// body is a 413, checked on the inflated size while inflating, so a small gzip bomb is
/// cut off at the limit and never inflated whole. A body that takes longer is a 408.
async fn read_body(headers: &HeaderMap, body: Body, timeout: Duration) -> Result<Bytes, Failure> {
    let too_large = || {
        Failure::from(IngestError::TooLarge(format!(
            "batch is larger than {} KB",
            MAX_BATCH_BYTES / 1024
        )))
    };
    let raw = tokio::time::timeout(timeout, axum::body::to_bytes(body, MAX_BATCH_BYTES + 1))
        .await
        .map_err(|_| Failure {
            status: StatusCode::REQUEST_TIMEOUT,
            message: format!("body not received within {} s", timeout.as_secs()),
            violations: Vec::new(),
            retry_after: None,
        })?
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
