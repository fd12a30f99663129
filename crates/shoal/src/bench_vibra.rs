//! `shoal bench vibra`: Vibra's bandwidth reallocation and failure
//! compensation on real hosts (thesis 3.5.3, 4.4). Network namespaces on a
//! bridge (the namespace lab): the dispatcher on h1, four backends on
//! h2-h5 each running `shoal www --cache-mb`, each backend's egress capped
//! by an htb class (the agent's shaper). The bench replays a
//! World-Cup-like trace open-loop at its recorded times from this
//! namespace and measures response time, disk reads and throughput.
//!
//! With reallocation, the bench drives `shoal_core::bandwidth::Directory`
//! every second exactly as the manager does: the shapers' offered rates
//! and caps in force go in, the directory's cap changes come out and are
//! applied with `tc class change`. (The manager/agent path carries the
//! same values over renewals; the bench skips the renewal delay.)

use anyhow::{Context, bail};
use shoal_agent::shaper::Shaper;
use shoal_core::bandwidth::{Directory, Member, Settings, Spread};
use shoal_core::select::HashFn;
use shoal_overlay::netlab::Lab;
use shoal_sim::workload::{Trace, WorldCup, YouTube, world_cup, youtube};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `shoal bench vibra` arguments.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Example (as root):\n  shoal bench vibra --duration 40s --caps 2.4,2.7,3.0 --json\n\nscripts/bench-vibra.sh runs the sweep of docs/benchmarks.md."
)]
pub struct BenchVibraArgs {
    /// Trace length per run (the hot set moves midway).
    #[arg(long, default_value = "40s", value_parser = shoal_core::duration::parse_positive_duration)]
    pub duration: Duration,
    /// Per-server caps to sweep, MB/s (the service's total is 4 times).
    #[arg(long, value_delimiter = ',', default_value = "2.4,2.7,3.0")]
    pub caps: Vec<f64>,
    /// Algorithms without reallocation (url-hash also runs with it).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "rr,lc,lard,lard-r,url-hash"
    )]
    pub algos: Vec<String>,
    /// url-hash's replication factor R.
    #[arg(long, default_value_t = 2)]
    pub replicas: usize,
    /// Each backend's object cache, MB (the thesis's 48 MB VMs).
    #[arg(long, default_value_t = 48.0)]
    pub cache_mb: f64,
    /// Offered load of the trace, MB/s on average.
    #[arg(long, default_value_t = 7.0)]
    pub byte_rate: f64,
    /// The per-server cap of the failure run with compensation, MB/s.
    #[arg(long, default_value_t = 2.7)]
    pub failure_cap: f64,
    /// LARD caps tried for the failure run, MB/s, ascending: the first whose
    /// mean response time matches url-hash with compensation at --failure-cap.
    #[arg(long, value_delimiter = ',', default_value = "2.7,3.0,3.3,3.6,4.0")]
    pub lard_caps: Vec<f64>,
    /// Eq. 3.1's alpha.
    #[arg(long, default_value_t = 0.9)]
    pub alpha: f64,
    /// Reallocation interval (the thesis: 3s with a 10-minute trace).
    #[arg(long, default_value = "3s")]
    pub interval: String,
    /// Skip the failure runs.
    #[arg(long)]
    pub no_failure: bool,
    /// Also run HAProxy's `balance uri` with `hash-balance-factor` at each cap.
    #[arg(long)]
    pub haproxy: bool,
    /// The workload: `world-cup` (Table 3.1's clip, replayed at its times
    /// unless --closed-loop) or `youtube` (2,000 videos, Zipf 0.56, sizes
    /// scaled to --cache-mb as the thesis's 12 GB to its 768 MB servers;
    /// closed-loop only, it has no request times).
    #[arg(long, default_value = "world-cup", value_parser = ["world-cup", "youtube"])]
    pub workload: String,
    /// Closed loop: this many clients, each sending its next request when
    /// the last one is answered, for --duration (throughput); 0 replays
    /// open-loop at the trace's times (response time).
    #[arg(long, default_value_t = 0)]
    pub closed_loop: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Write plots (SVG and PNG) into this directory.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

