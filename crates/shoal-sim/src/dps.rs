//! `shoal sim dps`: DPS (thesis ch. 5, §5.5.6) on a virtual clock. H hosts
//! of one CPU each run N instances of an H-unit BSP program, one unit of
//! every instance per host; per iteration each unit computes its demand
//! (drawn once per unit from U[10, 100] ms) and then waits for every other
//! unit of its instance. A host is a work-conserving proportional-share
//! scheduler ([`shoal_core::shares::proportional`]); every period T each
//! unit reports what it used and whom it waited for, and the job's ledger
//! ([`shoal_core::shares::Job::step`], the same code as the live bench and
//! the manager's banker) moves the shares. With `--booking full` each unit
//! starts at 1/N (hosts fully booked) and a bottleneck host's
//! least-utilized unit is migrated to the least-utilized host
//! ([`shoal_core::shares::choose_migration`]).

use serde::Serialize;
use shoal_core::shares::{
    Command, EPS, Job, Mode, Placement, UnitReport, choose_migration, proportional, settled,
};
use std::path::PathBuf;

/// How the hosts are booked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Booking {
    /// Every unit starts at `--share` (Fig. 5.9: 0.1, N/10 booked).
    Share,
    /// Every unit starts at 1/N: hosts fully booked; bottlenecks migrate
    /// (Fig. 5.10).
    Full,
}

/// Arguments of `shoal sim dps`.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Examples:\n  shoal sim dps --hosts 16 --instances 1,2,4,8,10,11,12,16,17 --json\n  shoal sim dps --hosts 16 --instances 1,2,3,4,6,8 --booking full --out /tmp/dps"
)]
pub struct DpsArgs {
    /// Hosts (and units per program instance).
    #[arg(long, default_value_t = 16)]
    pub hosts: usize,
    /// Numbers of program instances to run, one simulation each.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,2,4,6,8,9,10,11,12,14,16,17"
    )]
    pub instances: Vec<usize>,
    /// Initial shares.
    #[arg(long, value_enum, default_value = "share")]
    pub booking: Booking,
    /// Each unit's share with `--booking share`, CPUs.
    #[arg(long, default_value_t = 0.1)]
    pub share: f64,
    /// The DPS strategy compared against static shares.
    #[arg(long, default_value = "bank")]
    pub strategy: Mode,
    /// Iterations of every instance.
    #[arg(long, default_value_t = 200)]
    pub iterations: u64,
    /// Reporting (and bank) period T, milliseconds of virtual time.
    #[arg(long, default_value_t = 1000.0)]
    pub period_ms: f64,
    /// Seed of the demands.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Write dps-BOOKING.json and a plot (SVG, PNG) into DIR.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// One simulated run.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// Program instances.
    pub instances: usize,
    /// static, distributed or bank.
    pub strategy: Mode,
    /// Mean response time of the instances, virtual seconds.
    pub response_time: f64,
    /// Response time over that of one instance alone with static shares.
    pub normalized: f64,
    /// Static response time over this one, minus 1 (0 for static).
    pub speedup: f64,
    /// Migrations made.
    pub migrations: usize,
    /// Mean CPU utilization of the hosts over the run.
    pub utilization: f64,
}

