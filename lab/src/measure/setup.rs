//! Per-pod setup as it happens on a Kubernetes node: each pod's time from the start of the
//! process that makes it ready to that process's exit, for N pods one after another and N
//! pods a few at a time, and the kernel memory the pods hold. Two methods (see
//! [`SetupMethod`]): istio's rules with `iptables-restore` in the pod's netns, and
//! `redirector-cni` ADD through a running agent.
//!
//! The pods (netns with eth0 and its address, cgroups) exist before the clock starts: the
//! runtime has made them before it calls CNI. Each N gets a fresh node (agent and bpffs root),
//! and each round and mode fresh pods; on those pods both methods run, in an order that
//! alternates by round (redirector touches no nat rule, iptables no cgroup). Afterwards the
//! pods get their CNI DEL and are removed, untimed.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};

use crate::measure::bpf_objects::{cgroups_linked_under, map_memory_under};
use crate::measure::machine::{
    network_namespaces, wait_for_netns_teardown, wait_until_quiet, KernelMemory,
};
use crate::parallel::in_parallel;
use crate::records::{SetupBatch, SetupMethod, SetupMode, SetupSample};
use crate::rig::istio;
use crate::rig::kube_node::{remove_pods, KubeNode, SetupPod};
use crate::timed::run_timed;
use crate::variant::Family;
use crate::wire::nearest_rank;

const CNI_TIMEOUT: Duration = Duration::from_secs(60);
/// Kernel memory is read after this pause, so that freed objects of the last process settle.
const SETTLE: Duration = Duration::from_millis(300);

pub struct SetupPlan {
    pub sizes: Vec<usize>,
    pub rounds: u32,
    /// Pods set up at once in the parallel mode.
    pub parallel: usize,
    /// How long a batch waits for a quiet machine before it starts anyway.
    pub quiet_timeout: Duration,
    /// How long to wait for the kernel to finish tearing down the namespaces of removed pods
    /// before the next size or round.
    pub teardown_timeout: Duration,
}

pub struct SetupResults {
    pub samples: Vec<SetupSample>,
    pub batches: Vec<SetupBatch>,
    /// Memory of redirector's maps once the agent has loaded them, before any pod.
    pub map_memory_bytes: u64,
}

/// Every method in every mode for every size, `rounds` times.
pub fn run_setup(plan: &SetupPlan) -> Result<SetupResults> {
    let mut results = SetupResults {
        samples: Vec::new(),
        batches: Vec::new(),
        map_memory_bytes: 0,
    };
    for &pods in &plan.sizes {
        let baseline = network_namespaces();
        let node = KubeNode::start()?;
        results.map_memory_bytes = map_memory_under(node.pin_root())?;
        for round in 1..=plan.rounds {
            for mode in SetupMode::ALL {
                let mut methods = SetupMethod::ALL;
                methods.rotate_left(round as usize % SetupMethod::ALL.len());
                // One pod set up with each method first, untimed, so that the first timed pod
                // does not pay for the first start of the binaries and the agent's first request.
                let warm_up = node.pods(1)?;
                for method in methods {
                    set_up(&node, &warm_up[0], method)?;
                }
                let set = node.pods(pods)?;
                for method in methods {
                    wait_until_quiet(plan.quiet_timeout);
                    let (batch, samples) =
                        time_batch(&node, &set, method, mode, plan.parallel, round)?;
                    eprintln!(
                        "lab: setup round {round} {:<4} {:<10} N={pods:<5} {:>9.1} ms  (slab {:+.1} KiB/pod)",
                        method.name(),
                        mode.name(),
                        batch.millis,
                        batch.slab_kib as f64 / pods as f64
                    );
                    results.batches.push(batch);
                    results.samples.extend(samples);
                }
                if let Some(last) = set.last() {
                    istio::ensure_applied(&last.kube.netns, Family::V4)?;
                }
                ensure_enrolled(&node, &set)?;
                // As the runtime does when the pods go (untimed): the agent forgets them.
                let set: Vec<SetupPod> = warm_up.into_iter().chain(set).collect();
                let mut dels =
                    in_parallel(set.len(), plan.parallel, |i| cni(&node, &set[i], "DEL"))?;
                dels.sort_unstable();
                let at = |q: f64| nearest_rank(&dels, q).as_secs_f64() * 1e3;
                eprintln!(
                    "lab: setup round {round} DEL  {} at once N={:<5} p50 {:.2} ms, p99 {:.2} ms per pod (untimed)",
                    plan.parallel,
                    dels.len(),
                    at(0.5),
                    at(0.99)
                );
                remove_pods(set);
            }
        }
        drop(node);
        wait_for_netns_teardown(baseline, plan.teardown_timeout);
    }
    Ok(results)
}

