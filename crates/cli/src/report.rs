//! `waymark report`: funnels, paths, journey reports, CX metrics, SLA breaches and the
//! stage distribution from the analytics service, printed as tables with bars (`text`),
//! as proto3 JSON (`--format json`), and for funnels and paths also as SVG (`svg`).

pub mod svg;
pub mod text;

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use prost::{Message, Name};
use tonic::transport::Channel;
use waymark_kit::config::Config;
use waymark_proto::analytics::v1::analytics_service_client::AnalyticsServiceClient;
use waymark_proto::analytics::v1::*;
use waymark_proto::prost_types::Timestamp;

use crate::client::{admin, rpc_error};
use crate::journey_file::{print, write_stdout};

/// Which analytics service to talk to.
#[derive(Args)]
pub struct AnalyticsTarget {
    /// gRPC endpoint of the analytics service; the `analytics_endpoint` setting
    /// (`http://127.0.0.1:50054` unless configured) when omitted.
    #[arg(long, global = true, env = "WAYMARK_ANALYTICS_ENDPOINT")]
    pub endpoint: Option<String>,
}

/// A client of the analytics service, and its endpoint for errors.
pub fn connect(
    config: &Config,
    target: &AnalyticsTarget,
) -> anyhow::Result<(AnalyticsServiceClient<Channel>, String)> {
    let endpoint = target
        .endpoint
        .clone()
        .unwrap_or_else(|| config.analytics_endpoint.clone());
    let client = AnalyticsServiceClient::new(waymark_kit::grpc::channel(&endpoint)?)
        .max_decoding_message_size(waymark_kit::grpc::MAX_MESSAGE_BYTES);
    Ok((client, endpoint))
}

/// How a reply is printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// A table with bars, as wide as the terminal (80 columns when not one).
    Table,
    /// The reply as proto3 JSON, for scripts.
    Json,
}

#[derive(Args)]
pub struct OutputArgs {
    /// Print a table, or the reply as proto3 JSON.
    #[arg(long, value_enum, default_value = "table")]
    format: Output,
}

/// The range of event time a report covers.
#[derive(Args)]
pub struct RangeArgs {
    /// From this time: RFC 3339 (2026-11-01T00:00:00Z) or a time ago (30d, 12h, 1w).
    #[arg(long, value_parser = when)]
    since: Option<Timestamp>,
    /// Until this time (exclusive), in the same forms; open when omitted.
    #[arg(long, value_parser = when)]
    until: Option<Timestamp>,
}

impl RangeArgs {
    fn range(&self) -> anyhow::Result<Option<TimeRange>> {
        if let (Some(since), Some(until)) = (&self.since, &self.until)
            && (since.seconds, since.nanos) >= (until.seconds, until.nanos)
        {
            bail!("--since must be before --until");
        }
        Ok(
            (self.since.is_some() || self.until.is_some()).then_some(TimeRange {
                start: self.since,
                end: self.until,
            }),
        )
    }
}

#[derive(Subcommand)]
pub enum ReportCommand {
    /// Conversion through steps: per step how many reached it, the conversion, the
    /// drop-off and the time it took (median, 90th percentile), for everyone and per
    /// breakdown group.
    Funnel(FunnelArgs),
    /// What customers did after (or before) an anchor event: the transitions by depth
    /// and the most common paths to drop-off.
    Paths(PathsArgs),
    /// How a journey performs: per node what happened to its enrollments, and each random
    /// split's arms against control with uplift, interval, p-value and a sample-ratio
    /// check.
    // `--version` here is the journey's, not the binary's.
    #[command(disable_version_flag = true)]
    Journey(JourneyArgs),
    /// CSAT, NPS, sentiment, complaints and escalations by stage, channel or touchpoint
    /// and time bucket.
    Cx(CxArgs),
    /// Where a journey map's standard times are broken: stages and interactions that took
    /// too long, customers stuck now, and dead ends.
    Sla(SlaArgs),
    /// How many customers are at each stage of a journey map now, and how many are stuck.
    Stages(StagesArgs),
}

