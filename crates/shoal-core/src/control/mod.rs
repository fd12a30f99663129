//! The controller: every decision of the control plane as one sans-I/O state
//! machine, in the manner of quinn-proto. The manager (its I/O shell) and
//! the whole-cluster simulator drive the same code.
//!
//! Inputs are [`Input`]s handed to [`Controller::handle`] with the time, and
//! [`Controller::handle_timeout`] when [`Controller::poll_timeout`] says so.
//! Outputs are [`Command`]s, drained with [`Controller::poll`], that the
//! caller executes in order: persist a document (the store), publish a
//! backend list (dispatchers), record a note (the event log). Assigning an
//! app to a node is a durable write of the node's desired apps
//! ([`Doc::Desired`]); agents pull it at their next renewal, so the
//! controller never talks to a node.
//!
//! What it decides (LAMA Fig. 6 and Oceano's shared pool, Fig. 1): leases
//! and failure (durable until the node renews again, also across a
//! restart); the allocation life cycle (starting -> serving -> draining ->
//! released, start timeouts, immediate removal of a failed node); the
//! monitor and the policy of every service once per sampling period; the
//! shared pool's arbitration with pre-emption across priorities; rolling
//! updates when a service's app changes; cordon and drain of nodes; and
//! which nodes must run which apps. Every persisted document is written
//! before any command that depends on it, so a crash between the two is
//! repaired by the next pass after a restart (level-triggered).
//!
//! Time comes in as [`Now`]: a monotonic clock for leases and timers, and
//! the wall clock for what is persisted (allocation phases survive a
//! restart, the monotonic clock does not).

pub mod model;
pub mod monitor;
mod pass;
pub mod render;
#[cfg(test)]
mod tests;

use crate::lease::{LeaseState, LeaseTable, Renewal};
use model::*;
use monitor::{Monitor, REPORT_FRESH_MS};
use pass::available;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

pub use render::{APP_PREFIX, RenderCtx, RenderError, app_id, render};

/// The two clocks every input carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Monotonic milliseconds (any epoch; restarts with the process).
    pub mono_ms: u64,
    /// Wall clock, unix milliseconds.
    pub unix_ms: u64,
}

impl Now {
    fn secs(self) -> f64 {
        self.mono_ms as f64 / 1000.0
    }
}

/// Controller settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Lease duration.
    pub ttl_ms: u64,
    /// Lease granted to every restored registration after a restart, so
    /// live nodes can find the manager again before being called failed.
    pub grace_ms: u64,
    /// How often the allocation pass runs.
    pub pass_ms: u64,
    /// How often every node's desired apps are recomputed, not only those
    /// whose allocation changed (repairs a write the shell lost).
    pub full_reconcile_ms: u64,
    /// How often a service's monitor series tail is persisted.
    pub history_every_ms: u64,
    /// How many series points are persisted.
    pub history_len: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            ttl_ms: 6000,
            grace_ms: 14_000,
            pass_ms: 250,
            full_reconcile_ms: 10_000,
            history_every_ms: 10_000,
            history_len: 300,
        }
    }
}

/// An event the controller is told about.
#[derive(Debug, Clone, PartialEq)]
// Inputs, documents and commands move once per decision on the control
// plane, never per request: a service spec inline costs less than a box.
#[allow(clippy::large_enum_variant)]
pub enum Input {
    /// A node registered (or registered again).
    Register(Registration),
    /// A node renewed its lease with its load and its apps' states.
    Renew {
        /// The node.
        node: String,
        /// Its latest load sample, if it took one.
        load: Option<LoadSample>,
        /// Its apps as its adaptors report them.
        apps: Vec<AppStatus>,
        /// The desired-apps generation those states are of, when the agent
        /// says.
        applied: Option<u64>,
    },
    /// A node cancelled its registration.
    Cancel(String),
    /// An operator set a node's hand-assigned apps (service apps stay the
    /// controller's).
    AssignApps {
        /// The node.
        node: String,
        /// The complete list (level-triggered).
        apps: Vec<AppAssignment>,
    },
    /// A dispatcher reported the load it sends to a service's backends.
    Report {
        /// The service.
        service: String,
        /// The report.
        report: DispatchReport,
    },
    /// A service was created or changed (already validated).
    ApplyService(ServiceSpec),
    /// A service was deleted: its nodes drain and return to the pool.
    DeleteService(String),
    /// The node takes no new allocation.
    Cordon(String),
    /// The node may take allocations again.
    Uncordon(String),
    /// Cordon, and move the node's allocation elsewhere through a drain.
    Drain(String),
    /// Forget a node that is failed (or cancelled) and holds nothing.
    Remove(String),
}

/// The answer to an [`Input`].
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// Registered, with the lease duration.
    Registered {
        /// Lease duration, milliseconds.
        ttl_ms: u64,
    },
    /// Renewed: what the node should run.
    Renewed(RenewResponse),
    /// The node's hand-assigned apps are now these, at this generation.
    Assigned {
        /// The node's desired-apps generation.
        generation: u64,
    },
    /// A service was applied.
    Applied {
        /// It did not exist before.
        created: bool,
    },
    /// Done, nothing to return.
    Done,
}

