//! Trust decisions at the edge of the cluster: whether a join token admits a
//! join (kubeadm bootstrap tokens, Consul ACL tokens: an id, an expiry, a use
//! count, the roles it may grant), whether a key may claim a node name,
//! which roles a joined node may register with, when a node rotates its
//! certificate and which of its keys speaks for it, and whether a discovery
//! probe is fresh. The caller hashes, reads files and the clock; every time
//! here is Unix milliseconds passed in.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// A join token as the manager stores it: never the secret, only its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinToken {
    /// Public id (shown by `shoal token list`, given to `revoke`).
    pub id: String,
    /// SHA-256 of the secret, hex.
    pub secret_hash: String,
    /// The key discovery probes are MACed with, derived from the secret
    /// (one-way), hex.
    pub discovery_key: String,
    /// When it was created.
    pub created_ms: u64,
    /// When it stops admitting joins; `None` never (only on request).
    pub expires_ms: Option<u64>,
    /// Joins it still admits; `None` any number.
    pub uses_left: Option<u32>,
    /// Node roles a node joining with it may hold; empty means any.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Revoked by an administrator.
    #[serde(default)]
    pub revoked: bool,
    /// The only node name it admits (a deploy token, minted for one host);
    /// `None`: any name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The node that asked for it (a deploy token: its owner); `None`: an
    /// administrator made it with `shoal token create`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minted_by: Option<String>,
}

impl JoinToken {
    /// Whether it would admit a join at `now_ms` (ignoring roles).
    pub fn usable(&self, now_ms: u64) -> Result<(), JoinRefusal> {
        if self.revoked {
            return Err(JoinRefusal::Revoked(self.id.clone()));
        }
        if let Some(e) = self.expires_ms
            && now_ms >= e
        {
            return Err(JoinRefusal::Expired {
                id: self.id.clone(),
                ago_s: (now_ms - e) / 1000,
            });
        }
        if self.uses_left == Some(0) {
            return Err(JoinRefusal::UsedUp(self.id.clone()));
        }
        Ok(())
    }

    /// A one-word state for listings.
    pub fn state(&self, now_ms: u64) -> &'static str {
        match self.usable(now_ms) {
            Ok(()) => "valid",
            Err(JoinRefusal::Revoked(_)) => "revoked",
            Err(JoinRefusal::Expired { .. }) => "expired",
            Err(JoinRefusal::UsedUp(_)) => "used-up",
            Err(_) => "invalid",
        }
    }
}

/// Why a join token was not accepted. Each message names the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinRefusal {
    /// No token has this id and secret.
    #[error(
        "wrong join token: it is not one of this cluster's; print a valid one with `shoal token create --dir DIR` on the manager's machine"
    )]
    Unknown,
    /// Revoked by an administrator.
    #[error(
        "join token {0} was revoked; create a new one with `shoal token create --dir DIR` on the manager's machine"
    )]
    Revoked(String),
    /// Past its expiry.
    #[error(
        "join token {id} expired {ago_s} s ago; create a new one with `shoal token create --dir DIR [--ttl 24h]`"
    )]
    Expired {
        /// The token.
        id: String,
        /// How long ago.
        ago_s: u64,
    },
    /// Its use count is spent.
    #[error(
        "join token {0} has been used as many times as it allowed; create a new one with `shoal token create --dir DIR [--uses N]`"
    )]
    UsedUp(String),
    /// The token admits one node name and the join asks for another.
    #[error(
        "join token {id} was minted for node {bound:?} only, not {asked:?}: join as {bound:?}, or ask for a token for {asked:?}"
    )]
    Name {
        /// The token.
        id: String,
        /// The name it admits.
        bound: String,
        /// The name asked for.
        asked: String,
    },
    /// The joining node asks for a role the token does not grant.
    #[error(
        "join token {id} does not grant role {role:?} (it grants [{allowed}]); join with --roles among those, or create a token with `shoal token create --roles ...`"
    )]
    Role {
        /// The token.
        id: String,
        /// The role asked for.
        role: String,
        /// What it grants.
        allowed: String,
    },
}

