//! The namespace lab: real hosts for the overlay on one machine. A private
//! bridge and N network namespaces joined to it by veth pairs, each running
//! its own OpenSSH server (its own host key, sshd_config, install prefix,
//! `internal-sftp`), as the SMON evaluation's PlanetLab nodes were separate
//! machines reached over SSH. The 16-host test, `shoal bench overlay` and
//! the namespace demo share it. It can take a host's link down and up and
//! shape it with `tc netem`, lists the peers running on a host, and removes
//! everything it made when dropped: the processes started from its
//! directory, the namespaces and the bridge.
//!
//! Needs root, iproute2 and `/usr/sbin/sshd` (Debian `openssh-server`).
//! Names carry the process id and a counter, and each lab takes a /24 of
//! 10.215.0.0/16 not in use on the machine (10.213 and 10.214 belong to the
//! discovery test and `shoal up --netns`), so labs in parallel tests do not
//! collide.

use anyhow::{Context, bail};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const SSHD: &str = "/usr/sbin/sshd";

/// One host of a [`Lab`].
#[derive(Debug, Clone)]
pub struct Host {
    /// `h1`, `h2`, ...: its name in the target list.
    pub name: String,
    /// Its network namespace.
    pub netns: String,
    /// Its address on the bridge (sshd and the overlay listen there).
    pub ip: Ipv4Addr,
    /// Its sshd's host key, as OpenSSH prints it (`SHA256:...`).
    pub host_key: String,
    /// Its public host key line (`ssh-ed25519 AAAA...`), for known_hosts.
    pub host_key_line: String,
    /// Its directory: sshd's files and its prefixes.
    pub dir: PathBuf,
    /// Its install prefix for the overlay (`DIR/opt`).
    pub prefix: PathBuf,
    veth: String,
}

/// A bridge, its namespace hosts and their sshds; all removed on drop.
pub struct Lab {
    tag: String,
    subnet: u8,
    dir: PathBuf,
    hosts: Vec<Host>,
    sshds: Vec<Child>,
    made_netns: Vec<String>,
    bridge_made: bool,
}

static LABS: AtomicU32 = AtomicU32::new(0);

/// Runs a command; its stdout, or an error naming it and its stderr.
fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let o = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {program}: is it installed?"))?;
    if !o.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Makes an ed25519 key pair at `path` and `path.pub` (no passphrase);
/// returns the public key's fingerprint (`SHA256:...`).
pub fn keygen(path: &Path) -> anyhow::Result<String> {
    let p = path.to_str().context("the key path is not UTF-8")?;
    run("ssh-keygen", &["-q", "-t", "ed25519", "-N", "", "-f", p])?;
    fingerprint(Path::new(&format!("{p}.pub")))
}

/// The fingerprint of the public key file `pub_path`.
pub fn fingerprint(pub_path: &Path) -> anyhow::Result<String> {
    let out = run(
        "ssh-keygen",
        &["-lf", pub_path.to_str().context("not UTF-8")?],
    )?;
    out.split_whitespace()
        .nth(1)
        .map(str::to_string)
        .with_context(|| {
            format!(
                "ssh-keygen printed no fingerprint for {}",
                pub_path.display()
            )
        })
}

/// Processes whose command line contains `needle`, with their command lines
/// (NUL between arguments).
pub fn processes_with(needle: &str) -> Vec<(i32, String)> {
    let mut v = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return v;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
            let c = String::from_utf8_lossy(&c).into_owned();
            if c.contains(needle) {
                v.push((pid, c));
            }
        }
    }
    v
}

