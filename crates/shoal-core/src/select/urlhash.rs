//! URL hashing (Vibra thesis 3.3.1, 3.4.3) with locality-keeping failure
//! handling (4.3.3).
//!
//! The object name (path without the query) is hashed into one of N
//! sub-namespaces, N being the number of listed backends. Sub-namespace i is
//! served by subset i: backend i and the next R-1 backends (wrapping). The
//! least-loaded member of the subset (fewest active connections; ties go to
//! the earlier member, which keeps an idle cluster's locality) gets the request.

use super::{BackendSet, Explanation, HashFn, RequestKey, Selector};
use serde::Serialize;
use smallvec::SmallVec;
use std::fmt;
use std::str::FromStr;

/// What to do when backends are unavailable (ejected or draining).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Failover {
    /// Keep N sub-namespaces and build each subset from the next R
    /// *available* backends, skipping failed ones: only the failed backend's
    /// instances move, the optimal 1/N loss (thesis 4.3.3).
    Skip,
    /// Rehash over the available backends only (N-1 sub-namespaces after one
    /// failure): the thesis's naive approach, kept for comparison.
    Naive,
}

impl Failover {
    /// The command-line name.
    pub fn as_str(self) -> &'static str {
        match self {
            Failover::Skip => "skip",
            Failover::Naive => "naive",
        }
    }
}

impl FromStr for Failover {
    type Err = super::UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "skip" | "optimal" => Ok(Failover::Skip),
            "naive" => Ok(Failover::Naive),
            _ => Err(super::UnknownName {
                what: "failover mode",
                given: s.to_string(),
                expected: "skip, naive",
            }),
        }
    }
}

impl fmt::Display for Failover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Subset of sub-namespace `sub` among `n` backends with replication factor
/// `r`, skipping backends for which `up` is false: the next `r` up backends
/// starting at `sub`, wrapping (fewer if fewer are up).
pub fn subset_of(
    n: usize,
    r: usize,
    sub: usize,
    up: impl Fn(usize) -> bool,
) -> SmallVec<[usize; 8]> {
    let mut out = SmallVec::new();
    for k in 0..n {
        if out.len() >= r {
            break;
        }
        let i = (sub + k) % n;
        if up(i) {
            out.push(i);
        }
    }
    out
}

/// The url-hash selector.
#[derive(Debug)]
pub struct UrlHash {
    hash: HashFn,
    replicas: usize,
    failover: Failover,
}

/// A url-hash decision with its working.
struct Decision {
    hash: u64,
    sub: usize,
    subset: SmallVec<[usize; 8]>,
    chosen: Option<usize>,
}

impl UrlHash {
    /// url-hash with hash function `hash`, replication factor `replicas` (>= 1).
    pub fn new(hash: HashFn, replicas: usize, failover: Failover) -> Self {
        Self {
            hash,
            replicas: replicas.max(1),
            failover,
        }
    }

    /// The sub-namespace of an object among `n`.
    pub fn sub_namespace(&self, object: &str, n: usize) -> usize {
        self.hash.reduce(self.hash.hash(object.as_bytes()), n)
    }

    fn decide(&self, req: &RequestKey<'_>, set: &BackendSet) -> Decision {
        let h = self.hash.hash(req.object().as_bytes());
        let n = set.len();
        if n == 0 {
            return Decision {
                hash: h,
                sub: 0,
                subset: SmallVec::new(),
                chosen: None,
            };
        }
        let (sub, subset) = match self.failover {
            Failover::Skip => {
                let sub = self.hash.reduce(h, n);
                (
                    sub,
                    subset_of(n, self.replicas, sub, |i| set.get(i).available()),
                )
            }
            Failover::Naive => {
                let live: Vec<usize> = (0..n).filter(|&i| set.get(i).available()).collect();
                if live.is_empty() {
                    (0, SmallVec::new())
                } else {
                    let m = live.len();
                    let sub = self.hash.reduce(h, m);
                    let r = self.replicas.min(m);
                    (sub, (0..r).map(|t| live[(sub + t) % m]).collect())
                }
            }
        };
        let mut chosen: Option<(usize, u32)> = None;
        for &i in &subset {
            let a = set.get(i).active();
            if chosen.is_none_or(|(_, ca)| a < ca) {
                chosen = Some((i, a));
            }
        }
        Decision {
            hash: h,
            sub,
            subset,
            chosen: chosen.map(|(i, _)| i),
        }
    }

