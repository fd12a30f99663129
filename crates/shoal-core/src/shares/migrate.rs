//! Migration (§5.2.2): on a bottleneck host, move the least-utilized unit
//! (the cheapest to move and the easiest to fit) to the least-utilized
//! host, where it can obtain more share. Best fit was rejected by the
//! thesis; so is moving onto a host that is no less utilized, or one the
//! unit would not fit on. A host is a bottleneck for migration only when
//! it is also fully utilized ([`FULL_UTILIZATION`]): a fully booked host
//! with idle cycles holds nobody up.

/// A host this busy (used over capacity) is fully utilized.
pub const FULL_UTILIZATION: f64 = 0.9;

/// A unit that moved stays where it is for this many report periods: it
/// must report from its new host (and the hosts' use settle) before the
/// rule may move it again, or one full host could send it back and forth.
pub const MIGRATION_HOLD_PERIODS: f64 = 5.0;

/// Whether a unit that last moved at `moved_at` (seconds on the caller's
/// clock; `f64::NEG_INFINITY` if never) may move at `now`, with report
/// period `period` seconds. Callers drop the units that may not from the
/// candidates they give [`choose_migration`].
pub fn settled(moved_at: f64, now: f64, period: f64) -> bool {
    now - moved_at >= MIGRATION_HOLD_PERIODS * period
}

/// One unit where it runs now.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement<U, H> {
    /// The unit (job and index, or any key the caller uses).
    pub unit: U,
    /// Its host.
    pub host: H,
    /// Its measured utilization over the last period, CPUs.
    pub used: f64,
}

/// Which unit to move off `bottleneck` and where: None when the host holds
/// no unit or no other host is less utilized. `hosts` lists every host
/// with its utilization (used over capacity, 0..=1); `forbidden(unit,
/// host)` excludes a host for a unit (one unit of a job per host unless
/// the job allows more). `used` and the utilizations are in the same unit
/// (fractions of a host's capacity when hosts differ). Ties go to the
/// first listed.
pub fn choose_migration<U: Clone + PartialEq, H: Clone + PartialEq>(
    bottleneck: &H,
    units: &[Placement<U, H>],
    hosts: &[(H, f64)],
    forbidden: impl Fn(&U, &H) -> bool,
) -> Option<(U, H)> {
    let here = hosts
        .iter()
        .find(|(h, _)| h == bottleneck)
        .map(|(_, u)| *u)
        .unwrap_or(1.0);
    if here < FULL_UTILIZATION {
        return None;
    }
    let mut candidates: Vec<&Placement<U, H>> =
        units.iter().filter(|p| &p.host == bottleneck).collect();
    // Stable: equal utilizations keep the caller's order.
    candidates.sort_by(|a, b| a.used.total_cmp(&b.used));
    for c in candidates {
        let target = hosts
            .iter()
            .filter(|(h, u)| h != bottleneck && !forbidden(&c.unit, h) && u + c.used <= 1.0)
            .min_by(|a, b| a.1.total_cmp(&b.1));
        if let Some((h, u)) = target
            && *u < here
        {
            return Some((c.unit.clone(), h.clone()));
        }
    }
    None
}
