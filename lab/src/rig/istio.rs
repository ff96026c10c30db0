//! istio-iptables' nat rules in a pod's netns: applying them as istio-init does, checking them,
//! and reading how many connections they redirected.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use redirector_tests::Netns;

use crate::timed::run_timed;
use crate::variant::Family;

/// The rules `istio-iptables -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -b '*'` applies
/// (how they were derived is in the files).
const RULES_V4: &str = include_str!("../../istio-rules.v4");
const RULES_V6: &str = include_str!("../../istio-rules.v6");
/// The `-A` rules in each file, as `iptables-save -t nat` lists them back.
const RULE_COUNT: usize = 15;
/// Where the rules send outbound connections.
pub const PROXY_PORT: u16 = 15001;
const IPTABLES_TIMEOUT: Duration = Duration::from_secs(30);

fn rules(family: Family) -> &'static str {
    match family {
        Family::V4 => RULES_V4,
        Family::V6 => RULES_V6,
    }
}

/// `iptables` or `ip6tables`, completed with `-restore` or `-save`.
fn tool(family: Family, suffix: &str) -> String {
    match family {
        Family::V4 => format!("iptables{suffix}"),
        Family::V6 => format!("ip6tables{suffix}"),
    }
}

/// Applies the family's rules in the netns at `netns_path` with `iptables-restore --noflush`
/// (`ip6tables-restore`), as istio-init does, and returns how long that took, process start
/// included. The child enters the netns itself before exec, so only the restore is timed (no
/// `ip netns exec` or `nsenter` in between).
pub fn apply(netns_path: &Path, family: Family) -> Result<Duration> {
    let netns = File::open(netns_path)
        .with_context(|| format!("opening netns {}", netns_path.display()))?;
    let netns_fd = netns.as_raw_fd();
    let mut command = Command::new(tool(family, "-restore"));
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
    run_timed(&mut command, rules(family).as_bytes(), IPTABLES_TIMEOUT)
        .with_context(|| format!("applying the istio rules in {}", netns_path.display()))
}

/// The `-A` lines of the family's nat table in `netns`, each with its `[packets:bytes]`
/// counters in front.
fn nat_rules(netns: &Netns, family: Family) -> Result<Vec<String>> {
    let save = tool(family, "-save");
    let mut command = netns.command(&save);
    command.args(["-c", "-t", "nat"]);
    let output = redirector_tests::run(&save, command, IPTABLES_TIMEOUT)?
        .ensure_success()
        .with_context(|| format!("reading the nat table of netns {}", netns.name()))?;
    Ok(output
        .stdout
        .lines()
        .filter(|line| line.contains("] -A "))
        .map(str::to_owned)
        .collect())
}

/// Fails unless `netns` holds exactly the family's istio rules.
pub fn ensure_applied(netns: &Netns, family: Family) -> Result<()> {
    let rules = nat_rules(netns, family)?;
    ensure!(
        rules.len() == RULE_COUNT,
        "netns {} has {} {} nat rules after the restore, expected {RULE_COUNT}: {rules:#?}",
        netns.name(),
        rules.len(),
        tool(family, "")
    );
    Ok(())
}

/// Fails if `netns` has any nat rule of either family.
pub fn ensure_no_nat_rule(netns: &Netns) -> Result<()> {
    for family in [Family::V4, Family::V6] {
        let rules = nat_rules(netns, family)?;
        ensure!(
            rules.is_empty(),
            "netns {} has {} nat rules: {rules:#?}",
            netns.name(),
            tool(family, "")
        );
    }
    Ok(())
}

/// Packets that hit the outbound REDIRECT rule: the first packet of each redirected connection.
pub fn redirected_connections(netns: &Netns, family: Family) -> Result<u64> {
    let wanted = format!("-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {PROXY_PORT}");
    let rules = nat_rules(netns, family)?;
    let line = rules
        .iter()
        .find(|line| line.ends_with(&wanted))
        .with_context(|| format!("no `{wanted}` rule in netns {}", netns.name()))?;
    // `[packets:bytes] -A ...`
    line.strip_prefix('[')
        .and_then(|rest| rest.split_once(':'))
        .and_then(|(packets, _)| packets.parse().ok())
        .with_context(|| format!("no packet counter in {line:?}"))
}
