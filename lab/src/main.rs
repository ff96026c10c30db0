//! `redirector-lab`: redirector against iptables REDIRECT, measured side by side on one machine.
//!
//! `redirector-lab run` (what `cargo xtask lab` starts, as root) builds its own network
//! namespaces and cgroups, runs the traffic patterns on every variant, times the per-pod setup
//! of both methods, prints the tables and writes everything under `target/lab/`. Progress goes
//! to stderr. `serve` and `load` are the two ends of the traffic, started by `run` inside the
//! pods.
//!
//! Data flows one way through four stages: the rig ([`rig`]: topology, processes), the
//! measurement ([`measure`]: load, kernel accounting, perf, setup timing; it produces
//! [`records`]), the analysis ([`analysis`]: statistics, ratios, goals) and the rendering
//! ([`render`]: tables, `summary.json`, CSV, chart). [`variant`] is the vocabulary they share.

mod analysis;
mod load;
mod measure;
mod parallel;
mod records;
mod render;
mod rig;
mod serve;
mod timed;
mod turns;
mod variant;
mod wire;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::analysis::Results;
use crate::load::Schedule;
use crate::measure::machine::system_info;
use crate::measure::perf;
use crate::measure::programs::{passes, profile_programs};
use crate::measure::setup::{run_setup, SetupPlan};
use crate::measure::traffic::{run_traffic, TrafficPlan};
use crate::records::{Config, Measurements};
use crate::render::table::Style;
use crate::render::tables::tables;
use crate::rig::cpus::CpuPlan;
use crate::rig::Rig;
use crate::variant::Variant;
use crate::wire::Pattern;

/// Length of a turn when variants take turns: hundreds of transactions, short next to the
/// drifts of a shared VM.
const TURN_SLICE: Duration = Duration::from_millis(50);

/// Background CPU use (in CPUs) above which the lab warns that its figures will be noisy.
const BUSY_WARNING: f64 = 0.1;

#[derive(Parser)]
#[command(
    name = "redirector-lab",
    about = "redirector against iptables REDIRECT, measured side by side on one machine"
)]
struct Cli {
    #[command(subcommand)]
    command: Action,
}

#[derive(Subcommand)]
enum Action {
    /// Run the whole lab (needs root): traffic on every variant, then per-pod setup cost.
    Run(RunOptions),
    /// Serve every traffic pattern, one listener per address (started by `run` in the server
    /// netns).
    Serve {
        #[arg(long, value_delimiter = ',', required = true)]
        listen: Vec<SocketAddr>,
    },
    /// Run one traffic pattern and print a JSON report (started by `run` in a pod).
    Load {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, value_enum)]
        pattern: Pattern,
        /// Message size of the request/response pattern, in bytes.
        #[arg(long, default_value_t = 1)]
        size: usize,
        #[arg(long, default_value_t = 500)]
        warmup_ms: u64,
        #[arg(long, default_value_t = 3000)]
        duration_ms: u64,
        /// Send in turns: wait for a byte on this FIFO before each turn (end of file ends the
        /// run); --duration-ms is then ignored.
        #[arg(long, requires_all = ["done", "slice_ms"])]
        go: Option<PathBuf>,
        /// Write a byte to this FIFO after each turn.
        #[arg(long, requires = "go")]
        done: Option<PathBuf>,
        /// Length of a turn.
        #[arg(long, requires = "go")]
        slice_ms: Option<u64>,
    },
}

#[derive(Args)]
struct RunOptions {
    /// A short run for CI: one round of short runs, setup at N = 1 and 10. Other options still
    /// override.
    #[arg(long)]
    quick: bool,
    /// Rounds of every workload on every variant [default: 8; quick: 1].
    #[arg(long)]
    rounds: Option<u32>,
    /// Measured seconds per variant, workload and round [default: 2; quick: 0.6].
    #[arg(long)]
    seconds: Option<f64>,
    /// Unmeasured warm-up seconds before each run [default: 0.3; quick: 0.1].
    #[arg(long)]
    warmup_seconds: Option<f64>,
    /// Numbers of pods to time the setup for [default: 1,10,100,1000; quick: 1,10].
    #[arg(long, value_delimiter = ',')]
    setup_sizes: Option<Vec<usize>>,
    /// Rounds of the setup timing (the per-pod percentiles pool them) [default: 2; quick: 1].
    #[arg(long)]
    setup_rounds: Option<u32>,
    /// Pods set up at once in the parallel setup mode.
    #[arg(long, default_value_t = 8)]
    setup_parallel: usize,
    /// Leave out the HAProxy cross-check variants.
    #[arg(long)]
    no_haproxy: bool,
    /// Run only these variants, e.g. `B1,IPT,EBPF` [default: all]. The not-captured tax needs
    /// B0 and EBPF/not-captured.
    #[arg(long, value_delimiter = ',', value_parser = parse_variant)]
    variants: Option<Vec<Variant>>,
    /// Skip the CPU profiles with perf (never taken in quick mode).
    #[arg(long)]
    no_perf: bool,
    /// Where the results go [default: target/lab next to the binary's profile folder].
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Action::Run(options) => run(options),
        Action::Serve { listen } => serve::serve(&listen),
        Action::Load {
            to,
            pattern,
            size,
            warmup_ms,
            duration_ms,
            go,
            done,
            slice_ms,
        } => load::run(&load::LoadOptions {
            to,
            pattern,
            size,
            schedule: match (go, done, slice_ms) {
                (Some(go), Some(done), Some(slice_ms)) => Schedule::Turns {
                    go,
                    done,
                    slice: Duration::from_millis(slice_ms),
                    warmup: Duration::from_millis(warmup_ms),
                },
                _ => Schedule::Continuous {
                    warmup: Duration::from_millis(warmup_ms),
                    duration: Duration::from_millis(duration_ms),
                },
            },
        })
        .and_then(|report| {
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }),
    };
    if let Err(error) = result {
        eprintln!("redirector-lab: {error:#}");
        std::process::exit(1);
    }
}

