//! Client verbs of the orchestrator: journeys, enrollments, actions, cases, the contact
//! policy and the dev channel's messages. Replies print as proto3 JSON (`journey_file`).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::{Args, Subcommand, ValueEnum};
use tonic::transport::Channel;
use waymark_kit::config::Config;
use waymark_proto::json::struct_to_json;
use waymark_proto::orchestration::v1::orchestration_service_client::OrchestrationServiceClient;
use waymark_proto::orchestration::v1::*;
use waymark_proto::prost_types::Timestamp;

use crate::client::{admin, rpc_error};
use crate::journey_file::{self, Format, print, print_all, print_document, read};

/// Which orchestrator to talk to.
#[derive(Args)]
pub struct OrchestratorTarget {
    /// gRPC endpoint of the orchestrator; the `orchestrator_endpoint` setting
    /// (`http://127.0.0.1:50053` unless configured) when omitted.
    #[arg(long, global = true, env = "WAYMARK_ORCHESTRATOR_ENDPOINT")]
    endpoint: Option<String>,
}

/// The server's largest page.
const MAX_PAGE: u32 = 1000;

#[derive(Subcommand)]
pub enum JourneysCommand {
    /// Check a journey file without saving it; prints every problem as a JSON list and
    /// fails when there is any.
    Validate {
        /// The journey, YAML or JSON (`.json`).
        #[arg(short, long)]
        file: PathBuf,
    },
    /// Run a journey against past events without acting; prints the counts as JSON.
    Simulate(SimulateArgs),
    /// Save a journey file as its journey's draft; prints the journey as JSON. A live
    /// journey runs its published version until `publish`.
    Apply {
        /// The journey, YAML or JSON (`.json`).
        #[arg(short, long)]
        file: PathBuf,
    },
    /// Make the draft a new version that new entries use, and decide what happens to
    /// enrollments in flight.
    Publish {
        /// The journey id.
        journey_id: String,
        #[command(flatten)]
        in_flight: InFlightArgs,
    },
    /// Stop new entries and hold enrollments where they are.
    Pause {
        /// The journey id.
        journey_id: String,
    },
    /// Let a paused journey run again.
    Resume {
        /// The journey id.
        journey_id: String,
    },
    /// End a journey for good: every active enrollment exits.
    Archive {
        /// The journey id.
        journey_id: String,
    },
    /// Print every journey as JSON, by id, without definitions.
    List,
    /// Print a journey's definition (the draft, or a published version) as JSON, ready
    /// to edit and apply again.
    // `--version` here is the journey's, not the binary's.
    #[command(disable_version_flag = true)]
    Get {
        /// The journey id.
        journey_id: String,
        /// A published version; the draft when omitted.
        #[arg(long, default_value_t = 0)]
        version: u32,
        /// Print YAML instead of JSON.
        #[arg(long)]
        yaml: bool,
    },
}

#[derive(Args)]
pub struct SimulateArgs {
    #[command(flatten)]
    journey: SimulatedJourney,
    /// Start of the range of past events, RFC 3339 (e.g. 2026-11-01T00:00:00Z).
    #[arg(long, value_parser = parse_time)]
    from: Timestamp,
    /// End of the range (exclusive), RFC 3339.
    #[arg(long, value_parser = parse_time)]
    to: Timestamp,
    /// The most events read; the server's default (100,000) when omitted.
    #[arg(long, default_value_t = 0)]
    max_events: u32,
    #[command(flatten)]
    in_flight: InFlightArgs,
}

/// Exactly one journey to simulate: a file, or a saved draft.
#[derive(Args)]
#[group(required = true, multiple = false)]
pub struct SimulatedJourney {
    /// A journey file, YAML or JSON (`.json`).
    #[arg(short, long)]
    file: Option<PathBuf>,
    /// A saved journey's draft.
    #[arg(long)]
    id: Option<String>,
}

/// What publishing does to enrollments in flight.
#[derive(Args)]
pub struct InFlightArgs {
    /// Enrollments on earlier versions stay on them, move to the new one (at the node
    /// of the same id, or as `--map` says), or exit.
    #[arg(long, value_enum, default_value = "stay")]
    in_flight: InFlight,
    /// For `--in-flight migrate`: a renamed node, old id to new id; repeatable.
    #[arg(long = "map", value_name = "OLD=NEW", value_parser = parse_mapping)]
    node_map: Vec<(String, String)>,
}

