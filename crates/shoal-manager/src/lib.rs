//! shoal-manager: the pool's lookup service (registrations with attributes
//! and leases), the monitor of every node's load, and the HTTPS API.

pub mod api;
pub mod dashboard;
pub mod engine;
pub mod federation;
pub mod job_api;
pub mod jobs;
pub mod logs;
pub mod metrics;
pub mod node_api;
pub mod service_api;
pub mod services;
pub mod state;
pub mod store_identity;
pub mod trust;

use shoal_net::identity::ClusterDir;
use shoal_store::Store;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

/// `shoal manager` arguments.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Example:\n  shoal init --dir /var/lib/shoal\n  shoal manager --dir /var/lib/shoal --listen 127.0.0.1:7400"
)]
pub struct ManagerArgs {
    /// The cluster directory written by `shoal init`.
    #[arg(long, env = "SHOAL_DIR")]
    pub dir: Option<PathBuf>,
    /// Address to listen on (default: `listen` in the directory's config.toml).
    #[arg(long)]
    pub listen: Option<String>,
    /// Lease TTL, e.g. 6s or 1500ms (default: `lease_ttl_secs` in
    /// config.toml, 6 s).
    #[arg(long, alias = "ttl", value_parser = shoal_core::duration::parse_positive_secs)]
    pub lease_ttl: Option<f64>,
    /// Do not answer multicast discovery probes.
    #[arg(long)]
    pub no_discovery: bool,
    /// UDP port for discovery (default: config.toml's `discovery_port`).
    #[arg(long)]
    pub discovery_port: Option<u16>,
    /// Where to serve the read-only dashboard over plain HTTP (keep it on
    /// loopback); `off` disables it. Default 127.0.0.1:7480, skipped with a
    /// warning when that port is taken.
    #[arg(long)]
    pub dashboard: Option<String>,
    /// Where to serve Prometheus metrics (`GET /metrics`) over plain HTTP,
    /// e.g. 127.0.0.1:9400 (keep it on loopback, or scrape `/metrics` on
    /// the HTTPS API with a cluster certificate instead). Off by default.
    #[arg(long)]
    pub metrics: Option<String>,
    /// Start with an empty registry when registry.db is missing, empty or
    /// another cluster's (every service, assignment and node is lost).
    #[arg(long)]
    pub reset_store: bool,
    /// Require this token to open the dashboard: the first line of FILE
    /// (16 or more of A-Z a-z 0-9 . _ ~ -), created with a random one
    /// (mode 0600) when FILE does not exist. A browser opens
    /// http://DASHBOARD/?token=TOKEN once and keeps a cookie; scripts send
    /// `Authorization: Bearer TOKEN`. Without it the dashboard (read-only,
    /// redacted) needs no token.
    #[arg(long)]
    pub dashboard_token_file: Option<PathBuf>,
    /// How long the node certificates issued at join and at rotation live
    /// (2160h, 90 days, by default; at least 10s). Agents ask for a new one
    /// at 70-90 % of it, without joining again.
    #[arg(long, default_value = "2160h", value_parser = shoal_core::duration::parse_positive_duration)]
    pub node_cert_ttl: std::time::Duration,
    /// The overlay's merged view for the dashboard, when the binary that
    /// runs the manager surveys an overlay (`shoal manager --overlay-key`).
    #[arg(skip)]
    pub overlay: OverlayView,
}

/// The overlay's merged view (`shoal_core::overlay::report::PoolView` as
/// JSON), or none, read by the dashboard at each snapshot.
#[derive(Clone, Default)]
pub struct OverlayView(pub Option<Arc<dyn Fn() -> Option<serde_json::Value> + Send + Sync>>);

impl std::fmt::Debug for OverlayView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "OverlayView(surveyed)"
        } else {
            "OverlayView(none)"
        })
    }
}

/// Reads the dashboard token from `path`, or writes a fresh random one
/// there (mode 0600) when the file does not exist.
fn dashboard_token(path: &std::path::Path) -> anyhow::Result<String> {
    if !path.exists() {
        let mut b = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b);
        let t = hex::encode(b);
        shoal_net::identity::write_file(path, &format!("{t}\n"), true)?;
        eprintln!(
            "wrote a new dashboard token to {} (mode 0600)",
            path.display()
        );
        return Ok(t);
    }
    let text = shoal_net::identity::read_file(path)?;
    let t = text.lines().next().unwrap_or("").trim().to_string();
    dashboard::check_token(&t).map_err(|e| {
        anyhow::anyhow!(
            "--dashboard-token-file {}: {e}; write one with `openssl rand -hex 32 > {0}`, or delete the file to have the manager write one",
            path.display()
        )
    })?;
    Ok(t)
}