/// Inputs refused, with the fix.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ControlError {
    /// The node is not registered.
    #[error("node {0:?} is not registered; register it first (agents do this on their own)")]
    NotRegistered(String),
    /// No such service.
    #[error("no service named {0:?}; see `shoal service list`")]
    NoService(String),
    /// The input cannot be applied in the current state.
    #[error("{0}")]
    Refused(String),
}

/// A document to write durably.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)]
pub enum Doc {
    /// A node's registration (its desired apps are kept).
    Registration(Registration),
    /// A node's desired apps: the assignment an agent pulls.
    Desired {
        /// The node.
        node: String,
        /// Everything it should run.
        apps: Vec<AppAssignment>,
        /// Bumped at each change.
        generation: u64,
    },
    /// A node's durable flags (failed, cordoned).
    Flags {
        /// The node.
        node: String,
        /// Its flags.
        flags: NodeFlags,
    },
    /// A node is forgotten.
    NodeDeleted(String),
    /// A service definition.
    Service(ServiceSpec),
    /// A service definition is gone (its allocations drain out).
    ServiceDeleted(String),
    /// A service's allocations.
    Allocation {
        /// The service.
        service: String,
        /// Its allocation state.
        doc: AllocDoc,
    },
    /// A drained-out deleted service's allocations are gone.
    AllocationDeleted(String),
    /// The tail of a service's monitor series, so forecasts resume warm.
    History {
        /// The service.
        service: String,
        /// Oldest first.
        points: Vec<SeriesPoint>,
    },
    /// A service's series is gone.
    HistoryDeleted(String),
}

/// Something that happened, with its reason, for the event log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// `registered`, `failed`, `service`, `decision`, `app`, ...
    pub kind: &'static str,
    /// The node concerned, if any.
    pub node: Option<String>,
    /// The service concerned, if any.
    pub service: Option<String>,
    /// What and why.
    pub message: String,
}

/// What the caller must do, in order.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Write a document before executing any later command.
    Persist(Doc),
    /// A service's backend list changed: dispatchers following it fetch it.
    Publish(BackendList),
    /// Record an event.
    Note(Note),
}

/// What a restarted manager read from its store.
#[derive(Debug, Clone, Default)]
pub struct Restored {
    /// Node records with their flags.
    pub nodes: Vec<(NodeRecord, NodeFlags)>,
    /// Service definitions.
    pub services: Vec<ServiceSpec>,
    /// Allocation documents by service (a document without a definition is
    /// a deletion still draining).
    pub allocations: Vec<(String, AllocDoc)>,
    /// Persisted monitor series by service.
    pub histories: Vec<(String, Vec<SeriesPoint>)>,
}

#[derive(Debug, Clone)]
struct Node {
    record: NodeRecord,
    flags: NodeFlags,
    load: Option<LoadSample>,
    apps: Vec<AppStatus>,
    /// The service holding this node, if any (an index over allocations).
    service: Option<String>,
    /// The desired generation its agent last said it applied.
    applied: Option<u64>,
}

#[derive(Debug)]
struct Service {
    spec: Option<ServiceSpec>,
    doc: AllocDoc,
    monitor: Option<Monitor>,
    /// Dispatchers' last reports, with when they arrived (monotonic ms).
    reports: BTreeMap<String, (u64, DispatchReport)>,
    last_decision: Option<String>,
    /// Each serving node's utilization (0..1) at the last monitor step.
    util: BTreeMap<String, f64>,
    history_due_ms: u64,
}

impl Service {
    fn new(spec: Option<ServiceSpec>, doc: AllocDoc, out: &mut Vec<Note>) -> Self {
        let monitor = spec.as_ref().and_then(|s| match Monitor::new(s) {
            Ok(m) => Some(m),
            Err(e) => {
                out.push(Note {
                    kind: "service",
                    node: None,
                    service: Some(s.name.clone()),
                    message: format!("{}: monitor cannot start: {e}", s.name),
                });
                None
            }
        });
        Self {
            spec,
            doc,
            monitor,
            reports: BTreeMap::new(),
            last_decision: None,
            util: BTreeMap::new(),
            history_due_ms: 0,
        }
    }

    fn fresh_reports(&self, now: Now) -> impl Iterator<Item = &DispatchReport> {
        self.reports
            .values()
            .filter(move |(at, _)| now.mono_ms.saturating_sub(*at) < REPORT_FRESH_MS)
            .map(|(_, r)| r)
    }

    fn count(&self, p: AllocPhase) -> u32 {
        self.doc.allocs.iter().filter(|a| a.phase == p).count() as u32
    }

    fn backend_list(&self, name: &str) -> BackendList {
        let mut seen = BTreeSet::new();
        BackendList {
            service: name.to_string(),
            version: self.doc.version,
            backends: self
                .doc
                .allocs
                .iter()
                .filter(|a| a.phase != AllocPhase::Starting)
                // Two allocations rendering the same address would make
                // dispatchers refuse the whole list; the allocator avoids
                // it, and the list never carries it.
                .filter(|a| seen.insert(a.address.as_str()))
                .map(|a| BackendEntry {
                    address: a.address.clone(),
                    weight: 1,
                    draining: a.phase == AllocPhase::Draining || self.spec.is_none(),
                    node: a.node.clone(),
                })
                .collect(),
            dispatch: self
                .spec
                .as_ref()
                .map(|s| s.dispatch.clone())
                .unwrap_or_default(),
        }
    }
}

