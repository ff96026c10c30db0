//! What podman and docker share for the image suite: the same commands load an image archive
//! and run an image, each engine on a store of the test's own with its containers' cgroups
//! below a test cgroup.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::containerd::CgroupV1Mirror;
use crate::process::Output;

/// An engine with a private store, driven through its command line.
pub trait ContainerCli {
    /// The engine's command on its private store with `args`; a non-zero exit is returned, not
    /// an error.
    fn cli(&self, args: &[&OsStr]) -> Result<Output>;

    /// The folder of its store, gone once it is dropped.
    fn path(&self) -> PathBuf;

    /// The cgroup2 directory its containers run below, gone once it is dropped.
    fn cgroup(&self) -> PathBuf;

    /// `load` of an image archive; the names of the store's images afterwards.
    fn load(&self, archive: &Path) -> Result<Vec<String>> {
        self.cli(&[OsStr::new("load"), "--input".as_ref(), archive.as_os_str()])?
            .ensure_success()?;
        let listed = self
            .cli(&[
                OsStr::new("images"),
                "--format".as_ref(),
                "{{.Repository}}:{{.Tag}}".as_ref(),
            ])?
            .ensure_success()?;
        Ok(listed.stdout.lines().map(str::to_owned).collect())
    }

    /// `run --rm` of `image` with no network, `args` after the image's entrypoint, in a cgroup
    /// below [`ContainerCli::cgroup`]; its output, whatever its exit status. podman's default
    /// limits for root (1048576 open files, 4194304 processes) are above the hard limits a root
    /// without CAP_SYS_RESOURCE (CI's) may set, and runc fails: small ones instead, for both.
    fn run(&self, image: &str, args: &[&str]) -> Result<Output> {
        let parent = CgroupV1Mirror::cgroup_parent(&self.cgroup())?;
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
        let command: Vec<&OsStr> = command.iter().map(OsString::as_os_str).collect();
        self.cli(&command)
    }
}
