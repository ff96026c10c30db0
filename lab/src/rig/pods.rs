//! The client pods of the traffic rig and what runs in each: which variants share a pod, its
//! interception, and its proxies.
//!
//! | pod                 | interception                           | proxies (UID/GID 1337)                               |
//! |---------------------|----------------------------------------|------------------------------------------------------|
//! | `plain`             | none                                   | redirector-proxy :15001, HAProxy :15002 and redirector-proxy [::1]:15003, each to a fixed upstream |
//! | `ipt`               | istio-iptables nat rules (and ip6tables) | redirector-proxy :15001 and [::1]:15001 (original destination) |
//! | `ebpf`              | `redirector enroll`, no nat rule       | as `ipt`                                             |
//! | `ipt-haproxy`       | istio-iptables nat rules               | HAProxy :15001 (`server 0.0.0.0:0`)                  |
//! | `ebpf-haproxy`      | `redirector enroll`, no nat rule       | HAProxy :15001 (`server 0.0.0.0:0`)                  |
//! | `ebpf-not-captured` | `redirector enroll -o PORT`            | none: its traffic goes to the excluded port          |

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use redirector_tests::{Cgroup, Child, Netns, VethPair};

use crate::rig::istio::PROXY_PORT;
use crate::variant::{Family, Variant};

/// The plain pod's HAProxy, next to its redirector-proxy.
const PLAIN_HAPROXY_PORT: u16 = 15002;
/// The plain pod's IPv6 proxy.
const PLAIN_V6_PROXY_PORT: u16 = 15003;
const FIRST_SERVER_PORT: u16 = 8000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodKind {
    Plain,
    Ipt,
    Ebpf,
    IptHaproxy,
    EbpfHaproxy,
    EbpfNotCaptured,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interception {
    None,
    Iptables,
    /// `redirector enroll`, with this port excluded from capture (`-o`) if any.
    Redirector {
        excluded_port: Option<u16>,
    },
}

impl PodKind {
    pub fn of(variant: Variant) -> PodKind {
        match variant {
            Variant::B0 | Variant::B1 | Variant::HaproxyB1 | Variant::B1V6 => PodKind::Plain,
            Variant::Ipt | Variant::IptV6 => PodKind::Ipt,
            Variant::Ebpf | Variant::EbpfV6 => PodKind::Ebpf,
            Variant::HaproxyIpt => PodKind::IptHaproxy,
            Variant::HaproxyEbpf => PodKind::EbpfHaproxy,
            Variant::EbpfNotCaptured => PodKind::EbpfNotCaptured,
        }
    }

    pub fn tag(self) -> &'static str {
        match self {
            PodKind::Plain => "plain",
            PodKind::Ipt => "ipt",
            PodKind::Ebpf => "ebpf",
            PodKind::IptHaproxy => "ipt-haproxy",
            PodKind::EbpfHaproxy => "ebpf-haproxy",
            PodKind::EbpfNotCaptured => "ebpf-not-captured",
        }
    }

    pub fn interception(self) -> Interception {
        match self {
            PodKind::Plain => Interception::None,
            PodKind::Ipt | PodKind::IptHaproxy => Interception::Iptables,
            PodKind::Ebpf | PodKind::EbpfHaproxy => Interception::Redirector {
                excluded_port: None,
            },
            PodKind::EbpfNotCaptured => Interception::Redirector {
                excluded_port: Some(server_port(Variant::EbpfNotCaptured)),
            },
        }
    }
}

/// Each variant has its own server port, so the server counts each variant's traffic apart.
pub fn server_port(variant: Variant) -> u16 {
    FIRST_SERVER_PORT + variant as u16
}

