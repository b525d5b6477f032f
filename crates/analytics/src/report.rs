//! The journey report: per node what happened to the enrollments that reached it, and per
//! random split the conversion of each arm against control with a sample-ratio-mismatch
//! check, built from the steps the orchestrator recorded for each enrollment.
//!
//! Definitions, per enrollment and node (a revisit of a node counts once):
//! - **entered**: a step of the enrollment is at the node.
//! - **advanced**: a step after its first step at the node is at another node.
//! - **time in node**: from its first step at the node to the first later step at another
//!   node, for the enrollments that advanced (one duration each).
//! - **exited / errored / goal reached**: its terminal step (the first with outcome
//!   `exited`, `errored` or `goal`, or `completed`, which counts under none of them) is
//!   at the node with that outcome.
//! - **active**: it has no terminal step and its last step is at the node.
//! - **suppressed**: steps with outcome `suppressed` at the node (messages, not
//!   enrollments).
//!
//! An enrollment **converted** when it has a step with outcome `goal`. At a random split
//! (a node with `arm` steps) an enrollment belongs to the arm its first `arm` step there
//! names (`holdout` for the holdout, which the orchestrator keeps at the split until the
//! goal converts it or its holdout window ends). Each arm and the holdout is compared with control
//! (`stats::compare`); control itself reads uplift 0, the interval [0, 0] and p-value 1.

use std::collections::{HashMap, HashSet};

use waymark_proto::analytics::v1::{
    GetJourneyReportResponse, NodeReport, SplitReport, VariantReport,
};

use crate::stats;

/// The arm the orchestrator records for the enrollments a random split holds out.
pub const HOLDOUT: &str = "holdout";
/// The arm that is the control wherever it stands among the arms.
pub const CONTROL: &str = "control";
/// Below this sample-ratio-mismatch p-value the assignment is taken as broken.
pub const SRM_THRESHOLD: f64 = 0.001;

/// One step the orchestrator recorded for an enrollment.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct JourneyStep {
    /// The node it was taken at.
    pub node_id: String,
    /// What happened: `entered`, `branch`, `arm`, `waiting`, `resumed`, `timeout`, `sent`,
    /// `deferred`, `suppressed`, `failed`, `called`, `delivered`, `updated`, `escalated`,
    /// `rescheduled`, `moved`, and the terminal `goal`, `exited`, `completed`, `errored`.
    pub outcome: String,
    /// The decision: the arm's name (or `holdout`) for `arm`, the reason for a terminal
    /// outcome, the branch or the action's id otherwise.
    pub decision: String,
    /// When, in microseconds since the epoch.
    pub at_us: i64,
    /// On an `arm` step, the split's arms and their relative weights in the split's order
    /// (its detail's `weights`, ordered by `arms`); empty elsewhere, and on arm steps
    /// recorded before the orchestrator wrote them.
    pub weights: Vec<(String, f64)>,
    /// On an `arm` step, the split's holdout percentage (0 to 100).
    pub holdout_percent: f64,
}

/// An enrollment and its steps, in the order they were taken (by `seq`).
#[derive(Debug, Clone, Copy)]
pub struct EnrollmentSteps<'a> {
    pub enrollment_id: &'a str,
    /// The journey version it is on.
    pub version: u32,
    /// Its steps, by `seq`.
    pub steps: &'a [JourneyStep],
}

