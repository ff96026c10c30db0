//! Which cgroups may be enrolled. Enrolling the cgroup root or a node slice would capture the
//! whole node (kubelet, the runtime, sshd), so enroll only takes pods:
//!
//! A **pod cgroup** is a cgroup2 directory strictly below a *pod root*, other than a kubelet
//! QoS-class directory directly below that root (`burstable`, `besteffort`,
//! `*-burstable.slice`, `*-besteffort.slice`). The pod roots are kubelet's hierarchies below
//! the cgroup root (`kubepods.slice`, `kubepods`, and kind's `kubelet.slice/kubelet-kubepods.slice`
//! and `kubelet/kubepods`), plus those configured (`pod_cgroup_roots`, `--pod-cgroup-root`: for
//! tests and unusual layouts).
//!
//! Also here: telling a pod of a sandboxed runtime (gVisor, Kata), whose sockets are not in
//! this kernel, by the processes in its cgroup.
use std::{
    fs,
    path::{Path, PathBuf},
};

use crate::cgroup;

/// kubelet's pod hierarchies, relative to the cgroup root.
pub const KUBELET_ROOTS: [&str; 4] = [
    "kubepods.slice",
    "kubepods",
    "kubelet.slice/kubelet-kubepods.slice",
    "kubelet/kubepods",
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NotAPod {
    #[error("{path} is not a pod cgroup: pods are below {roots} (not a root itself, nor a QoS-class directory); configure pod_cgroup_roots / --pod-cgroup-root for other layouts")]
    Outside { path: PathBuf, roots: String },
    #[error("{path} is kubelet's {qos} QoS-class cgroup, not a pod")]
    QosClass { path: PathBuf, qos: String },
    #[error("the pod of {path} runs in a sandboxed runtime ({runtime}): its sockets are not in this kernel, so redirector cannot capture it")]
    Sandboxed { path: PathBuf, runtime: String },
}

/// The pod roots: kubelet's below `cgroup_root` (the cgroup2 mount when None), and `extra`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodCgroups {
    pub cgroup_root: Option<PathBuf>,
    pub extra: Vec<PathBuf>,
}

impl PodCgroups {
    fn roots(&self) -> Vec<PathBuf> {
        let base = self
            .cgroup_root
            .clone()
            .or_else(|| cgroup::cgroup2_mount().ok());
        let mut roots: Vec<PathBuf> = base
            .iter()
            .flat_map(|base| KUBELET_ROOTS.iter().map(move |root| base.join(root)))
            .chain(self.extra.iter().cloned())
            .map(|root| fs::canonicalize(&root).unwrap_or(root))
            .collect();
        roots.dedup();
        roots
    }

    /// Refuses `cgroup` (canonical) unless it is a pod cgroup.
    pub fn check(&self, cgroup: &Path) -> Result<(), NotAPod> {
        classify(cgroup, &self.roots())
    }
}

/// The pure rule, on canonical paths.
pub fn classify(cgroup: &Path, roots: &[PathBuf]) -> Result<(), NotAPod> {
    let below = roots.iter().find_map(|root| {
        let relative = cgroup.strip_prefix(root).ok()?;
        (relative.components().next().is_some()).then_some(relative)
    });
    let Some(relative) = below else {
        return Err(NotAPod::Outside {
            path: cgroup.to_owned(),
            roots: roots
                .iter()
                .map(|root| root.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        });
    };
    let mut components = relative.components();
    let first = components
        .next()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .unwrap_or_default();
    let is_qos = ["burstable", "besteffort"]
        .iter()
        .any(|qos| first == *qos || first.ends_with(&format!("-{qos}.slice")));
    if is_qos && components.next().is_none() {
        return Err(NotAPod::QosClass {
            path: cgroup.to_owned(),
            qos: first,
        });
    }
    Ok(())
}

/// Executables of sandboxed runtimes, as they show in a pod's cgroup (gVisor's sandbox and
/// shim; Kata's VMMs, virtiofsd and shim).
fn sandbox_runtime_of(executable: &str) -> Option<&'static str> {
    let name = executable.trim_end_matches(" (deleted)");
    if name.starts_with("runsc") || name.starts_with("containerd-shim-runsc") {
        Some("gVisor")
    } else if name.starts_with("qemu-system")
        || name.starts_with("containerd-shim-kata")
        || ["cloud-hypervisor", "firecracker", "virtiofsd"].contains(&name)
    {
        Some("Kata")
    } else {
        None
    }
}

