//! `shoal bench stream`: LAMA's audio-streaming experiment (section 5) live.
//! Nodes are network namespaces on a bridge with their egress capped by tc
//! (the lab of `shoal up --netns`); a real manager and one real agent per
//! node; the service `radio` runs Debian's icecast2 through the icecast
//! adaptor, its first node fed by this bench's source and every later one
//! relaying from it (`relay_from = "{{ first_server }}"`).
//!
//! Listeners are redirected to a relay, as streaming services do (a
//! playlist or a 302 names the server): the bench, acting as the
//! redirector, sends each new listener to the serving, non-draining node
//! with the fewest listeners, from the manager's live service status. They
//! do not go through the dispatcher because a proxy would carry every
//! stream's bytes on its own node, which is the bottleneck relays remove.
//! When a node drains, the redirector sends it no new listeners and, with
//! `--move` (default), moves its listeners to the others (each keeps
//! playing from its buffer while it reconnects); without it they may leave
//! until the drain timeout, and those still there are cut. When a relay
//! starts serving, listeners move onto it from the servers above the mean.
//!
//! All rates are divided by `--scale` (the node's 100 Mbit/s, the stream's
//! 128 kbit/s, icecast's burst and queue), so that listener counts are
//! LAMA's while the bytes fit a 2-core machine. Times are divided by
//! `--speed` (the workload, the control period, lead time, drain timeout).

use crate::stream::{End, Listened, Tally, listener, source};
use crate::up::{Child2, Lab, spawn, spawn_in, stop_all, wait_until};
use anyhow::Context;
use shoal_net::client::ApiClient;
use shoal_net::identity::{ClusterConfig, ClusterDir};
use shoal_net::wire::*;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// `shoal bench stream` arguments.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Examples (as root; apt-get install -y icecast2):\n  shoal bench stream --saturate --levels 500,600,700,750,800,900 --hold 20s --json\n  shoal bench stream --policy threshold,ar,predictive --speed 2 --json --out /tmp/stream\n\nscripts/bench-stream.sh runs the figures of docs/streaming.md."
)]
pub struct BenchStreamArgs {
    /// One node only: add listeners level by level and find where stalls
    /// begin (LAMA: fewer than 750 at 128 kbit/s on 100 Mbit/s).
    #[arg(long)]
    pub saturate: bool,
    /// --saturate: listener counts to hold, ascending.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "500,600,650,700,725,750,775,800,850,900"
    )]
    pub levels: Vec<u64>,
    /// --saturate: how long each level is held.
    #[arg(long, default_value = "20s", value_parser = shoal_core::duration::parse_positive_duration)]
    pub hold: Duration,
    /// --saturate: listeners arriving per second between levels.
    #[arg(long, default_value_t = 20.0)]
    pub arrival_rate: f64,
    /// Policies to run the LAMA workload with, one fresh cluster each.
    #[arg(long, value_delimiter = ',', default_value = "threshold,ar,predictive")]
    pub policy: Vec<String>,
    /// Nodes in the pool (the service's ceiling).
    #[arg(long, default_value_t = 6)]
    pub nodes: usize,
    /// Rates divided by this: 100/scale Mbit/s nodes, 128/scale kbit/s.
    #[arg(long, default_value_t = 8.0)]
    pub scale: f64,
    /// Time compression: workload seconds per real second.
    #[arg(long, default_value_t = 4.0)]
    pub speed: f64,
    /// The workload's seed (the simulator's lama-audio with the same seed).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Forecast horizon the policies provision for, workload seconds.
    #[arg(long, default_value_t = 10.0)]
    pub lead_time: f64,
    /// How long a released node drains, workload seconds.
    #[arg(long, default_value_t = 30.0)]
    pub drain_timeout: f64,
    /// Never move a listener: not off a draining node (those still there
    /// are cut at the drain timeout) and not onto a relay that starts
    /// serving (no rebalancing).
    #[arg(long)]
    pub no_move: bool,
    /// Write each run's time series (JSON) here.
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

const MOUNT: &str = "/stream";
const PORT: u16 = 8000;

