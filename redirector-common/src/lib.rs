//! Map keys, values and limits shared by the eBPF programs and the user-space loader.
//!
//! Every type is `#[repr(C)]` with explicit padding fields, so that the bytes the kernel
//! hashes for a key are exactly the bytes both sides write (implicit padding would be
//! uninitialised on one side and make lookups miss).
#![no_std]

/// Most pods one node can enroll (size of the per-pod maps).
pub const MAX_PODS: u32 = 4096;
/// Most proxy UIDs plus GIDs over all pods (size of the exempt-owner map).
pub const MAX_EXEMPT_OWNERS: u32 = MAX_PODS * 8;
/// Most redirected connections tracked at once, node-wide. Entries are removed when the
/// connection closes; the maps are LRU so that a lost close can never fill them.
pub const MAX_TRACKED_CONNECTIONS: u32 = 65536;
/// Deepest cgroup level searched for an enrolled pod above the connecting process.
pub const MAX_CGROUP_DEPTH: i32 = 16;

/// Names of the maps, as pinned under `<bpffs root>/maps/`.
pub mod map_names {
    pub const POD_CONFIG: &str = "POD_CONFIG";
    pub const EXEMPT_OWNERS: &str = "EXEMPT_OWNERS";
    pub const POD_STATS: &str = "POD_STATS";
    pub const ORIG_BY_COOKIE: &str = "ORIG_BY_COOKIE";
    pub const ORIG_BY_PEER: &str = "ORIG_BY_PEER";
    pub const SETTINGS: &str = "SETTINGS";
}

/// Names of the programs in the eBPF object.
pub mod program_names {
    pub const CONNECT4: &str = "redirector_connect4";
    pub const SOCKOPS: &str = "redirector_sockops";
    pub const GETSOCKOPT: &str = "redirector_getsockopt";
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Per-pod settings, keyed by the pod's cgroup v2 id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodConfig {
    /// Outbound capture port of the proxy (istio-iptables `-p`), host byte order.
    pub proxy_port: u16,
    pub _pad: [u8; 6],
}

/// Which owner id an [`ExemptOwnerKey`] names.
pub const OWNER_UID: u32 = 0;
pub const OWNER_GID: u32 = 1;

/// A UID or GID whose connections a pod does not capture (the proxy's own, istio-iptables `-u`/`-g`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExemptOwnerKey {
    pub pod: u64,
    /// [`OWNER_UID`] or [`OWNER_GID`].
    pub kind: u32,
    pub id: u32,
}

/// Per-pod counters (a per-CPU map: the kernel side never needs atomics).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodStats {
    pub redirected: u64,
    pub exempted: u64,
    pub orig_dst_lookups: u64,
    pub orig_dst_misses: u64,
}

impl PodStats {
    pub fn add(&mut self, other: &PodStats) {
        self.redirected += other.redirected;
        self.exempted += other.exempted;
        self.orig_dst_lookups += other.orig_dst_lookups;
        self.orig_dst_misses += other.orig_dst_misses;
    }
}

/// A socket address as the kernel hands it to BPF: address words in network byte order
/// (IPv4 in `addr[0]`), port in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawSockAddr {
    pub addr: [u32; 4],
    pub port: u16,
    /// [`AF_INET`] or [`AF_INET6`]; 0 means "unset".
    pub family: u16,
}

/// Identifies the proxy's accepted socket of a redirected connection, node-wide.
///
/// Uniqueness: inside one network namespace the proxy's local port and the peer's address
/// and port identify the connection (the client's 4-tuple after the rewrite). Two pods
/// have their own network namespaces, whose clients may use the same loopback source
/// address and port at the same time; the namespace's cookie (unique for the boot) keeps
/// their records apart.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerKey {
    pub netns_cookie: u64,
    /// The client's own address, i.e. the proxy's peer (network byte order words).
    pub peer_addr: [u32; 4],
    /// The client's own port, host byte order.
    pub peer_port: u16,
    /// The proxy's listening port, host byte order.
    pub proxy_port: u16,
    pub family: u16,
    pub _pad: u16,
}

/// The record made at connect time, keyed by the client socket's cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectionRecord {
    pub original_dst: RawSockAddr,
    pub _pad: u32,
    /// Filled in once the connection is established (`peer.family != 0`), so that the
    /// close callback can remove the proxy-side record too.
    pub peer: PeerKey,
}

/// Node-wide switches read by the programs at run time (single-entry array map).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Non-zero: the programs log each connection decision through aya-log (costly; off by default).
    pub log_connections: u32,
}

#[cfg(feature = "user")]
mod pod_impls {
    use super::*;
    // SAFETY: all of these are plain `repr(C)` data with explicit padding and no pointers.
    unsafe impl aya::Pod for PodConfig {}
    unsafe impl aya::Pod for ExemptOwnerKey {}
    unsafe impl aya::Pod for PodStats {}
    unsafe impl aya::Pod for RawSockAddr {}
    unsafe impl aya::Pod for PeerKey {}
    unsafe impl aya::Pod for ConnectionRecord {}
    unsafe impl aya::Pod for Settings {}
}
