//! The live backend list: swapped atomically, with passive health (ejection
//! for a back-off period) and draining.
//!
//! [`Backends::apply`] is the API through which another component (the
//! manager watch, the admin listener, tests) replaces the list.

use crate::clock::Clock;
use arc_swap::ArcSwap;
use serde::Serialize;
use shoal_core::select::{BackendSet, BackendSpec, Pool, PoolError, Selector};

/// A list that cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Duplicate address or zero weight.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// An address that is not a URI authority.
    #[error("backend address {0:?} is not HOST:PORT")]
    BadAddr(String),
}
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Passive-health and draining settings.
#[derive(Debug, Clone)]
pub struct HealthOpts {
    /// First ejection period; doubles on each consecutive ejection.
    pub eject_base: Duration,
    /// Longest ejection period.
    pub eject_max: Duration,
    /// Consecutive 5xx responses that eject a backend (0: never).
    pub eject_after_5xx: u32,
    /// A draining backend leaves the list after this long even with connections.
    pub drain_timeout: Duration,
}

impl Default for HealthOpts {
    fn default() -> Self {
        Self {
            eject_base: Duration::from_secs(1),
            eject_max: Duration::from_secs(30),
            eject_after_5xx: 5,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// Per-backend health bookkeeping (kept across list swaps, by address).
#[derive(Debug, Default)]
pub struct HealthCell {
    consecutive_5xx: AtomicU32,
    ejections: AtomicU32,
    ejected_until_ms: AtomicU64,
    /// Ejections so far (for metrics).
    pub ejected_total: AtomicU64,
    /// Idle keep-alive connections to this backend.
    pub idle: crate::pool::Idle,
}

/// What the proxy needs per backend besides the core state.
#[derive(Debug)]
pub struct Slot {
    /// The URI authority requests to this backend carry.
    pub authority: http::uri::Authority,
    /// Health bookkeeping.
    pub health: Arc<HealthCell>,
}

/// One version of the list: the core set and the proxy's per-backend slots,
/// index for index.
#[derive(Debug)]
pub struct Table {
    /// Backends as selectors see them.
    pub set: BackendSet,
    /// Index-aligned with `set`.
    pub slots: Vec<Slot>,
    /// The list as last applied.
    pub specs: Vec<BackendSpec>,
}

impl AsRef<BackendSet> for Table {
    fn as_ref(&self) -> &BackendSet {
        &self.set
    }
}

/// A backend as shown on the admin listener and in `shoal route`.
#[derive(Debug, Clone, Serialize)]
pub struct BackendStatus {
    /// `host:port`.
    pub addr: String,
    /// Weight.
    pub weight: u32,
    /// Draining (no new requests).
    pub draining: bool,
    /// Not ejected.
    pub healthy: bool,
    /// Requests in flight.
    pub active: u32,
    /// Requests sent so far.
    pub selections: u64,
    /// Ejections so far.
    pub ejections: u64,
}

/// The live list and the selector that chooses from it.
#[derive(Debug)]
pub struct Backends {
    table: ArcSwap<Table>,
    pool: Mutex<(Pool, HashMap<String, Arc<HealthCell>>)>,
    selector: Box<dyn Selector>,
    opts: HealthOpts,
    clock: Clock,
    /// The address connections to these backends are made from (a
    /// federated peer's dispatcher: this dispatcher's own); none: the
    /// system chooses.
    source: std::sync::OnceLock<std::net::IpAddr>,
}

impl Backends {
    /// Connect from `ip` from now on.
    pub fn set_source(&self, ip: std::net::IpAddr) {
        let _ = self.source.set(ip);
    }

    /// The source address of connections, if set.
    pub fn source(&self) -> Option<std::net::IpAddr> {
        self.source.get().copied()
    }

    /// A list with `specs`, chosen from by `selector`.
    pub fn new(
        specs: &[BackendSpec],
        selector: Box<dyn Selector>,
        opts: HealthOpts,
        clock: Clock,
    ) -> Result<Arc<Self>, ApplyError> {
        let mut pool = Pool::new();
        let mut cells = HashMap::new();
        let table = build_table(&mut pool, &mut cells, specs)?;
        Ok(Arc::new(Self {
            table: ArcSwap::from_pointee(table),
            pool: Mutex::new((pool, cells)),
            selector,
            opts,
            clock,
            source: Default::default(),
        }))
    }

    /// The current table (cheap; hold it for the duration of one decision).
    pub fn load(&self) -> arc_swap::Guard<Arc<Table>> {
        self.table.load()
    }

    /// The current table, owned (for holding across an await).
    pub fn load_full(&self) -> Arc<Table> {
        self.table.load_full()
    }

    /// The selector.
    pub fn selector(&self) -> &dyn Selector {
        &*self.selector
    }

    /// The dispatcher's clock.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Replaces the list atomically. Backends already known keep their
    /// counters, health and history. A backend newly marked draining gets no
    /// new requests and is removed once its requests finish or the drain
    /// timeout passes (when called inside a tokio runtime).
    pub fn apply(self: &Arc<Self>, specs: &[BackendSpec]) -> Result<(), ApplyError> {
        let newly_draining: Vec<String> = {
            let old = self.load();
            specs
                .iter()
                .filter(|s| s.draining && !old.specs.iter().any(|o| o.addr == s.addr && o.draining))
                .map(|s| s.addr.clone())
                .collect()
        };
        self.swap(specs)?;
        if !newly_draining.is_empty()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let me = self.clone();
            rt.spawn(async move { me.finish_draining(newly_draining).await });
        }
        Ok(())
    }

    fn swap(&self, specs: &[BackendSpec]) -> Result<(), ApplyError> {
        let mut g = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        let (pool, cells) = &mut *g;
        let table = build_table(pool, cells, specs)?;
        self.table.store(Arc::new(table));
        Ok(())
    }

    async fn finish_draining(self: Arc<Self>, addrs: Vec<String>) {
        let deadline = tokio::time::Instant::now() + self.opts.drain_timeout;
        loop {
            let t = self.load();
            let busy = addrs.iter().any(|a| {
                t.set
                    .index_of_addr(a)
                    .is_some_and(|i| t.set.get(i).active() > 0)
            });
            if !busy || tokio::time::Instant::now() >= deadline {
                break;
            }
            drop(t);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Remove those still listed as draining (the list may have changed).
        let t = self.load();
        let keep: Vec<BackendSpec> = t
            .specs
            .iter()
            .filter(|s| !(s.draining && addrs.contains(&s.addr)))
            .cloned()
            .collect();
        if keep.len() != t.specs.len() {
            drop(t);
            if let Err(e) = self.swap(&keep) {
                tracing::warn!("removing drained backends: {e}");
            }
        }
    }

    /// Records a response status from backend `i` of `table`; ejects it after
    /// too many consecutive 5xx.
    pub fn on_status(&self, table: &Table, i: usize, status: u16) {
        let cell = &table.slots[i].health;
        if status >= 500 {
            let n = cell.consecutive_5xx.fetch_add(1, Relaxed) + 1;
            if self.opts.eject_after_5xx > 0 && n >= self.opts.eject_after_5xx {
                self.eject(table, i);
            }
        } else if cell.consecutive_5xx.load(Relaxed) != 0 {
            cell.consecutive_5xx.store(0, Relaxed);
            cell.ejections.store(0, Relaxed);
        }
    }

    /// Counts one more ejection of a backend and sets when it may be tried
    /// again: the back-off doubles with each ejection, up to the maximum.
    fn extend_ejection(&self, cell: &HealthCell) -> Duration {
        let k = cell.ejections.fetch_add(1, Relaxed).min(16);
        let period = self
            .opts
            .eject_base
            .saturating_mul(1 << k)
            .min(self.opts.eject_max);
        cell.ejected_until_ms
            .store(self.clock.now_ms() + period.as_millis() as u64, Relaxed);
        period
    }

    /// Ejects backend `i` of `table` for its back-off period.
    pub fn eject(&self, table: &Table, i: usize) {
        let b = table.set.get(i);
        let cell = &table.slots[i].health;
        if !b.healthy() {
            return;
        }
        let period = self.extend_ejection(cell);
        cell.consecutive_5xx.store(0, Relaxed);
        cell.ejected_total.fetch_add(1, Relaxed);
        b.set_healthy(false);
        tracing::warn!(backend = b.addr(), ?period, "backend ejected");
    }

    /// Backends whose ejection period is over (candidates for readmission).
    pub fn due_for_readmission(&self) -> Vec<(usize, String)> {
        let t = self.load();
        let now = self.clock.now_ms();
        (0..t.set.len())
            .filter(|&i| {
                !t.set.get(i).healthy() && t.slots[i].health.ejected_until_ms.load(Relaxed) <= now
            })
            .map(|i| (i, t.set.get(i).addr().to_string()))
            .collect()
    }

    /// Readmits a backend (by address) after a successful check.
    pub fn readmit(&self, addr: &str) {
        let t = self.load();
        if let Some(i) = t.set.index_of_addr(addr) {
            t.set.get(i).set_healthy(true);
            tracing::info!(backend = addr, "backend readmitted");
        }
    }

    /// Extends an ejection after a failed check.
    pub fn eject_again(&self, addr: &str) {
        let t = self.load();
        if let Some(i) = t.set.index_of_addr(addr) {
            let b = t.set.get(i);
            self.extend_ejection(&t.slots[i].health);
            b.set_healthy(false);
        }
    }

    /// The list with counters, for the admin listener.
    pub fn status(&self) -> Vec<BackendStatus> {
        let t = self.load();
        t.set
            .iter()
            .zip(&t.slots)
            .map(|(b, s)| BackendStatus {
                addr: b.addr().to_string(),
                weight: b.weight(),
                draining: b.draining(),
                healthy: b.healthy(),
                active: b.active(),
                selections: b.selections(),
                ejections: s.health.ejected_total.load(Relaxed),
            })
            .collect()
    }
}

fn build_table(
    pool: &mut Pool,
    cells: &mut HashMap<String, Arc<HealthCell>>,
    specs: &[BackendSpec],
) -> Result<Table, ApplyError> {
    let authorities = specs
        .iter()
        .map(|s| {
            s.addr
                .parse::<http::uri::Authority>()
                .ok()
                .filter(|a| a.port_u16().is_some())
                .ok_or_else(|| ApplyError::BadAddr(s.addr.clone()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let set = pool.update(specs)?;
    let mut next_cells = HashMap::with_capacity(specs.len());
    let slots = specs
        .iter()
        .zip(authorities)
        .map(|(s, authority)| {
            let health = cells.get(&s.addr).cloned().unwrap_or_default();
            next_cells.insert(s.addr.clone(), health.clone());
            Slot { authority, health }
        })
        .collect();
    *cells = next_cells;
    Ok(Table {
        set,
        slots,
        specs: specs.to_vec(),
    })
}
