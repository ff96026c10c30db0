//! The policy parity test's pieces. A case is an istio-iptables command line with the rules it
//! makes (a golden of istio's, or a hand-written one); the same flags go to `redirector
//! enroll`. Each side of a case is a pod netns wired to a "world" netns that answers for every
//! remote address of the case: side A has the rules restored with iptables, side B is enrolled
//! with redirector. The same connects run on both sides, and whoever answered each one gives
//! the verdicts that must agree.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use ipnet::IpNet;

use crate::cgroup::Cgroup;
use crate::golden::{self, GoldenCase, Mapping, Rules};
use crate::names::TempDir;
use crate::netns::{ip, Netns};
use crate::pod::{spawn_in_pod, Identity, Sandbox};
use crate::process::{binary, run, Child};
use crate::protocol::{ConnectOutcome, ListenerReply, PlannedConnect, Reached, Transport};

/// The pod's addresses on its link to the world (the same on both sides).
pub const POD_V4: Ipv4Addr = Ipv4Addr::new(192, 168, 200, 1);
const WORLD_V4: Ipv4Addr = Ipv4Addr::new(192, 168, 200, 2);
pub const POD_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 1);
const WORLD_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 2);
const POD_MAC: &str = "02:00:00:00:00:01";
const WORLD_MAC: &str = "02:00:00:00:00:02";
/// Remote addresses in none of a case's CIDRs.
const NOWHERE_V4: Ipv4Addr = Ipv4Addr::new(172, 20, 0, 7);
const NOWHERE_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 7);
/// istio's inbound passthrough source addresses (istio-init adds ::6 to lo with IPv6 on).
const PASSTHROUGH_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
const PASSTHROUGH_V6: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);
/// istio-agent's DNS port, where captured DNS goes.
const DNS_CAPTURE_PORT: u16 = 15053;
const DNS_PORT: u16 = 53;
/// Ports every case tries besides those its flags name.
const PLAIN_PORT: u16 = 80;
/// The ports UDP probes go to: DNS, which `--redirect-dns` captures, and one never captured.
const UDP_PORTS: [u16; 2] = [DNS_PORT, PLAIN_PORT];
/// Source ports of a case's UDP probes, one each: above the ports the cases listen on or
/// capture to.
const UDP_SOURCE_PORTS: std::ops::Range<u16> = 20_000..65_000;

const ROOT: Identity = Identity { uid: 0, gid: 0 };
const LISTENER_STARTUP: Duration = Duration::from_secs(10);
/// e2e-helper connect-batch's worst case per connect (connect and reply timeouts).
const PER_CONNECT_LIMIT: Duration = Duration::from_secs(4);
const BATCH_SLACK: Duration = Duration::from_secs(10);
const RESTORE_TIMEOUT: Duration = Duration::from_secs(20);

/// istio-iptables flags without a value.
const SWITCHES: &[&str] = &[
    "--redirect-dns",
    "--capture-all-dns",
    "--dual-stack",
    "--drop-invalid",
    "-n",
    "--dry-run",
];

/// Flags redirector refuses by design, and why dropping them changes no decision here.
const REFUSED: &[(&str, &str)] = &[
    (
        "-k",
        "its rules are in nat PREROUTING, which connections made in the pod never reach",
    ),
    (
        "-c",
        "it exempts traffic leaving through that interface, which these pods do not have",
    ),
    (
        "--drop-invalid",
        "it drops conntrack-INVALID packets (mangle PREROUTING); it decides no capture",
    ),
];

/// The environment settings of istio-iptables and the redirector flags that take them.
const ENV_FLAGS: &[(&str, &str)] = &[
    ("ISTIO_OUTBOUND_OWNER_GROUPS", "--owner-groups-include"),
    (
        "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
        "--owner-groups-exclude",
    ),
    ("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "--ipv4-loopback-cidr"),
];

/// Where a case's flags and rules come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// istio's own golden for the flags.
    Golden,
    /// Written by hand in the order of istio's run.go, for rules no golden covers.
    Synthesized,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Origin::Golden => "istio golden",
            Origin::Synthesized => "synthesized from run.go",
        })
    }
}

/// The pod's addresses, which decide whether istio-iptables turns IPv6 on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stack {
    /// IPv4 and IPv6 addresses, IPv4 listed first: IPv6 stays off.
    Ipv4First,
    /// IPv6 addresses only: IPv6 on (and ::6 on lo, as istio-init adds it).
    Ipv6Only,
    /// Both, with --dual-stack: IPv6 on.
    DualStack,
}

impl Stack {
    fn has_ipv4(self) -> bool {
        self != Stack::Ipv6Only
    }

    fn ipv6_on(self) -> bool {
        self != Stack::Ipv4First
    }
}

/// The settings of a case that shape its matrix, read from istio-iptables' flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub proxy_port: u16,
    pub inbound_port: u16,
    pub tunnel_port: u16,
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
    pub owner_groups: Vec<u32>,
    /// Ports named by -q, -o, -b, -d.
    pub named_ports: Vec<u16>,
    /// (flag, CIDR) of -i and -x.
    pub cidrs: Vec<(&'static str, IpNet)>,
    pub dns_servers: Vec<IpAddr>,
}

