//! Pod cgroups: finding the cgroup v2 mount and validating a pod's cgroup directory.
use std::{
    collections::HashMap,
    fs::{self, File, OpenOptions},
    os::{
        fd::AsRawFd as _,
        unix::fs::{MetadataExt, OpenOptionsExt as _},
    },
    path::{Path, PathBuf},
};

use nix::{
    fcntl::AtFlags,
    sys::{
        stat::fstatat,
        statfs::{fstatfs, CGROUP2_SUPER_MAGIC, CGROUP_SUPER_MAGIC},
    },
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup {path}: no such directory")]
    NotFound { path: PathBuf },
    #[error("cgroup {path}: not a directory")]
    NotADirectory { path: PathBuf },
    #[error("cgroup {path} is in a cgroup v1 hierarchy; redirector needs a cgroup v2 directory (cgroup2 is mounted at {cgroup2})")]
    CgroupV1 { path: PathBuf, cgroup2: String },
    #[error("{path} is not a cgroup v2 directory (cgroup2 is mounted at {cgroup2})")]
    NotCgroup2 { path: PathBuf, cgroup2: String },
    #[error("{path} has no cgroup.procs, so it is not a cgroup directory")]
    NoProcs { path: PathBuf },
    #[error("no cgroup2 filesystem is mounted (none in /proc/self/mountinfo)")]
    NoCgroup2Mount,
    #[error("cgroup {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A validated cgroup v2 directory, held open (the fd is what programs attach to).
#[derive(Debug)]
pub struct Cgroup {
    pub path: PathBuf,
    /// The cgroup id, as `bpf_get_current_cgroup_id()` reports it (the kernfs inode number).
    pub id: u64,
    pub dir: File,
}

impl Cgroup {
    /// Opens `path` and checks that it is a directory of a cgroup v2 hierarchy with a
    /// `cgroup.procs`. The checks are made on the opened directory, so the directory checked is
    /// the one returned even if the path changes meanwhile; `path` is then where it really is.
    pub fn open(path: &Path) -> Result<Self, CgroupError> {
        let io = |source| CgroupError::Io {
            path: path.to_owned(),
            source,
        };
        // O_DIRECTORY fails on anything else before opening it (a FIFO's open would block).
        let dir = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(path)
        {
            Ok(dir) => dir,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CgroupError::NotFound {
                    path: path.to_owned(),
                })
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                return Err(CgroupError::NotADirectory {
                    path: path.to_owned(),
                })
            }
            Err(e) => return Err(io(e)),
        };
        let fs_type = fstatfs(&dir).map_err(|e| io(e.into()))?.filesystem_type();
        if fs_type != CGROUP2_SUPER_MAGIC {
            let cgroup2 = cgroup2_mount()
                .map(|mount| mount.display().to_string())
                .unwrap_or_else(|_| "nowhere".to_owned());
            let path = path.to_owned();
            return Err(if fs_type == CGROUP_SUPER_MAGIC {
                CgroupError::CgroupV1 { path, cgroup2 }
            } else {
                CgroupError::NotCgroup2 { path, cgroup2 }
            });
        }
        if fstatat(&dir, "cgroup.procs", AtFlags::AT_SYMLINK_NOFOLLOW).is_err() {
            return Err(CgroupError::NoProcs {
                path: path.to_owned(),
            });
        }
        let id = dir.metadata().map_err(io)?.ino();
        let path = fs::read_link(format!("/proc/self/fd/{}", dir.as_raw_fd())).map_err(io)?;
        Ok(Self { path, id, dir })
    }
}

/// Where the cgroup v2 hierarchy is mounted (hybrid layouts put it below /sys/fs/cgroup).
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").map_err(|source| CgroupError::Io {
            path: "/proc/self/mountinfo".into(),
            source,
        })?;
    cgroup2_mount_in(&mountinfo).ok_or(CgroupError::NoCgroup2Mount)
}

/// The first cgroup2 mount point in a mountinfo text (proc(5): the mount point is field 5,
/// the filesystem type the first field after the " - " separator).
fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (mount_fields, fs_fields) = line.split_once(" - ")?;
        let mount_point = mount_fields.split(' ').nth(4)?;
        (fs_fields.split(' ').next()? == "cgroup2")
            .then(|| PathBuf::from(unescape_octal(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        match rest
            .get(at + 1..at + 4)
            .and_then(|digits| u8::from_str_radix(digits, 8).ok())
        {
            Some(byte) => {
                out.push(char::from(byte));
                rest = &rest[at + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[at + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The paths of the cgroups with these ids below `mount` (those that still exist), in one
/// walk of the hierarchy that stops once all are found.
pub fn paths_by_id(mount: &Path, ids: &[u64]) -> HashMap<u64, PathBuf> {
    let mut found = HashMap::new();
    let mut pending = vec![mount.to_owned()];
    while let Some(dir) = pending.pop() {
        if found.len() == ids.len() {
            break;
        }
        if let Ok(metadata) = fs::metadata(&dir) {
            if ids.contains(&metadata.ino()) {
                found.insert(metadata.ino(), dir.clone());
            }
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        pending.extend(
            entries
                .filter_map(Result::ok)
                .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
                .map(|entry| entry.path()),
        );
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
24 30 0:22 / /sys rw,nosuid shared:7 - sysfs sysfs rw
35 24 0:30 / /sys/fs/cgroup ro shared:9 - tmpfs tmpfs ro,mode=755
36 35 0:31 / /sys/fs/cgroup/unified rw shared:10 - cgroup2 cgroup2 rw
37 35 0:32 / /sys/fs/cgroup/cpu rw shared:11 - cgroup cgroup rw,cpu
";

    #[test]
    fn finds_the_cgroup2_mount_in_a_hybrid_layout() {
        assert_eq!(
            cgroup2_mount_in(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn no_cgroup2_mount_is_none() {
        let v1_only: String = HYBRID
            .lines()
            .filter(|l| !l.contains("cgroup2"))
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(cgroup2_mount_in(&v1_only), None);
    }

    #[test]
    fn mount_points_with_escaped_spaces() {
        let line = "36 35 0:31 / /mnt/my\\040cgroups rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount_in(line),
            Some(PathBuf::from("/mnt/my cgroups"))
        );
    }
}
