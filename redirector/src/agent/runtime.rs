//! The container runtime as reconcile's source of truth (`runtime_endpoint`): its CRI API lists
//! the node's pod sandboxes with their annotations, and a sandbox's verbose status gives its
//! network namespace and its cgroup, whatever layout kubelet's cgroup driver or the node's
//! distribution (kind's `kubelet.slice/kubelet-kubepods.slice`) gives pods.
//!
//! A recorded pod is gone only when the runtime positively says so: a successful
//! `ListPodSandbox` no longer lists the sandbox that enrolled it, or lists it NOTREADY and the
//! node's files prove its cgroup or netns gone ([`Filesystem`]). A failed or unanswered call
//! stops the pass. Pods not enrolled through a sandbox of this runtime (by the CLI) are judged
//! by the files, and so is every pod when the runtime lists no sandbox at all: on a node, the
//! agent's own pod is one, so an empty list means a runtime other than kubelet's (a wrong
//! endpoint) or one whose state was wiped, which proves nothing.
//!
//! Running sandboxes that the CNI plugin's rule ([`select::decide`]) captures but that are not
//! enrolled (they started while redirector-cni was not chained, or while no agent ran) are
//! handed to reconcile, which enrolls them with their annotations' settings.
use std::{
    collections::BTreeMap,
    os::unix::fs::MetadataExt as _,
    path::{Component, Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use serde_json::Value;

use super::{
    api::{CollectReason, EnrollRequest},
    evidence::{EvidenceError, Filesystem, PodSource, Presence},
    store::{Attachment, PodIdentity, PodMeta, PodRecord},
};
use crate::{
    cni::{
        config::{CniArgs, PluginConfig},
        select::{self, Decision},
    },
    cri::{api::PodSandboxState, CriClient, CriError},
};

/// A pod sandbox as the runtime describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuntimeSandbox {
    pub id: String,
    pub ready: bool,
    pub pod: PodIdentity,
    pub annotations: BTreeMap<String, String>,
    /// The sandbox's network namespace file (None: the runtime did not say, or the pod uses
    /// the node's network).
    pub netns: Option<PathBuf>,
    /// The pod's cgroup directory, and its inode (the cgroup id) when it exists.
    pub cgroup: Option<PathBuf>,
    pub cgroup_id: Option<u64>,
}

/// Where the sandboxes come from: the CRI socket ([`Cri`]), or a test's list.
pub trait Sandboxes: Send + Sync {
    /// Every sandbox the runtime knows, ready or not; the verbose status of the ready ones.
    fn list(&self) -> Result<Vec<RuntimeSandbox>, EvidenceError>;
}

/// A running pod that the CNI plugin's rule captures, to be enrolled if it is not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunningPod {
    pub cgroup_id: u64,
    pub request: EnrollRequest,
}

/// How long a pass waits for the runtime's answer: a runtime that hangs stops the pass rather
/// than wedging the agent.
const CRI_TIMEOUT: Duration = Duration::from_secs(30);

/// The runtime's CRI socket. Each list connects anew (a restarted runtime is simply found
/// again), on the agent's tokio runtime.
pub struct Cri {
    pub socket: PathBuf,
    /// Where the cgroup2 hierarchy the runtime names cgroups in is mounted.
    pub cgroup_root: PathBuf,
    pub handle: tokio::runtime::Handle,
}

impl Cri {
    async fn sandboxes(&self) -> Result<Vec<RuntimeSandbox>, CriError> {
        let mut client = CriClient::connect(&self.socket).await?;
        let mut found = Vec::new();
        for sandbox in client.list_pod_sandboxes().await? {
            let metadata = sandbox.metadata.unwrap_or_default();
            let mut seen = RuntimeSandbox {
                ready: sandbox.state == PodSandboxState::SandboxReady as i32,
                pod: PodIdentity {
                    uid: metadata.uid,
                    namespace: metadata.namespace,
                    name: metadata.name,
                },
                annotations: sandbox.annotations.into_iter().collect(),
                ..RuntimeSandbox::default()
            };
            if seen.ready {
                let status = client.pod_sandbox_status(&sandbox.id).await?;
                let (cgroups_path, netns) = spec_paths(&status.info);
                seen.netns = netns;
                seen.cgroup = cgroups_path
                    .as_deref()
                    .and_then(pod_cgroup)
                    .map(|relative| self.cgroup_root.join(relative));
                seen.cgroup_id = seen
                    .cgroup
                    .as_deref()
                    .and_then(|path| std::fs::metadata(path).ok())
                    .map(|metadata| metadata.ino());
            }
            seen.id = sandbox.id;
            found.push(seen);
        }
        Ok(found)
    }
}

