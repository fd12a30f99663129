//! Locality lost when one backend fails (Vibra thesis 4.3.3, figure 4.1).
//!
//! The URL namespace is cut into N equal sub-namespaces; sub-namespace i is
//! served by the R-subset starting at backend i. Each (sub-namespace, member)
//! pair is an *instance* whose cached objects are the locality. When backend j
//! fails, the locality lost is the share of instances (weighted by namespace
//! width) whose member changed:
//!
//! * naive: rehash over the N-1 survivors, cutting the namespace into N-1
//!   equal slices served by subsets of the survivors in order. For R = 1 the
//!   loss is 50 % when the first or last backend fails, whatever N, and 37 %
//!   on average at N = 10, as the thesis reports.
//! * optimal (subset rebuilding, `Failover::Skip`): keep the N sub-namespaces
//!   and skip j when building subsets; only j's R instances move, 1/N.
//!
//! Both are computed from the same subset construction the selector uses
//! ([`subset_of`]), exactly, in integer arithmetic over the common refinement
//! of the two partitions (positions in units of 1/(N(N-1))).

use super::urlhash::subset_of;
use serde::Serialize;

/// Locality loss over every single-backend failure, as fractions in [0, 1].
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LocalityLoss {
    /// Backends.
    pub nodes: usize,
    /// Replication factor (capped at N).
    pub replicas: usize,
    /// Naive rehash, mean over the failed backend.
    pub naive_avg: f64,
    /// Naive rehash, worst failed backend.
    pub naive_worst: f64,
    /// Subset rebuilding, mean over the failed backend.
    pub optimal_avg: f64,
    /// Subset rebuilding, worst failed backend.
    pub optimal_worst: f64,
}

/// Bad parameters.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LocalityError {
    /// A failure analysis needs a survivor.
    #[error("--nodes must be at least 2 (got {0}); with one node a failure loses everything")]
    TooFewNodes(usize),
    /// R must be at least 1.
    #[error("--replicas must be at least 1")]
    NoReplicas,
    /// Keeps the exact arithmetic in range.
    #[error("--nodes must be at most 100000 (got {0})")]
    TooManyNodes(usize),
}

fn check(n: usize, r: usize) -> Result<usize, LocalityError> {
    if n < 2 {
        return Err(LocalityError::TooFewNodes(n));
    }
    if n > 100_000 {
        return Err(LocalityError::TooManyNodes(n));
    }
    if r == 0 {
        return Err(LocalityError::NoReplicas);
    }
    Ok(r.min(n))
}

/// Retained (instance-weighted) width when backend `j` fails and the naive
/// rehash is used, in units of 1/(N(N-1)) per instance; returns (kept, total).
fn naive_kept(n: usize, r: usize, j: usize) -> (u128, u128) {
    let m = n - 1; // survivors
    let surv = |k: usize| if k < j { k } else { k + 1 };
    let r_new = r.min(m);
    let unit = (n * m) as u128; // namespace width
    let mut kept = 0u128;
    // Breakpoints: old at multiples of m, new at multiples of n.
    let mut pos = 0usize;
    while pos < n * m {
        let old = pos / m;
        let new = pos / n;
        let next = ((old + 1) * m).min((new + 1) * n);
        let width = (next - pos) as u128;
        let old_set = subset_of(n, r, old, |_| true);
        let new_set: Vec<usize> = (0..r_new).map(|t| surv((new + t) % m)).collect();
        let same = old_set.iter().filter(|x| new_set.contains(x)).count() as u128;
        kept += width * same;
        pos = next;
    }
    (kept, unit * r as u128)
}

/// Instances kept when backend `j` fails and subsets skip it; (kept, total).
fn optimal_kept(n: usize, r: usize, j: usize) -> (u128, u128) {
    let mut kept = 0u128;
    for i in 0..n {
        let old = subset_of(n, r, i, |_| true);
        let new = subset_of(n, r, i, |x| x != j);
        kept += old.iter().filter(|x| new.contains(x)).count() as u128;
    }
    (kept, (n * r) as u128)
}

