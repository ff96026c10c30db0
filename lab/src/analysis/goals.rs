//! The goals of issue 11 and whether this run met them. Medians throughout; a goal the run did
//! not measure (quick mode, a variant left out, a hook whose links are not pinned) says so, and
//! so does a timed difference whose margin of error holds the target.

use serde::Serialize;

use crate::analysis::traffic::Metric;
use crate::analysis::Results;
use crate::records::{SetupMethod, SetupMode};
use crate::variant::{Variant, Workload};

/// The setup goal: per-pod p99 at N pods.
pub const SETUP_GOAL_PODS: usize = 1000;
pub const SETUP_GOAL_P99_MS: f64 = 5.0;

/// bpftool's attach types of the hooks the goals name.
const SOCKOPS_HOOK: &str = "cgroup_sock_ops";
const CONNECT4_HOOK: &str = "cgroup_inet4_connect";
const GETSOCKOPT_HOOK: &str = "cgroup_getsockopt";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Met,
    NotMet,
    /// The target lies within the figure's margin of error.
    WithinNoise,
    NotMeasured,
}

#[derive(Clone, Debug, Serialize)]
pub struct Goal {
    pub goal: String,
    pub target: String,
    pub measured: String,
    pub verdict: Verdict,
}

fn goal(goal: &str, target: &str, outcome: Option<(String, bool)>) -> Goal {
    let (measured, verdict) = match outcome {
        Some((measured, true)) => (measured, Verdict::Met),
        Some((measured, false)) => (measured, Verdict::NotMet),
        None => ("not measured in this run".to_owned(), Verdict::NotMeasured),
    };
    Goal {
        goal: goal.to_owned(),
        target: target.to_owned(),
        measured,
        verdict,
    }
}

/// An upper bound on a figure measured with a margin of error: met or missed only when the
/// whole interval is on one side of the limit.
fn at_most_within(name: &str, value: Option<(f64, f64)>, limit: f64) -> Goal {
    let mut judged = goal(
        name,
        &format!("≤ {limit} ns"),
        value.map(|(value, margin)| (format!("{value:.0} ± {margin:.0} ns"), value <= limit)),
    );
    if let Some((value, margin)) = value {
        if (value - limit).abs() <= margin {
            judged.verdict = Verdict::WithinNoise;
        }
    }
    judged
}

/// An upper bound on one figure, in ns (shown whole) or ms (shown to the µs).
fn at_most(name: &str, value: Option<f64>, limit: f64, unit: &str) -> Goal {
    let decimals = if unit == "ms" { 3 } else { 0 };
    goal(
        name,
        &format!("≤ {limit} {unit}"),
        value.map(|value| (format!("{value:.decimals$} {unit}"), value <= limit)),
    )
}

pub fn evaluate_goals(results: &Results) -> Vec<Goal> {
    let crr = results.program_pass(Variant::Ebpf, Workload::Crr);
    let hook = |hook| crr.and_then(|pass| pass.at_hook(hook));
    let tax = |workload| {
        results
            .tax(workload)
            .map(|row| (row.extra_ns.median, row.extra_ns_margin))
    };
    let mut goals = vec![
        at_most(
            "program time per proxied connection (EBPF, CRR)",
            crr.map(|pass| pass.ns_per_operation),
            1500.0,
            "ns",
        ),
        goal(
            "sockops runs per proxied connection",
            "≤ 6",
            hook(SOCKOPS_HOOK).map(|figures| {
                let runs = figures.runs_per_operation;
                (format!("{runs:.1}"), runs <= 6.0)
            }),
        ),
        at_most(
            "connect4 per run",
            hook(CONNECT4_HOOK).map(|figures| figures.ns_per_run),
            400.0,
            "ns",
        ),
        at_most(
            "getsockopt per run (the SO_ORIGINAL_DST call)",
            hook(GETSOCKOPT_HOOK).map(|figures| figures.ns_per_run),
            250.0,
            "ns",
        ),
        at_most_within(
            "extra cost of a getsockopt(SO_ERROR) in an enrolled pod",
            tax(Workload::SockoptSoError),
            100.0,
        ),
        at_most_within(
            "extra cost of a connection the policy leaves alone (-o port)",
            tax(Workload::Crr),
            100.0,
        ),
    ];

    let overhead = |variant| results.overhead(variant, Workload::Crr, Metric::P50Us);
    goals.push(goal(
        "EBPF interception overhead vs IPT's, CRR p50",
        "≤ 0.1×",
        match (overhead(Variant::Ipt), overhead(Variant::Ebpf)) {
            (Some(ipt), Some(ebpf)) if ipt.median > 0.0 => {
                let ratio = ebpf.median / ipt.median;
                Some((
                    format!(
                        "{ratio:.2}× ({:+.1} µs vs {:+.1} µs over B1)",
                        ebpf.median, ipt.median
                    ),
                    ratio <= 0.1,
                ))
            }
            _ => None,
        },
    ));

    let rate = |variant| results.spread(variant, Workload::Crr, Metric::RatePerS);
    goals.push(goal(
        "connection rate, EBPF vs B1",
        "≥ 0.98×",
        rate(Variant::B1)
            .zip(rate(Variant::Ebpf))
            .map(|(b1, ebpf)| {
                let ratio = ebpf.median / b1.median;
                (
                    format!("{ratio:.3}× ({:.0}/s vs {:.0}/s)", ebpf.median, b1.median),
                    ratio >= 0.98,
                )
            }),
    ));

    let p99 = |variant, workload| {
        results
            .spread(variant, workload, Metric::P99Us)
            .map(|p99| p99.median)
    };
    let persistent: Vec<(Workload, f64, f64)> = [Workload::Rr1, Workload::Rr1k]
        .into_iter()
        .filter_map(|workload| {
            Some((
                workload,
                p99(Variant::Ebpf, workload)?,
                p99(Variant::Ipt, workload)?,
            ))
        })
        .collect();
    goals.push(goal(
        "persistent-connection p99, EBPF vs IPT",
        "no worse",
        (!persistent.is_empty()).then(|| {
            (
                persistent
                    .iter()
                    .map(|(workload, ebpf, ipt)| {
                        format!("{}: {ebpf:.1} µs vs {ipt:.1} µs", workload.name())
                    })
                    .collect::<Vec<_>>()
                    .join("; "),
                persistent.iter().all(|(_, ebpf, ipt)| ebpf <= ipt),
            )
        }),
    ));

    for mode in SetupMode::ALL {
        let row = results.setup_row(SetupMethod::RedirectorCni, mode, SETUP_GOAL_PODS);
        goals.push(at_most(
            &format!(
                "per-pod setup p99 at N = {SETUP_GOAL_PODS}, EBPF (CNI ADD through the agent), {}",
                mode.name()
            ),
            row.map(|row| row.p99_ms),
            SETUP_GOAL_P99_MS,
            "ms",
        ));
    }
    goals
}
