//! Test fixtures: a [`Sandbox`] per test (own bpffs root and cgroup subtree) and [`Pod`]s in it
//! (own netns and cgroup, wired over a veth to a server netns that runs an echo server).

use std::ffi::{OsStr, OsString};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use serde::de::DeserializeOwned;

use crate::bpffs::BpfRoot;
use crate::cgroup::Cgroup;
use crate::netns::{Netns, VethPair};
use crate::process::{binary, Child, Output};
use crate::protocol::{
    ConnectOptions, ConnectReport, Counters, DoneEvent, ForwardEvent, ProxyEvent, ServerReply,
    Status,
};
use crate::tools::{
    redirector_processes_mentioning, redirector_with_env, status_json, wait_for_tcp_listener,
};

/// redirector's default proxy port, where redirected connections land.
pub const PROXY_PORT: u16 = 15001;
/// Where a redirected client finds itself connected (its getpeername()).
pub const PROXY_ADDR: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, PROXY_PORT));

/// How long a started server or proxy may take to listen.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the proxy may take to log an event after the client finished.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(5);
/// e2e-helper connect's own limits (3 s connect + 5 s reply) plus slack.
const SINGLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(12);

/// The credentials a pod process runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
}

impl Identity {
    /// An ordinary application process: intercepted.
    pub const APP: Identity = Identity {
        uid: 1000,
        gid: 1000,
    };
    /// The sidecar proxy (redirector's default exempt UID/GID): never intercepted.
    pub const PROXY: Identity = Identity {
        uid: 1337,
        gid: 1337,
    };
    /// root, with its capabilities (e.g. to take supplementary groups).
    pub const ROOT: Identity = Identity { uid: 0, gid: 0 };
}

/// Run `command` (program and arguments) through `e2e-helper exec`: in `cgroup`, then in `netns`,
/// then as `identity`. The returned guard's pid is that of `command` itself (exec, no fork).
pub fn spawn_in_pod<S: AsRef<OsStr>>(
    netns: &Netns,
    cgroup: &Cgroup,
    identity: Identity,
    command: &[S],
) -> Result<Child> {
    spawn_in_pod_with_nofile(netns, cgroup, identity, None, command)
}

/// [`spawn_in_pod`] with RLIMIT_NOFILE set to `nofile` (soft and hard) when given: higher for
/// processes holding tens of thousands of connections, lower to bound a runaway.
pub fn spawn_in_pod_with_nofile<S: AsRef<OsStr>>(
    netns: &Netns,
    cgroup: &Cgroup,
    identity: Identity,
    nofile: Option<u64>,
    command: &[S],
) -> Result<Child> {
    let settings = ExecSettings {
        nofile,
        ..ExecSettings::default()
    };
    spawn_in_pod_with(netns, cgroup, identity, &settings, command)
}

/// How `e2e-helper exec` sets up a pod process besides its netns, cgroup and identity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecSettings {
    /// RLIMIT_NOFILE (soft and hard).
    pub nofile: Option<u64>,
    /// The pod's own /etc/resolv.conf (bind-mounted in a mount namespace of the process's own).
    pub resolv_conf: Option<PathBuf>,
}

/// [`spawn_in_pod`] set up as `settings` say.
pub fn spawn_in_pod_with<S: AsRef<OsStr>>(
    netns: &Netns,
    cgroup: &Cgroup,
    identity: Identity,
    settings: &ExecSettings,
    command: &[S],
) -> Result<Child> {
    let program = command
        .first()
        .context("spawn_in_pod needs a command")?
        .as_ref();
    let label = format!(
        "{} in {}",
        Path::new(program)
            .file_name()
            .unwrap_or(program)
            .to_string_lossy(),
        cgroup
            .path()
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
    );
    let mut exec = Command::new(binary("e2e-helper")?);
    exec.args(["exec", "--netns", netns.name(), "--cgroup"])
        .arg(cgroup.path());
    if let Some(nofile) = settings.nofile {
        exec.args(["--nofile", &nofile.to_string()]);
    }
    if let Some(file) = &settings.resolv_conf {
        exec.arg("--resolv-conf").arg(file);
    }
    exec.args([
        "--uid",
        &identity.uid.to_string(),
        "--gid",
        &identity.gid.to_string(),
        "--",
    ])
    .args(command);
    Child::spawn(&label, exec)
}

