//! The monitor (LAMA Fig. 6): per service, the summed load L(t) of its
//! nodes every sampling period p, a bounded time series of what was
//! observed and forecast, and the forecaster and policy the controller
//! consults. The series is soft state, but the controller persists its tail
//! now and then so a restarted manager does not forecast from a cold start.

use super::model::*;
use crate::forecast::{Ar, ArConfig, Forecast, Forecaster, Seasonal, SeasonalConfig};
use crate::policy::{
    Decision, Hpa, HpaConfig, Observation, Policy, PolicyError, Predictive, PredictiveConfig,
    Threshold,
};
use std::collections::VecDeque;

/// Samples kept per service: an hour at p = 2 s.
pub const SERIES_LEN: usize = 1800;

/// Seconds of history the AR models are fitted on (LAMA: 40 s).
const AR_HISTORY_SECS: f64 = 40.0;

/// Reports older than this are ignored (a dispatcher that stopped).
pub const REPORT_FRESH_MS: u64 = 3000;

/// One node's load in the service's metric, from its agent's L(t) or from
/// the dispatchers' fresh reports about its backend address. `None` when
/// nothing is known.
pub fn node_metric<'a>(
    kind: MetricKind,
    load: Option<&LoadSample>,
    address: &str,
    reports: impl IntoIterator<Item = &'a DispatchReport>,
) -> Option<f64> {
    match kind {
        MetricKind::Net => load.map(|l| l.net_tx_bps * 8.0 / 1e6),
        MetricKind::Cpu => load.map(|l| l.cpu * f64::from(l.cpus.max(1))),
        MetricKind::DispatchActive | MetricKind::DispatchRps => {
            let mut seen = false;
            let mut sum = 0.0;
            for r in reports {
                for b in r.backends.iter().filter(|b| b.address == address) {
                    let v = dispatch_value(kind, b);
                    if v.is_finite() && v >= 0.0 {
                        sum += v;
                        seen = true;
                    }
                }
            }
            // Dispatchers that report but never saw this backend count as 0:
            // it serves nothing through them.
            seen.then_some(sum)
        }
    }
}

/// The value a dispatcher reports for a backend in a dispatch metric.
pub fn dispatch_value(kind: MetricKind, b: &BackendLoad) -> f64 {
    if kind == MetricKind::DispatchActive {
        b.active
    } else {
        b.rps
    }
}

/// A forecast is of a load, and a load is never negative: an AR model
/// extrapolating a fall must not promise negative demand to the policy or
/// draw it below the axis of a chart.
fn non_negative(f: Forecast) -> Forecast {
    Forecast {
        mean: f.mean.max(0.0),
        stddev: f.stddev,
    }
}

/// The policy and forecaster of a service, and its monitor series.
pub struct Monitor {
    policy: Box<dyn Policy + Send>,
    forecaster: Box<dyn Forecaster + Send>,
    series: VecDeque<SeriesPoint>,
    capacity: f64,
    lead_time: f64,
    period: f64,
    next_eval: Option<f64>,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor")
            .field("policy", &self.policy.name())
            .field("forecaster", &self.forecaster.name())
            .field("samples", &self.series.len())
            .finish()
    }
}

impl Monitor {
    /// Builds the policy and forecaster a spec asks for.
    pub fn new(spec: &ServiceSpec) -> Result<Self, PolicyError> {
        let p = spec.period_secs;
        let window = ((AR_HISTORY_SECS / p).round() as usize).max(ArConfig::default().min_window());
        let lama_ar = ArConfig {
            order: 1,
            window,
            period: p,
            trend: false,
        };
        let (ut, lt) = (spec.sla.upper, spec.sla.lower);
        let bad =
            |name: &'static str, value: f64, expected: &'static str| PolicyError::BadParameter {
                name,
                value,
                expected,
            };
        let (policy, trend): (Box<dyn Policy + Send>, bool) = match spec.policy {
            PolicyKind::Threshold => (Box::new(Threshold::new(ut, lt)?), false),
            PolicyKind::Ar => (
                Box::new(Threshold::new(ut, lt)?.on_forecast(Threshold::AR_HORIZON)?),
                false,
            ),
            PolicyKind::Hpa => (
                Box::new(Hpa::new(HpaConfig {
                    target: ut,
                    ..HpaConfig::default()
                })?),
                false,
            ),
            PolicyKind::Predictive => (
                Box::new(Predictive::new(PredictiveConfig {
                    ut,
                    lt,
                    k: spec.forecast.k,
                    lead_time: spec.lead_time_secs,
                    horizon_margin: p,
                    ..PredictiveConfig::default()
                })?),
                true,
            ),
        };
        let ar = ArConfig { trend, ..lama_ar };
        let period_err = |_| bad("period_secs", p, "a period that fits the AR window");
        let forecaster: Box<dyn Forecaster + Send> = match spec.forecast.season_secs {
            // Only the predictive policy looks a lead time ahead, where a
            // time-of-day profile helps; the others keep LAMA's AR(1).
            Some(season) if spec.policy == PolicyKind::Predictive => Box::new(
                Seasonal::new(SeasonalConfig {
                    season,
                    residual: ar,
                    ..SeasonalConfig::default()
                })
                .map_err(|_| {
                    bad(
                        "forecast.season_secs",
                        season,
                        "positive, and long enough for its bins",
                    )
                })?,
            ),
            _ => Box::new(Ar::new(ar).map_err(period_err)?),
        };
        Ok(Self {
            policy,
            forecaster,
            series: VecDeque::new(),
            capacity: spec.metric.capacity,
            lead_time: spec.lead_time_secs,
            period: p,
            next_eval: None,
        })
    }

