//! CPU cgroups through their files, v2 (the unified tree with the cpu
//! controller) or v1 (the cpu, cpuacct and cpuset hierarchies mounted
//! apart, as on this project's test machines): which one is detected at
//! start. A share is a weight (work-conserving, a guaranteed minimum among
//! siblings), a limit is a CFS quota (a hard cap), usage is the group's
//! CPU time.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The quota period of every limit, 100 ms (the kernel's default).
pub const PERIOD_US: u64 = 100_000;

const ROOT: &str = "/sys/fs/cgroup";

/// Which cgroup interface the host offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Version {
    /// The unified hierarchy: cpu.weight, cpu.max, cpu.stat.
    V2,
    /// Separate controllers: cpu.shares, cpu.cfs_quota_us, cpuacct.usage.
    V1,
}

/// A cgroup operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// Neither interface is there.
    #[error(
        "no CPU cgroup controller: mount cgroup v2 on /sys/fs/cgroup (with the cpu controller) or the v1 cpu and cpuacct hierarchies under /sys/fs/cgroup/cpu and /sys/fs/cgroup/cpuacct"
    )]
    NoController,
    /// A file could not be read or written.
    #[error(
        "{op} {path}: {source} (cgroups need root; run as root or give the agent a delegated subtree)"
    )]
    Io {
        /// What was attempted.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A file held something unexpected.
    #[error("{path}: unexpected content {content:?}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What it held.
        content: String,
    },
}

type Result<T> = std::result::Result<T, CgroupError>;

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError {
    let path = path.to_path_buf();
    move |source| CgroupError::Io { op, path, source }
}

fn write(path: &Path, v: &str) -> Result<()> {
    std::fs::write(path, v).map_err(io("writing", path))
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(io("reading", path))
}

/// Detects the interface: v2 when /sys/fs/cgroup is the unified tree with
/// the cpu controller, v1 when the cpu and cpuacct hierarchies are mounted.
pub fn detect() -> Result<Version> {
    let root = Path::new(ROOT);
    if let Ok(c) = std::fs::read_to_string(root.join("cgroup.controllers"))
        && c.split_whitespace().any(|c| c == "cpu")
    {
        return Ok(Version::V2);
    }
    if root.join("cpu/cpu.shares").exists() && root.join("cpuacct/cpuacct.usage").exists() {
        return Ok(Version::V1);
    }
    Err(CgroupError::NoController)
}

/// The weight of a share: 10000 per CPU (so 0.05 CPU is 500), as v1
/// cpu.shares (at least 2) or v2 cpu.weight (1 to 10000).
pub fn weight_of(version: Version, share: f64) -> u64 {
    let w = (share.max(0.0) * 10_000.0).round() as u64;
    match version {
        Version::V2 => w.clamp(1, 10_000),
        Version::V1 => w.clamp(2, 262_144),
    }
}

/// One CPU cgroup (its directory in each hierarchy it spans). Dropping it
/// moves any process left in it to the root and removes the directories.
#[derive(Debug)]
pub struct CpuGroup {
    version: Version,
    /// The cpu directory (v2: the only one).
    cpu: PathBuf,
    /// v1: the cpuacct directory.
    acct: Option<PathBuf>,
    /// v1: the cpuset directory, when pinned.
    cpuset: Option<PathBuf>,
    /// Created by us (removed on drop) rather than found.
    owned: bool,
}

impl CpuGroup {
    /// Creates (or takes over) the cgroup at `rel`, a path under the root
    /// such as `shoal-dps-1234/host1/unit0`, parents included.
    pub fn create(version: Version, rel: &str) -> Result<Self> {
        let root = Path::new(ROOT);
        match version {
            Version::V2 => {
                // Every ancestor must hand the cpu controller down.
                let mut dir = root.to_path_buf();
                for part in Path::new(rel).components() {
                    let _ = std::fs::write(dir.join("cgroup.subtree_control"), "+cpu");
                    dir.push(part);
                    std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
                }
                Ok(Self {
                    version,
                    cpu: dir,
                    acct: None,
                    cpuset: None,
                    owned: true,
                })
            }
            Version::V1 => {
                let cpu = root.join("cpu").join(rel);
                let acct = root.join("cpuacct").join(rel);
                std::fs::create_dir_all(&cpu).map_err(io("creating", &cpu))?;
                std::fs::create_dir_all(&acct).map_err(io("creating", &acct))?;
                Ok(Self {
                    version,
                    cpu,
                    acct: Some(acct),
                    cpuset: None,
                    owned: true,
                })
            }
        }
    }

    /// The interface in use.
    pub fn version(&self) -> Version {
        self.version
    }

    /// Its directory in the cpu hierarchy.
    pub fn path(&self) -> &Path {
        &self.cpu
    }

    /// Pins the group to `cpus` (a cpuset list such as `0` or `0-1`).
    pub fn pin(&mut self, rel: &str, cpus: &str) -> Result<()> {
        match self.version {
            Version::V2 => {
                let _ = std::fs::write(
                    self.cpu
                        .parent()
                        .unwrap_or(Path::new(ROOT))
                        .join("cgroup.subtree_control"),
                    "+cpuset",
                );
                write(&self.cpu.join("cpuset.cpus"), cpus)
            }
            Version::V1 => {
                let root = Path::new(ROOT).join("cpuset");
                let mems = read(&root.join("cpuset.mems"))?;
                let mut dir = root.clone();
                // v1 cpuset needs cpus and mems set on every level first.
                for part in Path::new(rel).components() {
                    dir.push(part);
                    std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
                    let all = read(&dir.parent().unwrap_or(&root).join("cpuset.cpus"))?;
                    if read(&dir.join("cpuset.cpus"))?.trim().is_empty() {
                        write(&dir.join("cpuset.cpus"), all.trim())?;
                    }
                    if read(&dir.join("cpuset.mems"))?.trim().is_empty() {
                        write(&dir.join("cpuset.mems"), mems.trim())?;
                    }
                }
                write(&dir.join("cpuset.cpus"), cpus)?;
                self.cpuset = Some(dir);
                Ok(())
            }
        }
    }

