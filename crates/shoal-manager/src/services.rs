//! Services on the shared pool: their definitions (durable, kind
//! `service`), their allocations (durable, kind `allocation`), their backend
//! lists as dispatchers follow them, and the API for all of it.
//!
//! Decisions live in the controller ([`shoal_core::control`]); this module
//! checks input and hands it over.

use crate::state::{RegistryError, Shell};
use shoal_core::control::{Input, Reply, app_id, render};
use shoal_net::wire::*;
use std::sync::Arc;
use tokio::sync::watch;

pub use crate::state::{KIND_ALLOCATION, KIND_SERVICE};
pub use shoal_core::control::RenderCtx;

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
    let f = &s.forecast;
    if !(f.k.is_finite() && f.k >= 0.0) {
        return Err(err(
            "forecast.k",
            format!(
                "must be a number of standard deviations, at least 0, got {}",
                f.k
            ),
        ));
    }
    if let Some(season) = f.season_secs
        && !(season.is_finite() && season >= 10.0 * s.period_secs)
    {
        return Err(err(
            "forecast.season_secs",
            format!(
                "must be at least ten sampling periods ({} s), got {season}; omit it for demand without a season",
                10.0 * s.period_secs
            ),
        ));
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
    if let Some(bw) = &s.bandwidth {
        bw.settings(&s.dispatch)
            .map_err(|e| err(&format!("bandwidth.{}", e.key), e.problem))?;
    }
    if let Some(f) = &s.federation {
        f.model()
            .map_err(|(k, e)| err(&format!("federation.{k}"), e))?;
        if let Some(p) = &f.public
            && p.parse::<std::net::SocketAddr>().is_err()
            && !p.contains(':')
        {
            return Err(err(
                "federation.public",
                format!("must be HOST:PORT (where peers redirect clients), got {p:?}"),
            ));
        }
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
    let uses_port = s.app.backend.contains("port")
        || s.app
            .params
            .iter()
            .any(|(k, v)| !is_secret_param(k) && v.contains("port"));
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
    let (backend, _) = render(s, &sample).map_err(|e| err(&e.field, e.problem))?;
    shoal_net::identity::validate_node_name(&sample.app_id).map_err(|e| err("name", e))?;
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

impl From<RegistryError> for ServiceError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Store(e) => Self::Store(e),
            RegistryError::NotRegistered(n) | RegistryError::Refused(n) => Self::NotFound(n),
        }
    }
}

/// The services' side of the shell: definitions, allocations, backend
/// lists and dispatcher reports, all held by the controller.
pub struct Services {
    shell: Arc<Shell>,
}

impl Services {
    /// The services over `shell`.
    pub fn new(shell: Arc<Shell>) -> Self {
        Self { shell }
    }

    fn handle(&self, input: Input) -> Result<Reply, ServiceError> {
        let not_found = match &input {
            Input::DeleteService(n) | Input::Report { service: n, .. } => Some(n.clone()),
            _ => None,
        };
        self.shell.handle(input).map_err(|e| match (e, not_found) {
            (RegistryError::Refused(_), Some(n)) => ServiceError::NotFound(n),
            (e, _) => e.into(),
        })
    }

