//! Node-wide settings: a TOML file (`--config`), overridden by flags and their environment
//! variables, then defaults. Unknown keys and bad values are refused with the key named.
//!
//! ```toml
//! bpffs = "/sys/fs/bpf/redirector"
//! socket = "/run/redirector/agent.sock"
//! state_dir = "/run/redirector/pods"
//! metrics_addr = "127.0.0.1:15099"
//! log_format = "json"                 # or "text"
//! log_connections = false             # the programs' per-connection lines, at debug (costly)
//! reconcile_interval_seconds = 60
//! cgroup_root = "/sys/fs/cgroup"      # where kubelet's kubepods hierarchy lives
//! cgroup_driver = "systemd"           # or "cgroupfs", as kubelet's cgroupDriver
//! skip_namespaces = ["kube-system"]   # the default; [] captures pods of every namespace
//! pod_selection = "istio"             # or "all": every pod, without reading annotations
//! cni_bin_dir = "/opt/cni/bin"
//! cni_conf_dir = "/etc/cni/net.d"
//! chain_cni = false                   # watch cni_conf_dir and keep redirector-cni chained
//! pod_cgroup_roots = []               # pod roots besides kubelet's (see pod_cgroup.rs)
//! per_pod_metrics = 0                 # per-pod series for the N busiest pods (0: none)
//! operation_deadline_seconds = 60     # /healthz fails while an operation runs longer
//! sweep_delay_ms = 1000               # departed pods' policy sets removed this long after
//! runtime_endpoint = "unix:///run/containerd/containerd.sock"  # the CRI socket (see runtime.rs)
//!
//! [policy]                            # for pods enrolled without one
//! proxy_port = 15001
//! proxy_uids = [1337]
//! proxy_gids = [1337]
//! ```
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use clap::ValueEnum;
use serde::Deserialize;

use super::{
    api::DEFAULT_SOCKET,
    client::Target,
    node::{Node, PendingDeletes},
    pod_cgroup::PodCgroups,
    store::DEFAULT_STATE_DIR,
};
use crate::{
    cgroup::{self, CgroupError},
    cni::{
        cgroup::CgroupDriver,
        config::{default_skip_namespaces, PodSelection},
    },
    loader::LoadOptions,
    pins::{PinRoot, DEFAULT_ROOT},
    policy::Policy,
};

pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:15099";
pub const DEFAULT_RECONCILE_INTERVAL: Duration = Duration::from_secs(60);
pub const DEFAULT_CNI_BIN_DIR: &str = "/opt/cni/bin";
pub const DEFAULT_CNI_CONF_DIR: &str = "/etc/cni/net.d";
pub const DEFAULT_OPERATION_DEADLINE: Duration = Duration::from_secs(60);
/// How long after a pod is unenrolled its policy sets are removed, in one walk of the maps for
/// every pod unenrolled meanwhile (a walk takes tens of ms with a thousand pods; each CNI DEL
/// made one, with the node's lock held, before).
pub const DEFAULT_SWEEP_DELAY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The parser's message quotes the offending line and names the key.
    #[error("config file {path}: {error}")]
    Parse {
        path: PathBuf,
        error: Box<toml::de::Error>,
    },
    #[error("config file {path}: {key} must be at least 1")]
    AtLeastOne { path: PathBuf, key: &'static str },
    #[error("cgroup_root: {0}")]
    CgroupRoot(#[source] CgroupError),
    #[error("runtime_endpoint {endpoint:?} is not a unix socket: give unix:///path/to/socket or an absolute path")]
    RuntimeEndpoint { endpoint: String },
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The config file, as written (every key optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub bpffs: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub metrics_addr: Option<SocketAddr>,
    pub log_format: Option<LogFormat>,
    pub log_connections: Option<bool>,
    pub reconcile_interval_seconds: Option<u64>,
    pub cgroup_root: Option<PathBuf>,
    pub cgroup_driver: Option<CgroupDriver>,
    pub skip_namespaces: Option<Vec<String>>,
    pub pod_selection: Option<PodSelection>,
    pub cni_bin_dir: Option<PathBuf>,
    pub cni_conf_dir: Option<PathBuf>,
    pub chain_cni: Option<bool>,
    pub pod_cgroup_roots: Option<Vec<PathBuf>>,
    pub per_pod_metrics: Option<usize>,
    pub operation_deadline_seconds: Option<u64>,
    pub sweep_delay_ms: Option<u64>,
    pub max_connections: Option<u32>,
    pub runtime_endpoint: Option<String>,
    pub policy: Option<Policy>,
}

impl ConfigFile {
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let file: ConfigFile = toml::from_str(text).map_err(|error| ConfigError::Parse {
            path: path.to_owned(),
            error: Box::new(error),
        })?;
        for (key, value) in [
            (
                "reconcile_interval_seconds",
                file.reconcile_interval_seconds,
            ),
            (
                "operation_deadline_seconds",
                file.operation_deadline_seconds,
            ),
        ] {
            if value == Some(0) {
                return Err(ConfigError::AtLeastOne {
                    path: path.to_owned(),
                    key,
                });
            }
        }
        Ok(file)
    }

    /// Reads `path`, or nothing (all defaults) when there is no config file.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }
}

/// Where the node's state lives; global flags of every `redirector` command.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct NodeFlags {
    /// bpffs directory that holds every pin redirector makes [default: /sys/fs/bpf/redirector].
    #[arg(long, global = true, env = "REDIRECTOR_BPFFS")]
    pub bpffs: Option<PathBuf>,
    /// The agent's API socket; commands use the agent when one listens there
    /// [default: /run/redirector/agent.sock].
    #[arg(long, global = true, env = "REDIRECTOR_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Directory of the pod state files [default: /run/redirector/pods].
    #[arg(long, global = true, env = "REDIRECTOR_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// A cgroup whose children may be enrolled as pods, besides kubelet's hierarchies
    /// (repeatable; for tests and unusual layouts).
    #[arg(long, global = true)]
    pub pod_cgroup_root: Vec<PathBuf>,
    /// Captured connections that may be in the middle of their handshake at once, node-wide
    /// (the handshake map's capacity; set when the maps are created) [default: 65536].
    #[arg(long, global = true, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: Option<u32>,
}

