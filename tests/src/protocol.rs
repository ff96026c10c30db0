//! What the binaries print: e2e-helper's reports (written by the helper and read by the tests,
//! from the same types), redirector-proxy's events and `redirector status -o json`.

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
}

impl ConnectOptions {
    pub fn to(destination: SocketAddr) -> ConnectOptions {
        ConnectOptions {
            to: destination,
            bind_port: None,
            message: "hello".into(),
            count: 1,
            hold_ms: 0,
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
        args
    }
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

/// One connect of `e2e-helper connect-batch`: a destination, and the local address to bind
/// first (port 0) or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PlannedConnect {
    pub to: SocketAddr,
    pub bind: Option<IpAddr>,
}

/// The JSON line `e2e-helper listen` writes to every connection it accepts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerReply {
    /// Which listener answered (the `--tag` it was started with).
    pub tag: String,
    /// The address the connection reached (getsockname of the accepted socket).
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
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct NoOrigDstEvent {
    pub peer: SocketAddr,
    pub error: String,
}

/// `redirector status -o json`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Status {
    pub pods: Vec<PodStatus>,
    pub records: RecordCounts,
}

impl Status {
    /// The enrolled pod whose cgroup has this id.
    pub fn pod(&self, cgroup_id: u64) -> Option<&PodStatus> {
        self.pods.iter().find(|pod| pod.cgroup_id == cgroup_id)
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
    pub counters: Counters,
}

/// A port or prefix of a pod's policy, as `redirector status -o json` lists it.
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
}

/// Entries currently in the two connection-record maps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct RecordCounts {
    pub by_cookie: u64,
    pub by_peer: u64,
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
            .hold_ms(1500);
        let args = std::iter::once("e2e-helper".to_string()).chain(options.to_args());
        assert_eq!(Wrapper::parse_from(args).options, options);
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
                "counters":{"redirected":1,"exempted":2,"orig_dst_lookups":1,"orig_dst_misses":0,
                "inbound_captured":0,"inbound_excluded":0,"inbound_no_proxy":0}}],
                "records":{"by_cookie":0,"by_peer":0}}"#,
        )
        .unwrap();
        assert_eq!(status.pod(7).unwrap().counters.exempted, 2);
    }
}
