//! One SMON peer's epidemic step (Fig. 2), sans-I/O in the manner of
//! quinn-proto: the caller hands it the time, the messages that arrived and
//! the outcomes of the SSH work it asked for, and drains the commands it
//! decided ([`Peer::poll`]) and the time it next wants to be woken
//! ([`Peer::poll_timeout`]).
//!
//! Every interval the peer pings one target drawn uniformly from the list
//! (itself excluded: a self-ping proves nothing). A ping unanswered within the
//! timeout becomes a [`Command::Contact`]: the shell logs in over SSH, looks
//! ([`Inspection`]), applies [`remedy`] and reports an [`Outcome`]. No retry
//! of its own: another peer picks the target later (II-A-1). The peer keeps
//! pinging while a contact runs, and never contacts the same target twice at
//! once. Both the ping and its answer carry the sender's [`Versions`]; a newer
//! target list or package on the other side becomes a pull command, a newer
//! livetag is adopted on the spot, and while the livetag is off the peer
//! answers but does not ping (II-A-4).

use super::targets::TargetList;
use super::version::{Livetag, Version, Versions, compare};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

/// Milliseconds on the caller's clock (Unix time live, virtual in the
/// simulator).
pub type Millis = u64;

/// The randomness a peer draws from, injected so a simulation reproduces
/// from its seed.
pub trait Random {
    /// A uniform integer in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64;
}

/// Timers of the epidemic step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// Between two pings (the paper used 5 s; shoal defaults to 1 s).
    pub interval_ms: Millis,
    /// How long a ping waits for its answer before the target is contacted.
    pub timeout_ms: Millis,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            interval_ms: 1000,
            timeout_ms: 500,
        }
    }
}

/// What an SSH login found on a target that did not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inspection {
    /// A complete installation is there (its marker is written last).
    pub installed: bool,
    /// A peer runs there (holding the run lock).
    pub running: bool,
    /// Another deployer claimed it less than a minute ago and is copying
    /// its package ([`super::deploy::CLAIM`]).
    #[serde(default)]
    pub deploying: bool,
}

/// What to do about an unanswering target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Remedy {
    /// Not installed: copy the package, install, start.
    Deploy,
    /// Installed and not running: start it (idempotently).
    Recover,
    /// Running after all (the ping or its answer was lost): nothing.
    Nothing,
}

/// The decision of SMON Fig. 2 after login.
///
/// Beyond the paper: a host another deployer is copying to (a fresh claim)
/// is left to it. SMON's duplicates only abort once they have copied
/// everything; on a busy pool the copies were most of the cost.
pub fn remedy(i: Inspection) -> Remedy {
    match (i.installed, i.running, i.deploying) {
        (_, true, _) => Remedy::Nothing,
        (true, false, _) => Remedy::Recover,
        (false, false, true) => Remedy::Nothing,
        (false, false, false) => Remedy::Deploy,
    }
}

/// How a contact ended, as the shell reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "outcome", content = "detail")]
pub enum Outcome {
    /// This peer installed and started it.
    Deployed,
    /// This peer started the installed one.
    Recovered,
    /// It was running (a lost ping), or another deployer's copy won the
    /// install lock and this one aborted: a duplicate deployment.
    AlreadyRunning,
    /// SSH could not reach it or log in.
    Unreachable(String),
    /// Its host key is not the one in the target list: never deployed to.
    WrongHostKey(String),
    /// Anything else (a corrupt package, a failed start).
    Failed(String),
}

/// What the peer asks its shell to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Send a ping carrying `versions` to the target at `target`.
    Ping {
        /// Index in the current target list.
        target: usize,
        /// Echoed in the answer.
        seq: u64,
        /// This peer's versions.
        versions: Versions,
    },
    /// The target did not answer: log in, inspect, apply [`remedy`], report
    /// with [`Peer::handle_outcome`].
    Contact {
        /// Index in the current target list.
        target: usize,
        /// The target list version the index refers to.
        list: Version,
    },
    /// The peer at `from` holds a newer target list: fetch it and hand it to
    /// [`Peer::adopt_targets`].
    FetchTargets {
        /// Index in the current target list.
        from: usize,
    },
    /// The peer at `from` runs a newer package (self-upgrade is the next
    /// issue's; the shell reports it).
    NewerPeer {
        /// Index in the current target list.
        from: usize,
        /// Its version.
        version: Version,
    },
    /// This host runs a manager (its target's `manager`, a cluster
    /// directory): start it if it is not running, and report with
    /// [`Peer::handle_manager`]. Once a round while the livetag is on.
    KeepManager {
        /// The manager's cluster directory.
        dir: String,
    },
}

