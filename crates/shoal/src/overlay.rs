//! `shoal overlay ...`: the SMON peer and its client utility.

use anyhow::Context;
use shoal_overlay::{client, files, peer};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// `shoal overlay` subcommands.
#[derive(clap::Subcommand)]
pub enum OverlayCmd {
    /// Make a new overlay key (SMON's K_E) in a file readable by its owner.
    ///
    /// Example: shoal overlay key --out overlay.key
    Key(KeyArgs),
    /// Run an overlay peer: ping one random target per interval, answer
    /// pings, spread newer target lists.
    ///
    /// Example: shoal overlay peer --dir ./p1 --name h1 --key overlay.key --targets targets.toml
    Peer(PeerArgs),
    /// The target list.
    #[command(subcommand)]
    Targets(TargetsCmd),
    /// One peer's view of every target: state, versions, last contact.
    ///
    /// Example: shoal overlay status --peer 127.0.0.11 --key overlay.key --json
    Status(StatusArgs),
    /// Make a new release key (ed25519), which signs what the cluster
    /// releases; it stays with the operator. Prints its public half.
    ///
    /// Example: shoal overlay release-key --out release.key
    ReleaseKey(KeyArgs),
    /// Sign a release of a shoal binary (this one by default) into a
    /// directory: manifest.json, manifest.sig, release.pub.
    ///
    /// Example: shoal overlay release --release-key release.key --out ./release
    Release(ReleaseArgs),
    /// Deploy the first peer by hand (SMON II-E), through the same SSH
    /// deploy as the peers', logged in through the auth agent.
    ///
    /// Example: shoal overlay seed h1 --targets targets.toml --key overlay.key --release ./release --auth-agent 10.0.0.100:7947
    Seed(SeedArgs),
    /// Run on a target by a deployer: check the copied package, take the
    /// install lock, install, start the peer.
    #[command(hide = true)]
    Install(InstallArgs),
    /// Start the installed peer detached; a running one is left alone.
    ///
    /// Example: shoal overlay start --prefix /opt/shoal
    Start(StartArgs),
    /// Hand a signed release to one peer (SMON II-E): it pulls it from
    /// here, checks the signature and digest, swaps it in and re-executes,
    /// keeping its apps; the overlay spreads it to every peer.
    ///
    /// Example: shoal overlay upgrade --release ./release-2 --peer 10.0.0.1 --key overlay.key
    Upgrade(crate::overlay_utility::UpgradeArgs),
    /// Switch the overlay's self-management off (the livetag): peers stop
    /// pinging and healing, then exit after a quiet period; apps stay up.
    ///
    /// Example: shoal overlay disable --peer 10.0.0.1 --key overlay.key
    Disable(crate::overlay_utility::PeerRef),
    /// Switch it back on at any surviving peer.
    ///
    /// Example: shoal overlay enable --peer 10.0.0.1 --key overlay.key
    Enable(crate::overlay_utility::PeerRef),
    /// The overlay's applications (SMON II-D).
    #[command(subcommand)]
    App(crate::overlay_utility::AppCmd),
    /// Run by an upgrading peer from the release it leaves: rolls back if
    /// the new one is not healthy by its deadline.
    #[command(hide = true)]
    WatchUpgrade(StartArgs),
}

#[derive(clap::Args)]
pub struct ReleaseArgs {
    /// The release key (`shoal overlay release-key`).
    #[arg(long)]
    release_key: PathBuf,
    /// The binary to release (default: this one).
    #[arg(long)]
    binary: Option<PathBuf>,
    /// The release directory to write.
    #[arg(long)]
    out: PathBuf,
    /// The version number to release it as (default: this build's,
    /// MAJOR*1000000 + MINOR*1000 + PATCH); peers upgrade to a higher one.
    #[arg(long)]
    version: Option<u64>,
}

