//! The connection records: `SOCKET_RECORDS` (socket storage, freed with each socket: nothing to
//! manage) and `HANDSHAKES` (captured connections between the client's connect callback and the
//! creation of the proxy's socket; bounded), with `HANDSHAKE_TALLY`, the programs' count of the
//! entries they made and removed.
use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use redirector_common::{map_names, Handshake, HandshakeKey, HandshakeTally};
use serde::{Deserialize, Serialize};

use super::{access_error, ignore_missing, open_map, MapAccessError};
use crate::{loader::LoadError, pins::PinRoot};

pub struct Records {
    handshakes: HashMap<MapData, HandshakeKey, Handshake>,
    tally: PerCpuArray<MapData, HandshakeTally>,
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

/// What [`Records::expire`] did, and what it found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Expired {
    /// Entries removed.
    pub removed: usize,
    /// What the tally misses of the map's true occupancy, as the walk found it: entries the
    /// programs' tally never saw (made by programs that kept none, before an upgrade in place)
    /// or saw twice (an entry replaced under the same key), and those the walk removed.
    /// [`Records::counts`] adds it.
    pub baseline: i64,
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
            tally: open_map(root, map_names::HANDSHAKE_TALLY)?,
            capacity,
        })
    }

    /// Entries the programs made less those they removed, over every CPU.
    fn tallied(&self) -> Result<i64, MapAccessError> {
        let per_cpu = self
            .tally
            .get(&0, 0)
            .map_err(access_error(map_names::HANDSHAKE_TALLY))?;
        Ok(per_cpu.iter().fold(0_i64, |sum, cpu| {
            sum.wrapping_add(cpu.published.wrapping_sub(cpu.settled) as i64)
        }))
    }

    /// The handshakes in flight, from the programs' tally and the `baseline` of the last
    /// [`Records::expire`] (0 without one): no walk of the map, however full it is, so that a
    /// status or a scrape costs the same at any load. `overflowed` comes from the pods'
    /// counters.
    pub fn counts(&self, overflowed: u64, baseline: i64) -> Result<RecordCounts, MapAccessError> {
        let in_flight = self
            .tallied()?
            .saturating_add(baseline)
            .clamp(0, i64::from(self.capacity));
        Ok(RecordCounts {
            in_flight: in_flight as usize,
            capacity: self.capacity,
            overflowed,
        })
    }

    /// Removes the handshakes published before `published_before_ns` (CLOCK_MONOTONIC): no
    /// proxy side took them over long after any handshake could have completed (a client
    /// gives up after its SYN retries, about two minutes by default). The walk also counts what
    /// stays, which sets the tally's baseline (exact up to the handshakes that began or ended
    /// during the walk; the next walk corrects that).
    pub fn expire(&mut self, published_before_ns: u64) -> Result<Expired, MapAccessError> {
        let mut stale = Vec::new();
        let mut walked = 0_i64;
        for entry in self.handshakes.iter() {
            // aya's walk skips entries removed between a key and its lookup.
            let (key, handshake) = entry.map_err(access_error(map_names::HANDSHAKES))?;
            walked += 1;
            if handshake.created_ns < published_before_ns {
                stale.push(key);
            }
        }
        for key in &stale {
            ignore_missing(self.handshakes.remove(key))
                .map_err(access_error(map_names::HANDSHAKES))?;
        }
        let remaining = walked - stale.len() as i64;
        Ok(Expired {
            removed: stale.len(),
            baseline: remaining - self.tallied()?,
        })
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
