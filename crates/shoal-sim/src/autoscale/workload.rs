//! Demand workloads for the autoscale simulation, on a grid of `step`
//! seconds, in the unit of node capacity (Mbit/s by default).

use std::path::Path;

/// A demand trace.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Name for files and plots.
    pub name: String,
    /// Sampling step in seconds.
    pub step: f64,
    /// True demand at each step.
    pub demand: Vec<f64>,
    /// Length of a season (a compressed day) if the workload has one.
    pub season: Option<f64>,
    /// The demand's unit, for axes and reports.
    pub unit: &'static str,
}

/// The built-in workloads' unit: LAMA's, with nodes of 100 Mbit/s.
const UNIT: &str = "Mbit/s";

/// Which workload, as given on the command line.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkloadSpec {
    /// LAMA section 5: icecast streams ramping 300/min to 3,000 and back.
    LamaAudio,
    /// Three compressed days of web traffic.
    Diurnal,
    /// A quiet service hit by sudden crowds several times its size.
    FlashCrowd,
    /// A slow wave buried in heavy short-term noise.
    NoisyWave,
    /// `time,demand` lines from a file.
    Csv(std::path::PathBuf),
}

impl std::str::FromStr for WorkloadSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "lama-audio" => Ok(Self::LamaAudio),
            "diurnal" => Ok(Self::Diurnal),
            "flash-crowd" => Ok(Self::FlashCrowd),
            "noisy-wave" => Ok(Self::NoisyWave),
            _ => match s.strip_prefix("csv:") {
                Some(p) if !p.is_empty() => Ok(Self::Csv(p.into())),
                _ => Err(format!(
                    "unknown workload {s:?}: use lama-audio, diurnal, flash-crowd, noisy-wave or csv:PATH (a file of time,demand lines)"
                )),
            },
        }
    }
}

impl WorkloadSpec {
    /// Builds the trace.
    pub fn build(&self, step: f64, seed: u64) -> anyhow::Result<Workload> {
        match self {
            Self::LamaAudio => Ok(lama_audio(&LamaAudio::default(), step, seed)),
            Self::Diurnal => Ok(diurnal(step, seed)),
            Self::FlashCrowd => Ok(flash_crowd(step, seed)),
            Self::NoisyWave => Ok(noisy_wave(step, seed)),
            Self::Csv(p) => csv(p, step),
        }
    }
}

