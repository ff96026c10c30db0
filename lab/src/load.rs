//! `redirector-lab load`: one single-threaded client running one pattern, then reading the
//! server's counters through the same path. Prints a [`LoadReport`] as JSON.
//!
//! It sends either for one stretch of time, or in turns handed out by the lab (see
//! [`Schedule::Turns`]), so that several variants can share the same minutes of machine time.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use nix::sys::socket::{getsockopt, sockopt};

use crate::wire::{self, Latency, LoadReport, Pattern, PortStats, TurnFigures};

const BULK_BUFFER_BYTES: usize = 256 * 1024;
/// Bounds every blocking call, so that a broken path ends the run instead of hanging it.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

pub struct LoadOptions {
    pub to: SocketAddr,
    pub pattern: Pattern,
    pub size: usize,
    pub schedule: Schedule,
}

/// When the client sends.
pub enum Schedule {
    /// `warmup`, then `duration` measured.
    Continuous {
        warmup: Duration,
        duration: Duration,
    },
    /// Each byte read from the FIFO `go` starts a turn of `slice`; when it is over, the client
    /// writes a byte to the FIFO `done`. End of file on `go` ends the run. The first turns, up
    /// to `warmup` in all, are not measured. Not for bulk, whose socket buffers would keep
    /// sending between turns.
    Turns {
        go: PathBuf,
        done: PathBuf,
        slice: Duration,
        warmup: Duration,
    },
}

/// A stretch of time to send in: measured from `measure_from` (or not at all when that is
/// `end`) until `end`.
struct Window {
    measure_from: Instant,
    end: Instant,
}

/// The windows a [`Schedule`] gives, one after another.
enum Windows {
    Continuous {
        warmup: Duration,
        duration: Duration,
        done: bool,
    },
    Turns {
        go: File,
        done: File,
        slice: Duration,
        warmup_left: Duration,
    },
}

impl Windows {
    fn new(schedule: &Schedule) -> io::Result<Windows> {
        Ok(match schedule {
            Schedule::Continuous { warmup, duration } => Windows::Continuous {
                warmup: *warmup,
                duration: *duration,
                done: false,
            },
            Schedule::Turns {
                go,
                done,
                slice,
                warmup,
            } => Windows::Turns {
                go: File::open(go)?,
                done: OpenOptions::new().write(true).open(done)?,
                slice: *slice,
                warmup_left: *warmup,
            },
        })
    }

    /// The next window, once it has begun; `None` when the run is over.
    fn next(&mut self) -> io::Result<Option<Window>> {
        match self {
            Windows::Continuous {
                warmup,
                duration,
                done,
            } => {
                if *done {
                    return Ok(None);
                }
                *done = true;
                let now = Instant::now();
                Ok(Some(Window {
                    measure_from: now + *warmup,
                    end: now + *warmup + *duration,
                }))
            }
            Windows::Turns {
                go,
                slice,
                warmup_left,
                ..
            } => {
                if go.read(&mut [0u8])? == 0 {
                    return Ok(None);
                }
                let now = Instant::now();
                let end = now + *slice;
                let measured = warmup_left.is_zero();
                *warmup_left = warmup_left.saturating_sub(*slice);
                Ok(Some(Window {
                    measure_from: if measured { now } else { end },
                    end,
                }))
            }
        }
    }

    /// Hands the turn back.
    fn finish(&mut self) -> io::Result<()> {
        match self {
            Windows::Continuous { .. } => Ok(()),
            Windows::Turns { done, .. } => done.write_all(b"d"),
        }
    }
}

/// Errors of single transactions are counted, not fatal: the report shows them.
#[derive(Default)]
struct Errors {
    count: u64,
    first: Option<String>,
}

impl Errors {
    fn record(&mut self, error: io::Error) {
        self.count += 1;
        self.first.get_or_insert_with(|| error.to_string());
    }
}

pub fn run(options: &LoadOptions) -> Result<LoadReport> {
    let mut errors = Errors::default();
    let (turns, mut latencies, bulk_bytes) = match options.pattern {
        Pattern::Crr => {
            let (turns, samples) = repeat(
                options,
                &mut errors,
                || Ok(()),
                |()| connect_request_close(options.to),
            )?;
            (turns, samples, 0)
        }
        Pattern::Rr => {
            let mut message = vec![0u8; options.size];
            let (turns, samples) = repeat(
                options,
                &mut errors,
                || open_rr(options.to, options.size),
                |stream| round_trip(stream, &mut message),
            )?;
            (turns, samples, 0)
        }
        Pattern::Getsockopt => {
            let (turns, samples) = repeat(
                options,
                &mut errors,
                || open_rr(options.to, 1),
                so_error_calls,
            )?;
            (turns, samples, 0)
        }
        Pattern::Bulk => {
            let Schedule::Continuous { duration, .. } = options.schedule else {
                bail!("bulk runs in one stretch of time, not in turns");
            };
            let (seconds, bytes) = bulk(options.to, duration)?;
            let whole_run = TurnFigures {
                seconds,
                transactions: 0,
            };
            (vec![whole_run], Vec::new(), bytes)
        }
    };
    let server = server_stats(options.to).context("reading the server's counters")?;
    Ok(LoadReport {
        pattern: options.pattern,
        size: if options.pattern == Pattern::Rr {
            options.size
        } else {
            0
        },
        seconds: turns.iter().map(|turn| turn.seconds).sum(),
        transactions: turns.iter().map(|turn| turn.transactions).sum(),
        turns,
        errors: errors.count,
        first_error: errors.first,
        latency: Latency::of(&mut latencies),
        bulk_bytes,
        server,
    })
}

