//! The per-request cost model (H-SWEB §2): `t_s = t_redirection + t_data +
//! t_server + t_net + t_client`, predicted for each place a request could
//! be served, and the decision it makes.
//!
//! The candidates, for a request arriving at cluster L's dispatcher:
//! - **Local**: L's backends serve it from L's data. t_redirection = 0;
//!   t_data = size / disk bandwidth, times (1 + L's load) ("if there are
//!   many concurrent requests, local data transmission performance degrades
//!   accordingly"); t_server = the class's unloaded time times (1 + L's
//!   load); t_net = size / the client's bandwidth + the client's RTT.
//! - **Fetch from P**: L's dispatcher asks P's dispatcher (over a pooled
//!   connection) and streams the answer on (the paper's remote fetch through
//!   the HCS, function 3). t_data = size / the L-P link's bandwidth, times
//!   (1 + our fetches in flight to P), plus one L-P round trip for the
//!   request; t_server at P; t_net = the client's RTT plus what the
//!   client's leg is slower than the link (the answer is streamed on as it
//!   arrives, so the paper's store-and-forward sum, notes gap 3, does not
//!   apply).
//! - **Redirect to P**: a 307 to P's dispatcher, path kept. t_redirection
//!   = the client's RTT to L (the 307 itself) + the client's RTT to P (its
//!   new connection); t_data = P's disk, times (1 + P's load); t_server at
//!   P; t_net = size / the bandwidth from P to the client + that RTT.
//! - t_client = 0: shoal's clients are unmodified (SWEB-unaware).
//!
//! t_net, missing from the seed (notes gap 1), is size / bandwidth + RTT of
//! the path the bytes take to the client. The path from P to L's clients is
//! what P measured on the clients L redirected to it (their kernel RTT and
//! delivery rate, in P's summary); before P has measured any, it is taken
//! as the L-P link (a client near L reaches P over L's way out), RTT added
//! to the client's own. A peer's load counts our own requests in flight to
//! it and our redirects of the last second, so that one stale summary does
//! not send every overflow to the same cluster at once (gap 8).
//!
//! The gate (the paper's broker and HCS split): the local prediction is
//! made first; at or under `threshold_ms`, the request is served locally
//! and no peer is looked at. A request already sent by a peer (a fetch or
//! a redirect) is always served where it lands: one hop at most (UV10).

use serde::{Deserialize, Serialize};

/// How a service's requests are placed: by the cost model, or one of the
/// two baselines H-SWEB is measured against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The cost model decides.
    #[default]
    Cost,
    /// Local only: every request is served by the cluster it reached; data
    /// held elsewhere is fetched (no redirect, no peer's CPU).
    Local,
    /// Always redirect to a peer that holds the data (or, for a request
    /// every cluster can answer, to the least loaded peer).
    Redirect,
}

/// The model's settings (a service's `[federation]`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Model {
    /// Cost model or a baseline.
    #[serde(default)]
    pub mode: Mode,
    /// Local predictions at or under this many ms are served locally
    /// without looking at any peer.
    pub threshold_ms: f64,
    /// The bandwidth assumed from a cluster to its own clients, Mbit/s.
    pub client_mbit: f64,
    /// A node's storage bandwidth, Mbit/s.
    pub disk_mbit: f64,
    /// Unloaded service time of a class never timed, ms.
    pub default_base_ms: f64,
}

impl Default for Model {
    fn default() -> Self {
        Self {
            mode: Mode::Cost,
            threshold_ms: 50.0,
            client_mbit: 1000.0,
            disk_mbit: 4000.0,
            default_base_ms: 1.0,
        }
    }
}

/// A network path's estimate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Path {
    /// Round-trip time, ms.
    pub rtt_ms: f64,
    /// Bandwidth, Mbit/s.
    pub mbit: f64,
}

