//! Which pods Istio's injector prepared for a CNI, and their traffic settings, read from the
//! pod's annotations as istio-cni reads them (its `plugin.go` checks and `redirect.go` table),
//! with no Kubernetes API access: the runtime hands the annotations to a chained plugin in
//! `runtimeConfig["io.kubernetes.cri.pod-annotations"]`.
//!
//! Whoever can create a pod writes its annotations, so everything here is hostile input: a bad
//! value is an error naming the annotation and the value, sizes are bounded, and the result
//! only ever describes that one pod. Lists are parsed by the istio-iptables flag parsers of
//! [`crate::policy`] (the annotation values are those flags' values), and the settings map to
//! the same [`Policy`] the CLI's flags produce.
//!
//! | annotation | istio-iptables flag | when absent |
//! |---|---|---|
//! | `sidecar.istio.io/interceptionMode` | `-m` | REDIRECT (TPROXY refused, NONE skips the pod) |
//! | `traffic.sidecar.istio.io/includeOutboundIPRanges` | `-i` | `*` |
//! | `traffic.sidecar.istio.io/excludeOutboundIPRanges` | `-x` | none |
//! | `traffic.sidecar.istio.io/includeInboundPorts` | `-b` | `*` |
//! | `traffic.sidecar.istio.io/excludeInboundPorts` | `-d` | 15020; 15020, 15021, 15090 always added |
//! | `traffic.sidecar.istio.io/includeOutboundPorts` | `-q` | none |
//! | `traffic.sidecar.istio.io/excludeOutboundPorts` | `-o` | 15020 |
//! | `istio.io/reroute-virtual-interfaces`, else `traffic.sidecar.istio.io/kubevirtInterfaces` | `-k` | none (any value refused) |
//! | `traffic.sidecar.istio.io/excludeInterfaces` | `-c` | none (any value refused) |
//! | `proxy.istio.io/config` `proxyMetadata.ISTIO_META_DNS_CAPTURE` | `--redirect-dns --capture-all-dns` | the node's settings |
use std::collections::BTreeMap;

use ipnet::IpNet;
use redirector_common::{MAX_ADDR_PREFIXES, MAX_PODS, MAX_PORTS};
use serde::{Deserialize, Serialize};

use super::select::Reason;
use crate::policy::{self, Policy, PolicyError, Selection, ALWAYS_EXCLUDED_INBOUND_PORTS};

/// The CRI capability (and `runtimeConfig` key) under which the runtime passes the annotations.
pub const CAPABILITY: &str = "io.kubernetes.cri.pod-annotations";

/// The annotations this module reads.
pub mod keys {
    pub const STATUS: &str = "sidecar.istio.io/status";
    pub const INJECT: &str = "sidecar.istio.io/inject";
    pub const TEMPLATES: &str = "inject.istio.io/templates";
    pub const INTERCEPTION_MODE: &str = "sidecar.istio.io/interceptionMode";
    pub const INCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/includeOutboundIPRanges";
    pub const EXCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
    pub const INCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeInboundPorts";
    pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
    pub const INCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeOutboundPorts";
    pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
    pub const REROUTE_VIRTUAL_INTERFACES: &str = "istio.io/reroute-virtual-interfaces";
    pub const KUBEVIRT_INTERFACES: &str = "traffic.sidecar.istio.io/kubevirtInterfaces";
    pub const EXCLUDE_INTERFACES: &str = "traffic.sidecar.istio.io/excludeInterfaces";
    pub const PROXY_CONFIG: &str = "proxy.istio.io/config";

    /// Every annotation read, for the size limit over all of them.
    pub const ALL: [&str; 14] = [
        STATUS,
        INJECT,
        TEMPLATES,
        INTERCEPTION_MODE,
        INCLUDE_OUTBOUND_IP_RANGES,
        EXCLUDE_OUTBOUND_IP_RANGES,
        INCLUDE_INBOUND_PORTS,
        EXCLUDE_INBOUND_PORTS,
        INCLUDE_OUTBOUND_PORTS,
        EXCLUDE_OUTBOUND_PORTS,
        REROUTE_VIRTUAL_INTERFACES,
        KUBEVIRT_INTERFACES,
        EXCLUDE_INTERFACES,
        PROXY_CONFIG,
    ];
}

/// The sidecar container the injector adds, and the init container that means iptables
/// already captures the pod.
pub const ISTIO_PROXY: &str = "istio-proxy";
pub const ISTIO_INIT: &str = "istio-init";
/// The proxy metadata key (an environment variable of istio-proxy) that switches DNS capture.
pub const DNS_CAPTURE_METADATA: &str = "ISTIO_META_DNS_CAPTURE";

