//! Harness for redirector's end-to-end tests and demo.
//!
//! Everything here drives the built binaries (`redirector`, `redirector-proxy`, and this crate's
//! `e2e-helper`); nothing links the redirector library. Every kernel object a test creates
//! (network namespaces, veths, cgroups, bpffs pins, processes) is owned by a guard whose `Drop`
//! removes it, so cleanup also happens when a test panics. Names carry the creating pid, which lets
//! a later run sweep what a killed run left behind (see [`Sandbox::new`]).
//!
//! Every wait is bounded; traffic only goes to loopback or to addresses inside namespaces that the
//! test created itself.

pub mod agent;
pub mod bpffs;
pub mod cgroup;
pub mod cni;
pub mod golden;
pub mod names;
pub mod netns;
pub mod parity;
pub mod pod;
pub mod process;
pub mod protocol;
pub mod tools;

pub use agent::{http_get, Agent, AgentSetup};
pub use bpffs::{ensure_bpffs_mounted, files_below, is_bpffs, BpfRoot};
pub use cgroup::{cgroup2_mount, cgroup_v1_mounts, Cgroup};
pub use cni::{
    bridge_chain, cni_error, normalized_result, pod_cgroup_path, Attachment, CgroupDriver,
    CniError, CniRuntime, KubePod, Qos, CNI_PLUGIN_DIR,
};
pub use names::TempDir;
pub use netns::{Netns, VethPair};
pub use pod::{
    client_result, connect, spawn_client, spawn_in_pod, start_proxy, Identity, Pod, Proxy, Sandbox,
    Server, EVENT_TIMEOUT, PROXY_ADDR, PROXY_PORT,
};
pub use process::{binary, run, wait_for, Child, Output};
pub use protocol::{
    AgentReport, CniAttachment, CollectedPod, ConnectOptions, ConnectOutcome, ConnectReport,
    ConnectSummary, Counters, DoneEvent, ForwardEvent, ListenerReply, Metrics, PlannedConnect,
    PodIdentity, PodRef, PodStatus, ProxyEvent, Reached, ReconcileReport, RecordCounts, Sample,
    ServerReply, Status,
};
pub use tools::{
    attached_programs, nat_rules, redirector, redirector_processes_mentioning, status_json,
    wait_for_tcp_listener,
};