fn validate(a: &BenchStreamArgs) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!(
            "shoal bench stream needs root (it creates network namespaces and tc qdiscs)"
        );
    }
    if !Path::new(shoal_agent::adaptor::icecast::PROGRAM).exists() {
        anyhow::bail!("icecast2 is not installed: apt-get install -y icecast2");
    }
    for (f, v) in [
        ("--scale", a.scale),
        ("--speed", a.speed),
        ("--lead-time", a.lead_time),
        ("--drain-timeout", a.drain_timeout),
    ] {
        if !(v.is_finite() && v > 0.0) {
            anyhow::bail!("{f} must be a positive number, got {v}");
        }
    }
    if a.nodes == 0 || a.nodes > 20 {
        anyhow::bail!("--nodes must be 1 to 20, got {}", a.nodes);
    }
    if a.saturate && (a.levels.is_empty() || a.levels.windows(2).any(|w| w[0] >= w[1])) {
        anyhow::bail!("--levels must be listener counts in ascending order, e.g. 500,700,750,800");
    }
    for p in &a.policy {
        if !["threshold", "ar", "hpa", "predictive"].contains(&p.as_str()) {
            anyhow::bail!("--policy {p:?}: use threshold, ar, hpa or predictive (comma-separated)");
        }
    }
    Ok(())
}

pub fn run(a: BenchStreamArgs) -> anyhow::Result<()> {
    validate(&a)?;
    crate::raise_nofile();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        // Ctrl-C or SIGTERM ends the run early; the rig is still removed.
        let stop = crate::up::catch_stop_signals()?;
        let out = if a.saturate {
            saturate(&a).await?
        } else {
            let mut runs = serde_json::Map::new();
            for p in &a.policy {
                if *stop.borrow() {
                    break;
                }
                let r = live(&a, p, &Plan::lama(a.seed), &stop)
                    .await
                    .with_context(|| format!("policy {p}"))?;
                if !a.json {
                    print_live(p, &r);
                }
                runs.insert(p.clone(), r);
            }
            serde_json::Value::Object(runs)
        };
        if a.json {
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        Ok(())
    })
}

/// A cluster of `n` namespace nodes running the `radio` service.
struct Rig {
    _lab: Lab,
    children: Vec<Child2>,
    admin: ApiClient,
    _tmp: tempfile::TempDir,
    password: String,
    addrs: BTreeMap<String, String>,
    dash_url: Option<String>,
    dir: std::path::PathBuf,
}

impl Drop for Rig {
    fn drop(&mut self) {
        stop_all(&mut self.children);
    }
}

fn kbps(a: &BenchStreamArgs) -> f64 {
    128.0 / a.scale
}
fn node_mbit(a: &BenchStreamArgs) -> f64 {
    100.0 / a.scale
}

fn service_toml(a: &BenchStreamArgs, policy: &str, min: usize, max: usize) -> String {
    let kb = |x: f64| ((x / a.scale).round() as u64).max(4);
    format!(
        r#"name = "radio"
min_nodes = {min}
max_nodes = {max}
policy = "{policy}"
period_secs = {period}
lead_time_secs = {lead}
drain_timeout_secs = {drain}
role = "stream"

[app]
adaptor = "icecast"
port = {PORT}

[app.params]
listen = "{{{{ node_address }}}}:{{{{ port }}}}"
relay_from = "{{{{ first_server }}}}"
mounts = "{MOUNT}"
max_listeners = "4000"
burst_kb = "{burst}"
queue_kb = "{queue}"

[metric]
kind = "net"
capacity = {cap}
"#,
        period = 2.0 / a.speed,
        lead = a.lead_time / a.speed,
        drain = a.drain_timeout / a.speed,
        burst = kb(64.0),
        queue = kb(512.0),
        cap = node_mbit(a),
    )
}

