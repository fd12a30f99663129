//! Demand forecasting: AR(p) fitted online over a sliding window (LAMA's
//! reallocation engine predicts the summed load with AR(1) on 40 s of history,
//! 20 s ahead), an exponential moving average, and a seasonal forecaster for
//! time-of-day effects.
//!
//! Every forecaster is sans-I/O: the caller passes `(time, value)` samples,
//! taken every `period` seconds, and asks for a [`Forecast`] `horizon`
//! seconds past the last sample. Nothing here reads a clock.
//!
//! Why not the `augurs` crate (MSTL/ETS): its models are batch fits over a
//! whole series (refit from scratch on every new sample), its ETS crate does
//! not implement seasonal models yet, MSTL needs at least two full seasons of
//! history before it says anything, and it would bring nalgebra, rand and an
//! optimiser into shoal-core, which must stay light. What the reallocation
//! engine needs is a few arithmetic operations per 2 s sample on a 20-sample
//! window, with an uncertainty it can provision for; that is ~200 lines here.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// A point forecast with its uncertainty.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Forecast {
    /// Expected value at the horizon.
    pub mean: f64,
    /// Standard deviation of the forecast error at the horizon (model-based;
    /// 0 when the model has no evidence of noise).
    pub stddev: f64,
}

impl Forecast {
    /// `mean + k * stddev`: the demand to provision for at one-sided
    /// confidence `k` standard deviations.
    pub fn upper(&self, k: f64) -> f64 {
        self.mean + k * self.stddev
    }
}

/// An online forecaster fed one sample per sampling period.
pub trait Forecaster {
    /// Records the value observed at time `t` (seconds). Non-finite values
    /// are ignored: a broken monitor sample must not poison the model.
    fn observe(&mut self, t: f64, value: f64);
    /// Forecast `horizon` seconds after the last observation, or `None`
    /// before the model has enough history to say anything.
    fn forecast(&self, horizon: f64) -> Option<Forecast>;
    /// Short name for logs and plots, e.g. `ar(1)`.
    fn name(&self) -> String;
}

/// Bad forecaster configuration.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ForecastError {
    /// The sampling period must be a positive, finite number of seconds.
    #[error("sampling period must be positive and finite, got {0} s")]
    BadPeriod(f64),
    /// The window is too short to fit the model.
    #[error(
        "window of {window} samples is too short for AR({order}){trend}: it needs at least {needed}; lengthen the window or lower the order",
        trend = if *trend { " with trend" } else { "" }
    )]
    WindowTooShort {
        /// Samples in the window.
        window: usize,
        /// AR order.
        order: usize,
        /// Whether a linear trend is fitted too.
        trend: bool,
        /// Minimum window for this model.
        needed: usize,
    },
    /// AR order above the supported maximum.
    #[error("AR order {0} is above the supported maximum of {MAX_AR_ORDER}")]
    OrderTooHigh(usize),
    /// A smoothing factor outside (0, 1].
    #[error("{name} must be in (0, 1], got {value}")]
    BadSmoothing {
        /// Parameter name.
        name: &'static str,
        /// Given value.
        value: f64,
    },
    /// Bad seasonal parameters.
    #[error(
        "season of {season} s in {bins} bins is not usable: need a positive finite season and at least 2 bins"
    )]
    BadSeason {
        /// Season length in seconds.
        season: f64,
        /// Number of bins.
        bins: usize,
    },
}

/// Largest AR order accepted (more is never useful on a 2 s monitor).
pub const MAX_AR_ORDER: usize = 16;

/// Configuration of an [`Ar`] forecaster.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ArConfig {
    /// AR order p.
    pub order: usize,
    /// Samples kept in the sliding window the model is fitted on.
    pub window: usize,
    /// Sampling period in seconds.
    pub period: f64,
    /// Fit a linear trend by least squares first and the AR model on its
    /// residuals. Off in LAMA (a mean-reverting AR(1)); on, the forecast
    /// follows ramps instead of lagging behind them.
    pub trend: bool,
}