impl Sandboxes for Cri {
    fn list(&self) -> Result<Vec<RuntimeSandbox>, EvidenceError> {
        match self
            .handle
            .block_on(tokio::time::timeout(CRI_TIMEOUT, self.sandboxes()))
        {
            Ok(answer) => answer.map_err(|e| EvidenceError(e.to_string())),
            Err(_) => Err(EvidenceError(format!(
                "CRI socket {}: no answer within {}s",
                self.socket.display(),
                CRI_TIMEOUT.as_secs()
            ))),
        }
    }
}

/// The sandbox's cgroups path (as the runtime gave it to runc) and its netns file, from the
/// verbose status's `info` (containerd's: the sandbox's OCI runtime spec).
pub fn spec_paths(
    info: &std::collections::HashMap<String, String>,
) -> (Option<String>, Option<PathBuf>) {
    let Some(info) = info
        .get("info")
        .and_then(|text| serde_json::from_str::<Value>(text).ok())
    else {
        return (None, None);
    };
    let linux = &info["runtimeSpec"]["linux"];
    let cgroups_path = linux["cgroupsPath"].as_str().map(str::to_owned);
    let netns = linux["namespaces"].as_array().and_then(|namespaces| {
        namespaces
            .iter()
            .find(|ns| ns["type"] == "network")
            .and_then(|ns| ns["path"].as_str())
            .filter(|path| !path.is_empty())
            .map(PathBuf::from)
    });
    (cgroups_path, netns)
}

/// The pod's cgroup, relative to the cgroup root, from its sandbox container's cgroups path:
/// the directory that holds the sandbox container. The systemd driver's `slice:prefix:name`
/// names the pod's slice, which systemd nests by the dashes in its name
/// (`kubelet-kubepods-besteffort.slice` is in `kubelet.slice/kubelet-kubepods.slice`); the
/// cgroupfs driver's is a path whose parent is the pod's. None for anything else.
pub fn pod_cgroup(cgroups_path: &str) -> Option<PathBuf> {
    let relative = match cgroups_path.split(':').collect::<Vec<_>>()[..] {
        [slice, _prefix, _name] => expand_slice(slice)?,
        [path] => Path::new(path.trim_start_matches('/')).parent()?.to_owned(),
        _ => return None,
    };
    let plain = relative
        .components()
        .all(|component| matches!(component, Component::Normal(_)));
    (plain && relative.components().next().is_some()).then_some(relative)
}

/// systemd's path of a slice unit: `a-b-c.slice` is `a.slice/a-b.slice/a-b-c.slice`.
fn expand_slice(slice: &str) -> Option<PathBuf> {
    let name = slice.strip_suffix(".slice")?;
    if name.is_empty() || name.contains('/') || name.split('-').any(str::is_empty) {
        return None;
    }
    let mut path = PathBuf::new();
    let mut prefix = String::new();
    for part in name.split('-') {
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        path.push(format!("{prefix}.slice"));
    }
    Some(path)
}

/// What the runtime's answer says of one recorded pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Running,
    Gone,
    /// The runtime cannot tell (the sandbox is stopped, or the pod was not enrolled through
    /// one): the files decide.
    AskFiles,
}

fn judge(record: &PodRecord, sandboxes: &[RuntimeSandbox]) -> Verdict {
    if sandboxes
        .iter()
        .any(|sandbox| sandbox.ready && sandbox.cgroup_id == Some(record.cgroup_id))
    {
        return Verdict::Running;
    }
    let Some(attachment) = &record.meta.attachment else {
        return Verdict::AskFiles;
    };
    if sandboxes.is_empty() {
        return Verdict::AskFiles;
    }
    match sandboxes
        .iter()
        .find(|sandbox| sandbox.id == attachment.container_id)
    {
        None => Verdict::Gone,
        Some(sandbox) if sandbox.ready => Verdict::Running,
        Some(_) => Verdict::AskFiles,
    }
}

