//! Unique names for the objects a test creates, a temporary directory guard, and a guard for the
//! folders a runtime makes outside it.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result};

/// Every name made here starts with this, so leftovers of the harness are recognisable.
pub const PREFIX: &str = "rdt";

static NEXT_ID: AtomicU32 = AtomicU32::new(0);
static NEXT_SUBNET: AtomicU32 = AtomicU32::new(0);

/// `rdt-<pid>-<n>-<tag>`: unique within this process by the counter, across processes by the pid.
/// The tag is only there to tell a human which test made the object.
pub fn unique_name(tag: &str) -> String {
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let tag: String = tag
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(16)
        .collect::<String>()
        .to_ascii_lowercase();
    format!("{PREFIX}-{}-{n}-{tag}", std::process::id())
}

/// The third octet of a fresh 10.200.X.0/24 subnet. Subnets only live inside the test's own
/// namespaces, so they just need to differ between the pods of one test process.
pub fn next_subnet() -> u8 {
    (NEXT_SUBNET.fetch_add(1, Ordering::Relaxed) % 254 + 1) as u8
}

/// True for a name made by [`unique_name`] in a process that no longer exists: a leftover of a
/// run that was killed before its guards could clean up.
pub fn is_stale(name: &str) -> bool {
    let Some(rest) = name
        .strip_prefix(PREFIX)
        .and_then(|rest| rest.strip_prefix('-'))
    else {
        return false;
    };
    let Some(Ok(pid)) = rest.split('-').next().map(str::parse::<u32>) else {
        return false;
    };
    !is_running(pid)
}

/// Whether process `pid` exists and is not a zombie (a killed test run can stay a zombie for a
/// while when its new parent is slow to reap it).
fn is_running(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name, which may itself contain ") ".
    let state = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next());
    !matches!(state, None | Some('Z') | Some('X'))
}

/// Names of the entries of `dir` that [`is_stale`] recognises (nothing if `dir` cannot be read).
pub fn stale_entries(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok())
        .filter(|entry| is_stale(&entry.file_name().to_string_lossy()))
        .map(|entry| entry.path())
        .collect()
}

/// A fresh directory (under the system temp dir unless told), removed with its content on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn create(tag: &str) -> Result<TempDir> {
        Self::create_in(&std::env::temp_dir(), tag)
    }

    /// A fresh directory under `parent` instead of the system temp dir.
    pub fn create_in(parent: &Path, tag: &str) -> Result<TempDir> {
        let path = parent.join(unique_name(tag));
        std::fs::create_dir(&path)
            .with_context(|| format!("creating temp dir {}", path.display()))?;
        Ok(TempDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_dir_all(&self.path) {
            eprintln!(
                "cleanup: removing temp dir {}: {error}",
                self.path.display()
            );
        }
    }
}

/// Folders a runtime makes outside its own directories whatever its flags (e.g. the socket folder
/// of containerd's shims): those that did not exist when the guard was made are removed when it
/// is dropped.
#[derive(Debug)]
pub struct DirsMadeOutside {
    made: Vec<OutsideDir>,
}

/// A folder [`DirsMadeOutside`] watches, and what the runtime leaves in it.
#[derive(Debug, Clone, Copy)]
pub struct OutsideDir {
    pub path: &'static str,
    /// Removed with what is in it (a cache the runtime made); otherwise only once empty, since a
    /// runtime of the machine may have started meanwhile and put its own things there.
    pub with_content: bool,
}

impl DirsMadeOutside {
    /// Those of `dirs` (children before their parents) that do not exist now.
    pub fn absent(dirs: &[OutsideDir]) -> DirsMadeOutside {
        DirsMadeOutside {
            made: dirs
                .iter()
                .copied()
                .filter(|dir| !Path::new(dir.path).exists())
                .collect(),
        }
    }

    /// The folders it removes when dropped.
    pub fn paths(&self) -> Vec<&'static str> {
        self.made.iter().map(|dir| dir.path).collect()
    }
}

impl Drop for DirsMadeOutside {
    fn drop(&mut self) {
        for dir in &self.made {
            let removed = if dir.with_content {
                std::fs::remove_dir_all(dir.path)
            } else {
                std::fs::remove_dir(dir.path)
            };
            if let Err(error) = removed {
                // Gone already, or still used by a runtime of the machine: nothing to remove.
                let expected = error.kind() == ErrorKind::NotFound
                    || (!dir.with_content && error.kind() == ErrorKind::DirectoryNotEmpty);
                if !expected {
                    eprintln!("cleanup: removing {}: {error}", dir.path);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_differ_and_carry_the_pid() {
        let first = unique_name("My Test!");
        let second = unique_name("My Test!");
        assert_ne!(first, second);
        assert!(
            first.starts_with(&format!("rdt-{}-", std::process::id())),
            "{first}"
        );
        assert!(first.ends_with("-mytest"), "{first}");
        assert!(!is_stale(&first), "own names are not stale");
    }

    #[test]
    fn names_of_dead_processes_are_stale() {
        // Pids are capped well below this (pid_max is at most 2^22).
        assert!(is_stale("rdt-99999999-0-x"));
        assert!(!is_stale("redirector"));
        assert!(!is_stale("rdt-notapid-0-x"));
    }
}
