//! From samples to results: medians and spread, interception overhead against the baseline,
//! the goals, and every file the lab writes.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::{json, Value};

use crate::measure::{ProgramCost, Sample, Workload, DISTURBED_CPUS};
use crate::perf::PerfProfile;
use crate::rig::Variant;
use crate::setup_cost::{Method, SetupSample};
use crate::system::SystemInfo;

/// The sizes `summary.json` always lists under `setup` (null when not measured).
pub const SUMMARY_SETUP_SIZES: [usize; 4] = [1, 10, 100, 1000];

#[derive(Clone, Debug, Serialize)]
pub struct Config {
    pub quick: bool,
    pub rounds: u32,
    pub seconds_per_run: f64,
    pub warmup_seconds: f64,
    /// Length of a turn when variants take turns (CRR and RR).
    pub turn_ms: u128,
    pub setup_sizes: Vec<usize>,
    pub setup_rounds: u32,
    pub variants: Vec<Variant>,
}

/// The median of several rounds and the range around it.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Spread> {
        let mut values: Vec<f64> = values.into_iter().filter(|v| v.is_finite()).collect();
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median = if n % 2 == 1 {
            values[n / 2]
        } else {
            (values[n / 2 - 1] + values[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: values[0],
            max: values[n - 1],
        })
    }

    /// `median ±x%`, x being half the range relative to the median.
    fn show(self, decimals: usize) -> String {
        let half_range = (self.max - self.min) / 2.0;
        if self.median.abs() < f64::EPSILON || half_range == 0.0 {
            return format!("{:.decimals$}", self.median);
        }
        let percent = 100.0 * half_range / self.median.abs();
        format!("{:.decimals$} ±{percent:.0}%", self.median)
    }

    /// `median (min…max)`, for differences whose relative spread says little.
    fn show_range(self, decimals: usize) -> String {
        format!(
            "{:+.decimals$} ({:+.decimals$}…{:+.decimals$})",
            self.median, self.min, self.max
        )
    }
}

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

/// `variant − baseline` for one metric, paired round by round (the two ran minutes apart at
/// most), as median and range over the rounds.
#[derive(Clone, Debug, Serialize)]
pub struct OverheadRow {
    pub variant: Variant,
    pub baseline: Variant,
    pub workload: Workload,
    pub metric: Metric,
    pub difference: Spread,
}

