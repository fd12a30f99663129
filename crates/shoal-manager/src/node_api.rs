//! HTTP API of an operator's node actions (`shoal node cordon|uncordon|
//! drain`), with kubectl's meaning: a cordoned node takes no new
//! allocation; drain cordons it and moves its allocation elsewhere (a
//! replacement first, then the normal drain). Removal is `DELETE
//! /v1/nodes/NAME` (api.rs), which also revokes the node's certificate. The
//! controller decides; this only checks the caller and answers.

use crate::api::{ApiErr, Ctx, need_admin};
use axum::Router;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::routing::post;
use shoal_core::control::Input;
use shoal_net::server::Peer;
use std::sync::Arc;

/// The node-action routes (merged into the API router).
pub fn routes() -> Router<Arc<Ctx>> {
    Router::new().route("/v1/nodes/{name}/{action}", post(act))
}

async fn act(
    State(ctx): State<Arc<Ctx>>,
    Extension(peer): Extension<Peer>,
    Path((name, action)): Path<(String, String)>,
) -> Result<axum::Json<serde_json::Value>, ApiErr> {
    need_admin(&ctx, &peer)?;
    let input = match action.as_str() {
        "cordon" => Input::Cordon(name.clone()),
        "uncordon" => Input::Uncordon(name.clone()),
        "drain" => Input::Drain(name.clone()),
        other => {
            return Err(ApiErr(
                StatusCode::NOT_FOUND,
                format!(
                    "unknown node action {other:?}; use cordon, uncordon or drain (remove is DELETE /v1/nodes/NAME)"
                ),
            ));
        }
    };
    ctx.registry.node_action(input)?;
    ctx.registry.event(
        "operator",
        Some(&name),
        format!("{action} requested by an administrator"),
    );
    Ok(axum::Json(
        serde_json::json!({"node": name, "action": action}),
    ))
}
