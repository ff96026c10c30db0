//! End-to-end tests of the node agent (`redirector agent`) and the chained CNI plugin
//! (`redirector-cni`), driving the built binaries and Debian's reference CNI plugins the way a
//! container runtime does. They need root and fail (never skip) without it:
//!
//! ```text
//! cargo build -p redirector -p redirector-tests --bins && cargo test -p redirector-tests --test agent_cni -- --test-threads=1
//! ```
//!
//! Every test makes its own bpffs root, cgroup subtree, network namespaces (a "node" one for the
//! bridge, one per pod), agent socket, state directory and loopback metrics port.

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use redirector_tests::names::next_subnet;
use redirector_tests::{
    attached_programs, binary, bridge_chain, client_result, cni_error, connect, files_below,
    normalized_result, redirector, run, spawn_client, spawn_in_pod, start_proxy, wait_for, Agent,
    AgentSetup, Cgroup, CgroupDriver, Child, CniRuntime, ConnectOptions, ConnectSummary, Identity,
    KubePod, Netns, Proxy, Qos, Sandbox, Status, TempDir,
};
use serde_json::{json, Value};

const SERVER_PORT: u16 = 8080;
const WAIT: Duration = Duration::from_secs(30);

/// What each test here starts from. Fields drop in order: the node netns, the scratch
/// directory (agent socket, state files, host-local leases), then the sandbox.
struct TestNode {
    /// Where the test's agents work.
    setup: AgentSetup,
    /// The netns the runtime side (bridge, host-local) runs in.
    node: Netns,
    scratch: TempDir,
    sandbox: Sandbox,
}

/// An echo server on every address of the node netns (pods reach it at their gateway).
struct NodeServer {
    _process: Child,
    _cgroup: Cgroup,
}

impl TestNode {
    fn new(tag: &str) -> Result<TestNode> {
        let sandbox = Sandbox::new(tag)?;
        let scratch = TempDir::create(tag)?;
        Ok(TestNode {
            setup: AgentSetup::new(&sandbox, &scratch)?,
            node: Netns::create("node")?,
            scratch,
            sandbox,
        })
    }

    fn pod(&self, driver: CgroupDriver, qos: Qos, name: &str) -> Result<KubePod> {
        KubePod::create(&self.sandbox.cgroups, driver, qos, name)
    }

    /// The plugin's conflist entry for this test's agent and cgroup root.
    fn redirector_entry(&self, driver: CgroupDriver) -> Value {
        json!({
            "type": "redirector-cni",
            "agentSocket": self.setup.socket,
            "cgroupRoot": self.sandbox.cgroups.path(),
            "cgroupDriver": driver.name(),
            "logLevel": "debug",
        })
    }

    /// A `[bridge + host-local, redirector-cni]` chain on a fresh bridge and subnet, and the
    /// directory of its leases.
    fn bridge_network(&self, driver: CgroupDriver) -> Result<(CniRuntime, PathBuf)> {
        let subnet = next_subnet();
        let ipam = self.scratch.path().join(format!("ipam{subnet}"));
        let conflist = bridge_chain(
            &format!("rdtnet{subnet}"),
            "1.0.0",
            &format!("rdtbr{subnet}"),
            subnet,
            &ipam,
            self.redirector_entry(driver),
        );
        Ok((CniRuntime::new(&self.node, conflist)?, ipam))
    }

    fn server(&self) -> Result<NodeServer> {
        let cgroup = self.sandbox.cgroup("node-server")?;
        let serve = [
            binary("e2e-helper")?.into_os_string(),
            "serve".into(),
            "--listen".into(),
            format!("0.0.0.0:{SERVER_PORT}").into(),
        ];
        let process = spawn_in_pod(&self.node, &cgroup, Identity::APP, &serve)?;
        process.wait_for_line(|line| line == "listening", WAIT)?;
        Ok(NodeServer {
            _process: process,
            _cgroup: cgroup,
        })
    }
}

/// The address the pod reaches the node's server at: its gateway from the bridge's result.
fn server_addr(bridge_result: &Value) -> Result<SocketAddr> {
    let gateway: Ipv4Addr = bridge_result["ips"][0]["gateway"]
        .as_str()
        .with_context(|| format!("no gateway in {bridge_result}"))?
        .parse()?;
    Ok(SocketAddr::new(IpAddr::V4(gateway), SERVER_PORT))
}

