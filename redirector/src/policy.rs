//! A pod's capture policy: istio-iptables' flags, parsed and checked, and compiled at enroll
//! time into the entries the programs look up per connection.
//!
//! The decisions reproduce istio-iptables' REDIRECT mode (see `redirector-ebpf/src/policy.rs`
//! for the rule-by-rule mapping). Deliberate differences, each an error rather than a silent
//! change: a malformed CIDR is refused (istio-iptables skips it "for bug compatibility"), and
//! flags that steer iptables machinery with no eBPF counterpart are refused with the reason.
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use redirector_common::{
    PodConfig, ADDR_DNS_SERVER, ADDR_EXCLUDE, ADDR_INCLUDE, ADDR_LOCAL, ADDR_LOOPBACK_CIDR,
    OWNER_GID, OWNER_GROUP_FILTER, OWNER_UID, POLICY_CAPTURE_ALL_DNS, POLICY_GROUPS_EXCLUDE,
    POLICY_GROUPS_INCLUDE, POLICY_INBOUND_ALL, POLICY_INBOUND_FAIL_OPEN, POLICY_INCLUDE_ALL,
    POLICY_IPV4, POLICY_IPV6, POLICY_LOOPBACK_INCLUDED, POLICY_REDIRECT_DNS, PORT_INBOUND_EXCLUDE,
    PORT_INBOUND_INCLUDE, PORT_OUTBOUND_EXCLUDE, PORT_OUTBOUND_INCLUDE,
};
use serde::{Deserialize, Serialize};

use crate::original_dst::kernel_words;

pub const DEFAULT_PROXY_PORT: u16 = 15001;
pub const DEFAULT_INBOUND_CAPTURE_PORT: u16 = 15006;
pub const DEFAULT_INBOUND_TUNNEL_PORT: u16 = 15008;
/// istio-agent's DNS listener (istio-iptables' `IstioAgentDNSListenerPort`).
pub const DNS_CAPTURE_PORT: u16 = 15053;
pub const DEFAULT_PROXY_ID: u32 = 1337;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("invalid port {value:?}: {reason}")]
    Port { value: String, reason: &'static str },
    #[error("invalid {kind} list {value:?}: {reason}")]
    IdList {
        kind: IdKind,
        value: String,
        reason: String,
    },
    #[error("invalid CIDR {value:?} in {flag}: {reason}")]
    Cidr {
        flag: &'static str,
        value: String,
        reason: String,
    },
    #[error("invalid address {value:?} in {flag}: {reason}")]
    Address {
        flag: &'static str,
        value: String,
        reason: String,
    },
    #[error("{flag}: {reason}")]
    Unsupported {
        flag: &'static str,
        reason: &'static str,
    },
    #[error("unknown owner group {name:?} (no such group on this machine)")]
    UnknownGroup { name: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdKind {
    Uid,
    Gid,
}

impl fmt::Display for IdKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Uid => "UID",
            Self::Gid => "GID",
        })
    }
}

/// A set that is either everything (`*`) or a list.
///
/// Written as `{"all": bool, "items": [...]}` (items empty when `all`), so that each field of a
/// policy's JSON has one type. Read from that, or from what people write in TOML and conflists:
/// `"*"` or a list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selection<T> {
    All,
    Only(Vec<T>),
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SelectionObject<T> {
    all: bool,
    #[serde(default = "Vec::new")]
    items: Vec<T>,
}

impl<T: Serialize + Clone> Serialize for Selection<T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let object = match self {
            Self::All => SelectionObject {
                all: true,
                items: Vec::new(),
            },
            Self::Only(items) => SelectionObject {
                all: false,
                items: items.clone(),
            },
        };
        object.serialize(serializer)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Selection<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr<T> {
            Star(String),
            List(Vec<T>),
            Object(SelectionObject<T>),
        }
        match Repr::deserialize(deserializer)? {
            Repr::Star(star) if star.trim() == "*" => Ok(Self::All),
            Repr::Star(other) => Err(serde::de::Error::custom(format!(
                "expected \"*\", a list or {{\"all\": …, \"items\": […]}}, got {other:?}"
            ))),
            Repr::List(items) | Repr::Object(SelectionObject { all: false, items }) => {
                Ok(Self::Only(items))
            }
            Repr::Object(SelectionObject { all: true, items }) if items.is_empty() => Ok(Self::All),
            Repr::Object(_) => Err(serde::de::Error::custom(
                "\"items\" must be empty when \"all\" is true",
            )),
        }
    }
}

impl<T> Selection<T> {
    pub fn none() -> Self {
        Self::Only(Vec::new())
    }
}

/// istio's owner-group filter (`ISTIO_OUTBOUND_OWNER_GROUPS[_EXCLUDE]`), GIDs resolved.
/// Written and read as `{"mode": "all"|"only"|"except", "gids": [...]}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "OwnerGroupsObject", try_from = "OwnerGroupsObject")]
pub enum OwnerGroups {
    /// Every process may be captured.
    All,
    /// Only processes whose GID is listed are captured.
    Only(Vec<u32>),
    /// Processes whose GID is listed are not captured.
    Except(Vec<u32>),
}

