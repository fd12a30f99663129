//! A supervised process: the body of every built-in adaptor.

use super::{Adaptor, AdaptorError};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use shoal_net::wire::{AppState, AppStatus, Params};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// How long an app gets to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long a started app may take to pass its first health check before it
/// counts as unhealthy.
const STARTUP_GRACE: Duration = Duration::from_secs(10);
/// After this long running healthy, the restart back-off starts over.
const STABLE_AFTER: Duration = Duration::from_secs(10);

/// Which built-in adaptor this process implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// Any program: `command`, `args`, `env.*`, `file.*`, `health`.
    Process,
    /// nginx with a private configuration: `listen`, `root`.
    Nginx,
    /// The built-in `shoal www` static server: `listen`, `root`.
    Www,
    /// Debian's icecast2 with a private configuration: `listen`, `mounts`,
    /// `max_listeners`, `burst_kb`, `relay_from`, `secret.source_password`.
    Icecast,
}

impl Flavor {
    fn name(self) -> &'static str {
        match self {
            Flavor::Process => "process",
            Flavor::Nginx => "nginx",
            Flavor::Www => "www",
            Flavor::Icecast => "icecast",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Health {
    Tcp(String),
    Http(String),
}

/// What to run, derived from the control parameters.
#[derive(Debug, Clone)]
struct Spec {
    program: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    files: Vec<(PathBuf, String)>,
    health: Option<Health>,
    endpoint: Option<String>,
    /// The icecast adaptor's configuration (its stats are read with it).
    icecast: Option<super::icecast::Config>,
}

const NGINX_CONF: &str = r#"# Written by the shoal agent; edits are overwritten by `set`.
daemon off;
master_process on;
worker_processes 1;
pid {{ app_dir }}/nginx.pid;
error_log {{ app_dir }}/error.log warn;
{% if as_root %}user root;{% endif %}
events { worker_connections 4096; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    client_body_temp_path {{ app_dir }}/tmp/body;
    proxy_temp_path {{ app_dir }}/tmp/proxy;
    fastcgi_temp_path {{ app_dir }}/tmp/fastcgi;
    uwsgi_temp_path {{ app_dir }}/tmp/uwsgi;
    scgi_temp_path {{ app_dir }}/tmp/scgi;
    types {
        text/html html htm;
        text/css css;
        text/plain txt;
        application/javascript js;
        application/json json;
        image/png png;
        image/jpeg jpg jpeg;
        image/svg+xml svg;
    }
    default_type application/octet-stream;
    server {
        listen {{ listen }};
        root {{ root }};
        location / { }
    }
}
"#;

fn render(
    env: &minijinja::Environment<'_>,
    name: &str,
    tpl: &str,
    ctx: &minijinja::Value,
) -> Result<String, AdaptorError> {
    env.render_str(tpl, ctx)
        .map_err(|e| AdaptorError::Params(format!("template {name}: {e}")))
}

fn need<'a>(params: &'a Params, key: &str, flavor: Flavor) -> Result<&'a str, AdaptorError> {
    params
        .get(key)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            AdaptorError::Params(format!(
                "the {} adaptor needs the parameter {key} (e.g. --param {key}=...)",
                flavor.name()
            ))
        })
}

fn parse_health(s: &str) -> Result<Health, AdaptorError> {
    if let Some(rest) = s.strip_prefix("tcp:") {
        Ok(Health::Tcp(rest.to_string()))
    } else if s.starts_with("http://") {
        Ok(Health::Http(s.to_string()))
    } else {
        Err(AdaptorError::Params(format!(
            "health must be tcp:HOST:PORT or http://HOST:PORT/PATH, got {s:?}"
        )))
    }
}

