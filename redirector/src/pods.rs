//! The library API: enroll, unenroll and list pods on one pin root.
use std::{
    collections::HashMap,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::{
    maps::{lpm_trie::Key, HashMap as BpfHashMap, MapData, MapError, PerCpuValues},
    Pod,
};
use ipnet::IpNet;
use redirector_common::{
    InboundAddrKey, InboundNetns, InboundPod, OwnerKey, PodAddrKey, PodStats, PortKey, Settings,
    ADDR_DNS_SERVER, ADDR_EXCLUDE, ADDR_INCLUDE, ADDR_LOCAL, ADDR_LOOPBACK_CIDR, OWNER_GID,
    OWNER_UID, POD_ADDR_KEY_FIXED_BITS, POLICY_CAPTURE_ALL_DNS, POLICY_GROUPS_EXCLUDE,
    POLICY_GROUPS_INCLUDE, POLICY_INCLUDE_ALL, POLICY_IPV4, POLICY_IPV6, POLICY_LOOPBACK_INCLUDED,
    POLICY_REDIRECT_DNS, PORT_INBOUND_EXCLUDE, PORT_INBOUND_INCLUDE, PORT_OUTBOUND_EXCLUDE,
    PORT_OUTBOUND_INCLUDE,
};
use serde::{Deserialize, Serialize};

use crate::{
    cgroup::{self, Cgroup, CgroupError},
    kernel::{self, KernelError},
    link::{self, Hook},
    loader::{self, LoadError, Maps, Programs},
    netns::{NetnsError, PodNetns},
    original_dst::{ip_from_words, kernel_words},
    pins::{PinError, PinRoot, RootLock},
    policy::{CompiledPolicy, Policy},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Pin(#[from] PinError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("attaching {hook} to cgroup {cgroup}: {source}")]
    Attach {
        hook: &'static str,
        cgroup: PathBuf,
        source: std::io::Error,
    },
    #[error("map {map}: {source}")]
    Map { map: &'static str, source: MapError },
    #[error("counting CPUs: {0}")]
    Cpus(std::io::Error),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("inbound capture (-b) needs the pod's network namespace: pass --netns")]
    InboundNeedsNetns,
    #[error("address {addr} already has inbound capture for another pod (cgroup id {other}); pod addresses must be unique on a node")]
    AddressClaimed { addr: std::net::IpAddr, other: u64 },
    #[error(
        "network namespace {path} already has inbound capture for another pod (cgroup id {other})"
    )]
    NetnsClaimed { path: PathBuf, other: u64 },
}

fn map_error(map: &'static str) -> impl FnOnce(MapError) -> Error {
    move |source| Error::Map { map, source }
}

/// One enrolled pod as the maps describe it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodStatus {
    /// None when the cgroup no longer exists.
    pub cgroup: Option<PathBuf>,
    pub cgroup_id: u64,
    pub proxy_port: u16,
    pub inbound_capture_port: u16,
    pub inbound_tunnel_port: u16,
    pub proxy_uids: Vec<u32>,
    pub proxy_gids: Vec<u32>,
    /// The pod's `POLICY_*` switches, by name.
    pub switches: Vec<String>,
    /// Ports with a rule, and which.
    pub ports: Vec<LabelledEntry>,
    /// Address prefixes with a rule, and which sets hold them.
    pub prefixes: Vec<LabelledEntry>,
    /// Hooks whose link is pinned (all of them while the pod is enrolled).
    pub attached: Vec<String>,
    /// Counters summed over CPUs.
    pub counters: PodStats,
}

/// A port or prefix with the names of the sets that hold it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelledEntry {
    pub value: String,
    pub sets: Vec<String>,
}