impl NodeFlags {
    /// The agent if one runs, this node's state otherwise.
    pub fn target(&self) -> Target {
        let socket = pick(&self.socket, &None, DEFAULT_SOCKET);
        let mut node = Node::new(
            PinRoot::new(pick(&self.bpffs, &None, DEFAULT_ROOT)),
            pick(&self.state_dir, &None, DEFAULT_STATE_DIR),
        );
        node.pod_cgroups.extra = self.pod_cgroup_root.clone();
        node.pending = Some(PendingDeletes::beside(&socket));
        node.load = load_options(self.max_connections);
        Target {
            socket,
            bpffs: self.bpffs.clone(),
            node,
        }
    }
}

/// Settings read from the config file that flags can override.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ConfigFlags {
    /// TOML file with node-wide settings (flags override it).
    #[arg(long, env = "REDIRECTOR_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory that holds kubelet's kubepods cgroup hierarchy [default: the cgroup2 mount].
    #[arg(long)]
    pub cgroup_root: Option<PathBuf>,
    /// kubelet's cgroup driver, which decides the pod cgroups' names [default: systemd].
    #[arg(long, value_enum)]
    pub cgroup_driver: Option<CgroupDriver>,
}

/// The agent's flags.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct AgentFlags {
    #[command(flatten)]
    pub config: ConfigFlags,
    /// Address of /healthz, /readyz and /metrics [default: 127.0.0.1:15099].
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Log lines as text or JSON (the level comes from RUST_LOG) [default: text].
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Have the programs log each connection decision while the agent runs, into the agent's
    /// log at debug level (costly: for debugging).
    #[arg(long)]
    pub log_connections: bool,
    /// Seconds between checks for pods whose cgroup or netns is gone [default: 60].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub reconcile_interval_seconds: Option<u64>,
    /// Export per-pod series for the N pods with the most connections [default: 0, none].
    #[arg(long)]
    pub per_pod_metrics: Option<usize>,
    /// /healthz fails while a request or pass runs longer than this [default: 60].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub operation_deadline_seconds: Option<u64>,
    /// Milliseconds after a pod is unenrolled until its policy sets are removed, in one walk
    /// of the maps for every pod unenrolled meanwhile [default: 1000].
    #[arg(long)]
    pub sweep_delay_ms: Option<u64>,
    /// Watch the CNI conf dir and keep redirector-cni chained in the runtime's network config
    /// (primary CNIs rewrite it on restart) [default: off].
    #[arg(long)]
    pub chain_cni: bool,
    /// The container runtime's CRI socket (unix:///run/containerd/containerd.sock, or
    /// unix:///var/run/crio/crio.sock): reconcile then asks the runtime which pods run, and
    /// enrolls injected pods found running uncaptured [default: none, the node's files alone].
    #[arg(long)]
    pub runtime_endpoint: Option<String>,
}

