//! The sealed envelope of every overlay datagram.
//!
//! SMON authenticates and encrypts all peer traffic with one shared key,
//! K_E, without saying how (notes §7 item 12). Here: each process picks a
//! random 128-bit session id at start and seals with
//! `HKDF-SHA256(K_E, session)` as its ChaCha20-Poly1305 key and a counter as
//! the nonce, so no nonce is ever used twice under one key, however many
//! peers share K_E. A datagram is
//!
//! ```text
//! "SHO1" | session (16) | counter (8, big-endian) | ciphertext | tag (16)
//! ```
//!
//! with the first 28 bytes authenticated as associated data. The receiver
//! keeps a 64-counter sliding window per session (as IPsec and WireGuard
//! do) and drops a replayed or too-old counter; a replay across a receiver's
//! restart is caught by the timestamp inside the message ([`crate::wire`]).
//! A datagram sealed under another key fails authentication and is dropped:
//! a host without K_E can neither ping, nor answer, nor read the list.

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use std::collections::HashMap;

const MAGIC: &[u8; 4] = b"SHO1";
const HEADER: usize = 4 + 16 + 8;
const TAG: usize = 16;
/// Sessions remembered at once; the least recently heard one is forgotten.
const MAX_SESSIONS: usize = 4096;

/// Why a datagram was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// Too short or without the magic.
    #[error("not an overlay datagram")]
    NotOverlay,
    /// Authentication failed: another key, or tampered with.
    #[error("authentication failed (not sealed with this overlay key)")]
    Forged,
    /// A counter already seen, or older than the window.
    #[error("replayed datagram")]
    Replayed,
}

/// Why a key file is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not 64 hex digits.
    #[error(
        "an overlay key is 64 hex digits (32 bytes); make one with `shoal overlay key --out FILE`"
    )]
    Malformed,
}

/// The overlay key, K_E.
#[derive(Clone)]
pub struct OverlayKey([u8; 32]);

impl std::fmt::Debug for OverlayKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OverlayKey(..)")
    }
}

impl OverlayKey {
    /// A new random key.
    pub fn generate() -> Self {
        let mut k = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut k);
        Self(k)
    }
    /// Parses 64 hex digits (surrounding whitespace ignored).
    pub fn from_hex(s: &str) -> Result<Self, KeyError> {
        let b = hex::decode(s.trim()).map_err(|_| KeyError::Malformed)?;
        let k: [u8; 32] = b.try_into().map_err(|_| KeyError::Malformed)?;
        Ok(Self(k))
    }
    /// Its hex form, as stored in a key file.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    fn session_key(&self, session: &[u8; 16]) -> LessSafeKey {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"shoal overlay v1").extract(&self.0);
        let info = [&session[..]];
        let okm = prk
            .expand(&info, &CHACHA20_POLY1305)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        LessSafeKey::new(UnboundKey::from(okm))
    }
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// Seals this process's datagrams.
pub struct Sealer {
    session: [u8; 16],
    key: LessSafeKey,
    counter: u64,
}

impl Sealer {
    /// A sealer with a fresh random session.
    pub fn new(key: &OverlayKey) -> Self {
        let mut session = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut session);
        Self::with_session(key, session)
    }
    /// A sealer for `session` (tests).
    pub fn with_session(key: &OverlayKey, session: [u8; 16]) -> Self {
        Self {
            session,
            key: key.session_key(&session),
            counter: 0,
        }
    }
    /// Seals `plaintext` into one datagram.
    pub fn seal(&mut self, plaintext: &[u8]) -> Vec<u8> {
        self.counter += 1;
        let mut out = Vec::with_capacity(HEADER + plaintext.len() + TAG);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.session);
        out.extend_from_slice(&self.counter.to_be_bytes());
        let mut body = plaintext.to_vec();
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(self.counter), Aad::from(&out[..HEADER]), &mut body)
            .expect("a datagram is far below ChaCha20-Poly1305's length limit");
        out.extend_from_slice(&body);
        out.extend_from_slice(tag.as_ref());
        out
    }
}

struct Session {
    key: LessSafeKey,
    top: u64,
    seen: u64,
    heard: u64,
}

/// Opens datagrams from every sender, with a replay window per session.
pub struct Opener {
    key: OverlayKey,
    sessions: HashMap<[u8; 16], Session>,
    clock: u64,
}

impl Opener {
    /// An opener for `key`.
    pub fn new(key: &OverlayKey) -> Self {
        Self {
            key: key.clone(),
            sessions: HashMap::new(),
            clock: 0,
        }
    }

