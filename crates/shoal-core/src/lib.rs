//! shoal-core: every decision procedure of shoal as a sans-I/O state machine.
//!
//! Nothing here sleeps, reads a clock, opens a socket or spawns a task: callers
//! pass observations and the current time, and get decisions back. The live
//! services and the simulator drive the same code.

/// Bandwidth follows demand inside a service (Vibra eq. 3.1/3.2, the
/// resource directory, failure compensation).
pub mod bandwidth;
/// The controller: leases, allocation life cycle, monitors, pool.
pub mod control;
/// The one duration syntax of every flag and file (`500ms`, `6s`, `2m`, `1h`).
pub mod duration;
/// H-SWEB federation: summaries between clusters, the exchange interval
/// and liveness, the per-request cost model and its decision.
pub mod federation;
/// Demand forecasting (AR(p), EMA, seasonal).
pub mod forecast;
/// Leases: TTL bookkeeping, expiry, grace after a restart.
pub mod lease;
/// SMON's epidemic overlay: target list, versions, the peer's step, section IV.
pub mod overlay;
/// Allocation policies (LAMA Algorithm 1, HPA baseline, predictive).
pub mod policy;
/// The timestamping UDP relay's flow table (thesis ch. 6).
pub mod relay;
/// Request selection (dispatch) algorithms and locality analysis.
pub mod select;
/// DPS (thesis ch. 5): CPU shares that follow a parallel job's critical
/// path: the exchange (eq. 5.1), the bank (eq. 5.2), migration choice.
pub mod shares;
/// Host-side arrival timestamps of game datagrams (thesis ch. 6): the
/// relay's record, its codec and the error statistics.
pub mod stamp;
/// Trust at the edge: join tokens, name claims, discovery freshness.
pub mod trust;
