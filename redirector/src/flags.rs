//! istio-iptables' command line, accepted verbatim by `redirector enroll`, so that the line
//! an Istio sidecar injector writes (`-p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x ""
//! -b '*' -d 15090,15021,15020`) works unchanged. Long names follow istio-iptables.
use std::{fs, path::Path};

use crate::policy::{
    self, IdKind, Policy, PolicyError, DEFAULT_INBOUND_CAPTURE_PORT, DEFAULT_INBOUND_TUNNEL_PORT,
    DEFAULT_PROXY_PORT,
};

/// How a dry run prints the policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

/// A parsed comma-separated list (one flag value, not repeated flags).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct List<T>(pub Vec<T>);

#[derive(clap::Args, Clone, Debug)]
pub struct IstioFlags {
    /// Outbound capture port.
    #[arg(short = 'p', long = "proxy-port", visible_alias = "envoy-port", default_value_t = DEFAULT_PROXY_PORT, value_parser = policy::parse_port)]
    pub proxy_port: u16,
    /// Inbound capture port; also where the proxy's calls to its own pod go.
    #[arg(short = 'z', long = "inbound-capture-port", default_value_t = DEFAULT_INBOUND_CAPTURE_PORT, value_parser = policy::parse_port)]
    pub inbound_capture_port: u16,
    /// Inbound tunnel port, never captured.
    #[arg(short = 'e', long = "inbound-tunnel-port", default_value_t = DEFAULT_INBOUND_TUNNEL_PORT, value_parser = policy::parse_port)]
    pub inbound_tunnel_port: u16,
    /// The proxy's UIDs (comma-separated); their connections are not captured.
    #[arg(short = 'u', long = "proxy-uid", default_value = "1337", value_parser = |s: &str| policy::parse_id_list(IdKind::Uid, s).map(List))]
    pub proxy_uids: List<u32>,
    /// The proxy's GIDs (comma-separated); default: the same as -u, as istio-iptables does.
    #[arg(short = 'g', long = "proxy-gid", value_parser = |s: &str| policy::parse_id_list(IdKind::Gid, s).map(List))]
    pub proxy_gids: Option<List<u32>>,
    /// Inbound interception mode: REDIRECT (TPROXY is not implemented).
    #[arg(
        short = 'm',
        long = "istio-inbound-interception-mode",
        default_value = "REDIRECT"
    )]
    pub mode: String,
    /// Inbound ports to capture (comma-separated, or '*').
    #[arg(short = 'b', long = "istio-inbound-ports", default_value = "", value_parser = policy::parse_port_selection)]
    pub inbound_ports: policy::Selection<u16>,
    /// Inbound ports never captured (with -b '*').
    #[arg(short = 'd', long = "istio-local-exclude-ports", default_value = "", value_parser = |s: &str| policy::parse_port_list(s).map(List))]
    pub inbound_ports_exclude: List<u16>,
    /// Outbound ports always captured.
    #[arg(short = 'q', long = "istio-outbound-ports", default_value = "", value_parser = |s: &str| policy::parse_port_list(s).map(List))]
    pub outbound_ports: List<u16>,
    /// Outbound ports never captured (comma-separated), as istio-iptables' -o.
    #[arg(short = 'o', long = "istio-local-outbound-ports-exclude", default_value = "", value_parser = |s: &str| policy::parse_port_list(s).map(List))]
    pub outbound_ports_exclude: List<u16>,
    /// How --dry-run prints the policy.
    #[arg(long = "output", value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
    /// Outbound destinations to capture (comma-separated CIDRs, or '*'). Default '*': unlike
    /// istio-iptables (default: none), enrolling a pod captures it; pass -i '' for none.
    #[arg(short = 'i', long = "istio-service-cidr", default_value = "*", value_parser = |s: &str| policy::parse_cidr_selection("-i", s))]
    pub outbound_cidrs: policy::Selection<ipnet::IpNet>,
    /// Outbound destinations never captured (comma-separated CIDRs).
    #[arg(short = 'x', long = "istio-service-exclude-cidr", default_value = "")]
    pub outbound_cidrs_exclude: String,
    /// Send DNS (TCP and UDP port 53) to the DNS servers to istio-agent's port 15053.
    #[arg(long = "redirect-dns", env = "ISTIO_META_DNS_CAPTURE")]
    pub redirect_dns: bool,
    /// With --redirect-dns: TCP and UDP port 53 to any address, not only the DNS servers.
    #[arg(long = "capture-all-dns")]
    pub capture_all_dns: bool,
    /// DNS servers for --redirect-dns (comma-separated); default: /etc/resolv.conf, as istio-iptables.
    #[arg(long = "dns-servers")]
    pub dns_servers: Option<String>,
    /// Capture IPv6 when the pod has any IPv6 address (not only when its first one is).
    #[arg(long = "dual-stack", env = "ISTIO_AGENT_DUAL_STACK")]
    pub dual_stack: bool,
    /// Owner groups whose processes are captured (names or GIDs, or '*').
    #[arg(
        long = "owner-groups-include",
        env = "ISTIO_OUTBOUND_OWNER_GROUPS",
        default_value = "*"
    )]
    pub owner_groups_include: String,
    /// Owner groups whose processes are not captured.
    #[arg(
        long = "owner-groups-exclude",
        env = "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
        default_value = ""
    )]
    pub owner_groups_exclude: String,
    /// The IPv4 loopback range the proxy's own-pod rule leaves alone.
    #[arg(
        long = "ipv4-loopback-cidr",
        env = "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
        default_value = "127.0.0.1/32"
    )]
    pub ipv4_loopback_cidr: String,
    /// With no proxy listening on the inbound port, deliver inbound connections to the
    /// application instead of refusing them.
    #[arg(long = "inbound-fail-open")]
    pub inbound_fail_open: bool,
    /// Print the effective policy and change nothing.
    #[arg(short = 'n', long = "dry-run")]
    pub dry_run: bool,

    // istio-iptables flags with no eBPF meaning: accepted by the parser so that the refusal
    // can say why.
    #[arg(short = 'k', long = "kube-virt-interfaces", hide = true)]
    pub kube_virt_interfaces: Option<String>,
    #[arg(short = 'c', long = "istio-exclude-interfaces", hide = true)]
    pub exclude_interfaces: Option<String>,
    #[arg(short = 't', long = "istio-inbound-tproxy-mark", hide = true)]
    pub tproxy_mark: Option<String>,
    #[arg(short = 'r', long = "istio-inbound-tproxy-route-table", hide = true)]
    pub tproxy_route_table: Option<String>,
    #[arg(long = "drop-invalid", hide = true)]
    pub drop_invalid: bool,
    #[arg(long = "trace-logging", hide = true)]
    pub trace_logging: bool,
    #[arg(long = "run-validation", hide = true)]
    pub run_validation: bool,
}

