//! Does this kernel have what the programs need? Checked before anything is loaded or pinned,
//! so that a kernel without a needed feature gets one message naming it and the release that
//! brought it, instead of a verifier log.
//!
//! The probes decide, not the release number: vendor kernels backport (RHEL 9 reports 5.14 with
//! the features of a much newer kernel), so a release below [`MIN_KERNEL`] only gets a warning.
use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_helper_supported, is_map_supported, is_program_supported, BpfHelper},
};

use crate::sys::{self, Insn};

/// The oldest kernel release with every feature below (`bpf_sock_ops.sk` came last).
pub const MIN_KERNEL: (u32, u32) = (5, 10);

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("this kernel lacks {feature}, which redirector needs (Linux >= {since}; redirector as a whole needs Linux >= {}.{})", MIN_KERNEL.0, MIN_KERNEL.1)]
    Missing {
        feature: &'static str,
        since: &'static str,
    },
    #[error("probing the kernel for {feature}: {message}")]
    Probe {
        feature: &'static str,
        message: String,
    },
    #[error("reading the kernel release: {0}")]
    Uname(nix::Error),
}

/// One thing the programs need, and how to find out whether the kernel has it.
pub struct Need {
    pub feature: &'static str,
    pub since: &'static str,
    pub probe: Probe,
}

pub enum Probe {
    Program(ProgramType),
    Map(MapType),
    Helper(ProgramType, BpfHelper),
    /// Cgroup storage keyed by the cgroup id alone, shared by every attach type (5.9).
    SharedCgroupStorage,
    /// `bpf_sock_ops.sk`, the socket a sock_ops program reaches socket storage through (5.10).
    SockOpsSocket,
}

/// Everything the programs use, oldest first within each kind.
pub const NEEDS: &[Need] = &[
    Need {
        feature: "sockops programs (BPF_PROG_TYPE_SOCK_OPS)",
        since: "4.13",
        probe: Probe::Program(ProgramType::SockOps),
    },
    Need {
        feature: "cgroup/connect4 programs (BPF_PROG_TYPE_CGROUP_SOCK_ADDR)",
        since: "4.17",
        probe: Probe::Program(ProgramType::CgroupSockAddr),
    },
    Need {
        feature: "cgroup/getsockopt programs (BPF_PROG_TYPE_CGROUP_SOCKOPT)",
        since: "5.3",
        probe: Probe::Program(ProgramType::CgroupSockopt),
    },
    Need {
        feature: "sk_lookup programs (BPF_PROG_TYPE_SK_LOOKUP), for inbound capture",
        since: "5.9",
        probe: Probe::Program(ProgramType::SkLookup),
    },
    Need {
        feature: "LRU hash maps (BPF_MAP_TYPE_LRU_HASH)",
        since: "4.10",
        probe: Probe::Map(MapType::LruHash),
    },
    Need {
        feature: "LPM trie maps (BPF_MAP_TYPE_LPM_TRIE)",
        since: "4.11",
        probe: Probe::Map(MapType::LpmTrie),
    },
    Need {
        feature: "socket hash maps (BPF_MAP_TYPE_SOCKHASH)",
        since: "4.18",
        probe: Probe::Map(MapType::SockHash),
    },
    Need {
        feature: "socket-local storage (BPF_MAP_TYPE_SK_STORAGE)",
        since: "5.2",
        probe: Probe::Map(MapType::SkStorage),
    },
    Need {
        feature: "cgroup storage shared by every program of a cgroup (BPF_MAP_TYPE_CGROUP_STORAGE keyed by the cgroup id)",
        since: "5.9",
        probe: Probe::SharedCgroupStorage,
    },
    Need {
        feature: "bpf_get_local_storage in cgroup/connect4",
        since: "4.19",
        probe: Probe::Helper(ProgramType::CgroupSockAddr, BpfHelper::BPF_FUNC_get_local_storage),
    },
    Need {
        feature: "bpf_get_local_storage in sockops",
        since: "4.19",
        probe: Probe::Helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_get_local_storage),
    },
    Need {
        feature: "bpf_get_local_storage in cgroup/getsockopt",
        since: "5.3",
        probe: Probe::Helper(ProgramType::CgroupSockopt, BpfHelper::BPF_FUNC_get_local_storage),
    },
    Need {
        feature: "bpf_sk_storage_get in cgroup/connect4",
        since: "5.8",
        probe: Probe::Helper(ProgramType::CgroupSockAddr, BpfHelper::BPF_FUNC_sk_storage_get),
    },
    Need {
        feature: "bpf_sk_storage_delete in cgroup/connect4",
        since: "5.8",
        probe: Probe::Helper(ProgramType::CgroupSockAddr, BpfHelper::BPF_FUNC_sk_storage_delete),
    },
    Need {
        feature: "bpf_sk_storage_get in sockops",
        since: "5.3",
        probe: Probe::Helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_sk_storage_get),
    },
    Need {
        feature: "bpf_sk_storage_get in cgroup/getsockopt",
        since: "5.3",
        probe: Probe::Helper(ProgramType::CgroupSockopt, BpfHelper::BPF_FUNC_sk_storage_get),
    },
    Need {
        feature: "the socket field of sockops programs (bpf_sock_ops.sk)",
        since: "5.10",
        probe: Probe::SockOpsSocket,
    },
    Need {
        feature: "bpf_sk_assign in sk_lookup",
        since: "5.9",
        probe: Probe::Helper(ProgramType::SkLookup, BpfHelper::BPF_FUNC_sk_assign),
    },
];

