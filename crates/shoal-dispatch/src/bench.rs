//! `shoal bench dispatch`: shoal's dispatcher vs HAProxy (`balance uri`,
//! `hash-type consistent`) vs nginx (`hash $request_uri consistent`), same
//! backends (nginx serving generated files), same worker threads, driven by
//! wrk with keep-alive, alternating rounds so drift hits every peer alike.

use anyhow::{Context, bail};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `shoal bench dispatch` arguments.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  shoal bench dispatch --duration 10s --connections 64 --rounds 2\n\nInstalls haproxy, nginx and wrk with apt-get when missing."
)]
pub struct BenchDispatchArgs {
    /// Length of each wrk run.
    #[arg(long, default_value = "10s", value_parser = crate::config::parse_duration)]
    pub duration: Duration,
    /// wrk connections (keep-alive).
    #[arg(long, default_value_t = 64)]
    pub connections: u32,
    /// wrk threads.
    #[arg(long, default_value_t = 1)]
    pub wrk_threads: u32,
    /// Worker threads of each proxy (shoal --threads, HAProxy nbthread, nginx worker_processes).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Backend servers (ports of one nginx).
    #[arg(long, default_value_t = 4)]
    pub backends: usize,
    /// Rounds; each round runs every peer once per size, in turn.
    #[arg(long, default_value_t = 2)]
    pub rounds: u32,
    /// Response sizes to test: 1k, 1m.
    #[arg(long, value_delimiter = ',', default_value = "1k,1m")]
    pub sizes: Vec<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Pin each proxy's worker threads, one per CPU in order, in every peer
    /// alike (shoal --cpu-affinity auto, HAProxy cpu-map, nginx
    /// worker_cpu_affinity auto).
    #[arg(long)]
    pub pin: bool,
    /// Peers to run (shoal, haproxy, nginx).
    #[arg(long, value_delimiter = ',', default_value = "shoal,haproxy,nginx")]
    pub peers: Vec<String>,
}

