//! Self-tests of the harness and e2e-helper, without redirector: namespaces, veths, cgroups,
//! `e2e-helper exec/serve/connect`, and cleanup by the guards (also when a test panics).
//! Run as root: `cargo test -p redirector-tests --test harness -- --test-threads=1`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use redirector_tests::{
    client_result, spawn_in_pod, ConnectOptions, ConnectReport, Identity, Sandbox,
};

#[test]
fn pod_client_reaches_its_server_directly_without_redirector() -> Result<()> {
    let sandbox = Sandbox::new("harness-direct")?;
    let pod = sandbox.pod("app", 8080)?;

    let report = pod.connect(
        Identity::APP,
        &ConnectOptions::to(pod.server.addr).message("ping"),
    )?;
    let reply = report.server_reply()?;
    assert_eq!(report.peer, Some(pod.server.addr), "{report:?}");
    assert_eq!(
        report.local.map(|local| local.ip()),
        Some(pod.addr().into()),
        "{report:?}"
    );
    assert_eq!(
        reply.peer,
        report.local_addr()?,
        "the server sees the client itself"
    );
    assert_eq!(reply.local, pod.server.addr);
    assert_eq!(reply.line, "ping");

    // A refused connection is reported in the JSON, with exit status 0.
    let closed_port = std::net::SocketAddr::new(pod.server.addr.ip(), 8081);
    let refused = pod.connect(Identity::APP, &ConnectOptions::to(closed_port))?;
    assert_eq!(refused.peer, None, "{refused:?}");
    assert!(
        refused
            .error
            .as_deref()
            .is_some_and(|error| error.contains("refused")),
        "{refused:?}"
    );
    Ok(())
}

#[test]
fn exec_enters_cgroup_then_netns_then_identity() -> Result<()> {
    let sandbox = Sandbox::new("harness-exec")?;
    let pod = sandbox.pod("app", 8080)?;
    let script = "id -u; id -g; id -G; readlink /proc/self/ns/net; grep '^0::' /proc/self/cgroup";
    let shell = spawn_in_pod(
        &pod.netns,
        &pod.cgroup,
        Identity {
            uid: 1000,
            gid: 1337,
        },
        &["/bin/sh", "-c", script],
    )?;
    let output = shell.wait_exit(Duration::from_secs(10))?.ensure_success()?;
    let lines: Vec<&str> = output.stdout.lines().collect();

    let netns_inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(pod.netns.path())?);
    let cgroup_relative = pod
        .cgroup
        .path()
        .strip_prefix(redirector_tests::cgroup2_mount()?)?;
    let expected = [
        "1000".to_owned(),
        "1337".to_owned(),
        "1337".to_owned(), // no supplementary groups left
        format!("net:[{netns_inode}]"),
        format!("0::/{}", cgroup_relative.display()),
    ];
    assert_eq!(lines, expected, "stderr: {}", output.stderr);
    Ok(())
}

/// What a sandbox made, to check that it is all gone afterwards.
#[derive(Clone, Debug)]
struct Footprint {
    paths: Vec<PathBuf>,
    grandchild_pid: i32,
}

/// Builds a sandbox with a pod, a directory in the pin root and a background grandchild (no guard
/// of its own: only the cgroup cleanup can kill it), then runs `end` while everything is alive.
fn build_and_end(tag: &str, end: impl FnOnce(&Footprint)) -> Result<Footprint> {
    let sandbox = Sandbox::new(tag)?;
    let pod = sandbox.pod("app", 8080)?;
    let sibling = sandbox.cgroup("sibling")?;
    std::fs::create_dir_all(sandbox.root().join("leftover"))
        .context("creating a dir in the pin root")?;
    let shell = spawn_in_pod(
        &pod.netns,
        &sibling,
        Identity::APP,
        &["/bin/sh", "-c", "sleep 600 & echo $!; wait"],
    )?;
    let grandchild_pid = shell
        .wait_for_line(|_| true, Duration::from_secs(5))?
        .parse()?;
    let footprint = Footprint {
        paths: vec![
            sandbox.root().to_path_buf(),
            sandbox.cgroups.path().to_path_buf(),
            pod.netns.path(),
            pod.server_netns.path(),
        ],
        grandchild_pid,
    };
    assert!(
        footprint.paths.iter().all(|path| path.exists()),
        "{footprint:?}"
    );
    end(&footprint);
    Ok(footprint)
}

fn assert_all_gone(footprint: &Footprint) {
    for path in &footprint.paths {
        assert!(!path.exists(), "{} survived the cleanup", path.display());
    }
    // It may linger briefly as a zombie of init; it must not be running.
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", footprint.grandchild_pid))
        .unwrap_or_default();
    assert!(
        stat.is_empty() || stat.contains(") Z "),
        "grandchild still running: {stat}"
    );
}

#[test]
fn guards_remove_everything_on_drop() -> Result<()> {
    let footprint = build_and_end("harness-drop", |_| {})?;
    assert_all_gone(&footprint);
    Ok(())
}

#[test]
fn guards_remove_everything_when_the_test_panics() {
    let seen = std::sync::Mutex::new(None);
    let outcome = std::panic::catch_unwind(|| {
        build_and_end("harness-panic", |footprint| {
            *seen.lock().unwrap() = Some(footprint.clone());
            panic!("deliberate panic to exercise the guards");
        })
    });
    assert!(
        outcome.is_err(),
        "the closure was supposed to panic: {outcome:?}"
    );
    let footprint = seen
        .into_inner()
        .unwrap()
        .expect("the sandbox was built before the panic");
    assert_all_gone(&footprint);
}

#[test]
fn connect_counts_many_connections_in_a_summary() -> Result<()> {
    let sandbox = Sandbox::new("harness-count")?;
    let pod = sandbox.pod("app", 8080)?;
    let client = pod.spawn_client(
        &pod.cgroup,
        Identity::APP,
        &ConnectOptions::to(pod.server.addr).count(200),
    )?;
    let summary: redirector_tests::ConnectSummary =
        client_result(&client, Duration::from_secs(60))?;
    assert_eq!(
        (summary.ok, summary.failed, summary.first_error),
        (200, 0, None)
    );

    let held = pod.spawn_client(
        &pod.cgroup,
        Identity::APP,
        &ConnectOptions::to(pod.server.addr)
            .bind_port(40123)
            .hold_ms(300),
    )?;
    let report: ConnectReport = client_result(&held, Duration::from_secs(10))?;
    assert_eq!(
        report.local.map(|local| local.port()),
        Some(40123),
        "{report:?}"
    );
    Ok(())
}
