//! `shoal bench federation`: H-SWEB between two real clusters (docs/federation.md).
//!
//! The process moves into a network namespace of its own (`unshare`), so
//! everything it starts shares a private loopback that nothing else on the
//! machine sees. Each cluster has a /24 of it: east 127.0.1.0/24, west
//! 127.0.2.0/24; servers (manager .1, dispatcher .2, nodes .10 and .11) in
//! the lower half, clients (.200) in the upper half. `tc` on that loopback
//! shapes what crosses between the /24s: the clusters' own link (managers'
//! exchanges, dispatchers' fetches) at `--link-mbit`, a client's path to
//! the other cluster at `--client-mbit`, both with `--rtt-ms` of round
//! trip; traffic inside a cluster is not shaped. Each cluster is a real
//! `shoal manager`, two `shoal agent`s running `shoal www` (each capped at
//! `--node-cpus` by a CPU cgroup) and a `shoal dispatch` following the
//! service; the clusters are linked by `shoal federation join`.
//!
//! Scenarios: `table1` (H-SWEB Table 1: client and data at each site, 10 KB
//! and 1.5 MB files), `speedup` (remote data, the cost model against
//! local-only and always-redirect), `cpu` (one cluster loaded with the
//! CPU-heavy route, then both), `dead` (the peer's manager and dispatcher
//! killed, then restarted), `overhead` (bytes of the exchange on the
//! clusters' link at rest).