/// How keeping the host's manager alive went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ManagerOutcome {
    /// It was running.
    Running,
    /// It was not; it was started.
    Started,
    /// It was not, and could not be started: why.
    Failed(String),
}

/// What this peer knows of one target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Never heard of since this peer started.
    Unknown,
    /// Answered a ping (or pinged us).
    Alive,
    /// Did not answer; this peer is logged in and deploying or recovering.
    Contacting,
    /// This peer deployed it.
    Deployed,
    /// This peer recovered it.
    Recovered,
    /// Unreachable over SSH at the last contact.
    Unreachable,
    /// Showed a host key other than the list's: never deployed to.
    WrongHostKey,
    /// The last contact failed otherwise.
    Failed,
}

/// One target as this peer sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct View {
    /// Its state.
    pub state: State,
    /// When it last answered or pinged us.
    pub last_seen_ms: Option<Millis>,
    /// Its versions then.
    pub versions: Option<Versions>,
    /// When this peer last deployed it.
    pub deployed_ms: Option<Millis>,
    /// When this peer last recovered it.
    pub recovered_ms: Option<Millis>,
    /// Contacts this peer made to it (deploys, recoveries, failures).
    pub contacts: u32,
    /// The last contact's detail (an error, a duplicate).
    pub detail: Option<String>,
}

impl Default for View {
    fn default() -> Self {
        Self {
            state: State::Unknown,
            last_seen_ms: None,
            versions: None,
            deployed_ms: None,
            recovered_ms: None,
            contacts: 0,
            detail: None,
        }
    }
}

/// Counters for status and for the simulator's load figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Counters {
    /// Pings sent.
    pub pings_sent: u64,
    /// Pings received (and answered).
    pub pings_received: u64,
    /// Answers received in time.
    pub answers: u64,
    /// Pings that timed out.
    pub timeouts: u64,
    /// Contacts asked for.
    pub contacts: u64,
    /// Deployments made.
    pub deployed: u64,
    /// Recoveries made.
    pub recovered: u64,
    /// Starts of this host's manager after it was found not running.
    #[serde(default)]
    pub manager_starts: u64,
}

#[derive(Debug, Clone, Copy)]
struct Outstanding {
    target: usize,
    deadline: Millis,
}

/// One peer.
#[derive(Debug, Clone)]
pub struct Peer {
    me: Option<usize>,
    name: String,
    config: Config,
    targets: Arc<TargetList>,
    versions: Versions,
    next_round: Millis,
    seq: u64,
    outstanding: BTreeMap<u64, Outstanding>,
    views: BTreeMap<usize, View>,
    out: VecDeque<Command>,
    counters: Counters,
    manager: Option<(Millis, ManagerOutcome)>,
}