/// The report of `journey_id` over `enrollments` (already filtered by version and
/// range), with intervals at `confidence` (in (0, 1); the request's 0 already made 0.95).
/// Nodes and splits come in order of first appearance, enrollments in the order given.
pub fn journey_report(
    journey_id: &str,
    enrollments: &[EnrollmentSteps<'_>],
    confidence: f64,
) -> GetJourneyReportResponse {
    let mut nodes = Tally::<NodeTally>::default();
    let mut splits = Tally::<SplitTally>::default();
    let mut converted = 0;
    for enrollment in enrollments {
        let steps = enrollment.steps;
        let goal = steps.iter().any(|s| s.outcome == "goal");
        converted += u64::from(goal);
        count_nodes(steps, &mut nodes);
        let mut split_seen = HashSet::new();
        for step in steps.iter().filter(|s| s.outcome == "arm") {
            if split_seen.insert(step.node_id.as_str()) {
                splits.get(&step.node_id).assign(step, goal);
            }
        }
    }
    GetJourneyReportResponse {
        journey_id: journey_id.to_owned(),
        enrollments: enrollments.len() as u64,
        converted,
        nodes: nodes
            .items
            .into_iter()
            .map(|(node_id, mut n)| NodeReport {
                node_id,
                time_in_node: Some(stats::distribution(&mut n.durations)),
                ..n.report
            })
            .collect(),
        splits: splits
            .items
            .into_iter()
            .map(|(node_id, s)| s.report(node_id, confidence))
            .collect(),
    }
}

/// Items by id, in order of first appearance.
struct Tally<T> {
    items: Vec<(String, T)>,
    index: HashMap<String, usize>,
}

impl<T> Default for Tally<T> {
    fn default() -> Self {
        Self {
            items: Vec::new(),
            index: HashMap::new(),
        }
    }
}

impl<T: Default> Tally<T> {
    fn get(&mut self, id: &str) -> &mut T {
        let i = match self.index.get(id) {
            Some(&i) => i,
            None => {
                self.items.push((id.to_owned(), T::default()));
                self.index.insert(id.to_owned(), self.items.len() - 1);
                self.items.len() - 1
            }
        };
        &mut self.items[i].1
    }
}

#[derive(Default)]
struct NodeTally {
    report: NodeReport,
    durations: Vec<f64>,
}

fn is_terminal(outcome: &str) -> bool {
    matches!(outcome, "goal" | "exited" | "completed" | "errored")
}

/// Adds one enrollment's steps to the node counts.
fn count_nodes(steps: &[JourneyStep], nodes: &mut Tally<NodeTally>) {
    // For each step, the first later step at another node.
    let mut leaves_at = vec![None; steps.len()];
    for i in (0..steps.len().saturating_sub(1)).rev() {
        leaves_at[i] = if steps[i + 1].node_id == steps[i].node_id {
            leaves_at[i + 1]
        } else {
            Some(i + 1)
        };
    }
    let mut entered = HashSet::new();
    for (step, leaves) in steps.iter().zip(&leaves_at) {
        let node = nodes.get(&step.node_id);
        if entered.insert(step.node_id.as_str()) {
            node.report.entered += 1;
            if let Some(next) = leaves {
                node.report.advanced += 1;
                let micros = steps[*next].at_us.saturating_sub(step.at_us);
                node.durations.push(micros as f64 / 1e6);
            }
        }
        if step.outcome == "suppressed" {
            node.report.suppressed += 1;
        }
    }
    match steps.iter().find(|s| is_terminal(&s.outcome)) {
        Some(end) => {
            let report = &mut nodes.get(&end.node_id).report;
            match end.outcome.as_str() {
                "goal" => report.goal_reached += 1,
                "exited" => report.exited += 1,
                "errored" => report.errored += 1,
                _ => {}
            }
        }
        None => {
            if let Some(last) = steps.last() {
                nodes.get(&last.node_id).report.active += 1;
            }
        }
    }
}

/// One arm (or the holdout) of a split.
#[derive(Default)]
struct ArmTally {
    enrollments: u64,
    conversions: u64,
    /// Of `enrollments`, those whose arm step carried the split's weights.
    weighted: u64,
    /// The sum, over the weighted enrollments of the split, of the share their weights
    /// gave this arm.
    expected: f64,
}

/// One random split. Weights can differ between the enrollments counted (a new version
/// changed them), so the share expected for an arm is the mean of what each weighted
/// enrollment's weights gave it, which makes the expected count the sum of each
/// assignment's probability; enrollments whose arm step carried no weights count in the
/// readout but not in the mismatch check.
#[derive(Default)]
struct SplitTally {
    arms: Tally<ArmTally>,
    /// The first arm of the first weights seen: the control when none is named so.
    first_arm: Option<String>,
    enrollments: u64,
    weighted: u64,
}

impl SplitTally {
    fn assign(&mut self, step: &JourneyStep, converted: bool) {
        self.enrollments += 1;
        if let Some(shares) = shares(step) {
            self.weighted += 1;
            if self.first_arm.is_none() {
                self.first_arm = step.weights.first().map(|(name, _)| name.clone());
            }
            for (name, share) in shares {
                self.arms.get(name).expected += share;
            }
            self.arms.get(&step.decision).weighted += 1;
        }
        let arm = self.arms.get(&step.decision);
        arm.enrollments += 1;
        arm.conversions += u64::from(converted);
    }

    fn report(self, node_id: String, confidence: f64) -> SplitReport {
        let arms = &self.arms.items;
        let position = |name: &str| self.arms.index.get(name).copied();
        let control = position(CONTROL)
            .or_else(|| self.first_arm.as_deref().and_then(position))
            .or_else(|| arms.iter().position(|(name, _)| name != HOLDOUT));
        // Control first, the holdout last, the others in order of first appearance.
        let mut order: Vec<usize> = (0..arms.len()).collect();
        order.sort_by_key(|&i| (Some(i) != control, arms[i].0 == HOLDOUT));
        let control_counts = control.map(|i| {
            let a = &arms[i].1;
            (a.enrollments, a.conversions)
        });
        let variants: Vec<VariantReport> = order
            .iter()
            .map(|&i| {
                let (name, arm) = &arms[i];
                let is_control = Some(i) == control;
                let c = match control_counts {
                    Some(counts) if !is_control => {
                        stats::compare(counts, (arm.enrollments, arm.conversions), confidence)
                    }
                    _ => stats::Comparison {
                        p_value: 1.0,
                        ..stats::Comparison::default()
                    },
                };
                VariantReport {
                    arm: name.clone(),
                    enrollments: arm.enrollments,
                    conversions: arm.conversions,
                    conversion_rate: ratio(arm.conversions as f64, arm.enrollments as f64),
                    is_control,
                    uplift: c.uplift,
                    relative_uplift: c.relative_uplift,
                    uplift_ci_low: c.ci_low,
                    uplift_ci_high: c.ci_high,
                    p_value: c.p_value,
                    expected_share: ratio(arm.expected, self.weighted as f64),
                    observed_share: ratio(arm.enrollments as f64, self.enrollments as f64),
                }
            })
            .collect();
        let observed: Vec<u64> = order.iter().map(|&i| arms[i].1.weighted).collect();
        let expected: Vec<f64> = variants.iter().map(|v| v.expected_share).collect();
        let (srm_chi_squared, srm_p_value) = stats::goodness_of_fit(&observed, &expected);
        SplitReport {
            node_id,
            variants,
            srm_chi_squared,
            srm_p_value,
            sample_ratio_mismatch: srm_p_value < SRM_THRESHOLD,
        }
    }
}

/// `a / b`, 0 when `b` is 0.
fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

/// The share of assignments an arm step's split expects for each arm: the holdout gets
/// `holdout_percent / 100`, the arms share the rest in proportion to their weights.
/// `None` when the step carries no weights (or none positive).
fn shares(step: &JourneyStep) -> Option<Vec<(&str, f64)>> {
    let weight = |w: f64| if w > 0.0 { w } else { 0.0 };
    let total: f64 = step.weights.iter().map(|(_, w)| weight(*w)).sum();
    if total <= 0.0 {
        return None;
    }
    let holdout = if step.holdout_percent > 0.0 {
        (step.holdout_percent / 100.0).min(1.0)
    } else {
        0.0
    };
    let mut shares: Vec<(&str, f64)> = step
        .weights
        .iter()
        .map(|(name, w)| (name.as_str(), (1.0 - holdout) * weight(*w) / total))
        .collect();
    if holdout > 0.0 {
        shares.push((HOLDOUT, holdout));
    }
    Some(shares)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(node_id: &str, outcome: &str, decision: &str, at_s: i64) -> JourneyStep {
        JourneyStep {
            node_id: node_id.to_owned(),
            outcome: outcome.to_owned(),
            decision: decision.to_owned(),
            at_us: at_s * 1_000_000,
            ..JourneyStep::default()
        }
    }

    fn arm(node_id: &str, name: &str, weights: &[(&str, f64)], holdout: f64) -> JourneyStep {
        JourneyStep {
            weights: weights.iter().map(|(n, w)| ((*n).to_owned(), *w)).collect(),
            holdout_percent: holdout,
            ..step(node_id, "arm", name, 0)
        }
    }

    fn report(paths: &[Vec<JourneyStep>], confidence: f64) -> GetJourneyReportResponse {
        let enrollments: Vec<EnrollmentSteps<'_>> = paths
            .iter()
            .map(|steps| EnrollmentSteps {
                enrollment_id: "e",
                version: 1,
                steps,
            })
            .collect();
        journey_report("j", &enrollments, confidence)
    }

    /// (entered, advanced, exited, suppressed, errored, goal_reached, active).
    fn counts(n: &NodeReport) -> (u64, u64, u64, u64, u64, u64, u64) {
        (
            n.entered,
            n.advanced,
            n.exited,
            n.suppressed,
            n.errored,
            n.goal_reached,
            n.active,
        )
    }

    /// Asserts the count, median, p90 and mean of the time in node.
    #[track_caller]
    fn assert_times(n: &NodeReport, count: u64, median: f64, p90: f64, mean: f64) {
        let d = n.time_in_node.as_ref().unwrap();
        assert_eq!(d.count, count, "{}", n.node_id);
        assert_close(d.median_seconds, median);
        assert_close(d.p90_seconds, p90);
        assert_close(d.mean_seconds, mean);
    }

    #[test]
    fn each_node_counts_what_happened_to_the_enrollments_that_reached_it() {
        let paths = vec![
            // Bought while waiting.
            vec![
                step("welcome", "entered", "Signed Up", 0),
                step("welcome", "sent", "a1", 0),
                step("wait", "waiting", "events", 0),
                step("wait", "goal", "goal: Order Completed", 120),
            ],
            // Timed out, nudged (suppressed at welcome), ran off the end.
            vec![
                step("welcome", "entered", "Signed Up", 0),
                step("welcome", "suppressed", "a2", 0),
                step("wait", "waiting", "events", 0),
                step("wait", "timeout", "timeout", 86_400),
                step("nudge", "sent", "a3", 86_400),
                step("nudge", "completed", "completed", 86_400),
            ],
            // Unsubscribed while waiting.
            vec![
                step("welcome", "entered", "Signed Up", 10),
                step("welcome", "sent", "a4", 10),
                step("wait", "waiting", "events", 10),
                step("wait", "exited", "exit criterion: Unsubscribed", 50),
            ],
            // Deferred by quiet hours, still there.
            vec![
                step("welcome", "entered", "Signed Up", 0),
                step("welcome", "deferred", "a5", 0),
            ],
            // A template that failed.
            vec![
                step("welcome", "entered", "Signed Up", 0),
                step("welcome", "errored", "message template: oops", 0),
            ],
            // Round the loop twice, both nudges suppressed, then an exit node.
            vec![
                step("welcome", "entered", "Signed Up", 0),
                step("welcome", "sent", "a6", 0),
                step("wait", "waiting", "events", 0),
                step("wait", "timeout", "timeout", 600),
                step("nudge", "suppressed", "a7", 600),
                step("wait", "waiting", "events", 600),
                step("wait", "timeout", "timeout", 1_800),
                step("nudge", "suppressed", "a8", 1_800),
                step("bye", "exited", "unengaged", 1_800),
            ],
            // Deferred eight hours, then sent, now waiting.
            vec![
                step("welcome", "entered", "Signed Up", 0),
                step("welcome", "deferred", "a9", 0),
                step("welcome", "sent", "a9", 28_800),
                step("wait", "waiting", "events", 28_800),
            ],
        ];
        let r = report(&paths, 0.95);
        assert_eq!(
            (r.journey_id.as_str(), r.enrollments, r.converted),
            ("j", 7, 1)
        );
        assert!(r.splits.is_empty());
        let ids: Vec<&str> = r.nodes.iter().map(|n| n.node_id.as_str()).collect();
        assert_eq!(
            ids,
            ["welcome", "wait", "nudge", "bye"],
            "in order of first appearance"
        );
        let [welcome, wait, nudge, bye] = &r.nodes[..] else {
            unreachable!()
        };
        assert_eq!(counts(welcome), (7, 5, 0, 1, 1, 0, 1));
        assert_eq!(counts(wait), (5, 2, 1, 0, 0, 1, 1));
        assert_eq!(
            counts(nudge),
            (2, 1, 0, 2, 0, 0, 0),
            "entered once, left once"
        );
        assert_eq!(counts(bye), (1, 0, 1, 0, 0, 0, 0));
        // Welcome: 0, 0, 0, 0 and 28,800 s; p90 at rank 3.6 is 0.6 of the way to 28,800.
        assert_times(welcome, 5, 0.0, 17_280.0, 5_760.0);
        // Wait: from the first waiting step to the first nudge, 600 s and 86,400 s.
        assert_times(wait, 2, 43_500.0, 77_820.0, 43_500.0);
        assert_times(nudge, 1, 0.0, 0.0, 0.0);
        assert_times(bye, 0, 0.0, 0.0, 0.0);
    }

    /// `n` enrollments through a split, `converting` of them reaching the goal after it.
    fn through_split(arm_step: &JourneyStep, n: usize, converting: usize) -> Vec<Vec<JourneyStep>> {
        (0..n)
            .map(|i| {
                let mut steps = vec![step("split", "entered", "Signed Up", 0), arm_step.clone()];
                if arm_step.decision == HOLDOUT {
                    steps.push(step("split", "completed", HOLDOUT, 0));
                } else {
                    steps.push(step("offer", "sent", "a", 0));
                    let end = if i < converting { "goal" } else { "completed" };
                    steps.push(step("offer", end, "", 60));
                }
                steps
            })
            .collect()
    }

    #[track_caller]
    fn assert_close(got: f64, want: f64) {
        assert!(
            (got - want).abs() <= 1e-9 * want.abs(),
            "{got} is not {want}"
        );
    }

    #[test]
    fn a_split_reads_each_arm_against_control_and_checks_the_ratio() {
        let weights = [("control", 1.0), ("treatment", 1.0)];
        let mut paths = Vec::new();
        paths.extend(through_split(
            &arm("split", "control", &weights, 10.0),
            1000,
            100,
        ));
        paths.extend(through_split(
            &arm("split", HOLDOUT, &weights, 10.0),
            200,
            0,
        ));
        paths.extend(through_split(
            &arm("split", "treatment", &weights, 10.0),
            1000,
            130,
        ));
        let r = report(&paths, 0.95);
        assert_eq!((r.enrollments, r.converted), (2200, 230));
        assert_eq!(counts(&r.nodes[0]), (2200, 2000, 0, 0, 0, 0, 0));
        assert_eq!(counts(&r.nodes[1]), (2000, 0, 0, 0, 0, 230, 0));

        let [split] = &r.splits[..] else {
            panic!("one split: {:?}", r.splits)
        };
        assert_eq!(split.node_id, "split");
        let arms: Vec<(&str, bool, u64, u64)> = split
            .variants
            .iter()
            .map(|v| (v.arm.as_str(), v.is_control, v.enrollments, v.conversions))
            .collect();
        assert_eq!(
            arms,
            [
                ("control", true, 1000, 100),
                ("treatment", false, 1000, 130),
                (HOLDOUT, false, 200, 0)
            ],
            "control first, the holdout last"
        );
        let [control, treatment, holdout] = &split.variants[..] else {
            unreachable!()
        };
        assert_eq!(control.conversion_rate, 0.1);
        assert_eq!(
            (
                control.uplift,
                control.uplift_ci_low,
                control.uplift_ci_high,
                control.p_value
            ),
            (0.0, 0.0, 0.0, 1.0)
        );
        // The textbook case (see stats): python3 as in stats' tests.
        assert_close(treatment.conversion_rate, 0.13);
        assert_close(treatment.uplift, 0.03);
        assert_close(treatment.relative_uplift, 0.3);
        assert_close(treatment.p_value, 0.03548845046647473);
        assert_close(treatment.uplift_ci_low, 0.0020679344393763725);
        assert_close(treatment.uplift_ci_high, 0.05793206556062362);
        assert_close(holdout.uplift, -0.1);
        assert_close(holdout.p_value, 2.9974618462528634e-06);
        // Shares: 10% held out, the rest halved. python3: Pearson's sum of
        // (o - e) ** 2 / e over 1000, 1000, 200 against 990, 990, 220; exp(-chi / 2).
        let shares: Vec<(f64, f64)> = split
            .variants
            .iter()
            .map(|v| (v.expected_share, v.observed_share))
            .collect();
        assert_close(shares[0].0, 0.45);
        assert_close(shares[1].0, 0.45);
        assert_close(shares[2].0, 0.1);
        assert_eq!(shares[0].1, 1000.0 / 2200.0);
        assert_eq!(shares[2].1, 200.0 / 2200.0);
        assert_close(split.srm_chi_squared, 2.0202020202020203);
        assert_close(split.srm_p_value, 0.3641821916336149);
        assert!(!split.sample_ratio_mismatch);
    }

    #[test]
    fn a_skewed_assignment_is_flagged_and_control_defaults_to_the_first_arm() {
        let weights = [("b", 1.0), ("a", 1.0)];
        let mut paths = Vec::new();
        paths.extend(through_split(&arm("split", "b", &weights, 0.0), 5400, 540));
        paths.extend(through_split(&arm("split", "a", &weights, 0.0), 5000, 600));
        // Assigned before arm steps carried weights, to an arm since removed: in the
        // readout, not in the check.
        paths.extend(through_split(&arm("split", "c", &[], 0.0), 3, 1));
        let r = report(&paths, 0.9);
        let split = &r.splits[0];
        let arms: Vec<(&str, bool, u64, f64)> = split
            .variants
            .iter()
            .map(|v| {
                (
                    v.arm.as_str(),
                    v.is_control,
                    v.enrollments,
                    v.expected_share,
                )
            })
            .collect();
        assert_eq!(
            arms,
            [
                ("b", true, 5400, 0.5),
                ("a", false, 5000, 0.5),
                ("c", false, 3, 0.0)
            ]
        );
        assert_eq!(split.variants[2].observed_share, 3.0 / 10_403.0);
        // The check sees 5400 against 5000 on a 50/50 split (see stats).
        assert_close(split.srm_chi_squared, 15.384615384615385);
        assert_close(split.srm_p_value, 8.769942375590239e-05);
        assert!(split.sample_ratio_mismatch);
        // The requested confidence reaches the interval: at 90% it is narrower than at 95%.
        let a = &split.variants[1];
        let at_95 = stats::compare((5400, 540), (5000, 600), 0.95);
        assert_close(a.uplift, 0.02);
        assert!(a.uplift_ci_low > at_95.ci_low && a.uplift_ci_high < at_95.ci_high);
    }

    #[test]
    fn the_arm_named_control_is_control_and_a_revisit_counts_once() {
        let weights = [("treatment", 1.0), ("control", 1.0)];
        let treated = arm("split", "treatment", &weights, 0.0);
        let looped = vec![
            step("split", "entered", "Signed Up", 0),
            treated.clone(),
            step("offer", "sent", "a", 0),
            step("split", "arm", "treatment", 0),
            step("offer", "goal", "goal: Order Completed", 0),
        ];
        let mut paths = vec![looped];
        paths.extend(through_split(&arm("split", "control", &weights, 0.0), 1, 0));
        let r = report(&paths, 0.95);
        let arms: Vec<(&str, bool, u64, u64)> = r.splits[0]
            .variants
            .iter()
            .map(|v| (v.arm.as_str(), v.is_control, v.enrollments, v.conversions))
            .collect();
        assert_eq!(arms, [("control", true, 1, 0), ("treatment", false, 1, 1)]);
        assert_eq!(
            counts(&r.nodes[0]).0,
            2,
            "split entered once per enrollment"
        );
    }

    #[test]
    fn a_split_without_weights_or_arms_reads_without_a_check() {
        let paths = through_split(&arm("split", HOLDOUT, &[], 0.0), 4, 0);
        let r = report(&paths, 0.95);
        let split = &r.splits[0];
        assert_eq!(split.variants.len(), 1);
        let holdout = &split.variants[0];
        assert!(!holdout.is_control, "the holdout is never control");
        assert_eq!(
            (holdout.enrollments, holdout.p_value, holdout.expected_share),
            (4, 1.0, 0.0)
        );
        assert_eq!((split.srm_chi_squared, split.srm_p_value), (0.0, 1.0));
        assert!(!split.sample_ratio_mismatch);

        let empty = report(&[], 0.95);
        assert_eq!((empty.enrollments, empty.converted), (0, 0));
        assert!(empty.nodes.is_empty() && empty.splits.is_empty());
    }
}
