//! The epidemic overlay of SMON (Gao et al.): peers that deploy shoal onto
//! every machine of a target list over SSH and restart any peer that dies.
//!
//! - [`version`]: versions of the package, the target list and the livetag;
//!   the higher version wins (II-A-3, II-A-4, II-C).
//! - [`targets`]: the target list with each machine's SSH host key (II-C).
//! - [`peer`]: one peer's epidemic step, Fig. 2 (pick, ping, judge, remedy).
//! - [`analysis`]: the formulas of section IV.
//! - [`deploy`]: what a probe found, what an installer does against another
//!   copy, what a remote exit status means (II-A-1, II-A-2).
//! - [`auth`]: what the auth agent signs (II-B, Fig. 3, stricter).
//! - [`apps`]: application specs, their three states and their epidemic
//!   spread (II-D).
//!
//! The peer also carries the self-upgrade decisions (II-A-3: pull the
//! newer release, never one marked bad, roll back a release marked bad)
//! and the livetag's (II-A-4: stop pinging while off, exit after a quiet
//! period).
//!
//! The live peer (`shoal agent`'s overlay) and `shoal sim overlay` drive the
//! same [`peer::Peer`].

pub mod analysis;
pub mod apps;
pub mod auth;
pub mod deploy;
pub mod peer;
pub mod report;
pub mod targets;
pub mod version;

#[cfg(test)]
mod tests;

pub use peer::{
    Command, Config, Counters, Inspection, ManagerOutcome, Millis, Outcome, Peer, QUIET_INTERVALS,
    Random, Remedy, Source, State, UpgradeNote, View, remedy,
};
pub use targets::{DEFAULT_OVERLAY_PORT, RawTargetList, Target, TargetError, TargetList};
pub use version::{Livetag, Newer, Version, Versions, compare};
