//! Bandwidth follows demand inside a service (Vibra, Tsai 2009, thesis
//! 3.3.2, 3.4.2 and 4.3.3).
//!
//! A service holds a fixed total BW. Its servers' caps are split in
//! proportion to their smoothed demand: eq. 3.1 `d' = alpha d + (1 - alpha) u`
//! and eq. 3.2 `bw' = BW d' / sum d'`, with a floor above zero so no server
//! is starved. Changes are applied reductions first: an increase is granted
//! only once every reduction it needs has been acknowledged by the node that
//! enforces it, so the caps in force never sum above BW ([`Plan`]). When a
//! server fails its cap is credited to the servers that inherit its work
//! (url-hash: 1/R to each of the next R live servers; other algorithms:
//! evenly), and given back when it returns ([`compensate`]).
//!
//! Caps are whole bytes per second (what `tc` takes), so the bound holds
//! exactly rather than up to rounding. Demand estimates are real numbers.
//! Rates are MB = 10^6 bytes (the thesis's 2.7 MB/s is 21.6 Mbit/s).
//!
//! [`Directory`] is the resource directory of 3.4.2 and the agent of 3.3.2
//! as one sans-I/O state machine: it is told samples, acknowledgements and
//! membership with the time, and answers with the caps each node must
//! enforce. The manager and the simulator drive the same code.

mod directory;
#[cfg(test)]
mod tests;

pub use directory::{
    CapChange, Directory, DirectoryError, HostStatus, Member, ServerStatus, ServiceBandwidth,
};

use serde::{Deserialize, Serialize};
use std::fmt;

/// One megabyte per second in bytes per second (MB = 10^6 B).
pub const MB: f64 = 1e6;

/// Why a rate was refused; the message names the input and the syntax.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid rate {input:?}: {why}; write a number with a unit, e.g. \"10.8 MB/s\", \"900 KB/s\", \"86 Mbit/s\" (MB = 10^6 bytes)"
)]
pub struct RateError {
    /// The text as given.
    pub input: String,
    /// What is wrong with it.
    pub why: &'static str,
}

/// Parses a rate into bytes per second: `10.8 MB/s`, `900KB/s`, `1 GB/s`,
/// `500 B/s`, `86.4 Mbit/s`, `100 kbit/s`, `1 Gbit/s`. Decimal units
/// (k = 10^3, M = 10^6, G = 10^9); a bare number is refused, since bits and
/// bytes are too easily confused.
pub fn parse_rate(s: &str) -> Result<f64, RateError> {
    let bad = |why| RateError {
        input: s.to_string(),
        why,
    };
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| bad("no unit"))?;
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(bad(if t.starts_with('-') {
            "it must not be negative"
        } else {
            "no number"
        }));
    }
    let unit = unit.trim();
    let factor = match unit.to_ascii_lowercase().as_str() {
        "b/s" | "bps" => 1.0,
        "kb/s" => 1e3,
        "mb/s" => 1e6,
        "gb/s" => 1e9,
        "bit/s" => 1.0 / 8.0,
        "kbit/s" | "kbit" => 1e3 / 8.0,
        "mbit/s" | "mbit" => 1e6 / 8.0,
        "gbit/s" | "gbit" => 1e9 / 8.0,
        _ => {
            return Err(bad(
                "unknown unit (use B/s, KB/s, MB/s, GB/s or kbit/s, Mbit/s, Gbit/s)",
            ));
        }
    };
    let v: f64 = num.parse().map_err(|_| bad("not a number"))?;
    let bps = v * factor;
    if !bps.is_finite() || bps > 1e13 {
        return Err(bad("too large"));
    }
    Ok(bps)
}

/// A rate for people: `2.700 MB/s`, `950.0 KB/s`, `12 B/s`.
pub fn format_rate(bps: f64) -> String {
    if bps >= 1e6 {
        format!("{:.3} MB/s", bps / 1e6)
    } else if bps >= 1e3 {
        format!("{:.1} KB/s", bps / 1e3)
    } else {
        format!("{bps:.0} B/s")
    }
}

