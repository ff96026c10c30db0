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
/// Default capacity of the handshake map: connections captured whose proxy side has not been
/// created yet, node-wide. An entry lives from the client's connect callback until the proxy's
/// accepted socket takes it over (microseconds on loopback), so this bounds connections in the
/// middle of their handshake, not open connections (their records live in socket storage).
pub const DEFAULT_HANDSHAKE_CAPACITY: u32 = 65536;

/// Version of the layout of every map's keys and values. Programs of another build may take
/// over pinned maps (an upgrade in place) only when this is the same; a build that changes a
/// key or value bumps it.
pub const MAP_LAYOUT_VERSION: u32 = 1;

/// Names of the maps, as pinned under `<bpffs root>/maps/`.
pub mod map_names {
    pub const POD_SETTINGS: &str = "POD_SETTINGS";
    pub const OWNERS: &str = "OWNERS";
    pub const PORTS: &str = "PORTS";
    pub const POD_ADDRS: &str = "POD_ADDRS";
    pub const POD_STATS: &str = "POD_STATS";
    pub const SOCKET_RECORDS: &str = "SOCKET_RECORDS";
    pub const HANDSHAKES: &str = "HANDSHAKES";
    pub const HANDSHAKE_TALLY: &str = "HANDSHAKE_TALLY";
    pub const SETTINGS: &str = "SETTINGS";
    pub const LISTENERS: &str = "LISTENERS";
    pub const INBOUND_ADDRS: &str = "INBOUND_ADDRS";
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
    pub const GETSOCKNAME4: &str = "redirector_getsockname4";
    pub const GETSOCKNAME6: &str = "redirector_getsockname6";
    pub const SENDMSG4: &str = "redirector_sendmsg4";
    pub const SENDMSG6: &str = "redirector_sendmsg6";
    pub const RECVMSG4: &str = "redirector_recvmsg4";
    pub const RECVMSG6: &str = "redirector_recvmsg6";
    pub const BIND4: &str = "redirector_bind4";
    pub const BIND6: &str = "redirector_bind6";
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// A pod's settings, in the cgroup local storage of the pod's cgroup (`POD_SETTINGS`): every
/// cgroup program attached there reads them with one `bpf_get_local_storage`, whichever
/// container cgroup below the pod the process sits in. The loader writes the whole value in
/// one update, which the kernel swaps in atomically, so a policy change is seen all at once.
/// All zero (`pod == 0`) until the loader has written it: the programs then leave the pod alone.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodConfig {
    /// The pod's cgroup id: its counters' key and, node-wide, its identity in the maps.
    pub pod: u64,
    /// Generation of the pod's policy sets (`OWNERS`, `PORTS`, `POD_ADDRS`, keyed by pod and
    /// generation): a policy change stages its sets under the next generation and switches to
    /// them with one write of this value.
    pub generation: u32,
    pub _pad: u32,
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
    /// The pod's own IPv4 address (network byte order; 0: none): what a captured socket reports
    /// as its local address, where after a REDIRECT the connection's source would be.
    pub own4: u32,
    pub _pad2: u32,
    /// The pod's own IPv6 address (all zero: none), the same for IPv6.
    pub own6: [u32; 4],
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
/// `--capture-all-dns`: TCP and UDP port 53 to any address goes to the DNS port.
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

/// (pod, generation, kind, id): the proxy's UIDs and GIDs (`-u`/`-g`) and the owner-group
/// filter.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OwnerKey {
    pub pod: u64,
    /// [`PodConfig::generation`].
    pub generation: u32,
    /// [`OWNER_UID`], [`OWNER_GID`] or [`OWNER_GROUP_FILTER`].
    pub kind: u32,
    pub id: u32,
    pub _pad: u32,
}