use anyhow::{Context, bail};
use serde::Serialize;
use shoal_core::federation::wire::{DecisionCounts, FederationStatus};
use shoal_net::client::ApiClient;
use shoal_net::identity::ClusterDir;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `shoal bench federation` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchFederationArgs {
    /// Scenarios, comma-separated: table1, speedup, cpu, dead, overhead, or all.
    #[arg(long, default_value = "all")]
    pub scenarios: String,
    /// The clusters' own link, Mbit/s (H-SWEB's busy KSU T1).
    #[arg(long, default_value_t = 8.0)]
    pub link_mbit: f64,
    /// A client's path to the other cluster, Mbit/s.
    #[arg(long, default_value_t = 40.0)]
    pub client_mbit: f64,
    /// Round trip between the clusters, and from a client to the other
    /// cluster, ms.
    #[arg(long, default_value_t = 40.0)]
    pub rtt_ms: f64,
    /// CPUs of each node (its `shoal www` cgroup cap).
    #[arg(long, default_value_t = 0.25)]
    pub node_cpus: f64,
    /// Requests per size and mode in `speedup` (10 KB; a quarter of them
    /// for 1.5 MB).
    #[arg(long, default_value_t = 40)]
    pub requests: usize,
    /// Seconds of load per phase in `cpu`.
    #[arg(long, default_value_t = 20.0)]
    pub cpu_secs: f64,
    /// Seconds at rest in `overhead`.
    #[arg(long, default_value_t = 60.0)]
    pub rest_secs: f64,
    /// The short version (the test suite's): fewer requests, shorter phases.
    #[arg(long)]
    pub quick: bool,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

const SMALL: usize = 10_000;
const LARGE: usize = 1_500_000;
const FILES: usize = 8;
const BURN_MS: u64 = 40;
const CPU_CLIENTS: usize = 6;

#[derive(Debug, Default, Serialize)]
struct Cell {
    client: &'static str,
    data: &'static str,
    size: &'static str,
    requests: usize,
    local: u64,
    fetch: u64,
    redirect: u64,
    failed: usize,
    mean_ms: f64,
}

#[derive(Debug, Default, Serialize)]
struct Times {
    requests: usize,
    failed: usize,
    mean_ms: f64,
    p99_ms: f64,
}

#[derive(Debug, Default, Serialize)]
struct Report {
    /// Whether `rtt_ms` was added on the shaped paths (needs sch_netem).
    rtt_emulated: bool,
    link_mbit: f64,
    client_mbit: f64,
    rtt_ms: f64,
    node_cpus: f64,
    /// Large remote requests each cluster's client made before the peer
    /// had measured the path to it (exploration).
    warmup_requests: std::collections::BTreeMap<String, usize>,
    table1: Vec<Cell>,
    /// mode -> size -> times.
    speedup: std::collections::BTreeMap<String, std::collections::BTreeMap<String, Times>>,
    speedup_small: Option<f64>,
    speedup_large: Option<f64>,
    speedup_small_vs_redirect: Option<f64>,
    speedup_large_vs_redirect: Option<f64>,
    cpu: std::collections::BTreeMap<String, Times>,
    speedup_cpu: Option<f64>,
    cpu_shed_share_one_loaded: Option<f64>,
    cpu_shed_share_both_loaded: Option<f64>,
    dead_detected_s: Option<f64>,
    dead_timeout_s: Option<f64>,
    sent_to_dead_after_timeout: Option<u64>,
    failed_while_dying: Option<usize>,
    revived_s: Option<f64>,
    used_again: Option<bool>,
    /// From its restart to five remote requests answered through it.
    used_again_s: Option<f64>,
    overhead_link_bytes: Option<u64>,
    overhead_secs: Option<f64>,
    overhead_share: Option<f64>,
    overhead_manager_bytes: Option<u64>,
}

struct Procs(Vec<(String, Child)>);
impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn sh(cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn shoal(args: &[&str]) -> anyhow::Result<String> {
    let exe = std::env::current_exe()?;
    sh(exe.to_str().unwrap_or("shoal"), args)
}

/// The loopback of the private namespace, shaped between the clusters'
/// address blocks. Classes: 1:10 east servers to west, 1:11 west servers
/// to east, 1:12/1:13 east's clients to and from west, 1:14/1:15 west's
/// clients to and from east; the rest (inside a cluster) unshaped.
fn shape(a: &BenchFederationArgs) -> anyhow::Result<bool> {
    let mut netem_missing = false;
    sh("ip", &["link", "set", "lo", "mtu", "1500"])?;
    sh("ip", &["link", "set", "lo", "up"])?;
    let tc = |args: &str| -> anyhow::Result<()> {
        let v: Vec<&str> = args.split_whitespace().collect();
        sh("tc", &v).map(|_| ())
    };
    tc("qdisc add dev lo root handle 1: htb default 1")?;
    tc("class add dev lo parent 1: classid 1:1 htb rate 10gbit")?;
    let one_way = format!("{}ms", a.rtt_ms / 2.0);
    let classes = [
        (10, a.link_mbit, "127.0.1.0/25", "127.0.2.0/24"),
        (11, a.link_mbit, "127.0.2.0/25", "127.0.1.0/25"),
        (12, a.client_mbit, "127.0.1.128/25", "127.0.2.0/24"),
        (13, a.client_mbit, "127.0.2.0/25", "127.0.1.128/25"),
        (14, a.client_mbit, "127.0.2.128/25", "127.0.1.0/24"),
        (15, a.client_mbit, "127.0.1.0/25", "127.0.2.128/25"),
    ];
    for (id, mbit, src, dst) in classes {
        tc(&format!(
            "class add dev lo parent 1: classid 1:{id} htb rate {mbit}mbit ceil {mbit}mbit"
        ))?;
        // The round trip needs sch_netem; a kernel without it (this
        // project's test machines) gets the bandwidths only, and the
        // report says so.
        if a.rtt_ms > 0.0
            && tc(&format!(
                "qdisc add dev lo parent 1:{id} handle {id}: netem delay {one_way} limit 100000"
            ))
            .is_err()
        {
            netem_missing = true;
        }
        // Clients first: their /25 is inside the cluster's /24.
        let prio = if id >= 12 { 1 } else { 2 };
        tc(&format!(
            "filter add dev lo parent 1: protocol ip prio {prio} u32 match ip src {src} match ip dst {dst} flowid 1:{id}"
        ))?;
    }
    Ok(!netem_missing && a.rtt_ms > 0.0)
}

fn class_bytes(id: u32) -> u64 {
    let Ok(out) = sh(
        "tc",
        &[
            "-s",
            "class",
            "show",
            "dev",
            "lo",
            "classid",
            &format!("1:{id}"),
        ],
    ) else {
        return 0;
    };
    out.split("Sent ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

struct ClusterRig {
    name: &'static str,
    net: u8,
    dir: PathBuf,
    data: PathBuf,
    log: PathBuf,
    manager: Option<Child>,
    dispatcher: Option<Child>,
    agents: Vec<Child>,
}

impl ClusterRig {
    fn ip(&self, host: u8) -> String {
        format!("127.0.{}.{host}", self.net)
    }
    fn manager_url(&self) -> String {
        format!("https://{}:7400", self.ip(1))
    }
    fn dispatcher_addr(&self) -> String {
        format!("{}:8080", self.ip(2))
    }
    fn client_ip(&self) -> IpAddr {
        self.ip(200).parse().expect("an address")
    }
    fn admin(&self) -> anyhow::Result<ApiClient> {
        Ok(ApiClient::admin(&ClusterDir::new(&self.dir), None)?)
    }

    fn spawn(&self, what: &str, args: &[String]) -> anyhow::Result<Child> {
        let log = std::fs::File::create(self.log.join(format!("{what}.log")))?;
        Ok(Command::new(std::env::current_exe()?)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?)
    }

    fn create(root: &Path, name: &'static str, net: u8) -> anyhow::Result<Self> {
        let base = root.join(name);
        let dir = base.join("cluster");
        let data = base.join("data");
        let log = base.join("log");
        for d in [&data, &log] {
            std::fs::create_dir_all(d)?;
        }
        // The site's own data: 10 KB and 1.5 MB files, under /<name>/.
        for (size, n) in [("small", SMALL), ("large", LARGE)] {
            let d = data.join(name).join(size);
            std::fs::create_dir_all(&d)?;
            for i in 0..FILES {
                let body: Vec<u8> = (0..n).map(|j| ((i * 31 + j * 7) % 251) as u8).collect();
                std::fs::write(d.join(i.to_string()), body)?;
            }
        }
        let mut c = Self {
            name,
            net,
            dir,
            data,
            log,
            manager: None,
            dispatcher: None,
            agents: Vec::new(),
        };
        shoal(&[
            "init",
            "--dir",
            c.dir.to_str().unwrap(),
            "--listen",
            &format!("{}:7400", c.ip(1)),
            "--name",
            name,
        ])?;
        c.start_manager()?;
        Ok(c)
    }

    fn start_manager(&mut self) -> anyhow::Result<()> {
        self.manager = Some(self.spawn(
            "manager",
            &[
                "manager".into(),
                "--dir".into(),
                self.dir.display().to_string(),
                "--no-discovery".into(),
                "--dashboard".into(),
                "off".into(),
            ],
        )?);
        Ok(())
    }

    fn start_dispatcher(&mut self) -> anyhow::Result<()> {
        self.dispatcher = Some(self.spawn(
            "dispatch",
            &[
                "dispatch".into(),
                "--listen".into(),
                self.dispatcher_addr(),
                "--admin".into(),
                format!("{}:9090", self.ip(2)),
                "--service".into(),
                "web".into(),
                "--dir".into(),
                self.dir.display().to_string(),
                "--threads".into(),
                "1".into(),
            ],
        )?);
        Ok(())
    }

    fn spec(&self, a: &BenchFederationArgs, mode: &str) -> String {
        format!(
            r#"name = "web"
min_nodes = 2
max_nodes = 2
[app]
adaptor = "www"
port = 8081
[app.params]
listen = "{{{{ node_address }}}}:{{{{ port }}}}"
root = "{root}"
cpus = "{cpus}"
[metric]
kind = "dispatch_rps"
capacity = 1000
[dispatch]
algo = "lc"
[federation]
threshold = "30ms"
client_mbit = 1000
mode = "{mode}"
"#,
            root = self.data.display(),
            cpus = a.node_cpus,
        )
    }

    async fn apply(&self, a: &BenchFederationArgs, mode: &str) -> anyhow::Result<()> {
        let f = self.log.join("web.toml");
        std::fs::write(&f, self.spec(a, mode))?;
        shoal(&[
            "service",
            "apply",
            f.to_str().unwrap(),
            "--dir",
            self.dir.to_str().unwrap(),
        ])?;
        Ok(())
    }

    async fn fed(&self) -> anyhow::Result<FederationStatus> {
        Ok(self.admin()?.get("/v1/federation").await?)
    }

    async fn decisions(&self) -> DecisionCounts {
        self.fed()
            .await
            .ok()
            .and_then(|s| s.decisions.get("web").copied())
            .unwrap_or_default()
    }
}

async fn wait<F, Fut>(what: &str, within: Duration, mut f: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t0 = Instant::now();
    while t0.elapsed() < within {
        if f().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("{what}: not within {within:?}")
}

/// A client at `ip`, following redirects.
fn client(ip: IpAddr) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .local_address(ip)
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::limited(2))
        .pool_max_idle_per_host(0)
        .build()?)
}

/// One GET: (ms, redirected, ok).
async fn get(c: &reqwest::Client, url: &str) -> (f64, bool, bool) {
    let t0 = Instant::now();
    match c.get(url).send().await {
        Ok(r) => {
            let redirected = r.url().as_str() != url;
            let ok = r.status().is_success();
            let body = r.bytes().await;
            (
                t0.elapsed().as_secs_f64() * 1e3,
                redirected,
                ok && body.is_ok(),
            )
        }
        Err(_) => (t0.elapsed().as_secs_f64() * 1e3, false, false),
    }
}

fn times(mut v: Vec<f64>, failed: usize) -> Times {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Times {
        requests: n,
        failed,
        mean_ms: if n > 0 {
            v.iter().sum::<f64>() / n as f64
        } else {
            0.0
        },
        p99_ms: if n > 0 {
            v[((n as f64 * 0.99).ceil() as usize).clamp(1, n) - 1]
        } else {
            0.0
        },
    }
}

fn delta(a: DecisionCounts, b: DecisionCounts) -> DecisionCounts {
    DecisionCounts {
        local: b.local - a.local,
        local_consulted: b.local_consulted - a.local_consulted,
        fetch: b.fetch - a.fetch,
        redirect: b.redirect - a.redirect,
        from_peers: b.from_peers - a.from_peers,
    }
}

/// The decisions `c`'s dispatcher made since `before`, once it has
/// reported at least `n` of them (it reports every second), or what it
/// reported within 10 s: a count read too early would miss decisions, and
/// a "nothing was sent" would then hold for want of a report.
async fn counted(c: &ClusterRig, before: DecisionCounts, n: u64) -> DecisionCounts {
    let t0 = Instant::now();
    loop {
        let d = delta(before, c.decisions().await);
        if d.local + d.local_consulted + d.fetch + d.redirect >= n
            || t0.elapsed() > Duration::from_secs(10)
        {
            return d;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs the benchmark (root: namespaces, tc, cgroups).
pub fn run(mut a: BenchFederationArgs) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "shoal bench federation needs root: it makes a network namespace, shapes it with tc and caps nodes with CPU cgroups"
        );
    }
    if a.quick {
        a.requests = a.requests.min(12);
        a.cpu_secs = a.cpu_secs.min(8.0);
        a.rest_secs = a.rest_secs.min(12.0);
    }
    // Before any thread: the namespace is the calling thread's, and what
    // it starts (threads, children) inherit it.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).context("unshare(CLONE_NEWNET)")?;
    let rtt_emulated = shape(&a)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let tmp = tempfile::tempdir()?;
    let r = rt.block_on(bench(&a, tmp.path()));
    // The nodes' www processes outlive their agents by design: stop them.
    for (pid, _) in shoal_overlay::netlab::processes_with(tmp.path().to_str().unwrap_or("")) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    shoal_overlay::netlab::kill_processes_with(
        tmp.path().to_str().unwrap_or("?"),
        Duration::from_secs(3),
    );
    let mut report = r?;
    report.rtt_emulated = rtt_emulated;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

async fn bench(a: &BenchFederationArgs, root: &Path) -> anyhow::Result<Report> {
    let want: Vec<&str> = a.scenarios.split(',').map(str::trim).collect();
    let on = |s: &str| want.contains(&"all") || want.contains(&s);
    let mut east = ClusterRig::create(root, "east", 1)?;
    let mut west = ClusterRig::create(root, "west", 2)?;
    let _guard = Procs(Vec::new());
    for c in [&east, &west] {
        wait("manager up", Duration::from_secs(20), || async {
            c.admin().ok().is_some()
                && match c.admin() {
                    Ok(x) => x.status().await.is_ok(),
                    Err(_) => false,
                }
        })
        .await?;
    }
    // Agents.
    for c in [&mut east, &mut west] {
        let token = shoal(&["token", "--dir", c.dir.to_str().unwrap()])?;
        for (i, host) in [10u8, 11].into_iter().enumerate() {
            let name = format!("{}{}", c.name, i + 1);
            let adir = c.log.join(format!("agent-{name}"));
            let child = c.spawn(
                &format!("agent-{name}"),
                &[
                    "agent".into(),
                    "--join".into(),
                    c.manager_url(),
                    "--token".into(),
                    token.trim().into(),
                    "--name".into(),
                    name.clone(),
                    "--dir".into(),
                    adir.display().to_string(),
                    "--address".into(),
                    c.ip(host),
                ],
            )?;
            c.agents.push(child);
        }
        c.apply(a, "cost").await?;
    }
    for c in [&east, &west] {
        wait("two backends serving", Duration::from_secs(40), || async {
            match c.admin() {
                Ok(x) => x
                    .get::<shoal_net::wire::BackendList>("/v1/services/web/backends")
                    .await
                    .map(|l| l.backends.iter().filter(|b| !b.draining).count() >= 2)
                    .unwrap_or(false),
                Err(_) => false,
            }
        })
        .await?;
    }
    east.start_dispatcher()?;
    west.start_dispatcher()?;
    // Link them: a federation token minted on west, joined from east.
    let token = shoal(&[
        "token",
        "create",
        "--dir",
        west.dir.to_str().unwrap(),
        "--roles",
        "federation",
        "--ttl",
        "10m",
        "--uses",
        "1",
    ])?;
    let token = token
        .lines()
        .find(|l| l.starts_with("shoal1."))
        .unwrap_or(token.trim())
        .to_string();
    shoal(&[
        "federation",
        "join",
        &west.manager_url(),
        "--token",
        &token,
        "--dir",
        east.dir.to_str().unwrap(),
    ])?;
    // Each side sees the other's summary with its objects.
    for (c, other) in [(&east, "west"), (&west, "east")] {
        wait(
            "the peer's summary with its objects",
            Duration::from_secs(40),
            || async {
                c.fed().await.is_ok_and(|s| {
                    s.peers.iter().any(|p| {
                        p.cluster == other
                            && p.state == "alive"
                            && p.summaries.iter().any(|x| x.objects.len() >= 2 * FILES)
                    })
                })
            },
        )
        .await?;
    }
    let mut rep = Report {
        link_mbit: a.link_mbit,
        client_mbit: a.client_mbit,
        rtt_ms: a.rtt_ms,
        node_cpus: a.node_cpus,
        ..Report::default()
    };
    // The path from each cluster to the other's clients is measured on
    // the clients redirected there: the first large requests explore it
    // (shoal-core's explore_now), until the peer's summary carries it.
    for (c, other) in [(&east, &west), (&west, &east)] {
        let http = client(c.client_ip())?;
        let t0 = Instant::now();
        let mut n = 0;
        loop {
            let measured = c.fed().await.is_ok_and(|s| {
                s.peers.iter().any(|p| {
                    p.cluster == other.name
                        && p.summaries.iter().any(|x| {
                            x.client_paths
                                .iter()
                                .any(|cp| cp.from == c.name && cp.samples > 0)
                        })
                })
            });
            if measured {
                break;
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!(
                    "{}'s path to {}'s clients was not measured within 60 s",
                    other.name,
                    c.name
                );
            }
            let url = format!(
                "http://{}/{}/large/{}",
                c.dispatcher_addr(),
                other.name,
                n % FILES
            );
            get(&http, &url).await;
            n += 1;
        }
        rep.warmup_requests.insert(c.name.to_string(), n);
    }
    if on("table1") {
        table1(a, &east, &west, &mut rep).await?;
    }
    if on("speedup") {
        speedup(a, &east, &west, &mut rep).await?;
    }
    if on("cpu") {
        cpu(a, &east, &west, &mut rep).await?;
    }
    if on("overhead") {
        overhead(a, &east, &mut rep).await?;
    }
    if on("dead") {
        dead(&east, &mut west, &mut rep).await?;
    }
    for c in [&mut east, &mut west] {
        for ch in c
            .agents
            .iter_mut()
            .chain(c.dispatcher.iter_mut())
            .chain(c.manager.iter_mut())
        {
            let _ = ch.kill();
            let _ = ch.wait();
        }
    }
    Ok(rep)
}

async fn table1(
    a: &BenchFederationArgs,
    east: &ClusterRig,
    west: &ClusterRig,
    rep: &mut Report,
) -> anyhow::Result<()> {
    let n_small = a.requests.clamp(4, 20);
    let n_large = (a.requests / 4).clamp(3, 8);
    for (client_at, c) in [("east", east), ("west", west)] {
        let http = client(c.client_ip())?;
        for data in ["east", "west"] {
            for (size, n) in [("small", n_small), ("large", n_large)] {
                let before = c.decisions().await;
                let mut ms = Vec::new();
                let mut failed = 0;
                let mut redirected = 0u64;
                for i in 0..n {
                    let url = format!("http://{}/{data}/{size}/{}", c.dispatcher_addr(), i % FILES);
                    let (t, r, ok) = get(&http, &url).await;
                    if !ok {
                        failed += 1;
                    }
                    redirected += u64::from(r);
                    ms.push(t);
                }
                let d = counted(c, before, n as u64).await;
                rep.table1.push(Cell {
                    client: client_at,
                    data,
                    size,
                    requests: n,
                    local: d.local + d.local_consulted,
                    fetch: d.fetch,
                    redirect: d.redirect.max(redirected),
                    failed,
                    mean_ms: ms.iter().sum::<f64>() / ms.len().max(1) as f64,
                });
            }
        }
    }
    Ok(())
}

async fn set_mode(a: &BenchFederationArgs, c: &ClusterRig, mode: &str) -> anyhow::Result<()> {
    c.apply(a, mode).await?;
    // The next report's answer carries it.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    Ok(())
}

async fn speedup(
    a: &BenchFederationArgs,
    east: &ClusterRig,
    _west: &ClusterRig,
    rep: &mut Report,
) -> anyhow::Result<()> {
    let http = client(east.client_ip())?;
    for mode in ["cost", "local", "redirect"] {
        set_mode(a, east, mode).await?;
        let mut per = std::collections::BTreeMap::new();
        for (size, n) in [("small", a.requests), ("large", (a.requests / 4).max(3))] {
            let mut ms = Vec::new();
            let mut failed = 0;
            for i in 0..n {
                let url = format!(
                    "http://{}/west/{size}/{}",
                    east.dispatcher_addr(),
                    i % FILES
                );
                let (t, _, ok) = get(&http, &url).await;
                if ok {
                    ms.push(t);
                } else {
                    failed += 1;
                }
            }
            per.insert(size.to_string(), times(ms, failed));
        }
        rep.speedup.insert(mode.to_string(), per);
    }
    set_mode(a, east, "cost").await?;
    let m = |mode: &str, size: &str| {
        rep.speedup
            .get(mode)
            .and_then(|x| x.get(size))
            .map(|t| t.mean_ms)
    };
    let ratio = |x: Option<f64>, y: Option<f64>| match (x, y) {
        (Some(x), Some(y)) if y > 0.0 => Some(x / y),
        _ => None,
    };
    rep.speedup_small = ratio(m("local", "small"), m("cost", "small"));
    rep.speedup_large = ratio(m("local", "large"), m("cost", "large"));
    rep.speedup_small_vs_redirect = ratio(m("redirect", "small"), m("cost", "small"));
    rep.speedup_large_vs_redirect = ratio(m("redirect", "large"), m("cost", "large"));
    Ok(())
}

/// `clients` loops at `at`, each GETting `url` until `secs` pass.
async fn load(at: IpAddr, url: String, clients: usize, secs: f64) -> (Vec<f64>, usize) {
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let Ok(c) = client(at) else {
                return (Vec::new(), 1);
            };
            let t0 = Instant::now();
            let mut ms = Vec::new();
            let mut failed = 0;
            while t0.elapsed().as_secs_f64() < secs {
                let (t, _, ok) = get(&c, &url).await;
                if ok {
                    ms.push(t);
                } else {
                    failed += 1;
                }
            }
            (ms, failed)
        }));
    }
    let mut all = Vec::new();
    let mut failed = 0;
    for t in tasks {
        if let Ok((m, f)) = t.await {
            all.extend(m);
            failed += f;
        }
    }
    (all, failed)
}