fn link_names(netns: &Netns, kind: &[&str]) -> Result<Vec<String>> {
    let mut command = Command::new("ip");
    command
        .args(["-n", netns.name(), "-o", "link", "show"])
        .args(kind);
    let output = run("ip link", command, WAIT)?.ensure_success()?;
    Ok(output
        .stdout
        .lines()
        .filter_map(|line| line.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_owned())
        .collect())
}

/// Files host-local keeps per allocated address (its lock and cursor files aside).
fn leases(ipam: &Path) -> Result<Vec<PathBuf>> {
    Ok(files_below(ipam)?
        .into_iter()
        .filter(|path| {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            name != "lock" && !name.starts_with("last_reserved_ip")
        })
        .collect())
}

/// Each pod's outbound connections go through its proxy, the metrics count them, and DEL
/// leaves nothing of the pod behind.
#[test]
fn cni_chain_captures_pods_of_both_cgroup_drivers_and_del_removes_everything() -> Result<()> {
    const CONNECTIONS: u64 = 3;
    let test = TestNode::new("cni-chain")?;
    let TestNode {
        setup,
        node,
        sandbox,
        ..
    } = &test;
    let _server = test.server()?;
    let agent = Agent::start_logging_connections(setup)?;

    for (round, (driver, qos)) in [
        (CgroupDriver::Cgroupfs, Qos::Burstable),
        (CgroupDriver::Systemd, Qos::BestEffort),
    ]
    .into_iter()
    .enumerate()
    {
        let round = round as f64 + 1.0;
        let context = || format!("{} cgroup driver", driver.name());
        let (runtime, ipam) = test.bridge_network(driver)?;
        let pod = test.pod(driver, qos, &format!("web{}", driver.name()))?;

        let results = runtime.add(&pod.attachment()).with_context(context)?;
        let (bridge_result, chain_result) = (&results[0], &results[1]);
        assert_eq!(
            normalized_result(chain_result)?,
            normalized_result(bridge_result)?,
            "the chain's result is the bridge's ({})",
            context()
        );

        let status = setup.status()?;
        let held = status
            .pod_by_uid(&pod.uid)
            .with_context(|| format!("the agent does not hold pod {}: {status:?}", pod.uid))?
            .clone();
        assert_eq!(held.cgroup, pod.cgroup.path().display().to_string());
        assert_eq!(held.cgroup_id, pod.cgroup.id()?);
        assert_eq!(
            held.attached,
            [
                "connect4",
                "connect6",
                "sockops",
                "getsockopt",
                "getpeername4",
                "getpeername6"
            ]
        );
        let identity = held.pod.as_ref().context("no pod identity")?;
        assert_eq!(
            (identity.namespace.as_str(), identity.name.as_str()),
            ("default", pod.name.as_str())
        );
        assert_eq!(
            held.netns.as_deref(),
            Some(pod.netns.path().to_str().unwrap_or_default())
        );
        assert_eq!(
            held.attachment.as_ref().map(|a| a.container_id.as_str()),
            Some(pod.container_id.as_str())
        );

        let server = server_addr(bridge_result)?;
        let proxy: Proxy = start_proxy(&pod.netns, &pod.proxy)?;
        for n in 0..CONNECTIONS {
            let options = ConnectOptions::to(server).message(&format!("hello {n}"));
            let report = connect(&pod.netns, &pod.app, Identity::APP, &options)?;
            proxy
                .check_redirected(server, &report)
                .with_context(|| format!("connection {n}, {}", context()))?;
        }

        let kernel_line = format!(
            "connect pod {} {server} -> loopback port 15001",
            held.cgroup_id
        );
        agent
            .process
            .wait_for_stderr_line(|line| line.contains(&kernel_line), WAIT)
            .context("the programs' log lines reach the agent's log")?;

        let metrics = agent.metrics()?;
        let labels = [
            ("pod_uid", pod.uid.as_str()),
            ("namespace", "default"),
            ("pod", pod.name.as_str()),
        ];
        let per_pod = |name: &str| metrics.value(&format!("redirector_pod_{name}_total"), &labels);
        assert_eq!(
            per_pod("redirected_connections"),
            Some(CONNECTIONS as f64),
            "{metrics:?}"
        );
        assert_eq!(per_pod("original_dst_lookups"), Some(CONNECTIONS as f64));
        assert_eq!(per_pod("original_dst_misses"), Some(0.0));
        assert!(per_pod("exempted_connections").is_some_and(|n| n >= CONNECTIONS as f64));
        assert_eq!(metrics.value("redirector_pods", &[]), Some(1.0));
        assert_eq!(
            metrics.value("redirector_redirected_connections_total", &[]),
            Some(CONNECTIONS as f64 * round),
            "node totals keep the pods that left"
        );
        assert_eq!(
            metrics.value("redirector_enroll_duration_seconds_count", &[]),
            Some(round)
        );
        assert_eq!(metrics.value("redirector_ready", &[]), Some(1.0));

        runtime
            .del(&pod.attachment(), chain_result)
            .with_context(context)?;
        let status = setup.status()?;
        assert!(status.pods.is_empty(), "pods after DEL: {status:?}");
        assert_eq!(attached_programs(pod.cgroup.path())?, Vec::<Value>::new());
        assert_eq!(
            files_below(&sandbox.root().join("pods"))?,
            Vec::<PathBuf>::new()
        );
        assert_eq!(setup.state_files()?, Vec::<String>::new());
        assert_eq!(leases(&ipam)?, Vec::<PathBuf>::new(), "host-local leases");
        assert_eq!(link_names(node, &["type", "veth"])?, Vec::<String>::new());
        assert!(!link_names(&pod.netns, &[])?.contains(&"eth0".to_owned()));
        let metrics = agent.metrics()?;
        assert_eq!(metrics.value("redirector_pods", &[]), Some(0.0));
        assert_eq!(
            metrics.value("redirector_unenroll_duration_seconds_count", &[]),
            Some(round)
        );
    }
    Ok(())
}