const SWITCH_NAMES: [(u32, &str); 9] = [
    (POLICY_IPV4, "ipv4"),
    (POLICY_IPV6, "ipv6"),
    (POLICY_INCLUDE_ALL, "include_all"),
    (POLICY_REDIRECT_DNS, "redirect_dns"),
    (POLICY_CAPTURE_ALL_DNS, "capture_all_dns"),
    (POLICY_LOOPBACK_INCLUDED, "loopback_included"),
    (POLICY_GROUPS_INCLUDE, "owner_groups_include"),
    (POLICY_GROUPS_EXCLUDE, "owner_groups_exclude"),
    (0, ""),
];
const PORT_SET_NAMES: [(u32, &str); 4] = [
    (PORT_OUTBOUND_EXCLUDE, "outbound_exclude"),
    (PORT_OUTBOUND_INCLUDE, "outbound_include"),
    (PORT_INBOUND_INCLUDE, "inbound_include"),
    (PORT_INBOUND_EXCLUDE, "inbound_exclude"),
];
const ADDR_SET_NAMES: [(u32, &str); 5] = [
    (ADDR_LOCAL, "local"),
    (ADDR_LOOPBACK_CIDR, "loopback_cidr"),
    (ADDR_EXCLUDE, "exclude"),
    (ADDR_INCLUDE, "include"),
    (ADDR_DNS_SERVER, "dns_server"),
];

