//! `redirector-proxy`: a small forwarding proxy for redirected connections, as a sidecar
//! proxy uses them. It learns each connection's original destination with
//! getsockopt(SO_ORIGINAL_DST), as Envoy's original_dst cluster does, connects there and
//! moves bytes both ways with splice(2), without copying them through user space. Run it as
//! the proxy UID (1337) so its own connects are exempt.
//!
//! A pool of worker threads per listener, one per open connection. One JSON line per event on
//! stdout, unless `--quiet`: `forward` (upstream connected), `done` (both directions finished;
//! with `--ask-again-at-end`, the original destination asked again then) and `no_orig_dst`
//! (lookup failed; the connection is closed).
//!
//! `--inbound` makes it an inbound listener as Istio's: it forwards from the passthrough
//! source 127.0.0.6 (or ::6), which the pod's capture leaves alone. `--fastopen` lets its
//! listeners accept data in the SYN (TCP fast open, with `net.ipv4.tcp_fastopen` allowing it).
use std::{
    io::{self, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsFd, AsRawFd, OwnedFd},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use anyhow::Context as _;
use clap::Parser;
use nix::{
    errno::Errno,
    fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags},
    poll::{poll, PollFd, PollFlags, PollTimeout},
    unistd::pipe2,
};
use redirector::original_dst::so_original_dst;
use serde_json::json;
use socket2::{Domain, Protocol, Socket, Type};

/// Bytes one splice call may move; the pipe between the sockets is sized to hold them. Larger
/// pipes count against the UID's pipe quota (`fs.pipe-user-pages-soft`), which caps how many
/// connections get them.
const PIPE_BYTES: usize = 256 * 1024;

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
    /// Forward every connection to this address without asking for its original destination:
    /// a plain TCP proxy, the baseline that has no interception at all.
    #[arg(long)]
    fixed_upstream: Option<SocketAddr>,
    /// Print no per-connection events (for load tests).
    #[arg(long)]
    quiet: bool,
    /// Inbound listener: connect upstream from istio's passthrough source (127.0.0.6 or ::6).
    #[arg(long)]
    inbound: bool,
    /// Accept connections whose SYN carries data (server-side TCP fast open): such a
    /// connection is accepted before the client has seen the handshake complete.
    #[arg(long)]
    fastopen: bool,
    /// Ask for each connection's original destination again once it is done, and print the
    /// answer in its `done` event (the answer must not change while the socket lives, even
    /// across an upgrade of the programs): one more lookup per connection.
    #[arg(long)]
    ask_again_at_end: bool,
}

/// Fast-open requests a listener keeps pending at once (TCP_FASTOPEN's queue length).
const FASTOPEN_QUEUE: libc::c_int = 64;

