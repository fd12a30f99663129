//! The data the controller reasons about: service definitions, allocations,
//! backend lists, load samples and app states. They are also the manager's
//! wire types (`shoal_net::wire` re-exports them), so the live API and the
//! simulator speak the same values. Unknown fields are refused, so a typo is
//! an error rather than a silently ignored setting.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub use crate::lease::LeaseState;

/// Control parameters of an application (LAMA's server control parameters,
/// such as DocRoot or RelayFrom): string keys and values.
pub type Params = BTreeMap<String, String>;

/// The node's load L(t), sampled by its agent every 2 s.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadSample {
    /// Agent-side wall clock when sampled, unix milliseconds.
    pub at_ms: u64,
    /// CPU utilization over the last period, 0..1 of all cores.
    pub cpu: f64,
    /// Number of CPUs the node has.
    pub cpus: u32,
    /// Network receive rate, bytes per second, over all non-loopback
    /// interfaces (all interfaces when only loopback exists).
    pub net_rx_bps: f64,
    /// Network transmit rate, bytes per second.
    pub net_tx_bps: f64,
    /// Disk read rate, bytes per second.
    pub disk_read_bps: f64,
    /// Disk write rate, bytes per second.
    pub disk_write_bps: f64,
    /// Memory in use, bytes (total minus available).
    pub mem_used_bytes: u64,
    /// Memory installed, bytes.
    pub mem_total_bytes: u64,
    /// CPU used by this node's own processes (the agent and the apps it
    /// started, their whole process tree), 0..1 of all cores: what tells
    /// nodes apart when several share a host, where `cpu` is the host's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub own_cpu: Option<f64>,
}

/// A service item in the lookup service: one node and its attributes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    /// Node name; must match the identity in the node's certificate.
    pub name: String,
    /// The host (IP or name) at which the node's applications are reachable.
    pub address: String,
    /// Roles, such as `web` or `dispatcher`.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Capacities, such as `net_mbps` or `cpus`.
    #[serde(default)]
    pub capacities: BTreeMap<String, f64>,
}

/// A renewal; it carries the latest load sample and the actual state of the
/// node's applications.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// The latest L(t), if one has been sampled.
    #[serde(default)]
    pub load: Option<LoadSample>,
    /// Actual state of every application the agent runs.
    #[serde(default)]
    pub apps: Vec<AppStatus>,
    /// The desired-apps generation the agent has applied: the states above
    /// are of that generation's apps, so the controller does not take the
    /// state of an app the agent has not started yet for its new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied: Option<u64>,
}

/// The answer to a renewal: the lease and the node's desired state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewResponse {
    /// Lease duration, milliseconds.
    pub lease_ttl_ms: u64,
    /// What should run on this node (empty when `unchanged`).
    pub desired: Vec<AppAssignment>,
    /// Increases whenever `desired` changes.
    pub generation: u64,
    /// The renewal said it had applied this generation already, so
    /// `desired` is left out: the agent keeps what it has (as an etcd or
    /// Consul watch answers "nothing new since your index"). Renewals at
    /// 10,000 nodes then carry no app parameters at all.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unchanged: bool,
    /// Egress caps the node must enforce, bytes/s, by app id (soft state,
    /// sent with every renewal; see `shoal_core::bandwidth`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub caps: BTreeMap<String, u64>,
}

/// One application the manager wants on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppAssignment {
    /// Unique on the node; names the app's directory and pid file.
    pub id: String,
    /// Which adaptor controls it: `process`, `nginx` or `www`.
    pub adaptor: String,
    /// Control parameters.
    #[serde(default)]
    pub params: Params,
}

/// The life-cycle state of an application on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppState {
    /// Started, health not yet confirmed.
    Starting,
    /// Running and passing its health check.
    Running,
    /// Running but failing its health check.
    Unhealthy,
    /// Exited; waiting for its restart back-off.
    Backoff,
    /// Cannot be started (bad parameters, missing program).
    Failed,
    /// Not running, as desired.
    Stopped,
}