/// While a client connects in a loop, the agent is stopped and a new one started: not one
/// connection fails or bypasses the proxy, and the new agent adopts the pod (and collects a pod
/// whose cgroup went away meanwhile).
#[test]
fn agent_restart_under_load_loses_no_connection_and_adopts_pods() -> Result<()> {
    const MAX_CONNECTIONS: u32 = 5000;
    const PER_PHASE: usize = 100;
    let test = TestNode::new("agent-restart")?;
    let TestNode {
        setup,
        scratch,
        sandbox,
        ..
    } = &test;
    let agent = Agent::start(setup)?;
    let _server = test.server()?;
    let (runtime, _) = test.bridge_network(CgroupDriver::Cgroupfs)?;
    let pod = test.pod(CgroupDriver::Cgroupfs, Qos::Burstable, "busy")?;
    let gone = test.pod(CgroupDriver::Cgroupfs, Qos::BestEffort, "gone")?;
    let pod_result = runtime.add(&pod.attachment())?;
    let gone_result = runtime.add(&gone.attachment())?;
    let gone_id = gone.cgroup.id()?;
    let server = server_addr(&pod_result[0])?;
    let proxy = start_proxy(&pod.netns, &pod.proxy)?;

    let stop_file = scratch.path().join("stop-connecting");
    let client = spawn_client(
        &pod.netns,
        &pod.app,
        Identity::APP,
        &ConnectOptions::to(server)
            .count(MAX_CONNECTIONS)
            .hold_ms(2)
            .stop_file(&stop_file),
    )?;
    let forwarded_at_least = |count: usize| {
        wait_for(
            &format!("{count} connections through the proxy"),
            WAIT,
            || {
                if let Some(status) = client.try_exit_status()? {
                    anyhow::bail!("the client ended early ({status}){}", client.diagnostics());
                }
                let forwarded = proxy.forward_events().len();
                Ok((forwarded >= count).then_some(forwarded))
            },
        )
    };
    let before_stop = forwarded_at_least(PER_PHASE)?;
    let stopped = agent.stop()?;
    ensure!(
        stopped.stderr.contains("pins stay in place"),
        "the agent did not say it leaves the pins: {}",
        stopped.stderr
    );

    // The second pod is deleted while no agent runs: kubelet removes its cgroup.
    let gone_attachment = gone.attachment();
    let KubePod {
        app,
        proxy: gone_proxy,
        cgroup: gone_cgroup,
        netns: _gone_netns,
        ..
    } = gone;
    drop((app, gone_proxy, gone_cgroup));
    let while_down = forwarded_at_least(before_stop + PER_PHASE)?;

    let agent = Agent::start(setup)?;
    forwarded_at_least(while_down + PER_PHASE)?;
    std::fs::write(&stop_file, b"")?;
    let summary: ConnectSummary = client_result(&client, WAIT)?;
    assert_eq!(
        (summary.failed, summary.first_error.as_deref()),
        (0, None),
        "{summary:?}"
    );
    ensure!(
        summary.ok < MAX_CONNECTIONS.into(),
        "the client never saw the stop file"
    );
    let forwarded = wait_for("the proxy to log every connection", WAIT, || {
        let forwarded = proxy.forward_events();
        Ok((forwarded.len() as u64 >= summary.ok).then_some(forwarded))
    })?;
    assert_eq!(
        forwarded.len() as u64,
        summary.ok,
        "every connection went through the proxy"
    );
    assert!(forwarded.iter().all(|event| event.orig_dst == server));

    let status = setup.status()?;
    let report = status
        .agent
        .as_ref()
        .and_then(|agent| agent.startup.clone())
        .with_context(|| format!("no startup report: {status:?}"))?;
    let adopted: Vec<_> = report
        .adopted
        .iter()
        .filter_map(|p| p.pod.as_ref())
        .map(|p| p.uid.as_str())
        .collect();
    assert_eq!(adopted, [pod.uid.as_str()], "{report:?}");
    let collected: Vec<_> = report
        .collected
        .iter()
        .map(|p| (p.pod.cgroup_id, p.reason.as_str()))
        .collect();
    assert_eq!(collected, [(gone_id, "cgroup_gone")], "{report:?}");
    let held = status
        .pod_by_uid(&pod.uid)
        .context("the adopted pod is not held")?;
    assert_eq!(
        held.counters.redirected, summary.ok,
        "counters survive the restart"
    );
    assert!(status.pod(gone_id).is_none());
    assert!(!sandbox
        .root()
        .join("pods")
        .join(gone_id.to_string())
        .exists());
    assert_eq!(setup.state_files()?, [format!("{}.json", pod.cgroup.id()?)]);
    let metrics = agent.metrics()?;
    assert_eq!(
        metrics.value(
            "redirector_pod_redirected_connections_total",
            &[("pod_uid", pod.uid.as_str())]
        ),
        Some(summary.ok as f64)
    );
    assert_eq!(
        metrics.value("redirector_collected_pods_total", &[]),
        Some(1.0)
    );

    // The runtime's DEL of the collected pod still succeeds: nothing is left to do.
    runtime.del(&gone_attachment, &gone_result[1])?;
    Ok(())
}