async fn start(
    a: &BenchStreamArgs,
    policy: &str,
    min: usize,
    max: usize,
    dashboard: Option<&str>,
) -> anyhow::Result<Rig> {
    let lab = Lab::create(max, node_mbit(a))?;
    let tmp = tempfile::Builder::new().prefix("shoal-stream-").tempdir()?;
    let base = tmp.path().to_path_buf();
    let host = lab.host_ip();
    let port = std::net::TcpListener::bind((host.as_str(), 0))?
        .local_addr()?
        .port();
    let listen = format!("{host}:{port}");
    let cd = ClusterDir::new(base.join("cluster"));
    cd.init(
        ClusterConfig {
            listen: listen.clone(),
            manager_url: format!("https://{listen}"),
            // The simulator's 6 s lease (renewals and load samples every
            // 2 s), compressed by --speed like every other time.
            lease_ttl_secs: (6.0 / a.speed).max(1.5),
            ..Default::default()
        },
        false,
    )?;
    shoal_manager::store_identity::create(&cd)?;
    let dir = cd.path.display().to_string();
    let mut margs: Vec<String> = vec![
        "manager".into(),
        "--dir".into(),
        dir.clone(),
        "--no-discovery".into(),
    ];
    if let Some(d) = dashboard {
        // A taken address falls back to a free port, as `shoal up` does.
        let d = match std::net::TcpListener::bind(d) {
            Ok(l) => {
                drop(l);
                d.to_string()
            }
            Err(_) => "127.0.0.1:0".into(),
        };
        margs.extend(["--dashboard".into(), d]);
    }
    let mut children = vec![spawn("manager", &margs, &base.join("manager.log"))?];
    let dash_url = if dashboard.is_some() {
        Some(
            children[0]
                .wait_line("dashboard (read-only) at", Duration::from_secs(20))
                .await?
                .rsplit(' ')
                .next()
                .unwrap_or_default()
                .to_string(),
        )
    } else {
        None
    };
    let admin = ApiClient::admin(&cd, None)?;
    let mut rig = Rig {
        _lab: lab,
        children: Vec::new(),
        admin,
        _tmp: tmp,
        password: format!("{:016x}", rand::random::<u64>()),
        addrs: BTreeMap::new(),
        dash_url,
        dir: cd.path.clone(),
    };
    rig.children.append(&mut children);
    wait_until("the manager", Duration::from_secs(20), || async {
        rig.admin.status().await.is_ok()
    })
    .await?;
    let token_file = cd.path.join("token");
    for i in 0..max {
        let name = format!("node{}", i + 1);
        let args: Vec<String> = vec![
            "agent".into(),
            "--join".into(),
            format!("https://{listen}"),
            "--token-file".into(),
            token_file.display().to_string(),
            "--name".into(),
            name.clone(),
            "--roles".into(),
            "stream".into(),
            "--dir".into(),
            base.join(&name).display().to_string(),
            "--capacity".into(),
            format!("net_mbps={}", node_mbit(a)),
        ];
        let ns = rig._lab.ns(i);
        rig.children.push(spawn_in(
            Some(&ns),
            &name,
            &args,
            &base.join(format!("{name}.log")),
        )?);
        rig.addrs
            .insert(name, format!("{}:{PORT}", rig._lab.node_ip(i)));
    }
    wait_until(
        "the agents to register",
        Duration::from_secs(30),
        || async {
            rig.admin
                .status()
                .await
                .map(|s| {
                    s.nodes
                        .iter()
                        .filter(|n| n.state == LeaseState::Alive)
                        .count()
                        == max
                })
                .unwrap_or(false)
        },
    )
    .await?;
    let mut toml = service_toml(a, policy, min, max);
    toml.push_str(&format!(
        "\n[app.secrets]\nsource_password = \"{}\"\n",
        rig.password
    ));
    let spec: ServiceSpec = toml::from_str(&toml).context("the radio service")?;
    let _: serde_json::Value = rig
        .admin
        .send(reqwest::Method::PUT, "/v1/services/radio", &spec)
        .await?;
    wait_until(
        "the first icecast to serve",
        Duration::from_secs(60),
        || async {
            serving(&rig)
                .await
                .map(|s| !s.0.is_empty())
                .unwrap_or(false)
        },
    )
    .await?;
    Ok(rig)
}

/// The service's serving and draining backends, and its status.
async fn serving(
    rig: &Rig,
) -> anyhow::Result<(Vec<SocketAddr>, Vec<SocketAddr>, ServiceStatus, usize)> {
    let s = rig.admin.status().await?;
    let svc = s
        .services
        .iter()
        .find(|x| x.name == "radio")
        .cloned()
        .unwrap_or_default();
    let addr = |n: &String| rig.addrs.get(n).and_then(|a| a.parse().ok());
    let draining: Vec<SocketAddr> = svc.draining.iter().filter_map(addr).collect();
    let serve: Vec<SocketAddr> = svc
        .serving
        .iter()
        .filter_map(addr)
        .filter(|a| !draining.contains(a))
        .collect();
    let listeners = s
        .nodes
        .iter()
        .flat_map(|n| n.apps.iter())
        .filter_map(|a| a.stream.as_ref())
        .map(|st| st.listeners as usize)
        .sum();
    Ok((serve, draining, svc, listeners))
}

struct Audience {
    next_id: u64,
    on: BTreeMap<u64, (SocketAddr, watch::Sender<Option<SocketAddr>>)>,
    tasks: tokio::task::JoinSet<(u64, Listened)>,
    done: Vec<(Listened, bool)>,
    /// Servers (by address) draining or out of the service at the last
    /// poll: a listener cut there was cut by a reallocation.
    draining_seen: std::collections::BTreeSet<SocketAddr>,
    kbps: f64,
    tally: Arc<Tally>,
}

