//! The two ends of a live audio stream, for `shoal bench stream` and the
//! icecast test: a source that feeds an icecast mount at a constant bit
//! rate with icecast's own source protocol (HTTP PUT with basic auth, as
//! icecast 2.4 takes it: no ezstream or ices2 configuration), and a
//! listener that reads a mount as a player does and records what its
//! audience would notice: start-up delay, stalls (its buffer ran dry) and
//! whether the server cut it off.

use base64::Engine;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Feeds `mount` at `addr` with `kbps` kbit/s of MPEG-audio-typed filler
/// (icecast relays an `audio/mpeg` stream's bytes without decoding them)
/// until `stop` turns true. Returns an error naming the cause if icecast
/// refuses the source (wrong password, mount taken).
pub async fn source(
    addr: SocketAddr,
    mount: &str,
    password: &str,
    kbps: f64,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<u64> {
    let mut s = TcpStream::connect(addr)
        .await
        .map_err(|e| anyhow::anyhow!("source: cannot reach icecast at {addr}: {e}"))?;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("source:{password}"));
    let head = format!(
        "PUT {mount} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Basic {auth}\r\n\
         Content-Type: audio/mpeg\r\nIce-Public: 0\r\nIce-Name: shoal\r\n\
         Expect: 100-continue\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await?;
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .map_err(|_| anyhow::anyhow!("source: icecast at {addr} did not answer the PUT"))??;
    let answer = String::from_utf8_lossy(&buf[..n]);
    let status = answer.lines().next().unwrap_or("").to_string();
    if !(status.contains(" 100") || status.contains(" 200")) {
        anyhow::bail!(
            "source: icecast at {addr} refused the source for {mount}: {status:?} (check the source password, and that no other source holds the mount)"
        );
    }
    // Paced in 100 ms chunks from a fixed start, so a late tick catches up.
    let per_sec = kbps * 1000.0 / 8.0;
    let chunk = vec![0x55u8; (per_sec / 10.0).ceil() as usize + 1];
    let t0 = tokio::time::Instant::now();
    let mut sent: u64 = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return Ok(sent),
        }
        let due = (t0.elapsed().as_secs_f64() * per_sec) as u64;
        while sent < due {
            let n = ((due - sent) as usize).min(chunk.len());
            s.write_all(&chunk[..n])
                .await
                .map_err(|e| anyhow::anyhow!("source: icecast at {addr} closed the source: {e}"))?;
            sent += n as u64;
        }
    }
}

/// A player's buffer: bytes arrive, it plays at the stream's rate once it
/// holds `prebuffer` seconds, and stalls when it runs dry until it holds
/// `rebuffer` seconds again. Times are seconds from any origin; pure, so
/// that its arithmetic is tested apart from sockets.
#[derive(Debug, Clone)]
pub struct Player {
    rate: f64,
    prebuffer: f64,
    rebuffer: f64,
    buffered: f64,
    playing: bool,
    last: f64,
    origin: f64,
    /// When playback first began (seconds after the origin).
    pub startup: Option<f64>,
    stall_since: Option<f64>,
    /// Seconds spent stalled after playback had begun.
    pub stalled: f64,
    /// How many times it stalled.
    pub stalls: u32,
}

impl Player {
    /// A player of a `rate` bytes/s stream, connecting at `now`.
    pub fn new(rate: f64, prebuffer_s: f64, rebuffer_s: f64, now: f64) -> Self {
        Self {
            rate,
            prebuffer: prebuffer_s * rate,
            rebuffer: rebuffer_s * rate,
            buffered: 0.0,
            playing: false,
            last: now,
            origin: now,
            startup: None,
            stall_since: None,
            stalled: 0.0,
            stalls: 0,
        }
    }

    /// Plays up to `now`.
    pub fn advance(&mut self, now: f64) {
        let dt = (now - self.last).max(0.0);
        if self.playing {
            let need = self.rate * dt;
            if need > self.buffered {
                self.stall_since = Some(self.last + self.buffered / self.rate);
                self.buffered = 0.0;
                self.playing = false;
                self.stalls += 1;
            } else {
                self.buffered -= need;
            }
        }
        self.last = now.max(self.last);
    }

    /// `n` bytes arrived at `now`.
    pub fn feed(&mut self, now: f64, n: usize) {
        self.advance(now);
        self.buffered += n as f64;
        let want = if self.startup.is_none() {
            self.prebuffer
        } else {
            self.rebuffer
        };
        if !self.playing && self.buffered >= want {
            self.playing = true;
            if self.startup.is_none() {
                self.startup = Some(now - self.origin);
            }
            if let Some(s) = self.stall_since.take() {
                self.stalled += now - s;
            }
        }
    }

