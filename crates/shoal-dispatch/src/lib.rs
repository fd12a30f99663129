//! shoal-dispatch: the L7 dispatcher of a service.
//!
//! An HTTP/1.1 reverse proxy on hyper and tokio that chooses a backend for
//! every request with one of shoal-core's selectors, over a backend list that
//! can be swapped live ([`Backends::apply`]).

pub mod access_log;
pub mod backends;
mod bench;
pub mod clock;
pub mod config;
pub mod federation;
pub mod follow;
pub mod game;
pub mod h1;
pub mod handover;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod relay;
pub mod server;

pub use backends::{ApplyError, BackendStatus, Backends, HealthOpts};

use anyhow::Context as _;
use clock::Clock;
use config::{CpuAffinity, parse_backends, parse_cpu_affinity, parse_duration};
use metrics::Metrics;
use serde::Serialize;
use shoal_core::select::{
    self, Algo, BackendSet, Failover, HashFn, LardParams, Pool, RequestKey, SelectorConfig,
};
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use bench::BenchDispatchArgs;

/// How requests are matched to backends (shared by `dispatch` and `route`).
#[derive(Debug, Clone, clap::Args)]
pub struct SelectArgs {
    /// Selection algorithm: rr, wrr, lc, wlc, lard, lard-r, url-hash, bounded-ch.
    #[arg(long, default_value = "url-hash")]
    pub algo: Algo,
    /// Replication factor R for url-hash: backends serving each sub-namespace.
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// Hash function for url-hash and bounded-ch: charsum, md5, sha1, xxh3.
    #[arg(long, default_value = "xxh3")]
    pub hash: HashFn,
    /// url-hash on failure: skip (keep locality, thesis 4.3.3) or naive (rehash over the rest).
    #[arg(long, default_value = "skip")]
    pub failover: Failover,
    /// bounded-ch balance factor in percent (>= 100): a backend takes a request
    /// only while its load stays within ceil(factor * (total + 1) / n).
    #[arg(long, default_value_t = 125)]
    pub balance_factor: u32,
    /// LARD T_low (active connections).
    #[arg(long, default_value_t = 25)]
    pub lard_low: u32,
    /// LARD T_high (active connections).
    #[arg(long, default_value_t = 65)]
    pub lard_high: u32,
    /// LARD: most objects remembered.
    #[arg(long, default_value_t = 1 << 20)]
    pub lard_objects: usize,
}

impl SelectArgs {
    fn config(&self) -> SelectorConfig {
        SelectorConfig {
            algo: self.algo,
            replicas: self.replicas,
            hash: self.hash,
            failover: self.failover,
            balance_factor_pct: self.balance_factor,
            lard: LardParams {
                t_low: self.lard_low,
                t_high: self.lard_high,
                max_objects: self.lard_objects,
                ..LardParams::default()
            },
        }
    }
}