/// The actual state of an application, reported by its adaptor's `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppStatus {
    /// The assignment id.
    pub id: String,
    /// The adaptor controlling it.
    pub adaptor: String,
    /// Its state.
    pub state: AppState,
    /// Process id of the app's main process, when running.
    #[serde(default)]
    pub pid: Option<u32>,
    /// Restarts since the assignment began.
    #[serde(default)]
    pub restarts: u32,
    /// The address it serves on, when it has one.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Why it is in this state, when not plainly running.
    #[serde(default)]
    pub message: Option<String>,
    /// Its egress as the agent shapes and measures it, when the node
    /// enforces a bandwidth cap (Vibra).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<AppBandwidth>,
    /// A streaming server's own figures (the icecast adaptor reads them
    /// from icecast's /admin/stats), when the app is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<StreamStats>,
}

/// What a streaming server reports of itself: listeners per mount and the
/// bytes it has sent, so that a service can be sized on listeners or on
/// bandwidth (LAMA section 5).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamStats {
    /// Listeners connected, over all mounts.
    pub listeners: u64,
    /// Per mount point.
    #[serde(default)]
    pub mounts: BTreeMap<String, MountStats>,
}

/// One mount point of a streaming server.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountStats {
    /// Listeners connected to it.
    pub listeners: u64,
    /// Bytes sent to its listeners since the mount started.
    #[serde(default)]
    pub bytes_sent: u64,
    /// Listeners icecast counts as lagging behind the stream.
    #[serde(default)]
    pub slow_listeners: u64,
    /// Whether a source (or the relay's upstream) is feeding it.
    #[serde(default)]
    pub live: bool,
}

/// An app's egress on its node: the offered rate (sent plus dropped, the
/// thesis's "packet-enqueuing rate") over the last second and the cap in
/// force, which acknowledges the directory's last change.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppBandwidth {
    /// Bytes per second offered to the shaper.
    pub offered_bps: f64,
    /// Bytes per second sent.
    #[serde(default)]
    pub sent_bps: f64,
    /// The cap in force, bytes/s (None: not shaped).
    #[serde(default)]
    pub cap_bps: Option<u64>,
}

/// A node as `shoal status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Node name.
    pub name: String,
    /// Where its applications are reachable.
    pub address: String,
    /// Roles.
    pub roles: Vec<String>,
    /// Capacities.
    pub capacities: BTreeMap<String, f64>,
    /// `alive` or `failed`.
    pub state: LeaseState,
    /// Milliseconds before the lease runs out (0 when failed).
    pub lease_remaining_ms: u64,
    /// The last L(t) received.
    pub load: Option<LoadSample>,
    /// Actual applications as last reported.
    pub apps: Vec<AppStatus>,
    /// Desired applications.
    pub desired: Vec<AppAssignment>,
    /// Takes no new allocation (`shoal node cordon`).
    #[serde(default)]
    pub cordoned: bool,
    /// The service holding it, if any.
    #[serde(default)]
    pub service: Option<String>,
}

/// A service as `shoal status` shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// Service name.
    pub name: String,
    /// Nodes currently allocated to it (starting, serving or draining).
    pub nodes: Vec<String>,
    /// Nodes serving (listed as live backends).
    #[serde(default)]
    pub serving: Vec<String>,
    /// Nodes allocated whose app is not yet running.
    #[serde(default)]
    pub starting: Vec<String>,
    /// Nodes being drained before release.
    #[serde(default)]
    pub draining: Vec<String>,
    /// The allocation policy.
    #[serde(default)]
    pub policy: String,
    /// Last observed summed load, in the service's metric unit.
    #[serde(default)]
    pub usage: Option<f64>,
    /// Last forecast of the summed load.
    #[serde(default)]
    pub forecast: Option<f64>,
    /// The last decision's reason.
    #[serde(default)]
    pub last_decision: Option<String>,
    /// Being deleted (draining out).
    #[serde(default)]
    pub deleting: bool,
    /// The bandwidth directory's entries, when the service has a
    /// `[bandwidth]` total.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<crate::bandwidth::ServiceBandwidth>,
}

/// What stands for a secret parameter's value wherever it is shown.
pub const REDACTED: &str = "(redacted)";

