//! DPS, dynamic proportional shares (thesis ch. 5): a parallel job's units
//! pass the CPU share they cannot use to the units that hold them up,
//! either directly (the fully-distributed exchange, eq. 5.1, §5.3.3) or
//! through a bank (eq. 5.2, §5.3.4), and a unit on a full host is moved to
//! the least-utilized host (§5.2.2).
//!
//! Shares are CPUs (1.0 is one CPU). A share is a guaranteed minimum on a
//! work-conserving proportional-share scheduler: a unit may use more than
//! its share when its host has idle cycles ([`proportional`]).
//!
//! The ledger [`Job`] holds one job's shares, its bank and the shares in
//! flight, and keeps the invariant that they always sum to the job's
//! maximum CPU W. It is handed reports (what each unit used over the last
//! period, whom it waited for, how much room its host has) and returns
//! [`Command`]s: shares to enforce, offers to deliver, bottlenecks to act
//! on. Time never enters: the caller reports every T and pays the bank out
//! every B. In the fully-distributed mode every decision uses only the
//! sender's own report and the receiver's own host, so the ledger is the
//! bookkeeping of messages that could equally run on each unit's node.

mod migrate;
pub mod spec;
#[cfg(test)]
mod tests;

pub use migrate::{FULL_UTILIZATION, MIGRATION_HOLD_PERIODS, Placement, choose_migration, settled};

use serde::{Deserialize, Serialize};

/// Below this a share is zero (float dust from repeated splitting).
pub const EPS: f64 = 1e-9;

/// No exchange takes a unit below this fraction of its initial share W/N.
/// Not in the thesis: on a host whose other tenants are always busy (its
/// `eatcpu`) a unit at share 0 gets no cycles, so it can never show the
/// use that would earn share back (measured live: a unit at weight 2 beside
/// a burner at 2000 stalled for minutes). A floor keeps it alive.
pub const MIN_SHARE: f64 = 0.1;

/// Excess below this fraction of a unit's share is measurement noise
/// ([`Job::has_excess`]).
pub const EXCESS_TOLERANCE: f64 = 0.1;

/// How upstream entries expire: a unit that did not block on a peer for
/// this many reports no longer counts it as upstream (the thesis leaves the
/// period open, §5.3.3).
pub const UPSTREAM_TTL_REPORTS: u64 = 3;

/// How a job's units exchange share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// No exchange: every unit keeps W/N (the baseline).
    Static,
    /// Eq. 5.1: a unit sends its excess to its upstream units directly.
    Distributed,
    /// Eq. 5.2: excess goes to a bank that pays shortages every B.
    Bank,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "static" => Ok(Mode::Static),
            "distributed" => Ok(Mode::Distributed),
            "bank" => Ok(Mode::Bank),
            other => Err(format!(
                "unknown exchange mode {other:?}; use static, distributed or bank"
            )),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Static => "static",
            Mode::Distributed => "distributed",
            Mode::Bank => "bank",
        })
    }
}

/// Excess share, e = max(w − u, 0) (§5.3.2).
pub fn excess(share: f64, used: f64) -> f64 {
    (share - used).max(0.0)
}

/// Shortage, f = min(u − w, r): what a unit using more than its share asks
/// for, limited by its host's remaining share r (§5.3.4).
pub fn shortage(share: f64, used: f64, host_free: f64) -> f64 {
    (used - share).max(0.0).min(host_free.max(0.0))
}

/// The withheld fraction wh = 1/(P+1): a unit keeps as much as it sends to
/// each upstream, since it never asks for share back (§5.3.3).
pub fn withhold(upstreams: usize) -> f64 {
    1.0 / (upstreams as f64 + 1.0)
}

/// Eq. 5.1: what a unit with excess `e` sends to each of `p` upstream
/// units, withholding the fraction `wh`: s = e (1 − wh) / P.
pub fn transfer(e: f64, p: usize, wh: f64) -> f64 {
    if p == 0 {
        return 0.0;
    }
    e * (1.0 - wh.clamp(0.0, 1.0)) / p as f64
}

