//! Keep-alive connections to backends: one stack of idle HTTP/1.1
//! connections per backend, sharded by dispatcher thread.

use std::sync::Mutex;
use std::time::Duration;

/// A connection to a backend (see [`crate::h1`]).
pub type Conn = crate::h1::BackendConn;

/// Shards of idle connections per backend (and of the access log's
/// buffers): one per dispatcher thread (up to this many), so that a thread
/// reuses the connections whose I/O its own event loop drives instead of
/// waking another thread's on every request.
pub(crate) const SHARDS: usize = 16;

thread_local! {
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks the calling thread as dispatcher thread `w` (its idle shard).
pub fn set_worker(w: usize) {
    WORKER.with(|c| c.set(w % SHARDS));
}

pub(crate) fn shard() -> usize {
    WORKER.with(|c| c.get())
}

/// Idle connections to one backend, most recently used last, sharded by
/// dispatcher thread.
#[derive(Debug, Default)]
pub struct Idle {
    shards: [Mutex<Vec<(Conn, u64)>>; SHARDS],
}

/// Pool settings.
#[derive(Debug, Clone)]
pub struct PoolOpts {
    /// Backend connect timeout.
    pub connect_timeout: Duration,
    /// Idle connections are closed after this long, in milliseconds.
    pub idle_ms: u64,
    /// Most idle connections kept per backend and dispatcher thread.
    pub max_idle: usize,
}

fn lock(m: &Mutex<Vec<(Conn, u64)>>) -> std::sync::MutexGuard<'_, Vec<(Conn, u64)>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Idle {
    /// The calling thread's most recently returned connection still open
    /// and not idle too long.
    pub fn pop(&self, now_ms: u64, idle_ms: u64) -> Option<Conn> {
        let mut g = lock(&self.shards[shard()]);
        while let Some((c, t)) = g.pop() {
            if now_ms.saturating_sub(t) <= idle_ms && c.is_usable() {
                return Some(c);
            }
        }
        None
    }

    /// Returns a connection whose last response is complete (to the calling
    /// thread's shard: the thread whose request it just served, whose event
    /// loop drives it).
    pub fn push(&self, c: Conn, now_ms: u64, max: usize) {
        let mut g = lock(&self.shards[shard()]);
        if g.len() < max {
            g.push((c, now_ms));
        }
    }

    /// Closes connections idle too long or closed by the backend.
    pub fn sweep(&self, now_ms: u64, idle_ms: u64) {
        for s in &self.shards {
            lock(s).retain(|(c, t)| now_ms.saturating_sub(*t) <= idle_ms && c.is_usable());
        }
    }

    /// Idle connections held.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Opens a connection to `addr`; `None` when it cannot be connected to
/// within the timeout.
pub async fn connect(addr: &str, timeout: Duration) -> Option<Conn> {
    Conn::connect(addr, timeout).await
}

/// [`connect`] from `source` when given.
pub async fn connect_from(
    addr: &str,
    timeout: Duration,
    source: Option<std::net::IpAddr>,
) -> Option<Conn> {
    Conn::connect_from(addr, timeout, source).await
}

/// Closes idle connections past the idle timeout, every second or so.
pub async fn sweep_task(backends: std::sync::Arc<crate::Backends>, idle_ms: u64) {
    let every = Duration::from_millis((idle_ms / 2).clamp(10, 1000));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = backends.clock().now_ms();
        let t = backends.load_full();
        for s in &t.slots {
            s.health.idle.sweep(now, idle_ms);
        }
    }
}
