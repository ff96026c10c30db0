//! End-to-end tests of outbound interception, driving the built `redirector` and
//! `redirector-proxy` binaries. They need root and fail (never skip) without it:
//!
//! ```text
//! cargo build -p redirector --bins && cargo test -p redirector-tests -- --test-threads=1
//! ```
//!
//! Every test makes its own namespaces, veths, cgroups and bpffs pin root; the guards remove them
//! even when an assertion fails.

use std::ffi::OsString;
use std::path::Path;
use std::thread::sleep;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use nix::sys::signal::Signal;
use redirector_tests::{
    attached_programs, cgroup2_mount, cgroup_v1_mounts, client_result, files_below, nat_rules,
    redirector, wait_for, ConnectOptions, ConnectReport, ConnectSummary, ForwardEvent, Identity,
    Pod, Proxy, Sandbox, TempDir, PROXY_PORT,
};

const MESSAGE: &str = "hello from the app";

/// A pod with its server and proxy running, enrolled by a `redirector enroll` process that has
/// exited: interception has to keep working without it, which is checked here for every test.
fn enrolled_pod(sandbox: &Sandbox, name: &str, server_port: u16) -> Result<(Proxy, Pod)> {
    let pod = sandbox.pod(name, server_port)?;
    let proxy = pod.start_proxy()?;
    sandbox.enroll(&pod.cgroup)?;
    sandbox.ensure_no_redirector_running()?;
    Ok((proxy, pod))
}

/// The connection went client → proxy → original destination: returns the proxy's forward event.
/// The client's socket was connected to the proxy on loopback (its own address is loopback),
/// yet getpeername reports the original destination, as after an iptables REDIRECT.
fn assert_redirected(pod: &Pod, proxy: &Proxy, report: &ConnectReport) -> Result<ForwardEvent> {
    proxy.check_redirected(pod.server.addr, report)
}

/// The connection went straight to the server, and the proxy never saw it.
fn assert_direct(pod: &Pod, proxy: &Proxy, report: &ConnectReport) -> Result<()> {
    proxy.check_direct(pod.server.addr, report)
}

#[test]
fn redirects_outbound_connection_through_the_proxy() -> Result<()> {
    let sandbox = Sandbox::new("redirect")?;
    let (proxy, pod) = enrolled_pod(&sandbox, "app", 8080)?;
    ensure!(
        !attached_programs(pod.cgroup.path())?.is_empty(),
        "nothing attached to the enrolled cgroup"
    );

    let report = pod.connect(
        Identity::APP,
        &ConnectOptions::to(pod.server.addr).message(MESSAGE),
    )?;
    let forward = assert_redirected(&pod, &proxy, &report)?;
    assert_eq!(
        forward.peer,
        report.local_addr()?,
        "the proxy's peer is the client"
    );
    assert_eq!(
        report.server_reply()?.line,
        MESSAGE,
        "the server got the client's line"
    );

    let done = proxy.done_event(report.local_addr()?)?;
    assert_eq!(
        done.bytes_up,
        MESSAGE.len() as u64 + 1,
        "bytes client → server: {done:?}"
    );
    assert!(
        done.bytes_down > MESSAGE.len() as u64,
        "the reply echoes the line, so it is longer: {done:?}"
    );

    let status = sandbox.status()?;
    let pod_status = status
        .pod(pod.cgroup.id()?)
        .with_context(|| format!("pod not in status: {status:?}"))?;
    assert_eq!(
        (
            pod_status.proxy_port,
            pod_status.proxy_uids.as_slice(),
            pod_status.proxy_gids.as_slice()
        ),
        (PROXY_PORT, &[1337][..], &[1337][..]),
        "defaults: {pod_status:?}"
    );
    let counters = pod_status.counters;
    assert!(counters.redirected >= 1, "{counters:?}");
    assert!(counters.orig_dst_lookups >= 1, "{counters:?}");
    assert_eq!(counters.orig_dst_misses, 0, "{counters:?}");
    assert_eq!(
        nat_rules(&pod.netns)?,
        Vec::<String>::new(),
        "no iptables rule may exist in the pod"
    );
    Ok(())
}

