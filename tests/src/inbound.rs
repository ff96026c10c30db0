//! Inbound capture's fixtures: a pod with application servers on its own address, its peer
//! netns as the client, the istio-style inbound proxy, and checks of where a connection went.

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use crate::pod::{client_result, spawn_in_pod, Identity, Pod, Proxy, Sandbox, Server};
use crate::process::{binary, Child};
use crate::protocol::{
    ConnectOptions, ConnectOutcome, ConnectReport, ForwardEvent, PlannedConnect, Reached, Transport,
};
use crate::tools::wait_for_tcp_listener;

pub const APP_PORT: u16 = 9080;
pub const INBOUND_PORT: u16 = 15006;
pub const PASSTHROUGH: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6));
pub const MESSAGE: &str = "inbound";

/// A pod with application servers on its own address (kept running until dropped), and its
/// peer netns as the client.
pub struct InboundPod {
    pub pod: Pod,
    _apps: Vec<Server>,
}

impl InboundPod {
    pub fn create(sandbox: &Sandbox, name: &str, app_ports: &[u16]) -> Result<InboundPod> {
        let pod = sandbox.pod(name, 8080)?;
        let apps = app_ports
            .iter()
            .map(|&port| serve_in_pod(&pod, SocketAddr::new(pod.addr().into(), port)))
            .collect::<Result<_>>()?;
        Ok(InboundPod { pod, _apps: apps })
    }

    pub fn app_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.pod.addr().into(), port)
    }

    /// `redirector enroll --cgroup <pod> --netns <pod netns> FLAGS...`.
    pub fn enroll(&self, sandbox: &Sandbox, flags: &[&str]) -> Result<()> {
        let netns = self.pod.netns.path().display().to_string();
        let mut args = vec!["--netns", &netns];
        args.extend_from_slice(flags);
        sandbox.enroll_with(&self.pod.cgroup, &args).map(drop)
    }

    /// The istio-style inbound proxy: redirector-proxy on :15006, forwarding from 127.0.0.6.
    pub fn start_inbound_proxy(&self, listen: &[SocketAddr]) -> Result<Proxy> {
        let mut command = vec![
            binary("redirector-proxy")?.into_os_string(),
            "--inbound".into(),
        ];
        for addr in listen {
            command.extend(["--listen".into(), addr.to_string().into()]);
        }
        let process = spawn_in_pod(&self.pod.netns, &self.pod.cgroup, Identity::PROXY, &command)?;
        wait_for_tcp_listener(process.pid(), INBOUND_PORT, Duration::from_secs(5))
            .with_context(|| format!("inbound proxy not listening{}", process.diagnostics()))?;
        Ok(Proxy { process })
    }

    /// One connection from the client netns to `destination`.
    pub fn connect(&self, destination: SocketAddr) -> Result<ConnectReport> {
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
pub fn serve_in_pod(pod: &Pod, addr: SocketAddr) -> Result<Server> {
    Server::start(&pod.netns, &pod.cgroup, addr)
}

/// The connection reached the application through the inbound proxy: the proxy accepted it
/// with the client's requested address as original destination, and the application saw it
/// come from the passthrough source.
pub fn assert_captured(
    proxy: &Proxy,
    report: &ConnectReport,
    destination: SocketAddr,
    passthrough: IpAddr,
) -> Result<()> {
    let forward = proxy.forward_event(report.local_addr()?)?;
    assert_forwarded_inbound(&forward, report, destination, passthrough)
}

/// [`assert_captured`], given the proxy's forward event for the client's connection.
pub fn assert_forwarded_inbound(
    forward: &ForwardEvent,
    report: &ConnectReport,
    destination: SocketAddr,
    passthrough: IpAddr,
) -> Result<()> {
    let reply = report
        .server_reply()
        .with_context(|| format!("no reply through the proxy: {report:?}"))?;
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
pub fn assert_direct(
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

pub fn any_v4(port: u16) -> SocketAddr {
    SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port)
}

impl InboundPod {
    /// `e2e-helper listen --tag TAG --ports 15006 EXTRA...` in the pod as `identity`, until
    /// dropped: a stand-in for a proxy's inbound listener that answers with its tag.
    pub fn start_tagged_listener(
        &self,
        identity: Identity,
        tag: &str,
        extra: &[&str],
    ) -> Result<Child> {
        let mut command = vec![
            binary("e2e-helper")?.into_os_string(),
            "listen".into(),
            "--tag".into(),
            tag.into(),
            "--ports".into(),
            INBOUND_PORT.to_string().into(),
        ];
        command.extend(extra.iter().map(OsString::from));
        let listener = spawn_in_pod(&self.pod.netns, &self.pod.cgroup, identity, &command)?;
        listener.wait_for_line(|line| line == "listening", Duration::from_secs(10))?;
        Ok(listener)
    }

    /// `count` connects in turn from the client netns to `destination`: who answered each
    /// (tagged listeners), or how it failed.
    pub fn who_answers(&self, destination: SocketAddr, count: usize) -> Result<Vec<Reached>> {
        let plan = vec![
            PlannedConnect {
                to: destination,
                bind: None,
                transport: Transport::Tcp,
                source_port: None,
            };
            count
        ];
        let command = [
            binary("e2e-helper")?.into_os_string(),
            "connect-batch".into(),
            "--plan".into(),
            serde_json::to_string(&plan)?.into(),
        ];
        let output = spawn_in_pod(
            &self.pod.server_netns,
            &self.pod.server_cgroup,
            Identity::APP,
            &command,
        )?
        .wait_exit(Duration::from_secs(10) * (count as u32 + 1))?
        .ensure_success()?;
        output
            .stdout
            .lines()
            .map(|line| {
                let outcome: ConnectOutcome = serde_json::from_str(line)
                    .with_context(|| format!("connect-batch printed {line:?}"))?;
                Ok(outcome.reached)
            })
            .collect()
    }
}
