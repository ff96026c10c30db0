//! Debian's podman with a store of its own, for loading and running an image archive (the image
//! suite). Its root, runroot, libpod tmpdir and network configs are under a temp dir and its
//! containers' cgroups under a test cgroup, all removed by its guard: it shares nothing with a
//! podman or CRI-O the machine may have. The one thing podman 4.3 writes elsewhere whatever its
//! flags, its blob info cache, is removed too when the store made it.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Result};

use crate::cgroup::Cgroup;
use crate::container_cli::ContainerCli;
use crate::containerd::{unmount_below, CgroupV1Mirror};
use crate::names::{DirsMadeOutside, OutsideDir, TempDir};
use crate::process::{run, Output};

pub const PODMAN: &str = "/usr/bin/podman";
/// Loading or running a small image, on a loaded machine.
const PODMAN_TIMEOUT: Duration = Duration::from_secs(60);
/// Where podman 4.3 keeps root's blob info cache, not below `--root` (later versions put it
/// there).
pub const BLOB_INFO_CACHE: &str = "/var/lib/containers/cache";
/// The cache and its parent, removed (the parent when empty) if the store made them.
const BLOB_INFO_CACHE_DIRS: &[OutsideDir] = &[
    OutsideDir {
        path: BLOB_INFO_CACHE,
        with_content: true,
    },
    OutsideDir {
        path: "/var/lib/containers",
        with_content: false,
    },
];

/// A private podman store; dropping it removes its containers, mounts, cgroups and folders.
pub struct Podman {
    // The cgroups go before the folder, after the guard's own cleanup has removed containers.
    _cgroups_v1: CgroupV1Mirror,
    cgroups: Cgroup,
    dir: TempDir,
    /// The blob info cache and its parent, where they did not exist before.
    _made_outside: DirsMadeOutside,
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
            _made_outside: DirsMadeOutside::absent(BLOB_INFO_CACHE_DIRS),
        })
    }

    /// `podman` on the private store with `args`; a non-zero exit is returned, not an error.
    fn podman<I, S>(&self, args: I) -> Result<Output>
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
}

impl ContainerCli for Podman {
    fn cli(&self, args: &[&OsStr]) -> Result<Output> {
        self.podman(args)
    }

    fn path(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    fn cgroup(&self) -> PathBuf {
        self.cgroups.path().to_owned()
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
    }
}
