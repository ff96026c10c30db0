//! End-to-end tests under a real container runtime: Debian's containerd (its CRI plugin), runc
//! and the reference CNI plugins, with `redirector install-cni` chaining redirector-cni into the
//! CRI plugin's conflist, and pods and containers created through the CRI API as kubelet does.
//! They need root and Debian's containerd and runc (`cargo xtask setup` installs them), and fail
//! (never skip) without them:
//!
//! ```text
//! cargo xtask test --host-only -- containerd
//! ```
//!
//! Each test starts its own containerd (own root, state, socket, CNI directories) in a "node"
//! network namespace of its own, and stops it and removes everything it made, even on panic.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use redirector_tests::containerd::{Containerd, ContainerdSettings};
use redirector_tests::names::next_subnet;
use redirector_tests::{Netns, Sandbox, TempDir, CNI_PLUGIN_DIR};
use serde_json::json;

/// The reference plugins the conflist and the CRI plugin use (loopback for the pod's `lo`).
const REFERENCE_PLUGINS: [&str; 3] = ["bridge", "host-local", "loopback"];
/// The sandbox image's reference (imported, never pulled).
const PAUSE_IMAGE: &str = "localhost/redirector-e2e/pause:1";

/// A test's node. Fields drop in order: containerd (its pods first), then the directories,
/// the network and the sandbox.
struct Node {
    containerd: Containerd,
    /// CNI conf and bin directories, the agent's socket and state, pod logs.
    scratch: TempDir,
    node: Netns,
    sandbox: Sandbox,
}

impl Node {
    fn start(tag: &str) -> Result<Node> {
        let sandbox = Sandbox::new(tag)?;
        let scratch = TempDir::create(tag)?;
        let node = Netns::create("node")?;
        let settings = ContainerdSettings {
            sandbox_image: PAUSE_IMAGE.into(),
            cni_conf_dir: scratch.path().join("net.d"),
            cni_bin_dir: scratch.path().join("cni-bin"),
        };
        write_bridge_network(
            &settings.cni_conf_dir,
            &settings.cni_bin_dir,
            scratch.path(),
        )?;
        let containerd = Containerd::start(&node, sandbox.cgroup("containerd")?, &settings)?;
        Ok(Node {
            containerd,
            scratch,
            node,
            sandbox,
        })
    }
}

/// The node's pod network, as a cluster's installer leaves it before redirector: a bridge with
/// host-local addresses in a fresh private /24, and the plugins' directory.
fn write_bridge_network(conf_dir: &Path, bin_dir: &Path, scratch: &Path) -> Result<()> {
    std::fs::create_dir_all(conf_dir)?;
    std::fs::create_dir_all(bin_dir)?;
    for plugin in REFERENCE_PLUGINS {
        std::os::unix::fs::symlink(Path::new(CNI_PLUGIN_DIR).join(plugin), bin_dir.join(plugin))
            .with_context(|| format!("linking the {plugin} plugin into {}", bin_dir.display()))?;
    }
    let subnet = next_subnet();
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
                "dataDir": scratch.join("ipam"),
            }
        }]
    });
    std::fs::write(
        conf_dir.join("10-bridge.conflist"),
        serde_json::to_string_pretty(&conflist)?,
    )?;
    Ok(())
}

/// Mount points below `dir`.
fn mounts_below(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(std::fs::read_to_string("/proc/self/mountinfo")?
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|mount| mount.starts_with(dir))
        .collect())
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
    let node = Node::start("containerd-private")?;
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
    let dir = node.containerd.path();
    let dir_text = dir.display().to_string();
    ensure!(
        !processes_mentioning(&dir_text)?.is_empty(),
        "no process runs with {dir_text} in its command line"
    );

    let Node {
        containerd,
        scratch,
        node: netns,
        sandbox,
    } = node;
    drop(containerd);
    ensure!(!dir.exists(), "{} is left", dir.display());
    let mounts = mounts_below(&dir)?;
    ensure!(mounts.is_empty(), "mounts left: {mounts:?}");
    let processes = processes_mentioning(&dir_text)?;
    ensure!(processes.is_empty(), "processes left: {processes:?}");
    drop((scratch, netns, sandbox));
    Ok(())
}
