//! `POD_STATS`: each pod's per-CPU counters. The entry is made first when a pod is enrolled and
//! removed last when it is unenrolled, so it is also the index of enrolled pods: a pod without
//! it has no other entry anywhere.
use aya::maps::{MapData, PerCpuHashMap, PerCpuValues};
use redirector_common::{map_names, PodStats};

use super::{access_error, ignore_missing, open_map, MapAccessError};
use crate::{loader::LoadError, pins::PinRoot};

pub struct Counters {
    map: PerCpuHashMap<MapData, u64, PodStats>,
}

impl Counters {
    const NAME: &'static str = map_names::POD_STATS;

    pub fn open(root: &PinRoot) -> Result<Self, LoadError> {
        Ok(Self {
            map: open_map(root, Self::NAME)?,
        })
    }

    pub fn contains(&self, pod: u64) -> bool {
        self.map.get(&pod, 0).is_ok()
    }

    /// Makes the pod's zeroed counters unless it has some.
    pub fn ensure(&mut self, pod: u64) -> Result<(), MapAccessError> {
        if self.contains(pod) {
            return Ok(());
        }
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| access_error(Self::NAME)(e))?;
        let zeroes = PerCpuValues::try_from(vec![PodStats::default(); cpus])
            .map_err(access_error(Self::NAME))?;
        self.map
            .insert(pod, zeroes, 0)
            .map_err(access_error(Self::NAME))
    }

    /// The pod's counters summed over CPUs (zero when it has none).
    pub fn total(&self, pod: u64) -> PodStats {
        let mut total = PodStats::default();
        if let Ok(per_cpu) = self.map.get(&pod, 0) {
            per_cpu.iter().for_each(|cpu| total.add(cpu));
        }
        total
    }

    /// Every enrolled pod.
    pub fn pods(&self) -> Result<Vec<u64>, MapAccessError> {
        self.map
            .keys()
            .collect::<Result<_, _>>()
            .map_err(access_error(Self::NAME))
    }

    pub fn remove(&mut self, pod: u64) -> Result<(), MapAccessError> {
        ignore_missing(self.map.remove(&pod)).map_err(access_error(Self::NAME))
    }
}
