//! Does this kernel have what the programs need? Checked before anything is loaded, so that
//! a too-old kernel gets a message naming the missing piece instead of a verifier log.
use aya::{
    programs::ProgramType,
    sys::{is_helper_supported, is_program_supported, BpfHelper},
};

/// The oldest kernel with every feature below (bpf_get_netns_cookie in sock_ops came last).
pub const MIN_KERNEL: (u32, u32) = (5, 15);

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("kernel {release} is too old: redirector needs Linux >= {}.{} (bpf_get_netns_cookie in sockops programs)", MIN_KERNEL.0, MIN_KERNEL.1)]
    TooOld { release: String },
    #[error("this kernel lacks {feature}, which redirector needs (Linux >= {since})")]
    Missing {
        feature: &'static str,
        since: &'static str,
    },
    #[error("probing the kernel for {feature}: {source}")]
    Probe {
        feature: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("reading the kernel release: {0}")]
    Uname(nix::Error),
}

struct ProgramNeed {
    program: ProgramType,
    feature: &'static str,
    since: &'static str,
}

struct HelperNeed {
    program: ProgramType,
    helper: BpfHelper,
    feature: &'static str,
    since: &'static str,
}

const PROGRAMS: [ProgramNeed; 4] = [
    ProgramNeed {
        program: ProgramType::CgroupSockAddr,
        feature: "cgroup/connect4 programs (BPF_PROG_TYPE_CGROUP_SOCK_ADDR)",
        since: "4.17",
    },
    ProgramNeed {
        program: ProgramType::SockOps,
        feature: "sockops programs (BPF_PROG_TYPE_SOCK_OPS)",
        since: "4.13",
    },
    ProgramNeed {
        program: ProgramType::CgroupSockopt,
        feature: "cgroup/getsockopt programs (BPF_PROG_TYPE_CGROUP_SOCKOPT)",
        since: "5.3",
    },
    ProgramNeed {
        program: ProgramType::SkLookup,
        feature: "sk_lookup programs (BPF_PROG_TYPE_SK_LOOKUP), for inbound capture",
        since: "5.9",
    },
];

const HELPERS: [HelperNeed; 4] = [
    HelperNeed {
        program: ProgramType::CgroupSockAddr,
        helper: BpfHelper::BPF_FUNC_get_socket_cookie,
        feature: "bpf_get_socket_cookie in cgroup/connect4",
        since: "5.0",
    },
    HelperNeed {
        program: ProgramType::SockOps,
        helper: BpfHelper::BPF_FUNC_get_netns_cookie,
        feature: "bpf_get_netns_cookie in sockops",
        since: "5.15",
    },
    HelperNeed {
        program: ProgramType::CgroupSockopt,
        helper: BpfHelper::BPF_FUNC_get_netns_cookie,
        feature: "bpf_get_netns_cookie in cgroup/getsockopt",
        since: "5.8",
    },
    HelperNeed {
        program: ProgramType::SkLookup,
        helper: BpfHelper::BPF_FUNC_sk_assign,
        feature: "bpf_sk_assign in sk_lookup",
        since: "5.9",
    },
];

/// Checks the running kernel: its release first, then each program type and helper.
pub fn check() -> Result<(), KernelError> {
    let uname = nix::sys::utsname::uname().map_err(KernelError::Uname)?;
    check_release(&uname.release().to_string_lossy())?;
    let programs = PROGRAMS
        .iter()
        .map(|n| (n.feature, n.since, is_program_supported(n.program)));
    let helpers = HELPERS
        .iter()
        .map(|n| (n.feature, n.since, is_helper_supported(n.program, n.helper)));
    for (feature, since, supported) in programs.chain(helpers) {
        if !supported.map_err(|source| KernelError::Probe { feature, source })? {
            return Err(KernelError::Missing { feature, since });
        }
    }
    Ok(())
}

/// Checks a kernel release string (`uname -r`) against [`MIN_KERNEL`].
pub fn check_release(release: &str) -> Result<(), KernelError> {
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|part| part.parse::<u32>().ok());
    match (numbers.next().flatten(), numbers.next().flatten()) {
        (Some(major), Some(minor)) if (major, minor) >= MIN_KERNEL => Ok(()),
        _ => Err(KernelError::TooOld {
            release: release.to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_at_or_above_the_minimum_pass() {
        for release in [
            "5.15.0",
            "5.15.0-91-generic",
            "6.1.0-18-amd64",
            "6.18.44-fc-v657",
            "10.0",
        ] {
            assert!(check_release(release).is_ok(), "{release}");
        }
    }

    #[test]
    fn older_or_unparsable_releases_are_refused_with_the_minimum_named() {
        for release in ["5.14.21", "5.4.0-150-generic", "4.19.0", "", "linux"] {
            let message = check_release(release).unwrap_err().to_string();
            assert!(message.contains("Linux >= 5.15"), "{release}: {message}");
            assert!(message.contains(release), "{release}: {message}");
        }
    }
}
