//! The controller's I/O shell: one [`shoal_core::control::Controller`]
//! behind a lock, the store that executes its `Persist` commands, the event
//! log that records its notes, and the signal dispatchers long-poll on for
//! its `Publish` commands. [`Registry`] (nodes) and
//! [`crate::services::Services`] are the API's two handles on it. Nothing
//! here decides anything.

use shoal_core::control::{
    Command, ControlError, Controller, Doc, Input, Note, Now, Reply, Restored,
};
use shoal_net::wire::*;
use shoal_store::{Store, StoreError};
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use tokio::sync::{broadcast, watch};

/// How many recent events `status` and new watchers see.
const EVENT_LOG: usize = 1000;

/// Store kind of service definitions.
pub const KIND_SERVICE: &str = "service";
/// Store kind of allocation state.
pub const KIND_ALLOCATION: &str = "allocation";
/// Store kind of node flags (failed, cordoned).
pub const KIND_NODE_FLAGS: &str = "node_flags";
/// Store kind of persisted monitor series.
pub const KIND_HISTORY: &str = "history";

/// Errors of registry operations, mapped to HTTP statuses by the API.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The node is not registered.
    #[error("node {0:?} is not registered; register it first (agents do this on their own)")]
    NotRegistered(String),
    /// The controller refused the request as it stands.
    #[error("{0}")]
    Refused(String),
    /// The store failed; nothing was acknowledged.
    #[error("{0}")]
    Store(#[from] StoreError),
}

impl From<ControlError> for RegistryError {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::NotRegistered(n) => Self::NotRegistered(n),
            other => Self::Refused(other.to_string()),
        }
    }
}

struct Log {
    events: VecDeque<Event>,
    seq: u64,
}

/// The controller and everything that executes its commands.
pub struct Shell {
    ctl: Mutex<Controller>,
    /// Held while commands execute, taken before the controller's lock is
    /// released: commands run in the order the controller emitted them.
    exec: Mutex<()>,
    store: Arc<dyn Store>,
    log: Mutex<Log>,
    events: broadcast::Sender<Event>,
    changes: watch::Sender<u64>,
    epoch: Instant,
}

fn corrupt(kind: &str, key: &str, e: serde_json::Error) -> StoreError {
    StoreError::Corrupt {
        key: format!("{kind}/{key}"),
        detail: e.to_string(),
    }
}

fn docs<T: serde::de::DeserializeOwned>(
    store: &dyn Store,
    kind: &str,
) -> Result<Vec<(String, T)>, StoreError> {
    store
        .docs(kind)?
        .into_iter()
        .map(|(k, text)| {
            serde_json::from_str(&text)
                .map(|v| (k.clone(), v))
                .map_err(|e| corrupt(kind, &k, e))
        })
        .collect()
}

impl Shell {
    /// Rebuilds the controller from the store, exactly as the simulator
    /// rebuilds a restarted manager: durable registrations (failed ones stay
    /// failed), services, allocations and monitor series.
    pub fn open(
        store: Arc<dyn Store>,
        ttl_ms: u64,
        grace_ms: u64,
    ) -> Result<Arc<Self>, StoreError> {
        let flags: BTreeMap<String, NodeFlags> =
            docs(store.as_ref(), KIND_NODE_FLAGS)?.into_iter().collect();
        let restored = Restored {
            nodes: store
                .nodes()?
                .into_iter()
                .map(|r| {
                    let f = flags.get(&r.registration.name).copied().unwrap_or_default();
                    (r, f)
                })
                .collect(),
            services: docs(store.as_ref(), KIND_SERVICE)?
                .into_iter()
                .map(|(_, s)| s)
                .collect(),
            allocations: docs(store.as_ref(), KIND_ALLOCATION)?,
            histories: docs(store.as_ref(), KIND_HISTORY)?,
        };
        let epoch = Instant::now();
        let cfg = shoal_core::control::Config {
            ttl_ms,
            grace_ms,
            ..Default::default()
        };
        let now = Now {
            mono_ms: 0,
            unix_ms: unix_ms(),
        };
        let ctl = Controller::restore(cfg, now, restored);
        let (events, _) = broadcast::channel(4096);
        let (changes, _) = watch::channel(0);
        let shell = Arc::new(Self {
            ctl: Mutex::new(ctl),
            exec: Mutex::new(()),
            store,
            log: Mutex::new(Log {
                events: VecDeque::new(),
                seq: 0,
            }),
            events,
            changes,
            epoch,
        });
        let g = shell.lock();
        shell.execute(g)?;
        Ok(shell)
    }