/// Eq. 3.1: the new demand estimate of every server, `alpha d + (1 - alpha) u`.
/// `alpha` weights the old estimate (0.9: each new sample counts 10 %).
pub fn smooth(alpha: f64, d: &[f64], u: &[f64]) -> Vec<f64> {
    d.iter()
        .zip(u)
        .map(|(d, u)| alpha * d + (1.0 - alpha) * u.max(0.0))
        .collect()
}

/// Eq. 3.2 with a floor: splits `total` bytes/s in proportion to `demand`,
/// giving every server at least `floor` (water-filling: servers whose share
/// would fall below the floor get the floor, the rest share what is left in
/// proportion), in whole bytes summing to exactly `total`.
///
/// `None` when the demand carries no information (empty, all zero or not
/// finite): the caller keeps the caps it has (thesis V3.4: sum d' = 0 would
/// divide by zero). A floor above `total / n` is lowered to it.
pub fn proportional(total: u64, demand: &[f64], floor: u64) -> Option<Vec<u64>> {
    let n = demand.len();
    if n == 0 || demand.iter().any(|d| !d.is_finite() || *d < 0.0) {
        return None;
    }
    let sum: f64 = demand.iter().sum();
    if sum <= 0.0 {
        return None;
    }
    let floor = floor.min(total / n as u64);
    let mut floored = vec![false; n];
    // Each round moves at least one server to the floor, so n rounds suffice.
    let shares = loop {
        let rest_total = total - floor * floored.iter().filter(|f| **f).count() as u64;
        let rest_sum: f64 = (0..n).filter(|i| !floored[*i]).map(|i| demand[i]).sum();
        let shares: Vec<f64> = (0..n)
            .map(|i| {
                if floored[i] {
                    floor as f64
                } else if rest_sum > 0.0 {
                    rest_total as f64 * demand[i] / rest_sum
                } else {
                    0.0
                }
            })
            .collect();
        let mut changed = false;
        for i in 0..n {
            if !floored[i] && shares[i] < floor as f64 {
                floored[i] = true;
                changed = true;
            }
        }
        if !changed {
            break shares;
        }
    };
    Some(round_to_total(&shares, total, floor))
}

/// Whole bytes summing to `total` (largest remainder), none below `floor`.
fn round_to_total(shares: &[f64], total: u64, floor: u64) -> Vec<u64> {
    let mut out: Vec<u64> = shares
        .iter()
        .map(|s| (s.floor().max(0.0) as u64).max(floor))
        .collect();
    let mut sum: u64 = out.iter().sum();
    // Rounding down leaves at most n bytes; give them by largest remainder.
    let mut order: Vec<usize> = (0..shares.len()).collect();
    order.sort_by(|a, b| {
        let fa = shares[*a] - shares[*a].floor();
        let fb = shares[*b] - shares[*b].floor();
        fb.total_cmp(&fa).then(a.cmp(b))
    });
    let mut k = 0;
    while sum < total && !order.is_empty() {
        out[order[k % order.len()]] += 1;
        sum += 1;
        k += 1;
    }
    // Floating error can overshoot by a byte or two: take them back from the
    // largest caps, never below the floor.
    while sum > total {
        let i = (0..out.len()).max_by_key(|i| out[*i]).expect("non-empty");
        if out[i] <= floor {
            break;
        }
        out[i] -= 1;
        sum -= 1;
    }
    out
}

/// A shaper's counters for one class, as `tc -s class show` gives them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Bytes sent.
    pub bytes: u64,
    /// Packets sent.
    pub packets: u64,
    /// Packets dropped.
    pub drops: u64,
    /// Bytes queued now.
    pub backlog: u64,
}

/// The demand of thesis 3.4.5, the "packet-enqueuing rate" before shaping,
/// from two readings `secs` apart: bytes sent, plus bytes dropped (tc counts
/// dropped packets; each is taken at the mean size of those sent), plus the
/// growth of the queue. Returns (offered, sent) bytes/s; `None` when the
/// readings are unusable (no time between them, or counters went back,
/// as when the class was recreated).
pub fn offered_rate(prev: Counters, cur: Counters, secs: f64) -> Option<(f64, f64)> {
    if !(secs.is_finite() && secs > 0.0) || cur.bytes < prev.bytes || cur.drops < prev.drops {
        return None;
    }
    let sent = (cur.bytes - prev.bytes) as f64;
    let pkts = cur.packets.saturating_sub(prev.packets);
    let mean = if pkts > 0 {
        sent / pkts as f64
    } else if cur.packets > 0 {
        cur.bytes as f64 / cur.packets as f64
    } else {
        1500.0
    };
    let dropped = (cur.drops - prev.drops) as f64 * mean;
    let queued = cur.backlog as f64 - prev.backlog as f64;
    Some((((sent + dropped + queued) / secs).max(0.0), sent / secs))
}

