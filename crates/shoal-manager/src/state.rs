//! The registry: durable service items (in the store) plus soft state
//! (leases, load samples, reported app states) in memory.

use shoal_core::lease::{LeaseState, LeaseTable, Renewal};
use shoal_net::wire::*;
use shoal_store::{NodeRecord, Store};
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::broadcast;

/// How many recent events `status` and new watchers see.
const EVENT_LOG: usize = 1000;

/// A node as the manager holds it.
#[derive(Debug, Clone)]
pub struct NodeEntry {
    /// Durable part.
    pub record: NodeRecord,
    /// Last load sample.
    pub load: Option<LoadSample>,
    /// Last reported app states.
    pub apps: Vec<AppStatus>,
}

struct Inner {
    nodes: BTreeMap<String, NodeEntry>,
    leases: LeaseTable<String>,
    log: VecDeque<Event>,
    seq: u64,
}

/// Errors of registry operations, mapped to HTTP statuses by the API.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The node is not registered.
    #[error("node {0:?} is not registered; register it first (agents do this on their own)")]
    NotRegistered(String),
    /// The store failed; nothing was acknowledged.
    #[error("{0}")]
    Store(#[from] shoal_store::StoreError),
}

/// The manager's registry.
pub struct Registry {
    inner: Mutex<Inner>,
    store: Arc<dyn Store>,
    events: broadcast::Sender<Event>,
    epoch: Instant,
}

