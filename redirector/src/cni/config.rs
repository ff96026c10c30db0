//! The plugin's entry in the network config list, and the runtime's CNI_ARGS.
//!
//! ```json
//! { "type": "redirector-cni",
//!   "agentSocket": "/run/redirector/agent.sock",
//!   "cgroupRoot": "/sys/fs/cgroup",
//!   "cgroupDriver": "systemd",
//!   "skipNamespaces": ["kube-system"],
//!   "podSelection": "istio",
//!   "policy": { "proxy_port": 15001, "proxy_uids": [1337], "proxy_gids": [1337] },
//!   "logFile": "/var/log/redirector-cni.log", "logLevel": "info", "timeoutSeconds": 10 }
//! ```
//! Every key is optional; `policy` left out means the agent's node default. `skipNamespaces`
//! left out means `kube-system` (an empty list skips none).
use std::{collections::HashMap, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use super::cgroup::CgroupDriver;
use crate::{agent::api::DEFAULT_SOCKET, policy::Policy};

/// The CNI_ARGS key that skips one pod (`REDIRECTOR_SKIP=true`).
pub const SKIP_ARG: &str = "REDIRECTOR_SKIP";
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Namespaces whose pods are never captured unless configured otherwise.
pub const DEFAULT_SKIP_NAMESPACES: [&str; 1] = ["kube-system"];

/// Which pods the plugin captures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PodSelection {
    /// The pods Istio's sidecar injector prepared for a CNI, with their annotations' settings
    /// (the runtime must pass the pod's annotations).
    #[default]
    Istio,
    /// Every pod outside the skipped namespaces, with the node's policy.
    All,
}

impl PodSelection {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PluginConfig {
    #[serde(default = "default_socket")]
    pub agent_socket: PathBuf,
    /// Directory holding kubelet's kubepods hierarchy; None: the cgroup2 mount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_root: Option<PathBuf>,
    #[serde(default)]
    pub cgroup_driver: CgroupDriver,
    #[serde(default = "default_skip_namespaces")]
    pub skip_namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "PodSelection::is_default")]
    pub pod_selection: PodSelection,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Policy>,
    /// Log here (appended) instead of stderr.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_file: Option<PathBuf>,
    /// A tracing filter, e.g. `info` or `debug`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
}

fn default_socket() -> PathBuf {
    DEFAULT_SOCKET.into()
}

pub fn default_skip_namespaces() -> Vec<String> {
    DEFAULT_SKIP_NAMESPACES.map(String::from).to_vec()
}

impl PluginConfig {
    /// From the keys of the plugin's network config that the CNI spec does not define.
    pub fn from_keys(keys: &HashMap<String, serde_json::Value>) -> Result<Self, serde_json::Error> {
        let object: serde_json::Map<_, _> = keys
            .iter()
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        serde_json::from_value(serde_json::Value::Object(object))
    }

