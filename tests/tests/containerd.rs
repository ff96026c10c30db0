//! End-to-end tests under a real container runtime: Debian's containerd (its CRI plugin), runc
//! and the reference CNI plugins, with `redirector install-cni` chaining redirector-cni into the
//! CRI plugin's conflist, and pods and containers created through the CRI API as kubelet does.
//! They need root and Debian's containerd and runc (`cargo xtask setup` installs them), and fail
//! (never skip) without them:
//!
//! ```text
//! cargo xtask test --host-only      # writes the test image, names it in REDIRECTOR_E2E_IMAGE
//! ```
//! (a filter after `--` matches test names, not suites: this suite's are listed below.)
//!
//! Each test starts its own containerd (own root, state, socket, CNI directories) in a "node"
//! network namespace of its own, and stops it and removes everything it made, even on panic.
//! The agent runs as a host process after `redirector install-cni` on the host, or (the
//! `daemonset_agent_pod_` tests) as deploy/daemonset.yaml's pod from the release image
//! (`REDIRECTOR_IMAGE`) in that containerd: its install-cni init container, then its agent
//! container, with the manifest's commands, security contexts and host mounts as kubelet passes
//! them, the test's private directories standing for the node's. The same case functions run
//! against both.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use redirector_tests::bpffs::BPFFS_MOUNT;
use redirector_tests::containerd::{
    container_config, e2e_image_archive, mounts_below, redirector_image_archive, start_agent,
    CgroupV1Mirror, Containerd, ContainerdSettings, CriPod, PodSpec, E2E_IMAGE,
};
use redirector_tests::daemonset::{AgentPod, NodeDirs, SharedBind, AGENT_CONFIG};
use redirector_tests::inbound::{
    any_v4, assert_forwarded_inbound, APP_PORT, INBOUND_PORT, PASSTHROUGH,
};
use redirector_tests::names::next_subnet;
use redirector_tests::pod::connect;
use redirector_tests::{
    attached_programs, binary, files_below, istio_injected_annotations, redirector, spawn_in_pod,
    wait_for, wait_for_tcp_listener, Agent, AgentSetup, Cgroup, Child, ConnectOptions,
    ConnectReport, ForwardEvent, Identity, IstioValidationReport, Netns, PodStatus, ProxyEvent,
    Sandbox, ServerReply, TempDir, CNI_PLUGIN_DIR, PROXY_PORT,
};
use serde_json::{json, Value};

/// The reference plugins the conflist and the CRI plugin use (loopback for the pod's `lo`).
const REFERENCE_PLUGINS: [&str; 3] = ["bridge", "host-local", "loopback"];
/// The node's server, on every address of the node netns.
const SERVER_PORT: u16 = 8080;
/// A second server port, for the excluded-port case.
const EXCLUDED_PORT: u16 = 8081;
const WAIT: Duration = Duration::from_secs(30);
const HELPER: &str = "/usr/local/bin/e2e-helper";
const PROXY: &str = "/usr/local/bin/redirector-proxy";

/// How a test's node runs the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AgentRun {
    /// A process on the host, as the tests' own build.
    HostProcess,
    /// The DaemonSet's agent container, from the release image, in a pod of the node's
    /// containerd with the DaemonSet's security context and host mounts.
    DaemonSetPod,
}

/// The node's agent.
enum NodeAgent {
    Process(Agent),
    Pod(AgentPod),
}

impl NodeAgent {
    fn setup(&self) -> &AgentSetup {
        match self {
            NodeAgent::Process(agent) => &agent.setup,
            NodeAgent::Pod(pod) => &pod.setup,
        }
    }

    /// Stops the agent, runs `while_down`, and starts it again: the host process with the same
    /// flags, or a new pod from the image, as a DaemonSet rollout replaces the agent's pod.
    fn restart(
        &mut self,
        containerd: &Containerd,
        cgroup_root: &Cgroup,
        scratch: &TempDir,
        while_down: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        match self {
            NodeAgent::Process(agent) => agent.restart(while_down),
            NodeAgent::Pod(pod) => {
                pod.roll(containerd, cgroup_root, agent_pod_spec(scratch), while_down)
            }
        }
    }
}

