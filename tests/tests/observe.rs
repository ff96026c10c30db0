//! What a pod can observe of the capture (issue 13), where iptables REDIRECT sets the
//! standard: its own address on a captured socket and the client's address as the proxy sees
//! it, istio's IPv6 passthrough address appearing after enroll, and which listening sockets
//! receive captured inbound connections. Root only; fail, never skip.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use nix::sys::signal::Signal;
use redirector_tests::inbound::{
    assert_captured, serve_in_pod, InboundPod, APP_PORT, INBOUND_PORT,
};
use redirector_tests::{
    client_result, tcp_sockets, tcp_state, wait_for, ConnectOptions, ConnectReport, Identity,
    ListenerReply, Pod, Proxy, Reached, Sandbox, PROXY_PORT,
};

const SERVER_PORT: u16 = 8080;
const PASSTHROUGH_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6));
const PROXY_V4: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), PROXY_PORT);
const PROXY_V6: SocketAddr = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), PROXY_PORT);
/// How long the client holds its connection before sending, for the test to look at it.
const HOLD_MS: u64 = 1500;
const HOLD_WAIT: Duration = Duration::from_secs(10);
/// Connects per check of who answers inbound: enough for a reuseport group to spread them.
const ROUNDS: usize = 6;

/// One connection of the application to `server`, held open a moment: its report, and the
/// local port of the socket the pod's netns really holds towards the proxy meanwhile.
fn connect_and_find_real_port(
    pod: &Pod,
    server: SocketAddr,
    proxy_addr: SocketAddr,
) -> Result<(ConnectReport, u16)> {
    let client = pod.spawn_client(
        &pod.cgroup,
        Identity::APP,
        &ConnectOptions::to(server).hold_ms(HOLD_MS),
    )?;
    let real_port = wait_for("the client's connection to the proxy", HOLD_WAIT, || {
        Ok(tcp_sockets(client.pid())?
            .iter()
            .find(|socket| socket.remote == proxy_addr && socket.state == tcp_state::ESTABLISHED)
            .map(|socket| socket.local.port()))
    })?;
    let report = client_result(&client, HOLD_WAIT * 2)?;
    Ok((report, real_port))
}

/// The captured connection `report` reports the pod's own address `own` as its local address
/// (getsockname) with its real port, as after a REDIRECT; the proxy accepted it from that same
/// address and port (accept, getpeername), and its own upstream connection got `own` too.
fn assert_seen_from_own_address(
    proxy: &Proxy,
    report: &ConnectReport,
    real_port: u16,
    server: SocketAddr,
    own: IpAddr,
) -> Result<()> {
    let local = report.local_addr()?;
    ensure!(
        local == SocketAddr::new(own, real_port),
        "the captured socket's getsockname is {local}, not the pod's own address {own} with \
         the socket's real port {real_port}"
    );
    let forward = proxy.check_redirected(server, report)?;
    ensure!(
        forward.peer == local,
        "the proxy accepted the client from {}, not from {local}",
        forward.peer
    );
    ensure!(
        forward.upstream_local.ip() == own,
        "the proxy's own connection came from {}: {own} is not the direct source",
        forward.upstream_local
    );
    Ok(())
}

#[test]
fn a_captured_socket_reports_the_pods_own_address_and_the_proxy_sees_the_client_there() -> Result<()>
{
    let sandbox = Sandbox::new("own-address")?;
    let pod = sandbox.pod("own", SERVER_PORT)?;
    let netns = pod.netns.path().display().to_string();
    sandbox.enroll_with(&pod.cgroup, &["--netns", &netns, "--dual-stack"])?;
    let proxy = pod.start_proxy_on(&[PROXY_V4, PROXY_V6])?;

    let server = pod.server.addr;
    let (report, port) = connect_and_find_real_port(&pod, server, PROXY_V4)?;
    assert_seen_from_own_address(&proxy, &report, port, server, pod.addr().into())
        .context("IPv4")?;

    let server6 = pod.serve(SocketAddr::new(pod.veth.b_addr6.into(), SERVER_PORT))?;
    let (report, port) = connect_and_find_real_port(&pod, server6.addr, PROXY_V6)?;
    assert_seen_from_own_address(&proxy, &report, port, server6.addr, pod.addr6().into())
        .context("IPv6")?;

    // Exempt sockets keep what they really have (the proxy's own connection showed it).
    let direct = pod.connect(Identity::PROXY, &ConnectOptions::to(server))?;
    proxy.check_direct(server, &direct)?;
    Ok(())
}