#[derive(Args)]
pub struct FunnelArgs {
    /// A step, in order (at least two): an event name, optionally followed by `|` and a
    /// CEL condition over `properties` and `channel`, e.g. --step "Product Viewed" --step
    /// 'Order Completed|properties.revenue > 50'. Everything after the first `|` is the
    /// condition, so it may use `||`.
    #[arg(long = "step", value_name = "NAME[|CONDITION]", value_parser = parse_matcher, required = true)]
    steps: Vec<EventMatcher>,
    /// How long after the first step the last may come (30m, 7d, 1w); 30 days when
    /// omitted.
    #[arg(long, value_parser = duration_text)]
    window: Option<String>,
    /// How the steps must follow one another: in order with anything in between, right
    /// after one another, in any order, or the first step first and the rest in any
    /// order.
    #[arg(long, value_enum, default_value = "ordered")]
    order: Order,
    /// What is counted: each customer once, every attempt, or each enrollment in
    /// --journey.
    #[arg(long, value_enum, default_value = "customers")]
    counting: Counting,
    /// The journey whose enrollments are counted (with --counting enrollments).
    #[arg(long = "journey", value_name = "JOURNEY_ID")]
    journey_id: Option<String>,
    /// An event that disqualifies an attempt when it happens after step FROM was reached
    /// and before step TO was (steps numbered from 1, as in the table), e.g.
    /// 'Cart Emptied:2-3'; repeatable.
    #[arg(long = "exclude", value_name = "NAME[|CONDITION]:FROM-TO", value_parser = parse_exclusion)]
    exclusions: Vec<Excluded>,
    /// A property every step of an attempt must share the value of, e.g. cart_id;
    /// repeatable.
    #[arg(long = "hold", value_name = "PROPERTY")]
    hold_constant: Vec<String>,
    #[command(flatten)]
    range: RangeArgs,
    /// Break down by a property of the first step's event, its channel, membership of
    /// segments, or the arm of a journey's random split.
    #[arg(
        long = "by",
        value_name = "property:NAME|channel|segments:ID,ID|variant:JOURNEY[/NODE]",
        value_parser = parse_breakdown
    )]
    breakdown: Option<Breakdown>,
    /// At most this many breakdown groups, largest first.
    #[arg(long, default_value_t = 25, value_parser = clap::value_parser!(u32).range(1..))]
    limit: u32,
    /// Also write the funnel as an SVG image to this file.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Order {
    Ordered,
    Strict,
    Any,
    Anchored,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Counting {
    Customers,
    Totals,
    Enrollments,
}

/// An exclusion as given: steps numbered from 1.
#[derive(Clone, Debug, PartialEq)]
pub struct Excluded {
    event: EventMatcher,
    from: u32,
    to: u32,
}

impl FunnelArgs {
    fn request(&self) -> anyhow::Result<GetFunnelRequest> {
        let steps = self.steps.len() as u32;
        if steps < 2 {
            bail!("a funnel needs at least two --step");
        }
        let mut exclusions = Vec::with_capacity(self.exclusions.len());
        for e in &self.exclusions {
            if e.to > steps {
                bail!(
                    "--exclude {}:{}-{} names step {}, but there are {steps} steps",
                    e.event.event,
                    e.from,
                    e.to,
                    e.to
                );
            }
            exclusions.push(FunnelExclusion {
                event: Some(e.event.clone()),
                from_step: e.from - 1,
                to_step: e.to - 1,
            });
        }
        let counting = match (self.counting, &self.journey_id) {
            (Counting::Enrollments, None) => {
                bail!("--counting enrollments counts a journey's enrollments: give --journey")
            }
            (Counting::Enrollments, Some(_)) => FunnelCounting::Enrollments,
            (_, Some(_)) => bail!("--journey goes with --counting enrollments"),
            (Counting::Customers, None) => FunnelCounting::UniqueCustomers,
            (Counting::Totals, None) => FunnelCounting::Totals,
        };
        let order = match self.order {
            Order::Ordered => FunnelOrder::Ordered,
            Order::Strict => FunnelOrder::Strict,
            Order::Any => FunnelOrder::Any,
            Order::Anchored => FunnelOrder::Anchored,
        };
        Ok(GetFunnelRequest {
            steps: self.steps.clone(),
            order: order as i32,
            window: self.window.clone().unwrap_or_default(),
            exclusions,
            hold_constant: self.hold_constant.clone(),
            counting: counting as i32,
            range: self.range.range()?,
            breakdown: self.breakdown.clone(),
            journey_id: self.journey_id.clone().unwrap_or_default(),
            breakdown_limit: self.limit,
        })
    }
}

