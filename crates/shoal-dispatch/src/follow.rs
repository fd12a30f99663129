//! Following a service's backend list in the manager (LAMA's dispatcher
//! control parameters, D-CP): long-poll `GET /v1/services/{name}/backends`
//! and swap each new list in atomically with [`Backends::apply`]; every
//! second, report the per-backend load this dispatcher sees (requests in
//! flight, mean in flight, requests per second) so the manager can size the
//! service on a per-backend metric and know when a draining backend is idle.
//!
//! The dispatcher authenticates with a dispatcher certificate (`shoal cert
//! dispatcher --service NAME --out DIR`, then `--dir DIR`), which reads this
//! service's backend list and reports its load and nothing else; a cluster
//! directory's administrator certificate works too.

use crate::backends::Backends;
use anyhow::Context as _;
use shoal_core::select::BackendSpec;
use shoal_net::client::ApiClient;
use shoal_net::identity::ClusterDir;
use shoal_net::wire::{BackendList, BackendLoad, DispatchReport};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Seconds a backend-list long-poll may wait at the manager.
const WAIT_SECS: u32 = 8;
/// How often the load is reported.
const REPORT_EVERY: Duration = Duration::from_secs(1);
/// How often in-flight requests are sampled for the mean.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// Where to follow a service.
#[derive(Debug, Clone)]
pub struct Target {
    /// Manager URL, overriding the one the cluster directory records.
    pub manager: Option<String>,
    /// Service name.
    pub service: String,
    /// Cluster directory holding admin.pem.
    pub dir: PathBuf,
}

impl Target {
    fn client(&self) -> anyhow::Result<ApiClient> {
        ApiClient::for_dir(&ClusterDir::new(&self.dir), self.manager.as_deref()).with_context(|| {
            format!(
                "--dir {}: reading a service's backend list needs the cluster directory's admin certificate",
                self.dir.display()
            )
        })
    }

    fn path(&self, after: Option<u64>) -> String {
        match after {
            Some(v) => format!(
                "/v1/services/{}/backends?after={v}&wait={WAIT_SECS}",
                self.service
            ),
            None => format!("/v1/services/{}/backends", self.service),
        }
    }

    /// The service's current list (to start with).
    pub async fn fetch(&self) -> anyhow::Result<BackendList> {
        Ok(self.client()?.get(&self.path(None)).await?)
    }

    /// The list once its version is past `after` (or the same list when
    /// the manager's long-poll times out first).
    pub async fn wait_change(&self, after: u64) -> anyhow::Result<BackendList> {
        Ok(self.client()?.get(&self.path(Some(after))).await?)
    }

    /// The target named by `--service`, `--manager` and `--dir` (`None`
    /// without `--service`); the manager defaults to the one the cluster
    /// directory records.
    pub fn of(
        service: Option<&str>,
        manager: Option<&str>,
        dir: Option<&std::path::Path>,
    ) -> anyhow::Result<Option<Self>> {
        match (service, dir) {
            (None, _) if manager.is_some() => anyhow::bail!(
                "--manager needs --service NAME: name the service whose backend list to use"
            ),
            (None, _) => Ok(None),
            (Some(_), None) => anyhow::bail!(
                "--service needs --dir CLUSTER_DIR (or SHOAL_DIR): the cluster directory's admin \
                 certificate authenticates to the manager"
            ),
            (Some(s), Some(d)) => Ok(Some(Self {
                manager: manager.map(str::to_string),
                service: s.to_string(),
                dir: d.to_path_buf(),
            })),
        }
    }

    /// Applies the service's dispatch settings (algorithm, hash, replicas)
    /// to `select`, which they replace.
    pub fn settings_into(list: &BackendList, select: &mut crate::SelectArgs) -> anyhow::Result<()> {
        select.algo = list.dispatch.algo.parse()?;
        select.hash = list.dispatch.hash.parse()?;
        select.replicas = list.dispatch.replicas;
        Ok(())
    }
}

