//! The dispatcher under change and under bad input, through the real binary:
//! backends added, removed and killed while load runs; malformed requests,
//! oversized headers, backend resets; header handling and streaming; and
//! `shoal route` / `shoal sim locality` output.

mod dispatch_common;

use bytes::Bytes;
use dispatch_common::*;
use http_body_util::Full;
use hyper::Request;
use std::io::{Read, Write};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_change_under_load_without_failed_requests() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let k = TestBackend::start("k").await; // will be killed
    let n = TestBackend::start("n").await; // will be added
    let d = Dispatcher::start(&[&a, &b, &k], &["--algo", "url-hash", "--replicas", "2"]);
    let c = Client::new();
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut load = Vec::new();
    for w in 0..6 {
        let (c, stop, ok, failed, base) = (
            c.clone(),
            stop.clone(),
            ok.clone(),
            failed.clone(),
            d.url.clone(),
        );
        load.push(tokio::spawn(async move {
            let mut i = 0u64;
            let end = Instant::now() + Duration::from_secs(20);
            while !stop.load(SeqCst) && Instant::now() < end {
                i += 1;
                match c.get(&format!("{base}/sleep/3/w{w}/{}", i % 50)).await {
                    Ok(r) if r.status == 200 => {
                        ok.fetch_add(1, SeqCst);
                    }
                    Ok(r) => failed.lock().unwrap().push(format!("status {}", r.status)),
                    Err(e) => failed.lock().unwrap().push(e),
                }
            }
        }));
    }
    let phase = |min: u64| {
        let ok = ok.clone();
        async move {
            let target = ok.load(SeqCst) + min;
            wait_until("load progresses", Duration::from_secs(20), || {
                ok.load(SeqCst) >= target
            })
            .await;
        }
    };
    phase(200).await;
    // Add n.
    c.put_backends(
        &d.admin,
        serde_json::json!([{"addr": a.spec()}, {"addr": b.spec()}, {"addr": k.spec()}, {"addr": n.spec()}]),
    )
    .await;
    phase(200).await;
    assert!(
        n.stats.served.load(SeqCst) > 0,
        "added backend got no requests"
    );
    // Remove a (gracefully: its in-flight requests finish).
    c.put_backends(
        &d.admin,
        serde_json::json!([{"addr": b.spec()}, {"addr": k.spec()}, {"addr": n.spec()}]),
    )
    .await;
    let a_after_removal = a.stats.served.load(SeqCst);
    phase(200).await;
    // Kill k abruptly.
    let in_flight_on_k = k.kill();
    phase(300).await;
    stop.store(true, SeqCst);
    for h in load {
        h.await.unwrap();
    }
    let failed = failed.lock().unwrap().clone();
    assert!(
        failed.len() as u64 <= in_flight_on_k,
        "{} failed requests, only {in_flight_on_k} were in flight on the killed backend: {failed:?}",
        failed.len()
    );
    // a got nothing new after removal (in-flight ones may have completed).
    assert!(a.stats.served.load(SeqCst) <= a_after_removal + 6);
    eprintln!(
        "ok {} failed {} (in flight on killed: {in_flight_on_k})",
        ok.load(SeqCst),
        failed.len()
    );
}