/// Eq. 5.2 as the thesis's worked example requires: a unit short `f` of a
/// total shortage `total_short`, from a bank holding `balance`, receives
/// s = min(f, f E / F).
///
/// ERRATUM: the thesis prints s = max(f, f E / F), but its own example (a
/// bank of 0.3, a total shortage of 0.6, a unit short 0.17 receives 0.085)
/// is the min; the max would pay out more than the bank holds.
pub fn bank_payout(f: f64, balance: f64, total_short: f64) -> f64 {
    if total_short <= EPS || f <= 0.0 {
        return 0.0;
    }
    f.min(f * balance.max(0.0) / total_short)
}

/// A work-conserving proportional-share scheduler (BVT, Xen's credit
/// scheduler, cgroup cpu.weight): `capacity` CPUs split among units in
/// proportion to their weights, a unit never getting more than it demands
/// (its `demand` in CPUs, 1.0 for a busy single-threaded unit) and what it
/// leaves going to the others in proportion again.
pub fn proportional(capacity: f64, units: &[(f64, f64)]) -> Vec<f64> {
    let mut got = vec![0.0; units.len()];
    let mut open: Vec<usize> = (0..units.len())
        .filter(|&i| units[i].1 > EPS && units[i].0 > 0.0)
        .collect();
    let mut left = capacity.max(0.0);
    while !open.is_empty() && left > EPS {
        let weight: f64 = open.iter().map(|&i| units[i].0).sum();
        let mut capped = Vec::new();
        for &i in &open {
            let offer = left * units[i].0 / weight;
            if units[i].1 - got[i] <= offer + EPS {
                capped.push(i);
            }
        }
        if capped.is_empty() {
            for &i in &open {
                got[i] += left * units[i].0 / weight;
            }
            break;
        }
        for &i in &capped {
            left -= units[i].1 - got[i];
            got[i] = units[i].1;
        }
        open.retain(|i| !capped.contains(i));
    }
    got
}

/// What a unit's node reports every period T.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnitReport {
    /// CPU used over the period, u = t / T, in CPUs.
    pub used: f64,
    /// The units it waited for in the period (their message unblocked it).
    pub upstream: Vec<usize>,
    /// The host's remaining share r: its capacity less every booking on
    /// it (background, other jobs, this unit's own share).
    pub host_free: f64,
    /// The most this unit's share may be: min(1, C) for a single-threaded
    /// unit on a host of capacity C.
    pub cap: f64,
}

/// A share on its way from one unit to another (fully-distributed mode):
/// held apart until the receiver accepts or refuses it, so the sender's
/// share is deducted only after a successful transfer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Offer {
    /// Its number within the job.
    pub id: u64,
    /// The sender.
    pub from: usize,
    /// The receiver.
    pub to: usize,
    /// The amount, in CPUs.
    pub amount: f64,
}

/// What the caller should do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Enforce this share for the unit (cgroup weight on its host).
    SetShare {
        /// The unit.
        unit: usize,
        /// Its share, CPUs.
        share: f64,
    },
    /// Deliver an offer to its receiver, then call [`Job::deliver`] with
    /// the receiver's host room.
    Offer(Offer),
    /// The unit's host is full: it could not take share it needs. The
    /// cluster manager should consider a migration ([`choose_migration`]).
    Bottleneck {
        /// The unit.
        unit: usize,
    },
}

/// One job's shares: the ledger of the exchange.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    mode: Mode,
    total: f64,
    shares: Vec<f64>,
    bank: f64,
    in_flight: Vec<Offer>,
    next_offer: u64,
    /// Per unit, per peer: the report number in which it last waited on it.
    upstream_seen: Vec<Vec<Option<u64>>>,
    reports: Vec<u64>,
    last_excess: Vec<f64>,
    /// Per unit, the share it withheld at its last transfer.
    withheld: Vec<f64>,
    /// Shortages asked of the bank since the last payout.
    requests: Vec<f64>,
    /// Per unit, the cap and host room of its last report.
    cap: Vec<f64>,
    host_free: Vec<f64>,
}

