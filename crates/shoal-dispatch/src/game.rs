//! `shoal game-server` and `shoal game-client`: the thesis's game model
//! (ch. 6, §6.2.1 and §6.5.2; notes D.3), the peer the timestamping relay
//! is measured with.
//!
//! A client sends 296-byte inputs as a Poisson process (20 a second by
//! default), each carrying its sequence number and send time in clear and
//! a 256-byte input block sealed with ChaCha20-Poly1305; the server opens
//! every input, folds it into its game state with SHA-256 (`--work`
//! rounds: the game's simulation, calibrated by the benchmark) and sends
//! each client 20 sealed updates a second. For each input it records two
//! errors against the send time: the relay's host timestamp (the record in
//! front of the datagram) and its own clock read after `recv` returned.
//!
//! ```text
//! input  (296): seq u64 | send_ns u64 | client u32 | 0 u32 | sealed block (256) | tag (16)
//! update (240): seq u64 | server_ns u64 | last input seq u64 | sealed state (200) | tag (16)
//! ```

use crate::relay::unix_ns;
use anyhow::Context as _;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shoal_core::stamp::{self, ErrorStats};
use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

/// Bytes of an input datagram (the thesis's 296-byte UDP payload).
pub const INPUT_LEN: usize = 296;
const INPUT_HEAD: usize = 24;
const BLOCK: usize = 256;
const UPDATE_HEAD: usize = 24;
const STATE: usize = 200;
const TAG: usize = 16;
/// Bytes of an update datagram.
pub const UPDATE_LEN: usize = UPDATE_HEAD + STATE + TAG;

/// The model's shared session key: the model measures the work of
/// sealing, not key exchange, so every client and server derive the same
/// key from this label.
fn key() -> LessSafeKey {
    let k = Sha256::digest(b"shoal game model session key");
    LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &k).expect("32-byte key"))
}

fn nonce(tag: u8, id: u32, seq: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[0] = tag;
    n[1..4].copy_from_slice(&id.to_be_bytes()[1..]);
    n[4..].copy_from_slice(&seq.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// Builds input `seq` of client `id` sent at `send_ns`.
pub fn input(key: &LessSafeKey, id: u32, seq: u64, send_ns: u64) -> [u8; INPUT_LEN] {
    let mut d = [0u8; INPUT_LEN];
    d[0..8].copy_from_slice(&seq.to_be_bytes());
    d[8..16].copy_from_slice(&send_ns.to_be_bytes());
    d[16..20].copy_from_slice(&id.to_be_bytes());
    for (i, b) in d[INPUT_HEAD..INPUT_HEAD + BLOCK].iter_mut().enumerate() {
        *b = (i as u64 ^ seq) as u8;
    }
    let (head, rest) = d.split_at_mut(INPUT_HEAD);
    let (block, tag) = rest.split_at_mut(BLOCK);
    let t = key
        .seal_in_place_separate_tag(nonce(1, id, seq), Aad::from(&*head), block)
        .expect("sealing 256 bytes");
    tag.copy_from_slice(t.as_ref());
    d
}

/// An input's clear header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputHead {
    /// Sequence number from 0.
    pub seq: u64,
    /// Client's clock at send, ns since the epoch.
    pub send_ns: u64,
    /// Client number.
    pub client: u32,
}

/// Opens an input in place; `None` if it is not one (wrong size, forged).
pub fn open_input<'a>(key: &LessSafeKey, d: &'a mut [u8]) -> Option<(InputHead, &'a [u8])> {
    if d.len() != INPUT_LEN {
        return None;
    }
    let head = InputHead {
        seq: u64::from_be_bytes(d[0..8].try_into().ok()?),
        send_ns: u64::from_be_bytes(d[8..16].try_into().ok()?),
        client: u32::from_be_bytes(d[16..20].try_into().ok()?),
    };
    let (h, rest) = d.split_at_mut(INPUT_HEAD);
    let plain = key
        .open_in_place(nonce(1, head.client, head.seq), Aad::from(&*h), rest)
        .ok()?;
    Some((head, plain))
}

