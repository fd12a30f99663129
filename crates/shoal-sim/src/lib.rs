//! shoal-sim: the simulator. It drives shoal-core's policies on a virtual clock.

/// `shoal sim autoscale`: allocation policies over demand workloads, a front
/// end over [`cluster`].
pub mod autoscale;
/// Line charts of measured series (benchmark plots).
pub mod chart;
/// `shoal sim cluster`: the controller on a virtual clock with faults.
pub mod cluster;
/// `shoal sim dps`: DPS share exchange over BSP programs (thesis ch. 5).
pub mod dps;
/// `shoal sim locality`: locality loss of subset rebuilding on backend failure.
pub mod locality;
/// `shoal sim overlay`: SMON's self-deployment against section IV's analysis.
pub mod overlay;
/// Workload generators of the Vibra experiments: a World-Cup-like trace
/// and a YouTube-like video set (thesis 3.5.1, 3.5.4).
pub mod workload;