/// A previous plugin's result in the 1.0.0 layout, for calling redirector-cni on its own.
fn previous_result(netns: &Netns) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "mac": "0a:58:0a:f4:00:05", "sandbox": netns.path()}],
        "ips": [{"interface": 0, "address": "10.244.0.5/24", "gateway": "10.244.0.1"}],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {"nameservers": ["10.96.0.10"]}
    })
}

/// redirector-cni alone, as the runtime would call it in a chain.
struct Plugin {
    runtime: CniRuntime,
    entry: Value,
}

impl Plugin {
    fn new(test: &TestNode) -> Result<Plugin> {
        let entry = test.redirector_entry(CgroupDriver::Cgroupfs);
        let conflist = json!({"cniVersion": "1.0.0", "name": "rdtnet", "plugins": [entry.clone()]});
        Ok(Plugin {
            runtime: CniRuntime::new(&test.node, conflist)?,
            entry,
        })
    }

    /// The network config with `changes` merged in (a null value removes the key).
    fn config(&self, version: &str, previous: Option<&Value>, changes: Value) -> Value {
        let mut config = self.runtime.plugin_config(&self.entry, previous);
        config["cniVersion"] = version.into();
        if let (Some(config), Some(changes)) = (config.as_object_mut(), changes.as_object()) {
            for (key, value) in changes {
                match value {
                    Value::Null => config.remove(key),
                    value => config.insert(key.clone(), value.clone()),
                };
            }
        }
        config
    }