/// Longest annotation value read (the injector's status is about 300 bytes; a
/// `proxy.istio.io/config` of a few dozen settings a few KiB).
pub const MAX_VALUE_BYTES: usize = 8 * 1024;
/// Most bytes read over all the annotations in [`keys::ALL`] together.
pub const MAX_TOTAL_BYTES: usize = 32 * 1024;
/// Entries of the node-wide port and address maps that a pod always uses: the seven ports
/// never captured inbound (-e, -p, -z, 15053, 15090, 15021, 15020) plus one spare; 127.0.0.0/8,
/// ::1 and the loopback CIDR, plus room for 13 pod addresses and DNS servers.
const FIXED_PORT_ENTRIES: usize = 8;
const FIXED_PREFIX_ENTRIES: usize = 16;
/// Most ports over the four port annotations, and most CIDRs over the two CIDR annotations: a
/// pod's annotations may take its share of each node-wide map (capacity / [`MAX_PODS`]) and no
/// more, so that no pod's annotations can fill the maps for the node's other pods.
pub const MAX_ANNOTATION_PORTS: usize = (MAX_PORTS / MAX_PODS) as usize - FIXED_PORT_ENTRIES;
pub const MAX_ANNOTATION_CIDRS: usize =
    (MAX_ADDR_PREFIXES / MAX_PODS) as usize - FIXED_PREFIX_ENTRIES;
/// Longest value quoted back in an error message.
const QUOTED_BYTES: usize = 200;

/// Why a pod's annotations cannot be used. Each names the annotation and (a bounded quote of)
/// its value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AnnotationError {
    #[error("annotation {key}={value:?}: {reason}")]
    Malformed {
        key: &'static str,
        value: String,
        reason: String,
    },
    /// A setting redirector does not implement.
    #[error("annotation {key}={value:?}: {reason}")]
    Unsupported {
        key: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("annotation {key} is {len} bytes long; redirector reads at most {MAX_VALUE_BYTES}")]
    TooLong { key: &'static str, len: usize },
    #[error("the istio annotations of this pod add up to {total} bytes; redirector reads at most {MAX_TOTAL_BYTES}")]
    TooLarge { total: usize },
    #[error("annotations {keys} list {count} {what}; at most {max} per pod (a pod's share of the node-wide maps)")]
    TooMany {
        keys: &'static str,
        what: &'static str,
        count: usize,
        max: usize,
    },
}

impl AnnotationError {
    fn malformed(key: &'static str, value: &str, reason: impl ToString) -> Self {
        Self::Malformed {
            key,
            value: quoted(value),
            reason: reason.to_string(),
        }
    }

    /// A setting redirector refuses, as opposed to a value that does not parse.
    pub fn is_unsupported(&self) -> bool {
        matches!(self, Self::Unsupported { .. })
    }
}

/// At most [`QUOTED_BYTES`] of `value` (cut on a character boundary), so that error messages
/// stay small whatever a pod writes.
fn quoted(value: &str) -> String {
    if value.len() <= QUOTED_BYTES {
        return value.to_owned();
    }
    let end = (0..=QUOTED_BYTES)
        .rev()
        .find(|&i| value.is_char_boundary(i))
        .unwrap_or(0);
    format!("{}… ({} bytes)", &value[..end], value.len())
}

/// What the annotations decide for a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Capture(PodSettings),
    /// Left uncaptured, for one of the annotation reasons of [`Reason`].
    Skip(Reason),
}

/// The settings a pod's annotations carry; the rest of its policy (proxy UID/GID, ports, DNS
/// servers, dual stack...) is the node's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodSettings {
    /// `-i`
    pub outbound_cidrs_include: Selection<IpNet>,
    /// `-x`
    pub outbound_cidrs_exclude: Vec<IpNet>,
    /// `-b`
    pub inbound_ports_include: Selection<u16>,
    /// `-d`, with the ports istio-cni always adds.
    pub inbound_ports_exclude: Vec<u16>,
    /// `-q`
    pub outbound_ports_include: Vec<u16>,
    /// `-o`
    pub outbound_ports_exclude: Vec<u16>,
    /// DNS capture from `proxy.istio.io/config`; None: the node's setting.
    pub redirect_dns: Option<bool>,
}

