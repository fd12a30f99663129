//! The manager's HTTPS API.

use crate::state::{Lookup, Registry, RegistryError};
use axum::Router;
use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use bytes::Bytes;
use futures_util::Stream;
use shoal_net::identity::{CertAuthority, Token, validate_node_name};
use shoal_net::server::Peer;
use shoal_net::wire::*;
use std::convert::Infallible;
use std::sync::Arc;

/// Shared state of the API handlers.
pub struct Ctx {
    /// The registry.
    pub registry: Arc<Registry>,
    /// The CA that signs node certificates.
    pub ca: CertAuthority,
    /// Join tokens and the keys node names are bound to.
    pub trust: Arc<crate::trust::Trust>,
    /// Services on the shared pool.
    pub services: Arc<crate::services::Services>,
    /// Counters behind `GET /metrics`.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// `shoal logs` requests on their way to agents and back.
    pub logs: Arc<crate::logs::LogHub>,
    /// How long the node certificates it issues live.
    pub node_cert_ttl: std::time::Duration,
    /// Parallel jobs and the DPS banker.
    pub jobs: Arc<crate::jobs::Jobs>,
    /// Federation with other clusters (H-SWEB).
    pub federation: Arc<crate::federation::Federation>,
}

/// An API error: an HTTP status and a message that names the fix.
#[derive(Debug)]
pub struct ApiErr(pub StatusCode, pub String);

impl IntoResponse for ApiErr {
    fn into_response(self) -> Response {
        (self.0, axum::Json(ErrorBody { error: self.1 })).into_response()
    }
}

impl From<RegistryError> for ApiErr {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::NotRegistered(_) => ApiErr(StatusCode::NOT_FOUND, e.to_string()),
            RegistryError::Refused(_) => ApiErr(StatusCode::CONFLICT, e.to_string()),
            RegistryError::Store(_) => ApiErr(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{e}; nothing was changed, retry later"),
            ),
        }
    }
}

type ApiResult<T> = Result<T, ApiErr>;

fn bad(msg: impl Into<String>) -> ApiErr {
    ApiErr(StatusCode::BAD_REQUEST, msg.into())
}

/// Decodes a JSON body, naming the offending field on a type error.
pub fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            bad(format!("malformed JSON request body: {inner}"))
        } else {
            bad(format!("malformed JSON request body at `{path}`: {inner}"))
        }
    })
}

/// Any certificate of this cluster that has not been revoked.
pub(crate) fn need_any(ctx: &Ctx, peer: &Peer) -> ApiResult<()> {
    check_revoked(ctx, peer)?;
    if let Some(s) = peer.dispatcher() {
        return Err(dispatcher_scope(s));
    }
    if peer.cn.is_some() {
        if let Some(n) = peer.node() {
            check_node_cert(ctx, peer, n)?;
        }
        Ok(())
    } else {
        Err(ApiErr(
            StatusCode::UNAUTHORIZED,
            "a client certificate of this cluster is required: nodes get one by joining, administrators use admin.pem from the cluster directory (--dir or SHOAL_DIR)".into(),
        ))
    }
}

fn dispatcher_scope(service: &str) -> ApiErr {
    ApiErr(
        StatusCode::FORBIDDEN,
        format!(
            "a dispatcher certificate (service {service:?}) only reads its service's backend list and reports its load; other calls need the administrator certificate"
        ),
    )
}

/// Refuses a certificate on the deny list (`shoal cert revoke`).
fn check_revoked(ctx: &Ctx, peer: &Peer) -> ApiResult<()> {
    match &peer.key_fp {
        Some(k) if ctx.trust.is_revoked(k) => Err(ApiErr(
            StatusCode::FORBIDDEN,
            "this certificate was revoked by an administrator (`shoal cert revoke`); ask for a new one".into(),
        )),
        _ => Ok(()),
    }
}