    fn call(
        &self,
        command: &str,
        env: &[(&str, String)],
        config: &Value,
    ) -> Result<redirector_tests::Output> {
        self.runtime
            .exec("redirector-cni", command, env, serde_json::to_vec(config)?)
    }
}

/// Input the plugin must refuse with a spec error.
struct BadCall {
    problem: &'static str,
    env: Vec<(&'static str, String)>,
    stdin: Vec<u8>,
    code: u32,
}

#[test]
fn malformed_cni_inputs_get_spec_errors_and_change_nothing() -> Result<()> {
    let test = TestNode::new("cni-bad")?;
    let TestNode {
        setup,
        scratch,
        sandbox,
        ..
    } = &test;
    let _agent = Agent::start(setup)?;
    let pod = test.pod(CgroupDriver::Cgroupfs, Qos::Guaranteed, "victim")?;
    let plugin = Plugin::new(&test)?;
    let previous = previous_result(&pod.netns);
    let env = pod.attachment().env();
    let good = plugin.config("1.0.0", Some(&previous), json!({}));
    let with = |changes: Value| {
        serde_json::to_vec(&plugin.config("1.0.0", Some(&previous), changes)).unwrap()
    };
    let env_with = |key: &'static str, value: Option<String>| {
        let mut env: Vec<_> = env.iter().filter(|(k, _)| *k != key).cloned().collect();
        env.extend(value.map(|value| (key, value)));
        env
    };
    let stale_socket = scratch.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale_socket)?);

    let cases = vec![
        BadCall {
            problem: "stdin is not JSON",
            env: env.clone(),
            stdin: b"{\"cniVersion\": \"1.0".to_vec(),
            code: 6,
        },
        BadCall {
            problem: "no prevResult",
            env: env.clone(),
            stdin: with(json!({"prevResult": null})),
            code: 7,
        },
        BadCall {
            problem: "cniVersion 0.2.0",
            env: env.clone(),
            stdin: with(json!({"cniVersion": "0.2.0"})),
            code: 1,
        },
        BadCall {
            problem: "cniVersion 2.0.0",
            env: env.clone(),
            stdin: with(json!({"cniVersion": "2.0.0"})),
            code: 1,
        },
        BadCall {
            problem: "no CNI_NETNS",
            env: env_with("CNI_NETNS", None),
            stdin: serde_json::to_vec(&good)?,
            code: 4,
        },
        BadCall {
            problem: "no K8S_POD_UID",
            env: env_with(
                "CNI_ARGS",
                Some("K8S_POD_NAMESPACE=default;K8S_POD_NAME=victim".into()),
            ),
            stdin: serde_json::to_vec(&good)?,
            code: 4,
        },
        BadCall {
            problem: "CNI_ARGS pair without =",
            env: env_with("CNI_ARGS", Some(format!("K8S_POD_UID={};junk", pod.uid))),
            stdin: serde_json::to_vec(&good)?,
            code: 4,
        },
        BadCall {
            problem: "no cgroup for the pod UID",
            env: env_with(
                "CNI_ARGS",
                Some("K8S_POD_UID=0b8f5c3e-0000-0000-0000-000000000000".into()),
            ),
            stdin: serde_json::to_vec(&good)?,
            code: 7,
        },
        BadCall {
            problem: "pod UID that would leave the cgroup root",
            env: env_with("CNI_ARGS", Some("K8S_POD_UID=../../etc".into())),
            stdin: serde_json::to_vec(&good)?,
            code: 7,
        },
        BadCall {
            problem: "cgroup driver of another layout",
            env: env.clone(),
            stdin: with(json!({"cgroupDriver": "systemd"})),
            code: 7,
        },
        BadCall {
            problem: "unknown key",
            env: env.clone(),
            stdin: with(json!({"agentSockett": "/run/x.sock"})),
            code: 7,
        },
        BadCall {
            problem: "bad cgroupDriver",
            env: env.clone(),
            stdin: with(json!({"cgroupDriver": "runc"})),
            code: 7,
        },
        BadCall {
            problem: "bad policy",
            env: env.clone(),
            stdin: with(json!({"policy": {"proxy_port": 0}})),
            code: 7,
        },
        BadCall {
            problem: "no agent",
            env: env.clone(),
            stdin: with(json!({"agentSocket": scratch.path().join("nobody.sock")})),
            code: 11,
        },
        BadCall {
            problem: "stale agent socket",
            env: env.clone(),
            stdin: with(json!({"agentSocket": stale_socket})),
            code: 11,
        },
    ];
    let mut failures = Vec::new();
    for case in &cases {
        let checked = plugin
            .runtime
            .exec("redirector-cni", "ADD", &case.env, case.stdin.clone())
            .and_then(|output| {
                let error = cni_error(&output)?;
                ensure!(
                    error.code == case.code,
                    "code {} instead of {}: {error:?}",
                    error.code,
                    case.code
                );
                ensure!(
                    !error.msg.is_empty() && !error.details.is_empty(),
                    "{error:?}"
                );
                Ok(())
            });
        if let Err(error) = checked {
            failures.push(format!("{}: {error:#}", case.problem));
        }
    }
    assert!(
        failures.is_empty(),
        "malformed input not refused right:\n{}",
        failures.join("\n")
    );

    let status = setup.status()?;
    assert!(status.pods.is_empty(), "{status:?}");
    assert_eq!(setup.state_files()?, Vec::<String>::new());
    assert_eq!(
        files_below(&sandbox.root().join("pods"))?,
        Vec::<PathBuf>::new()
    );
    assert_eq!(attached_programs(pod.cgroup.path())?, Vec::<Value>::new());

    // The same input with nothing wrong is accepted, so the refusals were for the faults.
    let output = plugin.call("ADD", &env, &good)?.ensure_success()?;
    assert_eq!(
        normalized_result(&serde_json::from_str(&output.stdout)?)?,
        normalized_result(&previous)?
    );
    Ok(())
}