/// Constant-time equality of two strings (hashes, MACs).
pub fn ct_eq(a: &str, b: &str) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.bytes().zip(b.bytes()).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// Admits a join as node `name` presenting the secret whose hash is
/// `secret_hash`, for a node that will hold `roles`: finds the token,
/// checks it, spends one use. Returns the index of the token that admitted
/// it.
pub fn admit_join(
    tokens: &mut [JoinToken],
    secret_hash: &str,
    name: &str,
    roles: &[String],
    now_ms: u64,
) -> Result<usize, JoinRefusal> {
    let i = tokens
        .iter()
        .position(|t| ct_eq(&t.secret_hash, secret_hash))
        .ok_or(JoinRefusal::Unknown)?;
    let t = &mut tokens[i];
    t.usable(now_ms)?;
    if let Some(bound) = &t.name
        && bound != name
    {
        return Err(JoinRefusal::Name {
            id: t.id.clone(),
            bound: bound.clone(),
            asked: name.to_string(),
        });
    }
    if !t.roles.is_empty()
        && let Some(r) = roles.iter().find(|r| !t.roles.contains(r))
    {
        return Err(JoinRefusal::Role {
            id: t.id.clone(),
            role: r.clone(),
            allowed: t.roles.join(", "),
        });
    }
    if let Some(n) = &mut t.uses_left {
        *n -= 1;
    }
    Ok(i)
}

/// The role a node must have been granted at join to mint deploy tokens
/// (a grant of any role includes it).
pub const DEPLOY_ROLE: &str = "overlay";
/// How long a deploy token admits its join: long enough for a copy and a
/// start over a slow link, short enough that a leaked one is soon nothing.
pub const DEPLOY_TOKEN_TTL_MS: u64 = 10 * 60 * 1000;
/// Deploy tokens a node may hold unspent and unexpired at once: more than
/// a peer's concurrent contacts ever need, and a bound on what a node that
/// was taken over can mint.
pub const DEPLOY_TOKENS_OUTSTANDING: usize = 16;

/// A deploy token to create: the caller draws the secret and stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploySpec {
    /// The one name it admits.
    pub name: String,
    /// Its owner.
    pub minted_by: String,
    /// Its expiry.
    pub expires_ms: u64,
    /// What it grants: the minter's own grant (empty: any), never more.
    pub roles: Vec<String>,
}

/// Why a node may not mint a deploy token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeployRefusal {
    /// The node's join did not grant the deploy role.
    #[error(
        "node {0:?} may not mint deploy tokens: its join token did not grant role \"overlay\"; grant it with `shoal node roles {0} --allow ...,overlay`, or join overlay peers with a token made by `shoal token create --roles ...,overlay`"
    )]
    NotDeployer(String),
    /// A node asked for a token for itself.
    #[error("node {0:?} asked for a deploy token for itself; it is already joined")]
    Itself(String),
    /// The host already joined: its identity lives in its agent directory.
    #[error(
        "node {0:?} has already joined; its agent keeps its identity in PREFIX/agent, so a restart needs no token. If the machine was wiped, run `shoal node remove {0}` first"
    )]
    AlreadyJoined(String),
    /// Too many unspent tokens.
    #[error(
        "node {node:?} holds {held} unspent deploy tokens, the most allowed ({max}); they expire within 10 min, or revoke them with `shoal token revoke ID`"
    )]
    TooMany {
        /// The minter.
        node: String,
        /// How many it holds.
        held: usize,
        /// The bound.
        max: usize,
    },
}

/// Whether node `minter`, granted `grant` at join (`None`: any), may mint a
/// single-use token that admits only `name` (already bound to a key:
/// `name_bound`), and what the token is. A deploy token can do no more than
/// its minter: one fresh name, the minter's own roles, ten minutes.
pub fn mint_deploy_token(
    tokens: &[JoinToken],
    minter: &str,
    grant: Option<&[String]>,
    name: &str,
    name_bound: bool,
    now_ms: u64,
) -> Result<DeploySpec, DeployRefusal> {
    if let Some(g) = grant
        && !g.iter().any(|r| r == DEPLOY_ROLE)
    {
        return Err(DeployRefusal::NotDeployer(minter.to_string()));
    }
    if name == minter {
        return Err(DeployRefusal::Itself(name.to_string()));
    }
    if name_bound {
        return Err(DeployRefusal::AlreadyJoined(name.to_string()));
    }
    let held = tokens
        .iter()
        .filter(|t| t.minted_by.as_deref() == Some(minter) && t.usable(now_ms).is_ok())
        .count();
    if held >= DEPLOY_TOKENS_OUTSTANDING {
        return Err(DeployRefusal::TooMany {
            node: minter.to_string(),
            held,
            max: DEPLOY_TOKENS_OUTSTANDING,
        });
    }
    Ok(DeploySpec {
        name: name.to_string(),
        minted_by: minter.to_string(),
        expires_ms: now_ms + DEPLOY_TOKEN_TTL_MS,
        roles: grant.map(|g| g.to_vec()).unwrap_or_default(),
    })
}

