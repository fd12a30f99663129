//! `shoal bench overlay`: SMON's self-deployment over real SSH hosts
//! (network namespaces running OpenSSH, `shoal_overlay::netlab`), side by
//! side in the same run with Ansible pushing and starting the same binary
//! on the same hosts, and with Serf's membership on the same hosts. Per
//! run: a fresh lab; seed one host; time until all are deployed and the
//! rounds that took against ln N; the auth agent's CPU over that window;
//! kill -9 of half the peers, the time until a peer contacts each and until
//! it runs again; then Ansible (default forks) on fresh prefixes; then a
//! Serf agent per host: join seen by all, kill -9 seen by all. Medians over
//! the runs. Needs root; installs Debian's ansible and serf if missing.

use anyhow::{Context, bail};
use shoal_overlay::netlab::{self, Lab, Overlay};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// `shoal bench overlay` arguments.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Example (as root):\n  shoal bench overlay --hosts 16 --runs 5 --interval 1s --json"
)]
pub struct BenchOverlayArgs {
    /// Namespace hosts, each with its own sshd.
    #[arg(long, default_value_t = 16)]
    pub hosts: usize,
    /// Runs, each on a fresh lab; the figures are medians.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// The peers' ping interval.
    #[arg(long, default_value = "1s", value_parser = shoal_core::duration::parse_positive_duration)]
    pub interval: Duration,
    /// The peers' ping timeout (default half the interval).
    #[arg(long, value_parser = shoal_core::duration::parse_positive_duration)]
    pub timeout: Option<Duration>,
    /// Skip the Ansible comparison.
    #[arg(long)]
    pub no_ansible: bool,
    /// Skip the Serf comparison.
    #[arg(long)]
    pub no_serf: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

fn unix_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Installs Debian's `package` if `program` is missing, saying so.
fn ensure_installed(program: &str, package: &str) -> anyhow::Result<()> {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return Ok(());
    }
    eprintln!(
        "{program} is missing: installing Debian's {package} (apt-get install {package}) ..."
    );
    let ok = Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends", package])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        bail!(
            "cannot install {package}: run `apt-get update && apt-get install -y {package}` (or pass --no-{package})"
        );
    }
    Ok(())
}

/// A process's CPU time (user + system), seconds.
fn cpu_secs(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may hold spaces: utime and stime
    // are fields 14 and 15, so 12 and 13 after ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    Some(ticks / hz)
}

/// Samples a process's CPU once a second until stopped: (peak over 1 s
/// windows, mean), in % of one core.
struct CpuSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(f64, f64)>,
}

impl CpuSampler {
    fn start(pid: u32) -> CpuSampler {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let t0 = Instant::now();
            let c0 = cpu_secs(pid).unwrap_or(0.0);
            let (mut last_t, mut last_c, mut peak) = (t0, c0, 0.0f64);
            while !s2.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
                let now = Instant::now();
                if now - last_t >= Duration::from_secs(1) {
                    let c = cpu_secs(pid).unwrap_or(last_c);
                    peak = peak.max((c - last_c) / (now - last_t).as_secs_f64() * 100.0);
                    (last_t, last_c) = (now, c);
                }
            }
            let c = cpu_secs(pid).unwrap_or(last_c);
            let all = t0.elapsed().as_secs_f64().max(1e-3);
            // A window shorter than a second still counts toward the peak.
            if last_t == t0 {
                peak = (c - c0) / all * 100.0;
            }
            (peak, (c - c0) / all * 100.0)
        });
        CpuSampler { stop, thread }
    }

    fn finish(self) -> (f64, f64) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or((f64::NAN, f64::NAN))
    }
}

/// The machine's (busy, total) CPU ticks over all cores, from /proc/stat.
fn machine_cpu() -> (f64, f64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<f64> = s
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: f64 = v.iter().sum();
    // idle and iowait are the 4th and 5th.
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    (total - idle, total)
}

fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

/// The figures of one run.
#[derive(Debug, Default, Clone, serde::Serialize)]
struct Run {
    seed_s: f64,
    /// When each host first ran a peer, from the seed's start, sorted.
    deployed_at_s: Vec<f64>,
    deploy_all_s: f64,
    /// The whole machine's CPU over the deploy window, % of all cores: the
    /// lab's hosts share them.
    machine_cpu_busy_pct: f64,
    pool_s: f64,
    rounds: f64,
    logins_deploy: usize,
    agent_cpu_peak_pct: f64,
    agent_cpu_mean_pct: f64,
    detect_s: Vec<f64>,
    recover_s: Vec<f64>,
    recover_max_s: f64,
    two_peers_seen: usize,
    ansible_s: Option<f64>,
    serf_join_all_s: Option<f64>,
    serf_kill_seen_by_all_s: Option<f64>,
    serf_false_failures: Option<usize>,
}