impl PodSettings {
    /// The pod's policy: `node`'s, with what the annotations carry in place of its values.
    pub fn apply(&self, node: &Policy) -> Policy {
        // A pod that switches DNS capture itself gets what istio-cni gives it: capture of every
        // DNS server (istio-cni sets CaptureAllDNS to the pod's DNS capture), since the
        // plugin does not know the pod's resolv.conf.
        let (redirect_dns, capture_all_dns) = match self.redirect_dns {
            Some(on) => (on, on),
            None => (node.redirect_dns, node.capture_all_dns),
        };
        Policy {
            outbound_cidrs_include: self.outbound_cidrs_include.clone(),
            outbound_cidrs_exclude: self.outbound_cidrs_exclude.clone(),
            inbound_ports_include: self.inbound_ports_include.clone(),
            inbound_ports_exclude: self.inbound_ports_exclude.clone(),
            outbound_ports_include: self.outbound_ports_include.clone(),
            outbound_ports_exclude: self.outbound_ports_exclude.clone(),
            redirect_dns,
            capture_all_dns,
            ..node.clone()
        }
    }
}

/// The injector's `sidecar.istio.io/status` (istio's `SidecarInjectionStatus`): which
/// containers it added. Lists may be `null`; other fields (volumes, revision...) are ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct InjectionStatus {
    #[serde(default)]
    init_containers: Option<Vec<String>>,
    #[serde(default)]
    containers: Option<Vec<String>>,
}

impl InjectionStatus {
    fn lists(&self, name: &str) -> bool {
        let has = |list: &Option<Vec<String>>| list.iter().flatten().any(|c| c == name);
        has(&self.init_containers) || has(&self.containers)
    }
}

/// The one part of `proxy.istio.io/config` (a ProxyConfig in YAML or JSON) read here.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProxyConfigAnnotation {
    #[serde(default)]
    proxy_metadata: Option<BTreeMap<String, serde_json::Value>>,
}

/// Go's `strconv.ParseBool`, which istio uses for its boolean annotations and metadata.
fn go_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Reads a pod's annotations: whether it is captured, and with which settings.
pub fn read(annotations: &BTreeMap<String, String>) -> Result<Verdict, AnnotationError> {
    let mut total = 0;
    for key in keys::ALL {
        if let Some(value) = annotations.get(key) {
            if value.len() > MAX_VALUE_BYTES {
                return Err(AnnotationError::TooLong {
                    key,
                    len: value.len(),
                });
            }
            total += value.len();
        }
    }
    if total > MAX_TOTAL_BYTES {
        return Err(AnnotationError::TooLarge { total });
    }
    let get = |key: &str| annotations.get(key).map(String::as_str);

    let Some(status) = get(keys::STATUS) else {
        return Ok(Verdict::Skip(Reason::NotInjected));
    };
    // istio-cni ignores a value ParseBool does not take, as the injector does.
    if get(keys::INJECT).and_then(|v| go_bool(v.trim())) == Some(false) {
        return Ok(Verdict::Skip(Reason::InjectDisabled));
    }
    // An object, as Go's json.Unmarshal wants one for a struct (serde would take a list too).
    let status: InjectionStatus = serde_json::from_str(status)
        .and_then(|object: serde_json::Map<_, _>| {
            serde_json::from_value(serde_json::Value::Object(object))
        })
        .map_err(|e| AnnotationError::malformed(keys::STATUS, status, e))?;
    if status.lists(ISTIO_INIT) {
        return Ok(Verdict::Skip(Reason::IstioInit));
    }
    if !status.lists(ISTIO_PROXY) {
        return Ok(Verdict::Skip(Reason::NoIstioProxy));
    }
    if let Some(templates) = get(keys::TEMPLATES) {
        let mut names = templates
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty());
        if templates.split(',').any(|t| !t.trim().is_empty()) && !names.any(|t| t == "sidecar") {
            return Ok(Verdict::Skip(Reason::NotSidecar));
        }
    }
    match get(keys::INTERCEPTION_MODE) {
        None | Some("REDIRECT") => {}
        Some("NONE") => return Ok(Verdict::Skip(Reason::InterceptionNone)),
        Some(mode @ "TPROXY") => {
            return Err(AnnotationError::Unsupported {
                key: keys::INTERCEPTION_MODE,
                value: mode.to_owned(),
                reason: "TPROXY interception (mangle table, policy routing, marks) is not implemented; redirector captures in REDIRECT mode, as `redirector enroll -m TPROXY` says too: use REDIRECT",
            })
        }
        Some(mode) => {
            return Err(AnnotationError::malformed(
                keys::INTERCEPTION_MODE,
                mode,
                "the modes are REDIRECT, TPROXY (not implemented) and NONE",
            ))
        }
    }
    let virtual_interfaces = match get(keys::REROUTE_VIRTUAL_INTERFACES) {
        Some(value) => Some((keys::REROUTE_VIRTUAL_INTERFACES, value)),
        None => get(keys::KUBEVIRT_INTERFACES).map(|value| (keys::KUBEVIRT_INTERFACES, value)),
    };
    if let Some((key, value)) = virtual_interfaces.filter(|(_, v)| !v.trim().is_empty()) {
        return Err(AnnotationError::Unsupported {
            key,
            value: quoted(value),
            reason: "rerouting traffic that arrives from virtual interfaces (istio-iptables -k, nat PREROUTING) is not implemented: redirector captures the pod's own processes by their cgroup",
        });
    }
    if let Some(value) = get(keys::EXCLUDE_INTERFACES).filter(|v| !v.trim().is_empty()) {
        return Err(AnnotationError::Unsupported {
            key: keys::EXCLUDE_INTERFACES,
            value: quoted(value),
            reason: "excluding traffic by outgoing interface (istio-iptables -c) needs a routing decision the connect hooks do not see; exclude the destinations with traffic.sidecar.istio.io/excludeOutboundIPRanges instead",
        });
    }
    settings(annotations).map(Verdict::Capture)
}