#[derive(Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum OwnerGroupsMode {
    All,
    Only,
    Except,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OwnerGroupsObject {
    mode: OwnerGroupsMode,
    #[serde(default)]
    gids: Vec<u32>,
}

impl From<OwnerGroups> for OwnerGroupsObject {
    fn from(groups: OwnerGroups) -> Self {
        let (mode, gids) = match groups {
            OwnerGroups::All => (OwnerGroupsMode::All, Vec::new()),
            OwnerGroups::Only(gids) => (OwnerGroupsMode::Only, gids),
            OwnerGroups::Except(gids) => (OwnerGroupsMode::Except, gids),
        };
        Self { mode, gids }
    }
}

impl TryFrom<OwnerGroupsObject> for OwnerGroups {
    type Error = &'static str;

    fn try_from(object: OwnerGroupsObject) -> Result<Self, Self::Error> {
        match (object.mode, object.gids) {
            (OwnerGroupsMode::All, gids) if gids.is_empty() => Ok(Self::All),
            (OwnerGroupsMode::All, _) => {
                Err("owner_groups: \"gids\" must be empty with mode \"all\"")
            }
            (OwnerGroupsMode::Only, gids) => Ok(Self::Only(gids)),
            (OwnerGroupsMode::Except, gids) => Ok(Self::Except(gids)),
        }
    }
}

/// What a pod captures; the fields mirror istio-iptables' configuration.
///
/// It also reads from the agent's config file, the CNI plugin's network config and the agent
/// API: keys left out take the defaults, unknown keys and bad values are refused by name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// `-p`: outbound capture port.
    #[serde(deserialize_with = "serde_checked::port")]
    pub proxy_port: u16,
    /// `-z`: inbound capture port (also where the proxy's calls to its own pod go).
    #[serde(deserialize_with = "serde_checked::port")]
    pub inbound_capture_port: u16,
    /// `-e`: inbound tunnel port, never captured.
    #[serde(deserialize_with = "serde_checked::port")]
    pub inbound_tunnel_port: u16,
    /// `-u`: the proxy's UIDs; the first one decides connections to the pod's own addresses.
    #[serde(deserialize_with = "serde_checked::uids")]
    pub proxy_uids: Vec<u32>,
    /// `-g`: the proxy's GIDs.
    #[serde(deserialize_with = "serde_checked::gids")]
    pub proxy_gids: Vec<u32>,
    /// `-q`: outbound ports always captured (after the CIDR exclusions).
    #[serde(deserialize_with = "serde_checked::ports")]
    pub outbound_ports_include: Vec<u16>,
    /// `-o`: outbound ports never captured.
    #[serde(deserialize_with = "serde_checked::ports")]
    pub outbound_ports_exclude: Vec<u16>,
    /// `-i`: outbound destinations captured.
    pub outbound_cidrs_include: Selection<IpNet>,
    /// `-x`: outbound destinations never captured.
    pub outbound_cidrs_exclude: Vec<IpNet>,
    /// `-b`: inbound ports captured.
    #[serde(deserialize_with = "serde_checked::port_selection")]
    pub inbound_ports_include: Selection<u16>,
    /// `-d`: inbound ports never captured (only with `-b '*'`, as in istio-iptables).
    #[serde(deserialize_with = "serde_checked::ports")]
    pub inbound_ports_exclude: Vec<u16>,
    /// `--redirect-dns`: TCP and UDP port 53 to the DNS servers goes to the DNS capture port.
    pub redirect_dns: bool,
    /// `--capture-all-dns`: ... to any address.
    pub capture_all_dns: bool,
    /// The DNS servers (istio-iptables reads /etc/resolv.conf).
    pub dns_servers: Vec<IpAddr>,
    pub owner_groups: OwnerGroups,
    /// `ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR` (IPv6 always uses ::1/128).
    pub ipv4_loopback_cidr: Ipv4Net,
    /// `--dual-stack`: IPv6 is captured when the pod has any IPv6 address, not only when its
    /// first address is IPv6.
    pub dual_stack: bool,
    /// `--inbound-fail-open`: with no proxy listening, inbound connections reach the
    /// application instead of being refused.
    pub inbound_fail_open: bool,
}

impl Default for Policy {
    /// Capture every outbound TCP connection but the proxy's (`-i '*'`). istio-iptables'
    /// own `-i` default is empty (capture nothing); enrolling a pod here means capturing it.
    fn default() -> Self {
        Self {
            proxy_port: DEFAULT_PROXY_PORT,
            inbound_capture_port: DEFAULT_INBOUND_CAPTURE_PORT,
            inbound_tunnel_port: DEFAULT_INBOUND_TUNNEL_PORT,
            proxy_uids: vec![DEFAULT_PROXY_ID],
            proxy_gids: vec![DEFAULT_PROXY_ID],
            outbound_ports_include: Vec::new(),
            outbound_ports_exclude: Vec::new(),
            outbound_cidrs_include: Selection::All,
            outbound_cidrs_exclude: Vec::new(),
            inbound_ports_include: Selection::none(),
            inbound_ports_exclude: Vec::new(),
            redirect_dns: false,
            capture_all_dns: false,
            dns_servers: Vec::new(),
            owner_groups: OwnerGroups::All,
            ipv4_loopback_cidr: Ipv4Net::new(Ipv4Addr::LOCALHOST, 32).expect("valid prefix"),
            dual_stack: false,
            inbound_fail_open: false,
        }
    }
}