/// `shoal dispatch` arguments.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  shoal dispatch --listen 127.0.0.1:8080 --admin 127.0.0.1:9090 \\\n    --backends 127.0.0.1:8081,127.0.0.1:8082=2 --algo url-hash --replicas 2 --hash xxh3\n\nThe admin listener serves GET /metrics (Prometheus), GET /backends and\nPUT /backends (a JSON list of {\"addr\",\"weight\",\"draining\"}) to swap the list live."
)]
pub struct DispatchArgs {
    /// Address to accept clients on (port 0 picks one; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Backends, HOST:PORT[=WEIGHT], comma-separated.
    #[arg(long)]
    pub backends: Vec<String>,
    /// Manager to follow the service's backend list from (default: the one
    /// the cluster directory records).
    #[arg(long)]
    pub manager: Option<String>,
    /// Service whose backend list to follow; its dispatch settings (algo,
    /// replicas, hash) replace --algo, --replicas and --hash.
    #[arg(long)]
    pub service: Option<String>,
    /// Cluster directory whose admin certificate authenticates the dispatcher to the manager.
    #[arg(long, env = "SHOAL_DIR")]
    pub dir: Option<std::path::PathBuf>,
    /// Selection.
    #[command(flatten)]
    pub select: SelectArgs,
    /// Worker threads (default: the number of CPUs).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Pin each worker thread to one CPU: none, auto (thread i on the i-th
    /// CPU this process may use) or a list such as 0-3,6. Pinned threads
    /// cannot be stacked on one core while another runs the load
    /// generator or the backends; leave it off when several dispatchers
    /// share a host, or give each its own CPUs.
    #[arg(long, default_value = "none", value_parser = parse_cpu_affinity)]
    pub cpu_affinity: CpuAffinity,
    /// Admin listener (metrics, backend list); off unless given.
    #[arg(long)]
    pub admin: Option<SocketAddr>,
    /// File whose first line is the token that changes through the admin
    /// listener (PUT /backends) must bring as `Authorization: Bearer
    /// TOKEN`. Without it, changes are taken from loopback peers only.
    #[arg(long)]
    pub admin_token_file: Option<std::path::PathBuf>,
    /// Backend connect timeout.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Time for a client to send request headers, also the keep-alive idle limit between requests.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub header_timeout: Duration,
    /// Close a client connection that moves no bytes for this long (while no request waits on a backend).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Longest wait for a backend's response headers (504 after).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub backend_timeout: Duration,
    /// A connection switched to another protocol (WebSocket) is closed
    /// after this long without a byte either way (HAProxy's `timeout tunnel`).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub tunnel_timeout: Duration,
    /// Idle pooled backend connections are closed after this long.
    #[arg(long, default_value = "90s", value_parser = parse_duration)]
    pub pool_idle_timeout: Duration,
    /// Most idle pooled connections kept per backend and dispatcher thread.
    #[arg(long, default_value_t = 1024)]
    pub pool_max_idle: usize,
    /// Most client connections (and WebSocket tunnels) open at once; at
    /// the limit accepting pauses, and new clients wait in the listen
    /// backlog until one closes. Default: half the open-file limit (each
    /// client may hold a backend connection) less a reserve.
    #[arg(long)]
    pub max_connections: Option<u64>,
    /// Largest request head in bytes; larger gets 431.
    #[arg(long, default_value_t = 65536)]
    pub max_header_bytes: usize,
    /// First ejection period of a failing backend (doubles while it keeps failing, up to 30 s).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub eject_for: Duration,
    /// Consecutive 5xx responses that eject a backend (0: never).
    #[arg(long, default_value_t = 5)]
    pub eject_after_5xx: u32,
    /// Active health checks of every backend at this interval (off unless
    /// given, or 2s with --health-path): a TCP connect, or the HTTP check.
    #[arg(long, value_parser = parse_duration)]
    pub health_interval: Option<Duration>,
    /// Make the health checks (active ones, and those that readmit an
    /// ejected backend) an HTTP GET of this path, which must answer 2xx or
    /// 3xx within --connect-timeout, instead of a TCP connect.
    #[arg(long)]
    pub health_path: Option<String>,
    /// A draining backend leaves the list when its requests finish or after this long.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// On SIGTERM or Ctrl-C the dispatcher stops accepting, lets every
    /// connection finish the request in flight, and exits once none is
    /// left or after this long (a second signal exits at once).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
    /// Unix socket for zero-downtime upgrades. A dispatcher started with
    /// the same --handover and --listen while another runs there takes over
    /// its listening sockets (and its admin listener, if --admin is the
    /// same); the old one then stops accepting, finishes its requests in
    /// flight and exits. No connection is refused or reset in between.
    #[arg(long)]
    pub handover: Option<std::path::PathBuf>,
    /// Append one JSON line per request to this file (`-`: standard
    /// error): time, client, method, URI, status, backend, bytes,
    /// milliseconds, outcome. SIGHUP reopens it (for logrotate). Lines are
    /// buffered per thread and written every 100 ms by a thread of their
    /// own; they are dropped and counted if the disk falls far behind.
    #[arg(long)]
    pub access_log: Option<std::path::PathBuf>,
}

/// Runs the dispatcher until interrupted.
pub async fn run(args: DispatchArgs) -> anyhow::Result<()> {
    let mut args = args;
    let mut specs = parse_backends(&args.backends)?;
    let target = follow::Target::of(
        args.service.as_deref(),
        args.manager.as_deref(),
        args.dir.as_deref(),
    )?;
    let follow = match target {
        None => None,
        Some(target) => {
            if !specs.is_empty() {
                anyhow::bail!(
                    "--backends and --service exclude each other: the service's list is followed"
                );
            }
            let list = target.fetch().await?;
            follow::Target::settings_into(&list, &mut args.select)?;
            specs = follow::specs(&list);
            Some((target, list.version))
        }
    };
    if specs.is_empty() && follow.is_none() {
        anyhow::bail!(
            "no backends: give --backends HOST:PORT[=WEIGHT],... (e.g. --backends 127.0.0.1:8081,127.0.0.1:8082)"
        );
    }
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    if threads == 0 {
        anyhow::bail!("--threads must be at least 1");
    }
    if args.max_header_bytes < 1024 {
        anyhow::bail!("--max-header-bytes must be at least 1024");
    }
    if let Some(p) = &args.health_path
        && (!p.starts_with('/') || p.bytes().any(|b| b <= b' ' || b == 0x7f))
    {
        anyhow::bail!(
            "--health-path {p:?}: give an origin-form path such as /healthz (a leading /, no spaces)"
        );
    }
    // The dispatcher runs on threads of its own so that --threads is exact:
    // one event loop per thread (as HAProxy's nbthread and nginx's workers),
    // each accepting from the same listening socket and serving its
    // connections start to end, with no hand-off between threads.
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("dispatch-0".into())
        .spawn(move || {
            pool::set_worker(0);
            let _ = tx.send(serve(args, specs, follow, threads));
        })
        .context("starting the dispatcher thread")?;
    rx.await
        .map_err(|_| anyhow::anyhow!("the dispatcher thread stopped unexpectedly"))?
}

