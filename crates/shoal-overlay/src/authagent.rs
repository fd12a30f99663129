//! `shoal auth-agent` (SMON II-B, Fig. 3): holds the SSH private key, or
//! forwards to the user's ssh-agent, and signs SSH user-authentication
//! requests for overlay peers so the key never leaves it. It answers only
//! requests sealed with the overlay key, signs only what
//! [`shoal_core::overlay::auth::SignPolicy`] allows (a host of its current
//! target list, that host's user, its own key, within a rate limit), and
//! appends one JSON line per request to `DIR/audit.log`.

use crate::files;
use crate::seal::{Opener, OverlayKey, Sealer};
use crate::wire::{self, Body, Message};
use anyhow::Context;
use russh::keys::{HashAlg, PrivateKey, PublicKey};
use shoal_core::overlay::TargetList;
use shoal_core::overlay::auth::SignPolicy;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio::net::UdpSocket;

/// Where the agent's signatures come from.
pub enum KeySource {
    /// An OpenSSH private key file (ed25519), read once at start.
    File(PathBuf),
    /// The user's ssh-agent at `SSH_AUTH_SOCK`: its first ed25519 key.
    SshAgent,
}

/// How the agent runs.
pub struct AgentOptions {
    /// Its directory: `targets.json.gz`, `audit.log`.
    pub dir: PathBuf,
    /// The key.
    pub key: KeySource,
    /// Where to listen (UDP).
    pub listen: SocketAddr,
    /// The overlay key.
    pub overlay_key: OverlayKey,
    /// Signatures per second, on average.
    pub rate: u32,
    /// At once.
    pub burst: u32,
}

enum Signer {
    Key(Box<PrivateKey>),
    Agent(PublicKey),
}

impl Signer {
    async fn sign(&self, data: &[u8]) -> anyhow::Result<Vec<u8>> {
        use russh::keys::ssh_encoding::Encode;
        match self {
            Signer::Key(k) => {
                let sig: russh::keys::ssh_key::Signature =
                    russh::keys::signature::Signer::try_sign(k.as_ref(), data)?;
                let mut v = Vec::new();
                sig.encode(&mut v)?;
                Ok(v)
            }
            Signer::Agent(pk) => {
                let mut a = russh::keys::agent::client::AgentClient::connect_env()
                    .await
                    .context("cannot reach the ssh-agent at SSH_AUTH_SOCK")?;
                let id = russh::keys::agent::AgentIdentity::PublicKey {
                    key: pk.clone(),
                    comment: String::new(),
                };
                let out = a
                    .sign_request(&id, None, data.to_vec())
                    .await
                    .context("the ssh-agent refused to sign")?;
                // It answers with the data, then the signature as a string.
                let rest = out
                    .get(data.len() + 4..)
                    .context("the ssh-agent's answer is too short")?;
                Ok(rest.to_vec())
            }
        }
    }
}

async fn load(source: &KeySource) -> anyhow::Result<(Signer, PublicKey)> {
    match source {
        KeySource::File(p) => {
            let k = russh::keys::load_secret_key(p, None).with_context(|| {
                format!(
                    "cannot load the SSH private key {} (OpenSSH format, no passphrase; e.g. ssh-keygen -t ed25519 -N '' -f FILE)",
                    p.display()
                )
            })?;
            let pk = k.public_key().clone();
            Ok((Signer::Key(Box::new(k)), pk))
        }
        KeySource::SshAgent => {
            let mut a = russh::keys::agent::client::AgentClient::connect_env()
                .await
                .context("--ssh-agent: cannot reach the ssh-agent (is SSH_AUTH_SOCK set?)")?;
            let ids = a.request_identities().await?;
            let pk = ids
                .iter()
                .find_map(|i| match i {
                    russh::keys::agent::AgentIdentity::PublicKey { key, .. }
                        if key.algorithm() == russh::keys::Algorithm::Ed25519 =>
                    {
                        Some(key.clone())
                    }
                    _ => None,
                })
                .context("--ssh-agent: the ssh-agent holds no ed25519 key; ssh-add one")?;
            Ok((Signer::Agent(pk.clone()), pk))
        }
    }
}

