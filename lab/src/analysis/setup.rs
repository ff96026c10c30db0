//! Pod setup as figures: per-pod times (p50, p99 over every pod of every round), the time for
//! all N pods, and kernel memory per pod.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::analysis::spread::Spread;
use crate::records::{SetupBatch, SetupMethod, SetupMode, SetupSample};
use crate::wire::nearest_rank;

#[derive(Clone, Debug, Serialize)]
pub struct SetupRow {
    pub method: SetupMethod,
    pub mode: SetupMode,
    pub pods: usize,
    /// Per pod, process start to exit, over every pod of every round.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// All N pods, first start to last exit, over the rounds.
    pub total_ms: Spread,
    /// Kernel memory per pod (slab + percpu + vmalloc), median over the rounds.
    pub kernel_kib_per_pod: f64,
    pub slab_kib_per_pod: f64,
    pub map_bytes_per_pod: f64,
}

pub fn setup_rows(samples: &[SetupSample], batches: &[SetupBatch]) -> Vec<SetupRow> {
    let mut times: BTreeMap<(SetupMethod, SetupMode, usize), Vec<f64>> = BTreeMap::new();
    for sample in samples {
        times
            .entry((sample.method, sample.mode, sample.pods))
            .or_default()
            .push(sample.millis);
    }
    times
        .into_iter()
        .filter_map(|((method, mode, pods), mut millis)| {
            millis.sort_by(f64::total_cmp);
            let group: Vec<&SetupBatch> = batches
                .iter()
                .filter(|b| b.method == method && b.mode == mode && b.pods == pods)
                .collect();
            let per_pod = |value: fn(&SetupBatch) -> f64| {
                Spread::of(group.iter().map(|b| value(b) / pods as f64)).map(|s| s.median)
            };
            Some(SetupRow {
                method,
                mode,
                pods,
                p50_ms: nearest_rank(&millis, 0.5),
                p99_ms: nearest_rank(&millis, 0.99),
                max_ms: *millis.last()?,
                total_ms: Spread::of(group.iter().map(|b| b.millis))?,
                kernel_kib_per_pod: per_pod(|b| {
                    (b.slab_kib + b.percpu_kib + b.vmalloc_kib) as f64
                })?,
                slab_kib_per_pod: per_pod(|b| b.slab_kib as f64)?,
                map_bytes_per_pod: per_pod(|b| b.map_bytes as f64)?,
            })
        })
        .collect()
}
