//! Parallel jobs with DPS shares (thesis ch. 5): their definitions
//! (durable, kind `job`, with the placement of their units), the units as
//! apps on nodes, and the banker: every unit's agent reports what the unit
//! used and whom it waited for every period T, and gets its share back.
//!
//! The ledger is [`shoal_core::shares::Job`]; this module only places,
//! stores and hands reports over. The ledger itself is soft state, as
//! leases and load are: after a manager restart every unit starts again at
//! W/N and the exchange moves the shares back within a few periods.

use crate::state::Registry;
use shoal_core::shares::spec::{JobSpec, JobStatus, ShareReply, UnitReportBody, UnitStatus};
use shoal_core::shares::{Command, Job, Placement, UnitReport, choose_migration, settled};
use shoal_net::wire::{AppAssignment, LeaseState, Params};
use shoal_store::Store;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Store kind of job definitions.
pub const KIND_JOB: &str = "job";

/// Apps of jobs on nodes are named `job-NAME-I`.
pub const JOB_APP_PREFIX: &str = "job-";

/// Why a job request was refused.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Bad definition or request.
    #[error("{0}")]
    Invalid(String),
    /// No such job.
    #[error("no job named {0:?}; `shoal job list` shows the jobs")]
    NotFound(String),
    /// The name is taken.
    #[error(
        "a job named {0:?} exists already; stop it first (`shoal job stop {0}`) or pick another name"
    )]
    Exists(String),
    /// The store failed.
    #[error("store: {0}")]
    Store(String),
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct JobDoc {
    spec: JobSpec,
    placement: Vec<String>,
    /// Per unit, the iteration a unit moved to another node starts after
    /// (its last report; it has no checkpoint there). Empty: none moved.
    #[serde(default)]
    start_at: Vec<u64>,
}

struct Entry {
    doc: JobDoc,
    ledger: Job,
    units: Vec<UnitStatus>,
    node_free: BTreeMap<String, (f64, f64)>,
    last_payout_ms: u64,
    bottlenecks: Vec<String>,
    /// Per unit, when it last moved (manager clock, seconds; -inf: never).
    moved_at: Vec<f64>,
    migrations: Vec<String>,
}

impl Entry {
    fn new(doc: JobDoc) -> Result<Self, JobError> {
        let ledger = Job::new(doc.spec.units, doc.spec.max_cpu, doc.spec.mode)
            .map_err(|e| JobError::Invalid(e.to_string()))?;
        let units = doc
            .placement
            .iter()
            .enumerate()
            .map(|(i, n)| UnitStatus {
                unit: i,
                node: n.clone(),
                share: ledger.enforced(i),
                used: 0.0,
                upstream: Vec::new(),
                iterations: None,
                finished: false,
            })
            .collect();
        Ok(Self {
            moved_at: vec![f64::NEG_INFINITY; doc.placement.len()],
            doc,
            ledger,
            units,
            node_free: BTreeMap::new(),
            last_payout_ms: 0,
            bottlenecks: Vec::new(),
            migrations: Vec::new(),
        })
    }

    fn status(&self) -> JobStatus {
        let mut units = self.units.clone();
        for u in &mut units {
            u.share = self.ledger.enforced(u.unit);
        }
        JobStatus {
            spec: self.doc.spec.clone(),
            bank: self.ledger.bank(),
            accounted: self.ledger.accounted(),
            finished: units.iter().all(|u| u.finished),
            units,
            bottlenecks: self.bottlenecks.clone(),
            migrations: self.migrations.clone(),
        }
    }
}

/// The jobs of the cluster.
pub struct Jobs {
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    jobs: Mutex<BTreeMap<String, Entry>>,
}

fn store_err(e: impl std::fmt::Display) -> JobError {
    JobError::Store(e.to_string())
}

