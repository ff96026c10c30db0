//! Per-pod setup cost: how long it takes to make N pods ready for interception, and how much
//! kernel memory each one holds, for istio's rule set against redirector.
//!
//! Only the interception step is timed; the pods' network namespaces and cgroups exist before
//! the clock starts (making them costs the same with either method). Pods are done one after
//! another. Three methods:
//! - `IPT`: `iptables-restore --noflush` of the istio rules, one process per pod, as istio-init;
//! - `EBPF`: `redirector enroll --cgroup DIR`, one process per pod, as a CNI plugin would;
//! - `EBPF-lib`: the library's `Redirector::enroll` in this process, as a node agent would.
//!
//! redirector's one-time install (loading the programs) happens before any timing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use redirector::pins::PinRoot;
use redirector::pods::Redirector;
use redirector::policy::Policy;
use redirector_tests::{binary, nat_rules, Cgroup, Netns, Sandbox};
use serde::Serialize;

use crate::rig::{apply_istio_rules, ISTIO_RULE_COUNT};
use crate::system::{
    map_memory_bytes, network_namespaces, wait_for_netns_teardown, wait_until_quiet, KernelMemory,
};
use crate::timed::run_timed;

const ENROLL_TIMEOUT: Duration = Duration::from_secs(60);
const NETNS_TEARDOWN_TIMEOUT: Duration = Duration::from_secs(180);
/// Threads creating and deleting network namespaces (untimed, but slow one by one).
const NETNS_WORKERS: usize = 8;
/// Kernel memory is read after this pause, so that freed objects of the last process settle.
const SETTLE: Duration = Duration::from_millis(300);
/// How long a timed step waits for the machine to be quiet before it starts anyway.
const QUIET_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Method {
    #[serde(rename = "IPT")]
    Iptables,
    #[serde(rename = "EBPF")]
    RedirectorCli,
    #[serde(rename = "EBPF-lib")]
    RedirectorLibrary,
}

impl Method {
    pub const ALL: [Method; 3] = [
        Method::Iptables,
        Method::RedirectorCli,
        Method::RedirectorLibrary,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Method::Iptables => "IPT",
            Method::RedirectorCli => "EBPF",
            Method::RedirectorLibrary => "EBPF-lib",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Method::Iptables => "iptables-restore of the istio rules, a process per pod",
            Method::RedirectorCli => "`redirector enroll`, a process per pod",
            Method::RedirectorLibrary => "redirector library, in one process",
        }
    }
}

/// One timed set-up of `pods` pods: a row of `setup-samples.csv`.
#[derive(Clone, Debug, Serialize)]
pub struct SetupSample {
    pub round: u32,
    pub method: Method,
    pub pods: usize,
    pub millis: f64,
    /// Kernel memory added by the set-up (all pods together).
    pub slab_kib: i64,
    pub percpu_kib: i64,
    pub vmalloc_kib: i64,
    /// Growth of redirector's map memory (bpftool bytes_memlock).
    pub map_bytes: i64,
}

pub struct SetupPlan {
    pub sizes: Vec<usize>,
    pub rounds: u32,
}

pub struct SetupResults {
    pub samples: Vec<SetupSample>,
    /// Memory of redirector's maps once installed (bpftool bytes_memlock), before any pod.
    pub map_memory_bytes: u64,
}

/// Runs every method for every size, `rounds` times, rotating the order of the methods.
pub fn run_setup(plan: &SetupPlan) -> Result<SetupResults> {
    let sandbox = Sandbox::new("labsetup")?;
    let root = sandbox.root().to_path_buf();
    // The one-time install, not timed: enrolling a first cgroup loads and pins the programs.
    let first = sandbox.cgroup("install")?;
    sandbox.enroll(&first)?;
    sandbox.unenroll(&first)?.ensure_success()?;
    let map_memory_bytes = map_memory_bytes(&root)?;
    let mut samples = Vec::new();
    for &pods in &plan.sizes {
        for round in 1..=plan.rounds {
            let mut order = Method::ALL.to_vec();
            let start = (round as usize - 1) % order.len();
            order.rotate_left(start);
            for method in order {
                let sample = match method {
                    Method::Iptables => iptables(pods, round)?,
                    Method::RedirectorCli => redirector_cli(&sandbox, &root, pods, round)?,
                    Method::RedirectorLibrary => redirector_library(&sandbox, &root, pods, round)?,
                };
                eprintln!(
                    "lab: setup round {round} {:<8} N={pods:<5} {:>9.1} ms  ({:.0} µs/pod, slab {:+.1} KiB/pod)",
                    method.name(),
                    sample.millis,
                    sample.millis * 1e3 / pods as f64,
                    sample.slab_kib as f64 / pods as f64
                );
                samples.push(sample);
            }
        }
    }
    Ok(SetupResults {
        samples,
        map_memory_bytes,
    })
}

/// Kernel memory and redirector's map memory before and after `step`, which returns its time.
fn measured(
    method: Method,
    pods: usize,
    round: u32,
    pin_root: Option<&Path>,
    step: impl FnOnce() -> Result<Duration>,
) -> Result<SetupSample> {
    let maps = || pin_root.map_or(Ok(0), map_memory_bytes);
    wait_until_quiet(QUIET_TIMEOUT);
    let (memory_before, maps_before) = (KernelMemory::read()?, maps()?);
    let elapsed = step()?;
    std::thread::sleep(SETTLE);
    let memory = KernelMemory::read()?.minus(memory_before);
    let map_bytes = maps()? as i64 - maps_before as i64;
    Ok(SetupSample {
        round,
        method,
        pods,
        millis: elapsed.as_secs_f64() * 1e3,
        slab_kib: memory.slab_kib,
        percpu_kib: memory.percpu_kib,
        vmalloc_kib: memory.vmalloc_kib,
        map_bytes,
    })
}

