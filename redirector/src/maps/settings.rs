//! `POD_SETTINGS`: each pod's [`PodConfig`], in the cgroup storage of the pod's cgroup, keyed by
//! the cgroup id alone (aya 0.14 only knows the per-attach-type key, hence the raw access). A
//! value exists from the moment a program using the map is attached to the cgroup; the
//! programs treat it as "not enrolled" until it is written.
use std::os::fd::AsFd as _;

use aya::maps::MapData;
use redirector_common::{map_names, PodConfig};

use super::{access_error, MapAccessError};
use crate::{loader::LoadError, pins::PinRoot, sys};

pub struct PodSettings {
    data: MapData,
}

impl PodSettings {
    const NAME: &'static str = map_names::POD_SETTINGS;

    pub fn open(root: &PinRoot) -> Result<Self, LoadError> {
        let data =
            MapData::from_pin(root.map(Self::NAME)).map_err(|source| LoadError::OpenMap {
                name: Self::NAME,
                source,
            })?;
        Ok(Self { data })
    }

    /// The settings written for `pod`; `None` when there are none (not attached, or not
    /// written).
    pub fn get(&self, pod: u64) -> Result<Option<PodConfig>, MapAccessError> {
        let config: Option<PodConfig> =
            sys::map_lookup(self.data.fd().as_fd(), &pod).map_err(access_error(Self::NAME))?;
        Ok(config.filter(|config| config.pod != 0))
    }

    /// Writes a pod's settings in one update, which the kernel swaps in whole: the programs
    /// see the old value or the new one. The pod's programs must be attached already.
    pub fn set(&self, config: &PodConfig) -> Result<(), MapAccessError> {
        sys::map_update(self.data.fd().as_fd(), &config.pod, config)
            .map_err(access_error(Self::NAME))
    }
}
