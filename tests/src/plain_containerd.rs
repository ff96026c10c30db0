//! A private containerd without its CRI plugin, for running an image with `ctr run` (the image
//! suite: a binary in an otherwise empty root filesystem, no pod, no network). The pods of the
//! runtime suites use [`crate::containerd`], which drives containerd as kubelet does. Its own
//! root, state and socket under a temp dir, stopped and removed by its guard; it shares nothing
//! with a containerd the machine may run.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::signal::Signal;

use crate::cgroup::Cgroup;
use crate::containerd::CgroupV1Mirror;
use crate::names::{DirsMadeOutside, OutsideDir, TempDir};
use crate::process::{run, wait_for, Child, Output};

/// Starting containerd and importing or running a small image, on a loaded machine.
const CONTAINERD_TIMEOUT: Duration = Duration::from_secs(60);
/// The namespace of containerd that the tests' images and containers live in.
const NAMESPACE: &str = "redirector-test";

/// Where containerd's shims put their sockets whatever the state dir (`/run/containerd/s`), and
/// its parent: removed at the end when this containerd made them (and they are empty). A
/// containerd that dockerd starts puts them there too.
pub const SHIM_SOCKET_DIRS: &[OutsideDir] = &[
    OutsideDir {
        path: "/run/containerd/s",
        with_content: false,
    },
    OutsideDir {
        path: "/run/containerd",
        with_content: false,
    },
];

/// A running private containerd; dropping it stops containerd and removes its folders.
pub struct Containerd {
    // Declared before `dir` and the cgroups, so it is stopped before they are removed.
    process: Option<Child>,
    socket: PathBuf,
    dir: TempDir,
    /// The containers' parent cgroup (runc's default, `/<namespace>/<id>`, would stay behind in
    /// every hierarchy), and its twins in the v1 hierarchies of a hybrid host.
    _cgroups_v1: CgroupV1Mirror,
    cgroups: Cgroup,
    /// Those of [`SHIM_SOCKET_DIRS`] that did not exist before.
    _made_shim_dirs: DirsMadeOutside,
}

impl Containerd {
    /// Starts containerd with its root, state, socket and config in a fresh temp dir and waits
    /// until it answers.
    pub fn start() -> Result<Containerd> {
        let dir = TempDir::create("containerd")?;
        let cgroups = Cgroup::create_root("ctr")?;
        let cgroups_v1 = CgroupV1Mirror::of(&cgroups)?;
        let socket = dir.path().join("containerd.sock");
        let config = dir.path().join("config.toml");
        std::fs::write(&config, config_toml(dir.path(), &socket))
            .with_context(|| format!("writing {}", config.display()))?;
        let mut command = Command::new("containerd");
        command.arg("--config").arg(&config);
        let made_shim_dirs = DirsMadeOutside::absent(SHIM_SOCKET_DIRS);
        let containerd = Containerd {
            process: Some(Child::spawn("containerd", command)?),
            socket,
            dir,
            _cgroups_v1: cgroups_v1,
            cgroups,
            _made_shim_dirs: made_shim_dirs,
        };
        wait_for("containerd to answer", CONTAINERD_TIMEOUT, || {
            if let Some(process) = &containerd.process {
                process.ensure_running()?;
            }
            Ok(containerd.ctr(["version"])?.success().then_some(()))
        })?;
        Ok(containerd)
    }

    /// `ctr --address SOCKET --namespace redirector-test ARGS...`; a non-zero exit is returned,
    /// not an error.
    pub fn ctr<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = Command::new("ctr");
        command
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", NAMESPACE])
            .args(args);
        run("ctr", command, CONTAINERD_TIMEOUT)
    }

    /// `ctr run --rm` of `image` as container `id`, with `env` (`NAME=value`) and `args` (the
    /// image's entrypoint and command when empty); its output, whatever its exit status. The
    /// container's FIFOs and runc's state stay in this containerd's folder.
    pub fn run(&self, image: &str, id: &str, env: &[&str], args: &[&str]) -> Result<Output> {
        let mut command: Vec<OsString> = vec!["run".into(), "--rm".into()];
        command.extend(["--fifo-dir".into(), self.dir.path().join("fifo").into()]);
        command.extend(["--runc-root".into(), self.dir.path().join("runc").into()]);
        let cgroup = CgroupV1Mirror::cgroup_parent(&self.cgroups.path().join(id))?;
        command.extend(["--cgroup".into(), cgroup.into()]);
        for variable in env {
            command.extend(["--env".into(), variable.into()]);
        }
        command.extend([image.into(), id.into()]);
        command.extend(args.iter().map(OsString::from));
        self.ctr(command)
    }

    /// Imports an image archive (OCI layout or `docker save`) and returns the names it gave.
    pub fn import(&self, archive: &Path) -> Result<Vec<String>> {
        self.ctr([OsStr::new("images"), "import".as_ref(), archive.as_os_str()])?
            .ensure_success()?;
        let listed = self.ctr(["images", "list", "--quiet"])?.ensure_success()?;
        Ok(listed.stdout.lines().map(str::to_owned).collect())
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(process) = self.process.take() {
            // SIGTERM lets containerd close its databases; the guard kills it past the wait.
            let stopped = process
                .signal(Signal::SIGTERM)
                .and_then(|()| process.wait_exit(CONTAINERD_TIMEOUT));
            if let Err(error) = stopped {
                eprintln!("cleanup: stopping containerd: {error:#}");
            }
        }
    }
}

/// Everything containerd writes goes below `dir`: no CRI (nothing here is Kubernetes), no
/// `/opt/containerd` (the opt plugin), no debug or metrics endpoint.
fn config_toml(dir: &Path, socket: &Path) -> String {
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.internal.v1.opt"]

[grpc]
  address = "{socket}"

[debug]
  address = ""

[metrics]
  address = ""
"#,
        root = dir.join("root").display(),
        state = dir.join("state").display(),
        socket = socket.display(),
    )
}