/// What the running kernel offers beyond the minimum.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// A getsockopt program may answer with an errno of its own (Linux 5.18: the release that
    /// brought `bpf_get_retval` lifted the "0 or the kernel's own error" rule).
    pub errno_writable: bool,
}

/// Names a feature (a part of a [`Need::feature`]) that the probes then report missing, as if
/// this kernel lacked it: how the end-to-end tests check, on any kernel, that a missing feature
/// is refused before anything is loaded or pinned.
pub const PRETEND_MISSING_ENV: &str = "REDIRECTOR_TEST_PRETEND_MISSING";

/// Checks the running kernel: every [`NEEDS`] probe, then the optional capabilities.
pub fn check() -> Result<Capabilities, KernelError> {
    let uname = nix::sys::utsname::uname().map_err(KernelError::Uname)?;
    let release = uname.release().to_string_lossy();
    if !release_at_least_minimum(&release) {
        tracing::warn!(
            release = %release,
            "kernel release is older than Linux {}.{}; the feature probes decide whether redirector runs",
            MIN_KERNEL.0,
            MIN_KERNEL.1
        );
    }
    let pretend_missing = std::env::var(PRETEND_MISSING_ENV).ok();
    check_needs_with(NEEDS, |need| {
        if pretend_missing
            .as_deref()
            .is_some_and(|feature| need.feature.contains(feature))
        {
            return Ok(false);
        }
        run_probe(&need.probe)
    })?;
    let errno_writable =
        is_helper_supported(ProgramType::CgroupSockopt, BpfHelper::BPF_FUNC_get_retval).map_err(
            |source| KernelError::Probe {
                feature: "bpf_get_retval in cgroup/getsockopt",
                message: source.to_string(),
            },
        )?;
    Ok(Capabilities { errno_writable })
}

/// Lifts this process's RLIMIT_MEMLOCK as far as it may. Before Linux 5.11 the kernel charges
/// BPF maps and every pod's cgroup storage to it (64 KiB by default), so without this the
/// second pod's attach fails with ENOMEM; from 5.11 memory cgroups account for BPF memory and
/// the limit no longer matters. A limit that stays finite (no CAP_SYS_RESOURCE) is logged.
pub fn lift_memlock_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource, RLIM_INFINITY};
    if setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY).is_ok() {
        return;
    }
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_MEMLOCK) {
        let _ = setrlimit(Resource::RLIMIT_MEMLOCK, hard, hard);
        if hard != RLIM_INFINITY {
            tracing::debug!(
                limit_bytes = hard,
                "RLIMIT_MEMLOCK cannot be lifted (no CAP_SYS_RESOURCE); kernels before 5.11 charge BPF memory to it"
            );
        }
    }
}

/// Runs the probes of `needs` in order; the first missing feature is the error.
pub fn check_needs(needs: &[Need]) -> Result<(), KernelError> {
    check_needs_with(needs, |need| run_probe(&need.probe))
}

