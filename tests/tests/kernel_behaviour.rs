//! End-to-end tests of kernel behaviours that differ between the kernels nodes run (issue 12):
//! what redirector's cgroup getsockopt program does to calls it does not answer, and to the
//! errors it answers with, must look to a process like the kernel without redirector, on every
//! supported kernel. On this machine's kernel (6.18) both pass with the programs of the time
//! they were written, and on Debian's 6.1.192 too (checked in a VM); they matter on the kernels
//! named in each, Debian's 5.10 among them (`cargo xtask test --kernel 5.10`, once the programs
//! load there). Root only; fail, never skip.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use redirector_tests::{
    run_helper, Cgroup, GetsockoptReport, Identity, PeerGroupsReport, Pod, Sandbox,
};

const HELPER_TIMEOUT: Duration = Duration::from_secs(10);
/// More supplementary groups than fit in a page of gids (4,096 bytes / 4 = 1,024).
const GROUPS: u32 = 1_500;
/// The caller's buffer: larger than a page, as the answer is.
const BUFFER: u32 = 8_192;

/// `e2e-helper peer-groups` as root in `cgroup` of `pod`'s netns.
fn peer_groups(pod: &Pod, cgroup: &Cgroup) -> Result<PeerGroupsReport> {
    let args = [
        "peer-groups".to_owned(),
        "--groups".into(),
        GROUPS.to_string(),
        "--optlen".into(),
        BUFFER.to_string(),
    ];
    run_helper(&pod.netns, cgroup, Identity::ROOT, &args, HELPER_TIMEOUT)
}

/// A getsockopt() whose answer is longer than a page works in an enrolled pod as it does
/// without redirector: SO_PEERGROUPS of a peer with 1,500 supplementary groups (6,000 bytes of
/// gids), with an 8 KiB buffer, returns every group.
///
/// Fails, with programs that pass such a call through without setting optlen to 0, on kernels
/// without "bpf: Don't EFAULT for {g,s}setsockopt with wrong optlen" (6.5): the kernel hands
/// the program only the first page of the buffer, and a program that leaves optlen above that
/// page turns the call into EFAULT, for every process of the pod (iptables-legacy's
/// IPT_SO_GET_ENTRIES, large SCTP options...). Debian's 5.10.262 lacks that change; Debian's
/// 6.1.192 has it backported (its image carries the change's log line "bpf getsockopt: ignoring
/// program buffer with optlen=%d"), so there, as here on 6.18, this passes with or without the
/// fix.
#[test]
fn large_getsockopt_passes_through_an_enrolled_pod() -> Result<()> {
    let sandbox = Sandbox::new("kernel-largeopt")?;
    let pod = sandbox.pod("largeopt", 8080)?;
    sandbox.enroll(&pod.cgroup)?;
    let sibling = sandbox.cgroup("not-enrolled")?;

    let without = peer_groups(&pod, &sibling).context("in a cgroup that is not enrolled")?;
    ensure!(
        without.call.errno == 0 && without.returned == without.groups,
        "SO_PEERGROUPS fails even without redirector, the test proves nothing: {:?}",
        without.call
    );
    let enrolled = peer_groups(&pod, &pod.cgroup).context("in the enrolled pod")?;
    ensure!(
        enrolled.call.errno == 0,
        "SO_PEERGROUPS with a {BUFFER}-byte buffer failed in the enrolled pod with errno {} \
         (14 is EFAULT: the getsockopt program left optlen above the page the kernel gave it); \
         without redirector it returned {} bytes",
        enrolled.call.errno,
        without.call.optlen
    );
    ensure!(
        enrolled.returned == enrolled.groups && enrolled.call.optlen == without.call.optlen,
        "the enrolled pod got {} groups ({} bytes), not the {GROUPS} it has",
        enrolled.returned.len(),
        enrolled.call.optlen
    );
    Ok(())
}

