//! The manager's side of trust: which join token admits a join, which key
//! holds which node name (and which it is rotating to), which roles a node
//! may register with, and whether a node certificate still speaks for a
//! node. The decisions are `shoal_core::trust`'s; this module holds the
//! token file, the bindings (durable, in the store) and the clock.

use shoal_core::trust::{
    DeployRefusal, JoinRefusal, JoinToken, KeyMatch, NodeBinding, admit_join, mint_deploy_token,
    prune_deploy_tokens,
};
use shoal_net::identity::{ClusterDir, Token};
use shoal_net::server::Peer;
use shoal_store::Store;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Store document kind of name-to-key bindings.
const KEY_DOC: &str = "node-key";
/// Store document kind of revoked certificate keys.
const REVOKED_DOC: &str = "revoked-key";

/// Join tokens, and node names bound to keys.
pub struct Trust {
    dir: ClusterDir,
    store: Arc<dyn Store>,
    keys: Mutex<HashMap<String, NodeBinding>>,
    /// tokens.json as last read, and the file's identity then: discovery
    /// probes (which anyone on the LAN can send) and joins read it from
    /// memory while the file is unchanged.
    tokens: Mutex<Option<(FileStamp, Vec<JoinToken>)>>,
    revoked: Mutex<std::collections::HashSet<String>>,
    /// Nodes registered before names were bound to keys: each is bound to
    /// the key it presents first.
    unbound: Mutex<std::collections::HashSet<String>>,
}

/// Why a node certificate was refused.
#[derive(Debug, thiserror::Error)]
pub enum CertRefusal {
    /// The node was removed: its certificate no longer speaks for it.
    #[error(
        "the certificate of node {0:?} was revoked (the node was removed by an administrator); delete the agent's directory and join again with a token"
    )]
    Removed(String),
    /// Another key holds the name.
    #[error(
        "this certificate's key is not the one node {0:?} is bound to: it was replaced by a rotated certificate (the agent's directory holds the current one) or revoked; if this agent did not rotate it, another holder of its key did: run `shoal node remove {0}` and join the machine again"
    )]
    OtherKey(String),
}

/// A token that admits a join: its id, and the roles it grants (`None`:
/// any).
pub type Admitted = (String, Option<Vec<String>>);

/// What identifies one version of a file: a rewrite (write and rename)
/// changes its inode, and an edit in place its length or mtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

fn stamp(path: &std::path::Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        ino: m.ino(),
        len: m.len(),
        mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
    })
}

/// A binding as stored: JSON, or (written before roles and rotation were
/// recorded) the bare key fingerprint.
fn parse_binding(stored: &str) -> Option<NodeBinding> {
    if stored.starts_with('{') {
        serde_json::from_str(stored).ok()
    } else {
        Some(NodeBinding::joined(stored, None, None))
    }
}

impl Trust {
    /// Loads the bindings from the store; `registered` are the nodes the
    /// registry holds.
    pub fn open(
        dir: ClusterDir,
        store: Arc<dyn Store>,
        registered: impl IntoIterator<Item = String>,
    ) -> anyhow::Result<Self> {
        let keys: HashMap<String, NodeBinding> = store
            .docs(KEY_DOC)?
            .into_iter()
            .filter_map(|(n, v)| {
                let b = parse_binding(&v);
                if b.is_none() {
                    tracing::warn!("node {n:?}: unreadable key binding {v:?}; it must join again");
                }
                Some((n, b?))
            })
            .collect();
        let unbound = registered
            .into_iter()
            .filter(|n| !keys.contains_key(n))
            .collect();
        let revoked = store
            .docs(REVOKED_DOC)?
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        Ok(Self {
            dir,
            store,
            keys: Mutex::new(keys),
            tokens: Mutex::new(None),
            revoked: Mutex::new(revoked),
            unbound: Mutex::new(unbound),
        })
    }

