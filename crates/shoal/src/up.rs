//! `shoal up`: the whole system on one machine in one command. A throwaway
//! cluster (manager, N agents as separate processes with their own
//! directories and loopback addresses, a dispatcher), a demo web service on
//! the built-in `shoal www`, and a load generator that follows a workload
//! compressed in time. Ends on Ctrl-C or after --duration, stops every
//! process, and prints a summary.

use anyhow::Context;
use shoal_net::client::ApiClient;
use shoal_net::identity::{ClusterConfig, ClusterDir};
use shoal_net::wire::*;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Demo workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UpWorkload {
    /// A day of web traffic with a time-of-day effect and bursts.
    Diurnal,
    /// LAMA's audio streaming ramp: up, a 3-minute peak, down.
    LamaAudio,
    /// Up in a straight line, hold, down again.
    Ramp,
}

/// Which app serves the demo site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UpApp {
    /// The built-in `shoal www` (nothing to install).
    Www,
    /// nginx (apt-get install nginx).
    Nginx,
    /// A live radio on Debian's icecast2 (apt-get install icecast2), the
    /// first node fed by a 128 kbit/s source and every added node relaying
    /// from it, with listeners arriving and leaving as the workload says
    /// (LAMA's section 5). Needs --netns: a stream is sized on each node's
    /// own link.
    Icecast,
}

