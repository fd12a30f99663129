//! What the dispatcher, the manager and the peer managers say to each other
//! about federation.

use super::cost::{Model, Path};
use super::summary::{ClassTime, ClientPath, Summary};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The split of one dispatcher's decisions since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionCounts {
    /// Served locally without consulting any peer.
    pub local: u64,
    /// Served locally after consulting the peers (the fastest anyway).
    pub local_consulted: u64,
    /// Fetched from a peer and served here.
    pub fetch: u64,
    /// Redirected to a peer.
    pub redirect: u64,
    /// Arrived from a peer (fetched or redirected here).
    pub from_peers: u64,
}

/// What a dispatcher of a federated service adds to its load report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FedReport {
    /// Version of its backends' object list.
    pub objects_version: u64,
    /// The list itself, sent when the manager's answer shows it holds
    /// another version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub objects: Option<Vec<(u64, u64)>>,
    /// Its busiest request classes' unloaded service times.
    #[serde(default)]
    pub classes: Vec<ClassTime>,
    /// The paths to other clusters' clients it measured.
    #[serde(default)]
    pub client_paths: Vec<ClientPath>,
    /// Its decisions.
    #[serde(default)]
    pub decisions: DecisionCounts,
    /// Throughput of its fetches from each peer, Mbit/s (measured on
    /// bodies of at least 64 KB), by peer cluster.
    #[serde(default)]
    pub fetch_mbit: BTreeMap<String, f64>,
}

/// One peer as a dispatcher is told of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerEntry {
    /// The peer cluster.
    pub cluster: String,
    /// Presumed alive.
    pub alive: bool,
    /// The link to it.
    pub link: Path,
    /// Its summary of the service (`None`: it has not sent one, or does not
    /// run the service).
    pub summary: Option<Summary>,
}

/// What the manager answers a federated service's dispatcher report with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FedView {
    /// This cluster's name.
    pub cluster: String,
    /// The service's model settings.
    pub model: Model,
    /// The object-list version the manager holds from this dispatcher's
    /// service (the dispatcher resends its list when it differs).
    pub objects_version: u64,
    /// The peers.
    pub peers: Vec<PeerEntry>,
}

/// One exchange, either way: a cluster's summaries of its federated
/// services.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExchangeMsg {
    /// The sending cluster.
    pub cluster: String,
    /// The interval it exchanges with the receiver at, ms.
    pub interval_ms: u64,
    /// Its summaries (object lists only where the receiver's copy is old).
    pub summaries: Vec<Summary>,
    /// The object-list versions it holds of the receiver's services.
    #[serde(default)]
    pub acked: BTreeMap<String, u64>,
}

/// `POST /v1/federation/link`: a cluster asks to federate, with a token
/// the other cluster minted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinkRequest {
    /// The token (`shoal token create --roles federation`).
    pub token: String,
    /// The asking cluster's name.
    pub cluster: String,
    /// Its manager URL.
    pub url: String,
    /// Its CA certificate (the answerer pins it).
    pub ca_pem: String,
    /// A client certificate the asker's CA issued for the answerer
    /// (`federation:<answerer>`), with its key: how the answerer calls the
    /// asker. The asker made the key, so it could pose as the answerer to
    /// itself only.
    pub cert_for_you: String,
    /// Its key.
    pub key_for_you: String,
}

/// The answer to a [`LinkRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinkResponse {
    /// The answering cluster's name.
    pub cluster: String,
    /// Its manager URL.
    pub url: String,
    /// A client certificate of the answerer's CA for the asker.
    pub cert: String,
    /// Its key.
    pub key: String,
    /// Until when the certificates are good (Unix ms).
    pub expires_ms: u64,
}

/// One peer in `shoal federation status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// The peer cluster.
    pub cluster: String,
    /// Its manager.
    pub url: String,
    /// `alive`, `presumed dead` or `never heard`.
    pub state: String,
    /// Ms since it was last heard from.
    pub last_heard_ms_ago: Option<u64>,
    /// Silence after which it is presumed dead (3 of its intervals + 1 s).
    #[serde(default)]
    pub dead_after_ms: u64,
    /// The link as measured: RTT and bandwidth.
    pub link: Path,
    /// Bandwidth samples behind `link.mbit` (0: the default).
    pub bandwidth_samples: u64,
    /// Our exchange interval toward it, ms.
    pub interval_ms: u64,
    /// Its summaries.
    pub summaries: Vec<Summary>,
    /// Exchange bytes sent to it and received from it (bodies and
    /// headers, as counted by the manager).
    pub bytes_sent: u64,
    /// Received.
    pub bytes_received: u64,
    /// Exchanges completed.
    pub exchanges: u64,
    /// The last error talking to it.
    pub last_error: Option<String>,
    /// When the certificates of the link expire (Unix ms).
    pub expires_ms: u64,
}

/// `GET /v1/federation`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct FederationStatus {
    /// This cluster's name.
    pub cluster: String,
    /// Its peers.
    pub peers: Vec<PeerStatus>,
    /// Its own summaries of its federated services.
    pub local: Vec<Summary>,
    /// Decisions per federated service, summed over its dispatchers.
    pub decisions: BTreeMap<String, DecisionCounts>,
}