/// The dashboard's view of every service: details, series, backends and the
/// per-backend load dispatchers reported in the last few seconds.
fn services_view(services: Arc<services::Services>) -> dashboard::ServicesView {
    Arc::new(move || {
        services
            .names()
            .iter()
            .filter_map(|n| {
                let d = services.detail(n).ok()?;
                let mut v = serde_json::to_value(&d).ok()?;
                let loads: serde_json::Map<String, serde_json::Value> = services
                    .backend_loads(n, 5000)
                    .into_iter()
                    .map(|(a, rps, in_flight)| {
                        (a, serde_json::json!({"rps": rps, "in_flight": in_flight}))
                    })
                    .collect();
                v["loads"] = serde_json::Value::Object(loads);
                Some(v)
            })
            .collect()
    })
}

/// Addresses the manager's certificate must name.
fn server_names(listen: &SocketAddr, manager_url: &str) -> Vec<String> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    if listen.ip().is_unspecified() {
        if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
            for a in addrs {
                if let Some(sin) = a.address.as_ref().and_then(|s| s.as_sockaddr_in()) {
                    names.push(sin.ip().to_string());
                }
            }
        }
    } else {
        names.push(listen.ip().to_string());
    }
    if let Some(host) = manager_url
        .split("://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .map(|hp| hp.rsplit_once(':').map(|(h, _)| h).unwrap_or(hp))
    {
        names.push(host.trim_matches(|c| c == '[' || c == ']').to_string());
    }
    if let Ok(h) = nix::unistd::gethostname()
        && let Some(h) = h.to_str()
    {
        names.push(h.to_string());
    }
    names.sort();
    names.dedup();
    names.retain(|n| !n.is_empty());
    names
}