    /// Subscribes to backend-list changes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.shell.changes()
    }

    /// Creates or replaces a service (durable before returning). Returns
    /// whether it was new.
    pub fn apply(&self, spec: ServiceSpec) -> Result<bool, ServiceError> {
        validate(&spec)?;
        match self.handle(Input::ApplyService(spec))? {
            Reply::Applied { created } => Ok(created),
            other => unreachable!("apply answered {other:?}"),
        }
    }

    /// Deletes a service's definition (durable); its nodes drain out and
    /// return to the pool.
    pub fn delete(&self, name: &str) -> Result<(), ServiceError> {
        self.handle(Input::DeleteService(name.to_string()))?;
        Ok(())
    }

    /// Every service's summary.
    pub fn statuses(&self) -> Vec<ServiceStatus> {
        self.shell.lock().statuses()
    }

    /// Every service's name.
    pub fn names(&self) -> Vec<String> {
        self.shell.lock().service_names()
    }

    /// One service in detail.
    pub fn detail(&self, name: &str) -> Result<ServiceDetail, ServiceError> {
        self.shell
            .lock()
            .detail(name)
            .map_err(|_| ServiceError::NotFound(name.to_string()))
    }

    /// A service's `[federation]`, if it has one.
    pub fn federation_spec(
        &self,
        name: &str,
    ) -> Option<shoal_core::control::model::FederationSpec> {
        self.shell.lock().spec(name)?.federation.clone()
    }

    /// A service's backend list.
    pub fn backends(&self, name: &str) -> Result<BackendList, ServiceError> {
        self.shell
            .lock()
            .backend_list(name)
            .map_err(|_| ServiceError::NotFound(name.to_string()))
    }

    /// Per-backend (address, rps, in flight) from the reports of the last
    /// `fresh_ms`.
    pub fn backend_loads(&self, name: &str, fresh_ms: u64) -> Vec<(String, f64, u64)> {
        let now = self.shell.now();
        self.shell.lock().backend_loads(name, now, fresh_ms)
    }

    /// Records a dispatcher's report.
    pub fn report(&self, name: &str, report: DispatchReport) -> Result<(), ServiceError> {
        self.handle(Input::Report {
            service: name.to_string(),
            report,
        })?;
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
    fn secrets_come_as_a_table_or_as_parameters_and_are_no_templates() {
        let text = GOOD
            .replace("adaptor = \"www\"", "adaptor = \"process\"")
            .replace(
                "listen = \"{{ node_address }}:{{ port }}\"\nroot = \"/srv/www\"",
                "command = \"app\"\n\"secret.A\" = \"a\"\n[app.secrets]\nDB_PASSWORD = \"p{{w{#port\"",
            );
        let s = parse_toml(&text).unwrap();
        assert_eq!(s.app.params["secret.DB_PASSWORD"], "p{{w{#port");
        assert_eq!(s.app.params["secret.A"], "a");
        // One form on the wire and in the store.
        let json = serde_json::to_value(&s).unwrap();
        assert!(json["app"].get("secrets").is_none(), "{json}");
        let back: ServiceSpec = serde_json::from_value(json).unwrap();
        assert_eq!(back, s);
        let sample = RenderCtx {
            node_name: "n".into(),
            node_address: "127.0.0.1".into(),
            port: s.app.port,
            service: s.name.clone(),
            app_id: app_id(&s.name),
            first_server: String::new(),
        };
        let (_, a) = render(&s, &sample).unwrap();
        assert_eq!(a.params["secret.DB_PASSWORD"], "p{{w{#port");
        let e = parse_toml(&text.replace("DB_PASSWORD =", "A =")).unwrap_err();
        assert!(e.problem.contains("give it once"), "{e}");
        let e = parse_toml(&text.replace("DB_PASSWORD =", "\"DB.PASSWORD\" =")).unwrap_err();
        assert!(e.problem.contains("environment variable"), "{e}");
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
        let e = parse_toml(&format!("{GOOD}\n[forecast]\nk = -1\n")).unwrap_err();
        assert_eq!(e.field, "forecast.k", "{e}");
        let e = parse_toml(&format!("{GOOD}\n[forecast]\nseason_secs = 1\n")).unwrap_err();
        assert_eq!(e.field, "forecast.season_secs", "{e}");
        let s = parse_toml(&format!(
            "{GOOD}\n[forecast]\nk = 1.5\nseason_secs = 86400\n"
        ))
        .unwrap();
        assert_eq!(s.forecast.season_secs, Some(86400.0));
    }

    #[test]
    fn bandwidth_table_parses_and_bad_totals_name_the_fix() {
        let s = parse_toml(&format!(
            "{GOOD}\n[dispatch]\nreplicas = 2\n[bandwidth]\ntotal = \"10.8 MB/s\"\n"
        ))
        .unwrap();
        let bw = s.bandwidth.as_ref().unwrap();
        assert_eq!((bw.alpha, bw.interval.as_str()), (0.9, "3s"));
        let st = bw.settings(&s.dispatch).unwrap();
        assert_eq!(st.total, 10_800_000);
        assert_eq!(st.spread, shoal_core::bandwidth::Spread::NextR(2));
        let e = parse_toml(&format!("{GOOD}\n[bandwidth]\ntotal = \"10.8\"\n")).unwrap_err();
        assert_eq!(e.field, "bandwidth.total", "{e}");
        assert!(e.problem.contains("e.g. \"10.8 MB/s\""), "{e}");
        let e = parse_toml(&format!(
            "{GOOD}\n[bandwidth]\ntotal = \"10.8 MB/s\"\nalpha = 1.5\n"
        ))
        .unwrap_err();
        assert_eq!(e.field, "bandwidth.alpha", "{e}");
        let e = parse_toml(&format!(
            "{GOOD}\n[bandwidth]\ntotal = \"10.8 MB/s\"\ninterval = \"soon\"\n"
        ))
        .unwrap_err();
        assert_eq!(e.field, "bandwidth.interval", "{e}");
        let e = parse_toml(&format!("{GOOD}\n[bandwidth]\ntotl = \"1 MB/s\"\n")).unwrap_err();
        assert!(e.field.starts_with("bandwidth"), "{e}");
    }
}