impl Default for ArConfig {
    /// LAMA's model: AR(1) over 40 s of history sampled every 2 s.
    fn default() -> Self {
        Self {
            order: 1,
            window: 20,
            period: 2.0,
            trend: false,
        }
    }
}

impl ArConfig {
    /// Minimum window for this order (and trend).
    pub fn min_window(&self) -> usize {
        self.order + 3 + usize::from(self.trend)
    }

    /// Checks the configuration.
    pub fn validate(&self) -> Result<(), ForecastError> {
        if !(self.period.is_finite() && self.period > 0.0) {
            return Err(ForecastError::BadPeriod(self.period));
        }
        if self.order > MAX_AR_ORDER {
            return Err(ForecastError::OrderTooHigh(self.order));
        }
        if self.window < self.min_window() {
            return Err(ForecastError::WindowTooShort {
                window: self.window,
                order: self.order,
                trend: self.trend,
                needed: self.min_window(),
            });
        }
        Ok(())
    }
}

/// A fitted AR model: `x_i = level + slope * i + e_i`, with
/// `e_i = sum_j phi_j e_{i-j} + innovation` and `i` the sample index in the
/// window (0 = oldest).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArFit {
    /// Intercept at the oldest sample of the window (the window mean when no
    /// trend is fitted).
    pub level: f64,
    /// Trend per sample (0 when no trend is fitted).
    pub slope: f64,
    /// AR coefficients phi_1..phi_p (Yule-Walker, so always stationary).
    pub phi: Vec<f64>,
    /// Innovation variance.
    pub sigma2: f64,
    /// Whether a trend was fitted.
    pub trend: bool,
    /// Residuals of the deterministic part, oldest first.
    residuals: Vec<f64>,
    /// Variance of the residuals (lag-0 autocovariance).
    resid_var: f64,
}

impl ArFit {
    /// Fits `x` (oldest first) with `order` lags, optionally after removing
    /// a least-squares line. `None` if there are too few samples.
    pub fn fit(x: &[f64], order: usize, trend: bool) -> Option<Self> {
        let n = x.len();
        if n < order + 3 + usize::from(trend) {
            return None;
        }
        let nf = n as f64;
        let mean = x.iter().sum::<f64>() / nf;
        let (level, slope) = if trend {
            let ibar = (nf - 1.0) / 2.0;
            let (mut sxy, mut sxx) = (0.0, 0.0);
            for (i, v) in x.iter().enumerate() {
                let d = i as f64 - ibar;
                sxy += d * (v - mean);
                sxx += d * d;
            }
            let b = sxy / sxx;
            (mean - b * ibar, b)
        } else {
            (mean, 0.0)
        };
        let residuals: Vec<f64> = x
            .iter()
            .enumerate()
            .map(|(i, v)| v - level - slope * i as f64)
            .collect();
        // Biased autocovariances: the Toeplitz matrix they form is positive
        // semi-definite, so Levinson-Durbin yields a stationary model.
        let acov = |k: usize| -> f64 {
            residuals[..n - k]
                .iter()
                .zip(&residuals[k..])
                .map(|(a, b)| a * b)
                .sum::<f64>()
                / nf
        };
        let r: Vec<f64> = (0..=order).map(acov).collect();
        let resid_var = r[0];
        let (phi, mut sigma2) = if resid_var <= f64::EPSILON * mean.abs().max(1.0) {
            (vec![0.0; order], 0.0)
        } else {
            levinson_durbin(&r)
        };
        // Degrees-of-freedom correction for the parameters fitted.
        let dof = nf - order as f64 - 1.0 - f64::from(u8::from(trend));
        sigma2 *= nf / dof.max(1.0);
        Some(Self {
            level,
            slope,
            phi,
            sigma2,
            trend,
            residuals,
            resid_var,
        })
    }

