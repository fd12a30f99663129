//! shoal-agent: one per machine. It joins the pool with the cluster token,
//! holds a lease, reports the node's load with every renewal, and runs the
//! applications the manager assigns through adaptors.

pub mod adaptor;
pub mod bsp;
pub mod dps;
pub mod load;
pub mod platform;
pub mod shaper;
pub mod www;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use shoal_core::lease::{backoff_ms, renew_interval_ms};
use shoal_net::client::{ApiClient, ApiError};
use shoal_net::identity::{Token, read_file, validate_node_name, write_file};
use shoal_net::wire::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::watch;

/// `shoal agent` arguments.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Examples:\n  shoal token create --dir /var/lib/shoal --ttl 1h --uses 1 > /root/join.token\n  shoal agent --join https://10.0.0.1:7400 --token-file /root/join.token --name web1 --roles web\n  SHOAL_TOKEN=shoal1.... shoal agent --discover --name web2"
)]
pub struct AgentArgs {
    /// The manager's URL (not needed with --discover, or once joined).
    #[arg(long)]
    pub join: Option<String>,
    /// Find the manager by multicast discovery instead of --join.
    #[arg(long)]
    pub discover: bool,
    /// The join token (needed on the first start only). Prefer
    /// --token-file or SHOAL_TOKEN: a command line is visible to every user
    /// of the machine (ps, /proc/PID/cmdline).
    #[arg(long, env = "SHOAL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A file whose first line is the join token (keep it mode 0600);
    /// wins over --token and SHOAL_TOKEN.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// This node's name (default: the one recorded at join).
    #[arg(long)]
    pub name: Option<String>,
    /// Roles, comma-separated (default: the ones recorded at the last start).
    #[arg(long, value_delimiter = ',')]
    pub roles: Vec<String>,
    /// Capacities, NAME=NUMBER (repeatable), e.g. net_mbps=100.
    #[arg(long = "capacity", value_parser = parse_capacity)]
    pub capacities: Vec<(String, f64)>,
    /// The address at which this node's apps are reachable (default: the
    /// one recorded at the last start; at the first, the local address used
    /// to reach the manager or, when the manager is on loopback, a loopback
    /// address of this node's own, 127.X.Y.Z from its name, so that agents
    /// sharing a host do not collide).
    #[arg(long)]
    pub address: Option<String>,
    /// The agent's directory: identity and app directories.
    #[arg(long, default_value = "./shoal-agent")]
    pub dir: PathBuf,
    /// UDP port for discovery.
    #[arg(long, default_value_t = shoal_net::discovery::DEFAULT_PORT)]
    pub discovery_port: u16,
    /// How long to look for a manager with --discover (e.g. 10s, 500ms).
    #[arg(long, default_value = "10s", value_parser = shoal_core::duration::parse_positive_secs)]
    pub discover_timeout: f64,
    /// Set once the manager accepted the registration (the overlay's
    /// health check of a new release, when the agent runs beside a peer).
    #[arg(skip)]
    pub registered: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// This node's capacity C for DPS shares of parallel jobs, CPUs
    /// (default: its CPUs less 5 % overhead).
    #[arg(long, value_name = "CPUS")]
    pub dps_capacity: Option<f64>,
    /// Shape and measure the apps' egress on this device with tc htb
    /// classes (services with a `[bandwidth]` total; see docs/bandwidth.md),
    /// e.g. eth0. Needs CAP_NET_ADMIN.
    #[arg(long, value_name = "DEV")]
    pub shape_dev: Option<String>,
}

fn parse_capacity(s: &str) -> Result<(String, f64), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("capacity {s:?} must be NAME=NUMBER, e.g. net_mbps=100"))?;
    let n: f64 = v
        .parse()
        .map_err(|_| format!("capacity {k} must be a number, got {v:?}"))?;
    if !n.is_finite() || n < 0.0 {
        return Err(format!("capacity {k} must be >= 0, got {v}"));
    }
    Ok((k.to_string(), n))
}

