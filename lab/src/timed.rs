//! Timing one short process (an `iptables-restore` or a `redirector enroll`) from spawn to exit.
//! The exit is waited for on a pidfd, so the wait adds no polling delay to what is measured.

use std::io::{Read, Write};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// Runs `command` with `stdin` as its input; fails unless it exits 0 within `timeout`.
pub fn run_timed(command: &mut Command, stdin: &[u8], timeout: Duration) -> Result<Duration> {
    let program = command.get_program().to_string_lossy().into_owned();
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    let exited = pidfd_open(child.id()).with_context(|| format!("pidfd of {program}"))?;
    // Small enough for the pipe buffer: this never blocks, and closing it ends the input.
    child
        .stdin
        .take()
        .context("no stdin pipe")?
        .write_all(stdin)
        .with_context(|| format!("writing to {program}"))?;
    let mut fds = [PollFd::new(exited.as_fd(), PollFlags::POLLIN)];
    let ready = poll(
        &mut fds,
        PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX),
    )
    .with_context(|| format!("waiting for {program}"))?;
    let elapsed = started.elapsed();
    if ready == 0 {
        let _ = child.kill();
        let _ = child.wait();
        bail!("{program} did not finish within {timeout:?}");
    }
    let status = child.wait()?;
    if !status.success() {
        let mut stderr = String::new();
        if let Some(mut pipe) = child.stderr.take() {
            let _ = pipe.read_to_string(&mut stderr);
        }
        bail!("{program} failed ({status}): {}", stderr.trim());
    }
    Ok(elapsed)
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: a plain syscall; on success it returns a new fd that we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
