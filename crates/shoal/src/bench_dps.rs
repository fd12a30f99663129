//! `shoal bench dps`: DPS live on one machine (thesis §5.5.4–5.5.5, notes
//! C.9). Four emulated hosts are cgroups capped at C CPUs each; a burner
//! (the thesis's `eatcpu`) books half of each; a 4-unit `shoal bsp` chain,
//! unit i doing 1/i of the work, runs one unit per host in its own cgroup.
//! Every period T each unit's CPU time and blocked time are measured, the
//! job's ledger in shoal-core moves the shares, and the new shares are
//! written as cgroup weights. The job's response time is compared across
//! static shares, the fully-distributed exchange and the bank; the cycles
//! to converge are counted. With `--migration`, two copies of the job run
//! aligned on the same hosts (fully booked, no burner), without and then
//! with migration, which moves the least-utilized unit of a bottleneck host
//! into the least-utilized host (its processes move between the host
//! cgroups: a live migration). Needs root.

use anyhow::{Context, bail};
use serde::Serialize;
use shoal_agent::dps::{EmulatedHost, UnitProbe};
use shoal_agent::platform::cgroup::{self, Version};
use shoal_core::shares::{
    Command as Cmd, Job, Mode, Placement, UnitReport, choose_migration, converged_after, settled,
};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `shoal bench dps` arguments.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Example (as root):\n  shoal bench dps --shares 0.1 --strategies static,distributed,bank --json\n  shoal bench dps --migration --json\n\nscripts/bench-dps.sh runs the sweep of docs/benchmarks.md."
)]
pub struct BenchDpsArgs {
    /// Emulated hosts (and units of the chain).
    #[arg(long, default_value_t = 4)]
    pub hosts: usize,
    /// Each emulated host's capacity C, CPUs (its cgroup's quota).
    #[arg(long, default_value_t = 0.4)]
    pub capacity: f64,
    /// The fraction of each host the burner books (the thesis's 50 %).
    #[arg(long, default_value_t = 0.5)]
    pub background: f64,
    /// Initial share per unit as fractions of C (W/N), one run each.
    #[arg(long, value_delimiter = ',', default_value = "0.1")]
    pub shares: Vec<f64>,
    /// Strategies to run at each share.
    #[arg(long, value_delimiter = ',', default_value = "static,distributed,bank")]
    pub strategies: Vec<Mode>,
    /// Iterations of the chain (several per period T, so that what a unit
    /// used in a period is not one iteration's compute or wait).
    #[arg(long, default_value_t = 100)]
    pub iterations: u64,
    /// Seconds the static run at the first share should take; sets the work.
    #[arg(long, default_value_t = 30.0)]
    pub target: f64,
    /// Reporting period T.
    #[arg(long, default_value = "1s", value_parser = shoal_core::duration::parse_positive_duration)]
    pub period: Duration,
    /// Bank period B (a multiple of T).
    #[arg(long, default_value = "1s", value_parser = shoal_core::duration::parse_positive_duration)]
    pub bank_period: Duration,
    /// Run the migration experiment (§5.5.5) instead.
    #[arg(long)]
    pub migration: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Plot into this directory (SVG, PNG).
    #[arg(long, value_name = "DIR")]
    pub plot: Option<PathBuf>,
}

/// One job's outcome in a run.
#[derive(Debug, Clone, Serialize)]
pub struct JobResult {
    /// Response time, seconds (start to the last unit's last iteration).
    pub response_s: f64,
    /// Exchange cycles until the shares stayed within 10 % of where they
    /// ended (while every unit was still running).
    pub converged_cycles: Option<usize>,
    /// Shares (CPUs) per cycle while every unit ran.
    pub shares: Vec<Vec<f64>>,
    /// What each unit used (CPUs) per cycle.
    pub used: Vec<Vec<f64>>,
    /// The bank's balance per cycle, after its payout.
    pub bank: Vec<f64>,
}

/// One run.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    /// static, distributed or bank.
    pub strategy: Mode,
    /// Initial share per unit, fraction of C.
    pub share: f64,
    /// Migration enabled.
    pub migration: bool,
    /// Each job.
    pub jobs: Vec<JobResult>,
    /// Migrations made: (job, unit, from host, to host, second).
    pub migrations: Vec<(usize, usize, usize, usize, f64)>,
    /// Longest time from a period's tick to its last cgroup write, ms.
    pub apply_ms_max: f64,
    /// Periods run.
    pub cycles: usize,
}