#[derive(clap::Args)]
pub struct SeedArgs {
    /// The target to deploy: its name (or address) in the target list.
    host: String,
    /// The target list file.
    #[arg(long)]
    targets: PathBuf,
    /// The overlay key file.
    #[arg(long)]
    key: PathBuf,
    /// The release directory (`shoal overlay release`).
    #[arg(long)]
    release: PathBuf,
    /// The binary to ship (default: this one); must match the release.
    #[arg(long)]
    binary: Option<PathBuf>,
    /// The auth agent (UDP ADDR:PORT), which the peers use too; repeat it
    /// for replicas (each with the key, or its own key authorized on every
    /// target): a peer tries them in turn.
    #[arg(long, required = true)]
    auth_agent: Vec<SocketAddr>,
    /// The peers' ping interval.
    #[arg(long, default_value = "1s", value_parser = shoal_core::duration::parse_positive_duration)]
    interval: Duration,
    /// The peers' ping timeout.
    #[arg(long, default_value = "500ms", value_parser = shoal_core::duration::parse_positive_duration)]
    timeout: Duration,
    /// The manager every deployed agent joins (its URL); without it the
    /// overlay runs alone.
    #[arg(long, requires = "token_file")]
    join: Option<String>,
    /// The join token for the seeded host (`shoal token create --uses 1
    /// --roles ...,overlay`: the role lets its peer mint deploy tokens for
    /// the hosts it deploys).
    #[arg(long, requires = "join")]
    token_file: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct InstallArgs {
    /// The copied package directory.
    #[arg(long)]
    package: PathBuf,
}

#[derive(clap::Args)]
pub struct StartArgs {
    /// The install prefix.
    #[arg(long)]
    prefix: PathBuf,
}

/// `shoal auth-agent`.
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["key", "ssh_agent"])))]
pub struct AuthAgentArgs {
    /// Its directory: the target list it holds, audit.log.
    #[arg(long)]
    dir: PathBuf,
    /// The SSH private key (OpenSSH format, ed25519, no passphrase).
    #[arg(long)]
    key: Option<PathBuf>,
    /// Sign with the user's ssh-agent (SSH_AUTH_SOCK) instead: its first
    /// ed25519 key, which may stay in a hardware token.
    #[arg(long)]
    ssh_agent: bool,
    /// Where to listen (UDP ADDR:PORT).
    #[arg(long)]
    listen: SocketAddr,
    /// The overlay key file (default DIR/overlay.key).
    #[arg(long)]
    overlay_key: Option<PathBuf>,
    /// A target list file; used if newer than the stored one.
    #[arg(long)]
    targets: Option<PathBuf>,
    /// Signatures per second, on average.
    #[arg(long, default_value_t = 20)]
    rate: u32,
    /// Signatures at once.
    #[arg(long, default_value_t = 40)]
    burst: u32,
}

/// Runs `shoal auth-agent`.
pub async fn auth_agent(a: AuthAgentArgs) -> anyhow::Result<()> {
    use shoal_overlay::authagent;
    std::fs::create_dir_all(&a.dir)
        .with_context(|| format!("cannot create {}", a.dir.display()))?;
    if let Some(f) = &a.targets {
        store_if_newer(&a.dir, f)?;
    }
    let overlay_key = files::read_key(&a.overlay_key.unwrap_or_else(|| a.dir.join("overlay.key")))?;
    let key = match a.key {
        Some(k) => authagent::KeySource::File(k),
        None => authagent::KeySource::SshAgent,
    };
    authagent::run(authagent::AgentOptions {
        dir: a.dir,
        key,
        listen: a.listen,
        overlay_key,
        rate: a.rate,
        burst: a.burst,
    })
    .await
}

fn store_if_newer(dir: &std::path::Path, file: &std::path::Path) -> anyhow::Result<()> {
    let list = files::read_targets(file)?;
    let stored = files::load_stored(dir)?;
    if stored.is_none_or(|s| list.version() > s.version()) {
        files::store(dir, &list)?;
    }
    Ok(())
}

fn this_binary(b: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match b {
        Some(b) => Ok(b),
        None => std::env::current_exe().context("cannot find this binary; pass --binary"),
    }
}

