//! The client utility's second half (SMON II-E): hand a release or an app
//! to one peer (the utility mimics a peer: it tells the peer and serves the
//! package it pulls), switch self-management off and on (the livetag), set
//! an app's state.

use anyhow::Context;
use shoal_core::overlay::apps::{AppFile, AppSpec, AppState, Installed, Notice, StateTag};
use shoal_core::overlay::{Livetag, Version};
use shoal_overlay::fetch::{self, What};
use shoal_overlay::seal::OverlayKey;
use shoal_overlay::wire::Body;
use shoal_overlay::{client, files, release};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Where to reach the overlay.
#[derive(clap::Args, Clone)]
pub struct PeerRef {
    /// A peer: ADDR or ADDR:PORT (port 7946 by default).
    #[arg(long, value_parser = crate::overlay::peer_addr)]
    peer: SocketAddr,
    /// The overlay key file.
    #[arg(long)]
    key: PathBuf,
    /// How long to wait for each answer.
    #[arg(long, default_value = "3s", value_parser = shoal_core::duration::parse_positive_duration)]
    wait: Duration,
}

/// `shoal overlay upgrade`.
#[derive(clap::Args)]
pub struct UpgradeArgs {
    #[command(flatten)]
    to: PeerRef,
    /// The release directory (`shoal overlay release`).
    #[arg(long)]
    release: PathBuf,
    /// The binary released (default: RELEASE/shoal if there is one, else
    /// this one); it must match the release's digest.
    #[arg(long)]
    binary: Option<PathBuf>,
    /// Offer it to every peer of the list, not only --peer (each checks it;
    /// one is enough for the overlay to spread a good release).
    #[arg(long)]
    all: bool,
    /// How long to wait for the peer to run the new release.
    #[arg(long, default_value = "60s", value_parser = shoal_core::duration::parse_positive_duration)]
    timeout: Duration,
}

/// `shoal overlay app ...`.
#[derive(clap::Subcommand)]
pub enum AppCmd {
    /// Install an app at one peer; the overlay spreads it to every peer.
    ///
    /// Example: shoal overlay app install web.toml --peer 10.0.0.1 --key overlay.key
    Install(AppInstallArgs),
    /// Set an app's state everywhere: online (restarted whenever it stops),
    /// offline (kept stopped) or ignore (started once, left alone).
    ///
    /// Example: shoal overlay app state web offline --peer 10.0.0.1 --key overlay.key
    State(AppStateArgs),
}

/// `shoal overlay app install`.
#[derive(clap::Args)]
pub struct AppInstallArgs {
    /// The app spec (TOML): name, version, adaptor, params, state,
    /// package (a directory, relative to the spec), restart.
    spec: PathBuf,
    #[command(flatten)]
    to: PeerRef,
    /// How long to wait for the peer to install it.
    #[arg(long, default_value = "30s", value_parser = shoal_core::duration::parse_positive_duration)]
    timeout: Duration,
}

/// `shoal overlay app state`.
#[derive(clap::Args)]
pub struct AppStateArgs {
    /// The app.
    name: String,
    /// online, offline or ignore.
    state: AppState,
    #[command(flatten)]
    to: PeerRef,
}

/// The spec file an operator writes.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecFile {
    name: String,
    version: u64,
    adaptor: String,
    #[serde(default)]
    params: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    restart: Option<String>,
    #[serde(default = "online")]
    state: String,
    #[serde(default)]
    package: Option<PathBuf>,
}

fn online() -> String {
    "online".into()
}

/// A local TCP listener the peer at `peer` can reach: bound to the address
/// this host uses towards it.
async fn listener_towards(peer: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let probe = std::net::UdpSocket::bind(if peer.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })?;
    probe.connect(peer)?;
    let local = probe.local_addr()?.ip();
    tokio::net::TcpListener::bind(SocketAddr::new(local, 0))
        .await
        .with_context(|| format!("cannot listen on {local} for the peer to pull from"))
}

