//! `e2e-helper connect-loop`: short connections one after another, as long as a soak run lasts.
//! Each one is checked where it ended up (its own destination answered its own line, and its
//! getpeername() is that destination); only the ones that went wrong are printed, one line each,
//! with when they ran, so that the test can tell the failures it caused (a proxy restart) from
//! the others.

use std::io::Write;
use std::net::SocketAddr;

use anyhow::{ensure, Context, Result};
use redirector_tests::{
    monotonic_ms, ConnectLoopOptions, ConnectOptions, ConnectReport, LoopFault, LoopIncident,
    LoopSummary,
};

pub fn connect_loop(options: &ConnectLoopOptions) -> Result<()> {
    ensure!(!options.to.is_empty(), "no destination");
    let mut summary = LoopSummary::default();
    let mut stdout = std::io::stdout().lock();
    for index in 0..options.count {
        if options.stop_file.exists() {
            break;
        }
        let to = options.to[(index % options.to.len() as u64) as usize];
        let message = format!("{} {index}", options.tag);
        let started_ms = monotonic_ms()?;
        let report = crate::one_connection(&ConnectOptions::to(to).message(&message));
        let ended_ms = monotonic_ms()?;
        summary.attempted += 1;
        let fault = match (&report.error, misdelivery(&report, to, &message)) {
            (Some(error), _) => Some((LoopFault::Failed, error.clone())),
            (None, Some(wrong)) => Some((LoopFault::Misdelivered, wrong)),
            (None, None) => None,
        };
        let Some((fault, detail)) = fault else {
            summary.ok += 1;
            continue;
        };
        match fault {
            LoopFault::Failed => summary.failed += 1,
            LoopFault::Misdelivered => summary.misdelivered += 1,
        }
        if summary.failed + summary.misdelivered > LoopSummary::REPORTED_INCIDENTS {
            summary.unreported += 1;
            continue;
        }
        let incident = LoopIncident {
            index,
            to,
            fault,
            detail,
            started_ms,
            ended_ms,
        };
        writeln!(stdout, "{}", serde_json::to_string(&incident)?)?;
        // The test reads the lines as they come; a killed loop still leaves its incidents.
        stdout.flush().context("writing an incident")?;
    }
    writeln!(stdout, "{}", serde_json::to_string(&summary)?)?;
    Ok(())
}

/// What is wrong with an answered connection to `to`, if anything.
fn misdelivery(report: &ConnectReport, to: SocketAddr, message: &str) -> Option<String> {
    match report.server_reply() {
        Err(error) => Some(format!("{error:#}: {report:?}")),
        Ok(reply) if report.peer != Some(to) || reply.local != to || reply.line != message => {
            Some(format!("sent {message:?} to {to}: {report:?}"))
        }
        Ok(_) => None,
    }
}
