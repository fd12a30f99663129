//! `shoal sim cluster`: the manager's controller ([`shoal_core::control`])
//! driven on a virtual clock by virtual agents, dispatchers and a virtual
//! store, with faults, in the manner of FoundationDB's and TigerBeetle's
//! simulators. Nothing here decides: every allocation, expiry, drain and
//! pool move is the controller's, exactly the code the live manager runs.
//!
//! The model. Agents renew every third of the lease TTL with their apps'
//! states, over a link with a delay and a loss rate; a desired app takes an
//! allocation lead time (drawn per start) to run, or fails. Each service
//! has one dispatcher that learns backend lists after a delay, spreads the
//! service's demand evenly over its non-draining backends, and reports
//! per-backend load every second; a draining backend keeps requests in
//! flight for a drawn time. Faults: nodes crash (apps gone, renewals stop)
//! and return after a drawn down time; the manager restarts, and a new
//! controller is rebuilt from what the old one persisted, as
//! [`Controller::restore`] does live; reports are lost; apps fail to start;
//! service apps change (rolling updates).
//!
//! Invariants are checked at every controller pass (every `check_every`
//! passes on large pools): the controller's own
//! ([`Controller::check_invariants`]), and those only the simulator can see
//! because it knows the truth: a crashed node is out of every backend list
//! within one pass of its lease expiring; a service is never below its
//! floor for longer than a sampling period while a fitting node is free;
//! every drain ends by its timeout; and across a manager restart nothing
//! persisted is lost and a failed node stays failed.

use crate::autoscale::workload::{Rng, Workload, WorkloadSpec};
use serde::Serialize;
use sha2::{Digest, Sha256};
use shoal_core::control::model::*;
use shoal_core::control::{
    Command, Config, ControlError, Controller, Doc, Input, Now, Reply, Restored, app_id,
};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::fmt::Write as _;

/// Fault rates.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Faults {
    /// Crashes per node per second.
    pub crash_per_s: f64,
    /// Mean seconds a crashed node stays down.
    pub down_mean_s: f64,
    /// Manager restarts per second.
    pub restart_manager_per_s: f64,
    /// Seconds a restarting manager is unreachable.
    pub manager_down_s: f64,
    /// Probability that a renewal or a dispatcher report is lost.
    pub lose: f64,
    /// Probability that an app fails to start.
    pub app_fail: f64,
    /// Service app changes (rolling updates) per second, pool-wide.
    pub update_per_s: f64,
}

impl Faults {
    /// No faults at all.
    pub fn none() -> Self {
        Self {
            crash_per_s: 0.0,
            down_mean_s: 600.0,
            restart_manager_per_s: 0.0,
            manager_down_s: 2.0,
            lose: 0.0,
            app_fail: 0.0,
            update_per_s: 0.0,
        }
    }

    /// The `default` set: a node crashes about once a week, the manager
    /// restarts every 6 h, 2 % of reports are lost, 1 % of starts fail and
    /// one service changes its app every hour.
    pub fn default_set() -> Self {
        Self {
            crash_per_s: 1.0 / (7.0 * 86400.0),
            restart_manager_per_s: 1.0 / (6.0 * 3600.0),
            lose: 0.02,
            app_fail: 0.01,
            update_per_s: 1.0 / 3600.0,
            ..Self::none()
        }
    }
}

/// Parses `none`, `default`, or `key=value,...` on top of none, where a
/// rate is `N/s`, `N/m`, `N/h` or `N/d` and a probability is a number in
/// [0, 1]: `crash=0.001/s,restart-manager=1/h,lose-report=0.05`.
impl std::str::FromStr for Faults {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut f = Self::none();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "none" => f = Self::none(),
                "default" => f = Self::default_set(),
                _ => {
                    let (k, v) = part.split_once('=').ok_or_else(|| {
                        format!("fault {part:?} is not KEY=VALUE; e.g. crash=1/d,lose-report=0.05")
                    })?;
                    let rate = || parse_rate(k, v);
                    let prob = || {
                        v.parse::<f64>()
                            .ok()
                            .filter(|p| (0.0..=1.0).contains(p))
                            .ok_or_else(|| {
                                format!("{k}={v}: a probability in [0, 1], e.g. {k}=0.05")
                            })
                    };
                    let secs =
                        || parse_secs(v).ok_or_else(|| format!("{k}={v}: a duration such as 10m"));
                    match k {
                        "crash" => f.crash_per_s = rate()?,
                        "down" => f.down_mean_s = secs()?,
                        "restart-manager" => f.restart_manager_per_s = rate()?,
                        "manager-down" => f.manager_down_s = secs()?,
                        "lose-report" | "lose" => f.lose = prob()?,
                        "app-fail" => f.app_fail = prob()?,
                        "update" => f.update_per_s = rate()?,
                        other => {
                            return Err(format!(
                                "unknown fault {other:?}; use crash, down, restart-manager, manager-down, lose-report, app-fail, update (or none, default)"
                            ));
                        }
                    }
                }
            }
        }
        Ok(f)
    }
}

fn parse_rate(k: &str, v: &str) -> Result<f64, String> {
    let (n, unit) = v.split_once('/').unwrap_or((v, "s"));
    let per = match unit {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        _ => return Err(format!("{k}={v}: the unit must be /s, /m, /h or /d")),
    };
    n.parse::<f64>()
        .ok()
        .filter(|x| x.is_finite() && *x >= 0.0)
        .map(|x| x / per)
        .ok_or_else(|| format!("{k}={v}: a rate such as 1/h"))
}

/// The one duration syntax (`500ms`, `6s`, `2m`, `1h`).
fn parse_secs(v: &str) -> Option<f64> {
    shoal_core::duration::parse_secs(v).ok()
}

/// A whole-cluster simulation's settings.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterConfig {
    /// Nodes in the pool.
    pub nodes: u32,
    /// Services sharing it.
    pub services: u32,
    /// Simulated seconds.
    pub duration_s: f64,
    /// The shape of every service's demand (each gets its own phase and
    /// scale).
    #[serde(skip)]
    pub workload: WorkloadSpec,
    /// Fault rates.
    pub faults: Faults,
    /// Seed of everything random.
    pub seed: u64,
    /// Lease TTL.
    pub ttl_ms: u64,
    /// Controller pass period.
    pub pass_ms: u64,
    /// Mean allocation lead time (app start), seconds.
    pub lead_s: f64,
    /// Lead times are drawn uniformly within this fraction of the mean.
    pub lead_spread: f64,
    /// Mean time a draining backend keeps requests in flight, seconds.
    pub drain_mean_s: f64,
    /// Network delay range, milliseconds.
    pub delay_ms: (u64, u64),
    /// Check invariants every this many passes.
    pub check_every: u32,
    /// Policy of every service.
    pub policy: PolicyKind,
    /// Node capacity C in the services' metric.
    pub capacity: f64,
    /// Monitor sampling period p of every service, seconds.
    pub period_s: f64,
    /// SLA upper threshold (violations are measured against it).
    pub ut: f64,
    /// SLA lower threshold (threshold and predictive policies release
    /// below it).
    pub lt: f64,
    /// Target of the HPA policy (its `sla.upper`), when it runs.
    pub hpa_target: f64,
    /// The other policies' `sla.upper`, when it is not `ut` (violations
    /// are still measured against `ut`); `sla.lower` keeps the distance
    /// between `ut` and `lt` below it.
    pub policy_ut: Option<f64>,
    /// Predictive policy's k.
    pub k: f64,
    /// Floor and ceiling of every service.
    pub min_nodes: u32,
    /// Ceiling (0: sized from the pool).
    pub max_nodes: u32,
    /// Per-backend report noise (sd, fraction of the load).
    pub node_noise: f64,
    /// Noise common to a service's backends (sd).
    pub common_noise: f64,
    /// Drain timeout of every service, seconds.
    pub drain_timeout_s: f64,
    /// Record one step per measurement (for plots; single service only).
    pub record_steps: bool,
    /// Seconds the cluster runs before the workload starts, its demand held
    /// at the workload's first value, with nothing measured: the services
    /// are already running when measurement begins (`shoal sim autoscale`).
    pub warmup_s: f64,
}