/// The administrator, or the dispatcher of `service`: reading its backend
/// list and reporting its load is all a dispatcher certificate may do.
pub(crate) fn need_service_dispatch(ctx: &Ctx, peer: &Peer, service: &str) -> ApiResult<()> {
    check_revoked(ctx, peer)?;
    match peer.dispatcher() {
        Some(s) if s == service => Ok(()),
        Some(s) => Err(ApiErr(
            StatusCode::FORBIDDEN,
            format!("this dispatcher certificate is for service {s:?}, not {service:?}"),
        )),
        None => need_admin(ctx, peer),
    }
}

/// Refuses a node certificate whose node was removed or whose key is not
/// the one the name is bound to: revocation, checked on every request.
fn check_node_cert(ctx: &Ctx, peer: &Peer, name: &str) -> ApiResult<()> {
    let rotated = ctx
        .trust
        .check_node(peer, name)
        .map_err(|e| ApiErr(StatusCode::FORBIDDEN, e.to_string()))?;
    if rotated {
        ctx.registry.event(
            "certificate",
            Some(name),
            format!(
                "rotated certificate {} in use; the previous one is refused from now on",
                peer.key_fp.as_deref().unwrap_or("?")
            ),
        );
    }
    Ok(())
}

pub(crate) fn need_admin(ctx: &Ctx, peer: &Peer) -> ApiResult<()> {
    check_revoked(ctx, peer)?;
    if peer.cn.is_none() {
        return Err(ApiErr(
            StatusCode::UNAUTHORIZED,
            "a client certificate of this cluster is required: administrators use admin.pem from the cluster directory (--dir or SHOAL_DIR)".into(),
        ));
    }
    if peer.is_admin() {
        Ok(())
    } else {
        Err(ApiErr(
            StatusCode::FORBIDDEN,
            "this call needs the administrator certificate (admin.pem in the cluster directory)"
                .into(),
        ))
    }
}

pub(crate) fn need_node(ctx: &Ctx, peer: &Peer, name: &str) -> ApiResult<()> {
    need_any(ctx, peer)?;
    match peer.node() {
        Some(n) if n == name => Ok(()),
        Some(n) => Err(ApiErr(
            StatusCode::FORBIDDEN,
            format!("node {n:?} may only change its own registration, not {name:?}"),
        )),
        None => Err(ApiErr(
            StatusCode::FORBIDDEN,
            "only the node itself may do this".into(),
        )),
    }
}

/// Builds the API router.
pub fn router(ctx: Arc<Ctx>) -> Router {
    Router::new()
        .route("/v1/ca", get(ca))
        .route("/v1/join", post(join))
        .route("/v1/nodes/{name}", put(register).delete(cancel))
        .route("/v1/nodes/{name}/renew", post(renew))
        .route("/v1/nodes/{name}/certificate", post(rotate_cert))
        .route("/v1/nodes/{name}/roles", put(set_roles))
        .route("/v1/nodes/{name}/deploy-token", post(deploy_token))
        .route("/v1/certs", get(list_certs))
        .route("/v1/nodes/{name}/apps", put(assign))
        .route("/v1/lookup", get(lookup))
        .route("/v1/revoked/{key}", put(revoke_cert))
        .route("/v1/status", get(status))
        .route("/v1/events", get(events))
        .route("/v1/watch", get(watch))
        .route("/metrics", get(metrics_tls))
        .route("/v1/nodes/{name}/apps/{app}/log", get(app_log))
        .route("/v1/nodes/{name}/log-requests", get(log_requests))
        .route("/v1/nodes/{name}/log-requests/{id}", post(log_answer))
        .merge(crate::service_api::routes())
        .merge(crate::node_api::routes())
        .merge(crate::job_api::routes())
        .merge(crate::federation::routes())
        .fallback(|| async {
            ApiErr(
                StatusCode::NOT_FOUND,
                "no such API endpoint; see `shoal --help`".into(),
            )
        })
        .with_state(ctx)
}

/// `GET /metrics` alone, for the plain-HTTP `--metrics` listener.
pub fn metrics_router(ctx: Arc<Ctx>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(ctx)
}

async fn metrics(State(ctx): State<Arc<Ctx>>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        ctx.metrics.render(&ctx.registry, &ctx.services),
    )
        .into_response()
}

