//! The agent's local API: on its unix socket, each connection carries one request line of JSON
//! and gets one response line back.
//!
//! ```text
//! {"bpffs":null,"request":{"op":"enroll","args":{"cgroup":"/sys/fs/cgroup/kubepods/pod…","meta":{"pod":{"uid":"…"}},"policy":null}}}
//! {"ok":{"reply":"enrolled","data":{"cgroup":"…","cgroup_id":1234,"policy":{…}}}}
//! {"error":{"kind":"invalid_input","message":"cgroup …: no such directory"}}
//! ```
//! The same requests are served without an agent by [`super::node::Node::handle`], which is what
//! the agent runs for each of them: the CLI gets the same answers either way.
use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

use crate::loader::UpgradeReport;

pub use super::store::Attachment;
use super::store::{PodIdentity, PodMeta};
use crate::{
    cni::{annotations::PodSettings, select::Reason},
    pods::{Enrolled, PodStatus, RecordCounts},
    policy::Policy,
};

pub const DEFAULT_SOCKET: &str = "/run/redirector/agent.sock";

/// The file an agent writes beside its socket (`<socket>.ready`) once it has been ready: it
/// lasts until reboot (/run is a tmpfs), and tells the CNI plugin's STATUS that redirector is
/// set up on this node even while the agent restarts.
pub fn ready_marker(socket: &std::path::Path) -> PathBuf {
    beside(socket, ".ready")
}

/// `<path><suffix>`, in the same directory: the files that belong to an agent's socket.
pub fn beside(path: &std::path::Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(suffix);
    path.with_file_name(name)
}
/// Longest request line the agent reads (a policy and a few paths fit many times over).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Parses one request line (its newline included or not).
pub fn parse_request_line(line: &[u8]) -> Result<Envelope, ApiError> {
    if line.len() > MAX_REQUEST_BYTES {
        return Err(ApiError {
            kind: ErrorKind::InvalidInput,
            message: format!("a request line is at most {MAX_REQUEST_BYTES} bytes"),
        });
    }
    serde_json::from_slice(line).map_err(|error| ApiError {
        kind: ErrorKind::InvalidInput,
        message: format!("not a request: {error}"),
    })
}
/// Longest reply line a client reads: a page of pods with large policies fits.
pub const MAX_REPLY_BYTES: u64 = 64 * 1024 * 1024;

/// What a client sends: a request, for the installation at `bpffs` if the client has one in
/// mind (the agent refuses when it serves another, so that `--bpffs` is never ignored).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    #[serde(default)]
    pub bpffs: Option<PathBuf>,
    pub request: Request,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", content = "args", rename_all = "snake_case")]
pub enum Request {
    Enroll(Box<EnrollRequest>),
    Unenroll(PodSelector),
    /// The node's pods, a page at a time (a node with many pods or large policies answers in
    /// several replies, none of them large).
    Status(StatusQuery),
    /// One pod (CNI CHECK asks about its own pod only).
    Pod(PodSelector),
    /// CNI GC: unenroll the pods this network attached whose container is not listed.
    Gc(GcRequest),
    /// The CNI plugin did not enroll a pod, and says why (counted in metrics and status).
    CniOutcome(CniOutcome),
}

/// Which page of pods a status request wants: those with a cgroup id above `after`, at most
/// `limit` of them (0: only the node's summary).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusQuery {
    #[serde(default)]
    pub after: Option<u64>,
    #[serde(default)]
    pub limit: Option<u32>,
}

/// Pods per status page when the client does not say.
pub const STATUS_PAGE: u32 = 100;

impl Request {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Enroll(_) => "enroll",
            Self::Unenroll(_) => "unenroll",
            Self::Status(_) => "status",
            Self::Pod(_) => "pod",
            Self::Gc(_) => "gc",
            Self::CniOutcome(_) => "cni_outcome",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The pod's cgroup v2 directory.
    pub cgroup: PathBuf,
    #[serde(default)]
    pub meta: PodMeta,
    /// None: the node's default policy (the agent's config file).
    #[serde(default)]
    pub policy: Option<Policy>,
    /// The pod's own settings (from its annotations), in place of the policy's.
    #[serde(default)]
    pub pod_settings: Option<PodSettings>,
    /// Run every check an enroll runs and change nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// Which pod to unenroll.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PodSelector {
    /// By cgroup directory (which must still exist).
    Cgroup(PathBuf),
    /// By the CNI container id that enrolled it (works after the cgroup is gone).
    ContainerId(String),
}