impl ClusterConfig {
    /// The defaults for `nodes` and `services`: the lease TTL grows with the
    /// pool (as Nomad's heartbeat TTL does, to bound renewals per second),
    /// and invariants are checked every pass up to 2,000 nodes.
    pub fn new(nodes: u32, services: u32) -> Self {
        Self {
            nodes,
            services,
            duration_s: 3600.0,
            workload: WorkloadSpec::Diurnal,
            faults: Faults::default_set(),
            seed: 1,
            ttl_ms: (u64::from(nodes) * 3).max(6000),
            pass_ms: 500,
            lead_s: 20.0,
            lead_spread: 0.5,
            drain_mean_s: 3.0,
            delay_ms: (1, 20),
            check_every: if nodes <= 2000 { 1 } else { 120 },
            policy: PolicyKind::Predictive,
            capacity: 100.0,
            period_s: if nodes <= 2000 { 2.0 } else { 5.0 },
            ut: 0.9,
            lt: Sla::default().lower,
            hpa_target: 0.8,
            policy_ut: None,
            k: 2.0,
            min_nodes: 1,
            max_nodes: 0,
            node_noise: 0.05,
            common_noise: 0.03,
            drain_timeout_s: 30.0,
            record_steps: false,
            warmup_s: 0.0,
        }
    }
}

/// An invariant that broke, with where.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Violation {
    /// The seed of the run.
    pub seed: u64,
    /// The controller pass (step) at which it was seen.
    pub step: u64,
    /// Simulated seconds.
    pub time_s: f64,
    /// What broke.
    pub what: String,
}

/// One measurement step of one service (single-service runs).
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// Simulated seconds.
    pub time: f64,
    /// True demand.
    pub demand: f64,
    /// The monitor's last summed load.
    pub observed: f64,
    /// Its last forecast.
    pub forecast: Option<f64>,
    /// Nodes allocated (starting + serving).
    pub allocated: u32,
    /// Nodes held: allocated plus draining (what node-seconds count).
    pub held: u32,
    /// Backends the dispatcher sends to that really serve.
    pub ready: u32,
    /// Demand above ut x serving capacity.
    pub violated: bool,
    /// The last decision's reason, when it changed.
    pub reason: Option<String>,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Seed.
    pub seed: u64,
    /// Allocation decisions the controller took.
    pub decisions: u64,
    /// Wall-clock seconds the run took.
    pub wall_s: f64,
    /// Decisions per wall-clock second.
    pub decisions_per_s: f64,
    /// Invariants that broke (empty when all held).
    pub invariant_violations: Vec<Violation>,
    /// SHA-256 of the ordered command stream.
    pub trace_sha256: String,
    /// Seconds (summed over services) in which demand exceeded ut x the
    /// capacity of the backends really serving.
    pub violation_seconds: f64,
    /// Integral of nodes held (starting, serving or draining), summed over
    /// services.
    pub node_seconds: f64,
    /// Nodes added plus nodes released.
    pub reallocations: u64,
    /// Nodes added.
    pub adds: u64,
    /// Nodes released.
    pub releases: u64,
    /// Most nodes one service held at once (single-service runs: the peak).
    pub peak_nodes: u32,
    /// Events the simulator processed.
    pub events: u64,
    /// Controller passes.
    pub passes: u64,
    /// Commands executed.
    pub commands: u64,
    /// Faults injected.
    pub crashes: u64,
    /// Manager restarts.
    pub manager_restarts: u64,
    /// Rolling updates started.
    pub updates: u64,
    /// Renewals and reports lost.
    pub lost: u64,
    /// Simulated seconds.
    pub simulated_s: f64,
    /// Per-step trace (single-service runs with `record_steps`).
    #[serde(skip)]
    pub steps: Vec<Step>,
    /// The forecaster's name (single-service runs).
    #[serde(skip)]
    pub forecaster: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Pass,
    /// A renewal arrives at the manager (sent one network delay earlier).
    Renew(u32),
    AppReady(u32, u64),
    Report(u32),
    Deliver(u32, u64),
    Crash(u32),
    Return(u32),
    ManagerDown,
    ManagerUp,
    Update,
    Measure,
}

#[derive(Debug)]
struct VApp {
    assignment: AppAssignment,
    state: AppState,
    token: u64,
}

#[derive(Debug)]
struct VNode {
    name: String,
    address: String,
    up: bool,
    apps: BTreeMap<String, VApp>,
    generation: u64,
    /// When the controller last heard this node (simulated ms).
    last_heard_ms: u64,
    crashed_at_ms: Option<u64>,
    /// Network delay of the renewal in flight.
    renew_delay_ms: u64,
}

#[derive(Debug)]
struct VDispatcher {
    list: Option<BackendList>,
    /// Draining backends: requests in flight until this time.
    in_flight_until: BTreeMap<String, u64>,
    demand: Vec<f64>,
    offset: usize,
    scale: f64,
    /// The nodes of the list's non-draining backends.
    live: Vec<u32>,
}

/// The virtual store: what a restarted controller is rebuilt from.
#[derive(Debug, Default, Clone)]
struct VStore {
    nodes: BTreeMap<String, NodeRecord>,
    flags: BTreeMap<String, NodeFlags>,
    services: BTreeMap<String, ServiceSpec>,
    allocs: BTreeMap<String, AllocDoc>,
    history: BTreeMap<String, Vec<SeriesPoint>>,
}

impl VStore {
    fn restored(&self) -> Restored {
        Restored {
            nodes: self
                .nodes
                .values()
                .map(|r| {
                    let f = self
                        .flags
                        .get(&r.registration.name)
                        .copied()
                        .unwrap_or_default();
                    (r.clone(), f)
                })
                .collect(),
            services: self.services.values().cloned().collect(),
            allocations: self
                .allocs
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            histories: self
                .history
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }
}

struct Sim {
    cfg: ClusterConfig,
    now_ms: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64, Ev)>>,
    rng: Rng,
    ctl: Option<Controller>,
    store: VStore,
    nodes: Vec<VNode>,
    node_index: BTreeMap<String, u32>,
    services: Vec<String>,
    app_ids: Vec<String>,
    dispatchers: Vec<VDispatcher>,
    hash: Sha256,
    report: Report,
    step: u64,
    below_min_since: Vec<Option<u64>>,
    token: u64,
    common: Vec<f64>,
    /// Wall clock of the simulated manager at time 0 (unix ms).
    epoch_unix_ms: u64,
    /// Wall-clock offset of the current manager's monotonic clock.
    mono_base_ms: u64,
    last_reason: Option<String>,
    pending_lists: BTreeMap<(u32, u64), BackendList>,
    before_restart: Option<Snapshot>,
    /// Decisions taken by controllers that were restarted since.
    decisions_before: u64,
}