/// The app of unit `i` of `spec` on its node.
fn unit_app(spec: &JobSpec, i: usize, peers: &[String], start_at: u64) -> AppAssignment {
    let mut params = Params::new();
    let status = "{{ app_dir }}/dps-status.json".to_string();
    if let Some(b) = &spec.bsp {
        params.insert("command".into(), "{{ shoal }}".into());
        params.insert(
            "args".into(),
            format!(
                "bsp --index {i} --peers {} --pattern {} --iterations {} --work {} --status {status} --resume{}",
                peers.join(","),
                b.pattern,
                b.iterations,
                b.work,
                if start_at > 0 {
                    format!(" --start-at {start_at}")
                } else {
                    String::new()
                }
            ),
        );
    } else if let Some(c) = &spec.command {
        let fill = |s: &str| {
            s.replace("{{ unit }}", &i.to_string())
                .replace("{{ units }}", &spec.units.to_string())
        };
        params.insert("command".into(), fill(&c.command));
        params.insert("args".into(), fill(&c.args));
    }
    // The agent's DPS loop finds the unit by this file (its job and index)
    // and the program by its pid; a program of one's own declares whom it
    // waits for in SHOAL_DPS_STATUS (the `shoal bsp` status format).
    params.insert(
        "file.dps.json".into(),
        serde_json::json!({"job": spec.name, "unit": i}).to_string(),
    );
    params.insert("env.SHOAL_DPS_JOB".into(), spec.name.clone());
    params.insert("env.SHOAL_DPS_UNIT".into(), i.to_string());
    params.insert("env.SHOAL_DPS_STATUS".into(), status);
    AppAssignment {
        id: format!("{JOB_APP_PREFIX}{}-{i}", spec.name),
        adaptor: "process".into(),
        params,
    }
}