/// The JSON document.
#[derive(Debug, Clone, Serialize)]
pub struct Output {
    /// v1 or v2.
    pub cgroup: Version,
    /// Hosts.
    pub hosts: usize,
    /// C.
    pub capacity: f64,
    /// Burner booking, fraction of C.
    pub background: f64,
    /// Work of unit 0 per iteration, millions of multiply-adds.
    pub work: f64,
    /// Iterations.
    pub iterations: u64,
    /// T, seconds.
    pub period_s: f64,
    /// B, seconds.
    pub bank_period_s: f64,
    /// Every run.
    pub runs: Vec<RunResult>,
    /// Response-time cut of each strategy against static at the same
    /// share: 1 − t / t_static (the thesis's 38 % for the bank at 0.1).
    pub cut: Vec<(Mode, f64, f64)>,
}

struct UnitRun {
    child: Child,
    probe: UnitProbe,
    host: usize,
    done: Option<f64>,
}

struct JobSpec {
    mode: Mode,
    share: f64,
    hosts: Vec<usize>,
}

struct Bench<'a> {
    a: &'a BenchDpsArgs,
    version: Version,
    base: String,
    exe: PathBuf,
    dir: PathBuf,
    work: f64,
    cpus: usize,
}

fn free_ports(n: usize) -> anyhow::Result<Vec<std::net::SocketAddr>> {
    let ls: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()?;
    Ok(ls.iter().filter_map(|l| l.local_addr().ok()).collect())
}