impl Registry {
    /// Loads the durable registrations. Each gets a grace lease of
    /// `grace_ms`: the manager just (re)started, and live nodes need time to
    /// find it again before anyone calls them failed.
    pub fn open(store: Arc<dyn Store>, ttl_ms: u64, grace_ms: u64) -> anyhow::Result<Self> {
        let (events, _) = broadcast::channel(4096);
        let epoch = Instant::now();
        let mut leases = LeaseTable::new(ttl_ms);
        let mut nodes = BTreeMap::new();
        for record in store.nodes()? {
            let name = record.registration.name.clone();
            leases.grant_grace(name.clone(), 0, grace_ms);
            nodes.insert(
                name,
                NodeEntry {
                    record,
                    load: None,
                    apps: Vec::new(),
                },
            );
        }
        let r = Self {
            inner: Mutex::new(Inner {
                nodes,
                leases,
                log: VecDeque::new(),
                seq: 0,
            }),
            store,
            events,
            epoch,
        };
        let n = r.lock().nodes.len();
        if n > 0 {
            r.emit(
                &mut r.lock(),
                "restored",
                None,
                format!("{n} registrations restored; each has a grace lease of {grace_ms} ms"),
            );
        }
        Ok(r)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Milliseconds on the manager's monotonic clock.
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The lease duration.
    pub fn ttl_ms(&self) -> u64 {
        self.lock().leases.ttl_ms()
    }

    fn emit(&self, inner: &mut Inner, kind: &str, node: Option<&str>, message: String) {
        inner.seq += 1;
        let ev = Event {
            seq: inner.seq,
            at_ms: unix_ms(),
            kind: kind.to_string(),
            node: node.map(str::to_string),
            message,
        };
        if inner.log.len() >= EVENT_LOG {
            inner.log.pop_front();
        }
        inner.log.push_back(ev.clone());
        let _ = self.events.send(ev);
    }

    /// Records an event that is not a registry change (decisions of other
    /// components).
    pub fn event(&self, kind: &str, node: Option<&str>, message: String) {
        let mut g = self.lock();
        self.emit(&mut g, kind, node, message);
    }

    /// Subscribes to events; also returns the recent log so a watcher misses
    /// nothing between the two.
    pub fn subscribe(&self) -> (Vec<Event>, broadcast::Receiver<Event>) {
        let g = self.lock();
        (g.log.iter().cloned().collect(), self.events.subscribe())
    }

    /// Registers (or re-registers) a node and grants it a lease. The
    /// registration is durable before this returns.
    pub fn register(&self, reg: Registration) -> Result<u64, RegistryError> {
        self.store.put_registration(&reg)?;
        let now = self.now_ms();
        let mut g = self.lock();
        let name = reg.name.clone();
        let msg = format!("address {}, roles [{}]", reg.address, reg.roles.join(", "));
        let kind = match g.nodes.get_mut(&name) {
            Some(e) => {
                let changed = e.record.registration != reg;
                e.record.registration = reg;
                if changed { "updated" } else { "reregistered" }
            }
            None => {
                g.nodes.insert(
                    name.clone(),
                    NodeEntry {
                        record: NodeRecord {
                            registration: reg,
                            desired: Vec::new(),
                            generation: 0,
                        },
                        load: None,
                        apps: Vec::new(),
                    },
                );
                "registered"
            }
        };
        let was_failed = g.leases.state(&name) == Some(LeaseState::Failed);
        g.leases.grant(name.clone(), now);
        self.emit(&mut g, kind, Some(&name), msg);
        if was_failed {
            self.emit(
                &mut g,
                "revived",
                Some(&name),
                "registered again after its lease expired".into(),
            );
        }
        Ok(g.leases.ttl_ms())
    }

    /// Renews a node's lease with its latest load and app states; returns
    /// its desired state.
    pub fn renew(&self, name: &str, req: RenewRequest) -> Result<RenewResponse, RegistryError> {
        let now = self.now_ms();
        let mut g = self.lock();
        let inner = &mut *g;
        let Some(entry) = inner.nodes.get_mut(name) else {
            return Err(RegistryError::NotRegistered(name.to_string()));
        };
        if req.load.is_some() {
            entry.load = req.load;
        }
        let app_changes: Vec<String> = req
            .apps
            .iter()
            .filter(|a| {
                entry
                    .apps
                    .iter()
                    .find(|b| b.id == a.id)
                    .is_none_or(|b| b.state != a.state || b.restarts != a.restarts)
            })
            .map(|a| {
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
                .to_lowercase()
            })
            .collect();
        entry.apps = req.apps;
        let resp = RenewResponse {
            lease_ttl_ms: inner.leases.ttl_ms(),
            desired: entry.record.desired.clone(),
            generation: entry.record.generation,
        };
        let renewal = match inner.leases.renew(&name.to_string(), now) {
            Some(r) => r,
            None => {
                inner.leases.grant(name.to_string(), now);
                Renewal::Extended
            }
        };
        for m in app_changes {
            self.emit(inner, "app", Some(name), m);
        }
        if renewal == Renewal::Revived {
            self.emit(
                inner,
                "revived",
                Some(name),
                "renewed after its lease expired".into(),
            );
        }
        Ok(resp)
    }

    /// Cancels a node's lease and removes its registration.
    pub fn cancel(&self, name: &str) -> Result<(), RegistryError> {
        if !self.store.delete_node(name)? {
            return Err(RegistryError::NotRegistered(name.to_string()));
        }
        let mut g = self.lock();
        g.nodes.remove(name);
        g.leases.remove(&name.to_string());
        self.emit(
            &mut g,
            "cancelled",
            Some(name),
            "registration cancelled".into(),
        );
        Ok(())
    }

    /// Replaces a node's desired applications (durable before returning).
    pub fn assign(&self, name: &str, apps: Vec<AppAssignment>) -> Result<u64, RegistryError> {
        let Some(generation) = self.store.put_desired(name, &apps)? else {
            return Err(RegistryError::NotRegistered(name.to_string()));
        };
        let mut g = self.lock();
        if let Some(e) = g.nodes.get_mut(name) {
            e.record.desired = apps.clone();
            e.record.generation = generation;
        }
        let list: Vec<String> = apps
            .iter()
            .map(|a| format!("{} ({})", a.id, a.adaptor))
            .collect();
        self.emit(
            &mut g,
            "assigned",
            Some(name),
            format!("desired apps: [{}]", list.join(", ")),
        );
        Ok(generation)
    }

    /// Declares expired leases failed; returns the newly failed nodes.
    pub fn expire(&self) -> Vec<String> {
        let now = self.now_ms();
        let mut g = self.lock();
        let failed = g.leases.expire(now);
        for n in &failed {
            self.emit(
                &mut g,
                "failed",
                Some(n),
                "lease expired without renewal: node declared failed".into(),
            );
        }
        failed
    }

    /// A snapshot of every node with its lease state.
    pub fn nodes(&self) -> Vec<NodeStatus> {
        let now = self.now_ms();
        let g = self.lock();
        g.nodes
            .values()
            .map(|e| {
                let r = &e.record.registration;
                NodeStatus {
                    name: r.name.clone(),
                    address: r.address.clone(),
                    roles: r.roles.clone(),
                    capacities: r.capacities.clone(),
                    state: g.leases.state(&r.name).unwrap_or(LeaseState::Failed),
                    lease_remaining_ms: g.leases.remaining_ms(&r.name, now).unwrap_or(0),
                    load: e.load.clone(),
                    apps: e.apps.clone(),
                    desired: e.record.desired.clone(),
                }
            })
            .collect()
    }

    /// Recent events.
    pub fn recent_events(&self, n: usize) -> Vec<Event> {
        let g = self.lock();
        let skip = g.log.len().saturating_sub(n);
        g.log.iter().skip(skip).cloned().collect()
    }

    /// Number of registered nodes.
    pub fn len(&self) -> usize {
        self.lock().nodes.len()
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
