//! Every table of the results, as `table.md` and the terminal show them.

use std::fmt::Write as _;

use crate::analysis::goals::{Verdict, SETUP_GOAL_P99_MS, SETUP_GOAL_PODS};
use crate::analysis::spread::Spread;
use crate::analysis::traffic::Metric;
use crate::analysis::Results;
use crate::records::{SetupMethod, SetupMode, DISTURBED_CPUS};
use crate::render::table::{Style, Table};
use crate::variant::{Variant, Workload};

const NONE: &str = "–";

/// `median ±x%`, x being half the range relative to the median.
fn spread_cell(spread: Option<Spread>, decimals: usize) -> String {
    let Some(spread) = spread else {
        return NONE.to_owned();
    };
    let half_range = (spread.max - spread.min) / 2.0;
    if spread.median.abs() < f64::EPSILON || half_range == 0.0 {
        return format!("{:.decimals$}", spread.median);
    }
    let percent = 100.0 * half_range / spread.median.abs();
    format!("{:.decimals$} ±{percent:.0}%", spread.median)
}

/// `median (min…max)`, for differences whose relative spread says little.
fn difference_cell(spread: Option<Spread>, decimals: usize) -> String {
    spread.map_or(NONE.to_owned(), |spread| {
        format!(
            "{:+.decimals$} ({:+.decimals$}…{:+.decimals$})",
            spread.median, spread.min, spread.max
        )
    })
}

fn number_cell(value: Option<f64>, decimals: usize) -> String {
    value.map_or(NONE.to_owned(), |value| format!("{value:.decimals$}"))
}

/// Every table, as plain text or markdown.
pub fn tables(results: &Results, style: Style) -> String {
    let mut out = String::new();
    let system = &results.system;
    let config = &results.config;
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
        traffic_table(results),
        overhead_table(results),
        program_table(results),
        tax_table(results),
        perf_table(results),
        setup_table(results),
        memory_table(results),
        goal_table(results),
    ] {
        out.push_str(&style.table(&table));
    }
    out
}

