//! The enrolled pod of the running program, its counters and the logging switch.
use redirector_common::PodConfig;

use crate::maps::{HANDSHAKE_TALLY, POD_SETTINGS, POD_STATS, SETTINGS};

/// The settings of the pod whose cgroup the running program is attached to; `None` until
/// the loader has written them. Programs are attached to the pod's cgroup only, and the
/// cgroup storage they read is that cgroup's whichever container below it the process (or
/// the socket) belongs to: no cgroup walk, no map lookup.
#[inline(always)]
pub fn current_pod() -> Option<PodConfig> {
    POD_SETTINGS.get()
}

/// Which counter of [`PodStats`] to add to.
#[derive(Clone, Copy)]
pub enum Counter {
    Redirected,
    Exempted,
    OrigDstLookups,
    OrigDstMisses,
    InboundCaptured,
    InboundExcluded,
    InboundNoProxy,
    RecordFailed,
    HandshakeFailed,
    HandoffFailed,
    ListenerFailed,
    DnsRedirected,
}

/// Adds one to a counter of `pod` on this CPU (the entry is created by the loader at enroll).
#[inline(always)]
pub fn count(pod: u64, counter: Counter) {
    let Some(stats) = POD_STATS.get_ptr_mut(&pod) else {
        return;
    };
    // SAFETY: a per-CPU value, valid for the program's run; the field is a u64 within it.
    let field = unsafe {
        match counter {
            Counter::Redirected => &raw mut (*stats).redirected,
            Counter::Exempted => &raw mut (*stats).exempted,
            Counter::OrigDstLookups => &raw mut (*stats).orig_dst_lookups,
            Counter::OrigDstMisses => &raw mut (*stats).orig_dst_misses,
            Counter::InboundCaptured => &raw mut (*stats).inbound_captured,
            Counter::InboundExcluded => &raw mut (*stats).inbound_excluded,
            Counter::InboundNoProxy => &raw mut (*stats).inbound_no_proxy,
            Counter::RecordFailed => &raw mut (*stats).record_failed,
            Counter::HandshakeFailed => &raw mut (*stats).handshake_failed,
            Counter::HandoffFailed => &raw mut (*stats).handoff_failed,
            Counter::ListenerFailed => &raw mut (*stats).listener_failed,
            Counter::DnsRedirected => &raw mut (*stats).dns_redirected,
        }
    };
    // SAFETY: a field of the map value just looked up.
    unsafe { add_one(field) };
}

/// Which side of the handshake map's tally to add to.
#[derive(Clone, Copy)]
pub enum Tally {
    /// An entry was made.
    Published,
    /// An entry was removed by a program.
    Settled,
}

/// Adds one to the handshake map's tally on this CPU.
#[inline(always)]
pub fn tally(side: Tally) {
    let Some(tally) = HANDSHAKE_TALLY.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: a per-CPU array element, valid for the program's run.
    unsafe {
        add_one(match side {
            Tally::Published => &raw mut (*tally).published,
            Tally::Settled => &raw mut (*tally).settled,
        });
    }
}

/// An atomic add (BPF_XADD; the result is not used, so no BPF_FETCH, which needs 5.12):
/// another program run on this CPU (after preemption, or from a softirq) may be adding to the
/// same counter. The BPF target has no `AtomicU64::fetch_add`, hence the intrinsic.
///
/// # Safety
/// `field` points to an 8-byte aligned u64 of a map value valid for the program's run.
#[inline(always)]
unsafe fn add_one(field: *mut u64) {
    // SAFETY: as the caller promises.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            field, 1,
        );
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

/// Whether a getsockopt program may answer with an errno of its own (probed by the loader).
#[inline(always)]
pub fn errno_writable() -> bool {
    SETTINGS
        .get(0)
        .is_some_and(|settings| settings.errno_writable != 0)
}
