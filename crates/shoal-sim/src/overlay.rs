//! `shoal sim overlay`: SMON's self-deployment (section IV) at thousands of
//! hosts on a virtual clock, driving [`shoal_core::overlay::Peer`], the step
//! the live overlay runs. The simulator only plays the world: a ping reaches
//! its target at once and is answered if a peer runs there; a contact finds
//! the host installed or not; a deployment takes the host's deploy time,
//! and the first copy to finish installs and starts the peer while the
//! others find it running and abort (the install lock), as the paper's
//! duplicate deployments.
//!
//! Two models, as notes/smon.md §7 item 17 explains:
//! - asynchronous (the live one): each peer pings once per interval at its
//!   own phase, a new peer starts at a random phase. It gives the deployed
//!   fraction against `Y_r`, the rounds to 50 %, 99 % and all, the ping load,
//!   and with `--deploy-time` the deployments-per-node histogram (Table II);
//! - synchronous rounds with instantaneous deployment, the analysis's own
//!   assumption: every deployed peer picks in the same round, so an
//!   undeployed host picked by k peers is deployed k times. It gives
//!   `overhead_late` against `E(X')`.

mod plot;
pub mod scenario;

use crate::autoscale::workload::Rng;
use serde::Serialize;
use shoal_core::overlay::analysis;
use shoal_core::overlay::{
    Command, Config, Inspection, Livetag, Outcome, Peer, Random, Remedy, Target, TargetList,
    Version, remedy,
};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::sync::Arc;

impl Random for Rng {
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// How long a deployment takes, drawn once per host (a slow host is slow for
/// every deployer, which is what makes Table II's long tail).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum DeployTime {
    /// No time at all, as the analysis assumes.
    Instant,
    /// Always `s` seconds.
    Fixed {
        /// Seconds.
        s: f64,
    },
    /// Uniform between two durations.
    Uniform {
        /// Seconds.
        lo_s: f64,
        /// Seconds.
        hi_s: f64,
    },
    /// Log-normal with median `median_s` and shape `sigma`.
    Lognormal {
        /// Seconds.
        median_s: f64,
        /// The standard deviation of its logarithm.
        sigma: f64,
    },
}

impl DeployTime {
    fn draw(&self, rng: &mut Rng) -> f64 {
        match *self {
            Self::Instant => 0.0,
            Self::Fixed { s } => s,
            Self::Uniform { lo_s, hi_s } => lo_s + (hi_s - lo_s) * rng.uniform(),
            Self::Lognormal { median_s, sigma } => median_s * (sigma * rng.normal()).exp(),
        }
    }
}

impl DeployTime {
    /// A time few hosts exceed (for the run's bound).
    fn slow_s(&self) -> f64 {
        match *self {
            Self::Instant => 0.0,
            Self::Fixed { s } => s,
            Self::Uniform { hi_s, .. } => hi_s,
            Self::Lognormal { median_s, sigma } => median_s * (5.0 * sigma).exp(),
        }
    }
}

impl std::fmt::Display for DeployTime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Self::Instant => write!(f, "instant"),
            Self::Fixed { s } => write!(f, "fixed:{s}s"),
            Self::Uniform { lo_s, hi_s } => write!(f, "uniform:{lo_s}s..{hi_s}s"),
            Self::Lognormal { median_s, sigma } => write!(f, "lognormal:{median_s}s,{sigma}"),
        }
    }
}

