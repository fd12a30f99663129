//! Versions of what the overlay spreads (the peer package, the target list,
//! the livetag): the higher version wins, whatever its content (SMON II-A-3,
//! II-A-4, II-C).
//!
//! SMON numbers versions from the utility's local store, so two utilities
//! could mint the same number for different contents (notes §7 item 7). A
//! version here is the number and an origin, a digest of the content the
//! caller computes: equal numbers with different contents still order the
//! same way on every peer, so every peer converges on one of them.

use serde::{Deserialize, Serialize};

/// A version: compared by number, then by origin.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Version {
    /// What the operator wrote (`version = 3`).
    pub number: u64,
    /// A digest of the content (the first 8 bytes of its SHA-256, say);
    /// breaks ties between different contents of the same number.
    pub origin: u64,
}

impl Version {
    /// Version `number` of content whose digest is `origin`.
    pub const fn new(number: u64, origin: u64) -> Self {
        Self { number, origin }
    }
}

impl core::fmt::Display for Version {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}.{:016x}", self.number, self.origin)
    }
}

/// SMON's livetag: while it is off, peers stop pinging and so stop
/// maintaining each other (II-A-4). The tuple with the higher version wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Livetag {
    /// Whether self-management is on.
    pub on: bool,
    /// Its version.
    pub version: Version,
}

impl Default for Livetag {
    fn default() -> Self {
        Self {
            on: true,
            version: Version::default(),
        }
    }
}

/// The versions a ping and its answer carry: the sender's package, its
/// target list, its livetag, and the newest package version it knows to be
/// bad (one that failed its health check somewhere and was rolled back).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Versions {
    /// The peer package (the shoal binary and its overlay configuration).
    pub peer: Version,
    /// The target list.
    pub targets: Version,
    /// The livetag tuple.
    pub livetag: Livetag,
    /// The newest release marked bad (`Version::default()`: none). Only the
    /// newest travels: a bad release lives minutes at most (every host that
    /// took it rolls back), so an older bad mark has nobody left to spread
    /// it to; each peer keeps every mark it learned ([`super::Peer::bad`]).
    #[serde(default)]
    pub bad: Version,
}

/// What a peer should do on seeing another peer's versions: pull a newer
/// target list or package from it. The livetag is adopted on the spot, as it
/// travels whole in the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Newer {
    /// The other holds a newer target list.
    pub targets: bool,
    /// The other runs a newer package.
    pub peer: bool,
    /// The other carries a newer livetag.
    pub livetag: bool,
    /// The other knows a newer bad release.
    pub bad: bool,
}

/// Compares `mine` with `theirs`.
pub fn compare(mine: &Versions, theirs: &Versions) -> Newer {
    Newer {
        targets: theirs.targets > mine.targets,
        peer: theirs.peer > mine.peer,
        livetag: theirs.livetag.version > mine.livetag.version,
        bad: theirs.bad > mine.bad,
    }
}
