//! Where the overlay's SSH credential lives (issue 16, "Must show"), over
//! real OpenSSH servers in network namespaces:
//!
//! - With `--key FILE`, fanotify watches the private key file for the whole
//!   self-deployment: the auth agent is the only process that opens or
//!   reads it (the watch sees the agent's own read, so it would see any
//!   other), and every login is in its audit log.
//! - With `--ssh-agent`, the key stays in a real OpenSSH ssh-agent (as it
//!   would in a hardware token): the auth agent forwards the signing, and
//!   the pool deploys itself just the same.

mod common;
use common::*;
use nix::sys::fanotify::{EventFFlags, Fanotify, InitFlags, MarkFlags, MaskFlags};
use shoal_overlay::netlab::{self, Lab};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const HOSTS: usize = 3;

/// What every pool needs besides the auth agent: key, release, targets.
struct Prepared {
    key: String,
    release: String,
    targets: String,
}

fn prepare(lab: &Lab, d: &Path) -> Prepared {
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let key = s(&d.join("overlay.key"));
    assert!(run(&["overlay", "key", "--out", &key]).0);
    let rkey = s(&d.join("release.key"));
    assert!(run(&["overlay", "release-key", "--out", &rkey]).0);
    let release = s(&d.join("release"));
    let (ok, _, err) = run(&[
        "overlay",
        "release",
        "--release-key",
        &rkey,
        "--out",
        &release,
    ]);
    assert!(ok, "{err}");
    let targets = s(&d.join("targets.toml"));
    std::fs::write(&targets, lab.targets_toml(1, &[])).unwrap();
    Prepared {
        key,
        release,
        targets,
    }
}

fn auth_agent(lab: &Lab, p: &Prepared, dir: &Path, source: &[&str], env: &[(&str, &str)]) -> Child {
    auth_agent_at(7947, lab, p, dir, source, env)
}

fn auth_agent_at(
    port: u16,
    lab: &Lab,
    p: &Prepared,
    dir: &Path,
    source: &[&str],
    env: &[(&str, &str)],
) -> Child {
    let mut c = Command::new(env!("CARGO_BIN_EXE_shoal"));
    c.arg("auth-agent")
        .arg("--dir")
        .arg(dir)
        .args(source)
        .args(["--listen", &format!("{}:{port}", lab.bridge_ip())])
        .args(["--overlay-key", &p.key, "--targets", &p.targets])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("auth-agent.err")).unwrap());
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c.spawn().unwrap();
    // It prints its address once it listens.
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert!(
        line.contains("auth agent listening"),
        "{line}{}",
        std::fs::read_to_string(dir.join("auth-agent.err")).unwrap_or_default()
    );
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    child
}

/// Seeds h1 and waits until every host runs its peer.
fn seed_and_spread(lab: &Lab, p: &Prepared) -> f64 {
    seed_with_agents(lab, p, &[7947], || {})
}

/// Seeds h1 naming the auth agents on `ports`, runs `then`, and waits
/// until every host runs its peer.
fn seed_with_agents(lab: &Lab, p: &Prepared, ports: &[u16], then: impl FnOnce()) -> f64 {
    let began = Instant::now();
    let agents: Vec<String> = ports
        .iter()
        .map(|port| format!("{}:{port}", lab.bridge_ip()))
        .collect();
    let mut args = vec![
        "overlay",
        "seed",
        "h1",
        "--targets",
        &p.targets,
        "--key",
        &p.key,
        "--release",
        &p.release,
        "--interval",
        "300ms",
        "--timeout",
        "200ms",
    ];
    for a in &agents {
        args.extend(["--auth-agent", a.as_str()]);
    }
    let (ok, out, err) = run(&args);
    assert!(ok, "seed: {out}{err}");
    then();
    wait_for("every host runs its peer", Duration::from_secs(60), || {
        lab.peers_by_host()
            .iter()
            .all(|p| p.len() == 1)
            .then_some(())
    });
    began.elapsed().as_secs_f64()
}

/// A directory `name` for an auth agent, with a new SSH key `id_ed25519`
/// authorized on every host of the lab; returns the directory and the key.
fn key_dir(lab: &Lab, d: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = d.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let id = dir.join("id_ed25519");
    netlab::keygen(&id).unwrap();
    lab.authorize(&dir.join("id_ed25519.pub")).unwrap();
    (dir, id)
}

fn signed(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("audit.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("\"signed\":true"))
        .count()
}

