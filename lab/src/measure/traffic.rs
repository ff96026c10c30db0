//! The traffic rounds: every workload on every variant that runs it, interleaved, for several
//! rounds; and in each round the not-captured tax, the not-captured variant against B0 in
//! paired turns.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use crate::measure::machine::{wait_until_quiet, OtherWork};
use crate::records::{Sample, TurnSample};
use crate::rig::Rig;
use crate::variant::{Variant, Workload};
use crate::wire::{LoadReport, Pattern, PortStats};

pub struct TrafficPlan {
    pub variants: Vec<Variant>,
    pub rounds: u32,
    pub warmup: Duration,
    pub duration: Duration,
    /// Length of one turn when variants take turns.
    pub slice: Duration,
    /// How long each run waits for a quiet machine before it starts anyway.
    pub quiet_timeout: Duration,
}

/// What the traffic rounds measured.
pub struct Traffic {
    /// One per variant, workload and round.
    pub samples: Vec<Sample>,
    /// One per measured turn of the paired sessions.
    pub turn_samples: Vec<TurnSample>,
}

/// What is kept of a session: a sample per run, or every turn (to compare turn by turn).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Keep {
    Runs,
    Turns,
}

/// Variants running one workload together: in turns, or alone when there is one.
struct Session {
    workload: Workload,
    variants: Vec<Variant>,
    keep: Keep,
}

/// The sessions of one round. Connection-rate and request/response runs take short turns (all
/// variants within the same seconds; see [`crate::turns`]); bulk runs go one after
/// another. Each round starts one variant later, so that no variant always goes first.
fn sessions(plan: &TrafficPlan, round: u32) -> Vec<Session> {
    let mut order = plan.variants.clone();
    let start = (round as usize - 1) % order.len();
    order.rotate_left(start);
    let mut sessions = Vec::new();
    for workload in Workload::TRAFFIC {
        let variants: Vec<Variant> = order
            .iter()
            .copied()
            .filter(|variant| variant.workloads().contains(&workload))
            .collect();
        match workload.pattern() {
            Pattern::Bulk => sessions.extend(variants.into_iter().map(|variant| Session {
                workload,
                variants: vec![variant],
                keep: Keep::Runs,
            })),
            _ if !variants.is_empty() => sessions.push(Session {
                workload,
                variants,
                keep: Keep::Runs,
            }),
            _ => {}
        }
    }
    let pair = [Variant::EbpfNotCaptured, Variant::B0];
    if pair.iter().all(|variant| plan.variants.contains(variant)) {
        for workload in Workload::NOT_CAPTURED_TAX {
            let mut variants = pair.to_vec();
            variants.rotate_left(round as usize % 2);
            sessions.push(Session {
                workload,
                variants,
                keep: Keep::Turns,
            });
        }
    }
    sessions
}