/// `shoal game-server` arguments.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  shoal game-server --listen 127.0.0.1:27961 --duration 10s --work 20\n\nBehind `shoal relay` every datagram starts with the relay's timestamp record;\nwith --direct it does not, and only the server's own clock is measured.\nAt the end it prints one JSON line: inputs, loss, and both errors."
)]
pub struct GameServerArgs {
    /// Address to receive inputs on.
    #[arg(long, default_value = "127.0.0.1:27961")]
    pub listen: SocketAddr,
    /// Stop after this long and print the report (default: run until killed, no report).
    #[arg(long, value_parser = crate::config::parse_duration)]
    pub duration: Option<Duration>,
    /// Updates a second sent to each client.
    #[arg(long, default_value_t = 20)]
    pub update_rate: u32,
    /// SHA-256 rounds over the 1 KiB game state per input (the game's
    /// simulation work).
    #[arg(long, default_value_t = 1)]
    pub work: u32,
    /// Inputs arrive without the relay's record (clients send straight here).
    #[arg(long)]
    pub direct: bool,
    /// Ignore the errors of inputs received in this first stretch.
    #[arg(long, default_value = "0s", value_parser = crate::config::parse_duration)]
    pub warmup: Duration,
}

/// Serialisable error statistics of one method.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ErrorReport {
    /// Inputs measured.
    pub count: u64,
    /// Mean error, µs.
    pub mean_us: f64,
    /// Median, µs.
    pub p50_us: f64,
    /// 95th percentile, µs.
    pub p95_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// Largest, µs.
    pub max_us: f64,
    /// Sum in ns (to merge reports).
    pub sum_ns: i128,
    /// Histogram as (bucket, count): 1 µs buckets below 1000, then 100 a decade.
    pub buckets: Vec<(u32, u64)>,
}

impl ErrorReport {
    /// Summarises `s`.
    pub fn of(s: &ErrorStats) -> Self {
        Self {
            count: s.count(),
            mean_us: s.mean_us(),
            p50_us: s.quantile_us(0.5),
            p95_us: s.quantile_us(0.95),
            p99_us: s.quantile_us(0.99),
            max_us: s.max_us(),
            sum_ns: s.sum_ns(),
            buckets: s.buckets().collect(),
        }
    }

    /// Back to statistics, to merge.
    pub fn stats(&self) -> ErrorStats {
        ErrorStats::from_parts(
            self.count,
            self.sum_ns,
            (self.max_us * 1000.0) as i64,
            self.buckets.iter().copied(),
        )
    }
}

/// What a game server measured.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct GameServerReport {
    /// Its address.
    pub listen: String,
    /// Client flows seen.
    pub flows: usize,
    /// Inputs received and opened.
    pub received: u64,
    /// Inputs the clients sent up to the last one seen per flow.
    pub expected: u64,
    /// Datagrams that were not inputs (bad record, size or seal).
    pub malformed: u64,
    /// Updates sent.
    pub updates: u64,
    /// The relay's host timestamp minus the send time.
    pub host: ErrorReport,
    /// The server's clock after recv minus the send time.
    pub app: ErrorReport,
}

struct FlowSeen {
    max_seq: u64,
    received: u64,
    last_seq: u64,
    update_seq: u64,
}

