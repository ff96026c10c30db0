//! DNS over UDP (issue 13), end to end with a real resolver and real DNS servers from Debian:
//! the pod's resolv.conf names a nameserver (dnsmasq) in the server netns, and a DNS proxy
//! (dnsmasq as UID 1337 on 127.0.0.1:15053 and [::1]:15053, istio-agent's role) answers
//! `svc.test` with its own address and forwards every other name to that nameserver. Captured
//! queries must get the proxy's answer, seemingly from the server the application addressed.
//! Root only; fail, never skip.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{ensure, Context, Result};
use redirector_tests::dns::{
    dns_server, Dnsmasq, DnsmasqSettings, ResolvConf, Resolver, DNS_PORT, PROXY_DNS_PORT,
};
use redirector_tests::{
    udp_sockets, Agent, AgentSetup, Cgroup, Counters, DnsQueryOptions, DnsQueryReport, Identity,
    Pod, Sandbox, TempDir,
};

/// Answered by the nameserver with [`REAL_SVC`] and by the proxy with [`PROXIED_SVC`].
const SVC: &str = "svc.test";
const REAL_SVC: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 53, 0, 1));
const PROXIED_SVC: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 53, 0, 9));
/// Known to the nameserver only: the proxy forwards it there.
const FORWARDED: &str = "upstream-only.test";
const REAL_FORWARDED: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 53, 0, 2));
/// Another UDP port the nameserver's host answers DNS on: never captured.
const OTHER_PORT: u16 = 5353;
/// The short-lived sockets of the leak test, half of them connected.
const MANY_QUERIES: u32 = 10_000;

/// Which nameserver the pod's resolv.conf names.
#[derive(Clone, Copy)]
enum Listed {
    Ipv4,
    Ipv6,
}

/// A pod whose resolv.conf names the nameserver in its server netns, with its DNS proxy.
/// Fields drop in order: the processes before the pod's cgroups and namespaces.
struct DnsPod {
    proxy: Dnsmasq,
    nameserver: Dnsmasq,
    _other_port: Dnsmasq,
    resolv_conf: ResolvConf,
    /// A second address of the nameserver, in no resolv.conf and no --dns-servers.
    unlisted: IpAddr,
    pod: Pod,
}

impl DnsPod {
    fn create(sandbox: &Sandbox, name: &str, listed: Listed) -> Result<DnsPod> {
        let pod = sandbox.pod(name, 8080)?;
        let subnet = pod.veth.b_addr.octets();
        let unlisted = IpAddr::from([subnet[0], subnet[1], subnet[2], 3]);
        pod.add_server_address(unlisted)?;
        let records = |answer: IpAddr| vec![(SVC.to_owned(), answer)];
        let nameserver = Dnsmasq::start(
            &pod.server_netns,
            &pod.server_cgroup,
            Identity::ROOT,
            &DnsmasqSettings {
                port: DNS_PORT,
                listen: vec![pod.veth.b_addr.into(), unlisted, pod.veth.b_addr6.into()],
                records: [records(REAL_SVC), vec![(FORWARDED.into(), REAL_FORWARDED)]].concat(),
                upstream: None,
                log_queries: true,
            },
        )?;
        let other_port = Dnsmasq::start(
            &pod.server_netns,
            &pod.server_cgroup,
            Identity::ROOT,
            &DnsmasqSettings {
                port: OTHER_PORT,
                listen: vec![pod.veth.b_addr.into()],
                records: records(REAL_SVC),
                upstream: None,
                log_queries: false,
            },
        )?;
        // The proxy runs as the proxy's UID: its own forwards are exempt, as istio-agent's.
        let proxy = Dnsmasq::start(
            &pod.netns,
            &pod.cgroup,
            Identity::PROXY,
            &DnsmasqSettings {
                port: PROXY_DNS_PORT,
                listen: vec![
                    Ipv4Addr::LOCALHOST.into(),
                    std::net::Ipv6Addr::LOCALHOST.into(),
                ],
                records: records(PROXIED_SVC),
                upstream: Some(pod.veth.b_addr.into()),
                log_queries: true,
            },
        )?;
        let resolv_conf = ResolvConf::create(&[match listed {
            Listed::Ipv4 => pod.veth.b_addr.into(),
            Listed::Ipv6 => pod.veth.b_addr6.into(),
        }])?;
        Ok(DnsPod {
            proxy,
            nameserver,
            _other_port: other_port,
            resolv_conf,
            unlisted,
            pod,
        })
    }