/// (pod, generation, port) → `PORT_*` bits: one lookup answers every port question about a
/// connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortKey {
    pub pod: u64,
    /// [`PodConfig::generation`].
    pub generation: u32,
    pub port: u16,
    pub _pad: u16,
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
/// the prefix length without padding; the prefix length counts the pod, generation and family
/// words (128 bits) plus the address prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodAddrKey {
    /// The pod's cgroup id, low word first.
    pub pod: [u32; 2],
    /// [`PodConfig::generation`].
    pub generation: u32,
    pub family: u32,
    /// Network byte order words; IPv4 in `addr[0]`.
    pub addr: [u32; 4],
}

/// Bits of the pod, generation and family words in a [`PodAddrKey`] prefix.
pub const POD_ADDR_KEY_FIXED_BITS: u32 = 128;

impl PodAddrKey {
    pub const fn new(pod: u64, generation: u32, family: u16, addr: [u32; 4]) -> Self {
        Self {
            pod: [pod as u32, (pod >> 32) as u32],
            generation,
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
/// A DNS server of the pod (TCP and UDP port 53 to it goes to the DNS port).
pub const ADDR_DNS_SERVER: u32 = 1 << 4;

/// Per-pod counters, one copy per CPU. The programs add with atomic instructions: a program
/// can be preempted (it runs with migration disabled, not preemption) or interrupted by a
/// softirq that runs another program on the same CPU, and a plain read-add-write would then
/// lose counts.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
pub struct PodStats {
    /// Connects sent to a proxy port.
    pub redirected: u64,
    /// Connects the policy left alone.
    pub exempted: u64,
    pub orig_dst_lookups: u64,
    /// Original-destination lookups that found no record (answered with an error).
    pub orig_dst_misses: u64,
    /// Inbound connections handed to the proxy's inbound listener.
    pub inbound_captured: u64,
    /// Inbound connections to a port that is not captured.
    pub inbound_excluded: u64,
    /// Inbound connections that were to be captured while no proxy listened (refused, or
    /// delivered to the application with fail-open).
    pub inbound_no_proxy: u64,
    /// Connects refused (EPERM) because their record could not be stored (out of memory):
    /// capture fails closed rather than letting the connection bypass the proxy.
    pub record_failed: u64,
    /// Captured connects whose record could not be handed to the proxy side (handshake map
    /// full or out of memory): the proxy's lookup for them misses.
    pub handshake_failed: u64,
    /// Proxy-side sockets of captured connections that could not take their record over.
    pub handoff_failed: u64,
    /// Listening sockets on the inbound capture port that could not be registered.
    pub listener_failed: u64,
    /// UDP DNS queries (datagrams sent, and connects of UDP sockets) sent to the proxy's DNS
    /// port.
    pub dns_redirected: u64,
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
        self.record_failed += other.record_failed;
        self.handshake_failed += other.handshake_failed;
        self.handoff_failed += other.handoff_failed;
        self.listener_failed += other.listener_failed;
        self.dns_redirected += other.dns_redirected;
    }
}

/// Most pod addresses (IPv4 and IPv6) with inbound capture, node-wide.
pub const MAX_INBOUND_ADDRS: u32 = MAX_PODS * 8;

/// A pod address with inbound capture: the key the `sk_lookup` program finds the pod by,
/// from the connection's local address (sk_lookup programs can read neither the netns cookie
/// nor cgroup storage).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InboundAddrKey {
    pub family: u32,
    /// Network byte order words; IPv4 in `addr[0]`.
    pub addr: [u32; 4],
}

/// What the `sk_lookup` program needs of the pod behind an inbound address: a copy of the
/// inbound part of its [`PodConfig`], rewritten with it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InboundPod {
    pub pod: u64,
    /// [`PodConfig::generation`].
    pub generation: u32,
    /// `POLICY_*` bits.
    pub flags: u32,
    pub inbound_port: u16,
    pub _pad: [u16; 3],
}

/// Slots per (pod, port, family) in the listener map: a proxy may listen with several sockets
/// on the inbound port (Envoy: one SO_REUSEPORT socket per worker) and close some of them
/// while the others serve; each socket takes a free slot.
pub const LISTENER_SLOTS: u32 = 8;