/// SplitMix64 with Box-Muller and Poisson sampling: small, seeded and
/// stable across crate versions, so a seed always means the same trace.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`, decorrelated by `stream` (e.g. a step index).
    pub fn new(seed: u64, stream: u64) -> Self {
        let mut r = Self(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
        r.next_u64();
        r
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    /// Standard normal.
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
    /// Poisson with mean `lambda` (Knuth below 30, normal approximation above).
    pub fn poisson(&mut self, lambda: f64) -> u64 {
        if lambda <= 0.0 {
            return 0;
        }
        if lambda < 30.0 {
            let limit = (-lambda).exp();
            let mut k = 0;
            let mut p = self.uniform();
            while p > limit {
                k += 1;
                p *= self.uniform();
            }
            k
        } else {
            (lambda + lambda.sqrt() * self.normal()).round().max(0.0) as u64
        }
    }
}

/// Parameters of the LAMA section 5 workload.
#[derive(Debug, Clone)]
pub struct LamaAudio {
    /// Quiet time before the ramp, seconds.
    pub warmup: f64,
    /// Arrivals (and later departures) per minute: the steepest rate of the
    /// October 2003 traces.
    pub rate_per_min: f64,
    /// Peak concurrent streams.
    pub peak_streams: u64,
    /// How long the peak is held, seconds.
    pub hold: f64,
    /// Bandwidth of one 128 kbit/s stream with TCP/IP overhead and ACKs.
    pub stream_mbps: f64,
    /// Quiet time after the ramp down, seconds.
    pub cooldown: f64,
}

impl Default for LamaAudio {
    fn default() -> Self {
        Self {
            warmup: 60.0,
            rate_per_min: 300.0,
            peak_streams: 3000,
            hold: 180.0,
            stream_mbps: 0.132,
            cooldown: 60.0,
        }
    }
}

/// LAMA's synthesized icecast workload: listeners arrive as a Poisson
/// process at 300/min until 3,000 streams (396 Mbit/s, so more than 4
/// nodes of 100 Mbit/s), the peak is held 3 minutes, then listeners leave
/// at 300/min. Measurement noise is added by the simulator's monitor, not
/// here: this is the true demand.
pub fn lama_audio(p: &LamaAudio, step: f64, seed: u64) -> Workload {
    let mut rng = Rng::new(seed, 0x1a4a);
    let per_step = p.rate_per_min / 60.0 * step;
    let mut streams: u64 = 0;
    let mut demand = Vec::new();
    let mut t = 0.0;
    let mut phase = 0; // 0 warmup, 1 ramp up, 2 hold, 3 ramp down, 4 cooldown
    let mut phase_start = 0.0;
    loop {
        match phase {
            0 if t >= p.warmup => {
                phase = 1;
            }
            1 => {
                streams = (streams + rng.poisson(per_step)).min(p.peak_streams);
                if streams == p.peak_streams {
                    phase = 2;
                    phase_start = t;
                }
            }
            2 if t - phase_start >= p.hold => {
                phase = 3;
            }
            3 => {
                streams = streams.saturating_sub(rng.poisson(per_step));
                if streams == 0 {
                    phase = 4;
                    phase_start = t;
                }
            }
            4 if t - phase_start >= p.cooldown => break,
            _ => {}
        }
        demand.push(streams as f64 * p.stream_mbps);
        t += step;
        if demand.len() > 10_000_000 {
            break;
        }
    }
    Workload {
        name: "lama-audio".into(),
        step,
        demand,
        season: None,
        unit: UNIT,
    }
}

/// Seconds of simulated time per compressed day of the diurnal workload.
pub const DIURNAL_DAY: f64 = 3600.0;

/// Three days of web traffic, each compressed into an hour (a simulated
/// hour lasts 150 s): a night trough at 15 % of the peak, a late-morning
/// rise to a lunchtime plateau and an evening peak (peak ~1,000 Mbit/s, ten
/// nodes), day-to-day level changes of ~5 %, correlated short-term noise
/// of ~4 %, and flash crowds (about three a day, +20..60 % rising over 30 s
/// and decaying over a few minutes).
pub fn diurnal(step: f64, seed: u64) -> Workload {
    let mut rng = Rng::new(seed, 0xd1a1);
    let days = 3;
    let n = (f64::from(days) * DIURNAL_DAY / step).round() as usize;
    let bump = |h: f64, centre: f64, width: f64| {
        // Periodic over 24 h so midnight joins up.
        let d = (h - centre + 12.0).rem_euclid(24.0) - 12.0;
        (-0.5 * (d / width).powi(2)).exp()
    };
    let shape = |h: f64| 0.15 + 0.6 * bump(h, 13.0, 3.0) + 0.5 * bump(h, 20.5, 1.8);
    let peak = (0..240)
        .map(|i| shape(f64::from(i) / 10.0))
        .fold(0.0, f64::max);
    let level: Vec<f64> = (0..days).map(|_| 1.0 + 0.05 * rng.normal()).collect();
    let mut noise = 0.0;
    let phi: f64 = 0.9;
    let innov = 0.04 * (1.0 - phi * phi).sqrt();
    let bursts_per_step = 3.0 / (DIURNAL_DAY / step);
    let mut bursts: Vec<(f64, f64, f64)> = Vec::new(); // start, size, decay
    let mut demand = Vec::with_capacity(n);
    for i in 0..n {
        let t = i as f64 * step;
        let day = ((t / DIURNAL_DAY) as usize).min(level.len() - 1);
        let h = (t % DIURNAL_DAY) / DIURNAL_DAY * 24.0;
        noise = phi * noise + innov * rng.normal();
        if rng.uniform() < bursts_per_step {
            bursts.push((t, 0.2 + 0.4 * rng.uniform(), 120.0 + 180.0 * rng.uniform()));
        }
        let base = 1000.0 * level[day] * shape(h) / peak;
        let burst: f64 = bursts
            .iter()
            .map(|&(s, size, decay)| {
                let age = t - s;
                let rise = (age / 30.0).min(1.0);
                let fall = if age > 30.0 {
                    (-(age - 30.0) / decay).exp()
                } else {
                    1.0
                };
                size * rise * fall
            })
            .sum();
        bursts.retain(|&(s, _, decay)| t - s < 30.0 + 8.0 * decay);
        demand.push((base * (1.0 + noise + burst)).max(0.0));
    }
    Workload {
        name: "diurnal".into(),
        step,
        demand,
        season: Some(DIURNAL_DAY),
        unit: UNIT,
    }
}

/// Two hours of a quiet service (~150 Mbit/s with 5 % noise) hit by about
/// four flash crowds: demand jumps to 4-8 times the base within 20 s, holds
/// 2-5 minutes and decays over ~5 minutes. No forecaster sees a crowd
/// coming; what matters is how fast a policy reacts and how soon it lets go.
pub fn flash_crowd(step: f64, seed: u64) -> Workload {
    let mut rng = Rng::new(seed, 0xf1a5);
    let n = (7200.0 / step).round() as usize;
    let base = 150.0;
    let mut crowds: Vec<(f64, f64, f64)> = Vec::new(); // start, size, hold
    let mut t = 300.0 + 600.0 * rng.uniform();
    while t < 6600.0 {
        crowds.push((t, 3.0 + 4.0 * rng.uniform(), 120.0 + 180.0 * rng.uniform()));
        t += 1200.0 + 1200.0 * rng.uniform();
    }
    let demand = (0..n)
        .map(|i| {
            let t = i as f64 * step;
            let surge: f64 = crowds
                .iter()
                .map(|&(s, size, hold)| {
                    let age = t - s;
                    if age < 0.0 {
                        0.0
                    } else if age < 20.0 {
                        size * age / 20.0
                    } else if age < 20.0 + hold {
                        size
                    } else {
                        size * (-(age - 20.0 - hold) / 300.0).exp()
                    }
                })
                .sum();
            (base * (1.0 + surge) * (1.0 + 0.05 * rng.normal())).max(0.0)
        })
        .collect();
    Workload {
        name: "flash-crowd".into(),
        step,
        demand,
        season: None,
        unit: UNIT,
    }
}

/// Two hours of a 20-minute wave between ~200 and ~800 Mbit/s under heavy
/// short-term noise (AR(1), phi 0.8, 15 % of the level): a forecaster that
/// believes every sample over-reacts, one that ignores them lags.
pub fn noisy_wave(step: f64, seed: u64) -> Workload {
    let mut rng = Rng::new(seed, 0x7a7e);
    let n = (7200.0 / step).round() as usize;
    let phi: f64 = 0.8;
    let innov = 0.15 * (1.0 - phi * phi).sqrt();
    let mut noise = 0.0;
    let demand = (0..n)
        .map(|i| {
            let t = i as f64 * step;
            noise = phi * noise + innov * rng.normal();
            let wave = 500.0 - 300.0 * (std::f64::consts::TAU * t / 1200.0).cos();
            (wave * (1.0 + noise)).max(0.0)
        })
        .collect();
    Workload {
        name: "noisy-wave".into(),
        step,
        demand,
        season: None,
        unit: UNIT,
    }
}

/// A `time,demand` CSV (seconds, capacity units; the first two columns),
/// resampled onto the step grid by holding the last value. A first line that is not numeric is a
/// header; blank lines and lines starting with `#` are skipped.
pub fn csv(path: &Path, step: f64) -> anyhow::Result<Workload> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read workload file {}: {e}", path.display()))?;
    let points = parse_csv(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "csv".into());
    Ok(Workload {
        name,
        step,
        demand: resample(&points, step),
        season: None,
        unit: "capacity units",
    })
}

