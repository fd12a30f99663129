//! Leases (LAMA's lookup service, after JINI): a registration lives while its
//! lease is renewed; a lease that is not renewed before its deadline expires,
//! and expiry is how the pool learns that a node failed.
//!
//! Time is passed in as milliseconds on the caller's monotonic clock, so the
//! live manager and the simulator share this table.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;

/// Whether a holder is currently covered by a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseState {
    /// Renewed in time.
    Alive,
    /// The lease ran out (or was cancelled): the holder is considered failed.
    Failed,
}

#[derive(Debug, Clone)]
struct Entry {
    deadline_ms: u64,
    state: LeaseState,
}

/// What a renewal did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// The lease was alive and now runs to a later deadline.
    Extended,
    /// The holder had been declared failed; the renewal revives it.
    Revived,
}

/// A table of leases keyed by holder.
#[derive(Debug, Clone)]
pub struct LeaseTable<K> {
    ttl_ms: u64,
    entries: HashMap<K, Entry>,
}

impl<K: Eq + Hash + Clone> LeaseTable<K> {
    /// A table granting leases of `ttl_ms`.
    pub fn new(ttl_ms: u64) -> Self {
        Self {
            ttl_ms,
            entries: HashMap::new(),
        }
    }

    /// The lease duration granted by this table.
    pub fn ttl_ms(&self) -> u64 {
        self.ttl_ms
    }

    /// Grants (or re-grants) a full lease starting at `now_ms`.
    pub fn grant(&mut self, key: K, now_ms: u64) {
        self.entries.insert(
            key,
            Entry {
                deadline_ms: now_ms.saturating_add(self.ttl_ms),
                state: LeaseState::Alive,
            },
        );
    }

    /// Grants a lease lasting `grace_ms` instead of the TTL. Used after a
    /// manager restart: the registrations survived, their leases did not, and
    /// a live node must get time to find the manager again before anyone
    /// declares it failed.
    pub fn grant_grace(&mut self, key: K, now_ms: u64, grace_ms: u64) {
        self.entries.insert(
            key,
            Entry {
                deadline_ms: now_ms.saturating_add(grace_ms),
                state: LeaseState::Alive,
            },
        );
    }

    /// Renews the lease of `key`. Returns `None` when the key holds no lease
    /// at all (it must register first).
    pub fn renew<Q>(&mut self, key: &Q, now_ms: u64) -> Option<Renewal>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let ttl = self.ttl_ms;
        let e = self.entries.get_mut(key)?;
        let was = e.state;
        e.deadline_ms = now_ms.saturating_add(ttl);
        e.state = LeaseState::Alive;
        Some(match was {
            LeaseState::Alive => Renewal::Extended,
            LeaseState::Failed => Renewal::Revived,
        })
    }

    /// Drops the lease of `key` entirely (the registration was cancelled).
    pub fn remove<Q>(&mut self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.entries.remove(key).is_some()
    }

    /// Marks every alive lease whose deadline has passed as failed and
    /// returns their keys. A lease is declared failed once only.
    pub fn expire(&mut self, now_ms: u64) -> Vec<K> {
        let mut out = Vec::new();
        for (k, e) in self.entries.iter_mut() {
            if e.state == LeaseState::Alive && now_ms >= e.deadline_ms {
                e.state = LeaseState::Failed;
                out.push(k.clone());
            }
        }
        out
    }

    /// The state of `key`'s lease, if it has one.
    pub fn state<Q>(&self, key: &Q) -> Option<LeaseState>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.entries.get(key).map(|e| e.state)
    }

    /// Milliseconds left before `key`'s lease runs out (0 when failed).
    pub fn remaining_ms<Q>(&self, key: &Q, now_ms: u64) -> Option<u64>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.entries.get(key).map(|e| match e.state {
            LeaseState::Alive => e.deadline_ms.saturating_sub(now_ms),
            LeaseState::Failed => 0,
        })
    }

    /// The earliest deadline among alive leases, for sleeping until the next
    /// possible expiry.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.entries
            .values()
            .filter(|e| e.state == LeaseState::Alive)
            .map(|e| e.deadline_ms)
            .min()
    }

    /// Number of leases held (alive or failed).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// When an agent should renew next: a third of the TTL, as LAMA's agents do
