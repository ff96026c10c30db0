//! `cgroup/getpeername4` and `cgroup/getpeername6` (which also give accept() its peer address):
//! each side of a captured connection sees the peer it would see after an iptables REDIRECT.
//! - The application's socket reports its original destination, not the proxy's loopback
//!   address; a connected UDP socket whose DNS queries go to the proxy reports its server.
//! - The proxy's accepted socket reports the client at the pod's own address, where the
//!   REDIRECT would have left the connection's source (the port stays the real one).
//!
//! Only sockets with a record, still talking to the port it names, are touched: exempt
//! processes, reconnected sockets and other connections see the truth.
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use redirector_common::{SocketRecord, AF_INET, RECORD_APP, RECORD_DNS, RECORD_PROXY};

use crate::{addr, maps::SOCKET_RECORDS, raw};

const PROCEED: i32 = 1;

#[cgroup_sock_addr(getpeername4)]
pub fn redirector_getpeername4(ctx: SockAddrContext) -> i32 {
    let (_, _, port) = raw::address4(&ctx);
    if let Some((family, peer, port)) = reported_peer(&ctx, port) {
        if family == AF_INET {
            raw::set_address4(&ctx, peer[0], port);
        }
    }
    PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn redirector_getpeername6(ctx: SockAddrContext) -> i32 {
    let (_, _, port) = raw::address6(&ctx);
    if let Some((family, peer, port)) = reported_peer(&ctx, port) {
        raw::set_address6(&ctx, addr::as_ipv6(family, peer), port);
    }
    PROCEED
}

/// (family, address, port) to report as the peer of a socket whose real peer port is `port`.
#[inline(always)]
fn reported_peer(ctx: &SockAddrContext, port: u16) -> Option<(u16, [u32; 4], u16)> {
    // SAFETY: the socket's storage, valid for the run.
    let record: SocketRecord = unsafe { *raw::socket_storage(&SOCKET_RECORDS, ctx, false)? };
    let original = record.original_dst;
    match record.kind {
        RECORD_APP | RECORD_DNS if port == record.redirected_port => {
            Some((original.family, original.addr, original.port))
        }
        RECORD_PROXY if !addr::is_unset(&record.reported) => {
            Some((original.family, record.reported, port))
        }
        _ => None,
    }
}
