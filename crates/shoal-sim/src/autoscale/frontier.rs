//! `shoal sim autoscale --frontier`: every policy's violation-seconds
//! against node-seconds, HPA swept over its target and the predictive
//! policy over its provisioning threshold and its k, each point the mean
//! of several seeds; then, for each HPA setting, the fewest node-seconds a
//! predictive setting needs for at most the same violation-seconds, and
//! whether some predictive setting is worse than it on both counts. A
//! policy sits on a better frontier when it does so for every setting of
//! the other, not at one setting.

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;
use serde::Serialize;

use super::engine::{PolicyKind, SimConfig, Summary, simulate};
use super::plot::{colour, err, font_ready};
use super::workload::WorkloadSpec;

/// One policy at one setting, averaged over the seeds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Point {
    /// The policy.
    pub policy: PolicyKind,
    /// Its setting, e.g. `target=0.8` or `k=2`.
    pub setting: String,
    /// Mean seconds in which demand exceeded ut x serving capacity.
    pub violation_seconds: f64,
    /// Mean integral of held nodes.
    pub node_seconds: f64,
    /// Mean nodes added plus released.
    pub reallocations: f64,
}

/// How an HPA setting stands against the predictive settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// A predictive setting violates no more and holds no more nodes.
    PredictiveDominates,
    /// HPA violates no more and holds no more nodes than some predictive
    /// setting (and no predictive setting dominates it).
    HpaDominates,
    /// Neither: HPA trades violations for nodes where no predictive setting
    /// is comparable.
    Neither,
}

/// An HPA setting against the predictive frontier.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Against {
    /// The HPA setting.
    pub hpa_setting: String,
    /// Its violation-seconds.
    pub hpa_violation_seconds: f64,
    /// Its node-seconds.
    pub hpa_node_seconds: f64,
    /// The predictive setting with the fewest node-seconds among those with
    /// at most the HPA setting's violation-seconds (None: no predictive
    /// setting violates that little).
    pub predictive_setting: Option<String>,
    /// That setting's violation-seconds.
    pub predictive_violation_seconds: Option<f64>,
    /// That setting's node-seconds.
    pub predictive_node_seconds: Option<f64>,
    /// Node-seconds predictive saves, as a fraction of HPA's (negative: it
    /// needs more).
    pub node_seconds_saved: Option<f64>,
    /// Who dominates.
    pub verdict: Verdict,
}

/// The whole sweep on one workload.
#[derive(Debug, Clone, Serialize)]
pub struct Frontier {
    /// Workload name.
    pub workload: String,
    /// Seeds averaged, inclusive.
    pub seeds: (u64, u64),
    /// Every point.
    pub points: Vec<Point>,
    /// Every HPA setting against predictive.
    pub hpa_against_predictive: Vec<Against>,
    /// HPA settings predictive dominates (no more violation-seconds and no
    /// more node-seconds).
    pub hpa_dominated: usize,
    /// HPA settings that dominate some predictive setting and are not
    /// dominated themselves.
    pub hpa_dominating: usize,
    /// HPA settings swept.
    pub hpa_points: usize,
}

/// What to sweep.
#[derive(Debug, Clone)]
pub struct Sweep {
    /// HPA targets.
    pub hpa_targets: Vec<f64>,
    /// Predictive k values.
    pub ks: Vec<f64>,
    /// Predictive provisioning thresholds (`sla.upper`).
    pub predictive_uts: Vec<f64>,
    /// Seeds, inclusive.
    pub seeds: (u64, u64),
}

