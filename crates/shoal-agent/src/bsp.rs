//! `shoal bsp`: the built-in BSP benchmark, after the thesis's `patterns`
//! (§5.5.1): each of N units, per iteration, receives 1 KB from the units
//! it depends on (their previous iteration), computes, and sends 1 KB on.
//! Unit i (from 1) does 1/i of the work, so the chain has a critical path.
//!
//! In the chain each unit exchanges with both neighbours, so every unit
//! waits, transitively, on the slowest. One process per unit (so each has
//! its own cgroup), TCP on the given
//! addresses. Every iteration the unit rewrites its status file: the last
//! finished iteration (its checkpoint: `--resume` starts after it) and the
//! time it spent blocked on each peer, from which its agent infers the
//! unit's upstream units (the thesis instruments the guest kernel instead;
//! here the program reports whom it waited for).

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Message size, as the thesis's.
pub const MESSAGE: usize = 1024;

/// Which units a unit depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Pattern {
    /// A linear chain: unit i exchanges with i−1 and i+1 (each superstep
    /// waits on both neighbours, as BSP does; a one-way pipeline would hide
    /// a slow tail unit from every unit before it).
    Chain,
    /// Every unit receives from and sends to every other (a barrier).
    AllToAll,
}

impl Pattern {
    /// The units whose messages unit `i` of `n` waits for.
    pub fn inputs(self, i: usize, n: usize) -> Vec<usize> {
        match self {
            Pattern::Chain => (i.saturating_sub(1)..(i + 2).min(n))
                .filter(|&p| p != i)
                .collect(),
            Pattern::AllToAll => (0..n).filter(|&p| p != i).collect(),
        }
    }
    /// The units unit `i` of `n` sends to (the same as it receives from).
    pub fn outputs(self, i: usize, n: usize) -> Vec<usize> {
        self.inputs(i, n)
    }
}

/// `shoal bsp` arguments.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Example (a 2-unit chain, one shell each):\n  shoal bsp --index 0 --peers 127.0.0.1:7701,127.0.0.1:7702 --iterations 20 --work 40\n  shoal bsp --index 1 --peers 127.0.0.1:7701,127.0.0.1:7702 --iterations 20 --work 40"
)]
pub struct BspArgs {
    /// This unit's index, from 0 (it does 1/(index+1) of the work).
    #[arg(long)]
    pub index: usize,
    /// Every unit's listen address, in index order (N = their number).
    #[arg(long, value_delimiter = ',', required = true)]
    pub peers: Vec<SocketAddr>,
    /// Which units depend on which.
    #[arg(long, value_enum, default_value = "chain")]
    pub pattern: Pattern,
    /// Iterations to run.
    #[arg(long, default_value_t = 10)]
    pub iterations: u64,
    /// Work of unit 0 per iteration, in millions of multiply-adds.
    #[arg(long, default_value_t = 100.0)]
    pub work: f64,
    /// Status and checkpoint file, rewritten after every iteration.
    #[arg(long)]
    pub status: Option<PathBuf>,
    /// Start after the iteration the status file records.
    #[arg(long, requires = "status")]
    pub resume: bool,
    /// Start after this many iterations, or after the checkpoint if that is
    /// further on: a unit moved to another node, where it has no status
    /// file, resumes where its last report left it.
    #[arg(long, default_value_t = 0)]
    pub start_at: u64,
    /// Print the final report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What a unit writes after every iteration (and reads back to resume).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// This unit.
    pub index: usize,
    /// Iterations finished (the checkpoint).
    pub done_iterations: u64,
    /// Iterations in the run.
    pub iterations: u64,
    /// Milliseconds spent blocked on each peer, cumulative.
    pub blocked_ms: Vec<f64>,
    /// Milliseconds spent computing, cumulative.
    pub compute_ms: f64,
    /// Milliseconds since this process started.
    pub elapsed_ms: f64,
    /// The last iteration's wall time, milliseconds.
    pub last_iteration_ms: f64,
    /// The run is over.
    pub finished: bool,
}

impl Status {
    /// Reads a status file.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let s = std::fs::read_to_string(path)
            .with_context(|| format!("reading the status file {}", path.display()))?;
        serde_json::from_str(&s).with_context(|| format!("parsing {}", path.display()))
    }

    fn write(&self, path: &Path) -> anyhow::Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(self)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
    }
}

/// The compute kernel: `mops` million dependent multiply-adds.
pub fn compute(mops: f64) -> f64 {
    let n = (mops * 1e6) as u64;
    let mut x = 1.000_000_1f64;
    for _ in 0..n {
        x = std::hint::black_box(x * 0.999_999_9 + 1e-7);
    }
    x
}

/// In the hello, asks the peer to send its last message again.
const ASK_RESEND: u32 = 1 << 31;

