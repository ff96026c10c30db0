//! What the binaries print: e2e-helper's reports (written by the helper and read by the tests,
//! from the same types), redirector-proxy's events and `redirector status --output json`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Options of `e2e-helper connect`, shared by the helper (parsing) and the harness (building the
/// command line), so the two cannot drift apart.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct ConnectOptions {
    /// Destination address:port.
    #[arg(long)]
    pub to: SocketAddr,
    /// Bind this local port (with SO_REUSEADDR, on the unspecified address) before connecting.
    #[arg(long)]
    pub bind_port: Option<u16>,
    /// Line sent after connecting (a newline is appended).
    #[arg(long, default_value = "hello")]
    pub message: String,
    /// Number of sequential connections; more than 1 prints only a summary.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub count: u32,
    /// Pause between connecting and sending, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub hold_ms: u64,
    /// With --count: stop before the next connection once this file exists.
    #[arg(long)]
    pub stop_file: Option<std::path::PathBuf>,
    /// Send the line and close at once, without waiting for a reply (a log shipper, `nc -q0`).
    #[arg(long)]
    pub close_after_send: bool,
    /// Connect with TCP_FASTOPEN_CONNECT: with a cookie from an earlier connection, the line
    /// goes out with the SYN. The addresses are reported after the line is sent (getpeername
    /// fails with ENOTCONN before the SYN).
    #[arg(long)]
    pub fastopen: bool,
}

impl ConnectOptions {
    pub fn to(destination: SocketAddr) -> ConnectOptions {
        ConnectOptions {
            to: destination,
            bind_port: None,
            message: "hello".into(),
            count: 1,
            hold_ms: 0,
            stop_file: None,
            close_after_send: false,
            fastopen: false,
        }
    }

    pub fn bind_port(mut self, port: u16) -> Self {
        self.bind_port = Some(port);
        self
    }

    pub fn message(mut self, message: &str) -> Self {
        self.message = message.into();
        self
    }

    pub fn count(mut self, count: u32) -> Self {
        self.count = count;
        self
    }

    pub fn hold_ms(mut self, hold_ms: u64) -> Self {
        self.hold_ms = hold_ms;
        self
    }

    pub fn stop_file(mut self, file: &std::path::Path) -> Self {
        self.stop_file = Some(file.to_owned());
        self
    }

    pub fn close_after_send(mut self) -> Self {
        self.close_after_send = true;
        self
    }

    pub fn fastopen(mut self) -> Self {
        self.fastopen = true;
        self
    }

    /// The arguments after `e2e-helper connect` that parse back into `self`.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec!["--to".into(), self.to.to_string()];
        if let Some(port) = self.bind_port {
            args.extend(["--bind-port".into(), port.to_string()]);
        }
        args.extend([
            "--message".into(),
            self.message.clone(),
            "--count".into(),
            self.count.to_string(),
            "--hold-ms".into(),
            self.hold_ms.to_string(),
        ]);
        if let Some(file) = &self.stop_file {
            args.extend(["--stop-file".into(), file.display().to_string()]);
        }
        if self.close_after_send {
            args.push("--close-after-send".into());
        }
        if self.fastopen {
            args.push("--fastopen".into());
        }
        args
    }
}

/// Options of `e2e-helper connect-loop`: short connections one after another, each checked
/// where it ended up, until `count` or the stop file.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct ConnectLoopOptions {
    /// Destinations, taken round-robin: connection i goes to `to[i % to.len()]`.
    #[arg(long, value_delimiter = ',', required = true)]
    pub to: Vec<SocketAddr>,
    /// At most this many connections.
    #[arg(long)]
    pub count: u64,
    /// Stop before the next connection once this file exists.
    #[arg(long)]
    pub stop_file: std::path::PathBuf,
    /// Starts every line sent (`TAG INDEX`), which tells loops and connections apart.
    #[arg(long)]
    pub tag: String,
}

impl ConnectLoopOptions {
    /// The arguments after `e2e-helper connect-loop` that parse back into `self`.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = destinations_and_count(&self.to, self.count);
        args.extend([
            "--stop-file".into(),
            self.stop_file.display().to_string(),
            "--tag".into(),
            self.tag.clone(),
        ]);
        args
    }
}

