//! `shoal relay`: the timestamping UDP relay in front of game servers
//! (thesis ch. 6, docs/timestamps.md).
//!
//! Each client datagram is received with the kernel's receive time
//! (`SO_TIMESTAMPNS`, taken in softirq as the packet enters the stack, the
//! place the thesis stamps on the host), prefixed with a
//! [`shoal_core::stamp`] record and sent to the client's game server from a
//! socket of the flow's own, so the server's answers come back on that
//! socket and go out to the client's address from the listening one. The
//! server subtracts nothing of its own scheduling delay: the time it reads
//! is the arrival's.
//!
//! Its own verb rather than `shoal dispatch --udp`: the dispatcher is an
//! HTTP proxy with a multi-threaded runtime and forty HTTP flags, while the
//! relay is one thread the operator pins to the host's network CPU (the
//! thesis's dom0), so that the game servers' load never delays the stamp's
//! delivery; it shares the crate, the backend-list following and the
//! metrics style.

use crate::follow::{Target, specs};
use anyhow::Context as _;
use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg, setsockopt, sockopt,
};
use shoal_core::relay::{FlowTable, Route};
use shoal_core::stamp::{self, Format};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::IoSliceMut;
use std::net::{SocketAddr, UdpSocket as StdUdp};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Largest datagram relayed (larger ones are cut by the kernel and dropped).
const MAX_DATAGRAM: usize = 65_507;

/// `shoal relay` arguments.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  shoal relay --listen 127.0.0.1:27960 --backends 127.0.0.1:27961,127.0.0.1:27962 \\\n    --admin 127.0.0.1:9190 --cpu 0\n\nEach datagram reaches its game server as an 8-byte record (0xD7, 6, u32 seconds,\nu16 of 16 µs steps; --format ns: 0xD7, 8, u64 ns) followed by the client's\nbytes; docs/timestamps.md describes it for C. GET /metrics on --admin."
)]
pub struct RelayArgs {
    /// Address clients send to (port 0 picks one; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:27960")]
    pub listen: SocketAddr,
    /// Game servers, HOST:PORT, comma-separated; a new client flow goes to
    /// the one with fewest flows and stays there.
    #[arg(long, value_delimiter = ',')]
    pub backends: Vec<SocketAddr>,
    /// Follow this service's backend list in the manager instead.
    #[arg(long, conflicts_with = "backends")]
    pub service: Option<String>,
    /// Manager URL (default: the one the cluster directory records).
    #[arg(long)]
    pub manager: Option<String>,
    /// Cluster directory (or a dispatcher certificate's) for --service.
    #[arg(long, env = "SHOAL_DIR")]
    pub dir: Option<std::path::PathBuf>,
    /// Timestamp record: thesis (6 bytes, 16 µs) or ns (8 bytes).
    #[arg(long, default_value = "thesis")]
    pub format: Format,
    /// A flow with no datagram either way for this long is forgotten.
    #[arg(long, default_value = "30s", value_parser = crate::config::parse_duration)]
    pub idle_timeout: Duration,
    /// Most client flows at once (each holds one socket).
    #[arg(long, default_value_t = 10_000)]
    pub max_flows: usize,
    /// Pin the relay's thread to this CPU.
    #[arg(long)]
    pub cpu: Option<usize>,
    /// Serve GET /metrics (Prometheus) here.
    #[arg(long)]
    pub admin: Option<SocketAddr>,
}

/// Upper bounds of the relay-delay histogram, in microseconds: from the
/// kernel's receive stamp to the forwarded datagram's send returning.
pub const DELAY_BUCKETS_US: [u64; 12] = [
    5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 50_000,
];

/// The relay's counters.
#[derive(Debug, Default)]
pub struct RelayMetrics {
    /// Client datagrams received.
    pub datagrams_in: AtomicU64,
    /// Datagrams forwarded to game servers.
    pub forwarded: AtomicU64,
    /// Server answers relayed to clients.
    pub replies: AtomicU64,
    /// Dropped: no game server (or the flow limit).
    pub drop_no_backend: AtomicU64,
    /// Dropped: a send failed (server gone, buffer full).
    pub drop_send: AtomicU64,
    /// Dropped: larger than a datagram can be with the record.
    pub drop_too_large: AtomicU64,
    /// Received without a kernel timestamp (stamped with the clock instead).
    pub unstamped: AtomicU64,
    /// Flows open.
    pub flows_open: AtomicU64,
    /// Flows expired idle.
    pub flows_expired: AtomicU64,
    delay: [AtomicU64; DELAY_BUCKETS_US.len() + 1],
    delay_sum_ns: AtomicU64,
}

