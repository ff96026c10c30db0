//! Raw getsockopt() calls whose errno is the point: the answer of the kernel (and of any cgroup
//! getsockopt program on the way) reported as it came, with no interpretation.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use anyhow::{Context, Result};
use nix::errno::Errno;
use nix::libc;
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::unistd::{setgroups, Gid};
use redirector_tests::{GetsockoptReport, PeerGroupsReport};

/// `SO_PEERGROUPS` from asm-generic/socket.h (Linux 4.13).
const SO_PEERGROUPS: libc::c_int = 59;
/// The supplementary groups peer-groups takes: 20000, 20001, ...
const FIRST_GROUP: u32 = 20_000;
/// How many bytes of an answer the report shows.
const HEAD_BYTES: usize = 64;

/// getsockopt(level, name) with an `optlen`-byte buffer on the accepted end of a fresh
/// loopback connection (a connection nothing redirected).
pub fn getsockopt_on_accepted(
    ipv6: bool,
    level: i32,
    name: i32,
    optlen: u32,
) -> Result<GetsockoptReport> {
    let loopback = if ipv6 {
        IpAddr::from(Ipv6Addr::LOCALHOST)
    } else {
        Ipv4Addr::LOCALHOST.into()
    };
    let listener = TcpListener::bind((loopback, 0)).context("listening on loopback")?;
    let _client = TcpStream::connect(listener.local_addr()?).context("connecting on loopback")?;
    let (accepted, _) = listener.accept().context("accepting on loopback")?;
    Ok(raw_getsockopt(accepted.as_fd(), level, name, optlen).0)
}

/// Takes `count` supplementary groups, then asks a socketpair (whose peer credentials are this
/// process's) for SO_PEERGROUPS with an `optlen`-byte buffer.
pub fn peer_groups(count: u32, optlen: u32) -> Result<PeerGroupsReport> {
    let groups: Vec<u32> = (FIRST_GROUP..FIRST_GROUP + count).collect();
    let gids: Vec<Gid> = groups.iter().map(|&gid| Gid::from_raw(gid)).collect();
    setgroups(&gids)
        .with_context(|| format!("taking {count} supplementary groups (needs root)"))?;
    let (ours, _theirs) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .context("socketpair")?;
    let (call, answer) = raw_getsockopt(ours.as_fd(), libc::SOL_SOCKET, SO_PEERGROUPS, optlen);
    let returned = answer
        .chunks_exact(4)
        .map(|gid| u32::from_ne_bytes(gid.try_into().expect("chunks of four")))
        .collect();
    Ok(PeerGroupsReport {
        groups,
        call,
        returned,
    })
}

/// One getsockopt() call as the caller wrote it: nix only offers typed options, and what is
/// tested here is the raw errno and length for any level, name and buffer size. Returns the
/// report and the answer's bytes (empty on failure).
pub fn raw_getsockopt(
    socket: BorrowedFd<'_>,
    level: i32,
    name: i32,
    optlen: u32,
) -> (GetsockoptReport, Vec<u8>) {
    let mut buffer = vec![0u8; optlen as usize];
    let mut len = optlen as libc::socklen_t;
    // SAFETY: `buffer` is `len` bytes long and outlives the call; the kernel writes at most
    // `len` bytes and stores the answer's length in `len`.
    let result = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            level,
            name,
            buffer.as_mut_ptr().cast(),
            &mut len,
        )
    };
    let errno = if result == 0 { 0 } else { Errno::last_raw() };
    if errno == 0 {
        buffer.truncate((len as usize).min(buffer.len()));
    } else {
        buffer.clear();
    }
    let report = GetsockoptReport {
        errno,
        optlen: len,
        head: buffer.iter().take(HEAD_BYTES).copied().collect(),
    };
    (report, buffer)
}
