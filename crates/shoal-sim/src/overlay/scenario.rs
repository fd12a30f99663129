//! `shoal sim overlay --scenario upgrade|disable|app`: the second half of
//! SMON on a running pool, with the same [`Peer`] the live overlay runs.
//! Every host runs a peer at its own phase; after a warm-up of a few
//! rounds one peer is handed
//!
//! - `upgrade`: a new release (II-A-3). Peers that see a newer version pull
//!   it from the peer that showed it; a pull takes `--fetch-time`, then the
//!   peer re-executes on the new release at a new phase.
//! - `disable`: the livetag off (II-A-4). Measured: rounds until every peer
//!   is off (SMON: 34 s, 6.8 intervals, at 117 hosts), then until every
//!   peer has exited after its quiet period, and how many peers that exited
//!   early were recovered by a peer still on.
//! - `app`: an app (II-D). Peers tell one random peer about one app a
//!   round; a peer that lacks it pulls it (`--fetch-time`).
//!
//! The world is the same as the deployment run's: a message reaches its
//! target at once; a host whose peer exited is recovered by a contact (its
//! livetag kept, as the live peer keeps it in its directory).

use super::sim_targets;
use crate::autoscale::workload::Rng;
use serde::Serialize;
use shoal_core::overlay::apps::{AppSpec, AppState, StateTag};
use shoal_core::overlay::{Command, Config, Livetag, Outcome, Peer, Random, Source, Version};
use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Which half of SMON to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Scenario {
    /// Self-deployment from one seeded peer (section IV).
    Deploy,
    /// A new release handed to one peer spreads to all.
    Upgrade,
    /// The livetag set off at one peer: all stop, then exit.
    Disable,
    /// An app installed at one peer reaches all.
    App,
}

/// The report of a scenario run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScenarioReport {
    /// Which.
    pub scenario: Scenario,
    /// Hosts.
    pub hosts: u32,
    /// Ping interval, seconds.
    pub interval_s: f64,
    /// Pull time, seconds (upgrade, app).
    pub fetch_s: f64,
    /// Seed.
    pub seed: u64,
    /// Rounds from the hand-over until half the peers had it (new release,
    /// livetag off, app).
    pub rounds_to_50: f64,
    /// Until 99 %.
    pub rounds_to_99: f64,
    /// Until all.
    pub rounds_to_all: f64,
    /// `disable`: rounds from the hand-over until every peer had exited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rounds_to_all_exited: Option<f64>,
    /// `disable`: peers that exited and were then recovered by a peer still
    /// on (each one an SSH login).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recoveries: Option<u64>,
    /// `upgrade`, `app`: pulls made, all told (a pull that finds the
    /// release already taken is not made).
    pub pulls: u64,
    /// The most pulls one host served.
    pub max_served: u64,
    /// The fraction that had it at every whole round since the hand-over.
    pub curve: Vec<(f64, f64)>,
    /// Wall-clock seconds.
    pub wall_s: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Wake(usize),
    Fetched { host: usize, from: usize, app: bool },
}

struct Host {
    peer: Option<Peer>,
    wake: Option<u64>,
    /// The release it runs.
    release: Version,
    livetag: Livetag,
    /// When it first had the thing spread (release, livetag off, app).
    had_at: Option<u64>,
    exited_at: Option<u64>,
    served: u64,
    pulling: bool,
}

struct World {
    hosts: Vec<Host>,
    heap: BinaryHeap<Reverse<(u64, u64, Event)>>,
    tie: u64,
    rng: Rng,
    targets: std::sync::Arc<shoal_core::overlay::TargetList>,
    cfg: Config,
    fetch_ms: u64,
    scenario: Scenario,
    new_release: Version,
    app: AppSpec,
    start: u64,
    pulls: u64,
    recoveries: u64,
}

fn app_spec() -> AppSpec {
    AppSpec {
        name: "web".into(),
        version: Version::new(1, 1),
        adaptor: "www".into(),
        params: Default::default(),
        restart: None,
        state: AppState::Online,
        files: Vec::new(),
    }
}

const TAG0: StateTag = StateTag {
    state: AppState::Online,
    version: Version::new(0, 0),
};

impl World {
    fn push(&mut self, at: u64, e: Event) {
        self.tie += 1;
        self.heap.push(Reverse((at, self.tie, e)));
    }

