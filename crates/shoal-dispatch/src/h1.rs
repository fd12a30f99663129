//! The backend side of the proxy: HTTP/1.1 on one keep-alive connection,
//! driven inside the task of the client request it serves.
//!
//! hyper stays on the client side (it parses what clients send). Towards
//! backends, hyper's client ran every connection as a task of its own: a
//! request went to it over a channel, the response head came back over a
//! oneshot and the body over a third channel, each hop a wake-up. Here the
//! request task writes the head itself and reads the response on the same
//! socket, and the response body handed to hyper's server reads straight
//! from the backend socket: one task per client connection, no channels.
//! A request body ([`Upload`]) is written as the socket takes it while the
//! response is read, so both directions stream at once; trailer fields pass
//! both ways.
//!
//! The parsing is httparse's (as in hyper); the framing rules are RFC 9112's
//! and live in pure functions ([`parse_head`], [`Chunked`]) that the unit
//! tests and the fuzz target drive without sockets.

use crate::metrics::Metrics;
use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Largest response head accepted from a backend (status line and headers).
pub const MAX_HEAD: usize = 64 * 1024;
/// Most headers in a backend's response (hyper's default limit too).
const MAX_HEADERS: usize = 100;
/// Largest chunk-size line or trailer section.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 64 * 1024;
/// Most fields in a trailer section.
const MAX_TRAILER_FIELDS: usize = 32;
/// Read sizes: at least this much room per read...
const READ_MIN: usize = 8 * 1024;
/// ...and at most this much for long bodies (as large as hyper's reads
/// go: 64 KiB cost about 6 % of the 1 MB rate at two threads). A connection
/// goes back to the pool with a buffer no larger than `2 * READ_MIN`.
const READ_MAX: usize = 256 * 1024;

/// Why a backend's response could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The connection closed before a byte of the response came.
    #[error("the backend closed the connection before responding")]
    ClosedEarly,
    /// The backend broke the protocol.
    #[error("malformed response from the backend: {0}")]
    Malformed(&'static str),
    /// The connection closed in the middle of a response.
    #[error("the backend closed the connection mid-response")]
    Truncated,
    /// The socket failed.
    #[error("backend I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The client's request body failed while it was being forwarded.
    #[error("the client's request body was cut short: {0}")]
    ClientBody(String),
}

/// How a response body is delimited (RFC 9112 section 6.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Framing {
    /// No body: a response to HEAD, or 1xx, 204, 304.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Until the backend closes the connection.
    Close,
}

/// A parsed response head.
#[derive(Debug)]
pub struct Head {
    /// Status, version, headers (as the backend sent them).
    pub parts: http::response::Parts,
    /// How the body that follows is delimited.
    pub framing: Framing,
    /// Whether the connection may carry another request afterwards.
    pub keep_alive: bool,
}

/// Whether a comma-separated header `name` of `h` lists `token` (with or
/// without `;` parameters, as TE's weights).
pub(crate) fn has_token(h: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    h.get_all(name).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',').any(|t| {
                t.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .eq_ignore_ascii_case(token)
            })
        })
    })
}

/// Parses a response head at the start of `buf`. `Ok(None)`: incomplete.
/// On success the head's bytes are split off `buf` (header values share
/// them, as hyper's do). Interim 1xx responses other than 101 are skipped;
/// a 101 is the head returned when the request asked to `upgrade`, and an
/// error otherwise.
pub fn parse_head(
    buf: &mut BytesMut,
    head_request: bool,
    upgrade: bool,
) -> Result<Option<Head>, BackendError> {
    loop {
        let mut slots =
            [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut res, buf, &mut slots)
        {
            Ok(httparse::Status::Complete(n)) if n <= MAX_HEAD => n,
            Ok(httparse::Status::Complete(_)) => {
                return Err(BackendError::Malformed("response head too large"));
            }
            Ok(httparse::Status::Partial) => {
                if buf.len() >= MAX_HEAD {
                    return Err(BackendError::Malformed("response head too large"));
                }
                return Ok(None);
            }
            Err(httparse::Error::TooManyHeaders) => {
                return Err(BackendError::Malformed("too many response headers"));
            }
            Err(_) => return Err(BackendError::Malformed("invalid response head")),
        };
        let code = res.code.unwrap_or(0);
        if code == 101 && !upgrade {
            return Err(BackendError::Malformed("unrequested protocol switch (101)"));
        }
        if (100..200).contains(&code) && code != 101 {
            buf.advance(len);
            continue;
        }
        let status = StatusCode::from_u16(code)
            .map_err(|_| BackendError::Malformed("invalid status code"))?;
        let version = if res.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        // Name and value positions within the head, so that the values can
        // share the head's bytes once it is split off.
        let base = buf.as_ptr() as usize;
        let mut at = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
        let n = res.headers.len();
        for (slot, h) in at.iter_mut().zip(res.headers.iter()) {
            let ns = (h.name.as_ptr() as usize - base) as u32;
            let vs = (h.value.as_ptr() as usize - base) as u32;
            *slot = (ns, ns + h.name.len() as u32, vs, vs + h.value.len() as u32);
        }
        let bytes = buf.split_to(len).freeze();
        let mut headers = HeaderMap::with_capacity(n);
        for &(ns, ne, vs, ve) in &at[..n] {
            let name = HeaderName::from_bytes(&bytes[ns as usize..ne as usize])
                .map_err(|_| BackendError::Malformed("invalid header name"))?;
            let v = HeaderValue::from_maybe_shared(bytes.slice(vs as usize..ve as usize))
                .map_err(|_| BackendError::Malformed("invalid header value"))?;
            headers.append(name, v);
        }
        let (framing, keep_alive) = framing(status, version, &mut headers, head_request)?;
        let mut parts = http::Response::new(()).into_parts().0;
        parts.status = status;
        parts.version = version;
        parts.headers = headers;
        return Ok(Some(Head {
            parts,
            framing,
            keep_alive,
        }));
    }
}

