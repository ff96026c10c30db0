//! A private containerd for one test: Debian's containerd with its CRI plugin and runc, with its
//! own root, state, runc root and socket under a fresh temp directory, its own CNI conf and bin
//! directories, started in the test's "node" network namespace (so the bridge the CNI plugins
//! make, and every address they hand out, live in the test's namespaces only) and in a cgroup of
//! the test's own (so that its shims, which outlive it, are found and killed).
//!
//! [`Containerd::restart`] stops it and starts it again on the same directories and socket, as a
//! node's service manager does; the pods' shims and containers run on meanwhile.
//!
//! On drop, even after a panic: every pod sandbox it still has is stopped and removed through CRI
//! (which tears its network down through CNI DEL and its containers' cgroups through runc), then
//! containerd and its shims are killed, the mounts it left under its directories are unmounted,
//! and the directories are removed.
//!
//! Pods get cgroups as kubelet's cgroupfs driver lays them out, below the test's cgroup subtree:
//! on a hybrid host runc (1.1) puts each container in the same path in the cgroup2 hierarchy
//! (where redirector attaches) and in every v1 hierarchy, and [`CgroupV1Mirror`] removes the
//! latter.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use nix::mount::{umount2, MntFlags};
use redirector::cri::{api, CriClient, CriError};

use crate::agent::{Agent, AgentSetup};
use crate::cgroup::{cgroup2_mount, cgroup_v1_mounts, Cgroup};
use crate::cni::{pod_cgroup_path, CgroupDriver, Qos};
use crate::names::TempDir;
use crate::netns::Netns;
use crate::process::{binary, run, wait_for, Child};

/// Where Debian's containerd and runc are.
const CONTAINERD: &str = "/usr/bin/containerd";
const CTR: &str = "/usr/bin/ctr";
/// containerd's CRI plugin keeps Kubernetes' images and containers in this namespace.
const K8S_NAMESPACE: &str = "k8s.io";
const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
const IMPORT_TIMEOUT: Duration = Duration::from_secs(120);
/// One command run in a container by [`CriPod::exec`].
const EXEC_TIMEOUT: Duration = Duration::from_secs(30);

/// The CRI client, driven from synchronous test code.
pub struct Cri {
    runtime: tokio::runtime::Runtime,
    client: CriClient,
}

impl Cri {
    pub fn connect(socket: &Path) -> Result<Cri> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting a tokio runtime for the CRI client")?;
        let client = runtime.block_on(CriClient::connect(socket))?;
        Ok(Cri { runtime, client })
    }

    /// Runs one call of the client to completion.
    pub fn call<T>(
        &self,
        call: impl AsyncFnOnce(&mut CriClient) -> Result<T, CriError>,
    ) -> Result<T> {
        let mut client = self.client.clone();
        Ok(self.runtime.block_on(call(&mut client))?)
    }
}

/// The image `cargo xtask test` writes for this suite (xtask/src/image.rs, `e2e_image`):
/// `e2e-helper` and `redirector-proxy` in /usr/local/bin; its default command, `e2e-helper
/// pause`, makes it the pod sandbox image too.
pub const E2E_IMAGE: &str = "localhost/redirector-e2e:1";

/// The archive of [`E2E_IMAGE`], which `cargo xtask test` names in `REDIRECTOR_E2E_IMAGE`.
pub fn e2e_image_archive() -> Result<PathBuf> {
    image_archive("REDIRECTOR_E2E_IMAGE", "the test image")
}

/// The archive of the release image (`cargo xtask image`, the DaemonSet's image), which `cargo
/// xtask test` names in `REDIRECTOR_IMAGE`.
pub fn redirector_image_archive() -> Result<PathBuf> {
    image_archive("REDIRECTOR_IMAGE", "the release image")
}

/// The image archive named in the environment `variable`, which must be a file.
fn image_archive(variable: &str, what: &str) -> Result<PathBuf> {
    let archive = std::env::var_os(variable)
        .map(PathBuf::from)
        .with_context(|| {
            format!(
                "{variable} is not set: run this suite through `cargo xtask test`, which writes \
             {what} and names it there"
            )
        })?;
    ensure!(
        archive.is_file(),
        "{variable} names {}, which is not a file",
        archive.display()
    );
    Ok(archive)
}

