//! Wire types of the manager's HTTPS + JSON API. Unknown fields are refused
//! so a typo in a request is an error, not a silently ignored setting.

use serde::{Deserialize, Serialize};

pub use shoal_core::control::model::*;
pub use shoal_core::lease::LeaseState;

/// A one-time join: the node proves it holds the cluster token and gets a
/// certificate for its own key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// The full join token as printed by `shoal init`.
    pub token: String,
    /// The node's name (unique in the cluster).
    pub name: String,
    /// A PKCS#10 certificate signing request for the node's key, PEM.
    pub csr_pem: String,
    /// The roles the node will register with; a token may limit them.
    #[serde(default)]
    pub roles: Vec<String>,
}

/// The answer to a join.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinResponse {
    /// The node certificate, PEM, signed by the cluster CA.
    pub cert_pem: String,
}

/// A joined node's request for a new certificate before its own expires
/// (made with the current one).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertRequest {
    /// A PKCS#10 certificate signing request for the node's new key, PEM.
    pub csr_pem: String,
}

/// A node's request for a deploy token: a single-use join token for the
/// host it is deploying (SMON's self-deployment, with a manager).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployTokenRequest {
    /// The node name the token will admit.
    pub node: String,
}

/// A deploy token.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployTokenResponse {
    /// The token (`shoal1....`), for the deployed agent's --token-file.
    pub token: String,
    /// Its id (`shoal token list`, `shoal token revoke`).
    pub id: String,
    /// When it stops admitting the join.
    pub expires_ms: u64,
}

/// A node certificate as `shoal cert list` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeCertInfo {
    /// The node.
    pub node: String,
    /// Its certificate's id: SHA-256 of its public key, hex.
    pub id: String,
    /// When it expires, Unix ms (unknown for nodes joined before this was
    /// recorded).
    pub expires_ms: Option<u64>,
    /// A rotated certificate issued but not used yet.
    pub next_id: Option<String>,
    /// The roles the node may register with; `None`: any.
    pub roles: Option<Vec<String>>,
}

/// An administrator's change of the roles a node may register with.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolesRequest {
    /// The roles; `None`: any.
    pub roles: Option<Vec<String>>,
}

/// The lease granted by a registration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseGrant {
    /// Lease duration, milliseconds.
    pub lease_ttl_ms: u64,
}

/// The whole pool.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusResponse {
    /// Every registered node.
    pub nodes: Vec<NodeStatus>,
    /// Every service (hosted site).
    pub services: Vec<ServiceStatus>,
    /// The most recent events, oldest first.
    pub events: Vec<Event>,
    /// Parallel jobs with DPS shares (`shoal job`, docs/dps.md).
    #[serde(default)]
    pub jobs: Vec<shoal_core::shares::spec::JobStatus>,
}

/// A registry change or a decision, with its reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Strictly increasing per manager run.
    pub seq: u64,
    /// Wall clock, unix milliseconds.
    pub at_ms: u64,
    /// `registered`, `updated`, `failed`, `revived`, `cancelled`, `assigned`, `app`.
    pub kind: String,
    /// The node concerned, if any.
    pub node: Option<String>,
    /// The service concerned, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Human-readable reason.
    pub message: String,
}

/// Body of every error answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong and how to fix it.
    pub error: String,
}

/// Desired applications of a node, set by an administrator.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssignRequest {
    /// The complete desired list for the node (level-triggered: this
    /// replaces what was there).
    pub apps: Vec<AppAssignment>,
}

/// Wall clock in unix milliseconds.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A request for an app's output, passed by the manager to the node's
/// agent (`shoal logs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogRequest {
    /// Matches the answer to the request.
    pub id: u64,
    /// The app's id on the node.
    pub app: String,
    /// Read from this byte offset of the output (a follower's position);
    /// without it, the last `tail` lines.
    #[serde(default)]
    pub offset: Option<u64>,
    /// How many lines from the end, when `offset` is absent.
    #[serde(default)]
    pub tail: Option<usize>,
}

/// A piece of an app's output, as the agent read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogChunk {
    /// The output, lossily decoded as UTF-8.
    pub data: String,
    /// The offset to ask for next, to follow.
    pub next_offset: u64,
    /// Why there is no output, when there is none to give.
    #[serde(default)]
    pub error: Option<String>,
}