/// The body framing and connection persistence of a response (RFC 9112
/// 6.3 and 9.3). A response with both Transfer-Encoding and Content-Length
/// loses the latter and its connection is not reused.
fn framing(
    status: StatusCode,
    version: Version,
    h: &mut HeaderMap,
    head_request: bool,
) -> Result<(Framing, bool), BackendError> {
    let mut keep_alive = if version == Version::HTTP_10 {
        has_token(h, &header::CONNECTION, "keep-alive")
    } else {
        !has_token(h, &header::CONNECTION, "close")
    };
    if head_request
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || status.is_informational()
    {
        return Ok((Framing::Empty, keep_alive));
    }
    if h.contains_key(header::TRANSFER_ENCODING) {
        if h.remove(header::CONTENT_LENGTH).is_some() {
            keep_alive = false;
        }
        // Only a lone `chunked` is decoded and re-framed: any other coding
        // would be lost when hop-by-hop fields are dropped (HAProxy answers
        // 502 too), and `chunked` twice is not allowed (RFC 9112 6.1).
        return match transfer_codings(h) {
            Codings::Chunked => Ok((Framing::Chunked, keep_alive)),
            _ => Err(BackendError::Malformed(
                "a transfer coding other than a single chunked",
            )),
        };
    }
    let mut len: Option<u64> = None;
    let mut values = 0;
    for v in h.get_all(header::CONTENT_LENGTH) {
        let s = v
            .to_str()
            .map_err(|_| BackendError::Malformed("invalid Content-Length"))?;
        for part in s.split(',') {
            values += 1;
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(BackendError::Malformed("invalid Content-Length"));
            }
            let n: u64 = part
                .parse()
                .map_err(|_| BackendError::Malformed("invalid Content-Length"))?;
            if len.is_some_and(|l| l != n) {
                return Err(BackendError::Malformed("conflicting Content-Length values"));
            }
            len = Some(n);
        }
    }
    // Repeated identical lengths are one length (RFC 9110 8.6): sent on as
    // one, so no client downstream has to know that rule.
    if values > 1
        && let Some(n) = len
    {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    Ok(match len {
        Some(n) => (Framing::Length(n), keep_alive),
        None => (Framing::Close, false),
    })
}

/// What a message's Transfer-Encoding fields list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codings {
    /// No Transfer-Encoding field.
    None,
    /// Exactly one coding, chunked.
    Chunked,
    /// `chunked` more than once.
    ChunkedTwice,
    /// A coding other than chunked (gzip, chunked; gzip; ...).
    Other,
}

/// Classifies the Transfer-Encoding fields of `h`.
pub fn transfer_codings(h: &HeaderMap) -> Codings {
    let mut chunked = 0;
    let mut other = false;
    let mut any = false;
    for v in h.get_all(header::TRANSFER_ENCODING) {
        any = true;
        let Ok(s) = v.to_str() else {
            other = true;
            continue;
        };
        for t in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            if t.eq_ignore_ascii_case("chunked") {
                chunked += 1;
            } else {
                other = true;
            }
        }
    }
    match (any, chunked, other) {
        (false, _, _) => Codings::None,
        (_, _, true) => Codings::Other,
        (_, 1, false) => Codings::Chunked,
        (_, 0, false) => Codings::Other,
        _ => Codings::ChunkedTwice,
    }
}

/// Why a client's request is answered by the dispatcher itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// The status to answer with.
    pub status: StatusCode,
    /// The reason, for the body.
    pub message: &'static str,
}

fn refuse(status: StatusCode, message: &'static str) -> Refusal {
    Refusal { status, message }
}

/// Checks a client's request line and framing fields (RFC 9112 3.2, 6.1,
/// RFC 9110 7.2) before anything goes to a backend: one Host; an
/// absolute-form target must name the same authority as Host (the Host to
/// send is returned when there was none); no authority-form outside
/// CONNECT; no transfer coding but one chunked. `transfer` is what the
/// request's Transfer-Encoding fields list.
pub fn check_request(
    method: &Method,
    uri: &http::Uri,
    headers: &HeaderMap,
) -> Result<Option<HeaderValue>, Refusal> {
    let bad = StatusCode::BAD_REQUEST;
    let mut hosts = headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(refuse(bad, "more than one Host header\n"));
    }
    match transfer_codings(headers) {
        Codings::None | Codings::Chunked => {}
        Codings::ChunkedTwice => {
            return Err(refuse(
                bad,
                "the chunked transfer coding is applied twice\n",
            ));
        }
        Codings::Other => {
            return Err(refuse(
                StatusCode::NOT_IMPLEMENTED,
                "transfer codings other than chunked are not implemented\n",
            ));
        }
    }
    if *method == Method::CONNECT {
        return Ok(None);
    }
    let Some(authority) = uri.authority() else {
        return Ok(None);
    };
    if uri.scheme().is_none() {
        return Err(refuse(
            bad,
            "an authority-form target (host:port) is only for CONNECT\n",
        ));
    }
    match host {
        Some(h)
            if h.as_bytes()
                .eq_ignore_ascii_case(authority.as_str().as_bytes()) =>
        {
            Ok(None)
        }
        Some(_) => Err(refuse(
            bad,
            "the absolute-form target names another host than the Host header\n",
        )),
        None => Ok(HeaderValue::from_str(authority.as_str()).ok()),
    }
}

/// One step of a body decoder over the bytes received so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Body bytes.
    Data(Bytes),
    /// More input is needed.
    More,
    /// The trailer fields (RFC 9112 7.1.2); the body is complete after them.
    Trailers(HeaderMap),
    /// The body is complete.
    Done,
}

/// A decoder of the chunked transfer coding (RFC 9112 section 7.1).
/// Chunk extensions are ignored; trailer fields come as one
/// [`Step::Trailers`] before the end.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Chunked {
    /// Expecting a chunk-size line.
    #[default]
    Size,
    /// Inside a chunk: bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// Expecting the trailer section (or the empty line that ends the body).
    Trailers,
    /// Done.
    Done,
}