/// One case of the parity test.
#[derive(Debug, Clone)]
pub struct ParityCase {
    pub name: String,
    pub origin: Origin,
    /// istio-iptables' command line, addresses and groups mapped.
    pub istio_flags: Vec<String>,
    /// istio-iptables' environment settings, mapped.
    pub env: BTreeMap<String, String>,
    /// The rules of `istio_flags`, mapped.
    pub rules: Rules,
    /// The arguments after `redirector enroll --cgroup DIR --netns PATH`.
    pub redirector_flags: Vec<String>,
    /// How `redirector_flags` differ from `istio_flags`, and why.
    pub adjustments: Vec<String>,
    pub stack: Stack,
    pub settings: Settings,
}

/// Every case: istio's goldens from the shared reference data, then the synthesized ones
/// beside this crate (`parity-cases/`).
pub fn load_cases() -> Result<Vec<ParityCase>> {
    let mapping = Mapping::for_istio_goldens();
    let synthesized = Path::new(env!("CARGO_MANIFEST_DIR")).join("parity-cases");
    let mut cases = Vec::new();
    for (origin, dir) in [
        (Origin::Golden, golden::istio_golden_dir()?),
        (Origin::Synthesized, synthesized),
    ] {
        for case in golden::read_cases(&dir)? {
            let rules = golden::read_rules(&dir, &case.name)?;
            cases.push(
                ParityCase::new(origin, &case, &rules, &mapping)
                    .with_context(|| format!("case {} of {}", case.name, dir.display()))?,
            );
        }
    }
    Ok(cases)
}

/// istio-iptables' flags as (flag, value) pairs; switches have no value.
fn flag_pairs(flags: &[String]) -> Result<Vec<(String, Option<String>)>> {
    let mut pairs = Vec::new();
    let mut words = flags.iter();
    while let Some(flag) = words.next() {
        ensure!(flag.starts_with('-'), "{flag:?} is not a flag");
        let value = if SWITCHES.contains(&flag.as_str()) {
            None
        } else {
            Some(
                words
                    .next()
                    .with_context(|| format!("{flag} has no value"))?
                    .clone(),
            )
        };
        pairs.push((flag.clone(), value));
    }
    Ok(pairs)
}

fn items(list: &str) -> impl Iterator<Item = &str> {
    list.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty() && *item != "*")
}

fn numbers<T: std::str::FromStr>(flag: &str, list: &str) -> Result<Vec<T>> {
    items(list)
        .map(|item| {
            item.parse()
                .map_err(|_| anyhow::anyhow!("{flag}: {item:?} is not a number"))
        })
        .collect()
}

impl ParityCase {
    pub fn new(
        origin: Origin,
        case: &GoldenCase,
        rules: &Rules,
        mapping: &Mapping,
    ) -> Result<ParityCase> {
        let istio_flags: Vec<String> = case
            .flags
            .iter()
            .map(|flag| mapping.map_text(flag))
            .collect::<Result<_>>()?;
        let env: BTreeMap<String, String> = case
            .env()
            .into_iter()
            .map(|(name, value)| Ok((name, mapping.map_text(&value)?)))
            .collect::<Result<_>>()?;
        let rules = Rules {
            ipv4: mapping.map_text(&rules.ipv4)?,
            ipv6: rules
                .ipv6
                .as_deref()
                .map(|v6| mapping.map_text(v6))
                .transpose()?,
        };
        let pairs = flag_pairs(&istio_flags)?;
        let dual_stack = pairs.iter().any(|(flag, _)| flag == "--dual-stack");
        let stack = match (rules.ipv6.is_some(), dual_stack) {
            (false, _) => Stack::Ipv4First,
            (true, false) => Stack::Ipv6Only,
            (true, true) => Stack::DualStack,
        };
        let dns_servers = rules.dns_servers()?;
        let settings = settings(&pairs, &env, dns_servers.clone())?;
        let (redirector_flags, adjustments) = redirector_flags(&pairs, &env, &dns_servers)?;
        Ok(ParityCase {
            name: case.name.clone(),
            origin,
            istio_flags,
            env,
            rules,
            redirector_flags,
            adjustments,
            stack,
            settings,
        })
    }

    /// Every process identity tried: an application, each proxy UID and GID alone, and each
    /// owner group.
    pub fn identities(&self) -> Vec<Identity> {
        let app = Identity::APP;
        let mut identities = vec![app];
        identities.extend(
            self.settings
                .uids
                .iter()
                .map(|&uid| Identity { uid, gid: app.gid }),
        );
        identities.extend(
            self.settings
                .gids
                .iter()
                .chain(&self.settings.owner_groups)
                .map(|&gid| Identity { uid: app.uid, gid }),
        );
        unique_by(identities, |identity| *identity)
    }