/// Deploy tokens no longer worth keeping: spent, revoked or expired more
/// than an hour ago (listed that long so an operator can see what was
/// minted). Administrators' tokens are never pruned.
pub fn prune_deploy_tokens(tokens: &mut Vec<JoinToken>, now_ms: u64) {
    tokens.retain(|t| {
        t.minted_by.is_none()
            || (t.usable(now_ms).is_ok()
                || t.expires_ms.unwrap_or(u64::MAX).saturating_add(3_600_000) > now_ms)
    });
}

/// What the manager knows about a name someone wants to join as.
#[derive(Debug, Clone, Default)]
pub struct NameHolder<'a> {
    /// Registered with a lease that is alive.
    pub alive: bool,
    /// The key fingerprint the name is bound to, if it was ever joined.
    pub bound_key: Option<&'a str>,
}

/// Why a name was not given to a joining key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameRefusal {
    /// A live node holds the name.
    #[error(
        "node {0:?} is registered and alive; join under another --name, or, if this machine replaces it, stop the old one and run `shoal node remove {0}` first"
    )]
    Alive(String),
    /// The name belongs to another key.
    #[error(
        "node name {0:?} belongs to the key that first joined it; join under another --name, or run `shoal node remove {0}` (administrator) to free it"
    )]
    BoundToOtherKey(String),
}

/// Whether the key with fingerprint `key` may take the name `name`.
pub fn admit_name(name: &str, holder: &NameHolder<'_>, key: &str) -> Result<(), NameRefusal> {
    if holder.alive {
        return Err(NameRefusal::Alive(name.to_string()));
    }
    match holder.bound_key {
        Some(k) if !ct_eq(k, key) => Err(NameRefusal::BoundToOtherKey(name.to_string())),
        _ => Ok(()),
    }
}

/// What the manager keeps about a joined node name: the key that holds it,
/// the key it is rotating to, the roles its join granted, and when their
/// certificates expire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeBinding {
    /// Fingerprint of the key that speaks for the node.
    pub key: String,
    /// A key a rotated certificate was issued for, not used yet: it takes
    /// over from `key` at its first request (until then both are accepted,
    /// so an agent that dies mid-rotation keeps its old certificate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_key: Option<String>,
    /// The roles the node may register with; `None`: any (its token granted
    /// any, or it joined before roles were recorded).
    #[serde(default)]
    pub roles: Option<Vec<String>>,
    /// When the certificate of `key` expires, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<u64>,
    /// When the certificate of `next_key` expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_expires_ms: Option<u64>,
}

/// Which of a binding's keys a certificate presents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyMatch {
    /// The current key.
    Current,
    /// The rotated-to key: it becomes the current one, and the old key is
    /// refused from now on.
    Next,
    /// Neither: refuse.
    Other,
}

impl NodeBinding {
    /// A binding made at join.
    pub fn joined(key: &str, roles: Option<Vec<String>>, expires_ms: Option<u64>) -> Self {
        Self {
            key: key.to_string(),
            next_key: None,
            roles,
            expires_ms,
            next_expires_ms: None,
        }
    }

    /// Which key `presented` is.
    pub fn match_key(&self, presented: &str) -> KeyMatch {
        if ct_eq(&self.key, presented) {
            KeyMatch::Current
        } else if self
            .next_key
            .as_deref()
            .is_some_and(|k| ct_eq(k, presented))
        {
            KeyMatch::Next
        } else {
            KeyMatch::Other
        }
    }

    /// The first use of the rotated-to key: it replaces the old one.
    pub fn promote(&mut self) {
        if let Some(k) = self.next_key.take() {
            self.key = k;
            self.expires_ms = self.next_expires_ms.take();
        }
    }
}

/// Why a registration's roles were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "node {node:?} may register only with roles [{granted}] (what its join token granted), not {role:?}: drop {role:?} from the agent's --roles, or have an administrator grant it with `shoal node roles {node} --allow {widened}`, or join the node again with a token that grants it (`shoal node remove {node}`, then `shoal token create --roles {widened}`)"
)]
pub struct RoleRefusal {
    /// The node.
    pub node: String,
    /// The first role it may not hold.
    pub role: String,
    /// What it may hold, comma-separated.
    pub granted: String,
    /// What it may hold plus the role asked for.
    pub widened: String,
}

