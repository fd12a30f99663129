//! Cluster identity: the CA, the manager's and administrator's certificates,
//! the join token, and the node certificates issued at join.
//!
//! The token carries a random secret (256 bits) and the SHA-256 fingerprint
//! of the CA certificate, so a joining node can pin the manager before it
//! trusts anything it says, as kubeadm's discovery-token-ca-cert-hash does.

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shoal_core::trust::JoinToken;
use std::path::{Path, PathBuf};

/// Errors about cluster identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// `init` would overwrite an existing identity.
    #[error(
        "{0} already holds a cluster identity; refusing to overwrite it (pass --force to replace it: every node will have to join again)"
    )]
    Exists(PathBuf),
    /// The directory holds no identity.
    #[error(
        "{0} holds no cluster identity (missing {1}); create one with `shoal init --dir {0}` or point --dir / SHOAL_DIR at an existing cluster directory"
    )]
    Missing(PathBuf, &'static str),
    /// The token is malformed.
    #[error(
        "malformed join token: {0}; a token looks like shoal1.<64 hex>.<64 hex>; print the right one with `shoal token --dir DIR` on the manager's machine"
    )]
    BadToken(String),
    /// Certificate machinery failed.
    #[error("certificate error: {0}")]
    Cert(#[from] rcgen::Error),
    /// A configuration file is invalid.
    #[error("{path}: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

type Result<T> = std::result::Result<T, IdentityError>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads a file, naming it in the error.
pub fn read_file(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(io_err(path))
}

/// Writes a file; private keys get mode 0600.
pub fn write_file(path: &Path, contents: &str, private: bool) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(contents.as_bytes()).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// Opens (creating, mode 0600) a file for locking.
fn private_open(path: &Path) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))
}

/// Makes a directory that holds keys, tokens or secrets mode 0700.
pub fn make_private_dir(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(io_err(path))
}

/// Takes the exclusive lock on `path` (created if missing) without
/// waiting: `None` if another process holds it. The kernel releases it
/// when the holder dies, so a crash never leaves a stale lock: a run lock
/// for "one of this per directory", as the overlay peer, its installer and
/// the manager take.
pub fn try_lock(path: &Path) -> Result<Option<nix::fcntl::Flock<std::fs::File>>> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(Some(l)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(io_err(path)(std::io::Error::from(e))),
    }
}

/// The join token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// 32 random bytes.
    pub secret: [u8; 32],
    /// SHA-256 of the CA certificate (DER).
    pub ca_fingerprint: [u8; 32],
}

impl Token {
    /// A fresh token for the CA with this fingerprint.
    pub fn generate(ca_fingerprint: [u8; 32]) -> Self {
        let mut secret = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut secret);
        Self {
            secret,
            ca_fingerprint,
        }
    }

    /// Parses `shoal1.<secret hex>.<fingerprint hex>`.
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        let mut parts = s.split('.');
        let (Some(v), Some(sec), Some(fp), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(IdentityError::BadToken(
                "expected three dot-separated parts".into(),
            ));
        };
        if v != "shoal1" {
            return Err(IdentityError::BadToken(format!(
                "unknown version prefix {v:?}"
            )));
        }
        let dec = |h: &str, what: &str| -> Result<[u8; 32]> {
            let bytes = hex::decode(h)
                .map_err(|_| IdentityError::BadToken(format!("the {what} is not hex")))?;
            bytes
                .try_into()
                .map_err(|_| IdentityError::BadToken(format!("the {what} must be 64 hex digits")))
        };
        Ok(Self {
            secret: dec(sec, "secret")?,
            ca_fingerprint: dec(fp, "CA fingerprint")?,
        })
    }

    /// SHA-256 of the secret, hex: what the manager stores instead of it.
    pub fn secret_hash(&self) -> String {
        hex::encode(Sha256::digest(self.secret))
    }

    /// The token's public id: the first 16 hex digits of the secret's hash,
    /// so a listing can name it without holding the secret.
    pub fn id(&self) -> String {
        self.secret_hash()[..16].to_string()
    }

    /// The key discovery probes and answers are MACed with, derived one-way
    /// from the secret so the manager never stores the secret itself.
    pub fn discovery_key(&self) -> [u8; 32] {
        use hmac::{Hmac, Mac};
        let mut m =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.secret).expect("HMAC takes any key length");
        m.update(b"shoal discovery v2");
        m.finalize().into_bytes().into()
    }

    /// What the manager keeps of this token.
    pub fn record(
        &self,
        now_ms: u64,
        ttl_ms: Option<u64>,
        uses: Option<u32>,
        roles: Vec<String>,
    ) -> JoinToken {
        JoinToken {
            id: self.id(),
            secret_hash: self.secret_hash(),
            discovery_key: hex::encode(self.discovery_key()),
            created_ms: now_ms,
            expires_ms: ttl_ms.map(|t| now_ms.saturating_add(t)),
            uses_left: uses,
            roles,
            revoked: false,
            name: None,
            minted_by: None,
        }
    }

    /// Constant-time comparison of the secret part.
    pub fn secret_matches(&self, other: &Token) -> bool {
        let mut diff = 0u8;
        for (a, b) in self.secret.iter().zip(other.secret.iter()) {
            diff |= a ^ b;
        }
        diff == 0 && self.ca_fingerprint == other.ca_fingerprint
    }
}

