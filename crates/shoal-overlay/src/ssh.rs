//! The SSH half of a contact (SMON II-A-1, II-A-2): log in to a target
//! through the auth agent, look, and deploy or recover as
//! [`shoal_core::overlay::remedy`] decides; then log out. Built on russh
//! (client) and russh-sftp.
//!
//! - The server's host key must have the target list's SHA-256 fingerprint,
//!   or the session ends before anything is sent: `WrongHostKey`.
//! - The login's signature comes from the auth agent ([`AgentSigner`]); this
//!   process never holds the SSH private key.
//! - A deployment copies the package with SFTP into its own directory
//!   `P/releases/<version>-<deployer>-<random>`, `package.sha256` last, and
//!   runs the copied binary's installer, which holds the install lock.

use crate::client;
use crate::package::Package;
use crate::peer::Deployer;
use crate::seal::OverlayKey;
use crate::wire::Body;
use russh::keys::{HashAlg, PublicKey, PublicKeyOrCertificate};
use russh::{ChannelMsg, Disconnect};
use shoal_core::overlay::deploy::{
    CLAIM, EXIT_ALREADY, claim_command, outcome_of, parse_probe, probe_command, shell_quote,
};
use shoal_core::overlay::{Outcome, Remedy, Target, Version, remedy};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// Where a deployer's package comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// An installed peer: its package directory and its state directory
    /// (the target list it holds now), read at each contact.
    Installed {
        /// `P/current`.
        package: PathBuf,
        /// `P/state`.
        state: PathBuf,
    },
    /// A package assembled by `shoal overlay seed`.
    Fixed(Box<Package>),
}

/// Where a deployer gets the join token for a host it deploys, when the
/// pool has a manager: a deploy token the manager mints for that host
/// alone (a peer), or the one the operator gave (`shoal overlay seed`).
#[async_trait::async_trait]
pub trait JoinTokens: Send + Sync + 'static {
    /// A token that admits node `node`.
    async fn token_for(&self, node: &str) -> anyhow::Result<String>;
}

/// The token the operator gave `shoal overlay seed --token-file`.
pub struct GivenToken(pub String);

#[async_trait::async_trait]
impl JoinTokens for GivenToken {
    async fn token_for(&self, _node: &str) -> anyhow::Result<String> {
        Ok(self.0.clone())
    }
}

/// The deployer of a peer (or of `shoal overlay seed`).
pub struct SshDeployer {
    /// Who deploys: a target's name, or `seed`.
    pub name: String,
    /// The package.
    pub source: Source,
    /// The overlay key, which seals the requests to the auth agent.
    pub key: OverlayKey,
    /// How long one remote step may take.
    pub step_timeout: Duration,
    /// Join tokens for the hosts it deploys, when the pool has a manager.
    pub tokens: Option<Arc<dyn JoinTokens>>,
    agent_key: tokio::sync::Mutex<std::collections::HashMap<SocketAddr, PublicKey>>,
    /// The binary last checked against its release, and the manifest.
    #[allow(clippy::type_complexity)]
    checked: Mutex<
        Option<(
            (PathBuf, u64, Option<std::time::SystemTime>),
            crate::release::Manifest,
        )>,
    >,
    /// The replica of the auth agent tried first: the last that answered
    /// (at first a random one, which spreads a pool over its replicas).
    preferred: std::sync::atomic::AtomicUsize,
}

impl SshDeployer {
    /// A deployer named `name` shipping `source`.
    pub fn new(name: &str, source: Source, key: OverlayKey) -> Self {
        Self {
            name: name.to_string(),
            source,
            key,
            step_timeout: Duration::from_secs(60),
            tokens: None,
            agent_key: tokio::sync::Mutex::new(std::collections::HashMap::new()),
            preferred: std::sync::atomic::AtomicUsize::new(rand::random::<u16>() as usize),
            checked: Mutex::new(None),
        }
    }

    /// This host's binary checked against the release: hashed once per
    /// binary file (by path, size and mtime), not at every deployment.
    fn checked_binary(&self, pkg: &Package) -> anyhow::Result<crate::release::Manifest> {
        let meta = std::fs::metadata(&pkg.binary)?;
        let id = (pkg.binary.clone(), meta.len(), meta.modified().ok());
        let mut c = self.checked.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((seen, m)) = &*c
            && *seen == id
            && pkg.release.verify(None)?.binary_sha256 == m.binary_sha256
        {
            return Ok(m.clone());
        }
        let m = pkg.release.check_binary(&pkg.binary, None)?;
        *c = Some((id, m.clone()));
        Ok(m)
    }

