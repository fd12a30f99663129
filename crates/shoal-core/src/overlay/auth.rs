//! The auth agent's policy (SMON II-B, Fig. 3, made stricter): what it
//! signs. A peer logging into a target over SSH-2 asks the agent to sign its
//! user-authentication request (RFC 4252 §7: the session identifier, then
//! the `publickey` request); the key never leaves the agent. The agent signs
//! only a well-formed request, for its own key, for a host of its current
//! target list and that host's SSH user, within a rate limit. Sealing with
//! the overlay key (checked by the shell) is the peer's proof of membership.

use super::peer::Millis;
use super::targets::TargetList;

/// The fields of a `publickey` user-authentication request to be signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthRequest<'a> {
    /// The SSH session identifier (the key exchange's first hash).
    pub session_id: &'a [u8],
    /// The user the peer logs in as.
    pub user: &'a str,
    /// The public key algorithm named in the request.
    pub algorithm: &'a str,
    /// The public key blob named in the request.
    pub key_blob: &'a [u8],
}

/// Why the agent did not sign. Each says what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not an SSH `publickey` user-authentication request.
    #[error("not an SSH publickey user-authentication request: {0}")]
    Malformed(&'static str),
    /// It names another key than the agent's.
    #[error("the request names another public key than this agent's")]
    OtherKey,
    /// The host is not in the agent's target list.
    #[error(
        "{0:?} is not in the auth agent's target list (version {1}); hand it a newer list with `shoal overlay targets set`"
    )]
    NotListed(String, String),
    /// The user is not the target's.
    #[error("target {target:?} logs in as {want:?}, not {got:?}")]
    WrongUser {
        /// The target.
        target: String,
        /// Its listed user.
        want: String,
        /// The requested user.
        got: String,
    },
    /// The peer saw another host key than the list's.
    #[error("target {0:?}: the peer saw another host key than the listed one")]
    WrongHostKey(String),
    /// Over the rate limit.
    #[error("over the rate limit of {0} signatures per second; try later")]
    RateLimited(u32),
}

fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if b.len() < n {
        return None;
    }
    let (h, t) = b.split_at(n);
    *b = t;
    Some(h)
}

fn string<'a>(b: &mut &'a [u8]) -> Option<&'a [u8]> {
    let n = take(b, 4)?;
    let n = u32::from_be_bytes([n[0], n[1], n[2], n[3]]) as usize;
    take(b, n)
}

/// Parses the data a client signs for `publickey` authentication.
pub fn parse_auth_request(data: &[u8]) -> Result<AuthRequest<'_>, Refusal> {
    let mut b = data;
    let session_id = string(&mut b).ok_or(Refusal::Malformed("no session identifier"))?;
    if session_id.is_empty() || session_id.len() > 64 {
        return Err(Refusal::Malformed("bad session identifier length"));
    }
    if take(&mut b, 1) != Some(&[50][..]) {
        return Err(Refusal::Malformed("not SSH_MSG_USERAUTH_REQUEST"));
    }
    let user = string(&mut b).ok_or(Refusal::Malformed("no user"))?;
    let user = core::str::from_utf8(user).map_err(|_| Refusal::Malformed("user is not UTF-8"))?;
    if string(&mut b) != Some(&b"ssh-connection"[..]) {
        return Err(Refusal::Malformed("service is not ssh-connection"));
    }
    if string(&mut b) != Some(&b"publickey"[..]) {
        return Err(Refusal::Malformed("method is not publickey"));
    }
    if take(&mut b, 1) != Some(&[1][..]) {
        return Err(Refusal::Malformed("not a signed request"));
    }
    let algorithm = string(&mut b).ok_or(Refusal::Malformed("no algorithm"))?;
    let algorithm = core::str::from_utf8(algorithm)
        .map_err(|_| Refusal::Malformed("algorithm is not UTF-8"))?;
    let key_blob = string(&mut b).ok_or(Refusal::Malformed("no public key"))?;
    if !b.is_empty() {
        return Err(Refusal::Malformed("trailing bytes"));
    }
    Ok(AuthRequest {
        session_id,
        user,
        algorithm,
        key_blob,
    })
}

/// The agent's policy: its key, the rate limit (a token bucket).
#[derive(Debug, Clone)]
pub struct SignPolicy {
    key_blob: Vec<u8>,
    rate: u32,
    burst: u32,
    tokens_milli: u64,
    last_ms: Millis,
}

impl SignPolicy {
    /// A policy for the key `key_blob` (its SSH wire encoding), signing at
    /// most `rate` per second on average and `burst` at once.
    pub fn new(key_blob: Vec<u8>, rate: u32, burst: u32, now: Millis) -> Self {
        let burst = burst.max(1);
        Self {
            key_blob,
            rate: rate.max(1),
            burst,
            tokens_milli: u64::from(burst) * 1000,
            last_ms: now,
        }
    }

