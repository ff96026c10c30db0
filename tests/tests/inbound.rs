//! End-to-end tests of inbound capture (issue 4): a client in another netns connects to the
//! pod's address; the connection must reach the application only through the proxy's
//! inbound listener, with the original destination kept. Root only; fail, never skip.

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use nix::sys::signal::Signal;
use redirector_tests::{
    binary, client_result, spawn_in_pod, Child, ConnectOptions, ConnectReport, Identity, Pod,
    Proxy, Sandbox, Server, TempDir,
};

const APP_PORT: u16 = 9080;
const INBOUND_PORT: u16 = 15006;
const PASSTHROUGH: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6));
const MESSAGE: &str = "inbound";

/// A pod with application servers on its own address (kept running until dropped), and its
/// peer netns as the client.
struct InboundPod {
    pod: Pod,
    _apps: Vec<Server>,
}

impl InboundPod {
    fn create(sandbox: &Sandbox, name: &str, app_ports: &[u16]) -> Result<InboundPod> {
        let pod = sandbox.pod(name, 8080)?;
        let apps = app_ports
            .iter()
            .map(|&port| serve_in_pod(&pod, SocketAddr::new(pod.addr().into(), port)))
            .collect::<Result<_>>()?;
        Ok(InboundPod { pod, _apps: apps })
    }

    fn app_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.pod.addr().into(), port)
    }

    /// `redirector enroll --cgroup <pod> --netns <pod netns> FLAGS...`.
    fn enroll(&self, sandbox: &Sandbox, flags: &[&str]) -> Result<()> {
        let netns = self.pod.netns.path().display().to_string();
        let mut args = vec!["--netns", &netns];
        args.extend_from_slice(flags);
        sandbox.enroll_with(&self.pod.cgroup, &args).map(drop)
    }

    /// The istio-style inbound proxy: redirector-proxy on :15006, forwarding from 127.0.0.6.
    fn start_inbound_proxy(&self, listen: &[SocketAddr]) -> Result<Proxy> {
        let mut command = vec![
            binary("redirector-proxy")?.into_os_string(),
            "--inbound".into(),
        ];
        for addr in listen {
            command.extend(["--listen".into(), addr.to_string().into()]);
        }
        let process = spawn_in_pod(&self.pod.netns, &self.pod.cgroup, Identity::PROXY, &command)?;
        redirector_tests::wait_for_tcp_listener(
            process.pid(),
            INBOUND_PORT,
            Duration::from_secs(5),
        )
        .with_context(|| format!("inbound proxy not listening{}", process.diagnostics()))?;
        Ok(Proxy { process })
    }

    /// One connection from the client netns to `destination`.
    fn connect(&self, destination: SocketAddr) -> Result<ConnectReport> {
        let mut command = vec![binary("e2e-helper")?.into_os_string(), "connect".into()];
        command.extend(
            ConnectOptions::to(destination)
                .message(MESSAGE)
                .to_args()
                .into_iter()
                .map(OsString::from),
        );
        let client = spawn_in_pod(
            &self.pod.server_netns,
            &self.pod.server_cgroup,
            Identity::APP,
            &command,
        )?;
        client_result(&client, Duration::from_secs(10))
    }
}

/// An echo server in the pod's netns and cgroup (the application), as UID 1000.
fn serve_in_pod(pod: &Pod, addr: SocketAddr) -> Result<Server> {
    let serve = [
        binary("e2e-helper")?.into_os_string(),
        "serve".into(),
        "--listen".into(),
        addr.to_string().into(),
    ];
    let process = spawn_in_pod(&pod.netns, &pod.cgroup, Identity::APP, &serve)?;
    process.wait_for_line(|line| line == "listening", Duration::from_secs(5))?;
    Ok(Server { addr, process })
}

/// The connection reached the application through the inbound proxy: the proxy accepted it
/// with the client's requested address as original destination, and the application saw it
/// come from the passthrough source.
fn assert_captured(
    proxy: &Proxy,
    report: &ConnectReport,
    destination: SocketAddr,
    passthrough: IpAddr,
) -> Result<()> {
    let reply = report
        .server_reply()
        .with_context(|| format!("no reply through the proxy: {report:?}"))?;
    let client = report.local_addr()?;
    let forward = proxy.forward_event(client)?;
    ensure!(
        forward.orig_dst == destination,
        "proxy's SO_ORIGINAL_DST {} is not {destination}",
        forward.orig_dst
    );
    ensure!(
        forward.local == destination,
        "proxy's accepted socket is local to {}, not {destination}",
        forward.local
    );
    ensure!(
        reply.local == destination,
        "the application answered on {} instead of {destination}",
        reply.local
    );
    ensure!(
        reply.peer.ip() == passthrough,
        "the application saw {} instead of the passthrough {passthrough}",
        reply.peer
    );
    ensure!(
        reply.peer == forward.upstream_local,
        "the application saw {} but the proxy connected from {}",
        reply.peer,
        forward.upstream_local
    );
    Ok(())
}