    pub fn timeout(&self) -> Duration {
        self.timeout_seconds
            .map_or(DEFAULT_TIMEOUT, Duration::from_secs)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CniArgsError {
    #[error("CNI_ARGS: {pair:?} is not KEY=VALUE")]
    NotAPair { pair: String },
    #[error("CNI_ARGS: {SKIP_ARG}={value:?} is not true or false")]
    Skip { value: String },
}

/// What the runtime tells about the pod in CNI_ARGS (`K8S_POD_NAMESPACE=…;K8S_POD_NAME=…;…`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
    pub infra_container_id: Option<String>,
    pub skip: bool,
}

impl CniArgs {
    /// Keys this plugin does not know are ignored, as runtimes pass several.
    pub fn parse(text: Option<&str>) -> Result<Self, CniArgsError> {
        let mut args = CniArgs::default();
        for pair in text
            .unwrap_or_default()
            .split(';')
            .filter(|p| !p.is_empty())
        {
            let (key, value) = pair.split_once('=').ok_or_else(|| CniArgsError::NotAPair {
                pair: pair.to_owned(),
            })?;
            let value = Some(value.to_owned()).filter(|v| !v.is_empty());
            match key {
                "K8S_POD_NAMESPACE" => args.pod_namespace = value,
                "K8S_POD_NAME" => args.pod_name = value,
                "K8S_POD_UID" => args.pod_uid = value,
                "K8S_POD_INFRA_CONTAINER_ID" => args.infra_container_id = value,
                SKIP_ARG => {
                    args.skip = match value.as_deref().map(str::to_ascii_lowercase).as_deref() {
                        Some("true" | "1") => true,
                        Some("false" | "0") | None => false,
                        Some(_) => {
                            return Err(CniArgsError::Skip {
                                value: value.unwrap_or_default(),
                            })
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn keys(value: serde_json::Value) -> HashMap<String, serde_json::Value> {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn plugin_config_defaults_and_full() {
        let empty = PluginConfig::from_keys(&HashMap::new()).unwrap();
        assert_eq!(empty.agent_socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(empty.cgroup_driver, CgroupDriver::Systemd);
        assert_eq!(empty.skip_namespaces, ["kube-system"]);
        assert_eq!(empty.pod_selection, PodSelection::Istio);
        assert_eq!(empty.policy, None);
        assert_eq!(empty.timeout(), DEFAULT_TIMEOUT);

        let full = PluginConfig::from_keys(&keys(json!({
            "agentSocket": "/run/x.sock",
            "cgroupRoot": "/sys/fs/cgroup",
            "cgroupDriver": "cgroupfs",
            "skipNamespaces": [],
            "podSelection": "all",
            "policy": {"proxy_port": 15006},
            "logFile": "/var/log/x.log",
            "logLevel": "debug",
            "timeoutSeconds": 3
        })))
        .unwrap();
        assert_eq!(full.cgroup_driver, CgroupDriver::Cgroupfs);
        assert!(full.skip_namespaces.is_empty(), "an empty list skips none");
        assert_eq!(full.pod_selection, PodSelection::All);
        assert_eq!(full.policy.as_ref().unwrap().proxy_port, 15006);
        assert_eq!(full.timeout(), Duration::from_secs(3));
    }

    #[test]
    fn the_shipped_conflist_example_chains_a_valid_entry_last() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/10-containerd-net.conflist.example");
        let conflist: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let mut entry = conflist["plugins"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()
            .clone();
        let keys = entry.as_object_mut().unwrap();
        assert_eq!(keys.remove("type"), Some(json!(crate::cni::PLUGIN_NAME)));
        assert_eq!(
            keys.remove("capabilities"),
            Some(json!({crate::cni::annotations::CAPABILITY: true}))
        );
        let config = PluginConfig::from_keys(&keys.clone().into_iter().collect()).unwrap();
        assert_eq!(config.skip_namespaces, ["kube-system"]);
        assert_eq!(config.pod_selection, PodSelection::Istio);
        assert_eq!(config.policy, Some(Policy::default()));
    }

    #[test]
    fn bad_plugin_config_names_the_key() {
        for (bad, named) in [
            (json!({"agentSockett": "/x"}), "agentSockett"),
            (json!({"cgroupDriver": "runc"}), "runc"),
            (json!({"policy": {"proxy_port": 0}}), "invalid port"),
            (json!({"skipNamespaces": "kube-system"}), "sequence"),
            (json!({"podSelection": "injected"}), "injected"),
        ] {
            let message = PluginConfig::from_keys(&keys(bad.clone()))
                .unwrap_err()
                .to_string();
            assert!(message.contains(named), "{bad}: {message}");
        }
    }

    #[test]
    fn cni_args_from_a_kubernetes_runtime() {
        let text = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;\
                    K8S_POD_INFRA_CONTAINER_ID=abc123;K8S_POD_UID=0b8f-11";
        assert_eq!(
            CniArgs::parse(Some(text)),
            Ok(CniArgs {
                pod_namespace: Some("default".into()),
                pod_name: Some("web-0".into()),
                pod_uid: Some("0b8f-11".into()),
                infra_container_id: Some("abc123".into()),
                skip: false,
            })
        );
        assert_eq!(CniArgs::parse(None), Ok(CniArgs::default()));
        assert!(CniArgs::parse(Some("REDIRECTOR_SKIP=true")).unwrap().skip);
        assert!(!CniArgs::parse(Some("REDIRECTOR_SKIP=0")).unwrap().skip);
        assert_eq!(
            CniArgs::parse(Some("REDIRECTOR_SKIP=maybe")),
            Err(CniArgsError::Skip {
                value: "maybe".into()
            })
        );
        assert_eq!(
            CniArgs::parse(Some("K8S_POD_UID")),
            Err(CniArgsError::NotAPair {
                pair: "K8S_POD_UID".into()
            })
        );
    }
}
