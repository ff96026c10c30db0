//! The rendering stage: the results as tables (terminal and `table.md`), `summary.json`,
//! `results.json`, the CSV files of the raw records, and `chart.svg`.

mod chart;
pub mod summary;
pub mod table;
pub mod tables;

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::analysis::Results;
use crate::render::table::Style;
use crate::render::tables::tables;

/// Writes every output file into `dir`; returns their names.
pub fn write_files(results: &Results, dir: &Path) -> Result<Vec<&'static str>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let files: [(&str, Vec<u8>); 7] = [
        (
            "summary.json",
            serde_json::to_vec_pretty(&summary::summary(results))?,
        ),
        ("results.json", serde_json::to_vec_pretty(results)?),
        ("samples.csv", csv_of(&results.samples)?),
        ("turn-samples.csv", csv_of(&results.turn_samples)?),
        ("setup-samples.csv", csv_of(&results.setup_samples)?),
        ("table.md", tables(results, Style::Markdown).into_bytes()),
        ("chart.svg", chart::render(results)?.into_bytes()),
    ];
    for (name, contents) in &files {
        let path = dir.join(name);
        std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(files.map(|(name, _)| name).to_vec())
}

fn csv_of<T: Serialize>(rows: &[T]) -> Result<Vec<u8>> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    for row in rows {
        writer.serialize(row)?;
    }
    writer.into_inner().context("finishing a CSV file")
}