    /// Every destination port tried.
    pub fn ports(&self) -> Vec<u16> {
        let s = &self.settings;
        let mut ports = vec![
            PLAIN_PORT,
            DNS_PORT,
            s.tunnel_port,
            s.proxy_port,
            s.inbound_port,
        ];
        ports.extend(&s.named_ports);
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    /// Every port something must listen on, in the pod and in the world.
    pub fn listening_ports(&self) -> Vec<u16> {
        let mut ports = self.ports();
        ports.push(DNS_CAPTURE_PORT);
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    /// Every destination address tried, with what it stands for.
    pub fn destinations(&self) -> Result<Vec<Destination>> {
        let ipv4 = self.stack.has_ipv4();
        let mut list = vec![
            Destination::new(Ipv4Addr::LOCALHOST.into(), "loopback"),
            Destination::new(Ipv4Addr::new(127, 0, 0, 2).into(), "loopback"),
        ];
        let cidrs = self
            .settings
            .cidrs
            .iter()
            .map(|(flag, cidr)| (representative(*cidr), format!("in {flag} {cidr}")));
        let servers = self
            .settings
            .dns_servers
            .iter()
            .map(|&server| (server, "DNS server".to_owned()));
        for (addr, what) in cidrs.chain(servers) {
            // An IPv6-only pod has no IPv4 route: its remote IPv4 connects fail before any
            // rule is consulted.
            if addr.is_ipv4() && !ipv4 && !addr.is_loopback() {
                continue;
            }
            list.push(Destination::new(addr, &what));
        }
        if ipv4 {
            list.push(Destination::new(POD_V4.into(), "pod"));
            list.push(Destination::new(NOWHERE_V4.into(), "in no CIDR"));
        }
        list.push(Destination::new(Ipv6Addr::LOCALHOST.into(), "loopback"));
        list.push(Destination::new(POD_V6.into(), "pod"));
        if self.stack.ipv6_on() {
            list.push(Destination::new(PASSTHROUGH_V6.into(), "pod (::6 on lo)"));
        }
        list.push(Destination::new(NOWHERE_V6.into(), "in no CIDR"));
        let mapped: Vec<Destination> = list
            .iter()
            .filter_map(|d| match d.addr {
                IpAddr::V4(v4) if v4 != Ipv4Addr::LOCALHOST => Some(Destination {
                    addr: v4.to_ipv6_mapped().into(),
                    what: format!("{}, IPv4-mapped", d.what),
                }),
                _ => None,
            })
            .collect();
        list.extend(mapped);
        let list = unique_by(list, |destination| destination.addr);
        for (flag, cidr) in &self.settings.cidrs {
            for nowhere in [IpAddr::from(NOWHERE_V4), NOWHERE_V6.into()] {
                ensure!(
                    !cidr.contains(&nowhere),
                    "{flag} {cidr} holds {nowhere}, the address meant to be in no CIDR"
                );
            }
        }
        Ok(list)
    }

    /// The remote destinations, which the world answers for.
    pub fn remote_addresses(&self) -> Result<Vec<IpAddr>> {
        let remote = self
            .destinations()?
            .iter()
            .filter(|d| !d.is_local())
            .map(|d| canonical(d.addr))
            .collect();
        Ok(unique_by(remote, |addr| *addr))
    }

    /// The source addresses to bind for `destination`: none, and istio's passthrough address
    /// for local destinations (where the pod has it).
    fn sources(&self, destination: &Destination) -> Vec<Option<IpAddr>> {
        let mut sources = vec![None];
        if destination.is_local() {
            match destination.addr {
                IpAddr::V4(_) => sources.push(Some(PASSTHROUGH_V4.into())),
                IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => {
                    sources.push(Some(PASSTHROUGH_V4.to_ipv6_mapped().into()))
                }
                IpAddr::V6(_) if self.stack.ipv6_on() => sources.push(Some(PASSTHROUGH_V6.into())),
                IpAddr::V6(_) => {}
            }
        }
        sources
    }

    /// Every (transport, destination port) tried: TCP to every port of [`Self::ports`]; UDP,
    /// from unconnected and connected sockets, to DNS and to a port that is never captured.
    pub fn transports_and_ports(&self) -> Vec<(Transport, u16)> {
        let tcp = self.ports().into_iter().map(|port| (Transport::Tcp, port));
        let udp = [Transport::Udp, Transport::UdpConnected]
            .into_iter()
            .flat_map(|transport| UDP_PORTS.map(|port| (transport, port)));
        tcp.chain(udp).collect()
    }

    /// The matrix: every identity × destination × (transport, port) × source.
    ///
    /// Each UDP probe of a case has a source port of its own: conntrack knows a flow by its
    /// addresses and ports, not by its socket, so on the iptables side a datagram from a port
    /// that an earlier probe of another identity used (the kernel's random pick can repeat)
    /// would follow that probe's NAT entry whatever the rules say for its own identity.
    pub fn probes(&self) -> Result<Vec<Probe>> {
        let destinations = self.destinations()?;
        let transports_and_ports = self.transports_and_ports();
        let mut probes = Vec::new();
        let mut udp_source_ports = UDP_SOURCE_PORTS;
        for identity in self.identities() {
            for destination in &destinations {
                for &(transport, port) in &transports_and_ports {
                    for bind in self.sources(destination) {
                        let source_port = match transport {
                            Transport::Tcp => None,
                            Transport::Udp | Transport::UdpConnected => Some(
                                udp_source_ports
                                    .next()
                                    .context("more UDP probes than source ports")?,
                            ),
                        };
                        probes.push(Probe {
                            identity,
                            connect: PlannedConnect {
                                to: SocketAddr::new(destination.addr, port),
                                bind,
                                transport,
                                source_port,
                            },
                            what: destination.what.clone(),
                        });
                    }
                }
            }
        }
        Ok(probes)
    }
}

fn settings(
    pairs: &[(String, Option<String>)],
    env: &BTreeMap<String, String>,
    dns_servers: Vec<IpAddr>,
) -> Result<Settings> {
    let value = |flag: &str| {
        pairs
            .iter()
            .rev()
            .find(|(f, _)| f == flag)
            .and_then(|(_, v)| v.as_deref())
    };
    let port = |flag: &str, default: u16| -> Result<u16> {
        value(flag).map_or(Ok(default), |v| {
            v.parse().with_context(|| format!("{flag} {v:?}"))
        })
    };
    let uids: Vec<u32> = numbers("-u", value("-u").unwrap_or("1337"))?;
    let gids = match value("-g") {
        Some(list) => numbers("-g", list)?,
        None => uids.clone(),
    };
    let mut named_ports = Vec::new();
    for flag in ["-q", "-o", "-b", "-d"] {
        named_ports.extend(numbers::<u16>(flag, value(flag).unwrap_or(""))?);
    }
    let mut cidrs = Vec::new();
    for flag in ["-i", "-x"] {
        for item in items(value(flag).unwrap_or("")) {
            let cidr: IpNet = item.parse().with_context(|| format!("{flag} {item:?}"))?;
            cidrs.push((flag, cidr));
        }
    }
    let mut owner_groups = Vec::new();
    for name in [
        "ISTIO_OUTBOUND_OWNER_GROUPS",
        "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
    ] {
        owner_groups.extend(numbers::<u32>(
            name,
            env.get(name).map_or("", String::as_str),
        )?);
    }
    Ok(Settings {
        proxy_port: port("-p", 15001)?,
        inbound_port: port("-z", 15006)?,
        tunnel_port: port("-e", 15008)?,
        uids,
        gids,
        owner_groups,
        named_ports,
        cidrs,
        dns_servers,
    })
}

/// istio-iptables' flags as `redirector enroll` takes them, and the list of changes.
fn redirector_flags(
    pairs: &[(String, Option<String>)],
    env: &BTreeMap<String, String>,
    dns_servers: &[IpAddr],
) -> Result<(Vec<String>, Vec<String>)> {
    let mut flags = Vec::new();
    let mut adjustments = Vec::new();
    for (flag, value) in pairs {
        let shown = match value {
            Some(value) => format!("{flag} {}", quote(value)),
            None => flag.clone(),
        };
        if let Some((_, why)) = REFUSED.iter().find(|(refused, _)| refused == flag) {
            adjustments.push(format!("{shown} dropped (refused by redirector): {why}"));
            continue;
        }
        if flag == "-n" || flag == "--dry-run" {
            adjustments.push(format!(
                "{shown} dropped: it only makes istio-iptables print the rules"
            ));
            continue;
        }
        flags.push(flag.clone());
        flags.extend(value.clone());
    }
    if !pairs.iter().any(|(flag, _)| flag == "-i") {
        flags.extend(["-i".to_owned(), String::new()]);
        adjustments.push("-i '' added: istio-iptables' default (redirector's is '*')".into());
    }
    if pairs.iter().any(|(flag, _)| flag == "--redirect-dns") {
        let list = dns_servers
            .iter()
            .map(IpAddr::to_string)
            .collect::<Vec<_>>()
            .join(",");
        adjustments.push(format!(
            "--dns-servers {} added: the servers of the rules (istio-iptables read resolv.conf)",
            quote(&list)
        ));
        flags.extend(["--dns-servers".to_owned(), list]);
    }
    for (name, value) in env {
        let Some((_, flag)) = ENV_FLAGS.iter().find(|(env_name, _)| env_name == name) else {
            bail!("no redirector flag known for the environment setting {name}");
        };
        adjustments.push(format!("env {name}={value} given as {flag} {value}"));
        flags.extend([flag.to_string(), value.clone()]);
    }
    Ok((flags, adjustments))
}

/// `word` as a shell reads it back: single-quoted when empty or holding a special character.
fn quote(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./:,=@+".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// A command line for showing.
pub fn shell_line(words: &[String]) -> String {
    words
        .iter()
        .map(|word| quote(word))
        .collect::<Vec<_>>()
        .join(" ")
}

/// An address inside `cidr`: its seventh host where it has one, else its first address.
fn representative(cidr: IpNet) -> IpAddr {
    let network = cidr.network();
    if cidr.max_prefix_len() - cidr.prefix_len() < 3 {
        return cidr.addr();
    }
    match network {
        IpAddr::V4(v4) => Ipv4Addr::from(u32::from(v4) + 7).into(),
        IpAddr::V6(v6) => Ipv6Addr::from(u128::from(v6) + 7).into(),
    }
}

/// IPv4-mapped addresses as IPv4.
fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

/// `items` without the later ones whose key an earlier one has.
fn unique_by<T, K: PartialEq>(items: Vec<T>, key: impl Fn(&T) -> K) -> Vec<T> {
    let mut unique: Vec<T> = Vec::with_capacity(items.len());
    for item in items {
        if !unique.iter().any(|seen| key(seen) == key(&item)) {
            unique.push(item);
        }
    }
    unique
}

/// A destination address and what it stands for in the case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub addr: IpAddr,
    pub what: String,
}

impl Destination {
    fn new(addr: IpAddr, what: &str) -> Destination {
        Destination {
            addr,
            what: what.to_owned(),
        }
    }

    /// Routed through the pod's loopback interface: loopback and the pod's own addresses.
    fn is_local(&self) -> bool {
        let addr = canonical(self.addr);
        addr.is_loopback()
            || addr == IpAddr::from(POD_V4)
            || addr == IpAddr::from(POD_V6)
            || addr == IpAddr::from(PASSTHROUGH_V6)
    }
}

/// One connect of the matrix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub identity: Identity,
    pub connect: PlannedConnect,
    /// What the destination stands for.
    pub what: String,
}

/// Where a connect ended up, told by whoever answered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Reached the destination it asked for.
    Pass,
    /// Captured: reached this loopback address instead.
    To(SocketAddr),
    /// Failed (`refused`, `timeout`, ...): the topology is wrong, not the policy.
    Failed(String),
    /// Reached something else: the topology is wrong.
    Elsewhere(ListenerReply),
}