const EPOCH_UNIX_MS: u64 = 1_800_000_000_000;

impl Sim {
    fn now(&self) -> Now {
        Now {
            mono_ms: self.now_ms - self.mono_base_ms,
            unix_ms: self.epoch_unix_ms + self.now_ms,
        }
    }

    fn at(&mut self, t_ms: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((t_ms, self.seq, ev)));
    }

    fn after(&mut self, dt_ms: u64, ev: Ev) {
        self.at(self.now_ms + dt_ms, ev);
    }

    fn delay(&mut self) -> u64 {
        let (lo, hi) = self.cfg.delay_ms;
        lo + (self.rng.uniform() * (hi.saturating_sub(lo)) as f64) as u64
    }

    fn exp_ms(&mut self, mean_s: f64) -> u64 {
        (-self.rng.uniform().ln() * mean_s * 1000.0) as u64
    }

    fn lost(&mut self) -> bool {
        let lost = self.cfg.faults.lose > 0.0 && self.rng.uniform() < self.cfg.faults.lose;
        if lost {
            self.report.lost += 1;
        }
        lost
    }

    fn violation(&mut self, what: String) {
        if self.report.invariant_violations.len() < 100 {
            self.report.invariant_violations.push(Violation {
                seed: self.cfg.seed,
                step: self.step,
                time_s: self.now_ms as f64 / 1000.0,
                what,
            });
        }
    }

    /// Hands an input to the controller (if the manager is up) and executes
    /// its commands.
    fn input(&mut self, input: Input) -> Option<Result<Reply, ControlError>> {
        let now = self.now();
        let r = self.ctl.as_mut()?.handle(now, input);
        self.execute();
        Some(r)
    }

    fn execute(&mut self) {
        while let Some(c) = self.ctl.as_mut().and_then(Controller::poll) {
            self.report.commands += 1;
            self.trace(&c);
            match c {
                Command::Persist(d) => self.persist(d),
                Command::Publish(list) => {
                    if let Some(i) = self.services.iter().position(|s| *s == list.service) {
                        let d = self.delay();
                        let v = list.version;
                        self.pending_lists.insert((i as u32, v), list);
                        self.after(d, Ev::Deliver(i as u32, v));
                    }
                }
                Command::Note(_) => {}
            }
        }
    }

    fn trace(&mut self, c: &Command) {
        let mut s = String::new();
        match c {
            Command::Persist(Doc::Allocation { service, doc }) => {
                let _ = write!(
                    s,
                    "alloc {service} v{} e{} s{}:",
                    doc.version, doc.app_epoch, doc.surge
                );
                for a in &doc.allocs {
                    let _ = write!(s, "{}/{:?}/{};", a.node, a.phase, a.address);
                }
            }
            Command::Persist(Doc::History { service, points }) => {
                let last = points.last().map(|p| p.observed.to_bits());
                let _ = write!(s, "history {service} {} {last:?}", points.len());
            }
            Command::Publish(l) => {
                let _ = write!(
                    s,
                    "publish {} v{} n{}",
                    l.service,
                    l.version,
                    l.backends.len()
                );
            }
            other => {
                let _ = write!(s, "{other:?}");
            }
        }
        self.hash.update(s.as_bytes());
        self.hash.update(b"\n");
    }

    fn persist(&mut self, d: Doc) {
        let measuring = self.measuring();
        let st = &mut self.store;
        match d {
            Doc::Registration(r) => {
                let e = st
                    .nodes
                    .entry(r.name.clone())
                    .or_insert_with(|| NodeRecord {
                        registration: r.clone(),
                        desired: Vec::new(),
                        generation: 0,
                    });
                e.registration = r;
            }
            Doc::Desired {
                node,
                apps,
                generation,
            } => {
                if let Some(e) = st.nodes.get_mut(&node) {
                    e.desired = apps;
                    e.generation = generation;
                }
            }
            Doc::Flags { node, flags } => {
                st.flags.insert(node, flags);
            }
            Doc::NodeDeleted(n) => {
                st.nodes.remove(&n);
                st.flags.remove(&n);
            }
            Doc::Service(s) => {
                st.services.insert(s.name.clone(), s);
            }
            Doc::ServiceDeleted(n) => {
                st.services.remove(&n);
            }
            Doc::Allocation { service, doc } => {
                let before = st.allocs.get(&service);
                // A node is added when it becomes allocated (starting or
                // serving) and released when it stops being so: when its
                // drain starts, not when the drain ends.
                let allocated = |d: &AllocDoc, n: &str| {
                    d.allocs
                        .iter()
                        .any(|a| a.node == n && a.phase != AllocPhase::Draining)
                };
                let adds = doc
                    .allocs
                    .iter()
                    .filter(|a| a.phase != AllocPhase::Draining)
                    .filter(|a| before.is_none_or(|b| !allocated(b, &a.node)))
                    .count() as u64;
                let releases = before.map_or(0, |b| {
                    b.allocs
                        .iter()
                        .filter(|a| a.phase != AllocPhase::Draining)
                        .filter(|a| !allocated(&doc, &a.node))
                        .count() as u64
                });
                if measuring {
                    self.report.adds += adds;
                    self.report.releases += releases;
                    let held = doc.allocs.len() as u32;
                    self.report.peak_nodes = self.report.peak_nodes.max(held);
                }
                st.allocs.insert(service, doc);
            }
            Doc::AllocationDeleted(n) => {
                st.allocs.remove(&n);
            }
            Doc::History { service, points } => {
                st.history.insert(service, points);
            }
            Doc::HistoryDeleted(n) => {
                st.history.remove(&n);
            }
        }
    }
}

