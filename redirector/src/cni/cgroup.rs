//! Where kubelet puts a pod's cgroup v2 directory, for both of its cgroup drivers.
//!
//! ```text
//! cgroupfs  <root>/kubepods[/burstable|/besteffort]/pod<uid>
//! systemd   <root>/kubepods.slice[/kubepods-<qos>.slice]/kubepods[-<qos>]-pod<uid with _ for ->.slice
//! ```
//! Guaranteed pods sit directly under kubepods, the other QoS classes one level lower.
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

/// The directories, relative to the cgroup root, where the pod's cgroup may be (one per QoS
/// class). Refuses a UID that could leave the root.
pub fn pod_cgroup_candidates(
    driver: CgroupDriver,
    uid: &str,
) -> Result<Vec<PathBuf>, PodCgroupError> {
    if uid.is_empty() || !uid.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(PodCgroupError::BadUid {
            uid: uid.to_owned(),
        });
    }
    Ok(QOS_CLASSES
        .iter()
        .map(|qos| match (driver, qos) {
            (CgroupDriver::Cgroupfs, Some(qos)) => format!("kubepods/{qos}/pod{uid}"),
            (CgroupDriver::Cgroupfs, None) => format!("kubepods/pod{uid}"),
            (CgroupDriver::Systemd, Some(qos)) => format!(
                "kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{}.slice",
                uid.replace('-', "_")
            ),
            (CgroupDriver::Systemd, None) => {
                format!("kubepods.slice/kubepods-pod{}.slice", uid.replace('-', "_"))
            }
        })
        .map(PathBuf::from)
        .collect())
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
