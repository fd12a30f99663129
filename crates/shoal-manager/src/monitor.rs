//! The monitor (LAMA Fig. 6): per service, the summed load L(t) of its
//! nodes every sampling period p, a bounded time series of what was
//! observed and forecast, and the shoal-core forecaster and policy that the
//! engine consults. Soft state: rebuilt empty after a restart.

use shoal_core::forecast::{Ar, ArConfig, Forecaster};
use shoal_core::policy::{
    Decision, Hpa, HpaConfig, Observation, Policy, PolicyError, Predictive, PredictiveConfig,
    Threshold,
};
use shoal_net::wire::*;
use std::collections::VecDeque;

/// Samples kept per service: an hour at p = 2 s.
pub const SERIES_LEN: usize = 1800;

/// Seconds of history the AR models are fitted on (LAMA: 40 s).
const AR_HISTORY_SECS: f64 = 40.0;

/// Reports older than this are ignored (a dispatcher that stopped).
pub const REPORT_FRESH_SECS: f64 = 3.0;

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
                    let v = if kind == MetricKind::DispatchActive {
                        b.active
                    } else {
                        b.rps
                    };
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

impl Monitor {
    /// Builds the shoal-core policy and forecaster a spec asks for.
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
                    lead_time: spec.lead_time_secs,
                    horizon_margin: p,
                    ..PredictiveConfig::default()
                })?),
                true,
            ),
        };
        let forecaster =
            Ar::new(ArConfig { trend, ..lama_ar }).map_err(|e| PolicyError::BadParameter {
                name: "period_secs",
                value: p,
                expected: if matches!(e, shoal_core::forecast::ForecastError::BadPeriod(_)) {
                    "positive and finite"
                } else {
                    "a period that fits the AR window"
                },
            })?;
        Ok(Self {
            policy,
            forecaster: Box::new(forecaster),
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

    /// One sampling period: records the summed load, forecasts, and asks
    /// the policy. `t` is monotonic seconds.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        t: f64,
        at_ms: u64,
        usage: f64,
        allocated: u32,
        ready: u32,
        min_nodes: u32,
        max_nodes: u32,
    ) -> Result<Decision, PolicyError> {
        // Stay on the p-grid even if a tick came late.
        self.next_eval = Some(match self.next_eval {
            Some(n) if t - n < self.period => n + self.period,
            _ => t + self.period,
        });
        self.forecaster.observe(t, usage);
        let horizon = self.policy.forecast_horizon();
        let shown = horizon.unwrap_or(self.lead_time);
        let forecast = self.forecaster.forecast(shown);
        let obs = Observation {
            time: t,
            usage,
            allocated,
            ready,
            capacity: self.capacity,
            min_nodes,
            max_nodes,
            lead_time: self.lead_time,
            forecast: horizon.and(forecast),
        };
        let d = self.policy.decide(&obs)?;
        if self.series.len() >= SERIES_LEN {
            self.series.pop_front();
        }
        self.series.push_back(SeriesPoint {
            at_ms,
            observed: usage,
            forecast: forecast.map(|f| f.mean),
            horizon_secs: shown,
            allocated,
            serving: ready,
        });
        Ok(d)
    }

    /// The series, oldest first.
    pub fn series(&self) -> Vec<SeriesPoint> {
        self.series.iter().cloned().collect()
    }

    /// The latest point.
    pub fn last(&self) -> Option<&SeriesPoint> {
        self.series.back()
    }

    /// The policy's name.
    pub fn policy_name(&self) -> &str {
        self.policy.name()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_core::policy::Action;

    fn spec(policy: PolicyKind) -> ServiceSpec {
        let mut s = crate::services::parse_toml(
            r#"
name = "web"
max_nodes = 4
[app]
adaptor = "www"
port = 8081
[app.params]
listen = "{{ node_address }}:{{ port }}"
root = "/srv"
[metric]
kind = "dispatch_active"
capacity = 10
"#,
        )
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
        let d = m.step(0.0, 0, 9.5, 1, 1, 1, 4).unwrap();
        assert_eq!(d.action, Action::Add(1), "{}", d.reason);
        assert!(!m.due(1.0));
        assert!(m.due(2.0));
        let d = m.step(2.0, 2000, 5.0, 2, 2, 1, 4).unwrap();
        assert_eq!(d.action, Action::Release(1), "{}", d.reason);
        for i in 0..SERIES_LEN + 10 {
            m.step(4.0 + 2.0 * i as f64, 0, 1.0, 1, 1, 1, 4).unwrap();
        }
        assert_eq!(m.series().len(), SERIES_LEN);
        assert_eq!(m.last().unwrap().observed, 1.0);
    }

    #[test]
    fn forecasting_policies_get_a_forecast_after_enough_history() {
        for p in [PolicyKind::Ar, PolicyKind::Predictive] {
            let mut m = Monitor::new(&spec(p)).unwrap();
            for i in 0..30 {
                m.step(2.0 * i as f64, 0, 5.0 + (i % 3) as f64, 1, 1, 1, 4)
                    .unwrap();
            }
            assert!(m.last().unwrap().forecast.is_some(), "{p:?}");
        }
    }
}
