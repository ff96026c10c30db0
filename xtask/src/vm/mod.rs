//! Running the workspace's test executables (or any command) in a VM booted with one of
//! Debian's kernels: `cargo xtask test --kernel 5.10`, `cargo xtask vm --kernel 6.1 -- CMD`.
//! Everything is cached under `target/vm/`: package lists (a day), kernel packages and their
//! unpacked trees (for good), so a second run downloads nothing.

mod image;
mod kernel;
mod qemu;

pub(crate) use image::ldd_libraries;

use std::{env, fmt::Write as _, fs, path::PathBuf, time::Duration};

use anyhow::Result;

use crate::{cmd::quote, debian::PrivateApt};

pub use qemu::Report;

/// The guest's memory: the unpacked image (a few hundred MB) lives in it, and the record
/// capacity test holds 270,000 sockets with HAProxy in front of them.
const MEMORY_MIB: u32 = 4096;

/// The longest one entry of a plan (a test executable) may run; TCG is 5-20 times slower than
/// the host, and the slowest suite takes about a minute there.
pub const ENTRY_TIMEOUT: Duration = Duration::from_secs(25 * 60);

/// Host programs the suites and the product call.
const TOOLS: &[&str] = &[
    "ip",
    "bpftool",
    "iptables",
    "iptables-save",
    "iptables-restore",
    "ip6tables",
    "ip6tables-save",
    "ip6tables-restore",
    "iptables-legacy",
    "iptables-legacy-save",
    "iptables-legacy-restore",
    "ip6tables-legacy",
    "ip6tables-legacy-save",
    "ip6tables-legacy-restore",
    "haproxy",
    // The DNS suite: a real nameserver and proxy, a real resolver (glibc's, through getent).
    "dnsmasq",
    "dig",
    "getent",
    // The record suite counts a command's bpf() calls.
    "strace",
    "modprobe",
    "lsmod",
];

/// Host folders the tools load plugins from: the CNI plugins (static Go binaries) and
/// iptables' extensions.
const TOOL_FOLDERS: &[&str] = &["/usr/lib/cni", "/usr/lib/x86_64-linux-gnu/xtables"];

/// Loaded at boot; the kernel asks modprobe for the rest as it needs them (e.g. nf_nat).
const MODULES: &[&str] = &[
    "veth",
    "bridge",
    "nf_conntrack",
    "nf_tables",
    "nft_compat",
    "nft_chain_nat",
    "xt_REDIRECT",
    "xt_owner",
    "xt_mark",
    "xt_conntrack",
    "xt_comment",
    "xt_multiport",
    "xt_tcpudp",
];

/// Host variables a test run passes on to the guest's test executables.
const PASSED_ENV: &[&str] = &[
    "RUST_LOG",
    "RUST_BACKTRACE",
    "RUST_LIB_BACKTRACE",
    "NO_COLOR",
];

/// One step of the guest's plan: a command run with the console as its output.
pub struct Entry {
    /// One word: the suite's name, or `command`.
    pub name: String,
    pub argv: Vec<String>,
}

pub struct Vm<'a> {
    /// The workspace's target dir (the cache lives in its `vm/`).
    pub target: PathBuf,
    /// A series (`5.10`, `6.1`, `6.12`) or an exact ABI (`6.1.0-57`).
    pub kernel: &'a str,
    /// The workspace's executables the guest needs, at their host paths.
    pub binaries: Vec<PathBuf>,
    /// Host folders of data the tests read through paths compiled into them.
    pub data: Vec<PathBuf>,
}