/// `--to A,B,... --count N`, as `hold` and `connect-loop` take them.
fn destinations_and_count(to: &[SocketAddr], count: impl ToString) -> Vec<String> {
    let to: Vec<String> = to.iter().map(ToString::to_string).collect();
    vec![
        "--to".into(),
        to.join(","),
        "--count".into(),
        count.to_string(),
    ]
}

/// What went wrong with a connection of `e2e-helper connect-loop`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoopFault {
    /// The connection failed (connect, send or reply).
    Failed,
    /// It was answered, but not by its own destination, not with its own line, or its
    /// getpeername() was not its destination.
    Misdelivered,
}

/// One stdout line of `e2e-helper connect-loop` per connection that went wrong (the first
/// [`LoopSummary::REPORTED_INCIDENTS`]), with when it ran on CLOCK_MONOTONIC
/// ([`crate::monotonic_ms`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoopIncident {
    pub index: u64,
    pub to: SocketAddr,
    pub fault: LoopFault,
    pub detail: String,
    pub started_ms: u64,
    pub ended_ms: u64,
}

/// The last line `e2e-helper connect-loop` prints.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoopSummary {
    pub attempted: u64,
    pub ok: u64,
    pub failed: u64,
    pub misdelivered: u64,
    /// Incidents past [`LoopSummary::REPORTED_INCIDENTS`], counted but not printed.
    pub unreported: u64,
}

impl LoopSummary {
    /// Bounds the lines (and the reader's memory) when everything goes wrong.
    pub const REPORTED_INCIDENTS: u64 = 10_000;
}

/// Options of `e2e-helper connect-twice`: one socket bound to a fixed port connects twice.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct ConnectTwiceOptions {
    /// The local port both sockets bind (with SO_REUSEADDR, on 0.0.0.0).
    #[arg(long)]
    pub bind_port: u16,
    /// First connect another socket from the same port to this destination, exchange a line
    /// on it, and keep it open, so that a captured connect of the reused socket meets the same
    /// loopback 4-tuple.
    #[arg(long)]
    pub occupy: Option<SocketAddr>,
    /// The reused socket's first destination.
    #[arg(long)]
    pub first: SocketAddr,
    /// Its second destination, after the first connect ended (in failure, as a rule).
    #[arg(long)]
    pub second: SocketAddr,
    /// Reset the occupying connection (SO_LINGER 0, no TIME_WAIT) before the second connect,
    /// which frees its 4-tuple at once.
    #[arg(long)]
    pub release_before_second: bool,
    /// Line sent on the second connection (a newline is appended).
    #[arg(long, default_value = "second")]
    pub message: String,
}

impl ConnectTwiceOptions {
    /// The arguments after `e2e-helper connect-twice` that parse back into `self`.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec!["--bind-port".into(), self.bind_port.to_string()];
        if let Some(occupy) = self.occupy {
            args.extend(["--occupy".into(), occupy.to_string()]);
        }
        args.extend([
            "--first".into(),
            self.first.to_string(),
            "--second".into(),
            self.second.to_string(),
            "--message".into(),
            self.message.clone(),
        ]);
        if self.release_before_second {
            args.push("--release-before-second".into());
        }
        args
    }
}

/// What `e2e-helper connect-twice` prints.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnectTwiceReport {
    /// The occupying socket: its addresses and the reply to its line, which came before the
    /// reused socket connected.
    pub occupier: Option<ConnectReport>,
    /// How the reused socket's first connect ended: None if it connected.
    pub first_error: Option<String>,
    /// The errno of that failure, e.g. 99 (EADDRNOTAVAIL).
    pub first_errno: Option<i32>,
    /// The reused socket's second connect, line and reply.
    pub second: ConnectReport,
}

