//! `shoal bench timestamps`: host-side against server-side arrival
//! timestamps as game servers are packed onto one CPU (thesis ch. 6,
//! §6.6; the single-machine plan of notes D.6).
//!
//! One host: N `shoal game-server` processes, each in its own cgroup,
//! pinned to the last CPU ("restricted", the thesis's guests on their own
//! cores) or free to run anywhere ("dynamic"); `shoal relay` pinned to
//! CPU 0 (the thesis's dom0) in the root namespace; the clients, also on
//! CPU 0, in a network namespace of their own behind a veth pair, so every
//! input crosses a real link and is stamped as it enters the host's stack.
//! Per N: the mean and 95th percentile of both errors (the relay's stamp,
//! the server's clock after recv, each minus the send time), input loss,
//! the relay's added delay (p99) and CPU per datagram. The capacities are
//! the largest N whose mean error stays within 1 ms, as the thesis's 44
//! (host) against 30 (guest). Needs root.

use anyhow::{Context, bail};
use serde::Serialize;
use shoal_agent::platform::cgroup::{self, CpuGroup, Version};
use shoal_dispatch::game::{GameClientReport, GameServerReport};
use shoal_dispatch::relay::DELAY_BUCKETS_US;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `shoal bench timestamps` arguments.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Example (as root):\n  shoal bench timestamps --servers 1,5,10,20,30,40 --duration 8s --json\n\nscripts/bench-timestamps.sh runs the full sweep of docs/benchmarks.md."
)]
pub struct BenchTimestampsArgs {
    /// Game servers per run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,5,10,20,30,40,50,60")]
    pub servers: Vec<usize>,
    /// Placements to measure: restricted (servers pinned to the last CPU)
    /// and dynamic (not pinned).
    #[arg(long, value_delimiter = ',', default_value = "restricted,dynamic")]
    pub modes: Vec<String>,
    /// Clients per game server (the thesis does not say; a small match).
    #[arg(long, default_value_t = 4)]
    pub clients_per_server: u32,
    /// Inputs a second per client.
    #[arg(long, default_value_t = 20.0)]
    pub rate: f64,
    /// Measured time per run (after a 1 s warm-up).
    #[arg(long, default_value = "8s", value_parser = shoal_core::duration::parse_positive_duration)]
    pub duration: Duration,
    /// SHA-256 rounds per input; default: calibrated on this host so the
    /// servers' CPU saturates at --saturate-at servers (notes D.6).
    #[arg(long)]
    pub work: Option<u32>,
    /// Servers at which the calibrated work fills the servers' CPU.
    #[arg(long, default_value_t = 40)]
    pub saturate_at: usize,
    /// Mean error bound of the capacities, µs (the thesis's 1 ms).
    #[arg(long, default_value_t = 1000.0)]
    pub bound_us: f64,
    /// Run the relay at real-time priority (`chrt -f 10`), as a
    /// hypervisor favours dom0: on a busy CPU 0 it then waits behind no
    /// client or build for its turn.
    #[arg(long)]
    pub relay_fifo: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// Also plot the run into this directory: timestamp error (mean, host
    /// and server) against N per mode, and the relay's delay, SVG and PNG.
    #[arg(long, value_name = "DIR")]
    pub plot: Option<std::path::PathBuf>,
    /// Plot a saved `--json` report instead of running (with --plot).
    #[arg(long, value_name = "FILE", requires = "plot")]
    pub from: Option<std::path::PathBuf>,
}

#[derive(Debug, Serialize)]
struct Point {
    n: usize,
    error_mean_host_us: f64,
    error_p95_host_us: f64,
    error_mean_app_us: f64,
    error_p95_app_us: f64,
    loss: f64,
    sent: u64,
    received: u64,
    updates_received: u64,
    relay_delay_p99_us: f64,
    relay_delay_mean_us: f64,
    relay_cpu_us_per_datagram: f64,
}

#[derive(Debug, Serialize)]
struct ModeResult {
    mode: String,
    points: Vec<Point>,
    capacity_host: usize,
    capacity_app: usize,
    capacity_ratio: f64,
}

