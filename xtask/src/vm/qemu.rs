//! Boots the VM under qemu's TCG (KVM is unusable on this machine kind), streams its console to
//! the terminal and follows the guest's events on the second serial port, with a deadline for
//! each step: a guest that hangs or panics ends in a failure, never in a pass.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::cmd::display;

/// From qemu's start to the guest's `booted` event; about 10 s with a large image under TCG.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// Past an entry's own limit (the guest kills it then), for the guest to report.
const REPORT_MARGIN: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(200);

pub struct Boot<'a> {
    pub vmlinuz: &'a Path,
    pub initrd: &'a Path,
    /// Where the guest's events are written (the second serial port).
    pub events: &'a Path,
    pub memory_mib: u32,
    /// The longest an entry of the plan may take (the guest's own limit for it).
    pub entry_timeout: Duration,
}

/// What the guest reported.
#[derive(Debug, Default)]
pub struct Report {
    pub release: Option<String>,
    pub boot_time: Option<Duration>,
    pub failed_modules: Vec<String>,
    pub entries: Vec<EntryOutcome>,
    /// The guest ran its whole plan and powered off.
    pub done: bool,
    /// Why the VM was stopped early, if it was.
    pub aborted: Option<String>,
    pub total: Duration,
}

#[derive(Debug)]
pub struct EntryOutcome {
    pub name: String,
    /// The guest's exit status of the entry; None if it never finished.
    pub status: Option<i32>,
    pub seconds: u64,
    /// cargo's last `test result:` line of the entry, if it printed one.
    pub summary: String,
}

impl EntryOutcome {
    pub fn passed(&self) -> bool {
        self.status == Some(0)
    }
}

pub fn boot(boot: &Boot) -> Result<Report> {
    fs::write(boot.events, "")?;
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ])
    .args(["-smp", "2", "-m"])
    .arg(boot.memory_mib.to_string())
    .arg("-kernel")
    .arg(boot.vmlinuz)
    .arg("-initrd")
    .arg(boot.initrd)
    // oops=panic and panic=-1: a kernel crash ends the VM at once instead of hanging it.
    .args([
        "-append",
        "console=ttyS0 quiet loglevel=4 oops=panic panic=-1",
    ])
    .args(["-serial", "stdio", "-serial"])
    .arg(format!("file:{}", boot.events.display()))
    .stdin(Stdio::null())
    .stdout(Stdio::piped());
    eprintln!("$ {}", display(&qemu));
    let started = Instant::now();
    let mut child = qemu
        .spawn()
        .with_context(|| format!("could not start `{}`", display(&qemu)))?;
    let console = child.stdout.take().expect("piped");
    // The console goes to our stdout as it comes, as cargo test's output does on the host.
    let echo = thread::spawn(move || {
        let mut out = std::io::stdout();
        for line in BufReader::new(console).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line);
            let _ = writeln!(out, "{}", line.trim_end_matches('\r'));
        }
    });
    let report = follow(&mut child, boot, started);
    // Whatever happened, the VM does not outlive this run.
    let _ = child.kill();
    let _ = child.wait();
    let _ = echo.join();
    let mut report = report?;
    report.total = started.elapsed();
    Ok(report)
}

fn follow(child: &mut Child, boot: &Boot, started: Instant) -> Result<Report> {
    let mut report = Report::default();
    let mut consumed = 0;
    let mut deadline = started + BOOT_TIMEOUT;
    let mut waiting_for = "the guest to boot".to_owned();
    loop {
        let text =
            fs::read(boot.events).with_context(|| format!("reading {}", boot.events.display()))?;
        // Only whole lines: the guest may be half-way through one.
        let end = text[consumed..]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(consumed, |i| consumed + i + 1);
        for line in String::from_utf8_lossy(&text[consumed..end]).lines() {
            let event = Event::parse(line.trim_end_matches('\r'));
            match event {
                Event::Booted(release) => {
                    report.release = Some(release);
                    report.boot_time = Some(started.elapsed());
                    waiting_for = "the plan's first step".into();
                }
                Event::ModuleFailed(name) => report.failed_modules.push(name),
                Event::Start(name) => {
                    deadline = Instant::now() + boot.entry_timeout + REPORT_MARGIN;
                    waiting_for = format!("{name} to finish");
                    report.entries.push(EntryOutcome {
                        name,
                        status: None,
                        seconds: 0,
                        summary: String::new(),
                    });
                }
                Event::End {
                    name,
                    status,
                    seconds,
                    summary,
                } => {
                    if let Some(entry) = report.entries.iter_mut().rev().find(|e| e.name == name) {
                        entry.status = Some(status);
                        entry.seconds = seconds;
                        entry.summary = summary;
                    }
                    deadline = Instant::now() + REPORT_MARGIN;
                    waiting_for = "the plan's next step".into();
                }
                Event::Done => report.done = true,
                Event::Other(_) => {}
            }
        }
        consumed = end;
        if let Some(status) = child.try_wait()? {
            if !report.done {
                report.aborted = Some(format!(
                    "the VM stopped ({status}) while waiting for {waiting_for}: a kernel panic or a guest that powered off early (its console is above)"
                ));
            }
            return Ok(report);
        }
        if Instant::now() > deadline {
            report.aborted = Some(format!(
                "the VM was stopped after {:.0?} waiting for {waiting_for} (a hung guest)",
                started.elapsed()
            ));
            return Ok(report);
        }
        thread::sleep(POLL);
    }
}

#[derive(Debug, PartialEq)]
enum Event {
    Booted(String),
    ModuleFailed(String),
    Start(String),
    End {
        name: String,
        status: i32,
        seconds: u64,
        summary: String,
    },
    Done,
    Other(String),
}

impl Event {
    /// One line of init.sh's `report`.
    fn parse(line: &str) -> Event {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["booted", release] => Event::Booted((*release).to_owned()),
            ["module", name, "failed"] => Event::ModuleFailed((*name).to_owned()),
            ["start", name] => Event::Start((*name).to_owned()),
            ["end", name, status, seconds, summary @ ..] => {
                match (status.parse(), seconds.parse()) {
                    (Ok(status), Ok(seconds)) => Event::End {
                        name: (*name).to_owned(),
                        status,
                        seconds,
                        summary: summary.join(" "),
                    },
                    _ => Event::Other(line.to_owned()),
                }
            }
            ["done"] => Event::Done,
            _ => Event::Other(line.to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_guest_events() {
        assert_eq!(
            Event::parse("booted 6.1.0-57-cloud-amd64"),
            Event::Booted("6.1.0-57-cloud-amd64".into())
        );
        assert_eq!(
            Event::parse("end outbound 101 42 test result: FAILED. 1 passed; 6 failed;"),
            Event::End {
                name: "outbound".into(),
                status: 101,
                seconds: 42,
                summary: "test result: FAILED. 1 passed; 6 failed;".into()
            }
        );
        assert_eq!(
            Event::parse("end command 0 3 "),
            Event::End {
                name: "command".into(),
                status: 0,
                seconds: 3,
                summary: String::new()
            }
        );
        assert_eq!(
            Event::parse("module veth failed"),
            Event::ModuleFailed("veth".into())
        );
        assert!(matches!(Event::parse("end x y 3"), Event::Other(_)));
    }
}
