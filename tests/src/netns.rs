//! Named network namespaces (`ip netns`) and veth pairs between them.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::names::{next_subnet, stale_entries, unique_name};
use crate::process::{run, Output};

const IP_TIMEOUT: Duration = Duration::from_secs(10);
const NETNS_DIR: &str = "/run/netns";

/// Run `ip ARGS...` and require success.
pub(crate) fn ip(args: &[&str]) -> Result<Output> {
    let mut command = Command::new("ip");
    command.args(args);
    run("ip", command, IP_TIMEOUT)?.ensure_success()
}

/// A network namespace named under /run/netns, with `lo` up; deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn create(tag: &str) -> Result<Netns> {
        let name = unique_name(tag);
        ip(&["netns", "add", &name]).with_context(|| format!("creating netns {name}"))?;
        let netns = Netns { name };
        ip(&["-n", &netns.name, "link", "set", "lo", "up"])
            .with_context(|| format!("bringing up lo in netns {}", netns.name))?;
        Ok(netns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind-mounted namespace file that setns(2) opens.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// `ip netns exec NAME program`, to be completed with arguments by the caller.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    /// `ip netns exec NAME program args...`, which must succeed.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<Output> {
        let mut command = self.command(program);
        command.args(args);
        run(program, command, IP_TIMEOUT)?
            .ensure_success()
            .with_context(|| format!("running {program} {args:?} in netns {}", self.name))
    }

    /// Sets a sysctl of this namespace (`net.*` ones are per namespace).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.run("sysctl", &["-q", "-w", &format!("{key}={value}")])
            .map(drop)
    }

    /// Delete the namespaces left by test runs that were killed before cleaning up.
    pub(crate) fn sweep_stale() {
        for path in stale_entries(Path::new(NETNS_DIR)) {
            if let Some(name) = path.file_name() {
                drop(Netns {
                    name: name.to_string_lossy().into_owned(),
                });
            }
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(error) = ip(&["netns", "del", &self.name]) {
            eprintln!("cleanup: deleting netns {}: {error:#}", self.name);
        }
    }
}

/// A veth pair from netns `a` to netns `b` on a fresh 10.200.X.0/24: `a` gets .1, `b` gets .2.
/// Both ends are named `vethX` (each lives only in its own namespace).
#[derive(Debug)]
pub struct VethPair {
    a_netns: String,
    interface: String,
    pub a_addr: Ipv4Addr,
    pub b_addr: Ipv4Addr,
    /// IPv6 (ULA) addresses of the two ends, added after the IPv4 ones.
    pub a_addr6: Ipv6Addr,
    pub b_addr6: Ipv6Addr,
}

impl VethPair {
    /// The name both ends have.
    pub fn interface(&self) -> &str {
        &self.interface
    }

    pub fn connect(a: &Netns, b: &Netns) -> Result<VethPair> {
        let subnet = next_subnet();
        let interface = format!("veth{subnet}");
        ip(&[
            "link",
            "add",
            &interface,
            "netns",
            a.name(),
            "type",
            "veth",
            "peer",
            "name",
            &interface,
            "netns",
            b.name(),
        ])
        .with_context(|| {
            format!(
                "creating veth {interface} between {} and {}",
                a.name(),
                b.name()
            )
        })?;
        let pair = VethPair {
            a_netns: a.name().to_owned(),
            interface,
            a_addr: Ipv4Addr::new(10, 200, subnet, 1),
            b_addr: Ipv4Addr::new(10, 200, subnet, 2),
            a_addr6: Ipv6Addr::new(0xfd00, 0x200, subnet.into(), 0, 0, 0, 0, 1),
            b_addr6: Ipv6Addr::new(0xfd00, 0x200, subnet.into(), 0, 0, 0, 0, 2),
        };
        for (netns, addr, addr6) in [
            (a, pair.a_addr, pair.a_addr6),
            (b, pair.b_addr, pair.b_addr6),
        ] {
            let cidr = format!("{addr}/24");
            let cidr6 = format!("{addr6}/64");
            ip(&[
                "-n",
                netns.name(),
                "addr",
                "add",
                &cidr,
                "dev",
                &pair.interface,
            ])
            // nodad: the address is usable at once, without duplicate address detection.
            .and_then(|_| {
                ip(&[
                    "-n",
                    netns.name(),
                    "addr",
                    "add",
                    &cidr6,
                    "dev",
                    &pair.interface,
                    "nodad",
                ])
            })
            .and_then(|_| ip(&["-n", netns.name(), "link", "set", &pair.interface, "up"]))
            .with_context(|| format!("configuring {} in netns {}", pair.interface, netns.name()))?;
        }
        Ok(pair)
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        // Best effort and quiet: deleting the namespace removes the pair anyway, and it may
        // already be gone.
        let _ = ip(&["-n", &self.a_netns, "link", "del", &self.interface]);
    }
}