/// SIGKILL to every process whose command line contains `needle` (never this
/// one), until none is left or `within` passed (a peer may be starting
/// another meanwhile); returns how many were killed.
pub fn kill_processes_with(needle: &str, within: Duration) -> usize {
    let me = std::process::id() as i32;
    let t = Instant::now();
    let mut killed = 0;
    loop {
        let found: Vec<i32> = processes_with(needle)
            .into_iter()
            .map(|(p, _)| p)
            .filter(|&p| p != me)
            .collect();
        if found.is_empty() || t.elapsed() > within {
            return killed;
        }
        for p in found {
            if nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGKILL,
            )
            .is_ok()
            {
                killed += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What the command line of an installed host's peer holds (`shoal agent
/// --overlay PREFIX`, as `shoal overlay start` runs it), NUL-separated as
/// /proc/PID/cmdline is.
pub const PEER_ARGV: &str = "agent\0--overlay\0";
/// A peer started by hand (`shoal overlay peer`), as the benchmark's
/// Ansible play starts one.
pub const HAND_PEER_ARGV: &str = "overlay\0peer\0";

/// Whether a command line is an overlay peer's, either kind.
pub fn is_peer(cmdline: &str) -> bool {
    cmdline.contains(PEER_ARGV) || cmdline.contains(HAND_PEER_ARGV)
}

/// The overlay peers running from each of `prefixes`, from one pass over
/// /proc.
pub fn peers_by_prefix(prefixes: &[PathBuf]) -> Vec<Vec<i32>> {
    let needles: Vec<String> = prefixes
        .iter()
        .map(|p| format!("{}/", p.display()))
        .collect();
    let mut v = vec![Vec::new(); prefixes.len()];
    for (pid, c) in processes_with("\0").into_iter().filter(|(_, c)| is_peer(c)) {
        if let Some(i) = needles.iter().position(|n| c.contains(n.as_str())) {
            v[i].push(pid);
        }
    }
    v
}

impl Lab {
    /// Creates `hosts` namespace hosts under `dir` (which must exist and
    /// outlive the lab), each with its sshd listening on port 22 and ready.
    /// Every sshd accepts the public keys in `DIR/authorized_keys` for root
    /// (see [`Lab::authorize`]).
    pub fn create(dir: &Path, hosts: usize) -> anyhow::Result<Lab> {
        if !nix::unistd::geteuid().is_root() {
            bail!("the namespace lab needs root (network namespaces, a bridge, sshd); run as root");
        }
        if !Path::new(SSHD).exists() {
            bail!("{SSHD} is missing: apt-get install openssh-server");
        }
        if hosts == 0 || hosts > 250 {
            bail!("a lab has 1 to 250 hosts, not {hosts}");
        }
        let dir = std::fs::canonicalize(dir)
            .with_context(|| format!("the lab directory {} must exist", dir.display()))?;
        let mut lab = Lab {
            tag: String::new(),
            subnet: 0,
            dir,
            hosts: Vec::new(),
            sshds: Vec::new(),
            made_netns: Vec::new(),
            bridge_made: false,
        };
        lab.make_bridge()?;
        std::fs::create_dir_all("/run/sshd").context("cannot create /run/sshd")?;
        for i in 1..=hosts {
            let h = lab.make_host(i)?;
            lab.hosts.push(h);
        }
        for i in 0..hosts {
            let c = lab.start_sshd(i)?;
            lab.sshds.push(c);
        }
        lab.wait_sshds(Duration::from_secs(20))?;
        Ok(lab)
    }

    /// A bridge under a name no other lab holds, on a /24 no interface of
    /// this machine uses.
    fn make_bridge(&mut self) -> anyhow::Result<()> {
        let pid = std::process::id();
        let used = run("ip", &["-o", "-4", "addr", "show"])? + &run("ip", &["-4", "route"])?;
        for _ in 0..64 {
            let n = LABS.fetch_add(1, Ordering::Relaxed);
            let tag = format!("{:04x}{:x}", pid & 0xffff, n & 0xf);
            let subnet = ((pid.wrapping_mul(7).wrapping_add(n.wrapping_mul(37))) % 250 + 1) as u8;
            if used.contains(&format!("10.215.{subnet}.")) {
                continue;
            }
            let br = format!("shlb{tag}");
            if run("ip", &["link", "add", &br, "type", "bridge"]).is_err() {
                continue; // another lab holds the name
            }
            self.tag = tag;
            self.subnet = subnet;
            self.bridge_made = true;
            run(
                "ip",
                &[
                    "addr",
                    "add",
                    &format!("{}/24", self.bridge_ip()),
                    "dev",
                    &br,
                ],
            )?;
            run("ip", &["link", "set", &br, "up"])?;
            return Ok(());
        }
        bail!("no free bridge name or 10.215.X.0/24 subnet for the lab; remove stale shlb* bridges")
    }

    fn make_host(&mut self, i: usize) -> anyhow::Result<Host> {
        let netns = format!("shoal-l{i}-{}", self.tag);
        let veth = format!("shl{i}{}", self.tag);
        let ip = Ipv4Addr::new(10, 215, self.subnet, i as u8);
        run("ip", &["netns", "add", &netns])?;
        self.made_netns.push(netns.clone());
        run(
            "ip",
            &[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &netns,
            ],
        )?;
        run("ip", &["link", "set", &veth, "master", &self.bridge()])?;
        run("ip", &["link", "set", &veth, "up"])?;
        let ns = |args: &[&str]| {
            let mut a = vec!["-n", netns.as_str()];
            a.extend_from_slice(args);
            run("ip", &a)
        };
        ns(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        ns(&["link", "set", "eth0", "up"])?;
        ns(&["link", "set", "lo", "up"])?;
        let dir = self.dir.join(format!("h{i}"));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let key = dir.join("ssh_host_ed25519_key");
        let host_key = keygen(&key)?;
        let host_key_line = std::fs::read_to_string(dir.join("ssh_host_ed25519_key.pub"))?
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        // SHLVL=1: Debian's bash sources ~/.bashrc for a command run by sshd
        // only at shell level 1, so the hosts' shells stay clean of this
        // machine's root rc files (a `pyenv init` there serialized every
        // command on its rehash lock and stalled 16 deployments).
        std::fs::write(
            dir.join("sshd_config"),
            format!(
                "ListenAddress {ip}:22\nHostKey {key}\nPidFile {d}/sshd.pid\n\
                 AuthorizedKeysFile {auth}\nPermitRootLogin prohibit-password\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
                 StrictModes no\nSubsystem sftp internal-sftp\nMaxStartups 100\n\
                 MaxSessions 100\nSetEnv SHLVL=1\nClientAliveInterval 5\n\
                 ClientAliveCountMax 3\nLogLevel VERBOSE\n",
                key = key.display(),
                d = dir.display(),
                auth = self.dir.join("authorized_keys").display(),
            ),
        )?;
        Ok(Host {
            name: format!("h{i}"),
            netns,
            ip,
            host_key,
            host_key_line,
            prefix: dir.join("opt"),
            dir,
            veth,
        })
    }

    fn start_sshd(&self, i: usize) -> anyhow::Result<Child> {
        let h = &self.hosts[i];
        let log = std::fs::File::create(h.dir.join("sshd.log"))?;
        Command::new("ip")
            .args(["netns", "exec", &h.netns, SSHD, "-D", "-e", "-f"])
            .arg(h.dir.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start sshd for {}", h.name))
    }

    fn wait_sshds(&mut self, within: Duration) -> anyhow::Result<()> {
        let t = Instant::now();
        for i in 0..self.hosts.len() {
            let addr = SocketAddr::from((self.hosts[i].ip, 22));
            while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
                if let Ok(Some(s)) = self.sshds[i].try_wait() {
                    bail!(
                        "sshd of {} exited ({s}): {}",
                        self.hosts[i].name,
                        std::fs::read_to_string(self.hosts[i].dir.join("sshd.log"))
                            .unwrap_or_default()
                    );
                }
                if t.elapsed() > within {
                    bail!("sshd of {} does not listen on {addr}", self.hosts[i].name);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// The hosts, `h1` first.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The lab's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The bridge's name.
    pub fn bridge(&self) -> String {
        format!("shlb{}", self.tag)
    }

    /// The machine's own address on the bridge (an auth agent listens there).
    pub fn bridge_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 215, self.subnet, 254)
    }

    /// Lets the public key file `pub_key` log in as root on every host.
    pub fn authorize(&self, pub_key: &Path) -> anyhow::Result<()> {
        let k = std::fs::read_to_string(pub_key)
            .with_context(|| format!("cannot read {}", pub_key.display()))?;
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("authorized_keys"))?;
        writeln!(f, "{}", k.trim())?;
        Ok(())
    }

    /// A known_hosts file of every host's key, for OpenSSH clients.
    pub fn write_known_hosts(&self, path: &Path) -> anyhow::Result<()> {
        let text: String = self
            .hosts
            .iter()
            .map(|h| format!("{} {}\n", h.ip, h.host_key_line))
            .collect();
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
    }

    /// A target list (docs/overlay.md) of every host at its prefix; the hosts
    /// in `wrong_key` (indexes) are listed with another host's key, as an
    /// impostor would present.
    pub fn targets_toml(&self, version: u64, wrong_key: &[usize]) -> String {
        let mut t = format!("version = {version}\n");
        for (i, h) in self.hosts.iter().enumerate() {
            let key = if wrong_key.contains(&i) {
                &self.hosts[(i + 1) % self.hosts.len()].host_key
            } else {
                &h.host_key
            };
            t.push_str(&format!(
                "[[target]]\nname = \"{}\"\naddress = \"{}\"\nprefix = \"{}\"\nhost_key = \"{key}\"\n",
                h.name,
                h.ip,
                h.prefix.display()
            ));
        }
        t
    }

    /// A command run inside host `i`'s namespace.
    pub fn command(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.hosts[i].netns]).arg(program);
        c
    }

    /// Takes host `i`'s link down: nothing reaches it, nothing leaves it.
    pub fn link_down(&self, i: usize) -> anyhow::Result<()> {
        run("ip", &["link", "set", &self.hosts[i].veth, "down"]).map(drop)
    }

    /// Brings host `i`'s link back up.
    pub fn link_up(&self, i: usize) -> anyhow::Result<()> {
        run("ip", &["link", "set", &self.hosts[i].veth, "up"]).map(drop)
    }

    /// Shapes host `i`'s outgoing traffic with `tc netem` (e.g. `["delay",
    /// "50ms", "10ms", "loss", "1%"]`), replacing any earlier shaping.
    pub fn netem(&self, i: usize, args: &[&str]) -> anyhow::Result<()> {
        let mut a = vec![
            "-n",
            self.hosts[i].netns.as_str(),
            "qdisc",
            "replace",
            "dev",
            "eth0",
            "root",
            "netem",
        ];
        a.extend_from_slice(args);
        run("tc", &a).map(drop)
    }

    /// Removes host `i`'s shaping.
    pub fn clear_netem(&self, i: usize) -> anyhow::Result<()> {
        run(
            "tc",
            &[
                "-n",
                &self.hosts[i].netns,
                "qdisc",
                "del",
                "dev",
                "eth0",
                "root",
            ],
        )
        .map(drop)
    }

    /// The overlay peers running on host `i` from its prefix, by pid.
    pub fn peers(&self, i: usize) -> Vec<i32> {
        self.peers_under(&self.hosts[i].prefix)
    }

    /// The overlay peers of every host (by index), from one pass over /proc:
    /// cheap enough to poll every 100 ms.
    pub fn peers_by_host(&self) -> Vec<Vec<i32>> {
        let prefixes: Vec<PathBuf> = self.hosts.iter().map(|h| h.prefix.clone()).collect();
        peers_by_prefix(&prefixes)
    }

    /// The overlay peers running from the install prefix `prefix`.
    pub fn peers_under(&self, prefix: &Path) -> Vec<i32> {
        let needle = format!("{}/", prefix.display());
        processes_with(&needle)
            .into_iter()
            .filter(|(_, c)| is_peer(c))
            .map(|(p, _)| p)
            .collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.sshds {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Every process started for the lab runs from its directory (sshds by
        // their config, peers by their prefix).
        let dir = format!("{}/", self.dir.display());
        kill_processes_with(&dir, Duration::from_secs(5));
        // And every process left inside a host (an SSH session whose
        // client vanished while its link was down holds no lab path, and
        // would keep the namespace and its veth alive after `netns del`).
        for ns in &self.made_netns {
            for _ in 0..10 {
                let pids = run("ip", &["netns", "pids", ns]).unwrap_or_default();
                let pids: Vec<i32> = pids
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect();
                if pids.is_empty() {
                    break;
                }
                for p in pids {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(p),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // The killed processes' TCP connections outlive them as orphan
        // sockets, which hold their namespace (and its veth) until they time
        // out, minutes later: destroy them while the bridge is still there.
        for ns in &self.made_netns {
            let _ = run("ip", &["netns", "exec", ns, "ss", "-K", "-t", "-a"]);
            let _ = run("ip", &["netns", "del", ns]);
        }
        if self.bridge_made {
            let _ = run("ip", &["link", "del", &self.bridge()]);
        }
    }
}

/// What an operator prepares before seeding a lab's overlay: the overlay
/// key, a signed release of the binary, the target list of every host, the
/// SSH key (authorized on every host) and the auth agent holding it,
/// listening on the bridge. The agent is stopped on drop.
pub struct Overlay {
    /// The binary that is released and seeded.
    pub shoal: PathBuf,
    /// The overlay key file (K_E).
    pub key: PathBuf,
    /// The release directory.
    pub release: PathBuf,
    /// The target list file.
    pub targets: PathBuf,
    /// The auth agent's directory (its `audit.log`).
    pub agent_dir: PathBuf,
    /// The SSH private key the auth agent holds.
    pub ssh_key: PathBuf,
    /// Where the auth agent listens.
    pub agent_addr: SocketAddr,
    agent: Child,
}

impl Overlay {
    /// Prepares the overlay of `lab` in `dir` with the binary `shoal`; the
    /// hosts in `wrong_key` are listed with another host's key.
    pub fn prepare(
        lab: &Lab,
        shoal: &Path,
        dir: &Path,
        wrong_key: &[usize],
    ) -> anyhow::Result<Overlay> {
        Self::prepare_with(lab, shoal, dir, lab.targets_toml(1, wrong_key))
    }

    /// [`Overlay::prepare`] with the target list `targets` (TOML).
    pub fn prepare_with(
        lab: &Lab,
        shoal: &Path,
        dir: &Path,
        targets_toml: String,
    ) -> anyhow::Result<Overlay> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let agent_dir = dir.join("agent");
        std::fs::create_dir_all(&agent_dir)?;
        let ssh_key = agent_dir.join("id_ed25519");
        keygen(&ssh_key)?;
        lab.authorize(&agent_dir.join("id_ed25519.pub"))?;
        let key = dir.join("overlay.key");
        crate::files::write_new_key(&key)?;
        let release_key = dir.join("release.key");
        crate::release::write_new_key(&release_key)?;
        let release = dir.join("release");
        crate::release::sign(
            &release_key,
            shoal,
            crate::peer::package_version(),
            &release,
        )?;
        let targets = dir.join("targets.toml");
        std::fs::write(&targets, targets_toml)?;
        let agent_addr = SocketAddr::from((lab.bridge_ip(), 7947));
        let log = dir.join("auth-agent.log");
        let agent = Command::new(shoal)
            .arg("auth-agent")
            .arg("--dir")
            .arg(&agent_dir)
            .arg("--key")
            .arg(&ssh_key)
            .arg("--listen")
            .arg(agent_addr.to_string())
            .arg("--overlay-key")
            .arg(&key)
            .arg("--targets")
            .arg(&targets)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(dir.join("auth-agent.err"))?)
            .spawn()
            .context("cannot start the auth agent")?;
        let mut o = Overlay {
            shoal: shoal.to_path_buf(),
            key,
            release,
            targets,
            agent_dir,
            ssh_key,
            agent_addr,
            agent,
        };
        let t = Instant::now();
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("auth agent listening")
        {
            if let Ok(Some(s)) = o.agent.try_wait() {
                bail!(
                    "the auth agent exited ({s}): {}",
                    std::fs::read_to_string(dir.join("auth-agent.err")).unwrap_or_default()
                );
            }
            if t.elapsed() > Duration::from_secs(10) {
                bail!("the auth agent did not start within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(o)
    }

    /// The auth agent's process id.
    pub fn agent_pid(&self) -> u32 {
        self.agent.id()
    }

    /// `shoal overlay seed HOST` with the peers' timers.
    pub fn seed_command(&self, host: &str, interval: Duration, timeout: Duration) -> Command {
        let mut c = Command::new(&self.shoal);
        c.args(["overlay", "seed", host, "--targets"])
            .arg(&self.targets)
            .arg("--key")
            .arg(&self.key)
            .arg("--release")
            .arg(&self.release)
            .arg("--auth-agent")
            .arg(self.agent_addr.to_string())
            .arg("--interval")
            .arg(format!("{}ms", interval.as_millis()))
            .arg("--timeout")
            .arg(format!("{}ms", timeout.as_millis()))
            .stdin(Stdio::null());
        c
    }

    /// The logins the auth agent signed so far.
    pub fn logins_signed(&self) -> usize {
        std::fs::read_to_string(self.agent_dir.join("audit.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"signed\":true"))
            .count()
    }

    /// Stops the auth agent: no more logins.
    pub fn stop_agent(&mut self) {
        let _ = self.agent.kill();
        let _ = self.agent.wait();
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        self.stop_agent();
    }
}
