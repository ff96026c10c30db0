//! The original destination of a redirected connection, for proxies.
//!
//! Two ways, with the same answer: [`so_original_dst`] asks the kernel with
//! `getsockopt(SOL_IP, SO_ORIGINAL_DST)` exactly as Envoy and HAProxy do (answered by the
//! `cgroup/getsockopt` program), and [`OriginalDstMap`] reads the accepted socket's record
//! from the pinned socket-storage map directly, for proxies that prefer not to make that call.
use std::{
    io,
    mem::{size_of, MaybeUninit},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    os::fd::{AsFd, AsRawFd, BorrowedFd},
};

use aya::maps::{MapData, MapError, SkStorage};
use nix::sys::socket::{getsockname, SockaddrStorage};
use redirector_common::{map_names, SocketRecord, AF_INET, AF_INET6, RECORD_PROXY};

use crate::{loader::LoadError, maps, pins::PinRoot};

/// `SO_ORIGINAL_DST` from linux/netfilter_ipv4.h (`IP6T_SO_ORIGINAL_DST` has the same value).
pub const SO_ORIGINAL_DST: libc::c_int = 80;

#[derive(Debug, thiserror::Error)]
pub enum OriginalDstError {
    #[error(transparent)]
    Open(#[from] LoadError),
    #[error("reading the addresses of the accepted socket: {0}")]
    Socket(#[from] io::Error),
    #[error("no original destination recorded for this socket (not the proxy's side of a redirected connection)")]
    NotFound,
    #[error("reading the record map: {0}")]
    Map(#[from] MapError),
}

/// The original destination of an accepted, redirected connection, via the kernel: the
/// accepted socket's family chooses the call, as Envoy does (`SOL_IPV6`/`IP6T_SO_ORIGINAL_DST`
/// for IPv6, `SOL_IP`/`SO_ORIGINAL_DST` for IPv4 and IPv4-mapped).
pub fn so_original_dst(socket: BorrowedFd<'_>) -> io::Result<SocketAddr> {
    let local = local_ip(socket)?;
    if local.is_ipv6() {
        let raw: libc::sockaddr_in6 = getsockopt_value(socket, libc::SOL_IPV6, SO_ORIGINAL_DST)?;
        let addr = Ipv6Addr::from(raw.sin6_addr.s6_addr);
        return Ok(SocketAddr::new(addr.into(), u16::from_be(raw.sin6_port)));
    }
    let raw: libc::sockaddr_in = getsockopt_value(socket, libc::SOL_IP, SO_ORIGINAL_DST)?;
    Ok(SocketAddr::new(
        Ipv4Addr::from(u32::from_be(raw.sin_addr.s_addr)).into(),
        u16::from_be(raw.sin_port),
    ))
}

/// The socket's local address, IPv4-mapped IPv6 turned into IPv4.
fn local_ip(socket: BorrowedFd<'_>) -> io::Result<IpAddr> {
    let local = getsockname::<SockaddrStorage>(socket.as_raw_fd()).map_err(io::Error::from)?;
    socket_ip(&local).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not an IP socket"))
}

fn socket_ip(addr: &SockaddrStorage) -> Option<IpAddr> {
    addr.as_sockaddr_in()
        .map(|v4| IpAddr::V4(v4.ip()))
        .or_else(|| addr.as_sockaddr_in6().map(|v6| v6.ip().to_canonical()))
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

/// The pinned socket-record map, opened once and used for every accepted connection.
pub struct OriginalDstMap {
    records: SkStorage<MapData, SocketRecord>,
}

impl OriginalDstMap {
    pub fn open(root: &PinRoot) -> Result<Self, OriginalDstError> {
        Ok(Self {
            records: maps::open_map(root, map_names::SOCKET_RECORDS)?,
        })
    }

    pub fn lookup(&self, accepted: &TcpStream) -> Result<SocketAddr, OriginalDstError> {
        self.lookup_fd(accepted.as_fd())
    }

    pub fn lookup_fd(&self, accepted: BorrowedFd<'_>) -> Result<SocketAddr, OriginalDstError> {
        match self.records.get(&accepted.as_raw_fd(), 0) {
            Ok(record) if record.kind == RECORD_PROXY => Ok(SocketAddr::new(
                ip_from_words(record.original_dst.family, record.original_dst.addr),
                record.original_dst.port,
            )),
            Ok(_) | Err(MapError::KeyNotFound) => Err(OriginalDstError::NotFound),
            Err(MapError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => {
                Err(OriginalDstError::NotFound)
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// An address as the kernel hands it to BPF: family and network-order words (IPv4 in word 0).
pub fn kernel_words(addr: IpAddr) -> (u16, [u32; 4]) {
    match addr.to_canonical() {
        IpAddr::V4(v4) => (AF_INET, [u32::from_ne_bytes(v4.octets()), 0, 0, 0]),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            (AF_INET6, [word(0), word(4), word(8), word(12)])
        }
    }
}

/// The inverse of [`kernel_words`].
pub fn ip_from_words(family: u16, words: [u32; 4]) -> IpAddr {
    if family == AF_INET {
        Ipv4Addr::from(words[0].to_ne_bytes()).into()
    } else {
        let mut octets = [0u8; 16];
        for (chunk, word) in octets.chunks_exact_mut(4).zip(words) {
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        Ipv6Addr::from(octets).into()
    }
}
