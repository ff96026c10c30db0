//! `redirector-proxy`: a small forwarding proxy for redirected connections, as a sidecar
//! proxy uses them. It learns each connection's original destination with
//! getsockopt(SO_ORIGINAL_DST), as Envoy's original_dst cluster does, connects there and
//! copies bytes both ways. Run it as the proxy UID (1337) so its own connects are exempt.
//!
//! One JSON line per event on stdout: `forward` (upstream connected), `done` (both
//! directions finished) and `no_orig_dst` (lookup failed; the connection is closed).
use std::{
    io::{self, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
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
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let timeout = Duration::from_millis(args.connect_timeout_ms);
    let listeners = args
        .listen
        .iter()
        .map(|addr| TcpListener::bind(addr).with_context(|| format!("listening on {addr}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    thread::scope(|scope| {
        for listener in &listeners {
            scope.spawn(move || accept_loop(listener, timeout));
        }
    });
    Ok(())
}

fn accept_loop(listener: &TcpListener, timeout: Duration) {
    for accepted in listener.incoming() {
        match accepted {
            Ok(client) => {
                thread::spawn(move || proxy(client, timeout));
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

fn proxy(client: TcpStream, connect_timeout: Duration) {
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
    let upstream = match TcpStream::connect_timeout(&original, connect_timeout) {
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
    emit(
        json!({ "event": "forward", "peer": peer, "orig_dst": original.to_string(), "upstream_local": upstream_local }),
    );
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