impl Chunked {
    /// Decodes what it can from the front of `buf`, consuming it.
    pub fn step(&mut self, buf: &mut BytesMut) -> Result<Step, BackendError> {
        loop {
            match *self {
                Chunked::Size => match httparse::parse_chunk_size(buf) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        buf.advance(used);
                        *self = if size == 0 {
                            Chunked::Trailers
                        } else {
                            Chunked::Data(size)
                        };
                    }
                    Ok(httparse::Status::Partial) => {
                        if buf.len() > MAX_CHUNK_LINE {
                            return Err(BackendError::Malformed("chunk-size line too long"));
                        }
                        return Ok(Step::More);
                    }
                    Err(_) => return Err(BackendError::Malformed("invalid chunk size")),
                },
                Chunked::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    let take = (left.min(buf.len() as u64)) as usize;
                    let left = left - take as u64;
                    *self = if left == 0 {
                        Chunked::DataEnd
                    } else {
                        Chunked::Data(left)
                    };
                    return Ok(Step::Data(buf.split_to(take).freeze()));
                }
                Chunked::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Step::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(BackendError::Malformed("chunk not followed by CRLF"));
                    }
                    buf.advance(2);
                    *self = Chunked::Size;
                }
                Chunked::Trailers => {
                    let mut fields = [httparse::EMPTY_HEADER; MAX_TRAILER_FIELDS];
                    match httparse::parse_headers(buf, &mut fields) {
                        Ok(httparse::Status::Complete((used, fields))) => {
                            let mut map = HeaderMap::new();
                            for f in fields {
                                let (Ok(n), Ok(v)) = (
                                    HeaderName::from_bytes(f.name.as_bytes()),
                                    HeaderValue::from_bytes(f.value),
                                ) else {
                                    return Err(BackendError::Malformed("invalid trailer field"));
                                };
                                map.append(n, v);
                            }
                            buf.advance(used);
                            *self = Chunked::Done;
                            if !map.is_empty() {
                                return Ok(Step::Trailers(map));
                            }
                        }
                        Ok(httparse::Status::Partial) => {
                            if buf.len() > MAX_TRAILERS {
                                return Err(BackendError::Malformed("trailer section too large"));
                            }
                            return Ok(Step::More);
                        }
                        Err(httparse::Error::TooManyHeaders) => {
                            return Err(BackendError::Malformed("too many trailer fields"));
                        }
                        Err(_) => return Err(BackendError::Malformed("invalid trailer section")),
                    }
                }
                Chunked::Done => return Ok(Step::Done),
            }
        }
    }
}

/// A turn of the run queue: the task goes behind the tasks already queued,
/// once, until [`Turn::reset`].
///
/// The proxy takes one before each write and before each body read after
/// the first. Writes then go out after every task made ready by the same
/// batch of events has done its reading and parsing, as HAProxy's loop
/// runs its receive tasklets before the streams that send: the sends of a
/// batch leave together, and the client and the backend wake once per
/// burst instead of once per response. Measured at one thread, 1 KB,
/// wrk -c64: context switches per second of wrk 12.5k -> 5.3k, of nginx
/// 7.0k -> 4.6k, requests/s +6 %, at the same CPU per request.
///
/// Unlike `tokio::task::yield_now`, which waits for the next poll of the
/// I/O driver, this only goes behind the tasks already queued.
#[derive(Debug, Default)]
pub struct Turn {
    taken: bool,
}

impl Turn {
    /// A turn already taken: the first [`Turn::poll_take`] is free.
    pub fn taken() -> Self {
        Self { taken: true }
    }

    /// Pending once (having woken the task, which requeues it), then
    /// ready until the next [`Turn::reset`].
    pub fn poll_take(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.taken {
            return Poll::Ready(());
        }
        self.taken = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Owes a new turn before the next [`Turn::poll_take`] is ready.
    pub fn reset(&mut self) {
        self.taken = false;
    }
}

/// Takes one [`Turn`].
pub async fn to_the_back() {
    let mut turn = Turn::default();
    std::future::poll_fn(|cx| turn.poll_take(cx)).await
}

/// A keep-alive connection to a backend.
#[derive(Debug)]
pub struct BackendConn {
    io: TcpStream,
    /// Bytes read and not yet consumed.
    rbuf: BytesMut,
    /// The request head being written (kept for its capacity).
    wbuf: Vec<u8>,
}

/// A client's request body on its way to a backend: written as the
/// backend's socket takes it, while the response is read, so that a
/// backend may answer before it has read everything (a 413 up front, or an
/// echo that streams back as it reads).
///
/// [`BackendConn::exchange`] drives it until the response head comes; the
/// [`ResponseBody`] drives whatever is left alongside the response. When the
/// response is complete first, the rest is not sent and the connection is
/// not reused (the backend answered without it).
pub struct Upload {
    body: Incoming,
    chunked: bool,
    /// Bytes of the current frame (with its chunk framing) not yet written.
    out: VecDeque<Bytes>,
    /// Trailer fields, sent after the last chunk.
    trailers: Option<HeaderMap>,
    /// The client's body has ended (and its last chunk is queued).
    ended: bool,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Upload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upload")
            .field("chunked", &self.chunked)
            .field("queued", &self.out.len())
            .field("ended", &self.ended)
            .finish()
    }
}

impl Upload {
    /// `body` as it comes (with its Content-Length) or, when `chunked`, in
    /// the chunked coding; bytes forwarded count in `metrics.bytes_in`.
    pub fn new(body: Incoming, chunked: bool, metrics: Arc<Metrics>) -> Self {
        Self {
            body,
            chunked,
            out: VecDeque::with_capacity(3),
            trailers: None,
            ended: false,
            metrics,
        }
    }