impl Audience {
    fn new(kbps: f64) -> Self {
        Self {
            next_id: 0,
            on: BTreeMap::new(),
            tasks: tokio::task::JoinSet::new(),
            done: Vec::new(),
            draining_seen: Default::default(),
            kbps,
            tally: Arc::new(Tally::default()),
        }
    }
    fn count_on(&self, s: &SocketAddr) -> usize {
        self.on.values().filter(|(a, _)| a == s).count()
    }
    fn least(&self, serving: &[SocketAddr]) -> Option<SocketAddr> {
        serving.iter().copied().min_by_key(|s| self.count_on(s))
    }
    fn arrive(&mut self, serving: &[SocketAddr]) {
        let Some(s) = self.least(serving) else { return };
        let (tx, rx) = watch::channel(Some(s));
        let id = self.next_id;
        self.next_id += 1;
        let kbps = self.kbps;
        let tally = self.tally.clone();
        self.tasks
            .spawn(async move { (id, listener(MOUNT.into(), kbps, rx, tally).await) });
        self.on.insert(id, (s, tx));
    }
    fn leave_one(&mut self) {
        // A random listener leaves (LAMA's departures).
        if self.on.is_empty() {
            return;
        }
        let i = rand::random::<usize>() % self.on.len();
        let id = *self.on.keys().nth(i).expect("index in range");
        if let Some((_, tx)) = self.on.remove(&id) {
            let _ = tx.send(None);
        }
    }
    /// Moves every listener of `from` to the least loaded of `to`.
    fn move_off(&mut self, from: &[SocketAddr], to: &[SocketAddr]) -> usize {
        let mut n = 0;
        let ids: Vec<u64> = self
            .on
            .iter()
            .filter(|(_, (s, _))| from.contains(s))
            .map(|(i, _)| *i)
            .collect();
        for id in ids {
            let Some(t) = self.least(to) else { break };
            if let Some((s, tx)) = self.on.get_mut(&id) {
                *s = t;
                let _ = tx.send(Some(t));
                n += 1;
            }
        }
        n
    }
    /// Moves listeners off servers holding more than their share of the
    /// audience onto `fresh` (relays that just began to serve), until every
    /// server of `serving` holds about the mean: without it, listeners stay
    /// where they first landed and the oldest nodes stay saturated while
    /// new relays fill only with new arrivals.
    fn rebalance(&mut self, serving: &[SocketAddr], fresh: &[SocketAddr]) -> usize {
        if serving.is_empty() || fresh.is_empty() {
            return 0;
        }
        let mean = self.on.len().div_ceil(serving.len());
        let mut n = 0;
        for from in serving.iter().filter(|s| !fresh.contains(s)) {
            let excess = self.count_on(from).saturating_sub(mean);
            let ids: Vec<u64> = self
                .on
                .iter()
                .filter(|(_, (s, _))| s == from)
                .map(|(i, _)| *i)
                .take(excess)
                .collect();
            for id in ids {
                let Some(t) = self.least(fresh) else { break };
                if self.count_on(&t) >= mean {
                    break;
                }
                if let Some((s, tx)) = self.on.get_mut(&id) {
                    *s = t;
                    let _ = tx.send(Some(t));
                    n += 1;
                }
            }
        }
        n
    }
    fn reap(&mut self) {
        while let Some(Ok((id, l))) = self.tasks.try_join_next() {
            self.on.remove(&id);
            let by_release = matches!(l.end, End::Cut(_))
                && l.server.is_some_and(|s| self.draining_seen.contains(&s));
            self.done.push((l, by_release));
        }
    }
}

fn summarize(done: &[(Listened, bool)]) -> serde_json::Value {
    let mut startups: Vec<f64> = done.iter().filter_map(|(l, _)| l.startup).collect();
    startups.sort_by(f64::total_cmp);
    let pct = |p: f64| -> Option<f64> {
        (!startups.is_empty()).then(|| startups[((startups.len() - 1) as f64 * p).round() as usize])
    };
    let cut: Vec<&Listened> = done
        .iter()
        .map(|(l, _)| l)
        .filter(|l| matches!(l.end, End::Cut(_)))
        .collect();
    let why = cut.iter().find_map(|l| match &l.end {
        End::Cut(w) => Some(w.clone()),
        End::Left => None,
    });
    serde_json::json!({
        "listeners": done.len(),
        "stall_listener_seconds": done.iter().map(|(l, _)| l.stalled).sum::<f64>(),
        "stalled_listeners": done.iter().filter(|(l, _)| l.stalls > 0).count(),
        "stalls": done.iter().map(|(l, _)| l.stalls as u64).sum::<u64>(),
        "disconnected": cut.len(),
        "disconnected_by_release": done.iter().filter(|(_, r)| *r).count(),
        "moved": done.iter().map(|(l, _)| l.moves as u64).sum::<u64>(),
        "mbytes_received": done.iter().map(|(l, _)| l.bytes as f64).sum::<f64>() / 1e6,
        "never_started": done.iter().filter(|(l, _)| l.startup.is_none()).count(),
        "startup_p50_s": pct(0.5),
        "startup_p99_s": pct(0.99),
        "first_cut": why,
    })
}

