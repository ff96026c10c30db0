//! `redirector-lab load`: one single-threaded client running one pattern for a while, then
//! reading the server's counters through the same path. Prints a [`LoadReport`] as JSON.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::wire::{self, Latency, LoadReport, Pattern, PortStats};

const BULK_BUFFER_BYTES: usize = 256 * 1024;
/// Bounds every blocking call, so that a broken path ends the run instead of hanging it.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

pub struct LoadOptions {
    pub to: SocketAddr,
    pub pattern: Pattern,
    pub size: usize,
    pub warmup: Duration,
    pub duration: Duration,
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
    let (seconds, transactions, mut latencies, bulk_bytes) = match options.pattern {
        Pattern::Crr => {
            let (seconds, samples) = repeat(
                options,
                &mut errors,
                || Ok(()),
                |()| connect_request_close(options.to),
            )?;
            (seconds, samples.len() as u64, samples, 0)
        }
        Pattern::Rr => {
            let mut message = vec![0u8; options.size];
            let (seconds, samples) = repeat(
                options,
                &mut errors,
                || open_rr(options.to, options.size),
                |stream| round_trip(stream, &mut message),
            )?;
            (seconds, samples.len() as u64, samples, 0)
        }
        Pattern::Bulk => {
            let (seconds, bytes) = bulk(options.to, options.duration)?;
            (seconds, 0, Vec::new(), bytes)
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
        seconds,
        transactions,
        errors: errors.count,
        first_error: errors.first,
        latency: Latency::of(&mut latencies),
        bulk_bytes,
        server,
    })
}

/// Runs `transaction` back to back on the state `open` makes (re-opened after a failure), for
/// the warm-up and then the measured time; returns the measured seconds and the latency of
/// each measured transaction in nanoseconds.
fn repeat<S>(
    options: &LoadOptions,
    errors: &mut Errors,
    mut open: impl FnMut() -> io::Result<S>,
    mut transaction: impl FnMut(&mut S) -> io::Result<()>,
) -> Result<(f64, Vec<u64>)> {
    let started = Instant::now();
    let measure_from = started + options.warmup;
    let end = measure_from + options.duration;
    let mut samples = Vec::new();
    let mut state = None;
    while Instant::now() < end {
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
            Ok(()) if start >= measure_from => samples.push(start.elapsed().as_nanos() as u64),
            Ok(()) => {}
            Err(e) => {
                errors.record(e);
                state = None;
            }
        }
    }
    if samples.is_empty() {
        bail!(
            "no transaction completed to {} ({} errors, first: {})",
            options.to,
            errors.count,
            errors.first.as_deref().unwrap_or("none")
        );
    }
    Ok((options.duration.as_secs_f64(), samples))
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