/// The JSON document.
#[derive(Debug, Clone, Serialize)]
pub struct Output {
    /// Hosts.
    pub hosts: usize,
    /// Booking.
    pub booking: Booking,
    /// Seed.
    pub seed: u64,
    /// Iterations per instance.
    pub iterations: u64,
    /// Period, ms.
    pub period_ms: f64,
    /// Every run, static first for each N.
    pub runs: Vec<Run>,
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[derive(Debug, Clone)]
struct Unit {
    host: usize,
    demand_ms: f64,
    remaining: f64,
    /// Iterations finished.
    done: u64,
    used_ms: f64,
    waited_on: Vec<usize>,
    moved_at: f64,
    /// Finished this iteration's computation; waiting at the barrier.
    waiting: bool,
    finished_at: f64,
}

struct Sim {
    hosts: usize,
    iterations: u64,
    units: Vec<Vec<Unit>>,
    jobs: Vec<Job>,
    finished: Vec<Option<f64>>,
    now: f64,
    busy_ms: f64,
    migrations: usize,
}

/// One simulation: `n` instances under `mode`.
fn simulate(a: &DpsArgs, n: usize, mode: Mode) -> anyhow::Result<(f64, usize, f64)> {
    let h = a.hosts;
    let mut rng = a.seed ^ 0x05A1_7D95;
    let share = match a.booking {
        Booking::Share => a.share,
        Booking::Full => 1.0 / n as f64,
    };
    let mut units = Vec::new();
    let mut jobs = Vec::new();
    for _ in 0..n {
        let us: Vec<Unit> = (0..h)
            .map(|host| {
                let d = 10.0 + 90.0 * (splitmix(&mut rng) >> 11) as f64 / (1u64 << 53) as f64;
                Unit {
                    host,
                    demand_ms: d,
                    remaining: d,
                    done: 0,
                    used_ms: 0.0,
                    waited_on: Vec::new(),
                    moved_at: f64::NEG_INFINITY,
                    waiting: false,
                    finished_at: 0.0,
                }
            })
            .collect();
        units.push(us);
        jobs.push(Job::new(h, share * h as f64, mode)?);
    }
    let mut s = Sim {
        hosts: h,
        iterations: a.iterations,
        units,
        jobs,
        finished: vec![None; n],
        now: 0.0,
        busy_ms: 0.0,
        migrations: 0,
    };
    let mut next_period = a.period_ms;
    // Safety bound: nothing runs slower than every unit alone on one host.
    let limit = 1e3 * a.iterations as f64 * 100.0 * (n * h) as f64;
    while s.finished.iter().any(Option::is_none) {
        anyhow::ensure!(s.now < limit, "simulation did not finish (a bug)");
        let rates = s.rates();
        // The next event: a unit finishing its computation, or the period.
        let mut dt = next_period - s.now;
        for (i, us) in s.units.iter().enumerate() {
            for (u, unit) in us.iter().enumerate() {
                let r = rates[i][u];
                if r > EPS {
                    dt = dt.min(unit.remaining / r);
                }
            }
        }
        let dt = dt.max(0.0);
        s.now += dt;
        for (i, us) in s.units.iter_mut().enumerate() {
            for (u, unit) in us.iter_mut().enumerate() {
                let r = rates[i][u];
                unit.remaining -= r * dt;
                unit.used_ms += r * dt;
                s.busy_ms += r * dt;
            }
        }
        s.finish_iterations();
        if s.now + 1e-9 >= next_period {
            s.period(a, mode);
            next_period += a.period_ms;
        }
    }
    let mean = s.finished.iter().map(|f| f.unwrap_or(0.0)).sum::<f64>() / n as f64 / 1e3;
    let util = s.busy_ms / (s.now * h as f64).max(EPS);
    Ok((mean, s.migrations, util))
}

impl Sim {
    /// CPU each computing unit gets now, per host, in proportion to the
    /// shares enforced.
    fn rates(&self) -> Vec<Vec<f64>> {
        let mut rates: Vec<Vec<f64>> = self.units.iter().map(|us| vec![0.0; us.len()]).collect();
        let mut on: Vec<Vec<(usize, usize)>> = vec![Vec::new(); self.hosts];
        for (i, us) in self.units.iter().enumerate() {
            for (u, unit) in us.iter().enumerate() {
                if !unit.waiting && unit.remaining > EPS && self.finished[i].is_none() {
                    on[unit.host].push((i, u));
                }
            }
        }
        for list in on {
            let w: Vec<(f64, f64)> = list
                .iter()
                .map(|&(i, u)| (self.jobs[i].enforced(u).max(1e-4), 1.0))
                .collect();
            for (k, got) in proportional(1.0, &w).into_iter().enumerate() {
                let (i, u) = list[k];
                rates[i][u] = got;
            }
        }
        rates
    }

    /// Barriers: an instance whose units all finished iteration k starts
    /// k+1; the unit that finished last held the others up.
    fn finish_iterations(&mut self) {
        let now = self.now;
        for i in 0..self.units.len() {
            if self.finished[i].is_some() {
                continue;
            }
            let us = &mut self.units[i];
            for unit in us.iter_mut() {
                if !unit.waiting && unit.remaining <= 1e-9 {
                    unit.waiting = true;
                    unit.finished_at = now;
                }
            }
            if us.iter().all(|u| u.waiting) {
                let last = (0..us.len())
                    .max_by(|&a, &b| {
                        us[a]
                            .finished_at
                            .total_cmp(&us[b].finished_at)
                            .then(us[a].demand_ms.total_cmp(&us[b].demand_ms))
                    })
                    .unwrap_or(0);
                for (u, unit) in us.iter_mut().enumerate() {
                    unit.done += 1;
                    if u != last && unit.finished_at < now {
                        unit.waited_on.push(last);
                    }
                    unit.remaining = unit.demand_ms;
                    unit.waiting = false;
                }
                if us[0].done >= self.iterations {
                    self.finished[i] = Some(now);
                    for unit in us.iter_mut() {
                        unit.remaining = 0.0;
                    }
                }
            }
        }
    }

