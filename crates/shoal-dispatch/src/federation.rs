//! A federated service's dispatcher (H-SWEB's broker, §3): for every GET or
//! HEAD it predicts the local time with shoal-core's cost model and, over
//! the threshold or when the object is not here, weighs fetching it from a
//! peer cluster or redirecting the client there. The peers' summaries and
//! the links' estimates come from the manager in the answer to each load
//! report ([`FedView`]); what this dispatcher measures (its backends'
//! objects, each request class's service time, the paths to clients other
//! clusters sent here, its fetches' throughput, its decisions) goes back
//! in the next report ([`FedReport`]).

use crate::backends::{Backends, HealthOpts};
use crate::clock::Clock;
use arc_swap::ArcSwapOption;
use shoal_core::federation::summary::class_key;
use shoal_core::federation::wire::{DecisionCounts, FedReport, FedView};
use shoal_core::federation::{
    ClassTime, ClientPath, CostInputs, Decision, Model, NetPath, PeerView, Placement, object_key,
};
use shoal_core::select::{self, Algo, BackendSpec, SelectorConfig};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often the backends' object lists are read.
const INVENTORY_EVERY: Duration = Duration::from_secs(5);
/// Request classes reported (the busiest).
const CLASSES_REPORTED: usize = 64;
/// Request classes remembered.
const CLASSES_KEPT: usize = 4096;
use shoal_core::federation::MIN_MEASURED_BYTES;
/// Redirects count as pending load on their target for this long.
const REDIRECT_PENDING_MS: u64 = 1000;

/// One peer's runtime state, kept across views: the backend table used to
/// fetch from its dispatcher, our requests in flight to it, our recent
/// redirects to it.
#[derive(Debug)]
pub struct PeerRt {
    /// The peer cluster.
    pub cluster: String,
    /// Its dispatcher.
    pub addr: String,
    /// A one-backend table of its dispatcher (for fetches).
    pub backends: Arc<Backends>,
    in_flight: AtomicU32,
    redirects: Mutex<VecDeque<u64>>,
    /// Requests that could have measured its unmeasured path to our clients.
    unmeasured: AtomicU64,
}

/// A peer as the current view has it.
#[derive(Debug)]
struct LivePeer {
    view: PeerView,
    objects: HashMap<u64, u64>,
    classes: HashMap<u64, f64>,
    rt: Arc<PeerRt>,
}

#[derive(Debug)]
struct Live {
    cluster: String,
    model: Model,
    /// The object-list version the manager holds from us.
    manager_version: u64,
    peers: Vec<LivePeer>,
}

#[derive(Debug, Default)]
struct Objects {
    version: u64,
    /// `None`: no backend lists its objects (not `shoal www`): every object
    /// is taken to be here.
    map: Option<HashMap<u64, u64>>,
    list: Vec<(u64, u64)>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Class {
    base_ms: f64,
    n: u64,
}

#[derive(Debug, Default)]
struct PathStat {
    rtt_ms: f64,
    mbit: f64,
    n: u64,
}

/// The federation state of one dispatcher.
#[derive(Debug)]
pub struct Fed {
    live: ArcSwapOption<Live>,
    objects: arc_swap::ArcSwap<Objects>,
    classes: Mutex<HashMap<u64, Class>>,
    paths: Mutex<HashMap<String, PathStat>>,
    fetch_mbit: Mutex<HashMap<String, f64>>,
    peers: Mutex<HashMap<String, Arc<PeerRt>>>,
    /// Requests served by our backends now.
    pub in_flight: AtomicU32,
    local: AtomicU64,
    local_consulted: AtomicU64,
    fetch: AtomicU64,
    redirect: AtomicU64,
    from_peers: AtomicU64,
    clock: Clock,
    health: HealthOpts,
    /// Where connections to peers come from (the listen address).
    source: Option<std::net::IpAddr>,
}

/// What the proxy does with one request.
#[derive(Debug)]
pub enum Route {
    /// Served by the local backends (`Some`: it came from a peer, the
    /// cluster named).
    Local(Option<String>),
    /// Fetched from the peer's dispatcher.
    Fetch(Arc<PeerRt>),
    /// Redirected: the Location.
    Redirect(String),
}

/// What the proxy measures on a request's way and hands back when it ends.
#[derive(Debug)]
pub enum Track {
    /// A local request of this class, sent with this many of ours in flight.
    Class { key: u64, in_flight: u32 },
    /// A fetch from this peer.
    Fetch(Arc<PeerRt>),
    /// A request a peer cluster redirected here.
    From(String),
}

/// The dispatcher's own backends' count, for the per-backend load.
fn nodes(backends: &Backends) -> u32 {
    backends.load().set.len() as u32
}

impl Fed {
    /// A fresh state; the first report's answer brings the view.
    pub fn new(clock: Clock, health: HealthOpts, source: Option<std::net::IpAddr>) -> Arc<Self> {
        Arc::new(Self {
            live: ArcSwapOption::empty(),
            objects: Default::default(),
            classes: Default::default(),
            paths: Default::default(),
            fetch_mbit: Default::default(),
            peers: Default::default(),
            in_flight: AtomicU32::new(0),
            local: AtomicU64::new(0),
            local_consulted: AtomicU64::new(0),
            fetch: AtomicU64::new(0),
            redirect: AtomicU64::new(0),
            from_peers: AtomicU64::new(0),
            clock,
            health,
            source,
        })
    }

