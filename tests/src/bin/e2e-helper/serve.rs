//! `e2e-helper serve`: one thread and epoll, so that tens of thousands of connections held
//! open at once cost a few hundred bytes each, not a thread each.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result};
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use redirector_tests::ServerReply;
use socket2::{Domain, Protocol, Socket, Type};

/// The kernel caps it at the netns' `net.core.somaxconn` (4096 by default).
const LISTEN_BACKLOG: i32 = 4096;
/// A line longer than this is answered as it stands.
const MAX_LINE: usize = 4096;
/// Bound of the (blocking) reply write.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection waiting for its line.
struct Pending {
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    received: Vec<u8>,
}

impl Pending {
    /// Reads what has arrived: `Some` once the line is complete (newline, end of stream, or
    /// too long), `None` while more is to come.
    fn read_line(&mut self) -> Option<std::io::Result<String>> {
        let mut chunk = [0u8; 1024];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    self.received.extend_from_slice(&chunk[..n]);
                    if self.received.contains(&b'\n') || self.received.len() >= MAX_LINE {
                        break;
                    }
                }
                Err(error) if error.kind() == ErrorKind::WouldBlock => return None,
                Err(error) if error.kind() == ErrorKind::Interrupted => {}
                Err(error) => return Some(Err(error)),
            }
        }
        let line = self.received.split(|&byte| byte == b'\n').next();
        let line = String::from_utf8_lossy(line.unwrap_or_default());
        Some(Ok(line.trim_end_matches('\r').to_owned()))
    }
}

pub fn serve(listen: &[SocketAddr], log: bool) -> Result<()> {
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).context("epoll_create")?;
    let listeners = listen
        .iter()
        .map(|&addr| listener(addr))
        .collect::<Result<Vec<_>>>()?;
    // Tokens below listeners.len() are listeners; connections get the ones after.
    for (token, listener) in listeners.iter().enumerate() {
        epoll.add(listener, EpollEvent::new(EpollFlags::EPOLLIN, token as u64))?;
    }
    let mut next_token = listeners.len() as u64;
    let mut pending: HashMap<u64, Pending> = HashMap::new();
    // Tests wait for this line before connecting.
    println!("listening");
    std::io::stdout().flush()?;
    let mut events = vec![EpollEvent::empty(); 1024];
    loop {
        let ready = match epoll.wait(&mut events, EpollTimeout::NONE) {
            Ok(ready) => ready,
            Err(Errno::EINTR) => continue,
            Err(error) => return Err(error).context("epoll_wait"),
        };
        for event in &events[..ready] {
            let token = event.data();
            if let Some(listener) = listeners.get(token as usize) {
                for connection in accept_ready(listener) {
                    let token = next_token;
                    next_token += 1;
                    match epoll.add(
                        &connection.stream,
                        EpollEvent::new(EpollFlags::EPOLLIN, token),
                    ) {
                        Ok(()) => {
                            pending.insert(token, connection);
                        }
                        Err(error) => eprintln!("e2e-helper serve: epoll_ctl: {error}"),
                    }
                }
                continue;
            }
            let Some(connection) = pending.get_mut(&token) else {
                continue;
            };
            let Some(line) = connection.read_line() else {
                continue;
            };
            let connection = pending.remove(&token).expect("found above");
            // Dropping the stream closes it, which also takes it out of the epoll set.
            match line {
                Ok(line) => answer(connection, line, log),
                Err(error) => eprintln!(
                    "e2e-helper serve: reading from {}: {error}",
                    connection.peer
                ),
            }
        }
    }
}

fn listener(addr: SocketAddr) -> Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket
        .bind(&addr.into())
        .with_context(|| format!("binding {addr}"))?;
    socket.listen(LISTEN_BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Every connection waiting in `listener`'s queue, made non-blocking.
fn accept_ready(listener: &TcpListener) -> Vec<Pending> {
    let mut accepted = Vec::new();
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(error) if error.kind() == ErrorKind::WouldBlock => break,
            Err(error) if error.kind() == ErrorKind::Interrupted => continue,
            Err(error) => {
                // EMFILE and the like: the connection stays queued for the next round.
                eprintln!("e2e-helper serve: accept: {error}");
                break;
            }
        };
        let local = match stream.local_addr() {
            Ok(local) => local,
            Err(error) => {
                eprintln!("e2e-helper serve: getsockname: {error}");
                continue;
            }
        };
        if let Err(error) = stream.set_nonblocking(true) {
            eprintln!("e2e-helper serve: {error}");
            continue;
        }
        accepted.push(Pending {
            stream,
            peer,
            local,
            received: Vec::new(),
        });
    }
    accepted
}

/// Writes {"peer","local","line"} back (logging it first, with `log`), then closes.
fn answer(connection: Pending, line: String, log: bool) {
    let reply = ServerReply {
        peer: connection.peer,
        local: connection.local,
        line,
    };
    let mut text = serde_json::to_string(&reply).expect("replies always serialize");
    if log {
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{text}");
        let _ = stdout.flush();
    }
    text.push('\n');
    // A few hundred bytes into an idle socket: blocking, bounded by the timeout.
    let written = connection
        .stream
        .set_nonblocking(false)
        .and_then(|()| connection.stream.set_write_timeout(Some(REPLY_TIMEOUT)))
        .and_then(|()| (&connection.stream).write_all(text.as_bytes()));
    if let Err(error) = written {
        eprintln!("e2e-helper serve: replying to {}: {error}", connection.peer);
    }
}