impl Vm<'_> {
    /// Boots the kernel, runs `entries` in order and reports what the guest said.
    pub fn run(&self, entries: &[Entry]) -> Result<Report> {
        let cache = self.target.join("vm");
        let apt = PrivateApt::open(cache.join("apt"))?;
        let kernel = kernel::fetch(&apt, &cache.join("kernels"), self.kernel)?;
        let work = cache.join("run").join(&kernel.release);
        let mut folders: Vec<PathBuf> = TOOL_FOLDERS.iter().map(PathBuf::from).collect();
        folders.extend(self.data.iter().cloned());
        let contents = image::Contents {
            tools: TOOLS,
            folders,
            workspace_binaries: self.binaries.clone(),
            plan: plan(entries)?,
        };
        eprintln!("vm: building the initramfs in {}", work.display());
        let initrd = image::build(&work, &kernel, &contents)?;
        let size = fs::metadata(&initrd)?.len();
        eprintln!(
            "vm: booting {} ({} {}) with a {} MiB initramfs under qemu TCG",
            kernel.release,
            kernel.package,
            kernel.version,
            size >> 20
        );
        qemu::boot(&qemu::Boot {
            vmlinuz: &kernel.vmlinuz(),
            initrd: &initrd,
            events: &work.join("events"),
            memory_mib: MEMORY_MIB,
            entry_timeout: ENTRY_TIMEOUT,
        })
    }
}

/// The guest's /vm/plan: modules, then each entry with the host's passed-on variables.
fn plan(entries: &[Entry]) -> Result<String> {
    let mut plan = String::from("load_modules");
    for module in MODULES {
        write!(plan, " {module}")?;
    }
    plan.push('\n');
    let passed: Vec<(String, String)> = PASSED_ENV
        .iter()
        .filter_map(|name| Some((name.to_string(), env::var(name).ok()?)))
        .collect();
    for entry in entries {
        write!(
            plan,
            "run_entry {} {} env",
            quote(&entry.name),
            ENTRY_TIMEOUT.as_secs()
        )?;
        for (name, value) in &passed {
            write!(plan, " {}", quote(format!("{name}={value}")))?;
        }
        for arg in &entry.argv {
            write!(plan, " {}", quote(arg))?;
        }
        plan.push('\n');
    }
    Ok(plan)
}

/// Prints the guest's results, one line per entry, and whether the run as a whole passed: every
/// entry ran and exited 0, and the guest finished its plan.
pub fn summarize(report: &Report, expected: &[Entry]) -> bool {
    let release = report.release.as_deref().unwrap_or("(did not boot)");
    eprintln!("vm: kernel {release}");
    if let Some(boot) = report.boot_time {
        eprintln!("vm: booted in {:.1} s", boot.as_secs_f64());
    }
    for module in &report.failed_modules {
        eprintln!("vm: warning: modprobe {module} failed in the guest");
    }
    let mut passed = report.done && report.aborted.is_none();
    for entry in expected {
        match report
            .entries
            .iter()
            .find(|outcome| outcome.name == entry.name)
        {
            Some(outcome) if outcome.passed() => {
                eprintln!(
                    "vm: ok      {} ({} s) {}",
                    outcome.name, outcome.seconds, outcome.summary
                );
            }
            Some(outcome) => {
                passed = false;
                let status = outcome
                    .status
                    .map_or("did not finish".to_owned(), |s| format!("exit status {s}"));
                eprintln!(
                    "vm: FAILED  {} ({status}, {} s) {}",
                    outcome.name, outcome.seconds, outcome.summary
                );
            }
            None => {
                passed = false;
                eprintln!("vm: FAILED  {} (never started)", entry.name);
            }
        }
    }
    if let Some(why) = &report.aborted {
        eprintln!("vm: {why}");
    }
    eprintln!(
        "vm: {:.0} s from qemu's start to its end",
        report.total.as_secs_f64()
    );
    passed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_quotes_arguments() {
        let entries = [Entry {
            name: "kernel_floor".into(),
            argv: vec![
                "/t/kernel_floor-1".into(),
                "--test-threads=1".into(),
                "a b".into(),
            ],
        }];
        let plan = plan(&entries).unwrap();
        assert!(plan.starts_with("load_modules veth "), "{plan}");
        let last = plan.lines().last().unwrap();
        assert!(
            last.starts_with("run_entry kernel_floor 1500 env "),
            "{last}"
        );
        assert!(
            last.ends_with(" /t/kernel_floor-1 --test-threads=1 'a b'"),
            "{last}"
        );
    }
}