    /// Fast path for `Skip`: no allocation, stops after R available backends.
    fn select_skip(&self, req: &RequestKey<'_>, set: &BackendSet) -> Option<usize> {
        let n = set.len();
        if n == 0 {
            return None;
        }
        let sub = self.hash.reduce(self.hash.hash(req.object().as_bytes()), n);
        let mut found = 0;
        let mut best: Option<(usize, u32)> = None;
        let mut i = sub;
        for _ in 0..n {
            let b = set.get(i);
            if b.available() {
                let a = b.active();
                if best.is_none_or(|(_, ba)| a < ba) {
                    best = Some((i, a));
                }
                found += 1;
                if found == self.replicas {
                    break;
                }
            }
            i += 1;
            if i == n {
                i = 0;
            }
        }
        best.map(|(i, _)| i)
    }
}

impl Selector for UrlHash {
    fn name(&self) -> &'static str {
        "url-hash"
    }
    fn select(&self, req: &RequestKey<'_>, set: &BackendSet) -> Option<usize> {
        match self.failover {
            Failover::Skip => self.select_skip(req, set),
            Failover::Naive => self.decide(req, set).chosen,
        }
    }
    fn explain(&self, req: &RequestKey<'_>, set: &BackendSet) -> Explanation {
        let d = self.decide(req, set);
        let mut e = Explanation::new(self.name(), req);
        e.hash_fn = Some(self.hash.as_str());
        e.hash = Some(d.hash);
        e.sub_namespace = (!d.subset.is_empty()).then_some(d.sub);
        e.loads = d.subset.iter().map(|&i| set.get(i).active()).collect();
        e.candidates = d.subset.to_vec();
        e.chosen = d.chosen;
        let n = set.len();
        let down = (0..n).filter(|&i| !set.get(i).available()).count();
        let ns = match self.failover {
            Failover::Skip => n,
            Failover::Naive => n - down,
        };
        e.skipped = match self.failover {
            // The walk from the sub-namespace to the subset's last member:
            // the unavailable backends on the way are what locality lost.
            Failover::Skip if !d.subset.is_empty() => {
                let last = *d.subset.last().unwrap_or(&d.sub);
                let span = (last + n - d.sub) % n + 1;
                (0..span)
                    .map(|k| (d.sub + k) % n)
                    .filter(|&i| !set.get(i).available())
                    .collect()
            }
            // Skip with nothing available, or naive: every unavailable
            // backend changed the hashing.
            _ => (0..n).filter(|&i| !set.get(i).available()).collect(),
        };
        e.reason = match d.chosen {
            None => "no backend is available".into(),
            Some(c) => {
                let mut r = format!(
                    "{}({:?}) = {} -> sub-namespace {} of {}; subset (R={}) {:?}; ",
                    self.hash.as_str(),
                    e.object,
                    d.hash,
                    d.sub,
                    ns,
                    self.replicas,
                    e.candidates
                );
                if d.subset.len() == 1 {
                    r.push_str("only member");
                } else {
                    let a = set.get(c).active();
                    if e.loads.iter().filter(|&&l| l == a).count() > 1 {
                        r.push_str(&format!("least loaded ({a} active), first of the tied"));
                    } else {
                        r.push_str(&format!("least loaded ({a} active)"));
                    }
                }
                match self.failover {
                    Failover::Skip if !e.skipped.is_empty() => r.push_str(&format!(
                        "; unavailable {:?} skipped, the next in ring order taken instead \
                         (locality kept: only their objects move)",
                        e.skipped
                    )),
                    Failover::Skip if down > 0 => r.push_str(&format!(
                        "; {down} backend(s) unavailable elsewhere, this subset is intact"
                    )),
                    Failover::Naive if down > 0 => r.push_str(&format!(
                        "; {down} backend(s) unavailable, every object rehashed over the \
                         other {ns} (naive)"
                    )),
                    _ => {}
                }
                r
            }
        };
        e
    }
}