impl Sim {
    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Pass => self.pass(),
            Ev::Renew(i) => self.renew(i),
            Ev::AppReady(i, token) => self.app_ready(i, token),
            Ev::Report(i) => self.dispatch_report(i),
            Ev::Deliver(i, v) => self.deliver(i, v),
            Ev::Crash(i) => self.crash(i),
            Ev::Return(i) => self.node_returns(i),
            Ev::ManagerDown => self.manager_down(),
            Ev::ManagerUp => self.manager_up(),
            Ev::Update => self.update(),
            Ev::Measure => self.measure(),
        }
    }

    /// Whether the warm-up is over and what happens counts.
    fn measuring(&self) -> bool {
        self.now_ms >= self.warmup_ms()
    }

    fn warmup_ms(&self) -> u64 {
        (self.cfg.warmup_s * 1000.0) as u64
    }

    fn renew_period_ms(&self) -> u64 {
        (self.cfg.ttl_ms / 3).max(1)
    }

    fn pass(&mut self) {
        let pass = self.cfg.pass_ms;
        self.after(pass, Ev::Pass);
        let now = self.now();
        let Some(ctl) = self.ctl.as_mut() else {
            return;
        };
        ctl.handle_timeout(now);
        self.step += 1;
        self.execute();
        self.report.passes += 1;
        if self
            .step
            .is_multiple_of(u64::from(self.cfg.check_every.max(1)))
        {
            self.check();
        }
    }

    /// The invariants, controller-side and simulator-side.
    fn check(&mut self) {
        let Some(ctl) = self.ctl.as_ref() else {
            return;
        };
        let mut found = ctl.check_invariants();
        let now = self.now();
        // A crashed node is out of every list within one pass of its
        // lease running out (the controller heard it last at last_heard).
        let ttl = self.cfg.ttl_ms;
        let slack = 2 * self.cfg.pass_ms;
        for n in self.nodes.iter().filter(|n| !n.up) {
            let deadline = n
                .last_heard_ms
                .max(self.mono_base_ms + self.restart_grace())
                + ttl;
            if self.now_ms > deadline + slack
                && let Some(s) = ctl.holder(&n.name)
                && let Ok(list) = ctl.backend_list(s)
                && list.backends.iter().any(|b| b.node == n.name)
            {
                found.push(format!(
                    "{} crashed at {:.1} s and is still in {s}'s backend list",
                    n.name,
                    n.crashed_at_ms.unwrap_or(0) as f64 / 1000.0
                ));
            }
        }
        // Every drain ends by its timeout (plus the pass that sees it).
        for name in &self.services {
            if let Some(doc) = ctl.allocations(name) {
                for a in doc
                    .allocs
                    .iter()
                    .filter(|a| a.phase == AllocPhase::Draining)
                {
                    let age = now.unix_ms.saturating_sub(a.since_ms);
                    if age > (self.cfg.drain_timeout_s * 1000.0) as u64 + slack {
                        found.push(format!(
                            "{name}: {} has drained for {:.1} s, past the {} s timeout",
                            a.node,
                            age as f64 / 1000.0,
                            self.cfg.drain_timeout_s
                        ));
                    }
                }
            }
        }
        // Never below the floor for longer than a sampling period (plus a
        // pass) while a node that could serve is free.
        let free = ctl.free_count();
        let grace = (self.cfg.period_s * 1000.0) as u64 + slack + self.cfg.lead_ms_max();
        for (i, name) in self.services.iter().enumerate() {
            let Some(spec) = ctl.spec(name) else { continue };
            let held = ctl.allocations(name).map_or(0, |d| {
                d.allocs
                    .iter()
                    .filter(|a| a.phase != AllocPhase::Draining)
                    .count()
            }) as u32;
            if held < spec.min_nodes && free > 0 {
                let since = *self.below_min_since[i].get_or_insert(self.now_ms);
                if self.now_ms - since > grace {
                    found.push(format!(
                        "{name} holds {held} nodes, below min_nodes {}, for {:.1} s while {free} nodes are free",
                        spec.min_nodes,
                        (self.now_ms - since) as f64 / 1000.0
                    ));
                    self.below_min_since[i] = Some(self.now_ms);
                }
            } else {
                self.below_min_since[i] = None;
            }
        }
        for f in found {
            self.violation(f);
        }
    }

    fn restart_grace(&self) -> u64 {
        self.ctl.as_ref().map_or(0, |c| c.config().grace_ms)
    }

    /// A renewal arrives; the agent's next one is sent a renewal period
    /// (less jitter) after this one was, and arrives a fresh delay later.
    /// One event per renewal: at 10,000 nodes renewals are most events.
    fn renew(&mut self, i: u32) {
        if !self.nodes[i as usize].up {
            return;
        }
        let period = self.renew_period_ms();
        let jitter = (self.rng.uniform() * period as f64 * 0.1) as u64;
        let sent_delay = self.nodes[i as usize].renew_delay_ms;
        let d = self.delay();
        self.nodes[i as usize].renew_delay_ms = d;
        self.after(
            (period - jitter + d).saturating_sub(sent_delay).max(1),
            Ev::Renew(i),
        );
        if self.lost() {
            return;
        }
        self.renew_arrives(i);
    }

    fn renew_arrives(&mut self, i: u32) {
        let n = &self.nodes[i as usize];
        if !n.up || self.ctl.is_none() {
            return;
        }
        let apps: Vec<AppStatus> = n
            .apps
            .values()
            .map(|a| AppStatus {
                id: a.assignment.id.clone(),
                adaptor: a.assignment.adaptor.clone(),
                state: a.state,
                pid: None,
                restarts: 0,
                endpoint: None,
                message: (a.state == AppState::Failed).then(|| "exited with status 1".into()),
                bandwidth: None,
                stream: None,
            })
            .collect();
        let input = Input::Renew {
            node: n.name.clone(),
            load: None,
            apps,
            applied: (n.generation != u64::MAX).then_some(n.generation),
        };
        let r = self.input(input);
        self.nodes[i as usize].last_heard_ms = self.now_ms;
        match r {
            Some(Ok(Reply::Renewed(resp))) => self.apply_desired(i, resp),
            Some(Err(ControlError::NotRegistered(_))) => self.register(i),
            _ => {}
        }
    }

    fn register(&mut self, i: u32) {
        let n = &self.nodes[i as usize];
        let reg = Registration {
            name: n.name.clone(),
            address: n.address.clone(),
            roles: vec!["web".into()],
            capacities: BTreeMap::new(),
        };
        if self.input(Input::Register(reg)).is_some() {
            self.nodes[i as usize].last_heard_ms = self.now_ms;
        }
    }

    /// The agent's reconcile: start what is desired and not running, stop
    /// what runs and is not desired.
    fn apply_desired(&mut self, i: u32, resp: RenewResponse) {
        if resp.generation == self.nodes[i as usize].generation {
            return;
        }
        self.nodes[i as usize].generation = resp.generation;
        let desired: BTreeMap<String, AppAssignment> = resp
            .desired
            .into_iter()
            .map(|a| (a.id.clone(), a))
            .collect();
        self.nodes[i as usize]
            .apps
            .retain(|id, _| desired.contains_key(id));
        for (id, a) in desired {
            let same = self.nodes[i as usize]
                .apps
                .get(&id)
                .is_some_and(|x| x.assignment == a);
            if same {
                continue;
            }
            self.token += 1;
            let token = self.token;
            let fail =
                self.cfg.faults.app_fail > 0.0 && self.rng.uniform() < self.cfg.faults.app_fail;
            let lead =
                self.cfg.lead_s * (1.0 + self.cfg.lead_spread * (2.0 * self.rng.uniform() - 1.0));
            let ms = (lead.max(0.0) * 1000.0) as u64;
            self.nodes[i as usize].apps.insert(
                id,
                VApp {
                    assignment: a,
                    state: AppState::Starting,
                    token,
                },
            );
            if fail {
                // It fails a little after it was started.
                self.after(ms / 4, Ev::AppReady(i, token | (1 << 63)));
            } else {
                self.after(ms, Ev::AppReady(i, token));
            }
        }
    }

    fn app_ready(&mut self, i: u32, token: u64) {
        let failed = token & (1 << 63) != 0;
        let token = token & !(1 << 63);
        let n = &mut self.nodes[i as usize];
        if !n.up {
            return;
        }
        if let Some(a) = n.apps.values_mut().find(|a| a.token == token) {
            a.state = if failed {
                AppState::Failed
            } else {
                AppState::Running
            };
        }
    }

    /// Whether node `i` really serves service `svc` now.
    fn serves(&self, i: u32, svc: usize) -> bool {
        let n = &self.nodes[i as usize];
        n.up && n
            .apps
            .get(&self.app_ids[svc])
            .is_some_and(|a| a.state == AppState::Running)
    }

    fn demand(&self, svc: usize) -> f64 {
        let d = &self.dispatchers[svc];
        if d.demand.is_empty() {
            return 0.0;
        }
        let step = self.cfg.period_s;
        let t = self.now_ms.saturating_sub(self.warmup_ms()) as f64 / 1000.0;
        let idx = ((t / step + 1e-6) as usize + d.offset) % d.demand.len();
        d.demand[idx] * d.scale
    }

    fn dispatch_report(&mut self, svc: u32) {
        self.after(1000, Ev::Report(svc));
        if self.ctl.is_none() || self.lost() {
            return;
        }
        let s = svc as usize;
        let demand = self.demand(s);
        let now = self.now_ms;
        let c = self.cfg.capacity;
        let step = (now / 1000) as usize;
        let common = self.common[step % self.common.len()];
        let mut rng = Rng::new(self.cfg.seed ^ u64::from(svc) << 32, step as u64);
        let d = &mut self.dispatchers[s];
        let Some(list) = d.list.as_ref() else {
            return;
        };
        d.in_flight_until.retain(|_, until| *until > now);
        let live = list.backends.iter().filter(|b| !b.draining).count();
        let per = if live > 0 {
            (demand / live as f64).min(c)
        } else {
            0.0
        };
        let backends = list
            .backends
            .iter()
            .map(|b| {
                let z = rng.normal();
                if b.draining {
                    let held = u32::from(d.in_flight_until.contains_key(&b.address));
                    BackendLoad {
                        address: b.address.clone(),
                        active: f64::from(held),
                        in_flight: held,
                        rps: 0.0,
                    }
                } else {
                    let active = (per * (1.0 + common + self.cfg.node_noise * z)).clamp(0.0, c);
                    BackendLoad {
                        address: b.address.clone(),
                        active,
                        in_flight: active.round() as u32,
                        rps: active * 10.0,
                    }
                }
            })
            .collect();
        let report = DispatchReport {
            dispatcher: format!("d{svc}"),
            version: list.version,
            backends,
            federation: None,
        };
        let service = self.services[s].clone();
        self.input(Input::Report { service, report });
    }

    fn deliver(&mut self, svc: u32, version: u64) {
        let Some(list) = self.pending_lists.remove(&(svc, version)) else {
            return;
        };
        let now = self.now_ms;
        let mean = self.cfg.drain_mean_s;
        let d = &self.dispatchers[svc as usize];
        if d.list.as_ref().is_some_and(|l| l.version >= list.version) {
            return;
        }
        let newly: Vec<String> = list
            .backends
            .iter()
            .filter(|b| b.draining)
            .filter(|b| {
                d.list.as_ref().is_none_or(|old| {
                    old.backends
                        .iter()
                        .any(|o| o.address == b.address && !o.draining)
                })
            })
            .map(|b| b.address.clone())
            .collect();
        for a in newly {
            let until = now
                + self
                    .exp_ms(mean)
                    .min((self.cfg.drain_timeout_s * 2000.0) as u64);
            self.dispatchers[svc as usize]
                .in_flight_until
                .insert(a, until);
        }
        let live = list
            .backends
            .iter()
            .filter(|b| !b.draining)
            .filter_map(|b| self.node_index.get(&b.node).copied())
            .collect();
        let d = &mut self.dispatchers[svc as usize];
        d.live = live;
        d.list = Some(list);
    }

    fn crash(&mut self, i: u32) {
        let n = &mut self.nodes[i as usize];
        if n.up {
            n.up = false;
            n.apps.clear();
            n.crashed_at_ms = Some(self.now_ms);
            self.report.crashes += 1;
            let down = self.exp_ms(self.cfg.faults.down_mean_s);
            self.after(down.max(1000), Ev::Return(i));
        }
        self.schedule_crash(i);
    }

    fn schedule_crash(&mut self, i: u32) {
        let rate = self.cfg.faults.crash_per_s;
        if rate > 0.0 {
            let t = self.exp_ms(1.0 / rate);
            self.after(t.max(1), Ev::Crash(i));
        }
    }

    fn node_returns(&mut self, i: u32) {
        let n = &mut self.nodes[i as usize];
        n.up = true;
        n.generation = u64::MAX;
        n.crashed_at_ms = None;
        // A fresh agent registers, then renews.
        self.register(i);
        let d = self.delay();
        self.nodes[i as usize].renew_delay_ms = d;
        self.after(2 * d, Ev::Renew(i));
    }

    fn manager_down(&mut self) {
        let Some(ctl) = self.ctl.take() else {
            return;
        };
        self.report.manager_restarts += 1;
        self.decisions_before += ctl.decisions();
        self.before_restart = Some(Snapshot::of(&ctl, &self.services, self.now()));
        let down = (self.cfg.faults.manager_down_s * 1000.0) as u64;
        self.after(down.max(1), Ev::ManagerUp);
        let rate = self.cfg.faults.restart_manager_per_s;
        if rate > 0.0 {
            let t = self.exp_ms(1.0 / rate);
            self.after(t.max(down + 1), Ev::ManagerDown);
        }
    }

    fn manager_up(&mut self) {
        // A new process: its monotonic clock starts at zero.
        self.mono_base_ms = self.now_ms;
        let cfg = self.controller_config();
        let now = self.now();
        let ctl = Controller::restore(cfg, now, self.store.restored());
        if let Some(before) = self.before_restart.take() {
            for v in before.lost_in(&ctl, now) {
                self.violation(v);
            }
        }
        self.ctl = Some(ctl);
        self.execute();
        // Dispatchers reconnect and fetch their lists.
        for i in 0..self.services.len() {
            if let Some(list) = self
                .ctl
                .as_ref()
                .and_then(|c| c.backend_list(&self.services[i]).ok())
            {
                let d = self.delay();
                let v = list.version;
                self.pending_lists.insert((i as u32, v), list);
                // A list re-fetched after a restart replaces whatever the
                // dispatcher had, even at the same version.
                if let Some(l) = self.dispatchers[i].list.as_mut() {
                    l.version = v.saturating_sub(1).min(l.version);
                }
                self.after(d, Ev::Deliver(i as u32, v));
            }
        }
    }

    fn controller_config(&self) -> Config {
        Config {
            ttl_ms: self.cfg.ttl_ms,
            grace_ms: self.cfg.ttl_ms * 2 + 2000,
            pass_ms: self.cfg.pass_ms,
            full_reconcile_ms: 60_000,
            ..Config::default()
        }
    }

    fn update(&mut self) {
        let rate = self.cfg.faults.update_per_s;
        if rate > 0.0 {
            let t = self.exp_ms(1.0 / rate);
            self.after(t.max(1), Ev::Update);
        }
        if self.ctl.is_none() || self.services.is_empty() {
            return;
        }
        let i = (self.rng.uniform() * self.services.len() as f64) as usize % self.services.len();
        let Some(mut spec) = self
            .ctl
            .as_ref()
            .and_then(|c| c.spec(&self.services[i]).cloned())
        else {
            return;
        };
        let v = spec
            .app
            .params
            .get("env.VERSION")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        spec.app
            .params
            .insert("env.VERSION".into(), (v + 1).to_string());
        self.report.updates += 1;
        self.input(Input::ApplyService(spec));
    }

    fn measure(&mut self) {
        let step_ms = (self.cfg.period_s * 1000.0) as u64;
        self.after(step_ms, Ev::Measure);
        let step = self.cfg.period_s;
        let ut = self.cfg.ut;
        let c = self.cfg.capacity;
        for s in 0..self.services.len() {
            let demand = self.demand(s);
            let d = &self.dispatchers[s];
            let ready = d.live.iter().filter(|&&i| self.serves(i, s)).count() as u32;
            let violated = demand > ut * f64::from(ready) * c + 1e-9;
            if violated {
                self.report.violation_seconds += step;
            }
            let (held, allocated) = self
                .ctl
                .as_ref()
                .and_then(|ctl| ctl.allocations(&self.services[s]))
                .or_else(|| self.store.allocs.get(&self.services[s]))
                .map_or((0, 0), |d| {
                    let allocated = d
                        .allocs
                        .iter()
                        .filter(|a| a.phase != AllocPhase::Draining)
                        .count();
                    (d.allocs.len(), allocated)
                });
            self.report.node_seconds += held as f64 * step;
            if self.cfg.record_steps {
                let st = self
                    .ctl
                    .as_ref()
                    .and_then(|c| c.service_status(&self.services[s]));
                let reason = st.as_ref().and_then(|x| x.last_decision.clone());
                let changed = reason != self.last_reason;
                self.last_reason.clone_from(&reason);
                self.report.steps.push(Step {
                    time: (self.now_ms - self.warmup_ms()) as f64 / 1000.0,
                    demand,
                    observed: st.as_ref().and_then(|x| x.usage).unwrap_or(0.0),
                    forecast: st.as_ref().and_then(|x| x.forecast),
                    allocated: allocated as u32,
                    held: held as u32,
                    ready,
                    violated,
                    reason: reason.filter(|_| changed),
                });
            }
        }
    }
}

