//! `summary.json`: the medians other tools read, in a fixed shape (README, "Output").

use serde_json::{json, Map, Value};

use crate::analysis::goals::{SETUP_GOAL_P99_MS, SETUP_GOAL_PODS};
use crate::analysis::traffic::Metric;
use crate::analysis::Results;
use crate::records::{SetupMethod, SetupMode};
use crate::variant::{Variant, Workload};

/// The sizes `summary.json` always lists under `setup` (null when not measured).
pub const SUMMARY_SETUP_SIZES: [usize; 4] = [1, 10, 100, 1000];

pub fn summary(results: &Results) -> Value {
    let median = |variant, workload, metric| {
        results
            .spread(variant, workload, metric)
            .map(|spread| spread.median)
    };
    let crr = |variant| {
        json!({
            "crr_per_s": median(variant, Workload::Crr, Metric::RatePerS),
            "crr_p50_us": median(variant, Workload::Crr, Metric::P50Us),
            "crr_p99_us": median(variant, Workload::Crr, Metric::P99Us),
        })
    };
    let mut variants = Map::new();
    for variant in Variant::MAIN {
        let mut fields = crr(variant);
        fields["rr_p50_us"] = json!(median(variant, Workload::Rr1, Metric::P50Us));
        fields["rr_p99_us"] = json!(median(variant, Workload::Rr1, Metric::P99Us));
        fields["bulk_gbit_s"] = json!(median(variant, Workload::Bulk, Metric::GbitS));
        variants.insert(variant.name().to_owned(), fields);
    }
    // Keyed like `variants`: "B1", "IPT", "EBPF".
    let ipv6: Map<String, Value> = Variant::IPV6
        .iter()
        .zip(&Variant::MAIN[1..])
        .map(|(&v6, v4)| (v4.name().to_owned(), crr(v6)))
        .collect();
    json!({
        "variants": variants,
        "ipv6": ipv6,
        "programs": programs(results, Variant::Ebpf),
        "programs_haproxy": programs(results, Variant::HaproxyEbpf),
        "not_captured_tax": not_captured_tax(results),
        "setup": setup(results),
        "kernel": results.system.kernel,
        "cpu": results.system.cpu,
    })
}

/// `{"ns_per_connection", "<program>": {"runs_per_connection", "ns_per_run"}, ...}` from the
/// CRR pass of `variant`; null when it did not run.
fn programs(results: &Results, variant: Variant) -> Value {
    let Some(pass) = results.program_pass(variant, Workload::Crr) else {
        return Value::Null;
    };
    let mut programs = Map::new();
    programs.insert("ns_per_connection".to_owned(), json!(pass.ns_per_operation));
    for program in &pass.programs {
        programs.insert(
            program.program.clone(),
            json!({
                "runs_per_connection": program.runs_per_operation,
                "ns_per_run": program.ns_per_run,
            }),
        );
    }
    Value::Object(programs)
}

fn not_captured_tax(results: &Results) -> Value {
    let tax = |workload: Workload, unit: &str| {
        results.tax(workload).map(|row| {
            json!({
                format!("extra_ns_per_{unit}"): row.extra_ns.median,
                "extra_ns_margin_95": row.extra_ns_margin,
                format!("program_ns_per_{unit}"): row.program_ns,
            })
        })
    };
    json!({
        "getsockopt_so_error": tax(Workload::SockoptSoError, "call"),
        "excluded_port_connection": tax(Workload::Crr, "connection"),
    })
}

fn setup(results: &Results) -> Value {
    let of = |method, mode| {
        SUMMARY_SETUP_SIZES
            .iter()
            .map(|&pods| {
                let row = results.setup_row(method, mode, pods).map(|row| {
                    json!({
                        "p50_ms": row.p50_ms,
                        "p99_ms": row.p99_ms,
                        "total_ms": row.total_ms.median,
                    })
                });
                (pods.to_string(), json!(row))
            })
            .collect::<Map<_, _>>()
    };
    let mut setup = Map::new();
    for method in SetupMethod::ALL {
        let modes: Map<String, Value> = SetupMode::ALL
            .iter()
            .map(|&mode| (mode.name().to_owned(), Value::Object(of(method, mode))))
            .collect();
        setup.insert(method.name().to_owned(), Value::Object(modes));
    }
    let met = |mode| {
        results
            .setup_row(SetupMethod::RedirectorCni, mode, SETUP_GOAL_PODS)
            .map(|row| row.p99_ms <= SETUP_GOAL_P99_MS)
    };
    setup.insert(
        "goal".to_owned(),
        json!({
            "pods": SETUP_GOAL_PODS,
            "p99_ms_at_most": SETUP_GOAL_P99_MS,
            "sequential_met": met(SetupMode::Sequential),
            "parallel_met": met(SetupMode::Parallel),
        }),
    );
    Value::Object(setup)
}