fn traffic_table(results: &Results) -> Table {
    let columns: [(Workload, Metric, usize, &'static str); 9] = [
        (Workload::Crr, Metric::RatePerS, 0, "CRR conn/s"),
        (Workload::Crr, Metric::P50Us, 1, "CRR p50 µs"),
        (Workload::Crr, Metric::P99Us, 1, "CRR p99 µs"),
        (Workload::Rr1, Metric::P50Us, 1, "RR 1 B p50 µs"),
        (Workload::Rr1, Metric::P99Us, 1, "RR 1 B p99 µs"),
        (Workload::Rr1, Metric::P999Us, 1, "RR 1 B p99.9 µs"),
        (Workload::Rr1k, Metric::P50Us, 1, "RR 1 KiB p50 µs"),
        (Workload::Rr1k, Metric::P99Us, 1, "RR 1 KiB p99 µs"),
        (Workload::Bulk, Metric::GbitS, 2, "bulk Gbit/s"),
    ];
    let rows = results
        .config
        .variants
        .iter()
        .filter(|&&variant| !variant.workloads().is_empty())
        .map(|&variant| {
            let mut row = vec![variant.name().to_owned()];
            row.extend(columns.iter().map(|&(workload, metric, decimals, _)| {
                spread_cell(results.spread(variant, workload, metric), decimals)
            }));
            row
        })
        .collect();
    let mut headers = vec!["variant"];
    headers.extend(columns.iter().map(|&(_, _, _, name)| name));
    Table {
        title: "Traffic (median over rounds ±half the range)".into(),
        headers,
        rows,
        notes: vec![
            format!(
                "Connections each intercepting pod redirected: {}.",
                results
                    .intercepted_connections
                    .iter()
                    .map(|(pod, count)| format!("{pod} {count}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            format!(
                "Runs during which other work used more than {DISTURBED_CPUS} CPUs are left out where a quiet run of the same variant and workload exists: {} of {} runs left out.",
                results.traffic.iter().map(|row| row.disturbed_runs_left_out).sum::<usize>(),
                results.samples.len()
            ),
            "The IPv6 variants run the connection rate only.".to_owned(),
        ],
    }
}

fn overhead_table(results: &Results) -> Table {
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
    for (ipt, ebpf) in Variant::COMPARED {
        if !results.config.variants.contains(&ipt) {
            continue;
        }
        for variant in [ipt, ebpf] {
            let mut row = vec![format!(
                "{} − {}",
                variant.name(),
                variant.baseline().map_or("", Variant::name)
            )];
            row.extend(columns.iter().map(|&(workload, metric, _)| {
                difference_cell(results.overhead(variant, workload, metric), 1)
            }));
            rows.push(row);
        }
        let mut ratio = vec![format!("{} / {}", ebpf.name(), ipt.name())];
        ratio.extend(columns.iter().map(|&(workload, metric, _)| {
            match (
                results.overhead(ebpf, workload, metric),
                results.overhead(ipt, workload, metric),
            ) {
                (Some(e), Some(i)) if i.median.abs() > f64::EPSILON => {
                    format!("{:.2}", e.median / i.median)
                }
                _ => NONE.to_owned(),
            }
        }));
        rows.push(ratio);
    }
    let mut headers = vec!["interception overhead"];
    headers.extend(columns.iter().map(|&(_, _, name)| name));
    Table {
        title: "Interception overhead: variant − baseline, paired by round, median (min…max)".into(),
        headers,
        rows,
        notes: vec![
            "µs/conn is 1e6 / connection rate: the time one whole connection takes. A ratio compares medians; it means little where the IPT overhead is within the noise.".to_owned(),
        ],
    }
}

fn program_table(results: &Results) -> Table {
    let mut rows = Vec::new();
    for pass in &results.programs {
        let label = format!("{} {}", pass.variant.name(), pass.workload.name());
        rows.extend(pass.programs.iter().map(|program| {
            vec![
                label.clone(),
                program.program.clone(),
                program.hooks.join(", "),
                program.run_cnt.to_string(),
                format!("{:.2}", program.runs_per_operation),
                format!("{:.0}", program.ns_per_run),
                format!("{:.0}", program.ns_per_operation),
            ]
        }));
        rows.push(vec![
            label,
            format!(
                "all programs, per {} ({} of them)",
                pass.workload.operation(),
                pass.operations
            ),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            format!("{:.0}", pass.ns_per_operation),
        ]);
    }
    Table {
        title: "redirector's programs, kernel accounting (BPF_ENABLE_STATS, one pass per variant and workload, alone)".into(),
        headers: vec![
            "pass",
            "program",
            "hooks",
            "runs",
            "runs/op",
            "ns/run",
            "ns/op",
        ],
        rows,
        notes: vec![
            "An operation (op) is a proxied connection (crr), a round trip (rr) or a getsockopt call. Runs count every socket of the pod's cgroup: the client's and the proxy's. The programs are those pinned under the lab's bpffs root and those its pinned links run; programs that did not run are left out. The accounting's own clock reads (tens of ns a run) are in the times.".to_owned(),
        ],
    }
}

fn tax_table(results: &Results) -> Table {
    let rows = results
        .not_captured_tax
        .iter()
        .map(|row| {
            let what = match row.workload {
                Workload::SockoptSoError => "getsockopt(SO_ERROR), ns per call",
                _ => "connection to a port the policy excludes (CRR), ns per connection",
            };
            vec![
                what.to_owned(),
                format!("{:.0}", row.not_enrolled_ns),
                format!("{:.0}", row.enrolled_ns),
                format!(
                    "{} ±{:.0}",
                    difference_cell(Some(row.extra_ns), 0),
                    row.extra_ns_margin
                ),
                row.pairs.to_string(),
                number_cell(row.program_ns, 0),
            ]
        })
        .collect();
    Table {
        title: "Not-captured tax: an enrolled pod's cost on what redirector leaves alone".into(),
        headers: vec![
            "operation",
            "not enrolled",
            "enrolled",
            "extra: median of paired turns (min…max) ±95% margin",
            "pairs",
            "program time, kernel accounting",
        ],
        rows,
        notes: vec![
            format!(
                "{} (enrolled with `-o` its server port) against B0 (a pod that is not enrolled), taking turns; each turn's time per operation is compared with the other pod's turn of the same cycle.",
                Variant::EbpfNotCaptured.name()
            ),
        ],
    }
}

fn perf_table(results: &Results) -> Table {
    let rows = results
        .perf
        .iter()
        .map(|profile| {
            vec![
                profile.variant.name().to_owned(),
                format!("{:.0}", profile.busy_pct),
                format!("{:.1}", profile.netfilter_pct_of_busy),
                format!("{:.1}", profile.bpf_pct_of_busy),
                number_cell(profile.other_cpus, 2),
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
        title: "Where the CPU goes during CRR (perf record -a -e cpu-clock, one extra run each)".into(),
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

fn setup_table(results: &Results) -> Table {
    let mut sizes: Vec<usize> = results.setup.iter().map(|row| row.pods).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let mut rows = Vec::new();
    for pods in sizes {
        for mode in SetupMode::ALL {
            let row = |method| results.setup_row(method, mode, pods);
            let mut cells = vec![pods.to_string(), mode.name().to_owned()];
            for method in SetupMethod::ALL {
                cells.extend(match row(method) {
                    Some(row) => [
                        format!("{:.2}", row.p50_ms),
                        format!("{:.2}", row.p99_ms),
                        spread_cell(Some(row.total_ms), 1),
                    ],
                    None => [NONE.to_owned(), NONE.to_owned(), NONE.to_owned()],
                });
            }
            cells.push(
                match (row(SetupMethod::Iptables), row(SetupMethod::RedirectorCni)) {
                    (Some(ipt), Some(ebpf)) => {
                        format!("{:.1}×", ipt.total_ms.median / ebpf.total_ms.median)
                    }
                    _ => NONE.to_owned(),
                },
            );
            rows.push(cells);
        }
    }
    let mut notes: Vec<String> = SetupMethod::ALL
        .iter()
        .map(|method| format!("{}: {}.", method.name(), method.describe()))
        .collect();
    notes.push(format!(
        "Per pod: process start to exit, p50 and p99 over every pod of every round; parallel: {} pods at once. All N: first start to last exit, median over the rounds. Goal: EBPF p99 ≤ {SETUP_GOAL_P99_MS} ms at N = {SETUP_GOAL_PODS}.",
        results.config.setup_parallel
    ));
    Table {
        title: "Setup: making N pods ready, as on a Kubernetes node (ms)".into(),
        headers: vec![
            "N pods",
            "mode",
            "IPT p50/pod",
            "IPT p99/pod",
            "IPT all N",
            "EBPF p50/pod",
            "EBPF p99/pod",
            "EBPF all N",
            "IPT / EBPF, all N",
        ],
        rows,
        notes,
    }
}

fn memory_table(results: &Results) -> Table {
    let largest = results.setup.iter().map(|row| row.pods).max().unwrap_or(0);
    let rows = SetupMethod::ALL
        .iter()
        .filter_map(|&method| results.setup_row(method, SetupMode::Sequential, largest))
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
        title: "Kernel memory per pod (growth while N pods were set up, divided by N)".into(),
        headers: vec![
            "method",
            "slab KiB/pod",
            "slab+percpu+vmalloc KiB/pod",
            "map bytes/pod",
        ],
        rows,
        notes: vec![format!(
            "Measured at N = {largest}, one after another, from /proc/meminfo (node-wide, so other activity adds noise). redirector's maps are allocated once per node: {:.0} KiB.",
            results.map_memory_bytes as f64 / 1024.0
        )],
    }
}

fn goal_table(results: &Results) -> Table {
    let rows = results
        .goals
        .iter()
        .map(|goal| {
            vec![
                goal.goal.clone(),
                goal.target.clone(),
                goal.measured.clone(),
                match goal.verdict {
                    Verdict::Met => "met",
                    Verdict::NotMet => "NOT met",
                    Verdict::WithinNoise => "within the noise",
                    Verdict::NotMeasured => "not measured",
                }
                .to_owned(),
            ]
        })
        .collect();
    Table {
        title: "Goals (issue 11)".into(),
        headers: vec!["goal", "target", "measured (medians)", "result"],
        rows,
        notes: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_show_the_median_with_its_spread() {
        let spread = Spread::of([100.0, 90.0, 110.0]);
        assert_eq!(spread_cell(spread, 0), "100 ±10%");
        assert_eq!(difference_cell(spread, 1), "+100.0 (+90.0…+110.0)");
        assert_eq!(spread_cell(None, 1), NONE);
    }
}
