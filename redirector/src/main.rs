//! `redirector`: the command line over the library.
use std::{
    os::fd::AsFd,
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand, ValueEnum};
use redirector::{
    agent::{
        api::{EnrollRequest, NodePod, NodeStatus, PodSelector},
        client,
        config::{AgentFlags, NodeFlags},
        server,
    },
    cni::install::{InstallCniFlags, Installation},
    loader::Programs,
    pins::PinRoot,
    pods::{RecordCounts, Redirector},
    policy::{self, IdKind, OutboundPolicy},
};

#[derive(Parser)]
#[command(
    name = "redirector",
    version,
    about = "iptables-free traffic interception for service-mesh sidecars"
)]
struct Cli {
    #[command(flatten)]
    node: NodeFlags,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Capture a pod's outbound TCP (returns once interception is active).
    Enroll(EnrollArgs),
    /// Stop capturing a pod's traffic and remove everything enrolling it made (idempotent).
    Unenroll {
        /// The pod's cgroup v2 directory.
        #[arg(long)]
        cgroup: PathBuf,
    },
    /// List enrolled pods, their settings and counters (the agent's, when one runs).
    Status {
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Remove every pin and attachment (all pods).
    Uninstall,
    /// Run the node agent: load the programs, adopt pinned pods, serve the API and metrics.
    Agent(AgentFlags),
    /// Copy redirector-cni into the CNI bin dir and chain it last in the node's conflist.
    InstallCni(InstallCniFlags),
    /// Remove redirector-cni from the conflist and the CNI bin dir.
    UninstallCni(InstallCniFlags),
    /// Switch on the programs' per-connection log lines and print them until Ctrl-C.
    Log {
        /// Stop after this many seconds.
        #[arg(long)]
        seconds: Option<u64>,
    },
}

#[derive(clap::Args)]
struct EnrollArgs {
    /// The pod's cgroup v2 directory.
    #[arg(long)]
    cgroup: PathBuf,
    /// Port the proxy's outbound listener has on loopback.
    #[arg(short = 'p', long, default_value = "15001", value_parser = policy::parse_port)]
    proxy_port: u16,
    /// UIDs whose connections are not captured (the proxy's), comma-separated.
    #[arg(short = 'u', long = "proxy-uid", default_value = "1337", value_parser = |s: &str| policy::parse_id_list(IdKind::Uid, s).map(IdList))]
    proxy_uids: IdList,
    /// GIDs whose connections are not captured (the proxy's), comma-separated.
    #[arg(short = 'g', long = "proxy-gid", default_value = "1337", value_parser = |s: &str| policy::parse_id_list(IdKind::Gid, s).map(IdList))]
    proxy_gids: IdList,
}

#[derive(Clone)]
struct IdList(Vec<u32>);

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Command::Agent(flags) = &cli.command {
        // The agent sets up its own logging (its config file may ask for JSON).
        return Ok(server::main(&cli.node, flags)?);
    }
    // The kernel's lines arrive at debug level under the programs' module paths.
    let default_filter = if matches!(cli.command, Command::Log { .. }) {
        "warn,redirector=debug"
    } else {
        "info"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .init();
    let target = cli.node.target();
    match cli.command {
        Command::Enroll(args) => {
            let policy = OutboundPolicy {
                proxy_port: args.proxy_port,
                proxy_uids: args.proxy_uids.0,
                proxy_gids: args.proxy_gids.0,
            };
            let request = EnrollRequest {
                cgroup: args.cgroup.clone(),
                meta: Default::default(),
                policy: Some(policy),
            };
            let (pod, via) = client::enroll(&target, request)
                .with_context(|| format!("enrolling {}", args.cgroup.display()))?;
            tracing::info!(cgroup = %pod.cgroup.display(), cgroup_id = pod.cgroup_id, policy = ?pod.policy, ?via, "enrolled");
        }
        Command::Unenroll { cgroup } => {
            let (was, via) = client::unenroll(&target, PodSelector::Cgroup(cgroup.clone()))
                .with_context(|| format!("unenrolling {}", cgroup.display()))?;
            tracing::info!(cgroup = %cgroup.display(), ?via, "{}", if was.is_some() { "unenrolled" } else { "was not enrolled" });
        }
        Command::Status { output } => {
            let (status, _) = client::status(&target)?;
            match output {
                Output::Json => println!("{}", serde_json::to_string(&status)?),
                Output::Table => print_table(&status),
            }
        }
        Command::Uninstall => {
            let was = target.node.uninstall()?;
            tracing::info!(root = %target.node.root.path().display(), "{}", if was { "uninstalled" } else { "nothing installed" });
        }
        Command::Log { seconds } => {
            stream_kernel_log(&target.node.root, seconds.map(Duration::from_secs))?
        }
        Command::InstallCni(flags) => {
            let report = Installation::from_flags(&cli.node, &flags)?.install()?;
            tracing::info!(binary = %report.binary.display(), conflist = %report.conflist.display(), "redirector-cni installed and chained");
        }
        Command::UninstallCni(flags) => {
            let report = Installation::from_flags(&cli.node, &flags)?.uninstall()?;
            tracing::info!(binary = %report.binary.display(), conflist = %report.conflist.display(), "redirector-cni removed");
        }
        Command::Agent(_) => unreachable!("handled before logging is set up"),
    }
    Ok(())
}

fn print_table(status: &NodeStatus) {
    println!(
        "{:<30} {:<50} {:>10} {:>6} {:<12} {:<12} {:>10} {:>9} {:>8} {:>7}",
        "POD",
        "CGROUP",
        "ID",
        "PORT",
        "PROXY-UIDS",
        "PROXY-GIDS",
        "REDIRECTED",
        "EXEMPTED",
        "LOOKUPS",
        "MISSES"
    );
    let list = |ids: &[u32]| ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    for NodePod { status: pod, meta } in &status.pods {
        let cgroup = pod
            .cgroup
            .as_ref()
            .map_or("(gone)".to_owned(), |p| p.display().to_string());
        let name = meta
            .pod
            .as_ref()
            .map_or("-".to_owned(), |p| format!("{}/{}", p.namespace, p.name));
        let c = pod.counters;
        println!(
            "{:<30} {:<50} {:>10} {:>6} {:<12} {:<12} {:>10} {:>9} {:>8} {:>7}",
            name,
            cgroup,
            pod.cgroup_id,
            pod.proxy_port,
            list(&pod.proxy_uids),
            list(&pod.proxy_gids),
            c.redirected,
            c.exempted,
            c.orig_dst_lookups,
            c.orig_dst_misses
        );
    }
    let RecordCounts { by_cookie, by_peer } = status.records;
    println!("connection records: {by_cookie} by cookie, {by_peer} by peer");
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Per-connection logging costs the hooks dearly, so it is on only while someone reads it.
fn stream_kernel_log(root: &PinRoot, limit: Option<Duration>) -> anyhow::Result<()> {
    let Some(mut redirector) = Redirector::open(root.clone())? else {
        bail!(
            "nothing is installed under {}: enroll a pod first",
            root.path().display()
        );
    };
    let program_id = Programs::open(root)?.log_program_id()?;
    let mut logger = aya_log::EbpfLogger::init_from_id(program_id)
        .context("opening the programs' log buffer")?;
    redirector.set_connection_logging(true)?;
    // Release the root's lock while streaming: enroll and unenroll must go on meanwhile.
    drop(redirector);
    let handler = nix::sys::signal::SigHandler::Handler(on_interrupt);
    for signal in [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
    ] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { nix::sys::signal::signal(signal, handler) }?;
    }
    let started = Instant::now();
    while !INTERRUPTED.load(Ordering::Relaxed)
        && limit.is_none_or(|limit| started.elapsed() < limit)
    {
        let mut fds = [nix::poll::PollFd::new(
            logger.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(200u16)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => logger.flush(),
            Err(e) => return Err(e).context("waiting for log records"),
        }
    }
    if let Some(mut redirector) = Redirector::open(root.clone())? {
        redirector.set_connection_logging(false)?;
    }
    Ok(())
}