/// Options of `e2e-helper dns-query`: DNS queries (type A) over UDP, each from a new socket,
/// as a resolver makes them.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct DnsQueryOptions {
    /// The server, address:port (an IPv4-mapped IPv6 address asks an IPv4 server from an IPv6
    /// socket, as a dual-stack resolver does).
    #[arg(long)]
    pub server: SocketAddr,
    /// The name asked for.
    #[arg(long)]
    pub name: String,
    /// connect() the socket to the server, then send() and recvfrom(), as glibc's resolver
    /// does; without it, sendto() and recvfrom() on an unconnected socket.
    #[arg(long)]
    pub connected: bool,
    /// Queries, each from a new socket; more than 1 prints only a summary, in which a query
    /// is ok when the reply came from the server as addressed and has an answer; the first
    /// query that is not ends the run.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub count: u32,
    /// With --count: an answer every ok reply must have.
    #[arg(long)]
    pub expect: Option<IpAddr>,
}

impl DnsQueryOptions {
    pub fn new(server: SocketAddr, name: &str) -> DnsQueryOptions {
        DnsQueryOptions {
            server,
            name: name.into(),
            connected: false,
            count: 1,
            expect: None,
        }
    }

    pub fn connected(mut self) -> Self {
        self.connected = true;
        self
    }

    /// `count` queries, each counted ok only with `expect` among its answers.
    pub fn repeat(mut self, count: u32, expect: IpAddr) -> Self {
        self.count = count;
        self.expect = Some(expect);
        self
    }

    /// The arguments after `e2e-helper dns-query` that parse back into `self`.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            "--server".into(),
            self.server.to_string(),
            "--name".into(),
            self.name.clone(),
            "--count".into(),
            self.count.to_string(),
        ];
        if self.connected {
            args.push("--connected".into());
        }
        if let Some(expect) = self.expect {
            args.extend(["--expect".into(), expect.to_string()]);
        }
        args
    }
}

/// What `e2e-helper dns-query` prints for a single query.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsQueryReport {
    /// getsockname() once the query was sent.
    pub local: Option<SocketAddr>,
    /// getpeername() of a connected socket.
    pub peer: Option<SocketAddr>,
    /// Where the reply came from, as recvfrom() reported it.
    pub source: Option<SocketAddr>,
    /// The reply's A and AAAA answers.
    pub answers: Vec<IpAddr>,
    pub error: Option<String>,
}

/// Options of `e2e-helper hold`, shared by the helper and the harness.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct HoldOptions {
    /// Destinations, taken round-robin: connection i goes to `to[i % to.len()]`.
    #[arg(long, value_delimiter = ',', required = true)]
    pub to: Vec<SocketAddr>,
    /// Connections to open and keep open.
    #[arg(long)]
    pub count: u32,
    /// Once all are open, wait (at most --wait-s) for this file before checking and exchanging.
    #[arg(long)]
    pub go_file: std::path::PathBuf,
    /// Bound of each phase (connecting, waiting for the go file, exchanging), in seconds.
    #[arg(long, default_value_t = 60)]
    pub phase_s: u64,
    /// Start every connect at once without waiting for it (non-blocking) and report once all
    /// are started, so that they are all in their handshake together; they complete after the
    /// go file.
    #[arg(long)]
    pub in_handshake: bool,
}

impl HoldOptions {
    /// The arguments after `e2e-helper hold` that parse back into `self`.
    pub fn to_args(&self) -> Vec<String> {
        destinations_and_count(&self.to, self.count)
            .into_iter()
            .chain([
                "--go-file".into(),
                self.go_file.display().to_string(),
                "--phase-s".into(),
                self.phase_s.to_string(),
            ])
            .chain(self.in_handshake.then(|| "--in-handshake".into()))
            .collect()
    }
}

/// The line `e2e-helper hold` prints once its connections are open (or the phase ran out).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldOpened {
    pub opened: u64,
    pub failed: u64,
    pub first_error: Option<String>,
    pub connect_ms: u64,
}

/// A held connection whose getpeername() or reply was not its own destination's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldMismatch {
    pub index: u64,
    pub expected: SocketAddr,
    /// What was found instead: the getpeername() answer, or the reply, or the error.
    pub found: String,
}