impl Bench<'_> {
    fn run(&self, specs: &[JobSpec], background: f64, migrate: bool) -> anyhow::Result<RunResult> {
        let a = self.a;
        let c = a.capacity;
        // The emulated machine gets its capacity even on a busy box: its
        // top group outweighs the other work at the root (each host below
        // is capped at C, so it takes no more than hosts × C).
        let top = cgroup::CpuGroup::create(self.version, &self.base)?;
        top.set_weight(u64::MAX)?;
        let hosts: Vec<EmulatedHost> = (0..a.hosts)
            .map(|h| {
                // Hosts share the CPUs in turn (0, 1, 0, 1 ...), each
                // pinned to one so that shares divide it.
                let cpu = (h % self.cpus).to_string();
                EmulatedHost::create(
                    self.version,
                    &self.base,
                    &format!("host{h}"),
                    c,
                    background * c,
                    Some(&cpu),
                )
            })
            .collect::<anyhow::Result<_>>()?;
        let n = a.hosts;
        let mut jobs: Vec<Job> = Vec::new();
        let mut units: Vec<Vec<UnitRun>> = Vec::new();
        for (j, spec) in specs.iter().enumerate() {
            let w = spec.share * c;
            jobs.push(Job::new(n, w * n as f64, spec.mode)?);
            let peers = free_ports(n)?;
            let list = peers
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(",");
            let mut us = Vec::new();
            for i in 0..n {
                let status = self.dir.join(format!("job{j}-unit{i}.json"));
                let _ = std::fs::remove_file(&status);
                let group = hosts[spec.hosts[i]].unit_group(&format!("job{j}-unit{i}"))?;
                group.set_share(w)?;
                let child = Command::new(&self.exe)
                    .args(["bsp", "--index", &i.to_string(), "--peers", &list])
                    .args(["--iterations", &a.iterations.to_string()])
                    .args(["--work", &format!("{:.3}", self.work)])
                    .arg("--status")
                    .arg(&status)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::inherit())
                    .spawn()
                    .context("starting a shoal bsp unit")?;
                group.add(child.id())?;
                us.push(UnitRun {
                    child,
                    probe: UnitProbe::new(group, Some(status))?,
                    host: spec.hosts[i],
                    done: None,
                });
            }
            units.push(us);
        }
        let start = Instant::now();
        let t = a.period;
        let bank_every = ((a.bank_period.as_secs_f64() / t.as_secs_f64()).round() as usize).max(1);
        let mut shares: Vec<Vec<Vec<f64>>> = vec![Vec::new(); specs.len()];
        let mut used: Vec<Vec<Vec<f64>>> = vec![Vec::new(); specs.len()];
        let mut bank: Vec<Vec<f64>> = vec![Vec::new(); specs.len()];
        let mut migrations = Vec::new();
        let mut moved_at: Vec<Vec<f64>> = vec![vec![f64::NEG_INFINITY; n]; specs.len()];
        let mut host_usage: Vec<Duration> = hosts
            .iter()
            .map(|h| h.usage().unwrap_or_default())
            .collect();
        let mut apply_ms_max = 0.0f64;
        let mut cycle = 0usize;
        let deadline = Duration::from_secs_f64(a.target * 6.0 + 30.0);
        loop {
            let tick = start + t * (cycle as u32 + 1);
            // Exits are noticed within 20 ms, not at the next period.
            let mut all_done = false;
            while !all_done {
                all_done = true;
                for us in units.iter_mut() {
                    for u in us.iter_mut() {
                        if u.done.is_none() && u.child.try_wait()?.is_some() {
                            u.done = Some(start.elapsed().as_secs_f64());
                        }
                        all_done &= u.done.is_some();
                    }
                }
                let left = tick.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                std::thread::sleep(left.min(Duration::from_millis(20)));
            }
            if all_done {
                break;
            }
            cycle += 1;
            let now_s = start.elapsed().as_secs_f64();
            if start.elapsed() > deadline {
                bail!("the run did not finish in {deadline:?}; is the machine overloaded?");
            }
            // Host utilization over the period (everything in the host).
            let host_util: Vec<f64> = hosts
                .iter()
                .enumerate()
                .map(|(h, host)| {
                    let now = host.usage().unwrap_or_default();
                    let d = now.saturating_sub(host_usage[h]).as_secs_f64();
                    host_usage[h] = now;
                    d / (t.as_secs_f64() * c)
                })
                .collect();
            let mut free: Vec<f64> = hosts.iter().map(|h| h.capacity - h.background).collect();
            for (j, us) in units.iter().enumerate() {
                for (i, u) in us.iter().enumerate() {
                    free[u.host] -= jobs[j].enforced(i);
                }
            }
            let mut placements = Vec::new();
            let mut bottlenecks = Vec::new();
            for (j, us) in units.iter_mut().enumerate() {
                let mut reports = Vec::new();
                let running = us.iter().all(|u| u.done.is_none());
                let mut used_now = Vec::new();
                for (i, u) in us.iter_mut().enumerate() {
                    let s = u.probe.sample()?;
                    used_now.push(s.used);
                    placements.push(Placement {
                        unit: (j, i),
                        host: u.host,
                        // In fractions of C, as the hosts' utilization.
                        used: s.used / c,
                    });
                    if u.done.is_none() {
                        reports.push((
                            i,
                            UnitReport {
                                used: s.used,
                                upstream: s.upstream,
                                host_free: 0.0,
                                cap: c.min(1.0),
                            },
                        ));
                    }
                }
                let host_of: Vec<usize> = us.iter().map(|u| u.host).collect();
                let cmds = jobs[j].step(
                    &reports,
                    &host_of,
                    &mut free,
                    cycle.is_multiple_of(bank_every),
                );
                for cmd in cmds {
                    match cmd {
                        Cmd::SetShare { unit, share } => us[unit].probe.group().set_share(share)?,
                        Cmd::Bottleneck { unit } => bottlenecks.push(us[unit].host),
                        Cmd::Offer(_) => {}
                    }
                }
                if running {
                    shares[j].push((0..n).map(|i| jobs[j].enforced(i)).collect());
                    used[j].push(used_now);
                    bank[j].push(jobs[j].bank());
                }
            }
            apply_ms_max = apply_ms_max.max(tick.elapsed().as_secs_f64() * 1e3);
            if migrate {
                bottlenecks.sort_unstable();
                bottlenecks.dedup();
                let hosts_util: Vec<(usize, f64)> = host_util.iter().copied().enumerate().collect();
                for b in bottlenecks {
                    let cands: Vec<Placement<(usize, usize), usize>> = placements
                        .iter()
                        .filter(|p| {
                            settled(moved_at[p.unit.0][p.unit.1], now_s, t.as_secs_f64())
                                && units[p.unit.0][p.unit.1].done.is_none()
                        })
                        .cloned()
                        .collect();
                    if let Some(((j, i), to)) =
                        choose_migration(&b, &cands, &hosts_util, |_, _| false)
                    {
                        let g = hosts[to].unit_group(&format!("job{j}-unit{i}"))?;
                        g.set_share(jobs[j].enforced(i))?;
                        units[j][i].probe.move_to(g)?;
                        migrations.push((j, i, units[j][i].host, to, now_s));
                        units[j][i].host = to;
                        moved_at[j][i] = now_s;
                        jobs[j].moved(i);
                        // One move per period: let the hosts settle.
                        break;
                    }
                }
            }
        }
        let jobs_out = units
            .iter()
            .enumerate()
            .map(|(j, us)| JobResult {
                response_s: us.iter().filter_map(|u| u.done).fold(0.0, f64::max),
                converged_cycles: converged_after(&shares[j], 0.1),
                shares: shares[j].clone(),
                used: used[j].clone(),
                bank: bank[j].clone(),
            })
            .collect();
        // Units' groups go before their hosts'.
        drop(units);
        drop(hosts);
        drop(top);
        cgroup::remove_tree(self.version, &self.base);
        Ok(RunResult {
            strategy: specs[0].mode,
            share: specs[0].share,
            migration: migrate,
            jobs: jobs_out,
            migrations,
            apply_ms_max,
            cycles: cycle,
        })
    }
}

