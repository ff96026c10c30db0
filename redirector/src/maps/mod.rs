//! The pinned maps, one module per family: each owns its keys' and values' layout and every
//! write to it, so that enroll, unenroll, status and an upgrade all go through the same code.
//! - [`settings`]: the pods' settings (cgroup storage of the pod's cgroup).
//! - [`policy_sets`]: the pods' owner, port and address sets, by pod and generation.
//! - [`counters`]: the pods' per-CPU counters; their entry is also the index of enrolled pods.
//! - [`inbound`]: the pods' inbound addresses, for `sk_lookup`.
//! - [`records`]: the connection records (socket storage) and the handshake map.
//! - [`switches`]: node-wide run-time switches.
pub mod counters;
pub mod inbound;
pub mod policy_sets;
pub mod records;
pub mod settings;
pub mod switches;

use aya::maps::{Map, MapData, MapError};

use crate::{
    loader::{self, LoadError},
    pins::PinRoot,
};

/// A map write or read failed.
#[derive(Debug, thiserror::Error)]
#[error("map {map}: {source}")]
pub struct MapAccessError {
    pub map: &'static str,
    #[source]
    pub source: MapFailure,
}

#[derive(Debug, thiserror::Error)]
pub enum MapFailure {
    #[error(transparent)]
    Aya(#[from] MapError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub(crate) fn access_error<E: Into<MapFailure>>(
    map: &'static str,
) -> impl FnOnce(E) -> MapAccessError {
    move |source| MapAccessError {
        map,
        source: source.into(),
    }
}

/// Deleting a key that is not there is success for idempotent removals.
pub(crate) fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.kind() == std::io::ErrorKind::NotFound => {
            Ok(())
        }
        other => other,
    }
}

/// Every pinned map of a root, by family.
pub struct Maps {
    pub settings: settings::PodSettings,
    pub policy_sets: policy_sets::PolicySets,
    pub counters: counters::Counters,
    pub inbound: inbound::InboundAddresses,
    pub records: records::Records,
    pub switches: switches::Switches,
}

impl Maps {
    /// A pinned map that does not open as this build's type is, as a rule, another build's
    /// layout: then the error is the layout check's, which names the map and what to do.
    pub fn open(root: &PinRoot) -> Result<Self, LoadError> {
        Self::open_typed(root).map_err(|error| match loader::check_map_layouts(root) {
            Err(mismatch @ LoadError::LayoutMismatch { .. }) => mismatch,
            _ => error,
        })
    }

    fn open_typed(root: &PinRoot) -> Result<Self, LoadError> {
        Ok(Self {
            settings: settings::PodSettings::open(root)?,
            policy_sets: policy_sets::PolicySets::open(root)?,
            counters: counters::Counters::open(root)?,
            inbound: inbound::InboundAddresses::open(root)?,
            records: records::Records::open(root)?,
            switches: switches::Switches::open(root)?,
        })
    }
}

/// Opens one pinned map as its typed wrapper.
pub fn open_map<T: TryFrom<Map, Error = MapError>>(
    root: &PinRoot,
    name: &'static str,
) -> Result<T, LoadError> {
    let open = || {
        let data = MapData::from_pin(root.map(name))?;
        T::try_from(Map::from_map_data(data)?)
    };
    open().map_err(|source| LoadError::OpenMap { name, source })
}
