//! `shoal sim autoscale`: allocation policies over demand workloads, run by
//! the manager's own controller through the cluster simulator
//! ([`crate::cluster`]) on a virtual clock.

pub mod engine;
pub mod frontier;
pub mod plot;
pub mod workload;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;

pub use engine::{PolicyKind, Run, SimConfig, StepRecord, Summary, simulate};
pub use workload::{Workload, WorkloadSpec};

/// Which policies to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PolicyChoice {
    /// LAMA Algorithm 1 on the observed sum (ut 0.9, lt 0.8).
    Threshold,
    /// LAMA Algorithm 1 on the AR(1) forecast (40 s history, 20 s ahead).
    Ar,
    /// Kubernetes HPA rule (target --hpa-target, tolerance 0.1, 300 s
    /// scale-down stabilization, 15 s sync).
    Hpa,
    /// shoal's predictive policy (forecast at lead time, mean + k sigma).
    Predictive,
    /// All four, side by side.
    All,
}

impl PolicyChoice {
    fn kinds(self) -> Vec<PolicyKind> {
        match self {
            Self::Threshold => vec![PolicyKind::Threshold],
            Self::Ar => vec![PolicyKind::Ar],
            Self::Hpa => vec![PolicyKind::Hpa],
            Self::Predictive => vec![PolicyKind::Predictive],
            Self::All => PolicyKind::ALL.to_vec(),
        }
    }
}

const AFTER_HELP: &str = "\
Workloads:
  lama-audio  LAMA section 5: icecast listeners arriving at 300/min up to 3,000
              streams of 132 kbit/s (396 Mbit/s, nodes of 100 Mbit/s), the peak
              held 3 min, then leaving at 300/min; noisy 2 s monitor samples.
  diurnal     three days of web traffic, each compressed into an hour, with a
              time-of-day profile, day-to-day drift and flash crowds.
  flash-crowd two hours of a quiet service (~150 Mbit/s) hit by about four
              crowds of 4-8 times its size, arriving within 20 s.
  noisy-wave  two hours of a 20-minute wave (200..800 Mbit/s) under 15 %
              correlated noise.
  csv:PATH    `time,demand` lines (seconds, load in units of --capacity); an
              optional header line; resampled onto --step.

The run is the manager's controller driven by `shoal sim cluster`: one
service, a pool of twice --max-nodes, no faults, virtual agents renewing every
2 s that start the app --lead-time after they learn of it, and a virtual
dispatcher reporting each backend's load every second. A warm-up of one lead
time + 60 s at the workload's first value comes before measurement.

Measured: violation_seconds = seconds in which demand exceeded ut x the capacity
of the backends really serving; node_seconds = integral of nodes held
(starting, serving or draining); reallocations = nodes added + nodes released
(a release counts when its drain starts).