    fn period(&mut self, a: &DpsArgs, mode: Mode) {
        let t = a.period_ms;
        // Host room: capacity less every enforced share on it.
        let mut free = vec![1.0; self.hosts];
        for (i, us) in self.units.iter().enumerate() {
            if self.finished[i].is_some() {
                continue;
            }
            for (u, unit) in us.iter().enumerate() {
                free[unit.host] -= self.jobs[i].enforced(u);
            }
        }
        let mut host_used = vec![0.0; self.hosts];
        let mut placements = Vec::new();
        for us in &self.units {
            for unit in us {
                host_used[unit.host] += unit.used_ms / t;
            }
        }
        let mut bottlenecks = Vec::new();
        for i in 0..self.units.len() {
            if self.finished[i].is_some() {
                continue;
            }
            let reports: Vec<(usize, UnitReport)> = self.units[i]
                .iter_mut()
                .enumerate()
                .map(|(u, unit)| {
                    let r = UnitReport {
                        used: unit.used_ms / t,
                        upstream: std::mem::take(&mut unit.waited_on),
                        host_free: 0.0,
                        cap: 1.0,
                    };
                    (u, r)
                })
                .collect();
            for (u, unit) in self.units[i].iter().enumerate() {
                placements.push(Placement {
                    unit: (i, u),
                    host: unit.host,
                    used: unit.used_ms / t,
                });
            }
            let host_of: Vec<usize> = self.units[i].iter().map(|u| u.host).collect();
            if mode != Mode::Static {
                for c in self.jobs[i].step(&reports, &host_of, &mut free, true) {
                    if let Command::Bottleneck { unit } = c {
                        bottlenecks.push(self.units[i][unit].host);
                    }
                }
            }
        }
        for us in &mut self.units {
            for unit in us.iter_mut() {
                unit.used_ms = 0.0;
            }
        }
        if a.booking != Booking::Full || mode == Mode::Static {
            return;
        }
        // Migration: at most one unit per bottleneck host per period, and a
        // unit moved stays for a few periods (no thrashing).
        bottlenecks.sort_unstable();
        bottlenecks.dedup();
        let mut hosts: Vec<(usize, f64)> = host_used.iter().copied().enumerate().collect();
        for b in bottlenecks {
            let cands: Vec<Placement<(usize, usize), usize>> = placements
                .iter()
                .filter(|p| settled(self.units[p.unit.0][p.unit.1].moved_at, self.now, t))
                .cloned()
                .collect();
            if let Some(((i, u), to)) = choose_migration(&b, &cands, &hosts, |_, _| false) {
                let used = placements
                    .iter()
                    .find(|p| p.unit == (i, u))
                    .map_or(0.0, |p| p.used);
                hosts[b].1 -= used;
                hosts[to].1 += used;
                for p in placements.iter_mut().filter(|p| p.unit == (i, u)) {
                    p.host = to;
                }
                let unit = &mut self.units[i][u];
                unit.host = to;
                unit.moved_at = self.now;
                self.jobs[i].moved(u);
                self.migrations += 1;
            }
        }
    }
}

/// Runs every N with static shares and the strategy.
pub fn compute(a: &DpsArgs) -> anyhow::Result<Output> {
    anyhow::ensure!(a.hosts >= 1, "--hosts must be at least 1");
    anyhow::ensure!(
        !a.instances.is_empty() && a.instances.iter().all(|&n| n >= 1),
        "--instances must list numbers of instances >= 1, e.g. 1,2,4,8"
    );
    anyhow::ensure!(
        a.share.is_finite() && a.share > 0.0 && a.share <= 1.0,
        "--share must be in (0, 1] CPUs, got {}",
        a.share
    );
    anyhow::ensure!(
        a.period_ms.is_finite() && a.period_ms > 0.0,
        "--period-ms must be a positive number of milliseconds"
    );
    anyhow::ensure!(a.iterations >= 1, "--iterations must be at least 1");
    let (base, _, _) = simulate(a, 1, Mode::Static)?;
    let mut runs = Vec::new();
    for &n in &a.instances {
        let (st, _, su) = simulate(a, n, Mode::Static)?;
        runs.push(Run {
            instances: n,
            strategy: Mode::Static,
            response_time: st,
            normalized: st / base,
            speedup: 0.0,
            migrations: 0,
            utilization: su,
        });
        if a.strategy != Mode::Static {
            let (t, m, u) = simulate(a, n, a.strategy)?;
            runs.push(Run {
                instances: n,
                strategy: a.strategy,
                response_time: t,
                normalized: t / base,
                speedup: st / t - 1.0,
                migrations: m,
                utilization: u,
            });
        }
    }
    Ok(Output {
        hosts: a.hosts,
        booking: a.booking,
        seed: a.seed,
        iterations: a.iterations,
        period_ms: a.period_ms,
        runs,
    })
}

/// `shoal sim dps`.
pub fn run(a: &DpsArgs) -> anyhow::Result<()> {
    let out = compute(a)?;
    if let Some(dir) = &a.out {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cannot create --out {}: {e}", dir.display()))?;
        let name = match a.booking {
            Booking::Share => "dps-share",
            Booking::Full => "dps-full",
        };
        std::fs::write(
            dir.join(format!("{name}.json")),
            serde_json::to_vec_pretty(&out)?,
        )?;
        let series = |m: Mode| crate::chart::Series {
            label: format!("{m} shares"),
            points: out
                .runs
                .iter()
                .filter(|r| r.strategy == m)
                .map(|r| (r.instances as f64, r.normalized))
                .collect(),
            dashed: m == Mode::Static,
        };
        let caption = match a.booking {
            Booking::Share => format!(
                "DPS, {} hosts, share {} (Fig. 5.9), simulated",
                a.hosts, a.share
            ),
            Booking::Full => format!(
                "DPS, {} hosts fully booked, migration (Fig. 5.10), simulated",
                a.hosts
            ),
        };
        crate::chart::log_lines(
            &dir.join(name),
            &caption,
            "program instances N",
            "response time / one instance alone",
            &[series(Mode::Static), series(a.strategy)],
            None,
        )?;
    }
    if a.json {
        println!("{}", serde_json::to_string(&out)?);
        return Ok(());
    }
    println!(
        "{:>9} {:>12} {:>14} {:>11} {:>9} {:>11}",
        "instances", "strategy", "response (s)", "normalized", "speed-up", "migrations"
    );
    for r in &out.runs {
        println!(
            "{:>9} {:>12} {:>14.2} {:>11.2} {:>8.1}% {:>11}",
            r.instances,
            r.strategy.to_string(),
            r.response_time,
            r.normalized,
            r.speedup * 100.0,
            r.migrations
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(booking: Booking, instances: Vec<usize>) -> DpsArgs {
        DpsArgs {
            hosts: 8,
            instances,
            booking,
            share: 0.1,
            strategy: Mode::Bank,
            iterations: 40,
            period_ms: 500.0,
            seed: 3,
            json: true,
            out: None,
        }
    }

    #[test]
    fn one_instance_alone_runs_at_its_slowest_unit() {
        let a = args(Booking::Share, vec![1]);
        let (t, _, _) = simulate(&a, 1, Mode::Static).unwrap();
        // A dedicated host per unit: every iteration takes the largest demand.
        let mut rng = a.seed ^ 0x05A1_7D95;
        let max = (0..a.hosts)
            .map(|_| 10.0 + 90.0 * (splitmix(&mut rng) >> 11) as f64 / (1u64 << 53) as f64)
            .fold(0.0, f64::max);
        assert!((t - max * 40.0 / 1e3).abs() < 1e-6, "{t} vs {max}");
    }

    #[test]
    fn the_json_has_the_documented_keys_and_is_seeded() {
        let a = args(Booking::Share, vec![2, 4]);
        let o = compute(&a).unwrap();
        let v = serde_json::to_value(&o).unwrap();
        for r in v["runs"].as_array().unwrap() {
            for k in ["instances", "strategy", "response_time", "speedup"] {
                assert!(!r[k].is_null(), "{k} missing in {r}");
            }
        }
        let again = serde_json::to_value(compute(&a).unwrap()).unwrap();
        assert_eq!(v, again);
    }

    #[test]
    fn full_booking_migrates_and_finishes() {
        let o = compute(&args(Booking::Full, vec![3])).unwrap();
        assert!(o.runs.iter().all(|r| r.response_time > 0.0));
    }

    #[test]
    fn bad_arguments_name_the_flag() {
        let mut a = args(Booking::Share, vec![]);
        assert!(compute(&a).unwrap_err().to_string().contains("--instances"));
        a.instances = vec![1];
        a.share = 2.0;
        assert!(compute(&a).unwrap_err().to_string().contains("--share"));
    }
}