/// Inbound ports never captured whatever `-b` says: the tunnel port, the ports istio's
/// injector always appends to `-d` (Envoy's Prometheus 15090, health 15021, merged metrics
/// 15020), and the proxy's own ports.
pub const ALWAYS_EXCLUDED_INBOUND_PORTS: [u16; 3] = [15090, 15021, 15020];

/// What the loader knows of the pod's network namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodNetwork {
    /// The pod's own addresses, in interface order (loopback ones included or not: 127/8 and
    /// ::1 are always local).
    pub addresses: Vec<IpAddr>,
}

/// `::6`, from which istio's proxy forwards inbound connections to the application over IPv6.
const IPV6_PASSTHROUGH: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

impl PodNetwork {
    /// The pod's own address of each family, where a connection's source would be after a
    /// REDIRECT: the first that is neither loopback nor link-local (nor `::6`).
    pub fn own_addresses(&self) -> (Option<Ipv4Addr>, Option<Ipv6Addr>) {
        let mut own = self.addresses.iter().map(|a| canonical(*a)).filter(|a| {
            !a.is_loopback() && !is_link_local(*a) && *a != IpAddr::V6(IPV6_PASSTHROUGH)
        });
        let v4 = own.clone().find_map(|a| match a {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        });
        let v6 = own.find_map(|a| match a {
            IpAddr::V6(v6) => Some(v6),
            IpAddr::V4(_) => None,
        });
        (v4, v6)
    }

    /// Whether istio-iptables would turn IPv6 on for this pod: the first address that is
    /// neither loopback nor link-local is IPv6, or, with `dual_stack`, any such one is.
    /// Without known addresses (no netns given) IPv6 is captured.
    pub fn ipv6_enabled(&self, dual_stack: bool) -> bool {
        let mut candidates = self.addresses.iter().filter(|a| {
            let a = canonical(**a);
            !a.is_loopback() && !is_link_local(a)
        });
        if self.addresses.is_empty() {
            return true;
        }
        if dual_stack {
            candidates.any(IpAddr::is_ipv6)
        } else {
            candidates.next().is_some_and(IpAddr::is_ipv6)
        }
    }
}

fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

fn is_link_local(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

/// A policy compiled for one pod: the values written into the maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompiledPolicy {
    /// The pod's settings, but for its identity (`pod`, `generation`): the map layer sets them.
    pub config: PodConfig,
    /// (`OWNER_*` kind, id).
    pub owners: Vec<(u32, u32)>,
    /// (port, `PORT_*` bits).
    pub ports: Vec<(u16, u32)>,
    /// (prefix, `ADDR_*` bits of every set holding the prefix).
    pub prefixes: Vec<(IpNet, u32)>,
}

impl Policy {
    /// DNS capture as istio-iptables applies it: `--redirect-dns` with no server to capture
    /// and no `--capture-all-dns` turns it off.
    pub fn dns_capture_active(&self) -> bool {
        self.redirect_dns && (self.capture_all_dns || !self.dns_servers.is_empty())
    }

    pub fn compile(&self, network: &PodNetwork) -> CompiledPolicy {
        let mut flags = POLICY_IPV4;
        if network.ipv6_enabled(self.dual_stack) {
            flags |= POLICY_IPV6;
        }
        if self.outbound_cidrs_include == Selection::All {
            flags |= POLICY_INCLUDE_ALL;
        }
        if self.dns_capture_active() {
            flags |= POLICY_REDIRECT_DNS;
            if self.capture_all_dns {
                flags |= POLICY_CAPTURE_ALL_DNS;
            }
        }
        if let Selection::Only(cidrs) = &self.outbound_cidrs_include {
            if cidrs.iter().any(|cidr| cidr.addr().is_loopback()) {
                flags |= POLICY_LOOPBACK_INCLUDED;
            }
        }
        if self.inbound_ports_include == Selection::All {
            flags |= POLICY_INBOUND_ALL;
        }
        if self.inbound_fail_open {
            flags |= POLICY_INBOUND_FAIL_OPEN;
        }
        let mut owners = Vec::new();
        let owner = |kind, id| (kind, id);
        owners.extend(self.proxy_uids.iter().map(|&id| owner(OWNER_UID, id)));
        owners.extend(self.proxy_gids.iter().map(|&id| owner(OWNER_GID, id)));
        match &self.owner_groups {
            OwnerGroups::All => {}
            OwnerGroups::Only(gids) => {
                flags |= POLICY_GROUPS_INCLUDE;
                owners.extend(gids.iter().map(|&id| owner(OWNER_GROUP_FILTER, id)));
            }
            OwnerGroups::Except(gids) => {
                flags |= POLICY_GROUPS_EXCLUDE;
                owners.extend(gids.iter().map(|&id| owner(OWNER_GROUP_FILTER, id)));
            }
        }
        owners.dedup();

        let (own4, own6) = network.own_addresses();
        let config = PodConfig {
            own4: own4.map_or(0, |v4| u32::from_ne_bytes(v4.octets())),
            _pad2: 0,
            own6: own6.map_or([0; 4], |v6| kernel_words(IpAddr::V6(v6)).1),
            pod: 0,
            generation: 0,
            _pad: 0,
            proxy_port: self.proxy_port,
            inbound_port: self.inbound_capture_port,
            tunnel_port: self.inbound_tunnel_port,
            dns_port: DNS_CAPTURE_PORT,
            first_uid: self.proxy_uids.first().copied().unwrap_or(u32::MAX),
            flags,
        };
        CompiledPolicy {
            config,
            owners,
            ports: self.port_flags(),
            prefixes: self.prefix_flags(network),
        }
    }