/// Whether node `name`, granted `granted` at join (`None`: any), may
/// register with `claimed`.
pub fn admit_roles(
    name: &str,
    granted: Option<&[String]>,
    claimed: &[String],
) -> Result<(), RoleRefusal> {
    let Some(granted) = granted else {
        return Ok(());
    };
    match claimed.iter().find(|r| !granted.contains(r)) {
        None => Ok(()),
        Some(role) => {
            let mut widened = granted.to_vec();
            widened.push(role.clone());
            Err(RoleRefusal {
                node: name.to_string(),
                role: role.clone(),
                granted: granted.join(","),
                widened: widened.join(","),
            })
        }
    }
}

/// When a node should ask for a new certificate: at 70 to 90 % of its
/// certificate's lifetime, jittered by `jitter` in [0, 1) so a pool joined
/// at once does not rotate at once (kubelet's client certificate rotation
/// does the same).
pub fn rotation_due_ms(not_before_ms: u64, not_after_ms: u64, jitter: f64) -> u64 {
    let life = not_after_ms.saturating_sub(not_before_ms) as u128;
    let permille = 700 + (200.0 * jitter.clamp(0.0, 1.0)).round() as u128;
    not_before_ms.saturating_add((life * permille / 1000) as u64)
}

/// Why a discovery probe was ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProbeRefusal {
    /// Its timestamp is too far from the manager's clock.
    #[error("probe timestamp outside the accepted window")]
    Stale,
    /// Its nonce was already answered.
    #[error("probe nonce already answered (a replay)")]
    Replayed,
    /// Too many fresh nonces to remember: fail closed.
    #[error("too many probes in the window")]
    Full,
}

/// Refuses discovery probes outside a time window and probes whose nonce
/// was already answered inside it: a captured probe is worth nothing later.
#[derive(Debug)]
pub struct ProbeGuard {
    window_ms: u64,
    capacity: usize,
    seen: HashMap<String, u64>,
}

impl ProbeGuard {
    /// Accepts probes stamped within `window_ms` of now (either way),
    /// remembering at most `capacity` nonces.
    pub fn new(window_ms: u64, capacity: usize) -> Self {
        Self {
            window_ms,
            capacity,
            seen: HashMap::new(),
        }
    }

