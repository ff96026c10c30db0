//! Developer and CI tasks for the redirector workspace, run as `cargo xtask <task>`.

mod bpffs;
mod cmd;
mod debian;
mod image;
mod setup;
mod suites;
mod vm;

use std::{
    env,
    ffi::OsString,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use crate::{
    cmd::{display, query_ok, run, run_json},
    suites::Suite,
};

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
    /// Set up, then run the unit tests and the privileged end-to-end tests (needs root): on the
    /// host, then in a VM booted with Debian's 5.10 kernel
    Test {
        /// Run the end-to-end tests in a VM booted with this Debian cloud kernel instead of on
        /// the host: a series (5.10, 6.1, 6.12: the newest of it) or an exact ABI (6.1.0-57)
        #[arg(long, value_name = "RELEASE")]
        kernel: Option<String>,
        /// Leave out the VM run (for quick local iterations)
        #[arg(long, conflicts_with = "kernel")]
        host_only: bool,
        /// Arguments for the end-to-end test binaries, after `--` (e.g. a test name filter)
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, build, and run a command as root in a VM booted with a Debian kernel; the guest has
    /// the workspace's binaries and test executables at their host paths and the tools the tests
    /// use (needs root)
    Vm {
        /// The Debian cloud kernel: a series (5.10, 6.1, 6.12) or an exact ABI (6.1.0-57)
        #[arg(long, value_name = "RELEASE")]
        kernel: String,
        /// The command and its arguments, after `--`
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Set up, build `redirector` and `redirector-cni` statically linked and write an OCI image
    /// archive of them (`localhost/redirector:<version>`, no base image) to target/image; its
    /// path is the last line printed
    Image,
    /// Set up (with cargo-fuzz), then run every fuzz target of fuzz/ for a while, each from its
    /// committed corpus; fails on the first crash, naming the input that caused it
    Fuzz {
        /// How long each target runs
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Set up, build, and run only the soak suite with its table shown: short connections
    /// through the proxy for MINUTES (or CONNECTIONS, whichever ends first) while the agent and
    /// the proxy restart, other pods come and go and the pod's policy changes (needs root)
    Soak {
        /// How long the traffic runs (fractions allowed)
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
        /// At most this many connections [default: the suite's, 1,000,000]
        #[arg(long)]
        connections: Option<u64>,
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
        Task::Test {
            kernel,
            host_only,
            args,
        } => test(root, kernel.as_deref(), host_only, &args),
        Task::Vm { kernel, command } => {
            require_root("the VM (its kernel and tools are fetched with apt)")?;
            setup()?;
            let built = build_for_tests(root)?;
            let entry = vm::Entry {
                name: "command".into(),
                argv: command,
            };
            let report = built.vm(root, &kernel).run(std::slice::from_ref(&entry))?;
            if !vm::summarize(&report, std::slice::from_ref(&entry)) {
                bail!("the command failed in the VM (kernel {kernel})");
            }
            Ok(())
        }
        Task::Image => {
            setup()?;
            step("image");
            let archive = image::redirector_image(root, &target_dir(root))?;
            println!("{}", archive.display());
            Ok(())
        }
        Task::Fuzz { seconds } => fuzz(root, seconds),
        Task::Soak {
            minutes,
            connections,
        } => soak(root, minutes, connections),
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

/// Folders the tests read at run time through paths compiled into them (relative to the
/// workspace): the VM carries them at the same place.
const TEST_DATA: &[&str] = &["tests/parity-cases", "../shared/istio-golden"];

/// `cargo xtask test`: unit tests, then the end-to-end suites on the host and/or in a VM.
fn test(root: &Path, kernel: Option<&str>, host_only: bool, args: &[String]) -> Result<()> {
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
    let built = build_for_tests(root)?;
    let mut parts: Vec<(String, Duration, Result<()>)> = Vec::new();
    if kernel.is_none() {
        step("image");
        let images = Images {
            redirector: image::redirector_image(root, &target_dir(root))?,
            e2e: image::e2e_image(&target_dir(root), &built.binaries)?,
        };
        let name = "end-to-end tests on the host".to_owned();
        step(&name);
        let started = Instant::now();
        let outcome = host_suites(root, &built.suites, &images, args);
        parts.push((name, started.elapsed(), outcome));
    }
    // Without --kernel, the VM run is CI's: its kernel, its suites.
    let for_ci = kernel.is_none();
    if let Some(kernel) = kernel.or((!host_only).then_some(suites::CI_KERNEL)) {
        let name = format!("end-to-end tests in a VM with Debian's {kernel} kernel");
        step(&name);
        let started = Instant::now();
        let outcome = vm_suites(root, &built, kernel, for_ci, args);
        parts.push((name, started.elapsed(), outcome));
    }
    step("summary");
    let mut failed = Vec::new();
    for (name, took, outcome) in &parts {
        match outcome {
            Ok(()) => eprintln!("ok      {name} ({:.0} s)", took.as_secs_f64()),
            Err(err) => {
                eprintln!("FAILED  {name} ({:.0} s): {err:#}", took.as_secs_f64());
                failed.push(name.as_str());
            }
        }
    }
    if !failed.is_empty() {
        bail!("failed: {}", failed.join("; "));
    }
    Ok(())
}

/// `cargo xtask soak`: the soak suite's executable alone, sized through its environment, with
/// its output shown (the table is the last thing it prints).
fn soak(root: &Path, minutes: f64, connections: Option<u64>) -> Result<()> {
    require_root("the soak run")?;
    setup()?;
    let built = build_for_tests(root)?;
    let suite = built
        .suites
        .iter()
        .find(|suite| suite.name == suites::SOAK)
        .with_context(|| format!("no test executable named {}", suites::SOAK))?;
    step(&format!("soak ({minutes} min)"));
    let mut command = Command::new(&suite.executable);
    command
        .args(["--test-threads=1", "--nocapture"])
        .env(suites::SOAK_MINUTES_ENV, minutes.to_string())
        .current_dir(root);
    if let Some(connections) = connections {
        command.env(suites::SOAK_CONNECTIONS_ENV, connections.to_string());
    }
    let _bpffs = bpffs::BpffsForRun::ensure()?;
    run(&mut command)
}

/// `cargo xtask fuzz`: each target of fuzz/ for `seconds`, growing its corpus in
/// fuzz/target/corpus (the committed corpus/ keeps only seeds and crash regressions).
fn fuzz(root: &Path, seconds: u64) -> Result<()> {
    setup()?;
    setup::cargo_fuzz()?;
    let fuzz_dir = root.join("fuzz");
    let fuzz_cmd = |subcommand: &str| {
        let mut cmd = Command::new("cargo");
        cmd.args(["+nightly", "fuzz", subcommand])
            .current_dir(&fuzz_dir);
        cmd
    };
    step("fuzz build");
    let started = Instant::now();
    run(&mut fuzz_cmd("build"))?;
    eprintln!("built in {:.0} s", started.elapsed().as_secs_f64());
    let targets = query_ok(&mut fuzz_cmd("list"))?;
    let mut summary = Vec::new();
    for target in targets.lines().map(str::trim).filter(|t| !t.is_empty()) {
        step(&format!("fuzz {target} ({seconds} s)"));
        let grown = fuzz_dir.join("target/corpus").join(target);
        std::fs::create_dir_all(&grown).with_context(|| format!("creating {}", grown.display()))?;
        let artifacts = fuzz_dir.join("artifacts").join(target);
        let before = files_in(&artifacts);
        let mut run_target = fuzz_cmd("run");
        run_target
            .arg(target)
            .arg(&grown)
            .arg(Path::new("corpus").join(target))
            .arg("--")
            .arg(format!("-max_total_time={seconds}"));
        eprintln!("$ {}", display(&run_target));
        let output = run_target
            .stderr(std::process::Stdio::piped())
            .output()
            .with_context(|| format!("running `{}`", display(&run_target)))?;
        let log = String::from_utf8_lossy(&output.stderr);
        // libFuzzer's last word: "Done N runs in S second(s)".
        let runs = log
            .lines()
            .rev()
            .find_map(|line| line.strip_prefix("Done "))
            .unwrap_or("no run count reported")
            .to_owned();
        if !output.status.success() {
            let crashes: Vec<_> = files_in(&artifacts)
                .into_iter()
                .filter(|file| !before.contains(file))
                .collect();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
            bail!(
                "fuzz target {target} crashed; input: {} (replay: cd fuzz && cargo +nightly fuzz run {target} FILE; then add it to fuzz/corpus/{target})",
                crashes
                    .iter()
                    .map(|file| file.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        summary.push(format!("ok      {target}: {runs}"));
    }
    step("summary");
    for line in summary {
        eprintln!("{line}");
    }
    Ok(())
}

/// The files in `dir` (none when it does not exist).
fn files_in(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default()
}

/// What `cargo xtask test` and `cargo xtask vm` build: the binaries and the test executables.
struct Built {
    binaries: Vec<PathBuf>,
    suites: Vec<Suite>,
}

impl Built {
    fn vm<'a>(&'a self, root: &'a Path, kernel: &'a str) -> vm::Vm<'a> {
        let mut binaries = self.binaries.clone();
        binaries.extend(self.suites.iter().map(|suite| suite.executable.clone()));
        vm::Vm {
            target: target_dir(root),
            kernel,
            binaries,
            data: TEST_DATA
                .iter()
                .filter_map(|path| std::fs::canonicalize(root.join(path)).ok())
                .collect(),
        }
    }
}

fn build_for_tests(root: &Path) -> Result<Built> {
    step("build binaries");
    let json = "--message-format=json-render-diagnostics";
    let messages = run_json(cargo(root, "build").args(BINS).arg(json))?;
    let binaries = suites::binaries_in_cargo_messages(&messages);
    let messages =
        run_json(cargo(root, "test").args(["-p", "redirector-tests", "--no-run", json]))?;
    let suites = suites::from_cargo_messages(&messages)?;
    Ok(Built { binaries, suites })
}

/// The image archives the host suites import into their containerds.
struct Images {
    /// `cargo xtask image`'s, for the image suite.
    redirector: PathBuf,
    /// The test tools' (and pod sandboxes'), for the containerd suite.
    e2e: PathBuf,
}

/// The end-to-end suites on the host, through cargo, one test thread, told where the image
/// archives are.
fn host_suites(root: &Path, suites: &[Suite], images: &Images, args: &[String]) -> Result<()> {
    let _bpffs = bpffs::BpffsForRun::ensure()?;
    let mut test = cargo(root, "test");
    test.env("REDIRECTOR_IMAGE", &images.redirector);
    test.env("REDIRECTOR_E2E_IMAGE", &images.e2e);
    // Every suite runs and reports, whichever fails first.
    test.args([
        "-p",
        "redirector-tests",
        "--no-fail-fast",
        "--lib",
        "--bins",
    ]);
    for suite in suites::select("host", suites, &[suites::NOT_ON_HOST]) {
        test.args(["--test", &suite.name]);
    }
    run(test.arg("--").arg("--test-threads=1").args(args))
}

/// The end-to-end suites in a VM booted with `kernel`.
fn vm_suites(
    root: &Path,
    built: &Built,
    kernel: &str,
    for_ci: bool,
    args: &[String],
) -> Result<()> {
    let run_name = format!("vm {kernel}");
    let mut left_out = vec![suites::NOT_IN_VM];
    if for_ci {
        left_out.push(suites::NOT_IN_CI_VM);
    }
    let entries: Vec<vm::Entry> = suites::select(&run_name, &built.suites, &left_out)
        .into_iter()
        .map(|suite| {
            let mut args = args.to_vec();
            if for_ci {
                args.extend(suites::skips(
                    &run_name,
                    &suite.name,
                    suites::TESTS_NOT_IN_CI_VM,
                ));
            }
            suite_entry(suite, &args)
        })
        .collect();
    let report = built.vm(root, kernel).run(&entries)?;
    if !vm::summarize(&report, &entries) {
        bail!(
            "the end-to-end tests failed in the VM (kernel {})",
            report.release.as_deref().unwrap_or(kernel)
        );
    }
    Ok(())
}

fn suite_entry(suite: &Suite, args: &[String]) -> vm::Entry {
    let mut argv = vec![
        suite.executable.to_string_lossy().into_owned(),
        "--test-threads=1".to_owned(),
    ];
    argv.extend(args.iter().cloned());
    vm::Entry {
        name: suite.name.clone(),
        argv,
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
