//! The live peer: one UDP socket, the sans-I/O [`Peer`] and the work it
//! asks for. This loop decides nothing: it moves datagrams, hands the peer
//! the clock, runs contacts through a [`Deployer`] and stores adopted
//! target lists.

use crate::fetch::{self, What};
use crate::files;
use crate::seal::{Opener, OverlayKey, Sealer};
use crate::upgrade::{self, Pending};
use crate::wire::{self, Body, Message, StatusReport, TargetStatus};
use anyhow::Context;
use shoal_core::overlay::apps::{Apps, Installed, StateTag};
use shoal_core::overlay::report::{AppReport, UpgradeReport};
use shoal_core::overlay::{
    Command, Config, Livetag, ManagerOutcome, Outcome, Peer, Random, Source, Target, TargetList,
    Version,
};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

/// The package version a peer announces: this build's crate version.
pub fn package_version() -> Version {
    let part = |s: &str| s.parse::<u64>().unwrap_or(0);
    let mut it = env!("CARGO_PKG_VERSION").split('.');
    let (a, b, c) = (
        part(it.next().unwrap_or("0")),
        part(it.next().unwrap_or("0")),
        part(it.next().unwrap_or("0")),
    );
    Version::new(a * 1_000_000 + b * 1_000 + c, 0)
}

/// Carries out a contact: log in, inspect, apply
/// [`shoal_core::overlay::remedy`], log out.
#[async_trait::async_trait]
pub trait Deployer: Send + Sync + 'static {
    /// Contacts `target` and says how it went.
    async fn contact(&self, target: Target) -> Outcome;
}

/// The deployer of a peer without SSH: every contact fails, and says why.
pub struct NoDeployer;

#[async_trait::async_trait]
impl Deployer for NoDeployer {
    async fn contact(&self, _target: Target) -> Outcome {
        Outcome::Failed(
            "no SSH deployer: this peer was started without --package, so it only pings".into(),
        )
    }
}

/// One overlay app as the host should run it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppRun {
    /// Its name.
    pub name: String,
    /// Its version.
    pub version: Version,
    /// The state the overlay agreed on, and that state's version.
    pub state: StateTag,
    /// The adaptor.
    pub adaptor: String,
    /// Its parameters, `{{ package }}` replaced by the package directory.
    pub params: std::collections::BTreeMap<String, String>,
    /// The restart script.
    pub restart: Option<String>,
    /// The installed package.
    pub package: PathBuf,
    /// The app's own directory (its pid file, its output).
    pub dir: PathBuf,
}

/// What runs the overlay's apps on this host (the agent's adaptors, in the
/// binary): level-triggered, called every round and whenever an app's spec
/// or state changes.
#[async_trait::async_trait]
pub trait AppHost: Send + Sync + 'static {
    /// Brings the host's overlay apps in line with `apps` (SMON's rule,
    /// [`shoal_core::overlay::apps::supervise`]) and reports each one.
    async fn reconcile(&self, apps: Vec<AppRun>) -> Vec<AppReport>;
}

/// How a peer runs.
#[derive(Clone)]
pub struct PeerOptions {
    /// Its directory: `targets.json.gz`, `peer.lock`.
    pub dir: PathBuf,
    /// The overlay key file.
    pub key: PathBuf,
    /// Its name in the target list.
    pub name: String,
    /// Its timers.
    pub config: Config,
    /// Where to listen (default: its target's address and the overlay port).
    pub bind: Option<SocketAddr>,
    /// Deploy tokens for hosts that ask ([`Body::JoinToken`]), when this
    /// peer's agent has joined a manager.
    pub tokens: Option<Arc<dyn crate::ssh::JoinTokens>>,
    /// The install prefix of an installed peer (`shoal agent --overlay`):
    /// it can upgrade itself and roll back. `None`: a peer run by hand.
    pub prefix: Option<PathBuf>,
    /// Set once the agent beside it has registered with its manager (a
    /// new release's health check), where the pool has one.
    pub registered: Option<Arc<AtomicBool>>,
    /// Runs the overlay's apps; `None`: apps are kept and spread but not
    /// run here.
    pub apps: Option<Arc<dyn AppHost>>,
}

struct Rand(rand::rngs::StdRng);
impl Random for Rand {
    fn below(&mut self, n: u64) -> u64 {
        rand::Rng::gen_range(&mut self.0, 0..n.max(1))
    }
}

/// The run lock: one peer per directory. A second start finds it held and
/// returns `None` (SMON's idempotent start); the lock dies with the process,
/// so a crash never leaves a stale one (notes §7 item 5).
pub fn take_run_lock(
    dir: &std::path::Path,
) -> anyhow::Result<Option<nix::fcntl::Flock<std::fs::File>>> {
    Ok(shoal_net::identity::try_lock(&dir.join("peer.lock"))?)
}

