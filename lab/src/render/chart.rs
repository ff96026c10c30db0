//! `chart.svg`: latency percentiles per variant (connection rate and 1-byte request/response)
//! and the per-pod setup time (p99) against the number of pods.

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use crate::analysis::goals::SETUP_GOAL_P99_MS;
use crate::analysis::traffic::Metric;
use crate::analysis::Results;
use crate::records::{SetupMethod, SetupMode};
use crate::variant::Workload;

const SIZE: (u32, u32) = (1840, 480);
/// Widths of the CRR and RR panels (the setup panel takes the rest): about 75 px per variant,
/// enough for a label such as `EBPF/haproxy`.
const CRR_PANEL_WIDTH: u32 = 860;
const RR_PANEL_WIDTH: u32 = 560;
const PERCENTILE_COLOURS: [RGBColor; 3] = [
    RGBColor(0x4c, 0x72, 0xb0),
    RGBColor(0xdd, 0x84, 0x52),
    RGBColor(0xc4, 0x4e, 0x52),
];
/// IPT, EBPF; parallel lines are lighter.
const METHOD_COLOURS: [RGBColor; 2] = [RGBColor(0xc4, 0x4e, 0x52), RGBColor(0x4c, 0x72, 0xb0)];
const GOAL_COLOUR: RGBColor = RGBColor(0x55, 0xa8, 0x68);

pub fn render(results: &Results) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let (crr, rest) = root.split_horizontally(CRR_PANEL_WIDTH);
        let (rr, setup) = rest.split_horizontally(RR_PANEL_WIDTH);
        latency_panel(
            &crr,
            results,
            Workload::Crr,
            "Connection rate (CRR) latency, µs",
        )?;
        latency_panel(
            &rr,
            results,
            Workload::Rr1,
            "Request/response 1 B latency, µs",
        )?;
        setup_panel(&setup, results)?;
        root.present().map_err(plot_error)?;
    }
    Ok(svg)
}

/// The series labels, upper left, as every chart here has them.
fn draw_legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
) -> Result<()> {
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(plot_error)
}

fn plot_error(error: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("drawing the chart: {error}")
}

/// Bars of p50, p99 and p99.9 (medians over the rounds) for every variant.
fn latency_panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    results: &Results,
    workload: Workload,
    title: &str,
) -> Result<()> {
    let variants = &results.variants_with(workload);
    let percentiles = [
        ("p50", Metric::P50Us),
        ("p99", Metric::P99Us),
        ("p99.9", Metric::P999Us),
    ];
    let value = |variant, metric| {
        results
            .spread(variant, workload, metric)
            .map(|spread| spread.median)
    };
    let values: Vec<f64> = variants
        .iter()
        .flat_map(|&variant| {
            percentiles
                .iter()
                .filter_map(move |&(_, metric)| value(variant, metric))
        })
        .collect();
    // Log scale: tails can be a hundred times the median.
    let top = values.iter().copied().fold(1.0_f64, f64::max) * 1.5;
    let bottom = values.iter().copied().fold(top, f64::min) / 2.0;
    let names: Vec<&str> = variants.iter().map(|variant| variant.name()).collect();
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(
            -0.5..(variants.len() as f64 - 0.5),
            (bottom..top).log_scale(),
        )
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(variants.len())
        .x_label_formatter(&|x| variant_label(&names, *x))
        .x_label_style(("sans-serif", 11))
        .y_label_formatter(&|y| short_number(*y))
        .draw()
        .map_err(plot_error)?;
    let width = 0.8 / percentiles.len() as f64;
    for (k, &(label, metric)) in percentiles.iter().enumerate() {
        let colour = PERCENTILE_COLOURS[k];
        let bars = variants.iter().enumerate().filter_map(|(i, &variant)| {
            let left = i as f64 - 0.4 + k as f64 * width;
            value(variant, metric)
                .map(|v| Rectangle::new([(left, bottom), (left + width, v)], colour.filled()))
        });
        chart
            .draw_series(bars)
            .map_err(plot_error)?
            .label(label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled()));
    }
    draw_legend(&mut chart)
}

/// The variant whose bars are centred on `x` (labels fall on whole numbers).
fn variant_label(names: &[&str], x: f64) -> String {
    let index = x.round();
    if (x - index).abs() > 1e-6 || index < 0.0 {
        return String::new();
    }
    names
        .get(index as usize)
        .map_or(String::new(), |name| (*name).to_owned())
}

/// Per-pod setup p99 against N, log-log, one line per method and mode, and the goal.
fn setup_panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    results: &Results,
) -> Result<()> {
    let points = |method, mode| -> Vec<(f64, f64)> {
        let mut points: Vec<(f64, f64)> = results
            .setup
            .iter()
            .filter(|row| row.method == method && row.mode == mode)
            .map(|row| (row.pods as f64, row.p99_ms.max(1e-3)))
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        points
    };
    let lines: Vec<(SetupMethod, SetupMode)> = SetupMethod::ALL
        .iter()
        .flat_map(|&method| SetupMode::ALL.map(|mode| (method, mode)))
        .collect();
    let all: Vec<(f64, f64)> = lines
        .iter()
        .flat_map(|&(m, mode)| points(m, mode))
        .collect();
    let max_pods = all.iter().map(|p| p.0).fold(1.0, f64::max) * 2.0;
    let min_ms = all
        .iter()
        .map(|p| p.1)
        .fold(f64::INFINITY, f64::min)
        .min(1.0)
        / 2.0;
    let max_ms = all.iter().map(|p| p.1).fold(SETUP_GOAL_P99_MS, f64::max) * 2.0;
    let mut chart = ChartBuilder::on(area)
        .caption("Setup per pod, p99, ms", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d((0.5..max_pods).log_scale(), (min_ms..max_ms).log_scale())
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("N pods")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| short_number(*y))
        .draw()
        .map_err(plot_error)?;
    for (method, mode) in lines {
        let base = METHOD_COLOURS[SetupMethod::ALL
            .iter()
            .position(|&m| m == method)
            .unwrap_or(0)];
        let colour = match mode {
            SetupMode::Sequential => base.to_rgba(),
            SetupMode::Parallel => base.mix(0.45),
        };
        let line = points(method, mode);
        chart
            .draw_series(LineSeries::new(line.clone(), colour.stroke_width(2)))
            .map_err(plot_error)?
            .label(format!("{} {}", method.name(), mode.name()))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], colour.stroke_width(2)));
        chart
            .draw_series(line.into_iter().map(|p| Circle::new(p, 3, colour.filled())))
            .map_err(plot_error)?;
    }
    chart
        .draw_series(LineSeries::new(
            [(0.5, SETUP_GOAL_P99_MS), (max_pods, SETUP_GOAL_P99_MS)],
            GOAL_COLOUR.stroke_width(1),
        ))
        .map_err(plot_error)?
        .label(format!("goal {SETUP_GOAL_P99_MS} ms"))
        .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], GOAL_COLOUR.stroke_width(1)));
    draw_legend(&mut chart)
}

fn short_number(value: f64) -> String {
    if value >= 1.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.2}")
    }
}
