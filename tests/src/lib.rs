//! Harness for redirector's end-to-end tests and demo.
//!
//! Everything here drives the built binaries (`redirector`, `redirector-proxy`, and this crate's
//! `e2e-helper`); of the redirector library only the CRI client is used, to drive a container
//! runtime as kubelet does ([`containerd`]). Every kernel object a test creates
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
pub mod container_cli;
pub mod containerd;
pub mod daemonset;
pub mod dns;
pub mod docker;
pub mod golden;
pub mod haproxy;
pub mod inbound;
pub mod names;
pub mod netns;
pub mod parity;
pub mod plain_containerd;
pub mod pod;
pub mod podman;
pub mod process;
pub mod protocol;
pub mod socklb;
pub mod tools;

pub use agent::{http_get, Agent, AgentSetup};
pub use bpffs::{ensure_bpffs_mounted, files_below, is_bpffs, BpfRoot};
pub use cgroup::{cgroup2_mount, cgroup_v1_mounts, Cgroup};
pub use cni::{
    bridge_chain, cni_error, istio_injected_annotations, normalized_result, pod_cgroup_path,
    Attachment, CgroupDriver, CniError, CniRuntime, KubePod, Qos, CNI_PLUGIN_DIR, POD_ANNOTATIONS,
};
pub use haproxy::Haproxy;
pub use names::TempDir;
pub use netns::{Netns, VethPair};
pub use pod::{
    client_result, connect, run_helper, spawn_client, spawn_in_pod, spawn_in_pod_with,
    spawn_in_pod_with_nofile, start_proxy, start_proxy_with, ExecSettings, Identity, Pod, Proxy,
    ProxySettings, Sandbox, Server, EVENT_TIMEOUT, PROXY_ADDR, PROXY_PORT,
};
pub use process::{binary, monotonic_ms, run, wait_for, Child, Output};
pub use protocol::{
    AgentReport, CniAttachment, CniCounts, CollectedPod, ConnectLoopOptions, ConnectOptions,
    ConnectOutcome, ConnectReport, ConnectSummary, ConnectTwiceOptions, ConnectTwiceReport,
    Counters, DnsQueryOptions, DnsQueryReport, DoneEvent, ForwardEvent, GetsockoptReport,
    HeldMismatch, HoldOpened, HoldOptions, HoldReport, IstioValidationReport, ListenerReply,
    LoopFault, LoopIncident, LoopSummary, Metrics, NoOrigDstEvent, PeerGroupsReport,
    PlannedConnect, PodIdentity, PodRef, PodStatus, ProxyEvent, Reached, ReconcileReport,
    RecordCounts, Sample, ServerReply, Status, Transport, ValidationAccept,
};
pub use socklb::{AttachedLb, SockLb};
pub use tools::{
    attached_programs, nat_rules, netstat_counters, pinned_map_entries, redirector,
    redirector_processes_mentioning, redirector_with_env, status_json, tcp_sockets, tcp_state,
    udp_sockets, wait_for_tcp_listener, InetSocket, PinnedMapInfo,
};