/// `instant`, `fixed:2s`, `uniform:500ms..3s` or `lognormal:MEDIAN,SIGMA`
/// (`lognormal:1s,1`).
impl std::str::FromStr for DeployTime {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let secs = |v: &str| {
            shoal_core::duration::parse_secs(v.trim())
                .map_err(|e| format!("{v:?} in --deploy-time {s:?}: {e}"))
        };
        let (kind, rest) = s.split_once(':').unwrap_or((s, ""));
        match kind {
            "instant" if rest.is_empty() => Ok(Self::Instant),
            "fixed" => Ok(Self::Fixed { s: secs(rest)? }),
            "uniform" => {
                let (a, b) = rest.split_once("..").ok_or_else(|| {
                    format!("{s:?}: write uniform:LOW..HIGH, e.g. uniform:1s..3s")
                })?;
                let (lo_s, hi_s) = (secs(a)?, secs(b)?);
                if lo_s > hi_s {
                    return Err(format!("{s:?}: the low bound is above the high one"));
                }
                Ok(Self::Uniform { lo_s, hi_s })
            }
            "lognormal" => {
                let (m, sg) = rest.split_once(',').ok_or_else(|| {
                    format!("{s:?}: write lognormal:MEDIAN,SIGMA, e.g. lognormal:1s,1")
                })?;
                let sigma: f64 = sg
                    .trim()
                    .parse()
                    .ok()
                    .filter(|v: &f64| v.is_finite() && *v >= 0.0)
                    .ok_or_else(|| format!("{s:?}: SIGMA {sg:?} is not a number >= 0"))?;
                Ok(Self::Lognormal {
                    median_s: secs(m)?,
                    sigma,
                })
            }
            _ => Err(format!(
                "unknown deploy time {s:?}; use instant, fixed:2s, uniform:1s..3s or lognormal:1s,1"
            )),
        }
    }
}

/// One run's parameters.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OverlayConfig {
    /// Machines in the target list.
    pub hosts: u32,
    /// Ping interval, seconds (one round).
    pub interval_s: f64,
    /// Ping timeout, seconds.
    pub timeout_s: f64,
    /// Deployment time per host (the asynchronous run).
    pub deploy_time: DeployTime,
    /// Rounds of steady state measured for the ping load.
    pub steady_rounds: u32,
    /// Seed of everything random.
    pub seed: u64,
}

impl OverlayConfig {
    /// `hosts` machines, 1 s rounds, instant deployment and detection.
    pub fn new(hosts: u32, seed: u64) -> Self {
        Self {
            hosts,
            interval_s: 1.0,
            timeout_s: 0.0,
            deploy_time: DeployTime::Instant,
            steady_rounds: 20,
            seed,
        }
    }
}

/// One point of the deployed-fraction curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CurvePoint {
    /// Rounds (ping intervals) since the seed started.
    pub round: f64,
    /// Fraction of machines running a peer.
    pub deployed: f64,
    /// The paper's `Y_r`.
    pub y_r: f64,
}

/// One round of the synchronous run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SyncRound {
    /// Peers deployed when the round started.
    pub m: u32,
    /// Machines newly deployed in it.
    pub new: u32,
    /// Their mean number of deployers.
    pub overhead: f64,
    /// `E(X')` at this `m`.
    pub analysis: f64,
}

/// The report of `shoal sim overlay`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The parameters.
    pub config: OverlayConfig,
    /// Rounds until half the machines ran a peer (asynchronous run).
    pub rounds_to_50: f64,
    /// Rounds until 99 % did.
    pub rounds_to_99: f64,
    /// Rounds until all did.
    pub rounds_to_all: f64,
    /// `ln n`, where `Y_r` reaches one half.
    pub rounds_to_50_analysis: f64,
    /// `ln 99n`.
    pub rounds_to_99_analysis: f64,
    /// The deployed fraction at every whole round, against `Y_r`.
    pub curve: Vec<CurvePoint>,
    /// The largest `|deployed - Y_r|` over `curve`.
    pub curve_max_error: f64,
    /// Synchronous run, instantaneous deployment: the mean number of peers
    /// that deployed a newly deployed machine, over the rounds that began
    /// with at least 90 % of machines deployed.
    pub overhead_late: f64,
    /// `E(X')` at those rounds' `m`, weighted the same way (by machines
    /// newly deployed).
    pub overhead_late_analysis: f64,
    /// `E(X')` as `m` reaches `n`, the paper's 1.582.
    pub overhead_limit: f64,
    /// Rounds the synchronous run took to deploy all.
    pub sync_rounds_to_all: u32,
    /// Every round of the synchronous run.
    pub sync_rounds: Vec<SyncRound>,
    /// Deployments (package copies) per machine in the asynchronous run,
    /// the seed counting one.
    pub deployments_mean: f64,
    /// How many machines had each number of deployments.
    pub deployments_histogram: BTreeMap<u32, u32>,
    /// Pings a peer received per round once all were deployed (the paper's
    /// `E(p) = 1`).
    pub pings_per_peer_per_round: f64,
    /// Pings a peer sent per round over the whole run.
    pub pings_sent_per_peer_per_round: f64,
    /// The fraction of peer-rounds with no ping received.
    pub pings_zero_fraction: f64,
    /// `(1 - 1/(n-1))^(n-1)`, about 1/e.
    pub pings_zero_fraction_analysis: f64,
    /// Pings that timed out and became contacts (SSH logins), all told.
    pub contacts: u64,
    /// Wall-clock seconds the simulation took.
    pub wall_s: f64,
    /// Times (rounds) at which each machine first ran a peer, sorted; for
    /// the plots.
    #[serde(skip)]
    pub deployed_at: Vec<f64>,
}