#[derive(Clone, Debug, Serialize)]
pub struct SetupRow {
    pub method: Method,
    pub pods: usize,
    pub millis: Spread,
    pub us_per_pod: f64,
    /// Kernel memory per pod (slab + percpu + vmalloc), median over the rounds.
    pub kernel_kib_per_pod: f64,
    pub slab_kib_per_pod: f64,
    pub map_bytes_per_pod: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Goal {
    pub goal: &'static str,
    pub target: &'static str,
    pub measured: String,
    /// None when the run did not measure it (e.g. N = 1000 in quick mode).
    pub met: Option<bool>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Results {
    pub system: SystemInfo,
    pub config: Config,
    pub traffic: Vec<TrafficRow>,
    pub overhead: Vec<OverheadRow>,
    pub program_costs: Vec<ProgramCost>,
    /// CPU profiles during the connection-rate pattern (empty when perf did not run).
    pub perf: Vec<PerfProfile>,
    pub setup: Vec<SetupRow>,
    /// Memory of redirector's maps, allocated once per node (not per pod).
    pub map_memory_bytes: u64,
    /// Connections each intercepting pod redirected over the whole run.
    pub intercepted_connections: BTreeMap<String, u64>,
    pub goals: Vec<Goal>,
    #[serde(skip)]
    samples: Vec<Sample>,
    #[serde(skip)]
    setup_samples: Vec<SetupSample>,
}

pub struct Measurements {
    pub samples: Vec<Sample>,
    pub setup_samples: Vec<SetupSample>,
    pub program_costs: Vec<ProgramCost>,
    pub perf: Vec<PerfProfile>,
    pub map_memory_bytes: u64,
    pub intercepted_connections: Vec<(&'static str, u64)>,
}

impl Results {
    pub fn analyse(system: SystemInfo, config: Config, measured: Measurements) -> Results {
        let mut results = Results {
            system,
            traffic: traffic_rows(&config.variants, &measured.samples),
            overhead: overhead_rows(&config.variants, &measured.samples),
            config,
            program_costs: measured.program_costs,
            perf: measured.perf,
            setup: setup_rows(&measured.setup_samples),
            map_memory_bytes: measured.map_memory_bytes,
            intercepted_connections: measured
                .intercepted_connections
                .into_iter()
                .map(|(pod, count)| (pod.to_owned(), count))
                .collect(),
            goals: Vec::new(),
            samples: measured.samples,
            setup_samples: measured.setup_samples,
        };
        results.goals = results.evaluate_goals();
        results
    }

    pub fn traffic(&self, variant: Variant, workload: Workload) -> Option<&TrafficRow> {
        self.traffic
            .iter()
            .find(|row| row.variant == variant && row.workload == workload)
    }

    /// One metric of one variant and workload over the rounds.
    pub fn spread(&self, variant: Variant, workload: Workload, metric: Metric) -> Option<Spread> {
        self.traffic(variant, workload)
            .and_then(|row| row.spread(metric))
    }

    fn overhead(&self, variant: Variant, workload: Workload, metric: Metric) -> Option<Spread> {
        self.overhead
            .iter()
            .find(|row| row.variant == variant && row.workload == workload && row.metric == metric)
            .map(|row| row.difference)
    }

    pub fn setup_row(&self, method: Method, pods: usize) -> Option<&SetupRow> {
        self.setup
            .iter()
            .find(|row| row.method == method && row.pods == pods)
    }

    fn evaluate_goals(&self) -> Vec<Goal> {
        let mut goals = Vec::new();

        let ipt = self.overhead(Variant::Ipt, Workload::Crr, Metric::P50Us);
        let ebpf = self.overhead(Variant::Ebpf, Workload::Crr, Metric::P50Us);
        goals.push(match (ipt, ebpf) {
            (Some(ipt), Some(ebpf)) if ipt.median > 0.0 => {
                let ratio = ebpf.median / ipt.median;
                Goal {
                    goal: "EBPF interception overhead vs IPT's, CRR p50",
                    target: "≤ 0.2×",
                    measured: format!(
                        "{ratio:.2}× ({:+.1} µs vs {:+.1} µs over B1)",
                        ebpf.median, ipt.median
                    ),
                    met: Some(ratio <= 0.2),
                }
            }
            _ => unmeasured("EBPF interception overhead vs IPT's, CRR p50", "≤ 0.2×"),
        });

        let rate = |variant| self.spread(variant, Workload::Crr, Metric::RatePerS);
        goals.push(match (rate(Variant::Ipt), rate(Variant::Ebpf)) {
            (Some(ipt), Some(ebpf)) => {
                let ratio = ebpf.median / ipt.median;
                Goal {
                    goal: "connection rate, EBPF vs IPT",
                    target: "≥ 1.3×",
                    measured: format!("{ratio:.2}× ({:.0}/s vs {:.0}/s)", ebpf.median, ipt.median),
                    met: Some(ratio >= 1.3),
                }
            }
            _ => unmeasured("connection rate, EBPF vs IPT", "≥ 1.3×"),
        });

        let p99 = |variant, workload| {
            self.spread(variant, workload, Metric::P99Us)
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
        goals.push(if persistent.is_empty() {
            unmeasured("persistent-connection p99, EBPF vs IPT", "no worse")
        } else {
            Goal {
                goal: "persistent-connection p99, EBPF vs IPT",
                target: "no worse",
                measured: persistent
                    .iter()
                    .map(|(workload, ebpf, ipt)| {
                        format!("{}: {ebpf:.1} µs vs {ipt:.1} µs", workload.name())
                    })
                    .collect::<Vec<_>>()
                    .join("; "),
                met: Some(persistent.iter().all(|(_, ebpf, ipt)| ebpf <= ipt)),
            }
        });

        for method in [Method::RedirectorCli, Method::RedirectorLibrary] {
            let goal = match method {
                Method::RedirectorLibrary => "per-pod setup at N = 1000, IPT vs EBPF-lib",
                _ => "per-pod setup at N = 1000, IPT vs EBPF",
            };
            let ipt = self.setup_row(Method::Iptables, 1000);
            let ebpf = self.setup_row(method, 1000);
            goals.push(match (ipt, ebpf) {
                (Some(ipt), Some(ebpf)) => {
                    let speedup = ipt.millis.median / ebpf.millis.median;
                    Goal {
                        goal,
                        target: "≥ 20× faster",
                        measured: format!(
                            "{speedup:.1}× ({:.0} ms vs {:.0} ms)",
                            ipt.millis.median, ebpf.millis.median
                        ),
                        met: Some(speedup >= 20.0),
                    }
                }
                _ => unmeasured(goal, "≥ 20× faster"),
            });
        }
        goals
    }

    /// `summary.json`: medians, in the shape other tools read.
    pub fn summary(&self) -> Value {
        let mut variants = serde_json::Map::new();
        for variant in Variant::MAIN {
            let median = |workload, metric| {
                self.spread(variant, workload, metric)
                    .map(|spread| spread.median)
            };
            variants.insert(
                variant.name().to_owned(),
                json!({
                    "crr_per_s": median(Workload::Crr, Metric::RatePerS),
                    "crr_p50_us": median(Workload::Crr, Metric::P50Us),
                    "crr_p99_us": median(Workload::Crr, Metric::P99Us),
                    "rr_p50_us": median(Workload::Rr1, Metric::P50Us),
                    "rr_p99_us": median(Workload::Rr1, Metric::P99Us),
                    "bulk_gbit_s": median(Workload::Bulk, Metric::GbitS),
                }),
            );
        }
        let setup_of = |method| {
            SUMMARY_SETUP_SIZES
                .iter()
                .map(|&pods| {
                    let millis = self.setup_row(method, pods).map(|row| row.millis.median);
                    (pods.to_string(), json!(millis))
                })
                .collect::<serde_json::Map<_, _>>()
        };
        json!({
            "variants": variants,
            "setup": {
                "EBPF": setup_of(Method::RedirectorCli),
                "IPT": setup_of(Method::Iptables),
            },
            "kernel": self.system.kernel,
            "cpu": self.system.cpu,
        })
    }

    /// Every table, as plain text or markdown.
    pub fn tables(&self, style: Style) -> String {
        let mut out = String::new();
        let system = &self.system;
        let config = &self.config;
        let busy = system
            .busy_cpus_before_start
            .map_or("unknown".to_owned(), |busy| format!("{busy:.2}"));
        let _ = writeln!(
            out,
            "Kernel {}, {} ({} CPUs; {}), {}. {} round(s); in each, every variant gets {} s \
             measured after {} s of warm-up per workload, in {} ms turns with the other variants \
             (bulk: one after another). CPUs busy before the start: {busy}.",
            system.kernel,
            system.cpu,
            system.cpus,
            system.pinning,
            system.iptables,
            config.rounds,
            config.seconds_per_run,
            config.warmup_seconds,
            config.turn_ms,
        );
        for table in [
            self.traffic_table(),
            self.overhead_table(),
            self.program_table(),
            self.perf_table(),
            self.setup_table(),
            self.memory_table(),
            self.goal_table(),
        ] {
            out.push_str(&style.table(&table));
        }
        out
    }

    fn traffic_table(&self) -> Table {
        let mut rows = Vec::new();
        for &variant in &self.config.variants {
            let cell = |workload, metric, decimals| {
                self.spread(variant, workload, metric)
                    .map_or("–".to_owned(), |spread| spread.show(decimals))
            };
            rows.push(vec![
                variant.name().to_owned(),
                cell(Workload::Crr, Metric::RatePerS, 0),
                cell(Workload::Crr, Metric::P50Us, 1),
                cell(Workload::Crr, Metric::P99Us, 1),
                cell(Workload::Rr1, Metric::P50Us, 1),
                cell(Workload::Rr1, Metric::P99Us, 1),
                cell(Workload::Rr1, Metric::P999Us, 1),
                cell(Workload::Rr1k, Metric::P50Us, 1),
                cell(Workload::Rr1k, Metric::P99Us, 1),
                cell(Workload::Bulk, Metric::GbitS, 2),
            ]);
        }
        Table {
            title: "Traffic (median over rounds ±half the range)",
            headers: vec![
                "variant",
                "CRR conn/s",
                "CRR p50 µs",
                "CRR p99 µs",
                "RR 1 B p50 µs",
                "RR 1 B p99 µs",
                "RR 1 B p99.9 µs",
                "RR 1 KiB p50 µs",
                "RR 1 KiB p99 µs",
                "bulk Gbit/s",
            ],
            rows,
            notes: vec![
                format!(
                    "Connections each intercepting pod redirected: {}.",
                    self.intercepted_connections
                        .iter()
                        .map(|(pod, count)| format!("{pod} {count}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                format!(
                    "Runs during which other work used more than {DISTURBED_CPUS} CPUs are left out where a quiet run of the same variant and workload exists: {} of {} runs left out.",
                    self.traffic.iter().map(|row| row.disturbed_runs_left_out).sum::<usize>(),
                    self.samples.len()
                ),
            ],
        }
    }

    fn overhead_table(&self) -> Table {
        let columns: [(Workload, Metric, &str); 8] = [
            (Workload::Crr, Metric::P50Us, "CRR p50 µs"),
            (Workload::Crr, Metric::P99Us, "CRR p99 µs"),
            (Workload::Crr, Metric::UsPerTransaction, "CRR µs/conn"),
            (Workload::Rr1, Metric::P50Us, "RR 1 B p50 µs"),
            (Workload::Rr1, Metric::P99Us, "RR 1 B p99 µs"),
            (Workload::Rr1k, Metric::P50Us, "RR 1 KiB p50 µs"),
            (Workload::Rr1k, Metric::P99Us, "RR 1 KiB p99 µs"),
            (Workload::Bulk, Metric::GbitS, "bulk Gbit/s"),
        ];
        let mut rows = Vec::new();
        let pairs = [
            (Variant::Ipt, Variant::Ebpf),
            (Variant::HaproxyIpt, Variant::HaproxyEbpf),
        ];
        for (ipt, ebpf) in pairs {
            if !self.config.variants.contains(&ipt) {
                continue;
            }
            for variant in [ipt, ebpf] {
                let mut row = vec![format!(
                    "{} − {}",
                    variant.name(),
                    variant.baseline().map_or("", Variant::name)
                )];
                row.extend(columns.iter().map(|&(workload, metric, _)| {
                    self.overhead(variant, workload, metric)
                        .map_or("–".to_owned(), |spread| spread.show_range(1))
                }));
                rows.push(row);
            }
            let mut ratio = vec![format!("{} / {}", ebpf.name(), ipt.name())];
            ratio.extend(columns.iter().map(|&(workload, metric, _)| {
                match (
                    self.overhead(ebpf, workload, metric),
                    self.overhead(ipt, workload, metric),
                ) {
                    (Some(e), Some(i)) if i.median.abs() > f64::EPSILON => {
                        format!("{:.2}", e.median / i.median)
                    }
                    _ => "–".to_owned(),
                }
            }));
            rows.push(ratio);
        }
        let mut headers = vec!["interception overhead"];
        headers.extend(columns.iter().map(|&(_, _, name)| name));
        Table {
            title: "Interception overhead: variant − baseline, paired by round, median (min…max)",
            headers,
            rows,
            notes: vec![
                "µs/conn is 1e6 / connection rate: the time one whole connection takes. A ratio compares medians; it means little where the IPT overhead is within the noise.".to_owned(),
            ],
        }
    }

    fn program_table(&self) -> Table {
        let mut rows = Vec::new();
        let mut workloads: Vec<Workload> = self.program_costs.iter().map(|c| c.workload).collect();
        workloads.dedup();
        for workload in workloads {
            let ran: Vec<&ProgramCost> = self
                .program_costs
                .iter()
                .filter(|cost| cost.workload == workload && cost.run_cnt > 0)
                .collect();
            rows.extend(ran.iter().map(|cost| {
                vec![
                    workload.name().to_owned(),
                    cost.program.clone(),
                    cost.run_cnt.to_string(),
                    format!("{:.2}", cost.runs_per_transaction),
                    format!("{:.0}", cost.ns_per_run),
                    format!("{:.0}", cost.ns_per_transaction),
                ]
            }));
            let total = ran
                .iter()
                .fold(0.0, |sum, cost| sum + cost.ns_per_transaction);
            rows.push(vec![
                workload.name().to_owned(),
                "all programs".to_owned(),
                String::new(),
                String::new(),
                String::new(),
                format!("{total:.0}"),
            ]);
        }
        Table {
            title: "redirector's programs, kernel accounting (kernel.bpf_stats_enabled, separate EBPF pass)",
            headers: vec![
                "workload",
                "program",
                "runs",
                "runs/transaction",
                "ns/run",
                "ns/transaction",
            ],
            rows,
            notes: vec![
                "Runs count every socket of the pod's cgroup: the client's and the proxy's. Programs that did not run are left out. The accounting's own clock reads (tens of ns a run) are in the times.".to_owned(),
            ],
        }
    }

    fn perf_table(&self) -> Table {
        let rows = self
            .perf
            .iter()
            .map(|profile| {
                vec![
                    profile.variant.name().to_owned(),
                    format!("{:.0}", profile.busy_pct),
                    format!("{:.1}", profile.netfilter_pct_of_busy),
                    format!("{:.1}", profile.bpf_pct_of_busy),
                    profile
                        .other_cpus
                        .map_or("?".to_owned(), |cpus| format!("{cpus:.2}")),
                    profile
                        .top
                        .iter()
                        .take(4)
                        .map(|(percent, symbol)| format!("{symbol} {percent:.1}%"))
                        .collect::<Vec<_>>()
                        .join(", "),
                ]
            })
            .collect();
        Table {
            title: "Where the CPU goes during CRR (perf record -a -e cpu-clock, one extra run each)",
            headers: vec![
                "variant",
                "busy %",
                "netfilter+conntrack % of busy",
                "BPF % of busy",
                "other work, CPUs",
                "top symbols (% of all samples)",
            ],
            rows,
            notes: vec![
                "Symbols are grouped by name (nf_*, nft_*, *conntrack*, ... and bpf_*, htab_*, *cgroup_bpf*, ...). Not run in quick mode or without perf.".to_owned(),
            ],
        }
    }

    fn setup_table(&self) -> Table {
        let mut sizes: Vec<usize> = self.setup.iter().map(|row| row.pods).collect();
        sizes.sort_unstable();
        sizes.dedup();
        let rows = sizes
            .into_iter()
            .map(|pods| {
                let millis = |method| self.setup_row(method, pods).map(|row| row.millis);
                let cell = |method| millis(method).map_or("–".to_owned(), |m| m.show(1));
                let speedup = |method| match (millis(Method::Iptables), millis(method)) {
                    (Some(ipt), Some(other)) => format!("{:.1}×", ipt.median / other.median),
                    _ => "–".to_owned(),
                };
                vec![
                    pods.to_string(),
                    cell(Method::Iptables),
                    cell(Method::RedirectorCli),
                    cell(Method::RedirectorLibrary),
                    speedup(Method::RedirectorCli),
                    speedup(Method::RedirectorLibrary),
                ]
            })
            .collect();
        Table {
            title: "Setup: milliseconds to make N pods ready, one after another",
            headers: vec![
                "N pods",
                "IPT ms",
                "EBPF ms",
                "EBPF-lib ms",
                "IPT / EBPF",
                "IPT / EBPF-lib",
            ],
            rows,
            notes: Method::ALL
                .iter()
                .map(|method| format!("{}: {}.", method.name(), method.describe()))
                .collect(),
        }
    }

    fn memory_table(&self) -> Table {
        let largest = self.setup.iter().map(|row| row.pods).max().unwrap_or(0);
        let rows = Method::ALL
            .iter()
            .filter_map(|&method| self.setup_row(method, largest))
            .map(|row| {
                vec![
                    row.method.name().to_owned(),
                    format!("{:.1}", row.slab_kib_per_pod),
                    format!("{:.1}", row.kernel_kib_per_pod),
                    format!("{:.0}", row.map_bytes_per_pod),
                ]
            })
            .collect();
        Table {
            title: "Kernel memory per pod (growth while N pods were set up, divided by N)",
            headers: vec![
                "method",
                "slab KiB/pod",
                "slab+percpu+vmalloc KiB/pod",
                "map bytes/pod",
            ],
            rows,
            notes: vec![format!(
                "Measured at N = {largest} from /proc/meminfo (node-wide, so other activity adds noise). redirector's maps are allocated once per node: {:.0} KiB.",
                self.map_memory_bytes as f64 / 1024.0
            )],
        }
    }

    fn goal_table(&self) -> Table {
        let rows = self
            .goals
            .iter()
            .map(|goal| {
                vec![
                    goal.goal.to_owned(),
                    goal.target.to_owned(),
                    goal.measured.clone(),
                    match goal.met {
                        Some(true) => "met",
                        Some(false) => "NOT met",
                        None => "not measured",
                    }
                    .to_owned(),
                ]
            })
            .collect();
        Table {
            title: "Goals",
            headers: vec!["goal", "target", "measured (medians)", "result"],
            rows,
            notes: Vec::new(),
        }
    }

    /// Writes every output file into `dir`.
    pub fn write_files(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let write = |name: &str, contents: &[u8]| {
            let path = dir.join(name);
            std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))
        };
        write(
            "summary.json",
            serde_json::to_string_pretty(&self.summary())?.as_bytes(),
        )?;
        write(
            "results.json",
            serde_json::to_string_pretty(self)?.as_bytes(),
        )?;
        write("samples.csv", &csv_of(&self.samples)?)?;
        write("setup-samples.csv", &csv_of(&self.setup_samples)?)?;
        write("table.md", self.tables(Style::Markdown).as_bytes())?;
        write("chart.svg", crate::chart::render(self)?.as_bytes())?;
        Ok(())
    }
}

fn unmeasured(goal: &'static str, target: &'static str) -> Goal {
    Goal {
        goal,
        target,
        measured: "not measured in this run".to_owned(),
        met: None,
    }
}

fn csv_of<T: Serialize>(rows: &[T]) -> Result<Vec<u8>> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    for row in rows {
        writer.serialize(row)?;
    }
    writer.into_inner().context("finishing a CSV file")
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

fn traffic_rows(variants: &[Variant], samples: &[Sample]) -> Vec<TrafficRow> {
    let mut rows = Vec::new();
    for &variant in variants {
        for workload in Workload::ALL {
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

fn overhead_rows(variants: &[Variant], samples: &[Sample]) -> Vec<OverheadRow> {
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
        for workload in Workload::ALL {
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

fn setup_rows(samples: &[SetupSample]) -> Vec<SetupRow> {
    let mut groups: BTreeMap<(Method, usize), Vec<&SetupSample>> = BTreeMap::new();
    for sample in samples {
        groups
            .entry((sample.method, sample.pods))
            .or_default()
            .push(sample);
    }
    groups
        .into_iter()
        .filter_map(|((method, pods), group)| {
            let per_pod = |value: fn(&SetupSample) -> f64| {
                Spread::of(group.iter().map(|s| value(s) / pods as f64)).map(|s| s.median)
            };
            let millis = Spread::of(group.iter().map(|s| s.millis))?;
            Some(SetupRow {
                method,
                pods,
                us_per_pod: millis.median * 1e3 / pods as f64,
                millis,
                kernel_kib_per_pod: per_pod(|s| {
                    (s.slab_kib + s.percpu_kib + s.vmalloc_kib) as f64
                })?,
                slab_kib_per_pod: per_pod(|s| s.slab_kib as f64)?,
                map_bytes_per_pod: per_pod(|s| s.map_bytes as f64)?,
            })
        })
        .collect()
}

/// A table before rendering.
pub struct Table {
    pub title: &'static str,
    pub headers: Vec<&'static str>,
    pub rows: Vec<Vec<String>>,
    pub notes: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    Text,
    Markdown,
}

impl Style {
    fn table(self, table: &Table) -> String {
        let mut out = String::new();
        match self {
            Style::Markdown => {
                let _ = writeln!(out, "\n**{}**\n", table.title);
                let _ = writeln!(out, "| {} |", table.headers.join(" | "));
                let _ = writeln!(
                    out,
                    "|{}",
                    table.headers.iter().map(|_| "---|").collect::<String>()
                );
                for row in &table.rows {
                    let _ = writeln!(out, "| {} |", row.join(" | "));
                }
                if !table.notes.is_empty() {
                    out.push('\n');
                }
                for note in &table.notes {
                    let _ = writeln!(out, "{note}  ");
                }
            }
            Style::Text => {
                let widths: Vec<usize> = (0..table.headers.len())
                    .map(|column| {
                        std::iter::once(table.headers[column].chars().count())
                            .chain(
                                table
                                    .rows
                                    .iter()
                                    .map(|row| row.get(column).map_or(0, |c| c.chars().count())),
                            )
                            .max()
                            .unwrap_or(0)
                    })
                    .collect();
                let line = |cells: Vec<&str>| {
                    cells
                        .iter()
                        .zip(&widths)
                        .enumerate()
                        .map(|(column, (cell, &width))| {
                            let pad = " ".repeat(width - cell.chars().count());
                            if column == 0 {
                                format!("{cell}{pad}")
                            } else {
                                format!("{pad}{cell}")
                            }
                        })
                        .collect::<Vec<_>>()
                        .join("  ")
                };
                let _ = writeln!(out, "\n{}", table.title);
                let _ = writeln!(out, "{}", line(table.headers.clone()));
                for row in &table.rows {
                    let _ = writeln!(out, "{}", line(row.iter().map(String::as_str).collect()));
                }
                for note in &table.notes {
                    let _ = writeln!(out, "  {note}");
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_takes_the_middle_and_the_range() {
        let spread = Spread::of([3.0, 1.0, 2.0, f64::NAN]).unwrap();
        assert_eq!((spread.median, spread.min, spread.max), (2.0, 1.0, 3.0));
        assert_eq!(Spread::of([4.0, 1.0]).unwrap().median, 2.5);
        assert!(Spread::of([]).is_none());
        assert_eq!(
            Spread::of([100.0, 90.0, 110.0]).unwrap().show(0),
            "100 ±10%"
        );
    }

    #[test]
    fn text_tables_align_columns() {
        let table = Table {
            title: "t",
            headers: vec!["name", "value"],
            rows: vec![
                vec!["a".into(), "1".into()],
                vec!["bbbbbb".into(), "22".into()],
            ],
            notes: vec![],
        };
        assert_eq!(
            Style::Text.table(&table),
            "\nt\nname    value\na           1\nbbbbbb     22\n"
        );
        assert!(Style::Markdown.table(&table).contains("| bbbbbb | 22 |"));
    }
}
