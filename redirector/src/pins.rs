//! The bpffs layout: everything redirector pins lives under one root directory.
//!
//! ```text
//! <root>/maps/<MAP>                 maps, pinned by name (shared by all pods)
//! <root>/progs/<program>            the programs, loaded once per node
//! <root>/pods/<cgroup id>/<hook>    one bpf_link per hook and pod
//! ```
//! Removing a link's pin detaches it; removing the whole root uninstalls everything.
use std::{
    fs::{self, File},
    io,
    path::{Path, PathBuf},
};

use nix::{
    fcntl::{Flock, FlockArg},
    sys::statfs::{statfs, FsType},
};

pub const DEFAULT_ROOT: &str = "/sys/fs/bpf/redirector";
/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: FsType = FsType(0xcafe_4a11);

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("{path} is not on a bpffs (BPF filesystem): mount one (`mount -t bpf bpf /sys/fs/bpf`) or choose a root on one with --bpffs")]
    NotBpffs { path: PathBuf },
    #[error("bpffs {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

impl PinError {
    fn io(path: &Path) -> impl FnOnce(io::Error) -> Self + '_ {
        move |source| Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// The root directory of redirector's pins.
#[derive(Clone, Debug)]
pub struct PinRoot {
    root: PathBuf,
}

/// Exclusive hold on a pin root, so that concurrent enroll/unenroll/uninstall calls (CLI,
/// agent, CNI plugin) never see each other's half-made state.
#[derive(Debug)]
pub struct RootLock {
    _lock: Flock<File>,
}

impl PinRoot {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    pub fn exists(&self) -> bool {
        self.root.is_dir()
    }

    /// Checks that the root (or, before it exists, its nearest existing ancestor) is on a bpffs.
    pub fn check_bpffs(&self) -> Result<(), PinError> {
        let existing = self
            .root
            .ancestors()
            .find(|p| p.exists())
            .unwrap_or(Path::new("/"));
        let fs_type = statfs(existing)
            .map_err(|e| PinError::io(existing)(e.into()))?
            .filesystem_type();
        if fs_type != BPF_FS_MAGIC {
            return Err(PinError::NotBpffs {
                path: existing.to_owned(),
            });
        }
        Ok(())
    }

    /// Creates the directory layout and takes the root's lock.
    pub fn create_and_lock(&self) -> Result<RootLock, PinError> {
        self.check_bpffs()?;
        for dir in [self.maps_dir(), self.progs_dir(), self.pods_dir()] {
            fs::create_dir_all(&dir).map_err(PinError::io(&dir))?;
        }
        self.lock()
    }

    /// Takes the root's lock (the root must exist).
    pub fn lock(&self) -> Result<RootLock, PinError> {
        let dir = File::open(&self.root).map_err(PinError::io(&self.root))?;
        let lock = Flock::lock(dir, FlockArg::LockExclusive)
            .map_err(|(_, errno)| PinError::io(&self.root)(errno.into()))?;
        Ok(RootLock { _lock: lock })
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn progs_dir(&self) -> PathBuf {
        self.root.join("progs")
    }

    fn pods_dir(&self) -> PathBuf {
        self.root.join("pods")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    pub fn program(&self, name: &str) -> PathBuf {
        self.progs_dir().join(name)
    }

    pub fn pod_dir(&self, cgroup_id: u64) -> PathBuf {
        self.pods_dir().join(cgroup_id.to_string())
    }

    /// Cgroup ids of the pods that have link pins.
    pub fn pinned_pods(&self) -> Result<Vec<u64>, PinError> {
        let dir = self.pods_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(PinError::io(&dir)(e)),
        };
        Ok(entries
            .filter_map(Result::ok)
            .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
            .collect())
    }

    /// Removes a pod's link pins (which detaches them). Missing pins are fine.
    pub fn remove_pod(&self, cgroup_id: u64) -> Result<(), PinError> {
        remove_tree(&self.pod_dir(cgroup_id))
    }

    /// Removes one pin (a link detaches). A missing pin is fine.
    pub fn remove_pin(&self, pin: &Path) -> Result<(), PinError> {
        match fs::remove_file(pin) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(PinError::io(pin)(e)),
            _ => Ok(()),
        }
    }

    /// Removes every pin: links detach, programs and maps are freed once nothing holds them.
    pub fn remove_all(&self) -> Result<(), PinError> {
        remove_tree(&self.root)
    }
}

fn remove_tree(path: &Path) -> Result<(), PinError> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(PinError::io(path)(e)),
        _ => Ok(()),
    }
}