/// Runs the agent until the process ends.
pub async fn run(opts: AgentOptions) -> anyhow::Result<()> {
    std::fs::create_dir_all(&opts.dir)
        .with_context(|| format!("cannot create {}", opts.dir.display()))?;
    let mut list: TargetList = files::load_stored(&opts.dir)?.with_context(|| {
        format!(
            "no target list in {}; start once with --targets FILE",
            opts.dir.display()
        )
    })?;
    let (signer, public) = load(&opts.key).await?;
    let openssh = public.to_openssh()?;
    let mut policy = SignPolicy::new(public.to_bytes()?, opts.rate, opts.burst, crate::now_ms());
    let sock = UdpSocket::bind(opts.listen)
        .await
        .with_context(|| format!("cannot listen on udp {}", opts.listen))?;
    let mut audit = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(opts.dir.join("audit.log"))?;
    println!(
        "auth agent listening on {} with key {} ({})",
        opts.listen,
        public.fingerprint(HashAlg::Sha256),
        openssh
    );
    let mut sealer = Sealer::new(&opts.overlay_key);
    let mut opener = Opener::new(&opts.overlay_key);
    let mut buf = vec![0u8; wire::MAX_DATAGRAM + 64];
    loop {
        let (n, src) = sock.recv_from(&mut buf).await?;
        let now = crate::now_ms();
        let Ok(m) = opener
            .open(&buf[..n])
            .map_err(|e| e.to_string())
            .and_then(|p| wire::decode(&p, now).map_err(|e| e.to_string()))
        else {
            // Not sealed with the overlay key: no answer at all.
            continue;
        };
        let reply = match m.body {
            Body::AgentKey { id } => Some(Body::AgentPublicKey {
                id,
                key: openssh.clone(),
            }),
            Body::AgentSign {
                id,
                target,
                host_key,
                list: their,
                data,
            } => {
                let result = match hex::decode(&data) {
                    Err(_) => Err("the data is not hex".to_string()),
                    Ok(d) => match policy.judge(&list, &target, &host_key, &d, now) {
                        Err(r) => Err(r.to_string()),
                        Ok(()) => signer
                            .sign(&d)
                            .await
                            .map(hex::encode)
                            .map_err(|e| format!("{e:#}")),
                    },
                };
                let line = serde_json::json!({
                    "time_ms": now,
                    "from": m.from,
                    "src": src.to_string(),
                    "target": target,
                    "host_key": host_key,
                    "signed": result.is_ok(),
                    "refusal": result.as_ref().err(),
                });
                let _ = writeln!(audit, "{line}");
                tracing::info!(%src, from = %m.from, %target, ok = result.is_ok(), "sign request");
                if their > list.version()
                    && let Some(a) = list
                        .index(&m.from)
                        .and_then(|i| list.get(i))
                        .map(|t| SocketAddr::new(t.address, list.overlay_port()))
                {
                    // The peer holds a newer list: pull it (the answer is a
                    // `targets` message, adopted below).
                    send(&sock, &mut sealer, a, Body::GetTargets).await;
                }
                Some(Body::AgentSigned { id, result })
            }
            Body::Targets { list: l } => {
                adopt(&opts.dir, &mut list, l);
                None
            }
            Body::SetTargets { id, list: l } => {
                let adopted = adopt(&opts.dir, &mut list, l);
                Some(Body::TargetsSet {
                    id,
                    adopted,
                    version: list.version(),
                })
            }
            _ => None,
        };
        if let Some(b) = reply {
            send(&sock, &mut sealer, src, b).await;
        }
    }
}

fn adopt(dir: &std::path::Path, list: &mut TargetList, l: TargetList) -> bool {
    if l.version() <= list.version() {
        return false;
    }
    if let Err(e) = files::store(dir, &l) {
        tracing::warn!("cannot store the target list: {e:#}");
        return false;
    }
    tracing::info!(version = %l.version(), "auth agent adopted a newer target list");
    *list = l;
    true
}

async fn send(sock: &UdpSocket, sealer: &mut Sealer, to: SocketAddr, body: Body) {
    let m = Message {
        sent_ms: crate::now_ms(),
        from: "auth-agent".into(),
        body,
    };
    if let Ok(p) = wire::encode(&m) {
        let _ = sock.send_to(&sealer.seal(&p), to).await;
    }
}