/// One node: hold each listener level and see where stalls begin.
async fn saturate(a: &BenchStreamArgs) -> anyhow::Result<serde_json::Value> {
    let rig = start(a, "threshold", 1, 1, None).await?;
    let (serve, ..) = serving(&rig).await?;
    let master = serve[0];
    let (stop_tx, stop_rx) = watch::channel(false);
    let pw = rig.password.clone();
    let k = kbps(a);
    let src = tokio::spawn(async move { source(master, MOUNT, &pw, k, stop_rx).await });
    tokio::time::sleep(Duration::from_secs(2)).await;
    if src.is_finished() {
        src.await??;
        anyhow::bail!("the source stopped at once");
    }
    let mut levels = Vec::new();
    let mut first_bad: Option<u64> = None;
    // One audience, growing level by level at --arrival-rate, as listeners
    // arrive at a station; each level's figures are those of its hold.
    let mut aud = Audience::new(k);
    let pace = Duration::from_secs_f64(1.0 / a.arrival_rate);
    for &level in &a.levels {
        while (aud.on.len() as u64) < level {
            aud.arrive(&serve);
            tokio::time::sleep(pace).await;
        }
        // Settle: the newest listeners' bursts are in flight.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let snap = |t: &Tally| {
            (
                t.stalls.load(Relaxed),
                t.stall_ms.load(Relaxed),
                t.cuts.load(Relaxed),
            )
        };
        let before = snap(&aud.tally);
        let t_hold = Instant::now();
        let bytes0 = tc_sent_bytes(&rig._lab.ns(0));
        tokio::time::sleep(a.hold).await;
        let bytes1 = tc_sent_bytes(&rig._lab.ns(0));
        let after = snap(&aud.tally);
        let (_, _, _, icecast_listeners) = serving(&rig).await?;
        let secs = t_hold.elapsed().as_secs_f64();
        let tx_mbit = match (bytes0, bytes1) {
            (Some(b0), Some(b1)) => Some((b1 - b0) as f64 * 8.0 / 1e6 / secs * a.scale),
            _ => None,
        };
        let (stalls, stall_s, cuts) = (
            after.0 - before.0,
            (after.1 - before.1) as f64 / 1000.0,
            after.2 - before.2,
        );
        if (stalls > 0 || cuts > 0) && first_bad.is_none() {
            first_bad = Some(level);
        }
        let row = serde_json::json!({
            "listeners": level,
            "icecast_listeners": icecast_listeners,
            "stalls": stalls,
            "stall_listener_seconds": stall_s,
            "cut": cuts,
            "node_tx_mbit_x_scale": tx_mbit,
            "utilization": tx_mbit.map(|m| m / 100.0),
        });
        if !a.json {
            println!(
                "{level:>5} listeners (icecast counts {icecast_listeners:>5}): stalls {stalls:>4}, stall listener-s {stall_s:>7.1}, cut {cuts:>4}, node tx {:>6.1} Mbit/s at full scale",
                tx_mbit.unwrap_or(f64::NAN)
            );
        }
        levels.push(row);
    }
    while !aud.on.is_empty() {
        aud.leave_one();
    }
    while let Some(Ok((_, l))) = aud.tasks.join_next().await {
        aud.done.push((l, false));
    }
    let all = summarize(&aud.done);
    let _ = stop_tx.send(true);
    let sent = src.await??;
    if !a.json {
        println!(
            "stalls or cuts begin at {first_bad:?} listeners ({} kbit/s on {} Mbit/s, scale 1/{})",
            k,
            node_mbit(a),
            a.scale
        );
    }
    Ok(serde_json::json!({
        "scale": a.scale, "stream_kbps": k, "node_mbit": node_mbit(a), "hold_s": a.hold.as_secs_f64(),
        "source_bytes": sent, "first_level_with_stalls_or_cuts": first_bad, "levels": levels,
        "arrival_rate_per_s": a.arrival_rate, "all_listeners": all,
    }))
}