/// setsockopt(TCP_FASTOPEN) on a listener: neither nix nor socket2 offers the server side of it.
fn enable_fastopen(listener: &TcpListener) -> io::Result<()> {
    // SAFETY: the option value is a c_int that lives through the call, and its size is passed.
    let result = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_FASTOPEN,
            (&FASTOPEN_QUEUE as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[derive(Clone, Copy)]
struct Settings {
    connect_timeout: Duration,
    fixed_upstream: Option<SocketAddr>,
    events: bool,
    passthrough_source: bool,
    ask_again_at_end: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let settings = Settings {
        connect_timeout: Duration::from_millis(args.connect_timeout_ms),
        fixed_upstream: args.fixed_upstream,
        events: !args.quiet,
        passthrough_source: args.inbound,
        ask_again_at_end: args.ask_again_at_end,
    };
    for addr in &args.listen {
        let listener = TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?;
        if args.fastopen {
            enable_fastopen(&listener)
                .with_context(|| format!("enabling TCP fast open on {addr}"))?;
        }
        let workers = Arc::new(Workers {
            listener,
            settings,
            idle: AtomicUsize::new(0),
        });
        for _ in 0..SPARE_WORKERS {
            workers.start_one()?;
        }
    }
    loop {
        thread::park();
    }
}

/// How many workers wait in accept() when nothing is going on.
const SPARE_WORKERS: usize = 4;

/// Threads that each accept a connection and proxy it to the end, then accept the next one:
/// a connection never waits for a thread to start, as long as one is idle. The last idle
/// worker to accept starts another, so a new connection always finds one; past the spare
/// count, workers end after their connection.
struct Workers {
    listener: TcpListener,
    settings: Settings,
    idle: AtomicUsize,
}

impl Workers {
    fn start_one(self: &Arc<Self>) -> io::Result<()> {
        let workers = self.clone();
        thread::Builder::new()
            .name("proxy-worker".into())
            .spawn(move || workers.work())
            .map(drop)
    }

    fn work(self: Arc<Self>) {
        loop {
            self.idle.fetch_add(1, Ordering::SeqCst);
            let accepted = self.listener.accept();
            if self.idle.fetch_sub(1, Ordering::SeqCst) == 1 {
                if let Err(e) = self.start_one() {
                    emit(json!({ "event": "worker_error", "error": e.to_string() }));
                }
            }
            match accepted {
                Ok((client, peer)) => proxy(client, peer, self.settings),
                Err(e) => emit(json!({ "event": "accept_error", "error": e.to_string() })),
            }
            if self.idle.load(Ordering::SeqCst) >= SPARE_WORKERS {
                return;
            }
        }
    }
}

fn emit(event: serde_json::Value) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{event}");
    let _ = out.flush();
}

/// `peer` is the address accept(2) gave: no getpeername call per connection.
fn proxy(client: TcpStream, peer: SocketAddr, settings: Settings) {
    let peer = peer.to_string();
    let destination = match settings.fixed_upstream {
        Some(fixed) => fixed,
        None => match so_original_dst(client.as_fd()) {
            Ok(original) => original,
            Err(e) => {
                return emit(
                    json!({ "event": "no_orig_dst", "peer": peer, "error": e.to_string() }),
                )
            }
        },
    };
    let upstream = match connect_upstream(destination, settings) {
        Ok(upstream) => upstream,
        Err(e) => {
            return emit(
                json!({ "event": "upstream_error", "peer": peer, "orig_dst": destination.to_string(), "error": e.to_string() }),
            )
        }
    };
    if settings.events {
        let upstream_local = upstream
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let local = client
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        emit(json!({
            "event": "forward", "peer": peer, "local": local, "orig_dst": destination.to_string(),
            "upstream_local": upstream_local
        }));
    }
    match relay(&client, &upstream) {
        Ok((bytes_up, bytes_down)) if settings.events => {
            let ask_again = settings.ask_again_at_end && settings.fixed_upstream.is_none();
            let orig_dst_at_end = ask_again.then(|| {
                so_original_dst(client.as_fd()).map_or_else(|e| e.to_string(), |a| a.to_string())
            });
            emit(json!({
                "event": "done", "peer": peer, "bytes_up": bytes_up, "bytes_down": bytes_down,
                "orig_dst_at_end": orig_dst_at_end
            }))
        }
        Ok(_) => {}
        Err(e) => emit(json!({ "event": "relay_error", "peer": peer, "error": e.to_string() })),
    }
}

fn connect_upstream(destination: SocketAddr, settings: Settings) -> io::Result<TcpStream> {
    if !settings.passthrough_source {
        return TcpStream::connect_timeout(&destination, settings.connect_timeout);
    }
    let (domain, source): (Domain, IpAddr) = match destination {
        SocketAddr::V4(_) => (Domain::IPV4, Ipv4Addr::new(127, 0, 0, 6).into()),
        SocketAddr::V6(_) => (Domain::IPV6, Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6).into()),
    };
    let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    socket.bind(&SocketAddr::new(source, 0).into())?;
    socket.connect_timeout(&destination.into(), settings.connect_timeout)?;
    Ok(socket.into())
}