fn connect(addr: SocketAddr, me: usize, ask: bool) -> anyhow::Result<TcpStream> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(mut s) => {
                s.set_nodelay(true)?;
                let hello = me as u32 | if ask { ASK_RESEND } else { 0 };
                s.write_all(&hello.to_le_bytes())?;
                return Ok(s);
            }
            Err(e) if Instant::now() > deadline => {
                bail!("cannot reach peer {addr} for 30 s: {e}; start every unit of the job")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Marks a (re)connection in the listener's channel (no iteration is this
/// high).
const HELLO: u64 = u64::MAX;

/// Sends iteration `k`'s message on `conn`, connecting first if needed; a
/// send that fails reconnects once (the peer restarted).
fn send(
    conn: &mut Option<TcpStream>,
    to: SocketAddr,
    me: usize,
    k: u64,
    ask: bool,
) -> anyhow::Result<()> {
    let mut msg = [0u8; MESSAGE];
    msg[..8].copy_from_slice(&k.to_le_bytes());
    for _ in 0..2 {
        if conn.is_none() {
            *conn = Some(connect(to, me, ask)?);
        }
        if let Some(c) = conn.as_mut()
            && c.write_all(&msg).is_ok()
        {
            return Ok(());
        }
        *conn = None;
    }
    Ok(())
}

/// Runs one unit; returns its final status.
pub fn run_unit(a: &BspArgs) -> anyhow::Result<Status> {
    let n = a.peers.len();
    if a.index >= n {
        bail!(
            "--index {} is not below the number of --peers ({n}); index units from 0",
            a.index
        );
    }
    if !(a.work.is_finite() && a.work >= 0.0) {
        bail!(
            "--work must be a number of millions of multiply-adds >= 0, got {}",
            a.work
        );
    }
    let start = Instant::now();
    let mut st = Status {
        index: a.index,
        iterations: a.iterations,
        blocked_ms: vec![0.0; n],
        ..Status::default()
    };
    if a.resume
        && let Some(p) = &a.status
        && p.exists()
    {
        let old = Status::read(p)?;
        st.done_iterations = old.done_iterations;
        if old.blocked_ms.len() == n {
            st.blocked_ms = old.blocked_ms;
        }
        st.compute_ms = old.compute_ms;
    }
    st.done_iterations = st.done_iterations.max(a.start_at).min(a.iterations);
    let inputs = a.pattern.inputs(a.index, n);
    let outputs = a.pattern.outputs(a.index, n);
    let listener = TcpListener::bind(a.peers[a.index])
        .with_context(|| format!("listening on {}", a.peers[a.index]))?;
    // Highest iteration received from each peer (TCP keeps order; a peer
    // restarted from its checkpoint may resend, which changes nothing).
    let (tx, rx) = mpsc::channel::<(usize, u64)>();
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut s = s;
                let mut hello = [0u8; 4];
                if s.read_exact(&mut hello).is_err() {
                    return;
                }
                let hello = u32::from_le_bytes(hello);
                let from = (hello & !ASK_RESEND) as usize;
                // A resumed peer may have lost what was sent to its
                // previous process: the main loop sends it the last
                // message again.
                if hello & ASK_RESEND != 0 && tx.send((from, HELLO)).is_err() {
                    return;
                }
                let mut buf = [0u8; MESSAGE];
                while s.read_exact(&mut buf).is_ok() {
                    let it = u64::from_le_bytes(buf[..8].try_into().unwrap_or([0; 8]));
                    if tx.send((from, it)).is_err() {
                        return;
                    }
                }
            });
        }
    });
    let mut out: Vec<(usize, Option<TcpStream>)> = outputs.iter().map(|&p| (p, None)).collect();
    let mut got: Vec<Option<u64>> = vec![None; n];
    let work = a.work / (a.index as f64 + 1.0);
    // A unit that resumes (restarted in place or moved to another node)
    // first sends its last finished iteration again: its neighbours may
    // have lost it with the previous process, and connecting tells them to
    // send theirs again too.
    let mut last_sent = st.done_iterations.checked_sub(1);
    if let Some(k) = last_sent {
        for (p, conn) in out.iter_mut() {
            send(conn, a.peers[*p], a.index, k, true)?;
        }
    }
    for k in st.done_iterations..a.iterations {
        let t0 = Instant::now();
        // Wait for every input's iteration k−1 (none before the first).
        if k > 0 {
            let mut mark = Instant::now();
            while inputs.iter().any(|&p| got[p].is_none_or(|g| g + 1 < k)) {
                let (from, it) = rx
                    .recv_timeout(Duration::from_secs(120))
                    .context("no message from an upstream unit for 120 s")?;
                if from >= n {
                    continue;
                }
                if it == HELLO {
                    if let (Some(last), Some((_, conn))) =
                        (last_sent, out.iter_mut().find(|(p, _)| *p == from))
                    {
                        *conn = None;
                        send(conn, a.peers[from], a.index, last, false)?;
                    }
                    continue;
                }
                got[from] = Some(got[from].map_or(it, |g| g.max(it)));
                let now = Instant::now();
                st.blocked_ms[from] += (now - mark).as_secs_f64() * 1e3;
                mark = now;
            }
        }
        let c0 = Instant::now();
        std::hint::black_box(compute(work));
        st.compute_ms += c0.elapsed().as_secs_f64() * 1e3;
        for (p, conn) in out.iter_mut() {
            send(conn, a.peers[*p], a.index, k, false)?;
        }
        last_sent = Some(k);
        st.done_iterations = k + 1;
        st.last_iteration_ms = t0.elapsed().as_secs_f64() * 1e3;
        st.elapsed_ms = start.elapsed().as_secs_f64() * 1e3;
        if let Some(p) = &a.status {
            st.write(p)?;
        }
    }
    st.finished = true;
    st.elapsed_ms = start.elapsed().as_secs_f64() * 1e3;
    if let Some(p) = &a.status {
        st.write(p)?;
    }
    // Let the last messages drain before the sockets close.
    for (_, c) in out.iter_mut() {
        if let Some(c) = c.take() {
            let _ = c.shutdown(std::net::Shutdown::Write);
        }
    }
    Ok(st)
}