/// Bad job parameters.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JobError {
    /// No units.
    #[error("a job needs at least one unit (units = {0}); set units to 1 or more")]
    NoUnits(usize),
    /// W not a positive number.
    #[error("max_cpu must be a positive number of CPUs (got {0}); e.g. max_cpu = 2.5")]
    BadTotal(f64),
}

impl Job {
    /// A job of `units` units with maximum CPU `total` (W), each unit
    /// starting at W/N.
    pub fn new(units: usize, total: f64, mode: Mode) -> Result<Self, JobError> {
        if units == 0 {
            return Err(JobError::NoUnits(units));
        }
        if !(total.is_finite() && total > 0.0) {
            return Err(JobError::BadTotal(total));
        }
        let w = total / units as f64;
        Ok(Self {
            mode,
            total,
            shares: vec![w; units],
            bank: 0.0,
            in_flight: Vec::new(),
            next_offer: 0,
            upstream_seen: vec![vec![None; units]; units],
            reports: vec![0; units],
            last_excess: vec![0.0; units],
            withheld: vec![0.0; units],
            requests: vec![0.0; units],
            cap: vec![f64::INFINITY; units],
            host_free: vec![0.0; units],
        })
    }

    /// The exchange mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Number of units.
    pub fn units(&self) -> usize {
        self.shares.len()
    }

    /// W, the job's maximum CPU.
    pub fn total(&self) -> f64 {
        self.total
    }

    /// Each unit's share in the ledger (in-flight offers excluded).
    pub fn shares(&self) -> &[f64] {
        &self.shares
    }

    /// The share to enforce for `unit`: its ledger share plus the offers it
    /// has sent that are not yet accepted (deducted only on success).
    pub fn enforced(&self, unit: usize) -> f64 {
        self.shares[unit]
            + self
                .in_flight
                .iter()
                .filter(|o| o.from == unit)
                .map(|o| o.amount)
                .sum::<f64>()
    }

    /// The bank's balance.
    pub fn bank(&self) -> f64 {
        self.bank
    }

    /// Offers sent but not yet accepted or refused.
    pub fn in_flight(&self) -> &[Offer] {
        &self.in_flight
    }

    /// Σ shares + bank + in flight: always W (up to float rounding).
    pub fn accounted(&self) -> f64 {
        self.shares.iter().sum::<f64>()
            + self.bank
            + self.in_flight.iter().map(|o| o.amount).sum::<f64>()
    }

    /// The units `unit` currently counts as upstream (waited on within the
    /// last [`UPSTREAM_TTL_REPORTS`] reports).
    pub fn upstream(&self, unit: usize) -> Vec<usize> {
        let now = self.reports[unit];
        self.upstream_seen[unit]
            .iter()
            .enumerate()
            .filter(|(p, s)| {
                *p != unit && s.is_some_and(|s| now.saturating_sub(s) < UPSTREAM_TTL_REPORTS)
            })
            .map(|(p, _)| p)
            .collect()
    }

    /// Whether a unit counts as having excess, so that it receives no
    /// share (eq. 5.1 sends only to upstreams without excess). What it
    /// withheld at its last transfer is kept on purpose (it never asks for
    /// share back) and does not count, nor does measurement noise below
    /// [`EXCESS_TOLERANCE`] of its share: otherwise a unit that once gave
    /// would never receive, and excess could not travel down a chain.
    pub fn has_excess(&self, unit: usize) -> bool {
        self.last_excess[unit] > self.withheld[unit] + EXCESS_TOLERANCE * self.shares[unit] + EPS
    }