#[derive(Args)]
pub struct PathsArgs {
    /// The event paths start (or end) at, NAME[|CONDITION] as in funnel steps; the first
    /// event of each session when omitted.
    #[arg(long, value_name = "NAME[|CONDITION]", value_parser = parse_matcher)]
    anchor: Option<EventMatcher>,
    /// What customers did before the anchor.
    #[arg(long, conflicts_with = "after")]
    before: bool,
    /// What customers did after the anchor (the default).
    #[arg(long)]
    after: bool,
    /// How many steps from the anchor.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=20))]
    depth: u32,
    /// What the nodes are: event names, touchpoints (channel and event), or the stages
    /// of --map the events enter.
    #[arg(long, value_enum, default_value = "event")]
    nodes: Nodes,
    /// The journey map whose stages are the nodes (with --nodes stage).
    #[arg(long = "map", value_name = "MAP_ID")]
    map_id: Option<String>,
    /// The conversion, NAME[|CONDITION]: a path that reaches it ends there; one that ends
    /// without it is a path to drop-off.
    #[arg(long, value_name = "NAME[|CONDITION]", value_parser = parse_matcher)]
    goal: Option<EventMatcher>,
    /// A path ends at a gap between events longer than this (30m when omitted).
    #[arg(long, value_parser = duration_text)]
    session_gap: Option<String>,
    /// Count consecutive repeats of one node as separate steps.
    #[arg(long)]
    keep_repeats: bool,
    #[command(flatten)]
    range: RangeArgs,
    /// At most this many links per depth and paths to drop-off.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    limit: u32,
    /// Also write the paths as an SVG Sankey diagram to this file.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Nodes {
    Event,
    Touchpoint,
    Stage,
}

impl PathsArgs {
    fn request(&self) -> anyhow::Result<GetPathsRequest> {
        let node_kind = match (self.nodes, &self.map_id) {
            (Nodes::Stage, None) => bail!("--nodes stage needs the journey map: give --map"),
            (Nodes::Stage, Some(_)) => PathNodeKind::Stage,
            (_, Some(_)) => bail!("--map names the stages of --nodes stage"),
            (Nodes::Event, None) => PathNodeKind::Event,
            (Nodes::Touchpoint, None) => PathNodeKind::Touchpoint,
        };
        let direction = if self.before {
            PathDirection::Before
        } else {
            PathDirection::After
        };
        Ok(GetPathsRequest {
            anchor: self.anchor.clone(),
            direction: direction as i32,
            depth: self.depth,
            node_kind: node_kind as i32,
            map_id: self.map_id.clone().unwrap_or_default(),
            session_gap: self.session_gap.clone().unwrap_or_default(),
            range: self.range.range()?,
            goal: self.goal.clone(),
            collapse_repeats: Some(!self.keep_repeats),
            limit: self.limit,
        })
    }
}

#[derive(Args)]
pub struct JourneyArgs {
    /// The journey id.
    journey_id: String,
    /// Only enrollments on this published version; all versions when omitted.
    #[arg(long, default_value_t = 0)]
    version: u32,
    /// The confidence level of the uplift intervals, between 0 and 1.
    #[arg(long, default_value_t = 0.95, value_parser = confidence)]
    confidence: f64,
    #[command(flatten)]
    range: RangeArgs,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Args)]
pub struct CxArgs {
    /// Group by the customer's stage of --map, the signal's channel, or the touchpoint the
    /// feedback is about; one group over everything when omitted.
    #[arg(long = "by", value_enum)]
    group_by: Option<CxBy>,
    /// The journey map whose stages group the metrics (with --by stage).
    #[arg(long = "map", value_name = "MAP_ID")]
    map_id: Option<String>,
    /// The width of time buckets (1h, 1d, 1w), aligned to the Unix epoch in UTC; one
    /// bucket over the whole range when omitted.
    #[arg(long, value_parser = duration_text)]
    bucket: Option<String>,
    #[command(flatten)]
    range: RangeArgs,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum CxBy {
    Stage,
    Channel,
    Touchpoint,
}

impl CxArgs {
    fn request(&self) -> anyhow::Result<GetCxMetricsRequest> {
        let group_by = match (self.group_by, &self.map_id) {
            (Some(CxBy::Stage), None) => bail!("--by stage needs the journey map: give --map"),
            (Some(CxBy::Stage), Some(_)) => CxGrouping::Stage,
            (_, Some(_)) => bail!("--map names the stages of --by stage"),
            (Some(CxBy::Channel), None) => CxGrouping::Channel,
            (Some(CxBy::Touchpoint), None) => CxGrouping::Touchpoint,
            (None, None) => CxGrouping::Unspecified,
        };
        Ok(GetCxMetricsRequest {
            group_by: group_by as i32,
            map_id: self.map_id.clone().unwrap_or_default(),
            range: self.range.range()?,
            bucket: self.bucket.clone().unwrap_or_default(),
        })
    }
}

#[derive(Args)]
pub struct SlaArgs {
    /// The journey map.
    #[arg(long = "map", value_name = "MAP_ID")]
    map_id: String,
    /// At most this many stuck customers per stage.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    stuck_limit: u32,
    #[command(flatten)]
    range: RangeArgs,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Args)]