fn spec(
    flavor: Flavor,
    params: &Params,
    app_dir: &Path,
    id: &str,
    node: &str,
) -> Result<Spec, AdaptorError> {
    let env = minijinja::Environment::new();
    let mut ctx_map: std::collections::BTreeMap<String, String> = params.clone();
    ctx_map.insert("app_dir".into(), app_dir.display().to_string());
    ctx_map.insert("node".into(), node.to_string());
    ctx_map.insert("id".into(), id.to_string());
    // `{{ shoal }}`: this binary, for apps that run a built-in program
    // (the units of a job running `shoal bsp`).
    if let Ok(exe) = std::env::current_exe() {
        ctx_map.insert("shoal".into(), exe.display().to_string());
    }
    let mut ctx = minijinja::Value::from_serialize(&ctx_map);
    shoal_net::wire::check_params(flavor.name(), params).map_err(AdaptorError::Params)?;
    match flavor {
        Flavor::Process => {
            let program = render(&env, "command", need(params, "command", flavor)?, &ctx)?;
            let args = match params.get("args") {
                Some(a) => shell_words::split(&render(&env, "args", a, &ctx)?)
                    .map_err(|e| AdaptorError::Params(format!("args: {e}")))?,
                None => Vec::new(),
            };
            let mut envs = Vec::new();
            let mut files = Vec::new();
            for (k, v) in params {
                if let Some(name) = k.strip_prefix("env.") {
                    envs.push((name.to_string(), render(&env, k, v, &ctx)?));
                } else if let Some(name) = k.strip_prefix("secret.") {
                    // Passed as is: a secret is no template.
                    envs.push((name.to_string(), v.clone()));
                } else if let Some(name) = k.strip_prefix("file.") {
                    files.push((app_dir.join(name), render(&env, k, v, &ctx)?));
                }
            }
            let health = params
                .get("health")
                .map(|h| render(&env, "health", h, &ctx))
                .transpose()?;
            Ok(Spec {
                program,
                args,
                env: envs,
                files,
                health: health.as_deref().map(parse_health).transpose()?,
                endpoint: params.get("endpoint").cloned(),
                icecast: None,
            })
        }
        Flavor::Nginx | Flavor::Www => {
            let listen = need(params, "listen", flavor)?.to_string();
            let root = need(params, "root", flavor)?.to_string();
            if !Path::new(&root).is_dir() {
                return Err(AdaptorError::Params(format!(
                    "root {root:?} is not a directory on node {node}; create it or fix the root parameter"
                )));
            }
            if flavor == Flavor::Www {
                let exe = std::env::current_exe().map_err(|e| {
                    AdaptorError::Spawn(format!("cannot find the shoal binary: {e}"))
                })?;
                let mut args = vec![
                    "www".into(),
                    "--listen".into(),
                    listen.clone(),
                    "--root".into(),
                    root,
                ];
                if let Some(mb) = params.get("cache_mb") {
                    args.extend(["--cache-mb".into(), mb.clone()]);
                }
                if let Some(c) = params.get("cpus") {
                    args.extend(["--cpus".into(), c.clone()]);
                }
                return Ok(Spec {
                    program: exe.display().to_string(),
                    args,
                    env: Vec::new(),
                    files: Vec::new(),
                    health: Some(Health::Tcp(listen.clone())),
                    endpoint: Some(listen),
                    icecast: None,
                });
            }
            let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx"]
                .into_iter()
                .find(|p| Path::new(p).exists())
                .ok_or_else(|| {
                    AdaptorError::Spawn(
                        "nginx is not installed on this node (apt-get install -y nginx)".into(),
                    )
                })?;
            ctx_map.insert(
                "as_root".into(),
                if nix::unistd::geteuid().is_root() {
                    "yes"
                } else {
                    ""
                }
                .into(),
            );
            ctx = minijinja::Value::from_serialize(&ctx_map);
            let conf = app_dir.join("nginx.conf");
            Ok(Spec {
                program: nginx.to_string(),
                args: vec![
                    "-p".into(),
                    app_dir.display().to_string(),
                    "-c".into(),
                    conf.display().to_string(),
                    "-e".into(),
                    app_dir.join("error.log").display().to_string(),
                ],
                env: Vec::new(),
                files: vec![(conf, render(&env, "nginx.conf", NGINX_CONF, &ctx)?)],
                health: Some(Health::Tcp(listen.clone())),
                endpoint: Some(listen),
                icecast: None,
            })
        }
        Flavor::Icecast => {
            let cfg = super::icecast::Config::from_params(params)?;
            if !Path::new(super::icecast::PROGRAM).exists() {
                return Err(AdaptorError::Spawn(format!(
                    "icecast2 is not installed on node {node} ({} is missing; apt-get install -y icecast2)",
                    super::icecast::PROGRAM
                )));
            }
            let as_root = nix::unistd::geteuid().is_root();
            let home = super::icecast::home(app_dir, as_root);
            let conf = home.join("icecast.xml");
            let xml = cfg.render(&home, as_root);
            let listen = cfg.listen.to_string();
            Ok(Spec {
                program: super::icecast::PROGRAM.into(),
                args: vec!["-c".into(), conf.display().to_string()],
                env: Vec::new(),
                files: vec![(conf, xml)],
                health: Some(Health::Tcp(listen.clone())),
                endpoint: Some(listen),
                icecast: Some(cfg),
            })
        }
    }
}