/// Runs `transaction` back to back on the state `open` makes (re-opened after a failure), in
/// every window of the schedule; returns the figures of each measured window and the latency
/// of each measured transaction in nanoseconds.
fn repeat<S>(
    options: &LoadOptions,
    errors: &mut Errors,
    mut open: impl FnMut() -> io::Result<S>,
    mut transaction: impl FnMut(&mut S) -> io::Result<()>,
) -> Result<(Vec<TurnFigures>, Vec<u64>)> {
    let mut windows = Windows::new(&options.schedule).context("opening the turn FIFOs")?;
    let mut turns = Vec::new();
    let mut samples = Vec::new();
    let mut state = None;
    while let Some(window) = windows.next().context("waiting for a turn")? {
        let before = samples.len();
        while Instant::now() < window.end {
            let current = match state.as_mut() {
                Some(current) => current,
                None => match open() {
                    Ok(opened) => state.insert(opened),
                    Err(e) => {
                        errors.record(e);
                        continue;
                    }
                },
            };
            let start = Instant::now();
            match transaction(current) {
                Ok(()) if start >= window.measure_from => {
                    samples.push(start.elapsed().as_nanos() as u64)
                }
                Ok(()) => {}
                Err(e) => {
                    errors.record(e);
                    state = None;
                }
            }
        }
        let measured = window.end.saturating_duration_since(window.measure_from);
        if !measured.is_zero() {
            turns.push(TurnFigures {
                seconds: measured.as_secs_f64(),
                transactions: (samples.len() - before) as u64,
            });
        }
        windows.finish().context("handing the turn back")?;
    }
    if samples.is_empty() {
        bail!(
            "no transaction completed to {} ({} errors, first: {})",
            options.to,
            errors.count,
            errors.first.as_deref().unwrap_or("none")
        );
    }
    Ok((turns, samples))
}

fn connect(to: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&to, IO_TIMEOUT)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

fn connect_request_close(to: SocketAddr) -> io::Result<()> {
    let mut stream = connect(to)?;
    let mut request = [0u8; wire::CRR_REQUEST_BYTES];
    request[0] = wire::CRR;
    stream.write_all(&request)?;
    let mut response = [0u8; wire::CRR_RESPONSE_BYTES];
    stream.read_exact(&mut response)?;
    // The server closes first: its EOF ends the transaction.
    if stream.read(&mut [0u8])? != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the server sent more than its response",
        ));
    }
    Ok(())
}

fn open_rr(to: SocketAddr, size: usize) -> io::Result<TcpStream> {
    let mut stream = connect(to)?;
    let mut header = vec![wire::RR];
    header.extend_from_slice(&(size as u32).to_le_bytes());
    stream.write_all(&header)?;
    Ok(stream)
}

fn round_trip(stream: &mut TcpStream, message: &mut [u8]) -> io::Result<()> {
    stream.write_all(message)?;
    stream.read_exact(message)
}

/// [`wire::GETSOCKOPT_CALLS_PER_TRANSACTION`] calls of getsockopt(SO_ERROR), which any
/// program attached to the socket's cgroup sees, and whose answer nothing changes.
fn so_error_calls(stream: &mut TcpStream) -> io::Result<()> {
    for _ in 0..wire::GETSOCKOPT_CALLS_PER_TRANSACTION {
        getsockopt(&stream.as_fd(), sockopt::SocketError)?;
    }
    Ok(())
}

/// Sends for `duration`, then waits for the server's count; returns the seconds from the first
/// byte to the count and the count.
fn bulk(to: SocketAddr, duration: Duration) -> Result<(f64, u64)> {
    let mut stream = connect(to).with_context(|| format!("connecting to {to}"))?;
    let buffer = vec![0u8; BULK_BUFFER_BYTES];
    let started = Instant::now();
    stream.write_all(&[wire::BULK])?;
    while started.elapsed() < duration {
        stream.write_all(&buffer).context("sending bulk data")?;
    }
    stream.shutdown(Shutdown::Write)?;
    let mut count = [0u8; 8];
    stream
        .read_exact(&mut count)
        .context("reading the server's byte count")?;
    Ok((started.elapsed().as_secs_f64(), u64::from_le_bytes(count)))
}

fn server_stats(to: SocketAddr) -> Result<PortStats> {
    let mut stream = connect(to).with_context(|| format!("connecting to {to}"))?;
    stream.write_all(&[wire::STATS])?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply)?;
    serde_json::from_slice(&reply)
        .with_context(|| format!("parsing {:?}", String::from_utf8_lossy(&reply)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::turns::Turns;

    #[test]
    fn turns_start_on_go_end_at_end_of_file_and_warm_up_first() {
        let mut turns = Turns::new(1).unwrap();
        let seat = turns.seat(0);
        let schedule = Schedule::Turns {
            go: seat.go_path.clone(),
            done: seat.done_path.clone(),
            slice: Duration::from_millis(1),
            warmup: Duration::from_millis(1),
        };
        let client = std::thread::spawn(move || -> io::Result<Vec<bool>> {
            let mut windows = Windows::new(&schedule)?;
            let mut measured = Vec::new();
            while let Some(window) = windows.next()? {
                measured.push(window.measure_from < window.end);
                windows.finish()?;
            }
            Ok(measured)
        });
        for _ in 0..3 {
            turns.turn(0, Duration::from_secs(5)).unwrap();
        }
        drop(turns);
        assert_eq!(client.join().unwrap().unwrap(), [false, true, true]);
    }
}