/// One direction of a connection: bytes go `from` → pipe → `to`, never through user space.
struct Half<'a> {
    from: &'a TcpStream,
    to: &'a TcpStream,
    pipe_read: OwnedFd,
    pipe_write: OwnedFd,
    /// Bytes in the pipe. The next read waits until it is empty, so a read never finds the
    /// pipe full and EAGAIN always means "the socket has nothing".
    in_pipe: usize,
    from_open: bool,
    finished: bool,
    moved: u64,
}

impl<'a> Half<'a> {
    fn new(from: &'a TcpStream, to: &'a TcpStream) -> io::Result<Self> {
        let (pipe_read, pipe_write) = pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        // Best effort: a smaller pipe only means more splice calls.
        let _ = fcntl(&pipe_write, FcntlArg::F_SETPIPE_SZ(PIPE_BYTES as i32));
        Ok(Self {
            from,
            to,
            pipe_read,
            pipe_write,
            in_pipe: 0,
            from_open: true,
            finished: false,
            moved: 0,
        })
    }

    fn wants_read(&self) -> bool {
        self.from_open && self.in_pipe == 0
    }

    fn wants_write(&self) -> bool {
        self.in_pipe > 0
    }

    /// Moves what can be moved without blocking; at EOF with the pipe drained, passes the
    /// half-close on.
    fn pump(&mut self) -> io::Result<()> {
        let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
        loop {
            if self.wants_read() {
                match splice(self.from, None, &self.pipe_write, None, PIPE_BYTES, flags) {
                    Ok(0) => self.from_open = false,
                    Ok(n) => self.in_pipe = n,
                    Err(Errno::EAGAIN) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if !self.wants_write() {
                break;
            }
            match splice(&self.pipe_read, None, self.to, None, self.in_pipe, flags) {
                Ok(n) => {
                    self.in_pipe -= n;
                    self.moved += n as u64;
                }
                Err(Errno::EAGAIN) => break,
                Err(e) => return Err(e.into()),
            }
        }
        if !self.from_open && self.in_pipe == 0 && !self.finished {
            self.finished = true;
            // The peer may be gone already; then there is nothing left to tell it.
            let _ = self.to.shutdown(Shutdown::Write);
        }
        Ok(())
    }
}

/// Relays both directions until each has seen EOF and delivered everything; returns the
/// bytes moved (client → upstream, upstream → client).
fn relay(client: &TcpStream, upstream: &TcpStream) -> io::Result<(u64, u64)> {
    for socket in [client, upstream] {
        socket.set_nonblocking(true)?;
        socket.set_nodelay(true)?;
    }
    let mut up = Half::new(client, upstream)?;
    let mut down = Half::new(upstream, client)?;
    loop {
        up.pump()?;
        down.pump()?;
        if up.finished && down.finished {
            return Ok((up.moved, down.moved));
        }
        let interest = |read: bool, write: bool| {
            let mut flags = PollFlags::empty();
            flags.set(PollFlags::POLLIN, read);
            flags.set(PollFlags::POLLOUT, write);
            flags
        };
        let mut fds = [
            PollFd::new(
                client.as_fd(),
                interest(up.wants_read(), down.wants_write()),
            ),
            PollFd::new(
                upstream.as_fd(),
                interest(down.wants_read(), up.wants_write()),
            ),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        // A reset socket reports an error or hang-up even when nothing is asked of it; without
        // this check the loop would spin until the other direction ends.
        let broken = PollFlags::POLLERR | PollFlags::POLLHUP;
        for (fd, socket) in fds.iter().zip([client, upstream]) {
            if fd.revents().is_some_and(|events| events.intersects(broken))
                && fd.events().is_empty()
            {
                return Err(socket
                    .take_error()?
                    .unwrap_or_else(|| io::ErrorKind::ConnectionAborted.into()));
            }
        }
    }
}
