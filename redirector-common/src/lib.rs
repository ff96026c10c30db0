//! Map keys, values and limits shared by the eBPF programs and the user-space loader.
//!
//! Every type is `#[repr(C)]` with explicit padding fields, so that the bytes the kernel
//! hashes for a key are exactly the bytes both sides write (implicit padding would be
//! uninitialised on one side and make lookups miss).
#![no_std]

/// Most pods one node can enroll (size of the per-pod maps).
pub const MAX_PODS: u32 = 4096;
/// Most owner entries (proxy UIDs and GIDs, owner-group filter) over all pods.
pub const MAX_OWNERS: u32 = MAX_PODS * 16;
/// Most port entries over all pods.
pub const MAX_PORTS: u32 = MAX_PODS * 32;
/// Most address-trie entries over all pods (local addresses and CIDR sets, after merging).
pub const MAX_ADDR_PREFIXES: u32 = MAX_PODS * 64;
/// Most redirected connections tracked at once, node-wide. Entries are removed when the
/// connection closes; the maps are LRU so that a lost close can never fill them.
pub const MAX_TRACKED_CONNECTIONS: u32 = 65536;
/// Deepest cgroup level searched for an enrolled pod above the connecting process.
pub const MAX_CGROUP_DEPTH: i32 = 16;

/// Names of the maps, as pinned under `<bpffs root>/maps/`.
pub mod map_names {
    pub const POD_CONFIG: &str = "POD_CONFIG";
    pub const OWNERS: &str = "OWNERS";
    pub const PORTS: &str = "PORTS";
    pub const POD_ADDRS: &str = "POD_ADDRS";
    pub const POD_STATS: &str = "POD_STATS";
    pub const ORIG_BY_COOKIE: &str = "ORIG_BY_COOKIE";
    pub const ORIG_BY_PEER: &str = "ORIG_BY_PEER";
    pub const SETTINGS: &str = "SETTINGS";
    pub const LISTENERS: &str = "LISTENERS";
    pub const INBOUND_ADDRS: &str = "INBOUND_ADDRS";
    pub const INBOUND_NETNS: &str = "INBOUND_NETNS";
}

/// Names of the programs in the eBPF object.
pub mod program_names {
    pub const CONNECT4: &str = "redirector_connect4";
    pub const SOCKOPS: &str = "redirector_sockops";
    pub const CONNECT6: &str = "redirector_connect6";
    pub const GETSOCKOPT: &str = "redirector_getsockopt";
    pub const GETPEERNAME4: &str = "redirector_getpeername4";
    pub const GETPEERNAME6: &str = "redirector_getpeername6";
    pub const INBOUND: &str = "redirector_inbound";
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Per-pod settings, keyed by the pod's cgroup v2 id. Everything the per-connection path
/// needs is computed at enroll time: flags, the first proxy UID, and the sets below.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodConfig {
    /// Outbound capture port (istio-iptables `-p`), host byte order.
    pub proxy_port: u16,
    /// Inbound capture port (`-z`).
    pub inbound_port: u16,
    /// Inbound tunnel port (`-e`), never sent to the inbound port from the proxy.
    pub tunnel_port: u16,
    /// Port of the proxy's DNS listener (istio-agent: 15053).
    pub dns_port: u16,
    /// The first proxy UID: the owner whose connections to a local address go to the
    /// inbound port (istio-iptables decides by its first `-u` entry).
    pub first_uid: u32,
    /// `POLICY_*` bits.
    pub flags: u32,
}

/// IPv4 connections are captured (istio-iptables always writes IPv4 rules).
pub const POLICY_IPV4: u32 = 1;
/// IPv6 connections are captured (istio-iptables writes IPv6 rules only when IPv6 is on).
pub const POLICY_IPV6: u32 = 1 << 1;
/// `-i '*'`: every destination not excluded goes to the proxy.
pub const POLICY_INCLUDE_ALL: u32 = 1 << 2;
/// DNS capture is on (`--redirect-dns` with servers or `--capture-all-dns`): port 53 is
/// carved out of the proxy-owner rules.
pub const POLICY_REDIRECT_DNS: u32 = 1 << 3;
/// `--capture-all-dns`: TCP port 53 to any address goes to the DNS port.
pub const POLICY_CAPTURE_ALL_DNS: u32 = 1 << 4;
/// An include CIDR is a loopback one: the "local traffic of other owners returns" rules
/// are absent, as in istio-iptables.
pub const POLICY_LOOPBACK_INCLUDED: u32 = 1 << 5;
/// Owner-group filter: only processes whose GID is in the pod's group set are captured.
pub const POLICY_GROUPS_INCLUDE: u32 = 1 << 6;
/// Owner-group filter: processes whose GID is in the pod's group set are not captured.
pub const POLICY_GROUPS_EXCLUDE: u32 = 1 << 7;
/// `-b '*'`: every inbound port but the excluded ones is captured (otherwise only the
/// `PORT_INBOUND_INCLUDE` ones).
pub const POLICY_INBOUND_ALL: u32 = 1 << 8;
/// `--inbound-fail-open`: with no proxy listening, inbound connections reach the
/// application instead of being refused.
pub const POLICY_INBOUND_FAIL_OPEN: u32 = 1 << 9;

/// Which owner id an [`OwnerKey`] names.
pub const OWNER_UID: u32 = 0;
pub const OWNER_GID: u32 = 1;
/// A GID of the owner-group filter (`ISTIO_OUTBOUND_OWNER_GROUPS[_EXCLUDE]`).
pub const OWNER_GROUP_FILTER: u32 = 2;