fn run(options: RunOptions) -> Result<()> {
    let quick = options.quick;
    let config = Config {
        quick,
        rounds: options.rounds.unwrap_or(pick(quick, 8, 1)).max(1),
        seconds_per_run: options.seconds.unwrap_or(pick(quick, 2.0, 0.6)),
        warmup_seconds: options.warmup_seconds.unwrap_or(pick(quick, 0.3, 0.1)),
        turn_ms: TURN_SLICE.as_millis(),
        setup_sizes: options
            .setup_sizes
            .unwrap_or_else(|| pick(quick, vec![1, 10, 100, 1000], vec![1, 10])),
        setup_rounds: options.setup_rounds.unwrap_or(pick(quick, 2, 1)).max(1),
        setup_parallel: options.setup_parallel,
        variants: Variant::ALL
            .into_iter()
            .filter(|variant| !(options.no_haproxy && Variant::HAPROXY.contains(variant)))
            .filter(|variant| {
                options
                    .variants
                    .as_ref()
                    .is_none_or(|chosen| chosen.contains(variant))
            })
            .collect(),
    };
    anyhow::ensure!(
        config.setup_sizes.iter().all(|&n| n > 0),
        "--setup-sizes must be positive numbers of pods"
    );
    anyhow::ensure!(
        config.setup_parallel > 0,
        "--setup-parallel must be at least 1"
    );
    anyhow::ensure!(!config.variants.is_empty(), "no variant left to run");
    anyhow::ensure!(
        config.seconds_per_run > 0.0 && config.seconds_per_run.is_finite(),
        "--seconds must be a positive number, not {}",
        config.seconds_per_run
    );
    anyhow::ensure!(
        config.warmup_seconds >= 0.0 && config.warmup_seconds.is_finite(),
        "--warmup-seconds must be zero or positive, not {}",
        config.warmup_seconds
    );
    let out = match options.out {
        Some(out) => out,
        None => default_out_dir()?,
    };
    let cpus = CpuPlan::detect();
    let system = system_info(&cpus);
    eprintln!(
        "lab: kernel {}, {} ({} CPUs; {}); {}",
        system.kernel, system.cpu, system.cpus, system.pinning, system.iptables
    );
    if let Some(busy) = system
        .busy_cpus_before_start
        .filter(|&busy| busy > BUSY_WARNING)
    {
        eprintln!("lab: warning: {busy:.2} CPUs were busy before the start; other work on the machine makes the figures noisy");
    }

    let seconds = Duration::from_secs_f64(config.seconds_per_run);
    let quiet_timeout = pick(quick, Duration::from_secs(10), Duration::from_millis(500));
    let plan = TrafficPlan {
        variants: config.variants.clone(),
        rounds: config.rounds,
        warmup: Duration::from_secs_f64(config.warmup_seconds),
        duration: seconds,
        slice: TURN_SLICE,
        quiet_timeout,
    };
    let with_perf = !quick && !options.no_perf && perf::available();
    let (traffic, program_costs, perf, intercepted_connections) = {
        let rig = Rig::build(&config.variants, cpus)?;
        let traffic = run_traffic(&rig, &plan)?;
        let program_costs = profile_programs(&rig, &passes(&config.variants), seconds)?;
        let perf = if with_perf {
            let profiled: Vec<Variant> = [Variant::B1, Variant::Ipt, Variant::Ebpf]
                .into_iter()
                .filter(|variant| config.variants.contains(variant))
                .collect();
            perf::profile(&rig, &profiled, plan.warmup, seconds, &out.join("perf"))?
        } else {
            Vec::new()
        };
        let evidence = rig.interception_evidence()?;
        eprintln!("lab: traffic done, removing the pods");
        (traffic, program_costs, perf, evidence)
    };
    let setup = run_setup(&SetupPlan {
        sizes: config.setup_sizes.clone(),
        rounds: config.setup_rounds,
        parallel: config.setup_parallel,
        quiet_timeout,
        teardown_timeout: pick(quick, Duration::from_secs(180), Duration::from_secs(5)),
    })?;

    let results = Results::analyse(
        system,
        config,
        Measurements {
            samples: traffic.samples,
            turn_samples: traffic.turn_samples,
            program_costs,
            perf,
            setup_samples: setup.samples,
            setup_batches: setup.batches,
            map_memory_bytes: setup.map_memory_bytes,
            intercepted_connections: intercepted_connections.into_iter().collect(),
        },
    );
    let files = render::write_files(&results, &out)?;
    print!("{}", tables(&results, Style::Text));
    eprintln!("lab: wrote {} to {}", files.join(", "), out.display());
    Ok(())
}

fn parse_variant(name: &str) -> Result<Variant, String> {
    Variant::ALL
        .into_iter()
        .find(|variant| variant.name().eq_ignore_ascii_case(name))
        .ok_or_else(|| {
            let known: Vec<&str> = Variant::ALL.into_iter().map(Variant::name).collect();
            format!(
                "unknown variant {name:?}; the variants are {}",
                known.join(", ")
            )
        })
}

/// The quick-mode default or the full one.
fn pick<T>(quick: bool, full: T, short: T) -> T {
    if quick {
        short
    } else {
        full
    }
}

/// `target/lab`: the binary lives in `target/<profile>/`.
fn default_out_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the running executable")?;
    let target = exe
        .parent()
        .and_then(|profile| profile.parent())
        .context("the executable has no target folder above it")?;
    Ok(target.join("lab"))
}