/// The connection reached the application directly, from the client.
fn assert_direct(
    proxy: Option<&Proxy>,
    report: &ConnectReport,
    destination: SocketAddr,
) -> Result<()> {
    let reply = report
        .server_reply()
        .with_context(|| format!("no reply: {report:?}"))?;
    let client = report.local_addr()?;
    ensure!(
        reply.peer == client,
        "the application saw {} instead of the client {client}",
        reply.peer
    );
    ensure!(
        reply.local == destination,
        "answered on {} instead of {destination}",
        reply.local
    );
    if let Some(proxy) = proxy {
        ensure!(
            proxy.forward_events().iter().all(|e| e.peer != client),
            "the proxy saw a direct connection"
        );
    }
    Ok(())
}

fn any_v4(port: u16) -> SocketAddr {
    SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port)
}

#[test]
fn inbound_connection_reaches_the_application_only_through_the_proxy() -> Result<()> {
    let sandbox = Sandbox::new("inbound")?;
    let pod = InboundPod::create(&sandbox, "in", &[APP_PORT])?;
    pod.enroll(&sandbox, &["-b", "*", "-d", "15090,15021,15020"])?;
    let proxy = pod.start_inbound_proxy(&[any_v4(INBOUND_PORT)])?;

    let report = pod.connect(pod.app_addr(APP_PORT))?;
    assert_captured(&proxy, &report, pod.app_addr(APP_PORT), PASSTHROUGH)?;
    let counters = sandbox.counters(&pod.pod.cgroup)?;
    ensure!(counters.inbound_captured >= 1, "{counters:?}");
    ensure!(
        counters.orig_dst_lookups >= 1 && counters.orig_dst_misses == 0,
        "SO_ORIGINAL_DST answered: {counters:?}"
    );
    ensure!(
        redirector_tests::nat_rules(&pod.pod.netns)?.is_empty(),
        "a nat rule appeared"
    );
    Ok(())
}

#[test]
fn excluded_and_unlisted_ports_stay_direct() -> Result<()> {
    let sandbox = Sandbox::new("inbound-ports")?;
    let pod = InboundPod::create(&sandbox, "inports", &[APP_PORT, 9090, 15021])?;
    pod.enroll(&sandbox, &["-b", "*", "-d", "9090"])?;
    let proxy = pod.start_inbound_proxy(&[any_v4(INBOUND_PORT)])?;

    assert_captured(
        &proxy,
        &pod.connect(pod.app_addr(APP_PORT))?,
        pod.app_addr(APP_PORT),
        PASSTHROUGH,
    )
    .context("9080 with -b '*'")?;
    assert_direct(
        Some(&proxy),
        &pod.connect(pod.app_addr(9090))?,
        pod.app_addr(9090),
    )
    .context("-d 9090")?;
    assert_direct(
        Some(&proxy),
        &pod.connect(pod.app_addr(15021))?,
        pod.app_addr(15021),
    )
    .context("15021 is never captured")?;

    pod.enroll(&sandbox, &["-b", "9080"])?;
    assert_captured(
        &proxy,
        &pod.connect(pod.app_addr(APP_PORT))?,
        pod.app_addr(APP_PORT),
        PASSTHROUGH,
    )
    .context("-b 9080")?;
    assert_direct(
        Some(&proxy),
        &pod.connect(pod.app_addr(9090))?,
        pod.app_addr(9090),
    )
    .context("9090 not in -b 9080")?;
    let counters = sandbox.counters(&pod.pod.cgroup)?;
    ensure!(counters.inbound_excluded >= 3, "{counters:?}");
    Ok(())
}

#[test]
fn without_a_proxy_the_connection_is_refused_at_once_or_fails_open() -> Result<()> {
    let sandbox = Sandbox::new("inbound-noproxy")?;
    let pod = InboundPod::create(&sandbox, "noproxy", &[APP_PORT])?;
    pod.enroll(&sandbox, &["-b", "*"])?;

    let started = Instant::now();
    let report = pod.connect(pod.app_addr(APP_PORT))?;
    let error = report
        .error
        .clone()
        .with_context(|| format!("the connection was not refused: {report:?}"))?;
    ensure!(
        error.to_lowercase().contains("refused"),
        "not a refusal: {error}"
    );
    // Bounded, not timed: a dropped SYN would have taken the client's full 3 s connect timeout.
    ensure!(
        started.elapsed() < Duration::from_secs(3),
        "the refusal took {:?}",
        started.elapsed()
    );
    ensure!(
        sandbox.counters(&pod.pod.cgroup)?.inbound_no_proxy >= 1,
        "not counted"
    );

    pod.enroll(&sandbox, &["-b", "*", "--inbound-fail-open"])?;
    assert_direct(
        None,
        &pod.connect(pod.app_addr(APP_PORT))?,
        pod.app_addr(APP_PORT),
    )
    .context("fail open")
}