async fn metrics_tls(
    State(ctx): State<Arc<Ctx>>,
    Extension(peer): Extension<Peer>,
) -> ApiResult<Response> {
    need_admin(&ctx, &peer)?;
    Ok(metrics(State(ctx)).await)
}

#[derive(serde::Deserialize)]
struct LogQuery {
    offset: Option<u64>,
    tail: Option<usize>,
}

/// An app's output, from its node's agent (administrators only: output
/// may hold anything the app prints).
async fn app_log(
    State(ctx): State<Arc<Ctx>>,
    Extension(peer): Extension<Peer>,
    Path((name, app)): Path<(String, String)>,
    Query(q): Query<LogQuery>,
) -> ApiResult<axum::Json<LogChunk>> {
    need_admin(&ctx, &peer)?;
    validate_node_name(&app).map_err(|e| bad(format!("app id: {e}")))?;
    let Some(node) = ctx.registry.nodes().into_iter().find(|n| n.name == name) else {
        return Err(ApiErr(
            StatusCode::NOT_FOUND,
            format!("node {name:?} is not registered; see `shoal status`"),
        ));
    };
    if node.state == LeaseState::Failed {
        return Err(ApiErr(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "node {name:?} is FAILED (its lease ran out): its agent cannot be asked; its output is in its agent directory, apps/{app}/output.log"
            ),
        ));
    }
    ctx.logs
        .fetch(&name, app, q.offset, q.tail.map(|t| t.min(100_000)))
        .await
        .map(axum::Json)
        .map_err(|e| ApiErr(StatusCode::GATEWAY_TIMEOUT, e.to_string()))
}