/// What the test gives its containerd.
#[derive(Debug, Clone)]
pub struct ContainerdSettings {
    /// The image of pod sandboxes (the "pause" image), among `images`.
    pub sandbox_image: String,
    /// OCI archives imported once containerd answers (no registry is reachable).
    pub images: Vec<PathBuf>,
    /// The conflist(s) the CRI plugin loads, written before containerd starts.
    pub cni_conf_dir: PathBuf,
    /// The CNI plugins' directory (containerd 1.6 takes one).
    pub cni_bin_dir: PathBuf,
}

/// A running private containerd; see the module's documentation.
pub struct Containerd {
    cri: Option<Cri>,
    /// Replaced by [`Containerd::restart`], while pods borrow the runtime.
    process: RefCell<Option<Child>>,
    /// The node netns it runs in, by name.
    node: String,
    /// containerd and its shims.
    cgroup: Option<Cgroup>,
    dir: Option<TempDir>,
}

impl Containerd {
    /// Starts containerd in `node` and `cgroup` and waits until its CRI plugin answers
    /// `Version`.
    pub fn start(
        node: &Netns,
        cgroup: Cgroup,
        settings: &ContainerdSettings,
    ) -> Result<Containerd> {
        for program in [CONTAINERD, CTR, "/usr/sbin/runc"] {
            ensure!(
                Path::new(program).is_file(),
                "{program} is missing: install Debian's containerd and runc (`cargo xtask setup` does)"
            );
        }
        let dir = TempDir::create("containerd")?;
        let config = dir.path().join("config.toml");
        std::fs::write(&config, config_toml(dir.path(), settings))
            .with_context(|| format!("writing {}", config.display()))?;
        let mut containerd = Containerd {
            cri: None,
            process: RefCell::new(None),
            node: node.name().to_owned(),
            cgroup: Some(cgroup),
            dir: Some(dir),
        };
        containerd.launch()?;
        let socket = containerd.socket();
        let cri = containerd.wait_until_ready(|| {
            // The socket exists a moment before the CRI service is registered on it.
            let Ok(cri) = Cri::connect(&socket) else {
                return None;
            };
            cri.call(async |client| client.version().await)
                .ok()
                .map(|_| cri)
        })?;
        containerd.cri = Some(cri);
        for archive in &settings.images {
            containerd.import(archive)?;
        }
        Ok(containerd)
    }

    /// Starts containerd's process with the configuration in its directory.
    fn launch(&self) -> Result<()> {
        let cgroup = self.cgroup.as_ref().expect("the cgroup lives until drop");
        let mut command = Command::new(binary("e2e-helper")?);
        command
            .args(["exec", "--netns", &self.node, "--cgroup"])
            .arg(cgroup.path())
            .args(["--", CONTAINERD, "--config"])
            .arg(self.dir().join("config.toml"));
        *self.process.borrow_mut() = Some(Child::spawn("containerd", command)?);
        Ok(())
    }

    /// Waits until `answered` yields (it is asked while the socket exists), failing at once if
    /// containerd exits.
    fn wait_until_ready<T>(&self, mut answered: impl FnMut() -> Option<T>) -> Result<T> {
        let socket = self.socket();
        wait_for("containerd to answer CRI Version", START_TIMEOUT, || {
            if let Some(process) = self.process.borrow().as_ref() {
                process.ensure_running()?;
            }
            Ok(if socket.exists() { answered() } else { None })
        })
    }

    /// SIGTERM to containerd, which must exit in time; its shims and containers keep running.
    fn stop(&self) -> Result<()> {
        if let Some(process) = self.process.borrow_mut().take() {
            process.signal(nix::sys::signal::Signal::SIGTERM)?;
            process.wait_exit(STOP_TIMEOUT)?;
        }
        Ok(())
    }

    /// Stops containerd and starts it again on the same root, state and socket, as a node's
    /// service manager restarts it: the pods' shims and containers run on meanwhile. Returns
    /// once its CRI plugin answers again, through the same client.
    pub fn restart(&self) -> Result<()> {
        self.stop().context("stopping containerd")?;
        self.launch()?;
        self.wait_until_ready(|| self.cri().call(async |client| client.version().await).ok())?;
        Ok(())
    }

    fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .expect("the directory lives until drop")
            .path()
    }

    /// In a directory of its own, as /run/containerd holds a node's: the agent's DaemonSet
    /// mounts that directory.
    pub fn socket(&self) -> PathBuf {
        self.socket_dir().join("containerd.sock")
    }

    pub fn socket_dir(&self) -> PathBuf {
        self.dir().join("run")
    }

    /// Its root, state and socket directory (gone once it is dropped).
    pub fn path(&self) -> PathBuf {
        self.dir().to_owned()
    }

    pub fn cri(&self) -> &Cri {
        self.cri.as_ref().expect("connected until drop")
    }

    /// containerd's command line and the tail of its log, for errors.
    pub fn diagnostics(&self) -> String {
        self.process
            .borrow()
            .as_ref()
            .map(|process| format!("containerd:{}", process.diagnostics()))
            .unwrap_or_default()
    }

    /// `ctr images import` of an OCI archive into the CRI plugin's namespace.
    pub fn import(&self, archive: &Path) -> Result<()> {
        let mut command = Command::new(CTR);
        command
            .arg("--address")
            .arg(self.socket())
            .args(["--namespace", K8S_NAMESPACE, "images", "import"])
            .arg(archive);
        run("ctr images import", command, IMPORT_TIMEOUT)?.ensure_success()?;
        Ok(())
    }

    /// Every pod sandbox stopped and removed through CRI, as kubelet removes pods.
    fn remove_pods(&self) -> Result<()> {
        for pod in self
            .cri()
            .call(async |client| client.list_pod_sandboxes().await)?
        {
            self.remove_pod(&pod.id)?;
        }
        Ok(())
    }

    /// StopPodSandbox (CNI DEL, its containers stopped) and RemovePodSandbox, as kubelet
    /// removes a deleted pod.
    pub fn remove_pod(&self, id: &str) -> Result<()> {
        let cri = self.cri();
        cri.call(async |client| client.stop_pod_sandbox(id).await)?;
        cri.call(async |client| client.remove_pod_sandbox(id).await)?;
        Ok(())
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if self.cri.is_some() {
            if let Err(error) = self.remove_pods() {
                eprintln!("cleanup: removing containerd's pods: {error:#}");
            }
        }
        self.cri = None;
        if let Err(error) = self.stop() {
            eprintln!("cleanup: stopping containerd: {error:#}");
        }
        // Kills the shims (and any container process a failed removal left).
        self.cgroup = None;
        // Container rootfs overlays, shm mounts.
        if let Err(error) = unmount_below(self.dir()) {
            eprintln!("cleanup: containerd's mounts: {error:#}");
        }
        self.dir = None;
    }
}

/// Mount points below `dir`.
pub fn mounts_below(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(std::fs::read_to_string("/proc/self/mountinfo")?
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|mount| mount.starts_with(dir))
        .collect())
}

/// Unmounts, deepest first, whatever a runtime left mounted below `dir`.
pub fn unmount_below(dir: &Path) -> Result<()> {
    let mut mounts = mounts_below(dir)?;
    mounts.sort_by_key(|mount| std::cmp::Reverse(mount.components().count()));
    for mount in mounts {
        umount2(&mount, MntFlags::MNT_DETACH)
            .with_context(|| format!("unmounting {}", mount.display()))?;
    }
    Ok(())
}

/// containerd's configuration: everything it writes goes below `dir`; its CRI plugin runs pods
/// with runc, cgroupfs and the test's CNI directories.
fn config_toml(dir: &Path, settings: &ContainerdSettings) -> String {
    let dir = dir.display();
    let cri = r#"plugins."io.containerd.grpc.v1.cri""#;
    format!(
        r#"version = 2
root = "{dir}/root"
state = "{dir}/state"
# Plugins the tests do not use: the others would probe the host, or (opt) write to /opt.
disabled_plugins = [
  "io.containerd.internal.v1.opt",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
]

[grpc]
  address = "{dir}/run/containerd.sock"

[ttrpc]
  address = "{dir}/run/containerd.sock.ttrpc"

[{cri}]
  sandbox_image = "{sandbox_image}"
  # Sandboxes ask for an oom_score_adj of -998, which needs CAP_SYS_RESOURCE: machines whose
  # root lacks it (CI's does) would fail every pod. No lower than containerd's own instead.
  restrict_oom_score_adj = true
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        # runc's state, by default in /run/containerd/runc, shared with any other containerd.
        Root = "{dir}/runc"
        # kubelet's cgroupfs driver: pods' cgroups are plain paths below the cgroup roots.
        SystemdCgroup = false
  [{cri}.cni]
    bin_dir = "{bin_dir}"
    conf_dir = "{conf_dir}"
    max_conf_num = 1
"#,
        sandbox_image = settings.sandbox_image,
        bin_dir = settings.cni_bin_dir.display(),
        conf_dir = settings.cni_conf_dir.display(),
    )
}