fn iptables(pods: usize, round: u32) -> Result<SetupSample> {
    let baseline = network_namespaces();
    let namespaces = create_namespaces(pods)?;
    let paths: Vec<PathBuf> = namespaces.iter().map(Netns::path).collect();
    let sample = measured(Method::Iptables, pods, round, None, || {
        let started = Instant::now();
        for path in &paths {
            apply_istio_rules(path)?;
        }
        Ok(started.elapsed())
    })?;
    let rules = nat_rules(&namespaces[pods - 1])?;
    ensure!(
        rules.len() == ISTIO_RULE_COUNT,
        "the last pod has {} nat rules, expected {ISTIO_RULE_COUNT}",
        rules.len()
    );
    delete_namespaces(namespaces);
    wait_for_netns_teardown(baseline, NETNS_TEARDOWN_TIMEOUT);
    Ok(sample)
}

fn redirector_cli(sandbox: &Sandbox, root: &Path, pods: usize, round: u32) -> Result<SetupSample> {
    let (batch, cgroups) = pod_cgroups(sandbox, "cli", pods, round)?;
    let redirector = binary("redirector")?;
    let sample = measured(Method::RedirectorCli, pods, round, Some(root), || {
        let started = Instant::now();
        for cgroup in &cgroups {
            let mut enroll = Command::new(&redirector);
            enroll
                .arg("enroll")
                .arg("--cgroup")
                .arg(cgroup.path())
                .arg("--bpffs")
                .arg(root)
                .env("NO_COLOR", "1");
            run_timed(&mut enroll, b"", ENROLL_TIMEOUT)?;
        }
        Ok(started.elapsed())
    })?;
    unenroll_all(root, &cgroups, pods)?;
    drop(cgroups);
    drop(batch);
    Ok(sample)
}

fn redirector_library(
    sandbox: &Sandbox,
    root: &Path,
    pods: usize,
    round: u32,
) -> Result<SetupSample> {
    let (batch, cgroups) = pod_cgroups(sandbox, "lib", pods, round)?;
    let policy = Policy::default();
    let sample = {
        let mut redirector = Redirector::install(PinRoot::new(root))?;
        measured(Method::RedirectorLibrary, pods, round, Some(root), || {
            let started = Instant::now();
            for cgroup in &cgroups {
                let pod = redirector::cgroup::Cgroup::open(cgroup.path())?;
                redirector.enroll(&pod, &policy, None)?;
            }
            Ok(started.elapsed())
        })?
    };
    unenroll_all(root, &cgroups, pods)?;
    drop(cgroups);
    drop(batch);
    Ok(sample)
}

/// Checks that all `pods` are enrolled, then unenrolls them (untimed).
fn unenroll_all(root: &Path, cgroups: &[Cgroup], pods: usize) -> Result<()> {
    let pins = PinRoot::new(root);
    // Counting link pins is cheap; `Redirector::pods` would look every cgroup up by id.
    let enrolled = pins.pinned_pods()?.len();
    ensure!(
        enrolled == pods,
        "{enrolled} pods are enrolled, expected {pods}"
    );
    let mut redirector =
        Redirector::open(pins)?.context("redirector is not installed in the setup sandbox")?;
    for cgroup in cgroups {
        redirector.unenroll(cgroup.id()?)?;
    }
    Ok(())
}

/// `pods` empty cgroups below a fresh batch cgroup (returned first, to drop last).
fn pod_cgroups(
    sandbox: &Sandbox,
    tag: &str,
    pods: usize,
    round: u32,
) -> Result<(Cgroup, Vec<Cgroup>)> {
    let batch = sandbox.cgroup(&format!("{tag}-{pods}-{round}"))?;
    let cgroups = (0..pods)
        .map(|i| batch.child(&format!("pod{i}")))
        .collect::<Result<Vec<_>>>()?;
    Ok((batch, cgroups))
}

/// `count` network namespaces, made by a few threads at once.
fn create_namespaces(count: usize) -> Result<Vec<Netns>> {
    let per_worker = count.div_ceil(NETNS_WORKERS);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..count)
            .step_by(per_worker)
            .map(|start| {
                let end = (start + per_worker).min(count);
                scope.spawn(move || {
                    (start..end)
                        .map(|_| Netns::create("setup"))
                        .collect::<Result<Vec<_>>>()
                })
            })
            .collect();
        let mut namespaces = Vec::with_capacity(count);
        for worker in workers {
            let made = worker
                .join()
                .map_err(|_| anyhow::anyhow!("a netns worker panicked"))?;
            namespaces.extend(made?);
        }
        Ok(namespaces)
    })
}

fn delete_namespaces(namespaces: Vec<Netns>) {
    let per_worker = namespaces.len().div_ceil(NETNS_WORKERS).max(1);
    let mut rest = namespaces;
    std::thread::scope(|scope| {
        while !rest.is_empty() {
            let chunk: Vec<Netns> = rest.drain(..per_worker.min(rest.len())).collect();
            scope.spawn(move || drop(chunk));
        }
    });
}