/// Runs the peer until the process ends; if another holds the run lock,
/// says so and returns.
pub async fn run(opts: PeerOptions, deployer: Arc<dyn Deployer>) -> anyhow::Result<()> {
    let Some(_lock) = take_run_lock(&opts.dir)? else {
        println!(
            "a peer already runs in {} (peer.lock is held); nothing to do",
            opts.dir.display()
        );
        return Ok(());
    };
    serve(opts, deployer).await
}

/// Runs the peer until the process ends; the caller holds the run lock
/// ([`take_run_lock`]), as `shoal agent --overlay` does for the whole
/// agent.
pub async fn serve(opts: PeerOptions, deployer: Arc<dyn Deployer>) -> anyhow::Result<()> {
    let key = files::read_key(&opts.key)?;
    let list = files::load_stored(&opts.dir)?.with_context(|| {
        format!(
            "no target list in {}; start once with --targets FILE",
            opts.dir.display()
        )
    })?;
    let bind =
        match opts.bind {
            Some(b) => b,
            None => {
                let me = list.index(&opts.name).and_then(|i| list.get(i)).with_context(|| {
                format!(
                    "{:?} is not in the target list; pass --bind ADDR:PORT to run outside it",
                    opts.name
                )
            })?;
                SocketAddr::new(me.address, list.overlay_port())
            }
        };
    let sock = UdpSocket::bind(bind)
        .await
        .with_context(|| format!("cannot listen on udp {bind}"))?;
    let tcp = tokio::net::TcpListener::bind(bind)
        .await
        .with_context(|| format!("cannot listen on tcp {bind} (packages)"))?;
    let pkg = opts.prefix.as_ref().map(|p| p.join("current"));
    let version = match &pkg {
        Some(p) => upgrade::release_version(p)
            .with_context(|| format!("the installed release in {}", p.display()))?,
        None => package_version(),
    };
    let livetag = upgrade::load_livetag(&opts.dir)?.unwrap_or_default();
    tracing::info!(%bind, name = %opts.name, targets = %list.version(), %version,
        livetag = livetag.on, "overlay peer listening");
    let mut rng = Rand(rand::SeedableRng::from_entropy());
    let now = crate::now_ms();
    let phase = rng.below(opts.config.interval_ms.max(1));
    let mut peer = Peer::new(
        &opts.name,
        Arc::new(list),
        version,
        livetag,
        opts.config,
        now + phase,
    );
    peer.restore_apps(load_apps(&opts.dir));
    upgrade::write_pid(&opts.dir)?;
    // A release swapped in and not yet proven healthy: on probation.
    let probation = upgrade::pending(&opts.dir)?.filter(|p| !p.committed && p.to == version);
    if let Some(p) = &probation {
        tracing::info!(from = %p.from, to = %p.to, "on probation after an upgrade");
    }
    peer.mark_bad(upgrade::load_bad(&opts.dir)?);
    tokio::spawn(fetch::serve(
        tcp,
        key.clone(),
        catalog(pkg.clone(), opts.dir.clone()),
    ));
    let mut shell = Shell {
        key: key.clone(),
        prefix: opts.prefix.clone(),
        registered: opts.registered.clone(),
        app_host: opts.apps.clone(),
        probation,
        livetag,
        utility: None,
        app_offers: std::collections::BTreeMap::new(),
        reconciling: false,
        app_reports: Vec::new(),
        sock,
        sealer: Sealer::new(&key),
        opener: Opener::new(&key),
        dir: opts.dir.clone(),
        name: opts.name.clone(),
        keeping: false,
        tokens: opts.tokens.clone(),
        // A manager this peer starts shows the overlay on its dashboard,
        // surveyed from this peer.
        manager_args: vec![
            "--overlay-key".into(),
            std::path::absolute(&opts.key)
                .unwrap_or_else(|_| opts.key.clone())
                .into(),
            "--overlay-peer".into(),
            bind.to_string().into(),
        ],
    };
    let (done_tx, mut done_rx) = mpsc::channel::<(usize, Version, Outcome)>(1024);
    let (kept_tx, mut kept_rx) = mpsc::channel::<ManagerOutcome>(4);
    let (grant_tx, mut grant_rx) = mpsc::channel::<(SocketAddr, Body)>(64);
    let chans = Chans {
        done: done_tx,
        kept: kept_tx,
        upgraded: mpsc::channel(8).0,
        fetched: mpsc::channel(64).0,
        reported: mpsc::channel(4).0,
    };
    let (up_tx, mut up_rx) = mpsc::channel::<(Version, Result<PathBuf, String>)>(8);
    let (app_tx, mut app_rx) = mpsc::channel::<(String, Result<Installed, String>)>(64);
    let (rep_tx, mut rep_rx) = mpsc::channel::<Vec<AppReport>>(4);
    let chans = Chans {
        upgraded: up_tx,
        fetched: app_tx,
        reported: rep_tx,
        ..chans
    };
    let mut buf = vec![0u8; wire::MAX_DATAGRAM + 64];
    let mut next_reconcile = 0u64;
    loop {
        let mut wake = peer.poll_timeout().unwrap_or(crate::now_ms() + 60_000);
        if shell.probation.is_some() {
            wake = wake.min(crate::now_ms() + 250);
        }
        if shell.app_host.is_some() {
            wake = wake.min(next_reconcile.max(crate::now_ms()));
        }
        let sleep_ms = wake.saturating_sub(crate::now_ms());
        tokio::select! {
            r = shell.sock.recv_from(&mut buf) => {
                let (n, src) = r.context("udp receive")?;
                shell.datagram(&mut peer, &buf[..n], src, &grant_tx).await;
            }
            Some((target, list, outcome)) = done_rx.recv() => {
                if let Some(t) = peer.targets().get(target) {
                    tracing::info!(target = %t.name, ?outcome, "contact ended");
                }
                peer.handle_outcome(target, list, outcome, crate::now_ms());
            }
            Some((to, grant)) = grant_rx.recv() => {
                shell.send(to, grant).await;
            }
            Some(kept) = kept_rx.recv() => {
                shell.keeping = false;
                match &kept {
                    ManagerOutcome::Running => {}
                    ManagerOutcome::Started => tracing::info!("started this host's manager"),
                    ManagerOutcome::Failed(e) => tracing::warn!("cannot keep this host's manager: {e}"),
                }
                peer.handle_manager(kept, crate::now_ms());
            }
            Some((version, staged)) = up_rx.recv() => {
                match staged {
                    Ok(dir) => {
                        let e = shell.swap_and_exec(&peer, version, &dir);
                        tracing::warn!("upgrade to {version} failed at the swap: {e:#}");
                        let _ = std::fs::remove_dir_all(&dir);
                        peer.handle_upgrade_failed(version, format!("{e:#}"), crate::now_ms());
                    }
                    Err(e) => {
                        tracing::warn!(%version, "upgrade refused: {e}");
                        peer.handle_upgrade_failed(version, e, crate::now_ms());
                    }
                }
            }
            Some((name, result)) = app_rx.recv() => {
                match &result {
                    Ok(i) => tracing::info!(app = %name, version = %i.spec.version, "app pulled and installed"),
                    Err(e) => tracing::warn!(app = %name, "app pull failed: {e}"),
                }
                let result = result.map(|i| (i.spec, i.state));
                peer.handle_app_fetched(&name, result, crate::now_ms());
            }
            Some(reports) = rep_rx.recv() => {
                shell.reconciling = false;
                shell.app_reports = reports;
            }
            _ = tokio::time::sleep(std::time::Duration::from_millis(sleep_ms)) => {
                peer.handle_timeout(crate::now_ms(), &mut rng);
            }
        }
        shell.probation_step(&mut peer);
        shell.keep_livetag(&peer);
        if shell.app_host.is_some() && crate::now_ms() >= next_reconcile {
            next_reconcile = crate::now_ms() + opts.config.interval_ms;
            shell.reconcile(&peer, &chans);
        }
        if shell.commands(&mut peer, &deployer, &chans).await {
            tracing::info!("the livetag is off and no peer spoke for the quiet period: exiting");
            return Ok(());
        }
    }
}