/// ENOENT, EFAULT, ENOPROTOOPT and EOPNOTSUPP (asm-generic/errno-base.h, errno.h).
const ENOENT: i32 = 2;
const EFAULT: i32 = 14;
const ENOPROTOOPT: i32 = 92;
const EOPNOTSUPP: i32 = 95;
const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
/// `SO_ORIGINAL_DST` and `IP6T_SO_ORIGINAL_DST`.
const SO_ORIGINAL_DST: i32 = 80;

/// `e2e-helper getsockopt` as the proxy, in `cgroup`: the call on the accepted end of a fresh
/// loopback connection, which nothing captured.
fn original_dst_call(
    pod: &Pod,
    cgroup: &Cgroup,
    ipv6_socket: bool,
    level: i32,
) -> Result<GetsockoptReport> {
    let mut args = vec!["getsockopt".to_owned()];
    if ipv6_socket {
        args.push("--ipv6".into());
    }
    args.extend([
        "--level".into(),
        level.to_string(),
        "--name".into(),
        SO_ORIGINAL_DST.to_string(),
        "--optlen".into(),
        "128".into(),
    ]);
    run_helper(&pod.netns, cgroup, Identity::PROXY, &args, HELPER_TIMEOUT)
}

/// SO_ORIGINAL_DST on a connection nothing captured fails in an enrolled pod as it does
/// without redirector, or with ENOENT as conntrack answers a connection it has no entry for;
/// never EFAULT.
///
/// Fails before Linux 5.18 (Debian's 5.10) with programs that overwrite the kernel's error: a
/// cgroup getsockopt program may then only set the return value to 0 or leave the kernel's
/// own, and writing ENOENT over another error becomes EFAULT. Without nf_conntrack the kernel answers a
/// proxy's usual calls (SOL_IP on an IPv4 socket, SOL_IPV6 on an IPv6 one) with ENOPROTOOPT;
/// this machine's kernel has nf_conntrack built in and answers ENOENT, so the overwrite is a
/// no-op there. SOL_IPV6 on an IPv4 socket gets EOPNOTSUPP from the kernel everywhere, which
/// exercises the overwrite on this machine too. 5.18 and later (6.18 here) allow it, so this
/// passes here with or without the fix.
#[test]
fn original_dst_miss_without_conntrack_is_not_efault() -> Result<()> {
    let sandbox = Sandbox::new("kernel-origdst")?;
    let pod = sandbox.pod("origdst", 8080)?;
    sandbox.enroll(&pod.cgroup)?;
    let sibling = sandbox.cgroup("not-enrolled")?;

    let mut failures = Vec::new();
    let conntrack_or_none: &[i32] = &[ENOENT, ENOPROTOOPT];
    for (call, ipv6_socket, level, kernel_answers) in [
        ("IPv4 socket, SOL_IP", false, SOL_IP, conntrack_or_none),
        ("IPv6 socket, SOL_IPV6", true, SOL_IPV6, conntrack_or_none),
        ("IPv4 socket, SOL_IPV6", false, SOL_IPV6, &[EOPNOTSUPP]),
    ] {
        let kernel = original_dst_call(&pod, &sibling, ipv6_socket, level)
            .with_context(|| format!("{call}, not enrolled"))?;
        let enrolled = original_dst_call(&pod, &pod.cgroup, ipv6_socket, level)
            .with_context(|| format!("{call}, enrolled"))?;
        if !kernel_answers.contains(&kernel.errno) {
            failures.push(format!(
                "{call}: the kernel alone answered errno {}, not one of {kernel_answers:?}",
                kernel.errno
            ));
        }
        if ![ENOENT, kernel.errno].contains(&enrolled.errno) {
            let efault = if enrolled.errno == EFAULT {
                " (EFAULT)"
            } else {
                ""
            };
            failures.push(format!(
                "{call}: the enrolled pod got errno {}{efault} where the kernel alone \
                 answers {}",
                enrolled.errno, kernel.errno
            ));
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}
