//! Services on the shared pool: their definitions (durable, kind
//! `service`), their allocations (durable, kind `allocation`), their backend
//! lists as dispatchers follow them, and the API for all of it.
//!
//! Decisions live in shoal-core ([`shoal_core::policy`]); the engine
//! ([`crate::engine`]) applies them. This module only holds state and checks
//! input.

use crate::monitor::Monitor;
use shoal_net::wire::*;
use shoal_store::Store;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::watch;

/// Store kind of service definitions.
pub const KIND_SERVICE: &str = "service";
/// Store kind of allocation state.
pub const KIND_ALLOCATION: &str = "allocation";

/// The app id a service's app has on its nodes.
pub fn app_id(service: &str) -> String {
    format!("svc-{service}")
}

/// A bad service definition: which field, what is wrong, how to fix it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct SpecError {
    /// Dotted path of the field.
    pub field: String,
    /// What is wrong and the fix.
    pub problem: String,
}

fn err(field: &str, problem: impl Into<String>) -> SpecError {
    SpecError {
        field: field.to_string(),
        problem: problem.into(),
    }
}

/// Parses a service definition from TOML, naming the offending field.
pub fn parse_toml(text: &str) -> Result<ServiceSpec, SpecError> {
    let de = toml::Deserializer::new(text);
    let spec: ServiceSpec = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = inner.message().to_string();
        let field = if path == "." { "(file)".into() } else { path };
        err(&field, msg)
    })?;
    validate(&spec)?;
    Ok(spec)
}

/// The variables a template may use.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RenderCtx {
    /// Node name.
    pub node_name: String,
    /// Node address (its registration's).
    pub node_address: String,
    /// The service's port (`app.port`), if any.
    pub port: Option<u16>,
    /// Service name.
    pub service: String,
    /// App id on the node.
    pub app_id: String,
    /// Backend address of the service's first serving node (itself if none).
    pub first_server: String,
}

fn env() -> minijinja::Environment<'static> {
    let mut e = minijinja::Environment::new();
    e.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    e
}

fn render_one(field: &str, tpl: &str, ctx: &RenderCtx) -> Result<String, SpecError> {
    env().render_str(tpl, ctx).map_err(|e| {
        err(
            field,
            format!(
                "template {tpl:?} does not render: {e}; usable variables: node_name, node_address, port, service, app_id, first_server"
            ),
        )
    })
}

/// Renders the backend address and the app assignment of `spec` for one node.
pub fn render(spec: &ServiceSpec, ctx: &RenderCtx) -> Result<(String, AppAssignment), SpecError> {
    let backend = render_one("app.backend", &spec.app.backend, ctx)?;
    let mut params = Params::new();
    for (k, v) in &spec.app.params {
        params.insert(k.clone(), render_one(&format!("app.params.{k}"), v, ctx)?);
    }
    shoal_net::identity::validate_node_name(&ctx.app_id).map_err(|e| err("name", e))?;
    check_params(&spec.app.adaptor, &params).map_err(|e| err("app.params", e))?;
    Ok((
        backend,
        AppAssignment {
            id: ctx.app_id.clone(),
            adaptor: spec.app.adaptor.clone(),
            params,
        },
    ))
}

