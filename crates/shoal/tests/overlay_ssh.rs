//! SMON's self-deployment and self-recovery over real OpenSSH servers: one
//! sshd per network namespace on a private bridge, each with its own host
//! key and install prefix; the auth agent on the bridge holds the only SSH
//! key. `shoal overlay seed` deploys the first peer; the pool deploys the
//! rest, recovers peers killed with SIGKILL, never deploys to the host whose
//! host key is not the listed one, and the agent refuses to sign for a host
//! outside its list.

mod common;
use common::*;
use shoal_overlay::netlab::{self, Lab};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Hosts that should be deployed; one more has a wrong host key listed.
const HOSTS: usize = 4;

/// Host `i`'s peer's report (`i` counts from 1, as the names do).
fn status(net: &Lab, i: usize, key: &str) -> Option<serde_json::Value> {
    let (ok, out, _) = run(&[
        "overlay",
        "status",
        "--peer",
        &net.hosts()[i - 1].ip.to_string(),
        "--key",
        key,
        "--json",
        "--wait",
        "1s",
    ]);
    if !ok {
        return None;
    }
    serde_json::from_str(&out).ok()
}

#[test]
fn the_pool_deploys_and_heals_itself_over_ssh() {
    if !root_with_sshd() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let all = HOSTS + 1;
    let net = Lab::create(d, all).unwrap();

    // The only SSH key, for the auth agent alone.
    let agent_dir = d.join("agent");
    std::fs::create_dir_all(&agent_dir).unwrap();
    let id = agent_dir.join("id_ed25519");
    netlab::keygen(&id).unwrap();
    net.authorize(&id.with_extension("pub")).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let key = s(&d.join("overlay.key"));
    assert!(run(&["overlay", "key", "--out", &key]).0);
    let rkey = s(&d.join("release.key"));
    assert!(run(&["overlay", "release-key", "--out", &rkey]).0);
    let rel = s(&d.join("release"));
    let (ok, _, err) = run(&["overlay", "release", "--release-key", &rkey, "--out", &rel]);
    assert!(ok, "{err}");
    // The last host's listed key is another host's: an impostor.
    let toml = net.targets_toml(1, &[all - 1]);
    let targets = s(&d.join("targets.toml"));
    std::fs::write(&targets, &toml).unwrap();
    let agent_addr = format!("{}:7947", net.bridge_ip());
    let agent = Proc::spawn(
        "auth-agent",
        &[
            "auth-agent",
            "--dir",
            &s(&agent_dir),
            "--key",
            &s(&id),
            "--listen",
            &agent_addr,
            "--overlay-key",
            &key,
            "--targets",
            &targets,
        ],
    );
    agent.wait_output("auth agent listening", Duration::from_secs(10));

    // The seed: one deployment by hand, through the same deploy code.
    let t0 = Instant::now();
    let (ok, out, err) = run(&[
        "overlay",
        "seed",
        "h1",
        "--targets",
        &targets,
        "--key",
        &key,
        "--release",
        &rel,
        "--auth-agent",
        &agent_addr,
        "--interval",
        "300ms",
        "--timeout",
        "200ms",
    ]);
    assert!(ok, "seed: {out}{err}");
    assert!(out.contains("deployed h1"), "{out}");
    let seeded = t0.elapsed();

    // The pool deploys itself: every listed host with its right key runs
    // exactly one peer.
    let deployed = wait_for("all hosts deployed", Duration::from_secs(90), || {
        let n: Vec<usize> = (0..HOSTS).map(|i| net.peers(i).len()).collect();
        assert!(n.iter().all(|&k| k <= 1), "a host runs two peers: {n:?}");
        n.iter().all(|&k| k == 1).then(|| t0.elapsed())
    });
    eprintln!(
        "measured: seed {:.2} s, all {HOSTS} deployed {:.2} s after the seed began (300 ms interval)",
        seeded.as_secs_f64(),
        deployed.as_secs_f64()
    );
    for i in 1..=HOSTS {
        assert!(
            net.hosts()[i - 1].prefix.join("installed").exists(),
            "h{i} has no marker"
        );
    }

    // The impostor is never deployed to, and is reported.
    let impostor = format!("h{all}");
    wait_for(
        "the wrong host key reported",
        Duration::from_secs(30),
        || {
            (1..=HOSTS).find(|&i| {
                status(&net, i, &key).is_some_and(|r| {
                    r["targets"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|t| t["name"] == impostor.as_str() && t["state"] == "wrong-host-key")
                })
            })
        },
    );
    assert!(
        !net.hosts()[all - 1].prefix.exists(),
        "nothing may be written on the host with the wrong key"
    );

    // kill -9 of two peers: each recovered, one peer per host throughout.
    for victim in [2, 3] {
        let old = net.peers(victim - 1);
        assert_eq!(old.len(), 1);
        let t = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(old[0]),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        wait_for("recovery", Duration::from_secs(30), || {
            let now = net.peers(victim - 1);
            assert!(now.len() <= 1, "h{victim} runs two peers");
            (now.len() == 1 && now[0] != old[0]).then_some(())
        });
        eprintln!(
            "measured: h{victim} recovered {:.2} s after kill -9",
            t.elapsed().as_secs_f64()
        );
    }
    // Once recovered, one peer per host. Under load (the full suite on 2
    // cores) a host was once seen with none right after its recovery was
    // seen: the pool heals that too, so wait for it, but never accept two.
    let gap = Instant::now();
    wait_for("one peer on every host", Duration::from_secs(30), || {
        let counts: Vec<usize> = (1..=HOSTS).map(|i| net.peers(i - 1).len()).collect();
        assert!(
            counts.iter().all(|&n| n <= 1),
            "two peers on a host: {counts:?}"
        );
        counts.iter().all(|&n| n == 1).then_some(())
    });
    if gap.elapsed() > Duration::from_millis(200) {
        eprintln!(
            "measured: a host had no peer for {:.2} s after the recoveries",
            gap.elapsed().as_secs_f64()
        );
    }

    // The auth agent: no answer without the overlay key; a refusal for a
    // host outside its list; an audit line for every request.
    let audit = std::fs::read_to_string(agent_dir.join("audit.log")).unwrap();
    let signed = audit
        .lines()
        .filter(|l| l.contains("\"signed\":true"))
        .count();
    assert!(signed > HOSTS, "one signature per login: {audit}");
    assert!(
        !audit.contains(&format!("\"target\":\"{impostor}\"")),
        "the impostor's login never reached the agent: the host key check came first"
    );
    let addr: std::net::SocketAddr = agent_addr.parse().unwrap();
    let k = shoal_overlay::files::read_key(Path::new(&key)).unwrap();
    let r = sign_request(addr, &k, "nowhere").unwrap();
    assert!(
        r.as_ref()
            .is_err_and(|e| e.contains("not in the auth agent's target list")),
        "{r:?}"
    );
    let other = s(&d.join("other.key"));
    assert!(run(&["overlay", "key", "--out", &other]).0);
    let k2 = shoal_overlay::files::read_key(Path::new(&other)).unwrap();
    let e = sign_request(addr, &k2, "h1").unwrap_err();
    assert!(e.contains("no answer"), "{e}");
    let audit = std::fs::read_to_string(agent_dir.join("audit.log")).unwrap();
    assert!(audit.contains("\"target\":\"nowhere\"") && audit.contains("\"signed\":false"));

    // The private key is in no package and no prefix.
    let private = std::fs::read_to_string(&id).unwrap();
    let secret_line = private.lines().nth(2).unwrap().to_string();
    let hits = Command::new("grep")
        .args(["-rlF", &secret_line])
        .arg(d)
        .output()
        .unwrap();
    let hits = String::from_utf8_lossy(&hits.stdout).into_owned();
    assert_eq!(
        hits.lines().collect::<Vec<_>>(),
        vec![id.to_str().unwrap()],
        "the private key is only in the auth agent's file"
    );
    drop(agent);
}

