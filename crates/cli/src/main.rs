//! `waymark`: the one binary of the platform.

mod client;
mod dev;
mod journey_file;
mod journeys;
mod maps;
mod outbox;
mod profiles;
mod render;
mod report;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use waymark_kit::CancellationToken;
use waymark_kit::config::Config;

/// A service allocates and frees many small buffers per event (decoding, resolution,
/// encoding); glibc's malloc spent a third of the profile applier's CPU on them, mimalloc
/// a fraction of that.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Waymark: customer journey management. Run `waymark dev` to start everything locally.
#[derive(Parser)]
#[command(name = "waymark", version, about, propagate_version = true)]
struct Cli {
    /// TOML configuration file; WAYMARK_* environment variables override it.
    #[arg(long, global = true, env = "WAYMARK_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every service built so far in one process on its default ports, with SQLite in
    /// a data directory; prints the endpoints, the dev write key and the admin token.
    Dev {
        /// Where the SQLite database lives.
        #[arg(long, default_value = ".waymark")]
        data_dir: PathBuf,
    },
    /// Run one service.
    Serve {
        #[command(subcommand)]
        service: ServeCommand,
    },
    /// Apply pending database migrations of every service.
    Migrate,
    /// Manage sources and their write keys (admin RPCs; needs WAYMARK_ADMIN_TOKEN).
    Sources {
        #[command(subcommand)]
        command: client::SourcesCommand,
        #[command(flatten)]
        target: client::Target,
    },
    /// Send Segment-spec events from a JSON or JSONL file over gRPC.
    Send(client::SendArgs),
    /// Read the committed event log.
    Events {
        #[command(subcommand)]
        command: client::EventsCommand,
        #[command(flatten)]
        target: client::Target,
    },
    /// Read, export, erase and unmerge customer profiles (needs WAYMARK_ADMIN_TOKEN).
    Profiles {
        #[command(subcommand)]
        command: profiles::ProfilesCommand,
        #[command(flatten)]
        target: profiles::ProfileTarget,
    },
    /// Define segments and list their members (needs WAYMARK_ADMIN_TOKEN).
    Segments {
        #[command(subcommand)]
        command: profiles::SegmentsCommand,
        #[command(flatten)]
        target: profiles::ProfileTarget,
    },
    /// A service's outbox: the backlog per consumer and the dead letters, listed,
    /// retried or dropped (needs WAYMARK_ADMIN_TOKEN).
    Outbox {
        #[command(subcommand)]
        command: outbox::OutboxCommand,
        #[command(flatten)]
        target: outbox::OutboxTarget,
    },
    /// Validate, simulate, save, publish, pause and archive journeys (needs
    /// WAYMARK_ADMIN_TOKEN).
    Journeys {
        #[command(subcommand)]
        command: journeys::JourneysCommand,
        #[command(flatten)]
        target: journeys::OrchestratorTarget,
    },
    /// Profiles' passages through journeys: list, inspect, end (needs WAYMARK_ADMIN_TOKEN).
    Enrollments {
        #[command(subcommand)]
        command: journeys::EnrollmentsCommand,
        #[command(flatten)]
        target: journeys::OrchestratorTarget,
    },
    /// Outbound actions of journeys and their status (needs WAYMARK_ADMIN_TOKEN).
    Actions {
        #[command(subcommand)]
        command: journeys::ActionsCommand,
        #[command(flatten)]
        target: journeys::OrchestratorTarget,
    },
    /// Escalation cases handed to people (needs WAYMARK_ADMIN_TOKEN).
    Cases {
        #[command(subcommand)]
        command: journeys::CasesCommand,
        #[command(flatten)]
        target: journeys::OrchestratorTarget,
    },
    /// The contact policy shared by every journey (needs WAYMARK_ADMIN_TOKEN).
    ContactPolicy {
        #[command(subcommand)]
        command: journeys::ContactPolicyCommand,
        #[command(flatten)]
        target: journeys::OrchestratorTarget,
    },
    /// Messages journeys send (needs WAYMARK_ADMIN_TOKEN).
    Messages {
        #[command(subcommand)]
        command: journeys::MessagesCommand,
        #[command(flatten)]
        target: journeys::OrchestratorTarget,
    },
    /// Funnels, paths, journey reports, CX metrics, SLA breaches and stages from the
    /// analytics service, as tables, JSON or SVG (needs WAYMARK_ADMIN_TOKEN).
    Report {
        #[command(subcommand)]
        command: report::ReportCommand,
        #[command(flatten)]
        target: report::AnalyticsTarget,
    },
    /// Journey maps: stages from need to advocacy with standard times, interactions and
    /// dead ends (needs WAYMARK_ADMIN_TOKEN).
    Maps {
        #[command(subcommand)]
        command: maps::MapsCommand,
        #[command(flatten)]
        target: report::AnalyticsTarget,
    },
}