/// Trees of earlier runs that were killed (`shoal-dps-PID` whose PID is
/// gone): their burners and units are ours to end, their cgroups to remove.
fn remove_stale(version: Version) {
    let root = match version {
        Version::V2 => PathBuf::from("/sys/fs/cgroup"),
        Version::V1 => PathBuf::from("/sys/fs/cgroup/cpu"),
    };
    let Ok(rd) = std::fs::read_dir(&root) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(rest) = name.strip_prefix("shoal-dps-") else {
            continue;
        };
        let pid = rest.trim_end_matches("-ctl");
        if pid.parse::<u32>().is_err() || std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        fn procs(d: &std::path::Path, out: &mut Vec<i32>) {
            if let Ok(s) = std::fs::read_to_string(d.join("cgroup.procs")) {
                out.extend(s.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
            if let Ok(rd) = std::fs::read_dir(d) {
                for e in rd.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        procs(&e.path(), out);
                    }
                }
            }
        }
        let mut pids = Vec::new();
        procs(&e.path(), &mut pids);
        for p in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(Duration::from_millis(100));
        cgroup::remove_tree(version, &name);
        eprintln!("removed the cgroups of an earlier, killed run: {name}");
    }
}

/// Millions of multiply-adds per CPU-second on this machine.
fn calibrate() -> f64 {
    let t = Instant::now();
    std::hint::black_box(shoal_agent::bsp::compute(20.0));
    20.0 / t.elapsed().as_secs_f64().max(1e-6)
}