impl RelayMetrics {
    fn observe_delay(&self, ns: u64) {
        let us = ns / 1000;
        let i = DELAY_BUCKETS_US
            .iter()
            .position(|b| us < *b)
            .unwrap_or(DELAY_BUCKETS_US.len());
        self.delay[i].fetch_add(1, Relaxed);
        self.delay_sum_ns.fetch_add(ns, Relaxed);
    }

    /// Relay delays observed per bucket (the last is above every bound).
    pub fn delay_counts(&self) -> Vec<u64> {
        self.delay.iter().map(|c| c.load(Relaxed)).collect()
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let c = |o: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(o, "# HELP shoal_relay_{name} {help}");
            let _ = writeln!(o, "# TYPE shoal_relay_{name} counter");
            let _ = writeln!(o, "shoal_relay_{name} {v}");
        };
        c(
            &mut o,
            "datagrams_total",
            "Client datagrams received.",
            self.datagrams_in.load(Relaxed),
        );
        c(
            &mut o,
            "forwarded_total",
            "Datagrams forwarded to game servers.",
            self.forwarded.load(Relaxed),
        );
        c(
            &mut o,
            "replies_total",
            "Server answers relayed to clients.",
            self.replies.load(Relaxed),
        );
        c(
            &mut o,
            "unstamped_total",
            "Datagrams without a kernel timestamp.",
            self.unstamped.load(Relaxed),
        );
        c(
            &mut o,
            "flows_expired_total",
            "Client flows forgotten idle.",
            self.flows_expired.load(Relaxed),
        );
        let _ = writeln!(
            o,
            "# HELP shoal_relay_drops_total Datagrams dropped, by reason."
        );
        let _ = writeln!(o, "# TYPE shoal_relay_drops_total counter");
        for (r, v) in [
            ("no_backend", &self.drop_no_backend),
            ("send", &self.drop_send),
            ("too_large", &self.drop_too_large),
        ] {
            let _ = writeln!(
                o,
                "shoal_relay_drops_total{{reason=\"{r}\"}} {}",
                v.load(Relaxed)
            );
        }
        let _ = writeln!(o, "# HELP shoal_relay_flows Client flows open.");
        let _ = writeln!(o, "# TYPE shoal_relay_flows gauge");
        let _ = writeln!(o, "shoal_relay_flows {}", self.flows_open.load(Relaxed));
        let _ = writeln!(
            o,
            "# HELP shoal_relay_delay_seconds From the kernel's receive stamp to the forwarded send."
        );
        let _ = writeln!(o, "# TYPE shoal_relay_delay_seconds histogram");
        let mut cum = 0;
        for (i, b) in DELAY_BUCKETS_US.iter().enumerate() {
            cum += self.delay[i].load(Relaxed);
            let _ = writeln!(
                o,
                "shoal_relay_delay_seconds_bucket{{le=\"{}\"}} {cum}",
                *b as f64 / 1e6
            );
        }
        cum += self.delay[DELAY_BUCKETS_US.len()].load(Relaxed);
        let _ = writeln!(o, "shoal_relay_delay_seconds_bucket{{le=\"+Inf\"}} {cum}");
        let _ = writeln!(
            o,
            "shoal_relay_delay_seconds_sum {}",
            self.delay_sum_ns.load(Relaxed) as f64 / 1e9
        );
        let _ = writeln!(o, "shoal_relay_delay_seconds_count {cum}");
        o
    }
}

/// The realtime clock in nanoseconds, the clock `SO_TIMESTAMPNS` uses.
pub fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Receives one datagram into `buf` with its kernel receive time.
fn recv_stamped(
    fd: std::os::fd::RawFd,
    buf: &mut [u8],
    cmsg: &mut Vec<u8>,
) -> std::io::Result<(usize, SocketAddr, Option<u64>, bool)> {
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<SockaddrStorage>(fd, &mut iov, Some(cmsg), MsgFlags::empty())
        .map_err(std::io::Error::from)?;
    let mut ts = None;
    for c in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::ScmTimestampns(t) = c {
            ts = Some(t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64);
        }
    }
    let truncated = msg.flags.contains(MsgFlags::MSG_TRUNC);
    let from = msg
        .address
        .and_then(|a| {
            a.as_sockaddr_in()
                .map(|v| SocketAddr::V4((*v).into()))
                .or_else(|| a.as_sockaddr_in6().map(|v| SocketAddr::V6((*v).into())))
        })
        .ok_or_else(|| std::io::Error::other("datagram without a source address"))?;
    Ok((msg.bytes, from, ts, truncated))
}

