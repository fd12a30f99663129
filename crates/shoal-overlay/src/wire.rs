//! The overlay's messages and their codec: JSON, deflated, then sealed
//! ([`crate::seal`]). Every message carries the sender's name and the time
//! it was sent; a receiver drops one sent more than [`MAX_SKEW_MS`] away
//! from its own clock, which stops a replay after the receiver restarted
//! (and so forgot its replay windows).

use serde::{Deserialize, Serialize};
use shoal_core::overlay::apps::{AppSpec, Notice, StateTag};
use shoal_core::overlay::{Livetag, State, TargetList, Version, Versions};
use std::io::{Read, Write};

/// How far a message's send time may be from the receiver's clock.
pub const MAX_SKEW_MS: u64 = 60_000;
/// The largest datagram sent or accepted (UDP's limit, less headers).
pub const MAX_DATAGRAM: usize = 65_000;
/// The most a message may inflate to (a zip bomb is dropped).
const MAX_PLAINTEXT: u64 = 16 << 20;

/// One message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// Unix milliseconds at the sender.
    pub sent_ms: u64,
    /// The sender: a target's name, or `shoal` for the command line.
    pub from: String,
    /// What it says.
    pub body: Body,
}

/// What a message says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Body {
    /// SMON's ping, with the sender's versions.
    Ping {
        /// Echoed in the answer.
        seq: u64,
        /// The sender's versions.
        versions: Versions,
    },
    /// The answer to a ping.
    Answer {
        /// The ping's.
        seq: u64,
        /// The answerer's versions.
        versions: Versions,
    },
    /// Send me your target list.
    GetTargets,
    /// A target list (the answer to `GetTargets`).
    Targets {
        /// The list.
        list: TargetList,
    },
    /// Adopt this list if it is newer (`shoal overlay targets set`).
    SetTargets {
        /// Echoed in the answer.
        id: u64,
        /// The list.
        list: TargetList,
    },
    /// The answer to `SetTargets`.
    TargetsSet {
        /// The request's.
        id: u64,
        /// Whether the list was newer and adopted.
        adopted: bool,
        /// The list version the peer holds now.
        version: Version,
    },
    /// Describe yourself (`shoal overlay status`).
    Status {
        /// Echoed in the answer.
        id: u64,
    },
    /// The answer to `Status`.
    StatusReport {
        /// The request's.
        id: u64,
        /// The peer's view.
        report: Box<StatusReport>,
    },
    /// From a deployed host whose agent has not joined the manager (its
    /// deployer had no token for it then): a deploy token for it, please.
    /// Answered only to a listed target asking from its own address, by a
    /// peer whose agent has joined.
    JoinToken {
        /// Echoed in the answer.
        id: u64,
    },
    /// The token, or why not.
    JoinTokenGranted {
        /// The request's.
        id: u64,
        /// The token, or the reason.
        result: Result<String, String>,
    },
    /// To the auth agent: its public key, please.
    AgentKey {
        /// Echoed in the answer.
        id: u64,
    },
    /// The auth agent's public key (OpenSSH format).
    AgentPublicKey {
        /// The request's.
        id: u64,
        /// `ssh-ed25519 AAAA...`.
        key: String,
    },
    /// To the auth agent: sign this SSH user-authentication request for a
    /// login into `target` (SMON's `resolve_challenge`).
    AgentSign {
        /// Echoed in the answer.
        id: u64,
        /// The target logged into, by name.
        target: String,
        /// The host key fingerprint the peer saw there.
        host_key: String,
        /// The target list version the peer holds (the agent fetches a
        /// newer one from it).
        list: Version,
        /// The data to sign, hex.
        data: String,
    },
    /// The auth agent's answer: the SSH signature blob, hex, or why not.
    AgentSigned {
        /// The request's.
        id: u64,
        /// The signature blob or the refusal.
        result: Result<String, String>,
    },
    /// Over TCP ([`crate::fetch`]): send me this package.
    Fetch {
        /// The package.
        what: crate::fetch::What,
    },
    /// From the client utility (`shoal overlay upgrade`, II-E): release
    /// `version` is served at the sender's address on TCP `port`.
    Offer {
        /// Echoed in the answer.
        id: u64,
        /// The release's version.
        version: Version,
        /// The utility's TCP port.
        port: u16,
    },
    /// The answer to `Offer`: pulling it, or why not.
    Offered {
        /// The request's.
        id: u64,
        /// `Ok` if the peer pulls it.
        result: Result<(), String>,
    },
    /// Set the livetag (`shoal overlay enable|disable`); the higher
    /// version wins.
    SetLivetag {
        /// Echoed in the answer.
        id: u64,
        /// The tag.
        livetag: Livetag,
    },
    /// The answer to `SetLivetag`: the tag the peer holds now.
    LivetagSet {
        /// The request's.
        id: u64,
        /// Its livetag.
        livetag: Livetag,
    },
    /// A peer tells another about one of its apps (II-D).
    AppNotice {
        /// The app.
        name: String,
        /// Its version and state.
        notice: Notice,
    },
    /// From the utility (`shoal overlay app install`): the app is served
    /// at the sender's address on TCP `port`.
    AppOffer {
        /// Echoed in the answer.
        id: u64,
        /// The app.
        name: String,
        /// Its version and state.
        notice: Notice,
        /// The utility's TCP port.
        port: u16,
    },
    /// Set an app's state (`shoal overlay app state`).
    SetAppState {
        /// Echoed in the answer.
        id: u64,
        /// The app.
        name: String,
        /// The state and its version.
        tag: StateTag,
    },
    /// The answer to `AppOffer` or `SetAppState`.
    AppDone {
        /// The request's.
        id: u64,
        /// `Ok(true)` if it pulls the app or changed its state,
        /// `Ok(false)` if it had it already, or why not.
        result: Result<bool, String>,
    },
}

