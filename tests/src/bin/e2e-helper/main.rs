//! Small tools the end-to-end tests run inside pods:
//! - `exec`: enter a cgroup, a netns, a resolv.conf and an identity (each optional but the
//!   netns), then exec a command;
//! - `serve`: a TCP server answering each line with what it saw of the connection;
//! - `connect`: a TCP client reporting where it ended up connected and what the server saw;
//! - `connect-loop`: short connections one after another for a soak run, each checked;
//! - `connect-twice`: one socket, bound to a fixed port, connecting twice;
//! - `hold`: many connections held open at once, then checked and used;
//! - `listen`: TCP (and UDP) listeners on the wildcard addresses of many ports, each answering
//!   with a tag and the address the connection reached;
//! - `connect-batch`: many short connects (or UDP exchanges), one JSON line each saying who
//!   answered;
//! - `dns-query`: DNS queries over UDP from connected or unconnected sockets, with what the
//!   socket saw of the server;
//! - `getsockopt`, `peer-groups`: one raw getsockopt() call, reported with its errno;
//! - `istio-validation`: Istio's istio-validation init container's check of the capture;
//! - `pause`: a pod sandbox's process (the "pause" image's job), waiting for its stop signal.

mod connect_loop;
mod hold;
mod probes;
mod serve;
mod udp;
mod validation;

use std::convert::Infallible;
use std::ffi::CString;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use clap::{Parser, Subcommand};
use nix::mount::{mount, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::socket::{setsockopt, sockopt};
use nix::unistd::{execvp, setgid, setgroups, setuid, Gid, Uid};
use redirector_tests::{
    ConnectLoopOptions, ConnectOptions, ConnectOutcome, ConnectReport, ConnectSummary,
    ConnectTwiceOptions, ConnectTwiceReport, DnsQueryOptions, HoldOptions, ListenerReply,
    PlannedConnect, Reached, Transport,
};
use socket2::{Domain, Protocol, SockRef, Socket, Type};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// connect-batch's limits per connect. Its destinations answer at once, and a timeout fails the
/// parity test, so only a slow machine ever waits this long: an emulated VM on a busy host took
/// more than 500 ms for some connects through a proxy.
const BATCH_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const BATCH_REPLY_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Parser)]
#[command(
    name = "e2e-helper",
    about = "Helper processes for redirector's end-to-end tests"
)]
struct Cli {
    #[command(subcommand)]
    command: Action,
}