fn raw_exchange(addr: &str, bytes: &[u8]) -> (String, bool) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    // Read until the server closes (the proof that it closed).
    let closed = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_400_or_431_and_close() {
    let a = TestBackend::start("a").await;
    let d = Dispatcher::start(&[&a], &[]);
    let hp = d.host_port();
    let (resp, closed) = raw_exchange(&hp, b"GARBAGE\r\n\r\n");
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(closed);
    let (resp, closed) = raw_exchange(&hp, b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n");
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(closed);
    let mut big = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 100_000));
    big.extend_from_slice(b"\r\n\r\n");
    let (resp, closed) = raw_exchange(&hp, &big);
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
    assert!(closed);
    // Binary noise does not bring it down.
    let noise: Vec<u8> = (0..5000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let _ = raw_exchange(&hp, &noise);
    let c = Client::new();
    assert_eq!(c.get(&format!("{}/ok", d.url)).await.unwrap().status, 200);
    let m = c.get(&format!("{}/metrics", d.admin)).await.unwrap();
    let text = String::from_utf8_lossy(&m.body);
    assert!(
        text.contains("shoal_dispatch_errors_total{kind=\"header_too_large\"} 1"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_reset_is_502_for_that_client_only() {
    let a = TestBackend::start("a").await;
    let d = Dispatcher::start(&[&a], &["--eject-after-5xx", "0"]);
    let c = Client::new();
    // Others keep being served while one client's backend resets.
    let bg = {
        let (c, u) = (c.clone(), format!("{}/sleep/5/fine", d.url));
        tokio::spawn(async move {
            let mut n = 0;
            for _ in 0..40 {
                assert_eq!(c.get(&u).await.unwrap().status, 200);
                n += 1;
            }
            n
        })
    };
    let r = c.get(&format!("{}/reset", d.url)).await.unwrap();
    assert_eq!(r.status, 502);
    // POST with a body is not replayed: one 502.
    let post = Request::post(format!("{}/reset", d.url))
        .body(Full::new(Bytes::from_static(b"payload")))
        .unwrap();
    assert_eq!(c.send(post).await.unwrap().status, 502);
    // Reset mid-body: the client sees a broken body, not a silent truncation.
    assert!(c.get(&format!("{}/cut", d.url)).await.is_err());
    assert_eq!(bg.await.unwrap(), 40);
    assert_eq!(
        c.get(&format!("{}/after", d.url)).await.unwrap().status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_forwarded_and_hop_by_hop_removed() {
    let a = TestBackend::start("a").await;
    let d = Dispatcher::start(&[&a], &[]);
    let c = Client::new();
    let req = Request::get(format!("{}/h", d.url))
        .header("connection", "keep-alive, x-private")
        .header("x-private", "secret")
        .header("keep-alive", "timeout=5")
        .header("te", "deflate, trailers")
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-end-to-end", "kept")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = c.send(req).await.unwrap();
    assert_eq!(r.status, 200);
    let h = a.stats.last_headers.lock().unwrap().clone();
    assert_eq!(
        h.get("x-forwarded-for").map(String::as_str),
        Some("203.0.113.7, 127.0.0.1")
    );
    assert_eq!(h.get("x-end-to-end").map(String::as_str), Some("kept"));
    for gone in ["x-private", "keep-alive"] {
        assert!(!h.contains_key(gone), "{gone} reached the backend: {h:?}");
    }
    // TE is hop-by-hop, but its `trailers` token is honoured end to end.
    assert_eq!(h.get("te").map(String::as_str), Some("trailers"));
    assert!(h.get("connection").is_none_or(|v| !v.contains("x-private")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_stream_both_ways() {
    let a = TestBackend::start("a").await;
    let d = Dispatcher::start(&[&a], &[]);
    let c = Client::new();
    // 48 MB up and back through an echo that answers as it reads: far more
    // than the socket buffers hold, so the upload must go on while the
    // response streams (full duplex), or both ends wait on each other.
    let payload: Vec<u8> = (0..48_000_000u32).map(|i| (i % 251) as u8).collect();
    let req = Request::post(format!("{}/echo", d.url))
        .body(Full::new(Bytes::from(payload.clone())))
        .unwrap();
    let r = c.send(req).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), payload.len());
    assert!(r.body == payload);
    // 1 MB download with Content-Length.
    let r = c.get(&format!("{}/big/1048576", d.url)).await.unwrap();
    assert_eq!(r.body.len(), 1_048_576);
    // The first chunk reaches the client while the backend has not finished:
    // nothing is buffered whole.
    let mut s = std::net::TcpStream::connect(d.host_port()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /gate HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).contains("first-") {
        let n = s
            .read(&mut buf)
            .expect("first chunk did not arrive before the backend finished");
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    assert!(!String::from_utf8_lossy(&got).contains("second"));
    a.open_gate();
    while !String::from_utf8_lossy(&got).contains("second") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
}

#[test]
fn route_shows_the_charsum_collisions_of_section_3_5_1() {
    let urls = [
        "/english/prog.htm",
        "/english/stat.htm",
        "/french/prog.htm",
        "/french/stat.htm",
    ];
    let run = |hash: &str| -> serde_json::Value {
        let mut args = vec![
            "route",
            "--backends",
            "10.0.0.1:80,10.0.0.2:80,10.0.0.3:80,10.0.0.4:80",
            "--algo",
            "url-hash",
            "--hash",
            hash,
            "--json",
        ];
        args.extend(urls);
        shoal_json(&args)
    };
    let v = run("charsum");
    let subs: Vec<u64> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["sub_namespace"].as_u64().unwrap())
        .collect();
    // prog/stat and english/french collide: one sub-namespace for all four.
    assert!(subs.iter().all(|&s| s == subs[0]), "{v}");
    let chosen: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["chosen"].as_str().unwrap())
        .collect();
    assert!(chosen.iter().all(|c| *c == chosen[0]));
    assert!(v[0]["reason"].as_str().unwrap().contains("sub-namespace"));
    let v = run("md5");
    let subs: Vec<u64> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["sub_namespace"].as_u64().unwrap())
        .collect();
    assert!(
        subs.iter().any(|&s| s != subs[0]),
        "md5 separates them: {v}"
    );
    // The human-readable form names the subset and the reason.
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args([
            "route",
            "--backends",
            "a:1,b:1,c:1,d:1",
            "--algo",
            "url-hash",
            "--replicas",
            "2",
            "--hash",
            "charsum",
            "--down",
            "b:1",
            "/english/prog.htm",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("sub-namespace") && text.contains("why"),
        "{text}"
    );
}

#[test]
fn sim_locality_reproduces_the_thesis() {
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args([
            "sim",
            "locality",
            "--nodes",
            "10",
            "--replicas",
            "1",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        (v["naive_worst"].as_f64().unwrap() - 0.5).abs() < 1e-9,
        "{v}"
    );
    assert!(
        (v["naive_avg"].as_f64().unwrap() - 0.37).abs() < 0.005,
        "{v}"
    );
    assert!(
        (v["optimal_avg"].as_f64().unwrap() - 0.1).abs() < 1e-9,
        "{v}"
    );
    assert!(
        (v["optimal_worst"].as_f64().unwrap() - 0.1).abs() < 1e-9,
        "{v}"
    );
}

#[test]
fn manager_mode_names_what_is_missing() {
    let run = |extra: &[&str]| {
        let mut args = vec![
            "dispatch",
            "--manager",
            "https://127.0.0.1:7400",
            "--service",
            "web",
            "--listen",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        shoal_refuses(&args)
    };
    let err = run(&[]);
    assert!(err.contains("--dir"), "{err}");
    let err = run(&["--dir", "/nonexistent/shoal"]);
    assert!(err.contains("shoal init"), "{err}");
    let err = dispatch_refuses("127.0.0.1:0", "127.0.0.1:9", &["--health-path", "healthz"]);
    assert!(
        err.contains("--health-path") && err.contains("/healthz"),
        "{err}"
    );
}

/// Reads from `s` until the peer closes; `true` if it did before `limit`.
fn closed_within(s: &mut std::net::TcpStream, limit: Duration) -> bool {
    let end = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    while Instant::now() < end {
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return true, // reset
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_timeout_closes_slow_heads_but_not_slow_responses() {
    let a = TestBackend::start("a").await;
    let d = Dispatcher::start(&[&a], &["--header-timeout", "1s", "--idle-timeout", "4s"]);
    let hp = d.host_port();

    // A client trickling its head, a line every 200 ms: the bytes keep
    // coming, but the head is not complete within 1 s, so it is closed.
    let start = Instant::now();
    let mut s = std::net::TcpStream::connect(&hp).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
    let closed = loop {
        std::thread::sleep(Duration::from_millis(200));
        if s.write_all(b"X-Slow: 1\r\n").is_err() {
            break true;
        }
        if start.elapsed() > Duration::from_secs(4) {
            break closed_within(&mut s, Duration::from_millis(10));
        }
    };
    let took = start.elapsed();
    assert!(closed, "a trickled head was not cut off");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2600),
        "cut after {took:?}; expected the 1 s header timeout (checked every 250 ms)"
    );

    // Keep-alive: after a response, the next head is due within 1 s.
    let mut s = std::net::TcpStream::connect(&hp).unwrap();
    s.write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let t = Instant::now();
    assert!(closed_within(&mut s, Duration::from_secs(3)));
    let idle = t.elapsed();
    assert!(
        idle >= Duration::from_millis(900) && idle < Duration::from_millis(2600),
        "idle keep-alive connection closed after {idle:?}"
    );

    // A response whose body stalls for 2 s (longer than the header timeout,
    // shorter than the idle timeout) is not cut: the request is open.
    let mut s = std::net::TcpStream::connect(&hp).unwrap();
    s.write_all(b"GET /gate HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let n = s.read(&mut buf).unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    a.open_gate();
    let mut rest = Vec::new();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                rest.extend_from_slice(&buf[..n]);
                // chunked: the last chunk ends the body
                if rest.ends_with(b"0\r\n\r\n") {
                    break;
                }
            }
            Err(e) => panic!("the stalled response was cut: {e}"),
        }
    }
    assert!(
        rest.ends_with(b"0\r\n\r\n"),
        "{:?}",
        String::from_utf8_lossy(&rest)
    );

    let c = Client::new();
    let m = c.get(&format!("{}/metrics", d.admin)).await.unwrap();
    let text = String::from_utf8_lossy(&m.body);
    assert!(
        text.contains("shoal_dispatch_errors_total{kind=\"header_timeout\"} 2"),
        "{text}"
    );
}

/// A `Cpus_allowed_list` value (`0-3,6`) as CPU numbers, read with the
/// dispatcher's own CPU-list parser.
fn cpu_list(s: &str) -> Vec<usize> {
    use shoal_dispatch::config::{CpuAffinity, parse_cpu_affinity};
    match parse_cpu_affinity(s) {
        Ok(CpuAffinity::List(l)) => l,
        other => panic!("Cpus_allowed_list {s:?}: {other:?}"),
    }
}

/// The CPUs each thread of `pid` named `dispatch-*` may run on, by name.
fn dispatch_threads_cpus(pid: u32) -> std::collections::BTreeMap<String, Vec<usize>> {
    let mut out = std::collections::BTreeMap::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().path();
        let name = std::fs::read_to_string(t.join("comm")).unwrap();
        let name = name.trim();
        if !name.starts_with("dispatch-") {
            continue;
        }
        let status = std::fs::read_to_string(t.join("status")).unwrap();
        let line = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap();
        out.insert(name.to_string(), cpu_list(line));
    }
    out
}

#[test]
fn cpu_affinity_pins_each_event_loop_to_its_own_cpu() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let allowed = cpu_list(
        status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap(),
    );
    // The harness runs two threads: thread i on the i-th allowed CPU.
    let d = Dispatcher::start_raw("127.0.0.1:9", &["--cpu-affinity", "auto"]);
    let pinned = dispatch_threads_cpus(d.child.id());
    assert_eq!(pinned.len(), 2, "{pinned:?}");
    for w in 0..2 {
        assert_eq!(
            pinned[&format!("dispatch-{w}")],
            vec![allowed[w % allowed.len()]],
            "thread {w}: {pinned:?} (allowed {allowed:?})"
        );
    }
    drop(d);

    // A list shorter than the threads wraps round.
    let last = *allowed.last().unwrap();
    let d = Dispatcher::start_raw("127.0.0.1:9", &["--cpu-affinity", &last.to_string()]);
    let pinned = dispatch_threads_cpus(d.child.id());
    assert_eq!(pinned.len(), 2, "{pinned:?}");
    assert!(pinned.values().all(|c| *c == vec![last]), "{pinned:?}");
    drop(d);

    // Unpinned by default: every thread may run on every allowed CPU.
    let d = Dispatcher::start_raw("127.0.0.1:9", &[]);
    let free = dispatch_threads_cpus(d.child.id());
    assert_eq!(free.len(), 2, "{free:?}");
    assert!(free.values().all(|c| *c == allowed), "{free:?}");
    drop(d);

    // A CPU the process may not use is refused by name.
    let err = dispatch_refuses("127.0.0.1:0", "127.0.0.1:9", &["--cpu-affinity", "4000"]);
    assert!(
        err.contains("CPU 4000") && err.contains("may run on"),
        "{err}"
    );
}

#[test]
fn a_second_dispatcher_on_a_taken_address_is_refused() {
    // SO_REUSEPORT must not let it share the port silently.
    let first = Dispatcher::start_raw("127.0.0.1:9", &[]);
    let addr = first.host_port();
    let err = dispatch_refuses(&addr, "127.0.0.1:9", &[]);
    assert!(
        err.contains(&first.host_port()) && err.contains("in use") && err.contains("--listen"),
        "{err}"
    );
}

/// `shoal dispatch --listen LISTEN --backends BACKENDS EXTRA...`, which
/// must be refused: its stderr.
fn dispatch_refuses(listen: &str, backends: &str, extra: &[&str]) -> String {
    let mut args = vec!["dispatch", "--listen", listen, "--backends", backends];
    args.extend_from_slice(extra);
    shoal_refuses(&args)
}

/// Runs `shoal ARGS` (without SHOAL_DIR), expects it to exit with an error
/// within 10 s (a start that should have been refused would serve forever)
/// and returns its stderr.
fn shoal_refuses(args: &[&str]) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(args)
        .env_remove("SHOAL_DIR")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("shoal {args:?} was not refused: it still runs after 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "shoal {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_requests_in_flight_finish_then_exits() {
    let a = TestBackend::start("a").await;
    let mut d = Dispatcher::start(&[&a], &["--shutdown-timeout", "20s"]);
    let c = Client::new();
    // An idle keep-alive connection, and a request held 1.5 s by the backend.
    let mut idle = std::net::TcpStream::connect(d.host_port()).unwrap();
    idle.write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = idle.read(&mut buf).unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let url = format!("{}/sleep/1500/x", d.url);
    let held = tokio::spawn({
        let c = c.clone();
        async move { c.get(&url).await }
    });
    wait_until(
        "the request is at the backend",
        Duration::from_secs(10),
        || a.stats.in_flight.load(SeqCst) == 1,
    )
    .await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    // New connections are refused at once; the idle one is closed.
    let hp = d.host_port();
    wait_until("the listener to close", Duration::from_secs(5), || {
        std::net::TcpStream::connect(&hp).is_err()
    })
    .await;
    assert!(closed_within(&mut idle, Duration::from_secs(5)));
    // The held request still gets its whole answer...
    let r = held.await.unwrap().expect("the request in flight was cut");
    assert_eq!(r.status, 200);
    // ...and then the dispatcher exits on its own, successfully, long
    // before the 20 s shutdown timeout.
    let t = Instant::now();
    let status = loop {
        if let Some(s) = d.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "still running 10 s after its last request ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status:?}");
}

/// Waits (up to `limit`) for a dispatcher process to exit; its status.
async fn exits_within(d: &mut Dispatcher, limit: Duration) -> std::process::ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(s) = d.child.try_wait().unwrap() {
            return s;
        }
        assert!(t.elapsed() < limit, "still running after {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn handover_upgrades_under_load_without_a_failed_request() {
    let a = TestBackend::start("a").await;
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("dispatch.sock");
    let sock = sock.to_str().unwrap();
    let mut d1 = Dispatcher::start(&[&a], &["--handover", sock]);
    let (listen, admin) = (
        d1.host_port(),
        d1.admin.trim_start_matches("http://").to_string(),
    );
    let url = d1.url.clone();
    // Load on keep-alive connections and on a new connection per request
    // (those land in the listen backlog, which must never be closed).
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut load = Vec::new();
    // And as a browser or wrk: the next request on the same connection soon
    // after a response (2 ms here), unless told `Connection: close`.
    // Closing such a connection between two requests fails the second
    // (hyper's client would retry it, so it cannot show this).
    for w in 0..8 {
        let (stop, ok, failed, addr) = (stop.clone(), ok.clone(), failed.clone(), listen.clone());
        load.push(tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut conn: Option<tokio::net::TcpStream> = None;
            let mut i = 0u64;
            while !stop.load(SeqCst) {
                i += 1;
                let s = match conn.as_mut() {
                    Some(s) => s,
                    None => match tokio::net::TcpStream::connect(&addr).await {
                        Ok(s) => conn.insert(s),
                        Err(e) => {
                            failed.lock().unwrap().push(format!("raw connect: {e}"));
                            continue;
                        }
                    },
                };
                let req = format!("GET /raw{w}/{i} HTTP/1.1\r\nHost: x\r\n\r\n");
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let sent = s.write_all(req.as_bytes()).await;
                // The head, then Content-Length bytes of body.
                let whole = loop {
                    if sent.is_err() {
                        break None;
                    }
                    if let Some(end) = buf.windows(4).position(|x| x == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len {
                            break Some(head);
                        }
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => break None,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                match whole {
                    Some(head) if head.starts_with("http/1.1 200") => {
                        ok.fetch_add(1, SeqCst);
                        if head.contains("connection: close") {
                            conn = None;
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    Some(head) => {
                        failed.lock().unwrap().push(format!("raw: {head}"));
                        conn = None;
                    }
                    None => {
                        failed
                            .lock()
                            .unwrap()
                            .push(format!("raw: request {i} cut: {sent:?}"));
                        conn = None;
                    }
                }
            }
        }));
    }
    for w in 0..4 {
        let c = if w % 2 == 0 {
            Client::new()
        } else {
            Client::fresh()
        };
        let (stop, ok, failed, url) = (stop.clone(), ok.clone(), failed.clone(), url.clone());
        load.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(SeqCst) {
                i += 1;
                match c.get(&format!("{url}/w{w}/{i}")).await {
                    Ok(r) if r.status == 200 => {
                        ok.fetch_add(1, SeqCst);
                    }
                    Ok(r) => failed.lock().unwrap().push(format!("status {}", r.status)),
                    Err(e) => failed.lock().unwrap().push(e),
                }
            }
        }));
    }
    let served = |n: u64| {
        let ok = ok.clone();
        let target = ok.load(SeqCst) + n;
        move || ok.load(SeqCst) >= target
    };
    wait_until("load through d1", Duration::from_secs(10), served(200)).await;
    // A request held at the backend across the handover.
    let held = tokio::spawn({
        let (c, url) = (Client::new(), format!("{url}/sleep/1500/held"));
        async move { c.get(&url).await }
    });
    wait_until(
        "the held request at the backend",
        Duration::from_secs(10),
        || a.stats.in_flight.load(SeqCst) >= 1,
    )
    .await;

    // d2 (one thread) takes over d1's two listeners and its admin listener.
    let mut d2 = Dispatcher::start_at(
        &listen,
        &admin,
        &a.spec(),
        &["--handover", sock, "--threads", "1"],
    );
    assert_eq!(d2.admin, d1.admin, "the admin listener is taken over too");
    let r = held
        .await
        .unwrap()
        .expect("the request held across the handover was cut");
    assert_eq!(r.status, 200);
    assert!(
        exits_within(&mut d1, Duration::from_secs(10))
            .await
            .success()
    );
    wait_until(
        "load through d2 alone",
        Duration::from_secs(10),
        served(200),
    )
    .await;
    let m = Client::new()
        .get(&format!("{}/metrics", d2.admin))
        .await
        .unwrap();
    assert_eq!(m.status, 200, "d2 serves the inherited admin listener");

    // A connection that takes the offer and walks away changes nothing.
    {
        use std::io::BufRead;
        let s = std::os::unix::net::UnixStream::connect(sock).unwrap();
        let mut line = String::new();
        std::io::BufReader::new(&s).read_line(&mut line).unwrap();
        assert!(line.contains("\"listen\""), "{line}");
    }
    // A dispatcher asking for another address is refused and d2 keeps on.
    let err = dispatch_refuses("127.0.0.1:1", &a.spec(), &["--handover", sock]);
    assert!(
        err.contains(&format!("listens on {listen}")) && err.contains("--listen"),
        "{err}"
    );
    wait_until(
        "load through d2 after both",
        Duration::from_secs(10),
        served(200),
    )
    .await;

    // d3 (three threads) takes over from d2: the socket path passed on.
    let mut d3 = Dispatcher::start_at(
        &listen,
        "127.0.0.1:0",
        &a.spec(),
        &["--handover", sock, "--threads", "3"],
    );
    assert!(
        exits_within(&mut d2, Duration::from_secs(10))
            .await
            .success()
    );
    wait_until("load through d3", Duration::from_secs(10), served(200)).await;
    stop.store(true, SeqCst);
    for l in load {
        l.await.unwrap();
    }
    let failed = failed.lock().unwrap().clone();
    assert!(
        failed.is_empty(),
        "{} failed, e.g. {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );

    // d3 dies without cleaning up: its socket file is stale, and the next
    // dispatcher on that path starts afresh.
    d3.child.kill().unwrap();
    d3.child.wait().unwrap();
    assert!(std::path::Path::new(sock).exists());
    let d4 = Dispatcher::start_at(&listen, "127.0.0.1:0", &a.spec(), &["--handover", sock]);
    assert_eq!(
        Client::new()
            .get(&format!("{}/x", d4.url))
            .await
            .unwrap()
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_guards_backend_list_changes() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("token");
    let token = "9f86d081884c7d659a2feaa0c55ad015";
    std::fs::write(&file, format!("{token}\n")).unwrap();
    let d = Dispatcher::start(&[&a], &["--admin-token-file", file.to_str().unwrap()]);
    let c = Client::new();
    let put = |auth: Option<String>| {
        let mut req = Request::put(format!("{}/backends", d.admin))
            .header("content-type", "application/json");
        if let Some(v) = auth {
            req = req.header("authorization", v);
        }
        let req = req
            .body(Full::new(Bytes::from(
                serde_json::json!([{"addr": b.spec()}]).to_string(),
            )))
            .unwrap();
        let c = c.clone();
        async move { c.send(req).await.unwrap() }
    };
    // No token, a wrong one, the right one in another scheme: refused with
    // a reason, and the list is unchanged.
    for auth in [
        None,
        Some("Bearer 9f86d081884c7d659a2feaa0c55ad016".to_string()),
        Some(format!("Basic {token}")),
    ] {
        let r = put(auth.clone()).await;
        assert_eq!(r.status, 401, "{auth:?}");
        assert_eq!(r.headers["www-authenticate"], "Bearer");
        assert!(String::from_utf8_lossy(&r.body).contains("--admin-token-file"));
    }
    assert_eq!(c.get(&format!("{}/x", d.url)).await.unwrap().backend, "a");
    // Reading needs no token.
    let m = c.get(&format!("{}/metrics", d.admin)).await.unwrap();
    assert_eq!(m.status, 200);
    // The token changes it.
    let r = put(Some(format!("Bearer {token}"))).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(c.get(&format!("{}/x", d.url)).await.unwrap().backend, "b");
    // A token file that is too short is refused at start.
    std::fs::write(&file, "secret\n").unwrap();
    let err = dispatch_refuses(
        "127.0.0.1:0",
        &a.spec(),
        &[
            "--admin",
            "127.0.0.1:0",
            "--admin-token-file",
            file.to_str().unwrap(),
        ],
    );
    assert!(err.contains("at least 16"), "{err}");
}

/// The access log's lines once it holds `n` (a deadline, not a sleep: the
/// writer thread lags the responses).
async fn log_lines(path: &std::path::Path, n: usize) -> Vec<serde_json::Value> {
    let read = || {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect::<Vec<serde_json::Value>>()
    };
    wait_until(
        &format!("{n} access-log lines"),
        Duration::from_secs(10),
        || read().len() >= n,
    )
    .await;
    read()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_has_a_line_per_request_and_reopens_on_sighup() {
    let a = TestBackend::start("a").await;
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("access.log");
    let d = Dispatcher::start(
        &[&a],
        &[
            "--access-log",
            path.to_str().unwrap(),
            "--eject-after-5xx",
            "0",
        ],
    );
    let c = Client::new();
    assert_eq!(
        c.get(&format!("{}/ok?q=1", d.url)).await.unwrap().status,
        200
    );
    assert_eq!(
        c.get(&format!("{}/big/300000", d.url))
            .await
            .unwrap()
            .body
            .len(),
        300_000
    );
    assert_eq!(
        c.get(&format!("{}/reset", d.url)).await.unwrap().status,
        502
    );
    // Cut by the backend mid-body: the client sees an error.
    assert!(c.get(&format!("{}/cut", d.url)).await.is_err());
    let lines = log_lines(&path, 4).await;
    let by_uri = |u: &str| {
        lines
            .iter()
            .find(|l| l["uri"] == u)
            .unwrap_or_else(|| panic!("no line for {u}: {lines:?}"))
    };
    let ok = by_uri("/ok?q=1");
    assert_eq!(ok["method"], "GET");
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["backend"], a.spec());
    assert_eq!(ok["outcome"], "ok");
    assert!(ok["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(ok["ts"].as_str().unwrap().ends_with('Z'));
    assert!(ok["ms"].as_f64().unwrap() >= 0.0);
    assert_eq!(by_uri("/big/300000")["bytes"], 300_000);
    let reset = by_uri("/reset");
    assert_eq!(
        (reset["status"].as_u64(), reset["outcome"].as_str()),
        (Some(502), Some("local"))
    );
    assert_eq!(
        reset["backend"],
        a.spec(),
        "the backend that failed is named"
    );
    assert_eq!(by_uri("/cut")["outcome"], "backend_reset");

    // logrotate: the file moves, SIGHUP, and the next line starts a new file.
    std::fs::rename(&path, tmp.path().join("access.log.1")).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.child.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    // The signal is handled asynchronously: request until a line lands in
    // the new file.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut i = 0;
    while !std::fs::read_to_string(&path).is_ok_and(|t| t.contains("/after/")) {
        assert!(Instant::now() < deadline, "no line in the reopened file");
        i += 1;
        let r = c.get(&format!("{}/after/{i}", d.url)).await.unwrap();
        assert_eq!(r.status, 200);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Nothing lost across the reopen: every request has its line in one
    // file or the other.
    let count = |p: &std::path::Path| std::fs::read_to_string(p).unwrap().lines().count();
    let rotated = tmp.path().join("access.log.1");
    wait_until("every line written", Duration::from_secs(10), || {
        count(&rotated) + count(&path) == 4 + i
    })
    .await;
}

/// Reads from `s` until `buf` holds a whole head; returns the head's text.
async fn read_head(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> String {
    use tokio::io::AsyncReadExt;
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            buf.drain(..end + 4);
            return head;
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("a head within 10 s")
            .unwrap();
        assert!(
            n > 0,
            "closed before a whole head: {:?}",
            String::from_utf8_lossy(buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Reads until `buf` holds `n` bytes.
async fn read_n(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>, n: usize) {
    use tokio::io::AsyncReadExt;
    while buf.len() < n {
        let mut chunk = vec![0u8; 65536];
        let got = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("bytes within 10 s")
            .unwrap();
        assert!(got > 0, "closed after {} of {n} bytes", buf.len());
        buf.extend_from_slice(&chunk[..got]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_becomes_a_tunnel_until_idle() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A backend that accepts the switch with its first bytes in the same
    // write as the 101 head (a server-first protocol), then echoes.
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let baddr = backend.local_addr().unwrap();
    let (head_tx, mut head_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = backend.accept().await {
            let head_tx = head_tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let head = read_head(&mut s, &mut buf).await;
                let _ = head_tx.send(head);
                s.write_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\nhello\n",
                )
                .await
                .unwrap();
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let d = Dispatcher::start_raw(&baddr.to_string(), &["--tunnel-timeout", "600ms"]);
    let mut s = tokio::net::TcpStream::connect(d.host_port()).await.unwrap();
    s.write_all(b"GET /chat HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let head = read_head(&mut s, &mut buf).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains("upgrade: echo") && head.contains("connection: upgrade"),
        "{head}"
    );
    // What the backend was asked: the switch, passed on, with the usual
    // X-Forwarded-For.
    let asked = head_rx.recv().await.unwrap();
    assert!(
        asked.contains("connection: upgrade") && asked.contains("upgrade: echo"),
        "{asked}"
    );
    assert!(asked.contains("x-forwarded-for: 127.0.0.1"), "{asked}");
    // The backend's first bytes came with its 101: none lost.
    read_n(&mut s, &mut buf, 6).await;
    assert_eq!(&buf[..6], b"hello\n");
    buf.drain(..6);
    // Both ways, 4 MiB, while reading (a tunnel streams, it does not buffer).
    let big: Vec<u8> = (0..4 << 20).map(|i: u32| (i % 251) as u8).collect();
    let (mut r, mut w) = s.into_split();
    let sent = big.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w
    });
    let mut back = Vec::new();
    while back.len() < big.len() {
        let mut chunk = vec![0u8; 65536];
        let n = r.read(&mut chunk).await.unwrap();
        assert!(n > 0, "tunnel closed after {} bytes", back.len());
        back.extend_from_slice(&chunk[..n]);
    }
    assert!(back == big, "the echo differs");
    let w = writer.await.unwrap();
    let mut s = r.reunite(w).unwrap();
    let metrics = |admin: String| async move {
        Client::new()
            .get(&format!("{admin}/metrics"))
            .await
            .unwrap()
            .body
    };
    let m = metrics(d.admin.clone()).await;
    assert!(String::from_utf8_lossy(&m).contains("shoal_dispatch_tunnels_open 1"));
    // Quiet for longer than --tunnel-timeout: closed by the dispatcher.
    let t = Instant::now();
    let mut one = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut one))
        .await
        .expect("the idle tunnel was not closed within 10 s")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        t.elapsed() >= Duration::from_millis(500),
        "closed early: {:?}",
        t.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !String::from_utf8_lossy(&metrics(d.admin.clone()).await)
        .contains("shoal_dispatch_tunnels_open 0")
    {
        assert!(
            Instant::now() < deadline,
            "the closed tunnel is still counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_holds_new_clients_in_the_backlog() {
    let a = TestBackend::start("a").await;
    let d = Dispatcher::start(&[&a], &["--max-connections", "2"]);
    let m = Client::fresh()
        .get(&format!("{}/metrics", d.admin))
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&m.body).contains("shoal_dispatch_connections_max 2"));
    let ask = |s: &mut std::net::TcpStream| {
        s.write_all(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    // Two keep-alive connections, served and held open: the limit.
    let mut c1 = std::net::TcpStream::connect(d.host_port()).unwrap();
    let mut c2 = std::net::TcpStream::connect(d.host_port()).unwrap();
    assert!(ask(&mut c1).starts_with("HTTP/1.1 200"));
    assert!(ask(&mut c2).starts_with("HTTP/1.1 200"));
    // A third is neither refused nor served: it waits in the backlog...
    let (tx, rx) = std::sync::mpsc::channel();
    let hp = d.host_port();
    std::thread::spawn(move || {
        let mut c3 = std::net::TcpStream::connect(hp).unwrap();
        c3.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let _ = tx.send(ask(&mut c3));
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(500)).is_err(),
        "served past the limit"
    );
    // ...until one of the two closes.
    drop(c1);
    let r = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the waiting client was not served once a connection closed");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(ask(&mut c2).starts_with("HTTP/1.1 200"));
}