/// What a peer keeps, and serves, of an installed app:
/// `state/apps/NAME/installed.json`.
pub type InstalledApp = shoal_core::overlay::apps::Installed;

/// The spec type, re-exported for the utility.
pub type Spec = AppSpec;

pub use shoal_core::overlay::report::{ManagerReport, StatusReport, TargetStatus};

/// The name of a [`State`] in status output.
pub fn state_name(s: State) -> &'static str {
    match s {
        State::Unknown => "unknown",
        State::Alive => "alive",
        State::Contacting => "contacting",
        State::Deployed => "deployed",
        State::Recovered => "recovered",
        State::Unreachable => "unreachable",
        State::WrongHostKey => "wrong-host-key",
        State::Failed => "failed",
    }
}

/// Why a plaintext is refused.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Not deflated JSON of a message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// Sent too long ago, or in the future.
    #[error("message sent {0} ms away from this clock")]
    Stale(i64),
    /// Larger than a datagram.
    #[error("message of {0} bytes is too large for one datagram")]
    TooLarge(usize),
}

/// The plaintext of `m`.
pub fn encode(m: &Message) -> Result<Vec<u8>, WireError> {
    let json = serde_json::to_vec(m).map_err(|e| WireError::Malformed(e.to_string()))?;
    let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(&json)
        .and_then(|_| z.finish())
        .map_err(|e| WireError::Malformed(e.to_string()))
        .and_then(|v| {
            if v.len() > MAX_DATAGRAM - 64 {
                Err(WireError::TooLarge(v.len()))
            } else {
                Ok(v)
            }
        })
}

/// The message in `plain`, if it was sent within [`MAX_SKEW_MS`] of `now_ms`.
pub fn decode(plain: &[u8], now_ms: u64) -> Result<Message, WireError> {
    let mut json = Vec::new();
    flate2::read::DeflateDecoder::new(plain)
        .take(MAX_PLAINTEXT)
        .read_to_end(&mut json)
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    let m: Message =
        serde_json::from_slice(&json).map_err(|e| WireError::Malformed(e.to_string()))?;
    let skew = m.sent_ms as i64 - now_ms as i64;
    if skew.unsigned_abs() > MAX_SKEW_MS {
        return Err(WireError::Stale(skew));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_stale_or_garbage_ones_are_refused() {
        let m = Message {
            sent_ms: 1_000_000,
            from: "h1".into(),
            body: Body::Ping {
                seq: 7,
                versions: Versions::default(),
            },
        };
        let p = encode(&m).unwrap();
        assert_eq!(decode(&p, 1_000_500).unwrap(), m);
        assert!(matches!(
            decode(&p, 1_000_000 + MAX_SKEW_MS + 1),
            Err(WireError::Stale(_))
        ));
        assert!(matches!(
            decode(&p, 1_000_000 - MAX_SKEW_MS - 1),
            Err(WireError::Stale(_))
        ));
        assert!(decode(b"\x00\x01garbage", 0).is_err());
        assert!(decode(&[], 0).is_err());
    }
}

#[cfg(test)]
mod properties {
    use crate::seal::{Opener, OverlayKey};
    use proptest::prelude::*;

    proptest! {
        /// Nothing a host sends can panic a peer: not a datagram, not a
        /// plaintext that passed authentication.
        #[test]
        fn any_bytes_are_dropped_without_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let mut o = Opener::new(&OverlayKey::generate());
            let mut framed = b"SHO1".to_vec();
            framed.extend_from_slice(&bytes);
            prop_assert!(o.open(&bytes).is_err());
            prop_assert!(o.open(&framed).is_err());
            let _ = super::decode(&bytes, 0);
        }
    }
}
