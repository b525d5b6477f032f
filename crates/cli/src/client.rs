//! Client verbs of the ingestion service (sources, send, events) and what every client
//! verb shares: the admin token and errors that name the problem.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Map, Value};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;
use waymark_ingest::wire::{BatchDefaults, event_to_json, format_timestamp, parse_message};
use waymark_kit::config::Config;
use waymark_proto::common::v1::Event;
use waymark_proto::ingest::v1::ingest_service_client::IngestServiceClient;
use waymark_proto::ingest::v1::*;

/// Which ingestion service to talk to.
#[derive(Args)]
pub struct Target {
    /// gRPC endpoint of the ingestion service.
    #[arg(
        long,
        global = true,
        env = "WAYMARK_ENDPOINT",
        default_value = "http://127.0.0.1:50051"
    )]
    endpoint: String,
}

#[derive(Subcommand)]
pub enum SourcesCommand {
    /// Create a source and print its write key (shown only once).
    Create {
        /// Human-readable name, unique among live sources.
        name: String,
        /// Events per second; the server default when omitted.
        #[arg(long, default_value_t = 0)]
        rate_limit: u32,
    },
    /// List sources.
    List,
    /// Revoke a source: its write key stops working.
    Revoke {
        /// The source id.
        source_id: String,
    },
}

#[derive(Subcommand)]
pub enum EventsCommand {
    /// Follow the committed log, printing each new event as a JSON line.
    Tail {
        /// Only events of this source.
        #[arg(long)]
        source_id: Option<String>,
        /// Only events of this user id.
        #[arg(long)]
        user_id: Option<String>,
        /// Only events of this anonymous id.
        #[arg(long)]
        anonymous_id: Option<String>,
        /// How often to poll, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
    },
}

#[derive(Args)]
pub struct SendArgs {
    /// A JSON file (one message, an array, or a `{"batch": [...]}` body) or JSONL.
    file: PathBuf,
    /// The source's write key.
    #[arg(long, env = "WAYMARK_WRITE_KEY")]
    write_key: String,
    /// Events per gRPC request.
    #[arg(long, default_value_t = 500)]
    batch_size: usize,
    #[command(flatten)]
    target: Target,
}

async fn connect(endpoint: &str) -> anyhow::Result<IngestServiceClient<Channel>> {
    let channel = waymark_kit::grpc::channel(endpoint)?;
    Ok(IngestServiceClient::new(channel)
        .max_decoding_message_size(waymark_kit::grpc::MAX_MESSAGE_BYTES))
}

/// `message` with the admin token as bearer.
pub fn admin<T>(config: &Config, message: T) -> anyhow::Result<Request<T>> {
    let token = config
        .admin_token
        .as_ref()
        .context("WAYMARK_ADMIN_TOKEN is not set (waymark dev prints it)")?;
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", waymark_kit::grpc::bearer(token));
    Ok(request)
}

/// A failed RPC as an error that names the problem: each invalid field of an
/// InvalidArgument (its `BadRequest` details), otherwise the code and the server's message,
/// with a hint where the fix is on this side.
pub fn rpc_error(status: Status, endpoint: &str) -> anyhow::Error {
    let details = status.get_error_details();
    if let Some(bad_request) = details.bad_request()
        && !bad_request.field_violations.is_empty()
    {
        let lines: Vec<String> = bad_request
            .field_violations
            .iter()
            .map(|v| format!("invalid {}: {}", v.field, v.description))
            .collect();
        return anyhow!("{}", lines.join("\n"));
    }
    let message = status.message();
    match status.code() {
        Code::Unauthenticated | Code::PermissionDenied => {
            anyhow!("{message} (WAYMARK_ADMIN_TOKEN must be the server's admin token)")
        }
        Code::Unavailable => anyhow!("{endpoint} is unavailable: {message}"),
        code => anyhow!("{}: {message}", code_words(code)),
    }
}

/// `NotFound` as "not found".
fn code_words(code: Code) -> String {
    let mut words = String::new();
    for c in format!("{code:?}").chars() {
        if c.is_ascii_uppercase() && !words.is_empty() {
            words.push(' ');
        }
        words.push(c.to_ascii_lowercase());
    }
    words
}

