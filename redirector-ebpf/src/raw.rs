//! The only place that touches raw program contexts. aya-ebpf 0.2.1 exposes the sock_addr
//! and sockopt contexts as raw pointers (fields behind bindgen unions) and has no safe
//! wrapper for the socket/netns cookie helpers; everything unsafe about them lives here.
use aya_ebpf::{
    bindings::{bpf_sock, BPF_SK_STORAGE_GET_F_CREATE},
    btf_maps::SkStorage,
    helpers::{bpf_get_current_uid_gid, bpf_sk_storage_delete, bpf_sk_storage_get},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext, SockoptContext},
};

use crate::addr::{self, V4_PASSTHROUGH, V6_PASSTHROUGH, V6_UNSPECIFIED};

/// The socket behind a program context (null only where the kernel says so: checked by the
/// storage functions below).
pub trait SocketContext {
    fn socket(&self) -> *mut bpf_sock;
}

impl SocketContext for SockAddrContext {
    #[inline(always)]
    fn socket(&self) -> *mut bpf_sock {
        // SAFETY: the kernel hands a valid bpf_sock_addr for the program's run.
        unsafe { (*self.sock_addr).__bindgen_anon_1.sk }
    }
}

impl SocketContext for SockOpsContext {
    #[inline(always)]
    fn socket(&self) -> *mut bpf_sock {
        // SAFETY: the kernel hands a valid bpf_sock_ops for the program's run.
        unsafe { (*self.ops).__bindgen_anon_2.sk }
    }
}

impl SocketContext for SockoptContext {
    #[inline(always)]
    fn socket(&self) -> *mut bpf_sock {
        // SAFETY: the kernel hands a valid bpf_sockopt for the program's run.
        unsafe { (*self.sockopt).__bindgen_anon_1.sk }
    }
}

/// The socket-local storage of `map` on the context's socket: the existing value, or with
/// `create` a new zeroed one. Null-safe: a context without a full socket has none.
#[inline(always)]
pub fn socket_storage<T>(
    map: &SkStorage<T>,
    ctx: &impl SocketContext,
    create: bool,
) -> Option<*mut T> {
    let sk = ctx.socket();
    if sk.is_null() {
        return None;
    }
    let flags = if create {
        u64::from(BPF_SK_STORAGE_GET_F_CREATE)
    } else {
        0
    };
    // SAFETY: `sk` is the program's own socket; the helper returns a pointer into the
    // socket's storage, valid for the run (freed by RCU only after the socket is gone).
    let value = unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(map).cast_mut().cast(),
            sk.cast(),
            core::ptr::null_mut(),
            flags,
        )
    }
    .cast::<T>();
    (!value.is_null()).then_some(value)
}

/// Removes the socket-local storage of `map` from the context's socket.
#[inline(always)]
pub fn delete_socket_storage<T>(map: &SkStorage<T>, ctx: &impl SocketContext) {
    let sk = ctx.socket();
    if !sk.is_null() {
        // SAFETY: as above. A missing value is no error here.
        unsafe { bpf_sk_storage_delete(core::ptr::from_ref(map).cast_mut().cast(), sk.cast()) };
    }
}

/// (uid, gid) of the current task.
#[inline(always)]
pub fn current_uid_gid() -> (u32, u32) {
    let both = bpf_get_current_uid_gid();
    (both as u32, (both >> 32) as u32)
}

const IPPROTO_TCP: u32 = 6;
const AF_INET6: u32 = 10;

const IPPROTO_UDP: u32 = 17;

/// The transport of a sock_addr hook's socket, as far as redirector cares.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Udp,
    Other,
}

/// The socket's transport and the address of a sock_addr hook (the destination in connect and
/// sendmsg, the source in recvmsg, the peer or local address in getpeername/getsockname) for an
/// IPv4 hook: (transport, address in network byte order, port in host byte order).
#[inline(always)]
pub fn address4(ctx: &SockAddrContext) -> (Transport, u32, u16) {
    // SAFETY: the kernel hands a valid bpf_sock_addr for the program's run.
    let sock_addr = unsafe { &*ctx.sock_addr };
    // user_port holds the port in network byte order in its low 16 bits.
    (
        transport(sock_addr.protocol),
        sock_addr.user_ip4,
        u16::from_be(sock_addr.user_port as u16),
    )
}

/// The same for an IPv6 hook: (transport, address words in network byte order, port in host
/// byte order).
#[inline(always)]
pub fn address6(ctx: &SockAddrContext) -> (Transport, [u32; 4], u16) {
    // SAFETY: as above.
    let sock_addr = unsafe { &*ctx.sock_addr };
    let a = &sock_addr.user_ip6;
    (
        transport(sock_addr.protocol),
        [a[0], a[1], a[2], a[3]],
        u16::from_be(sock_addr.user_port as u16),
    )
}

#[inline(always)]
fn transport(protocol: u32) -> Transport {
    match protocol {
        IPPROTO_TCP => Transport::Tcp,
        IPPROTO_UDP => Transport::Udp,
        _ => Transport::Other,
    }
}