    fn port_flags(&self) -> Vec<(u16, u32)> {
        let mut ports: Vec<(u16, u32)> = Vec::new();
        let mut add = |list: &[u16], flag: u32| {
            for &port in list {
                match ports.iter_mut().find(|(p, _)| *p == port) {
                    Some((_, flags)) => *flags |= flag,
                    None => ports.push((port, flag)),
                }
            }
        };
        add(&self.outbound_ports_exclude, PORT_OUTBOUND_EXCLUDE);
        add(&self.outbound_ports_include, PORT_OUTBOUND_INCLUDE);
        match &self.inbound_ports_include {
            // istio-iptables applies -d only together with -b '*'.
            Selection::All => add(&self.inbound_ports_exclude, PORT_INBOUND_EXCLUDE),
            Selection::Only(list) => add(list, PORT_INBOUND_INCLUDE),
        }
        if self.captures_inbound() {
            add(&self.never_captured_inbound(), PORT_INBOUND_EXCLUDE);
            for (port, flags) in &mut ports {
                if self.never_captured_inbound().contains(port) {
                    *flags &= !PORT_INBOUND_INCLUDE;
                }
            }
        }
        ports.retain(|(_, flags)| *flags != 0);
        ports.sort_unstable();
        ports
    }

    /// Whether any inbound port is captured (`-b` not empty).
    pub fn captures_inbound(&self) -> bool {
        self.inbound_ports_include != Selection::none()
    }

    fn never_captured_inbound(&self) -> Vec<u16> {
        let mut ports = vec![
            self.inbound_tunnel_port,
            self.proxy_port,
            self.inbound_capture_port,
            DNS_CAPTURE_PORT,
        ];
        ports.extend(ALWAYS_EXCLUDED_INBOUND_PORTS);
        ports
    }

    /// Every prefix of every address set, each with the bits of all sets holding it, so that
    /// the longest match for an address carries every set the address is in.
    fn prefix_flags(&self, network: &PodNetwork) -> Vec<(IpNet, u32)> {
        let host = |addr: IpAddr| IpNet::from(canonical(addr));
        let mut sets: Vec<(IpNet, u32)> = vec![
            (
                Ipv4Net::new(Ipv4Addr::new(127, 0, 0, 0), 8)
                    .expect("valid")
                    .into(),
                ADDR_LOCAL,
            ),
            (
                Ipv6Net::new(Ipv6Addr::LOCALHOST, 128)
                    .expect("valid")
                    .into(),
                ADDR_LOCAL | ADDR_LOOPBACK_CIDR,
            ),
            // istio's IPv6 inbound passthrough source: local whether or not it is on the pod's
            // loopback yet, so that the proxy's passthrough connection from it is never sent
            // back to the inbound port (as 127.0.0.6 is, within 127/8).
            (host(IpAddr::V6(IPV6_PASSTHROUGH)), ADDR_LOCAL),
            (self.ipv4_loopback_cidr.trunc().into(), ADDR_LOOPBACK_CIDR),
        ];
        sets.extend(network.addresses.iter().map(|&a| (host(a), ADDR_LOCAL)));
        sets.extend(
            self.outbound_cidrs_exclude
                .iter()
                .map(|c| (c.trunc(), ADDR_EXCLUDE)),
        );
        if let Selection::Only(cidrs) = &self.outbound_cidrs_include {
            sets.extend(cidrs.iter().map(|c| (c.trunc(), ADDR_INCLUDE)));
        }
        if self.dns_capture_active() && !self.capture_all_dns {
            sets.extend(self.dns_servers.iter().map(|&a| (host(a), ADDR_DNS_SERVER)));
        }
        let mut merged: Vec<(IpNet, u32)> = Vec::new();
        for &(prefix, _) in &sets {
            if merged.iter().any(|(p, _)| *p == prefix) {
                continue;
            }
            let flags = sets
                .iter()
                .filter(|(outer, _)| outer.contains(&prefix))
                .fold(0, |f, (_, b)| f | b);
            merged.push((prefix, flags));
        }
        merged.sort_unstable();
        merged
    }
}