#[derive(Debug, Serialize)]
struct Output {
    host_cpus: usize,
    cgroup: &'static str,
    work_rounds: u32,
    work_us_per_input: f64,
    clients_per_server: u32,
    rate: f64,
    duration_s: f64,
    bound_us: f64,
    relay_fifo: bool,
    modes: Vec<ModeResult>,
}

/// A cgroup of one game server, v1 (cpuset and cpu hierarchies, as this
/// project's machines mount them) or v2 (the unified tree), through the
/// agent's cgroup code; removed on drop.
struct Cgroup {
    _group: CpuGroup,
}

fn cgroup_kind() -> anyhow::Result<&'static str> {
    Ok(match cgroup::detect()? {
        Version::V2 => "v2",
        Version::V1 => "v1",
    })
}

impl Cgroup {
    /// Creates `name` with `cpus` (None: all of them) and moves `pid` in.
    fn create(kind: &str, name: &str, cpus: Option<&str>, pid: u32) -> anyhow::Result<Self> {
        let version = if kind == "v2" {
            Version::V2
        } else {
            Version::V1
        };
        let mut g = CpuGroup::create(version, name)?;
        if let Some(c) = cpus {
            g.pin(name, c)?;
        }
        g.add(pid)?;
        Ok(Self { _group: g })
    }
}

