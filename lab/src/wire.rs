//! What the load generator and the server say to each other, and what the load generator
//! reports. Both sides are built from these definitions, so they cannot drift apart.
//!
//! Every connection starts with one byte naming its pattern:
//! - `C` (connection rate, TCP_CRR): the client sends [`CRR_REQUEST_BYTES`] in all, the server
//!   answers [`CRR_RESPONSE_BYTES`] and closes; the client reads to EOF and closes.
//! - `R` (request/response, TCP_RR): then a little-endian u32 message size; the server echoes
//!   every message of that size until EOF.
//! - `B` (bulk): the server counts bytes until EOF, answers the count as a little-endian u64
//!   and closes.
//! - `S` (stats): the server answers its [`PortStats`] for the port it was reached on as JSON
//!   and closes. Stats connections are not counted.
//!
//! The getsockopt pattern opens an `R` connection and sends nothing on it: its calls never
//! reach the server.

use serde::{Deserialize, Serialize};

pub const CRR: u8 = b'C';
pub const RR: u8 = b'R';
pub const BULK: u8 = b'B';
pub const STATS: u8 = b'S';

/// A small HTTP-like request and response.
pub const CRR_REQUEST_BYTES: usize = 64;
pub const CRR_RESPONSE_BYTES: usize = 64;

/// getsockopt calls per transaction of the getsockopt pattern: enough that reading the clock
/// once per transaction costs nothing next to them.
pub const GETSOCKOPT_CALLS_PER_TRANSACTION: u64 = 100;

/// The traffic patterns of the lab.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// Connect, small request, response, close: one connection per transaction.
    Crr,
    /// Request/response of a fixed size on one persistent connection.
    Rr,
    /// One connection sending as fast as it can.
    Bulk,
    /// getsockopt(SO_ERROR) on one open connection, back to back.
    Getsockopt,
}

/// Traffic one server port has seen since the server started (stats requests excluded).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortStats {
    pub connections: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// Latency percentiles of one run, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
}

impl Latency {
    /// Percentiles of `samples` (nanoseconds; sorted here); `None` when there are none.
    pub fn of(samples: &mut [u64]) -> Option<Latency> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let at = |q: f64| nearest_rank(samples, q) as f64 / 1e3;
        let sum: u128 = samples.iter().map(|&s| u128::from(s)).sum();
        Some(Latency {
            p50_us: at(0.50),
            p90_us: at(0.90),
            p99_us: at(0.99),
            p999_us: at(0.999),
            max_us: at(1.0),
            mean_us: sum as f64 / samples.len() as f64 / 1e3,
        })
    }
}

/// The measured part of one turn (or of a whole run that does not take turns).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct TurnFigures {
    pub seconds: f64,
    pub transactions: u64,
}

/// The q-quantile of `sorted` (ascending, not empty) by nearest rank: the smallest value with
/// at least q of the values at or below it.
pub fn nearest_rank<T: Copy>(sorted: &[T], q: f64) -> T {
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// What one `redirector-lab load` run prints as its last stdout line.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoadReport {
    pub pattern: Pattern,
    /// Message size (RR) in bytes; 0 for the other patterns.
    pub size: usize,
    /// Length of the measured part of the run.
    pub seconds: f64,
    /// Completed transactions (CRR, RR, getsockopt) in the measured part.
    pub transactions: u64,
    /// The measured windows one by one (turns in the order they were given).
    pub turns: Vec<TurnFigures>,
    pub errors: u64,
    pub first_error: Option<String>,
    pub latency: Option<Latency>,
    /// Bulk only: bytes the server confirmed having received.
    pub bulk_bytes: u64,
    /// The server's counters for the port this run reached, read after the run through the
    /// same path (proxy and interception included).
    pub server: PortStats,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut samples: Vec<u64> = (1..=1000).map(|us| us * 1000).collect();
        samples.reverse();
        let latency = Latency::of(&mut samples).unwrap();
        assert_eq!(latency.p50_us, 500.0);
        assert_eq!(latency.p99_us, 990.0);
        assert_eq!(latency.p999_us, 999.0);
        assert_eq!(latency.max_us, 1000.0);
        assert_eq!(latency.mean_us, 500.5);
        assert_eq!(Latency::of(&mut []), None);
        assert_eq!(Latency::of(&mut [7000]).unwrap().p999_us, 7.0);
    }
}
