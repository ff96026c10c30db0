//! istio-iptables reference data: the flag lines of a `cases.tsv` and the rules of each
//! `<name>.golden` (format: `shared/istio-golden/README.md`), with public addresses and group
//! names mapped to ones a test may use, the same way on the flags and on the rules.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use ipnet::IpNet;

/// The reference data shipped beside the repository (`<repo>/../shared/istio-golden`), as CI
/// has it next to its fresh clone.
pub fn istio_golden_dir() -> Result<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/istio-golden");
    ensure!(
        dir.join("cases.tsv").is_file(),
        "istio-iptables reference data not found: expected {} (a copy of shared/istio-golden \
         beside the repository, with cases.tsv and the .golden files)",
        dir.display()
    );
    dir.canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))
}

/// One row of a `cases.tsv`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoldenCase {
    pub name: String,
    /// istio-iptables' command line, split as a shell would.
    pub flags: Vec<String>,
    /// Free text: settings without a flag (IPv6 on/off, DNS servers, environment variables).
    pub notes: String,
}

impl GoldenCase {
    /// The `NAME=VALUE` environment settings the notes give (e.g. `ISTIO_OUTBOUND_OWNER_GROUPS`).
    pub fn env(&self) -> BTreeMap<String, String> {
        self.notes
            .split_whitespace()
            .filter_map(|word| word.split_once('='))
            .filter(|(name, _)| {
                !name.is_empty()
                    && name
                        .chars()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
            })
            .map(|(name, value)| {
                let value = value.trim_end_matches([',', ';', ')', '.']);
                (name.to_owned(), value.to_owned())
            })
            .collect()
    }

    /// The notes say IPv6 was on when the golden was made.
    pub fn notes_say_ipv6_on(&self) -> bool {
        self.notes.contains("IPv6 on")
    }
}

/// The rows of `dir/cases.tsv` (the header row skipped).
pub fn read_cases(dir: &Path) -> Result<Vec<GoldenCase>> {
    let path = dir.join("cases.tsv");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    parse_cases(&text).with_context(|| format!("parsing {}", path.display()))
}

fn parse_cases(text: &str) -> Result<Vec<GoldenCase>> {
    text.lines()
        .skip(1)
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let mut columns = line.splitn(3, '\t');
            let name = columns.next().unwrap_or_default().trim().to_owned();
            let flags = columns.next().context("no flags column")?;
            let notes = columns.next().unwrap_or_default().trim().to_owned();
            let flags = shlex::split(flags)
                .with_context(|| format!("case {name}: unbalanced quotes in {flags:?}"))?;
            ensure!(!name.is_empty(), "a row without a case name: {line:?}");
            Ok(GoldenCase { name, flags, notes })
        })
        .collect()
}

/// A golden's `iptables-restore` and `ip6tables-restore` inputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    pub ipv4: String,
    /// Present when IPv6 was on.
    pub ipv6: Option<String>,
}

