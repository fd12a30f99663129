//! Request selection: which backend serves a request.
//!
//! Every algorithm implements [`Selector`] over a [`BackendSet`]. The selectors
//! are sans-I/O: they read per-backend counters (active connections, weight,
//! draining and health flags) that the caller keeps up to date, and the caller
//! passes the time (`RequestKey::now_ms`) where an algorithm needs one (LARD/R).
//!
//! Algorithms: `rr`, `wrr` (smooth weighted round-robin, as nginx), `lc`, `wlc`,
//! `lard` and `lard-r` (Pai et al., ASPLOS 1998), `url-hash` (Vibra thesis 3.3.1
//! with the failure handling of 4.3.3) and `bounded-ch` (consistent hashing with
//! bounded loads, Mirrokni et al.; HAProxy's `hash-balance-factor`).

mod backend;
mod chash;
mod hash;
mod lard;
mod lc;
/// Locality loss of naive rehashing vs subset rebuilding (thesis 4.3.3).
pub mod locality;
mod rr;
mod urlhash;

pub use backend::{
    Backend, BackendId, BackendSet, BackendSpec, Lease, OwnedLease, Pool, PoolError,
};
pub use chash::BoundedCh;
pub use hash::HashFn;
pub use lard::{Lard, LardParams};
pub use lc::LeastConn;
pub use rr::{RoundRobin, SmoothWeighted};
pub use urlhash::{Failover, UrlHash, subset_of};

use serde::Serialize;
use std::fmt;
use std::str::FromStr;

/// What a selector sees of a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestKey<'a> {
    /// The request target as received: origin form (`/a/b?q`) or absolute form.
    pub target: &'a str,
    /// Milliseconds on the caller's monotonic clock (only LARD/R uses it).
    pub now_ms: u64,
}

impl<'a> RequestKey<'a> {
    /// A key at time 0 (for callers without a clock: `shoal route`, tests).
    pub fn new(target: &'a str) -> Self {
        Self { target, now_ms: 0 }
    }

    /// The object name: the path without the query ("search part", thesis
    /// 3.4.3) and without scheme and authority if the target is absolute.
    pub fn object(&self) -> &'a str {
        object_of(self.target)
    }
}

/// The object name of a request target; see [`RequestKey::object`].
pub fn object_of(target: &str) -> &str {
    let mut t = target;
    // Origin form (`/a/b?q`), what nearly every request carries, cannot have
    // an authority: only the other forms need the (costlier) "://" search.
    if !t.starts_with('/')
        && let Some(rest) = t.split_once("://").map(|(_, r)| r)
    {
        // absolute form: drop the authority
        t = match rest.find('/') {
            Some(i) => &rest[i..],
            None => "/",
        };
    }
    // A byte scan: '?' and '#' are ASCII, so the cut is on a char boundary.
    let end = t
        .bytes()
        .position(|b| b == b'?' || b == b'#')
        .unwrap_or(t.len());
    &t[..end]
}

/// Why a selector chose what it chose.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Explanation {
    /// The algorithm's name.
    pub algo: &'static str,
    /// The object name the decision was based on.
    pub object: String,
    /// The hash function, for hashing algorithms.
    pub hash_fn: Option<&'static str>,
    /// The object's hash value, for hashing algorithms.
    pub hash: Option<u64>,
    /// The sub-namespace (url-hash).
    pub sub_namespace: Option<usize>,
    /// Candidate backends considered, in order (indices into the set).
    pub candidates: Vec<usize>,
    /// Active connections of each candidate when the decision was made.
    pub loads: Vec<u32>,
    /// The chosen backend (index into the set), if any is available.
    pub chosen: Option<usize>,
    /// Unavailable backends (ejected or draining) this decision passed
    /// over, where the algorithm would otherwise have considered them.
    pub skipped: Vec<usize>,
    /// A sentence saying why.
    pub reason: String,
}

impl Explanation {
    fn new(algo: &'static str, req: &RequestKey<'_>) -> Self {
        Self {
            algo,
            object: req.object().to_string(),
            hash_fn: None,
            hash: None,
            sub_namespace: None,
            candidates: Vec::new(),
            loads: Vec::new(),
            chosen: None,
            skipped: Vec::new(),
            reason: String::new(),
        }
    }
}

/// A request-selection algorithm.
///
/// `select` is a pure choice (it may update the algorithm's own history, as
/// LARD does, but counts no connection); `acquire` also counts the new
/// connection on the chosen backend and returns a [`Lease`] that uncounts it
/// when dropped. Indices refer to positions in the given set.
pub trait Selector: Send + Sync + fmt::Debug {
    /// The algorithm's name as given on the command line.
    fn name(&self) -> &'static str;
    /// Chooses a backend, or `None` when no backend is available.
    fn select(&self, req: &RequestKey<'_>, set: &BackendSet) -> Option<usize>;
    /// Chooses a backend and counts the connection on it.
    fn acquire<'s>(&self, req: &RequestKey<'_>, set: &'s BackendSet) -> Option<Lease<'s>> {
        let i = self.select(req, set)?;
        Some(set.lease(i))
    }
    /// Explains the choice `select` would make now, without changing any state.
    fn explain(&self, req: &RequestKey<'_>, set: &BackendSet) -> Explanation;
}

/// The algorithms, by command-line name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Algo {
    /// Round-robin.
    Rr,
    /// Smooth weighted round-robin.
    Wrr,
    /// Least connections.
    Lc,
    /// Weighted least connections.
    Wlc,
    /// Locality-aware request distribution.
    Lard,
    /// LARD with replication.
    LardR,
    /// URL hashing over sub-namespaces with replication factor R.
    UrlHash,
    /// Consistent hashing with bounded loads.
    BoundedCh,
}

impl Algo {
    /// All algorithms.
    pub const ALL: [Algo; 8] = [
        Algo::Rr,
        Algo::Wrr,
        Algo::Lc,
        Algo::Wlc,
        Algo::Lard,
        Algo::LardR,
        Algo::UrlHash,
        Algo::BoundedCh,
    ];

