//! The bandwidth shaper and `shoal www --cache-mb` on a real link: a
//! backend namespace joined to this one by a veth pair, its egress capped
//! by the agent's htb class, the cap changed in place, the offered rate
//! read from the class's counters, and the bounded cache's misses read
//! from disk. A few seconds; needs root and iproute2.

mod common;
use common::*;
use shoal_agent::shaper::{Shaper, parse_class_stats};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

fn sh(args: &[&str]) -> String {
    let o = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// One namespace behind a veth pair; removed on drop.
struct Backend {
    ns: String,
    host_if: String,
    net: u32,
}

impl Backend {
    fn new() -> Backend {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root (network namespaces, tc)"
        );
        let tag = format!("{:x}", std::process::id() & 0xffff);
        // 10.212/16: discovery uses 10.213, `shoal up --netns` 10.214, the
        // namespace lab 10.215.
        let net = std::process::id() % 200 + 1;
        let b = Backend {
            ns: format!("shoal-bw-{tag}"),
            host_if: format!("shbw{tag}"),
            net,
        };
        sh(&["ip", "netns", "add", &b.ns]);
        sh(&[
            "ip", "link", "add", &b.host_if, "type", "veth", "peer", "name", "eth0", "netns", &b.ns,
        ]);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("10.212.{net}.2/24"),
            "dev",
            &b.host_if,
        ]);
        sh(&["ip", "link", "set", &b.host_if, "up"]);
        let a = format!("10.212.{net}.1/24");
        sh(&["ip", "-n", &b.ns, "addr", "add", &a, "dev", "eth0"]);
        sh(&["ip", "-n", &b.ns, "link", "set", "eth0", "up"]);
        sh(&["ip", "-n", &b.ns, "link", "set", "lo", "up"]);
        b
    }

    fn ip(&self) -> String {
        format!("10.212.{}.1", self.net)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
    }
}

/// GET over a fresh connection: (status line, body).
fn get(addr: &str, path: &str) -> (String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut v = Vec::new();
    s.read_to_end(&mut v).unwrap();
    let i = v
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("headers");
    let head = String::from_utf8_lossy(&v[..i]).to_string();
    (
        head.lines().next().unwrap_or("").to_string(),
        v[i + 4..].to_vec(),
    )
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} missing in:\n{text}"))
}