pub fn time(t: Option<&prost_types::Timestamp>) -> String {
    t.map(format_timestamp).unwrap_or_else(|| "-".into())
}

pub async fn sources(
    config: &Config,
    target: &Target,
    command: SourcesCommand,
) -> anyhow::Result<()> {
    let mut client = connect(&target.endpoint).await?;
    let fail = |status| rpc_error(status, &target.endpoint);
    match command {
        SourcesCommand::Create { name, rate_limit } => {
            let created = client
                .create_source(admin(
                    config,
                    CreateSourceRequest {
                        name,
                        rate_limit_per_second: rate_limit,
                    },
                )?)
                .await
                .map_err(fail)?
                .into_inner();
            let source = created.source.unwrap_or_default();
            println!("source id   {}", source.source_id);
            println!("name        {}", source.name);
            println!("rate limit  {}/s", source.rate_limit_per_second);
            println!("write key   {}", created.write_key);
        }
        SourcesCommand::List => {
            let sources = client
                .list_sources(admin(config, ListSourcesRequest {})?)
                .await
                .map_err(fail)?
                .into_inner()
                .sources;
            println!(
                "{:<38} {:<24} {:>10} {:<26} REVOKED",
                "SOURCE ID", "NAME", "RATE/S", "CREATED"
            );
            for s in sources {
                println!(
                    "{:<38} {:<24} {:>10} {:<26} {}",
                    s.source_id,
                    s.name,
                    s.rate_limit_per_second,
                    time(s.created_at.as_ref()),
                    time(s.revoked_at.as_ref())
                );
            }
        }
        SourcesCommand::Revoke { source_id } => {
            let source = client
                .revoke_source(admin(config, RevokeSourceRequest { source_id })?)
                .await
                .map_err(fail)?
                .into_inner()
                .source
                .unwrap_or_default();
            println!(
                "revoked {} ({}) at {}",
                source.source_id,
                source.name,
                time(source.revoked_at.as_ref())
            );
        }
    }
    Ok(())
}

/// Reads Segment messages from JSON or JSONL text.
pub fn read_messages(text: &str) -> anyhow::Result<Vec<Event>> {
    let trimmed = text.trim_start();
    let (values, line_numbers): (Vec<Value>, bool) = if trimmed.starts_with('[') {
        (
            serde_json::from_str(trimmed).context("parsing the JSON array")?,
            false,
        )
    } else {
        match serde_json::from_str::<Value>(trimmed) {
            Ok(Value::Object(mut body)) => match body.remove("batch") {
                Some(Value::Array(batch)) => (batch, false),
                Some(_) => bail!("`batch` must be an array"),
                None => (vec![Value::Object(body)], false),
            },
            _ => {
                let mut values = Vec::new();
                for (n, line) in text.lines().enumerate() {
                    if line.trim().is_empty() {
                        continue;
                    }
                    values.push(
                        serde_json::from_str(line)
                            .with_context(|| format!("line {}: invalid JSON", n + 1))?,
                    );
                }
                (values, true)
            }
        }
    };
    let mut events = Vec::with_capacity(values.len());
    for (i, value) in values.into_iter().enumerate() {
        let label = if line_numbers {
            format!("line {}: ", i + 1)
        } else {
            format!("[{i}].")
        };
        let Value::Object(map) = value else {
            bail!("{label} not a JSON object")
        };
        let map: Map<String, Value> = map;
        match parse_message(map, &label, None, &BatchDefaults::default()) {
            Ok(event) => events.push(event),
            Err(violations) => {
                let v = &violations[0];
                bail!("{}: {}", v.field, v.description);
            }
        }
    }
    Ok(events)
}