/// Rewrites the address of an IPv4 sock_addr hook (the destination of a connect or datagram,
/// the source of a received datagram, the address getpeername/getsockname report).
#[inline(always)]
pub fn set_address4(ctx: &SockAddrContext, addr_be: u32, port: u16) {
    // SAFETY: user_ip4 and user_port are writable in the hooks that call this.
    unsafe {
        (*ctx.sock_addr).user_ip4 = addr_be;
        (*ctx.sock_addr).user_port = u32::from(port.to_be());
    }
}

/// The same for an IPv6 hook; word by word, as the verifier only accepts 4-byte stores to
/// user_ip6.
#[inline(always)]
pub fn set_address6(ctx: &SockAddrContext, addr: [u32; 4], port: u16) {
    // SAFETY: user_ip6 and user_port are writable in the hooks that call this.
    unsafe {
        let sock_addr = ctx.sock_addr;
        core::ptr::write_volatile(&mut (*sock_addr).user_ip6[0], addr[0]);
        core::ptr::write_volatile(&mut (*sock_addr).user_ip6[1], addr[1]);
        core::ptr::write_volatile(&mut (*sock_addr).user_ip6[2], addr[2]);
        core::ptr::write_volatile(&mut (*sock_addr).user_ip6[3], addr[3]);
        (*sock_addr).user_port = u32::from(port.to_be());
    }
}

/// Whether what the socket sends to (`family`, `addr`: IPv4-mapped addresses normalized to
/// IPv4) leaves from istio's inbound passthrough source, which the proxy binds: 127.0.0.6, or
/// ::6. The socket is bound there; or, unbound, it sends to ::6 itself, which IPv6 source
/// selection answers with ::6 (same-address rule; IPv4 loopback routes give 127.0.0.1).
#[inline(always)]
pub fn from_passthrough(ctx: &SockAddrContext, family: u16, addr: &[u32; 4]) -> bool {
    if family == redirector_common::AF_INET {
        bound_to(ctx, family, [V4_PASSTHROUGH, 0, 0, 0])
    } else {
        bound_to(ctx, family, V6_PASSTHROUGH)
            || (addr::equal(*addr, V6_PASSTHROUGH) && bound_to(ctx, family, V6_UNSPECIFIED))
    }
}

/// Whether the socket is bound to `source` of `family` (IPv4 in word 0). A dual-stack IPv6
/// socket talking IPv4 (an IPv4-mapped peer) holds the IPv4-mapped form: it reaches IPv4's
/// hooks too, as sendmsg4 when it sends to an IPv4-mapped address.
#[inline(always)]
fn bound_to(ctx: &SockAddrContext, family: u16, source: [u32; 4]) -> bool {
    // SAFETY: `sk` is the hook's socket, checked for null.
    unsafe {
        let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
        if sk.is_null() {
            return false;
        }
        if (*sk).family == AF_INET6 {
            let source = addr::as_ipv6(family, source);
            // One load per field: merged into a loop, the compiler's pointer arithmetic on
            // the socket is rejected by the verifier.
            let s = &(*sk).src_ip6;
            let word = |i: usize| core::ptr::read_volatile(&s[i]);
            word(0) == source[0]
                && word(1) == source[1]
                && word(2) == source[2]
                && word(3) == source[3]
        } else {
            // (An IPv4 socket is only ever asked about IPv4.)
            (*sk).src_ip4 == source[0]
        }
    }
}

/// The ends of the socket of a sock_ops context: (family, local addr, local port, remote
/// addr, remote port), addresses in network byte order (IPv4 in word 0), ports in host byte
/// order.
#[inline(always)]
pub fn sock_ops_tuple(ctx: &SockOpsContext) -> (u32, [u32; 4], u16, [u32; 4], u16) {
    // local_port is host order; remote_port is network order in the upper 16 bits.
    let (local_port, remote_port) = (
        ctx.local_port() as u16,
        u32::from_be(ctx.remote_port()) as u16,
    );
    if ctx.family() == AF_INET6 {
        (
            AF_INET6,
            ctx.local_ip6(),
            local_port,
            ctx.remote_ip6(),
            remote_port,
        )
    } else {
        (
            ctx.family(),
            [ctx.local_ip4(), 0, 0, 0],
            local_port,
            [ctx.remote_ip4(), 0, 0, 0],
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

/// Leaves the getsockopt() call as the kernel answered it: optlen 0 tells the kernel not to
/// copy the program's buffer back. Before Linux 6.5 this is also what keeps a call whose
/// answer is longer than a page from failing with EFAULT (the program sees only the first
/// page of it).
#[inline(always)]
pub fn sockopt_keep_kernel_answer(ctx: &SockoptContext) {
    // SAFETY: optlen is writable in getsockopt programs.
    unsafe { core::ptr::write_volatile(&mut (*ctx.sockopt).optlen, 0) }
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
            // One load per field: merged, the compiler's pointer arithmetic on the socket is
            // rejected by the verifier.
            let s = &(*sk).src_ip6;
            let word = |i: usize| core::ptr::read_volatile(&s[i]);
            [word(0), word(1), word(2), word(3)]
        } else {
            [(*sk).src_ip4, 0, 0, 0]
        };
        Some((family, local, (*sk).src_port as u16))
    }
}