/// Whether a parameter holds a secret (`secret.NAME`): its value goes only
/// to the node that runs the app, never into status or the dashboard.
pub fn is_secret_param(key: &str) -> bool {
    key.starts_with("secret.")
}

/// Whether a parameter's value stays off the unauthenticated dashboard:
/// secrets, and the environment and file contents apps are configured with.
pub fn is_private_param(key: &str) -> bool {
    is_secret_param(key) || key.starts_with("env.") || key.starts_with("file.")
}

impl AppAssignment {
    /// This assignment with the values of parameters `hide` selects
    /// replaced by [`REDACTED`].
    pub fn redacted(&self, hide: fn(&str) -> bool) -> Self {
        let mut a = self.clone();
        for (k, v) in a.params.iter_mut() {
            if hide(k) {
                *v = REDACTED.to_string();
            }
        }
        a
    }
}

impl NodeStatus {
    /// This node with its desired apps' parameters redacted by `hide`.
    pub fn redacted(mut self, hide: fn(&str) -> bool) -> Self {
        self.desired = self.desired.iter().map(|a| a.redacted(hide)).collect();
        self
    }
}

/// Adaptors every agent has built in.
pub const ADAPTORS: &[&str] = &["process", "nginx", "www", "icecast"];

/// Checks an assignment's control parameters without touching any node:
/// the adaptor exists, every key is one it understands, required keys are
/// present and addresses parse. The manager runs this before it
/// acknowledges an assignment; the agent runs it again before it starts
/// anything (and then checks what only the node can, such as paths).
pub fn check_params(adaptor: &str, params: &Params) -> Result<(), String> {
    let need = |k: &str| -> Result<&str, String> {
        params
            .get(k)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                format!("the {adaptor} adaptor needs the parameter {k} (--param {k}=...)")
            })
    };
    match adaptor {
        "process" => {
            let known = |k: &str| {
                matches!(k, "command" | "args" | "health" | "endpoint")
                    || k.starts_with("env.")
                    || k.starts_with("secret.")
                    || k.starts_with("file.")
            };
            if let Some(k) = params.keys().find(|k| !known(k)) {
                return Err(format!(
                    "unknown parameter {k:?} for the process adaptor; use command, args, env.NAME, secret.NAME, file.NAME, health, endpoint"
                ));
            }
            need("command")?;
            for k in params.keys() {
                if let Some(name) = k.strip_prefix("file.")
                    && (name.is_empty() || name.contains('/') || name.starts_with('.'))
                {
                    return Err(format!(
                        "{k}: config file names must be plain names inside the app directory"
                    ));
                }
            }
            Ok(())
        }
        "nginx" | "www" => {
            let www = adaptor == "www";
            if let Some(k) = params.keys().find(|k| {
                !(matches!(k.as_str(), "listen" | "root")
                    || (www && matches!(k.as_str(), "cache_mb" | "cpus")))
            }) {
                return Err(format!(
                    "unknown parameter {k:?} for the {adaptor} adaptor; use listen and root{}",
                    if www { " (and cache_mb, cpus)" } else { "" }
                ));
            }
            if let Some(v) = params.get("cpus")
                && !v
                    .trim()
                    .parse::<f64>()
                    .is_ok_and(|x| (0.01..=1024.0).contains(&x))
            {
                return Err(format!(
                    "cpus must be a number of CPUs from 0.01 to 1024, e.g. 0.5, got {v:?}"
                ));
            }
            if let Some(v) = params.get("cache_mb")
                && !v
                    .trim()
                    .parse::<f64>()
                    .is_ok_and(|x| x.is_finite() && x >= 0.0)
            {
                return Err(format!(
                    "cache_mb must be a number of MB, e.g. 48, got {v:?}"
                ));
            }
            let listen = need("listen")?;
            listen
                .parse::<core::net::SocketAddr>()
                .map_err(|_| format!("listen must be IP:PORT, got {listen:?}"))?;
            need("root")?;
            Ok(())
        }
        "icecast" => check_icecast_params(params),
        other => Err(format!(
            "unknown adaptor {other:?}; use one of: {}",
            ADAPTORS.join(", ")
        )),
    }
}