/// A fingerprint for the simulated hosts (the simulator never checks it).
const SIM_HOST_KEY: &str = "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

/// The target list of `n` simulated hosts.
pub fn sim_targets(n: u32) -> anyhow::Result<Arc<TargetList>> {
    let targets = (0..n)
        .map(|i| Target {
            name: format!("h{i}"),
            address: core::net::IpAddr::V4(core::net::Ipv4Addr::from(0x0a00_0000 + i + 1)),
            ssh_port: 22,
            user: "root".into(),
            prefix: "/opt/shoal".into(),
            host_key: SIM_HOST_KEY.into(),
            roles: Vec::new(),
            manager: None,
        })
        .collect();
    Ok(Arc::new(TargetList::new(
        Version::new(1, 0),
        shoal_core::overlay::DEFAULT_OVERLAY_PORT,
        targets,
    )?))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Wake(usize),
    DeployDone { target: usize, by: usize },
}

struct Host {
    running: bool,
    installed: bool,
    peer: Option<Peer>,
    deployments: u32,
    deploy_ms: Option<u64>,
    wake: Option<u64>,
}

struct World {
    hosts: Vec<Host>,
    heap: BinaryHeap<Reverse<(u64, u64, Event)>>,
    tie: u64,
    rng: Rng,
    targets: Arc<TargetList>,
    peer_cfg: Config,
    deploy_time: DeployTime,
    interval_ms: u64,
    deployed_at: Vec<u64>,
    steady_from: Option<u64>,
    steady_rounds: u32,
    steady_pings: Vec<u16>,
    contacts: u64,
}

impl World {
    fn push(&mut self, at: u64, e: Event) {
        self.tie += 1;
        self.heap.push(Reverse((at, self.tie, e)));
    }

    fn start(&mut self, h: usize, now: u64) {
        let phase = self.rng.below(self.interval_ms);
        let peer = Peer::new(
            &format!("h{h}"),
            self.targets.clone(),
            Version::new(1, 0),
            Livetag::default(),
            self.peer_cfg,
            now + phase,
        );
        let host = &mut self.hosts[h];
        host.running = true;
        host.installed = true;
        host.peer = Some(peer);
        self.deployed_at.push(now);
        self.reschedule(h);
    }

    fn reschedule(&mut self, h: usize) {
        let Some(w) = self.hosts[h].peer.as_ref().and_then(Peer::poll_timeout) else {
            return;
        };
        if self.hosts[h].wake.is_none_or(|s| w < s) {
            self.hosts[h].wake = Some(w);
            self.push(w, Event::Wake(h));
        }
    }

    fn deploy_ms(&mut self, h: usize) -> u64 {
        if let Some(d) = self.hosts[h].deploy_ms {
            return d;
        }
        let d = (self.deploy_time.draw(&mut self.rng) * 1000.0)
            .round()
            .max(0.0) as u64;
        self.hosts[h].deploy_ms = Some(d);
        d
    }

