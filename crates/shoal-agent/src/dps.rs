//! DPS enforcement on a node (thesis ch. 5): each unit of a parallel job
//! runs in its own CPU cgroup whose weight is the unit's share; every
//! period T the agent measures what the unit used (the cgroup's CPU time)
//! and whom it waited for (the unit's status file, written by `shoal bsp`
//! or by a program that declares its upstream), and hands that to the
//! ledger in shoal-core. A "host" here can also be an emulated one: a
//! parent cgroup capped at C CPUs, so that several hosts share one machine.

use crate::bsp::Status;
use crate::platform::cgroup::{CgroupError, CpuGroup, Version};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A peer counts as upstream when the unit waited on it at least this long
/// in a period (shorter waits are the 1 KB message's own latency).
pub const UPSTREAM_MIN_WAIT_MS: f64 = 1.0;

/// The peers a unit waited on between two cumulative blocked-time vectors.
pub fn upstream_from_blocked(before: &[f64], now: &[f64]) -> Vec<usize> {
    now.iter()
        .enumerate()
        .filter(|(p, b)| **b - before.get(*p).copied().unwrap_or(0.0) >= UPSTREAM_MIN_WAIT_MS)
        .map(|(p, _)| p)
        .collect()
}

/// What one unit did over a period.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// CPU used, in CPUs (u = t / T).
    pub used: f64,
    /// Units it waited on.
    pub upstream: Vec<usize>,
    /// Its last status, if it writes one.
    pub status: Option<Status>,
}

/// One unit's cgroup and what was last measured of it.
#[derive(Debug)]
pub struct UnitProbe {
    group: CpuGroup,
    status: Option<PathBuf>,
    last_usage: Duration,
    last_blocked: Vec<f64>,
    last_at: Instant,
}

impl UnitProbe {
    /// Probes the unit in `group`, whose program writes `status` (if any).
    pub fn new(group: CpuGroup, status: Option<PathBuf>) -> Result<Self, CgroupError> {
        let last_usage = group.usage()?;
        Ok(Self {
            group,
            status,
            last_usage,
            last_blocked: Vec::new(),
            last_at: Instant::now(),
        })
    }

    /// The unit's cgroup.
    pub fn group(&self) -> &CpuGroup {
        &self.group
    }

    /// Measures since the last sample.
    pub fn sample(&mut self) -> Result<Sample, CgroupError> {
        let now = Instant::now();
        let usage = self.group.usage()?;
        let dt = (now - self.last_at).as_secs_f64().max(1e-6);
        let used = usage.saturating_sub(self.last_usage).as_secs_f64() / dt;
        self.last_usage = usage;
        self.last_at = now;
        let status = self.status.as_ref().and_then(|p| Status::read(p).ok());
        let upstream = match &status {
            Some(s) => {
                let up = upstream_from_blocked(&self.last_blocked, &s.blocked_ms);
                self.last_blocked = s.blocked_ms.clone();
                up
            }
            None => Vec::new(),
        };
        Ok(Sample {
            used,
            upstream,
            status,
        })
    }

    /// Moves the unit's processes into `to` (a live migration between
    /// emulated hosts) and probes it there; usage restarts from the new
    /// group's counter.
    pub fn move_to(&mut self, to: CpuGroup) -> Result<(), CgroupError> {
        for pid in self.group.pids() {
            to.add(pid)?;
        }
        self.last_usage = to.usage()?;
        self.last_at = Instant::now();
        self.group = to;
        Ok(())
    }
}

/// An emulated host: a parent cgroup capped at `capacity` CPUs, with an
/// optional background burner (the thesis's `eatcpu`) booking part of it.
#[derive(Debug)]
pub struct EmulatedHost {
    /// Its name (the cgroup's last component).
    pub name: String,
    /// The cgroup path under the root.
    pub rel: String,
    /// C, in CPUs.
    pub capacity: f64,
    /// The share the burner books, CPUs (0 without one).
    pub background: f64,
    // Field order: the burner's group must go before the host's.
    burner: Option<(Child, CpuGroup)>,
    group: CpuGroup,
}

impl EmulatedHost {
    /// Creates host `name` under `base` with `capacity` CPUs and a burner
    /// booking `background` CPUs of it (none if 0).
    pub fn create(
        version: Version,
        base: &str,
        name: &str,
        capacity: f64,
        background: f64,
    ) -> anyhow::Result<Self> {
        let rel = format!("{base}/{name}");
        let group = CpuGroup::create(version, &rel)?;
        group.set_limit(Some(capacity))?;
        let burner = if background > 0.0 {
            let g = CpuGroup::create(version, &format!("{rel}/eatcpu"))?;
            g.set_share(background)?;
            let child = Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| anyhow::anyhow!("cannot start the CPU burner (sh): {e}"))?;
            g.add(child.id())?;
            Some((child, g))
        } else {
            None
        };
        Ok(Self {
            name: name.to_string(),
            rel,
            capacity,
            background,
            burner,
            group,
        })
    }

    /// A unit's cgroup on this host.
    pub fn unit_group(&self, unit: &str) -> Result<CpuGroup, CgroupError> {
        CpuGroup::create(self.group.version(), &format!("{}/{unit}", self.rel))
    }

    /// CPU time of everything on the host.
    pub fn usage(&self) -> Result<Duration, CgroupError> {
        self.group.usage()
    }
}

impl Drop for EmulatedHost {
    fn drop(&mut self) {
        if let Some((c, _)) = &mut self.burner {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_is_whoever_held_the_unit_up() {
        assert_eq!(upstream_from_blocked(&[], &[0.0, 5.0, 0.2]), vec![1]);
        assert_eq!(upstream_from_blocked(&[0.0, 5.0], &[0.0, 5.5]), Vec::<usize>::new());
        assert_eq!(upstream_from_blocked(&[3.0, 0.0], &[9.0, 2.0]), vec![0, 1]);
    }
}