/// The icecast adaptor's parameters: `listen` (IP:PORT), `secret.source_password`,
/// optional `secret.admin_password` (default: the source password),
/// `mounts` (comma-separated, default `/stream`), `max_listeners`
/// (default 1000), `burst_kb` (default 64), `queue_kb` (how far a
/// listener may lag before icecast drops it, default 512) and `relay_from` (IP:PORT of the
/// server to relay every mount from; equal to `listen`, as
/// `{{ first_server }}` renders on the first node, it is the master).
fn check_icecast_params(params: &Params) -> Result<(), String> {
    const KNOWN: &[&str] = &[
        "listen",
        "mounts",
        "max_listeners",
        "burst_kb",
        "queue_kb",
        "relay_from",
        "secret.source_password",
        "secret.admin_password",
    ];
    if let Some(k) = params.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(format!(
            "unknown parameter {k:?} for the icecast adaptor; use {}",
            KNOWN.join(", ")
        ));
    }
    let addr = |k: &str, v: &str| {
        v.parse::<core::net::SocketAddr>()
            .map(|_| ())
            .map_err(|_| format!("{k} must be IP:PORT, e.g. 10.0.0.1:8000, got {v:?}"))
    };
    match params.get("listen").filter(|v| !v.is_empty()) {
        Some(v) => addr("listen", v)?,
        None => {
            return Err(
                "the icecast adaptor needs the parameter listen (--param listen=IP:PORT)".into(),
            );
        }
    }
    if let Some(v) = params.get("relay_from").filter(|v| !v.is_empty()) {
        addr("relay_from", v)?;
    }
    match params.get("secret.source_password") {
        Some(p) if !p.is_empty() => {}
        _ => {
            return Err(
                "the icecast adaptor needs a source password: secret.source_password (or source_password in [app.secrets])".into(),
            );
        }
    }
    for k in ["secret.source_password", "secret.admin_password"] {
        if params.get(k).is_some_and(|p| {
            p.contains(['<', '>', '&', '"', '\'']) || p.chars().any(char::is_control)
        }) {
            return Err(format!(
                "{k} may not hold XML markup characters (< > & \" ') or control characters; choose another password"
            ));
        }
    }
    for m in params
        .get("mounts")
        .map(String::as_str)
        .unwrap_or("/stream")
        .split(',')
    {
        let m = m.trim();
        let ok = m.len() > 1
            && m.starts_with('/')
            && m[1..]
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c));
        if !ok {
            return Err(format!(
                "mounts: {m:?} is not a mount point; give paths such as /stream or /radio.mp3, comma-separated"
            ));
        }
    }
    for (k, lo, hi) in [
        ("max_listeners", 1u64, 100_000u64),
        ("burst_kb", 0, 16_384),
        ("queue_kb", 4, 65_536),
    ] {
        if let Some(v) = params.get(k)
            && !v
                .trim()
                .parse::<u64>()
                .is_ok_and(|x| (lo..=hi).contains(&x))
        {
            return Err(format!(
                "{k} must be a whole number from {lo} to {hi}, got {v:?}"
            ));
        }
    }
    Ok(())
}

/// Which load drives a service's sizing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricKind {
    /// Node transmit rate in Mbit/s, from the agents' L(t).
    Net,
    /// CPU cores busy (cpu x cpus), from the agents' L(t).
    Cpu,
    /// Requests in flight per backend, reported by the service's dispatchers
    /// (LAMA's concurrent streams per node).
    DispatchActive,
    /// Requests per second per backend, reported by the dispatchers.
    DispatchRps,
}

/// Allocation policies a service may use (shoal-core's policies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    /// LAMA Algorithm 1 on the observed sum.
    Threshold,
    /// LAMA Algorithm 1 on the AR(1) forecast 20 s ahead.
    Ar,
    /// The Kubernetes HPA rule (target = the SLA's upper threshold).
    Hpa,
    /// shoal's predictive policy (forecast at the lead time + 2 sigma).
    Predictive,
}