/// Gives `path` to the user icecast switches to, so that it can re-read
/// its configuration on SIGHUP and write its access log.
fn give_to_icecast_user(path: &Path) -> Result<(), AdaptorError> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let (u, g) = super::icecast::RUN_AS;
    let uid = nix::unistd::User::from_name(u)
        .ok()
        .flatten()
        .map(|x| x.uid);
    let gid = nix::unistd::Group::from_name(g)
        .ok()
        .flatten()
        .map(|x| x.gid);
    if uid.is_none() {
        return Err(AdaptorError::Spawn(format!(
            "icecast refuses to run as root and this node has no user {u:?} to run it as; create it (adduser --system {u})"
        )));
    }
    nix::unistd::chown(path, uid, gid).map_err(|e| AdaptorError::Io {
        path: path.to_path_buf(),
        source: e.into(),
    })
}

/// A process a previous run of the agent started and this one took over:
/// not a child (unless the agent re-executed itself), so it is watched
/// through a pidfd, which becomes readable when the process exits.
struct Adopted {
    pidfd: std::os::fd::OwnedFd,
    pid: u32,
    start: u64,
}

impl Adopted {
    /// Takes over `pid` if it is still the process started at `start`.
    fn open(pid: u32, start: u64) -> Option<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: pidfd_open takes a pid and flags and returns a new
        // descriptor or -1; nothing is borrowed.
        let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid as i32, 0) };
        if fd < 0 {
            return None;
        }
        // SAFETY: the kernel just returned this descriptor to us alone.
        let pidfd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
        // The pid could have been reused between reading the pid file and
        // opening it: the start time settles it, now that it is pinned.
        (start_time(pid) == Some(start)).then_some(Self { pidfd, pid, start })
    }

    /// Whether it has exited; reaps it if it is our child (after a
    /// re-execution the agent is still its parent).
    fn exited(&self) -> bool {
        use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
        use std::os::fd::AsFd;
        match waitid(
            Id::PIDFd(self.pidfd.as_fd()),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG,
        ) {
            Ok(WaitStatus::StillAlive) => false,
            Ok(_) => true,
            // Not our child: its parent reaps it; gone or a zombie is exited.
            Err(_) => {
                let zombie = procfs::process::Process::new(self.pid as i32)
                    .and_then(|p| p.stat())
                    .map(|s| s.state == 'Z')
                    .unwrap_or(true);
                zombie || start_time(self.pid) != Some(self.start)
            }
        }
    }
}