--json prints, for one policy:
  {\"violation_seconds\": F, \"node_seconds\": F, \"reallocations\": N,
   \"adds\": N, \"releases\": N, \"peak_nodes\": N}
and for --policy all an object keyed by policy:
  {\"threshold\": {...}, \"ar\": {...}, \"hpa\": {...}, \"predictive\": {...}}

--out DIR writes autoscale-NAME.csv (one row per step, columns per policy),
autoscale-NAME.png and .svg (demand, observed load, forecasts, and nodes per
policy, in the manner of LAMA Fig. 8) and autoscale-NAME.json (the summary).

--frontier sweeps instead: threshold and AR, HPA at every --hpa-targets, the
predictive policy at every --predictive-uts x --ks, each the mean of --seeds;
for every HPA target, the cheapest predictive setting that violates no more,
and which dominates. --json prints the sweep; --out writes frontier-NAME.json,
.svg and .png.

Examples:
  shoal sim autoscale --workload lama-audio --policy all --out /tmp/sim
  shoal sim autoscale --workload noisy-wave --frontier --out /tmp/sim
  shoal sim autoscale --workload diurnal --policy predictive --json
  shoal sim autoscale --workload csv:trace.csv --capacity 100 --lead-time 60";

/// Arguments of `shoal sim autoscale`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct AutoscaleArgs {
    /// lama-audio, diurnal, flash-crowd, noisy-wave, or csv:PATH.
    #[arg(long, default_value = "lama-audio")]
    pub workload: WorkloadSpec,
    /// Policy to run.
    #[arg(long, value_enum, default_value = "all")]
    pub policy: PolicyChoice,
    /// Print the summary as JSON (shape below).
    #[arg(long)]
    pub json: bool,
    /// Write the per-step CSV, PNG and SVG plots and JSON summary here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Seed of the workload's randomness and of the measurement noise.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Sampling period p, workload time (LAMA: 2s).
    #[arg(long, default_value = "2s", value_parser = shoal_core::duration::parse_positive_secs)]
    pub step: f64,
    /// From allocating a node to it serving, workload time (e.g. 20s, 1m).
    #[arg(long, default_value = "20s", value_parser = shoal_core::duration::parse_secs)]
    pub lead_time: f64,
    /// Capacity C of one node (LAMA: 100 Mbit/s).
    #[arg(long, default_value_t = 100.0)]
    pub capacity: f64,
    /// Fewest nodes (also the initial allocation).
    #[arg(long, default_value_t = 1)]
    pub min_nodes: u32,
    /// Most nodes.
    #[arg(long, default_value_t = 20)]
    pub max_nodes: u32,
    /// HPA target utilization.
    #[arg(long, default_value_t = 0.8)]
    pub hpa_target: f64,
    /// Predictive policy: provision for forecast mean + k standard deviations.
    #[arg(long, default_value_t = 2.0)]
    pub k: f64,
    /// Per-node monitor noise (sd as a fraction of the node's load).
    #[arg(long, default_value_t = 0.05)]
    pub noise: f64,
    /// Sweep instead: threshold and AR, HPA at every --hpa-targets, the
    /// predictive policy at every --ks, each the mean of --seeds.
    #[arg(long)]
    pub frontier: bool,
    /// HPA targets the frontier sweeps.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0.5,0.6,0.7,0.8,0.9",
        requires = "frontier"
    )]
    pub hpa_targets: Vec<f64>,
    /// Predictive k values the frontier sweeps.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0,1,2,3",
        requires = "frontier"
    )]
    pub ks: Vec<f64>,
    /// Predictive provisioning thresholds the frontier sweeps (its
    /// `sla.upper`; violations are still measured at ut = 0.9).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0.7,0.8,0.9,1",
        requires = "frontier"
    )]
    pub predictive_uts: Vec<f64>,
    /// Seeds the frontier averages (A..B, inclusive).
    #[arg(long, default_value = "1..5", value_parser = crate::cluster::seeds_arg, requires = "frontier")]
    pub seeds: (u64, u64),
}

impl AutoscaleArgs {
    /// The simulation configuration these arguments describe.
    pub fn config(&self) -> SimConfig {
        SimConfig {
            capacity: self.capacity,
            lead_time: self.lead_time,
            min_nodes: self.min_nodes,
            max_nodes: self.max_nodes,
            hpa_target: self.hpa_target,
            k: self.k,
            node_noise: self.noise,
            seed: self.seed,
            ..SimConfig::default()
        }
    }
}