#[test]
fn proxy_and_exempt_identities_are_not_redirected() -> Result<()> {
    let sandbox = Sandbox::new("no-loop")?;
    let (proxy, pod) = enrolled_pod(&sandbox, "app", 8080)?;
    let to_server = ConnectOptions::to(pod.server.addr);
    let initial = sandbox.counters(&pod.cgroup)?;

    // The proxy's own upstream connect (UID 1337) comes from the pod's address, not from loopback
    // through the proxy again, and counts as exempted.
    let redirected = pod.connect(Identity::APP, &to_server)?;
    let forward = assert_redirected(&pod, &proxy, &redirected)?;
    assert_eq!(
        forward.upstream_local.ip(),
        pod.addr(),
        "proxy upstream source: {forward:?}"
    );
    let after_proxy = sandbox.counters(&pod.cgroup)?;
    assert_eq!(
        after_proxy.redirected,
        initial.redirected + 1,
        "{initial:?} → {after_proxy:?}"
    );
    assert!(
        after_proxy.exempted > initial.exempted,
        "proxy upstream not exempted: {initial:?} → {after_proxy:?}"
    );

    let exempt_identities = [
        Identity::PROXY,
        Identity {
            uid: 1000,
            gid: 1337,
        },
    ];
    for identity in exempt_identities {
        let report = pod.connect(identity, &to_server)?;
        assert_direct(&pod, &proxy, &report)
            .with_context(|| format!("client running as {identity:?}"))?;
    }
    let last = sandbox.counters(&pod.cgroup)?;
    assert_eq!(
        last.redirected, after_proxy.redirected,
        "{after_proxy:?} → {last:?}"
    );
    assert!(
        last.exempted >= after_proxy.exempted + 2,
        "{after_proxy:?} → {last:?}"
    );
    assert_eq!(
        proxy.forward_events().len(),
        1,
        "only the app connection went through the proxy"
    );
    Ok(())
}

#[test]
fn two_pods_with_the_same_client_port_keep_their_own_destinations() -> Result<()> {
    const SHARED_CLIENT_PORT: u16 = 40123;
    let sandbox = Sandbox::new("two-pods")?;
    let pods = [
        enrolled_pod(&sandbox, "a", 8080)?,
        enrolled_pod(&sandbox, "b", 9090)?,
    ];

    // With both proxies stopped, both connections sit in the accept queues at the same time, so
    // their records (same client address in two pods) have to coexist in the maps.
    for (proxy, _) in &pods {
        proxy.process.signal(Signal::SIGSTOP)?;
    }
    let clients = pods
        .iter()
        .map(|(_, pod)| {
            let options = ConnectOptions::to(pod.server.addr)
                .bind_port(SHARED_CLIENT_PORT)
                .hold_ms(1500);
            pod.spawn_client(&pod.cgroup, Identity::APP, &options)
        })
        .collect::<Result<Vec<_>>>()?;
    sleep(Duration::from_millis(500));
    for (proxy, _) in &pods {
        proxy.process.signal(Signal::SIGCONT)?;
    }

    for ((proxy, pod), client) in pods.iter().zip(&clients) {
        let report: ConnectReport = client_result(client, Duration::from_secs(15))?;
        assert_eq!(
            report.local.map(|local| local.port()),
            Some(SHARED_CLIENT_PORT),
            "{report:?}"
        );
        assert_redirected(pod, proxy, &report)
            .with_context(|| format!("pod with server {}", pod.server.addr))?;
    }
    Ok(())
}

#[test]
fn unenrolled_pod_connects_directly() -> Result<()> {
    let sandbox = Sandbox::new("unenroll")?;
    let (proxy, pod) = enrolled_pod(&sandbox, "app", 8080)?;
    let to_server = ConnectOptions::to(pod.server.addr);
    ensure!(
        !attached_programs(pod.cgroup.path())?.is_empty(),
        "nothing attached to the enrolled cgroup"
    );
    let before = pod.connect(Identity::APP, &to_server)?;
    assert_redirected(&pod, &proxy, &before).context("while enrolled")?;

    sandbox.unenroll(&pod.cgroup)?.ensure_success()?;
    assert_eq!(
        attached_programs(pod.cgroup.path())?,
        Vec::<serde_json::Value>::new(),
        "attachments after unenroll"
    );
    let status = sandbox.status()?;
    assert!(
        status.pod(pod.cgroup.id()?).is_none(),
        "unenrolled pod still in status: {status:?}"
    );
    let after = pod.connect(Identity::APP, &to_server)?;
    assert_direct(&pod, &proxy, &after).context("after unenroll")?;

    sandbox
        .unenroll(&pod.cgroup)?
        .ensure_success()
        .context("unenroll is idempotent")?;
    Ok(())
}

