//! A stand-in for a socket load balancer (Cilium's socket LB, kube-proxy replacement): a
//! cgroup/connect4 program that rewrites connects to one service VIP into connects to one
//! backend, attached through a bpf_link to a cgroup of the test's choice and detached on drop.
//!
//! Hand-assembled (ten instructions) and loaded with raw `bpf(2)` calls, so that the tests need
//! no second eBPF build and the program is exactly what a foreign program looks like to
//! redirector: another program of the same hook, attached independently.

use std::{
    fs::File,
    io,
    mem::size_of,
    net::SocketAddrV4,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{Context, Result};

use crate::cgroup::Cgroup;

const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_LINK_CREATE: libc::c_int = 28;
const BPF_LINK_DETACH: libc::c_int = 34;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
/// With no relative program: insert before every program of the cgroup's own list (the cgroup
/// mprog API, Linux 6.17; earlier kernels refuse any link flag with EINVAL).
const BPF_F_BEFORE: u32 = 1 << 3;

/// Offsets in `struct bpf_sock_addr` (UAPI).
const USER_IP4: i16 = 4;
const USER_PORT: i16 = 24;

#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    /// dst_reg in the low nibble, src_reg in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

/// `r2 = *(u32 *)(r1 + off)`.
fn load_ctx_u32(off: i16) -> Insn {
    Insn {
        code: 0x61, // BPF_LDX | BPF_MEM | BPF_W
        regs: 0x12,
        off,
        imm: 0,
    }
}

/// `if w2 != imm goto +skip` (32-bit compare: the context fields are u32).
fn skip_unless_equal(imm: u32, skip: i16) -> Insn {
    Insn {
        code: 0x56, // BPF_JMP32 | BPF_JNE | BPF_K
        regs: 0x02,
        off: skip,
        imm: imm as i32,
    }
}

/// `w2 = imm; *(u32 *)(r1 + off) = w2` (the verifier refuses immediate stores into a context).
fn store_ctx_u32(off: i16, imm: u32) -> [Insn; 2] {
    [
        Insn {
            code: 0xb4, // BPF_ALU | BPF_MOV | BPF_K
            regs: 0x02,
            off: 0,
            imm: imm as i32,
        },
        Insn {
            code: 0x63, // BPF_STX | BPF_MEM | BPF_W
            regs: 0x21,
            off,
            imm: 0,
        },
    ]
}

/// An address as the context holds it: network byte order in a u32.
fn ip_field(addr: &SocketAddrV4) -> u32 {
    u32::from_ne_bytes(addr.ip().octets())
}

/// A port as the context holds it: network byte order in the low 16 bits of a u32.
fn port_field(addr: &SocketAddrV4) -> u32 {
    u32::from(u16::from_ne_bytes(addr.port().to_be_bytes()))
}

/// `if (ctx->user_ip4 == VIP && ctx->user_port == VIP_PORT) { rewrite to the backend } return 1;`
fn program(vip: &SocketAddrV4, backend: &SocketAddrV4) -> Vec<Insn> {
    let [set_ip, store_ip] = store_ctx_u32(USER_IP4, ip_field(backend));
    let [set_port, store_port] = store_ctx_u32(USER_PORT, port_field(backend));
    vec![
        load_ctx_u32(USER_IP4),
        skip_unless_equal(ip_field(vip), 6),
        load_ctx_u32(USER_PORT),
        skip_unless_equal(port_field(vip), 4),
        set_ip,
        store_ip,
        set_port,
        store_port,
        // r0 = 1 (allow), exit.
        Insn {
            code: 0xb7, // BPF_ALU64 | BPF_MOV | BPF_K
            regs: 0x00,
            off: 0,
            imm: 1,
        },
        Insn {
            code: 0x95, // BPF_JMP | BPF_EXIT
            regs: 0,
            off: 0,
            imm: 0,
        },
    ]
}

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

/// A command that returns a new fd (BPF_PROG_LOAD, BPF_LINK_CREATE).
fn bpf_fd<T>(cmd: libc::c_int, attr: &mut T) -> io::Result<OwnedFd> {
    let fd = bpf(cmd, attr)?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
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

#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

/// The load balancer's program, loaded but not attached.
pub struct SockLb {
    program: OwnedFd,
    pub vip: SocketAddrV4,
    pub backend: SocketAddrV4,
}

impl SockLb {
    /// Loads the program that sends connects to `vip` to `backend`.
    pub fn load(vip: SocketAddrV4, backend: SocketAddrV4) -> Result<SockLb> {
        let insns = program(&vip, &backend);
        let license = c"GPL";
        let mut log = vec![0u8; 64 * 1024];
        let mut name = [0u8; 16];
        name[..9].copy_from_slice(b"test_slb4");
        let mut attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 1,
            log_size: log.len() as u32,
            log_buf: log.as_mut_ptr() as u64,
            kern_version: 0,
            prog_flags: 0,
            prog_name: name,
            prog_ifindex: 0,
            expected_attach_type: BPF_CGROUP_INET4_CONNECT,
        };
        let program = bpf_fd(BPF_PROG_LOAD, &mut attr).with_context(|| {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            format!(
                "loading the test's connect4 load balancer; verifier log:\n{}",
                String::from_utf8_lossy(&log[..end])
            )
        })?;
        Ok(SockLb {
            program,
            vip,
            backend,
        })
    }

    /// Attaches the program to `cgroup` at the end of its connect4 list (as every cgroup link
    /// was attached before the kernel could order them), until the returned link is dropped.
    pub fn attach(&self, cgroup: &Cgroup) -> Result<AttachedLb> {
        self.link(cgroup, 0)
            .with_context(|| format!("attaching the test's LB to {}", cgroup.path().display()))
    }

    /// Whether this kernel places a cgroup link where `BPF_F_BEFORE` asks (the cgroup mprog
    /// API): tried with this program on `scratch`, a cgroup nothing runs in; the link is
    /// dropped at once. Earlier kernels refuse any link flag with EINVAL.
    pub fn kernel_orders_cgroup_links(&self, scratch: &Cgroup) -> Result<bool> {
        match self.link(scratch, BPF_F_BEFORE) {
            Ok(_) => Ok(true),
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => Ok(false),
            Err(error) => Err(error).context("probing BPF_F_BEFORE on a cgroup link"),
        }
    }

    fn link(&self, cgroup: &Cgroup, flags: u32) -> io::Result<AttachedLb> {
        let dir = File::open(cgroup.path())?;
        let mut attr = LinkCreateAttr {
            prog_fd: self.program.as_raw_fd() as u32,
            target_fd: dir.as_raw_fd() as u32,
            attach_type: BPF_CGROUP_INET4_CONNECT,
            flags,
        };
        Ok(AttachedLb {
            link: bpf_fd(BPF_LINK_CREATE, &mut attr)?,
        })
    }
}

/// The load balancer attached to a cgroup; dropping it detaches it.
pub struct AttachedLb {
    link: OwnedFd,
}

#[repr(C)]
struct LinkDetachAttr {
    link_fd: u32,
}

impl Drop for AttachedLb {
    /// Detached explicitly, so the cgroup is free of it at once, whatever else might hold the
    /// link; closing the fd then frees it.
    fn drop(&mut self) {
        let mut attr = LinkDetachAttr {
            link_fd: self.link.as_raw_fd() as u32,
        };
        if let Err(error) = bpf(BPF_LINK_DETACH, &mut attr) {
            eprintln!("cleanup: detaching the test's LB: {error}");
        }
    }
}