/// An annotation's value (or `default` when absent), parsed by the istio-iptables flag parser.
fn parsed<T>(
    annotations: &BTreeMap<String, String>,
    key: &'static str,
    default: &str,
    parse: impl Fn(&str) -> Result<T, PolicyError>,
) -> Result<T, AnnotationError> {
    let value = annotations.get(key).map_or(default, String::as_str);
    parse(value).map_err(|e| AnnotationError::malformed(key, value, e))
}

/// The traffic settings, each from its annotation or istio-cni's default.
fn settings(annotations: &BTreeMap<String, String>) -> Result<PodSettings, AnnotationError> {
    let outbound_cidrs_include = parsed(annotations, keys::INCLUDE_OUTBOUND_IP_RANGES, "*", |v| {
        policy::parse_cidr_selection("-i", v)
    })?;
    let outbound_cidrs_exclude = parsed(annotations, keys::EXCLUDE_OUTBOUND_IP_RANGES, "", |v| {
        policy::parse_cidr_list("-x", v)
    })?;
    let inbound_ports_include = parsed(
        annotations,
        keys::INCLUDE_INBOUND_PORTS,
        "*",
        policy::parse_port_selection,
    )?;
    let mut inbound_ports_exclude = parsed(
        annotations,
        keys::EXCLUDE_INBOUND_PORTS,
        "15020",
        policy::parse_port_list,
    )?;
    // istio-cni appends the proxy's own ports to whatever the pod excludes.
    for port in [15020, 15021, 15090] {
        debug_assert!(ALWAYS_EXCLUDED_INBOUND_PORTS.contains(&port));
        if !inbound_ports_exclude.contains(&port) {
            inbound_ports_exclude.push(port);
        }
    }
    let outbound_ports_include = parsed(
        annotations,
        keys::INCLUDE_OUTBOUND_PORTS,
        "",
        policy::parse_port_list,
    )?;
    let outbound_ports_exclude = parsed(
        annotations,
        keys::EXCLUDE_OUTBOUND_PORTS,
        "15020",
        policy::parse_port_list,
    )?;
    let settings = PodSettings {
        outbound_cidrs_include,
        outbound_cidrs_exclude,
        inbound_ports_include,
        inbound_ports_exclude,
        outbound_ports_include,
        outbound_ports_exclude,
        redirect_dns: match annotations.get(keys::PROXY_CONFIG) {
            Some(config) => dns_capture(config)?,
            None => None,
        },
    };
    check_sizes(&settings)?;
    Ok(settings)
}

fn check_sizes(settings: &PodSettings) -> Result<(), AnnotationError> {
    fn listed<T>(selection: &Selection<T>) -> usize {
        match selection {
            Selection::All => 0,
            Selection::Only(items) => items.len(),
        }
    }
    let ports = listed(&settings.inbound_ports_include)
        + settings.inbound_ports_exclude.len()
        + settings.outbound_ports_include.len()
        + settings.outbound_ports_exclude.len();
    let cidrs = listed(&settings.outbound_cidrs_include) + settings.outbound_cidrs_exclude.len();
    for (count, max, keys, what) in [
        (
            ports,
            MAX_ANNOTATION_PORTS,
            "traffic.sidecar.istio.io/{include,exclude}{Inbound,Outbound}Ports",
            "ports",
        ),
        (
            cidrs,
            MAX_ANNOTATION_CIDRS,
            "traffic.sidecar.istio.io/{include,exclude}OutboundIPRanges",
            "CIDRs",
        ),
    ] {
        if count > max {
            return Err(AnnotationError::TooMany {
                keys,
                what,
                count,
                max,
            });
        }
    }
    Ok(())
}