/// Runs the benchmark.
pub fn run(a: BenchDpsArgs) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("shoal bench dps needs root (it creates cgroups): run it with sudo");
    }
    if a.hosts < 2 {
        bail!("--hosts must be at least 2 (a chain of one unit has no exchange)");
    }
    if !(a.capacity > 0.0 && a.capacity.is_finite()) {
        bail!("--capacity must be a positive number of CPUs, e.g. 0.4");
    }
    if !(0.0..1.0).contains(&a.background) {
        bail!("--background must be a fraction of C in [0, 1), e.g. 0.5");
    }
    if a.shares.is_empty()
        || a.shares
            .iter()
            .any(|s| !(*s > 0.0 && s + a.background <= 1.0 + 1e-9))
    {
        bail!(
            "--shares must be fractions of C above 0 that fit beside the burner ({}), e.g. 0.1,0.2,0.3",
            a.background
        );
    }
    let version = cgroup::detect()?;
    remove_stale(version);
    let exe = std::env::current_exe()?;
    let tmp = tempfile::tempdir()?;
    let n = a.hosts;
    // Unit 0 never waits: with static shares it gets w/(w + background) of
    // C; size the work so that run takes about --target seconds.
    let base = format!("shoal-dps-{}", std::process::id());
    // This process (the measuring and the calibration) runs with the
    // emulated machine's weight, so a busy box does not delay its periods;
    // dropping the group at the end moves it back to the root.
    let ctl = cgroup::CpuGroup::create(version, &format!("{base}-ctl"))?;
    ctl.set_weight(u64::MAX)?;
    ctl.add(std::process::id())?;
    let mops = calibrate();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu0 = if a.migration {
        // Both jobs' first units share host 0.
        a.capacity / 2.0
    } else {
        a.capacity * a.shares[0] / (a.shares[0] + a.background)
    };
    let work = mops * cpu0 * a.target / a.iterations as f64;
    let bench = Bench {
        a: &a,
        version,
        base,
        exe,
        dir: tmp.path().to_path_buf(),
        work,
        cpus,
    };
    let mut runs = Vec::new();
    let mut cut = Vec::new();
    let say = |s: String| {
        if !a.json {
            eprintln!("{s}");
        }
    };
    if a.migration {
        // Two copies aligned on the same hosts, fully booked (2 × C/2).
        for migrate in [false, true] {
            let specs: Vec<JobSpec> = (0..2)
                .map(|_| JobSpec {
                    mode: Mode::Bank,
                    share: 0.5,
                    hosts: (0..n).collect(),
                })
                .collect();
            say(format!("two aligned jobs, migration {migrate} ..."));
            let r = bench.run(&specs, 0.0, migrate)?;
            say(format!(
                "  times {:?} s, migrations {:?}",
                r.jobs
                    .iter()
                    .map(|j| (j.response_s * 10.0).round() / 10.0)
                    .collect::<Vec<_>>(),
                r.migrations
            ));
            runs.push(r);
        }
    } else {
        for &share in &a.shares {
            let mut static_t = None;
            for &mode in &a.strategies {
                say(format!("share {share} of C, {mode} ..."));
                let r = bench.run(
                    &[JobSpec {
                        mode,
                        share,
                        hosts: (0..n).collect(),
                    }],
                    a.background,
                    false,
                )?;
                let t = r.jobs[0].response_s;
                say(format!(
                    "  {t:.1} s, converged after {:?} cycles, apply {:.2} ms max",
                    r.jobs[0].converged_cycles, r.apply_ms_max
                ));
                if mode == Mode::Static {
                    static_t = Some(t);
                } else if let Some(s) = static_t {
                    cut.push((mode, share, 1.0 - t / s));
                }
                runs.push(r);
            }
        }
    }
    let out = Output {
        cgroup: version,
        hosts: n,
        capacity: a.capacity,
        background: a.background,
        work,
        iterations: a.iterations,
        period_s: a.period.as_secs_f64(),
        bank_period_s: a.bank_period.as_secs_f64(),
        runs,
        cut,
    };
    drop(ctl);
    if let Some(dir) = &a.plot {
        plot(dir, &out)?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for (m, s, c) in &out.cut {
            println!(
                "{m} at share {s}: response time cut {:.1} % against static",
                c * 100.0
            );
        }
    }
    Ok(())
}

fn plot(dir: &std::path::Path, out: &Output) -> anyhow::Result<()> {
    use shoal_sim::chart::{Series, log_lines};
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    if out.runs.iter().any(|r| r.migration) {
        return Ok(());
    }
    // Response time against the share (Fig. 5.7), per strategy.
    let mut series = Vec::new();
    for m in [Mode::Static, Mode::Distributed, Mode::Bank] {
        let points: Vec<(f64, f64)> = out
            .runs
            .iter()
            .filter(|r| r.strategy == m)
            .map(|r| (r.share, r.jobs[0].response_s))
            .collect();
        if !points.is_empty() {
            series.push(Series {
                label: format!("{m}"),
                points,
                dashed: m == Mode::Static,
            });
        }
    }
    log_lines(
        &dir.join("dps-live"),
        "4-unit chain on 4 emulated hosts, burner at 50 % (live)",
        "initial share per unit, fraction of C",
        "response time, s (log)",
        &series,
        None,
    )?;
    // The shares of the first bank run per cycle (Fig. 5.8).
    if let Some(r) = out.runs.iter().find(|r| r.strategy == Mode::Bank) {
        let shares = &r.jobs[0].shares;
        let series: Vec<Series> = (0..out.hosts)
            .map(|i| Series {
                label: format!("unit {}", i + 1),
                points: shares
                    .iter()
                    .enumerate()
                    .map(|(k, v)| (k as f64 + 1.0, v[i].max(1e-3)))
                    .collect(),
                dashed: false,
            })
            .collect();
        log_lines(
            &dir.join("dps-live-shares"),
            &format!("bank: shares per cycle at initial share {} (live)", r.share),
            "exchange cycle",
            "share, CPUs (log)",
            &series,
            None,
        )?;
    }
    Ok(())
}
