//! The read-only web dashboard: one self-contained page (no CDN, no bundled
//! third-party code; charts are the page's own SVG) fed by server-sent
//! events. Served over plain HTTP on loopback so a person on the machine
//! opens it without a certificate warning; nothing here changes state.
//!
//! Unauthenticated by default, so it shows nothing secret: app parameters
//! that carry secrets, environments or file contents (`secret.*`, `env.*`,
//! `file.*`) are redacted, and a request whose Host header is not one of the
//! names the dashboard was bound to is refused (a DNS-rebinding page would
//! send its own domain there).
//!
//! With `--dashboard-token-file` every request needs the token, as
//! Jupyter's does: a browser opens `/?token=TOKEN` once and is sent back to
//! `/` with an HttpOnly, SameSite=Strict session cookie (so the token leaves
//! the address bar and history, and no other site's page can use the
//! cookie); scripts send `Authorization: Bearer TOKEN`. A token rather than
//! the administrator certificate: a browser presents a client certificate
//! only once it is imported as PKCS#12 and the page is served over TLS,
//! which would cost every operator a certificate warning and a key export.

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

/// Produces the federation part of a snapshot (`GET /v1/federation`'s
/// answer), when the manager has federated peers.
pub type FederationView = Arc<dyn Fn() -> Option<serde_json::Value> + Send + Sync>;

#[derive(Clone)]
struct Ctx {
    registry: Arc<Registry>,
    services: ServicesView,
    overlay: crate::OverlayView,
    federation: Option<FederationView>,
}

fn snapshot(ctx: &Ctx) -> serde_json::Value {
    let mut v = serde_json::json!({
        "now_ms": shoal_net::wire::unix_ms(),
        "nodes": ctx.registry.nodes(),
        "services": (ctx.services)(),
        "overlay": ctx.overlay.0.as_ref().and_then(|f| f()),
        "federation": ctx.federation.as_ref().and_then(|f| f()),
    });
    redact(&mut v);
    v
}

/// Replaces, anywhere in `v`, the values of private parameters inside a
/// `params` object: nodes' desired apps and services' app templates alike.
fn redact(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                if k == "params"
                    && let serde_json::Value::Object(p) = x
                {
                    for (pk, pv) in p.iter_mut() {
                        if shoal_net::wire::is_private_param(pk) {
                            *pv = shoal_net::wire::REDACTED.into();
                        }
                    }
                } else {
                    redact(x);
                }
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(redact),
        _ => {}
    }
}

/// Whether a Host header names the dashboard: one of `names` (with the
/// bound port, or none).
pub fn host_allowed(host: &str, names: &[String], port: u16) -> bool {
    let (name, p) = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((n, "")) => (n, None),
            Some((n, tail)) => match tail.strip_prefix(':') {
                Some(p) => (n, Some(p)),
                None => return false,
            },
            None => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (host, None),
        }
    };
    !name.is_empty()
        && p.is_none_or(|p| p.parse::<u16>() == Ok(port))
        && names.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// Checks a dashboard token: long enough to resist guessing, and made of
/// characters a URL carries as they are.
pub fn check_token(t: &str) -> Result<(), String> {
    if t.len() < 16 {
        return Err(format!(
            "the token has {} characters; it needs at least 16",
            t.len()
        ));
    }
    if let Some(c) = t
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "._~-".contains(*c)))
    {
        return Err(format!(
            "the token holds {c:?}; use only A-Z a-z 0-9 . _ ~ - (it travels in a URL)"
        ));
    }
    Ok(())
}

/// What the session cookie holds: derived from the token, one way, so the
/// browser's cookie store never holds the token itself.
fn session_value(token: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(format!("shoal dashboard session\n{token}")))
}

/// Whether a request carries the token (bearer) or the session cookie.
fn authorized(headers: &axum::http::HeaderMap, token: &str, cookie: &str) -> bool {
    use shoal_core::trust::ct_eq;
    let bearer = headers
        .get_all(axum::http::header::AUTHORIZATION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.strip_prefix("Bearer "))
        .any(|t| ct_eq(t.trim(), token));
    let session = session_value(token);
    let cookie = headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .any(|(k, v)| k == cookie && ct_eq(v, &session));
    bearer || cookie
}

/// The token in a `?token=` query, if any.
fn query_token(uri: &axum::http::Uri) -> Option<&str> {
    uri.query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix("token="))
}