impl Verdict {
    pub fn classify(connect: &PlannedConnect, reached: &Reached) -> Verdict {
        match reached {
            Reached::Failed(kind) => Verdict::Failed(kind.clone()),
            Reached::Answered(reply) => {
                let local = SocketAddr::new(canonical(reply.local.ip()), reply.local.port());
                let asked = SocketAddr::new(canonical(connect.to.ip()), connect.to.port());
                if local == asked {
                    Verdict::Pass
                } else if local.ip().is_loopback() {
                    Verdict::To(local)
                } else {
                    Verdict::Elsewhere(reply.clone())
                }
            }
        }
    }

    /// A pass or a capture: something a policy decided.
    pub fn is_decision(&self) -> bool {
        matches!(self, Verdict::Pass | Verdict::To(_))
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Pass => f.write_str("pass"),
            Verdict::To(addr) => write!(f, "->{addr}"),
            Verdict::Failed(kind) => write!(f, "FAILED {kind}"),
            Verdict::Elsewhere(reply) => write!(f, "ELSEWHERE {}@{}", reply.tag, reply.local),
        }
    }
}

/// One probe's verdicts on both sides.
#[derive(Debug, Clone)]
pub struct Row {
    pub probe: Probe,
    pub iptables: Verdict,
    pub redirector: Verdict,
}