    fn peer_rt(&self, cluster: &str, addr: &str) -> Arc<PeerRt> {
        let mut peers = self.peers.lock().unwrap();
        if let Some(p) = peers.get(cluster)
            && p.addr == addr
        {
            return p.clone();
        }
        let selector = select::build(&SelectorConfig {
            algo: Algo::Rr,
            ..SelectorConfig::default()
        })
        .expect("round robin builds");
        let backends = Backends::new(
            &[BackendSpec {
                addr: addr.to_string(),
                weight: 1,
                draining: false,
            }],
            selector,
            self.health.clone(),
            self.clock.clone(),
        )
        .expect("one backend");
        if let Some(ip) = self.source {
            backends.set_source(ip);
        }
        let rt = Arc::new(PeerRt {
            cluster: cluster.to_string(),
            addr: addr.to_string(),
            backends,
            in_flight: AtomicU32::new(0),
            redirects: Mutex::new(VecDeque::new()),
            unmeasured: AtomicU64::new(0),
        });
        peers.insert(cluster.to_string(), rt.clone());
        rt
    }

    /// Takes in the manager's view.
    pub fn apply(&self, v: FedView) {
        let mut peers = Vec::new();
        for p in v.peers {
            let Some(s) = p.summary else { continue };
            if s.dispatcher.is_empty() {
                continue;
            }
            let rt = self.peer_rt(&p.cluster, &s.dispatcher);
            // Its dispatcher was ejected after failed fetches: tried again
            // once the ejection is over and its manager is heard from.
            if p.alive {
                for (_, addr) in rt.backends.due_for_readmission() {
                    rt.backends.readmit(&addr);
                }
            }
            let client_path = s
                .client_paths
                .iter()
                .find(|c| c.from == v.cluster && c.samples > 0)
                .map(|c| NetPath {
                    rtt_ms: c.rtt_ms,
                    mbit: c.mbit,
                });
            peers.push(LivePeer {
                view: PeerView {
                    cluster: p.cluster.clone(),
                    dispatcher: s.dispatcher.clone(),
                    alive: p.alive,
                    link: p.link,
                    client_path,
                    load: s.avg_load,
                    nodes: s.nodes,
                    pending: 0.0,
                    holds: None,
                    base_ms: None,
                    explore: false,
                },
                objects: s.objects.iter().copied().collect(),
                classes: s.classes.iter().map(|c| (c.key, c.base_ms)).collect(),
                rt,
            });
        }
        self.live.store(Some(Arc::new(Live {
            cluster: v.cluster,
            model: v.model,
            manager_version: v.objects_version,
            peers,
        })));
    }

    /// Whether the service is federated (the manager sent a view).
    pub fn active(&self) -> bool {
        self.live.load().is_some()
    }

    /// The service is no longer federated.
    pub fn clear(&self) {
        self.live.store(None);
    }

    /// This cluster's name, once the manager said it.
    pub fn cluster(&self) -> Option<String> {
        self.live.load().as_ref().map(|l| l.cluster.clone())
    }