/// The channels tasks report on.
struct Chans {
    done: mpsc::Sender<(usize, Version, Outcome)>,
    kept: mpsc::Sender<ManagerOutcome>,
    upgraded: mpsc::Sender<(Version, Result<PathBuf, String>)>,
    fetched: mpsc::Sender<(String, Result<Installed, String>)>,
    reported: mpsc::Sender<Vec<AppReport>>,
}

/// An app's directory under the peer's state directory.
fn app_dir(state: &Path, name: &str) -> PathBuf {
    state.join("apps").join(name)
}

/// Its installed package: one directory per version.
fn app_package(state: &Path, name: &str, v: Version) -> PathBuf {
    app_dir(state, name).join(format!("pkg-{}-{:016x}", v.number, v.origin))
}

/// The apps installed in `state` (`apps/NAME/installed.json`); an
/// unreadable one is skipped and logged (the next notice brings it back).
fn load_apps(state: &Path) -> Apps {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(state.join("apps")) {
        for e in rd.flatten() {
            let p = e.path().join("installed.json");
            match std::fs::read(&p)
                .map_err(anyhow::Error::from)
                .and_then(|b| serde_json::from_slice::<Installed>(&b).map_err(anyhow::Error::from))
            {
                Ok(i) => out.push(i),
                Err(e) if p.exists() => tracing::warn!("skipping {}: {e:#}", p.display()),
                Err(_) => {}
            }
        }
    }
    Apps::restore(out)
}