/// The controller. See the module documentation.
#[derive(Debug)]
pub struct Controller {
    cfg: Config,
    nodes: BTreeMap<String, Node>,
    leases: LeaseTable<String>,
    services: BTreeMap<String, Service>,
    out: VecDeque<Command>,
    /// Nodes whose desired apps must be recomputed at the next pass (also:
    /// whose place in `free` may have changed).
    dirty: BTreeSet<String>,
    /// Nodes that may take an allocation, as of the last refresh.
    free: BTreeSet<String>,
    /// Node names by registered host address: nodes sharing a host are the
    /// only ones whose backends can collide.
    hosts: BTreeMap<String, BTreeSet<String>>,
    /// Nodes an operator drains (their `flags.drain`): every pass asks of
    /// every allocation whether its node drains, and this is nearly always
    /// empty, so the question costs no lookup among all nodes.
    drains: BTreeSet<String>,
    next_pass_ms: u64,
    next_full_ms: u64,
    decisions: u64,
    /// The bandwidth directory of services with a `[bandwidth]` total
    /// (Vibra 3.4.2); soft state, rebuilt from reports after a restart.
    bandwidth: crate::bandwidth::Directory,
}

impl Controller {
    /// A controller with nothing registered.
    pub fn new(cfg: Config) -> Self {
        Self {
            leases: LeaseTable::new(cfg.ttl_ms),
            cfg,
            nodes: BTreeMap::new(),
            services: BTreeMap::new(),
            out: VecDeque::new(),
            dirty: BTreeSet::new(),
            free: BTreeSet::new(),
            hosts: BTreeMap::new(),
            drains: BTreeSet::new(),
            next_pass_ms: 0,
            next_full_ms: 0,
            decisions: 0,
            bandwidth: crate::bandwidth::Directory::new(),
        }
    }

