//! The few `bpf(2)` commands aya 0.14 does not offer in the form needed: creating and pinning
//! cgroup links (no pin path for a getsockopt link), cgroup storage keyed by the cgroup alone
//! (aya only knows the per-attach-type key), and the kernel probes that load a hand-assembled
//! program or create a map with a given layout. One syscall wrapper serves all of them.
use std::{
    ffi::CString,
    io,
    mem::size_of,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

const BPF_MAP_CREATE: libc::c_int = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_int = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_int = 2;
const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_OBJ_PIN: libc::c_int = 6;
const BPF_OBJ_GET: libc::c_int = 7;
const BPF_LINK_CREATE: libc::c_int = 28;
const BPF_LINK_UPDATE: libc::c_int = 29;
const BPF_LINK_DETACH: libc::c_int = 34;

fn bpf<T>(cmd: libc::c_int, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live repr(C) prefix of `union bpf_attr`; the kernel zero-extends it.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Takes ownership of an fd a successful `bpf()` call returned.
fn owned_fd(raw: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel returned a new fd that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(raw as libc::c_int) }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// The `BPF_OBJ_PIN` / `BPF_OBJ_GET` part of `union bpf_attr`.
#[repr(C)]
struct ObjPinAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// Pins a BPF object (a link, here) at `path`.
pub fn pin(object: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let path = c_path(path)?;
    let mut attr = ObjPinAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: object.as_raw_fd() as u32,
        file_flags: 0,
    };
    bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

/// Opens a pinned object by its path.
pub fn open_pinned(path: &Path) -> io::Result<OwnedFd> {
    let path = c_path(path)?;
    let mut attr = ObjPinAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    bpf(BPF_OBJ_GET, &mut attr).map(owned_fd)
}

#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

/// `BPF_F_BEFORE` for `BPF_LINK_CREATE` on a cgroup: with no relative program or link (the
/// `link_create.cgroup.relative_fd` that follows `flags` stays 0), the new link goes before
/// every program already in the cgroup's own list for its attach type. The cgroup mprog API,
/// Linux 6.17 (commit 1209339844601 "bpf: Implement mprog API on top of existing cgroup progs"),
/// also in some stable series (Debian's 6.12.117 has it); other kernels refuse any flag on a
/// cgroup link with EINVAL.
pub const BPF_F_BEFORE: u32 = 1 << 3;

/// Attaches `program` to `target` (a cgroup directory or a netns) as a bpf_link, with
/// `BPF_LINK_CREATE` flags (0, or [`BPF_F_BEFORE`] on a cgroup).
pub fn link_create(
    program: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach_type: u32,
    flags: u32,
) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: program.as_raw_fd() as u32,
        target_fd: target.as_raw_fd() as u32,
        attach_type,
        flags,
    };
    bpf(BPF_LINK_CREATE, &mut attr).map(owned_fd)
}

#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// Replaces a link's program (`BPF_LINK_UPDATE`).
pub fn link_update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

#[repr(C)]
struct LinkDetachAttr {
    link_fd: u32,
}

/// Detaches a link from its target now (the link object lives on until its last reference
/// goes, which for a pinned link happens some time after its pin is removed).
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkDetachAttr {
        link_fd: link.as_raw_fd() as u32,
    };
    bpf(BPF_LINK_DETACH, &mut attr).map(drop)
}

/// The element commands' part of `union bpf_attr`.
#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value_or_next_key: u64,
    flags: u64,
}

/// Looks `key` up in the map; `None` when it is not there.
pub fn map_lookup<K, V: Copy>(map: BorrowedFd<'_>, key: &K) -> io::Result<Option<V>> {
    let mut value = std::mem::MaybeUninit::<V>::zeroed();
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: std::ptr::from_ref(key) as u64,
        value_or_next_key: value.as_mut_ptr() as u64,
        flags: 0,
    };
    match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
        // SAFETY: zero-initialised and filled by the kernel; V is plain data.
        Ok(_) => Ok(Some(unsafe { value.assume_init() })),
        Err(error) if error.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(error) => Err(error),
    }
}

/// Sets `key` to `value` (`BPF_ANY`).
pub fn map_update<K, V>(map: BorrowedFd<'_>, key: &K, value: &V) -> io::Result<()> {
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: std::ptr::from_ref(key) as u64,
        value_or_next_key: std::ptr::from_ref(value) as u64,
        flags: 0,
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

#[repr(C)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

/// Whether the kernel creates a map of this type and layout (a probe: the map is dropped).
pub fn map_layout_supported(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
) -> io::Result<bool> {
    let mut attr = MapCreateAttr {
        map_type,
        key_size,
        value_size,
        max_entries,
        map_flags,
    };
    match bpf(BPF_MAP_CREATE, &mut attr) {
        Ok(fd) => {
            drop(owned_fd(fd));
            Ok(true)
        }
        Err(error) if error.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Err(error) => Err(error),
    }
}

/// One BPF instruction.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Insn {
    pub code: u8,
    /// dst_reg in the low nibble, src_reg in the high one.
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// Whether the verifier accepts `insns` as a program of this type (a probe: the program is
/// dropped at once).
pub fn program_accepted(
    prog_type: u32,
    expected_attach_type: u32,
    insns: &[Insn],
) -> io::Result<bool> {
    let license = c"GPL";
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name: [0; 16],
        prog_ifindex: 0,
        expected_attach_type,
    };
    match bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => {
            drop(owned_fd(fd));
            Ok(true)
        }
        // The verifier's "invalid bpf_context access" and friends.
        Err(error) if matches!(error.raw_os_error(), Some(libc::EINVAL | libc::EACCES)) => {
            Ok(false)
        }
        Err(error) => Err(error),
    }
}
