//! The manager as its cluster's scheduler among federated clusters (H-SWEB's
//! HCS, §3): it links with other clusters' managers over mutual TLS,
//! exchanges summaries of its federated services with each at the interval
//! [`shoal_core::federation::IntervalRule`] gives, measures the link (RTT on
//! every exchange, bandwidth by a probe kept within the budget), presumes
//! a silent peer dead ([`Liveness`]), and hands each federated service's
//! dispatchers the view they decide with (in the answer to their load
//! report). The per-request decisions are the dispatchers': the model is
//! shoal-core's [`shoal_core::federation::Model`].
//!
//! Trust. `shoal token create --roles federation` mints a token on cluster
//! B; `shoal federation join URL --token T` on cluster A has A's manager
//! fetch B's CA and check it against the token (as a join does), then send
//! B a client certificate of A's CA for B (`federation:B`) and get one of
//! B's CA for A (`federation:A`). Each manager then calls the other with
//! the certificate the other's CA issued, and pins the other's CA for the
//! server side. Both certificates live 90 days (re-join to renew) and
//! `shoal federation leave NAME` revokes the one this cluster issued.

use crate::api::{ApiErr, Ctx, decode, need_admin};
use axum::Router;
use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use shoal_core::federation::exchange::changed;
use shoal_core::federation::wire::{
    DecisionCounts, ExchangeMsg, FedView, FederationStatus, LinkRequest, LinkResponse, PeerEntry,
    PeerStatus,
};
use shoal_core::federation::{IntervalRule, Liveness, NetPath, Summary};
use shoal_net::client::ApiClient;
use shoal_net::identity::{ClusterDir, FEDERATION_CN_PREFIX, Token};
use shoal_net::server::Peer;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The file of federated peers in the cluster directory (0600: it holds
/// the keys this cluster calls its peers with).
pub const FILE: &str = "federation.json";
/// How long the certificates of a link live.
const LINK_LIFE: Duration = Duration::from_secs(90 * 24 * 3600);
/// Share of the link the bandwidth probe may take (the summaries get the
/// rest of the 1 % budget).
const PROBE_BUDGET: f64 = 0.005;
/// Bytes of one bandwidth probe.
const PROBE_BYTES: u64 = 256 * 1024;
/// Fewest seconds between probes.
const PROBE_MIN_SECS: f64 = 20.0;
/// Bandwidth assumed before the first probe, Mbit/s.
const DEFAULT_MBIT: f64 = 10.0;
/// A dispatcher report older than this no longer makes the summary.
const LOCAL_STALE: Duration = Duration::from_secs(10);

/// One federated peer as recorded on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerRecord {
    /// The peer cluster's name.
    pub cluster: String,
    /// Its manager's URL.
    pub url: String,
    /// Its CA (pinned: its manager's server certificate must chain to it).
    pub ca_pem: String,
    /// The client certificate its CA issued for this cluster.
    pub cert_pem: String,
    /// Its key.
    pub key_pem: String,
    /// Public-key fingerprint of the certificate this cluster issued it
    /// (what `leave` revokes).
    pub issued_key_fp: String,
    /// When the certificates expire, Unix ms.
    pub expires_ms: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct PeerFile {
    peers: Vec<PeerRecord>,
}

#[derive(Debug)]
struct PeerState {
    rec: PeerRecord,
    live: Liveness,
    /// Recent RTT samples, ms (the estimate is their minimum: the first
    /// exchange on a connection pays its handshakes).
    rtts: std::collections::VecDeque<f64>,
    mbit: Option<f64>,
    mbit_samples: u64,
    interval_secs: f64,
    theirs: BTreeMap<String, Summary>,
    /// Object-list versions they hold of ours.
    acked_by_them: BTreeMap<String, u64>,
    last_sent: BTreeMap<String, Summary>,
    bytes_sent: u64,
    bytes_received: u64,
    exchanges: u64,
    last_error: Option<String>,
    last_probe: Option<Instant>,
    removed: bool,
}

impl PeerState {
    fn new(rec: PeerRecord) -> Self {
        Self {
            rec,
            live: Liveness::default(),
            rtts: Default::default(),
            mbit: None,
            mbit_samples: 0,
            interval_secs: IntervalRule::default().min_secs,
            theirs: BTreeMap::new(),
            acked_by_them: BTreeMap::new(),
            last_sent: BTreeMap::new(),
            bytes_sent: 0,
            bytes_received: 0,
            exchanges: 0,
            last_error: None,
            last_probe: None,
            removed: false,
        }
    }

    fn link(&self) -> NetPath {
        NetPath {
            rtt_ms: self
                .rtts
                .iter()
                .copied()
                .fold(f64::INFINITY, f64::min)
                .min(10_000.0),
            mbit: self.mbit.unwrap_or(DEFAULT_MBIT),
        }
    }

    fn rtt_sample(&mut self, ms: f64) {
        self.rtts.push_back(ms);
        while self.rtts.len() > 10 {
            self.rtts.pop_front();
        }
    }

    /// Takes in a peer's message: liveness, summaries, what it holds of ours.
    fn absorb(&mut self, m: ExchangeMsg, now_ms: u64) {
        self.live.heard(now_ms, m.interval_ms);
        for mut s in m.summaries {
            // An object list is sent only when ours is stale: keep the old
            // one otherwise.
            if let Some(old) = self.theirs.get(&s.service)
                && s.objects.is_empty()
                && old.objects_version == s.objects_version
            {
                s.objects = old.objects.clone();
            }
            self.theirs.insert(s.service.clone(), s);
        }
        self.acked_by_them = m.acked;
    }
}

/// A federated service's state here, from its dispatcher's reports.
#[derive(Debug, Clone)]
struct LocalSvc {
    summary: Summary,
    decisions: BTreeMap<String, DecisionCounts>,
    at: Instant,
}

/// The federation state of one manager.
pub struct Federation {
    dir: ClusterDir,
    name: String,
    url: String,
    /// The address calls to peers come from (the listen address).
    source: Option<std::net::IpAddr>,
    rule: IntervalRule,
    inner: Mutex<Inner>,
    start: Instant,
}

#[derive(Default)]
struct Inner {
    peers: BTreeMap<String, PeerState>,
    local: BTreeMap<String, LocalSvc>,
}

impl std::fmt::Debug for Federation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Federation")
            .field("name", &self.name)
            .finish()
    }
}

