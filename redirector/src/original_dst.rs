//! The original destination of a redirected connection, for proxies.
//!
//! Two ways, with the same answer: [`so_original_dst`] asks the kernel with
//! `getsockopt(SOL_IP, SO_ORIGINAL_DST)` exactly as Envoy and HAProxy do (answered by the
//! `cgroup/getsockopt` program), and [`OriginalDstMap`] reads the pinned record map directly,
//! for proxies that prefer not to make that call.
use std::{
    io,
    mem::{size_of, MaybeUninit},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    os::fd::{AsFd, AsRawFd, BorrowedFd},
};

use aya::maps::{HashMap, MapData, MapError};
use nix::sys::socket::{getpeername, getsockname, SockaddrIn};
use redirector_common::{map_names, PeerKey, RawSockAddr, AF_INET};

use crate::{
    loader::{self, LoadError},
    pins::PinRoot,
};

/// `SO_ORIGINAL_DST` from linux/netfilter_ipv4.h.
const SO_ORIGINAL_DST: libc::c_int = 80;
/// `SO_NETNS_COOKIE` from asm-generic/socket.h (Linux 5.14).
const SO_NETNS_COOKIE: libc::c_int = 71;

#[derive(Debug, thiserror::Error)]
pub enum OriginalDstError {
    #[error(transparent)]
    Open(#[from] LoadError),
    #[error("reading the addresses of the accepted socket: {0}")]
    Socket(#[from] io::Error),
    #[error("the accepted socket is not IPv4 (only IPv4 connections are redirected)")]
    NotIpv4,
    #[error("no original destination recorded for the connection from {peer} (not redirected, or already closed)")]
    NotFound { peer: SocketAddr },
    #[error("reading the record map: {0}")]
    Map(#[from] MapError),
}

/// The original destination of an accepted, redirected IPv4 connection, via the kernel.
pub fn so_original_dst(socket: BorrowedFd<'_>) -> io::Result<SocketAddrV4> {
    let raw: libc::sockaddr_in = getsockopt_value(socket, libc::SOL_IP, SO_ORIGINAL_DST)?;
    Ok(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(raw.sin_addr.s_addr)),
        u16::from_be(raw.sin_port),
    ))
}

/// The cookie of the network namespace a socket lives in.
pub fn netns_cookie(socket: BorrowedFd<'_>) -> io::Result<u64> {
    getsockopt_value(socket, libc::SOL_SOCKET, SO_NETNS_COOKIE)
}

fn getsockopt_value<T: Copy>(
    socket: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<T> {
    let mut value = MaybeUninit::<T>::zeroed();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: the buffer is valid for `len` bytes; T is plain data the kernel fills.
    let ret = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            level,
            name,
            value.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zero-initialised and filled by the kernel.
    Ok(unsafe { value.assume_init() })
}

/// The pinned record map, opened once and used for every accepted connection.
pub struct OriginalDstMap {
    records: HashMap<MapData, PeerKey, RawSockAddr>,
}

impl OriginalDstMap {
    pub fn open(root: &PinRoot) -> Result<Self, OriginalDstError> {
        Ok(Self {
            records: loader::open_map(root, map_names::ORIG_BY_PEER)?,
        })
    }

    pub fn lookup(&self, accepted: &TcpStream) -> Result<SocketAddr, OriginalDstError> {
        self.lookup_fd(accepted.as_fd())
    }

    pub fn lookup_fd(&self, accepted: BorrowedFd<'_>) -> Result<SocketAddr, OriginalDstError> {
        let fd = accepted.as_raw_fd();
        let local = getsockname::<SockaddrIn>(fd).map_err(|_| OriginalDstError::NotIpv4)?;
        let peer = getpeername::<SockaddrIn>(fd).map_err(|_| OriginalDstError::NotIpv4)?;
        let key = PeerKey {
            netns_cookie: netns_cookie(accepted)?,
            peer_addr: [u32::from(peer.ip()).to_be(), 0, 0, 0],
            peer_port: peer.port(),
            proxy_port: local.port(),
            family: AF_INET,
            _pad: 0,
        };
        match self.records.get(&key, 0) {
            Ok(original) => Ok(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(original.addr[0])),
                original.port,
            ))),
            Err(MapError::KeyNotFound) => Err(OriginalDstError::NotFound {
                peer: SocketAddrV4::new(peer.ip(), peer.port()).into(),
            }),
            Err(e) => Err(e.into()),
        }
    }
}
