//! Backends, their counters, and the sets selectors choose from.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};

/// A backend's identity, stable for the life of a [`Pool`] (LARD's history
/// refers to backends by id so that it survives list changes).
pub type BackendId = u32;

/// A backend as configured: address, weight, draining flag.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BackendSpec {
    /// `host:port`.
    pub addr: String,
    /// Relative weight (wrr, wlc, bounded-ch), at least 1.
    pub weight: u32,
    /// A draining backend gets no new requests.
    pub draining: bool,
}

impl BackendSpec {
    /// A backend of weight 1, not draining.
    pub fn new(addr: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            weight: 1,
            draining: false,
        }
    }
}

/// One backend's live state, shared by every [`BackendSet`] that lists it.
#[derive(Debug)]
pub struct Backend {
    id: BackendId,
    addr: String,
    weight: AtomicU32,
    draining: AtomicBool,
    healthy: AtomicBool,
    active: AtomicU32,
    selections: AtomicU64,
    total_active: Arc<AtomicU64>,
    epoch: Arc<AtomicU64>,
}

impl Backend {
    /// Stable id.
    pub fn id(&self) -> BackendId {
        self.id
    }
    /// `host:port`.
    pub fn addr(&self) -> &str {
        &self.addr
    }
    /// Weight, at least 1.
    pub fn weight(&self) -> u32 {
        self.weight.load(Relaxed)
    }
    /// Draining: no new requests.
    pub fn draining(&self) -> bool {
        self.draining.load(Relaxed)
    }
    /// Not ejected by health checking.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Relaxed)
    }
    /// Healthy and not draining: may take new requests.
    pub fn available(&self) -> bool {
        self.healthy() && !self.draining()
    }
    /// Active connections (requests in flight) through this dispatcher.
    pub fn active(&self) -> u32 {
        self.active.load(Relaxed)
    }
    /// Requests sent to this backend so far.
    pub fn selections(&self) -> u64 {
        self.selections.load(Relaxed)
    }
    /// Marks the backend healthy or ejected (the caller's health checking).
    pub fn set_healthy(&self, healthy: bool) {
        if self.healthy.swap(healthy, Relaxed) != healthy {
            self.epoch.fetch_add(1, Relaxed);
        }
    }
    /// Marks the backend draining or not.
    pub fn set_draining(&self, draining: bool) {
        if self.draining.swap(draining, Relaxed) != draining {
            self.epoch.fetch_add(1, Relaxed);
        }
    }

    fn begin(&self, total: bool) {
        self.active.fetch_add(1, Relaxed);
        self.selections.fetch_add(1, Relaxed);
        if total {
            self.total_active.fetch_add(1, Relaxed);
        }
    }

    /// Counts a connection only if the backend then has at most `cap` (the
    /// bounded-load rule); atomic so that concurrent callers cannot overshoot.
    pub(crate) fn try_begin(&self, cap: u32) -> bool {
        let ok = self
            .active
            .fetch_update(Relaxed, Relaxed, |a| (a < cap).then_some(a + 1))
            .is_ok();
        if ok {
            self.total_active.fetch_add(1, Relaxed);
            self.selections.fetch_add(1, Relaxed);
        }
        ok
    }

    fn end(&self, total: bool) {
        self.active.fetch_sub(1, Relaxed);
        if total {
            self.total_active.fetch_sub(1, Relaxed);
        }
    }
}

/// A counted connection on a backend of a set it borrows; uncounts it when
/// dropped. Taking and dropping one costs two or three uncontended atomic
/// increments (no reference count: the set outlives it). To keep one past
/// the borrow, as across a request's await points, turn it into an
/// [`OwnedLease`] with the `Arc` that owns the set.
#[derive(Debug)]
pub struct Lease<'a> {
    backend: &'a Backend,
    index: usize,
    total: bool,
}