/// Parses `time,demand` lines; errors name the line and the fix.
pub fn parse_csv(text: &str) -> Result<Vec<(f64, f64)>, String> {
    let mut points: Vec<(f64, f64)> = Vec::new();
    let mut header_seen = false;
    for (i, raw) in text.lines().enumerate() {
        let lineno = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        // Further columns are ignored, so a per-step CSV of this
        // simulator (time,demand,...) can be replayed.
        let parsed = match fields.as_slice() {
            [t, d, ..] => t.parse::<f64>().ok().zip(d.parse::<f64>().ok()),
            _ => None,
        };
        let Some((t, d)) = parsed else {
            if points.is_empty() && !header_seen {
                header_seen = true;
                continue;
            }
            return Err(format!(
                "line {lineno}: expected `time,demand` (seconds and load, numbers), got {line:?}; fix or delete that line"
            ));
        };
        if !(t.is_finite() && d.is_finite() && d >= 0.0) {
            return Err(format!(
                "line {lineno}: time must be finite and demand finite and non-negative, got {line:?}"
            ));
        }
        if let Some(&(prev, _)) = points.last()
            && t <= prev
        {
            return Err(format!(
                "line {lineno}: time {t} does not increase (previous {prev}); sort the file by time"
            ));
        }
        points.push((t, d));
    }
    if points.len() < 2 {
        return Err("needs at least two `time,demand` lines".into());
    }
    Ok(points)
}