/// The list as the selector takes it.
pub fn specs(list: &BackendList) -> Vec<BackendSpec> {
    list.backends
        .iter()
        .map(|b| BackendSpec {
            addr: b.address.clone(),
            weight: b.weight.max(1),
            draining: b.draining,
        })
        .collect()
}

/// Follows the list and reports load until the process ends. `version` is
/// the version already applied.
pub async fn run(
    target: Target,
    backends: Arc<Backends>,
    id: String,
    version: u64,
    fed: Arc<crate::federation::Fed>,
) {
    let applied = Arc::new(AtomicU64::new(version));
    tokio::spawn(report_loop(
        target.clone(),
        backends.clone(),
        id,
        applied.clone(),
        fed,
    ));
    let client = match target.client() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e:#}");
            return;
        }
    };
    let mut failures = 0u32;
    loop {
        let after = applied.load(Relaxed);
        match client.get::<BackendList>(&target.path(Some(after))).await {
            Ok(list) => {
                failures = 0;
                if list.version == after {
                    continue;
                }
                match backends.apply(&specs(&list)) {
                    Ok(()) => {
                        applied.store(list.version, Relaxed);
                        tracing::info!(
                            version = list.version,
                            backends = list.backends.len(),
                            "backend list applied"
                        );
                    }
                    Err(e) => {
                        tracing::warn!("backend list {} refused: {e}", list.version);
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
            Err(e) => {
                // Keep serving the last list while the manager is away.
                failures = failures.saturating_add(1);
                if failures == 1 {
                    tracing::warn!("following {}: {e}; retrying", target.service);
                }
                let ms = (100u64 << failures.min(5)).min(3000);
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
        }
    }
}

/// The manager's answer to a load report: a federated service's view.
#[derive(Debug, serde::Deserialize)]
struct ReportAnswer {
    #[serde(default)]
    federation: Option<shoal_core::federation::wire::FedView>,
}

async fn report_loop(
    target: Target,
    backends: Arc<Backends>,
    id: String,
    applied: Arc<AtomicU64>,
    fed: Arc<crate::federation::Fed>,
) {
    let client = match target.client() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e:#}");
            return;
        }
    };
    let path = format!("/v1/services/{}/report", target.service);
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_report = Instant::now();
    let mut prev_sel: HashMap<String, u64> = backends
        .status()
        .into_iter()
        .map(|b| (b.addr, b.selections))
        .collect();
    let mut active_sum: HashMap<String, (f64, u32)> = HashMap::new();
    loop {
        tick.tick().await;
        // The version first: it is then a lower bound of the list the
        // sampled counters belong to, so the manager never sees a backend
        // idle under a list that had not yet stopped sending to it.
        let version = applied.load(Relaxed);
        let now = backends.status();
        for b in &now {
            let e = active_sum.entry(b.addr.clone()).or_default();
            e.0 += f64::from(b.active);
            e.1 += 1;
        }
        let dt = last_report.elapsed();
        if dt < REPORT_EVERY {
            continue;
        }
        last_report = Instant::now();
        let secs = dt.as_secs_f64();
        let loads: Vec<BackendLoad> = now
            .iter()
            .map(|b| {
                let (sum, n) = active_sum.get(&b.addr).copied().unwrap_or_default();
                let prev = prev_sel.get(&b.addr).copied().unwrap_or(0);
                BackendLoad {
                    address: b.addr.clone(),
                    active: if n > 0 { sum / f64::from(n) } else { 0.0 },
                    in_flight: b.active,
                    rps: b.selections.saturating_sub(prev) as f64 / secs,
                }
            })
            .collect();
        prev_sel = now.iter().map(|b| (b.addr.clone(), b.selections)).collect();
        active_sum.clear();
        let report = DispatchReport {
            dispatcher: id.clone(),
            version,
            backends: loads,
            federation: fed.active().then(|| fed.report()),
        };
        match client.post::<_, ReportAnswer>(&path, &report).await {
            Ok(a) => match a.federation {
                Some(v) => fed.apply(v),
                None => fed.clear(),
            },
            Err(e) => tracing::debug!("report: {e}"),
        }
    }
}