/// The agent as deployed (deploy/agent.toml's `runtime_endpoint`): with `containerd`'s CRI
/// socket as the runtime it reconciles against, and `extra` flags; ready.
pub fn start_agent(setup: &AgentSetup, containerd: &Containerd, extra: &[&str]) -> Result<Agent> {
    let endpoint = format!("unix://{}", containerd.socket().display());
    let mut flags = vec!["--runtime-endpoint", endpoint.as_str()];
    flags.extend_from_slice(extra);
    Agent::start_with(setup, &flags)
}

/// The cgroup v1 directories runc makes for a pod on a hybrid host, next to the cgroup2 one:
/// `relative` (a test's cgroup subtree, relative to the cgroup2 mount) in each v1 hierarchy,
/// removed bottom-up on drop. (On a host with cgroup2 alone there are none.)
pub struct CgroupV1Mirror {
    relative: PathBuf,
}

impl CgroupV1Mirror {
    /// For the cgroup2 directory `cgroup`.
    pub fn of(cgroup: &Cgroup) -> Result<CgroupV1Mirror> {
        let relative = cgroup
            .path()
            .strip_prefix(cgroup2_mount()?)
            .with_context(|| format!("{} is not below the cgroup2 mount", cgroup.path().display()))?
            .to_owned();
        Ok(CgroupV1Mirror { relative })
    }

    /// `path` as the CRI's `cgroup_parent` names it: absolute from the hierarchies' roots.
    pub fn cgroup_parent(cgroup: &Path) -> Result<String> {
        let relative = cgroup
            .strip_prefix(cgroup2_mount()?)
            .with_context(|| format!("{} is not below the cgroup2 mount", cgroup.display()))?;
        Ok(format!("/{}", relative.display()))
    }

    fn remove(&self) -> Result<()> {
        for mount in cgroup_v1_mounts()? {
            let top = mount.join(&self.relative);
            let mut dirs = Vec::new();
            let mut next = vec![top];
            while let Some(dir) = next.pop() {
                let Ok(entries) = std::fs::read_dir(&dir) else {
                    continue;
                };
                next.extend(
                    entries
                        .filter_map(|entry| entry.ok())
                        .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
                        .map(|entry| entry.path()),
                );
                dirs.push(dir);
            }
            // Children were pushed after their parents.
            for dir in dirs.iter().rev() {
                std::fs::remove_dir(dir).with_context(|| format!("rmdir {}", dir.display()))?;
            }
        }
        Ok(())
    }
}

impl Drop for CgroupV1Mirror {
    fn drop(&mut self) {
        if let Err(error) = self.remove() {
            eprintln!("cleanup: cgroup v1 directories: {error:#}");
        }
    }
}

/// A pod as kubelet describes it to the runtime.
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub annotations: BTreeMap<String, String>,
    /// Where the runtime writes the containers' logs (CRI's log directory of the pod).
    pub log_directory: PathBuf,
}

