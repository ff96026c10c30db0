//! `cgroup/bind4` and `cgroup/bind6`: a TCP socket that one of the proxy's owners (its UIDs and
//! GIDs) binds to the pod's inbound capture port is marked in its storage; only such a socket
//! becomes an inbound listener when it listens (`sockops`), so that no other process of the
//! pod can receive the captured inbound traffic by listening on that port.
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use redirector_common::{SocketRecord, RECORD_PROXY_LISTENER};

use crate::{
    maps::SOCKET_RECORDS,
    pod::current_pod,
    policy::is_proxy_owner,
    raw::{self, Transport},
};

const PROCEED: i32 = 1;

#[cgroup_sock_addr(bind4)]
pub fn redirector_bind4(ctx: SockAddrContext) -> i32 {
    let (transport, _, port) = raw::address4(&ctx);
    mark_proxy_listener(&ctx, transport, port);
    PROCEED
}

#[cgroup_sock_addr(bind6)]
pub fn redirector_bind6(ctx: SockAddrContext) -> i32 {
    let (transport, _, port) = raw::address6(&ctx);
    mark_proxy_listener(&ctx, transport, port);
    PROCEED
}

#[inline(always)]
fn mark_proxy_listener(ctx: &SockAddrContext, transport: Transport, port: u16) {
    if transport != Transport::Tcp {
        return;
    }
    let Some(config) = current_pod() else {
        return;
    };
    if port != config.inbound_port {
        return;
    }
    let (uid, gid) = raw::current_uid_gid();
    if !is_proxy_owner(&config, uid, gid) {
        return;
    }
    if let Some(record) = raw::socket_storage(&SOCKET_RECORDS, ctx, true) {
        // SAFETY: the socket's storage, valid for the run; the socket is locked by bind().
        unsafe {
            *record = SocketRecord {
                kind: RECORD_PROXY_LISTENER,
                ..SocketRecord::default()
            };
        }
    }
}