/// A pod the CNI plugin passed through uncaptured, or whose ADD it failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniOutcome {
    pub pod: Option<PodIdentity>,
    pub reason: Reason,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcRequest {
    pub network: String,
    pub valid_container_ids: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Ok(Box<Reply>),
    Error(ApiError),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", content = "data", rename_all = "snake_case")]
pub enum Reply {
    Enrolled(EnrolledPod),
    Unenrolled(Unenrolled),
    Status(NodeStatus),
    Pod(Option<NodePod>),
    Collected(GcReport),
    /// A [`CniOutcome`] was counted.
    Counted,
}

/// What a CNI GC did: every pod it could collect, and every one it could not (it goes on past
/// a failure).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    pub collected: Vec<CollectedPod>,
    pub failed: Vec<FailedPod>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedPod {
    #[serde(flatten)]
    pub pod: PodRef,
    pub error: String,
}

impl Reply {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Enrolled(_) => "enrolled",
            Self::Unenrolled(_) => "unenrolled",
            Self::Status(_) => "status",
            Self::Pod(_) => "pod",
            Self::Collected(_) => "collected",
            Self::Counted => "counted",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request names something that is not there or not right (e.g. no such cgroup).
    InvalidInput,
    /// The agent is still loading programs or reconciling: try again shortly.
    NotReady,
    /// The request was fine but carrying it out failed.
    Internal,
    /// The agent serves as many connections as it takes at once; this one was closed before
    /// its request was read (nothing was done): try again shortly.
    Busy,
}

/// A pod enrolled (or, for a dry run, that would be), with what was found about it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrolledPod {
    pub cgroup: PathBuf,
    pub cgroup_id: u64,
    /// The pod's network namespace, when one was given (now or at an earlier enroll).
    pub netns: Option<PathBuf>,
    /// The namespace's addresses: local to the pod (empty without a namespace).
    pub addresses: Vec<IpAddr>,
    /// Whether IPv6 is captured, decided from the addresses as istio-iptables does.
    pub ipv6_captured: bool,
    pub policy: Policy,
}

impl EnrolledPod {
    pub fn new(pod: &Enrolled, policy: Policy) -> Self {
        let network = pod
            .netns
            .as_ref()
            .map(|netns| netns.network.clone())
            .unwrap_or_default();
        Self {
            cgroup: pod.cgroup.path.clone(),
            cgroup_id: pod.cgroup.id,
            netns: pod.netns.as_ref().map(|netns| netns.path.clone()),
            ipv6_captured: network.ipv6_enabled(policy.dual_stack),
            addresses: network.addresses,
            policy,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unenrolled {
    /// The pod that was unenrolled; None when there was none (unenroll is idempotent).
    pub cgroup_id: Option<u64>,
}

/// `redirector status`: the pods, the connection records, and (from an agent) what it adopted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub pods: Vec<NodePod>,
    pub records: RecordCounts,
    /// The build whose programs are pinned (a digest of their object, in hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub programs_build: Option<String>,
    /// None when answered without an agent.
    pub agent: Option<AgentReport>,
    /// Pod state files that could not be read or parsed, moved aside.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quarantined: Vec<PathBuf>,
    /// More pods follow: ask again with `after` set to this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<u64>,
}

/// An enrolled pod: the maps' view and the state file's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePod {
    #[serde(flatten)]
    pub status: PodStatus,
    #[serde(flatten)]
    pub meta: PodMeta,
    /// Times the agent enrolled the pod again because its addresses changed.
    #[serde(default)]
    pub addresses_followed: u64,
    /// The sandboxed runtime (gVisor, Kata) found running the pod: its sockets are not in
    /// this kernel, so it is not captured whatever the maps say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandboxed: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentReport {
    pub ready: bool,
    /// The last reconcile pass that could not tell whether pods are gone, and why (None
    /// once a pass succeeds again).
    #[serde(default)]
    pub reconcile_error: Option<String>,
    /// Pods seen gone once, to be collected if the next pass sees them gone again.
    #[serde(default)]
    pub suspected: usize,
    /// Requests or passes running longer than the agent's deadline (what /healthz reports).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stuck: Vec<String>,
    /// What the agent found when it started (None until it has reconciled).
    pub startup: Option<ReconcileReport>,
    /// Pods unenrolled since then because they were gone.
    pub collected_since: Vec<CollectedPod>,
    /// What the CNI plugin reported since the agent started.
    #[serde(default)]
    pub cni: CniCounts,
    /// When the agent started, the programs pinned were another build's and were replaced by
    /// its own in every pod's links: how many.
    #[serde(default)]
    pub upgrade: Option<UpgradeReport>,
    /// Handshakes no proxy took over, removed since the agent started.
    #[serde(default)]
    pub expired_handshakes: u64,
    /// Failures to follow a pod's address changes since the agent started (each is logged
    /// with the pod).
    #[serde(default)]
    pub address_follow_failures: u64,
    /// Injected pods found running uncaptured and enrolled since the agent started (with
    /// `runtime_endpoint`).
    #[serde(default)]
    pub enrolled_from_runtime: u64,
}

/// Pods the CNI plugin did not enroll since the agent started, by reason.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniCounts {
    /// Passed through uncaptured.
    pub skipped: BTreeMap<Reason, u64>,
    /// ADD failed.
    pub failed: BTreeMap<Reason, u64>,
}