/// Where the server listens for `variant`: every address of the server netns, in the
/// variant's family.
pub fn server_listen_address(variant: Variant) -> SocketAddr {
    let any = match variant.family() {
        Family::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        Family::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    SocketAddr::new(any, server_port(variant))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyKind {
    Redirector,
    Haproxy,
}

/// A proxy in a pod: where it listens, and where it forwards (`None`: to the original
/// destination).
pub struct ProxySpec {
    pub kind: ProxyKind,
    pub listen: Vec<SocketAddr>,
    pub fixed_upstream: Option<SocketAddr>,
}

impl ProxySpec {
    pub fn port(&self) -> u16 {
        self.listen.first().map_or(0, SocketAddr::port)
    }
}

/// A client pod. Fields drop in order: proxies first, then the cgroup, then the network.
pub struct Pod {
    pub kind: PodKind,
    pub proxies: Vec<Child>,
    pub cgroup: Cgroup,
    pub veth: VethPair,
    pub netns: Netns,
}

impl Pod {
    /// The server's address for `variant` as seen from this pod.
    pub fn server_address(&self, variant: Variant) -> SocketAddr {
        let ip = match variant.family() {
            Family::V4 => IpAddr::V4(self.veth.b_addr),
            Family::V6 => IpAddr::V6(self.veth.b_addr6),
        };
        SocketAddr::new(ip, server_port(variant))
    }

    /// Where `variant`'s client connects: the proxy's port for the baselines without
    /// interception, the server otherwise.
    pub fn destination(&self, variant: Variant) -> SocketAddr {
        let v4 = |port| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        match variant {
            Variant::B1 => v4(PROXY_PORT),
            Variant::HaproxyB1 => v4(PLAIN_HAPROXY_PORT),
            Variant::B1V6 => SocketAddr::from((Ipv6Addr::LOCALHOST, PLAIN_V6_PROXY_PORT)),
            _ => self.server_address(variant),
        }
    }

    /// The proxies this pod runs for the chosen `variants`.
    pub fn proxy_specs(&self, variants: &[Variant]) -> Vec<ProxySpec> {
        let both_families = vec![
            SocketAddr::from((Ipv4Addr::LOCALHOST, PROXY_PORT)),
            SocketAddr::from((Ipv6Addr::LOCALHOST, PROXY_PORT)),
        ];
        let original = |kind, listen| ProxySpec {
            kind,
            listen,
            fixed_upstream: None,
        };
        match self.kind {
            PodKind::Plain => [
                (Variant::B1, ProxyKind::Redirector),
                (Variant::HaproxyB1, ProxyKind::Haproxy),
                (Variant::B1V6, ProxyKind::Redirector),
            ]
            .into_iter()
            .filter(|(variant, _)| variants.contains(variant))
            .map(|(variant, kind)| ProxySpec {
                kind,
                listen: vec![self.destination(variant)],
                fixed_upstream: Some(self.server_address(variant)),
            })
            .collect(),
            PodKind::Ipt | PodKind::Ebpf => vec![original(ProxyKind::Redirector, both_families)],
            PodKind::IptHaproxy | PodKind::EbpfHaproxy => vec![original(
                ProxyKind::Haproxy,
                vec![SocketAddr::from((Ipv4Addr::LOCALHOST, PROXY_PORT))],
            )],
            PodKind::EbpfNotCaptured => Vec::new(),
        }
    }
}

/// A minimal TCP proxy configuration; `server 0.0.0.0:0` forwards to each connection's
/// original destination (SO_ORIGINAL_DST).
pub fn haproxy_config(listen: SocketAddr, fixed_upstream: Option<SocketAddr>) -> String {
    let upstream = fixed_upstream.map_or("0.0.0.0:0".to_owned(), |addr| addr.to_string());
    format!(
        "global\n    maxconn 4096\n    nbthread 1\n\
         defaults\n    mode tcp\n    timeout connect 3s\n    timeout client 60s\n    timeout server 60s\n\
         frontend lab\n    bind {listen}\n    default_backend upstream\n\
         backend upstream\n    server upstream {upstream}\n"
    )
}
