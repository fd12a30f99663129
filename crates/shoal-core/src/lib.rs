//! shoal-core