    /// The cost model's inputs for a request, and its decision (`None`:
    /// no view yet).
    pub fn decide(
        &self,
        target: &str,
        client_rtt_ms: f64,
        from_peer: bool,
        backends: &Backends,
        count: bool,
    ) -> Option<(Decision, Vec<PeerView>)> {
        let live = self.live.load_full()?;
        let okey = object_key(target);
        let ckey = class_key(target);
        let objects = self.objects.load();
        let held_by_peer = live
            .peers
            .iter()
            .find_map(|p| p.objects.get(&okey).copied());
        // What no list names (a computed answer, `/_shoal/burn`) every
        // cluster of the service can give.
        let dynamic =
            held_by_peer.is_none() && objects.map.as_ref().is_none_or(|m| !m.contains_key(&okey));
        let local_size = match &objects.map {
            None => Some(held_by_peer.unwrap_or(0)),
            Some(_) if dynamic => Some(0),
            Some(m) => m.get(&okey).copied(),
        };
        let base_ms = self.classes.lock().unwrap().get(&ckey).map(|c| c.base_ms);
        let now = self.clock.now_ms();
        let n = nodes(backends);
        let local_load = f64::from(self.in_flight.load(Relaxed)) / f64::from(n.max(1));
        let peers: Vec<PeerView> = live
            .peers
            .iter()
            .map(|p| {
                let mut v = p.view.clone();
                // A dispatcher that failed our fetches is out until its
                // ejection ends, whatever its manager says.
                v.alive &= p.rt.backends.load().set.iter().any(|b| b.healthy());
                v.holds = if dynamic {
                    Some(0)
                } else {
                    p.objects.get(&okey).copied()
                };
                v.base_ms = p.classes.get(&ckey).copied();
                let recent = {
                    let mut r = p.rt.redirects.lock().unwrap();
                    while r
                        .front()
                        .is_some_and(|t| now.saturating_sub(*t) > REDIRECT_PENDING_MS)
                    {
                        r.pop_front();
                    }
                    r.len()
                };
                v.pending = f64::from(p.rt.in_flight.load(Relaxed)) + recent as f64;
                if count
                    && !from_peer
                    && v.client_path.is_none()
                    && v.holds
                        .is_some_and(|s| s >= shoal_core::federation::MIN_MEASURED_BYTES)
                {
                    v.explore =
                        shoal_core::federation::explore_now(p.rt.unmeasured.fetch_add(1, Relaxed));
                }
                v
            })
            .collect();
        let inputs = CostInputs {
            local_size,
            client: NetPath {
                rtt_ms: client_rtt_ms,
                mbit: live.model.client_mbit,
            },
            local_load,
            local_nodes: n,
            base_ms,
            from_peer,
            peers: &peers,
        };
        Some((live.model.decide(&inputs), peers))
    }

    /// Where one request goes; counts the decision.
    pub fn route(
        &self,
        target: &str,
        client_rtt_ms: f64,
        from: Option<String>,
        backends: &Backends,
    ) -> Route {
        if from.is_some() {
            self.from_peers.fetch_add(1, Relaxed);
            return Route::Local(from);
        }
        let Some((d, _)) = self.decide(target, client_rtt_ms, false, backends, true) else {
            return Route::Local(None);
        };
        let live = self.live.load_full();
        let peer = |name: &str| {
            live.as_ref()
                .and_then(|l| l.peers.iter().find(|p| p.view.cluster == name))
                .map(|p| p.rt.clone())
        };
        match &d.chosen {
            Placement::Local => {
                if d.consulted {
                    self.local_consulted.fetch_add(1, Relaxed);
                } else {
                    self.local.fetch_add(1, Relaxed);
                }
                Route::Local(None)
            }
            Placement::Fetch(p) => match peer(p) {
                Some(rt) => {
                    self.fetch.fetch_add(1, Relaxed);
                    Route::Fetch(rt)
                }
                None => Route::Local(None),
            },
            Placement::Redirect(p) => match (peer(p), live.as_ref()) {
                (Some(rt), Some(l)) => {
                    self.redirect.fetch_add(1, Relaxed);
                    rt.redirects.lock().unwrap().push_back(self.clock.now_ms());
                    Route::Redirect(redirect_location(&rt.addr, target, &l.cluster))
                }
                _ => Route::Local(None),
            },
        }
    }

    /// Marks a fetch as started (the guard ends it).
    pub fn fetch_started(rt: &Arc<PeerRt>) -> FetchGuard {
        rt.in_flight.fetch_add(1, Relaxed);
        FetchGuard(rt.clone())
    }

