//! Debian's podman with a store of its own, for loading and running an image archive (the image
//! suite). Its root, runroot, libpod tmpdir and network configs are under a temp dir and its
//! containers' cgroups under a test cgroup, all removed by its guard: it shares nothing with a
//! podman or CRI-O the machine may have. The one thing podman 4.3 writes elsewhere whatever its
//! flags, its blob info cache, is removed too when the store made it.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Result};

use crate::cgroup::Cgroup;
use crate::containerd::{unmount_below, CgroupV1Mirror};
use crate::names::TempDir;
use crate::process::{run, Output};

pub const PODMAN: &str = "/usr/bin/podman";
/// Loading or running a small image, on a loaded machine.
const PODMAN_TIMEOUT: Duration = Duration::from_secs(60);
/// Where podman 4.3 keeps root's blob info cache, not below `--root` (later versions put it
/// there).
pub const BLOB_INFO_CACHE: &str = "/var/lib/containers/cache";
/// Its parent, removed (when empty) if the store made it.
const BLOB_INFO_CACHE_PARENT: &str = "/var/lib/containers";

/// A private podman store; dropping it removes its containers, mounts, cgroups and folders.
pub struct Podman {
    // The cgroups go before the folder, after the guard's own cleanup has removed containers.
    _cgroups_v1: CgroupV1Mirror,
    cgroups: Cgroup,
    dir: TempDir,
    /// The blob info cache and its parent, where they did not exist before.
    made_outside: Vec<&'static str>,
}

impl Podman {
    pub fn new() -> Result<Podman> {
        ensure!(
            Path::new(PODMAN).is_file(),
            "{PODMAN} is missing: install Debian's podman (`cargo xtask setup` does)"
        );
        let cgroups = Cgroup::create_root("podman")?;
        Ok(Podman {
            _cgroups_v1: CgroupV1Mirror::of(&cgroups)?,
            cgroups,
            dir: TempDir::create("podman")?,
            made_outside: [BLOB_INFO_CACHE, BLOB_INFO_CACHE_PARENT]
                .into_iter()
                .filter(|dir| !Path::new(dir).exists())
                .collect(),
        })
    }

    /// The folder of its store, gone once it is dropped.
    pub fn path(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    /// The cgroup2 directory its containers run below, gone once it is dropped.
    pub fn cgroup(&self) -> PathBuf {
        self.cgroups.path().to_owned()
    }

    /// `podman` on the private store with `args`; a non-zero exit is returned, not an error.
    pub fn podman<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let dir = self.dir.path();
        let mut command = Command::new(PODMAN);
        command
            .arg("--root")
            .arg(dir.join("root"))
            .arg("--runroot")
            .arg(dir.join("runroot"))
            .arg("--tmpdir")
            .arg(dir.join("tmp"))
            .arg("--network-config-dir")
            .arg(dir.join("networks"))
            // Plain directories: no overlay mount of the store to leave behind.
            .args(["--storage-driver", "vfs"])
            // No systemd to manage cgroups, no journald for events.
            .args(["--cgroup-manager", "cgroupfs", "--events-backend", "none"])
            .args(args);
        run("podman", command, PODMAN_TIMEOUT)
    }

    /// `podman load` of an image archive; the names of the store's images afterwards.
    pub fn load(&self, archive: &Path) -> Result<Vec<String>> {
        self.podman([OsStr::new("load"), "--input".as_ref(), archive.as_os_str()])?
            .ensure_success()?;
        let listed = self
            .podman(["images", "--format", "{{.Repository}}:{{.Tag}}"])?
            .ensure_success()?;
        Ok(listed.stdout.lines().map(str::to_owned).collect())
    }

    /// `podman run --rm` of `image` with no network, `args` after the image's entrypoint, in a
    /// cgroup below the test's; its output, whatever its exit status. podman's default limits
    /// for root (1048576 open files, 4194304 processes) are above the hard limits a root without
    /// CAP_SYS_RESOURCE (CI's) may set, and runc fails: small ones instead.
    pub fn run(&self, image: &str, args: &[&str]) -> Result<Output> {
        let parent = CgroupV1Mirror::cgroup_parent(self.cgroups.path())?;
        let mut command: Vec<OsString> = [
            "run",
            "--rm",
            "--network",
            "none",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            "--cgroup-parent",
        ]
        .map(OsString::from)
        .to_vec();
        command.extend([parent.into(), image.into()]);
        command.extend(args.iter().map(OsString::from));
        self.podman(command)
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // A container a failed run left, with its mounts.
        match self.podman(["rm", "--all", "--force"]) {
            Ok(output) if !output.success() => {
                eprintln!("cleanup: podman rm: {}", output.stderr.trim())
            }
            Err(error) => eprintln!("cleanup: podman rm: {error:#}"),
            Ok(_) => {}
        }
        if let Err(error) = unmount_below(self.dir.path()) {
            eprintln!("cleanup: podman's mounts: {error:#}");
        }
        for dir in &self.made_outside {
            let removed = if *dir == BLOB_INFO_CACHE {
                std::fs::remove_dir_all(dir)
            } else {
                // Only when empty: a podman of the machine may have started meanwhile.
                std::fs::remove_dir(dir)
            };
            if let Err(error) = removed {
                eprintln!("cleanup: removing {dir}: {error}");
            }
        }
    }
}