/// Asks the auth agent to sign a login into `target`.
fn sign_request(
    agent: std::net::SocketAddr,
    key: &shoal_overlay::seal::OverlayKey,
    target: &str,
) -> Result<Result<String, String>, String> {
    use shoal_overlay::wire::Body;
    // A well-formed RFC 4252 publickey request.
    let mut data = Vec::new();
    let mut put = |b: &[u8]| {
        data.extend_from_slice(&(b.len() as u32).to_be_bytes());
        data.extend_from_slice(b);
    };
    put(&[9; 32]);
    let mut data2 = data.clone();
    data2.push(50);
    let mut rest = Vec::new();
    for b in [&b"root"[..], b"ssh-connection", b"publickey"] {
        rest.extend_from_slice(&(b.len() as u32).to_be_bytes());
        rest.extend_from_slice(b);
    }
    rest.push(1);
    for b in [&b"ssh-ed25519"[..], b"blob"] {
        rest.extend_from_slice(&(b.len() as u32).to_be_bytes());
        rest.extend_from_slice(b);
    }
    data2.extend_from_slice(&rest);
    let body = Body::AgentSign {
        id: 1,
        target: target.into(),
        host_key: String::new(),
        list: shoal_core::overlay::Version::new(0, 0),
        data: hex(&data2),
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(shoal_overlay::client::request(
            agent,
            key,
            body,
            Duration::from_secs(2),
            |b| match b {
                Body::AgentSigned { result, .. } => Some(result),
                _ => None,
            },
        ))
        .map_err(|e| format!("{e:#}"))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