/// The last line `e2e-helper hold` prints.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldReport {
    pub opened: HoldOpened,
    /// Connections whose getpeername() was not their own destination while all were open.
    pub wrong_peer: u64,
    /// Replies from the connection's own destination that carried its own line.
    pub replies_ok: u64,
    /// Replies from elsewhere or with another line, connections closed without a reply, and
    /// connections still waiting when the phase ran out.
    pub bad_replies: u64,
    /// Of `bad_replies`, the replies from another destination or carrying another line: bytes
    /// that reached someone else's destination.
    pub misdelivered: u64,
    /// Of `bad_replies`, the connects that failed (with `--in-handshake`, where they complete
    /// after the go file).
    pub connect_failed: u64,
    /// The first few of each kind, for the failure message.
    pub wrong_peer_examples: Vec<HeldMismatch>,
    pub bad_reply_examples: Vec<HeldMismatch>,
    pub check_ms: u64,
    pub exchange_ms: u64,
}

/// What `e2e-helper getsockopt` reports: one raw getsockopt() call on a socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetsockoptReport {
    /// 0 on success, the errno otherwise.
    pub errno: i32,
    /// The option length the call returned (unchanged on failure).
    pub optlen: u32,
    /// The first bytes of the answer (at most 64), on success.
    pub head: Vec<u8>,
}

/// What `e2e-helper istio-validation` reports: every connection its listeners accepted, in
/// order, with the original destination each one read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IstioValidationReport {
    /// A listener read the probe's address as a connection's original destination.
    pub passed: bool,
    pub accepted: Vec<ValidationAccept>,
    /// Connects the client made.
    pub attempts: u32,
    /// The client's last failure, if any.
    pub client_error: Option<String>,
}

/// One connection a validation listener accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidationAccept {
    /// The listener's address.
    pub listener: SocketAddr,
    pub peer: SocketAddr,
    /// getsockopt(SOL_IP, SO_ORIGINAL_DST)'s answer, or its error in `error`.
    pub orig_dst: Option<SocketAddr>,
    pub error: Option<String>,
}

/// What `e2e-helper peer-groups` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerGroupsReport {
    /// The supplementary groups the peer (this process, which made the socketpair) had.
    pub groups: Vec<u32>,
    /// getsockopt(SO_PEERGROUPS) with the buffer size asked for.
    pub call: GetsockoptReport,
    /// The groups that call returned (optlen / 4 of them), on success.
    pub returned: Vec<u32>,
}

/// The JSON line `e2e-helper serve` answers with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerReply {
    /// The connection's remote address as the server saw it.
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// The line the client sent, without its newline.
    pub line: String,
}

/// What `e2e-helper connect` prints for a single connection.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnectReport {
    /// getsockname() after connecting.
    pub local: Option<SocketAddr>,
    /// getpeername() after connecting: 127.0.0.1:<proxy port> when the connect was redirected.
    pub peer: Option<SocketAddr>,
    /// The server's reply parsed as JSON.
    pub reply: Option<Value>,
    pub error: Option<String>,
}

impl ConnectReport {
    /// The reply as the server's [`ServerReply`]; an error if the connection failed.
    pub fn server_reply(&self) -> Result<ServerReply> {
        if let Some(error) = &self.error {
            anyhow::bail!("connection failed: {error}");
        }
        let reply = self.reply.clone().context("connection has no reply")?;
        serde_json::from_value(reply).context("reply is not a server reply")
    }

    /// The local address, required for matching proxy events.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.local
            .with_context(|| format!("connection has no local address: {self:?}"))
    }
}

/// One connect of `e2e-helper connect-batch`: a destination, the local address to bind first
/// (port 0) or none, and how to reach it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PlannedConnect {
    pub to: SocketAddr,
    pub bind: Option<IpAddr>,
    #[serde(default)]
    pub transport: Transport,
    /// A UDP probe's source port (0.0.0.0 or :: when `bind` is none); the kernel picks one
    /// when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_port: Option<u16>,
}

/// How a planned connect reaches its destination.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// A TCP connection; the listener writes a line.
    #[default]
    Tcp,
    /// A datagram sent with sendto() from an unconnected UDP socket; the listener answers with
    /// one datagram, which must come from the destination as addressed.
    Udp,
    /// A datagram sent with send() after connect() on a UDP socket; getpeername() and the
    /// answer's source must both be the destination as addressed.
    UdpConnected,
}

impl Transport {
    /// The short name the parity table shows.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
            Transport::UdpConnected => "udp-c",
        }
    }
}