impl Path {
    /// Milliseconds to move `bytes` over this path's bandwidth.
    fn transfer_ms(&self, bytes: u64) -> f64 {
        if self.mbit <= 0.0 {
            return f64::INFINITY;
        }
        bytes as f64 * 8.0 / (self.mbit * 1e3)
    }
}

/// What the local dispatcher knows of one peer cluster for this request.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerView {
    /// The peer cluster's name.
    pub cluster: String,
    /// Its dispatcher, HOST:PORT.
    pub dispatcher: String,
    /// Presumed alive.
    pub alive: bool,
    /// The L-P link, as the managers measured it.
    pub link: Path,
    /// The path from P to our clients, as P measured it, if it has.
    pub client_path: Option<Path>,
    /// P's mean requests in flight per backend.
    pub load: f64,
    /// P's backends.
    pub nodes: u32,
    /// Our own requests in flight to P plus our redirects to it of the last
    /// second.
    pub pending: f64,
    /// The object's size if P holds it.
    pub holds: Option<u64>,
    /// P's unloaded service time for the request's class, if it timed it.
    pub base_ms: Option<f64>,
    /// Redirect this request to learn the path from P to our clients (see
    /// [`explore_now`]).
    pub explore: bool,
}

/// Smallest response whose delivery rate measures a path (bytes).
pub const MIN_MEASURED_BYTES: u64 = 64 * 1024;

/// One in this many requests that could measure an unmeasured path from a
/// peer to our clients is redirected to measure it.
pub const EXPLORE_EVERY: u64 = 5;

/// Whether the `n`-th request (from 0) that could measure an unmeasured
/// client path explores: the first, then one in [`EXPLORE_EVERY`]. The path
/// from a peer to our clients is measured only on clients redirected there,
/// so without this a redirect that the prior (the clusters' own link)
/// makes look slower would never be tried, and never found faster.
pub fn explore_now(n: u64) -> bool {
    n.is_multiple_of(EXPLORE_EVERY)
}

/// One request's inputs.
#[derive(Debug, Clone)]
pub struct CostInputs<'a> {
    /// The object's size if this cluster holds it.
    pub local_size: Option<u64>,
    /// The path to the client (its measured RTT, the assumed bandwidth).
    pub client: Path,
    /// This cluster's mean requests in flight per backend.
    pub local_load: f64,
    /// This cluster's backends.
    pub local_nodes: u32,
    /// The class's unloaded service time here, if timed.
    pub base_ms: Option<f64>,
    /// The request came from a peer (fetch or redirect): serve it here.
    pub from_peer: bool,
    /// The peers.
    pub peers: &'a [PeerView],
}

/// Where a request is served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "peer")]
pub enum Placement {
    /// By this cluster.
    Local,
    /// By this cluster's dispatcher, with the answer fetched from the peer.
    Fetch(String),
    /// By the peer, the client redirected there.
    Redirect(String),
}

impl Placement {
    /// `local`, `fetch` or `redirect`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Fetch(_) => "fetch",
            Self::Redirect(_) => "redirect",
        }
    }

    /// The peer, for a fetch or a redirect.
    pub fn peer(&self) -> Option<&str> {
        match self {
            Self::Local => None,
            Self::Fetch(p) | Self::Redirect(p) => Some(p),
        }
    }
}

/// The five terms of one candidate, ms.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Terms {
    /// t_redirection.
    pub redirection: f64,
    /// t_data.
    pub data: f64,
    /// t_server.
    pub server: f64,
    /// t_net.
    pub net: f64,
    /// t_client (0: unmodified clients).
    pub client: f64,
}

impl Terms {
    /// t_s.
    pub fn total(&self) -> f64 {
        self.redirection + self.data + self.server + self.net + self.client
    }
}

/// One candidate placement with its predicted time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// Where.
    pub placement: Placement,
    /// Its terms.
    pub terms: Terms,
    /// t_s, ms.
    pub total_ms: f64,
}