/// What identifies what an app runs: its adaptor and parameters. A process
/// left by a previous agent run is adopted only if it runs the same thing
/// (FNV-1a: stable across builds, unlike std's hasher).
fn run_key(flavor: Flavor, params: &Params) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: &[u8]| {
        for x in b {
            h ^= u64::from(*x);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    };
    eat(flavor.name().as_bytes());
    for (k, v) in params {
        eat(k.as_bytes());
        eat(v.as_bytes());
    }
    format!("{h:016x}")
}

/// A supervised application process.
pub struct ProcessApp {
    adopted: Option<Adopted>,
    flavor: Flavor,
    id: String,
    dir: PathBuf,
    node: String,
    params: Params,
    child: Option<Child>,
    pid: Option<u32>,
    state: AppState,
    message: Option<String>,
    restarts: u32,
    attempt: u32,
    started_at: Option<Instant>,
    healthy_since: Option<Instant>,
    restart_at: Option<Instant>,
    spec: Spec,
}

impl ProcessApp {
    /// A stopped app; parameters are checked now.
    pub fn new(
        flavor: Flavor,
        id: String,
        dir: PathBuf,
        node: String,
        params: Params,
    ) -> Result<Self, AdaptorError> {
        std::fs::create_dir_all(&dir).map_err(|source| AdaptorError::Io {
            path: dir.clone(),
            source,
        })?;
        let spec = spec(flavor, &params, &dir, &id, &node)?;
        Ok(Self {
            adopted: None,
            flavor,
            id,
            dir,
            node,
            params,
            child: None,
            pid: None,
            state: AppState::Stopped,
            message: None,
            restarts: 0,
            attempt: 0,
            started_at: None,
            healthy_since: None,
            restart_at: None,
            spec,
        })
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.join("pid")
    }