/// What a live run follows, and how it shows itself.
struct Plan {
    /// Concurrent listeners wanted, one value per `step` workload seconds.
    listeners: Vec<f64>,
    step: f64,
    /// The manager's dashboard address, if it is to have one.
    dashboard: Option<String>,
    /// Stop after this much real time, if sooner than the workload's end.
    until: Option<Duration>,
    /// Print where to look once the cluster is up (`shoal up`).
    announce: bool,
}

impl Plan {
    /// LAMA's audio workload (the simulator's `lama-audio`, same seed).
    fn lama(seed: u64) -> Self {
        let w = shoal_sim::autoscale::workload::lama_audio(
            &shoal_sim::autoscale::workload::LamaAudio::default(),
            2.0,
            seed,
        );
        let per = shoal_sim::autoscale::workload::LamaAudio::default().stream_mbps;
        Plan {
            listeners: w.demand.iter().map(|d| d / per).collect(),
            step: w.step,
            dashboard: None,
            until: None,
            announce: false,
        }
    }
}

/// A workload on `max` nodes with one policy.
async fn live(
    a: &BenchStreamArgs,
    policy: &str,
    plan: &Plan,
    stop: &watch::Receiver<bool>,
) -> anyhow::Result<serde_json::Value> {
    let per = shoal_sim::autoscale::workload::LamaAudio::default().stream_mbps;
    let rig = start(a, policy, 1, a.nodes, plan.dashboard.as_deref()).await?;
    if plan.announce {
        println!(
            "shoal up: {} nodes (namespaces, {:.1} Mbit/s each = 100 Mbit/s at scale 1/{}), icecast2 radio, policy {policy}, {}x",
            a.nodes,
            node_mbit(a),
            a.scale,
            a.speed
        );
        if let Some(d) = &rig.dash_url {
            println!("  dashboard   {d}");
        }
        println!("  status      shoal status --dir {}", rig.dir.display());
        println!(
            "  stream      http://{}{MOUNT} (relays: every node's address, port {PORT}; listeners are sent to the least loaded)",
            rig.addrs.values().next().cloned().unwrap_or_default()
        );
        println!("  Ctrl-C stops everything");
    }
    let (serve, ..) = serving(&rig).await?;
    let master = serve[0];
    let (stop_tx, stop_rx) = watch::channel(false);
    let pw = rig.password.clone();
    let k = kbps(a);
    let src = tokio::spawn(async move { source(master, MOUNT, &pw, k, stop_rx).await });
    tokio::time::sleep(Duration::from_secs(2)).await;
    if src.is_finished() {
        src.await??;
        anyhow::bail!("the source stopped at once");
    }
    let mut aud = Audience::new(k);
    let t0 = Instant::now();
    let length = plan.listeners.len() as f64 * plan.step;
    let mut series = Vec::new();
    let mut node_seconds = 0.0;
    let mut last = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut moved_total = 0;
    let mut rebalanced = 0;
    let mut draining_now: Vec<SocketAddr> = Vec::new();
    let mut nodes_max = 0;
    let (mut serve, mut svc) = (serve, ServiceStatus::default());
    let mut icecast_listeners = 0;
    let mut n_poll = 0u64;
    // Each node's egress, from the bridge's end of its veth, once a second:
    // (seconds since t0, per node: utilization of its cap).
    let veths: Vec<String> = (0..a.nodes).map(|i| rig._lab.veth(i)).collect();
    let mut egress_prev: Option<(Instant, Vec<Option<u64>>)> = None;
    let mut egress: Vec<(f64, Vec<f64>)> = Vec::new();
    loop {
        tick.tick().await;
        let wt = t0.elapsed().as_secs_f64() * a.speed;
        if wt >= length || *stop.borrow() || plan.until.is_some_and(|u| t0.elapsed() >= u) {
            break;
        }
        n_poll += 1;
        if n_poll.is_multiple_of(2)
            && let Ok((s, d, st, il)) = serving(&rig).await
        {
            {
                let fresh: Vec<SocketAddr> =
                    s.iter().copied().filter(|x| !serve.contains(x)).collect();
                serve = s;
                if !a.no_move && !fresh.is_empty() {
                    rebalanced += aud.rebalance(&serve, &fresh);
                }
                // Servers draining or no longer in the service: a listener
                // cut there was cut by a reallocation.
                aud.draining_seen = rig
                    .addrs
                    .values()
                    .filter_map(|x| x.parse().ok())
                    .filter(|x| !serve.contains(x))
                    .collect();
                if !a.no_move {
                    let newly: Vec<SocketAddr> = d
                        .iter()
                        .copied()
                        .filter(|x| !draining_now.contains(x))
                        .collect();
                    if !newly.is_empty() {
                        moved_total += aud.move_off(&newly, &serve);
                    }
                }
                draining_now = d;
                svc = st;
                icecast_listeners = il;
            }
        }
        let target = plan.listeners[((wt / plan.step) as usize).min(plan.listeners.len() - 1)]
            .round() as usize;
        aud.reap();
        while aud.on.len() < target && !serve.is_empty() {
            aud.arrive(&serve);
        }
        while aud.on.len() > target {
            aud.leave_one();
        }
        let dt = last.elapsed().as_secs_f64() * a.speed;
        last = Instant::now();
        node_seconds += svc.nodes.len() as f64 * dt;
        nodes_max = nodes_max.max(svc.nodes.len());
        if n_poll.is_multiple_of(4) {
            let now = Instant::now();
            let bytes: Vec<Option<u64>> = veths.iter().map(|v| veth_rx_bytes(v)).collect();
            let mut util = vec![0.0; veths.len()];
            if let Some((t, prev)) = &egress_prev {
                let dt = now.duration_since(*t).as_secs_f64();
                for (i, u) in util.iter_mut().enumerate() {
                    if let (Some(b0), Some(b1)) = (prev[i], bytes[i]) {
                        *u = (b1.saturating_sub(b0)) as f64 * 8.0 / 1e6 / dt / node_mbit(a);
                    }
                }
                egress.push((now.duration_since(t0).as_secs_f64(), util.clone()));
            }
            egress_prev = Some((now, bytes));
            let per_node: Vec<usize> = rig
                ._lab
                .node_addrs(PORT)
                .iter()
                .map(|s| aud.count_on(s))
                .collect();
            series.push(serde_json::json!({
                "node_utilization": util, "node_listeners": per_node,
                "t": wt, "demand_mbit": target as f64 * per, "listeners": aud.on.len(),
                "icecast_listeners": icecast_listeners,
                "observed_mbit": svc.usage.map(|u| u * a.scale),
                "forecast_mbit": svc.forecast.map(|u| u * a.scale),
                "allocated": svc.nodes.len(), "serving": svc.serving.len(),
                "draining": svc.draining.len(),
            }));
            if (!a.json || plan.announce) && n_poll.is_multiple_of(40) {
                eprintln!(
                    "{policy:>10} t={wt:>5.0}s listeners {:>4} nodes {} (serving {}) observed {:>6.1} Mbit/s forecast {:>6.1}",
                    aud.on.len(),
                    svc.nodes.len(),
                    svc.serving.len(),
                    svc.usage.unwrap_or(0.0) * a.scale,
                    svc.forecast.unwrap_or(0.0) * a.scale
                );
            }
        }
    }
    while !aud.on.is_empty() {
        aud.leave_one();
    }
    while let Some(Ok((_, l))) = aud.tasks.join_next().await {
        let by_release = matches!(l.end, End::Cut(_))
            && l.server.is_some_and(|s| aud.draining_seen.contains(&s));
        aud.done.push((l, by_release));
    }
    let _ = stop_tx.send(true);
    let src_sent = src.await;
    let events: Vec<Event> = rig.admin.get("/v1/events").await.unwrap_or_default();
    let reallocs = crate::up::reallocations(&events, Some("radio"));
    let mut s = summarize(&aud.done);
    s["stall_causes"] = stall_causes(&aud.done, t0, &egress, &rig._lab.node_addrs(PORT));
    s["policy"] = policy.into();
    s["reallocations"] = reallocs.into();
    s["node_seconds"] = node_seconds.into();
    s["nodes_max"] = nodes_max.into();
    s["moved_on_drain"] = moved_total.into();
    s["moved_to_new_relays"] = rebalanced.into();
    s["source_ok"] = src_sent.map(|r| r.is_ok()).unwrap_or(false).into();
    s["speed"] = a.speed.into();
    s["scale"] = a.scale.into();
    s["interrupted"] = (*stop.borrow()).into();
    if let Some(dir) = &a.out {
        std::fs::create_dir_all(dir)?;
        std::fs::write(
            dir.join(format!("stream-live-{policy}.json")),
            serde_json::to_string_pretty(&serde_json::json!({"summary": s, "series": series}))?,
        )?;
    }
    Ok(s)
}