/// A test's node: the agent (on the host or in the DaemonSet's pod), redirector-cni chained
/// into the pod network by `redirector install-cni` (on the host, or the pod's init container),
/// a server in the node netns, and containerd. Fields drop in order: containerd first (it
/// removes its pods, through CNI DEL, while the agent still runs; the agent's pod last), then
/// the server, the agent (its pod's cgroup), the shared bind of bpffs, runc's cgroup v1
/// directories, the directories, the network and the sandbox.
struct Node {
    containerd: Containerd,
    servers: Vec<(Child, Cgroup)>,
    agent: NodeAgent,
    _bpffs: Option<SharedBind>,
    _cgroups_v1: CgroupV1Mirror,
    /// 10.202.<subnet>.0/24, the pods' network.
    subnet: u8,
    conflist: PathBuf,
    /// CNI conf and bin directories, the agent's socket and state, pod logs.
    scratch: TempDir,
    node: Netns,
    sandbox: Sandbox,
}

/// The agent pod's metrics address, in the node netns: the DaemonSet's port on the node's
/// address (127.0.0.1 stands for it: the node netns has no other before the first pod).
const AGENT_POD_METRICS: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 15099);

impl Node {
    fn start(tag: &str, run: AgentRun) -> Result<Node> {
        let sandbox = Sandbox::new(tag)?;
        let scratch = TempDir::create(tag)?;
        let node = Netns::create("node")?;
        let cgroups_v1 = CgroupV1Mirror::of(&sandbox.cgroups)?;
        let mut setup = AgentSetup::new(&sandbox, &scratch)?;
        let mut images = vec![e2e_image_archive()?];
        if run == AgentRun::DaemonSetPod {
            // /run/redirector on the node: the socket and state directory the DaemonSet
            // mounts.
            let run_dir = scratch.path().join("run");
            std::fs::create_dir_all(&run_dir)?;
            setup.socket = run_dir.join("agent.sock");
            setup.state_dir = run_dir.join("pods");
            setup.metrics_addr = AGENT_POD_METRICS;
            images.push(redirector_image_archive()?);
        }
        let settings = ContainerdSettings {
            sandbox_image: E2E_IMAGE.into(),
            images,
            cni_conf_dir: scratch.path().join("net.d"),
            cni_bin_dir: scratch.path().join("cni-bin"),
        };
        let subnet = next_subnet();
        let conflist = write_bridge_network(
            &settings.cni_conf_dir,
            &settings.cni_bin_dir,
            scratch.path(),
            subnet,
        )?;
        if run == AgentRun::HostProcess {
            install_cni(&settings, &sandbox, &setup)?;
        }
        let mut servers = Vec::new();
        for port in [SERVER_PORT, EXCLUDED_PORT] {
            servers.push(serve(&node, &sandbox, port)?);
        }
        let containerd = Containerd::start(&node, sandbox.cgroup("containerd")?, &settings)?;
        let (agent, bpffs) = match run {
            AgentRun::HostProcess => (
                NodeAgent::Process(start_agent(&setup, &containerd, &[])?),
                None,
            ),
            AgentRun::DaemonSetPod => {
                let bpffs = SharedBind::new(Path::new(BPFFS_MOUNT), &scratch.path().join("bpffs"))?;
                let config = scratch.path().join("config");
                std::fs::create_dir_all(&config)?;
                std::fs::copy(AGENT_CONFIG, config.join("agent.toml"))?;
                let dirs = NodeDirs {
                    bpffs: bpffs.path().to_owned(),
                    run: scratch.path().join("run"),
                    runtime: containerd.socket_dir(),
                    cni_conf_dir: settings.cni_conf_dir.clone(),
                    cni_bin_dir: settings.cni_bin_dir.clone(),
                    config,
                };
                let spec = agent_pod_spec(&scratch);
                let pod = AgentPod::start(&containerd, &sandbox.cgroups, &node, dirs, spec, setup)?;
                (NodeAgent::Pod(pod), Some(bpffs))
            }
        };
        Ok(Node {
            containerd,
            servers,
            agent,
            _bpffs: bpffs,
            _cgroups_v1: cgroups_v1,
            subnet,
            conflist,
            scratch,
            node,
            sandbox,
        })
    }