fn check_needs_with(
    needs: &[Need],
    probe: impl Fn(&Need) -> Result<bool, String>,
) -> Result<(), KernelError> {
    for need in needs {
        let supported = probe(need).map_err(|message| KernelError::Probe {
            feature: need.feature,
            message,
        })?;
        if !supported {
            return Err(KernelError::Missing {
                feature: need.feature,
                since: need.since,
            });
        }
    }
    Ok(())
}

fn run_probe(probe: &Probe) -> Result<bool, String> {
    match probe {
        Probe::Program(program) => is_program_supported(*program).map_err(|e| e.to_string()),
        Probe::Map(map) => is_map_supported(*map).map_err(|e| e.to_string()),
        Probe::Helper(program, helper) => {
            is_helper_supported(*program, *helper).map_err(|e| e.to_string())
        }
        Probe::SharedCgroupStorage => {
            const BPF_MAP_TYPE_CGROUP_STORAGE: u32 = 19;
            sys::map_layout_supported(BPF_MAP_TYPE_CGROUP_STORAGE, 8, 8, 0, 0)
                .map_err(|e| e.to_string())
        }
        Probe::SockOpsSocket => {
            const BPF_PROG_TYPE_SOCK_OPS: u32 = 13;
            sys::program_accepted(BPF_PROG_TYPE_SOCK_OPS, 0, &SOCK_OPS_READS_SK)
                .map_err(|e| e.to_string())
        }
    }
}

/// `r1 = *(u64 *)(r1 + offsetof(struct bpf_sock_ops, sk)); r0 = 1; exit`.
const SOCK_OPS_READS_SK: [Insn; 3] = [
    // BPF_LDX | BPF_MEM | BPF_DW, dst r1, src r1.
    Insn {
        code: 0x79,
        regs: 0x11,
        off: BPF_SOCK_OPS_SK_OFFSET,
        imm: 0,
    },
    // BPF_ALU64 | BPF_MOV | BPF_K, dst r0.
    Insn {
        code: 0xb7,
        regs: 0x00,
        off: 0,
        imm: 1,
    },
    // BPF_JMP | BPF_EXIT.
    Insn {
        code: 0x95,
        regs: 0,
        off: 0,
        imm: 0,
    },
];

/// `offsetof(struct bpf_sock_ops, sk)` in the UAPI (after `bytes_acked`, 8-byte aligned).
const BPF_SOCK_OPS_SK_OFFSET: i16 = 192;

/// Whether a kernel release string (`uname -r`) is at least [`MIN_KERNEL`]; an unparsable one
/// is not.
pub fn release_at_least_minimum(release: &str) -> bool {
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|part| part.parse::<u32>().ok());
    matches!(
        (numbers.next().flatten(), numbers.next().flatten()),
        (Some(major), Some(minor)) if (major, minor) >= MIN_KERNEL
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_at_or_above_the_minimum_pass() {
        for release in [
            "5.10.0-46-cloud-amd64",
            "5.15.0-91-generic",
            "6.1.0-18-amd64",
            "6.18.44-fc-v657",
            "10.0",
        ] {
            assert!(release_at_least_minimum(release), "{release}");
        }
    }

    #[test]
    fn older_or_unparsable_releases_are_below_the_minimum() {
        for release in ["5.9.16", "5.4.0-150-generic", "4.19.0", "", "linux"] {
            assert!(!release_at_least_minimum(release), "{release}");
        }
    }

    /// Needs root (the probes load programs), like every test of this workspace's CI run.
    #[test]
    fn a_missing_helper_is_named_with_its_minimum() {
        let needs = [Need {
            feature: "bpf_sk_assign in cgroup/connect4 (exists on no kernel)",
            since: "never",
            probe: Probe::Helper(ProgramType::CgroupSockAddr, BpfHelper::BPF_FUNC_sk_assign),
        }];
        let message = check_needs(&needs).unwrap_err().to_string();
        assert!(
            message.contains("bpf_sk_assign in cgroup/connect4")
                && message.contains("Linux >= never")
                && message.contains("Linux >= 5.10"),
            "{message}"
        );
    }

    #[test]
    fn this_kernel_has_every_need() {
        check_needs(NEEDS).expect("the CI kernel has everything");
    }
}
