//! Keyed multicast discovery between real network namespaces joined by a
//! bridge: a node with the key finds the manager without an address; a node
//! without it hears nothing.

mod common;
use common::*;
use std::process::Command;
use std::time::Duration;

fn sh(args: &[&str]) {
    let o = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Two namespaces on a private bridge; removed on drop.
struct Net {
    tag: String,
}

impl Net {
    fn new() -> Net {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root (network namespaces)"
        );
        let tag = format!("{:x}", std::process::id() & 0xffff);
        let n = Net { tag: tag.clone() };
        let br = format!("shbr{tag}");
        sh(&["ip", "link", "add", &br, "type", "bridge"]);
        sh(&["ip", "link", "set", &br, "up"]);
        for (i, role) in ["m", "a", "x"].iter().enumerate() {
            let ns = n.ns(role);
            let host = format!("sh{role}{tag}");
            sh(&["ip", "netns", "add", &ns]);
            sh(&[
                "ip", "link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ]);
            sh(&["ip", "link", "set", &host, "master", &br]);
            sh(&["ip", "link", "set", &host, "up"]);
            let addr = format!("10.213.{}.{}/24", (std::process::id() % 200) + 1, i + 1);
            sh(&["ip", "-n", &ns, "addr", "add", &addr, "dev", "eth0"]);
            sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        }
        n
    }
    fn ns(&self, role: &str) -> String {
        format!("shoal-{role}-{}", self.tag)
    }
    fn ip(&self, i: u32) -> String {
        format!("10.213.{}.{}", (std::process::id() % 200) + 1, i)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for role in ["m", "a", "x"] {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(role)])
                .status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &format!("shbr{}", self.tag)])
            .status();
    }
}

fn in_ns(ns: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, BIN]).args(args);
    c
}

#[test]
fn discovery_finds_the_manager_only_with_the_key() {
    let net = Net::new();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c");
    let listen = format!("{}:7400", net.ip(1));
    let (ok, _, err) = run(&[
        "init",
        "--dir",
        dir.to_str().unwrap(),
        "--listen",
        &listen,
        "--lease-ttl",
        "2",
    ]);
    assert!(ok, "{err}");
    let token = run(&["token", "--dir", dir.to_str().unwrap()])
        .1
        .trim()
        .to_string();
    let m = Proc::spawn_cmd(
        "manager",
        &mut in_ns(&net.ns("m"), &["manager", "--dir", dir.to_str().unwrap()]),
    );
    m.wait_output("listening on", Duration::from_secs(20));

    // With the key: found, joined, registered, with its own address.
    let ad = tmp.path().join("agent");
    let a = Proc::spawn_cmd(
        "agent",
        &mut in_ns(
            &net.ns("a"),
            &[
                "agent",
                "--discover",
                "--token",
                &token,
                "--name",
                "far",
                "--roles",
                "web",
                "--dir",
                ad.to_str().unwrap(),
            ],
        ),
    );
    let out = a.wait_output("registered far", Duration::from_secs(30));
    assert!(
        out.contains(&format!("discovered the manager at https://{listen}")),
        "{out}"
    );
    let status = || {
        let o = in_ns(
            &net.ns("m"),
            &["status", "--dir", dir.to_str().unwrap(), "--json"],
        )
        .output()
        .unwrap();
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap_or_default()
    };
    let far = wait_for("far alive", Duration::from_secs(20), || {
        status()["nodes"]
            .as_array()?
            .iter()
            .find(|n| n["name"] == "far" && n["state"] == "alive")
            .cloned()
    });
    assert_eq!(
        far["address"],
        net.ip(2),
        "the node registers the address it reaches the manager from"
    );

    // Without the key (another cluster's token): the manager stays silent.
    let other = tmp.path().join("other");
    assert!(run(&["init", "--dir", other.to_str().unwrap()]).0);
    let foreign = run(&["token", "--dir", other.to_str().unwrap()])
        .1
        .trim()
        .to_string();
    let xd = tmp.path().join("stranger");
    let o = in_ns(
        &net.ns("x"),
        &[
            "agent",
            "--discover",
            "--discover-timeout",
            "3",
            "--token",
            &foreign,
            "--name",
            "stranger",
            "--dir",
            xd.to_str().unwrap(),
        ],
    )
    .output()
    .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no manager holding this token answered"),
        "{err}"
    );
    assert!(
        status()["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["name"] != "stranger")
    );
    drop(a);
    drop(m);
}
