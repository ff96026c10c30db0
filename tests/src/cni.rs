//! A container runtime's side of CNI, as libcni does it: each plugin of a conflist is executed
//! with the CNI_* environment and its network config on stdin (with `name`, `cniVersion` and the
//! previous plugin's result injected), inside a "node" network namespace the test owns, so the
//! bridge and every address it hands out live in the test's namespaces only.
//!
//! Also Kubernetes-style pods: a netns and a pod cgroup laid out as kubelet does for either
//! cgroup driver (written independently of the product's own resolution, as an oracle).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::cgroup::Cgroup;
use crate::netns::Netns;
use crate::process::{binary, Child, Output};

/// Where Debian's containernetworking-plugins installs the reference plugins.
pub const CNI_PLUGIN_DIR: &str = "/usr/lib/cni";
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);

/// The CRI capability under which containerd and CRI-O pass a pod's annotations to the plugins
/// that declare it.
pub const POD_ANNOTATIONS: &str = "io.kubernetes.cri.pod-annotations";

/// What a runtime tells a plugin about the container besides the config.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub container_id: String,
    pub netns: PathBuf,
    pub ifname: String,
    /// CNI_ARGS.
    pub args: String,
    /// libcni's CapabilityArgs: each goes into `runtimeConfig` of the plugins that declare it.
    pub capability_args: Map<String, Value>,
}

/// A plugin's error result (spec: "Error").
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CniError {
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(default)]
    pub details: String,
}

/// Drives the plugins of one conflist.
#[derive(Debug, Clone)]
pub struct CniRuntime {
    node: String,
    pub conflist: Value,
    cni_path: String,
}

impl CniRuntime {
    /// Plugins are looked up in [`CNI_PLUGIN_DIR`] and next to the built `redirector-cni`.
    pub fn new(node: &Netns, conflist: Value) -> Result<CniRuntime> {
        ensure!(
            Path::new(CNI_PLUGIN_DIR).join("bridge").is_file(),
            "the reference CNI plugins are not in {CNI_PLUGIN_DIR}: install Debian's \
             containernetworking-plugins (`cargo xtask setup` does)"
        );
        let ours = binary("redirector-cni")?;
        let ours_dir = ours.parent().context("binary without a directory")?;
        Ok(CniRuntime {
            node: node.name().to_owned(),
            conflist,
            cni_path: format!("{CNI_PLUGIN_DIR}:{}", ours_dir.display()),
        })
    }

