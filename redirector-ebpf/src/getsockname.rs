//! `cgroup/getsockname4` and `cgroup/getsockname6`: the application's captured socket reports
//! the local address the connection would have had going direct (the pod's own address), as
//! after an iptables REDIRECT, instead of the loopback address it really has towards the proxy.
//! Software that learns its own address from a connection (service registration, FTP's PORT,
//! peer-to-peer protocols) then registers the right one. The port stays the real one.
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use redirector_common::{SocketRecord, AF_INET, RECORD_APP, RECORD_DNS};

use crate::{addr, maps::SOCKET_RECORDS, raw};

const PROCEED: i32 = 1;

#[cgroup_sock_addr(getsockname4)]
pub fn redirector_getsockname4(ctx: SockAddrContext) -> i32 {
    if let Some((family, local)) = reported_local(&ctx) {
        if family == AF_INET {
            let (_, _, port) = raw::address4(&ctx);
            raw::set_address4(&ctx, local[0], port);
        }
    }
    PROCEED
}

#[cgroup_sock_addr(getsockname6)]
pub fn redirector_getsockname6(ctx: SockAddrContext) -> i32 {
    if let Some((family, local)) = reported_local(&ctx) {
        let (_, _, port) = raw::address6(&ctx);
        raw::set_address6(&ctx, addr::as_ipv6(family, local), port);
    }
    PROCEED
}

/// (family, address) to report as the socket's own: only for a captured application socket
/// whose record says what the direct connection's source would have been.
#[inline(always)]
fn reported_local(ctx: &SockAddrContext) -> Option<(u16, [u32; 4])> {
    // SAFETY: the socket's storage, valid for the run.
    let record: SocketRecord = unsafe { *raw::socket_storage(&SOCKET_RECORDS, ctx, false)? };
    ((record.kind == RECORD_APP || record.kind == RECORD_DNS) && !addr::is_unset(&record.reported))
        .then_some((record.original_dst.family, record.reported))
}
