//! The discrete-time autoscale simulation: a virtual clock stepping every
//! sampling period, a monitor that sums noisy per-node load samples, and
//! shoal-core's forecasters and policies deciding on them, exactly as the
//! manager's reallocation engine does live.

use serde::Serialize;
use shoal_core::forecast::{Ar, ArConfig, Forecaster, Seasonal, SeasonalConfig};
use shoal_core::policy::{
    Action, Hpa, HpaConfig, Observation, Policy, Predictive, PredictiveConfig, Threshold,
    choose_victim,
};

use super::workload::{Rng, Workload};

/// The policies the simulator can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyKind {
    /// LAMA Algorithm 1 on the observed sum.
    Threshold,
    /// LAMA Algorithm 1 on the AR(1) forecast of the sum, 20 s ahead.
    Ar,
    /// Kubernetes HPA rule.
    Hpa,
    /// shoal's lead-time and uncertainty aware policy.
    Predictive,
}

impl PolicyKind {
    /// All policies, in report order.
    pub const ALL: [PolicyKind; 4] = [Self::Threshold, Self::Ar, Self::Hpa, Self::Predictive];

    /// The name used in reports and JSON keys.
    pub fn name(self) -> &'static str {
        match self {
            Self::Threshold => "threshold",
            Self::Ar => "ar",
            Self::Hpa => "hpa",
            Self::Predictive => "predictive",
        }
    }
}

/// Simulation parameters.
#[derive(Debug, Clone, Serialize)]
pub struct SimConfig {
    /// Node capacity C.
    pub capacity: f64,
    /// Seconds from allocating a node to it serving.
    pub lead_time: f64,
    /// Floor of the allocation (also the initial allocation).
    pub min_nodes: u32,
    /// Ceiling of the allocation.
    pub max_nodes: u32,
    /// Upper threshold (SLA: demand must stay under ut of serving capacity).
    pub ut: f64,
    /// Lower threshold.
    pub lt: f64,
    /// HPA target utilization.
    pub hpa_target: f64,
    /// Predictive policy's k (standard deviations provisioned for).
    pub k: f64,
    /// Per-node measurement noise, as a fraction of the node's load (sd).
    pub node_noise: f64,
    /// Noise common to all nodes (bitrate and ACK fluctuation), fraction (sd).
    pub common_noise: f64,
    /// Seed of the measurement noise.
    pub seed: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            capacity: 100.0,
            lead_time: 20.0,
            min_nodes: 1,
            max_nodes: 20,
            ut: Threshold::UT,
            lt: Threshold::LT,
            hpa_target: HpaConfig::default().target,
            k: PredictiveConfig::default().k,
            node_noise: 0.05,
            common_noise: 0.03,
            seed: 1,
        }
    }
}

/// One step of one policy's run.
#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    /// Virtual time, seconds.
    pub time: f64,
    /// True demand.
    pub demand: f64,
    /// Summed load reported by the monitor.
    pub observed: f64,
    /// Forecast mean the policy decided on, if any.
    pub forecast: Option<f64>,
    /// Nodes allocated after the decision.
    pub allocated: u32,
    /// Nodes serving during this step.
    pub ready: u32,
    /// Whether demand exceeded ut x serving capacity.
    pub violated: bool,
    /// The decision's reason when it changed the allocation.
    pub reason: Option<String>,
}

/// What a run cost and how well it served.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    /// Seconds in which demand exceeded ut x serving capacity.
    pub violation_seconds: f64,
    /// Integral of allocated nodes (serving or starting) over time.
    pub node_seconds: f64,
    /// Nodes added plus nodes released.
    pub reallocations: u32,
    /// Nodes added.
    pub adds: u32,
    /// Nodes released.
    pub releases: u32,
    /// Most nodes allocated at once.
    pub peak_nodes: u32,
}

/// A finished run.
#[derive(Debug, Clone)]
pub struct Run {
    /// The policy.
    pub policy: PolicyKind,
    /// Name of the forecaster the policy used, if any.
    pub forecaster: Option<String>,
    /// Totals.
    pub summary: Summary,
    /// Per-step trace.
    pub steps: Vec<StepRecord>,
}

fn samples_for(secs: f64, step: f64) -> usize {
    (secs / step).round().max(1.0) as usize
}

/// A policy and the forecaster feeding it, if it uses one.
type Brain = (Box<dyn Policy>, Option<Box<dyn Forecaster>>);

/// The policy and forecaster a kind stands for, configured for `w`.
fn build(kind: PolicyKind, w: &Workload, cfg: &SimConfig) -> anyhow::Result<Brain> {
    // LAMA's AR(1): 40 s of history.
    let lama_ar = ArConfig {
        order: 1,
        window: samples_for(40.0, w.step).max(ArConfig::default().min_window()),
        period: w.step,
        trend: false,
    };
    Ok(match kind {
        PolicyKind::Threshold => (Box::new(Threshold::new(cfg.ut, cfg.lt)?), None),
        PolicyKind::Ar => (
            Box::new(Threshold::new(cfg.ut, cfg.lt)?.on_forecast(Threshold::AR_HORIZON)?),
            Some(Box::new(Ar::new(lama_ar)?)),
        ),
        PolicyKind::Hpa => (
            Box::new(Hpa::new(HpaConfig {
                target: cfg.hpa_target,
                ..HpaConfig::default()
            })?),
            None,
        ),
        PolicyKind::Predictive => {
            let policy = Predictive::new(PredictiveConfig {
                ut: cfg.ut,
                lt: cfg.lt,
                k: cfg.k,
                lead_time: cfg.lead_time,
                horizon_margin: w.step,
                release_hold: None,
            })?;
            // Same 40 s history as LAMA, with a trend so ramps are followed.
            let trend_ar = ArConfig {
                trend: true,
                ..lama_ar
            };
            let fc: Box<dyn Forecaster> = match w.season {
                Some(season) => Box::new(Seasonal::new(SeasonalConfig {
                    season,
                    residual: trend_ar,
                    ..SeasonalConfig::default()
                })?),
                None => Box::new(Ar::new(trend_ar)?),
            };
            (Box::new(policy), Some(fc))
        }
    })
}