async fn cpu(
    a: &BenchFederationArgs,
    east: &ClusterRig,
    west: &ClusterRig,
    rep: &mut Report,
) -> anyhow::Result<()> {
    let url = |c: &ClusterRig| format!("http://{}/_shoal/burn?ms={BURN_MS}", c.dispatcher_addr());
    // Warm the class times (each cluster times the route unloaded).
    for c in [east, west] {
        let http = client(c.client_ip())?;
        for _ in 0..4 {
            get(&http, &url(c)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for mode in ["local", "cost"] {
        set_mode(a, east, mode).await?;
        let before = east.decisions().await;
        let (ms, failed) = load(east.client_ip(), url(east), CPU_CLIENTS, a.cpu_secs).await;
        let d = counted(east, before, (ms.len() + failed) as u64).await;
        if mode == "cost" {
            let total = (d.local + d.local_consulted + d.fetch + d.redirect).max(1);
            rep.cpu_shed_share_one_loaded = Some((d.fetch + d.redirect) as f64 / total as f64);
        }
        rep.cpu
            .insert(format!("east_loaded_{mode}"), times(ms, failed));
    }
    // Both loaded: east's own clients and west's at once.
    let before = east.decisions().await;
    let (e, w) = tokio::join!(
        load(east.client_ip(), url(east), CPU_CLIENTS, a.cpu_secs),
        load(west.client_ip(), url(west), CPU_CLIENTS, a.cpu_secs)
    );
    // East's dispatcher decides for its own clients' requests only (what
    // west fetches or is redirected here counts as from_peers).
    let d = counted(east, before, (e.0.len() + e.1) as u64).await;
    let total = (d.local + d.local_consulted + d.fetch + d.redirect).max(1);
    rep.cpu_shed_share_both_loaded = Some((d.fetch + d.redirect) as f64 / total as f64);
    rep.cpu.insert("both_loaded_east".into(), times(e.0, e.1));
    rep.cpu.insert("both_loaded_west".into(), times(w.0, w.1));
    let m = |k: &str| rep.cpu.get(k).map(|t| t.mean_ms);
    rep.speedup_cpu = match (m("east_loaded_local"), m("east_loaded_cost")) {
        (Some(x), Some(y)) if y > 0.0 => Some(x / y),
        _ => None,
    };
    Ok(())
}

async fn overhead(
    a: &BenchFederationArgs,
    east: &ClusterRig,
    rep: &mut Report,
) -> anyhow::Result<()> {
    // At rest: nothing but the exchange (and its probes) on the link.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let b0 = class_bytes(10) + class_bytes(11);
    let m0 = east
        .fed()
        .await?
        .peers
        .first()
        .map_or(0, |p| p.bytes_sent + p.bytes_received);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(a.rest_secs)).await;
    let secs = t0.elapsed().as_secs_f64();
    let b1 = class_bytes(10) + class_bytes(11);
    let m1 = east
        .fed()
        .await?
        .peers
        .first()
        .map_or(0, |p| p.bytes_sent + p.bytes_received);
    let bytes = b1 - b0;
    rep.overhead_link_bytes = Some(bytes);
    rep.overhead_secs = Some(secs);
    // Both directions over the capacity of both: the link is full duplex.
    rep.overhead_share = Some(bytes as f64 * 8.0 / (secs * 2.0 * a.link_mbit * 1e6));
    rep.overhead_manager_bytes = Some(m1.saturating_sub(m0));
    Ok(())
}

async fn dead(east: &ClusterRig, west: &mut ClusterRig, rep: &mut Report) -> anyhow::Result<()> {
    let http = client(east.client_ip())?;
    let remote = format!("http://{}/west/small/1", east.dispatcher_addr());
    let timeout_s = east
        .fed()
        .await?
        .peers
        .iter()
        .find(|p| p.cluster == "west")
        .map(|p| p.dead_after_ms as f64 / 1e3);
    rep.dead_timeout_s = timeout_s;
    for ch in west.dispatcher.iter_mut().chain(west.manager.iter_mut()) {
        let _ = ch.kill();
        let _ = ch.wait();
    }
    let t0 = Instant::now();
    let mut failed = 0;
    let mut detected = None;
    while t0.elapsed() < Duration::from_secs(60) {
        let (_, _, ok) = get(&http, &remote).await;
        if !ok {
            failed += 1;
        }
        let st = east.fed().await?;
        if st
            .peers
            .iter()
            .any(|p| p.cluster == "west" && p.state == "presumed dead")
        {
            detected = Some(t0.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    rep.dead_detected_s = detected;
    rep.failed_while_dying = Some(failed);
    // Presumed dead: nothing more goes to it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = east.decisions().await;
    for _ in 0..10 {
        get(&http, &remote).await;
    }
    let d = counted(east, before, 10).await;
    rep.sent_to_dead_after_timeout = Some(d.fetch + d.redirect);
    // Back: its manager and dispatcher again, same addresses.
    west.start_manager()?;
    let t1 = Instant::now();
    wait("west's manager back", Duration::from_secs(20), || async {
        match west.admin() {
            Ok(x) => x.status().await.is_ok(),
            Err(_) => false,
        }
    })
    .await?;
    west.start_dispatcher()?;
    let mut revived = None;
    while t1.elapsed() < Duration::from_secs(60) {
        let st = east.fed().await?;
        if st
            .peers
            .iter()
            .any(|p| p.cluster == "west" && p.state == "alive")
        {
            revived = Some(t1.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    rep.revived_s = revived;
    // Used again: a remote request answered through it, within 30 s of
    // its return (its dispatcher must follow its manager and report).
    let before = east.decisions().await;
    let mut ok_n = 0;
    let mut tries = 0u64;
    let t2 = Instant::now();
    while ok_n < 5 && t2.elapsed() < Duration::from_secs(30) {
        tries += 1;
        if get(&http, &remote).await.2 {
            ok_n += 1;
        } else {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let d = counted(east, before, tries).await;
    rep.used_again = Some(d.fetch + d.redirect > 0 && ok_n >= 5);
    rep.used_again_s = Some(t1.elapsed().as_secs_f64());
    Ok(())
}

fn print_report(r: &Report) {
    println!(
        "link {} Mbit/s, clients' path {} Mbit/s, RTT {} ms{}, nodes {} CPU",
        r.link_mbit,
        r.client_mbit,
        r.rtt_ms,
        if r.rtt_emulated {
            ""
        } else {
            " NOT ADDED (no sch_netem on this kernel)"
        },
        r.node_cpus
    );
    if !r.table1.is_empty() {
        println!("Table 1 (decisions at the client's cluster):");
        println!(
            "{:<7} {:<7} {:<6} {:>5} {:>6} {:>6} {:>9} {:>7} {:>9}",
            "CLIENT", "DATA", "SIZE", "N", "LOCAL", "FETCH", "REDIRECT", "FAILED", "MEAN MS"
        );
        for c in &r.table1 {
            println!(
                "{:<7} {:<7} {:<6} {:>5} {:>6} {:>6} {:>9} {:>7} {:>9.1}",
                c.client,
                c.data,
                c.size,
                c.requests,
                c.local,
                c.fetch,
                c.redirect,
                c.failed,
                c.mean_ms
            );
        }
    }
    for (mode, per) in &r.speedup {
        for (size, t) in per {
            println!(
                "remote data {size:<5} {mode:<8} mean {:>8.1} ms  p99 {:>8.1} ms  ({} requests, {} failed)",
                t.mean_ms, t.p99_ms, t.requests, t.failed
            );
        }
    }
    let f = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.2}"));
    println!(
        "speedup over local-only: small {}, large {}; over always-redirect: small {}, large {}",
        f(r.speedup_small),
        f(r.speedup_large),
        f(r.speedup_small_vs_redirect),
        f(r.speedup_large_vs_redirect)
    );
    for (k, t) in &r.cpu {
        println!(
            "cpu {k:<20} mean {:>8.1} ms  p99 {:>8.1} ms  ({} requests, {} failed)",
            t.mean_ms, t.p99_ms, t.requests, t.failed
        );
    }
    println!(
        "speedup_cpu {}; shed share one loaded {}, both loaded {}",
        f(r.speedup_cpu),
        f(r.cpu_shed_share_one_loaded),
        f(r.cpu_shed_share_both_loaded)
    );
    println!(
        "dead peer: presumed dead after {} s (timeout {} s), {} failed while dying, {} sent after; back after {} s, used again {:?}",
        f(r.dead_detected_s),
        f(r.dead_timeout_s),
        r.failed_while_dying.unwrap_or(0),
        r.sent_to_dead_after_timeout.unwrap_or(0),
        f(r.revived_s),
        r.used_again
    );
    println!(
        "overhead at rest: {} bytes on the link in {} s = {} of it (manager counted {} bytes)",
        r.overhead_link_bytes.unwrap_or(0),
        f(r.overhead_secs),
        r.overhead_share
            .map_or("-".into(), |s| format!("{:.3} %", s * 100.0)),
        r.overhead_manager_bytes.unwrap_or(0)
    );
}