    /// Forecast `steps` samples after the last one in the window.
    pub fn forecast_steps(&self, steps: usize) -> Forecast {
        let steps = steps.max(1);
        let n = self.residuals.len();
        let p = self.phi.len();
        // Iterate the AR recursion on the residuals.
        let mut hist: Vec<f64> = self.residuals[n.saturating_sub(p)..].to_vec();
        for _ in 0..steps {
            let next: f64 = self
                .phi
                .iter()
                .enumerate()
                .map(|(j, ph)| ph * hist[hist.len() - 1 - j])
                .sum();
            hist.push(next);
        }
        let e_h = hist.last().copied().unwrap_or(0.0);
        let idx = (n - 1 + steps) as f64;
        let mean = self.level + self.slope * idx + e_h;
        // Forecast error variance: sigma^2 * sum_{j<h} psi_j^2 from the MA(inf)
        // form, plus the uncertainty of the fitted level (and trend).
        let mut psi = vec![1.0f64];
        for j in 1..steps {
            let v: f64 = (1..=p.min(j)).map(|i| self.phi[i - 1] * psi[j - i]).sum();
            psi.push(v);
        }
        let ar_var = self.sigma2 * psi.iter().map(|v| v * v).sum::<f64>();
        let nf = n as f64;
        let lever = if self.trend {
            let ibar = (nf - 1.0) / 2.0;
            let sxx: f64 = (0..n).map(|i| (i as f64 - ibar).powi(2)).sum();
            1.0 / nf + (idx - ibar).powi(2) / sxx
        } else {
            1.0 / nf
        };
        let param_var = self.resid_var * lever;
        Forecast {
            mean,
            stddev: (ar_var + param_var).max(0.0).sqrt(),
        }
    }
}

/// Levinson-Durbin recursion: AR coefficients and prediction error variance
/// from autocovariances `r[0..=p]`.
fn levinson_durbin(r: &[f64]) -> (Vec<f64>, f64) {
    let p = r.len() - 1;
    let mut phi = vec![0.0; p];
    let mut err = r[0];
    for k in 1..=p {
        if err <= 0.0 {
            break;
        }
        let acc: f64 = (1..k).map(|j| phi[j - 1] * r[k - j]).sum();
        let refl = ((r[k] - acc) / err).clamp(-0.999_999, 0.999_999);
        let prev = phi.clone();
        phi[k - 1] = refl;
        for j in 1..k {
            phi[j - 1] = prev[j - 1] - refl * prev[k - j - 1];
        }
        err *= 1.0 - refl * refl;
    }
    (phi, err.max(0.0))
}

/// AR(p) fitted by Yule-Walker over a sliding window, refitted on demand.
#[derive(Debug, Clone)]
pub struct Ar {
    cfg: ArConfig,
    window: VecDeque<f64>,
}

