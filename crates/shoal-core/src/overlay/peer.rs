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

use super::apps::{AppSpec, Apps, Heard, Notice, StateTag};
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

/// How many intervals a disabled peer waits without hearing from any peer
/// before it exits (SMON leaves the period open, notes §7 item 9). Disabling
/// spreads by pull (a peer still on learns the tag when it pings one that is
/// off): about 7 intervals at 117 hosts, the paper's 6.8, and 12 at 10,000
/// in `shoal sim overlay --scenario disable`. A peer that exits before the
/// last peer still on has learned is found dead and recovered, at the cost
/// of an SSH login; 30 intervals leaves that tail well behind while a
/// disabled pool still goes away within a minute at the default 1 s.
pub const QUIET_INTERVALS: u64 = 30;

/// How many intervals a refused release is not pulled again from anyone.
pub const REFUSE_INTERVALS: u64 = 10;

/// How long an upgrade may take (fetch, verify, swap) before a newer
/// notice may start another.
pub const UPGRADE_STALE_MS: Millis = 120_000;

impl Config {
    /// A disabled peer's quiet period before it exits.
    pub fn quiet_ms(&self) -> Millis {
        self.interval_ms.saturating_mul(QUIET_INTERVALS)
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
    /// Upgrade to `version` (II-A-3): fetch the package from `from`,
    /// verify the signed manifest and the binary's digest, swap it in and
    /// re-execute. A failure is reported with [`Peer::handle_upgrade_failed`].
    Upgrade {
        /// Where the package is.
        from: Source,
        /// The version to fetch.
        version: Version,
    },
    /// This peer runs a release the overlay marked bad: go back to the
    /// previous release if this host holds one, else report it with
    /// [`Peer::handle_rollback_failed`] and a good release is pulled from
    /// the next peer that runs one.
    RollBack {
        /// The bad version it runs.
        version: Version,
    },
    /// The livetag is off and no peer spoke for [`Config::quiet_ms`]:
    /// exit (II-A-4). Apps are left running.
    Exit,
    /// Tell the peer at `target` about one of this peer's apps (II-D).
    AppNotice {
        /// Index in the current target list.
        target: usize,
        /// The app's name.
        name: String,
        /// Its version and state.
        notice: Notice,
    },
    /// Pull version `version` of app `name` from `from`, verify it and
    /// install it; report with [`Peer::handle_app_fetched`].
    FetchApp {
        /// Where the package is.
        from: Source,
        /// The app.
        name: String,
        /// The version told.
        version: Version,
    },
    /// An app's spec or state changed: bring the host's apps in line with
    /// [`Peer::apps`] (level-triggered; the shell also does so every round).
    Supervise,
    /// This host runs a manager (its target's `manager`, a cluster
    /// directory): start it if it is not running, and report with
    /// [`Peer::handle_manager`]. Once a round while the livetag is on.
    KeepManager {
        /// The manager's cluster directory.
        dir: String,
    },
}

/// Where a package comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The peer at this index of the current target list.
    Peer(usize),
    /// The client utility that offered it (II-E: it mimics a peer); the
    /// shell holds its address.
    Utility,
}