pub struct StagesArgs {
    /// The journey map.
    #[arg(long = "map", value_name = "MAP_ID")]
    map_id: String,
    #[command(flatten)]
    output: OutputArgs,
}

/// An event and an optional condition, `NAME|CONDITION`: the name is everything before
/// the first `|`, so the condition may hold `||`.
pub fn parse_matcher(text: &str) -> Result<EventMatcher, String> {
    let (event, condition) = match text.split_once('|') {
        Some((event, condition)) => {
            let condition = condition.trim();
            if condition.is_empty() {
                return Err(format!(
                    "{text:?} has nothing after `|`; leave out the `|` for no condition"
                ));
            }
            (event.trim(), condition)
        }
        None => (text.trim(), ""),
    };
    if event.is_empty() {
        return Err(format!(
            "{text:?} has no event name; expected NAME or NAME|CONDITION, e.g. \
             'Product Viewed|properties.price > 50'"
        ));
    }
    Ok(EventMatcher {
        event: event.to_owned(),
        condition: condition.to_owned(),
    })
}

/// `NAME[|CONDITION]:FROM-TO`, steps numbered from 1. The step range is after the last
/// `:`, so the condition may hold `:` (a map literal, `a ? b : c`).
fn parse_exclusion(text: &str) -> Result<Excluded, String> {
    let form =
        "expected NAME[|CONDITION]:FROM-TO with steps numbered from 1, e.g. 'Cart Emptied:2-3'";
    let (matcher, steps) = text
        .rsplit_once(':')
        .ok_or_else(|| format!("{text:?} has no step range; {form}"))?;
    let (from, to) = steps
        .trim()
        .split_once('-')
        .and_then(|(from, to)| {
            Some((
                from.trim().parse::<u32>().ok()?,
                to.trim().parse::<u32>().ok()?,
            ))
        })
        .ok_or_else(|| format!("{text:?} ends in {steps:?}, not FROM-TO; {form}"))?;
    if from == 0 || to <= from {
        return Err(format!(
            "{text:?}: the steps must run from one step to a later one, counted from 1"
        ));
    }
    Ok(Excluded {
        event: parse_matcher(matcher)?,
        from,
        to,
    })
}

/// `property:NAME`, `channel`, `segments:ID,ID` or `variant:JOURNEY[/NODE]`.
fn parse_breakdown(text: &str) -> Result<Breakdown, String> {
    use breakdown::By;
    let form = "expected property:NAME, channel, segments:ID[,ID...] or variant:JOURNEY[/NODE]";
    let (kind, value) = match text.trim().split_once(':') {
        Some((kind, value)) => (kind.trim(), Some(value.trim())),
        None => (text.trim(), None),
    };
    let by = match (kind, value) {
        ("channel", None) => By::Channel(true),
        ("property", Some(name)) if !name.is_empty() => By::Property(name.to_owned()),
        ("segments", Some(ids)) => {
            let segment_ids: Vec<String> = ids.split(',').map(|id| id.trim().to_owned()).collect();
            if segment_ids.iter().any(String::is_empty) {
                return Err(format!("{text:?} has an empty segment id; {form}"));
            }
            By::Segments(SegmentList { segment_ids })
        }
        ("variant", Some(split)) => {
            let (journey_id, node_id) = split.split_once('/').unwrap_or((split, ""));
            let (journey_id, node_id) = (journey_id.trim(), node_id.trim());
            if journey_id.is_empty() || (split.contains('/') && node_id.is_empty()) {
                return Err(format!(
                    "{text:?} needs a journey id (and a node id after `/`); {form}"
                ));
            }
            By::JourneyVariant(JourneyVariant {
                journey_id: journey_id.to_owned(),
                node_id: node_id.to_owned(),
            })
        }
        _ => return Err(format!("{text:?}: {form}")),
    };
    Ok(Breakdown { by: Some(by) })
}