    /// A unit's report for the last period T. Out-of-range units and peers
    /// are ignored (a report names nothing the job does not have).
    pub fn report(&mut self, unit: usize, r: &UnitReport) -> Vec<Command> {
        let mut out = Vec::new();
        if unit >= self.units() {
            return out;
        }
        self.reports[unit] += 1;
        let n = self.reports[unit];
        for &p in &r.upstream {
            if p < self.units() && p != unit {
                self.upstream_seen[unit][p] = Some(n);
            }
        }
        let used = if r.used.is_finite() {
            r.used.max(0.0)
        } else {
            0.0
        };
        self.cap[unit] = if r.cap.is_finite() {
            r.cap.max(0.0)
        } else {
            f64::INFINITY
        };
        self.host_free[unit] = if r.host_free.is_finite() {
            r.host_free
        } else {
            0.0
        };
        let w = self.shares[unit];
        // What it can give never takes it below the floor (see MIN_SHARE).
        let floor = MIN_SHARE * self.total / self.units() as f64;
        let e = excess(w, used).min((w - floor).max(0.0));
        self.last_excess[unit] = e;
        match self.mode {
            Mode::Static => {}
            Mode::Distributed => {
                if e > EPS {
                    // Eq. 5.1 to the upstream units that have no excess.
                    let targets: Vec<usize> = self
                        .upstream(unit)
                        .into_iter()
                        .filter(|&p| !self.has_excess(p))
                        .collect();
                    let wh = withhold(targets.len());
                    let s = transfer(e, targets.len(), wh);
                    if s > EPS {
                        self.withheld[unit] = e * wh;
                        for to in targets {
                            self.shares[unit] -= s;
                            let o = Offer {
                                id: self.next_offer,
                                from: unit,
                                to,
                                amount: s,
                            };
                            self.next_offer += 1;
                            self.in_flight.push(o.clone());
                            out.push(Command::Offer(o));
                        }
                    }
                } else {
                    self.withheld[unit] = 0.0;
                }
                if e <= EPS && self.host_free[unit] <= EPS {
                    // No excess on a fully booked host: it could not take
                    // share if offered; the manager should look at it.
                    out.push(Command::Bottleneck { unit });
                }
            }
            Mode::Bank => {
                self.requests[unit] = 0.0;
                if e > EPS {
                    // Deposits are deducted at once.
                    self.shares[unit] -= e;
                    self.bank += e;
                    out.push(Command::SetShare {
                        unit,
                        share: self.shares[unit],
                    });
                } else {
                    // No excess: ask for the shortage if the host has room;
                    // a fully booked host is the manager's to resolve.
                    let room = self.host_free[unit].min(self.cap[unit] - w);
                    if room <= EPS {
                        out.push(Command::Bottleneck { unit });
                    } else if used > w + EPS {
                        self.requests[unit] = shortage(w, used, room);
                    }
                }
            }
        }
        out
    }

    /// The receiver of offer `id` takes what its host has room for
    /// (`host_free`, the receiver host's remaining share); the rest goes back
    /// to the sender, and a refusal marks the receiver's host a bottleneck.
    /// An unknown offer (already resolved) changes nothing.
    pub fn deliver(&mut self, id: u64, host_free: f64) -> Vec<Command> {
        let Some(i) = self.in_flight.iter().position(|o| o.id == id) else {
            return Vec::new();
        };
        let o = self.in_flight.remove(i);
        let room = host_free
            .max(0.0)
            .min(self.cap[o.to] - self.shares[o.to])
            .max(0.0);
        let taken = o.amount.min(room);
        self.shares[o.to] += taken;
        self.shares[o.from] += o.amount - taken;
        let mut out = vec![
            Command::SetShare {
                unit: o.to,
                share: self.enforced(o.to),
            },
            Command::SetShare {
                unit: o.from,
                share: self.enforced(o.from),
            },
        ];
        if taken + EPS < o.amount {
            out.push(Command::Bottleneck { unit: o.to });
        }
        out
    }

    /// The bank's payout, every B: each unit short f_i receives
    /// min(f_i, f_i E / F) (eq. 5.2, corrected); when E > F what is left is
    /// spread over all units in proportion to their shares, as far as their
    /// caps and hosts allow (the rest stays in the bank).
    pub fn payout(&mut self) -> Vec<Command> {
        if self.mode != Mode::Bank {
            return Vec::new();
        }
        let before = self.shares.clone();
        let total_short: f64 = self.requests.iter().sum();
        let balance = self.bank;
        for u in 0..self.units() {
            let s = bank_payout(self.requests[u], balance, total_short).min(self.bank);
            self.shares[u] += s;
            self.bank -= s;
            self.host_free[u] -= s;
            self.requests[u] = 0.0;
        }
        if self.bank > EPS {
            let weight: f64 = self.shares.iter().sum();
            let n = self.units() as f64;
            let pot = self.bank;
            for u in 0..self.units() {
                let part = if weight > EPS {
                    pot * self.shares[u] / weight
                } else {
                    pot / n
                };
                let room = (self.cap[u] - self.shares[u])
                    .min(self.host_free[u])
                    .max(0.0);
                let s = part.min(room).min(self.bank);
                self.shares[u] += s;
                self.bank -= s;
                self.host_free[u] -= s;
            }
        }
        if self.bank < EPS {
            // Float dust: the bank ends the cycle empty.
            self.shares[0] += self.bank;
            self.bank = 0.0;
        }
        (0..self.units())
            .filter(|&u| (self.shares[u] - before[u]).abs() > EPS)
            .map(|u| Command::SetShare {
                unit: u,
                share: self.enforced(u),
            })
            .collect()
    }