fn error_code(output: &redirector_tests::Output) -> Result<u32> {
    Ok(cni_error(output)?.code)
}

/// VERSION, ADD in the legacy 0.4.0 layout, CHECK, DEL (twice, and with no agent), STATUS, GC
/// and the two ways to skip a pod.
#[test]
fn cni_operations_follow_the_spec() -> Result<()> {
    let test = TestNode::new("cni-ops")?;
    let setup = &test.setup;
    let agent = Agent::start(setup)?;
    let pod = test.pod(CgroupDriver::Cgroupfs, Qos::BestEffort, "ops")?;
    let plugin = Plugin::new(&test)?;
    let env = pod.attachment().env();
    let held = || -> Result<bool> { Ok(setup.status()?.pod_by_uid(&pod.uid).is_some()) };

    let version = plugin
        .call("VERSION", &[], &json!({"cniVersion": "1.0.0"}))?
        .ensure_success()?;
    let version: Value = serde_json::from_str(&version.stdout)?;
    for wanted in ["0.4.0", "1.0.0", "1.1.0"] {
        assert!(
            version["supportedVersions"]
                .as_array()
                .is_some_and(|v| v.contains(&json!(wanted))),
            "{version}"
        );
    }

    // 0.4.0: the result keeps the legacy layout (ips[].version) it came in.
    let legacy = json!({
        "cniVersion": "0.4.0",
        "interfaces": [{"name": "eth0", "mac": "0a:58:0a:f4:00:05", "sandbox": pod.netns.path()}],
        "ips": [{"version": "4", "interface": 0, "address": "10.244.0.5/24", "gateway": "10.244.0.1"}],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {}
    });
    let add = plugin
        .call(
            "ADD",
            &env,
            &plugin.config("0.4.0", Some(&legacy), json!({})),
        )?
        .ensure_success()?;
    assert_eq!(
        serde_json::from_str::<Value>(&add.stdout)?,
        legacy,
        "ADD returns prevResult as it was"
    );
    assert!(held()?, "ADD enrolled the pod");
    let check = plugin
        .call(
            "CHECK",
            &env,
            &plugin.config("0.4.0", Some(&legacy), json!({})),
        )?
        .ensure_success()?;
    assert_eq!(check.stdout, "");
    let status_config = plugin.config("1.1.0", None, json!({}));
    assert_eq!(
        plugin
            .call("STATUS", &[], &status_config)?
            .ensure_success()?
            .stdout,
        ""
    );

    for _ in 0..2 {
        let del = plugin
            .call(
                "DEL",
                &env,
                &plugin.config("0.4.0", Some(&legacy), json!({})),
            )?
            .ensure_success()?;
        assert_eq!(del.stdout, "", "DEL prints nothing");
    }
    assert!(!held()?, "DEL unenrolled the pod");
    let check = plugin.call(
        "CHECK",
        &env,
        &plugin.config("0.4.0", Some(&legacy), json!({})),
    )?;
    assert_eq!(
        error_code(&check)?,
        101,
        "CHECK of a pod that is not captured"
    );

    // 1.1.0 and GC: a listed attachment stays, an unlisted one goes.
    let previous = previous_result(&pod.netns);
    let add = plugin
        .call(
            "ADD",
            &env,
            &plugin.config("1.1.0", Some(&previous), json!({})),
        )?
        .ensure_success()?;
    let mut expected = previous.clone();
    expected["cniVersion"] = "1.1.0".into();
    assert_eq!(serde_json::from_str::<Value>(&add.stdout)?, expected);
    let gc = |valid: Value| -> Result<()> {
        let config = plugin.config("1.1.0", None, json!({"cni.dev/valid-attachments": valid}));
        plugin.call("GC", &[], &config)?.ensure_success()?;
        Ok(())
    };
    gc(json!([{"containerID": pod.container_id, "ifname": "eth0"}]))?;
    assert!(held()?, "GC kept a listed attachment");
    gc(json!([]))?;
    assert!(!held()?, "GC collected an unlisted attachment");

    // Skipped pods: ADD hands the result on and enrolls nothing.
    let skipping = [
        (
            "namespace in skipNamespaces",
            plugin.config(
                "1.0.0",
                Some(&previous),
                json!({"skipNamespaces": ["default"]}),
            ),
            env.clone(),
        ),
        (
            "REDIRECTOR_SKIP",
            plugin.config("1.0.0", Some(&previous), json!({})),
            env.iter()
                .map(|(key, value)| match *key {
                    "CNI_ARGS" => (*key, format!("{value};REDIRECTOR_SKIP=true")),
                    _ => (*key, value.clone()),
                })
                .collect(),
        ),
    ];
    for (why, config, env) in &skipping {
        let add = plugin
            .call("ADD", env, config)?
            .ensure_success()
            .with_context(|| why.to_string())?;
        assert_eq!(
            normalized_result(&serde_json::from_str(&add.stdout)?)?,
            normalized_result(&previous)?
        );
        assert!(!held()?, "{why}: the pod was enrolled");
    }

    // With no agent: STATUS says the plugin is not available, DEL still succeeds.
    agent.stop()?;
    assert_eq!(
        error_code(&plugin.call("STATUS", &[], &status_config)?)?,
        50
    );
    let del = plugin
        .call(
            "DEL",
            &env,
            &plugin.config("1.0.0", Some(&previous), json!({})),
        )?
        .ensure_success()?;
    assert_eq!(del.stdout, "");
    Ok(())
}