/// One run's settings.
#[derive(Debug, Clone, serde::Serialize)]
struct RunSpec {
    algo: String,
    realloc: bool,
    cap_mb_s: f64,
    fail: bool,
}

/// One run's figures.
#[derive(Debug, Clone, serde::Serialize)]
struct RunResult {
    #[serde(flatten)]
    spec: RunSpec,
    requests: usize,
    errors: usize,
    mean_ms: f64,
    p95_ms: f64,
    throughput_mb_s: f64,
    requests_per_s: f64,
    disk_read_mb: f64,
    /// Per backend: its cap at the end of the run, MB/s.
    final_caps_mb_s: Vec<f64>,
    /// Sum of the caps in force, sampled each second: the highest seen.
    max_total_mb_s: f64,
}

const PORT: u16 = 8080;
const APP: &str = "www";

pub fn run(a: BenchVibraArgs) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("shoal bench vibra needs root (network namespaces, tc); scripts/bench-vibra.sh");
    }
    let hash = HashFn::Xxh3;
    let sub_of = |p: &str| hash.reduce(hash.hash(p.as_bytes()), 4);
    let wc = WorldCup {
        duration: a.duration.as_secs_f64(),
        byte_rate: a.byte_rate * 1e6,
        ..WorldCup::default()
    };
    let trace = Arc::new(if a.workload == "youtube" {
        if a.closed_loop == 0 {
            bail!("the YouTube-like set has no request times: give --closed-loop N (N clients)");
        }
        youtube(&YouTube {
            mean_size: YouTube::default().mean_size * a.cache_mb / 768.0,
            ..YouTube::default()
        })
    } else {
        world_cup(&wc, 4, &sub_of)
    });
    let work = tempfile::Builder::new().prefix("shoal-vibra-").tempdir()?;
    eprintln!(
        "trace {}: {} objects, {:.1} MB, {} requests, {}",
        trace.name,
        trace.objects.len(),
        trace.content_bytes() as f64 / 1e6,
        trace.requests.len(),
        if a.closed_loop == 0 {
            format!(
                "{:.1} MB/s offered open-loop; hot set in sub-namespace {} then {}",
                trace.requested_bytes() as f64 / 1e6 / wc.duration,
                trace.hot_sub.0,
                trace.hot_sub.1
            )
        } else {
            format!("closed loop, {} clients", a.closed_loop)
        }
    );
    let lab = Lab::create(work.path(), 5).context("the namespace lab")?;
    for b in 1..=4 {
        write_content(&lab.dir().join(format!("content{b}")), &trace)?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut results: Vec<RunResult> = Vec::new();
    let mut specs: Vec<RunSpec> = Vec::new();
    for cap in &a.caps {
        for algo in &a.algos {
            specs.push(RunSpec {
                algo: algo.clone(),
                realloc: false,
                cap_mb_s: *cap,
                fail: false,
            });
        }
        specs.push(RunSpec {
            algo: "url-hash".into(),
            realloc: true,
            cap_mb_s: *cap,
            fail: false,
        });
        if a.haproxy {
            specs.push(RunSpec {
                algo: "haproxy-uri".into(),
                realloc: false,
                cap_mb_s: *cap,
                fail: false,
            });
        }
    }
    for spec in specs {
        // One run that cannot start (a peer missing) is reported and
        // skipped; the others still measure.
        let r = match rt.block_on(one_run(&lab, &a, &trace, spec.clone())) {
            Ok(r) => r,
            Err(e) => {
                eprintln!(
                    "{} realloc={} cap {}: {e:#}",
                    spec.algo, spec.realloc, spec.cap_mb_s
                );
                continue;
            }
        };
        eprintln!(
            "{:<12} realloc={:<5} cap {:.1} MB/s: mean {:.1} ms, p95 {:.1} ms, {:.2} MB/s, disk {:.1} MB, {} errors",
            r.spec.algo,
            r.spec.realloc,
            r.spec.cap_mb_s,
            r.mean_ms,
            r.p95_ms,
            r.throughput_mb_s,
            r.disk_read_mb,
            r.errors
        );
        results.push(r);
    }
    // bw_saving_vs_lc: the smallest cap at which url-hash with reallocation
    // is at least as fast as lc at 3.0 (the largest cap swept).
    let top = a.caps.iter().cloned().fold(f64::MIN, f64::max);
    let find = |algo: &str, realloc: bool, cap: f64, fail: bool| {
        results.iter().find(|r| {
            r.spec.algo == algo
                && r.spec.realloc == realloc
                && r.spec.fail == fail
                && (r.spec.cap_mb_s - cap).abs() < 1e-9
        })
    };
    let lc_top = find("lc", false, top, false).map(|r| r.mean_ms);
    let mut caps_sorted = a.caps.clone();
    caps_sorted.sort_by(f64::total_cmp);
    let match_cap = lc_top.and_then(|lc| {
        caps_sorted
            .iter()
            .find(|c| {
                find("url-hash", true, **c, false).is_some_and(|r| r.mean_ms <= lc && r.errors == 0)
            })
            .copied()
    });
    let bw_saving_vs_lc = match_cap.map(|c| 1.0 - c / top);
    // The failure runs.
    let mut failure_saving_vs_lard = None;
    let mut failure = serde_json::Value::Null;
    if !a.no_failure {
        let vib = rt.block_on(one_run(
            &lab,
            &a,
            &trace,
            RunSpec {
                algo: "url-hash".into(),
                realloc: true,
                cap_mb_s: a.failure_cap,
                fail: true,
            },
        ))?;
        eprintln!(
            "failure: url-hash+compensation at {}: mean {:.1} ms, {} errors, caps after {:?}",
            a.failure_cap, vib.mean_ms, vib.errors, vib.final_caps_mb_s
        );
        let mut lard_runs = Vec::new();
        let mut needed = None;
        for c in &a.lard_caps {
            let r = rt.block_on(one_run(
                &lab,
                &a,
                &trace,
                RunSpec {
                    algo: "lard".into(),
                    realloc: false,
                    cap_mb_s: *c,
                    fail: true,
                },
            ))?;
            eprintln!(
                "failure: lard at {c:.1}: mean {:.1} ms, {} errors",
                r.mean_ms, r.errors
            );
            let ok = r.mean_ms <= vib.mean_ms;
            lard_runs.push(r);
            if ok {
                needed = Some(*c);
                break;
            }
        }
        failure_saving_vs_lard = needed.map(|c| 1.0 - a.failure_cap / c);
        failure = serde_json::json!({
            "vibra": vib,
            "lard": lard_runs,
            "lard_cap_needed_mb_s": needed,
        });
    }
    if let Some(dir) = &a.plot {
        plot(dir, &results, &a)?;
    }
    let out = serde_json::json!({
        "trace": {
            "objects": trace.objects.len(),
            "content_mb": trace.content_bytes() as f64 / 1e6,
            "requests": trace.requests.len(),
            "name": trace.name,
            "offered_mb_s": (a.closed_loop == 0)
                .then(|| trace.requested_bytes() as f64 / 1e6 / wc.duration),
            "hot_sub_namespaces": [trace.hot_sub.0, trace.hot_sub.1],
        },
        "duration_s": wc.duration,
        "closed_loop_clients": a.closed_loop,
        "replicas": a.replicas,
        "cache_mb": a.cache_mb,
        "alpha": a.alpha,
        "interval": a.interval,
        "runs": results,
        "failure": failure,
        "bw_saving_vs_lc": bw_saving_vs_lc,
        "failure_saving_vs_lard": failure_saving_vs_lard,
        "goal": 0.25,
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "bw_saving_vs_lc: {}\nfailure_saving_vs_lard: {}",
            bw_saving_vs_lc.map_or("not reached".into(), |x| format!("{x:.2}")),
            failure_saving_vs_lard.map_or("not reached".into(), |x| format!("{x:.2}"))
        );
    }
    drop(lab);
    Ok(())
}

