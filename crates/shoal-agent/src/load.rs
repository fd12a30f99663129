//! The node's load L(t): CPU, network, disk and memory, from /proc.

use shoal_net::wire::LoadSample;
use std::time::Instant;

#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    cpu_busy: u64,
    cpu_total: u64,
    net_rx: u64,
    net_tx: u64,
    disk_read: u64,
    disk_write: u64,
}

/// Samples L(t) as rates over the interval between two calls.
pub struct LoadSampler {
    prev: Option<(Instant, Counters)>,
    /// CPU ticks of this process's tree at the previous sample.
    prev_own: Option<u64>,
    cpus: u32,
}

/// CPU ticks (user + system) used so far by the process tree rooted at
/// this process: the agent and every app it started (apps are its
/// children, in process groups of their own, and their children).
fn own_tree_ticks() -> Option<u64> {
    let me = std::process::id() as i32;
    let mut stats: Vec<procfs::process::Stat> = procfs::process::all_processes()
        .ok()?
        .flatten()
        .filter_map(|p| p.stat().ok())
        .collect();
    let mut tree = std::collections::HashSet::from([me]);
    // Parents are listed before most children; repeat until nothing joins.
    loop {
        let before = tree.len();
        for s in &stats {
            if tree.contains(&s.ppid) {
                tree.insert(s.pid);
            }
        }
        if tree.len() == before {
            break;
        }
    }
    stats.retain(|s| tree.contains(&s.pid));
    Some(stats.iter().map(|s| s.utime + s.stime).sum())
}

impl Default for LoadSampler {
    fn default() -> Self {
        Self::new()
    }
}

fn read_counters() -> anyhow::Result<Counters> {
    use procfs::{Current, CurrentSI};
    let ks = procfs::KernelStats::current()?;
    let t = &ks.total;
    let idle = t.idle + t.iowait.unwrap_or(0);
    let total = t.user
        + t.nice
        + t.system
        + t.idle
        + t.iowait.unwrap_or(0)
        + t.irq.unwrap_or(0)
        + t.softirq.unwrap_or(0)
        + t.steal.unwrap_or(0);
    let mut c = Counters {
        cpu_busy: total.saturating_sub(idle),
        cpu_total: total,
        ..Default::default()
    };
    // Only non-loopback interfaces carry the node's real traffic; a node
    // with nothing but loopback (a test on one machine) counts loopback.
    let dev = procfs::net::InterfaceDeviceStatus::current()?;
    let has_real = dev.0.keys().any(|n| n != "lo");
    for (name, d) in dev.0.iter() {
        if has_real && name == "lo" {
            continue;
        }
        c.net_rx += d.recv_bytes;
        c.net_tx += d.sent_bytes;
    }
    if let Ok(disks) = procfs::diskstats() {
        for d in disks {
            // Whole devices only (partitions would count twice); skip
            // loop and ram devices.
            if d.name.starts_with("loop") || d.name.starts_with("ram") {
                continue;
            }
            let whole = !d.name.chars().last().is_some_and(|ch| ch.is_ascii_digit())
                || d.name.starts_with("nvme") && !d.name.contains('p');
            if whole {
                c.disk_read += d.sectors_read * 512;
                c.disk_write += d.sectors_written * 512;
            }
        }
    }
    Ok(c)
}

impl LoadSampler {
    /// A sampler; the first sample has zero rates.
    pub fn new() -> Self {
        Self {
            prev: None,
            prev_own: None,
            cpus: std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1),
        }
    }

    /// Takes a sample now.
    pub fn sample(&mut self) -> anyhow::Result<LoadSample> {
        use procfs::Current;
        let now = Instant::now();
        let c = read_counters()?;
        let own = own_tree_ticks();
        let mem = procfs::Meminfo::current()?;
        let mut s = LoadSample {
            at_ms: shoal_net::wire::unix_ms(),
            cpus: self.cpus,
            mem_total_bytes: mem.mem_total,
            mem_used_bytes: mem
                .mem_total
                .saturating_sub(mem.mem_available.unwrap_or(mem.mem_free)),
            ..Default::default()
        };
        if let Some((t0, p)) = self.prev {
            let dt = now.duration_since(t0).as_secs_f64().max(1e-3);
            let d = |a: u64, b: u64| a.saturating_sub(b) as f64;
            let total = d(c.cpu_total, p.cpu_total);
            s.cpu = if total > 0.0 {
                (d(c.cpu_busy, p.cpu_busy) / total).clamp(0.0, 1.0)
            } else {
                0.0
            };
            s.net_rx_bps = d(c.net_rx, p.net_rx) / dt;
            s.net_tx_bps = d(c.net_tx, p.net_tx) / dt;
            s.disk_read_bps = d(c.disk_read, p.disk_read) / dt;
            s.disk_write_bps = d(c.disk_write, p.disk_write) / dt;
            if let (Some(o), Some(po)) = (own, self.prev_own) {
                let hz = procfs::ticks_per_second() as f64;
                s.own_cpu = Some((d(o, po) / hz / dt / self.cpus as f64).clamp(0.0, 1.0));
            }
        }
        self.prev = Some((now, c));
        self.prev_own = own;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_cpu_counts_this_process_tree() {
        let mut s = LoadSampler::new();
        s.sample().unwrap();
        // Burn about half a second of CPU in this process.
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < std::time::Duration::from_millis(500) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let second = s.sample().unwrap();
        let own = second.own_cpu.expect("own CPU measured");
        // At least a fifth of one core's worth, in fractions of all cores.
        assert!(own * s.cpus as f64 > 0.2, "{second:?}");
        assert!(own <= 1.0);
    }

    #[test]
    fn samples_are_sane_and_see_traffic() {
        let mut s = LoadSampler::new();
        let first = s.sample().unwrap();
        assert!(first.mem_total_bytes > 0);
        assert!(first.mem_used_bytes <= first.mem_total_bytes);
        // Push 4 MB through loopback so the network counters move.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let h = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut buf = vec![0u8; 1 << 16];
            let mut n = 0;
            while n < 4 << 20 {
                let r = std::io::Read::read(&mut c, &mut buf).unwrap();
                if r == 0 {
                    break;
                }
                n += r;
            }
        });
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        std::io::Write::write_all(&mut c, &vec![1u8; 4 << 20]).unwrap();
        drop(c);
        h.join().unwrap();
        let second = s.sample().unwrap();
        assert!((0.0..=1.0).contains(&second.cpu));
        // Only meaningful where loopback is the sole interface or other
        // traffic exists; the loopback transfer is counted when no real
        // interface exists, and real interfaces never go backwards.
        assert!(second.net_rx_bps >= 0.0 && second.net_tx_bps >= 0.0);
        let has_real = procfs::net::dev_status().unwrap().keys().any(|n| n != "lo");
        if !has_real {
            assert!(second.net_rx_bps > 1e5, "{second:?}");
        }
    }
}