/// `shoal bsp`.
pub fn run(a: BspArgs) -> anyhow::Result<()> {
    let st = run_unit(&a)?;
    if a.json {
        println!("{}", serde_json::to_string(&st)?);
    } else {
        println!(
            "unit {}: {} iterations in {:.2} s ({:.1} ms each), computing {:.2} s, blocked {:.2} s",
            st.index,
            st.done_iterations,
            st.elapsed_ms / 1e3,
            st.elapsed_ms / st.done_iterations.max(1) as f64,
            st.compute_ms / 1e3,
            st.blocked_ms.iter().sum::<f64>() / 1e3
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` loopback addresses nobody listens on (bound, then released).
    fn free_addrs(n: usize) -> Vec<SocketAddr> {
        (0..n)
            .map(|_| {
                let l = TcpListener::bind("127.0.0.1:0").unwrap();
                l.local_addr().unwrap()
            })
            .collect()
    }

    #[test]
    fn patterns() {
        assert_eq!(Pattern::Chain.inputs(0, 4), vec![1]);
        assert_eq!(Pattern::Chain.inputs(2, 4), vec![1, 3]);
        assert_eq!(Pattern::Chain.outputs(3, 4), vec![2]);
        assert_eq!(Pattern::Chain.inputs(0, 1), Vec::<usize>::new());
        assert_eq!(Pattern::AllToAll.inputs(1, 3), vec![0, 2]);
    }

    #[test]
    fn a_two_unit_chain_runs_and_the_follower_blocks_on_its_upstream() {
        let ports = free_addrs(2);
        let dir = tempfile::tempdir().unwrap();
        let args = |i: usize| BspArgs {
            index: i,
            peers: ports.clone(),
            pattern: Pattern::Chain,
            iterations: 5,
            work: 2.0,
            status: Some(dir.path().join(format!("u{i}.json"))),
            resume: false,
            start_at: 0,
            json: false,
        };
        let a1 = args(1);
        let h = std::thread::spawn(move || run_unit(&a1).unwrap());
        let s0 = run_unit(&args(0)).unwrap();
        let s1 = h.join().unwrap();
        assert_eq!((s0.done_iterations, s1.done_iterations), (5, 5));
        // Unit 1 does half the work: it waits on unit 0, not the reverse.
        assert!(s1.blocked_ms[0] > s0.blocked_ms[1], "{s0:?} {s1:?}");
        let back = Status::read(&dir.path().join("u1.json")).unwrap();
        assert!(back.finished && back.done_iterations == 5);
    }

    /// A unit moved to another node resumes from its last report while its
    /// neighbour resumes from a checkpoint one iteration further on: each
    /// sends its last message again, so neither waits for one the other's
    /// previous process already sent.
    #[test]
    fn units_resumed_one_iteration_apart_finish() {
        let ports = free_addrs(2);
        let dir = tempfile::tempdir().unwrap();
        let u0 = dir.path().join("u0.json");
        Status {
            index: 0,
            done_iterations: 4,
            iterations: 8,
            blocked_ms: vec![0.0; 2],
            ..Status::default()
        }
        .write(&u0)
        .unwrap();
        let args = |i: usize, status: PathBuf, start_at: u64| BspArgs {
            index: i,
            peers: ports.clone(),
            pattern: Pattern::Chain,
            iterations: 8,
            work: 1.0,
            status: Some(status),
            resume: true,
            start_at,
            json: false,
        };
        // Unit 1 has no status file where it now runs.
        let a1 = args(1, dir.path().join("u1.json"), 3);
        let h = std::thread::spawn(move || run_unit(&a1).unwrap());
        let s0 = run_unit(&args(0, u0, 0)).unwrap();
        let s1 = h.join().unwrap();
        assert_eq!((s0.done_iterations, s1.done_iterations), (8, 8));
    }
}