/// What the agent remembers about its membership (agent.toml).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Membership {
    name: String,
    manager_url: String,
    /// The roles of the last registration, kept for a restart without
    /// --roles (absent in files written before they were recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    roles: Option<Vec<String>>,
    /// The address of the last registration, likewise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    address: Option<String>,
}

struct Identity {
    membership: Membership,
    ca: String,
    cert: String,
    key: String,
}

/// Files of a rotation in progress: the new key and certificate are
/// written beside the current ones, then renamed over them, key first.
const NEXT_KEY: &str = "node.next.key";
const NEXT_CERT: &str = "node.next.pem";

/// Saves a rotated key and certificate so that a crash at any point leaves
/// a matching pair: the old one, or the new one once its certificate is
/// written (finished by [`finish_rotation`] at the next start). The manager
/// accepts the old certificate until the new one is used, so falling back
/// to it is safe.
fn save_rotated(dir: &Path, key: &str, cert: &str) -> anyhow::Result<()> {
    write_file(&dir.join(NEXT_KEY), key, true)?;
    write_file(&dir.join(NEXT_CERT), cert, false)?;
    finish_rotation(dir)
}

/// Completes a rotation a crash interrupted, or drops one whose
/// certificate never arrived.
fn finish_rotation(dir: &Path) -> anyhow::Result<()> {
    let (nk, nc) = (dir.join(NEXT_KEY), dir.join(NEXT_CERT));
    let mv = |from: &Path, to: &str| {
        std::fs::rename(from, dir.join(to))
            .with_context(|| format!("cannot move {} to {to}", from.display()))
    };
    if nc.exists() {
        if nk.exists() {
            mv(&nk, "node.key")?;
        }
        mv(&nc, "node.pem")?;
    } else if nk.exists() {
        let _ = std::fs::remove_file(&nk);
    }
    Ok(())
}

fn load_identity(dir: &Path) -> anyhow::Result<Option<Identity>> {
    let m = dir.join("agent.toml");
    if !m.exists() {
        return Ok(None);
    }
    finish_rotation(dir)?;
    let membership: Membership = toml::from_str(&read_file(&m)?).with_context(|| {
        format!(
            "{}: invalid; delete the agent directory to join again",
            m.display()
        )
    })?;
    Ok(Some(Identity {
        membership,
        ca: read_file(&dir.join("ca.pem"))?,
        cert: read_file(&dir.join("node.pem"))?,
        key: read_file(&dir.join("node.key"))?,
    }))
}

/// Asks the manager, as the node whose agent directory is `dir`, for a
/// deploy token admitting node `node` (the host this node's overlay peer is
/// deploying): single-use, ten minutes, no more roles than this node's.
pub async fn deploy_token(dir: &Path, node: &str) -> anyhow::Result<String> {
    let id = load_identity(dir)?.with_context(|| {
        format!(
            "{} holds no node identity yet (this agent has not joined), so it cannot ask for a deploy token",
            dir.display()
        )
    })?;
    let client = ApiClient::new(
        &id.membership.manager_url,
        &id.ca,
        Some((&id.cert, &id.key)),
    )?;
    let r: shoal_net::wire::DeployTokenResponse = client
        .post(
            &format!("/v1/nodes/{}/deploy-token", id.membership.name),
            &shoal_net::wire::DeployTokenRequest {
                node: node.to_string(),
            },
        )
        .await?;
    Ok(r.token)
}

async fn find_manager(args: &AgentArgs, token: Option<&Token>) -> anyhow::Result<String> {
    if let Some(u) = &args.join {
        return Ok(u.clone());
    }
    if args.discover {
        let token = token.context("--discover needs the token (--token-file, SHOAL_TOKEN or --token): the manager only answers probes keyed with it")?;
        let url = shoal_net::discovery::discover(
            token,
            args.discovery_port,
            Duration::from_secs_f64(args.discover_timeout),
        )
        .await?;
        eprintln!("discovered the manager at {url}");
        return Ok(url);
    }
    anyhow::bail!("no manager given: pass --join URL or --discover")
}