    /// The node's server as pods reach it: at their gateway, the bridge's address.
    fn server(&self, port: u16) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::new(10, 202, self.subnet, 1), port))
    }

    /// What the server on `port` answered so far, as JSON lines.
    fn answered(&self, port: u16) -> Vec<Value> {
        let index = usize::from(port != SERVER_PORT);
        self.servers[index].0.json_lines()
    }

    /// A pod as kubelet runs one: its cgroup, then RunPodSandbox (CNI ADD through the chain).
    fn pod(&self, name: &str, annotations: BTreeMap<String, String>) -> Result<CriPod<'_>> {
        CriPod::run(
            &self.containerd,
            &self.sandbox.cgroups,
            self.pod_spec(name, annotations),
        )
    }

    /// A new pod of this node (for [`CriPod::run`] where the pod borrows containerd alone).
    fn pod_spec(&self, name: &str, annotations: BTreeMap<String, String>) -> PodSpec {
        PodSpec {
            name: name.into(),
            namespace: "default".into(),
            uid: pod_uid(),
            annotations,
            // Not below the agent's state directory (scratch/pods).
            log_directory: self.scratch.path().join("logs").join(name),
        }
    }

    /// The pod's status in the agent, which must hold it.
    fn enrolled(&self, pod: &CriPod) -> Result<PodStatus> {
        let status = self.agent.setup().status()?;
        status
            .pod_by_uid(&pod.spec.uid)
            .cloned()
            .with_context(|| format!("pod {} is not enrolled: {status:?}", pod.spec.name))
    }
}

static NEXT_POD: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A fresh pod UID.
fn pod_uid() -> String {
    let n = NEXT_POD.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("5e1f0c2a-7d3b-4e6f-{n:04x}-{:012x}", std::process::id())
}

/// A new pod of the DaemonSet on the node (a rollout's replacement gets a new UID and logs).
fn agent_pod_spec(scratch: &TempDir) -> PodSpec {
    let uid = pod_uid();
    PodSpec {
        name: "redirector-agent".into(),
        namespace: "redirector-system".into(),
        log_directory: scratch.path().join("logs").join(&uid),
        uid,
        annotations: BTreeMap::new(),
    }
}

/// The node's pod network, as a cluster's installer leaves it before redirector: a bridge with
/// host-local addresses in a fresh private /24, and the plugins' directory. Returns the
/// conflist's path.
fn write_bridge_network(
    conf_dir: &Path,
    bin_dir: &Path,
    scratch: &Path,
    subnet: u8,
) -> Result<PathBuf> {
    std::fs::create_dir_all(conf_dir)?;
    std::fs::create_dir_all(bin_dir)?;
    for plugin in REFERENCE_PLUGINS {
        std::os::unix::fs::symlink(Path::new(CNI_PLUGIN_DIR).join(plugin), bin_dir.join(plugin))
            .with_context(|| format!("linking the {plugin} plugin into {}", bin_dir.display()))?;
    }
    let conflist = json!({
        "cniVersion": "1.0.0",
        "name": format!("rdtpods{subnet}"),
        "plugins": [{
            "type": "bridge",
            "bridge": format!("rdtcbr{subnet}"),
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "subnet": format!("10.202.{subnet}.0/24"),
                // A default route through the bridge: the node's other addresses are off-link.
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": scratch.join("ipam"),
            }
        }]
    });
    let path = conf_dir.join("10-bridge.conflist");
    std::fs::write(&path, serde_json::to_string_pretty(&conflist)?)?;
    Ok(path)
}

/// `redirector install-cni` into the node's CNI directories, for this test's agent and cgroups.
fn install_cni(settings: &ContainerdSettings, sandbox: &Sandbox, setup: &AgentSetup) -> Result<()> {
    let output = redirector([
        "install-cni".as_ref(),
        "--cni-bin-dir".as_ref(),
        settings.cni_bin_dir.as_os_str(),
        "--cni-conf-dir".as_ref(),
        settings.cni_conf_dir.as_os_str(),
        "--cgroup-driver".as_ref(),
        "cgroupfs".as_ref(),
        "--cgroup-root".as_ref(),
        sandbox.cgroups.path().as_os_str(),
        "--socket".as_ref(),
        setup.socket.as_os_str(),
    ])?;
    output.ensure_success()?;
    Ok(())
}

/// `e2e-helper serve --log` on every address of `node`, port `port`.
fn serve(node: &Netns, sandbox: &Sandbox, port: u16) -> Result<(Child, Cgroup)> {
    let cgroup = sandbox.cgroup(&format!("node-server{port}"))?;
    let command = [
        binary("e2e-helper")?.into_os_string(),
        "serve".into(),
        "--log".into(),
        "--listen".into(),
        format!("0.0.0.0:{port}").into(),
    ];
    let process = spawn_in_pod(node, &cgroup, Identity::APP, &command)?;
    process.wait_for_line(|line| line == "listening", WAIT)?;
    Ok((process, cgroup))
}

