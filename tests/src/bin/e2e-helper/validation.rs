//! `istio-validation`: the check of Istio's `istio-validation` init container
//! (istio-iptables' `pkg/validation`), which a pod prepared for a CNI runs as the proxy's UID
//! before the proxy starts: listeners on 127.0.0.1 at the proxy's outbound and inbound ports,
//! and a client that connects from 127.0.0.1:0 to 127.0.0.6:15002 until a listener reads that
//! port as the connection's original destination. Only the capture's rule for the proxy's UID
//! towards a local, non-127.0.0.1 address (ISTIO_IN_REDIRECT) can bring it there.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::libc;
use redirector::original_dst::SO_ORIGINAL_DST;
use redirector_tests::{IstioValidationReport, ValidationAccept};
use socket2::{Domain, Protocol, Socket, Type};

use crate::probes::raw_getsockopt;
use crate::tcp_listener;

/// Istio asks with a Go `IPv6MTUInfo` (32 bytes, larger than a `sockaddr_in`).
const ORIGINAL_DST_BUFFER: u32 = 32;
/// Between two connects of the client (Istio's waits longer; a test waits for it).
const RETRY: Duration = Duration::from_millis(200);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Listens on `listen`, connects to `probe` until the probe's port comes back as an original
/// destination or `timeout` passes; prints the report and fails when it did not.
pub fn validate(listen: &[SocketAddr], probe: SocketAddr, timeout: Duration) -> Result<()> {
    let (accepted_tx, accepted) = mpsc::channel();
    for &addr in listen {
        // Istio's listeners set SO_REUSEADDR and SO_REUSEPORT.
        let listener = tcp_listener(addr, true)?;
        let accepted_tx = accepted_tx.clone();
        // Blocked in accept() until the process exits.
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                if accepted_tx.send(answer(addr, stream)).is_err() {
                    return;
                }
            }
        });
    }
    let mut report = IstioValidationReport::default();
    let deadline = Instant::now() + timeout;
    while !report.passed && Instant::now() < deadline {
        report.attempts += 1;
        if let Err(error) = probe_once(probe) {
            report.client_error = Some(format!("{error:#}"));
        }
        // The listener reports each connection before it answers the client.
        while let Ok(accept) = accepted.recv_timeout(RETRY) {
            report.passed |= accept.orig_dst.map(|dst| dst.port()) == Some(probe.port());
            report.accepted.push(accept);
        }
    }
    println!("{}", serde_json::to_string(&report)?);
    std::io::stdout().flush()?;
    if !report.passed {
        bail!("validation failed: no listener saw {probe} as an original destination");
    }
    Ok(())
}

/// Reads the accepted connection's original destination and writes its port back, as Istio's
/// listener echoes it, then closes the connection.
fn answer(listener: SocketAddr, mut stream: TcpStream) -> ValidationAccept {
    let peer = stream
        .peer_addr()
        .unwrap_or_else(|_| SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
    let (call, answer) = raw_getsockopt(
        stream.as_fd(),
        libc::SOL_IP,
        SO_ORIGINAL_DST,
        ORIGINAL_DST_BUFFER,
    );
    let orig_dst = (call.errno == 0 && answer.len() >= 8).then(|| {
        // struct sockaddr_in: family, port (network order), address.
        let port = u16::from_be_bytes([answer[2], answer[3]]);
        SocketAddr::from((
            Ipv4Addr::new(answer[4], answer[5], answer[6], answer[7]),
            port,
        ))
    });
    if let Some(dst) = orig_dst {
        let _ = stream.write_all(dst.port().to_string().as_bytes());
    }
    ValidationAccept {
        listener,
        peer,
        orig_dst,
        error: (call.errno != 0).then(|| std::io::Error::from_raw_os_error(call.errno).to_string()),
    }
}

/// One connect from 127.0.0.1:0 to the probe address; reads what the listener echoes.
fn probe_once(probe: SocketAddr) -> Result<()> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    let local = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    socket.bind(&local.into()).context("binding 127.0.0.1:0")?;
    socket
        .connect_timeout(&probe.into(), CONNECT_TIMEOUT)
        .with_context(|| format!("connecting to {probe}"))?;
    let mut stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(CONNECT_TIMEOUT))?;
    let mut echoed = String::new();
    stream
        .read_to_string(&mut echoed)
        .context("reading the echo")?;
    Ok(())
}