/// The JSON line `e2e-helper listen` writes to every connection it accepts (and, with
/// `--udp`, the datagram it answers every datagram with).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerReply {
    /// Which listener answered (the `--tag` it was started with).
    pub tag: String,
    /// The address the connection reached (getsockname of the accepted socket; a datagram's
    /// destination address, from IP_PKTINFO, and the listener's port).
    pub local: SocketAddr,
}

/// How a planned connect ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reached {
    Answered(ListenerReply),
    /// `refused`, `timeout`, `unreachable`, or the error's text.
    Failed(String),
}

/// One stdout line of `e2e-helper connect-batch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectOutcome {
    pub connect: PlannedConnect,
    pub reached: Reached,
}

/// What `e2e-helper connect --count N` (N > 1) prints.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectSummary {
    pub ok: u64,
    pub failed: u64,
    pub first_error: Option<String>,
}

/// One stdout line of `redirector-proxy`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ProxyEvent {
    Forward(ForwardEvent),
    Done(DoneEvent),
    NoOrigDst(NoOrigDstEvent),
}

/// The proxy accepted `peer`, learned `orig_dst` and connected upstream from `upstream_local`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ForwardEvent {
    pub peer: SocketAddr,
    /// The accepted socket's own address (for inbound capture, what the client asked for).
    pub local: SocketAddr,
    pub orig_dst: SocketAddr,
    pub upstream_local: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct DoneEvent {
    pub peer: SocketAddr,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// The proxy's SO_ORIGINAL_DST asked again once both directions finished: an address, or
    /// the error's text.
    pub orig_dst_at_end: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct NoOrigDstEvent {
    pub peer: SocketAddr,
    pub error: String,
}

/// `redirector status --output json`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Status {
    pub pods: Vec<PodStatus>,
    pub records: RecordCounts,
    /// The build whose programs are pinned (a digest of their object, in hex).
    pub programs_build: Option<String>,
    /// What the agent reports about itself; None when no agent answered.
    pub agent: Option<AgentReport>,
}

impl Status {
    /// The enrolled pod whose cgroup has this id.
    pub fn pod(&self, cgroup_id: u64) -> Option<&PodStatus> {
        self.pods.iter().find(|pod| pod.cgroup_id == cgroup_id)
    }

