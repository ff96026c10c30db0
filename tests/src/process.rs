//! Child processes under a guard (killed and reaped on drop, output captured line by line) and
//! bounded waiting.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::de::DeserializeOwned;

/// How many captured lines of each stream an error message shows.
const DIAGNOSTIC_LINES: usize = 20;

/// Path of a binary built into the same target directory as the running executable.
///
/// A test executable lives in `target/<profile>/deps/`, a binary of this crate in
/// `target/<profile>/`; the product's binaries are in `target/<profile>/` either way.
pub fn binary(name: &str) -> Result<PathBuf> {
    let path = profile_dir()?.join(name);
    if !path.is_file() {
        bail!(
            "binary {name} not found at {}: build it first with the same profile as the tests \
             (e.g. `cargo build -p redirector --bins` or `cargo build -p redirector-tests --bins`)",
            path.display()
        );
    }
    Ok(path)
}

/// `target/<profile>/` of the running executable (a test executable lives in its `deps/`).
pub fn profile_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the running executable")?;
    let mut dir = exe
        .parent()
        .context("running executable has no parent dir")?;
    if dir.file_name() == Some(OsStr::new("deps")) {
        dir = dir.parent().context("deps dir has no parent")?;
    }
    Ok(dir.to_owned())
}

/// Poll `check` every 20 ms until it yields a value or `timeout` passes.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check()? {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Milliseconds on CLOCK_MONOTONIC: one clock for every process on the machine, so that a
/// helper's timestamps and the test's can be compared.
pub fn monotonic_ms() -> Result<u64> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .context("reading CLOCK_MONOTONIC")?;
    Ok(now.tv_sec() as u64 * 1000 + now.tv_nsec() as u64 / 1_000_000)
}

/// What a finished process left behind.
#[derive(Debug, Clone)]
pub struct Output {
    pub command_line: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// `self` if the process exited 0, else an error quoting its stderr.
    pub fn ensure_success(self) -> Result<Output> {
        if self.success() {
            Ok(self)
        } else {
            Err(anyhow!(
                "`{}` failed ({}): {}",
                self.command_line,
                self.status,
                self.stderr.trim()
            ))
        }
    }
}

/// Run `command` to completion within `timeout` (killed past it), capturing its output.
pub fn run(label: &str, command: Command, timeout: Duration) -> Result<Output> {
    Child::spawn(label, command)?.wait_exit(timeout)
}

