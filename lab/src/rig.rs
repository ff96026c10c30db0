//! The lab's topology: one server netns, and one client "pod" (netns + cgroup, veth to the
//! server netns) per way of reaching the server. Every variant runs at the same time in its
//! own pod, so the rounds can interleave variants without reconfiguring anything between runs.
//!
//! | pod            | interception                     | proxies (UID/GID 1337)                      |
//! |----------------|----------------------------------|---------------------------------------------|
//! | `plain`        | none                             | redirector-proxy :15001 and HAProxy :15002, both to a fixed upstream |
//! | `ipt`          | istio-iptables nat rules         | redirector-proxy :15001 (original destination) |
//! | `ebpf`         | `redirector enroll`, no nat rule | redirector-proxy :15001 (original destination) |
//! | `ipt-haproxy`  | istio-iptables nat rules         | HAProxy :15001 (`server 0.0.0.0:0`)         |
//! | `ebpf-haproxy` | `redirector enroll`, no nat rule | HAProxy :15001 (`server 0.0.0.0:0`)         |
//!
//! Each variant has its own server port, so the server counts each variant's traffic apart.

use std::ffi::OsString;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use redirector_tests::{
    binary, nat_rules, spawn_in_pod, wait_for_tcp_listener, Cgroup, Child, Identity, Netns,
    Sandbox, TempDir, VethPair,
};
use serde::Serialize;

use crate::measure::Workload;
use crate::timed::run_timed;
use crate::wire::LoadReport;

/// The rules `istio-iptables -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -b '*'` applies
/// (how they were derived is in the file).
pub const ISTIO_RULES: &str = include_str!("../istio-rules.v4");
/// The `-A` rules in [`ISTIO_RULES`], as `iptables-save -t nat` lists them back.
pub const ISTIO_RULE_COUNT: usize = 15;

const PROXY_PORT: u16 = 15001;
/// The plain pod's HAProxy, next to its redirector-proxy.
const PLAIN_HAPROXY_PORT: u16 = 15002;
const FIRST_SERVER_PORT: u16 = 8000;
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Process start, connection set-up and the stats request, on top of the run itself.
const LOAD_SLACK: Duration = Duration::from_secs(30);
const IPTABLES_TIMEOUT: Duration = Duration::from_secs(30);

/// How the server is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Variant {
    /// Client straight to the server: the floor.
    B0,
    /// Client straight to the proxy's port, proxy to the server: the floor for interception.
    B1,
    /// istio-iptables nat REDIRECT (with conntrack) to the proxy.
    Ipt,
    /// redirector's cgroup programs to the proxy.
    Ebpf,
    /// B1 with HAProxy as the proxy.
    HaproxyB1,
    /// IPT with HAProxy as the proxy.
    HaproxyIpt,
    /// EBPF with HAProxy as the proxy.
    HaproxyEbpf,
}

impl Variant {
    /// The variants of `summary.json`, all with redirector-proxy.
    pub const MAIN: [Variant; 4] = [Variant::B0, Variant::B1, Variant::Ipt, Variant::Ebpf];
    /// The cross-check with a third-party proxy.
    pub const HAPROXY: [Variant; 3] = [
        Variant::HaproxyB1,
        Variant::HaproxyIpt,
        Variant::HaproxyEbpf,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Variant::B0 => "B0",
            Variant::B1 => "B1",
            Variant::Ipt => "IPT",
            Variant::Ebpf => "EBPF",
            Variant::HaproxyB1 => "B1/haproxy",
            Variant::HaproxyIpt => "IPT/haproxy",
            Variant::HaproxyEbpf => "EBPF/haproxy",
        }
    }

    /// The variant without interception that this one is compared with.
    pub fn baseline(self) -> Option<Variant> {
        match self {
            Variant::Ipt | Variant::Ebpf => Some(Variant::B1),
            Variant::HaproxyIpt | Variant::HaproxyEbpf => Some(Variant::HaproxyB1),
            _ => None,
        }
    }

    fn server_port(self) -> u16 {
        FIRST_SERVER_PORT + self as u16
    }

    fn pod(self) -> PodKind {
        match self {
            Variant::B0 | Variant::B1 | Variant::HaproxyB1 => PodKind::Plain,
            Variant::Ipt => PodKind::Ipt,
            Variant::Ebpf => PodKind::Ebpf,
            Variant::HaproxyIpt => PodKind::IptHaproxy,
            Variant::HaproxyEbpf => PodKind::EbpfHaproxy,
        }
    }
}