/// What the controller held before a restart, to check that a restart
/// loses nothing it persisted and keeps failures failed.
struct Snapshot {
    allocs: BTreeMap<String, AllocDoc>,
    specs: BTreeMap<String, ServiceSpec>,
    failed: Vec<String>,
    nodes: usize,
}

impl Snapshot {
    fn of(ctl: &Controller, services: &[String], now: Now) -> Self {
        let nodes = ctl.nodes(now);
        Self {
            allocs: services
                .iter()
                .filter_map(|s| Some((s.clone(), ctl.allocations(s)?.clone())))
                .collect(),
            specs: services
                .iter()
                .filter_map(|s| Some((s.clone(), ctl.spec(s)?.clone())))
                .collect(),
            failed: nodes
                .iter()
                .filter(|n| n.state == LeaseState::Failed)
                .map(|n| n.name.clone())
                .collect(),
            nodes: nodes.len(),
        }
    }

    fn lost_in(&self, ctl: &Controller, now: Now) -> Vec<String> {
        let mut v = Vec::new();
        for (s, doc) in &self.allocs {
            if ctl.allocations(s) != Some(doc) {
                v.push(format!("manager restart changed {s}'s allocations"));
            }
        }
        for (s, spec) in &self.specs {
            if ctl.spec(s) != Some(spec) {
                v.push(format!("manager restart lost {s}'s definition"));
            }
        }
        for n in &self.failed {
            if ctl
                .node(n, now)
                .is_none_or(|x| x.state != LeaseState::Failed)
            {
                v.push(format!(
                    "failed node {n} is not failed after a manager restart"
                ));
            }
        }
        if ctl.node_count() != self.nodes {
            v.push(format!(
                "manager restart: {} registrations before, {} after",
                self.nodes,
                ctl.node_count()
            ));
        }
        v
    }
}

