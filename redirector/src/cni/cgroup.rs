//! Where kubelet puts a pod's cgroup v2 directory, for both of its cgroup drivers.
//!
//! ```text
//! cgroupfs  <root>/kubepods[/burstable|/besteffort]/pod<uid>
//! systemd   <root>/kubepods.slice[/kubepods-<qos>.slice]/kubepods[-<qos>]-pod<uid with _ for ->.slice
//! ```
//! Guaranteed pods sit directly under kubepods, the other QoS classes one level lower. kind's
//! nodes run kubelet with `--cgroup-root=/kubelet`, which puts `kubelet/` (cgroupfs) or
//! `kubelet.slice/kubelet-` (systemd) in front of every level.
use std::{
    fmt,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CgroupDriver {
    Cgroupfs,
    /// kubeadm's default since Kubernetes 1.22, and most distributions'.
    #[default]
    Systemd,
}

impl fmt::Display for CgroupDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Cgroupfs => "cgroupfs",
            Self::Systemd => "systemd",
        })
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PodCgroupError {
    #[error("pod UID {uid:?} is not a UID (letters, digits and dashes only)")]
    BadUid { uid: String },
    #[error("no cgroup of pod {uid} under {root} with the {driver} cgroup driver (looked for {looked_for}): check cgroupRoot and cgroupDriver against kubelet's settings")]
    NotFound {
        uid: String,
        root: PathBuf,
        driver: CgroupDriver,
        looked_for: String,
    },
}

/// QoS classes, in the order kubelet is most likely to use them.
const QOS_CLASSES: [Option<&str>; 3] = [Some("burstable"), Some("besteffort"), None];

/// kubelet's `--cgroup-root`s: the default (the cgroup root), then kind's `/kubelet`, below
/// which kubelet's `kubepods` becomes `kubelet/kubepods` (cgroupfs) or
/// `kubelet.slice/kubelet-kubepods.slice` (systemd).
const KUBELET_CGROUP_ROOTS: [Option<&str>; 2] = [None, Some("kubelet")];

/// The directories, relative to the cgroup root, where the pod's cgroup may be (one per
/// kubelet cgroup root and QoS class). Refuses a UID that could leave the root.
pub fn pod_cgroup_candidates(
    driver: CgroupDriver,
    uid: &str,
) -> Result<Vec<PathBuf>, PodCgroupError> {
    if uid.is_empty() || !uid.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(PodCgroupError::BadUid {
            uid: uid.to_owned(),
        });
    }
    let pod = match driver {
        CgroupDriver::Cgroupfs => format!("pod{uid}"),
        CgroupDriver::Systemd => format!("pod{}", uid.replace('-', "_")),
    };
    Ok(KUBELET_CGROUP_ROOTS
        .iter()
        .flat_map(|root| QOS_CLASSES.iter().map(move |qos| (root, qos)))
        .map(|(root, qos)| {
            let levels = root
                .iter()
                .chain(&Some("kubepods"))
                .chain(qos)
                .copied()
                .chain(std::iter::once(pod.as_str()));
            nested(driver, levels)
        })
        .collect())
}

/// The path of nested cgroup levels: plain directories with cgroupfs; with systemd, slices
/// named after their whole ancestry (`a.slice/a-b.slice/a-b-c.slice`).
fn nested<'a>(driver: CgroupDriver, levels: impl Iterator<Item = &'a str>) -> PathBuf {
    let mut path = PathBuf::new();
    let mut slice = String::new();
    for level in levels {
        match driver {
            CgroupDriver::Cgroupfs => path.push(level),
            CgroupDriver::Systemd => {
                if !slice.is_empty() {
                    slice.push('-');
                }
                slice.push_str(level);
                path.push(format!("{slice}.slice"));
            }
        }
    }
    path
}

/// The pod's cgroup directory under `root`.
pub fn find_pod_cgroup(
    root: &Path,
    driver: CgroupDriver,
    uid: &str,
) -> Result<PathBuf, PodCgroupError> {
    let candidates = pod_cgroup_candidates(driver, uid)?;
    candidates
        .iter()
        .map(|relative| root.join(relative))
        .find(|path| path.is_dir())
        .ok_or_else(|| PodCgroupError::NotFound {
            uid: uid.to_owned(),
            root: root.to_owned(),
            driver,
            looked_for: candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0b8f5c3e-1a2b-4c5d-8e9f-0123456789ab";

    #[test]
    fn cgroupfs_layout() {
        let candidates = pod_cgroup_candidates(CgroupDriver::Cgroupfs, UID).unwrap();
        assert_eq!(
            candidates,
            [
                format!("kubepods/burstable/pod{UID}"),
                format!("kubepods/besteffort/pod{UID}"),
                format!("kubepods/pod{UID}"),
                format!("kubelet/kubepods/burstable/pod{UID}"),
                format!("kubelet/kubepods/besteffort/pod{UID}"),
                format!("kubelet/kubepods/pod{UID}"),
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn systemd_layout_escapes_dashes() {
        let escaped = "0b8f5c3e_1a2b_4c5d_8e9f_0123456789ab";
        let candidates = pod_cgroup_candidates(CgroupDriver::Systemd, UID).unwrap();
        assert_eq!(
            candidates,
            [
                format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{escaped}.slice"),
                format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{escaped}.slice"),
                format!("kubepods.slice/kubepods-pod{escaped}.slice"),
                format!("kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{escaped}.slice"),
                format!("kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{escaped}.slice"),
                format!("kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{escaped}.slice"),
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn uids_that_could_escape_the_root_are_refused() {
        for bad in ["", "../etc", "a/b", "a b", "x.slice"] {
            assert_eq!(
                pod_cgroup_candidates(CgroupDriver::Cgroupfs, bad),
                Err(PodCgroupError::BadUid { uid: bad.into() })
            );
        }
    }

    #[test]
    fn finds_the_existing_candidate_or_names_what_it_looked_for() {
        let root = std::env::temp_dir().join(format!("redirector-podcg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let besteffort = root.join(format!("kubepods/besteffort/pod{UID}"));
        std::fs::create_dir_all(&besteffort).unwrap();
        assert_eq!(
            find_pod_cgroup(&root, CgroupDriver::Cgroupfs, UID),
            Ok(besteffort)
        );
        let missing = find_pod_cgroup(&root, CgroupDriver::Systemd, UID)
            .unwrap_err()
            .to_string();
        assert!(missing.contains("kubepods-pod0b8f5c3e_1a2b"), "{missing}");
        assert!(missing.contains("systemd"), "{missing}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