impl Peer {
    /// A peer called `name` (its entry in `targets`, if it has one) running
    /// package version `peer`, that pings first at `first_round` (a random
    /// phase within an interval, so peers do not ping in step).
    pub fn new(
        name: &str,
        targets: Arc<TargetList>,
        peer: Version,
        livetag: Livetag,
        config: Config,
        first_round: Millis,
    ) -> Self {
        let versions = Versions {
            peer,
            targets: targets.version(),
            livetag,
        };
        Self {
            me: targets.index(name),
            name: name.to_string(),
            config: Config {
                interval_ms: config.interval_ms.max(1),
                ..config
            },
            targets,
            versions,
            next_round: first_round,
            seq: 0,
            outstanding: BTreeMap::new(),
            manager: None,
            views: BTreeMap::new(),
            out: VecDeque::new(),
            counters: Counters::default(),
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Its own index in the list, if it is listed.
    pub fn me(&self) -> Option<usize> {
        self.me
    }
    /// Its versions (what its pings carry).
    pub fn versions(&self) -> Versions {
        self.versions
    }
    /// Its target list.
    pub fn targets(&self) -> &Arc<TargetList> {
        &self.targets
    }
    /// Its timers.
    pub fn config(&self) -> Config {
        self.config
    }
    /// Its counters.
    pub fn counters(&self) -> Counters {
        self.counters
    }
    /// What it knows of the target at `i`.
    pub fn view(&self, i: usize) -> Option<&View> {
        self.views.get(&i)
    }
    /// Every target it has a view of, by index.
    pub fn views(&self) -> impl Iterator<Item = (usize, &View)> {
        self.views.iter().map(|(i, v)| (*i, v))
    }
    /// Whether a contact to `i` is under way.
    pub fn contacting(&self, i: usize) -> bool {
        self.views
            .get(&i)
            .is_some_and(|v| v.state == State::Contacting)
    }

    /// The next command, if any.
    pub fn poll(&mut self) -> Option<Command> {
        self.out.pop_front()
    }

    /// When it next wants [`Peer::handle_timeout`]: the next round while the
    /// livetag is on, or the earliest ping deadline.
    pub fn poll_timeout(&self) -> Option<Millis> {
        let deadline = self.outstanding.values().map(|o| o.deadline).min();
        let round = self.versions.livetag.on.then_some(self.next_round);
        match (deadline, round) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Expires unanswered pings and runs a round if one is due.
    pub fn handle_timeout(&mut self, now: Millis, rng: &mut dyn Random) {
        let expired: Vec<u64> = self
            .outstanding
            .iter()
            .filter(|(_, o)| o.deadline <= now)
            .map(|(s, _)| *s)
            .collect();
        for seq in expired {
            let Some(o) = self.outstanding.remove(&seq) else {
                continue;
            };
            self.counters.timeouts += 1;
            let view = self.views.entry(o.target).or_default();
            // A later answer, or a contact already running, settles it.
            if view.state == State::Contacting
                || view
                    .last_seen_ms
                    .is_some_and(|t| t + self.config.timeout_ms > now)
            {
                continue;
            }
            view.state = State::Contacting;
            view.contacts += 1;
            self.counters.contacts += 1;
            self.out.push_back(Command::Contact {
                target: o.target,
                list: self.targets.version(),
            });
        }
        if self.versions.livetag.on && now >= self.next_round {
            self.next_round = if self.next_round + self.config.interval_ms > now {
                self.next_round + self.config.interval_ms
            } else {
                // Woken late (a suspended process): one ping, no burst.
                now + self.config.interval_ms
            };
            if let Some(target) = self.pick(rng) {
                self.seq += 1;
                self.counters.pings_sent += 1;
                self.outstanding.insert(
                    self.seq,
                    Outstanding {
                        target,
                        deadline: now + self.config.timeout_ms,
                    },
                );
                self.out.push_back(Command::Ping {
                    target,
                    seq: self.seq,
                    versions: self.versions,
                });
            }
            if let Some(dir) = self
                .me
                .and_then(|me| self.targets.get(me))
                .and_then(|t| t.manager.clone())
            {
                self.out.push_back(Command::KeepManager { dir });
            }
        }
    }

    /// How keeping this host's manager alive went ([`Command::KeepManager`]).
    pub fn handle_manager(&mut self, outcome: ManagerOutcome, now: Millis) {
        if outcome == ManagerOutcome::Started {
            self.counters.manager_starts += 1;
        }
        // The last start stays on show while the manager runs: status says
        // when it was last restarted. A failure shows until it runs again.
        match (&self.manager, &outcome) {
            (Some((_, ManagerOutcome::Started)), ManagerOutcome::Running) => {}
            _ => self.manager = Some((now, outcome)),
        }
    }

    /// The last thing keeping this host's manager alive did, and when.
    pub fn manager(&self) -> Option<&(Millis, ManagerOutcome)> {
        self.manager.as_ref()
    }

    /// A uniform target other than this peer.
    fn pick(&self, rng: &mut dyn Random) -> Option<usize> {
        let n = self.targets.len() as u64;
        match self.me {
            Some(_) if n < 2 => None,
            Some(me) => {
                let i = rng.below(n - 1) as usize;
                Some(if i >= me { i + 1 } else { i })
            }
            None => Some(rng.below(n) as usize),
        }
    }

    /// A ping from the target at `from` arrived: returns the answer's
    /// versions (this peer's, after adopting a newer livetag).
    pub fn handle_ping(&mut self, from: usize, theirs: &Versions, now: Millis) -> Versions {
        self.counters.pings_received += 1;
        self.seen(from, theirs, now);
        self.versions
    }

    /// The answer to ping `seq` from the target at `from` arrived.
    pub fn handle_answer(&mut self, from: usize, seq: u64, theirs: &Versions, now: Millis) {
        if self.outstanding.get(&seq).is_some_and(|o| o.target == from) {
            self.outstanding.remove(&seq);
            self.counters.answers += 1;
        }
        self.seen(from, theirs, now);
    }

    fn seen(&mut self, from: usize, theirs: &Versions, now: Millis) {
        if from >= self.targets.len() || Some(from) == self.me {
            return;
        }
        let view = self.views.entry(from).or_default();
        if view.state != State::Contacting {
            view.state = State::Alive;
        }
        view.last_seen_ms = Some(now);
        view.versions = Some(*theirs);
        let newer = compare(&self.versions, theirs);
        if newer.livetag {
            self.versions.livetag = theirs.livetag;
        }
        if newer.targets {
            self.out.push_back(Command::FetchTargets { from });
        }
        if newer.peer {
            self.out.push_back(Command::NewerPeer {
                from,
                version: theirs.peer,
            });
        }
    }

    /// A contact to the target at `target` (an index into list `list`)
    /// ended with `outcome`.
    pub fn handle_outcome(&mut self, target: usize, list: Version, outcome: Outcome, now: Millis) {
        if list != self.targets.version() || target >= self.targets.len() {
            // The list changed meanwhile; the index means another machine.
            return;
        }
        let view = self.views.entry(target).or_default();
        let (state, detail) = match outcome {
            Outcome::Deployed => {
                view.deployed_ms = Some(now);
                self.counters.deployed += 1;
                (State::Deployed, None)
            }
            Outcome::Recovered => {
                view.recovered_ms = Some(now);
                self.counters.recovered += 1;
                (State::Recovered, None)
            }
            Outcome::AlreadyRunning => (State::Alive, Some("already running".to_string())),
            Outcome::Unreachable(e) => (State::Unreachable, Some(e)),
            Outcome::WrongHostKey(e) => (State::WrongHostKey, Some(e)),
            Outcome::Failed(e) => (State::Failed, Some(e)),
        };
        view.state = state;
        view.detail = detail;
    }

    /// Adopts `list` if its version is higher; returns whether it did. Views
    /// follow their targets by name; contacts under way are forgotten (their
    /// outcomes name the old list and are dropped).
    pub fn adopt_targets(&mut self, list: Arc<TargetList>) -> bool {
        if list.version() <= self.targets.version() {
            return false;
        }
        let mut views = BTreeMap::new();
        for (i, v) in std::mem::take(&mut self.views) {
            if let Some(j) = self.targets.get(i).and_then(|t| list.index(&t.name)) {
                let mut v = v;
                if v.state == State::Contacting {
                    v.state = State::Unknown;
                }
                views.insert(j, v);
            }
        }
        self.views = views;
        self.outstanding.clear();
        self.me = list.index(&self.name);
        self.versions.targets = list.version();
        self.targets = list;
        true
    }

    /// Sets the livetag (the operator's `enable`/`disable` at one peer).
    pub fn set_livetag(&mut self, livetag: Livetag) -> bool {
        if livetag.version > self.versions.livetag.version {
            self.versions.livetag = livetag;
            true
        } else {
            false
        }
    }
}