    /// The enrolled pod with this Kubernetes pod UID.
    pub fn pod_by_uid(&self, uid: &str) -> Option<&PodStatus> {
        self.pods
            .iter()
            .find(|pod| pod.pod.as_ref().is_some_and(|pod| pod.uid == uid))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PodStatus {
    pub cgroup: String,
    pub cgroup_id: u64,
    pub proxy_port: u16,
    pub proxy_uids: Vec<u32>,
    pub proxy_gids: Vec<u32>,
    /// Address prefixes with a rule, and the sets holding them.
    #[serde(default)]
    pub prefixes: Vec<LabelledEntry>,
    /// Ports with a rule, and the sets holding them.
    #[serde(default)]
    pub ports: Vec<LabelledEntry>,
    /// Hooks whose link is pinned.
    pub attached: Vec<String>,
    pub counters: Counters,
    /// Who the pod is, when the CNI plugin enrolled it.
    pub pod: Option<PodIdentity>,
    pub netns: Option<String>,
    pub attachment: Option<CniAttachment>,
    /// Times the agent enrolled the pod again because its addresses changed.
    #[serde(default)]
    pub addresses_followed: u64,
}

impl PodStatus {
    /// Whether `addr` is one of the pod's local addresses in its policy.
    pub fn has_local_address(&self, addr: std::net::IpAddr) -> bool {
        let host = match addr {
            std::net::IpAddr::V4(_) => format!("{addr}/32"),
            std::net::IpAddr::V6(_) => format!("{addr}/128"),
        };
        self.prefixes
            .iter()
            .any(|prefix| prefix.value == host && prefix.sets.iter().any(|set| set == "local"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PodIdentity {
    pub uid: String,
    pub namespace: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CniAttachment {
    pub network: String,
    pub container_id: String,
    pub ifname: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AgentReport {
    pub ready: bool,
    /// Why the last reconcile pass stopped (None once one succeeds).
    #[serde(default)]
    pub reconcile_error: Option<String>,
    /// Injected pods found running uncaptured and enrolled from the runtime since start.
    #[serde(default)]
    pub enrolled_from_runtime: u64,
    pub startup: Option<ReconcileReport>,
    pub collected_since: Vec<CollectedPod>,
    /// Pods the CNI plugin did not enroll, by reason.
    pub cni: CniCounts,
    /// Failures to follow a pod's address changes.
    #[serde(default)]
    pub address_follow_failures: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct CniCounts {
    /// Passed through uncaptured.
    pub skipped: BTreeMap<String, u64>,
    /// ADD failed.
    pub failed: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ReconcileReport {
    pub adopted: Vec<PodRef>,
    pub collected: Vec<CollectedPod>,
    /// Pods enrolled from the container runtime's sandboxes.
    #[serde(default)]
    pub enrolled: Vec<PodRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PodRef {
    pub cgroup_id: u64,
    pub cgroup: Option<String>,
    pub pod: Option<PodIdentity>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CollectedPod {
    #[serde(flatten)]
    pub pod: PodRef,
    pub reason: String,
}

/// One sample of a Prometheus text exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed `/metrics` page.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Metrics {
    pub samples: Vec<Sample>,
}

impl Metrics {
    /// Parses the Prometheus text format (comments skipped; every other line must be a sample).
    pub fn parse(text: &str) -> Result<Metrics> {
        let samples = text
            .lines()
            .filter(|line| !line.trim().is_empty() && !line.starts_with('#'))
            .map(|line| parse_sample(line).with_context(|| format!("metrics line {line:?}")))
            .collect::<Result<_>>()?;
        Ok(Metrics { samples })
    }

    /// The value of the sample `name` whose labels include `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|sample| {
                sample.name == name
                    && labels.iter().all(|(key, value)| {
                        sample.labels.get(*key).map(String::as_str) == Some(value)
                    })
            })
            .map(|sample| sample.value)
    }
}

fn parse_sample(line: &str) -> Result<Sample> {
    let (series, value) = line.rsplit_once(' ').context("no value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        number => number.parse().context("value is not a number")?,
    };
    let Some((name, rest)) = series.split_once('{') else {
        return Ok(Sample {
            name: series.to_owned(),
            labels: BTreeMap::new(),
            value,
        });
    };
    let mut labels = BTreeMap::new();
    let mut chars = rest
        .strip_suffix('}')
        .context("unclosed labels")?
        .chars()
        .peekable();
    while chars.peek().is_some() {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        anyhow::ensure!(chars.next() == Some('"'), "label {key} has no quoted value");
        let mut label_value = String::new();
        loop {
            match chars.next().context("unterminated label value")? {
                '"' => break,
                '\\' => match chars.next().context("dangling escape")? {
                    'n' => label_value.push('\n'),
                    other => label_value.push(other),
                },
                other => label_value.push(other),
            }
        }
        labels.insert(key, label_value);
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// A port or prefix of a pod's policy, as `redirector status --output json` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct LabelledEntry {
    pub value: String,
    pub sets: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Counters {
    pub redirected: u64,
    pub exempted: u64,
    pub orig_dst_lookups: u64,
    pub orig_dst_misses: u64,
    pub inbound_captured: u64,
    pub inbound_excluded: u64,
    pub inbound_no_proxy: u64,
    pub record_failed: u64,
    pub handshake_failed: u64,
    pub handoff_failed: u64,
    pub listener_failed: u64,
    pub dns_redirected: u64,
}

/// What the record maps hold: open connections keep their records in socket storage; only
/// handshakes in flight occupy the bounded handshake map.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct RecordCounts {
    pub in_flight: u64,
    pub capacity: u64,
    /// Captured connections whose record could not be kept for the proxy (the map was full).
    pub overflowed: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        options: ConnectOptions,
    }

    #[test]
    fn connect_options_round_trip_through_the_command_line() {
        let options = ConnectOptions::to("10.200.1.2:8080".parse().unwrap())
            .bind_port(40123)
            .message("two words")
            .count(3)
            .hold_ms(1500)
            .stop_file(std::path::Path::new("/tmp/stop here"))
            .close_after_send()
            .fastopen();
        let args = std::iter::once("e2e-helper".to_string()).chain(options.to_args());
        assert_eq!(Wrapper::parse_from(args).options, options);
    }

    #[test]
    fn connect_twice_hold_and_loop_options_round_trip_through_the_command_line() {
        #[derive(Parser)]
        struct Twice {
            #[command(flatten)]
            options: ConnectTwiceOptions,
        }
        #[derive(Parser)]
        struct Hold {
            #[command(flatten)]
            options: HoldOptions,
        }
        let twice = ConnectTwiceOptions {
            bind_port: 40100,
            occupy: Some("10.200.1.2:8080".parse().unwrap()),
            first: "10.200.1.2:8081".parse().unwrap(),
            second: "10.200.1.2:8083".parse().unwrap(),
            release_before_second: true,
            message: "two words".into(),
        };
        let args = std::iter::once("e2e-helper".to_string()).chain(twice.to_args());
        assert_eq!(Twice::parse_from(args).options, twice);
        let hold = HoldOptions {
            to: vec![
                "10.200.1.2:8080".parse().unwrap(),
                "10.200.1.2:8081".parse().unwrap(),
            ],
            count: 34_000,
            go_file: "/tmp/go here".into(),
            phase_s: 90,
            in_handshake: true,
        };
        let args = std::iter::once("e2e-helper".to_string()).chain(hold.to_args());
        assert_eq!(Hold::parse_from(args).options, hold);
        #[derive(Parser)]
        struct Loop {
            #[command(flatten)]
            options: ConnectLoopOptions,
        }
        let looping = ConnectLoopOptions {
            to: hold.to.clone(),
            count: 1_000_000,
            stop_file: "/tmp/stop here".into(),
            tag: "loop 1".into(),
        };
        let args = std::iter::once("e2e-helper".to_string()).chain(looping.to_args());
        assert_eq!(Loop::parse_from(args).options, looping);
    }

    #[test]
    fn parses_proxy_events_and_status() {
        let forward: ProxyEvent = serde_json::from_str(
            r#"{"event":"forward","peer":"127.0.0.1:40000","local":"127.0.0.1:15001","orig_dst":"10.200.1.2:8080","upstream_local":"10.200.1.1:51234"}"#,
        )
        .unwrap();
        assert!(
            matches!(forward, ProxyEvent::Forward(ForwardEvent { orig_dst, .. }) if orig_dst.port() == 8080)
        );
        let status: Status = serde_json::from_str(
            r#"{"pods":[{"cgroup":"/x","cgroup_id":7,"proxy_port":15001,"proxy_uids":[1337],"proxy_gids":[1337],
                "attached":["connect4"],"counters":{"redirected":1,"exempted":2,"orig_dst_lookups":1,"orig_dst_misses":0,
                "inbound_captured":0,"inbound_excluded":0,"inbound_no_proxy":0,"record_failed":0,
                "handshake_failed":0,"handoff_failed":0,"listener_failed":0,"dns_redirected":0},
                "pod":{"uid":"u-1","namespace":"ns","name":"web"},"netns":null,"attachment":null}],
                "records":{"in_flight":0,"capacity":65536,"overflowed":0},"agent":null}"#,
        )
        .unwrap();
        assert_eq!(status.pod(7).unwrap().counters.exempted, 2);
        assert_eq!(status.pod_by_uid("u-1").unwrap().cgroup_id, 7);
    }

    #[test]
    fn parses_prometheus_text() {
        let metrics = Metrics::parse(
            "# HELP x_total Things.\n# TYPE x_total counter\nx_total 3\n\
             y{a=\"1\",b=\"q\\\"uote\"} 2.5\nz_bucket{le=\"+Inf\"} +Inf\n",
        )
        .unwrap();
        assert_eq!(metrics.value("x_total", &[]), Some(3.0));
        assert_eq!(
            metrics.value("y", &[("a", "1"), ("b", "q\"uote")]),
            Some(2.5)
        );
        assert_eq!(metrics.value("y", &[("a", "2")]), None);
        assert_eq!(
            metrics.value("z_bucket", &[("le", "+Inf")]),
            Some(f64::INFINITY)
        );
        assert!(Metrics::parse("broken{a=1} 2").is_err());
    }
}
