//! Funnels and paths as standalone SVG documents: a funnel as horizontal bars with their
//! labels and conversion, paths as a Sankey diagram (a column per depth, node boxes sized
//! by count, links as bands as wide as the paths that took them). Pure functions of the
//! replies; every text is escaped.

use std::collections::HashMap;
use std::fmt::Write;

use waymark_proto::analytics::v1::*;

use super::text::{count, percent, ratio};

const FONT: &str =
    "font-family=\"system-ui, -apple-system, 'Segoe UI', sans-serif\" font-size=\"13\"";
const BAR_COLOR: &str = "#3b6ea5";
const NODE_COLOR: &str = "#3b6ea5";
const LINK_COLOR: &str = "#7aa6d6";

/// `text` safe inside an SVG element or attribute.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn document(width: f64, height: f64, body: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" \
         viewBox=\"0 0 {width:.0} {height:.0}\" {FONT}>\n{body}</svg>\n"
    )
}

/// A funnel: per group (the total first) a title and one bar per step, as long as the
/// step's share of the group's first step, labelled with the step, the count and the
/// conversion from the first step and from the previous one.
pub fn funnel(response: &GetFunnelResponse) -> String {
    const WIDTH: f64 = 900.0;
    const LABEL: f64 = 220.0;
    const BAR: f64 = 460.0;
    const ROW: f64 = 34.0;
    const BAR_HEIGHT: f64 = 24.0;
    let total = response.total.clone().unwrap_or_default();
    let groups = std::iter::once(("Total".to_owned(), &total)).chain(
        response
            .groups
            .iter()
            .map(|g| (format!("Group: {}", g.group), g)),
    );
    let mut body = String::new();
    let mut y = 10.0;
    for (title, group) in groups {
        y += 20.0;
        let _ = writeln!(
            body,
            "<text x=\"10\" y=\"{y:.1}\" font-weight=\"bold\">{}</text>",
            escape(&title)
        );
        y += 10.0;
        let first = group.steps.first().map_or(0, |s| s.reached) as f64;
        for (i, step) in group.steps.iter().enumerate() {
            let length = BAR * ratio(step.reached as f64, first);
            let middle = y + BAR_HEIGHT / 2.0 + 4.0;
            let _ = writeln!(
                body,
                "<text x=\"{:.1}\" y=\"{middle:.1}\" text-anchor=\"end\">{}. {}</text>",
                LABEL - 10.0,
                i + 1,
                escape(&step.event)
            );
            let _ = writeln!(
                body,
                "<rect x=\"{LABEL:.1}\" y=\"{y:.1}\" width=\"{length:.1}\" height=\"{BAR_HEIGHT:.1}\" \
                 fill=\"{BAR_COLOR}\"><title>{}: {}</title></rect>",
                escape(&step.event),
                count(step.reached)
            );
            let mut note = format!(
                "{} · {}",
                count(step.reached),
                percent(step.conversion_from_first)
            );
            if i > 0 {
                let _ = write!(
                    note,
                    " of first · {} of previous",
                    percent(step.conversion_from_previous)
                );
            }
            let _ = writeln!(
                body,
                "<text x=\"{:.1}\" y=\"{middle:.1}\">{}</text>",
                LABEL + length + 8.0,
                escape(&note)
            );
            y += ROW;
        }
    }
    document(WIDTH, y + 10.0, &body)
}

/// A node of the Sankey diagram: a name in a column.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Node {
    column: u32,
    name: String,
}