impl Serialize for Variant {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PodKind {
    Plain,
    Ipt,
    Ebpf,
    IptHaproxy,
    EbpfHaproxy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Interception {
    None,
    Iptables,
    Ebpf,
}

impl PodKind {
    fn tag(self) -> &'static str {
        match self {
            PodKind::Plain => "plain",
            PodKind::Ipt => "ipt",
            PodKind::Ebpf => "ebpf",
            PodKind::IptHaproxy => "ipt-haproxy",
            PodKind::EbpfHaproxy => "ebpf-haproxy",
        }
    }

    fn interception(self) -> Interception {
        match self {
            PodKind::Plain => Interception::None,
            PodKind::Ipt | PodKind::IptHaproxy => Interception::Iptables,
            PodKind::Ebpf | PodKind::EbpfHaproxy => Interception::Ebpf,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ProxyKind {
    Redirector,
    Haproxy,
}

/// A proxy in a pod: where it listens, and where it forwards (`None`: to the original
/// destination).
struct ProxySpec {
    kind: ProxyKind,
    port: u16,
    fixed_upstream: Option<SocketAddr>,
}

/// Which CPU each side runs on: the client on one core, proxies and server on another.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct CpuPlan {
    pub client: Option<usize>,
    pub proxy_and_server: Option<usize>,
}

impl CpuPlan {
    pub fn detect() -> CpuPlan {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        if cpus >= 2 {
            CpuPlan {
                client: Some(0),
                proxy_and_server: Some(1),
            }
        } else {
            CpuPlan {
                client: None,
                proxy_and_server: None,
            }
        }
    }

    pub fn describe(&self) -> String {
        match (self.client, self.proxy_and_server) {
            (Some(client), Some(rest)) => {
                format!("client on CPU {client}; proxies and server on CPU {rest}")
            }
            _ => "not pinned (one CPU)".to_owned(),
        }
    }
}

/// `command` run by `taskset -c CPU` when there is a CPU to pin to.
fn pinned(cpu: Option<usize>, command: Vec<OsString>) -> Vec<OsString> {
    match cpu {
        Some(cpu) => ["taskset".into(), "-c".into(), cpu.to_string().into()]
            .into_iter()
            .chain(command)
            .collect(),
        None => command,
    }
}

/// A client pod. Fields drop in order: proxies first, then the cgroup, then the network.
struct Pod {
    kind: PodKind,
    proxies: Vec<Child>,
    cgroup: Cgroup,
    veth: VethPair,
    netns: Netns,
}

impl Pod {
    /// The server's address as seen from this pod.
    fn server_ip(&self) -> Ipv4Addr {
        self.veth.b_addr
    }
}

/// Everything the lab runs on. Fields drop in order: the server, the pods, the server's
/// cgroup and netns, the HAProxy configuration, and last the sandbox (bpffs root, cgroups).
pub struct Rig {
    server: Child,
    pods: Vec<Pod>,
    /// Held only to be removed (after the server inside it has been killed).
    _server_cgroup: Cgroup,
    server_netns: Netns,
    haproxy_configs: TempDir,
    pub sandbox: Sandbox,
    pub cpus: CpuPlan,
}

impl Rig {
    pub fn build(variants: &[Variant], cpus: CpuPlan) -> Result<Rig> {
        let sandbox = Sandbox::new("lab")?;
        let server_netns = Netns::create("labsrv")?;
        let server_cgroup = sandbox.cgroup("server")?;
        let ports: Vec<String> = variants
            .iter()
            .map(|variant| variant.server_port().to_string())
            .collect();
        let serve = pinned(
            cpus.proxy_and_server,
            vec![
                binary("redirector-lab")?.into(),
                "serve".into(),
                "--ports".into(),
                ports.join(",").into(),
            ],
        );
        let server = spawn_in_pod(&server_netns, &server_cgroup, Identity::APP, &serve)?;
        server
            .wait_for_line(|line| line == "listening", STARTUP_TIMEOUT)
            .context("waiting for the lab server")?;
        let mut rig = Rig {
            server,
            pods: Vec::new(),
            _server_cgroup: server_cgroup,
            server_netns,
            haproxy_configs: TempDir::create("labhaproxy")?,
            sandbox,
            cpus,
        };
        let mut kinds: Vec<PodKind> = Vec::new();
        for kind in variants.iter().map(|variant| variant.pod()) {
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
        }
        for kind in kinds {
            let pod = rig.pod(kind, variants)?;
            rig.pods.push(pod);
        }
        Ok(rig)
    }

    /// Makes a pod with its proxies running and its interception in place.
    fn pod(&self, kind: PodKind, variants: &[Variant]) -> Result<Pod> {
        eprintln!("lab: setting up pod {}", kind.tag());
        let netns = Netns::create(kind.tag())?;
        let veth = VethPair::connect(&netns, &self.server_netns)?;
        let cgroup = self.sandbox.cgroup(kind.tag())?;
        let mut pod = Pod {
            kind,
            proxies: Vec::new(),
            cgroup,
            veth,
            netns,
        };
        for spec in proxy_specs(kind, pod.server_ip(), variants) {
            let proxy = self.start_proxy(&pod, &spec)?;
            pod.proxies.push(proxy);
        }
        match kind.interception() {
            Interception::None => {}
            Interception::Iptables => {
                apply_istio_rules(&pod.netns.path())?;
                let rules = nat_rules(&pod.netns)?;
                ensure!(
                    rules.len() == ISTIO_RULE_COUNT,
                    "netns {} has {} nat rules after iptables-restore, expected {ISTIO_RULE_COUNT}: {rules:#?}",
                    pod.netns.name(),
                    rules.len()
                );
            }
            Interception::Ebpf => {
                self.sandbox.enroll(&pod.cgroup)?;
                ensure_no_nat_rule(&pod)?;
            }
        }
        Ok(pod)
    }

    fn start_proxy(&self, pod: &Pod, spec: &ProxySpec) -> Result<Child> {
        let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, spec.port));
        let command: Vec<OsString> = match spec.kind {
            ProxyKind::Redirector => {
                let mut command: Vec<OsString> = vec![
                    binary("redirector-proxy")?.into(),
                    "--quiet".into(),
                    "--listen".into(),
                    listen.to_string().into(),
                ];
                if let Some(upstream) = spec.fixed_upstream {
                    command.extend(["--fixed-upstream".into(), upstream.to_string().into()]);
                }
                command
            }
            ProxyKind::Haproxy => {
                let config = self.haproxy_configs.path().join(format!(
                    "{}-{}.cfg",
                    pod.kind.tag(),
                    spec.port
                ));
                std::fs::write(&config, haproxy_config(listen, spec.fixed_upstream))
                    .with_context(|| format!("writing {}", config.display()))?;
                vec!["haproxy".into(), "-db".into(), "-f".into(), config.into()]
            }
        };
        let command = pinned(self.cpus.proxy_and_server, command);
        let proxy = spawn_in_pod(&pod.netns, &pod.cgroup, Identity::PROXY, &command)?;
        wait_for_tcp_listener(proxy.pid(), spec.port, STARTUP_TIMEOUT).with_context(|| {
            format!(
                "waiting for {:?} in pod {} to listen{}",
                spec.kind,
                pod.kind.tag(),
                proxy.diagnostics()
            )
        })?;
        Ok(proxy)
    }

