//! The traffic measurements: every workload on every variant, interleaved, for several rounds;
//! then a separate pass with the kernel's per-program accounting on.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use aya::programs::ProgramInfo;
use clap::ValueEnum as _;
use serde::{Serialize, Serializer};

use crate::rig::{Rig, Variant};
use crate::system::{wait_until_quiet, OtherWork};
use crate::wire::{LoadReport, Pattern, PortStats};

/// A pattern with its message size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Workload {
    Crr,
    Rr1,
    Rr1k,
    Bulk,
}

impl Workload {
    pub const ALL: [Workload; 4] = [Workload::Crr, Workload::Rr1, Workload::Rr1k, Workload::Bulk];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Crr => "crr",
            Workload::Rr1 => "rr-1B",
            Workload::Rr1k => "rr-1KiB",
            Workload::Bulk => "bulk",
        }
    }

    pub fn pattern(self) -> Pattern {
        match self {
            Workload::Crr => Pattern::Crr,
            Workload::Rr1 | Workload::Rr1k => Pattern::Rr,
            Workload::Bulk => Pattern::Bulk,
        }
    }

    /// The value of `redirector-lab load --pattern`.
    pub fn pattern_arg(self) -> String {
        self.pattern()
            .to_possible_value()
            .map(|value| value.get_name().to_owned())
            .unwrap_or_default()
    }

    /// RR message size in bytes; 0 for the others.
    pub fn size(self) -> usize {
        match self {
            Workload::Rr1 => 1,
            Workload::Rr1k => 1024,
            Workload::Crr | Workload::Bulk => 0,
        }
    }
}

impl Serialize for Workload {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

/// One timed run: a row of `samples.csv`.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    pub round: u32,
    pub variant: Variant,
    pub workload: Workload,
    pub seconds: f64,
    pub transactions: u64,
    pub errors: u64,
    /// Transactions per second (CRR: connections per second).
    pub rate_per_s: Option<f64>,
    pub p50_us: Option<f64>,
    pub p90_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub p999_us: Option<f64>,
    pub max_us: Option<f64>,
    pub mean_us: Option<f64>,
    pub gbit_s: Option<f64>,
    /// What the server saw of this run on the variant's port.
    pub server_connections: u64,
    pub server_bytes_in: u64,
    /// CPUs' worth of work outside the lab while the run ran (other processes, kernel
    /// workers, stolen time); see [`Sample::disturbed`].
    pub other_cpus: Option<f64>,
}

impl Sample {
    fn new(round: u32, variant: Variant, workload: Workload, report: &LoadReport) -> Sample {
        let latency = report.latency;
        let rate = (workload.pattern() != Pattern::Bulk && report.seconds > 0.0)
            .then(|| report.transactions as f64 / report.seconds);
        let gbit_s = (workload.pattern() == Pattern::Bulk && report.seconds > 0.0)
            .then(|| report.bulk_bytes as f64 * 8.0 / report.seconds / 1e9);
        Sample {
            round,
            variant,
            workload,
            seconds: report.seconds,
            transactions: report.transactions,
            errors: report.errors,
            rate_per_s: rate,
            p50_us: latency.map(|l| l.p50_us),
            p90_us: latency.map(|l| l.p90_us),
            p99_us: latency.map(|l| l.p99_us),
            p999_us: latency.map(|l| l.p999_us),
            max_us: latency.map(|l| l.max_us),
            mean_us: latency.map(|l| l.mean_us),
            gbit_s,
            server_connections: 0,
            server_bytes_in: 0,
            other_cpus: None,
        }
    }

    /// Whether other work took enough CPU during the run to slow it down.
    pub fn disturbed(&self) -> bool {
        self.other_cpus.is_some_and(|cpus| cpus > DISTURBED_CPUS)
    }
}

/// Work outside the lab (in CPUs) above which a run counts as disturbed.
pub const DISTURBED_CPUS: f64 = 0.2;

pub struct TrafficPlan {
    pub variants: Vec<Variant>,
    pub rounds: u32,
    pub warmup: Duration,
    pub duration: Duration,
    /// How long each run waits for a quiet machine before it starts anyway.
    pub quiet_timeout: Duration,
}

