//! HAProxy (Debian's package, installed by `cargo xtask setup`) as an unmodified proxy in a pod.

use std::ffi::OsString;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::cgroup::Cgroup;
use crate::names::TempDir;
use crate::netns::Netns;
use crate::pod::{spawn_in_pod_with_nofile, Identity};
use crate::process::Child;
use crate::tools::wait_for_tcp_listener;

const HAPROXY: &str = "/usr/sbin/haproxy";
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// A running `haproxy -db` (foreground, one process) and its configuration file.
pub struct Haproxy {
    pub process: Child,
    _config_dir: TempDir,
}

impl Haproxy {
    /// Writes `config` to a file, starts HAProxy on it in `netns` and `cgroup` as the proxy's
    /// UID/GID 1337 (with RLIMIT_NOFILE `nofile` when given), and waits until it listens on
    /// `port`.
    pub fn start(
        netns: &Netns,
        cgroup: &Cgroup,
        config: &str,
        port: u16,
        nofile: Option<u64>,
    ) -> Result<Haproxy> {
        let config_dir = TempDir::create("haproxy")?;
        let path = config_dir.path().join("haproxy.cfg");
        std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
        let command = [
            OsString::from(HAPROXY),
            "-db".into(),
            "-f".into(),
            path.into_os_string(),
        ];
        let process = spawn_in_pod_with_nofile(netns, cgroup, Identity::PROXY, nofile, &command)?;
        wait_for_tcp_listener(process.pid(), port, STARTUP_TIMEOUT)
            .with_context(|| format!("HAProxy not listening{}", process.diagnostics()))?;
        Ok(Haproxy {
            process,
            _config_dir: config_dir,
        })
    }
}