/// Runs the sweep over `spec` on `step`, the other settings from `base`.
pub fn sweep(
    spec: &WorkloadSpec,
    step: f64,
    base: &SimConfig,
    s: &Sweep,
) -> anyhow::Result<Frontier> {
    anyhow::ensure!(!s.hpa_targets.is_empty(), "--hpa-targets is empty");
    anyhow::ensure!(!s.ks.is_empty(), "--ks is empty");
    anyhow::ensure!(!s.predictive_uts.is_empty(), "--predictive-uts is empty");
    let mut configs: Vec<(PolicyKind, String, SimConfig)> = vec![
        (
            PolicyKind::Threshold,
            format!("ut={} lt={}", base.ut, base.lt),
            base.clone(),
        ),
        (
            PolicyKind::Ar,
            format!("ut={} lt={}", base.ut, base.lt),
            base.clone(),
        ),
    ];
    for &t in &s.hpa_targets {
        configs.push((
            PolicyKind::Hpa,
            format!("target={t}"),
            SimConfig {
                hpa_target: t,
                ..base.clone()
            },
        ));
    }
    for &u in &s.predictive_uts {
        for &k in &s.ks {
            configs.push((
                PolicyKind::Predictive,
                format!("ut={u} k={k}"),
                SimConfig {
                    k,
                    predictive_ut: Some(u),
                    ..base.clone()
                },
            ));
        }
    }
    let seeds: Vec<u64> = (s.seeds.0..=s.seeds.1).collect();
    // Each workload is built once per seed and shared by every setting.
    let workloads = seeds
        .iter()
        .map(|&seed| spec.build(step, seed))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let name = workloads
        .first()
        .map(|w| w.name.clone())
        .unwrap_or_default();
    let jobs: Vec<(usize, usize)> = (0..configs.len())
        .flat_map(|c| (0..seeds.len()).map(move |i| (c, i)))
        .collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let results: std::sync::Mutex<Vec<Option<anyhow::Result<Summary>>>> =
        std::sync::Mutex::new((0..jobs.len()).map(|_| None).collect());
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let j = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&(c, i)) = jobs.get(j) else { break };
                    let (kind, setting, cfg) = &configs[c];
                    let cfg = SimConfig {
                        seed: seeds[i],
                        ..cfg.clone()
                    };
                    let r = simulate(&workloads[i], *kind, &cfg)
                        .with_context(|| format!("{} {setting}, seed {}", kind.name(), seeds[i]));
                    if let Ok(mut v) = results.lock() {
                        v[j] = Some(r.map(|r| r.summary));
                    }
                }
            });
        }
    });
    let mut results = results
        .into_inner()
        .map_err(|_| anyhow::anyhow!("a simulation thread panicked"))?;
    let mut points = Vec::new();
    for (c, (kind, setting, _)) in configs.iter().enumerate() {
        let mut sums = (0.0, 0.0, 0.0);
        for (j, &(jc, _)) in jobs.iter().enumerate() {
            if jc != c {
                continue;
            }
            let s = results[j].take().context("a simulation did not run")??;
            sums.0 += s.violation_seconds;
            sums.1 += s.node_seconds;
            sums.2 += f64::from(s.reallocations);
        }
        let n = seeds.len() as f64;
        points.push(Point {
            policy: *kind,
            setting: setting.clone(),
            violation_seconds: sums.0 / n,
            node_seconds: sums.1 / n,
            reallocations: sums.2 / n,
        });
    }
    let against = compare(&points);
    Ok(Frontier {
        workload: name,
        seeds: s.seeds,
        hpa_dominated: against
            .iter()
            .filter(|a| a.verdict == Verdict::PredictiveDominates)
            .count(),
        hpa_dominating: against
            .iter()
            .filter(|a| a.verdict == Verdict::HpaDominates)
            .count(),
        hpa_points: against.len(),
        hpa_against_predictive: against,
        points,
    })
}

/// For every HPA point, the cheapest predictive point that violates no
/// more.
pub fn compare(points: &[Point]) -> Vec<Against> {
    let pred: Vec<&Point> = points
        .iter()
        .filter(|p| p.policy == PolicyKind::Predictive)
        .collect();
    points
        .iter()
        .filter(|p| p.policy == PolicyKind::Hpa)
        .map(|h| {
            let best = pred
                .iter()
                .filter(|p| p.violation_seconds <= h.violation_seconds + 1e-9)
                .min_by(|a, b| a.node_seconds.total_cmp(&b.node_seconds));
            let verdict = if best.is_some_and(|p| p.node_seconds <= h.node_seconds) {
                Verdict::PredictiveDominates
            } else if pred.iter().any(|p| {
                p.violation_seconds >= h.violation_seconds - 1e-9
                    && p.node_seconds >= h.node_seconds
            }) {
                Verdict::HpaDominates
            } else {
                Verdict::Neither
            };
            Against {
                hpa_setting: h.setting.clone(),
                hpa_violation_seconds: h.violation_seconds,
                hpa_node_seconds: h.node_seconds,
                predictive_setting: best.map(|p| p.setting.clone()),
                predictive_violation_seconds: best.map(|p| p.violation_seconds),
                predictive_node_seconds: best.map(|p| p.node_seconds),
                node_seconds_saved: best.map(|p| 1.0 - p.node_seconds / h.node_seconds),
                verdict,
            }
        })
        .collect()
}