/// The last self-upgrade attempt, for status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeNote {
    /// When.
    pub at_ms: Millis,
    /// The version tried.
    pub version: Version,
    /// Why it failed (a refused signature, a bad digest, an unreachable
    /// source); `None` while it runs.
    pub error: Option<String>,
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
    /// Upgrades asked for (fetches of a newer package).
    #[serde(default)]
    pub upgrades: u64,
    /// Upgrades that failed or were refused (bad signature, bad digest).
    #[serde(default)]
    pub upgrades_refused: u64,
    /// App notices sent.
    #[serde(default)]
    pub app_notices: u64,
    /// App pulls asked for.
    #[serde(default)]
    pub app_fetches: u64,
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
    /// Every release this peer learned is bad.
    bad: std::collections::BTreeSet<Version>,
    /// An upgrade under way: its version and when it began.
    upgrading: Option<(Version, Millis)>,
    /// Releases refused lately, and until when they are not pulled again.
    refused: BTreeMap<Version, Millis>,
    /// The last upgrade attempt.
    last_upgrade: Option<UpgradeNote>,
    /// It runs a bad release and has no previous one to go back to.
    stranded: bool,
    /// A rollback was asked for.
    rolling_back: bool,
    /// When a peer last spoke to it (a ping or an answer), or it started.
    heard_ms: Millis,
    /// When its livetag last changed, or it started.
    livetag_ms: Millis,
    /// It asked to exit.
    exiting: bool,
    apps: Apps,
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
            bad: Version::default(),
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
            bad: Default::default(),
            upgrading: None,
            refused: BTreeMap::new(),
            last_upgrade: None,
            stranded: false,
            rolling_back: false,
            heard_ms: first_round,
            livetag_ms: first_round,
            exiting: false,
            apps: Apps::default(),
        }
    }

    /// Marks the releases in `bad` as bad (restored from the peer's
    /// directory at start, or learned by a rollback); if this peer runs one
    /// of them, asks for a rollback.
    pub fn mark_bad(&mut self, bad: impl IntoIterator<Item = Version>) {
        for v in bad {
            if v == Version::default() {
                continue;
            }
            self.bad.insert(v);
            if v > self.versions.bad {
                self.versions.bad = v;
            }
        }
        if self.bad.contains(&self.versions.peer) && !self.rolling_back && !self.stranded {
            self.rolling_back = true;
            self.out.push_back(Command::RollBack {
                version: self.versions.peer,
            });
        }
    }

    /// Every release it knows to be bad.
    pub fn bad(&self) -> impl Iterator<Item = &Version> {
        self.bad.iter()
    }

    /// The rollback could not be done here (no previous release on this
    /// host): the next peer running a good release is pulled from.
    pub fn handle_rollback_failed(&mut self) {
        self.rolling_back = false;
        self.stranded = true;
    }

    /// The upgrade to `version` failed (or was refused): why. It is not
    /// pulled again for [`REFUSE_INTERVALS`].
    pub fn handle_upgrade_failed(&mut self, version: Version, error: String, now: Millis) {
        if self.upgrading.is_some_and(|(v, _)| v == version) {
            self.upgrading = None;
        }
        self.counters.upgrades_refused += 1;
        self.refused.insert(
            version,
            now + self.config.interval_ms.saturating_mul(REFUSE_INTERVALS),
        );
        self.last_upgrade = Some(UpgradeNote {
            at_ms: now,
            version,
            error: Some(error),
        });
    }

    /// The last upgrade attempt.
    pub fn last_upgrade(&self) -> Option<&UpgradeNote> {
        self.last_upgrade.as_ref()
    }

    /// The client utility offers `version` (`shoal overlay upgrade`):
    /// returns whether this peer will pull it.
    pub fn handle_offer(&mut self, version: Version, now: Millis) -> bool {
        self.consider_upgrade(Source::Utility, version, now)
    }

    fn consider_upgrade(&mut self, from: Source, version: Version, now: Millis) -> bool {
        let wanted =
            version > self.versions.peer || (self.stranded && version != self.versions.peer);
        // Self-management is off: no upgrades either.
        if !wanted || self.bad.contains(&version) || self.exiting || !self.versions.livetag.on {
            return false;
        }
        if self
            .upgrading
            .is_some_and(|(_, at)| now < at + UPGRADE_STALE_MS)
        {
            return false;
        }
        if self.refused.get(&version).is_some_and(|until| now < *until) {
            return false;
        }
        self.refused.retain(|_, until| now < *until);
        self.upgrading = Some((version, now));
        self.counters.upgrades += 1;
        self.last_upgrade = Some(UpgradeNote {
            at_ms: now,
            version,
            error: None,
        });
        self.out.push_back(Command::Upgrade { from, version });
        true
    }

    /// Its apps.
    pub fn apps(&self) -> &Apps {
        &self.apps
    }

    /// Restores its installed apps (from its directory, at start).
    pub fn restore_apps(&mut self, apps: Apps) {
        self.apps = apps;
    }

    /// The peer at `from` (or the utility) holds app `name` at `notice`.
    pub fn handle_app_notice(&mut self, from: Source, name: &str, notice: &Notice, now: Millis) {
        if let Source::Peer(i) = from
            && (i >= self.targets.len() || Some(i) == self.me)
        {
            return;
        }
        match self.apps.heard(name, notice, now) {
            Heard::Fetch(version) => {
                self.counters.app_fetches += 1;
                self.out.push_back(Command::FetchApp {
                    from,
                    name: name.to_string(),
                    version,
                });
            }
            Heard::StateChanged => self.out.push_back(Command::Supervise),
            Heard::Nothing => {}
        }
    }

    /// A pull of app `name` ended: the verified, installed spec and the
    /// state it came with, or why not.
    pub fn handle_app_fetched(
        &mut self,
        name: &str,
        result: Result<(AppSpec, StateTag), String>,
        now: Millis,
    ) {
        if self.apps.fetched(name, result, now) {
            self.out.push_back(Command::Supervise);
        }
    }

    /// The utility installs `spec` here (`shoal overlay app install`).
    pub fn install_app(&mut self, spec: AppSpec, state: StateTag) -> bool {
        let changed = self.apps.install(spec, state);
        if changed {
            self.out.push_back(Command::Supervise);
        }
        changed
    }

    /// The utility sets an app's state here (`shoal overlay app state`).
    pub fn set_app_state(&mut self, name: &str, tag: StateTag) -> Result<bool, String> {
        let changed = self.apps.set_state(name, tag)?;
        if changed {
            self.out.push_back(Command::Supervise);
        }
        Ok(changed)
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
        let round = if self.versions.livetag.on {
            Some(self.next_round)
        } else {
            (!self.exiting).then(|| self.quiet_until())
        };
        match (deadline, round) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// When a disabled peer exits if no peer speaks before.
    fn quiet_until(&self) -> Millis {
        self.heard_ms.max(self.livetag_ms) + self.config.quiet_ms()
    }

    /// Expires unanswered pings and runs a round if one is due.
    pub fn handle_timeout(&mut self, now: Millis, rng: &mut dyn Random) {
        if !self.versions.livetag.on && !self.exiting && now >= self.quiet_until() {
            self.exiting = true;
            self.out.push_back(Command::Exit);
        }
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
            // II-D: one of its apps, told to another random peer.
            if let Some((name, notice)) = self.apps.next_notice()
                && let Some(target) = self.pick(rng)
            {
                self.counters.app_notices += 1;
                self.out.push_back(Command::AppNotice {
                    target,
                    name,
                    notice,
                });
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

    /// Whether it asked to exit (disabled and quiet).
    pub fn exiting(&self) -> bool {
        self.exiting
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
        self.heard_ms = self.heard_ms.max(now);
        let view = self.views.entry(from).or_default();
        if view.state != State::Contacting {
            view.state = State::Alive;
        }
        view.last_seen_ms = Some(now);
        view.versions = Some(*theirs);
        let newer = compare(&self.versions, theirs);
        if newer.livetag {
            self.versions.livetag = theirs.livetag;
            self.livetag_ms = now;
        }
        if newer.targets {
            self.out.push_back(Command::FetchTargets { from });
        }
        if newer.bad {
            self.mark_bad([theirs.bad]);
        }
        // A newer release, or any good one while this peer is stranded on
        // a bad release; never one marked bad.
        self.consider_upgrade(Source::Peer(from), theirs.peer, now);
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
    pub fn set_livetag(&mut self, livetag: Livetag, now: Millis) -> bool {
        if livetag.version > self.versions.livetag.version {
            self.versions.livetag = livetag;
            self.livetag_ms = now;
            true
        } else {
            false
        }
    }
}
