//! The read-only web dashboard: one self-contained page (no CDN, no bundled
//! third-party code; charts are the page's own SVG) fed by server-sent
//! events. Served over plain HTTP on loopback so a person on the machine
//! opens it without a certificate warning; nothing here changes state.

use crate::state::Registry;
use axum::Router;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use futures_util::{Stream, StreamExt};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

const PAGE: &str = include_str!("assets/dashboard.html");

/// Produces the services part of a snapshot (details with series, backends
/// and per-backend loads), as JSON values.
pub type ServicesView = Arc<dyn Fn() -> Vec<serde_json::Value> + Send + Sync>;

#[derive(Clone)]
struct Ctx {
    registry: Arc<Registry>,
    services: ServicesView,
}

fn snapshot(ctx: &Ctx) -> serde_json::Value {
    serde_json::json!({
        "now_ms": shoal_net::wire::unix_ms(),
        "nodes": ctx.registry.nodes(),
        "services": (ctx.services)(),
    })
}

/// The dashboard's routes.
pub fn router(registry: Arc<Registry>, services: ServicesView) -> Router {
    let ctx = Ctx { registry, services };
    Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route(
            "/api/snapshot",
            get({
                let ctx = ctx.clone();
                move || async move { axum::Json(snapshot(&ctx)).into_response() }
            }),
        )
        .route(
            "/api/live",
            get(move || async move { Sse::new(live(ctx)).keep_alive(KeepAlive::default()) }),
        )
}

/// A snapshot every second, plus every registry event as it happens.
fn live(ctx: Ctx) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let events = crate::api::event_stream(&ctx.registry, Some("event"));
    let ticks =
        tokio_stream::wrappers::IntervalStream::new(tokio::time::interval(Duration::from_secs(1)))
            .map(move |_| {
                Ok(SseEvent::default()
                    .event("snapshot")
                    .data(serde_json::to_string(&snapshot(&ctx)).unwrap_or_default()))
            });
    futures_util::stream::select(events, ticks)
}