/// A duration as the services read them (90s, 30m, 7d, 1w, 1h30m), checked here so a
/// typo is named before any call, and sent as written.
fn duration_text(text: &str) -> Result<String, String> {
    waymark_orchestrator::schedule::parse_duration(text)?;
    Ok(text.trim().to_owned())
}

fn when(text: &str) -> Result<Timestamp, String> {
    parse_when(text, waymark_kit::time::now_micros())
}

/// An RFC 3339 time, or a duration meaning that long before `now_us` (30d: thirty days
/// ago).
fn parse_when(text: &str, now_us: i64) -> Result<Timestamp, String> {
    let text = text.trim();
    if let Ok(at) = text.parse::<Timestamp>() {
        return Ok(at);
    }
    match waymark_orchestrator::schedule::parse_duration(text) {
        Ok(ago) => Ok(waymark_kit::time::from_micros(
            now_us.saturating_sub(waymark_kit::time::duration_micros(ago)),
        )),
        Err(_) => Err(format!(
            "{text:?} is neither an RFC 3339 time (2026-11-01T00:00:00Z) nor a time ago \
             (30d, 12h, 1w, 1d12h)"
        )),
    }
}

fn confidence(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(level) if level > 0.0 && level < 1.0 => Ok(level),
        _ => Err(format!(
            "{text:?} is not a level between 0 and 1, e.g. 0.95"
        )),
    }
}

/// Prints a reply as the table `render` lays out for the terminal, or as proto3 JSON.
fn show<T: Message + Name>(
    output: &OutputArgs,
    reply: &T,
    render: impl FnOnce(&T, usize) -> String,
) -> anyhow::Result<()> {
    match output.format {
        Output::Json => print(reply),
        Output::Table => write_stdout(render(reply, text::terminal_width()).as_bytes()),
    }
}