/// Pending connections each listening socket queues.
const LISTEN_BACKLOG: u32 = 4096;

/// A socket bound to `addr` with SO_REUSEADDR and SO_REUSEPORT (listening
/// starts inside a thread's event loop).
fn reuseport_socket(addr: SocketAddr) -> std::io::Result<tokio::net::TcpSocket> {
    let s = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    s.set_reuseaddr(true)?;
    s.set_reuseport(true)?;
    s.bind(addr)?;
    Ok(s)
}

/// The CPUs this process may run on.
pub(crate) fn allowed_cpus() -> anyhow::Result<Vec<usize>> {
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
        .context("reading the CPUs this process may run on")?;
    Ok((0..nix::sched::CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect())
}

/// The CPU of each worker thread in turn (empty: not pinned).
fn thread_cpus(aff: &CpuAffinity) -> anyhow::Result<Vec<usize>> {
    match aff {
        CpuAffinity::None => Ok(Vec::new()),
        CpuAffinity::Auto => allowed_cpus(),
        CpuAffinity::List(list) => {
            let allowed = allowed_cpus()?;
            if let Some(c) = list.iter().find(|c| !allowed.contains(c)) {
                anyhow::bail!(
                    "--cpu-affinity: CPU {c} is not one this process may run on (it may use {allowed:?}); \
                     give CPUs from that set, or --cpu-affinity auto"
                );
            }
            Ok(list.clone())
        }
    }
}

/// Pins the calling thread, worker `w`, to its CPU from `cpus` (if any).
fn pin_worker(cpus: &[usize], w: usize) -> anyhow::Result<()> {
    if cpus.is_empty() {
        return Ok(());
    }
    let cpu = cpus[w % cpus.len()];
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)
        .with_context(|| format!("CPU {cpu} is out of range"))?;
    // Pid 0: the calling thread.
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .with_context(|| format!("pinning dispatcher thread {w} to CPU {cpu}"))
}

fn event_loop() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a dispatcher event loop")
}