/// Runs `policies` over `spec` with `cfg`.
pub fn run_all(
    spec: &WorkloadSpec,
    step: f64,
    policies: &[PolicyKind],
    cfg: &SimConfig,
) -> anyhow::Result<(Workload, Vec<Run>)> {
    anyhow::ensure!(
        step.is_finite() && step > 0.0,
        "--step must be a positive number of seconds, got {step}"
    );
    let w = spec.build(step, cfg.seed)?;
    let runs = policies
        .iter()
        .map(|&k| simulate(&w, k, cfg).with_context(|| format!("policy {}", k.name())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((w, runs))
}

/// The JSON summary: one object, or one per policy for several.
pub fn summary_json(runs: &[Run], several: bool) -> serde_json::Value {
    if several {
        let map: BTreeMap<&str, &Summary> =
            runs.iter().map(|r| (r.policy.name(), &r.summary)).collect();
        serde_json::to_value(map).unwrap_or_default()
    } else {
        runs.first()
            .map(|r| serde_json::to_value(r.summary).unwrap_or_default())
            .unwrap_or_default()
    }
}

/// Runs the simulation.
pub fn run(args: &AutoscaleArgs) -> anyhow::Result<()> {
    if args.frontier {
        let f = frontier::sweep(
            &args.workload,
            args.step,
            &args.config(),
            &frontier::Sweep {
                hpa_targets: args.hpa_targets.clone(),
                ks: args.ks.clone(),
                predictive_uts: args.predictive_uts.clone(),
                seeds: args.seeds,
            },
        )?;
        if let Some(dir) = &args.out {
            frontier::write(dir, &f)?;
        }
        let mut out = std::io::stdout().lock();
        if args.json {
            writeln!(out, "{}", serde_json::to_string_pretty(&f)?)?;
        } else {
            write!(out, "{}", frontier::table(&f))?;
        }
        return Ok(());
    }
    let kinds = args.policy.kinds();
    let cfg = args.config();
    let (w, runs) = run_all(&args.workload, args.step, &kinds, &cfg)?;
    if let Some(dir) = &args.out {
        write_outputs(dir, &w, &runs, &cfg, args.policy == PolicyChoice::All)?;
    }
    let json = summary_json(&runs, args.policy == PolicyChoice::All);
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&json)?)?;
    } else {
        writeln!(
            out,
            "workload {} ({} steps of {} s, peak demand {:.1}), lead time {} s, C = {}, seed {}",
            w.name,
            w.demand.len(),
            w.step,
            w.demand.iter().copied().fold(0.0, f64::max),
            cfg.lead_time,
            cfg.capacity,
            cfg.seed
        )?;
        writeln!(
            out,
            "{:<11} {:>14} {:>13} {:>13} {:>5} {:>8} {:>5}  forecaster",
            "policy", "violation s", "node-s", "reallocations", "adds", "releases", "peak"
        )?;
        for r in &runs {
            let s = &r.summary;
            writeln!(
                out,
                "{:<11} {:>14.0} {:>13.0} {:>13} {:>5} {:>8} {:>5}  {}",
                r.policy.name(),
                s.violation_seconds,
                s.node_seconds,
                s.reallocations,
                s.adds,
                s.releases,
                s.peak_nodes,
                r.forecaster.as_deref().unwrap_or("-")
            )?;
        }
        if let Some(dir) = &args.out {
            writeln!(
                out,
                "wrote {}",
                dir.join(format!("autoscale-{}.*", w.name)).display()
            )?;
        }
    }
    Ok(())
}

/// Writes the per-step CSV, the plots and the JSON summary into `dir`.
pub fn write_outputs(
    dir: &Path,
    w: &Workload,
    runs: &[Run],
    cfg: &SimConfig,
    several: bool,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create output directory {}", dir.display()))?;
    let base = dir.join(format!("autoscale-{}", w.name));
    let csv_path = base.with_extension("csv");
    std::fs::write(&csv_path, per_step_csv(w, runs))
        .with_context(|| format!("cannot write {}", csv_path.display()))?;
    let json_path = base.with_extension("json");
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&summary_json(runs, several))?,
    )
    .with_context(|| format!("cannot write {}", json_path.display()))?;
    plot::plot(&base.with_extension("png"), w, runs, cfg)?;
    plot::plot(&base.with_extension("svg"), w, runs, cfg)?;
    Ok(())
}

/// One row per step: time and demand, then per policy the observed sum,
/// the forecast it decided on, and allocated and serving nodes.
pub fn per_step_csv(w: &Workload, runs: &[Run]) -> String {
    let mut s = String::from("time,demand");
    for r in runs {
        let p = r.policy.name();
        s.push_str(&format!(
            ",{p}_observed,{p}_forecast,{p}_allocated,{p}_ready,{p}_violated"
        ));
    }
    s.push('\n');
    for (i, d) in w.demand.iter().enumerate() {
        s.push_str(&format!("{},{d:.3}", i as f64 * w.step));
        for r in runs {
            let st = &r.steps[i];
            let f = st.forecast.map(|v| format!("{v:.3}")).unwrap_or_default();
            s.push_str(&format!(
                ",{:.3},{f},{},{},{}",
                st.observed,
                st.allocated,
                st.ready,
                u8::from(st.violated)
            ));
        }
        s.push('\n');
    }
    s
}