/// How a failed server's bandwidth is spread (thesis 4.3.2, 4.3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Spread {
    /// URL hashing with replication R: the next R live servers in the
    /// ordered list each take one more sub-namespace, so each gets 1/R.
    NextR(usize),
    /// Every other algorithm: evenly over the live servers.
    Even,
}

impl Spread {
    /// The spread for a dispatch algorithm name and url-hash's R.
    pub fn for_algo(algo: &str, replicas: usize) -> Self {
        if algo == "url-hash" {
            Spread::NextR(replicas.max(1))
        } else {
            Spread::Even
        }
    }
}

impl fmt::Display for Spread {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Spread::NextR(r) => write!(f, "next {r} live servers, 1/{r} each"),
            Spread::Even => f.write_str("evenly over the live servers"),
        }
    }
}

/// Who inherits the work of the server at `failed` in the ordered list of
/// `up.len()` servers: for url-hash the next R live servers after it
/// (wrapping), otherwise every live server.
pub fn heirs(spread: Spread, failed: usize, up: &[bool]) -> Vec<usize> {
    let n = up.len();
    let live = (0..n).filter(|i| *i != failed && up[*i]);
    match spread {
        Spread::Even => live.collect(),
        Spread::NextR(r) => (1..n)
            .map(|k| (failed + k) % n)
            .filter(|i| up[*i])
            .take(r)
            .collect(),
    }
}

/// Failure compensation (thesis 4.3.3): the cap of every server that is
/// not up is credited to its heirs (see [`heirs`]), in whole bytes (the
/// remainder to the first heir), and the failed server's cap becomes 0.
/// Returns the new caps and, per failed server, what each heir received
/// (so it can be given back when the server returns). The total is
/// unchanged unless no server is left up.
pub fn compensate(caps: &[u64], up: &[bool], spread: Spread) -> (Vec<u64>, Vec<Credit>) {
    let mut out = caps.to_vec();
    let mut credits = Vec::new();
    for j in 0..caps.len() {
        if up[j] || caps[j] == 0 {
            continue;
        }
        let to = heirs(spread, j, up);
        if to.is_empty() {
            continue;
        }
        let amount = caps[j];
        let each = amount / to.len() as u64;
        let mut given = Vec::new();
        for (k, i) in to.iter().enumerate() {
            let g = if k == 0 {
                amount - each * (to.len() as u64 - 1)
            } else {
                each
            };
            out[*i] += g;
            given.push((*i, g));
        }
        out[j] = 0;
        credits.push(Credit {
            from: j,
            amount,
            given,
        });
    }
    (out, credits)
}

/// What one failed server's cap became: `amount` bytes/s, given to heirs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credit {
    /// The failed server (index in the ordered list).
    pub from: usize,
    /// Its cap when it failed.
    pub amount: u64,
    /// (heir, bytes/s received).
    pub given: Vec<(usize, u64)>,
}

/// The give-back when a failed server returns: each heir returns what it
/// received, as far as it can without going below `floor`; the returning
/// server gets the sum, and at least `floor` (the shortfall taken from the
/// largest caps). The total is unchanged.
pub fn give_back(caps: &[u64], credit: &Credit, floor: u64) -> Vec<u64> {
    let mut out = caps.to_vec();
    let mut back = 0;
    for (i, g) in &credit.given {
        let g = (*g).min(out[*i].saturating_sub(floor));
        out[*i] -= g;
        back += g;
    }
    while back < floor {
        let i = (0..out.len())
            .filter(|i| *i != credit.from)
            .max_by_key(|i| out[*i]);
        let Some(i) = i else { break };
        let take = (floor - back).min(out[i].saturating_sub(floor));
        if take == 0 {
            break;
        }
        out[i] -= take;
        back += take;
    }
    out[credit.from] += back;
    out
}