    fn nameserver4(&self) -> IpAddr {
        self.pod.veth.b_addr.into()
    }

    fn nameserver6(&self) -> IpAddr {
        self.pod.veth.b_addr6.into()
    }

    fn enroll(&self, sandbox: &Sandbox, flags: &[&str]) -> Result<()> {
        sandbox
            .redirector(&self.pod.enroll_args(flags))?
            .ensure_success()
            .map(drop)
    }

    /// A process of the pod as `identity`, with the pod's resolv.conf.
    fn resolver(&self, identity: Identity) -> Resolver<'_> {
        self.resolver_in(&self.pod.cgroup, identity)
    }

    /// A process in this pod's netns but in `cgroup`.
    fn resolver_in<'a>(&'a self, cgroup: &'a Cgroup, identity: Identity) -> Resolver<'a> {
        Resolver {
            netns: &self.pod.netns,
            cgroup,
            identity,
            resolv_conf: &self.resolv_conf,
        }
    }

    /// The proxy logged a query for `name` of type A from `client`.
    fn ensure_proxy_asked(&self, name: &str, client: IpAddr) -> Result<()> {
        let line = format!("query[A] {name} from {client}");
        ensure!(
            !self.proxy.logged(&line).is_empty(),
            "the proxy never logged {line:?}: {:?}",
            self.proxy.process.stderr_lines()
        );
        Ok(())
    }
}

/// A single query's report: no error, the one answer `expected`, and the reply (and a
/// connected socket's peer) from `server` as addressed.
fn ensure_answered(
    report: &DnsQueryReport,
    options: &DnsQueryOptions,
    expected: IpAddr,
) -> Result<()> {
    ensure!(report.error.is_none(), "{options:?}: {report:?}");
    ensure!(
        report.answers == [expected],
        "{options:?}: answers {:?}, expected {expected}: {report:?}",
        report.answers
    );
    ensure!(
        report.source == Some(options.server),
        "{options:?}: the reply came from {:?}, not from the server asked: {report:?}",
        report.source
    );
    if options.connected {
        ensure!(
            report.peer == Some(options.server),
            "{options:?}: getpeername is {:?}, not the server asked: {report:?}",
            report.peer
        );
    }
    Ok(())
}

/// Both shapes of UDP client ask `server` for [`SVC`] and get `expected` from it.
fn ensure_both_shapes_answered(
    resolver: &Resolver,
    server: SocketAddr,
    expected: IpAddr,
) -> Result<Vec<DnsQueryReport>> {
    [
        DnsQueryOptions::new(server, SVC),
        DnsQueryOptions::new(server, SVC).connected(),
    ]
    .iter()
    .map(|options| {
        let report = resolver.query(options)?;
        ensure_answered(&report, options, expected)?;
        Ok(report)
    })
    .collect()
}

fn counters(sandbox: &Sandbox, pod: &DnsPod) -> Result<Counters> {
    sandbox.counters(&pod.pod.cgroup)
}