#[derive(Subcommand)]
enum Action {
    /// Join a cgroup, then a named netns, then (in a mount namespace of its own) see FILE as
    /// /etc/resolv.conf, then drop to UID/GID, then exec CMD.
    Exec {
        /// Name under /run/netns.
        #[arg(long)]
        netns: String,
        /// cgroup v2 directory to join (default: stay where it is).
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// Identity to drop to (default: keep root's), with --gid.
        #[arg(long, requires = "gid")]
        uid: Option<u32>,
        #[arg(long, requires = "uid")]
        gid: Option<u32>,
        /// Set RLIMIT_NOFILE (soft and hard) to this before dropping the identity.
        #[arg(long)]
        nofile: Option<u64>,
        /// The pod's own resolv.conf: bind-mounted over /etc/resolv.conf in a private mount
        /// namespace, as a container runtime gives each pod its own.
        #[arg(long)]
        resolv_conf: Option<PathBuf>,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<std::ffi::OsString>,
    },
    /// Answer one line per connection with {"peer","local","line"} as JSON, then close. One
    /// thread (epoll) serves any number of connections.
    Serve {
        /// Addresses to listen on (repeat for more).
        #[arg(long, required = true)]
        listen: Vec<SocketAddr>,
        /// Also print each answer on stdout, one JSON line per connection.
        #[arg(long)]
        log: bool,
    },
    /// Connect, send a line, read the reply, and report as JSON.
    Connect(ConnectOptions),
    /// Short connections one after another, round-robin over the destinations, each checked;
    /// one JSON line per connection that went wrong, then a summary.
    ConnectLoop(ConnectLoopOptions),
    /// Bind one socket to a port and connect it twice (the first connect failing, as a rule);
    /// report both outcomes as JSON.
    ConnectTwice(ConnectTwiceOptions),
    /// Open many connections and hold them; print a JSON line once they are open; after the go
    /// file appears, check each one's getpeername(), exchange a line on each, and report.
    Hold(HoldOptions),
    /// Listen on each address (default 0.0.0.0 and [::], IPv6 only) on each port; answer every
    /// connection with {"tag","local"} as JSON, then close it. Prints `listening` once all are
    /// bound.
    Listen {
        #[arg(long)]
        tag: String,
        #[arg(long, value_delimiter = ',', required = true)]
        ports: Vec<u16>,
        #[arg(long, value_delimiter = ',', default_values_t = [IpAddr::from(Ipv4Addr::UNSPECIFIED), Ipv6Addr::UNSPECIFIED.into()])]
        at: Vec<IpAddr>,
        /// Also answer every datagram on the same addresses and ports, from the address it was
        /// sent to.
        #[arg(long)]
        udp: bool,
        /// SO_REUSEPORT on the TCP listeners: several processes of one UID share them, as
        /// Envoy's workers do.
        #[arg(long)]
        reuseport: bool,
    },
    /// Run each connect of PLAN (a JSON array of {"to","bind","transport"}) in turn and print
    /// one JSON line per connect with who answered it, or how it failed.
    ConnectBatch {
        #[arg(long)]
        plan: String,
    },
    /// Make a loopback connection and call getsockopt(LEVEL, NAME) on its accepted end with an
    /// OPTLEN-byte buffer; report the errno and the answer as JSON.
    Getsockopt {
        /// Over [::1] instead of 127.0.0.1.
        #[arg(long)]
        ipv6: bool,
        #[arg(long)]
        level: i32,
        #[arg(long)]
        name: i32,
        #[arg(long)]
        optlen: u32,
    },
    /// Ask a DNS server for a name over UDP, from a new socket per query; report as JSON.
    DnsQuery(DnsQueryOptions),
    /// Take GROUPS supplementary groups (needs root), make a unix socketpair and call
    /// getsockopt(SO_PEERGROUPS) on it with an OPTLEN-byte buffer; report as JSON.
    PeerGroups {
        #[arg(long)]
        groups: u32,
        #[arg(long)]
        optlen: u32,
    },
    /// Istio's istio-validation check: listen on each LISTEN, connect from 127.0.0.1:0 to PROBE
    /// until a listener reads PROBE's port as the original destination; report as JSON, exit 1
    /// when none did within the timeout.
    IstioValidation {
        #[arg(long, value_delimiter = ',', default_values_t = [SocketAddr::from((Ipv4Addr::LOCALHOST, 15001)), SocketAddr::from((Ipv4Addr::LOCALHOST, 15006))])]
        listen: Vec<SocketAddr>,
        #[arg(long, default_value_t = SocketAddr::from((Ipv4Addr::new(127, 0, 0, 6), 15002)))]
        probe: SocketAddr,
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
    /// Wait for SIGTERM or SIGINT, then exit 0: the process of a pod sandbox, which holds the
    /// pod's namespaces. As PID 1 of a container it gets no signal it does not handle.
    Pause,
}

fn main() {
    // clap exits with status 2 on bad arguments.
    let cli = Cli::parse();
    let result = match cli.command {
        Action::Exec {
            netns,
            cgroup,
            uid,
            gid,
            nofile,
            resolv_conf,
            command,
        } => exec_in_pod(
            &netns,
            cgroup.as_deref(),
            uid.zip(gid),
            nofile,
            resolv_conf.as_deref(),
            &command,
        )
        .map(|never| match never {}),
        Action::Serve { listen, log } => serve::serve(&listen, log),
        Action::Connect(options) => {
            connect(&options);
            Ok(())
        }
        Action::ConnectLoop(options) => connect_loop::connect_loop(&options),
        Action::ConnectTwice(options) => print_json(&connect_twice(&options)),
        Action::Hold(options) => hold::hold(&options),
        Action::Listen {
            tag,
            ports,
            at,
            udp,
            reuseport,
        } => listen(&tag, &ports, &at, udp, reuseport),
        Action::ConnectBatch { plan } => connect_batch(&plan),
        Action::Getsockopt {
            ipv6,
            level,
            name,
            optlen,
        } => probes::getsockopt_on_accepted(ipv6, level, name, optlen)
            .and_then(|report| print_json(&report)),
        Action::DnsQuery(options) => udp::dns_query(&options),
        Action::PeerGroups { groups, optlen } => {
            probes::peer_groups(groups, optlen).and_then(|report| print_json(&report))
        }
        Action::IstioValidation {
            listen,
            probe,
            timeout_ms,
        } => validation::validate(&listen, probe, Duration::from_millis(timeout_ms)),
        Action::Pause => pause(),
    };
    if let Err(error) = result {
        eprintln!("e2e-helper: {error:#}");
        std::process::exit(1);
    }
}

fn pause() -> Result<()> {
    let mut stop = SigSet::empty();
    stop.add(Signal::SIGTERM);
    stop.add(Signal::SIGINT);
    // Blocked, the signals stay pending until sigwait takes one, whatever their disposition.
    stop.thread_block().context("blocking SIGTERM and SIGINT")?;
    stop.wait().context("waiting for SIGTERM or SIGINT")?;
    Ok(())
}

/// One JSON line on stdout: the report the harness parses.
fn print_json(value: &impl serde::Serialize) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", serde_json::to_string(value)?)?;
    stdout.flush()?;
    Ok(())
}