impl std::fmt::Display for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "shoal1.{}.{}",
            hex::encode(self.secret),
            hex::encode(self.ca_fingerprint)
        )
    }
}

/// SHA-256 of a DER certificate.
pub fn fingerprint(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}

/// SHA-256 fingerprint of the first certificate in a PEM text.
pub fn pem_fingerprint(pem: &str) -> Result<[u8; 32]> {
    let der = first_cert_der(pem)?;
    Ok(fingerprint(&der))
}

/// The DER bytes of the first certificate in a PEM text.
pub fn first_cert_der(pem: &str) -> Result<Vec<u8>> {
    use rustls_pki_types::{CertificateDer, pem::PemObject};
    let cert = CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .ok_or(rcgen::Error::CouldNotParseCertificate)?
        .map_err(|_| rcgen::Error::CouldNotParseCertificate)?;
    Ok(cert.to_vec())
}

/// The manager's settings in a cluster directory (`config.toml`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Address the manager listens on.
    pub listen: String,
    /// URL administrators and agents use to reach the manager.
    pub manager_url: String,
    /// Lease duration, seconds.
    pub lease_ttl_secs: f64,
    /// UDP port for multicast discovery.
    pub discovery_port: u16,
    /// The cluster's name among federated clusters (`shoal init --name`);
    /// default: `c` and the first 8 hex digits of the CA's fingerprint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7400".into(),
            manager_url: "https://127.0.0.1:7400".into(),
            lease_ttl_secs: 6.0,
            discovery_port: crate::discovery::DEFAULT_PORT,
            name: None,
        }
    }
}

/// A cluster directory as written by `shoal init`.
#[derive(Debug, Clone)]
pub struct ClusterDir {
    /// Its path.
    pub path: PathBuf,
}

/// File names inside a cluster directory.
pub mod files {
    /// CA certificate.
    pub const CA_CERT: &str = "ca.pem";
    /// CA private key.
    pub const CA_KEY: &str = "ca.key";
    /// Administrator certificate.
    pub const ADMIN_CERT: &str = "admin.pem";
    /// Administrator key.
    pub const ADMIN_KEY: &str = "admin.key";
    /// The join token.
    pub const TOKEN: &str = "token";
    /// Manager settings.
    pub const CONFIG: &str = "config.toml";
    /// The registry database.
    pub const DB: &str = "registry.db";
    /// Join tokens, hashed (`shoal token create|list|revoke`).
    pub const TOKENS: &str = "tokens.json";
    /// Serialises writers of `tokens.json` (the CLI and the manager).
    pub const TOKENS_LOCK: &str = "tokens.lock";
    /// Held by the running manager: one per directory.
    pub const MANAGER_LOCK: &str = "manager.lock";
    /// The output of a manager the overlay started.
    pub const MANAGER_LOG: &str = "manager.log";
}

/// How long the token `init` prints admits joins, as kubeadm's default.
pub const DEFAULT_TOKEN_TTL_MS: u64 = 24 * 3600 * 1000;

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    tokens: Vec<JoinToken>,
}

/// What `init` produced.
#[derive(Debug)]
pub struct InitOutput {
    /// The join token.
    pub token: Token,
    /// The configuration written.
    pub config: ClusterConfig,
}

/// Common name of the administrator identity.
pub const ADMIN_CN: &str = "shoal-admin";
/// Prefix of node identities' common names.
pub const NODE_CN_PREFIX: &str = "node:";
/// Prefix of a federated peer cluster's common name (`federation:<cluster>`)
/// on the client certificate this cluster's CA issued it.
pub const FEDERATION_CN_PREFIX: &str = "federation:";
/// Prefix of dispatcher identities' common names (`dispatcher:<service>`).
pub const DISPATCHER_CN_PREFIX: &str = "dispatcher:";
/// Files of a dispatcher's directory (`shoal cert dispatcher --out DIR`).
pub mod dispatcher_files {
    /// The dispatcher's certificate.
    pub const CERT: &str = "dispatcher.pem";
    /// Its key.
    pub const KEY: &str = "dispatcher.key";
}