#[test]
fn sibling_cgroup_that_is_not_enrolled_is_not_redirected() -> Result<()> {
    let sandbox = Sandbox::new("sibling")?;
    let (proxy, pod) = enrolled_pod(&sandbox, "app", 8080)?;
    let sibling = sandbox.cgroup("sibling")?;
    let to_server = ConnectOptions::to(pod.server.addr);

    let from_sibling = pod.connect_from(&sibling, Identity::APP, &to_server)?;
    assert_direct(&pod, &proxy, &from_sibling).context("from the sibling cgroup")?;
    assert_eq!(sandbox.counters(&pod.cgroup)?.redirected, 0);

    // Same netns, enrolled cgroup: intercepted, so the sibling's result is not for lack of setup.
    let from_pod = pod.connect(Identity::APP, &to_server)?;
    assert_redirected(&pod, &proxy, &from_pod).context("from the enrolled cgroup")?;
    Ok(())
}

/// An `enroll` that must be refused.
struct BadEnroll {
    problem: &'static str,
    args: Vec<OsString>,
    /// The error message has to contain one of these (compared in lower case).
    expected_words: &'static [&'static str],
}

fn enroll_args(cgroup: &Path, extra: &[&str]) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["enroll".into(), "--cgroup".into(), cgroup.into()];
    args.extend(extra.iter().map(OsString::from));
    args
}