    /// Checks (and on success records) a MAC-valid probe.
    pub fn check(&mut self, stamp_ms: u64, nonce: &str, now_ms: u64) -> Result<(), ProbeRefusal> {
        if stamp_ms.abs_diff(now_ms) > self.window_ms {
            return Err(ProbeRefusal::Stale);
        }
        if self.seen.contains_key(nonce) {
            return Err(ProbeRefusal::Replayed);
        }
        if self.seen.len() >= self.capacity {
            // A nonce may be forgotten once its probe's stamp has left the
            // window: it would be refused as stale from then on.
            let w = self.window_ms;
            self.seen.retain(|_, s| s.abs_diff(now_ms) <= w);
            if self.seen.len() >= self.capacity {
                return Err(ProbeRefusal::Full);
            }
        }
        self.seen.insert(nonce.to_string(), stamp_ms);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok(id: &str, hash: &str) -> JoinToken {
        JoinToken {
            id: id.into(),
            secret_hash: hash.into(),
            discovery_key: "00".into(),
            created_ms: 0,
            expires_ms: Some(1000),
            uses_left: Some(2),
            roles: vec![],
            revoked: false,
            name: None,
            minted_by: None,
        }
    }

    #[test]
    fn a_token_admits_until_expiry_or_use_count() {
        let mut ts = vec![tok("a", "aa"), tok("b", "bb")];
        assert_eq!(admit_join(&mut ts, "bb", "n", &[], 10), Ok(1));
        assert_eq!(ts[1].uses_left, Some(1));
        assert_eq!(admit_join(&mut ts, "bb", "n", &[], 10), Ok(1));
        assert_eq!(
            admit_join(&mut ts, "bb", "n", &[], 10),
            Err(JoinRefusal::UsedUp("b".into()))
        );
        assert!(matches!(
            admit_join(&mut ts, "aa", "n", &[], 1000),
            Err(JoinRefusal::Expired { .. })
        ));
        assert_eq!(
            admit_join(&mut ts, "cc", "n", &[], 0),
            Err(JoinRefusal::Unknown)
        );
        ts[0].revoked = true;
        assert_eq!(
            admit_join(&mut ts, "aa", "n", &[], 0),
            Err(JoinRefusal::Revoked("a".into()))
        );
        assert_eq!(ts[0].state(0), "revoked");
    }

    #[test]
    fn a_token_grants_only_its_roles() {
        let mut ts = vec![tok("a", "aa")];
        ts[0].roles = vec!["web".into()];
        assert!(admit_join(&mut ts, "aa", "n", &["web".into()], 0).is_ok());
        let e = admit_join(&mut ts, "aa", "n", &["db".into()], 0).unwrap_err();
        assert!(e.to_string().contains("\"db\""), "{e}");
        assert_eq!(ts[0].uses_left, Some(1), "a refused join spends no use");
    }

    #[test]
    fn a_name_is_refused_while_alive_or_bound_to_another_key() {
        let free = NameHolder::default();
        assert!(admit_name("n1", &free, "k1").is_ok());
        let alive = NameHolder {
            alive: true,
            bound_key: Some("k1"),
        };
        assert!(matches!(
            admit_name("n1", &alive, "k1"),
            Err(NameRefusal::Alive(_))
        ));
        let bound = NameHolder {
            alive: false,
            bound_key: Some("k1"),
        };
        assert!(admit_name("n1", &bound, "k1").is_ok());
        assert!(matches!(
            admit_name("n1", &bound, "k2"),
            Err(NameRefusal::BoundToOtherKey(_))
        ));
    }

    #[test]
    fn a_node_registers_only_with_the_roles_its_join_granted() {
        assert!(admit_roles("n1", None, &["db".into()]).is_ok());
        let web = vec!["web".to_string()];
        assert!(admit_roles("n1", Some(&web), &["web".into()]).is_ok());
        assert!(admit_roles("n1", Some(&web), &[]).is_ok());
        let e = admit_roles("n1", Some(&web), &["web".into(), "db".into()]).unwrap_err();
        assert_eq!(e.role, "db");
        let m = e.to_string();
        assert!(m.contains("--allow web,db") && m.contains("[web]"), "{m}");
        assert!(admit_roles("n1", Some(&[]), &["web".into()]).is_err());
    }

    #[test]
    fn a_rotated_key_takes_over_at_its_first_use() {
        let mut b = NodeBinding::joined("k1", None, Some(100));
        assert_eq!(b.match_key("k1"), KeyMatch::Current);
        assert_eq!(b.match_key("k2"), KeyMatch::Other);
        b.next_key = Some("k2".into());
        b.next_expires_ms = Some(200);
        // Both speak for the node until the new one is used...
        assert_eq!(b.match_key("k1"), KeyMatch::Current);
        assert_eq!(b.match_key("k2"), KeyMatch::Next);
        b.promote();
        // ...then only the new one.
        assert_eq!(b.match_key("k2"), KeyMatch::Current);
        assert_eq!(b.match_key("k1"), KeyMatch::Other);
        assert_eq!(b.expires_ms, Some(200));
        assert_eq!(b.next_key, None);
    }

    #[test]
    fn rotation_is_due_between_70_and_90_percent_of_the_lifetime() {
        assert_eq!(rotation_due_ms(1000, 11_000, 0.0), 8000);
        assert_eq!(rotation_due_ms(1000, 11_000, 1.0), 10_000);
        assert_eq!(rotation_due_ms(1000, 11_000, 0.5), 9000);
        // A certificate that makes no sense is due at once.
        assert_eq!(rotation_due_ms(5000, 1000, 0.5), 5000);
    }

    #[test]
    fn probes_outside_the_window_or_replayed_are_refused() {
        let mut g = ProbeGuard::new(30_000, 2);
        assert_eq!(g.check(100_000, "n1", 100_000), Ok(()));
        assert_eq!(g.check(100_000, "n1", 100_001), Err(ProbeRefusal::Replayed));
        assert_eq!(g.check(50_000, "n2", 100_000), Err(ProbeRefusal::Stale));
        assert_eq!(g.check(140_000, "n2", 100_000), Err(ProbeRefusal::Stale));
        assert_eq!(g.check(100_000, "n2", 100_000), Ok(()));
        assert_eq!(g.check(100_000, "n3", 100_000), Err(ProbeRefusal::Full));
        // Once the first two have left the window there is room again, and
        // their nonces are refused as stale rather than remembered.
        assert_eq!(g.check(200_000, "n3", 200_000), Ok(()));
        assert_eq!(g.check(100_000, "n1", 200_000), Err(ProbeRefusal::Stale));
    }

    #[test]
    fn a_deploy_token_admits_one_name_once_with_no_more_than_its_minter() {
        let roles = |v: &[&str]| v.iter().map(|r| r.to_string()).collect::<Vec<_>>();
        let web = roles(&["web", DEPLOY_ROLE]);
        let s = mint_deploy_token(&[], "h1", Some(&web), "h2", false, 100).unwrap();
        assert_eq!(s.name, "h2");
        assert_eq!(s.minted_by, "h1");
        assert_eq!(s.expires_ms, 100 + DEPLOY_TOKEN_TTL_MS);
        assert_eq!(s.roles, web, "the minter's grant, never more");
        assert_eq!(
            mint_deploy_token(&[], "h1", None, "h2", false, 0)
                .unwrap()
                .roles,
            Vec::<String>::new(),
            "a minter granted any role mints a token granting any"
        );
        assert_eq!(
            mint_deploy_token(&[], "h1", Some(&roles(&["web"])), "h2", false, 0),
            Err(DeployRefusal::NotDeployer("h1".into()))
        );
        assert_eq!(
            mint_deploy_token(&[], "h1", None, "h1", false, 0),
            Err(DeployRefusal::Itself("h1".into()))
        );
        assert_eq!(
            mint_deploy_token(&[], "h1", None, "h2", true, 0),
            Err(DeployRefusal::AlreadyJoined("h2".into()))
        );

        // The token made from the spec admits h2 once, and nobody else.
        let mut t = tok("d", "dd");
        t.name = Some(s.name.clone());
        t.minted_by = Some(s.minted_by.clone());
        t.expires_ms = Some(s.expires_ms);
        t.uses_left = Some(1);
        t.roles = s.roles.clone();
        let mut ts = vec![t];
        assert!(matches!(
            admit_join(&mut ts, "dd", "h3", &[], 200),
            Err(JoinRefusal::Name { .. })
        ));
        assert!(matches!(
            admit_join(&mut ts, "dd", "h2", &roles(&["db"]), 200),
            Err(JoinRefusal::Role { .. })
        ));
        assert_eq!(
            admit_join(&mut ts, "dd", "h2", &roles(&["web"]), 200),
            Ok(0)
        );
        assert_eq!(
            admit_join(&mut ts, "dd", "h2", &[], 200),
            Err(JoinRefusal::UsedUp("d".into()))
        );
    }

    #[test]
    fn a_node_holds_a_bounded_number_of_unspent_deploy_tokens() {
        let mut ts = Vec::new();
        for i in 0..DEPLOY_TOKENS_OUTSTANDING {
            let s = mint_deploy_token(&ts, "h1", None, &format!("x{i}"), false, 0).unwrap();
            let mut t = tok(&format!("t{i}"), &format!("{i}"));
            t.name = Some(s.name);
            t.minted_by = Some(s.minted_by);
            t.expires_ms = Some(s.expires_ms);
            t.uses_left = Some(1);
            ts.push(t);
        }
        assert!(matches!(
            mint_deploy_token(&ts, "h1", None, "y", false, 0),
            Err(DeployRefusal::TooMany { held: 16, .. })
        ));
        assert!(
            mint_deploy_token(&ts, "h9", None, "y", false, 0).is_ok(),
            "the bound is per minter"
        );
        // Spending one frees a place; expiry frees them all.
        ts[0].uses_left = Some(0);
        assert!(mint_deploy_token(&ts, "h1", None, "y", false, 0).is_ok());
        let later = DEPLOY_TOKEN_TTL_MS;
        assert!(mint_deploy_token(&ts, "h1", None, "y", false, later).is_ok());

        // Pruned an hour after expiry; an administrator's token never.
        ts.push(tok("admin", "aa"));
        prune_deploy_tokens(&mut ts, later + 3_600_000 - 1);
        assert_eq!(ts.len(), DEPLOY_TOKENS_OUTSTANDING + 1);
        prune_deploy_tokens(&mut ts, later + 3_600_000);
        assert_eq!(ts.len(), 1);
        assert_eq!(ts[0].id, "admin");
    }
}
