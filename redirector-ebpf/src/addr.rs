//! Address constants and IPv4-mapped IPv6 handling, in the kernel's layout (network byte
//! order words; IPv4 in word 0).
use redirector_common::{AF_INET, AF_INET6};

const fn word(bytes: [u8; 4]) -> u32 {
    u32::from_ne_bytes(bytes)
}

pub const V4_LOOPBACK: u32 = word([127, 0, 0, 1]);
/// The proxy's inbound passthrough source (istio binds it when forwarding to the application).
pub const V4_PASSTHROUGH: u32 = word([127, 0, 0, 6]);
pub const V6_LOOPBACK: [u32; 4] = [0, 0, 0, word([0, 0, 0, 1])];
pub const V6_PASSTHROUGH: [u32; 4] = [0, 0, 0, word([0, 0, 0, 6])];
pub const V6_UNSPECIFIED: [u32; 4] = [0; 4];
const MAPPED_PREFIX: u32 = word([0, 0, 0xff, 0xff]);

/// `::ffff:a.b.c.d` for an IPv4 address.
#[inline(always)]
pub const fn v4_mapped(v4: u32) -> [u32; 4] {
    [0, 0, MAPPED_PREFIX, v4]
}

/// Where an IPv6 socket's captured connect or datagram to an address of `family` goes:
/// loopback, IPv4-mapped for a dual-stack socket talking IPv4.
#[inline(always)]
pub fn ipv6_loopback_for(family: u16) -> [u32; 4] {
    if family == AF_INET {
        v4_mapped(V4_LOOPBACK)
    } else {
        V6_LOOPBACK
    }
}

/// 127.0.0.0/8 or ::1 (IPv4-mapped addresses already normalized to IPv4).
#[inline(always)]
pub fn is_loopback(family: u16, addr: &[u32; 4]) -> bool {
    if family == AF_INET {
        addr[0].to_ne_bytes()[0] == 127
    } else {
        equal(*addr, V6_LOOPBACK)
    }
}

/// All zero: no address.
#[inline(always)]
pub fn is_unset(addr: &[u32; 4]) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == 0 && addr[3] == 0
}

/// An address of `family` (IPv4 in word 0) as an IPv6 socket sees it: IPv4 becomes IPv4-mapped.
#[inline(always)]
pub fn as_ipv6(family: u16, addr: [u32; 4]) -> [u32; 4] {
    if family == AF_INET {
        v4_mapped(addr[0])
    } else {
        addr
    }
}

/// Word by word: a slice or array comparison may become a memcmp call, which BPF lacks.
#[inline(always)]
pub fn equal(a: [u32; 4], b: [u32; 4]) -> bool {
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3]
}

/// IPv4-mapped IPv6 addresses become IPv4: a dual-stack socket talking IPv4 is decided,
/// recorded and looked up as IPv4.
#[inline(always)]
pub fn normalize(family: u32, addr: [u32; 4]) -> (u16, [u32; 4]) {
    if family == u32::from(AF_INET6) {
        if addr[0] == 0 && addr[1] == 0 && addr[2] == MAPPED_PREFIX {
            (AF_INET, [addr[3], 0, 0, 0])
        } else {
            (AF_INET6, addr)
        }
    } else {
        (AF_INET, [addr[0], 0, 0, 0])
    }
}
