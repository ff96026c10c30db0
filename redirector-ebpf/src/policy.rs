//! The capture decision for one outbound TCP connect, reproducing istio-iptables' nat
//! OUTPUT chain (REDIRECT mode) rule by rule, reduced to lookups in sets built at enroll time.
//!
//! The ISTIO_OUTPUT chain, in order, and where each rule lands here:
//! 1. `-p tcp --dport <-o port> -j RETURN`                      → `PORT_OUTBOUND_EXCLUDE`
//! 2. `-o lo -s 127.0.0.6/32 -j RETURN` (::6 in IPv6)           → `passthrough_source` (bound
//!    to it, or, in IPv6, unbound and connecting to ::6, which the kernel then picks as source)
//! 3. per proxy UID, then per proxy GID X:
//!    a. `-o lo ! -d <loopback cidr> -p tcp ! --dport <-e> [! 53 for UIDs with DNS] --owner X -j ISTIO_IN_REDIRECT`
//!    b. `-o lo [-p tcp ! --dport 53 with DNS] ! --owner X -j RETURN` (absent when `-i` has a loopback CIDR)
//!    c. `--owner X -j RETURN`
//!    With rule b present, the first owner's group decides every local connection but DNS
//!    ones; otherwise the first owner that matches decides (UIDs come before GIDs).
//! 4. owner-group filter: `! --gid-owner G... -j RETURN` or `--gid-owner G -j RETURN`
//! 5. DNS: `-p tcp --dport 53 [-d <server>] -j REDIRECT --to-ports 15053`
//! 6. `-d <loopback cidr> -j RETURN`, then `-d <-x cidr> -j RETURN`
//! 7. `-p tcp --dport <-q port> -j ISTIO_REDIRECT`, then `-d <-i cidr>` or `-j ISTIO_REDIRECT` for `*`.
use aya_ebpf::maps::lpm_trie::Key;
use redirector_common::{
    OwnerKey, PodAddrKey, PodConfig, PortKey, ADDR_DNS_SERVER, ADDR_EXCLUDE, ADDR_INCLUDE,
    ADDR_LOCAL, ADDR_LOOPBACK_CIDR, AF_INET, OWNER_GID, OWNER_GROUP_FILTER, OWNER_UID,
    POD_ADDR_KEY_FIXED_BITS, POLICY_CAPTURE_ALL_DNS, POLICY_GROUPS_EXCLUDE, POLICY_GROUPS_INCLUDE,
    POLICY_INCLUDE_ALL, POLICY_IPV4, POLICY_IPV6, POLICY_LOOPBACK_INCLUDED, POLICY_REDIRECT_DNS,
    PORT_OUTBOUND_EXCLUDE, PORT_OUTBOUND_INCLUDE,
};

use crate::{
    maps::{OWNERS, POD_ADDRS, PORTS},
    raw,
};

const DNS_PORT: u16 = 53;

/// Where a connect goes.
pub enum Verdict {
    /// Not captured: the connect goes where the application asked.
    Pass,
    /// Captured: the connect goes to this port on loopback.
    ToPort(u16),
}

/// An outbound TCP connect, with IPv4-mapped IPv6 destinations already turned into IPv4.
pub struct Connect {
    pub family: u16,
    /// Network byte order words; IPv4 in `addr[0]`.
    pub addr: [u32; 4],
    pub port: u16,
}

/// The capture decision for a TCP connect (the ISTIO_OUTPUT chain above).
#[inline(always)]
pub fn decide(
    config: &PodConfig,
    connect: &Connect,
    passthrough_source: impl FnOnce() -> bool,
) -> Verdict {
    if !family_captured(config, connect) {
        return Verdict::Pass;
    }
    let port_flags = lookup_u32(PORTS.get_ptr(&PortKey {
        pod: config.pod,
        generation: config.generation,
        port: connect.port,
        _pad: 0,
    }));
    if port_flags & PORT_OUTBOUND_EXCLUDE != 0 {
        return Verdict::Pass;
    }
    let addr_flags = address_flags(config, connect);
    let local = addr_flags & ADDR_LOCAL != 0;
    if local && passthrough_source() {
        return Verdict::Pass;
    }

    let (uid, gid) = raw::current_uid_gid();
    let dns = config.flags & POLICY_REDIRECT_DNS != 0 && connect.port == DNS_PORT;
    // ISTIO_IN_REDIRECT's conditions besides the owner: a local destination outside the
    // loopback CIDR, not the tunnel port.
    let to_inbound =
        local && addr_flags & ADDR_LOOPBACK_CIDR == 0 && connect.port != config.tunnel_port;
    if config.flags & POLICY_LOOPBACK_INCLUDED == 0 && local && !dns {
        return if to_inbound && uid == config.first_uid {
            Verdict::ToPort(config.inbound_port)
        } else {
            Verdict::Pass
        };
    }
    let proxy_uid = is_owner(config, OWNER_UID, uid);
    if proxy_uid || is_owner(config, OWNER_GID, gid) {
        // With DNS capture the UID rules carve out port 53, the GID rules do not.
        return if to_inbound && !(dns && proxy_uid) {
            Verdict::ToPort(config.inbound_port)
        } else {
            Verdict::Pass
        };
    }
    if left_alone_by_owner_groups(config, gid) {
        return Verdict::Pass;
    }
    if dns && is_dns_server(config, addr_flags) {
        return Verdict::ToPort(config.dns_port);
    }
    if addr_flags & (ADDR_LOOPBACK_CIDR | ADDR_EXCLUDE) != 0 {
        return Verdict::Pass;
    }
    if port_flags & PORT_OUTBOUND_INCLUDE != 0
        || config.flags & POLICY_INCLUDE_ALL != 0
        || addr_flags & ADDR_INCLUDE != 0
    {
        return Verdict::ToPort(config.proxy_port);
    }
    Verdict::Pass
}