impl CniCounts {
    pub fn count(&mut self, reason: Reason) {
        let counts = if reason.fails_add() {
            &mut self.failed
        } else {
            &mut self.skipped
        };
        *counts.entry(reason).or_default() += 1;
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconcileReport {
    /// Pods found pinned and alive, left in place.
    pub adopted: Vec<PodRef>,
    pub collected: Vec<CollectedPod>,
    /// Injected pods the container runtime runs that were not enrolled (they started while
    /// redirector-cni was not chained, or no agent ran), enrolled from their sandbox.
    #[serde(default)]
    pub enrolled: Vec<PodRef>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    pub cgroup_id: u64,
    pub cgroup: Option<PathBuf>,
    pub pod: Option<PodIdentity>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollectedPod {
    #[serde(flatten)]
    pub pod: PodRef,
    pub reason: CollectReason,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CollectReason {
    /// The pod's cgroup no longer exists.
    CgroupGone,
    /// The pod's network namespace file no longer exists.
    NetnsGone,
    /// Links were pinned but the pod's policy was never written (an enroll died half-way).
    Incomplete,
    /// A state file without an enrolled pod.
    NotEnrolled,
    /// CNI GC: the runtime no longer lists the attachment.
    NotAttached,
    /// The container runtime (CRI) no longer lists the pod's sandbox.
    SandboxGone,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_wire_form() {
        let request = Request::Unenroll(PodSelector::ContainerId("abc".into()));
        let text = serde_json::to_string(&request).unwrap();
        assert_eq!(text, r#"{"op":"unenroll","args":{"container_id":"abc"}}"#);
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), request);
        assert_eq!(
            serde_json::to_string(&Request::Status(StatusQuery::default())).unwrap(),
            r#"{"op":"status","args":{"after":null,"limit":null}}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"status","args":{}}"#).unwrap(),
            Request::Status(StatusQuery::default())
        );
        let enroll: Request = serde_json::from_str(
            r#"{"op":"enroll","args":{"cgroup":"/c","meta":{"pod":{"uid":"u1"}},"policy":{"proxy_port":15006}}}"#,
        )
        .unwrap();
        let Request::Enroll(enroll) = enroll else {
            panic!("not an enroll: {enroll:?}")
        };
        assert_eq!(enroll.meta.pod.unwrap().uid, "u1");
        assert_eq!(enroll.policy.unwrap().proxy_port, 15006);
    }

    #[test]
    fn unknown_request_fields_are_refused() {
        let error =
            serde_json::from_str::<Request>(r#"{"op":"enroll","args":{"cgroup":"/c","colour":1}}"#)
                .unwrap_err()
                .to_string();
        assert!(error.contains("colour"), "{error}");
    }
}