impl Jobs {
    /// Loads the stored jobs.
    pub fn open(store: Arc<dyn Store>, registry: Arc<Registry>) -> Result<Self, JobError> {
        let mut jobs = BTreeMap::new();
        for (k, v) in store.docs(KIND_JOB).map_err(store_err)? {
            match serde_json::from_str::<JobDoc>(&v) {
                Ok(doc) => {
                    jobs.insert(k, Entry::new(doc)?);
                }
                Err(e) => tracing::warn!("job {k}: unreadable definition in the store: {e}"),
            }
        }
        Ok(Self {
            store,
            registry,
            jobs: Mutex::new(jobs),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every job.
    pub fn list(&self) -> Vec<JobStatus> {
        self.lock().values().map(Entry::status).collect()
    }

    /// One job.
    pub fn show(&self, name: &str) -> Result<JobStatus, JobError> {
        self.lock()
            .get(name)
            .map(Entry::status)
            .ok_or_else(|| JobError::NotFound(name.into()))
    }

    /// Places a new job's units on nodes and starts them.
    pub fn run(&self, spec: JobSpec) -> Result<JobStatus, JobError> {
        spec.validate()
            .map_err(|e| JobError::Invalid(e.to_string()))?;
        if self.lock().contains_key(&spec.name) {
            return Err(JobError::Exists(spec.name));
        }
        // Alive, uncordoned nodes without a service, the fewest job units
        // first: at most per_node units of this job on each.
        let nodes = self.registry.nodes();
        let mut free: Vec<(usize, String, String)> = nodes
            .iter()
            .filter(|n| n.state == LeaseState::Alive && !n.cordoned && n.service.is_none())
            .map(|n| {
                let units = n
                    .desired
                    .iter()
                    .filter(|a| a.id.starts_with(JOB_APP_PREFIX))
                    .count();
                (units, n.name.clone(), n.address.clone())
            })
            .collect();
        free.sort();
        let need = spec.units.div_ceil(spec.per_node);
        if free.len() < need {
            return Err(JobError::Invalid(format!(
                "the job needs {need} nodes ({} units, at most per_node = {} on each) but {} are free (alive, not cordoned, no service); add nodes or raise per_node",
                spec.units,
                spec.per_node,
                free.len()
            )));
        }
        let placement: Vec<(String, String)> = (0..spec.units)
            .map(|i| {
                let (_, n, a) = &free[i % need];
                (n.clone(), a.clone())
            })
            .collect();
        let doc = JobDoc {
            placement: placement.iter().map(|(n, _)| n.clone()).collect(),
            spec: spec.clone(),
            start_at: Vec::new(),
        };
        let text = serde_json::to_string(&doc).map_err(store_err)?;
        self.store
            .put_doc(KIND_JOB, &spec.name, &text)
            .map_err(store_err)?;
        self.assign_units(&doc, &[])?;
        let entry = Entry::new(doc)?;
        let status = entry.status();
        self.lock().insert(spec.name.clone(), entry);
        self.registry.event(
            "job",
            None,
            format!(
                "{}: {} units placed on {:?}, W = {} CPUs, {} exchange",
                spec.name,
                spec.units,
                status.units.iter().map(|u| &u.node).collect::<Vec<_>>(),
                spec.max_cpu,
                spec.mode
            ),
        );
        Ok(status)
    }

    /// Hands every node of the job its units (and takes them off `left`,
    /// nodes that no longer hold any). Unit i listens on its node's
    /// address at port + i.
    fn assign_units(&self, doc: &JobDoc, left: &[String]) -> Result<(), JobError> {
        let spec = &doc.spec;
        let port = spec.bsp.as_ref().map_or(0, |b| b.port);
        let nodes = self.registry.nodes();
        let address = |n: &str| {
            nodes
                .iter()
                .find(|s| s.name == n)
                .map(|s| s.address.clone())
                .ok_or_else(|| JobError::Invalid(format!("node {n} is not registered")))
        };
        let peers = doc
            .placement
            .iter()
            .enumerate()
            .map(|(i, n)| Ok(format!("{}:{}", address(n)?, u32::from(port) + i as u32)))
            .collect::<Result<Vec<String>, JobError>>()?;
        let prefix = format!("{JOB_APP_PREFIX}{}-", spec.name);
        let mut touched: std::collections::BTreeSet<&String> = doc.placement.iter().collect();
        touched.extend(left);
        for node in touched {
            let mut apps: Vec<AppAssignment> = self
                .hand_assigned(node)
                .into_iter()
                .filter(|a| !a.id.starts_with(&prefix))
                .collect();
            for (i, n) in doc.placement.iter().enumerate() {
                if n == node {
                    let start = doc.start_at.get(i).copied().unwrap_or(0);
                    apps.push(unit_app(spec, i, &peers, start));
                }
            }
            self.registry
                .assign(node, apps)
                .map_err(|e| JobError::Store(e.to_string()))?;
        }
        Ok(())
    }

    /// Moves unit `unit` of job `name` to node `to` (§5.2.2): it is
    /// stopped where it runs and started on `to` after the last iteration
    /// it reported; its neighbours learn its new address (on real hosts
    /// they restart from their own checkpoints with the new peer list).
    /// The ledger keeps its share.
    pub fn migrate(
        &self,
        name: &str,
        unit: usize,
        to: &str,
        why: &str,
    ) -> Result<JobStatus, JobError> {
        let mut jobs = self.lock();
        let e = jobs
            .get_mut(name)
            .ok_or_else(|| JobError::NotFound(name.into()))?;
        self.migrate_locked(name, e, unit, to, why)
    }

    fn migrate_locked(
        &self,
        name: &str,
        e: &mut Entry,
        unit: usize,
        to: &str,
        why: &str,
    ) -> Result<JobStatus, JobError> {
        let n = e.doc.spec.units;
        if unit >= n {
            return Err(JobError::Invalid(format!(
                "unit {unit} is not a unit of job {name} (units 0 to {})",
                n - 1
            )));
        }
        let from = e.doc.placement[unit].clone();
        if from == to {
            return Err(JobError::Invalid(format!(
                "unit {unit} of job {name} runs on {to} already"
            )));
        }
        let node = self
            .registry
            .nodes()
            .into_iter()
            .find(|s| s.name == to)
            .ok_or_else(|| {
                JobError::Invalid(format!("no node named {to:?}; `shoal nodes` lists them"))
            })?;
        if node.state != LeaseState::Alive || node.cordoned || node.service.is_some() {
            return Err(JobError::Invalid(format!(
                "node {to} cannot take a job unit: it must be alive, not cordoned and hold no service"
            )));
        }
        let here = e.doc.placement.iter().filter(|p| *p == to).count();
        if here >= e.doc.spec.per_node {
            return Err(JobError::Invalid(format!(
                "node {to} holds {here} units of job {name} already (per_node = {}); raise per_node or pick another node",
                e.doc.spec.per_node
            )));
        }
        let mut doc = e.doc.clone();
        doc.placement[unit] = to.to_string();
        doc.start_at.resize(n, 0);
        doc.start_at[unit] = e.units[unit].iterations.unwrap_or(0);
        let text = serde_json::to_string(&doc).map_err(store_err)?;
        self.store
            .put_doc(KIND_JOB, name, &text)
            .map_err(store_err)?;
        let left: Vec<String> = if doc.placement.contains(&from) {
            Vec::new()
        } else {
            vec![from.clone()]
        };
        self.assign_units(&doc, &left)?;
        e.doc = doc;
        e.units[unit].node = to.to_string();
        // By hand or by the rule, a moved unit stays a while (`settled`).
        e.moved_at[unit] = self.registry.now_ms() as f64 / 1e3;
        if !left.is_empty() {
            e.node_free.remove(&from);
        }
        e.bottlenecks.clear();
        let note = format!(
            "unit {unit} moved from {from} to {to} after iteration {} ({why})",
            e.doc.start_at[unit]
        );
        self.registry
            .event("job", Some(to), format!("{name}: {note}"));
        e.migrations.push(note);
        if e.migrations.len() > 8 {
            e.migrations.remove(0);
        }
        Ok(e.status())
    }

    /// A node's hand-assigned apps (services' apps are the controller's).
    fn hand_assigned(&self, node: &str) -> Vec<AppAssignment> {
        self.registry
            .nodes()
            .into_iter()
            .find(|n| n.name == node)
            .map(|n| {
                n.desired
                    .into_iter()
                    .filter(|a| !a.id.starts_with(shoal_core::control::render::APP_PREFIX))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Stops a job: its apps leave their nodes, its definition the store.
    pub fn stop(&self, name: &str) -> Result<(), JobError> {
        let doc = self
            .lock()
            .get(name)
            .map(|e| e.doc.clone())
            .ok_or_else(|| JobError::NotFound(name.into()))?;
        let prefix = format!("{JOB_APP_PREFIX}{name}-");
        for node in doc
            .placement
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
        {
            let apps: Vec<AppAssignment> = self
                .hand_assigned(node)
                .into_iter()
                .filter(|a| !a.id.starts_with(&prefix))
                .collect();
            self.registry
                .assign(node, apps)
                .map_err(|e| JobError::Store(e.to_string()))?;
        }
        self.store.delete_doc(KIND_JOB, name).map_err(store_err)?;
        self.lock().remove(name);
        self.registry.event(
            "job",
            None,
            format!("{name}: stopped; its units leave their nodes"),
        );
        Ok(())
    }

    /// The banker: a unit's report for the last period, at `now_ms` on the
    /// manager's clock; answers the unit's share.
    pub fn report(
        &self,
        name: &str,
        r: UnitReportBody,
        now_ms: u64,
    ) -> Result<ShareReply, JobError> {
        let mut jobs = self.lock();
        let e = jobs
            .get_mut(name)
            .ok_or_else(|| JobError::NotFound(name.into()))?;
        let n = e.doc.spec.units;
        if r.unit >= n {
            return Err(JobError::Invalid(format!(
                "unit {} is not a unit of job {name} (units 0 to {})",
                r.unit,
                n - 1
            )));
        }
        if e.doc.placement[r.unit] != r.node {
            return Err(JobError::Invalid(format!(
                "unit {} of job {name} runs on {}, not on {}",
                r.unit, e.doc.placement[r.unit], r.node
            )));
        }
        e.node_free
            .insert(r.node.clone(), (r.host_free, r.capacity));
        let nodes: Vec<String> = e.node_free.keys().cloned().collect();
        let host_of: Vec<usize> = e
            .doc
            .placement
            .iter()
            .map(|p| nodes.iter().position(|n| n == p).unwrap_or(usize::MAX))
            .collect();
        let mut free: Vec<f64> = nodes.iter().map(|n| e.node_free[n].0).collect();
        let period = e.doc.spec.period();
        let pay = now_ms.saturating_sub(e.last_payout_ms) as u128 + 50
            >= e.doc.spec.bank_period().as_millis();
        if pay {
            e.last_payout_ms = now_ms;
        }
        let report = UnitReport {
            used: r.used,
            upstream: r.upstream.clone(),
            host_free: r.host_free,
            cap: r.capacity.min(1.0),
        };
        let reports = if r.finished {
            Vec::new()
        } else {
            vec![(r.unit, report)]
        };
        let cmds = e.ledger.step(&reports, &host_of, &mut free, pay);
        for (k, node) in nodes.iter().enumerate() {
            if let Some(v) = e.node_free.get_mut(node) {
                v.0 = free[k];
            }
        }
        {
            let u = &mut e.units[r.unit];
            u.used = r.used;
            u.upstream = r.upstream;
            u.iterations = r.iterations;
            u.finished = r.finished;
        }
        let mut moves = Vec::new();
        for c in cmds {
            if let Command::Bottleneck { unit } = c {
                let node = e.doc.placement[unit].clone();
                // Units that moved less than MIGRATION_HOLD_PERIODS ago stay.
                let now_s = now_ms as f64 / 1e3;
                let placements: Vec<Placement<usize, String>> = e
                    .units
                    .iter()
                    .filter(|u| settled(e.moved_at[u.unit], now_s, period.as_secs_f64()))
                    .map(|u| Placement {
                        unit: u.unit,
                        host: u.node.clone(),
                        used: u.used / e.node_free.get(&u.node).map_or(1.0, |v| v.1.max(1e-9)),
                    })
                    .collect();
                let mut hosts: Vec<(String, f64)> = e
                    .node_free
                    .iter()
                    .map(|(n, (free, cap))| (n.clone(), 1.0 - free / cap.max(1e-9)))
                    .collect();
                // Nodes that hold no job unit and no service are idle
                // (what else runs there is not measured: a node busy with
                // hand-assigned apps is best cordoned).
                if e.doc.spec.migrate {
                    for n in self.registry.nodes() {
                        let idle = n.state == LeaseState::Alive
                            && !n.cordoned
                            && n.service.is_none()
                            && !n.desired.iter().any(|a| a.id.starts_with(JOB_APP_PREFIX));
                        if idle && !hosts.iter().any(|(h, _)| *h == n.name) {
                            hosts.push((n.name, 0.0));
                        }
                    }
                }
                let per_node = e.doc.spec.per_node;
                let placement = e.doc.placement.clone();
                let advice = choose_migration(&node, &placements, &hosts, |_, h| {
                    placement.iter().filter(|p| *p == h).count() >= per_node
                });
                let note = match &advice {
                    Some((u, to)) => format!("{node}: full; migrate unit {u} to {to}"),
                    None => format!("{node}: full; no less utilized node to migrate to"),
                };
                if let Some(m) = advice
                    && e.doc.spec.migrate
                    && moves.is_empty()
                {
                    moves.push((m, note.clone()));
                }
                if !e.bottlenecks.contains(&note) {
                    self.registry
                        .event("job", Some(&node), format!("{name}: {note}"));
                    e.bottlenecks.push(note);
                    if e.bottlenecks.len() > 8 {
                        e.bottlenecks.remove(0);
                    }
                }
            }
        }
        for ((u, to), why) in moves {
            if let Err(err) = self.migrate_locked(name, e, u, &to, &format!("bottleneck {why}")) {
                self.registry.event(
                    "job",
                    Some(&to),
                    format!("{name}: moving unit {u} to {to} failed: {err}"),
                );
            }
        }
        Ok(ShareReply {
            share: e.ledger.enforced(r.unit),
            period_ms: period.as_millis() as u64,
        })
    }
}