#[test]
fn glibc_resolves_through_the_dns_proxy_which_resolves_through_the_nameserver() -> Result<()> {
    let sandbox = Sandbox::new("dns-glibc")?;
    let pod = DnsPod::create(&sandbox, "dnsglibc", Listed::Ipv4)?;
    let nameserver = pod.nameserver4().to_string();
    pod.enroll(&sandbox, &["--redirect-dns", "--dns-servers", &nameserver])?;

    let app = pod.resolver(Identity::APP);
    app.ensure_resolves(SVC, PROXIED_SVC)
        .context("the application's lookup")?;
    pod.ensure_proxy_asked(SVC, Ipv4Addr::LOCALHOST.into())?;
    // A name the proxy does not know: it forwards it to the nameserver, as the proxy's UID,
    // which is exempt (no loop back to itself).
    app.ensure_resolves(FORWARDED, REAL_FORWARDED)
        .context("the forwarded lookup")?;
    pod.ensure_proxy_asked(FORWARDED, Ipv4Addr::LOCALHOST.into())?;
    let forwarded = format!("query[A] {FORWARDED} from {}", pod.pod.addr());
    ensure!(
        !pod.nameserver.logged(&forwarded).is_empty(),
        "the nameserver never logged {forwarded:?}: {:?}",
        pod.nameserver.process.stderr_lines()
    );
    // The proxy's own lookups go to the nameserver.
    pod.resolver(Identity::PROXY)
        .ensure_resolves(SVC, REAL_SVC)
        .context("the proxy UID's lookup")?;
    let counters = counters(&sandbox, &pod)?;
    ensure!(
        counters.dns_redirected >= 2 && counters.record_failed == 0,
        "{counters:?}"
    );
    Ok(())
}

#[test]
fn dig_and_both_shapes_of_udp_socket_get_the_proxys_answer_from_the_nameserver() -> Result<()> {
    let sandbox = Sandbox::new("dns-shapes")?;
    let pod = DnsPod::create(&sandbox, "dnsshapes", Listed::Ipv4)?;
    let nameserver = pod.nameserver4();
    pod.enroll(
        &sandbox,
        &["--redirect-dns", "--dns-servers", &nameserver.to_string()],
    )?;
    let app = pod.resolver(Identity::APP);

    for (tcp, transport) in [(false, "UDP"), (true, "TCP")] {
        let dig = app.dig(nameserver, SVC, tcp)?;
        ensure!(
            dig.answers == [PROXIED_SVC],
            "dig over {transport}: {dig:?}"
        );
        dig.ensure_from(nameserver, transport)?;
    }

    let [unconnected, connected] = <[DnsQueryReport; 2]>::try_from(ensure_both_shapes_answered(
        &app,
        dns_server(nameserver),
        PROXIED_SVC,
    )?)
    .expect("two shapes");
    // Each socket's own address is the one a direct query would have had: the wildcard for
    // the unconnected one, the pod's address for the connected one (not loopback).
    let own = |report: &DnsQueryReport| report.local.map(|local| local.ip());
    ensure!(
        own(&unconnected) == Some(Ipv4Addr::UNSPECIFIED.into()),
        "{unconnected:?}"
    );
    ensure!(
        own(&connected) == Some(pod.pod.addr().into()),
        "the connected socket's getsockname is not the pod's address: {connected:?}"
    );
    let counters = counters(&sandbox, &pod)?;
    ensure!(
        counters.dns_redirected >= 3 && counters.redirected >= 1,
        "dig's UDP query and the two sockets' count as DNS, dig's TCP one as a connection: {counters:?}"
    );
    Ok(())
}

#[test]
fn capture_all_dns_captures_a_server_not_in_resolv_conf_and_only_then() -> Result<()> {
    let sandbox = Sandbox::new("dns-all")?;
    let pod = DnsPod::create(&sandbox, "dnsall", Listed::Ipv4)?;
    let nameserver = pod.nameserver4().to_string();
    let app = pod.resolver(Identity::APP);
    let unlisted = dns_server(pod.unlisted);

    pod.enroll(&sandbox, &["--redirect-dns", "--dns-servers", &nameserver])?;
    let dig = app.dig(pod.unlisted, SVC, false)?;
    ensure!(
        dig.answers == [REAL_SVC],
        "without --capture-all-dns: {dig:?}"
    );
    ensure_both_shapes_answered(&app, unlisted, REAL_SVC).context("without --capture-all-dns")?;

    pod.enroll(
        &sandbox,
        &[
            "--redirect-dns",
            "--dns-servers",
            &nameserver,
            "--capture-all-dns",
        ],
    )?;
    let dig = app.dig(pod.unlisted, SVC, false)?;
    ensure!(
        dig.answers == [PROXIED_SVC],
        "with --capture-all-dns: {dig:?}"
    );
    dig.ensure_from(pod.unlisted, "UDP")?;
    ensure_both_shapes_answered(&app, unlisted, PROXIED_SVC).context("with --capture-all-dns")?;
    Ok(())
}