/// A proxy's inbound listening socket, by pod, port, family and slot (an IPv6 socket that is
/// not v6-only serves IPv4 too).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenerKey {
    pub pod: u64,
    pub port: u16,
    pub family: u16,
    pub slot: u32,
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

/// A captured connection between its client's connect and the proxy side's creation, as the
/// proxy side sees it: the pod (two pods have their own network namespaces, whose clients may
/// use the same loopback address and port at the same time), the client's address and port
/// (the proxy's peer) and the proxy's port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HandshakeKey {
    pub pod: u64,
    /// Network byte order words; IPv4 in `addr[0]`; IPv4-mapped addresses as IPv4.
    pub client_addr: [u32; 4],
    pub client_port: u16,
    pub proxy_port: u16,
    pub family: u16,
    pub _pad: u16,
}

/// The handshake map's value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Handshake {
    /// When the client published it (`bpf_ktime_get_ns`, CLOCK_MONOTONIC): the agent removes
    /// entries that no proxy took over long after any handshake could still complete.
    pub created_ns: u64,
    pub original_dst: RawSockAddr,
    /// The client's address as the proxy should see it: the pod's own address, where a
    /// REDIRECT would have left the connection's source (all zero: keep the real one).
    pub client_as: [u32; 4],
    pub _pad: u32,
}

/// The handshake map's entries the programs made and removed, on one CPU (a per-CPU array of
/// one element), so that its occupancy is read from a sum instead of a walk of the map. Added to
/// atomically, like [`PodStats`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HandshakeTally {
    /// Entries made at the client's connect callback.
    pub published: u64,
    /// Entries removed by the programs: taken over by the proxy's socket, or left by a
    /// handshake that failed.
    pub settled: u64,
}

/// What a socket of a captured connection carries in its socket-local storage: it lives and
/// dies with the socket, so no table grows with connections and nothing evicts a live record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketRecord {
    /// The destination the application asked for (the last DNS server it sent to, for an
    /// unconnected UDP socket).
    pub original_dst: RawSockAddr,
    /// One of the `RECORD_*` kinds, or 0 for a record that no longer applies.
    pub kind: u16,
    /// The loopback port the connect or datagram was sent to; the socket's views are rewritten
    /// only while it talks to that port.
    pub redirected_port: u16,
    /// App side: the local address getsockname reports (the pod's own address). Proxy side:
    /// the client's address getpeername reports. All zero: the real one.
    pub reported: [u32; 4],
}

/// The application's TCP socket of a captured connection.
pub const RECORD_APP: u16 = 1;
/// The proxy's accepted socket of a captured connection.
pub const RECORD_PROXY: u16 = 2;
/// A UDP socket of the application whose DNS queries go to the proxy's DNS port.
pub const RECORD_DNS: u16 = 3;
/// A socket a proxy owner bound to the pod's inbound capture port: when it listens, it may
/// become one of the pod's inbound listeners.
pub const RECORD_PROXY_LISTENER: u16 = 4;

/// Node-wide switches read by the programs at run time (single-entry array map).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Non-zero: the programs log each connection decision through aya-log (costly; off by default).
    pub log_connections: u32,
    /// Non-zero: a getsockopt program may answer with an errno of its own (Linux 5.18 and
    /// later, probed at install); before, only 0 or the kernel's own error are allowed.
    pub errno_writable: u32,
    /// [`MAP_LAYOUT_VERSION`] of the build that created the maps.
    pub layout_version: u32,
    pub _pad: u32,
    /// Identifies the programs pinned (a digest of their object): a build with other programs
    /// replaces them in every pod's links.
    pub build_id: [u8; 16],
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
    unsafe impl aya::Pod for HandshakeKey {}
    unsafe impl aya::Pod for Handshake {}
    unsafe impl aya::Pod for HandshakeTally {}
    unsafe impl aya::Pod for SocketRecord {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for InboundAddrKey {}
    unsafe impl aya::Pod for InboundPod {}
    unsafe impl aya::Pod for ListenerKey {}
}