async fn join_or_load(args: &AgentArgs) -> anyhow::Result<Identity> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create the agent directory {}", args.dir.display()))?;
    // It holds the node's key and its apps' secrets.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&args.dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot make {} private (mode 0700)", args.dir.display()))?;
    }
    let token = match &args.token_file {
        Some(f) => Some(Token::parse(&read_file(f).with_context(|| {
            "--token-file: cannot read the join token; copy it from `shoal token create` on the manager's machine"
        })?)?),
        None => args.token.as_deref().map(Token::parse).transpose()?,
    };
    if let Some(mut id) = load_identity(&args.dir)? {
        if let Some(n) = &args.name
            && *n != id.membership.name
        {
            anyhow::bail!(
                "{} belongs to node {:?}, not {n:?}; use another --dir for another node",
                args.dir.display(),
                id.membership.name
            );
        }
        if args.join.is_some() || args.discover {
            // Recorded only once the manager there has accepted this node's
            // registration (see `run`): a wrong URL must not replace the
            // right one.
            id.membership.manager_url = find_manager(args, token.as_ref()).await?;
        }
        return Ok(id);
    }
    let name = args
        .name
        .clone()
        .context("--name is required on the first start")?;
    validate_node_name(&name).map_err(anyhow::Error::msg)?;
    let token = token.context(
        "a join token is required to join: pass --token-file FILE or set SHOAL_TOKEN (create one with `shoal token create --dir DIR` on the manager's machine)",
    )?;
    let url = find_manager(args, Some(&token)).await?;
    let (ca, key, cert) = shoal_net::client::join(&url, &token, &name, &args.roles).await?;
    write_file(&args.dir.join("ca.pem"), &ca, false)?;
    write_file(&args.dir.join("node.key"), &key, true)?;
    write_file(&args.dir.join("node.pem"), &cert, false)?;
    let membership = Membership {
        name,
        manager_url: url,
        roles: None,
        address: None,
    };
    write_file(
        &args.dir.join("agent.toml"),
        &toml::to_string(&membership)?,
        false,
    )?;
    eprintln!("joined the cluster as {}", membership.name);
    Ok(Identity {
        membership,
        ca,
        cert,
        key,
    })
}

