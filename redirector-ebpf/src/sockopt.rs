//! `cgroup/getsockopt`: answers `getsockopt(SOL_IP, SO_ORIGINAL_DST)` and
//! `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)` on the proxy's accepted socket with the
//! original destination, as conntrack does after an iptables REDIRECT, from the record the
//! socket took over when it was created (see `sockops`). A connection made over IPv4-mapped
//! addresses is answered in the form the proxy asked for.
//!
//! Every other call is left exactly as the kernel answered it (optlen 0, see
//! `raw::sockopt_keep_kernel_answer`). Errors follow the kernel's rules: before Linux 5.18 a
//! program may only keep the kernel's error or answer with success, so a miss keeps the
//! kernel's own error (ENOPROTOOPT without nf_conntrack, ENOENT with it) there, and is ENOENT
//! where the loader probed that the program may say so.
use aya_ebpf::{macros::cgroup_sockopt, programs::SockoptContext};
use aya_log_ebpf::debug;
use redirector_common::{InboundAddrKey, PodConfig, RawSockAddr, AF_INET, AF_INET6, RECORD_PROXY};

use crate::{
    addr,
    maps::{INBOUND_ADDRS, SOCKET_RECORDS},
    pod::{count, current_pod, errno_writable, logging_enabled, Counter},
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
    let answered = match raw::sockopt_level_name(&ctx) {
        (SOL_IP, SO_ORIGINAL_DST) => answer_original_dst(&ctx, false),
        (SOL_IPV6, SO_ORIGINAL_DST) => answer_original_dst(&ctx, true),
        _ => false,
    };
    if !answered {
        raw::sockopt_keep_kernel_answer(&ctx);
    }
    PROCEED
}

/// Fails the call with `errno` where the kernel lets the program choose its error; otherwise
/// the kernel's own error stands.
#[inline(always)]
fn fail(ctx: &SockoptContext, errno: i32) {
    if raw::sockopt_retval(ctx) != 0 && errno_writable() {
        raw::sockopt_fail(ctx, errno);
    }
}

/// Returns whether the call was answered by the program.
#[inline(always)]
fn answer_original_dst(ctx: &SockoptContext, as_ipv6: bool) -> bool {
    let Some(config) = current_pod() else {
        return false;
    };
    count(config.pod, Counter::OrigDstLookups);
    let original = match raw::socket_storage(&SOCKET_RECORDS, ctx, false) {
        // SAFETY: the socket's storage, valid for the run.
        Some(record) if unsafe { (*record).kind } == RECORD_PROXY => unsafe {
            (*record).original_dst
        },
        _ => match inbound_original(ctx, &config) {
            Some(local) => local,
            None => {
                count(config.pod, Counter::OrigDstMisses);
                // A real conntrack answer (iptables in the same netns) is kept.
                fail(ctx, ENOENT);
                return false;
            }
        },
    };
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
    answered
}

/// An inbound connection the pod's `sk_lookup` captured was not translated: like conntrack,
/// its original destination is the socket's own local address. That holds only for a socket
/// whose local address is one of the pod's inbound addresses and whose port is not one of the
/// proxy's own (a connection to the proxy port itself was never captured inbound).
#[inline(always)]
fn inbound_original(ctx: &SockoptContext, config: &PodConfig) -> Option<RawSockAddr> {
    let (family, local, port) = raw::sockopt_local(ctx)?;
    if port == config.proxy_port || port == config.inbound_port || port == config.dns_port {
        return None;
    }
    let (family, addr) = addr::normalize(family, local);
    let owner = INBOUND_ADDRS.get_ptr(&InboundAddrKey {
        family: u32::from(family),
        addr,
    })?;
    // SAFETY: a map value, valid for the run.
    (unsafe { (*owner).pod } == config.pod).then_some(RawSockAddr { addr, port, family })
}

/// conntrack answers SOL_IP only for IPv4 connections, and refuses short buffers.
#[inline(always)]
fn answer_ipv4(ctx: &SockoptContext, original: &RawSockAddr) -> bool {
    if original.family != AF_INET {
        fail(ctx, ENOENT);
        return false;
    }
    if raw::sockopt_optlen(ctx) < core::mem::size_of::<SockaddrIn>() as i32 {
        fail(ctx, EINVAL);
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
        fail(ctx, EINVAL);
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