fn write_content(dir: &Path, t: &Trace) -> anyhow::Result<()> {
    for o in &t.objects {
        let p = dir.join(o.path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().expect("has a parent"))?;
        let body: Vec<u8> = (0..o.size).map(|i| b'a' + (i % 26) as u8).collect();
        std::fs::write(&p, body)?;
    }
    Ok(())
}

/// Backends' processes (one may be killed on purpose), killed on drop so
/// a run that fails half-way leaves no port bound for the next.
struct Backends(Vec<Option<Child>>);
impl Drop for Backends {
    fn drop(&mut self) {
        for c in self.0.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct Killer(Vec<Child>);
impl Drop for Killer {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn(lab: &Lab, host: usize, args: &[String], log: &Path) -> anyhow::Result<Child> {
    let exe = std::env::current_exe()?;
    let f = std::fs::File::create(log)?;
    lab.command(host, exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f)
        .spawn()
        .context("spawn")
}

fn spawn_prog(
    lab: &Lab,
    host: usize,
    prog: &str,
    args: &[String],
    log: &Path,
) -> anyhow::Result<Child> {
    let f = std::fs::File::create(log)?;
    lab.command(host, prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f)
        .spawn()
        .with_context(|| format!("spawn {prog}"))
}

async fn wait_port(addr: &str) -> anyhow::Result<()> {
    let t = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if t.elapsed() > Duration::from_secs(10) {
            bail!("{addr} does not listen");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn disk_read_bytes(client: &reqwest::Client, addr: &str) -> u64 {
    let Ok(r) = client
        .get(format!("http://{addr}{}", shoal_agent::www::METRICS_PATH))
        .send()
        .await
    else {
        return 0;
    };
    let text = r.text().await.unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("shoal_www_disk_read_bytes_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

async fn one_run(
    lab: &Lab,
    a: &BenchVibraArgs,
    trace: &Arc<Trace>,
    spec: RunSpec,
) -> anyhow::Result<RunResult> {
    let hosts = lab.hosts();
    let disp = format!("{}:{PORT}", hosts[0].ip);
    let backends: Vec<String> = (1..=4).map(|i| format!("{}:{PORT}", hosts[i].ip)).collect();
    let logs = lab.dir().join("logs");
    std::fs::create_dir_all(&logs)?;
    let mut procs = Killer(Vec::new());
    let mut www = Backends(Vec::new());
    for b in 1..=4 {
        let args: Vec<String> = [
            "www",
            "--listen",
            &backends[b - 1],
            "--root",
            lab.dir()
                .join(format!("content{b}"))
                .to_str()
                .context("utf-8")?,
            "--cache-mb",
            &a.cache_mb.to_string(),
            "--threads",
            "2",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        www.0.push(Some(spawn(
            lab,
            b,
            &args,
            &logs.join(format!("www{b}.log")),
        )?));
    }
    for b in &backends {
        wait_port(b).await?;
    }
    let cap = (spec.cap_mb_s * 1e6) as u64;
    let mut shapers: Vec<Shaper> = (1..=4)
        .map(|b| {
            Shaper::new(
                "eth0",
                vec![
                    "ip".into(),
                    "netns".into(),
                    "exec".into(),
                    hosts[b].netns.clone(),
                ],
            )
        })
        .collect();
    for s in &mut shapers {
        s.setup().await?;
        s.set_cap(APP, PORT, cap).await?;
    }
    if spec.algo == "haproxy-uri" {
        let cfg = lab.dir().join("haproxy.cfg");
        let servers: String = backends
            .iter()
            .enumerate()
            .map(|(i, b)| format!("  server b{} {b} check inter 500ms fall 1 rise 2\n", i + 1))
            .collect();
        std::fs::write(
            &cfg,
            format!(
                "global\n  maxconn 8000\ndefaults\n  mode http\n  timeout connect 2s\n  timeout client 60s\n  timeout server 60s\nfrontend f\n  bind {disp}\n  default_backend b\nbackend b\n  balance uri\n  hash-type consistent\n  hash-balance-factor 125\n{servers}"
            ),
        )?;
        procs.0.push(spawn_prog(
            lab,
            0,
            "haproxy",
            &["-f".into(), cfg.to_str().context("utf-8")?.into()],
            &logs.join("haproxy.log"),
        )?);
    } else {
        let mut args: Vec<String> = vec![
            "dispatch".into(),
            "--listen".into(),
            disp.clone(),
            "--algo".into(),
            spec.algo.clone(),
            "--replicas".into(),
            a.replicas.to_string(),
            "--health-interval".into(),
            "500ms".into(),
            "--threads".into(),
            "2".into(),
        ];
        for b in &backends {
            args.push("--backends".into());
            args.push(b.clone());
        }
        procs
            .0
            .push(spawn(lab, 0, &args, &logs.join("dispatch.log"))?);
    }
    wait_port(&disp).await?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(4096)
        .timeout(Duration::from_secs(30))
        .build()?;
    // The directory, as the manager runs it.
    let names: Vec<String> = (1..=4).map(|i| format!("b{i}")).collect();
    let members = |down: Option<usize>| -> Vec<Member> {
        (0..4)
            .map(|i| Member {
                server: names[i].clone(),
                host: names[i].clone(),
                up: Some(i) != down,
            })
            .collect()
    };
    let settings = Settings::parse(
        &format!("{} MB/s", spec.cap_mb_s * 4.0),
        a.alpha,
        &a.interval,
        None,
        if spec.algo == "url-hash" {
            Spread::NextR(a.replicas)
        } else {
            Spread::Even
        },
    )?;
    let mut dir = Directory::new();
    let t0 = Instant::now();
    if spec.realloc {
        dir.set_service("web", settings, &members(None), 0);
        dir.poll_changes();
        for (i, n) in names.iter().enumerate() {
            dir.observe(
                "web",
                n,
                None,
                Some(
                    shapers[i]
                        .bandwidth(APP)
                        .and_then(|b| b.cap_bps)
                        .unwrap_or(cap),
                ),
            );
        }
    }
    let start = tokio::time::Instant::now() + Duration::from_millis(200);
    // One request: its response time from `at` and its bytes, or None.
    async fn fetch(
        client: reqwest::Client,
        url: String,
        at: tokio::time::Instant,
    ) -> Option<(f64, usize)> {
        let res = async {
            let resp = client.get(&url).send().await?;
            let ok = resp.status().is_success();
            let body = resp.bytes().await?;
            Ok::<_, reqwest::Error>((ok, body.len()))
        }
        .await;
        let ms = at.elapsed().as_secs_f64() * 1000.0;
        match res {
            Ok((true, n)) => Some((ms, n)),
            _ => None,
        }
    }
    let mut tasks = Vec::new();
    if a.closed_loop == 0 {
        // Open loop: every request at its recorded time.
        for r in trace.requests.iter().copied() {
            let client = client.clone();
            let url = format!("http://{disp}{}", trace.objects[r.object].path);
            let at = start + Duration::from_secs_f64(r.at);
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                vec![fetch(client, url, at).await]
            }));
        }
    } else {
        // Closed loop: the clients take the trace's requests in order
        // (from the start again when it runs out) until --duration ends.
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stop = start + a.duration;
        for _ in 0..a.closed_loop {
            let (client, next, trace) = (client.clone(), next.clone(), trace.clone());
            let disp = disp.clone();
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep_until(start).await;
                let mut got = Vec::new();
                while tokio::time::Instant::now() < stop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let r = trace.requests[i % trace.requests.len()];
                    let url = format!("http://{disp}{}", trace.objects[r.object].path);
                    let at = tokio::time::Instant::now();
                    got.push(fetch(client.clone(), url, at).await);
                }
                got
            }));
        }
    }
    let fail_at = a.duration.as_secs_f64() / 3.0;
    let mut failed = false;
    let mut max_total = 0.0f64;
    let mut disk_of_failed = 0u64;
    let end = start + a.duration + Duration::from_millis(500);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while tokio::time::Instant::now() < end {
        tick.tick().await;
        let now_s = t0.elapsed().as_secs_f64();
        if spec.fail && !failed && start.elapsed().as_secs_f64() >= fail_at {
            failed = true;
            disk_of_failed = disk_read_bytes(&client, &backends[1]).await;
            if let Some(mut c) = www.0[1].take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            if spec.realloc {
                // The manager credits the failed server's cap as soon as
                // it declares the failure; the dispatcher ejects it on its
                // health check.
                dir.set_service("web", settings, &members(Some(1)), (now_s * 1000.0) as u64);
            }
        }
        let mut total = 0.0;
        for (i, s) in shapers.iter_mut().enumerate() {
            s.sample(now_s).await?;
            if failed && i == 1 {
                continue;
            }
            total += s.bandwidth(APP).and_then(|b| b.cap_bps).unwrap_or(0) as f64;
        }
        max_total = max_total.max(total);
        if spec.realloc {
            for (i, n) in names.iter().enumerate() {
                if let Some(bw) = shapers[i].bandwidth(APP) {
                    dir.observe("web", n, Some(bw.offered_bps), bw.cap_bps);
                }
            }
            dir.tick((now_s * 1000.0) as u64);
            // Apply reductions, acknowledge them, then the increases the
            // directory grants once they are acknowledged.
            for _ in 0..3 {
                let changes = dir.poll_changes();
                if changes.is_empty() {
                    break;
                }
                for ch in changes {
                    let i = names.iter().position(|n| *n == ch.server).expect("known");
                    if failed && i == 1 {
                        continue;
                    }
                    shapers[i].set_cap(APP, PORT, ch.cap.max(1)).await?;
                    dir.observe("web", &ch.server, None, Some(ch.cap.max(1)));
                }
            }
        }
    }
    let mut lat = Vec::new();
    let mut bytes = 0usize;
    let mut errors = 0usize;
    for t in tasks {
        for one in t.await.unwrap_or_else(|_| vec![None]) {
            match one {
                Some((ms, n)) => {
                    lat.push(ms);
                    bytes += n;
                }
                None => errors += 1,
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let mut disk = disk_of_failed;
    for (i, b) in backends.iter().enumerate() {
        if !(failed && i == 1) {
            disk += disk_read_bytes(&client, b).await;
        }
    }
    let final_caps: Vec<f64> = shapers
        .iter()
        .enumerate()
        .map(|(i, s)| {
            if failed && i == 1 {
                0.0
            } else {
                s.bandwidth(APP).and_then(|b| b.cap_bps).unwrap_or(0) as f64 / 1e6
            }
        })
        .collect();
    for s in &mut shapers {
        let _ = s.teardown().await;
    }
    drop(procs);
    drop(www);
    lat.sort_by(f64::total_cmp);
    let mean = lat.iter().sum::<f64>() / lat.len().max(1) as f64;
    let p95 = lat.get(lat.len() * 95 / 100).copied().unwrap_or(0.0);
    Ok(RunResult {
        spec,
        requests: lat.len() + errors,
        errors,
        mean_ms: mean,
        p95_ms: p95,
        throughput_mb_s: bytes as f64 / 1e6 / elapsed,
        requests_per_s: lat.len() as f64 / elapsed,
        disk_read_mb: disk as f64 / 1e6,
        final_caps_mb_s: final_caps,
        max_total_mb_s: max_total / 1e6,
    })
}

fn plot(dir: &Path, results: &[RunResult], a: &BenchVibraArgs) -> anyhow::Result<()> {
    use shoal_sim::chart::{Series, log_lines};
    std::fs::create_dir_all(dir)?;
    let mut series = Vec::new();
    let mut keys: Vec<(String, bool)> = a.algos.iter().map(|x| (x.clone(), false)).collect();
    keys.push(("url-hash".into(), true));
    if a.haproxy {
        keys.push(("haproxy-uri".into(), false));
    }
    for (algo, realloc) in keys {
        let mut pts: Vec<(f64, f64)> = results
            .iter()
            .filter(|r| r.spec.algo == algo && r.spec.realloc == realloc && !r.spec.fail)
            .map(|r| (r.spec.cap_mb_s, r.mean_ms.max(0.01)))
            .collect();
        pts.sort_by(|x, y| x.0.total_cmp(&y.0));
        series.push(Series {
            label: if realloc {
                format!("{algo} + reallocation")
            } else {
                algo
            },
            points: pts,
            dashed: realloc,
        });
    }
    log_lines(
        &dir.join("vibra-response-time"),
        "Mean response time against the per-server cap (World-Cup-like trace, 4 backends)",
        "cap per server, MB/s",
        "mean response time, ms",
        &series,
        None,
    )?;
    Ok(())
}
