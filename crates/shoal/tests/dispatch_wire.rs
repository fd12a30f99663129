//! The dispatcher's backend-side HTTP/1.1 against a backend that answers
//! from a script, byte for byte: every response framing RFC 9112 allows,
//! broken responses, request bodies with and without a length, and idle
//! keep-alive connections the backend closes.

mod dispatch_common;

use bytes::Bytes;
use dispatch_common::{Dispatcher, wait_until};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the scripted backend saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    head: String,
    body: Vec<u8>,
    /// The trailer section of a chunked body, as sent.
    trailers: String,
}

/// A backend that writes raw responses chosen by path.
struct RawBackend {
    addr: SocketAddr,
    connections: Arc<AtomicU64>,
    /// "/bye" connections the dispatcher closed after the backend did.
    released: Arc<AtomicU64>,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Reads until `buf` holds `n` bytes; false at end of file.
async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>, n: usize) -> bool {
    while buf.len() < n {
        let mut chunk = [0u8; 16384];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
        }
    }
    true
}

/// Reads a request's head and body off `buf` and `s`; `None` at end of file.
async fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Seen> {
    let end = loop {
        if let Some(p) = find(buf, b"\r\n\r\n") {
            break p + 4;
        }
        let want = buf.len() + 1;
        if !fill(s, buf, want).await {
            return None;
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    buf.drain(..end);
    let mut body = Vec::new();
    let mut trailers = String::new();
    if head.contains(" /early ") {
        // Answered without reading the body (see the backend).
    } else if let Some(n) = header(&head, "content-length") {
        let n: usize = n.parse().unwrap();
        if !fill(s, buf, n).await {
            return None;
        }
        body = buf.drain(..n).collect();
    } else if header(&head, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        loop {
            let line_end = loop {
                if let Some(p) = find(buf, b"\r\n") {
                    break p;
                }
                let want = buf.len() + 1;
                if !fill(s, buf, want).await {
                    return None;
                }
            };
            let size_text = String::from_utf8_lossy(&buf[..line_end]).to_string();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
                .expect("chunk size");
            buf.drain(..line_end + 2);
            if size == 0 {
                // The trailer section, up to its empty line.
                let end = loop {
                    if buf.starts_with(b"\r\n") {
                        break 2;
                    }
                    if let Some(p) = find(buf, b"\r\n\r\n") {
                        break p + 4;
                    }
                    let want = buf.len() + 1;
                    if !fill(s, buf, want).await {
                        return None;
                    }
                };
                trailers = String::from_utf8_lossy(&buf[..end]).to_string();
                buf.drain(..end);
                break;
            }
            if !fill(s, buf, size + 2).await {
                return None;
            }
            body.extend(buf.drain(..size));
            buf.drain(..2);
        }
    }
    Some(Seen {
        head,
        body,
        trailers,
    })
}

async fn raw_backend() -> RawBackend {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let connections = Arc::new(AtomicU64::new(0));
    let released = Arc::new(AtomicU64::new(0));
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let (c, sn, rel) = (connections.clone(), seen.clone(), released.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            c.fetch_add(1, SeqCst);
            let (sn, rel) = (sn.clone(), rel.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut on_this_connection = 0;
                while let Some(req) = read_request(&mut s, &mut buf).await {
                    on_this_connection += 1;
                    sn.lock().unwrap().push(req.clone());
                    let path = req.head.split_whitespace().nth(1).unwrap_or("").to_string();
                    let reply: Vec<u8> = match path.as_str() {
                        "/chunked" => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-trailer: t\r\n\r\n".to_vec(),
                        "/close" => b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end".to_vec(),
                        "/head" => b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n".to_vec(),
                        "/204" => b"HTTP/1.1 204 No Content\r\nx-a: 1\r\n\r\n".to_vec(),
                        "/304" => b"HTTP/1.1 304 Not Modified\r\netag: \"v1\"\r\n\r\n".to_vec(),
                        "/hints" => b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
                        "/bad-length" => b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd".to_vec(),
                        "/garbage" => b"NOT HTTP AT ALL\r\n\r\n".to_vec(),
                        "/short" => b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc".to_vec(),
                        "/trailers" => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-checksum\r\n\r\n2\r\nok\r\n0\r\nx-checksum: abc\r\n\r\n".to_vec(),
                        // Refuses the upload from its head alone, then
                        // neither reads the body nor closes (a backend
                        // busy elsewhere, or a careless one).
                        "/early" => {
                            let _ = s
                                .write_all(b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 3\r\n\r\nbig")
                                .await;
                            tokio::time::sleep(Duration::from_secs(120)).await;
                            return;
                        }
                        "/upload" => {
                            let framing = if header(&req.head, "transfer-encoding").is_some() {
                                "chunked"
                            } else {
                                "length"
                            };
                            let mut r = format!(
                                "HTTP/1.1 200 OK\r\nx-framing: {framing}\r\ncontent-length: {}\r\n\r\n",
                                req.body.len()
                            )
                            .into_bytes();
                            r.extend_from_slice(&req.body);
                            r
                        }
                        // Answers the first request of a connection only;
                        // later ones are read and the connection closed.
                        "/flaky" if on_this_connection > 1 => return,
                        _ => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
                    };
                    if s.write_all(&reply).await.is_err() {
                        return;
                    }
                    if matches!(
                        path.as_str(),
                        "/close" | "/bad-length" | "/garbage" | "/short" | "/bye"
                    ) {
                        // "/bye": a keep-alive response, then the backend
                        // closes the idle connection, and counts it
                        // released once the dispatcher closes its side.
                        let _ = s.shutdown().await;
                        if path == "/bye" {
                            let mut rest = [0u8; 64];
                            if let Ok(Ok(0)) =
                                tokio::time::timeout(Duration::from_secs(20), s.read(&mut rest))
                                    .await
                            {
                                rel.fetch_add(1, SeqCst);
                            }
                        }
                        return;
                    }
                }
            });
        }
    });
    RawBackend {
        addr,
        connections,
        released,
        seen,
        task,
    }
}

