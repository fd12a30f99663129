//! shoal-agent