#[test]
fn an_ipv6_nameserver_and_an_ipv4_one_asked_through_a_mapped_address() -> Result<()> {
    let sandbox = Sandbox::new("dns-v6")?;
    let pod = DnsPod::create(&sandbox, "dnsv6", Listed::Ipv6)?;
    let (v4, v6) = (pod.nameserver4(), pod.nameserver6());
    pod.enroll(
        &sandbox,
        &[
            "--dual-stack",
            "--redirect-dns",
            "--dns-servers",
            &format!("{v4},{v6}"),
        ],
    )?;
    let app = pod.resolver(Identity::APP);

    app.ensure_resolves(SVC, PROXIED_SVC)
        .context("glibc over IPv6")?;
    pod.ensure_proxy_asked(SVC, std::net::Ipv6Addr::LOCALHOST.into())?;
    let reports = ensure_both_shapes_answered(&app, dns_server(v6), PROXIED_SVC)?;
    ensure!(
        reports[1].local.map(|local| local.ip()) == Some(pod.pod.addr6().into()),
        "the connected IPv6 socket's getsockname is not the pod's address: {reports:?}"
    );

    // A dual-stack socket asking the IPv4 nameserver as ::ffff:a.b.c.d follows the IPv4
    // decision, and sees the reply come from that mapped address.
    let IpAddr::V4(v4_addr) = v4 else {
        unreachable!("the nameserver's first address is IPv4")
    };
    let mapped = dns_server(v4_addr.to_ipv6_mapped());
    let reports = ensure_both_shapes_answered(&app, mapped, PROXIED_SVC)?;
    ensure!(
        reports[1].local.map(|local| local.ip()) == Some(pod.pod.addr().to_ipv6_mapped().into()),
        "{reports:?}"
    );

    ensure_both_shapes_answered(&pod.resolver(Identity::PROXY), dns_server(v6), REAL_SVC)
        .context("the proxy's own queries over IPv6")?;
    Ok(())
}

#[test]
fn udp_is_left_alone_without_dns_capture_on_other_ports_and_outside_enrolled_pods() -> Result<()> {
    let sandbox = Sandbox::new("dns-untouched")?;
    let pod = DnsPod::create(&sandbox, "dnsnone", Listed::Ipv4)?;
    let nameserver = dns_server(pod.nameserver4());
    let app = pod.resolver(Identity::APP);

    // Enrolled without --redirect-dns: no UDP hook is even attached, and connected UDP
    // sockets (decided in connect4) are left alone.
    pod.enroll(&sandbox, &[])?;
    let status = sandbox.status()?;
    let attached = &status
        .pod(pod.pod.cgroup.id()?)
        .context("the pod is not enrolled")?
        .attached;
    for hook in ["sendmsg4", "sendmsg6", "recvmsg4", "recvmsg6"] {
        ensure!(
            !attached.iter().any(|name| name == hook),
            "{hook} attached without DNS capture: {attached:?}"
        );
    }
    app.ensure_resolves(SVC, REAL_SVC)
        .context("without --redirect-dns")?;
    ensure_both_shapes_answered(&app, nameserver, REAL_SVC).context("without --redirect-dns")?;
    ensure!(
        counters(&sandbox, &pod)?.dns_redirected == 0,
        "{:?}",
        counters(&sandbox, &pod)?
    );

    // Capturing all DNS: still only port 53.
    pod.enroll(&sandbox, &["--redirect-dns", "--capture-all-dns"])?;
    app.ensure_resolves(SVC, PROXIED_SVC)
        .context("with --capture-all-dns")?;
    let other_port = SocketAddr::new(pod.nameserver4(), OTHER_PORT);
    ensure_both_shapes_answered(&app, other_port, REAL_SVC).context("UDP to another port")?;

    // A cgroup that is not enrolled, in the pod's netns.
    let outsider = sandbox.cgroup("dnsoutsider")?;
    let outside = pod.resolver_in(&outsider, Identity::APP);
    outside
        .ensure_resolves(SVC, REAL_SVC)
        .context("from a cgroup not enrolled")?;
    ensure_both_shapes_answered(&outside, nameserver, REAL_SVC)
        .context("from a cgroup not enrolled")?;

    let unenrolled = sandbox.unenroll(&pod.pod.cgroup)?;
    ensure!(unenrolled.success(), "{unenrolled:?}");
    app.ensure_resolves(SVC, REAL_SVC)
        .context("after unenroll")?;
    ensure_both_shapes_answered(&app, nameserver, REAL_SVC).context("after unenroll")?;
    Ok(())
}

