//! Smoke test of the lab (`cargo xtask lab`): `redirector-lab run --quick` runs end to end,
//! every variant carries traffic to the server (IPv6 included), both interception methods
//! really intercept, and `summary.json` has its documented shape: the kernel's accounting of
//! redirector's programs, the not-captured tax, setup through the CNI plugin and the agent
//! against iptables, one after another and in parallel. Nothing here looks at timings.
//!
//! Needs root and the built binaries (`cargo build -p redirector -p redirector-tests -p
//! redirector-lab --bins`, which `cargo xtask test` does).

use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use redirector_tests::{binary, run, TempDir};
use serde_json::Value;

/// Quick mode takes well under a minute; this bounds a hung run.
const LAB_TIMEOUT: Duration = Duration::from_secs(300);
/// Every variant with the workloads it runs.
const VARIANTS: [(&str, &[&str]); 10] = [
    ("B0", &WORKLOADS),
    ("B1", &WORKLOADS),
    ("IPT", &WORKLOADS),
    ("EBPF", &WORKLOADS),
    ("B1/haproxy", &WORKLOADS),
    ("IPT/haproxy", &WORKLOADS),
    ("EBPF/haproxy", &WORKLOADS),
    ("B1/v6", &["crr"]),
    ("IPT/v6", &["crr"]),
    ("EBPF/v6", &["crr"]),
];
const WORKLOADS: [&str; 4] = ["crr", "rr-1B", "rr-1KiB", "bulk"];
const SUMMARY_FIELDS: [&str; 6] = [
    "crr_per_s",
    "crr_p50_us",
    "crr_p99_us",
    "rr_p50_us",
    "rr_p99_us",
    "bulk_gbit_s",
];

