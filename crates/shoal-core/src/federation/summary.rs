//! What one cluster tells the others of a service (H-SWEB §3: "only the
//! average load, the lowest load, and the number of nodes", plus the cache
//! contents, whose form the paper leaves open).
//!
//! Loads are a backend's requests in flight as its dispatcher sees them
//! (the mean over the last second), the unit the cost model multiplies a
//! request's unloaded service time by; the paper's rstat load average has
//! no unit and no per-node speed (notes gap 4), so each summary also
//! carries its own measured service time per request class: a slower
//! cluster shows it in its classes.

use serde::{Deserialize, Serialize};

/// An object's key: xxh3 of its path without the query. Eight bytes per
/// object instead of its path; a collision (about 1 in 2^64 per pair)
/// would make one object look present where it is not, and the fetch or
/// redirect it causes would get the remote cluster's 404.
pub fn object_key(target: &str) -> u64 {
    let path = target.split('?').next().unwrap_or(target);
    xxhash_rust::xxh3::xxh3_64(path.as_bytes())
}

/// A request class's key: xxh3 of the whole target (path and query), so
/// `/burn?ms=200` and `/burn?ms=20` are timed apart.
pub fn class_key(target: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(target.as_bytes())
}

/// One request class's unloaded service time at the summarising cluster.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ClassTime {
    /// [`class_key`] of the class.
    pub key: u64,
    /// Time to the response's first byte divided by (1 + the backend's
    /// requests in flight when it was sent), milliseconds, smoothed.
    pub base_ms: f64,
}

/// The path between the summarising cluster and the clients of another
/// cluster, measured on the clients that cluster redirected here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientPath {
    /// The cluster whose clients these were.
    pub from: String,
    /// Their round-trip time, ms (the kernel's smoothed estimate).
    pub rtt_ms: f64,
    /// Their delivery rate, Mbit/s (the kernel's estimate at the end of a
    /// response of at least 64 KB).
    pub mbit: f64,
    /// Responses measured.
    pub samples: u64,
}

/// A cluster's summary of one federated service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Summary {
    /// The service.
    pub service: String,
    /// Where its clients are sent (HOST:PORT of its dispatcher).
    pub dispatcher: String,
    /// Backends serving.
    pub nodes: u32,
    /// Mean requests in flight per backend.
    pub avg_load: f64,
    /// The least loaded backend's.
    pub lowest_load: f64,
    /// Objects held, as ([`object_key`], size in bytes), sorted by key.
    /// Sent only when [`Summary::objects_version`] changed since the peer
    /// last acknowledged it; empty otherwise.
    #[serde(default)]
    pub objects: Vec<(u64, u64)>,
    /// Version of the object list (changes whenever it does).
    #[serde(default)]
    pub objects_version: u64,
    /// The busiest request classes' service times.
    #[serde(default)]
    pub classes: Vec<ClassTime>,
    /// The paths to other clusters' clients, as measured here.
    #[serde(default)]
    pub client_paths: Vec<ClientPath>,
}

/// Average load, lowest load and node count of a cluster (UV1); `None`
/// for a cluster with no node, which has no load rather than zero load.
pub fn summarize(loads: &[f64]) -> Option<(f64, f64, u32)> {
    if loads.is_empty() {
        return None;
    }
    let n = loads.len();
    let avg = loads.iter().sum::<f64>() / n as f64;
    let low = loads.iter().copied().fold(f64::INFINITY, f64::min);
    Some((avg, low, n as u32))
}

/// A supercluster's summary of its members (H-SWEB §3, a layer the paper
/// did not build; notes UV2): the node-weighted average, the lowest of
/// the lowest loads, the summed node count. `None` when no member has a
/// node. shoal exchanges flat summaries; this is the rule a hierarchy
/// would use, kept here with its test vector.
pub fn aggregate(members: &[(f64, f64, u32)]) -> Option<(f64, f64, u32)> {
    let n: u32 = members.iter().map(|m| m.2).sum();
    if n == 0 {
        return None;
    }
    let weighted: f64 = members.iter().map(|m| m.0 * f64::from(m.2)).sum();
    let low = members
        .iter()
        .filter(|m| m.2 > 0)
        .map(|m| m.1)
        .fold(f64::INFINITY, f64::min);
    Some((weighted / f64::from(n), low, n))
}
