//! `cgroup/getsockopt`: answers `getsockopt(SOL_IP, SO_ORIGINAL_DST)` and
//! `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)` on the proxy's accepted socket with the
//! original destination, as conntrack does after an iptables REDIRECT. A connection made
//! over IPv4-mapped addresses is answered in the form the proxy asked for. Every other
//! getsockopt() passes through untouched.
use aya_ebpf::{macros::cgroup_sockopt, programs::SockoptContext};
use aya_log_ebpf::debug;
use redirector_common::{PeerKey, RawSockAddr, AF_INET, AF_INET6};

use crate::{
    addr,
    maps::{INBOUND_NETNS, ORIG_BY_PEER},
    pod::{count, current_pod, logging_enabled},
    raw,
};

const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
/// `SO_ORIGINAL_DST` (linux/netfilter_ipv4.h) and `IP6T_SO_ORIGINAL_DST` (…ipv6/ip6_tables.h).
const SO_ORIGINAL_DST: i32 = 80;
const ENOENT: i32 = 2;
const EINVAL: i32 = 22;
/// Keep the kernel's (possibly modified) answer.
const PROCEED: i32 = 1;

/// `struct sockaddr_in`.
#[repr(C)]
#[derive(Clone, Copy)]
struct SockaddrIn {
    family: u16,
    port_be: u16,
    addr_be: u32,
    zero: [u8; 8],
}

/// `struct sockaddr_in6`.
#[repr(C)]
#[derive(Clone, Copy)]
struct SockaddrIn6 {
    family: u16,
    port_be: u16,
    flowinfo: u32,
    addr: [u32; 4],
    scope_id: u32,
}

#[cgroup_sockopt(getsockopt)]
pub fn redirector_getsockopt(ctx: SockoptContext) -> i32 {
    match raw::sockopt_level_name(&ctx) {
        (SOL_IP, SO_ORIGINAL_DST) => answer_original_dst(&ctx, false),
        (SOL_IPV6, SO_ORIGINAL_DST) => answer_original_dst(&ctx, true),
        _ => {}
    }
    PROCEED
}

#[inline(always)]
fn count_lookup(missed: bool) {
    if let Some((pod, _)) = current_pod() {
        count(pod, |stats| {
            stats.orig_dst_lookups += 1;
            stats.orig_dst_misses += u64::from(missed);
        });
    }
}

#[inline(always)]
fn answer_original_dst(ctx: &SockoptContext, as_ipv6: bool) {
    let Some((family, peer_addr, peer_port, local_port)) = raw::sockopt_socket_ends(ctx) else {
        return;
    };
    let (family, peer_addr) = addr::normalize(family, peer_addr);
    let key = PeerKey {
        netns_cookie: raw::netns_cookie(ctx),
        peer_addr,
        peer_port,
        proxy_port: local_port,
        family,
        _pad: 0,
    };
    let original = match ORIG_BY_PEER.get_ptr(&key) {
        // SAFETY: map value pointer valid for this run.
        Some(original) => unsafe { *original },
        // An inbound connection was not translated: like conntrack, whose original
        // destination for it is the socket's own local address.
        None if INBOUND_NETNS.get_ptr(&key.netns_cookie).is_some() => {
            let Some((family, local, port)) = raw::sockopt_local(ctx) else {
                return;
            };
            let (family, addr) = addr::normalize(family, local);
            RawSockAddr { addr, port, family }
        }
        None => {
            count_lookup(true);
            // Like the kernel without a conntrack entry; a real conntrack answer (iptables
            // in the same netns) is kept.
            if raw::sockopt_retval(ctx) != 0 {
                raw::sockopt_fail(ctx, ENOENT);
            }
            return;
        }
    };
    count_lookup(false);
    let answered = if as_ipv6 {
        answer_ipv6(ctx, &original)
    } else {
        answer_ipv4(ctx, &original)
    };
    if answered && logging_enabled() {
        debug!(
            ctx,
            "getsockopt original dst family {} port {}", original.family, original.port
        );
    }
}

/// conntrack answers SOL_IP only for IPv4 connections, and refuses short buffers.
#[inline(always)]
fn answer_ipv4(ctx: &SockoptContext, original: &RawSockAddr) -> bool {
    if original.family != AF_INET {
        raw::sockopt_fail(ctx, ENOENT);
        return false;
    }
    if raw::sockopt_optlen(ctx) < core::mem::size_of::<SockaddrIn>() as i32 {
        raw::sockopt_fail(ctx, EINVAL);
        return false;
    }
    let answer = SockaddrIn {
        family: AF_INET,
        port_be: original.port.to_be(),
        addr_be: original.addr[0],
        zero: [0; 8],
    };
    raw::sockopt_answer(ctx, &answer)
}

#[inline(always)]
fn answer_ipv6(ctx: &SockoptContext, original: &RawSockAddr) -> bool {
    if raw::sockopt_optlen(ctx) < core::mem::size_of::<SockaddrIn6>() as i32 {
        raw::sockopt_fail(ctx, EINVAL);
        return false;
    }
    let addr = if original.family == AF_INET {
        addr::v4_mapped(original.addr[0])
    } else {
        original.addr
    };
    let answer = SockaddrIn6 {
        family: AF_INET6,
        port_be: original.port.to_be(),
        flowinfo: 0,
        addr,
        scope_id: 0,
    };
    raw::sockopt_answer(ctx, &answer)
}
