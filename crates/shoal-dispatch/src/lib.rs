//! shoal-dispatch
