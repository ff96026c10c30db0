//! Policy parity with istio-iptables, connect by connect. Every case (istio's goldens from the
//! shared reference data, plus hand-written ones in `tests/parity-cases/`) runs the same matrix
//! of connects (identity × destination × port × bound source; TCP, and UDP datagrams from
//! unconnected and connected sockets to DNS and one other port) in a pod netns with the case's
//! iptables rules restored and in a pod netns enrolled with `redirector enroll` and the same
//! flags; the verdicts must agree row by row. The table is printed (shown when the test fails,
//! or with `--nocapture`) and written to `target/parity-table.txt`.
//!
//! Needs root, iptables and the built binaries:
//! `cargo build -p redirector -p redirector-tests --bins && cargo test -p redirector-tests --test parity -- --test-threads=1`

use std::collections::BTreeSet;
use std::fmt::Write as _;

use anyhow::{ensure, Context, Result};
use redirector_tests::parity::{self, render_header, render_row, Row, Verdict};
use redirector_tests::process::profile_dir;
use redirector_tests::protocol::Transport;
use redirector_tests::Sandbox;

#[test]
fn redirector_decides_like_istio_iptables_connect_by_connect() -> Result<()> {
    let cases = parity::load_cases()?;
    let sandbox = Sandbox::new("parity")?;
    let mut table = String::new();
    let mut disagreeing = Vec::new();
    let mut inconclusive = Vec::new();
    let mut captured_to_ports = BTreeSet::new();
    let mut udp_captured_to_ports = BTreeSet::new();
    let mut rows_total = 0;
    for case in &cases {
        let rows =
            parity::run_case(&sandbox, case).with_context(|| format!("case {}", case.name))?;
        table.push_str(&parity::render_case(case, &rows));
        table.push('\n');
        rows_total += rows.len();
        let captured: BTreeSet<u16> = rows
            .iter()
            .filter_map(|row| match row.iptables {
                Verdict::To(addr) => Some(addr.port()),
                _ => None,
            })
            .collect();
        // Every rule set sends the proxy's calls to its own pod to the inbound port: a case
        // without such a row ran without its rules.
        ensure!(
            captured.contains(&case.settings.inbound_port),
            "case {}: no connect went to the inbound port {} on the iptables side; were the rules applied?",
            case.name,
            case.settings.inbound_port
        );
        captured_to_ports.extend(captured);
        udp_captured_to_ports.extend(rows.iter().filter_map(|row| match row.iptables {
            Verdict::To(addr) if row.probe.connect.transport != Transport::Tcp => Some(addr.port()),
            _ => None,
        }));
        let line = |row: &Row| render_row(&case.name, row);
        disagreeing.extend(rows.iter().filter(|row| !row.agrees()).map(line));
        inconclusive.extend(
            rows.iter()
                .filter(|row| !row.iptables.is_decision() || !row.redirector.is_decision())
                .map(line),
        );
    }
    let summary = format!(
        "{rows_total} rows in {} cases: {} disagree, {} inconclusive; captured to ports {captured_to_ports:?}",
        cases.len(),
        disagreeing.len(),
        inconclusive.len()
    );
    writeln!(table, "{summary}")?;
    let path = profile_dir()?
        .parent()
        .context("the profile directory has no parent")?
        .join("parity-table.txt");
    std::fs::write(&path, &table).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("{table}");
    eprintln!("table written to {}", path.display());

    ensure!(
        disagreeing.is_empty(),
        "{summary}\nrows where redirector and istio-iptables disagree:\n{}\n{}",
        render_header(),
        disagreeing.join("\n")
    );
    ensure!(
        inconclusive.is_empty(),
        "{summary}\nrows whose connect reached no listener or the wrong one (a topology problem):\n{}\n{}",
        render_header(),
        inconclusive.join("\n")
    );
    let settings = &cases[0].settings;
    for port in [settings.proxy_port, settings.inbound_port, 15053] {
        ensure!(
            captured_to_ports.contains(&port),
            "{summary}\nno case captured a connect to port {port}"
        );
    }
    // istio-iptables captures UDP for DNS only: a UDP row captured elsewhere, or none
    // captured at all, means the UDP probes did not test what they are for.
    ensure!(
        udp_captured_to_ports == BTreeSet::from([15053]),
        "{summary}\nUDP probes captured to ports {udp_captured_to_ports:?} on the iptables side, expected 15053 only"
    );
    Ok(())
}
