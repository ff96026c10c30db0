//! `sk_lookup` on a pod's network namespace: inbound TCP to the pod's own addresses on a
//! captured port is handed to the proxy's inbound listener, as istio's nat PREROUTING
//! REDIRECT does, but without NAT: the accepted socket's local address stays the one the
//! client asked for.
//!
//! Why sk_lookup (rather than tc + bpf_sk_assign): it runs at the listener lookup, so a miss
//! can refuse the connection at once (RST), as a REDIRECT to a closed port does, and it sees
//! connections that never cross a device. The listener comes from a SOCKHASH that the listen
//! callback in `sockops` fills whenever the proxy listens, so the proxy may restart at will.
use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::{
    bindings::{sk_action::SK_DROP, sk_action::SK_PASS},
    macros::sk_lookup,
    programs::SkLookupContext,
};
use redirector_common::{
    InboundAddrKey, InboundPod, ListenerKey, PodAddrKey, PortKey, ADDR_LOCAL, AF_INET, AF_INET6,
    LISTENER_SLOTS, POD_ADDR_KEY_FIXED_BITS, POLICY_INBOUND_ALL, POLICY_INBOUND_FAIL_OPEN,
    POLICY_IPV4, POLICY_IPV6, PORT_INBOUND_EXCLUDE, PORT_INBOUND_INCLUDE,
};

use crate::{
    addr,
    maps::{INBOUND_ADDRS, LISTENERS, POD_ADDRS, PORTS},
    pod::{count, Counter},
    raw,
};

#[sk_lookup]
pub fn redirector_inbound(ctx: SkLookupContext) -> u32 {
    let Some((family, local, port, remote)) = raw::sk_lookup_tcp(&ctx) else {
        return SK_PASS;
    };
    let family = family as u16;
    if addr::is_loopback(family, &local) {
        return SK_PASS;
    }
    let Some(owner) = INBOUND_ADDRS.get_ptr(&InboundAddrKey {
        family: u32::from(family),
        addr: local,
    }) else {
        return SK_PASS;
    };
    // SAFETY: map value pointers are valid for the program's run.
    let pod = unsafe { *owner };
    // istio writes IPv6 rules only when IPv6 is on for the pod.
    let family_flag = if family == AF_INET {
        POLICY_IPV4
    } else {
        POLICY_IPV6
    };
    if pod.flags & family_flag == 0 {
        return SK_PASS;
    }
    // The pod's own traffic (the proxy's passthrough from 127.0.0.6, the app calling itself)
    // is decided by the outbound policy, as in istio where nat PREROUTING never sees it.
    if is_local_to(&pod, family, &remote) {
        return SK_PASS;
    }
    if !captures(&pod, port) {
        count(pod.pod, Counter::InboundExcluded);
        return SK_PASS;
    }
    if assign_listener(&ctx, &pod, family)
        // An IPv6 listener that is not v6-only takes IPv4 too.
        || (family == AF_INET && assign_listener(&ctx, &pod, AF_INET6))
    {
        count(pod.pod, Counter::InboundCaptured);
        return SK_PASS;
    }
    count(pod.pod, Counter::InboundNoProxy);
    // Separate returns: a computed verdict compiled to a form the verifier rejects.
    if pod.flags & POLICY_INBOUND_FAIL_OPEN != 0 {
        return SK_PASS;
    }
    SK_DROP
}

/// Hands the connection to one of the pod's inbound listeners of `family`, trying each slot:
/// the others keep serving when one of a group of listeners closes. A socket of a reuseport
/// group is balanced over its group by the kernel.
#[inline(always)]
fn assign_listener(ctx: &SkLookupContext, pod: &InboundPod, family: u16) -> bool {
    for slot in 0..LISTENER_SLOTS {
        let key = ListenerKey {
            pod: pod.pod,
            port: pod.inbound_port,
            family,
            slot,
        };
        if LISTENERS.redirect_sk_lookup(ctx, key, 0).is_ok() {
            return true;
        }
    }
    false
}

#[inline(always)]
fn is_local_to(pod: &InboundPod, family: u16, addr: &[u32; 4]) -> bool {
    let bits = if family == AF_INET { 32 } else { 128 };
    let key = Key::new(
        POD_ADDR_KEY_FIXED_BITS + bits,
        PodAddrKey::new(pod.pod, pod.generation, family, *addr),
    );
    POD_ADDRS
        .get(&key)
        .is_some_and(|flags| flags & ADDR_LOCAL != 0)
}

/// istio's ISTIO_INBOUND chain: with `-b '*'` every port but the excluded ones (the tunnel
/// port and the proxy's own ports are always among them), otherwise the listed ones.
#[inline(always)]
fn captures(pod: &InboundPod, port: u16) -> bool {
    let flags = PORTS
        .get_ptr(&PortKey {
            pod: pod.pod,
            generation: pod.generation,
            port,
            _pad: 0,
        })
        .map_or(0, |flags| {
            // SAFETY: as above.
            unsafe { *flags }
        });
    if pod.flags & POLICY_INBOUND_ALL != 0 {
        flags & PORT_INBOUND_EXCLUDE == 0
    } else {
        flags & PORT_INBOUND_INCLUDE != 0
    }
}
