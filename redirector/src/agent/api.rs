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
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::store::{PodIdentity, PodMeta};
use crate::{
    pods::{PodStatus, RecordCounts},
    policy::Policy,
};

pub const DEFAULT_SOCKET: &str = "/run/redirector/agent.sock";
/// Longest request line the agent reads (a policy and a few paths fit many times over).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

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
    Status,
    /// CNI GC: unenroll the pods this network attached whose container is not listed.
    Gc(GcRequest),
}

impl Request {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Enroll(_) => "enroll",
            Self::Unenroll(_) => "unenroll",
            Self::Status => "status",
            Self::Gc(_) => "gc",
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
    Collected(Vec<CollectedPod>),
}

impl Reply {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Enrolled(_) => "enrolled",
            Self::Unenrolled(_) => "unenrolled",
            Self::Status(_) => "status",
            Self::Collected(_) => "collected",
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
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrolledPod {
    pub cgroup: PathBuf,
    pub cgroup_id: u64,
    pub policy: Policy,
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
    /// None when answered without an agent.
    pub agent: Option<AgentReport>,
}

/// An enrolled pod: the maps' view and the state file's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePod {
    #[serde(flatten)]
    pub status: PodStatus,
    #[serde(flatten)]
    pub meta: PodMeta,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentReport {
    pub ready: bool,
    /// What the agent found when it started (None until it has reconciled).
    pub startup: Option<ReconcileReport>,
    /// Pods unenrolled since then because they were gone.
    pub collected_since: Vec<CollectedPod>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconcileReport {
    /// Pods found pinned and alive, left in place.
    pub adopted: Vec<PodRef>,
    pub collected: Vec<CollectedPod>,
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
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"op":"status"}"#
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