    /// Judges one request: `target` is the host the peer says it logs into
    /// and `host_key_seen` the fingerprint it saw there. On `Ok` the agent
    /// signs `data`, and one token is spent.
    pub fn judge(
        &mut self,
        list: &TargetList,
        target: &str,
        host_key_seen: &str,
        data: &[u8],
        now: Millis,
    ) -> Result<(), Refusal> {
        let r = parse_auth_request(data)?;
        let t = list
            .index(target)
            .and_then(|i| list.get(i))
            .ok_or_else(|| Refusal::NotListed(target.to_string(), list.version().to_string()))?;
        if t.user != r.user {
            return Err(Refusal::WrongUser {
                target: target.to_string(),
                want: t.user.clone(),
                got: r.user.to_string(),
            });
        }
        if t.host_key != host_key_seen {
            return Err(Refusal::WrongHostKey(target.to_string()));
        }
        if r.key_blob != self.key_blob.as_slice() {
            return Err(Refusal::OtherKey);
        }
        let refill = now.saturating_sub(self.last_ms) * u64::from(self.rate);
        self.last_ms = self.last_ms.max(now);
        self.tokens_milli = (self.tokens_milli + refill).min(u64::from(self.burst) * 1000);
        if self.tokens_milli < 1000 {
            return Err(Refusal::RateLimited(self.rate));
        }
        self.tokens_milli -= 1000;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::overlay::{Target, Version};

    fn s(out: &mut Vec<u8>, b: &[u8]) {
        out.extend_from_slice(&(b.len() as u32).to_be_bytes());
        out.extend_from_slice(b);
    }

    fn request(user: &str, key: &[u8]) -> Vec<u8> {
        let mut d = Vec::new();
        s(&mut d, &[7; 32]);
        d.push(50);
        s(&mut d, user.as_bytes());
        s(&mut d, b"ssh-connection");
        s(&mut d, b"publickey");
        d.push(1);
        s(&mut d, b"ssh-ed25519");
        s(&mut d, key);
        d
    }

    const FP: &str = "SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s";

    fn list() -> TargetList {
        TargetList::new(
            Version::new(1, 0),
            7946,
            vec![Target {
                name: "h1".into(),
                address: "10.0.0.1".parse().unwrap(),
                ssh_port: 22,
                user: "root".into(),
                prefix: "/opt/shoal".into(),
                host_key: FP.into(),
                roles: Vec::new(),
                manager: None,
            }],
        )
        .unwrap()
    }

    #[test]
    fn a_request_parses_and_anything_else_is_refused() {
        let d = request("root", b"KEY");
        let r = parse_auth_request(&d).unwrap();
        assert_eq!(
            (r.user, r.algorithm, r.key_blob),
            ("root", "ssh-ed25519", &b"KEY"[..])
        );
        for cut in 0..d.len() {
            assert!(parse_auth_request(&d[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = d.clone();
        bad[36] = 51;
        assert!(parse_auth_request(&bad).is_err());
        let mut long = d.clone();
        long.push(0);
        assert!(parse_auth_request(&long).is_err());
    }

    #[test]
    fn it_signs_only_for_listed_hosts_their_user_and_its_key() {
        let l = list();
        let mut p = SignPolicy::new(b"KEY".to_vec(), 10, 2, 0);
        assert_eq!(p.judge(&l, "h1", FP, &request("root", b"KEY"), 0), Ok(()));
        assert!(matches!(
            p.judge(&l, "h9", FP, &request("root", b"KEY"), 0),
            Err(Refusal::NotListed(..))
        ));
        assert!(matches!(
            p.judge(&l, "h1", FP, &request("bob", b"KEY"), 0),
            Err(Refusal::WrongUser { .. })
        ));
        assert_eq!(
            p.judge(&l, "h1", FP, &request("root", b"OTHER"), 0),
            Err(Refusal::OtherKey)
        );
        let other = "SHA256:AAAAztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s";
        assert!(matches!(
            p.judge(&l, "h1", other, &request("root", b"KEY"), 0),
            Err(Refusal::WrongHostKey(_))
        ));
    }

    #[test]
    fn the_rate_limit_refills_with_time() {
        let l = list();
        let d = request("root", b"KEY");
        let mut p = SignPolicy::new(b"KEY".to_vec(), 10, 2, 0);
        assert!(p.judge(&l, "h1", FP, &d, 0).is_ok());
        assert!(p.judge(&l, "h1", FP, &d, 0).is_ok());
        assert_eq!(p.judge(&l, "h1", FP, &d, 0), Err(Refusal::RateLimited(10)));
        assert!(p.judge(&l, "h1", FP, &d, 99).is_err(), "0.99 of a token");
        assert!(
            p.judge(&l, "h1", FP, &d, 100).is_ok(),
            "one token per 100 ms"
        );
        assert!(p.judge(&l, "h1", FP, &d, 10_000).is_ok());
        assert!(p.judge(&l, "h1", FP, &d, 10_000).is_ok());
        assert!(
            p.judge(&l, "h1", FP, &d, 10_000).is_err(),
            "burst caps the bucket"
        );
    }
}
