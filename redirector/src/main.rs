//! `redirector`: the command line over the library.
use std::{
    io::IsTerminal as _,
    os::fd::AsFd,
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use redirector::{
    agent::{
        api::{EnrollRequest, NodePod, NodeStatus, PodSelector},
        client,
        config::{AgentFlags, NodeFlags},
        server,
        store::PodMeta,
    },
    cni::{
        install::{InstallCniFlags, Installation},
        select::Reason,
    },
    flags::{IstioFlags, OutputFormat},
    loader::Programs,
    pins::PinRoot,
    pods::{RecordCounts, Redirector},
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
    /// Capture a pod's traffic (returns once interception is active).
    Enroll(Box<EnrollArgs>),
    /// Stop capturing a pod's traffic and remove everything enrolling it made (idempotent).
    Unenroll {
        /// The pod's cgroup v2 directory.
        #[arg(long)]
        cgroup: PathBuf,
    },
    /// List enrolled pods, their settings and counters (the agent's, when one runs).
    Status {
        #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
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
    /// The pod's cgroup v2 directory (also with --dry-run, which checks it as enroll would).
    #[arg(long)]
    cgroup: PathBuf,
    /// The pod's network namespace (e.g. /run/netns/NAME or /proc/PID/ns/net): its addresses
    /// are the pod's local ones, and decide whether IPv6 is captured, as in istio-iptables.
    /// Through an agent, later address changes are followed (the pod is enrolled again);
    /// without one, the addresses are read once: run enroll again after a change.
    #[arg(long, visible_alias = "network-namespace")]
    netns: Option<PathBuf>,
    #[command(flatten)]
    istio: IstioFlags,
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
        // Colours only for a person at a terminal: `kubectl logs` and files show escapes raw.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let target = cli.node.target();
    match cli.command {
        Command::Enroll(args) => enroll(&target, *args)?,
        Command::Unenroll { cgroup } => {
            let (was, via) = client::unenroll(&target, PodSelector::Cgroup(cgroup.clone()))
                .with_context(|| format!("unenrolling {}", cgroup.display()))?;
            tracing::info!(cgroup = %cgroup.display(), ?via, "{}", if was.is_some() { "unenrolled" } else { "was not enrolled" });
        }
        Command::Status { output } => {
            let (status, _) = client::status(&target)?;
            match output {
                OutputFormat::Json => println!("{}", serde_json::to_string(&status)?),
                OutputFormat::Table => print_table(&status),
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

fn enroll(target: &client::Target, args: EnrollArgs) -> anyhow::Result<()> {
    let request = EnrollRequest {
        cgroup: args.cgroup.clone(),
        meta: PodMeta {
            netns: args.netns,
            ..PodMeta::default()
        },
        policy: Some(args.istio.to_policy()?),
        pod_settings: None,
        // The same request either way: a dry run goes through every check of an enroll.
        dry_run: args.istio.dry_run,
    };
    let (pod, via) = client::enroll(target, request)
        .with_context(|| format!("enrolling {}", args.cgroup.display()))?;
    if !args.istio.dry_run {
        tracing::info!(cgroup = %pod.cgroup.display(), cgroup_id = pod.cgroup_id, ?via, "enrolled");
        return Ok(());
    }
    match args.istio.output {
        OutputFormat::Table => {
            let verdict = if pod.ipv6_captured {
                "captured"
            } else {
                "not captured"
            };
            let ipv6 = match &pod.netns {
                Some(path) => format!("{verdict} (from the addresses of {})", path.display()),
                None => format!("{verdict} (no --netns given)"),
            };
            print!("{}", pod.policy.render_table(&ipv6));
        }
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&pod)?),
    }
    tracing::info!(cgroup = %pod.cgroup.display(), ?via, "dry run: every check passed, nothing changed");
    Ok(())
}

fn print_table(status: &NodeStatus) {
    println!(
        "{:<30} {:<50} {:>10} {:>11} {:<12} {:<12} {:>10} {:>9} {:>8} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "POD",
        "CGROUP",
        "ID",
        "PORTS",
        "PROXY-UIDS",
        "PROXY-GIDS",
        "REDIRECTED",
        "EXEMPTED",
        "LOOKUPS",
        "MISSES",
        "IN-CAPT",
        "IN-EXCL",
        "IN-NOPRX",
        "DNS",
        "ADDR-CHG"
    );
    let list = |ids: &[u32]| ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    for NodePod {
        status: pod,
        meta,
        addresses_followed,
        ..
    } in &status.pods
    {
        let cgroup = pod
            .cgroup
            .as_ref()
            .map_or("(gone)".to_owned(), |p| p.display().to_string());
        let name = meta
            .pod
            .as_ref()
            .map_or("-".to_owned(), |p| format!("{}/{}", p.namespace, p.name));
        let ports = format!("{}/{}", pod.proxy_port, pod.inbound_capture_port);
        let c = pod.counters;
        println!(
            "{:<30} {:<50} {:>10} {:>11} {:<12} {:<12} {:>10} {:>9} {:>8} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9}",
            name,
            cgroup,
            pod.cgroup_id,
            ports,
            list(&pod.proxy_uids),
            list(&pod.proxy_gids),
            c.redirected,
            c.exempted,
            c.orig_dst_lookups,
            c.orig_dst_misses,
            c.inbound_captured,
            c.inbound_excluded,
            c.inbound_no_proxy,
            c.dns_redirected,
            addresses_followed
        );
    }
    let RecordCounts {
        in_flight,
        capacity,
        overflowed,
    } = status.records;
    println!(
        "connection handshakes in flight: {in_flight} (capacity {capacity}; could not be kept: {overflowed})"
    );
    if let Some(agent) = &status.agent {
        let counts = |counts: &std::collections::BTreeMap<Reason, u64>| {
            let listed: Vec<String> = counts
                .iter()
                .map(|(reason, n)| format!("{} {n}", reason.name()))
                .collect();
            if listed.is_empty() {
                "none".to_owned()
            } else {
                listed.join(", ")
            }
        };
        println!(
            "CNI, pods not enrolled since the agent started: passed through: {}; ADD failed: {}",
            counts(&agent.cni.skipped),
            counts(&agent.cni.failed)
        );
        println!(
            "pods' address changes the agent failed to follow since it started: {}",
            agent.address_follow_failures
        );
    }
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
    let program_id = Programs::log_program_id(root)?;
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
