//! `cgroup/getpeername4` and `cgroup/getpeername6`: the application's redirected socket
//! reports its original destination as its peer, not the proxy's loopback address (as
//! after an iptables REDIRECT, where the NAT is invisible to the application). Only sockets
//! with a connection record are touched, so proxies and exempt processes see the truth too.
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use redirector_common::{RawSockAddr, AF_INET};

use crate::{addr, maps::ORIG_BY_COOKIE, raw};

const PROCEED: i32 = 1;

#[cgroup_sock_addr(getpeername4)]
pub fn redirector_getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(original) = original_destination(&ctx) {
        if original.family == AF_INET {
            raw::set_peername4(&ctx, original.addr[0], original.port);
        }
    }
    PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn redirector_getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(original) = original_destination(&ctx) {
        let peer = if original.family == AF_INET {
            addr::v4_mapped(original.addr[0])
        } else {
            original.addr
        };
        raw::set_peername6(&ctx, peer, original.port);
    }
    PROCEED
}

#[inline(always)]
fn original_destination(ctx: &SockAddrContext) -> Option<RawSockAddr> {
    let record = ORIG_BY_COOKIE.get_ptr(&raw::socket_cookie(ctx))?;
    // SAFETY: map value pointer valid for this run.
    Some(unsafe { (*record).original_dst })
}
