//! `redirector-lab`: redirector against iptables REDIRECT, measured side by side on one machine.
//!
//! `redirector-lab run` (what `cargo xtask lab` starts, as root) builds its own network
//! namespaces and cgroups, runs the traffic patterns on every variant (see [`rig`]), times the
//! per-pod setup of both methods (see [`setup_cost`]), prints the tables and writes everything
//! under `target/lab/`. Progress goes to stderr. `serve` and `load` are the two ends of the
//! traffic, started by `run` inside the pods.

mod chart;
mod load;
mod measure;
mod perf;
mod report;
mod rig;
mod serve;
mod setup_cost;
mod system;
mod timed;
mod wire;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::measure::{profile_programs, run_traffic, TrafficPlan, Workload};
use crate::report::{Config, Measurements, Results, Style};
use crate::rig::{CpuPlan, Rig, Variant};
use crate::setup_cost::{run_setup, SetupPlan};
use crate::system::system_info;
use crate::wire::Pattern;

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
    /// Serve every traffic pattern, one listener per port (started by `run` in the server netns).
    Serve {
        #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::UNSPECIFIED))]
        address: IpAddr,
        #[arg(long, value_delimiter = ',', required = true)]
        ports: Vec<u16>,
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
    },
}

#[derive(Args)]
struct RunOptions {
    /// A short run for CI: one round of one second per run, setup at N = 1 and 10. Other
    /// options still override.
    #[arg(long)]
    quick: bool,
    /// Rounds of every workload on every variant [default: 8; quick: 1].
    #[arg(long)]
    rounds: Option<u32>,
    /// Measured seconds per run [default: 2; quick: 1].
    #[arg(long)]
    seconds: Option<f64>,
    /// Unmeasured warm-up seconds before each run [default: 0.3; quick: 0.2].
    #[arg(long)]
    warmup_seconds: Option<f64>,
    /// Numbers of pods to time the setup for [default: 1,10,100,1000; quick: 1,10].
    #[arg(long, value_delimiter = ',')]
    setup_sizes: Option<Vec<usize>>,
    /// Rounds of the setup timing [default: 3; quick: 1].
    #[arg(long)]
    setup_rounds: Option<u32>,
    /// Leave out the HAProxy cross-check variants.
    #[arg(long)]
    no_haproxy: bool,
    /// Run only these variants, e.g. `B1,IPT,EBPF` [default: all].
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
        Action::Serve { address, ports } => serve::serve(address, &ports),
        Action::Load {
            to,
            pattern,
            size,
            warmup_ms,
            duration_ms,
        } => load::run(&load::LoadOptions {
            to,
            pattern,
            size,
            warmup: Duration::from_millis(warmup_ms),
            duration: Duration::from_millis(duration_ms),
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
        seconds_per_run: options.seconds.unwrap_or(pick(quick, 2.0, 1.0)),
        warmup_seconds: options.warmup_seconds.unwrap_or(pick(quick, 0.3, 0.2)),
        setup_sizes: options
            .setup_sizes
            .unwrap_or_else(|| pick(quick, vec![1, 10, 100, 1000], vec![1, 10])),
        setup_rounds: options.setup_rounds.unwrap_or(pick(quick, 3, 1)).max(1),
        variants: Variant::MAIN
            .into_iter()
            .chain(Variant::HAPROXY.into_iter().filter(|_| !options.no_haproxy))
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
    let plan = TrafficPlan {
        variants: config.variants.clone(),
        rounds: config.rounds,
        warmup: Duration::from_secs_f64(config.warmup_seconds),
        duration: seconds,
        quiet_timeout: pick(quick, Duration::from_secs(30), Duration::from_secs(2)),
    };
    let with_perf = !quick && !options.no_perf && perf::available();
    let (samples, program_costs, perf, intercepted_connections) = {
        let rig = Rig::build(&config.variants, cpus)?;
        let samples = run_traffic(&rig, &plan)?;
        let program_costs = if config.variants.contains(&Variant::Ebpf) {
            profile_programs(
                &rig,
                rig.sandbox.root(),
                &[Workload::Crr, Workload::Rr1],
                seconds,
            )?
        } else {
            Vec::new()
        };
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
        (samples, program_costs, perf, evidence)
    };
    let setup = run_setup(&SetupPlan {
        sizes: config.setup_sizes.clone(),
        rounds: config.setup_rounds,
    })?;

    let results = Results::analyse(
        system,
        config,
        Measurements {
            samples,
            setup_samples: setup.samples,
            program_costs,
            perf,
            map_memory_bytes: setup.map_memory_bytes,
            intercepted_connections,
        },
    );
    results.write_files(&out)?;
    print!("{}", results.tables(Style::Text));
    eprintln!(
        "lab: wrote summary.json, results.json, samples.csv, setup-samples.csv, table.md and chart.svg to {}",
        out.display()
    );
    Ok(())
}

fn parse_variant(name: &str) -> Result<Variant, String> {
    Variant::MAIN
        .into_iter()
        .chain(Variant::HAPROXY)
        .find(|variant| variant.name().eq_ignore_ascii_case(name))
        .ok_or_else(|| {
            let known: Vec<&str> = Variant::MAIN
                .into_iter()
                .chain(Variant::HAPROXY)
                .map(Variant::name)
                .collect();
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