impl Row {
    pub fn agrees(&self) -> bool {
        self.iptables == self.redirector
    }
}

/// A pod netns and its world netns, with listeners in both. Fields drop in order: the
/// listeners first, then the namespaces (which take the veth with them).
pub struct Side {
    pub listeners: Vec<Child>,
    pub pod: Netns,
    pub world: Netns,
}

impl Side {
    /// The topology of `case`; nothing captures yet.
    pub fn create(tag: &str, case: &ParityCase, listener_cgroup: &Cgroup) -> Result<Side> {
        let pod = Netns::create(tag)?;
        let world = Netns::create(&format!("{tag}w"))?;
        let (p, w) = (pod.name(), world.name());
        let link = "veth0";
        ip(&[
            "link", "add", link, "address", POD_MAC, "netns", p, "type", "veth", "peer", "name",
            link, "address", WORLD_MAC, "netns", w,
        ])?;
        // Fixed neighbours: no connect waits on ARP or on neighbour discovery, which drops its
        // first solicitations while a fresh link's IPv6 is not ready yet.
        for (netns, addr, mac) in [
            (p, IpAddr::from(WORLD_V4), WORLD_MAC),
            (p, WORLD_V6.into(), WORLD_MAC),
            (w, POD_V4.into(), POD_MAC),
            (w, POD_V6.into(), POD_MAC),
        ] {
            let addr = addr.to_string();
            ip(&[
                "-n",
                netns,
                "neigh",
                "add",
                &addr,
                "lladdr",
                mac,
                "dev",
                link,
                "nud",
                "permanent",
            ])?;
        }
        let pod_v6 = format!("{POD_V6}/64");
        let world_v6 = format!("{WORLD_V6}/64");
        let world_v4 = format!("{WORLD_V4}/24");
        ip(&["-n", w, "addr", "add", &world_v4, "dev", link])?;
        ip(&[
            "-n", w, "-6", "addr", "add", &world_v6, "dev", link, "nodad",
        ])?;
        if case.stack.has_ipv4() {
            let pod_v4 = format!("{POD_V4}/24");
            ip(&["-n", p, "addr", "add", &pod_v4, "dev", link])?;
        }
        ip(&["-n", p, "-6", "addr", "add", &pod_v6, "dev", link, "nodad"])?;
        if case.stack.ipv6_on() {
            ip(&["-n", p, "-6", "addr", "add", "::6/128", "dev", "lo"])?;
        }
        for netns in [p, w] {
            ip(&["-n", netns, "link", "set", link, "up"])?;
        }
        if case.stack.has_ipv4() {
            ip(&[
                "-n",
                p,
                "route",
                "add",
                "default",
                "via",
                &WORLD_V4.to_string(),
            ])?;
        }
        ip(&[
            "-n",
            p,
            "-6",
            "route",
            "add",
            "default",
            "via",
            &WORLD_V6.to_string(),
        ])?;
        // AnyIP: the world owns every remote destination of the case.
        for addr in case.remote_addresses()? {
            let host = IpNet::from(addr).to_string();
            let family = if addr.is_ipv4() { "-4" } else { "-6" };
            ip(&["-n", w, family, "route", "add", "local", &host, "dev", "lo"])?;
        }
        let ports = case
            .listening_ports()
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(",");
        // The pod's listener stands for every server in the pod, the proxy's DNS listener on
        // 15053 among them: it runs as the proxy, whose answers istio-iptables puts in the
        // application's conntrack zone (raw table, `--sport 15053 --uid-owner`); as another
        // user, a captured UDP query's answer would not be translated back. Its ports below
        // 1024 need no privilege in the pod's netns.
        pod.sysctl("net.ipv4.ip_unprivileged_port_start", "0")?;
        let proxy = Identity {
            uid: *case.settings.uids.first().context("no proxy UID")?,
            gid: *case.settings.gids.first().context("no proxy GID")?,
        };
        let mut listeners = Vec::new();
        for (netns, tag, identity) in [(&pod, "pod", proxy), (&world, "world", ROOT)] {
            let command = [
                binary("e2e-helper")?.into_os_string(),
                "listen".into(),
                "--tag".into(),
                tag.into(),
                "--ports".into(),
                ports.clone().into(),
                "--udp".into(),
            ];
            let listener = spawn_in_pod(netns, listener_cgroup, identity, &command)?;
            listener.wait_for_line(|line| line == "listening", LISTENER_STARTUP)?;
            listeners.push(listener);
        }
        Ok(Side {
            listeners,
            pod,
            world,
        })
    }

