//! redirector: iptables-free traffic interception for service-mesh sidecars.
//!
//! The library is the API; the `redirector` CLI is a thin layer over it.
//! - [`pods`]: enroll, unenroll and list pods ([`pods::Redirector`]).
//! - [`original_dst`]: the original destination of a redirected connection, for proxies.
//! - [`pins`], [`loader`], [`link`]: the bpffs layout, the embedded programs, cgroup links.
//! - [`cgroup`], [`kernel`], [`policy`], [`flags`], [`netns`]: input, validated.
//! - [`agent`]: the node agent, its API, and the CLI's switch between agent and standalone.
//! - [`cni`]: the chained CNI plugin and its installer.
//! - [`cri`]: a client of the container runtime's CRI API.
pub mod agent;
mod atomic_file;
pub mod cgroup;
pub mod cni;
pub mod cri;
pub mod flags;
pub mod fuzzing;
pub mod kernel;
pub mod link;
pub mod loader;
pub mod maps;
pub mod netns;
pub mod original_dst;
pub mod pins;
pub mod pods;
pub mod policy;
mod sys;