    /// Sets the share: a weight among the group's siblings (a guaranteed
    /// minimum, work-conserving beyond it).
    pub fn set_share(&self, share: f64) -> Result<()> {
        self.set_weight(weight_of(self.version, share))
    }

    /// Sets the raw weight (v1 cpu.shares 2..262144, v2 cpu.weight
    /// 1..10000; clamped into range).
    pub fn set_weight(&self, weight: u64) -> Result<()> {
        let w = match self.version {
            Version::V2 => weight.clamp(1, 10_000),
            Version::V1 => weight.clamp(2, 262_144),
        }
        .to_string();
        match self.version {
            Version::V2 => write(&self.cpu.join("cpu.weight"), &w),
            Version::V1 => write(&self.cpu.join("cpu.shares"), &w),
        }
    }

    /// Caps the group at `cpus` CPUs (None: no cap).
    pub fn set_limit(&self, cpus: Option<f64>) -> Result<()> {
        let quota = cpus.map(|c| ((c * PERIOD_US as f64).round() as u64).max(1000));
        match self.version {
            Version::V2 => {
                let v = match quota {
                    Some(q) => format!("{q} {PERIOD_US}"),
                    None => format!("max {PERIOD_US}"),
                };
                write(&self.cpu.join("cpu.max"), &v)
            }
            Version::V1 => {
                write(&self.cpu.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
                let v = quota.map_or("-1".to_string(), |q| q.to_string());
                write(&self.cpu.join("cpu.cfs_quota_us"), &v)
            }
        }
    }

    /// Moves a process (all its threads) into the group.
    pub fn add(&self, pid: u32) -> Result<()> {
        let p = pid.to_string();
        write(&self.cpu.join("cgroup.procs"), &p)?;
        if let Some(a) = &self.acct {
            write(&a.join("cgroup.procs"), &p)?;
        }
        if let Some(s) = &self.cpuset {
            write(&s.join("cgroup.procs"), &p)?;
        }
        Ok(())
    }

    /// CPU time used by the group and its descendants since creation.
    pub fn usage(&self) -> Result<Duration> {
        match self.version {
            Version::V2 => {
                let p = self.cpu.join("cpu.stat");
                let s = read(&p)?;
                let v = s
                    .lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .ok_or(CgroupError::Parse {
                        path: p,
                        content: s.clone(),
                    })?;
                Ok(Duration::from_micros(v))
            }
            Version::V1 => {
                let p = self
                    .acct
                    .as_ref()
                    .unwrap_or(&self.cpu)
                    .join("cpuacct.usage");
                let s = read(&p)?;
                let v = s.trim().parse::<u64>().map_err(|_| CgroupError::Parse {
                    path: p,
                    content: s.clone(),
                })?;
                Ok(Duration::from_nanos(v))
            }
        }
    }

    /// The processes in the group.
    pub fn pids(&self) -> Vec<u32> {
        std::fs::read_to_string(self.cpu.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    fn dirs(&self) -> Vec<(PathBuf, PathBuf)> {
        let root = Path::new(ROOT);
        let mut d = vec![(self.cpu.clone(), self.top(&self.cpu))];
        if let Some(a) = &self.acct {
            d.push((a.clone(), root.join("cpuacct")));
        }
        if let Some(s) = &self.cpuset {
            d.push((s.clone(), root.join("cpuset")));
        }
        d
    }

    fn top(&self, _p: &Path) -> PathBuf {
        match self.version {
            Version::V2 => PathBuf::from(ROOT),
            Version::V1 => Path::new(ROOT).join("cpu"),
        }
    }
}

impl Drop for CpuGroup {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        for (dir, top) in self.dirs() {
            // Anything still inside goes back to the root, so rmdir works.
            if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                for p in procs.lines() {
                    let _ = std::fs::write(top.join("cgroup.procs"), p);
                }
            }
            for _ in 0..50 {
                if std::fs::remove_dir(&dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Removes the directory tree `rel` (children first) in every hierarchy:
/// for a parent whose children were [`CpuGroup`]s already dropped.
pub fn remove_tree(version: Version, rel: &str) {
    let root = Path::new(ROOT);
    let tops: Vec<PathBuf> = match version {
        Version::V2 => vec![root.to_path_buf()],
        Version::V1 => ["cpu", "cpuacct", "cpuset"]
            .iter()
            .map(|h| root.join(h))
            .collect(),
    };
    fn rm(dir: &Path, top: &Path) {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    rm(&e.path(), top);
                }
            }
        }
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            for p in procs.lines() {
                let _ = std::fs::write(top.join("cgroup.procs"), p);
            }
        }
        let _ = std::fs::remove_dir(dir);
    }
    for top in tops {
        let d = top.join(rel);
        if d.exists() {
            rm(&d, &top);
        }
    }
}

/// Removes the directory `rel` in every hierarchy if it is empty (a parent
/// other users may still hold children in).
pub fn remove_if_empty(version: Version, rel: &str) {
    let root = Path::new(ROOT);
    let tops: Vec<PathBuf> = match version {
        Version::V2 => vec![root.to_path_buf()],
        Version::V1 => ["cpu", "cpuacct", "cpuset"]
            .iter()
            .map(|h| root.join(h))
            .collect(),
    };
    for top in tops {
        let _ = std::fs::remove_dir(top.join(rel));
    }
}