impl Policy {
    /// The policy as a two-column table, one istio-iptables setting a row (`-n`).
    pub fn render_table(&self, ipv6: &str) -> String {
        let list = |items: Vec<String>| {
            if items.is_empty() {
                "-".to_owned()
            } else {
                items.join(",")
            }
        };
        let strings = |items: &[u16]| list(items.iter().map(u16::to_string).collect());
        let ids = |items: &[u32]| list(items.iter().map(u32::to_string).collect());
        let selection = |s: &Selection<String>| match s {
            Selection::All => "*".to_owned(),
            Selection::Only(items) => list(items.clone()),
        };
        let cidrs = match &self.outbound_cidrs_include {
            Selection::All => Selection::All,
            Selection::Only(c) => Selection::Only(c.iter().map(IpNet::to_string).collect()),
        };
        let inbound = match &self.inbound_ports_include {
            Selection::All => Selection::All,
            Selection::Only(p) => Selection::Only(p.iter().map(u16::to_string).collect()),
        };
        let dns = if !self.dns_capture_active() {
            "off".to_owned()
        } else if self.capture_all_dns {
            format!("TCP and UDP port 53 to any address -> {DNS_CAPTURE_PORT}")
        } else {
            let servers = list(self.dns_servers.iter().map(IpAddr::to_string).collect());
            format!("TCP and UDP port 53 to {servers} -> {DNS_CAPTURE_PORT}")
        };
        let groups = match &self.owner_groups {
            OwnerGroups::All => "all".to_owned(),
            OwnerGroups::Only(g) => format!("only GIDs {}", ids(g)),
            OwnerGroups::Except(g) => format!("all but GIDs {}", ids(g)),
        };
        let rows = [
            ("outbound capture port (-p)", self.proxy_port.to_string()),
            (
                "inbound capture port (-z)",
                self.inbound_capture_port.to_string(),
            ),
            (
                "inbound tunnel port (-e)",
                self.inbound_tunnel_port.to_string(),
            ),
            ("proxy UIDs (-u)", ids(&self.proxy_uids)),
            ("proxy GIDs (-g)", ids(&self.proxy_gids)),
            ("outbound CIDRs (-i)", selection(&cidrs)),
            (
                "outbound excluded CIDRs (-x)",
                list(
                    self.outbound_cidrs_exclude
                        .iter()
                        .map(IpNet::to_string)
                        .collect(),
                ),
            ),
            ("outbound ports (-q)", strings(&self.outbound_ports_include)),
            (
                "outbound excluded ports (-o)",
                strings(&self.outbound_ports_exclude),
            ),
            ("inbound ports (-b)", selection(&inbound)),
            (
                "inbound excluded ports (-d)",
                strings(&self.inbound_ports_exclude),
            ),
            ("DNS capture", dns),
            ("owner groups", groups),
            ("IPv4 loopback CIDR", self.ipv4_loopback_cidr.to_string()),
            (
                "inbound without a proxy",
                if self.inbound_fail_open {
                    "delivered to the application (fail open)"
                } else {
                    "refused"
                }
                .to_owned(),
            ),
            ("IPv6", ipv6.to_owned()),
        ];
        let width = rows.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
        rows.iter()
            .map(|(name, value)| format!("{name:<width$}  {value}\n"))
            .collect()
    }
}

/// A TCP port, 1 to 65535.
pub fn parse_port(value: &str) -> Result<u16, PolicyError> {
    let error = |reason| PolicyError::Port {
        value: value.to_owned(),
        reason,
    };
    match value.trim().parse::<u32>() {
        Ok(0) => Err(error("port 0 is not a port to listen on; use 1 to 65535")),
        Ok(port) => u16::try_from(port).map_err(|_| error("ports go up to 65535")),
        Err(_) => Err(error("not a number; use 1 to 65535")),
    }
}

/// istio's list splitting: comma-separated, blanks trimmed, empty items dropped.
fn items(value: &str) -> impl Iterator<Item = &str> {
    value
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
}