impl InFlightArgs {
    /// The policy and node map of a request; a map only goes with `migrate`, and names
    /// each old node once.
    fn policy(&self) -> anyhow::Result<(i32, HashMap<String, String>)> {
        let policy = match self.in_flight {
            InFlight::Stay => InFlightPolicy::Stay,
            InFlight::Migrate => InFlightPolicy::Migrate,
            InFlight::Exit => InFlightPolicy::Exit,
        };
        if !self.node_map.is_empty() && policy != InFlightPolicy::Migrate {
            bail!("--map moves enrollments between nodes: it needs --in-flight migrate");
        }
        let mut node_map = HashMap::new();
        for (old, new) in &self.node_map {
            if node_map.insert(old.clone(), new.clone()).is_some() {
                bail!("--map names node {old} more than once");
            }
        }
        Ok((policy as i32, node_map))
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum InFlight {
    Stay,
    Migrate,
    Exit,
}

#[derive(Subcommand)]
pub enum EnrollmentsCommand {
    /// Print the enrollments of a journey or of a profile as JSON, newest first.
    List {
        #[command(flatten)]
        of: EnrollmentsOf,
        /// Only enrollments in this state.
        #[arg(long, value_enum)]
        status: Option<EnrollmentState>,
        /// At most this many.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
    },
    /// Print an enrollment with its path (each step, its decision and what decided it)
    /// as JSON.
    Get {
        /// The enrollment id.
        enrollment_id: String,
    },
    /// End an active enrollment by hand; prints it as JSON.
    Exit {
        /// The enrollment id.
        enrollment_id: String,
        /// Recorded as the reason; the server's default when omitted.
        #[arg(long, default_value = "")]
        reason: String,
    },
}

/// Exactly one of a journey and a profile.
#[derive(Args)]
#[group(required = true, multiple = false)]
pub struct EnrollmentsOf {
    /// The journey's enrollments.
    #[arg(long = "journey")]
    journey_id: Option<String>,
    /// The profile's enrollments, across journeys.
    #[arg(long = "profile")]
    profile_id: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum EnrollmentState {
    Active,
    Completed,
    Converted,
    Exited,
    Errored,
}

impl From<EnrollmentState> for EnrollmentStatus {
    fn from(state: EnrollmentState) -> Self {
        match state {
            EnrollmentState::Active => Self::Active,
            EnrollmentState::Completed => Self::Completed,
            EnrollmentState::Converted => Self::Converted,
            EnrollmentState::Exited => Self::Exited,
            EnrollmentState::Errored => Self::Errored,
        }
    }
}

#[derive(Subcommand)]
pub enum ActionsCommand {
    /// Print outbound actions (messages, webhooks, trait updates, escalations) as JSON,
    /// newest first.
    List {
        /// Only this journey's.
        #[arg(long = "journey")]
        journey_id: Option<String>,
        /// Only this profile's.
        #[arg(long = "profile")]
        profile_id: Option<String>,
        /// Only this enrollment's.
        #[arg(long = "enrollment")]
        enrollment_id: Option<String>,
        /// Only actions in this state.
        #[arg(long, value_enum)]
        status: Option<ActionState>,
        /// At most this many.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ActionState {
    Pending,
    Sent,
    Deferred,
    Suppressed,
    Failed,
}

impl From<ActionState> for ActionStatus {
    fn from(state: ActionState) -> Self {
        match state {
            ActionState::Pending => Self::Pending,
            ActionState::Sent => Self::Sent,
            ActionState::Deferred => Self::Deferred,
            ActionState::Suppressed => Self::Suppressed,
            ActionState::Failed => Self::Failed,
        }
    }
}

#[derive(Subcommand)]
pub enum CasesCommand {
    /// Print escalation cases as JSON, newest first.
    List {
        /// Only open cases.
        #[arg(long)]
        open: bool,
        /// Only this profile's.
        #[arg(long = "profile")]
        profile_id: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
    },
    /// Close a case; marketing to its profile resumes when no other case is open. Prints
    /// the case as JSON.
    Close {
        /// The case id.
        case_id: String,
        /// What was done, for the record.
        #[arg(long, default_value = "")]
        resolution: String,
    },
}

#[derive(Subcommand)]
pub enum ContactPolicyCommand {
    /// Print the contact policy in force as JSON, ready to edit and put again.
    Get {
        /// Print YAML instead of JSON.
        #[arg(long)]
        yaml: bool,
    },
    /// Replace the contact policy shared by every journey; prints it as JSON.
    Put {
        /// The policy, YAML or JSON (`.json`).
        #[arg(short, long)]
        file: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum MessagesCommand {
    /// Follow messages as they are sent, printing each one's payload as a JSON line,
    /// oldest first: the most recent ones first, then each new one, until Ctrl-C.
    Tail {
        /// Only this channel's messages.
        #[arg(long)]
        channel: Option<String>,
        /// How often to poll, in milliseconds.
        #[arg(long, default_value_t = 500)]
        interval_ms: u64,
    },
}

fn parse_time(s: &str) -> Result<Timestamp, String> {
    s.parse()
        .map_err(|_| "expected an RFC 3339 time, e.g. 2026-11-01T00:00:00Z".to_owned())
}

fn parse_mapping(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((old, new)) if !old.trim().is_empty() && !new.trim().is_empty() => {
            Ok((old.trim().to_owned(), new.trim().to_owned()))
        }
        _ => Err("expected OLD=NEW node ids, e.g. nudge=reminder".into()),
    }
}

/// A client of the orchestrator, and its endpoint for errors.
fn connect(
    config: &Config,
    target: &OrchestratorTarget,
) -> anyhow::Result<(OrchestrationServiceClient<Channel>, String)> {
    let endpoint = target
        .endpoint
        .clone()
        .unwrap_or_else(|| config.orchestrator_endpoint.clone());
    let client = OrchestrationServiceClient::new(waymark_kit::grpc::channel(&endpoint)?)
        .max_decoding_message_size(waymark_kit::grpc::MAX_MESSAGE_BYTES);
    Ok((client, endpoint))
}

/// Pages of a list until `limit` items (all of them when `None`) or the last page.
async fn collect<T>(
    limit: Option<u32>,
    mut page: impl AsyncFnMut(u32, String) -> anyhow::Result<(Vec<T>, String)>,
) -> anyhow::Result<Vec<T>> {
    let mut items = Vec::new();
    let mut page_token = String::new();
    loop {
        let left = limit.map_or(MAX_PAGE, |l| l.saturating_sub(items.len() as u32));
        if left == 0 {
            break;
        }
        let (mut more, next) = page(left.min(MAX_PAGE), page_token).await?;
        items.append(&mut more);
        if next.is_empty() {
            break;
        }
        page_token = next;
    }
    Ok(items)
}

pub async fn journeys(
    config: &Config,
    target: &OrchestratorTarget,
    command: JourneysCommand,
) -> anyhow::Result<()> {
    let (mut client, endpoint) = connect(config, target)?;
    let fail = |status| rpc_error(status, &endpoint);
    match command {
        JourneysCommand::Validate { file } => {
            let journey = read::<JourneyDefinition>(&file)?;
            let problems = client
                .validate_journey(admin(
                    config,
                    ValidateJourneyRequest {
                        journey: Some(journey),
                    },
                )?)
                .await
                .map_err(fail)?
                .into_inner()
                .problems;
            print_all(&problems)?;
            if !problems.is_empty() {
                bail!("{} problem(s) in {}", problems.len(), file.display());
            }
            Ok(())
        }
        JourneysCommand::Simulate(args) => {
            let (journey, journey_id) = match args.journey {
                SimulatedJourney {
                    file: Some(file), ..
                } => (Some(read::<JourneyDefinition>(&file)?), String::new()),
                SimulatedJourney { id, .. } => (None, id.unwrap_or_default()),
            };
            let (in_flight, node_map) = args.in_flight.policy()?;
            let request = SimulateJourneyRequest {
                journey,
                journey_id,
                from: Some(args.from),
                to: Some(args.to),
                max_events: args.max_events,
                in_flight,
                node_map,
            };
            let counts = client
                .simulate_journey(admin(config, request)?)
                .await
                .map_err(fail)?
                .into_inner();
            print(&counts)
        }
        JourneysCommand::Apply { file } => {
            let journey = read::<JourneyDefinition>(&file)?;
            let saved = client
                .put_journey(admin(
                    config,
                    PutJourneyRequest {
                        journey: Some(journey),
                    },
                )?)
                .await
                .map_err(fail)?
                .into_inner();
            print(&saved.journey.unwrap_or_default())
        }
        JourneysCommand::Publish {
            journey_id,
            in_flight,
        } => {
            let (in_flight, node_map) = in_flight.policy()?;
            let published = client
                .publish_journey(admin(
                    config,
                    PublishJourneyRequest {
                        journey_id,
                        in_flight,
                        node_map,
                    },
                )?)
                .await
                .map_err(fail)?
                .into_inner();
            print(&published)
        }
        JourneysCommand::Pause { journey_id } => {
            let paused = client
                .pause_journey(admin(config, PauseJourneyRequest { journey_id })?)
                .await
                .map_err(fail)?
                .into_inner();
            print(&paused.journey.unwrap_or_default())
        }
        JourneysCommand::Resume { journey_id } => {
            let resumed = client
                .resume_journey(admin(config, ResumeJourneyRequest { journey_id })?)
                .await
                .map_err(fail)?
                .into_inner();
            print(&resumed.journey.unwrap_or_default())
        }
        JourneysCommand::Archive { journey_id } => {
            let archived = client
                .archive_journey(admin(config, ArchiveJourneyRequest { journey_id })?)
                .await
                .map_err(fail)?
                .into_inner();
            print(&archived)
        }
        JourneysCommand::List => {
            let journeys = collect(None, async |page_size, page_token| {
                let page = client
                    .list_journeys(admin(
                        config,
                        ListJourneysRequest {
                            page_size,
                            page_token,
                        },
                    )?)
                    .await
                    .map_err(fail)?
                    .into_inner();
                Ok((page.journeys, page.next_page_token))
            })
            .await?;
            print_all(&journeys)
        }
        JourneysCommand::Get {
            journey_id,
            version,
            yaml,
        } => {
            let found = client
                .get_journey(admin(
                    config,
                    GetJourneyRequest {
                        journey_id,
                        version,
                    },
                )?)
                .await
                .map_err(fail)?
                .into_inner();
            let format = if yaml { Format::Yaml } else { Format::Json };
            print_document(&found.definition.unwrap_or_default(), format)
        }
    }
}

pub async fn enrollments(
    config: &Config,
    target: &OrchestratorTarget,
    command: EnrollmentsCommand,
) -> anyhow::Result<()> {
    let (mut client, endpoint) = connect(config, target)?;
    let fail = |status| rpc_error(status, &endpoint);
    match command {
        EnrollmentsCommand::List { of, status, limit } => {
            let status = status.map_or(EnrollmentStatus::Unspecified, EnrollmentStatus::from);
            let enrollments = collect(Some(limit), async |page_size, page_token| {
                let page = client
                    .list_enrollments(admin(
                        config,
                        ListEnrollmentsRequest {
                            journey_id: of.journey_id.clone().unwrap_or_default(),
                            profile_id: of.profile_id.clone().unwrap_or_default(),
                            status: status as i32,
                            page_size,
                            page_token,
                        },
                    )?)
                    .await
                    .map_err(fail)?
                    .into_inner();
                Ok((page.enrollments, page.next_page_token))
            })
            .await?;
            print_all(&enrollments)
        }
        EnrollmentsCommand::Get { enrollment_id } => {
            let found = client
                .get_enrollment(admin(config, GetEnrollmentRequest { enrollment_id })?)
                .await
                .map_err(fail)?
                .into_inner();
            print(&found)
        }
        EnrollmentsCommand::Exit {
            enrollment_id,
            reason,
        } => {
            let exited = client
                .exit_enrollment(admin(
                    config,
                    ExitEnrollmentRequest {
                        enrollment_id,
                        reason,
                    },
                )?)
                .await
                .map_err(fail)?
                .into_inner();
            print(&exited.enrollment.unwrap_or_default())
        }
    }
}

pub async fn actions(
    config: &Config,
    target: &OrchestratorTarget,
    command: ActionsCommand,
) -> anyhow::Result<()> {
    let (mut client, endpoint) = connect(config, target)?;
    let fail = |status| rpc_error(status, &endpoint);
    let ActionsCommand::List {
        journey_id,
        profile_id,
        enrollment_id,
        status,
        limit,
    } = command;
    let status = status.map_or(ActionStatus::Unspecified, ActionStatus::from);
    let actions = collect(Some(limit), async |page_size, page_token| {
        let page = client
            .list_actions(admin(
                config,
                ListActionsRequest {
                    journey_id: journey_id.clone().unwrap_or_default(),
                    profile_id: profile_id.clone().unwrap_or_default(),
                    enrollment_id: enrollment_id.clone().unwrap_or_default(),
                    status: status as i32,
                    page_size,
                    page_token,
                },
            )?)
            .await
            .map_err(fail)?
            .into_inner();
        Ok((page.actions, page.next_page_token))
    })
    .await?;
    print_all(&actions)
}

pub async fn cases(
    config: &Config,
    target: &OrchestratorTarget,
    command: CasesCommand,
) -> anyhow::Result<()> {
    let (mut client, endpoint) = connect(config, target)?;
    let fail = |status| rpc_error(status, &endpoint);
    match command {
        CasesCommand::List {
            open,
            profile_id,
            limit,
        } => {
            let cases = collect(Some(limit), async |page_size, page_token| {
                let page = client
                    .list_cases(admin(
                        config,
                        ListCasesRequest {
                            open_only: open,
                            profile_id: profile_id.clone().unwrap_or_default(),
                            page_size,
                            page_token,
                        },
                    )?)
                    .await
                    .map_err(fail)?
                    .into_inner();
                Ok((page.cases, page.next_page_token))
            })
            .await?;
            print_all(&cases)
        }
        CasesCommand::Close {
            case_id,
            resolution,
        } => {
            let closed = client
                .close_case(admin(
                    config,
                    CloseCaseRequest {
                        case_id,
                        resolution,
                    },
                )?)
                .await
                .map_err(fail)?
                .into_inner();
            print(&closed.r#case.unwrap_or_default())
        }
    }
}

pub async fn contact_policy(
    config: &Config,
    target: &OrchestratorTarget,
    command: ContactPolicyCommand,
) -> anyhow::Result<()> {
    let (mut client, endpoint) = connect(config, target)?;
    let fail = |status| rpc_error(status, &endpoint);
    match command {
        ContactPolicyCommand::Get { yaml } => {
            let policy = client
                .get_contact_policy(admin(config, GetContactPolicyRequest {})?)
                .await
                .map_err(fail)?
                .into_inner()
                .policy;
            let format = if yaml { Format::Yaml } else { Format::Json };
            print_document(&policy.unwrap_or_default(), format)
        }
        ContactPolicyCommand::Put { file } => {
            let policy = read::<ContactPolicy>(&file)?;
            let stored = client
                .put_contact_policy(admin(
                    config,
                    PutContactPolicyRequest {
                        policy: Some(policy),
                    },
                )?)
                .await
                .map_err(fail)?
                .into_inner()
                .policy;
            print_document(&stored.unwrap_or_default(), Format::Json)
        }
    }
}

pub async fn messages(
    config: &Config,
    target: &OrchestratorTarget,
    command: MessagesCommand,
) -> anyhow::Result<()> {
    let MessagesCommand::Tail {
        channel,
        interval_ms,
    } = command;
    let (mut client, endpoint) = connect(config, target)?;
    // The ids on the newest page when last polled: a sent message leaves that page only
    // once newer ones have pushed it down, so this is all there is to remember.
    let mut seen: HashSet<String> = HashSet::new();
    loop {
        let page = client
            .list_actions(admin(
                config,
                ListActionsRequest {
                    status: ActionStatus::Sent as i32,
                    page_size: MAX_PAGE,
                    ..ListActionsRequest::default()
                },
            )?)
            .await
            .map_err(|status| rpc_error(status, &endpoint))?
            .into_inner();
        let messages: Vec<Action> = page
            .actions
            .into_iter()
            .filter(|a| a.kind == "message")
            .filter(|a| channel.as_ref().is_none_or(|c| &a.target == c))
            .collect();
        let mut new: Vec<&Action> = messages
            .iter()
            .filter(|a| !seen.contains(&a.action_id))
            .collect();
        new.sort_by_key(|a| sent_order(a));
        let mut lines = String::new();
        for action in new {
            let payload = action
                .payload
                .as_ref()
                .map(struct_to_json)
                .unwrap_or_default();
            lines.push_str(&serde_json::to_string(&payload)?);
            lines.push('\n');
        }
        journey_file::write_stdout(lines.as_bytes())?;
        seen = messages.into_iter().map(|a| a.action_id).collect();
        tokio::time::sleep(Duration::from_millis(interval_ms.max(100))).await;
    }
}

/// When a message went out (then when it was made, for ties), to print oldest first.
fn sent_order(action: &Action) -> (i64, i32, i64, i32) {
    let at = |t: Option<&Timestamp>| t.map_or((0, 0), |t| (t.seconds, t.nanos));
    let (sent_s, sent_n) = at(action.sent_at.as_ref());
    let (made_s, made_n) = at(action.created_at.as_ref());
    (sent_s, sent_n, made_s, made_n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_mappings_are_old_equals_new() {
        assert_eq!(
            parse_mapping("nudge = reminder").unwrap(),
            ("nudge".to_owned(), "reminder".to_owned())
        );
        for bad in ["nudge", "=reminder", "nudge=", " = "] {
            assert!(parse_mapping(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_node_map_goes_with_migrate_and_names_each_node_once() {
        let args = |in_flight, pairs: &[(&str, &str)]| InFlightArgs {
            in_flight,
            node_map: pairs
                .iter()
                .map(|(o, n)| (o.to_string(), n.to_string()))
                .collect(),
        };
        let (policy, map) = args(InFlight::Migrate, &[("a", "b"), ("c", "b")])
            .policy()
            .unwrap();
        assert_eq!(policy, InFlightPolicy::Migrate as i32);
        assert_eq!(map.len(), 2);
        let error = args(InFlight::Stay, &[("a", "b")]).policy().unwrap_err();
        assert!(error.to_string().contains("--in-flight migrate"), "{error}");
        let error = args(InFlight::Migrate, &[("a", "b"), ("a", "c")])
            .policy()
            .unwrap_err();
        assert!(error.to_string().contains("node a"), "{error}");
        assert_eq!(
            args(InFlight::Exit, &[]).policy().unwrap().0,
            InFlightPolicy::Exit as i32
        );
    }

    #[test]
    fn times_are_rfc_3339() {
        let t = parse_time("2026-11-01T10:00:00+01:00").unwrap();
        assert_eq!(
            t.seconds,
            parse_time("2026-11-01T09:00:00Z").unwrap().seconds
        );
        assert!(parse_time("yesterday").unwrap_err().contains("RFC 3339"));
    }

    #[test]
    fn messages_print_in_the_order_they_were_sent() {
        let at = |seconds| Some(Timestamp { seconds, nanos: 0 });
        let sent = |sent_at, created_at| Action {
            sent_at: at(sent_at),
            created_at: at(created_at),
            ..Action::default()
        };
        let mut actions = [sent(20, 1), sent(10, 5), sent(10, 2)];
        actions.sort_by_key(sent_order);
        let order: Vec<_> = actions
            .iter()
            .map(|a| (a.sent_at.unwrap().seconds, a.created_at.unwrap().seconds))
            .collect();
        assert_eq!(order, [(10, 2), (10, 5), (20, 1)]);
    }

    #[tokio::test]
    async fn pages_are_followed_to_the_limit_or_the_last_page() {
        let mut asked = Vec::new();
        let items = collect(Some(2500), async |size, token: String| {
            asked.push((size, token.clone()));
            let n: u32 = token.parse().unwrap_or(0);
            let next = if n < 5 {
                (n + 1).to_string()
            } else {
                String::new()
            };
            Ok((vec![n; size as usize], next))
        })
        .await
        .unwrap();
        assert_eq!(items.len(), 2500);
        assert_eq!(
            asked,
            [(1000, String::new()), (1000, "1".into()), (500, "2".into())]
        );
        let mut pages = 0;
        let all = collect(None, async |size, token: String| {
            pages += 1;
            let next = if token.is_empty() {
                "last".to_owned()
            } else {
                String::new()
            };
            Ok((vec![(); size as usize / 100], next))
        })
        .await
        .unwrap();
        assert_eq!((all.len(), pages), (20, 2));
    }

    #[tokio::test]
    async fn an_invalid_journey_file_is_refused_before_any_call() {
        // Nothing listens on port 9: the error must come from reading the file.
        let target = OrchestratorTarget {
            endpoint: Some("http://127.0.0.1:9".into()),
        };
        let file = std::env::temp_dir().join(format!("waymark-bad-{}.yaml", std::process::id()));
        std::fs::write(
            &file,
            "journeyId: a\nentry: { start: x, reentry: SOMETIMES }\n",
        )
        .unwrap();
        let error = journeys(
            &Config::default(),
            &target,
            JourneysCommand::Apply { file: file.clone() },
        )
        .await
        .unwrap_err();
        std::fs::remove_file(&file).unwrap();
        let error = format!("{error:#}");
        assert!(error.contains("entry.reentry: "), "{error}");
        assert!(error.contains("REENTRY_AFTER_EXIT"), "{error}");
    }
}