    /// Carries out what peer `h` asked for at `now`.
    fn drain(&mut self, h: usize, now: u64) {
        while let Some(cmd) = self.hosts[h].peer.as_mut().and_then(Peer::poll) {
            match cmd {
                Command::Ping {
                    target,
                    seq,
                    versions,
                } => {
                    if !self.hosts[target].running {
                        continue; // the deadline will fire
                    }
                    if let Some(from) = self.steady_from
                        && now >= from
                    {
                        let round = ((now - from) / self.interval_ms) as usize;
                        if round < self.steady_rounds as usize {
                            let i = round * self.hosts.len() + target;
                            self.steady_pings[i] = self.steady_pings[i].saturating_add(1);
                        }
                    }
                    let answer = self.hosts[target]
                        .peer
                        .as_mut()
                        .map(|p| p.handle_ping(h, &versions, now));
                    if let (Some(answer), Some(p)) = (answer, self.hosts[h].peer.as_mut()) {
                        p.handle_answer(target, seq, &answer, now);
                    }
                }
                Command::Contact { target, list } => {
                    self.contacts += 1;
                    let host = &self.hosts[target];
                    // SMON's algorithm, as the paper measured it: no deploy
                    // claims, so Table II's duplicates stay comparable.
                    let seen = Inspection {
                        installed: host.installed,
                        running: host.running,
                        deploying: false,
                    };
                    match remedy(seen) {
                        Remedy::Nothing => {
                            self.outcome(h, target, list, Outcome::AlreadyRunning, now)
                        }
                        Remedy::Recover => {
                            self.start(target, now);
                            self.outcome(h, target, list, Outcome::Recovered, now);
                        }
                        Remedy::Deploy => {
                            self.hosts[target].deployments += 1;
                            let d = self.deploy_ms(target);
                            if d == 0 {
                                self.finish_deploy(target, h, now);
                            } else {
                                self.push(now + d, Event::DeployDone { target, by: h });
                            }
                        }
                    }
                }
                // One list, one package, no apps, the livetag on: nothing
                // newer exists in this run.
                Command::FetchTargets { .. }
                | Command::Upgrade { .. }
                | Command::RollBack { .. }
                | Command::Exit
                | Command::AppNotice { .. }
                | Command::FetchApp { .. }
                | Command::Supervise
                | Command::KeepManager { .. } => {}
            }
        }
        self.reschedule(h);
    }

    fn outcome(&mut self, h: usize, target: usize, list: Version, o: Outcome, now: u64) {
        if let Some(p) = self.hosts[h].peer.as_mut() {
            p.handle_outcome(target, list, o, now);
        }
    }

    /// A deployer's copy is complete: the first takes the install lock and
    /// starts the peer; a later one finds it running and aborts.
    fn finish_deploy(&mut self, target: usize, by: usize, now: u64) {
        let list = self.targets.version();
        if self.hosts[target].running {
            self.outcome(by, target, list, Outcome::AlreadyRunning, now);
        } else {
            self.start(target, now);
            self.outcome(by, target, list, Outcome::Deployed, now);
        }
    }
}