fn default_address(manager_url: &str) -> String {
    let host = manager_url
        .split("://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .and_then(|hp| hp.parse::<std::net::SocketAddr>().ok());
    match host {
        Some(sa) if sa.ip().is_loopback() => sa.ip().to_string(),
        Some(sa) => shoal_net::discovery::local_ip_towards(sa.ip())
            .map(|ip| ip.to_string())
            .unwrap_or_else(|| "127.0.0.1".into()),
        None => "127.0.0.1".into(),
    }
}

/// A loopback address of a node's own, from its name: 127.X.Y.Z with X in
/// 1..=254 (never 127.0.0.x, where the manager and hand-run services
/// usually listen) and Z in 1..=254, so that agents sharing a host each
/// register an address of their own. FNV-1a, so it stays the same across
/// builds and platforms.
pub fn loopback_address_for(name: &str) -> std::net::Ipv4Addr {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    let [a, b, c, _] = h.to_be_bytes();
    std::net::Ipv4Addr::new(127, 1 + a % 254, b, 1 + c % 254)
}

/// The address to register: --address, else the one recorded, else the
/// address towards the manager, or a loopback address of the node's own
/// when the manager is on loopback.
fn choose_address(args: &AgentArgs, m: &Membership) -> String {
    if let Some(a) = &args.address {
        return a.clone();
    }
    if let Some(a) = &m.address {
        return a.clone();
    }
    let a = default_address(&m.manager_url);
    match a.parse::<std::net::IpAddr>() {
        Ok(ip) if ip.is_loopback() => {
            let own = loopback_address_for(&m.name).to_string();
            eprintln!(
                "no --address and the manager is on loopback: {} registers {own}, a loopback address of its own, so that agents on one host do not collide (pass --address to choose)",
                m.name
            );
            own
        }
        _ => a,
    }
}

/// Runs the agent until interrupted.
pub async fn run(mut args: AgentArgs) -> anyhow::Result<()> {
    // Absolute, so that the paths rendered into app configurations (nginx's
    // pid, conf and logs) do not depend on the directory an app runs in.
    args.dir = std::path::absolute(&args.dir)
        .with_context(|| format!("the agent directory {}", args.dir.display()))?;
    let id = join_or_load(&args).await?;
    let name = id.membership.name.clone();
    let client = ApiClient::new(
        &id.membership.manager_url,
        &id.ca,
        Some((&id.cert, &id.key)),
    )?;
    // Every task takes the current client from here: a rotated certificate
    // replaces it.
    let (client_tx, clients) = watch::channel(client);
    let mut capacities: BTreeMap<String, f64> = BTreeMap::new();
    capacities.insert(
        "cpus".into(),
        std::thread::available_parallelism()
            .map(|n| n.get() as f64)
            .unwrap_or(1.0),
    );
    capacities.extend(args.capacities.iter().cloned());
    let reg = Registration {
        name: name.clone(),
        address: choose_address(&args, &id.membership),
        roles: if args.roles.is_empty() {
            id.membership.roles.clone().unwrap_or_default()
        } else {
            args.roles.clone()
        },
        capacities,
    };
    // What agent.toml records once the manager has accepted it.
    let record = Membership {
        name: name.clone(),
        manager_url: id.membership.manager_url.clone(),
        roles: Some(reg.roles.clone()),
        address: Some(reg.address.clone()),
    };
    let record_path = args.dir.join("agent.toml");
    let flag = args.registered.clone();
    let mut on_registered = move || -> anyhow::Result<()> {
        if let Some(f) = &flag {
            f.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let text = toml::to_string(&record)?;
        if read_file(&record_path).ok().as_deref() != Some(text.as_str()) {
            write_file(&record_path, &text, false)?;
        }
        Ok(())
    };

    // L(t) every 2 s, the paper's sampling period.
    let (load_tx, load_rx) = watch::channel(None::<LoadSample>);
    tokio::task::spawn_blocking(move || {
        let mut s = load::LoadSampler::new();
        loop {
            match s.sample() {
                Ok(x) => {
                    if load_tx.send(Some(x)).is_err() {
                        return;
                    }
                }
                Err(e) => tracing::warn!("load sample: {e}"),
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    });

    let mut sup = adaptor::Supervisor::new(args.dir.join("apps"), name.clone());
    let dps_capacity = args.dps_capacity.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64) * 0.95
    });
    let dps = tokio::spawn(dps::agent_loop(
        clients.clone(),
        name.clone(),
        args.dir.join("apps"),
        dps_capacity,
    ));
    let logs = tokio::spawn(serve_logs(
        clients.clone(),
        name.clone(),
        args.dir.join("apps"),
    ));
    let rotation = tokio::spawn(rotate_loop(
        args.dir.clone(),
        name.clone(),
        id.membership.manager_url.clone(),
        id.ca.clone(),
        id.cert.clone(),
        client_tx,
    ));
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut shaper = args
        .shape_dev
        .as_deref()
        .map(|dev| shaper::Shaper::new(dev, Vec::new()));
    tokio::select! {
        r = lease_loop(&clients, &reg, load_rx, &mut sup, shaper.as_mut(), &mut on_registered) => r?,
        _ = shutdown() => {}
        _ = hup.recv() => {
            // A restart in place: the same pid, so the apps stay its
            // children, and the next run re-adopts them; the lease is
            // renewed under the same identity well within its TTL.
            use std::os::unix::process::CommandExt;
            let bin = std::env::current_exe()?;
            eprintln!("agent {name}: SIGHUP, re-executing {} in place; apps keep running", bin.display());
            let e = std::process::Command::new(&bin).args(std::env::args_os().skip(1)).exec();
            anyhow::bail!("cannot re-execute {}: {e}", bin.display());
        }
    }
    logs.abort();
    rotation.abort();
    dps.abort();
    sup.stop_all().await;
    if let Some(s) = shaper.as_mut()
        && let Err(e) = s.teardown().await
    {
        tracing::warn!("shaper: {e}");
    }
    eprintln!("agent {name} stopped");
    Ok(())
}

/// Rotates the node's certificate at 70-90 % of its lifetime (kubelet's
/// client certificate rotation): a new key, a CSR signed with the current
/// certificate, the new pair saved, and every task switched to it. The
/// manager accepts the old certificate until the new one is first used.
async fn rotate_loop(
    dir: PathBuf,
    name: String,
    url: String,
    ca: String,
    mut cert: String,
    clients: watch::Sender<ApiClient>,
) {
    let mut attempt: u32 = 0;
    loop {
        let Some((nb, na)) = shoal_net::identity::cert_validity_ms(&cert) else {
            tracing::warn!("cannot read node.pem's validity; no rotation");
            return;
        };
        // One jitter per certificate; the wait in steps of at most an hour
        // follows the wall clock (a suspended machine, a clock set right)
        // and stays far below tokio's longest timer.
        let due = shoal_core::trust::rotation_due_ms(nb, na, rand::random());
        loop {
            let now = unix_ms();
            if now >= due {
                break;
            }
            tokio::time::sleep(Duration::from_millis((due - now).min(3_600_000))).await;
        }
        match rotate_once(&dir, &name, &url, &ca, &clients).await {
            Ok(new) => {
                attempt = 0;
                cert = new;
            }
            Err(e) => {
                // Retry well before expiry: a tenth of what is left, capped.
                let left = na.saturating_sub(unix_ms());
                let wait = backoff_ms(
                    attempt,
                    1000,
                    (left / 10).clamp(1000, 300_000),
                    rand::random(),
                );
                attempt = attempt.saturating_add(1);
                eprintln!("cannot rotate the node certificate: {e:#}; retrying in {wait} ms");
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
        }
    }
}

async fn rotate_once(
    dir: &Path,
    name: &str,
    url: &str,
    ca: &str,
    clients: &watch::Sender<ApiClient>,
) -> anyhow::Result<String> {
    let (key, csr_pem) = shoal_net::identity::node_key_and_csr(name)?;
    let client = clients.borrow().clone();
    let r: JoinResponse = client
        .post(
            &format!("/v1/nodes/{name}/certificate"),
            &CertRequest { csr_pem },
        )
        .await?;
    save_rotated(dir, &key, &r.cert_pem)?;
    let next = ApiClient::new(url, ca, Some((&r.cert_pem, &key)))?;
    clients.send_replace(next);
    let left = shoal_net::identity::cert_validity_ms(&r.cert_pem)
        .map(|(_, na)| format!("{} s", na.saturating_sub(unix_ms()) / 1000))
        .unwrap_or("?".into());
    eprintln!("rotated the node certificate (the new one is valid for {left})");
    Ok(r.cert_pem)
}

/// The most output one answer carries.
const LOG_CHUNK_MAX: u64 = 1 << 20;

/// Answers `shoal logs`: collects the manager's output requests on a long
/// poll and posts each answer back, over the agent's own mutual TLS.
async fn serve_logs(clients: watch::Receiver<ApiClient>, name: String, apps_dir: PathBuf) {
    let poll = format!("/v1/nodes/{name}/log-requests");
    loop {
        let client = clients.borrow().clone();
        let reqs: Vec<LogRequest> = match client.get(&poll).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("log requests: {e}");
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
        };
        for r in reqs {
            let chunk = read_output(&apps_dir, &r);
            let path = format!("{poll}/{}", r.id);
            if let Err(e) = client.post::<_, serde_json::Value>(&path, &chunk).await {
                tracing::debug!("log answer: {e}");
            }
        }
    }
}

/// Reads what `r` asks of an app's output.log.
fn read_output(apps_dir: &Path, r: &LogRequest) -> LogChunk {
    use std::io::{Read, Seek, SeekFrom};
    let refuse = |why: String| LogChunk {
        data: String::new(),
        next_offset: r.offset.unwrap_or(0),
        error: Some(why),
    };
    if validate_node_name(&r.app).is_err() || r.app.starts_with('.') {
        return refuse(format!("{:?} is not an app id", r.app));
    }
    let path = apps_dir.join(&r.app).join("output.log");
    let mut f = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(_) => {
            let mut apps: Vec<String> = std::fs::read_dir(apps_dir)
                .map(|rd| {
                    rd.flatten()
                        .filter(|e| e.path().join("output.log").exists())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            apps.sort();
            return refuse(format!(
                "no output of app {:?} on this node (apps with output: {})",
                r.app,
                if apps.is_empty() {
                    "none".into()
                } else {
                    apps.join(", ")
                }
            ));
        }
    };
    let size = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = match r.offset {
        // A log that shrank was truncated or replaced: start over.
        Some(o) if o <= size => o,
        Some(_) => 0,
        None => size.saturating_sub(LOG_CHUNK_MAX),
    };
    let mut buf = Vec::new();
    if let Err(e) = f
        .seek(SeekFrom::Start(start))
        .and_then(|_| f.take(LOG_CHUNK_MAX).read_to_end(&mut buf))
    {
        return refuse(format!("cannot read {}: {e}", path.display()));
    }
    let next_offset = start + buf.len() as u64;
    let mut data = String::from_utf8_lossy(&buf).into_owned();
    if r.offset.is_none()
        && let Some(n) = r.tail
    {
        let lines: Vec<&str> = data.lines().collect();
        let keep = lines.len().saturating_sub(n);
        data = lines[keep..].iter().map(|l| format!("{l}\n")).collect();
    }
    LogChunk {
        data,
        next_offset,
        error: None,
    }
}

async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("signal handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn register(client: &ApiClient, reg: &Registration) -> Result<u64, ApiError> {
    let g: LeaseGrant = client
        .send(
            reqwest::Method::PUT,
            &format!("/v1/nodes/{}", reg.name),
            reg,
        )
        .await?;
    Ok(g.lease_ttl_ms)
}

/// Registers, then renews at TTL/3 (jittered), reconciling apps after each
/// answer and between renewals. Transport errors retry with capped,
/// jittered back-off; a manager that forgot us (404) gets a new
/// registration. A refusal (401/403/400) is fatal: retrying cannot fix it.
async fn lease_loop(
    clients: &watch::Receiver<ApiClient>,
    reg: &Registration,
    load_rx: watch::Receiver<Option<LoadSample>>,
    sup: &mut adaptor::Supervisor,
    mut shaper: Option<&mut shaper::Shaper>,
    on_registered: &mut dyn FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let started = tokio::time::Instant::now();
    let mut last_sample = started;
    let mut ttl_ms: u64 = 6000;
    let mut registered = false;
    let mut attempt: u32 = 0;
    let mut desired: Vec<AppAssignment> = Vec::new();
    // The generation of `desired`, once a renewal has brought one.
    let mut applied: Option<u64> = None;
    let mut next_renew = tokio::time::Instant::now();
    let mut reconcile_tick = tokio::time::interval(Duration::from_millis(500));
    reconcile_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next_renew) => {}
            _ = reconcile_tick.tick() => {
                // Supervision between renewals: restarts happen on time.
                // Not before the first renewal brought the desired apps:
                // until then the apps a previous run left keep running,
                // to be re-adopted or stopped once it is known which.
                if applied.is_none() {
                    continue;
                }
                sup.reconcile(&desired).await;
                let _ = sup.statuses().await;
                // Demand every second, as the thesis polled its counters.
                if let Some(s) = shaper.as_deref_mut()
                    && last_sample.elapsed() >= Duration::from_millis(950)
                {
                    last_sample = tokio::time::Instant::now();
                    if let Err(e) = s.sample(started.elapsed().as_secs_f64()).await {
                        tracing::warn!("shaper: {e}");
                    }
                }
                continue;
            }
        }
        let client = &clients.borrow().clone();
        let result = if !registered {
            register(client, reg)
                .await
                .map(|t| {
                    ttl_ms = t;
                    registered = true;
                    eprintln!("registered {} (lease {} ms)", reg.name, t);
                    None
                })
                .inspect(|_| {
                    if let Err(e) = on_registered() {
                        tracing::warn!("cannot record the membership in agent.toml: {e:#}");
                    }
                })
        } else {
            let mut apps = sup.statuses().await;
            if let Some(s) = shaper.as_deref() {
                for a in &mut apps {
                    a.bandwidth = s.bandwidth(&a.id);
                }
            }
            let req = RenewRequest {
                load: load_rx.borrow().clone(),
                apps,
                applied,
            };
            client
                .post::<_, RenewResponse>(&format!("/v1/nodes/{}/renew", reg.name), &req)
                .await
                .map(Some)
        };
        match result {
            Ok(resp) => {
                attempt = 0;
                if let Some(r) = resp {
                    ttl_ms = r.lease_ttl_ms;
                    if !r.unchanged {
                        desired = r.desired;
                    }
                    sup.reconcile(&desired).await;
                    applied = Some(r.generation);
                    if let Some(s) = shaper.as_deref_mut() {
                        apply_caps(s, &r.caps, &sup.statuses().await).await;
                    }
                }
                next_renew = tokio::time::Instant::now()
                    + Duration::from_millis(renew_interval_ms(ttl_ms, rand::random()));
            }
            Err(e) if e.status() == Some(404) => {
                tracing::warn!("{e}; registering again");
                registered = false;
                next_renew = tokio::time::Instant::now();
            }
            Err(
                e @ ApiError::Status {
                    status: 400 | 401 | 403,
                    ..
                },
            ) => return Err(e.into()),
            // A certificate the other side refuses will be refused again:
            // stop and say why instead of retrying forever.
            Err(e @ ApiError::Certificate { .. }) => return Err(e.into()),
            Err(e) => {
                let wait = backoff_ms(attempt, 100, (ttl_ms / 6).max(200), rand::random());
                attempt = attempt.saturating_add(1);
                tracing::warn!("{e}; retrying in {wait} ms");
                if attempt == 1 {
                    eprintln!("lost the manager: {e}; retrying");
                }
                next_renew = tokio::time::Instant::now() + Duration::from_millis(wait);
            }
        }
    }
}

