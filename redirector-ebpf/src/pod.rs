//! Finding the enrolled pod of the current process, its counters and the logging switch.
use aya_ebpf::helpers::{bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id};
use redirector_common::{PodConfig, PodStats, MAX_CGROUP_DEPTH};

use crate::maps::{POD_CONFIG, POD_STATS, SETTINGS};

/// The enrolled pod whose cgroup holds the current process: (pod cgroup id, settings).
///
/// Programs are attached to the pod's cgroup, but the process may sit in a cgroup below it
/// (a container of the pod), so when the process's own cgroup is not a pod the ancestors are
/// searched from the top. Pods do not nest, so the first one found is the pod.
#[inline(always)]
pub fn current_pod() -> Option<(u64, PodConfig)> {
    // SAFETY: helpers without arguments that touch no memory of ours.
    let own = unsafe { bpf_get_current_cgroup_id() };
    if let Some(config) = POD_CONFIG.get_ptr(&own) {
        // SAFETY: map values stay valid for the program's run.
        return Some((own, unsafe { *config }));
    }
    for level in 1..MAX_CGROUP_DEPTH {
        // SAFETY: as above; a level below the process's own cgroup yields 0.
        let ancestor = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if ancestor == 0 || ancestor == own {
            return None;
        }
        if let Some(config) = POD_CONFIG.get_ptr(&ancestor) {
            // SAFETY: as above.
            return Some((ancestor, unsafe { *config }));
        }
    }
    None
}

/// Applies `update` to this CPU's counters of `pod` (created by the loader at enroll).
#[inline(always)]
pub fn count(pod: u64, update: impl FnOnce(&mut PodStats)) {
    if let Some(stats) = POD_STATS.get_ptr_mut(&pod) {
        // SAFETY: per-CPU value, only this program run touches it.
        update(unsafe { &mut *stats });
    }
}

/// Whether per-connection log lines are switched on (`redirector log`). An array lookup,
/// which the verifier inlines: the cost of the hooks stays flat while it is off.
#[inline(always)]
pub fn logging_enabled() -> bool {
    SETTINGS
        .get(0)
        .is_some_and(|settings| settings.log_connections != 0)
}
