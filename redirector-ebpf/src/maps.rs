//! Every map of the programs. All are pinned by name, so that one loaded set of programs
//! serves every pod on the node and the state survives the process that loaded it.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuHashMap},
};
use redirector_common::{
    ConnectionRecord, ExemptOwnerKey, PeerKey, PodConfig, PodStats, RawSockAddr, Settings,
    MAX_EXEMPT_OWNERS, MAX_PODS, MAX_TRACKED_CONNECTIONS,
};

/// Pod cgroup id → the pod's settings. Written by the loader at enroll time.
#[map]
pub static POD_CONFIG: HashMap<u64, PodConfig> = HashMap::pinned(MAX_PODS, 0);

/// (pod, UID or GID) pairs whose connections the pod does not capture.
#[map]
pub static EXEMPT_OWNERS: HashMap<ExemptOwnerKey, u8> = HashMap::pinned(MAX_EXEMPT_OWNERS, 0);

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