/// `program args...` as a human would type it.
pub fn display_command(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|part| {
            let part = part.to_string_lossy();
            if part.is_empty() || part.contains(char::is_whitespace) {
                format!("'{part}'")
            } else {
                part.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[derive(Default)]
struct Streams {
    stdout: Vec<String>,
    stderr: Vec<String>,
    /// Streams whose reader thread has not yet seen end of file.
    open: usize,
}

#[derive(Default)]
struct Captured {
    streams: Mutex<Streams>,
    changed: Condvar,
}

impl Captured {
    fn lock(&self) -> MutexGuard<'_, Streams> {
        // A reader thread cannot panic while holding the lock, so poisoning is not expected; the
        // data stays usable either way.
        self.streams
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Wait (at most `timeout`) until `check` finds what it looks for in the captured streams.
    fn wait_until<T>(
        &self,
        timeout: Duration,
        mut check: impl FnMut(&Streams) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut streams = self.lock();
        loop {
            if let Some(found) = check(&streams) {
                return Some(found);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            streams = self
                .changed
                .wait_timeout(streams, left)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }
}

/// Reads `source` line by line into the stream `pick` selects, until end of file.
fn start_capture(
    source: impl Read + Send + 'static,
    captured: Arc<Captured>,
    pick: fn(&mut Streams) -> &mut Vec<String>,
) {
    captured.lock().open += 1;
    thread::spawn(move || {
        let mut reader = BufReader::new(source);
        let mut buffer = Vec::new();
        loop {
            buffer.clear();
            match reader.read_until(b'\n', &mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buffer);
                    let line = line.trim_end_matches(['\n', '\r']).to_owned();
                    pick(&mut captured.lock()).push(line);
                    captured.changed.notify_all();
                }
            }
        }
        captured.lock().open -= 1;
        captured.changed.notify_all();
    });
}

/// A spawned process that is killed (SIGKILL) and reaped when the guard drops. Its stdout and
/// stderr are collected line by line by reader threads, so a test can wait for a line.
pub struct Child {
    label: String,
    command_line: String,
    pid: Pid,
    process: Mutex<std::process::Child>,
    captured: Arc<Captured>,
}

impl Child {
    /// Spawn `command` with stdin closed and stdout/stderr captured. `label` names it in errors.
    pub fn spawn(label: &str, command: Command) -> Result<Child> {
        Self::spawn_with_input(label, command, None)
    }

    /// Like [`Child::spawn`], with `input` written to the process's stdin (then closed) by a
    /// thread, as a CNI runtime hands a plugin its network config.
    pub fn spawn_with_input(
        label: &str,
        mut command: Command,
        input: Option<Vec<u8>>,
    ) -> Result<Child> {
        let command_line = display_command(&command);
        let stdin = if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        };
        let mut process = command
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {label}: `{command_line}`"))?;
        if let (Some(mut stdin), Some(input)) = (process.stdin.take(), input) {
            // A process that exits without reading its input is not an error here.
            thread::spawn(move || {
                let _ = std::io::Write::write_all(&mut stdin, &input);
            });
        }
        let captured = Arc::new(Captured::default());
        if let Some(stdout) = process.stdout.take() {
            start_capture(stdout, captured.clone(), |streams| &mut streams.stdout);
        }
        if let Some(stderr) = process.stderr.take() {
            start_capture(stderr, captured.clone(), |streams| &mut streams.stderr);
        }
        Ok(Child {
            label: label.to_owned(),
            command_line,
            pid: Pid::from_raw(process.id() as i32),
            process: Mutex::new(process),
            captured,
        })
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn command_line(&self) -> &str {
        &self.command_line
    }

    pub fn pid(&self) -> Pid {
        self.pid
    }

    pub fn stdout_lines(&self) -> Vec<String> {
        self.captured.lock().stdout.clone()
    }

    pub fn stderr_lines(&self) -> Vec<String> {
        self.captured.lock().stderr.clone()
    }

    /// The stdout lines that parse as `T` (other lines are skipped).
    pub fn json_lines<T: DeserializeOwned>(&self) -> Vec<T> {
        self.captured
            .lock()
            .stdout
            .iter()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// The first stdout line (already printed or printed within `timeout`) matching `predicate`.
    pub fn wait_for_line(
        &self,
        predicate: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Result<String> {
        self.wait_for_line_in("stdout", |streams| &streams.stdout, predicate, timeout)
    }

    /// Like [`Child::wait_for_line`], on stderr (where logs go).
    pub fn wait_for_stderr_line(
        &self,
        predicate: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Result<String> {
        self.wait_for_line_in("stderr", |streams| &streams.stderr, predicate, timeout)
    }

    fn wait_for_line_in(
        &self,
        stream: &str,
        pick: fn(&Streams) -> &Vec<String>,
        predicate: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Result<String> {
        self.captured
            .wait_until(timeout, |streams| {
                pick(streams).iter().find(|line| predicate(line)).cloned()
            })
            .ok_or_else(|| {
                anyhow!(
                    "{}: no matching {stream} line within {timeout:?}{}",
                    self.label,
                    self.diagnostics()
                )
            })
    }

    /// Like [`Child::wait_for_line`] for stdout lines that parse as JSON of type `T`.
    pub fn wait_for_json<T: DeserializeOwned>(
        &self,
        predicate: impl Fn(&T) -> bool,
        timeout: Duration,
    ) -> Result<T> {
        let line = self.wait_for_line(
            |line| serde_json::from_str::<T>(line).is_ok_and(|value| predicate(&value)),
            timeout,
        )?;
        Ok(serde_json::from_str(&line).expect("line was parsed by the predicate"))
    }

    /// Exit status if the process has exited (it is reaped then), `None` while it runs.
    pub fn try_exit_status(&self) -> Result<Option<ExitStatus>> {
        self.lock_process()
            .try_wait()
            .with_context(|| format!("checking whether {} exited", self.label))
    }

    /// Fails, naming the process with its exit status and output, once it has exited: for waits
    /// that must end as soon as the process they wait on is gone.
    pub fn ensure_running(&self) -> Result<()> {
        if let Some(status) = self.try_exit_status()? {
            bail!("{} exited ({status}){}", self.label, self.diagnostics());
        }
        Ok(())
    }

    /// Send `signal` (e.g. SIGSTOP/SIGCONT) to the process; refused once it has been reaped, so a
    /// recycled pid is never signalled.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        let mut process = self.lock_process();
        if let Some(status) = process.try_wait()? {
            bail!(
                "{} already exited ({status}), not sending {signal}",
                self.label
            );
        }
        kill(self.pid, signal).with_context(|| format!("sending {signal} to {}", self.label))
    }

    /// Wait at most `timeout` for the process to exit and its output to be complete. Past the
    /// timeout the process is killed and an error returned.
    pub fn wait_exit(&self, timeout: Duration) -> Result<Output> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.try_exit_status()? {
                break status;
            }
            if Instant::now() >= deadline {
                self.kill_and_reap();
                bail!(
                    "{} did not exit within {timeout:?}, killed it{}",
                    self.label,
                    self.diagnostics()
                );
            }
            thread::sleep(Duration::from_millis(10));
        };
        // A grandchild that inherited the pipes could keep them open forever: bound that wait too.
        let grace = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        if self
            .captured
            .wait_until(grace, |streams| (streams.open == 0).then_some(()))
            .is_none()
        {
            bail!(
                "{} exited ({status}) but its output stayed open for {grace:?}",
                self.label
            );
        }
        let streams = self.captured.lock();
        Ok(Output {
            command_line: self.command_line.clone(),
            status,
            stdout: join_lines(&streams.stdout),
            stderr: join_lines(&streams.stderr),
        })
    }

    /// The command and the tail of both streams, for error messages.
    pub fn diagnostics(&self) -> String {
        let streams = self.captured.lock();
        let mut text = format!("\n  command: {}", self.command_line);
        for (name, lines) in [("stdout", &streams.stdout), ("stderr", &streams.stderr)] {
            let skipped = lines.len().saturating_sub(DIAGNOSTIC_LINES);
            let _ = write!(text, "\n  {name} ({} lines", lines.len());
            if skipped > 0 {
                let _ = write!(text, ", last {DIAGNOSTIC_LINES}");
            }
            text.push_str("):");
            for line in &lines[skipped..] {
                let _ = write!(text, "\n    {line}");
            }
        }
        text
    }

    fn lock_process(&self) -> MutexGuard<'_, std::process::Child> {
        self.process
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn kill_and_reap(&self) {
        let mut process = self.lock_process();
        // std does not signal a child it has already reaped, so this never hits a recycled pid.
        let _ = process.kill();
        let _ = process.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}

fn join_lines(lines: &[String]) -> String {
    lines.iter().map(|line| format!("{line}\n")).collect()
}