/// Runs a game server (blocking: a game server is one loop on one thread,
/// as the thesis's Quake 3 engine).
pub fn server(args: GameServerArgs) -> anyhow::Result<()> {
    let sock = UdpSocket::bind(args.listen)
        .with_context(|| format!("--listen {}: cannot bind; pick a free port", args.listen))?;
    eprintln!("game server on {}", sock.local_addr()?);
    let key = key();
    let period = Duration::from_secs(1) / args.update_rate.max(1);
    let start = Instant::now();
    let end = args.duration.map(|d| start + d);
    let mut next_tick = start + period;
    let mut buf = vec![0u8; 65_536];
    let mut state = [0u8; 1024];
    let mut flows: HashMap<SocketAddr, FlowSeen> = HashMap::new();
    let (mut host, mut app) = (ErrorStats::default(), ErrorStats::default());
    let mut rep = GameServerReport {
        listen: sock.local_addr()?.to_string(),
        ..Default::default()
    };
    let mut update = [0u8; UPDATE_LEN];
    loop {
        let now = Instant::now();
        if end.is_some_and(|e| now >= e) {
            break;
        }
        if now >= next_tick {
            // One update per client per tick, sealed: the server's
            // outgoing work (the thesis's encrypt).
            let sn = unix_ns();
            for (addr, f) in flows.iter_mut() {
                f.update_seq += 1;
                update[0..8].copy_from_slice(&f.update_seq.to_be_bytes());
                update[8..16].copy_from_slice(&sn.to_be_bytes());
                update[16..24].copy_from_slice(&f.last_seq.to_be_bytes());
                update[UPDATE_HEAD..UPDATE_HEAD + STATE].copy_from_slice(&state[..STATE]);
                let (head, rest) = update.split_at_mut(UPDATE_HEAD);
                let (body, tag) = rest.split_at_mut(STATE);
                if let Ok(t) = key.seal_in_place_separate_tag(
                    nonce(
                        2,
                        (f.update_seq >> 32) as u32 ^ addr.port() as u32,
                        f.update_seq,
                    ),
                    Aad::from(&*head),
                    body,
                ) {
                    tag.copy_from_slice(t.as_ref());
                    if sock.send_to(&update, addr).is_ok() {
                        rep.updates += 1;
                    }
                }
            }
            next_tick += period;
            if next_tick < now {
                next_tick = now + period;
            }
            continue;
        }
        sock.set_read_timeout(Some((next_tick - now).max(Duration::from_micros(100))))?;
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(v) => v,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) => return Err(e).context("receiving inputs"),
        };
        // The server's own clock, read as soon as it has the datagram: the
        // thesis's guest timestamp.
        let app_ns = unix_ns();
        let (host_ns, payload) = if args.direct {
            (None, &mut buf[..n])
        } else {
            match stamp::decode(&buf[..n]) {
                Ok((s, p)) => {
                    let off = n - p.len();
                    (Some(s.unix_ns), &mut buf[off..n])
                }
                Err(_) => {
                    rep.malformed += 1;
                    continue;
                }
            }
        };
        let Some((head, plain)) = open_input(&key, payload) else {
            rep.malformed += 1;
            continue;
        };
        // The game's simulation: fold the input into the state.
        let mut h = Sha256::new();
        h.update(plain);
        h.update(state);
        let mut d = h.finalize();
        for r in 0..args.work {
            let mut h = Sha256::new();
            h.update(d);
            h.update(state);
            d = h.finalize();
            state[(r as usize * 32) % 1024..][..32].copy_from_slice(&d);
        }
        state[..32].copy_from_slice(&d);
        let f = flows.entry(from).or_insert(FlowSeen {
            max_seq: 0,
            received: 0,
            last_seq: 0,
            update_seq: 0,
        });
        f.received += 1;
        f.max_seq = f.max_seq.max(head.seq);
        f.last_seq = head.seq;
        rep.received += 1;
        if now.duration_since(start) >= args.warmup {
            app.add(app_ns as i64 - head.send_ns as i64);
            if let Some(h) = host_ns {
                host.add(h as i64 - head.send_ns as i64);
            }
        }
    }
    rep.flows = flows.len();
    rep.expected = flows.values().map(|f| f.max_seq + 1).sum();
    rep.host = ErrorReport::of(&host);
    rep.app = ErrorReport::of(&app);
    println!("{}", serde_json::to_string(&rep)?);
    Ok(())
}