/// An agent's long poll for output requests.
async fn log_requests(
    State(ctx): State<Arc<Ctx>>,
    Extension(peer): Extension<Peer>,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<Vec<LogRequest>>> {
    need_node(&ctx, &peer, &name)?;
    Ok(axum::Json(ctx.logs.poll(&name).await))
}

/// An agent's answer to one output request.
async fn log_answer(
    State(ctx): State<Arc<Ctx>>,
    Extension(peer): Extension<Peer>,
    Path((name, id)): Path<(String, u64)>,
    body: Bytes,
) -> ApiResult<axum::Json<serde_json::Value>> {
    need_node(&ctx, &peer, &name)?;
    let chunk: LogChunk = decode(&body)?;
    let delivered = ctx.logs.answer(&name, id, chunk);
    Ok(axum::Json(serde_json::json!({"delivered": delivered})))
}

async fn ca(State(ctx): State<Arc<Ctx>>) -> String {
    ctx.ca.pem.clone()
}

async fn join(State(ctx): State<Arc<Ctx>>, body: Bytes) -> ApiResult<axum::Json<JoinResponse>> {
    let req: JoinRequest = decode(&body)?;
    let token =
        Token::parse(&req.token).map_err(|e| ApiErr(StatusCode::UNAUTHORIZED, e.to_string()))?;
    let refused =
        |e: shoal_core::trust::JoinRefusal| ApiErr(StatusCode::UNAUTHORIZED, e.to_string());
    let unavailable = |e: anyhow::Error| {
        ApiErr(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{e:#}; nothing was changed, retry later"),
        )
    };
    // Checked first without spending a use, so a refused name costs none.
    ctx.trust
        .admit_token(&token, &req.name, &req.roles, false)
        .map_err(unavailable)?
        .map_err(refused)?;
    validate_node_name(&req.name).map_err(bad)?;
    let (cert_pem, key, expires_ms) = issue_node(&ctx, &req.name, &req.csr_pem)?;
    let alive = ctx
        .registry
        .nodes()
        .iter()
        .any(|n| n.name == req.name && n.state == LeaseState::Alive);
    let bound = ctx.trust.key_of(&req.name);
    let holder = shoal_core::trust::NameHolder {
        alive,
        bound_key: bound.as_deref(),
    };
    shoal_core::trust::admit_name(&req.name, &holder, &key)
        .map_err(|e| ApiErr(StatusCode::CONFLICT, e.to_string()))?;
    let (id, granted) = ctx
        .trust
        .admit_token(&token, &req.name, &req.roles, true)
        .map_err(unavailable)?
        .map_err(refused)?;
    ctx.trust
        .bind(&req.name, &key, granted, expires_ms)
        .map_err(RegistryError::from)?;
    ctx.registry.event(
        "joined",
        Some(&req.name),
        format!("node certificate issued (join token {id})"),
    );
    Ok(axum::Json(JoinResponse { cert_pem }))
}

/// Signs a node's CSR for the manager's node certificate lifetime.
/// Returns (cert PEM, its key's fingerprint, its expiry in Unix ms).
fn issue_node(ctx: &Ctx, name: &str, csr_pem: &str) -> ApiResult<(String, String, Option<u64>)> {
    let cert_pem = ctx
        .ca
        .issue_node(name, csr_pem, ctx.node_cert_ttl)
        .map_err(|e| bad(format!("cannot sign the certificate request: {e}")))?;
    let key = shoal_net::identity::first_cert_der(&cert_pem)
        .ok()
        .and_then(|der| shoal_net::tls::cert_key_fingerprint(&der))
        .ok_or_else(|| bad("cannot read the public key of the certificate request"))?;
    let expires = shoal_net::identity::cert_validity_ms(&cert_pem).map(|v| v.1);
    Ok((cert_pem, key, expires))
}

/// A node's new certificate, asked for with its current one before that
/// expires (kubelet's client certificate rotation). The new key takes over
/// at its first request; until then the old certificate still works, so a
/// node that dies mid-rotation is not locked out.
async fn rotate_cert(
    State(ctx): State<Arc<Ctx>>,
    Extension(peer): Extension<Peer>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<axum::Json<JoinResponse>> {
    need_node(&ctx, &peer, &name)?;
    let req: CertRequest = decode(&body)?;
    let (cert_pem, key, expires_ms) = issue_node(&ctx, &name, &req.csr_pem)?;
    if peer.key_fp.as_deref() == Some(key.as_str()) {
        return Err(bad(
            "the certificate request is for the key this request is made with; a rotation needs a new key",
        ));
    }
    if !ctx
        .trust
        .rotate_to(&name, &key, expires_ms)
        .map_err(RegistryError::from)?
    {
        return Err(ApiErr(
            StatusCode::FORBIDDEN,
            format!("node {name:?} has no key binding; join it again"),
        ));
    }
    ctx.registry.event(
        "certificate",
        Some(&name),
        format!(
            "certificate {key} issued for rotation (valid for {} s); it takes over at its first use",
            ctx.node_cert_ttl.as_secs()
        ),
    );
    Ok(axum::Json(JoinResponse { cert_pem }))
}

/// A deploy token for the host node `name` is deploying: single-use, for
/// that host's name only, with no more roles than `name` holds, ten
/// minutes (`shoal_core::trust::mint_deploy_token` decides). Only a node
/// whose lease is alive may ask.
async fn deploy_token(
    State(ctx): State<Arc<Ctx>>,
    Extension(peer): Extension<Peer>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<axum::Json<shoal_net::wire::DeployTokenResponse>> {
    need_node(&ctx, &peer, &name)?;
    let req: shoal_net::wire::DeployTokenRequest = decode(&body)?;
    validate_node_name(&req.node).map_err(bad)?;
    let alive = ctx
        .registry
        .nodes()
        .iter()
        .any(|n| n.name == name && n.state == LeaseState::Alive);
    if !alive {
        return Err(ApiErr(
            StatusCode::FORBIDDEN,
            format!(
                "node {name:?} has no live lease; only a registered, live node may mint deploy tokens"
            ),
        ));
    }
    let (t, rec) = ctx
        .trust
        .mint_deploy(&name, &req.node)
        .map_err(|e| {
            ApiErr(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{e:#}; nothing was changed, retry later"),
            )
        })?
        .map_err(|e| ApiErr(StatusCode::FORBIDDEN, e.to_string()))?;
    ctx.registry.event(
        "deploy-token",
        Some(&name),
        format!(
            "deploy token {} minted for node {:?} (single use, 10 min)",
            rec.id, req.node
        ),
    );
    Ok(axum::Json(shoal_net::wire::DeployTokenResponse {
        token: t.to_string(),
        id: rec.id,
        expires_ms: rec.expires_ms.unwrap_or(0),
    }))
}

/// Every node certificate the manager binds a name to: id, expiry, a
/// pending rotation, the roles granted.
async fn list_certs(
    State(ctx): State<Arc<Ctx>>,
    Extension(peer): Extension<Peer>,
) -> ApiResult<axum::Json<Vec<NodeCertInfo>>> {
    need_admin(&ctx, &peer)?;
    Ok(axum::Json(
        ctx.trust
            .bindings()
            .into_iter()
            .map(|(node, b)| NodeCertInfo {
                node,
                id: b.key,
                expires_ms: b.expires_ms,
                next_id: b.next_key,
                roles: b.roles,
            })
            .collect(),
    ))
}

/// An administrator widens (or narrows) the roles a node may register with.
async fn set_roles(
    State(ctx): State<Arc<Ctx>>,
    Extension(peer): Extension<Peer>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<axum::Json<serde_json::Value>> {
    need_admin(&ctx, &peer)?;
    let req: RolesRequest = decode(&body)?;
    if let Some(r) = req.roles.iter().flatten().find(|r| r.trim().is_empty()) {
        return Err(bad(format!("role {r:?} is empty; give role names")));
    }
    if !ctx
        .trust
        .set_roles(&name, req.roles.clone())
        .map_err(RegistryError::from)?
    {
        return Err(ApiErr(
            StatusCode::NOT_FOUND,
            format!(
                "node {name:?} has not joined (no certificate is bound to it); see `shoal cert list`"
            ),
        ));
    }
    let shown = req
        .roles
        .as_ref()
        .map(|r| format!("[{}]", r.join(",")))
        .unwrap_or("any".into());
    ctx.registry.event(
        "operator",
        Some(&name),
        format!("roles it may register with set to {shown} by an administrator"),
    );
    Ok(axum::Json(
        serde_json::json!({"node": name, "roles": req.roles}),
    ))
}

async fn register(
    State(ctx): State<Arc<Ctx>>,
    Extension(peer): Extension<Peer>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<axum::Json<LeaseGrant>> {
    need_node(&ctx, &peer, &name)?;
    let reg: Registration = decode(&body)?;
    if reg.name != name {
        return Err(bad(format!(
            "the body names node {:?} but the URL names {name:?}",
            reg.name
        )));
    }
    // The roles the join granted bound every later registration: a node
    // cannot take a service's role (and its secrets) it was not given.
    shoal_core::trust::admit_roles(&name, ctx.trust.granted_roles(&name).as_deref(), &reg.roles)
        .map_err(|e| ApiErr(StatusCode::FORBIDDEN, e.to_string()))?;
    if reg.address.trim().is_empty() {
        return Err(bad(
            "address must not be empty: give the host at which the node's apps are reachable",
        ));
    }
    for (k, v) in &reg.capacities {
        if !v.is_finite() || *v < 0.0 {
            return Err(bad(format!(
                "capacity {k} must be a finite number >= 0, got {v}"
            )));
        }
    }
    use std::sync::atomic::Ordering::Relaxed;
    match ctx.registry.register(reg) {
        Ok(lease_ttl_ms) => {
            ctx.metrics.registrations.fetch_add(1, Relaxed);
            Ok(axum::Json(LeaseGrant { lease_ttl_ms }))
        }
        Err(e) => {
            ctx.metrics.registration_errors.fetch_add(1, Relaxed);
            Err(e.into())
        }
    }
}

async fn cancel(
    State(ctx): State<Arc<Ctx>>,
    Extension(peer): Extension<Peer>,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<serde_json::Value>> {
    if peer.is_admin() {
        need_admin(&ctx, &peer)?;
    } else {
        need_node(&ctx, &peer, &name)?;
        ctx.registry.cancel(&name)?;
        return Ok(axum::Json(serde_json::json!({"cancelled": name})));
    }
    // An administrator's removal forgets a node that is failed (the
    // controller refuses an alive one, naming the drain), and frees the
    // name: the node's certificate is refused from the next request on.
    let was_bound = ctx.trust.is_held(&name);
    match ctx
        .registry
        .node_action(shoal_core::control::Input::Remove(name.clone()))
    {
        Err(RegistryError::NotRegistered(_)) if was_bound => {}
        r => r?,
    }
    ctx.trust.unbind(&name).map_err(RegistryError::from)?;
    Ok(axum::Json(
        serde_json::json!({"cancelled": name, "revoked": was_bound}),
    ))
}

/// Puts a certificate's key on the deny list, checked on every request.
async fn revoke_cert(
    State(ctx): State<Arc<Ctx>>,
    Extension(peer): Extension<Peer>,
    Path(key): Path<String>,
) -> ApiResult<axum::Json<serde_json::Value>> {
    need_admin(&ctx, &peer)?;
    if key.len() != 64 || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad(format!(
            "{key:?} is not a certificate id: give the 64 hex digits `shoal cert list` shows"
        )));
    }
    if peer.key_fp.as_deref() == Some(key.as_str()) {
        return Err(bad(
            "refusing to revoke the certificate this request is made with",
        ));
    }
    ctx.trust
        .revoke_key(&key.to_ascii_lowercase())
        .map_err(RegistryError::from)?;
    ctx.registry
        .event("revoked", None, format!("certificate {key} revoked"));
    Ok(axum::Json(serde_json::json!({"revoked": key})))
}

async fn renew(
    State(ctx): State<Arc<Ctx>>,
    Extension(peer): Extension<Peer>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<axum::Json<RenewResponse>> {
    need_node(&ctx, &peer, &name)?;
    let req: RenewRequest = decode(&body)?;
    use std::sync::atomic::Ordering::Relaxed;
    match ctx.registry.renew(&name, req) {
        Ok(r) => {
            ctx.metrics.renewals.fetch_add(1, Relaxed);
            Ok(axum::Json(r))
        }
        Err(e) => {
            ctx.metrics.renewal_errors.fetch_add(1, Relaxed);
            Err(e.into())
        }
    }
}

async fn assign(
    State(ctx): State<Arc<Ctx>>,
    Extension(peer): Extension<Peer>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<axum::Json<serde_json::Value>> {
    need_admin(&ctx, &peer)?;
    let mut req: AssignRequest = decode(&body)?;
    keep_redacted_secrets(&ctx, &name, &mut req.apps);
    let mut seen = std::collections::HashSet::new();
    for a in &req.apps {
        if !seen.insert(&a.id) {
            return Err(bad(format!(
                "app id {:?} appears twice; ids must be unique on a node",
                a.id
            )));
        }
        validate_node_name(&a.id).map_err(|e| bad(format!("app id: {e}")))?;
        check_params(&a.adaptor, &a.params).map_err(|e| bad(format!("app {:?}: {e}", a.id)))?;
    }
    let generation = ctx.registry.assign(&name, req.apps)?;
    Ok(axum::Json(
        serde_json::json!({"node": name, "generation": generation}),
    ))
}

async fn lookup(
    State(ctx): State<Arc<Ctx>>,
    Extension(peer): Extension<Peer>,
    Query(q): Query<Vec<(String, String)>>,
) -> ApiResult<axum::Json<Vec<NodeStatus>>> {
    need_any(&ctx, &peer)?;
    let mut l = Lookup::default();
    for (k, v) in q {
        match k.as_str() {
            "role" => l
                .roles
                .extend(v.split(',').filter(|s| !s.is_empty()).map(str::to_string)),
            "name" => l.name = Some(v),
            "alive" => {
                l.alive_only = v
                    .parse::<bool>()
                    .map_err(|_| bad(format!("attribute alive must be true or false, got {v:?}")))?
            }
            k if k.starts_with("cap.") => {
                let n: f64 = v.parse().map_err(|_| {
                    bad(format!(
                        "attribute {k} must be a number (a minimum capacity), got {v:?}"
                    ))
                })?;
                l.min_capacities.insert(k[4..].to_string(), n);
            }
            other => {
                return Err(bad(format!(
                    "unknown lookup attribute {other:?}; use role=, name=, alive=, cap.<name>=<minimum>"
                )));
            }
        }
    }
    // Only an administrator sees desired states (without secrets); other
    // certificates see the service items alone.
    let admin = peer.is_admin();
    Ok(axum::Json(
        ctx.registry
            .nodes()
            .into_iter()
            .filter(|n| l.matches(n))
            .map(|mut n| {
                if admin {
                    n.redacted(is_secret_param)
                } else {
                    n.desired.clear();
                    n
                }
            })
            .collect(),
    ))
}

/// A secret parameter comes back from `status` as [`REDACTED`]; an
/// assignment that sends that marker back keeps the value already stored,
/// so `shoal node assign` can edit one app without knowing the others'
/// secrets.
fn keep_redacted_secrets(ctx: &Ctx, node: &str, apps: &mut [AppAssignment]) {
    let Some(current) = ctx.registry.nodes().into_iter().find(|n| n.name == node) else {
        return;
    };
    for a in apps.iter_mut() {
        let old = current.desired.iter().find(|o| o.id == a.id);
        a.params.retain(|k, v| {
            if is_secret_param(k) && v == REDACTED {
                match old.and_then(|o| o.params.get(k)) {
                    Some(o) => {
                        *v = o.clone();
                        true
                    }
                    None => false,
                }
            } else {
                true
            }
        });
    }
}

async fn status(
    State(ctx): State<Arc<Ctx>>,
    Extension(peer): Extension<Peer>,
) -> ApiResult<axum::Json<StatusResponse>> {
    need_admin(&ctx, &peer)?;
    Ok(axum::Json(StatusResponse {
        nodes: ctx
            .registry
            .nodes()
            .into_iter()
            .map(|n| n.redacted(is_secret_param))
            .collect(),
        services: ctx.services.statuses(),
        events: ctx.registry.recent_events(50),
        jobs: ctx.jobs.list(),
    }))
}

async fn events(
    State(ctx): State<Arc<Ctx>>,
    Extension(peer): Extension<Peer>,
) -> ApiResult<axum::Json<Vec<Event>>> {
    need_admin(&ctx, &peer)?;
    Ok(axum::Json(ctx.registry.recent_events(1000)))
}

/// Server-sent events: first the recent log, then every new event. A
/// watcher that falls behind is told how many events it lost.
async fn watch(
    State(ctx): State<Arc<Ctx>>,
    Extension(peer): Extension<Peer>,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    need_admin(&ctx, &peer)?;
    Ok(Sse::new(event_stream(&ctx.registry, None)).keep_alive(KeepAlive::default()))
}

/// The event stream shared by the API and the dashboard: the recent log,
/// then live events. Subscribing and snapshotting the log happen under one
/// lock, so nothing falls between them.
/// Each SSE event is named after the event's kind, or `name` when given.
pub fn event_stream(
    registry: &Registry,
    name: Option<&'static str>,
) -> impl Stream<Item = Result<SseEvent, Infallible>> + use<> {
    use futures_util::StreamExt;
    use tokio_stream::wrappers::BroadcastStream;
    use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
    let (backlog, rx) = registry.subscribe();
    let head = futures_util::stream::iter(backlog.into_iter().map(move |e| Ok(to_sse(&e, name))));
    let tail = BroadcastStream::new(rx).map(move |r| {
        Ok(match r {
            Ok(e) => to_sse(&e, name),
            Err(BroadcastStreamRecvError::Lagged(n)) => SseEvent::default()
                .event("lagged")
                .data(format!("{{\"lost\":{n}}}")),
        })
    });
    head.chain(tail)
}

fn to_sse(e: &Event, name: Option<&'static str>) -> SseEvent {
    SseEvent::default()
        .event(name.map(str::to_string).unwrap_or_else(|| e.kind.clone()))
        .id(e.seq.to_string())
        .data(serde_json::to_string(e).unwrap_or_default())
}
