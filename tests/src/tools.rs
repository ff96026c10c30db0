//! The `redirector` CLI and the system tools the tests inspect the machine with.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::unistd::Pid;
use serde_json::Value;

use crate::netns::Netns;
use crate::process::{binary, run, wait_for, Output};
use crate::protocol::Status;

/// Long enough for loading and attaching the eBPF programs on a slow machine.
const REDIRECTOR_TIMEOUT: Duration = Duration::from_secs(60);
const TOOL_TIMEOUT: Duration = Duration::from_secs(20);

/// Run the `redirector` binary with `args`; a non-zero exit is returned, not an error.
pub fn redirector<I, S>(args: I) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    redirector_with_env(args, &[])
}

/// `redirector ARGS...` with extra environment variables.
pub fn redirector_with_env<I, S>(args: I, env: &[(&str, &str)]) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut command = Command::new(binary("redirector")?);
    // Plain text on stderr, so that tests can match words in it.
    command
        .args(args)
        .env_remove("REDIRECTOR_BPFFS")
        .env("NO_COLOR", "1")
        .envs(env.iter().copied());
    run("redirector", command, REDIRECTOR_TIMEOUT)
}

/// `redirector status --output json --bpffs ROOT`, parsed.
pub fn status_json(root: &Path) -> Result<Status> {
    let output = redirector([
        OsStr::new("status"),
        "--output".as_ref(),
        "json".as_ref(),
        "--bpffs".as_ref(),
        root.as_os_str(),
    ])?
    .ensure_success()?;
    serde_json::from_str(&output.stdout).with_context(|| {
        format!(
            "parsing `{}` output: {}",
            output.command_line, output.stdout
        )
    })
}

/// `bpftool map show` of a pinned map: its fields as bpftool names them (`type`, `bytes_key`,
/// `bytes_value`, `max_entries`, `bytes_memlock`...).
pub struct PinnedMapInfo(Value);

impl PinnedMapInfo {
    pub fn read(pin: &Path) -> Result<PinnedMapInfo> {
        bpftool_map("show", pin).map(PinnedMapInfo)
    }

    pub fn number(&self, field: &str) -> Result<u64> {
        self.0[field]
            .as_u64()
            .with_context(|| format!("no {field} in {}", self.0))
    }

    pub fn text(&self, field: &str) -> Result<&str> {
        self.0[field]
            .as_str()
            .with_context(|| format!("no {field} in {}", self.0))
    }
}

/// How many entries a pinned map holds (`bpftool map dump`).
pub fn pinned_map_entries(pin: &Path) -> Result<usize> {
    let entries = bpftool_map("dump", pin)?;
    entries
        .as_array()
        .map(Vec::len)
        .with_context(|| format!("bpftool's map dump is not a list: {entries}"))
}

/// `bpftool -j map <verb> pinned <pin>`, parsed.
fn bpftool_map(verb: &str, pin: &Path) -> Result<Value> {
    let mut command = Command::new("bpftool");
    command.args(["-j", "map", verb, "pinned"]).arg(pin);
    let output = run("bpftool", command, TOOL_TIMEOUT)?
        .ensure_success()
        .with_context(|| format!("bpftool map {verb} of pinned map {}", pin.display()))?;
    serde_json::from_str(&output.stdout)
        .with_context(|| format!("bpftool's map {verb}: {}", output.stdout))
}

/// The `-A` lines of the nat table in `netns`. The product never creates any.
pub fn nat_rules(netns: &Netns) -> Result<Vec<String>> {
    let mut command = netns.command("iptables-save");
    command.args(["-t", "nat"]);
    let output = run("iptables-save", command, TOOL_TIMEOUT)?
        .ensure_success()
        .with_context(|| format!("reading the nat table of netns {}", netns.name()))?;
    Ok(output
        .stdout
        .lines()
        .filter(|line| line.starts_with("-A"))
        .map(str::to_owned)
        .collect())
}