/// Waits, polling every 100 ms, until `f` holds or `within` passed.
fn poll_until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    loop {
        if f() {
            return true;
        }
        if t.elapsed() > within {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Each peer's report, asked in parallel.
fn reports(
    rt: &tokio::runtime::Runtime,
    lab: &Lab,
    key: &shoal_overlay::seal::OverlayKey,
    hosts: &[usize],
) -> Vec<Option<shoal_overlay::wire::StatusReport>> {
    rt.block_on(async {
        let asks = hosts.iter().map(|&i| {
            let addr = std::net::SocketAddr::from((lab.hosts()[i].ip, 7946));
            shoal_overlay::client::status(addr, key, Duration::from_millis(500))
        });
        futures_util::future::join_all(asks)
            .await
            .into_iter()
            .map(Result::ok)
            .collect()
    })
}

fn one_run(a: &BenchOverlayArgs, rt: &tokio::runtime::Runtime, n: usize) -> anyhow::Result<Run> {
    let tmp = tempfile::tempdir()?;
    let lab = Lab::create(tmp.path(), a.hosts)?;
    let exe = std::env::current_exe().context("cannot find this binary")?;
    let ov = Overlay::prepare(&lab, &exe, &tmp.path().join("operator"), &[])?;
    let key = shoal_overlay::files::read_key(&ov.key)?;
    let timeout = a.timeout.unwrap_or(a.interval / 2);
    let mut r = Run::default();
    let hosts = a.hosts;

    // Seed one host; the pool deploys the rest. Two peers on one host are
    // looked for on every poll.
    let cpu = CpuSampler::start(ov.agent_pid());
    let busy0 = machine_cpu();
    let t0 = Instant::now();
    let out = ov
        .seed_command("h1", a.interval, timeout)
        .output()
        .context("cannot run shoal overlay seed")?;
    if !out.status.success() {
        bail!(
            "the seed failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    r.seed_s = t0.elapsed().as_secs_f64();
    let mut two = 0;
    let mut first = vec![None; hosts];
    let all = poll_until(Duration::from_secs(180), || {
        let p = lab.peers_by_host();
        two += p.iter().filter(|x| x.len() > 1).count();
        for (f, x) in first.iter_mut().zip(&p) {
            if f.is_none() && !x.is_empty() {
                *f = Some(t0.elapsed().as_secs_f64());
            }
        }
        p.iter().all(|x| x.len() == 1)
    });
    if !all {
        let up = lab.peers_by_host().iter().filter(|x| !x.is_empty()).count();
        bail!("only {up} of {hosts} hosts were deployed after 180 s");
    }
    r.deploy_all_s = t0.elapsed().as_secs_f64();
    let busy1 = machine_cpu();
    r.machine_cpu_busy_pct = (busy1.0 - busy0.0) / (busy1.1 - busy0.1).max(1.0) * 100.0;
    r.deployed_at_s = first.into_iter().flatten().collect();
    r.deployed_at_s.sort_by(f64::total_cmp);
    (r.agent_cpu_peak_pct, r.agent_cpu_mean_pct) = cpu.finish();
    r.logins_deploy = ov.logins_signed();
    r.pool_s = r.deploy_all_s - r.seed_s;
    r.rounds = r.deploy_all_s / a.interval.as_secs_f64();
    eprintln!(
        "run {n}: all {hosts} deployed in {:.2} s ({:.1} rounds; ln {hosts} = {:.2}), seed {:.2} s, {} logins, machine CPU {:.0} % busy; auth agent {:.1} % peak, {:.1} % mean",
        r.deploy_all_s,
        r.rounds,
        (hosts as f64).ln(),
        r.seed_s,
        r.logins_deploy,
        r.machine_cpu_busy_pct,
        r.agent_cpu_peak_pct,
        r.agent_cpu_mean_pct
    );

    // A settled pool, then kill -9 of half the peers at once.
    std::thread::sleep(a.interval * 3);
    let before = lab.peers_by_host();
    let victims: Vec<usize> = (hosts - hosts / 2..hosts).collect();
    let killed_ms = shoal_overlay::now_ms();
    let killed = Instant::now();
    for &v in &victims {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(before[v][0]),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let survivors: Vec<usize> = (0..hosts).filter(|i| !victims.contains(i)).collect();
    let mut detect = vec![None; hosts];
    let mut recover = vec![None; hosts];
    let done = poll_until(Duration::from_secs(120), || {
        let now = lab.peers_by_host();
        let t = killed.elapsed().as_secs_f64();
        for &v in &victims {
            if recover[v].is_none() && now[v].len() == 1 && now[v] != before[v] {
                recover[v] = Some(t);
            }
            two += usize::from(now[v].len() > 1);
        }
        // Detected: a survivor is contacting it, or has recovered or found
        // it unreachable since the kill.
        if detect
            .iter()
            .zip(&recover)
            .any(|(d, r)| d.is_none() && r.is_none())
        {
            for rep in reports(rt, &lab, &key, &survivors).into_iter().flatten() {
                for &v in &victims {
                    let name = &lab.hosts()[v].name;
                    if let Some(ts) = rep.targets.iter().find(|x| &x.name == name)
                        && detect[v].is_none()
                        && (ts.state == "contacting"
                            || ts.recovered_ms.is_some_and(|m| m >= killed_ms)
                            || ((ts.state == "unreachable" || ts.state == "failed")
                                && ts.last_seen_ms.is_none_or(|m| m < killed_ms)))
                    {
                        detect[v] = Some(t);
                    }
                }
            }
        }
        victims.iter().all(|&v| recover[v].is_some())
    });
    if !done {
        let left: Vec<&str> = victims
            .iter()
            .filter(|&&v| recover[v].is_none())
            .map(|&v| lab.hosts()[v].name.as_str())
            .collect();
        bail!("not recovered within 120 s: {left:?}");
    }
    // A host recovered before a poll saw its contact was detected no later.
    r.detect_s = victims
        .iter()
        .map(|&v| match (detect[v], recover[v]) {
            (Some(d), Some(x)) => d.min(x),
            (d, x) => d.or(x).unwrap_or(f64::NAN),
        })
        .collect();
    r.recover_s = victims
        .iter()
        .map(|&v| recover[v].unwrap_or(f64::NAN))
        .collect();
    r.recover_max_s = max(&r.recover_s);
    r.two_peers_seen = two;
    eprintln!(
        "run {n}: {} peers killed; detected after {:?} s, running again after {:?} s",
        victims.len(),
        r.detect_s
            .iter()
            .map(|x| (x * 100.0).round() / 100.0)
            .collect::<Vec<_>>(),
        r.recover_s
            .iter()
            .map(|x| (x * 100.0).round() / 100.0)
            .collect::<Vec<_>>()
    );

    // The overlay ends before the peers it is compared with start on the
    // same addresses: no auth agent, so no more logins, then every peer.
    drop(ov);
    for h in lab.hosts() {
        netlab::kill_processes_with(&format!("{}/", h.prefix.display()), Duration::from_secs(5));
    }

    if !a.no_ansible {
        let s = ansible_run(&lab, tmp.path(), &exe)?;
        eprintln!("run {n}: Ansible (forks 5) pushed and started {hosts} peers in {s:.2} s");
        r.ansible_s = Some(s);
        for h in lab.hosts() {
            netlab::kill_processes_with(
                &format!("{}/", h.dir.join("ansible").display()),
                Duration::from_secs(5),
            );
        }
    }
    if !a.no_serf {
        let (join, kill, false_failures) = serf_run(&lab, tmp.path())?;
        eprintln!(
            "run {n}: Serf join seen by all {join:.2} s, kill -9 seen by all {kill:.2} s, {false_failures} false failures"
        );
        r.serf_join_all_s = Some(join);
        r.serf_kill_seen_by_all_s = Some(kill);
        r.serf_false_failures = Some(false_failures);
    }
    drop(lab);
    Ok(r)
}

/// Ansible's default run (forks 5) copies the binary, the overlay key and
/// the target list to a fresh prefix on every host over OpenSSH, with the
/// same SSH key and the hosts' known keys, and starts a peer there
/// detached; the time until ansible-playbook exits with all peers running.
fn ansible_run(lab: &Lab, dir: &Path, exe: &Path) -> anyhow::Result<f64> {
    let d = dir.join("ansible");
    std::fs::create_dir_all(&d)?;
    let ssh_key = d.join("id_ed25519");
    netlab::keygen(&ssh_key)?;
    lab.authorize(&d.join("id_ed25519.pub"))?;
    let known = d.join("known_hosts");
    lab.write_known_hosts(&known)?;
    let key = d.join("overlay.key");
    shoal_overlay::files::write_new_key(&key)?;
    // The list with the Ansible prefixes (the peers it starts only ping).
    let list: String = lab.targets_toml(1, &[]).replace("/opt\"", "/ansible\"");
    std::fs::write(d.join("targets.toml"), list)?;
    let mut inv = String::from("[lab]\n");
    for h in lab.hosts() {
        inv.push_str(&format!(
            "{} ansible_host={} prefix={}\n",
            h.name,
            h.ip,
            h.dir.join("ansible").display()
        ));
    }
    inv.push_str(&format!(
        "[lab:vars]\nansible_user=root\nansible_ssh_private_key_file={}\n\
         ansible_ssh_common_args='-o UserKnownHostsFile={} -o StrictHostKeyChecking=yes'\n",
        ssh_key.display(),
        known.display()
    ));
    std::fs::write(d.join("inventory.ini"), inv)?;
    let play = format!(
        r#"- hosts: lab
  gather_facts: false
  tasks:
    - name: prefix
      file: {{ path: "{{{{ prefix }}}}/state", state: directory }}
    - name: binary
      copy: {{ src: "{exe}", dest: "{{{{ prefix }}}}/shoal", mode: "0755" }}
    - name: overlay key
      copy: {{ src: "{key}", dest: "{{{{ prefix }}}}/overlay.key", mode: "0600" }}
    - name: target list
      copy: {{ src: "{list}", dest: "{{{{ prefix }}}}/targets.toml" }}
    - name: start detached
      shell: >-
        setsid {{{{ prefix }}}}/shoal overlay peer --name {{{{ inventory_hostname }}}}
        --key {{{{ prefix }}}}/overlay.key --targets {{{{ prefix }}}}/targets.toml
        --dir {{{{ prefix }}}}/state > {{{{ prefix }}}}/peer.log 2>&1 < /dev/null &
"#,
        exe = exe.display(),
        key = key.display(),
        list = d.join("targets.toml").display()
    );
    std::fs::write(d.join("playbook.yml"), play)?;
    let t0 = Instant::now();
    let out = Command::new("ansible-playbook")
        .arg("-i")
        .arg(d.join("inventory.ini"))
        .arg(d.join("playbook.yml"))
        .env("ANSIBLE_NOCOLOR", "1")
        // Its own directory for temporary files and control sockets, so
        // runs do not share them.
        .env("ANSIBLE_LOCAL_TEMP", d.join("tmp"))
        .env("ANSIBLE_SSH_CONTROL_PATH_DIR", d.join("cp"))
        .stdin(Stdio::null())
        .output()
        .context("cannot run ansible-playbook (apt-get install ansible)")?;
    let prefixes: Vec<PathBuf> = lab.hosts().iter().map(|h| h.dir.join("ansible")).collect();
    let ok = poll_until(Duration::from_secs(10), || {
        netlab::peers_by_prefix(&prefixes)
            .iter()
            .all(|p| p.len() == 1)
    });
    let took = t0.elapsed().as_secs_f64();
    if !out.status.success() || !ok {
        bail!(
            "Ansible did not start a peer on every host: {}",
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    Ok(took)
}

/// A Serf agent per host (encrypted, as the overlay's traffic is), joined
/// to the first: the time until every agent has seen every member join,
/// the time until every other agent has seen the last one's kill -9, and
/// the failures reported of members that were not killed.
fn serf_run(lab: &Lab, dir: &Path) -> anyhow::Result<(f64, f64, usize)> {
    let d = dir.join("serf");
    std::fs::create_dir_all(&d)?;
    let keygen = Command::new("serf").arg("keygen").output()?;
    let key = String::from_utf8_lossy(&keygen.stdout).trim().to_string();
    let handler = d.join("handler.sh");
    std::fs::write(
        &handler,
        "#!/bin/sh\nt=$(date +%s.%N)\nwhile read -r name rest; do echo \"$t $SERF_EVENT $name\"; done >> \"$1\"\n",
    )?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&handler, std::fs::Permissions::from_mode(0o755))?;
    let n = lab.hosts().len();
    let events: Vec<PathBuf> = (0..n)
        .map(|i| d.join(format!("h{}.events", i + 1)))
        .collect();
    let mut agents = Vec::new();
    let start = |i: usize, join: Option<String>| -> anyhow::Result<std::process::Child> {
        let h = &lab.hosts()[i];
        let cfg = d.join(format!("{}.json", h.name));
        std::fs::write(&cfg, "{}")?;
        let mut c = lab.command(i, "serf");
        c.arg("agent")
            .arg(format!("-node={}", h.name))
            .arg(format!("-bind={}:7950", h.ip))
            .arg("-rpc-addr=127.0.0.1:7373")
            .arg(format!("-encrypt={key}"))
            .arg(format!("-config-file={}", cfg.display()))
            .arg(format!(
                "-event-handler=member-join,member-failed={} {}",
                handler.display(),
                events[i].display()
            ));
        if let Some(j) = join {
            c.arg(format!("-join={j}"));
        }
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join(format!("{}.log", h.name)))?)
            .spawn()
            .context("cannot start serf (apt-get install serf)")
    };
    let read = |i: usize| -> Vec<(f64, String, String)> {
        std::fs::read_to_string(&events[i])
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut p = l.split_whitespace();
                Some((
                    p.next()?.parse().ok()?,
                    p.next()?.to_string(),
                    p.next()?.to_string(),
                ))
            })
            .collect()
    };
    agents.push(start(0, None)?);
    if !poll_until(Duration::from_secs(10), || {
        read(0)
            .iter()
            .any(|(_, e, m)| e == "member-join" && m == "h1")
    }) {
        bail!("the first Serf agent did not start");
    }
    let first = format!("{}:7950", lab.hosts()[0].ip);
    let t0 = unix_s();
    for i in 1..n {
        agents.push(start(i, Some(first.clone()))?);
    }
    let names: Vec<String> = lab.hosts().iter().map(|h| h.name.clone()).collect();
    let mut join_all = f64::NAN;
    let joined = poll_until(Duration::from_secs(60), || {
        let mut latest = 0.0f64;
        for i in 0..n {
            let ev = read(i);
            for m in &names {
                match ev.iter().find(|(_, e, x)| e == "member-join" && x == m) {
                    Some((t, _, _)) => latest = latest.max(*t),
                    None => return false,
                }
            }
        }
        join_all = latest - t0;
        true
    });
    let result = (|| {
        if !joined {
            bail!("Serf's members did not all see each other join within 60 s");
        }
        // Settle, then kill -9 the last host's agent.
        std::thread::sleep(Duration::from_secs(3));
        let victim = n - 1;
        let t1 = unix_s();
        agents[victim].kill()?;
        let _ = agents[victim].wait();
        let mut seen = f64::NAN;
        let ok = poll_until(Duration::from_secs(60), || {
            let mut latest = 0.0f64;
            for i in 0..n - 1 {
                match read(i)
                    .iter()
                    .find(|(_, e, x)| e == "member-failed" && x == &names[victim])
                {
                    Some((t, _, _)) => latest = latest.max(*t),
                    None => return false,
                }
            }
            seen = latest - t1;
            true
        });
        if !ok {
            bail!("Serf's members did not all see the kill within 60 s");
        }
        let false_failures = (0..n)
            .flat_map(read)
            .filter(|(_, e, x)| e == "member-failed" && x != &names[victim])
            .count();
        Ok((join_all, seen, false_failures))
    })();
    for mut a in agents {
        let _ = a.kill();
        let _ = a.wait();
    }
    result
}

/// Runs `shoal bench overlay`.
pub fn run(a: BenchOverlayArgs) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "shoal bench overlay needs root (network namespaces, a bridge, sshd per host); run it as root (scripts/bench-overlay.sh)"
        );
    }
    if a.hosts < 2 || a.runs == 0 {
        bail!("--hosts must be at least 2 and --runs at least 1");
    }
    ensure_installed("sshd", "openssh-server").or_else(|e| {
        if Path::new("/usr/sbin/sshd").exists() {
            Ok(())
        } else {
            Err(e)
        }
    })?;
    if !a.no_ansible {
        ensure_installed("ansible-playbook", "ansible")?;
    }
    if !a.no_serf {
        ensure_installed("serf", "serf")?;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut runs = Vec::new();
    for n in 1..=a.runs {
        runs.push(one_run(&a, &rt, n)?);
    }
    let col = |f: &dyn Fn(&Run) -> f64| -> Vec<f64> { runs.iter().map(f).collect() };
    let ln = (a.hosts as f64).ln();
    let interval = a.interval.as_secs_f64();
    let deploy = median(&col(&|r| r.deploy_all_s));
    let ansible = median(&col(&|r| r.ansible_s.unwrap_or(f64::NAN)));
    let cpu_peak = max(&col(&|r| r.agent_cpu_peak_pct));
    let goal_s = (ln + 3.0) * interval;
    let all_detect: Vec<f64> = runs.iter().flat_map(|r| r.detect_s.clone()).collect();
    let all_recover: Vec<f64> = runs.iter().flat_map(|r| r.recover_s.clone()).collect();
    let out = serde_json::json!({
        "hosts": a.hosts,
        "runs": a.runs,
        "interval_s": interval,
        "timeout_s": a.timeout.unwrap_or(a.interval / 2).as_secs_f64(),
        "ln_n": ln,
        "median": {
            "seed_s": median(&col(&|r| r.seed_s)),
            "deploy_all_s": deploy,
            "pool_s": median(&col(&|r| r.pool_s)),
            "rounds": median(&col(&|r| r.rounds)),
            "logins_deploy": median(&col(&|r| r.logins_deploy as f64)),
            "machine_cpu_busy_pct": median(&col(&|r| r.machine_cpu_busy_pct)),
            "agent_cpu_peak_pct": median(&col(&|r| r.agent_cpu_peak_pct)),
            "agent_cpu_mean_pct": median(&col(&|r| r.agent_cpu_mean_pct)),
            "detect_s": median(&all_detect),
            "recover_s": median(&all_recover),
            "recover_max_s": median(&col(&|r| r.recover_max_s)),
            "ansible_s": ansible,
            "serf_join_all_s": median(&col(&|r| r.serf_join_all_s.unwrap_or(f64::NAN))),
            "serf_kill_seen_by_all_s": median(&col(&|r| r.serf_kill_seen_by_all_s.unwrap_or(f64::NAN))),
        },
        "goals": {
            "deploy_within_s": goal_s,
            "deploy_within_met": deploy <= goal_s,
            "faster_than_ansible": if ansible.is_finite() { serde_json::json!(deploy < ansible) } else { serde_json::Value::Null },
            "ansible_over_overlay": ansible / deploy,
            "agent_cpu_peak_under_10_pct": cpu_peak < 10.0,
            "two_peers_on_a_host_seen": runs.iter().map(|r| r.two_peers_seen).sum::<usize>(),
            "serf_false_failures": runs.iter().filter_map(|r| r.serf_false_failures).sum::<usize>(),
        },
        "all_runs": runs,
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        let m = &out["median"];
        let f = |k: &str| m[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "overlay over {} namespace hosts, {} runs, interval {interval} s (medians)",
            a.hosts, a.runs
        );
        println!(
            "deploy all          {:.2} s = {:.1} rounds (ln {} = {ln:.2}; goal ln n + 3 = {goal_s:.2} s: {})",
            deploy,
            f("rounds"),
            a.hosts,
            if deploy <= goal_s { "met" } else { "missed" }
        );
        println!(
            "  of which the seed {:.2} s; {:.0} logins; the machine's CPU {:.0} % busy",
            f("seed_s"),
            f("logins_deploy"),
            f("machine_cpu_busy_pct")
        );
        println!(
            "auth agent CPU      {:.1} % peak (max over runs {cpu_peak:.1} %), {:.1} % mean, of one core",
            f("agent_cpu_peak_pct"),
            f("agent_cpu_mean_pct")
        );
        println!(
            "kill -9 of half     detected {:.2} s, running again {:.2} s (slowest per run {:.2} s)",
            f("detect_s"),
            f("recover_s"),
            f("recover_max_s")
        );
        println!(
            "Ansible (forks 5)   {ansible:.2} s ({:.2}x the overlay)",
            ansible / deploy
        );
        println!(
            "Serf                join seen by all {:.2} s, kill -9 seen by all {:.2} s",
            f("serf_join_all_s"),
            f("serf_kill_seen_by_all_s")
        );
    }
    Ok(())
}
