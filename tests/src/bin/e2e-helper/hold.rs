//! `e2e-helper hold`: many connections open at once. Connects them one after another (or, with
//! `--in-handshake`, starts every connect without waiting), reports, waits for the go file,
//! then checks every getpeername() while all are still open, and last sends each its index and
//! reads every reply with one epoll loop.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use redirector_tests::{HeldMismatch, HoldOpened, HoldOptions, HoldReport, ServerReply};
use socket2::{Domain, Socket, Type};

use crate::{print_json, CONNECT_TIMEOUT};

/// How many mismatches of each kind the report lists.
const EXAMPLES: usize = 5;

struct Held {
    index: u64,
    destination: SocketAddr,
    stream: TcpStream,
    received: Vec<u8>,
}

pub fn hold(options: &HoldOptions) -> Result<()> {
    let phase = Duration::from_secs(options.phase_s);
    let (mut held, opened) = if options.in_handshake {
        start_all(options)
    } else {
        open_all(options, phase)
    };
    print_json(&opened)?;
    wait_for_go(&options.go_file, phase)?;

    let mut report = HoldReport {
        opened,
        ..HoldReport::default()
    };
    if options.in_handshake {
        held = finish_connects(held, phase, &mut report)?;
    }
    let started = Instant::now();
    for connection in &held {
        let found = match connection.stream.peer_addr() {
            Ok(peer) if peer == connection.destination => continue,
            Ok(peer) => peer.to_string(),
            Err(error) => format!("getpeername: {error}"),
        };
        report.wrong_peer += 1;
        note(&mut report.wrong_peer_examples, connection, found);
    }
    report.check_ms = elapsed_ms(started);

    let started = Instant::now();
    exchange_all(&mut held, phase, &mut report)?;
    report.exchange_ms = elapsed_ms(started);
    print_json(&report)
}

/// Connects one after another until all are open or the phase runs out.
fn open_all(options: &HoldOptions, phase: Duration) -> (Vec<Held>, HoldOpened) {
    let started = Instant::now();
    let mut opened = HoldOpened::default();
    let mut held = Vec::with_capacity(options.count as usize);
    for index in 0..u64::from(options.count) {
        if started.elapsed() >= phase {
            opened.failed += u64::from(options.count) - index;
            opened
                .first_error
                .get_or_insert(format!("connecting took longer than {phase:?}"));
            break;
        }
        let destination = options.to[index as usize % options.to.len()];
        match TcpStream::connect_timeout(&destination, CONNECT_TIMEOUT) {
            Ok(stream) => held.push(Held {
                index,
                destination,
                stream,
                received: Vec::new(),
            }),
            Err(error) => {
                opened.failed += 1;
                opened
                    .first_error
                    .get_or_insert(format!("connection {index} to {destination}: {error}"));
            }
        }
    }
    opened.opened = held.len() as u64;
    opened.connect_ms = elapsed_ms(started);
    (held, opened)
}

/// Starts every connect without waiting for its handshake: each socket's connect() returns
/// EINPROGRESS once its SYN is on its way, so all are in their handshake together.
fn start_all(options: &HoldOptions) -> (Vec<Held>, HoldOpened) {
    let started = Instant::now();
    let mut opened = HoldOpened::default();
    let mut held = Vec::with_capacity(options.count as usize);
    for index in 0..u64::from(options.count) {
        let destination = options.to[index as usize % options.to.len()];
        match start_connect(destination) {
            Ok(stream) => held.push(Held {
                index,
                destination,
                stream,
                received: Vec::new(),
            }),
            Err(error) => {
                opened.failed += 1;
                opened
                    .first_error
                    .get_or_insert(format!("connection {index} to {destination}: {error}"));
            }
        }
    }
    opened.opened = held.len() as u64;
    opened.connect_ms = elapsed_ms(started);
    (held, opened)
}

fn start_connect(destination: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(destination), Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    match socket.connect(&destination.into()) {
        Ok(()) => {}
        Err(error) if error.raw_os_error() == Some(Errno::EINPROGRESS as i32) => {}
        Err(error) => return Err(error),
    }
    Ok(socket.into())
}