/// with JINI leases, moved earlier by `jitter` (a fraction in [0, 1) drawn by
/// the caller) of up to a tenth of the TTL so thousands of agents started
/// together do not renew in lockstep.
pub fn renew_interval_ms(ttl_ms: u64, jitter: f64) -> u64 {
    let base = ttl_ms / 3;
    let spread = (ttl_ms / 10) as f64 * jitter.clamp(0.0, 1.0);
    base.saturating_sub(spread as u64).max(1)
}

/// Back-off after the `attempt`-th consecutive failed call (0-based):
/// doubling from `base_ms` up to `cap_ms`, scaled by `jitter` in [0, 1) into
/// [50%, 100%] of the step ("equal jitter").
pub fn backoff_ms(attempt: u32, base_ms: u64, cap_ms: u64, jitter: f64) -> u64 {
    let step = base_ms
        .saturating_mul(1u64.checked_shl(attempt.min(32)).unwrap_or(u64::MAX))
        .min(cap_ms);
    let half = step / 2;
    half + (half as f64 * jitter.clamp(0.0, 1.0)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_expires_after_ttl_once() {
        let mut t = LeaseTable::new(6000);
        t.grant("a", 0);
        t.grant("b", 1000);
        assert!(t.expire(5999).is_empty());
        assert_eq!(t.expire(6000), vec!["a"]);
        assert!(t.expire(6500).is_empty(), "a failed lease is reported once");
        assert_eq!(t.expire(7000), vec!["b"]);
        assert_eq!(t.state(&"a"), Some(LeaseState::Failed));
        assert_eq!(t.remaining_ms(&"a", 7000), Some(0));
    }

    #[test]
    fn renewal_extends_and_revives() {
        let mut t = LeaseTable::new(6000);
        t.grant("a", 0);
        assert_eq!(t.renew(&"a", 2000), Some(Renewal::Extended));
        assert!(t.expire(7999).is_empty());
        assert_eq!(t.remaining_ms(&"a", 7000), Some(1000));
        assert_eq!(t.expire(8000), vec!["a"]);
        assert_eq!(t.renew(&"a", 9000), Some(Renewal::Revived));
        assert_eq!(t.state(&"a"), Some(LeaseState::Alive));
        assert_eq!(t.renew(&"zzz", 9000), None);
    }

    #[test]
    fn grace_lease_outlives_ttl() {
        let mut t = LeaseTable::new(6000);
        t.grant_grace("a", 0, 20_000);
        assert!(t.expire(19_999).is_empty());
        assert_eq!(t.next_deadline_ms(), Some(20_000));
        assert_eq!(t.expire(20_000), vec!["a"]);
        assert_eq!(t.next_deadline_ms(), None);
    }

    #[test]
    fn renew_interval_is_a_third_minus_jitter() {
        assert_eq!(renew_interval_ms(6000, 0.0), 2000);
        assert_eq!(renew_interval_ms(6000, 0.5), 1700);
        assert!(renew_interval_ms(6000, 0.999) > 1400);
        assert_eq!(renew_interval_ms(1, 0.0), 1);
    }

    #[test]
    fn backoff_doubles_to_cap() {
        assert_eq!(backoff_ms(0, 100, 10_000, 1.0), 100);
        assert_eq!(backoff_ms(0, 100, 10_000, 0.0), 50);
        assert_eq!(backoff_ms(3, 100, 10_000, 1.0), 800);
        assert_eq!(backoff_ms(20, 100, 10_000, 1.0), 10_000);
        assert_eq!(backoff_ms(200, 100, 10_000, 1.0), 10_000);
    }
}
