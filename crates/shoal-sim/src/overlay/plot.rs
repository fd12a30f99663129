//! Plots of `shoal sim overlay`: the deployed fraction against `Y_r` (the
//! paper's Fig. 5), the synchronous run's overhead per round against `E(X')`,
//! and the deployments-per-host histogram beside Table II.

use super::Report;
use crate::autoscale::plot::font_ready;
use plotters::coord::Shift;
use plotters::prelude::*;
use shoal_core::overlay::analysis;
use std::path::Path;

const MEASURED: RGBColor = RGBColor(31, 119, 180);
const FORMULA: RGBColor = RGBColor(214, 39, 40);

/// SMON Table II: deployments per host on 117 PlanetLab nodes.
pub const TABLE_II: [(u32, u32); 7] = [(1, 72), (2, 26), (3, 12), (4, 3), (5, 2), (15, 1), (23, 1)];

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plot: {e}")
}

/// Writes `BASE-curve`, `BASE-overhead` and `BASE-deployments`, each as SVG
/// and PNG.
pub fn plot_all(base: &Path, r: &Report) -> anyhow::Result<()> {
    anyhow::ensure!(font_ready(), "the embedded plot font could not be loaded");
    let name = base
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    for what in ["curve", "overhead", "deployments"] {
        for ext in ["svg", "png"] {
            let p = base.with_file_name(format!("{name}-{what}.{ext}"));
            let size = (900, 520);
            let written = if ext == "svg" {
                let root = SVGBackend::new(&p, size).into_drawing_area();
                draw(&root, what, r)?;
                root.present().map_err(err)
            } else {
                let root = BitMapBackend::new(&p, size).into_drawing_area();
                draw(&root, what, r)?;
                root.present().map_err(err)
            };
            written.map_err(|e| anyhow::anyhow!("cannot write {}: {e}", p.display()))?;
        }
    }
    Ok(())
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    what: &str,
    r: &Report,
) -> anyhow::Result<()> {
    match what {
        "curve" => draw_curve(root, r),
        "overhead" => draw_overhead(root, r),
        _ => draw_deployments(root, r),
    }
}

fn legend<'a, DB: DrawingBackend + 'a, X: Ranged, Y: Ranged>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
    pos: SeriesLabelPosition,
) -> anyhow::Result<()> {
    chart
        .configure_series_labels()
        .position(pos)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(err)
}

fn draw_curve<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, r: &Report) -> anyhow::Result<()> {
    root.fill(&WHITE).map_err(err)?;
    let n = f64::from(r.config.hosts);
    let x_max = r.rounds_to_all.max(r.rounds_to_99_analysis).ceil() + 1.0;
    let mut chart = ChartBuilder::on(root)
        .caption(
            format!(
                "deployed fraction, {} hosts, deploy time {}, seed {}",
                r.config.hosts, r.config.deploy_time, r.config.seed
            ),
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(36)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..x_max, 0.0..1.02)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("rounds (ping intervals)")
        .y_desc("deployed")
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(err)?;
    let steps = 400;
    chart
        .draw_series(LineSeries::new(
            (0..=steps).map(|i| {
                let x = x_max * f64::from(i) / f64::from(steps);
                (x, analysis::y_r(n, x))
            }),
            FORMULA.stroke_width(2),
        ))
        .map_err(err)?
        .label("Y_r = 1/(1 + n e^-r)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], FORMULA.stroke_width(2)));
    let pts: Vec<(f64, f64)> = r
        .deployed_at
        .iter()
        .enumerate()
        .map(|(i, &t)| (t, (i + 1) as f64 / n))
        .collect();
    chart
        .draw_series(LineSeries::new(pts, MEASURED.stroke_width(2)))
        .map_err(err)?
        .label("simulated (shoal-core's peer)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], MEASURED.stroke_width(2)));
    legend(&mut chart, SeriesLabelPosition::LowerRight)
}

fn draw_overhead<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    r: &Report,
) -> anyhow::Result<()> {
    root.fill(&WHITE).map_err(err)?;
    let n = f64::from(r.config.hosts);
    let y_max = r
        .sync_rounds
        .iter()
        .map(|s| s.overhead)
        .fold(analysis::overhead_limit(), f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(root)
        .caption(
            format!(
                "duplicate deployments per newly deployed host (synchronous, {} hosts)",
                r.config.hosts
            ),
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(36)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..1.0, 0.9..y_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("m/n, deployed when the round began")
        .y_desc("deployers per new host")
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(err)?;
    chart
        .draw_series(LineSeries::new(
            (1..=200).map(|i| {
                let f = f64::from(i) / 200.0;
                (f, analysis::overhead(f * n, 1.0 / (n - 1.0)))
            }),
            FORMULA.stroke_width(2),
        ))
        .map_err(err)?
        .label("E(X') = (m/n)/(1-(1-1/n)^m)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], FORMULA.stroke_width(2)));
    chart
        .draw_series(
            r.sync_rounds
                .iter()
                .filter(|s| s.new > 0)
                .map(|s| Circle::new((f64::from(s.m) / n, s.overhead), 5, MEASURED.filled())),
        )
        .map_err(err)?
        .label("simulated, one point per round")
        .legend(|(x, y)| Circle::new((x + 10, y), 5, MEASURED.filled()));
    legend(&mut chart, SeriesLabelPosition::UpperLeft)
}

fn draw_deployments<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    r: &Report,
) -> anyhow::Result<()> {
    root.fill(&WHITE).map_err(err)?;
    let n = f64::from(r.config.hosts);
    let k_max = r
        .deployments_histogram
        .keys()
        .copied()
        .chain(TABLE_II.iter().map(|(k, _)| *k))
        .max()
        .unwrap_or(1)
        + 1;
    let mut chart = ChartBuilder::on(root)
        .caption(
            format!(
                "deployments per host: {} hosts, deploy time {}, mean {:.2} (Table II: 1.88)",
                r.config.hosts, r.config.deploy_time, r.deployments_mean
            ),
            ("sans-serif", 17),
        )
        .margin(10)
        .x_label_area_size(36)
        .y_label_area_size(50)
        .build_cartesian_2d(0.5..f64::from(k_max) + 0.5, 0.0..1.0)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("deployments (package copies) of a host")
        .y_desc("fraction of hosts")
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(err)?;
    chart
        .draw_series(r.deployments_histogram.iter().map(|(&k, &c)| {
            let x = f64::from(k);
            Rectangle::new([(x - 0.4, 0.0), (x, f64::from(c) / n)], MEASURED.filled())
        }))
        .map_err(err)?
        .label("simulated")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 20, y + 5)], MEASURED.filled()));
    chart
        .draw_series(TABLE_II.iter().map(|&(k, c)| {
            let x = f64::from(k);
            Rectangle::new(
                [(x, 0.0), (x + 0.4, f64::from(c) / 117.0)],
                FORMULA.filled(),
            )
        }))
        .map_err(err)?
        .label("SMON Table II (117 PlanetLab nodes)")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 20, y + 5)], FORMULA.filled()));
    legend(&mut chart, SeriesLabelPosition::UpperRight)
}
