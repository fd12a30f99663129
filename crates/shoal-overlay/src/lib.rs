//! shoal-overlay: the live SMON peer around [`shoal_core::overlay::Peer`].
//!
//! - [`seal`]: the overlay key (SMON's K_E) and the sealed envelope every
//!   datagram travels in: ChaCha20-Poly1305 under a per-sender key, counter
//!   nonces, a replay window.
//! - [`wire`]: the messages (ping, answer, target list, status) and their
//!   codec.
//! - [`files`]: the target list file an operator writes, and what a peer
//!   keeps in its directory.
//! - [`peer`]: the UDP loop that feeds the sans-I/O peer and carries out its
//!   commands.
//! - [`client`]: one request to one peer (`shoal overlay status`,
//!   `shoal overlay targets set`).
//! - [`release`]: the signed release manifest of the shoal binary.
//! - [`package`]: what a deployer copies, and the installer and starter
//!   that run on the target.
//! - [`ssh`]: deployment and recovery over SSH (russh, russh-sftp), logged
//!   in through the auth agent.
//! - [`authagent`]: `shoal auth-agent`, which signs the logins.

pub mod authagent;
pub mod client;
pub mod fetch;
pub mod files;
pub mod netlab;
pub mod package;
pub mod peer;
pub mod release;
pub mod seal;
pub mod ssh;
pub mod upgrade;
pub mod wire;

/// Unix time in milliseconds: the live clock the sans-I/O peer is handed.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