impl IstioFlags {
    /// Checks the flags together and builds the policy.
    pub fn to_policy(&self) -> Result<Policy, PolicyError> {
        self.refuse_unsupported()?;
        let outbound_cidrs_exclude = if self.outbound_cidrs_exclude.trim() == "*" {
            return Err(PolicyError::Unsupported {
                flag: "-x",
                reason: "'*' would exclude every destination; istio-iptables refuses it too",
            });
        } else {
            policy::parse_cidr_list("-x", &self.outbound_cidrs_exclude)?
        };
        let loopback = self.ipv4_loopback_cidr.trim();
        let ipv4_loopback_cidr =
            loopback
                .parse::<ipnet::Ipv4Net>()
                .map_err(|e| PolicyError::Cidr {
                    flag: "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
                    value: loopback.to_owned(),
                    reason: e.to_string(),
                })?;
        let dns_servers = match (
            &self.dns_servers,
            self.redirect_dns && !self.capture_all_dns,
        ) {
            (Some(list), _) => policy::parse_address_list("--dns-servers", list)?,
            (None, true) => resolv_conf_servers(Path::new("/etc/resolv.conf")),
            (None, false) => Vec::new(),
        };
        Ok(Policy {
            proxy_port: self.proxy_port,
            inbound_capture_port: self.inbound_capture_port,
            inbound_tunnel_port: self.inbound_tunnel_port,
            proxy_uids: self.proxy_uids.0.clone(),
            proxy_gids: self
                .proxy_gids
                .as_ref()
                .unwrap_or(&self.proxy_uids)
                .0
                .clone(),
            outbound_ports_include: self.outbound_ports.0.clone(),
            outbound_ports_exclude: self.outbound_ports_exclude.0.clone(),
            outbound_cidrs_include: self.outbound_cidrs.clone(),
            outbound_cidrs_exclude,
            inbound_ports_include: self.inbound_ports.clone(),
            inbound_ports_exclude: self.inbound_ports_exclude.0.clone(),
            redirect_dns: self.redirect_dns,
            capture_all_dns: self.capture_all_dns,
            dns_servers,
            owner_groups: policy::parse_owner_groups(
                &self.owner_groups_include,
                &self.owner_groups_exclude,
            )?,
            ipv4_loopback_cidr,
            dual_stack: self.dual_stack,
            inbound_fail_open: self.inbound_fail_open,
        })
    }

