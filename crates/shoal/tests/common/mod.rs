//! Test harness: real `shoal` processes on loopback, waited on with
//! deadlines, killed on drop.
#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub mod load;

pub const BIN: &str = env!("CARGO_BIN_EXE_shoal");

/// A child process whose output is captured; killed (whole group) on drop.
pub struct Proc {
    pub child: Child,
    pub out: Arc<Mutex<String>>,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, args: &[&str]) -> Proc {
        Self::spawn_cmd(name, Command::new(BIN).args(args))
    }

    pub fn spawn_cmd(name: &str, cmd: &mut Command) -> Proc {
        use std::os::unix::process::CommandExt;
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let out = Arc::new(Mutex::new(String::new()));
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let out = out.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let mut o = out.lock().unwrap();
                    o.push_str(&line);
                    o.push('\n');
                }
            });
        }
        Proc {
            child,
            out,
            name: name.to_string(),
        }
    }

    pub fn output(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// kill -9 of the process itself (not its group: apps survive an agent
    /// crash, as they would on a real machine).
    pub fn kill9(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGTERM,
        );
        self.child.wait().unwrap()
    }

    /// Waits for exit with a deadline.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                t.elapsed() < within,
                "{} did not exit; output:\n{}",
                self.name,
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the output contains `needle`; returns the output.
    pub fn wait_output(&self, needle: &str, within: Duration) -> String {
        let t = Instant::now();
        loop {
            let o = self.output();
            if o.contains(needle) {
                return o;
            }
            assert!(
                t.elapsed() < within,
                "{}: no {needle:?} within {within:?}; output:\n{o}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGTERM,
        );
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(8) {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.child.wait();
    }
}

/// Polls `f` until it returns Some, or panics after `within`.
pub fn wait_for<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            t.elapsed() < within,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs the binary to completion; returns (success, stdout, stderr).
pub fn run(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(BIN).args(args).output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A cluster: identity directory and manager.
pub struct Cluster {
    pub tmp: tempfile::TempDir,
    pub manager: Option<Proc>,
    pub url: String,
    pub ttl: f64,
}

impl Cluster {
    pub fn dir(&self) -> PathBuf {
        self.tmp.path().join("cluster")
    }

    pub fn dir_str(&self) -> String {
        self.dir().display().to_string()
    }

    /// `shoal init` + `shoal manager` on an ephemeral loopback port.
    pub fn start(ttl: f64) -> Cluster {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cluster");
        let ttl_s = ttl.to_string();
        let (ok, _, err) = run(&[
            "init",
            "--dir",
            dir.to_str().unwrap(),
            "--lease-ttl",
            &ttl_s,
        ]);
        assert!(ok, "init failed: {err}");
        let mut c = Cluster {
            tmp,
            manager: None,
            url: String::new(),
            ttl,
        };
        c.start_manager("127.0.0.1:0");
        c
    }

    pub fn start_manager(&mut self, listen: &str) {
        self.start_manager_with(listen, &[]);
    }

    /// Starts the manager with `extra` flags besides the usual ones.
    pub fn start_manager_with(&mut self, listen: &str, extra: &[&str]) {
        let dir = self.dir_str();
        let mut args = vec![
            "manager",
            "--dir",
            &dir,
            "--listen",
            listen,
            "--no-discovery",
            "--dashboard",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        let m = Proc::spawn("manager", &args);
        let out = m.wait_output("listening on https://", Duration::from_secs(20));
        let url = out
            .split("listening on ")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string();
        self.url = url;
        self.manager = Some(m);
    }

    pub fn port(&self) -> u16 {
        self.url.rsplit(':').next().unwrap().parse().unwrap()
    }

    pub fn token(&self) -> String {
        let (ok, out, err) = run(&["token", "--dir", &self.dir_str()]);
        assert!(ok, "{err}");
        out.trim().to_string()
    }

    pub fn agent_dir(&self, name: &str) -> PathBuf {
        self.tmp.path().join(format!("agent-{name}"))
    }

    pub fn agent(&self, name: &str, roles: &str) -> Proc {
        let dir = self.agent_dir(name);
        let token = self.token();
        let mut args = vec![
            "agent".to_string(),
            "--join".into(),
            self.url.clone(),
            "--token".into(),
            token,
            "--name".into(),
            name.into(),
            "--dir".into(),
            dir.display().to_string(),
        ];
        if !roles.is_empty() {
            args.push("--roles".into());
            args.push(roles.into());
        }
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        Proc::spawn(&format!("agent-{name}"), &a)
    }

    /// Runs an administrator's `shoal ARGS --dir DIR --manager URL` against
    /// this cluster.
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let dir = self.dir_str();
        let mut all = args.to_vec();
        all.extend(["--dir", &dir, "--manager", &self.url]);
        run(&all)
    }

    /// An agent that registers `address` as its own (one loopback address
    /// per node, as separate hosts would have).
    pub fn agent_at(&self, name: &str, address: &str) -> Proc {
        self.agent_at_with(name, address, &[])
    }

    /// [`Cluster::agent_at`] with more agent flags (`--shape-dev eth0`).
    pub fn agent_at_with(&self, name: &str, address: &str, extra: &[&str]) -> Proc {
        let dir = self.agent_dir(name);
        let token = self.token();
        let mut args = vec![
            "agent",
            "--join",
            &self.url,
            "--token",
            &token,
            "--name",
            name,
            "--dir",
            dir.to_str().unwrap(),
            "--address",
            address,
        ];
        args.extend_from_slice(extra);
        Proc::spawn(&format!("agent-{name}"), &args)
    }

    fn status_cmd(&self) -> (bool, String, String) {
        run(&[
            "status",
            "--dir",
            &self.dir_str(),
            "--manager",
            &self.url,
            "--json",
        ])
    }

    /// `shoal status --json` against this cluster.
    pub fn status(&self) -> Value {
        let (ok, out, err) = self.status_cmd();
        assert!(ok, "status failed: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("status JSON: {e}: {out}"))
    }

    pub fn try_status(&self) -> Option<Value> {
        let (ok, out, _) = self.status_cmd();
        if !ok {
            return None;
        }
        serde_json::from_str(&out).ok()
    }

    pub fn node(&self, name: &str) -> Option<Value> {
        self.status()["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == name)
            .cloned()
    }

    /// Service `name`'s summary from `shoal status --json`, if it answers.
    pub fn service(&self, name: &str) -> Option<Value> {
        self.try_status()?["services"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == name)
            .cloned()
    }

    pub fn wait_alive(&self, names: &[&str]) {
        wait_for(
            &format!("nodes {names:?} alive"),
            Duration::from_secs(30),
            || {
                let s = self.try_status()?;
                let nodes = s["nodes"].as_array()?.clone();
                names
                    .iter()
                    .all(|n| {
                        nodes
                            .iter()
                            .any(|x| x["name"] == *n && x["state"] == "alive")
                    })
                    .then_some(())
            },
        )
    }

    /// An admin API client.
    pub fn admin(&self) -> shoal_net::client::ApiClient {
        shoal_net::client::ApiClient::admin(
            &shoal_net::ClusterDir::new(self.dir()),
            Some(&self.url),
        )
        .unwrap()
    }
}

/// A free loopback port (bound and released; fine for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A plain HTTP GET of `http://addr/path` (status, body), or None.
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    Some((code, body))
}

pub fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// Whether a process exists.
pub fn alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.split_whitespace().nth(2) == Some("Z"))
            .unwrap_or(true)
}

/// The strings of array `field` of `v` (node names in a service summary).
pub fn names(v: &Value, field: &str) -> Vec<String> {
    v[field]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a test that builds namespace hosts with sshd can run: it needs
/// root (else it says SKIPPED and returns false) and Debian's
/// openssh-server (else it fails, naming the package).
#[allow(dead_code)]
pub fn root_with_sshd() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: this test needs root (network namespaces, sshd); run it as root");
        return false;
    }
    assert!(
        std::path::Path::new("/usr/sbin/sshd").exists(),
        "/usr/sbin/sshd is missing: apt-get install openssh-server (scripts/test.sh does)"
    );
    true
}
