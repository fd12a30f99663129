//! Allocation policies.