/// Settings shared by the agent and the CNI installer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    pub bpffs: PathBuf,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub cgroup_root: PathBuf,
    pub cgroup_driver: CgroupDriver,
    pub skip_namespaces: Vec<String>,
    pub pod_selection: PodSelection,
    pub cni_bin_dir: PathBuf,
    pub cni_conf_dir: PathBuf,
    pub pod_cgroup_roots: Vec<PathBuf>,
    pub load: LoadOptions,
    pub default_policy: Policy,
}

impl NodeConfig {
    /// Flags first, then the file, then defaults.
    pub fn resolve(
        file: &ConfigFile,
        node: &NodeFlags,
        flags: &ConfigFlags,
    ) -> Result<Self, ConfigError> {
        let cgroup_root = match flags.cgroup_root.clone().or(file.cgroup_root.clone()) {
            Some(root) => root,
            None => cgroup::cgroup2_mount().map_err(ConfigError::CgroupRoot)?,
        };
        Ok(Self {
            bpffs: pick(&node.bpffs, &file.bpffs, DEFAULT_ROOT),
            socket: pick(&node.socket, &file.socket, DEFAULT_SOCKET),
            state_dir: pick(&node.state_dir, &file.state_dir, DEFAULT_STATE_DIR),
            cgroup_root,
            cgroup_driver: flags
                .cgroup_driver
                .or(file.cgroup_driver)
                .unwrap_or_default(),
            skip_namespaces: file
                .skip_namespaces
                .clone()
                .unwrap_or_else(default_skip_namespaces),
            pod_selection: file.pod_selection.unwrap_or_default(),
            cni_bin_dir: pick(&None, &file.cni_bin_dir, DEFAULT_CNI_BIN_DIR),
            cni_conf_dir: pick(&None, &file.cni_conf_dir, DEFAULT_CNI_CONF_DIR),
            pod_cgroup_roots: match node.pod_cgroup_root.as_slice() {
                [] => file.pod_cgroup_roots.clone().unwrap_or_default(),
                flags => flags.to_vec(),
            },
            load: load_options(node.max_connections.or(file.max_connections)),
            default_policy: file.policy.clone().unwrap_or_default(),
        })
    }

    pub fn node(&self) -> Node {
        let mut node = Node::new(PinRoot::new(&self.bpffs), &self.state_dir);
        node.pod_cgroups = PodCgroups {
            cgroup_root: Some(self.cgroup_root.clone()),
            extra: self.pod_cgroup_roots.clone(),
        };
        node.pending = Some(PendingDeletes::beside(&self.socket));
        node.load = self.load;
        node.departed = Some(Arc::default());
        node
    }
}

fn load_options(max_connections: Option<u32>) -> LoadOptions {
    let mut options = LoadOptions::default();
    if let Some(capacity) = max_connections {
        options.handshake_capacity = capacity;
    }
    options
}

/// Everything the agent runs with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentConfig {
    pub node: NodeConfig,
    pub metrics_addr: SocketAddr,
    pub log_format: LogFormat,
    pub log_connections: bool,
    pub reconcile_interval: Duration,
    pub per_pod_metrics: usize,
    pub operation_deadline: Duration,
    pub sweep_delay: Duration,
    pub chain_cni: bool,
    /// The CRI socket reconcile asks (None: the node's files alone).
    pub runtime_endpoint: Option<PathBuf>,
}

impl AgentConfig {
    pub fn resolve(node: &NodeFlags, flags: &AgentFlags) -> Result<Self, ConfigError> {
        let file = ConfigFile::load(flags.config.config.as_deref())?;
        Self::resolve_with(&file, node, flags)
    }