/// This cluster's federation name: config.toml's `name`, or `c` and the
/// first 8 hex digits of its CA's fingerprint.
pub fn cluster_name(dir: &ClusterDir) -> anyhow::Result<String> {
    if let Some(n) = dir.config()?.name {
        return Ok(n);
    }
    let fp = shoal_net::identity::pem_fingerprint(&dir.ca_pem()?)?;
    Ok(format!("c{}", &hex::encode(fp)[..8]))
}

fn now_ms() -> u64 {
    shoal_net::wire::unix_ms()
}

impl Federation {
    /// Opens the federation of the manager of `dir`, reachable at `url`.
    pub fn open(
        dir: ClusterDir,
        url: String,
        source: Option<std::net::IpAddr>,
    ) -> anyhow::Result<Arc<Self>> {
        let name = cluster_name(&dir)?;
        let path = dir.path.join(FILE);
        let file: PeerFile = match std::fs::read_to_string(&path) {
            Ok(t) => serde_json::from_str(&t).map_err(|e| {
                anyhow::anyhow!(
                    "{}: {e}; fix the file or remove it (the links it held must then be joined again)",
                    path.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => PeerFile::default(),
            Err(e) => return Err(anyhow::anyhow!("{}: {e}", path.display())),
        };
        let mut inner = Inner::default();
        for r in file.peers {
            inner.peers.insert(r.cluster.clone(), PeerState::new(r));
        }
        Ok(Arc::new(Self {
            dir,
            name,
            url,
            source,
            rule: IntervalRule {
                budget: 0.01 - PROBE_BUDGET,
                ..IntervalRule::default()
            },
            inner: Mutex::new(inner),
            start: Instant::now(),
        }))
    }

    /// This cluster's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn save(&self, inner: &Inner) -> anyhow::Result<()> {
        let file = PeerFile {
            peers: inner
                .peers
                .values()
                .filter(|p| !p.removed)
                .map(|p| p.rec.clone())
                .collect(),
        };
        shoal_net::identity::write_file(
            &self.dir.path.join(FILE),
            &serde_json::to_string_pretty(&file)?,
            true,
        )?;
        Ok(())
    }

    /// Starts the exchange with every recorded peer.
    pub fn start(self: &Arc<Self>) {
        let names: Vec<String> = self.inner.lock().unwrap().peers.keys().cloned().collect();
        for n in names {
            tokio::spawn(self.clone().exchange_loop(n));
        }
    }

    fn add_peer(self: &Arc<Self>, rec: PeerRecord) -> anyhow::Result<()> {
        let name = rec.cluster.clone();
        let fresh = {
            let mut inner = self.inner.lock().unwrap();
            let fresh = inner.peers.get(&name).is_none_or(|p| p.removed);
            match inner.peers.get_mut(&name) {
                Some(p) if !p.removed => p.rec = rec,
                _ => {
                    inner.peers.insert(name.clone(), PeerState::new(rec));
                }
            }
            self.save(&inner)?;
            fresh
        };
        if fresh {
            tokio::spawn(self.clone().exchange_loop(name));
        }
        Ok(())
    }

    /// Takes in a federated service's dispatcher report; returns the view
    /// the dispatcher decides with, `None` when the service is not
    /// federated.
    pub fn on_report(
        &self,
        service: &str,
        spec: Option<&shoal_core::control::model::FederationSpec>,
        r: &shoal_core::control::model::DispatchReport,
    ) -> Option<FedView> {
        let mut inner = self.inner.lock().unwrap();
        let Some(spec) = spec else {
            inner.local.remove(service);
            return None;
        };
        let model = spec.model().ok()?;
        let fed = r.federation.clone().unwrap_or_default();
        let loads: Vec<f64> = r.backends.iter().map(|b| b.active).collect();
        let (avg, low, n) = shoal_core::federation::summarize(&loads).unwrap_or((0.0, 0.0, 0));
        let prev = inner.local.get(service).cloned();
        let (objects, version) = match (&fed.objects, &prev) {
            (Some(list), _) => (list.clone(), fed.objects_version),
            (None, Some(p)) if p.summary.objects_version == fed.objects_version => {
                (p.summary.objects.clone(), p.summary.objects_version)
            }
            // The manager restarted or the list changed: it is asked for
            // again (the answer names the version held).
            (None, Some(p)) => (p.summary.objects.clone(), p.summary.objects_version),
            (None, None) => (Vec::new(), 0),
        };
        let mut decisions = prev
            .as_ref()
            .map(|p| p.decisions.clone())
            .unwrap_or_default();
        decisions.insert(r.dispatcher.clone(), fed.decisions);
        let summary = Summary {
            service: service.to_string(),
            dispatcher: spec.public.clone().unwrap_or_else(|| r.dispatcher.clone()),
            nodes: n,
            avg_load: avg,
            lowest_load: low,
            objects,
            objects_version: version,
            classes: fed.classes.clone(),
            client_paths: fed.client_paths.clone(),
        };
        inner.local.insert(
            service.to_string(),
            LocalSvc {
                summary,
                decisions,
                at: Instant::now(),
            },
        );
        // The dispatchers' fetches are the biggest transfers on the link:
        // they measure its bandwidth better than the probe.
        for (peer, mbit) in &fed.fetch_mbit {
            if let Some(p) = inner.peers.get_mut(peer) {
                p.mbit = Some(match p.mbit {
                    Some(m) => 0.7 * m + 0.3 * mbit,
                    None => *mbit,
                });
                p.mbit_samples += 1;
            }
        }
        let now = now_ms();
        let peers = inner
            .peers
            .values()
            .filter(|p| !p.removed)
            .map(|p| PeerEntry {
                cluster: p.rec.cluster.clone(),
                alive: p.live.alive(now),
                link: p.link(),
                summary: p.theirs.get(service).cloned(),
            })
            .collect();
        Some(FedView {
            cluster: self.name.clone(),
            model,
            objects_version: version,
            peers,
        })
    }

    /// Our summaries, fresh ones only.
    fn local_summaries(inner: &Inner) -> Vec<Summary> {
        inner
            .local
            .values()
            .filter(|l| l.at.elapsed() < LOCAL_STALE)
            .map(|l| l.summary.clone())
            .collect()
    }

    /// The message for `peer`: object lists only where its copy is old.
    fn message_for(&self, inner: &Inner, peer: &PeerState) -> (ExchangeMsg, bool) {
        let mut changed_any = false;
        let summaries = Self::local_summaries(inner)
            .into_iter()
            .map(|mut s| {
                changed_any |= changed(peer.last_sent.get(&s.service), &s);
                if peer.acked_by_them.get(&s.service) == Some(&s.objects_version) {
                    s.objects.clear();
                }
                s
            })
            .collect();
        let acked = peer
            .theirs
            .iter()
            .map(|(k, s)| (k.clone(), s.objects_version))
            .collect();
        (
            ExchangeMsg {
                cluster: self.name.clone(),
                interval_ms: (peer.interval_secs * 1e3) as u64,
                summaries,
                acked,
            },
            changed_any,
        )
    }

    fn client_for(&self, rec: &PeerRecord) -> anyhow::Result<ApiClient> {
        Ok(ApiClient::new_from(
            &rec.url,
            &rec.ca_pem,
            Some((&rec.cert_pem, &rec.key_pem)),
            self.source,
        )?)
    }

    async fn exchange_loop(self: Arc<Self>, name: String) {
        let mut client: Option<(String, ApiClient)> = None;
        loop {
            let (msg, changed_any, rec, interval, probe_due) = {
                let inner = self.inner.lock().unwrap();
                let Some(p) = inner.peers.get(&name).filter(|p| !p.removed) else {
                    return;
                };
                let (msg, ch) = self.message_for(&inner, p);
                let link = p.link();
                let probe_every = (PROBE_BYTES as f64 * 8.0 / (PROBE_BUDGET * link.mbit * 1e6))
                    .max(PROBE_MIN_SECS);
                let due = p
                    .last_probe
                    .is_none_or(|t| t.elapsed().as_secs_f64() >= probe_every);
                (msg, ch, p.rec.clone(), p.interval_secs, due)
            };
            if client.as_ref().is_none_or(|(u, _)| *u != rec.cert_pem) {
                match self.client_for(&rec) {
                    Ok(c) => client = Some((rec.cert_pem.clone(), c)),
                    Err(e) => {
                        self.note_error(&name, format!("{e:#}"));
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        continue;
                    }
                }
            }
            let c = &client.as_ref().unwrap().1;
            let body = serde_json::to_vec(&msg).unwrap_or_default();
            let sent_bytes = body.len() as u64 + HEADER_BYTES;
            let t0 = Instant::now();
            let res: Result<ExchangeMsg, _> = c.post("/v1/federation/exchange", &msg).await;
            let rtt = t0.elapsed().as_secs_f64() * 1e3;
            match res {
                Ok(reply) => {
                    let got = serde_json::to_vec(&reply).map(|b| b.len()).unwrap_or(0) as u64
                        + HEADER_BYTES;
                    let mut inner = self.inner.lock().unwrap();
                    if let Some(p) = inner.peers.get_mut(&name) {
                        p.rtt_sample(rtt);
                        p.absorb(reply, now_ms());
                        p.bytes_sent += sent_bytes;
                        p.bytes_received += got;
                        p.exchanges += 1;
                        p.last_error = None;
                        for s in &msg.summaries {
                            p.last_sent.insert(s.service.clone(), s.clone());
                        }
                    }
                }
                Err(e) => {
                    self.note_error(&name, e.to_string());
                    let mut inner = self.inner.lock().unwrap();
                    if let Some(p) = inner.peers.get_mut(&name) {
                        p.bytes_sent += sent_bytes;
                    }
                }
            }
            if probe_due {
                self.probe(&name, c).await;
            }
            let next = {
                let mut inner = self.inner.lock().unwrap();
                let Some(p) = inner.peers.get_mut(&name) else {
                    return;
                };
                let link = p.link();
                let rtt = if link.rtt_ms.is_finite() {
                    link.rtt_ms
                } else {
                    0.0
                };
                p.interval_secs = self
                    .rule
                    .next(interval, sent_bytes, link.mbit, rtt, changed_any);
                p.interval_secs
            };
            tokio::time::sleep(Duration::from_secs_f64(next)).await;
        }
    }

    /// Measures the link's bandwidth: the peer sends [`PROBE_BYTES`]; the
    /// rate is taken over the second half of the body, past TCP's slow
    /// start on a connection that sat idle.
    async fn probe(&self, name: &str, c: &ApiClient) {
        let path = format!("/v1/federation/probe?bytes={PROBE_BYTES}");
        let r = async {
            let mut resp = c.get_response(&path).await?;
            let mut got = 0u64;
            let mut half: Option<(Instant, u64)> = None;
            while let Some(n) = c.chunk_len(&mut resp).await? {
                got += n as u64;
                if half.is_none() && got >= PROBE_BYTES / 2 {
                    half = Some((Instant::now(), got));
                }
            }
            Ok::<_, shoal_net::client::ApiError>((got, half))
        }
        .await;
        let mut inner = self.inner.lock().unwrap();
        let Some(p) = inner.peers.get_mut(name) else {
            return;
        };
        p.last_probe = Some(Instant::now());
        match r {
            Ok((got, Some((t, at)))) if got > at => {
                let secs = t.elapsed().as_secs_f64().max(1e-4);
                let mbit = (got - at) as f64 * 8.0 / secs / 1e6;
                p.mbit = Some(match p.mbit {
                    Some(m) => 0.7 * m + 0.3 * mbit,
                    None => mbit,
                });
                p.mbit_samples += 1;
                p.bytes_received += got + HEADER_BYTES;
            }
            Ok(_) => {}
            Err(e) => p.last_error = Some(format!("probe: {e}")),
        }
    }

    fn note_error(&self, name: &str, e: String) {
        let mut inner = self.inner.lock().unwrap();
        if let Some(p) = inner.peers.get_mut(name) {
            if p.last_error.as_deref() != Some(&e) {
                tracing::warn!("federation peer {name}: {e}");
            }
            p.last_error = Some(e);
        }
    }

    /// `GET /v1/federation`.
    pub fn status(&self) -> FederationStatus {
        let inner = self.inner.lock().unwrap();
        let now = now_ms();
        FederationStatus {
            cluster: self.name.clone(),
            peers: inner
                .peers
                .values()
                .filter(|p| !p.removed)
                .map(|p| PeerStatus {
                    cluster: p.rec.cluster.clone(),
                    url: p.rec.url.clone(),
                    state: match p.live.last_heard_ms {
                        None => "never heard",
                        Some(_) if p.live.alive(now) => "alive",
                        Some(_) => "presumed dead",
                    }
                    .into(),
                    last_heard_ms_ago: p.live.last_heard_ms.map(|t| now.saturating_sub(t)),
                    dead_after_ms: p.live.dead_after_ms(),
                    link: {
                        let mut l = p.link();
                        if !l.rtt_ms.is_finite() || l.rtt_ms >= 10_000.0 {
                            l.rtt_ms = 0.0;
                        }
                        l
                    },
                    bandwidth_samples: p.mbit_samples,
                    interval_ms: (p.interval_secs * 1e3) as u64,
                    summaries: p.theirs.values().cloned().collect(),
                    bytes_sent: p.bytes_sent,
                    bytes_received: p.bytes_received,
                    exchanges: p.exchanges,
                    last_error: p.last_error.clone(),
                    expires_ms: p.rec.expires_ms,
                })
                .collect(),
            local: Self::local_summaries(&inner),
            decisions: inner
                .local
                .iter()
                .map(|(k, l)| {
                    let mut sum = DecisionCounts::default();
                    for d in l.decisions.values() {
                        sum.local += d.local;
                        sum.local_consulted += d.local_consulted;
                        sum.fetch += d.fetch;
                        sum.redirect += d.redirect;
                        sum.from_peers += d.from_peers;
                    }
                    (k.clone(), sum)
                })
                .collect(),
        }
    }

    /// Uptime in ms (for the dashboard's freshness).
    pub fn uptime_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
}

/// Bytes an HTTP/1.1 request or response head adds to a body, roughly
/// (method, path, host, content type and length, date): the exchange's
/// overhead is counted with them.
const HEADER_BYTES: u64 = 160;

/// The federation routes (merged into the API router).
pub fn routes() -> Router<Arc<Ctx>> {
    Router::new()
        .route("/v1/federation", get(status))
        .route("/v1/federation/join", post(join))
        .route("/v1/federation/hello", get(hello))
        .route("/v1/federation/link", post(link))
        .route("/v1/federation/exchange", post(exchange))
        .route("/v1/federation/probe", get(probe))
        .route("/v1/federation/peers/{name}", delete(leave))
}

type ApiResult<T> = Result<T, ApiErr>;

async fn status(
    State(ctx): State<Arc<Ctx>>,
    Extension(peer): Extension<Peer>,
) -> ApiResult<axum::Json<FederationStatus>> {
    crate::api::need_any(&ctx, &peer)?;
    Ok(axum::Json(ctx.federation.status()))
}

/// `POST /v1/federation/join` (administrator): link with the cluster at
/// `url`, whose manager minted `token`.
#[derive(Debug, Deserialize, Serialize)]
pub struct JoinBody {
    /// The other cluster's manager URL.
    pub url: String,
    /// Its federation token.
    pub token: String,
}

async fn join(
    State(ctx): State<Arc<Ctx>>,
    Extension(peer): Extension<Peer>,
    body: Bytes,
) -> ApiResult<axum::Json<PeerStatus>> {
    need_admin(&ctx, &peer)?;
    let b: JoinBody = decode(&body)?;
    let token = Token::parse(&b.token).map_err(|e| {
        ApiErr(
            StatusCode::BAD_REQUEST,
            format!("token: {e}; mint one on the other cluster with `shoal token create --roles federation`"),
        )
    })?;
    let fed = &ctx.federation;
    let bad_gateway = |e: String| ApiErr(StatusCode::BAD_GATEWAY, e);
    let ca_pem = shoal_net::client::pinned_ca(&b.url, &token)
        .await
        .map_err(|e| bad_gateway(e.to_string()))?;
    let pinned = ApiClient::new_from(&b.url, &ca_pem, None, fed.source)
        .map_err(|e| bad_gateway(e.to_string()))?;
    let hello: Hello = pinned
        .get("/v1/federation/hello")
        .await
        .map_err(|e| bad_gateway(e.to_string()))?;
    if hello.cluster == fed.name {
        return Err(ApiErr(
            StatusCode::CONFLICT,
            format!(
                "the other cluster is also named {:?}; give one of them another name (`shoal init --name`, or `name` in config.toml) and join again",
                fed.name
            ),
        ));
    }
    let (cert_for_you, key_for_you) = ctx
        .ca
        .issue_client(
            &format!("{FEDERATION_CN_PREFIX}{}", hello.cluster),
            LINK_LIFE,
        )
        .map_err(|e| ApiErr(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let issued_key_fp = key_fp(&cert_for_you)?;
    let resp: LinkResponse = pinned
        .post(
            "/v1/federation/link",
            &LinkRequest {
                token: b.token.clone(),
                cluster: fed.name.clone(),
                url: fed.url.clone(),
                ca_pem: ctx.ca.pem.clone(),
                cert_for_you,
                key_for_you,
            },
        )
        .await
        .map_err(|e| bad_gateway(e.to_string()))?;
    if resp.cluster != hello.cluster {
        let _ = ctx.trust.revoke_key(&issued_key_fp);
        return Err(bad_gateway(format!(
            "the other manager said it is {:?}, then {:?}; join again",
            hello.cluster, resp.cluster
        )));
    }
    let rec = PeerRecord {
        cluster: resp.cluster.clone(),
        url: resp.url.clone(),
        ca_pem,
        cert_pem: resp.cert,
        key_pem: resp.key,
        issued_key_fp,
        expires_ms: resp.expires_ms,
    };
    fed.add_peer(rec)
        .map_err(|e| ApiErr(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?;
    ctx.registry.event(
        "federation",
        None,
        format!("linked with cluster {} at {}", resp.cluster, resp.url),
    );
    let st = fed.status();
    Ok(axum::Json(
        st.peers
            .into_iter()
            .find(|p| p.cluster == resp.cluster)
            .expect("just added"),
    ))
}

fn key_fp(cert_pem: &str) -> ApiResult<String> {
    let der = shoal_net::identity::first_cert_der(cert_pem)
        .map_err(|e| ApiErr(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    shoal_net::tls::cert_key_fingerprint(&der).ok_or_else(|| {
        ApiErr(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot read the certificate just issued".into(),
        )
    })
}

/// `POST /v1/federation/link`: another cluster asks to federate with a
/// token of ours (the TLS client is anonymous; the token is the proof).
async fn link(State(ctx): State<Arc<Ctx>>, body: Bytes) -> ApiResult<axum::Json<LinkResponse>> {
    let r: LinkRequest = decode(&body)?;
    let fed = &ctx.federation;
    let token = Token::parse(&r.token)
        .map_err(|e| ApiErr(StatusCode::BAD_REQUEST, format!("token: {e}")))?;
    if let Err(e) = validate_cluster_name(&r.cluster) {
        return Err(ApiErr(StatusCode::BAD_REQUEST, format!("cluster: {e}")));
    }
    if r.cluster == fed.name {
        return Err(ApiErr(
            StatusCode::CONFLICT,
            format!(
                "the asking cluster is named {:?}, as this one is; give one of them another name (`name` in config.toml)",
                r.cluster
            ),
        ));
    }
    let admitted = ctx
        .trust
        .admit_token(
            &token,
            &format!("federation-{}", r.cluster),
            &["federation".to_string()],
            true,
        )
        .map_err(|e| ApiErr(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")))?;
    match admitted {
        Ok((_, Some(roles))) if roles.iter().any(|x| x == "federation") => {}
        Ok(_) => {
            return Err(ApiErr(
                StatusCode::FORBIDDEN,
                "this token does not grant the federation role; mint one with `shoal token create --roles federation`".into(),
            ));
        }
        Err(refusal) => {
            return Err(ApiErr(StatusCode::FORBIDDEN, refusal.to_string()));
        }
    }
    // What the asker gave us must be a certificate of its CA naming us.
    let issued_by_them =
        shoal_net::tls::client_config(&r.ca_pem, Some((&r.cert_for_you, &r.key_for_you)));
    if let Err(e) = issued_by_them {
        return Err(ApiErr(
            StatusCode::BAD_REQUEST,
            format!("cert_for_you / ca_pem: {e}"),
        ));
    }
    let (cert, key) = ctx
        .ca
        .issue_client(&format!("{FEDERATION_CN_PREFIX}{}", r.cluster), LINK_LIFE)
        .map_err(|e| ApiErr(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let expires_ms = now_ms() + LINK_LIFE.as_millis() as u64;
    let rec = PeerRecord {
        cluster: r.cluster.clone(),
        url: r.url.clone(),
        ca_pem: r.ca_pem,
        cert_pem: r.cert_for_you,
        key_pem: r.key_for_you,
        issued_key_fp: key_fp(&cert)?,
        expires_ms,
    };
    fed.add_peer(rec)
        .map_err(|e| ApiErr(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?;
    ctx.registry.event(
        "federation",
        None,
        format!(
            "cluster {} at {} linked with a federation token",
            r.cluster, r.url
        ),
    );
    Ok(axum::Json(LinkResponse {
        cluster: fed.name.clone(),
        url: fed.url.clone(),
        cert,
        key,
        expires_ms,
    }))
}

fn validate_cluster_name(n: &str) -> Result<(), String> {
    if n.is_empty() || n.len() > 63 {
        return Err("must be 1 to 63 characters".into());
    }
    if !n
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(format!(
            "{n:?} may hold only letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

/// The peer cluster a request comes from: a certificate of our CA naming
/// `federation:<cluster>`, not revoked, of a cluster we are linked with.
fn need_peer(ctx: &Ctx, peer: &Peer) -> ApiResult<String> {
    let Some(name) = peer.federation() else {
        return Err(ApiErr(
            StatusCode::FORBIDDEN,
            "only a federated cluster's manager may do this (a federation certificate of this cluster's CA)".into(),
        ));
    };
    if peer
        .key_fp
        .as_deref()
        .is_some_and(|k| ctx.trust.is_revoked(k))
    {
        return Err(ApiErr(
            StatusCode::FORBIDDEN,
            "this federation certificate was revoked (`shoal federation leave`); join again".into(),
        ));
    }
    let inner = ctx.federation.inner.lock().unwrap();
    match inner.peers.get(name) {
        Some(p) if !p.removed && peer.key_fp.as_deref() == Some(p.rec.issued_key_fp.as_str()) => {
            Ok(name.to_string())
        }
        _ => Err(ApiErr(
            StatusCode::FORBIDDEN,
            format!(
                "cluster {name:?} is not federated with this one, or presents a certificate this cluster no longer holds for it; join again"
            ),
        )),
    }
}

/// `GET /v1/federation/hello`: this cluster's name, to anyone (a joining
/// cluster learns it before it issues the certificate naming it).
#[derive(Debug, Serialize, Deserialize)]
pub struct Hello {
    /// The cluster's name.
    pub cluster: String,
}

async fn hello(State(ctx): State<Arc<Ctx>>) -> axum::Json<Hello> {
    axum::Json(Hello {
        cluster: ctx.federation.name.clone(),
    })
}

async fn exchange(
    State(ctx): State<Arc<Ctx>>,
    Extension(peer): Extension<Peer>,
    body: Bytes,
) -> ApiResult<axum::Json<ExchangeMsg>> {
    let name = need_peer(&ctx, &peer)?;
    let msg: ExchangeMsg = decode(&body)?;
    if msg.cluster != name {
        return Err(ApiErr(
            StatusCode::FORBIDDEN,
            format!(
                "the message says it is from {:?}, the certificate says {name:?}",
                msg.cluster
            ),
        ));
    }
    let fed = &ctx.federation;
    let mut inner = fed.inner.lock().unwrap();
    let Some(p) = inner.peers.get_mut(&name) else {
        return Err(ApiErr(StatusCode::FORBIDDEN, "not federated".into()));
    };
    p.bytes_received += body.len() as u64 + HEADER_BYTES;
    p.absorb(msg, now_ms());
    let reply = fed.message_for(&inner, &inner.peers[&name]).0;
    let sent = serde_json::to_vec(&reply).map(|v| v.len()).unwrap_or(0) as u64 + HEADER_BYTES;
    if let Some(p) = inner.peers.get_mut(&name) {
        p.bytes_sent += sent;
    }
    Ok(axum::Json(reply))
}

#[derive(Deserialize)]
struct ProbeQuery {
    bytes: u64,
}

async fn probe(
    State(ctx): State<Arc<Ctx>>,
    Extension(peer): Extension<Peer>,
    Query(q): Query<ProbeQuery>,
) -> ApiResult<Vec<u8>> {
    let name = need_peer(&ctx, &peer)?;
    if q.bytes > 4 * PROBE_BYTES {
        return Err(ApiErr(
            StatusCode::BAD_REQUEST,
            format!("a probe is at most {} bytes", 4 * PROBE_BYTES),
        ));
    }
    let mut inner = ctx.federation.inner.lock().unwrap();
    if let Some(p) = inner.peers.get_mut(&name) {
        p.bytes_sent += q.bytes + HEADER_BYTES;
    }
    // Random bytes: nothing on the way can compress them.
    let mut v = vec![0u8; q.bytes as usize];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut v);
    Ok(v)
}

async fn leave(
    State(ctx): State<Arc<Ctx>>,
    Extension(peer): Extension<Peer>,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<serde_json::Value>> {
    need_admin(&ctx, &peer)?;
    let fed = &ctx.federation;
    let fp = {
        let mut inner = fed.inner.lock().unwrap();
        let Some(p) = inner.peers.get_mut(&name).filter(|p| !p.removed) else {
            return Err(ApiErr(
                StatusCode::NOT_FOUND,
                format!("no federated cluster {name:?}; `shoal federation status` lists them"),
            ));
        };
        p.removed = true;
        let fp = p.rec.issued_key_fp.clone();
        fed.save(&inner)
            .map_err(|e| ApiErr(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?;
        inner.peers.remove(&name);
        fp
    };
    ctx.trust
        .revoke_key(&fp)
        .map_err(|e| ApiErr(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    ctx.registry.event(
        "federation",
        None,
        format!("left cluster {name}: its certificate {fp} is revoked"),
    );
    Ok(axum::Json(serde_json::json!({"left": name, "revoked": fp})))
}