/// An injected pod's proxy container (UID 1337, `redirector-proxy` on 15001) and app container
/// (UID 1000, waiting for the test's execs), the proxy listening. Returns (proxy, app) IDs.
fn start_containers(pod: &CriPod) -> Result<(String, String)> {
    let proxy = start_listening(
        pod,
        "istio-proxy",
        Identity::PROXY,
        &[PROXY, "--listen", "127.0.0.1:15001"],
        PROXY_PORT,
    )?;
    let app = pod.start_container(container_config(
        "app",
        E2E_IMAGE,
        &[HELPER, "pause"],
        Identity::APP.uid,
        Identity::APP.gid,
    ))?;
    Ok((proxy, app))
}

/// Container `name` of the test image running `command` as `identity`, once it listens on
/// `port`; its ID.
fn start_listening(
    pod: &CriPod,
    name: &str,
    identity: Identity,
    command: &[&str],
    port: u16,
) -> Result<String> {
    let id = pod.start_container(container_config(
        name,
        E2E_IMAGE,
        command,
        identity.uid,
        identity.gid,
    ))?;
    wait_for_tcp_listener(pod.container_pid(&id)?, port, WAIT)
        .with_context(|| format!("container {name} is not listening on {port}"))?;
    Ok(id)
}

/// `e2e-helper connect` run in the app container (as its user, in its cgroup), its report.
fn connect_from(pod: &CriPod, app: &str, to: SocketAddr, message: &str) -> Result<ConnectReport> {
    let to = to.to_string();
    let stdout = pod.exec(app, &[HELPER, "connect", "--to", &to, "--message", message])?;
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).with_context(|| format!("parsing the connect report {stdout:?}"))
}

/// The proxy container's forward event for the connection from `client`.
fn forward_event(pod: &CriPod, client: SocketAddr) -> Result<ForwardEvent> {
    match proxy_event(pod, client)? {
        ProxyEvent::Forward(forward) => Ok(forward),
        other => anyhow::bail!("the proxy found no original destination for {client}: {other:?}"),
    }
}

/// The proxy container's event for the connection from `client`, waiting for it.
fn proxy_event(pod: &CriPod, client: SocketAddr) -> Result<ProxyEvent> {
    wait_for(&format!("the proxy's event for {client}"), WAIT, || {
        Ok(pod
            .log("istio-proxy")?
            .iter()
            .filter_map(|line| serde_json::from_str::<ProxyEvent>(line).ok())
            .find(|event| match event {
                ProxyEvent::Forward(forward) => forward.peer == client,
                ProxyEvent::NoOrigDst(missed) => missed.peer == client,
                ProxyEvent::Done(_) => false,
            }))
    })
}

/// The connection reached `server` through the pod's proxy: the app saw the server as its
/// peer, the proxy learned it as the original destination, and the server saw the proxy's
/// upstream connection, from the pod's address.
fn assert_through_proxy(pod: &CriPod, report: &ConnectReport, server: SocketAddr) -> Result<()> {
    let reply = report.server_reply()?;
    ensure!(
        report.peer == Some(server),
        "the app's getpeername is not the server: {report:?}"
    );
    let forward = forward_event(pod, report.local_addr()?)?;
    ensure!(
        forward.orig_dst == server,
        "the proxy forwarded to {}, not {server}",
        forward.orig_dst
    );
    ensure!(
        reply.peer == forward.upstream_local && reply.peer.ip() == pod.ip()?,
        "the server saw {}, the proxy's upstream was {} (pod address {})",
        reply.peer,
        forward.upstream_local,
        pod.ip()?
    );
    Ok(())
}

/// The connection went straight to `server` from the pod's address.
fn assert_direct(pod: &CriPod, report: &ConnectReport, server: SocketAddr) -> Result<()> {
    let reply = report.server_reply()?;
    let local = report.local_addr()?;
    ensure!(
        report.peer == Some(server) && reply.local == server,
        "not connected to {server}: {report:?}"
    );
    ensure!(
        reply.peer == local && local.ip() == pod.ip()?,
        "the server saw {} but the app's socket was {local} (pod address {})",
        reply.peer,
        pod.ip()?
    );
    Ok(())
}

/// Processes whose command line mentions `text`.
fn processes_mentioning(text: &str) -> Result<BTreeSet<i32>> {
    let mut found = BTreeSet::new();
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(text) {
            found.insert(pid);
        }
    }
    Ok(found)
}

