//! `cgroup/getsockopt`: answers `getsockopt(SOL_IP, SO_ORIGINAL_DST)` on the proxy's
//! accepted socket with the original destination, as conntrack does after an iptables
//! REDIRECT. Every other getsockopt() passes through untouched.
use aya_ebpf::{macros::cgroup_sockopt, programs::SockoptContext};
use aya_log_ebpf::debug;
use redirector_common::{PeerKey, AF_INET};

use crate::{
    maps::ORIG_BY_PEER,
    pod::{count, current_pod, logging_enabled},
    raw,
};

const SOL_IP: i32 = 0;
/// `SO_ORIGINAL_DST` from linux/netfilter_ipv4.h.
const SO_ORIGINAL_DST: i32 = 80;
const ENOENT: i32 = 2;
const EINVAL: i32 = 22;
/// Keep the kernel's (possibly modified) answer.
const PROCEED: i32 = 1;

/// `struct sockaddr_in` as the proxy expects it.
#[repr(C)]
#[derive(Clone, Copy)]
struct SockaddrIn {
    family: u16,
    port_be: u16,
    addr_be: u32,
    zero: [u8; 8],
}

#[cgroup_sockopt(getsockopt)]
pub fn redirector_getsockopt(ctx: SockoptContext) -> i32 {
    if raw::sockopt_level_name(&ctx) == (SOL_IP, SO_ORIGINAL_DST) {
        answer_original_dst(&ctx);
    }
    PROCEED
}

#[inline(always)]
fn answer_original_dst(ctx: &SockoptContext) {
    let Some((peer_addr, peer_port, local_port)) = raw::sockopt_ipv4_ends(ctx) else {
        return;
    };
    let key = PeerKey {
        netns_cookie: raw::netns_cookie(ctx),
        peer_addr: [peer_addr, 0, 0, 0],
        peer_port,
        proxy_port: local_port,
        family: AF_INET,
        _pad: 0,
    };
    let pod = current_pod().map(|(pod, _)| pod);
    let original = ORIG_BY_PEER.get_ptr(&key);
    if let Some(pod) = pod {
        count(pod, |stats| {
            stats.orig_dst_lookups += 1;
            stats.orig_dst_misses += u64::from(original.is_none());
        });
    }
    let Some(original) = original else {
        // Like the kernel without a conntrack entry; a real conntrack answer (iptables in
        // the same netns) is kept.
        if raw::sockopt_retval(ctx) != 0 {
            raw::sockopt_fail(ctx, ENOENT);
        }
        return;
    };
    // SAFETY: map value pointer valid for this run.
    let original = unsafe { *original };
    // conntrack refuses a buffer shorter than sockaddr_in with EINVAL.
    if raw::sockopt_optlen(ctx) < core::mem::size_of::<SockaddrIn>() as i32 {
        raw::sockopt_fail(ctx, EINVAL);
        return;
    }
    let answer = SockaddrIn {
        family: AF_INET,
        port_be: original.port.to_be(),
        addr_be: original.addr[0],
        zero: [0; 8],
    };
    if raw::sockopt_answer(ctx, &answer) && logging_enabled() {
        debug!(
            ctx,
            "getsockopt original dst {:i}:{}",
            u32::from_be(original.addr[0]),
            original.port
        );
    }
}
