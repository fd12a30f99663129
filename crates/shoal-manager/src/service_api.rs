//! HTTP API of services: definitions, details with the monitor series,
//! backend lists (long-polled by dispatchers) and dispatcher reports.

use crate::api::{ApiErr, Ctx, decode, need_admin, need_any, need_service_dispatch};
use crate::services::ServiceError;
use axum::Router;
use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use bytes::Bytes;
use shoal_net::server::Peer;
use shoal_net::wire::*;
use std::sync::Arc;
use std::time::Duration;

/// Longest long-poll of a backend list (below the API client's 10 s timeout).
pub const MAX_WAIT_SECS: f64 = 8.0;

impl From<ServiceError> for ApiErr {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::Invalid(_) => ApiErr(StatusCode::BAD_REQUEST, e.to_string()),
            ServiceError::NotFound(_) => ApiErr(StatusCode::NOT_FOUND, e.to_string()),
            ServiceError::Store(_) => ApiErr(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{e}; nothing was changed, retry later"),
            ),
        }
    }
}

type ApiResult<T> = Result<T, ApiErr>;

/// The service routes (merged into the API router).
pub fn routes() -> Router<Arc<Ctx>> {
    Router::new()
        .route("/v1/services", get(list))
        .route("/v1/services/{name}", get(show).put(apply).delete(delete))
        .route("/v1/services/{name}/backends", get(backends))
        .route("/v1/services/{name}/report", post(report))
}

async fn list(
    State(ctx): State<Arc<Ctx>>,
    Extension(peer): Extension<Peer>,
) -> ApiResult<axum::Json<Vec<ServiceStatus>>> {
    need_any(&ctx, &peer)?;
    Ok(axum::Json(ctx.services.statuses()))
}

async fn show(
    State(ctx): State<Arc<Ctx>>,
    Extension(peer): Extension<Peer>,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<ServiceDetail>> {
    need_any(&ctx, &peer)?;
    // A service's secret parameters go to its nodes, not to readers: not
    // in the definition, nor in the apps rendered for each allocation.
    Ok(axum::Json(ctx.services.detail(&name)?.redacted()))
}

async fn apply(
    State(ctx): State<Arc<Ctx>>,
    Extension(peer): Extension<Peer>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<(StatusCode, axum::Json<serde_json::Value>)> {
    need_admin(&ctx, &peer)?;
    let spec: ServiceSpec = decode(&body)?;
    if spec.name != name {
        return Err(ApiErr(
            StatusCode::BAD_REQUEST,
            format!(
                "the body names service {:?} but the URL names {name:?}",
                spec.name
            ),
        ));
    }
    let created = ctx.services.apply(spec)?;
    ctx.registry.event(
        "service",
        None,
        format!(
            "{name}: definition {}",
            if created { "created" } else { "updated" }
        ),
    );
    Ok((
        if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
        axum::Json(serde_json::json!({"service": name, "created": created})),
    ))
}

async fn delete(
    State(ctx): State<Arc<Ctx>>,
    Extension(peer): Extension<Peer>,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<serde_json::Value>> {
    need_admin(&ctx, &peer)?;
    ctx.services.delete(&name)?;
    ctx.registry.event(
        "service",
        None,
        format!("{name}: definition deleted; its nodes drain and return to the pool"),
    );
    Ok(axum::Json(serde_json::json!({"deleted": name})))
}

/// `?after=VERSION&wait=SECONDS`: answers once the list's version exceeds
/// `after`, or after `wait` seconds with the unchanged list.
async fn backends(
    State(ctx): State<Arc<Ctx>>,
    Extension(peer): Extension<Peer>,
    Path(name): Path<String>,
    Query(q): Query<Vec<(String, String)>>,
) -> ApiResult<axum::Json<BackendList>> {
    need_service_dispatch(&ctx, &peer, &name)?;
    let mut after: Option<u64> = None;
    let mut wait = 0.0f64;
    for (k, v) in q {
        match k.as_str() {
            "after" => {
                after = Some(v.parse().map_err(|_| {
                    ApiErr(
                        StatusCode::BAD_REQUEST,
                        format!("after must be a list version (a number), got {v:?}"),
                    )
                })?)
            }
            "wait" => {
                wait = v
                    .parse::<f64>()
                    .ok()
                    .filter(|w| w.is_finite() && *w >= 0.0)
                    .ok_or_else(|| {
                        ApiErr(
                            StatusCode::BAD_REQUEST,
                            format!("wait must be seconds >= 0, got {v:?}"),
                        )
                    })?
                    .min(MAX_WAIT_SECS)
            }
            other => {
                return Err(ApiErr(
                    StatusCode::BAD_REQUEST,
                    format!("unknown parameter {other:?}; use after=VERSION and wait=SECONDS"),
                ));
            }
        }
    }
    let mut rx = ctx.services.changes();
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(wait);
    loop {
        // Mark seen before reading, so a change in between wakes us.
        rx.borrow_and_update();
        let list = ctx.services.backends(&name)?;
        if after.is_none_or(|a| list.version != a) {
            return Ok(axum::Json(list));
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => continue,
            _ => return Ok(axum::Json(ctx.services.backends(&name)?)),
        }
    }
}

async fn report(
    State(ctx): State<Arc<Ctx>>,
    Extension(peer): Extension<Peer>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<axum::Json<serde_json::Value>> {
    need_service_dispatch(&ctx, &peer, &name)?;
    let r: DispatchReport = decode(&body)?;
    if r.dispatcher.trim().is_empty() {
        return Err(ApiErr(
            StatusCode::BAD_REQUEST,
            "dispatcher must name the reporting dispatcher (its listen address)".into(),
        ));
    }
    // A federated service's dispatcher gets the view it decides with.
    let view = ctx
        .federation
        .on_report(&name, ctx.services.federation_spec(&name).as_ref(), &r);
    ctx.services.report(&name, r)?;
    Ok(axum::Json(match view {
        Some(v) => serde_json::json!({"ok": true, "federation": v}),
        None => serde_json::json!({"ok": true}),
    }))
}
