//! Reading a pod's network namespace: its addresses (which destinations are local to the
//! pod, and whether istio-iptables would turn IPv6 on) and its identity. The namespace is
//! entered on a dedicated thread, so the caller's own namespace never changes.
use std::{
    fs::File,
    net::IpAddr,
    os::{fd::AsFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use nix::sched::{setns, CloneFlags};

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
    #[error("network namespace {path}: reading its addresses: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
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
        let file = File::open(path).map_err(|source| NetnsError::Open {
            path: path.to_owned(),
            source,
        })?;
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