fn serve(
    args: DispatchArgs,
    specs: Vec<select::BackendSpec>,
    follow: Option<(follow::Target, u64)>,
    threads: usize,
) -> anyhow::Result<()> {
    let selector = select::build(&args.select.config())?;
    let clock = Clock::new();
    let health = HealthOpts {
        eject_base: args.eject_for,
        eject_max: Duration::from_secs(30).max(args.eject_for),
        eject_after_5xx: args.eject_after_5xx,
        drain_timeout: args.drain_timeout,
    };
    let backends = Backends::new(&specs, selector, health.clone(), clock.clone())?;
    // A followed service may be federated: the manager says so in its
    // answer to the first load report.
    let fed = follow.as_ref().map(|_| {
        let ip = args.listen.ip();
        federation::Fed::new(clock.clone(), health, (!ip.is_unspecified()).then_some(ip))
    });
    let metrics = Arc::new(Metrics::default());
    let access_log = match &args.access_log {
        Some(p) => Some(access_log::AccessLog::open(p, metrics.clone())?),
        None => None,
    };
    let pool_opts = pool::PoolOpts {
        connect_timeout: args.connect_timeout,
        idle_ms: args.pool_idle_timeout.as_millis() as u64,
        max_idle: args.pool_max_idle,
    };
    let shared = Arc::new(proxy::Shared {
        backends: backends.clone(),
        pool: pool_opts.clone(),
        metrics: metrics.clone(),
        backend_timeout: args.backend_timeout,
        stopping: Default::default(),
        access_log,
        tunnel_timeout: args.tunnel_timeout,
        federation: fed.clone(),
    });
    let admin_auth = match (&args.admin_token_file, args.admin) {
        (Some(p), Some(_)) => server::AdminAuth::from_file(p)?,
        (Some(_), None) => {
            anyhow::bail!("--admin-token-file guards the admin listener: give --admin ADDR too")
        }
        (None, Some(a)) if !a.ip().is_loopback() => {
            tracing::warn!(
                "admin listener on {a} without --admin-token-file: it serves metrics to all, \
                 and takes backend-list changes from loopback only"
            );
            Default::default()
        }
        (None, _) => Default::default(),
    };
    // One listening socket per thread on the same port (SO_REUSEPORT, as
    // nginx's `reuseport`): the kernel spreads new connections evenly over
    // the threads, where a shared socket lets whichever thread wakes first
    // take most of them.
    //
    // SO_REUSEPORT would also let a second dispatcher started on the same
    // address share the port silently, taking part of the connections. A
    // plain bind first finds any process already listening there, unless
    // this one takes that one's sockets over (--handover).
    let mut taken = match &args.handover {
        Some(path) => handover::take(path, args.listen)?,
        None => None,
    };
    let local = match &taken {
        Some(_) => args.listen,
        None => match std::net::TcpListener::bind(args.listen) {
            Ok(probe) => probe.local_addr()?,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => anyhow::bail!(
                "{} is in use: another process (perhaps another shoal dispatch) listens there; \
                 stop it, give another --listen, or take its place with the --handover path it was started with",
                args.listen
            ),
            Err(e) => return Err(e).with_context(|| format!("listening on {}", args.listen)),
        },
    };
    let inherited = taken
        .as_mut()
        .map(|t| std::mem::take(&mut t.listeners))
        .unwrap_or_default();
    let mut per_thread = Bound::spread(inherited, threads, local)?;
    let listener = per_thread.remove(0);
    let more = per_thread;
    // The sockets this dispatcher offers its own successor.
    let offered: Vec<std::os::fd::OwnedFd> = match &args.handover {
        Some(_) => listener
            .iter()
            .chain(more.iter().flatten())
            .map(Bound::dup)
            .collect::<std::io::Result<_>>()?,
        None => Vec::new(),
    };
    let admin = match args.admin {
        Some(a) => match taken.as_mut().and_then(|t| t.admin.take()) {
            Some((at, l)) if at == a => Some(l),
            _ => {
                let l = std::net::TcpListener::bind(a)
                    .with_context(|| format!("admin listener on {a}"))?;
                l.set_nonblocking(true)?;
                Some(l)
            }
        },
        None => None,
    };
    // Each client connection may hold a backend connection too.
    let max_connections = match args.max_connections {
        Some(0) => anyhow::bail!("--max-connections must be at least 1"),
        Some(n) => n,
        None => nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(1024, |(soft, _)| soft.saturating_sub(256) / 2)
            .max(64),
    };
    metrics
        .connections_max
        .store(max_connections, std::sync::atomic::Ordering::Relaxed);
    let opts = server::ConnOpts {
        header_timeout: args.header_timeout,
        idle_timeout: args.idle_timeout,
        max_header_bytes: args.max_header_bytes,
        max_connections,
    };
    // Every event loop is built, and the CPUs checked, before any serves,
    // so that a failure is reported here rather than from a thread.
    // Thread 0 pins itself last: the others start from its affinity, so a
    // thread that fails to pin itself stays unpinned, not on thread 0's CPU.
    let cpus = thread_cpus(&args.cpu_affinity)?;
    let main_loop = event_loop()?;
    let stop = tokio_util::sync::CancellationToken::new();
    // Each thread reports once it is pinned and listening, so that the
    // "listening" line below means every thread accepts.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    for (w, l) in (1..threads).zip(more) {
        let rt = event_loop()?;
        let (sh, opts, clock) = (shared.clone(), opts.clone(), clock.clone());
        let stop = stop.clone();
        let cpus = cpus.clone();
        let ready = ready_tx.clone();
        std::thread::Builder::new()
            .name(format!("dispatch-{w}"))
            .spawn(move || {
                pool::set_worker(w);
                if let Err(e) = pin_worker(&cpus, w) {
                    tracing::warn!("{e:#}; thread {w} runs unpinned");
                }
                rt.block_on(async move {
                    match Bound::listen_all(l) {
                        Ok(l) => {
                            let _ = ready.send(Ok(()));
                            serve_all(l, sh, opts, clock, stop).await;
                            // Serve the connections still finishing until
                            // the process exits.
                            std::future::pending::<()>().await
                        }
                        Err(e) => {
                            let _ = ready.send(Err(format!("dispatcher thread {w}: {e}")));
                        }
                    }
                })
            })
            .context("starting a dispatcher thread")?;
    }
    drop(ready_tx);
    for _ in 1..threads {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => anyhow::bail!("{e}"),
            Err(_) => anyhow::bail!("a dispatcher thread stopped while starting"),
        }
    }
    pin_worker(&cpus, 0)?;
    main_loop.block_on(async move {
        let listener = Bound::listen_all(listener)?;
        tokio::spawn(pool::sweep_task(backends.clone(), pool_opts.idle_ms));
        let offered_admin = match (&admin, args.handover.is_some()) {
            (Some(l), true) => Some((
                l.local_addr()?,
                std::os::fd::AsFd::as_fd(l).try_clone_to_owned()?,
            )),
            _ => None,
        };
        let (admin, admin_task) = match admin {
            Some(l) => {
                let l = tokio::net::TcpListener::from_std(l)?;
                let addr = l.local_addr()?;
                let task = tokio::spawn(server::serve_admin(
                    l,
                    backends.clone(),
                    metrics.clone(),
                    admin_auth.clone(),
                    fed.clone(),
                ));
                (Some(addr), Some(task))
            }
            None => (None, None),
        };
        // Every socket accepts now: take the handover path over (for the
        // next upgrade), then let the old dispatcher go.
        let handover = match &args.handover {
            Some(p) => Some(handover::Server::bind(p)?),
            None => None,
        };
        // SIGHUP reopens the access log; handled from before the first
        // request (its default action would end the process).
        if shared.access_log.is_some() {
            let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                .context("handling SIGHUP for the access log")?;
            tokio::spawn(reopen_on_sighup(shared.clone(), hup));
        }
        if let Some(t) = taken {
            let pid = t.release()?;
            tracing::info!("took over {local} from pid {pid}, which now drains");
        }
        tokio::spawn(clock.clone().run());
        tokio::spawn(server::health_task(
            backends.clone(),
            server::HealthCheck {
                timeout: args.connect_timeout,
                path: args.health_path.clone(),
            },
            args.health_interval
                .or(args.health_path.as_ref().map(|_| Duration::from_secs(2))),
        ));
        if let Some((target, version)) = follow {
            let fed = fed.clone().expect("made when following");
            tokio::spawn(federation::inventory_loop(fed.clone(), backends.clone()));
            tokio::spawn(follow::run(
                target,
                backends.clone(),
                local.to_string(),
                version,
                fed,
            ));
        }
        {
            let mut out = std::io::stdout().lock();
            let _ = match admin {
                Some(a) => writeln!(
                    out,
                    "shoal dispatch listening on http://{local} admin http://{a} algo {}",
                    args.select.algo
                ),
                None => writeln!(
                    out,
                    "shoal dispatch listening on http://{local} algo {}",
                    args.select.algo
                ),
            };
            let _ = out.flush();
        }
        let handed_over = async {
            match &handover {
                Some(h) => {
                    h.offer(
                        local,
                        &offered,
                        offered_admin.as_ref().map(|(a, fd)| (*a, fd)),
                    )
                    .await
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = serve_all(listener, shared.clone(), opts, clock, stop.clone()) => {}
            _ = shutdown_signal() => {}
            _ = handed_over => {
                if let Some(t) = &admin_task {
                    t.abort();
                }
            }
        }
        // Close this process's last hold on the listening sockets so that,
        // unless a successor holds them, new connections are refused.
        drop(offered);
        drop(offered_admin);
        drop(handover);
        drain(&stop, &shared, args.shutdown_timeout).await;
        if let Some(l) = &shared.access_log {
            l.flush();
        }
        Ok(())
    })
}

/// A proxy listening socket before its thread's event loop listens on it.
enum Bound {
    /// Bound here (SO_REUSEPORT); listening starts in the thread.
    Fresh(tokio::net::TcpSocket),
    /// Taken over from a running dispatcher, already listening.
    Taken(std::net::TcpListener),
}

impl Bound {
    /// The sockets of each of `threads` threads: those taken over dealt out
    /// in turn (a thread may get several when the old dispatcher ran more
    /// threads: none may be left unserved, its backlog would strand), and
    /// fresh ones in the same SO_REUSEPORT group for threads left without.
    fn spread(
        taken: Vec<std::net::TcpListener>,
        threads: usize,
        local: SocketAddr,
    ) -> anyhow::Result<Vec<Vec<Bound>>> {
        let mut out: Vec<Vec<Bound>> = (0..threads).map(|_| Vec::new()).collect();
        for (i, l) in taken.into_iter().enumerate() {
            out[i % threads].push(Bound::Taken(l));
        }
        for (w, socks) in out.iter_mut().enumerate() {
            if socks.is_empty() {
                socks.push(Bound::Fresh(reuseport_socket(local).with_context(
                    || format!("listening on {local} for dispatcher thread {w}"),
                )?));
            }
        }
        Ok(out)
    }

    fn dup(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd;
        match self {
            Bound::Fresh(s) => s.as_fd().try_clone_to_owned(),
            Bound::Taken(l) => l.as_fd().try_clone_to_owned(),
        }
    }

    /// Listens on each (inside the thread's event loop).
    fn listen_all(socks: Vec<Bound>) -> std::io::Result<Vec<tokio::net::TcpListener>> {
        socks
            .into_iter()
            .map(|b| match b {
                Bound::Fresh(s) => s.listen(LISTEN_BACKLOG),
                Bound::Taken(l) => tokio::net::TcpListener::from_std(l),
            })
            .collect()
    }
}

/// Serves a thread's listeners until `stop`.
async fn serve_all(
    mut listeners: Vec<tokio::net::TcpListener>,
    sh: Arc<proxy::Shared>,
    opts: server::ConnOpts,
    clock: Clock,
    stop: tokio_util::sync::CancellationToken,
) {
    let last = listeners.pop().expect("every thread has a listener");
    let others: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            let (sh, opts, clock, stop) = (sh.clone(), opts.clone(), clock.clone(), stop.clone());
            tokio::spawn(server::serve_proxy(l, sh, opts, clock, stop))
        })
        .collect();
    server::serve_proxy(last, sh, opts, clock, stop).await;
    for t in others {
        let _ = t.await;
    }
}