#[test]
fn private_containerd_answers_cri_and_leaves_nothing() -> Result<()> {
    let node = Node::start("containerd-private", AgentRun::HostProcess)?;
    let version = node
        .containerd
        .cri()
        .call(async |client| client.version().await)?;
    eprintln!(
        "runtime: {} {} (CRI {})",
        version.runtime_name, version.runtime_version, version.runtime_api_version
    );
    ensure!(
        version.runtime_name == "containerd" && version.runtime_api_version == "v1",
        "unexpected runtime: {version:?}"
    );
    assert_installed(&node)?;
    tear_down_leaves_nothing(node)
}

/// install-cni's work on the node: redirector-cni in the CNI bin dir (the agent's chain_cni
/// only rewrites the conflist), and chained last in the conflist with the annotations
/// capability, pointing at the node's agent socket and pod cgroups.
fn assert_installed(node: &Node) -> Result<()> {
    let binary = node.scratch.path().join("cni-bin").join("redirector-cni");
    let mode = std::fs::metadata(&binary)
        .with_context(|| format!("install-cni left no {}", binary.display()))?
        .permissions()
        .mode();
    ensure!(mode & 0o111 != 0, "{} has mode {mode:o}", binary.display());
    let conflist: Value = serde_json::from_str(&std::fs::read_to_string(&node.conflist)?)?;
    let entry = &conflist["plugins"][1];
    let setup = node.agent.setup();
    ensure!(
        entry["type"] == "redirector-cni"
            && entry["capabilities"]["io.kubernetes.cri.pod-annotations"] == true
            && entry["agentSocket"] == json!(setup.socket)
            && entry["cgroupRoot"] == json!(setup.pod_cgroup_root)
            && entry["cgroupDriver"] == "cgroupfs",
        "install-cni did not chain redirector-cni with the annotations capability, the agent's \
         socket and the pods' cgroups: {conflist}"
    );
    Ok(())
}

/// Stops the node as the tests' drop does, checking on the way that nothing is left: the agent
/// pod (if the agent runs in one) exits 0 on SIGTERM; containerd's directory, its mounts and
/// every process naming it (its shims, the pods', the agent pod's) are gone with containerd;
/// no mount is left in the test's directory (the shared bind of bpffs), and no pin once the
/// sandbox has uninstalled.
fn tear_down_leaves_nothing(mut node: Node) -> Result<()> {
    let dir = node.containerd.path();
    let dir_text = dir.display().to_string();
    // A host agent names containerd's socket as its runtime, and stays until the end.
    let host_agent = match &mut node.agent {
        NodeAgent::Process(agent) => Some(agent.process.pid().as_raw()),
        NodeAgent::Pod(pod) => {
            pod.stop(&node.containerd)?;
            None
        }
    };
    let containerd_processes = || -> Result<BTreeSet<i32>> {
        let mut found = processes_mentioning(&dir_text)?;
        found.retain(|pid| Some(*pid) != host_agent);
        Ok(found)
    };
    ensure!(
        !containerd_processes()?.is_empty(),
        "no process runs with {dir_text} in its command line"
    );

    let Node {
        containerd,
        servers,
        agent,
        _bpffs,
        _cgroups_v1,
        scratch,
        node: netns,
        sandbox,
        ..
    } = node;
    drop(containerd);
    ensure!(!dir.exists(), "{} is left", dir.display());
    let mounts = mounts_below(&dir)?;
    ensure!(mounts.is_empty(), "mounts left: {mounts:?}");
    let processes = containerd_processes()?;
    ensure!(processes.is_empty(), "processes left: {processes:?}");
    let (scratch_dir, pin_root) = (scratch.path().to_owned(), sandbox.root().to_owned());
    drop((servers, agent, _bpffs, _cgroups_v1));
    let mounts = mounts_below(&scratch_dir)?;
    ensure!(mounts.is_empty(), "mounts left: {mounts:?}");
    drop((scratch, netns, sandbox));
    ensure!(!pin_root.exists(), "pins left in {}", pin_root.display());
    Ok(())
}

/// Case 1 and 5: an injected pod's app connects to a server outside the pod through the pod's
/// proxy container; removing the sandbox unenrolls the pod and leaves nothing of it.
#[test]
fn injected_pod_goes_through_its_proxy_and_removal_leaves_nothing() -> Result<()> {
    injected_pod_case(&Node::start("containerd-injected", AgentRun::HostProcess)?)
}

