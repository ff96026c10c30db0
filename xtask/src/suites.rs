//! The end-to-end suites (`tests/tests/*.rs`, one test executable each) and where each one runs:
//! on the host, in a VM with `--kernel`, in CI's VM run. Every suite left out of a run is named
//! in its output with the reason; none is counted as passed.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde_json::Value;

/// The kernel CI's VM run boots: 5.10 is the oldest kernel Debian's archive still serves
/// (bullseye) and redirector's intended floor.
pub const CI_KERNEL: &str = "5.10";

/// Suites the host run leaves out.
pub const NOT_ON_HOST: &[(&str, &str)] = &[];

/// Suites no VM run can carry.
pub const NOT_IN_VM: &[(&str, &str)] = &[
    (
        "containerd",
        "containerd, its shim and runc are not among the tools the VM's initramfs carries",
    ),
    (
        "containerd_agent",
        "starts a private containerd and runc, which the VM does not carry",
    ),
    (
        "image",
        "starts a private containerd and runc, and podman, which the VM does not carry",
    ),
];

/// Suites CI's VM run leaves out to stay within CI's time (30 minutes on a fresh machine, the
/// toolchain and both builds included). They run on the host in CI, and in every `--kernel` run.
/// What CI's VM run keeps is every suite whose result can depend on the kernel's version: the
/// hooks' behaviours, the programs' verdicts and records, coexistence, the kernel floor, upgrades.
pub const NOT_IN_CI_VM: &[(&str, &str)] = &[
    (
        SOAK,
        "agent and proxy restarts under a minute of traffic (userspace; the programs' part is \
         covered by record and upgrade); about 70 s emulated",
    ),
    (
        "agent_cni",
        "the agent's and the CNI plugin's protocol and state (userspace, the same programs as \
         outbound and policy); about 2 minutes emulated",
    ),
    (
        "address_changes",
        "the agent following netlink address events (userspace, the same programs as policy); \
         about 40 s emulated",
    ),
    (
        "hostile",
        "malformed input to the agent's API (userspace); about 30 s emulated",
    ),
    (
        "lab",
        "the comparison with iptables is measured on the host; its quick run is time-boxed",
    ),
    (
        "parity",
        "9,100 connects against istio's rule sets, 1 minute emulated: the programs' verdicts on \
         this kernel are covered by policy, outbound and dns",
    ),
];

/// Single tests CI's VM run leaves out (suite, test, reason), passed to the suite as `--skip`.
/// They run on the host in CI, and in every `--kernel` run.
pub const TESTS_NOT_IN_CI_VM: &[(&str, &str, &str)] = &[(
    "record",
    "more_live_connections_than_the_old_record_capacity",
    "270,000 sockets through HAProxy take minutes under TCG emulation; the same socket-storage \
     record is checked on this kernel by the suite's other tests",
)];

/// The `--skip` arguments that leave `suite`'s tests in `left_out` out of a run, each printed
/// with its reason as `<run>: left out: SUITE::TEST (reason)`.
pub fn skips(run: &str, suite: &str, left_out: &[(&str, &str, &str)]) -> Vec<String> {
    left_out
        .iter()
        .filter(|(name, _, _)| *name == suite)
        .flat_map(|(name, test, why)| {
            eprintln!("{run}: left out: {name}::{test} ({why})");
            ["--skip".to_owned(), (*test).to_owned()]
        })
        .collect()
}

/// The soak suite (`cargo xtask soak`), and the variables that size it.
pub const SOAK: &str = "soak";
pub const SOAK_MINUTES_ENV: &str = "REDIRECTOR_SOAK_MINUTES";
pub const SOAK_CONNECTIONS_ENV: &str = "REDIRECTOR_SOAK_CONNECTIONS";

/// A test executable of the tests crate.
#[derive(Debug, Clone, PartialEq)]
pub struct Suite {
    pub name: String,
    pub executable: PathBuf,
}

/// The integration test executables in the messages of `cargo test --no-run
/// --message-format=json`.
pub fn from_cargo_messages(messages: &[Value]) -> Result<Vec<Suite>> {
    let mut suites = Vec::new();
    for message in artifacts(messages, "test") {
        let name = message["target"]["name"]
            .as_str()
            .context("a test artifact without a target name")?;
        let executable = message["executable"]
            .as_str()
            .with_context(|| format!("test {name} has no executable"))?;
        suites.push(Suite {
            name: name.to_owned(),
            executable: executable.into(),
        });
    }
    suites.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(suites)
}

/// The executables of the binary targets in the messages of `cargo build --message-format=json`.
pub fn binaries_in_cargo_messages(messages: &[Value]) -> Vec<PathBuf> {
    artifacts(messages, "bin")
        .filter(|message| message["profile"]["test"] == false)
        .filter_map(|message| message["executable"].as_str().map(PathBuf::from))
        .collect()
}

fn artifacts<'a>(messages: &'a [Value], kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    messages.iter().filter(move |message| {
        message["reason"] == "compiler-artifact"
            && message["target"]["kind"]
                .as_array()
                .is_some_and(|kinds| kinds.len() == 1 && kinds[0] == kind)
    })
}

/// `suites` without those in any of the `left_out` lists, each of which is printed with its
/// reason as `<run>: left out: NAME (reason)`.
pub fn select<'a>(run: &str, suites: &'a [Suite], left_out: &[&[(&str, &str)]]) -> Vec<&'a Suite> {
    suites
        .iter()
        .filter(|suite| {
            let reason = left_out
                .iter()
                .flat_map(|list| list.iter())
                .find(|(name, _)| *name == suite.name);
            if let Some((name, why)) = reason {
                eprintln!("{run}: left out: {name} ({why})");
            }
            reason.is_none()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_cargo_artifacts() {
        let messages = [
            json!({"reason": "compiler-artifact", "target": {"kind": ["test"], "name": "outbound"},
                   "profile": {"test": true}, "executable": "/t/debug/deps/outbound-1"}),
            json!({"reason": "compiler-artifact", "target": {"kind": ["lib"], "name": "redirector_tests"},
                   "profile": {"test": true}, "executable": "/t/debug/deps/redirector_tests-2"}),
            json!({"reason": "compiler-artifact", "target": {"kind": ["bin"], "name": "e2e-helper"},
                   "profile": {"test": true}, "executable": "/t/debug/deps/e2e_helper-3"}),
            json!({"reason": "compiler-artifact", "target": {"kind": ["bin"], "name": "e2e-helper"},
                   "profile": {"test": false}, "executable": "/t/debug/e2e-helper"}),
            json!({"reason": "build-finished", "success": true}),
        ];
        assert_eq!(
            from_cargo_messages(&messages).unwrap(),
            [Suite {
                name: "outbound".into(),
                executable: "/t/debug/deps/outbound-1".into()
            }]
        );
        assert_eq!(
            binaries_in_cargo_messages(&messages),
            [PathBuf::from("/t/debug/e2e-helper")]
        );
    }

    #[test]
    fn selects_what_is_not_left_out() {
        let suite = |name: &str| Suite {
            name: name.into(),
            executable: name.into(),
        };
        let suites = [suite("inbound"), suite("outbound")];
        let kept = select("host", &suites, &[NOT_ON_HOST, &[("inbound", "why")]]);
        assert_eq!(kept, [&suites[1]]);
    }

    #[test]
    fn skips_the_left_out_tests_of_a_suite_only() {
        let left_out = [("record", "big", "why"), ("outbound", "other", "why")];
        assert_eq!(skips("vm", "record", &left_out), ["--skip", "big"]);
        assert!(skips("vm", "inbound", &left_out).is_empty());
    }
}
