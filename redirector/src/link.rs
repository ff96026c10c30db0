//! Attaching a program to a cgroup through a pinned bpf_link.
//!
//! Hand-written because aya 0.14 offers no way to pin a cgroup getsockopt link (there is no
//! `FdLink` conversion for `CgroupSockoptLink`); one path serves all hooks so that every
//! link is created, pinned and removed the same way. Links are multi-attach by nature, so
//! they coexist with programs other software attached to the same or parent cgroups.
use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

/// The hooks redirector attaches, with the kernel's `enum bpf_attach_type` values: six on
/// the pod's cgroup, and inbound capture on the pod's network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Connect4,
    Connect6,
    SockOps,
    GetSockopt,
    GetPeerName4,
    GetPeerName6,
    Inbound,
}

impl Hook {
    /// The hooks attached to the pod's cgroup.
    pub const CGROUP: [Hook; 6] = [
        Self::Connect4,
        Self::Connect6,
        Self::SockOps,
        Self::GetSockopt,
        Self::GetPeerName4,
        Self::GetPeerName6,
    ];
    /// Every hook: the cgroup ones, then inbound capture.
    pub const ALL: [Hook; 7] = {
        let [a, b, c, d, e, f] = Self::CGROUP;
        [a, b, c, d, e, f, Self::Inbound]
    };

    fn attach_type(self) -> u32 {
        match self {
            Self::SockOps => 3,       // BPF_CGROUP_SOCK_OPS
            Self::Connect4 => 10,     // BPF_CGROUP_INET4_CONNECT
            Self::Connect6 => 11,     // BPF_CGROUP_INET6_CONNECT
            Self::GetSockopt => 21,   // BPF_CGROUP_GETSOCKOPT
            Self::GetPeerName4 => 29, // BPF_CGROUP_INET4_GETPEERNAME
            Self::GetPeerName6 => 30, // BPF_CGROUP_INET6_GETPEERNAME
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
            Self::Inbound => "inbound",
        }
    }
}

const BPF_OBJ_PIN: libc::c_int = 6;
const BPF_OBJ_GET: libc::c_int = 7;
const BPF_LINK_CREATE: libc::c_int = 28;

#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

/// The `BPF_OBJ_PIN` / `BPF_OBJ_GET` part of `union bpf_attr`.
#[repr(C)]
struct ObjPinAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

fn bpf<T>(cmd: libc::c_int, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live repr(C) prefix of `union bpf_attr`; the kernel zero-extends it.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
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
    let mut create = LinkCreateAttr {
        prog_fd: program.as_raw_fd() as u32,
        target_fd: target.as_raw_fd() as u32,
        attach_type: hook.attach_type(),
        flags: 0,
    };
    let raw = bpf(BPF_LINK_CREATE, &mut create)?;
    // SAFETY: BPF_LINK_CREATE returned a new fd that nothing else owns.
    let link = unsafe { OwnedFd::from_raw_fd(raw as libc::c_int) };
    let path = CString::new(pin.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut pin_attr = ObjPinAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: link.as_raw_fd() as u32,
        file_flags: 0,
    };
    bpf(BPF_OBJ_PIN, &mut pin_attr)?;
    Ok(())
}

/// Opens a pinned object (a program, here) by its path.
pub fn open_pinned(pin: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(pin.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = ObjPinAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let raw = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: BPF_OBJ_GET returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw as libc::c_int) })
}
