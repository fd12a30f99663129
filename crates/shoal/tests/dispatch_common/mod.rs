//! Helpers for the dispatcher's integration tests: tiny hyper backends on
//! ephemeral loopback ports that say who they are, the real `shoal` binary,
//! and a keep-alive client.
#![allow(dead_code)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client as HClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

pub type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// Counters of one test backend.
#[derive(Debug, Default)]
pub struct Stats {
    pub served: AtomicU64,
    pub in_flight: AtomicU64,
    pub max_in_flight: AtomicU64,
    /// Headers of the last request, lower-case names.
    pub last_headers: Mutex<HashMap<String, String>>,
    /// `/healthz` answers 503 while set (200 otherwise).
    pub failing_health: AtomicBool,
    /// `/healthz` requests seen (not counted in the other figures).
    pub health_checks: AtomicU64,
}

/// A backend that answers with its name. Paths:
/// `/sleep/MS/...` waits MS ms first; `/big/N` sends N bytes in 64 KiB chunks;
/// `/echo` streams the request body back; `/reset` closes without answering;
/// `/cut` sends headers and half a body, then resets; `/gate` sends one
/// chunk then waits for `open_gate`; `/healthz` answers 200, or 503 while
/// `stats.failing_health` is set. Everything else: 200 with the name.
pub struct TestBackend {
    pub name: String,
    pub addr: SocketAddr,
    pub stats: Arc<Stats>,
    gate: Arc<tokio::sync::Notify>,
    conns: Arc<Mutex<JoinSet<()>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl TestBackend {
    pub async fn start(name: &str) -> TestBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(Stats::default());
        let gate = Arc::new(tokio::sync::Notify::new());
        let conns = Arc::new(Mutex::new(JoinSet::new()));
        let (n, s, g, c) = (name.to_string(), stats.clone(), gate.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (n, s, g) = (n.clone(), s.clone(), g.clone());
                c.lock().unwrap().spawn(async move {
                    let svc = service_fn(move |req| serve(n.clone(), s.clone(), g.clone(), req));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        TestBackend {
            name: name.to_string(),
            addr,
            stats,
            gate,
            conns,
            accept,
        }
    }

    pub fn spec(&self) -> String {
        self.addr.to_string()
    }

    pub fn open_gate(&self) {
        self.gate.notify_waiters();
    }

    /// Kills the backend: stops accepting and drops every connection.
    /// Returns how many requests were in flight at that moment.
    pub fn kill(&self) -> u64 {
        let n = self.stats.in_flight.load(SeqCst);
        self.accept.abort();
        self.conns.lock().unwrap().abort_all();
        n
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        self.accept.abort();
        if let Ok(mut c) = self.conns.lock() {
            c.abort_all();
        }
    }
}

struct InFlight(Arc<Stats>);
impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, SeqCst);
    }
}

async fn serve(
    name: String,
    stats: Arc<Stats>,
    gate: Arc<tokio::sync::Notify>,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::io::Error> {
    if req.uri().path() == "/healthz" {
        stats.health_checks.fetch_add(1, SeqCst);
        let code = if stats.failing_health.load(SeqCst) {
            503
        } else {
            200
        };
        return Ok(Response::builder()
            .status(code)
            .body(
                Full::new(Bytes::new())
                    .map_err(|never| match never {})
                    .boxed(),
            )
            .unwrap());
    }
    let now = stats.in_flight.fetch_add(1, SeqCst) + 1;
    stats.max_in_flight.fetch_max(now, SeqCst);
    let guard = InFlight(stats.clone());
    *stats.last_headers.lock().unwrap() = req
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let path = req.uri().path().to_string();
    let mut parts = path.trim_start_matches('/').split('/');
    let first = parts.next().unwrap_or("");
    let reply = |body: Body| {
        Response::builder()
            .header("x-backend", name.as_str())
            .body(body)
            .unwrap()
    };
    let full = |b: Bytes| Full::new(b).map_err(|never| match never {}).boxed();
    let resp = match first {
        "sleep" => {
            let ms: u64 = parts.next().and_then(|m| m.parse().ok()).unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            reply(full(Bytes::from(name.clone())))
        }
        "big" => {
            let n: usize = parts.next().and_then(|m| m.parse().ok()).unwrap_or(0);
            let chunk = Bytes::from(vec![b'x'; 65536]);
            let frames = (0..n.div_ceil(65536)).map(move |i| {
                let len = (n - i * 65536).min(65536);
                Ok::<_, std::io::Error>(Frame::data(chunk.slice(..len)))
            });
            let mut r = reply(BodyExt::boxed(StreamBody::new(futures_util::stream::iter(
                frames,
            ))));
            r.headers_mut()
                .insert("content-length", n.to_string().parse().unwrap());
            r
        }
        "echo" => {
            let body = req.into_body().map_err(std::io::Error::other).boxed();
            reply(body)
        }
        "reset" => {
            stats.served.fetch_add(1, SeqCst);
            return Err(std::io::Error::other("reset"));
        }
        "cut" => {
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(2);
            tokio::spawn(async move {
                let _ = tx
                    .send(Ok(Frame::data(Bytes::from(vec![b'c'; 1000]))))
                    .await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = tx.send(Err(std::io::Error::other("cut"))).await;
            });
            let mut r = reply(BodyExt::boxed(StreamBody::new(rx_stream(rx))));
            r.headers_mut()
                .insert("content-length", "2000".parse().unwrap());
            r
        }
        "gate" => {
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(2);
            let notified = gate.clone();
            tokio::spawn(async move {
                let fut = notified.notified();
                tokio::pin!(fut);
                fut.as_mut().enable();
                let _ = tx
                    .send(Ok(Frame::data(Bytes::from_static(b"first-"))))
                    .await;
                fut.await;
                let _ = tx
                    .send(Ok(Frame::data(Bytes::from_static(b"second"))))
                    .await;
            });
            reply(BodyExt::boxed(StreamBody::new(rx_stream(rx))))
        }
        _ => reply(full(Bytes::from(name.clone()))),
    };
    stats.served.fetch_add(1, SeqCst);
    drop(guard);
    Ok(resp)
}

fn rx_stream<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|t| (t, rx)) })
}