impl ClusterConfig {
    fn lead_ms_max(&self) -> u64 {
        (self.lead_s * (1.0 + self.lead_spread) * 1000.0) as u64 + 2 * self.ttl_ms / 3
    }

    /// Checks the settings, naming the bad one.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.nodes >= 1, "--nodes must be at least 1");
        anyhow::ensure!(self.services >= 1, "--services must be at least 1");
        anyhow::ensure!(
            self.services <= self.nodes,
            "--services {} is more than --nodes {}: every service needs a node",
            self.services,
            self.nodes
        );
        anyhow::ensure!(
            self.duration_s.is_finite() && self.duration_s > 0.0,
            "--duration must be positive"
        );
        anyhow::ensure!(self.ttl_ms >= 300, "--lease-ttl must be at least 300ms");
        anyhow::ensure!(self.pass_ms >= 10, "--pass must be at least 10ms");
        anyhow::ensure!(
            self.period_s.is_finite() && self.period_s >= 0.1,
            "--period must be at least 100ms"
        );
        anyhow::ensure!(
            self.lead_s.is_finite() && self.lead_s >= 0.0,
            "--lead-time must not be negative"
        );
        anyhow::ensure!(
            self.min_nodes <= self.max_nodes || self.max_nodes == 0,
            "--min-nodes {} is above --max-nodes {}",
            self.min_nodes,
            self.max_nodes
        );
        anyhow::ensure!(
            self.capacity.is_finite() && self.capacity > 0.0,
            "--capacity must be positive"
        );
        anyhow::ensure!(
            self.warmup_s.is_finite() && self.warmup_s >= 0.0,
            "the warm-up must not be negative"
        );
        Ok(())
    }

    /// The services' definition (all alike but for name, scale and the
    /// policy's settings).
    pub fn service_spec(&self, name: &str, max_nodes: u32, season: Option<f64>) -> ServiceSpec {
        let (upper, lower) = match (self.policy, self.policy_ut) {
            (PolicyKind::Hpa, _) => (self.hpa_target, self.lt.min(self.hpa_target)),
            (_, Some(u)) => (u, (u - (self.ut - self.lt)).max(0.01)),
            (_, None) => (self.ut, self.lt.min(self.ut)),
        };
        let mut params = Params::new();
        params.insert("command".into(), "/usr/bin/server".into());
        params.insert(
            "args".into(),
            "--listen {{ node_address }}:{{ port }}".into(),
        );
        ServiceSpec {
            name: name.to_string(),
            app: ServiceApp {
                adaptor: "process".into(),
                port: Some(8080),
                backend: "{{ node_address }}:{{ port }}".into(),
                params,
            },
            dispatch: DispatchSettings::default(),
            metric: MetricSpec {
                kind: MetricKind::DispatchActive,
                capacity: self.capacity,
            },
            min_nodes: self.min_nodes,
            max_nodes,
            priority: 0,
            sla: Sla { upper, lower },
            policy: self.policy,
            lead_time_secs: self.lead_s,
            drain_timeout_secs: self.drain_timeout_s,
            period_secs: self.period_s,
            role: None,
            forecast: ForecastTuning {
                k: self.k,
                season_secs: season,
            },
            bandwidth: None,
            federation: None,
        }
    }
}

/// Runs one simulation.
pub fn simulate(cfg: &ClusterConfig) -> anyhow::Result<Report> {
    cfg.validate()?;
    let w: Workload = cfg.workload.build(cfg.period_s, cfg.seed)?;
    simulate_workload(cfg, &w)
}

