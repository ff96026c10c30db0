//! `INBOUND_ADDRS`: the pods' own addresses with inbound capture, with the part of each pod's
//! settings the `sk_lookup` program needs (it can read neither cgroup storage nor the netns
//! cookie, so it finds the pod by the connection's local address).
use std::net::IpAddr;

use aya::maps::{HashMap, MapData};
use redirector_common::{map_names, InboundAddrKey, InboundPod};

use super::{access_error, ignore_missing, open_map, MapAccessError};
use crate::{loader::LoadError, original_dst::kernel_words, pins::PinRoot};

pub struct InboundAddresses {
    map: HashMap<MapData, InboundAddrKey, InboundPod>,
}

pub fn address_key(addr: IpAddr) -> InboundAddrKey {
    let (family, addr) = kernel_words(addr);
    InboundAddrKey {
        family: u32::from(family),
        addr,
    }
}

impl InboundAddresses {
    const NAME: &'static str = map_names::INBOUND_ADDRS;

    pub fn open(root: &PinRoot) -> Result<Self, LoadError> {
        Ok(Self {
            map: open_map(root, Self::NAME)?,
        })
    }

    /// The pod that has inbound capture on `addr`, if any.
    pub fn owner(&self, addr: IpAddr) -> Option<u64> {
        self.map.get(&address_key(addr), 0).ok().map(|pod| pod.pod)
    }

    pub fn set(&mut self, addr: IpAddr, pod: InboundPod) -> Result<(), MapAccessError> {
        self.map
            .insert(address_key(addr), pod, 0)
            .map_err(access_error(Self::NAME))
    }

    /// Removes the pod's addresses that `keep` does not select.
    pub fn remove_where(
        &mut self,
        pod: u64,
        keep: impl Fn(&InboundAddrKey) -> bool,
    ) -> Result<(), MapAccessError> {
        let mut stale = Vec::new();
        for entry in self.map.iter() {
            let (key, owner) = entry.map_err(access_error(Self::NAME))?;
            if owner.pod == pod && !keep(&key) {
                stale.push(key);
            }
        }
        for key in stale {
            ignore_missing(self.map.remove(&key)).map_err(access_error(Self::NAME))?;
        }
        Ok(())
    }
}
