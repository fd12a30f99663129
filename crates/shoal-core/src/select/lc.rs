//! Least connections, optionally weighted.

use super::{BackendSet, Explanation, RequestKey, Selector, least_loaded};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// Least active connections (`lc`), or least active connections per unit of
/// weight (`wlc`, LVS). Ties rotate so that an idle cluster is not all sent
/// to the first backend.
#[derive(Debug)]
pub struct LeastConn {
    weighted: bool,
    tie: AtomicUsize,
}

impl LeastConn {
    /// `lc` or, when `weighted`, `wlc`.
    pub fn new(weighted: bool) -> Self {
        Self {
            weighted,
            tie: AtomicUsize::new(0),
        }
    }
}

impl Selector for LeastConn {
    fn name(&self) -> &'static str {
        if self.weighted { "wlc" } else { "lc" }
    }
    fn select(&self, _req: &RequestKey<'_>, set: &BackendSet) -> Option<usize> {
        let n = set.len().max(1);
        least_loaded(set, self.tie.fetch_add(1, Relaxed) % n, self.weighted)
    }
    fn explain(&self, req: &RequestKey<'_>, set: &BackendSet) -> Explanation {
        let mut e = Explanation::new(self.name(), req);
        let n = set.len().max(1);
        e.candidates = (0..set.len()).filter(|&i| set.get(i).available()).collect();
        e.loads = e.candidates.iter().map(|&i| set.get(i).active()).collect();
        e.chosen = least_loaded(set, self.tie.load(Relaxed) % n, self.weighted);
        e.reason = match e.chosen {
            Some(i) if self.weighted => format!(
                "fewest active connections per weight ({} active, weight {})",
                set.get(i).active(),
                set.get(i).weight()
            ),
            Some(i) => format!("fewest active connections ({})", set.get(i).active()),
            None => "no backend is available".into(),
        };
        e
    }
}
