//! deploy/daemonset.yaml as kubelet hands it to the runtime: the init and agent containers'
//! commands, environment, security contexts and host mounts, read from the manifest itself and
//! translated into CRI as kubelet translates a pod spec, so that a test running the DaemonSet's
//! pod this way breaks when the DaemonSet changes. [`AgentPod`] runs it in a test's private
//! containerd.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use redirector::cri::api;
use serde::Deserialize;

use crate::agent::{http_get_in, AgentSetup};
use crate::bpffs::BPFFS_MOUNT;
use crate::cgroup::Cgroup;
use crate::containerd::{container_log, Containerd, PodSandbox, PodSpec};
use crate::netns::Netns;
use crate::process::wait_for;

/// The manifest, from the repository.
pub const MANIFEST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/daemonset.yaml");
/// The agent's config file, which the kustomization turns into the `redirector` ConfigMap.
pub const AGENT_CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/agent.toml");
/// Loading the programs on a slow machine, and the container's start, included.
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// The DaemonSet's terminationGracePeriodSeconds is 30: kubelet's SIGTERM then SIGKILL.
const GRACE: Duration = Duration::from_secs(30);
/// install-cni copies a binary and rewrites a file; kubelet would wait for ever.
const INIT_TIMEOUT: Duration = Duration::from_secs(60);

