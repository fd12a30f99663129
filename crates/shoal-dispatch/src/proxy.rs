//! The reverse proxy: one hyper HTTP/1.1 connection per client, every request
//! dispatched on its own (thesis 3.4.3), bodies streamed both ways.

use crate::access_log::{self, AccessLog};
use crate::backends::{Backends, HealthCell, Table};
use crate::clock::Clock;
use crate::h1::{self, BackendError, Head, ReqHead, ResponseBody, Turn, Upload};
use crate::metrics::{ErrorKind, Metrics};
use crate::pool::{self, Conn, PoolOpts};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use shoal_core::select::{OwnedLease, RequestKey};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Body sent to a client: the backend's, streamed, or a local error page.
pub type RespBody = Either<Metered, Full<Bytes>>;

/// What every request handler shares.
#[derive(Debug)]
pub struct Shared {
    /// The live backend list and selector.
    pub backends: Arc<Backends>,
    /// Backend connection settings (the idle connections live in each
    /// backend's [`HealthCell`]).
    pub pool: PoolOpts,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Longest wait for a backend's response headers.
    pub backend_timeout: Duration,
    /// Set when the dispatcher stops: each client connection's watchdog
    /// then closes it after its response in flight (an atomic read per
    /// watchdog tick, rather than a cancellation future polled, under a
    /// process-wide lock, on every wake-up of every connection).
    pub stopping: std::sync::atomic::AtomicBool,
    /// One line per request, when `--access-log` is given.
    pub access_log: Option<AccessLog>,
    /// A protocol-switched tunnel closes after this long without traffic.
    pub tunnel_timeout: Duration,
    /// A federated service's decisions (H-SWEB), when it is one.
    pub federation: Option<Arc<crate::federation::Fed>>,
}

/// Per-client-connection state seen by the connection's watchdog, which
/// enforces the header and idle timeouts (a check every so often per
/// connection instead of a timer armed and disarmed on every request).
#[derive(Debug, Default)]
pub struct ConnState {
    /// Last read, on the coarse clock.
    pub last_read_ms: AtomicU64,
    /// Last write (or the connection's start), on the coarse clock.
    pub last_write_ms: AtomicU64,
    /// Requests of this connection being handled: from a complete head
    /// until the response body ended. While none is, the connection waits
    /// for a head and the header timeout runs from the last write.
    pub open: AtomicU32,
    /// Requests of this connection waiting for a backend's headers (the
    /// backend timeout covers them, not the idle timeout).
    pub waiting: AtomicU32,
    /// The client's address as an X-Forwarded-For item (see
    /// [`forwarded_for_value`]); computed per request when unset.
    pub forwarded_for: Option<HeaderValue>,
    /// The client socket (a federated service reads the kernel's RTT and
    /// delivery-rate estimates of it).
    pub fd: Option<std::os::fd::RawFd>,
}

struct Waiting<'a>(&'a AtomicU32);
impl<'a> Waiting<'a> {
    fn new(a: &'a AtomicU32) -> Self {
        a.fetch_add(1, Relaxed);
        Self(a)
    }
}
impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// A backend's response body on its way to the client: counts its bytes,
/// holds the backend lease, records the latency when it ends or is dropped,
/// and returns the backend connection to its idle stack once complete.
#[derive(Debug)]
pub struct Metered {
    inner: ResponseBody,
    done: Option<Done>,
}

#[derive(Debug)]
struct Done {
    _lease: OwnedLease<Table>,
    /// The client connection, whose open request this is.
    conn: Arc<ConnState>,
    start: Instant,
    sh: Arc<Shared>,
    /// The backend's idle connections.
    cell: Arc<HealthCell>,
    /// The request's access-log line, filled in as the response goes.
    log: Option<Box<LogLine>>,
    /// What a federated service measures of the request.
    fed: Option<Box<FedTrack>>,
}