/// Runs the simulation.
pub fn simulate(cfg: &OverlayConfig) -> anyhow::Result<Report> {
    anyhow::ensure!(
        cfg.hosts >= 2,
        "--hosts {} is too few; the overlay needs at least 2 machines",
        cfg.hosts
    );
    anyhow::ensure!(cfg.interval_s >= 0.001, "--interval must be at least 1ms");
    let wall = std::time::Instant::now();
    let n = cfg.hosts as usize;
    let targets = sim_targets(cfg.hosts)?;
    let interval_ms = (cfg.interval_s * 1000.0).round() as u64;
    let peer_cfg = Config {
        interval_ms,
        timeout_ms: (cfg.timeout_s * 1000.0).round() as u64,
    };

    // The asynchronous run.
    let mut w = World {
        hosts: (0..n)
            .map(|_| Host {
                running: false,
                installed: false,
                peer: None,
                deployments: 0,
                deploy_ms: None,
                wake: None,
            })
            .collect(),
        heap: BinaryHeap::new(),
        tie: 0,
        rng: Rng::new(cfg.seed, 0x0E71),
        targets: targets.clone(),
        peer_cfg,
        deploy_time: cfg.deploy_time,
        interval_ms,
        deployed_at: Vec::with_capacity(n),
        steady_from: None,
        steady_rounds: cfg.steady_rounds,
        steady_pings: vec![0; n * cfg.steady_rounds as usize],
        contacts: 0,
    };
    // The operator seeds host 0 by hand (SMON II-E): one deployment.
    w.hosts[0].deployments = 1;
    w.start(0, 0);
    // A bound far past any sane run, so a pathological deploy time ends.
    let give_up = interval_ms * (200 + 20 * (n as f64).ln().ceil() as u64)
        + (cfg.deploy_time.slow_s() * 4000.0) as u64;
    let mut end = u64::MAX;
    while let Some(Reverse((now, _, e))) = w.heap.pop() {
        if now >= end || now > give_up {
            break;
        }
        match e {
            Event::Wake(h) => {
                if w.hosts[h].wake != Some(now) {
                    continue;
                }
                w.hosts[h].wake = None;
                let mut rng = std::mem::replace(&mut w.rng, Rng::new(0, 0));
                if let Some(p) = w.hosts[h].peer.as_mut() {
                    p.handle_timeout(now, &mut rng);
                }
                w.rng = rng;
                w.drain(h, now);
            }
            Event::DeployDone { target, by } => {
                w.finish_deploy(target, by, now);
                w.drain(by, now);
            }
        }
        if w.steady_from.is_none() && w.deployed_at.len() == n {
            // All deployed: measure the ping load over the next rounds,
            // starting at the next whole interval.
            let from = now + interval_ms;
            w.steady_from = Some(from);
            end = from + interval_ms * u64::from(cfg.steady_rounds);
        }
    }
    anyhow::ensure!(
        w.deployed_at.len() == n,
        "only {} of {n} hosts were deployed before the simulation gave up at {} rounds",
        w.deployed_at.len(),
        give_up / interval_ms
    );

    let rounds = |ms: u64| ms as f64 / interval_ms as f64;
    let deployed_at: Vec<f64> = w.deployed_at.iter().map(|&t| rounds(t)).collect();
    let reach = |y: f64| {
        let k = ((y * n as f64).ceil() as usize).clamp(1, n);
        deployed_at[k - 1]
    };
    let rounds_to_all = *deployed_at.last().unwrap_or(&0.0);
    let mut curve = Vec::new();
    let mut r = 0.0;
    while r <= rounds_to_all.ceil() {
        let d = deployed_at.partition_point(|&t| t <= r) as f64 / n as f64;
        curve.push(CurvePoint {
            round: r,
            deployed: d,
            y_r: analysis::y_r(n as f64, r),
        });
        r += 1.0;
    }
    let curve_max_error = curve
        .iter()
        .map(|p| (p.deployed - p.y_r).abs())
        .fold(0.0, f64::max);
    let mut deployments_histogram = BTreeMap::new();
    for h in &w.hosts {
        *deployments_histogram.entry(h.deployments).or_insert(0) += 1;
    }
    let deployments_mean = w
        .hosts
        .iter()
        .map(|h| f64::from(h.deployments))
        .sum::<f64>()
        / n as f64;
    let sent: u64 = w
        .hosts
        .iter()
        .filter_map(|h| h.peer.as_ref())
        .map(|p| p.counters().pings_sent)
        .sum();
    let end_ms = end.min(give_up);
    let peer_rounds: f64 = w
        .deployed_at
        .iter()
        .map(|&t| rounds(end_ms.saturating_sub(t)))
        .sum();
    let steady = w.steady_pings.len().max(1) as f64;
    let received: u64 = w.steady_pings.iter().map(|&c| u64::from(c)).sum();
    let zero = w.steady_pings.iter().filter(|&&c| c == 0).count() as f64;

    let sync = synchronous(&targets, peer_cfg, cfg.seed)?;
    let late: Vec<&SyncRound> = sync
        .iter()
        .filter(|s| f64::from(s.m) >= 0.9 * n as f64 && s.new > 0)
        .collect();
    let late_new: f64 = late.iter().map(|s| f64::from(s.new)).sum();
    let weighted = |f: fn(&SyncRound) -> f64| {
        if late_new == 0.0 {
            f64::NAN
        } else {
            late.iter().map(|s| f(s) * f64::from(s.new)).sum::<f64>() / late_new
        }
    };

    Ok(Report {
        config: cfg.clone(),
        rounds_to_50: reach(0.5),
        rounds_to_99: reach(0.99),
        rounds_to_all,
        rounds_to_50_analysis: analysis::rounds_to(n as f64, 0.5),
        rounds_to_99_analysis: analysis::rounds_to(n as f64, 0.99),
        curve,
        curve_max_error,
        overhead_late: weighted(|s| s.overhead),
        overhead_late_analysis: weighted(|s| s.analysis),
        overhead_limit: analysis::overhead_limit(),
        sync_rounds_to_all: sync.len() as u32,
        sync_rounds: sync,
        deployments_mean,
        deployments_histogram,
        pings_per_peer_per_round: received as f64 / steady,
        pings_sent_per_peer_per_round: sent as f64 / peer_rounds.max(1.0),
        pings_zero_fraction: zero / steady,
        pings_zero_fraction_analysis: analysis::zero_pings((n - 1) as f64, (n - 1) as f64),
        contacts: w.contacts,
        wall_s: wall.elapsed().as_secs_f64(),
        deployed_at,
    })
}

