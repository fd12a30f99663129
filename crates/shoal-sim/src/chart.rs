//! A line chart of measured series, as SVG and PNG, with the embedded font:
//! for benchmarks whose figures docs/benchmarks.md plots (`shoal bench
//! timestamps --plot`).

use crate::autoscale::plot::font_ready;
use plotters::prelude::*;
use std::path::Path;

/// One line: its label, its points, and whether it is drawn dashed.
#[derive(Debug, Clone)]
pub struct Series {
    /// The legend's text.
    pub label: String,
    /// (x, y), y > 0 (the y axis is logarithmic).
    pub points: Vec<(f64, f64)>,
    /// Dashed instead of solid.
    pub dashed: bool,
}

const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plot: {e}")
}

/// Writes `base.svg` and `base.png`: `series` against a logarithmic y axis,
/// with a horizontal line at `bound` (its label) if given.
pub fn log_lines(
    base: &Path,
    caption: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
    bound: Option<(f64, &str)>,
) -> anyhow::Result<()> {
    anyhow::ensure!(font_ready(), "the embedded plot font could not be loaded");
    let pts = || series.iter().flat_map(|s| s.points.iter());
    let x_max = pts().map(|p| p.0).fold(1.0, f64::max) * 1.05;
    let ys = pts().map(|p| p.1).filter(|y| *y > 0.0);
    let (mut y_min, mut y_max) = ys.fold((f64::MAX, f64::MIN), |(a, b), y| (a.min(y), b.max(y)));
    if let Some((b, _)) = bound {
        (y_min, y_max) = (y_min.min(b), y_max.max(b));
    }
    anyhow::ensure!(y_min <= y_max, "nothing to plot");
    let frame = Frame {
        caption,
        x_desc,
        y_desc,
        series,
        bound,
        x_max,
        y: (y_min / 2.0, y_max * 2.0),
    };
    for ext in ["svg", "png"] {
        let p = base.with_extension(ext);
        let size = (900, 520);
        if ext == "svg" {
            frame.draw(SVGBackend::new(&p, size).into_drawing_area())
        } else {
            frame.draw(BitMapBackend::new(&p, size).into_drawing_area())
        }
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e:#}", p.display()))?;
    }
    Ok(())
}

struct Frame<'a> {
    caption: &'a str,
    x_desc: &'a str,
    y_desc: &'a str,
    series: &'a [Series],
    bound: Option<(f64, &'a str)>,
    x_max: f64,
    y: (f64, f64),
}

impl Frame<'_> {
    fn draw<DB: DrawingBackend>(
        &self,
        root: DrawingArea<DB, plotters::coord::Shift>,
    ) -> anyhow::Result<()> {
        root.fill(&WHITE).map_err(err)?;
        let x_max = self.x_max;
        let mut chart = ChartBuilder::on(&root)
            .caption(self.caption, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_max, (self.y.0..self.y.1).log_scale())
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(self.x_desc)
            .y_desc(self.y_desc)
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(err)?;
        if let Some((b, label)) = self.bound {
            chart
                .draw_series(LineSeries::new([(0.0, b), (x_max, b)], BLACK.mix(0.5)))
                .map_err(err)?
                .label(label)
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.5)));
        }
        for (i, s) in self.series.iter().enumerate() {
            let c = COLOURS[i % COLOURS.len()];
            let style = c.stroke_width(2);
            let line: Vec<(f64, f64)> = s.points.iter().copied().filter(|p| p.1 > 0.0).collect();
            let drawn = if s.dashed {
                chart
                    .draw_series(DashedLineSeries::new(line.clone(), 8, 5, style))
                    .map_err(err)?
            } else {
                chart
                    .draw_series(LineSeries::new(line.clone(), style))
                    .map_err(err)?
            };
            drawn
                .label(s.label.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            chart
                .draw_series(line.into_iter().map(|p| Circle::new(p, 3, c.filled())))
                .map_err(err)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(err)?;
        root.present().map_err(err)
    }
}
