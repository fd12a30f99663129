//! LARD and LARD/R (Pai et al., "Locality-Aware Request Distribution in
//! Cluster-based Network Servers", ASPLOS 1998, figures 2 and 4).
//!
//! The front end remembers which server (LARD) or set of servers (LARD/R)
//! serves each target, and keeps sending the target there until the load
//! thresholds say that server is overloaded while another is idle:
//! `(load(n) > T_high && some node has load < T_low) || load(n) >= 2 T_high`.
//! Load is the number of active connections. The history is bounded by an LRU
//! so memory stays bounded; an entry naming a backend that left or failed is
//! invalidated when referenced (thesis 4.3.2).

use super::{BackendId, BackendSet, Explanation, RequestKey, Selector, least_loaded};
use lru::LruCache;
use smallvec::SmallVec;
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// LARD thresholds (the paper's values by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LardParams {
    /// Below this many active connections a node is underloaded (paper: 25).
    pub t_low: u32,
    /// Above this a node is overloaded (paper: 65).
    pub t_high: u32,
    /// LARD/R: a server set unchanged for this long loses its most loaded
    /// member (paper: K = 20 s).
    pub k_ms: u64,
    /// Most objects remembered; the least recently requested are forgotten.
    pub max_objects: usize,
}

impl Default for LardParams {
    fn default() -> Self {
        Self {
            t_low: 25,
            t_high: 65,
            k_ms: 20_000,
            max_objects: 1 << 20,
        }
    }
}

/// One remembered target.
#[derive(Debug, Clone)]
struct Entry {
    servers: SmallVec<[BackendId; 2]>,
    last_mod: u64,
}

/// The LARD / LARD-R selector.
#[derive(Debug)]
pub struct Lard {
    replicated: bool,
    p: LardParams,
    history: Mutex<LruCache<u64, Entry>>,
    tie: AtomicUsize,
}

struct Outcome {
    chosen: Option<usize>,
    /// The object's server set as remembered before this decision (the
    /// available members).
    before: Vec<usize>,
    /// Remembered members that are in the list but unavailable.
    skipped: Vec<usize>,
    reason: String,
}

impl Lard {
    /// LARD, or LARD/R when `replicated`.
    pub fn new(replicated: bool, p: LardParams) -> Self {
        let cap = NonZeroUsize::new(p.max_objects.max(1)).unwrap_or(NonZeroUsize::MIN);
        Self {
            replicated,
            p,
            history: Mutex::new(LruCache::new(cap)),
            tie: AtomicUsize::new(0),
        }
    }