/// One measured configuration, averaged over rounds.
#[derive(Debug, Clone, Serialize)]
pub struct Measured {
    /// shoal, haproxy or nginx.
    pub peer: String,
    /// 1k or 1m.
    pub size: String,
    /// Requests per second, mean over rounds.
    pub rps: f64,
    /// 99th percentile latency in ms, mean over rounds.
    pub p99_ms: f64,
    /// Per-round requests per second.
    pub rounds_rps: Vec<f64>,
    /// Non-2xx or socket errors seen by wrk, summed.
    pub errors: u64,
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        // SIGTERM first: an nginx master killed outright leaves its workers
        // behind.
        let pid = self.0.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ensure_tools() -> anyhow::Result<()> {
    let missing: Vec<&str> = [
        ("haproxy", "haproxy"),
        ("nginx", "nginx-light"),
        ("wrk", "wrk"),
    ]
    .iter()
    .filter(|(bin, _)| which(bin).is_none())
    .map(|(_, pkg)| *pkg)
    .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("installing {} with apt-get", missing.join(" "));
    let ok = Command::new("apt-get")
        .args(["install", "-y", "-qq"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        let _ = Command::new("apt-get").args(["update", "-qq"]).status();
        let st = Command::new("apt-get")
            .args(["install", "-y", "-qq"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get")?;
        if !st.success() {
            bail!("apt-get install {} failed", missing.join(" "));
        }
    }
    Ok(())
}

fn which(bin: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/usr/bin", "/usr/local/bin", "/sbin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(bin))
        .find(|p| p.exists())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn wait_port(port: u16, what: &str) -> anyhow::Result<()> {
    let end = Instant::now() + Duration::from_secs(15);
    while Instant::now() < end {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("{what} did not listen on 127.0.0.1:{port} within 15 s")
}

fn size_bytes(s: &str) -> anyhow::Result<usize> {
    match s {
        "1k" => Ok(1024),
        "1m" => Ok(1 << 20),
        _ => bail!("--sizes: unknown size {s:?}; use 1k and/or 1m"),
    }
}

fn files_for(size: &str) -> usize {
    if size == "1m" { 16 } else { 256 }
}

/// Runs the benchmark.
pub async fn run(args: BenchDispatchArgs) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || run_blocking(args)).await?
}

fn run_blocking(args: BenchDispatchArgs) -> anyhow::Result<()> {
    if args.backends == 0 || args.threads == 0 || args.connections == 0 || args.rounds == 0 {
        bail!("--backends, --threads, --connections and --rounds must be at least 1");
    }
    for s in &args.sizes {
        size_bytes(s)?;
    }
    for p in &args.peers {
        if !["shoal", "haproxy", "nginx"].contains(&p.as_str()) {
            bail!("--peers: unknown peer {p:?}; use shoal, haproxy, nginx");
        }
    }
    ensure_tools()?;
    let dir = std::env::temp_dir().join(format!("shoal-bench-dispatch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let www = dir.join("www");
    for s in &args.sizes {
        let n = size_bytes(s)?;
        std::fs::create_dir_all(www.join(s))?;
        for i in 0..files_for(s) {
            let body: Vec<u8> = (0..n).map(|k| b'a' + ((k + i) % 26) as u8).collect();
            std::fs::write(www.join(s).join(format!("f{i}")), body)?;
        }
    }
    // Backends: one nginx, several ports (each a backend server).
    let ports: Vec<u16> = (0..args.backends)
        .map(|_| free_port())
        .collect::<anyhow::Result<_>>()?;
    let mut servers = String::new();
    for p in &ports {
        let _ = writeln!(
            servers,
            "server {{ listen 127.0.0.1:{p} reuseport; root {}; access_log off; keepalive_requests 1000000; }}",
            www.display()
        );
    }
    let backend_conf = dir.join("backends.conf");
    std::fs::write(
        &backend_conf,
        format!(
            "daemon off; master_process off; worker_processes 1; pid {}/backends.pid;\n\
             error_log {}/backends.err warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{ sendfile on; tcp_nopush on; {servers} }}\n",
            dir.display(),
            dir.display()
        ),
    )?;
    let _backends = Proc(
        Command::new("nginx")
            .args([
                "-c",
                &backend_conf.to_string_lossy(),
                "-p",
                &dir.to_string_lossy(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the nginx backends")?,
    );
    for p in &ports {
        wait_port(*p, "nginx backend")?;
    }
    let backend_list: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let lua = dir.join("rotate.lua");
    let shoal = std::env::current_exe().context("finding the shoal binary")?;

    let write_lua = |size: &str| {
        std::fs::write(
            &lua,
            format!(
                "local i = 0\nrequest = function()\n  i = i + 1\n  return wrk.format(nil, \"/{size}/f\" .. (i % {}))\nend\n",
                files_for(size)
            ),
        )
    };
    // The backends are warmed once, directly, before any proxy is measured:
    // whichever peer ran first used to pay for their first seconds.
    for size in &args.sizes {
        write_lua(size)?;
        let _ = wrk(&args, ports[0], &lua, Duration::from_secs(2));
    }

    let mut results: Vec<Measured> = Vec::new();
    for round in 0..args.rounds {
        for size in &args.sizes {
            write_lua(size)?;
            // The order rotates every round, so that no peer always runs
            // first (the first measurement of a run came out 3-7 % low,
            // and it was always shoal's).
            let n = args.peers.len();
            for peer in args.peers.iter().cycle().skip(round as usize % n).take(n) {
                let port = free_port()?;
                let _proxy = start_peer(
                    peer,
                    port,
                    &backend_list,
                    &dir,
                    args.threads,
                    args.pin,
                    &shoal,
                )?;
                wait_port(port, peer)?;
                // Warm up pools and caches briefly, then measure.
                let _ = wrk(&args, port, &lua, Duration::from_secs(1));
                let (rps, p99, errors) = wrk(&args, port, &lua, args.duration)?;
                eprintln!(
                    "round {} {peer:>7} {size}: {rps:>10.0} req/s  p99 {p99:>8.2} ms  errors {errors}",
                    round + 1
                );
                match results
                    .iter_mut()
                    .find(|m| m.peer == *peer && m.size == *size)
                {
                    Some(m) => {
                        m.rounds_rps.push(rps);
                        m.p99_ms += p99;
                        m.errors += errors;
                    }
                    None => results.push(Measured {
                        peer: peer.clone(),
                        size: size.clone(),
                        rps: 0.0,
                        p99_ms: p99,
                        rounds_rps: vec![rps],
                        errors,
                    }),
                }
            }
        }
    }
    for m in &mut results {
        let n = m.rounds_rps.len() as f64;
        m.rps = m.rounds_rps.iter().sum::<f64>() / n;
        m.p99_ms /= n;
    }
    print_results(&args, &results)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn start_peer(
    peer: &str,
    port: u16,
    backends: &[String],
    dir: &Path,
    threads: usize,
    pin: bool,
    shoal: &Path,
) -> anyhow::Result<Proc> {
    let cpus = if pin {
        crate::allowed_cpus()?
    } else {
        Vec::new()
    };
    if pin && threads > cpus.len() {
        bail!(
            "--pin gives each proxy thread a CPU of its own: --threads {threads} is more than the {} CPUs this process may use",
            cpus.len()
        );
    }
    let child = match peer {
        "shoal" => Command::new(shoal)
            .args([
                "dispatch",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--backends",
                &backends.join(","),
                "--algo",
                "url-hash",
                "--threads",
                &threads.to_string(),
                "--cpu-affinity",
                if pin { "auto" } else { "none" },
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting shoal dispatch")?,
        "haproxy" => {
            let mut servers = String::new();
            for (i, b) in backends.iter().enumerate() {
                let _ = writeln!(servers, "  server s{i} {b}");
            }
            // Thread i on the i-th allowed CPU, as shoal's auto (HAProxy
            // 2.6 maps threads one by one only with the auto: form).
            let cpu_map = if pin {
                let list: Vec<String> = cpus.iter().take(threads).map(|c| c.to_string()).collect();
                format!("  cpu-map auto:1/1-{threads} {}\n", list.join(","))
            } else {
                String::new()
            };
            let conf = dir.join("haproxy.cfg");
            std::fs::write(
                &conf,
                format!(
                    "global\n  nbthread {threads}\n  maxconn 4000\n{cpu_map}\
                     defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  http-reuse always\n\
                     frontend fe\n  bind 127.0.0.1:{port}\n  default_backend be\n\
                     backend be\n  balance uri\n  hash-type consistent\n{servers}"
                ),
            )?;
            Command::new("haproxy")
                .args(["-f", &conf.to_string_lossy(), "-db"])
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .context("starting haproxy")?
        }
        _ => {
            let mut servers = String::new();
            for b in backends {
                let _ = writeln!(servers, "    server {b};");
            }
            let conf = dir.join("nginx-proxy.conf");
            std::fs::write(
                &conf,
                format!(
                    "daemon off; worker_processes {threads};{affinity} pid {d}/proxy.pid;\n\
                     error_log {d}/proxy.err warn;\n\
                     events {{ worker_connections 8192; }}\n\
                     http {{ access_log off;\n  upstream be {{\n    hash $request_uri consistent;\n{servers}    keepalive 256;\n  }}\n\
                       server {{ listen 127.0.0.1:{port}; keepalive_requests 1000000;\n\
                         location / {{ proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_buffering on; proxy_max_temp_file_size 0; }} }}\n}}\n",
                    d = dir.display(),
                    affinity = if pin {
                        " worker_cpu_affinity auto;"
                    } else {
                        ""
                    },
                ),
            )?;
            Command::new("nginx")
                .args(["-c", &conf.to_string_lossy(), "-p", &dir.to_string_lossy()])
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .context("starting nginx as a proxy")?
        }
    };
    Ok(Proc(child))
}

/// Runs wrk; returns (requests/s, p99 ms, errors).
fn wrk(
    args: &BenchDispatchArgs,
    port: u16,
    lua: &Path,
    duration: Duration,
) -> anyhow::Result<(f64, f64, u64)> {
    let out = Command::new("wrk")
        .args([
            "-t",
            &args.wrk_threads.to_string(),
            "-c",
            &args.connections.to_string(),
            "-d",
            &format!("{}s", duration.as_secs().max(1)),
            "--latency",
            "-s",
            &lua.to_string_lossy(),
            &format!("http://127.0.0.1:{port}/"),
        ])
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_wrk(&text).with_context(|| format!("reading wrk's output:\n{text}"))
}

/// Parses wrk's `Requests/sec`, the 99% latency line and error counts.
pub fn parse_wrk(text: &str) -> anyhow::Result<(f64, f64, u64)> {
    let mut rps = None;
    let mut p99 = None;
    let mut errors = 0u64;
    for line in text.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            rps = v.trim().parse::<f64>().ok();
        } else if let Some(v) = t.strip_prefix("99%") {
            p99 = parse_latency_ms(v.trim());
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            errors += v.trim().parse::<u64>().unwrap_or(0);
        } else if let Some(v) = t.strip_prefix("Socket errors:") {
            for part in v.split(',') {
                if let Some(n) = part
                    .split_whitespace()
                    .last()
                    .and_then(|n| n.parse::<u64>().ok())
                {
                    errors += n;
                }
            }
        }
    }
    match (rps, p99) {
        (Some(r), Some(p)) => Ok((r, p, errors)),
        _ => bail!("no Requests/sec or 99% latency line"),
    }
}

fn parse_latency_ms(v: &str) -> Option<f64> {
    let (num, mult) = if let Some(n) = v.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000.0)
    } else {
        return None;
    };
    num.trim().parse::<f64>().ok().map(|x| x * mult)
}

fn print_results(args: &BenchDispatchArgs, results: &[Measured]) -> anyhow::Result<()> {
    if args.json {
        println!("{}", serde_json::to_string_pretty(results)?);
        return Ok(());
    }
    println!(
        "wrk -t{} -c{} -d{}s keep-alive, {} backends (nginx), {} proxy thread(s){}, {} round(s), url hashing everywhere",
        args.wrk_threads,
        args.connections,
        args.duration.as_secs(),
        args.backends,
        args.threads,
        if args.pin { " pinned one per CPU" } else { "" },
        args.rounds
    );
    println!(
        "{:<6} {:<8} {:>12} {:>10} {:>8} {:>16} {:>16}",
        "size", "peer", "req/s", "p99 ms", "errors", "shoal/peer rps", "shoal/peer p99"
    );
    for size in &args.sizes {
        let shoal = results
            .iter()
            .find(|m| m.peer == "shoal" && &m.size == size);
        for m in results.iter().filter(|m| &m.size == size) {
            let (r, p) = match shoal {
                Some(s) if m.peer != "shoal" => (
                    format!("{:.2}x", s.rps / m.rps),
                    format!("{:.2}x", s.p99_ms / m.p99_ms),
                ),
                _ => ("".into(), "".into()),
            };
            println!(
                "{:<6} {:<8} {:>12.0} {:>10.2} {:>8} {:>16} {:>16}",
                m.size, m.peer, m.rps, m.p99_ms, m.errors, r, p
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_output() {
        let text = "Running 10s test @ http://127.0.0.1:1/\n  1 threads and 64 connections\n  Latency Distribution\n     50%  1.20ms\n     75%    2.00ms\n     90%  3.10ms\n     99%   12.50ms\n  123456 requests in 10.00s, 1.2GB read\n  Socket errors: connect 0, read 2, write 0, timeout 1\n  Non-2xx or 3xx responses: 4\nRequests/sec:  12345.67\nTransfer/sec:    123.45MB\n";
        let (r, p, e) = parse_wrk(text).unwrap();
        assert!((r - 12345.67).abs() < 1e-6);
        assert!((p - 12.5).abs() < 1e-9);
        assert_eq!(e, 7);
        assert_eq!(parse_latency_ms("850.00us"), Some(0.85));
        assert_eq!(parse_latency_ms("1.5s"), Some(1500.0));
        assert!(parse_wrk("garbage").is_err());
    }
}