    /// A controller rebuilt from what a previous run persisted: the same
    /// path for a restarted manager and for a simulated one. Restored nodes
    /// get a grace lease, except those that had failed: a failure stays
    /// durable until the node renews again.
    pub fn restore(cfg: Config, now: Now, r: Restored) -> Self {
        let mut c = Self::new(cfg);
        let mut notes = Vec::new();
        let (mut alive, mut failed) = (0, 0);
        for (record, flags) in r.nodes {
            let name = record.registration.name.clone();
            if flags.failed {
                failed += 1;
            } else {
                alive += 1;
                c.leases
                    .grant_grace(name.clone(), now.mono_ms, c.cfg.grace_ms);
            }
            c.dirty.insert(name.clone());
            c.hosts
                .entry(record.registration.address.clone())
                .or_default()
                .insert(name.clone());
            if flags.drain {
                c.drains.insert(name.clone());
            }
            c.nodes.insert(
                name,
                Node {
                    record,
                    flags,
                    load: None,
                    apps: Vec::new(),
                    service: None,
                    applied: None,
                },
            );
        }
        for spec in r.services {
            let name = spec.name.clone();
            c.services.insert(
                name,
                Service::new(Some(spec), AllocDoc::default(), &mut notes),
            );
        }
        for (name, doc) in r.allocations {
            let s = c
                .services
                .entry(name)
                .or_insert_with(|| Service::new(None, AllocDoc::default(), &mut notes));
            s.doc = doc;
        }
        for (name, points) in r.histories {
            if let Some(m) = c.services.get_mut(&name).and_then(|s| s.monitor.as_mut()) {
                m.restore(&points, now.secs(), now.unix_ms);
            }
        }
        // The allocation index; a node claimed twice (never written by this
        // code, but a store is input too) stays with the first service.
        for (name, s) in c.services.iter_mut() {
            s.doc.allocs.retain(|a| match c.nodes.get_mut(&a.node) {
                // A crash between the failure's write and the allocation's
                // left it listed: take it out now, as expiry would have.
                Some(n) if n.flags.failed => {
                    notes.push(Note {
                        kind: "service",
                        node: Some(a.node.clone()),
                        service: Some(name.clone()),
                        message: format!(
                            "{name}: node {} removed from the backends at once: it had failed before the restart",
                            a.node
                        ),
                    });
                    false
                }
                Some(n) if n.service.is_none() => {
                    n.service = Some(name.clone());
                    true
                }
                Some(_) => {
                    notes.push(Note {
                        kind: "service",
                        node: Some(a.node.clone()),
                        service: Some(name.clone()),
                        message: format!(
                            "{name}: {} is allocated to another service too; dropped here",
                            a.node
                        ),
                    });
                    false
                }
                None => {
                    notes.push(Note {
                        kind: "service",
                        node: Some(a.node.clone()),
                        service: Some(name.clone()),
                        message: format!(
                            "{name}: {} is no longer registered; its allocation is dropped",
                            a.node
                        ),
                    });
                    false
                }
            });
        }
        if alive + failed > 0 {
            notes.push(Note {
                kind: "restored",
                node: None,
                service: None,
                message: format!(
                    "{} registrations restored ({alive} with a grace lease of {} ms, {failed} still failed)",
                    alive + failed,
                    c.cfg.grace_ms
                ),
            });
        }
        c.out.extend(notes.into_iter().map(Command::Note));
        c
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The next command to execute, in order.
    pub fn poll(&mut self) -> Option<Command> {
        self.out.pop_front()
    }

    /// When [`Controller::handle_timeout`] should next be called, monotonic
    /// ms.
    pub fn poll_timeout(&self) -> u64 {
        let lease = self.leases.next_deadline_ms().unwrap_or(u64::MAX);
        lease.min(self.next_pass_ms)
    }

    /// Decisions taken so far (monitor steps that changed an allocation,
    /// and every pool move).
    pub fn decisions(&self) -> u64 {
        self.decisions
    }

    /// Persists every service's monitor series now (a manager stopping
    /// cleanly calls this, so a restart resumes with all of it).
    pub fn flush_history(&mut self) {
        let len = self.cfg.history_len;
        let docs: Vec<Doc> = self
            .services
            .iter()
            .filter_map(|(name, s)| {
                let m = s.monitor.as_ref()?;
                let skip = m.series().len().saturating_sub(len);
                Some(Doc::History {
                    service: name.clone(),
                    points: m.series().skip(skip).cloned().collect(),
                })
            })
            .collect();
        self.out.extend(docs.into_iter().map(Command::Persist));
    }

    /// A persisted write failed: the document is written again at the next
    /// pass (the controller's state is ahead of the store until then).
    pub fn persist_failed(&mut self, doc: &Doc) {
        match doc {
            Doc::Desired { node, .. } => {
                // Forget what we think the node has: the next pass rewrites it.
                if let Some(n) = self.nodes.get_mut(node) {
                    n.record.generation += 1;
                    n.record.desired.clear();
                    self.dirty.insert(node.clone());
                }
            }
            Doc::Allocation { service, .. } => {
                if let Some(s) = self.services.get(service) {
                    self.out.push_back(Command::Persist(Doc::Allocation {
                        service: service.clone(),
                        doc: s.doc.clone(),
                    }));
                }
            }
            _ => {}
        }
    }

    fn note(&mut self, kind: &'static str, node: Option<&str>, service: Option<&str>, m: String) {
        self.out.push_back(Command::Note(Note {
            kind,
            node: node.map(str::to_string),
            service: service.map(str::to_string),
            message: m,
        }));
    }

    fn persist(&mut self, d: Doc) {
        self.out.push_back(Command::Persist(d));
    }

    /// Handles one input at `now`.
    pub fn handle(&mut self, now: Now, input: Input) -> Result<Reply, ControlError> {
        match input {
            Input::Register(reg) => Ok(self.register(now, reg)),
            Input::Renew {
                node,
                load,
                apps,
                applied,
            } => self.renew(now, &node, load, apps, applied),
            Input::Cancel(node) => self.cancel(&node),
            Input::AssignApps { node, apps } => self.assign_apps(&node, apps),
            Input::Report { service, report } => {
                let s = self
                    .services
                    .get_mut(&service)
                    .ok_or(ControlError::NoService(service))?;
                s.reports
                    .insert(report.dispatcher.clone(), (now.mono_ms, report));
                Ok(Reply::Done)
            }
            Input::ApplyService(spec) => Ok(self.apply(spec)),
            Input::DeleteService(name) => self.delete(&name),
            Input::Cordon(n) => self.set_cordon(now, &n, true, false),
            Input::Uncordon(n) => self.set_cordon(now, &n, false, false),
            Input::Drain(n) => self.set_cordon(now, &n, true, true),
            Input::Remove(n) => self.remove(&n),
        }
    }

    fn register(&mut self, now: Now, reg: Registration) -> Reply {
        let name = reg.name.clone();
        let msg = format!("address {}, roles [{}]", reg.address, reg.roles.join(", "));
        self.persist(Doc::Registration(reg.clone()));
        let host = reg.address.clone();
        let kind = match self.nodes.get_mut(&name) {
            Some(n) => {
                let changed = n.record.registration != reg;
                let old = std::mem::replace(&mut n.record.registration, reg);
                if old.address != host
                    && let Some(set) = self.hosts.get_mut(&old.address)
                {
                    set.remove(&name);
                }
                if changed { "updated" } else { "reregistered" }
            }
            None => {
                self.nodes.insert(
                    name.clone(),
                    Node {
                        record: NodeRecord {
                            registration: reg,
                            desired: Vec::new(),
                            generation: 0,
                        },
                        flags: NodeFlags::default(),
                        load: None,
                        apps: Vec::new(),
                        service: None,
                        applied: None,
                    },
                );
                "registered"
            }
        };
        self.hosts.entry(host).or_default().insert(name.clone());
        self.leases.grant(name.clone(), now.mono_ms);
        self.note(kind, Some(&name), None, msg);
        self.revive(&name, "registered again after its lease expired");
        self.dirty.insert(name);
        Reply::Registered {
            ttl_ms: self.cfg.ttl_ms,
        }
    }

    /// Clears a durable failure once the node is heard from again.
    fn revive(&mut self, name: &str, why: &str) {
        let Some(n) = self.nodes.get_mut(name) else {
            return;
        };
        if !n.flags.failed {
            return;
        }
        n.flags.failed = false;
        let flags = n.flags;
        self.persist(Doc::Flags {
            node: name.to_string(),
            flags,
        });
        self.note("revived", Some(name), None, why.to_string());
    }

    fn renew(
        &mut self,
        now: Now,
        name: &str,
        load: Option<LoadSample>,
        apps: Vec<AppStatus>,
        applied: Option<u64>,
    ) -> Result<Reply, ControlError> {
        let Some(n) = self.nodes.get_mut(name) else {
            return Err(ControlError::NotRegistered(name.to_string()));
        };
        n.applied = applied;
        if load.is_some() {
            n.load = load;
        }
        let mut changes = Vec::new();
        if n.apps != apps {
            for a in &apps {
                let before = n.apps.iter().find(|b| b.id == a.id);
                if before.is_none_or(|b| b.state != a.state || b.restarts != a.restarts) {
                    changes.push(
                        format!(
                            "app {} ({}) is {:?}{}",
                            a.id,
                            a.adaptor,
                            a.state,
                            a.message
                                .as_deref()
                                .map(|m| format!(": {m}"))
                                .unwrap_or_default()
                        )
                        .to_lowercase(),
                    );
                }
            }
            n.apps = apps;
        }
        let unchanged = applied == Some(n.record.generation);
        // Measured egress and the cap in force (the acknowledgement) of the
        // node's service app go to the bandwidth directory.
        let shaped = n.service.clone().and_then(|svc| {
            let id = app_id(&svc);
            let bw = n.apps.iter().find(|a| a.id == id)?.bandwidth?;
            Some((svc, id, bw))
        });
        let mut caps = BTreeMap::new();
        if let Some((svc, id, bw)) = &shaped {
            self.bandwidth
                .observe(svc, name, Some(bw.offered_bps), bw.cap_bps);
            if let Some(c) = self.bandwidth.cap(svc, name) {
                caps.insert(id.clone(), c);
            }
        } else if let Some(svc) = self.nodes.get(name).and_then(|n| n.service.clone())
            && let Some(c) = self.bandwidth.cap(&svc, name)
        {
            caps.insert(app_id(&svc), c);
        }
        let Some(n) = self.nodes.get_mut(name) else {
            return Err(ControlError::NotRegistered(name.to_string()));
        };
        let resp = RenewResponse {
            caps,
            lease_ttl_ms: self.cfg.ttl_ms,
            desired: if unchanged {
                Vec::new()
            } else {
                n.record.desired.clone()
            },
            generation: n.record.generation,
            unchanged,
        };
        let failed = n.flags.failed;
        let renewal = match self.leases.renew(name, now.mono_ms) {
            Some(r) => r,
            None => {
                self.leases.grant(name.to_string(), now.mono_ms);
                Renewal::Extended
            }
        };
        for m in changes {
            self.note("app", Some(name), None, m);
        }
        if renewal == Renewal::Revived || failed {
            if !failed {
                // Failed in memory only (the flag write is queued): same thing.
                if let Some(n) = self.nodes.get_mut(name) {
                    n.flags.failed = true;
                }
            }
            self.revive(name, "renewed after its lease expired");
            self.dirty.insert(name.to_string());
        }
        Ok(Reply::Renewed(resp))
    }

    fn cancel(&mut self, name: &str) -> Result<Reply, ControlError> {
        let Some(holder) = self.nodes.get(name).map(|n| n.service.clone()) else {
            return Err(ControlError::NotRegistered(name.to_string()));
        };
        if let Some(svc) = holder {
            self.drop_allocation(&svc, name, "it is no longer registered");
        }
        if let Some(n) = self.nodes.remove(name)
            && let Some(set) = self.hosts.get_mut(&n.record.registration.address)
        {
            set.remove(name);
        }
        self.dirty.remove(name);
        self.free.remove(name);
        self.drains.remove(name);
        self.leases.remove(name);
        self.persist(Doc::NodeDeleted(name.to_string()));
        self.note(
            "cancelled",
            Some(name),
            None,
            "registration cancelled".into(),
        );
        Ok(Reply::Done)
    }

    fn assign_apps(&mut self, name: &str, apps: Vec<AppAssignment>) -> Result<Reply, ControlError> {
        let Some(n) = self.nodes.get_mut(name) else {
            return Err(ControlError::NotRegistered(name.to_string()));
        };
        // A service's app may come back as the node has it (a client that
        // read the node's list and sent it back with one app changed);
        // any other app id with the services' prefix is refused.
        if let Some(a) = apps
            .iter()
            .find(|a| a.id.starts_with(APP_PREFIX) && !n.record.desired.contains(a))
        {
            return Err(ControlError::Refused(format!(
                "app id {:?} starts with {APP_PREFIX:?}, which is reserved for services; choose another id",
                a.id
            )));
        }
        // The operator's apps replace the hand-assigned ones; the service's
        // app, if the node serves one, stays.
        let mut desired: Vec<AppAssignment> = apps
            .into_iter()
            .filter(|a| !a.id.starts_with(APP_PREFIX))
            .collect();
        desired.extend(
            n.record
                .desired
                .iter()
                .filter(|a| a.id.starts_with(APP_PREFIX))
                .cloned(),
        );
        let generation = self.set_desired(name, desired);
        Ok(Reply::Assigned { generation })
    }

    /// Writes a node's desired apps if they changed; returns the generation.
    fn set_desired(&mut self, name: &str, apps: Vec<AppAssignment>) -> u64 {
        let Some(n) = self.nodes.get_mut(name) else {
            return 0;
        };
        if n.record.desired == apps {
            return n.record.generation;
        }
        n.record.desired = apps.clone();
        n.record.generation += 1;
        let generation = n.record.generation;
        let list: Vec<String> = apps
            .iter()
            .map(|a| format!("{} ({})", a.id, a.adaptor))
            .collect();
        self.persist(Doc::Desired {
            node: name.to_string(),
            apps,
            generation,
        });
        self.note(
            "assigned",
            Some(name),
            None,
            format!("desired apps: [{}]", list.join(", ")),
        );
        generation
    }

    fn apply(&mut self, spec: ServiceSpec) -> Reply {
        let name = spec.name.clone();
        self.persist(Doc::Service(spec.clone()));
        let mut notes = Vec::new();
        let created = match self.services.get_mut(&name) {
            Some(s) => {
                let old = s.spec.clone();
                let rebuild = old.as_ref().is_none_or(|old| {
                    old.policy != spec.policy
                        || old.metric != spec.metric
                        || old.sla != spec.sla
                        || old.period_secs != spec.period_secs
                        || old.lead_time_secs != spec.lead_time_secs
                        || old.forecast != spec.forecast
                });
                let app_changed = old.as_ref().is_some_and(|old| old.app != spec.app);
                s.spec = Some(spec.clone());
                if rebuild {
                    s.monitor =
                        Service::new(Some(spec.clone()), AllocDoc::default(), &mut notes).monitor;
                }
                if app_changed {
                    s.doc.app_epoch += 1;
                    let stale = s.doc.allocs.len();
                    let doc = s.doc.clone();
                    notes.push(Note {
                        kind: "service",
                        node: None,
                        service: Some(name.clone()),
                        message: format!(
                            "{name}: app changed; rolling update of {stale} node(s), one at a time"
                        ),
                    });
                    self.out.push_back(Command::Persist(Doc::Allocation {
                        service: name.clone(),
                        doc,
                    }));
                }
                let list = s.backend_list(&name);
                self.out.push_back(Command::Publish(list));
                false
            }
            None => {
                let s = Service::new(Some(spec), AllocDoc::default(), &mut notes);
                let list = s.backend_list(&name);
                self.services.insert(name.clone(), s);
                self.out.push_back(Command::Publish(list));
                true
            }
        };
        self.out.extend(notes.into_iter().map(Command::Note));
        self.next_pass_ms = 0;
        Reply::Applied { created }
    }

    fn delete(&mut self, name: &str) -> Result<Reply, ControlError> {
        let Some(s) = self.services.get_mut(name).filter(|s| s.spec.is_some()) else {
            return Err(ControlError::NoService(name.to_string()));
        };
        s.spec = None;
        s.monitor = None;
        // The allocations first: a crash between the two writes must leave
        // the nodes known, never orphaned.
        let doc = s.doc.clone();
        let list = s.backend_list(name);
        self.persist(Doc::Allocation {
            service: name.to_string(),
            doc,
        });
        self.persist(Doc::ServiceDeleted(name.to_string()));
        self.persist(Doc::HistoryDeleted(name.to_string()));
        self.out.push_back(Command::Publish(list));
        self.next_pass_ms = 0;
        Ok(Reply::Done)
    }

    fn set_cordon(
        &mut self,
        now: Now,
        name: &str,
        on: bool,
        drain: bool,
    ) -> Result<Reply, ControlError> {
        let Some(n) = self.nodes.get_mut(name) else {
            return Err(ControlError::NotRegistered(name.to_string()));
        };
        let changed = n.flags.cordoned != on || n.flags.drain != drain;
        n.flags.cordoned = on;
        n.flags.drain = drain;
        if drain {
            self.drains.insert(name.to_string());
        } else {
            self.drains.remove(name);
        }
        let flags = n.flags;
        let holder = n.service.clone();
        self.dirty.insert(name.to_string());
        if changed {
            self.persist(Doc::Flags {
                node: name.to_string(),
                flags,
            });
            self.note(
                if on { "cordoned" } else { "uncordoned" },
                Some(name),
                None,
                if on {
                    "takes no new allocation".into()
                } else {
                    "may take allocations again".into()
                },
            );
        }
        // A node still starting serves nobody: give it up at once. A
        // serving one is replaced first (the next pass), then drained.
        if drain
            && let Some(svc) = holder
            && self.services.get(&svc).is_some_and(|s| {
                s.doc
                    .allocs
                    .iter()
                    .any(|a| a.node == name && a.phase == AllocPhase::Starting)
            })
        {
            self.drain_node(now, name, &svc, "drained by an operator");
        }
        self.next_pass_ms = 0;
        Ok(Reply::Done)
    }

    /// Drains `node` out of `svc` (no hand-off) and commits the change;
    /// true if it was serving or starting there.
    fn drain_node(&mut self, now: Now, node: &str, svc: &str, why: &str) -> bool {
        let Some(s) = self.services.get_mut(svc) else {
            return false;
        };
        let Some(i) = s.doc.allocs.iter().position(|a| a.node == node) else {
            return false;
        };
        let relist = match s.doc.allocs[i].phase {
            AllocPhase::Draining => return false,
            AllocPhase::Starting => {
                s.doc.allocs.remove(i);
                if let Some(n) = self.nodes.get_mut(node) {
                    n.service = None;
                }
                self.dirty.insert(node.to_string());
                false
            }
            AllocPhase::Serving => {
                start_drain(s, i, now, None);
                true
            }
        };
        self.note(
            "service",
            Some(node),
            Some(svc),
            format!("{svc}: draining {node}: {why}"),
        );
        self.commit(svc, relist);
        true
    }

    /// Persists a service's allocation document, and when its backend list
    /// changed bumps the list's version and publishes it (after the write).
    fn commit(&mut self, name: &str, relist: bool) {
        let Some(s) = self.services.get_mut(name) else {
            return;
        };
        if relist {
            s.doc.version += 1;
        }
        let doc = s.doc.clone();
        let list = relist.then(|| s.backend_list(name));
        self.persist(Doc::Allocation {
            service: name.to_string(),
            doc,
        });
        if let Some(l) = list {
            self.out.push_back(Command::Publish(l));
        }
    }

    /// Forgets a node. A failed node is the usual case; an alive one is
    /// forgotten too (an operator evicting a compromised machine, whose
    /// certificate the shell revokes at the same time), its allocation
    /// dropped at once, as for a failure.
    fn remove(&mut self, name: &str) -> Result<Reply, ControlError> {
        let alive = self.nodes.get(name).is_some_and(|n| !n.flags.failed);
        self.cancel(name)?;
        if alive {
            self.note(
                "removed",
                Some(name),
                None,
                "removed while alive: its allocation, if any, was dropped at once (drain first to move it without failed requests)".into(),
            );
        }
        Ok(Reply::Done)
    }
}

/// Views: what `shoal status`, the dashboard and the simulator read.
impl Controller {
    /// Every node with its lease state.
    pub fn nodes(&self, now: Now) -> Vec<NodeStatus> {
        self.nodes
            .values()
            .map(|n| self.node_status(n, now))
            .collect()
    }

