//! The manager's side of trust: which join token admits a join, which key
//! holds which node name, and whether a node certificate still speaks for a
//! node. The decisions are `shoal_core::trust`'s; this module holds the
//! token file, the bindings (durable, in the store) and the clock.

use shoal_core::trust::{JoinRefusal, JoinToken, admit_join};
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
    keys: Mutex<HashMap<String, String>>,
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
    #[error("this certificate's key is not the one node {0:?} is bound to; it was revoked")]
    OtherKey(String),
}

impl Trust {
    /// Loads the bindings from the store; `registered` are the nodes the
    /// registry holds.
    pub fn open(
        dir: ClusterDir,
        store: Arc<dyn Store>,
        registered: impl IntoIterator<Item = String>,
    ) -> anyhow::Result<Self> {
        let keys: HashMap<String, String> = store.docs(KEY_DOC)?.into_iter().collect();
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
            revoked: Mutex::new(revoked),
            unbound: Mutex::new(unbound),
        })
    }

    fn keys(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks a token for a join with `roles`; with `spend`, takes one use.
    /// Returns the token's id.
    pub fn admit_token(
        &self,
        token: &Token,
        roles: &[String],
        spend: bool,
    ) -> anyhow::Result<Result<String, JoinRefusal>> {
        let now = shoal_net::wire::unix_ms();
        let hash = token.secret_hash();
        Ok(self.dir.update_tokens(|ts| {
            let r = if spend {
                admit_join(ts, &hash, roles, now)
            } else {
                admit_join(&mut ts.clone(), &hash, roles, now)
            };
            r.map(|i| ts[i].id.clone())
        })?)
    }

    /// Discovery keys of the tokens that admit joins now, by token id.
    pub fn discovery_key(&self, id: &str) -> Option<[u8; 32]> {
        let now = shoal_net::wire::unix_ms();
        let ts: Vec<JoinToken> = self.dir.tokens().ok()?;
        let t = ts.iter().find(|t| t.id == id && t.usable(now).is_ok())?;
        hex::decode(&t.discovery_key).ok()?.try_into().ok()
    }

    /// The key fingerprint a name is bound to.
    pub fn key_of(&self, name: &str) -> Option<String> {
        self.keys().get(name).cloned()
    }

    /// Binds a name to a key, durably.
    pub fn bind(&self, name: &str, key: &str) -> Result<(), shoal_store::StoreError> {
        self.store.put_doc(KEY_DOC, name, key)?;
        self.keys().insert(name.to_string(), key.to_string());
        Ok(())
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
    /// to this certificate's key (a node registered before bindings is
    /// bound to the first key it presents).
    pub fn check_node(&self, peer: &Peer, name: &str) -> Result<(), CertRefusal> {
        let Some(presented) = peer.key_fp.as_deref() else {
            return Err(CertRefusal::OtherKey(name.to_string()));
        };
        match self.key_of(name) {
            Some(k) if shoal_core::trust::ct_eq(&k, presented) => Ok(()),
            Some(_) => Err(CertRefusal::OtherKey(name.to_string())),
            None => {
                let legacy = self
                    .unbound
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(name);
                if !legacy {
                    return Err(CertRefusal::Removed(name.to_string()));
                }
                let _ = self.bind(name, presented);
                Ok(())
            }
        }
    }
}
