//! Attaching a program to a cgroup through a pinned bpf_link.
//!
//! Hand-written because aya 0.14 offers no way to pin a cgroup getsockopt link (there is no
//! `FdLink` conversion for `CgroupSockoptLink`); one path serves all hooks so that every
//! link is created, pinned and removed the same way. Links are multi-attach by nature, so
//! they coexist with programs other software attached to the same or parent cgroups.
//!
//! Order matters where another program rewrites the same thing: a socket load balancer's
//! connect4 (Cilium's, kube-proxy replacement) that turns a service VIP into a backend must
//! run after redirector's, so that the application's connect reaches the proxy with the VIP as
//! its original destination and only the proxy's own connect is load-balanced, as with
//! istio-iptables in the pod's netns and kube-proxy on the node. The kernel runs a cgroup's
//! programs before its ancestors' (the effective array is built from the cgroup up), so a
//! program at a parent cgroup (Cilium attaches at the root) runs after redirector's unless it
//! was attached with `BPF_F_PREORDER`. Within the pod's own cgroup the kernel runs programs in
//! list order, appended at attach time, so redirector's links ask to go first
//! ([`sys::BPF_F_BEFORE`], Linux 6.17); an older kernel refuses the flag and the link is
//! appended, after any program attached there earlier.
use std::{
    io,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::Path,
    sync::Once,
};

use crate::sys;

/// The hooks redirector attaches, with the kernel's `enum bpf_attach_type` values: on the pod's
/// cgroup always, with DNS capture, with inbound capture; and inbound capture on the pod's
/// network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Connect4,
    Connect6,
    SockOps,
    GetSockopt,
    GetPeerName4,
    GetPeerName6,
    GetSockName4,
    GetSockName6,
    SendMsg4,
    SendMsg6,
    RecvMsg4,
    RecvMsg6,
    Bind4,
    Bind6,
    Inbound,
}

impl Hook {
    /// The hooks attached to every enrolled pod's cgroup.
    pub const CGROUP: [Hook; 8] = [
        Self::Connect4,
        Self::Connect6,
        Self::SockOps,
        Self::GetSockopt,
        Self::GetPeerName4,
        Self::GetPeerName6,
        Self::GetSockName4,
        Self::GetSockName6,
    ];
    /// Attached to the pod's cgroup when its policy captures DNS: UDP datagrams and replies.
    pub const DNS: [Hook; 4] = [
        Self::SendMsg4,
        Self::SendMsg6,
        Self::RecvMsg4,
        Self::RecvMsg6,
    ];
    /// Attached to the pod's cgroup when its policy captures inbound (the proxy's listeners).
    pub const INBOUND_CGROUP: [Hook; 2] = [Self::Bind4, Self::Bind6];
    /// Every hook.
    pub const ALL: [Hook; 15] = [
        Self::Connect4,
        Self::Connect6,
        Self::SockOps,
        Self::GetSockopt,
        Self::GetPeerName4,
        Self::GetPeerName6,
        Self::GetSockName4,
        Self::GetSockName6,
        Self::SendMsg4,
        Self::SendMsg6,
        Self::RecvMsg4,
        Self::RecvMsg6,
        Self::Bind4,
        Self::Bind6,
        Self::Inbound,
    ];

    pub fn attach_type(self) -> u32 {
        match self {
            Self::SockOps => 3,       // BPF_CGROUP_SOCK_OPS
            Self::Bind4 => 8,         // BPF_CGROUP_INET4_BIND
            Self::Bind6 => 9,         // BPF_CGROUP_INET6_BIND
            Self::Connect4 => 10,     // BPF_CGROUP_INET4_CONNECT
            Self::Connect6 => 11,     // BPF_CGROUP_INET6_CONNECT
            Self::SendMsg4 => 14,     // BPF_CGROUP_UDP4_SENDMSG
            Self::SendMsg6 => 15,     // BPF_CGROUP_UDP6_SENDMSG
            Self::RecvMsg4 => 19,     // BPF_CGROUP_UDP4_RECVMSG
            Self::RecvMsg6 => 20,     // BPF_CGROUP_UDP6_RECVMSG
            Self::GetSockopt => 21,   // BPF_CGROUP_GETSOCKOPT
            Self::GetPeerName4 => 29, // BPF_CGROUP_INET4_GETPEERNAME
            Self::GetPeerName6 => 30, // BPF_CGROUP_INET6_GETPEERNAME
            Self::GetSockName4 => 31, // BPF_CGROUP_INET4_GETSOCKNAME
            Self::GetSockName6 => 32, // BPF_CGROUP_INET6_GETSOCKNAME
            Self::Inbound => 36,      // BPF_SK_LOOKUP
        }
    }