    /// One node.
    pub fn node(&self, name: &str, now: Now) -> Option<NodeStatus> {
        self.nodes.get(name).map(|n| self.node_status(n, now))
    }

    fn node_status(&self, n: &Node, now: Now) -> NodeStatus {
        let r = &n.record.registration;
        let state = match self.leases.state(r.name.as_str()) {
            Some(LeaseState::Alive) if !n.flags.failed => LeaseState::Alive,
            _ => LeaseState::Failed,
        };
        NodeStatus {
            name: r.name.clone(),
            address: r.address.clone(),
            roles: r.roles.clone(),
            capacities: r.capacities.clone(),
            state,
            lease_remaining_ms: if state == LeaseState::Alive {
                self.leases
                    .remaining_ms(r.name.as_str(), now.mono_ms)
                    .unwrap_or(0)
            } else {
                0
            },
            load: n.load.clone(),
            apps: n.apps.clone(),
            desired: n.record.desired.clone(),
            cordoned: n.flags.cordoned,
            service: n.service.clone(),
        }
    }

    /// Nodes that could take an allocation now: alive, not failed, not
    /// cordoned, held by no service.
    pub fn free_count(&self) -> usize {
        self.nodes
            .values()
            .filter(|n| n.service.is_none() && available(n))
            .count()
    }