/// The sweep as a table.
pub fn table(f: &Frontier) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "frontier on {}, means over seeds {}..{}",
        f.workload, f.seeds.0, f.seeds.1
    );
    let _ = writeln!(
        s,
        "{:<11} {:<15} {:>12} {:>10} {:>13}",
        "policy", "setting", "violation s", "node-s", "reallocations"
    );
    for p in &f.points {
        let _ = writeln!(
            s,
            "{:<11} {:<15} {:>12.1} {:>10.0} {:>13.1}",
            p.policy.name(),
            p.setting,
            p.violation_seconds,
            p.node_seconds,
            p.reallocations
        );
    }
    let _ = writeln!(
        s,
        "HPA against predictive (the cheapest predictive setting with no more violation-seconds):"
    );
    for a in &f.hpa_against_predictive {
        match (&a.predictive_setting, a.node_seconds_saved) {
            (Some(ps), Some(saved)) => {
                let _ = writeln!(
                    s,
                    "  hpa {:<11} {:>7.1} violation s {:>8.0} node-s | predictive {:<13} {:>7.1} violation s {:>8.0} node-s | {:+.1} % node-s | {}",
                    a.hpa_setting,
                    a.hpa_violation_seconds,
                    a.hpa_node_seconds,
                    ps,
                    a.predictive_violation_seconds.unwrap_or(0.0),
                    a.predictive_node_seconds.unwrap_or(0.0),
                    -100.0 * saved,
                    verdict_text(a.verdict)
                );
            }
            _ => {
                let _ = writeln!(
                    s,
                    "  hpa {:<11} {:>7.1} violation s {:>8.0} node-s | no predictive setting violates that little | {}",
                    a.hpa_setting,
                    a.hpa_violation_seconds,
                    a.hpa_node_seconds,
                    verdict_text(a.verdict)
                );
            }
        }
    }
    let _ = writeln!(
        s,
        "predictive dominates {} of {} HPA settings; {} HPA settings dominate a predictive one",
        f.hpa_dominated, f.hpa_points, f.hpa_dominating
    );
    s
}

fn verdict_text(v: Verdict) -> &'static str {
    match v {
        Verdict::PredictiveDominates => "predictive dominates",
        Verdict::HpaDominates => "HPA dominates a predictive setting",
        Verdict::Neither => "neither dominates",
    }
}

/// Writes frontier-NAME.json, .svg and .png into `dir`.
pub fn write(dir: &Path, f: &Frontier) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create output directory {}", dir.display()))?;
    let base = dir.join(format!("frontier-{}", f.workload));
    let json = base.with_extension("json");
    std::fs::write(&json, serde_json::to_string_pretty(f)?)
        .with_context(|| format!("cannot write {}", json.display()))?;
    for ext in ["svg", "png"] {
        plot(&base.with_extension(ext), f)?;
    }
    Ok(())
}

/// The points no other point beats on both counts, by violation-seconds.
fn pareto(xy: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut v = xy.to_vec();
    v.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
    let mut out: Vec<(f64, f64)> = Vec::new();
    for p in v {
        if out.last().is_none_or(|l| p.1 < l.1) {
            out.push(p);
        }
    }
    out
}

