//! The machine under the lab: what it is, how busy it is with other work, and the kernel's
//! memory counters.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::records::SystemInfo;
use crate::rig::cpus::CpuPlan;

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
        busy_cpus_before_start: busy_cpus(Duration::from_secs(1)),
    }
}

/// CPUs' worth of non-idle time over `window`, from /proc/stat.
fn busy_cpus(window: Duration) -> Option<f64> {
    let before = busy_time()?;
    let started = Instant::now();
    std::thread::sleep(window);
    let busy = busy_time()?.checked_sub(before)?;
    Some(busy.as_secs_f64() / started.elapsed().as_secs_f64())
}

/// CPU time all CPUs have spent not idle since boot (stolen time included), from the `cpu`
/// line of /proc/stat: user nice system idle iowait irq softirq steal, in clock ticks.
fn busy_time() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<u64> = text
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|value| value.parse().ok())
        .collect();
    let busy: u64 = ticks.iter().sum::<u64>() - ticks.get(3)? - ticks.get(4)?;
    // SAFETY: sysconf only reads a constant.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_micros(busy * 1_000_000 / ticks_per_second))
}

/// CPU time the processes of a cgroup (and below) have used, from its `cpu.stat`.
fn cgroup_cpu_time(cgroup: &Path) -> Option<Duration> {
    let text = std::fs::read_to_string(cgroup.join("cpu.stat")).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("usage_usec "))
        .and_then(|value| value.trim().parse().ok())
        .map(Duration::from_micros)
}

/// Measures how much CPU work outside the lab's cgroup ran during a measurement: other
/// processes, kernel workers, stolen time. Such work makes a run slower than the variant is.
pub struct OtherWork {
    lab_cgroup: std::path::PathBuf,
    started: Instant,
    busy: Duration,
    lab: Duration,
}

impl OtherWork {
    pub fn start(lab_cgroup: &Path) -> Option<OtherWork> {
        Some(OtherWork {
            lab_cgroup: lab_cgroup.to_path_buf(),
            busy: busy_time()?,
            lab: cgroup_cpu_time(lab_cgroup)?,
            started: Instant::now(),
        })
    }

    /// CPUs' worth of time used outside the lab since the start.
    pub fn cpus(&self) -> Option<f64> {
        let busy = busy_time()?.checked_sub(self.busy)?;
        let lab = cgroup_cpu_time(&self.lab_cgroup)?.checked_sub(self.lab)?;
        Some(busy.saturating_sub(lab).as_secs_f64() / self.started.elapsed().as_secs_f64())
    }
}

fn first_line_of(program: &str, args: &[&str]) -> Option<String> {
    let output = Command::new(program).args(args).output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines().next().map(|line| line.trim().to_owned())
}

/// Kernel memory counters from /proc/meminfo, in KiB.
#[derive(Clone, Copy, Debug, Default)]
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

/// Network namespaces the kernel still holds (dying ones included), from the `net_namespace`
/// slab cache; `None` when that cache is not listed. Objects cached per CPU count as held, so
/// the figure may stay a little above the number of live namespaces.
pub fn network_namespaces() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/slabinfo").ok()?;
    let line = text
        .lines()
        .find(|line| line.starts_with("net_namespace "))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU use (in CPUs) below which the machine counts as quiet.
const QUIET_CPUS: f64 = 0.1;
const QUIET_WINDOW: Duration = Duration::from_millis(250);

/// Waits until the CPUs are nearly idle (other work, or the kernel still tearing down deleted
/// network namespaces, would otherwise land in the next measurement), at most `timeout`.
/// Returns the CPUs busy in the last window.
pub fn wait_until_quiet(timeout: Duration) -> f64 {
    let deadline = Instant::now() + timeout;
    loop {
        let busy = busy_cpus(QUIET_WINDOW).unwrap_or(0.0);
        if busy <= QUIET_CPUS || Instant::now() >= deadline {
            return busy;
        }
    }
}

/// After `ip netns del`, the kernel tears namespaces down in a worker. Waits (at most
/// `timeout`) until their count is back to `baseline` or stops falling, and the CPUs are quiet.
pub fn wait_for_netns_teardown(baseline: Option<u64>, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut last = network_namespaces();
    loop {
        let busy = wait_until_quiet(deadline.saturating_duration_since(Instant::now()));
        let now = network_namespaces();
        let settled = match (baseline, now) {
            (Some(baseline), Some(now)) => now <= baseline || Some(now) == last,
            _ => true,
        };
        if settled && busy <= QUIET_CPUS {
            return;
        }
        if Instant::now() >= deadline {
            eprintln!("lab: the kernel is still tearing down network namespaces after {timeout:?}; going on");
            return;
        }
        last = now;
        std::thread::sleep(Duration::from_millis(500));
    }
}
