//! The agent with the container runtime as its source of truth (`--runtime-endpoint`), under a
//! private containerd whose pod network does not chain redirector-cni at all: every injected pod
//! starts uncaptured, as when the agent was down or the conflist entry was lost. Needs root and
//! Debian's containerd and runc, and fails (never skips) without them:
//!
//! ```text
//! cargo xtask test --host-only -- containerd_agent
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use redirector_tests::containerd::{
    e2e_image_archive, start_agent, CgroupV1Mirror, Containerd, ContainerdSettings, CriPod,
    PodSpec, E2E_IMAGE,
};
use redirector_tests::names::next_subnet;
use redirector_tests::{
    istio_injected_annotations, AgentSetup, Netns, ReconcileReport, Sandbox, Status, TempDir,
    CNI_PLUGIN_DIR,
};
use serde_json::json;

/// A pod network of the reference plugins alone, in a fresh private /24 (no redirector-cni).
fn write_unchained_network(conf_dir: &Path, bin_dir: &Path, ipam_dir: &Path) -> Result<()> {
    std::fs::create_dir_all(conf_dir)?;
    std::fs::create_dir_all(bin_dir)?;
    for plugin in ["bridge", "host-local", "loopback"] {
        std::os::unix::fs::symlink(Path::new(CNI_PLUGIN_DIR).join(plugin), bin_dir.join(plugin))
            .with_context(|| format!("linking the {plugin} plugin into {}", bin_dir.display()))?;
    }
    let subnet = next_subnet();
    let conflist = json!({
        "cniVersion": "1.0.0",
        "name": format!("rdtunchained{subnet}"),
        "plugins": [{
            "type": "bridge",
            "bridge": format!("rdtubr{subnet}"),
            "ipam": {
                "type": "host-local",
                "subnet": format!("10.202.{subnet}.0/24"),
                "dataDir": ipam_dir,
            }
        }]
    });
    std::fs::write(
        conf_dir.join("10-unchained.conflist"),
        serde_json::to_string_pretty(&conflist)?,
    )?;
    Ok(())
}

/// Pod `n` of the test, named `name`.
fn pod_spec(
    scratch: &TempDir,
    n: u16,
    name: &str,
    annotations: BTreeMap<String, String>,
) -> PodSpec {
    PodSpec {
        name: name.into(),
        namespace: "default".into(),
        uid: format!("7a3c0d1e-2b4f-4a6c-{n:04x}-{:012x}", std::process::id()),
        annotations,
        log_directory: scratch.path().join("logs").join(name),
    }
}

fn startup(status: &Status) -> Result<ReconcileReport> {
    status
        .agent
        .as_ref()
        .and_then(|agent| agent.startup.clone())
        .context("no agent startup report in status")
}

#[test]
fn the_runtime_decides_which_pods_are_enrolled_while_the_agent_was_down() -> Result<()> {
    let sandbox = Sandbox::new("containerd-agent")?;
    let scratch = TempDir::create("containerd-agent")?;
    let node = Netns::create("node")?;
    let _cgroups_v1 = CgroupV1Mirror::of(&sandbox.cgroups)?;
    let setup = AgentSetup::new(&sandbox, &scratch)?;
    let settings = ContainerdSettings {
        sandbox_image: E2E_IMAGE.into(),
        images: vec![e2e_image_archive()?],
        cni_conf_dir: scratch.path().join("net.d"),
        cni_bin_dir: scratch.path().join("cni-bin"),
    };
    write_unchained_network(
        &settings.cni_conf_dir,
        &settings.cni_bin_dir,
        &scratch.path().join("ipam"),
    )?;
    let containerd = Containerd::start(&node, sandbox.cgroup("containerd")?, &settings)?;

    // No agent runs: the pods start uncaptured. The plain pod stays to the end, so that the
    // runtime's list is never empty (an empty list proves nothing).
    let mut injected = CriPod::run(
        &containerd,
        &sandbox.cgroups,
        pod_spec(&scratch, 1, "injected", istio_injected_annotations()),
    )?;
    let plain = CriPod::run(
        &containerd,
        &sandbox.cgroups,
        pod_spec(&scratch, 2, "plain", BTreeMap::new()),
    )?;
    let injected_uid = injected.spec.uid.clone();
    let injected_cgroup = injected.cgroup.id()?;

    // 1. The agent starts and enrolls the injected pod it finds running, and only it.
    let agent = start_agent(&setup, &containerd, &[])?;
    let status = setup.status()?;
    let pod = status
        .pod_by_uid(&injected_uid)
        .with_context(|| format!("the injected pod is not enrolled: {status:?}"))?;
    ensure!(
        pod.cgroup_id == injected_cgroup,
        "enrolled another cgroup: {pod:?}"
    );
    ensure!(
        status.pod_by_uid(&plain.spec.uid).is_none() && status.pods.len() == 1,
        "the pod without Istio's annotations was enrolled: {status:?}"
    );
    let report = startup(&status)?;
    ensure!(
        report
            .enrolled
            .iter()
            .map(|pod| pod.cgroup_id)
            .collect::<Vec<_>>()
            == [injected_cgroup],
        "startup report: {report:?}"
    );
    let enrolled_metric = agent
        .metrics()?
        .value("redirector_enrolled_from_runtime_pods_total", &[]);
    ensure!(enrolled_metric == Some(1.0), "metric: {enrolled_metric:?}");
    agent.stop()?;

    // 2. A cgroup root the agent sees that is not cgroup2 (the files cannot prove anything):
    // the runtime's word keeps the live pod, and the passes succeed.
    let odd_root = scratch.path().join("not-cgroup2");
    std::fs::create_dir_all(&odd_root)?;
    let odd_root = odd_root.display().to_string();
    let agent = start_agent(&setup, &containerd, &["--cgroup-root", &odd_root])?;
    let status = setup.status()?;
    ensure!(
        status.pod(injected_cgroup).is_some(),
        "the live pod was not kept: {status:?}"
    );
    let report = startup(&status)?;
    ensure!(report.collected.is_empty(), "collected: {report:?}");
    let error = status
        .agent
        .as_ref()
        .and_then(|agent| agent.reconcile_error.clone());
    ensure!(error.is_none(), "a pass stopped: {error:?}");
    agent.stop()?;

    // 3. The pod is removed while no agent runs (its CNI DEL reaches no redirector): the next
    // agent unenrolls it, on the runtime's word.
    injected.remove()?;
    let agent = start_agent(&setup, &containerd, &[])?;
    let status = setup.status()?;
    ensure!(status.pods.is_empty(), "still enrolled: {status:?}");
    let report = startup(&status)?;
    ensure!(
        report
            .collected
            .iter()
            .map(|pod| (pod.pod.cgroup_id, pod.reason.as_str()))
            .collect::<Vec<_>>()
            == [(injected_cgroup, "sandbox_gone")],
        "startup report: {report:?}"
    );
    ensure!(setup.state_files()?.is_empty(), "state files left");
    agent.stop()?;
    // Dropped in reverse order: the pods, containerd, then the directories, node and sandbox.
    Ok(())
}
