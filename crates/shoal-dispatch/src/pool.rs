//! Keep-alive connections to backends: one stack of idle HTTP/1.1
//! connections per backend, on hyper's low-level client.
//!
//! Replaces hyper-util's pooled client on the proxy path, which keyed a
//! global pool by authority and handed every request to a per-connection
//! task over a channel and back; here a request goes straight to the
//! connection's `SendRequest`, and a connection that never sent a request
//! hands it back for another one.

use crate::proxy::ReqBody;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use std::sync::Mutex;
use std::time::Duration;

/// A ready-to-use connection to a backend.
pub type Conn = SendRequest<ReqBody>;

/// Shards of idle connections per backend: one per dispatcher thread (up
/// to this many), so that a thread reuses the connections whose I/O its own
/// event loop drives instead of waking another thread's on every request.
const SHARDS: usize = 16;

thread_local! {
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks the calling thread as dispatcher thread `w` (its idle shard).
pub fn set_worker(w: usize) {
    WORKER.with(|c| c.set(w % SHARDS));
}

fn shard() -> usize {
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
            if !c.is_closed() && now_ms.saturating_sub(t) <= idle_ms {
                return Some(c);
            }
        }
        None
    }

    /// Returns a connection whose last response is complete (to the calling
    /// thread's shard: the thread whose request it just served, whose event
    /// loop drives it).
    pub fn push(&self, c: Conn, now_ms: u64, max: usize) {
        if c.is_closed() {
            return;
        }
        let mut g = lock(&self.shards[shard()]);
        if g.len() < max {
            g.push((c, now_ms));
        }
    }

    /// Closes connections idle too long or closed by the backend.
    pub fn sweep(&self, now_ms: u64, idle_ms: u64) {
        for s in &self.shards {
            lock(s).retain(|(c, t)| !c.is_closed() && now_ms.saturating_sub(*t) <= idle_ms);
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
    let s = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    let _ = s.set_nodelay(true);
    let (tx, conn) = http1::Builder::new()
        .handshake(TokioIo::new(s))
        .await
        .ok()?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("backend connection: {e}");
        }
    });
    Some(tx)
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