/// `proxyMetadata.ISTIO_META_DNS_CAPTURE` of a `proxy.istio.io/config`, if it sets it.
fn dns_capture(config: &str) -> Result<Option<bool>, AnnotationError> {
    let malformed = |reason: String| AnnotationError::malformed(keys::PROXY_CONFIG, config, reason);
    // The value is at most MAX_VALUE_BYTES; the budget also bounds what aliases could expand to.
    let options = serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_events: 20_000,
            max_aliases: 100,
            max_anchors: 100,
            max_depth: 32,
        },
        alias_limits: serde_saphyr::alias_limits! {
            max_total_replayed_events: 10_000,
        },
    };
    let parsed: Option<ProxyConfigAnnotation> =
        serde_saphyr::from_str_with_options(config, options)
            .map_err(|e| malformed(format!("not a ProxyConfig in YAML or JSON: {e}")))?;
    let Some(value) = parsed
        .and_then(|config| config.proxy_metadata)
        .and_then(|mut metadata| metadata.remove(DNS_CAPTURE_METADATA))
    else {
        return Ok(None);
    };
    match &value {
        serde_json::Value::Bool(on) => Ok(Some(*on)),
        serde_json::Value::String(text) => go_bool(text).map(Some).ok_or_else(|| {
            malformed(format!(
                "proxyMetadata.{DNS_CAPTURE_METADATA} {text:?} is not true or false"
            ))
        }),
        other => Err(malformed(format!(
            "proxyMetadata.{DNS_CAPTURE_METADATA} is {other}, not true or false"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the injector writes on a pod with istio_cni enabled: `istio-validation` and the
    /// proxy, and the traffic annotations of the default install.
    fn injected() -> BTreeMap<String, String> {
        [
            (keys::STATUS, r#"{"initContainers":["istio-validation"],"containers":["istio-proxy"],"volumes":["workload-socket","istio-envoy","istio-data","istio-podinfo","istio-token","istiod-ca-cert"],"imagePullSecrets":null,"revision":"default"}"#),
            (keys::INTERCEPTION_MODE, "REDIRECT"),
            (keys::INCLUDE_OUTBOUND_IP_RANGES, "*"),
            (keys::INCLUDE_INBOUND_PORTS, "*"),
            (keys::EXCLUDE_INBOUND_PORTS, "15020"),
            ("kubectl.kubernetes.io/default-container", "app"),
            ("istio.io/rev", "default"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    fn with(changes: &[(&str, Option<&str>)]) -> BTreeMap<String, String> {
        let mut annotations = injected();
        for (key, value) in changes {
            match value {
                Some(value) => annotations.insert((*key).to_owned(), (*value).to_owned()),
                None => annotations.remove(*key),
            };
        }
        annotations
    }

    fn captured(annotations: &BTreeMap<String, String>) -> PodSettings {
        match read(annotations) {
            Ok(Verdict::Capture(settings)) => settings,
            other => panic!("not captured: {other:?}"),
        }
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn an_injected_pod_gets_istio_cnis_defaults() {
        let defaults = PodSettings {
            outbound_cidrs_include: Selection::All,
            outbound_cidrs_exclude: vec![],
            inbound_ports_include: Selection::All,
            inbound_ports_exclude: vec![15020, 15021, 15090],
            outbound_ports_include: vec![],
            outbound_ports_exclude: vec![15020],
            redirect_dns: None,
        };
        assert_eq!(captured(&injected()), defaults);
        // Only the status: every setting takes istio-cni's default.
        let bare = with(&[
            (keys::INTERCEPTION_MODE, None),
            (keys::INCLUDE_OUTBOUND_IP_RANGES, None),
            (keys::INCLUDE_INBOUND_PORTS, None),
            (keys::EXCLUDE_INBOUND_PORTS, None),
        ]);
        assert_eq!(captured(&bare), defaults);
    }

    #[test]
    fn every_traffic_annotation_maps_to_its_flag() {
        let settings = captured(&with(&[
            (
                keys::INCLUDE_OUTBOUND_IP_RANGES,
                Some("10.0.0.0/8, fd00::/8"),
            ),
            (
                keys::EXCLUDE_OUTBOUND_IP_RANGES,
                Some("10.96.0.0/12,169.254.169.254/32"),
            ),
            (keys::INCLUDE_INBOUND_PORTS, Some("8080,9090")),
            (keys::EXCLUDE_INBOUND_PORTS, Some("9100,15021")),
            (keys::INCLUDE_OUTBOUND_PORTS, Some("3306")),
            (keys::EXCLUDE_OUTBOUND_PORTS, Some("5432,6379")),
            (keys::KUBEVIRT_INTERFACES, Some("")),
            (
                keys::PROXY_CONFIG,
                Some("proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n"),
            ),
        ]));
        assert_eq!(
            settings,
            PodSettings {
                outbound_cidrs_include: Selection::Only(vec![net("10.0.0.0/8"), net("fd00::/8")]),
                outbound_cidrs_exclude: vec![net("10.96.0.0/12"), net("169.254.169.254/32")],
                inbound_ports_include: Selection::Only(vec![8080, 9090]),
                inbound_ports_exclude: vec![9100, 15021, 15020, 15090],
                outbound_ports_include: vec![3306],
                outbound_ports_exclude: vec![5432, 6379],
                redirect_dns: Some(true),
            }
        );
        // Empty values: capture nothing outbound or inbound, exclude nothing outbound.
        let empty = captured(&with(&[
            (keys::INCLUDE_OUTBOUND_IP_RANGES, Some("")),
            (keys::INCLUDE_INBOUND_PORTS, Some("")),
            (keys::EXCLUDE_INBOUND_PORTS, Some("")),
            (keys::EXCLUDE_OUTBOUND_PORTS, Some("")),
        ]));
        assert_eq!(empty.outbound_cidrs_include, Selection::none());
        assert_eq!(empty.inbound_ports_include, Selection::none());
        assert_eq!(empty.inbound_ports_exclude, vec![15020, 15021, 15090]);
        assert_eq!(empty.outbound_ports_exclude, Vec::<u16>::new());
    }

    #[test]
    fn settings_replace_the_nodes_values_and_keep_the_rest() {
        let node = Policy {
            proxy_uids: vec![1337, 0],
            redirect_dns: true,
            capture_all_dns: true,
            dual_stack: true,
            outbound_ports_exclude: vec![22],
            ..Policy::default()
        };
        let settings = captured(&with(&[(keys::EXCLUDE_OUTBOUND_PORTS, Some("5432"))]));
        let policy = settings.apply(&node);
        assert_eq!(
            policy,
            Policy {
                outbound_ports_exclude: vec![5432],
                inbound_ports_include: Selection::All,
                inbound_ports_exclude: vec![15020, 15021, 15090],
                ..node.clone()
            }
        );
        let dns_off = captured(&with(&[(
            keys::PROXY_CONFIG,
            Some(
                r#"{"proxyMetadata": {"ISTIO_META_DNS_CAPTURE": "false"}, "holdApplicationUntilProxyStarts": true}"#,
            ),
        )]));
        let off = dns_off.apply(&node);
        assert!(!off.redirect_dns, "the pod's setting wins");
        assert!(!off.capture_all_dns, "and takes capture-all with it");
        let silent = captured(&with(&[(keys::PROXY_CONFIG, Some("concurrency: 2\n"))]));
        assert!(silent.apply(&node).redirect_dns, "the node's setting stays");
        assert!(silent.apply(&node).capture_all_dns);
        let dns_on = captured(&with(&[(
            keys::PROXY_CONFIG,
            Some("proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n"),
        )]));
        let quiet_node = Policy::default();
        let on = dns_on.apply(&quiet_node);
        assert!(
            on.redirect_dns && on.capture_all_dns,
            "a pod's own DNS capture captures every DNS server, as istio-cni does"
        );
    }

    #[test]
    fn the_same_settings_as_the_injectors_istio_iptables_line() {
        // What `redirector enroll` makes of the line the injector gives istio-init for the
        // same pod, with istio-cni's outbound default (-o 15020), which the injector leaves to it.
        let mut line = crate::flags::tests::SIDECAR_INJECTOR_LINE.to_vec();
        line.extend(["-o", "15020"]);
        let mut from_flags = crate::flags::tests::parse(&line).unwrap();
        let mut from_annotations = captured(&injected()).apply(&Policy::default());
        for policy in [&mut from_flags, &mut from_annotations] {
            policy.inbound_ports_exclude.sort_unstable();
        }
        assert_eq!(from_annotations, from_flags);
    }

    #[test]
    fn status_shapes_decide_capture() {
        let status = |json: &str| read(&with(&[(keys::STATUS, Some(json))]));
        let capture = |r: Result<Verdict, AnnotationError>| matches!(r, Ok(Verdict::Capture(_)));
        // Native sidecar (Kubernetes 1.28+): the proxy is an init container.
        assert!(capture(status(
            r#"{"initContainers":["istio-validation","istio-proxy"],"containers":null,"volumes":["istio-envoy"],"imagePullSecrets":null,"revision":"default"}"#
        )));
        // An older injector's status, with a version and no revision.
        assert!(capture(status(
            r#"{"version":"abc","initContainers":["istio-validation"],"containers":["istio-proxy"],"volumes":[],"imagePullSecrets":[]}"#
        )));
        assert!(capture(status(r#"{"containers":["istio-proxy"]}"#)));
        assert_eq!(
            status(r#"{"initContainers":["istio-init"],"containers":["istio-proxy"]}"#),
            Ok(Verdict::Skip(Reason::IstioInit))
        );
        assert_eq!(
            status(r#"{"initContainers":["istio-init","istio-proxy"]}"#),
            Ok(Verdict::Skip(Reason::IstioInit))
        );
        for none in [r#"{"containers":["app"]}"#, "{}", r#"{"containers":null}"#] {
            assert_eq!(
                status(none),
                Ok(Verdict::Skip(Reason::NoIstioProxy)),
                "{none}"
            );
        }
        for bad in [
            "",
            "injected",
            r#"{"containers":"istio-proxy"}"#,
            "[]",
            r#"{"containers":[1]}"#,
        ] {
            match status(bad) {
                Err(AnnotationError::Malformed { key, value, .. }) => {
                    assert_eq!((key, value.as_str()), (keys::STATUS, bad))
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn pods_the_injector_did_not_prepare_are_skipped() {
        let skip = |annotations: BTreeMap<String, String>| read(&annotations);
        assert_eq!(
            skip(BTreeMap::new()),
            Ok(Verdict::Skip(Reason::NotInjected))
        );
        assert_eq!(
            skip(with(&[(keys::STATUS, None)])),
            Ok(Verdict::Skip(Reason::NotInjected))
        );
        for off in ["false", "False", "0", "f"] {
            assert_eq!(
                skip(with(&[(keys::INJECT, Some(off))])),
                Ok(Verdict::Skip(Reason::InjectDisabled)),
                "{off}"
            );
        }
        for ignored in ["true", "yes", ""] {
            assert!(
                matches!(
                    skip(with(&[(keys::INJECT, Some(ignored))])),
                    Ok(Verdict::Capture(_))
                ),
                "{ignored}"
            );
        }
        assert_eq!(
            skip(with(&[(keys::INTERCEPTION_MODE, Some("NONE"))])),
            Ok(Verdict::Skip(Reason::InterceptionNone))
        );
        assert_eq!(
            skip(with(&[(keys::TEMPLATES, Some("gateway"))])),
            Ok(Verdict::Skip(Reason::NotSidecar))
        );
        assert!(matches!(
            skip(with(&[(keys::TEMPLATES, Some("sidecar,custom"))])),
            Ok(Verdict::Capture(_))
        ));
    }

    #[test]
    fn unsupported_settings_are_refused_naming_the_annotation() {
        for (key, value, words) in [
            (keys::INTERCEPTION_MODE, "TPROXY", "TPROXY interception"),
            (keys::KUBEVIRT_INTERFACES, "net1", "virtual interfaces"),
            (
                keys::REROUTE_VIRTUAL_INTERFACES,
                "net1,net2",
                "virtual interfaces",
            ),
            (keys::EXCLUDE_INTERFACES, "eth1", "outgoing interface"),
        ] {
            let error = read(&with(&[(key, Some(value))])).unwrap_err();
            assert!(error.is_unsupported(), "{error}");
            let message = error.to_string();
            assert!(
                message.contains(key) && message.contains(value) && message.contains(words),
                "{message}"
            );
        }
        // reroute-virtual-interfaces wins over the deprecated kubevirtInterfaces.
        assert!(matches!(
            read(&with(&[
                (keys::REROUTE_VIRTUAL_INTERFACES, Some("")),
                (keys::KUBEVIRT_INTERFACES, Some("net1"))
            ])),
            Ok(Verdict::Capture(_))
        ));
    }

    #[test]
    fn malformed_values_are_refused_naming_the_annotation_and_the_value() {
        for (key, value) in [
            (keys::INTERCEPTION_MODE, "redirect"),
            (keys::INCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/33"),
            (keys::EXCLUDE_OUTBOUND_IP_RANGES, "*"),
            (keys::EXCLUDE_OUTBOUND_IP_RANGES, "10.0.0.0/8;rm -rf"),
            (keys::INCLUDE_INBOUND_PORTS, "80,http"),
            (keys::EXCLUDE_INBOUND_PORTS, "0"),
            (keys::INCLUDE_OUTBOUND_PORTS, "70000"),
            (keys::EXCLUDE_OUTBOUND_PORTS, "*"),
            (keys::PROXY_CONFIG, "proxyMetadata: [unclosed"),
            (
                keys::PROXY_CONFIG,
                "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: maybe\n",
            ),
            (
                keys::PROXY_CONFIG,
                "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: [1]\n",
            ),
        ] {
            match read(&with(&[(key, Some(value))])) {
                Err(error @ AnnotationError::Malformed { .. }) => {
                    let message = error.to_string();
                    assert!(
                        message.contains(key) && message.contains(&format!("{value:?}")),
                        "{message}"
                    );
                }
                other => panic!("{key}={value:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn sizes_are_bounded() {
        let long = "1".repeat(MAX_VALUE_BYTES + 1);
        assert_eq!(
            read(&with(&[(keys::EXCLUDE_OUTBOUND_PORTS, Some(&long))])),
            Err(AnnotationError::TooLong {
                key: keys::EXCLUDE_OUTBOUND_PORTS,
                len: MAX_VALUE_BYTES + 1
            })
        );
        // Several values under the limit each, too much together.
        let padded = format!("{}80", " ".repeat(MAX_VALUE_BYTES - 2));
        let mut annotations = injected();
        for key in [
            keys::INCLUDE_OUTBOUND_PORTS,
            keys::EXCLUDE_OUTBOUND_PORTS,
            keys::INCLUDE_INBOUND_PORTS,
            keys::EXCLUDE_INBOUND_PORTS,
            keys::INCLUDE_OUTBOUND_IP_RANGES,
        ] {
            annotations.insert(key.to_owned(), padded.clone());
        }
        assert!(matches!(
            read(&annotations),
            Err(AnnotationError::TooLarge { .. })
        ));
        // Big annotations redirector does not read are no concern of it.
        let mut other = injected();
        other.insert(
            "kubectl.kubernetes.io/last-applied-configuration".into(),
            "x".repeat(200 * 1024),
        );
        assert!(matches!(read(&other), Ok(Verdict::Capture(_))));

        let ports = |n: usize| {
            (1..=n)
                .map(|p| (p + 1000).to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        let at_limit = MAX_ANNOTATION_PORTS - 4; // 15020 out, 15020/15021/15090 in
        assert!(matches!(
            read(&with(&[(
                keys::INCLUDE_OUTBOUND_PORTS,
                Some(&ports(at_limit))
            )])),
            Ok(Verdict::Capture(_))
        ));
        assert!(matches!(
            read(&with(&[(
                keys::INCLUDE_OUTBOUND_PORTS,
                Some(&ports(at_limit + 1))
            )])),
            Err(AnnotationError::TooMany { what: "ports", .. })
        ));
        let cidrs = |n: usize| {
            (0..n)
                .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256))
                .collect::<Vec<_>>()
                .join(",")
        };
        assert!(matches!(
            read(&with(&[(
                keys::EXCLUDE_OUTBOUND_IP_RANGES,
                Some(&cidrs(MAX_ANNOTATION_CIDRS))
            )])),
            Ok(Verdict::Capture(_))
        ));
        let error = read(&with(&[(
            keys::EXCLUDE_OUTBOUND_IP_RANGES,
            Some(&cidrs(MAX_ANNOTATION_CIDRS + 1)),
        )]))
        .unwrap_err();
        assert!(
            matches!(error, AnnotationError::TooMany { what: "CIDRs", .. }),
            "{error}"
        );
        // A pod at its limits stays within its share of the node-wide maps.
        let full = captured(&with(&[
            (keys::INCLUDE_OUTBOUND_PORTS, Some(&ports(at_limit))),
            (
                keys::EXCLUDE_OUTBOUND_IP_RANGES,
                Some(&cidrs(MAX_ANNOTATION_CIDRS)),
            ),
        ]));
        let network = crate::policy::PodNetwork {
            addresses: vec!["10.244.1.7".parse().unwrap(), "fd00::7".parse().unwrap()],
        };
        let compiled = full.apply(&Policy::default()).compile(&network);
        assert!(compiled.ports.len() <= (MAX_PORTS / MAX_PODS) as usize);
        assert!(compiled.prefixes.len() <= (MAX_ADDR_PREFIXES / MAX_PODS) as usize);
    }

    #[test]
    fn a_long_value_is_quoted_short_in_errors() {
        let long = format!("{}é,x", "1,".repeat(150));
        let message = read(&with(&[(keys::EXCLUDE_OUTBOUND_PORTS, Some(&long))]))
            .unwrap_err()
            .to_string();
        assert!(message.len() < 600, "{message}");
        assert!(
            message.contains(&format!("({} bytes)", long.len())),
            "{message}"
        );
    }

    #[test]
    fn yaml_aliases_cannot_blow_up() {
        let mut bomb = String::from("a: &a [x, x, x, x, x, x, x, x, x]\n");
        for (i, name) in ["b", "c", "d", "e", "f", "g", "h", "i"].iter().enumerate() {
            let prev = ["a", "b", "c", "d", "e", "f", "g", "h"][i];
            bomb.push_str(&format!(
                "{name}: &{name} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"
            ));
        }
        bomb.push_str("proxyMetadata: *i\n");
        assert!(bomb.len() < MAX_VALUE_BYTES);
        let result = read(&with(&[(keys::PROXY_CONFIG, Some(&bomb))]));
        assert!(
            matches!(result, Err(AnnotationError::Malformed { .. })),
            "{result:?}"
        );
    }
}