    pub fn plugins(&self) -> Vec<Value> {
        self.conflist["plugins"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// A plugin's config as the runtime hands it over: the list's name and version, then the
    /// plugin's keys, then `runtimeConfig` (as libcni injects it: the capability arguments the
    /// plugin declares, the key left out when there are none), then `prevResult`.
    pub fn plugin_config(
        &self,
        plugin: &Value,
        capability_args: &Map<String, Value>,
        previous: Option<&Value>,
    ) -> Value {
        let mut config = json!({
            "cniVersion": self.conflist["cniVersion"],
            "name": self.conflist["name"],
        });
        if let (Some(config), Some(keys)) = (config.as_object_mut(), plugin.as_object()) {
            config.extend(keys.clone());
            let runtime_config: Map<String, Value> = capability_args
                .iter()
                .filter(|(name, _)| plugin["capabilities"][name.as_str()] == json!(true))
                .map(|(name, value)| (name.clone(), value.clone()))
                .collect();
            if !runtime_config.is_empty() {
                config.insert("runtimeConfig".into(), Value::Object(runtime_config));
            }
            if let Some(previous) = previous {
                config.insert("prevResult".into(), previous.clone());
            }
        }
        config
    }

    fn locate(&self, plugin_type: &str) -> Result<PathBuf> {
        self.cni_path
            .split(':')
            .map(|dir| Path::new(dir).join(plugin_type))
            .find(|path| path.is_file())
            .with_context(|| format!("no plugin {plugin_type:?} in CNI_PATH {}", self.cni_path))
    }

    /// Runs one plugin: `env` are the CNI_* variables besides CNI_COMMAND and CNI_PATH.
    pub fn exec(
        &self,
        plugin_type: &str,
        command: &str,
        env: &[(&str, String)],
        stdin: Vec<u8>,
    ) -> Result<Output> {
        let mut exec = Command::new(binary("e2e-helper")?);
        exec.args(["exec", "--netns", &self.node, "--"])
            .arg(self.locate(plugin_type)?)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_PATH", &self.cni_path);
        for (key, value) in env {
            exec.env(key, value);
        }
        let label = format!("{plugin_type} {command}");
        Child::spawn_with_input(&label, exec, Some(stdin))?.wait_exit(PLUGIN_TIMEOUT)
    }

    /// Runs one plugin of the list for `attachment`.
    pub fn exec_plugin(
        &self,
        plugin: &Value,
        command: &str,
        attachment: &Attachment,
        previous: Option<&Value>,
    ) -> Result<Output> {
        let plugin_type = plugin["type"].as_str().context("plugin without a type")?;
        let config = self.plugin_config(plugin, &attachment.capability_args, previous);
        self.exec(
            plugin_type,
            command,
            &attachment.env(),
            serde_json::to_vec(&config)?,
        )
    }

    /// ADD through the whole chain; the result of each plugin, in order (the last is what the
    /// runtime keeps).
    pub fn add(&self, attachment: &Attachment) -> Result<Vec<Value>> {
        let mut results: Vec<Value> = Vec::new();
        for plugin in self.plugins() {
            let output = self.exec_plugin(&plugin, "ADD", attachment, results.last())?;
            ensure!(
                output.success(),
                "ADD of {} failed ({}): stdout {} stderr {}",
                plugin["type"],
                output.status,
                output.stdout,
                output.stderr
            );
            results.push(serde_json::from_str(&output.stdout).with_context(|| {
                format!("ADD result of {}: {:?}", plugin["type"], output.stdout)
            })?);
        }
        Ok(results)
    }

    /// DEL through the chain in reverse, each given the cached result of the ADD.
    pub fn del(&self, attachment: &Attachment, result: &Value) -> Result<()> {
        for plugin in self.plugins().iter().rev() {
            let output = self.exec_plugin(plugin, "DEL", attachment, Some(result))?;
            ensure!(
                output.success() && output.stdout.trim().is_empty(),
                "DEL of {} failed ({}) or printed something: stdout {:?} stderr {}",
                plugin["type"],
                output.status,
                output.stdout,
                output.stderr
            );
        }
        Ok(())
    }
}

impl Attachment {
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("CNI_CONTAINERID", self.container_id.clone()),
            ("CNI_NETNS", self.netns.display().to_string()),
            ("CNI_IFNAME", self.ifname.clone()),
            ("CNI_ARGS", self.args.clone()),
        ]
    }
}

/// A failed plugin's stdout must be exactly one error object, and the exit status non-zero.
pub fn cni_error(output: &Output) -> Result<CniError> {
    ensure!(
        !output.success(),
        "`{}` succeeded: {}",
        output.command_line,
        output.stdout
    );
    serde_json::from_str(&output.stdout).with_context(|| {
        format!(
            "stdout of the failed `{}` is not one error object: {:?} (stderr {:?})",
            output.command_line, output.stdout, output.stderr
        )
    })
}

/// A conflist `[bridge + host-local, redirector-cni]`: the bridge `bridge` in the node netns is
/// the gateway of `10.201.<subnet>.0/24`; host-local keeps its leases in `ipam_dir`.
pub fn bridge_chain(
    name: &str,
    cni_version: &str,
    bridge: &str,
    subnet: u8,
    ipam_dir: &Path,
    redirector: Value,
) -> Value {
    json!({
        "cniVersion": cni_version,
        "name": name,
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "subnet": format!("10.201.{subnet}.0/24"),
                    "dataDir": ipam_dir,
                }
            },
            redirector
        ]
    })
}

/// kubelet's cgroup drivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupDriver {
    Cgroupfs,
    Systemd,
}

impl CgroupDriver {
    pub fn name(self) -> &'static str {
        match self {
            Self::Cgroupfs => "cgroupfs",
            Self::Systemd => "systemd",
        }
    }
}

/// Kubernetes QoS classes (which decide the pod cgroup's parent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

/// Where kubelet puts the cgroup of pod `uid`, relative to its cgroup root.
pub fn pod_cgroup_path(driver: CgroupDriver, qos: Qos, uid: &str) -> PathBuf {
    let qos_name = match qos {
        Qos::Guaranteed => None,
        Qos::Burstable => Some("burstable"),
        Qos::BestEffort => Some("besteffort"),
    };
    let escaped = uid.replace('-', "_");
    PathBuf::from(match (driver, qos_name) {
        (CgroupDriver::Cgroupfs, None) => format!("kubepods/pod{uid}"),
        (CgroupDriver::Cgroupfs, Some(q)) => format!("kubepods/{q}/pod{uid}"),
        (CgroupDriver::Systemd, None) => format!("kubepods.slice/kubepods-pod{escaped}.slice"),
        (CgroupDriver::Systemd, Some(q)) => {
            format!("kubepods.slice/kubepods-{q}.slice/kubepods-{q}-pod{escaped}.slice")
        }
    })
}