/// The decision for one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// Where it goes.
    pub chosen: Placement,
    /// Every candidate evaluated (only Local when no peer was consulted).
    pub candidates: Vec<Candidate>,
    /// Whether the peers were looked at (the local prediction was over
    /// the threshold, or the data is not here).
    pub consulted: bool,
    /// Why, in words.
    pub reason: String,
}

impl Model {
    /// The service time of a class with unloaded time `base` at load `load`.
    fn server_ms(&self, base: Option<f64>, load: f64) -> f64 {
        base.unwrap_or(self.default_base_ms) * (1.0 + load.max(0.0))
    }

    /// The Local candidate, when the object is here.
    fn local(&self, i: &CostInputs<'_>, size: u64) -> Candidate {
        let disk = Path {
            rtt_ms: 0.0,
            mbit: self.disk_mbit,
        };
        let terms = Terms {
            redirection: 0.0,
            data: disk.transfer_ms(size) * (1.0 + i.local_load.max(0.0)),
            server: self.server_ms(i.base_ms, i.local_load),
            net: i.client.transfer_ms(size) + i.client.rtt_ms,
            client: 0.0,
        };
        Candidate {
            placement: Placement::Local,
            total_ms: terms.total(),
            terms,
        }
    }

    fn peer_load(p: &PeerView) -> f64 {
        p.load + p.pending / f64::from(p.nodes.max(1))
    }

    fn fetch(&self, i: &CostInputs<'_>, p: &PeerView, size: u64) -> Candidate {
        let in_flight = p.pending.max(0.0);
        let over_link = p.link.transfer_ms(size) * (1.0 + in_flight);
        let terms = Terms {
            redirection: 0.0,
            data: over_link + p.link.rtt_ms,
            server: self.server_ms(p.base_ms.or(i.base_ms), Self::peer_load(p)),
            // Streamed on as it arrives, not stored and forwarded: the
            // client's leg adds only what it is slower than the link.
            net: (i.client.transfer_ms(size) - over_link).max(0.0) + i.client.rtt_ms,
            client: 0.0,
        };
        Candidate {
            placement: Placement::Fetch(p.cluster.clone()),
            total_ms: terms.total(),
            terms,
        }
    }

    fn redirect(&self, i: &CostInputs<'_>, p: &PeerView, size: u64) -> Candidate {
        let to_client = p.client_path.unwrap_or(Path {
            rtt_ms: i.client.rtt_ms + p.link.rtt_ms,
            mbit: p.link.mbit.min(i.client.mbit),
        });
        let disk = Path {
            rtt_ms: 0.0,
            mbit: self.disk_mbit,
        };
        let load = Self::peer_load(p);
        let terms = Terms {
            redirection: i.client.rtt_ms + to_client.rtt_ms,
            data: disk.transfer_ms(size) * (1.0 + load),
            server: self.server_ms(p.base_ms.or(i.base_ms), load),
            net: to_client.transfer_ms(size) + to_client.rtt_ms,
            client: 0.0,
        };
        Candidate {
            placement: Placement::Redirect(p.cluster.clone()),
            total_ms: terms.total(),
            terms,
        }
    }