impl<'a> Lease<'a> {
    /// The backend.
    pub fn backend(&self) -> &'a Backend {
        self.backend
    }
    /// Its index in the set it was chosen from.
    pub fn index(&self) -> usize {
        self.index
    }
    /// The same lease, holding `owner` (which must hold the set this lease
    /// was taken from: `owner.as_ref()` is that set) so that it is `'static`.
    ///
    /// # Panics
    /// If the lease's backend is not at its index in `owner`'s set.
    pub fn into_owned<O: AsRef<BackendSet>>(self, owner: std::sync::Arc<O>) -> OwnedLease<O> {
        let set = (*owner).as_ref();
        assert!(
            self.index < set.len() && std::ptr::eq(&*set.backends[self.index], self.backend),
            "a lease can only be owned with the set it was taken from"
        );
        let l = OwnedLease {
            owner,
            index: self.index,
            total: self.total,
        };
        std::mem::forget(self);
        l
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        self.backend.end(self.total);
    }
}

/// A [`Lease`] that owns (an `Arc` of) what holds its set.
#[derive(Debug)]
pub struct OwnedLease<O: AsRef<BackendSet>> {
    owner: std::sync::Arc<O>,
    index: usize,
    total: bool,
}

impl<O: AsRef<BackendSet>> OwnedLease<O> {
    /// The backend.
    pub fn backend(&self) -> &Backend {
        (*self.owner).as_ref().get(self.index)
    }
    /// Its index in the set.
    pub fn index(&self) -> usize {
        self.index
    }
}

impl<O: AsRef<BackendSet>> Drop for OwnedLease<O> {
    fn drop(&mut self) {
        self.backend().end(self.total);
    }
}

impl AsRef<BackendSet> for BackendSet {
    fn as_ref(&self) -> &BackendSet {
        self
    }
}

/// An immutable, ordered list of backends (the order defines url-hash
/// subsets) with the counters they share. Replaced whole when the list changes.
#[derive(Debug)]
pub struct BackendSet {
    backends: Vec<Arc<Backend>>,
    by_id: HashMap<BackendId, usize>,
    total_active: Arc<AtomicU64>,
    epoch: Arc<AtomicU64>,
    /// (available weight << 32 | epoch), recomputed when the epoch moves.
    avail_weight: AtomicU64,
    generation: u64,
    ring: OnceLock<Vec<(u64, u32)>>,
}

impl BackendSet {
    /// Number of backends, available or not.
    pub fn len(&self) -> usize {
        self.backends.len()
    }
    /// No backends at all.
    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }
    /// Backend at `i`; panics if out of range (indices come from selectors).
    pub fn get(&self, i: usize) -> &Arc<Backend> {
        &self.backends[i]
    }
    /// All backends in order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Backend>> {
        self.backends.iter()
    }
    /// Index of the backend with this id, if listed.
    pub fn index_of(&self, id: BackendId) -> Option<usize> {
        self.by_id.get(&id).copied()
    }
    /// Index of the backend with this address, if listed.
    pub fn index_of_addr(&self, addr: &str) -> Option<usize> {
        self.backends.iter().position(|b| b.addr == addr)
    }
    /// Changes whenever the list changes.
    pub fn generation(&self) -> u64 {
        self.generation
    }
    /// Requests in flight over all backends of the pool, as counted by
    /// leases that count it ([`BackendSet::lease_counted`] and bounded-ch's,
    /// the one algorithm that needs the pool-wide figure; the others skip
    /// this shared counter to stay cheap).
    pub fn total_active(&self) -> u64 {
        self.total_active.load(Relaxed)
    }
    /// Sum of the weights of the available backends (cached until a health or
    /// draining flag changes, so that bounded-ch stays O(1) per request).
    pub fn available_weight(&self) -> u64 {
        let epoch = self.epoch.load(Relaxed) & 0xffff_ffff;
        let cached = self.avail_weight.load(Relaxed);
        if cached != u64::MAX && cached & 0xffff_ffff == epoch {
            return cached >> 32;
        }
        let w: u64 = self
            .backends
            .iter()
            .filter(|b| b.available())
            .map(|b| u64::from(b.weight()))
            .sum();
        let w = w.min(u64::from(u32::MAX));
        self.avail_weight.store((w << 32) | epoch, Relaxed);
        w
    }
    /// Counts a connection on backend `i`.
    pub fn lease(&self, i: usize) -> Lease<'_> {
        let b = &*self.backends[i];
        b.begin(false);
        Lease {
            backend: b,
            index: i,
            total: false,
        }
    }
    /// Counts a connection on backend `i`, also in [`BackendSet::total_active`].
    pub fn lease_counted(&self, i: usize) -> Lease<'_> {
        let b = &*self.backends[i];
        b.begin(true);
        Lease {
            backend: b,
            index: i,
            total: true,
        }
    }
    pub(crate) fn try_lease(&self, i: usize, cap: u32) -> Option<Lease<'_>> {
        let b = &*self.backends[i];
        // `then`, not `then_some`: a lease built and dropped would uncount.
        b.try_begin(cap).then(|| Lease {
            backend: b,
            index: i,
            total: true,
        })
    }
    /// The consistent-hash ring (built on first use): sorted (point, index).
    pub(crate) fn ring(&self) -> &[(u64, u32)] {
        self.ring.get_or_init(|| super::chash::build_ring(self))
    }
}

