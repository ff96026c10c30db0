//! Per-program cost from the kernel's own accounting: passes in which one variant runs one
//! workload alone, with `kernel.bpf_stats_enabled` on, and every program found under the
//! rig's bpffs root read before and after. Separate from the timed runs, so that those carry no
//! accounting overhead.

use std::time::Duration;

use anyhow::{Context, Result};

use crate::measure::bpf_objects::programs_under;
use crate::records::ProgramCost;
use crate::rig::Rig;
use crate::variant::{Variant, Workload};

/// The passes, for the variants that were chosen: what a proxied connection costs (with each
/// proxy, and over IPv6), what a persistent connection's round trip costs, and what the pod
/// pays for what is not captured.
pub fn passes(variants: &[Variant]) -> Vec<(Variant, Workload)> {
    let wanted = [
        (Variant::Ebpf, Workload::Crr),
        (Variant::Ebpf, Workload::Rr1),
        (Variant::HaproxyEbpf, Workload::Crr),
        (Variant::EbpfV6, Workload::Crr),
        (Variant::EbpfNotCaptured, Workload::SockoptSoError),
        (Variant::EbpfNotCaptured, Workload::Crr),
    ];
    wanted
        .into_iter()
        .filter(|(variant, _)| variants.contains(variant))
        .collect()
}

/// Runs every pass for `duration`, with no warm-up, so that every operation that ran the
/// programs is counted.
pub fn profile_programs(
    rig: &Rig,
    passes: &[(Variant, Workload)],
    duration: Duration,
) -> Result<Vec<ProgramCost>> {
    // The same switch as the sysctl, but it goes off by itself when this fd closes.
    let _stats_on = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("switching on the kernel's BPF run-time statistics")?;
    let mut costs = Vec::new();
    for &(variant, workload) in passes {
        let before = programs_under(rig.pin_root())?;
        let report = rig.run_load(variant, workload, Duration::ZERO, duration)?;
        let after = programs_under(rig.pin_root())?;
        let operations = report.transactions * workload.operations_per_transaction();
        for (id, program) in after {
            let earlier = before.get(&id).cloned().unwrap_or_default();
            costs.push(ProgramCost {
                variant,
                workload,
                program: program.name,
                hooks: program.hooks,
                run_cnt: program.run_cnt.saturating_sub(earlier.run_cnt),
                run_time_ns: program.run_time_ns.saturating_sub(earlier.run_time_ns),
                operations,
            });
        }
        eprintln!(
            "lab: kernel accounting of redirector's programs: {} {} ({operations} {}s)",
            variant.name(),
            workload.name(),
            workload.operation()
        );
    }
    Ok(costs)
}
