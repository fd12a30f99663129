//! Live overlay peers on loopback addresses (127.0.0.11-14 share one UDP
//! port, as hosts of one pool share the overlay port): pings flow, a newer
//! target list spreads from the peer it was handed to, a second start is a
//! no-op, a dead peer is noticed, and a host without the overlay key is
//! ignored both as a peer and as a client. SSH deployment is not built yet,
//! so a contact ends in a failure that says so.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const FP: &str = "SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s";

fn shoal(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A UDP port free on every address.
fn free_port(hosts: &[&str]) -> u16 {
    for _ in 0..200 {
        let p = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let socks: Vec<_> = hosts
            .iter()
            .filter_map(|h| std::net::UdpSocket::bind((*h, p)).ok())
            .collect();
        if socks.len() == hosts.len() {
            return p;
        }
    }
    panic!("no free UDP port on {hosts:?}");
}

fn list(path: &Path, version: u64, port: u16, hosts: &[(&str, &str)]) {
    let mut s = format!("version = {version}\noverlay_port = {port}\n");
    for (name, addr) in hosts {
        s.push_str(&format!(
            "[[target]]\nname = \"{name}\"\naddress = \"{addr}\"\nhost_key = \"{FP}\"\n"
        ));
    }
    std::fs::write(path, s).unwrap();
}

fn peer(tmp: &Path, name: &str, key: &Path, targets: &Path) -> Kill {
    let dir: PathBuf = tmp.join(name);
    Kill(
        Command::new(env!("CARGO_BIN_EXE_shoal"))
            .args([
                "overlay",
                "peer",
                "--dir",
                dir.to_str().unwrap(),
                "--name",
                name,
            ])
            .args([
                "--key",
                key.to_str().unwrap(),
                "--targets",
                targets.to_str().unwrap(),
            ])
            .args(["--interval", "200ms", "--timeout", "150ms"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

fn status(addr: &str, key: &Path) -> Option<serde_json::Value> {
    let (ok, out, _) = shoal(&[
        "overlay",
        "status",
        "--peer",
        addr,
        "--key",
        key.to_str().unwrap(),
        "--json",
        "--wait",
        "1s",
    ]);
    ok.then(|| serde_json::from_str(&out).unwrap())
}

fn state(v: &serde_json::Value, name: &str) -> String {
    v["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .map(|t| t["state"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

fn until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn peers_ping_spread_a_newer_list_notice_a_death_and_ignore_a_host_without_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let hosts = ["127.0.0.11", "127.0.0.12", "127.0.0.13", "127.0.0.14"];
    let port = free_port(&hosts);
    let key = t.join("overlay.key");
    let other_key = t.join("other.key");
    for k in [&key, &other_key] {
        assert!(shoal(&["overlay", "key", "--out", k.to_str().unwrap()]).0);
    }
    let (h1, h2, h3, h4) = (
        ("h1", hosts[0]),
        ("h2", hosts[1]),
        ("h3", hosts[2]),
        ("h4", hosts[3]),
    );
    let v1 = t.join("v1.toml");
    list(&v1, 1, port, &[h1, h2, h3]);
    let _p1 = peer(t, "h1", &key, &v1);
    let mut p2 = peer(t, "h2", &key, &v1);
    let _p3 = peer(t, "h3", &key, &v1);
    let a1 = format!("127.0.0.11:{port}");
    let a3 = format!("127.0.0.13:{port}");
    until("h1 to see h2 and h3 alive", 20, || {
        status(&a1, &key).is_some_and(|v| state(&v, "h2") == "alive" && state(&v, "h3") == "alive")
    });
    let v = status(&a1, &key).unwrap();
    assert_eq!(state(&v, "h1"), "self");
    assert!(v["counters"]["pings_sent"].as_u64().unwrap() > 0);

    // A second start on the same directory finds the running one and exits.
    let (ok, out, err) = shoal(&[
        "overlay",
        "peer",
        "--dir",
        t.join("h1").to_str().unwrap(),
        "--name",
        "h1",
        "--key",
        key.to_str().unwrap(),
    ]);
    assert!(ok && out.contains("already runs"), "{out}{err}");

    // h4 holds another key: its pings are dropped unread, and a client with
    // that key gets no answer from h1.
    let v4 = t.join("v4.toml");
    list(&v4, 1, port, &[h1, h2, h3, h4]);
    let _p4 = peer(t, "h4", &other_key, &v4);
    let (ok, _, err) = shoal(&[
        "overlay",
        "status",
        "--peer",
        &a1,
        "--key",
        other_key.to_str().unwrap(),
        "--wait",
        "1s",
    ]);
    assert!(!ok && err.contains("overlay key"), "{err}");

    // Version 2 lists h4; handed to h3, it reaches h1 through the pings.
    let v2 = t.join("v2.toml");
    list(&v2, 2, port, &[h1, h2, h3, h4]);
    let (ok, out, err) = shoal(&[
        "overlay",
        "targets",
        "set",
        v2.to_str().unwrap(),
        "--peer",
        &a3,
        "--key",
        key.to_str().unwrap(),
    ]);
    assert!(ok && out.contains("adopted"), "{out}{err}");
    let (ok, _, err) = shoal(&[
        "overlay",
        "targets",
        "set",
        v2.to_str().unwrap(),
        "--peer",
        &a3,
        "--key",
        key.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("not newer"), "{err}");
    until("version 2 at h1", 20, || {
        status(&a1, &key).is_some_and(|v| v["versions"]["targets"]["number"] == 2)
    });
    // h4 never counts as alive; h1 contacts it, and without an SSH deployer
    // the contact fails and says so.
    until("h1 to contact h4", 20, || {
        status(&a1, &key).is_some_and(|v| state(&v, "h4") == "failed")
    });
    let v = status(&a1, &key).unwrap();
    let h4v = v["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "h4")
        .unwrap()
        .clone();
    assert!(h4v["last_seen_ms"].is_null(), "{h4v}");
    assert!(h4v["detail"].as_str().unwrap().contains("SSH"), "{h4v}");
    // The stored list is the new one, compressed.
    assert!(t.join("h1/targets.json.gz").exists());

    // kill -9 of h2: h1 stops hearing from it and contacts it.
    p2.0.kill().unwrap();
    p2.0.wait().unwrap();
    until("h1 to notice h2's death", 20, || {
        status(&a1, &key).is_some_and(|v| state(&v, "h2") == "failed")
    });
}
