//! DNS in the end-to-end tests, with Debian's programs: dnsmasq as a real nameserver and as the
//! pod's DNS proxy (istio-agent's listener on 15053), a pod's own resolv.conf, glibc's resolver
//! through `getent`, `dig`, and `e2e-helper dns-query` for the two shapes of UDP client.

use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use crate::cgroup::Cgroup;
use crate::names::TempDir;
use crate::netns::Netns;
use crate::pod::{client_result, spawn_in_pod_with, ExecSettings, Identity};
use crate::process::{binary, Child, Output};
use crate::protocol::{ConnectSummary, DnsQueryOptions, DnsQueryReport};

/// The proxy's DNS port, where captured DNS goes (istio-agent's).
pub const PROXY_DNS_PORT: u16 = 15053;
pub const DNS_PORT: u16 = 53;

const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// A lookup's bound: glibc's resolv.conf below allows 2 tries of 1 s per server; dig is given
/// 2 s and one try.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(15);
/// e2e-helper dns-query waits 2 s for a reply, and stops at the first query without one.
const QUERY_LIMIT: Duration = Duration::from_secs(2);
/// What a run of many queries may take on a slow machine (a VM without KVM) at most.
const MANY_QUERIES_LIMIT: Duration = Duration::from_secs(600);

/// What a dnsmasq answers for and where it listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsmasqSettings {
    pub port: u16,
    pub listen: Vec<IpAddr>,
    /// (name, address) answered from its own records.
    pub records: Vec<(String, IpAddr)>,
    /// Where every other name is forwarded (none: not answered).
    pub upstream: Option<IpAddr>,
    /// One log line per query and per forward, on stderr.
    pub log_queries: bool,
}

/// A dnsmasq in a netns and cgroup, killed on drop.
pub struct Dnsmasq {
    pub process: Child,
}

impl Dnsmasq {
    /// Starts dnsmasq as `identity` (a port below 1024 needs root) and waits until it serves.
    pub fn start(
        netns: &Netns,
        cgroup: &Cgroup,
        identity: Identity,
        settings: &DnsmasqSettings,
    ) -> Result<Dnsmasq> {
        // No config file, no /etc/hosts, no resolv.conf: only what the settings say. Logs go to
        // stderr; --keep-in-foreground leaves the process where the harness can kill it.
        let mut command: Vec<OsString> = [
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--log-facility=-",
            "--pid-file=",
            "--no-hosts",
            "--no-resolv",
            "--bind-interfaces",
        ]
        .map(OsString::from)
        .into();
        command.push(format!("--port={}", settings.port).into());
        for addr in &settings.listen {
            command.push(format!("--listen-address={addr}").into());
        }
        for (name, addr) in &settings.records {
            command.push(format!("--host-record={name},{addr}").into());
        }
        if let Some(upstream) = settings.upstream {
            command.push(format!("--server={upstream}").into());
        }
        if settings.log_queries {
            command.push("--log-queries".into());
        }
        let process =
            spawn_in_pod_with(netns, cgroup, identity, &ExecSettings::default(), &command)?;
        // dnsmasq binds its sockets before it logs that it started.
        process
            .wait_for_stderr_line(|line| line.contains("started, version"), STARTUP_TIMEOUT)
            .with_context(|| format!("dnsmasq did not start{}", process.diagnostics()))?;
        Ok(Dnsmasq { process })
    }

    /// Its log lines that contain `text`.
    pub fn logged(&self, text: &str) -> Vec<String> {
        self.process
            .stderr_lines()
            .into_iter()
            .filter(|line| line.contains(text))
            .collect()
    }
}

/// A pod's own resolv.conf, in a temporary directory.
pub struct ResolvConf {
    path: PathBuf,
    _dir: TempDir,
}

impl ResolvConf {
    /// Names `nameservers`; a lookup tries each twice, 1 s apiece.
    pub fn create(nameservers: &[IpAddr]) -> Result<ResolvConf> {
        let dir = TempDir::create("resolv")?;
        let path = dir.path().join("resolv.conf");
        let mut text: String = nameservers
            .iter()
            .map(|server| format!("nameserver {server}\n"))
            .collect();
        text.push_str("options timeout:1 attempts:2\n");
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(ResolvConf { path, _dir: dir })
    }
}

/// Where a pod's process runs: its netns and cgroup, its identity, its resolv.conf.
#[derive(Clone, Copy)]
pub struct Resolver<'a> {
    pub netns: &'a Netns,
    pub cgroup: &'a Cgroup,
    pub identity: Identity,
    pub resolv_conf: &'a ResolvConf,
}

