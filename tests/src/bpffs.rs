//! The bpf filesystem and a per-test pin root under it.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use nix::mount::{mount, MsFlags};
use nix::sys::statfs::statfs;

use crate::names::{stale_entries, unique_name};
use crate::tools::redirector;

pub const BPFFS_MOUNT: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Whether `path` lies on a bpf filesystem.
pub fn is_bpffs(path: &Path) -> Result<bool> {
    let stats = statfs(path).with_context(|| format!("statfs {}", path.display()))?;
    Ok(stats.filesystem_type().0 as i64 == BPF_FS_MAGIC)
}

/// Mount bpffs at /sys/fs/bpf unless it already is (this machine does not mount it at boot).
pub fn ensure_bpffs_mounted() -> Result<()> {
    // Serialised so that parallel tests cannot stack two mounts.
    static MOUNTING: Mutex<()> = Mutex::new(());
    let _serialised = MOUNTING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let mount_point = Path::new(BPFFS_MOUNT);
    if is_bpffs(mount_point)? {
        return Ok(());
    }
    mount(
        Some("bpf"),
        mount_point,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("mounting bpffs at {BPFFS_MOUNT}"))?;
    if !is_bpffs(mount_point)? {
        bail!("{BPFFS_MOUNT} is still not bpffs after mounting it");
    }
    Ok(())
}

/// A unique pin root for one test, `/sys/fs/bpf/rdt-...`. redirector creates it; on drop
/// `redirector uninstall --bpffs ROOT` detaches everything and whatever is left is removed.
#[derive(Debug)]
pub struct BpfRoot {
    path: PathBuf,
}

impl BpfRoot {
    /// Reserve a fresh root (not created: creating it is redirector's job).
    pub fn create(tag: &str) -> Result<BpfRoot> {
        ensure_bpffs_mounted()?;
        Ok(BpfRoot {
            path: Path::new(BPFFS_MOUNT).join(unique_name(tag)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Everything below the root that is not a directory (pins), sorted; empty if the root does
    /// not exist.
    pub fn files(&self) -> Result<Vec<PathBuf>> {
        files_below(&self.path)
    }

    /// Uninstall and remove roots left by test runs that were killed before cleaning up.
    pub(crate) fn sweep_stale() {
        for path in stale_entries(Path::new(BPFFS_MOUNT)) {
            drop(BpfRoot { path });
        }
    }
}

impl Drop for BpfRoot {
    fn drop(&mut self) {
        if !self.path.exists() {
            return; // never created: redirector has nothing pinned here
        }
        let root = self.path.as_os_str();
        match redirector([std::ffi::OsStr::new("uninstall"), "--bpffs".as_ref(), root]) {
            Ok(output) if output.success() => {}
            Ok(output) => eprintln!(
                "cleanup: `{}` failed ({}): {}",
                output.command_line,
                output.status,
                output.stderr.trim()
            ),
            Err(error) => eprintln!("cleanup: uninstall of {}: {error:#}", self.path.display()),
        }
        // Unlinking pins that uninstall left releases what they held.
        if self.path.exists() {
            if let Err(error) = std::fs::remove_dir_all(&self.path) {
                eprintln!("cleanup: removing {}: {error}", self.path.display());
            }
        }
    }
}

/// Non-directory entries below `dir`, recursively and sorted; empty if `dir` does not exist.
pub fn files_below(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        let entries = match std::fs::read_dir(&current) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => {
                return Err(error).with_context(|| format!("listing {}", current.display()))
            }
        };
        for entry in entries {
            let entry = entry.with_context(|| format!("listing {}", current.display()))?;
            if entry.file_type()?.is_dir() {
                pending.push(entry.path());
            } else {
                files.push(entry.path());
            }
        }
    }
    files.sort();
    Ok(files)
}