    /// Records what a finished request measured: `ttfb` its time to the
    /// response head, `elapsed` since then to its end, `bytes` its body,
    /// `tcp` the client connection's kernel estimates (RTT ms, delivery
    /// rate Mbit/s) when the request came from a peer.
    pub fn finish(
        &self,
        track: Track,
        ttfb: Duration,
        elapsed: Duration,
        bytes: u64,
        backends: &Backends,
        tcp: Option<(f64, f64)>,
    ) {
        match track {
            Track::Class { key, in_flight } => {
                let per_backend = f64::from(in_flight) / f64::from(nodes(backends).max(1));
                let base = ttfb.as_secs_f64() * 1e3 / (1.0 + per_backend);
                let mut c = self.classes.lock().unwrap();
                if c.len() >= CLASSES_KEPT && !c.contains_key(&key) {
                    // Forget the least used half.
                    let mut v: Vec<(u64, u64)> = c.iter().map(|(k, x)| (*k, x.n)).collect();
                    v.sort_by_key(|x| x.1);
                    for (k, _) in v.iter().take(CLASSES_KEPT / 2) {
                        c.remove(k);
                    }
                }
                let e = c.entry(key).or_default();
                e.base_ms = if e.n == 0 {
                    base
                } else {
                    0.8 * e.base_ms + 0.2 * base
                };
                e.n += 1;
            }
            Track::Fetch(rt) => {
                if bytes >= MIN_MEASURED_BYTES && elapsed > Duration::ZERO {
                    let mbit = bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e6;
                    let mut m = self.fetch_mbit.lock().unwrap();
                    let e = m.entry(rt.cluster.clone()).or_insert(mbit);
                    *e = 0.7 * *e + 0.3 * mbit;
                }
            }
            Track::From(cluster) => {
                if let Some((rtt, mbit)) = tcp
                    && bytes >= MIN_MEASURED_BYTES
                    && mbit > 0.0
                {
                    let mut p = self.paths.lock().unwrap();
                    let e = p.entry(cluster).or_default();
                    if e.n == 0 {
                        e.rtt_ms = rtt;
                        e.mbit = mbit;
                    } else {
                        e.rtt_ms = 0.8 * e.rtt_ms + 0.2 * rtt;
                        e.mbit = 0.8 * e.mbit + 0.2 * mbit;
                    }
                    e.n += 1;
                }
            }
        }
    }

    /// The report's federation part; the object list goes along when the
    /// manager holds another version.
    pub fn report(&self) -> FedReport {
        let objects = self.objects.load();
        let manager_version = self.live.load().as_ref().map(|l| l.manager_version);
        let mut classes: Vec<(u64, Class)> = self
            .classes
            .lock()
            .unwrap()
            .iter()
            .map(|(k, c)| (*k, *c))
            .collect();
        classes.sort_by_key(|c| std::cmp::Reverse(c.1.n));
        FedReport {
            objects_version: objects.version,
            objects: (manager_version != Some(objects.version)).then(|| objects.list.clone()),
            classes: classes
                .into_iter()
                .take(CLASSES_REPORTED)
                .map(|(key, c)| ClassTime {
                    key,
                    base_ms: c.base_ms,
                })
                .collect(),
            client_paths: self
                .paths
                .lock()
                .unwrap()
                .iter()
                .map(|(from, p)| ClientPath {
                    from: from.clone(),
                    rtt_ms: p.rtt_ms,
                    mbit: p.mbit,
                    samples: p.n,
                })
                .collect(),
            decisions: self.counts(),
            fetch_mbit: self
                .fetch_mbit
                .lock()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
        }
    }

    /// The decisions so far.
    pub fn counts(&self) -> DecisionCounts {
        DecisionCounts {
            local: self.local.load(Relaxed),
            local_consulted: self.local_consulted.load(Relaxed),
            fetch: self.fetch.load(Relaxed),
            redirect: self.redirect.load(Relaxed),
            from_peers: self.from_peers.load(Relaxed),
        }
    }