#[test]
fn only_the_auth_agent_ever_opens_the_ssh_key() {
    if !root_with_sshd() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let lab = Lab::create(d, HOSTS).unwrap();
    let p = prepare(&lab, d);
    let (adir, id) = key_dir(&lab, d, "agent");

    // Watch the key file from before the auth agent starts to the end.
    let fan = Fanotify::init(
        InitFlags::FAN_CLASS_NOTIF | InitFlags::FAN_CLOEXEC | InitFlags::FAN_NONBLOCK,
        EventFFlags::O_RDONLY,
    )
    .expect("fanotify_init (root, Linux >= 2.6.37)");
    fan.mark(
        MarkFlags::FAN_MARK_ADD,
        MaskFlags::FAN_OPEN | MaskFlags::FAN_ACCESS,
        None,
        Some(&id),
    )
    .unwrap();
    let mut agent = auth_agent(&lab, &p, &adir, &["--key", id.to_str().unwrap()], &[]);
    let took = seed_and_spread(&lab, &p);
    // Kill one peer, so a recovery logs in too.
    let victim = lab.peers(1)[0];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_for("h2 recovered", Duration::from_secs(30), || {
        lab.peers(1)
            .first()
            .is_some_and(|&p| p != victim)
            .then_some(())
    });

    let mut openers = std::collections::BTreeMap::<i32, usize>::new();
    loop {
        match fan.read_events() {
            Ok(evs) if !evs.is_empty() => {
                for e in evs {
                    *openers.entry(e.pid()).or_default() += 1;
                }
            }
            _ => break,
        }
    }
    let logins = signed(&adir);
    eprintln!(
        "measured: {HOSTS} hosts deployed in {took:.2} s and one recovered, {logins} logins signed; key file opened or read by {openers:?} (auth agent pid {})",
        agent.id()
    );
    assert!(
        openers.contains_key(&(agent.id() as i32)),
        "the watch saw the auth agent read its key: {openers:?}"
    );
    assert_eq!(
        openers.keys().copied().collect::<Vec<_>>(),
        vec![agent.id() as i32],
        "no process but the auth agent touched the key"
    );
    assert!(logins >= HOSTS, "{logins} logins signed");
    let _ = agent.kill();
    let _ = agent.wait();
}

#[test]
fn the_auth_agent_signs_through_a_real_ssh_agent() {
    if !root_with_sshd() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let lab = Lab::create(d, HOSTS).unwrap();
    let p = prepare(&lab, d);
    // The key goes into ssh-agent, and its file away: only ssh-agent holds it.
    let (adir, id) = key_dir(&lab, d, "agent");
    let sock = d.join("ssh-agent.sock");
    let mut ssh_agent = Command::new("ssh-agent")
        .args(["-D", "-a"])
        .arg(&sock)
        .stdout(Stdio::null())
        .spawn()
        .expect("ssh-agent (Debian openssh-client)");
    wait_for("ssh-agent's socket", Duration::from_secs(10), || {
        sock.exists().then_some(())
    });
    let added = Command::new("ssh-add")
        .arg(&id)
        .env("SSH_AUTH_SOCK", &sock)
        .output()
        .unwrap();
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    std::fs::remove_file(&id).unwrap();

    let mut agent = auth_agent(
        &lab,
        &p,
        &adir,
        &["--ssh-agent"],
        &[("SSH_AUTH_SOCK", sock.to_str().unwrap())],
    );
    let took = seed_and_spread(&lab, &p);
    let logins = signed(&adir);
    eprintln!(
        "measured: {HOSTS} hosts deployed through ssh-agent in {took:.2} s, {logins} logins signed"
    );
    assert!(logins >= HOSTS, "{logins} logins signed");
    let _ = agent.kill();
    let _ = agent.wait();
    let _ = ssh_agent.kill();
    let _ = ssh_agent.wait();
}

/// Two auth agents, each with its own key authorized on every target: the
/// seed names both; one is killed as soon as the seed is in, and the pool
/// deploys itself through the other.
#[test]
fn replicated_auth_agents_keep_the_pool_deploying_when_one_dies() {
    if !root_with_sshd() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let lab = Lab::create(d, HOSTS).unwrap();
    let p = prepare(&lab, d);
    let mut agents = Vec::new();
    let mut dirs = Vec::new();
    for (i, port) in [7947u16, 7948].into_iter().enumerate() {
        let (dir, id) = key_dir(&lab, d, &format!("agent{i}"));
        agents.push(auth_agent_at(
            port,
            &lab,
            &p,
            &dir,
            &["--key", id.to_str().unwrap()],
            &[],
        ));
        dirs.push(dir);
    }
    // Whichever signed the seed's login dies; the other must carry on.
    let mut dead = None;
    let took = seed_with_agents(&lab, &p, &[7947, 7948], || {
        let first = if signed(&dirs[0]) > 0 { 0 } else { 1 };
        let _ = agents[first].kill();
        let _ = agents[first].wait();
        dead = Some(first);
    });
    let dead = dead.unwrap();
    let alive = 1 - dead;
    let (before, after) = (signed(&dirs[dead]), signed(&dirs[alive]));
    eprintln!(
        "measured: {HOSTS} hosts deployed in {took:.2} s with auth agent {dead} killed after the seed; logins signed: {before} by the dead one, {after} by its replica"
    );
    assert!(before >= 1, "the seed's login went through agent {dead}");
    assert!(after >= HOSTS - 1, "{after} logins signed by the replica");
    let _ = agents[alive].kill();
    let _ = agents[alive].wait();
}