    /// One period of the whole job when its messages are delivered at once
    /// (the simulator, the bench, the manager's banker): every unit's report
    /// (units without one keep their share), then every offer delivered to
    /// its receiver, then, if `pay`, the bank's payout. `host_of[u]` is unit
    /// u's host and `host_free[h]` host h's remaining share before the step,
    /// which the step keeps current as shares move (so several jobs on one
    /// host can be stepped in turn). Returns the shares to enforce (the last
    /// one per unit) and the bottlenecks.
    pub fn step(
        &mut self,
        reports: &[(usize, UnitReport)],
        host_of: &[usize],
        host_free: &mut [f64],
        pay: bool,
    ) -> Vec<Command> {
        let n = self.units();
        let hosts = host_free.len();
        let host = |u: usize| host_of.get(u).copied().filter(|&h| h < hosts);
        let before: Vec<f64> = (0..n).map(|u| self.enforced(u)).collect();
        let mut out = Vec::new();
        let track = |job: &Job, host_free: &mut [f64], base: &mut Vec<f64>| {
            for (u, b) in base.iter_mut().enumerate().take(n) {
                let now = job.enforced(u);
                if let Some(h) = host(u) {
                    host_free[h] -= now - *b;
                }
                *b = now;
            }
        };
        let mut base = before.clone();
        for (u, r) in reports {
            let mut r = r.clone();
            if let Some(h) = host(*u) {
                r.host_free = host_free[h];
            }
            out.extend(self.report(*u, &r));
            track(self, host_free, &mut base);
        }
        let offers: Vec<Offer> = self.in_flight.clone();
        for o in offers {
            let free = host(o.to).map_or(0.0, |h| host_free[h]);
            out.extend(self.deliver(o.id, free));
            track(self, host_free, &mut base);
        }
        if pay {
            for u in 0..n {
                if let Some(h) = host(u) {
                    self.host_free[u] = host_free[h];
                }
            }
            out.extend(self.payout());
            track(self, host_free, &mut base);
        }
        let mut result: Vec<Command> = out
            .into_iter()
            .filter(|c| matches!(c, Command::Bottleneck { .. }))
            .collect();
        result.dedup();
        for (u, was) in before.iter().enumerate() {
            let now = self.enforced(u);
            if (now - was).abs() > EPS {
                result.push(Command::SetShare {
                    unit: u,
                    share: now,
                });
            }
        }
        result
    }

    /// A unit moved to another host (migration): its upstream memory and
    /// pending request no longer apply there.
    pub fn moved(&mut self, unit: usize) {
        if unit < self.units() {
            self.requests[unit] = 0.0;
            self.last_excess[unit] = 0.0;
        }
    }
}

/// The first cycle from which every later vector of `history` stays within
/// `tol` (relative) of the last one: how many exchange cycles the shares
/// took to converge (Fig. 5.8). None for an empty history.
pub fn converged_after(history: &[Vec<f64>], tol: f64) -> Option<usize> {
    let last = history.last()?;
    let close = |v: &Vec<f64>| {
        v.iter()
            .zip(last)
            .all(|(a, b)| (a - b).abs() <= tol * b.abs().max(EPS))
    };
    let mut first = history.len() - 1;
    while first > 0 && close(&history[first - 1]) {
        first -= 1;
    }
    Some(first)
}