    fn resolve_with(
        file: &ConfigFile,
        node: &NodeFlags,
        flags: &AgentFlags,
    ) -> Result<Self, ConfigError> {
        Ok(Self {
            node: NodeConfig::resolve(file, node, &flags.config)?,
            metrics_addr: flags
                .metrics_addr
                .or(file.metrics_addr)
                .unwrap_or_else(|| DEFAULT_METRICS_ADDR.parse().expect("a valid address")),
            log_format: flags.log_format.or(file.log_format).unwrap_or_default(),
            log_connections: flags.log_connections || file.log_connections.unwrap_or(false),
            reconcile_interval: flags
                .reconcile_interval_seconds
                .or(file.reconcile_interval_seconds)
                .map_or(DEFAULT_RECONCILE_INTERVAL, Duration::from_secs),
            per_pod_metrics: flags.per_pod_metrics.or(file.per_pod_metrics).unwrap_or(0),
            operation_deadline: flags
                .operation_deadline_seconds
                .or(file.operation_deadline_seconds)
                .map_or(DEFAULT_OPERATION_DEADLINE, Duration::from_secs),
            sweep_delay: flags
                .sweep_delay_ms
                .or(file.sweep_delay_ms)
                .map_or(DEFAULT_SWEEP_DELAY, Duration::from_millis),
            chain_cni: flags.chain_cni || file.chain_cni.unwrap_or(false),
            runtime_endpoint: flags
                .runtime_endpoint
                .as_ref()
                .or(file.runtime_endpoint.as_ref())
                .map(|endpoint| runtime_socket(endpoint))
                .transpose()?,
        })
    }
}

/// The socket of a CRI endpoint as kubelet and crictl write it (`unix:///run/x.sock`), or as
/// a bare absolute path.
fn runtime_socket(endpoint: &str) -> Result<PathBuf, ConfigError> {
    let path = Path::new(endpoint.strip_prefix("unix://").unwrap_or(endpoint));
    if path.is_absolute() {
        Ok(path.to_owned())
    } else {
        Err(ConfigError::RuntimeEndpoint {
            endpoint: endpoint.to_owned(),
        })
    }
}

