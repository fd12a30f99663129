//! How often a cluster sends its summaries to a peer, and when a silent
//! peer is presumed dead (H-SWEB §3 gives neither number: "the rate ...
//! changes dynamically based on the amount of information being
//! transferred as well as the bandwidth and latency", and "for a
//! predetermined period").
//!
//! The interval (notes UV9, our rule): at least the time that keeps the
//! exchange within `budget` of the link (bytes · 8 / (budget · bandwidth)),
//! at least two round trips (an exchange is one request and its answer, so
//! one is never queued behind the last), at least `min`. While the
//! summaries change (a load moved by more than 10 %, a node came or went,
//! the object list changed) the interval stays at that floor; while they
//! do not, it doubles up to `max` (2 s: a dead peer is then noticed within 7 s),
//! so a quiet federation costs little. The
//! paper's own budget, under 1 % of the network, is the default.
//!
//! Dead (notes UV8): nothing heard from the peer (a request of its own or
//! an answer to ours) for 3 of the peer's own intervals plus one second;
//! the peer says its interval in every message, so a peer on a slow link
//! that exchanges rarely is not presumed dead for it. Any message revives
//! it. Three intervals let two exchanges be lost in a row; the second is
//! slack for a round trip and a busy scheduler.

use super::summary::Summary;

/// The exchange interval rule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IntervalRule {
    /// Share of the link the exchange may take (0.01: 1 %).
    pub budget: f64,
    /// Shortest interval, seconds.
    pub min_secs: f64,
    /// Longest interval while nothing changes, seconds.
    pub max_secs: f64,
    /// Longest interval at all, seconds, even on a link too slow for the
    /// budget at `max_secs`.
    pub ceiling_secs: f64,
}

impl Default for IntervalRule {
    fn default() -> Self {
        Self {
            budget: 0.01,
            min_secs: 0.5,
            max_secs: 2.0,
            ceiling_secs: 60.0,
        }
    }
}

impl IntervalRule {
    /// The shortest interval the budget and the round trip allow, seconds.
    pub fn floor(&self, bytes: u64, link_mbit: f64, rtt_ms: f64) -> f64 {
        let budget_secs = if link_mbit > 0.0 {
            bytes as f64 * 8.0 / (self.budget * link_mbit * 1e6)
        } else {
            self.ceiling_secs
        };
        budget_secs
            .max(2.0 * rtt_ms / 1e3)
            .max(self.min_secs)
            .min(self.ceiling_secs)
    }

    /// The next interval after one of `prev` seconds: the floor while the
    /// summaries change, doubling to `max_secs` while they do not.
    pub fn next(
        &self,
        prev_secs: f64,
        bytes: u64,
        link_mbit: f64,
        rtt_ms: f64,
        changed: bool,
    ) -> f64 {
        let floor = self.floor(bytes, link_mbit, rtt_ms);
        if changed {
            floor
        } else {
            (prev_secs * 2.0).min(self.max_secs).max(floor)
        }
    }
}

/// Whether a service's summary changed enough to exchange at the floor:
/// a load moved by more than 10 % (or 0.1 request in flight, whichever is
/// more), a node came or went, the object list changed.
pub fn changed(prev: Option<&Summary>, cur: &Summary) -> bool {
    let Some(p) = prev else { return true };
    let moved = |a: f64, b: f64| (a - b).abs() > (0.1 * a.abs().max(b.abs())).max(0.1);
    p.nodes != cur.nodes
        || p.objects_version != cur.objects_version
        || moved(p.avg_load, cur.avg_load)
        || moved(p.lowest_load, cur.lowest_load)
}

/// A peer's liveness.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Liveness {
    /// When it was last heard from (ms, caller's clock); `None`: never.
    pub last_heard_ms: Option<u64>,
    /// The interval it says it exchanges at, ms.
    pub peer_interval_ms: u64,
}

impl Default for Liveness {
    fn default() -> Self {
        Self {
            last_heard_ms: None,
            peer_interval_ms: 1000,
        }
    }
}

impl Liveness {
    /// Silence after which the peer is presumed dead, ms.
    pub fn dead_after_ms(&self) -> u64 {
        3 * self.peer_interval_ms + 1000
    }

    /// Records a message from the peer.
    pub fn heard(&mut self, now_ms: u64, peer_interval_ms: u64) {
        self.last_heard_ms = Some(now_ms);
        self.peer_interval_ms = peer_interval_ms.max(1);
    }

    /// Whether the peer is presumed alive at `now_ms`.
    pub fn alive(&self, now_ms: u64) -> bool {
        match self.last_heard_ms {
            Some(t) => now_ms.saturating_sub(t) <= self.dead_after_ms(),
            None => false,
        }
    }
}
