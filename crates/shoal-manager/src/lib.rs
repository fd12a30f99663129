//! shoal-manager
