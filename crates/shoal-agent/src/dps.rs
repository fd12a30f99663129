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
    cpus: Option<String>,
    // Field order: the burner's group must go before the host's.
    burner: Option<(Child, CpuGroup)>,
    group: CpuGroup,
}

impl EmulatedHost {
    /// Creates host `name` under `base` with `capacity` CPUs and a burner
    /// booking `background` CPUs of it (none if 0), pinned to `cpus` (a
    /// cpuset list). Pinning matters: weights divide a CPU only among tasks
    /// that queue on it, and a quota is no weight, so a host whose burner
    /// and unit run on two CPUs would split its quota evenly, not by share.
    pub fn create(
        version: Version,
        base: &str,
        name: &str,
        capacity: f64,
        background: f64,
        cpus: Option<&str>,
    ) -> anyhow::Result<Self> {
        let rel = format!("{base}/{name}");
        let mut group = CpuGroup::create(version, &rel)?;
        if let Some(c) = cpus {
            group.pin(&rel, c)?;
        }
        group.set_limit(Some(capacity))?;
        let cpus = cpus.map(str::to_string);
        let burner = if background > 0.0 {
            let brel = format!("{rel}/eatcpu");
            let mut g = CpuGroup::create(version, &brel)?;
            if let Some(c) = &cpus {
                g.pin(&brel, c)?;
            }
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
            cpus,
            burner,
            group,
        })
    }

    /// A unit's cgroup on this host.
    pub fn unit_group(&self, unit: &str) -> Result<CpuGroup, CgroupError> {
        let rel = format!("{}/{unit}", self.rel);
        let mut g = CpuGroup::create(self.group.version(), &rel)?;
        if let Some(c) = &self.cpus {
            g.pin(&rel, c)?;
        }
        Ok(g)
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

/// A unit of a job the agent runs and enforces.
struct Tracked {
    job: String,
    unit: usize,
    pid: u32,
    probe: UnitProbe,
    share: f64,
    period: Duration,
    next: Instant,
}

#[derive(serde::Deserialize)]
struct UnitFile {
    job: String,
    unit: usize,
}

fn app_pid(dir: &std::path::Path) -> Option<u32> {
    let s = std::fs::read_to_string(dir.join("pid")).ok()?;
    let pid: u32 = s.split_whitespace().next()?.parse().ok()?;
    std::path::Path::new(&format!("/proc/{pid}"))
        .exists()
        .then_some(pid)
}

/// The agent's DPS loop: finds the units of parallel jobs among its apps
/// (their `dps.json`), keeps each in its own CPU cgroup, reports what it
/// used and whom it waited for to the manager's banker every period T,
/// and writes the share it answers as the cgroup's weight at once. A node
/// without CPU cgroups runs its units unenforced and says so once.
pub async fn agent_loop(
    clients: tokio::sync::watch::Receiver<shoal_net::client::ApiClient>,
    node: String,
    apps_dir: PathBuf,
    capacity: f64,
) {
    use shoal_core::shares::spec::{ShareReply, UnitReportBody};
    let mut tracked: std::collections::BTreeMap<String, Tracked> = Default::default();
    let mut version: Option<Version> = None;
    let mut warned = false;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Ok(rd) = std::fs::read_dir(&apps_dir) else {
            continue;
        };
        let mut seen = Vec::new();
        for e in rd.flatten() {
            let dir = e.path();
            let Some(id) = dir.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
                continue;
            };
            let Ok(text) = std::fs::read_to_string(dir.join("dps.json")) else {
                continue;
            };
            let (Ok(f), Some(pid)) = (serde_json::from_str::<UnitFile>(&text), app_pid(&dir))
            else {
                continue;
            };
            seen.push(id.clone());
            if tracked.get(&id).is_some_and(|t| t.pid == pid) {
                continue;
            }
            let v = match version {
                Some(v) => v,
                None => match crate::platform::cgroup::detect() {
                    Ok(v) => {
                        version = Some(v);
                        v
                    }
                    Err(e) => {
                        if !warned {
                            eprintln!("DPS shares are not enforced on this node: {e}");
                            warned = true;
                        }
                        continue;
                    }
                },
            };
            let made = CpuGroup::create(v, &format!("shoal-dps/{node}/{id}"))
                .and_then(|g| g.add(pid).map(|_| g))
                .and_then(|g| UnitProbe::new(g, Some(dir.join("dps-status.json"))));
            match made {
                Ok(probe) => {
                    tracked.insert(
                        id,
                        Tracked {
                            job: f.job,
                            unit: f.unit,
                            pid,
                            probe,
                            share: 0.0,
                            period: Duration::from_secs(1),
                            next: Instant::now() + Duration::from_secs(1),
                        },
                    );
                }
                Err(e) => tracing::warn!("DPS unit {id}: {e}"),
            }
        }
        let had = !tracked.is_empty();
        // A unit whose process is gone gets one last report first: a unit
        // that finished and exited between two periods would otherwise
        // never tell the banker it finished.
        let gone: Vec<String> = tracked
            .keys()
            .filter(|id| !seen.contains(*id))
            .cloned()
            .collect();
        let booked: f64 = tracked
            .iter()
            .filter(|(id, _)| !gone.contains(*id))
            .map(|(_, t)| t.share)
            .sum();
        let now = Instant::now();
        let due: Vec<String> = tracked
            .iter()
            .filter(|(id, t)| t.next <= now || gone.contains(*id))
            .map(|(k, _)| k.clone())
            .collect();
        for id in due {
            let Some(t) = tracked.get_mut(&id) else {
                continue;
            };
            let s = match t.probe.sample() {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("DPS unit {id}: {e}");
                    continue;
                }
            };
            let body = UnitReportBody {
                unit: t.unit,
                node: node.clone(),
                used: s.used,
                upstream: s.upstream,
                host_free: capacity - booked,
                capacity,
                iterations: s.status.as_ref().map(|st| st.done_iterations),
                finished: s.status.as_ref().is_some_and(|st| st.finished),
            };
            let client = clients.borrow().clone();
            let path = format!("/v1/jobs/{}/report", t.job);
            match client.post::<_, ShareReply>(&path, &body).await {
                Ok(r) => {
                    if (r.share - t.share).abs() > 1e-9 {
                        if let Err(e) = t.probe.group().set_share(r.share) {
                            tracing::warn!("DPS unit {id}: {e}");
                        }
                        t.share = r.share;
                    }
                    t.period = Duration::from_millis(r.period_ms.max(100));
                }
                Err(e) => tracing::debug!("DPS report of {id}: {e}"),
            }
            t.next = Instant::now() + t.period;
        }
        for id in &gone {
            tracked.remove(id);
        }
        if had && tracked.is_empty() {
            // The node's last unit is gone: leave no cgroup behind.
            if let Some(v) = version {
                crate::platform::cgroup::remove_tree(v, &format!("shoal-dps/{node}"));
                crate::platform::cgroup::remove_if_empty(v, "shoal-dps");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_is_whoever_held_the_unit_up() {
        assert_eq!(upstream_from_blocked(&[], &[0.0, 5.0, 0.2]), vec![1]);
        assert_eq!(
            upstream_from_blocked(&[0.0, 5.0], &[0.0, 5.5]),
            Vec::<usize>::new()
        );
        assert_eq!(upstream_from_blocked(&[3.0, 0.0], &[9.0, 2.0]), vec![0, 1]);
    }
}