/// The runtime as a [`PodSource`]: `check` takes its answer, which the pass's other calls
/// judge by.
pub struct RuntimeSource<S> {
    pub sandboxes: S,
    pub files: Filesystem,
    /// The CNI plugin's selection settings (namespaces skipped, istio or all).
    pub selection: PluginConfig,
    answer: Mutex<Vec<RuntimeSandbox>>,
}

impl<S: Sandboxes> RuntimeSource<S> {
    pub fn new(sandboxes: S, files: Filesystem, selection: PluginConfig) -> Self {
        Self {
            sandboxes,
            files,
            selection,
            answer: Mutex::default(),
        }
    }

    fn answer(&self) -> std::sync::MutexGuard<'_, Vec<RuntimeSandbox>> {
        self.answer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether and how the CNI plugin would have captured `sandbox`; None (logged) when not.
    fn captured(&self, sandbox: &RuntimeSandbox) -> Option<RunningPod> {
        let pod = format!("{}/{}", sandbox.pod.namespace, sandbox.pod.name);
        let args = CniArgs {
            pod_namespace: Some(sandbox.pod.namespace.clone()),
            pod_name: Some(sandbox.pod.name.clone()),
            pod_uid: Some(sandbox.pod.uid.clone()),
            infra_container_id: Some(sandbox.id.clone()),
            skip: false,
        };
        let annotations = serde_json::to_value(&sandbox.annotations).ok()?;
        let settings = match select::decide(&self.selection, &args, true, Some(&annotations)) {
            Ok(Decision::Enroll(settings)) => settings,
            Ok(Decision::Skip(_)) => return None,
            Err(refusal) => {
                tracing::warn!(%pod, sandbox = %sandbox.id, %refusal, "a running pod's annotations cannot be carried out; not enrolled");
                return None;
            }
        };
        // A pod on the node's network has no netns of its own: capturing it would capture the
        // node.
        let Some(netns) = sandbox.netns.clone() else {
            tracing::debug!(%pod, sandbox = %sandbox.id, "no network namespace of its own (hostNetwork); not enrolled");
            return None;
        };
        let (Some(cgroup), Some(cgroup_id)) = (sandbox.cgroup.clone(), sandbox.cgroup_id) else {
            tracing::warn!(%pod, sandbox = %sandbox.id, cgroup = ?sandbox.cgroup, "the cgroup of a running injected pod was not found; not enrolled");
            return None;
        };
        Some(RunningPod {
            cgroup_id,
            request: EnrollRequest {
                cgroup,
                meta: PodMeta {
                    pod: Some(sandbox.pod.clone()),
                    netns: Some(netns),
                    // The sandbox id is the CNI container id: the pod's CNI DEL finds it. The
                    // runtime does not say which network attached it (so CNI GC, which is per
                    // network, leaves it to reconcile).
                    attachment: Some(Attachment {
                        network: String::new(),
                        container_id: sandbox.id.clone(),
                        ifname: "eth0".into(),
                    }),
                },
                policy: None,
                pod_settings: settings,
                dry_run: false,
            },
        })
    }
}

impl<S: Sandboxes> PodSource for RuntimeSource<S> {
    fn check(&self) -> Result<(), EvidenceError> {
        let sandboxes = self.sandboxes.list();
        let mut answer = self.answer();
        answer.clear();
        *answer = sandboxes?;
        Ok(())
    }

    fn presence(&self, record: &PodRecord) -> Result<Presence, EvidenceError> {
        match judge(record, &self.answer()) {
            Verdict::Running => Ok(Presence::Present),
            Verdict::Gone => Ok(Presence::Gone(CollectReason::SandboxGone)),
            Verdict::AskFiles => self.files.presence(record),
        }
    }

