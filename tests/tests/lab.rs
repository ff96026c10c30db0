//! Smoke test of the lab (`cargo xtask lab`): `redirector-lab run --quick` runs end to end,
//! every variant carries traffic to the server, both interception methods really intercept, and
//! `summary.json` has its documented shape. Nothing here looks at timings.
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
const VARIANTS: [&str; 7] = [
    "B0",
    "B1",
    "IPT",
    "EBPF",
    "B1/haproxy",
    "IPT/haproxy",
    "EBPF/haproxy",
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
    for variant in VARIANTS {
        for workload in WORKLOADS {
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
    for pod in ["ipt", "ebpf", "ipt-haproxy", "ebpf-haproxy"] {
        ensure!(
            positive(&intercepted[pod]),
            "pod {pod} intercepted nothing: {intercepted}"
        );
    }

    let summary = read_json(&out, "summary.json")?;
    let object = summary
        .as_object()
        .context("summary.json is not an object")?;
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["cpu", "kernel", "setup", "variants"], "{summary}");
    for field in ["kernel", "cpu"] {
        ensure!(
            summary[field].as_str().is_some_and(|text| !text.is_empty()),
            "summary.{field} is not a non-empty string: {summary}"
        );
    }
    let variants = summary["variants"]
        .as_object()
        .context("summary.variants is not an object")?;
    assert_eq!(variants.len(), 4, "{summary}");
    for variant in ["B0", "B1", "IPT", "EBPF"] {
        let fields = variants[variant]
            .as_object()
            .with_context(|| format!("summary.variants.{variant} is missing"))?;
        assert_eq!(fields.len(), SUMMARY_FIELDS.len(), "{variant}: {fields:?}");
        for field in SUMMARY_FIELDS {
            ensure!(
                positive(&fields[field]),
                "summary.variants.{variant}.{field} is not a positive number: {summary}"
            );
        }
    }
    for method in ["EBPF", "IPT"] {
        let setup = summary["setup"][method]
            .as_object()
            .with_context(|| format!("summary.setup.{method} is missing"))?;
        let mut sizes: Vec<&str> = setup.keys().map(String::as_str).collect();
        sizes.sort_unstable_by_key(|size| size.parse::<u32>().unwrap_or(u32::MAX));
        assert_eq!(sizes, ["1", "10", "100", "1000"], "{summary}");
        // Quick mode times 1 and 10 pods; the others are null.
        ensure!(
            positive(&setup["1"]) && positive(&setup["10"]),
            "summary.setup.{method}: {summary}"
        );
        ensure!(
            setup["100"].is_null() && setup["1000"].is_null(),
            "summary.setup.{method}: {summary}"
        );
    }

    for file in ["samples.csv", "setup-samples.csv", "table.md", "chart.svg"] {
        let path = out.path().join(file);
        let size = std::fs::metadata(&path)
            .with_context(|| format!("{} was not written", path.display()))?
            .len();
        ensure!(size > 0, "{} is empty", path.display());
    }
    Ok(())
}