/// The application a service runs on each of its nodes. Parameter values
/// are minijinja templates rendered per node at assignment time, with
/// `node_name`, `node_address`, `port`, `service`, `app_id` and
/// `first_server` (the backend address of the service's first serving node:
/// LAMA's RelayFrom).
///
/// Secrets come as `secret.NAME` parameters or as an `[app.secrets]` table
/// (`NAME = "value"`), which is read into the same parameters: one form is
/// stored, redacted and sent to nodes. Secrets are not templates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "ServiceAppFile")]
pub struct ServiceApp {
    /// The adaptor: `process`, `nginx` or `www`.
    pub adaptor: String,
    /// The port the app serves on (`{{ port }}` in templates).
    pub port: Option<u16>,
    /// The address dispatchers send requests to, a template.
    pub backend: String,
    /// Control parameters (templates, but for `secret.*`).
    pub params: Params,
}

/// [`ServiceApp`] as written in a service file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceAppFile {
    adaptor: String,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default = "default_backend")]
    backend: String,
    #[serde(default)]
    params: Params,
    #[serde(default)]
    secrets: Params,
}

impl TryFrom<ServiceAppFile> for ServiceApp {
    type Error = String;
    fn try_from(f: ServiceAppFile) -> Result<Self, String> {
        let mut params = f.params;
        for (name, value) in f.secrets {
            let ok = !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.starts_with(|c: char| c.is_ascii_digit());
            if !ok {
                return Err(format!(
                    "app.secrets.{name}: a secret's name is an environment variable's: letters, digits and '_', not starting with a digit"
                ));
            }
            let key = format!("secret.{name}");
            if params.contains_key(&key) {
                return Err(format!(
                    "app.secrets.{name} is also given as app.params.\"{key}\"; give it once"
                ));
            }
            params.insert(key, value);
        }
        Ok(Self {
            adaptor: f.adaptor,
            port: f.port,
            backend: f.backend,
            params,
        })
    }
}

fn default_backend() -> String {
    "{{ node_address }}:{{ port }}".into()
}

/// How a service's dispatchers choose backends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DispatchSettings {
    /// rr, wrr, lc, wlc, lard, lard-r, url-hash, bounded-ch.
    #[serde(default = "default_algo")]
    pub algo: String,
    /// Replication factor for url-hash.
    #[serde(default = "default_one_usize")]
    pub replicas: usize,
    /// Hash function: charsum, md5, sha1, xxh3.
    #[serde(default = "default_hash")]
    pub hash: String,
}

impl Default for DispatchSettings {
    fn default() -> Self {
        Self {
            algo: default_algo(),
            replicas: 1,
            hash: default_hash(),
        }
    }
}

fn default_algo() -> String {
    "url-hash".into()
}
fn default_hash() -> String {
    "xxh3".into()
}
fn default_one_usize() -> usize {
    1
}

/// The resource metric that sizes a service, and one node's capacity C in it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricSpec {
    /// Which load.
    pub kind: MetricKind,
    /// Capacity C of one node in that metric's unit (e.g. 100 Mbit/s).
    pub capacity: f64,
}

/// SLA utilization thresholds (LAMA: 0.9 and 0.8).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sla {
    /// Add a node above this utilization.
    #[serde(default = "default_upper")]
    pub upper: f64,
    /// Release a node while the rest would stay under this utilization.
    #[serde(default = "default_lower")]
    pub lower: f64,
}

impl Default for Sla {
    fn default() -> Self {
        Self {
            upper: default_upper(),
            lower: default_lower(),
        }
    }
}

fn default_upper() -> f64 {
    0.9
}
fn default_lower() -> f64 {
    0.8
}
fn default_min_nodes() -> u32 {
    1
}
fn default_policy() -> PolicyKind {
    PolicyKind::Threshold
}
fn default_lead_time() -> f64 {
    20.0
}
fn default_drain_timeout() -> f64 {
    30.0
}
fn default_period() -> f64 {
    2.0
}