    /// Sends what it can. `Ready(Ok)` once the whole body is written.
    pub fn poll_send<W: tokio::io::AsyncWrite + Unpin>(
        &mut self,
        io: &mut W,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), BackendError>> {
        loop {
            // Write what is queued, as one vectored write per attempt.
            while !self.out.is_empty() {
                let mut slices = [std::io::IoSlice::new(&[]); 3];
                let n = self.out.len().min(slices.len());
                for (s, b) in slices.iter_mut().zip(&self.out) {
                    *s = std::io::IoSlice::new(b);
                }
                let mut wrote =
                    std::task::ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices[..n]))?;
                if wrote == 0 {
                    return Poll::Ready(Err(BackendError::Io(
                        std::io::ErrorKind::WriteZero.into(),
                    )));
                }
                while wrote > 0 {
                    let front = &mut self.out[0];
                    if wrote >= front.len() {
                        wrote -= front.len();
                        self.out.pop_front();
                    } else {
                        front.advance(wrote);
                        wrote = 0;
                    }
                }
            }
            if self.ended {
                return Poll::Ready(Ok(()));
            }
            match std::task::ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                None => {
                    self.ended = true;
                    if self.chunked {
                        let mut end = b"0\r\n".to_vec();
                        for (k, v) in self.trailers.iter().flatten() {
                            put_field(&mut end, k.as_str().as_bytes(), v.as_bytes());
                        }
                        end.extend_from_slice(b"\r\n");
                        self.out.push_back(end.into());
                    }
                }
                Some(Err(e)) => return Poll::Ready(Err(BackendError::ClientBody(e.to_string()))),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if data.is_empty() => {}
                    Ok(data) => {
                        self.metrics.bytes_in.fetch_add(data.len() as u64, Relaxed);
                        if self.chunked {
                            let mut line = [0u8; 20];
                            self.out.push_back(Bytes::copy_from_slice(chunk_line(
                                data.len(),
                                &mut line,
                            )));
                            self.out.push_back(data);
                            self.out.push_back(Bytes::from_static(b"\r\n"));
                        } else {
                            self.out.push_back(data);
                        }
                    }
                    // Only the chunked coding can carry them on.
                    Err(f) => {
                        if let Ok(t) = f.into_trailers() {
                            self.trailers.get_or_insert_default().extend(t);
                        }
                    }
                },
            }
        }
    }
}

/// The request line and headers sent to a backend.
#[derive(Debug)]
pub struct ReqHead<'a> {
    /// Method.
    pub method: &'a Method,
    /// Origin-form target (`/path?query`) or `*`.
    pub target: &'a str,
    /// Headers, hop-by-hop ones already removed.
    pub headers: &'a HeaderMap,
    /// Host to send when `headers` has none.
    pub host: &'a str,
    /// The client's address, appended to X-Forwarded-For.
    pub forwarded_for: Option<&'a HeaderValue>,
    /// The client's `Upgrade` (a WebSocket handshake): sent on with
    /// `Connection: upgrade`, and a 101 answer is then accepted.
    pub upgrade: Option<&'a HeaderValue>,
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

impl BackendConn {
    /// The socket and the bytes read past a 101 head: a tunnel's backend
    /// end, whose first bytes may already be here.
    pub fn into_tunnel(self) -> (TcpStream, BytesMut) {
        (self.io, self.rbuf)
    }

    /// Connects to `addr`; `None` when it cannot be reached within `timeout`.
    pub async fn connect(addr: &str, timeout: Duration) -> Option<BackendConn> {
        Self::connect_from(addr, timeout, None).await
    }

    /// [`BackendConn::connect`] from a given source address (a federated
    /// dispatcher reaches its peers from its own listen address).
    pub async fn connect_from(
        addr: &str,
        timeout: Duration,
        source: Option<std::net::IpAddr>,
    ) -> Option<BackendConn> {
        let io = match source {
            None => tokio::time::timeout(timeout, TcpStream::connect(addr))
                .await
                .ok()?
                .ok()?,
            Some(ip) => {
                let to: std::net::SocketAddr = tokio::net::lookup_host(addr).await.ok()?.next()?;
                let sock = if to.is_ipv4() {
                    tokio::net::TcpSocket::new_v4()
                } else {
                    tokio::net::TcpSocket::new_v6()
                }
                .ok()?;
                sock.bind(std::net::SocketAddr::new(ip, 0)).ok()?;
                tokio::time::timeout(timeout, sock.connect(to))
                    .await
                    .ok()?
                    .ok()?
            }
        };
        let _ = io.set_nodelay(true);
        Some(BackendConn {
            io,
            rbuf: BytesMut::with_capacity(READ_MIN),
            wbuf: Vec::with_capacity(1024),
        })
    }

