//! Developer and CI tasks for the redirector workspace, run as `cargo xtask <task>`.

mod cmd;
mod setup;

use std::{
    env,
    ffi::OsString,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use crate::cmd::{display, query_ok, run};

#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "Developer and CI tasks for the redirector workspace"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Check the kernel and cgroup2, and install what is missing: Debian packages, nightly with
    /// rust-src, bpf-linker
    Setup,
    /// Set up, then build the redirector, the test and the lab binaries
    Build {
        /// Build with the release profile
        #[arg(long)]
        release: bool,
    },
    /// Set up, then run the unit tests and the privileged end-to-end tests (needs root)
    Test {
        /// Arguments for the end-to-end test binaries, after `--` (e.g. a test name filter)
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, build in release mode and run target/release/redirector-demo (needs root)
    Demo,
    /// Set up, build in release mode and run the lab, redirector against iptables REDIRECT side
    /// by side; results go to target/lab (needs root)
    Lab {
        /// Arguments for `redirector-lab run`, e.g. `--quick` or `--rounds 3` (all of them:
        /// `target/release/redirector-lab run --help`)
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// Selects the redirector's, the tests crate's (end-to-end helpers and the demo) and the lab's
/// binaries.
const BINS: &[&str] = &[
    "-p",
    "redirector",
    "-p",
    "redirector-tests",
    "-p",
    "redirector-lab",
    "--bins",
];

fn main() -> Result<()> {
    let cli = Cli::parse();
    put_cargo_bin_on_path()?;
    let root = workspace_root();
    match cli.task {
        Task::Setup => setup(),
        Task::Build { release } => {
            setup()?;
            step(if release { "build (release)" } else { "build" });
            let mut build = cargo(root, "build");
            if release {
                build.arg("--release");
            }
            run(build.args(BINS))
        }
        Task::Test { args } => {
            require_root("the end-to-end tests")?;
            setup()?;
            step("unit tests");
            run(cargo(root, "test").args([
                "--workspace",
                "--exclude",
                "redirector-ebpf",
                "--exclude",
                "redirector-tests",
            ]))?;
            step("build binaries");
            run(cargo(root, "build").args(BINS))?;
            step("end-to-end tests");
            run(cargo(root, "test")
                .args(["-p", "redirector-tests", "--", "--test-threads=1"])
                .args(args))
        }
        Task::Demo => {
            require_root("the demo")?;
            exec_release_binary(root, "redirector-demo", &[])
        }
        Task::Lab { args } => {
            require_root("the lab")?;
            let out = target_dir(root).join("lab");
            let mut lab_args = vec!["run".into(), "--out".into(), out.into_os_string()];
            lab_args.extend(args.into_iter().map(OsString::from));
            exec_release_binary(root, "redirector-lab", &lab_args)
        }
    }
}

/// Sets up, builds in release mode and replaces this process with `target/release/<binary>`.
fn exec_release_binary(root: &Path, binary: &str, args: &[OsString]) -> Result<()> {
    setup()?;
    step("build (release)");
    run(cargo(root, "build").arg("--release").args(BINS))?;
    step(binary);
    let mut command = Command::new(target_dir(root).join("release").join(binary));
    command.args(args).current_dir(root);
    eprintln!("$ {}", display(&command));
    // exec only returns when it fails; otherwise the binary's exit status is ours.
    let err = command.exec();
    Err(err).with_context(|| format!("could not run `{}`", display(&command)))
}

fn step(name: &str) {
    eprintln!("==> {name}");
}

fn setup() -> Result<()> {
    step("setup");
    setup::run_all()
}

fn cargo(root: &Path, subcommand: &str) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.arg(subcommand).current_dir(root);
    cmd
}

fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in a folder of the workspace")
}

fn target_dir(root: &Path) -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => root.join(dir),
        _ => root.join("target"),
    }
}

fn cargo_home() -> Result<PathBuf> {
    match env::var_os("CARGO_HOME") {
        Some(dir) if !dir.is_empty() => Ok(dir.into()),
        _ => {
            let home = env::var_os("HOME").context("neither CARGO_HOME nor HOME is set")?;
            Ok(Path::new(&home).join(".cargo"))
        }
    }
}

/// Puts cargo's bin folder (rustup, cargo, bpf-linker) first in PATH, for the checks and for
/// every child process: CI may start without it.
fn put_cargo_bin_on_path() -> Result<()> {
    let bin = cargo_home()?.join("bin");
    let path = env::var_os("PATH").unwrap_or_default();
    if env::split_paths(&path).next().as_deref() != Some(bin.as_path()) {
        let paths = std::iter::once(bin).chain(env::split_paths(&path));
        let joined: OsString = env::join_paths(paths).context("cargo's bin folder as PATH")?;
        env::set_var("PATH", joined);
    }
    Ok(())
}

fn is_root() -> Result<bool> {
    Ok(uid()? == "0")
}

fn uid() -> Result<String> {
    Ok(query_ok(Command::new("id").arg("-u"))?.trim().to_owned())
}

fn require_root(what: &str) -> Result<()> {
    let uid = uid()?;
    if uid != "0" {
        bail!("root is needed for {what} (`id -u` is {uid}): run this as root");
    }
    Ok(())
}
