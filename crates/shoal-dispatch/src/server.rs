//! Listeners: the proxy, the admin endpoint, and the health task.

use crate::backends::Backends;
use crate::clock::Clock;
use crate::config::parse_backend;
use crate::metrics::{ErrorKind, Metrics};
use crate::proxy::{ConnState, Shared, Tracked, forwarded_for_value, handle};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use shoal_core::select::BackendSpec;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Client-side connection limits.
#[derive(Debug, Clone)]
pub struct ConnOpts {
    /// Time allowed to receive a request's headers, including waiting for
    /// the next request on an idle keep-alive connection.
    pub header_timeout: Duration,
    /// A connection that moves no bytes this long while no request of it
    /// waits on a backend is closed.
    pub idle_timeout: Duration,
    /// Largest request head (request line and headers); larger gets 431.
    pub max_header_bytes: usize,
    /// Client connections (and tunnels) open at once, past which accepting
    /// pauses.
    pub max_connections: u64,
}

/// Accepts clients until `stop` is cancelled; then the listener closes, and
/// every connection finishes the request it is serving (if any) and closes.
pub async fn serve_proxy(
    listener: TcpListener,
    sh: Arc<Shared>,
    opts: ConnOpts,
    clock: Clock,
    stop: CancellationToken,
) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // The connection's watchdog enforces the header timeout; hyper's own
        // (30 s unless disabled) would arm and drop a boxed timer on every
        // request.
        .header_read_timeout(None)
        // A client may shut down its sending side once its request is out
        // and still get the response (HAProxy's default too: no
        // abortonclose). It also spares a read attempt while each request
        // is in flight, whose buffer reservation cost an 8 KiB allocation
        // per request: the head's bytes, still shared with the request,
        // kept hyper from reusing its read buffer.
        .half_close(true)
        .keep_alive(true)
        .max_header_size(opts.max_header_bytes)
        .max_buf_size(opts.max_header_bytes.max(8192) + 8192);
    let builder = Arc::new(builder);
    let mut warned: Option<std::time::Instant> = None;
    let full = |warned: &mut Option<std::time::Instant>| {
        if warned.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
            *warned = Some(std::time::Instant::now());
            tracing::warn!(
                "{} connections open, the --max-connections limit: accepting paused \
                 until one closes (said at most every 10 s)",
                opts.max_connections
            );
        }
    };
    let open = &sh.metrics.connections_open;
    loop {
        // At the limit, accept nothing until a connection closes: new
        // clients wait in the listen backlog (HAProxy pauses its listeners
        // at maxconn alike) rather than take descriptors that the
        // connections already open need for their backends.
        if open.load(Relaxed) >= opts.max_connections {
            full(&mut warned);
            if !pause(&stop).await {
                return;
            }
            continue;
        }
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        // Another thread may have taken the last place while this one
        // waited in accept: the connection is served once it has a place
        // of its own (taken here, atomically, and given back when it ends).
        while open
            .fetch_update(Relaxed, Relaxed, |n| {
                (n < opts.max_connections).then_some(n + 1)
            })
            .is_err()
        {
            full(&mut warned);
            if !pause(&stop).await {
                return;
            }
        }
        let _ = stream.set_nodelay(true);
        let sh = sh.clone();
        let builder = builder.clone();
        let clock = clock.clone();
        let limits = Limits::of(&opts);
        tokio::spawn(async move {
            let m = sh.metrics.clone();
            let shared = sh.clone();
            m.connections.fetch_add(1, Relaxed);
            let state = Arc::new(ConnState {
                forwarded_for: forwarded_for_value(peer),
                fd: Some(std::os::fd::AsRawFd::as_raw_fd(&stream)),
                ..ConnState::default()
            });
            let io = TokioIo::new(Tracked::new(stream, state.clone(), clock.clone()));
            let st = state.clone();
            let svc = service_fn(move |req| handle(sh.clone(), st.clone(), peer, req));
            // Upgrades: a WebSocket handshake the backend accepts (101)
            // turns the connection into a tunnel (`proxy::tunnel`).
            let conn = builder.serve_connection(io, svc).with_upgrades();
            tokio::pin!(conn);
            let mut tick = tokio::time::interval(limits.check_every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut draining = false;
            loop {
                tokio::select! {
                    biased;
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            classify(&m, &e);
                        }
                        break;
                    }
                    _ = tick.tick() => {
                        // Stopping: every response now says `Connection:
                        // close` (see `handle`), so a client in use moves
                        // on after its next one; a connection quiet for a
                        // whole tick is closed here. Closing one that is
                        // merely between two requests would race the
                        // client's next request, which would then fail.
                        let now = clock.now_ms();
                        if !draining
                            && shared.stopping.load(Relaxed)
                            && limits.quiet(now, &state)
                        {
                            conn.as_mut().graceful_shutdown();
                            draining = true;
                        }
                        if let Some(kind) = limits.overdue(now, &state) {
                            m.error(kind);
                            break; // dropping the connection closes it
                        }
                    }
                }
            }
            m.connections_open.fetch_sub(1, Relaxed);
        });
    }
}

