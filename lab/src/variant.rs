//! What the lab compares, the words every stage uses: the ways of reaching the server
//! ([`Variant`]) and the traffic patterns with their sizes ([`Workload`]).

use clap::ValueEnum as _;
use serde::{Serialize, Serializer};

use crate::wire::{self, Pattern};

/// How the server is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Variant {
    /// Client straight to the server: the floor.
    B0,
    /// Client straight to the proxy's port, proxy to the server: the floor for interception.
    B1,
    /// istio-iptables nat REDIRECT (with conntrack) to the proxy.
    Ipt,
    /// redirector's programs to the proxy.
    Ebpf,
    /// B1 with HAProxy as the proxy.
    HaproxyB1,
    /// IPT with HAProxy as the proxy.
    HaproxyIpt,
    /// EBPF with HAProxy as the proxy.
    HaproxyEbpf,
    /// B1 over IPv6.
    B1V6,
    /// IPT over IPv6 (ip6tables rules).
    IptV6,
    /// EBPF over IPv6.
    EbpfV6,
    /// In an enrolled pod, to a port its policy excludes (`-o`): what redirector costs where it
    /// captures nothing, against B0 from a pod that is not enrolled.
    EbpfNotCaptured,
}

/// The address family a variant's client uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Variant {
    /// The variants of `summary.json`'s `variants`, all with redirector-proxy.
    pub const MAIN: [Variant; 4] = [Variant::B0, Variant::B1, Variant::Ipt, Variant::Ebpf];
    /// The cross-check with a third-party proxy.
    pub const HAPROXY: [Variant; 3] = [
        Variant::HaproxyB1,
        Variant::HaproxyIpt,
        Variant::HaproxyEbpf,
    ];
    /// The same rig over IPv6, connection rate only.
    pub const IPV6: [Variant; 3] = [Variant::B1V6, Variant::IptV6, Variant::EbpfV6];
    pub const ALL: [Variant; 11] = [
        Variant::B0,
        Variant::B1,
        Variant::Ipt,
        Variant::Ebpf,
        Variant::HaproxyB1,
        Variant::HaproxyIpt,
        Variant::HaproxyEbpf,
        Variant::B1V6,
        Variant::IptV6,
        Variant::EbpfV6,
        Variant::EbpfNotCaptured,
    ];
    /// (iptables, redirector) pairs whose overheads are compared, each over the same baseline.
    pub const COMPARED: [(Variant, Variant); 3] = [
        (Variant::Ipt, Variant::Ebpf),
        (Variant::HaproxyIpt, Variant::HaproxyEbpf),
        (Variant::IptV6, Variant::EbpfV6),
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
            Variant::B1V6 => "B1/v6",
            Variant::IptV6 => "IPT/v6",
            Variant::EbpfV6 => "EBPF/v6",
            Variant::EbpfNotCaptured => "EBPF/not-captured",
        }
    }

    /// The variant this one is compared with, run for run: the proxy without interception
    /// for the intercepting variants, B0 for the not-captured one.
    pub fn baseline(self) -> Option<Variant> {
        match self {
            Variant::Ipt | Variant::Ebpf => Some(Variant::B1),
            Variant::HaproxyIpt | Variant::HaproxyEbpf => Some(Variant::HaproxyB1),
            Variant::IptV6 | Variant::EbpfV6 => Some(Variant::B1V6),
            Variant::EbpfNotCaptured => Some(Variant::B0),
            Variant::B0 | Variant::B1 | Variant::HaproxyB1 | Variant::B1V6 => None,
        }
    }

    pub fn family(self) -> Family {
        match self {
            Variant::B1V6 | Variant::IptV6 | Variant::EbpfV6 => Family::V6,
            _ => Family::V4,
        }
    }

    /// The workloads of the traffic rounds this variant runs. The not-captured variant runs
    /// only its paired sessions with B0 (see [`Workload::NOT_CAPTURED_TAX`]).
    pub fn workloads(self) -> &'static [Workload] {
        match self {
            Variant::B1V6 | Variant::IptV6 | Variant::EbpfV6 => &[Workload::Crr],
            Variant::EbpfNotCaptured => &[],
            _ => &Workload::TRAFFIC,
        }
    }
}

impl Serialize for Variant {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

/// A pattern with its message size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Workload {
    Crr,
    Rr1,
    Rr1k,
    Bulk,
    /// getsockopt(SO_ERROR) calls on an open connection, back to back.
    SockoptSoError,
}

impl Workload {
    /// The workloads of the traffic rounds.
    pub const TRAFFIC: [Workload; 4] =
        [Workload::Crr, Workload::Rr1, Workload::Rr1k, Workload::Bulk];
    /// What the not-captured variant and B0 run in paired turns: a getsockopt that is not
    /// SO_ORIGINAL_DST, and a connection the policy leaves alone.
    pub const NOT_CAPTURED_TAX: [Workload; 2] = [Workload::SockoptSoError, Workload::Crr];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Crr => "crr",
            Workload::Rr1 => "rr-1B",
            Workload::Rr1k => "rr-1KiB",
            Workload::Bulk => "bulk",
            Workload::SockoptSoError => "getsockopt-SO_ERROR",
        }
    }

    pub fn pattern(self) -> Pattern {
        match self {
            Workload::Crr => Pattern::Crr,
            Workload::Rr1 | Workload::Rr1k => Pattern::Rr,
            Workload::Bulk => Pattern::Bulk,
            Workload::SockoptSoError => Pattern::Getsockopt,
        }
    }

    /// The value of `redirector-lab load --pattern`.
    pub fn pattern_arg(self) -> String {
        self.pattern()
            .to_possible_value()
            .map(|value| value.get_name().to_owned())
            .unwrap_or_default()
    }

    /// RR message size in bytes; 0 for the others.
    pub fn size(self) -> usize {
        match self {
            Workload::Rr1 => 1,
            Workload::Rr1k => 1024,
            Workload::Crr | Workload::Bulk | Workload::SockoptSoError => 0,
        }
    }

    /// The operations (connections, round trips, system calls) in one transaction of the
    /// load report.
    pub fn operations_per_transaction(self) -> u64 {
        match self {
            Workload::SockoptSoError => wire::GETSOCKOPT_CALLS_PER_TRANSACTION,
            Workload::Crr | Workload::Rr1 | Workload::Rr1k | Workload::Bulk => 1,
        }
    }

    /// What one operation is, for tables.
    pub fn operation(self) -> &'static str {
        match self {
            Workload::Crr => "connection",
            Workload::SockoptSoError => "call",
            Workload::Rr1 | Workload::Rr1k => "round trip",
            Workload::Bulk => "run",
        }
    }
}

impl Serialize for Workload {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}