    fn package(&self) -> anyhow::Result<Package> {
        match &self.source {
            Source::Installed { package, state } => Package::installed(package, state),
            Source::Fixed(p) => Ok((**p).clone()),
        }
    }

    /// The first replica of the auth agent that answers, from the
    /// preferred one on, with its public key.
    async fn any_agent(&self, agents: &[SocketAddr]) -> anyhow::Result<(SocketAddr, PublicKey)> {
        use std::sync::atomic::Ordering;
        anyhow::ensure!(!agents.is_empty(), "no auth agent configured");
        let first = self.preferred.load(Ordering::Relaxed) % agents.len();
        let mut why = Vec::new();
        for i in (0..agents.len()).map(|k| (first + k) % agents.len()) {
            match self.agent_public_key(agents[i]).await {
                Ok(k) => {
                    self.preferred.store(i, Ordering::Relaxed);
                    return Ok((agents[i], k));
                }
                Err(e) => why.push(format!("{e:#}")),
            }
        }
        anyhow::bail!("{}", why.join("; "))
    }

    async fn agent_public_key(&self, agent: SocketAddr) -> anyhow::Result<PublicKey> {
        let mut k = self.agent_key.lock().await;
        if let Some(k) = k.get(&agent) {
            return Ok(k.clone());
        }
        let id: u64 = rand::random();
        let text = client::request(
            agent,
            &self.key,
            Body::AgentKey { id },
            Duration::from_secs(3),
            |b| match b {
                Body::AgentPublicKey { id: i, key } if i == id => Some(key),
                _ => None,
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("auth agent at {agent}: {e:#}"))?;
        let pk = PublicKey::from_openssh(&text)
            .map_err(|e| anyhow::anyhow!("the auth agent's key {text:?} does not parse: {e}"))?;
        k.insert(agent, pk.clone());
        Ok(pk)
    }

    async fn contact_inner(&self, t: &Target) -> Outcome {
        let pkg = match self.package() {
            Ok(p) => p,
            Err(e) => return Outcome::Failed(format!("no package to ship: {e:#}")),
        };
        let seen = Arc::new(Mutex::new(None::<String>));
        let handler = HostKeyCheck {
            expected: t.host_key.clone(),
            seen: seen.clone(),
        };
        let config = Arc::new(russh::client::Config {
            inactivity_timeout: Some(self.step_timeout),
            ..Default::default()
        });
        let addr = SocketAddr::new(t.address, t.ssh_port);
        let connected = tokio::time::timeout(
            Duration::from_secs(10),
            russh::client::connect(config, addr, handler),
        )
        .await;
        let seen_key = || seen.lock().ok().and_then(|s| s.clone());
        let mut h = match connected {
            Err(_) => return Outcome::Unreachable(format!("ssh {addr}: no answer within 10 s")),
            Ok(Err(e)) => {
                return match seen_key() {
                    Some(k) if k != t.host_key => Outcome::WrongHostKey(format!(
                        "{addr} presented host key {k}; the target list says {}; nothing was sent",
                        t.host_key
                    )),
                    _ => Outcome::Unreachable(format!("ssh {addr}: {e}")),
                };
            }
            Ok(Ok(h)) => h,
        };
        let (agent, public) = match self.any_agent(&pkg.settings.auth_agents).await {
            Ok(a) => a,
            Err(e) => return Outcome::Failed(format!("{e:#}")),
        };
        let mut signer = AgentSigner {
            agent,
            key: self.key.clone(),
            target: t.name.clone(),
            host_key: seen_key().unwrap_or_default(),
            list: pkg.targets.version(),
        };
        match h
            .authenticate_publickey_with(&t.user, public, None, &mut signer)
            .await
        {
            Ok(r) if r.success() => {}
            Ok(_) => {
                return Outcome::Unreachable(format!(
                    "{}@{addr} refused the auth agent's key; add it to the target's authorized_keys",
                    t.user
                ));
            }
            Err(SignError::Refused(why)) => {
                return Outcome::Failed(format!("the auth agent refused to sign: {why}"));
            }
            Err(SignError::Session) => {
                return Outcome::Unreachable(format!("ssh {addr}: session lost during login"));
            }
        }
        let outcome = self.after_login(&h, t, &pkg).await;
        let _ = h.disconnect(Disconnect::ByApplication, "", "en").await;
        outcome
    }

    async fn after_login<H: russh::client::Handler>(
        &self,
        h: &russh::client::Handle<H>,
        t: &Target,
        pkg: &Package,
    ) -> Outcome {
        let probe = match self.exec(h, &probe_command(&t.prefix)).await {
            Ok((_, out, _)) => parse_probe(&out),
            Err(e) => return Outcome::Failed(format!("probe: {e:#}")),
        };
        let Some(found) = probe else {
            return Outcome::Failed("the probe did not complete (is flock installed?)".into());
        };
        let prefix = shell_quote(&t.prefix);
        match remedy(found) {
            Remedy::Nothing => Outcome::AlreadyRunning,
            Remedy::Recover => match self
                .exec(
                    h,
                    &format!("{prefix}/current/shoal overlay start --prefix {prefix}"),
                )
                .await
            {
                Ok((code, out, err)) => outcome_of(true, code, &out, &err),
                Err(e) => Outcome::Failed(format!("start: {e:#}")),
            },
            Remedy::Deploy => match self.deploy(h, t, pkg).await {
                Ok((code, out, err)) => outcome_of(false, code, &out, &err),
                Err(e) => Outcome::Failed(format!("deploy: {e:#}")),
            },
        }
    }

    async fn deploy<H: russh::client::Handler>(
        &self,
        h: &russh::client::Handle<H>,
        t: &Target,
        pkg: &Package,
    ) -> anyhow::Result<(Option<u32>, String, String)> {
        let version: Version = pkg.release.verify(None)?.version;
        // Never ship a binary the cluster did not release (a tampered copy
        // on this host stops here, not on every host it would reach).
        let manifest = self.checked_binary(pkg)?;
        // Claim the host, so that other deployers leave it to this one
        // instead of copying the package again (remedy's `deploying`).
        let (code, _, _) = self.exec(h, &claim_command(&t.prefix)).await?;
        if code != Some(0) {
            return Ok((Some(EXIT_ALREADY), "already-running".into(), String::new()));
        }
        let rel = format!(
            "{}-{}-{:08x}",
            version.number,
            self.name.replace(|c: char| !c.is_ascii_alphanumeric(), "_"),
            rand::random::<u32>()
        );
        let dir = format!("{}/releases/{rel}", t.prefix);
        let qdir = shell_quote(&dir);
        let claim = shell_quote(&format!("{}/{CLAIM}", t.prefix));
        // With a manager, a token that admits this host alone. Without one
        // the host still gets its peer (the overlay works without a
        // manager), and its agent says why it cannot join.
        let token = match (&pkg.settings.manager, &self.tokens) {
            (Some(_), Some(src)) => match src.token_for(&t.name).await {
                Ok(tok) => Some(tok),
                Err(e) => {
                    tracing::warn!(target = %t.name, "no join token for it: {e:#}");
                    None
                }
            },
            _ => None,
        };
        // 0700: the package holds the overlay key and the join token, which
        // no other user of the host may read.
        let (code, _, err) = self.exec(h, &format!("mkdir -p -m 0700 {qdir}")).await?;
        anyhow::ensure!(code == Some(0), "mkdir {dir}: {}", err.trim());
        let ch = h.channel_open_session().await?;
        ch.request_subsystem(true, "sftp").await?;
        let sftp = russh_sftp::client::SftpSession::new(ch.into_stream()).await?;
        let mut sums = String::new();
        for (name, bytes) in pkg.files_for(t, token.as_deref())? {
            let mut f = sftp.create(format!("{dir}/{name}")).await?;
            f.write_all(&bytes).await?;
            f.shutdown().await?;
            sums.push_str(&format!(
                "{}  {name}\n",
                hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes))
            ));
        }
        let mut f = sftp.create(format!("{dir}/shoal")).await?;
        let mut src = tokio::fs::File::open(&pkg.binary).await?;
        tokio::io::copy(&mut src, &mut f).await?;
        f.shutdown().await?;
        sums.push_str(&format!("{}  shoal\n", manifest.binary_sha256));
        let mut f = sftp.create(format!("{dir}/package.sha256")).await?;
        f.write_all(sums.as_bytes()).await?;
        f.shutdown().await?;
        let _ = sftp.close().await;
        self.exec(
            h,
            &format!(
                "cd {qdir} && if sha256sum --quiet --strict -c package.sha256 >/dev/null 2>&1; \
                 then chmod 0755 shoal && exec ./shoal overlay install --package {qdir}; \
                 else echo 'the package arrived corrupt (package.sha256)' >&2; cd / && rm -rf {qdir} {claim}; exit 4; fi"
            ),
        )
        .await
    }

    /// Runs `cmd` on the target: its exit status, stdout and stderr.
    async fn exec<H: russh::client::Handler>(
        &self,
        h: &russh::client::Handle<H>,
        cmd: &str,
    ) -> anyhow::Result<(Option<u32>, String, String)> {
        let run = async {
            let mut ch = h.channel_open_session().await?;
            ch.exec(true, cmd).await?;
            let (mut out, mut err, mut code) = (Vec::new(), Vec::new(), None);
            while let Some(m) = ch.wait().await {
                match m {
                    ChannelMsg::Data { data } => out.extend_from_slice(&data),
                    ChannelMsg::ExtendedData { data, .. } => err.extend_from_slice(&data),
                    ChannelMsg::ExitStatus { exit_status } => code = Some(exit_status),
                    _ => {}
                }
            }
            anyhow::Ok((
                code,
                String::from_utf8_lossy(&out).into_owned(),
                String::from_utf8_lossy(&err).into_owned(),
            ))
        };
        tokio::time::timeout(self.step_timeout, run)
            .await
            .map_err(|_| anyhow::anyhow!("{cmd:?} took longer than {:?}", self.step_timeout))?
    }
}

