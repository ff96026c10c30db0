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
    flags::{IstioFlags, OutputFormat},
    loader::Programs,
    netns::PodNetns,
    pins::{PinRoot, DEFAULT_ROOT},
    pods::{self, PodStatus, RecordCounts, Redirector},
};

#[derive(Parser)]
#[command(
    name = "redirector",
    version,
    about = "iptables-free traffic interception for service-mesh sidecars"
)]
struct Cli {
    /// bpffs directory that holds every pin redirector makes.
    #[arg(long, global = true, env = "REDIRECTOR_BPFFS", default_value = DEFAULT_ROOT)]
    bpffs: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Capture a pod's outbound TCP (returns once interception is active).
    Enroll(Box<EnrollArgs>),
    /// Stop capturing a pod's traffic and remove everything enrolling it made (idempotent).
    Unenroll {
        /// The pod's cgroup v2 directory.
        #[arg(long)]
        cgroup: PathBuf,
    },
    /// List enrolled pods, their settings and counters.
    Status {
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Remove every pin and attachment (all pods).
    Uninstall,
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
    #[arg(long, required_unless_present = "dry_run")]
    cgroup: Option<PathBuf>,
    /// The pod's network namespace (e.g. /run/netns/NAME or /proc/PID/ns/net): its addresses
    /// are the pod's local ones, and decide whether IPv6 is captured, as in istio-iptables.
    #[arg(long, visible_alias = "network-namespace")]
    netns: Option<PathBuf>,
    #[command(flatten)]
    istio: IstioFlags,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
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
    let root = PinRoot::new(cli.bpffs);
    match cli.command {
        Command::Enroll(args) => enroll(&root, *args)?,
        Command::Unenroll { cgroup } => {
            let was = pods::unenroll(&root, &cgroup)
                .with_context(|| format!("unenrolling {}", cgroup.display()))?;
            tracing::info!(cgroup = %cgroup.display(), "{}", if was { "unenrolled" } else { "was not enrolled" });
        }
        Command::Status { output } => {
            let (pods, records) = match Redirector::open(root.clone())? {
                Some(redirector) => (redirector.pods()?, redirector.records()),
                None => (Vec::new(), RecordCounts::default()),
            };
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({ "pods": pods, "records": records })
                ),
                Output::Table => print_table(&pods, records),
            }
        }
        Command::Uninstall => {
            let was = pods::uninstall(&root)?;
            tracing::info!(root = %root.path().display(), "{}", if was { "uninstalled" } else { "nothing installed" });
        }
        Command::Log { seconds } => stream_kernel_log(&root, seconds.map(Duration::from_secs))?,
    }
    Ok(())
}

fn enroll(root: &PinRoot, args: EnrollArgs) -> anyhow::Result<()> {
    let policy = args.istio.to_policy()?;
    if args.istio.dry_run {
        let ipv6 = match &args.netns {
            Some(path) => {
                let netns = PodNetns::read(path)?;
                let on = netns.network.ipv6_enabled(policy.dual_stack);
                format!(
                    "{} (from the addresses of {})",
                    if on { "captured" } else { "not captured" },
                    path.display()
                )
            }
            None => "captured (no --netns given)".to_owned(),
        };
        match args.istio.output_format() {
            OutputFormat::Table => print!("{}", policy.render_table(&ipv6)),
            OutputFormat::Json => println!(
                "{}",
                serde_json::to_string_pretty(
                    &serde_json::json!({ "policy": policy, "ipv6": ipv6 })
                )?
            ),
        }
        return Ok(());
    }
    let cgroup = args
        .cgroup
        .expect("clap requires --cgroup without --dry-run");
    let enrolled = pods::enroll(root, &cgroup, &policy, args.netns.as_deref())
        .with_context(|| format!("enrolling {}", cgroup.display()))?;
    tracing::info!(
        cgroup = %enrolled.cgroup.path.display(),
        cgroup_id = enrolled.cgroup.id,
        netns = ?enrolled.netns.as_ref().map(|n| &n.path),
        "enrolled"
    );
    Ok(())
}

fn print_table(pods: &[PodStatus], records: RecordCounts) {
    println!(
        "{:<50} {:>10} {:>11} {:>12} {:>12} {:>10} {:>9} {:>8} {:>7} {:>9} {:>9} {:>9}",
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
        "IN-NOPRX"
    );
    let list = |ids: &[u32]| ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    for pod in pods {
        let cgroup = pod
            .cgroup
            .as_ref()
            .map_or("(gone)".to_owned(), |p| p.display().to_string());
        let ports = format!("{}/{}", pod.proxy_port, pod.inbound_capture_port);
        let c = pod.counters;
        println!(
            "{:<50} {:>10} {:>11} {:>12} {:>12} {:>10} {:>9} {:>8} {:>7} {:>9} {:>9} {:>9}",
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
            c.inbound_no_proxy
        );
    }
    println!(
        "connection records: {} by cookie, {} by peer",
        records.by_cookie, records.by_peer
    );
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