/// Every round runs each workload on every variant back to back (A B C D, A B C D, ...), and
/// each round starts one variant later, so that no variant always runs first.
pub fn run_traffic(rig: &Rig, plan: &TrafficPlan) -> Result<Vec<Sample>> {
    let total = plan.rounds as usize * Workload::ALL.len() * plan.variants.len();
    let mut samples = Vec::with_capacity(total);
    let mut seen: HashMap<Variant, PortStats> = HashMap::new();
    for round in 1..=plan.rounds {
        for workload in Workload::ALL {
            let mut order = plan.variants.clone();
            let start = (round as usize - 1) % order.len();
            order.rotate_left(start);
            for variant in order {
                wait_until_quiet(plan.quiet_timeout);
                let other_work = OtherWork::start(rig.sandbox.cgroups.path());
                let report = rig
                    .run_load(variant, workload, plan.warmup, plan.duration)
                    .with_context(|| format!("round {round}"));
                if report.is_err() {
                    rig.check_server()?;
                }
                let report = report?;
                let before = seen.insert(variant, report.server).unwrap_or_default();
                let mut sample = Sample::new(round, variant, workload, &report);
                sample.server_connections = report.server.connections - before.connections;
                sample.server_bytes_in = report.server.bytes_in - before.bytes_in;
                sample.other_cpus = other_work.and_then(|meter| meter.cpus());
                ensure!(
                    sample.server_bytes_in > 0,
                    "{} {} carried no bytes to the server: {report:?}",
                    variant.name(),
                    workload.name()
                );
                let disturbed = match sample.other_cpus {
                    Some(cpus) if sample.disturbed() => {
                        format!("  (disturbed: {cpus:.2} CPUs of other work)")
                    }
                    _ => String::new(),
                };
                samples.push(sample);
                eprintln!(
                    "lab: [{:>3}/{total}] round {round} {:<8} {:<13} {}{disturbed}",
                    samples.len(),
                    workload.name(),
                    variant.name(),
                    progress_figures(&report)
                );
            }
        }
    }
    Ok(samples)
}

fn progress_figures(report: &LoadReport) -> String {
    let errors = if report.errors > 0 {
        format!(
            " ({} errors, first: {})",
            report.errors,
            report.first_error.as_deref().unwrap_or("")
        )
    } else {
        String::new()
    };
    match (report.pattern, report.latency) {
        (Pattern::Bulk, _) => format!(
            "{:.2} Gbit/s{errors}",
            report.bulk_bytes as f64 * 8.0 / report.seconds / 1e9
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

/// What the kernel's own accounting says one program costs on one workload.
#[derive(Clone, Debug, Serialize)]
pub struct ProgramCost {
    pub workload: Workload,
    pub program: String,
    pub run_cnt: u64,
    pub run_time_ns: u64,
    pub ns_per_run: f64,
    pub runs_per_transaction: f64,
    pub ns_per_transaction: f64,
}

/// Runs `workloads` on the EBPF variant once more with the kernel's run-time accounting on
/// (`kernel.bpf_stats_enabled`), and reads each pinned program's run_time_ns / run_cnt. A
/// separate pass, so that the timed runs carry no accounting overhead. No warm-up: every
/// transaction that ran the programs is counted.
pub fn profile_programs(
    rig: &Rig,
    pin_root: &Path,
    workloads: &[Workload],
    duration: Duration,
) -> Result<Vec<ProgramCost>> {
    // The same switch as the sysctl, but it goes off by itself when this fd closes.
    let _stats_on = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("switching on the kernel's BPF run-time statistics")?;
    let mut costs = Vec::new();
    for &workload in workloads {
        let before = program_counters(pin_root)?;
        let report = rig.run_load(Variant::Ebpf, workload, Duration::ZERO, duration)?;
        let after = program_counters(pin_root)?;
        let transactions = report.transactions.max(1) as f64;
        for (program, (count_after, time_after)) in after {
            let (count_before, time_before) = before.get(&program).copied().unwrap_or_default();
            let run_cnt = count_after - count_before;
            let run_time_ns = time_after - time_before;
            costs.push(ProgramCost {
                workload,
                program,
                run_cnt,
                run_time_ns,
                ns_per_run: run_time_ns as f64 / run_cnt.max(1) as f64,
                runs_per_transaction: run_cnt as f64 / transactions,
                ns_per_transaction: run_time_ns as f64 / transactions,
            });
        }
        eprintln!("lab: profiled EBPF {} with bpf_stats", workload.name());
    }
    Ok(costs)
}

/// (run_cnt, run_time_ns) of every program pinned under `<root>/progs`, by pin name.
fn program_counters(pin_root: &Path) -> Result<BTreeMap<String, (u64, u64)>> {
    let dir = pin_root.join("progs");
    let mut counters = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        let info = ProgramInfo::from_pin(&path)
            .with_context(|| format!("reading program info of {}", path.display()))?;
        let name = path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        counters.insert(name, (info.run_count(), info.run_time().as_nanos() as u64));
    }
    Ok(counters)
}