/// A federated request's measurements on its way (see
/// [`crate::federation::Fed::finish`]).
#[derive(Debug)]
struct FedTrack {
    fed: Arc<crate::federation::Fed>,
    track: crate::federation::Track,
    head_at: Instant,
    ttfb: Duration,
    bytes: u64,
    _fetch: Option<crate::federation::FetchGuard>,
    _local: Option<LocalGuard>,
}

/// Counts a request on the local backends of a federated service.
#[derive(Debug)]
struct LocalGuard(Arc<crate::federation::Fed>);
impl LocalGuard {
    fn new(f: &Arc<crate::federation::Fed>) -> Self {
        f.in_flight.fetch_add(1, Relaxed);
        Self(f.clone())
    }
}
impl Drop for LocalGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

/// What the access log says of a request, gathered along the way (only
/// when the log is on: a box and two strings per request).
#[derive(Debug)]
pub(crate) struct LogLine {
    at: std::time::SystemTime,
    client: SocketAddr,
    method: Method,
    uri: String,
    backend: Option<String>,
    status: u16,
    bytes: u64,
    outcome: &'static str,
}

impl LogLine {
    fn new(client: SocketAddr, req: &Request<Incoming>) -> Box<LogLine> {
        Box::new(LogLine {
            at: std::time::SystemTime::now(),
            client,
            method: req.method().clone(),
            uri: req.uri().to_string(),
            backend: None,
            status: 0,
            bytes: 0,
            // Unless the response ends, or the backend cuts it.
            outcome: "client_gone",
        })
    }

    fn write(&self, log: &AccessLog, start: Instant) {
        log.record(&access_log::Entry {
            ts: access_log::timestamp(self.at),
            client: self.client,
            method: self.method.as_str(),
            uri: &self.uri,
            status: self.status,
            backend: self.backend.as_deref(),
            bytes: self.bytes,
            ms: (start.elapsed().as_secs_f64() * 1e6).round() / 1e3,
            outcome: self.outcome,
        });
    }
}

/// Returns a backend connection whose response is complete to the idle
/// stack of its backend.
fn release(sh: &Shared, cell: &HealthCell, c: Conn) {
    let now = sh.backends.clock().now_ms();
    cell.idle.push(c, now, sh.pool.max_idle);
}

impl Done {
    fn finish(mut self, back: Option<Conn>) {
        if let Some(l) = &mut self.log {
            l.outcome = "ok";
        }
        if let Some(c) = back {
            release(&self.sh, &self.cell, c);
        }
    }
}

impl Drop for Done {
    fn drop(&mut self) {
        if let Some(t) = self.fed.take() {
            let t = *t;
            let tcp = match &t.track {
                crate::federation::Track::From(_) => {
                    self.conn.fd.and_then(crate::federation::tcp_estimates)
                }
                _ => None,
            };
            t.fed.finish(
                t.track,
                t.ttfb,
                t.head_at.elapsed(),
                t.bytes,
                &self.sh.backends,
                tcp,
            );
        }
        self.sh.metrics.latency(self.start.elapsed());
        self.conn.open.fetch_sub(1, Relaxed);
        if let (Some(line), Some(log)) = (&self.log, &self.sh.access_log) {
            line.write(log, self.start);
        }
    }
}