/// A bound listening socket with kernel receive timestamps on.
pub fn bind_stamped(addr: SocketAddr) -> anyhow::Result<StdUdp> {
    let s = StdUdp::bind(addr).with_context(|| {
        format!("--listen {addr}: cannot bind; pick a free port or address (0 picks one)")
    })?;
    setsockopt(&s, sockopt::ReceiveTimestampns, &true)
        .context("SO_TIMESTAMPNS: the kernel refused receive timestamps")?;
    s.set_nonblocking(true)?;
    Ok(s)
}

struct FlowIo {
    upstream: Arc<UdpSocket>,
    task: tokio::task::JoinHandle<()>,
}

/// Runs the relay until interrupted (its own single-threaded runtime: the
/// relay is one thread, pinned with --cpu).
pub fn run(args: RelayArgs) -> anyhow::Result<()> {
    if let Some(cpu) = args.cpu {
        let mut set = nix::sched::CpuSet::new();
        set.set(cpu)
            .map_err(|_| anyhow::anyhow!("--cpu {cpu}: not a CPU number this host has"))?;
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
            .with_context(|| format!("--cpu {cpu}: cannot pin the relay there; is it online?"))?;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve(args))
}

async fn serve(args: RelayArgs) -> anyhow::Result<()> {
    let target = Target::of(
        args.service.as_deref(),
        args.manager.as_deref(),
        args.dir.as_deref(),
    )?;
    let mut backends: Vec<String> = args.backends.iter().map(|b| b.to_string()).collect();
    let mut version = 0;
    if let Some(t) = &target {
        let list = t
            .fetch()
            .await
            .with_context(|| format!("--service {}: cannot read its backend list", t.service))?;
        version = list.version;
        backends = specs(&list)
            .into_iter()
            .filter(|b| !b.draining)
            .map(|b| b.addr)
            .collect();
    } else if backends.is_empty() {
        anyhow::bail!(
            "no game servers: give --backends HOST:PORT,... or --service NAME to follow a service"
        );
    }
    let listen = bind_stamped(args.listen)?;
    let local = listen.local_addr()?;
    let listen = Arc::new(UdpSocket::from_std(listen)?);
    let metrics = Arc::new(RelayMetrics::default());
    if let Some(a) = args.admin {
        let l = tokio::net::TcpListener::bind(a)
            .await
            .with_context(|| format!("--admin {a}: cannot bind"))?;
        println!("relay admin on {}", l.local_addr()?);
        tokio::spawn(serve_metrics(l, metrics.clone()));
    }
    println!(
        "relay listening on {local}, {} game servers, record {:?}",
        backends.len(),
        args.format
    );
    let (list_tx, mut list_rx) = tokio::sync::mpsc::channel::<(Vec<String>, Vec<String>)>(4);
    if let Some(t) = target {
        tokio::spawn(follow_list(t, version, list_tx));
    }
    let mut table: FlowTable<SocketAddr> =
        FlowTable::new(backends, args.idle_timeout, args.max_flows);
    // The flow table's clock: milliseconds since the relay started.
    let epoch = Instant::now();
    let now_ms = || epoch.elapsed().as_millis() as u64;
    let mut flows: HashMap<SocketAddr, FlowIo> = HashMap::new();
    let (touch_tx, mut touch_rx) = tokio::sync::mpsc::unbounded_channel::<SocketAddr>();
    let hl = args.format.header_len();
    let mut buf = vec![0u8; hl + MAX_DATAGRAM + 1];
    let mut cmsg = nix::cmsg_space!(nix::sys::time::TimeSpec);
    let fd = listen.as_raw_fd();
    let mut sweep = tokio::time::interval((args.idle_timeout / 4).max(Duration::from_millis(100)));
    let mut shutdown = std::pin::pin!(tokio::signal::ctrl_c());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            biased;
            r = listen.async_io(Interest::READABLE, || recv_stamped(fd, &mut buf[hl..], &mut cmsg)) => {
                let (n, from, ts, truncated) = match r {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::debug!("recv: {e}");
                        continue;
                    }
                };
                metrics.datagrams_in.fetch_add(1, Relaxed);
                if truncated || n > MAX_DATAGRAM - hl {
                    metrics.drop_too_large.fetch_add(1, Relaxed);
                    continue;
                }
                let arrival = match ts {
                    Some(t) => t,
                    None => {
                        metrics.unstamped.fetch_add(1, Relaxed);
                        unix_ns()
                    }
                };
                let now = now_ms();
                match table.route(&from, now) {
                    Route::Existing(_) => {}
                    Route::New(b) => {
                        match open_flow(&b, from, listen.clone(), metrics.clone(), touch_tx.clone()).await {
                            Ok(io) => {
                                flows.insert(from, io);
                                metrics.flows_open.store(flows.len() as u64, Relaxed);
                            }
                            Err(e) => {
                                tracing::warn!("flow {from} to {b}: {e:#}");
                                table.forget(&from);
                                metrics.drop_send.fetch_add(1, Relaxed);
                                continue;
                            }
                        }
                    }
                    Route::NoBackend => {
                        metrics.drop_no_backend.fetch_add(1, Relaxed);
                        continue;
                    }
                };
                let Some(io) = flows.get(&from) else {
                    metrics.drop_no_backend.fetch_add(1, Relaxed);
                    continue;
                };
                stamp::encode(args.format, arrival, &mut buf[..hl]);
                // try_send first (no await on the hot path); a socket
                // tokio has not yet seen writable needs one await.
                let sent = match io.upstream.try_send(&buf[..hl + n]) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        io.upstream.send(&buf[..hl + n]).await
                    }
                    r => r,
                };
                match sent {
                    Ok(_) => {
                        metrics.forwarded.fetch_add(1, Relaxed);
                        metrics.observe_delay(unix_ns().saturating_sub(arrival));
                    }
                    Err(_) => {
                        metrics.drop_send.fetch_add(1, Relaxed);
                    }
                }
            }
            Some(c) = touch_rx.recv() => table.touch(&c, now_ms()),
            Some((active, draining)) = list_rx.recv() => {
                for gone in table.set_backends_draining(active, draining) {
                    if let Some(io) = flows.remove(&gone) {
                        io.task.abort();
                    }
                }
                metrics.flows_open.store(flows.len() as u64, Relaxed);
            }
            _ = sweep.tick() => {
                for gone in table.expire(now_ms()) {
                    if let Some(io) = flows.remove(&gone) {
                        io.task.abort();
                        metrics.flows_expired.fetch_add(1, Relaxed);
                    }
                }
                metrics.flows_open.store(flows.len() as u64, Relaxed);
            }
            _ = &mut shutdown => return Ok(()),
            _ = term.recv() => return Ok(()),
        }
    }
}

