//! The node agent (`redirector agent`): owns the programs and the pods' state on a node, serves
//! the local API the CLI and the CNI plugin use, and exports health and metrics.
//! - [`api`]: the request and reply types of the unix-socket API.
//! - [`node`]: carrying out requests on the pins and the state files (agent and CLI alike).
//! - [`client`]: talking to the agent, or carrying out a request directly when none runs.
//! - [`store`]: the pod state files.
//! - [`reconcile`]: adopting and collecting pods when the agent starts, and periodically, on
//!   the [`evidence`] of a source of truth about which pods exist: the node's files, or the
//!   container [`runtime`].
//! - [`pod_cgroup`]: which cgroups are pods.
//! - [`addrwatch`]: following each pod's address changes.
//! - [`metrics`], [`server`], [`config`]: the agent process itself.
pub mod addrwatch;
pub mod api;
pub mod client;
pub mod config;
pub mod descriptors;
pub mod evidence;
pub mod metrics;
pub mod node;
pub mod pod_cgroup;
pub mod reconcile;
pub mod runtime;
pub mod server;
pub mod store;
