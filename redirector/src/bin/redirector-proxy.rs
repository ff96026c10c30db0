//! `redirector-proxy`: a small forwarding proxy for redirected connections, as a sidecar
//! proxy uses them. It learns each connection's original destination with
//! getsockopt(SO_ORIGINAL_DST), as Envoy's original_dst cluster does, connects there and
//! copies bytes both ways. Run it as the proxy UID (1337) so its own connects are exempt.
//!
//! One JSON line per event on stdout: `forward` (upstream connected), `done` (both
//! directions finished) and `no_orig_dst` (lookup failed; the connection is closed).
use socket2::{Domain, Protocol, Socket, Type};
use std::{
    io::{self, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd,
    thread,
    time::Duration,
};

use anyhow::Context as _;
use clap::Parser;
use redirector::original_dst::so_original_dst;
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "redirector-proxy",
    about = "forward redirected connections to their original destination"
)]
struct Args {
    /// Addresses to listen on (repeat for IPv4 and IPv6, e.g. 127.0.0.1:15001 and [::1]:15001).
    #[arg(long, default_value = "127.0.0.1:15001")]
    listen: Vec<SocketAddr>,
    /// Give up an upstream connect after this many milliseconds.
    #[arg(long, default_value_t = 3000)]
    connect_timeout_ms: u64,
    /// Inbound listener: forward to the original destination from istio's passthrough
    /// source (127.0.0.6, or ::6 for IPv6), which the pod's capture leaves alone.
    #[arg(long)]
    inbound: bool,
}

/// How upstream connections are made.
#[derive(Clone, Copy)]
struct Upstream {
    connect_timeout: Duration,
    passthrough_source: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let upstream = Upstream {
        connect_timeout: Duration::from_millis(args.connect_timeout_ms),
        passthrough_source: args.inbound,
    };
    let listeners = args
        .listen
        .iter()
        .map(|addr| TcpListener::bind(addr).with_context(|| format!("listening on {addr}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    thread::scope(|scope| {
        for listener in &listeners {
            scope.spawn(move || accept_loop(listener, upstream));
        }
    });
    Ok(())
}

fn accept_loop(listener: &TcpListener, upstream: Upstream) {
    for accepted in listener.incoming() {
        match accepted {
            Ok(client) => {
                thread::spawn(move || proxy(client, upstream));
            }
            Err(e) => emit(json!({ "event": "accept_error", "error": e.to_string() })),
        }
    }
}

fn emit(event: serde_json::Value) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{event}");
    let _ = out.flush();
}

fn proxy(client: TcpStream, upstream: Upstream) {
    let peer = client
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let original = match so_original_dst(client.as_fd()) {
        Ok(original) => original,
        Err(e) => {
            return emit(json!({ "event": "no_orig_dst", "peer": peer, "error": e.to_string() }))
        }
    };
    let upstream = match connect_upstream(original, upstream) {
        Ok(upstream) => upstream,
        Err(e) => {
            return emit(
                json!({ "event": "upstream_error", "peer": peer, "orig_dst": original.to_string(), "error": e.to_string() }),
            )
        }
    };
    let upstream_local = upstream
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let local = client
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    emit(json!({
        "event": "forward", "peer": peer, "local": local, "orig_dst": original.to_string(), "upstream_local": upstream_local
    }));
    let (Ok(client_rx), Ok(upstream_tx)) = (client.try_clone(), upstream.try_clone()) else {
        return emit(json!({ "event": "error", "peer": peer, "error": "cloning sockets" }));
    };
    let up = thread::spawn(move || pipe(client_rx, upstream_tx));
    let bytes_down = pipe(upstream, client);
    let bytes_up = up.join().unwrap_or(0);
    emit(json!({ "event": "done", "peer": peer, "bytes_up": bytes_up, "bytes_down": bytes_down }));
}

/// Copies until EOF, then passes the half-close on.
fn pipe(mut from: TcpStream, mut to: TcpStream) -> u64 {
    let copied = io::copy(&mut from, &mut to).unwrap_or(0);
    let _ = to.shutdown(Shutdown::Write);
    copied
}

fn connect_upstream(original: SocketAddr, upstream: Upstream) -> io::Result<TcpStream> {
    if !upstream.passthrough_source {
        return TcpStream::connect_timeout(&original, upstream.connect_timeout);
    }
    let (domain, source): (Domain, IpAddr) = match original {
        SocketAddr::V4(_) => (Domain::IPV4, Ipv4Addr::new(127, 0, 0, 6).into()),
        SocketAddr::V6(_) => (Domain::IPV6, Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6).into()),
    };
    let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    socket.bind(&SocketAddr::new(source, 0).into())?;
    socket.connect_timeout(&original.into(), upstream.connect_timeout)?;
    Ok(socket.into())
}
