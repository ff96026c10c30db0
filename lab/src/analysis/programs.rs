//! The kernel's accounting as figures per operation: for each pass (one variant running one
//! workload alone), what each program that ran cost per run and per connection (or call, or
//! round trip), and all of them together.

use serde::Serialize;

use crate::records::ProgramCost;
use crate::variant::{Variant, Workload};

#[derive(Clone, Debug, Serialize)]
pub struct ProgramRow {
    pub program: String,
    pub hooks: Vec<String>,
    pub run_cnt: u64,
    pub runs_per_operation: f64,
    pub ns_per_run: f64,
    pub ns_per_operation: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ProgramPass {
    pub variant: Variant,
    pub workload: Workload,
    pub operations: u64,
    /// All programs together.
    pub ns_per_operation: f64,
    /// The programs that ran, by name.
    pub programs: Vec<ProgramRow>,
}

/// Runs and time of the programs attached at one hook, together.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HookFigures {
    pub runs_per_operation: f64,
    pub ns_per_run: f64,
}

impl ProgramPass {
    /// The programs attached at `hook` (a bpftool attach type such as `cgroup_sock_ops`);
    /// `None` when no program that ran is known to be attached there.
    pub fn at_hook(&self, hook: &str) -> Option<HookFigures> {
        let at: Vec<&ProgramRow> = self
            .programs
            .iter()
            .filter(|row| row.hooks.iter().any(|h| h == hook))
            .collect();
        let runs: u64 = at.iter().map(|row| row.run_cnt).sum();
        if runs == 0 {
            return None;
        }
        let time: f64 = at
            .iter()
            .map(|row| row.ns_per_run * row.run_cnt as f64)
            .sum();
        Some(HookFigures {
            runs_per_operation: at.iter().map(|row| row.runs_per_operation).sum(),
            ns_per_run: time / runs as f64,
        })
    }
}

/// One pass per (variant, workload) of `costs`, in their order; programs that did not run are
/// left out.
pub fn program_passes(costs: &[ProgramCost]) -> Vec<ProgramPass> {
    let mut passes: Vec<ProgramPass> = Vec::new();
    for cost in costs {
        let operations = cost.operations.max(1) as f64;
        let index = match passes
            .iter()
            .position(|pass| pass.variant == cost.variant && pass.workload == cost.workload)
        {
            Some(index) => index,
            None => {
                passes.push(ProgramPass {
                    variant: cost.variant,
                    workload: cost.workload,
                    operations: cost.operations,
                    ns_per_operation: 0.0,
                    programs: Vec::new(),
                });
                passes.len() - 1
            }
        };
        let pass = &mut passes[index];
        pass.ns_per_operation += cost.run_time_ns as f64 / operations;
        if cost.run_cnt > 0 {
            pass.programs.push(ProgramRow {
                program: cost.program.clone(),
                hooks: cost.hooks.clone(),
                run_cnt: cost.run_cnt,
                runs_per_operation: cost.run_cnt as f64 / operations,
                ns_per_run: cost.run_time_ns as f64 / cost.run_cnt as f64,
                ns_per_operation: cost.run_time_ns as f64 / operations,
            });
        }
    }
    for pass in &mut passes {
        pass.programs.sort_by(|a, b| a.program.cmp(&b.program));
    }
    passes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cost(program: &str, hook: &str, run_cnt: u64, run_time_ns: u64) -> ProgramCost {
        ProgramCost {
            variant: Variant::Ebpf,
            workload: Workload::Crr,
            program: program.into(),
            hooks: vec![hook.into()],
            run_cnt,
            run_time_ns,
            operations: 100,
        }
    }

    #[test]
    fn a_pass_sums_its_programs_and_leaves_out_the_idle_ones() {
        let passes = program_passes(&[
            cost("sockops", "cgroup_sock_ops", 600, 60_000),
            cost("connect4", "cgroup_inet4_connect", 200, 80_000),
            cost("connect6", "cgroup_inet6_connect", 0, 0),
        ]);
        let [pass] = &passes[..] else {
            panic!("one pass expected: {passes:?}")
        };
        assert_eq!(pass.ns_per_operation, 1400.0);
        let names: Vec<&str> = pass.programs.iter().map(|p| p.program.as_str()).collect();
        assert_eq!(names, ["connect4", "sockops"]);
        assert_eq!(
            pass.at_hook("cgroup_sock_ops"),
            Some(HookFigures {
                runs_per_operation: 6.0,
                ns_per_run: 100.0
            })
        );
        assert_eq!(
            pass.at_hook("cgroup_inet4_connect").unwrap().ns_per_run,
            400.0
        );
        assert_eq!(pass.at_hook("cgroup_inet6_connect"), None);
    }
}