/// The analysis's model: synchronous rounds, instantaneous deployment. Every
/// peer deployed when a round begins pings in it; every unanswered ping
/// becomes a deployment; what is deployed starts pinging next round.
fn synchronous(
    targets: &Arc<TargetList>,
    cfg: Config,
    seed: u64,
) -> anyhow::Result<Vec<SyncRound>> {
    let n = targets.len();
    let mut rng = Rng::new(seed, 0x5E7C);
    let cfg = Config {
        timeout_ms: 0,
        ..cfg
    };
    let mut peers: Vec<Option<Peer>> = (0..n).map(|_| None).collect();
    let new_peer = |h: usize, at: u64| {
        Peer::new(
            &format!("h{h}"),
            targets.clone(),
            Version::new(1, 0),
            Livetag::default(),
            cfg,
            at,
        )
    };
    peers[0] = Some(new_peer(0, 0));
    let mut deployed = 1usize;
    let mut out = Vec::new();
    let mut round = 0u64;
    while deployed < n {
        anyhow::ensure!(round < 10_000, "the synchronous run did not finish");
        let now = round * cfg.interval_ms;
        let m = deployed;
        let mut pickers: BTreeMap<usize, Vec<(usize, Version)>> = BTreeMap::new();
        for h in 0..n {
            let Some(p) = peers[h].as_mut() else { continue };
            p.handle_timeout(now, &mut rng);
            let cmds: Vec<Command> = std::iter::from_fn(|| p.poll()).collect();
            for c in cmds {
                if let Command::Ping {
                    target,
                    seq,
                    versions,
                } = c
                    && let Some(answer) = peers[target]
                        .as_mut()
                        .map(|t| t.handle_ping(h, &versions, now))
                    && let Some(p) = peers[h].as_mut()
                {
                    p.handle_answer(target, seq, &answer, now);
                }
            }
            // The deadline (timeout 0) passes at once.
            let Some(p) = peers[h].as_mut() else { continue };
            p.handle_timeout(now, &mut rng);
            while let Some(c) = p.poll() {
                if let Command::Contact { target, list } = c {
                    pickers.entry(target).or_default().push((h, list));
                }
            }
        }
        let mut copies = 0usize;
        for (&target, who) in &pickers {
            copies += who.len();
            for (i, &(h, list)) in who.iter().enumerate() {
                let o = if i == 0 {
                    Outcome::Deployed
                } else {
                    Outcome::AlreadyRunning
                };
                if let Some(p) = peers[h].as_mut() {
                    p.handle_outcome(target, list, o, now);
                }
            }
            peers[target] = Some(new_peer(target, now + cfg.interval_ms));
        }
        deployed += pickers.len();
        out.push(SyncRound {
            m: m as u32,
            new: pickers.len() as u32,
            overhead: if pickers.is_empty() {
                0.0
            } else {
                copies as f64 / pickers.len() as f64
            },
            analysis: analysis::overhead(m as f64, 1.0 / (n - 1) as f64),
        });
        round += 1;
    }
    Ok(out)
}