    /// When a stall would have begun by `now` if nothing arrives (the
    /// buffer ran dry while playing), without changing the player.
    pub fn stalls_pending(&self, now: f64) -> Option<f64> {
        (self.playing && self.rate * (now - self.last) > self.buffered)
            .then(|| self.last + self.buffered / self.rate)
    }

    /// When the stall now running began, if one is.
    pub fn stalling_since(&self) -> Option<f64> {
        self.stall_since
    }

    /// Seconds of audio held.
    pub fn buffered_s(&self) -> f64 {
        self.buffered / self.rate
    }

    /// Ends at `now`: a stall still running counts up to now.
    pub fn finish(&mut self, now: f64) {
        self.advance(now);
        if let Some(s) = self.stall_since.take() {
            self.stalled += now - s;
        }
    }
}

/// How a listener's session ended.
#[derive(Debug, Clone, PartialEq)]
pub enum End {
    /// It left when the workload said so.
    Left,
    /// The server closed it or the connection failed (the reason).
    Cut(String),
}

/// What one listener saw.
#[derive(Debug, Clone)]
pub struct Listened {
    /// Seconds from the first connect to playback.
    pub startup: Option<f64>,
    /// Seconds stalled.
    pub stalled: f64,
    /// Stalls.
    pub stalls: u32,
    /// Bytes received.
    pub bytes: u64,
    /// Times it was moved to another server.
    pub moves: u32,
    /// How it ended.
    pub end: End,
    /// The server it was on when it ended.
    pub server: Option<SocketAddr>,
    /// When it first connected.
    pub connected: Instant,
    /// Every stall: when it began (seconds after `connected`), the server
    /// it was on, and seconds since that connection opened (a first
    /// connect or a move).
    pub stall_log: Vec<Stall>,
}

/// One stall of one listener.
#[derive(Debug, Clone)]
pub struct Stall {
    /// Seconds after the listener first connected.
    pub at: f64,
    /// The server it was reading from.
    pub server: SocketAddr,
    /// Seconds since the connection to that server opened.
    pub since_open: f64,
}

async fn open(addr: SocketAddr, mount: &str) -> Result<(TcpStream, Vec<u8>), String> {
    let mut s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .map_err(|_| format!("connect to {addr} timed out"))?
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    let req = format!("GET {mount} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: shoal-listener\r\n\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("{addr}: {e}"))?;
    let mut head = Vec::new();
    let mut b = [0u8; 1024];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b))
            .await
            .map_err(|_| format!("{addr} sent no answer in 10 s"))?
            .map_err(|e| format!("{addr}: {e}"))?;
        if n == 0 {
            return Err(format!("{addr} closed before answering"));
        }
        head.extend_from_slice(&b[..n]);
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            let status = String::from_utf8_lossy(&head[..i])
                .lines()
                .next()
                .unwrap_or("")
                .to_string();
            if !status.contains(" 200") {
                return Err(format!("{addr} answered {status:?}"));
            }
            return Ok((s, head[i + 4..].to_vec()));
        }
        if head.len() > 16 * 1024 {
            return Err(format!("{addr}: no end of headers"));
        }
    }
}

/// Running totals over many listeners, read while they play.
#[derive(Debug, Default)]
pub struct Tally {
    /// Stalls begun.
    pub stalls: std::sync::atomic::AtomicU64,
    /// Milliseconds of stall ended.
    pub stall_ms: std::sync::atomic::AtomicU64,
    /// Listeners cut off by the server or the network.
    pub cuts: std::sync::atomic::AtomicU64,
}