/// `redirector enroll/unenroll/status` go through the agent when it runs and work on their own
/// when it does not, with the same results.
#[test]
fn cli_gives_the_same_results_with_and_without_the_agent() -> Result<()> {
    let test = TestNode::new("cli-agent")?;
    let TestNode { setup, sandbox, .. } = &test;
    let first = sandbox.cgroup("first")?;
    let second = sandbox.cgroup("second")?;
    let enroll = |cgroup: &redirector_tests::Cgroup| {
        setup.redirector(&[
            OsString::from("enroll"),
            "--cgroup".into(),
            cgroup.path().into(),
        ])
    };
    let pods = |status: &Status| status.pods.iter().map(|p| p.cgroup_id).collect::<Vec<_>>();

    let standalone = enroll(&first)?.ensure_success()?;
    assert!(
        standalone.stderr.contains("Standalone"),
        "{}",
        standalone.stderr
    );
    let alone = setup.status()?;
    assert_eq!(alone.agent, None);
    assert_eq!(pods(&alone), [first.id()?]);

    let agent = Agent::start(setup)?;
    let through_agent = setup.status()?;
    let report = through_agent.agent.clone().context("no agent report")?;
    assert!(report.ready);
    assert_eq!(
        through_agent.pods, alone.pods,
        "the agent sees what the CLI made"
    );
    let adopted: Vec<u64> = report
        .startup
        .context("no startup report")?
        .adopted
        .iter()
        .map(|p| p.cgroup_id)
        .collect();
    assert_eq!(adopted, [first.id()?]);

    let via_agent = enroll(&second)?.ensure_success()?;
    assert!(via_agent.stderr.contains("Agent"), "{}", via_agent.stderr);
    let missing = sandbox.cgroups.path().join("no-such-pod");
    let refused =
        setup.redirector(&[OsString::from("enroll"), "--cgroup".into(), missing.into()])?;
    ensure!(
        !refused.success() && refused.stderr.contains("no such directory"),
        "{refused:?}"
    );
    let mut other_root = vec![
        OsString::from("status"),
        "--socket".into(),
        setup.socket.clone().into(),
    ];
    other_root.extend(["--bpffs".into(), sandbox.root().join("other").into()]);
    let wrong_root = redirector(&other_root)?;
    ensure!(
        !wrong_root.success() && wrong_root.stderr.contains("serves the pins under"),
        "{wrong_root:?}"
    );
    setup
        .redirector(&[
            OsString::from("unenroll"),
            "--cgroup".into(),
            first.path().into(),
        ])?
        .ensure_success()?;
    let with_agent = setup.status()?;
    assert_eq!(pods(&with_agent), [second.id()?]);

    agent.stop()?;
    let after = setup.status()?;
    assert_eq!(after.agent, None);
    assert_eq!(
        after.pods, with_agent.pods,
        "the same pods without the agent"
    );
    assert_eq!(attached_programs(first.path())?, Vec::<Value>::new());
    assert!(!attached_programs(second.path())?.is_empty());
    Ok(())
}