/// A service (hosted site) on the shared pool, as `shoal service apply`
/// reads it from TOML.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// Unique name.
    pub name: String,
    /// The app each node runs.
    pub app: ServiceApp,
    /// Dispatcher settings.
    #[serde(default)]
    pub dispatch: DispatchSettings,
    /// What drives sizing.
    pub metric: MetricSpec,
    /// Floor.
    #[serde(default = "default_min_nodes")]
    pub min_nodes: u32,
    /// Ceiling.
    pub max_nodes: u32,
    /// Higher wins nodes of the shared pool.
    #[serde(default)]
    pub priority: u32,
    /// Utilization thresholds.
    #[serde(default)]
    pub sla: Sla,
    /// Allocation policy.
    #[serde(default = "default_policy")]
    pub policy: PolicyKind,
    /// Expected seconds from allocating a node to it serving.
    #[serde(default = "default_lead_time")]
    pub lead_time_secs: f64,
    /// Longest wait for a released node's requests to finish.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout_secs: f64,
    /// Monitor sampling period p, seconds (LAMA: 2).
    #[serde(default = "default_period")]
    pub period_secs: f64,
    /// Only nodes holding this role may serve it.
    #[serde(default)]
    pub role: Option<String>,
    /// Tuning of the forecasting policies.
    #[serde(default)]
    pub forecast: ForecastTuning,
    /// The service's total egress, split among its servers by demand
    /// (Vibra); none: nodes are not shaped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<BandwidthSpec>,
    /// Federation with other clusters (H-SWEB): requests go where they
    /// finish first; none: every request is served here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub federation: Option<FederationSpec>,
}

/// `[federation]` in a service file: this service's requests may be
/// fetched from, or redirected to, the clusters this one is federated with
/// (`shoal federation join`) that run a service of the same name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationSpec {
    /// Local predictions at or under this are served here without looking
    /// at any peer (H-SWEB's "predetermined constant").
    #[serde(default = "default_fed_threshold")]
    pub threshold: String,
    /// The bandwidth assumed from this cluster to its own clients, Mbit/s.
    #[serde(default = "default_client_mbit")]
    pub client_mbit: f64,
    /// A node's storage bandwidth, Mbit/s.
    #[serde(default = "default_disk_mbit")]
    pub disk_mbit: f64,
    /// The address peers redirect clients to (HOST:PORT); default: the
    /// reporting dispatcher's listen address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public: Option<String>,
    /// `cost` (the default: the cost model decides), or a baseline:
    /// `local` (never redirect, fetch what is not here) or `redirect`
    /// (always redirect to a peer holding the data).
    #[serde(default)]
    pub mode: crate::federation::Mode,
}

fn default_fed_threshold() -> String {
    "50ms".into()
}
fn default_client_mbit() -> f64 {
    1000.0
}
fn default_disk_mbit() -> f64 {
    4000.0
}

impl FederationSpec {
    /// The cost model's settings, or which key is wrong and why.
    pub fn model(&self) -> Result<crate::federation::Model, (&'static str, String)> {
        let t = crate::duration::parse_secs(&self.threshold)
            .map_err(|e| ("threshold", e.to_string()))?;
        if !(0.0..=60.0).contains(&t) {
            return Err((
                "threshold",
                format!("must be between 0 and 60 s, got {}", self.threshold),
            ));
        }
        for (k, v) in [
            ("client_mbit", self.client_mbit),
            ("disk_mbit", self.disk_mbit),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err((k, format!("must be a positive number of Mbit/s, got {v}")));
            }
        }
        Ok(crate::federation::Model {
            mode: self.mode,
            threshold_ms: t * 1e3,
            client_mbit: self.client_mbit,
            disk_mbit: self.disk_mbit,
            ..crate::federation::Model::default()
        })
    }
}

/// `[bandwidth]` in a service file: the total BW split by eq. 3.1/3.2
/// (thesis 3.3.2) and moved to the heirs of a failed server (4.3.3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BandwidthSpec {
    /// The service's total, e.g. `"10.8 MB/s"` (MB = 10^6 bytes).
    pub total: String,
    /// Weight of the old demand estimate in eq. 3.1.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// How often caps are recomputed.
    #[serde(default = "default_bw_interval")]
    pub interval: String,
    /// No server's cap goes below this (default: 1.25 % of the total).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub floor: Option<String>,
}