    /// Whether a sampling period has passed since the last step.
    pub fn due(&self, t: f64) -> bool {
        self.next_eval.is_none_or(|n| t >= n)
    }

    /// When the next step is due, seconds on the controller's clock.
    pub fn next_due(&self) -> Option<f64> {
        self.next_eval
    }

    /// One sampling period: records the summed load, forecasts, and asks
    /// the policy. `t` is monotonic seconds.
    pub fn step(
        &mut self,
        t: f64,
        at_ms: u64,
        usage: f64,
        nodes: NodeCounts,
    ) -> Result<Decision, PolicyError> {
        // Stay on the p-grid even if a tick came late.
        self.next_eval = Some(match self.next_eval {
            Some(n) if t - n < self.period => n + self.period,
            _ => t + self.period,
        });
        self.forecaster.observe(t, usage);
        let horizon = self.policy.forecast_horizon();
        let shown = horizon.unwrap_or(self.lead_time);
        let forecast = self.forecaster.forecast(shown).map(non_negative);
        let obs = Observation {
            time: t,
            usage,
            allocated: nodes.allocated,
            ready: nodes.ready,
            capacity: self.capacity,
            min_nodes: nodes.min,
            max_nodes: nodes.max,
            lead_time: self.lead_time,
            forecast: horizon.and(forecast),
        };
        let d = self.policy.decide(&obs)?;
        self.record(SeriesPoint {
            at_ms,
            observed: usage,
            forecast: forecast.map(|f| f.mean),
            horizon_secs: shown,
            allocated: nodes.allocated,
            serving: nodes.ready,
        });
        Ok(d)
    }

    fn record(&mut self, p: SeriesPoint) {
        if self.series.len() >= SERIES_LEN {
            self.series.pop_front();
        }
        self.series.push_back(p);
    }

    /// Replays a persisted series after a restart: the forecaster learns the
    /// observed values at their times (`now_t` on the controller's clock is
    /// `now_unix_ms` on the wall clock), so forecasts resume warm.
    pub fn restore(&mut self, points: &[SeriesPoint], now_t: f64, now_unix_ms: u64) {
        for p in points {
            let age = now_unix_ms.saturating_sub(p.at_ms) as f64 / 1000.0;
            self.forecaster.observe(now_t - age, p.observed);
            self.record(p.clone());
        }
    }

    /// The series, oldest first.
    pub fn series(&self) -> impl ExactSizeIterator<Item = &SeriesPoint> + DoubleEndedIterator {
        self.series.iter()
    }

    /// The latest point.
    pub fn last(&self) -> Option<&SeriesPoint> {
        self.series.back()
    }

    /// The policy's name.
    pub fn policy_name(&self) -> &str {
        self.policy.name()
    }

    /// The forecaster's name, when the policy decides on a forecast.
    pub fn forecaster_name(&self) -> Option<String> {
        self.policy
            .forecast_horizon()
            .map(|_| self.forecaster.name())
    }
}