#[test]
fn an_ipv6_passthrough_address_added_after_enroll_does_not_loop_the_proxy() -> Result<()> {
    let sandbox = Sandbox::new("late-passthrough")?;
    let pod = InboundPod::create(&sandbox, "late6", &[])?;
    let app6 = SocketAddr::new(pod.pod.addr6().into(), APP_PORT);
    let _app = serve_in_pod(&pod.pod, app6)?;
    pod.enroll(&sandbox, &["--dual-stack", "-b", "*"])?;
    // istio-init adds ::6 for the proxy's IPv6 passthrough; here it comes after enroll, when
    // the pod's addresses were read already.
    pod.pod
        .netns
        .run("ip", &["-6", "addr", "add", "::6/128", "dev", "lo"])?;
    let proxy =
        pod.start_inbound_proxy(&[SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), INBOUND_PORT)])?;

    // The proxy forwards from ::6 to the application: that connection is the pod's own, never
    // captured inbound, or it would go back to the proxy.
    let report = pod.connect(app6)?;
    let reached = assert_captured(&proxy, &report, app6, PASSTHROUGH_V6);
    let forwards = proxy.forward_events();
    let shown = &forwards[..forwards.len().min(3)];
    reached.with_context(|| {
        format!(
            "the proxy's forward from ::6 did not reach the application; the proxy saw {} \
             connections, the first: {shown:?}",
            forwards.len()
        )
    })?;
    ensure!(
        forwards.len() == 1,
        "the proxy saw {} connections for one client, the first: {shown:?}",
        forwards.len()
    );
    Ok(())
}

/// The tags of the listeners that answered, failing on any connect that was not answered.
fn answered_by(replies: &[Reached], destination: SocketAddr) -> Result<Vec<String>> {
    replies
        .iter()
        .map(|reached| match reached {
            Reached::Answered(ListenerReply { tag, local }) if *local == destination => {
                Ok(tag.clone())
            }
            other => anyhow::bail!("a connect to {destination} ended as {other:?}"),
        })
        .collect()
}

#[test]
fn inbound_keeps_reaching_a_group_of_listeners_when_some_close() -> Result<()> {
    let sandbox = Sandbox::new("listener-group")?;
    let pod = InboundPod::create(&sandbox, "group", &[])?;
    pod.enroll(&sandbox, &["-b", "*"])?;
    let app = pod.app_addr(APP_PORT);
    // Envoy's workers: one SO_REUSEPORT listener each on 15006, all of the proxy's UID.
    let reuseport = ["--reuseport"];
    let first = pod.start_tagged_listener(Identity::PROXY, "first", &reuseport)?;
    let second = pod.start_tagged_listener(Identity::PROXY, "second", &reuseport)?;
    for tag in answered_by(&pod.who_answers(app, ROUNDS)?, app)? {
        ensure!(["first", "second"].contains(&tag.as_str()), "{tag}");
    }

    // The one that listened last closes (a drain, a hot restart): the other keeps serving.
    second.signal(Signal::SIGKILL)?;
    second.wait_exit(Duration::from_secs(5))?;
    let tags = answered_by(&pod.who_answers(app, ROUNDS)?, app)
        .context("after the second listener closed")?;
    ensure!(tags.iter().all(|tag| tag == "first"), "{tags:?}");

    // A new one joins, and the first closes.
    let _third = pod.start_tagged_listener(Identity::PROXY, "third", &reuseport)?;
    first.signal(Signal::SIGKILL)?;
    first.wait_exit(Duration::from_secs(5))?;
    let tags = answered_by(&pod.who_answers(app, ROUNDS)?, app)
        .context("after the first listener closed")?;
    ensure!(tags.iter().all(|tag| tag == "third"), "{tags:?}");
    Ok(())
}

#[test]
fn a_process_that_is_not_the_proxy_never_receives_captured_inbound() -> Result<()> {
    let sandbox = Sandbox::new("not-the-proxy")?;
    let pod = InboundPod::create(&sandbox, "notproxy", &[])?;
    pod.enroll(&sandbox, &["-b", "*"])?;
    let app = pod.app_addr(APP_PORT);

    // The application listens on the inbound port, and no proxy does. (iptables' REDIRECT
    // would hand it the connections; redirector hands captured connections to the proxy's
    // owners only, so that no other process of the pod can pose as the proxy.) Refused.
    let squatter = pod.start_tagged_listener(Identity::APP, "app", &[])?;
    let replies = pod.who_answers(app, 1)?;
    ensure!(
        matches!(replies.as_slice(), [Reached::Failed(kind)] if kind == "refused"),
        "with only the application listening on {INBOUND_PORT}: {replies:?}"
    );
    drop(squatter);

    // The proxy listens, then the application does on the same port (another address): the
    // proxy keeps receiving the captured connections.
    let pod_addr = pod.pod.addr().to_string();
    let _proxy = pod.start_tagged_listener(Identity::PROXY, "proxy", &["--at", &pod_addr])?;
    let _squatter = pod.start_tagged_listener(Identity::APP, "app", &["--at", "127.0.0.1"])?;
    let tags = answered_by(&pod.who_answers(app, ROUNDS)?, app)?;
    ensure!(tags.iter().all(|tag| tag == "proxy"), "{tags:?}");
    Ok(())
}
