//! Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam,
//! SODA 2018), the rule behind HAProxy's `hash-balance-factor`.
//!
//! Each backend owns `VNODES_PER_WEIGHT * weight` points on a 64-bit ring. A
//! request's key is placed on the ring and walks clockwise to the first
//! available backend whose load after taking it stays within its cap:
//! `load + 1 <= ceil(c * (T + 1) * w / W)`, with T the requests in flight, w the
//! backend's weight and W the available weight (equal weights: `ceil(c (T+1) / n)`).
//! With c >= 1 some backend always qualifies.

use super::hash::mix64;
use super::{BackendSet, Explanation, HashFn, Lease, RequestKey, Selector, least_loaded};

/// Ring points per unit of weight.
pub const VNODES_PER_WEIGHT: u32 = 100;
/// Weights above this count as this on the ring (bounds its size).
const MAX_RING_WEIGHT: u32 = 64;

pub(crate) fn build_ring(set: &BackendSet) -> Vec<(u64, u32)> {
    let mut ring = Vec::new();
    for (i, b) in set.iter().enumerate() {
        let points = VNODES_PER_WEIGHT * b.weight().clamp(1, MAX_RING_WEIGHT);
        for k in 0..points {
            let p = xxhash_rust::xxh3::xxh3_64_with_seed(b.addr().as_bytes(), u64::from(k));
            ring.push((p, i as u32));
        }
    }
    ring.sort_unstable();
    ring
}

/// The bounded-ch selector.
#[derive(Debug)]
pub struct BoundedCh {
    hash: HashFn,
    factor_pct: u32,
}

impl BoundedCh {
    /// Balance factor `factor_pct` in percent, at least 100 (HAProxy's unit
    /// for `hash-balance-factor`; 125 lets a backend take 25 % over the mean).
    pub fn new(hash: HashFn, factor_pct: u32) -> Self {
        Self {
            hash,
            factor_pct: factor_pct.max(100),
        }
    }

    /// The cap of a backend of weight `w` when `total` requests are in flight
    /// and the available weight is `wsum`: `ceil(c * (total + 1) * w / wsum)`.
    pub fn cap(&self, total: u64, w: u32, wsum: u64) -> u32 {
        let num = u128::from(self.factor_pct) * u128::from(total + 1) * u128::from(w);
        let den = 100u128 * u128::from(wsum.max(1));
        let c = num.div_ceil(den).max(1);
        u32::try_from(c).unwrap_or(u32::MAX)
    }

    fn key(&self, req: &RequestKey<'_>) -> (u64, u64) {
        let h = self.hash.hash(req.object().as_bytes());
        (h, mix64(h))
    }

    /// Walks the ring from the key's point calling `visit` once per distinct
    /// available backend, in ring order, until it returns `Some`.
    fn walk<T>(
        &self,
        set: &BackendSet,
        point: u64,
        mut visit: impl FnMut(usize) -> Option<T>,
    ) -> Option<T> {
        let ring = set.ring();
        if ring.is_empty() {
            return None;
        }
        let start = ring.partition_point(|&(p, _)| p < point);
        let n = set.len();
        let mut seen = vec![false; 0];
        let mut distinct = 0;
        for k in 0..ring.len() {
            let i = ring[(start + k) % ring.len()].1 as usize;
            if k > 0 {
                // Most requests stop at the first point; only then pay for a map.
                if seen.is_empty() {
                    seen = vec![false; n];
                    let first = ring[start % ring.len()].1 as usize;
                    seen[first] = true;
                }
                if seen[i] {
                    continue;
                }
                seen[i] = true;
            }
            distinct += 1;
            if set.get(i).available()
                && let Some(t) = visit(i)
            {
                return Some(t);
            }
            if distinct == n {
                break;
            }
        }
        None
    }
}

impl Selector for BoundedCh {
    fn name(&self) -> &'static str {
        "bounded-ch"
    }

    fn select(&self, req: &RequestKey<'_>, set: &BackendSet) -> Option<usize> {
        let (_, point) = self.key(req);
        let total = set.total_active();
        let wsum = set.available_weight();
        self.walk(set, point, |i| {
            let b = set.get(i);
            (b.active() < self.cap(total, b.weight(), wsum)).then_some(i)
        })
        .or_else(|| least_loaded(set, 0, true))
    }

    fn acquire<'s>(&self, req: &RequestKey<'_>, set: &'s BackendSet) -> Option<Lease<'s>> {
        let (_, point) = self.key(req);
        let total = set.total_active();
        let wsum = set.available_weight();
        self.walk(set, point, |i| {
            set.try_lease(i, self.cap(total, set.get(i).weight(), wsum))
        })
        .or_else(|| least_loaded(set, 0, true).map(|i| set.lease_counted(i)))
    }

    fn explain(&self, req: &RequestKey<'_>, set: &BackendSet) -> Explanation {
        let (h, point) = self.key(req);
        let total = set.total_active();
        let wsum = set.available_weight();
        let mut e = Explanation::new(self.name(), req);
        e.hash_fn = Some(self.hash.as_str());
        e.hash = Some(h);
        let mut tried = Vec::new();
        let chosen = self.walk(set, point, |i| {
            tried.push(i);
            let b = set.get(i);
            (b.active() < self.cap(total, b.weight(), wsum)).then_some(i)
        });
        e.loads = tried.iter().map(|&i| set.get(i).active()).collect();
        e.candidates = tried;
        e.chosen = chosen.or_else(|| least_loaded(set, 0, true));
        e.reason = match (chosen, e.chosen) {
            (_, None) => "no backend is available".into(),
            (Some(c), _) => {
                let cap = self.cap(total, set.get(c).weight(), wsum);
                let skipped = e.candidates.len() - 1;
                format!(
                    "ring point {point:#018x}; first backend clockwise with load+1 <= cap \
                     (load {}, cap ceil({}% * ({total}+1) * w/W) = {cap}){}",
                    set.get(c).active(),
                    self.factor_pct,
                    if skipped > 0 {
                        format!("; skipped {skipped} over their cap")
                    } else {
                        String::new()
                    }
                )
            }
            (None, Some(_)) => "every backend is over its cap; least loaded".into(),
        };
        e
    }
}