/// `shoal overlay upgrade`.
pub async fn upgrade(a: UpgradeArgs) -> anyhow::Result<()> {
    let key = files::read_key(&a.to.key)?;
    let rel = release::read(&a.release)?;
    let binary = match a.binary {
        Some(b) => b,
        None if a.release.join("shoal").exists() => a.release.join("shoal"),
        None => std::env::current_exe()?,
    };
    // Refused here first, with the reason; every peer checks again.
    let m = rel.check_binary(&binary, None).with_context(|| {
        format!(
            "{} is not the release in {}; sign it with `shoal overlay release --binary {} --out {}`",
            binary.display(),
            a.release.display(),
            binary.display(),
            a.release.display()
        )
    });
    let version = match m {
        Ok(m) => m.version,
        // Offering what does not verify is how an operator checks that the
        // overlay refuses it; say so, and let every peer refuse it.
        Err(e) if a.all => {
            eprintln!("warning: {e:#}; offering it anyway, as asked (--all)");
            serde_json::from_slice::<release::Manifest>(&rel.manifest)
                .context("manifest.json")?
                .version
        }
        Err(e) => return Err(e),
    };
    let l = listener_towards(a.to.peer).await?;
    let port = l.local_addr()?.port();
    let (dir, bin) = (a.release.clone(), binary.clone());
    let catalog: fetch::Catalog = Arc::new(move |w: &What| match w {
        What::Release => Ok(release::FILES
            .iter()
            .map(|f| (f.to_string(), dir.join(f)))
            .chain(std::iter::once(("shoal".to_string(), bin.clone())))
            .collect()),
        What::App { .. } => Err("the utility offers a release, not an app".into()),
    });
    tokio::spawn(fetch::serve(l, key.clone(), catalog));
    let peers: Vec<SocketAddr> = if a.all {
        let r = client::status(a.to.peer, &key, a.to.wait).await?;
        let port = a.to.peer.port();
        r.targets
            .iter()
            .filter_map(|t| t.address.parse().ok().map(|ip| SocketAddr::new(ip, port)))
            .collect()
    } else {
        vec![a.to.peer]
    };
    let mut pulling = Vec::new();
    for p in &peers {
        let id: u64 = rand::random();
        let r = client::request(
            *p,
            &key,
            Body::Offer { id, version, port },
            a.to.wait,
            |b| match b {
                Body::Offered { id: i, result } if i == id => Some(result),
                _ => None,
            },
        )
        .await;
        match r {
            Ok(Ok(())) => pulling.push(*p),
            Ok(Err(why)) => println!("{p}: not pulled: {why}"),
            Err(e) => println!("{p}: {e:#}"),
        }
    }
    anyhow::ensure!(
        !pulling.is_empty(),
        "no peer pulls release {version}; see the reasons above"
    );
    // Until each peer that pulls runs the release, or says why not.
    let deadline = tokio::time::Instant::now() + a.timeout;
    let mut ran = 0usize;
    let mut refused = 0usize;
    for p in &pulling {
        loop {
            let now_ok = match client::status(*p, &key, a.to.wait).await {
                Ok(r) if r.versions.peer == version => Some(Ok(r.name)),
                Ok(r) => match &r.upgrade.last {
                    Some(n) if n.version == version && n.error.is_some() => Some(Err(format!(
                        "{}: refused: {}",
                        r.name,
                        n.error.clone().unwrap_or_default()
                    ))),
                    _ => None,
                },
                // Re-executing: no answer for a moment.
                Err(_) => None,
            };
            match now_ok {
                Some(Ok(name)) => {
                    println!("{name} ({p}) runs release {version}; the overlay spreads it");
                    ran += 1;
                    break;
                }
                Some(Err(e)) => {
                    println!("{e}");
                    refused += 1;
                    break;
                }
                None if tokio::time::Instant::now() >= deadline => {
                    println!("{p}: not on release {version} after {:?}", a.timeout);
                    break;
                }
                None => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }
    if ran == 0 {
        anyhow::bail!(
            "release {version} was refused or did not take ({refused} refusal(s)); see above"
        );
    }
    Ok(())
}

/// `shoal overlay enable|disable`: sets the livetag at one peer, one
/// version above the one it holds; it spreads with every ping.
pub async fn set_livetag(to: PeerRef, on: bool) -> anyhow::Result<()> {
    let key = files::read_key(&to.key)?;
    let r = client::status(to.peer, &key, to.wait).await.with_context(|| {
        if on {
            "no peer answered; if the overlay has exited, re-seed one with `shoal overlay seed HOST ... --enable`"
        } else {
            "no peer answered"
        }
    })?;
    let held = r.versions.livetag;
    if held.on == on {
        println!(
            "{} already holds livetag {} (version {}); nothing to do",
            r.name,
            if on { "on" } else { "off" },
            held.version
        );
        return Ok(());
    }
    let tag = Livetag {
        on,
        version: Version::new(held.version.number + 1, rand::random()),
    };
    let id: u64 = rand::random();
    let now = client::request(
        to.peer,
        &key,
        Body::SetLivetag { id, livetag: tag },
        to.wait,
        |b| match b {
            Body::LivetagSet { id: i, livetag } if i == id => Some(livetag),
            _ => None,
        },
    )
    .await?;
    anyhow::ensure!(
        now == tag,
        "{} holds livetag version {} instead; try again",
        r.name,
        now.version
    );
    if on {
        println!(
            "{} has the livetag on (version {}): self-management resumes and spreads; peers that exited are recovered",
            r.name, tag.version.number
        );
    } else {
        println!(
            "{} has the livetag off (version {}): it spreads with every ping; peers stop, and exit after {} quiet intervals",
            r.name,
            tag.version.number,
            shoal_core::overlay::QUIET_INTERVALS
        );
    }
    Ok(())
}

/// Reads a spec file and its package into the spec the overlay spreads,
/// with the package's files.
fn read_spec(path: &Path) -> anyhow::Result<(AppSpec, Vec<(String, PathBuf)>)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let f: SpecFile = toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
    let state: AppState = f
        .state
        .parse()
        .map_err(|e: String| anyhow::anyhow!("{}: {e}", path.display()))?;
    anyhow::ensure!(
        matches!(f.adaptor.as_str(), "process" | "www" | "nginx"),
        "{}: adaptor {:?} is not one of process, www, nginx",
        path.display(),
        f.adaptor
    );
    let mut files = Vec::new();
    let mut listed = Vec::new();
    if let Some(pkg) = &f.package {
        let root = path.parent().unwrap_or(Path::new(".")).join(pkg);
        anyhow::ensure!(
            root.is_dir(),
            "{}: package {} is not a directory",
            path.display(),
            root.display()
        );
        let mut stack = vec![root.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d)? {
                let p = e?.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    let rel = p
                        .strip_prefix(&root)?
                        .to_string_lossy()
                        .replace(std::path::MAIN_SEPARATOR, "/");
                    let (sha256, size) = release::sha256_file(&p)?;
                    files.push(AppFile {
                        path: rel.clone(),
                        sha256,
                        size,
                    });
                    listed.push((format!("pkg/{rel}"), p));
                }
            }
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
    }
    let mut spec = AppSpec {
        name: f.name,
        version: Version::new(f.version, 0),
        adaptor: f.adaptor,
        params: f.params,
        restart: f.restart,
        state,
        files,
    };
    // The origin tells apart two contents given the same number.
    let digest = <sha2::Sha256 as sha2::Digest>::digest(serde_json::to_vec(&spec)?);
    let mut origin = [0u8; 8];
    origin.copy_from_slice(&digest[..8]);
    spec.version.origin = u64::from_be_bytes(origin);
    spec.validate()
        .with_context(|| format!("{}", path.display()))?;
    Ok((spec, listed))
}