    fn refuse_unsupported(&self) -> Result<(), PolicyError> {
        let refuse = |flag, reason| Err(PolicyError::Unsupported { flag, reason });
        match self.mode.trim() {
            "REDIRECT" | "" => {}
            "TPROXY" => return refuse("-m TPROXY", "TPROXY interception (mangle table, policy routing, marks) is not implemented; redirector captures in REDIRECT mode: use -m REDIRECT"),
            _ => return refuse("-m", "unknown inbound interception mode; the modes are REDIRECT and TPROXY (not implemented)"),
        }
        if self.kube_virt_interfaces.is_some() {
            return refuse("-k/--kube-virt-interfaces", "rerouting traffic that arrives from virtual interfaces (nat PREROUTING) has no counterpart in redirector, whose programs capture the pod's own processes by their cgroup");
        }
        if self.exclude_interfaces.is_some() {
            return refuse("-c/--istio-exclude-interfaces", "excluding traffic by outgoing interface needs a routing decision the connect hooks do not see; exclude the destinations with -x instead");
        }
        if self.tproxy_mark.is_some() || self.tproxy_route_table.is_some() {
            return refuse("-t/-r", "the TPROXY mark and route table only matter in TPROXY mode, which is not implemented");
        }
        if self.drop_invalid {
            return refuse("--drop-invalid", "dropping conntrack-INVALID packets is a fix for NAT'ed connections; redirector does no NAT, so there is nothing to drop");
        }
        if self.trace_logging {
            return refuse("--trace-logging", "there are no iptables rules to trace; use `redirector log` for per-connection kernel log lines");
        }
        if self.run_validation {
            return refuse("--run-validation", "validation of iptables rules does not apply; `redirector enroll` returns only once capture is active");
        }
        Ok(())
    }
}

/// An istio-iptables command line on its own (what `redirector enroll` accepts after its own
/// flags), for checking a line outside the CLI.
#[derive(clap::Parser, Debug)]
#[command(name = "istio-iptables", no_binary_name = true)]
pub struct IstioIptables {
    #[command(flatten)]
    pub flags: IstioFlags,
}

impl IstioIptables {
    /// The policy of a line of flags (split at whitespace, so without shell quoting).
    pub fn policy_of_line(line: &str) -> Result<Policy, FlagLineError> {
        use clap::Parser as _;
        let parsed = Self::try_parse_from(line.split_whitespace())
            .map_err(|error| FlagLineError::Flags(error.to_string()))?;
        Ok(parsed.flags.to_policy()?)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FlagLineError {
    #[error("{0}")]
    Flags(String),
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

/// The `nameserver` lines of a resolv.conf; a missing file gives none (DNS capture then
/// stays off unless --capture-all-dns, as in istio-iptables).
pub fn resolv_conf_servers(path: &Path) -> Vec<std::net::IpAddr> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().split('%').next()?.parse().ok())
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use clap::Parser;

    use super::*;
    use crate::policy::Selection;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        flags: IstioFlags,
    }

    /// What Istio's sidecar injector passes to istio-iptables.
    pub(crate) const SIDECAR_INJECTOR_LINE: &[&str] = &[
        "-p",
        "15001",
        "-z",
        "15006",
        "-u",
        "1337",
        "-m",
        "REDIRECT",
        "-i",
        "*",
        "-x",
        "",
        "-b",
        "*",
        "-d",
        "15090,15021,15020",
    ];

