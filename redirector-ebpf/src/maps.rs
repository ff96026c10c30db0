//! Every map of the programs. All are pinned by name, so that one loaded set of programs
//! serves every pod on the node and the state survives the process that loaded it.
use aya_ebpf::{
    macros::map,
    maps::{lpm_trie::LpmTrie, Array, HashMap, LruHashMap, PerCpuHashMap, SockHash},
};
use redirector_common::{
    ConnectionRecord, InboundAddrKey, InboundNetns, InboundPod, ListenerKey, OwnerKey, PeerKey,
    PodAddrKey, PodConfig, PodStats, PortKey, RawSockAddr, Settings, MAX_ADDR_PREFIXES,
    MAX_INBOUND_ADDRS, MAX_OWNERS, MAX_PODS, MAX_PORTS, MAX_TRACKED_CONNECTIONS,
};

/// Pod cgroup id → the pod's settings. Written by the loader at enroll time.
#[map]
pub static POD_CONFIG: HashMap<u64, PodConfig> = HashMap::pinned(MAX_PODS, 0);

/// The pods' proxy UIDs/GIDs and owner-group filters.
#[map]
pub static OWNERS: HashMap<OwnerKey, u8> = HashMap::pinned(MAX_OWNERS, 0);

/// (pod, port) → `PORT_*` bits.
#[map]
pub static PORTS: HashMap<PortKey, u32> = HashMap::pinned(MAX_PORTS, 0);

/// (pod, family, address prefix) → `ADDR_*` bits of every set holding that prefix, merged
/// at enroll time so that one longest-prefix lookup answers all address questions.
#[map]
pub static POD_ADDRS: LpmTrie<PodAddrKey, u32> = LpmTrie::pinned(MAX_ADDR_PREFIXES, 0);

/// Pod cgroup id → counters.
#[map]
pub static POD_STATS: PerCpuHashMap<u64, PodStats> = PerCpuHashMap::pinned(MAX_PODS, 0);

/// Client socket cookie → original destination, from connect until close.
#[map]
pub static ORIG_BY_COOKIE: LruHashMap<u64, ConnectionRecord> =
    LruHashMap::pinned(MAX_TRACKED_CONNECTIONS, 0);

/// The proxy's view of a redirected connection → original destination, from established until close.
#[map]
pub static ORIG_BY_PEER: LruHashMap<PeerKey, RawSockAddr> =
    LruHashMap::pinned(MAX_TRACKED_CONNECTIONS, 0);

/// Node-wide run-time switches (one entry).
#[map]
pub static SETTINGS: Array<Settings> = Array::pinned(1, 0);

/// Pod address → pod and netns, for the inbound `sk_lookup` program.
#[map]
pub static INBOUND_ADDRS: HashMap<InboundAddrKey, InboundPod> =
    HashMap::pinned(MAX_INBOUND_ADDRS, 0);

/// Netns cookie → the pod's inbound capture port, for the listen callback.
#[map]
pub static INBOUND_NETNS: HashMap<u64, InboundNetns> = HashMap::pinned(MAX_PODS, 0);

/// The proxies' inbound listening sockets, put here by the listen callback; a socket
/// leaves by itself when it closes. Two families per pod.
#[map]
pub static LISTENERS: SockHash<ListenerKey> = SockHash::pinned(MAX_PODS * 2, 0);