/// `shoal overlay targets` subcommands.
#[derive(clap::Subcommand)]
pub enum TargetsCmd {
    /// Hand a new version of the target list to one peer; the overlay
    /// spreads it (a higher version wins).
    ///
    /// Example: shoal overlay targets set targets.toml --peer 127.0.0.11 --key overlay.key
    Set(TargetsSetArgs),
}

#[derive(clap::Args)]
pub struct KeyArgs {
    /// The file to create (never overwritten).
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args)]
pub struct PeerArgs {
    /// The peer's directory (its stored target list and run lock).
    #[arg(long)]
    dir: PathBuf,
    /// An installed package (PREFIX/current): its peer.json gives the name,
    /// the timers and the auth agent, and the peer deploys and recovers
    /// the others over SSH. Without it the peer only pings.
    #[arg(long, conflicts_with_all = ["name", "key"])]
    package: Option<PathBuf>,
    /// Its name in the target list.
    #[arg(long, required_unless_present = "package")]
    name: Option<String>,
    /// The overlay key file.
    #[arg(long, required_unless_present = "package")]
    key: Option<PathBuf>,
    /// A target list file (docs/overlay.md); used if newer than the stored one.
    #[arg(long)]
    targets: Option<PathBuf>,
    /// Between two pings.
    #[arg(long, default_value = "1s", value_parser = shoal_core::duration::parse_positive_duration)]
    interval: Duration,
    /// How long a ping waits for its answer.
    #[arg(long, default_value = "500ms", value_parser = shoal_core::duration::parse_positive_duration)]
    timeout: Duration,
    /// Listen here instead of at its target's address.
    #[arg(long)]
    bind: Option<SocketAddr>,
}

#[derive(clap::Args)]
pub struct TargetsSetArgs {
    /// The target list file (docs/overlay.md).
    file: PathBuf,
    /// A peer: ADDR or ADDR:PORT (port 7946 by default).
    #[arg(long, value_parser = peer_addr)]
    peer: SocketAddr,
    /// The overlay key file.
    #[arg(long)]
    key: PathBuf,
    /// How long to wait for the answer.
    #[arg(long, default_value = "3s", value_parser = shoal_core::duration::parse_positive_duration)]
    wait: Duration,
}

#[derive(clap::Args)]
pub struct StatusArgs {
    /// A peer: ADDR or ADDR:PORT (port 7946 by default).
    #[arg(long, value_parser = peer_addr)]
    peer: SocketAddr,
    /// The overlay key file.
    #[arg(long)]
    key: PathBuf,
    /// How long to wait for the answer.
    #[arg(long, default_value = "3s", value_parser = shoal_core::duration::parse_positive_duration)]
    wait: Duration,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Ask every peer of the list, not only --peer, and merge what they
    /// report: each target once, with who deployed or recovered it last.
    #[arg(long)]
    all: bool,
}

pub fn peer_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .or_else(|_| {
            s.parse::<std::net::IpAddr>()
                .map(|ip| SocketAddr::new(ip, shoal_core::overlay::DEFAULT_OVERLAY_PORT))
        })
        .map_err(|_| format!("{s:?} is not ADDR or ADDR:PORT, e.g. 10.0.0.1 or 10.0.0.1:7946"))
}

