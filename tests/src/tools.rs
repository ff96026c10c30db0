//! The `redirector` CLI and the system tools the tests inspect the machine with.

use std::ffi::OsStr;
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
    let mut command = Command::new(binary("redirector")?);
    // Plain text on stderr, so that tests can match words in it.
    command
        .args(args)
        .env_remove("REDIRECTOR_BPFFS")
        .env("NO_COLOR", "1");
    run("redirector", command, REDIRECTOR_TIMEOUT)
}

/// `redirector status -o json --bpffs ROOT`, parsed.
pub fn status_json(root: &Path) -> Result<Status> {
    let output = redirector([
        OsStr::new("status"),
        "-o".as_ref(),
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
    let mut command = Command::new("bpftool");
    command.args(["-j", "cgroup", "show"]).arg(cgroup);
    let output = run("bpftool", command, TOOL_TIMEOUT)?
        .ensure_success()
        .with_context(|| format!("listing programs attached to {}", cgroup.display()))?;
    if output.stdout.trim().is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str(&output.stdout).with_context(|| {
        format!(
            "parsing bpftool output for {}: {}",
            cgroup.display(),
            output.stdout
        )
    })
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

/// Wait until a TCP socket listens on `port` in the network namespace of process `pid`
/// (/proc/PID/net/tcp shows that process's namespace).
pub fn wait_for_tcp_listener(pid: Pid, port: u16, timeout: Duration) -> Result<()> {
    const TCP_LISTEN: &str = "0A";
    let local_port = format!(":{port:04X}");
    wait_for(
        &format!("a listener on port {port} in the netns of pid {pid}"),
        timeout,
        || {
            // IPv4 and IPv6 listeners are in separate tables.
            for table in [
                format!("/proc/{pid}/net/tcp"),
                format!("/proc/{pid}/net/tcp6"),
            ] {
                let text = match std::fs::read_to_string(&table) {
                    Ok(text) => text,
                    Err(error) => bail!("reading {table} (did the process exit?): {error}"),
                };
                // Columns: sl local_address rem_address st ...
                let listening = text.lines().skip(1).any(|line| {
                    let columns: Vec<&str> = line.split_whitespace().collect();
                    columns.len() > 3
                        && columns[1].ends_with(&local_port)
                        && columns[3] == TCP_LISTEN
                });
                if listening {
                    return Ok(Some(()));
                }
            }
            Ok(None)
        },
    )
}
