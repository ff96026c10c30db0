//! `cgroup/connect4` and `cgroup/connect6`: decide each outbound TCP connect of a pod by its
//! policy, and each connect of a UDP socket to port 53 by the DNS rules; captured ones go to a
//! loopback port of the proxy, and their original destination is recorded in the socket's own
//! storage, where it lives as long as the socket.
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use aya_log_ebpf::debug;
use redirector_common::{
    PodConfig, RawSockAddr, SocketRecord, AF_INET, AF_INET6, RECORD_APP, RECORD_DNS,
};

use crate::{
    addr::{self, V4_LOOPBACK},
    maps::SOCKET_RECORDS,
    pod::{count, current_pod, logging_enabled, Counter},
    policy::{decide, decide_dns, Connect, Verdict},
    raw::{self, Transport},
};

/// Let the connect() go on.
const PROCEED: i32 = 1;
/// Fail the connect() with EPERM.
const REFUSE: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn redirector_connect4(ctx: SockAddrContext) -> i32 {
    let (transport, dst, port) = raw::address4(&ctx);
    if transport == Transport::Other {
        return PROCEED;
    }
    let connect = Connect {
        family: AF_INET,
        addr: [dst, 0, 0, 0],
        port,
    };
    match capture(&ctx, transport, &connect) {
        Capture::To(port) => raw::set_address4(&ctx, V4_LOOPBACK, port),
        Capture::Pass => {}
        Capture::Refuse => return REFUSE,
    }
    PROCEED
}

#[cgroup_sock_addr(connect6)]
pub fn redirector_connect6(ctx: SockAddrContext) -> i32 {
    let (transport, dst, port) = raw::address6(&ctx);
    if transport == Transport::Other {
        return PROCEED;
    }
    let (family, addr) = addr::normalize(u32::from(AF_INET6), dst);
    let connect = Connect { family, addr, port };
    match capture(&ctx, transport, &connect) {
        Capture::To(port) => raw::set_address6(&ctx, addr::ipv6_loopback_for(family), port),
        Capture::Pass => {}
        Capture::Refuse => return REFUSE,
    }
    PROCEED
}

/// What becomes of a connect.
enum Capture {
    /// Sent to this loopback port of the proxy.
    To(u16),
    /// Left alone.
    Pass,
    /// Failed: it should be captured, but its record could not be kept (out of memory), and
    /// letting it bypass the proxy would break the policy.
    Refuse,
}

/// Decides a connect of an enrolled pod; a captured one gets its record on the socket.
#[inline(always)]
fn capture(ctx: &SockAddrContext, transport: Transport, connect: &Connect) -> Capture {
    let Some(config) = current_pod() else {
        return Capture::Pass;
    };
    let pod = config.pod;
    let passthrough_source = || raw::from_passthrough(ctx, connect.family, &connect.addr);
    let verdict = if transport == Transport::Tcp {
        decide(&config, connect, passthrough_source)
    } else {
        decide_dns(&config, connect, passthrough_source)
    };
    let Verdict::ToPort(to) = verdict else {
        // A record from an earlier connect of this socket (one that failed, or was captured
        // and then disconnected) must not describe this connection.
        raw::delete_socket_storage(&SOCKET_RECORDS, ctx);
        if transport == Transport::Tcp {
            count(pod, Counter::Exempted);
        }
        return Capture::Pass;
    };
    let Some(record) = raw::socket_storage(&SOCKET_RECORDS, ctx, true) else {
        count(pod, Counter::RecordFailed);
        return Capture::Refuse;
    };
    let (kind, counter) = if transport == Transport::Tcp {
        (RECORD_APP, Counter::Redirected)
    } else {
        (RECORD_DNS, Counter::DnsRedirected)
    };
    // SAFETY: the socket's storage, valid for the run; the socket is locked by connect().
    unsafe {
        *record = SocketRecord {
            original_dst: RawSockAddr {
                addr: connect.addr,
                port: connect.port,
                family: connect.family,
            },
            kind,
            redirected_port: to,
            reported: own_address_towards(&config, connect),
        };
    }
    count(pod, counter);
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
    Capture::To(to)
}

/// The local address a connection to this destination would have had going direct, as after a
/// REDIRECT (IPv4 in word 0): the pod's own address of the family, but loopback for loopback
/// destinations, which is then left as it is (all zero; also when the pod has no address).
#[inline(always)]
fn own_address_towards(config: &PodConfig, connect: &Connect) -> [u32; 4] {
    if addr::is_loopback(connect.family, &connect.addr) {
        [0; 4]
    } else if connect.family == AF_INET {
        [config.own4, 0, 0, 0]
    } else {
        config.own6
    }
}