    fn pod_of(&self, variant: Variant) -> Result<&Pod> {
        self.pods
            .iter()
            .find(|pod| pod.kind == variant.pod())
            .with_context(|| format!("no pod for variant {}", variant.name()))
    }

    /// Where the variant's client connects.
    fn destination(&self, variant: Variant) -> Result<SocketAddr> {
        let pod = self.pod_of(variant)?;
        Ok(match variant {
            Variant::B1 => SocketAddr::from((Ipv4Addr::LOCALHOST, PROXY_PORT)),
            Variant::HaproxyB1 => SocketAddr::from((Ipv4Addr::LOCALHOST, PLAIN_HAPROXY_PORT)),
            _ => SocketAddr::from((pod.server_ip(), variant.server_port())),
        })
    }

    /// Runs one load generator for `variant` in its pod (as an application UID) and returns its
    /// report.
    pub fn run_load(
        &self,
        variant: Variant,
        workload: Workload,
        warmup: Duration,
        duration: Duration,
    ) -> Result<LoadReport> {
        let pod = self.pod_of(variant)?;
        let command = pinned(
            self.cpus.client,
            vec![
                binary("redirector-lab")?.into(),
                "load".into(),
                "--to".into(),
                self.destination(variant)?.to_string().into(),
                "--pattern".into(),
                workload.pattern_arg().into(),
                "--size".into(),
                workload.size().to_string().into(),
                "--warmup-ms".into(),
                warmup.as_millis().to_string().into(),
                "--duration-ms".into(),
                duration.as_millis().to_string().into(),
            ],
        );
        let client = spawn_in_pod(&pod.netns, &pod.cgroup, Identity::APP, &command)?;
        let output = client
            .wait_exit(warmup + duration + LOAD_SLACK)?
            .ensure_success()
            .with_context(|| format!("{} {} run", variant.name(), workload.name()))?;
        let last = output.stdout.lines().last().unwrap_or_default();
        serde_json::from_str(last).with_context(|| format!("parsing the load report {last:?}"))
    }