/// `shoal up` arguments.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Examples:\n  shoal up\n  shoal up --netns --self-deploy --nodes 16   (as root)\n  shoal up --nodes 4 --workload ramp --duration 60s --speed 10\n  shoal up --workload lama-audio --app nginx\n  shoal up --netns --app icecast --workload lama-audio   (as root; apt-get install icecast2)"
)]
pub struct UpArgs {
    /// Number of nodes (agents) in the pool.
    #[arg(long, default_value_t = 6)]
    pub nodes: usize,
    /// The demand the load generator follows.
    #[arg(long, value_enum, default_value_t = UpWorkload::Ramp)]
    pub workload: UpWorkload,
    /// Stop after this long (e.g. 90s, 5m); default: the workload's length.
    #[arg(long, value_parser = shoal_core::duration::parse_positive_duration)]
    pub duration: Option<Duration>,
    /// Time compression: workload seconds per real second.
    #[arg(long, default_value_t = 10.0)]
    pub speed: f64,
    /// The demo site's app.
    #[arg(long, value_enum, default_value_t = UpApp::Www)]
    pub app: UpApp,
    /// Peak request rate of the load generator, requests per second.
    #[arg(long, default_value_t = 400.0)]
    pub peak_rps: f64,
    /// Requests per second one node is sized for (the service's capacity C).
    #[arg(long, default_value_t = 100.0)]
    pub node_rps: f64,
    /// Allocation policy: threshold, ar, hpa or predictive.
    #[arg(long, default_value = "predictive")]
    pub policy: String,
    /// Dashboard address (plain HTTP, read-only; keep it on loopback).
    #[arg(long, default_value = "127.0.0.1:7480")]
    pub dashboard: String,
    /// Make every node a real host: its own network namespace, a veth pair on
    /// a private bridge, and a tc bandwidth cap, so each node's network load
    /// is measured on its own interface and the service is sized on it.
    /// Needs root.
    #[arg(long)]
    pub netns: bool,
    /// With --netns: each node's bandwidth cap (tc), Mbit/s; also the
    /// service's per-node capacity C.
    #[arg(long, default_value_t = 20.0)]
    pub node_mbit: f64,
    /// With --netns: instead of the cluster demo, the nodes are namespace
    /// hosts running sshd; `up` seeds one with the overlay and the pool
    /// deploys itself onto the rest (SMON), then restarts any peer that
    /// dies, until Ctrl-C or --duration. Needs root.
    #[arg(long, requires = "netns")]
    pub self_deploy: bool,
    /// Keep the cluster directory instead of deleting it at exit.
    #[arg(long)]
    pub keep: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// A child process in its own process group, with its output in a log file
/// and (optionally) the lines it prints mirrored into a buffer.
pub(crate) struct Child2 {
    name: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

pub(crate) fn spawn(name: &str, args: &[String], log: &Path) -> anyhow::Result<Child2> {
    spawn_in(None, name, args, log)
}

/// Spawns `shoal ARGS`, inside network namespace `netns` when given
/// (`ip netns exec` execs the program, so the pid is shoal's own).
pub(crate) fn spawn_in(
    netns: Option<&str>,
    name: &str,
    args: &[String],
    log: &Path,
) -> anyhow::Result<Child2> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe()?;
    let errlog = std::fs::File::create(log)?;
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    let mut child = cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(errlog)
        .process_group(0)
        .env(
            "SHOAL_LOG",
            std::env::var("SHOAL_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    let lines = Arc::new(Mutex::new(Vec::new()));
    if let Some(out) = child.stdout.take() {
        let l = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                l.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
    }
    Ok(Child2 {
        name: name.to_string(),
        child,
        lines,
    })
}

impl Child2 {
    pub(crate) async fn wait_line(&self, prefix: &str, within: Duration) -> anyhow::Result<String> {
        let t = Instant::now();
        loop {
            if let Some(l) = self
                .lines
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .find(|l| l.contains(prefix))
            {
                return Ok(l.clone());
            }
            if t.elapsed() > within {
                anyhow::bail!("{} did not print {prefix:?} within {within:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig);
    }
}

/// Stops children in order (dispatcher, agents, manager): SIGTERM, wait,
/// then SIGKILL to the whole group, so no process outlives `up`.
pub(crate) fn stop_all(children: &mut Vec<Child2>) {
    use nix::sys::signal::Signal;
    for c in children.iter() {
        c.signal(Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for c in children.iter_mut() {
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(c.child.id() as i32),
            Signal::SIGKILL,
        );
        let _ = c.child.wait();
    }
    children.clear();
}

/// Real hosts on one machine: a bridge in the root namespace and one network
/// namespace per node behind a veth pair, with a tc token-bucket cap on the
/// node's interface. Everything is removed on drop.
pub(crate) struct Lab {
    tag: String,
    nodes: usize,
    subnet: String,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let o = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (apt-get install iproute2)")?;
    if !o.status.success() {
        anyhow::bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(())
}

impl Lab {
    pub(crate) fn create(nodes: usize, mbit: f64) -> anyhow::Result<Lab> {
        if !nix::unistd::geteuid().is_root() {
            anyhow::bail!(
                "--netns needs root (it creates network namespaces, veth pairs and tc qdiscs); run as root or drop --netns"
            );
        }
        let pid = std::process::id();
        let lab = Lab {
            tag: format!("{:x}", pid & 0xfffff),
            nodes,
            subnet: format!("10.214.{}", pid % 250 + 1),
        };
        let br = lab.bridge();
        ip(&["link", "add", &br, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{}/24", lab.host_ip()), "dev", &br])?;
        ip(&["link", "set", &br, "up"])?;
        for i in 0..nodes {
            let ns = lab.ns(i);
            let veth = lab.veth(i);
            ip(&["netns", "add", &ns])?;
            ip(&[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            ip(&["link", "set", &veth, "master", &br])?;
            ip(&["link", "set", &veth, "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", lab.node_ip(i)),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            let rate = format!("{}kbit", (mbit * 1000.0).round() as u64);
            let o = Command::new("ip")
                .args([
                    "netns", "exec", &ns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf",
                ])
                .args(["rate", &rate, "burst", "64kb", "latency", "100ms"])
                .output()
                .context("running tc (apt-get install iproute2)")?;
            if !o.status.success() {
                anyhow::bail!("tc on {ns}: {}", String::from_utf8_lossy(&o.stderr).trim());
            }
        }
        Ok(lab)
    }
    fn bridge(&self) -> String {
        format!("shup{}", self.tag)
    }
    pub(crate) fn ns(&self, i: usize) -> String {
        format!("shoal-up-{}-{i}", self.tag)
    }
    /// The root namespace's end of node `i`'s veth pair: what it receives
    /// is the node's egress.
    pub(crate) fn veth(&self, i: usize) -> String {
        format!("shu{}n{i}", self.tag)
    }
    pub(crate) fn host_ip(&self) -> String {
        format!("{}.1", self.subnet)
    }
    /// Every node's address with `port`, in node order.
    pub(crate) fn node_addrs(&self, port: u16) -> Vec<std::net::SocketAddr> {
        (0..self.nodes)
            .filter_map(|i| format!("{}:{port}", self.node_ip(i)).parse().ok())
            .collect()
    }
    pub(crate) fn node_ip(&self, i: usize) -> String {
        format!("{}.{}", self.subnet, 10 + i)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for i in 0..self.nodes {
            let _ = ip(&["netns", "del", &self.ns(i)]);
        }
        let _ = ip(&["link", "del", &self.bridge()]);
    }
}

/// The demand curve, normalized to a peak of 1, sampled every `step`
/// workload-seconds.
pub(crate) fn curve(w: UpWorkload) -> anyhow::Result<(Vec<f64>, f64)> {
    let step = 2.0;
    let demand: Vec<f64> = match w {
        UpWorkload::Ramp => {
            // 2 minutes up, 2 at the peak, 2 down, then 4 minutes of quiet:
            // long enough for nodes to be added and, later, released.
            let n = (600.0 / step) as usize;
            (0..n)
                .map(|i| {
                    let t = i as f64 * step;
                    if t < 120.0 {
                        0.1 + 0.9 * t / 120.0
                    } else if t < 240.0 {
                        1.0
                    } else if t < 360.0 {
                        1.0 - 0.9 * (t - 240.0) / 120.0
                    } else {
                        0.1
                    }
                })
                .collect()
        }
        UpWorkload::Diurnal => {
            shoal_sim::autoscale::WorkloadSpec::Diurnal
                .build(step, 1)?
                .demand
        }
        UpWorkload::LamaAudio => {
            shoal_sim::autoscale::WorkloadSpec::LamaAudio
                .build(step, 1)?
                .demand
        }
    };
    let peak = demand.iter().cloned().fold(0.0, f64::max).max(1e-9);
    Ok((
        demand.into_iter().map(|d| (d / peak).max(0.0)).collect(),
        step,
    ))
}

fn rate_at(curve: &[f64], step: f64, t: f64) -> f64 {
    let i = t / step;
    let i0 = i.floor() as usize;
    if i0 + 1 >= curve.len() {
        return curve.last().copied().unwrap_or(0.0);
    }
    let f = i - i0 as f64;
    curve[i0] * (1.0 - f) + curve[i0 + 1] * f
}

/// Generated content: an index and a few hundred objects of mixed sizes, so
/// URL-hash locality and per-backend traffic have something to show.
fn make_site(root: &Path) -> anyhow::Result<usize> {
    std::fs::create_dir_all(root.join("obj"))?;
    let objects = 400;
    for i in 0..objects {
        let size = 1024 * (1 + (i * 37) % 32);
        let body: String = std::iter::repeat_n(format!("object {i} "), size / 10 + 1)
            .collect::<String>()
            .chars()
            .take(size)
            .collect();
        std::fs::write(root.join("obj").join(format!("{i}.html")), body)?;
    }
    std::fs::write(
        root.join("index.html"),
        "<!doctype html><title>shoal demo</title><h1>Served by shoal www</h1>\n",
    )?;
    Ok(objects)
}

#[derive(Default)]
struct LoadStats {
    sent: AtomicU64,
    ok: AtomicU64,
    errors: AtomicU64,
    latencies_us: Mutex<Vec<u32>>,
    last_error: Mutex<Option<String>>,
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
}

/// What `up` checks before it starts anything: every flag, and the demo
/// service as the manager would check it (so `--policy magic` is refused
/// before a single process runs).
fn validate(a: &UpArgs) -> anyhow::Result<()> {
    if a.nodes == 0 || a.nodes > 200 {
        anyhow::bail!("--nodes must be between 1 and 200, got {}", a.nodes);
    }
    for (flag, v) in [
        ("--speed", a.speed),
        ("--peak-rps", a.peak_rps),
        ("--node-rps", a.node_rps),
        ("--node-mbit", a.node_mbit),
    ] {
        if !(v.is_finite() && v > 0.0) {
            anyhow::bail!("{flag} must be a positive number, got {v}");
        }
    }
    if a.dashboard.parse::<std::net::SocketAddr>().is_err() {
        anyhow::bail!(
            "--dashboard {:?} must be IP:PORT, e.g. 127.0.0.1:7480 (port 0 picks a free one)",
            a.dashboard
        );
    }
    if a.netns && !nix::unistd::geteuid().is_root() {
        anyhow::bail!(
            "--netns needs root (it creates network namespaces, veth pairs and tc qdiscs); run as root or drop --netns"
        );
    }
    if a.app == UpApp::Icecast {
        if !a.netns {
            anyhow::bail!(
                "--app icecast needs --netns (each node a namespace with its own capped link, as root): a stream is sized on each node's egress"
            );
        }
        if !Path::new(shoal_agent::adaptor::icecast::PROGRAM).exists() {
            anyhow::bail!("--app icecast needs icecast2 installed (apt-get install -y icecast2)");
        }
        if a.self_deploy {
            anyhow::bail!("--app icecast and --self-deploy are two different demos; pick one");
        }
        return Ok(());
    }
    if a.app == UpApp::Nginx && !Path::new("/usr/sbin/nginx").exists() {
        anyhow::bail!(
            "--app nginx needs nginx installed (apt-get install -y nginx), or use --app www"
        );
    }
    shoal_manager::services::parse_toml(&demo_spec(a, Path::new("/nonexistent"), 20000))
        .map_err(|e| {
            anyhow::anyhow!(
                "the demo service these flags describe is invalid: {e} (--policy is one of threshold, ar, hpa, predictive)"
            )
        })?;
    Ok(())
}

/// The demo service's definition.
fn demo_spec(a: &UpArgs, root: &Path, port: u16) -> String {
    let adaptor = match a.app {
        UpApp::Www => "www",
        UpApp::Nginx => "nginx",
        UpApp::Icecast => "icecast",
    };
    format!(
        r#"name = "demo"
max_nodes = {max}
min_nodes = 1
policy = "{policy}"
lead_time_secs = 6
drain_timeout_secs = 10
period_secs = 1
role = "web"

[app]
adaptor = "{adaptor}"
port = {port}
params = {{ listen = "{{{{ node_address }}}}:{{{{ port }}}}", root = "{root}" }}

[dispatch]
algo = "url-hash"
replicas = 2

[metric]
kind = "{metric}"
capacity = {cap}
"#,
        max = a.nodes,
        policy = a.policy.replace(['"', '\\'], ""),
        root = root.display(),
        // With real hosts, each node's own interface is measured; on
        // loopback all agents would see the same counters, so the
        // dispatcher's per-backend request rate is the honest measure.
        metric = if a.netns { "net" } else { "dispatch_rps" },
        cap = if a.netns { a.node_mbit } else { a.node_rps },
    )
}

/// Loopback addresses for the nodes and the demo app's port, chosen at
/// start among free ones so that two `up` runs on one host do not collide:
/// a random 127.B.C.0/24 (never 127.0.0.x, where hand-run services live)
/// and a port below the kernel's ephemeral range that binds on every one
/// of the addresses.
fn pick_loopback_nodes(n: usize) -> anyhow::Result<(Vec<String>, u16)> {
    for _ in 0..100 {
        let r: u32 = rand::random();
        let (b, c) = (1 + (r % 254) as u8, ((r >> 8) % 256) as u8);
        let port = 20000 + ((r >> 16) % 12000) as u16;
        let addrs: Vec<String> = (0..n).map(|i| format!("127.{b}.{c}.{}", 10 + i)).collect();
        let free = addrs
            .iter()
            .all(|ad| std::net::TcpListener::bind((ad.as_str(), port)).is_ok());
        if free {
            return Ok((addrs, port));
        }
    }
    anyhow::bail!("found no free loopback addresses and port for {n} nodes")
}

/// Stop requests: SIGTERM, SIGINT and SIGHUP, caught from the very start
/// so that a signal at any moment, start-up included, stops what `up` has
/// started and removes its directory instead of killing `up` alone.
pub(crate) fn catch_stop_signals() -> anyhow::Result<tokio::sync::watch::Receiver<bool>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = hup.recv() => {}
        }
        let _ = tx.send(true);
        // Later signals are caught and ignored: `up` is already stopping.
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
                _ = hup.recv() => {}
            }
        }
    });
    Ok(rx)
}

/// The running cluster, as the load phase needs it.
struct Started {
    admin: ApiClient,
    dlisten: String,
    dash_url: String,
    objects: usize,
}

pub async fn run(a: UpArgs) -> anyhow::Result<()> {
    let stop = catch_stop_signals()?;
    validate(&a)?;
    if a.self_deploy {
        return crate::up_selfdeploy::run(a, stop).await;
    }
    if a.app == UpApp::Icecast {
        return crate::bench_stream::up(&a, stop).await;
    }
    // With --json, stdout carries the JSON summary only.
    let json = a.json;
    let say = move |line: &str| {
        if json {
            eprintln!("{line}");
        } else {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
        }
    };
    crate::raise_nofile();
    let tmp = tempfile::Builder::new().prefix("shoal-up-").tempdir()?;
    let base: PathBuf = tmp.path().to_path_buf();
    let (curve, step) = curve(a.workload)?;
    let natural = Duration::from_secs_f64(curve.len() as f64 * step / a.speed);
    let duration = a.duration.unwrap_or(natural);

    // The hosts: loopback addresses, or real namespaces with --netns.
    let mut children: Vec<Child2> = Vec::new();
    let lab = if a.netns && !*stop.borrow() {
        Some(Lab::create(a.nodes, a.node_mbit)?)
    } else {
        None
    };
    let started = {
        let startup = start_cluster(&a, &base, lab.as_ref(), &mut children);
        let mut stop = stop.clone();
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => Err(anyhow::anyhow!(
                "stopped by a signal during start-up; every process it had started is stopped"
            )),
            r = startup => r,
        }
    };
    let result = match started {
        Ok(c) => {
            say(&format!(
                "shoal up: {} nodes, workload {:?} at {}x for {:.0} s",
                a.nodes,
                a.workload,
                a.speed,
                duration.as_secs_f64()
            ));
            say(&format!("  dashboard   {}", c.dash_url));
            say(&format!(
                "  site        http://{}/ (through the dispatcher)",
                c.dlisten
            ));
            say(&format!(
                "  status      shoal status --dir {}",
                base.join("cluster").display()
            ));
            say("  Ctrl-C stops everything");
            load_phase(&a, &c, &curve, step, duration, &stop, &say).await
        }
        Err(e) => Err(e),
    };
    say("stopping the cluster...");
    stop_all(&mut children);
    drop(lab);
    if a.keep {
        let kept = tmp.keep();
        say(&format!("cluster directory kept at {}", kept.display()));
    } else {
        drop(tmp);
    }
    let summary = result?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!("summary:");
        println!("  requests        {}", summary["requests"]);
        println!("  errors          {}", summary["errors"]);
        println!(
            "  latency p50     {:.2} ms",
            summary["latency_p50_ms"].as_f64().unwrap_or(0.0)
        );
        println!(
            "  latency p99     {:.2} ms",
            summary["latency_p99_ms"].as_f64().unwrap_or(0.0)
        );
        println!(
            "  node-seconds    {:.0}",
            summary["node_seconds"].as_f64().unwrap_or(0.0)
        );
        println!("  reallocations   {}", summary["reallocations"]);
        println!(
            "  demo nodes      max {}, at the end {}",
            summary["nodes_max"], summary["nodes_end"]
        );
    }
    Ok(())
}

/// Starts the manager, the agents, the demo service and its dispatcher;
/// every process it starts is pushed on `children` at once, so a stop at
/// any point finds it there.
async fn start_cluster(
    a: &UpArgs,
    base: &Path,
    lab: Option<&Lab>,
    children: &mut Vec<Child2>,
) -> anyhow::Result<Started> {
    let host = lab
        .map(|l| l.host_ip())
        .unwrap_or_else(|| "127.0.0.1".into());
    let (node_addrs, app_port) = match lab {
        Some(l) => ((0..a.nodes).map(|i| l.node_ip(i)).collect(), 18080),
        None => pick_loopback_nodes(a.nodes)?,
    };
    let port = std::net::TcpListener::bind((host.as_str(), 0))?
        .local_addr()?
        .port();
    let listen = format!("{host}:{port}");
    let cd = ClusterDir::new(base.join("cluster"));
    cd.init(
        ClusterConfig {
            listen: listen.clone(),
            manager_url: format!("https://{listen}"),
            lease_ttl_secs: 3.0,
            ..Default::default()
        },
        false,
    )?;
    shoal_manager::store_identity::create(&cd)?;
    let dir = cd.path.display().to_string();
    let dash = match std::net::TcpListener::bind(&a.dashboard) {
        Ok(l) => {
            drop(l);
            a.dashboard.clone()
        }
        Err(_) => "127.0.0.1:0".to_string(),
    };
    children.push(spawn(
        "manager",
        &[
            "manager".into(),
            "--dir".into(),
            dir.clone(),
            "--no-discovery".into(),
            "--dashboard".into(),
            dash,
        ],
        &base.join("manager.log"),
    )?);
    let dash_url = children[0]
        .wait_line("dashboard (read-only) at", Duration::from_secs(20))
        .await?
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_string();
    let admin = ApiClient::admin(&cd, None)?;
    wait_until("the manager", Duration::from_secs(20), || async {
        admin.status().await.is_ok()
    })
    .await?;
    // In a file, not on the agents' command lines (`ps` shows those).
    let token_file = cd.path.join("token");
    let site = base.join("site");
    let objects = make_site(&site)?;
    // Each node gets its own address, as separate hosts would: its own
    // namespace with --netns (the agent finds its address on its own),
    // else its own loopback address.
    for (i, addr) in node_addrs.iter().enumerate() {
        let name = format!("node{}", i + 1);
        let mut args: Vec<String> = vec![
            "agent".into(),
            "--join".into(),
            format!("https://{listen}"),
            "--token-file".into(),
            token_file.display().to_string(),
            "--name".into(),
            name.clone(),
            "--roles".into(),
            "web".into(),
            "--dir".into(),
            base.join(&name).display().to_string(),
        ];
        if lab.is_none() {
            args.push("--address".into());
            args.push(addr.clone());
        } else {
            args.push("--capacity".into());
            args.push(format!("net_mbps={}", a.node_mbit));
        }
        let ns = lab.map(|l| l.ns(i));
        children.push(spawn_in(
            ns.as_deref(),
            &name,
            &args,
            &base.join(format!("{name}.log")),
        )?);
    }
    wait_until(
        "the agents to register",
        Duration::from_secs(30),
        || async {
            admin
                .status()
                .await
                .map(|s| {
                    s.nodes
                        .iter()
                        .filter(|n| n.state == LeaseState::Alive)
                        .count()
                        == a.nodes
                })
                .unwrap_or(false)
        },
    )
    .await?;

    // The demo service.
    let spec_toml = demo_spec(a, &site, app_port);
    std::fs::write(base.join("demo.toml"), &spec_toml)?;
    let spec: ServiceSpec = toml::from_str(&spec_toml).context("the demo service")?;
    let _: serde_json::Value = admin
        .send(reqwest::Method::PUT, "/v1/services/demo", &spec)
        .await?;
    let dport = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let dlisten = format!("127.0.0.1:{dport}");
    children.push(spawn(
        "dispatcher",
        &[
            "dispatch".into(),
            "--manager".into(),
            format!("https://{listen}"),
            "--dir".into(),
            dir.clone(),
            "--service".into(),
            "demo".into(),
            "--listen".into(),
            dlisten.clone(),
        ],
        &base.join("dispatcher.log"),
    )?);
    wait_until(
        "the first backend to serve",
        Duration::from_secs(60),
        || async {
            reqwest::get(format!("http://{dlisten}/index.html"))
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false)
        },
    )
    .await?;
    Ok(Started {
        admin,
        dlisten,
        dash_url,
        objects,
    })
}

/// The load generator, until the end of `duration` or a stop signal;
/// returns the summary.
async fn load_phase(
    a: &UpArgs,
    c: &Started,
    curve: &[f64],
    step: f64,
    duration: Duration,
    stop: &tokio::sync::watch::Receiver<bool>,
    say: &impl Fn(&str),
) -> anyhow::Result<serde_json::Value> {
    let stats = Arc::new(LoadStats::default());
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .timeout(Duration::from_secs(10))
        .build()?;
    let start = Instant::now();
    let mut node_seconds = 0.0;
    let mut last_tick = Instant::now();
    let mut next_print = Instant::now();
    let mut debt = 0.0f64;
    let inflight = Arc::new(tokio::sync::Semaphore::new(512));
    let mut last_alloc = 0usize;
    let mut max_alloc = 0usize;
    let mut pacer = tokio::time::interval(Duration::from_millis(10));
    while start.elapsed() < duration && !*stop.borrow() {
        pacer.tick().await;
        let now = Instant::now();
        let dt = now.duration_since(last_tick).as_secs_f64();
        last_tick = now;
        let wt = start.elapsed().as_secs_f64() * a.speed;
        let rps = a.peak_rps * rate_at(curve, step, wt);
        debt += rps * dt;
        node_seconds += last_alloc as f64 * dt;
        while debt >= 1.0 {
            debt -= 1.0;
            // Objects follow a skewed popularity, as web objects do.
            let r: f64 = rand::random();
            let obj = ((r * r) * c.objects as f64) as usize;
            let url = format!("http://{}/obj/{obj}.html", c.dlisten);
            let Ok(permit) = inflight.clone().try_acquire_owned() else {
                // Open loop: a request the generator cannot even send
                // counts as failed.
                stats.errors.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let (cl, st) = (client.clone(), stats.clone());
            st.sent.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let t = Instant::now();
                let r = cl.get(&url).send().await;
                let ok = match r {
                    Ok(resp) if resp.status().is_success() => resp.bytes().await.is_ok(),
                    Ok(resp) => {
                        *st.last_error.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some(format!("HTTP {}", resp.status()));
                        false
                    }
                    Err(e) => {
                        *st.last_error.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some(e.to_string());
                        false
                    }
                };
                if ok {
                    st.ok.fetch_add(1, Ordering::Relaxed);
                    let us = t.elapsed().as_micros().min(u32::MAX as u128) as u32;
                    st.latencies_us
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(us);
                } else {
                    st.errors.fetch_add(1, Ordering::Relaxed);
                }
                drop(permit);
            });
        }
        if now >= next_print {
            next_print = now + Duration::from_secs(2);
            if let Ok(s) = c.admin.status().await {
                let svc = s.services.iter().find(|x| x.name == "demo");
                last_alloc = svc.map(|x| x.nodes.len()).unwrap_or(0);
                max_alloc = max_alloc.max(last_alloc);
                let alive = s
                    .nodes
                    .iter()
                    .filter(|n| n.state == LeaseState::Alive)
                    .count();
                let line = format!(
                    "t={:>5.0}s  target {:>5.0} req/s  sent {:>7}  errors {:>3}  demo nodes {:>2}/{} [{}]",
                    start.elapsed().as_secs_f64(),
                    rps,
                    stats.sent.load(Ordering::Relaxed),
                    stats.errors.load(Ordering::Relaxed),
                    last_alloc,
                    alive,
                    svc.map(|x| x.nodes.join(",")).unwrap_or_default()
                );
                say(&line);
            }
        }
    }
    // Let requests in flight finish.
    let _ = tokio::time::timeout(Duration::from_secs(10), inflight.acquire_many(512)).await;
    let events: Vec<Event> = c.admin.get("/v1/events").await.unwrap_or_default();
    let reallocs = reallocations(&events, None);
    let mut l = std::mem::take(&mut *stats.latencies_us.lock().unwrap_or_else(|p| p.into_inner()));
    l.sort_unstable();
    let summary = serde_json::json!({
        "seconds": start.elapsed().as_secs_f64(),
        "requests": stats.sent.load(Ordering::Relaxed),
        "ok": stats.ok.load(Ordering::Relaxed),
        "errors": stats.errors.load(Ordering::Relaxed),
        "last_error": *stats.last_error.lock().unwrap_or_else(|p| p.into_inner()),
        "latency_p50_ms": pct(&l, 0.5),
        "latency_p99_ms": pct(&l, 0.99),
        "node_seconds": node_seconds,
        "nodes_max": max_alloc,
        "nodes_end": last_alloc,
        "reallocations": reallocs,
        "interrupted": *stop.borrow(),
    });
    Ok(summary)
}

/// Nodes added plus nodes released (of `service`, or of any), as the
/// simulator counts them: each decision reads "...: add(k): reason" or
/// "...: release(k): ...".
pub(crate) fn reallocations(events: &[Event], service: Option<&str>) -> u64 {
    events
        .iter()
        .filter(|e| e.kind == "decision")
        .filter(|e| service.is_none_or(|s| e.service.as_deref() == Some(s)))
        .filter_map(|e| {
            let m = &e.message;
            let i = m
                .find("add(")
                .map(|i| i + 4)
                .or_else(|| m.find("release(").map(|i| i + 8))?;
            m[i..].split(')').next()?.parse::<u64>().ok()
        })
        .sum()
}

pub(crate) async fn wait_until<F, Fut>(what: &str, within: Duration, mut f: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t = Instant::now();
    while !f().await {
        if t.elapsed() > within {
            anyhow::bail!(
                "timed out after {within:?} waiting for {what}; logs are in the cluster directory (rerun with --keep)"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}
