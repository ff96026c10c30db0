//! End-to-end tests of following a pod's address changes (issue 13): the agent enrolls a pod
//! with inbound capture, then an address is added to or removed from the pod's interface. An
//! added address must be captured inbound as iptables' PREROUTING would capture it (the proxy
//! sees the new address as the original destination); a removed one must leave the pod's
//! sets, so that another pod may take it. Root only; fail, never skip.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use nix::sys::signal::Signal;
use redirector_tests::agent::{Agent, AgentSetup};
use redirector_tests::inbound::{
    any_v4, assert_captured, serve_in_pod, InboundPod, APP_PORT, INBOUND_PORT, PASSTHROUGH,
};
use redirector_tests::names::TempDir;
use redirector_tests::process::wait_for;
use redirector_tests::protocol::PodStatus;
use redirector_tests::Sandbox;

/// How long the agent may take to follow a change (it acts within milliseconds; this bounds a
/// slow, shared machine).
const FOLLOW_TIMEOUT: Duration = Duration::from_secs(30);

/// One test's agent, on its sandbox. Fields drop in order: the agent first, then its files,
/// then the sandbox (which uninstalls).
struct Node {
    agent: Agent,
    _scratch: TempDir,
    sandbox: Sandbox,
}

impl Node {
    fn start(tag: &str) -> Result<Node> {
        let sandbox = Sandbox::new(tag)?;
        let scratch = TempDir::create(tag)?;
        let setup = AgentSetup::new(&sandbox, &scratch)?;
        Ok(Node {
            agent: start_agent(&setup)?,
            _scratch: scratch,
            sandbox,
        })
    }

    /// Stops the agent (SIGTERM: the pins stay), runs `while_stopped`, starts a new agent.
    fn restart(&mut self, while_stopped: impl FnOnce() -> Result<()>) -> Result<()> {
        self.agent.process.signal(Signal::SIGTERM)?;
        self.agent
            .process
            .wait_exit(Duration::from_secs(20))?
            .ensure_success()?;
        while_stopped()?;
        self.agent = start_agent(&self.agent.setup)?;
        Ok(())
    }

    /// `redirector enroll --cgroup POD --netns NETNS FLAGS...` through the agent.
    fn enroll(&self, pod: &InboundPod, flags: &[&str]) -> Result<()> {
        let cgroup = pod.pod.cgroup.path().display().to_string();
        let netns = pod.pod.netns.path().display().to_string();
        let mut args = vec!["enroll", "--cgroup", &cgroup, "--netns", &netns];
        args.extend_from_slice(flags);
        self.agent.setup.redirector(&args)?.ensure_success()?;
        Ok(())
    }

    /// Waits until the agent's status shows the pod as `done` says.
    fn wait_until(
        &self,
        pod: &InboundPod,
        what: &str,
        done: impl Fn(&PodStatus) -> bool,
    ) -> Result<PodStatus> {
        let cgroup_id = pod.pod.cgroup.id()?;
        wait_for(what, FOLLOW_TIMEOUT, || {
            let status = self.agent.setup.status()?;
            Ok(status.pod(cgroup_id).filter(|pod| done(pod)).cloned())
        })
        .with_context(|| self.agent.process.diagnostics().to_string())
    }
}

/// An agent with per-pod series in /metrics.
fn start_agent(setup: &AgentSetup) -> Result<Agent> {
    Agent::start_with(setup, &["--per-pod-metrics", "10"])
}

/// Another address of the pod's veth subnet (the client's netns reaches it on link).
fn extra_v4(pod: &InboundPod, last: u8) -> Ipv4Addr {
    let [a, b, c, _] = pod.pod.addr().octets();
    Ipv4Addr::new(a, b, c, last)
}

fn extra_v6(pod: &InboundPod, last: u16) -> Ipv6Addr {
    let mut segments = pod.pod.addr6().segments();
    segments[7] = last;
    Ipv6Addr::from(segments)
}

/// `ip addr add|del CIDR dev <veth> [nodad]` in the pod's netns.
fn change_address(pod: &InboundPod, verb: &str, cidr: &str) -> Result<()> {
    let mut args = vec!["addr", verb, cidr, "dev", pod.pod.veth.interface()];
    if verb == "add" && cidr.contains(':') {
        // Usable at once, without duplicate address detection.
        args.push("nodad");
    }
    pod.pod.netns.run("ip", &args).map(drop)
}

#[test]
fn an_ipv4_address_added_after_enroll_is_captured_inbound() -> Result<()> {
    let node = Node::start("addr-v4")?;
    let pod = InboundPod::create(&node.sandbox, "addr4", &[])?;
    node.enroll(&pod, &["-b", "*"])?;
    let proxy = pod.start_inbound_proxy(&[any_v4(INBOUND_PORT)])?;

    let added = extra_v4(&pod, 51);
    change_address(&pod, "add", &format!("{added}/24"))?;
    node.wait_until(&pod, "the added address to be followed", |status| {
        status.has_local_address(added.into()) && status.addresses_followed >= 1
    })?;
    let app = SocketAddr::new(added.into(), APP_PORT);
    let _app = serve_in_pod(&pod.pod, app)?;
    assert_captured(&proxy, &pod.connect(app)?, app, PASSTHROUGH)
        .context("inbound to the added address")
}

