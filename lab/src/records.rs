//! What the measurement stage hands to the analysis: the run's settings, the machine, and one
//! record per timed run, turn, program pass, profile and pod set-up. Nothing here is derived;
//! the analysis turns these into figures.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::variant::{Variant, Workload};
use crate::wire::{LoadReport, Pattern};

/// The settings of a lab run.
#[derive(Clone, Debug, Serialize)]
pub struct Config {
    pub quick: bool,
    pub rounds: u32,
    pub seconds_per_run: f64,
    pub warmup_seconds: f64,
    /// Length of a turn when variants take turns (CRR, RR and the not-captured tax).
    pub turn_ms: u128,
    pub setup_sizes: Vec<usize>,
    pub setup_rounds: u32,
    /// Pods set up at once in the parallel setup mode.
    pub setup_parallel: usize,
    pub variants: Vec<Variant>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SystemInfo {
    /// `uname -r`.
    pub kernel: String,
    /// The first `model name` of /proc/cpuinfo.
    pub cpu: String,
    pub cpus: usize,
    pub pinning: String,
    /// `iptables -V` (it names the backend: nf_tables or legacy).
    pub iptables: String,
    /// `haproxy -v`, first line.
    pub haproxy: Option<String>,
    /// CPUs' worth of time spent by anything (stolen time included) in the second before the
    /// lab started: other work on the machine makes the figures noisy.
    pub busy_cpus_before_start: Option<f64>,
}

/// Work outside the lab (in CPUs) above which a run counts as disturbed.
pub const DISTURBED_CPUS: f64 = 0.2;

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
    pub fn new(round: u32, variant: Variant, workload: Workload, report: &LoadReport) -> Sample {
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

/// One measured turn of a session whose turns are compared one by one (the not-captured
/// tax): a row of `turn-samples.csv`. Turn `turn` of every variant of a session ran in the
/// same cycle, one right after the other.
#[derive(Clone, Debug, Serialize)]
pub struct TurnSample {
    pub round: u32,
    pub workload: Workload,
    pub variant: Variant,
    pub turn: usize,
    pub seconds: f64,
    /// Connections or system calls completed in the turn.
    pub operations: u64,
}

/// What the kernel's own accounting counted for one program while one variant ran one
/// workload alone.
#[derive(Clone, Debug, Serialize)]
pub struct ProgramCost {
    pub variant: Variant,
    pub workload: Workload,
    pub program: String,
    /// Where the program is attached (bpftool's attach types), when its links are pinned.
    pub hooks: Vec<String>,
    pub run_cnt: u64,
    pub run_time_ns: u64,
    /// Connections, round trips or system calls the load completed in the pass.
    pub operations: u64,
}

/// Where the CPU went during one CRR run, from `perf report`.
#[derive(Clone, Debug, Serialize)]
pub struct PerfProfile {
    pub variant: Variant,
    pub samples: u64,
    /// Percent of the samples that were not idle.
    pub busy_pct: f64,
    /// Percent of the busy samples in netfilter, nftables, conntrack and NAT code.
    pub netfilter_pct_of_busy: f64,
    /// Percent of the busy samples in BPF programs, their helpers and the cgroup-BPF glue.
    pub bpf_pct_of_busy: f64,
    /// (percent of all samples, symbol), largest first, idle excluded.
    pub top: Vec<(f64, String)>,
    /// CPUs' worth of work outside the lab during the run: it shows up in the samples too.
    pub other_cpus: Option<f64>,
}

/// How a pod is made ready for interception.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum SetupMethod {
    /// istio's rules with `iptables-restore`, a process per pod.
    #[serde(rename = "IPT")]
    Iptables,
    /// `redirector-cni` ADD through a running agent, a process per pod.
    #[serde(rename = "EBPF")]
    RedirectorCni,
}

impl SetupMethod {
    pub const ALL: [SetupMethod; 2] = [SetupMethod::Iptables, SetupMethod::RedirectorCni];

    pub fn name(self) -> &'static str {
        match self {
            SetupMethod::Iptables => "IPT",
            SetupMethod::RedirectorCni => "EBPF",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            SetupMethod::Iptables => {
                "`iptables-restore --noflush` of the istio rules, a process per pod, started in the pod's netns"
            }
            SetupMethod::RedirectorCni => {
                "`redirector-cni` ADD as a runtime calls it (CNI environment, config and prevResult on stdin), through a running `redirector agent`, the pod selected by the annotations Istio's injector writes (passed in runtimeConfig), which ask for istio's `-b '*'`"
            }
        }
    }
}

/// Pods one after another, or several at once as a node starting many pods does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SetupMode {
    Sequential,
    Parallel,
}

impl SetupMode {
    pub const ALL: [SetupMode; 2] = [SetupMode::Sequential, SetupMode::Parallel];

    pub fn name(self) -> &'static str {
        match self {
            SetupMode::Sequential => "sequential",
            SetupMode::Parallel => "parallel",
        }
    }
}

/// One pod's set-up, process start to exit: a row of `setup-samples.csv`.
#[derive(Clone, Debug, Serialize)]
pub struct SetupSample {
    pub round: u32,
    pub method: SetupMethod,
    pub mode: SetupMode,
    /// Pods in the batch this one belonged to.
    pub pods: usize,
    pub pod: usize,
    pub millis: f64,
}

/// One batch of `pods` set-ups, first start to last exit.
#[derive(Clone, Debug, Serialize)]
pub struct SetupBatch {
    pub round: u32,
    pub method: SetupMethod,
    pub mode: SetupMode,
    pub pods: usize,
    pub millis: f64,
    /// Kernel memory added by the batch (all pods together), from /proc/meminfo.
    pub slab_kib: i64,
    pub percpu_kib: i64,
    pub vmalloc_kib: i64,
    /// Growth of redirector's map memory (bpftool bytes_memlock).
    pub map_bytes: i64,
}

/// Everything the measurement stage produced.
pub struct Measurements {
    pub samples: Vec<Sample>,
    pub turn_samples: Vec<TurnSample>,
    pub program_costs: Vec<ProgramCost>,
    pub perf: Vec<PerfProfile>,
    pub setup_samples: Vec<SetupSample>,
    pub setup_batches: Vec<SetupBatch>,
    /// Memory of redirector's maps once the agent has loaded them, before any pod.
    pub map_memory_bytes: u64,
    /// Connections each intercepting pod redirected over the whole run.
    pub intercepted_connections: BTreeMap<String, u64>,
}