#[test]
fn bad_enroll_inputs_fail_and_leave_nothing_behind() -> Result<()> {
    let sandbox = Sandbox::new("bad-inputs")?;
    let victim = sandbox.cgroup("victim")?;
    let scratch = TempDir::create("bad-inputs")?;
    let regular_file = scratch.path().join("regular-file");
    std::fs::write(&regular_file, "not a cgroup\n")?;
    let not_bpffs = TempDir::create("not-bpffs")?;
    let cgroup_v1 = cgroup_v1_mounts()?
        .into_iter()
        .next()
        .context("no cgroup v1 hierarchy is mounted here, so refusing one cannot be tested")?;
    let with_root = |mut args: Vec<OsString>| {
        args.extend(sandbox.node_args());
        args
    };
    let victim_with = |extra: &[&str]| with_root(enroll_args(victim.path(), extra));
    let with_bpffs = |root: &Path| {
        let mut args = enroll_args(victim.path(), &[]);
        args.extend([
            "--bpffs".into(),
            root.into(),
            "--pod-cgroup-root".into(),
            sandbox.cgroups.path().into(),
        ]);
        args
    };

    let cases = [
        BadEnroll {
            problem: "nonexistent cgroup",
            args: with_root(enroll_args(
                &sandbox.cgroups.path().join("no-such-pod"),
                &[],
            )),
            expected_words: &["no such", "not exist", "not found"],
        },
        // Only pods are enrolled: never the cgroup root or a node slice (issue 10).
        BadEnroll {
            problem: "the cgroup2 root",
            args: with_root(enroll_args(&cgroup2_mount()?, &[])),
            expected_words: &["not a pod cgroup"],
        },
        BadEnroll {
            problem: "the pods' parent (a node slice)",
            args: with_root(enroll_args(sandbox.cgroups.path(), &[])),
            expected_words: &["not a pod cgroup"],
        },
        BadEnroll {
            problem: "a cgroup outside the pod roots",
            args: {
                let mut args = enroll_args(victim.path(), &[]);
                args.extend(["--bpffs".into(), sandbox.root().into()]);
                args
            },
            expected_words: &["not a pod cgroup"],
        },
        BadEnroll {
            problem: "regular file",
            args: with_root(enroll_args(&regular_file, &[])),
            expected_words: &["not a directory", "not a cgroup"],
        },
        BadEnroll {
            problem: "regular file on cgroup2",
            args: with_root(enroll_args(&victim.path().join("cgroup.procs"), &[])),
            expected_words: &["not a directory", "not a cgroup"],
        },
        BadEnroll {
            problem: "cgroup v1 directory",
            args: with_root(enroll_args(&cgroup_v1, &[])),
            expected_words: &["cgroup v1", "cgroup v2", "cgroup2"],
        },
        BadEnroll {
            problem: "plain directory",
            args: with_root(enroll_args(scratch.path(), &[])),
            expected_words: &["cgroup v2", "cgroup2"],
        },
        BadEnroll {
            problem: "proxy port 0",
            args: victim_with(&["--proxy-port", "0"]),
            expected_words: &["port"],
        },
        BadEnroll {
            problem: "proxy port 70000",
            args: victim_with(&["--proxy-port", "70000"]),
            expected_words: &["port"],
        },
        BadEnroll {
            problem: "proxy uid abc",
            args: victim_with(&["--proxy-uid", "abc"]),
            expected_words: &["uid"],
        },
        BadEnroll {
            problem: "empty proxy uid",
            args: victim_with(&["--proxy-uid", ""]),
            expected_words: &["uid"],
        },
        BadEnroll {
            problem: "proxy gid xyz",
            args: victim_with(&["--proxy-gid", "xyz"]),
            expected_words: &["gid"],
        },
        // istio-iptables flags (issue 3): every malformed value or meaningless flag is refused.
        BadEnroll {
            problem: "include CIDR with a /33",
            args: victim_with(&["-i", "10.0.0.0/33"]),
            expected_words: &["cidr"],
        },
        BadEnroll {
            problem: "exclude CIDR that is not one",
            args: victim_with(&["-x", "10.0.0.0/8,nonsense"]),
            expected_words: &["cidr"],
        },
        BadEnroll {
            problem: "inbound capture port 70000",
            args: victim_with(&["-z", "70000"]),
            expected_words: &["port"],
        },
        BadEnroll {
            problem: "outbound port 0",
            args: victim_with(&["-q", "80,0"]),
            expected_words: &["port"],
        },
        BadEnroll {
            problem: "inbound port list that does not parse",
            args: victim_with(&["-b", "80,http"]),
            expected_words: &["port"],
        },
        BadEnroll {
            problem: "TPROXY mode",
            args: victim_with(&["-m", "TPROXY"]),
            expected_words: &["tproxy"],
        },
        BadEnroll {
            problem: "unknown mode",
            args: victim_with(&["-m", "MASQUERADE"]),
            expected_words: &["mode"],
        },
        BadEnroll {
            problem: "kube virt interfaces",
            args: victim_with(&["-k", "eth1"]),
            expected_words: &["kube-virt-interfaces"],
        },
        BadEnroll {
            problem: "exclude-everything CIDR",
            args: victim_with(&["-x", "*"]),
            expected_words: &["every destination"],
        },
        BadEnroll {
            problem: "network namespace that does not exist",
            args: victim_with(&["--netns", "/run/netns/rdt-no-such-netns"]),
            expected_words: &["network namespace"],
        },
        BadEnroll {
            problem: "network namespace path that is no namespace file",
            args: victim_with(&["--netns", "/proc/self/status"]),
            expected_words: &["not a namespace file"],
        },
        BadEnroll {
            problem: "namespace file of another kind",
            args: victim_with(&["--netns", "/proc/self/ns/mnt"]),
            expected_words: &["not a network namespace"],
        },
        BadEnroll {
            problem: "bpffs root on a non-bpf filesystem",
            args: with_bpffs(not_bpffs.path()),
            expected_words: &["bpffs", "bpf filesystem", "bpf fs"],
        },
        BadEnroll {
            problem: "bpffs root below a non-bpf filesystem",
            args: with_bpffs(&not_bpffs.path().join("xyz")),
            expected_words: &["bpffs", "bpf filesystem", "bpf fs"],
        },
        BadEnroll {
            problem: "inbound capture without a network namespace",
            args: victim_with(&["-b", "*"]),
            expected_words: &["--netns"],
        },
        BadEnroll {
            problem: "-o json (the output format is --output)",
            args: victim_with(&["-o", "json"]),
            expected_words: &["invalid port"],
        },
    ];

    let mut failures = Vec::new();
    for case in &cases {
        if let Err(error) = check_refused(case, &[sandbox.root(), not_bpffs.path()], victim.path())
        {
            failures.push(format!("{}: {error:#}", case.problem));
        }
    }
    assert!(
        failures.is_empty(),
        "bad inputs not handled:\n{}",
        failures.join("\n")
    );
    Ok(())
}