/// `--scenario upgrade|disable|app`.
fn run_scenario(args: &OverlayArgs) -> anyhow::Result<()> {
    use std::io::Write;
    let r = scenario::simulate(
        args.scenario,
        args.hosts,
        args.interval,
        args.fetch_time,
        args.seed,
    )?;
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
        let p = dir.join(format!(
            "overlay-{}-{}.json",
            serde_json::to_value(args.scenario)?
                .as_str()
                .unwrap_or("scenario"),
            args.seed
        ));
        std::fs::write(&p, serde_json::to_string_pretty(&r)?)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", p.display()))?;
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&r)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "{:?}: {} hosts, interval {}s, pull {}s, seed {}",
        r.scenario, r.hosts, r.interval_s, r.fetch_s, r.seed
    )?;
    writeln!(
        out,
        "rounds to 50 % / 99 % / all: {:.2} / {:.2} / {:.2} ({:.1} s to all)",
        r.rounds_to_50,
        r.rounds_to_99,
        r.rounds_to_all,
        r.rounds_to_all * r.interval_s
    )?;
    if let (Some(x), Some(rec)) = (r.rounds_to_all_exited, r.recoveries) {
        writeln!(
            out,
            "rounds until every peer exited: {x:.2}; exited peers recovered by a peer still on: {rec}"
        )?;
    } else {
        writeln!(
            out,
            "pulls: {}; most served by one host: {}",
            r.pulls, r.max_served
        )?;
    }
    writeln!(out, "wall s: {:.2}", r.wall_s)?;
    Ok(())
}

const AFTER_HELP: &str = "\
Deploys a pool of --hosts machines from one seeded peer, on a virtual clock,
with shoal-core's overlay step (the code the agent runs), and compares with
SMON's analysis (section IV):
  rounds_to_50 / rounds_to_99 / rounds_to_all against ln n and ln 99n, and
  the deployed fraction every round (curve) against Y_r = 1/(1 + n e^-r);
  overhead_late (synchronous rounds, instantaneous deployment: the mean
  number of peers deploying a newly deployed machine over the rounds that
  begin with >= 90 % deployed) against overhead_late_analysis, E(X') =
  (m/n)/(1-(1-1/n)^m) at the same rounds (limit 1.582);
  pings_per_peer_per_round (E(p) = 1) once all are deployed;
  deployments_mean and deployments_histogram: package copies per machine
  (Table II: mean 1.88 at n = 117 on PlanetLab).
A peer never pings itself, so a listed peer picks each other host with
probability 1/(n-1) and the analysis columns use that.

--deploy-time is drawn once per host: instant, fixed:2s, uniform:1s..3s,
lognormal:MEDIAN,SIGMA (lognormal:1s,1 with a 1 s interval is the model
that reproduces Table II). --out DIR writes overlay-SEED.json and SVG plots.

--scenario upgrade|disable|app runs SMON's second half on a running pool
instead: a release, the livetag off, or an app handed to one peer, and the
rounds until every peer has it (disable: and until every peer exited after
its quiet period). SMON measured disabling 117 hosts in 6.8 intervals.

Examples:
  shoal sim overlay --hosts 10000 --seed 1 --json
  shoal sim overlay --scenario disable --hosts 117 --interval 5s
  shoal sim overlay --scenario upgrade --hosts 10000 --fetch-time 2s
  shoal sim overlay --hosts 117 --deploy-time lognormal:5s,1 --interval 5s --seed 3
  shoal sim overlay --hosts 1000 --out /tmp/overlay";

/// Arguments of `shoal sim overlay`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct OverlayArgs {
    /// Machines in the target list (the seed is one of them).
    #[arg(long, default_value_t = 1000)]
    pub hosts: u32,
    /// Ping interval, one round (500ms, 1s, 5s).
    #[arg(long, default_value = "1s", value_parser = crate::cluster::duration_arg)]
    pub interval: f64,
    /// Ping timeout before a target is contacted (0s: detection at once, as
    /// the analysis assumes).
    #[arg(long, default_value = "0s", value_parser = crate::cluster::duration_arg)]
    pub timeout: f64,
    /// Time a deployment takes, drawn once per host.
    #[arg(long, default_value = "instant")]
    pub deploy_time: DeployTime,
    /// Seed of everything random.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Write overlay-SEED.json and the plots here.
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
    /// deploy (self-deployment from one seed), upgrade (a new release at
    /// one peer), disable (the livetag off at one peer) or app (an app
    /// installed at one peer).
    #[arg(long, value_enum, default_value = "deploy")]
    pub scenario: scenario::Scenario,
    /// upgrade, app: how long a pull of the package takes.
    #[arg(long, default_value = "500ms", value_parser = crate::cluster::duration_arg)]
    pub fetch_time: f64,
}