    /// Restores the case's rules into the pod netns, as istio-init does.
    pub fn restore_rules(&self, rules: &Rules) -> Result<()> {
        let dir = TempDir::create("parity-rules")?;
        for (tool, text) in [
            ("iptables-restore", Some(&rules.ipv4)),
            ("ip6tables-restore", rules.ipv6.as_ref()),
        ] {
            let Some(text) = text else { continue };
            let file = dir.path().join(tool);
            std::fs::write(&file, text).with_context(|| format!("writing {}", file.display()))?;
            let mut command = self.pod.command(tool);
            command.arg("--noflush").arg(&file);
            run(tool, command, RESTORE_TIMEOUT)?
                .ensure_success()
                .with_context(|| {
                    format!("restoring the rules in netns {}:\n{text}", self.pod.name())
                })?;
        }
        Ok(())
    }

    /// Starts one `e2e-helper connect-batch` for `identity` in the pod, in `cgroup`.
    pub fn spawn_batch(
        &self,
        cgroup: &Cgroup,
        identity: Identity,
        plan: &[PlannedConnect],
    ) -> Result<Batch> {
        let command = [
            binary("e2e-helper")?.into_os_string(),
            "connect-batch".into(),
            "--plan".into(),
            serde_json::to_string(plan)?.into(),
        ];
        let process = spawn_in_pod(&self.pod, cgroup, identity, &command)?;
        Ok(Batch {
            process,
            plan: plan.to_vec(),
        })
    }
}

/// A running `e2e-helper connect-batch`.
pub struct Batch {
    process: Child,
    plan: Vec<PlannedConnect>,
}

impl Batch {
    /// Waits for the batch and returns its verdicts in plan order.
    pub fn verdicts(self) -> Result<Vec<Verdict>> {
        let limit = PER_CONNECT_LIMIT * self.plan.len() as u32 + BATCH_SLACK;
        let output = self.process.wait_exit(limit)?.ensure_success()?;
        let outcomes: Vec<ConnectOutcome> = output
            .stdout
            .lines()
            .map(|line| serde_json::from_str(line).with_context(|| format!("batch line {line:?}")))
            .collect::<Result<_>>()?;
        ensure!(
            outcomes.len() == self.plan.len(),
            "{} outcomes for {} planned connects",
            outcomes.len(),
            self.plan.len()
        );
        outcomes
            .iter()
            .zip(&self.plan)
            .map(|(outcome, planned)| {
                ensure!(
                    &outcome.connect == planned,
                    "outcome {outcome:?} out of plan order"
                );
                Ok(Verdict::classify(planned, &outcome.reached))
            })
            .collect()
    }
}

/// Runs `case` on both sides and returns one row per probe.
pub fn run_case(sandbox: &Sandbox, case: &ParityCase) -> Result<Vec<Row>> {
    let listeners = sandbox.cgroup(&format!("{}-listeners", case.name))?;
    let iptables_pod = sandbox.cgroup(&format!("{}-iptables", case.name))?;
    let redirector_pod = sandbox.cgroup(&format!("{}-redirector", case.name))?;
    let iptables = Side::create("pi", case, &listeners)?;
    iptables.restore_rules(&case.rules)?;
    let redirector = Side::create("pr", case, &listeners)?;
    let mut enroll = vec![
        "enroll".to_owned(),
        "--cgroup".to_owned(),
        redirector_pod.path().display().to_string(),
        "--netns".to_owned(),
        redirector.pod.path().display().to_string(),
    ];
    enroll.extend(case.redirector_flags.iter().cloned());
    sandbox
        .redirector(&enroll)?
        .ensure_success()
        .with_context(|| format!("enrolling case {}", case.name))?;

    let probes = case.probes()?;
    let mut plans: BTreeMap<(u32, u32), Vec<PlannedConnect>> = BTreeMap::new();
    for probe in &probes {
        plans
            .entry((probe.identity.uid, probe.identity.gid))
            .or_default()
            .push(probe.connect);
    }
    // Every batch of both sides at once; each side's verdicts are independent.
    let mut batches = Vec::new();
    for (&(uid, gid), plan) in &plans {
        let identity = Identity { uid, gid };
        batches.push((
            iptables.spawn_batch(&iptables_pod, identity, plan)?,
            redirector.spawn_batch(&redirector_pod, identity, plan)?,
        ));
    }
    let mut verdicts: BTreeMap<(u32, u32), (Vec<Verdict>, Vec<Verdict>)> = BTreeMap::new();
    for ((key, _), (a, b)) in plans.iter().zip(batches) {
        verdicts.insert(*key, (a.verdicts()?, b.verdicts()?));
    }
    let unenrolled = sandbox.unenroll(&redirector_pod)?;
    ensure!(
        unenrolled.success(),
        "unenrolling case {}: {}",
        case.name,
        unenrolled.stderr
    );

    let mut next: BTreeMap<(u32, u32), usize> = BTreeMap::new();
    Ok(probes
        .into_iter()
        .map(|probe| {
            let key = (probe.identity.uid, probe.identity.gid);
            let index = next.entry(key).or_default();
            let (a, b) = &verdicts[&key];
            let row = Row {
                iptables: a[*index].clone(),
                redirector: b[*index].clone(),
                probe,
            };
            *index += 1;
            row
        })
        .collect())
}

