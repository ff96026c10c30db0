//! `sockops`: follows each redirected connection through its life. At connect it asks for
//! state callbacks (only for sockets connect4 redirected); once established it publishes the
//! original destination under the key the proxy can compute from its accepted socket; at
//! close it removes both records, so nothing outlives its connection.
use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_SOCK_OPS_TCP_LISTEN_CB,
    },
    macros::sock_ops,
    programs::SockOpsContext,
};
use aya_log_ebpf::debug;
use redirector_common::{ListenerKey, PeerKey};

use crate::{
    addr,
    maps::{INBOUND_NETNS, LISTENERS, ORIG_BY_COOKIE, ORIG_BY_PEER},
    pod::logging_enabled,
    raw,
};

const TCP_ESTABLISHED: u32 = 1;
const TCP_CLOSE: u32 = 7;

// Named apart from the ELF section `sockops`, which a function of that name collides with.
#[sock_ops]
pub fn redirector_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(&ctx),
        BPF_SOCK_OPS_TCP_LISTEN_CB => on_listen(&ctx),
        BPF_SOCK_OPS_STATE_CB => match ctx.arg(1) {
            TCP_ESTABLISHED => on_established(&ctx),
            TCP_CLOSE => on_close(&ctx),
            _ => {}
        },
        _ => {}
    }
    1
}

#[inline(always)]
fn on_connect(ctx: &SockOpsContext) {
    if ORIG_BY_COOKIE.get_ptr(&raw::socket_cookie(ctx)).is_some() {
        // Failure leaves the record to the LRU bound; nothing else to do about it here.
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    }
}

/// A socket starts listening in a pod with inbound capture: if it is on the pod's inbound
/// capture port it is the proxy's inbound listener, which `sk_lookup` hands connections to.
#[inline(always)]
fn on_listen(ctx: &SockOpsContext) {
    let netns_cookie = raw::netns_cookie(ctx);
    let Some(netns) = INBOUND_NETNS.get_ptr(&netns_cookie) else {
        return;
    };
    // SAFETY: map value pointer valid for this run.
    let inbound_port = unsafe { (*netns).inbound_port };
    let port = ctx.local_port() as u16;
    if port != inbound_port {
        return;
    }
    let key = ListenerKey {
        netns_cookie,
        port,
        family: ctx.family() as u16,
        _pad: 0,
    };
    if LISTENERS
        .update(key, raw::sock_ops(ctx), u64::from(BPF_ANY))
        .is_ok()
        && logging_enabled()
    {
        debug!(ctx, "sockops inbound listener on port {}", port);
    }
}

#[inline(always)]
fn on_established(ctx: &SockOpsContext) {
    let Some(record) = ORIG_BY_COOKIE.get_ptr_mut(&raw::socket_cookie(ctx)) else {
        return;
    };
    let (family, local_addr, local_port, remote_port) = raw::sock_ops_ends(ctx);
    let (family, local_addr) = addr::normalize(family, local_addr);
    let peer = PeerKey {
        netns_cookie: raw::netns_cookie(ctx),
        peer_addr: local_addr,
        peer_port: local_port,
        proxy_port: remote_port,
        family,
        _pad: 0,
    };
    // SAFETY: map value pointer valid for this run; LRU entries are not freed under us.
    let record = unsafe { &mut *record };
    if ORIG_BY_PEER.insert(&peer, &record.original_dst, 0).is_ok() {
        record.peer = peer;
        if logging_enabled() {
            debug!(
                ctx,
                "sockops established client port {} -> proxy port {}", local_port, remote_port
            );
        }
    }
}

#[inline(always)]
fn on_close(ctx: &SockOpsContext) {
    let cookie = raw::socket_cookie(ctx);
    let Some(record) = ORIG_BY_COOKIE.get_ptr(&cookie) else {
        return;
    };
    // SAFETY: as above; copied out before the entry is removed.
    let peer = unsafe { (*record).peer };
    if peer.family != 0 {
        let _ = ORIG_BY_PEER.remove(&peer);
    }
    let _ = ORIG_BY_COOKIE.remove(&cookie);
}