#[test]
fn capture_follows_a_restarted_proxy_without_reenrolling() -> Result<()> {
    let sandbox = Sandbox::new("inbound-restart")?;
    let pod = InboundPod::create(&sandbox, "restart", &[APP_PORT])?;
    pod.enroll(&sandbox, &["-b", "*"])?;
    let first = pod.start_inbound_proxy(&[any_v4(INBOUND_PORT)])?;
    assert_captured(
        &first,
        &pod.connect(pod.app_addr(APP_PORT))?,
        pod.app_addr(APP_PORT),
        PASSTHROUGH,
    )
    .context("first proxy")?;

    first.process.signal(Signal::SIGKILL)?;
    first.process.wait_exit(Duration::from_secs(5))?;
    let report = pod.connect(pod.app_addr(APP_PORT))?;
    ensure!(
        report.error.is_some(),
        "captured with no proxy listening: {report:?}"
    );

    let second = pod.start_inbound_proxy(&[any_v4(INBOUND_PORT)])?;
    assert_captured(
        &second,
        &pod.connect(pod.app_addr(APP_PORT))?,
        pod.app_addr(APP_PORT),
        PASSTHROUGH,
    )
    .context("restarted proxy")
}

#[test]
fn ipv6_inbound_connection_is_captured() -> Result<()> {
    let sandbox = Sandbox::new("inbound-v6")?;
    let pod = InboundPod::create(&sandbox, "in6", &[])?;
    // istio adds ::6 to lo for the IPv6 passthrough source.
    let mut add = pod.pod.netns.command("ip");
    add.args(["-6", "addr", "add", "::6/128", "dev", "lo"]);
    redirector_tests::run("ip", add, Duration::from_secs(5))?.ensure_success()?;
    let app6 = SocketAddr::new(pod.pod.addr6().into(), APP_PORT);
    let _app = serve_in_pod(&pod.pod, app6)?;
    pod.enroll(&sandbox, &["--dual-stack", "-b", "*"])?;
    let proxy =
        pod.start_inbound_proxy(&[SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), INBOUND_PORT)])?;

    let passthrough6 = IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6));
    assert_captured(&proxy, &pod.connect(app6)?, app6, passthrough6)
}

#[test]
fn haproxy_works_unmodified_as_the_inbound_proxy() -> Result<()> {
    let sandbox = Sandbox::new("inbound-haproxy")?;
    let pod = InboundPod::create(&sandbox, "haproxy", &[APP_PORT])?;
    pod.enroll(&sandbox, &["-b", "*"])?;
    let config_dir = TempDir::create("haproxy")?;
    let config = config_dir.path().join("haproxy.cfg");
    // `server 0.0.0.0:0` forwards to the connection's original destination; `source`
    // binds istio's passthrough address.
    std::fs::write(
        &config,
        "global\n  maxconn 64\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 5s\n  timeout server 5s\n\
         frontend inbound\n  bind :15006\n  default_backend passthrough\n\
         backend passthrough\n  source 127.0.0.6\n  server original 0.0.0.0:0\n",
    )?;
    let haproxy = spawn_haproxy(&pod.pod, &config)?;

    let report = pod.connect(pod.app_addr(APP_PORT))?;
    let reply = report.server_reply().with_context(|| {
        format!(
            "no reply through HAProxy: {report:?}{}",
            haproxy.diagnostics()
        )
    })?;
    ensure!(
        reply.local == pod.app_addr(APP_PORT),
        "answered on {}",
        reply.local
    );
    ensure!(
        reply.peer.ip() == PASSTHROUGH,
        "the application saw {} instead of 127.0.0.6: HAProxy was bypassed",
        reply.peer
    );
    ensure!(
        sandbox.counters(&pod.pod.cgroup)?.inbound_captured >= 1,
        "not counted as captured"
    );
    Ok(())
}

fn spawn_haproxy(pod: &Pod, config: &Path) -> Result<Child> {
    let command = [
        OsString::from("/usr/sbin/haproxy"),
        "-db".into(),
        "-f".into(),
        config.as_os_str().to_owned(),
    ];
    let process = spawn_in_pod(&pod.netns, &pod.cgroup, Identity::PROXY, &command)?;
    redirector_tests::wait_for_tcp_listener(process.pid(), INBOUND_PORT, Duration::from_secs(5))
        .with_context(|| format!("HAProxy not listening{}", process.diagnostics()))?;
    Ok(process)
}

#[test]
fn two_pods_each_get_their_own_proxy() -> Result<()> {
    let sandbox = Sandbox::new("inbound-two")?;
    let first = InboundPod::create(&sandbox, "ina", &[APP_PORT])?;
    let second = InboundPod::create(&sandbox, "inb", &[APP_PORT])?;
    for pod in [&first, &second] {
        pod.enroll(&sandbox, &["-b", "*"])?;
    }
    let first_proxy = first.start_inbound_proxy(&[any_v4(INBOUND_PORT)])?;
    let second_proxy = second.start_inbound_proxy(&[any_v4(INBOUND_PORT)])?;

    for (pod, proxy, other) in [
        (&first, &first_proxy, &second_proxy),
        (&second, &second_proxy, &first_proxy),
    ] {
        let report = pod.connect(pod.app_addr(APP_PORT))?;
        assert_captured(proxy, &report, pod.app_addr(APP_PORT), PASSTHROUGH)?;
        let client = report.local_addr()?;
        ensure!(
            other.forward_events().iter().all(|e| e.peer != client),
            "the other pod's proxy saw it"
        );
    }
    Ok(())
}