    fn write_files(&self) -> Result<(), AdaptorError> {
        if self.flavor == Flavor::Nginx {
            for t in ["body", "proxy", "fastcgi", "uwsgi", "scgi"] {
                let p = self.dir.join("tmp").join(t);
                std::fs::create_dir_all(&p).map_err(|source| AdaptorError::Io {
                    path: p.clone(),
                    source,
                })?;
            }
        }
        if self.flavor == Flavor::Icecast {
            let home = super::icecast::home(&self.dir, nix::unistd::geteuid().is_root());
            if home != self.dir {
                use std::os::unix::fs::PermissionsExt;
                let io = |path: &Path| {
                    let path = path.to_path_buf();
                    move |source| AdaptorError::Io { path, source }
                };
                let parent = home.parent().unwrap_or(&home);
                std::fs::create_dir_all(&home).map_err(io(&home))?;
                // Others may pass through the parent, not list it.
                std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o711))
                    .map_err(io(parent))?;
                std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700))
                    .map_err(io(&home))?;
                give_to_icecast_user(&home)?;
            }
        }
        for (path, text) in &self.spec.files {
            // Config files may hold credentials: only the agent's user
            // reads them (an existing file keeps its mode on open, so set it).
            use std::io::Write;
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            let io = |source| AdaptorError::Io {
                path: path.clone(),
                source,
            };
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .mode(0o600)
                .open(path)
                .map_err(io)?;
            f.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(io)?;
            f.write_all(text.as_bytes()).map_err(io)?;
            if self.flavor == Flavor::Icecast {
                give_to_icecast_user(path)?;
            }
        }
        Ok(())
    }

    fn spawn(&mut self) -> Result<(), AdaptorError> {
        self.write_files()?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("output.log"))
            .map_err(|source| AdaptorError::Io {
                path: self.dir.join("output.log"),
                source,
            })?;
        let log2 = log.try_clone().map_err(|source| AdaptorError::Io {
            path: self.dir.join("output.log"),
            source,
        })?;
        let mut cmd = Command::new(&self.spec.program);
        cmd.args(&self.spec.args)
            .envs(self.spec.env.iter().cloned())
            .current_dir(&self.dir)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Its own process group, so stop reaches every process it forks.
            .process_group(0)
            .kill_on_drop(false);
        let child = cmd
            .spawn()
            .map_err(|e| AdaptorError::Spawn(format!("cannot run {}: {e}", self.spec.program)))?;
        let pid = child.id();
        if let Some(pid) = pid {
            let st = start_time(pid).unwrap_or(0);
            let key = run_key(self.flavor, &self.params);
            let _ = std::fs::write(self.pid_file(), format!("{pid} {st} {key}\n"));
        }
        self.pid = pid;
        self.child = Some(child);
        self.state = AppState::Starting;
        self.started_at = Some(Instant::now());
        self.healthy_since = None;
        self.restart_at = None;
        self.message = None;
        Ok(())
    }

    async fn healthy(&self) -> bool {
        let probe = async {
            match &self.spec.health {
                None => true,
                Some(Health::Tcp(a)) => tokio::net::TcpStream::connect(a.as_str()).await.is_ok(),
                Some(Health::Http(u)) => http_ok(u).await,
            }
        };
        tokio::time::timeout(Duration::from_millis(500), probe)
            .await
            .unwrap_or(false)
    }

    fn kill_group(&self, sig: Signal) {
        if let Some(pid) = self.pid {
            let _ = killpg(Pid::from_raw(pid as i32), sig);
        }
    }

    /// Takes over the process the pid file names if a previous run of the
    /// agent left it running the same thing; stops it if it runs something
    /// else. Returns whether it was adopted.
    fn adopt(&mut self) -> bool {
        let Some((pid, st, key)) = read_pid_file(&self.pid_file()) else {
            return false;
        };
        if start_time(pid) != Some(st) {
            let _ = std::fs::remove_file(self.pid_file());
            return false;
        }
        if key.as_deref() != Some(run_key(self.flavor, &self.params).as_str()) {
            tracing::info!(app = %self.id, pid, "a previous run left it with other parameters: replacing it");
            stop_orphan(pid, st);
            let _ = std::fs::remove_file(self.pid_file());
            return false;
        }
        let Some(a) = Adopted::open(pid, st) else {
            return false;
        };
        // Said on stderr, as the agent's registration is: an operator
        // checking a restart wants to see it.
        eprintln!(
            "app {}: re-adopted the running process {pid} a previous agent run started",
            self.id
        );
        self.adopted = Some(a);
        self.pid = Some(pid);
        self.state = AppState::Starting;
        self.started_at = Some(Instant::now());
        self.healthy_since = None;
        self.restart_at = None;
        self.message = None;
        true
    }

    fn running(&self) -> bool {
        self.child.is_some() || self.adopted.is_some()
    }

    fn schedule_restart(&mut self, why: String) {
        // Leftovers of the group (nginx workers of a killed master) would
        // hold the port: clear the group before starting again.
        self.kill_group(Signal::SIGKILL);
        self.child = None;
        self.adopted = None;
        let wait = shoal_core::lease::backoff_ms(self.attempt, 200, 10_000, rand::random());
        self.attempt = self.attempt.saturating_add(1);
        self.state = AppState::Backoff;
        self.message = Some(format!("{why}; restarting in {wait} ms"));
        self.restart_at = Some(Instant::now() + Duration::from_millis(wait));
    }
}

/// The last non-empty line of an app's output, shortened for a status line.
fn last_output_line(path: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(4096))).ok()?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    let line = text.lines().rev().map(str::trim).find(|l| !l.is_empty())?;
    let mut line: String = line.chars().filter(|c| !c.is_control()).collect();
    if line.chars().count() > 240 {
        line = line.chars().take(240).collect::<String>() + "...";
    }
    Some(line)
}

async fn http_ok(url: &str) -> bool {
    let Ok(c) = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
    else {
        return false;
    };
    matches!(c.get(url).send().await, Ok(r) if r.status().is_success())
}

/// The start time (clock ticks since boot) of `pid`, which tells a process
/// from a later one that reused its pid.
fn start_time(pid: u32) -> Option<u64> {
    procfs::process::Process::new(pid as i32)
        .ok()?
        .stat()
        .ok()
        .map(|s| s.starttime)
}