    /// The service holding a node, if any.
    pub fn holder(&self, node: &str) -> Option<&str> {
        self.nodes.get(node).and_then(|n| n.service.as_deref())
    }

    /// Number of registered nodes.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// A node's durable flags.
    pub fn flags(&self, name: &str) -> Option<NodeFlags> {
        self.nodes.get(name).map(|n| n.flags)
    }

    /// Service names.
    pub fn service_names(&self) -> Vec<String> {
        self.services.keys().cloned().collect()
    }

    /// A service's summary.
    pub fn service_status(&self, name: &str) -> Option<ServiceStatus> {
        let s = self.services.get(name)?;
        let of = |p: AllocPhase| -> Vec<String> {
            s.doc
                .allocs
                .iter()
                .filter(|a| a.phase == p)
                .map(|a| a.node.clone())
                .collect()
        };
        let last = s.monitor.as_ref().and_then(|m| m.last());
        Some(ServiceStatus {
            name: name.to_string(),
            nodes: s.doc.allocs.iter().map(|a| a.node.clone()).collect(),
            serving: of(AllocPhase::Serving),
            starting: of(AllocPhase::Starting),
            draining: of(AllocPhase::Draining),
            policy: s
                .spec
                .as_ref()
                .map(|s| format!("{:?}", s.policy).to_lowercase())
                .unwrap_or_default(),
            usage: last.map(|p| p.observed),
            forecast: last.and_then(|p| p.forecast),
            last_decision: s.last_decision.clone(),
            deleting: s.spec.is_none(),
            bandwidth: self.bandwidth.status(name),
        })
    }

