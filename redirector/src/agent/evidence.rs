//! Whether a recorded pod still exists, for reconcile. Unenrolling a running pod takes it out
//! of the mesh with no error anywhere, so only positive proof counts: the very cgroup (or
//! netns) recorded at enroll is seen to be gone, on the same filesystem it was on. Anything
//! that makes the proof impossible (mountinfo unreadable, a directory that cannot be listed,
//! the configured cgroup root not being cgroup2, a netns file that is visible but not nsfs
//! because mount propagation broke) is an error, and the pass stops without collecting.
//!
//! [`PodSource`] is the seam for the source of truth: [`Filesystem`] is the evidence the node's
//! files give, [`super::runtime::RuntimeSource`] the container runtime's (CRI).
use std::{
    io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use nix::sys::statfs::{statfs, FsType, CGROUP2_SUPER_MAGIC, NSFS_MAGIC};

use super::{
    api::CollectReason,
    runtime::RunningPod,
    store::{FileId, PodRecord},
};
use crate::cgroup;

/// Why a pass could not tell whether a pod is gone.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EvidenceError(pub String);

/// What reconcile concludes about one recorded pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Presence {
    Present,
    Gone(CollectReason),
}

/// A source of truth about which pods exist on the node.
pub trait PodSource: Send + Sync {
    /// Called once before each pass: whether the source can be trusted right now.
    fn check(&self) -> Result<(), EvidenceError>;
    /// Whether the pod of `record` still exists.
    fn presence(&self, record: &PodRecord) -> Result<Presence, EvidenceError>;
    /// The running pods this source knows that the CNI plugin would capture, for reconcile
    /// to enroll those that are not (the node's files know of no pod never enrolled).
    fn running(&self) -> Vec<RunningPod> {
        Vec::new()
    }
}

/// The evidence of the cgroup2 filesystem and the netns files, below `cgroup_root`.
#[derive(Clone, Debug)]
pub struct Filesystem {
    pub cgroup_root: PathBuf,
}

/// What is seen at a recorded path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen {
    /// The path exists: its identity and the type of filesystem it is on.
    Exists { id: FileId, fs_type: FsType },
    /// The path does not exist; `ancestor` is the nearest existing directory above it.
    Missing {
        ancestor: PathBuf,
        id: FileId,
        fs_type: FsType,
    },
}

fn io_problem(path: &Path, what: &str, error: io::Error) -> EvidenceError {
    EvidenceError(format!("{what} {}: {error}", path.display()))
}

