//! The package a deployer copies (SMON II-A-1: "the installation
//! package"), and the installer and starter that run on the target.
//!
//! A package directory holds `shoal` (the binary), `overlay.key`,
//! `targets.json.gz`, `peer.json` (the peer's name, prefix, timers and auth
//! agent), the release (`manifest.json`, `manifest.sig`, `release.pub`) and
//! `package.sha256`, written last by the deployer (a `sha256sum` file, so the
//! target checks the transfer before it runs anything). The layout of the
//! prefix is [`shoal_core::overlay::deploy`]'s.

use crate::files;
use crate::release::{self, Release};
use anyhow::Context;
use serde::{Deserialize, Serialize};
use shoal_core::overlay::deploy::{EXIT_ALREADY, EXIT_CORRUPT, InstallStep, install_step};
use shoal_core::overlay::{Target, TargetList};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The deploy token's file in a package.
pub const JOIN_TOKEN: &str = "join.token";

/// `peer.json`: how the deployed peer runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerFile {
    /// Its name in the target list.
    pub name: String,
    /// The target's prefix.
    pub prefix: String,
    /// Between two pings.
    pub interval_ms: u64,
    /// A ping's timeout.
    pub timeout_ms: u64,
    /// The auth agent's UDP address.
    pub auth_agent: SocketAddr,
    /// Its replicas, tried in turn when one does not answer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub more_auth_agents: Vec<SocketAddr>,
    /// The manager the deployed agent joins (with `join.token`, a deploy
    /// token the deployer minted for it); none: the overlay runs alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manager: Option<String>,
}

/// The settings every peer of a pool shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Between two pings.
    pub interval_ms: u64,
    /// A ping's timeout.
    pub timeout_ms: u64,
    /// The auth agents' UDP addresses (one or more replicas; never empty).
    pub auth_agents: Vec<SocketAddr>,
    /// The manager's URL, if the pool has one.
    pub manager: Option<String>,
}

/// What a deployer ships: the same for every target but `peer.json`.
#[derive(Debug, Clone)]
pub struct Package {
    /// The binary to copy.
    pub binary: PathBuf,
    /// `overlay.key`, as its file reads.
    pub overlay_key: String,
    /// The target list the deployer holds now.
    pub targets: TargetList,
    /// The release the binary belongs to.
    pub release: Release,
    /// Timers and the auth agent.
    pub settings: Settings,
}

impl Package {
    /// The package of an installed peer: its package directory `pkg`, with
    /// the target list it holds now in `state`.
    pub fn installed(pkg: &Path, state: &Path) -> anyhow::Result<Package> {
        let p = read_peer_file(pkg)?;
        let targets = match files::load_stored(state)? {
            Some(l) => l,
            None => files::load_stored(pkg)?
                .with_context(|| format!("no target list in {}", pkg.display()))?,
        };
        Ok(Package {
            binary: pkg.join("shoal"),
            overlay_key: std::fs::read_to_string(pkg.join("overlay.key"))
                .with_context(|| format!("cannot read {}", pkg.join("overlay.key").display()))?,
            targets,
            release: release::read(pkg)?,
            settings: Settings {
                interval_ms: p.interval_ms,
                timeout_ms: p.timeout_ms,
                auth_agents: std::iter::once(p.auth_agent)
                    .chain(p.more_auth_agents)
                    .collect(),
                manager: p.manager,
            },
        })
    }

    /// The small files for `target` (everything but the binary and
    /// `package.sha256`), by name; `join_token`, the deploy token minted
    /// for it, if the pool has a manager.
    pub fn files_for(
        &self,
        target: &Target,
        join_token: Option<&str>,
    ) -> anyhow::Result<Vec<(&'static str, Vec<u8>)>> {
        let peer = PeerFile {
            name: target.name.clone(),
            prefix: target.prefix.clone(),
            interval_ms: self.settings.interval_ms,
            timeout_ms: self.settings.timeout_ms,
            auth_agent: *self
                .settings
                .auth_agents
                .first()
                .context("no auth agent in the package's settings")?,
            more_auth_agents: self.settings.auth_agents.iter().skip(1).copied().collect(),
            manager: self.settings.manager.clone(),
        };
        let mut files = vec![
            ("overlay.key", self.overlay_key.clone().into_bytes()),
            ("targets.json.gz", files::compressed(&self.targets)?),
            ("peer.json", serde_json::to_vec_pretty(&peer)?),
            ("manifest.json", self.release.manifest.clone()),
            ("manifest.sig", self.release.signature.clone().into_bytes()),
            ("release.pub", self.release.public_key.clone().into_bytes()),
        ];
        if let Some(t) = join_token {
            files.push((JOIN_TOKEN, format!("{t}\n").into_bytes()));
        }
        Ok(files)
    }
}