/// Listens to `mount` on the server `target` names until it turns `None`
/// (the listener leaves). When `target` names another server, the listener
/// moves: it opens the new connection first and drops the old one once the
/// new one answers, its buffer playing on meanwhile. It reads at most
/// `max_buffer_s` ahead, as a player does, so that it consumes the stream
/// at its bit rate.
pub async fn listener(
    mount: String,
    kbps: f64,
    mut target: tokio::sync::watch::Receiver<Option<SocketAddr>>,
    tally: std::sync::Arc<Tally>,
) -> Listened {
    use std::sync::atomic::Ordering::Relaxed;
    let t0 = Instant::now();
    let secs = move || t0.elapsed().as_secs_f64();
    let rate = kbps * 1000.0 / 8.0;
    let mut p = Player::new(rate, 2.0, 1.0, 0.0);
    let max_buffer_s = 10.0;
    let mut bytes = 0u64;
    let mut moves = 0;
    let (mut seen_stalls, mut seen_stalled) = (0u32, 0.0f64);
    let mut stall_log: Vec<Stall> = Vec::new();
    let mut opened = 0.0f64;
    let mut note = |p: &Player, on: SocketAddr, opened: f64, log: &mut Vec<Stall>| {
        if p.stalls > seen_stalls {
            let at = p.stalling_since().unwrap_or(p.last);
            log.push(Stall {
                at,
                server: on,
                since_open: at - opened,
            });
            tally
                .stalls
                .fetch_add(u64::from(p.stalls - seen_stalls), Relaxed);
            seen_stalls = p.stalls;
        }
        if p.stalled > seen_stalled {
            tally
                .stall_ms
                .fetch_add(((p.stalled - seen_stalled) * 1000.0) as u64, Relaxed);
            seen_stalled = p.stalled;
        }
    };
    let tally2 = tally.clone();
    let done = move |p: &mut Player, bytes, moves, end: End, server, mut stall_log: Vec<Stall>| {
        let stall_before = p.stalling_since().or(p.stalls_pending(secs()));
        p.finish(secs());
        // A stall that runs to the end was never ended by data; log it.
        if let (Some(at), Some(server)) = (stall_before, server)
            && (p.stalls as usize) > stall_log.len()
        {
            stall_log.push(Stall {
                at,
                server,
                since_open: f64::NAN,
            });
        }
        if matches!(end, End::Cut(_)) {
            tally2.cuts.fetch_add(1, Relaxed);
        }
        Listened {
            startup: p.startup,
            stalled: p.stalled,
            stalls: p.stalls,
            bytes,
            moves,
            end,
            server,
            connected: t0,
            stall_log,
        }
    };
    let Some(mut on) = *target.borrow_and_update() else {
        return done(&mut p, 0, 0, End::Left, None, stall_log);
    };
    let mut conn = match open(on, &mount).await {
        Ok((s, first)) => {
            bytes += first.len() as u64;
            p.feed(secs(), first.len());
            s
        }
        Err(e) => return done(&mut p, 0, 0, End::Cut(e), Some(on), stall_log),
    };
    let mut b = vec![0u8; 8192];
    loop {
        if p.buffered_s() > max_buffer_s {
            // A full player stops reading (TCP flow control pushes back).
            let wait = Duration::from_secs_f64((p.buffered_s() - max_buffer_s + 0.2).max(0.05));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                r = target.changed() => if r.is_err() { return done(&mut p, bytes, moves, End::Left, Some(on), stall_log); },
            }
            p.advance(secs());
            note(&p, on, opened, &mut stall_log);
        } else {
            tokio::select! {
                r = tokio::time::timeout(Duration::from_secs(30), conn.read(&mut b)) => {
                    match r {
                        Ok(Ok(0)) => return done(&mut p, bytes, moves, End::Cut(format!("{on} closed the stream")), Some(on), stall_log),
                        Ok(Ok(n)) => { bytes += n as u64; p.feed(secs(), n); note(&p, on, opened, &mut stall_log); }
                        Ok(Err(e)) => return done(&mut p, bytes, moves, End::Cut(format!("{on}: {e}")), Some(on), stall_log),
                        Err(_) => return done(&mut p, bytes, moves, End::Cut(format!("{on} sent nothing for 30 s")), Some(on), stall_log),
                    }
                }
                r = target.changed() => if r.is_err() { return done(&mut p, bytes, moves, End::Left, Some(on), stall_log); },
            }
        }
        // Not `has_changed`: the `changed()` that woke the select above
        // already marked the new value seen.
        {
            let want = *target.borrow_and_update();
            match want {
                None => return done(&mut p, bytes, moves, End::Left, Some(on), stall_log),
                Some(next) if next != on => {
                    // Move: the new server's burst refills the buffer.
                    match open(next, &mount).await {
                        Ok((s, first)) => {
                            conn = s;
                            on = next;
                            opened = secs();
                            moves += 1;
                            bytes += first.len() as u64;
                            p.feed(secs(), first.len());
                        }
                        Err(_) => {
                            // Stay where it is; the old server still serves.
                        }
                    }
                }
                Some(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_player_starts_after_its_prebuffer_and_counts_stalls() {
        // 1,000 B/s, 2 s prebuffer, 1 s rebuffer.
        let mut p = Player::new(1000.0, 2.0, 1.0, 0.0);
        p.feed(0.5, 1500);
        assert_eq!(p.startup, None);
        p.feed(1.0, 600);
        assert_eq!(p.startup, Some(1.0));
        // 2,100 B at t=1: plays until t=3.1, then dry.
        p.feed(4.0, 500);
        assert_eq!(p.stalls, 1);
        p.feed(4.5, 600); // 1,100 B: playing again at 4.5
        assert!((p.stalled - 1.4).abs() < 1e-9, "{}", p.stalled);
        p.finish(5.0);
        assert_eq!(p.stalls, 1);
        assert!((p.stalled - 1.4).abs() < 1e-9);
        // Never enough data: the stall runs to the end.
        let mut q = Player::new(1000.0, 1.0, 1.0, 0.0);
        q.feed(0.0, 1000);
        q.finish(3.0);
        assert_eq!(q.stalls, 1);
        assert!((q.stalled - 2.0).abs() < 1e-9);
    }
}
