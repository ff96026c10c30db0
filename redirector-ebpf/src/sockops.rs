//! `sockops`: hands each captured connection's record from the application's socket to the
//! proxy's, and registers the proxy's inbound listeners.
//!
//! - At the client's connect callback (`TCP_CONNECT_CB`, once the source port is chosen and
//!   before the SYN leaves, so also before a fast-open SYN), a socket with an application
//!   record publishes it in `HANDSHAKES` under the key the proxy side sees: (pod, client
//!   address and port, proxy port).
//! - When the proxy's socket of that connection is created (`PASSIVE_ESTABLISHED_CB`, before
//!   the proxy can accept it and before a FIN of the client can be processed), it takes the
//!   record into its own socket storage and removes the entry: the record then lives exactly
//!   as long as the proxy's socket, however early the client closes.
//! - A handshake that fails (refused, timed out) removes its entry from the client's state
//!   callback, asked for at connect and dropped again at the first state change.
//! - At `listen()` on the pod's inbound capture port, a socket the proxy's owner bound there
//!   becomes one of the pod's inbound listeners.
//!
//! No netns cookie is needed (sock_ops may read it only from Linux 5.15): the pod comes from
//! the cgroup storage of the pod the program is attached to, on both sides.
use aya_ebpf::{
    bindings::{
        BPF_NOEXIST, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_TCP_LISTEN_CB,
    },
    helpers::bpf_ktime_get_ns,
    macros::sock_ops,
    programs::SockOpsContext,
};
use aya_log_ebpf::debug;
use redirector_common::{
    Handshake, HandshakeKey, ListenerKey, PodConfig, SocketRecord, LISTENER_SLOTS, RECORD_APP,
    RECORD_PROXY, RECORD_PROXY_LISTENER,
};

use crate::{
    addr,
    maps::{HANDSHAKES, LISTENERS, SOCKET_RECORDS},
    pod::{count, current_pod, logging_enabled, tally, Counter, Tally},
    raw,
};

const TCP_SYN_SENT: u32 = 2;
const TCP_CLOSE: u32 = 7;

// Named apart from the ELF section `sockops`, which a function of that name collides with.
#[sock_ops]
pub fn redirector_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(&ctx),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_passive_established(&ctx),
        BPF_SOCK_OPS_STATE_CB => on_state_change(&ctx),
        BPF_SOCK_OPS_TCP_LISTEN_CB => on_listen(&ctx),
        _ => {}
    }
    1
}

/// The handshake key of a client socket (local end = client) or of the proxy's socket
/// (remote end = client).
#[inline(always)]
fn handshake_key(ctx: &SockOpsContext, pod: u64, client_is_local: bool) -> HandshakeKey {
    let (family, local, local_port, remote, remote_port) = raw::sock_ops_tuple(ctx);
    let (client, client_port, proxy_port) = if client_is_local {
        (local, local_port, remote_port)
    } else {
        (remote, remote_port, local_port)
    };
    let (family, client_addr) = addr::normalize(family, client);
    HandshakeKey {
        pod,
        client_addr,
        client_port,
        proxy_port,
        family,
        _pad: 0,
    }
}

#[inline(always)]
fn on_connect(ctx: &SockOpsContext) {
    let Some(record) = raw::socket_storage(&SOCKET_RECORDS, ctx, false) else {
        return;
    };
    // SAFETY: the socket's storage, valid for the run.
    let record = unsafe { *record };
    if record.kind != RECORD_APP {
        return;
    }
    let Some(config) = current_pod() else {
        return;
    };
    let key = handshake_key(ctx, config.pod, true);
    if key.proxy_port != record.redirected_port {
        return;
    }
    let handshake = Handshake {
        // SAFETY: a helper without arguments.
        created_ns: unsafe { bpf_ktime_get_ns() },
        original_dst: record.original_dst,
        client_as: record.reported,
        _pad: 0,
    };
    if HANDSHAKES.insert(&key, &handshake, 0).is_err() {
        count(config.pod, Counter::HandshakeFailed);
        return;
    }
    tally(Tally::Published);
    // Told when the handshake ends, to remove the entry if it failed. Without the callback a
    // failed handshake's entry stays until the agent expires it.
    if ctx
        .set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32)
        .is_err()
    {
        count(config.pod, Counter::HandshakeFailed);
    }
    if logging_enabled() {
        debug!(
            ctx,
            "sockops connect client port {} -> proxy port {}", key.client_port, key.proxy_port
        );
    }
}