/// The enroll fails with a message naming the problem and leaves no pin under `pin_roots` and no
/// program attached to `victim`; so does its dry run (`-n`), which runs the same checks.
fn check_refused(case: &BadEnroll, pin_roots: &[&Path], victim: &Path) -> Result<()> {
    let mut dry_run = case.args.clone();
    dry_run.push("-n".into());
    for args in [&case.args, &dry_run] {
        let output = redirector(args)?;
        ensure!(!output.success(), "`{}` succeeded", output.command_line);
        let message = output.stderr.to_lowercase();
        ensure!(
            case.expected_words
                .iter()
                .any(|word| message.contains(word)),
            "`{}`: stderr names none of {:?}: {:?}",
            output.command_line,
            case.expected_words,
            output.stderr.trim()
        );
        for root in pin_roots {
            let pins = files_below(root)?;
            ensure!(pins.is_empty(), "left under {}: {pins:?}", root.display());
        }
        let programs = attached_programs(victim)?;
        ensure!(
            programs.is_empty(),
            "left attached to {}: {programs:?}",
            victim.display()
        );
    }
    Ok(())
}

/// A dry run refuses what the enroll would: inbound capture of an address another pod holds.
/// One that passes prints the policy the enroll then applies, and changes nothing.
#[test]
fn dry_run_refuses_what_enroll_refuses_and_passes_what_it_passes() -> Result<()> {
    let sandbox = Sandbox::new("dry-run")?;
    let owner = sandbox.pod("owner", 8080)?;
    let netns = owner.netns.path();
    let inbound = |cgroup: &Path, dry_run: bool| -> Result<redirector_tests::Output> {
        let mut args = enroll_args(cgroup, &["-b", "*", "--netns"]);
        args.push(netns.clone().into());
        args.extend(sandbox.node_args());
        if dry_run {
            args.extend(["-n".into(), "--output".into(), "json".into()]);
        }
        redirector(&args)
    };

    let checked = inbound(owner.cgroup.path(), true)?.ensure_success()?;
    ensure!(
        files_below(sandbox.root())?.is_empty(),
        "the dry run installed something"
    );
    let plan: serde_json::Value = serde_json::from_str(&checked.stdout)
        .with_context(|| format!("dry-run JSON: {}", checked.stdout))?;
    ensure!(
        plan["policy"]["inbound_ports_include"] == serde_json::json!({"all": true, "items": []})
            && plan["netns"] == serde_json::json!(netns)
            && plan["cgroup_id"] == serde_json::json!(owner.cgroup.id()?)
            && plan["ipv6_captured"].is_boolean()
            && plan["addresses"]
                .as_array()
                .is_some_and(|a| a.contains(&serde_json::json!(owner.addr().to_string()))),
        "{plan:#}"
    );
    inbound(owner.cgroup.path(), false)?.ensure_success()?;

    let intruder = sandbox.cgroup("intruder")?;
    for dry_run in [true, false] {
        let refused = inbound(intruder.path(), dry_run)?;
        ensure!(
            !refused.success() && refused.stderr.contains("already has inbound capture"),
            "{refused:?}"
        );
        ensure!(attached_programs(intruder.path())?.is_empty());
    }
    Ok(())
}

#[test]
fn ten_thousand_connections_leave_no_records() -> Result<()> {
    const CONNECTIONS: u32 = 10_000;
    let sandbox = Sandbox::new("many")?;
    let (proxy, pod) = enrolled_pod(&sandbox, "app", 8080)?;

    let client = pod.spawn_client(
        &pod.cgroup,
        Identity::APP,
        &ConnectOptions::to(pod.server.addr).count(CONNECTIONS),
    )?;
    let summary: ConnectSummary = client_result(&client, Duration::from_secs(300))?;
    assert_eq!(
        summary,
        ConnectSummary {
            ok: CONNECTIONS.into(),
            failed: 0,
            first_error: None
        },
        "proxy stderr: {:?}",
        proxy
            .process
            .stderr_lines()
            .iter()
            .rev()
            .take(5)
            .collect::<Vec<_>>()
    );

    assert_eq!(
        proxy.forward_events().len(),
        CONNECTIONS as usize,
        "forward events logged by the proxy"
    );

    // The last connections may still be closing.
    let drained = wait_for(
        "the connection records to drain",
        Duration::from_secs(5),
        || Ok((sandbox.status()?.records.in_flight == 0).then_some(())),
    );
    let status = sandbox.status()?;
    drained.with_context(|| format!("records left: {:?}", status.records))?;
    let counters = sandbox.counters(&pod.cgroup)?;
    assert!(counters.redirected >= CONNECTIONS.into(), "{counters:?}");
    assert_eq!(counters.orig_dst_misses, 0, "{counters:?}");
    Ok(())
}