/// The pid, start time and run key in a pid file (the key is absent in
/// files written before apps were adopted).
fn read_pid_file(pf: &Path) -> Option<(u32, u64, Option<String>)> {
    let text = std::fs::read_to_string(pf).ok()?;
    let mut it = text.split_whitespace();
    let pid = it.next()?.parse().ok()?;
    let st = it.next()?.parse().ok()?;
    Some((pid, st, it.next().map(str::to_string)))
}

/// Stops the process group of `pid` if it is still the process started at
/// `st`: SIGTERM, SIGKILL after the grace period.
fn stop_orphan(pid: u32, st: u64) {
    if start_time(pid) != Some(st) {
        return;
    }
    let pg = Pid::from_raw(pid as i32);
    let _ = killpg(pg, Signal::SIGTERM);
    let deadline = Instant::now() + STOP_GRACE;
    while start_time(pid) == Some(st) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = killpg(pg, Signal::SIGKILL);
}

/// Stops application processes a previous agent run left behind, found by
/// their pid files, except those of the apps in `keep` (which the agent
/// re-adopted or will). Returns how many were stopped.
pub fn reap_orphans(apps_dir: &Path, keep: &std::collections::BTreeSet<String>) -> usize {
    let mut n = 0;
    let Ok(rd) = std::fs::read_dir(apps_dir) else {
        return 0;
    };
    for e in rd.flatten() {
        if keep.contains(&*e.file_name().to_string_lossy()) {
            continue;
        }
        let pf = e.path().join("pid");
        let Some((pid, st, _)) = read_pid_file(&pf) else {
            let _ = std::fs::remove_file(&pf);
            continue;
        };
        if start_time(pid) == Some(st) {
            stop_orphan(pid, st);
            n += 1;
        }
        let _ = std::fs::remove_file(&pf);
    }
    n
}