/// Runs the manager until interrupted.
pub async fn run(args: ManagerArgs) -> anyhow::Result<()> {
    // Optional in clap so that its absence names SHOAL_DIR too.
    let Some(dir) = &args.dir else {
        anyhow::bail!(
            "no cluster directory: pass --dir DIR or set SHOAL_DIR=DIR (create one with `shoal init --dir DIR`)"
        );
    };
    let dir = ClusterDir::new(dir);
    let cfg = dir.config()?;
    // One manager per cluster directory: two would each take the other's
    // registry for their own. The overlay, which keeps a host's manager
    // alive, checks this lock before it starts one.
    use shoal_net::identity::files::MANAGER_LOCK;
    let Some(_lock) = shoal_net::identity::try_lock(&dir.path.join(MANAGER_LOCK))? else {
        anyhow::bail!(
            "a manager already runs on {} ({MANAGER_LOCK} is held by another process); stop it first, or give another --dir",
            dir.path.display()
        );
    };
    let listen = args.listen.clone().unwrap_or(cfg.listen.clone());
    let ttl_secs = args.lease_ttl.unwrap_or(cfg.lease_ttl_secs);
    if !(ttl_secs.is_finite() && (0.3..=3600.0).contains(&ttl_secs)) {
        anyhow::bail!("--lease-ttl must be between 0.3 and 3600 seconds, got {ttl_secs}");
    }
    let ttl_ms = (ttl_secs * 1000.0) as u64;
    if args.node_cert_ttl < std::time::Duration::from_secs(10) {
        anyhow::bail!(
            "--node-cert-ttl {:?} is too short: agents need time to rotate; give 10s or more (the default is 2160h, 90 days)",
            args.node_cert_ttl
        );
    }
    let dash_token = args
        .dashboard_token_file
        .as_deref()
        .map(dashboard_token)
        .transpose()?;
    let ca = dir.ca()?;
    shoal_net::identity::make_private_dir(&dir.path)?;
    let metrics = Arc::new(metrics::Metrics::default());
    let store: Arc<dyn Store> = Arc::new(metrics::TimedStore::new(
        Arc::new(store_identity::open(&dir, args.reset_store)?),
        metrics.clone(),
    ));
    // Twice the TTL plus slack: an agent retrying with capped back-off
    // reaches a restarted manager well within it.
    let grace_ms = ttl_ms * 2 + 2000;
    let shell = state::Shell::open(store.clone(), ttl_ms, grace_ms)
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.db_path().display()))?;
    let registry = Arc::new(state::Registry::new(shell.clone()));
    let services = Arc::new(services::Services::new(shell.clone()));
    let trust = Arc::new(trust::Trust::open(
        dir.clone(),
        store.clone(),
        registry.nodes().into_iter().map(|n| n.name),
    )?);

    let listener = shoal_net::server::bind(&listen).await?;
    let local = listener.local_addr()?;
    let (cert, key) = ca.issue_server(&server_names(&local, &cfg.manager_url))?;
    let tls = shoal_net::tls::server_config(&cert, &key, &ca.pem)?;

    metrics.follow_decisions(&registry);
    // Peers are told the URL this manager answers on: the configured one,
    // unless --listen moved it (then the address it listens on).
    let fed_url = match &args.listen {
        Some(_) if !local.ip().is_unspecified() => format!("https://{local}"),
        _ => cfg.manager_url.clone(),
    };
    // Calls to peers leave from the listen address when it is a specific
    // one (a multi-homed host answers peers from where it listens).
    let source = (!local.ip().is_unspecified()).then_some(local.ip());
    let federation = federation::Federation::open(dir.clone(), fed_url, source)?;
    federation.start();
    let ctx = Arc::new(api::Ctx {
        federation: federation.clone(),
        registry: registry.clone(),
        ca,
        trust: trust.clone(),
        services: services.clone(),
        metrics: metrics.clone(),
        logs: Default::default(),
        node_cert_ttl: args.node_cert_ttl,
        jobs: Arc::new(
            jobs::Jobs::open(store.clone(), registry.clone())
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        ),
    });
    let mut metrics_url = None;
    if let Some(addr) = &args.metrics {
        let l = shoal_net::server::bind(addr)
            .await
            .map_err(|e| e.context("--metrics"))?;
        metrics_url = Some(format!("http://{}/metrics", l.local_addr()?));
        tokio::spawn(shoal_net::server::serve_plain(
            l,
            api::metrics_router(ctx.clone()),
        ));
    }
    let router = api::router(ctx);

    let dash_addr = match args.dashboard.as_deref() {
        Some("off") => None,
        Some(a) => Some((a.to_string(), true)),
        None => Some(("127.0.0.1:7480".to_string(), false)),
    };
    let mut dashboard_url = None;
    if let Some((addr, explicit)) = dash_addr {
        match shoal_net::server::bind(&addr).await {
            Ok(l) => {
                let at = l.local_addr()?;
                dashboard_url = Some(format!("http://{at}/"));
                if !at.ip().is_loopback() {
                    if dash_token.is_some() {
                        eprintln!(
                            "warning: the dashboard at http://{at}/ is reachable from other machines over plain HTTP: its token and the pool it shows cross the network unencrypted; bind it to 127.0.0.1 and reach it through an SSH tunnel unless the network is trusted"
                        );
                    } else {
                        eprintln!(
                            "warning: the dashboard at http://{at}/ is reachable from other machines without authentication; it shows no secrets, but it shows the whole pool: bind it to 127.0.0.1 (--dashboard 127.0.0.1:7480), or require a token with --dashboard-token-file, unless that is what you want"
                        );
                    }
                }
                let mut names = server_names(&at, &cfg.manager_url);
                names.push("::1".into());
                let r = dashboard::router(
                    registry.clone(),
                    services_view(services.clone()),
                    args.overlay.clone(),
                    Some({
                        let f = federation.clone();
                        Arc::new(move || {
                            let st = f.status();
                            (!st.peers.is_empty())
                                .then(|| serde_json::to_value(st).unwrap_or_default())
                        }) as dashboard::FederationView
                    }),
                    names,
                    at.port(),
                    dash_token.clone(),
                );
                tokio::spawn(shoal_net::server::serve_plain(l, r));
            }
            Err(e) if explicit => return Err(e.context("--dashboard")),
            Err(e) => eprintln!("dashboard disabled: {e:#} (pass --dashboard ADDR)"),
        }
    }

    tokio::spawn(engine::run(shell.clone()));

    if !args.no_discovery {
        let port = args.discovery_port.unwrap_or(cfg.discovery_port);
        let trust = trust.clone();
        tokio::spawn(async move {
            let url_for = move |peer: SocketAddr| {
                let ip: IpAddr = if local.ip().is_unspecified() {
                    shoal_net::discovery::local_ip_towards(peer.ip()).unwrap_or(local.ip())
                } else {
                    local.ip()
                };
                format!("https://{}", SocketAddr::new(ip, local.port()))
            };
            if let Err(e) =
                shoal_net::discovery::respond(move |id| trust.discovery_key(id), port, url_for)
                    .await
            {
                tracing::warn!("{e:#}");
            }
        });
    }

    println!(
        "shoal manager listening on https://{local} (lease TTL {ttl_secs} s, {} registrations restored)",
        registry.len()
    );
    if let Some(u) = &dashboard_url {
        match &args.dashboard_token_file {
            Some(f) => println!(
                "dashboard (read-only) at {u} (token required: open {u}?token=TOKEN once, TOKEN being the first line of {})",
                f.display()
            ),
            None => println!("dashboard (read-only) at {u}"),
        }
    }
    if let Some(u) = &metrics_url {
        println!("metrics at {u}");
    }
    tokio::select! {
        _ = shoal_net::server::serve_tls(listener, tls, router) => {}
        _ = shutdown_signal() => {
            shell.flush();
            println!("shoal manager stopping");
        }
    }
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("signal handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