/// The capture decision for UDP (a datagram sent, or a UDP socket's connect): only DNS is
/// captured. istio-iptables' rules that match UDP, in order: `-o lo -s 127.0.0.6 -j RETURN`;
/// each proxy owner's `--uid-owner X -j RETURN` / `--gid-owner X -j RETURN` (any protocol,
/// so the proxy's own queries go to the real server); the owner-group filter; then
/// `-p udp --dport 53 [-d <server>] -j REDIRECT --to-port 15053` in ISTIO_OUTPUT_DNS.
#[inline(always)]
pub fn decide_dns(
    config: &PodConfig,
    connect: &Connect,
    passthrough_source: impl FnOnce() -> bool,
) -> Verdict {
    if connect.port != DNS_PORT
        || config.flags & POLICY_REDIRECT_DNS == 0
        || !family_captured(config, connect)
    {
        return Verdict::Pass;
    }
    let addr_flags = address_flags(config, connect);
    if addr_flags & ADDR_LOCAL != 0 && passthrough_source() {
        return Verdict::Pass;
    }
    let (uid, gid) = raw::current_uid_gid();
    if is_proxy_owner(config, uid, gid) || left_alone_by_owner_groups(config, gid) {
        return Verdict::Pass;
    }
    if is_dns_server(config, addr_flags) {
        return Verdict::ToPort(config.dns_port);
    }
    Verdict::Pass
}

/// istio writes IPv6 rules only when IPv6 is on for the pod.
#[inline(always)]
fn family_captured(config: &PodConfig, connect: &Connect) -> bool {
    let family_flag = if connect.family == AF_INET {
        POLICY_IPV4
    } else {
        POLICY_IPV6
    };
    config.flags & family_flag != 0
}

/// The `ADDR_*` bits of the longest prefix of the pod's policy holding the destination.
#[inline(always)]
fn address_flags(config: &PodConfig, connect: &Connect) -> u32 {
    let addr_bits = if connect.family == AF_INET { 32 } else { 128 };
    let addr_key = Key::new(
        POD_ADDR_KEY_FIXED_BITS + addr_bits,
        PodAddrKey::new(config.pod, config.generation, connect.family, connect.addr),
    );
    POD_ADDRS.get(&addr_key).copied().unwrap_or(0)
}

/// The owner-group filter (`ISTIO_OUTBOUND_OWNER_GROUPS[_EXCLUDE]`) leaves this process alone.
#[inline(always)]
fn left_alone_by_owner_groups(config: &PodConfig, gid: u32) -> bool {
    if config.flags & (POLICY_GROUPS_INCLUDE | POLICY_GROUPS_EXCLUDE) == 0 {
        return false;
    }
    let listed = is_owner(config, OWNER_GROUP_FILTER, gid);
    listed == (config.flags & POLICY_GROUPS_EXCLUDE != 0)
}

/// A DNS query to this destination goes to the proxy's DNS port (`--capture-all-dns`, or one of
/// the pod's DNS servers).
#[inline(always)]
fn is_dns_server(config: &PodConfig, addr_flags: u32) -> bool {
    config.flags & POLICY_CAPTURE_ALL_DNS != 0 || addr_flags & ADDR_DNS_SERVER != 0
}

/// The process is one of the proxy's owners (`-u`/`-g`).
#[inline(always)]
pub fn is_proxy_owner(config: &PodConfig, uid: u32, gid: u32) -> bool {
    is_owner(config, OWNER_UID, uid) || is_owner(config, OWNER_GID, gid)
}

#[inline(always)]
fn is_owner(config: &PodConfig, kind: u32, id: u32) -> bool {
    OWNERS
        .get_ptr(&OwnerKey {
            pod: config.pod,
            generation: config.generation,
            kind,
            id,
            _pad: 0,
        })
        .is_some()
}

#[inline(always)]
fn lookup_u32(value: Option<*const u32>) -> u32 {
    // SAFETY: map value pointers are valid for the program's run.
    value.map_or(0, |value| unsafe { *value })
}
