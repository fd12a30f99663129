//! A load generator: keep-alive clients fetching a large file through a
//! dispatcher, each reading its body slowly so requests stay in flight.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

/// The file's size.
pub const FILE_BYTES: usize = 512 * 1024;
/// Client threads; `level` says how many of them fetch.
pub const CLIENTS: usize = 10;

pub struct Load {
    pub level: Arc<AtomicUsize>,
    pub stop: Arc<AtomicBool>,
    pub ok: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
    pub failures: Arc<std::sync::Mutex<Vec<String>>>,
    pub threads: Vec<std::thread::JoinHandle<()>>,
}

/// One keep-alive GET of `path`; reads the body slowly (a client on a
/// modest link), so each request stays in flight for a while.
pub fn fetch(s: &mut Option<BufReader<TcpStream>>, addr: &str, path: &str) -> Result<(), String> {
    if s.is_none() {
        let t = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
        t.set_read_timeout(Some(Duration::from_secs(10))).ok();
        *s = Some(BufReader::new(t));
    }
    let r = s.as_mut().unwrap();
    write!(r.get_mut(), "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut line = String::new();
    r.read_line(&mut line)
        .map_err(|e| format!("status line: {e}"))?;
    let code: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line {line:?}"))?;
    let mut len = None;
    loop {
        let mut h = String::new();
        r.read_line(&mut h).map_err(|e| format!("header: {e}"))?;
        if h == "\r\n" || h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            len = v.trim().parse::<usize>().ok();
        }
    }
    let len = len.ok_or("no content-length")?;
    let mut left = len;
    let mut buf = vec![0u8; 32 * 1024];
    while left > 0 {
        let n = r
            .read(&mut buf[..left.min(32 * 1024)])
            .map_err(|e| format!("body: {e}"))?;
        if n == 0 {
            return Err(format!("body cut after {} of {len} bytes", len - left));
        }
        left -= n;
        std::thread::sleep(Duration::from_millis(4));
    }
    if code != 200 || len != FILE_BYTES {
        return Err(format!("status {code}, {len} bytes"));
    }
    Ok(())
}

impl Load {
    pub fn start(addr: String, path: &'static str) -> Load {
        let level = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let threads = (0..CLIENTS)
            .map(|i| {
                let (level, stop, ok, failed, failures, addr) = (
                    level.clone(),
                    stop.clone(),
                    ok.clone(),
                    failed.clone(),
                    failures.clone(),
                    addr.clone(),
                );
                std::thread::spawn(move || {
                    let mut conn = None;
                    while !stop.load(Relaxed) {
                        if i >= level.load(Relaxed) {
                            // Idle clients hang up rather than outlive the
                            // dispatcher's keep-alive limit.
                            conn = None;
                            std::thread::sleep(Duration::from_millis(20));
                            continue;
                        }
                        match fetch(&mut conn, &addr, path) {
                            Ok(()) => {
                                ok.fetch_add(1, Relaxed);
                            }
                            Err(e) => {
                                failed.fetch_add(1, Relaxed);
                                failures.lock().unwrap_or_else(|p| p.into_inner()).push(e);
                                conn = None;
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            level,
            stop,
            ok,
            failed,
            failures,
            threads,
        }
    }
}

impl Load {
    /// Stops the clients and returns (ok, failed, the first failures).
    pub fn finish(self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let f = self
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        (self.ok.load(Relaxed), self.failed.load(Relaxed), f)
    }

    /// Failures so far.
    pub fn failures(&self) -> Vec<String> {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