/// Sets up every pod of `pods` with `method`, one at a time or `parallel` at once, with the
/// kernel memory and redirector's map memory read before and after.
fn time_batch(
    node: &KubeNode,
    pods: &[SetupPod],
    method: SetupMethod,
    mode: SetupMode,
    parallel: usize,
    round: u32,
) -> Result<(SetupBatch, Vec<SetupSample>)> {
    let workers = match mode {
        SetupMode::Sequential => 1,
        SetupMode::Parallel => parallel,
    };
    let maps = |root: &Path| map_memory_under(root).map(|bytes| bytes as i64);
    let (memory_before, maps_before) = (KernelMemory::read()?, maps(node.pin_root())?);
    let started = Instant::now();
    let times = in_parallel(pods.len(), workers, |i| set_up(node, &pods[i], method))?;
    let elapsed = started.elapsed();
    std::thread::sleep(SETTLE);
    let memory = KernelMemory::read()?.minus(memory_before);
    let map_bytes = maps(node.pin_root())? - maps_before;
    let samples = times
        .into_iter()
        .enumerate()
        .map(|(pod, time)| SetupSample {
            round,
            method,
            mode,
            pods: pods.len(),
            pod,
            millis: time.as_secs_f64() * 1e3,
        })
        .collect();
    let batch = SetupBatch {
        round,
        method,
        mode,
        pods: pods.len(),
        millis: elapsed.as_secs_f64() * 1e3,
        slab_kib: memory.slab_kib,
        percpu_kib: memory.percpu_kib,
        vmalloc_kib: memory.vmalloc_kib,
        map_bytes,
    };
    Ok((batch, samples))
}

/// Makes one pod ready with `method`; returns its time, process start to exit.
fn set_up(node: &KubeNode, pod: &SetupPod, method: SetupMethod) -> Result<Duration> {
    match method {
        SetupMethod::Iptables => istio::apply(&pod.kube.netns.path(), Family::V4),
        SetupMethod::RedirectorCni => cni(node, pod, "ADD"),
    }
}

/// Fails unless every pod's cgroup has programs attached by links pinned under the node's
/// root: asked of the kernel, which holds what captures, rather than of the agent, whose
/// account is what is being checked.
fn ensure_enrolled(node: &KubeNode, pods: &[SetupPod]) -> Result<()> {
    let linked = cgroups_linked_under(node.pin_root())?;
    for pod in pods {
        let id = pod.kube.cgroup.id()?;
        ensure!(
            linked.contains(&id),
            "the pod of netns {} (cgroup {}) has nothing attached after its CNI ADD",
            pod.kube.netns.name(),
            pod.kube.cgroup.path().display()
        );
    }
    Ok(())
}

/// Runs `redirector-cni` `operation` for `pod`; returns its time, process start to exit.
fn cni(node: &KubeNode, pod: &SetupPod, operation: &str) -> Result<Duration> {
    let (mut command, config) = node.cni_call(pod, operation)?;
    run_timed(&mut command, &config, CNI_TIMEOUT).with_context(|| {
        format!(
            "redirector-cni {operation} of netns {}",
            pod.kube.netns.name()
        )
    })
}
