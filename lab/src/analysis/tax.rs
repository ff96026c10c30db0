//! The not-captured tax: what a pod pays for being enrolled on what redirector leaves alone.
//! Each turn of the not-captured variant (an enrolled pod, to a port its policy excludes) is
//! compared with B0's turn of the same cycle (a pod that is not enrolled), right before or
//! after it: the median of those differences is the tax.

use serde::Serialize;

use crate::analysis::programs::ProgramPass;
use crate::analysis::spread::Spread;
use crate::records::TurnSample;
use crate::variant::{Variant, Workload};
use crate::wire::nearest_rank;

#[derive(Clone, Debug, Serialize)]
pub struct TaxRow {
    pub workload: Workload,
    /// ns per operation, not-captured minus B0, over the paired turns.
    pub extra_ns: Spread,
    /// Half-width of a 95 % interval around the median of `extra_ns`, from the spread of the
    /// pairs (normal approximation: 1.96 × 1.2533 σ / √n, σ from the interquartile range).
    pub extra_ns_margin: f64,
    pub pairs: usize,
    /// Medians over the turns of each side, ns per operation.
    pub enrolled_ns: f64,
    pub not_enrolled_ns: f64,
    /// Program time per operation from the kernel's accounting in the enrolled pod (the pod
    /// that is not enrolled runs none).
    pub program_ns: Option<f64>,
}

fn ns_per_operation(turn: &TurnSample) -> Option<f64> {
    (turn.operations > 0).then(|| turn.seconds * 1e9 / turn.operations as f64)
}

pub fn tax_rows(turns: &[TurnSample], passes: &[ProgramPass]) -> Vec<TaxRow> {
    let enrolled = Variant::EbpfNotCaptured;
    let Some(not_enrolled) = enrolled.baseline() else {
        return Vec::new();
    };
    Workload::NOT_CAPTURED_TAX
        .into_iter()
        .filter_map(|workload| {
            let side = |variant: Variant| -> Vec<&TurnSample> {
                turns
                    .iter()
                    .filter(|t| t.workload == workload && t.variant == variant)
                    .collect()
            };
            let (ours, theirs) = (side(enrolled), side(not_enrolled));
            let differences: Vec<f64> = ours
                .iter()
                .filter_map(|turn| {
                    let other = theirs
                        .iter()
                        .find(|t| t.round == turn.round && t.turn == turn.turn)?;
                    Some(ns_per_operation(turn)? - ns_per_operation(other)?)
                })
                .collect();
            let median = |side: &[&TurnSample]| {
                Spread::of(side.iter().filter_map(|t| ns_per_operation(t))).map(|s| s.median)
            };
            Some(TaxRow {
                workload,
                pairs: differences.len(),
                extra_ns_margin: median_margin(&differences),
                extra_ns: Spread::of(differences)?,
                enrolled_ns: median(&ours)?,
                not_enrolled_ns: median(&theirs)?,
                program_ns: passes
                    .iter()
                    .find(|pass| pass.variant == enrolled && pass.workload == workload)
                    .map(|pass| pass.ns_per_operation),
            })
        })
        .collect()
}

/// How far the median of `values` may be from the true one, at 95 %: a tax of 100 ns on a
/// connection of 50 µs is within the noise of a few dozen turns, and the goal says so.
fn median_margin(values: &[f64]) -> f64 {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.len() < 2 {
        return f64::INFINITY;
    }
    sorted.sort_by(f64::total_cmp);
    let sigma = (nearest_rank(&sorted, 0.75) - nearest_rank(&sorted, 0.25)) / 1.349;
    1.96 * 1.2533 * sigma / (sorted.len() as f64).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(variant: Variant, round: u32, turn: usize, operations: u64) -> TurnSample {
        TurnSample {
            round,
            workload: Workload::SockoptSoError,
            variant,
            turn,
            seconds: 0.001,
            operations,
        }
    }

    #[test]
    fn the_tax_is_the_median_of_differences_of_turns_of_the_same_cycle() {
        let turns = [
            // 1000 ns and 500 ns per call in round 1's turn 0; 2000 and 1000 in turn 1.
            turn(Variant::EbpfNotCaptured, 1, 0, 1000),
            turn(Variant::B0, 1, 0, 2000),
            turn(Variant::EbpfNotCaptured, 1, 1, 500),
            turn(Variant::B0, 1, 1, 1000),
            turn(Variant::EbpfNotCaptured, 2, 0, 1000),
            turn(Variant::B0, 2, 0, 1000),
            // No partner: left out.
            turn(Variant::EbpfNotCaptured, 2, 1, 1000),
        ];
        let rows = tax_rows(&turns, &[]);
        let [row] = &rows[..] else {
            panic!("one row expected: {rows:?}")
        };
        assert_eq!(row.workload, Workload::SockoptSoError);
        assert_eq!(row.pairs, 3);
        assert_eq!(
            (row.extra_ns.median, row.extra_ns.min, row.extra_ns.max),
            (500.0, 0.0, 1000.0)
        );
        assert_eq!(row.program_ns, None);
        assert!(row.extra_ns_margin > 0.0);
    }

    #[test]
    fn the_margin_shrinks_with_more_pairs() {
        let few: Vec<f64> = (0..10).map(f64::from).collect();
        let many: Vec<f64> = (0..1000).map(|i| f64::from(i % 10)).collect();
        assert!(median_margin(&many) < median_margin(&few) / 5.0);
        assert_eq!(median_margin(&[1.0]), f64::INFINITY);
    }
}