    /// The command-line name.
    pub fn as_str(self) -> &'static str {
        match self {
            Algo::Rr => "rr",
            Algo::Wrr => "wrr",
            Algo::Lc => "lc",
            Algo::Wlc => "wlc",
            Algo::Lard => "lard",
            Algo::LardR => "lard-r",
            Algo::UrlHash => "url-hash",
            Algo::BoundedCh => "bounded-ch",
        }
    }
}

impl fmt::Display for Algo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not an algorithm or hash function.
#[derive(Debug, thiserror::Error)]
#[error("unknown {what} {given:?}; expected one of: {expected}")]
pub struct UnknownName {
    what: &'static str,
    given: String,
    expected: &'static str,
}

impl FromStr for Algo {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Algo::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| UnknownName {
                what: "algorithm",
                given: s.to_string(),
                expected: "rr, wrr, lc, wlc, lard, lard-r, url-hash, bounded-ch",
            })
    }
}

/// Everything needed to build any selector.
#[derive(Debug, Clone)]
pub struct SelectorConfig {
    /// Which algorithm.
    pub algo: Algo,
    /// Replication factor R (url-hash).
    pub replicas: usize,
    /// Hash function (url-hash, bounded-ch).
    pub hash: HashFn,
    /// Failure handling (url-hash).
    pub failover: Failover,
    /// Balance factor in percent, >= 100 (bounded-ch; HAProxy's hash-balance-factor).
    pub balance_factor_pct: u32,
    /// LARD thresholds and history bound.
    pub lard: LardParams,
}

impl Default for SelectorConfig {
    fn default() -> Self {
        Self {
            algo: Algo::UrlHash,
            replicas: 1,
            hash: HashFn::Xxh3,
            failover: Failover::Skip,
            balance_factor_pct: 125,
            lard: LardParams::default(),
        }
    }
}

/// A bad selector configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// R must be at least 1.
    #[error("--replicas must be at least 1 (got {0})")]
    Replicas(usize),
    /// The balance factor must be at least 100 %.
    #[error("--balance-factor must be at least 100 (percent; got {0})")]
    BalanceFactor(u32),
    /// LARD needs 0 < T_low < T_high.
    #[error("LARD thresholds need 0 < T_low < T_high (got {0} and {1})")]
    LardThresholds(u32, u32),
}

/// Builds the selector a configuration names.
pub fn build(cfg: &SelectorConfig) -> Result<Box<dyn Selector>, ConfigError> {
    if cfg.replicas == 0 {
        return Err(ConfigError::Replicas(cfg.replicas));
    }
    if cfg.balance_factor_pct < 100 {
        return Err(ConfigError::BalanceFactor(cfg.balance_factor_pct));
    }
    if cfg.lard.t_low == 0 || cfg.lard.t_low >= cfg.lard.t_high {
        return Err(ConfigError::LardThresholds(cfg.lard.t_low, cfg.lard.t_high));
    }
    Ok(match cfg.algo {
        Algo::Rr => Box::new(RoundRobin::default()),
        Algo::Wrr => Box::new(SmoothWeighted::default()),
        Algo::Lc => Box::new(LeastConn::new(false)),
        Algo::Wlc => Box::new(LeastConn::new(true)),
        Algo::Lard => Box::new(Lard::new(false, cfg.lard.clone())),
        Algo::LardR => Box::new(Lard::new(true, cfg.lard.clone())),
        Algo::UrlHash => Box::new(UrlHash::new(cfg.hash, cfg.replicas, cfg.failover)),
        Algo::BoundedCh => Box::new(BoundedCh::new(cfg.hash, cfg.balance_factor_pct)),
    })
}

/// The available backend with the fewest active connections (relative to its
/// weight when `weighted`), scanning from `start` so that ties rotate.
pub(crate) fn least_loaded(set: &BackendSet, start: usize, weighted: bool) -> Option<usize> {
    let n = set.len();
    let mut best: Option<(usize, u64, u64)> = None; // (index, active, weight)
    for k in 0..n {
        let i = (start + k) % n;
        let b = set.get(i);
        if !b.available() {
            continue;
        }
        let a = u64::from(b.active());
        let w = if weighted {
            u64::from(b.weight().max(1))
        } else {
            1
        };
        match best {
            // a/w < ba/bw  <=>  a*bw < ba*w
            Some((_, ba, bw)) if a * bw >= ba * w => {}
            _ => best = Some((i, a, w)),
        }
    }
    best.map(|(i, _, _)| i)
}

#[cfg(test)]
mod tests;
