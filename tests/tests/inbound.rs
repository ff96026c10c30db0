//! End-to-end tests of inbound capture (issue 4): a client in another netns connects to the
//! pod's address; the connection must reach the application only through the proxy's
//! inbound listener, with the original destination kept. Root only; fail, never skip.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use nix::sys::signal::Signal;
use redirector_tests::inbound::{
    any_v4, assert_captured, assert_direct, serve_in_pod, InboundPod, APP_PORT, INBOUND_PORT,
    PASSTHROUGH,
};
use redirector_tests::{Haproxy, Sandbox};

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
    // `server 0.0.0.0:0` forwards to the connection's original destination; `source`
    // binds istio's passthrough address.
    let config = "global\n  maxconn 64\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 5s\n  timeout server 5s\n\
         frontend inbound\n  bind :15006\n  default_backend passthrough\n\
         backend passthrough\n  source 127.0.0.6\n  server original 0.0.0.0:0\n";
    let haproxy = Haproxy::start(&pod.pod.netns, &pod.pod.cgroup, config, INBOUND_PORT, None)?;

    let report = pod.connect(pod.app_addr(APP_PORT))?;
    let reply = report.server_reply().with_context(|| {
        format!(
            "no reply through HAProxy: {report:?}{}",
            haproxy.process.diagnostics()
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