type ReqBody = BoxBody<Bytes, Infallible>;

/// One keep-alive client connection to the dispatcher (so that every
/// request lands on the same dispatcher thread and its idle connections).
async fn client(d: &Dispatcher) -> SendRequest<ReqBody> {
    let s = TcpStream::connect(d.host_port()).await.unwrap();
    let (tx, conn) = http1::handshake(TokioIo::new(s)).await.unwrap();
    tokio::spawn(conn);
    tx
}

async fn ask(
    tx: &mut SendRequest<ReqBody>,
    method: Method,
    path: &str,
    body: ReqBody,
) -> Result<(StatusCode, HeaderMap, Bytes), String> {
    tx.ready().await.map_err(|e| e.to_string())?;
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "wire.test")
        .body(body)
        .unwrap();
    let fut = tx.send_request(req);
    let resp = tokio::time::timeout(Duration::from_secs(20), fut)
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let (parts, b) = resp.into_parts();
    let body = tokio::time::timeout(Duration::from_secs(20), b.collect())
        .await
        .map_err(|_| "body timed out".to_string())?
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok((parts.status, parts.headers, body))
}

fn empty() -> ReqBody {
    Full::new(Bytes::new()).boxed()
}

fn full(b: &[u8]) -> ReqBody {
    Full::new(Bytes::copy_from_slice(b)).boxed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_framing_reaches_the_client_intact() {
    let b = raw_backend().await;
    let d = Dispatcher::start_raw(&b.addr.to_string(), &[]);
    let mut c = client(&d).await;
    let (st, _, body) = ask(&mut c, Method::GET, "/chunked", empty()).await.unwrap();
    assert_eq!((st, &body[..]), (StatusCode::OK, &b"hello world"[..]));
    // An HTTP/1.0 body delimited by the close reaches the client whole.
    let (st, _, body) = ask(&mut c, Method::GET, "/close", empty()).await.unwrap();
    assert_eq!((st, &body[..]), (StatusCode::OK, &b"until the end"[..]));
    // HEAD: the length of the body that was not sent is passed on.
    let (st, h, body) = ask(&mut c, Method::HEAD, "/head", empty()).await.unwrap();
    assert_eq!(st, StatusCode::OK);
    assert_eq!(h["content-length"], "1234");
    assert!(body.is_empty());
    let (st, h, body) = ask(&mut c, Method::GET, "/204", empty()).await.unwrap();
    assert_eq!(
        (st, h["x-a"].to_str().unwrap()),
        (StatusCode::NO_CONTENT, "1")
    );
    assert!(body.is_empty());
    let (st, h, _) = ask(&mut c, Method::GET, "/304", empty()).await.unwrap();
    assert_eq!(
        (st, h["etag"].to_str().unwrap()),
        (StatusCode::NOT_MODIFIED, "\"v1\"")
    );
    // An interim 103 is not mistaken for the response.
    let (st, _, body) = ask(&mut c, Method::GET, "/hints", empty()).await.unwrap();
    assert_eq!((st, &body[..]), (StatusCode::OK, &b"ok"[..]));
    // Every keep-alive response left its connection reusable: only the
    // close-delimited one needed a second connection.
    assert_eq!(b.connections.load(SeqCst), 2);
    // The backend saw well-formed requests with the Host the client gave.
    for s in b.seen.lock().unwrap().iter() {
        assert!(s.head.contains(" HTTP/1.1\r\n"), "{}", s.head);
        assert_eq!(header(&s.head, "host"), Some("wire.test"), "{}", s.head);
        assert_eq!(header(&s.head, "x-forwarded-for"), Some("127.0.0.1"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_responses_give_502_or_a_cut_body_and_harm_no_one_else() {
    let b = raw_backend().await;
    let d = Dispatcher::start_raw(&b.addr.to_string(), &["--eject-after-5xx", "0"]);
    let mut c = client(&d).await;
    for path in ["/bad-length", "/garbage"] {
        let (st, _, body) = ask(&mut c, Method::GET, path, empty()).await.unwrap();
        assert_eq!(st, StatusCode::BAD_GATEWAY, "{path}: {body:?}");
    }
    // A body shorter than its Content-Length: the client sees the cut
    // rather than a silently short body.
    assert!(ask(&mut c, Method::GET, "/short", empty()).await.is_err());
    let mut c = client(&d).await;
    let (st, _, body) = ask(&mut c, Method::GET, "/plain", empty()).await.unwrap();
    assert_eq!((st, &body[..]), (StatusCode::OK, &b"ok"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_keep_their_framing() {
    let b = raw_backend().await;
    let d = Dispatcher::start_raw(&b.addr.to_string(), &[]);
    let mut c = client(&d).await;
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let (st, h, body) = ask(&mut c, Method::POST, "/upload", full(&payload))
        .await
        .unwrap();
    assert_eq!(
        (st, h["x-framing"].to_str().unwrap()),
        (StatusCode::OK, "length")
    );
    assert!(body == payload);
    // Without a length the client's chunks go on chunked.
    let frames: Vec<Result<Frame<Bytes>, Infallible>> = payload
        .chunks(70_000)
        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let streamed = StreamBody::new(futures_util::stream::iter(frames)).boxed();
    let (st, h, body) = ask(&mut c, Method::PUT, "/upload", streamed).await.unwrap();
    assert_eq!(
        (st, h["x-framing"].to_str().unwrap()),
        (StatusCode::OK, "chunked")
    );
    assert!(body == payload);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_idle_connections_are_skipped_and_only_idempotent_requests_replayed() {
    let b = raw_backend().await;
    let d = Dispatcher::start_raw(&b.addr.to_string(), &["--eject-after-5xx", "0"]);
    let mut c = client(&d).await;
    // The backend closes its connection after answering. The dispatcher
    // notices on its own, without a request on it (the idle sweep and the
    // check before reuse are the same test, `BackendConn::is_usable`), and
    // closes its side; so even a POST, never replayed, then goes through
    // on a new connection.
    let (st, _, _) = ask(&mut c, Method::GET, "/bye", empty()).await.unwrap();
    assert_eq!(st, StatusCode::OK);
    wait_until(
        "the dispatcher to drop the connection the backend closed",
        Duration::from_secs(10),
        || b.released.load(SeqCst) == 1,
    )
    .await;
    let (st, _, body) = ask(&mut c, Method::POST, "/plain", full(b"x"))
        .await
        .unwrap();
    assert_eq!((st, &body[..]), (StatusCode::OK, &b"ok"[..]));
    assert_eq!(b.connections.load(SeqCst), 2);

    // "/flaky" closes a reused connection once it has read the request:
    // the race a backend's idle timeout makes. A GET is sent again on a
    // new connection...
    let (st, _, _) = ask(&mut c, Method::GET, "/flaky", empty()).await.unwrap();
    assert_eq!(st, StatusCode::OK);
    let before = b.connections.load(SeqCst);
    let (st, _, _) = ask(&mut c, Method::GET, "/flaky", empty()).await.unwrap();
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        b.connections.load(SeqCst),
        before + 1,
        "replayed on a new connection"
    );
    // ...and so is a DELETE without a body (idempotent)...
    let (st, _, _) = ask(&mut c, Method::DELETE, "/flaky", empty())
        .await
        .unwrap();
    assert_eq!(st, StatusCode::OK);
    // ...but not a POST, which the backend may have acted on.
    let (st, _, _) = ask(&mut c, Method::GET, "/flaky", empty()).await.unwrap();
    assert_eq!(st, StatusCode::OK);
    let (st, _, _) = ask(&mut c, Method::POST, "/flaky", full(b"once"))
        .await
        .unwrap();
    assert_eq!(st, StatusCode::BAD_GATEWAY);
    let posts = b
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.head.starts_with("POST /flaky"))
        .count();
    assert_eq!(posts, 1, "the POST reached the backend exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_pass_both_ways_to_those_who_accept_them() {
    let b = raw_backend().await;
    let d = Dispatcher::start_raw(&b.addr.to_string(), &[]);
    let mut c = client(&d).await;
    // A client that accepts trailers (TE: trailers) gets the backend's.
    let get = |te: bool| {
        let mut r = Request::get("/trailers").header("host", "wire.test");
        if te {
            r = r.header("te", "trailers");
        }
        r.body(empty()).unwrap()
    };
    c.ready().await.unwrap();
    let resp = c.send_request(get(true)).await.unwrap();
    assert_eq!(resp.headers()["trailer"], "x-checksum");
    let got = resp.into_body().collect().await.unwrap();
    let t = got.trailers().cloned().expect("trailers reach the client");
    assert_eq!(t["x-checksum"], "abc");
    assert_eq!(&got.to_bytes()[..], b"ok");
    // The backend was told the client accepts them.
    let seen = b.seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(header(&seen.head, "te"), Some("trailers"), "{}", seen.head);
    // One that does not gets the body without them.
    c.ready().await.unwrap();
    let resp = c.send_request(get(false)).await.unwrap();
    let got = resp.into_body().collect().await.unwrap();
    assert!(got.trailers().is_none());
    assert_eq!(&got.to_bytes()[..], b"ok");

    // A chunked upload's trailer fields reach the backend after its last
    // chunk.
    let mut fields = HeaderMap::new();
    fields.insert("x-upload-sum", "42".parse().unwrap());
    let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
        Ok(Frame::data(Bytes::from_static(b"part one,"))),
        Ok(Frame::data(Bytes::from_static(b" part two"))),
        Ok(Frame::trailers(fields)),
    ];
    let req = Request::put("/upload")
        .header("host", "wire.test")
        .header("trailer", "x-upload-sum")
        .body(StreamBody::new(futures_util::stream::iter(frames)).boxed())
        .unwrap();
    c.ready().await.unwrap();
    let resp = c.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"part one, part two");
    let seen = b.seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(seen.trailers, "x-upload-sum: 42\r\n\r\n", "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_reaches_the_client_while_its_upload_is_unread() {
    let b = raw_backend().await;
    // The backend timeout is long: the answer must not wait for it.
    let d = Dispatcher::start_raw(&b.addr.to_string(), &["--backend-timeout", "60s"]);
    // A raw client: it keeps sending chunks of its upload (far more than
    // the socket buffers hold) while it reads, as a browser would.
    let s = TcpStream::connect(d.host_port()).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        let head = b"POST /early HTTP/1.1\r\nhost: wire.test\r\ntransfer-encoding: chunked\r\n\r\n";
        wr.write_all(head).await?;
        let chunk = [&b"100000\r\n"[..], &vec![b'x'; 1 << 20], b"\r\n"].concat();
        for _ in 0..256 {
            wr.write_all(&chunk).await?;
        }
        Ok::<_, std::io::Error>(())
    });
    let mut got = Vec::new();
    let answered = tokio::time::timeout(Duration::from_secs(20), async {
        let mut buf = [0u8; 4096];
        while !(got.starts_with(b"HTTP/1.1 413") && got.ends_with(b"\r\n\r\nbig")) {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        answered.is_ok() && got.starts_with(b"HTTP/1.1 413") && got.ends_with(b"big"),
        "no early answer within 20 s: {:?}",
        String::from_utf8_lossy(&got)
    );
    writer.abort();
    // That connection, its request half sent, is not reused.
    let mut c = client(&d).await;
    let (st, _, _) = ask(&mut c, Method::GET, "/plain", empty()).await.unwrap();
    assert_eq!(st, StatusCode::OK);
    assert_eq!(b.connections.load(SeqCst), 2);
}