fn default_alpha() -> f64 {
    0.9
}
fn default_bw_interval() -> String {
    "3s".into()
}

impl BandwidthSpec {
    /// The checked settings; a failed server's cap goes to the next R
    /// servers under url-hash, evenly otherwise.
    pub fn settings(
        &self,
        dispatch: &DispatchSettings,
    ) -> Result<crate::bandwidth::Settings, crate::bandwidth::SettingsError> {
        crate::bandwidth::Settings::parse(
            &self.total,
            self.alpha,
            &self.interval,
            self.floor.as_deref(),
            crate::bandwidth::Spread::for_algo(&dispatch.algo, dispatch.replicas),
        )
    }
}

/// How the forecasting policies look ahead (`[forecast]` in a service file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForecastTuning {
    /// The predictive policy provisions for forecast mean + k standard
    /// deviations.
    #[serde(default = "default_k")]
    pub k: f64,
    /// Length of the demand's season (a day: 86400) when it has one; the
    /// predictive policy then learns a time-of-day profile.
    #[serde(default)]
    pub season_secs: Option<f64>,
}

impl Default for ForecastTuning {
    fn default() -> Self {
        Self {
            k: default_k(),
            season_secs: None,
        }
    }
}

fn default_k() -> f64 {
    2.0
}

/// Where a node stands in a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AllocPhase {
    /// Assigned; waiting for the agent to report the app running.
    Starting,
    /// Listed as a backend.
    Serving,
    /// Listed as draining; released once drained.
    Draining,
}

/// One node allocated to a service (durable).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Allocation {
    /// The node.
    pub node: String,
    /// Backend address (rendered `app.backend`).
    pub address: String,
    /// Phase.
    pub phase: AllocPhase,
    /// When the phase began, unix ms.
    pub since_ms: u64,
    /// Backend-list version at which draining began.
    #[serde(default)]
    pub drain_version: Option<u64>,
    /// Service that gets the node once drained (pool arbitration).
    #[serde(default)]
    pub handoff_to: Option<String>,
    /// The app rendered for this node when it was allocated; a node keeps
    /// it until a rolling update replaces the node.
    #[serde(default)]
    pub app: Option<AppAssignment>,
    /// The service's app epoch this node was rendered at; older than the
    /// service's epoch means stale (a rolling update replaces it).
    #[serde(default)]
    pub app_epoch: u64,
}

/// Durable allocation state of one service.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AllocDoc {
    /// Backend-list version.
    pub version: u64,
    /// Allocations.
    pub allocs: Vec<Allocation>,
    /// Bumped whenever the service's app definition changes.
    #[serde(default)]
    pub app_epoch: u64,
    /// A rolling update has an extra node starting or serving that replaces
    /// one stale node once it serves.
    #[serde(default)]
    pub surge: bool,
}

/// A node's durable record: its registration and desired applications.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The registration (service item).
    pub registration: Registration,
    /// Desired applications.
    pub desired: Vec<AppAssignment>,
    /// Bumped at every change of `desired`.
    pub generation: u64,
}

/// What an operator or the lease table decided about a node, durable so a
/// restart does not forget it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFlags {
    /// Its lease expired and it has not renewed since.
    #[serde(default)]
    pub failed: bool,
    /// Takes no new allocation (`shoal node cordon`).
    #[serde(default)]
    pub cordoned: bool,
    /// Its allocation is to move elsewhere (`shoal node drain`): replaced
    /// first, like a rolling update, then drained.
    #[serde(default)]
    pub drain: bool,
}

/// One backend in a service's list, as dispatchers follow it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendEntry {
    /// `host:port`.
    pub address: String,
    /// Relative weight.
    pub weight: u32,
    /// No new requests.
    pub draining: bool,
    /// The node serving it.
    #[serde(default)]
    pub node: String,
}

/// A service's backend list (LAMA's dispatcher control parameters, D-CP).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendList {
    /// Service name.
    pub service: String,
    /// Increases with every change of the list.
    pub version: u64,
    /// The backends.
    pub backends: Vec<BackendEntry>,
    /// How dispatchers should choose among them.
    pub dispatch: DispatchSettings,
}