/// The table of one case: a header with both command lines, then one line per row.
pub fn render_case(case: &ParityCase, rows: &[Row]) -> String {
    let mut text = String::new();
    let disagreeing = rows.iter().filter(|row| !row.agrees()).count();
    let _ = writeln!(
        text,
        "== {} ({}, {:?}): {} rows, {}",
        case.name,
        case.origin,
        case.stack,
        rows.len(),
        if disagreeing == 0 {
            "all agree".to_owned()
        } else {
            format!("{disagreeing} DISAGREE")
        }
    );
    let env: String = case
        .env
        .iter()
        .map(|(name, value)| format!("{name}={value} "))
        .collect();
    let _ = writeln!(
        text,
        "   istio-iptables:    {env}{}",
        shell_line(&case.istio_flags)
    );
    let _ = writeln!(
        text,
        "   redirector enroll: {}",
        shell_line(&case.redirector_flags)
    );
    for adjustment in &case.adjustments {
        let _ = writeln!(text, "     - {adjustment}");
    }
    let _ = writeln!(text, "{}", render_header());
    for row in rows {
        let _ = writeln!(text, "{}", render_row(&case.name, row));
    }
    text
}

pub fn render_header() -> String {
    format!(
        "{:<40} {:<10} {:<16} {:<28} {:<5} {:>5}  {:<38} {:<22} {:<22} {}",
        "case",
        "uid:gid",
        "src",
        "dst",
        "proto",
        "port",
        "dst is",
        "iptables",
        "redirector",
        "agree"
    )
}

