//! The access log: one JSON line per request (HAProxy's `option httplog`).
//!
//! Each event loop appends its lines to a buffer of its own (no lock shared
//! between loops, no wake-up per line); a writer thread writes all of them
//! out every 100 ms, as nginx's `access_log ... buffer= flush=`, so no
//! event loop waits on the disk. If the disk falls so far behind that a
//! buffer passes 8 MiB, lines are dropped and counted
//! (`shoal_dispatch_access_log_dropped_total`) rather than slow the
//! traffic. SIGHUP reopens the file, for logrotate.

use crate::metrics::Metrics;
use crate::pool;
use anyhow::Context as _;
use serde::Serialize;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// How often the writer writes the buffers out.
const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// Largest buffer of one event loop; lines beyond are dropped.
const MAX_BUFFER: usize = 8 << 20;

/// A handle on the log.
#[derive(Debug, Clone)]
pub struct AccessLog {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// One per event loop (by its pool shard).
    buffers: [Mutex<Vec<u8>>; pool::SHARDS],
    out: Mutex<Out>,
    reopen: AtomicBool,
    /// Counts the lines dropped.
    metrics: Arc<Metrics>,
}

/// One request, as logged.
#[derive(Debug, Serialize)]
pub struct Entry<'a> {
    /// When the request's head was received (RFC 3339, UTC).
    pub ts: String,
    pub client: SocketAddr,
    pub method: &'a str,
    pub uri: &'a str,
    pub status: u16,
    /// The backend that answered, or failed to; none when the dispatcher
    /// answered by itself before choosing one (400, 503 with no backend).
    pub backend: Option<&'a str>,
    /// Response body bytes sent to the client.
    pub bytes: u64,
    /// From the request's head to the response's last byte (or its end).
    pub ms: f64,
    /// `ok`; `local` (the dispatcher's own answer: an error page);
    /// `backend_reset` (cut mid-response by the backend); `client_gone`
    /// (the client left before the response ended).
    pub outcome: &'static str,
}

impl AccessLog {
    /// Opens `path` for appending (`-`: standard error, which is not
    /// reopened) and starts the writer thread.
    pub fn open(path: &Path, metrics: Arc<Metrics>) -> anyhow::Result<AccessLog> {
        let inner = Arc::new(Inner {
            buffers: Default::default(),
            out: Mutex::new(Out::open(path)?),
            reopen: AtomicBool::new(false),
            metrics,
        });
        let writer = inner.clone();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(FLUSH_EVERY);
                    writer.write_out();
                }
            })
            .context("starting the access-log writer")?;
        Ok(AccessLog { inner })
    }

    /// Appends one line to the calling event loop's buffer; never blocks
    /// on the disk.
    pub fn record(&self, e: &Entry<'_>) {
        let mut b = self.inner.buffers[pool::shard()]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if b.len() >= MAX_BUFFER {
            drop(b);
            self.inner.metrics.access_log_dropped.fetch_add(1, Relaxed);
            return;
        }
        if serde_json::to_writer(&mut *b, e).is_ok() {
            b.push(b'\n');
        }
    }

    /// Reopens the file before the next write (after logrotate moved it).
    pub fn reopen(&self) {
        self.inner.reopen.store(true, Relaxed);
    }

    /// Writes out every line recorded so far.
    pub fn flush(&self) {
        self.inner.write_out();
    }
}

impl Inner {
    fn write_out(&self) {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        if self.reopen.swap(false, Relaxed)
            && let Out::File { path, .. } = &*out
        {
            match Out::open(&path.clone()) {
                Ok(o) => *out = o,
                Err(e) => tracing::warn!("access log: {e:#}; keeps writing the old file"),
            }
        }
        let mut result = Ok(());
        for buf in &self.buffers {
            // Swap the buffer out under its lock, write it without.
            let mut full = std::mem::take(&mut *buf.lock().unwrap_or_else(|p| p.into_inner()));
            if full.is_empty() {
                continue;
            }
            if result.is_ok() {
                result = out.write_all(&full);
            }
            full.clear();
            // Hand the capacity back unless the loop already refilled it.
            let mut b = buf.lock().unwrap_or_else(|p| p.into_inner());
            if b.is_empty() && full.capacity() <= MAX_BUFFER {
                *b = full;
            }
        }
        match (result, out.failed()) {
            (Err(e), false) => {
                tracing::warn!("access log: {e}; lines are lost until writing works again");
                out.set_failed(true);
            }
            (Ok(()), true) => out.set_failed(false),
            _ => {}
        }
    }
}

/// The request's start as a wall-clock time, for `Entry::ts`.
pub fn timestamp(at: SystemTime) -> String {
    let t = time::OffsetDateTime::from(at);
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.format(&fmt).unwrap_or_default()
}

#[derive(Debug)]
enum Out {
    File {
        path: PathBuf,
        file: std::fs::File,
        failed: bool,
    },
    Stderr {
        failed: bool,
    },
}

impl Out {
    fn open(path: &Path) -> anyhow::Result<Out> {
        if path == Path::new("-") {
            return Ok(Out::Stderr { failed: false });
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| {
                format!(
                    "--access-log {}: cannot open it for appending; give a writable path, or - for standard error",
                    path.display()
                )
            })?;
        Ok(Out::File {
            path: path.to_path_buf(),
            file,
            failed: false,
        })
    }

    /// The buffers are the batching: writes go straight to the file.
    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Out::File { file, .. } => file.write_all(bytes),
            Out::Stderr { .. } => std::io::stderr().lock().write_all(bytes),
        }
    }

    fn failed(&self) -> bool {
        match self {
            Out::File { failed, .. } | Out::Stderr { failed } => *failed,
        }
    }

    fn set_failed(&mut self, to: bool) {
        match self {
            Out::File { failed, .. } | Out::Stderr { failed } => *failed = to,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_json_written_in_order_and_reopened() {
        let dir = std::env::temp_dir().join(format!("shoal-alog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("access.log");
        let metrics = Arc::new(Metrics::default());
        let log = AccessLog::open(&path, metrics.clone()).unwrap();
        let client: SocketAddr = "127.0.0.1:5555".parse().unwrap();
        let e = |i: u16| Entry {
            ts: timestamp(SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_234_549_123)),
            client,
            method: "GET",
            uri: "/a?b=\"c\"",
            status: 200 + i,
            backend: Some("127.0.0.1:8081"),
            bytes: 1024,
            ms: 0.25,
            outcome: "ok",
        };
        for i in 0..3 {
            log.record(&e(i));
        }
        log.flush();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0]["ts"], "2025-11-27T09:09:09.123Z");
        assert_eq!(lines[0]["uri"], "/a?b=\"c\"");
        assert_eq!(lines[2]["status"], 202);
        // logrotate moves the file; after SIGHUP's reopen, lines go to a
        // new file at the path.
        std::fs::rename(&path, dir.join("access.log.1")).unwrap();
        log.reopen();
        log.record(&e(9));
        log.flush();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert_eq!(metrics.access_log_dropped.load(Relaxed), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