/// The real binary running `shoal dispatch`; killed on drop.
pub struct Dispatcher {
    pub child: Child,
    pub url: String,
    pub admin: String,
}

impl Dispatcher {
    /// Starts `shoal dispatch --listen 127.0.0.1:0 --admin 127.0.0.1:0 --backends ... ARGS`
    /// and waits (with a deadline) for its "listening" line.
    pub fn start(backends: &[&TestBackend], args: &[&str]) -> Dispatcher {
        let list: Vec<String> = backends.iter().map(|b| b.spec()).collect();
        Self::start_raw(&list.join(","), args)
    }

    pub fn start_raw(backends: &str, args: &[&str]) -> Dispatcher {
        Self::start_at("127.0.0.1:0", "127.0.0.1:0", backends, args)
    }

    /// As `start_raw`, listening on `listen` with the admin listener on `admin`.
    /// Two threads unless ARGS give --threads.
    pub fn start_at(listen: &str, admin: &str, backends: &str, args: &[&str]) -> Dispatcher {
        let threads: &[&str] = if args.contains(&"--threads") {
            &[]
        } else {
            &["--threads", "2"]
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_shoal"))
            .args([
                "dispatch",
                "--listen",
                listen,
                "--admin",
                admin,
                "--backends",
                backends,
            ])
            .args(threads)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning shoal dispatch");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("shoal dispatch did not report its address within 20 s");
        let urls: Vec<String> = line
            .split_whitespace()
            .filter(|w| w.starts_with("http://"))
            .map(str::to_string)
            .collect();
        assert_eq!(urls.len(), 2, "unexpected first line: {line:?}");
        Dispatcher {
            child,
            url: urls[0].clone(),
            admin: urls[1].clone(),
        }
    }

    pub fn host_port(&self) -> String {
        self.url.trim_start_matches("http://").to_string()
    }
}

impl Drop for Dispatcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A keep-alive HTTP/1.1 client.
#[derive(Clone)]
pub struct Client {
    inner: HClient<HttpConnector, Full<Bytes>>,
}

pub struct Reply {
    pub status: StatusCode,
    pub backend: String,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Default for Client {
    fn default() -> Self {
        Self::new()
    }
}

impl Client {
    pub fn new() -> Self {
        Self {
            inner: HClient::builder(TokioExecutor::new())
                .pool_max_idle_per_host(64)
                .build_http(),
        }
    }

    /// A client that opens a new connection for every request.
    pub fn fresh() -> Self {
        Self {
            inner: HClient::builder(TokioExecutor::new())
                .pool_max_idle_per_host(0)
                .build_http(),
        }
    }

    pub async fn get(&self, url: &str) -> Result<Reply, String> {
        self.send(Request::get(url).body(Full::new(Bytes::new())).unwrap())
            .await
    }

    pub async fn send(&self, req: Request<Full<Bytes>>) -> Result<Reply, String> {
        let resp = tokio::time::timeout(Duration::from_secs(30), self.inner.request(req))
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|e| format!("{e:?}"))?;
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("body: {e:?}"))?
            .to_bytes();
        Ok(Reply {
            status: parts.status,
            backend: parts
                .headers
                .get("x-backend")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string(),
            headers: parts.headers,
            body,
        })
    }

    /// PUTs a backend list (JSON) to the admin listener.
    pub async fn put_backends(&self, admin: &str, json: serde_json::Value) -> Reply {
        let req = Request::put(format!("{admin}/backends"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(json.to_string())))
            .unwrap();
        let r = self.send(req).await.expect("admin PUT /backends");
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        r
    }
}

/// Waits for a condition, polling, until a deadline.
pub async fn wait_until<F: FnMut() -> bool>(what: &str, deadline: Duration, mut f: F) {
    let end = Instant::now() + deadline;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Total requests in flight over some backends.
pub fn in_flight(bs: &[&TestBackend]) -> u64 {
    bs.iter().map(|b| b.stats.in_flight.load(SeqCst)).sum()
}

/// Runs `shoal ARGS`, which must succeed, and parses what it prints as JSON.
pub fn shoal_json<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "shoal {:?}: {}",
        args.iter().map(|a| a.as_ref()).collect::<Vec<_>>(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}