#[test]
fn install_cni_chains_the_plugin_and_uninstall_cni_unchains_it() -> Result<()> {
    let scratch = TempDir::create("install-cni")?;
    let (bin_dir, conf_dir) = (scratch.path().join("bin"), scratch.path().join("net.d"));
    std::fs::create_dir_all(&bin_dir)?;
    std::fs::create_dir_all(&conf_dir)?;
    let conflist = json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "plugins": [
            {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local", "subnet": "10.88.0.0/16"}},
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    });
    let path = conf_dir.join("10-containerd-net.conflist");
    std::fs::write(&path, serde_json::to_string_pretty(&conflist)?)?;
    let flags = |command: &str| -> Vec<OsString> {
        vec![
            command.into(),
            "--cni-bin-dir".into(),
            bin_dir.clone().into(),
            "--cni-conf-dir".into(),
            conf_dir.clone().into(),
            "--cgroup-driver".into(),
            "cgroupfs".into(),
            "--cgroup-root".into(),
            "/sys/fs/cgroup".into(),
            "--socket".into(),
            "/run/redirector/test.sock".into(),
        ]
    };

    redirector(flags("install-cni"))?.ensure_success()?;
    let installed: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let plugins = installed["plugins"].as_array().context("no plugins")?;
    assert_eq!(
        &plugins[..2],
        conflist["plugins"]
            .as_array()
            .context("no plugins")?
            .as_slice()
    );
    assert_eq!(
        plugins[2],
        json!({
            "type": "redirector-cni",
            "agentSocket": "/run/redirector/test.sock",
            "cgroupRoot": "/sys/fs/cgroup",
            "cgroupDriver": "cgroupfs"
        })
    );
    assert_eq!(
        std::fs::read(bin_dir.join("redirector-cni"))?,
        std::fs::read(binary("redirector-cni")?)?
    );

    redirector(flags("uninstall-cni"))?.ensure_success()?;
    let uninstalled: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    assert_eq!(uninstalled, conflist);
    assert!(!bin_dir.join("redirector-cni").exists());
    Ok(())
}