/// Common-mode noise of the monitor, a function of the step only, so every
/// policy sees the same noise on the same demand.
fn common_noise(w: &Workload, cfg: &SimConfig) -> Vec<f64> {
    let mut rng = Rng::new(cfg.seed, 0xc0);
    let phi: f64 = 0.7;
    let innov = cfg.common_noise * (1.0 - phi * phi).sqrt();
    let mut x = 0.0;
    w.demand
        .iter()
        .map(|_| {
            x = phi * x + innov * rng.normal();
            x
        })
        .collect()
}

/// Runs `kind` over `w`.
pub fn simulate(w: &Workload, kind: PolicyKind, cfg: &SimConfig) -> anyhow::Result<Run> {
    anyhow::ensure!(
        cfg.min_nodes <= cfg.max_nodes,
        "--min-nodes {} is above --max-nodes {}",
        cfg.min_nodes,
        cfg.max_nodes
    );
    anyhow::ensure!(
        cfg.capacity.is_finite() && cfg.capacity > 0.0,
        "--capacity must be positive"
    );
    anyhow::ensure!(
        cfg.lead_time.is_finite() && cfg.lead_time >= 0.0,
        "--lead-time must be non-negative"
    );
    anyhow::ensure!(
        w.step.is_finite() && w.step > 0.0,
        "--step must be positive"
    );
    let (mut policy, mut forecaster) = build(kind, w, cfg)?;
    let horizon = policy.forecast_horizon();
    let common = common_noise(w, cfg);
    let c = cfg.capacity;
    // Each node is the time it starts serving.
    let mut nodes: Vec<f64> = vec![f64::NEG_INFINITY; cfg.min_nodes as usize];
    let mut s = Summary {
        violation_seconds: 0.0,
        node_seconds: 0.0,
        reallocations: 0,
        adds: 0,
        releases: 0,
        peak_nodes: cfg.min_nodes,
    };
    let mut steps = Vec::with_capacity(w.demand.len());
    for (i, &demand) in w.demand.iter().enumerate() {
        let t = i as f64 * w.step;
        let ready = nodes.iter().filter(|&&r| r <= t + 1e-9).count() as u32;
        let violated = demand > cfg.ut * f64::from(ready) * c + 1e-9;
        if violated {
            s.violation_seconds += w.step;
        }
        // The dispatcher spreads the load over serving nodes; a node cannot
        // carry more than C. Each monitor sample is noisy.
        let per_node = if ready > 0 {
            (demand / f64::from(ready)).min(c)
        } else {
            0.0
        };
        let mut rng = Rng::new(cfg.seed, 1 + i as u64);
        let samples: Vec<f64> = nodes
            .iter()
            .map(|&r| {
                let z = rng.normal();
                if r <= t + 1e-9 {
                    (per_node * (1.0 + common[i] + cfg.node_noise * z)).clamp(0.0, c)
                } else {
                    0.0
                }
            })
            .collect();
        let usage = Observation::sum_usage(samples.iter().copied());
        let forecast = match (&mut forecaster, horizon) {
            (Some(f), Some(h)) => {
                f.observe(t, usage);
                f.forecast(h)
            }
            _ => None,
        };
        let obs = Observation {
            time: t,
            usage,
            allocated: nodes.len() as u32,
            ready,
            capacity: c,
            min_nodes: cfg.min_nodes,
            max_nodes: cfg.max_nodes,
            lead_time: cfg.lead_time,
            forecast,
        };
        let decision = policy.decide(&obs)?;
        let mut samples = samples;
        match decision.action {
            Action::Hold => {}
            Action::Add(k) => {
                for _ in 0..k {
                    nodes.push(t + cfg.lead_time);
                    samples.push(0.0);
                }
                s.adds += k;
            }
            Action::Release(k) => {
                for _ in 0..k {
                    let victim = choose_victim(samples.iter().copied().enumerate());
                    if let Some(v) = victim {
                        nodes.remove(v);
                        samples.remove(v);
                        s.releases += 1;
                    }
                }
            }
        }
        let allocated = nodes.len() as u32;
        s.peak_nodes = s.peak_nodes.max(allocated);
        s.node_seconds += f64::from(allocated) * w.step;
        steps.push(StepRecord {
            time: t,
            demand,
            observed: usage,
            forecast: forecast.map(|f| f.mean),
            allocated,
            ready,
            violated,
            reason: (decision.action != Action::Hold).then_some(decision.reason),
        });
    }
    s.reallocations = s.adds + s.releases;
    Ok(Run {
        policy: kind,
        forecaster: forecaster.map(|f| f.name()),
        summary: s,
        steps,
    })
}
