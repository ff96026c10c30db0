//! Reading a pod's network namespace: its addresses (which destinations are local to the
//! pod, and whether istio-iptables would turn IPv6 on) and its identity. The namespace is
//! entered on a dedicated thread, so the caller's own namespace never changes.
use std::{
    fs::{File, OpenOptions},
    net::IpAddr,
    os::{
        fd::{AsFd, AsRawFd as _},
        unix::fs::{MetadataExt, OpenOptionsExt as _},
    },
    path::{Path, PathBuf},
};

use nix::{
    sched::{setns, CloneFlags},
    sys::statfs::{fstatfs, NSFS_MAGIC},
};

use crate::policy::PodNetwork;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("network namespace {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a network namespace ({source})")]
    NotNetns { path: PathBuf, source: nix::Error },
    #[error("{path} is not a namespace file (not on nsfs, e.g. /proc/PID/ns/net or a bind mount of one)")]
    NotNsfs { path: PathBuf },
    #[error("network namespace {path}: reading its addresses: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Opens `path` only if it is a namespace file: checked on an `O_PATH` descriptor (whose open
/// neither blocks, as a FIFO's would, nor has a device's side effects), which is then reopened
/// for reading through its /proc/self/fd link (`setns` takes no `O_PATH` descriptor), so the
/// file checked is the file used.
pub fn open_nsfs(path: &Path) -> Result<File, NetnsError> {
    let open_error = |source| NetnsError::Open {
        path: path.to_owned(),
        source,
    };
    let located = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(path)
        .map_err(open_error)?;
    let fs_type = fstatfs(&located)
        .map_err(|e| open_error(e.into()))?
        .filesystem_type();
    if fs_type != NSFS_MAGIC {
        return Err(NetnsError::NotNsfs {
            path: path.to_owned(),
        });
    }
    File::open(format!("/proc/self/fd/{}", located.as_raw_fd())).map_err(open_error)
}

/// A pod's network namespace as seen from inside.
#[derive(Clone, Debug)]
pub struct PodNetns {
    pub path: PathBuf,
    /// The namespace's inode on nsfs: what identifies it while it exists.
    pub inode: u64,
    pub network: PodNetwork,
}

impl PodNetns {
    pub fn read(path: &Path) -> Result<Self, NetnsError> {
        let file = open_nsfs(path)?;
        let owned_path = path.to_owned();
        let inode = file
            .metadata()
            .map_err(|source| NetnsError::Open {
                path: path.to_owned(),
                source,
            })?
            .ino();
        let addresses = within(&file, path, || {
            nix::ifaddrs::getifaddrs().map(|interfaces| {
                interfaces
                    .filter_map(|interface| interface.address)
                    .filter_map(|address| {
                        address
                            .as_sockaddr_in()
                            .map(|v4| IpAddr::V4(v4.ip()))
                            .or_else(|| address.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
                    })
                    .collect()
            })
        })?
        .map_err(|e| NetnsError::Read {
            path: path.to_owned(),
            source: e.into(),
        })?;
        Ok(Self {
            path: owned_path,
            inode,
            network: PodNetwork { addresses },
        })
    }
}

/// Runs `work` on a thread of its own that has entered the network namespace `file` (opened
/// from `path`): what it creates there (a socket) belongs to that namespace, and the caller's
/// thread never changes namespace.
pub fn within<T: Send>(
    file: &File,
    path: &Path,
    work: impl FnOnce() -> T + Send,
) -> Result<T, NetnsError> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| {
                    NetnsError::NotNetns {
                        path: path.to_owned(),
                        source,
                    }
                })?;
                Ok(work())
            })
            .join()
            .expect("a thread in a pod's netns does not panic")
    })
}