    /// The plaintext of `datagram`, once.
    pub fn open(&mut self, datagram: &[u8]) -> Result<Vec<u8>, SealError> {
        if datagram.len() < HEADER + TAG || &datagram[..4] != MAGIC {
            return Err(SealError::NotOverlay);
        }
        let session: [u8; 16] = datagram[4..20]
            .try_into()
            .map_err(|_| SealError::NotOverlay)?;
        let counter = u64::from_be_bytes(
            datagram[20..28]
                .try_into()
                .map_err(|_| SealError::NotOverlay)?,
        );
        if counter == 0 {
            return Err(SealError::Forged);
        }
        if let Some(s) = self.sessions.get(&session)
            && !fresh(s, counter)
        {
            return Err(SealError::Replayed);
        }
        let derived =
            (!self.sessions.contains_key(&session)).then(|| self.key.session_key(&session));
        let key = match (&derived, self.sessions.get(&session)) {
            (Some(k), _) => k,
            (None, Some(s)) => &s.key,
            (None, None) => return Err(SealError::Forged),
        };
        let mut body = datagram[HEADER..].to_vec();
        let plain_len = key
            .open_in_place(nonce(counter), Aad::from(&datagram[..HEADER]), &mut body)
            .map_err(|_| SealError::Forged)?
            .len();
        body.truncate(plain_len);
        // Authentic: only now does the session enter the table.
        self.clock += 1;
        let clock = self.clock;
        if let Some(key) = derived {
            if self.sessions.len() >= MAX_SESSIONS
                && let Some(old) = self
                    .sessions
                    .iter()
                    .min_by_key(|(_, s)| s.heard)
                    .map(|(k, _)| *k)
            {
                self.sessions.remove(&old);
            }
            self.sessions.insert(
                session,
                Session {
                    key,
                    top: 0,
                    seen: 0,
                    heard: clock,
                },
            );
        }
        if let Some(s) = self.sessions.get_mut(&session) {
            accept(s, counter);
            s.heard = clock;
        }
        Ok(body)
    }
}

fn fresh(s: &Session, counter: u64) -> bool {
    if counter > s.top {
        return true;
    }
    let age = s.top - counter;
    age < 64 && s.seen & (1 << age) == 0
}

fn accept(s: &mut Session, counter: u64) {
    if counter > s.top {
        let shift = counter - s.top;
        s.seen = if shift >= 64 { 0 } else { s.seen << shift };
        s.seen |= 1;
        s.top = counter;
    } else {
        s.seen |= 1 << (s.top - counter);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_datagram_opens_once_under_the_same_key_only() {
        let k = OverlayKey::generate();
        let mut s = Sealer::new(&k);
        let mut o = Opener::new(&k);
        let d = s.seal(b"ping");
        assert_eq!(o.open(&d).unwrap(), b"ping");
        assert_eq!(o.open(&d), Err(SealError::Replayed));
        let mut other = Opener::new(&OverlayKey::generate());
        assert_eq!(other.open(&s.seal(b"x")), Err(SealError::Forged));
        // The plaintext is not in the datagram.
        let d = s.seal(b"the target list");
        assert!(!d.windows(6).any(|w| w == b"target"));
    }

    #[test]
    fn tampering_anywhere_is_detected() {
        let k = OverlayKey::generate();
        let mut s = Sealer::new(&k);
        let d = s.seal(b"answer with versions");
        for i in 4..d.len() {
            let mut t = d.clone();
            t[i] ^= 0x01;
            assert!(Opener::new(&k).open(&t).is_err(), "byte {i}");
        }
        assert_eq!(Opener::new(&k).open(&d[..20]), Err(SealError::NotOverlay));
        assert_eq!(
            Opener::new(&k).open(b"GET / HTTP/1.1\r\n\r\n....."),
            Err(SealError::NotOverlay)
        );
    }

    #[test]
    fn the_replay_window_takes_reordering_and_drops_duplicates_and_the_too_old() {
        let k = OverlayKey::generate();
        let mut s = Sealer::new(&k);
        let mut o = Opener::new(&k);
        let ds: Vec<Vec<u8>> = (0..100).map(|i| s.seal(&[i as u8])).collect();
        assert!(o.open(&ds[10]).is_ok());
        assert!(o.open(&ds[5]).is_ok(), "late, within the window");
        assert_eq!(o.open(&ds[5]), Err(SealError::Replayed));
        assert!(o.open(&ds[99]).is_ok());
        assert_eq!(o.open(&ds[20]), Err(SealError::Replayed), "older than 64");
        assert!(o.open(&ds[40]).is_ok());
        assert_eq!(o.open(&ds[99]), Err(SealError::Replayed));
        // Two senders' counters do not interfere.
        let mut s2 = Sealer::new(&k);
        assert!(o.open(&s2.seal(b"a")).is_ok());
    }

    #[test]
    fn keys_parse_from_hex_and_bad_ones_say_how_to_make_one() {
        let k = OverlayKey::generate();
        let back = OverlayKey::from_hex(&format!("{}\n", k.to_hex())).unwrap();
        assert_eq!(back.to_hex(), k.to_hex());
        let e = OverlayKey::from_hex("abcd").unwrap_err().to_string();
        assert!(e.contains("shoal overlay key"), "{e}");
        assert!(!format!("{k:?}").contains(&k.to_hex()[..8]));
    }
}
