//! Every map of the programs. All are pinned by name, so that one loaded set of programs
//! serves every pod on the node and the state survives the process that loaded it.
use core::cell::UnsafeCell;

use aya_ebpf::{
    bindings::{bpf_map_def, bpf_map_type::BPF_MAP_TYPE_CGROUP_STORAGE, BPF_F_NO_PREALLOC},
    btf_maps::SkStorage,
    macros::{btf_map, map},
    maps::{lpm_trie::LpmTrie, Array, HashMap, PerCpuArray, PerCpuHashMap, SockHash},
};
use redirector_common::{
    Handshake, HandshakeKey, HandshakeTally, InboundAddrKey, InboundPod, ListenerKey, OwnerKey,
    PodAddrKey, PodConfig, PodStats, PortKey, Settings, SocketRecord, DEFAULT_HANDSHAKE_CAPACITY,
    LISTENER_SLOTS, MAX_ADDR_PREFIXES, MAX_INBOUND_ADDRS, MAX_OWNERS, MAX_PODS, MAX_PORTS,
};

/// The pod's settings in the cgroup local storage of the pod's cgroup, shared by every
/// program attached there (the key is the cgroup id alone, which makes the kernel share one
/// storage between attach types: Linux 5.9). Written by hand because aya-ebpf's cgroup
/// storage type is keyed per attach type.
#[repr(transparent)]
pub struct PodSettings(UnsafeCell<bpf_map_def>);

// SAFETY: the definition is only read, by the loader, and its address passed to helpers.
unsafe impl Sync for PodSettings {}

impl PodSettings {
    /// This pod's settings: all zero until the loader has written them.
    #[inline(always)]
    pub fn get(&self) -> Option<PodConfig> {
        // SAFETY: the helper returns this program's cgroup storage of this map, which cannot
        // be null for a program that uses the map, and which stays valid for the run.
        let config = unsafe {
            *aya_ebpf::helpers::bpf_get_local_storage(self.0.get().cast(), 0).cast::<PodConfig>()
        };
        (config.pod != 0).then_some(config)
    }
}

#[unsafe(link_section = "maps")]
#[unsafe(export_name = "POD_SETTINGS")]
pub static POD_SETTINGS: PodSettings = PodSettings(UnsafeCell::new(bpf_map_def {
    type_: BPF_MAP_TYPE_CGROUP_STORAGE,
    key_size: core::mem::size_of::<u64>() as u32,
    value_size: core::mem::size_of::<PodConfig>() as u32,
    max_entries: 0,
    map_flags: 0,
    id: 0,
    pinning: 1, // by name
}));

/// The pods' proxy UIDs/GIDs and owner-group filters, by policy.
#[map]
pub static OWNERS: HashMap<OwnerKey, u8> = HashMap::pinned(MAX_OWNERS, 0);

/// (policy, port) → `PORT_*` bits.
#[map]
pub static PORTS: HashMap<PortKey, u32> = HashMap::pinned(MAX_PORTS, 0);

/// (policy, family, address prefix) → `ADDR_*` bits of every set holding that prefix, merged
/// at enroll time so that one longest-prefix lookup answers all address questions.
#[map]
pub static POD_ADDRS: LpmTrie<PodAddrKey, u32> = LpmTrie::pinned(MAX_ADDR_PREFIXES, 0);

/// Pod cgroup id → counters.
#[map]
pub static POD_STATS: PerCpuHashMap<u64, PodStats> = PerCpuHashMap::pinned(MAX_PODS, 0);

/// Captured connections between the client's connect callback and the creation of the
/// proxy's socket, which then takes its record over; the loader sets its capacity. Not LRU: a
/// full map refuses new entries (counted as `handshake_failed`) rather than silently evicting
/// one in flight. Not preallocated: an element is freed after an RCU grace period, so a copy
/// read through a lookup cannot be changed under the reader. Failed handshakes remove their
/// entries; the agent removes the rare ones no proxy ever took over.
#[map]
pub static HANDSHAKES: HashMap<HandshakeKey, Handshake> =
    HashMap::pinned(DEFAULT_HANDSHAKE_CAPACITY, BPF_F_NO_PREALLOC as u32);

/// How many entries of `HANDSHAKES` the programs made and removed (one element per CPU): the
/// agent reads the map's occupancy from it without walking the map.
#[map]
pub static HANDSHAKE_TALLY: PerCpuArray<HandshakeTally> = PerCpuArray::pinned(1, 0);

/// The record of each socket of a captured connection, freed with the socket.
#[btf_map]
pub static SOCKET_RECORDS: SkStorage<SocketRecord> = SkStorage::new();

/// Node-wide run-time switches (one entry).
#[map]
pub static SETTINGS: Array<Settings> = Array::pinned(1, 0);

/// Pod address → what `sk_lookup` needs of the pod.
#[map]
pub static INBOUND_ADDRS: HashMap<InboundAddrKey, InboundPod> =
    HashMap::pinned(MAX_INBOUND_ADDRS, 0);

/// The proxies' inbound listening sockets, put here by the listen callback; a socket leaves
/// by itself when it closes. Two families and several slots per pod.
#[map]
pub static LISTENERS: SockHash<ListenerKey> = SockHash::pinned(MAX_PODS * 2 * LISTENER_SLOTS, 0);