/// Per-backend load seen by a dispatcher over its last report period.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendLoad {
    /// `host:port`.
    pub address: String,
    /// Mean requests in flight over the period.
    pub active: f64,
    /// Requests in flight now.
    pub in_flight: u32,
    /// Requests per second over the period.
    pub rps: f64,
}

/// A dispatcher's report to the manager (every second).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DispatchReport {
    /// The dispatcher's identity (its listen address).
    pub dispatcher: String,
    /// The backend-list version it runs.
    pub version: u64,
    /// Its backends.
    pub backends: Vec<BackendLoad>,
    /// What a federated service's dispatcher adds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub federation: Option<crate::federation::wire::FedReport>,
}

/// One monitor sample of a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeriesPoint {
    /// Unix ms.
    pub at_ms: u64,
    /// Observed summed load.
    pub observed: f64,
    /// Forecast made at this time for the policy's horizon (or the lead time).
    pub forecast: Option<f64>,
    /// Horizon of `forecast`, seconds.
    pub horizon_secs: f64,
    /// Nodes allocated (starting + serving).
    pub allocated: u32,
    /// Nodes serving.
    pub serving: u32,
}

/// `GET /v1/services/{name}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceDetail {
    /// The definition (absent while a deleted service drains out).
    pub spec: Option<ServiceSpec>,
    /// Summary.
    pub status: ServiceStatus,
    /// Allocations.
    pub allocations: Vec<Allocation>,
    /// Backend list.
    pub backends: BackendList,
    /// Monitor time series, oldest first.
    pub series: Vec<SeriesPoint>,
}

impl ServiceDetail {
    /// This detail with secret parameters replaced by [`REDACTED`]: in the
    /// definition and in every allocation's rendered app.
    pub fn redacted(mut self) -> Self {
        if let Some(spec) = self.spec.as_mut() {
            for (k, v) in spec.app.params.iter_mut() {
                if is_secret_param(k) {
                    *v = REDACTED.to_string();
                }
            }
        }
        for a in &mut self.allocations {
            a.app = a.app.as_ref().map(|x| x.redacted(is_secret_param));
        }
        self
    }
}

#[cfg(test)]
mod icecast_params_tests {
    use super::*;

    fn p(kv: &[(&str, &str)]) -> Params {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn icecast_parameters_are_checked_with_the_fix_named() {
        let ok = p(&[
            ("listen", "10.0.0.2:8000"),
            ("relay_from", "10.0.0.1:8000"),
            ("mounts", "/stream, /talk.mp3"),
            ("secret.source_password", "pw"),
        ]);
        assert_eq!(check_params("icecast", &ok), Ok(()));
        let err = |kv: &[(&str, &str)]| check_params("icecast", &p(kv)).unwrap_err();
        assert!(err(&[("listen", "10.0.0.2:8000")]).contains("secret.source_password"));
        assert!(err(&[("secret.source_password", "pw")]).contains("listen"));
        assert!(err(&[("listen", "x"), ("secret.source_password", "pw")]).contains("IP:PORT"));
        assert!(
            err(&[
                ("listen", "10.0.0.2:8000"),
                ("secret.source_password", "a<b")
            ])
            .contains("markup")
        );
        let e = err(&[
            ("listen", "10.0.0.2:8000"),
            ("secret.source_password", "pw"),
            ("mounts", "stream"),
        ]);
        assert!(e.contains("mount point"), "{e}");
        assert!(
            err(&[
                ("listen", "10.0.0.2:8000"),
                ("secret.source_password", "pw"),
                ("max_listeners", "lots"),
            ])
            .contains("max_listeners")
        );
        assert!(
            err(&[
                ("listen", "10.0.0.2:8000"),
                ("secret.source_password", "pw"),
                ("root", "/x"),
            ])
            .contains("unknown parameter")
        );
        // The password never appears in an error.
        assert!(
            !err(&[("listen", "bad"), ("secret.source_password", "hunter2")]).contains("hunter2")
        );
    }
}
