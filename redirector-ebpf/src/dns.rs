//! `cgroup/sendmsg4`, `sendmsg6`, `recvmsg4`, `recvmsg6`: DNS over UDP from unconnected sockets,
//! as istio-iptables' `-p udp --dport 53 -j REDIRECT --to-port 15053` does, without conntrack.
//! (Connected UDP sockets are decided at connect, in `connect`.)
//!
//! - sendmsg: a datagram to port 53 that the DNS rules capture (`policy::decide_dns`) is sent to
//!   the proxy's DNS port on loopback instead, and the socket's record keeps the server it was
//!   addressed to.
//! - recvmsg: a datagram from the proxy's DNS port to a socket with such a record is reported as
//!   coming from that server, so resolvers that check the reply's source (glibc, musl, Go, dig)
//!   accept it.
//!
//! One record per socket, in the socket's own storage: nothing grows with the number of
//! queries, and it goes with the socket. A socket that queries several servers at once gets
//! every reply attributed to the last one it sent to (resolvers accept a reply from any of
//! their servers). The proxy's own queries (its UIDs/GIDs) are exempt and its sockets carry no
//! record, which is what istio's conntrack zones achieve for the proxy's upstream query and the
//! application's query sharing a server and port.
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use redirector_common::{RawSockAddr, SocketRecord, AF_INET, AF_INET6, RECORD_DNS};

use crate::{
    addr::{self, V4_LOOPBACK},
    maps::SOCKET_RECORDS,
    pod::{count, current_pod, Counter},
    policy::{decide_dns, Connect, Verdict},
    raw,
};

const PROCEED: i32 = 1;
/// Fail the sendmsg() with EPERM.
const REFUSE: i32 = 0;

#[cgroup_sock_addr(sendmsg4)]
pub fn redirector_sendmsg4(ctx: SockAddrContext) -> i32 {
    let (_, dst, port) = raw::address4(&ctx);
    let query = Connect {
        family: AF_INET,
        addr: [dst, 0, 0, 0],
        port,
    };
    match redirect(&ctx, &query) {
        Some(Some(to)) => raw::set_address4(&ctx, V4_LOOPBACK, to),
        Some(None) => return REFUSE,
        None => {}
    }
    PROCEED
}

#[cgroup_sock_addr(sendmsg6)]
pub fn redirector_sendmsg6(ctx: SockAddrContext) -> i32 {
    let (_, dst, port) = raw::address6(&ctx);
    let (family, addr) = addr::normalize(u32::from(AF_INET6), dst);
    let query = Connect { family, addr, port };
    match redirect(&ctx, &query) {
        Some(Some(to)) => raw::set_address6(&ctx, addr::ipv6_loopback_for(family), to),
        Some(None) => return REFUSE,
        None => {}
    }
    PROCEED
}

/// Decides a datagram: `None` to leave it alone, `Some(Some(port))` to send it to that loopback
/// port, `Some(None)` when it should be captured but its record could not be kept.
#[inline(always)]
fn redirect(ctx: &SockAddrContext, query: &Connect) -> Option<Option<u16>> {
    let config = current_pod()?;
    let passthrough_source = || raw::from_passthrough(ctx, query.family, &query.addr);
    let Verdict::ToPort(to) = decide_dns(&config, query, passthrough_source) else {
        return None;
    };
    let Some(record) = raw::socket_storage(&SOCKET_RECORDS, ctx, true) else {
        count(config.pod, Counter::RecordFailed);
        return Some(None);
    };
    // SAFETY: the socket's storage, valid for the run; the socket is locked by sendmsg().
    unsafe {
        *record = SocketRecord {
            original_dst: RawSockAddr {
                addr: query.addr,
                port: query.port,
                family: query.family,
            },
            kind: RECORD_DNS,
            redirected_port: to,
            reported: [0; 4],
        };
    }
    count(config.pod, Counter::DnsRedirected);
    Some(Some(to))
}

#[cgroup_sock_addr(recvmsg4)]
pub fn redirector_recvmsg4(ctx: SockAddrContext) -> i32 {
    let (_, source, port) = raw::address4(&ctx);
    if let Some(server) = server_of_reply(&ctx, AF_INET, [source, 0, 0, 0], port) {
        if server.family == AF_INET {
            raw::set_address4(&ctx, server.addr[0], server.port);
        }
    }
    PROCEED
}

#[cgroup_sock_addr(recvmsg6)]
pub fn redirector_recvmsg6(ctx: SockAddrContext) -> i32 {
    let (_, source, port) = raw::address6(&ctx);
    let (family, source) = addr::normalize(u32::from(AF_INET6), source);
    if let Some(server) = server_of_reply(&ctx, family, source, port) {
        raw::set_address6(&ctx, addr::as_ipv6(server.family, server.addr), server.port);
    }
    PROCEED
}

/// The server a datagram from (`family`, `source`, `port`) answers for: only a reply from the
/// proxy's DNS port on loopback, to a socket whose queries went there.
#[inline(always)]
fn server_of_reply(
    ctx: &SockAddrContext,
    family: u16,
    source: [u32; 4],
    port: u16,
) -> Option<RawSockAddr> {
    // SAFETY: the socket's storage, valid for the run.
    let record: SocketRecord = unsafe { *raw::socket_storage(&SOCKET_RECORDS, ctx, false)? };
    (record.kind == RECORD_DNS
        && port == record.redirected_port
        && addr::is_loopback(family, &source))
    .then_some(record.original_dst)
}