pub fn render_row(case: &str, row: &Row) -> String {
    let connect = &row.probe.connect;
    format!(
        "{:<40} {:<10} {:<16} {:<28} {:<5} {:>5}  {:<38} {:<22} {:<22} {}",
        case,
        format!("{}:{}", row.probe.identity.uid, row.probe.identity.gid),
        connect.bind.map_or("-".to_owned(), |ip| ip.to_string()),
        connect.to.ip().to_string(),
        connect.transport.name(),
        connect.to.port(),
        row.probe.what,
        row.iptables.to_string(),
        row.redirector.to_string(),
        if row.agrees() { "yes" } else { "NO" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case(flags: &str, notes: &str, rules: &str) -> ParityCase {
        let golden = GoldenCase {
            name: "t".into(),
            flags: shlex::split(flags).unwrap(),
            notes: notes.into(),
        };
        let rules = golden::parse_rules(rules).unwrap();
        ParityCase::new(
            Origin::Golden,
            &golden,
            &rules,
            &Mapping::for_istio_goldens(),
        )
        .unwrap()
    }

    const V4_RULES: &str = "* nat\n-A ISTIO_OUTPUT_DNS -p tcp --dport 53 -d 127.0.0.53/32 -j REDIRECT --to-ports 15053\nCOMMIT\n";
    const V4_V6_RULES: &str =
        "* nat\nCOMMIT\n* nat\n-A ISTIO_OUTPUT -d 2001:db8::/32 -j RETURN\nCOMMIT\n";

    #[test]
    fn flags_translate_for_redirector_with_each_change_listed() {
        let c = case(
            "-p 15001 -z 15006 -u 3,4 -g 1,2 -m REDIRECT -k eth0 -i 9.9.0.0/16 -x 1.1.0.0/16 --redirect-dns -n",
            "env ISTIO_OUTBOUND_OWNER_GROUPS=java,202 (env only)",
            V4_RULES,
        );
        assert_eq!(
            shell_line(&c.redirector_flags),
            "-p 15001 -z 15006 -u 3,4 -g 1,2 -m REDIRECT -i 10.99.0.0/16 -x 10.11.0.0/16 \
             --redirect-dns --dns-servers 127.0.0.53 --owner-groups-include 2020,202"
        );
        assert_eq!(c.adjustments.len(), 4, "{:?}", c.adjustments);
        assert!(c.adjustments[0].starts_with("-k eth0 dropped"));
        assert!(c.adjustments[1].starts_with("-n dropped"));
        assert_eq!(c.stack, Stack::Ipv4First);
        assert_eq!(c.settings.uids, [3, 4]);
        assert_eq!(c.settings.gids, [1, 2]);
        assert_eq!(c.settings.owner_groups, [2020, 202]);
        assert_eq!(c.settings.tunnel_port, 15008);

        let plain = case("-p 15001 -u 1337", "", V4_V6_RULES);
        assert_eq!(
            shell_line(&plain.redirector_flags),
            "-p 15001 -u 1337 -i ''"
        );
        assert_eq!(plain.settings.gids, [1337], "-g defaults to -u");
        assert_eq!(plain.stack, Stack::Ipv6Only);
        assert!(plain
            .rules
            .ipv6
            .as_deref()
            .unwrap()
            .contains("fd00:db8::/32"));
        assert_eq!(
            case("--dual-stack", "", V4_V6_RULES).stack,
            Stack::DualStack
        );
    }

    #[test]
    fn the_matrix_covers_identities_destinations_ports_and_sources() {
        let c = case(
            "-p 15001 -z 15006 -e 15008 -u 3 -g 1 -q 31000 -i 9.9.0.0/16 -x 1.1.0.0/16 --redirect-dns",
            "",
            V4_RULES,
        );
        assert_eq!(
            c.identities(),
            [
                Identity::APP,
                Identity { uid: 3, gid: 1000 },
                Identity { uid: 1000, gid: 1 }
            ]
        );
        assert_eq!(c.ports(), [53, 80, 15001, 15006, 15008, 31000]);
        let destinations = c.destinations().unwrap();
        let addrs: Vec<String> = destinations.iter().map(|d| d.addr.to_string()).collect();
        for expected in [
            "127.0.0.1",
            "127.0.0.2",
            "10.99.0.7",
            "10.11.0.7",
            "127.0.0.53",
            "192.168.200.1",
            "172.20.0.7",
            "::1",
            "fd00:200::1",
            "fd00:77::7",
            "::ffff:10.99.0.7",
            "::ffff:192.168.200.1",
        ] {
            assert!(
                addrs.contains(&expected.to_owned()),
                "{expected} in {addrs:?}"
            );
        }
        assert!(!addrs.contains(&"::6".to_owned()), "no ::6 with IPv6 off");
        assert!(!addrs.contains(&"::ffff:127.0.0.1".to_owned()));
        let remote: Vec<String> = c
            .remote_addresses()
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            remote,
            ["10.99.0.7", "10.11.0.7", "172.20.0.7", "fd00:77::7"]
        );

        let pod = Destination::new(POD_V4.into(), "pod");
        assert_eq!(c.sources(&pod), [None, Some(PASSTHROUGH_V4.into())]);
        let mapped = Destination::new(POD_V4.to_ipv6_mapped().into(), "pod");
        assert_eq!(
            c.sources(&mapped),
            [None, Some(PASSTHROUGH_V4.to_ipv6_mapped().into())]
        );
        let pod_v6 = Destination::new(POD_V6.into(), "pod");
        assert_eq!(c.sources(&pod_v6), [None], "no ::6 to bind with IPv6 off");
        let remote = Destination::new(NOWHERE_V4.into(), "remote");
        assert_eq!(c.sources(&remote), [None]);
        let probes = c.probes().unwrap();
        let per_port: usize = destinations.iter().map(|d| c.sources(d).len()).sum();
        // TCP to six ports, UDP from both kinds of socket to 53 and 80.
        assert_eq!(probes.len(), 3 * (6 + 2 * 2) * per_port);
        let udp: Vec<_> = probes
            .iter()
            .filter(|p| p.connect.transport != Transport::Tcp)
            .map(|p| p.connect.to.port())
            .collect();
        assert!(udp.iter().all(|port| [53, 80].contains(port)), "{udp:?}");
        assert!(
            per_port > destinations.len(),
            "local destinations add a bound source"
        );

        let v6 = case("-p 15001 -i 10.0.0.0/8", "", V4_V6_RULES);
        let addrs: Vec<IpAddr> = v6.destinations().unwrap().iter().map(|d| d.addr).collect();
        assert!(addrs.contains(&PASSTHROUGH_V6.into()));
        assert!(!addrs.contains(&POD_V4.into()), "an IPv6-only pod");
        assert!(
            !addrs.contains(&"10.0.0.7".parse().unwrap()),
            "no IPv4 route"
        );
    }

    #[test]
    fn verdicts_come_from_who_answered_where() {
        let connect = PlannedConnect {
            to: "[::ffff:10.99.0.7]:80".parse().unwrap(),
            bind: None,
            transport: Transport::Tcp,
            source_port: None,
        };
        let answered = |tag: &str, local: &str| {
            Reached::Answered(ListenerReply {
                tag: tag.into(),
                local: local.parse().unwrap(),
            })
        };
        assert_eq!(
            Verdict::classify(&connect, &answered("world", "10.99.0.7:80")),
            Verdict::Pass
        );
        let captured = Verdict::classify(&connect, &answered("pod", "127.0.0.1:15001"));
        assert_eq!(captured.to_string(), "->127.0.0.1:15001");
        assert!(captured.is_decision());
        let elsewhere = Verdict::classify(&connect, &answered("world", "10.99.0.8:80"));
        assert!(!elsewhere.is_decision(), "{elsewhere}");
        let failed = Verdict::classify(&connect, &Reached::Failed("refused".into()));
        assert_eq!(failed.to_string(), "FAILED refused");
    }

    #[test]
    fn a_cidr_holding_the_nowhere_address_is_refused() {
        let c = case("-i 172.16.0.0/12", "", V4_RULES);
        assert!(c.destinations().is_err());
    }
}