/// Stops accepting on every thread and waits, up to `limit`, for the open
/// client connections to finish the requests they serve (each closes after
/// its response, seen by its watchdog's next tick). A second signal ends
/// the wait.
async fn drain(stop: &tokio_util::sync::CancellationToken, sh: &proxy::Shared, limit: Duration) {
    use std::sync::atomic::Ordering::Relaxed;
    sh.stopping.store(true, Relaxed);
    stop.cancel();
    let open = || sh.metrics.connections_open.load(Relaxed);
    tracing::info!(
        "stopping: no new connections; {} open, given up to {limit:?} to finish",
        open()
    );
    let deadline = tokio::time::Instant::now() + limit;
    let second = shutdown_signal();
    tokio::pin!(second);
    while open() > 0 {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            _ = &mut second => {
                tracing::warn!("second signal: stopping with {} connection(s) open", open());
                return;
            }
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!("shutdown timeout: stopping with {} connection(s) open", open());
                return;
            }
        }
    }
    tracing::info!("stopped: every connection finished");
}

/// Reopens the access log on every SIGHUP.
async fn reopen_on_sighup(sh: Arc<proxy::Shared>, mut hup: tokio::signal::unix::Signal) {
    while hup.recv().await.is_some() {
        if let Some(l) = &sh.access_log {
            l.reopen();
        }
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// `shoal route` arguments.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  shoal route --backends a:1,b:1,c:1,d:1 --algo url-hash --hash charsum \\
    /english/prog.htm /english/stat.htm /french/prog.htm /french/stat.htm
  shoal route --service web --dir ./cluster /index.html      # the service's list and settings
  shoal route --dispatcher 127.0.0.1:9090 /index.html         # a running dispatcher, live

The first two forms contact no dispatcher: loads are 0 and the stateful
algorithms (rr, wrr, LARD) start from scratch, seeing the earlier URLs of the
same command. --dispatcher asks a dispatcher's admin listener (its --admin
address) to explain with its own list, loads, ejections and LARD history,
changing nothing.")]
pub struct RouteArgs {
    /// Backends, HOST:PORT[=WEIGHT], comma-separated (nothing is contacted).
    #[arg(long)]
    pub backends: Vec<String>,
    /// Use this service's backend list and dispatch settings (algo,
    /// replicas, hash), read from the manager; they replace --algo,
    /// --replicas and --hash. Needs --dir.
    #[arg(long)]
    pub service: Option<String>,
    /// Manager to read --service from (default: the one the cluster directory records).
    #[arg(long)]
    pub manager: Option<String>,
    /// Cluster directory whose admin certificate authenticates to the manager.
    #[arg(long, env = "SHOAL_DIR")]
    pub dir: Option<std::path::PathBuf>,
    /// Ask the dispatcher whose admin listener is at this address
    /// (HOST:PORT or http://HOST:PORT) to explain with its live state.
    #[arg(long)]
    pub dispatcher: Option<String>,
    /// Selection.
    #[command(flatten)]
    pub select: SelectArgs,
    /// Backends to treat as failed, HOST:PORT, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub down: Vec<String>,
    /// Print JSON, one object per URL in a list.
    #[arg(long)]
    pub json: bool,
    /// URLs or paths to route.
    #[arg(required = true)]
    pub urls: Vec<String>,
}

/// One routing decision as `shoal route --json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Route {
    /// The URL as given.
    pub url: String,
    /// The object name hashed (no query).
    pub object: String,
    /// The algorithm.
    pub algo: String,
    /// Hash function, for hashing algorithms.
    pub hash_fn: Option<String>,
    /// Hash value.
    pub hash: Option<u64>,
    /// Sub-namespace, for url-hash.
    pub sub_namespace: Option<usize>,
    /// Candidate backends in order (the subset, for url-hash).
    pub subset: Vec<String>,
    /// Their requests in flight (0 unless a dispatcher explained).
    pub loads: Vec<u32>,
    /// Unavailable backends (ejected, failed or draining) passed over for
    /// this decision (url-hash: on the walk to the subset).
    #[serde(default)]
    pub skipped: Vec<String>,
    /// The chosen backend.
    pub chosen: Option<String>,
    /// Why.
    pub reason: String,
    /// A federated service's decision: local, fetch or redirect, with
    /// every candidate's terms (only from a live dispatcher).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub federation: Option<shoal_core::federation::Decision>,
}