fn validity(params: &mut CertificateParams, days: i64) {
    lifetime(params, std::time::Duration::from_secs(days as u64 * 86_400));
}

/// Valid from a little before now (an hour, or a tenth of a short
/// lifetime, for clocks that lag the CA's) until `life` from now.
fn lifetime(params: &mut CertificateParams, life: std::time::Duration) {
    let now = time::OffsetDateTime::now_utc();
    let back = (life / 10).min(std::time::Duration::from_secs(3600));
    params.not_before = now - back;
    params.not_after = now + life;
}

/// How long a node certificate lives unless the manager is told otherwise
/// (`shoal manager --node-cert-ttl`); agents rotate theirs at 70-90 % of it.
pub const DEFAULT_NODE_CERT_TTL: std::time::Duration = std::time::Duration::from_secs(90 * 86_400);

/// The validity of the first certificate in a PEM text, as Unix
/// milliseconds (not before, not after).
pub fn cert_validity_ms(pem: &str) -> Option<(u64, u64)> {
    let der = first_cert_der(pem).ok()?;
    let (_, x) = x509_parser::parse_x509_certificate(&der).ok()?;
    let ms = |t: x509_parser::time::ASN1Time| (t.timestamp().max(0) as u64).saturating_mul(1000);
    Some((ms(x.validity().not_before), ms(x.validity().not_after)))
}

fn dn(cn: &str) -> DistinguishedName {
    let mut d = DistinguishedName::new();
    d.push(DnType::OrganizationName, "shoal");
    d.push(DnType::CommonName, cn);
    d
}

impl ClusterDir {
    /// A handle on `path` (nothing is read yet).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Path of the registry database.
    pub fn db_path(&self) -> PathBuf {
        self.file(files::DB)
    }

