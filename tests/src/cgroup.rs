//! cgroup v2 directories for pods, found through /proc/self/mountinfo.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::names::{stale_entries, unique_name};
use crate::process::wait_for;

const EMPTY_TIMEOUT: Duration = Duration::from_secs(60);

/// One line of /proc/self/mountinfo: where a filesystem of which type is mounted.
struct Mount {
    mount_point: PathBuf,
    fstype: String,
}

fn mounts() -> Result<Vec<Mount>> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(text.lines().filter_map(parse_mountinfo_line).collect())
}

/// Field 5 is the mount point; the filesystem type follows the " - " separator.
fn parse_mountinfo_line(line: &str) -> Option<Mount> {
    let (mount_fields, fs_fields) = line.split_once(" - ")?;
    let mount_point = mount_fields.split(' ').nth(4)?;
    let fstype = fs_fields.split(' ').next()?;
    Some(Mount {
        mount_point: PathBuf::from(unescape_octal(mount_point)),
        fstype: fstype.to_owned(),
    })
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes.get(i + 1..i + 4).and_then(|digits| {
            std::str::from_utf8(digits)
                .ok()
                .and_then(|digits| u8::from_str_radix(digits, 8).ok())
        });
        match (bytes[i], escaped) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup2 mount point (on hybrid layouts it is not /sys/fs/cgroup itself).
pub fn cgroup2_mount() -> Result<PathBuf> {
    static MOUNT: OnceLock<PathBuf> = OnceLock::new();
    if let Some(path) = MOUNT.get() {
        return Ok(path.clone());
    }
    let found = mounts()?
        .into_iter()
        .find(|mount| mount.fstype == "cgroup2")
        .map(|mount| mount.mount_point)
        .context("no cgroup2 filesystem in /proc/self/mountinfo")?;
    Ok(MOUNT.get_or_init(|| found).clone())
}

/// Mount points of cgroup v1 hierarchies (e.g. /sys/fs/cgroup/cpu on a hybrid layout).
pub fn cgroup_v1_mounts() -> Result<Vec<PathBuf>> {
    Ok(mounts()?
        .into_iter()
        .filter(|mount| mount.fstype == "cgroup")
        .map(|mount| mount.mount_point)
        .collect())
}

/// A cgroup v2 directory. On drop every process in it and below is killed, and the directories
/// are removed bottom-up, so a parent guard also cleans children whose guards are gone.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// A fresh top-level test cgroup directly under the cgroup2 mount.
    pub fn create_root(tag: &str) -> Result<Cgroup> {
        let path = cgroup2_mount()?.join(unique_name(tag));
        Self::create_at(path)
    }

    /// A child cgroup `name` below this one.
    pub fn child(&self, name: &str) -> Result<Cgroup> {
        Self::create_at(self.path.join(name))
    }

    /// A cgroup `relative` below this one, creating the levels in between; they are left to
    /// this guard to remove (as kubelet's kubepods levels outlive a pod).
    pub fn descendant(&self, relative: &Path) -> Result<Cgroup> {
        let path = self.path.join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating cgroups down to {}", parent.display()))?;
        }
        Self::create_at(path)
    }

    fn create_at(path: PathBuf) -> Result<Cgroup> {
        std::fs::create_dir(&path)
            .with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Cgroup { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cgroup id, which on cgroup2 is the inode number of its directory.
    pub fn id(&self) -> Result<u64> {
        Ok(std::fs::metadata(&self.path)
            .with_context(|| format!("stat of cgroup {}", self.path.display()))?
            .ino())
    }

    /// Pids of the processes directly in this cgroup.
    pub fn pids(&self) -> Result<Vec<i32>> {
        read_pids(&self.path)
    }

    /// Remove test cgroups left by runs that were killed before cleaning up.
    pub(crate) fn sweep_stale() {
        if let Ok(mount) = cgroup2_mount() {
            for path in stale_entries(&mount) {
                drop(Cgroup { path });
            }
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if !self.path.exists() {
            return; // removed with a parent guard already
        }
        if let Err(error) = empty_and_remove(&self.path) {
            eprintln!(
                "cleanup: removing cgroup {}: {error:#}",
                self.path.display()
            );
        }
    }
}

fn read_pids(dir: &Path) -> Result<Vec<i32>> {
    let procs = dir.join("cgroup.procs");
    let text =
        std::fs::read_to_string(&procs).with_context(|| format!("reading {}", procs.display()))?;
    Ok(text
        .lines()
        .filter_map(|line| line.trim().parse().ok())
        .collect())
}

/// This directory and all cgroup directories below it, parents before children.
fn subtree(dir: &Path) -> Vec<PathBuf> {
    let mut found = vec![dir.to_path_buf()];
    let mut next = 0;
    while next < found.len() {
        if let Ok(entries) = std::fs::read_dir(&found[next]) {
            found.extend(
                entries
                    .filter_map(|entry| entry.ok())
                    .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
                    .map(|entry| entry.path()),
            );
        }
        next += 1;
    }
    found
}

/// Kill every process in the subtree (again each round, in case one forked meanwhile) until none
/// is left, then remove the directories, children first.
fn empty_and_remove(dir: &Path) -> Result<()> {
    let cgroups = subtree(dir);
    wait_for(
        &format!("cgroup {} to have no processes", dir.display()),
        EMPTY_TIMEOUT,
        || {
            let mut any = false;
            for cgroup in &cgroups {
                for pid in read_pids(cgroup).unwrap_or_default() {
                    any = true;
                    match kill(Pid::from_raw(pid), Signal::SIGKILL) {
                        Ok(()) | Err(Errno::ESRCH) => {}
                        Err(error) => bail!("killing pid {pid} in {}: {error}", cgroup.display()),
                    }
                }
            }
            Ok((!any).then_some(()))
        },
    )?;
    // Killed processes leave cgroup.procs at once but keep the cgroup populated (and rmdir
    // failing with EBUSY) until they have exited, which takes a while for one that closes tens of
    // thousands of sockets.
    wait_for(
        &format!("cgroup {} to be unpopulated", dir.display()),
        EMPTY_TIMEOUT,
        || {
            let events = dir.join("cgroup.events");
            let text = std::fs::read_to_string(&events)
                .with_context(|| format!("reading {}", events.display()))?;
            Ok(text.lines().any(|line| line == "populated 0").then_some(()))
        },
    )?;
    for cgroup in cgroups.iter().rev() {
        std::fs::remove_dir(cgroup).with_context(|| format!("rmdir {}", cgroup.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_lines() {
        let line = "35 24 0:30 / /sys/fs/cgroup/unified rw,nosuid shared:9 - cgroup2 cgroup2 rw";
        let mount = parse_mountinfo_line(line).unwrap();
        assert_eq!(mount.mount_point, Path::new("/sys/fs/cgroup/unified"));
        assert_eq!(mount.fstype, "cgroup2");

        let escaped = "36 24 0:31 / /mnt/with\\040space rw - tmpfs tmpfs rw";
        assert_eq!(
            parse_mountinfo_line(escaped).unwrap().mount_point,
            Path::new("/mnt/with space")
        );
    }
}
