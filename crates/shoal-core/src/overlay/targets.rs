//! The target list (SMON II-C): the machines where peers should run, not the
//! peers alive now. Every peer holds all of it, so a single survivor can
//! redeploy the whole pool; a newer version replaces it whole.
//!
//! Each target names the SSH host key a deployer must see (its OpenSSH
//! SHA-256 fingerprint), so a peer never logs into an impostor and never
//! hands it the package, which carries the overlay key.

use super::version::Version;
use core::net::IpAddr;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// One machine of the pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// Its name in the overlay (unique in the list).
    pub name: String,
    /// Its address: the overlay's pings and SSH both go there.
    pub address: IpAddr,
    /// The SSH port.
    #[serde(default = "default_ssh_port")]
    pub ssh_port: u16,
    /// The SSH user the auth agent's key logs in as.
    #[serde(default = "default_user")]
    pub user: String,
    /// Where shoal is installed on it (versioned directories below).
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// The host key's OpenSSH fingerprint, `SHA256:` and 43 base64 digits
    /// (`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub`).
    pub host_key: String,
    /// The node roles its agent registers with, when the pool has a
    /// manager (`shoal agent --roles`); none by default.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    /// A manager's cluster directory on this host (`shoal init --dir`):
    /// its peer keeps `shoal manager --dir` running there (SMON: the
    /// manager is an application the overlay keeps alive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manager: Option<String>,
}

fn default_ssh_port() -> u16 {
    22
}
fn default_user() -> String {
    "root".into()
}
fn default_prefix() -> String {
    "/opt/shoal".into()
}

/// The default UDP port of the overlay's pings.
pub const DEFAULT_OVERLAY_PORT: u16 = 7946;

/// Why a target list is refused. Nothing is changed by a refused list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// No targets.
    #[error("the target list is empty; list at least one [[target]]")]
    Empty,
    /// Two targets share a name.
    #[error("target name {0:?} appears twice; names must be unique")]
    DuplicateName(String),
    /// Two targets share an address and SSH port.
    #[error("targets {0:?} and {1:?} have the same address and ssh_port")]
    DuplicateAddress(String, String),
    /// A field is malformed.
    #[error("target {name:?}: {what}")]
    Bad {
        /// The target.
        name: String,
        /// What is wrong, and the fix.
        what: String,
    },
}

/// A validated target list with its version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawTargetList", into = "RawTargetList")]
pub struct TargetList {
    version: Version,
    overlay_port: u16,
    targets: Vec<Target>,
    by_name: HashMap<String, usize>,
}

/// The serialised form; [`TargetList`] is built from it through
/// [`TargetList::new`], so a deserialised list is always valid.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTargetList {
    /// Its version.
    pub version: Version,
    /// The UDP port of the overlay on every target.
    #[serde(default = "default_overlay_port")]
    pub overlay_port: u16,
    /// The targets.
    #[serde(rename = "target")]
    pub targets: Vec<Target>,
}

fn default_overlay_port() -> u16 {
    DEFAULT_OVERLAY_PORT
}

impl TryFrom<RawTargetList> for TargetList {
    type Error = TargetError;
    fn try_from(r: RawTargetList) -> Result<Self, TargetError> {
        Self::new(r.version, r.overlay_port, r.targets)
    }
}

impl From<TargetList> for RawTargetList {
    fn from(t: TargetList) -> Self {
        Self {
            version: t.version,
            overlay_port: t.overlay_port,
            targets: t.targets,
        }
    }
}

/// Whether `s` is an OpenSSH SHA-256 fingerprint.
pub fn is_fingerprint(s: &str) -> bool {
    s.strip_prefix("SHA256:").is_some_and(|b| {
        b.len() == 43
            && b.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'+' || c == b'/')
    })
}

impl TargetList {
    /// Validates `targets` as version `version`.
    pub fn new(
        version: Version,
        overlay_port: u16,
        targets: Vec<Target>,
    ) -> Result<Self, TargetError> {
        if targets.is_empty() {
            return Err(TargetError::Empty);
        }
        if overlay_port == 0 {
            return Err(TargetError::Bad {
                name: targets[0].name.clone(),
                what: "overlay_port is 0; leave it out for 7946".into(),
            });
        }
        let mut by_name = HashMap::with_capacity(targets.len());
        let mut by_addr = HashMap::with_capacity(targets.len());
        for (i, t) in targets.iter().enumerate() {
            let bad = |what: String| TargetError::Bad {
                name: t.name.clone(),
                what,
            };
            if t.name.is_empty()
                || t.name.len() > 253
                || !t
                    .name
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c))
            {
                return Err(bad(
                    "a name is 1 to 253 letters, digits, '-', '_' or '.'".into()
                ));
            }
            if t.ssh_port == 0 {
                return Err(bad("ssh_port is 0; leave it out for 22".into()));
            }
            if t.user.is_empty()
                || !t
                    .user
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c))
            {
                return Err(bad(format!("user {:?} is not a login name", t.user)));
            }
            let plain = |p: &str| {
                p.starts_with('/')
                    && !p.contains("/../")
                    && !p.ends_with("/..")
                    && !p.bytes().any(|c| c.is_ascii_control() || c == b' ')
            };
            if !plain(&t.prefix) {
                return Err(bad(format!(
                    "prefix {:?} must be an absolute path without spaces or '..'",
                    t.prefix
                )));
            }
            if let Some(m) = &t.manager
                && !plain(m)
            {
                return Err(bad(format!(
                    "manager {m:?} must be the absolute path of a cluster directory (shoal init --dir), without spaces or '..'"
                )));
            }
            if !is_fingerprint(&t.host_key) {
                return Err(bad(format!(
                    "host_key {:?} is not an OpenSSH SHA-256 fingerprint; \
                     print it with ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub",
                    t.host_key
                )));
            }
            if by_name.insert(t.name.clone(), i).is_some() {
                return Err(TargetError::DuplicateName(t.name.clone()));
            }
            if let Some(j) = by_addr.insert((t.address, t.ssh_port), i) {
                return Err(TargetError::DuplicateAddress(
                    targets[j].name.clone(),
                    t.name.clone(),
                ));
            }
        }
        Ok(Self {
            version,
            overlay_port,
            targets,
            by_name,
        })
    }

    /// Its version.
    pub fn version(&self) -> Version {
        self.version
    }
    /// The overlay's UDP port on every target.
    pub fn overlay_port(&self) -> u16 {
        self.overlay_port
    }
    /// The targets, in the list's order.
    pub fn targets(&self) -> &[Target] {
        &self.targets
    }
    /// How many.
    pub fn len(&self) -> usize {
        self.targets.len()
    }
    /// Never true for a valid list; here for clippy's sake.
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }
    /// The index of the target called `name`.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }
    /// The target at `i`.
    pub fn get(&self, i: usize) -> Option<&Target> {
        self.targets.get(i)
    }
    /// The index of the target at `addr`, the sender of a datagram.
    pub fn index_of_address(&self, addr: IpAddr) -> Option<usize> {
        self.targets.iter().position(|t| t.address == addr)
    }
}