/// Loss when backend `j` of `n` fails, naive rehash.
pub fn naive_loss(n: usize, r: usize, j: usize) -> Result<f64, LocalityError> {
    let r = check(n, r)?;
    let (k, t) = naive_kept(n, r, j % n);
    Ok(1.0 - k as f64 / t as f64)
}

/// Loss when backend `j` of `n` fails, subset rebuilding.
pub fn optimal_loss(n: usize, r: usize, j: usize) -> Result<f64, LocalityError> {
    let r = check(n, r)?;
    let (k, t) = optimal_kept(n, r, j % n);
    Ok(1.0 - k as f64 / t as f64)
}

/// Loss over every single-backend failure, each equally likely.
pub fn locality_loss(n: usize, r: usize) -> Result<LocalityLoss, LocalityError> {
    let r = check(n, r)?;
    let mut out = LocalityLoss {
        nodes: n,
        replicas: r,
        naive_avg: 0.0,
        naive_worst: 0.0,
        optimal_avg: 0.0,
        optimal_worst: 0.0,
    };
    for j in 0..n {
        let (k, t) = naive_kept(n, r, j);
        let nl = 1.0 - k as f64 / t as f64;
        let (k, t) = optimal_kept(n, r, j);
        let ol = 1.0 - k as f64 / t as f64;
        out.naive_avg += nl / n as f64;
        out.optimal_avg += ol / n as f64;
        out.naive_worst = out.naive_worst.max(nl);
        out.optimal_worst = out.optimal_worst.max(ol);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn thesis_naive_r1_n10() {
        // 4.3.3: "the naive approach will lose 50% of locality for all cluster
        // sizes in the worst case ... for a cluster of 10 servers, the average
        // loss of locality is 37%."
        let l = locality_loss(10, 1).unwrap();
        assert!(close(l.naive_worst, 0.5), "{l:?}");
        assert!((l.naive_avg - 0.37).abs() < 0.005, "{l:?}");
        // exactly 11/30 under the equal-slices model
        assert!(close(l.naive_avg, 11.0 / 30.0), "{l:?}");
    }

    #[test]
    fn naive_worst_is_half_for_every_n_and_at_the_ends() {
        for n in 2..40 {
            let l = locality_loss(n, 1).unwrap();
            assert!(close(l.naive_worst, 0.5), "n={n} {l:?}");
            assert!(close(naive_loss(n, 1, 0).unwrap(), 0.5));
            assert!(close(naive_loss(n, 1, n - 1).unwrap(), 0.5));
        }
    }

    #[test]
    fn naive_average_falls_with_n() {
        let a: Vec<f64> = (3..30)
            .map(|n| locality_loss(n, 1).unwrap().naive_avg)
            .collect();
        assert!(a.windows(2).all(|w| w[1] < w[0]), "{a:?}");
    }

    #[test]
    fn optimal_is_one_over_n() {
        for n in 2..30 {
            for r in 1..=n {
                let l = locality_loss(n, r).unwrap();
                assert!(close(l.optimal_avg, 1.0 / n as f64), "n={n} r={r} {l:?}");
                assert!(close(l.optimal_worst, 1.0 / n as f64), "n={n} r={r} {l:?}");
            }
        }
    }

    #[test]
    fn figure_4_2_example() {
        // N=4, R=2, VM_1 fails: 2 of 8 instances change.
        let (k, t) = optimal_kept(4, 2, 0);
        assert_eq!((t - k, t), (2, 8));
    }

    #[test]
    fn replication_reduces_naive_loss() {
        // Figure 4.1: "The average loss of locality is reduced if R is greater than 1."
        let r1 = locality_loss(10, 1).unwrap().naive_avg;
        let r2 = locality_loss(10, 2).unwrap().naive_avg;
        let r3 = locality_loss(10, 3).unwrap().naive_avg;
        assert!(r2 < r1 && r3 < r2, "{r1} {r2} {r3}");
        assert!(r3 > locality_loss(10, 3).unwrap().optimal_avg);
    }

    #[test]
    fn bad_input() {
        assert_eq!(locality_loss(1, 1), Err(LocalityError::TooFewNodes(1)));
        assert_eq!(locality_loss(5, 0), Err(LocalityError::NoReplicas));
    }
}