    /// `redirector enroll LINE`'s policy, or the error it prints.
    pub(crate) fn parse(line: &[&str]) -> Result<Policy, String> {
        let cli = Cli::try_parse_from(std::iter::once("enroll").chain(line.iter().copied()))
            .map_err(|e| e.to_string())?;
        cli.flags.to_policy().map_err(|e| e.to_string())
    }

    #[test]
    fn the_sidecar_injector_line_works_unchanged() {
        let policy = parse(SIDECAR_INJECTOR_LINE).unwrap();
        assert_eq!(policy.outbound_cidrs_include, Selection::All);
        assert_eq!(policy.inbound_ports_include, Selection::All);
        assert_eq!(policy.inbound_ports_exclude, vec![15090, 15021, 15020]);
        assert_eq!(policy.proxy_gids, vec![1337], "-g defaults to -u");
    }

    #[test]
    fn tproxy_and_flags_without_ebpf_meaning_are_refused_with_the_reason() {
        for (line, expected) in [
            (&["-m", "TPROXY"][..], "TPROXY interception"),
            (&["-m", "NAT"][..], "unknown inbound interception mode"),
            (&["-k", "eth0"][..], "kube-virt-interfaces"),
            (&["-c", "eth1"][..], "outgoing interface"),
            (&["-t", "1337"][..], "TPROXY mode"),
            (&["--drop-invalid"][..], "does no NAT"),
            (&["-x", "*"][..], "exclude every destination"),
        ] {
            let error = parse(line).unwrap_err();
            assert!(error.contains(expected), "{line:?}: {error}");
        }
    }

    #[test]
    fn malformed_values_are_refused_with_a_message() {
        for (line, expected) in [
            (&["-i", "10.0.0.0/33"][..], "invalid CIDR"),
            (&["-x", "nonsense"][..], "invalid CIDR"),
            (&["-p", "0"][..], "invalid port"),
            (&["-z", "70000"][..], "invalid port"),
            (&["-q", "80,x"][..], "invalid port"),
            (&["-u", ""][..], "invalid UID list"),
            (&["-g", "abc"][..], "invalid GID list"),
            (&["-o", "99999"][..], "invalid port"),
            (&["--dns-servers", "1.2.3"][..], "invalid address"),
        ] {
            let error = parse(line).unwrap_err();
            assert!(error.contains(expected), "{line:?}: {error}");
        }
    }

    #[test]
    fn dash_o_is_the_outbound_port_exclusion_and_nothing_else() {
        assert_eq!(
            parse(&["-o", "5432,6379"]).unwrap().outbound_ports_exclude,
            vec![5432, 6379]
        );
        for format in ["json", "table"] {
            let error = parse(&["-n", "-o", format]).unwrap_err();
            assert!(error.contains("invalid port"), "-o {format}: {error}");
        }
        let cli = Cli::try_parse_from(["enroll", "-n", "--output", "json"]).unwrap();
        assert_eq!(cli.flags.output, OutputFormat::Json);
        assert!(cli
            .flags
            .to_policy()
            .unwrap()
            .outbound_ports_exclude
            .is_empty());
        let cli = Cli::try_parse_from(["enroll", "-n"]).unwrap();
        assert_eq!(cli.flags.output, OutputFormat::Table);
    }

    /// The JSON type of every field, by path (`[]` for list items), across `values`.
    fn json_types(
        value: &serde_json::Value,
        path: String,
        seen: &mut std::collections::BTreeMap<String, std::collections::BTreeSet<&'static str>>,
    ) {
        use serde_json::Value;
        let kind = match value {
            Value::Null => "null",
            Value::Bool(_) => "bool",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(items) => {
                items
                    .iter()
                    .for_each(|item| json_types(item, format!("{path}[]"), seen));
                "list"
            }
            Value::Object(fields) => {
                for (key, field) in fields {
                    json_types(field, format!("{path}.{key}"), seen);
                }
                "object"
            }
        };
        seen.entry(path).or_default().insert(kind);
    }