/// `shoal up --netns --app icecast`: the radio as a demo, with the
/// dashboard, following `--workload` (LAMA's audio by default: normalized
/// curves reach 3,000 listeners at their peak).
pub async fn up(u: &crate::up::UpArgs, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let a = BenchStreamArgs {
        saturate: false,
        levels: Vec::new(),
        hold: Duration::from_secs(1),
        arrival_rate: 20.0,
        policy: vec![u.policy.clone()],
        nodes: u.nodes,
        // The node's link stands for LAMA's 100 Mbit/s.
        scale: 100.0 / u.node_mbit,
        speed: u.speed,
        seed: 1,
        lead_time: 10.0,
        drain_timeout: 30.0,
        no_move: false,
        out: None,
        json: u.json,
    };
    validate(&a)?;
    let (curve, step) = crate::up::curve(u.workload)?;
    let plan = Plan {
        listeners: curve.iter().map(|c| c * 3000.0).collect(),
        step,
        dashboard: Some(u.dashboard.clone()),
        until: u.duration,
        announce: true,
    };
    crate::raise_nofile();
    let s = live(&a, &u.policy, &plan, &stop).await?;
    if u.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print_live(&u.policy, &s);
    }
    Ok(())
}

fn print_live(p: &str, s: &serde_json::Value) {
    println!(
        "{p:>10}: reallocations {}, peak nodes {}, node-s {:.0}, listeners {}, stall listener-s {:.1} ({} listeners), disconnected {} ({} by a release), moved {}, startup p50/p99 {:.2}/{:.2} s",
        s["reallocations"],
        s["nodes_max"],
        s["node_seconds"].as_f64().unwrap_or(0.0),
        s["listeners"],
        s["stall_listener_seconds"].as_f64().unwrap_or(0.0),
        s["stalled_listeners"],
        s["disconnected"],
        s["disconnected_by_release"],
        s["moved_on_drain"],
        s["startup_p50_s"].as_f64().unwrap_or(f64::NAN),
        s["startup_p99_s"].as_f64().unwrap_or(f64::NAN)
    );
    let c = &s["stall_causes"];
    println!(
        "{:>10}  stalls by cause: within 10 s of a connect or move {}, on a node at >= 95 % of its cap {}, other {}; per node {}",
        "", c["after_open"], c["hot_node"], c["other"], c["per_node"]
    );
}