/// Runs `shoal overlay ...`.
pub async fn run(cmd: OverlayCmd) -> anyhow::Result<()> {
    match cmd {
        OverlayCmd::Key(a) => {
            files::write_new_key(&a.out)?;
            println!("wrote a new overlay key to {}", a.out.display());
            Ok(())
        }
        OverlayCmd::Peer(a) => {
            std::fs::create_dir_all(&a.dir)
                .with_context(|| format!("cannot create {}", a.dir.display()))?;
            if let Some(f) = &a.targets {
                store_if_newer(&a.dir, f)?;
            }
            let config = shoal_core::overlay::Config {
                interval_ms: a.interval.as_millis() as u64,
                timeout_ms: a.timeout.as_millis() as u64,
            };
            let (opts, deployer): (peer::PeerOptions, std::sync::Arc<dyn peer::Deployer>) =
                match (&a.package, a.name, a.key) {
                    (Some(pkg), _, _) => {
                        let (_, mut opts, d) = installed_peer(pkg, &a.dir)?;
                        opts.bind = a.bind;
                        (opts, std::sync::Arc::new(d))
                    }
                    (None, Some(name), Some(key)) => (
                        peer::PeerOptions {
                            dir: a.dir,
                            key,
                            name,
                            config,
                            bind: a.bind,
                            tokens: None,
                            prefix: None,
                            registered: None,
                            apps: None,
                        },
                        std::sync::Arc::new(peer::NoDeployer),
                    ),
                    _ => anyhow::bail!("pass --package DIR, or --name and --key"),
                };
            peer::run(opts, deployer).await
        }
        OverlayCmd::ReleaseKey(a) => {
            let public = shoal_overlay::release::write_new_key(&a.out)?;
            println!(
                "wrote a new release key to {}; its public key is {public}",
                a.out.display()
            );
            Ok(())
        }
        OverlayCmd::Release(a) => {
            let bin = this_binary(a.binary)?;
            let version = match a.version {
                Some(n) => shoal_core::overlay::Version::new(n, 0),
                None => peer::package_version(),
            };
            let m = shoal_overlay::release::sign(&a.release_key, &bin, version, &a.out)?;
            println!(
                "signed release {} of {} (sha256 {}) into {}",
                m.version,
                bin.display(),
                m.binary_sha256,
                a.out.display()
            );
            Ok(())
        }
        OverlayCmd::Seed(a) => seed(a).await,
        OverlayCmd::Install(a) => {
            let e = shoal_overlay::package::install(&a.package)?;
            finish(e, true)
        }
        OverlayCmd::Start(a) => {
            let e = shoal_overlay::package::start(&a.prefix)?;
            finish(e, false)
        }
        OverlayCmd::Upgrade(a) => crate::overlay_utility::upgrade(a).await,
        OverlayCmd::Disable(a) => crate::overlay_utility::set_livetag(a, false).await,
        OverlayCmd::Enable(a) => crate::overlay_utility::set_livetag(a, true).await,
        OverlayCmd::App(crate::overlay_utility::AppCmd::Install(a)) => {
            crate::overlay_utility::app_install(a).await
        }
        OverlayCmd::App(crate::overlay_utility::AppCmd::State(a)) => {
            crate::overlay_utility::app_state(a).await
        }
        OverlayCmd::WatchUpgrade(a) => {
            let prefix = std::path::absolute(&a.prefix)?;
            let said = tokio::task::spawn_blocking(move || shoal_overlay::upgrade::watch(&prefix))
                .await??;
            println!("watch-upgrade: {said}");
            Ok(())
        }
        OverlayCmd::Targets(TargetsCmd::Set(a)) => {
            let key = files::read_key(&a.key)?;
            let list = files::read_targets(&a.file)?;
            let want = list.version();
            let (adopted, held) = client::set_targets(a.peer, &key, list, a.wait).await?;
            if adopted {
                println!(
                    "{} adopted target list version {want}; the overlay spreads it",
                    a.peer
                );
                Ok(())
            } else {
                anyhow::bail!(
                    "{} kept its target list version {held}: version {want} is not newer; raise `version` in {}",
                    a.peer,
                    a.file.display()
                )
            }
        }
        OverlayCmd::Status(a) if a.all => {
            let key = files::read_key(&a.key)?;
            let v = client::survey(a.peer, &key, a.wait).await?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_pool(&v);
            }
            Ok(())
        }
        OverlayCmd::Status(a) => {
            let key = files::read_key(&a.key)?;
            let r = client::status(a.peer, &key, a.wait).await?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
                return Ok(());
            }
            println!(
                "peer {} (package {}, target list {}, livetag {}), interval {} ms, timeout {} ms",
                r.name,
                r.versions.peer,
                r.versions.targets,
                if r.versions.livetag.on { "on" } else { "off" },
                r.interval_ms,
                r.timeout_ms
            );
            let now = shoal_overlay::now_ms();
            print_upgrade_and_apps(&r.upgrade, &r.apps);
            println!(
                "{:<16} {:<16} {:<15} {:>10} {:>9}  detail",
                "target", "address", "state", "seen s ago", "contacts"
            );
            for t in &r.targets {
                let seen = t
                    .last_seen_ms
                    .map(|s| format!("{:.1}", now.saturating_sub(s) as f64 / 1000.0))
                    .unwrap_or_else(|| "-".into());
                println!(
                    "{:<16} {:<16} {:<15} {:>10} {:>9}  {}",
                    t.name,
                    t.address,
                    t.state,
                    seen,
                    t.contacts,
                    t.detail.as_deref().unwrap_or("")
                );
            }
            Ok(())
        }
    }
}