impl Resolver<'_> {
    fn spawn(&self, command: &[OsString]) -> Result<Child> {
        let settings = ExecSettings {
            resolv_conf: Some(self.resolv_conf.path.clone()),
            ..ExecSettings::default()
        };
        spawn_in_pod_with(self.netns, self.cgroup, self.identity, &settings, command)
    }

    fn run(&self, command: &[OsString], timeout: Duration) -> Result<Output> {
        self.spawn(command)?.wait_exit(timeout)
    }

    /// `getent hosts NAME`: glibc's resolver with the pod's resolv.conf. Its addresses; an
    /// error if the name did not resolve.
    pub fn getent(&self, name: &str) -> Result<Vec<IpAddr>> {
        let output = self
            .run(
                &["getent".into(), "hosts".into(), name.into()],
                LOOKUP_TIMEOUT,
            )?
            .ensure_success()
            .with_context(|| format!("getent hosts {name} as {:?}", self.identity))?;
        output
            .stdout
            .lines()
            .filter_map(|line| line.split_whitespace().next())
            .map(|addr| {
                addr.parse()
                    .with_context(|| format!("getent printed {:?}", output.stdout))
            })
            .collect()
    }

    /// `getent hosts NAME` gives `expected` alone.
    pub fn ensure_resolves(&self, name: &str, expected: IpAddr) -> Result<()> {
        let addresses = self.getent(name)?;
        ensure!(
            addresses == [expected],
            "getent hosts {name} as {:?} gave {addresses:?}, expected {expected}",
            self.identity
        );
        Ok(())
    }

    /// `dig @SERVER NAME A`, over TCP with `tcp`.
    pub fn dig(&self, server: IpAddr, name: &str, tcp: bool) -> Result<Dig> {
        let mut command: Vec<OsString> = vec![
            "dig".into(),
            format!("@{server}").into(),
            name.into(),
            "A".into(),
            "+time=2".into(),
            "+tries=1".into(),
        ];
        if tcp {
            command.push("+tcp".into());
        }
        let output = self.run(&command, LOOKUP_TIMEOUT)?;
        Dig::parse(&output.stdout).with_context(|| {
            format!(
                "`{}` as {:?}: {}{}",
                output.command_line, self.identity, output.stdout, output.stderr
            )
        })
    }

    /// One `e2e-helper dns-query`.
    pub fn query(&self, options: &DnsQueryOptions) -> Result<DnsQueryReport> {
        self.run_query(options)
    }

    /// `e2e-helper dns-query --count N`: its summary.
    pub fn queries(&self, options: &DnsQueryOptions) -> Result<ConnectSummary> {
        self.run_query(options)
    }

    fn run_query<T: serde::de::DeserializeOwned>(&self, options: &DnsQueryOptions) -> Result<T> {
        let mut command = vec![binary("e2e-helper")?.into_os_string(), "dns-query".into()];
        command.extend(options.to_args().into_iter().map(OsString::from));
        client_result(
            &self.spawn(&command)?,
            (QUERY_LIMIT * options.count).min(MANY_QUERIES_LIMIT) + STARTUP_TIMEOUT,
        )
    }
}

/// What dig printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dig {
    /// The A records of the answer section.
    pub answers: Vec<IpAddr>,
    /// Its `;; SERVER:` line: the server it says answered, and over what.
    pub server: String,
}

impl Dig {
    /// dig's own complaints (a reply from another address than asked, a timeout) make it fail.
    fn parse(stdout: &str) -> Result<Dig> {
        for complaint in ["unexpected source", "communications error", "no servers"] {
            ensure!(!stdout.contains(complaint), "dig says: {complaint}");
        }
        let answers = stdout
            .lines()
            .skip_while(|line| !line.starts_with(";; ANSWER SECTION:"))
            .skip(1)
            .take_while(|line| !line.trim().is_empty())
            .filter(|line| line.split_whitespace().nth(3) == Some("A"))
            .filter_map(|line| line.split_whitespace().nth(4)?.parse().ok())
            .collect();
        let server = stdout
            .lines()
            .find_map(|line| line.strip_prefix(";; SERVER: "))
            .context("no SERVER line")?
            .to_owned();
        Ok(Dig { answers, server })
    }

    /// The SERVER line names `server` on port 53 over `transport` (`UDP` or `TCP`).
    pub fn ensure_from(&self, server: IpAddr, transport: &str) -> Result<()> {
        let expected = format!("{server}#{DNS_PORT}({server}) ({transport})");
        ensure!(
            self.server == expected,
            "dig's answer came from {:?}, expected {expected:?}",
            self.server
        );
        Ok(())
    }
}

/// `addr:53`.
pub fn dns_server(addr: impl Into<IpAddr>) -> SocketAddr {
    SocketAddr::new(addr.into(), DNS_PORT)
}
