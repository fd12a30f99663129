//! Round-robin and smooth weighted round-robin.

use super::{BackendSet, Explanation, RequestKey, Selector};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// Plain round-robin over the available backends.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl RoundRobin {
    fn pick(&self, set: &BackendSet, advance: bool) -> Option<usize> {
        let n = set.len();
        if n == 0 {
            return None;
        }
        let start = if advance {
            self.next.fetch_add(1, Relaxed)
        } else {
            self.next.load(Relaxed)
        };
        (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| set.get(i).available())
    }
}

impl Selector for RoundRobin {
    fn name(&self) -> &'static str {
        "rr"
    }
    fn select(&self, _req: &RequestKey<'_>, set: &BackendSet) -> Option<usize> {
        self.pick(set, true)
    }
    fn explain(&self, req: &RequestKey<'_>, set: &BackendSet) -> Explanation {
        let mut e = Explanation::new(self.name(), req);
        e.chosen = self.pick(set, false);
        e.reason = match e.chosen {
            Some(i) => format!(
                "next in turn (turn counter at position {i} of {})",
                set.len()
            ),
            None => "no backend is available".into(),
        };
        e
    }
}

/// Smooth weighted round-robin (nginx): each pick adds every available peer's
/// weight to its current value, chooses the largest current value and
/// subtracts the total weight from it. Weights 5,1,1 give a a b a c a a, not
/// a a a a a b c.
#[derive(Debug, Default)]
pub struct SmoothWeighted {
    state: Mutex<WrrState>,
}

#[derive(Debug, Default)]
struct WrrState {
    generation: u64,
    current: Vec<i64>,
}

impl SmoothWeighted {
    fn pick(&self, set: &BackendSet, commit: bool) -> Option<usize> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.generation != set.generation() || st.current.len() != set.len() {
            st.generation = set.generation();
            st.current = vec![0; set.len()];
        }
        let mut current = if commit {
            std::mem::take(&mut st.current)
        } else {
            st.current.clone()
        };
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for (i, b) in set.iter().enumerate() {
            if !b.available() {
                continue;
            }
            let w = i64::from(b.weight());
            current[i] += w;
            total += w;
            if best.is_none_or(|j| current[i] > current[j]) {
                best = Some(i);
            }
        }
        if let Some(j) = best {
            current[j] -= total;
        }
        if commit {
            st.current = current;
        }
        best
    }
}

impl Selector for SmoothWeighted {
    fn name(&self) -> &'static str {
        "wrr"
    }
    fn select(&self, _req: &RequestKey<'_>, set: &BackendSet) -> Option<usize> {
        self.pick(set, true)
    }
    fn explain(&self, req: &RequestKey<'_>, set: &BackendSet) -> Explanation {
        let mut e = Explanation::new(self.name(), req);
        e.chosen = self.pick(set, false);
        e.reason = match e.chosen {
            Some(i) => format!(
                "largest current weight after adding weights (weight {})",
                set.get(i).weight()
            ),
            None => "no backend is available".into(),
        };
        e
    }
}