/// Sorts every stall of a live run by its likely cause:
/// - `after_open`: within 10 s of the connection it happened on opening
///   (a first connect or a move; icecast's burst is about 4 s of audio, so
///   a new connection that does not keep up runs dry in that time);
/// - `hot_node`: otherwise, on a node whose egress was at 95 % of its cap
///   or more in the second of the stall or the one before;
/// - `other`: neither.
///
/// Also counts them per node.
fn stall_causes(
    done: &[(Listened, bool)],
    t0: Instant,
    egress: &[(f64, Vec<f64>)],
    nodes: &[SocketAddr],
) -> serde_json::Value {
    let (mut after_open, mut hot, mut other) = (0u64, 0u64, 0u64);
    let mut per_node = vec![0u64; nodes.len()];
    let mut at_util: Vec<f64> = Vec::new();
    for (l, _) in done {
        let base = l.connected.saturating_duration_since(t0).as_secs_f64();
        for st in &l.stall_log {
            let t = base + st.at;
            let node = nodes.iter().position(|n| *n == st.server);
            if let Some(i) = node {
                per_node[i] += 1;
            }
            // The egress samples covering t and the second before.
            let util = node
                .map(|i| {
                    egress
                        .iter()
                        .filter(|(s, _)| *s >= t - 1.0 && *s <= t + 1.0)
                        .map(|(_, u)| u[i])
                        .fold(0.0, f64::max)
                })
                .unwrap_or(0.0);
            at_util.push(util);
            if st.since_open < 10.0 {
                after_open += 1;
            } else if util >= 0.95 {
                hot += 1;
            } else {
                other += 1;
            }
        }
    }
    at_util.sort_by(f64::total_cmp);
    let median = at_util.get(at_util.len() / 2).copied();
    serde_json::json!({
        "after_open": after_open, "hot_node": hot, "other": other,
        "per_node": per_node, "median_node_utilization_at_stall": median,
    })
}

/// Bytes received by a root-namespace interface.
fn veth_rx_bytes(dev: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/sys/class/net/{dev}/statistics/rx_bytes"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Bytes the node's tc qdisc has sent on eth0 (its egress), from
/// `tc -s qdisc`.
fn tc_sent_bytes(ns: &str) -> Option<u64> {
    let o = std::process::Command::new("ip")
        .args([
            "netns", "exec", ns, "tc", "-s", "qdisc", "show", "dev", "eth0",
        ])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&o.stdout);
    let i = text.find("Sent ")?;
    text[i + 5..].split_whitespace().next()?.parse().ok()
}