    /// Every field of the policy's JSON has one type, whatever the flags: `*` is a boolean, lists
    /// are lists.
    #[test]
    fn policy_json_has_one_type_per_field() {
        let lines: &[&[&str]] = &[
            SIDECAR_INJECTOR_LINE,
            &[],
            &[
                "-i",
                "10.0.0.0/8",
                "-b",
                "80,443",
                "--owner-groups-include",
                "0",
            ],
            &["--owner-groups-exclude", "0", "-i", ""],
        ];
        let mut seen = std::collections::BTreeMap::new();
        for line in lines {
            let json = serde_json::to_value(parse(line).unwrap()).unwrap();
            json_types(&json, String::new(), &mut seen);
            let back: Policy = serde_json::from_value(json).unwrap();
            assert_eq!(back, parse(line).unwrap(), "{line:?} reads back");
        }
        let mixed: Vec<_> = seen.iter().filter(|(_, kinds)| kinds.len() > 1).collect();
        assert!(
            mixed.is_empty(),
            "fields with more than one type: {mixed:?}"
        );
        assert_eq!(
            seen[".inbound_ports_include.all"],
            ["bool"].into_iter().collect()
        );
    }

    #[test]
    fn nameservers_are_read_from_resolv_conf() {
        let dir = std::env::temp_dir().join(format!("redirector-resolv-{}", std::process::id()));
        fs::write(&dir, "# comment\nnameserver 127.0.0.53\nsearch x\nnameserver fe80::1%eth0\nnameserver ::127.0.0.53\n").unwrap();
        let servers = resolv_conf_servers(&dir);
        fs::remove_file(&dir).unwrap();
        assert_eq!(
            servers,
            vec![
                "127.0.0.53".parse::<std::net::IpAddr>().unwrap(),
                "fe80::1".parse().unwrap(),
                "::127.0.0.53".parse().unwrap()
            ]
        );
    }

    /// Dry-run output for Istio-style command lines, pinned in testdata/dry-run/. Run with
    /// UPDATE_GOLDEN=1 to rewrite the files after an intended change.
    #[test]
    fn dry_run_output_matches_the_golden_files() {
        let cases: [(&str, &[&str]); 5] = [
            ("sidecar-injector", SIDECAR_INJECTOR_LINE),
            (
                "ip-range-dns",
                &[
                    "-p",
                    "15001",
                    "-z",
                    "15006",
                    "-e",
                    "15008",
                    "-u",
                    "3,4",
                    "-g",
                    "1,2",
                    "-m",
                    "REDIRECT",
                    "-i",
                    "10.99.0.0/16",
                    "-x",
                    "10.11.0.0/16",
                    "--redirect-dns",
                    "--dns-servers",
                    "127.0.0.53",
                    "-n",
                ],
            ),
            (
                "ipv6-uid-gid",
                &[
                    "-u",
                    "3,4",
                    "-g",
                    "1,2",
                    "-b",
                    "4000,5000",
                    "-d",
                    "6000,7000",
                    "-i",
                    "fd00:db8::/32",
                    "-x",
                    "fd00:db8::/32",
                    "-q",
                    "32000,31000",
                    "-o",
                    "5432",
                ],
            ),
            (
                "capture-all-dns-groups",
                &[
                    "-i",
                    "",
                    "--redirect-dns",
                    "--capture-all-dns",
                    "--owner-groups-exclude",
                    "888,0",
                    "--ipv4-loopback-cidr",
                    "127.0.0.1/8",
                    "--dual-stack",
                ],
            ),
            ("defaults", &[]),
        ];
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/testdata/dry-run");
        for (name, line) in cases {
            let policy = parse(line).unwrap();
            let table = policy.render_table("captured (no --netns given)");
            let json = serde_json::to_string_pretty(&policy).unwrap() + "\n";
            for (file, actual) in [
                (format!("{name}.txt"), table),
                (format!("{name}.json"), json),
            ] {
                let path = dir.join(file);
                if std::env::var_os("UPDATE_GOLDEN").is_some() {
                    fs::create_dir_all(&dir).unwrap();
                    fs::write(&path, &actual).unwrap();
                }
                let expected =
                    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert_eq!(
                    actual,
                    expected,
                    "{} differs from the golden file",
                    path.display()
                );
            }
        }
    }
}
