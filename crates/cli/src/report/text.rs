//! Reports as text tables for the terminal: aligned columns, a bar of unicode blocks that
//! takes the width left over, humanised durations and percentages. Pure functions of the
//! replies and the width, so they are tested without a server or a terminal.

use std::fmt::Write;

use waymark_proto::analytics::v1::*;

use crate::client::time;

/// Bars are never narrower than this; a long label column gives way first.
const MIN_BAR: usize = 8;
/// Nor wider: past this a bar stops being easier to read.
const MAX_BAR: usize = 60;
/// A label column is never cut below this many characters.
const MIN_LABEL: usize = 12;
/// Between columns.
const GAP: &str = "  ";

/// The width tables are laid out for: the terminal's when standard output is one, else 80.
pub fn terminal_width() -> usize {
    console::Term::stdout()
        .size_checked()
        .map_or(80, |(_, columns)| usize::from(columns).max(40))
}

/// A bar of `fraction` (0 to 1) of `width` cells, in eighths of a cell. A value above
/// zero shows at least a sliver, so "few" never reads as "none".
pub fn bar(fraction: f64, width: usize) -> String {
    const PARTIAL: [&str; 8] = ["", "▏", "▎", "▍", "▌", "▋", "▊", "▉"];
    let fraction = if fraction.is_finite() {
        fraction.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let mut eighths = (fraction * width as f64 * 8.0).round() as usize;
    if eighths == 0 && fraction > 0.0 {
        eighths = 1;
    }
    let mut out = "█".repeat(eighths / 8);
    out.push_str(PARTIAL[eighths % 8]);
    out
}

/// `part / whole`, 0 when there is no whole.
pub fn ratio(part: f64, whole: f64) -> f64 {
    if whole > 0.0 { part / whole } else { 0.0 }
}

/// A duration in seconds the way people say it: 45s, 12m, 3.2h, 2.1d.
pub fn human_duration(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return "-".into();
    }
    if seconds.round() < 60.0 {
        return format!("{}s", seconds.round());
    }
    let minutes = seconds / 60.0;
    if minutes.round() < 60.0 {
        return format!("{}m", minutes.round());
    }
    let hours = seconds / 3600.0;
    if (hours * 10.0).round() < 240.0 {
        return format!("{hours:.1}h");
    }
    format!("{:.1}d", seconds / 86_400.0)
}

/// The median and 90th percentile of a distribution, "-" when it holds nothing.
fn median_p90(d: Option<&Distribution>) -> (String, String) {
    match d {
        Some(d) if d.count > 0 => (
            human_duration(d.median_seconds),
            human_duration(d.p90_seconds),
        ),
        _ => ("-".into(), "-".into()),
    }
}

/// A fraction as a percentage with one decimal: 0.25 is "25.0%".
pub fn percent(fraction: f64) -> String {
    format!("{:.1}%", fraction * 100.0)
}