#[async_trait::async_trait]
impl Deployer for SshDeployer {
    async fn contact(&self, target: Target) -> Outcome {
        self.contact_inner(&target).await
    }
}

/// Accepts only the target list's host key, and remembers what it saw.
struct HostKeyCheck {
    expected: String,
    seen: Arc<Mutex<Option<String>>>,
}

impl russh::client::Handler for HostKeyCheck {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let fp = match key {
            PublicKeyOrCertificate::PublicKey { key, .. } => {
                key.fingerprint(HashAlg::Sha256).to_string()
            }
            // A host certificate would need the list to name a host CA,
            // which it does not (yet): refuse it.
            PublicKeyOrCertificate::Certificate(c) => {
                format!(
                    "certificate {}",
                    c.public_key().fingerprint(HashAlg::Sha256)
                )
            }
        };
        let ok = fp == self.expected;
        if let Ok(mut s) = self.seen.lock() {
            *s = Some(fp);
        }
        Ok(ok)
    }
}

/// Why the auth agent gave no signature.
#[derive(Debug)]
pub enum SignError {
    /// It refused, or did not answer; the reason.
    Refused(String),
    /// The SSH session went away.
    Session,
}

impl From<russh::SendError> for SignError {
    fn from(_: russh::SendError) -> Self {
        SignError::Session
    }
}