#[test]
fn an_htb_class_caps_a_backend_and_its_cache_misses_read_the_disk() {
    let b = Backend::new();
    let dir = tempfile::tempdir().unwrap();
    let big: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(dir.path().join("big.bin"), &big).unwrap();
    std::fs::write(dir.path().join("small.txt"), "hello\n").unwrap();
    let listen = format!("{}:8080", b.ip());
    let root = dir.path().to_str().unwrap().to_string();
    let www = Proc::spawn_cmd(
        "www",
        Command::new("ip").args([
            "netns",
            "exec",
            &b.ns,
            BIN,
            "www",
            "--listen",
            &listen,
            "--root",
            &root,
            "--cache-mb",
            "1",
        ]),
    );
    www.wait_output("serving", Duration::from_secs(10));

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ns_prefix = vec![
        "ip".to_string(),
        "netns".into(),
        "exec".into(),
        b.ns.clone(),
    ];
    let mut shaper = Shaper::new("eth0", ns_prefix);
    rt.block_on(shaper.set_cap("svc-web", 8080, 1_000_000))
        .unwrap();
    let t0 = Instant::now();
    rt.block_on(shaper.sample(0.0)).unwrap();

    // 2 MB through a 1 MB/s class: the object is bigger than the 1 MB
    // cache, so it is read from disk, and it cannot arrive in much under
    // two seconds (a lower bound only: a slow machine is slower still).
    let (status, body) = get(&listen, "/big.bin");
    let took = t0.elapsed();
    assert!(status.contains("200"), "{status}");
    assert_eq!(body, big);
    assert!(took >= Duration::from_millis(1500), "took {took:?}");
    rt.block_on(shaper.sample(t0.elapsed().as_secs_f64()))
        .unwrap();
    let bw = shaper.bandwidth("svc-web").unwrap();
    assert_eq!(bw.cap_bps, Some(1_000_000));
    assert!(bw.sent_bps > 0.0 && bw.offered_bps >= bw.sent_bps, "{bw:?}");

    // Changed in place: the same class, the new rate.
    rt.block_on(shaper.set_cap("svc-web", 8080, 4_000_000))
        .unwrap();
    let show = sh(&[
        "ip", "netns", "exec", &b.ns, "tc", "-s", "class", "show", "dev", "eth0",
    ]);
    let stats = parse_class_stats(&show);
    assert_eq!(stats.len(), 1, "{show}");
    assert!(stats[&0x10].bytes >= 2_000_000, "{show}");
    // tc prints 4,000,000 bytes/s as 32Mbit.
    assert!(show.contains(" rate 32Mbit "), "{show}");

    // The small object is cached after its first read; the big one never.
    assert_eq!(get(&listen, "/small.txt").1, b"hello\n");
    assert_eq!(get(&listen, "/small.txt").1, b"hello\n");
    let (_, m) = get(&listen, "/_shoal/metrics");
    let m = String::from_utf8(m).unwrap();
    assert_eq!(metric(&m, "shoal_www_cache_hits_total"), 1, "{m}");
    assert_eq!(metric(&m, "shoal_www_cache_misses_total"), 2, "{m}");
    assert_eq!(
        metric(&m, "shoal_www_disk_read_bytes_total"),
        2_000_006,
        "{m}"
    );
    assert_eq!(metric(&m, "shoal_www_cache_bytes"), 6, "{m}");

    rt.block_on(shaper.teardown()).unwrap();
    let show = sh(&[
        "ip", "netns", "exec", &b.ns, "tc", "-s", "class", "show", "dev", "eth0",
    ]);
    assert!(parse_class_stats(&show).is_empty(), "{show}");
}

/// A veth pair of this test's own in this namespace (these kernels have
/// no dummy links), removed on drop: an agent's shaper can put its htb
/// classes on one end without touching any other interface.
struct Dummy(String);

impl Dummy {
    fn new(suffix: &str) -> Dummy {
        let name = format!("shbw{:x}{suffix}", std::process::id() & 0xffff);
        let peer = format!("{name}p");
        sh(&[
            "ip", "link", "add", &name, "type", "veth", "peer", "name", &peer,
        ]);
        sh(&["ip", "link", "set", &name, "up"]);
        sh(&["ip", "link", "set", &peer, "up"]);
        Dummy(name)
    }

    /// The htb classes on the link, as tc prints them.
    fn rates(&self) -> String {
        sh(&["tc", "class", "show", "dev", &self.0])
    }
}

impl Drop for Dummy {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).output();
    }
}

/// Asserts that the link's htb class runs at `cap` bytes/s, as tc prints
/// it (rounded: 3789474 B/s is "30315Kbit").
fn assert_class_rate(d: &Dummy, cap: u64) {
    let text = d.rates();
    let rate = text
        .split_whitespace()
        .skip_while(|w| *w != "rate")
        .nth(1)
        .unwrap_or_else(|| panic!("{}: no rate in {text}", d.0));
    let (num, unit) = rate.split_at(rate.find(|c: char| c.is_alphabetic()).unwrap_or(rate.len()));
    let scale = match unit {
        "bit" => 1.0,
        "Kbit" => 1e3,
        "Mbit" => 1e6,
        "Gbit" => 1e9,
        _ => panic!("{}: unknown rate unit in {rate}", d.0),
    };
    let bits = num.parse::<f64>().unwrap() * scale;
    let want = cap as f64 * 8.0;
    assert!(
        (bits - want).abs() <= want * 1e-3,
        "{}: class at {rate}, cap {cap} B/s: {text}",
        d.0
    );
}