/// Start `redirector-proxy --listen 127.0.0.1:15001` in `netns` and `cgroup` as UID/GID 1337 and
/// wait until it listens.
pub fn start_proxy(netns: &Netns, cgroup: &Cgroup) -> Result<Proxy> {
    start_proxy_on(netns, cgroup, &[PROXY_ADDR])
}

/// Start `redirector-proxy` in `netns` and `cgroup` as UID/GID 1337, listening on each of
/// `listen` (all on port 15001), and wait until it listens.
pub fn start_proxy_on(netns: &Netns, cgroup: &Cgroup, listen: &[SocketAddr]) -> Result<Proxy> {
    start_proxy_with(netns, cgroup, &ProxySettings::listening_on(listen))
}

/// How [`start_proxy_with`] runs `redirector-proxy`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxySettings {
    /// Addresses to listen on, all on port 15001.
    pub listen: Vec<SocketAddr>,
    /// `--fastopen`: its listeners accept data in the SYN.
    pub fastopen: bool,
    /// RLIMIT_NOFILE of the proxy.
    pub nofile: Option<u64>,
    /// `--ask-again-at-end`: SO_ORIGINAL_DST asked again when a connection is done.
    pub ask_again_at_end: bool,
}

impl ProxySettings {
    pub fn listening_on(listen: &[SocketAddr]) -> ProxySettings {
        ProxySettings {
            listen: listen.to_vec(),
            fastopen: false,
            nofile: None,
            ask_again_at_end: false,
        }
    }
}

impl Default for ProxySettings {
    fn default() -> ProxySettings {
        ProxySettings::listening_on(&[PROXY_ADDR])
    }
}

/// Start `redirector-proxy` as `settings` say, in `netns` and `cgroup` as UID/GID 1337, and
/// wait until it listens.
pub fn start_proxy_with(netns: &Netns, cgroup: &Cgroup, settings: &ProxySettings) -> Result<Proxy> {
    let mut command = vec![binary("redirector-proxy")?.into_os_string()];
    for addr in &settings.listen {
        command.extend(["--listen".into(), addr.to_string().into()]);
    }
    if settings.ask_again_at_end {
        command.push("--ask-again-at-end".into());
    }
    if settings.fastopen {
        command.push("--fastopen".into());
    }
    let process =
        spawn_in_pod_with_nofile(netns, cgroup, Identity::PROXY, settings.nofile, &command)?;
    wait_for_tcp_listener(process.pid(), PROXY_PORT, STARTUP_TIMEOUT)
        .with_context(|| format!("waiting for the proxy to listen{}", process.diagnostics()))?;
    Ok(Proxy { process })
}

/// Start `e2e-helper connect` in `netns` and `cgroup` as `identity`.
pub fn spawn_client(
    netns: &Netns,
    cgroup: &Cgroup,
    identity: Identity,
    options: &ConnectOptions,
) -> Result<Child> {
    let mut command = vec![binary("e2e-helper")?.into_os_string(), "connect".into()];
    command.extend(options.to_args().into_iter().map(OsString::from));
    spawn_in_pod(netns, cgroup, identity, &command)
}

/// One connection from `netns` and `cgroup` as `identity`, run to completion.
pub fn connect(
    netns: &Netns,
    cgroup: &Cgroup,
    identity: Identity,
    options: &ConnectOptions,
) -> Result<ConnectReport> {
    let client = spawn_client(netns, cgroup, identity, options)?;
    client_result(
        &client,
        SINGLE_CONNECTION_TIMEOUT + Duration::from_millis(options.hold_ms),
    )
}

/// Run `e2e-helper ARGS...` in `netns` and `cgroup` as `identity` to completion (within
/// `timeout`) and parse its last stdout line as `T`.
pub fn run_helper<T: DeserializeOwned, S: AsRef<OsStr>>(
    netns: &Netns,
    cgroup: &Cgroup,
    identity: Identity,
    args: &[S],
    timeout: Duration,
) -> Result<T> {
    let mut command = vec![binary("e2e-helper")?.into_os_string()];
    command.extend(args.iter().map(|arg| arg.as_ref().to_owned()));
    client_result(&spawn_in_pod(netns, cgroup, identity, &command)?, timeout)
}