fn write_svg(path: &Path, svg: &str) -> anyhow::Result<()> {
    std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

pub async fn run(
    config: &Config,
    target: &AnalyticsTarget,
    command: ReportCommand,
) -> anyhow::Result<()> {
    let (mut client, endpoint) = connect(config, target)?;
    let fail = |status| rpc_error(status, &endpoint);
    match command {
        ReportCommand::Funnel(args) => {
            let request = args.request()?;
            let funnel = client
                .get_funnel(admin(config, request)?)
                .await
                .map_err(fail)?
                .into_inner();
            if let Some(path) = &args.svg {
                write_svg(path, &svg::funnel(&funnel))?;
            }
            show(&args.output, &funnel, text::funnel)
        }
        ReportCommand::Paths(args) => {
            let request = args.request()?;
            let paths = client
                .get_paths(admin(config, request)?)
                .await
                .map_err(fail)?
                .into_inner();
            if let Some(path) = &args.svg {
                write_svg(path, &svg::paths(&paths, args.before))?;
            }
            show(&args.output, &paths, text::paths)
        }
        ReportCommand::Journey(args) => {
            let request = GetJourneyReportRequest {
                journey_id: args.journey_id.clone(),
                version: args.version,
                range: args.range.range()?,
                confidence: args.confidence,
            };
            let report = client
                .get_journey_report(admin(config, request)?)
                .await
                .map_err(fail)?
                .into_inner();
            show(&args.output, &report, text::journey)
        }
        ReportCommand::Cx(args) => {
            let request = args.request()?;
            let metrics = client
                .get_cx_metrics(admin(config, request)?)
                .await
                .map_err(fail)?
                .into_inner();
            show(&args.output, &metrics, text::cx)
        }
        ReportCommand::Sla(args) => {
            let request = GetSlaBreachesRequest {
                map_id: args.map_id.clone(),
                range: args.range.range()?,
                stuck_limit: args.stuck_limit,
            };
            let breaches = client
                .get_sla_breaches(admin(config, request)?)
                .await
                .map_err(fail)?
                .into_inner();
            show(&args.output, &breaches, text::sla)
        }
        ReportCommand::Stages(args) => {
            let request = GetStageDistributionRequest {
                map_id: args.map_id.clone(),
            };
            let distribution = client
                .get_stage_distribution(admin(config, request)?)
                .await
                .map_err(fail)?
                .into_inner();
            show(&args.output, &distribution, text::stages)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// The report verbs alone, parsed as the binary parses them.
    #[derive(Parser)]
    struct Report {
        #[command(subcommand)]
        command: ReportCommand,
    }

    fn parse(args: &[&str]) -> Result<ReportCommand, clap::Error> {
        Report::try_parse_from(std::iter::once("report").chain(args.iter().copied()))
            .map(|r| r.command)
    }

    fn funnel(args: &[&str]) -> anyhow::Result<GetFunnelRequest> {
        match parse(&[&["funnel"], args].concat())? {
            ReportCommand::Funnel(args) => args.request(),
            _ => unreachable!("a funnel"),
        }
    }

    fn matcher(event: &str, condition: &str) -> EventMatcher {
        EventMatcher {
            event: event.into(),
            condition: condition.into(),
        }
    }

    #[test]
    fn a_step_is_a_name_and_an_optional_condition_after_a_bar() {
        assert_eq!(
            parse_matcher(" Product Viewed ").unwrap(),
            matcher("Product Viewed", "")
        );
        assert_eq!(
            parse_matcher("Order Completed | properties.revenue > 50").unwrap(),
            matcher("Order Completed", "properties.revenue > 50")
        );
        assert_eq!(
            parse_matcher("Page Viewed|channel == \"web\" || channel == \"mobile\"").unwrap(),
            matcher("Page Viewed", "channel == \"web\" || channel == \"mobile\"")
        );
        assert!(
            parse_matcher("|properties.a == 1")
                .unwrap_err()
                .contains("no event name")
        );
        assert!(parse_matcher("  ").is_err());
        assert!(
            parse_matcher("Page Viewed| ")
                .unwrap_err()
                .contains("nothing after")
        );
    }

    #[test]
    fn a_funnel_request_carries_every_option() {
        let request = funnel(&[
            "--step",
            "Product Viewed|properties.category == \"shoes\"",
            "--step",
            "Checkout Started",
            "--step",
            "Order Completed",
            "--window",
            "7d",
            "--order",
            "strict",
            "--counting",
            "totals",
            "--exclude",
            "Cart Emptied:2-3",
            "--exclude",
            "Page Viewed|{\"a\": 1}[\"a\"] == 1:1-2",
            "--hold",
            "cart_id",
            "--since",
            "2026-11-01T00:00:00Z",
            "--until",
            "2026-12-01T00:00:00Z",
            "--by",
            "property:plan",
            "--limit",
            "10",
        ])
        .unwrap();
        assert_eq!(
            request.steps,
            [
                matcher("Product Viewed", "properties.category == \"shoes\""),
                matcher("Checkout Started", ""),
                matcher("Order Completed", ""),
            ]
        );
        assert_eq!(request.window, "7d");
        assert_eq!(request.order, FunnelOrder::Strict as i32);
        assert_eq!(request.counting, FunnelCounting::Totals as i32);
        assert_eq!(
            request.exclusions,
            [
                FunnelExclusion {
                    event: Some(matcher("Cart Emptied", "")),
                    from_step: 1,
                    to_step: 2,
                },
                FunnelExclusion {
                    event: Some(matcher("Page Viewed", "{\"a\": 1}[\"a\"] == 1")),
                    from_step: 0,
                    to_step: 1,
                },
            ]
        );
        assert_eq!(request.hold_constant, ["cart_id"]);
        let range = request.range.unwrap();
        assert_eq!(range.start.unwrap().seconds, 1_793_491_200);
        assert_eq!(range.end.unwrap().seconds, 1_796_083_200);
        assert_eq!(
            request.breakdown.unwrap().by,
            Some(breakdown::By::Property("plan".into()))
        );
        assert_eq!(request.breakdown_limit, 10);
        assert_eq!(request.journey_id, "");
    }

    #[test]
    fn funnel_defaults_and_mistakes() {
        let request = funnel(&["--step", "A", "--step", "B"]).unwrap();
        assert_eq!(request.order, FunnelOrder::Ordered as i32);
        assert_eq!(request.counting, FunnelCounting::UniqueCustomers as i32);
        assert_eq!(request.window, "");
        assert_eq!(request.range, None);
        assert_eq!(request.breakdown, None);
        assert_eq!(request.breakdown_limit, 25);

        let error = funnel(&["--step", "A"]).unwrap_err().to_string();
        assert!(error.contains("at least two"), "{error}");
        assert!(funnel(&[]).is_err());
        let error = funnel(&["--step", "A", "--step", "B", "--exclude", "C:2-3"])
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("names step 3, but there are 2 steps"),
            "{error}"
        );
        let error = funnel(&["--step", "A", "--step", "B", "--counting", "enrollments"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("give --journey"), "{error}");
        let error = funnel(&["--step", "A", "--step", "B", "--journey", "welcome"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("--counting enrollments"), "{error}");
        let request = funnel(&[
            "--step",
            "A",
            "--step",
            "B",
            "--journey",
            "welcome",
            "--counting",
            "enrollments",
        ])
        .unwrap();
        assert_eq!(request.counting, FunnelCounting::Enrollments as i32);
        assert_eq!(request.journey_id, "welcome");
        for bad in [
            ["--window", "7 days"],
            ["--order", "sorted"],
            ["--by", "plan"],
            ["--since", "last week"],
            ["--limit", "0"],
        ] {
            assert!(
                funnel(&[&["--step", "A", "--step", "B"], &bad[..]].concat()).is_err(),
                "{bad:?}"
            );
        }
        let error = funnel(&[
            "--step",
            "A",
            "--step",
            "B",
            "--since",
            "2026-12-01T00:00:00Z",
            "--until",
            "2026-11-01T00:00:00Z",
        ])
        .unwrap_err()
        .to_string();
        assert!(error.contains("--since must be before --until"), "{error}");
    }

    #[test]
    fn exclusions_name_an_event_and_the_steps_between_which_it_counts() {
        assert_eq!(
            parse_exclusion("Cart Emptied|properties.items == 0 : 1 - 3").unwrap(),
            Excluded {
                event: matcher("Cart Emptied", "properties.items == 0"),
                from: 1,
                to: 3,
            }
        );
        assert_eq!(
            parse_exclusion("Price Shown|properties.sale ? true : false:2-3")
                .unwrap()
                .event,
            matcher("Price Shown", "properties.sale ? true : false")
        );
        for bad in ["Cart Emptied", "Cart Emptied:2", "Cart Emptied:a-b", ":1-2"] {
            assert!(parse_exclusion(bad).is_err(), "{bad}");
        }
        for backwards in ["Cart Emptied:2-2", "Cart Emptied:3-1", "Cart Emptied:0-1"] {
            assert!(
                parse_exclusion(backwards)
                    .unwrap_err()
                    .contains("counted from 1"),
                "{backwards}"
            );
        }
    }

    #[test]
    fn breakdowns_by_property_channel_segments_and_variant() {
        use breakdown::By;
        let by = |text| parse_breakdown(text).map(|b| b.by.unwrap());
        assert_eq!(by("property:plan"), Ok(By::Property("plan".into())));
        assert_eq!(by("channel"), Ok(By::Channel(true)));
        assert_eq!(
            by("segments:vip, churn-risk"),
            Ok(By::Segments(SegmentList {
                segment_ids: vec!["vip".into(), "churn-risk".into()],
            }))
        );
        assert_eq!(
            by("variant:welcome/split"),
            Ok(By::JourneyVariant(JourneyVariant {
                journey_id: "welcome".into(),
                node_id: "split".into(),
            }))
        );
        assert_eq!(
            by("variant:welcome"),
            Ok(By::JourneyVariant(JourneyVariant {
                journey_id: "welcome".into(),
                node_id: String::new(),
            }))
        );
        for bad in [
            "plan",
            "property:",
            "channel:web",
            "segments:",
            "segments:vip,,x",
            "variant:",
            "variant:welcome/",
            "variant:/split",
            "cohort:a",
        ] {
            assert!(by(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn times_are_rfc_3339_or_a_time_ago() {
        let now = 1_796_083_200_000_000; // 2026-12-01T00:00:00Z
        assert_eq!(
            parse_when("2026-11-01T01:00:00+01:00", now).unwrap(),
            Timestamp {
                seconds: 1_793_491_200,
                nanos: 0
            }
        );
        assert_eq!(
            parse_when("30d", now).unwrap().seconds,
            1_796_083_200 - 30 * 86_400
        );
        assert_eq!(
            parse_when(" 1d12h ", now).unwrap().seconds,
            1_796_083_200 - 36 * 3600
        );
        assert_eq!(parse_when("1w", now).unwrap().seconds, 1_795_478_400);
        for bad in ["yesterday", "30 days", "0d", ""] {
            assert!(
                parse_when(bad, now).unwrap_err().contains("RFC 3339"),
                "{bad}"
            );
        }
    }

    #[test]
    fn durations_are_checked_and_sent_as_written() {
        assert_eq!(duration_text(" 7d ").unwrap(), "7d");
        assert_eq!(duration_text("1h30m").unwrap(), "1h30m");
        assert!(duration_text("7 days").is_err());
        assert!(duration_text("0m").is_err());
    }

    #[test]
    fn a_paths_request_and_its_mistakes() {
        let paths = |args: &[&str]| match parse(&[&["paths"], args].concat())? {
            ReportCommand::Paths(args) => args.request(),
            _ => unreachable!("paths"),
        };
        let request = paths(&[
            "--anchor",
            "Product Viewed|properties.price > 50",
            "--before",
            "--depth",
            "3",
            "--nodes",
            "stage",
            "--map",
            "retail",
            "--goal",
            "Order Completed",
            "--session-gap",
            "45m",
            "--keep-repeats",
            "--since",
            "2026-11-01T00:00:00Z",
        ])
        .unwrap();
        assert_eq!(
            request.anchor,
            Some(matcher("Product Viewed", "properties.price > 50"))
        );
        assert_eq!(request.direction, PathDirection::Before as i32);
        assert_eq!(request.depth, 3);
        assert_eq!(request.node_kind, PathNodeKind::Stage as i32);
        assert_eq!(request.map_id, "retail");
        assert_eq!(request.goal, Some(matcher("Order Completed", "")));
        assert_eq!(request.session_gap, "45m");
        assert_eq!(request.collapse_repeats, Some(false));
        assert_eq!(request.range.unwrap().end, None);
        assert_eq!(request.limit, 50);

        let request = paths(&[]).unwrap();
        assert_eq!(request.anchor, None);
        assert_eq!(request.direction, PathDirection::After as i32);
        assert_eq!(request.depth, 5);
        assert_eq!(request.node_kind, PathNodeKind::Event as i32);
        assert_eq!(request.collapse_repeats, Some(true));

        assert!(paths(&["--before", "--after"]).is_err());
        assert!(paths(&["--depth", "21"]).is_err());
        assert!(paths(&["--depth", "0"]).is_err());
        let error = paths(&["--nodes", "stage"]).unwrap_err().to_string();
        assert!(error.contains("give --map"), "{error}");
        let error = paths(&["--map", "retail"]).unwrap_err().to_string();
        assert!(error.contains("--nodes stage"), "{error}");
    }

    #[test]
    fn the_other_reports_parse_their_options() {
        let ReportCommand::Journey(journey) = parse(&[
            "journey",
            "welcome",
            "--version",
            "3",
            "--confidence",
            "0.9",
        ])
        .unwrap() else {
            unreachable!("a journey report")
        };
        assert_eq!(
            (
                journey.journey_id.as_str(),
                journey.version,
                journey.confidence
            ),
            ("welcome", 3, 0.9)
        );
        assert!(parse(&["journey", "welcome", "--confidence", "95"]).is_err());
        assert!(parse(&["journey"]).is_err());

        let cx = |args: &[&str]| match parse(&[&["cx"], args].concat())? {
            ReportCommand::Cx(args) => args.request(),
            _ => unreachable!("cx"),
        };
        let request = cx(&["--by", "stage", "--map", "retail", "--bucket", "1d"]).unwrap();
        assert_eq!(request.group_by, CxGrouping::Stage as i32);
        assert_eq!(
            (request.map_id.as_str(), request.bucket.as_str()),
            ("retail", "1d")
        );
        assert_eq!(cx(&[]).unwrap().group_by, CxGrouping::Unspecified as i32);
        assert_eq!(
            cx(&["--by", "touchpoint"]).unwrap().group_by,
            CxGrouping::Touchpoint as i32
        );
        assert!(cx(&["--by", "stage"]).is_err());
        assert!(cx(&["--by", "channel", "--map", "retail"]).is_err());

        assert!(parse(&["sla"]).is_err());
        assert!(parse(&["sla", "--map", "retail", "--since", "30d"]).is_ok());
        assert!(parse(&["stages", "--map", "retail", "--format", "json"]).is_ok());
        assert!(parse(&["stages", "--map", "retail", "--format", "xml"]).is_err());
    }
}
