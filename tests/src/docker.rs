//! Debian's dockerd, private to one test, for loading and running an image archive (the image
//! suite). Its data root, exec root (runtime state, its containerd's socket and state, the
//! containers' network namespace files), pid file, socket, daemon config and trust key are under
//! a temp dir; the client's config too. It runs in a network namespace of its own, with no bridge
//! and without touching iptables or IP forwarding, and in a test cgroup with the containerd it
//! starts and that containerd's shims; its containers' cgroups are below that test cgroup. Its
//! guard stops it with SIGTERM and removes everything: it shares nothing with a docker the
//! machine may run. What it makes elsewhere whatever its flags (see [`MADE_OUTSIDE`]) is removed
//! when it made it.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use nix::sys::signal::Signal;

use crate::cgroup::Cgroup;
use crate::container_cli::ContainerCli;
use crate::containerd::{unmount_below, CgroupV1Mirror};
use crate::names::{DirsMadeOutside, OutsideDir, TempDir};
use crate::netns::Netns;
use crate::plain_containerd::SHIM_SOCKET_DIRS;
use crate::process::{binary, run, wait_for, Child, Output};

/// Debian's, by path: the machine may have another docker client earlier in PATH.
pub const DOCKERD: &str = "/usr/sbin/dockerd";
pub const DOCKER: &str = "/usr/bin/docker";
/// Starting dockerd, loading or running a small image, stopping dockerd, on a loaded machine.
const DOCKER_TIMEOUT: Duration = Duration::from_secs(60);
const STOPPED_CHILDREN_TIMEOUT: Duration = Duration::from_secs(10);
/// Where dockerd 20.10 keeps its state, socket and trust key when not told otherwise: the test
/// checks that those absent before are absent after.
pub const DEFAULT_PATHS: &[&str] = &[
    "/var/lib/docker",
    "/run/docker",
    "/run/docker.sock",
    "/run/docker.pid",
    "/etc/docker/key.json",
];
/// What dockerd makes outside its temp dir whatever its flags, removed when it made them:
/// its plugin socket folder, the folders of the opt plugin of the containerd it starts (which
/// has no setting for it), and the shims' socket folders.
const MADE_OUTSIDE: &[OutsideDir] = &[
    OutsideDir {
        path: "/run/docker/plugins",
        with_content: false,
    },
    OutsideDir {
        path: "/run/docker",
        with_content: false,
    },
    OutsideDir {
        path: "/opt/containerd",
        with_content: true,
    },
    SHIM_SOCKET_DIRS[0],
    SHIM_SOCKET_DIRS[1],
];
/// The cgroup dockerd's containers go below when not told otherwise, in every hierarchy.
pub const DEFAULT_CGROUP_PARENT: &str = "docker";

/// A running private dockerd; dropping it removes its containers, stops it and removes its
/// processes, mounts, cgroups, network namespace and folders.
pub struct Docker {
    // Declared first: stopped (in `drop`) before the cgroups and folders go.
    process: Option<Child>,
    socket: PathBuf,
    /// dockerd, its containerd and the shims.
    daemon_cgroup: Cgroup,
    /// The containers' parent (and the daemon's); its guard kills what is left in either before
    /// the twins in the v1 hierarchies go.
    cgroups: Cgroup,
    _cgroups_v1: CgroupV1Mirror,
    _netns: Netns,
    dir: TempDir,
    made_outside: DirsMadeOutside,
}