/// How often a watchdog enforcing `limit` looks: a quarter of it, between
/// 50 ms and 1 s (a late close by a quarter, not a timer per request).
pub(crate) fn check_period(limit: Duration) -> Duration {
    (limit / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
}

/// Waits a moment before the accept loop looks at the connection count
/// again; `false` once the dispatcher stops.
async fn pause(stop: &CancellationToken) -> bool {
    tokio::select! {
        biased;
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(Duration::from_millis(5)) => true,
    }
}

/// The header and idle timeouts of a client connection, checked by its
/// watchdog every `check_every` (a quarter of the shorter timeout, between
/// 50 ms and 1 s) rather than by a timer armed for every request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    header_ms: u64,
    idle_ms: u64,
    check_every: Duration,
}

impl Limits {
    fn of(o: &ConnOpts) -> Self {
        Self {
            header_ms: o.header_timeout.as_millis() as u64,
            idle_ms: o.idle_timeout.as_millis() as u64,
            check_every: check_period(o.header_timeout.min(o.idle_timeout)),
        }
    }

    /// Why the connection must be closed at `now_ms`, if it must:
    /// - no request is open and no complete head has come within the header
    ///   timeout of the last byte written (or of the connection's start):
    ///   a slow or silent client, however many bytes it trickles;
    /// - no request waits on a backend and nothing moved either way within
    ///   the idle timeout (a stalled stream).
    pub(crate) fn overdue(&self, now_ms: u64, st: &ConnState) -> Option<ErrorKind> {
        let since = |at: &std::sync::atomic::AtomicU64| now_ms.saturating_sub(at.load(Relaxed));
        let wrote = since(&st.last_write_ms);
        if st.open.load(Relaxed) == 0 && wrote > self.header_ms {
            return Some(ErrorKind::HeaderTimeout);
        }
        if st.waiting.load(Relaxed) == 0 && wrote.min(since(&st.last_read_ms)) > self.idle_ms {
            return Some(ErrorKind::IdleTimeout);
        }
        None
    }