/// Checks everything that can be checked without a node: bounds,
/// thresholds, names, dispatcher settings, and that the templates render
/// for a sample node into parameters the adaptor accepts.
pub fn validate(s: &ServiceSpec) -> Result<(), SpecError> {
    shoal_net::identity::validate_node_name(&s.name)
        .map_err(|e| err("name", format!("{e} (it names the app svc-NAME on nodes)")))?;
    if s.max_nodes == 0 {
        return Err(err("max_nodes", "must be at least 1"));
    }
    if s.min_nodes > s.max_nodes {
        return Err(err(
            "min_nodes",
            format!(
                "{} is above max_nodes {}; lower min_nodes or raise max_nodes",
                s.min_nodes, s.max_nodes
            ),
        ));
    }
    let m = &s.metric;
    if !(m.capacity.is_finite() && m.capacity > 0.0) {
        return Err(err(
            "metric.capacity",
            format!(
                "must be a positive number (one node's capacity C), got {}",
                m.capacity
            ),
        ));
    }
    let sla = &s.sla;
    if !(sla.upper.is_finite() && sla.upper > 0.0 && sla.upper <= 1.0) {
        return Err(err(
            "sla.upper",
            format!("must be in (0, 1], got {}", sla.upper),
        ));
    }
    if !(sla.lower.is_finite() && sla.lower >= 0.0 && sla.lower <= sla.upper) {
        return Err(err(
            "sla.lower",
            format!(
                "must be in [0, sla.upper = {}], got {}",
                sla.upper, sla.lower
            ),
        ));
    }
    for (field, v, lo, hi) in [
        ("lead_time_secs", s.lead_time_secs, 0.0, 3600.0),
        ("drain_timeout_secs", s.drain_timeout_secs, 0.0, 3600.0),
        ("period_secs", s.period_secs, 0.1, 3600.0),
    ] {
        if !(v.is_finite() && v >= lo && v <= hi) {
            return Err(err(
                field,
                format!("must be between {lo} and {hi} s, got {v}"),
            ));
        }
    }
    if let Some(r) = &s.role
        && r.trim().is_empty()
    {
        return Err(err("role", "must not be empty; omit it to allow any node"));
    }
    s.dispatch
        .algo
        .parse::<shoal_core::select::Algo>()
        .map_err(|e| err("dispatch.algo", e.to_string()))?;
    s.dispatch
        .hash
        .parse::<shoal_core::select::HashFn>()
        .map_err(|e| err("dispatch.hash", e.to_string()))?;
    if s.dispatch.replicas == 0 {
        return Err(err("dispatch.replicas", "must be at least 1"));
    }
    if !ADAPTORS.contains(&s.app.adaptor.as_str()) {
        return Err(err(
            "app.adaptor",
            format!(
                "unknown adaptor {:?}; use one of: {}",
                s.app.adaptor,
                ADAPTORS.join(", ")
            ),
        ));
    }
    let uses_port =
        s.app.backend.contains("port") || s.app.params.values().any(|v| v.contains("port"));
    if uses_port && s.app.port.is_none() {
        return Err(err(
            "app.port",
            "the templates use {{ port }}; set app.port = PORT",
        ));
    }
    // Render for a sample node: catches syntax errors, unknown variables and
    // parameters the adaptor refuses before anything is acknowledged.
    let sample = RenderCtx {
        node_name: "node1".into(),
        node_address: "127.0.0.1".into(),
        port: s.app.port,
        service: s.name.clone(),
        app_id: app_id(&s.name),
        first_server: format!("127.0.0.1:{}", s.app.port.unwrap_or(80)),
    };
    let (backend, _) = render(s, &sample)?;
    let ok = backend
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
    if !ok {
        return Err(err(
            "app.backend",
            format!("must render to HOST:PORT, got {backend:?} for a sample node"),
        ));
    }
    Ok(())
}

/// Durable allocation state of one service.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct AllocDoc {
    /// Backend-list version.
    pub version: u64,
    /// Allocations.
    pub allocs: Vec<Allocation>,
}

/// A dispatcher's last report, with when it arrived.
#[derive(Debug, Clone)]
pub struct ReportEntry {
    /// Arrival.
    pub at: Instant,
    /// The report.
    pub report: DispatchReport,
}

/// One service's state in the manager.
pub struct Svc {
    /// Definition; `None` while a deleted service drains out.
    pub spec: Option<ServiceSpec>,
    /// Durable allocation state.
    pub doc: AllocDoc,
    /// Soft monitor state (series, forecaster, policy).
    pub monitor: Option<Monitor>,
    /// Dispatchers' reports, by dispatcher id.
    pub reports: HashMap<String, ReportEntry>,
    /// Last decision's reason.
    pub last_decision: Option<String>,
}

impl Svc {
    fn new(spec: Option<ServiceSpec>, doc: AllocDoc) -> Self {
        let monitor = spec.as_ref().and_then(|s| match Monitor::new(s) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(service = %s.name, "monitor: {e}");
                None
            }
        });
        Self {
            spec,
            doc,
            monitor,
            reports: HashMap::new(),
            last_decision: None,
        }
    }

    /// The backend list dispatchers follow.
    pub fn backend_list(&self, name: &str) -> BackendList {
        BackendList {
            service: name.to_string(),
            version: self.doc.version,
            backends: self
                .doc
                .allocs
                .iter()
                .filter(|a| a.phase != AllocPhase::Starting)
                .map(|a| BackendEntry {
                    address: a.address.clone(),
                    weight: 1,
                    draining: a.phase == AllocPhase::Draining || self.spec.is_none(),
                    node: a.node.clone(),
                })
                .collect(),
            dispatch: self
                .spec
                .as_ref()
                .map(|s| s.dispatch.clone())
                .unwrap_or_default(),
        }
    }

    /// Summary for `shoal status`.
    pub fn status(&self, name: &str) -> ServiceStatus {
        let of = |p: AllocPhase| -> Vec<String> {
            self.doc
                .allocs
                .iter()
                .filter(|a| a.phase == p)
                .map(|a| a.node.clone())
                .collect()
        };
        let last = self.monitor.as_ref().and_then(|m| m.last());
        ServiceStatus {
            name: name.to_string(),
            nodes: self.doc.allocs.iter().map(|a| a.node.clone()).collect(),
            serving: of(AllocPhase::Serving),
            starting: of(AllocPhase::Starting),
            draining: of(AllocPhase::Draining),
            policy: self
                .spec
                .as_ref()
                .map(|s| format!("{:?}", s.policy).to_lowercase())
                .unwrap_or_default(),
            usage: last.map(|p| p.observed),
            forecast: last.and_then(|p| p.forecast),
            last_decision: self.last_decision.clone(),
            deleting: self.spec.is_none(),
        }
    }
}