    fn keys(&self) -> std::sync::MutexGuard<'_, HashMap<String, NodeBinding>> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The join tokens, from memory while tokens.json is unchanged.
    fn cached_tokens(&self) -> anyhow::Result<Vec<JoinToken>> {
        let path = self.dir.path.join(shoal_net::identity::files::TOKENS);
        let mut cache = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        let now = stamp(&path);
        if let (Some(now), Some((was, ts))) = (now, cache.as_ref())
            && now == *was
        {
            return Ok(ts.clone());
        }
        // Stamped before reading: a write in between only costs a re-read.
        let ts = self.dir.tokens()?;
        if let Some(s) = now.or_else(|| stamp(&path)) {
            *cache = Some((s, ts.clone()));
        }
        Ok(ts)
    }

    /// Checks a token for a join with `roles`; with `spend`, takes one use
    /// (under the file's lock: the CLI writes it too). Returns the token's
    /// id and the roles it grants (`None`: any).
    pub fn admit_token(
        &self,
        token: &Token,
        name: &str,
        roles: &[String],
        spend: bool,
    ) -> anyhow::Result<Result<Admitted, JoinRefusal>> {
        let now = shoal_net::wire::unix_ms();
        let hash = token.secret_hash();
        let grant = |t: &JoinToken| (t.id.clone(), (!t.roles.is_empty()).then(|| t.roles.clone()));
        if !spend {
            let mut ts = self.cached_tokens()?;
            return Ok(admit_join(&mut ts, &hash, name, roles, now).map(|i| grant(&ts[i])));
        }
        Ok(self
            .dir
            .update_tokens(|ts| admit_join(ts, &hash, name, roles, now).map(|i| grant(&ts[i])))?)
    }

    /// Mints a deploy token: for node `minter` (already authenticated), a
    /// single-use token admitting only `name`, as
    /// [`shoal_core::trust::mint_deploy_token`] allows. Returns the token
    /// and its record.
    pub fn mint_deploy(
        &self,
        minter: &str,
        name: &str,
    ) -> anyhow::Result<Result<(Token, JoinToken), DeployRefusal>> {
        let now = shoal_net::wire::unix_ms();
        let grant = self.granted_roles(minter);
        let bound = self.keys().contains_key(name);
        let fp = shoal_net::identity::pem_fingerprint(&self.dir.ca_pem()?)?;
        Ok(self.dir.update_tokens(|ts| {
            prune_deploy_tokens(ts, now);
            let spec = mint_deploy_token(ts, minter, grant.as_deref(), name, bound, now)?;
            let t = Token::generate(fp);
            let mut rec = t.record(now, Some(spec.expires_ms - now), Some(1), spec.roles);
            rec.name = Some(spec.name);
            rec.minted_by = Some(spec.minted_by);
            ts.push(rec.clone());
            Ok((t, rec))
        })?)
    }

    /// Discovery keys of the tokens that admit joins now, by token id.
    pub fn discovery_key(&self, id: &str) -> Option<[u8; 32]> {
        let now = shoal_net::wire::unix_ms();
        let ts = self.cached_tokens().ok()?;
        let t = ts.iter().find(|t| t.id == id && t.usable(now).is_ok())?;
        hex::decode(&t.discovery_key).ok()?.try_into().ok()
    }

    /// The key fingerprint a name is bound to.
    pub fn key_of(&self, name: &str) -> Option<String> {
        self.keys().get(name).map(|b| b.key.clone())
    }