    fn boot(&mut self, h: usize, now: u64) {
        let phase = self.rng.below(self.cfg.interval_ms);
        let host = &mut self.hosts[h];
        let mut p = Peer::new(
            &format!("h{h}"),
            self.targets.clone(),
            host.release,
            host.livetag,
            self.cfg,
            now + phase,
        );
        if self.scenario == Scenario::App && host.had_at.is_some() {
            p.install_app(self.app.clone(), TAG0);
            while p.poll().is_some() {}
        }
        host.peer = Some(p);
        host.wake = None;
        host.exited_at = None;
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

    fn had(&mut self, h: usize, now: u64) {
        if self.hosts[h].had_at.is_none() {
            self.hosts[h].had_at = Some(now);
        }
    }

    fn drain(&mut self, h: usize, now: u64) {
        while let Some(cmd) = self.hosts[h].peer.as_mut().and_then(Peer::poll) {
            match cmd {
                Command::Ping {
                    target,
                    seq,
                    versions,
                } => {
                    let Some(t) = self.hosts[target].peer.as_mut() else {
                        continue; // the deadline fires: a contact
                    };
                    let answer = t.handle_ping(h, &versions, now);
                    let off = !answer.livetag.on;
                    self.drain(target, now);
                    if self.scenario == Scenario::Disable && off {
                        self.had(target, now);
                    }
                    if let Some(p) = self.hosts[h].peer.as_mut() {
                        p.handle_answer(target, seq, &answer, now);
                        if self.scenario == Scenario::Disable && !p.versions().livetag.on {
                            self.had(h, now);
                        }
                    }
                }
                Command::Contact { target, list } => {
                    // An exited peer (installed, not running) is recovered;
                    // it keeps its livetag, so a disabled one stays off.
                    if self.hosts[target].peer.is_none() {
                        self.recoveries += 1;
                        self.boot(target, now);
                        self.outcome(h, target, list, Outcome::Recovered, now);
                    } else {
                        self.outcome(h, target, list, Outcome::AlreadyRunning, now);
                    }
                }
                Command::Upgrade { from, version } => {
                    let from = match from {
                        Source::Peer(i) => i,
                        Source::Utility => h,
                    };
                    self.pull(h, from, version == self.new_release, false, now);
                }
                Command::AppNotice {
                    target,
                    name,
                    notice,
                } => {
                    if let Some(t) = self.hosts[target].peer.as_mut() {
                        t.handle_app_notice(Source::Peer(h), &name, &notice, now);
                        self.drain(target, now);
                    }
                }
                Command::FetchApp { from, .. } => {
                    let from = match from {
                        Source::Peer(i) => i,
                        Source::Utility => h,
                    };
                    self.pull(h, from, true, true, now);
                }
                Command::Exit => {
                    let host = &mut self.hosts[h];
                    host.livetag = host
                        .peer
                        .as_ref()
                        .map(|p| p.versions().livetag)
                        .unwrap_or(host.livetag);
                    host.peer = None;
                    host.wake = None;
                    host.exited_at = Some(now);
                    return;
                }
                Command::FetchTargets { .. }
                | Command::RollBack { .. }
                | Command::Supervise
                | Command::KeepManager { .. } => {}
            }
        }
        self.reschedule(h);
    }

    fn pull(&mut self, h: usize, from: usize, useful: bool, app: bool, now: u64) {
        if !useful || self.hosts[h].pulling {
            return;
        }
        self.hosts[h].pulling = true;
        self.pulls += 1;
        self.hosts[from].served += 1;
        self.push(now + self.fetch_ms, Event::Fetched { host: h, from, app });
    }

    fn outcome(&mut self, h: usize, target: usize, list: Version, o: Outcome, now: u64) {
        if let Some(p) = self.hosts[h].peer.as_mut() {
            p.handle_outcome(target, list, o, now);
        }
    }

    fn fetched(&mut self, h: usize, app: bool, now: u64) {
        self.hosts[h].pulling = false;
        if app {
            if let Some(p) = self.hosts[h].peer.as_mut() {
                p.handle_app_fetched("web", Ok((self.app.clone(), TAG0)), now);
            }
            self.had(h, now);
            self.drain(h, now);
        } else {
            // The new release is in: the peer re-executes on it.
            self.hosts[h].release = self.new_release;
            self.had(h, now);
            self.boot(h, now);
        }
    }
}

/// Runs a scenario other than `deploy`.
pub fn simulate(
    scenario: Scenario,
    hosts: u32,
    interval_s: f64,
    fetch_s: f64,
    seed: u64,
) -> anyhow::Result<ScenarioReport> {
    anyhow::ensure!(
        hosts >= 2,
        "--hosts {hosts} is too few; the overlay needs at least 2 machines"
    );
    anyhow::ensure!(interval_s >= 0.001, "--interval must be at least 1ms");
    let wall = std::time::Instant::now();
    let n = hosts as usize;
    let cfg = Config {
        interval_ms: (interval_s * 1000.0).round() as u64,
        timeout_ms: ((interval_s * 500.0).round() as u64).max(1),
    };
    let mut w = World {
        hosts: (0..n)
            .map(|_| Host {
                peer: None,
                wake: None,
                release: Version::new(1, 0),
                livetag: Livetag::default(),
                had_at: None,
                exited_at: None,
                served: 0,
                pulling: false,
            })
            .collect(),
        heap: BinaryHeap::new(),
        tie: 0,
        rng: Rng::new(seed, 0x5C3A),
        targets: sim_targets(hosts)?,
        cfg,
        fetch_ms: (fetch_s * 1000.0).round() as u64,
        scenario,
        new_release: Version::new(2, 0),
        app: app_spec(),
        start: 5 * cfg.interval_ms,
        pulls: 0,
        recoveries: 0,
    };
    for h in 0..n {
        w.boot(h, 0);
    }
    let start = w.start;
    let mut handed = false;
    let give_up = start
        + cfg.interval_ms * (400 + 40 * (n as f64).ln().ceil() as u64)
        + cfg.quiet_ms() * 4
        + w.fetch_ms * 200;
    while let Some(Reverse((now, _, e))) = w.heap.pop() {
        if now > give_up {
            break;
        }
        if !handed && now >= start {
            handed = true;
            w.hand_over(start);
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
            Event::Fetched { host, app, .. } => w.fetched(host, app, now),
        }
        let all_had = w.hosts.iter().all(|h| h.had_at.is_some());
        let done = match scenario {
            Scenario::Disable => all_had && w.hosts.iter().all(|h| h.peer.is_none()),
            _ => all_had,
        };
        if handed && done {
            break;
        }
    }
    let mut had: Vec<f64> = w
        .hosts
        .iter()
        .filter_map(|h| h.had_at)
        .map(|t| t.saturating_sub(start) as f64 / cfg.interval_ms as f64)
        .collect();
    anyhow::ensure!(
        had.len() == n,
        "only {} of {n} peers were reached before the simulation gave up",
        had.len()
    );
    had.sort_by(f64::total_cmp);
    let reach = |y: f64| had[((y * n as f64).ceil() as usize).clamp(1, n) - 1];
    let rounds_to_all = *had.last().unwrap_or(&0.0);
    let mut curve = Vec::new();
    let mut r = 0.0;
    while r <= rounds_to_all.ceil() {
        curve.push((r, had.partition_point(|&t| t <= r) as f64 / n as f64));
        r += 1.0;
    }
    let exited = (scenario == Scenario::Disable).then(|| {
        w.hosts
            .iter()
            .filter_map(|h| h.exited_at)
            .max()
            .map(|t| t.saturating_sub(start) as f64 / cfg.interval_ms as f64)
            .unwrap_or(f64::NAN)
    });
    Ok(ScenarioReport {
        scenario,
        hosts,
        interval_s,
        fetch_s,
        seed,
        rounds_to_50: reach(0.5),
        rounds_to_99: reach(0.99),
        rounds_to_all,
        rounds_to_all_exited: exited,
        recoveries: (scenario == Scenario::Disable).then_some(w.recoveries),
        pulls: w.pulls,
        max_served: w.hosts.iter().map(|h| h.served).max().unwrap_or(0),
        curve,
        wall_s: wall.elapsed().as_secs_f64(),
    })
}

impl World {
    /// The operator's hand-over at one peer, host 0.
    fn hand_over(&mut self, now: u64) {
        match self.scenario {
            Scenario::Deploy => {}
            Scenario::Upgrade => {
                if let Some(p) = self.hosts[0].peer.as_mut() {
                    p.handle_offer(self.new_release, now);
                }
                self.drain(0, now);
            }
            Scenario::Disable => {
                let off = Livetag {
                    on: false,
                    version: Version::new(1, 0),
                };
                if let Some(p) = self.hosts[0].peer.as_mut() {
                    p.set_livetag(off, now);
                }
                self.had(0, now);
                self.drain(0, now);
            }
            Scenario::App => {
                if let Some(p) = self.hosts[0].peer.as_mut() {
                    p.install_app(self.app.clone(), TAG0);
                }
                self.had(0, now);
                self.drain(0, now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scenario_reaches_every_peer_and_disable_ends_with_none_running() {
        for s in [Scenario::Upgrade, Scenario::Disable, Scenario::App] {
            let r = simulate(s, 117, 1.0, 0.5, 3).unwrap();
            assert!(r.rounds_to_all > 0.0, "{s:?}");
            assert!(r.rounds_to_50 <= r.rounds_to_99 && r.rounds_to_99 <= r.rounds_to_all);
            assert_eq!(r.curve.last().unwrap().1, 1.0);
            if s == Scenario::Disable {
                let exited = r.rounds_to_all_exited.unwrap();
                assert!(exited >= r.rounds_to_all + QUIET as f64 - 1.0, "{exited}");
            } else {
                assert!(r.pulls >= 116, "every other peer pulled once: {}", r.pulls);
            }
        }
    }

    const QUIET: u64 = shoal_core::overlay::QUIET_INTERVALS;
}