impl Docker {
    /// Starts dockerd on a fresh temp dir and waits until it answers.
    pub fn start() -> Result<Docker> {
        for program in [DOCKERD, DOCKER] {
            ensure!(
                Path::new(program).is_file(),
                "{program} is missing: install Debian's docker.io (`cargo xtask setup` does)"
            );
        }
        let dir = TempDir::create("docker")?;
        let netns = Netns::create("docker")?;
        let cgroups = Cgroup::create_root("docker")?;
        let cgroups_v1 = CgroupV1Mirror::of(&cgroups)?;
        let daemon_cgroup = cgroups.child("dockerd")?;
        let made_outside = DirsMadeOutside::absent(MADE_OUTSIDE);
        let socket = dir.path().join("docker.sock");
        // Not /etc/docker/daemon.json, which may say anything. The trust key dockerd 20.10
        // writes (else /etc/docker/key.json) has no flag, only this setting.
        let config = dir.path().join("daemon.json");
        let settings = serde_json::json!({
            "deprecated-key-path": dir.path().join("key.json"),
        });
        std::fs::write(&config, settings.to_string())
            .with_context(|| format!("writing {}", config.display()))?;

        let mut command = Command::new(binary("e2e-helper")?);
        command
            .args(["exec", "--netns", netns.name(), "--cgroup"])
            .arg(daemon_cgroup.path())
            .args(["--", DOCKERD, "--config-file"])
            .arg(&config)
            .arg("--data-root")
            .arg(dir.path().join("data"))
            .arg("--exec-root")
            .arg(dir.path().join("exec"))
            .arg("--pidfile")
            .arg(dir.path().join("docker.pid"))
            .arg("--host")
            .arg(format!("unix://{}", socket.display()))
            // No docker0, no NAT or filter rules, no forwarding turned on (in its own netns
            // anyway).
            .args(["--bridge", "none", "--iptables=false", "--ip6tables=false"])
            .args(["--ip-forward=false", "--ip-masq=false"])
            // Plain directories: no overlay mounts to leave behind.
            .args(["--storage-driver", "vfs"])
            // No systemd here; keep its (and its containerd's) OOM score as it is.
            .args(["--exec-opt", "native.cgroupdriver=cgroupfs"])
            .args(["--oom-score-adjust", "0"]);
        let docker = Docker {
            process: Some(Child::spawn("dockerd", command)?),
            socket,
            daemon_cgroup,
            _cgroups_v1: cgroups_v1,
            cgroups,
            _netns: netns,
            dir,
            made_outside,
        };
        wait_for("dockerd to answer", DOCKER_TIMEOUT, || {
            if let Some(process) = &docker.process {
                process.ensure_running()?;
            }
            // Until the socket exists, a client would only fail.
            Ok((docker.socket.exists() && docker.docker(["version"])?.success()).then_some(()))
        })?;
        Ok(docker)
    }

    /// `docker` against this dockerd, with a client config of its own; a non-zero exit is
    /// returned, not an error.
    fn docker<I, S>(&self, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = Command::new(DOCKER);
        command
            // Either would point the client elsewhere, or conflict with --host.
            .env_remove("DOCKER_HOST")
            .env_remove("DOCKER_CONTEXT")
            .arg("--config")
            .arg(self.dir.path().join("client"))
            .arg("--host")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args);
        run("docker", command, DOCKER_TIMEOUT)
    }

    /// The folders outside its temp dir that it made and that its guard removes.
    pub fn made_outside(&self) -> Vec<&'static str> {
        self.made_outside.paths()
    }

    /// SIGTERM to dockerd, which must exit in time, and its containerd and shims with it.
    pub fn stop(&mut self) -> Result<()> {
        let Some(process) = self.process.take() else {
            return Ok(());
        };
        process.signal(Signal::SIGTERM)?;
        process.wait_exit(DOCKER_TIMEOUT)?;
        // Its containerd is gone before it exits; a moment for the kernel to tell.
        wait_for(
            "dockerd's containerd and shims to exit after it",
            STOPPED_CHILDREN_TIMEOUT,
            || Ok(self.daemon_cgroup.pids()?.is_empty().then_some(())),
        )
        .with_context(|| {
            format!(
                "left in {}: {:?}",
                self.daemon_cgroup.path().display(),
                self.daemon_cgroup.pids()
            )
        })
    }

    /// Every container, running or not, force-removed.
    fn remove_containers(&self) -> Result<()> {
        let listed = self.docker(["ps", "--all", "--quiet"])?.ensure_success()?;
        let ids: Vec<&str> = listed.stdout.split_whitespace().collect();
        if !ids.is_empty() {
            self.docker(["rm", "--force"].into_iter().chain(ids))?
                .ensure_success()?;
        }
        Ok(())
    }
}

impl ContainerCli for Docker {
    fn cli(&self, args: &[&OsStr]) -> Result<Output> {
        self.docker(args)
    }

    fn path(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    fn cgroup(&self) -> PathBuf {
        self.cgroups.path().to_owned()
    }
}

impl Drop for Docker {
    fn drop(&mut self) {
        if self.process.is_some() {
            // A container a failed run left, with its mounts and network namespace.
            if let Err(error) = self.remove_containers() {
                eprintln!("cleanup: removing docker's containers: {error:#}");
            }
            if let Err(error) = self.stop() {
                eprintln!("cleanup: stopping dockerd: {error:#}");
            }
        }
        // The cgroups' guards kill what is left; nothing needs to run for this.
        if let Err(error) = unmount_below(self.dir.path()) {
            eprintln!("cleanup: docker's mounts: {error:#}");
        }
    }
}