/// Reads `dir/<name>.golden`.
pub fn read_rules(dir: &Path, name: &str) -> Result<Rules> {
    let path = dir.join(format!("{name}.golden"));
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    parse_rules(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Splits a golden into its `* table` ... `COMMIT` blocks. The IPv4 ones come first, tables
/// in alphabetical order; the IPv6 ones start at the first table header that does not sort
/// after the one before it. The `*-save` lines outside blocks change nothing and are dropped.
pub fn parse_rules(text: &str) -> Result<Rules> {
    let mut families: [Vec<&str>; 2] = [Vec::new(), Vec::new()];
    let mut family = 0;
    let mut previous_table: Option<&str> = None;
    let mut in_block = false;
    for line in text.lines() {
        if let Some(table) = line.strip_prefix('*') {
            ensure!(!in_block, "table header {line:?} inside a block");
            let table = table.trim();
            if previous_table.is_some_and(|previous| table <= previous) {
                ensure!(family == 0, "more than two families of blocks at {line:?}");
                family = 1;
            }
            previous_table = Some(table);
            in_block = true;
        }
        if in_block {
            families[family].push(line);
        }
        if line.trim() == "COMMIT" {
            ensure!(in_block, "COMMIT outside a block");
            in_block = false;
        }
    }
    ensure!(!in_block, "the last block has no COMMIT");
    let [ipv4, ipv6] = families.map(|lines| lines.join("\n") + "\n");
    ensure!(ipv4.contains("COMMIT"), "no rule blocks");
    Ok(Rules {
        ipv4,
        ipv6: ipv6.contains("COMMIT").then_some(ipv6),
    })
}

impl Rules {
    /// The DNS servers port 53 is captured for (`ISTIO_OUTPUT_DNS ... -d SERVER`): the
    /// servers istio-iptables read from resolv.conf when the golden was made.
    pub fn dns_servers(&self) -> Result<Vec<IpAddr>> {
        let mut servers = Vec::new();
        for line in self
            .ipv4
            .lines()
            .chain(self.ipv6.iter().flat_map(|v6| v6.lines()))
        {
            let Some(rest) = line.strip_prefix("-A ISTIO_OUTPUT_DNS -p tcp --dport 53 -d ") else {
                continue;
            };
            let server = rest.split_whitespace().next().unwrap_or_default();
            let net: IpNet = server
                .parse()
                .with_context(|| format!("DNS rule {line:?}: bad address"))?;
            servers.push(net.addr());
        }
        Ok(servers)
    }

    pub fn blocks(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.ipv4.as_str()).chain(self.ipv6.as_deref())
    }
}

/// Public ranges and group names replaced consistently in flags and rules: tests contact only
/// private addresses, and iptables accepts a group only if it exists (numbers always do).
#[derive(Debug, Clone)]
pub struct Mapping {
    /// (public range, private range of the same prefix length).
    ranges: Vec<(IpNet, IpNet)>,
    groups: Vec<(String, u32)>,
}

impl Mapping {
    /// The public ranges and groups that istio's goldens use.
    pub fn for_istio_goldens() -> Mapping {
        let net = |text: &str| text.parse::<IpNet>().expect("valid range");
        Mapping {
            ranges: vec![
                (net("9.9.0.0/16"), net("10.99.0.0/16")),
                (net("1.1.0.0/16"), net("10.11.0.0/16")),
                (net("2001:db8::/32"), net("fd00:db8::/32")),
            ],
            groups: vec![("java".into(), 2020), ("ftp".into(), 2121)],
        }
    }

    /// Maps every whitespace-separated word, and every item of a comma-separated word; then
    /// checks that no public address is left.
    pub fn map_text(&self, text: &str) -> Result<String> {
        let mapped: Vec<String> = text
            .split('\n')
            .map(|line| {
                line.split(' ')
                    .map(|word| self.map_list(word))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        let mapped = mapped.join("\n");
        for word in mapped.split([' ', '\n', ',']) {
            ensure_not_public(word)?;
        }
        Ok(mapped)
    }

    /// Maps each item of a comma-separated list.
    pub fn map_list(&self, list: &str) -> String {
        list.split(',')
            .map(|item| self.map_item(item))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn map_item(&self, item: &str) -> String {
        if let Some((_, gid)) = self.groups.iter().find(|(name, _)| name == item) {
            return gid.to_string();
        }
        let (addr, prefix) = match item.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (item, None),
        };
        let Ok(addr) = addr.parse::<IpAddr>() else {
            return item.to_owned();
        };
        let Some(mapped) = self
            .ranges
            .iter()
            .find(|(from, _)| from.contains(&addr))
            .map(|(from, to)| replace_prefix(addr, *from, *to))
        else {
            return item.to_owned();
        };
        match prefix {
            Some(prefix) => format!("{mapped}/{prefix}"),
            None => mapped.to_string(),
        }
    }
}

/// `addr` with the bits of `from`'s prefix replaced by those of `to`.
fn replace_prefix(addr: IpAddr, from: IpNet, to: IpNet) -> IpAddr {
    let host_bits = |addr: IpAddr, net: IpNet| -> (u128, u128) {
        let (value, width) = match addr {
            IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32),
            IpAddr::V6(v6) => (u128::from(v6), 128),
        };
        let host_mask = if net.prefix_len() == 0 {
            u128::MAX
        } else {
            (1u128 << (width - net.prefix_len())) - 1
        };
        (value & host_mask, host_mask)
    };
    let (host, host_mask) = host_bits(addr, from);
    match to.network() {
        IpAddr::V4(v4) => {
            let value = (u128::from(u32::from(v4)) & !host_mask) | host;
            IpAddr::V4(Ipv4Addr::from(value as u32))
        }
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from((u128::from(v6) & !host_mask) | host)),
    }
}

/// Fails for a word that is a public address or range: loopback, private (RFC 1918, ULA),
/// link-local, unspecified and IPv4-compatible/-mapped forms of those are fine.
fn ensure_not_public(word: &str) -> Result<()> {
    let addr = word.split_once('/').map_or(word, |(addr, _)| addr);
    let Ok(addr) = addr.parse::<IpAddr>() else {
        return Ok(());
    };
    if !is_test_safe(addr) {
        bail!("public address {word} left after mapping: add a mapping for its range");
    }
    Ok(())
}

fn is_test_safe(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(v4) => {
            v4.is_loopback() || v4.is_private() || v4.is_link_local() || v4.is_unspecified()
        }
        IpAddr::V6(v6) => {
            let segments = v6.segments();
            let embedded_v4 =
                Ipv4Addr::from((u32::from(segments[6]) << 16) | u32::from(segments[7]));
            let compatible = segments[..6].iter().all(|&s| s == 0);
            let mapped = segments[..5].iter().all(|&s| s == 0) && segments[5] == 0xffff;
            (segments[0] & 0xfe00) == 0xfc00
                || (segments[0] & 0xffc0) == 0xfe80
                || (compatible
                    && (embedded_v4.octets()[..3] == [0, 0, 0] || is_test_safe(embedded_v4.into())))
                || (mapped && is_test_safe(embedded_v4.into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOLDEN: &str = "iptables-save\nip6tables-save\n* nat\n-N ISTIO_OUTPUT\n-A ISTIO_OUTPUT -d 9.9.0.0/16 -j ISTIO_REDIRECT\n-A ISTIO_OUTPUT_DNS -p tcp --dport 53 -d 127.0.0.53/32 -j REDIRECT --to-ports 15053\nCOMMIT\n* raw\n-N X\nCOMMIT\n* nat\n-A ISTIO_OUTPUT -o lo -s ::6/128 -j RETURN\n-A ISTIO_OUTPUT -d 2001:db8::/32 -j RETURN\n-A ISTIO_OUTPUT_DNS -p tcp --dport 53 -d ::127.0.0.53/128 -j REDIRECT --to-ports 15053\nCOMMIT\niptables-save\nip6tables-save\n";

    #[test]
    fn golden_blocks_split_into_ipv4_and_ipv6() {
        let rules = parse_rules(GOLDEN).unwrap();
        assert!(rules.ipv4.starts_with("* nat\n"), "{}", rules.ipv4);
        assert!(rules.ipv4.contains("* raw\n-N X\nCOMMIT\n"));
        assert!(!rules.ipv4.contains("::6"));
        let ipv6 = rules.ipv6.clone().unwrap();
        assert!(
            ipv6.starts_with("* nat\n-A ISTIO_OUTPUT -o lo -s ::6/128"),
            "{ipv6}"
        );
        assert!(!ipv6.contains("save"));
        assert_eq!(
            rules.dns_servers().unwrap(),
            vec![
                "127.0.0.53".parse::<IpAddr>().unwrap(),
                "::127.0.0.53".parse().unwrap()
            ]
        );

        let ipv4_only = parse_rules("iptables-save\n* mangle\nCOMMIT\n* nat\nCOMMIT\n").unwrap();
        assert_eq!(ipv4_only.ipv6, None);
        assert!(
            parse_rules("* nat\n-A X\n").is_err(),
            "a block without COMMIT"
        );
        assert!(parse_rules("* nat\nCOMMIT\n* nat\nCOMMIT\n* nat\nCOMMIT\n").is_err());
    }

    #[test]
    fn public_ranges_and_groups_map_the_same_in_flags_and_rules() {
        let mapping = Mapping::for_istio_goldens();
        assert_eq!(
            mapping.map_list("9.9.0.0/16,1.1.3.4,10.0.0.0/8"),
            "10.99.0.0/16,10.11.3.4,10.0.0.0/8"
        );
        assert_eq!(mapping.map_list("2001:db8::7/128"), "fd00:db8::7/128");
        assert_eq!(mapping.map_list("java,202"), "2020,202");
        assert_eq!(mapping.map_list("*"), "*");
        let rules = parse_rules(GOLDEN).unwrap();
        let mapped = mapping.map_text(rules.ipv6.as_deref().unwrap()).unwrap();
        assert!(mapped.contains("-d fd00:db8::/32 -j RETURN"), "{mapped}");
        assert!(mapped.contains("-d ::127.0.0.53/128"), "{mapped}");
        assert_eq!(
            mapping
                .map_text("-m owner ! --gid-owner java -j RETURN")
                .unwrap(),
            "-m owner ! --gid-owner 2020 -j RETURN"
        );
        let error = mapping.map_text("-d 8.8.8.8/32 -j RETURN").unwrap_err();
        assert!(error.to_string().contains("8.8.8.8/32"), "{error}");
        assert!(mapping.map_text("-d 2a00::1 -j RETURN").is_err());
    }

    #[test]
    fn case_rows_split_like_a_shell_and_notes_give_the_environment() {
        let text = "name\tistio-iptables flags\tnotes\n\
            groups\t-p 15001 -i '*' -x \"\"\tenv ISTIO_OUTBOUND_OWNER_GROUPS=java,202 (env only); IPv6 on\n\
            plain\t-p 15001\t\n";
        let cases = parse_cases(text).unwrap();
        assert_eq!(cases.len(), 2);
        assert_eq!(cases[0].flags, ["-p", "15001", "-i", "*", "-x", ""]);
        assert_eq!(
            cases[0].env(),
            BTreeMap::from([("ISTIO_OUTBOUND_OWNER_GROUPS".into(), "java,202".into())])
        );
        assert!(cases[0].notes_say_ipv6_on());
        assert!(cases[1].env().is_empty());
        assert!(parse_cases("h\nbad\t-i 'open\t\n").is_err());
    }

    #[test]
    fn the_shared_goldens_parse_and_map() {
        let dir = istio_golden_dir().unwrap();
        let cases = read_cases(&dir).unwrap();
        assert_eq!(cases.len(), 24, "cases.tsv rows");
        let mapping = Mapping::for_istio_goldens();
        for case in &cases {
            let rules = read_rules(&dir, &case.name).unwrap();
            assert_eq!(
                rules.ipv6.is_some(),
                case.notes_say_ipv6_on(),
                "{}: IPv6 blocks vs notes",
                case.name
            );
            for block in rules.blocks() {
                mapping.map_text(block).unwrap();
            }
            for flag in &case.flags {
                mapping.map_text(flag).unwrap();
            }
        }
    }
}