    /// Every service's summary.
    pub fn statuses(&self) -> Vec<ServiceStatus> {
        self.services
            .keys()
            .filter_map(|n| self.service_status(n))
            .collect()
    }

    /// One service in detail.
    pub fn detail(&self, name: &str) -> Result<ServiceDetail, ControlError> {
        let s = self
            .services
            .get(name)
            .ok_or_else(|| ControlError::NoService(name.to_string()))?;
        Ok(ServiceDetail {
            spec: s.spec.clone(),
            status: self.service_status(name).unwrap_or_default(),
            allocations: s.doc.allocs.clone(),
            backends: s.backend_list(name),
            series: s
                .monitor
                .as_ref()
                .map(|m| m.series().cloned().collect())
                .unwrap_or_default(),
        })
    }

    /// The name of the forecaster feeding a service's policy (None for a
    /// policy that decides on no forecast, or no running monitor).
    pub fn forecaster_name(&self, name: &str) -> Option<String> {
        self.services.get(name)?.monitor.as_ref()?.forecaster_name()
    }

    /// A service's backend list.
    pub fn backend_list(&self, name: &str) -> Result<BackendList, ControlError> {
        self.services
            .get(name)
            .map(|s| s.backend_list(name))
            .ok_or_else(|| ControlError::NoService(name.to_string()))
    }