impl Ar {
    /// A forecaster with `cfg`, empty.
    pub fn new(cfg: ArConfig) -> Result<Self, ForecastError> {
        cfg.validate()?;
        Ok(Self {
            cfg,
            window: VecDeque::with_capacity(cfg.window),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ArConfig {
        &self.cfg
    }

    /// The model fitted to the current window, if it is long enough.
    pub fn fit(&self) -> Option<ArFit> {
        let x: Vec<f64> = self.window.iter().copied().collect();
        ArFit::fit(&x, self.cfg.order, self.cfg.trend)
    }

    fn steps(&self, horizon: f64) -> usize {
        steps_for(horizon, self.cfg.period)
    }
}

/// Number of whole sampling periods covering `horizon` (at least 1).
fn steps_for(horizon: f64, period: f64) -> usize {
    if !horizon.is_finite() || horizon <= 0.0 {
        return 1;
    }
    // The cap keeps a silly horizon from allocating a huge psi vector.
    ((horizon / period - 1e-9).ceil() as usize).clamp(1, 100_000)
}

impl Forecaster for Ar {
    fn observe(&mut self, _t: f64, value: f64) {
        if !value.is_finite() {
            return;
        }
        if self.window.len() == self.cfg.window {
            self.window.pop_front();
        }
        self.window.push_back(value);
    }

    fn forecast(&self, horizon: f64) -> Option<Forecast> {
        self.fit().map(|f| f.forecast_steps(self.steps(horizon)))
    }

    fn name(&self) -> String {
        if self.cfg.trend {
            format!("ar({})+trend", self.cfg.order)
        } else {
            format!("ar({})", self.cfg.order)
        }
    }
}

/// Exponential moving average with an exponentially weighted variance of its
/// one-step errors. Forecasts are flat; their variance grows with the horizon
/// as for simple exponential smoothing (ARIMA(0,1,1)).
#[derive(Debug, Clone)]
pub struct Ema {
    alpha: f64,
    period: f64,
    level: Option<f64>,
    var: f64,
}

impl Ema {
    /// `alpha` is the weight of the newest sample, in (0, 1].
    pub fn new(alpha: f64, period: f64) -> Result<Self, ForecastError> {
        if !(alpha > 0.0 && alpha <= 1.0) {
            return Err(ForecastError::BadSmoothing {
                name: "alpha",
                value: alpha,
            });
        }
        if !(period.is_finite() && period > 0.0) {
            return Err(ForecastError::BadPeriod(period));
        }
        Ok(Self {
            alpha,
            period,
            level: None,
            var: 0.0,
        })
    }

    /// The current smoothed level.
    pub fn level(&self) -> Option<f64> {
        self.level
    }
}

impl Forecaster for Ema {
    fn observe(&mut self, _t: f64, value: f64) {
        if !value.is_finite() {
            return;
        }
        match self.level {
            None => self.level = Some(value),
            Some(l) => {
                let err = value - l;
                self.level = Some(l + self.alpha * err);
                self.var = (1.0 - self.alpha) * (self.var + self.alpha * err * err);
            }
        }
    }

    fn forecast(&self, horizon: f64) -> Option<Forecast> {
        let h = steps_for(horizon, self.period) as f64;
        self.level.map(|mean| Forecast {
            mean,
            stddev: (self.var * (1.0 + (h - 1.0) * self.alpha * self.alpha)).sqrt(),
        })
    }

    fn name(&self) -> String {
        format!("ema({})", self.alpha)
    }
}

/// Configuration of a [`Seasonal`] forecaster.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SeasonalConfig {
    /// Length of the season in seconds (86,400 for time of day).
    pub season: f64,
    /// Bins the season is divided into (96 = quarter hours of a day).
    pub bins: usize,
    /// Learning rate of the seasonal profile, per season: the newest day
    /// weighs this much in a bin's value, however many samples fall in the
    /// bin. A bin's first samples are simply averaged.
    pub gamma: f64,
    /// Model of what the profile does not explain (short-term deviations).
    pub residual: ArConfig,
}

impl Default for SeasonalConfig {
    fn default() -> Self {
        Self {
            season: 86_400.0,
            bins: 96,
            gamma: 0.3,
            residual: ArConfig {
                trend: true,
                window: 30,
                ..ArConfig::default()
            },
        }
    }
}

/// Time-of-day forecaster: a per-bin seasonal profile learnt online by
/// exponential smoothing (the additive seasonal term of Holt-Winters),
/// linearly interpolated between bin centres, plus an AR model of the
/// deviations from the profile. LAMA found long-term (day-before) forecasts
/// far less accurate than short-term ones; this keeps both: the profile says
/// where the day is going, the AR term tracks today's deviation from it.
/// Before a bin has been seen its profile value is unknown and the forecast
/// falls back to the current bin's (or, on the first day, to plain AR).
#[derive(Debug, Clone)]
pub struct Seasonal {
    cfg: SeasonalConfig,
    profile: Vec<Option<f64>>,
    /// Samples seen per bin (for the running-mean warm-up).
    counts: Vec<u64>,
    /// Per-sample learning rate equivalent to `gamma` per season.
    rate: f64,
    residual: Ar,
    last_t: Option<f64>,
}

impl Seasonal {
    /// A forecaster with `cfg`, with an empty profile.
    pub fn new(cfg: SeasonalConfig) -> Result<Self, ForecastError> {
        if !(cfg.season.is_finite() && cfg.season > 0.0) || cfg.bins < 2 {
            return Err(ForecastError::BadSeason {
                season: cfg.season,
                bins: cfg.bins,
            });
        }
        if !(cfg.gamma > 0.0 && cfg.gamma <= 1.0) {
            return Err(ForecastError::BadSmoothing {
                name: "gamma",
                value: cfg.gamma,
            });
        }
        let per_bin = (cfg.season / cfg.bins as f64 / cfg.residual.period).max(1.0);
        Ok(Self {
            profile: vec![None; cfg.bins],
            counts: vec![0; cfg.bins],
            rate: 1.0 - (1.0 - cfg.gamma).powf(1.0 / per_bin),
            residual: Ar::new(cfg.residual)?,
            cfg,
            last_t: None,
        })
    }

    fn position(&self, t: f64) -> f64 {
        let phase = t.rem_euclid(self.cfg.season) / self.cfg.season;
        phase * self.cfg.bins as f64
    }

    fn bin(&self, t: f64) -> usize {
        (self.position(t).floor() as usize).min(self.cfg.bins - 1)
    }

    /// The learnt seasonal value at time `t`, if its bins have been seen.
    pub fn profile_at(&self, t: f64) -> Option<f64> {
        if !t.is_finite() {
            return None;
        }
        let bins = self.cfg.bins;
        // Interpolate between the centres of the two nearest bins.
        let x = self.position(t) - 0.5;
        let lo = x.floor();
        let frac = x - lo;
        let i = (lo as i64).rem_euclid(bins as i64) as usize;
        let j = (i + 1) % bins;
        match (self.profile[i], self.profile[j]) {
            (Some(a), Some(b)) => Some(a + (b - a) * frac),
            (Some(a), None) => Some(a),
            (None, Some(b)) => Some(b),
            (None, None) => None,
        }
    }
}

impl Forecaster for Seasonal {
    fn observe(&mut self, t: f64, value: f64) {
        if !value.is_finite() || !t.is_finite() {
            return;
        }
        let base = self.profile_at(t).unwrap_or(0.0);
        self.residual.observe(t, value - base);
        let b = self.bin(t);
        self.counts[b] += 1;
        let g = self.rate.max(1.0 / self.counts[b] as f64);
        self.profile[b] = Some(match self.profile[b] {
            None => value,
            Some(s) => s + g * (value - s),
        });
        self.last_t = Some(t);
    }

    fn forecast(&self, horizon: f64) -> Option<Forecast> {
        let t = self.last_t?;
        let r = self.residual.forecast(horizon)?;
        let now = self.profile_at(t);
        let later = self.profile_at(t + horizon.max(0.0)).or(now);
        Some(Forecast {
            mean: later.unwrap_or(0.0) + r.mean,
            stddev: r.stddev,
        })
    }

    fn name(&self) -> String {
        format!("seasonal({} s)+{}", self.cfg.season, self.residual.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SplitMix64 with Box-Muller: a seeded Gaussian source for the tests.
    struct Rng(u64);
    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn uniform(&mut self) -> f64 {
            ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        }
        fn normal(&mut self) -> f64 {
            let (u, v) = (self.uniform(), self.uniform());
            (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
        }
    }

    fn ar_series(seed: u64, n: usize, mu: f64, phi: &[f64], sd: f64) -> Vec<f64> {
        let mut rng = Rng(seed);
        let mut e = vec![0.0; phi.len()];
        let mut out = Vec::with_capacity(n);
        for i in 0..n + 200 {
            let v: f64 = phi
                .iter()
                .enumerate()
                .map(|(j, p)| p * e[e.len() - 1 - j])
                .sum::<f64>()
                + sd * rng.normal();
            e.push(v);
            if i >= 200 {
                out.push(mu + v);
            }
        }
        out
    }

    fn fed(cfg: ArConfig, xs: &[f64]) -> Ar {
        let mut ar = Ar::new(cfg).unwrap();
        for (i, x) in xs.iter().enumerate() {
            ar.observe(i as f64 * cfg.period, *x);
        }
        ar
    }

    #[test]
    fn ar1_fit_recovers_coefficient_over_seeds() {
        for (seed, phi) in [(1, 0.7), (2, 0.3), (3, -0.5), (4, 0.9)] {
            let xs = ar_series(seed, 4000, 50.0, &[phi], 2.0);
            let ar = fed(
                ArConfig {
                    window: 4000,
                    ..ArConfig::default()
                },
                &xs,
            );
            let fit = ar.fit().unwrap();
            assert!(
                (fit.phi[0] - phi).abs() < 0.04,
                "seed {seed}: phi {} vs {phi}",
                fit.phi[0]
            );
            assert!((fit.sigma2 - 4.0).abs() < 0.4, "sigma2 {}", fit.sigma2);
            assert!((fit.level - 50.0).abs() < 1.0, "level {}", fit.level);
        }
    }

    #[test]
    fn ar2_fit_recovers_coefficients() {
        let xs = ar_series(7, 6000, 0.0, &[0.5, -0.3], 1.0);
        let ar = fed(
            ArConfig {
                order: 2,
                window: 6000,
                ..ArConfig::default()
            },
            &xs,
        );
        let fit = ar.fit().unwrap();
        assert!((fit.phi[0] - 0.5).abs() < 0.04, "{:?}", fit.phi);
        assert!((fit.phi[1] + 0.3).abs() < 0.04, "{:?}", fit.phi);
    }

    #[test]
    fn trend_fit_recovers_slope_and_extrapolates() {
        let noise = ar_series(11, 2000, 0.0, &[0.6], 1.0);
        let xs: Vec<f64> = noise
            .iter()
            .enumerate()
            .map(|(i, e)| 3.0 + 0.5 * i as f64 + e)
            .collect();
        let ar = fed(
            ArConfig {
                window: 2000,
                trend: true,
                ..ArConfig::default()
            },
            &xs,
        );
        let fit = ar.fit().unwrap();
        assert!((fit.slope - 0.5).abs() < 0.005, "slope {}", fit.slope);
        assert!((fit.phi[0] - 0.6).abs() < 0.05, "phi {:?}", fit.phi);
        // 10 steps (20 s) ahead: the line plus a decayed residual.
        let f = ar.forecast(20.0).unwrap();
        let line = 3.0 + 0.5 * (1999.0 + 10.0);
        assert!((f.mean - line).abs() < 3.0, "mean {} line {line}", f.mean);
    }

    #[test]
    fn ar_forecast_follows_the_recursion_and_widens() {
        let xs = ar_series(5, 500, 10.0, &[0.8], 1.0);
        let ar = fed(
            ArConfig {
                window: 500,
                ..ArConfig::default()
            },
            &xs,
        );
        let fit = ar.fit().unwrap();
        let last = *xs.last().unwrap();
        for steps in [1usize, 5, 10] {
            let f = fit.forecast_steps(steps);
            let expect = fit.level + fit.phi[0].powi(steps as i32) * (last - fit.level);
            assert!((f.mean - expect).abs() < 1e-9);
        }
        let s1 = fit.forecast_steps(1).stddev;
        let s10 = fit.forecast_steps(10).stddev;
        assert!(s10 > s1, "{s10} <= {s1}");
        // 20 s ahead at p = 2 s is 10 steps; 19 s rounds up to 10 too.
        assert_eq!(ar.forecast(20.0), ar.forecast(19.0));
        assert_eq!(ar.forecast(20.0), Some(fit.forecast_steps(10)));
    }

    #[test]
    fn lama_default_needs_history_and_keeps_40s() {
        let mut ar = Ar::new(ArConfig::default()).unwrap();
        assert_eq!(ar.forecast(20.0), None);
        for i in 0..100 {
            ar.observe(2.0 * i as f64, i as f64);
        }
        // Only the last 20 samples (40 s) count: their mean is 89.5.
        assert!((ar.fit().unwrap().level - 89.5).abs() < 1e-9);
    }

    #[test]
    fn constant_series_forecasts_itself_without_noise() {
        let mut ar = Ar::new(ArConfig::default()).unwrap();
        for i in 0..30 {
            ar.observe(2.0 * i as f64, 42.0);
        }
        let f = ar.forecast(20.0).unwrap();
        assert!((f.mean - 42.0).abs() < 1e-9);
        assert!(f.stddev < 1e-6);
    }

    #[test]
    fn non_finite_samples_are_ignored() {
        let mut ar = Ar::new(ArConfig::default()).unwrap();
        for i in 0..25 {
            ar.observe(2.0 * i as f64, 10.0 + (i % 3) as f64);
            ar.observe(2.0 * i as f64, f64::NAN);
        }
        let f = ar.forecast(20.0).unwrap();
        assert!(f.mean.is_finite() && f.stddev.is_finite());
    }

    #[test]
    fn bad_configs_are_typed_errors() {
        assert!(matches!(
            Ar::new(ArConfig {
                window: 2,
                ..ArConfig::default()
            }),
            Err(ForecastError::WindowTooShort { .. })
        ));
        assert!(matches!(
            Ar::new(ArConfig {
                period: 0.0,
                ..ArConfig::default()
            }),
            Err(ForecastError::BadPeriod(_))
        ));
        assert!(Ema::new(0.0, 2.0).is_err());
        assert!(Ema::new(f64::NAN, 2.0).is_err());
        assert!(
            Seasonal::new(SeasonalConfig {
                bins: 1,
                ..SeasonalConfig::default()
            })
            .is_err()
        );
    }

    #[test]
    fn ema_tracks_level() {
        let mut e = Ema::new(0.5, 2.0).unwrap();
        assert_eq!(e.forecast(2.0), None);
        e.observe(0.0, 10.0);
        e.observe(2.0, 20.0);
        assert_eq!(e.level(), Some(15.0));
        let f1 = e.forecast(2.0).unwrap();
        let f10 = e.forecast(20.0).unwrap();
        assert_eq!(f1.mean, 15.0);
        assert!(f10.stddev > f1.stddev);
    }

    #[test]
    fn seasonal_learns_time_of_day_and_beats_plain_ar_on_a_turn() {
        // A day of 1,000 s with a sine profile, sampled every 2 s, three days.
        let day = 1000.0;
        let cfg = SeasonalConfig {
            season: day,
            bins: 50,
            gamma: 0.5,
            residual: ArConfig::default(),
        };
        let mut s = Seasonal::new(cfg).unwrap();
        let mut ar = Ar::new(ArConfig::default()).unwrap();
        let f = |t: f64| 100.0 + 50.0 * (2.0 * std::f64::consts::PI * t / day).sin();
        let mut rng = Rng(9);
        let (mut err_s, mut err_a) = (0.0, 0.0);
        let horizon = 60.0;
        let mut t = 0.0;
        while t < 3.0 * day {
            let v = f(t) + 5.0 * rng.normal();
            s.observe(t, v);
            ar.observe(t, v);
            if t >= 2.0 * day {
                let truth = f(t + horizon);
                err_s += (s.forecast(horizon).unwrap().mean - truth).abs();
                err_a += (ar.forecast(horizon).unwrap().mean - truth).abs();
            }
            t += 2.0;
        }
        assert!(err_s < 0.5 * err_a, "seasonal {err_s} vs ar {err_a}");
        // The profile is learnt: a quarter day in, the sine peaks.
        let peak = s.profile_at(day / 4.0).unwrap();
        assert!((peak - 150.0).abs() < 5.0, "peak {peak}");
    }
}
