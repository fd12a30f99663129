//! Finding 10 of the trust review: where HAProxy answers 400/422/502 the
//! dispatcher forwarded. Raw bytes both ways through the real `shoal
//! dispatch`, each case as RFC 9110/9112 say.

mod dispatch_common;

use dispatch_common::Dispatcher;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A backend that answers by path with raw bytes and closes; it records
/// the request heads it saw.
struct Backend {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn backend() -> Backend {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let sn = seen.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let sn = sn.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let head = loop {
                    let mut b = [0u8; 4096];
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&b[..n]),
                    }
                    if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break String::from_utf8_lossy(&buf[..p + 4]).into_owned();
                    }
                };
                sn.lock().unwrap().push(head.clone());
                let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                let reply: &[u8] = match path.as_str() {
                    "/gzip-chunked" => b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                    "/chunked-twice" => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                    "/cl55" => b"HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\nhello",
                    "/bad-first-chunk" => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
                    _ => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                };
                let _ = s.write_all(reply).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Backend { addr, seen, task }
}

/// Sends raw bytes and reads the whole answer (the request asks to close).
async fn raw(d: &Dispatcher, request: &str) -> String {
    let mut s = TcpStream::connect(d.host_port()).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn status(answer: &str) -> u16 {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_and_responses_are_held_to_rfc_9112() {
    let b = backend().await;
    let d = Dispatcher::start_raw(&b.addr.to_string(), &["--eject-after-5xx", "0"]);
    let req = |line: &str, fields: &str| format!("{line}\r\n{fields}connection: close\r\n\r\n");

    // Two Host headers: 400.
    let a = raw(&d, &req("GET /a HTTP/1.1", "host: site\r\nhost: other\r\n")).await;
    assert_eq!(status(&a), 400, "{a}");
    // An absolute-form target naming another host than Host: 400; naming
    // the same one: forwarded in origin-form with that Host.
    let a = raw(
        &d,
        &req("GET http://other.example/x HTTP/1.1", "host: site\r\n"),
    )
    .await;
    assert_eq!(status(&a), 400, "{a}");
    let a = raw(&d, &req("GET http://site/x HTTP/1.1", "host: site\r\n")).await;
    assert_eq!(status(&a), 200, "{a}");
    // Authority-form outside CONNECT: 400 (it was forwarded as `GET /`).
    let a = raw(&d, &req("GET other.example:80 HTTP/1.1", "host: site\r\n")).await;
    assert_eq!(status(&a), 400, "{a}");
    // A transfer coding the dispatcher would drop: 501; chunked twice: 400.
    let body = "5\r\nhello\r\n0\r\n\r\n";
    let a = raw(
        &d,
        &format!("POST /u HTTP/1.1\r\nhost: site\r\ntransfer-encoding: gzip, chunked\r\nconnection: close\r\n\r\n{body}"),
    )
    .await;
    assert_eq!(status(&a), 501, "{a}");
    let a = raw(
        &d,
        &format!("POST /u HTTP/1.1\r\nhost: site\r\ntransfer-encoding: chunked, chunked\r\nconnection: close\r\n\r\n{body}"),
    )
    .await;
    assert_eq!(status(&a), 400, "{a}");
    // None of the refused requests reached the backend: it saw the one
    // forwarded, in origin-form with the target's host.
    {
        let seen = b.seen.lock().unwrap();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert!(seen[0].starts_with("GET /x HTTP/1.1\r\n"), "{}", seen[0]);
        assert!(
            seen[0].to_ascii_lowercase().contains("host: site\r\n"),
            "{}",
            seen[0]
        );
    }

    // A backend's codings other than one chunked: 502, never the body with
    // its gzip coding silently dropped.
    for path in ["/gzip-chunked", "/chunked-twice"] {
        let a = raw(&d, &req(&format!("GET {path} HTTP/1.1"), "host: site\r\n")).await;
        assert_eq!(status(&a), 502, "{path}: {a}");
    }
    // A backend's `Content-Length: 5, 5` goes on as one value.
    let a = raw(&d, &req("GET /cl55 HTTP/1.1", "host: site\r\n")).await;
    assert_eq!(status(&a), 200, "{a}");
    let lower = a.to_ascii_lowercase();
    assert!(lower.contains("content-length: 5\r\n"), "{a}");
    assert!(!lower.contains("5, 5"), "{a}");
    assert!(a.ends_with("hello"), "{a}");
    // A body malformed from its first byte: a 502 with a status line.
    let a = raw(&d, &req("GET /bad-first-chunk HTTP/1.1", "host: site\r\n")).await;
    assert_eq!(status(&a), 502, "{a}");
}