pub async fn send(args: SendArgs) -> anyhow::Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("reading {}", args.file.display()))?;
    let events = read_messages(&text)?;
    let mut client = connect(&args.target.endpoint).await?;
    let bar = ProgressBar::new(events.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} events {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let auth = waymark_kit::grpc::bearer(&waymark_kit::secret::Secret::new(args.write_key.clone()));
    let (mut accepted, mut duplicates, mut suppressed, mut rejected) = (0u64, 0u64, 0u64, 0u64);
    for (chunk_index, chunk) in events.chunks(args.batch_size).enumerate() {
        let mut request = Request::new(IngestRequest {
            events: chunk.to_vec(),
        });
        request.metadata_mut().insert("authorization", auth.clone());
        let response = client
            .ingest(request)
            .await
            .map_err(|status| rpc_error(status, &args.target.endpoint))?
            .into_inner();
        accepted += u64::from(response.accepted);
        duplicates += u64::from(response.duplicates);
        suppressed += u64::from(response.suppressed);
        for r in &response.rejected {
            rejected += 1;
            let index = chunk_index * args.batch_size + r.index as usize;
            bar.println(format!(
                "rejected event {index} ({}): {} {}",
                r.message_id, r.field, r.reason
            ));
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    println!(
        "accepted {accepted}, duplicates {duplicates}, suppressed {suppressed}, rejected {rejected}"
    );
    if rejected > 0 {
        bail!("{rejected} event(s) rejected");
    }
    Ok(())
}

pub async fn events(
    config: &Config,
    target: &Target,
    command: EventsCommand,
) -> anyhow::Result<()> {
    let EventsCommand::Tail {
        source_id,
        user_id,
        anonymous_id,
        interval_ms,
    } = command;
    let mut client = connect(&target.endpoint).await?;
    let mut since: Option<prost_types::Timestamp> = None;
    let mut seen_at_since: HashSet<String> = HashSet::new();
    loop {
        let request = ListEventsRequest {
            source_id: source_id.clone().unwrap_or_default(),
            user_id: user_id.clone().unwrap_or_default(),
            anonymous_id: anonymous_id.clone().unwrap_or_default(),
            start_time: since,
            end_time: None,
            page_size: 1000,
            page_token: String::new(),
        };
        let mut events = client
            .list_events(admin(config, request)?)
            .await
            .map_err(|status| rpc_error(status, &target.endpoint))?
            .into_inner()
            .events;
        // The page is newest first; print oldest first.
        events.reverse();
        for event in events {
            if seen_at_since.contains(&event.event_id) {
                continue;
            }
            if event.received_at != since {
                since = event.received_at;
                seen_at_since.clear();
            }
            seen_at_since.insert(event.event_id.clone());
            println!("{}", event_to_json(&event));
        }
        tokio::time::sleep(Duration::from_millis(interval_ms.max(100))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_json_arrays_batches_and_jsonl() {
        let one = r#"{"type":"track","event":"A","userId":"u"}"#;
        assert_eq!(read_messages(one).unwrap().len(), 1);
        assert_eq!(read_messages(&format!("[{one},{one}]")).unwrap().len(), 2);
        assert_eq!(
            read_messages(&format!(r#"{{"batch":[{one}]}}"#))
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            read_messages(&format!("{one}\n\n{one}\n{one}\n"))
                .unwrap()
                .len(),
            3
        );
        let err = read_messages(&format!(
            "{one}\n{{\"type\":\"track\",\"timestamp\":\"soon\"}}\n"
        ))
        .unwrap_err();
        assert!(err.to_string().contains("line 2: timestamp"), "{err}");
    }

    #[test]
    fn rpc_errors_name_the_problem() {
        use waymark_kit::error::{Error, FieldViolation};
        let invalid: Status = Error::invalid_fields(vec![
            FieldViolation::new("condition", "undeclared reference to 'emotin'"),
            FieldViolation::new("name", "must be at most 200 characters"),
        ])
        .into();
        assert_eq!(
            rpc_error(invalid, "http://e").to_string(),
            "invalid condition: undeclared reference to 'emotin'\n\
             invalid name: must be at most 200 characters"
        );
        assert_eq!(
            rpc_error(Status::not_found("no profile \"p\""), "http://e").to_string(),
            "not found: no profile \"p\""
        );
        assert_eq!(
            rpc_error(Status::unavailable("tcp connect error"), "http://e").to_string(),
            "http://e is unavailable: tcp connect error"
        );
        assert!(
            rpc_error(Status::unauthenticated("invalid admin token"), "http://e")
                .to_string()
                .contains("WAYMARK_ADMIN_TOKEN")
        );
    }
}