    /// Whether an idle connection is still usable: nothing arrived on it
    /// since its last response (an idle connection the backend closed reads
    /// as end of file). Costs no system call unless the socket is flagged
    /// readable.
    pub fn is_usable(&self) -> bool {
        if !self.rbuf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Sends a request and reads the response head. A connection whose
    /// response head came is left positioned at the body; with it comes
    /// what is left of the upload if the backend answered before it was
    /// all sent (see [`Upload`]).
    pub async fn exchange(
        &mut self,
        req: &ReqHead<'_>,
        upload: Option<Upload>,
    ) -> Result<(Head, Option<Upload>), BackendError> {
        let chunked = upload.as_ref().is_some_and(|u| u.chunked);
        encode_head(&mut self.wbuf, req, chunked);
        let head_request = *req.method == Method::HEAD;
        let upgrade = req.upgrade.is_some();
        // Sent once the other ready tasks have had their turn: see
        // [`Turn`].
        to_the_back().await;
        let mut sent = self
            .io
            .write_all(&self.wbuf)
            .await
            .map_err(BackendError::Io);
        let mut upload = upload.filter(|_| sent.is_ok());
        let mut got_any = !self.rbuf.is_empty();
        let answer = std::future::poll_fn(|cx| {
            if let Some(u) = upload.as_mut() {
                match u.poll_send(&mut self.io, cx) {
                    Poll::Ready(Ok(())) => upload = None,
                    Poll::Ready(Err(e @ BackendError::ClientBody(_))) => {
                        return Poll::Ready(Err(e));
                    }
                    // The backend stopped reading; its answer may still come.
                    Poll::Ready(Err(e)) => {
                        sent = Err(e);
                        upload = None;
                    }
                    Poll::Pending => {}
                }
            }
            poll_read_head(
                &mut self.io,
                &mut self.rbuf,
                (head_request, upgrade),
                &mut got_any,
                cx,
            )
        })
        .await;
        match answer {
            Ok(mut h) => {
                // Answered before the request was all sent: the rest goes
                // alongside the response, and the connection is done after.
                if sent.is_err() || upload.is_some() {
                    h.keep_alive = false;
                }
                Ok((h, upload))
            }
            Err(e) => match sent {
                // Nothing came back: the write's error says more.
                Err(w) if matches!(e, BackendError::ClosedEarly | BackendError::Io(_)) => Err(w),
                _ => Err(e),
            },
        }
    }
}

/// Appends one `name: value` field line.
fn put_field(w: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    w.extend_from_slice(name);
    w.extend_from_slice(b": ");
    w.extend_from_slice(value);
    w.extend_from_slice(b"\r\n");
}

/// Writes the request head for a backend into `w` (cleared first): the
/// client's fields (hop-by-hop ones already removed) except Expect, which
/// hyper answered, a Host if the client gave none, X-Forwarded-For with
/// this hop's client appended on one line, and the chunked coding when
/// `chunked`.
fn encode_head(w: &mut Vec<u8>, req: &ReqHead<'_>, chunked: bool) {
    w.clear();
    w.extend_from_slice(req.method.as_str().as_bytes());
    w.push(b' ');
    w.extend_from_slice(req.target.as_bytes());
    w.extend_from_slice(b" HTTP/1.1\r\n");
    let mut host = false;
    let mut earlier_proxies = false;
    for (k, v) in req.headers {
        host |= *k == header::HOST;
        // Joined with this hop's below, on one line.
        if *k == X_FORWARDED_FOR && req.forwarded_for.is_some() {
            earlier_proxies = true;
            continue;
        }
        if *k == header::EXPECT {
            continue;
        }
        put_field(w, k.as_str().as_bytes(), v.as_bytes());
    }
    if !host {
        put_field(w, b"host", req.host.as_bytes());
    }
    if let Some(ip) = req.forwarded_for {
        w.extend_from_slice(b"x-forwarded-for: ");
        if earlier_proxies {
            for v in req.headers.get_all(X_FORWARDED_FOR) {
                w.extend_from_slice(v.as_bytes());
                w.extend_from_slice(b", ");
            }
        }
        w.extend_from_slice(ip.as_bytes());
        w.extend_from_slice(b"\r\n");
    }
    if chunked {
        put_field(w, b"transfer-encoding", b"chunked");
    }
    if let Some(u) = req.upgrade {
        put_field(w, b"connection", b"upgrade");
        put_field(w, b"upgrade", u.as_bytes());
    }
    w.extend_from_slice(b"\r\n");
}

/// The chunk-size line of a chunk of `n` bytes, in `buf`.
fn chunk_line(n: usize, buf: &mut [u8; 20]) -> &[u8] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut i = buf.len() - 2;
    buf[i..].copy_from_slice(b"\r\n");
    let mut v = n;
    loop {
        i -= 1;
        buf[i] = HEX[v & 15];
        v >>= 4;
        if v == 0 {
            break;
        }
    }
    &buf[i..]
}

/// Reads into `rbuf` from `io`, with room for at least `want` bytes (within
/// [READ_MIN, READ_MAX]). `Ok(0)` at end of file.
fn poll_fill<R: tokio::io::AsyncRead + Unpin>(
    io: &mut R,
    rbuf: &mut BytesMut,
    cx: &mut Context<'_>,
    want: usize,
) -> Poll<std::io::Result<usize>> {
    let want = want.clamp(READ_MIN, READ_MAX);
    if rbuf.capacity() - rbuf.len() < want {
        rbuf.reserve(want);
    }
    tokio_util::io::poll_read_buf(Pin::new(io), cx, rbuf)
}

/// Reads a response head from `io` into `rbuf`, skipping interim ones;
/// `got_any` records whether a byte of it came (a close before any is
/// [`BackendError::ClosedEarly`]).
fn poll_read_head<R: tokio::io::AsyncRead + Unpin>(
    io: &mut R,
    rbuf: &mut BytesMut,
    (head_request, upgrade): (bool, bool),
    got_any: &mut bool,
    cx: &mut Context<'_>,
) -> Poll<Result<Head, BackendError>> {
    loop {
        if !rbuf.is_empty()
            && let Some(h) = parse_head(rbuf, head_request, upgrade)?
        {
            return Poll::Ready(Ok(h));
        }
        let n = std::task::ready!(poll_fill(io, rbuf, cx, READ_MIN))?;
        if n == 0 {
            return Poll::Ready(Err(if *got_any {
                BackendError::Truncated
            } else {
                BackendError::ClosedEarly
            }));
        }
        *got_any = true;
    }
}

/// How much of a response body is left.
#[derive(Debug)]
enum Left {
    Length(u64),
    Chunked(Chunked),
    Close,
    Done,
}

/// A response body read from the backend connection as the client's
/// connection asks for it. Once complete, [`ResponseBody::take_conn`] gives
/// the connection back for reuse if it may carry another request.
#[derive(Debug)]
pub struct ResponseBody {
    conn: Option<BackendConn>,
    left: Left,
    keep_alive: bool,
    /// Owed before every socket read after the first.
    turn: Turn,
    /// The rest of the request body, when the backend answered first.
    upload: Option<Upload>,
}

impl ResponseBody {
    /// The body of a response whose head `conn` just read, with what is
    /// left of the request body to send alongside.
    pub fn new(
        conn: BackendConn,
        framing: Framing,
        keep_alive: bool,
        upload: Option<Upload>,
    ) -> Self {
        let left = match framing {
            Framing::Empty | Framing::Length(0) => Left::Done,
            Framing::Length(n) => Left::Length(n),
            Framing::Chunked => Left::Chunked(Chunked::Size),
            Framing::Close => Left::Close,
        };
        Self {
            conn: Some(conn),
            left,
            keep_alive: keep_alive && upload.is_none(),
            turn: Turn::taken(),
            upload,
        }
    }