/// Keeps `i` as `apps/NAME/installed.json`.
fn store_app(state: &Path, i: &Installed) -> anyhow::Result<()> {
    let d = app_dir(state, &i.spec.name);
    std::fs::create_dir_all(&d)?;
    let tmp = d.join(".installed.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(i)?)?;
    std::fs::rename(&tmp, d.join("installed.json"))?;
    Ok(())
}

/// What this peer serves to peers that pull: its running release, and its
/// installed apps with their state.
fn catalog(pkg: Option<PathBuf>, state: PathBuf) -> fetch::Catalog {
    Arc::new(move |w: &What| match w {
        What::Release => {
            let pkg = pkg.as_ref().ok_or("this peer runs no installed release")?;
            Ok(crate::release::FILES
                .iter()
                .map(|f| (f.to_string(), pkg.join(f)))
                .chain(std::iter::once(("shoal".to_string(), pkg.join("shoal"))))
                .collect())
        }
        What::App { name } => {
            let p = app_dir(&state, name).join("installed.json");
            let i: Installed = std::fs::read(&p)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .ok_or_else(|| format!("no app {name:?} here"))?;
            let dir = app_package(&state, name, i.spec.version);
            Ok(std::iter::once(("installed.json".to_string(), p))
                .chain(
                    i.spec
                        .files
                        .iter()
                        .map(|f| (format!("pkg/{}", f.path), dir.join(&f.path))),
                )
                .collect())
        }
    })
}

/// Pulls app `name` from `addr` into the state directory, checks it
/// against its spec, and installs it (the package first, `installed.json`
/// last). Returns what was installed.
async fn pull_app(
    addr: SocketAddr,
    key: &OverlayKey,
    me: &str,
    state: &Path,
    name: &str,
    want: Version,
) -> anyhow::Result<Installed> {
    let tmp = app_dir(state, name).join(format!(".pull-{:08x}", rand::random::<u32>()));
    let r = async {
        fetch::fetch(addr, key, me, What::App { name: name.into() }, &tmp).await?;
        let i: Installed = serde_json::from_slice(&std::fs::read(tmp.join("installed.json"))?)
            .context("installed.json")?;
        i.spec.validate()?;
        anyhow::ensure!(
            i.spec.name == name && i.spec.version >= want,
            "the teller sent {} {}, not {name} {want}",
            i.spec.name,
            i.spec.version
        );
        for f in &i.spec.files {
            let (sum, size) = crate::release::sha256_file(&tmp.join("pkg").join(&f.path))?;
            anyhow::ensure!(
                sum == f.sha256 && size == f.size,
                "{} arrived as sha256 {sum} ({size} bytes), not the spec's {} ({} bytes): refused",
                f.path,
                f.sha256,
                f.size
            );
        }
        let dest = app_package(state, name, i.spec.version);
        let _ = std::fs::remove_dir_all(&dest);
        std::fs::rename(tmp.join("pkg"), &dest).or_else(|_| std::fs::create_dir_all(&dest))?;
        store_app(state, &i)?;
        Ok(i)
    }
    .await;
    let _ = std::fs::remove_dir_all(&tmp);
    r
}

struct Shell {
    key: OverlayKey,
    prefix: Option<PathBuf>,
    registered: Option<Arc<AtomicBool>>,
    app_host: Option<Arc<dyn AppHost>>,
    /// The release this process runs is on probation.
    probation: Option<Pending>,
    /// The livetag as kept in the directory.
    livetag: Livetag,
    /// The utility's package server, from its last offer.
    utility: Option<SocketAddr>,
    /// The utility's app servers, by app.
    app_offers: std::collections::BTreeMap<String, SocketAddr>,
    reconciling: bool,
    app_reports: Vec<AppReport>,
    sock: UdpSocket,
    sealer: Sealer,
    opener: Opener,
    dir: PathBuf,
    name: String,
    /// A check of this host's manager is under way (a start waits up to
    /// 10 s; rounds go on meanwhile).
    keeping: bool,
    manager_args: Vec<std::ffi::OsString>,
    tokens: Option<Arc<dyn crate::ssh::JoinTokens>>,
}

impl Shell {
    async fn send(&mut self, to: SocketAddr, body: Body) {
        let m = Message {
            sent_ms: crate::now_ms(),
            from: self.name.clone(),
            body,
        };
        match wire::encode(&m) {
            Ok(p) => {
                let d = self.sealer.seal(&p);
                if let Err(e) = self.sock.send_to(&d, to).await {
                    tracing::debug!(%to, "send: {e}");
                }
            }
            Err(e) => tracing::warn!(%to, "cannot send: {e}"),
        }
    }

    fn addr(&self, peer: &Peer, i: usize) -> Option<SocketAddr> {
        let t = peer.targets();
        t.get(i)
            .map(|t2| SocketAddr::new(t2.address, t.overlay_port()))
    }

    /// The index of a listed peer that sent from its own address.
    fn listed(peer: &Peer, from: &str, src: IpAddr) -> Option<usize> {
        let t = peer.targets();
        t.index(from)
            .filter(|&i| t.get(i).is_some_and(|t| t.address == src))
    }

    async fn datagram(
        &mut self,
        peer: &mut Peer,
        d: &[u8],
        src: SocketAddr,
        grants: &mpsc::Sender<(SocketAddr, Body)>,
    ) {
        let now = crate::now_ms();
        let m = match self
            .opener
            .open(d)
            .map_err(|e| e.to_string())
            .and_then(|p| wire::decode(&p, now).map_err(|e| e.to_string()))
        {
            Ok(m) => m,
            Err(e) => {
                // Without the key nothing gets past this line.
                tracing::debug!(%src, "dropped: {e}");
                return;
            }
        };
        match m.body {
            Body::Ping { seq, versions } => {
                let Some(i) = Self::listed(peer, &m.from, src.ip()) else {
                    tracing::debug!(%src, from = %m.from, "ping from outside the list");
                    return;
                };
                let answer = peer.handle_ping(i, &versions, now);
                self.send(
                    src,
                    Body::Answer {
                        seq,
                        versions: answer,
                    },
                )
                .await;
            }
            Body::Answer { seq, versions } => {
                if let Some(i) = Self::listed(peer, &m.from, src.ip()) {
                    peer.handle_answer(i, seq, &versions, now);
                }
            }
            Body::GetTargets => {
                let list = (**peer.targets()).clone();
                self.send(src, Body::Targets { list }).await;
            }
            Body::Targets { list } => {
                self.adopt(peer, list);
            }
            Body::SetTargets { id, list } => {
                let adopted = self.adopt(peer, list);
                let version = peer.targets().version();
                self.send(
                    src,
                    Body::TargetsSet {
                        id,
                        adopted,
                        version,
                    },
                )
                .await;
            }
            Body::Status { id } => {
                let report = Box::new(self.report(peer));
                self.send(src, Body::StatusReport { id, report }).await;
            }
            Body::JoinToken { id } => {
                // Only a listed target, for itself, from its own address.
                if Self::listed(peer, &m.from, src.ip()).is_none() {
                    tracing::debug!(%src, from = %m.from, "token request from outside the list");
                    return;
                }
                let Some(tokens) = self.tokens.clone() else {
                    let result = Err("this peer's agent has not joined a manager".into());
                    self.send(src, Body::JoinTokenGranted { id, result }).await;
                    return;
                };
                let (node, grants) = (m.from.clone(), grants.clone());
                tokio::spawn(async move {
                    let result = tokens.token_for(&node).await.map_err(|e| format!("{e:#}"));
                    tracing::info!(%node, ok = result.is_ok(), "deploy token asked for");
                    let _ = grants
                        .send((src, Body::JoinTokenGranted { id, result }))
                        .await;
                });
            }
            Body::Offer { id, version, port } => {
                self.utility = Some(SocketAddr::new(src.ip(), port));
                let result = if peer.handle_offer(version, now) {
                    tracing::info!(%version, %src, "the utility offers a release: pulling it");
                    Ok(())
                } else {
                    Err(why_not(peer, version))
                };
                self.send(src, Body::Offered { id, result }).await;
            }
            Body::SetLivetag { id, livetag } => {
                if peer.set_livetag(livetag, now) {
                    tracing::info!(on = livetag.on, version = %livetag.version, "livetag set");
                }
                let livetag = peer.versions().livetag;
                self.send(src, Body::LivetagSet { id, livetag }).await;
            }
            Body::AppNotice { name, notice } => {
                if let Some(i) = Self::listed(peer, &m.from, src.ip()) {
                    peer.handle_app_notice(Source::Peer(i), &name, &notice, now);
                }
            }
            Body::AppOffer {
                id,
                name,
                notice,
                port,
            } => {
                self.app_offers
                    .insert(name.clone(), SocketAddr::new(src.ip(), port));
                let before = peer.counters().app_fetches;
                peer.handle_app_notice(Source::Utility, &name, &notice, now);
                let pulling = peer.counters().app_fetches > before;
                self.send(
                    src,
                    Body::AppDone {
                        id,
                        result: Ok(pulling),
                    },
                )
                .await;
            }
            Body::SetAppState { id, name, tag } => {
                let result = peer.set_app_state(&name, tag);
                if let Some(i) = peer.apps().get(&name)
                    && let Err(e) = store_app(&self.dir, i)
                {
                    tracing::warn!(app = %name, "cannot keep its state: {e:#}");
                }
                self.send(src, Body::AppDone { id, result }).await;
            }
            Body::TargetsSet { .. }
            | Body::JoinTokenGranted { .. }
            | Body::StatusReport { .. }
            | Body::AgentKey { .. }
            | Body::AgentPublicKey { .. }
            | Body::AgentSign { .. }
            | Body::AgentSigned { .. }
            | Body::Fetch { .. }
            | Body::Offered { .. }
            | Body::LivetagSet { .. }
            | Body::AppDone { .. } => {}
        }
    }

    fn adopt(&mut self, peer: &mut Peer, list: TargetList) -> bool {
        let version = list.version();
        if list.version() <= peer.targets().version() {
            return false;
        }
        if let Err(e) = files::store(&self.dir, &list) {
            tracing::warn!("cannot store target list {version}: {e:#}");
            return false;
        }
        tracing::info!(%version, targets = list.len(), "adopted a newer target list");
        peer.adopt_targets(Arc::new(list))
    }

    /// Carries out what the peer decided; returns `true` when it asked to
    /// exit.
    async fn commands(
        &mut self,
        peer: &mut Peer,
        deployer: &Arc<dyn Deployer>,
        ch: &Chans,
    ) -> bool {
        let mut exit = false;
        while let Some(c) = peer.poll() {
            match c {
                Command::Ping {
                    target,
                    seq,
                    versions,
                } => {
                    if let Some(a) = self.addr(peer, target) {
                        self.send(a, Body::Ping { seq, versions }).await;
                    }
                }
                Command::Contact { target, list } => {
                    let Some(t) = peer.targets().get(target).cloned() else {
                        continue;
                    };
                    tracing::info!(target = %t.name, "no answer: contacting");
                    let (d, done) = (deployer.clone(), ch.done.clone());
                    tokio::spawn(async move {
                        let outcome = d.contact(t).await;
                        let _ = done.send((target, list, outcome)).await;
                    });
                }
                Command::FetchTargets { from } => {
                    if let Some(a) = self.addr(peer, from) {
                        self.send(a, Body::GetTargets).await;
                    }
                }
                Command::KeepManager { dir } => {
                    if self.keeping {
                        continue;
                    }
                    self.keeping = true;
                    let (kept, extra) = (ch.kept.clone(), self.manager_args.clone());
                    tokio::task::spawn_blocking(move || {
                        let outcome = match std::env::current_exe() {
                            Ok(bin) => crate::package::keep_manager(&bin, dir.as_ref(), &extra),
                            Err(e) => {
                                ManagerOutcome::Failed(format!("cannot find this binary: {e}"))
                            }
                        };
                        let _ = kept.blocking_send(outcome);
                    });
                }
                Command::Upgrade { from, version } => {
                    let now = crate::now_ms();
                    let Some(prefix) = self.prefix.clone() else {
                        peer.handle_upgrade_failed(
                            version,
                            "this peer was started by hand, not installed (shoal agent --overlay PREFIX): it cannot upgrade itself".into(),
                            now,
                        );
                        continue;
                    };
                    let addr = match from {
                        Source::Peer(i) => self.addr(peer, i),
                        Source::Utility => self.utility,
                    };
                    let Some(addr) = addr else {
                        peer.handle_upgrade_failed(version, "no address to pull from".into(), now);
                        continue;
                    };
                    tracing::info!(%version, %addr, "a newer release: pulling it");
                    let (key, me, tx) = (self.key.clone(), self.name.clone(), ch.upgraded.clone());
                    tokio::spawn(async move {
                        let dir = upgrade::new_release_dir(&prefix, version, &me);
                        let r = async {
                            fetch::fetch(addr, &key, &me, What::Release, &dir).await?;
                            let (pkg, d2) = (prefix.join("current"), dir.clone());
                            tokio::task::spawn_blocking(move || upgrade::stage(&pkg, &d2, version))
                                .await??;
                            anyhow::Ok(())
                        }
                        .await;
                        let r = match r {
                            Ok(()) => Ok(dir),
                            Err(e) => {
                                let _ = std::fs::remove_dir_all(&dir);
                                Err(format!("from {addr}: {e:#}"))
                            }
                        };
                        let _ = tx.send((version, r)).await;
                    });
                }
                Command::RollBack { version } => {
                    tracing::warn!(%version, "this release is marked bad: rolling back");
                    match &self.prefix {
                        Some(prefix) => {
                            let _ = upgrade::add_bad(&self.dir, version);
                            match upgrade::roll_back(prefix) {
                                Ok(true) => {
                                    let e = upgrade::exec_current(prefix);
                                    tracing::error!("rollback: {e:#}");
                                    peer.handle_rollback_failed();
                                }
                                Ok(false) => {
                                    tracing::warn!(
                                        "no previous release on this host: waiting for a good one from a peer"
                                    );
                                    peer.handle_rollback_failed();
                                }
                                Err(e) => {
                                    tracing::error!("rollback: {e:#}");
                                    peer.handle_rollback_failed();
                                }
                            }
                        }
                        None => peer.handle_rollback_failed(),
                    }
                }
                Command::Exit => exit = true,
                Command::AppNotice {
                    target,
                    name,
                    notice,
                } => {
                    if let Some(a) = self.addr(peer, target) {
                        self.send(a, Body::AppNotice { name, notice }).await;
                    }
                }
                Command::FetchApp {
                    from,
                    name,
                    version,
                } => {
                    let addr = match from {
                        Source::Peer(i) => self.addr(peer, i),
                        Source::Utility => self.app_offers.get(&name).copied(),
                    };
                    let Some(addr) = addr else {
                        peer.handle_app_fetched(
                            &name,
                            Err("no address to pull from".into()),
                            crate::now_ms(),
                        );
                        continue;
                    };
                    let (key, me, state, tx) = (
                        self.key.clone(),
                        self.name.clone(),
                        self.dir.clone(),
                        ch.fetched.clone(),
                    );
                    tokio::spawn(async move {
                        let r = pull_app(addr, &key, &me, &state, &name, version)
                            .await
                            .map_err(|e| format!("from {addr}: {e:#}"));
                        let _ = tx.send((name, r)).await;
                    });
                }
                Command::Supervise => {
                    for i in peer.apps().installed() {
                        if let Err(e) = store_app(&self.dir, i) {
                            tracing::warn!(app = %i.spec.name, "cannot keep it: {e:#}");
                        }
                    }
                    self.reconcile(peer, ch);
                }
            }
        }
        exit
    }

    /// Hands the host's apps to the app host, unless a pass is under way.
    fn reconcile(&mut self, peer: &Peer, ch: &Chans) {
        let Some(host) = self.app_host.clone() else {
            return;
        };
        if self.reconciling {
            return;
        }
        self.reconciling = true;
        let runs: Vec<AppRun> = peer
            .apps()
            .installed()
            .map(|i| {
                let package = app_package(&self.dir, &i.spec.name, i.spec.version);
                let pkg = package.display().to_string();
                AppRun {
                    name: i.spec.name.clone(),
                    version: i.spec.version,
                    state: i.state,
                    adaptor: i.spec.adaptor.clone(),
                    params: i
                        .spec
                        .params
                        .iter()
                        .map(|(k, v)| (k.clone(), v.replace("{{ package }}", &pkg)))
                        .collect(),
                    restart: i.spec.restart.clone(),
                    dir: app_dir(&self.dir, &i.spec.name).join("run"),
                    package,
                }
            })
            .collect();
        let tx = ch.reported.clone();
        tokio::spawn(async move {
            let r = host.reconcile(runs).await;
            let _ = tx.send(r).await;
        });
    }

    /// Swaps the staged release in and re-executes on it; returns only if
    /// that failed (the links are put back).
    fn swap_and_exec(&mut self, peer: &Peer, version: Version, dir: &Path) -> anyhow::Error {
        let Some(prefix) = self.prefix.clone() else {
            return anyhow::anyhow!("not an installed peer");
        };
        let now = crate::now_ms();
        let pending = Pending {
            from: peer.versions().peer,
            to: version,
            at_ms: now,
            deadline_ms: now + upgrade::probation_ms(peer.config().interval_ms),
            committed: false,
        };
        let r = (|| {
            let me = std::env::current_exe().context("cannot find this binary")?;
            upgrade::swap(&prefix, dir, &pending)?;
            // The watchdog runs the binary being left, once the probation
            // is on record: it rolls back if the new one cannot even start.
            if let Err(e) = upgrade::spawn_watchdog(&me, &prefix) {
                let _ = upgrade::roll_back(&prefix);
                return Err(e);
            }
            anyhow::Ok(())
        })();
        if let Err(e) = r {
            return e;
        }
        tracing::info!(from = %pending.from, to = %version, "swapped in a new release: re-executing");
        let e = upgrade::exec_current(&prefix);
        let _ = upgrade::roll_back(&prefix);
        e
    }

    /// A release on probation commits once it is healthy, and rolls back
    /// at its deadline if it is not.
    fn probation_step(&mut self, peer: &mut Peer) {
        let Some(p) = self.probation.clone() else {
            return;
        };
        let c = peer.counters();
        let heard = c.answers + c.pings_received > 0;
        let registered = self
            .registered
            .as_ref()
            .is_none_or(|r| r.load(Ordering::Relaxed));
        if heard && registered {
            match upgrade::commit(&self.dir) {
                Ok(()) => tracing::info!(version = %p.to, "the new release is healthy: committed"),
                Err(e) => tracing::warn!("cannot commit the upgrade: {e:#}"),
            }
            self.probation = None;
            return;
        }
        if crate::now_ms() < p.deadline_ms {
            return;
        }
        self.probation = None;
        let why = match (heard, registered) {
            (false, _) => "it heard from no peer",
            _ => "its agent did not register with the manager",
        };
        tracing::error!(version = %p.to, "the new release failed its health check ({why}): marking it bad");
        let _ = upgrade::add_bad(&self.dir, p.to);
        // The mark spreads from here; the rollback itself is the same as
        // for a release another peer marked bad.
        peer.mark_bad([p.to]);
    }

    /// Keeps the livetag in the directory whenever it changes, so a
    /// restarted peer of a disabled pool stays disabled.
    fn keep_livetag(&mut self, peer: &Peer) {
        let l = peer.versions().livetag;
        if l != self.livetag {
            match upgrade::store_livetag(&self.dir, &l) {
                Ok(()) => self.livetag = l,
                Err(e) => tracing::warn!("cannot keep the livetag: {e:#}"),
            }
        }
    }

    /// This peer's view, as `shoal overlay status` prints it.
    fn report(&self, peer: &Peer) -> StatusReport {
        let mut r = report(peer);
        r.upgrade = UpgradeReport {
            last: peer.last_upgrade().cloned(),
            probation_until_ms: self.probation.as_ref().map(|p| p.deadline_ms),
            bad: peer.bad().copied().collect(),
        };
        r.apps = peer
            .apps()
            .installed()
            .map(|i| {
                let live = self.app_reports.iter().find(|a| a.name == i.spec.name);
                AppReport {
                    name: i.spec.name.clone(),
                    version: i.spec.version,
                    state: i.state.state,
                    state_version: i.state.version,
                    running: live.is_some_and(|a| a.running),
                    pid: live.and_then(|a| a.pid),
                    restarts: live.map(|a| a.restarts).unwrap_or(0),
                    message: live.and_then(|a| a.message.clone()).or_else(|| {
                        self.app_host
                            .is_none()
                            .then(|| "not run on this peer (no app host)".to_string())
                    }),
                }
            })
            .collect();
        r
    }
}

/// Why an offered release is not pulled.
fn why_not(peer: &Peer, version: Version) -> String {
    let mine = peer.versions();
    if !mine.livetag.on {
        return "self-management is disabled here (livetag off); enable it first".into();
    }
    if peer.bad().any(|b| *b == version) {
        return format!("release {version} is marked bad in this overlay");
    }
    if version <= mine.peer {
        return format!(
            "this peer already runs {} (not older than {version})",
            mine.peer
        );
    }
    match peer.last_upgrade() {
        Some(n) if n.version == version && n.error.is_some() => format!(
            "it was refused lately: {}",
            n.error.as_deref().unwrap_or_default()
        ),
        _ => "an upgrade is under way".into(),
    }
}

/// This peer's view, as `shoal overlay status` prints it.
pub fn report(peer: &Peer) -> StatusReport {
    let list = peer.targets();
    let targets = list
        .targets()
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let mut s = TargetStatus {
                name: t.name.clone(),
                address: t.address.to_string(),
                state: "unknown".into(),
                last_seen_ms: None,
                peer_version: None,
                targets_version: None,
                deployed_ms: None,
                recovered_ms: None,
                contacts: 0,
                detail: None,
            };
            if Some(i) == peer.me() {
                s.state = "self".into();
                s.peer_version = Some(peer.versions().peer);
                s.targets_version = Some(peer.versions().targets);
            } else if let Some(v) = peer.view(i) {
                s.state = wire::state_name(v.state).into();
                s.last_seen_ms = v.last_seen_ms;
                s.peer_version = v.versions.map(|v| v.peer);
                s.targets_version = v.versions.map(|v| v.targets);
                s.deployed_ms = v.deployed_ms;
                s.recovered_ms = v.recovered_ms;
                s.contacts = v.contacts;
                s.detail = v.detail.clone();
            }
            s
        })
        .collect();
    let c = peer.config();
    let manager = peer
        .me()
        .and_then(|me| list.get(me))
        .and_then(|t| t.manager.clone())
        .map(|dir| {
            let (at, outcome) = match peer.manager() {
                Some((at, o)) => (Some(*at), Some(o)),
                None => (None, None),
            };
            let (state, detail) = match outcome {
                None => ("unknown", None),
                Some(ManagerOutcome::Running) => ("running", None),
                Some(ManagerOutcome::Started) => ("started", None),
                Some(ManagerOutcome::Failed(e)) => ("failed", Some(e.clone())),
            };
            wire::ManagerReport {
                dir,
                state: state.into(),
                at_ms: at,
                detail,
                starts: peer.counters().manager_starts,
            }
        });
    StatusReport {
        upgrade: UpgradeReport::default(),
        apps: Vec::new(),
        manager,
        name: peer.name().to_string(),
        versions: peer.versions(),
        interval_ms: c.interval_ms,
        timeout_ms: c.timeout_ms,
        counters: peer.counters(),
        targets,
    }
}
