//! H-SWEB federation (seeds/002): clusters in several places, each with its
//! own scheduler (the manager, the paper's HCS), exchange compact summaries
//! and send each request to where it finishes first.
//!
//! Three parts, all sans-I/O:
//! - [`summary`]: what a cluster tells its peers of a service (average and
//!   lowest load, node count, objects held, request classes, the paths its
//!   clients were seen on) and the node-weighted aggregation of several.
//! - [`exchange`]: how often to send a summary (within 1 % of the link) and
//!   when a silent peer is presumed dead.
//! - [`cost`]: the per-request cost model `t_s = t_redirection + t_data +
//!   t_server + t_net + t_client` and the decision it makes (serve locally,
//!   fetch from a peer and serve locally, or redirect the client).

pub mod cost;
pub mod exchange;
pub mod summary;
pub mod wire;

#[cfg(test)]
mod tests;

pub use cost::{
    Candidate, CostInputs, Decision, EXPLORE_EVERY, MIN_MEASURED_BYTES, Mode, Model,
    Path as NetPath, PeerView, Placement, Terms, explore_now,
};
pub use exchange::{IntervalRule, Liveness};
pub use summary::{ClassTime, ClientPath, Summary, aggregate, object_key, summarize};

/// The request header a fetching dispatcher marks its request with: the
/// receiving dispatcher serves it where it lands (one hop at most) and
/// names the asking cluster in its counters.
pub const FETCH_HEADER: &str = "x-shoal-federated";

/// The query parameter a redirect appends: the receiving dispatcher serves
/// the request where it lands, strips the parameter before its backends see
/// it, and measures the client's path for the cluster that redirected it.
pub const REDIRECT_PARAM: &str = "_shoal_from";