/// The client namespace and its veth pair; removed on drop.
struct Netns {
    name: String,
    host_ip: String,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Netns {
    fn create() -> anyhow::Result<Self> {
        let id = std::process::id() % 65_000;
        let name = format!("shoal-ts-{id}");
        let (a, b) = (id / 250 % 250, id % 250);
        let host_ip = format!("10.{}.{a}.{}", 200 + (b % 50), 1);
        let client_ip = format!("10.{}.{a}.{}", 200 + (b % 50), 2);
        let (hv, cv) = (format!("tsh{id}"), format!("tsc{id}"));
        let ns = Self {
            name: name.clone(),
            host_ip: host_ip.clone(),
        };
        ip(&["netns", "add", &name])?;
        ip(&["link", "add", &hv, "type", "veth", "peer", "name", &cv])?;
        ip(&["link", "set", &cv, "netns", &name])?;
        ip(&["addr", "add", &format!("{host_ip}/24"), "dev", &hv])?;
        ip(&["link", "set", &hv, "up"])?;
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{client_ip}/24"),
            "dev",
            &cv,
        ])?;
        ip(&["-n", &name, "link", "set", &cv, "up"])?;
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes the veth pair with it.
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// A child killed on drop.
struct Kid(Child);
impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(cmd: &mut Command) -> anyhow::Result<Kid> {
    Ok(Kid(cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning a shoal process")?))
}

/// Reads lines until one starts with `prefix`; returns its rest and the
/// lines before it.
fn wait_line(
    k: &mut Kid,
    from_stdout: bool,
    prefix: &str,
) -> anyhow::Result<(String, Vec<String>)> {
    let pipe: Box<dyn Read + Send> = if from_stdout {
        Box::new(k.0.stdout.take().context("no stdout")?)
    } else {
        Box::new(k.0.stderr.take().context("no stderr")?)
    };
    let mut r = BufReader::new(pipe);
    let mut line = String::new();
    let mut seen = Vec::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            bail!("process exited before printing {prefix:?}");
        }
        if let Some(rest) = line.trim().strip_prefix(prefix) {
            let rest = rest.to_string();
            // Keep draining so the child never blocks on a full pipe.
            std::thread::spawn(move || {
                let mut sink = Vec::new();
                let _ = r.read_to_end(&mut sink);
            });
            return Ok((rest, seen));
        }
        seen.push(line.trim().to_string());
    }
}

/// Nanoseconds the process has run on a CPU (its threads' schedstat).
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

fn scrape(admin: &str) -> anyhow::Result<String> {
    let mut s = std::net::TcpStream::connect(admin)?;
    s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n")?;
    let mut t = String::new();
    s.read_to_string(&mut t)?;
    Ok(t)
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

fn delay_buckets(text: &str) -> Vec<f64> {
    DELAY_BUCKETS_US
        .iter()
        .map(|b| {
            metric(
                text,
                &format!(
                    "shoal_relay_delay_seconds_bucket{{le=\"{}\"}}",
                    *b as f64 / 1e6
                ),
            )
        })
        .chain([metric(
            text,
            "shoal_relay_delay_seconds_bucket{le=\"+Inf\"}",
        )])
        .collect()
}

/// SHA-256 rounds over the game state that take `target_us`.
fn calibrate(target_us: f64) -> u32 {
    use sha2::{Digest, Sha256};
    let state = [7u8; 1024];
    let mut d = Sha256::digest(state);
    let rounds = 20_000;
    let t = Instant::now();
    for _ in 0..rounds {
        let mut h = Sha256::new();
        h.update(d);
        h.update(state);
        d = h.finalize();
    }
    std::hint::black_box(d);
    let per = t.elapsed().as_secs_f64() * 1e6 / f64::from(rounds);
    (target_us / per).round().max(1.0) as u32
}

struct Run<'a> {
    args: &'a BenchTimestampsArgs,
    exe: PathBuf,
    ns: &'a Netns,
    kind: &'static str,
    work: u32,
    servers_cpu: String,
}

impl Run<'_> {
    fn point(&self, n: usize, mode: &str) -> anyhow::Result<Point> {
        let a = self.args;
        let warm = Duration::from_secs(1);
        let total = warm + a.duration;
        let tag = std::process::id();
        let mut servers = Vec::new();
        let mut groups = Vec::new();
        let mut addrs = Vec::new();
        for i in 0..n {
            let mut k = spawn(
                Command::new(&self.exe)
                    .args(["game-server", "--listen", "127.0.0.1:0", "--work"])
                    .arg(self.work.to_string())
                    .args(["--warmup", "1s", "--duration"])
                    .arg(format!(
                        "{}ms",
                        (total + Duration::from_secs(2)).as_millis()
                    )),
            )?;
            let (addr, _) = wait_line(&mut k, false, "game server on ")?;
            let cpus = (mode == "restricted").then_some(self.servers_cpu.as_str());
            groups.push(Cgroup::create(
                self.kind,
                &format!("shoal-ts-{tag}-{i}"),
                cpus,
                k.0.id(),
            )?);
            addrs.push(addr);
            servers.push(k);
        }
        let mut relay_cmd = if a.relay_fifo {
            let mut c = Command::new("chrt");
            c.args(["-f", "10"]).arg(&self.exe);
            c
        } else {
            Command::new(&self.exe)
        };
        let mut relay = spawn(
            relay_cmd
                .args(["relay", "--cpu", "0", "--admin", "127.0.0.1:0", "--listen"])
                .arg(format!("{}:0", self.ns.host_ip))
                .arg("--backends")
                .arg(addrs.join(",")),
        )?;
        let (rest, seen) = wait_line(&mut relay, true, "relay listening on ")?;
        let listen = rest.split(',').next().unwrap_or_default().to_string();
        let admin = seen
            .iter()
            .find_map(|l| l.strip_prefix("relay admin on "))
            .context("the relay printed no admin address")?
            .to_string();
        let before = scrape(&admin)?;
        let cpu0 = cpu_ns(relay.0.id());
        let mut client = Command::new("taskset");
        client
            .args(["-c", "0", "ip", "netns", "exec", &self.ns.name])
            .arg(&self.exe)
            .args(["game-client", "--server", &listen, "--clients"])
            .arg((a.clients_per_server as usize * n).to_string())
            .arg("--rate")
            .arg(a.rate.to_string())
            .arg("--duration")
            .arg(format!("{}ms", total.as_millis()));
        let out = client
            .stderr(Stdio::inherit())
            .output()
            .context("running the game clients")?;
        if !out.status.success() {
            bail!(
                "game-client failed: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        let clients: GameClientReport =
            serde_json::from_slice(&out.stdout).context("reading the game clients' report")?;
        let after = scrape(&admin)?;
        let cpu1 = cpu_ns(relay.0.id());
        let mut host = shoal_core::stamp::ErrorStats::default();
        let mut app = shoal_core::stamp::ErrorStats::default();
        let mut received = 0;
        for mut k in servers {
            let mut s = String::new();
            if let Some(mut o) = k.0.stdout.take() {
                o.read_to_string(&mut s)?;
            }
            let _ = k.0.wait();
            let r: GameServerReport = serde_json::from_str(s.trim())
                .with_context(|| format!("reading a game server's report {s:?}"))?;
            received += r.received;
            host.merge(&r.host.stats());
            app.merge(&r.app.stats());
        }
        drop(groups);
        let datagrams = metric(&after, "shoal_relay_forwarded_total")
            - metric(&before, "shoal_relay_forwarded_total")
            + metric(&after, "shoal_relay_replies_total")
            - metric(&before, "shoal_relay_replies_total");
        let (b0, b1) = (delay_buckets(&before), delay_buckets(&after));
        let d: Vec<f64> = b1.iter().zip(&b0).map(|(x, y)| x - y).collect();
        let count = *d.last().unwrap_or(&0.0);
        let p99 = DELAY_BUCKETS_US
            .iter()
            .zip(&d)
            .find(|(_, c)| **c >= 0.99 * count)
            .map(|(b, _)| *b as f64)
            .unwrap_or(f64::INFINITY);
        let sum = metric(&after, "shoal_relay_delay_seconds_sum")
            - metric(&before, "shoal_relay_delay_seconds_sum");
        Ok(Point {
            n,
            error_mean_host_us: host.mean_us(),
            error_p95_host_us: host.quantile_us(0.95),
            error_mean_app_us: app.mean_us(),
            error_p95_app_us: app.quantile_us(0.95),
            loss: 1.0 - received as f64 / clients.sent.max(1) as f64,
            sent: clients.sent,
            received,
            updates_received: clients.updates,
            relay_delay_p99_us: p99,
            relay_delay_mean_us: if count > 0.0 { sum * 1e6 / count } else { 0.0 },
            relay_cpu_us_per_datagram: cpu1.saturating_sub(cpu0) as f64
                / 1000.0
                / datagrams.max(1.0),
        })
    }
}

/// The largest N of the sweep up to which every mean error is within the bound.
fn capacity(points: &[Point], bound: f64, f: impl Fn(&Point) -> f64) -> usize {
    let mut cap = 0;
    for p in points {
        if f(p) <= bound {
            cap = p.n;
        } else {
            break;
        }
    }
    cap
}

/// Runs the benchmark.
pub fn run(args: BenchTimestampsArgs) -> anyhow::Result<()> {
    if let (Some(dir), Some(from)) = (&args.plot, &args.from) {
        let text = std::fs::read_to_string(from)
            .with_context(|| format!("--from: cannot read {}", from.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("--from {}: not a --json report", from.display()))?;
        return plot(dir, &v);
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("shoal bench timestamps needs root (network namespaces, cgroups): run it with sudo");
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        bail!(
            "shoal bench timestamps needs 2 CPUs: the relay and clients on CPU 0, the servers on the last"
        );
    }
    for m in &args.modes {
        if m != "restricted" && m != "dynamic" {
            bail!("--modes {m:?}: use restricted, dynamic or both");
        }
    }
    let mut servers = args.servers.clone();
    servers.sort_unstable();
    servers.dedup();
    if servers.first() == Some(&0) || servers.is_empty() {
        bail!("--servers: give counts of at least 1, e.g. 1,5,10");
    }
    let kind = cgroup_kind()?;
    let inputs_per_s = args.saturate_at as f64 * f64::from(args.clients_per_server) * args.rate;
    // The updates cost a seal each; leave them a tenth of the CPU.
    let work_us = 0.9e6 / inputs_per_s;
    let work = args.work.unwrap_or_else(|| calibrate(work_us));
    let ns = Netns::create()?;
    let run = Run {
        args: &args,
        exe: std::env::current_exe()?,
        ns: &ns,
        kind,
        work,
        servers_cpu: (cpus - 1).to_string(),
    };
    let mut modes = Vec::new();
    for mode in &args.modes {
        let mut points = Vec::new();
        for &n in &servers {
            if !args.json {
                eprint!("{mode} N={n} ... ");
            }
            let p = run.point(n, mode)?;
            if !args.json {
                eprintln!(
                    "host {:.0}/{:.0} µs, app {:.0}/{:.0} µs (mean/p95), loss {:.2} %",
                    p.error_mean_host_us,
                    p.error_p95_host_us,
                    p.error_mean_app_us,
                    p.error_p95_app_us,
                    p.loss * 100.0
                );
            }
            points.push(p);
        }
        let ch = capacity(&points, args.bound_us, |p| p.error_mean_host_us);
        let ca = capacity(&points, args.bound_us, |p| p.error_mean_app_us);
        modes.push(ModeResult {
            mode: mode.clone(),
            capacity_host: ch,
            capacity_app: ca,
            capacity_ratio: if ca > 0 {
                ch as f64 / ca as f64
            } else {
                f64::INFINITY
            },
            points,
        });
    }
    let out = Output {
        host_cpus: cpus,
        cgroup: kind,
        work_rounds: work,
        work_us_per_input: work_us,
        clients_per_server: args.clients_per_server,
        rate: args.rate,
        duration_s: args.duration.as_secs_f64(),
        bound_us: args.bound_us,
        relay_fifo: args.relay_fifo,
        modes,
    };
    if let Some(dir) = &args.plot {
        plot(dir, &serde_json::to_value(&out)?)?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    for m in &out.modes {
        println!(
            "{}: capacity at {} µs mean: host {} servers, app {} servers",
            m.mode, out.bound_us, m.capacity_host, m.capacity_app
        );
        println!(
            "    N  host mean   p95   app mean    p95   loss %  relay p99 µs  relay CPU µs/dgram"
        );
        for p in &m.points {
            println!(
                "{:5}  {:9.0} {:5.0} {:10.0} {:6.0} {:8.2} {:13.0} {:18.2}",
                p.n,
                p.error_mean_host_us,
                p.error_p95_host_us,
                p.error_mean_app_us,
                p.error_p95_app_us,
                p.loss * 100.0,
                p.relay_delay_p99_us,
                p.relay_cpu_us_per_datagram
            );
        }
    }
    Ok(())
}

/// `--plot DIR`: `timestamps-error.{svg,png}` (mean error of both methods
/// against N, per mode, with the bound) and `timestamps-relay.{svg,png}`
/// (the relay's mean and p99 added delay against N).
fn plot(dir: &std::path::Path, v: &serde_json::Value) -> anyhow::Result<()> {
    use shoal_sim::chart::{Series, log_lines};
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let modes = v["modes"].as_array().context("the report has no modes")?;
    let series = |key: &str, label: &str, dashed: bool| -> Vec<Series> {
        modes
            .iter()
            .map(|m| Series {
                label: format!("{label}, {}", m["mode"].as_str().unwrap_or("?")),
                points: m["points"]
                    .as_array()
                    .map(|ps| {
                        ps.iter()
                            .filter_map(|p| Some((p["n"].as_f64()?, p[key].as_f64()?.abs())))
                            .collect()
                    })
                    .unwrap_or_default(),
                dashed,
            })
            .collect()
    };
    let mut err = series("error_mean_app_us", "server's own clock", false);
    err.extend(series(
        "error_mean_host_us",
        "relay's kernel timestamp",
        true,
    ));
    let bound = v["bound_us"].as_f64().unwrap_or(1000.0);
    log_lines(
        &dir.join("timestamps-error"),
        "mean timestamp error against game servers on one CPU",
        "game servers (N)",
        "|mean error|, µs (log)",
        &err,
        Some((bound, "bound")),
    )?;
    let mut relay = series("relay_delay_mean_us", "relay delay mean", false);
    relay.extend(series("relay_delay_p99_us", "relay delay p99", true));
    log_lines(
        &dir.join("timestamps-relay"),
        "the relay's added delay per datagram",
        "game servers (N)",
        "µs (log)",
        &relay,
        Some((20.0, "goal: 20 µs p99")),
    )?;
    eprintln!("plots written to {}", dir.display());
    Ok(())
}
