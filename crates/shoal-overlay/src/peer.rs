//! The live peer: one UDP socket, the sans-I/O [`Peer`] and the work it
//! asks for. This loop decides nothing: it moves datagrams, hands the peer
//! the clock, runs contacts through a [`Deployer`] and stores adopted
//! target lists.

use crate::files;
use crate::seal::{Opener, Sealer};
use crate::wire::{self, Body, Message, StatusReport, TargetStatus};
use anyhow::Context;
use shoal_core::overlay::{
    Command, Config, Livetag, ManagerOutcome, Outcome, Peer, Random, Target, TargetList, Version,
};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
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
    tracing::info!(%bind, name = %opts.name, version = %list.version(), "overlay peer listening");
    let mut rng = Rand(rand::SeedableRng::from_entropy());
    let now = crate::now_ms();
    let phase = rng.below(opts.config.interval_ms.max(1));
    let mut peer = Peer::new(
        &opts.name,
        Arc::new(list),
        package_version(),
        Livetag::default(),
        opts.config,
        now + phase,
    );
    let mut shell = Shell {
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
    let mut buf = vec![0u8; wire::MAX_DATAGRAM + 64];
    loop {
        let wake = peer.poll_timeout().unwrap_or(crate::now_ms() + 60_000);
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
            _ = tokio::time::sleep(std::time::Duration::from_millis(sleep_ms)) => {
                peer.handle_timeout(crate::now_ms(), &mut rng);
            }
        }
        shell
            .commands(&mut peer, &deployer, &done_tx, &kept_tx)
            .await;
    }
}

struct Shell {
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
                let report = Box::new(report(peer));
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
            Body::TargetsSet { .. }
            | Body::JoinTokenGranted { .. }
            | Body::StatusReport { .. }
            | Body::AgentKey { .. }
            | Body::AgentPublicKey { .. }
            | Body::AgentSign { .. }
            | Body::AgentSigned { .. } => {}
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

    async fn commands(
        &mut self,
        peer: &mut Peer,
        deployer: &Arc<dyn Deployer>,
        done: &mpsc::Sender<(usize, Version, Outcome)>,
        kept: &mpsc::Sender<ManagerOutcome>,
    ) {
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
                    let (d, done) = (deployer.clone(), done.clone());
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
                    let (kept, extra) = (kept.clone(), self.manager_args.clone());
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
                Command::NewerPeer { from, version } => {
                    tracing::info!(
                        from = peer.targets().get(from).map(|t| t.name.as_str()).unwrap_or("?"),
                        %version,
                        "a peer runs a newer package; self-upgrade is not built yet"
                    );
                }
            }
        }
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
        manager,
        name: peer.name().to_string(),
        versions: peer.versions(),
        interval_ms: c.interval_ms,
        timeout_ms: c.timeout_ms,
        counters: peer.counters(),
        targets,
    }
}