/// Paths as a Sankey diagram. Depth `d` links run from column `d - 1` to column `d`; paths
/// that look back from the anchor run right to left, so the anchor is always where the
/// reading starts or ends. A node's box is as tall as the larger of what comes in and what
/// goes out, and each link is a band as wide as its count, stacked along the boxes.
pub fn paths(response: &GetPathsResponse, before: bool) -> String {
    const COLUMN: f64 = 220.0;
    const BOX: f64 = 12.0;
    const HEIGHT: f64 = 480.0;
    const GAP: f64 = 14.0;
    const MARGIN: f64 = 30.0;
    let deepest = response.links.iter().map(|l| l.depth).max().unwrap_or(0);
    let mut incoming: HashMap<Node, u64> = HashMap::new();
    let mut outgoing: HashMap<Node, u64> = HashMap::new();
    let mut columns: Vec<Vec<Node>> = vec![Vec::new(); deepest as usize + 1];
    let node = |column: u32, name: &str| Node {
        column,
        name: name.to_owned(),
    };
    for link in response.links.iter().filter(|l| l.depth > 0) {
        let from = node(link.depth - 1, &link.from);
        let to = node(link.depth, &link.to);
        for n in [&from, &to] {
            if !columns[n.column as usize].contains(n) {
                columns[n.column as usize].push(n.clone());
            }
        }
        *outgoing.entry(from).or_default() += link.count;
        *incoming.entry(to).or_default() += link.count;
    }
    let value = |n: &Node| {
        incoming
            .get(n)
            .copied()
            .unwrap_or(0)
            .max(outgoing.get(n).copied().unwrap_or(0))
    };
    // One scale for every column, set by the fullest one, so equal counts look equal.
    let fullest = columns
        .iter()
        .map(|c| (c.iter().map(value).sum::<u64>(), c.len()))
        .map(|(sum, n)| (sum as f64, n as f64))
        .fold((0.0_f64, 0.0_f64), |(s, n), (cs, cn)| {
            (s.max(cs), n.max(cn))
        });
    let scale = ratio(HEIGHT - GAP * (fullest.1 - 1.0).max(0.0), fullest.0);
    let x = |column: u32| {
        let position = if before { deepest - column } else { column };
        MARGIN + f64::from(position) * COLUMN
    };
    let mut top: HashMap<Node, f64> = HashMap::new();
    let mut boxes = String::new();
    for column in &columns {
        let mut y = MARGIN;
        for n in column {
            let height = (value(n) as f64 * scale).max(1.0);
            top.insert(n.clone(), y);
            let _ = writeln!(
                boxes,
                "<rect x=\"{:.1}\" y=\"{y:.1}\" width=\"{BOX:.1}\" height=\"{height:.1}\" \
                 fill=\"{NODE_COLOR}\"><title>{}: {}</title></rect>",
                x(n.column),
                escape(&n.name),
                count(value(n))
            );
            let _ = writeln!(
                boxes,
                "<text x=\"{:.1}\" y=\"{:.1}\">{} ({})</text>",
                x(n.column) + BOX + 4.0,
                y + height / 2.0 + 4.0,
                escape(&n.name),
                count(value(n))
            );
            y += height + GAP;
        }
    }
    // Where the next band leaves a node (out) and arrives at one (in).
    let mut out_offset: HashMap<Node, f64> = HashMap::new();
    let mut in_offset: HashMap<Node, f64> = HashMap::new();
    let mut bands = String::new();
    for link in response.links.iter().filter(|l| l.depth > 0) {
        let from = node(link.depth - 1, &link.from);
        let to = node(link.depth, &link.to);
        let width = link.count as f64 * scale;
        let leave = out_offset.entry(from.clone()).or_default();
        let y0 = top[&from] + *leave + width / 2.0;
        *leave += width;
        let arrive = in_offset.entry(to.clone()).or_default();
        let y1 = top[&to] + *arrive + width / 2.0;
        *arrive += width;
        let (x0, x1) = if before {
            (x(from.column), x(to.column) + BOX)
        } else {
            (x(from.column) + BOX, x(to.column))
        };
        let middle = (x0 + x1) / 2.0;
        let _ = writeln!(
            bands,
            "<path d=\"M{x0:.1},{y0:.1} C{middle:.1},{y0:.1} {middle:.1},{y1:.1} {x1:.1},{y1:.1}\" \
             fill=\"none\" stroke=\"{LINK_COLOR}\" stroke-opacity=\"0.5\" stroke-width=\"{:.1}\">\
             <title>{} → {}: {}</title></path>",
            width.max(1.0),
            escape(&link.from),
            escape(&link.to),
            count(link.count)
        );
    }
    let mut title = format!("{} paths", count(response.paths));
    if response.converted > 0 {
        let _ = write!(
            title,
            ", {} converted ({})",
            count(response.converted),
            percent(ratio(response.converted as f64, response.paths as f64))
        );
    }
    let body = format!(
        "<text x=\"{MARGIN:.1}\" y=\"18\" font-weight=\"bold\">{}</text>\n{bands}{boxes}",
        escape(&title)
    );
    document(
        MARGIN * 2.0 + f64::from(deepest) * COLUMN + COLUMN,
        HEIGHT + MARGIN * 2.0,
        &body,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks that `svg` is one well-formed element tree (tags nest and close, attributes
    /// are quoted, every `&` starts an entity) and returns the element names in order.
    fn elements(svg: &str) -> Vec<String> {
        let mut names = Vec::new();
        let mut open: Vec<String> = Vec::new();
        let mut roots = 0;
        let mut rest = svg;
        while let Some(start) = rest.find('<') {
            check_text(&rest[..start]);
            let end = rest[start..].find('>').expect("a tag closes") + start;
            let tag = &rest[start + 1..end];
            rest = &rest[end + 1..];
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(open.pop().as_deref(), Some(name), "closing {name}");
                continue;
            }
            let self_closing = tag.ends_with('/');
            let tag = tag.trim_end_matches('/');
            let name = tag.split_whitespace().next().expect("a tag has a name");
            assert_eq!(tag.matches('"').count() % 2, 0, "quotes balance in {tag}");
            check_text(tag);
            names.push(name.to_owned());
            if open.is_empty() {
                roots += 1;
            }
            if !self_closing {
                open.push(name.to_owned());
            }
        }
        assert!(open.is_empty(), "unclosed: {open:?}");
        assert_eq!(roots, 1, "one root element");
        assert!(rest.trim().is_empty(), "nothing after the root: {rest:?}");
        names
    }

    fn check_text(text: &str) {
        for (i, _) in text.match_indices('&') {
            let entity = &text[i..text[i..].find(';').map_or(text.len(), |e| i + e + 1)];
            assert!(
                ["&amp;", "&lt;", "&gt;", "&quot;", "&#39;"].contains(&entity),
                "a bare & in {text:?}"
            );
        }
    }

    fn step(event: &str, reached: u64, from_first: f64) -> FunnelStep {
        FunnelStep {
            event: event.into(),
            reached,
            conversion_from_first: from_first,
            conversion_from_previous: from_first,
            ..FunnelStep::default()
        }
    }

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            escape(r#"Tom & Jerry's <b>"deal"</b>"#),
            "Tom &amp; Jerry&#39;s &lt;b&gt;&quot;deal&quot;&lt;/b&gt;"
        );
    }

    #[test]
    fn a_funnel_is_one_bar_per_step_with_escaped_labels() {
        let response = GetFunnelResponse {
            total: Some(FunnelGroup {
                group: String::new(),
                steps: vec![
                    step("Product <Viewed>", 1000, 1.0),
                    step("Add & Check \"out\"", 400, 0.4),
                    step("Order Completed", 250, 0.25),
                ],
            }),
            ..GetFunnelResponse::default()
        };
        let svg = funnel(&response);
        assert!(
            svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""),
            "{svg}"
        );
        let names = elements(&svg);
        assert_eq!(names.iter().filter(|n| *n == "rect").count(), 3, "{svg}");
        assert!(svg.contains(">1. Product &lt;Viewed&gt;</text>"), "{svg}");
        assert!(
            svg.contains(">2. Add &amp; Check &quot;out&quot;</text>"),
            "{svg}"
        );
        assert!(!svg.contains("<Viewed>"), "{svg}");
        assert!(
            svg.contains(">250 · 25.0% of first · 25.0% of previous</text>"),
            "{svg}"
        );
        // Bars are as long as the step's share of the first.
        assert!(svg.contains("width=\"460.0\" height=\"24.0\""), "{svg}");
        assert!(svg.contains("width=\"184.0\" height=\"24.0\""), "{svg}");
        assert!(svg.contains("width=\"115.0\" height=\"24.0\""), "{svg}");
        let grouped = GetFunnelResponse {
            groups: vec![FunnelGroup {
                group: "<none>".into(),
                steps: vec![step("a", 2, 1.0), step("b", 1, 0.5)],
            }],
            ..response
        };
        let svg = funnel(&grouped);
        assert_eq!(elements(&svg).iter().filter(|n| *n == "rect").count(), 5);
        assert!(svg.contains(">Group: &lt;none&gt;</text>"), "{svg}");
    }

    fn link(depth: u32, from: &str, to: &str, count: u64) -> PathLink {
        PathLink {
            depth,
            from: from.into(),
            to: to.into(),
            count,
        }
    }

    #[test]
    fn paths_are_a_sankey_of_columns_boxes_and_bands() {
        let response = GetPathsResponse {
            paths: 100,
            converted: 30,
            links: vec![
                link(1, "(anchor)", "Search & Browse", 60),
                link(1, "(anchor)", "Cart", 40),
                link(2, "Search & Browse", "Cart", 30),
                link(2, "Search & Browse", "(end)", 30),
                link(2, "Cart", "(converted)", 30),
            ],
            ..GetPathsResponse::default()
        };
        let svg = paths(&response, false);
        let names = elements(&svg);
        // Nodes: (anchor); Search, Cart; Cart, (end), (converted).
        assert_eq!(names.iter().filter(|n| *n == "rect").count(), 6, "{svg}");
        assert_eq!(names.iter().filter(|n| *n == "path").count(), 5, "{svg}");
        assert!(svg.contains(">Search &amp; Browse (60)</text>"), "{svg}");
        assert!(
            svg.contains(">100 paths, 30 converted (30.0%)</text>"),
            "{svg}"
        );
        // The fullest column holds 100 paths and the most crowded three boxes: 480 units
        // less two gaps of 14 for 100 paths, 4.52 per path.
        assert!(
            svg.contains("height=\"452.0\" fill=\"#3b6ea5\"><title>(anchor): 100</title>"),
            "{svg}"
        );
        assert!(svg.contains("stroke-width=\"271.2\""), "{svg}");
        assert!(svg.contains("stroke-width=\"180.8\""), "{svg}");
        // Bands leave a node one under the other: the anchor's second band starts where
        // its first ends.
        assert!(svg.contains("d=\"M42.0,165.6 C"), "{svg}");
        assert!(svg.contains("d=\"M42.0,391.6 C"), "{svg}");
        // Looking back from the anchor, the anchor is the rightmost column.
        let back = paths(&response, true);
        assert!(
            back.contains("<rect x=\"470.0\" y=\"30.0\" width=\"12.0\" height=\"452.0\""),
            "{back}"
        );
        elements(&back);
        let empty = paths(&GetPathsResponse::default(), false);
        assert_eq!(elements(&empty), ["svg", "text"]);
    }
}