/// Programs attached to the cgroup, as listed by `bpftool -j cgroup show DIR`.
pub fn attached_programs(cgroup: &Path) -> Result<Vec<Value>> {
    // Links, not `bpftool cgroup show`: Debian's bpftool asks the kernel for attach flags that
    // kernels before 6.x do not know, and fails there. redirector attaches only through links.
    let cgroup_id = std::fs::metadata(cgroup)
        .with_context(|| format!("reading the cgroup id of {}", cgroup.display()))?
        .ino();
    let mut command = Command::new("bpftool");
    command.args(["-j", "link", "show"]);
    let output = run("bpftool", command, TOOL_TIMEOUT)?
        .ensure_success()
        .context("listing BPF links")?;
    if output.stdout.trim().is_empty() {
        return Ok(Vec::new());
    }
    let links: Vec<Value> = serde_json::from_str(&output.stdout)
        .with_context(|| format!("parsing bpftool's link list: {}", output.stdout))?;
    Ok(links
        .into_iter()
        .filter(|link| link.get("cgroup_id").and_then(Value::as_u64) == Some(cgroup_id))
        .collect())
}

/// Pids of running `redirector` processes whose command line contains `text` (e.g. a test's
/// bpffs root): interception must not depend on a lingering redirector process.
pub fn redirector_processes_mentioning(text: &OsStr) -> Result<Vec<i32>> {
    let redirector = binary("redirector")?;
    let needle = text.as_encoded_bytes();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").context("listing /proc")? {
        let Ok(entry) = entry else { continue };
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // Processes may exit while we look: unreadable entries are skipped.
        let Ok(exe) = std::fs::read_link(entry.path().join("exe")) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if exe == redirector && cmdline.windows(needle.len()).any(|window| window == needle) {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// `st` of a TCP socket in /proc/net/tcp (include/net/tcp_states.h).
pub mod tcp_state {
    pub const ESTABLISHED: u8 = 0x01;
    pub const SYN_SENT: u8 = 0x02;
    pub const FIN_WAIT1: u8 = 0x04;
    /// Also what a timewait socket of an orphaned FIN_WAIT2 connection shows.
    pub const FIN_WAIT2: u8 = 0x05;
    pub const TIME_WAIT: u8 = 0x06;
    pub const CLOSE_WAIT: u8 = 0x08;
    pub const LISTEN: u8 = 0x0A;
}

/// One TCP or UDP socket of a network namespace, as /proc/PID/net/{tcp,udp}{,6} lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InetSocket {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// One of [`tcp_state`] (UDP: 07 unconnected, 01 connected).
    pub state: u8,
    /// The socket's inode (0 for timewait and request sockets, which no descriptor holds).
    pub inode: u64,
}

/// Every TCP socket (IPv4 and IPv6, timewait ones included) in the network namespace of
/// process `pid` (/proc/PID/net shows that process's namespace).
pub fn tcp_sockets(pid: Pid) -> Result<Vec<InetSocket>> {
    sockets(pid, "tcp")
}

/// Every UDP socket (IPv4 and IPv6) in the network namespace of process `pid`.
pub fn udp_sockets(pid: Pid) -> Result<Vec<InetSocket>> {
    sockets(pid, "udp")
}

fn sockets(pid: Pid, protocol: &str) -> Result<Vec<InetSocket>> {
    let mut sockets = Vec::new();
    for table in [
        format!("/proc/{pid}/net/{protocol}"),
        format!("/proc/{pid}/net/{protocol}6"),
    ] {
        let text = std::fs::read_to_string(&table)
            .with_context(|| format!("reading {table} (did the process exit?)"))?;
        for line in text.lines().skip(1) {
            sockets
                .push(parse_socket_line(line).with_context(|| format!("{table}: line {line:?}"))?);
        }
    }
    Ok(sockets)
}

/// Columns (TCP and UDP alike): sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...;
/// addresses are hex words as the kernel holds them (network order read as native words),
/// ports hex in host order.
fn parse_socket_line(line: &str) -> Result<InetSocket> {
    let columns: Vec<&str> = line.split_whitespace().collect();
    let (Some(local), Some(remote), Some(state), Some(inode)) = (
        columns.get(1),
        columns.get(2),
        columns.get(3),
        columns.get(9),
    ) else {
        bail!("too few columns");
    };
    Ok(InetSocket {
        local: parse_proc_addr(local)?,
        remote: parse_proc_addr(remote)?,
        state: u8::from_str_radix(state, 16).context("state")?,
        inode: inode.parse().context("inode")?,
    })
}

fn parse_proc_addr(text: &str) -> Result<SocketAddr> {
    let (addr, port) = text.split_once(':').context("no port")?;
    let port = u16::from_str_radix(port, 16).context("port")?;
    let words = (0..addr.len() / 8)
        .map(|i| u32::from_str_radix(&addr[i * 8..i * 8 + 8], 16).map(u32::to_ne_bytes))
        .collect::<Result<Vec<_>, _>>()
        .context("address")?;
    let ip = match words.as_slice() {
        [word] => IpAddr::from(*word),
        [a, b, c, d] => {
            let mut bytes = [0u8; 16];
            for (chunk, word) in bytes.chunks_exact_mut(4).zip([a, b, c, d]) {
                chunk.copy_from_slice(word);
            }
            IpAddr::from(bytes)
        }
        _ => bail!("address of {} hex digits", addr.len()),
    };
    Ok(SocketAddr::new(ip, port))
}

/// Wait until process `pid` itself listens on TCP `port`: a listening socket on that port is
/// among its descriptors (other processes may listen on the same port with SO_REUSEPORT).
pub fn wait_for_tcp_listener(pid: Pid, port: u16, timeout: Duration) -> Result<()> {
    wait_for(
        &format!("process {pid} to listen on port {port}"),
        timeout,
        || {
            let own = socket_inodes(pid)?;
            let listening = tcp_sockets(pid)?.iter().any(|socket| {
                socket.local.port() == port
                    && socket.state == tcp_state::LISTEN
                    && own.contains(&socket.inode)
            });
            Ok(listening.then_some(()))
        },
    )
}

/// Inodes of the sockets among process `pid`'s descriptors (links `socket:[INODE]`).
fn socket_inodes(pid: Pid) -> Result<Vec<u64>> {
    let dir = format!("/proc/{pid}/fd");
    let entries = std::fs::read_dir(&dir).with_context(|| format!("listing {dir}"))?;
    // Descriptors may close while we look: unreadable links are skipped.
    Ok(entries
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_str()?;
            target
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect())
}

/// The TcpExt and IpExt counters of the network namespace of process `pid`, named as `nstat`
/// names them (`TcpExtTCPFastOpenPassive`).
pub fn netstat_counters(pid: Pid) -> Result<BTreeMap<String, u64>> {
    let path = format!("/proc/{pid}/net/netstat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let mut counters = BTreeMap::new();
    let lines: Vec<&str> = text.lines().collect();
    // Each group is a line of names followed by a line of values, both led by "Group:".
    for pair in lines.chunks_exact(2) {
        let (Some((group, names)), Some((_, values))) =
            (pair[0].split_once(':'), pair[1].split_once(':'))
        else {
            bail!("{path}: unexpected lines {pair:?}");
        };
        for (name, value) in names.split_whitespace().zip(values.split_whitespace()) {
            let value = value
                .parse()
                .with_context(|| format!("{path}: {group}{name} = {value:?}"))?;
            counters.insert(format!("{group}{name}"), value);
        }
    }
    Ok(counters)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_tcp_lines() {
        let v4 = "   0: 0100007F:3A99 0200A8C0:9C40 06 00000000:00000000 03:00001770 00000000     0        0 0 3 0000000000000000";
        assert_eq!(
            parse_socket_line(v4).unwrap(),
            InetSocket {
                local: "127.0.0.1:15001".parse().unwrap(),
                remote: "192.168.0.2:40000".parse().unwrap(),
                state: tcp_state::TIME_WAIT,
                inode: 0,
            }
        );
        let v6 = "   1: 00000000000000000000000001000000:3A99 000000000000000000000000000000FD:0050 0A 00000000:00000000 00:00000000 00000000  1337        0 1 1 0";
        let socket = parse_socket_line(v6).unwrap();
        assert_eq!(socket.local, "[::1]:15001".parse().unwrap());
        assert_eq!(socket.remote, "[::fd00:0]:80".parse().unwrap());
        assert_eq!(socket.state, tcp_state::LISTEN);
        assert_eq!(socket.inode, 1);
    }
}