    /// Proof that the intercepting pods intercepted: connections redirected per pod (iptables:
    /// the REDIRECT rule's packet counter; eBPF: redirector's counter). Also checks again that
    /// the eBPF pods have no nat rule.
    pub fn interception_evidence(&self) -> Result<Vec<(&'static str, u64)>> {
        let mut evidence = Vec::new();
        for pod in &self.pods {
            let redirected = match pod.kind.interception() {
                Interception::None => continue,
                Interception::Iptables => redirect_rule_packets(&pod.netns)?,
                Interception::Ebpf => {
                    ensure_no_nat_rule(pod)?;
                    self.sandbox.counters(&pod.cgroup)?.redirected
                }
            };
            evidence.push((pod.kind.tag(), redirected));
        }
        Ok(evidence)
    }

    /// The server is still up (a crash would show as failed runs, but say why).
    pub fn check_server(&self) -> Result<()> {
        if let Some(status) = self.server.try_exit_status()? {
            bail!(
                "the lab server exited ({status}){}",
                self.server.diagnostics()
            );
        }
        Ok(())
    }
}

fn proxy_specs(kind: PodKind, server: Ipv4Addr, variants: &[Variant]) -> Vec<ProxySpec> {
    let original = |kind| ProxySpec {
        kind,
        port: PROXY_PORT,
        fixed_upstream: None,
    };
    match kind {
        PodKind::Plain => {
            let fixed = |variant: Variant, kind, port| ProxySpec {
                kind,
                port,
                fixed_upstream: Some(SocketAddr::from((server, variant.server_port()))),
            };
            let mut specs = Vec::new();
            if variants.contains(&Variant::B1) {
                specs.push(fixed(Variant::B1, ProxyKind::Redirector, PROXY_PORT));
            }
            if variants.contains(&Variant::HaproxyB1) {
                specs.push(fixed(
                    Variant::HaproxyB1,
                    ProxyKind::Haproxy,
                    PLAIN_HAPROXY_PORT,
                ));
            }
            specs
        }
        PodKind::Ipt | PodKind::Ebpf => vec![original(ProxyKind::Redirector)],
        PodKind::IptHaproxy | PodKind::EbpfHaproxy => vec![original(ProxyKind::Haproxy)],
    }
}

/// A minimal TCP proxy configuration; `server 0.0.0.0:0` forwards to each connection's
/// original destination (SO_ORIGINAL_DST).
fn haproxy_config(listen: SocketAddr, fixed_upstream: Option<SocketAddr>) -> String {
    let upstream = fixed_upstream.map_or("0.0.0.0:0".to_owned(), |addr| addr.to_string());
    format!(
        "global\n    maxconn 4096\n    nbthread 1\n\
         defaults\n    mode tcp\n    timeout connect 3s\n    timeout client 60s\n    timeout server 60s\n\
         frontend lab\n    bind {listen}\n    default_backend upstream\n\
         backend upstream\n    server upstream {upstream}\n"
    )
}

fn ensure_no_nat_rule(pod: &Pod) -> Result<()> {
    let rules = nat_rules(&pod.netns)?;
    ensure!(
        rules.is_empty(),
        "the eBPF pod's netns {} has nat rules: {rules:#?}",
        pod.netns.name()
    );
    Ok(())
}

/// Applies [`ISTIO_RULES`] in the netns at `netns_path` with `iptables-restore --noflush`, as
/// istio-init does, and returns how long that took. The child enters the netns itself before
/// exec, so only iptables-restore is timed (no `ip netns exec` or `nsenter` in between).
pub fn apply_istio_rules(netns_path: &Path) -> Result<Duration> {
    let netns = File::open(netns_path)
        .with_context(|| format!("opening netns {}", netns_path.display()))?;
    let netns_fd = netns.as_raw_fd();
    let mut command = Command::new("iptables-restore");
    command.arg("--noflush");
    // SAFETY: setns is async-signal-safe, and the closure touches nothing but the fd, which
    // stays open until the child has started.
    unsafe {
        command.pre_exec(move || {
            if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    run_timed(&mut command, ISTIO_RULES.as_bytes(), IPTABLES_TIMEOUT)
        .with_context(|| format!("applying the istio rules in {}", netns_path.display()))
}

/// Packets that hit the outbound REDIRECT rule: the first packet of each redirected connection.
fn redirect_rule_packets(netns: &Netns) -> Result<u64> {
    let mut command = netns.command("iptables-save");
    command.args(["-c", "-t", "nat"]);
    let output =
        redirector_tests::run("iptables-save", command, IPTABLES_TIMEOUT)?.ensure_success()?;
    let wanted = format!("-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {PROXY_PORT}");
    let line = output
        .stdout
        .lines()
        .find(|line| line.ends_with(&wanted))
        .with_context(|| format!("no `{wanted}` rule in netns {}", netns.name()))?;
    // `[packets:bytes] -A ...`
    line.strip_prefix('[')
        .and_then(|rest| rest.split_once(':'))
        .and_then(|(packets, _)| packets.parse().ok())
        .with_context(|| format!("no packet counter in {line:?}"))
}