/// (pod, kind, id): the proxy's UIDs and GIDs (`-u`/`-g`) and the owner-group filter.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OwnerKey {
    pub pod: u64,
    /// [`OWNER_UID`], [`OWNER_GID`] or [`OWNER_GROUP_FILTER`].
    pub kind: u32,
    pub id: u32,
}

/// (pod, port) → `PORT_*` bits: one lookup answers every port question about a connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortKey {
    pub pod: u64,
    pub port: u16,
    pub _pad: [u8; 6],
}

/// `-o`: outbound connections to this port are not captured.
pub const PORT_OUTBOUND_EXCLUDE: u32 = 1;
/// `-q`: outbound connections to this port go to the proxy (after the CIDR exclusions).
pub const PORT_OUTBOUND_INCLUDE: u32 = 1 << 1;
/// `-b`: inbound connections to this port go to the inbound port.
pub const PORT_INBOUND_INCLUDE: u32 = 1 << 2;
/// `-d`: inbound connections to this port are not captured.
pub const PORT_INBOUND_EXCLUDE: u32 = 1 << 3;

/// Key of the per-pod address trie. All fields are 32-bit words so that the data follows
/// the prefix length without padding; the prefix length counts the pod and family words
/// (96 bits) plus the address prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodAddrKey {
    pub pod: [u32; 2],
    pub family: u32,
    /// Network byte order words; IPv4 in `addr[0]`.
    pub addr: [u32; 4],
}

/// Bits of the pod's identity and family words in a [`PodAddrKey`] prefix.
pub const POD_ADDR_KEY_FIXED_BITS: u32 = 96;

impl PodAddrKey {
    pub const fn new(pod: u64, family: u16, addr: [u32; 4]) -> Self {
        Self {
            pod: [pod as u32, (pod >> 32) as u32],
            family: family as u32,
            addr,
        }
    }
}

/// The destination is local to the pod (it would leave through `lo`: 127/8, ::1, the pod's
/// own addresses).
pub const ADDR_LOCAL: u32 = 1;
/// In the host loopback CIDR (`ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR`, default 127.0.0.1/32; ::1/128).
pub const ADDR_LOOPBACK_CIDR: u32 = 1 << 1;
/// In an excluded CIDR (`-x`).
pub const ADDR_EXCLUDE: u32 = 1 << 2;
/// In an included CIDR (`-i`).
pub const ADDR_INCLUDE: u32 = 1 << 3;
/// A DNS server of the pod (TCP port 53 to it goes to the DNS port).
pub const ADDR_DNS_SERVER: u32 = 1 << 4;

/// Per-pod counters (a per-CPU map: the kernel side never needs atomics).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
pub struct PodStats {
    pub redirected: u64,
    pub exempted: u64,
    pub orig_dst_lookups: u64,
    pub orig_dst_misses: u64,
    /// Inbound connections handed to the proxy's inbound listener.
    pub inbound_captured: u64,
    /// Inbound connections to a port that is not captured.
    pub inbound_excluded: u64,
    /// Inbound connections that were to be captured while no proxy listened (refused, or
    /// delivered to the application with fail-open).
    pub inbound_no_proxy: u64,
}

impl PodStats {
    pub fn add(&mut self, other: &PodStats) {
        self.redirected += other.redirected;
        self.exempted += other.exempted;
        self.orig_dst_lookups += other.orig_dst_lookups;
        self.orig_dst_misses += other.orig_dst_misses;
        self.inbound_captured += other.inbound_captured;
        self.inbound_excluded += other.inbound_excluded;
        self.inbound_no_proxy += other.inbound_no_proxy;
    }
}

/// Most pod addresses (IPv4 and IPv6) with inbound capture, node-wide.
pub const MAX_INBOUND_ADDRS: u32 = MAX_PODS * 8;

/// A pod address with inbound capture: the key the `sk_lookup` program finds the pod by
/// (it may not read the netns cookie itself), from the connection's local address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InboundAddrKey {
    pub family: u32,
    /// Network byte order words; IPv4 in `addr[0]`.
    pub addr: [u32; 4],
}

/// The pod behind an inbound address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InboundPod {
    /// The pod's cgroup id (its `POD_CONFIG` key).
    pub pod: u64,
    pub netns_cookie: u64,
}

/// A network namespace with inbound capture: which listening port is the proxy's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InboundNetns {
    pub pod: u64,
    pub inbound_port: u16,
    pub _pad: [u8; 6],
}

/// The proxy's inbound listening socket in a pod's network namespace, by family (an IPv6
/// socket that is not v6-only serves IPv4 too).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenerKey {
    pub netns_cookie: u64,
    pub port: u16,
    pub family: u16,
    pub _pad: u32,
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
    unsafe impl aya::Pod for OwnerKey {}
    unsafe impl aya::Pod for PortKey {}
    unsafe impl aya::Pod for PodAddrKey {}
    unsafe impl aya::Pod for PodStats {}
    unsafe impl aya::Pod for RawSockAddr {}
    unsafe impl aya::Pod for PeerKey {}
    unsafe impl aya::Pod for ConnectionRecord {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for InboundAddrKey {}
    unsafe impl aya::Pod for InboundPod {}
    unsafe impl aya::Pod for InboundNetns {}
    unsafe impl aya::Pod for ListenerKey {}
}