    /// No request is open and nothing was written for a whole check
    /// period: a connection that can be closed without racing a request.
    pub(crate) fn quiet(&self, now_ms: u64, st: &ConnState) -> bool {
        st.open.load(Relaxed) == 0
            && now_ms.saturating_sub(st.last_write_ms.load(Relaxed))
                >= self.check_every.as_millis() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_closes_slow_heads_and_idle_streams_only() {
        let l = Limits::of(&ConnOpts {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_header_bytes: 65536,
            max_connections: 1000,
        });
        assert_eq!(l.check_every, Duration::from_secs(1));
        let st = ConnState::default();
        // A fresh connection that sends nothing: header timeout after 10 s.
        assert_eq!(l.overdue(10_000, &st), None);
        assert_eq!(l.overdue(10_001, &st), Some(ErrorKind::HeaderTimeout));
        // Trickled bytes do not reset the header clock...
        st.last_read_ms.store(10_000, Relaxed);
        assert_eq!(l.overdue(10_001, &st), Some(ErrorKind::HeaderTimeout));
        // ...a response written does (keep-alive: the next head is due
        // 10 s after it).
        st.last_write_ms.store(10_000, Relaxed);
        assert_eq!(l.overdue(20_000, &st), None);
        assert_eq!(l.overdue(20_001, &st), Some(ErrorKind::HeaderTimeout));
        // An open request is not a slow head; it may stall until idle.
        st.open.store(1, Relaxed);
        assert_eq!(l.overdue(70_000, &st), None);
        assert_eq!(l.overdue(70_001, &st), Some(ErrorKind::IdleTimeout));
        // Unless it waits on a backend: the backend timeout covers that.
        st.waiting.store(1, Relaxed);
        assert_eq!(l.overdue(500_000, &st), None);
    }

    #[test]
    fn only_a_connection_quiet_for_a_whole_tick_is_closed_on_stop() {
        let l = Limits::of(&ConnOpts {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_header_bytes: 65536,
            max_connections: 1000,
        });
        let st = ConnState::default();
        st.last_write_ms.store(5_000, Relaxed);
        // Between two requests of a busy client: keep it (its next
        // response says Connection: close).
        assert!(!l.quiet(5_999, &st));
        assert!(l.quiet(6_000, &st));
        // A request open, however long ago the last write: keep it.
        st.open.store(1, Relaxed);
        assert!(!l.quiet(60_000, &st));
    }

    #[test]
    fn admin_changes_need_the_token_or_loopback() {
        let lo: std::net::IpAddr = "127.0.0.1".parse().unwrap();
        let far: std::net::IpAddr = "10.1.2.3".parse().unwrap();
        let v6lo: std::net::IpAddr = "::1".parse().unwrap();
        let none = AdminAuth::default();
        assert!(none.may_change(lo, None).is_ok());
        assert!(none.may_change(v6lo, None).is_ok());
        assert_eq!(
            none.may_change(far, None).unwrap_err().0,
            StatusCode::FORBIDDEN
        );
        let tok = AdminAuth {
            token: Some("0123456789abcdef0123".into()),
        };
        let h = |s: &'static str| header::HeaderValue::from_static(s);
        let good = h("Bearer 0123456789abcdef0123");
        assert!(tok.may_change(far, Some(&good)).is_ok());
        assert!(tok.may_change(lo, Some(&good)).is_ok());
        // With a token, loopback is no exemption; a prefix, another scheme
        // or a missing header is refused.
        for bad in [
            None,
            Some(h("Bearer 0123456789abcdef012")),
            Some(h("Bearer 0123456789abcdef01234")),
            Some(h("Basic 0123456789abcdef0123")),
            Some(h("0123456789abcdef0123")),
        ] {
            assert_eq!(
                tok.may_change(lo, bad.as_ref()).unwrap_err().0,
                StatusCode::UNAUTHORIZED,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn admin_token_file_is_checked() {
        let dir = std::env::temp_dir().join(format!("shoal-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("t");
        std::fs::write(&f, "short\n").unwrap();
        let e = AdminAuth::from_file(&f).unwrap_err().to_string();
        assert!(e.contains("at least 16"), "{e}");
        std::fs::write(&f, "0123456789abcdef0123\nignored\n").unwrap();
        assert!(AdminAuth::from_file(&f).unwrap().has_token());
        let e = AdminAuth::from_file(&dir.join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

fn classify(m: &Metrics, e: &hyper::Error) {
    if e.is_parse_too_large() {
        m.error(ErrorKind::HeaderTooLarge);
    } else if e.is_parse() || e.is_parse_status() {
        m.error(ErrorKind::ClientParse);
    } else if e.is_user() || e.is_body_write_aborted() {
        // a body error already counted where it happened
    } else {
        m.error(ErrorKind::ClientIo);
    }
}

/// A backend as given to `PUT /backends` on the admin listener.
#[derive(Debug, Deserialize)]
struct BackendDoc {
    addr: String,
    #[serde(default = "one")]
    weight: u32,
    #[serde(default)]
    draining: bool,
}

fn one() -> u32 {
    1
}

/// Who may change the backend list through the admin listener. Reading
/// (metrics, the list, route explanations) is open to whoever reaches it.
#[derive(Debug, Clone, Default)]
pub struct AdminAuth {
    token: Option<Arc<str>>,
}

impl AdminAuth {
    /// Changes need `Authorization: Bearer TOKEN`, the token being the
    /// first line of `path`.
    pub fn from_file(path: &std::path::Path) -> anyhow::Result<AdminAuth> {
        use anyhow::Context as _;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--admin-token-file {}: cannot read it", path.display()))?;
        let token = text.lines().next().unwrap_or("").trim();
        if token.len() < 16 || token.bytes().any(|b| !b.is_ascii_graphic()) {
            anyhow::bail!(
                "--admin-token-file {}: the token must be one line of at least 16 printable \
                 characters without spaces (e.g. `openssl rand -hex 32 > {}`)",
                path.display(),
                path.display()
            );
        }
        Ok(AdminAuth {
            token: Some(token.into()),
        })
    }

    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// Whether a change from `peer` with this `Authorization` is allowed:
    /// with a token, only with that token; without one, only from
    /// loopback (a listener bound wider still serves metrics).
    pub(crate) fn may_change(
        &self,
        peer: std::net::IpAddr,
        authorization: Option<&header::HeaderValue>,
    ) -> Result<(), (StatusCode, &'static str)> {
        use subtle::ConstantTimeEq as _;
        match &self.token {
            Some(token) => {
                let given = authorization
                    .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
                    .unwrap_or(b"");
                if bool::from(given.ct_eq(token.as_bytes())) {
                    Ok(())
                } else {
                    Err((
                        StatusCode::UNAUTHORIZED,
                        "changes need `Authorization: Bearer TOKEN`, TOKEN being the line in the dispatcher's --admin-token-file\n",
                    ))
                }
            }
            None if peer.is_loopback() => Ok(()),
            None => Err((
                StatusCode::FORBIDDEN,
                "changes are taken from loopback only: start the dispatcher with --admin-token-file \
                 and send `Authorization: Bearer TOKEN` to change it from elsewhere\n",
            )),
        }
    }
}

/// The admin listener: `/metrics`, `GET|PUT /backends`, `POST /route`
/// (a JSON list of URLs, explained with the live state), `/healthz`.
pub async fn serve_admin(
    listener: TcpListener,
    backends: Arc<Backends>,
    metrics: Arc<Metrics>,
    auth: AdminAuth,
    fed: Option<Arc<crate::federation::Fed>>,
) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let backends = backends.clone();
        let metrics = metrics.clone();
        let auth = auth.clone();
        let fed = fed.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                admin(
                    backends.clone(),
                    metrics.clone(),
                    auth.clone(),
                    fed.clone(),
                    peer,
                    req,
                )
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn text(code: StatusCode, ctype: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(ctype),
    );
    r
}

async fn admin(
    backends: Arc<Backends>,
    metrics: Arc<Metrics>,
    auth: AdminAuth,
    fed: Option<Arc<crate::federation::Fed>>,
    peer: std::net::SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let plain = "text/plain; charset=utf-8";
    let json = "application/json";
    Ok(match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(&backends),
        ),
        (&Method::GET, "/healthz") => text(StatusCode::OK, plain, "ok\n".into()),
        (&Method::GET, "/backends") => text(
            StatusCode::OK,
            json,
            serde_json::to_string(&backends.status()).unwrap_or_default(),
        ),
        (_, "/route" | "/backends") if req.method() != Method::GET => {
            // Everything but a GET is refused to browsers and needs a JSON
            // body: a cross-site form or fetch can send neither without a
            // CORS preflight this listener never grants.
            if let Err((code, why)) =
                admin_request_guard(req.method(), req.uri().path(), req.headers())
            {
                let mut r = text(code, plain, why);
                if code == StatusCode::METHOD_NOT_ALLOWED {
                    let allow = if req.uri().path() == "/route" {
                        "POST"
                    } else {
                        "GET, PUT"
                    };
                    r.headers_mut()
                        .insert(header::ALLOW, header::HeaderValue::from_static(allow));
                }
                return Ok(r);
            }
            if req.uri().path() == "/route" {
                let body = match read_body(req, ROUTE_BODY_LIMIT).await {
                    Ok(b) => b,
                    Err(r) => return Ok(r),
                };
                return Ok(match serde_json::from_slice::<Vec<String>>(&body) {
                    Ok(urls) if urls.len() > ROUTE_URLS_LIMIT => text(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        plain,
                        format!(
                            "{} URLs in one call; POST /route explains at most {ROUTE_URLS_LIMIT} at a time, split the list\n",
                            urls.len()
                        ),
                    ),
                    Ok(urls) => text(
                        StatusCode::OK,
                        json,
                        serde_json::to_string(&crate::explain_live(
                            &backends,
                            &urls,
                            fed.as_deref(),
                        ))
                        .unwrap_or_default(),
                    ),
                    Err(e) => text(
                        StatusCode::BAD_REQUEST,
                        plain,
                        format!(
                            "expected a JSON list of URLs or paths, like [\"/index.html\"]: {e}\n"
                        ),
                    ),
                });
            }
            if let Err((code, why)) =
                auth.may_change(peer.ip(), req.headers().get(header::AUTHORIZATION))
            {
                let mut r = text(code, plain, why.into());
                if code == StatusCode::UNAUTHORIZED {
                    r.headers_mut().insert(
                        header::WWW_AUTHENTICATE,
                        header::HeaderValue::from_static("Bearer"),
                    );
                }
                return Ok(r);
            }
            let body = match read_body(req, BACKENDS_BODY_LIMIT).await {
                Ok(b) => b,
                Err(r) => return Ok(r),
            };
            match parse_backend_docs(&body) {
                Ok(specs) => match backends.apply(&specs) {
                    Ok(()) => text(
                        StatusCode::OK,
                        json,
                        serde_json::to_string(&backends.status()).unwrap_or_default(),
                    ),
                    Err(e) => text(StatusCode::BAD_REQUEST, plain, format!("{e}\n")),
                },
                Err(e) => text(StatusCode::BAD_REQUEST, plain, format!("{e}\n")),
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            plain,
            "try GET /metrics, GET /backends, PUT /backends, POST /route, GET /healthz\n".into(),
        ),
    })
}

/// Largest `PUT /backends` body: room for some 4,000 backends.
pub const BACKENDS_BODY_LIMIT: usize = 256 << 10;
/// Largest `POST /route` body.
pub const ROUTE_BODY_LIMIT: usize = 64 << 10;
/// Most URLs one `POST /route` explains: each answer is some 20 times its
/// URL, so the cap bounds the work and the answer a caller can ask for.
pub const ROUTE_URLS_LIMIT: usize = 256;

/// Checks a non-GET admin request before its body is read: the method is
/// the one the path takes, the body is JSON, and it does not come from a
/// browser page (an `Origin` header, or `Sec-Fetch-Site` other than `none`,
/// which a browser sends for a typed-in URL).
pub fn admin_request_guard(
    method: &Method,
    path: &str,
    headers: &http::HeaderMap,
) -> Result<(), (StatusCode, String)> {
    let want = if path == "/route" {
        Method::POST
    } else {
        Method::PUT
    };
    if *method != want {
        return Err((
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{path} takes {want} (and GET for /backends), not {method}\n"),
        ));
    }
    if headers.contains_key(header::ORIGIN) {
        return Err((
            StatusCode::FORBIDDEN,
            "requests from web pages (with an Origin header) are refused: the admin listener is for `curl`, `shoal route` and scripts\n".into(),
        ));
    }
    if let Some(site) = headers.get("sec-fetch-site")
        && site.as_bytes() != b"none"
    {
        return Err((
            StatusCode::FORBIDDEN,
            "requests a browser sends on a page's behalf (Sec-Fetch-Site) are refused: the admin listener is for `curl`, `shoal route` and scripts\n".into(),
        ));
    }
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err((
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("{method} {path} takes a JSON body: send `Content-Type: application/json`\n"),
        ));
    }
    Ok(())
}

/// The largest oversized admin body read and dropped before its 413, and
/// how long that may take; a body declared larger is refused at once.
const DRAIN_LIMIT: u64 = 16 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(2);

/// An admin request's body, up to `limit` bytes (or the 413/400 to answer).
async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, Response<Full<Bytes>>> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = || {
        text(
            StatusCode::PAYLOAD_TOO_LARGE,
            "text/plain; charset=utf-8",
            format!("the body is larger than this request takes ({limit} bytes)\n"),
        )
    };
    if declared.is_some_and(|n| n > DRAIN_LIMIT) {
        return Err(too_large());
    }
    let mut body = req.into_body();
    let mut got = Vec::new();
    let mut over = false;
    // An oversized body that is small enough to drain is read and dropped
    // before the 413 goes out: answering while the client still writes
    // makes the kernel reset the connection, and the client then sees a
    // broken pipe instead of the reason (nginx's lingering close).
    let drain = async {
        while let Some(frame) = body.frame().await {
            let frame = frame?;
            if let Ok(data) = frame.into_data() {
                if over || got.len() + data.len() > limit {
                    over = true;
                    got.clear();
                } else {
                    got.extend_from_slice(&data);
                }
            }
        }
        Ok::<(), hyper::Error>(())
    };
    match tokio::time::timeout(DRAIN_TIME, drain).await {
        Ok(Ok(())) if !over => Ok(Bytes::from(got)),
        Ok(Ok(())) => Err(too_large()),
        Err(_) => Err(text(
            StatusCode::REQUEST_TIMEOUT,
            "text/plain; charset=utf-8",
            format!(
                "the body did not arrive within {} s; send it at once\n",
                DRAIN_TIME.as_secs()
            ),
        )),
        Ok(Err(e)) => Err(text(
            StatusCode::BAD_REQUEST,
            "text/plain; charset=utf-8",
            format!("reading the body: {e}\n"),
        )),
    }
}

/// Parses `[{"addr": "h:p", "weight": 1, "draining": false}, ...]`.
fn parse_backend_docs(body: &[u8]) -> Result<Vec<BackendSpec>, String> {
    let docs: Vec<BackendDoc> = serde_json::from_slice(body).map_err(|e| {
        format!("expected a JSON list like [{{\"addr\":\"127.0.0.1:8081\",\"weight\":1,\"draining\":false}}]: {e}")
    })?;
    docs.into_iter()
        .map(|d| {
            let mut s = parse_backend(&d.addr).map_err(|e| e.to_string())?;
            if d.weight == 0 {
                return Err(format!("backend {}: weight must be at least 1", d.addr));
            }
            s.weight = d.weight;
            s.draining = d.draining;
            Ok(s)
        })
        .collect()
}

/// How a backend's health is checked.
#[derive(Debug, Clone)]
pub struct HealthCheck {
    /// For the connect and, with `path`, the whole answer.
    pub timeout: Duration,
    /// An HTTP GET of this path must answer 2xx or 3xx; without it, a TCP
    /// connect must succeed.
    pub path: Option<String>,
}

/// Readmits ejected backends whose back-off is over once a check passes,
/// and (when `interval` is set) ejects backends that fail one.
pub async fn health_task(backends: Arc<Backends>, check: HealthCheck, interval: Option<Duration>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_sweep = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        for (_, addr) in backends.due_for_readmission() {
            if probe(&addr, &check).await {
                backends.readmit(&addr);
            } else {
                backends.eject_again(&addr);
            }
        }
        if let Some(every) = interval
            && last_sweep.elapsed() >= every
        {
            last_sweep = tokio::time::Instant::now();
            let t = backends.load_full();
            for i in 0..t.set.len() {
                let b = t.set.get(i);
                if b.healthy() && !probe(b.addr(), &check).await {
                    tracing::info!("backend {}: health check failed, ejected", b.addr());
                    backends.eject(&t, i);
                }
            }
        }
    }
}

async fn probe(addr: &str, check: &HealthCheck) -> bool {
    let Some(path) = &check.path else {
        return matches!(
            tokio::time::timeout(check.timeout, tokio::net::TcpStream::connect(addr)).await,
            Ok(Ok(_))
        );
    };
    let ask = async {
        let mut conn = crate::h1::BackendConn::connect(addr, check.timeout).await?;
        let mut headers = http::HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
        headers.insert(
            header::USER_AGENT,
            header::HeaderValue::from_static("shoal-health-check"),
        );
        let req = crate::h1::ReqHead {
            method: &Method::GET,
            target: path,
            headers: &headers,
            host: addr,
            forwarded_for: None,
            upgrade: None,
        };
        let (head, _) = conn.exchange(&req, None).await.ok()?;
        Some(head.parts.status)
    };
    match tokio::time::timeout(check.timeout, ask).await {
        Ok(Some(status)) => status.is_success() || status.is_redirection(),
        _ => false,
    }
}