/// The peer of the package installed in `pkg` (PREFIX/current), keeping
/// its state in `dir`: its peer.json, how it runs, and its SSH deployer,
/// which ships that package.
fn installed_peer(
    pkg: &std::path::Path,
    dir: &std::path::Path,
) -> anyhow::Result<(
    shoal_overlay::package::PeerFile,
    peer::PeerOptions,
    shoal_overlay::ssh::SshDeployer,
)> {
    let p = shoal_overlay::package::read_peer_file(pkg)?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    if files::load_stored(dir)?.is_none()
        && let Some(l) = files::load_stored(pkg)?
    {
        files::store(dir, &l)?;
    }
    let key = pkg.join("overlay.key");
    let d = shoal_overlay::ssh::SshDeployer::new(
        &p.name,
        shoal_overlay::ssh::Source::Installed {
            package: pkg.to_path_buf(),
            state: dir.to_path_buf(),
        },
        files::read_key(&key)?,
    );
    let opts = peer::PeerOptions {
        dir: dir.to_path_buf(),
        key,
        name: p.name.clone(),
        config: shoal_core::overlay::Config {
            interval_ms: p.interval_ms,
            timeout_ms: p.timeout_ms,
        },
        bind: None,
        tokens: None,
        prefix: None,
        registered: None,
        apps: None,
    };
    Ok((p, opts, d))
}

/// Deploy tokens minted by the manager for the hosts this node deploys,
/// asked for with the node's own certificate (in its agent directory).
struct MintedTokens(PathBuf);

#[async_trait::async_trait]
impl shoal_overlay::ssh::JoinTokens for MintedTokens {
    async fn token_for(&self, node: &str) -> anyhow::Result<String> {
        shoal_agent::deploy_token(&self.0, node).await
    }
}