#[test]
fn an_ipv6_address_added_after_enroll_is_captured_inbound() -> Result<()> {
    let node = Node::start("addr-v6")?;
    let pod = InboundPod::create(&node.sandbox, "addr6", &[])?;
    // istio adds ::6 to lo for the IPv6 passthrough source.
    pod.pod
        .netns
        .run("ip", &["-6", "addr", "add", "::6/128", "dev", "lo"])?;
    node.enroll(&pod, &["--dual-stack", "-b", "*"])?;
    let proxy =
        pod.start_inbound_proxy(&[SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), INBOUND_PORT)])?;

    let added = extra_v6(&pod, 0x51);
    change_address(&pod, "add", &format!("{added}/64"))?;
    node.wait_until(&pod, "the added address to be followed", |status| {
        status.has_local_address(added.into()) && status.addresses_followed >= 1
    })?;
    let app = SocketAddr::new(added.into(), APP_PORT);
    let _app = serve_in_pod(&pod.pod, app)?;
    let passthrough6 = IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6));
    assert_captured(&proxy, &pod.connect(app)?, app, passthrough6)
        .context("inbound to the added IPv6 address")
}

/// A removed address leaves the pod's sets and its inbound claim: another pod that is given
/// it afterwards gets it followed (it would be refused as claimed otherwise) and captures
/// inbound to it with its own proxy. Each change is counted, in status and in /metrics.
#[test]
fn a_removed_address_leaves_the_pod_and_can_go_to_another_pod() -> Result<()> {
    let node = Node::start("addr-del")?;
    let first = InboundPod::create(&node.sandbox, "addrdel", &[])?;
    let second = InboundPod::create(&node.sandbox, "addrnew", &[])?;
    node.enroll(&first, &["-b", "*"])?;
    node.enroll(&second, &["-b", "*"])?;

    let moving = extra_v4(&first, 52);
    let cidr = format!("{moving}/32");
    change_address(&first, "add", &cidr)?;
    node.wait_until(&first, "the added address to be followed", |status| {
        status.has_local_address(moving.into()) && status.addresses_followed >= 1
    })?;
    change_address(&first, "del", &cidr)?;
    let status = node.wait_until(&first, "the removed address to be followed", |status| {
        !status.has_local_address(moving.into()) && status.addresses_followed >= 2
    })?;
    ensure!(
        status.has_local_address(first.pod.addr().into()),
        "the pod lost its own address: {status:?}"
    );

    // The second pod's client reaches the address over the second pod's veth.
    second.pod.server_netns.run(
        "ip",
        &["route", "add", &cidr, "dev", second.pod.veth.interface()],
    )?;
    change_address(&second, "add", &cidr)?;
    node.wait_until(&second, "the second pod to take the address", |status| {
        status.has_local_address(moving.into()) && status.addresses_followed >= 1
    })?;
    let proxy = second.start_inbound_proxy(&[any_v4(INBOUND_PORT)])?;
    let app = SocketAddr::new(moving.into(), APP_PORT);
    let _app = serve_in_pod(&second.pod, app)?;
    assert_captured(&proxy, &second.connect(app)?, app, PASSTHROUGH)
        .context("inbound to the address the first pod gave up")?;

    let table = node
        .agent
        .setup
        .redirector(&["status"])?
        .ensure_success()?
        .stdout;
    let first_cgroup = first.pod.cgroup.path().display().to_string();
    let row = table
        .lines()
        .find(|line| line.contains(&first_cgroup))
        .with_context(|| format!("no row for {first_cgroup} in:\n{table}"))?;
    ensure!(
        table
            .lines()
            .next()
            .is_some_and(|header| header.ends_with("ADDR-CHG"))
            && row.split_whitespace().last() == Some("2"),
        "addresses followed in the status table:\n{table}"
    );

    let first_id = first.pod.cgroup.id()?.to_string();
    let metrics = node.agent.metrics()?;
    let followed = metrics.value(
        "redirector_pod_addresses_followed_total",
        &[("cgroup_id", &first_id)],
    );
    ensure!(followed == Some(2.0), "per-pod series: {followed:?}");
    let total = metrics.value("redirector_addresses_followed_total", &[]);
    ensure!(total == Some(3.0), "node total: {total:?}");
    let failures = metrics.value("redirector_address_follow_failures_total", &[]);
    ensure!(failures == Some(0.0), "failures: {failures:?}");
    Ok(())
}