fn read_json(dir: &TempDir, name: &str) -> Result<Value> {
    let path = dir.path().join(name);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn positive(value: &Value) -> bool {
    value.as_f64().is_some_and(|number| number > 0.0)
}

fn sorted_keys(object: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = object
        .as_object()
        .map(|object| object.keys().map(String::as_str).collect())
        .unwrap_or_default();
    keys.sort_unstable_by_key(|key| (key.parse::<u32>().unwrap_or(u32::MAX), key.to_string()));
    keys
}

/// `{"ns_per_connection": n, "<program>": {"runs_per_connection", "ns_per_run"}, ...}` with a
/// connect and a sockops program among them, all positive.
fn check_programs(summary: &Value, key: &str) -> Result<()> {
    let programs = summary[key]
        .as_object()
        .with_context(|| format!("summary.{key} is not an object: {summary}"))?;
    ensure!(
        positive(&programs["ns_per_connection"]),
        "summary.{key}.ns_per_connection: {summary}"
    );
    for (name, figures) in programs
        .iter()
        .filter(|(name, _)| *name != "ns_per_connection")
    {
        assert_eq!(
            sorted_keys(figures),
            ["ns_per_run", "runs_per_connection"],
            "summary.{key}.{name}"
        );
        ensure!(
            positive(&figures["ns_per_run"]) && positive(&figures["runs_per_connection"]),
            "summary.{key}.{name}: {figures}"
        );
    }
    for wanted in ["connect", "sockops"] {
        ensure!(
            programs.keys().any(|name| name.contains(wanted)),
            "summary.{key} has no {wanted} program: {summary}"
        );
    }
    Ok(())
}

#[test]
fn quick_lab_runs_end_to_end_and_every_variant_carries_traffic() -> Result<()> {
    let out = TempDir::create("lab")?;
    let mut lab = Command::new(binary("redirector-lab")?);
    lab.args(["run", "--quick", "--out"]).arg(out.path());
    let output = run("redirector-lab", lab, LAB_TIMEOUT)?.ensure_success()?;
    ensure!(
        output.stdout.contains("Traffic") && output.stdout.contains("Setup"),
        "no tables on stdout: {}",
        output.stdout
    );

    let results = read_json(&out, "results.json")?;
    let traffic = results["traffic"]
        .as_array()
        .context("results.json has no traffic rows")?;
    for (variant, workloads) in VARIANTS {
        for &workload in workloads {
            let row = traffic
                .iter()
                .find(|row| row["variant"] == variant && row["workload"] == workload)
                .with_context(|| format!("no {variant} {workload} row in results.json"))?;
            ensure!(
                positive(&row["server_bytes_in"]),
                "{variant} {workload}: the server saw no bytes: {row}"
            );
        }
    }
    let intercepted = &results["intercepted_connections"];
    for pod in ["ipt", "ipt/v6", "ebpf", "ipt-haproxy", "ebpf-haproxy"] {
        ensure!(
            positive(&intercepted[pod]),
            "pod {pod} intercepted nothing: {intercepted}"
        );
    }

    let summary = read_json(&out, "summary.json")?;
    assert_eq!(
        sorted_keys(&summary),
        [
            "cpu",
            "ipv6",
            "kernel",
            "not_captured_tax",
            "programs",
            "programs_haproxy",
            "setup",
            "variants"
        ],
        "{summary}"
    );
    for field in ["kernel", "cpu"] {
        ensure!(
            summary[field].as_str().is_some_and(|text| !text.is_empty()),
            "summary.{field} is not a non-empty string: {summary}"
        );
    }
    assert_eq!(
        sorted_keys(&summary["variants"]),
        ["B0", "B1", "EBPF", "IPT"]
    );
    for variant in ["B0", "B1", "IPT", "EBPF"] {
        let fields = &summary["variants"][variant];
        assert_eq!(
            sorted_keys(fields).len(),
            SUMMARY_FIELDS.len(),
            "{variant}: {fields}"
        );
        for field in SUMMARY_FIELDS {
            ensure!(
                positive(&fields[field]),
                "summary.variants.{variant}.{field} is not a positive number: {summary}"
            );
        }
    }
    assert_eq!(sorted_keys(&summary["ipv6"]), ["B1", "EBPF", "IPT"]);
    for variant in ["B1", "IPT", "EBPF"] {
        let fields = &summary["ipv6"][variant];
        assert_eq!(
            sorted_keys(fields),
            ["crr_p50_us", "crr_p99_us", "crr_per_s"],
            "ipv6.{variant}"
        );
        ensure!(
            SUMMARY_FIELDS[..3]
                .iter()
                .all(|field| positive(&fields[field])),
            "summary.ipv6.{variant}: {fields}"
        );
    }

    check_programs(&summary, "programs")?;
    check_programs(&summary, "programs_haproxy")?;

    let tax = &summary["not_captured_tax"];
    for (operation, unit) in [
        ("getsockopt_so_error", "call"),
        ("excluded_port_connection", "connection"),
    ] {
        let figures = &tax[operation];
        let extra = format!("extra_ns_per_{unit}");
        let program = format!("program_ns_per_{unit}");
        assert_eq!(
            sorted_keys(figures),
            ["extra_ns_margin_95", extra.as_str(), program.as_str()],
            "{tax}"
        );
        // The extra cost may come out below zero in a noisy run; program time cannot.
        ensure!(
            figures[&extra].is_f64()
                && positive(&figures["extra_ns_margin_95"])
                && figures[&program].as_f64().is_some_and(|ns| ns >= 0.0),
            "summary.not_captured_tax.{operation}: {tax}"
        );
    }

    let setup = &summary["setup"];
    assert_eq!(sorted_keys(setup), ["EBPF", "IPT", "goal"], "{setup}");
    for method in ["EBPF", "IPT"] {
        assert_eq!(
            sorted_keys(&setup[method]),
            ["parallel", "sequential"],
            "{setup}"
        );
        for mode in ["sequential", "parallel"] {
            let sizes = &setup[method][mode];
            assert_eq!(sorted_keys(sizes), ["1", "10", "100", "1000"], "{setup}");
            // Quick mode sets up 1 and 10 pods; the others are null.
            for pods in ["1", "10"] {
                let figures = &sizes[pods];
                assert_eq!(sorted_keys(figures), ["p50_ms", "p99_ms", "total_ms"]);
                ensure!(
                    ["p50_ms", "p99_ms", "total_ms"]
                        .iter()
                        .all(|field| positive(&figures[field])),
                    "summary.setup.{method}.{mode}.{pods}: {setup}"
                );
            }
            ensure!(
                sizes["100"].is_null() && sizes["1000"].is_null(),
                "summary.setup.{method}.{mode}: {setup}"
            );
        }
    }
    ensure!(
        setup["goal"]["pods"] == 1000
            && positive(&setup["goal"]["p99_ms_at_most"])
            && setup["goal"]["sequential_met"].is_null()
            && setup["goal"]["parallel_met"].is_null(),
        "summary.setup.goal: {setup}"
    );

    for file in [
        "samples.csv",
        "turn-samples.csv",
        "setup-samples.csv",
        "table.md",
        "chart.svg",
    ] {
        let path = out.path().join(file);
        let size = std::fs::metadata(&path)
            .with_context(|| format!("{} was not written", path.display()))?
            .len();
        ensure!(size > 0, "{} is empty", path.display());
    }
    Ok(())
}