/// Most cgroups looked at below one pod (its containers), a bound against odd trees.
const MAX_CGROUPS: usize = 256;

/// The sandboxed runtime found among the processes of the pod's cgroup tree, named with the
/// executable that gave it away. Best effort: at CNI ADD the sandbox may not run yet (the
/// runtime sets up the network first), so status and CHECK look again later.
pub fn sandboxed_runtime(pod: &Path) -> Option<String> {
    let mut pending = vec![pod.to_owned()];
    let mut seen = 0;
    while let Some(dir) = pending.pop() {
        seen += 1;
        if seen > MAX_CGROUPS {
            break;
        }
        let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines() {
            let proc = Path::new("/proc").join(pid);
            let executable = fs::read_link(proc.join("exe"))
                .ok()
                .and_then(|exe| Some(exe.file_name()?.to_string_lossy().into_owned()))
                .or_else(|| fs::read_to_string(proc.join("comm")).ok())
                .unwrap_or_default();
            if let Some(runtime) = sandbox_runtime_of(executable.trim()) {
                return Some(format!("{runtime}: {}", executable.trim()));
            }
        }
        if let Ok(entries) = fs::read_dir(&dir) {
            pending.extend(
                entries
                    .filter_map(Result::ok)
                    .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|entry| entry.path()),
            );
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roots() -> Vec<PathBuf> {
        KUBELET_ROOTS
            .iter()
            .map(|root| Path::new("/sys/fs/cgroup").join(root))
            .chain([PathBuf::from("/sys/fs/cgroup/unified/rdt-1-test")])
            .collect()
    }

    #[test]
    fn pods_are_below_a_pod_root_and_are_not_qos_classes() {
        let ok = |path: &str| classify(Path::new(path), &roots());
        for pod in [
            "/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0b8f_11.slice",
            "/sys/fs/cgroup/kubepods.slice/kubepods-pod0b8f_11.slice",
            "/sys/fs/cgroup/kubepods/besteffort/pod0b8f-11",
            "/sys/fs/cgroup/kubepods/pod0b8f-11",
            "/sys/fs/cgroup/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod1.slice",
            "/sys/fs/cgroup/unified/rdt-1-test/first",
        ] {
            assert_eq!(ok(pod), Ok(()), "{pod}");
        }
        for node in [
            "/sys/fs/cgroup",
            "/sys/fs/cgroup/system.slice",
            "/sys/fs/cgroup/system.slice/kubelet.service",
            "/sys/fs/cgroup/user.slice",
            "/sys/fs/cgroup/kubepods.slice",
            "/sys/fs/cgroup/kubepods",
            "/sys/fs/cgroup/unified/rdt-1-test",
            "/sys/fs/cgroup/kubepodsX/pod1",
        ] {
            assert!(
                matches!(ok(node), Err(NotAPod::Outside { .. })),
                "{node}: {:?}",
                ok(node)
            );
        }
        for qos in [
            "/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice",
            "/sys/fs/cgroup/kubepods.slice/kubepods-besteffort.slice",
            "/sys/fs/cgroup/kubepods/burstable",
            "/sys/fs/cgroup/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice",
        ] {
            assert!(matches!(ok(qos), Err(NotAPod::QosClass { .. })), "{qos}");
        }
    }

    #[test]
    fn sandboxed_runtimes_are_told_by_their_executables() {
        for (exe, runtime) in [
            ("runsc", Some("gVisor")),
            ("runsc-sandbox", Some("gVisor")),
            ("containerd-shim-runsc-v1", Some("gVisor")),
            ("qemu-system-x86_64", Some("Kata")),
            ("cloud-hypervisor (deleted)", Some("Kata")),
            ("containerd-shim-kata-v2", Some("Kata")),
            ("pause", None),
            ("envoy", None),
        ] {
            assert_eq!(sandbox_runtime_of(exe), runtime, "{exe}");
        }
    }
}
