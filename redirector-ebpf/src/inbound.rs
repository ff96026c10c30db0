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
    InboundAddrKey, ListenerKey, PodAddrKey, PodConfig, PortKey, ADDR_LOCAL, AF_INET, AF_INET6,
    POD_ADDR_KEY_FIXED_BITS, POLICY_INBOUND_ALL, POLICY_INBOUND_FAIL_OPEN, POLICY_IPV4,
    POLICY_IPV6, PORT_INBOUND_EXCLUDE, PORT_INBOUND_INCLUDE,
};

use crate::{
    addr::V6_LOOPBACK,
    maps::{INBOUND_ADDRS, LISTENERS, POD_ADDRS, POD_CONFIG, PORTS},
    pod::count,
    raw,
};

#[sk_lookup]
pub fn redirector_inbound(ctx: SkLookupContext) -> u32 {
    let Some((family, local, port, remote)) = raw::sk_lookup_tcp(&ctx) else {
        return SK_PASS;
    };
    let family = family as u16;
    if is_loopback(family, &local) {
        return SK_PASS;
    }
    let Some(owner) = INBOUND_ADDRS.get_ptr(&InboundAddrKey {
        family: u32::from(family),
        addr: local,
    }) else {
        return SK_PASS;
    };
    // SAFETY: map value pointers are valid for the program's run.
    let owner = unsafe { *owner };
    let Some(config) = POD_CONFIG.get_ptr(&owner.pod) else {
        return SK_PASS;
    };
    // SAFETY: as above.
    let config = unsafe { *config };
    // istio writes IPv6 rules only when IPv6 is on for the pod.
    let family_flag = if family == AF_INET {
        POLICY_IPV4
    } else {
        POLICY_IPV6
    };
    if config.flags & family_flag == 0 {
        return SK_PASS;
    }
    // The pod's own traffic (the proxy's passthrough from 127.0.0.6, the app calling itself)
    // is decided by the outbound policy, as in istio where nat PREROUTING never sees it.
    if is_local_to(owner.pod, family, &remote) {
        return SK_PASS;
    }
    if !captures(owner.pod, &config, port) {
        count(owner.pod, |stats| stats.inbound_excluded += 1);
        return SK_PASS;
    }
    let listener = |family| ListenerKey {
        netns_cookie: owner.netns_cookie,
        port: config.inbound_port,
        family,
        _pad: 0,
    };
    // An IPv6 listener that is not v6-only takes IPv4 too.
    let assigned = LISTENERS
        .redirect_sk_lookup(&ctx, listener(family), 0)
        .is_ok()
        || (family == AF_INET
            && LISTENERS
                .redirect_sk_lookup(&ctx, listener(AF_INET6), 0)
                .is_ok());
    if assigned {
        count(owner.pod, |stats| stats.inbound_captured += 1);
        return SK_PASS;
    }
    count(owner.pod, |stats| stats.inbound_no_proxy += 1);
    // Separate returns: a computed verdict compiled to a form the verifier rejects.
    if config.flags & POLICY_INBOUND_FAIL_OPEN != 0 {
        return SK_PASS;
    }
    SK_DROP
}

#[inline(always)]
fn is_loopback(family: u16, addr: &[u32; 4]) -> bool {
    if family == AF_INET {
        addr[0].to_ne_bytes()[0] == 127
    } else {
        addr[0] == V6_LOOPBACK[0]
            && addr[1] == V6_LOOPBACK[1]
            && addr[2] == V6_LOOPBACK[2]
            && addr[3] == V6_LOOPBACK[3]
    }
}

#[inline(always)]
fn is_local_to(pod: u64, family: u16, addr: &[u32; 4]) -> bool {
    let bits = if family == AF_INET { 32 } else { 128 };
    let key = Key::new(
        POD_ADDR_KEY_FIXED_BITS + bits,
        PodAddrKey::new(pod, family, *addr),
    );
    POD_ADDRS
        .get(&key)
        .is_some_and(|flags| flags & ADDR_LOCAL != 0)
}

/// istio's ISTIO_INBOUND chain: with `-b '*'` every port but the excluded ones (the tunnel
/// port and the proxy's own ports are always among them), otherwise the listed ones.
#[inline(always)]
fn captures(pod: u64, config: &PodConfig, port: u16) -> bool {
    let flags = PORTS
        .get_ptr(&PortKey {
            pod,
            port,
            _pad: [0; 6],
        })
        .map_or(0, |flags| {
            // SAFETY: as above.
            unsafe { *flags }
        });
    if config.flags & POLICY_INBOUND_ALL != 0 {
        flags & PORT_INBOUND_EXCLUDE == 0
    } else {
        flags & PORT_INBOUND_INCLUDE != 0
    }
}