/// Node counts a policy decides on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeCounts {
    /// Allocated (starting + serving).
    pub allocated: u32,
    /// Serving.
    pub ready: u32,
    /// The service's floor.
    pub min: u32,
    /// The service's ceiling.
    pub max: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Action;

    pub(crate) fn spec(policy: PolicyKind) -> ServiceSpec {
        let mut s: ServiceSpec = serde_json::from_value(serde_json::json!({
            "name": "web",
            "max_nodes": 4,
            "app": {"adaptor": "www", "port": 8081,
                    "params": {"listen": "{{ node_address }}:{{ port }}", "root": "/srv"}},
            "metric": {"kind": "dispatch_active", "capacity": 10.0},
        }))
        .unwrap();
        s.policy = policy;
        s
    }

    fn report(addr: &str, active: f64) -> DispatchReport {
        DispatchReport {
            dispatcher: "d".into(),
            version: 1,
            backends: vec![BackendLoad {
                address: addr.into(),
                active,
                in_flight: 0,
                rps: 2.0 * active,
            }],
            federation: None,
        }
    }

    fn counts(allocated: u32, ready: u32) -> NodeCounts {
        NodeCounts {
            allocated,
            ready,
            min: 1,
            max: 4,
        }
    }

    #[test]
    fn node_metrics_per_kind() {
        let l = LoadSample {
            cpu: 0.5,
            cpus: 4,
            net_tx_bps: 12.5e6,
            ..LoadSample::default()
        };
        assert_eq!(
            node_metric(MetricKind::Net, Some(&l), "a:1", []),
            Some(100.0)
        );
        assert_eq!(node_metric(MetricKind::Cpu, Some(&l), "a:1", []), Some(2.0));
        assert_eq!(node_metric(MetricKind::Net, None, "a:1", []), None);
        let rs = [report("a:1", 3.0), report("a:1", 1.5), report("b:1", 7.0)];
        assert_eq!(
            node_metric(MetricKind::DispatchActive, None, "a:1", &rs),
            Some(4.5)
        );
        assert_eq!(
            node_metric(MetricKind::DispatchRps, None, "b:1", &rs),
            Some(14.0)
        );
        assert_eq!(
            node_metric(MetricKind::DispatchActive, None, "c:1", &rs),
            None
        );
        let bad = [report("a:1", f64::NAN)];
        assert_eq!(
            node_metric(MetricKind::DispatchActive, None, "a:1", &bad),
            None
        );
    }

    #[test]
    fn threshold_monitor_adds_above_ut_and_keeps_a_bounded_series() {
        let mut m = Monitor::new(&spec(PolicyKind::Threshold)).unwrap();
        assert!(m.due(0.0));
        let d = m.step(0.0, 0, 9.5, counts(1, 1)).unwrap();
        assert_eq!(d.action, Action::Add(1), "{}", d.reason);
        assert!(!m.due(1.0));
        assert!(m.due(2.0));
        let d = m.step(2.0, 2000, 5.0, counts(2, 2)).unwrap();
        assert_eq!(d.action, Action::Release(1), "{}", d.reason);
        for i in 0..SERIES_LEN + 10 {
            m.step(4.0 + 2.0 * i as f64, 0, 1.0, counts(1, 1)).unwrap();
        }
        assert_eq!(m.series().len(), SERIES_LEN);
        assert_eq!(m.last().unwrap().observed, 1.0);
    }

    #[test]
    fn forecasting_policies_get_a_forecast_after_enough_history() {
        for p in [PolicyKind::Ar, PolicyKind::Predictive] {
            let mut m = Monitor::new(&spec(p)).unwrap();
            for i in 0..30 {
                m.step(2.0 * i as f64, 0, 5.0 + (i % 3) as f64, counts(1, 1))
                    .unwrap();
            }
            assert!(m.last().unwrap().forecast.is_some(), "{p:?}");
        }
    }

    #[test]
    fn a_falling_load_never_forecasts_below_zero() {
        let mut m = Monitor::new(&spec(PolicyKind::Predictive)).unwrap();
        for i in 0..40 {
            let usage = (30.0 - 2.0 * i as f64).max(0.0);
            m.step(2.0 * i as f64, 0, usage, counts(4, 4)).unwrap();
        }
        // A trend AR on this ramp extrapolates well below zero.
        assert!(m.series().all(|p| p.forecast.is_none_or(|f| f >= 0.0)));
        assert_eq!(m.last().unwrap().forecast, Some(0.0));
    }

    #[test]
    fn a_restored_series_forecasts_at_once() {
        let s = spec(PolicyKind::Ar);
        let mut warm = Monitor::new(&s).unwrap();
        for i in 0..30 {
            warm.step(
                2.0 * i as f64,
                1000 * 2 * i,
                5.0 + (i % 3) as f64,
                counts(1, 1),
            )
            .unwrap();
        }
        let saved: Vec<SeriesPoint> = warm.series().cloned().collect();
        let mut cold = Monitor::new(&s).unwrap();
        cold.restore(&saved, 500.0, 60_000);
        assert_eq!(cold.series().len(), 30);
        cold.step(502.0, 62_000, 6.0, counts(1, 1)).unwrap();
        assert!(cold.last().unwrap().forecast.is_some());
        let mut fresh = Monitor::new(&s).unwrap();
        fresh.step(502.0, 62_000, 6.0, counts(1, 1)).unwrap();
        assert!(fresh.last().unwrap().forecast.is_none());
    }
}
