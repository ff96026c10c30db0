//! The setup rig: a Kubernetes node as far as making pods ready goes. A `redirector agent`
//! runs on its own bpffs root, and pods are what kubelet and the runtime have prepared when the
//! runtime calls CNI ADD: a network namespace with an address on eth0, and a pod cgroup where
//! kubelet's cgroupfs driver puts it, with a cgroup per container below. Pods are made and
//! removed in bulk by a few threads.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use nix::sys::statfs::{statfs, TMPFS_MAGIC};
use redirector_tests::{
    binary, Agent, AgentSetup, CgroupDriver, Child, KubePod, Qos, Sandbox, TempDir, POD_ANNOTATIONS,
};
use serde_json::json;

use crate::parallel::in_parallel;

/// Threads making or removing pods (untimed, but slow one by one: a few processes each).
const POD_WORKERS: usize = 8;
const IP_TIMEOUT: Duration = Duration::from_secs(30);
/// Pod addresses are 10.240.0.1 and up; a node holds fewer pods than this.
const MAX_PODS: u32 = 250 * 256;

/// A pod ready for CNI ADD, with the address the previous plugin gave its eth0.
pub struct SetupPod {
    pub kube: KubePod,
    pub address: Ipv4Addr,
}

/// Fields drop in order: the agent is killed, then its files, then the bpffs root is
/// uninstalled and the cgroups removed.
pub struct KubeNode {
    agent: Agent,
    _scratch: TempDir,
    sandbox: Sandbox,
    pods_made: AtomicU32,
}

impl KubeNode {
    /// A fresh sandbox with the agent started in it and ready (programs loaded).
    pub fn start() -> Result<KubeNode> {
        let sandbox = Sandbox::new("labnode")?;
        let scratch = TempDir::create_in(&node_run_dir()?, "labnode")?;
        let agent = Agent::start(&AgentSetup::new(&sandbox, &scratch)?)?;
        Ok(KubeNode {
            agent,
            _scratch: scratch,
            sandbox,
            pods_made: AtomicU32::new(0),
        })
    }

    pub fn pin_root(&self) -> &Path {
        self.sandbox.root()
    }

    /// `count` new pods, made by a few threads at once.
    pub fn pods(&self, count: usize) -> Result<Vec<SetupPod>> {
        in_parallel(count, POD_WORKERS, |_| self.pod())
    }

    fn pod(&self) -> Result<SetupPod> {
        let n = self.pods_made.fetch_add(1, Ordering::Relaxed);
        ensure!(n < MAX_PODS, "more than {MAX_PODS} pods on one lab node");
        let address = Ipv4Addr::new(10, 240, (n / 250) as u8, (n % 250 + 1) as u8);
        let kube = KubePod::create(
            &self.sandbox.cgroups,
            CgroupDriver::Cgroupfs,
            Qos::Burstable,
            "setup",
        )?;
        // What the main plugin (bridge, ptp...) leaves behind: a veth eth0, up, with the pod's
        // address. Its peer stays in the pod's netns too: no traffic goes anywhere, and the
        // node's netns is left alone. (A dummy device would do, but this kernel has none.)
        let mut command = Command::new("ip");
        command.args(["-n", kube.netns.name(), "-batch", "-"]);
        let script = format!(
            "link add eth0 type veth peer name node0\naddr add {address}/32 dev eth0\nlink set eth0 up\n"
        );
        Child::spawn_with_input("ip -batch", command, Some(script.into_bytes()))?
            .wait_exit(IP_TIMEOUT)?
            .ensure_success()
            .with_context(|| format!("giving netns {} its eth0", kube.netns.name()))?;
        Ok(SetupPod { kube, address })
    }

    /// `redirector-cni` `operation` (ADD, DEL) for `pod` as a runtime runs it: in the node's
    /// netns, with the CNI environment, and the network config with the previous plugin's
    /// result on stdin. Its entry declares the pod-annotations capability, and `runtimeConfig`
    /// carries the annotations Istio's injector writes (as containerd passes them): the plugin
    /// selects the pod by them, and their `includeInboundPorts: "*"` is the rules' `-b '*'`.
    pub fn cni_call(&self, pod: &SetupPod, operation: &str) -> Result<(Command, Vec<u8>)> {
        let plugin = binary("redirector-cni")?;
        let plugin_dir = plugin.parent().context("a binary without a directory")?;
        let attachment = pod.kube.attachment();
        let mut command = Command::new(&plugin);
        command
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", operation)
            .env("CNI_PATH", plugin_dir)
            .envs(attachment.env());
        let octets = pod.address.octets();
        let config = json!({
            "cniVersion": "1.0.0",
            "name": "lab",
            "type": "redirector-cni",
            "agentSocket": self.agent.setup.socket,
            "cgroupRoot": self.sandbox.cgroups.path(),
            "cgroupDriver": CgroupDriver::Cgroupfs.name(),
            "capabilities": {POD_ANNOTATIONS: true},
            "runtimeConfig": attachment.capability_args,
            "prevResult": {
                "cniVersion": "1.0.0",
                "interfaces": [{
                    "name": attachment.ifname,
                    "mac": format!("0a:58:0a:f0:{:02x}:{:02x}", octets[2], octets[3]),
                    "sandbox": attachment.netns,
                }],
                "ips": [{"interface": 0, "address": format!("{}/32", pod.address)}],
            },
        });
        Ok((command, serde_json::to_vec(&config)?))
    }
}

/// Where the agent keeps its socket and pod state: a tmpfs, as `/run` (the DaemonSet's
/// `/run/redirector`) is on a node. `/run` need not be one on the lab's machine (on this machine
/// kind it is on the root disk, where every state write creates an ext4 inode); `/dev/shm` is
/// a tmpfs wherever glibc's shared memory works.
fn node_run_dir() -> Result<PathBuf> {
    let dir = PathBuf::from("/dev/shm");
    let fs = statfs(&dir).with_context(|| format!("statfs {}", dir.display()))?;
    ensure!(
        fs.filesystem_type() == TMPFS_MAGIC,
        "{} is not a tmpfs: the setup rig keeps the agent's state on a tmpfs, as /run is on a node",
        dir.display()
    );
    Ok(dir)
}

/// Removes pods (their cgroups and network namespaces) a few at once. Their CNI DEL, if
/// any, is the caller's.
pub fn remove_pods(pods: Vec<SetupPod>) {
    let per_worker = pods.len().div_ceil(POD_WORKERS).max(1);
    let mut rest = pods;
    std::thread::scope(|scope| {
        while !rest.is_empty() {
            let chunk: Vec<SetupPod> = rest.drain(..per_worker.min(rest.len())).collect();
            scope.spawn(move || drop(chunk));
        }
    });
}
