//! The timestamping relay, live on loopback: gaps between datagrams survive
//! in the stamps within the record's 16 µs resolution even when the game
//! server reads them all at once, and the server's answers reach the
//! client (thesis ch. 6, notes V6.3).

mod common;

use common::{Proc, wait_for};
use shoal_core::stamp;
use std::net::UdpSocket;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn unix_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

fn relay(server: &UdpSocket, format: &str) -> (Proc, String) {
    let backend = server.local_addr().unwrap().to_string();
    let p = Proc::spawn(
        "relay",
        &[
            "relay",
            "--listen",
            "127.0.0.1:0",
            "--backends",
            &backend,
            "--format",
            format,
            "--admin",
            "127.0.0.1:0",
        ],
    );
    let out = p.wait_output("relay listening on ", Duration::from_secs(10));
    let addr = out
        .lines()
        .find_map(|l| l.strip_prefix("relay listening on "))
        .and_then(|l| l.split(',').next())
        .unwrap()
        .to_string();
    (p, addr)
}

#[test]
fn gaps_survive_a_late_reader_and_answers_come_back() {
    for format in ["thesis", "ns"] {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let (_relay, addr) = relay(&server, format);
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.connect(&addr).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        // Gaps from 0 to 20 ms; on loopback the kernel stamps a datagram
        // inside the sender's send(), so its arrival lies between the
        // clock reads around that call.
        let gaps_us = [0u64, 50, 300, 1000, 2000, 5000, 20_000, 100, 16, 3000];
        let mut around = Vec::new();
        for g in gaps_us {
            let until = Instant::now() + Duration::from_micros(g);
            while Instant::now() < until {}
            let before = unix_ns();
            client
                .send(format!("input {}", around.len()).as_bytes())
                .unwrap();
            around.push((before, unix_ns()));
        }
        // The game server is busy: it reads everything only now, so its
        // own clock would see all the datagrams at the same moment.
        std::thread::sleep(Duration::from_millis(50));
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut stamps = Vec::new();
        let mut app = Vec::new();
        let mut buf = [0u8; 2048];
        let mut relay_port = None;
        for i in 0..gaps_us.len() {
            let (n, from) = server.recv_from(&mut buf).unwrap();
            app.push(unix_ns());
            relay_port = Some(from);
            let (s, payload) = stamp::decode(&buf[..n]).unwrap();
            assert_eq!(payload, format!("input {i}").as_bytes(), "{format}");
            stamps.push(s.unix_ns as i64);
        }
        let res = if format == "thesis" { 16_000 } else { 1 };
        for i in 1..stamps.len() {
            let got = stamps[i] - stamps[i - 1];
            let lo = around[i].0 - around[i - 1].1 - res;
            let hi = around[i].1 - around[i - 1].0 + res;
            assert!(
                (lo..=hi).contains(&got),
                "{format}: gap {i} stamped {got} ns, sent within [{lo}, {hi}] ns"
            );
        }
        let sent_span = around.last().unwrap().0 - around[0].1;
        let app_span = app.last().unwrap() - app[0];
        assert!(
            app_span < sent_span / 4,
            "the late reader's own clock should squash the {sent_span} ns of gaps, saw {app_span} ns"
        );
        // An answer goes back to the client's address through its flow.
        server.send_to(b"update 1", relay_port.unwrap()).unwrap();
        let n = client.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"update 1");
    }
}

#[test]
fn relay_counts_and_refuses_bad_input() {
    let server = UdpSocket::bind("127.0.0.1:0").unwrap();
    let (relay, addr) = relay(&server, "thesis");
    let admin = relay
        .output()
        .lines()
        .find_map(|l| l.strip_prefix("relay admin on ").map(str::to_string))
        .unwrap();
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.send_to(b"x", &addr).unwrap();
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut b = [0u8; 64];
    let n = server.recv(&mut b).unwrap();
    assert_eq!(stamp::strip(&b[..n]).unwrap(), b"x");
    let metrics = wait_for("metrics", Duration::from_secs(5), || {
        let mut s = std::net::TcpStream::connect(&admin).ok()?;
        use std::io::{Read, Write};
        s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").ok()?;
        let mut t = String::new();
        s.read_to_string(&mut t).ok()?;
        t.contains("shoal_relay_forwarded_total 1").then_some(t)
    });
    assert!(
        metrics.contains("shoal_relay_delay_seconds_count 1"),
        "{metrics}"
    );
    assert!(metrics.contains("shoal_relay_flows 1"), "{metrics}");
    // Bad flags name the problem and the fix.
    let (ok, _, err) = common::run(&["relay", "--listen", "127.0.0.1:0"]);
    assert!(!ok);
    assert!(err.contains("--backends"), "{err}");
    let (ok, _, err) = common::run(&["relay", "--backends", "127.0.0.1:1", "--format", "x"]);
    assert!(!ok);
    assert!(err.contains("thesis"), "{err}");
}
