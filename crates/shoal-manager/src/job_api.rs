//! HTTP API of parallel jobs (`shoal job run|list|show|stop`) and the DPS
//! banker's report endpoint, which each unit's agent calls every period.

use crate::api::{ApiErr, Ctx, decode, need_admin, need_any, need_node};
use crate::jobs::JobError;
use axum::Router;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use bytes::Bytes;
use shoal_core::shares::spec::{JobSpec, JobStatus, ShareReply, UnitReportBody};
use shoal_net::server::Peer;
use std::sync::Arc;

impl From<JobError> for ApiErr {
    fn from(e: JobError) -> Self {
        let code = match e {
            JobError::Invalid(_) => StatusCode::BAD_REQUEST,
            JobError::NotFound(_) => StatusCode::NOT_FOUND,
            JobError::Exists(_) => StatusCode::CONFLICT,
            JobError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiErr(code, e.to_string())
    }
}

type ApiResult<T> = Result<T, ApiErr>;

/// The job routes (merged into the API router).
pub fn routes() -> Router<Arc<Ctx>> {
    Router::new()
        .route("/v1/jobs", get(list))
        .route("/v1/jobs/{name}", get(show).put(run).delete(stop))
        .route("/v1/jobs/{name}/report", post(report))
        .route("/v1/jobs/{name}/migrate", post(migrate))
}

async fn list(
    State(ctx): State<Arc<Ctx>>,
    Extension(peer): Extension<Peer>,
) -> ApiResult<axum::Json<Vec<JobStatus>>> {
    need_any(&ctx, &peer)?;
    Ok(axum::Json(ctx.jobs.list()))
}

async fn show(
    State(ctx): State<Arc<Ctx>>,
    Extension(peer): Extension<Peer>,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<JobStatus>> {
    need_any(&ctx, &peer)?;
    Ok(axum::Json(ctx.jobs.show(&name)?))
}

async fn run(
    State(ctx): State<Arc<Ctx>>,
    Extension(peer): Extension<Peer>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<(StatusCode, axum::Json<JobStatus>)> {
    need_admin(&ctx, &peer)?;
    let spec: JobSpec = decode(&body)?;
    if spec.name != name {
        return Err(ApiErr(
            StatusCode::BAD_REQUEST,
            format!(
                "the body names job {:?} but the URL names {name:?}",
                spec.name
            ),
        ));
    }
    Ok((StatusCode::CREATED, axum::Json(ctx.jobs.run(spec)?)))
}

async fn stop(
    State(ctx): State<Arc<Ctx>>,
    Extension(peer): Extension<Peer>,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<serde_json::Value>> {
    need_admin(&ctx, &peer)?;
    ctx.jobs.stop(&name)?;
    Ok(axum::Json(serde_json::json!({"stopped": name})))
}

/// `POST /v1/jobs/NAME/migrate` with `{"unit": I, "to": "NODE"}`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MigrateBody {
    unit: usize,
    to: String,
}

async fn migrate(
    State(ctx): State<Arc<Ctx>>,
    Extension(peer): Extension<Peer>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<axum::Json<JobStatus>> {
    need_admin(&ctx, &peer)?;
    let m: MigrateBody = decode(&body)?;
    Ok(axum::Json(ctx.jobs.migrate(
        &name,
        m.unit,
        &m.to,
        "asked by an operator",
    )?))
}

async fn report(
    State(ctx): State<Arc<Ctx>>,
    Extension(peer): Extension<Peer>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<axum::Json<ShareReply>> {
    let r: UnitReportBody = decode(&body)?;
    need_node(&ctx, &peer, &r.node)?;
    let now = ctx.registry.now_ms();
    Ok(axum::Json(ctx.jobs.report(&name, r, now)?))
}
