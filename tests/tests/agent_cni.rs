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
    istio_injected_annotations, normalized_result, pinned_map_entries, redirector, run,
    spawn_client, spawn_in_pod, start_proxy, wait_for, Agent, AgentSetup, Cgroup, CgroupDriver,
    Child, CniRuntime, ConnectOptions, ConnectSummary, Identity, KubePod, Netns, PinnedMapInfo,
    Proxy, Qos, Sandbox, Status, TempDir, POD_ANNOTATIONS,
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

    /// The plugin's conflist entry for this test's agent and cgroup root, declaring the
    /// capability that has the runtime pass the pod's annotations.
    fn redirector_entry(&self, driver: CgroupDriver) -> Value {
        json!({
            "type": "redirector-cni",
            "capabilities": {POD_ANNOTATIONS: true},
            "agentSocket": self.setup.socket,
            "cgroupRoot": self.sandbox.cgroups.path(),
            "cgroupDriver": driver.name(),
            "logLevel": "debug",
        })
    }

    /// A `[bridge + host-local, redirector-cni]` chain on a fresh bridge and subnet, and the
    /// directory of its leases.
    fn bridge_network(&self, driver: CgroupDriver) -> Result<(CniRuntime, PathBuf)> {
        self.bridge_network_with(self.redirector_entry(driver))
    }

    /// [`Self::bridge_network`] with this entry for redirector-cni.
    fn bridge_network_with(&self, entry: Value) -> Result<(CniRuntime, PathBuf)> {
        let subnet = next_subnet();
        let ipam = self.scratch.path().join(format!("ipam{subnet}"));
        let conflist = bridge_chain(
            &format!("rdtnet{subnet}"),
            "1.0.0",
            &format!("rdtbr{subnet}"),
            subnet,
            &ipam,
            entry,
        );
        Ok((CniRuntime::new(&self.node, conflist)?, ipam))
    }

    fn server(&self) -> Result<NodeServer> {
        self.server_on(SERVER_PORT)
    }

    fn server_on(&self, port: u16) -> Result<NodeServer> {
        let cgroup = self.sandbox.cgroup(&format!("node-server{port}"))?;
        let serve = [
            binary("e2e-helper")?.into_os_string(),
            "serve".into(),
            "--listen".into(),
            format!("0.0.0.0:{port}").into(),
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
    server_addr_on(bridge_result, SERVER_PORT)
}

fn server_addr_on(bridge_result: &Value, port: u16) -> Result<SocketAddr> {
    let gateway: Ipv4Addr = bridge_result["ips"][0]["gateway"]
        .as_str()
        .with_context(|| format!("no gateway in {bridge_result}"))?
        .parse()?;
    Ok(SocketAddr::new(IpAddr::V4(gateway), port))
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
        // An injected pod: its annotations' defaults capture inbound too (-b '*').
        assert_eq!(
            held.attached,
            [
                "connect4",
                "connect6",
                "sockops",
                "getsockopt",
                "getpeername4",
                "getpeername6",
                "getsockname4",
                "getsockname6",
                "bind4",
                "bind6",
                "inbound"
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
                client.ensure_running()?;
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

    let agent = Agent::start_with(setup, &["--per-pod-metrics", "10"])?;
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

    /// The network config, with the annotations of an injected pod in `runtimeConfig`, and
    /// `changes` merged in (a null value removes the key).
    fn config(&self, version: &str, previous: Option<&Value>, changes: Value) -> Value {
        let capability_args = json!({POD_ANNOTATIONS: istio_injected_annotations()});
        let capability_args = capability_args.as_object().cloned().unwrap_or_default();
        let mut config = self
            .runtime
            .plugin_config(&self.entry, &capability_args, previous);
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
    // Without the list, GC would collect every pod of the network: refused.
    let unlisted = plugin.config("1.1.0", None, json!({}));
    assert_eq!(error_code(&plugin.call("GC", &[], &unlisted)?)?, 7);
    assert!(held()?, "GC without valid-attachments collected nothing");
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

    // With no agent: STATUS still succeeds (an agent was ready since boot: an agent restart
    // must not make the node's network not ready), DEL succeeds and is recorded, and the next
    // agent carries it out.
    let add = plugin.config("1.0.0", Some(&previous), json!({}));
    plugin.call("ADD", &env, &add)?.ensure_success()?;
    assert!(held()?);
    agent.stop()?;
    assert_eq!(
        plugin
            .call("STATUS", &[], &status_config)?
            .ensure_success()?
            .stdout,
        ""
    );
    let del = plugin.call("DEL", &env, &add)?.ensure_success()?;
    assert_eq!(del.stdout, "");
    assert!(held()?, "nobody has carried the DEL out yet");
    let _agent = Agent::start(setup)?;
    assert!(!held()?, "the new agent carried out the recorded DEL");
    Ok(())
}

/// Before any agent was ready on the node, STATUS says the plugin is not available (50).
#[test]
fn cni_status_fails_only_before_an_agent_was_ready() -> Result<()> {
    let test = TestNode::new("cni-status")?;
    let plugin = Plugin::new(&test)?;
    let config = plugin.config("1.1.0", None, json!({}));
    assert_eq!(error_code(&plugin.call("STATUS", &[], &config)?)?, 50);
    let agent = Agent::start(&test.setup)?;
    plugin.call("STATUS", &[], &config)?.ensure_success()?;
    agent.stop()?;
    plugin.call("STATUS", &[], &config)?.ensure_success()?;
    Ok(())
}

/// A netns file that is visible but no longer a namespace mount (broken mount propagation) is
/// no proof that the pod is gone: the agent keeps the pod captured and reports why it could
/// not reconcile.
#[test]
fn agent_keeps_pods_it_cannot_prove_gone_and_says_why() -> Result<()> {
    let test = TestNode::new("no-proof")?;
    let setup = &test.setup;
    let agent = Agent::start(setup)?;
    let pod = test.pod(CgroupDriver::Cgroupfs, Qos::Burstable, "kept")?;
    let plugin = Plugin::new(&test)?;
    let add = plugin.config("1.0.0", Some(&previous_result(&pod.netns)), json!({}));
    plugin
        .call("ADD", &pod.attachment().env(), &add)?
        .ensure_success()?;
    agent.stop()?;
    // What an agent sees when /run/netns is not propagated into it: the file, not the mount.
    let mut umount = Command::new("umount");
    umount.arg(pod.netns.path());
    run("umount", umount, WAIT)?.ensure_success()?;

    let agent = Agent::start(setup)?;
    let status = setup.status()?;
    assert!(
        status.pod_by_uid(&pod.uid).is_some(),
        "the pod was collected without proof: {status:?}"
    );
    let text = setup
        .redirector(&["status", "--output", "json"])?
        .ensure_success()?
        .stdout;
    assert!(text.contains("mount propagation"), "{text}");
    assert!(
        agent
            .metrics()?
            .value("redirector_reconcile_failures_total", &[])
            .is_some_and(|n| n >= 1.0),
        "reconcile failures are counted"
    );
    Ok(())
}

/// A truncated state file and one from another version do not stop the agent, nor CNI ADD:
/// they are moved aside and reported, and the pod they described stays enrolled.
#[test]
fn unreadable_state_files_are_quarantined_and_the_node_keeps_serving() -> Result<()> {
    let test = TestNode::new("quarantine")?;
    let setup = &test.setup;
    let agent = Agent::start(setup)?;
    let plugin = Plugin::new(&test)?;
    let first = test.pod(CgroupDriver::Cgroupfs, Qos::Burstable, "first")?;
    let add = |pod: &KubePod| -> Result<()> {
        let config = plugin.config("1.0.0", Some(&previous_result(&pod.netns)), json!({}));
        plugin
            .call("ADD", &pod.attachment().env(), &config)?
            .ensure_success()?;
        Ok(())
    };
    add(&first)?;
    agent.stop()?;
    let state = setup.state_dir.join(format!("{}.json", first.cgroup.id()?));
    std::fs::write(&state, "{\"cgroup_id\": 12")?;
    std::fs::write(
        setup.state_dir.join("77.json"),
        r#"{"cgroup_id": "seventy-seven"}"#,
    )?;

    let agent = Agent::start(setup)?;
    let second = test.pod(CgroupDriver::Cgroupfs, Qos::Burstable, "second")?;
    add(&second)?;
    let status = setup.status()?;
    assert!(status.pod_by_uid(&second.uid).is_some(), "{status:?}");
    assert!(status.pod(first.cgroup.id()?).is_some(), "{status:?}");
    let metrics = agent.metrics()?;
    assert_eq!(
        metrics.value("redirector_quarantined_state_files", &[]),
        Some(2.0)
    );
    Ok(())
}

/// A rolling update: the new agent starts while the old one serves. It waits; the old one's
/// exit does not remove the new one's socket, and the new one serves.
#[test]
fn overlapping_agents_never_remove_each_others_socket() -> Result<()> {
    let test = TestNode::new("overlap")?;
    let setup = &test.setup;
    let old = Agent::start(setup)?;
    let mut command = Command::new(binary("redirector")?);
    command
        .arg("agent")
        .args(setup.node_args())
        .args(["--metrics-addr", &setup.metrics_addr.to_string()])
        .args(["--reconcile-interval-seconds", "3600"])
        .env_remove("REDIRECTOR_CONFIG");
    let new = Child::spawn("second redirector agent", command)?;
    new.wait_for_stderr_line(|line| line.contains("waiting for it to stop"), WAIT)?;
    assert_eq!(new.try_exit_status()?, None, "{}", new.diagnostics());
    assert!(
        setup.status()?.agent.is_some(),
        "the old agent still serves"
    );
    old.stop()?;
    wait_for("the new agent to serve", WAIT, || {
        Ok(setup
            .status()
            .ok()
            .and_then(|status| status.agent)
            .filter(|agent| agent.ready)
            .map(|_| ()))
    })?;
    assert!(setup.socket.exists(), "the socket is there");
    Ok(())
}

/// A status that blocks reading a pod's state file (a FIFO) wedges: /healthz says so once it
/// runs past the deadline, and is fine again once it ends. Meanwhile enrolls still answer.
#[test]
fn healthz_reports_a_stuck_operation() -> Result<()> {
    let test = TestNode::new("wedged")?;
    let setup = &test.setup;
    let agent = Agent::start_with(setup, &["--operation-deadline-seconds", "1"])?;
    let wedged = test.sandbox.cgroup("wedged")?;
    let meanwhile = test.sandbox.cgroup("meanwhile")?;
    let enroll = |cgroup: &Cgroup| -> Result<()> {
        setup
            .redirector(&[
                OsString::from("enroll"),
                "--cgroup".into(),
                cgroup.path().into(),
            ])?
            .ensure_success()?;
        Ok(())
    };
    enroll(&wedged)?;
    // A pod state file replaced by a FIFO: a status blocks reading it until a writer comes.
    let state = setup.state_dir.join(format!("{}.json", wedged.id()?));
    let saved = std::fs::read(&state)?;
    std::fs::remove_file(&state)?;
    nix::unistd::mkfifo(&state, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
    let mut status = Command::new(binary("redirector")?);
    status
        .args(["status", "--output", "json"])
        .args(setup.node_args());
    let stuck = Child::spawn("a stuck status", status)?;
    let health = || redirector_tests::http_get(setup.metrics_addr, "/healthz");
    let (_, body) = wait_for("/healthz to fail", WAIT, || {
        Ok(health().ok().filter(|(code, _)| *code == 503))
    })?;
    assert!(body.contains("status"), "{body}");
    enroll(&meanwhile)?;
    // A writer lets the read return; the status then finishes.
    let mut writer = std::fs::OpenOptions::new().write(true).open(&state)?;
    std::io::Write::write_all(&mut writer, &saved)?;
    drop(writer);
    stuck.wait_exit(WAIT)?.ensure_success()?;
    wait_for("/healthz to be fine again", WAIT, || {
        Ok(health().ok().filter(|(code, _)| *code == 200).map(|_| ()))
    })?;
    drop(agent);
    Ok(())
}

/// A status that cannot finish (a pod's state file blocks on read) does not hold up an enroll.
#[test]
fn a_slow_status_does_not_delay_an_enroll() -> Result<()> {
    let test = TestNode::new("slow-status")?;
    let setup = &test.setup;
    let _agent = Agent::start(setup)?;
    let first = test.sandbox.cgroup("first")?;
    let second = test.sandbox.cgroup("second")?;
    let enroll = |cgroup: &Cgroup| {
        setup.redirector(&[
            OsString::from("enroll"),
            "--cgroup".into(),
            cgroup.path().into(),
        ])
    };
    enroll(&first)?.ensure_success()?;
    let state = setup.state_dir.join(format!("{}.json", first.id()?));
    let saved = std::fs::read(&state)?;
    std::fs::remove_file(&state)?;
    nix::unistd::mkfifo(&state, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
    let mut status = Command::new(binary("redirector")?);
    status
        .args(["status", "--output", "json"])
        .args(setup.node_args());
    let slow = Child::spawn("a status stuck on a state file", status)?;
    // Once the status has the FIFO open, it is past every lock it could take.
    let mut writer = wait_for("the status to open the state file", WAIT, || {
        Ok(nix::fcntl::open(
            &state,
            nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_NONBLOCK,
            nix::sys::stat::Mode::empty(),
        )
        .ok())
    })
    .map(std::fs::File::from)?;
    enroll(&second)?.ensure_success()?;
    assert_eq!(
        slow.try_exit_status()?,
        None,
        "the status was not in flight"
    );
    use std::io::Write as _;
    writer.write_all(&saved)?;
    drop(writer);
    slow.wait_exit(WAIT)?.ensure_success()?;
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

/// The pod status istio's injector writes when iptables (`istio-init`) captures the pod.
const ISTIO_INIT_STATUS: &str = r#"{"initContainers":["istio-init"],"containers":["istio-proxy"],"volumes":["istio-envoy","istio-data"],"imagePullSecrets":null,"revision":"default"}"#;

/// The ports of `held`'s policy in the named set (`outbound_exclude`, ...).
fn ports_in(held: &redirector_tests::PodStatus, set: &str) -> Vec<String> {
    held.ports
        .iter()
        .filter(|entry| entry.sets.iter().any(|s| s == set))
        .map(|entry| entry.value.clone())
        .collect()
}

/// The default selection: an injected pod is captured with its annotations' settings (its
/// excluded outbound port goes direct); a pod the injector did not touch and a pod istio-init
/// captures are passed through, their connections direct, and the agent counts both by reason.
#[test]
fn only_injected_pods_are_captured_with_their_annotations_settings() -> Result<()> {
    const DIRECT_PORT: u16 = 8081;
    let test = TestNode::new("cni-istio")?;
    let setup = &test.setup;
    let agent = Agent::start(setup)?;
    let _server = test.server()?;
    let _direct_server = test.server_on(DIRECT_PORT)?;
    let (runtime, _) = test.bridge_network(CgroupDriver::Systemd)?;
    let pod = |name: &str| test.pod(CgroupDriver::Systemd, Qos::Burstable, name);

    let mut injected = pod("injected")?;
    injected.annotate(&[(
        "traffic.sidecar.istio.io/excludeOutboundPorts",
        Some(&DIRECT_PORT.to_string()),
    )]);
    let mut plain = pod("plain")?;
    plain.annotations = Some(
        [("kubernetes.io/config.source".to_owned(), "api".to_owned())]
            .into_iter()
            .collect(),
    );
    let mut legacy = pod("legacy")?;
    legacy.annotate(&[("sidecar.istio.io/status", Some(ISTIO_INIT_STATUS))]);

    let injected_result = runtime.add(&injected.attachment())?;
    let plain_result = runtime.add(&plain.attachment())?;
    let legacy_result = runtime.add(&legacy.attachment())?;
    for results in [&plain_result, &legacy_result] {
        assert_eq!(
            normalized_result(&results[1])?,
            normalized_result(&results[0])?,
            "a skipped pod gets the previous result"
        );
    }

    let status = setup.status()?;
    let held: Vec<_> = status
        .pods
        .iter()
        .filter_map(|p| p.pod.as_ref())
        .map(|p| p.uid.as_str())
        .collect();
    assert_eq!(
        held,
        [injected.uid.as_str()],
        "only the injected pod is enrolled"
    );
    let enrolled = status
        .pod_by_uid(&injected.uid)
        .context("the injected pod")?;
    // The annotation replaced istio-cni's outbound default (15020); inbound has its defaults.
    assert_eq!(
        ports_in(enrolled, "outbound_exclude"),
        [DIRECT_PORT.to_string()]
    );
    for port in ["15020", "15021", "15090"] {
        assert!(
            ports_in(enrolled, "inbound_exclude").contains(&port.to_owned()),
            "{port}: {:?}",
            enrolled.ports
        );
    }
    assert!(enrolled.attached.contains(&"inbound".to_owned()));

    let server = server_addr(&injected_result[0])?;
    let direct = server_addr_on(&injected_result[0], DIRECT_PORT)?;
    let proxy = start_proxy(&injected.netns, &injected.proxy)?;
    let through = connect(
        &injected.netns,
        &injected.app,
        Identity::APP,
        &ConnectOptions::to(server).message("through"),
    )?;
    proxy.check_redirected(server, &through)?;
    let straight = connect(
        &injected.netns,
        &injected.app,
        Identity::APP,
        &ConnectOptions::to(direct).message("excluded port"),
    )?;
    proxy
        .check_direct(direct, &straight)
        .context("the excluded outbound port")?;
    for (skipped, result) in [(&plain, &plain_result), (&legacy, &legacy_result)] {
        let server = server_addr(&result[0])?;
        let its_proxy = start_proxy(&skipped.netns, &skipped.proxy)?;
        let report = connect(
            &skipped.netns,
            &skipped.app,
            Identity::APP,
            &ConnectOptions::to(server).message("skipped"),
        )?;
        its_proxy
            .check_direct(server, &report)
            .with_context(|| format!("pod {}", skipped.name))?;
        assert!(attached_programs(skipped.cgroup.path())?.is_empty());
    }

    let metrics = agent.metrics()?;
    let skipped =
        |reason: &str| metrics.value("redirector_cni_pods_skipped_total", &[("reason", reason)]);
    assert_eq!(skipped("not_injected"), Some(1.0), "{metrics:?}");
    assert_eq!(skipped("istio_init"), Some(1.0));
    assert_eq!(skipped("excluded_namespace"), Some(0.0));
    let counts = setup.status()?.agent.context("no agent report")?.cni;
    assert_eq!(
        counts.skipped,
        [("istio_init".to_owned(), 1), ("not_injected".to_owned(), 1)]
            .into_iter()
            .collect()
    );
    assert!(counts.failed.is_empty(), "{counts:?}");
    let table = setup.redirector(&["status"])?.ensure_success()?.stdout;
    assert!(
        table.contains("passed through: not_injected 1, istio_init 1; ADD failed: none"),
        "{table}"
    );
    agent
        .process
        .wait_for_stderr_line(
            |line| line.contains("not_injected") && line.contains("plain"),
            WAIT,
        )
        .context("the agent logs which pod was passed through and why")?;

    for (pod, result) in [
        (&injected, &injected_result),
        (&plain, &plain_result),
        (&legacy, &legacy_result),
    ] {
        runtime.del(&pod.attachment(), &result[1])?;
    }
    assert!(setup.status()?.pods.is_empty());
    Ok(())
}

/// A pod whose annotations ask for TPROXY, or carry a malformed value, fails its own ADD with an
/// error naming the annotation and the value, and enrolls nothing; the next pod on the node is
/// enrolled as usual. The agent counts the failures by reason.
#[test]
fn a_refused_pod_fails_alone_and_the_next_pod_is_enrolled() -> Result<()> {
    let test = TestNode::new("cni-refused")?;
    let TestNode { setup, sandbox, .. } = &test;
    let agent = Agent::start(setup)?;
    let plugin = Plugin::new(&test)?;

    let cases: [(&str, &str, u32); 5] = [
        ("sidecar.istio.io/interceptionMode", "TPROXY", 2),
        ("traffic.sidecar.istio.io/kubevirtInterfaces", "net1", 2),
        ("traffic.sidecar.istio.io/excludeOutboundPorts", "5432,x", 7),
        (
            "traffic.sidecar.istio.io/excludeOutboundIPRanges",
            "10.0.0.0/33",
            7,
        ),
        ("sidecar.istio.io/status", "injected", 7),
    ];
    for (n, (key, value, code)) in cases.iter().enumerate() {
        let mut pod = test.pod(CgroupDriver::Cgroupfs, Qos::BestEffort, &format!("bad{n}"))?;
        pod.annotate(&[(key, Some(value))]);
        let annotations = json!({POD_ANNOTATIONS: pod.annotations});
        let config = plugin.config(
            "1.0.0",
            Some(&previous_result(&pod.netns)),
            json!({"runtimeConfig": annotations}),
        );
        let output = plugin.call("ADD", &pod.attachment().env(), &config)?;
        let error = cni_error(&output)?;
        assert_eq!(error.code, *code, "{key}={value}: {error:?}");
        let text = format!("{} {}", error.msg, error.details);
        assert!(
            text.contains(key) && text.contains(value),
            "{key}={value}: the error names neither: {error:?}"
        );
        assert!(setup.status()?.pods.is_empty(), "{key}={value}: enrolled");
        assert!(attached_programs(pod.cgroup.path())?.is_empty());
        assert_eq!(setup.state_files()?, Vec::<String>::new());
    }

    // The next pod on the node.
    let good = test.pod(CgroupDriver::Cgroupfs, Qos::BestEffort, "good")?;
    let config = plugin.config("1.0.0", Some(&previous_result(&good.netns)), json!({}));
    plugin
        .call("ADD", &good.attachment().env(), &config)?
        .ensure_success()?;
    let status = setup.status()?;
    assert!(status.pod_by_uid(&good.uid).is_some(), "{status:?}");
    assert_eq!(status.pods.len(), 1);
    assert_eq!(
        files_below(&sandbox.root().join("pods"))?.len(),
        11,
        "the good pod's links only (8 on every pod's cgroup, bind4/6 and sk_lookup for inbound)"
    );

    let metrics = agent.metrics()?;
    let failed =
        |reason: &str| metrics.value("redirector_cni_adds_failed_total", &[("reason", reason)]);
    assert_eq!(failed("unsupported"), Some(2.0), "{metrics:?}");
    assert_eq!(failed("bad_annotation"), Some(3.0));
    assert_eq!(failed("no_annotations"), Some(0.0));
    Ok(())
}

/// A DEL leaves the pod's policy sets for one walk of the maps later (each DEL walked every
/// pod's sets, with the node's lock held, so DELs slowed down with the pods on the node). The
/// same pod added again before that walk (here: never, within the test) gets exactly its new
/// policy, and the maps hold that policy's sets only. A restarted agent's walk (after one that
/// stopped before its walk) and the agent's own walk after a DEL leave no set behind.
#[test]
fn a_pod_added_again_right_after_its_del_has_only_its_new_policy() -> Result<()> {
    const NEVER: &str = "3600000";
    let test = TestNode::new("cni-readd")?;
    let mut agent = Agent::start_with(&test.setup, &["--sweep-delay-ms", NEVER])?;
    let plugin = Plugin::new(&test)?;
    let maps = test.sandbox.root().join("maps");
    let sets_held = || -> Result<usize> {
        let mut held = 0;
        for map in ["OWNERS", "PORTS", "POD_ADDRS"] {
            held += pinned_map_entries(&maps.join(map))?;
        }
        Ok(held)
    };
    let mut pod = test.pod(CgroupDriver::Cgroupfs, Qos::BestEffort, "readd")?;
    let add = |pod: &mut KubePod, port: &str| -> Result<Value> {
        pod.annotate(&[("traffic.sidecar.istio.io/excludeOutboundPorts", Some(port))]);
        let annotations = json!({POD_ANNOTATIONS: pod.annotations});
        let config = plugin.config(
            "1.0.0",
            Some(&previous_result(&pod.netns)),
            json!({"runtimeConfig": annotations}),
        );
        plugin
            .call("ADD", &pod.attachment().env(), &config)?
            .ensure_success()?;
        let status = test.setup.status()?;
        let held = status.pod_by_uid(&pod.uid).context("the pod")?;
        assert_eq!(
            ports_in(held, "outbound_exclude"),
            [port],
            "{:?}",
            held.ports
        );
        Ok(config)
    };
    let del = |pod: &KubePod, config: &Value| -> Result<()> {
        plugin
            .call("DEL", &pod.attachment().env(), config)?
            .ensure_success()?;
        ensure!(test.setup.status()?.pods.is_empty(), "enrolled after DEL");
        Ok(())
    };

    let config = add(&mut pod, "5432")?;
    let one_policy = sets_held()?;
    del(&pod, &config)?;
    assert_eq!(sets_held()?, one_policy, "the DEL left the sets for later");
    let config = add(&mut pod, "6379")?;
    assert_eq!(
        sets_held()?,
        one_policy,
        "sets of the pod's first policy left"
    );
    del(&pod, &config)?;
    agent.restart(|| Ok(()))?;
    assert_eq!(sets_held()?, 0, "left after the restarted agent's walk");

    drop(agent);
    let _agent = Agent::start_with(&test.setup, &["--sweep-delay-ms", "100"])?;
    let config = add(&mut pod, "5432")?;
    del(&pod, &config)?;
    wait_for(
        "the agent's walk after the DEL",
        Duration::from_secs(10),
        || Ok((sets_held()? == 0).then_some(())),
    )
}

/// The agent holds a few descriptors for each pod it follows. Started with a soft limit on open
/// files that a node's pods outgrow (runtimes commonly give containers 1024; here 64 and 24
/// pods), it raises the limit to the hard one and enrolls every pod.
#[test]
fn an_agent_started_with_a_low_limit_on_open_files_enrolls_every_pod() -> Result<()> {
    const PODS: usize = 24;
    let test = TestNode::new("cni-nofile")?;
    let agent = Agent::start_with_open_files(&test.setup, 64)?;
    let plugin = Plugin::new(&test)?;
    let mut pods = Vec::new();
    for n in 0..PODS {
        let pod = test.pod(
            CgroupDriver::Cgroupfs,
            Qos::BestEffort,
            &format!("nofile{n}"),
        )?;
        let config = plugin.config("1.0.0", Some(&previous_result(&pod.netns)), json!({}));
        plugin
            .call("ADD", &pod.attachment().env(), &config)
            .and_then(|output| output.ensure_success())
            .with_context(|| format!("ADD of pod {n} of {PODS}"))?;
        pods.push(pod);
    }
    assert_eq!(test.setup.status()?.pods.len(), PODS);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", agent.process.pid()))?;
    let open_files: Vec<&str> = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .context("no open files limit")?
        .split_whitespace()
        .collect();
    assert_eq!(
        open_files[3], open_files[4],
        "soft limit not raised: {limits}"
    );
    Ok(())
}

/// With no annotations from the runtime (a runtime without the capability, or an entry that
/// does not declare it), ADD fails with "try again later", says why and what to do, enrolls
/// nothing and is counted; `podSelection: all` needs no annotations and captures every pod with
/// the node's policy, as before pod selection existed.
#[test]
fn without_annotations_add_is_retryable_and_counted_unless_every_pod_is_selected() -> Result<()> {
    let test = TestNode::new("cni-noannot")?;
    let setup = &test.setup;
    let agent = Agent::start(setup)?;
    let _server = test.server()?;
    let mut pod = test.pod(CgroupDriver::Cgroupfs, Qos::Burstable, "unannotated")?;
    pod.annotations = None;

    let undeclared = {
        let mut entry = test.redirector_entry(CgroupDriver::Cgroupfs);
        entry
            .as_object_mut()
            .context("entry")?
            .remove("capabilities");
        entry
    };
    for (entry, fix) in [
        (
            test.redirector_entry(CgroupDriver::Cgroupfs),
            "containerd 1.5",
        ),
        (undeclared, "install-cni"),
    ] {
        let (runtime, _) = test.bridge_network_with(entry)?;
        let bridge = &runtime.plugins()[0];
        let bridge_add = runtime.exec_plugin(bridge, "ADD", &pod.attachment(), None)?;
        let bridge_result: Value = serde_json::from_str(&bridge_add.ensure_success()?.stdout)?;
        let ours = &runtime.plugins()[1];
        let output = runtime.exec_plugin(ours, "ADD", &pod.attachment(), Some(&bridge_result))?;
        let error = cni_error(&output)?;
        assert_eq!(error.code, 11, "{error:?}");
        let text = format!("{} {}", error.msg, error.details);
        for words in ["no pod annotations", fix, "podSelection"] {
            assert!(text.contains(words), "no {words:?} in {error:?}");
        }
        assert!(setup.status()?.pods.is_empty());
        runtime
            .exec_plugin(bridge, "DEL", &pod.attachment(), Some(&bridge_result))?
            .ensure_success()?;
    }
    let metrics = agent.metrics()?;
    assert_eq!(
        metrics.value(
            "redirector_cni_adds_failed_total",
            &[("reason", "no_annotations")]
        ),
        Some(2.0),
        "{metrics:?}"
    );
    let counts = setup.status()?.agent.context("no agent report")?.cni;
    assert_eq!(counts.failed.get("no_annotations"), Some(&2));

    // podSelection all: the same pod, no annotations, captured with the node's policy.
    let mut all = test.redirector_entry(CgroupDriver::Cgroupfs);
    all["podSelection"] = "all".into();
    let (runtime, _) = test.bridge_network_with(all)?;
    let results = runtime.add(&pod.attachment())?;
    let status = setup.status()?;
    let held = status.pod_by_uid(&pod.uid).context("not enrolled")?;
    assert!(
        !held.attached.contains(&"inbound".to_owned()),
        "the node's default policy captures no inbound: {held:?}"
    );
    let server = server_addr(&results[0])?;
    let proxy = start_proxy(&pod.netns, &pod.proxy)?;
    let report = connect(
        &pod.netns,
        &pod.app,
        Identity::APP,
        &ConnectOptions::to(server).message("all"),
    )?;
    proxy.check_redirected(server, &report)?;
    runtime.del(&pod.attachment(), &results[1])?;
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
            "capabilities": {"io.kubernetes.cri.pod-annotations": true},
            "agentSocket": "/run/redirector/test.sock",
            "cgroupRoot": "/sys/fs/cgroup",
            "cgroupDriver": "cgroupfs",
            "skipNamespaces": ["kube-system"]
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

/// A primary CNI rewrites its network config when it restarts (Calico, Cilium, flannel) and
/// drops redirector's entry. The agent with `chain_cni` puts the entry back, without losing the
/// primary's own change, keeping the file's mode, whether the primary writes the file in place
/// or renames a new one over it; and `/readyz` says ready only while it is chained.
#[test]
fn the_agent_chains_again_after_the_primary_rewrites_its_config() -> Result<()> {
    let test = TestNode::new("rechain")?;
    let (bin_dir, conf_dir) = (
        test.scratch.path().join("bin"),
        test.scratch.path().join("net.d"),
    );
    std::fs::create_dir_all(&bin_dir)?;
    std::fs::create_dir_all(&conf_dir)?;
    let primary = |mtu: u32| {
        json!({
            "cniVersion": "1.0.0",
            "name": "k8s-pod-network",
            "plugins": [
                {"type": "bridge", "bridge": "cni0", "mtu": mtu,
                 "ipam": {"type": "host-local", "subnet": "10.88.0.0/16"}},
                {"type": "portmap", "capabilities": {"portMappings": true}}
            ]
        })
    };
    let path = conf_dir.join("10-primary.conflist");
    std::fs::write(&path, serde_json::to_string_pretty(&primary(1500))?)?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o640))?;
    let config = test.scratch.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "cni_bin_dir = {:?}\ncni_conf_dir = {:?}\nchain_cni = true\ncgroup_driver = \"cgroupfs\"\n",
            bin_dir.display().to_string(),
            conf_dir.display().to_string()
        ),
    )?;
    let config = config.display().to_string();
    let agent = Agent::start_with(&test.setup, &["--config", &config])?;

    // Chained as the primary wrote it: the primary's plugins first, redirector-cni last.
    let chained_with = |mtu: u32| -> Result<Option<()>> {
        let now: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
        let plugins = now["plugins"].as_array().context("no plugins")?;
        Ok((plugins.len() == 3
            && plugins[..2] == primary(mtu)["plugins"].as_array().context("no plugins")?[..]
            && plugins[2]["type"] == "redirector-cni")
            .then_some(()))
    };
    wait_for("the agent to chain redirector-cni", WAIT, || {
        chained_with(1500)
    })?;
    type Rewrite = fn(&Path, &str) -> std::io::Result<()>;
    let rewrites: [(&str, u32, Rewrite); 2] = [
        ("in place", 1450, |path, text| std::fs::write(path, text)),
        ("by a rename over it", 1400, |path, text| {
            // Written outside the watched directory: only the rename itself is seen there.
            let new = path
                .parent()
                .and_then(Path::parent)
                .context("the conf dir has a parent")
                .map_err(std::io::Error::other)?
                .join("primary.conflist.new");
            std::fs::write(&new, text)?;
            std::fs::rename(&new, path)
        }),
    ];
    let mode = |path: &Path| -> Result<u32> {
        Ok(
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(path)?.permissions())
                & 0o777,
        )
    };
    for (how, mtu, rewrite) in rewrites {
        rewrite(&path, &serde_json::to_string_pretty(&primary(mtu))?)?;
        // The primary's mode: 640 kept by a write in place, the umask's by a new file.
        let written_mode = mode(&path)?;
        // Far below the agent's periodic resync (60 s): the change itself must wake it.
        wait_for(
            &format!("the agent to chain again after a rewrite {how}"),
            Duration::from_secs(10),
            || chained_with(mtu),
        )
        .with_context(|| agent.process.diagnostics())?;
        let chained_mode = mode(&path)?;
        ensure!(
            chained_mode == written_mode,
            "after a rewrite {how} the conflist's mode went from {written_mode:o} to {chained_mode:o}"
        );
    }
    let (ready, _) = redirector_tests::http_get(test.setup.metrics_addr, "/readyz")?;
    ensure!(
        ready == 200,
        "/readyz is {ready} while redirector-cni is chained"
    );
    agent.stop()?;
    Ok(())
}

/// The handshake map's occupancy is read from the programs' tally of the entries they make and
/// remove, which cannot see an entry it did not make (one an older build's programs left before
/// an upgrade in place); the agent's pass over the map, at start and on every reconcile,
/// corrects it. An entry written into the map from outside, as such a program leaves it, must be
/// counted by `status` once a restarted agent has made its first pass (from the tally alone it
/// reads 0), and the map's walk must not expire it (it was published just now).
#[test]
fn handshakes_the_programs_did_not_tally_are_counted_after_the_agent_walked_the_map() -> Result<()>
{
    let test = TestNode::new("tally")?;
    let mut agent = Agent::start(&test.setup)?;
    let before = test.setup.status()?.records;
    ensure!(
        before.in_flight == 0,
        "a new node has handshakes: {before:?}"
    );
    let map = test.setup.bpffs.join("maps").join("HANDSHAKES");
    agent.restart(|| write_untallied_handshake(&map))?;
    let after = test.setup.status()?.records;
    ensure!(
        after.in_flight == 1,
        "the entry the programs did not tally is not counted after the agent's pass: {after:?}"
    );
    Ok(())
}

/// One entry in the pinned handshake map `map`, published now (CLOCK_MONOTONIC) for a made-up
/// pod and client, as a program that keeps no tally leaves it.
fn write_untallied_handshake(map: &Path) -> Result<()> {
    let shown = PinnedMapInfo::read(map)?;
    let mut key = vec![0_u8; shown.number("bytes_key")? as usize];
    key[0] = 1; // pod 1, client 0.0.0.0:0
    let mut value = vec![0_u8; shown.number("bytes_value")? as usize];
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)?;
    let now_ns = Duration::from(now).as_nanos() as u64;
    value[..8].copy_from_slice(&now_ns.to_le_bytes());
    let hex = |bytes: &[u8]| -> Vec<String> { bytes.iter().map(|b| format!("{b:#04x}")).collect() };
    let mut command = Command::new("bpftool");
    command
        .args(["map", "update", "pinned"])
        .arg(map)
        .arg("key")
        .args(hex(&key))
        .arg("value")
        .args(hex(&value));
    run("bpftool", command, WAIT)?.ensure_success()?;
    Ok(())
}