    /// Both clocks, now.
    pub fn now(&self) -> Now {
        Now {
            mono_ms: self.epoch.elapsed().as_millis() as u64,
            unix_ms: unix_ms(),
        }
    }

    /// Locks the controller (for reading views).
    pub fn lock(&self) -> MutexGuard<'_, Controller> {
        self.ctl.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands one input to the controller and executes what it commands;
    /// the reply is returned only once every write it caused is durable.
    pub fn handle(&self, input: Input) -> Result<Reply, RegistryError> {
        let now = self.now();
        let mut g = self.lock();
        let reply = g.handle(now, input)?;
        self.execute(g)?;
        Ok(reply)
    }

    /// Lease expiry and the allocation pass, when due.
    pub fn tick(&self) {
        let now = self.now();
        let mut g = self.lock();
        if now.mono_ms < g.poll_timeout() {
            return;
        }
        g.handle_timeout(now);
        if let Err(e) = self.execute(g) {
            tracing::error!("controller: {e}");
        }
    }

    /// Writes what a clean stop must not lose (the monitors' series).
    pub fn flush(&self) {
        let mut g = self.lock();
        g.flush_history();
        if let Err(e) = self.execute(g) {
            tracing::error!("controller: {e}");
        }
    }

    /// Executes every pending command in order. The controller lock is
    /// released once the commands are taken, but only after the execution
    /// lock is held, so commands of two inputs never interleave. Returns the
    /// first store error; the failed writes are handed back to the
    /// controller, which writes them again.
    fn execute(&self, mut g: MutexGuard<'_, Controller>) -> Result<(), StoreError> {
        let mut cmds = Vec::new();
        while let Some(c) = g.poll() {
            cmds.push(c);
        }
        if cmds.is_empty() {
            return Ok(());
        }
        let exec = self.exec.lock().unwrap_or_else(|p| p.into_inner());
        drop(g);
        let mut first_err = None;
        let mut failed = Vec::new();
        let mut published = false;
        for c in cmds {
            match c {
                Command::Persist(d) => {
                    if let Err(e) = self.write(&d) {
                        tracing::error!("store: {e}");
                        failed.push(d);
                        first_err.get_or_insert(e);
                    }
                }
                Command::Publish(_) => published = true,
                Command::Note(n) => self.record(n),
            }
        }
        drop(exec);
        if published {
            self.changes.send_modify(|v| *v += 1);
        }
        if !failed.is_empty() {
            let mut g = self.lock();
            for d in &failed {
                g.persist_failed(d);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn write(&self, d: &Doc) -> Result<(), StoreError> {
        let s = &self.store;
        match d {
            Doc::Registration(r) => s.put_registration(r),
            Doc::Desired { node, apps, .. } => s.put_desired(node, apps).map(|_| ()),
            Doc::Flags { node, flags } => s.put_doc(KIND_NODE_FLAGS, node, &json(flags)),
            Doc::NodeDeleted(n) => {
                s.delete_node(n)?;
                s.delete_doc(KIND_NODE_FLAGS, n).map(|_| ())
            }
            Doc::Service(spec) => s.put_doc(KIND_SERVICE, &spec.name, &json(spec)),
            Doc::ServiceDeleted(n) => s.delete_doc(KIND_SERVICE, n).map(|_| ()),
            Doc::Allocation { service, doc } => s.put_doc(KIND_ALLOCATION, service, &json(doc)),
            Doc::AllocationDeleted(n) => s.delete_doc(KIND_ALLOCATION, n).map(|_| ()),
            Doc::History { service, points } => s.put_doc(KIND_HISTORY, service, &json(points)),
            Doc::HistoryDeleted(n) => s.delete_doc(KIND_HISTORY, n).map(|_| ()),
        }
    }

    fn log(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, n: Note) {
        if matches!(n.kind, "failed") {
            tracing::warn!(node = ?n.node, "{}", n.message);
        }
        let mut g = self.log();
        g.seq += 1;
        let ev = Event {
            seq: g.seq,
            at_ms: unix_ms(),
            kind: n.kind.to_string(),
            node: n.node,
            service: n.service,
            message: n.message,
        };
        if g.events.len() >= EVENT_LOG {
            g.events.pop_front();
        }
        g.events.push_back(ev.clone());
        let _ = self.events.send(ev);
    }

    /// Wakes dispatchers following backend lists.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

/// The store's documents are the controller's own types, which always
/// serialize.
fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("controller documents always serialize")
}

/// The manager's registry: the nodes' side of the shell.
pub struct Registry {
    shell: Arc<Shell>,
}

impl Registry {
    /// The registry over `shell`.
    pub fn new(shell: Arc<Shell>) -> Self {
        Self { shell }
    }

    /// The shell.
    pub fn shell(&self) -> &Arc<Shell> {
        &self.shell
    }

    /// Milliseconds on the manager's monotonic clock.
    pub fn now_ms(&self) -> u64 {
        self.shell.now().mono_ms
    }

    /// The lease duration.
    pub fn ttl_ms(&self) -> u64 {
        self.shell.lock().config().ttl_ms
    }

    /// Records an event that is not a controller decision (joins, API
    /// actions).
    pub fn event(&self, kind: &'static str, node: Option<&str>, message: String) {
        self.shell.record(Note {
            kind,
            node: node.map(str::to_string),
            service: None,
            message,
        });
    }

    /// Subscribes to events; also returns the recent log so a watcher misses
    /// nothing between the two.
    pub fn subscribe(&self) -> (Vec<Event>, broadcast::Receiver<Event>) {
        let g = self.shell.log();
        (
            g.events.iter().cloned().collect(),
            self.shell.events.subscribe(),
        )
    }

    /// Registers (or re-registers) a node and grants it a lease. The
    /// registration is durable before this returns.
    pub fn register(&self, reg: Registration) -> Result<u64, RegistryError> {
        match self.shell.handle(Input::Register(reg))? {
            Reply::Registered { ttl_ms } => Ok(ttl_ms),
            other => unreachable!("register answered {other:?}"),
        }
    }

    /// Renews a node's lease with its latest load and app states; returns
    /// its desired state.
    pub fn renew(&self, name: &str, req: RenewRequest) -> Result<RenewResponse, RegistryError> {
        let input = Input::Renew {
            node: name.to_string(),
            load: req.load,
            apps: req.apps,
            applied: req.applied,
        };
        match self.shell.handle(input)? {
            Reply::Renewed(r) => Ok(r),
            other => unreachable!("renew answered {other:?}"),
        }
    }

    /// Cancels a node's lease and removes its registration.
    pub fn cancel(&self, name: &str) -> Result<(), RegistryError> {
        self.shell.handle(Input::Cancel(name.to_string()))?;
        Ok(())
    }

    /// Replaces a node's hand-assigned applications (durable before
    /// returning); a service's app on the node stays.
    pub fn assign(&self, name: &str, apps: Vec<AppAssignment>) -> Result<u64, RegistryError> {
        let input = Input::AssignApps {
            node: name.to_string(),
            apps,
        };
        match self.shell.handle(input)? {
            Reply::Assigned { generation } => Ok(generation),
            other => unreachable!("assign answered {other:?}"),
        }
    }

    /// Cordons, uncordons, drains or removes a node.
    pub fn node_action(&self, input: Input) -> Result<(), RegistryError> {
        self.shell.handle(input)?;
        Ok(())
    }

    /// A snapshot of every node with its lease state.
    pub fn nodes(&self) -> Vec<NodeStatus> {
        let now = self.shell.now();
        self.shell.lock().nodes(now)
    }

    /// Recent events.
    pub fn recent_events(&self, n: usize) -> Vec<Event> {
        let g = self.shell.log();
        let skip = g.events.len().saturating_sub(n);
        g.events.iter().skip(skip).cloned().collect()
    }

    /// Number of registered nodes.
    pub fn len(&self) -> usize {
        self.shell.lock().node_count()
    }

    /// Whether no node is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A lookup query (LAMA Fig. 4: lookup by attributes).
#[derive(Debug, Default, Clone)]
pub struct Lookup {
    /// Every listed role must be held.
    pub roles: Vec<String>,
    /// Each capacity must be at least this much.
    pub min_capacities: BTreeMap<String, f64>,
    /// Only this node.
    pub name: Option<String>,
    /// Only alive nodes.
    pub alive_only: bool,
}

impl Lookup {
    /// Whether `n` matches.
    pub fn matches(&self, n: &NodeStatus) -> bool {
        self.name.as_ref().is_none_or(|x| *x == n.name)
            && self.roles.iter().all(|r| n.roles.contains(r))
            && self
                .min_capacities
                .iter()
                .all(|(k, v)| n.capacities.get(k).is_some_and(|c| c >= v))
            && (!self.alive_only || n.state == LeaseState::Alive)
    }
}