/// The dashboard's routes; requests must name it by one of `names` in
/// their Host header, and carry `token` when one is given.
pub fn router(
    registry: Arc<Registry>,
    services: ServicesView,
    overlay: crate::OverlayView,
    federation: Option<FederationView>,
    names: Vec<String>,
    port: u16,
    token: Option<String>,
) -> Router {
    let ctx = Ctx {
        registry,
        services,
        overlay,
        federation,
    };
    // Cookies are shared by every port of a host: one name per dashboard,
    // so two managers on one machine do not log each other out.
    let cookie = format!("shoal_dashboard_{port}");
    let check_token = move |req: axum::extract::Request, next: axum::middleware::Next| {
        let token = token.clone();
        let cookie = cookie.clone();
        async move {
            use axum::http::{StatusCode, header};
            let Some(token) = token else {
                return next.run(req).await;
            };
            if let Some(t) = query_token(req.uri()) {
                if shoal_core::trust::ct_eq(t, &token) {
                    return (
                        StatusCode::SEE_OTHER,
                        [
                            (header::LOCATION, req.uri().path().to_string()),
                            (
                                header::SET_COOKIE,
                                format!(
                                    "{cookie}={}; Path=/; HttpOnly; SameSite=Strict",
                                    session_value(&token)
                                ),
                            ),
                            (header::CACHE_CONTROL, "no-store".to_string()),
                        ],
                    )
                        .into_response();
                }
            } else if authorized(req.headers(), &token, &cookie) {
                return next.run(req).await;
            }
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer realm=\"shoal dashboard\"")],
                "this dashboard needs its token: open /?token=TOKEN once in the browser (TOKEN is the first line of the manager's --dashboard-token-file), or send Authorization: Bearer TOKEN\n",
            )
                .into_response()
        }
    };
    let names = Arc::new(names);
    let check_host = move |req: axum::extract::Request, next: axum::middleware::Next| {
        let names = names.clone();
        async move {
            let host = req
                .headers()
                .get(axum::http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("");
            if host_allowed(host, &names, port) {
                next.run(req).await
            } else {
                (
                    axum::http::StatusCode::MISDIRECTED_REQUEST,
                    format!(
                        "this dashboard answers only to the names it was bound to ({}), not Host {host:?}; open it by one of those\n",
                        names.join(", ")
                    ),
                )
                    .into_response()
            }
        }
    };
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
        .layer(axum::middleware::from_fn(check_token))
        .layer(axum::middleware::from_fn(check_host))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_bound_names_are_hosts() {
        let names = vec!["127.0.0.1".to_string(), "localhost".into(), "::1".into()];
        assert!(host_allowed("127.0.0.1:7480", &names, 7480));
        assert!(host_allowed("localhost", &names, 7480));
        assert!(host_allowed("[::1]:7480", &names, 7480));
        assert!(!host_allowed("127.0.0.1:7481", &names, 7480));
        assert!(!host_allowed("evil.example:7480", &names, 7480));
        assert!(!host_allowed("", &names, 7480));
    }

    #[test]
    fn a_token_is_long_and_url_safe_and_checked_by_bearer_or_cookie() {
        assert!(check_token("0123456789abcdef").is_ok());
        assert!(check_token("short").is_err());
        assert!(check_token("0123456789abcdef&x").is_err());
        let t = "0123456789abcdef";
        let mut h = axum::http::HeaderMap::new();
        assert!(!authorized(&h, t, "c"));
        h.insert("authorization", format!("Bearer {t}").parse().unwrap());
        assert!(authorized(&h, t, "c"));
        let mut h = axum::http::HeaderMap::new();
        h.insert(
            "cookie",
            format!("a=b; c={}", session_value(t)).parse().unwrap(),
        );
        assert!(authorized(&h, t, "c"));
        assert!(!authorized(&h, t, "other"), "another dashboard's cookie");
        h.insert("cookie", format!("c={t}").parse().unwrap());
        assert!(
            !authorized(&h, t, "c"),
            "the cookie holds the session, not the token"
        );
    }

    #[test]
    fn private_params_are_redacted_wherever_they_are() {
        let mut v = serde_json::json!({"nodes": [{"desired": [{"params":
            {"env.PASSWORD": "hunter2", "file.app.conf": "key=1", "secret.TOKEN": "t", "command": "app"}}]}],
            "services": [{"app": {"params": {"env.X": "y"}}}]});
        redact(&mut v);
        let s = v.to_string();
        for secret in ["hunter2", "key=1", "\"t\"", "\"y\""] {
            assert!(!s.contains(secret), "{s}");
        }
        assert!(s.contains("\"app\""), "{s}");
    }
}