/// The client socket of a captured connection leaves SYN_SENT: if it failed, nobody will take
/// its entry. Either way no further state callbacks are wanted.
#[inline(always)]
fn on_state_change(ctx: &SockOpsContext) {
    let _ = ctx.set_cb_flags((ctx.cb_flags() & !BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    if ctx.arg(0) != TCP_SYN_SENT || ctx.arg(1) != TCP_CLOSE {
        return;
    }
    if let Some(config) = current_pod() {
        // Absent when the agent expired it meanwhile.
        if HANDSHAKES
            .remove(&handshake_key(ctx, config.pod, true))
            .is_ok()
        {
            tally(Tally::Settled);
        }
    }
}

#[inline(always)]
fn on_passive_established(ctx: &SockOpsContext) {
    let Some(config) = current_pod() else {
        return;
    };
    let port = ctx.local_port() as u16;
    if !is_capture_port(&config, port) {
        return;
    }
    let key = handshake_key(ctx, config.pod, false);
    let Some(entry) = HANDSHAKES.get_ptr(&key) else {
        return;
    };
    // SAFETY: a map value, valid for the run (freed after an RCU grace period only).
    let handshake = unsafe { *entry };
    // Only the remover of an entry counts it: the client's failure callback cannot race this
    // one for the same entry, but the agent's expiry can.
    if HANDSHAKES.remove(&key).is_ok() {
        tally(Tally::Settled);
    }
    let Some(record) = raw::socket_storage(&SOCKET_RECORDS, ctx, true) else {
        count(config.pod, Counter::HandoffFailed);
        return;
    };
    // SAFETY: the new socket's storage, valid for the run.
    unsafe {
        *record = SocketRecord {
            original_dst: handshake.original_dst,
            kind: RECORD_PROXY,
            redirected_port: 0,
            reported: handshake.client_as,
        };
    }
}

/// The ports a captured connection can be sent to.
#[inline(always)]
fn is_capture_port(config: &PodConfig, port: u16) -> bool {
    port == config.proxy_port || port == config.inbound_port || port == config.dns_port
}

/// A socket starts listening in an enrolled pod: on the pod's inbound capture port, and bound
/// there by one of the proxy's owners (marked by `bind`), it becomes one of the proxy's inbound
/// listeners, which `sk_lookup` hands connections to.
#[inline(always)]
fn on_listen(ctx: &SockOpsContext) {
    let Some(config) = current_pod() else {
        return;
    };
    let port = ctx.local_port() as u16;
    if port != config.inbound_port {
        return;
    }
    let Some(record) = raw::socket_storage(&SOCKET_RECORDS, ctx, false) else {
        return;
    };
    // SAFETY: the socket's storage, valid for the run.
    if unsafe { (*record).kind } != RECORD_PROXY_LISTENER {
        return;
    }
    let family = ctx.family() as u16;
    for slot in 0..LISTENER_SLOTS {
        let key = ListenerKey {
            pod: config.pod,
            port,
            family,
            slot,
        };
        // A slot held by an open socket is kept; a closed socket has left its slot.
        if LISTENERS
            .update(key, raw::sock_ops(ctx), u64::from(BPF_NOEXIST))
            .is_ok()
        {
            if logging_enabled() {
                debug!(
                    ctx,
                    "sockops inbound listener on port {} slot {}", port, slot
                );
            }
            return;
        }
    }
    count(config.pod, Counter::ListenerFailed);
}