/// An address added while no agent runs is followed by the next agent when it adopts the pod.
#[test]
fn an_address_added_while_no_agent_runs_is_followed_at_adoption() -> Result<()> {
    let mut node = Node::start("addr-adopt")?;
    let pod = InboundPod::create(&node.sandbox, "addradopt", &[])?;
    node.enroll(&pod, &["-b", "*"])?;
    let added = extra_v4(&pod, 53);
    node.restart(|| change_address(&pod, "add", &format!("{added}/24")))?;
    node.wait_until(
        &pod,
        "the adopted pod's new address to be followed",
        |status| status.has_local_address(added.into()) && status.addresses_followed >= 1,
    )?;
    let proxy = pod.start_inbound_proxy(&[any_v4(INBOUND_PORT)])?;
    let app = SocketAddr::new(added.into(), APP_PORT);
    let _app = serve_in_pod(&pod.pod, app)?;
    assert_captured(&proxy, &pod.connect(app)?, app, PASSTHROUGH)
        .context("inbound to the address added while no agent ran")
}

/// An address another pod holds cannot be followed (pod addresses are unique on a node): the
/// failure is logged with the pod named and counted, the pod keeps its previous addresses,
/// and the agent goes on following (the address, once freed, is taken at the next change, or
/// at the next reconcile pass, which the test's agent does not run).
#[test]
fn an_address_another_pod_holds_is_refused_counted_and_followed_once_freed() -> Result<()> {
    let node = Node::start("addr-claim")?;
    let holder = InboundPod::create(&node.sandbox, "addrhold", &[])?;
    let taker = InboundPod::create(&node.sandbox, "addrtake", &[])?;
    node.enroll(&holder, &["-b", "*"])?;
    node.enroll(&taker, &["-b", "*"])?;
    let held = extra_v4(&holder, 54);
    let cidr = format!("{held}/32");
    change_address(&holder, "add", &cidr)?;
    node.wait_until(&holder, "the holder's address to be followed", |status| {
        status.has_local_address(held.into())
    })?;

    change_address(&taker, "add", &cidr)?;
    let taker_cgroup = taker.pod.cgroup.path().display().to_string();
    let logged = node.agent.process.wait_for_stderr_line(
        |line| {
            line.contains("following the pod's address change failed")
                && line.contains(&taker_cgroup)
        },
        FOLLOW_TIMEOUT,
    )?;
    ensure!(
        logged.contains("already has inbound capture for another pod"),
        "{logged}"
    );
    let status = node.agent.setup.status()?;
    let failures = status
        .agent
        .as_ref()
        .map(|agent| agent.address_follow_failures);
    ensure!(failures >= Some(1), "failures in status: {failures:?}");
    let taker_status = status
        .pod(taker.pod.cgroup.id()?)
        .context("the taker left status")?;
    ensure!(
        !taker_status.has_local_address(held.into())
            && taker_status.has_local_address(taker.pod.addr().into())
            && taker_status.addresses_followed == 0,
        "the taker's sets changed: {taker_status:?}"
    );

    // The holder gives the address up; the taker's next change takes it.
    change_address(&holder, "del", &cidr)?;
    node.wait_until(&holder, "the holder to give the address up", |status| {
        !status.has_local_address(held.into())
    })?;
    let other = extra_v4(&taker, 55);
    change_address(&taker, "add", &format!("{other}/32"))?;
    node.wait_until(&taker, "the taker to take both addresses", |status| {
        status.has_local_address(held.into()) && status.has_local_address(other.into())
    })?;
    Ok(())
}

/// The agent's threads that follow a pod's addresses (named `addrwatch`).
fn watch_threads(agent: &Agent) -> Result<usize> {
    let tasks = std::fs::read_dir(format!("/proc/{}/task", agent.process.pid()))?;
    let mut count = 0;
    for task in tasks {
        let comm = std::fs::read_to_string(task?.path().join("comm")).unwrap_or_default();
        count += usize::from(comm.trim() == "addrwatch");
    }
    Ok(count)
}

/// Unenrolling stops the pod's watch (its thread ends), so a later change cannot enroll the
/// pod again; enrolling again starts one watch, not a second.
#[test]
fn unenroll_stops_following_the_pod() -> Result<()> {
    let node = Node::start("addr-stop")?;
    let pod = InboundPod::create(&node.sandbox, "addrstop", &[])?;
    node.enroll(&pod, &["-b", "*"])?;
    node.enroll(&pod, &["-b", "9080"])?;
    let threads = |wanted: usize| {
        wait_for(
            &format!("{wanted} address watch thread(s) in the agent"),
            FOLLOW_TIMEOUT,
            || Ok((watch_threads(&node.agent)? == wanted).then_some(())),
        )
    };
    threads(1)?;
    let cgroup = pod.pod.cgroup.path().display().to_string();
    node.agent
        .setup
        .redirector(&["unenroll", "--cgroup", &cgroup])?
        .ensure_success()?;
    threads(0)?;
    change_address(&pod, "add", &format!("{}/24", extra_v4(&pod, 56)))?;
    let status = node.agent.setup.status()?;
    ensure!(status.pods.is_empty(), "enrolled again: {status:?}");
    Ok(())
}