/// Wait for a finished `e2e-helper connect` and parse its last stdout line as `T`
/// ([`ConnectReport`] or [`crate::ConnectSummary`]).
pub fn client_result<T: DeserializeOwned>(client: &Child, timeout: Duration) -> Result<T> {
    let output = client.wait_exit(timeout)?.ensure_success()?;
    let last_line = output
        .stdout
        .lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .unwrap_or("");
    serde_json::from_str(last_line).with_context(|| {
        format!(
            "parsing the result of `{}`: {:?}",
            output.command_line, output.stdout
        )
    })
}

/// Everything one test owns: a unique bpffs pin root and a cgroup subtree for its pods.
/// Dropping it uninstalls redirector from that root, then kills and removes the cgroups.
pub struct Sandbox {
    pub bpffs: BpfRoot,
    pub cgroups: Cgroup,
}

impl Sandbox {
    /// Needs root (fails otherwise); mounts bpffs if needed; first sweeps what killed runs left.
    pub fn new(tag: &str) -> Result<Sandbox> {
        if !nix::unistd::geteuid().is_root() {
            bail!("the end-to-end tests need root: they create network namespaces, cgroups and eBPF attachments");
        }
        static SWEEP: Once = Once::new();
        SWEEP.call_once(|| {
            Netns::sweep_stale();
            Cgroup::sweep_stale();
            BpfRoot::sweep_stale();
        });
        Ok(Sandbox {
            bpffs: BpfRoot::create(tag)?,
            cgroups: Cgroup::create_root(tag)?,
        })
    }

    /// The bpffs root every redirector command of this sandbox uses.
    pub fn root(&self) -> &Path {
        self.bpffs.path()
    }

    /// A cgroup of this sandbox, e.g. a sibling of the pods that is never enrolled.
    pub fn cgroup(&self, name: &str) -> Result<Cgroup> {
        self.cgroups.child(name)
    }

    /// A pod whose server listens on `server_port` in its server netns. No proxy yet.
    pub fn pod(&self, name: &str, server_port: u16) -> Result<Pod> {
        Pod::create(self, name, server_port)
    }

    /// `--bpffs ROOT --pod-cgroup-root CGROUPS`: this sandbox's pins, and its cgroups' children
    /// as pods (redirector only enrolls pods; see redirector's pod_cgroup.rs).
    pub fn node_args(&self) -> [OsString; 4] {
        [
            "--bpffs".into(),
            self.root().into(),
            "--pod-cgroup-root".into(),
            self.cgroups.path().into(),
        ]
    }

    /// `redirector ARGS... --bpffs ROOT --pod-cgroup-root CGROUPS`; a non-zero exit is
    /// returned, not an error.
    pub fn redirector<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<Output> {
        self.redirector_with_env(args, &[])
    }

    /// `redirector ARGS... <this sandbox's node flags>` with extra environment variables.
    pub fn redirector_with_env<S: AsRef<OsStr>>(
        &self,
        args: &[S],
        env: &[(&str, &str)],
    ) -> Result<Output> {
        let mut full: Vec<OsString> = args.iter().map(|arg| arg.as_ref().to_owned()).collect();
        full.extend(self.node_args());
        redirector_with_env(full, env)
    }

    /// `redirector enroll --cgroup DIR` with the default proxy settings; must succeed.
    pub fn enroll(&self, cgroup: &Cgroup) -> Result<Output> {
        self.enroll_with(cgroup, &[])
    }

    /// `redirector enroll --cgroup DIR FLAGS...` (e.g. istio-iptables flags); must succeed.
    pub fn enroll_with(&self, cgroup: &Cgroup, flags: &[&str]) -> Result<Output> {
        let mut args = vec![
            OsStr::new("enroll"),
            "--cgroup".as_ref(),
            cgroup.path().as_os_str(),
        ];
        args.extend(flags.iter().map(OsStr::new));
        self.redirector(&args)?
            .ensure_success()
            .with_context(|| format!("enrolling {} with {flags:?}", cgroup.path().display()))
    }