/// Waits until every started connect has completed (writable, as connect(2) says) and keeps
/// the connected ones; the failed ones count as bad replies.
fn finish_connects(held: Vec<Held>, phase: Duration, report: &mut HoldReport) -> Result<Vec<Held>> {
    let deadline = Instant::now() + phase;
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).context("epoll_create")?;
    for (slot, connection) in held.iter().enumerate() {
        epoll
            .add(
                &connection.stream,
                EpollEvent::new(EpollFlags::EPOLLOUT, slot as u64),
            )
            .context("epoll_ctl")?;
    }
    let mut outcome: Vec<Option<std::io::Result<()>>> = held.iter().map(|_| None).collect();
    let mut waiting = held.len();
    let mut events = vec![EpollEvent::empty(); 1024];
    while waiting > 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let timeout = EpollTimeout::try_from(left).unwrap_or(EpollTimeout::MAX);
        let ready = match epoll.wait(&mut events, timeout) {
            Ok(ready) => ready,
            Err(Errno::EINTR) => continue,
            Err(error) => return Err(error).context("epoll_wait"),
        };
        for event in &events[..ready] {
            let slot = event.data() as usize;
            let stream = &held[slot].stream;
            epoll.delete(stream).context("epoll_ctl")?;
            outcome[slot] = Some(match stream.take_error() {
                Ok(None) => Ok(()),
                Ok(Some(error)) | Err(error) => Err(error),
            });
            waiting -= 1;
        }
    }
    let mut connected = Vec::with_capacity(held.len());
    for (connection, outcome) in held.into_iter().zip(outcome) {
        let found = match outcome {
            Some(Ok(())) => {
                connected.push(connection);
                continue;
            }
            Some(Err(error)) => format!("connect: {error}"),
            None => format!("connect: not done within {phase:?}"),
        };
        report.connect_failed += 1;
        report.bad_replies += 1;
        note(&mut report.bad_reply_examples, &connection, found);
    }
    Ok(connected)
}

fn wait_for_go(file: &std::path::Path, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !file.exists() {
        if Instant::now() >= deadline {
            bail!("{} did not appear within {timeout:?}", file.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Sends every connection its index as a line and judges each reply; connections still
/// waiting when the phase runs out count as bad.
fn exchange_all(held: &mut [Held], phase: Duration, report: &mut HoldReport) -> Result<()> {
    let deadline = Instant::now() + phase;
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).context("epoll_create")?;
    let mut judged = vec![false; held.len()];
    let mut waiting = 0usize;
    for (slot, connection) in held.iter().enumerate() {
        let line = format!("{}\n", connection.index);
        let sent = connection
            .stream
            .set_nonblocking(true)
            .and_then(|()| (&connection.stream).write_all(line.as_bytes()));
        if let Err(error) = sent {
            judged[slot] = true;
            report.bad_replies += 1;
            note(
                &mut report.bad_reply_examples,
                connection,
                format!("sending: {error}"),
            );
            continue;
        }
        epoll
            .add(
                &connection.stream,
                EpollEvent::new(EpollFlags::EPOLLIN, slot as u64),
            )
            .context("epoll_ctl")?;
        waiting += 1;
    }
    let mut events = vec![EpollEvent::empty(); 1024];
    while waiting > 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let timeout = EpollTimeout::try_from(left).unwrap_or(EpollTimeout::MAX);
        let ready = match epoll.wait(&mut events, timeout) {
            Ok(ready) => ready,
            Err(Errno::EINTR) => continue,
            Err(error) => return Err(error).context("epoll_wait"),
        };
        for event in &events[..ready] {
            let slot = event.data() as usize;
            let connection = &mut held[slot];
            let Some(outcome) = read_reply(connection) else {
                continue;
            };
            epoll.delete(&connection.stream).context("epoll_ctl")?;
            judged[slot] = true;
            waiting -= 1;
            let found = match outcome {
                Ok(reply)
                    if reply.local == connection.destination
                        && reply.line == connection.index.to_string() =>
                {
                    report.replies_ok += 1;
                    continue;
                }
                Ok(reply) => {
                    report.misdelivered += 1;
                    serde_json::to_string(&reply)?
                }
                Err(error) => error,
            };
            report.bad_replies += 1;
            note(&mut report.bad_reply_examples, connection, found);
        }
    }
    for (connection, _) in held.iter().zip(&judged).filter(|(_, judged)| !**judged) {
        report.bad_replies += 1;
        let found = format!("no reply within {phase:?}");
        note(&mut report.bad_reply_examples, connection, found);
    }
    Ok(())
}

/// `Some` once the reply line is complete or the connection ended without one.
fn read_reply(connection: &mut Held) -> Option<std::result::Result<ServerReply, String>> {
    let mut chunk = [0u8; 512];
    loop {
        match connection.stream.read(&mut chunk) {
            Ok(0) => return Some(Err(reply_text_error(&connection.received, "closed"))),
            Ok(n) => {
                connection.received.extend_from_slice(&chunk[..n]);
                if let Some(end) = connection.received.iter().position(|&byte| byte == b'\n') {
                    let line = &connection.received[..end];
                    return Some(
                        serde_json::from_slice(line)
                            .map_err(|_| reply_text_error(line, "not a server reply")),
                    );
                }
            }
            Err(error) if error.kind() == ErrorKind::WouldBlock => return None,
            Err(error) if error.kind() == ErrorKind::Interrupted => {}
            Err(error) => return Some(Err(format!("reading: {error}"))),
        }
    }
}

fn reply_text_error(received: &[u8], what: &str) -> String {
    format!("{what} after {:?}", String::from_utf8_lossy(received))
}

fn note(examples: &mut Vec<HeldMismatch>, connection: &Held, found: String) {
    if examples.len() < EXAMPLES {
        examples.push(HeldMismatch {
            index: connection.index,
            expected: connection.destination,
            found,
        });
    }
}

fn elapsed_ms(since: Instant) -> u64 {
    since.elapsed().as_millis() as u64
}