/// Reads `peer.json` in the package directory `pkg`.
pub fn read_peer_file(pkg: &Path) -> anyhow::Result<PeerFile> {
    let p = pkg.join("peer.json");
    let t = std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?;
    serde_json::from_slice(&t).with_context(|| format!("{}", p.display()))
}

/// What the installer or the starter ended as; the process exits with
/// [`Ended::code`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// Installed and started, or started.
    Started,
    /// Already running (start) or already installed (install).
    Already(String),
    /// The package failed its checks.
    Corrupt(String),
}

impl Ended {
    /// The exit status.
    pub fn code(&self) -> i32 {
        match self {
            Ended::Started => 0,
            Ended::Already(_) => EXIT_ALREADY as i32,
            Ended::Corrupt(_) => EXIT_CORRUPT as i32,
        }
    }
}

fn lock(path: &Path) -> anyhow::Result<Option<nix::fcntl::Flock<std::fs::File>>> {
    Ok(shoal_net::identity::try_lock(path)?)
}

/// `shoal overlay install --package DIR`, run by the deployer on the target
/// from the copied binary: checks the release, takes the install lock,
/// installs (the marker last) and starts the peer; a copy that finds
/// another installed or installing aborts and removes itself.
pub fn install(pkg: &Path) -> anyhow::Result<Ended> {
    let pkg =
        std::fs::canonicalize(pkg).with_context(|| format!("no package {}", pkg.display()))?;
    let peer = read_peer_file(&pkg)?;
    let prefix = PathBuf::from(&peer.prefix);
    let rel = release::read(&pkg)?;
    // This deployer's claim on the prefix ends with this installer, however
    // it ends.
    let claim = prefix.join(shoal_core::overlay::deploy::CLAIM);
    if let Err(e) = check_shipped(&rel, &pkg) {
        let _ = std::fs::remove_dir_all(&pkg);
        let _ = std::fs::remove_dir(&claim);
        return Ok(Ended::Corrupt(format!("{e:#}")));
    }
    let held = lock(&prefix.join("install.lock"))?;
    let marker = prefix.join("installed");
    if install_step(held.is_some(), marker.exists()) == InstallStep::Abort {
        let _ = std::fs::remove_dir_all(&pkg);
        if held.is_some() {
            let _ = std::fs::remove_dir(&claim);
        }
        return Ok(Ended::Already(
            "another deployer's copy is installed or installing; this copy aborted".into(),
        ));
    }
    let state = prefix.join("state");
    std::fs::create_dir_all(&state)?;
    if let Some(shipped) = files::load_stored(&pkg)? {
        let stored = files::load_stored(&state)?;
        if stored.is_none_or(|s| shipped.version() > s.version()) {
            files::store(&state, &shipped)?;
        }
    }
    let tmp = prefix.join(".current.tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&pkg, &tmp)?;
    std::fs::rename(&tmp, prefix.join("current"))?;
    // The completion marker, last and atomically: a crash before this line
    // leaves a prefix that is "not installed", and the next deployer's copy
    // takes over (the lock died with this process).
    let mtmp = prefix.join(".installed.tmp");
    let mut f = std::fs::File::create(&mtmp)?;
    writeln!(f, "{}", pkg.display())?;
    f.sync_all()?;
    std::fs::rename(&mtmp, &marker)?;
    let _ = std::fs::remove_dir(&claim);
    drop(held);
    start(&prefix)
}

/// The copied package's binary is the released one: the manifest's
/// signature verifies, and the binary's digest in `package.sha256`, which
/// the deployer's `sha256sum -c` checked against the file just before it
/// ran this installer, is the manifest's; so the 30 MB binary is not hashed
/// a second time on the target. Without `package.sha256` the binary is
/// hashed here.
fn check_shipped(rel: &Release, pkg: &Path) -> anyhow::Result<()> {
    let m = rel.verify(None)?;
    let sums = match std::fs::read_to_string(pkg.join("package.sha256")) {
        Ok(s) => s,
        Err(_) => return rel.check_binary(&pkg.join("shoal"), None).map(drop),
    };
    let shipped = sums
        .lines()
        .find_map(|l| l.strip_suffix("  shoal"))
        .context("package.sha256 lists no digest of the binary")?;
    let size = std::fs::metadata(pkg.join("shoal"))?.len();
    anyhow::ensure!(
        shipped == m.binary_sha256 && size == m.binary_size,
        "the binary (sha256 {shipped}, {size} bytes) is not the released one (sha256 {}, {} bytes)",
        m.binary_sha256,
        m.binary_size
    );
    Ok(())
}

/// Starts `bin args` in its own session, stdin from /dev/null and output
/// appended to `log`, so that it outlives the SSH session (or the process)
/// that started it: nohup's job.
pub(crate) fn spawn_detached(
    bin: &Path,
    args: &[&std::ffi::OsStr],
    log: &Path,
) -> anyhow::Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let mut cmd = std::process::Command::new(bin);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    // SAFETY: setsid is async-signal-safe; it detaches the child from the
    // session so it outlives the deployer's logout.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("cannot start {}", bin.display()))
}

