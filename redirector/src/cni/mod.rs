//! The chained CNI plugin (`redirector-cni`) and its installer.
//! - [`plugin`]: the CNI operations, on top of rscni-plugin's protocol layer.
//! - [`config`]: the plugin's keys in the network config, and CNI_ARGS.
//! - [`select`]: whether a pod is enrolled, and with what ([`annotations`]: Istio's).
//! - [`cgroup`]: the pod's cgroup directory from its UID, for both kubelet cgroup drivers.
//! - [`install`]: putting the binary in the CNI bin directory and chaining it in the conflist.
pub mod annotations;
pub mod cgroup;
pub mod config;
pub mod install;
pub mod plugin;
pub mod select;

/// The plugin's binary name, which is also its `type` in a conflist.
pub const PLUGIN_NAME: &str = "redirector-cni";