pub fn run_traffic(rig: &Rig, plan: &TrafficPlan) -> Result<Traffic> {
    let total: usize = (1..=plan.rounds)
        .map(|round| {
            sessions(plan, round)
                .iter()
                .map(|s| s.variants.len())
                .sum::<usize>()
        })
        .sum();
    let mut traffic = Traffic {
        samples: Vec::new(),
        turn_samples: Vec::new(),
    };
    let mut runs = 0;
    let mut seen: HashMap<Variant, PortStats> = HashMap::new();
    for round in 1..=plan.rounds {
        for session in sessions(plan, round) {
            let workload = session.workload;
            wait_until_quiet(plan.quiet_timeout);
            let other_work = OtherWork::start(rig.lab_cgroup());
            let reports = match session.variants.as_slice() {
                [variant] => rig
                    .run_load(*variant, workload, plan.warmup, plan.duration)
                    .map(|report| vec![report]),
                variants => {
                    rig.run_in_turns(variants, workload, plan.warmup, plan.duration, plan.slice)
                }
            };
            if reports.is_err() {
                rig.check_server()?;
            }
            let reports = reports.with_context(|| format!("round {round}"))?;
            let other_cpus = other_work.and_then(|meter| meter.cpus());
            for (variant, report) in session.variants.into_iter().zip(reports) {
                let before = seen.insert(variant, report.server).unwrap_or_default();
                let bytes_in = report.server.bytes_in - before.bytes_in;
                ensure!(
                    bytes_in > 0,
                    "{} {} carried no bytes to the server: {report:?}",
                    variant.name(),
                    workload.name()
                );
                runs += 1;
                let mut disturbed = String::new();
                match session.keep {
                    Keep::Runs => {
                        let mut sample = Sample::new(round, variant, workload, &report);
                        sample.server_connections = report.server.connections - before.connections;
                        sample.server_bytes_in = bytes_in;
                        sample.other_cpus = other_cpus;
                        if let Some(cpus) = sample.other_cpus.filter(|_| sample.disturbed()) {
                            disturbed = format!("  (disturbed: {cpus:.2} CPUs of other work)");
                        }
                        traffic.samples.push(sample);
                    }
                    Keep::Turns => {
                        traffic
                            .turn_samples
                            .extend(report.turns.iter().enumerate().map(|(turn, figures)| {
                                TurnSample {
                                    round,
                                    workload,
                                    variant,
                                    turn,
                                    seconds: figures.seconds,
                                    operations: figures.transactions
                                        * workload.operations_per_transaction(),
                                }
                            }));
                    }
                }
                eprintln!(
                    "lab: [{runs:>3}/{total}] round {round} {:<19} {:<17} {}{disturbed}",
                    workload.name(),
                    variant.name(),
                    progress_figures(workload, &report)
                );
            }
        }
    }
    Ok(traffic)
}

fn progress_figures(workload: Workload, report: &LoadReport) -> String {
    let errors = if report.errors > 0 {
        format!(
            " ({} errors, first: {})",
            report.errors,
            report.first_error.as_deref().unwrap_or("")
        )
    } else {
        String::new()
    };
    let operations = report.transactions * workload.operations_per_transaction();
    match (report.pattern, report.latency) {
        (Pattern::Bulk, _) => format!(
            "{:.2} Gbit/s{errors}",
            report.bulk_bytes as f64 * 8.0 / report.seconds / 1e9
        ),
        (Pattern::Getsockopt, _) if operations > 0 => format!(
            "{:.0} ns/call{errors}",
            report.seconds * 1e9 / operations as f64
        ),
        (_, Some(latency)) => format!(
            "{:.0}/s  p50 {:.1} µs  p99 {:.1} µs{errors}",
            report.transactions as f64 / report.seconds,
            latency.p50_us,
            latency.p99_us
        ),
        (_, None) => format!("no transactions{errors}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(variants: &[Variant]) -> TrafficPlan {
        TrafficPlan {
            variants: variants.to_vec(),
            rounds: 2,
            warmup: Duration::ZERO,
            duration: Duration::ZERO,
            slice: Duration::ZERO,
            quiet_timeout: Duration::ZERO,
        }
    }

    #[test]
    fn ipv6_runs_only_crr_and_the_not_captured_variant_only_its_pairs_with_b0() {
        let all = plan(&Variant::ALL);
        let round = sessions(&all, 1);
        let crr = &round[0];
        assert_eq!(crr.workload, Workload::Crr);
        assert_eq!(crr.variants.len(), 10, "all but the not-captured variant");
        assert!(!crr.variants.contains(&Variant::EbpfNotCaptured));
        let rr = &round[1];
        assert!(rr
            .variants
            .iter()
            .all(|v| v.family() == crate::variant::Family::V4));
        let bulk = round
            .iter()
            .filter(|s| s.workload == Workload::Bulk)
            .count();
        assert_eq!(bulk, 7, "bulk runs alone, IPv4 variants only");
        let paired: Vec<&Session> = round.iter().filter(|s| s.keep == Keep::Turns).collect();
        assert_eq!(paired.len(), 2);
        for session in paired {
            let mut variants = session.variants.clone();
            variants.sort();
            assert_eq!(variants, [Variant::B0, Variant::EbpfNotCaptured]);
        }
        assert!(sessions(&plan(&Variant::MAIN), 1)
            .iter()
            .all(|s| s.keep == Keep::Runs));
    }
}