impl Body for Metered {
    type Data = Bytes;
    type Error = BackendError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BackendError>>> {
        let this = &mut *self;
        let r = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &r {
            Some(Ok(f)) => {
                if let (Some(d), Some(done)) = (f.data_ref(), &mut this.done) {
                    done.sh.metrics.bytes_out.fetch_add(d.len() as u64, Relaxed);
                    if let Some(t) = &mut done.fed {
                        t.bytes += d.len() as u64;
                    }
                    if let Some(l) = &mut done.log {
                        l.bytes += d.len() as u64;
                    }
                }
            }
            Some(Err(e)) => {
                // The backend reset or broke the framing mid-response: only
                // this client's connection is cut (hyper aborts it).
                tracing::debug!("backend response body: {e}");
                if let Some(mut d) = this.done.take() {
                    d.sh.metrics.error(ErrorKind::BackendReset);
                    if let Some(l) = &mut d.log {
                        l.outcome = "backend_reset";
                    }
                }
            }
            None => {}
        }
        // hyper stops polling a body that reports its end after a frame.
        if this.inner.is_end_stream()
            && let Some(d) = this.done.take()
        {
            d.finish(this.inner.take_conn());
        }
        Poll::Ready(r)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Headers that concern one connection only (RFC 9110 7.6.1), plus the
/// classic ones proxies drop. `Trailer` is not one: it is end to end
/// (RFC 9110 6.6.2), and hyper needs it to pass trailer fields on.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];

/// Whether `n` is one of [`HOP_BY_HOP`]. Most of them are standard names,
/// which compare as an enum tag; the two others compare as short strings.
fn is_hop_by_hop(n: &HeaderName) -> bool {
    *n == header::CONNECTION
        || *n == header::TE
        || *n == header::TRANSFER_ENCODING
        || *n == header::UPGRADE
        || *n == header::PROXY_AUTHENTICATE
        || *n == header::PROXY_AUTHORIZATION
        || n.as_str() == "keep-alive"
        || n.as_str() == "proxy-connection"
}

/// Removes hop-by-hop headers, including those the Connection header names
/// (except framing and identity headers a client must not make us drop).
/// `TE` keeps only its `trailers` token: trailer fields are passed on end
/// to end, so a backend may send them to a client that accepts them.
///
/// One pass over the names first: a typical request has none of them and
/// then costs no hashing at all; a typical response has only
/// `Connection: keep-alive`.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Distinct keys, each matching at most one of the names: at most 9.
    let mut hop: [Option<HeaderName>; HOP_BY_HOP.len()] = Default::default();
    let mut found = 0;
    for k in h.keys() {
        if found < hop.len() && is_hop_by_hop(k) {
            hop[found] = Some(k.clone());
            found += 1;
        }
    }
    if found == 0 {
        return;
    }
    let mut listed: Vec<HeaderName> = Vec::new();
    for v in h.get_all(header::CONNECTION) {
        if let Ok(s) = v.to_str() {
            for t in s.split(',') {
                let t = t.trim();
                // "close", "keep-alive" and the like: nothing more to remove.
                if t.is_empty()
                    || t.eq_ignore_ascii_case("close")
                    || HOP_BY_HOP.iter().any(|n| t.eq_ignore_ascii_case(n))
                {
                    continue;
                }
                if let Ok(n) = HeaderName::from_bytes(t.as_bytes())
                    && n != header::HOST
                    && n != header::CONTENT_LENGTH
                    && n != header::CONTENT_TYPE
                {
                    listed.push(n);
                }
            }
        }
    }
    let trailers = crate::h1::has_token(h, &header::TE, "trailers");
    for n in listed {
        h.remove(n);
    }
    for n in hop.into_iter().flatten() {
        h.remove(n);
    }
    if trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// The value a request from `peer` adds to X-Forwarded-For (computed once
/// per client connection).
pub fn forwarded_for_value(peer: SocketAddr) -> Option<HeaderValue> {
    HeaderValue::from_str(&peer.ip().to_string()).ok()
}

fn local(code: StatusCode, msg: &'static str) -> Response<RespBody> {
    let mut r = Response::new(Either::Right(Full::new(Bytes::from_static(msg.as_bytes()))));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Handles one request from a client.
pub async fn handle(
    sh: Arc<Shared>,
    conn: Arc<ConnState>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, Infallible> {
    let start = Instant::now();
    sh.metrics.requests.fetch_add(1, Relaxed);
    conn.open.fetch_add(1, Relaxed);
    let log = sh.access_log.as_ref().map(|_| LogLine::new(peer, &req));
    let mut resp = proxy(&sh, conn, peer, req, start, log).await;
    sh.metrics.status(resp.status().as_u16());
    // Stopping: the client must not send another request on this
    // connection (hyper closes it after this response).
    if sh.stopping.load(Relaxed) {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(resp)
}

/// How one attempt on a backend ended. Lives on the stack for one
/// request; boxing the large variant would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Sent {
    Ok(Head, Conn, Option<Upload>),
    Connect,
    Reset(BackendError),
    ClientBody(String),
}

/// An idle connection to the backend (`true`: reused), or a new one;
/// `None` when it cannot be connected to.
async fn checkout(
    sh: &Shared,
    be: &crate::backends::Backends,
    cell: &HealthCell,
    addr: &str,
) -> Option<(Conn, bool)> {
    let now = sh.backends.clock().now_ms();
    if let Some(c) = cell.idle.pop(now, sh.pool.idle_ms) {
        return Some((c, true));
    }
    pool::connect_from(addr, sh.pool.connect_timeout, be.source())
        .await
        .map(|c| (c, false))
}

/// Proxies one request; the response is either the backend's (whose body
/// closes the request when it ends) or a local one (the request is closed
/// here).
async fn proxy(
    sh: &Arc<Shared>,
    conn: Arc<ConnState>,
    peer: SocketAddr,
    req: Request<Incoming>,
    start: Instant,
    mut log: Option<Box<LogLine>>,
) -> Response<RespBody> {
    let mut req = req;
    let mut fed_track = None;
    let mut be = None;
    if let Some(fed) = &sh.federation {
        match federate(sh, fed, &conn, &mut req) {
            Federated::Local(t) => fed_track = t,
            Federated::Fetch(b, t) => {
                be = Some(b);
                fed_track = Some(t);
            }
            Federated::Redirect(r) => {
                let r = *r;
                sh.metrics.latency(start.elapsed());
                conn.open.fetch_sub(1, Relaxed);
                if let (Some(mut l), Some(alog)) = (log, &sh.access_log) {
                    l.status = r.status().as_u16();
                    l.outcome = "redirected";
                    l.write(alog, start);
                }
                return r;
            }
        }
    }
    let be = be.as_ref().unwrap_or(&sh.backends);
    match forward(sh, be, &conn, peer, req, &mut log).await {
        Ok((parts, body, lease, cell)) => {
            if let Some(l) = &mut log {
                l.status = parts.status.as_u16();
            }
            let fed = fed_track.map(|mut t: Box<FedTrack>| {
                t.ttfb = start.elapsed();
                t.head_at = Instant::now();
                t
            });
            let body = Metered {
                inner: body,
                done: Some(Done {
                    _lease: lease,
                    conn,
                    start,
                    sh: sh.clone(),
                    cell,
                    log,
                    fed,
                }),
            };
            Response::from_parts(parts, Either::Left(body))
        }
        // The dispatcher's own answer (an error), or a 101 whose tunnel
        // runs on a task of its own.
        Err(local) => {
            sh.metrics.latency(start.elapsed());
            conn.open.fetch_sub(1, Relaxed);
            if let (Some(mut l), Some(alog)) = (log, &sh.access_log) {
                l.status = local.status().as_u16();
                l.bytes = local.body().size_hint().exact().unwrap_or(0);
                l.outcome = if l.status == 101 { "upgraded" } else { "local" };
                l.write(alog, start);
            }
            local
        }
    }
}

/// What a federated service's decision makes of a request.
enum Federated {
    /// Served by the local backends (with what to measure, for GET/HEAD).
    Local(Option<Box<FedTrack>>),
    /// Fetched from a peer's dispatcher through this table.
    Fetch(Arc<crate::backends::Backends>, Box<FedTrack>),
    /// The 307 to send (boxed: a response head is large, and this path
    /// is the rare one).
    Redirect(Box<Response<RespBody>>),
}

/// Decides where a federated service's request goes (shoal-core's cost
/// model through [`crate::federation::Fed::route`]), and marks it: a fetch
/// carries the header that makes the peer serve it where it lands, a
/// request redirected here loses its parameter before the backends see it.
fn federate(
    sh: &Shared,
    fed: &Arc<crate::federation::Fed>,
    conn: &ConnState,
    req: &mut Request<Incoming>,
) -> Federated {
    use crate::federation::{Route, Track};
    use shoal_core::federation::FETCH_HEADER;
    if !fed.active() || !matches!(*req.method(), Method::GET | Method::HEAD) {
        return Federated::Local(None);
    }
    let mut target = req
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let mut from = req
        .headers()
        .get(FETCH_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if from.is_some() {
        req.headers_mut().remove(FETCH_HEADER);
    }
    let mut redirected_from = None;
    if let Some((t, c)) = crate::federation::strip_redirect_param(&target)
        && let Ok(uri) = t.parse::<http::Uri>()
    {
        *req.uri_mut() = uri;
        target = t;
        redirected_from = Some(c.clone());
        from.get_or_insert(c);
    }
    let rtt = conn
        .fd
        .and_then(crate::federation::tcp_estimates)
        .map_or(0.0, |x| x.0);
    let track = |t: Track, fetch, local| {
        Box::new(FedTrack {
            fed: fed.clone(),
            track: t,
            head_at: Instant::now(),
            ttfb: Duration::ZERO,
            bytes: 0,
            _fetch: fetch,
            _local: local,
        })
    };
    match fed.route(&target, rtt, from, &sh.backends) {
        Route::Local(_) => {
            let t = match redirected_from {
                Some(c) => Track::From(c),
                None => Track::Class {
                    key: shoal_core::federation::summary::class_key(&target),
                    in_flight: fed.in_flight.load(Relaxed),
                },
            };
            Federated::Local(Some(track(t, None, Some(LocalGuard::new(fed)))))
        }
        Route::Fetch(rt) => {
            if let Some(c) = fed.cluster()
                && let Ok(v) = HeaderValue::from_str(&c)
            {
                req.headers_mut()
                    .insert(HeaderName::from_static(FETCH_HEADER), v);
            }
            let guard = crate::federation::Fed::fetch_started(&rt);
            let b = rt.backends.clone();
            Federated::Fetch(b, track(Track::Fetch(rt), Some(guard), None))
        }
        Route::Redirect(location) => {
            let mut r = Response::new(Either::Right(Full::new(Bytes::from_static(
                b"served by another cluster\n",
            ))));
            *r.status_mut() = StatusCode::TEMPORARY_REDIRECT;
            if let Ok(v) = HeaderValue::from_str(&location) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            Federated::Redirect(Box::new(r))
        }
    }
}

/// The backend's response head and body, the lease on that backend and its
/// health cell (home of its idle connections); or a local error response.
type Forwarded = (
    http::response::Parts,
    ResponseBody,
    OwnedLease<Table>,
    Arc<HealthCell>,
);

async fn forward(
    sh: &Arc<Shared>,
    be: &Arc<crate::backends::Backends>,
    conn: &ConnState,
    peer: SocketAddr,
    req: Request<Incoming>,
    log: &mut Option<Box<LogLine>>,
) -> Result<Forwarded, Response<RespBody>> {
    let (mut parts, body) = req.into_parts();
    if parts.method == Method::CONNECT {
        return Err(local(
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is not supported\n",
        ));
    }
    match h1::check_request(&parts.method, &parts.uri, &parts.headers) {
        Ok(None) => {}
        // An absolute-form target without Host: its authority is the Host.
        Ok(Some(host)) => {
            parts.headers.insert(header::HOST, host);
        }
        Err(r) => {
            sh.metrics.error(ErrorKind::ClientParse);
            return Err(local(r.status, r.message));
        }
    }
    let pq = match parts.uri.path_and_query() {
        Some(pq) if pq.as_str().starts_with('/') => pq.as_str(),
        Some(pq) if pq.as_str() == "*" => "*", // OPTIONS *
        Some(_) | None => "/",
    };
    // A protocol switch (WebSocket) asked for by a request without a body:
    // passed on, and the connection becomes a tunnel if the backend agrees.
    // hyper marks an HTTP/1.1 request with an Upgrade field by an extension,
    // so a plain request (no extensions at all) costs no header look-up.
    let upgrade = if parts
        .extensions
        .get::<hyper::upgrade::OnUpgrade>()
        .is_some()
        && body.is_end_stream()
        && h1::has_token(&parts.headers, &header::CONNECTION, "upgrade")
    {
        parts.headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    strip_hop_by_hop(&mut parts.headers);
    // X-Forwarded-For (and dropping Expect, which hyper already answered)
    // happen as the backend's head is written, without touching the map:
    // inserting into hyper's tightly sized map grew it on every request.
    let per_request;
    let forwarded_for = match &conn.forwarded_for {
        Some(v) => Some(v),
        None => {
            per_request = forwarded_for_value(peer);
            per_request.as_ref()
        }
    };

    let table: Arc<Table> = be.load_full();
    let selector = be.selector();
    let key = RequestKey {
        target: pq,
        now_ms: be.clock().now_ms(),
    };
    // A request without a body can be replayed on another backend when the
    // first could not be connected to: nothing was sent.
    let bodiless = body.is_end_stream();
    let attempts = if bodiless { 3 } else { 1 };
    // A safe method without a body may also be replayed (as nginx's
    // proxy_next_upstream does) when the backend died before answering.
    let safe = matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
    // An idempotent one (RFC 9110 9.2.2) may go again when a reused idle
    // connection turns out to have been closed by the backend.
    let idempotent = safe || matches!(parts.method, Method::PUT | Method::DELETE | Method::TRACE);
    // Without a Content-Length the client's body goes on chunked (the
    // client's own Transfer-Encoding was removed as hop-by-hop).
    let chunked = !bodiless && !parts.headers.contains_key(header::CONTENT_LENGTH);
    let mut body = Some(body);
    for attempt in 0..attempts {
        let Some(lease) = selector.acquire(&key, &table.set) else {
            sh.metrics.error(ErrorKind::NoBackend);
            return Err(local(
                StatusCode::SERVICE_UNAVAILABLE,
                "no backend is available\n",
            ));
        };
        let i = lease.index();
        let cell = &table.slots[i].health;
        let addr = table.set.get(i).addr();
        if let Some(l) = log {
            l.backend = Some(addr.to_owned());
        }
        let last = attempt + 1 == attempts;
        let head = ReqHead {
            method: &parts.method,
            target: pq,
            headers: &parts.headers,
            host: table.slots[i].authority.as_str(),
            forwarded_for,
            upgrade: upgrade.as_ref(),
        };
        let res = {
            let _w = Waiting::new(&conn.waiting);
            // The deadline from the coarse clock: no clock read per request.
            let deadline =
                be.clock().start() + Duration::from_millis(key.now_ms) + sh.backend_timeout;
            tokio::time::timeout_at(deadline.into(), async {
                // An idle connection the backend closed just as it was
                // reused fails before a byte of response: a request without
                // a body goes again on another connection.
                let mut stale_tries = 0;
                loop {
                    let Some((mut c, reused)) = checkout(sh, be, cell, addr).await else {
                        return Sent::Connect;
                    };
                    let up = body
                        .take()
                        .filter(|_| !bodiless)
                        .map(|inc| Upload::new(inc, chunked, sh.metrics.clone()));
                    match c.exchange(&head, up).await {
                        Ok((h, up)) => return Sent::Ok(h, c, up),
                        Err(BackendError::ClientBody(e)) => return Sent::ClientBody(e),
                        Err(BackendError::ClosedEarly)
                            if reused && idempotent && bodiless && stale_tries < 3 =>
                        {
                            stale_tries += 1;
                        }
                        Err(e) => return Sent::Reset(e),
                    }
                }
            })
            .await
        };
        match res {
            Ok(Sent::Ok(h, c, _)) if h.parts.status == StatusCode::SWITCHING_PROTOCOLS => {
                let Some(on_upgrade) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
                else {
                    return Err(local(
                        StatusCode::BAD_GATEWAY,
                        "the backend switched protocols on a connection that cannot\n",
                    ));
                };
                let switched_to = h.parts.headers.get(header::UPGRADE).cloned();
                let mut rp = h.parts;
                strip_hop_by_hop(&mut rp.headers);
                rp.headers
                    .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                if let Some(u) = switched_to {
                    rp.headers.insert(header::UPGRADE, u);
                }
                let lease = lease.into_owned(table.clone());
                tokio::spawn(tunnel(on_upgrade, c, sh.clone(), lease));
                return Err(Response::from_parts(
                    rp,
                    Either::Right(Full::new(Bytes::new())),
                ));
            }
            Ok(Sent::Ok(h, c, up)) => {
                be.on_status(&table, i, h.parts.status.as_u16());
                let mut rp = h.parts;
                strip_hop_by_hop(&mut rp.headers);
                rp.version = Version::HTTP_11;
                let mut rb = ResponseBody::new(c, h.framing, h.keep_alive, up);
                if let Err(e) = rb.check_first_chunk().await {
                    tracing::debug!("backend {addr}: {e}");
                    sh.metrics.error(ErrorKind::BackendReset);
                    be.on_status(&table, i, 502);
                    return Err(local(
                        StatusCode::BAD_GATEWAY,
                        "the backend's response was malformed\n",
                    ));
                }
                if rb.is_end_stream()
                    && let Some(c) = rb.take_conn()
                {
                    release(sh, cell, c);
                }
                return Ok((rp, rb, lease.into_owned(table.clone()), cell.clone()));
            }
            Ok(Sent::Connect) => {
                sh.metrics.error(ErrorKind::Connect);
                be.eject(&table, i);
                drop(lease);
                if !last {
                    sh.metrics.retries.fetch_add(1, Relaxed);
                    continue;
                }
                return Err(local(
                    StatusCode::BAD_GATEWAY,
                    "could not connect to a backend\n",
                ));
            }
            Ok(Sent::ClientBody(e)) => {
                tracing::debug!("client request body: {e}");
                sh.metrics.error(ErrorKind::ClientIo);
                return Err(local(
                    StatusCode::BAD_REQUEST,
                    "the request body was cut short\n",
                ));
            }
            Ok(Sent::Reset(e)) => {
                tracing::debug!("backend {}: {e}", table.set.get(i).addr());
                sh.metrics.error(ErrorKind::BackendReset);
                be.on_status(&table, i, 502);
                drop(lease);
                if safe && bodiless && !last {
                    sh.metrics.retries.fetch_add(1, Relaxed);
                    continue;
                }
                return Err(local(
                    StatusCode::BAD_GATEWAY,
                    "the backend failed to respond\n",
                ));
            }
            Err(_) => {
                sh.metrics.error(ErrorKind::Timeout);
                be.on_status(&table, i, 504);
                return Err(local(
                    StatusCode::GATEWAY_TIMEOUT,
                    "the backend timed out\n",
                ));
            }
        }
    }
    // Unreachable in practice: the last attempt always returns.
    Err(local(
        StatusCode::BAD_GATEWAY,
        "no backend could be reached\n",
    ))
}

/// Joins a client that switched protocols (once hyper has sent the 101) to
/// its backend, byte for byte both ways, until either side closes or
/// nothing moves for `--tunnel-timeout`. The lease keeps the tunnel counted
/// in its backend's load; the drain on stop waits for it like a connection.
async fn tunnel(
    on_upgrade: hyper::upgrade::OnUpgrade,
    back: Conn,
    sh: Arc<Shared>,
    _lease: OwnedLease<Table>,
) {
    use tokio::io::AsyncWriteExt as _;
    let m = &sh.metrics;
    m.connections_open.fetch_add(1, Relaxed);
    m.tunnels_open.fetch_add(1, Relaxed);
    let run = async {
        let client = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!("upgrade: {e}");
                return;
            }
        };
        let mut front = hyper_util::rt::TokioIo::new(client);
        let (tcp, early) = back.into_tunnel();
        let clock = sh.backends.clock().clone();
        let st = Arc::new(ConnState::default());
        // Both directions pass through the backend end: its reads and
        // writes are the tunnel's activity.
        let mut back = Tracked::new(tcp, st.clone(), clock.clone());
        if !early.is_empty() && front.write_all(&early).await.is_err() {
            return;
        }
        let idle_ms = sh.tunnel_timeout.as_millis() as u64;
        let mut tick = tokio::time::interval(crate::server::check_period(sh.tunnel_timeout));
        let copy = tokio::io::copy_bidirectional(&mut front, &mut back);
        tokio::pin!(copy);
        loop {
            tokio::select! {
                r = &mut copy => {
                    if let Ok((up, down)) = r {
                        m.bytes_in.fetch_add(up, Relaxed);
                        m.bytes_out.fetch_add(down + early.len() as u64, Relaxed);
                    }
                    return;
                }
                _ = tick.tick() => {
                    let last = st.last_read_ms.load(Relaxed).max(st.last_write_ms.load(Relaxed));
                    if clock.now_ms().saturating_sub(last) > idle_ms {
                        m.error(ErrorKind::IdleTimeout);
                        return;
                    }
                }
            }
        }
    };
    run.await;
    m.tunnels_open.fetch_sub(1, Relaxed);
    m.connections_open.fetch_sub(1, Relaxed);
}

/// A client's TCP stream: records when it last moved bytes, and sends
/// behind the other ready tasks of the event loop.
#[derive(Debug)]
pub struct Tracked<S> {
    inner: S,
    state: Arc<ConnState>,
    clock: Clock,
    /// Owed before each write.
    turn: Turn,
}

impl<S> Tracked<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, state: Arc<ConnState>, clock: Clock) -> Self {
        let now = clock.now_ms();
        state.last_read_ms.store(now, Relaxed);
        state.last_write_ms.store(now, Relaxed);
        Self {
            inner,
            state,
            clock,
            turn: Turn::default(),
        }
    }
    fn touch(&self, at: &AtomicU64) {
        let now = self.clock.now_ms();
        if at.load(Relaxed) != now {
            at.store(now, Relaxed);
        }
    }
    fn touch_read(&self) {
        self.touch(&self.state.last_read_ms);
    }
    fn touch_write(&self) {
        self.touch(&self.state.last_write_ms);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch_read();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        ready!(self.turn.poll_take(cx));
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if r.is_ready() {
            self.turn.reset();
        }
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch_write();
        }
        r
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        ready!(self.turn.poll_take(cx));
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if r.is_ready() {
            self.turn.reset();
        }
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch_write();
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("close, x-secret, host"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("te", HeaderValue::from_static("gzip;q=0.5"));
        h.insert("trailer", HeaderValue::from_static("x-checksum"));
        h.insert("host", HeaderValue::from_static("example"));
        h.insert("x-keep", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, vec!["host", "trailer", "x-keep"]);
        // TE keeps only `trailers`, which the proxy honours end to end.
        let mut h = HeaderMap::new();
        h.insert("te", HeaderValue::from_static("gzip, Trailers;q=1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h["te"], "trailers");
        assert_eq!(h.len(), 1);
    }
}
