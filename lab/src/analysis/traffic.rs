//! The traffic rounds as figures: each variant's medians over the rounds, and interception
//! overhead, each variant minus its baseline, paired round by round.

use serde::Serialize;

use crate::analysis::spread::Spread;
use crate::records::Sample;
use crate::variant::{Variant, Workload};

/// What is read from a sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    RatePerS,
    /// 1e6 / rate: the time one transaction takes, for overheads.
    UsPerTransaction,
    P50Us,
    P99Us,
    P999Us,
    GbitS,
}

impl Metric {
    fn of(self, sample: &Sample) -> Option<f64> {
        match self {
            Metric::RatePerS => sample.rate_per_s,
            Metric::UsPerTransaction => sample.rate_per_s.map(|rate| 1e6 / rate),
            Metric::P50Us => sample.p50_us,
            Metric::P99Us => sample.p99_us,
            Metric::P999Us => sample.p999_us,
            Metric::GbitS => sample.gbit_s,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct TrafficRow {
    pub variant: Variant,
    pub workload: Workload,
    /// Runs the figures come from.
    pub runs: usize,
    /// Runs left out because other work disturbed them (see [`Sample::disturbed`]).
    pub disturbed_runs_left_out: usize,
    pub errors: u64,
    pub server_bytes_in: u64,
    pub rate_per_s: Option<Spread>,
    pub p50_us: Option<Spread>,
    pub p99_us: Option<Spread>,
    pub p999_us: Option<Spread>,
    pub gbit_s: Option<Spread>,
}

impl TrafficRow {
    pub fn spread(&self, metric: Metric) -> Option<Spread> {
        match metric {
            Metric::RatePerS => self.rate_per_s,
            Metric::UsPerTransaction => self.rate_per_s.map(|rate| Spread {
                median: 1e6 / rate.median,
                min: 1e6 / rate.max,
                max: 1e6 / rate.min,
            }),
            Metric::P50Us => self.p50_us,
            Metric::P99Us => self.p99_us,
            Metric::P999Us => self.p999_us,
            Metric::GbitS => self.gbit_s,
        }
    }
}

/// `variant − baseline` for one metric, paired round by round (the two ran within the same
/// seconds, taking turns), as median and range over the rounds.
#[derive(Clone, Debug, Serialize)]
pub struct OverheadRow {
    pub variant: Variant,
    pub baseline: Variant,
    pub workload: Workload,
    pub metric: Metric,
    pub difference: Spread,
}

/// The runs to take figures from: the undisturbed ones when there are any.
fn quiet_runs(runs: Vec<&Sample>) -> Vec<&Sample> {
    let quiet: Vec<&Sample> = runs.iter().copied().filter(|s| !s.disturbed()).collect();
    if quiet.is_empty() {
        runs
    } else {
        quiet
    }
}

pub fn traffic_rows(variants: &[Variant], samples: &[Sample]) -> Vec<TrafficRow> {
    let mut rows = Vec::new();
    for &variant in variants {
        for &workload in variant.workloads() {
            let all: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.variant == variant && s.workload == workload)
                .collect();
            if all.is_empty() {
                continue;
            }
            let total = all.len();
            let runs = quiet_runs(all);
            let spread = |metric: Metric| Spread::of(runs.iter().filter_map(|s| metric.of(s)));
            rows.push(TrafficRow {
                variant,
                workload,
                runs: runs.len(),
                disturbed_runs_left_out: total - runs.len(),
                errors: runs.iter().map(|s| s.errors).sum(),
                server_bytes_in: runs.iter().map(|s| s.server_bytes_in).sum(),
                rate_per_s: spread(Metric::RatePerS),
                p50_us: spread(Metric::P50Us),
                p99_us: spread(Metric::P99Us),
                p999_us: spread(Metric::P999Us),
                gbit_s: spread(Metric::GbitS),
            });
        }
    }
    rows
}

pub fn overhead_rows(variants: &[Variant], samples: &[Sample]) -> Vec<OverheadRow> {
    const METRICS: [Metric; 5] = [
        Metric::UsPerTransaction,
        Metric::P50Us,
        Metric::P99Us,
        Metric::P999Us,
        Metric::GbitS,
    ];
    let mut rounds: Vec<u32> = samples.iter().map(|s| s.round).collect();
    rounds.sort_unstable();
    rounds.dedup();
    // Differences of the rounds where both runs were undisturbed; all rounds if there is none.
    let differences = |variant, baseline, workload, metric: Metric, quiet_only: bool| {
        let value = |variant, round| {
            samples
                .iter()
                .find(|s| s.variant == variant && s.workload == workload && s.round == round)
                .filter(|s| !(quiet_only && s.disturbed()))
                .and_then(|s| metric.of(s))
        };
        Spread::of(
            rounds
                .iter()
                .filter_map(|&round| Some(value(variant, round)? - value(baseline, round)?)),
        )
    };
    let mut rows = Vec::new();
    for &variant in variants {
        let Some(baseline) = variant.baseline() else {
            continue;
        };
        for &workload in variant.workloads() {
            for metric in METRICS {
                let difference = differences(variant, baseline, workload, metric, true)
                    .or_else(|| differences(variant, baseline, workload, metric, false));
                if let Some(difference) = difference {
                    rows.push(OverheadRow {
                        variant,
                        baseline,
                        workload,
                        metric,
                        difference,
                    });
                }
            }
        }
    }
    rows
}
