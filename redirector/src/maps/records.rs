//! The connection records: `SOCKET_RECORDS` (socket storage, freed with each socket: nothing to
//! manage) and `HANDSHAKES` (captured connections between the client's connect callback and the
//! creation of the proxy's socket; LRU and bounded).
use aya::maps::{HashMap, Map, MapData};
use redirector_common::{map_names, Handshake, HandshakeKey};
use serde::{Deserialize, Serialize};

use super::{access_error, ignore_missing, MapAccessError};
use crate::{loader::LoadError, pins::PinRoot};

pub struct Records {
    handshakes: HashMap<MapData, HandshakeKey, Handshake>,
    capacity: u32,
}

/// What the record maps hold. Open connections keep their records in their sockets' storage,
/// which has no capacity of its own; only handshakes in flight occupy the bounded map.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordCounts {
    /// Captured connections whose proxy side does not exist yet.
    pub in_flight: usize,
    /// Capacity of the handshake map.
    pub capacity: u32,
    /// Captured connections whose record could not be kept for the proxy side (the map was
    /// full), over the enrolled pods: their proxy's lookup misses.
    pub overflowed: u64,
}

impl RecordCounts {
    /// 80 % of the capacity or more in flight: the agent warns, before connections start to
    /// fail at their proxy.
    pub fn nearly_full(&self) -> bool {
        self.capacity > 0 && self.in_flight as u64 * 5 >= u64::from(self.capacity) * 4
    }
}

impl Records {
    pub fn open(root: &PinRoot) -> Result<Self, LoadError> {
        let name = map_names::HANDSHAKES;
        let open = || {
            let data = MapData::from_pin(root.map(name))?;
            let capacity = data.info()?.max_entries();
            Ok((HashMap::try_from(Map::from_map_data(data)?)?, capacity))
        };
        let (handshakes, capacity) =
            open().map_err(|source| LoadError::OpenMap { name, source })?;
        Ok(Self {
            handshakes,
            capacity,
        })
    }

    /// Counts the handshakes in flight: a walk of the map, which holds next to nothing when
    /// connections complete (entries leave as the proxy side takes them over). `overflowed`
    /// comes from the pods' counters.
    pub fn counts(&self, overflowed: u64) -> Result<RecordCounts, MapAccessError> {
        let in_flight = self
            .handshakes
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(access_error(map_names::HANDSHAKES))?
            .len();
        Ok(RecordCounts {
            in_flight,
            capacity: self.capacity,
            overflowed,
        })
    }

    /// Removes the handshakes published before `published_before_ns` (CLOCK_MONOTONIC): no
    /// proxy side took them over long after any handshake could have completed (a client
    /// gives up after its SYN retries, about two minutes by default). Returns how many went.
    pub fn expire(&mut self, published_before_ns: u64) -> Result<usize, MapAccessError> {
        let stale: Vec<HandshakeKey> = self
            .handshakes
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, handshake)| handshake.created_ns < published_before_ns)
            .map(|(key, _)| key)
            .collect();
        for key in &stale {
            ignore_missing(self.handshakes.remove(key))
                .map_err(access_error(map_names::HANDSHAKES))?;
        }
        Ok(stale.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(in_flight: usize, capacity: u32) -> RecordCounts {
        RecordCounts {
            in_flight,
            capacity,
            overflowed: 0,
        }
    }

    #[test]
    fn nearly_full_from_eighty_percent() {
        assert!(!counts(0, 1024).nearly_full());
        assert!(!counts(819, 1024).nearly_full());
        assert!(counts(820, 1024).nearly_full());
        assert!(counts(1024, 1024).nearly_full());
        assert!(!counts(52_428, 65_536).nearly_full());
        assert!(counts(52_429, 65_536).nearly_full());
        // The largest capacity does not overflow the comparison.
        assert!(counts(u32::MAX as usize, u32::MAX).nearly_full());
        assert!(!counts(0, 0).nearly_full());
    }
}
