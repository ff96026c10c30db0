//! The analysis stage: from the measurement records to figures (medians and spreads,
//! overheads against the baselines, program cost per operation, the not-captured tax, setup
//! percentiles) and the goals they meet or miss. Nothing here reads the machine or writes a
//! file.

pub mod goals;
pub mod programs;
pub mod setup;
pub mod spread;
pub mod tax;
pub mod traffic;

use std::collections::BTreeMap;

use serde::Serialize;

use crate::analysis::goals::{evaluate_goals, Goal};
use crate::analysis::programs::{program_passes, ProgramPass};
use crate::analysis::setup::{setup_rows, SetupRow};
use crate::analysis::spread::Spread;
use crate::analysis::tax::{tax_rows, TaxRow};
use crate::analysis::traffic::{overhead_rows, traffic_rows, Metric, OverheadRow, TrafficRow};
use crate::records::{
    Config, Measurements, PerfProfile, Sample, SetupMethod, SetupMode, SetupSample, SystemInfo,
    TurnSample,
};
use crate::variant::{Variant, Workload};

#[derive(Clone, Debug, Serialize)]
pub struct Results {
    pub system: SystemInfo,
    pub config: Config,
    pub traffic: Vec<TrafficRow>,
    pub overhead: Vec<OverheadRow>,
    pub programs: Vec<ProgramPass>,
    pub not_captured_tax: Vec<TaxRow>,
    /// CPU profiles during the connection-rate pattern (empty when perf did not run).
    pub perf: Vec<PerfProfile>,
    pub setup: Vec<SetupRow>,
    /// Memory of redirector's maps, allocated once per node (not per pod).
    pub map_memory_bytes: u64,
    /// Connections each intercepting pod redirected over the whole run.
    pub intercepted_connections: BTreeMap<String, u64>,
    pub goals: Vec<Goal>,
    /// The records the figures come from, for the CSV files.
    #[serde(skip)]
    pub samples: Vec<Sample>,
    #[serde(skip)]
    pub turn_samples: Vec<TurnSample>,
    #[serde(skip)]
    pub setup_samples: Vec<SetupSample>,
}

impl Results {
    pub fn analyse(system: SystemInfo, config: Config, measured: Measurements) -> Results {
        let programs = program_passes(&measured.program_costs);
        let mut results = Results {
            system,
            traffic: traffic_rows(&config.variants, &measured.samples),
            overhead: overhead_rows(&config.variants, &measured.samples),
            config,
            not_captured_tax: tax_rows(&measured.turn_samples, &programs),
            programs,
            perf: measured.perf,
            setup: setup_rows(&measured.setup_samples, &measured.setup_batches),
            map_memory_bytes: measured.map_memory_bytes,
            intercepted_connections: measured.intercepted_connections,
            goals: Vec::new(),
            samples: measured.samples,
            turn_samples: measured.turn_samples,
            setup_samples: measured.setup_samples,
        };
        results.goals = evaluate_goals(&results);
        results
    }

    pub fn traffic(&self, variant: Variant, workload: Workload) -> Option<&TrafficRow> {
        self.traffic
            .iter()
            .find(|row| row.variant == variant && row.workload == workload)
    }

    /// One metric of one variant and workload over the rounds.
    pub fn spread(&self, variant: Variant, workload: Workload, metric: Metric) -> Option<Spread> {
        self.traffic(variant, workload)
            .and_then(|row| row.spread(metric))
    }

    /// `variant − baseline` for one metric, over the rounds.
    pub fn overhead(&self, variant: Variant, workload: Workload, metric: Metric) -> Option<Spread> {
        self.overhead
            .iter()
            .find(|row| row.variant == variant && row.workload == workload && row.metric == metric)
            .map(|row| row.difference)
    }

    pub fn program_pass(&self, variant: Variant, workload: Workload) -> Option<&ProgramPass> {
        self.programs
            .iter()
            .find(|pass| pass.variant == variant && pass.workload == workload)
    }

    pub fn tax(&self, workload: Workload) -> Option<&TaxRow> {
        self.not_captured_tax
            .iter()
            .find(|row| row.workload == workload)
    }

    pub fn setup_row(
        &self,
        method: SetupMethod,
        mode: SetupMode,
        pods: usize,
    ) -> Option<&SetupRow> {
        self.setup
            .iter()
            .find(|row| row.method == method && row.mode == mode && row.pods == pods)
    }

    /// The variants with traffic figures for `workload`, in the order they were chosen.
    pub fn variants_with(&self, workload: Workload) -> Vec<Variant> {
        self.config
            .variants
            .iter()
            .copied()
            .filter(|&variant| self.traffic(variant, workload).is_some())
            .collect()
    }
}