#[derive(Subcommand)]
enum ServeCommand {
    /// The ingestion service: gRPC on ingest_grpc_addr (50051), Segment HTTP on
    /// ingest_http_addr (8080).
    Ingest,
    /// The profile service: gRPC (ProfileService and EventSink) on profile_grpc_addr (50052).
    Profile,
    /// The orchestrator: gRPC (OrchestrationService and EventSink) on
    /// orchestrator_grpc_addr (50053).
    Orchestrator,
    /// Analytics: gRPC (AnalyticsService and EventSink) on analytics_grpc_addr (50054).
    Analytics,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = Config::load(cli.config.as_deref())?;
    match cli.command {
        Command::Dev { data_dir } => dev::run(config, data_dir).await,
        Command::Serve {
            service: ServeCommand::Ingest,
        } => {
            let _telemetry = waymark_kit::telemetry::init(&config.telemetry("waymark-ingest"))?;
            let shutdown = CancellationToken::new();
            waymark_kit::grpc::cancel_on_signal(shutdown.clone());
            let grpc = bind(config.ingest_grpc_addr).await?;
            let http = bind(config.ingest_http_addr).await?;
            let service = waymark_ingest::IngestServer::new(config).await?;
            service.serve(grpc, http, shutdown).await
        }
        Command::Serve {
            service: ServeCommand::Profile,
        } => {
            let _telemetry = waymark_kit::telemetry::init(&config.telemetry("waymark-profile"))?;
            let shutdown = CancellationToken::new();
            waymark_kit::grpc::cancel_on_signal(shutdown.clone());
            let grpc = bind(config.profile_grpc_addr).await?;
            let service = waymark_profile::ProfileServer::new(config).await?;
            service.serve(grpc, shutdown).await
        }
        Command::Serve {
            service: ServeCommand::Orchestrator,
        } => {
            let _telemetry =
                waymark_kit::telemetry::init(&config.telemetry("waymark-orchestrator"))?;
            let shutdown = CancellationToken::new();
            waymark_kit::grpc::cancel_on_signal(shutdown.clone());
            let grpc = bind(config.orchestrator_grpc_addr).await?;
            let service = waymark_orchestrator::OrchestratorServer::new(config).await?;
            service.serve(grpc, shutdown).await
        }
        Command::Serve {
            service: ServeCommand::Analytics,
        } => {
            let _telemetry = waymark_kit::telemetry::init(&config.telemetry("waymark-analytics"))?;
            let shutdown = CancellationToken::new();
            waymark_kit::grpc::cancel_on_signal(shutdown.clone());
            let grpc = bind(config.analytics_grpc_addr).await?;
            let service = waymark_analytics::AnalyticsServer::new(config).await?;
            service.serve(grpc, shutdown).await
        }
        Command::Migrate => {
            let _telemetry = waymark_kit::telemetry::init(&config.telemetry("waymark-migrate"))?;
            let ingest = waymark_ingest::IngestServer::new(config.clone()).await?;
            println!("ingest: {} migration(s) applied", ingest.migrate().await?);
            let profile = waymark_profile::ProfileServer::new(config.clone()).await?;
            println!("profile: {} migration(s) applied", profile.migrate().await?);
            let orchestrator =
                waymark_orchestrator::OrchestratorServer::new(config.clone()).await?;
            println!(
                "orchestrator: {} migration(s) applied",
                orchestrator.migrate().await?
            );
            let analytics = waymark_analytics::AnalyticsServer::new(config).await?;
            println!(
                "analytics: {} migration(s) applied",
                analytics.migrate().await?
            );
            Ok(())
        }
        Command::Sources { command, target } => client::sources(&config, &target, command).await,
        Command::Send(args) => client::send(args).await,
        Command::Events { command, target } => client::events(&config, &target, command).await,
        Command::Profiles { command, target } => {
            profiles::profiles(&config, &target, command).await
        }
        Command::Segments { command, target } => {
            profiles::segments(&config, &target, command).await
        }
        Command::Outbox { command, target } => outbox::run(&config, &target, command).await,
        Command::Journeys { command, target } => {
            journeys::journeys(&config, &target, command).await
        }
        Command::Enrollments { command, target } => {
            journeys::enrollments(&config, &target, command).await
        }
        Command::Actions { command, target } => journeys::actions(&config, &target, command).await,
        Command::Cases { command, target } => journeys::cases(&config, &target, command).await,
        Command::ContactPolicy { command, target } => {
            journeys::contact_policy(&config, &target, command).await
        }
        Command::Messages { command, target } => {
            journeys::messages(&config, &target, command).await
        }
        Command::Report { command, target } => report::run(&config, &target, command).await,
        Command::Maps { command, target } => maps::run(&config, &target, command).await,
    }
}

