//! `shoal bench agents`: many virtual agents in one process against a real
//! manager process. Each virtual agent joins with its own key and
//! certificate, holds its own TLS connection, and renews at TTL/3 with a
//! synthetic load sample, exactly as a real agent does.

use anyhow::Context;
use futures_util::StreamExt;
use shoal_net::client::ApiClient;
use shoal_net::identity::{ClusterConfig, ClusterDir};
use shoal_net::wire::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// `shoal bench agents` arguments.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Example:\n  shoal bench agents --count 1000 --lease-ttl 6s --duration 30s")]
pub struct BenchAgentsArgs {
    /// Number of virtual agents.
    #[arg(long, default_value_t = 1000)]
    pub count: usize,
    /// Lease TTL of the manager the bench starts (e.g. 6s, 500ms).
    #[arg(long = "lease-ttl", alias = "ttl", default_value = "6s", value_parser = shoal_core::duration::parse_positive_secs)]
    pub ttl: f64,
    /// How long to hold all agents after they registered (e.g. 30s, 2m).
    #[arg(long, default_value = "30s", value_parser = shoal_core::duration::parse_positive_secs)]
    pub duration: f64,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

fn rss_kb(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

struct Manager {
    child: std::process::Child,
}

impl Drop for Manager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A manager process on a throwaway cluster directory, for benchmarks.
struct BenchCluster {
    tmp: tempfile::TempDir,
    cd: ClusterDir,
    mgr: Manager,
    admin: ApiClient,
    listen: String,
}

async fn start_cluster(ttl: f64) -> anyhow::Result<BenchCluster> {
    let tmp = tempfile::tempdir()?;
    let port = free_port()?;
    let listen = format!("127.0.0.1:{port}");
    let cd = ClusterDir::new(tmp.path());
    cd.init(
        ClusterConfig {
            listen: listen.clone(),
            manager_url: format!("https://{listen}"),
            lease_ttl_secs: ttl,
            ..Default::default()
        },
        false,
    )?;
    shoal_manager::store_identity::create(&cd)?;
    let exe = std::env::current_exe()?;
    let mgr = Manager {
        child: std::process::Command::new(&exe)
            .args(["manager", "--dir"])
            .arg(tmp.path())
            .args(["--no-discovery", "--dashboard", "off"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("starting the manager")?,
    };
    let admin = ApiClient::admin(&cd, None)?;
    let t0 = Instant::now();
    while admin.status().await.is_err() {
        if t0.elapsed() > Duration::from_secs(20) {
            anyhow::bail!("the manager did not come up");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(BenchCluster {
        tmp,
        cd,
        mgr,
        admin,
        listen,
    })
}

/// Calls `f(kind, node)` for every event on the manager's watch stream.
fn on_events(
    admin: &ApiClient,
    f: impl Fn(&str, &str) + Send + 'static,
) -> impl std::future::Future<Output = anyhow::Result<()>> {
    let admin = admin.clone();
    async move {
        let mut watch = admin.watch().await?.bytes_stream();
        tokio::spawn(async move {
            let mut buf = String::new();
            while let Some(Ok(chunk)) = watch.next().await {
                buf.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(i) = buf.find("\n\n") {
                    let ev: String = buf.drain(..i + 2).collect();
                    if let Some(data) = ev.lines().find_map(|l| l.strip_prefix("data: "))
                        && let Ok(v) = serde_json::from_str::<serde_json::Value>(data)
                    {
                        f(
                            v["kind"].as_str().unwrap_or(""),
                            v["node"].as_str().unwrap_or(""),
                        );
                    }
                }
            }
        });
        Ok(())
    }
}

pub async fn run(a: BenchAgentsArgs) -> anyhow::Result<()> {
    crate::raise_nofile();
    let BenchCluster {
        tmp: _tmp,
        cd,
        mgr,
        admin,
        listen,
    } = start_cluster(a.ttl).await?;
    let pid = mgr.child.id();
    // Count failure events: every agent is alive, so each one is false.
    let failures = Arc::new(AtomicU64::new(0));
    let f2 = failures.clone();
    on_events(&admin, move |kind, _| {
        if kind == "failed" {
            f2.fetch_add(1, Ordering::Relaxed);
        }
    })
    .await?;

    let token = cd.token()?;
    let url = format!("https://{listen}");
    let ttl_ms = (a.ttl * 1000.0) as u64;
    eprintln!("joining {} virtual agents...", a.count);
    let join_start = Instant::now();
    // Each virtual agent renews from the moment it registers, as a real one
    // does; only renewals inside the hold window are measured.
    let lat = Arc::new(std::sync::Mutex::new(Vec::<u32>::with_capacity(1 << 20)));
    let errors = Arc::new(AtomicU64::new(0));
    let registered = Arc::new(AtomicU64::new(0));
    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let join_gate = Arc::new(tokio::sync::Semaphore::new(32));
    let mut tasks = Vec::new();
    for i in 0..a.count {
        let (token, url) = (token.clone(), url.clone());
        let (lat, errors, registered, measuring, stop, gate) = (
            lat.clone(),
            errors.clone(),
            registered.clone(),
            measuring.clone(),
            stop.clone(),
            join_gate.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let name = format!("v{i:05}");
            let c = {
                let _permit = gate.acquire().await?;
                let (ca, key, cert) =
                    shoal_net::client::join(&url, &token, &name, &["bench".to_string()]).await?;
                let c = ApiClient::new(&url, &ca, Some((&cert, &key)))?;
                let reg = Registration {
                    name: name.clone(),
                    address: "127.0.0.1".into(),
                    roles: vec!["bench".into()],
                    capacities: [("net_mbps".to_string(), 100.0)].into(),
                };
                let _: LeaseGrant = c
                    .send(reqwest::Method::PUT, &format!("/v1/nodes/{name}"), &reg)
                    .await?;
                c
            };
            registered.fetch_add(1, Ordering::Relaxed);
            let path = format!("/v1/nodes/{name}/renew");
            while !stop.load(Ordering::Relaxed) {
                let wait = shoal_core::lease::renew_interval_ms(ttl_ms, rand::random());
                tokio::time::sleep(Duration::from_millis(wait)).await;
                let req = RenewRequest {
                    load: Some(LoadSample {
                        at_ms: unix_ms(),
                        cpu: rand::random::<f64>(),
                        cpus: 4,
                        net_rx_bps: rand::random::<f64>() * 1e7,
                        net_tx_bps: rand::random::<f64>() * 1e7,
                        ..Default::default()
                    }),
                    apps: Vec::new(),
                    applied: None,
                };
                let t = Instant::now();
                let r = c.post::<_, RenewResponse>(&path, &req).await;
                if measuring.load(Ordering::Relaxed) {
                    match r {
                        Ok(_) => {
                            let us = t.elapsed().as_micros().min(u32::MAX as u128) as u32;
                            lat.lock().unwrap_or_else(|p| p.into_inner()).push(us);
                        }
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    while registered.load(Ordering::Relaxed) < a.count as u64 {
        if let Some(t) = tasks.iter().position(|t| t.is_finished()) {
            let r = tasks.remove(t).await?;
            r.context("a virtual agent failed to join")?;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let join_secs = join_start.elapsed().as_secs_f64();
    eprintln!(
        "{} agents joined and registered in {join_secs:.1} s; holding for {} s",
        a.count, a.duration
    );
    let failed_before = failures.load(Ordering::Relaxed);
    measuring.store(true, Ordering::Relaxed);
    let stop_at = tokio::time::Instant::now() + Duration::from_secs_f64(a.duration);
    let hold_start = Instant::now();
    let mut peak_rss = 0;
    while tokio::time::Instant::now() < stop_at {
        peak_rss = peak_rss.max(rss_kb(pid).unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    measuring.store(false, Ordering::Relaxed);
    let held = hold_start.elapsed().as_secs_f64();
    // Read before the agents stop: after that, expiries are expected.
    let false_expiries = failures.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    // The watch stream counted every failure; the final listing is a
    // cross-check and may be slow on a loaded machine, so it is optional.
    let agents_listed = match admin.status().await {
        Ok(s) => serde_json::json!(s.nodes.len()),
        Err(e) => {
            eprintln!("final status listing failed ({e}); relying on the watch stream");
            serde_json::Value::Null
        }
    };
    let mut l = std::mem::take(&mut *lat.lock().unwrap_or_else(|p| p.into_inner()));
    l.sort_unstable();
    let pct = |p: f64| -> f64 {
        if l.is_empty() {
            return f64::NAN;
        }
        l[((l.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
    };
    let out = serde_json::json!({
        "agents": a.count,
        "agents_listed_at_end": agents_listed,
        "ttl_s": a.ttl,
        "held_s": held,
        "join_s": join_secs,
        "renewals": l.len(),
        "renewals_per_s": l.len() as f64 / held,
        "renew_errors": errors.load(Ordering::Relaxed),
        "latency_p50_ms": pct(0.5),
        "latency_p99_ms": pct(0.99),
        "latency_max_ms": pct(1.0),
        "false_expiries": false_expiries,
        "false_expiries_while_joining": failed_before,
        "manager_rss_mb": rss_kb(pid).unwrap_or(0) as f64 / 1024.0,
        "manager_peak_rss_mb": peak_rss as f64 / 1024.0,
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("agents held            {}", out["agents"]);
        println!("lease TTL              {} s", a.ttl);
        println!(
            "renewals/s             {:.0}",
            out["renewals_per_s"].as_f64().unwrap_or(0.0)
        );
        println!("renewal latency p50    {:.2} ms", pct(0.5));
        println!("renewal latency p99    {:.2} ms", pct(0.99));
        println!("renewal errors         {}", out["renew_errors"]);
        println!(
            "false expiries         {} ({} of them while agents were still joining)",
            out["false_expiries"], failed_before
        );
        println!("manager RSS (peak)     {:.1} MB", peak_rss as f64 / 1024.0);
    }
    drop(mgr);
    Ok(())
}

/// `shoal bench detection` arguments.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Example:\n  shoal bench detection --kills 20 --lease-ttl 6s")]
pub struct BenchDetectionArgs {
    /// How many agents to kill, one after another.
    #[arg(long, default_value_t = 20)]
    pub kills: usize,
    /// Lease TTL (e.g. 6s, 500ms).
    #[arg(long = "lease-ttl", alias = "ttl", default_value = "6s", value_parser = shoal_core::duration::parse_positive_secs)]
    pub ttl: f64,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Failure-detection time: real agent processes are killed with SIGKILL at a
/// random point of their renewal cycle; the time from the kill to the
/// `failed` event on the watch stream is measured.
pub async fn detection(a: BenchDetectionArgs) -> anyhow::Result<()> {
    let c = start_cluster(a.ttl).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    on_events(&c.admin, move |kind, node| {
        if kind == "failed" {
            let _ = tx.send(node.to_string());
        }
    })
    .await?;
    let token = c.cd.token()?.to_string();
    let exe = std::env::current_exe()?;
    let mut times = Vec::new();
    for i in 0..a.kills {
        let name = format!("d{i}");
        let dir = c.tmp.path().join(&name);
        let mut child = std::process::Command::new(&exe)
            .args([
                "agent",
                "--join",
                &format!("https://{}", c.listen),
                "--token",
                &token,
            ])
            .args(["--name", &name, "--dir"])
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        // Alive and renewing (a load sample arrives with the first renewal).
        let t0 = Instant::now();
        loop {
            let s = c.admin.status().await?;
            if s.nodes.iter().any(|n| n.name == name && n.load.is_some()) {
                break;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                anyhow::bail!("agent {name} did not come up");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // A random phase of the renewal cycle.
        let phase = rand::random::<f64>() * a.ttl / 3.0;
        tokio::time::sleep(Duration::from_secs_f64(phase)).await;
        let killed = Instant::now();
        let _ = child.kill();
        let _ = child.wait();
        let deadline = killed + Duration::from_secs_f64(a.ttl * 3.0);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, rx.recv()).await {
                Ok(Some(n)) if n == name => break,
                Ok(Some(_)) => continue,
                _ => anyhow::bail!("agent {name} was never declared failed"),
            }
        }
        let t = killed.elapsed().as_secs_f64();
        eprintln!("kill {}: detected after {t:.2} s", i + 1);
        times.push(t);
    }
    times.sort_by(f64::total_cmp);
    let q = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize];
    let out = serde_json::json!({
        "kills": times.len(),
        "ttl_s": a.ttl,
        "min_s": q(0.0),
        "p50_s": q(0.5),
        "p90_s": q(0.9),
        "max_s": q(1.0),
        "all_s": times,
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "failure detection over {} kills (TTL {} s): min {:.2} s, p50 {:.2} s, p90 {:.2} s, max {:.2} s",
            times.len(),
            a.ttl,
            q(0.0),
            q(0.5),
            q(0.9),
            q(1.0)
        );
    }
    Ok(())
}