/// `shoal game-client` arguments.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  shoal game-client --server 127.0.0.1:27960 --clients 4 --duration 10s\n\nEach client is its own socket (its own flow at the relay). At the end it\nprints one JSON line: inputs sent and updates received."
)]
pub struct GameClientArgs {
    /// The relay (or a game server, with its --direct).
    #[arg(long, default_value = "127.0.0.1:27960")]
    pub server: SocketAddr,
    /// Clients simulated, each with its own socket.
    #[arg(long, default_value_t = 1)]
    pub clients: u32,
    /// Mean inputs a second per client (Poisson).
    #[arg(long, default_value_t = 20.0)]
    pub rate: f64,
    /// How long to send.
    #[arg(long, default_value = "10s", value_parser = crate::config::parse_duration)]
    pub duration: Duration,
    /// Local address to send from.
    #[arg(long, default_value = "0.0.0.0")]
    pub bind: std::net::IpAddr,
    /// Seed of the arrival process.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// What the clients did.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct GameClientReport {
    /// Clients.
    pub clients: u32,
    /// Inputs sent.
    pub sent: u64,
    /// Updates received.
    pub updates: u64,
}

/// Runs the clients (one small runtime; each client a task).
pub fn client(args: GameClientArgs) -> anyhow::Result<()> {
    if !(args.rate > 0.0 && args.rate.is_finite()) {
        anyhow::bail!(
            "--rate {}: give a positive number of inputs a second",
            args.rate
        );
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let rep = rt.block_on(async move {
        let mut tasks = Vec::new();
        for id in 0..args.clients {
            let sock = tokio::net::UdpSocket::bind(SocketAddr::new(args.bind, 0))
                .await
                .with_context(|| format!("--bind {}: cannot bind a client socket", args.bind))?;
            sock.connect(args.server).await?;
            let (rate, dur, seed) = (args.rate, args.duration, args.seed);
            tasks.push(tokio::spawn(async move {
                one_client(sock, id, rate, dur, seed).await
            }));
        }
        let mut rep = GameClientReport {
            clients: args.clients,
            ..Default::default()
        };
        for t in tasks {
            let (s, u) = t.await?;
            rep.sent += s;
            rep.updates += u;
        }
        anyhow::Ok(rep)
    })?;
    println!("{}", serde_json::to_string(&rep)?);
    Ok(())
}

async fn one_client(
    sock: tokio::net::UdpSocket,
    id: u32,
    rate: f64,
    dur: Duration,
    seed: u64,
) -> (u64, u64) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_mul(1_000_003) ^ u64::from(id));
    let key = key();
    let start = tokio::time::Instant::now();
    let end = start + dur;
    // Start each client at a random phase so they do not send in step.
    let mut next = start + Duration::from_secs_f64(rng.r#gen::<f64>() / rate);
    let (mut seq, mut updates) = (0u64, 0u64);
    let mut b = [0u8; 2048];
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {
                if next >= end {
                    break;
                }
                let d = input(&key, id, seq, unix_ns());
                if sock.send(&d).await.is_ok() {
                    seq += 1;
                }
                let u: f64 = rng.r#gen::<f64>().max(1e-12);
                next += Duration::from_secs_f64(-u.ln() / rate);
            }
            r = sock.recv(&mut b) => {
                if matches!(r, Ok(n) if n == UPDATE_LEN) {
                    updates += 1;
                }
            }
        }
    }
    (seq, updates)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_input_is_296_bytes_and_opens() {
        let k = key();
        let mut d = input(&k, 7, 42, 1_700_000_000_000_000_000);
        assert_eq!(d.len(), 296);
        let (h, plain) = open_input(&k, &mut d).unwrap();
        assert_eq!(
            h,
            InputHead {
                seq: 42,
                send_ns: 1_700_000_000_000_000_000,
                client: 7
            }
        );
        assert_eq!(plain.len(), 256);
        assert_eq!(plain[1], 1 ^ 42);
    }

    #[test]
    fn a_forged_input_does_not_open() {
        let k = key();
        let mut d = input(&k, 7, 42, 5);
        d[9] ^= 1; // the send time is authenticated
        assert!(open_input(&k, &mut d).is_none());
        assert!(open_input(&k, &mut [0u8; 10]).is_none());
    }
}