/// A count with thousands separators: 1,234,567.
pub fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Microseconds a query took, as "12 ms".
fn took(micros: u64) -> String {
    if micros < 1000 {
        format!("{micros} µs")
    } else {
        format!("{} ms", count(micros / 1000))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Left,
    /// Left-aligned and cut (with `…`) when the table would not fit otherwise.
    Label,
    Right,
    /// The bar column, at most this wide.
    Bar(usize),
}

enum Cell {
    Text(String),
    /// A bar of this fraction of the column.
    Bar(f64),
}

enum Row {
    /// A title line over the rows after it, which get the header again.
    Title(String),
    Cells(Vec<Cell>),
}

/// A table of text columns and at most one bar column, which takes the width left over.
/// Its sections (after each title) share the column widths, so they line up.
struct Table {
    headers: Vec<&'static str>,
    kinds: Vec<Kind>,
    rows: Vec<Row>,
}

impl Table {
    fn new(columns: &[(&'static str, Kind)]) -> Self {
        Self {
            headers: columns.iter().map(|(h, _)| *h).collect(),
            kinds: columns.iter().map(|(_, k)| *k).collect(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, cells: Vec<Cell>) {
        debug_assert_eq!(cells.len(), self.kinds.len());
        self.rows.push(Row::Cells(cells));
    }

    fn title(&mut self, title: String) {
        self.rows.push(Row::Title(title));
    }

    fn render(&self, width: usize) -> String {
        let chars = |s: &str| s.chars().count();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| chars(h)).collect();
        for row in &self.rows {
            let Row::Cells(row) = row else { continue };
            for (w, cell) in widths.iter_mut().zip(row) {
                if let Cell::Text(text) = cell {
                    *w = (*w).max(chars(text));
                }
            }
        }
        // The bar column and its widest.
        let bar = self.kinds.iter().enumerate().find_map(|(i, k)| match k {
            Kind::Bar(max) => Some((i, *max)),
            _ => None,
        });
        let bar_column = bar.map(|(i, _)| i);
        let fixed = |widths: &[usize]| {
            let text: usize = widths
                .iter()
                .enumerate()
                .filter(|(i, _)| Some(*i) != bar_column)
                .map(|(_, w)| w)
                .sum();
            text + GAP.len() * widths.len().saturating_sub(1)
        };
        let wanted = if bar.is_some() { MIN_BAR } else { 0 };
        let over = (fixed(&widths) + wanted).saturating_sub(width);
        if over > 0
            && let Some(label) = self.kinds.iter().position(|k| *k == Kind::Label)
        {
            widths[label] = widths[label]
                .saturating_sub(over)
                .max(MIN_LABEL.min(widths[label]));
        }
        if let Some((b, max)) = bar {
            widths[b] = width.saturating_sub(fixed(&widths)).clamp(MIN_BAR, max);
        }
        let header: Vec<Cell> = self
            .headers
            .iter()
            .map(|h| Cell::Text((*h).to_owned()))
            .collect();
        let mut out = String::new();
        if !matches!(self.rows.first(), Some(Row::Title(_))) {
            self.line(&header, &widths, &mut out);
        }
        for row in &self.rows {
            match row {
                Row::Title(title) => {
                    if !out.is_empty() {
                        out.push('\n');
                    }
                    out.push_str(title);
                    out.push('\n');
                    self.line(&header, &widths, &mut out);
                }
                Row::Cells(cells) => self.line(cells, &widths, &mut out),
            }
        }
        out
    }

    fn line(&self, row: &[Cell], widths: &[usize], out: &mut String) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str(GAP);
            }
            let w = widths[i];
            let text = match cell {
                Cell::Text(text) => cut(text, w),
                Cell::Bar(fraction) => bar(*fraction, w),
            };
            let pad = w.saturating_sub(text.chars().count());
            if self.kinds[i] == Kind::Right {
                line.extend(std::iter::repeat_n(' ', pad));
                line.push_str(&text);
            } else {
                line.push_str(&text);
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

/// `text` in at most `width` characters, ending in `…` when cut.
fn cut(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_owned();
    }
    let mut out: String = text.chars().take(width.saturating_sub(1)).collect();
    out.push('…');
    out
}

fn text(s: impl Into<String>) -> Cell {
    Cell::Text(s.into())
}

/// A funnel: the total, then each breakdown group, one row per step with its bar scaled
/// to the group's first step.
pub fn funnel(response: &GetFunnelResponse, width: usize) -> String {
    let mut out = format!(
        "{} customers and {} events scanned in {}\n",
        count(response.customers_scanned),
        count(response.events_scanned),
        took(response.took_micros)
    );
    let total = response.total.clone().unwrap_or_default();
    let groups = std::iter::once(("Total".to_owned(), &total)).chain(
        response
            .groups
            .iter()
            .map(|g| (format!("Group: {}", g.group), g)),
    );
    let mut table = Table::new(&[
        ("#", Kind::Right),
        ("STEP", Kind::Label),
        ("REACHED", Kind::Right),
        ("", Kind::Bar(MAX_BAR)),
        ("CONV", Kind::Right),
        ("DROP", Kind::Right),
        ("MEDIAN", Kind::Right),
        ("P90", Kind::Right),
    ]);
    for (title, group) in groups {
        table.title(title);
        let first = group.steps.first().map_or(0, |s| s.reached);
        for (i, step) in group.steps.iter().enumerate() {
            let (median, p90) = if i == 0 {
                ("-".into(), "-".into())
            } else {
                median_p90(step.time_to_convert.as_ref())
            };
            table.row(vec![
                text((i + 1).to_string()),
                text(step.event.clone()),
                text(count(step.reached)),
                Cell::Bar(ratio(step.reached as f64, first as f64)),
                text(percent(step.conversion_from_first)),
                text(if i == 0 {
                    "-".into()
                } else {
                    format!("{:.1}%", step.drop_off_percent)
                }),
                text(median),
                text(p90),
            ]);
        }
    }
    let _ = write!(out, "\n{}", table.render(width));
    out
}

/// Paths: the links by depth, each bar a share of all paths, then the most common paths
/// to drop-off.
pub fn paths(response: &GetPathsResponse, width: usize) -> String {
    let mut out = format!("{} paths", count(response.paths));
    if response.converted > 0 {
        let _ = write!(
            out,
            ", {} converted ({})",
            count(response.converted),
            percent(ratio(response.converted as f64, response.paths as f64))
        );
    }
    let _ = writeln!(out, ", in {}", took(response.took_micros));
    let whole = response
        .paths
        .max(response.links.iter().map(|l| l.count).max().unwrap_or(0)) as f64;
    let mut links = Table::new(&[
        ("DEPTH", Kind::Right),
        ("FROM", Kind::Label),
        ("TO", Kind::Left),
        ("COUNT", Kind::Right),
        ("SHARE", Kind::Right),
        ("", Kind::Bar(MAX_BAR)),
    ]);
    for link in &response.links {
        links.row(vec![
            text(link.depth.to_string()),
            text(link.from.clone()),
            text(link.to.clone()),
            text(count(link.count)),
            text(percent(ratio(link.count as f64, whole))),
            Cell::Bar(ratio(link.count as f64, whole)),
        ]);
    }
    let _ = write!(out, "\nLinks\n{}", links.render(width));
    if !response.top_drop_off_paths.is_empty() {
        let mut drop_offs = Table::new(&[
            ("COUNT", Kind::Right),
            ("SHARE", Kind::Right),
            ("", Kind::Bar(20)),
            ("PATH", Kind::Label),
        ]);
        for path in &response.top_drop_off_paths {
            drop_offs.row(vec![
                text(count(path.count)),
                text(percent(ratio(path.count as f64, whole))),
                Cell::Bar(ratio(path.count as f64, whole)),
                text(path.nodes.join(" → ")),
            ]);
        }
        let title = if response.converted > 0 {
            "Top paths to drop-off"
        } else {
            "Top paths"
        };
        let _ = write!(out, "\n{title}\n{}", drop_offs.render(width));
    }
    out
}

/// A journey's report: per node what happened, then each random split against control.
pub fn journey(response: &GetJourneyReportResponse, width: usize) -> String {
    let mut out = format!(
        "Journey {}: {} enrollments, {} converted ({})\n",
        response.journey_id,
        count(response.enrollments),
        count(response.converted),
        percent(ratio(
            response.converted as f64,
            response.enrollments as f64
        ))
    );
    let most = response.nodes.iter().map(|n| n.entered).max().unwrap_or(0) as f64;
    let mut nodes = Table::new(&[
        ("NODE", Kind::Label),
        ("ENTERED", Kind::Right),
        ("", Kind::Bar(MAX_BAR)),
        ("ADVANCED", Kind::Right),
        ("EXITED", Kind::Right),
        ("GOAL", Kind::Right),
        ("ACTIVE", Kind::Right),
        ("SUPPR", Kind::Right),
        ("ERR", Kind::Right),
        ("MEDIAN", Kind::Right),
    ]);
    for node in &response.nodes {
        nodes.row(vec![
            text(node.node_id.clone()),
            text(count(node.entered)),
            Cell::Bar(ratio(node.entered as f64, most)),
            text(count(node.advanced)),
            text(count(node.exited)),
            text(count(node.goal_reached)),
            text(count(node.active)),
            text(count(node.suppressed)),
            text(count(node.errored)),
            text(median_p90(node.time_in_node.as_ref()).0),
        ]);
    }
    let _ = write!(out, "\nNodes\n{}", nodes.render(width));
    for split in &response.splits {
        let verdict = if split.sample_ratio_mismatch {
            format!(
                "SAMPLE RATIO MISMATCH (chi² {:.2}, p {}): the assignment is broken, do not trust this readout",
                split.srm_chi_squared,
                p_value(split.srm_p_value)
            )
        } else {
            format!(
                "sample ratio as expected (p {})",
                p_value(split.srm_p_value)
            )
        };
        let best = split
            .variants
            .iter()
            .map(|v| v.conversion_rate)
            .fold(0.0, f64::max);
        let mut arms = Table::new(&[
            ("ARM", Kind::Label),
            ("ENROLLED", Kind::Right),
            ("CONV", Kind::Right),
            ("RATE", Kind::Right),
            ("", Kind::Bar(MAX_BAR)),
            ("UPLIFT", Kind::Right),
            ("INTERVAL", Kind::Right),
            ("P", Kind::Right),
            ("SHARE", Kind::Right),
        ]);
        for v in &split.variants {
            let control = v.is_control;
            arms.row(vec![
                text(if control {
                    format!("{} (control)", v.arm)
                } else {
                    v.arm.clone()
                }),
                text(count(v.enrollments)),
                text(count(v.conversions)),
                text(percent(v.conversion_rate)),
                Cell::Bar(ratio(v.conversion_rate, best)),
                text(if control {
                    "-".into()
                } else {
                    points(v.uplift)
                }),
                text(if control {
                    "-".into()
                } else {
                    format!(
                        "{} to {}",
                        points(v.uplift_ci_low),
                        points(v.uplift_ci_high)
                    )
                }),
                text(if control {
                    "-".into()
                } else {
                    p_value(v.p_value)
                }),
                text(format!(
                    "{} of {}",
                    percent(v.observed_share),
                    percent(v.expected_share)
                )),
            ]);
        }
        let _ = write!(
            out,
            "\nSplit {}: {verdict}\n{}",
            split.node_id,
            arms.render(width)
        );
    }
    out
}

/// A difference of rates in percentage points, signed: "+3.0pp".
fn points(difference: f64) -> String {
    format!("{:+.1}pp", difference * 100.0)
}

/// A p-value with three decimals, "<0.001" below that.
fn p_value(p: f64) -> String {
    if p < 0.001 {
        "<0.001".into()
    } else {
        format!("{p:.3}")
    }
}

/// CX metrics: one row per group and bucket, the bar the share of satisfied CSAT answers.
pub fn cx(response: &GetCxMetricsResponse, width: usize) -> String {
    let bucketed = response.metrics.iter().any(|m| m.bucket_start.is_some());
    let mut columns = vec![("GROUP", Kind::Label)];
    if bucketed {
        columns.push(("BUCKET", Kind::Left));
    }
    columns.extend([
        ("CSAT", Kind::Right),
        ("SATISFIED", Kind::Right),
        ("", Kind::Bar(30)),
        ("NPS", Kind::Right),
        ("SENTIMENT", Kind::Right),
        ("COMPLAINTS", Kind::Right),
        ("ESCALATIONS", Kind::Right),
    ]);
    let mut table = Table::new(&columns);
    for m in &response.metrics {
        let mut row = vec![text(m.group.clone())];
        if bucketed {
            row.push(text(time(m.bucket_start.as_ref())));
        }
        let answered = |n: u64, shown: String| {
            if n == 0 {
                "-".to_owned()
            } else {
                format!("{shown} ({})", count(n))
            }
        };
        row.extend([
            text(answered(m.csat_responses, format!("{:.2}", m.csat_mean))),
            text(if m.csat_responses == 0 {
                "-".into()
            } else {
                format!("{:.1}%", m.csat_satisfied_percent)
            }),
            Cell::Bar(m.csat_satisfied_percent / 100.0),
            text(answered(m.nps_responses, format!("{:+.0}", m.nps))),
            text(answered(
                m.sentiment_samples,
                format!("{:+.2}", m.sentiment_mean),
            )),
            text(count(m.complaints)),
            text(count(m.escalations)),
        ]);
        table.row(row);
    }
    table.render(width)
}

/// Where a map's standard times are broken: stages and interactions against their
/// standard time (the bar the share breached), customers stuck now, and dead ends.
pub fn sla(response: &GetSlaBreachesResponse, width: usize) -> String {
    let mut out = String::new();
    for (title, reports) in [
        ("Stages", &response.stages),
        ("Interactions", &response.interactions),
    ] {
        if reports.is_empty() {
            continue;
        }
        let mut table = Table::new(&[
            ("NAME", Kind::Label),
            ("STANDARD", Kind::Right),
            ("DONE", Kind::Right),
            ("MEDIAN", Kind::Right),
            ("P90", Kind::Right),
            ("BREACHED", Kind::Right),
            ("", Kind::Bar(30)),
            ("OPEN LATE", Kind::Right),
        ]);
        for r in reports {
            let (median, p90) = median_p90(r.completed.as_ref());
            table.row(vec![
                text(r.name.clone()),
                text(human_duration(r.standard_seconds)),
                text(count(r.completed.as_ref().map_or(0, |d| d.count))),
                text(median),
                text(p90),
                text(format!("{} ({:.1}%)", count(r.breached), r.breach_percent)),
                Cell::Bar(r.breach_percent / 100.0),
                text(count(r.open_past_standard)),
            ]);
        }
        let _ = write!(out, "{title}\n{}\n", table.render(width));
    }
    if !response.stuck.is_empty() {
        let mut table = Table::new(&[
            ("PROFILE", Kind::Left),
            ("STAGE", Kind::Left),
            ("SINCE", Kind::Left),
            ("OVERDUE", Kind::Right),
        ]);
        for s in &response.stuck {
            table.row(vec![
                text(s.profile_id.clone()),
                text(s.stage_id.clone()),
                text(time(s.since.as_ref())),
                text(human_duration(s.overdue_seconds)),
            ]);
        }
        let _ = write!(out, "Stuck now\n{}\n", table.render(width));
    }
    let mut dead_ends = Table::new(&[
        ("EVENT", Kind::Label),
        ("SESSIONS", Kind::Right),
        ("SHARE", Kind::Right),
        ("", Kind::Bar(MAX_BAR)),
        ("CUSTOMERS", Kind::Right),
    ]);
    let sessions = response.sessions as f64;
    for d in &response.dead_ends {
        dead_ends.row(vec![
            text(d.event.clone()),
            text(count(d.sessions)),
            text(percent(ratio(d.sessions as f64, sessions))),
            Cell::Bar(ratio(d.sessions as f64, sessions)),
            text(count(d.customers)),
        ]);
    }
    let _ = write!(
        out,
        "Dead ends, of {} sessions\n{}",
        count(response.sessions),
        dead_ends.render(width)
    );
    out
}

/// Customers at each stage now, the bar scaled to the fullest stage.
pub fn stages(response: &GetStageDistributionResponse, width: usize) -> String {
    let most = response
        .stages
        .iter()
        .map(|s| s.customers)
        .max()
        .unwrap_or(0) as f64;
    let mut table = Table::new(&[
        ("STAGE", Kind::Label),
        ("CUSTOMERS", Kind::Right),
        ("", Kind::Bar(MAX_BAR)),
        ("STUCK", Kind::Right),
        ("MEDIAN", Kind::Right),
        ("P90", Kind::Right),
    ]);
    for s in &response.stages {
        let (median, p90) = median_p90(s.time_in_stage.as_ref());
        table.row(vec![
            text(if s.name.is_empty() || s.name == s.stage_id {
                s.stage_id.clone()
            } else {
                format!("{} ({})", s.name, s.stage_id)
            }),
            text(count(s.customers)),
            Cell::Bar(ratio(s.customers as f64, most)),
            text(format!(
                "{} ({})",
                count(s.stuck),
                percent(ratio(s.stuck as f64, s.customers as f64))
            )),
            text(median),
            text(p90),
        ]);
    }
    format!(
        "{}{} customers without a stage\n",
        table.render(width),
        count(response.without_stage)
    )
}

/// Journey maps, one line each.
pub fn maps(maps: &[JourneyMap], width: usize) -> String {
    let mut table = Table::new(&[
        ("ID", Kind::Left),
        ("NAME", Kind::Label),
        ("STAGES", Kind::Right),
        ("INTERACTIONS", Kind::Right),
        ("DEAD ENDS", Kind::Right),
        ("WRITE BACK", Kind::Left),
    ]);
    for m in maps {
        table.row(vec![
            text(m.id.clone()),
            text(m.name.clone()),
            text(m.stages.len().to_string()),
            text(m.interactions.len().to_string()),
            text(m.dead_ends.len().to_string()),
            text(if m.write_back { "yes" } else { "no" }),
        ]);
    }
    table.render(width)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn distribution(median_seconds: f64, p90_seconds: f64) -> Option<Distribution> {
        Some(Distribution {
            count: 10,
            median_seconds,
            p90_seconds,
            ..Distribution::default()
        })
    }

    fn step(event: &str, reached: u64, from_first: f64, drop: f64) -> FunnelStep {
        FunnelStep {
            event: event.into(),
            reached,
            conversion_from_first: from_first,
            drop_off_percent: drop,
            ..FunnelStep::default()
        }
    }

    fn funnel_response() -> GetFunnelResponse {
        GetFunnelResponse {
            total: Some(FunnelGroup {
                group: String::new(),
                steps: vec![
                    step("Product Viewed", 1000, 1.0, 0.0),
                    FunnelStep {
                        time_to_convert: distribution(720.0, 11_520.0),
                        ..step("Checkout Started", 400, 0.4, 60.0)
                    },
                    FunnelStep {
                        time_to_convert: distribution(45.0, 181_440.0),
                        ..step("Order Completed", 250, 0.25, 37.5)
                    },
                ],
            }),
            groups: vec![FunnelGroup {
                group: "pro".into(),
                steps: vec![
                    step("Product Viewed", 100, 1.0, 0.0),
                    step("Checkout Started", 50, 0.5, 50.0),
                    step("Order Completed", 0, 0.0, 100.0),
                ],
            }],
            customers_scanned: 1234,
            events_scanned: 45_678,
            took_micros: 12_400,
        }
    }

    /// The length of the bar in a rendered line, in eighths of a cell.
    fn eighths(line: &str) -> usize {
        bar_of(line)
            .chars()
            .map(|c| 8 - (c as usize - '█' as usize))
            .sum()
    }

    /// The bar cells of a rendered line: the run of block characters in it.
    fn bar_of(line: &str) -> String {
        line.chars().filter(|c| ('█'..='▏').contains(c)).collect()
    }

    #[test]
    fn durations_read_as_people_say_them() {
        let cases = [
            (0.4, "0s"),
            (45.0, "45s"),
            (59.4, "59s"),
            (59.6, "1m"),
            (720.0, "12m"),
            (3569.0, "59m"),
            (3599.0, "1.0h"),
            (11_520.0, "3.2h"),
            (86_000.0, "23.9h"),
            (86_399.0, "1.0d"),
            (181_440.0, "2.1d"),
            (-1.0, "-"),
            (f64::NAN, "-"),
        ];
        for (seconds, shown) in cases {
            assert_eq!(human_duration(seconds), shown, "{seconds}");
        }
    }

    #[test]
    fn bars_are_drawn_in_eighths_of_a_cell() {
        assert_eq!(bar(1.0, 4), "████");
        assert_eq!(bar(0.5, 4), "██");
        assert_eq!(bar(0.5 + 1.0 / 32.0, 4), "██▏");
        assert_eq!(bar(0.25 + 3.0 / 32.0, 4), "█▍");
        assert_eq!(bar(0.0, 4), "");
        assert_eq!(bar(0.0001, 4), "▏", "a value above zero shows");
        assert_eq!(bar(7.0, 3), "███", "clamped");
        assert_eq!(bar(f64::NAN, 3), "");
    }

    #[test]
    fn counts_and_percentages() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1000), "1,000");
        assert_eq!(count(1_234_567), "1,234,567");
        assert_eq!(percent(0.25), "25.0%");
        assert_eq!(percent(1.0), "100.0%");
        assert_eq!(ratio(1.0, 0.0), 0.0);
    }

    #[test]
    fn a_funnel_shows_each_step_with_its_bar_percentages_and_times() {
        let shown = funnel(&funnel_response(), 80);
        let lines: Vec<&str> = shown.lines().collect();
        assert_eq!(
            lines[0],
            "1,234 customers and 45,678 events scanned in 12 ms"
        );
        assert_eq!(lines[2], "Total");
        assert!(lines[3].starts_with("#  STEP "), "{}", lines[3]);
        assert!(
            lines[3].ends_with("CONV    DROP  MEDIAN   P90"),
            "{}",
            lines[3]
        );
        for line in &lines {
            assert!(line.chars().count() <= 80, "wider than 80: {line:?}");
        }
        let first = lines[4];
        assert!(
            first.starts_with("1  Product Viewed      1,000  █"),
            "{first}"
        );
        assert!(first.ends_with("100.0%       -       -     -"), "{first}");
        let second = lines[5];
        assert!(second.contains("   400  "), "{second}");
        assert!(second.ends_with("40.0%   60.0%     12m  3.2h"), "{second}");
        assert!(
            lines[6].ends_with("25.0%   37.5%     45s  2.1d"),
            "{}",
            lines[6]
        );
        // The bar is scaled to the first step and fills what the columns leave of 80.
        let full = bar_of(first).chars().count();
        assert_eq!(first.chars().count(), 80, "{first}");
        assert_eq!(bar_of(lines[5]), bar(0.4, full));
        assert_eq!(bar_of(lines[6]), bar(0.25, full));
        // The group follows the total, its bars scaled to its own first step.
        assert_eq!(lines[8], "Group: pro");
        assert_eq!(bar_of(lines[11]), bar(0.5, full));
        assert!(lines[12].contains("       0  "), "{}", lines[12]);
        assert_eq!(bar_of(lines[12]), "");
        assert!(
            lines[12].ends_with("0.0%  100.0%       -     -"),
            "{}",
            lines[12]
        );
    }

    #[test]
    fn a_wider_terminal_gets_longer_bars_and_a_narrow_one_cuts_labels() {
        let wide = funnel(&funnel_response(), 120);
        let wide_bar = bar_of(wide.lines().nth(4).unwrap()).chars().count();
        let narrow = funnel(&funnel_response(), 80);
        let narrow_bar = bar_of(narrow.lines().nth(4).unwrap()).chars().count();
        assert!(wide_bar > narrow_bar, "{wide_bar} > {narrow_bar}");
        assert!(wide_bar <= MAX_BAR);
        let mut long = funnel_response();
        long.total.as_mut().unwrap().steps[0].event =
            "Product Viewed From The Recommendations Carousel On The Home Page".into();
        let shown = funnel(&long, 80);
        let line = shown.lines().nth(4).unwrap();
        assert!(line.chars().count() <= 80, "{line}");
        assert!(line.contains("Product Viewed From The Rec…"), "{line}");
        assert_eq!(bar_of(line).chars().count(), MIN_BAR);
    }

    #[test]
    fn paths_show_links_and_drop_off_paths_as_shares_of_all_paths() {
        let response = GetPathsResponse {
            paths: 200,
            converted: 50,
            links: vec![
                PathLink {
                    depth: 1,
                    from: "(anchor)".into(),
                    to: "Product Viewed".into(),
                    count: 150,
                },
                PathLink {
                    depth: 2,
                    from: "Product Viewed".into(),
                    to: "(converted)".into(),
                    count: 50,
                },
            ],
            top_drop_off_paths: vec![PathCount {
                nodes: vec!["Product Viewed".into(), "(end)".into()],
                count: 100,
            }],
            took_micros: 800,
        };
        let shown = paths(&response, 80);
        assert!(
            shown.starts_with("200 paths, 50 converted (25.0%), in 800 µs\n"),
            "{shown}"
        );
        let link = shown.lines().find(|l| l.contains("(anchor)")).unwrap();
        assert!(link.contains("Product Viewed    150  75.0%"), "{link}");
        let converted = shown.lines().find(|l| l.contains("(converted)")).unwrap();
        // Up to half an eighth of rounding in each bar.
        assert!(
            eighths(link).abs_diff(3 * eighths(converted)) <= 2,
            "{converted}\n{link}"
        );
        assert!(shown.contains("\nTop paths to drop-off\n"), "{shown}");
        let drop_off = shown.lines().last().unwrap();
        assert!(
            drop_off.starts_with("  100  50.0%  ██████████"),
            "{drop_off}"
        );
        assert!(drop_off.ends_with("Product Viewed → (end)"), "{drop_off}");
    }

    #[test]
    fn a_journey_report_reads_out_nodes_and_splits_against_control() {
        let response = GetJourneyReportResponse {
            journey_id: "welcome".into(),
            enrollments: 1000,
            converted: 120,
            nodes: vec![NodeReport {
                node_id: "email".into(),
                entered: 1000,
                advanced: 900,
                exited: 50,
                suppressed: 30,
                errored: 2,
                goal_reached: 120,
                active: 18,
                time_in_node: distribution(7200.0, 86_400.0),
            }],
            splits: vec![SplitReport {
                node_id: "split".into(),
                variants: vec![
                    VariantReport {
                        arm: "control".into(),
                        enrollments: 500,
                        conversions: 50,
                        conversion_rate: 0.1,
                        is_control: true,
                        expected_share: 0.5,
                        observed_share: 0.5,
                        ..VariantReport::default()
                    },
                    VariantReport {
                        arm: "b".into(),
                        enrollments: 500,
                        conversions: 70,
                        conversion_rate: 0.14,
                        uplift: 0.04,
                        relative_uplift: 0.4,
                        uplift_ci_low: 0.002,
                        uplift_ci_high: 0.078,
                        p_value: 0.0412,
                        expected_share: 0.5,
                        observed_share: 0.5,
                        ..VariantReport::default()
                    },
                ],
                srm_chi_squared: 0.0,
                srm_p_value: 1.0,
                sample_ratio_mismatch: false,
            }],
        };
        let shown = journey(&response, 100);
        assert!(
            shown.starts_with("Journey welcome: 1,000 enrollments, 120 converted (12.0%)\n"),
            "{shown}"
        );
        let node = shown.lines().find(|l| l.starts_with("email")).unwrap();
        assert!(
            node.ends_with("900      50   120      18     30    2    2.0h"),
            "{node}"
        );
        assert!(
            shown.contains("\nSplit split: sample ratio as expected (p 1.000)\n"),
            "{shown}"
        );
        let control = shown.lines().find(|l| l.starts_with("control")).unwrap();
        assert!(
            control.ends_with("-                 -      -  50.0% of 50.0%"),
            "{control}"
        );
        let b = shown.lines().find(|l| l.starts_with("b ")).unwrap();
        assert!(b.contains("14.0%"), "{b}");
        assert!(
            b.ends_with("+4.0pp  +0.2pp to +7.8pp  0.041  50.0% of 50.0%"),
            "{b}"
        );
        let mut broken = response;
        broken.splits[0].sample_ratio_mismatch = true;
        broken.splits[0].srm_p_value = 0.00001;
        assert!(
            journey(&broken, 100).contains("SAMPLE RATIO MISMATCH (chi² 0.00, p <0.001)"),
            "the mismatch is called out"
        );
    }

    #[test]
    fn sla_stages_and_cx_tables() {
        let sla_response = GetSlaBreachesResponse {
            stages: vec![SlaReport {
                id: "select".into(),
                name: "Select".into(),
                standard_seconds: 172_800.0,
                completed: distribution(3600.0, 259_200.0),
                breached: 3,
                breach_percent: 30.0,
                open_past_standard: 7,
            }],
            interactions: vec![],
            stuck: vec![StuckCustomer {
                profile_id: "p-1".into(),
                stage_id: "select".into(),
                since: Some(waymark_proto::prost_types::Timestamp {
                    seconds: 0,
                    nanos: 0,
                }),
                overdue_seconds: 5400.0,
            }],
            dead_ends: vec![DeadEnd {
                event: "Checkout Failed".into(),
                sessions: 25,
                customers: 20,
            }],
            sessions: 100,
        };
        let shown = sla(&sla_response, 80);
        assert!(shown.starts_with("Stages\nNAME "), "{shown}");
        assert!(!shown.contains("Interactions"), "{shown}");
        let select = shown.lines().find(|l| l.starts_with("Select")).unwrap();
        assert!(
            select.contains("2.0d    10    1.0h  3.0d  3 (30.0%)"),
            "{select}"
        );
        assert!(select.ends_with("  7"), "{select}");
        assert!(
            shown.contains("p-1      select  1970-01-01T00:00:00.000Z     1.5h"),
            "{shown}"
        );
        let dead_end = shown.lines().find(|l| l.starts_with("Checkout")).unwrap();
        assert!(dead_end.contains("25  25.0%  "), "{dead_end}");
        assert!(dead_end.ends_with("20"), "{dead_end}");

        let stage_response = GetStageDistributionResponse {
            stages: vec![
                StageCount {
                    stage_id: "research".into(),
                    name: "Research".into(),
                    customers: 200,
                    stuck: 50,
                    time_in_stage: distribution(86_400.0, 604_800.0),
                },
                StageCount {
                    stage_id: "own".into(),
                    name: "own".into(),
                    customers: 100,
                    stuck: 0,
                    time_in_stage: None,
                },
            ],
            without_stage: 12,
        };
        let shown = stages(&stage_response, 80);
        let research = shown.lines().nth(1).unwrap();
        assert!(
            research.starts_with("Research (research)        200  █"),
            "{research}"
        );
        assert!(research.ends_with("50 (25.0%)    1.0d  7.0d"), "{research}");
        let own = shown.lines().nth(2).unwrap();
        assert!(own.starts_with("own  "), "{own}");
        assert!(
            eighths(research).abs_diff(2 * eighths(own)) <= 1,
            "{research}\n{own}"
        );
        assert!(shown.ends_with("12 customers without a stage\n"), "{shown}");

        let cx_response = GetCxMetricsResponse {
            metrics: vec![CxMetrics {
                group: "web".into(),
                csat_responses: 40,
                csat_mean: 4.25,
                csat_satisfied_percent: 75.0,
                nps_responses: 0,
                sentiment_samples: 12,
                sentiment_mean: -0.125,
                complaints: 3,
                escalations: 1,
                ..CxMetrics::default()
            }],
        };
        let shown = cx(&cx_response, 100);
        assert!(!shown.contains("BUCKET"), "{shown}");
        let web = shown.lines().nth(1).unwrap();
        assert!(web.starts_with("web    4.25 (40)      75.0%  █"), "{web}");
        assert!(
            web.ends_with("-  -0.12 (12)           3            1"),
            "{web}"
        );
    }
}