    /// For a chunked body, reads until its first chunk-size line is in and
    /// checks it, so that a backend whose body is malformed from its first
    /// byte gets a 502 with a status line rather than a cut connection
    /// (the head is not yet sent then). Usually the line came with the
    /// head and nothing is read.
    pub async fn check_first_chunk(&mut self) -> Result<(), BackendError> {
        if !matches!(self.left, Left::Chunked(Chunked::Size)) {
            return Ok(());
        }
        let Some(conn) = self.conn.as_mut() else {
            return Ok(());
        };
        loop {
            match httparse::parse_chunk_size(&conn.rbuf) {
                Ok(httparse::Status::Complete(_)) => return Ok(()),
                Err(_) => return Err(BackendError::Malformed("invalid chunk size")),
                Ok(httparse::Status::Partial) if conn.rbuf.len() > MAX_CHUNK_LINE => {
                    return Err(BackendError::Malformed("chunk-size line too long"));
                }
                Ok(httparse::Status::Partial) => {
                    let n = std::future::poll_fn(|cx| {
                        poll_fill(&mut conn.io, &mut conn.rbuf, cx, READ_MIN)
                    })
                    .await?;
                    if n == 0 {
                        return Err(BackendError::Truncated);
                    }
                }
            }
        }
    }

    /// The connection, once the body is complete and the connection may be
    /// reused (keep-alive, nothing extra received).
    pub fn take_conn(&mut self) -> Option<BackendConn> {
        if matches!(self.left, Left::Done) {
            // The response is complete: what the upload had left goes
            // unsent (the connection is not reused then).
            self.upload = None;
        }
        if !matches!(self.left, Left::Done) || !self.keep_alive {
            return None;
        }
        let mut c = self.conn.take().filter(|c| c.rbuf.is_empty())?;
        if c.rbuf.capacity() > 2 * READ_MIN {
            c.rbuf = BytesMut::with_capacity(READ_MIN);
        }
        Some(c)
    }

