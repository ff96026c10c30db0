//! `OWNERS`, `PORTS` and `POD_ADDRS`: the sets a pod's policy is decided by, keyed by pod and
//! generation. A policy change writes its sets under a new generation beside the old ones, the
//! pod's settings switch to it in one write, and the old generation goes after: the programs
//! never decide a connection by a mix of two policies.
use std::collections::BTreeMap;

use aya::maps::{lpm_trie::Key, lpm_trie::LpmTrie, HashMap, MapData, MapError};
use ipnet::IpNet;
use redirector_common::{map_names, OwnerKey, PodAddrKey, PortKey, POD_ADDR_KEY_FIXED_BITS};

use super::{access_error, ignore_missing, open_map, MapAccessError};
use crate::{
    loader::LoadError,
    original_dst::{ip_from_words, kernel_words},
    pins::PinRoot,
    policy::CompiledPolicy,
};

pub struct PolicySets {
    owners: HashMap<MapData, OwnerKey, u8>,
    ports: HashMap<MapData, PortKey, u32>,
    addrs: LpmTrie<MapData, PodAddrKey, u32>,
}

/// One generation of a pod's sets, as read back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetsRead {
    /// (`OWNER_*` kind, id).
    pub owners: Vec<(u32, u32)>,
    /// (port, `PORT_*` bits).
    pub ports: Vec<(u16, u32)>,
    /// (prefix, `ADDR_*` bits).
    pub prefixes: Vec<(IpNet, u32)>,
}

/// The trie key of a prefix of a pod's generation.
fn prefix_key(pod: u64, generation: u32, prefix: IpNet) -> Key<PodAddrKey> {
    let (family, addr) = kernel_words(prefix.addr());
    Key::new(
        POD_ADDR_KEY_FIXED_BITS + u32::from(prefix.prefix_len()),
        PodAddrKey::new(pod, generation, family, addr),
    )
}

/// (pod, generation, prefix) of a trie key.
fn key_prefix(key: &Key<PodAddrKey>) -> Option<(u64, u32, IpNet)> {
    let data = key.data();
    let pod = u64::from(data.pod[0]) | (u64::from(data.pod[1]) << 32);
    let len = u8::try_from(key.prefix_len().checked_sub(POD_ADDR_KEY_FIXED_BITS)?).ok()?;
    let family = u16::try_from(data.family).ok()?;
    Some((
        pod,
        data.generation,
        IpNet::new(ip_from_words(family, data.addr), len).ok()?,
    ))
}

fn port_key(pod: u64, generation: u32, port: u16) -> PortKey {
    PortKey {
        pod,
        generation,
        port,
        _pad: 0,
    }
}

fn owner_key(pod: u64, generation: u32, (kind, id): (u32, u32)) -> OwnerKey {
    OwnerKey {
        pod,
        generation,
        kind,
        id,
        _pad: 0,
    }
}

impl PolicySets {
    pub fn open(root: &PinRoot) -> Result<Self, LoadError> {
        Ok(Self {
            owners: open_map(root, map_names::OWNERS)?,
            ports: open_map(root, map_names::PORTS)?,
            addrs: open_map(root, map_names::POD_ADDRS)?,
        })
    }

    /// Writes a compiled policy's sets under `generation`.
    pub fn write(
        &mut self,
        pod: u64,
        generation: u32,
        compiled: &CompiledPolicy,
    ) -> Result<(), MapAccessError> {
        for &owner in &compiled.owners {
            self.owners
                .insert(owner_key(pod, generation, owner), 1, 0)
                .map_err(access_error(map_names::OWNERS))?;
        }
        for &(port, bits) in &compiled.ports {
            self.ports
                .insert(port_key(pod, generation, port), bits, 0)
                .map_err(access_error(map_names::PORTS))?;
        }
        for &(prefix, bits) in &compiled.prefixes {
            self.addrs
                .insert(&prefix_key(pod, generation, prefix), bits, 0)
                .map_err(access_error(map_names::POD_ADDRS))?;
        }
        Ok(())
    }

    /// Removes the pod's sets of every generation but `keep` (all of them with `None`). A full
    /// walk of each map: only done when a pod's policy changes or it leaves.
    pub fn remove_other_generations(
        &mut self,
        pod: u64,
        keep: Option<u32>,
    ) -> Result<(), MapAccessError> {
        self.remove_where(|p, generation| p == pod && Some(generation) != keep)
    }

    /// Removes every set of a (pod, generation) that is `stale`: one walk of each map.
    pub fn remove_where(&mut self, stale: impl Fn(u64, u32) -> bool) -> Result<(), MapAccessError> {
        let owners: Vec<OwnerKey> = keys(&self.owners, map_names::OWNERS)?
            .into_iter()
            .filter(|key| stale(key.pod, key.generation))
            .collect();
        for key in owners {
            ignore_missing(self.owners.remove(&key)).map_err(access_error(map_names::OWNERS))?;
        }
        let ports: Vec<PortKey> = keys(&self.ports, map_names::PORTS)?
            .into_iter()
            .filter(|key| stale(key.pod, key.generation))
            .collect();
        for key in ports {
            ignore_missing(self.ports.remove(&key)).map_err(access_error(map_names::PORTS))?;
        }
        for (p, generation, prefix, _) in self.prefixes()? {
            if stale(p, generation) {
                ignore_missing(self.addrs.remove(&prefix_key(p, generation, prefix)))
                    .map_err(access_error(map_names::POD_ADDRS))?;
            }
        }
        Ok(())
    }

    /// Every pod's sets, by (pod, generation): one walk of each map.
    pub fn read_all(&self) -> Result<BTreeMap<(u64, u32), SetsRead>, MapAccessError> {
        let mut sets: BTreeMap<(u64, u32), SetsRead> = BTreeMap::new();
        for key in keys(&self.owners, map_names::OWNERS)? {
            sets.entry((key.pod, key.generation))
                .or_default()
                .owners
                .push((key.kind, key.id));
        }
        for entry in self.ports.iter() {
            let (key, bits) = entry.map_err(access_error(map_names::PORTS))?;
            sets.entry((key.pod, key.generation))
                .or_default()
                .ports
                .push((key.port, bits));
        }
        for (pod, generation, prefix, bits) in self.prefixes()? {
            sets.entry((pod, generation))
                .or_default()
                .prefixes
                .push((prefix, bits));
        }
        for read in sets.values_mut() {
            read.owners.sort_unstable();
            read.ports.sort_unstable();
            read.prefixes.sort_unstable();
        }
        Ok(sets)
    }

    fn prefixes(&self) -> Result<Vec<(u64, u32, IpNet, u32)>, MapAccessError> {
        let mut prefixes = Vec::new();
        for entry in self.addrs.iter() {
            let (key, bits) = entry.map_err(access_error(map_names::POD_ADDRS))?;
            if let Some((pod, generation, prefix)) = key_prefix(&key) {
                prefixes.push((pod, generation, prefix, bits));
            }
        }
        Ok(prefixes)
    }
}

fn keys<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<Vec<K>, MapAccessError> {
    map.keys()
        .collect::<Result<Vec<K>, MapError>>()
        .map_err(access_error(name))
}
