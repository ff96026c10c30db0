//! `cgroup/connect4` and `cgroup/connect6`: decide each outbound TCP connect of a pod by its
//! policy; captured ones go to a loopback port of the proxy and their original destination is
//! recorded, keyed by the socket's cookie.
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use aya_log_ebpf::debug;
use redirector_common::{ConnectionRecord, RawSockAddr, AF_INET, AF_INET6};

use crate::{
    addr::{self, V4_LOOPBACK, V4_PASSTHROUGH, V6_LOOPBACK, V6_PASSTHROUGH, V6_UNSPECIFIED},
    maps::ORIG_BY_COOKIE,
    pod::{count, current_pod, logging_enabled},
    policy::{decide, Connect, Verdict},
    raw,
};

/// Let the connect() go on (a sock_addr program that returns 0 fails it with EPERM).
const PROCEED: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn redirector_connect4(ctx: SockAddrContext) -> i32 {
    if let Some((dst, port)) = raw::tcp_connect4_destination(&ctx) {
        let connect = Connect {
            family: AF_INET,
            addr: [dst, 0, 0, 0],
            port,
        };
        if let Some(to) = capture(&ctx, &connect, || {
            raw::bound_to(&ctx, [V4_PASSTHROUGH, 0, 0, 0])
        }) {
            raw::set_connect4_destination(&ctx, V4_LOOPBACK, to);
        }
    }
    PROCEED
}

#[cgroup_sock_addr(connect6)]
pub fn redirector_connect6(ctx: SockAddrContext) -> i32 {
    if let Some((dst, port)) = raw::tcp_connect6_destination(&ctx) {
        let (family, addr) = addr::normalize(u32::from(AF_INET6), dst);
        let connect = Connect { family, addr, port };
        // A dual-stack socket talking IPv4 stays IPv4-mapped: loopback and passthrough too.
        let (loopback, passthrough) = if family == AF_INET {
            (
                addr::v4_mapped(V4_LOOPBACK),
                addr::v4_mapped(V4_PASSTHROUGH),
            )
        } else {
            (V6_LOOPBACK, V6_PASSTHROUGH)
        };
        // An unbound socket connecting to a local IPv6 address gets that address as its
        // source (same-address rule of source selection): a connect to ::6 itself comes from
        // ::6. IPv4 loopback routes give 127.0.0.1 instead.
        let passthrough_source = || {
            raw::bound_to(&ctx, passthrough)
                || (family == AF_INET6
                    && addr::equal(addr, V6_PASSTHROUGH)
                    && raw::bound_to(&ctx, V6_UNSPECIFIED))
        };
        if let Some(to) = capture(&ctx, &connect, passthrough_source) {
            raw::set_connect6_destination(&ctx, loopback, to);
        }
    }
    PROCEED
}

/// Decides a connect of an enrolled pod; for a captured one, records the original
/// destination and returns the loopback port to send it to.
#[inline(always)]
fn capture(
    ctx: &SockAddrContext,
    connect: &Connect,
    passthrough_source: impl FnOnce() -> bool,
) -> Option<u16> {
    let (pod, config) = current_pod()?;
    let Verdict::ToPort(to) = decide(pod, &config, connect, passthrough_source) else {
        count(pod, |stats| stats.exempted += 1);
        return None;
    };
    let record = ConnectionRecord {
        original_dst: RawSockAddr {
            addr: connect.addr,
            port: connect.port,
            family: connect.family,
        },
        ..ConnectionRecord::default()
    };
    // Without a record the proxy could not learn the destination: leave the connect alone.
    ORIG_BY_COOKIE
        .insert(&raw::socket_cookie(ctx), &record, 0)
        .ok()?;
    count(pod, |stats| stats.redirected += 1);
    if logging_enabled() {
        if connect.family == AF_INET {
            let addr = u32::from_be(connect.addr[0]);
            debug!(
                ctx,
                "connect pod {} {:i}:{} -> loopback port {}", pod, addr, connect.port, to
            );
        } else {
            // SAFETY: four u32 words are sixteen bytes, in the kernel's (network) order.
            let addr: [u8; 16] = unsafe { core::mem::transmute(connect.addr) };
            debug!(
                ctx,
                "connect pod {} [{:i}]:{} -> loopback port {}", pod, addr, connect.port, to
            );
        }
    }
    Some(to)
}