/// The cases against the DaemonSet's pod from the release image instead of the host's agent
/// and install-cni: its install-cni init container chains redirector-cni, and its agent
/// container (deploy/daemonset.yaml's security context and host mounts) captures pods. Here
/// case 1 (outbound with removal, and inbound), 3 and 4, one after the other on one node.
#[test]
fn daemonset_agent_pod_captures_injected_pods() -> Result<()> {
    let node = Node::start("containerd-dsinjected", AgentRun::DaemonSetPod)?;
    assert_installed(&node)?;
    injected_pod_case(&node)?;
    inbound_case(&node)?;
    excluded_case(&node)?;
    validation_case(&node)
}

/// Case 5's restarts, the agent's as a rollout (its pod stopped, containerd restarted, a new
/// pod from the image, whose install-cni runs again on the chained conflist), then case 2 and
/// the node's teardown, against the DaemonSet's pod.
#[test]
fn daemonset_agent_pod_rollout_keeps_pods_captured_and_stops_leaving_nothing() -> Result<()> {
    let mut node = Node::start("containerd-dsrollout", AgentRun::DaemonSetPod)?;
    restart_case(&mut node)?;
    assert_installed(&node)?;
    plain_pod_case(&node)?;
    tear_down_leaves_nothing(node)
}

fn injected_pod_case(node: &Node) -> Result<()> {
    let pins_before = files_below(node.sandbox.root())?;
    let mut pod = node.pod("injected", istio_injected_annotations())?;
    let status = node.agent.setup().status()?;
    let enrolled = status
        .pod_by_uid(&pod.spec.uid)
        .with_context(|| format!("the injected pod is not enrolled: {status:?}"))?;
    ensure!(
        Path::new(&enrolled.cgroup) == pod.cgroup.path(),
        "enrolled {} instead of the pod's cgroup {}",
        enrolled.cgroup,
        pod.cgroup.path().display()
    );
    let (_proxy, app) = start_containers(&pod)?;
    let server = node.server(SERVER_PORT);
    let report = connect_from(&pod, &app, server, "from the injected pod")?;
    assert_through_proxy(&pod, &report, server)?;

    // StopPodSandbox runs CNI DEL, RemovePodSandbox removes the containers; the pod's cgroup
    // stays until kubelet removes it, when the pod is dropped.
    let netns = pod.netns_path()?;
    pod.remove()?;
    ensure!(
        !netns.exists(),
        "the pod's netns {} is left",
        netns.display()
    );
    let (cgroup, uid) = (pod.cgroup.path(), &pod.spec.uid);
    let status = node.agent.setup().status()?;
    ensure!(
        status.pod_by_uid(uid).is_none(),
        "the removed pod is still enrolled: {status:?}"
    );
    let links = attached_programs(cgroup)?;
    ensure!(
        links.is_empty(),
        "programs left on {}: {links:?}",
        cgroup.display()
    );
    ensure!(
        files_below(node.sandbox.root())? == pins_before,
        "pins left: {:?}",
        files_below(node.sandbox.root())?
    );
    let state = node.agent.setup().state_files()?;
    ensure!(state.is_empty(), "state files left: {state:?}");
    Ok(())
}

/// Case 2: a pod without the injector's annotations, on the same node, is not enrolled and
/// connects directly.
#[test]
fn pod_without_annotations_is_not_enrolled_and_connects_directly() -> Result<()> {
    plain_pod_case(&Node::start("containerd-plain", AgentRun::HostProcess)?)
}

fn plain_pod_case(node: &Node) -> Result<()> {
    let pod = node.pod("plain", BTreeMap::new())?;
    let status = node.agent.setup().status()?;
    ensure!(
        status.pod_by_uid(&pod.spec.uid).is_none() && status.pods.is_empty(),
        "a pod without annotations was enrolled: {status:?}"
    );
    let links = attached_programs(pod.cgroup.path())?;
    ensure!(links.is_empty(), "programs on the plain pod: {links:?}");
    let app = pod.start_container(container_config(
        "app",
        E2E_IMAGE,
        &[HELPER, "pause"],
        Identity::APP.uid,
        Identity::APP.gid,
    ))?;
    let server = node.server(SERVER_PORT);
    let report = connect_from(&pod, &app, server, "from the plain pod")?;
    assert_direct(&pod, &report, server)
}