#[test]
fn ten_thousand_queries_from_short_lived_sockets_leave_nothing_behind() -> Result<()> {
    let sandbox = Sandbox::new("dns-many")?;
    let scratch = TempDir::create("dns-many")?;
    let setup = AgentSetup::new(&sandbox, &scratch)?;
    let agent = Agent::start_with(&setup, &["--per-pod-metrics", "10"])?;
    let pod = DnsPod::create(&sandbox, "dnsmany", Listed::Ipv4)?;
    let nameserver = pod.nameserver4();
    setup
        .redirector(&pod.pod.enroll_args(&[
            "--redirect-dns",
            "--dns-servers",
            &nameserver.to_string(),
        ]))?
        .ensure_success()?;
    let id = pod.pod.cgroup.id()?;
    let dns_redirected = |status: &redirector_tests::Status| {
        status
            .pod(id)
            .map(|pod| pod.counters.dns_redirected)
            .with_context(|| format!("pod {id} not in {status:?}"))
    };
    let before = dns_redirected(&setup.status()?)?;
    let udp_before = udp_sockets(pod.proxy.process.pid())?;

    let app = pod.resolver(Identity::APP);
    for options in [
        DnsQueryOptions::new(dns_server(nameserver), SVC),
        DnsQueryOptions::new(dns_server(nameserver), SVC).connected(),
    ] {
        let options = options.repeat(MANY_QUERIES / 2, PROXIED_SVC);
        let summary = app.queries(&options)?;
        ensure!(
            summary.ok == u64::from(options.count) && summary.failed == 0,
            "{options:?}: {summary:?}"
        );
    }

    // One count per query (a datagram sent, or a UDP socket connected), as seen by the agent
    // and by reading the maps directly, and the same in /metrics.
    let through_agent = setup.status()?;
    let direct = sandbox.status()?;
    ensure!(
        dns_redirected(&through_agent)? - before == u64::from(MANY_QUERIES),
        "{:?}",
        through_agent.pod(id)
    );
    ensure!(
        dns_redirected(&direct)? == dns_redirected(&through_agent)?,
        "direct {:?}, through the agent {:?}",
        direct.pod(id),
        through_agent.pod(id)
    );
    let metrics = agent.metrics()?;
    let expected = dns_redirected(&direct)? as f64;
    for (name, labels) in [
        ("redirector_dns_redirected_total", vec![]),
        (
            "redirector_pod_dns_redirected_total",
            vec![("cgroup_id", id.to_string())],
        ),
    ] {
        let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        ensure!(
            metrics.value(name, &labels) == Some(expected),
            "{name}{labels:?} is {:?}, status says {expected}",
            metrics.value(name, &labels)
        );
    }

    // The records live in the sockets' storage: no map holds per-query state (the
    // handshake map is TCP's, and empty), and the sockets themselves are gone.
    for status in [&through_agent, &direct] {
        ensure!(
            status.records.in_flight == 0,
            "handshakes in flight: {:?}",
            status.records
        );
    }
    let udp_after = udp_sockets(pod.proxy.process.pid())?;
    ensure!(
        udp_after == udp_before,
        "UDP sockets in the pod's netns before the queries: {udp_before:?}, after: {udp_after:?}"
    );
    let counters = counters(&sandbox, &pod)?;
    ensure!(counters.record_failed == 0, "{counters:?}");
    Ok(())
}
