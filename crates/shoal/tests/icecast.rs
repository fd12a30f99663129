//! The icecast adaptor with Debian's icecast2, through a real manager and
//! agents on loopback addresses: a two-node service whose second node
//! relays from the first (`relay_from = "{{ first_server }}"`), fed by a
//! source speaking icecast's source protocol; a listener on the relay gets
//! the stream; status carries icecast's own listener count and bytes sent;
//! the source password appears in no status or log; and a listener stays
//! connected through a `set` (icecast reloads on SIGHUP, same process).

mod common;

use common::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

const PASSWORD: &str = "s3cr3t-radio-7f";

fn b64(s: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut o = String::new();
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                o.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                o.push('=');
            }
        }
    }
    o
}

/// A 128 kbit/s source on `addr` until `stop`.
fn source(addr: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let Ok(mut s) = TcpStream::connect(&addr) else {
            return format!("cannot connect to {addr}");
        };
        let _ = write!(
            s,
            "PUT /stream HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Basic {}\r\nContent-Type: audio/mpeg\r\nExpect: 100-continue\r\n\r\n",
            b64(&format!("source:{PASSWORD}"))
        );
        let mut b = [0u8; 256];
        let n = s.read(&mut b).unwrap_or(0);
        let answer = String::from_utf8_lossy(&b[..n]).to_string();
        let chunk = [0x55u8; 1600]; // 100 ms at 128 kbit/s
        while !stop.load(Relaxed) {
            if s.write_all(&chunk).is_err() {
                return format!("source cut; icecast had answered {answer:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        answer
    })
}

/// [`source`] once `addr` accepts connections.
fn source_when_up(addr: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<String> {
    wait_for(
        "the master icecast to listen",
        Duration::from_secs(20),
        || TcpStream::connect(&addr).ok().map(|_| ()),
    );
    source(addr, stop)
}

/// A listener on `addr`; counts the bytes it gets until `stop`. It
/// reconnects while the mount is not there yet (a relay picks its master's
/// stream up within icecast's master-update-interval), and ends if a
/// playing stream is cut.
fn listen(addr: String, stop: Arc<AtomicBool>) -> (Arc<AtomicU64>, std::thread::JoinHandle<()>) {
    let got = Arc::new(AtomicU64::new(0));
    let g = got.clone();
    let h = std::thread::spawn(move || {
        let mut s = loop {
            if stop.load(Relaxed) {
                return;
            }
            if let Ok(mut s) = TcpStream::connect(&addr) {
                let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                let _ = write!(s, "GET /stream HTTP/1.0\r\nHost: {addr}\r\n\r\n");
                let mut head = [0u8; 12];
                if s.read_exact(&mut head).is_ok() && head.ends_with(b"200") {
                    break s;
                }
            }
            std::thread::sleep(Duration::from_millis(300));
        };
        let mut b = [0u8; 4096];
        while !stop.load(Relaxed) {
            match s.read(&mut b) {
                Ok(0) => return,
                Ok(n) => {
                    g.fetch_add(n as u64, Relaxed);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => return,
            }
        }
    });
    (got, h)
}

fn app<'a>(node: &'a Value, id: &str) -> Option<&'a Value> {
    node["apps"].as_array()?.iter().find(|a| a["id"] == id)
}

fn wait_bytes(got: &AtomicU64, more_than: u64, what: &str) {
    wait_for(what, Duration::from_secs(20), || {
        (got.load(Relaxed) > more_than).then_some(())
    });
}

#[test]
fn icecast_relays_from_the_first_server_reports_listeners_and_keeps_them_through_set() {
    if !std::path::Path::new("/usr/bin/icecast2").exists() {
        panic!("icecast2 is not installed: apt-get install -y icecast2 (scripts/test.sh does)");
    }
    let c = Cluster::start(2.0);
    let r: u8 = 1 + (std::process::id() % 200) as u8;
    let ip = |i: u8| format!("127.{r}.24.{}", 10 + i);
    let _a1 = c.agent_at("n1", &ip(1));
    let _a2 = c.agent_at("n2", &ip(2));
    c.wait_alive(&["n1", "n2"]);
    let port = free_port();
    let toml = format!(
        r#"
name = "radio"
min_nodes = 2
max_nodes = 2
policy = "threshold"
period_secs = 1
[app]
adaptor = "icecast"
port = {port}
[app.params]
listen = "{{{{ node_address }}}}:{{{{ port }}}}"
relay_from = "{{{{ first_server }}}}"
mounts = "/stream"
[app.secrets]
source_password = "{PASSWORD}"
[metric]
kind = "net"
capacity = 10000
"#
    );
    let file = c.tmp.path().join("radio.toml");
    write(&file, &toml);
    let (ok, out, err) = c.cli(&["service", "apply", file.to_str().unwrap()]);
    assert!(ok, "apply: {out}{err}");

    // Both nodes serve; one is the master (relay_from is itself), the
    // other relays from it.
    let (master, relay) = wait_for("two icecasts assigned", Duration::from_secs(30), || {
        let st = c.try_status()?;
        let mut m = None;
        let mut rl = None;
        for n in st["nodes"].as_array()? {
            let d = n["desired"]
                .as_array()?
                .iter()
                .find(|a| a["id"] == "svc-radio")?;
            let (listen, from) = (
                d["params"]["listen"].as_str()?,
                d["params"]["relay_from"].as_str()?,
            );
            if listen == from {
                m = Some(listen.to_string());
            } else {
                rl = Some((listen.to_string(), from.to_string()));
            }
        }
        let (rl, from) = rl?;
        let m = m?;
        assert_eq!(from, m, "the relay relays from the first server");
        Some((m, rl))
    });

    let stop = Arc::new(AtomicBool::new(false));
    let src = source_when_up(master.clone(), stop.clone());
    // The relay serves only once it has the master's stream (before, a
    // listener sent to it would get 404).
    wait_for("both serving", Duration::from_secs(30), || {
        (c.service("radio")?["serving"].as_array()?.len() == 2).then_some(())
    });
    // The relay gets the source's stream from the master.
    let (got, l1) = listen(relay.clone(), stop.clone());
    wait_bytes(&got, 64 * 1024, "64 KB through the relay");

    // Status: icecast's own figures, per mount.
    let relay_node = wait_for(
        "the relay's listener in status",
        Duration::from_secs(15),
        || {
            let st = c.try_status()?;
            st["nodes"].as_array()?.iter().find_map(|n| {
                let a = app(n, "svc-radio")?;
                let m = &a["stream"]["mounts"]["/stream"];
                (a["endpoint"] == relay.as_str()
                    && m["listeners"].as_u64()? >= 1
                    && m["bytes_sent"].as_u64()? > 0)
                    .then(|| n["name"].as_str().unwrap().to_string())
            })
        },
    );
    let (ok, status_json, _) = c.cli(&["status", "--json"]);
    assert!(ok);
    assert!(
        !status_json.contains(PASSWORD),
        "the source password leaked into status"
    );

    // set without dropping: a third node runs a standalone relay; a listener
    // on it stays connected while its limits change.
    let _a3 = c.agent_at("n3", &ip(3));
    c.wait_alive(&["n3"]);
    let mine = format!("{}:{port}", ip(3));
    let assign = |max: &str| {
        let (ok, out, err) = c.cli(&[
            "node",
            "assign",
            "n3",
            "--adaptor",
            "icecast",
            "--id",
            "radio3",
            "--param",
            &format!("listen={mine}"),
            "--param",
            &format!("relay_from={master}"),
            "--param",
            &format!("secret.source_password={PASSWORD}"),
            "--param",
            &format!("max_listeners={max}"),
        ]);
        assert!(ok, "assign: {out}{err}");
    };
    assign("100");
    let pid = wait_for("radio3 running", Duration::from_secs(20), || {
        let n = c.node("n3")?;
        let a = app(&n, "radio3")?;
        (a["state"] == "running").then(|| a["pid"].as_u64())?
    });
    let (got3, l3) = listen(mine.clone(), stop.clone());
    wait_bytes(&got3, 32 * 1024, "32 KB through n3's relay");
    assign("200");
    let before = got3.load(Relaxed);
    // The listener keeps receiving after the reload, from the same process.
    wait_bytes(&got3, before + 64 * 1024, "64 KB more after set");
    let n = c.node("n3").unwrap();
    assert_eq!(
        app(&n, "radio3").unwrap()["pid"].as_u64(),
        Some(pid),
        "set restarted icecast"
    );
    assert!(!l3.is_finished(), "the listener was dropped by set");

    // Bad parameters are refused with the fix named.
    let (ok, _, err) = c.cli(&[
        "node",
        "assign",
        "n3",
        "--adaptor",
        "icecast",
        "--id",
        "bad",
        "--param",
        "listen=nope",
    ]);
    assert!(!ok && err.contains("listen must be IP:PORT"), "{err}");

    stop.store(true, Relaxed);
    let answer = src.join().unwrap();
    assert!(
        answer.contains(" 100") || answer.contains(" 200"),
        "icecast answered the source {answer:?}"
    );
    l1.join().unwrap();
    l3.join().unwrap();
    for name in [relay_node.as_str(), "n3"] {
        let (ok, out, err) = c.cli(&[
            "logs",
            name,
            if name == "n3" { "radio3" } else { "svc-radio" },
        ]);
        assert!(ok, "logs {name}: {err}");
        assert!(
            !out.contains(PASSWORD),
            "the source password is in {name}'s icecast log"
        );
    }
}