/// Case 3: an injected pod's excludeOutboundPorts and excludeOutboundIPRanges annotations send
/// those connections direct, and the rest still through the proxy.
#[test]
fn excluded_outbound_ports_and_ranges_go_direct() -> Result<()> {
    excluded_case(&Node::start("containerd-excluded", AgentRun::HostProcess)?)
}

fn excluded_case(node: &Node) -> Result<()> {
    // A second address of the node, in a range the pod excludes.
    let excluded_range = format!("10.203.{}.0/24", node.subnet);
    let excluded_addr = Ipv4Addr::new(10, 203, node.subnet, 1);
    let cidr = format!("{excluded_addr}/32");
    node.node
        .run("ip", &["addr", "add", &cidr, "dev", "lo"])
        .context("adding the excluded address to the node")?;
    let mut annotations = istio_injected_annotations();
    annotations.insert(
        "traffic.sidecar.istio.io/excludeOutboundPorts".into(),
        EXCLUDED_PORT.to_string(),
    );
    annotations.insert(
        "traffic.sidecar.istio.io/excludeOutboundIPRanges".into(),
        excluded_range,
    );
    let pod = node.pod("excluded", annotations)?;
    let (_proxy, app) = start_containers(&pod)?;

    let captured = node.server(SERVER_PORT);
    let report = connect_from(&pod, &app, captured, "captured")?;
    assert_through_proxy(&pod, &report, captured)?;
    let excluded_port = node.server(EXCLUDED_PORT);
    let report = connect_from(&pod, &app, excluded_port, "excluded port")?;
    assert_direct(&pod, &report, excluded_port)?;
    let excluded_ip = SocketAddr::from((excluded_addr, SERVER_PORT));
    let report = connect_from(&pod, &app, excluded_ip, "excluded range")?;
    assert_direct(&pod, &report, excluded_ip)?;
    ensure!(
        node.answered(EXCLUDED_PORT).len() == 1,
        "the excluded port's server answered {:?}",
        node.answered(EXCLUDED_PORT)
    );
    Ok(())
}

/// Case 1, inbound half: a client on the node connects to the injected pod's address; the
/// pod's proxy container accepts the connection on 15006, with the address the client asked
/// for as its original destination, and hands it to the app container from 127.0.0.6.
#[test]
fn inbound_connection_reaches_the_app_through_the_proxy() -> Result<()> {
    inbound_case(&Node::start("containerd-inbound", AgentRun::HostProcess)?)
}

fn inbound_case(node: &Node) -> Result<()> {
    const MESSAGE: &str = "inbound from the node";
    let pod = node.pod("inbound", istio_injected_annotations())?;
    let inbound = any_v4(INBOUND_PORT).to_string();
    start_listening(
        &pod,
        "istio-proxy",
        Identity::PROXY,
        &[PROXY, "--inbound", "--listen", &inbound],
        INBOUND_PORT,
    )?;
    let app = any_v4(APP_PORT).to_string();
    start_listening(
        &pod,
        "app",
        Identity::APP,
        &[HELPER, "serve", "--log", "--listen", &app],
        APP_PORT,
    )?;

    let destination = SocketAddr::from((pod.ip()?, APP_PORT));
    let client = node.sandbox.cgroup("node-client")?;
    let options = ConnectOptions::to(destination).message(MESSAGE);
    let report = connect(&node.node, &client, Identity::APP, &options)?;
    let forward = forward_event(&pod, report.local_addr()?)?;
    assert_forwarded_inbound(&forward, &report, destination, PASSTHROUGH)?;
    wait_for("the app container to log the connection", WAIT, || {
        Ok(pod
            .log("app")?
            .iter()
            .filter_map(|line| serde_json::from_str::<ServerReply>(line).ok())
            .find(|reply| reply.line == MESSAGE && reply.peer == forward.upstream_local))
    })?;
    let counters = node.enrolled(&pod)?.counters;
    ensure!(
        counters.inbound_captured >= 1 && counters.orig_dst_misses == 0,
        "{counters:?}"
    );
    Ok(())
}

/// Case 4: Istio's istio-validation init container, run as the proxy's UID before the proxy
/// starts. Its connect from 127.0.0.1 to 127.0.0.6:15002 is the proxy's UID towards a local
/// address other than 127.0.0.1, which istio-iptables sends to the inbound port
/// (`! -d 127.0.0.1/32 -o lo --uid-owner 1337 -j ISTIO_IN_REDIRECT`): its listener on
/// 127.0.0.1:15006 must accept it and read 127.0.0.6:15002 as the original destination.
#[test]
fn istio_validation_init_container_passes() -> Result<()> {
    validation_case(&Node::start(
        "containerd-validation",
        AgentRun::HostProcess,
    )?)
}