/// The order matters: the cgroup is joined through /sys/fs/cgroup of the current mount namespace,
/// and the identity is dropped last because joining, mounting and raising limits need root. No
/// thread exists yet, so setns, unshare and the set*id calls apply to the whole process.
fn exec_in_pod(
    netns: &str,
    cgroup: Option<&std::path::Path>,
    identity: Option<(u32, u32)>,
    nofile: Option<u64>,
    resolv_conf: Option<&std::path::Path>,
    command: &[std::ffi::OsString],
) -> Result<Infallible> {
    if let Some(cgroup) = cgroup {
        let procs = cgroup.join("cgroup.procs");
        std::fs::write(&procs, std::process::id().to_string())
            .with_context(|| format!("joining cgroup {}", cgroup.display()))?;
    }

    let netns_path = PathBuf::from("/run/netns").join(netns);
    let netns_file = std::fs::File::open(&netns_path)
        .with_context(|| format!("opening netns {}", netns_path.display()))?;
    setns(&netns_file, CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering netns {netns}"))?;
    drop(netns_file);

    if let Some(file) = resolv_conf {
        see_as_resolv_conf(file)?;
    }
    if let Some(nofile) = nofile {
        setrlimit(Resource::RLIMIT_NOFILE, nofile, nofile)
            .with_context(|| format!("setting RLIMIT_NOFILE to {nofile}"))?;
    }
    if let Some((uid, gid)) = identity {
        setgroups(&[]).context("clearing supplementary groups")?;
        setgid(Gid::from_raw(gid)).with_context(|| format!("setgid({gid})"))?;
        setuid(Uid::from_raw(uid)).with_context(|| format!("setuid({uid})"))?;
    }

    let argv = command
        .iter()
        .map(|arg| CString::new(arg.as_bytes()))
        .collect::<Result<Vec<_>, _>>()
        .context("command argument contains a NUL byte")?;
    let error = execvp(&argv[0], &argv).unwrap_err();
    Err(error).with_context(|| format!("executing {:?} as {identity:?}", command[0]))
}

/// Gives this process (and what it executes) a mount namespace of its own in which `file` is
/// /etc/resolv.conf; the host's mounts stay as they are (private propagation first, so that
/// the bind mount does not leak back).
fn see_as_resolv_conf(file: &std::path::Path) -> Result<()> {
    const RESOLV_CONF: &str = "/etc/resolv.conf";
    unshare(CloneFlags::CLONE_NEWNS).context("unsharing the mount namespace")?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("making the mounts private")?;
    mount(
        Some(file),
        RESOLV_CONF,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .with_context(|| format!("bind-mounting {} on {RESOLV_CONF}", file.display()))
}

fn connect(options: &ConnectOptions) {
    let output = if options.count == 1 {
        serde_json::to_string(&one_connection(options))
    } else {
        let mut summary = ConnectSummary::default();
        let stopped = || options.stop_file.as_ref().is_some_and(|file| file.exists());
        for _ in 0..options.count {
            if stopped() {
                break;
            }
            match one_connection(options).error {
                None => summary.ok += 1,
                Some(error) => {
                    summary.failed += 1;
                    summary.first_error.get_or_insert(error);
                }
            }
        }
        serde_json::to_string(&summary)
    };
    println!("{}", output.expect("reports always serialize"));
}

/// A connection failure is part of the report, not an error of the helper.
fn one_connection(options: &ConnectOptions) -> ConnectReport {
    let mut report = ConnectReport::default();
    if let Err(error) = exchange(options, &mut report) {
        report.error = Some(format!("{error:#}"));
    }
    report
}

/// Fills `report` as it goes, so a failure still shows how far the connection got.
fn exchange(options: &ConnectOptions, report: &mut ConnectReport) -> Result<()> {
    let socket = match options.bind_port {
        Some(port) => bound_socket(options.to, port)?,
        None => new_socket(options.to)?,
    };
    exchange_on(socket, options, report).map(drop)
}

fn new_socket(destination: SocketAddr) -> Result<Socket> {
    Socket::new(
        Domain::for_address(destination),
        Type::STREAM,
        Some(Protocol::TCP),
    )
    .context("creating socket")
}

/// A socket bound to `port` on the unspecified address of `destination`'s family, with
/// SO_REUSEADDR: repeated runs reuse the port while an earlier connection is in TIME_WAIT, and
/// two sockets may hold the port as long as neither listens.
fn bound_socket(destination: SocketAddr, port: u16) -> Result<Socket> {
    let socket = new_socket(destination)?;
    let unspecified = match destination {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
    };
    socket
        .set_reuse_address(true)
        .context("setting SO_REUSEADDR")?;
    socket
        .bind(&unspecified.into())
        .with_context(|| format!("binding {unspecified}"))?;
    Ok(socket)
}

/// Connects `socket` to `options.to`, sends the line and (unless told not to) reads the reply;
/// returns the stream, still open.
fn exchange_on(
    socket: Socket,
    options: &ConnectOptions,
    report: &mut ConnectReport,
) -> Result<TcpStream> {
    let destination = options.to;
    if options.fastopen {
        setsockopt(&socket, sockopt::TcpFastOpenConnect, &true)
            .context("setting TCP_FASTOPEN_CONNECT")?;
    }
    socket
        .connect_timeout(&destination.into(), CONNECT_TIMEOUT)
        .with_context(|| format!("connecting to {destination}"))?;
    let stream: TcpStream = socket.into();
    // With fast open, connect() only noted the destination: the SYN leaves with the first write.
    if !options.fastopen {
        record_addresses(&stream, report)?;
    }

    if options.hold_ms > 0 {
        std::thread::sleep(Duration::from_millis(options.hold_ms));
    }
    stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
    stream.set_write_timeout(Some(REPLY_TIMEOUT))?;
    (&stream)
        .write_all(format!("{}\n", options.message).as_bytes())
        .context("sending the message")?;
    if options.fastopen {
        record_addresses(&stream, report)?;
    }
    if options.close_after_send {
        // The caller drops it at once: a FIN right behind the line.
        return Ok(stream);
    }
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .context("reading the reply")?;
    ensure!(!reply.is_empty(), "connection closed without a reply");
    report.reply = Some(
        serde_json::from_str(reply.trim_end())
            .with_context(|| format!("reply is not JSON: {reply:?}"))?,
    );
    Ok(stream)
}

/// getsockname() and getpeername() of a connected stream.
fn record_addresses(stream: &TcpStream, report: &mut ConnectReport) -> Result<()> {
    report.local = Some(stream.local_addr().context("getsockname")?);
    report.peer = Some(stream.peer_addr().context("getpeername")?);
    Ok(())
}

fn connect_twice(options: &ConnectTwiceOptions) -> ConnectTwiceReport {
    let mut report = ConnectTwiceReport::default();
    if let Err(error) = connect_twice_into(options, &mut report) {
        report.second.error.get_or_insert(format!("{error:#}"));
    }
    report
}

/// Fills `report` as it goes, like [`exchange`].
fn connect_twice_into(
    options: &ConnectTwiceOptions,
    report: &mut ConnectTwiceReport,
) -> Result<()> {
    let mut occupier = None;
    if let Some(to) = options.occupy {
        // A whole exchange: its reply means the other end (a proxy) has handled this
        // connection before the reused socket comes.
        let mut occupied = ConnectReport::default();
        let exchanged = exchange_on(
            bound_socket(to, options.bind_port)?,
            &ConnectOptions::to(to).message("occupier"),
            &mut occupied,
        );
        report.occupier = Some(occupied);
        occupier = Some(exchanged.context("occupying the port")?);
    }
    let socket = bound_socket(options.first, options.bind_port)?;
    if let Err(error) = socket.connect_timeout(&options.first.into(), CONNECT_TIMEOUT) {
        report.first_errno = error.raw_os_error();
        report.first_error = Some(error.to_string());
    }
    if options.release_before_second {
        if let Some(stream) = occupier.take() {
            // Closed at the end of this block with a reset instead of a FIN: the 4-tuple is
            // free at once, with no TIME_WAIT.
            SockRef::from(&stream)
                .set_linger(Some(Duration::ZERO))
                .context("setting SO_LINGER 0 on the occupying socket")?;
        }
    }
    let second = ConnectOptions::to(options.second).message(&options.message);
    let result = exchange_on(socket, &second, &mut report.second);
    // The occupier, unless released, stays connected until the second exchange is over.
    drop(occupier);
    result.map(drop)
}

fn listen(tag: &str, ports: &[u16], at: &[IpAddr], udp: bool, reuseport: bool) -> Result<()> {
    let mut listeners = Vec::new();
    let mut datagrams = Vec::new();
    for &port in ports {
        for &ip in at {
            let addr = SocketAddr::new(ip, port);
            listeners.push(tcp_listener(addr, reuseport)?);
            if udp {
                datagrams.push(udp::listener(addr)?);
            }
        }
    }
    println!("listening");
    std::io::stdout().flush()?;
    std::thread::scope(|scope| {
        for socket in &datagrams {
            scope.spawn(move || udp::answer_datagrams(socket, tag));
        }
        for listener in &listeners {
            scope.spawn(move || {
                for stream in listener.incoming() {
                    if let Err(error) = stream
                        .map_err(anyhow::Error::from)
                        .and_then(|stream| tell_where(stream, tag))
                    {
                        eprintln!("e2e-helper listen: {error:#}");
                    }
                }
            });
        }
    });
    Ok(())
}

/// A TCP listener on `addr` with SO_REUSEADDR (and SO_REUSEPORT with `reuseport`); an IPv6 one
/// takes IPv6 connections only.
fn tcp_listener(addr: SocketAddr, reuseport: bool) -> Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        // IPv4 (and IPv4-mapped) connections belong to the IPv4 listener.
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(reuseport)?;
    socket
        .bind(&addr.into())
        .with_context(|| format!("binding {addr}"))?;
    socket.listen(128)?;
    Ok(socket.into())
}

/// Writes which listener `stream` reached, and at which address, then closes it.
fn tell_where(mut stream: TcpStream, tag: &str) -> Result<()> {
    let reply = ListenerReply {
        tag: tag.to_owned(),
        local: stream.local_addr()?,
    };
    writeln!(stream, "{}", serde_json::to_string(&reply)?)?;
    Ok(())
}

fn connect_batch(plan: &str) -> Result<()> {
    let plan: Vec<PlannedConnect> = serde_json::from_str(plan).context("parsing --plan")?;
    let mut stdout = std::io::stdout().lock();
    for connect in plan {
        let reached = match planned_exchange(connect) {
            Ok(reply) => Reached::Answered(reply),
            Err(error) => Reached::Failed(failure_kind(&error)),
        };
        let outcome = ConnectOutcome { connect, reached };
        writeln!(stdout, "{}", serde_json::to_string(&outcome)?)?;
    }
    stdout.flush()?;
    Ok(())
}

fn planned_exchange(connect: PlannedConnect) -> Result<ListenerReply> {
    if connect.transport != Transport::Tcp {
        return udp::probe(connect, BATCH_REPLY_TIMEOUT);
    }
    let socket = Socket::new(
        Domain::for_address(connect.to),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    if let Some(ip) = connect.bind {
        let local = SocketAddr::new(ip, 0);
        socket
            .bind(&local.into())
            .with_context(|| format!("binding {local}"))?;
    }
    socket.connect_timeout(&connect.to.into(), BATCH_CONNECT_TIMEOUT)?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(BATCH_REPLY_TIMEOUT))?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply)?;
    serde_json::from_str(reply.trim_end()).with_context(|| format!("reply {reply:?}"))
}

/// A short name for the usual ways a connect fails, the full text otherwise.
fn failure_kind(error: &anyhow::Error) -> String {
    let kind = error.downcast_ref::<std::io::Error>().map(|e| e.kind());
    match kind {
        Some(ErrorKind::ConnectionRefused) => "refused".into(),
        Some(ErrorKind::TimedOut | ErrorKind::WouldBlock) => "timeout".into(),
        Some(ErrorKind::NetworkUnreachable | ErrorKind::HostUnreachable) => "unreachable".into(),
        _ => format!("{error:#}"),
    }
}
