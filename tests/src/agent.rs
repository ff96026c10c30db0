//! A `redirector agent` process for one test, with its own socket, state directory and metrics
//! port on loopback, working on the test's bpffs root.

use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::signal::Signal;

use crate::names::TempDir;
use crate::pod::Sandbox;
use crate::process::{binary, wait_for, Child, Output};
use crate::protocol::{Metrics, Status};
use crate::tools::redirector;

/// Loading the programs on a slow machine included.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// Where an agent of a test works; a restarted agent gets the same.
#[derive(Debug, Clone)]
pub struct AgentSetup {
    pub bpffs: PathBuf,
    /// The sandbox's cgroup subtree, whose children are pods.
    pub pod_cgroup_root: PathBuf,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub metrics_addr: SocketAddr,
}

impl AgentSetup {
    /// The sandbox's bpffs root; socket and state files in `scratch`; a free loopback port.
    pub fn new(sandbox: &Sandbox, scratch: &TempDir) -> Result<AgentSetup> {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|listener| listener.local_addr())
            .context("finding a free loopback port for the metrics")?
            .port();
        Ok(AgentSetup {
            bpffs: sandbox.root().to_owned(),
            pod_cgroup_root: sandbox.cgroups.path().to_owned(),
            socket: scratch.path().join("agent.sock"),
            state_dir: scratch.path().join("pods"),
            metrics_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        })
    }

    /// `--bpffs`, `--pod-cgroup-root`, `--socket` and `--state-dir` for any redirector command.
    pub fn node_args(&self) -> Vec<OsString> {
        vec![
            "--bpffs".into(),
            self.bpffs.clone().into(),
            "--pod-cgroup-root".into(),
            self.pod_cgroup_root.clone().into(),
            "--socket".into(),
            self.socket.clone().into(),
            "--state-dir".into(),
            self.state_dir.clone().into(),
        ]
    }

    /// `redirector ARGS... --bpffs --socket --state-dir`; a non-zero exit is returned.
    pub fn redirector<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<Output> {
        let mut full: Vec<OsString> = args.iter().map(|arg| arg.as_ref().to_owned()).collect();
        full.extend(self.node_args());
        redirector(full)
    }

    /// `redirector status --output json` (through the agent when one runs), parsed.
    pub fn status(&self) -> Result<Status> {
        let output = self
            .redirector(&["status", "--output", "json"])?
            .ensure_success()?;
        serde_json::from_str(&output.stdout)
            .with_context(|| format!("parsing `{}`: {}", output.command_line, output.stdout))
    }

    /// The agent's pod state files, by name.
    pub fn state_files(&self) -> Result<Vec<String>> {
        let Ok(entries) = std::fs::read_dir(&self.state_dir) else {
            return Ok(Vec::new());
        };
        let mut names: Vec<String> = entries
            .map(|entry| Ok(entry?.file_name().to_string_lossy().into_owned()))
            .collect::<std::io::Result<_>>()?;
        names.sort();
        Ok(names)
    }
}

/// A running agent; killed on drop (a test stops it with [`Agent::stop`] to check SIGTERM).
pub struct Agent {
    pub setup: AgentSetup,
    pub process: Child,
    /// The flags it was started with, for [`Agent::restart`].
    flags: Vec<String>,
}

impl Agent {
    /// Starts the agent and waits until /readyz says ready.
    pub fn start(setup: &AgentSetup) -> Result<Agent> {
        Self::start_with(setup, &[])
    }

    /// [`Agent::start`] with the programs' per-connection log lines switched on and forwarded
    /// to the agent's stderr, and per-pod metrics.
    pub fn start_logging_connections(setup: &AgentSetup) -> Result<Agent> {
        Self::start_with(setup, &["--log-connections", "--per-pod-metrics", "100"])
    }

    /// [`Agent::start`] with more flags.
    pub fn start_with(setup: &AgentSetup, extra: &[&str]) -> Result<Agent> {
        Self::spawn(setup, extra, Command::new(binary("redirector")?))
    }

    /// [`Agent::start`] with the soft limit on open files lowered to `soft` (the hard limit
    /// kept), as a runtime may start it.
    pub fn start_with_open_files(setup: &AgentSetup, soft: u64) -> Result<Agent> {
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
        let mut command = Command::new(binary("redirector")?);
        // SAFETY: the closure only makes a system call, as is allowed between fork and exec.
        unsafe {
            command.pre_exec(move || {
                setrlimit(Resource::RLIMIT_NOFILE, soft, hard).map_err(std::io::Error::from)
            });
        }
        Self::spawn(setup, &[], command)
    }

    fn spawn(setup: &AgentSetup, extra: &[&str], mut command: Command) -> Result<Agent> {
        command
            .arg("agent")
            .args(extra)
            .env_remove("RUST_LOG")
            .args(setup.node_args())
            .args(["--metrics-addr", &setup.metrics_addr.to_string()])
            // The tests decide when pods are collected: at start, not on a timer.
            .args(["--reconcile-interval-seconds", "3600"])
            .env_remove("REDIRECTOR_CONFIG")
            .env("NO_COLOR", "1");
        let agent = Agent {
            setup: setup.clone(),
            process: Child::spawn("redirector agent", command)?,
            flags: extra.iter().map(|flag| (*flag).to_owned()).collect(),
        };
        wait_for("the agent to be ready", READY_TIMEOUT, || {
            agent.process.ensure_running()?;
            Ok(matches!(http_get(setup.metrics_addr, "/readyz"), Ok((200, _))).then_some(()))
        })?;
        Ok(agent)
    }

    /// SIGTERM, then the agent must exit 0 within a bounded time.
    pub fn stop(self) -> Result<Output> {
        self.process.signal(Signal::SIGTERM)?;
        self.process.wait_exit(STOP_TIMEOUT)?.ensure_success()
    }

    /// Stops the agent (SIGTERM, exit 0), runs `while_down`, then starts another one with the
    /// same setup and flags, ready.
    pub fn restart(&mut self, while_down: impl FnOnce() -> Result<()>) -> Result<()> {
        self.process.signal(Signal::SIGTERM)?;
        self.process.wait_exit(STOP_TIMEOUT)?.ensure_success()?;
        while_down()?;
        let flags: Vec<&str> = self.flags.iter().map(String::as_str).collect();
        let restarted = Agent::start_with(&self.setup, &flags)?;
        *self = restarted;
        Ok(())
    }

    /// `GET /metrics`, parsed.
    pub fn metrics(&self) -> Result<Metrics> {
        let (code, body) = http_get(self.setup.metrics_addr, "/metrics")?;
        ensure!(code == 200, "GET /metrics answered {code}: {body}");
        Metrics::parse(&body)
    }
}

/// [`http_get`] from the network namespace whose file is `netns`, on a thread that enters it
/// (the library's own way).
pub fn http_get_in(netns: &Path, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let namespace = redirector::netns::open_nsfs(netns)?;
    redirector::netns::within(&namespace, netns, || http_get(addr, path))?
}

/// A plain HTTP/1.1 GET on loopback: (status code, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
    stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .with_context(|| format!("reading the answer to GET {path}"))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP header in {response:?}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("no status code in {head:?}"))?;
    Ok((code, body.to_owned()))
}
