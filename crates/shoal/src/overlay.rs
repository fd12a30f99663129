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
    /// Its name in the target list.
    #[arg(long)]
    name: String,
    /// The overlay key file.
    #[arg(long)]
    key: PathBuf,
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
    /// Print the peer's report as JSON.
    #[arg(long)]
    json: bool,
}

fn peer_addr(s: &str) -> Result<SocketAddr, String> {
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
                let list = files::read_targets(f)?;
                let stored = files::load_stored(&a.dir)?;
                if stored.is_none_or(|s| list.version() > s.version()) {
                    files::store(&a.dir, &list)?;
                }
            }
            let opts = peer::PeerOptions {
                dir: a.dir,
                key: a.key,
                name: a.name,
                config: shoal_core::overlay::Config {
                    interval_ms: a.interval.as_millis() as u64,
                    timeout_ms: a.timeout.as_millis() as u64,
                },
                bind: a.bind,
            };
            peer::run(opts, std::sync::Arc::new(peer::NoDeployer)).await
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