    /// `redirector unenroll --cgroup DIR`; the exit status is for the caller to judge.
    pub fn unenroll(&self, cgroup: &Cgroup) -> Result<Output> {
        self.redirector(&[
            OsStr::new("unenroll"),
            "--cgroup".as_ref(),
            cgroup.path().as_os_str(),
        ])
    }

    pub fn status(&self) -> Result<Status> {
        status_json(self.root())
    }

    /// The status counters of an enrolled cgroup.
    pub fn counters(&self, cgroup: &Cgroup) -> Result<Counters> {
        let status = self.status()?;
        let id = cgroup.id()?;
        status.pod(id).map(|pod| pod.counters).with_context(|| {
            format!(
                "cgroup {} (id {id}) is not in status: {status:?}",
                cgroup.path().display()
            )
        })
    }

    /// Fails if a redirector process working on this sandbox's root is still running: interception
    /// has to live in the kernel alone once `enroll` has exited.
    pub fn ensure_no_redirector_running(&self) -> Result<()> {
        let pids = redirector_processes_mentioning(self.root().as_os_str())?;
        if !pids.is_empty() {
            bail!(
                "redirector processes for {} still running: {pids:?}",
                self.root().display()
            );
        }
        Ok(())
    }
}

/// A server started by [`Pod::create`] in the pod's server netns. It logs every connection it
/// answers (`e2e-helper serve --log`).
pub struct Server {
    pub addr: SocketAddr,
    pub process: Child,
}

impl Server {
    /// Start `e2e-helper serve --log` on `addr` in `netns` and `cgroup` as the application.
    pub fn start(netns: &Netns, cgroup: &Cgroup, addr: SocketAddr) -> Result<Server> {
        let process = spawn_server(netns, cgroup, &[addr], true)?;
        Ok(Server { addr, process })
    }

    /// Every connection the server has answered so far.
    pub fn answered(&self) -> Vec<ServerReply> {
        self.process.json_lines()
    }

    /// The connection that brought `line`, waiting for it if needed.
    pub fn received(&self, line: &str) -> Result<ServerReply> {
        self.process
            .wait_for_json(|reply: &ServerReply| reply.line == line, EVENT_TIMEOUT)
            .with_context(|| format!("the server at {} never received {line:?}", self.addr))
    }
}

/// `e2e-helper serve` on each of `listen` in `netns` and `cgroup` as the application, with
/// `--log` when `log`; returns once it listens.
fn spawn_server(netns: &Netns, cgroup: &Cgroup, listen: &[SocketAddr], log: bool) -> Result<Child> {
    let mut serve = vec![binary("e2e-helper")?.into_os_string(), "serve".into()];
    if log {
        serve.push("--log".into());
    }
    for addr in listen {
        serve.extend(["--listen".into(), addr.to_string().into()]);
    }
    let process = spawn_in_pod(netns, cgroup, Identity::APP, &serve)?;
    process.wait_for_line(|line| line == "listening", STARTUP_TIMEOUT)?;
    Ok(process)
}

/// A pod: its own netns and cgroup (not enrolled until the test says so), linked by a veth to a
/// server netns where an echo server listens. Fields drop in order: processes first, then cgroups,
/// then the network.
pub struct Pod {
    pub server: Server,
    pub cgroup: Cgroup,
    pub server_cgroup: Cgroup,
    pub veth: VethPair,
    pub netns: Netns,
    pub server_netns: Netns,
}

impl Pod {
    fn create(sandbox: &Sandbox, name: &str, server_port: u16) -> Result<Pod> {
        let netns = Netns::create(name)?;
        let server_netns = Netns::create(&format!("{name}srv"))?;
        let veth = VethPair::connect(&netns, &server_netns)?;
        let cgroup = sandbox.cgroup(name)?;
        let server_cgroup = sandbox.cgroup(&format!("{name}-server"))?;
        let addr = SocketAddr::new(veth.b_addr.into(), server_port);
        let server = Server::start(&server_netns, &server_cgroup, addr)?;
        Ok(Pod {
            server,
            cgroup,
            server_cgroup,
            veth,
            netns,
            server_netns,
        })
    }

