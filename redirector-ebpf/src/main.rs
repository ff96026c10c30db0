//! Kernel side of redirector: one hook per module.
//!
//! | module        | program                              | minimum kernel |
//! |---------------|--------------------------------------|----------------|
//! | `connect`     | `cgroup/connect4`, `cgroup/connect6` | 4.17 (socket cookie 5.0, ancestor cgroup id 5.7) |
//! | `sockops`     | `sockops` (STATE_CB)                 | 4.16 (netns cookie in sock_ops: 5.15) |
//! | `sockopt`     | `cgroup/getsockopt`                  | 5.3 (netns cookie in sockopt: 5.8) |
//! | `getpeername` | `cgroup/getpeername4`, `getpeername6`| 5.8 |
//! | `inbound`     | `sk_lookup` on the pod's netns       | 5.9 |
//!
//! All three are attached to a pod's cgroup v2 directory through bpf_link (5.7), so the
//! whole set needs Linux 5.15 or later.
#![no_std]
#![no_main]

mod addr;
mod connect;
mod getpeername;
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
