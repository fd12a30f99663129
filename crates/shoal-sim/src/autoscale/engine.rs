//! `shoal sim autoscale`'s engine: a front end over the whole-cluster
//! simulator ([`crate::cluster`]). One service on a pool with room to
//! spare, no faults, lead times fixed at `--lead-time`: every decision
//! (the monitor's sum, the forecast, the policy, starts, drains and
//! releases) is the manager's own [`shoal_core::control::Controller`], so
//! these figures are those of the loop that runs live, not of a model of
//! it.

use serde::Serialize;
use shoal_core::control::model::PolicyKind as ServicePolicy;
use shoal_core::policy::{HpaConfig, PredictiveConfig, Threshold};

use super::workload::Workload;
use crate::cluster::{ClusterConfig, Faults, simulate_workload};

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

    /// The service policy this stands for.
    pub fn service_policy(self) -> ServicePolicy {
        match self {
            Self::Threshold => ServicePolicy::Threshold,
            Self::Ar => ServicePolicy::Ar,
            Self::Hpa => ServicePolicy::Hpa,
            Self::Predictive => ServicePolicy::Predictive,
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
    /// The predictive policy's provisioning threshold, when it is not `ut`
    /// (violations are measured against `ut` all the same).
    pub predictive_ut: Option<f64>,
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
            predictive_ut: None,
            node_noise: 0.05,
            common_noise: 0.03,
            seed: 1,
        }
    }
}

/// One step of one policy's run: the cluster simulator's own record.
pub use crate::cluster::Step as StepRecord;

/// What a run cost and how well it served.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    /// Seconds in which demand exceeded ut x serving capacity.
    pub violation_seconds: f64,
    /// Integral of held nodes (starting, serving or draining) over time.
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

/// How long the cluster runs before the workload starts: the first nodes
/// start (one lead time), and the forecasters fill their 40 s of history.
fn warmup(cfg: &SimConfig) -> f64 {
    cfg.lead_time + 60.0
}

/// Runs `kind` over `w`: one service through the cluster simulator.
pub fn simulate(w: &Workload, kind: PolicyKind, cfg: &SimConfig) -> anyhow::Result<Run> {
    anyhow::ensure!(
        cfg.min_nodes <= cfg.max_nodes,
        "--min-nodes {} is above --max-nodes {}",
        cfg.min_nodes,
        cfg.max_nodes
    );
    anyhow::ensure!(cfg.max_nodes >= 1, "--max-nodes must be at least 1");
    anyhow::ensure!(
        cfg.capacity.is_finite() && cfg.capacity > 0.0,
        "--capacity must be positive"
    );
    anyhow::ensure!(
        cfg.lead_time.is_finite() && cfg.lead_time >= 0.0,
        "--lead-time must be non-negative"
    );
    anyhow::ensure!(
        w.step.is_finite() && w.step >= 0.1,
        "--step must be at least 100ms"
    );
    // Twice the ceiling: released nodes drain while their replacements
    // start, and the pool never limits the policy.
    let mut c = ClusterConfig::new(cfg.max_nodes * 2 + 2, 1);
    c.duration_s = w.demand.len() as f64 * w.step;
    c.warmup_s = warmup(cfg);
    c.faults = Faults::none();
    c.seed = cfg.seed;
    c.policy = kind.service_policy();
    c.lead_s = cfg.lead_time;
    c.lead_spread = 0.0;
    c.capacity = cfg.capacity;
    c.period_s = w.step;
    c.ut = cfg.ut;
    c.lt = cfg.lt;
    c.hpa_target = cfg.hpa_target;
    c.policy_ut = cfg.predictive_ut.filter(|_| kind == PolicyKind::Predictive);
    c.k = cfg.k;
    c.min_nodes = cfg.min_nodes;
    c.max_nodes = cfg.max_nodes;
    c.node_noise = cfg.node_noise;
    c.common_noise = cfg.common_noise;
    c.record_steps = true;
    let r = simulate_workload(&c, w)?;
    if let Some(v) = r.invariant_violations.first() {
        anyhow::bail!(
            "the controller broke an invariant at {:.1} s (step {}, seed {}): {}",
            v.time_s,
            v.step,
            v.seed,
            v.what
        );
    }
    let steps: Vec<StepRecord> = r.steps;
    let summary = Summary {
        violation_seconds: r.violation_seconds,
        node_seconds: r.node_seconds,
        reallocations: r.reallocations as u32,
        adds: r.adds as u32,
        releases: r.releases as u32,
        peak_nodes: steps
            .iter()
            .map(|s| s.held)
            .max()
            .unwrap_or(0)
            .max(r.peak_nodes),
    };
    Ok(Run {
        policy: kind,
        forecaster: r.forecaster,
        summary,
        steps,
    })
}