/// Opens a flow's upstream socket and the task relaying answers back.
async fn open_flow(
    backend: &str,
    client: SocketAddr,
    listen: Arc<UdpSocket>,
    metrics: Arc<RelayMetrics>,
    touch: tokio::sync::mpsc::UnboundedSender<SocketAddr>,
) -> anyhow::Result<FlowIo> {
    let addr: SocketAddr = backend
        .parse()
        .with_context(|| format!("game server {backend:?} is not HOST:PORT"))?;
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let up = Arc::new(UdpSocket::bind(bind).await?);
    up.connect(addr).await?;
    let rx = up.clone();
    let task = tokio::spawn(async move {
        let mut b = vec![0u8; MAX_DATAGRAM];
        let mut last_touch = Instant::now();
        loop {
            let n = match rx.recv(&mut b).await {
                Ok(n) => n,
                // ECONNREFUSED from an ICMP unreachable: keep the flow,
                // the server may come back.
                Err(_) => continue,
            };
            if listen.send_to(&b[..n], client).await.is_ok() {
                metrics.replies.fetch_add(1, Relaxed);
            } else {
                metrics.drop_send.fetch_add(1, Relaxed);
            }
            // Answers keep a flow alive; tell the table at most once a second.
            if last_touch.elapsed() > Duration::from_secs(1) {
                last_touch = Instant::now();
                let _ = touch.send(client);
            }
        }
    });
    Ok(FlowIo { upstream: up, task })
}

async fn follow_list(
    t: Target,
    mut version: u64,
    tx: tokio::sync::mpsc::Sender<(Vec<String>, Vec<String>)>,
) {
    loop {
        match t.wait_change(version).await {
            Ok(list) if list.version != version => {
                version = list.version;
                let (draining, active): (Vec<_>, Vec<_>) =
                    specs(&list).into_iter().partition(|b| b.draining);
                let addrs = |v: Vec<shoal_core::select::BackendSpec>| {
                    v.into_iter().map(|b| b.addr).collect::<Vec<_>>()
                };
                if tx.send((addrs(active), addrs(draining))).await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!("following {}: {e:#}; retrying", t.service);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

async fn serve_metrics(l: tokio::net::TcpListener, m: Arc<RelayMetrics>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut s, _)) = l.accept().await else {
            continue;
        };
        let m = m.clone();
        tokio::spawn(async move {
            let mut req = [0u8; 2048];
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut req))
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or(0);
            let head = String::from_utf8_lossy(&req[..n]);
            let (status, body) = if head.starts_with("GET /metrics") {
                ("200 OK", m.render())
            } else {
                ("404 Not Found", "try GET /metrics\n".to_string())
            };
            let _ = s
                .write_all(
                    format!(
                        "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                )
                .await;
        });
    }
}