    /// Every binding, by node name.
    pub fn bindings(&self) -> Vec<(String, NodeBinding)> {
        let mut v: Vec<_> = self
            .keys()
            .iter()
            .map(|(n, b)| (n.clone(), b.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// The roles node `name` may register with (`None`: any).
    pub fn granted_roles(&self, name: &str) -> Option<Vec<String>> {
        self.keys().get(name).and_then(|b| b.roles.clone())
    }

    fn put(&self, name: &str, b: NodeBinding) -> Result<(), shoal_store::StoreError> {
        let text = serde_json::to_string(&b).expect("a binding serializes");
        self.store.put_doc(KEY_DOC, name, &text)?;
        self.keys().insert(name.to_string(), b);
        Ok(())
    }

    /// Binds a name to the key that joined it, with the roles its token
    /// granted, durably.
    pub fn bind(
        &self,
        name: &str,
        key: &str,
        roles: Option<Vec<String>>,
        expires_ms: Option<u64>,
    ) -> Result<(), shoal_store::StoreError> {
        self.put(name, NodeBinding::joined(key, roles, expires_ms))
    }

    /// Records the key of a rotated certificate: it takes over at its first
    /// use. Returns false when the name is not bound.
    pub fn rotate_to(
        &self,
        name: &str,
        key: &str,
        expires_ms: Option<u64>,
    ) -> Result<bool, shoal_store::StoreError> {
        let Some(mut b) = self.keys().get(name).cloned() else {
            return Ok(false);
        };
        b.next_key = Some(key.to_string());
        b.next_expires_ms = expires_ms;
        self.put(name, b)?;
        Ok(true)
    }

    /// Sets the roles node `name` may register with (`None`: any). Returns
    /// false when the name is not bound.
    pub fn set_roles(
        &self,
        name: &str,
        roles: Option<Vec<String>>,
    ) -> Result<bool, shoal_store::StoreError> {
        let Some(mut b) = self.keys().get(name).cloned() else {
            return Ok(false);
        };
        b.roles = roles;
        self.put(name, b)?;
        Ok(true)
    }

    /// Frees a name: the certificate that held it is refused from now on.
    pub fn unbind(&self, name: &str) -> Result<(), shoal_store::StoreError> {
        self.unbound
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        self.store.delete_doc(KEY_DOC, name)?;
        self.keys().remove(name);
        Ok(())
    }

    /// Whether the name is bound to a key, or awaits its first (a node
    /// from before bindings).
    pub fn is_held(&self, name: &str) -> bool {
        self.keys().contains_key(name)
            || self
                .unbound
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(name)
    }

    /// Whether the certificate with this key fingerprint was revoked.
    pub fn is_revoked(&self, key: &str) -> bool {
        self.revoked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(key)
    }

    /// Puts a certificate key on the deny list, durably.
    pub fn revoke_key(&self, key: &str) -> Result<(), shoal_store::StoreError> {
        self.store
            .put_doc(REVOKED_DOC, key, &shoal_net::wire::unix_ms().to_string())?;
        self.revoked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_string());
        Ok(())
    }

    /// Whether a node's certificate still speaks for it: the name is bound
    /// to this certificate's key, or to a rotated certificate's key that
    /// takes over now (a node registered before bindings is bound to the
    /// first key it presents). Returns whether a rotation took over.
    pub fn check_node(&self, peer: &Peer, name: &str) -> Result<bool, CertRefusal> {
        let Some(presented) = peer.key_fp.as_deref() else {
            return Err(CertRefusal::OtherKey(name.to_string()));
        };
        let bound = self.keys().get(name).cloned();
        match bound.as_ref().map(|b| b.match_key(presented)) {
            Some(KeyMatch::Current) => Ok(false),
            Some(KeyMatch::Next) => {
                let mut b = bound.expect("matched");
                b.promote();
                // Not durable (a store error) means the old key stays
                // accepted a while longer: the next request promotes again.
                if let Err(e) = self.put(name, b) {
                    tracing::warn!("node {name}: cannot record its rotated certificate: {e}");
                }
                Ok(true)
            }
            Some(KeyMatch::Other) => Err(CertRefusal::OtherKey(name.to_string())),
            None => {
                let legacy = self
                    .unbound
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(name);
                if !legacy {
                    return Err(CertRefusal::Removed(name.to_string()));
                }
                let _ = self.bind(name, presented, None, None);
                Ok(false)
            }
        }
    }
}