/// Errors in a backend list.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PoolError {
    /// The same address twice.
    #[error("backend {0} is listed twice")]
    Duplicate(String),
    /// A weight of zero.
    #[error("backend {0} has weight 0; weights must be at least 1")]
    ZeroWeight(String),
}

/// Keeps the live [`Backend`] states across list changes, so that counters and
/// LARD history survive when the manager swaps the list.
#[derive(Debug, Default)]
pub struct Pool {
    known: HashMap<String, Arc<Backend>>,
    next_id: BackendId,
    generation: u64,
    total_active: Arc<AtomicU64>,
    epoch: Arc<AtomicU64>,
}

impl Pool {
    /// An empty pool.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds the set for a new list, reusing the state of backends already
    /// known (by address). Backends no longer listed are forgotten once their
    /// in-flight requests finish (their leases hold them).
    pub fn update(&mut self, specs: &[BackendSpec]) -> Result<BackendSet, PoolError> {
        let mut seen = HashMap::with_capacity(specs.len());
        for (i, s) in specs.iter().enumerate() {
            if s.weight == 0 {
                return Err(PoolError::ZeroWeight(s.addr.clone()));
            }
            if seen.insert(s.addr.as_str(), i).is_some() {
                return Err(PoolError::Duplicate(s.addr.clone()));
            }
        }
        let mut backends = Vec::with_capacity(specs.len());
        for s in specs {
            let b = match self.known.get(&s.addr) {
                Some(b) => b.clone(),
                None => {
                    let b = Arc::new(Backend {
                        id: self.next_id,
                        addr: s.addr.clone(),
                        weight: AtomicU32::new(s.weight),
                        draining: AtomicBool::new(s.draining),
                        healthy: AtomicBool::new(true),
                        active: AtomicU32::new(0),
                        selections: AtomicU64::new(0),
                        total_active: self.total_active.clone(),
                        epoch: self.epoch.clone(),
                    });
                    self.next_id = self.next_id.wrapping_add(1);
                    b
                }
            };
            b.weight.store(s.weight, Relaxed);
            b.draining.store(s.draining, Relaxed);
            backends.push(b);
        }
        self.known = backends
            .iter()
            .map(|b| (b.addr.clone(), b.clone()))
            .collect();
        self.generation += 1;
        self.epoch.fetch_add(1, Relaxed);
        let by_id = backends
            .iter()
            .enumerate()
            .map(|(i, b)| (b.id, i))
            .collect();
        Ok(BackendSet {
            backends,
            by_id,
            total_active: self.total_active.clone(),
            epoch: self.epoch.clone(),
            avail_weight: AtomicU64::new(u64::MAX),
            generation: self.generation,
            ring: OnceLock::new(),
        })
    }
}