    /// Sets the backends' object list (from their `/_shoal/inventory`).
    fn set_objects(&self, map: Option<HashMap<u64, u64>>) {
        let cur = self.objects.load();
        if cur.map == map {
            return;
        }
        let mut list: Vec<(u64, u64)> = map
            .as_ref()
            .map(|m| m.iter().map(|(k, v)| (*k, *v)).collect())
            .unwrap_or_default();
        list.sort_unstable();
        self.objects.store(Arc::new(Objects {
            version: cur.version + 1,
            map,
            list,
        }));
    }
}

/// Ends a fetch's count on its peer.
#[derive(Debug)]
pub struct FetchGuard(Arc<PeerRt>);
impl Drop for FetchGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

/// The Location of a redirect: the peer's dispatcher, the same target, and
/// the parameter that makes it serve the request where it lands.
pub fn redirect_location(addr: &str, target: &str, from_cluster: &str) -> String {
    let sep = if target.contains('?') { '&' } else { '?' };
    format!(
        "http://{addr}{target}{sep}{}={from_cluster}",
        shoal_core::federation::REDIRECT_PARAM
    )
}

/// Splits a redirected request's target: the target without the
/// parameter, and the cluster that redirected it.
pub fn strip_redirect_param(target: &str) -> Option<(String, String)> {
    let (path, query) = target.split_once('?')?;
    let key = shoal_core::federation::REDIRECT_PARAM;
    let mut from = None;
    let rest: Vec<&str> = query
        .split('&')
        .filter(
            |kv| match kv.strip_prefix(key).and_then(|r| r.strip_prefix('=')) {
                Some(v) if from.is_none() => {
                    from = Some(v.to_string());
                    false
                }
                _ => true,
            },
        )
        .collect();
    let from = from?;
    let t = if rest.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", rest.join("&"))
    };
    Some((t, from))
}

/// The client connection's kernel estimates: its lowest RTT seen (ms; the
/// smoothed one counts the queues a large response filled, which a new
/// connection does not wait behind) and delivery rate (Mbit/s).
pub fn tcp_estimates(fd: std::os::fd::RawFd) -> Option<(f64, f64)> {
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is a properly sized, writable tcp_info and `len` its
    // size; the kernel writes at most `len` bytes. A closed or reused fd
    // only makes the call fail or describe another socket's estimates.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return None;
    }
    Some((
        f64::from(info.tcpi_min_rtt) / 1e3,
        info.tcpi_delivery_rate as f64 * 8.0 / 1e6,
    ))
}

/// Reads the backends' object lists every few seconds, until the process
/// ends. A backend that does not list its objects (not `shoal www`) makes
/// the cluster's list unknown: every object is then taken to be here.
pub async fn inventory_loop(fed: Arc<Fed>, backends: Arc<Backends>) {
    let http = match reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .no_proxy()
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("federation inventory client: {e}");
            return;
        }
    };
    loop {
        if !fed.active() {
            tokio::time::sleep(INVENTORY_EVERY).await;
            continue;
        }
        let addrs: Vec<String> = backends
            .status()
            .into_iter()
            .filter(|b| !b.draining)
            .map(|b| b.addr)
            .collect();
        let mut map: Option<HashMap<u64, u64>> = if addrs.is_empty() {
            fed.objects.load().map.clone()
        } else {
            Some(HashMap::new())
        };
        for a in &addrs {
            let url = format!("http://{a}/_shoal/inventory");
            let got = async {
                let r = http.get(&url).send().await.ok()?;
                if !r.status().is_success() {
                    return None;
                }
                r.text().await.ok()
            }
            .await;
            match (got, map.as_mut()) {
                (Some(text), Some(m)) => {
                    for line in text.lines() {
                        if let Some((size, path)) = line.split_once(' ')
                            && let Ok(size) = size.parse::<u64>()
                        {
                            m.insert(object_key(path), size);
                        }
                    }
                }
                (None, _) => {
                    // One backend cannot say what it holds: the list is
                    // unknown (rather than wrongly short).
                    map = None;
                    break;
                }
                _ => {}
            }
        }
        fed.set_objects(map);
        tokio::time::sleep(INVENTORY_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_redirect_parameter_round_trips() {
        let l = redirect_location("10.0.0.1:80", "/a/b?x=1", "east");
        assert_eq!(l, "http://10.0.0.1:80/a/b?x=1&_shoal_from=east");
        assert_eq!(
            strip_redirect_param("/a/b?x=1&_shoal_from=east"),
            Some(("/a/b?x=1".into(), "east".into()))
        );
        assert_eq!(
            strip_redirect_param("/a?_shoal_from=east"),
            Some(("/a".into(), "east".into()))
        );
        assert_eq!(strip_redirect_param("/a?x=1"), None);
        assert_eq!(strip_redirect_param("/a"), None);
    }
}
