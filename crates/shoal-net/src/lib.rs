//! shoal-net: wire types, cluster identity (CA, certificates, join tokens),
//! and the HTTPS client/server plumbing every shoal service shares.

pub mod client;
pub mod discovery;
pub mod identity;
pub mod server;
pub mod tls;
pub mod wire;

pub use identity::{ClusterDir, Token};