impl Route {
    /// The decision `e` for `url` over `set`, with backend names.
    fn new(url: &str, e: select::Explanation, set: &BackendSet) -> Self {
        let name = |i: usize| set.get(i).addr().to_string();
        Self {
            url: url.to_string(),
            object: e.object,
            algo: e.algo.to_string(),
            hash_fn: e.hash_fn.map(str::to_string),
            hash: e.hash,
            sub_namespace: e.sub_namespace,
            skipped: e.skipped.iter().map(|&i| name(i)).collect(),
            subset: e.candidates.iter().map(|&i| name(i)).collect(),
            loads: e.loads,
            chosen: e.chosen.map(name),
            reason: e.reason,
            federation: None,
        }
    }
}

/// Where each of `urls` goes in this dispatcher now, with its live loads,
/// health and history; changes nothing (what the admin listener's
/// `POST /route` answers).
pub fn explain_live(
    backends: &Backends,
    urls: &[String],
    fed: Option<&federation::Fed>,
) -> Vec<Route> {
    let t = backends.load();
    let now_ms = backends.clock().now_ms();
    urls.iter()
        .map(|u| {
            let key = RequestKey { target: u, now_ms };
            let mut r = Route::new(u, backends.selector().explain(&key, &t.set), &t.set);
            // A federated service: where the cost model sends it, each
            // candidate with its terms (as from a client on loopback).
            r.federation = fed.and_then(|f| {
                let path = u
                    .find("://")
                    .and_then(|i| u[i + 3..].find('/').map(|j| &u[i + 3 + j..]))
                    .unwrap_or(u);
                f.decide(path, 0.0, false, backends, false).map(|(d, _)| d)
            });
            r
        })
        .collect()
}