/// Binds a listener, naming the address when it is taken.
pub async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::Cli;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn profiles_get_takes_exactly_one_lookup() {
        let parse =
            |args: &[&str]| Cli::try_parse_from(["waymark", "profiles", "get"].iter().chain(args));
        assert!(parse(&[]).is_err());
        assert!(parse(&["--email", "ada@example.com", "--phone", "+4915112345678"]).is_err());
        assert!(parse(&["--identity", "device_id=d-1"]).is_ok());
        assert!(parse(&["--identity", "device_id"]).is_err());
    }

    #[test]
    fn journey_verbs_take_exactly_one_subject() {
        let parse = |args: &[&str]| Cli::try_parse_from(std::iter::once(&"waymark").chain(args));
        let simulate = ["journeys", "simulate", "--from", "2026-11-01T00:00:00Z"];
        let simulate = |more: &[&str]| {
            let mut args = simulate.to_vec();
            args.extend(["--to", "2026-11-02T00:00:00Z"]);
            args.extend(more);
            parse(&args)
        };
        assert!(simulate(&[]).is_err());
        assert!(simulate(&["-f", "a.yaml", "--id", "a"]).is_err());
        assert!(simulate(&["--id", "a", "--in-flight", "migrate", "--map", "a=b"]).is_ok());
        assert!(simulate(&["--id", "a", "--in-flight", "later"]).is_err());
        assert!(parse(&["enrollments", "list"]).is_err());
        assert!(parse(&["enrollments", "list", "--journey", "a", "--profile", "p"]).is_err());
        assert!(
            parse(&[
                "enrollments",
                "list",
                "--profile",
                "p",
                "--status",
                "active"
            ])
            .is_ok()
        );
        assert!(parse(&["actions", "list", "--status", "sent", "--limit", "5"]).is_ok());
        assert!(parse(&["journeys", "publish", "a", "--map", "a"]).is_err());
        assert!(parse(&["journeys", "get", "a", "--version", "2", "--yaml"]).is_ok());
        assert!(parse(&["messages", "tail", "--channel", "dev"]).is_ok());
    }

    #[test]
    fn report_and_map_verbs_take_the_analytics_endpoint() {
        let parse = |args: &[&str]| Cli::try_parse_from(std::iter::once(&"waymark").chain(args));
        let endpoint = ["--endpoint", "http://127.0.0.1:50054"];
        let funnel = [
            "report",
            "funnel",
            "--step",
            "A",
            "--step",
            "B|channel == \"web\"",
        ];
        assert!(parse(&[&funnel[..], &endpoint].concat()).is_ok());
        assert!(parse(&["report", "journey", "welcome", "--version", "2"]).is_ok());
        assert!(parse(&["report", "paths", "--svg", "paths.svg", "--format", "json"]).is_ok());
        assert!(parse(&["maps", "apply", "-f", "retail.yaml"]).is_ok());
        assert!(
            parse(
                &[
                    &["maps", "get", "retail", "--format", "json"][..],
                    &endpoint
                ]
                .concat()
            )
            .is_ok()
        );
        assert!(parse(&["maps", "get", "retail", "--format", "table"]).is_err());
        assert!(parse(&["maps", "list", "--format", "json"]).is_ok());
        assert!(parse(&["maps", "apply"]).is_err());
    }
}