fn validation_case(node: &Node) -> Result<()> {
    let pod = node.pod("validated", istio_injected_annotations())?;
    let validation = pod.start_container(container_config(
        "istio-validation",
        E2E_IMAGE,
        &[HELPER, "istio-validation"],
        Identity::PROXY.uid,
        Identity::PROXY.gid,
    ))?;
    let exit_code = pod.wait_exited(&validation, WAIT)?;
    let log = pod.log("istio-validation")?;
    let report: IstioValidationReport = serde_json::from_str(log.last().map_or("", String::as_str))
        .with_context(|| format!("istio-validation exited {exit_code} and logged {log:?}"))?;
    ensure!(
        exit_code == 0 && report.passed,
        "istio-validation exited {exit_code}: {report:?}"
    );
    let probe = SocketAddr::from((Ipv4Addr::new(127, 0, 0, 6), 15002));
    let inbound_listener = SocketAddr::from((Ipv4Addr::LOCALHOST, INBOUND_PORT));
    ensure!(
        report
            .accepted
            .iter()
            .all(|accept| accept.listener == inbound_listener && accept.orig_dst == Some(probe)),
        "not only the inbound listener, with {probe} as original destination: {report:?}"
    );

    // The proxy starts after it, as kubelet runs init containers first.
    let (_proxy, app) = start_containers(&pod)?;
    let server = node.server(SERVER_PORT);
    let report = connect_from(&pod, &app, server, "after the validation")?;
    assert_through_proxy(&pod, &report, server)
}

/// Case 5, second half: containerd and the agent are stopped and started again (containerd on
/// the same root, state and socket; the agent's pod, where it runs in one, replaced by a new
/// one as a rollout does) while an injected pod runs. The pod stays enrolled as it
/// was (no unenroll: the same programs' links, its counters kept) and its new connections
/// still go through its proxy.
#[test]
fn restarting_containerd_and_the_agent_leaves_running_pods_captured() -> Result<()> {
    restart_case(&mut Node::start(
        "containerd-restart",
        AgentRun::HostProcess,
    )?)
}

fn restart_case(node: &mut Node) -> Result<()> {
    // Borrowing containerd alone, so that the agent can be restarted while the pod runs.
    let spec = node.pod_spec("restarted", istio_injected_annotations());
    let pod = CriPod::run(&node.containerd, &node.sandbox.cgroups, spec)?;
    let (_proxy, app) = start_containers(&pod)?;
    let server = node.server(SERVER_PORT);
    let report = connect_from(&pod, &app, server, "before the restarts")?;
    assert_through_proxy(&pod, &report, server)?;
    let before = node.enrolled(&pod)?;
    let link_ids = |cgroup: &Path| -> Result<Vec<Value>> {
        Ok(attached_programs(cgroup)?
            .into_iter()
            .map(|link| link["id"].clone())
            .collect())
    };
    let links_before = link_ids(pod.cgroup.path())?;

    node.agent.restart(
        &node.containerd,
        &node.sandbox.cgroups,
        &node.scratch,
        || node.containerd.restart(),
    )?;
    let report = connect_from(&pod, &app, server, "after the restarts")?;
    assert_through_proxy(&pod, &report, server)?;

    let after = node.enrolled(&pod)?;
    ensure!(
        after.cgroup_id == before.cgroup_id
            && after.counters.redirected == before.counters.redirected + 1,
        "not the same enrollment: before {before:?}, after {after:?}"
    );
    ensure!(
        link_ids(pod.cgroup.path())? == links_before,
        "the pod's programs were attached again: {links_before:?} before"
    );
    let status = node.agent.setup().status()?;
    let agent = status.agent.context("no agent report")?;
    let startup = agent.startup.context("no startup report")?;
    ensure!(
        startup.collected.is_empty()
            && startup.enrolled.is_empty()
            && agent.collected_since.is_empty()
            && startup
                .adopted
                .iter()
                .map(|adopted| adopted.cgroup_id)
                .eq([before.cgroup_id]),
        "the restarted agent did not just adopt the pod: {startup:?}, since: {:?}",
        agent.collected_since
    );
    Ok(())
}