/// Explains where each URL goes over `specs` with `select`, in a fresh
/// selector; pure computation, no network.
pub fn explain_offline(
    specs: &[select::BackendSpec],
    select: &SelectArgs,
    down: &[String],
    urls: &[String],
) -> anyhow::Result<Vec<Route>> {
    if specs.is_empty() {
        anyhow::bail!("no backends to route to: the list is empty");
    }
    let set: BackendSet = Pool::new().update(specs)?;
    for d in down {
        let i = set.index_of_addr(d.trim()).with_context(|| {
            format!("--down {d}: not one of the backends; give a HOST:PORT from the list")
        })?;
        set.get(i).set_healthy(false);
    }
    let selector = select::build(&select.config())?;
    Ok(urls
        .iter()
        .map(|u| {
            let key = RequestKey::new(u);
            let e = selector.explain(&key, &set);
            // Stateful algorithms (rr, wrr, LARD) see the earlier URLs.
            let _ = selector.select(&key, &set);
            Route::new(u, e, &set)
        })
        .collect())
}

/// The admin listener's base URL from `--dispatcher`.
fn dispatcher_url(addr: &str) -> String {
    let a = addr.trim().trim_end_matches('/');
    if a.starts_with("http://") || a.starts_with("https://") {
        a.to_string()
    } else {
        format!("http://{a}")
    }
}