impl PodSpec {
    /// The sandbox's CRI config, its cgroup at `cgroup_parent`, in `namespaces`.
    pub fn sandbox_config(
        &self,
        cgroup_parent: &str,
        namespaces: api::NamespaceOption,
    ) -> api::PodSandboxConfig {
        api::PodSandboxConfig {
            metadata: Some(api::PodSandboxMetadata {
                name: self.name.clone(),
                uid: self.uid.clone(),
                namespace: self.namespace.clone(),
                attempt: 0,
            }),
            // kubelet names the host of a pod with its own network only (runc refuses a
            // hostname without a UTS namespace, which a host-network pod shares with the node).
            hostname: if namespaces.network == api::NamespaceMode::Node as i32 {
                String::new()
            } else {
                self.name.clone()
            },
            log_directory: self.log_directory.display().to_string(),
            annotations: self.annotations.clone().into_iter().collect(),
            labels: [("io.kubernetes.pod.name".to_owned(), self.name.clone())]
                .into_iter()
                .collect(),
            linux: Some(api::LinuxPodSandboxConfig {
                cgroup_parent: cgroup_parent.to_owned(),
                security_context: Some(api::LinuxSandboxSecurityContext {
                    namespace_options: Some(namespaces),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// kubelet's default: the pod's network and IPC namespaces, a PID namespace per container.
fn pod_namespaces() -> api::NamespaceOption {
    api::NamespaceOption {
        network: api::NamespaceMode::Pod.into(),
        pid: api::NamespaceMode::Container.into(),
        ipc: api::NamespaceMode::Pod.into(),
        ..Default::default()
    }
}

/// A pod sandbox as kubelet runs one: its cgroup made, then RunPodSandbox; not removed on drop
/// (see [`CriPod`]).
pub struct PodSandbox {
    pub id: String,
    pub spec: PodSpec,
    config: api::PodSandboxConfig,
    /// The pod's cgroup2 directory, made as kubelet makes it before RunPodSandbox.
    pub cgroup: Cgroup,
}

impl PodSandbox {
    /// Makes the pod's cgroup below `cgroup_root` as kubelet's cgroupfs driver lays it out for a
    /// BestEffort pod, then runs the sandbox in `namespaces` (its own network through CNI ADD).
    pub fn run(
        containerd: &Containerd,
        cgroup_root: &Cgroup,
        spec: PodSpec,
        namespaces: api::NamespaceOption,
    ) -> Result<PodSandbox> {
        let cgroup = cgroup_root.descendant(&pod_cgroup_path(
            CgroupDriver::Cgroupfs,
            Qos::BestEffort,
            &spec.uid,
        ))?;
        std::fs::create_dir_all(&spec.log_directory)?;
        let config =
            spec.sandbox_config(&CgroupV1Mirror::cgroup_parent(cgroup.path())?, namespaces);
        let sent = config.clone();
        let id = containerd
            .cri()
            .call(async |client| client.run_pod_sandbox(sent, "").await)
            .with_context(|| containerd.diagnostics())?;
        Ok(PodSandbox {
            id,
            spec,
            config,
            cgroup,
        })
    }

    /// Creates and starts a container in the pod; its ID.
    pub fn start_container(
        &self,
        containerd: &Containerd,
        config: api::ContainerConfig,
    ) -> Result<String> {
        let cri = containerd.cri();
        let sandbox = self.config.clone();
        let id = cri
            .call(async |client| client.create_container(&self.id, config, sandbox).await)
            .with_context(|| containerd.diagnostics())?;
        cri.call(async |client| client.start_container(&id).await)
            .with_context(|| containerd.diagnostics())?;
        Ok(id)
    }
}

/// A pod sandbox run through CRI, with its cgroup; stopped and removed on drop, as kubelet
/// removes a deleted pod (its cgroup last).
pub struct CriPod<'a> {
    containerd: &'a Containerd,
    cri: &'a Cri,
    sandbox: PodSandbox,
    removed: bool,
}

impl std::ops::Deref for CriPod<'_> {
    type Target = PodSandbox;

    fn deref(&self) -> &PodSandbox {
        &self.sandbox
    }
}

impl<'a> CriPod<'a> {
    /// [`PodSandbox::run`] with kubelet's default namespaces.
    pub fn run(containerd: &'a Containerd, cgroup_root: &Cgroup, spec: PodSpec) -> Result<Self> {
        let sandbox = PodSandbox::run(containerd, cgroup_root, spec, pod_namespaces())?;
        Ok(CriPod {
            containerd,
            cri: containerd.cri(),
            sandbox,
            removed: false,
        })
    }

    /// Creates and starts a container in the pod; its ID.
    pub fn start_container(&self, config: api::ContainerConfig) -> Result<String> {
        self.sandbox.start_container(self.containerd, config)
    }

    /// The pod's IPv4 address, as the CNI result gave it to the runtime.
    pub fn ip(&self) -> Result<std::net::Ipv4Addr> {
        let status = self
            .cri
            .call(async |client| client.pod_sandbox_status(&self.id).await)?;
        let ip = status
            .status
            .and_then(|status| status.network)
            .map(|network| network.ip)
            .context("the sandbox status has no network")?;
        ip.parse()
            .with_context(|| format!("the pod's address {ip:?}"))
    }

    /// The sandbox's network namespace file (containerd's, under /var/run/netns), from its
    /// runtime spec in the verbose status.
    pub fn netns_path(&self) -> Result<PathBuf> {
        let status = self
            .cri
            .call(async |client| client.pod_sandbox_status(&self.id).await)?;
        let info = status.info.get("info").context("no verbose info")?;
        let info: serde_json::Value = serde_json::from_str(info)?;
        info["runtimeSpec"]["linux"]["namespaces"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|namespace| namespace["type"] == "network")
            .and_then(|namespace| namespace["path"].as_str())
            .map(PathBuf::from)
            .with_context(|| format!("no network namespace in the sandbox's spec: {info}"))
    }

    /// The host PID of a container's process (containerd's verbose status carries it).
    pub fn container_pid(&self, container_id: &str) -> Result<nix::unistd::Pid> {
        let status = self
            .cri
            .call(async |client| client.container_status(container_id).await)?;
        let info = status.info.get("info").context("no verbose info")?;
        let info: serde_json::Value = serde_json::from_str(info)?;
        let pid = info["pid"]
            .as_i64()
            .with_context(|| format!("no pid in the container's info {info}"))?;
        Ok(nix::unistd::Pid::from_raw(i32::try_from(pid)?))
    }

    /// Waits until a container has exited, as kubelet waits for an init container; its exit
    /// code.
    pub fn wait_exited(&self, container_id: &str, timeout: Duration) -> Result<i32> {
        wait_for(
            &format!("container {container_id} to exit"),
            timeout,
            || {
                let answer = self
                    .cri
                    .call(async |client| client.container_status(container_id).await)?;
                let status = answer.status.context("no container status")?;
                Ok(
                    (status.state == api::ContainerState::ContainerExited as i32)
                        .then_some(status.exit_code),
                )
            },
        )
    }

    /// Runs `command` in a container (as its user) to completion; its stdout, which must be
    /// that of a zero exit.
    pub fn exec(&self, container_id: &str, command: &[&str]) -> Result<String> {
        let command: Vec<String> = command.iter().map(|arg| (*arg).to_owned()).collect();
        let shown = command.join(" ");
        let answer = self.cri.call(async |client| {
            client
                .exec_sync(container_id, command, EXEC_TIMEOUT.as_secs() as i64)
                .await
        })?;
        let stdout = String::from_utf8_lossy(&answer.stdout).into_owned();
        ensure!(
            answer.exit_code == 0,
            "`{shown}` in container {container_id} exited {}: stdout {stdout:?} stderr {:?}",
            answer.exit_code,
            String::from_utf8_lossy(&answer.stderr)
        );
        Ok(stdout)
    }

    /// The stdout lines of container `name`, from its CRI log file.
    pub fn log(&self, name: &str) -> Result<Vec<String>> {
        container_log(
            &self.spec.log_directory.join(format!("{name}.log")),
            "stdout",
        )
    }

    /// StopPodSandbox (CNI DEL) and RemovePodSandbox, failing on an error; the pod's cgroup
    /// stays until the pod is dropped.
    pub fn remove(&mut self) -> Result<()> {
        self.removed = true;
        self.containerd.remove_pod(&self.id)
    }
}

impl Drop for CriPod<'_> {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        if let Err(error) = self.containerd.remove_pod(&self.id) {
            eprintln!("cleanup: removing pod sandbox {}: {error:#}", self.id);
        }
    }
}

/// A container of a pod: `image`'s `command`, run as `uid`/`gid`.
pub fn container_config(
    name: &str,
    image: &str,
    command: &[&str],
    uid: u32,
    gid: u32,
) -> api::ContainerConfig {
    api::ContainerConfig {
        metadata: Some(api::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(api::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        command: command.iter().map(|arg| (*arg).to_owned()).collect(),
        // Relative to the pod's log directory, as kubelet names them (without the restart count).
        log_path: format!("{name}.log"),
        linux: Some(api::LinuxContainerConfig {
            security_context: Some(api::LinuxContainerSecurityContext {
                run_as_user: Some(api::Int64Value { value: uid.into() }),
                run_as_group: Some(api::Int64Value { value: gid.into() }),
                namespace_options: Some(pod_namespaces()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The lines a container wrote to `stream` ("stdout" or "stderr"), from its CRI log file
/// (`TIMESTAMP STREAM F|P TEXT` per line, P marking a line split by the runtime).
pub fn container_log(path: &Path, stream: &str) -> Result<Vec<String>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error).with_context(|| format!("reading {}", path.display())),
    };
    let mut lines = Vec::new();
    let mut partial = String::new();
    for line in text.lines() {
        let mut fields = line.splitn(4, ' ');
        let (Some(_time), Some(from), Some(tag), text) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            bail!("not a CRI log line in {}: {line:?}", path.display());
        };
        if from != stream {
            continue;
        }
        partial.push_str(text.unwrap_or(""));
        if tag == "F" {
            lines.push(std::mem::take(&mut partial));
        }
    }
    Ok(lines)
}