    /// Reads more of the body into the connection's buffer. Every read
    /// attempt after the body's first, including one that follows a
    /// readiness wake-up, first lets the other ready tasks run.
    ///
    /// Without the turn a long body streamed in one go: hyper's server
    /// keeps polling a body that has data, so a thread served its 1 MB
    /// responses one after the other and the others waited (p99 57-75 ms
    /// against HAProxy's 35 ms at two threads; 24-27 ms with it).
    fn poll_more(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<Result<(), BackendError>> {
        std::task::ready!(self.turn.poll_take(cx));
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(Err(BackendError::Truncated));
        };
        self.turn.reset();
        match std::task::ready!(poll_fill(&mut conn.io, &mut conn.rbuf, cx, want)) {
            Ok(0) => Poll::Ready(Err(BackendError::Truncated)),
            Ok(_) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(e.into())),
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BackendError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BackendError>>> {
        let this = &mut *self;
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            if let Some(up) = this.upload.as_mut() {
                match up.poll_send(&mut conn.io, cx) {
                    Poll::Pending => {}
                    Poll::Ready(Ok(())) => this.upload = None,
                    // The client cut its upload: the backend would wait for
                    // the rest, so the exchange ends here for both.
                    Poll::Ready(Err(e @ BackendError::ClientBody(_))) => {
                        this.conn = None;
                        this.upload = None;
                        return Poll::Ready(Some(Err(e)));
                    }
                    // The backend stopped reading: its response goes on.
                    Poll::Ready(Err(_)) => this.upload = None,
                }
            }
            let want = match &mut this.left {
                Left::Done => {
                    // Complete before the upload: the rest is not sent.
                    this.upload = None;
                    return Poll::Ready(None);
                }
                Left::Length(n) => {
                    if !conn.rbuf.is_empty() {
                        let take = (*n).min(conn.rbuf.len() as u64) as usize;
                        *n -= take as u64;
                        let data = conn.rbuf.split_to(take).freeze();
                        if *n == 0 {
                            this.left = Left::Done;
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    (*n).min(READ_MAX as u64) as usize
                }
                Left::Chunked(dec) => match dec.step(&mut conn.rbuf) {
                    Ok(Step::Data(d)) => return Poll::Ready(Some(Ok(Frame::data(d)))),
                    // hyper's server passes them on to a client that sent
                    // `TE: trailers` when the response's `Trailer` field
                    // names them (RFC 9110 6.5).
                    Ok(Step::Trailers(t)) => {
                        this.left = Left::Done;
                        return Poll::Ready(Some(Ok(Frame::trailers(t))));
                    }
                    Ok(Step::Done) => {
                        this.left = Left::Done;
                        return Poll::Ready(None);
                    }
                    Ok(Step::More) => READ_MAX,
                    Err(e) => {
                        this.conn = None;
                        return Poll::Ready(Some(Err(e)));
                    }
                },
                Left::Close => {
                    if !conn.rbuf.is_empty() {
                        let data = conn.rbuf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    READ_MAX
                }
            };
            match std::task::ready!(this.poll_more(cx, want)) {
                Ok(()) => {}
                // The end of a body delimited by the close.
                Err(BackendError::Truncated) if matches!(this.left, Left::Close) => {
                    this.left = Left::Done;
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.left, Left::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.left {
            Left::Done => SizeHint::with_exact(0),
            Left::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str, head_request: bool) -> Result<Option<Head>, BackendError> {
        let mut b = BytesMut::from(text.as_bytes());
        parse_head(&mut b, head_request, false)
    }

    fn framing_of(text: &str) -> (Framing, bool) {
        let h = head(text, false).unwrap().unwrap();
        (h.framing, h.keep_alive)
    }

    #[test]
    fn framing_follows_rfc_9112() {
        for (text, want) in [
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
                (Framing::Length(5), true),
            ),
            // Repeated identical lengths are one length.
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\ncontent-length: 5\r\n\r\n",
                (Framing::Length(5), true),
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                (Framing::Chunked, true),
            ),
            ("HTTP/1.1 200 OK\r\n\r\n", (Framing::Close, false)),
            (
                "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\n",
                (Framing::Length(1), false),
            ),
            // HTTP/1.0 keeps the connection only when asked to.
            (
                "HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n",
                (Framing::Length(1), false),
            ),
            (
                "HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 1\r\n\r\n",
                (Framing::Length(1), true),
            ),
        ] {
            assert_eq!(framing_of(text), want, "{text:?}");
        }
        // Transfer-Encoding wins over Content-Length, which is dropped, and
        // the connection is not reused.
        let h = head(
            "HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Chunked, false));
        assert!(!h.parts.headers.contains_key("content-length"));
        // No body whatever the headers say.
        for s in [204, 304] {
            assert_eq!(
                framing_of(&format!(
                    "HTTP/1.1 {s} X\r\ncontent-length: 9\r\ntransfer-encoding: chunked\r\n\r\n"
                ))
                .0,
                Framing::Empty
            );
        }
        let h = head("HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n", true)
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::Empty);
        assert_eq!(h.parts.headers["content-length"], "9");
        // Identical lengths go on as one field with one value.
        let h = head(
            "HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\ncontent-length: 5\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        let v: Vec<_> = h.parts.headers.get_all("content-length").iter().collect();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0], "5");
        // Codings other than one chunked would be lost: refused (502).
        for te in [
            "gzip",
            "gzip, chunked",
            "chunked, chunked",
            "chunked\r\ntransfer-encoding: chunked",
        ] {
            let text = format!("HTTP/1.1 200 OK\r\ntransfer-encoding: {te}\r\n\r\n");
            assert!(
                matches!(head(&text, false), Err(BackendError::Malformed(_))),
                "{te}"
            );
        }
    }

    #[test]
    fn requests_are_checked_as_rfc_9112_says() {
        let check = |m: Method, target: &str, fields: &[(&str, &str)]| {
            let uri: http::Uri = target.parse().unwrap();
            let mut h = HeaderMap::new();
            for (k, v) in fields {
                h.append(
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            check_request(&m, &uri, &h).map_err(|r| r.status.as_u16())
        };
        let get = Method::GET;
        assert_eq!(check(get.clone(), "/a", &[("host", "x")]), Ok(None));
        assert_eq!(
            check(get.clone(), "/a", &[("host", "x"), ("host", "y")]),
            Err(400)
        );
        assert_eq!(check(get.clone(), "http://x/a", &[("host", "x")]), Ok(None));
        assert_eq!(check(get.clone(), "http://x/a", &[("host", "y")]), Err(400));
        assert_eq!(
            check(get.clone(), "http://x:81/a", &[]),
            Ok(Some(HeaderValue::from_static("x:81")))
        );
        assert_eq!(
            check(get.clone(), "other.example:80", &[("host", "x")]),
            Err(400)
        );
        let post = Method::POST;
        assert_eq!(
            check(post.clone(), "/", &[("transfer-encoding", "chunked")]),
            Ok(None)
        );
        assert_eq!(
            check(post.clone(), "/", &[("transfer-encoding", "gzip, chunked")]),
            Err(501)
        );
        assert_eq!(
            check(
                post.clone(),
                "/",
                &[("transfer-encoding", "chunked, chunked")]
            ),
            Err(400)
        );
        assert_eq!(
            check(
                post,
                "/",
                &[
                    ("transfer-encoding", "chunked"),
                    ("transfer-encoding", "chunked")
                ]
            ),
            Err(400)
        );
    }

    #[test]
    fn a_requested_switch_is_a_head_and_leaves_the_tunnel_bytes() {
        let mut b = BytesMut::from(
            &b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x05hello"[..],
        );
        let h = parse_head(&mut b, false, true).unwrap().unwrap();
        assert_eq!(h.parts.status, 101);
        assert_eq!(h.parts.headers["upgrade"], "websocket");
        assert_eq!(&b[..], b"\x81\x05hello");
        // Other interim answers are still skipped before it.
        let mut b =
            BytesMut::from(&b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 101 Switching\r\n\r\n"[..]);
        assert_eq!(
            parse_head(&mut b, false, true)
                .unwrap()
                .unwrap()
                .parts
                .status,
            101
        );
    }

    #[test]
    fn bad_heads_are_refused_by_name() {
        for (text, why) in [
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
                "conflicting",
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
                "Content-Length",
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 1x\r\n\r\n",
                "Content-Length",
            ),
            ("HTTP/1.1 101 Switching\r\n\r\n", "101"),
            ("HTTP/9 200 OK\r\n\r\n", "invalid"),
            ("garbage\r\n\r\n", "invalid"),
        ] {
            let e = head(text, false).unwrap_err().to_string();
            assert!(e.contains(why), "{text:?}: {e}");
        }
        let mut many = String::from("HTTP/1.1 200 OK\r\n");
        for i in 0..=MAX_HEADERS {
            many.push_str(&format!("x-{i}: 1\r\n"));
        }
        many.push_str("\r\n");
        assert!(
            head(&many, false)
                .unwrap_err()
                .to_string()
                .contains("too many")
        );
        // Too large, whether complete or still partial.
        let mut big = format!("HTTP/1.1 200 OK\r\nx-filler: {}\r\n", "a".repeat(MAX_HEAD));
        assert!(
            head(&big, false)
                .unwrap_err()
                .to_string()
                .contains("too large")
        );
        big.push_str("\r\n");
        assert!(
            head(&big, false)
                .unwrap_err()
                .to_string()
                .contains("too large")
        );
    }

    #[test]
    fn interim_responses_are_skipped_and_partial_heads_wait() {
        let mut b = BytesMut::from(
            &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early\r\nlink: x\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-a: b\r\n\r\nhi"[..],
        );
        let h = parse_head(&mut b, false, false).unwrap().unwrap();
        assert_eq!(h.parts.status, 200);
        assert_eq!(h.parts.headers["x-a"], "b");
        assert_eq!(&b[..], b"hi");
        let mut p = BytesMut::from(&b"HTTP/1.1 200 OK\r\ncontent-le"[..]);
        assert!(parse_head(&mut p, false, false).unwrap().is_none());
        assert_eq!(p.len(), 27, "a partial head is left in place");
    }

    #[test]
    fn a_turn_requeues_the_task_once_until_reset() {
        struct Count(std::sync::atomic::AtomicU32);
        impl std::task::Wake for Count {
            fn wake(self: std::sync::Arc<Self>) {
                self.wake_by_ref();
            }
            fn wake_by_ref(self: &std::sync::Arc<Self>) {
                self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let count = std::sync::Arc::new(Count(Default::default()));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let woken = || count.0.load(std::sync::atomic::Ordering::SeqCst);
        let mut t = Turn::default();
        assert!(t.poll_take(&mut cx).is_pending());
        assert_eq!(woken(), 1, "pending with a wake-up, so the task requeues");
        assert!(t.poll_take(&mut cx).is_ready());
        assert!(t.poll_take(&mut cx).is_ready());
        t.reset();
        assert!(t.poll_take(&mut cx).is_pending());
        assert_eq!(woken(), 2);
        let mut first_free = Turn::taken();
        assert!(first_free.poll_take(&mut cx).is_ready());
        assert_eq!(woken(), 2);
    }

    /// The body, the bytes left after it, and the trailer fields.
    type Decoded = (Vec<u8>, Vec<u8>, HeaderMap);

    fn decode_all(input: &[u8], split: usize) -> Result<Decoded, BackendError> {
        let mut dec = Chunked::default();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut trailers = HeaderMap::new();
        let mut rest = input;
        loop {
            match dec.step(&mut buf)? {
                Step::Data(d) => out.extend_from_slice(&d),
                Step::Trailers(t) => {
                    assert!(trailers.is_empty(), "trailers come once");
                    trailers = t;
                }
                Step::Done => return Ok((out, buf.to_vec(), trailers)),
                Step::More => {
                    if rest.is_empty() {
                        return Err(BackendError::Truncated);
                    }
                    let n = split.min(rest.len());
                    buf.extend_from_slice(&rest[..n]);
                    rest = &rest[n..];
                }
            }
        }
    }

    /// The head `encode_head` writes for `headers`, from client 10.0.0.9.
    fn encoded(headers: &[(&str, &str)]) -> String {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let ip = HeaderValue::from_static("10.0.0.9");
        let req = ReqHead {
            upgrade: None,
            method: &Method::GET,
            target: "/a?b",
            headers: &map,
            host: "backend:80",
            forwarded_for: Some(&ip),
        };
        let mut w = Vec::new();
        encode_head(&mut w, &req, false);
        String::from_utf8(w).unwrap()
    }

    #[test]
    fn heads_carry_forwarded_for_on_one_line() {
        // No earlier proxy: one line with the client; the Host the client
        // gave; Expect (answered by hyper) dropped.
        let h = encoded(&[("host", "site"), ("expect", "100-continue"), ("x-a", "1")]);
        assert_eq!(
            h,
            "GET /a?b HTTP/1.1\r\nhost: site\r\nx-a: 1\r\nx-forwarded-for: 10.0.0.9\r\n\r\n"
        );
        // Earlier proxies, on one line or several: joined, this hop last.
        let h = encoded(&[
            ("x-forwarded-for", "203.0.113.7, 198.51.100.1"),
            ("x-forwarded-for", "192.0.2.4"),
        ]);
        assert!(h.contains("host: backend:80\r\n"), "{h}");
        assert_eq!(h.matches("x-forwarded-for").count(), 1, "{h}");
        assert!(
            h.contains("x-forwarded-for: 203.0.113.7, 198.51.100.1, 192.0.2.4, 10.0.0.9\r\n"),
            "{h}"
        );
    }

    #[test]
    fn chunk_lines_are_hex_sizes() {
        let mut b = [0u8; 20];
        assert_eq!(chunk_line(1, &mut b), b"1\r\n");
        assert_eq!(chunk_line(255, &mut b), b"ff\r\n");
        assert_eq!(chunk_line(1 << 20, &mut b), b"100000\r\n");
        assert_eq!(chunk_line(usize::MAX, &mut b), b"ffffffffffffffff\r\n");
        // What the decoder reads back.
        let (body, _, _) =
            decode_all(&[chunk_line(3, &mut b), b"abc\r\n0\r\n\r\n"].concat(), 2).unwrap();
        assert_eq!(body, b"abc");
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_read_boundaries() {
        let wire =
            b"5\r\nhello\r\n1;ext=1\r\n \r\nB\r\n0123456789a\r\n0\r\nx-trailer: t\r\n\r\nNEXT";
        for split in 1..wire.len() {
            let (body, left, trailers) = decode_all(wire, split).unwrap();
            assert_eq!(body, b"hello 0123456789a", "split {split}");
            assert_eq!(trailers.len(), 1);
            assert_eq!(trailers["x-trailer"], "t", "split {split}");
            // Nothing past the body is consumed: the next response's bytes.
            assert!(b"NEXT".starts_with(&left), "split {split}: {left:?}");
        }
        // No trailer section: no trailers step.
        let (body, left, trailers) = decode_all(b"2\r\nhi\r\n0\r\n\r\nX", 3).unwrap();
        assert_eq!(body, b"hi");
        assert!(b"X".starts_with(&left));
        assert!(trailers.is_empty());
        // Broken or oversized trailer sections are refused by name.
        let bad = |wire: &[u8]| match decode_all(wire, 64) {
            Err(BackendError::Malformed(m)) => m,
            other => panic!("{other:?}"),
        };
        assert_eq!(bad(b"0\r\nno colon\r\n\r\n"), "invalid trailer section");
        let many: String = (0..40).map(|i| format!("t{i}: v\r\n")).collect();
        assert_eq!(
            bad(format!("0\r\n{many}\r\n").as_bytes()),
            "too many trailer fields"
        );
        let huge = format!("0\r\nx: {}", "v".repeat(MAX_TRAILERS + 1));
        assert_eq!(bad(huge.as_bytes()), "trailer section too large");
        assert!(decode_all(b"zz\r\n", 64).is_err());
        assert!(decode_all(b"3\r\nabcX\r\n", 64).is_err());
        assert!(matches!(
            decode_all(b"5\r\nab", 64),
            Err(BackendError::Truncated)
        ));
        let long = format!("1{}\r\n", " ".repeat(MAX_CHUNK_LINE + 10));
        assert!(decode_all(long.as_bytes(), 8192).is_err());
    }
}