/// `shoal overlay app install`.
pub async fn app_install(a: AppInstallArgs) -> anyhow::Result<()> {
    let key = files::read_key(&a.to.key)?;
    let (spec, listed) = read_spec(&a.spec)?;
    let tag = StateTag {
        state: spec.state,
        version: Version::default(),
    };
    let tmp = tempfile_dir()?;
    let installed = tmp.join("installed.json");
    std::fs::write(
        &installed,
        serde_json::to_vec(&Installed {
            spec: spec.clone(),
            state: tag,
        })?,
    )?;
    let l = listener_towards(a.to.peer).await?;
    let port = l.local_addr()?.port();
    let name = spec.name.clone();
    let catalog: fetch::Catalog = Arc::new(move |w: &What| match w {
        What::App { name: n } if *n == name => Ok(std::iter::once((
            "installed.json".to_string(),
            installed.clone(),
        ))
        .chain(listed.iter().cloned())
        .collect()),
        _ => Err("the utility offers one app".into()),
    });
    tokio::spawn(fetch::serve(l, key.clone(), catalog));
    let id: u64 = rand::random();
    let notice = Notice {
        version: spec.version,
        state: tag,
    };
    let pulling = client::request(
        a.to.peer,
        &key,
        Body::AppOffer {
            id,
            name: spec.name.clone(),
            notice,
            port,
        },
        a.to.wait,
        |b| match b {
            Body::AppDone { id: i, result } if i == id => Some(result),
            _ => None,
        },
    )
    .await?
    .map_err(|e| anyhow::anyhow!("{}: {e}", a.to.peer))?;
    if !pulling {
        println!(
            "{} already holds {} at version {} or newer",
            a.to.peer, spec.name, spec.version.number
        );
        return Ok(());
    }
    let deadline = tokio::time::Instant::now() + a.timeout;
    loop {
        if let Ok(r) = client::status(a.to.peer, &key, a.to.wait).await
            && r.apps
                .iter()
                .any(|x| x.name == spec.name && x.version == spec.version)
        {
            println!(
                "{} installed {} version {}; the overlay spreads it",
                r.name, spec.name, spec.version.number
            );
            let _ = std::fs::remove_dir_all(&tmp);
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            let _ = std::fs::remove_dir_all(&tmp);
            anyhow::bail!(
                "{} did not install {} within {:?}; see its peer.log",
                a.to.peer,
                spec.name,
                a.timeout
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("shoal-app-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// `shoal overlay app state`.
pub async fn app_state(a: AppStateArgs) -> anyhow::Result<()> {
    let key: OverlayKey = files::read_key(&a.to.key)?;
    let r = client::status(a.to.peer, &key, a.to.wait).await?;
    let app = r.apps.iter().find(|x| x.name == a.name).with_context(|| {
        format!(
            "{} holds no app {:?}; install it with `shoal overlay app install`",
            r.name, a.name
        )
    })?;
    let tag = StateTag {
        state: a.state,
        version: Version::new(app.state_version.number + 1, rand::random()),
    };
    let id: u64 = rand::random();
    let changed = client::request(
        a.to.peer,
        &key,
        Body::SetAppState {
            id,
            name: a.name.clone(),
            tag,
        },
        a.to.wait,
        |b| match b {
            Body::AppDone { id: i, result } if i == id => Some(result),
            _ => None,
        },
    )
    .await?
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    anyhow::ensure!(
        changed,
        "{} kept a newer state of {}; try again",
        r.name,
        a.name
    );
    println!(
        "{} set {} {} (version {}); it spreads with the app's notices",
        r.name, a.name, a.state, tag.version.number
    );
    Ok(())
}
