//! shoal-manager: the pool's lookup service (registrations with attributes
//! and leases), the monitor of every node's load, and the HTTPS API.

pub mod api;
pub mod dashboard;
pub mod engine;
pub mod monitor;
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
use std::time::Duration;

/// `shoal manager` arguments.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Example:\n  shoal init --dir /var/lib/shoal\n  shoal manager --dir /var/lib/shoal --listen 127.0.0.1:7400"
)]
pub struct ManagerArgs {
    /// The cluster directory written by `shoal init`.
    #[arg(long, env = "SHOAL_DIR")]
    pub dir: PathBuf,
    /// Address to listen on (default: `listen` in the directory's config.toml).
    #[arg(long)]
    pub listen: Option<String>,
    /// Lease TTL in seconds (default: `lease_ttl_secs` in config.toml, 6).
    #[arg(long)]
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
    /// Start with an empty registry when registry.db is missing, empty or
    /// another cluster's (every service, assignment and node is lost).
    #[arg(long)]
    pub reset_store: bool,
}

/// The dashboard's view of every service: details, series, backends and the
/// per-backend load dispatchers reported in the last few seconds.
fn services_view(services: Arc<services::Services>) -> dashboard::ServicesView {
    Arc::new(move || {
        let names: Vec<String> = services.lock().keys().cloned().collect();
        names
            .iter()
            .filter_map(|n| {
                let d = services.detail(n).ok()?;
                let mut v = serde_json::to_value(&d).ok()?;
                let mut loads = serde_json::Map::new();
                if let Some(s) = services.lock().get(n) {
                    for r in s.reports.values() {
                        if r.at.elapsed() > Duration::from_secs(5) {
                            continue;
                        }
                        for b in &r.report.backends {
                            let e = loads
                                .entry(b.address.clone())
                                .or_insert_with(|| serde_json::json!({"rps": 0.0, "in_flight": 0}));
                            e["rps"] = (e["rps"].as_f64().unwrap_or(0.0) + b.rps).into();
                            e["in_flight"] =
                                (e["in_flight"].as_u64().unwrap_or(0) + b.in_flight as u64).into();
                        }
                    }
                }
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
    let dir = ClusterDir::new(&args.dir);
    let cfg = dir.config()?;
    let listen = args.listen.clone().unwrap_or(cfg.listen.clone());
    let ttl_secs = args.lease_ttl.unwrap_or(cfg.lease_ttl_secs);
    if !(ttl_secs.is_finite() && (0.3..=3600.0).contains(&ttl_secs)) {
        anyhow::bail!("--lease-ttl must be between 0.3 and 3600 seconds, got {ttl_secs}");
    }
    let ttl_ms = (ttl_secs * 1000.0) as u64;
    let ca = dir.ca()?;
    shoal_net::identity::make_private_dir(&dir.path)?;
    let store: Arc<dyn Store> = Arc::new(store_identity::open(&dir, args.reset_store)?);
    // Twice the TTL plus slack: an agent retrying with capped back-off
    // reaches a restarted manager well within it.
    let grace_ms = ttl_ms * 2 + 2000;
    let registry = Arc::new(state::Registry::open(store.clone(), ttl_ms, grace_ms)?);
    let trust = Arc::new(trust::Trust::open(
        dir.clone(),
        store.clone(),
        registry.nodes().into_iter().map(|n| n.name),
    )?);

    let services = Arc::new(services::Services::open(store)?);

    let listener = shoal_net::server::bind(&listen).await?;
    let local = listener.local_addr()?;
    let (cert, key) = ca.issue_server(&server_names(&local, &cfg.manager_url))?;
    let tls = shoal_net::tls::server_config(&cert, &key, &ca.pem)?;

    let ctx = Arc::new(api::Ctx {
        registry: registry.clone(),
        ca,
        trust: trust.clone(),
        services: services.clone(),
    });
    let router = api::router(ctx);

    // Lease expiry: a tick of 100 ms bounds detection at TTL + 0.1 s.
    let reg2 = registry.clone();
    tokio::spawn(async move {
        let mut t = tokio::time::interval(Duration::from_millis(100));
        loop {
            t.tick().await;
            for n in reg2.expire() {
                tracing::warn!(node = %n, "lease expired: node failed");
            }
        }
    });

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
                    eprintln!(
                        "warning: the dashboard at http://{at}/ is reachable from other machines without authentication; it shows no secrets, but it shows the whole pool: bind it to 127.0.0.1 (--dashboard 127.0.0.1:7480) unless that is what you want"
                    );
                }
                let mut names = server_names(&at, &cfg.manager_url);
                names.push("::1".into());
                let r = dashboard::router(
                    registry.clone(),
                    services_view(services.clone()),
                    names,
                    at.port(),
                );
                tokio::spawn(shoal_net::server::serve_plain(l, r));
            }
            Err(e) if explicit => return Err(e.context("--dashboard")),
            Err(e) => eprintln!("dashboard disabled: {e:#} (pass --dashboard ADDR)"),
        }
    }

    tokio::spawn(engine::run(registry.clone(), services));

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
        println!("dashboard (read-only) at {u}");
    }
    tokio::select! {
        _ = shoal_net::server::serve_tls(listener, tls, router) => {}
        _ = shutdown_signal() => {
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