    fn running(&self) -> Vec<RunningPod> {
        self.answer()
            .iter()
            .filter(|sandbox| sandbox.ready)
            .filter_map(|sandbox| self.captured(sandbox))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use serde_json::json;

    use super::*;
    use crate::cni::annotations::keys;

    #[test]
    fn the_pod_cgroup_is_found_whatever_the_driver_and_layout() {
        let cases = [
            (
                "kubepods-burstable-pod0b8f_5c3e.slice:cri-containerd:abc",
                Some("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0b8f_5c3e.slice"),
            ),
            (
                "kubepods-pod0b8f.slice:cri-containerd:abc",
                Some("kubepods.slice/kubepods-pod0b8f.slice"),
            ),
            // kind's nested kubelet.
            (
                "kubelet-kubepods-besteffort-pod1a2b.slice:cri-containerd:abc",
                Some("kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod1a2b.slice"),
            ),
            ("/kubepods/burstable/pod0b8f/abc", Some("kubepods/burstable/pod0b8f")),
            ("/e2e/kubepods/pod9/abc", Some("e2e/kubepods/pod9")),
            ("/abc", None),
            ("", None),
            ("/kubepods/../../etc/abc", None),
            ("kubepods--x.slice:cri-containerd:abc", None),
            ("kubepods.scope:cri-containerd:abc", None),
            ("a:b", None),
        ];
        for (cgroups_path, expected) in cases {
            assert_eq!(
                pod_cgroup(cgroups_path),
                expected.map(PathBuf::from),
                "{cgroups_path}"
            );
        }
    }

    #[test]
    fn containerds_verbose_info_gives_the_cgroups_path_and_the_netns() {
        let spec = json!({
            "pid": 4242,
            "runtimeSpec": {"linux": {
                "cgroupsPath": "kubepods-pod1.slice:cri-containerd:abc",
                "namespaces": [
                    {"type": "pid"},
                    {"type": "network", "path": "/var/run/netns/cni-1234"},
                ],
            }},
        });
        let info = HashMap::from([("info".to_owned(), spec.to_string())]);
        assert_eq!(
            spec_paths(&info),
            (
                Some("kubepods-pod1.slice:cri-containerd:abc".to_owned()),
                Some("/var/run/netns/cni-1234".into())
            )
        );
        let host_network = json!({"runtimeSpec": {"linux": {
            "cgroupsPath": "/kubepods/pod1/abc",
            "namespaces": [{"type": "pid"}],
        }}});
        let info = HashMap::from([("info".to_owned(), host_network.to_string())]);
        assert_eq!(spec_paths(&info), (Some("/kubepods/pod1/abc".into()), None));
        assert_eq!(spec_paths(&HashMap::new()), (None, None));
    }

    /// A runtime that answers with a list, or fails.
    struct Fake(Mutex<Result<Vec<RuntimeSandbox>, EvidenceError>>);

    impl Sandboxes for Fake {
        fn list(&self) -> Result<Vec<RuntimeSandbox>, EvidenceError> {
            self.0.lock().unwrap().clone()
        }
    }

    const INJECTED: &str =
        r#"{"initContainers":["istio-validation"],"containers":["istio-proxy"]}"#;

    fn sandbox(
        id: &str,
        ready: bool,
        cgroup_id: u64,
        annotations: &[(&str, &str)],
    ) -> RuntimeSandbox {
        RuntimeSandbox {
            id: id.into(),
            ready,
            pod: PodIdentity {
                uid: format!("uid-{id}"),
                namespace: "default".into(),
                name: format!("pod-{id}"),
            },
            annotations: annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            netns: Some(format!("/var/run/netns/cni-{id}").into()),
            cgroup: Some(format!("/sys/fs/cgroup/kubepods/pod{id}").into()),
            cgroup_id: Some(cgroup_id),
        }
    }

    /// A record of a pod enrolled through sandbox `id`, whose files are nowhere to be seen
    /// (so that the files' verdict, when asked, is an error: never proof).
    fn record(id: Option<&str>, cgroup_id: u64) -> PodRecord {
        PodRecord {
            cgroup_id,
            cgroup: "/nonexistent-redirector-test/kubepods/pod".into(),
            identity: None,
            meta: PodMeta {
                attachment: id.map(|id| Attachment {
                    network: "pods".into(),
                    container_id: id.into(),
                    ifname: "eth0".into(),
                }),
                ..PodMeta::default()
            },
            follow: Default::default(),
        }
    }

    fn source(answer: Result<Vec<RuntimeSandbox>, EvidenceError>) -> RuntimeSource<Fake> {
        RuntimeSource::new(
            Fake(Mutex::new(answer)),
            Filesystem {
                cgroup_root: "/nonexistent-redirector-test".into(),
            },
            PluginConfig::from_keys(&HashMap::new()).unwrap(),
        )
    }

    #[test]
    fn a_pod_is_gone_only_when_the_runtime_no_longer_lists_its_sandbox() {
        let source = source(Ok(vec![
            sandbox("a", true, 10, &[]),
            sandbox("b", false, 11, &[]),
        ]));
        source.check().unwrap();
        assert_eq!(
            source.presence(&record(Some("a"), 10)),
            Ok(Presence::Present)
        );
        assert_eq!(
            source.presence(&record(None, 10)),
            Ok(Presence::Present),
            "found by its cgroup: enrolled by the CLI"
        );
        assert_eq!(
            source.presence(&record(Some("gone"), 12)),
            Ok(Presence::Gone(CollectReason::SandboxGone))
        );
        // Stopped, or not enrolled through a sandbox: the files decide (and here cannot).
        assert!(source.presence(&record(Some("b"), 11)).is_err());
        assert!(source.presence(&record(None, 13)).is_err());
    }

    #[test]
    fn a_runtime_that_lists_no_sandbox_at_all_proves_nothing() {
        let source = source(Ok(Vec::new()));
        source.check().unwrap();
        assert!(source.presence(&record(Some("a"), 10)).is_err());
    }

    #[test]
    fn a_runtime_that_fails_stops_the_pass_and_forgets_its_last_answer() {
        let source = source(Ok(vec![sandbox("a", true, 10, &[])]));
        source.check().unwrap();
        *source.sandboxes.0.lock().unwrap() = Err(EvidenceError("connection refused".into()));
        assert_eq!(
            source.check(),
            Err(EvidenceError("connection refused".into()))
        );
        assert!(source.running().is_empty());
    }

    #[test]
    fn running_injected_pods_are_handed_over_with_their_settings_and_others_are_left() {
        let source = source(Ok(vec![
            sandbox(
                "injected",
                true,
                10,
                &[
                    (keys::STATUS, INJECTED),
                    (keys::EXCLUDE_OUTBOUND_PORTS, "5432"),
                ],
            ),
            sandbox("plain", true, 11, &[]),
            sandbox("stopped", false, 12, &[(keys::STATUS, INJECTED)]),
            RuntimeSandbox {
                netns: None,
                ..sandbox("host-network", true, 13, &[(keys::STATUS, INJECTED)])
            },
            RuntimeSandbox {
                cgroup_id: None,
                ..sandbox("no-cgroup", true, 14, &[(keys::STATUS, INJECTED)])
            },
            RuntimeSandbox {
                pod: PodIdentity {
                    namespace: "kube-system".into(),
                    ..PodIdentity::default()
                },
                ..sandbox("system", true, 15, &[(keys::STATUS, INJECTED)])
            },
        ]));
        source.check().unwrap();
        let running = source.running();
        assert_eq!(running.len(), 1, "{running:?}");
        let pod = &running[0];
        assert_eq!(pod.cgroup_id, 10);
        assert_eq!(
            pod.request.cgroup,
            Path::new("/sys/fs/cgroup/kubepods/podinjected")
        );
        assert_eq!(
            pod.request.meta.netns.as_deref(),
            Some(Path::new("/var/run/netns/cni-injected"))
        );
        assert_eq!(
            pod.request
                .meta
                .attachment
                .as_ref()
                .map(|a| a.container_id.as_str()),
            Some("injected")
        );
        assert_eq!(
            pod.request
                .pod_settings
                .as_ref()
                .map(|s| s.outbound_ports_exclude.clone()),
            Some(vec![5432])
        );
    }
}