impl OverlayArgs {
    /// The configuration these arguments describe.
    pub fn config(&self) -> OverlayConfig {
        OverlayConfig {
            interval_s: self.interval,
            timeout_s: self.timeout,
            deploy_time: self.deploy_time,
            ..OverlayConfig::new(self.hosts, self.seed)
        }
    }
}

/// Runs `shoal sim overlay`.
pub fn run(args: &OverlayArgs) -> anyhow::Result<()> {
    use std::io::Write;
    if args.scenario != scenario::Scenario::Deploy {
        return run_scenario(args);
    }
    let r = simulate(&args.config())?;
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
        let base = dir.join(format!("overlay-{}", args.seed));
        let p = base.with_extension("json");
        std::fs::write(&p, serde_json::to_string_pretty(&r)?)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", p.display()))?;
        plot::plot_all(&base, &r)?;
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&r)?)?;
        return Ok(());
    }
    let n = r.config.hosts;
    writeln!(
        out,
        "{n} hosts, interval {}s, deploy time {}, seed {}",
        r.config.interval_s, r.config.deploy_time, r.config.seed
    )?;
    writeln!(out, "{:<28} {:>10} {:>10}", "", "measured", "analysis")?;
    let row = |out: &mut std::io::StdoutLock, k: &str, a: f64, b: f64| {
        writeln!(out, "{k:<28} {a:>10.3} {b:>10.3}")
    };
    row(
        &mut out,
        "rounds to 50 %",
        r.rounds_to_50,
        r.rounds_to_50_analysis,
    )?;
    row(
        &mut out,
        "rounds to 99 %",
        r.rounds_to_99,
        r.rounds_to_99_analysis,
    )?;
    writeln!(out, "{:<28} {:>10.3}", "rounds to all", r.rounds_to_all)?;
    writeln!(
        out,
        "{:<28} {:>10.3}",
        "max |deployed - Y_r|", r.curve_max_error
    )?;
    row(
        &mut out,
        "overhead late (sync)",
        r.overhead_late,
        r.overhead_late_analysis,
    )?;
    row(
        &mut out,
        "pings per peer per round",
        r.pings_per_peer_per_round,
        1.0,
    )?;
    row(
        &mut out,
        "peer-rounds without a ping",
        r.pings_zero_fraction,
        r.pings_zero_fraction_analysis,
    )?;
    writeln!(
        out,
        "{:<28} {:>10.3}",
        "deployments per host", r.deployments_mean
    )?;
    let hist: Vec<String> = r
        .deployments_histogram
        .iter()
        .map(|(k, v)| format!("{k}:{v}"))
        .collect();
    writeln!(out, "{:<28} {}", "deployments histogram", hist.join(" "))?;
    writeln!(out, "{:<28} {:>10.2}", "wall s", r.wall_s)?;
    Ok(())
}