    /// A service's allocation document.
    pub fn allocations(&self, name: &str) -> Option<&AllocDoc> {
        self.services.get(name).map(|s| &s.doc)
    }

    /// A service's definition.
    pub fn spec(&self, name: &str) -> Option<&ServiceSpec> {
        self.services.get(name).and_then(|s| s.spec.as_ref())
    }

    /// Per-backend load of a service from its dispatchers' reports of the
    /// last `fresh_ms`, summed over dispatchers: (address, rps, in flight).
    pub fn backend_loads(&self, name: &str, now: Now, fresh_ms: u64) -> Vec<(String, f64, u64)> {
        let mut m: BTreeMap<String, (f64, u64)> = BTreeMap::new();
        if let Some(s) = self.services.get(name) {
            for (at, r) in s.reports.values() {
                if now.mono_ms.saturating_sub(*at) > fresh_ms {
                    continue;
                }
                for b in &r.backends {
                    let e = m.entry(b.address.clone()).or_default();
                    e.0 += b.rps;
                    e.1 += u64::from(b.in_flight);
                }
            }
        }
        m.into_iter().map(|(a, (r, f))| (a, r, f)).collect()
    }

    /// Checks the controller's own invariants (the simulator calls this at
    /// every step; tests do too). Each violation is described in a line.
    pub fn check_invariants(&self) -> Vec<String> {
        let mut v = Vec::new();
        // Every allocation's node points back at its service, and as many
        // nodes point at a service as there are allocations: so no node is
        // in two services and no node claims a service that lost it.
        // The drain index is the nodes' drain flags, no more, no less.
        let drains: BTreeSet<&String> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.flags.drain)
            .map(|(k, _)| k)
            .collect();
        if drains.len() != self.drains.len() || drains.iter().any(|n| !self.drains.contains(*n)) {
            v.push(format!(
                "drain index {:?} differs from the nodes' drain flags {drains:?}",
                self.drains
            ));
        }
        let mut allocations = 0;
        for (name, s) in &self.services {
            allocations += s.doc.allocs.len();
            for a in &s.doc.allocs {
                match self.nodes.get(&a.node) {
                    None => v.push(format!("{name} holds unregistered node {}", a.node)),
                    Some(n) if n.service.as_deref() != Some(name.as_str()) => v.push(format!(
                        "{name} holds {} but the node's index says {:?}",
                        a.node, n.service
                    )),
                    Some(n) if n.flags.failed && a.phase != AllocPhase::Starting => v.push(
                        format!("{name} lists failed node {} ({:?})", a.node, a.phase),
                    ),
                    _ => {}
                }
            }
            if let Some(spec) = &s.spec {
                let allocated = s.count(AllocPhase::Serving) + s.count(AllocPhase::Starting);
                let ceiling = spec.max_nodes + u32::from(s.doc.surge);
                if allocated > ceiling {
                    v.push(format!(
                        "{name} holds {allocated} nodes, above max_nodes {}",
                        spec.max_nodes
                    ));
                }
            }
            let list = s.backend_list(name);
            for b in &list.backends {
                if let Some(n) = self.nodes.get(&b.node)
                    && n.flags.failed
                {
                    v.push(format!("{name}'s backend list has failed node {}", b.node));
                }
            }
        }
        let held = self.nodes.values().filter(|n| n.service.is_some()).count();
        if held != allocations {
            v.push(format!(
                "{held} nodes say they serve a service but services hold {allocations} allocations (a node in two services, or one a service lost)"
            ));
        }
        for (name, n) in &self.nodes {
            let alive = self.leases.state(name) == Some(LeaseState::Alive);
            if alive == n.flags.failed {
                v.push(format!(
                    "node {name}: lease {} but failed flag {}",
                    if alive { "alive" } else { "not alive" },
                    n.flags.failed
                ));
            }
        }
        v
    }
}

/// Starts draining allocation `i` of `s` (to hand it to `to`, if any).
fn start_drain(s: &mut Service, i: usize, now: Now, to: Option<String>) -> String {
    let v = s.doc.version + 1;
    let a = &mut s.doc.allocs[i];
    a.phase = AllocPhase::Draining;
    a.since_ms = now.unix_ms;
    a.drain_version = Some(v);
    a.handoff_to = to;
    a.node.clone()
}