/// Runs one simulation of `w` (built on `cfg.period_s`); `cfg.workload`
/// is not read.
pub fn simulate_workload(cfg: &ClusterConfig, w: &Workload) -> anyhow::Result<Report> {
    cfg.validate()?;
    anyhow::ensure!(
        (w.step - cfg.period_s).abs() < 1e-9,
        "the workload's step {} s differs from the sampling period {} s",
        w.step,
        cfg.period_s
    );
    let wall = std::time::Instant::now();
    let mut rng = Rng::new(cfg.seed, 0x5eed);
    anyhow::ensure!(!w.demand.is_empty(), "the workload is empty");
    let peak = w.demand.iter().copied().fold(0.0, f64::max).max(1e-9);
    let single = cfg.services == 1;
    // Every service peaks at a share of the pool (its own phase of the
    // workload); together the peaks fit with a margin when out of phase.
    let per_service = f64::from(cfg.nodes) / f64::from(cfg.services);
    let max_nodes = if cfg.max_nodes > 0 {
        cfg.max_nodes
    } else {
        ((per_service * 1.5).ceil() as u32).max(cfg.min_nodes.max(1))
    };
    let mut sim = Sim {
        cfg: cfg.clone(),
        now_ms: 0,
        seq: 0,
        queue: BinaryHeap::new(),
        rng: Rng::new(cfg.seed, 0x51),
        ctl: None,
        store: VStore::default(),
        nodes: Vec::new(),
        node_index: BTreeMap::new(),
        services: Vec::new(),
        app_ids: Vec::new(),
        dispatchers: Vec::new(),
        hash: Sha256::new(),
        report: Report {
            seed: cfg.seed,
            decisions: 0,
            wall_s: 0.0,
            decisions_per_s: 0.0,
            invariant_violations: Vec::new(),
            trace_sha256: String::new(),
            violation_seconds: 0.0,
            node_seconds: 0.0,
            reallocations: 0,
            adds: 0,
            releases: 0,
            peak_nodes: 0,
            events: 0,
            passes: 0,
            commands: 0,
            crashes: 0,
            manager_restarts: 0,
            updates: 0,
            lost: 0,
            simulated_s: cfg.duration_s,
            steps: Vec::new(),
            forecaster: None,
        },
        step: 0,
        below_min_since: vec![None; cfg.services as usize],
        token: 0,
        common: Vec::new(),
        epoch_unix_ms: EPOCH_UNIX_MS,
        mono_base_ms: 0,
        last_reason: None,
        pending_lists: BTreeMap::new(),
        before_restart: None,
        decisions_before: 0,
    };
    // Common-mode report noise: AR(1) over seconds, shared by a service's
    // backends (bitrate and ACK fluctuation in LAMA's audio workload).
    let mut crng = Rng::new(cfg.seed, 0xc0);
    let phi: f64 = 0.7;
    let innov = cfg.common_noise * (1.0 - phi * phi).sqrt();
    let mut x = 0.0;
    sim.common = (0..3600)
        .map(|_| {
            x = phi * x + innov * crng.normal();
            x
        })
        .collect();
    sim.ctl = Some(Controller::new(sim.controller_config()));
    for i in 0..cfg.nodes {
        let name = format!("n{i:05}");
        // One address per node (10.x.y.z is never contacted: these are
        // names in a simulation).
        let address = format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255);
        sim.node_index.insert(name.clone(), i);
        sim.nodes.push(VNode {
            name,
            address,
            up: true,
            apps: BTreeMap::new(),
            generation: u64::MAX,
            last_heard_ms: 0,
            crashed_at_ms: None,
            renew_delay_ms: 0,
        });
        sim.register(i);
        let first = (rng.uniform() * sim.renew_period_ms() as f64) as u64;
        let d = sim.delay();
        sim.nodes[i as usize].renew_delay_ms = d;
        sim.at(first + d, Ev::Renew(i));
        sim.schedule_crash(i);
    }
    // Service demand: the workload, each service at its own phase, scaled
    // so its peak needs a drawn share of its ceiling.
    for s in 0..cfg.services {
        let name = format!("svc{s:03}");
        let spec = sim.cfg.service_spec(&name, max_nodes, w.season);
        let offset = if single {
            0
        } else {
            (rng.uniform() * w.demand.len() as f64) as usize
        };
        let share = if single {
            1.0
        } else {
            0.3 + 0.5 * rng.uniform()
        };
        let scale = if single {
            1.0
        } else {
            share * f64::from(max_nodes) / 1.5 * cfg.capacity * cfg.ut / peak
        };
        sim.app_ids.push(app_id(&name));
        sim.services.push(name);
        sim.dispatchers.push(VDispatcher {
            list: None,
            in_flight_until: BTreeMap::new(),
            demand: w.demand.clone(),
            offset,
            scale,
            live: Vec::new(),
        });
        sim.input(Input::ApplyService(spec));
        sim.at(500 + (rng.uniform() * 1000.0) as u64, Ev::Report(s));
    }
    sim.at(0, Ev::Pass);
    sim.at(sim.warmup_ms(), Ev::Measure);
    let f = &cfg.faults;
    if f.restart_manager_per_s > 0.0 {
        let t = sim.exp_ms(1.0 / f.restart_manager_per_s);
        sim.at(t.max(1), Ev::ManagerDown);
    }
    if f.update_per_s > 0.0 {
        let t = sim.exp_ms(1.0 / f.update_per_s);
        sim.at(t.max(1), Ev::Update);
    }
    let end = ((cfg.warmup_s + cfg.duration_s) * 1000.0).round() as u64;
    while let Some(Reverse((t, _, ev))) = sim.queue.pop() {
        if t >= end {
            break;
        }
        sim.now_ms = t;
        sim.report.events += 1;
        sim.handle(ev);
    }
    if sim.ctl.is_some() {
        sim.check();
    }
    let forecaster = sim
        .ctl
        .as_ref()
        .zip(sim.services.first())
        .and_then(|(c, s)| c.forecaster_name(s));
    let mut r = sim.report;
    r.forecaster = forecaster.filter(|_| single);
    r.decisions = sim.ctl.as_ref().map_or(0, Controller::decisions) + sim.decisions_before;
    r.reallocations = r.adds + r.releases;
    r.trace_sha256 = hex(&sim.hash.finalize());
    r.wall_s = wall.elapsed().as_secs_f64();
    r.decisions_per_s = r.decisions as f64 / r.wall_s.max(1e-9);
    Ok(r)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

const AFTER_HELP: &str = "\
Drives the manager's own controller (shoal_core::control) with virtual
agents, dispatchers and a virtual store on a virtual clock. Every service
gets the workload's shape at its own phase and scale.

Faults (--faults): none, default, or KEY=VALUE,... on top of none:
  crash=RATE            node crashes per node (RATE: N/s, N/m, N/h, N/d)
  down=DURATION         mean down time of a crashed node (default 10m)
  restart-manager=RATE  manager restarts (rebuilt from what it persisted)
  manager-down=DURATION how long a restarting manager is away (default 2s)
  lose-report=P         probability a renewal or report is lost
  app-fail=P            probability an app fails to start
  update=RATE           service app changes (rolling updates), pool-wide
  default: a node crashes about once a week (crash=1/604800s), the manager
  restarts every 6 h (restart-manager=4/d), lose-report=0.02, app-fail=0.01,
  update=1/h

