//! The agent's file descriptors. It holds a few for each enrolled pod (the address watch's
//! netlink socket and the pair that stops the watch), so a node of a thousand pods needs a few
//! thousand, more than the soft limit of 1024 that runtimes commonly give a container
//! (containerd 2 does; Go programs such as the runtimes raise theirs, Rust ones do not).
//!
//! And the kernel grows a process's descriptor table by doubling it, which in a process with
//! more than one thread waits for an RCU grace period (`expand_fdtable`): measured here, the
//! enroll that opened descriptor 256, 512, 1024 or 2048 took 4 to 20 ms more. Grown once at
//! start, while the agent has one thread, the table never grows under a request.
use std::os::fd::{FromRawFd as _, OwnedFd};

use nix::{
    fcntl::{fcntl, FcntlArg},
    sys::resource::{getrlimit, setrlimit, Resource, RLIM_INFINITY},
};
use redirector_common::MAX_PODS;

/// Descriptors the agent holds for each enrolled pod.
const PER_POD: u64 = 3;
/// Descriptors for everything else: maps, programs, sockets, requests in flight.
const BASE: u64 = 1024;

/// What a node of [`MAX_PODS`] pods needs.
pub const NEEDED: u64 = BASE + PER_POD * MAX_PODS as u64;

/// Raises the soft limit on open files to the hard one and grows the descriptor table to hold
/// [`NEEDED`] (or as many as the limit allows) at once. Call it while the process has a single
/// thread. What cannot be done is logged: the agent still works, up to fewer pods.
pub fn prepare() {
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let mut limit = soft;
    if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => {
                tracing::info!(
                    from = soft,
                    to = hard,
                    "raised the soft limit on open files"
                );
                limit = hard;
            }
            Err(error) => {
                tracing::warn!(soft, hard, %error, "raising the soft limit on open files")
            }
        }
    }
    if limit != RLIM_INFINITY && limit < NEEDED {
        tracing::warn!(
            limit,
            pods = limit.saturating_sub(BASE) / PER_POD,
            needed = NEEDED,
            "the limit on open files allows fewer pods than the maps hold"
        );
    }
    grow_table(NEEDED.min(limit));
}

/// Makes the descriptor table hold `size` descriptors: a descriptor is duplicated to the
/// highest of them and closed again (a table never shrinks).
fn grow_table(size: u64) {
    let Some(highest) = size.checked_sub(1).and_then(|n| i32::try_from(n).ok()) else {
        return;
    };
    match fcntl(std::io::stderr(), FcntlArg::F_DUPFD_CLOEXEC(highest)) {
        // SAFETY: the descriptor was just made here and is not used elsewhere.
        Ok(duplicate) => drop(unsafe { OwnedFd::from_raw_fd(duplicate) }),
        Err(error) => tracing::warn!(size, %error, "growing the descriptor table"),
    }
}