/// A russh [`russh::Signer`] that has the auth agent sign (SMON Fig. 3:
/// `resolve_challenge`), over a request sealed with the overlay key.
pub struct AgentSigner {
    /// The agent.
    pub agent: SocketAddr,
    /// The overlay key.
    pub key: OverlayKey,
    /// The target logged into.
    pub target: String,
    /// The host key fingerprint seen there.
    pub host_key: String,
    /// The target list version held.
    pub list: Version,
}

impl russh::Signer for AgentSigner {
    type Error = SignError;

    async fn auth_sign(
        &mut self,
        _key: &russh::keys::agent::AgentIdentity,
        _hash_alg: Option<HashAlg>,
        to_sign: Vec<u8>,
    ) -> Result<Vec<u8>, SignError> {
        let id: u64 = rand::random();
        let body = Body::AgentSign {
            id,
            target: self.target.clone(),
            host_key: self.host_key.clone(),
            list: self.list,
            data: hex::encode(&to_sign),
        };
        let r = client::request(
            self.agent,
            &self.key,
            body,
            Duration::from_secs(3),
            |b| match b {
                Body::AgentSigned { id: i, result } if i == id => Some(result),
                _ => None,
            },
        )
        .await
        .map_err(|e| SignError::Refused(format!("{e:#}")))?;
        let blob = hex::decode(r.map_err(SignError::Refused)?)
            .map_err(|_| SignError::Refused("the agent's signature is not hex".into()))?;
        // The SSH packet carries the signature as a string after the signed
        // data (RFC 4252 §7), as ssh-agent's answer is appended.
        let mut out = to_sign;
        out.extend_from_slice(&(blob.len() as u32).to_be_bytes());
        out.extend_from_slice(&blob);
        Ok(out)
    }
}