/// Errors of service operations.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Bad definition.
    #[error("invalid service definition: {0}")]
    Invalid(#[from] SpecError),
    /// No such service.
    #[error("no service named {0:?}; see `shoal service list`")]
    NotFound(String),
    /// The store failed; nothing was acknowledged.
    #[error("{0}")]
    Store(#[from] shoal_store::StoreError),
}

/// Every service, and the change signal dispatchers long-poll on.
pub struct Services {
    store: Arc<dyn Store>,
    inner: Mutex<BTreeMap<String, Svc>>,
    changes: watch::Sender<u64>,
}

impl Services {
    /// Loads definitions and allocations from the store. An allocation doc
    /// without a definition is a deletion in progress: it keeps draining.
    pub fn open(store: Arc<dyn Store>) -> Result<Self, ServiceError> {
        let mut map = BTreeMap::new();
        for (name, text) in store.docs(KIND_SERVICE)? {
            let spec: ServiceSpec =
                serde_json::from_str(&text).map_err(|e| shoal_store::StoreError::Corrupt {
                    key: format!("service/{name}"),
                    detail: e.to_string(),
                })?;
            map.insert(name, Svc::new(Some(spec), AllocDoc::default()));
        }
        for (name, text) in store.docs(KIND_ALLOCATION)? {
            let doc: AllocDoc =
                serde_json::from_str(&text).map_err(|e| shoal_store::StoreError::Corrupt {
                    key: format!("allocation/{name}"),
                    detail: e.to_string(),
                })?;
            map.entry(name)
                .or_insert_with(|| Svc::new(None, AllocDoc::default()))
                .doc = doc;
        }
        let (changes, _) = watch::channel(0);
        Ok(Self {
            store,
            inner: Mutex::new(map),
            changes,
        })
    }

    /// Locks the service table.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Svc>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes dispatchers following backend lists.
    pub fn notify(&self) {
        self.changes.send_modify(|v| *v += 1);
    }

    /// Subscribes to backend-list changes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Persists one service's allocation state.
    pub fn persist(&self, name: &str, doc: &AllocDoc) -> Result<(), shoal_store::StoreError> {
        let text = serde_json::to_string(doc).expect("allocation docs always serialize");
        self.store.put_doc(KIND_ALLOCATION, name, &text)
    }

    /// Forgets a service whose deletion finished.
    pub fn forget(&self, name: &str) -> Result<(), shoal_store::StoreError> {
        self.store.delete_doc(KIND_ALLOCATION, name)?;
        Ok(())
    }

    /// Creates or replaces a service (durable before returning). Returns
    /// whether it was new.
    pub fn apply(&self, spec: ServiceSpec) -> Result<bool, ServiceError> {
        validate(&spec)?;
        let text = serde_json::to_string(&spec).expect("service specs always serialize");
        let mut g = self.lock();
        self.store.put_doc(KIND_SERVICE, &spec.name, &text)?;
        let name = spec.name.clone();
        let created = match g.get_mut(&name) {
            Some(s) => {
                let rebuild = s.spec.as_ref().is_none_or(|old| {
                    old.policy != spec.policy
                        || old.metric != spec.metric
                        || old.sla != spec.sla
                        || old.period_secs != spec.period_secs
                        || old.lead_time_secs != spec.lead_time_secs
                });
                s.spec = Some(spec.clone());
                if rebuild {
                    s.monitor = Monitor::new(&spec).ok();
                }
                false
            }
            None => {
                g.insert(name, Svc::new(Some(spec), AllocDoc::default()));
                true
            }
        };
        drop(g);
        self.notify();
        Ok(created)
    }

    /// Deletes a service's definition (durable); its nodes drain out and
    /// return to the pool.
    pub fn delete(&self, name: &str) -> Result<(), ServiceError> {
        let mut g = self.lock();
        let Some(s) = g.get_mut(name).filter(|s| s.spec.is_some()) else {
            return Err(ServiceError::NotFound(name.to_string()));
        };
        // Record the allocations first: a crash between the two writes must
        // leave the nodes known, never orphaned.
        self.persist(name, &s.doc)?;
        self.store.delete_doc(KIND_SERVICE, name)?;
        s.spec = None;
        s.monitor = None;
        drop(g);
        self.notify();
        Ok(())
    }

    /// Every service's summary.
    pub fn statuses(&self) -> Vec<ServiceStatus> {
        self.lock().iter().map(|(n, s)| s.status(n)).collect()
    }

    /// One service in detail.
    pub fn detail(&self, name: &str) -> Result<ServiceDetail, ServiceError> {
        let g = self.lock();
        let s = g
            .get(name)
            .ok_or_else(|| ServiceError::NotFound(name.to_string()))?;
        Ok(ServiceDetail {
            spec: s.spec.clone(),
            status: s.status(name),
            allocations: s.doc.allocs.clone(),
            backends: s.backend_list(name),
            series: s
                .monitor
                .as_ref()
                .map(|m| m.series().to_vec())
                .unwrap_or_default(),
        })
    }

    /// A service's backend list.
    pub fn backends(&self, name: &str) -> Result<BackendList, ServiceError> {
        let g = self.lock();
        g.get(name)
            .map(|s| s.backend_list(name))
            .ok_or_else(|| ServiceError::NotFound(name.to_string()))
    }

    /// Records a dispatcher's report.
    pub fn report(&self, name: &str, report: DispatchReport) -> Result<(), ServiceError> {
        let mut g = self.lock();
        let s = g
            .get_mut(name)
            .ok_or_else(|| ServiceError::NotFound(name.to_string()))?;
        s.reports.insert(
            report.dispatcher.clone(),
            ReportEntry {
                at: Instant::now(),
                report,
            },
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "web"
min_nodes = 1
max_nodes = 3
policy = "ar"
[app]
adaptor = "www"
port = 8081
[app.params]
listen = "{{ node_address }}:{{ port }}"
root = "/srv/www"
[metric]
kind = "dispatch_active"
capacity = 4
"#;

    #[test]
    fn good_spec_parses_with_defaults() {
        let s = parse_toml(GOOD).unwrap();
        assert_eq!(s.policy, PolicyKind::Ar);
        assert_eq!(s.sla.upper, 0.9);
        assert_eq!(s.dispatch.algo, "url-hash");
        assert_eq!(s.period_secs, 2.0);
    }

    #[test]
    fn unknown_and_bad_fields_are_named() {
        let e = parse_toml(&GOOD.replace("policy = \"ar\"", "polcy = \"ar\"")).unwrap_err();
        assert_eq!(e.field, "polcy", "{e}");
        let e = parse_toml(&GOOD.replace("policy = \"ar\"", "policy = \"magic\"")).unwrap_err();
        assert_eq!(e.field, "policy", "{e}");
        assert!(e.problem.contains("predictive"), "{e}");
        let e = parse_toml(&GOOD.replace("capacity = 4", "capacity = 0")).unwrap_err();
        assert_eq!(e.field, "metric.capacity");
        let e = parse_toml(&GOOD.replace("min_nodes = 1", "min_nodes = 5")).unwrap_err();
        assert_eq!(e.field, "min_nodes");
        let e = parse_toml(&GOOD.replace("port = 8081\n", "")).unwrap_err();
        assert_eq!(e.field, "app.port", "{e}");
        let e = parse_toml(&GOOD.replace("{{ port }}\"", "{{ prot }}\"")).unwrap_err();
        assert_eq!(e.field, "app.params.listen", "{e}");
        let e = parse_toml(&GOOD.replace("root = ", "docroot = ")).unwrap_err();
        assert_eq!(e.field, "app.params", "{e}");
        let e = parse_toml(&format!("{GOOD}\n[dispatch]\nalgo = \"nope\"\n")).unwrap_err();
        assert_eq!(e.field, "dispatch.algo", "{e}");
        let e = parse_toml(&GOOD.replace("name = \"web\"", "name = \"a b\"")).unwrap_err();
        assert_eq!(e.field, "name", "{e}");
    }

    #[test]
    fn templates_render_per_node_with_relay_from() {
        let mut s = parse_toml(GOOD).unwrap();
        s.app.adaptor = "process".into();
        s.app.params = [
            ("command".to_string(), "icecast".to_string()),
            (
                "args".to_string(),
                "--relay {{ first_server }} --name {{ node_name }}".to_string(),
            ),
        ]
        .into_iter()
        .collect();
        let ctx = RenderCtx {
            node_name: "n2".into(),
            node_address: "10.0.0.2".into(),
            port: Some(8000),
            service: "radio".into(),
            app_id: app_id("radio"),
            first_server: "10.0.0.1:8000".into(),
        };
        let (backend, a) = render(&s, &ctx).unwrap();
        assert_eq!(backend, "10.0.0.2:8000");
        assert_eq!(a.id, "svc-radio");
        assert_eq!(a.params["args"], "--relay 10.0.0.1:8000 --name n2");
    }
}
