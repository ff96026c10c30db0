//! Small tools the end-to-end tests run inside pods:
//! - `exec`: enter a cgroup, a netns and an identity (each optional but the netns), then exec a
//!   command;
//! - `serve`: a TCP server answering each line with what it saw of the connection;
//! - `connect`: a TCP client reporting where it ended up connected and what the server saw;
//! - `listen`: TCP listeners on the wildcard addresses of many ports, each answering with a tag
//!   and the address the connection reached;
//! - `connect-batch`: many short connects, one JSON line each saying who answered.

use std::convert::Infallible;
use std::ffi::CString;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use clap::{Parser, Subcommand};
use nix::sched::{setns, CloneFlags};
use nix::unistd::{execvp, setgid, setgroups, setuid, Gid, Uid};
use redirector_tests::{
    ConnectOptions, ConnectOutcome, ConnectReport, ConnectSummary, ListenerReply, PlannedConnect,
    Reached, ServerReply,
};
use socket2::{Domain, Protocol, Socket, Type};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// connect-batch's limits per connect: its destinations answer at once or not at all.
const BATCH_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
const BATCH_REPLY_TIMEOUT: Duration = Duration::from_millis(500);

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
    /// Join a cgroup, then a named netns, then drop to UID/GID, then exec CMD.
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
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<std::ffi::OsString>,
    },
    /// Answer one line per connection with {"peer","local","line"} as JSON, then close.
    Serve {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Connect, send a line, read the reply, and report as JSON.
    Connect(ConnectOptions),
    /// Listen on 0.0.0.0 and [::] (IPv6 only) on each port; answer every connection with
    /// {"tag","local"} as JSON, then close it. Prints `listening` once all are bound.
    Listen {
        #[arg(long)]
        tag: String,
        #[arg(long, value_delimiter = ',', required = true)]
        ports: Vec<u16>,
    },
    /// Run each connect of PLAN (a JSON array of {"to","bind"}) in turn and print one JSON line
    /// per connect with who answered it, or how it failed.
    ConnectBatch {
        #[arg(long)]
        plan: String,
    },
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
            command,
        } => exec_in_pod(&netns, cgroup.as_deref(), uid.zip(gid), &command)
            .map(|never| match never {}),
        Action::Serve { listen } => serve(listen),
        Action::Connect(options) => {
            connect(&options);
            Ok(())
        }
        Action::Listen { tag, ports } => listen(&tag, &ports),
        Action::ConnectBatch { plan } => connect_batch(&plan),
    };
    if let Err(error) = result {
        eprintln!("e2e-helper: {error:#}");
        std::process::exit(1);
    }
}

/// The order matters: the cgroup is joined through /sys/fs/cgroup of the current mount namespace,
/// and the identity is dropped last because joining needs root. No thread exists yet, so setns and
/// the set*id calls apply to the whole process.
fn exec_in_pod(
    netns: &str,
    cgroup: Option<&std::path::Path>,
    identity: Option<(u32, u32)>,
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

fn serve(listen: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    // Tests wait for this line before connecting.
    println!("listening");
    std::io::stdout().flush()?;
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                std::thread::spawn(move || {
                    if let Err(error) = answer(stream) {
                        eprintln!("e2e-helper serve: {error:#}");
                    }
                });
            }
            Err(error) => eprintln!("e2e-helper serve: accept: {error}"),
        }
    }
    Ok(())
}

fn answer(stream: TcpStream) -> Result<()> {
    stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
    stream.set_write_timeout(Some(REPLY_TIMEOUT))?;
    let peer = stream.peer_addr().context("getpeername")?;
    let local = stream.local_addr().context("getsockname")?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .with_context(|| format!("reading from {peer}"))?;
    let reply = ServerReply {
        peer,
        local,
        line: line.trim_end_matches(['\n', '\r']).to_owned(),
    };
    let mut text = serde_json::to_string(&reply)?;
    text.push('\n');
    (&stream)
        .write_all(text.as_bytes())
        .with_context(|| format!("replying to {peer}"))
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
    let destination = options.to;
    let socket = Socket::new(
        Domain::for_address(destination),
        Type::STREAM,
        Some(Protocol::TCP),
    )
    .context("creating socket")?;
    if let Some(port) = options.bind_port {
        let unspecified = match destination {
            SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
            SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
        };
        // Lets repeated runs reuse the port while an earlier connection is in TIME_WAIT.
        socket
            .set_reuse_address(true)
            .context("setting SO_REUSEADDR")?;
        socket
            .bind(&unspecified.into())
            .with_context(|| format!("binding {unspecified}"))?;
    }
    socket
        .connect_timeout(&destination.into(), CONNECT_TIMEOUT)
        .with_context(|| format!("connecting to {destination}"))?;
    let stream: TcpStream = socket.into();
    report.local = Some(stream.local_addr().context("getsockname")?);
    report.peer = Some(stream.peer_addr().context("getpeername")?);

    if options.hold_ms > 0 {
        std::thread::sleep(Duration::from_millis(options.hold_ms));
    }
    stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
    stream.set_write_timeout(Some(REPLY_TIMEOUT))?;
    (&stream)
        .write_all(format!("{}\n", options.message).as_bytes())
        .context("sending the message")?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .context("reading the reply")?;
    ensure!(!reply.is_empty(), "connection closed without a reply");
    report.reply = Some(
        serde_json::from_str(reply.trim_end())
            .with_context(|| format!("reply is not JSON: {reply:?}"))?,
    );
    Ok(())
}

fn listen(tag: &str, ports: &[u16]) -> Result<()> {
    let mut listeners = Vec::new();
    for &port in ports {
        for ip in [
            IpAddr::from(Ipv4Addr::UNSPECIFIED),
            Ipv6Addr::UNSPECIFIED.into(),
        ] {
            let addr = SocketAddr::new(ip, port);
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            if addr.is_ipv6() {
                // IPv4 (and IPv4-mapped) connections belong to the IPv4 listener.
                socket.set_only_v6(true)?;
            }
            socket.set_reuse_address(true)?;
            socket
                .bind(&addr.into())
                .with_context(|| format!("binding {addr}"))?;
            socket.listen(128)?;
            listeners.push(TcpListener::from(socket));
        }
    }
    println!("listening");
    std::io::stdout().flush()?;
    std::thread::scope(|scope| {
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
