//! Where the CPU time goes during the connection-rate pattern, from `perf` (sampling every
//! CPU on the cpu-clock event, which also works in VMs without hardware counters): the share
//! of busy samples in netfilter/conntrack code and in BPF code, and the top kernel symbols.
//! Symbols are sorted into those groups by name.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use redirector_tests::{run, Child};

use crate::measure::machine::{wait_until_quiet, OtherWork};
use crate::records::PerfProfile;
use crate::rig::Rig;
use crate::variant::{Variant, Workload};

const TOP_SYMBOLS: usize = 12;
/// perf stops this long after the load has finished its run.
const PERF_SLACK: Duration = Duration::from_millis(500);
const REPORT_TIMEOUT: Duration = Duration::from_secs(120);
const QUIET_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether `perf` can be run here.
pub fn available() -> bool {
    Command::new("perf")
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success())
}

/// One CRR run per variant under `perf record -a`; the raw data stays in `dir`.
pub fn profile(
    rig: &Rig,
    variants: &[Variant],
    warmup: Duration,
    duration: Duration,
    dir: &Path,
) -> Result<Vec<PerfProfile>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut profiles = Vec::new();
    for &variant in variants {
        let data = dir.join(format!("perf-{}.data", file_name(variant)));
        let mut record = Command::new("perf");
        record
            .args(["record", "-q", "-e", "cpu-clock", "-a", "-o"])
            .arg(&data)
            .args(["--", "sleep"])
            .arg(format!(
                "{:.3}",
                (warmup + duration + PERF_SLACK).as_secs_f64()
            ));
        wait_until_quiet(QUIET_TIMEOUT);
        let other_work = OtherWork::start(rig.lab_cgroup());
        let recorder = Child::spawn("perf record", record)?;
        rig.run_load(variant, Workload::Crr, warmup, duration)?;
        recorder
            .wait_exit(duration + warmup + REPORT_TIMEOUT)?
            .ensure_success()?;
        let other_cpus = other_work.and_then(|meter| meter.cpus());
        let mut report = Command::new("perf");
        report
            .args(["report", "--stdio", "--no-children", "--sort", "sym", "-i"])
            .arg(&data);
        let output = run("perf report", report, REPORT_TIMEOUT)?.ensure_success()?;
        let mut profile = summarise(variant, &output.stdout)?;
        profile.other_cpus = other_cpus;
        eprintln!(
            "lab: perf {}: {:.0}% busy, of which netfilter {:.1}%, BPF {:.1}%",
            variant.name(),
            profile.busy_pct,
            profile.netfilter_pct_of_busy,
            profile.bpf_pct_of_busy
        );
        profiles.push(profile);
    }
    Ok(profiles)
}

fn file_name(variant: Variant) -> String {
    variant.name().replace('/', "-")
}

/// Reads `perf report --stdio --sort sym` lines: `  12.36%  [k] symbol`.
fn summarise(variant: Variant, report: &str) -> Result<PerfProfile> {
    let samples = report
        .lines()
        .find_map(|line| line.strip_prefix("# Samples: "))
        .and_then(|rest| rest.split_whitespace().next())
        .map(parse_count)
        .unwrap_or(0);
    let symbols: Vec<(f64, String)> = report
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (percent, rest) = line.trim().split_once("%")?;
            let percent: f64 = percent.trim().parse().ok()?;
            let symbol = rest.trim().split_once("] ")?.1.trim().to_owned();
            Some((percent, symbol))
        })
        .collect();
    ensure!(
        !symbols.is_empty(),
        "perf report for {} has no symbols",
        variant.name()
    );
    // Percent of all samples in the symbols `keep` selects (a fold: an empty f64 sum is -0.0).
    let percent_of = |keep: &dyn Fn(&str) -> bool| {
        symbols
            .iter()
            .filter(|(_, symbol)| keep(symbol))
            .fold(0.0, |total, (percent, _)| total + percent)
    };
    let busy = percent_of(&|symbol| !is_idle(symbol));
    let share = |group: fn(&str) -> bool| {
        if busy > 0.0 {
            100.0 * percent_of(&group) / busy
        } else {
            0.0
        }
    };
    Ok(PerfProfile {
        variant,
        samples,
        busy_pct: busy,
        netfilter_pct_of_busy: share(is_netfilter),
        bpf_pct_of_busy: share(is_bpf),
        top: symbols
            .iter()
            .filter(|(_, symbol)| !is_idle(symbol))
            .take(TOP_SYMBOLS)
            .cloned()
            .collect(),
        other_cpus: None,
    })
}

/// `14K` → 14000.
fn parse_count(text: &str) -> u64 {
    let (digits, scale) = match text.strip_suffix('K') {
        Some(digits) => (digits, 1_000.0),
        None => match text.strip_suffix('M') {
            Some(digits) => (digits, 1_000_000.0),
            None => (text, 1.0),
        },
    };
    digits
        .parse::<f64>()
        .map_or(0, |value| (value * scale) as u64)
}

fn is_idle(symbol: &str) -> bool {
    symbol.contains("safe_halt") || symbol.contains("idle") || symbol.contains("mwait")
}

fn is_netfilter(symbol: &str) -> bool {
    const PREFIXES: [&str; 7] = ["nf_", "__nf_", "nft_", "__nft_", "ipt_", "xt_", "iptable_"];
    PREFIXES.iter().any(|prefix| symbol.starts_with(prefix)) || symbol.contains("conntrack")
}

fn is_bpf(symbol: &str) -> bool {
    const PREFIXES: [&str; 8] = [
        "bpf_",
        "__bpf",
        "htab_",
        "__htab",
        "prealloc_lru",
        "pcpu_freelist",
        "lookup_nulls_elem_raw",
        "sock_gen_cookie",
    ];
    PREFIXES.iter().any(|prefix| symbol.starts_with(prefix)) || symbol.contains("cgroup_bpf")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summarises_a_perf_report() {
        let report = "# Samples: 2K of event 'cpu-clock'\n#\n\
            \x20   50.00%  [k] pv_native_safe_halt\n\
            \x20   20.00%  [k] nf_conntrack_in\n\
            \x20   10.00%  [k] bpf_prog_1234_redirector_connect4\n\
            \x20   20.00%  [.] main\n";
        let profile = summarise(Variant::Ipt, report).unwrap();
        assert_eq!(profile.samples, 2000);
        assert_eq!(profile.busy_pct, 50.0);
        assert_eq!(profile.netfilter_pct_of_busy, 40.0);
        assert_eq!(profile.bpf_pct_of_busy, 20.0);
        assert_eq!(profile.top[0], (20.0, "nf_conntrack_in".to_owned()));
    }
}