fn pick(flag: &Option<PathBuf>, file: &Option<PathBuf>, default: &str) -> PathBuf {
    flag.clone()
        .or_else(|| file.clone())
        .unwrap_or_else(|| default.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ConfigFile, String> {
        ConfigFile::parse(Path::new("agent.toml"), text).map_err(|e| e.to_string())
    }

    const FULL: &str = r#"
        bpffs = "/sys/fs/bpf/rd"
        socket = "/run/rd/agent.sock"
        state_dir = "/run/rd/pods"
        metrics_addr = "0.0.0.0:9100"
        log_format = "json"
        log_connections = true
        reconcile_interval_seconds = 5
        cgroup_root = "/sys/fs/cgroup"
        cgroup_driver = "cgroupfs"
        skip_namespaces = ["kube-system", "istio-system"]
        pod_selection = "all"
        cni_bin_dir = "/host/opt/cni/bin"
        cni_conf_dir = "/host/etc/cni/net.d"
        runtime_endpoint = "unix:///run/containerd/containerd.sock"

        [policy]
        proxy_port = 15006
        proxy_uids = [1337, 0]
    "#;

    #[test]
    fn a_full_file_is_read_and_flags_override_it() {
        let file = parse(FULL).unwrap();
        let flags = AgentFlags {
            metrics_addr: Some("127.0.0.1:1234".parse().unwrap()),
            config: ConfigFlags {
                cgroup_driver: Some(CgroupDriver::Systemd),
                ..ConfigFlags::default()
            },
            ..AgentFlags::default()
        };
        let node = NodeFlags {
            socket: Some("/tmp/s.sock".into()),
            ..NodeFlags::default()
        };
        let config = AgentConfig::resolve_with(&file, &node, &flags).unwrap();
        assert_eq!(config.metrics_addr, "127.0.0.1:1234".parse().unwrap());
        assert_eq!(config.log_format, LogFormat::Json);
        assert!(config.log_connections);
        assert_eq!(config.reconcile_interval, Duration::from_secs(5));
        assert_eq!(
            config.runtime_endpoint.as_deref(),
            Some(Path::new("/run/containerd/containerd.sock"))
        );
        let node = config.node;
        assert_eq!(node.socket, Path::new("/tmp/s.sock"));
        assert_eq!(node.bpffs, Path::new("/sys/fs/bpf/rd"));
        assert_eq!(node.state_dir, Path::new("/run/rd/pods"));
        assert_eq!(node.cgroup_driver, CgroupDriver::Systemd);
        assert_eq!(node.cgroup_root, Path::new("/sys/fs/cgroup"));
        assert_eq!(node.skip_namespaces, ["kube-system", "istio-system"]);
        assert_eq!(node.pod_selection, PodSelection::All);
        assert_eq!(node.cni_conf_dir, Path::new("/host/etc/cni/net.d"));
        assert_eq!(
            node.default_policy,
            Policy {
                proxy_port: 15006,
                proxy_uids: vec![1337, 0],
                ..Policy::default()
            }
        );
    }

    #[test]
    fn an_empty_file_means_defaults() {
        let file = parse("").unwrap();
        let flags = AgentFlags {
            config: ConfigFlags {
                cgroup_root: Some("/sys/fs/cgroup".into()),
                ..ConfigFlags::default()
            },
            ..AgentFlags::default()
        };
        let config = AgentConfig::resolve_with(&file, &NodeFlags::default(), &flags).unwrap();
        assert_eq!(config.node.bpffs, Path::new(DEFAULT_ROOT));
        assert_eq!(config.node.socket, Path::new(DEFAULT_SOCKET));
        assert_eq!(config.node.state_dir, Path::new(DEFAULT_STATE_DIR));
        assert_eq!(config.node.cgroup_driver, CgroupDriver::Systemd);
        assert_eq!(config.node.default_policy, Policy::default());
        assert_eq!(config.node.skip_namespaces, ["kube-system"]);
        assert_eq!(config.node.pod_selection, PodSelection::Istio);
        assert_eq!(config.metrics_addr.to_string(), DEFAULT_METRICS_ADDR);
        assert_eq!(config.reconcile_interval, DEFAULT_RECONCILE_INTERVAL);
        assert_eq!(config.runtime_endpoint, None);
    }

    #[test]
    fn the_runtime_endpoint_is_a_unix_socket_and_the_flag_wins() {
        let flags = |endpoint: &str| AgentFlags {
            config: ConfigFlags {
                cgroup_root: Some("/sys/fs/cgroup".into()),
                ..ConfigFlags::default()
            },
            runtime_endpoint: Some(endpoint.into()),
            ..AgentFlags::default()
        };
        let file = parse("runtime_endpoint = \"unix:///run/containerd/containerd.sock\"").unwrap();
        let resolve = |endpoint| {
            AgentConfig::resolve_with(&file, &NodeFlags::default(), &flags(endpoint))
                .map(|config| config.runtime_endpoint)
                .map_err(|e| e.to_string())
        };
        assert_eq!(
            resolve("unix:///var/run/crio/crio.sock"),
            Ok(Some("/var/run/crio/crio.sock".into()))
        );
        assert_eq!(resolve("/run/k3s.sock"), Ok(Some("/run/k3s.sock".into())));
        for bad in ["tcp://10.0.0.1:1234", "unix://run/x.sock", "x.sock"] {
            let message = resolve(bad).unwrap_err();
            assert!(message.contains("runtime_endpoint"), "{bad}: {message}");
        }
    }

    #[test]
    fn the_shipped_config_file_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.toml");
        let file = ConfigFile::load(Some(&path)).unwrap();
        assert_eq!(file.cgroup_driver, Some(CgroupDriver::Systemd));
        assert_eq!(file.pod_selection, Some(PodSelection::Istio));
        // What the sidecar injector's istio-iptables line gives (its dry-run golden file).
        let injector = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/testdata/dry-run/sidecar-injector.json");
        let injector: Policy =
            serde_json::from_str(&std::fs::read_to_string(injector).unwrap()).unwrap();
        assert_eq!(file.policy, Some(injector));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        for (text, named) in [
            ("sockt = \"/x\"", "sockt"),
            ("[policy]\nproxy_prot = 1", "proxy_prot"),
            ("[polcy]\nproxy_port = 1", "polcy"),
            ("metrics_addr = \"localhost\"", "metrics_addr"),
            ("log_format = \"yaml\"", "log_format"),
            ("log_connections = \"yes\"", "log_connections"),
            ("cgroup_driver = \"runc\"", "cgroup_driver"),
            (
                "reconcile_interval_seconds = 0",
                "reconcile_interval_seconds",
            ),
            (
                "reconcile_interval_seconds = -5",
                "reconcile_interval_seconds",
            ),
            (
                "operation_deadline_seconds = 0",
                "operation_deadline_seconds",
            ),
            ("pod_cgroup_roots = \"/x\"", "pod_cgroup_roots"),
            ("skip_namespaces = \"kube-system\"", "skip_namespaces"),
            ("pod_selection = \"some\"", "pod_selection"),
            ("[policy]\nproxy_port = 0", "proxy_port"),
            ("[policy]\nproxy_uids = [\"a\"]", "proxy_uids"),
            ("bpffs = 3", "bpffs"),
        ] {
            let message = parse(text).unwrap_err();
            assert!(message.contains(named), "{text:?}: {message}");
            assert!(message.contains("agent.toml"), "{text:?}: {message}");
        }
    }
}