#[async_trait::async_trait]
impl Adaptor for ProcessApp {
    fn kind(&self) -> &'static str {
        self.flavor.name()
    }

    async fn status(&mut self) -> AppStatus {
        if let Some(child) = self.child.as_mut() {
            match child.try_wait() {
                Ok(Some(st)) => {
                    // The app's own last words say why, so that status and
                    // describe can without anyone reading output.log.
                    let why = match last_output_line(&self.dir.join("output.log")) {
                        Some(l) => format!("exited ({st}): {l}"),
                        None => format!("exited ({st})"),
                    };
                    self.schedule_restart(why)
                }
                Ok(None) => {}
                Err(e) => self.schedule_restart(format!("lost track of the process: {e}")),
            }
        }
        if self.adopted.as_ref().is_some_and(Adopted::exited) {
            // Not our child: its exit status went to its parent.
            self.schedule_restart(
                "exited (a re-adopted process; its exit status is its parent's)".into(),
            );
        }
        if self.state == AppState::Backoff && self.restart_at.is_some_and(|t| Instant::now() >= t) {
            self.restarts += 1;
            if let Err(e) = self.spawn() {
                self.schedule_restart(e.to_string());
            }
        }
        if self.running() {
            if self.healthy().await {
                let since = *self.healthy_since.get_or_insert_with(Instant::now);
                self.state = AppState::Running;
                self.message = None;
                if since.elapsed() >= STABLE_AFTER {
                    self.attempt = 0;
                }
            } else {
                self.healthy_since = None;
                let young = self.started_at.is_some_and(|t| t.elapsed() < STARTUP_GRACE);
                self.state = if young {
                    AppState::Starting
                } else {
                    AppState::Unhealthy
                };
                if !young {
                    self.message = Some("failing its health check".into());
                }
            }
        }
        // icecast's own figures: listeners per mount, bytes sent.
        let stream = match (&self.spec.icecast, self.state) {
            (Some(cfg), AppState::Running) => super::icecast::fetch_stats(cfg).await.ok(),
            _ => None,
        };
        // A relay serves once every mount has its master's stream: before,
        // a listener sent to it would get 404.
        if let Some(cfg) = &self.spec.icecast
            && cfg.relay_from.is_some()
            && self.state == AppState::Running
        {
            let live = stream.as_ref().is_some_and(|st| {
                cfg.mounts
                    .iter()
                    .all(|m| st.mounts.get(m).is_some_and(|x| x.live))
            });
            if !live {
                self.state = AppState::Starting;
                self.message = Some(format!(
                    "waiting for the stream from {}",
                    cfg.relay_from.map(|a| a.to_string()).unwrap_or_default()
                ));
            }
        }
        AppStatus {
            id: self.id.clone(),
            adaptor: self.flavor.name().to_string(),
            state: self.state,
            pid: if self.running() { self.pid } else { None },
            restarts: self.restarts,
            endpoint: self.spec.endpoint.clone(),
            message: self.message.clone(),
            bandwidth: None,
            stream,
        }
    }

    async fn start(&mut self) -> Result<(), AdaptorError> {
        if self.running() || self.adopt() {
            return Ok(());
        }
        match self.spawn() {
            Ok(()) => Ok(()),
            Err(e) => {
                self.state = AppState::Failed;
                self.message = Some(e.to_string());
                Err(e)
            }
        }
    }

    async fn stop(&mut self) -> Result<(), AdaptorError> {
        if let Some(mut child) = self.child.take() {
            self.kill_group(Signal::SIGTERM);
            if tokio::time::timeout(STOP_GRACE, child.wait())
                .await
                .is_err()
            {
                self.kill_group(Signal::SIGKILL);
                let _ = child.wait().await;
            }
            // Children of the app that ignored SIGTERM go too.
            self.kill_group(Signal::SIGKILL);
        }
        if let Some(a) = self.adopted.take() {
            self.kill_group(Signal::SIGTERM);
            let deadline = Instant::now() + STOP_GRACE;
            while !a.exited() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            self.kill_group(Signal::SIGKILL);
        }
        let _ = std::fs::remove_file(self.pid_file());
        if self.flavor == Flavor::Icecast {
            let home = super::icecast::home(&self.dir, nix::unistd::geteuid().is_root());
            if home != self.dir {
                let _ = std::fs::remove_dir_all(home);
            }
        }
        self.pid = None;
        self.state = AppState::Stopped;
        self.restart_at = None;
        Ok(())
    }

    async fn set(&mut self, params: Params) -> Result<(), AdaptorError> {
        let new = spec(self.flavor, &params, &self.dir, &self.id, &self.node)?;
        self.params = params;
        let running = self.running();
        if self.flavor == Flavor::Nginx && running {
            // nginx reloads in place: write the new config, check it, HUP.
            self.spec = new;
            self.write_files()?;
            let out = Command::new(&self.spec.program)
                .args(&self.spec.args)
                .arg("-t")
                .output()
                .await
                .map_err(|e| AdaptorError::Spawn(format!("nginx -t: {e}")))?;
            if !out.status.success() {
                return Err(AdaptorError::Params(format!(
                    "nginx refused the new configuration: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            if let Some(pid) = self.pid {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGHUP);
            }
            return Ok(());
        }
        let same_socket =
            self.spec.icecast.as_ref().map(|c| c.listen) == new.icecast.as_ref().map(|c| c.listen);
        if self.flavor == Flavor::Icecast && running && same_socket {
            // icecast re-reads its configuration on SIGHUP and keeps its
            // listeners (mounts, limits, relays, passwords change in place);
            // a new listen socket needs a restart.
            self.spec = new;
            self.write_files()?;
            if let Some(pid) = self.pid {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGHUP);
            }
            return Ok(());
        }
        self.stop().await?;
        self.spec = new;
        self.attempt = 0;
        self.start().await
    }
}