/// Looks at `path` (following symlinks, as the runtime's paths are used).
pub fn look(path: &Path) -> Result<Seen, EvidenceError> {
    let identify = |path: &Path| -> Result<(FileId, FsType), EvidenceError> {
        let metadata = std::fs::metadata(path).map_err(|e| io_problem(path, "cannot stat", e))?;
        let fs_type = statfs(path)
            .map_err(|e| io_problem(path, "cannot statfs", e.into()))?
            .filesystem_type();
        Ok((
            FileId {
                dev: metadata.dev(),
                ino: metadata.ino(),
            },
            fs_type,
        ))
    };
    match std::fs::metadata(path) {
        Ok(_) => {
            let (id, fs_type) = identify(path)?;
            Ok(Seen::Exists { id, fs_type })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let mut ancestor = path.parent();
            while let Some(dir) = ancestor {
                match std::fs::metadata(dir) {
                    Ok(_) => {
                        let (id, fs_type) = identify(dir)?;
                        return Ok(Seen::Missing {
                            ancestor: dir.to_owned(),
                            id,
                            fs_type,
                        });
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => ancestor = dir.parent(),
                    Err(e) => return Err(io_problem(dir, "cannot stat", e)),
                }
            }
            Err(EvidenceError(format!(
                "{}: no directory above it exists",
                path.display()
            )))
        }
        Err(e) => Err(io_problem(path, "cannot stat", e)),
    }
}

/// The verdict on a pod's cgroup from what is seen at its recorded path. `dev` is the cgroup2
/// filesystem's device recorded at enroll (None in records of older versions).
pub fn judge_cgroup(
    record: &PodRecord,
    dev: Option<u64>,
    seen: &Seen,
) -> Result<Presence, EvidenceError> {
    let path = record.cgroup.display();
    let same_fs = |id: &FileId, fs_type: &FsType| {
        *fs_type == CGROUP2_SUPER_MAGIC && dev.is_none_or(|dev| dev == id.dev)
    };
    match seen {
        Seen::Exists { id, fs_type } if same_fs(id, fs_type) => Ok(if id.ino == record.cgroup_id {
            Presence::Present
        } else {
            // The name now holds another cgroup: the recorded one was removed.
            Presence::Gone(CollectReason::CgroupGone)
        }),
        Seen::Exists { .. } => Err(EvidenceError(format!(
            "{path} is not on the cgroup2 filesystem the pod was enrolled on: the hierarchy is not mounted here as it was"
        ))),
        Seen::Missing {
            ancestor,
            id,
            fs_type,
        } if same_fs(id, fs_type) => {
            let _ = ancestor;
            Ok(Presence::Gone(CollectReason::CgroupGone))
        }
        Seen::Missing { ancestor, .. } => Err(EvidenceError(format!(
            "{path} is missing, but {} is not the cgroup2 filesystem the pod was enrolled on: cannot tell whether the pod is gone",
            ancestor.display()
        ))),
    }
}

/// The verdict on a pod's netns file. `recorded` is the namespace file's identity at enroll,
/// `dir_dev` the device of its directory then (None in records of older versions: such a
/// netns is never taken as proof).
pub fn judge_netns(
    path: &Path,
    recorded: Option<FileId>,
    dir_dev: Option<u64>,
    seen: &Seen,
) -> Result<Presence, EvidenceError> {
    let (Some(recorded), Some(dir_dev)) = (recorded, dir_dev) else {
        return Ok(Presence::Present);
    };
    match seen {
        Seen::Exists { fs_type, .. } if *fs_type != NSFS_MAGIC => Err(EvidenceError(format!(
            "{} is visible but is not a network namespace (nsfs): the mount propagation of its directory into the agent is broken",
            path.display()
        ))),
        Seen::Exists { id, .. } => Ok(if id.ino == recorded.ino {
            Presence::Present
        } else {
            Presence::Gone(CollectReason::NetnsGone)
        }),
        Seen::Missing { ancestor, id, .. }
            if Some(ancestor.as_path()) == path.parent() && id.dev == dir_dev =>
        {
            Ok(Presence::Gone(CollectReason::NetnsGone))
        }
        Seen::Missing { ancestor, .. } => Err(EvidenceError(format!(
            "{} is missing, but {} is not the directory it was in at enroll (not mounted into the agent?): cannot tell whether the pod is gone",
            path.display(),
            ancestor.display()
        ))),
    }
}

impl PodSource for Filesystem {
    fn check(&self) -> Result<(), EvidenceError> {
        let mount = cgroup::cgroup2_mount().map_err(|e| EvidenceError(e.to_string()))?;
        let root = &self.cgroup_root;
        let fs_type = statfs(root)
            .map_err(|e| io_problem(root, "cannot statfs the cgroup root", e.into()))?
            .filesystem_type();
        if fs_type != CGROUP2_SUPER_MAGIC {
            return Err(EvidenceError(format!(
                "the cgroup root {} is not a cgroup2 directory (cgroup2 is mounted at {})",
                root.display(),
                mount.display()
            )));
        }
        Ok(())
    }

    fn presence(&self, record: &PodRecord) -> Result<Presence, EvidenceError> {
        let identity = record.identity.unwrap_or_default();
        let cgroup_dev = record.identity.map(|identity| identity.cgroup_dev);
        let cgroup = judge_cgroup(record, cgroup_dev, &look(&record.cgroup)?)?;
        let netns = match &record.meta.netns {
            Some(path) => judge_netns(path, identity.netns, identity.netns_dir_dev, &look(path)?)?,
            None => Presence::Present,
        };
        Ok(match (cgroup, netns) {
            (Presence::Gone(reason), _) | (_, Presence::Gone(reason)) => Presence::Gone(reason),
            _ => Presence::Present,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::store::PodMeta;

    const TMPFS: FsType = FsType(0x0102_1994);

    fn record() -> PodRecord {
        PodRecord {
            cgroup_id: 42,
            cgroup: "/sys/fs/cgroup/kubepods/podu".into(),
            identity: None,
            meta: PodMeta::default(),
            follow: Default::default(),
        }
    }

    fn id(dev: u64, ino: u64) -> FileId {
        FileId { dev, ino }
    }

    fn missing(ancestor: &str, dev: u64, fs_type: FsType) -> Seen {
        Seen::Missing {
            ancestor: ancestor.into(),
            id: id(dev, 1),
            fs_type,
        }
    }

    #[test]
    fn a_cgroup_is_gone_only_when_seen_gone_on_its_own_filesystem() {
        let r = record();
        let exists = |dev, ino, fs_type| Seen::Exists {
            id: id(dev, ino),
            fs_type,
        };
        let judge = |dev, seen: Seen| judge_cgroup(&r, dev, &seen);
        assert_eq!(
            judge(Some(7), exists(7, 42, CGROUP2_SUPER_MAGIC)),
            Ok(Presence::Present)
        );
        assert_eq!(
            judge(Some(7), exists(7, 43, CGROUP2_SUPER_MAGIC)),
            Ok(Presence::Gone(CollectReason::CgroupGone)),
            "the name holds a new cgroup"
        );
        assert_eq!(
            judge(
                Some(7),
                missing("/sys/fs/cgroup/kubepods", 7, CGROUP2_SUPER_MAGIC)
            ),
            Ok(Presence::Gone(CollectReason::CgroupGone))
        );
        assert_eq!(
            judge(None, missing("/sys/fs/cgroup", 9, CGROUP2_SUPER_MAGIC)),
            Ok(Presence::Gone(CollectReason::CgroupGone)),
            "older records: any cgroup2 parent"
        );
        // Hybrid layouts and missing mounts: /sys/fs/cgroup is a tmpfs here.
        let message = judge(Some(7), missing("/sys/fs/cgroup", 3, TMPFS))
            .unwrap_err()
            .0;
        assert!(message.contains("cannot tell"), "{message}");
        assert!(judge(Some(7), missing("/sys/fs/cgroup", 8, CGROUP2_SUPER_MAGIC)).is_err());
        assert!(judge(Some(7), exists(3, 42, TMPFS)).is_err());
    }

    #[test]
    fn a_netns_is_gone_only_when_missing_from_its_own_directory() {
        let path = Path::new("/var/run/netns/cni-1");
        let ns = Some(id(4, 4026532000));
        let judge = |recorded, dir_dev, seen: Seen| judge_netns(path, recorded, dir_dev, &seen);
        assert_eq!(
            judge(
                ns,
                Some(30),
                Seen::Exists {
                    id: id(4, 4026532000),
                    fs_type: NSFS_MAGIC
                }
            ),
            Ok(Presence::Present)
        );
        assert_eq!(
            judge(
                ns,
                Some(30),
                Seen::Exists {
                    id: id(4, 4026532999),
                    fs_type: NSFS_MAGIC
                }
            ),
            Ok(Presence::Gone(CollectReason::NetnsGone))
        );
        assert_eq!(
            judge(ns, Some(30), missing("/var/run/netns", 30, TMPFS)),
            Ok(Presence::Gone(CollectReason::NetnsGone))
        );
        let broken = judge(
            ns,
            Some(30),
            Seen::Exists {
                id: id(30, 77),
                fs_type: TMPFS,
            },
        )
        .unwrap_err()
        .0;
        assert!(broken.contains("mount propagation"), "{broken}");
        // The directory is another one than at enroll (the host's is not mounted here).
        assert!(judge(ns, Some(30), missing("/var/run/netns", 31, TMPFS)).is_err());
        assert!(judge(ns, Some(30), missing("/var/run", 30, TMPFS)).is_err());
        assert_eq!(
            judge(None, None, missing("/var/run", 30, TMPFS)),
            Ok(Presence::Present),
            "no recorded identity: never proof"
        );
    }

    #[test]
    fn looking_names_the_nearest_existing_directory() {
        let scratch =
            std::env::temp_dir().join(format!("redirector-evidence-{}", std::process::id()));
        std::fs::create_dir_all(&scratch).unwrap();
        let Seen::Missing { ancestor, .. } = look(&scratch.join("a/b/c")).unwrap() else {
            panic!("not missing")
        };
        assert_eq!(ancestor, scratch);
        assert!(matches!(look(&scratch).unwrap(), Seen::Exists { .. }));
        std::fs::remove_dir_all(&scratch).unwrap();
    }
}
