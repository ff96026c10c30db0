//! Kernel side of redirector: one hook per module.
//!
//! | module        | program                              | minimum kernel |
//! |---------------|--------------------------------------|----------------|
//! | `connect`     | `cgroup/connect4`, `cgroup/connect6` | 4.17; socket storage there 5.2 |
//! | `sockops`     | `sockops` (connect, passive established, state, listen) | 4.13; socket storage there 5.3, `bpf_sock_ops.sk` 5.10 |
//! | `sockopt`     | `cgroup/getsockopt`                  | 5.3 |
//! | `getpeername` | `cgroup/getpeername4`, `getpeername6`| 5.8 |
//! | `getsockname` | `cgroup/getsockname4`, `getsockname6`| 5.8 |
//! | `dns`         | `cgroup/sendmsg4/6` (4.18), `cgroup/recvmsg4/6` (5.2), with DNS capture | 5.2 |
//! | `bind`        | `cgroup/bind4`, `cgroup/bind6`, with inbound capture | 4.17 |
//! | `inbound`     | `sk_lookup` on the pod's netns       | 5.9 |
//!
//! Every cgroup program reads the pod's settings from cgroup storage keyed by the cgroup alone
//! (shared between attach types: 5.9), and all are attached through bpf_link (cgroups 5.7,
//! netns 5.9): the whole set needs Linux 5.10, the kernel probes in the loader check each piece.
#![no_std]
#![no_main]
// Atomic adds on per-CPU counters: the BPF target has no atomic types with fetch_add.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod addr;
mod bind;
mod connect;
mod dns;
mod getpeername;
mod getsockname;
mod inbound;
mod maps;
mod pod;
mod policy;
mod raw;
mod sockops;
mod sockopt;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