    /// Name of the hook's pin in a pod's directory.
    pub fn pin_name(self) -> &'static str {
        match self {
            Self::Connect4 => "connect4",
            Self::Connect6 => "connect6",
            Self::SockOps => "sockops",
            Self::GetSockopt => "getsockopt",
            Self::GetPeerName4 => "getpeername4",
            Self::GetPeerName6 => "getpeername6",
            Self::GetSockName4 => "getsockname4",
            Self::GetSockName6 => "getsockname6",
            Self::SendMsg4 => "sendmsg4",
            Self::SendMsg6 => "sendmsg6",
            Self::RecvMsg4 => "recvmsg4",
            Self::RecvMsg6 => "recvmsg6",
            Self::Bind4 => "bind4",
            Self::Bind6 => "bind6",
            Self::Inbound => "inbound",
        }
    }
}

/// Attaches `program` at `hook` to `target` (the pod's cgroup directory, or its network
/// namespace for [`Hook::Inbound`]) and pins the link at `pin`. The link lives as long as
/// the pin: removing the file detaches it.
pub fn attach_pinned(
    program: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    hook: Hook,
    pin: &Path,
) -> io::Result<()> {
    let link = match hook {
        // A network namespace's links take no flags.
        Hook::Inbound => sys::link_create(program, target, hook.attach_type(), 0)?,
        _ => link_create_first(program, target, hook)?,
    };
    sys::pin(link.as_fd(), pin)
}

/// A cgroup link placed before the programs already attached to the cgroup for `hook` (see the
/// module's documentation), or appended after them on a kernel that cannot place links.
fn link_create_first(
    program: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    hook: Hook,
) -> io::Result<OwnedFd> {
    match sys::link_create(program, cgroup, hook.attach_type(), sys::BPF_F_BEFORE) {
        // Any other cause of EINVAL fails again without the flag, and that error is returned.
        Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
            static APPENDED: Once = Once::new();
            APPENDED.call_once(|| {
                tracing::info!(
                    "this kernel cannot order a cgroup's programs (BPF_F_BEFORE on cgroup links \
                     came with Linux 6.17): redirector's links are appended, so a program attached \
                     to a pod's own cgroup before enroll runs before redirector's"
                );
            });
            sys::link_create(program, cgroup, hook.attach_type(), 0)
        }
        result => result,
    }
}

/// Detaches the link pinned at `pin` and removes the pin. Removing the pin alone would detach
/// the link only once the kernel frees the pin's inode, after an RCU grace period. A missing
/// pin is fine.
pub fn detach_pinned(pin: &Path) -> io::Result<()> {
    let link = match sys::open_pinned(pin) {
        Ok(link) => link,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error),
    };
    sys::link_detach(link.as_fd())?;
    match std::fs::remove_file(pin) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

/// Replaces the program of the link pinned at `pin` with `program`, atomically: the hook runs
/// the old program or the new one, never none.
pub fn update_pinned(pin: &Path, program: BorrowedFd<'_>) -> io::Result<()> {
    let link = sys::open_pinned(pin)?;
    sys::link_update(link.as_fd(), program)
}

/// Opens a pinned object (a program, here) by its path.
pub fn open_pinned(pin: &Path) -> io::Result<OwnedFd> {
    sys::open_pinned(pin)
}