/// A comma-separated port list (empty allowed).
pub fn parse_port_list(value: &str) -> Result<Vec<u16>, PolicyError> {
    let mut ports = Vec::new();
    for item in items(value) {
        let port = parse_port(item)?;
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    Ok(ports)
}

/// A port list or `*`.
pub fn parse_port_selection(value: &str) -> Result<Selection<u16>, PolicyError> {
    if value.trim() == "*" {
        Ok(Selection::All)
    } else {
        parse_port_list(value).map(Selection::Only)
    }
}

/// A comma-separated list of numeric UIDs or GIDs, as istio-iptables' `-u`/`-g` take them.
pub fn parse_id_list(kind: IdKind, value: &str) -> Result<Vec<u32>, PolicyError> {
    let error = |reason: String| PolicyError::IdList {
        kind,
        value: value.to_owned(),
        reason,
    };
    if items(value).next().is_none() {
        return Err(error(format!("empty; give at least one numeric {kind}")));
    }
    let mut ids = Vec::new();
    for item in value.split(',').map(str::trim) {
        match item.parse::<u32>() {
            // (uid_t)-1 means "no id" to the kernel; it can never be a process's owner.
            Ok(u32::MAX) | Err(_) => {
                return Err(error(format!(
                    "{item:?} is not a numeric {kind} (0 to 4294967294)"
                )))
            }
            Ok(id) if !ids.contains(&id) => ids.push(id),
            Ok(_) => {}
        }
    }
    Ok(ids)
}

/// A comma-separated CIDR list (a bare address is a host prefix).
pub fn parse_cidr_list(flag: &'static str, value: &str) -> Result<Vec<IpNet>, PolicyError> {
    items(value)
        .map(|item| {
            item.parse::<IpNet>()
                .or_else(|_| item.parse::<IpAddr>().map(IpNet::from))
                .map_err(|e| PolicyError::Cidr {
                    flag,
                    value: item.to_owned(),
                    reason: e.to_string(),
                })
        })
        .collect()
}

/// A CIDR list or `*`.
pub fn parse_cidr_selection(
    flag: &'static str,
    value: &str,
) -> Result<Selection<IpNet>, PolicyError> {
    if value.trim() == "*" {
        Ok(Selection::All)
    } else {
        parse_cidr_list(flag, value).map(Selection::Only)
    }
}

/// A comma-separated address list.
pub fn parse_address_list(flag: &'static str, value: &str) -> Result<Vec<IpAddr>, PolicyError> {
    items(value)
        .map(|item| {
            item.parse::<IpAddr>().map_err(|e| PolicyError::Address {
                flag,
                value: item.to_owned(),
                reason: e.to_string(),
            })
        })
        .collect()
}

/// Owner groups by name or number, resolved to GIDs (iptables resolves names when it loads
/// the rule, so an unknown name fails there too).
pub fn resolve_groups(value: &str) -> Result<Vec<u32>, PolicyError> {
    items(value)
        .map(|item| match item.parse::<u32>() {
            Ok(gid) => Ok(gid),
            Err(_) => nix::unistd::Group::from_name(item)
                .ok()
                .flatten()
                .map(|group| group.gid.as_raw())
                .ok_or_else(|| PolicyError::UnknownGroup {
                    name: item.to_owned(),
                }),
        })
        .collect()
}

/// istio's owner-group filter from its two settings: an include list other than `*` wins;
/// otherwise the exclude list applies.
pub fn parse_owner_groups(include: &str, exclude: &str) -> Result<OwnerGroups, PolicyError> {
    if include.trim() != "*" && items(include).next().is_some() {
        return resolve_groups(include).map(OwnerGroups::Only);
    }
    let excluded = resolve_groups(exclude)?;
    Ok(if excluded.is_empty() {
        OwnerGroups::All
    } else {
        OwnerGroups::Except(excluded)
    })
}

/// Deserializers that hold structured input (TOML, JSON) to the same rules as the flags.
mod serde_checked {
    use serde::{de::Error as _, Deserialize, Deserializer};

    use super::{parse_id_list, parse_port, IdKind, Selection};

    pub fn port<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u16, D::Error> {
        let port = i64::deserialize(deserializer)?;
        parse_port(&port.to_string()).map_err(D::Error::custom)
    }

    pub fn ports<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u16>, D::Error> {
        let ports = Vec::<i64>::deserialize(deserializer)?;
        ports
            .iter()
            .map(|port| parse_port(&port.to_string()).map_err(D::Error::custom))
            .collect()
    }

    pub fn port_selection<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Selection<u16>, D::Error> {
        match Selection::<i64>::deserialize(deserializer)? {
            Selection::All => Ok(Selection::All),
            Selection::Only(ports) => ports
                .iter()
                .map(|port| parse_port(&port.to_string()).map_err(D::Error::custom))
                .collect::<Result<_, _>>()
                .map(Selection::Only),
        }
    }

    pub fn uids<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u32>, D::Error> {
        ids(IdKind::Uid, deserializer)
    }

    pub fn gids<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u32>, D::Error> {
        ids(IdKind::Gid, deserializer)
    }

    /// A list of numbers, checked as the comma-separated flag value it stands for.
    fn ids<'de, D: Deserializer<'de>>(kind: IdKind, deserializer: D) -> Result<Vec<u32>, D::Error> {
        let ids = Vec::<i64>::deserialize(deserializer)?;
        let joined: Vec<String> = ids.iter().map(i64::to_string).collect();
        parse_id_list(kind, &joined.join(",")).map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_in_range_parse() {
        assert_eq!(parse_port("15001"), Ok(15001));
        assert_eq!(parse_port("1"), Ok(1));
        assert_eq!(parse_port("65535"), Ok(65535));
    }

    #[test]
    fn ports_out_of_range_or_not_numbers_are_refused() {
        for bad in ["0", "65536", "70000", "-1", "", "http", "15001,15002"] {
            let message = parse_port(bad).unwrap_err().to_string();
            assert!(message.contains("invalid port"), "{bad}: {message}");
        }
    }

    #[test]
    fn port_lists_drop_empty_items_as_istio_does() {
        assert_eq!(parse_port_list("6000,7000,"), Ok(vec![6000, 7000]));
        assert_eq!(parse_port_list(""), Ok(vec![]));
        assert_eq!(parse_port_selection(" * "), Ok(Selection::All));
        assert!(parse_port_list("80,0").is_err());
    }

    #[test]
    fn id_lists_parse_and_drop_repeats() {
        assert_eq!(parse_id_list(IdKind::Uid, "1337"), Ok(vec![1337]));
        assert_eq!(
            parse_id_list(IdKind::Uid, "1337, 0,1337"),
            Ok(vec![1337, 0])
        );
    }

    #[test]
    fn bad_id_lists_are_refused_naming_the_kind() {
        for bad in ["", " ", "abc", "1337,,1", "-1", "4294967295", "99999999999"] {
            let message = parse_id_list(IdKind::Gid, bad).unwrap_err().to_string();
            assert!(
                message.starts_with("invalid GID list"),
                "{bad:?}: {message}"
            );
        }
    }

    #[test]
    fn cidrs_parse_and_bad_ones_are_refused() {
        let cidrs = parse_cidr_list("-i", "10.0.0.0/8, 2001:db8::/32,192.168.1.1").unwrap();
        assert_eq!(cidrs.len(), 3);
        assert_eq!(cidrs[2].prefix_len(), 32);
        for bad in ["10.0.0.0/33", "10.0.0", "fe80::/129", "*/8", "example.com"] {
            let message = parse_cidr_list("-x", bad).unwrap_err().to_string();
            assert!(
                message.contains("invalid CIDR") && message.contains("-x"),
                "{bad}: {message}"
            );
        }
        assert_eq!(parse_cidr_selection("-i", "*"), Ok(Selection::All));
        assert_eq!(parse_cidr_selection("-i", ""), Ok(Selection::none()));
    }

    #[test]
    fn owner_groups_follow_istio_precedence() {
        assert_eq!(parse_owner_groups("*", ""), Ok(OwnerGroups::All));
        assert_eq!(
            parse_owner_groups("202,0", "888"),
            Ok(OwnerGroups::Only(vec![202, 0]))
        );
        assert_eq!(
            parse_owner_groups("*", "888"),
            Ok(OwnerGroups::Except(vec![888]))
        );
        assert_eq!(
            parse_owner_groups("root", ""),
            Ok(OwnerGroups::Only(vec![0]))
        );
        assert!(matches!(
            parse_owner_groups("no-such-group-xyz", ""),
            Err(PolicyError::UnknownGroup { .. })
        ));
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn prefixes_carry_the_bits_of_every_set_that_holds_them() {
        let policy = Policy {
            outbound_cidrs_include: Selection::Only(vec![net("10.0.0.0/8")]),
            outbound_cidrs_exclude: vec![net("10.1.0.0/16")],
            ..Policy::default()
        };
        let network = PodNetwork {
            addresses: vec!["10.1.2.3".parse().unwrap()],
        };
        let prefixes = policy.compile(&network).prefixes;
        let bits = |p: &str| prefixes.iter().find(|(n, _)| *n == net(p)).map(|(_, b)| *b);
        assert_eq!(bits("10.0.0.0/8"), Some(ADDR_INCLUDE));
        assert_eq!(bits("10.1.0.0/16"), Some(ADDR_INCLUDE | ADDR_EXCLUDE));
        assert_eq!(
            bits("10.1.2.3/32"),
            Some(ADDR_INCLUDE | ADDR_EXCLUDE | ADDR_LOCAL)
        );
        assert_eq!(bits("127.0.0.1/32"), Some(ADDR_LOCAL | ADDR_LOOPBACK_CIDR));
        assert_eq!(bits("::1/128"), Some(ADDR_LOCAL | ADDR_LOOPBACK_CIDR));
    }

    #[test]
    fn a_loopback_include_cidr_removes_the_local_return_rules() {
        let policy = Policy {
            outbound_cidrs_include: Selection::Only(vec![net("127.1.2.3/32")]),
            ..Policy::default()
        };
        assert_ne!(
            policy.compile(&PodNetwork::default()).config.flags & POLICY_LOOPBACK_INCLUDED,
            0
        );
        assert_eq!(
            Policy::default()
                .compile(&PodNetwork::default())
                .config
                .flags
                & POLICY_LOOPBACK_INCLUDED,
            0
        );
    }

    #[test]
    fn dns_capture_needs_servers_or_capture_all() {
        let mut policy = Policy {
            redirect_dns: true,
            ..Policy::default()
        };
        assert!(!policy.dns_capture_active());
        policy.dns_servers = vec!["127.0.0.53".parse().unwrap()];
        assert!(policy.dns_capture_active());
        let compiled = policy.compile(&PodNetwork::default());
        assert_ne!(compiled.config.flags & POLICY_REDIRECT_DNS, 0);
        assert!(compiled
            .prefixes
            .iter()
            .any(|(p, b)| *p == net("127.0.0.53/32") && b & ADDR_DNS_SERVER != 0));
    }

    #[test]
    fn inbound_excludes_apply_only_with_a_wildcard() {
        let only = Policy {
            inbound_ports_include: Selection::Only(vec![4000]),
            inbound_ports_exclude: vec![6000],
            ..Policy::default()
        };
        let inbound = |policy: &Policy, bits: u32| -> Vec<u16> {
            let ports = policy.compile(&PodNetwork::default()).ports;
            ports
                .iter()
                .filter(|(_, b)| b & bits != 0)
                .map(|(p, _)| *p)
                .collect()
        };
        assert_eq!(inbound(&only, PORT_INBOUND_INCLUDE), vec![4000]);
        assert!(
            !inbound(&only, PORT_INBOUND_EXCLUDE).contains(&6000),
            "-d is ignored without -b '*'"
        );
        let all = Policy {
            inbound_ports_include: Selection::All,
            ..only
        };
        assert!(inbound(&all, PORT_INBOUND_EXCLUDE).contains(&6000));
    }

    #[test]
    fn the_tunnel_port_and_the_proxy_ports_are_never_captured_inbound() {
        let policy = Policy {
            inbound_ports_include: Selection::Only(vec![9080, 15008, 15021, 15006]),
            ..Policy::default()
        };
        let compiled = policy.compile(&PodNetwork::default());
        let included: Vec<u16> = compiled
            .ports
            .iter()
            .filter(|(_, b)| b & PORT_INBOUND_INCLUDE != 0)
            .map(|(p, _)| *p)
            .collect();
        assert_eq!(included, vec![9080]);
        for port in [15008, 15090, 15021, 15020, 15001, 15006, 15053] {
            assert!(
                compiled.ports.contains(&(port, PORT_INBOUND_EXCLUDE)),
                "{port}: {:?}",
                compiled.ports
            );
        }
        let none = Policy::default().compile(&PodNetwork::default());
        assert!(
            none.ports.is_empty(),
            "no inbound capture, no inbound ports: {:?}",
            none.ports
        );
    }

    #[test]
    fn ipv6_follows_the_first_routable_address_unless_dual_stack() {
        let addrs = |list: &[&str]| PodNetwork {
            addresses: list.iter().map(|a| a.parse().unwrap()).collect(),
        };
        assert!(!addrs(&["127.0.0.1", "::1", "10.0.0.5", "fd00::5"]).ipv6_enabled(false));
        assert!(addrs(&["127.0.0.1", "::1", "10.0.0.5", "fd00::5"]).ipv6_enabled(true));
        assert!(addrs(&["fe80::1", "fd00::5", "10.0.0.5"]).ipv6_enabled(false));
        assert!(!addrs(&["10.0.0.5"]).ipv6_enabled(true));
        assert!(PodNetwork::default().ipv6_enabled(false));
    }

    #[test]
    fn structured_policies_take_defaults_and_refuse_bad_values_by_name() {
        let partial: Policy = serde_json::from_str(r#"{"proxy_port": 15006, "outbound_cidrs_include": ["10.0.0.0/8"], "inbound_ports_include": "*"}"#).unwrap();
        assert_eq!(
            partial,
            Policy {
                proxy_port: 15006,
                outbound_cidrs_include: Selection::Only(vec!["10.0.0.0/8".parse().unwrap()]),
                inbound_ports_include: Selection::All,
                ..Policy::default()
            }
        );
        for (bad, expected) in [
            (r#"{"proxy_port": 0}"#, "invalid port"),
            (r#"{"proxy_port": 70000}"#, "invalid port"),
            (r#"{"outbound_ports_include": [80, 0]}"#, "invalid port"),
            (r#"{"inbound_ports_include": [70000]}"#, "invalid port"),
            (
                r#"{"inbound_ports_include": "some"}"#,
                "expected \"*\", a list or",
            ),
            (r#"{"outbound_cidrs_exclude": ["10.0.0.0/33"]}"#, "invalid"),
            (r#"{"proxy_uids": []}"#, "invalid UID list"),
            (r#"{"proxy_gids": [-1]}"#, "invalid GID list"),
            (r#"{"proxy_gids": [4294967295]}"#, "invalid GID list"),
            (r#"{"proxy_prot": 15001}"#, "unknown field `proxy_prot`"),
        ] {
            let message = serde_json::from_str::<Policy>(bad).unwrap_err().to_string();
            assert!(message.contains(expected), "{bad}: {message}");
        }
    }
}
