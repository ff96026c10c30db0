//! `redirector-lab serve`: the server end of every pattern in [`crate::wire`], one listener per
//! address (one port per variant, so that each variant's traffic is counted apart).
//!
//! Connection-rate requests are answered on the accepting thread itself: the client makes one
//! connection at a time, and a thread start per connection would be most of what is measured.
//! Persistent connections get a thread each.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::wire::{self, PortStats};

/// How long the accepting thread waits for a connection's first bytes.
const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(2);
const BULK_BUFFER_BYTES: usize = 256 * 1024;

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> PortStats {
        PortStats {
            connections: self.connections.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
        }
    }

    fn received(&self, bytes: usize) {
        self.bytes_in.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    fn sent(&self, bytes: usize) {
        self.bytes_out.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

/// Listens on every address, prints `listening` once all listen, and serves until killed.
pub fn serve(addresses: &[SocketAddr]) -> Result<()> {
    let listeners = addresses
        .iter()
        .map(|at| TcpListener::bind(at).with_context(|| format!("listening on {at}")))
        .collect::<Result<Vec<_>>>()?;
    println!("listening");
    io::stdout().flush()?;
    let threads: Vec<_> = listeners
        .into_iter()
        .map(|listener| thread::spawn(move || accept_loop(listener)))
        .collect();
    for thread in threads {
        let _ = thread.join();
    }
    Ok(())
}

fn accept_loop(listener: TcpListener) {
    let counters = Arc::new(Counters::default());
    for stream in listener.incoming().flatten() {
        // A connection that breaks off is the client's problem; the server carries on.
        let _ = answer(stream, &counters);
    }
}

fn answer(mut stream: TcpStream, counters: &Arc<Counters>) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(FIRST_BYTES_TIMEOUT))?;
    let mut pattern = [0u8];
    stream.read_exact(&mut pattern)?;
    if pattern[0] == wire::STATS {
        let stats = serde_json::to_vec(&counters.snapshot()).map_err(io::Error::other)?;
        return stream.write_all(&stats);
    }
    counters.connections.fetch_add(1, Ordering::Relaxed);
    counters.received(1);
    match pattern[0] {
        wire::CRR => {
            let mut request = [0u8; wire::CRR_REQUEST_BYTES - 1];
            stream.read_exact(&mut request)?;
            counters.received(request.len());
            stream.write_all(&[0u8; wire::CRR_RESPONSE_BYTES])?;
            counters.sent(wire::CRR_RESPONSE_BYTES);
            Ok(())
        }
        wire::RR => {
            stream.set_read_timeout(None)?;
            let counters = counters.clone();
            thread::spawn(move || echo(stream, &counters));
            Ok(())
        }
        wire::BULK => {
            stream.set_read_timeout(None)?;
            let counters = counters.clone();
            thread::spawn(move || sink(stream, &counters));
            Ok(())
        }
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown pattern byte {other:#x}"),
        )),
    }
}

/// RR: echo messages of the announced size until EOF.
fn echo(mut stream: TcpStream, counters: &Counters) -> io::Result<()> {
    let mut size = [0u8; 4];
    stream.read_exact(&mut size)?;
    counters.received(size.len());
    let mut message = vec![0u8; u32::from_le_bytes(size) as usize];
    loop {
        match stream.read_exact(&mut message) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        counters.received(message.len());
        stream.write_all(&message)?;
        counters.sent(message.len());
    }
}

/// Bulk: count until EOF, answer the count.
fn sink(mut stream: TcpStream, counters: &Counters) -> io::Result<()> {
    let mut buffer = vec![0u8; BULK_BUFFER_BYTES];
    let mut total: u64 = 0;
    loop {
        let n = stream.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        counters.received(n);
    }
    stream.write_all(&total.to_le_bytes())?;
    counters.sent(8);
    Ok(())
}
