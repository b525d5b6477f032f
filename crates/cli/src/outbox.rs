//! `waymark outbox`: what waits in a service's outbox, and its dead letters (admin RPCs of
//! `waymark.common.v1.OutboxService`).

use anyhow::bail;
use clap::{Args, Subcommand, ValueEnum};
use tonic::transport::Channel;
use waymark_kit::config::Config;
use waymark_proto::common::v1::outbox_service_client::OutboxServiceClient;
use waymark_proto::common::v1::*;

use crate::client::{admin, rpc_error, time};

/// The services that have an outbox.
#[derive(Clone, Copy, ValueEnum)]
pub enum Owner {
    /// Ingestion's outbox (to the profile service).
    Ingest,
    /// The profile service's outboxes (to the orchestrator and analytics).
    Profile,
}

/// Whose outbox to read.
#[derive(Args)]
pub struct OutboxTarget {
    /// The service that owns the outbox.
    #[arg(long, global = true, value_enum, default_value = "ingest")]
    service: Owner,
    /// Its gRPC endpoint; the service's default local port when omitted.
    #[arg(long, global = true)]
    endpoint: Option<String>,
}

impl OutboxTarget {
    fn endpoint(&self) -> String {
        self.endpoint.clone().unwrap_or_else(|| {
            match self.service {
                Owner::Ingest => "http://127.0.0.1:50051",
                Owner::Profile => "http://127.0.0.1:50052",
            }
            .to_owned()
        })
    }
}

#[derive(Subcommand)]
pub enum OutboxCommand {
    /// Events waiting per consumer, the age of the oldest, and dead letters.
    Stats,
    /// Events a consumer could not take, set aside.
    DeadLetters {
        #[command(subcommand)]
        command: DeadLettersCommand,
    },
}

#[derive(Subcommand)]
pub enum DeadLettersCommand {
    /// List dead letters, oldest first.
    List {
        /// Only this consumer's.
        #[arg(long)]
        consumer: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Queue dead letters again, at the end of their consumer's queue.
    Retry(Which),
    /// Delete dead letters for good.
    Drop(Which),
}

/// The dead letters to act on: ids, or `--all` (of `--consumer`).
#[derive(Args)]
pub struct Which {
    /// Dead-letter ids, as `list` prints them.
    ids: Vec<i64>,
    /// Every dead letter instead of ids.
    #[arg(long)]
    all: bool,
    /// With --all: only this consumer's.
    #[arg(long)]
    consumer: Option<String>,
}

pub async fn run(
    config: &Config,
    target: &OutboxTarget,
    command: OutboxCommand,
) -> anyhow::Result<()> {
    let endpoint = target.endpoint();
    let mut client = OutboxServiceClient::new(waymark_kit::grpc::channel(&endpoint)?);
    let fail = |status| rpc_error(status, &endpoint);
    match command {
        OutboxCommand::Stats => {
            let stats = client
                .get_outbox_stats(admin(config, GetOutboxStatsRequest::default())?)
                .await
                .map_err(fail)?
                .into_inner();
            println!(
                "{:<16} {:>10} {:<20} {:>12}",
                "CONSUMER", "PENDING", "OLDEST", "DEAD LETTERS"
            );
            for c in stats.consumers {
                println!(
                    "{:<16} {:>10} {:<20} {:>12}",
                    c.consumer,
                    c.pending,
                    time(c.oldest.as_ref()),
                    c.dead_letters
                );
            }
        }
        OutboxCommand::DeadLetters { command } => {
            dead_letters(config, &mut client, command, &fail).await?
        }
    }
    Ok(())
}

async fn dead_letters(
    config: &Config,
    client: &mut OutboxServiceClient<Channel>,
    command: DeadLettersCommand,
    fail: &impl Fn(tonic::Status) -> anyhow::Error,
) -> anyhow::Result<()> {
    match command {
        DeadLettersCommand::List { consumer, limit } => {
            let mut left = limit;
            let mut page_token = String::new();
            while left > 0 {
                let page = client
                    .list_dead_letters(admin(
                        config,
                        ListDeadLettersRequest {
                            consumer: consumer.clone().unwrap_or_default(),
                            page_size: left.min(1000),
                            page_token,
                        },
                    )?)
                    .await
                    .map_err(fail)?
                    .into_inner();
                for d in &page.dead_letters {
                    println!(
                        "{}\t{}\t{} event(s)\tqueued {}\tdead {}\tattempts {}\t{}\t{}",
                        d.id,
                        d.consumer,
                        d.event_ids.len(),
                        time(d.queued_at.as_ref()),
                        time(d.dead_at.as_ref()),
                        d.attempts,
                        d.reason,
                        d.event_ids.join(",")
                    );
                }
                left = left.saturating_sub(page.dead_letters.len() as u32);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
        }
        DeadLettersCommand::Retry(which) => {
            check(&which)?;
            let done = client
                .retry_dead_letters(admin(
                    config,
                    RetryDeadLettersRequest {
                        ids: which.ids,
                        all: which.all,
                        consumer: which.consumer.unwrap_or_default(),
                    },
                )?)
                .await
                .map_err(fail)?
                .into_inner();
            println!("{} event(s) queued again", done.requeued);
        }
        DeadLettersCommand::Drop(which) => {
            check(&which)?;
            let done = client
                .drop_dead_letters(admin(
                    config,
                    DropDeadLettersRequest {
                        ids: which.ids,
                        all: which.all,
                        consumer: which.consumer.unwrap_or_default(),
                    },
                )?)
                .await
                .map_err(fail)?
                .into_inner();
            println!("{} event(s) dropped", done.dropped);
        }
    }
    Ok(())
}

fn check(which: &Which) -> anyhow::Result<()> {
    match (which.ids.is_empty(), which.all) {
        (true, false) => bail!("name dead-letter ids, or pass --all"),
        (false, true) => bail!("give ids or --all, not both"),
        _ => Ok(()),
    }
}