    /// The pod's own address on the veth (the proxy's upstream connections come from it).
    pub fn addr(&self) -> Ipv4Addr {
        self.veth.a_addr
    }

    /// The pod's own IPv6 address on the veth.
    pub fn addr6(&self) -> Ipv6Addr {
        self.veth.a_addr6
    }

    /// Gives the server netns's end of the veth another address of its subnet (a /24 for
    /// IPv4, /64 for IPv6), e.g. for a second server.
    pub fn add_server_address(&self, addr: IpAddr) -> Result<()> {
        let cidr = match addr {
            IpAddr::V4(_) => format!("{addr}/24"),
            IpAddr::V6(_) => format!("{addr}/64"),
        };
        // nodad: an IPv6 address is usable at once.
        self.server_netns
            .run(
                "ip",
                &["addr", "add", &cidr, "dev", self.veth.interface(), "nodad"],
            )
            .map(drop)
    }

    /// Another echo server in the server netns (e.g. on the IPv6 address), until dropped.
    pub fn serve(&self, addr: SocketAddr) -> Result<Server> {
        Server::start(&self.server_netns, &self.server_cgroup, addr)
    }

    /// The arguments of `redirector enroll` for this pod: its cgroup and netns, then `flags`.
    pub fn enroll_args(&self, flags: &[&str]) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "enroll".into(),
            "--cgroup".into(),
            self.cgroup.path().into(),
            "--netns".into(),
            self.netns.path().into(),
        ];
        args.extend(flags.iter().map(OsString::from));
        args
    }

    /// An echo server on each of `listen` in the server netns that keeps no log of its answers
    /// (a soak run's million connections would fill the test's memory), until dropped.
    pub fn serve_unlogged(&self, listen: &[SocketAddr]) -> Result<Child> {
        spawn_server(&self.server_netns, &self.server_cgroup, listen, false)
    }

    /// Start `redirector-proxy --listen 127.0.0.1:15001` in the pod as UID/GID 1337 and wait until
    /// it listens.
    pub fn start_proxy(&self) -> Result<Proxy> {
        self.start_proxy_on(&[PROXY_ADDR])
    }

    /// Start `redirector-proxy` listening on each of `listen` (all on port 15001).
    pub fn start_proxy_on(&self, listen: &[SocketAddr]) -> Result<Proxy> {
        start_proxy_on(&self.netns, &self.cgroup, listen)
    }

    /// Start `redirector-proxy` in the pod as `settings` say.
    pub fn start_proxy_with(&self, settings: &ProxySettings) -> Result<Proxy> {
        start_proxy_with(&self.netns, &self.cgroup, settings)
    }

    /// Start `e2e-helper connect` in this pod's netns, in `cgroup` (the pod's or a sibling).
    pub fn spawn_client(
        &self,
        cgroup: &Cgroup,
        identity: Identity,
        options: &ConnectOptions,
    ) -> Result<Child> {
        spawn_client(&self.netns, cgroup, identity, options)
    }

    /// One connection from the pod's own cgroup, run to completion.
    pub fn connect(&self, identity: Identity, options: &ConnectOptions) -> Result<ConnectReport> {
        self.connect_from(&self.cgroup, identity, options)
    }

    /// One connection from `cgroup` in this pod's netns, run to completion.
    pub fn connect_from(
        &self,
        cgroup: &Cgroup,
        identity: Identity,
        options: &ConnectOptions,
    ) -> Result<ConnectReport> {
        connect(&self.netns, cgroup, identity, options)
    }
}

/// A running `redirector-proxy` and what it logged.
pub struct Proxy {
    pub process: Child,
}

impl Proxy {
    pub fn events(&self) -> Vec<ProxyEvent> {
        self.process.json_lines()
    }

    pub fn forward_events(&self) -> Vec<ForwardEvent> {
        self.events()
            .into_iter()
            .filter_map(|event| match event {
                ProxyEvent::Forward(forward) => Some(forward),
                _ => None,
            })
            .collect()
    }