/// `shoal agent --overlay PREFIX`: the agent of an overlay host, run from
/// the package installed under PREFIX. Its overlay peer pings, deploys and
/// recovers the pool; if the pool has a manager (peer.json, or --join),
/// the same process is the node's agent too, joined with the deploy token
/// its deployer shipped (`join.token`), keeping its identity in
/// PREFIX/agent. The peer's run lock (PREFIX/state/peer.lock) makes one
/// such process per host; a second start finds it held and exits 0.
pub async fn agent_with_overlay(
    mut agent: shoal_agent::AgentArgs,
    prefix: PathBuf,
) -> anyhow::Result<()> {
    use shoal_overlay::package::JOIN_TOKEN;
    let prefix =
        std::path::absolute(&prefix).with_context(|| format!("the prefix {}", prefix.display()))?;
    let (pkg, state) = (prefix.join("current"), prefix.join("state"));
    std::fs::create_dir_all(&state)
        .with_context(|| format!("cannot create {}", state.display()))?;
    let Some(_lock) = peer::take_run_lock(&state)? else {
        println!(
            "a peer already runs in {} (peer.lock is held); nothing to do",
            state.display()
        );
        return Ok(());
    };
    let (p, mut opts, mut deployer) = installed_peer(&pkg, &state)?;
    // Installed: it can upgrade itself and roll back, and it runs the
    // overlay's apps.
    opts.prefix = Some(prefix.clone());
    opts.apps = Some(std::sync::Arc::new(crate::overlay_apps::OverlayApps::new(
        &p.name,
    )));
    let Some(url) = agent.join.clone().or(p.manager.clone()) else {
        tracing::info!("no manager configured: the overlay runs alone");
        return peer::serve(opts, std::sync::Arc::new(deployer)).await;
    };
    let agent_dir = prefix.join("agent");
    let minted: std::sync::Arc<dyn shoal_overlay::ssh::JoinTokens> =
        std::sync::Arc::new(MintedTokens(agent_dir.clone()));
    deployer.tokens = Some(minted.clone());
    opts.tokens = Some(minted);
    let ask = AskPeers {
        state: state.clone(),
        name: p.name.clone(),
        key: opts.key.clone(),
    };
    let me =
        files::load_stored(&state)?.and_then(|l| l.index(&p.name).and_then(|i| l.get(i)).cloned());
    agent.join = Some(url);
    agent.dir = agent_dir;
    let registered = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    agent.registered = Some(registered.clone());
    opts.registered = Some(registered);
    agent.name = Some(p.name.clone());
    if agent.token_file.is_none() && pkg.join(JOIN_TOKEN).exists() {
        agent.token_file = Some(pkg.join(JOIN_TOKEN));
    }
    if let Some(t) = &me {
        if agent.roles.is_empty() {
            agent.roles = t.roles.clone();
        }
        if agent.address.is_none() {
            agent.address = Some(t.address.to_string());
        }
    }
    tokio::select! {
        r = peer::serve(opts, std::sync::Arc::new(deployer)) => r,
        r = agent_until_stopped(agent, ask) => r,
    }
}

/// How an overlay host whose agent has not joined gets a token: from the
/// other peers (its deployer may have had none for it, or the one it
/// shipped expired before the manager came up).
struct AskPeers {
    state: PathBuf,
    name: String,
    key: PathBuf,
}

impl AskPeers {
    /// A fresh deploy token from a peer, stored in `state/join.token`.
    async fn token(&self) -> anyhow::Result<PathBuf> {
        let list = files::load_stored(&self.state)?.context("no stored target list")?;
        let key = files::read_key(&self.key)?;
        let t = client::join_token(&list, &self.name, &key, Duration::from_secs(2)).await?;
        let path = self.state.join(shoal_overlay::package::JOIN_TOKEN);
        let _ = std::fs::remove_file(&path);
        let mut f = files::create_key_file(&path)?;
        std::io::Write::write_all(&mut f, format!("{t}\n").as_bytes())?;
        Ok(path)
    }
}

/// Runs the agent half; a failure (the manager unreachable, a refused
/// join) is logged and retried with backoff, so the overlay peer beside it
/// goes on. Returns when the agent is stopped by a signal.
async fn agent_until_stopped(
    mut agent: shoal_agent::AgentArgs,
    ask: AskPeers,
) -> anyhow::Result<()> {
    let mut wait = Duration::from_secs(1);
    loop {
        let joined = agent.dir.join("agent.toml").exists();
        if !joined && agent.token_file.is_none() {
            match ask.token().await {
                Ok(f) => agent.token_file = Some(f),
                Err(e) => tracing::warn!("no join token yet: {e:#}"),
            }
        }
        match shoal_agent::run(agent.clone()).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                tracing::warn!("agent: {e:#}; the overlay goes on, retrying in {wait:?}");
                eprintln!("agent: {e:#}; the overlay goes on, retrying in {wait:?}");
                // A token the manager refused (spent, expired, revoked:
                // every JoinRefusal names the join token) is replaced by
                // one asked of the peers; a manager that is not up yet
                // keeps the one there is.
                if !agent.dir.join("agent.toml").exists()
                    && format!("{e:#}").contains("join token")
                    && let Ok(f) = ask.token().await
                {
                    agent.token_file = Some(f);
                }
            }
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(30));
    }
}