fn resample(points: &[(f64, f64)], step: f64) -> Vec<f64> {
    let t0 = points[0].0;
    let span = points[points.len() - 1].0 - t0;
    let n = (span / step).floor() as usize + 1;
    let mut j = 0;
    (0..n)
        .map(|i| {
            let t = t0 + i as f64 * step;
            while j + 1 < points.len() && points[j + 1].0 <= t + 1e-9 {
                j += 1;
            }
            points[j].1
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lama_audio_follows_the_paper() {
        let w = lama_audio(&LamaAudio::default(), 2.0, 1);
        let peak = w.demand.iter().cloned().fold(0.0, f64::max);
        assert!((peak - 396.0).abs() < 1e-9, "peak {peak}");
        // 3,000 streams at ~300/min: about 10 minutes up, 3 held, 10 down.
        let secs = w.demand.len() as f64 * 2.0;
        assert!((1400.0..1700.0).contains(&secs), "{secs} s");
        let held = w
            .demand
            .iter()
            .filter(|d| (**d - 396.0).abs() < 1e-9)
            .count();
        assert!((90..=92).contains(&held), "{held} steps at peak");
        assert_ne!(w.demand, lama_audio(&LamaAudio::default(), 2.0, 2).demand);
    }

    #[test]
    fn diurnal_has_a_day_shape() {
        let w = diurnal(2.0, 3);
        let day = (DIURNAL_DAY / 2.0) as usize;
        assert_eq!(w.demand.len(), 3 * day);
        let at = |h: f64| w.demand[day + (h / 24.0 * day as f64) as usize];
        assert!(at(13.0) > 3.0 * at(3.0), "{} vs {}", at(13.0), at(3.0));
    }

    #[test]
    fn csv_errors_name_the_line() {
        let e = parse_csv("time,demand\n0,1\n2,x\n").unwrap_err();
        assert!(e.contains("line 3"), "{e}");
        let e = parse_csv("0,1\n0,2\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("sort"), "{e}");
        let e = parse_csv("0,1\n2,-3\n").unwrap_err();
        assert!(e.contains("line 2"), "{e}");
        assert!(parse_csv("time,demand\n").is_err());
        let p = parse_csv("# comment\ntime,demand\n0,1\n\n3,5\n").unwrap();
        assert_eq!(p, vec![(0.0, 1.0), (3.0, 5.0)]);
        assert_eq!(resample(&p, 2.0), vec![1.0, 1.0]);
        assert_eq!(resample(&p, 1.0), vec![1.0, 1.0, 1.0, 5.0]);
    }

    #[test]
    fn workload_spec_parses() {
        assert_eq!("lama-audio".parse(), Ok(WorkloadSpec::LamaAudio));
        assert_eq!("csv:/x.csv".parse(), Ok(WorkloadSpec::Csv("/x.csv".into())));
        assert!("csv:".parse::<WorkloadSpec>().is_err());
        assert!("nope".parse::<WorkloadSpec>().is_err());
        assert_eq!("flash-crowd".parse(), Ok(WorkloadSpec::FlashCrowd));
        assert_eq!("noisy-wave".parse(), Ok(WorkloadSpec::NoisyWave));
    }

    #[test]
    fn flash_crowds_jump_and_waves_swing() {
        let w = flash_crowd(2.0, 1);
        let max = w.demand.iter().copied().fold(0.0, f64::max);
        let min = w.demand.iter().copied().fold(f64::MAX, f64::min);
        assert!(max > 4.0 * 150.0 && min < 200.0, "{min} .. {max}");
        // A crowd arrives within 20 s: some 10-step window rises by 3x.
        assert!(w.demand.windows(10).any(|x| x[9] > 3.0 * x[0]));
        let w = noisy_wave(2.0, 1);
        let mean = w.demand.iter().sum::<f64>() / w.demand.len() as f64;
        assert!((mean - 500.0).abs() < 60.0, "{mean}");
        let jumps = w
            .demand
            .windows(2)
            .filter(|x| (x[1] - x[0]).abs() > 40.0)
            .count();
        assert!(jumps > w.demand.len() / 10, "{jumps}");
    }
}