/// The annotations Istio's sidecar injector writes on a pod when it prepares it for a CNI
/// (`istio_cni.enabled`): the status with `istio-validation` instead of `istio-init`, and the
/// traffic settings of a default install.
pub fn istio_injected_annotations() -> BTreeMap<String, String> {
    [
        ("sidecar.istio.io/status", r#"{"initContainers":["istio-validation"],"containers":["istio-proxy"],"volumes":["workload-socket","credential-socket","workload-certs","istio-envoy","istio-data","istio-podinfo","istio-token","istiod-ca-cert"],"imagePullSecrets":null,"revision":"default"}"#),
        ("sidecar.istio.io/interceptionMode", "REDIRECT"),
        ("traffic.sidecar.istio.io/includeInboundPorts", "*"),
        ("traffic.sidecar.istio.io/excludeInboundPorts", "15020"),
        ("istio.io/rev", "default"),
        ("kubectl.kubernetes.io/default-container", "app"),
        ("kubernetes.io/config.source", "api"),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_owned(), value.to_owned()))
    .collect()
}

/// A pod as kubelet and the runtime set it up before calling CNI: a netns and a pod cgroup
/// with a container cgroup for the app and one for the proxy below it.
pub struct KubePod {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub container_id: String,
    /// What the runtime passes as the pod's annotations; None: it passes none (a runtime
    /// without the capability). Istio-injected unless the test changes it.
    pub annotations: Option<BTreeMap<String, String>>,
    pub app: Cgroup,
    pub proxy: Cgroup,
    pub cgroup: Cgroup,
    pub netns: Netns,
}

static NEXT_POD: AtomicU32 = AtomicU32::new(0);

impl KubePod {
    pub fn create(
        cgroup_root: &Cgroup,
        driver: CgroupDriver,
        qos: Qos,
        name: &str,
    ) -> Result<KubePod> {
        let n = NEXT_POD.fetch_add(1, Ordering::Relaxed);
        let uid = format!("0b8f5c3e-1a2b-4c5d-{n:04x}-{:012x}", std::process::id());
        let netns = Netns::create(name)?;
        let cgroup = cgroup_root.descendant(&pod_cgroup_path(driver, qos, &uid))?;
        Ok(KubePod {
            app: cgroup.child("ctr-app")?,
            proxy: cgroup.child("ctr-proxy")?,
            cgroup,
            netns,
            container_id: format!(
                "{:064x}",
                u128::from(n) << 32 | u128::from(std::process::id())
            ),
            namespace: "default".into(),
            name: name.into(),
            annotations: Some(istio_injected_annotations()),
            uid,
        })
    }

    /// Sets (`Some`) or removes (`None`) annotations.
    pub fn annotate(&mut self, changes: &[(&str, Option<&str>)]) {
        let annotations = self.annotations.get_or_insert_with(BTreeMap::new);
        for (key, value) in changes {
            match value {
                Some(value) => annotations.insert((*key).to_owned(), (*value).to_owned()),
                None => annotations.remove(*key),
            };
        }
    }

    /// The attachment the runtime makes for the pod's sandbox (interface eth0).
    pub fn attachment(&self) -> Attachment {
        Attachment {
            container_id: self.container_id.clone(),
            netns: self.netns.path(),
            ifname: "eth0".into(),
            args: format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
                self.namespace, self.name, self.container_id, self.uid
            ),
            capability_args: self
                .annotations
                .iter()
                .map(|annotations| (POD_ANNOTATIONS.to_owned(), json!(annotations)))
                .collect(),
        }
    }
}

/// A result as the CNI types define it: an empty `dns` object is no DNS setting (Go plugins
/// print `"dns":{}` for none, other implementations leave the key out).
pub fn normalized_result(result: &Value) -> Result<Value> {
    let mut result = result.clone();
    let object = result
        .as_object_mut()
        .context("a CNI result is an object")?;
    if object.get("dns").is_some_and(|dns| dns == &json!({})) {
        object.remove("dns");
    }
    if object.is_empty() {
        bail!("empty CNI result");
    }
    Ok(result)
}