/// Explains where each URL goes, from the source the arguments name.
pub async fn explain_routes(args: &RouteArgs) -> anyhow::Result<Vec<Route>> {
    let target = follow::Target::of(
        args.service.as_deref(),
        args.manager.as_deref(),
        args.dir.as_deref(),
    )?;
    let sources = usize::from(!args.backends.is_empty())
        + usize::from(target.is_some())
        + usize::from(args.dispatcher.is_some());
    if sources != 1 {
        anyhow::bail!(
            "give exactly one of --backends HOST:PORT,... (a list), --service NAME (a service's \
             list in the manager) or --dispatcher ADMIN_ADDR (a running dispatcher, live)"
        );
    }
    if let Some(d) = &args.dispatcher {
        if !args.down.is_empty() {
            anyhow::bail!(
                "--down does not apply to --dispatcher: the dispatcher's own health is used"
            );
        }
        let base = dispatcher_url(d);
        let url = format!("{base}/route");
        let resp = reqwest::Client::new()
            .post(&url)
            .json(&args.urls)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .with_context(|| {
                format!(
                    "--dispatcher {d}: no answer at {url}; give the dispatcher's --admin address"
                )
            })?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            anyhow::bail!(
                "--dispatcher {d}: {url} answered {status}: {}; is this a shoal dispatch --admin address?",
                body.trim()
            );
        }
        return resp
            .json()
            .await
            .with_context(|| format!("--dispatcher {d}: reading the answer of {url}"));
    }
    if let Some(t) = target {
        let list = t.fetch().await?;
        let mut select = args.select.clone();
        follow::Target::settings_into(&list, &mut select)?;
        let specs = follow::specs(&list);
        if specs.is_empty() {
            anyhow::bail!(
                "service {}: its backend list (version {}) is empty; no node serves it yet \
                 (see `shoal service show {}`)",
                t.service,
                list.version,
                t.service
            );
        }
        return explain_offline(&specs, &select, &args.down, &args.urls);
    }
    let specs = parse_backends(&args.backends)?;
    explain_offline(&specs, &args.select, &args.down, &args.urls)
}

/// Explains routing decisions.
pub async fn route(args: RouteArgs) -> anyhow::Result<()> {
    let routes = explain_routes(&args).await?;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &routes)?;
        writeln!(out)?;
        return Ok(());
    }
    let live = args.dispatcher.is_some();
    for r in &routes {
        writeln!(out, "{}", r.url)?;
        writeln!(out, "  object        {}", r.object)?;
        writeln!(out, "  algo          {}", r.algo)?;
        if let (Some(f), Some(h)) = (&r.hash_fn, r.hash) {
            writeln!(out, "  hash          {f} = {h}")?;
        }
        if let Some(s) = r.sub_namespace {
            writeln!(out, "  sub-namespace {s}")?;
        }
        if !r.subset.is_empty() {
            let shown: Vec<String> = r
                .subset
                .iter()
                .zip(&r.loads)
                .map(|(b, l)| {
                    if live {
                        format!("{b} ({l} in flight)")
                    } else {
                        b.clone()
                    }
                })
                .collect();
            writeln!(out, "  candidates    {}", shown.join(", "))?;
        }
        if !r.skipped.is_empty() {
            writeln!(
                out,
                "  skipped       {} (unavailable)",
                r.skipped.join(", ")
            )?;
        }
        writeln!(
            out,
            "  chosen        {}",
            r.chosen.as_deref().unwrap_or("(none)")
        )?;
        writeln!(out, "  why           {}", r.reason)?;
        if let Some(d) = &r.federation {
            let where_ = match d.chosen.peer() {
                Some(p) => format!("{} {p}", d.chosen.kind()),
                None => d.chosen.kind().to_string(),
            };
            writeln!(out, "  federation    {where_}: {}", d.reason)?;
            for c in &d.candidates {
                let t = &c.terms;
                let name = match c.placement.peer() {
                    Some(p) => format!("{} {p}", c.placement.kind()),
                    None => c.placement.kind().to_string(),
                };
                writeln!(
                    out,
                    "    {name:<18} t_s {:>9.1} ms = redirection {:.1} + data {:.1} + server {:.1} + net {:.1} + client {:.1}",
                    c.total_ms, t.redirection, t.data, t.server, t.net, t.client
                )?;
            }
        }
    }
    Ok(())
}

/// Runs the dispatch benchmark.
pub async fn bench(args: BenchDispatchArgs) -> anyhow::Result<()> {
    bench::run(args).await
}