    /// Creates a new cluster identity.
    pub fn init(&self, config: ClusterConfig, force: bool) -> Result<InitOutput> {
        if self.file(files::CA_KEY).exists() && !force {
            return Err(IdentityError::Exists(self.path.clone()));
        }
        std::fs::create_dir_all(&self.path).map_err(io_err(&self.path))?;
        make_private_dir(&self.path)?;
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::default();
        ca.distinguished_name = dn("shoal cluster CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut ca, 3650);
        let ca_cert = ca.self_signed(&ca_key)?;

        let admin_key = KeyPair::generate()?;
        let mut admin = CertificateParams::default();
        admin.distinguished_name = dn(ADMIN_CN);
        admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        validity(&mut admin, 825);
        let admin_cert = admin.signed_by(&admin_key, &ca_cert, &ca_key)?;

        let token = Token::generate(fingerprint(ca_cert.der()));
        if force {
            let _ = std::fs::remove_file(self.file(files::TOKENS));
        }
        self.update_tokens(|ts| {
            ts.clear();
            ts.push(token.record(
                crate::wire::unix_ms(),
                Some(DEFAULT_TOKEN_TTL_MS),
                None,
                Vec::new(),
            ));
        })?;
        write_file(&self.file(files::CA_CERT), &ca_cert.pem(), false)?;
        write_file(&self.file(files::CA_KEY), &ca_key.serialize_pem(), true)?;
        write_file(&self.file(files::ADMIN_CERT), &admin_cert.pem(), false)?;
        write_file(
            &self.file(files::ADMIN_KEY),
            &admin_key.serialize_pem(),
            true,
        )?;
        write_file(&self.file(files::TOKEN), &format!("{token}\n"), true)?;
        self.write_config(&config)?;
        if force {
            // A new CA invalidates every node certificate, and the registry
            // of the old cluster would only hold nodes that cannot renew.
            let _ = std::fs::remove_file(self.db_path());
        }
        Ok(InitOutput { token, config })
    }

    /// Writes `config.toml`.
    pub fn write_config(&self, config: &ClusterConfig) -> Result<()> {
        let text = toml::to_string_pretty(config).map_err(|e| IdentityError::Config {
            path: self.file(files::CONFIG),
            message: e.to_string(),
        })?;
        write_file(&self.file(files::CONFIG), &text, false)
    }

    /// Reads `config.toml`, refusing keys that do not exist.
    pub fn config(&self) -> Result<ClusterConfig> {
        let path = self.file(files::CONFIG);
        if !path.exists() {
            return Err(IdentityError::Missing(self.path.clone(), files::CONFIG));
        }
        let text = read_file(&path)?;
        toml::from_str(&text).map_err(|e| IdentityError::Config {
            path,
            message: format!(
                "{}; valid keys are listen, manager_url, lease_ttl_secs, discovery_port",
                e.message()
            ),
        })
    }

    fn need(&self, name: &'static str) -> Result<String> {
        let p = self.file(name);
        if !p.exists() {
            return Err(IdentityError::Missing(self.path.clone(), name));
        }
        read_file(&p)
    }

    /// The join token.
    pub fn token(&self) -> Result<Token> {
        Token::parse(&self.need(files::TOKEN)?)
    }

    /// Reads, changes and writes the join tokens under an exclusive lock, so
    /// the CLI and a running manager (which spends uses) never lose each
    /// other's writes. A directory from before tokens were stored hashed
    /// gets its one token imported, expiring in 24 h.
    pub fn update_tokens<R>(&self, f: impl FnOnce(&mut Vec<JoinToken>) -> R) -> Result<R> {
        let lock_path = self.file(files::TOKENS_LOCK);
        let lock = private_open(&lock_path)?;
        lock.lock().map_err(io_err(&lock_path))?;
        let path = self.file(files::TOKENS);
        let mut file = if path.exists() {
            let text = read_file(&path)?;
            serde_json::from_str::<TokenFile>(&text).map_err(|e| IdentityError::Config {
                path: path.clone(),
                message: format!(
                    "{e}; restore it from a backup or create a new token with `shoal token create`"
                ),
            })?
        } else {
            let mut f = TokenFile::default();
            let legacy = self.file(files::TOKEN);
            if legacy.exists()
                && let Ok(t) = Token::parse(&read_file(&legacy)?)
            {
                f.tokens.push(t.record(
                    crate::wire::unix_ms(),
                    Some(DEFAULT_TOKEN_TTL_MS),
                    None,
                    Vec::new(),
                ));
            }
            f
        };
        let before = file.tokens.clone();
        let r = f(&mut file.tokens);
        if file.tokens != before || !path.exists() {
            let text = serde_json::to_string_pretty(&file).expect("tokens serialize");
            write_file(&path, &text, true)?;
        }
        Ok(r)
    }

    /// The join tokens (a copy).
    pub fn tokens(&self) -> Result<Vec<JoinToken>> {
        self.update_tokens(|ts| ts.clone())
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> Result<String> {
        self.need(files::CA_CERT)
    }

    /// The administrator certificate and key, PEM.
    pub fn admin_identity(&self) -> Result<(String, String)> {
        Ok((self.need(files::ADMIN_CERT)?, self.need(files::ADMIN_KEY)?))
    }

    /// The client identity this directory holds: the administrator's in a
    /// cluster directory, else a dispatcher's (written by `shoal cert
    /// dispatcher`).
    pub fn client_identity(&self) -> Result<(String, String)> {
        if self.file(files::ADMIN_KEY).exists() || !self.file(dispatcher_files::KEY).exists() {
            return self.admin_identity();
        }
        Ok((
            self.need(dispatcher_files::CERT)?,
            self.need(dispatcher_files::KEY)?,
        ))
    }

    /// Loads the CA for signing.
    pub fn ca(&self) -> Result<CertAuthority> {
        let cert_pem = self.need(files::CA_CERT)?;
        let key_pem = self.need(files::CA_KEY)?;
        CertAuthority::from_pem(&cert_pem, &key_pem)
    }
}

/// The cluster CA, loaded for signing.
pub struct CertAuthority {
    cert: rcgen::Certificate,
    key: KeyPair,
    /// The CA certificate as written on disk (its fingerprint is in the token).
    pub pem: String,
}

impl CertAuthority {
    /// Loads a CA from its certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self> {
        let key = KeyPair::from_pem(key_pem)?;
        let params = CertificateParams::from_ca_cert_pem(cert_pem)?;
        // Re-signing the same parameters with the same key yields a
        // certificate with the same subject and key: what issuing needs.
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert,
            key,
            pem: cert_pem.to_string(),
        })
    }

    /// A server certificate for the manager, valid for these names/IPs.
    /// Generated at every start so it covers the addresses the manager
    /// actually listens on. Returns (cert PEM, key PEM).
    pub fn issue_server(&self, names: &[String]) -> Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        p.distinguished_name = dn("shoal-manager");
        p.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName(n.as_str().try_into()?)),
            })
            .collect::<std::result::Result<_, rcgen::Error>>()?;
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        validity(&mut p, 825);
        let cert = p.signed_by(&key, &self.cert, &self.key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A client certificate and a fresh key for `cn` (a dispatcher's:
    /// `dispatcher:<service>`), good for client authentication only.
    /// Returns (cert PEM, key PEM).
    pub fn issue_client(&self, cn: &str, life: std::time::Duration) -> Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        p.distinguished_name = dn(cn);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        lifetime(&mut p, life);
        let cert = p.signed_by(&key, &self.cert, &self.key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Signs a node's CSR, valid for `life`. The request's own subject and
    /// extensions are ignored: the certificate names exactly `node:<name>`
    /// and is good for client authentication only, so a node can never pose
    /// as the manager.
    pub fn issue_node(
        &self,
        name: &str,
        csr_pem: &str,
        life: std::time::Duration,
    ) -> Result<String> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        let mut p = CertificateParams::default();
        p.distinguished_name = dn(&format!("{NODE_CN_PREFIX}{name}"));
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        lifetime(&mut p, life);
        let cert = p.signed_by(&csr.public_key, &self.cert, &self.key)?;
        Ok(cert.pem())
    }
}

/// A fresh key and a CSR for it. Returns (key PEM, CSR PEM).
pub fn node_key_and_csr(name: &str) -> Result<(String, String)> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::default();
    p.distinguished_name = dn(&format!("{NODE_CN_PREFIX}{name}"));
    let csr = p.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// Checks a node name: what goes into certificates, paths and URLs.
pub fn validate_node_name(name: &str) -> std::result::Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid node name {name:?}: use 1-63 characters from a-z, A-Z, 0-9, '-', '_', '.' (not starting with '.')"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trips_and_rejects_garbage() {
        let t = Token::generate([7; 32]);
        let s = t.to_string();
        assert!(s.starts_with("shoal1."));
        assert_eq!(Token::parse(&s).unwrap(), t);
        assert!(Token::parse("shoal1.zz.zz").is_err());
        assert!(Token::parse("nope").is_err());
        assert!(Token::parse(&s.replace("shoal1", "shoal2")).is_err());
        let other = Token::generate([7; 32]);
        assert!(!t.secret_matches(&other));
        assert!(t.secret_matches(&t.clone()));
    }

    #[test]
    fn init_refuses_overwrite_and_issues_node_certs() {
        let dir = tempfile::tempdir().unwrap();
        let cd = ClusterDir::new(dir.path().join("c"));
        let out = cd.init(ClusterConfig::default(), false).unwrap();
        assert!(matches!(
            cd.init(ClusterConfig::default(), false),
            Err(IdentityError::Exists(_))
        ));
        assert_eq!(cd.token().unwrap(), out.token);
        let ca = cd.ca().unwrap();
        assert_eq!(
            pem_fingerprint(&ca.pem).unwrap(),
            out.token.ca_fingerprint,
            "the token pins the CA on disk"
        );
        let (_key, csr) = node_key_and_csr("n1").unwrap();
        let cert = ca
            .issue_node("n1", &csr, std::time::Duration::from_secs(60))
            .unwrap();
        let (nb, na) = cert_validity_ms(&cert).unwrap();
        let now = crate::wire::unix_ms();
        assert!(na > now + 50_000 && na <= now + 61_000, "{na} vs {now}");
        assert!(
            nb >= now - 7_000 && nb < now,
            "a short life is back-dated a tenth"
        );
        let der = first_cert_der(&cert).unwrap();
        let (_, x) = x509_parser::parse_x509_certificate(&der).unwrap();
        let cn = x.subject().iter_common_name().next().unwrap();
        assert_eq!(cn.as_str().unwrap(), "node:n1");
        // A forced re-init makes a different CA and token.
        let again = cd.init(ClusterConfig::default(), true).unwrap();
        assert_ne!(again.token, out.token);
    }

    #[test]
    fn config_rejects_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let cd = ClusterDir::new(dir.path());
        cd.init(ClusterConfig::default(), false).unwrap();
        std::fs::write(
            dir.path().join("config.toml"),
            "listen = \"x\"\nbogus = 1\n",
        )
        .unwrap();
        let err = cd.config().unwrap_err().to_string();
        assert!(err.contains("bogus"), "{err}");
    }

    #[test]
    fn node_names_are_checked() {
        assert!(validate_node_name("node-1.a").is_ok());
        assert!(validate_node_name("").is_err());
        assert!(validate_node_name("a/b").is_err());
        assert!(validate_node_name(".x").is_err());
    }
}