/// One step of a reallocation: set server `server`'s cap to `cap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// Index in the ordered list.
    pub server: usize,
    /// The cap before.
    pub from: u64,
    /// The cap after.
    pub to: u64,
}

/// A reallocation in the order the thesis prescribes (3.3.2): "first
/// reduces the bandwidth allocation from the over-provisioned VMs, and then
/// increases the bandwidth allocation for the rest". Every prefix of
/// `reductions` followed by every prefix of `increases` keeps the sum at
/// or below the larger of the old and new sums, and every cap between its
/// old and new value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Caps that go down; all are applied and acknowledged first.
    pub reductions: Vec<Step>,
    /// Caps that go up, once every reduction is acknowledged.
    pub increases: Vec<Step>,
}

impl Plan {
    /// The plan from `old` to `new` caps (same length).
    pub fn between(old: &[u64], new: &[u64]) -> Self {
        let mut p = Plan::default();
        for (i, (o, n)) in old.iter().zip(new).enumerate() {
            let s = Step {
                server: i,
                from: *o,
                to: *n,
            };
            if n < o {
                p.reductions.push(s);
            } else if n > o {
                p.increases.push(s);
            }
        }
        p
    }

    /// Nothing changes.
    pub fn is_empty(&self) -> bool {
        self.reductions.is_empty() && self.increases.is_empty()
    }

    /// The steps in order: reductions, then increases.
    pub fn steps(&self) -> impl Iterator<Item = &Step> {
        self.reductions.iter().chain(&self.increases)
    }
}

/// A service's bandwidth settings (`[bandwidth]` in its file), checked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// The service's total BW, bytes/s.
    pub total: u64,
    /// Eq. 3.1's weight of the old estimate.
    pub alpha: f64,
    /// How often caps are recomputed, milliseconds.
    pub interval_ms: u64,
    /// No cap goes below this, bytes/s (lowered to total / n if above).
    pub floor: u64,
    /// Where a failed server's cap goes.
    pub spread: Spread,
}

/// A bad `[bandwidth]` setting: which key, what is wrong, the fix.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("bandwidth.{key}: {problem}")]
pub struct SettingsError {
    /// The key.
    pub key: &'static str,
    /// What is wrong and how to fix it.
    pub problem: String,
}

/// The floor when none is given: 5 % of the fair share of 4 servers.
pub const DEFAULT_FLOOR_FRACTION: f64 = 0.05 / 4.0;

impl Settings {
    /// Checks the raw values of a service file's `[bandwidth]` table.
    pub fn parse(
        total: &str,
        alpha: f64,
        interval: &str,
        floor: Option<&str>,
        spread: Spread,
    ) -> Result<Self, SettingsError> {
        let e = |key, problem: String| SettingsError { key, problem };
        let t = parse_rate(total).map_err(|x| e("total", x.to_string()))?;
        if t < 1000.0 {
            return Err(e(
                "total",
                format!(
                    "{total:?} is below 1 KB/s, too little to share; give the service's whole egress, e.g. \"10.8 MB/s\""
                ),
            ));
        }
        if !(alpha.is_finite() && (0.0..1.0).contains(&alpha)) {
            return Err(e(
                "alpha",
                format!(
                    "must be in [0, 1), the weight of the old estimate in eq. 3.1, got {alpha}; the thesis uses 0.9"
                ),
            ));
        }
        let secs =
            crate::duration::parse_secs(interval).map_err(|x| e("interval", x.to_string()))?;
        if !(1.0..=3600.0).contains(&secs) {
            return Err(e(
                "interval",
                format!(
                    "must be between 1s (demand is sampled every second) and 1h, got {interval:?}; the thesis uses 3s"
                ),
            ));
        }
        let floor = match floor {
            None => (t * DEFAULT_FLOOR_FRACTION) as u64,
            Some(f) => {
                let v = parse_rate(f).map_err(|x| e("floor", x.to_string()))?;
                if v < 1.0 || v >= t {
                    return Err(e(
                        "floor",
                        format!(
                            "must be above zero and below the total ({}), got {f:?}",
                            format_rate(t)
                        ),
                    ));
                }
                v as u64
            }
        };
        Ok(Settings {
            total: t as u64,
            alpha,
            interval_ms: (secs * 1000.0).round() as u64,
            floor,
            spread,
        })
    }
}