/// One document of the manifest; only the DaemonSet's spec is read.
#[derive(Debug, Deserialize)]
struct Document {
    kind: String,
    #[serde(default)]
    spec: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct DaemonSetSpec {
    template: PodTemplate,
}

#[derive(Debug, Deserialize)]
struct PodTemplate {
    spec: PodTemplateSpec,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodTemplateSpec {
    #[serde(default)]
    pub host_network: bool,
    /// Run in order before the containers, each to a zero exit (install-cni).
    #[serde(default)]
    pub init_containers: Vec<Container>,
    pub containers: Vec<Container>,
    #[serde(default)]
    pub volumes: Vec<Volume>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    pub name: String,
    pub image: String,
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub env: Vec<EnvVar>,
    #[serde(default)]
    pub security_context: SecurityContext,
    #[serde(default)]
    pub volume_mounts: Vec<VolumeMount>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvVar {
    pub name: String,
    pub value: Option<String>,
    pub value_from: Option<EnvSource>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvSource {
    pub field_ref: Option<FieldRef>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FieldRef {
    pub field_path: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecurityContext {
    pub run_as_user: Option<i64>,
    #[serde(default)]
    pub privileged: bool,
    /// Unset means true, as in Kubernetes.
    pub allow_privilege_escalation: Option<bool>,
    #[serde(default)]
    pub read_only_root_filesystem: bool,
    #[serde(default)]
    pub capabilities: Capabilities,
    pub seccomp_profile: Option<Profile>,
    pub app_armor_profile: Option<Profile>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Capabilities {
    #[serde(default)]
    pub add: Vec<String>,
    #[serde(default)]
    pub drop: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Profile {
    #[serde(rename = "type")]
    pub kind: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeMount {
    pub name: String,
    pub mount_path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    pub mount_propagation: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Volume {
    pub name: String,
    pub host_path: Option<HostPath>,
    pub config_map: Option<ConfigMapSource>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct HostPath {
    pub path: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ConfigMapSource {
    pub name: String,
}

/// The DaemonSet's pod template, parsed from [`MANIFEST`].
pub fn pod_template() -> Result<PodTemplateSpec> {
    let text = std::fs::read_to_string(MANIFEST).with_context(|| format!("reading {MANIFEST}"))?;
    let documents: Vec<Document> =
        serde_saphyr::from_multiple(&text).with_context(|| format!("parsing {MANIFEST}"))?;
    let spec = documents
        .into_iter()
        .find(|document| document.kind == "DaemonSet")
        .and_then(|document| document.spec)
        .with_context(|| format!("{MANIFEST} has no DaemonSet with a spec"))?;
    let spec: DaemonSetSpec =
        serde_json::from_value(spec).with_context(|| format!("the DaemonSet of {MANIFEST}"))?;
    Ok(spec.template.spec)
}

impl PodTemplateSpec {
    pub fn container(&self, name: &str) -> Result<&Container> {
        self.containers
            .iter()
            .find(|container| container.name == name)
            .with_context(|| format!("{MANIFEST} has no container {name:?}"))
    }

    /// kubelet's namespaces for the pod: the node's network with `hostNetwork`, else its own.
    pub fn namespaces(&self) -> api::NamespaceOption {
        let network = if self.host_network {
            api::NamespaceMode::Node
        } else {
            api::NamespaceMode::Pod
        };
        api::NamespaceOption {
            network: network.into(),
            pid: api::NamespaceMode::Container.into(),
            ipc: api::NamespaceMode::Pod.into(),
            ..Default::default()
        }
    }

    /// The CRI mounts of `container`'s volume mounts. `source` gives the directory standing for
    /// a volume on the test's node (failing for a volume it does not know); where the DaemonSet
    /// mounts a host path at that same path inside and the source says so, the container sees
    /// the test's directory under the test's path too.
    pub fn mounts(
        &self,
        container: &Container,
        source: impl Fn(&Volume) -> Result<VolumeSource>,
    ) -> Result<Vec<api::Mount>> {
        container
            .volume_mounts
            .iter()
            .map(|mounted| {
                let volume = self
                    .volumes
                    .iter()
                    .find(|volume| volume.name == mounted.name)
                    .with_context(|| format!("no volume {:?} in {MANIFEST}", mounted.name))?;
                let source = source(volume)?;
                let same_path = volume
                    .host_path
                    .as_ref()
                    .is_some_and(|host| host.path == mounted.mount_path);
                let container_path = if same_path && source.same_path_inside {
                    source.host_path.clone()
                } else {
                    mounted.mount_path.clone()
                };
                Ok(api::Mount {
                    container_path: container_path.display().to_string(),
                    host_path: source.host_path.display().to_string(),
                    readonly: mounted.read_only,
                    propagation: propagation(mounted.mount_propagation.as_deref())?.into(),
                    ..Default::default()
                })
            })
            .collect()
    }

    /// kubelet's CRI config for `container` of this pod on the test's node (`dirs`, the node's
    /// address `host_ip`), its command followed by `node_flags`.
    fn container_config(
        &self,
        container: &Container,
        host_ip: &str,
        dirs: &NodeDirs,
        node_flags: &[String],
    ) -> Result<api::ContainerConfig> {
        let envs = container.envs(host_ip)?;
        let mut command = container.expanded_command(&envs);
        command.extend_from_slice(node_flags);
        Ok(api::ContainerConfig {
            metadata: Some(api::ContainerMetadata {
                name: container.name.clone(),
                attempt: 0,
            }),
            image: Some(api::ImageSpec {
                image: container.image.clone(),
                ..Default::default()
            }),
            command,
            envs,
            mounts: self.mounts(container, |volume| dirs.source(volume))?,
            log_path: format!("{}.log", container.name),
            linux: Some(api::LinuxContainerConfig {
                security_context: Some(container.security_context(self.namespaces())?),
                ..Default::default()
            }),
            ..Default::default()
        })
    }
}

/// Where a test keeps what a volume of the DaemonSet names on a node.
pub struct VolumeSource {
    pub host_path: PathBuf,
    /// The DaemonSet mounts the host path at the same path in the container (the plugin on the
    /// host hands the agent host paths): the test's directory is mounted under its own path.
    pub same_path_inside: bool,
}

/// kubelet's translation of mountPropagation.
fn propagation(value: Option<&str>) -> Result<api::MountPropagation> {
    Ok(match value {
        None | Some("None") => api::MountPropagation::PropagationPrivate,
        Some("HostToContainer") => api::MountPropagation::PropagationHostToContainer,
        Some("Bidirectional") => api::MountPropagation::PropagationBidirectional,
        Some(other) => bail!("unknown mountPropagation {other:?} in {MANIFEST}"),
    })
}

/// kubelet's masked and read-only /proc and /sys paths for an unprivileged container.
const MASKED_PATHS: [&str; 11] = [
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];
const READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

impl Container {
    /// kubelet's CRI security context for this container in a pod of `namespaces`.
    // The deprecated string fields are what containerd 1.6 reads AppArmor from.
    #[allow(deprecated)]
    pub fn security_context(
        &self,
        namespaces: api::NamespaceOption,
    ) -> Result<api::LinuxContainerSecurityContext> {
        let context = &self.security_context;
        let profile = |profile: &Option<Profile>| -> Result<Option<api::SecurityProfile>> {
            let Some(profile) = profile else {
                return Ok(None);
            };
            let kind = match profile.kind.as_str() {
                "Unconfined" => api::security_profile::ProfileType::Unconfined,
                "RuntimeDefault" => api::security_profile::ProfileType::RuntimeDefault,
                other => bail!("profile type {other:?} in {MANIFEST} is not translated"),
            };
            Ok(Some(api::SecurityProfile {
                profile_type: kind.into(),
                localhost_ref: String::new(),
            }))
        };
        let seccomp = profile(&context.seccomp_profile)?;
        let apparmor = profile(&context.app_armor_profile)?;
        // kubelet fills the deprecated string fields too, for runtimes (containerd 1.6) that
        // read only those.
        let legacy = |profile: &Option<api::SecurityProfile>| match profile {
            Some(profile)
                if profile.profile_type() == api::security_profile::ProfileType::Unconfined =>
            {
                "unconfined".to_owned()
            }
            Some(_) => "runtime/default".to_owned(),
            None => String::new(),
        };
        let (masked_paths, readonly_paths) = if context.privileged {
            (Vec::new(), Vec::new())
        } else {
            (
                MASKED_PATHS.map(String::from).to_vec(),
                READONLY_PATHS.map(String::from).to_vec(),
            )
        };
        let mut add_capabilities = Vec::new();
        for name in &context.capabilities.add {
            if in_bounding_set(name)? {
                add_capabilities.push(name.clone());
            } else {
                // runc cannot grant it (capset fails) where the test's root lacks it, as CI's
                // root lacks SYS_RESOURCE; the manifest asks for it for older kernels.
                eprintln!(
                    "CAP_{name}, which {MANIFEST} adds, is not in this test's bounding set: \
                     the agent container runs without it"
                );
            }
        }
        Ok(api::LinuxContainerSecurityContext {
            capabilities: Some(api::Capability {
                add_capabilities,
                drop_capabilities: context.capabilities.drop.clone(),
                ..Default::default()
            }),
            privileged: context.privileged,
            namespace_options: Some(namespaces),
            run_as_user: context.run_as_user.map(|value| api::Int64Value { value }),
            readonly_rootfs: context.read_only_root_filesystem,
            no_new_privs: !context.allow_privilege_escalation.unwrap_or(true),
            masked_paths,
            readonly_paths,
            seccomp_profile_path: legacy(&seccomp),
            apparmor_profile: legacy(&apparmor),
            seccomp,
            apparmor,
            ..Default::default()
        })
    }

    /// The environment kubelet gives the container, `status.hostIP` being `host_ip`.
    pub fn envs(&self, host_ip: &str) -> Result<Vec<api::KeyValue>> {
        self.env
            .iter()
            .map(|var| {
                let value = match (&var.value, &var.value_from) {
                    (Some(value), _) => value.clone(),
                    (
                        None,
                        Some(EnvSource {
                            field_ref: Some(field),
                        }),
                    ) if field.field_path == "status.hostIP" => host_ip.to_owned(),
                    _ => bail!("env {} in {MANIFEST} is not translated", var.name),
                };
                Ok(api::KeyValue {
                    key: var.name.clone(),
                    value,
                })
            })
            .collect()
    }

    /// The command with kubelet's `$(VAR)` expansion from `envs`.
    pub fn expanded_command(&self, envs: &[api::KeyValue]) -> Vec<String> {
        self.command
            .iter()
            .map(|arg| {
                envs.iter().fold(arg.clone(), |arg, var| {
                    arg.replace(&format!("$({})", var.key), &var.value)
                })
            })
            .collect()
    }
}

/// Whether this process may grant capability `name` (`NET_ADMIN`): it is in its bounding set.
fn in_bounding_set(name: &str) -> Result<bool> {
    let capability: caps::Capability = format!("CAP_{}", name.to_ascii_uppercase())
        .parse()
        .with_context(|| format!("unknown capability {name:?} in {MANIFEST}"))?;
    caps::has_cap(None, caps::CapSet::Bounding, capability)
        .with_context(|| format!("reading the bounding set for CAP_{name}"))
}

/// A bind mount of `source` at `target` made shared, as systemd leaves /sys/fs/bpf on a node
/// (a HostToContainer mount needs a shared or slave source); unmounted on drop.
pub struct SharedBind {
    target: PathBuf,
}

impl SharedBind {
    pub fn new(source: &Path, target: &Path) -> Result<SharedBind> {
        std::fs::create_dir_all(target)?;
        mount(
            Some(source),
            target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .with_context(|| format!("bind-mounting {} at {}", source.display(), target.display()))?;
        let bind = SharedBind {
            target: target.to_owned(),
        };
        mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_SHARED,
            None::<&str>,
        )
        .with_context(|| format!("making {} shared", target.display()))?;
        Ok(bind)
    }

    pub fn path(&self) -> &Path {
        &self.target
    }
}

impl Drop for SharedBind {
    fn drop(&mut self) {
        if let Err(error) = umount2(&self.target, MntFlags::MNT_DETACH) {
            eprintln!("cleanup: unmounting {}: {error}", self.target.display());
        }
    }
}

/// The node's directories a test gives the DaemonSet's pod, as the volumes name them on a node.
#[derive(Debug, Clone)]
pub struct NodeDirs {
    /// /sys/fs/bpf: a [`SharedBind`] of the host's bpffs.
    pub bpffs: PathBuf,
    /// /run/redirector: the agent's socket and state.
    pub run: PathBuf,
    /// /run/containerd: the directory of the private containerd's socket.
    pub runtime: PathBuf,
    pub cni_conf_dir: PathBuf,
    pub cni_bin_dir: PathBuf,
    /// The `redirector` ConfigMap: a directory with deploy/agent.toml.
    pub config: PathBuf,
}

impl NodeDirs {
    /// The test's directory for `volume`; the node's own for the cgroup hierarchy and the netns
    /// directories (containerd 1.6 puts its netns files in /var/run/netns, the test's are in
    /// /run/netns).
    fn source(&self, volume: &Volume) -> Result<VolumeSource> {
        if let Some(config_map) = &volume.config_map {
            ensure!(
                config_map.name == "redirector",
                "ConfigMap {:?} in {MANIFEST} is not the kustomization's",
                config_map.name
            );
            return Ok(VolumeSource {
                host_path: self.config.clone(),
                same_path_inside: false,
            });
        }
        let host = volume.host_path.as_ref().with_context(|| {
            format!("volume {:?} is neither hostPath nor ConfigMap", volume.name)
        })?;
        let (host_path, same_path_inside) = match host.path.to_str() {
            Some(BPFFS_MOUNT) => (self.bpffs.clone(), false),
            Some("/sys/fs/cgroup" | "/run/netns" | "/var/run/netns") => {
                // Resolved (/var/run is a link to /run): containerd 1.6 checks the propagation
                // of the mount the path it is given is on, without following the link, and
                // finds the root mount, which is private where no systemd made it shared.
                let node_path = std::fs::canonicalize(&host.path)
                    .with_context(|| format!("resolving {}", host.path.display()))?;
                (node_path, false)
            }
            Some("/run/redirector") => (self.run.clone(), true),
            Some("/run/containerd") => (self.runtime.clone(), true),
            Some("/etc/cni/net.d") => (self.cni_conf_dir.clone(), false),
            Some("/opt/cni/bin") => (self.cni_bin_dir.clone(), false),
            _ => bail!(
                "{MANIFEST} mounts host path {} (volume {:?}), which this test has no private \
                 equivalent for",
                host.path.display(),
                volume.name
            ),
        };
        Ok(VolumeSource {
            host_path,
            same_path_inside,
        })
    }
}

/// The DaemonSet's pod, run by a test's containerd in a pod sandbox as kubelet runs it, with the
/// test's node directories for its volumes: its init containers (install-cni) each to a zero
/// exit, then the agent container. The pod is stopped and removed by containerd's drop (after
/// the test's other pods) or by [`AgentPod::stop`]; its cgroup goes with this value.
pub struct AgentPod {
    pub setup: AgentSetup,
    pub sandbox_id: String,
    pub container_id: String,
    /// The node's netns, where its metrics port is.
    node: PathBuf,
    dirs: NodeDirs,
    /// The pod's log directory, with a `NAME.log` per container.
    log_directory: PathBuf,
    _cgroup: Cgroup,
}

impl AgentPod {
    /// Runs the DaemonSet's pod and waits until the agent's /readyz says ready. `setup` names
    /// the test's pin root, pod cgroups, socket and state directory, which the containers see
    /// under the same paths; they and the cgroup layout are appended to each container's
    /// command as flags (and the runtime's socket to the agent's), where a node's agent.toml
    /// would carry them.
    pub fn start(
        containerd: &Containerd,
        cgroup_root: &Cgroup,
        node: &Netns,
        dirs: NodeDirs,
        spec: PodSpec,
        setup: AgentSetup,
    ) -> Result<AgentPod> {
        Self::launch(containerd, cgroup_root, node.path(), dirs, spec, setup)
    }

    fn launch(
        containerd: &Containerd,
        cgroup_root: &Cgroup,
        node: PathBuf,
        dirs: NodeDirs,
        spec: PodSpec,
        setup: AgentSetup,
    ) -> Result<AgentPod> {
        let template = pod_template()?;
        let host_ip = setup.metrics_addr.ip().to_string();
        let mut node_flags: Vec<String> = setup
            .node_args()
            .into_iter()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect();
        node_flags.extend([
            "--cgroup-root".to_owned(),
            setup.pod_cgroup_root.display().to_string(),
            "--cgroup-driver".to_owned(),
            "cgroupfs".to_owned(),
        ]);
        let init_configs = template
            .init_containers
            .iter()
            .map(|init| template.container_config(init, &host_ip, &dirs, &node_flags))
            .collect::<Result<Vec<_>>>()?;
        let mut agent_config = template.container_config(
            template.container("agent")?,
            &host_ip,
            &dirs,
            &node_flags,
        )?;
        agent_config.command.extend([
            "--runtime-endpoint".to_owned(),
            format!("unix://{}", containerd.socket().display()),
        ]);
        let metrics: SocketAddr = agent_config
            .command
            .iter()
            .skip_while(|arg| *arg != "--metrics-addr")
            .nth(1)
            .and_then(|addr| addr.parse().ok())
            .with_context(|| {
                format!(
                    "no --metrics-addr in the agent's command {:?}",
                    agent_config.command
                )
            })?;
        ensure!(
            metrics == setup.metrics_addr,
            "the agent listens on {metrics}, the test expects {}",
            setup.metrics_addr
        );
        let log_directory = spec.log_directory.clone();
        let sandbox = PodSandbox::run(containerd, cgroup_root, spec, template.namespaces())?;
        let started = run_containers(
            containerd,
            &sandbox,
            &log_directory,
            init_configs,
            agent_config,
        );
        let mut pod = AgentPod {
            setup,
            sandbox_id: sandbox.id.clone(),
            container_id: String::new(),
            node,
            dirs,
            log_directory,
            _cgroup: sandbox.cgroup,
        };
        let ready = started.and_then(|id| {
            pod.container_id = id;
            pod.wait_ready(containerd)
        });
        if let Err(error) = ready {
            // Before its cgroup goes, with this value.
            if let Err(cleanup) = containerd.remove_pod(&pod.sandbox_id) {
                eprintln!("cleanup: removing the agent pod: {cleanup:#}");
            }
            return Err(error);
        }
        Ok(pod)
    }

    /// Waits until /readyz says ready, failing at once if the container exits.
    fn wait_ready(&self, containerd: &Containerd) -> Result<()> {
        wait_for("the agent pod to be ready", READY_TIMEOUT, || {
            if let Some(exit_code) = exit_code(containerd, &self.container_id)? {
                bail!("the agent container exited {exit_code}");
            }
            Ok(matches!(
                http_get_in(&self.node, self.setup.metrics_addr, "/readyz"),
                Ok((200, _))
            )
            .then_some(()))
        })
        .with_context(|| self.log_tail())?;
        // Ready with a failed reconcile would hide an unreachable runtime socket.
        let status = self.setup.status()?;
        let report = status
            .agent
            .context("the agent's status has no agent report")?;
        ensure!(
            report.reconcile_error.is_none(),
            "the agent's reconcile against the runtime failed: {:?}\n{}",
            report.reconcile_error,
            self.log_tail()
        );
        Ok(())
    }

    /// The agent's log (stdout and stderr), last lines.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log_directory, "agent")
    }

    /// Stops the agent as kubelet deletes the pod: SIGTERM with the grace period, which it must
    /// exit 0 within; then the sandbox is stopped and removed.
    pub fn stop(&self, containerd: &Containerd) -> Result<()> {
        let id = &self.container_id;
        containerd
            .cri()
            .call(async |client| client.stop_container(id, GRACE.as_secs() as i64).await)?;
        let exit_code = exit_code(containerd, id)?;
        ensure!(
            exit_code == Some(0),
            "the agent exited {exit_code:?} on SIGTERM: {}",
            self.log_tail()
        );
        containerd.remove_pod(&self.sandbox_id)
    }

    /// Replaces this pod as a DaemonSet rollout does: it is stopped ([`AgentPod::stop`]),
    /// `while_down` runs, then pod `spec` runs from the image on the same node (init containers
    /// included) with the same setup, ready.
    pub fn roll(
        &mut self,
        containerd: &Containerd,
        cgroup_root: &Cgroup,
        spec: PodSpec,
        while_down: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        self.stop(containerd)?;
        while_down()?;
        *self = Self::launch(
            containerd,
            cgroup_root,
            self.node.clone(),
            self.dirs.clone(),
            spec,
            self.setup.clone(),
        )?;
        Ok(())
    }
}

/// The pod's init containers in order, each to a zero exit as kubelet requires before it goes
/// on, then the agent container; the agent's ID.
fn run_containers(
    containerd: &Containerd,
    sandbox: &PodSandbox,
    log_directory: &Path,
    init_configs: Vec<api::ContainerConfig>,
    agent_config: api::ContainerConfig,
) -> Result<String> {
    for config in init_configs {
        let name = config
            .metadata
            .as_ref()
            .map(|metadata| metadata.name.clone())
            .unwrap_or_default();
        let id = sandbox.start_container(containerd, config)?;
        let exited = wait_for(
            &format!("init container {name} to exit"),
            INIT_TIMEOUT,
            || exit_code(containerd, &id),
        )
        .with_context(|| log_tail(log_directory, &name))?;
        ensure!(
            exited == 0,
            "init container {name} exited {exited}: {}",
            log_tail(log_directory, &name)
        );
    }
    sandbox.start_container(containerd, agent_config)
}

/// Container `id`'s exit code once it has exited.
fn exit_code(containerd: &Containerd, id: &str) -> Result<Option<i32>> {
    let answer = containerd
        .cri()
        .call(async |client| client.container_status(id).await)?;
    let status = answer.status.context("no container status")?;
    Ok((status.state == api::ContainerState::ContainerExited as i32).then_some(status.exit_code))
}

/// The last lines (stdout and stderr) of container `name` of the pod logging to `log_directory`.
pub fn log_tail(log_directory: &Path, name: &str) -> String {
    let log = log_directory.join(format!("{name}.log"));
    let mut lines = Vec::new();
    for stream in ["stdout", "stderr"] {
        lines.extend(container_log(&log, stream).unwrap_or_default());
    }
    let tail = lines.len().saturating_sub(30);
    format!("{name} container log:\n{}", lines[tail..].join("\n"))
}