/// Per server of the service: name, up, cap and the cap its node applied.
type ServerCap = (String, bool, u64, Option<u64>);

fn server_caps(c: &Cluster) -> Option<Vec<ServerCap>> {
    let svc = c.service("web")?;
    let servers = svc["bandwidth"]["servers"].as_array()?;
    Some(
        servers
            .iter()
            .map(|s| {
                (
                    s["server"].as_str().unwrap_or("").to_string(),
                    s["up"].as_bool().unwrap_or(false),
                    s["cap_bps"].as_u64().unwrap_or(0),
                    s["applied_bps"].as_u64(),
                )
            })
            .collect(),
    )
}

/// The manager's directory, the renewals and the agents' shapers end to
/// end: a service with `[bandwidth] total = "8 MB/s"` on two agents
/// started with `--shape-dev`, each given half as an htb class on its
/// device and acknowledging it; one agent killed, its node declared
/// failed, and its share moved to the survivor, whose class follows.
#[test]
fn the_manager_s_caps_reach_the_agents_tc_classes_and_a_failed_node_s_share_moves() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (tc on dummy links)"
    );
    let (da, db) = (Dummy::new("a"), Dummy::new("b"));
    let c = Cluster::start(2.0);
    let _a = c.agent_at_with("n1", "127.0.0.31", &["--shape-dev", &da.0]);
    let mut b = c.agent_at_with("n2", "127.0.0.32", &["--shape-dev", &db.0]);
    c.wait_alive(&["n1", "n2"]);
    let root = c.dir().join("site");
    write(&root.join("index.html"), "hello\n");
    let port = free_port();
    let file = c.dir().join("web.toml");
    write(
        &file,
        &format!(
            r#"
name = "web"
min_nodes = 2
max_nodes = 2
[app]
adaptor = "www"
port = {port}
[app.params]
listen = "{{{{ node_address }}}}:{{{{ port }}}}"
root = "{}"
[dispatch]
algo = "lc"
[metric]
kind = "dispatch_rps"
capacity = 1000
[bandwidth]
total = "8 MB/s"
interval = "1s"
"#,
            root.display()
        ),
    );
    let (ok, out, err) = c.cli(&["service", "apply", file.to_str().unwrap()]);
    assert!(ok, "apply failed: {out}{err}");
    // Both servers capped and each cap acknowledged by its node, the caps
    // within the total, and each node's class at its cap. (Half each when
    // both report no demand at once; the first samples may land a renewal
    // apart, and then eq. 3.2 moves a little share first, reduction before
    // increase.)
    let caps = wait_for("both caps applied", Duration::from_secs(90), || {
        let caps = server_caps(&c)?;
        eprintln!("{caps:?}");
        (caps.len() == 2
            && caps
                .iter()
                .all(|(_, up, cap, applied)| *up && *cap > 0 && *applied == Some(*cap)))
        .then_some(caps)
    });
    assert!(
        caps.iter().map(|s| s.2).sum::<u64>() <= 8_000_000,
        "{caps:?}"
    );
    for (d, name) in [(&da, "n1"), (&db, "n2")] {
        let cap = caps.iter().find(|s| s.0 == name).unwrap().2;
        assert_class_rate(d, cap);
    }
    // n2's agent dies; its lease runs out and its share goes to n1.
    b.kill9();
    wait_for(
        "n1 holding the whole total",
        Duration::from_secs(90),
        || {
            let caps = server_caps(&c)?;
            eprintln!("{caps:?}");
            let n1 = caps.iter().find(|s| s.0 == "n1")?;
            (n1.2 == 8_000_000 && n1.3 == Some(8_000_000)).then_some(())
        },
    );
    assert_class_rate(&da, 8_000_000);
    let svc = c.service("web").unwrap();
    assert!(
        svc["bandwidth"]["in_force_bps"].as_u64().unwrap() <= 8_000_000,
        "{svc}"
    );
}