    /// Objects currently remembered.
    pub fn remembered(&self) -> usize {
        self.history.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn key(req: &RequestKey<'_>) -> u64 {
        xxhash_rust::xxh3::xxh3_64(req.object().as_bytes())
    }

    fn overloaded(&self, set: &BackendSet, load: u32) -> bool {
        let t = &self.p;
        (load > t.t_high && set.iter().any(|b| b.available() && b.active() < t.t_low))
            || load >= 2 * t.t_high
    }

    fn decide(&self, req: &RequestKey<'_>, set: &BackendSet, commit: bool) -> Outcome {
        let key = Self::key(req);
        let now = req.now_ms;
        let n = set.len().max(1);
        let tie = if commit {
            self.tie.fetch_add(1, Relaxed)
        } else {
            self.tie.load(Relaxed)
        } % n;
        let mut hist = self.history.lock().unwrap_or_else(|p| p.into_inner());
        let old = if commit {
            hist.get(&key).cloned()
        } else {
            hist.peek(&key).cloned()
        };
        // Invalidate members that left the list or are unavailable.
        let mut entry = old.clone().unwrap_or(Entry {
            servers: SmallVec::new(),
            last_mod: now,
        });
        let skipped: Vec<usize> = entry
            .servers
            .iter()
            .filter_map(|id| set.index_of(*id))
            .filter(|&i| !set.get(i).available())
            .collect();
        entry
            .servers
            .retain(|id| set.index_of(*id).is_some_and(|i| set.get(i).available()));
        let idx = |id: BackendId| set.index_of(id).unwrap_or(0);
        let before: Vec<usize> = entry.servers.iter().map(|&id| idx(id)).collect();
        let load = |i: usize| set.get(i).active();
        let (chosen, reason) = if entry.servers.is_empty() {
            match least_loaded(set, tie, false) {
                None => (None, "no backend is available".to_string()),
                Some(c) => {
                    entry.servers = SmallVec::from_slice(&[set.get(c).id()]);
                    entry.last_mod = now;
                    let why = if old.is_some_and(|o| !o.servers.is_empty()) {
                        "its server left or failed; assigned to the least loaded"
                    } else {
                        "first request for this object; assigned to the least loaded"
                    };
                    (Some(c), format!("{why} ({} active)", load(c)))
                }
            }
        } else if !self.replicated {
            let cur = idx(entry.servers[0]);
            if self.overloaded(set, load(cur)) {
                let c = least_loaded(set, tie, false).unwrap_or(cur);
                entry.servers = SmallVec::from_slice(&[set.get(c).id()]);
                entry.last_mod = now;
                (
                    Some(c),
                    format!(
                        "its server {cur} is overloaded ({} active; T_low={}, T_high={}); \
                         moved to the least loaded {c} ({} active)",
                        load(cur),
                        self.p.t_low,
                        self.p.t_high,
                        load(c)
                    ),
                )
            } else {
                (
                    Some(cur),
                    format!(
                        "remembered server ({} active, within T_high={})",
                        load(cur),
                        self.p.t_high
                    ),
                )
            }
        } else {
            let members: Vec<usize> = entry.servers.iter().map(|&id| idx(id)).collect();
            let mut lo = members[0];
            let mut hi = members[0];
            for &m in &members[1..] {
                if load(m) < load(lo) {
                    lo = m;
                }
                if load(m) >= load(hi) {
                    hi = m;
                }
            }
            let mut changed = false;
            let mut chosen = lo;
            let mut why = format!(
                "least loaded of its server set {members:?} ({} active)",
                load(lo)
            );
            if self.overloaded(set, load(lo))
                && let Some(p) = least_loaded(set, tie, false)
                && !members.contains(&p)
            {
                entry.servers.push(set.get(p).id());
                why = format!(
                    "its server set {members:?} is overloaded (least {} active); \
                         added the least loaded {p} ({} active)",
                    load(lo),
                    load(p)
                );
                chosen = p;
                changed = true;
            }
            if entry.servers.len() > 1 && now.saturating_sub(entry.last_mod) > self.p.k_ms {
                let victim = if hi == chosen {
                    members.iter().copied().find(|&m| m != chosen)
                } else {
                    Some(hi)
                };
                if let Some(v) = victim {
                    let vid = set.get(v).id();
                    entry.servers.retain(|id| *id != vid);
                    why.push_str(&format!(
                        "; set unchanged for over {} ms, dropped its most loaded member {v}",
                        self.p.k_ms
                    ));
                    changed = true;
                }
            }
            if changed {
                entry.last_mod = now;
            }
            (Some(chosen), why)
        };
        if commit && chosen.is_some() {
            hist.put(key, entry);
        }
        Outcome {
            chosen,
            before,
            skipped,
            reason,
        }
    }
}

impl Selector for Lard {
    fn name(&self) -> &'static str {
        if self.replicated { "lard-r" } else { "lard" }
    }
    fn select(&self, req: &RequestKey<'_>, set: &BackendSet) -> Option<usize> {
        self.decide(req, set, true).chosen
    }
    fn explain(&self, req: &RequestKey<'_>, set: &BackendSet) -> Explanation {
        let o = self.decide(req, set, false);
        let mut e = Explanation::new(self.name(), req);
        // The remembered servers, then the one chosen if it is new to the
        // set (a first assignment, a move or a replica added).
        e.candidates = o.before;
        if let Some(c) = o.chosen
            && !e.candidates.contains(&c)
        {
            e.candidates.push(c);
        }
        e.loads = e.candidates.iter().map(|&i| set.get(i).active()).collect();
        e.skipped = o.skipped;
        e.chosen = o.chosen;
        e.reason = o.reason;
        e
    }
}
