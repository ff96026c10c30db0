//! `cgroup/connect4`: sends a pod's outbound TCP connects to its proxy and records where
//! they were going, keyed by the socket's cookie.
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use aya_log_ebpf::debug;
use redirector_common::{
    ConnectionRecord, ExemptOwnerKey, RawSockAddr, AF_INET, OWNER_GID, OWNER_UID,
};

use crate::{
    maps::{EXEMPT_OWNERS, ORIG_BY_COOKIE},
    pod::{count, current_pod, logging_enabled},
    raw,
};

/// Let the connect() go on (a sock_addr program that returns 0 fails it with EPERM).
const PROCEED: i32 = 1;
/// 127.0.0.1, as the kernel stores it (network byte order).
const LOOPBACK_BE: u32 = u32::from_ne_bytes([127, 0, 0, 1]);

#[cgroup_sock_addr(connect4)]
pub fn redirector_connect4(ctx: SockAddrContext) -> i32 {
    redirect_ipv4(&ctx);
    PROCEED
}

#[inline(always)]
fn redirect_ipv4(ctx: &SockAddrContext) {
    let Some((dst, dst_port)) = raw::tcp_connect_destination(ctx) else {
        return;
    };
    let Some((pod, config)) = current_pod() else {
        return;
    };
    // Loopback 127.0.0.1 covers the proxy's own port too; the proxy's own traffic is exempt
    // by UID or GID so that it does not loop back to itself.
    if dst == LOOPBACK_BE || is_exempt_owner(pod) {
        count(pod, |stats| stats.exempted += 1);
        return;
    }
    let record = ConnectionRecord {
        original_dst: RawSockAddr {
            addr: [dst, 0, 0, 0],
            port: dst_port,
            family: AF_INET,
        },
        ..ConnectionRecord::default()
    };
    // Without a record the proxy could not learn the destination: leave the connect alone.
    if ORIG_BY_COOKIE
        .insert(&raw::socket_cookie(ctx), &record, 0)
        .is_err()
    {
        return;
    }
    raw::set_connect_destination(ctx, LOOPBACK_BE, config.proxy_port);
    count(pod, |stats| stats.redirected += 1);
    if logging_enabled() {
        debug!(
            ctx,
            "connect4 pod {} {:i}:{} -> 127.0.0.1:{}",
            pod,
            u32::from_be(dst),
            dst_port,
            config.proxy_port
        );
    }
}

#[inline(always)]
fn is_exempt_owner(pod: u64) -> bool {
    let (uid, gid) = raw::current_uid_gid();
    let exempt = |kind, id| {
        EXEMPT_OWNERS
            .get_ptr(&ExemptOwnerKey { pod, kind, id })
            .is_some()
    };
    exempt(OWNER_UID, uid) || exempt(OWNER_GID, gid)
}
