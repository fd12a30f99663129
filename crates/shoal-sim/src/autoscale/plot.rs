//! Plots in the manner of LAMA's Fig. 8: the load (true demand, what the
//! monitor observed, the forecasts), then the nodes each policy allocated.

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;

use super::engine::{PolicyKind, Run, SimConfig};
use super::workload::Workload;

const WIDTH: u32 = 1200;
const TOP: u32 = 340;
const PANEL: u32 = 170;

/// The embedded font (DejaVu Sans), registered once for plotters' ab_glyph
/// text: no system font lookup, so no fontconfig.
pub(crate) fn font_ready() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
            .is_ok()
    })
}

pub(super) fn colour(kind: PolicyKind) -> RGBColor {
    match kind {
        PolicyKind::Threshold => RGBColor(214, 39, 40),
        PolicyKind::Ar => RGBColor(31, 119, 180),
        PolicyKind::Hpa => RGBColor(148, 103, 189),
        PolicyKind::Predictive => RGBColor(44, 160, 44),
    }
}

/// Draws the figure to `path`; the extension picks PNG or SVG.
pub fn plot(path: &Path, w: &Workload, runs: &[Run], cfg: &SimConfig) -> anyhow::Result<()> {
    anyhow::ensure!(font_ready(), "the embedded plot font could not be loaded");
    let height = TOP + PANEL * runs.len() as u32;
    let svg = path.extension().is_some_and(|e| e == "svg");
    if svg {
        let root = SVGBackend::new(path, (WIDTH, height)).into_drawing_area();
        draw(&root, w, runs, cfg)?;
        root.present()
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
    } else {
        let root = BitMapBackend::new(path, (WIDTH, height)).into_drawing_area();
        draw(&root, w, runs, cfg)?;
        root.present()
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
    }
}

pub(super) fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plot: {e}")
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    w: &Workload,
    runs: &[Run],
    cfg: &SimConfig,
) -> anyhow::Result<()> {
    root.fill(&WHITE).map_err(err)?;
    let t_end = (w.demand.len().max(2) - 1) as f64 * w.step;
    let (top, rest) = root.split_vertically(TOP);
    let panels = rest.split_evenly((runs.len().max(1), 1));

    // (a)/(b): load, observed and forecast.
    let first = runs.first();
    let y_max = w
        .demand
        .iter()
        .copied()
        .chain(
            first
                .iter()
                .flat_map(|r| r.steps.iter().map(|s| s.observed)),
        )
        .fold(1.0, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(&top)
        .caption(
            format!(
                "{}: load (C = {} per node, lead time {} s, seed {})",
                w.name, cfg.capacity, cfg.lead_time, cfg.seed
            ),
            ("sans-serif", 18),
        )
        .margin(8)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..t_end, 0.0..y_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("time (s)")
        .y_desc(format!("load ({})", w.unit))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(err)?;
    if let Some(r) = first {
        chart
            .draw_series(LineSeries::new(
                r.steps.iter().map(|s| (s.time, s.observed)),
                RGBColor(170, 170, 170).stroke_width(1),
            ))
            .map_err(err)?
            .label(format!("observed sum ({} run)", r.policy.name()))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RGBColor(170, 170, 170)));
    }
    chart
        .draw_series(LineSeries::new(
            w.demand
                .iter()
                .enumerate()
                .map(|(i, d)| (i as f64 * w.step, *d)),
            BLACK.stroke_width(2),
        ))
        .map_err(err)?
        .label("true demand")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(2)));
    for r in runs.iter().filter(|r| r.forecaster.is_some()) {
        let c = colour(r.policy);
        chart
            .draw_series(LineSeries::new(
                r.steps
                    .iter()
                    .filter_map(|s| s.forecast.map(|f| (s.time, f.max(0.0).min(y_max)))),
                c.stroke_width(1),
            ))
            .map_err(err)?
            .label(format!(
                "{} forecast, {}",
                r.policy.name(),
                r.forecaster.as_deref().unwrap_or("")
            ))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(err)?;

    // One panel of allocated nodes per policy, as Fig. 8 (c) and (d).
    let n_max = runs
        .iter()
        .map(|r| r.summary.peak_nodes)
        .max()
        .unwrap_or(1)
        .max(1) as f64
        + 1.0;
    for (r, area) in runs.iter().zip(panels.iter()) {
        let c = colour(r.policy);
        let s = &r.summary;
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!(
                    "{}: {:.0} violation s, {:.0} node-s, {} reallocations",
                    r.policy.name(),
                    s.violation_seconds,
                    s.node_seconds,
                    s.reallocations
                ),
                ("sans-serif", 15),
            )
            .margin(6)
            .x_label_area_size(22)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..t_end, 0.0..n_max)
            .map_err(err)?;
        chart
            .configure_mesh()
            .y_desc("nodes")
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{v:.0}"))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(err)?;
        // Nodes needed to keep demand under ut, for reference.
        let need = w.demand.iter().enumerate().map(|(i, d)| {
            (
                i as f64 * w.step,
                (d / (cfg.ut * cfg.capacity))
                    .ceil()
                    .max(f64::from(cfg.min_nodes)),
            )
        });
        chart
            .draw_series(LineSeries::new(
                steps(need),
                RGBColor(120, 120, 120).stroke_width(1),
            ))
            .map_err(err)?
            .label("needed at ut")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RGBColor(120, 120, 120)));
        chart
            .draw_series(LineSeries::new(
                steps(r.steps.iter().map(|s| (s.time, f64::from(s.ready)))),
                c.mix(0.45).stroke_width(1),
            ))
            .map_err(err)?
            .label("serving")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.mix(0.45)));
        chart
            .draw_series(LineSeries::new(
                steps(r.steps.iter().map(|s| (s.time, f64::from(s.allocated)))),
                c.stroke_width(2),
            ))
            .map_err(err)?
            .label("allocated")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 12))
            .draw()
            .map_err(err)?;
    }
    Ok(())
}

/// A staircase through the points (each value held until the next time).
fn steps(points: impl Iterator<Item = (f64, f64)>) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = Vec::new();
    for (t, v) in points {
        if let Some(&(_, prev)) = out.last()
            && prev != v
        {
            out.push((t, prev));
        }
        out.push((t, v));
    }
    out
}