/// Enforces the manager's egress caps: each capped app's class follows its
/// cap; apps no longer capped are unshaped. An app's port comes from the
/// endpoint its adaptor reports.
async fn apply_caps(s: &mut shaper::Shaper, caps: &BTreeMap<String, u64>, apps: &[AppStatus]) {
    for (id, cap) in caps {
        let port = apps
            .iter()
            .find(|a| &a.id == id)
            .and_then(|a| a.endpoint.as_deref())
            .and_then(|e| e.rsplit_once(':'))
            .and_then(|(_, p)| p.parse::<u16>().ok());
        let Some(port) = port else { continue };
        if let Err(e) = s.set_cap(id, port, *cap).await {
            tracing::warn!(app = %id, "shaper: {e}");
        }
    }
    let gone: Vec<String> = s
        .apps()
        .filter(|a| !caps.contains_key(*a))
        .map(str::to_string)
        .collect();
    for id in gone {
        s.remove(&id).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotation_interrupted_anywhere_leaves_a_matching_pair() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        let put = |f: &str, s: &str| std::fs::write(p.join(f), s).unwrap();
        let get = |f: &str| std::fs::read_to_string(p.join(f)).unwrap();
        put("node.key", "k1");
        put("node.pem", "c1");
        // Died before the certificate arrived: the old pair stays.
        put(NEXT_KEY, "k2");
        finish_rotation(p).unwrap();
        assert_eq!(
            (get("node.key"), get("node.pem")),
            ("k1".into(), "c1".into())
        );
        assert!(!p.join(NEXT_KEY).exists());
        // Died after the key was moved, before the certificate: finished.
        put("node.key", "k2");
        put(NEXT_CERT, "c2");
        finish_rotation(p).unwrap();
        assert_eq!(
            (get("node.key"), get("node.pem")),
            ("k2".into(), "c2".into())
        );
        // The whole path.
        save_rotated(p, "k3", "c3").unwrap();
        assert_eq!(
            (get("node.key"), get("node.pem")),
            ("k3".into(), "c3".into())
        );
        assert!(!p.join(NEXT_KEY).exists() && !p.join(NEXT_CERT).exists());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(p.join("node.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