/// The names of the bits set in `bits`.
pub fn bit_names(bits: u32, names: &[(u32, &'static str)]) -> Vec<String> {
    names
        .iter()
        .filter(|(bit, _)| *bit != 0 && bits & bit != 0)
        .map(|(_, name)| (*name).to_owned())
        .collect()
}

pub fn port_set_names(bits: u32) -> Vec<String> {
    bit_names(bits, &PORT_SET_NAMES)
}

pub fn addr_set_names(bits: u32) -> Vec<String> {
    bit_names(bits, &ADDR_SET_NAMES)
}

pub fn switch_names(bits: u32) -> Vec<String> {
    bit_names(bits, &SWITCH_NAMES)
}

/// The trie key of a prefix of a pod.
pub fn prefix_key(pod: u64, prefix: IpNet) -> Key<PodAddrKey> {
    let (family, addr) = kernel_words(prefix.addr());
    Key::new(
        POD_ADDR_KEY_FIXED_BITS + u32::from(prefix.prefix_len()),
        PodAddrKey::new(pod, family, addr),
    )
}

fn key_prefix(key: &Key<PodAddrKey>) -> Option<(u64, IpNet)> {
    let data = key.data();
    let pod = u64::from(data.pod[0]) | (u64::from(data.pod[1]) << 32);
    let len = u8::try_from(key.prefix_len().checked_sub(POD_ADDR_KEY_FIXED_BITS)?).ok()?;
    let family = u16::try_from(data.family).ok()?;
    Some((pod, IpNet::new(ip_from_words(family, data.addr), len).ok()?))
}

/// Connection records currently held (they leave when their connection closes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordCounts {
    pub by_cookie: usize,
    pub by_peer: usize,
}

/// An installation on one pin root, locked for the lifetime of this value.
pub struct Redirector {
    root: PinRoot,
    maps: Maps,
    /// Opened on first attach and kept: a long-lived holder (the agent, the lab) enrolls
    /// many pods without reopening the pins.
    programs: Option<Programs>,
    _lock: RootLock,
}

impl Redirector {
    /// Opens the installation at `root`, installing it first if needed (kernel check,
    /// programs loaded and pinned, maps created). The kernel is probed only when installing:
    /// probing loads test programs, too slow to repeat for every pod.
    pub fn install(root: PinRoot) -> Result<Self, Error> {
        root.check_bpffs()?;
        let lock = root.create_and_lock()?;
        if !loader::programs_pinned(&root) {
            kernel::check()?;
            loader::ensure_programs_pinned(&root)?;
        }
        let maps = Maps::open(&root)?;
        Ok(Self {
            root,
            maps,
            programs: None,
            _lock: lock,
        })
    }

    /// Opens an existing installation; `None` when nothing is installed at `root`.
    pub fn open(root: PinRoot) -> Result<Option<Self>, Error> {
        if !root.exists() {
            return Ok(None);
        }
        root.check_bpffs()?;
        let lock = root.lock()?;
        if !root.map(redirector_common::map_names::POD_CONFIG).exists() {
            return Ok(None);
        }
        let maps = Maps::open(&root)?;
        Ok(Some(Self {
            root,
            maps,
            programs: None,
            _lock: lock,
        }))
    }

    pub fn root(&self) -> &PinRoot {
        &self.root
    }

    /// Enrolls the pod whose cgroup is `cgroup`, or updates its policy if it is enrolled
    /// already (new connections follow the new policy; links are not re-made). On failure
    /// a new enrollment is undone completely. `netns` is the pod's network namespace: its
    /// addresses are the pod's local ones, and inbound capture attaches to it.
    pub fn enroll(
        &mut self,
        cgroup: &Cgroup,
        policy: &Policy,
        netns: Option<&PodNetns>,
    ) -> Result<(), Error> {
        if policy.captures_inbound() && netns.is_none() {
            return Err(Error::InboundNeedsNetns);
        }
        // A pod unknown to POD_CONFIG has no other entries (unenroll removes POD_CONFIG last),
        // so the scans for stale entries, which grow with the number of pods, are skipped.
        let new = self.maps.pod_config.get(&cgroup.id, 0).is_err();
        let network = netns.map(|n| n.network.clone()).unwrap_or_default();
        let compiled = policy.compile(cgroup.id, &network);
        let result = self
            .write_policy(cgroup.id, &compiled, !new)
            .and_then(|()| self.attach_missing(cgroup))
            .and_then(|()| {
                self.set_inbound(cgroup.id, netns.filter(|_| policy.captures_inbound()), !new)
            });
        if result.is_err() && new {
            let _ = self.unenroll(cgroup.id);
        }
        result
    }

    /// Inbound capture on the pod's network namespace: its addresses and netns cookie in the
    /// maps, the sk_lookup link pinned; or none of it when `netns` is `None`.
    fn set_inbound(
        &mut self,
        pod: u64,
        netns: Option<&PodNetns>,
        known: bool,
    ) -> Result<(), Error> {
        let wanted: Vec<(InboundAddrKey, std::net::IpAddr)> = netns
            .map(|netns| {
                netns
                    .network
                    .addresses
                    .iter()
                    .filter(|a| !a.to_canonical().is_loopback())
                    .map(|&a| {
                        let (family, addr) = kernel_words(a);
                        (
                            InboundAddrKey {
                                family: u32::from(family),
                                addr,
                            },
                            a,
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        for (key, addr) in &wanted {
            if let Ok(owner) = self.maps.inbound_addrs.get(key, 0) {
                if owner.pod != pod {
                    return Err(Error::AddressClaimed {
                        addr: *addr,
                        other: owner.pod,
                    });
                }
            }
        }
        let pin = self.root.pod_dir(pod).join(Hook::Inbound.pin_name());
        let previous: Vec<u64> = if known {
            self.inbound_netns_of(pod)?
        } else {
            Vec::new()
        };
        if let Some(netns) = netns {
            if let Ok(owner) = self.maps.inbound_netns.get(&netns.cookie, 0) {
                if owner.pod != pod {
                    return Err(Error::NetnsClaimed {
                        path: netns.path.clone(),
                        other: owner.pod,
                    });
                }
            }
            let config = self
                .maps
                .pod_config
                .get(&pod, 0)
                .map_err(map_error("POD_CONFIG"))?;
            let entry = InboundNetns {
                pod,
                inbound_port: config.inbound_port,
                _pad: [0; 6],
            };
            self.maps
                .inbound_netns
                .insert(netns.cookie, entry, 0)
                .map_err(map_error("INBOUND_NETNS"))?;
            let owner = InboundPod {
                pod,
                netns_cookie: netns.cookie,
            };
            for (key, _) in &wanted {
                self.maps
                    .inbound_addrs
                    .insert(*key, owner, 0)
                    .map_err(map_error("INBOUND_ADDRS"))?;
            }
            // A link to another namespace (the pod was re-enrolled with a new one) goes.
            if previous.iter().any(|&cookie| cookie != netns.cookie) {
                self.root.remove_pin(&pin)?;
            }
            if !pin.exists() {
                let target =
                    std::fs::File::open(&netns.path).map_err(|source| NetnsError::Open {
                        path: netns.path.clone(),
                        source,
                    })?;
                link::attach_pinned(
                    self.programs()?.fd(Hook::Inbound),
                    target.as_fd(),
                    Hook::Inbound,
                    &pin,
                )
                .map_err(|source| Error::Attach {
                    hook: Hook::Inbound.pin_name(),
                    cgroup: netns.path.clone(),
                    source,
                })?;
            }
        } else {
            self.root.remove_pin(&pin)?;
        }
        let wanted_cookie = netns.map(|n| n.cookie);
        for cookie in previous.into_iter().filter(|c| Some(*c) != wanted_cookie) {
            ignore_missing(self.maps.inbound_netns.remove(&cookie))
                .map_err(map_error("INBOUND_NETNS"))?;
        }
        let held = if known {
            self.inbound_addrs_of(pod)?
        } else {
            Vec::new()
        };
        for key in held
            .into_iter()
            .filter(|k| !wanted.iter().any(|(w, _)| w == k))
        {
            ignore_missing(self.maps.inbound_addrs.remove(&key))
                .map_err(map_error("INBOUND_ADDRS"))?;
        }
        Ok(())
    }

    fn inbound_netns_of(&self, pod: u64) -> Result<Vec<u64>, Error> {
        keys_where(&self.maps.inbound_netns, "INBOUND_NETNS", |_, netns| {
            netns.pod == pod
        })
    }

    fn inbound_addrs_of(&self, pod: u64) -> Result<Vec<InboundAddrKey>, Error> {
        keys_where(&self.maps.inbound_addrs, "INBOUND_ADDRS", |_, owner| {
            owner.pod == pod
        })
    }

    /// Writes a compiled policy: the sets first and the config last, so that the programs
    /// never see a pod whose sets are still missing; entries the new policy dropped go last.
    fn write_policy(
        &mut self,
        pod: u64,
        compiled: &CompiledPolicy,
        known: bool,
    ) -> Result<(), Error> {
        if self.maps.pod_stats.get(&pod, 0).is_err() {
            let cpus = aya::util::nr_cpus().map_err(|(_, e)| Error::Cpus(e))?;
            let zeroes =
                PerCpuValues::try_from(vec![PodStats::default(); cpus]).map_err(Error::Cpus)?;
            self.maps
                .pod_stats
                .insert(pod, zeroes, 0)
                .map_err(map_error("POD_STATS"))?;
        }
        for key in &compiled.owners {
            self.maps
                .owners
                .insert(*key, 1, 0)
                .map_err(map_error("OWNERS"))?;
        }
        let port_keys: Vec<PortKey> = compiled
            .ports
            .iter()
            .map(|&(port, _)| port_key(pod, port))
            .collect();
        for (key, &(_, bits)) in port_keys.iter().zip(&compiled.ports) {
            self.maps
                .ports
                .insert(*key, bits, 0)
                .map_err(map_error("PORTS"))?;
        }
        let prefix_keys: Vec<(IpNet, u32)> = compiled.prefixes.clone();
        for &(prefix, bits) in &prefix_keys {
            self.maps
                .pod_addrs
                .insert(&prefix_key(pod, prefix), bits, 0)
                .map_err(map_error("POD_ADDRS"))?;
        }
        self.maps
            .pod_config
            .insert(pod, compiled.config, 0)
            .map_err(map_error("POD_CONFIG"))?;
        if !known {
            return Ok(());
        }

        for stale in self
            .owners_of(pod)?
            .into_iter()
            .filter(|key| !compiled.owners.contains(key))
        {
            ignore_missing(self.maps.owners.remove(&stale)).map_err(map_error("OWNERS"))?;
        }
        for stale in self
            .ports_of(pod)?
            .into_iter()
            .filter(|key| !port_keys.contains(key))
        {
            ignore_missing(self.maps.ports.remove(&stale)).map_err(map_error("PORTS"))?;
        }
        for (stale, _) in self
            .prefixes_of(pod)?
            .into_iter()
            .filter(|(p, _)| !prefix_keys.iter().any(|(q, _)| q == p))
        {
            ignore_missing(self.maps.pod_addrs.remove(&prefix_key(pod, stale)))
                .map_err(map_error("POD_ADDRS"))?;
        }
        Ok(())
    }

    fn programs(&mut self) -> Result<&Programs, Error> {
        if self.programs.is_none() {
            self.programs = Some(Programs::open(&self.root)?);
        }
        Ok(self.programs.as_ref().expect("just opened"))
    }

    fn attach_missing(&mut self, cgroup: &Cgroup) -> Result<(), Error> {
        let pod_dir = self.root.pod_dir(cgroup.id);
        let missing: Vec<Hook> = Hook::CGROUP
            .into_iter()
            .filter(|hook| !pod_dir.join(hook.pin_name()).exists())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        std::fs::create_dir_all(&pod_dir).map_err(|source| PinError::Io {
            path: pod_dir.clone(),
            source,
        })?;
        let programs = self.programs()?;
        for hook in missing {
            let attach_error = |source| Error::Attach {
                hook: hook.pin_name(),
                cgroup: cgroup.path.clone(),
                source,
            };
            let program = programs.fd(hook);
            link::attach_pinned(
                program,
                cgroup.dir.as_fd(),
                hook,
                &pod_dir.join(hook.pin_name()),
            )
            .map_err(attach_error)?;
        }
        Ok(())
    }

    /// Removes a pod: its links (detached), policy and counters. Returns whether anything
    /// was there.
    pub fn unenroll(&mut self, pod: u64) -> Result<bool, Error> {
        let existed = self.root.pod_dir(pod).exists() || self.maps.pod_config.get(&pod, 0).is_ok();
        // Links first: once they are gone no program runs for the pod. POD_CONFIG goes last:
        // a pod without it has no other entries (enroll relies on that).
        self.root.remove_pod(pod)?;
        for key in self.owners_of(pod)? {
            ignore_missing(self.maps.owners.remove(&key)).map_err(map_error("OWNERS"))?;
        }
        for key in self.ports_of(pod)? {
            ignore_missing(self.maps.ports.remove(&key)).map_err(map_error("PORTS"))?;
        }
        for (prefix, _) in self.prefixes_of(pod)? {
            ignore_missing(self.maps.pod_addrs.remove(&prefix_key(pod, prefix)))
                .map_err(map_error("POD_ADDRS"))?;
        }
        for cookie in self.inbound_netns_of(pod)? {
            ignore_missing(self.maps.inbound_netns.remove(&cookie))
                .map_err(map_error("INBOUND_NETNS"))?;
        }
        for key in self.inbound_addrs_of(pod)? {
            ignore_missing(self.maps.inbound_addrs.remove(&key))
                .map_err(map_error("INBOUND_ADDRS"))?;
        }
        ignore_missing(self.maps.pod_stats.remove(&pod)).map_err(map_error("POD_STATS"))?;
        ignore_missing(self.maps.pod_config.remove(&pod)).map_err(map_error("POD_CONFIG"))?;
        Ok(existed)
    }

    fn owners_of(&self, pod: u64) -> Result<Vec<OwnerKey>, Error> {
        keys_where(&self.maps.owners, "OWNERS", |key, _| key.pod == pod)
    }

    fn ports_of(&self, pod: u64) -> Result<Vec<PortKey>, Error> {
        keys_where(&self.maps.ports, "PORTS", |key, _| key.pod == pod)
    }

    /// Every pod's address prefixes with their set bits.
    fn all_prefixes(&self) -> Result<Vec<(u64, IpNet, u32)>, Error> {
        let mut prefixes = Vec::new();
        for entry in self.maps.pod_addrs.iter() {
            let (key, bits) = entry.map_err(map_error("POD_ADDRS"))?;
            if let Some((pod, prefix)) = key_prefix(&key) {
                prefixes.push((pod, prefix, bits));
            }
        }
        prefixes.sort_unstable();
        Ok(prefixes)
    }

    /// One pod's address prefixes with their set bits.
    fn prefixes_of(&self, pod: u64) -> Result<Vec<(IpNet, u32)>, Error> {
        Ok(self
            .all_prefixes()?
            .into_iter()
            .filter(|(owner, _, _)| *owner == pod)
            .map(|(_, p, b)| (p, b))
            .collect())
    }

    /// Every enrolled pod with its policy and counters.
    pub fn pods(&self) -> Result<Vec<PodStatus>, Error> {
        let cgroup_mount = cgroup::cgroup2_mount().ok();
        let pods: Result<Vec<_>, _> = self.maps.pod_config.iter().collect();
        let owners: Result<Vec<_>, _> = self.maps.owners.keys().collect();
        let owners = owners.map_err(map_error("OWNERS"))?;
        let ports: Result<Vec<_>, _> = self.maps.ports.iter().collect();
        let ports = ports.map_err(map_error("PORTS"))?;
        let pods = pods.map_err(map_error("POD_CONFIG"))?;
        let pod_ids: Vec<u64> = pods.iter().map(|(pod, _)| *pod).collect();
        let cgroups = cgroup_mount
            .map(|mount| cgroup::paths_by_id(&mount, &pod_ids))
            .unwrap_or_default();
        let mut prefixes: HashMap<u64, Vec<(IpNet, u32)>> = HashMap::new();
        for (pod, prefix, bits) in self.all_prefixes()? {
            prefixes.entry(pod).or_default().push((prefix, bits));
        }
        let mut statuses = Vec::new();
        for (pod, config) in pods {
            let ids = |kind| {
                owners
                    .iter()
                    .filter(|k| k.pod == pod && k.kind == kind)
                    .map(|k| k.id)
                    .collect()
            };
            let mut total = PodStats::default();
            if let Ok(per_cpu) = self.maps.pod_stats.get(&pod, 0) {
                per_cpu.iter().for_each(|cpu| total.add(cpu));
            }
            let mut pod_ports: Vec<_> = ports.iter().filter(|(k, _)| k.pod == pod).collect();
            pod_ports.sort_by_key(|(k, _)| k.port);
            let pod_dir = self.root.pod_dir(pod);
            statuses.push(PodStatus {
                cgroup: cgroups.get(&pod).cloned(),
                cgroup_id: pod,
                proxy_port: config.proxy_port,
                inbound_capture_port: config.inbound_port,
                inbound_tunnel_port: config.tunnel_port,
                proxy_uids: ids(OWNER_UID),
                proxy_gids: ids(OWNER_GID),
                switches: switch_names(config.flags),
                ports: pod_ports
                    .iter()
                    .map(|(k, bits)| LabelledEntry {
                        value: k.port.to_string(),
                        sets: port_set_names(*bits),
                    })
                    .collect(),
                prefixes: prefixes
                    .remove(&pod)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(p, bits)| LabelledEntry {
                        value: p.to_string(),
                        sets: addr_set_names(bits),
                    })
                    .collect(),
                attached: Hook::ALL
                    .into_iter()
                    .filter(|h| pod_dir.join(h.pin_name()).exists())
                    .map(|hook| hook.pin_name().to_owned())
                    .collect(),
                counters: total,
            });
        }
        statuses.sort_by_key(|status| status.cgroup_id);
        Ok(statuses)
    }

    pub fn records(&self) -> RecordCounts {
        RecordCounts {
            by_cookie: self
                .maps
                .orig_by_cookie
                .keys()
                .filter(Result::is_ok)
                .count(),
            by_peer: self.maps.orig_by_peer.keys().filter(Result::is_ok).count(),
        }
    }

    /// Switches the programs' per-connection log lines on or off, node-wide.
    pub fn set_connection_logging(&mut self, on: bool) -> Result<(), Error> {
        self.maps
            .settings
            .set(
                0,
                Settings {
                    log_connections: u32::from(on),
                },
                0,
            )
            .map_err(map_error("SETTINGS"))
    }
}

/// The keys of `map`'s entries that `keep` selects (a full walk of the map).
fn keys_where<K: Pod, V: Pod>(
    map: &BpfHashMap<MapData, K, V>,
    name: &'static str,
    keep: impl Fn(&K, &V) -> bool,
) -> Result<Vec<K>, Error> {
    let mut keys = Vec::new();
    for entry in map.iter() {
        let (key, value) = entry.map_err(map_error(name))?;
        if keep(&key, &value) {
            keys.push(key);
        }
    }
    Ok(keys)
}

fn port_key(pod: u64, port: u16) -> PortKey {
    PortKey {
        pod,
        port,
        _pad: [0; 6],
    }
}

/// Deleting a key that is not there is success for an idempotent unenroll.
fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.kind() == std::io::ErrorKind::NotFound => {
            Ok(())
        }
        other => other,
    }
}

/// Enrolls the pod at `cgroup_path` on `root`, installing redirector there if needed. The
/// pod's network namespace, when given, tells which destinations are local to the pod (its
/// own addresses) and whether IPv6 is captured, as istio-iptables decides; without it only
/// loopback is local and IPv6 is captured.
/// Bad input is refused before anything is touched; a failure after that leaves the root
/// as it was (an installation this call made is removed again).
pub fn enroll(
    root: &PinRoot,
    cgroup_path: &Path,
    policy: &Policy,
    netns: Option<&Path>,
) -> Result<Enrolled, Error> {
    let cgroup = Cgroup::open(cgroup_path)?;
    let netns = netns.map(PodNetns::read).transpose()?;
    if policy.captures_inbound() && netns.is_none() {
        return Err(Error::InboundNeedsNetns);
    }
    let fresh = !root.exists();
    let result = Redirector::install(root.clone())
        .and_then(|mut redirector| redirector.enroll(&cgroup, policy, netns.as_ref()));
    if let Err(error) = result {
        if fresh {
            let _ = root.remove_all();
        }
        return Err(error);
    }
    Ok(Enrolled { cgroup, netns })
}

/// What [`enroll`] found and enrolled.
#[derive(Debug)]
pub struct Enrolled {
    pub cgroup: Cgroup,
    pub netns: Option<PodNetns>,
}

/// Unenrolls the pod at `cgroup_path`; returns whether it was enrolled. Idempotent.
pub fn unenroll(root: &PinRoot, cgroup_path: &Path) -> Result<bool, Error> {
    let cgroup = Cgroup::open(cgroup_path)?;
    match Redirector::open(root.clone())? {
        Some(mut redirector) => redirector.unenroll(cgroup.id),
        None => Ok(false),
    }
}

/// Removes every pin and attachment under `root`; returns whether anything was there.
pub fn uninstall(root: &PinRoot) -> Result<bool, Error> {
    if !root.exists() {
        return Ok(false);
    }
    root.check_bpffs()?;
    let _lock = root.lock()?;
    root.remove_all()?;
    Ok(true)
}
