//! The only place that touches raw program contexts. aya-ebpf 0.2.1 exposes the sock_addr
//! and sockopt contexts as raw pointers (fields behind bindgen unions) and has no safe
//! wrapper for the socket/netns cookie helpers; everything unsafe about them lives here.
use aya_ebpf::{
    helpers::{bpf_get_current_uid_gid, bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext, SockoptContext},
    EbpfContext,
};

/// Cookie of the socket behind a sock_addr or sock_ops context (unique for the boot).
#[inline(always)]
pub fn socket_cookie(ctx: &impl EbpfContext) -> u64 {
    // SAFETY: the helper only reads the context the kernel handed us.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// Cookie of the network namespace of the socket behind a sock_ops or sockopt context.
#[inline(always)]
pub fn netns_cookie(ctx: &impl EbpfContext) -> u64 {
    // SAFETY: as above.
    unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
}

/// (uid, gid) of the current task.
#[inline(always)]
pub fn current_uid_gid() -> (u32, u32) {
    let both = bpf_get_current_uid_gid();
    (both as u32, (both >> 32) as u32)
}

const IPPROTO_TCP: u32 = 6;
const AF_INET6: u32 = 10;

/// The destination of a connect() on a TCP socket, in connect4: (address in network byte
/// order, port in host byte order); `None` for other protocols.
#[inline(always)]
pub fn tcp_connect4_destination(ctx: &SockAddrContext) -> Option<(u32, u16)> {
    // SAFETY: the kernel hands a valid bpf_sock_addr for the program's run.
    let sock_addr = unsafe { &*ctx.sock_addr };
    if sock_addr.protocol != IPPROTO_TCP {
        return None;
    }
    // user_port holds the port in network byte order in its low 16 bits.
    Some((sock_addr.user_ip4, u16::from_be(sock_addr.user_port as u16)))
}

/// The same in connect6: (address words in network byte order, port in host byte order).
#[inline(always)]
pub fn tcp_connect6_destination(ctx: &SockAddrContext) -> Option<([u32; 4], u16)> {
    // SAFETY: as above.
    let sock_addr = unsafe { &*ctx.sock_addr };
    if sock_addr.protocol != IPPROTO_TCP {
        return None;
    }
    let a = &sock_addr.user_ip6;
    Some((
        [a[0], a[1], a[2], a[3]],
        u16::from_be(sock_addr.user_port as u16),
    ))
}

/// Rewrites the destination of the connect() in progress (connect4).
#[inline(always)]
pub fn set_connect4_destination(ctx: &SockAddrContext, addr_be: u32, port: u16) {
    // SAFETY: user_ip4 and user_port are writable fields of bpf_sock_addr in connect4.
    unsafe {
        (*ctx.sock_addr).user_ip4 = addr_be;
        (*ctx.sock_addr).user_port = u32::from(port.to_be());
    }
}

/// Rewrites the destination of the connect() in progress (connect6); word by word, as the
/// verifier only accepts 4-byte stores to user_ip6.
#[inline(always)]
pub fn set_connect6_destination(ctx: &SockAddrContext, addr: [u32; 4], port: u16) {
    // SAFETY: user_ip6 and user_port are writable fields of bpf_sock_addr in connect6.
    unsafe {
        let sock_addr = ctx.sock_addr;
        core::ptr::write_volatile(&mut (*sock_addr).user_ip6[0], addr[0]);
        core::ptr::write_volatile(&mut (*sock_addr).user_ip6[1], addr[1]);
        core::ptr::write_volatile(&mut (*sock_addr).user_ip6[2], addr[2]);
        core::ptr::write_volatile(&mut (*sock_addr).user_ip6[3], addr[3]);
        (*sock_addr).user_port = u32::from(port.to_be());
    }
}

/// Whether the connecting socket is bound to `source` (IPv4 sockets compare `source[0]`,
/// IPv6 ones all four words).
#[inline(always)]
pub fn bound_to(ctx: &SockAddrContext, source: [u32; 4]) -> bool {
    // SAFETY: `sk` is the connecting socket, checked for null.
    unsafe {
        let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
        if sk.is_null() {
            return false;
        }
        if (*sk).family == AF_INET6 {
            // One load per field: merged into a loop, the compiler's pointer arithmetic on
            // the socket is rejected by the verifier.
            let s = &(*sk).src_ip6;
            let word = |i: usize| core::ptr::read_volatile(&s[i]);
            word(0) == source[0]
                && word(1) == source[1]
                && word(2) == source[2]
                && word(3) == source[3]
        } else {
            (*sk).src_ip4 == source[0]
        }
    }
}

/// Rewrites the address getpeername() reports (getpeername4).
#[inline(always)]
pub fn set_peername4(ctx: &SockAddrContext, addr_be: u32, port: u16) {
    set_connect4_destination(ctx, addr_be, port)
}

/// Rewrites the address getpeername() reports (getpeername6).
#[inline(always)]
pub fn set_peername6(ctx: &SockAddrContext, addr: [u32; 4], port: u16) {
    set_connect6_destination(ctx, addr, port)
}

/// The ends of the socket of a sock_ops context: (family, local addr, local port, remote
/// port), addresses in network byte order (IPv4 in word 0), ports in host byte order.
#[inline(always)]
pub fn sock_ops_ends(ctx: &SockOpsContext) -> (u32, [u32; 4], u16, u16) {
    // local_port is host order; remote_port is network order in the upper 16 bits.
    let (local_port, remote_port) = (
        ctx.local_port() as u16,
        u32::from_be(ctx.remote_port()) as u16,
    );
    if ctx.family() == AF_INET6 {
        (AF_INET6, ctx.local_ip6(), local_port, remote_port)
    } else {
        (
            ctx.family(),
            [ctx.local_ip4(), 0, 0, 0],
            local_port,
            remote_port,
        )
    }
}

/// Level and option name of the getsockopt() call.
#[inline(always)]
pub fn sockopt_level_name(ctx: &SockoptContext) -> (i32, i32) {
    // SAFETY: the kernel hands a valid bpf_sockopt for the program's run.
    unsafe { ((*ctx.sockopt).level, (*ctx.sockopt).optname) }
}

/// The socket of a getsockopt() call: (family, peer addr, peer port, local port), the
/// address in network byte order (IPv4 in word 0), ports in host byte order.
#[inline(always)]
pub fn sockopt_socket_ends(ctx: &SockoptContext) -> Option<(u32, [u32; 4], u16, u16)> {
    // SAFETY: the kernel hands a valid bpf_sockopt; `sk` is checked for null.
    unsafe {
        let sk = (*ctx.sockopt).__bindgen_anon_1.sk;
        if sk.is_null() {
            return None;
        }
        let family = (*sk).family;
        let peer = if family == AF_INET6 {
            let d = &(*sk).dst_ip6;
            [d[0], d[1], d[2], d[3]]
        } else {
            [(*sk).dst_ip4, 0, 0, 0]
        };
        // dst_port is a big-endian 16-bit field; src_port is host order.
        Some((
            family,
            peer,
            u16::from_be((*sk).dst_port),
            (*sk).src_port as u16,
        ))
    }
}

/// The kernel's own answer to the getsockopt() call so far (0 or -errno).
#[inline(always)]
pub fn sockopt_retval(ctx: &SockoptContext) -> i32 {
    // SAFETY: as above.
    unsafe { (*ctx.sockopt).retval }
}

/// The option buffer length the caller passed.
#[inline(always)]
pub fn sockopt_optlen(ctx: &SockoptContext) -> i32 {
    // SAFETY: as above.
    unsafe { (*ctx.sockopt).optlen }
}

/// Sets the result of the getsockopt() call to `-errno`, leaving the buffer alone.
#[inline(always)]
pub fn sockopt_fail(ctx: &SockoptContext, errno: i32) {
    // SAFETY: retval is writable in getsockopt programs.
    unsafe { core::ptr::write_volatile(&mut (*ctx.sockopt).retval, -errno) }
}

/// Answers the getsockopt() call with `value`: copied into the option buffer, optlen set to
/// its size, retval 0. Returns false (answering nothing) when the buffer is too small.
#[inline(always)]
pub fn sockopt_answer<T: Copy>(ctx: &SockoptContext, value: &T) -> bool {
    let size = core::mem::size_of::<T>();
    // SAFETY: the write is bounds-checked against optval_end as the verifier requires;
    // optlen and retval are written separately because a merged 8-byte store is rejected
    // by the verifier (see EBPF-NOTES.md).
    unsafe {
        let sockopt = ctx.sockopt;
        let optval = (*sockopt).__bindgen_anon_2.optval as *mut u8;
        let optval_end = (*sockopt).__bindgen_anon_3.optval_end as *mut u8;
        if optval.is_null() || optval.add(size) > optval_end {
            return false;
        }
        core::ptr::write_unaligned(optval as *mut T, *value);
        core::ptr::write_volatile(&mut (*sockopt).optlen, size as i32);
        core::ptr::write_volatile(&mut (*sockopt).retval, 0);
    }
    true
}

/// An inbound TCP listener lookup: (family, local addr, local port, remote addr), addresses
/// in network byte order (IPv4 in word 0), the port in host byte order; `None` for other
/// protocols.
#[inline(always)]
pub fn sk_lookup_tcp(ctx: &SkLookupContext) -> Option<(u32, [u32; 4], u16, [u32; 4])> {
    // SAFETY: the kernel hands a valid bpf_sk_lookup for the program's run.
    let lookup = unsafe { &*ctx.lookup };
    if lookup.protocol != IPPROTO_TCP {
        return None;
    }
    // local_port is host order.
    let port = lookup.local_port as u16;
    if lookup.family == AF_INET6 {
        let (l, r) = (&lookup.local_ip6, &lookup.remote_ip6);
        Some((
            AF_INET6,
            [l[0], l[1], l[2], l[3]],
            port,
            [r[0], r[1], r[2], r[3]],
        ))
    } else {
        Some((
            lookup.family,
            [lookup.local_ip4, 0, 0, 0],
            port,
            [lookup.remote_ip4, 0, 0, 0],
        ))
    }
}

/// The raw sock_ops context, for helpers that take it (sock_hash_update).
#[inline(always)]
pub fn sock_ops(ctx: &SockOpsContext) -> &mut aya_ebpf::bindings::bpf_sock_ops {
    // SAFETY: the kernel hands a valid bpf_sock_ops for the program's run; the helper that
    // borrows it only reads.
    unsafe { &mut *ctx.ops }
}

/// The local address of the socket of a getsockopt() call: (family, addr, port).
#[inline(always)]
pub fn sockopt_local(ctx: &SockoptContext) -> Option<(u32, [u32; 4], u16)> {
    // SAFETY: as for sockopt_socket_ends.
    unsafe {
        let sk = (*ctx.sockopt).__bindgen_anon_1.sk;
        if sk.is_null() {
            return None;
        }
        let family = (*sk).family;
        let local = if family == AF_INET6 {
            let s = &(*sk).src_ip6;
            [s[0], s[1], s[2], s[3]]
        } else {
            [(*sk).src_ip4, 0, 0, 0]
        };
        Some((family, local, (*sk).src_port as u16))
    }
}