fn plot(path: &Path, f: &Frontier) -> anyhow::Result<()> {
    anyhow::ensure!(font_ready(), "the embedded plot font could not be loaded");
    let size = (900, 600);
    if path.extension().is_some_and(|e| e == "svg") {
        let root = SVGBackend::new(path, size).into_drawing_area();
        draw(&root, f)?;
        root.present()
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
    } else {
        let root = BitMapBackend::new(path, size).into_drawing_area();
        draw(&root, f)?;
        root.present()
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
    }
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    f: &Frontier,
) -> anyhow::Result<()> {
    root.fill(&WHITE).map_err(err)?;
    let x_max = f
        .points
        .iter()
        .map(|p| p.violation_seconds)
        .fold(1.0, f64::max)
        * 1.1;
    let y_max = f.points.iter().map(|p| p.node_seconds).fold(1.0, f64::max) * 1.1;
    let y_min = f
        .points
        .iter()
        .map(|p| p.node_seconds)
        .fold(f64::MAX, f64::min)
        * 0.9;
    let mut chart = ChartBuilder::on(root)
        .caption(
            format!(
                "{}: violation-seconds against node-seconds (means of seeds {}..{})",
                f.workload, f.seeds.0, f.seeds.1
            ),
            ("sans-serif", 17),
        )
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max, y_min..y_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("SLA violation (s)")
        .y_desc("nodes held (node-s)")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(err)?;
    for kind in PolicyKind::ALL {
        let pts: Vec<&Point> = f.points.iter().filter(|p| p.policy == kind).collect();
        if pts.is_empty() {
            continue;
        }
        let c = colour(kind);
        let xy: Vec<(f64, f64)> = pts
            .iter()
            .map(|p| (p.violation_seconds, p.node_seconds))
            .collect();
        // HPA's line is its sweep; the predictive policy's, the Pareto
        // front of all its settings (the cheapest for each violation level).
        let line = if kind == PolicyKind::Predictive {
            pareto(&xy)
        } else {
            xy.clone()
        };
        chart
            .draw_series(LineSeries::new(line, c.stroke_width(1)))
            .map_err(err)?;
        chart
            .draw_series(std::iter::once(Circle::new(xy[0], 4, c.filled())))
            .map_err(err)?
            .label(kind.name())
            .legend(move |(x, y)| Circle::new((x + 10, y), 4, c.filled()));
        chart
            .draw_series(xy.iter().map(|&p| Circle::new(p, 4, c.filled())))
            .map_err(err)?;
        chart
            .draw_series(pts.iter().map(|p| {
                Text::new(
                    p.setting.clone(),
                    (p.violation_seconds, p.node_seconds),
                    ("sans-serif", 11),
                )
            }))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(policy: PolicyKind, setting: &str, v: f64, n: f64) -> Point {
        Point {
            policy,
            setting: setting.into(),
            violation_seconds: v,
            node_seconds: n,
            reallocations: 0.0,
        }
    }

    #[test]
    fn each_hpa_point_meets_the_cheapest_predictive_point_that_violates_no_more() {
        let pts = [
            p(PolicyKind::Hpa, "target=0.5", 10.0, 1000.0),
            p(PolicyKind::Hpa, "target=0.9", 100.0, 600.0),
            p(PolicyKind::Hpa, "target=0.4", 0.0, 1500.0),
            p(PolicyKind::Predictive, "k=3", 5.0, 900.0),
            p(PolicyKind::Predictive, "k=1", 50.0, 500.0),
            p(PolicyKind::Hpa, "target=0.95", 60.0, 450.0),
            p(PolicyKind::Predictive, "k=0", 200.0, 480.0),
            p(PolicyKind::Threshold, "x", 0.0, 1.0),
        ];
        let a = compare(&pts);
        assert_eq!(a.len(), 4);
        assert_eq!(a[0].predictive_setting.as_deref(), Some("k=3"));
        assert!((a[0].node_seconds_saved.unwrap() - 0.1).abs() < 1e-12);
        assert_eq!(a[0].verdict, Verdict::PredictiveDominates);
        assert_eq!(a[1].predictive_setting.as_deref(), Some("k=1"));
        assert_eq!(a[1].verdict, Verdict::PredictiveDominates);
        // No predictive point reaches zero violations: said, not hidden;
        // k=3 violates more and holds fewer nodes: neither dominates.
        assert_eq!(a[2].predictive_setting, None);
        assert_eq!(a[2].node_seconds_saved, None);
        assert_eq!(a[2].verdict, Verdict::Neither);
        // target=0.95 beats k=0 on both counts; k=1 violates less but
        // needs more nodes.
        assert_eq!(a[3].predictive_setting.as_deref(), Some("k=1"));
        assert!(a[3].node_seconds_saved.unwrap() < 0.0);
        assert_eq!(a[3].verdict, Verdict::HpaDominates);
    }
}
