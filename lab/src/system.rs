//! What the lab records about the machine, and the kernel's memory counters it compares.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::rig::CpuPlan;

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
}

pub fn system_info(cpus: &CpuPlan) -> SystemInfo {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    SystemInfo {
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|release| release.trim().to_owned())
            .unwrap_or_else(|_| "unknown".to_owned()),
        cpu,
        cpus: std::thread::available_parallelism().map_or(1, usize::from),
        pinning: cpus.describe(),
        iptables: first_line_of("iptables", &["-V"]).unwrap_or_else(|| "not found".to_owned()),
        haproxy: first_line_of("haproxy", &["-v"]),
    }
}

fn first_line_of(program: &str, args: &[&str]) -> Option<String> {
    let output = Command::new(program).args(args).output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines().next().map(|line| line.trim().to_owned())
}

/// Kernel memory counters from /proc/meminfo, in KiB.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct KernelMemory {
    pub slab_kib: i64,
    pub percpu_kib: i64,
    pub vmalloc_kib: i64,
}

impl KernelMemory {
    pub fn read() -> Result<KernelMemory> {
        let text = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
        let field = |name: &str| -> Result<i64> {
            text.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|value| value.split_whitespace().next()?.parse().ok())
                .with_context(|| format!("no {name} in /proc/meminfo"))
        };
        Ok(KernelMemory {
            slab_kib: field("Slab")?,
            percpu_kib: field("Percpu")?,
            vmalloc_kib: field("VmallocUsed")?,
        })
    }

    pub fn minus(self, earlier: KernelMemory) -> KernelMemory {
        KernelMemory {
            slab_kib: self.slab_kib - earlier.slab_kib,
            percpu_kib: self.percpu_kib - earlier.percpu_kib,
            vmalloc_kib: self.vmalloc_kib - earlier.vmalloc_kib,
        }
    }
}

#[derive(Deserialize)]
struct BpftoolMap {
    bytes_memlock: u64,
}

/// Memory the kernel accounts to the maps pinned under `<root>/maps` (bpftool's
/// `bytes_memlock`); 0 when nothing is installed there.
pub fn map_memory_bytes(pin_root: &Path) -> Result<u64> {
    let dir = pin_root.join("maps");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(0);
    };
    let mut total = 0;
    for entry in entries {
        let path = entry?.path();
        let output = Command::new("bpftool")
            .args(["-j", "map", "show", "pinned"])
            .arg(&path)
            .output()
            .context("running bpftool (is it installed?)")?;
        anyhow::ensure!(
            output.status.success(),
            "bpftool map show pinned {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
        let map: BpftoolMap = serde_json::from_slice(&output.stdout)
            .with_context(|| format!("parsing bpftool's answer for {}", path.display()))?;
        total += map.bytes_memlock;
    }
    Ok(total)
}

/// Network namespaces the kernel still holds (dying ones included), from the `net_namespace`
/// slab cache; `None` when that cache is not listed.
pub fn network_namespaces() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/slabinfo").ok()?;
    let line = text
        .lines()
        .find(|line| line.starts_with("net_namespace "))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Deleted network namespaces are torn down by a kernel worker after `ip netns del` returns.
/// Waits (at most `timeout`) until the count is back to `baseline`, so that the teardown does
/// not run during the next measurement.
pub fn wait_for_netns_teardown(baseline: Option<u64>, timeout: Duration) {
    let Some(baseline) = baseline else {
        std::thread::sleep(Duration::from_secs(2));
        return;
    };
    let deadline = Instant::now() + timeout;
    while network_namespaces().is_some_and(|count| count > baseline) {
        if Instant::now() >= deadline {
            eprintln!("lab: the kernel is still tearing down network namespaces after {timeout:?}; going on");
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