    /// Decides where one request is served.
    pub fn decide(&self, i: &CostInputs<'_>) -> Decision {
        // No backend here: nothing to serve locally with.
        let local = i
            .local_size
            .filter(|_| i.local_nodes > 0)
            .map(|s| self.local(i, s));
        if i.from_peer {
            return Decision {
                chosen: Placement::Local,
                candidates: local.into_iter().collect(),
                consulted: false,
                reason: "sent here by a peer cluster: served where it lands (one hop at most)"
                    .into(),
            };
        }
        let holders = || {
            i.peers
                .iter()
                .filter(|p| p.alive && p.nodes > 0 && p.holds.is_some())
        };
        match self.mode {
            Mode::Cost => {}
            Mode::Local => {
                if let Some(l) = local {
                    return Decision {
                        chosen: Placement::Local,
                        candidates: vec![l],
                        consulted: false,
                        reason: "local-only mode".into(),
                    };
                }
                let Some(p) = holders().next() else {
                    return Decision {
                        chosen: Placement::Local,
                        candidates: Vec::new(),
                        consulted: false,
                        reason: "local-only mode; no live peer holds the object".into(),
                    };
                };
                let c = self.fetch(i, p, p.holds.unwrap_or(0));
                return Decision {
                    chosen: c.placement.clone(),
                    candidates: vec![c],
                    consulted: false,
                    reason: "local-only mode: the object is not here, fetched".into(),
                };
            }
            Mode::Redirect => {
                let best =
                    holders().min_by(|a, b| Self::peer_load(a).total_cmp(&Self::peer_load(b)));
                if let Some(p) = best {
                    let c = self.redirect(i, p, p.holds.unwrap_or(0));
                    return Decision {
                        chosen: c.placement.clone(),
                        candidates: vec![c],
                        consulted: true,
                        reason: "always-redirect mode".into(),
                    };
                }
                return Decision {
                    chosen: Placement::Local,
                    candidates: local.into_iter().collect(),
                    consulted: true,
                    reason: "always-redirect mode; no live peer holds the object".into(),
                };
            }
        }
        if let Some(l) = &local
            && l.total_ms <= self.threshold_ms
        {
            return Decision {
                chosen: Placement::Local,
                reason: format!(
                    "local prediction {:.1} ms is within the {:.0} ms threshold: no peer consulted",
                    l.total_ms, self.threshold_ms
                ),
                candidates: vec![l.clone()],
                consulted: false,
            };
        }
        let mut cands: Vec<Candidate> = local.iter().cloned().collect();
        for p in i.peers.iter().filter(|p| p.alive && p.nodes > 0) {
            let Some(size) = p.holds else { continue };
            cands.push(self.fetch(i, p, size));
            cands.push(self.redirect(i, p, size));
        }
        let best = cands
            .iter()
            .min_by(|a, b| a.total_ms.total_cmp(&b.total_ms))
            .cloned();
        match best {
            None => Decision {
                chosen: Placement::Local,
                candidates: cands,
                consulted: true,
                reason: "no live peer holds the object and it is not known here: served locally"
                    .into(),
            },
            Some(b) => {
                // Learning the peer's path to our clients beats the cost
                // estimate made without it, now and then.
                if !matches!(b.placement, Placement::Redirect(_))
                    && let Some(p) = i.peers.iter().find(|p| {
                        p.explore
                            && p.alive
                            && p.client_path.is_none()
                            && p.holds.is_some_and(|s| s >= MIN_MEASURED_BYTES)
                    })
                    && let Some(c) = cands
                        .iter()
                        .find(|c| c.placement == Placement::Redirect(p.cluster.clone()))
                {
                    return Decision {
                        chosen: c.placement.clone(),
                        reason: format!(
                            "exploring: {} has not measured the path to our clients yet (one request in {EXPLORE_EVERY} that could measure it); the estimate said {} {:.1} ms",
                            p.cluster,
                            b.placement.kind(),
                            b.total_ms
                        ),
                        candidates: cands.clone(),
                        consulted: true,
                    };
                }
                let reason = match (&b.placement, &local) {
                    (Placement::Local, _) => format!(
                        "local {:.1} ms is over the threshold but still the fastest",
                        b.total_ms
                    ),
                    (p, Some(l)) => format!(
                        "{} {} {:.1} ms beats local {:.1} ms",
                        p.kind(),
                        p.peer().unwrap_or(""),
                        b.total_ms,
                        l.total_ms
                    ),
                    (p, None) => format!(
                        "the object is not here: {} {} {:.1} ms is the fastest",
                        p.kind(),
                        p.peer().unwrap_or(""),
                        b.total_ms
                    ),
                };
                Decision {
                    chosen: b.placement,
                    candidates: cands,
                    consulted: true,
                    reason,
                }
            }
        }
    }
}