/// Keeps the manager of cluster directory `dir` running on this host (the
/// target's `manager`; SMON: the manager is an application the overlay
/// keeps alive): if no process holds its lock, starts `bin manager --dir
/// DIR EXTRA...` detached, output to `DIR/manager.log`, and waits until
/// it holds the lock.
pub fn keep_manager(
    bin: &Path,
    dir: &Path,
    extra: &[std::ffi::OsString],
) -> shoal_core::overlay::ManagerOutcome {
    use shoal_core::overlay::ManagerOutcome;
    use shoal_net::identity::files::{CONFIG, MANAGER_LOCK, MANAGER_LOG};
    if !dir.join(CONFIG).exists() {
        return ManagerOutcome::Failed(format!(
            "{} is not a cluster directory (no {CONFIG}); create it on this host with `shoal init --dir {}`",
            dir.display(),
            dir.display()
        ));
    }
    let run = || -> anyhow::Result<ManagerOutcome> {
        match lock(&dir.join(MANAGER_LOCK))? {
            None => return Ok(ManagerOutcome::Running),
            Some(l) => drop(l),
        }
        let mut args: Vec<&std::ffi::OsStr> =
            vec!["manager".as_ref(), "--dir".as_ref(), dir.as_os_str()];
        args.extend(extra.iter().map(|a| a.as_os_str()));
        let mut child = spawn_detached(bin, &args, &dir.join(MANAGER_LOG))?;
        let log = dir.join(MANAGER_LOG);
        match wait_locked(&mut child, &dir.join(MANAGER_LOCK))? {
            Waited::Locked => Ok(ManagerOutcome::Started),
            Waited::Exited(s) => anyhow::bail!("the manager exited ({s}): {}", last_line(&log)),
            Waited::TimedOut => anyhow::bail!(
                "the manager did not take {MANAGER_LOCK} within 10 s; see {}",
                log.display()
            ),
        }
    };
    run().unwrap_or_else(|e| ManagerOutcome::Failed(format!("{e:#}")))
}

/// `shoal overlay start --prefix P`: starts the installed agent, with its
/// overlay peer, detached (`shoal agent --overlay P`: its own session,
/// output to `P/state/peer.log`) and waits until it holds the peer's run
/// lock. Idempotent: a running peer is left alone.
pub fn start(prefix: &Path) -> anyhow::Result<Ended> {
    let state = prefix.join("state");
    let current = prefix.join("current");
    std::fs::create_dir_all(&state)?;
    match lock(&state.join("peer.lock"))? {
        None => return Ok(Ended::Already("already-running".into())),
        Some(l) => drop(l),
    }
    let mut child = spawn_detached(
        &current.join("shoal"),
        &["agent".as_ref(), "--overlay".as_ref(), prefix.as_os_str()],
        &state.join("peer.log"),
    )?;
    let log = state.join("peer.log");
    match wait_locked(&mut child, &state.join("peer.lock"))? {
        Waited::Locked => Ok(Ended::Started),
        // It found another peer holding the lock.
        Waited::Exited(s) if s.success() => Ok(Ended::Already("already-running".into())),
        Waited::Exited(s) => anyhow::bail!("the peer exited ({s}): {}", last_line(&log)),
        Waited::TimedOut => anyhow::bail!(
            "the peer did not take its run lock within 10 s; see {}",
            log.display()
        ),
    }
}

/// How waiting for a started process to take its lock ended.
enum Waited {
    Locked,
    Exited(std::process::ExitStatus),
    TimedOut,
}

/// Waits up to 10 s until another process (the one just started) holds
/// the lock at `path`, or `child` exits.
fn wait_locked(child: &mut std::process::Child, path: &Path) -> anyhow::Result<Waited> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if lock(path)?.is_none() {
            return Ok(Waited::Locked);
        }
        if let Some(s) = child.try_wait()? {
            return Ok(Waited::Exited(s));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Waited::TimedOut)
}

/// The last non-empty line of a log, for an error message.
fn last_line(log: &Path) -> String {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .to_string()
}