--json prints {\"decisions\", \"wall_s\", \"invariant_violations\": [...],
\"trace_sha256\", \"violation_seconds\", \"node_seconds\", \"reallocations\", ...};
with --seeds A..B an object {\"runs\": [...], \"failed_seeds\": [...]}.
A run whose invariants broke exits non-zero and prints the command that
reproduces it.

Examples:
  shoal sim cluster --nodes 200 --services 8 --duration 2h --faults default --seed 7
  shoal sim cluster --nodes 10000 --services 100 --duration 24h --faults default --seed 1 --json
  shoal sim cluster --nodes 50 --services 4 --duration 30m --seeds 1..200";

/// Arguments of `shoal sim cluster`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct ClusterArgs {
    /// Nodes in the pool.
    #[arg(long, default_value_t = 100)]
    pub nodes: u32,
    /// Services sharing the pool.
    #[arg(long, default_value_t = 4)]
    pub services: u32,
    /// Simulated time (500ms, 6s, 2m, 1h).
    #[arg(long, default_value = "1h", value_parser = duration_arg)]
    pub duration: f64,
    /// Demand shape: lama-audio, diurnal, flash-crowd, noisy-wave or csv:PATH.
    #[arg(long, default_value = "diurnal")]
    pub workload: WorkloadSpec,
    /// Fault rates (see below).
    #[arg(long, default_value = "default")]
    pub faults: Faults,
    /// Seed of everything random.
    #[arg(long, default_value_t = 1, conflicts_with = "seeds")]
    pub seed: u64,
    /// Run every seed in A..B (inclusive) and report the failing ones.
    #[arg(long, value_parser = seeds_arg)]
    pub seeds: Option<(u64, u64)>,
    /// Allocation policy of every service: threshold, ar, hpa, predictive.
    #[arg(long, default_value = "predictive", value_parser = policy_arg)]
    pub policy: PolicyKind,
    /// Lease TTL (default: 6 s, or 3 ms per node above 2,000 nodes).
    #[arg(long, value_parser = duration_arg)]
    pub lease_ttl: Option<f64>,
    /// Mean allocation lead time (app start); drawn within +-50 %.
    #[arg(long, default_value = "20s", value_parser = duration_arg)]
    pub lead_time: f64,
    /// Check invariants every N controller passes (default: every pass up
    /// to 2,000 nodes, every 120th, once a minute, above).
    #[arg(long)]
    pub check_every: Option<u32>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Write cluster-SEED.json here.
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
}

/// The `--duration`-style flags' parser (`500ms`, `6s`, `2m`, `1h`).
pub(crate) fn duration_arg(s: &str) -> Result<f64, String> {
    shoal_core::duration::parse_secs(s).map_err(|e| e.to_string())
}

pub(crate) fn seeds_arg(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("{s:?} is not a range; use A..B, e.g. 1..200"))?;
    let a: u64 = a
        .parse()
        .map_err(|_| format!("{a:?} is not a seed number"))?;
    let b: u64 = b
        .parse()
        .map_err(|_| format!("{b:?} is not a seed number"))?;
    if a > b {
        return Err(format!(
            "the range {s} is empty; write the smaller seed first"
        ));
    }
    Ok((a, b))
}

fn policy_arg(s: &str) -> Result<PolicyKind, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| format!("unknown policy {s:?}; use threshold, ar, hpa or predictive"))
}

impl ClusterArgs {
    /// The configuration for `seed`.
    pub fn config(&self, seed: u64) -> ClusterConfig {
        let mut c = ClusterConfig::new(self.nodes, self.services);
        c.duration_s = self.duration;
        c.workload = self.workload.clone();
        c.faults = self.faults.clone();
        c.seed = seed;
        c.policy = self.policy;
        c.lead_s = self.lead_time;
        if let Some(t) = self.lease_ttl {
            c.ttl_ms = (t * 1000.0) as u64;
        }
        if let Some(k) = self.check_every {
            c.check_every = k.max(1);
        }
        c
    }

    /// The command that reproduces one seed's run.
    pub fn repro(&self, seed: u64) -> String {
        let mut s = format!(
            "shoal sim cluster --nodes {} --services {} --duration {}s --workload {} --faults {} --policy {} --lead-time {}s --seed {seed}",
            self.nodes,
            self.services,
            self.duration,
            workload_name(&self.workload),
            faults_spec(&self.faults),
            serde_json::to_value(self.policy)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            self.lead_time
        );
        if let Some(t) = self.lease_ttl {
            s.push_str(&format!(" --lease-ttl {t}s"));
        }
        if let Some(k) = self.check_every {
            s.push_str(&format!(" --check-every {k}"));
        }
        s
    }
}

fn workload_name(w: &WorkloadSpec) -> String {
    match w {
        WorkloadSpec::LamaAudio => "lama-audio".into(),
        WorkloadSpec::Diurnal => "diurnal".into(),
        WorkloadSpec::FlashCrowd => "flash-crowd".into(),
        WorkloadSpec::NoisyWave => "noisy-wave".into(),
        WorkloadSpec::Csv(p) => format!("csv:{}", p.display()),
    }
}

/// The `--faults` spelling of `f`, exact.
pub fn faults_spec(f: &Faults) -> String {
    format!(
        "crash={}/s,down={}s,restart-manager={}/s,manager-down={}s,lose-report={},app-fail={},update={}/s",
        f.crash_per_s,
        f.down_mean_s,
        f.restart_manager_per_s,
        f.manager_down_s,
        f.lose,
        f.app_fail,
        f.update_per_s
    )
}

/// Runs `shoal sim cluster`.
pub fn run(args: &ClusterArgs) -> anyhow::Result<()> {
    use std::io::Write;
    let seeds: Vec<u64> = match args.seeds {
        Some((a, b)) => (a..=b).collect(),
        None => vec![args.seed],
    };
    let mut reports = Vec::new();
    let mut failed = Vec::new();
    for &seed in &seeds {
        let r = simulate(&args.config(seed))?;
        if !r.invariant_violations.is_empty() {
            failed.push(seed);
        }
        if let Some(dir) = &args.out {
            std::fs::create_dir_all(dir)
                .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
            let p = dir.join(format!("cluster-{seed}.json"));
            std::fs::write(&p, serde_json::to_string_pretty(&r)?)
                .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", p.display()))?;
        }
        reports.push(r);
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        let v = if args.seeds.is_some() {
            serde_json::json!({"runs": reports, "failed_seeds": failed})
        } else {
            serde_json::to_value(&reports[0])?
        };
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        writeln!(
            out,
            "{:>6} {:>9} {:>8} {:>10} {:>12} {:>12} {:>7} {:>7} {:>8}  trace",
            "seed",
            "decisions",
            "wall s",
            "dec/s",
            "violation s",
            "node-s",
            "crashes",
            "restarts",
            "broken"
        )?;
        for r in &reports {
            writeln!(
                out,
                "{:>6} {:>9} {:>8.2} {:>10.0} {:>12.0} {:>12.0} {:>7} {:>7} {:>8}  {}",
                r.seed,
                r.decisions,
                r.wall_s,
                r.decisions_per_s,
                r.violation_seconds,
                r.node_seconds,
                r.crashes,
                r.manager_restarts,
                r.invariant_violations.len(),
                &r.trace_sha256[..16]
            )?;
        }
    }
    if !failed.is_empty() {
        for r in reports
            .iter()
            .filter(|r| !r.invariant_violations.is_empty())
        {
            for v in r.invariant_violations.iter().take(5) {
                eprintln!(
                    "seed {} step {} at {:.1} s: {}",
                    v.seed, v.step, v.time_s, v.what
                );
            }
            eprintln!("reproduce with: {}", args.repro(r.seed));
        }
        anyhow::bail!(
            "invariants broke in {} of {} runs (seeds {:?})",
            failed.len(),
            reports.len(),
            failed
        );
    }
    Ok(())
}