    /// The connection went client → proxy → `server`: returns the proxy's forward event.
    pub fn check_redirected(
        &self,
        server: SocketAddr,
        report: &ConnectReport,
    ) -> Result<ForwardEvent> {
        let reply = report.server_reply()?;
        // The client's socket is connected to the proxy over loopback, yet its getpeername
        // reports the original destination, as after an iptables REDIRECT.
        ensure!(
            report.peer == Some(server),
            "client's getpeername is not the original destination: {report:?}"
        );
        let local = report.local_addr()?;
        let forward = self.forward_event(local)?;
        // And its getsockname the source a direct connection would have had: the pod's own
        // address, the one the proxy's own connection to the server got (loopback when the pod
        // was enrolled without its network namespace, whose addresses are then unknown). The
        // proxy saw the same address as its peer.
        ensure!(
            local.ip().is_loopback() || local.ip() == forward.upstream_local.ip(),
            "client's getsockname is {local}, neither loopback nor the pod's source {}: {report:?}",
            forward.upstream_local.ip()
        );
        ensure!(
            forward.orig_dst == server,
            "proxy forwarded to {}, expected {server}",
            forward.orig_dst
        );
        ensure!(
            reply.peer == forward.upstream_local,
            "the server saw {} but the proxy's upstream was {}",
            reply.peer,
            forward.upstream_local
        );
        ensure!(
            reply.local == server,
            "the reply came from {} instead of {server}",
            reply.local
        );
        Ok(forward)
    }

    /// The connection went straight to `server`, and this proxy never saw it.
    pub fn check_direct(&self, server: SocketAddr, report: &ConnectReport) -> Result<()> {
        let reply = report.server_reply()?;
        let local = report.local_addr()?;
        ensure!(
            report.peer == Some(server),
            "client's getpeername is not the server: {report:?}"
        );
        ensure!(
            reply.peer == local,
            "the server saw {} instead of the client {local}",
            reply.peer
        );
        let forwarded: Vec<_> = self
            .forward_events()
            .into_iter()
            .filter(|event| event.peer == local)
            .collect();
        ensure!(
            forwarded.is_empty(),
            "the proxy forwarded a direct connection: {forwarded:?}"
        );
        Ok(())
    }

    /// The forward event for the client connection from `client`, waiting for it if needed.
    pub fn forward_event(&self, client: SocketAddr) -> Result<ForwardEvent> {
        match self.wait_for_event(client, |event| matches!(event, ProxyEvent::Forward(_)))? {
            ProxyEvent::Forward(forward) => Ok(forward),
            _ => unreachable!("filtered on forward events"),
        }
    }

    /// What the proxy made of the connection from `client`: its first forward or no_orig_dst
    /// event, waiting for it if needed.
    pub fn decision(&self, client: SocketAddr) -> Result<ProxyEvent> {
        self.wait_for_event(client, |event| {
            matches!(event, ProxyEvent::Forward(_) | ProxyEvent::NoOrigDst(_))
        })
    }

    /// Every event logged so far for the connection from `client`.
    pub fn events_for(&self, client: SocketAddr) -> Vec<ProxyEvent> {
        self.events()
            .into_iter()
            .filter(|event| event_peer(event) == client)
            .collect()
    }

    /// The done event for the client connection from `client`, waiting for it if needed.
    pub fn done_event(&self, client: SocketAddr) -> Result<DoneEvent> {
        match self.wait_for_event(client, |event| matches!(event, ProxyEvent::Done(_)))? {
            ProxyEvent::Done(done) => Ok(done),
            _ => unreachable!("filtered on done events"),
        }
    }

    fn wait_for_event(
        &self,
        client: SocketAddr,
        kind: fn(&ProxyEvent) -> bool,
    ) -> Result<ProxyEvent> {
        self.process.wait_for_json(
            |event: &ProxyEvent| kind(event) && event_peer(event) == client,
            EVENT_TIMEOUT,
        )
    }
}

fn event_peer(event: &ProxyEvent) -> SocketAddr {
    match event {
        ProxyEvent::Forward(forward) => forward.peer,
        ProxyEvent::Done(done) => done.peer,
        ProxyEvent::NoOrigDst(miss) => miss.peer,
    }
}