/// The dashboard's overlay: a task surveys the overlay from `peer` every
/// 2 s and keeps the last merged view (or why the survey failed).
pub fn survey_for_dashboard(
    key: PathBuf,
    peer: Option<SocketAddr>,
) -> anyhow::Result<shoal_manager::OverlayView> {
    let key = files::read_key(&key)?;
    let peer = peer.context("--overlay-peer is needed with --overlay-key")?;
    let last = std::sync::Arc::new(std::sync::Mutex::new(None::<serde_json::Value>));
    let keep = last.clone();
    tokio::spawn(async move {
        loop {
            let v = match client::survey(peer, &key, Duration::from_secs(1)).await {
                Ok(v) => serde_json::to_value(&v).unwrap_or_default(),
                Err(e) => serde_json::json!({ "error": format!("{e:#}") }),
            };
            *keep.lock().unwrap_or_else(|p| p.into_inner()) = Some(v);
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    });
    Ok(shoal_manager::OverlayView(Some(std::sync::Arc::new(
        move || last.lock().unwrap_or_else(|p| p.into_inner()).clone(),
    ))))
}

/// A peer's self-upgrade and its apps, for people.
fn print_upgrade_and_apps(
    u: &shoal_core::overlay::report::UpgradeReport,
    apps: &[shoal_core::overlay::report::AppReport],
) {
    if let Some(l) = &u.last {
        match &l.error {
            Some(e) => println!("last upgrade: to {} refused: {e}", l.version.number),
            None => println!("last upgrade: to {}", l.version.number),
        }
    }
    if let Some(t) = u.probation_until_ms {
        let left = t.saturating_sub(shoal_overlay::now_ms()) as f64 / 1000.0;
        println!("on probation after an upgrade: {left:.1} s left to prove healthy");
    }
    if !u.bad.is_empty() {
        let bad: Vec<String> = u.bad.iter().map(|b| b.number.to_string()).collect();
        println!("releases marked bad: {}", bad.join(", "));
    }
    for a in apps {
        println!(
            "app {} (version {}): {}, {}{}, {} restart(s){}",
            a.name,
            a.version.number,
            a.state,
            if a.running { "running" } else { "not running" },
            a.pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
            a.restarts,
            a.message
                .as_deref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        );
    }
}

/// `shoal overlay status --all`, for people.
fn print_pool(v: &shoal_core::overlay::report::PoolView) {
    let ago = |t: u64| format!("{:.1}s", v.at_ms.saturating_sub(t) as f64 / 1000.0);
    let event = |e: &Option<(u64, String)>| {
        e.as_ref()
            .map(|(t, by)| format!("{} ago by {by}", ago(*t)))
            .unwrap_or_else(|| "-".into())
    };
    println!(
        "{} peers answered; target list {}; {} deployments, {} recoveries, {} manager starts",
        v.reports,
        v.targets_version
            .map(|x| x.to_string())
            .unwrap_or_else(|| "-".into()),
        v.counters.deployed,
        v.counters.recovered,
        v.counters.manager_starts
    );
    println!(
        "{:<14} {:<15} {:<14} {:<10} {:>8}  {:<20} {:<20} detail",
        "target", "address", "state", "version", "seen", "deployed", "recovered"
    );
    for t in &v.targets {
        println!(
            "{:<14} {:<15} {:<14} {:<10} {:>8}  {:<20} {:<20} {}",
            t.name,
            t.address,
            t.state,
            t.peer_version
                .map(|x| x.number.to_string())
                .unwrap_or_else(|| "-".into()),
            t.last_seen_ms.map(ago).unwrap_or_else(|| "-".into()),
            event(&t.deployed),
            event(&t.recovered),
            t.detail
                .as_ref()
                .map(|(d, by)| format!("{d} (from {by})"))
                .unwrap_or_default()
        );
    }
    for (host, a) in &v.apps {
        println!(
            "app {} on {host}: version {}, {}, {}{}",
            a.name,
            a.version.number,
            a.state,
            if a.running { "running" } else { "not running" },
            a.message
                .as_deref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        );
    }
    if !v.bad.is_empty() {
        let bad: Vec<String> = v.bad.iter().map(|b| b.number.to_string()).collect();
        println!("releases marked bad: {}", bad.join(", "));
    }
    for (host, m) in &v.managers {
        println!(
            "manager on {host} ({}): {}{}, {} start(s)",
            m.dir,
            m.state,
            m.detail
                .as_deref()
                .map(|d| format!(": {d}"))
                .unwrap_or_default(),
            m.starts
        );
    }
}

/// Prints how an install or a start ended and exits with its status; a
/// second start of a running peer exits 0 (idempotent).
fn finish(e: shoal_overlay::package::Ended, install: bool) -> anyhow::Result<()> {
    use shoal_overlay::package::Ended;
    match &e {
        Ended::Started => println!("started"),
        Ended::Already(why) => {
            println!("already-running");
            eprintln!("{why}");
            if !install {
                return Ok(());
            }
        }
        Ended::Corrupt(why) => eprintln!("{why}"),
    }
    if e.code() != 0 {
        std::process::exit(e.code());
    }
    Ok(())
}

async fn seed(a: SeedArgs) -> anyhow::Result<()> {
    use shoal_overlay::package::{Package, Settings};
    use shoal_overlay::ssh::{Source, SshDeployer};
    let targets = files::read_targets(&a.targets)?;
    let target = targets
        .targets()
        .iter()
        .find(|t| t.name == a.host || t.address.to_string() == a.host)
        .cloned()
        .with_context(|| {
            format!(
                "{:?} is not in {}; name a target of the list",
                a.host,
                a.targets.display()
            )
        })?;
    let release = shoal_overlay::release::read(&a.release)?;
    let binary = this_binary(a.binary)?;
    release.check_binary(&binary, None).with_context(|| {
        format!(
            "sign this binary first: shoal overlay release --out {}",
            a.release.display()
        )
    })?;
    let overlay_key = std::fs::read_to_string(&a.key)
        .with_context(|| format!("cannot read the overlay key {}", a.key.display()))?;
    let key = files::read_key(&a.key)?;
    let pkg = Package {
        binary,
        overlay_key,
        targets,
        release,
        settings: Settings {
            interval_ms: a.interval.as_millis() as u64,
            timeout_ms: a.timeout.as_millis() as u64,
            auth_agents: a.auth_agent.clone(),
            manager: a.join.clone(),
        },
    };
    let mut d = SshDeployer::new("seed", Source::Fixed(Box::new(pkg)), key);
    if let Some(f) = &a.token_file {
        let t = std::fs::read_to_string(f)
            .with_context(|| format!("--token-file: cannot read {}", f.display()))?;
        let t = t.lines().next().unwrap_or("").trim().to_string();
        shoal_net::identity::Token::parse(&t)
            .with_context(|| format!("--token-file {}", f.display()))?;
        d.tokens = Some(std::sync::Arc::new(shoal_overlay::ssh::GivenToken(t)));
    }
    let started = std::time::Instant::now();
    let outcome = peer::Deployer::contact(&d, target.clone()).await;
    let took = started.elapsed().as_secs_f64();
    use shoal_core::overlay::Outcome;
    match outcome {
        Outcome::Deployed => {
            println!(
                "deployed {} in {took:.2} s; the overlay deploys the rest",
                target.name
            );
            Ok(())
        }
        Outcome::Recovered => {
            println!("{} was installed; started it in {took:.2} s", target.name);
            Ok(())
        }
        Outcome::AlreadyRunning => {
            println!("{} already runs a peer; nothing to do", target.name);
            Ok(())
        }
        Outcome::WrongHostKey(d) => anyhow::bail!("{}: wrong host key: {d}", target.name),
        Outcome::Unreachable(d) => anyhow::bail!("{}: unreachable: {d}", target.name),
        Outcome::Failed(d) => anyhow::bail!("{}: {d}", target.name),
    }
}
