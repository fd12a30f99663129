//! SMON's second half on namespace hosts (issue 17, "Must show"), through
//! the real binary, with a `www` app of the overlay serving HTTP on every
//! host under a load loop that counts every failed request:
//!
//! - an app installed at one peer reaches every host and runs there;
//! - a release handed to one peer reaches every host: each peer re-executes
//!   in place (same pid) and re-adopts its app (same pid);
//! - a release signed by another key, and one whose binary is not the
//!   released one, are refused by every peer, with the reason;
//! - a release that cannot run, taken by every host, is rolled back on
//!   every host by its watchdog and marked bad everywhere;
//! - online is restarted after kill -9, offline stays stopped, ignore is
//!   started once and left alone after kill -9;
//! - disable: every peer stops (measured); a peer killed while disabled
//!   stays dead; enable at a surviving peer brings healing back; disabled
//!   again, every peer exits after its quiet period (measured).
//!
//! The load loop must see zero failed requests from the app's install to
//! the end. Hosts: `SHOAL_OVERLAY_HOSTS` (default 6; the figures in
//! docs/overlay.md are from 16).

mod common;
use common::*;
use shoal_overlay::netlab::{self, Lab, Overlay};
use shoal_overlay::wire::StatusReport;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const INTERVAL_MS: u64 = 500;
const TIMEOUT_MS: u64 = 300;

fn hosts() -> usize {
    std::env::var("SHOAL_OVERLAY_HOSTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6)
}

/// Every host's report (`None`: no answer).
fn reports(lab: &Lab, key: &shoal_overlay::seal::OverlayKey) -> Vec<Option<StatusReport>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let asks = lab.hosts().iter().map(|h| {
            let addr = std::net::SocketAddr::from((h.ip, 7946));
            shoal_overlay::client::status(addr, key, Duration::from_millis(800))
        });
        futures_util::future::join_all(asks)
            .await
            .into_iter()
            .map(Result::ok)
            .collect()
    })
}

fn app_pid(r: &StatusReport) -> Option<u32> {
    r.apps
        .iter()
        .find(|a| a.name == "web" && a.running)
        .and_then(|a| a.pid)
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with('Z'))
    })
}

/// Counts HTTP failures against every host's app until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    last_error: Arc<std::sync::Mutex<Option<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(addrs: Vec<String>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let last_error = Arc::new(std::sync::Mutex::new(None));
        let (s, o, f, e) = (stop.clone(), ok.clone(), failed.clone(), last_error.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                for a in &addrs {
                    match http_get(a, "/index.html") {
                        Some((200, body)) if body.contains("shoal overlay app") => {
                            o.fetch_add(1, Ordering::Relaxed);
                        }
                        other => {
                            f.fetch_add(1, Ordering::Relaxed);
                            *e.lock().unwrap() = Some(format!("{a}: {other:?}"));
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Load {
            stop,
            ok,
            failed,
            last_error,
            thread: Some(thread),
        }
    }

    fn check(&self, when: &str) {
        let f = self.failed.load(Ordering::Relaxed);
        assert_eq!(
            f,
            0,
            "{f} failed request(s) by {when} ({} ok); last: {:?}",
            self.ok.load(Ordering::Relaxed),
            self.last_error.lock().unwrap()
        );
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// Signs `binary` as release `version` with `key` into `out`.
fn release(key: &Path, binary: &Path, version: u64, out: &Path) {
    let (ok, o, e) = run(&[
        "overlay",
        "release",
        "--release-key",
        &s(key),
        "--binary",
        &s(binary),
        "--version",
        &version.to_string(),
        "--out",
        &s(out),
    ]);
    assert!(ok, "release: {o}{e}");
}

#[test]
fn the_pool_upgrades_itself_keeps_its_apps_and_switches_off_and_on() {
    if !root_with_sshd() {
        return;
    }
    let n = hosts();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let lab = Lab::create(d, n).unwrap();
    let shoal = PathBuf::from(BIN);
    let ov = Overlay::prepare(&lab, &shoal, &d.join("op"), &[]).unwrap();
    let key = shoal_overlay::files::read_key(&ov.key).unwrap();
    let peer1 = format!("{}", lab.hosts()[0].ip);
    let kf = s(&ov.key);
    let interval = Duration::from_millis(INTERVAL_MS);

    let out = ov
        .seed_command("h1", interval, Duration::from_millis(TIMEOUT_MS))
        .output()
        .unwrap();
    assert!(out.status.success(), "seed: {out:?}");
    wait_for("every host deployed", Duration::from_secs(90), || {
        lab.peers_by_host()
            .iter()
            .all(|p| p.len() == 1)
            .then_some(())
    });
    let v1 = reports(&lab, &key)[0].as_ref().unwrap().versions.peer;

    // An app at one peer reaches every host.
    let pkg = d.join("web/site");
    std::fs::create_dir_all(&pkg).unwrap();
    std::fs::write(pkg.join("index.html"), "<h1>shoal overlay app</h1>\n").unwrap();
    let spec = d.join("web/web.toml");
    std::fs::write(
        &spec,
        "name = \"web\"\nversion = 1\nadaptor = \"www\"\nstate = \"online\"\npackage = \"site\"\n\
         [params]\nlisten = \"0.0.0.0:8080\"\nroot = \"{{ package }}\"\n",
    )
    .unwrap();
    let t = Instant::now();
    let (ok, o, e) = run(&[
        "overlay",
        "app",
        "install",
        &s(&spec),
        "--peer",
        &peer1,
        "--key",
        &kf,
    ]);
    assert!(ok, "app install: {o}{e}");
    let app_pids: Vec<u32> = wait_for(
        "the app runs on every host",
        Duration::from_secs(60),
        || {
            let r = reports(&lab, &key);
            r.iter()
                .map(|r| r.as_ref().and_then(app_pid))
                .collect::<Option<Vec<u32>>>()
        },
    );
    eprintln!(
        "measured: app installed at h1 running on all {n} hosts after {:.2} s ({:.1} rounds)",
        t.elapsed().as_secs_f64(),
        t.elapsed().as_millis() as f64 / INTERVAL_MS as f64
    );
    let addrs: Vec<String> = lab
        .hosts()
        .iter()
        .map(|h| format!("{}:8080", h.ip))
        .collect();
    let load = Load::start(addrs.clone());
    std::thread::sleep(Duration::from_millis(300));
    load.check("the app's start");

    // A new release at one peer reaches every host; peers and apps keep
    // their pids.
    let peer_pids = lab.peers_by_host();
    let v2_bin = d.join("shoal-v2");
    std::fs::copy(&shoal, &v2_bin).unwrap();
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&v2_bin)
            .unwrap();
        f.write_all(b"\nshoal test release 2\n").unwrap();
    }
    let rel_key = d.join("op/release.key");
    let rel2 = d.join("release-2");
    let v2 = v1.number + 1;
    release(&rel_key, &v2_bin, v2, &rel2);
    let t = Instant::now();
    let (ok, o, e) = run(&[
        "overlay",
        "upgrade",
        "--release",
        &s(&rel2),
        "--binary",
        &s(&v2_bin),
        "--peer",
        &peer1,
        "--key",
        &kf,
    ]);
    assert!(ok, "upgrade: {o}{e}");
    wait_for("every host on release 2", Duration::from_secs(90), || {
        reports(&lab, &key)
            .iter()
            .all(|r| r.as_ref().is_some_and(|r| r.versions.peer.number == v2))
            .then_some(())
    });
    eprintln!(
        "measured: release {v2} handed to h1 ran on all {n} hosts after {:.2} s ({:.1} rounds)",
        t.elapsed().as_secs_f64(),
        t.elapsed().as_millis() as f64 / INTERVAL_MS as f64
    );
    assert_eq!(
        lab.peers_by_host(),
        peer_pids,
        "every peer re-executed in place"
    );
    let r = reports(&lab, &key);
    for (i, (r, pid)) in r.iter().zip(&app_pids).enumerate() {
        let r = r.as_ref().unwrap();
        assert_eq!(
            app_pid(r),
            Some(*pid),
            "h{}: the app was re-adopted, not restarted",
            i + 1
        );
        let p = lab.hosts()[i].prefix.join("current/shoal");
        assert_eq!(
            std::fs::read(&p).unwrap().len(),
            std::fs::metadata(&v2_bin).unwrap().len() as usize,
            "{} is release 2",
            p.display()
        );
    }
    load.check("the upgrade");

    // Refused everywhere: another key, and a binary that is not the
    // released one.
    let other_key = d.join("other.key");
    assert!(run(&["overlay", "release-key", "--out", &s(&other_key)]).0);
    let forged = d.join("release-forged");
    release(&other_key, &v2_bin, v2 + 1, &forged);
    let (ok, o, e) = run(&[
        "overlay",
        "upgrade",
        "--release",
        &s(&forged),
        "--binary",
        &s(&v2_bin),
        "--peer",
        &peer1,
        "--key",
        &kf,
        "--all",
        "--timeout",
        "20s",
    ]);
    assert!(!ok, "a forged release was taken: {o}{e}");
    assert_eq!(
        o.lines().filter(|l| l.contains(": refused: ")).count(),
        n,
        "every peer refuses it: {o}{e}"
    );
    assert!(o.contains("not the trusted"), "{o}");
    let wrong = d.join("release-wrong-hash");
    release(&rel_key, &v2_bin, v2 + 5, &wrong);
    let (ok, o, e) = run(&[
        "overlay",
        "upgrade",
        "--release",
        &s(&wrong),
        "--binary",
        &s(&shoal),
        "--peer",
        &peer1,
        "--key",
        &kf,
        "--all",
        "--timeout",
        "20s",
    ]);
    assert!(!ok, "a wrong binary was taken: {o}{e}");
    assert_eq!(
        o.lines().filter(|l| l.contains(": refused: ")).count(),
        n,
        "every peer refuses it: {o}{e}"
    );
    assert!(o.contains("not the released"), "{o}");
    assert!(
        reports(&lab, &key)
            .iter()
            .all(|r| r.as_ref().is_some_and(|r| r.versions.peer.number == v2)),
        "nobody left release 2"
    );

    // A release that cannot run, taken by every host, rolls back on every
    // host and is marked bad everywhere.
    let broken = d.join("shoal-broken");
    std::fs::write(
        &broken,
        "#!/bin/sh\necho this release cannot start >&2\nexit 1\n",
    )
    .unwrap();
    let rel_bad = d.join("release-broken");
    let v_bad = v2 + 2;
    release(&rel_key, &broken, v_bad, &rel_bad);
    let t = Instant::now();
    let (_, o, e) = run(&[
        "overlay",
        "upgrade",
        "--release",
        &s(&rel_bad),
        "--binary",
        &s(&broken),
        "--peer",
        &peer1,
        "--key",
        &kf,
        "--all",
        "--timeout",
        "5s",
    ]);
    eprintln!("the broken release handed to every peer: {o}{e}");
    let rolled = wait_for("every host rolled back", Duration::from_secs(90), || {
        let r = reports(&lab, &key);
        r.iter()
            .all(|r| {
                r.as_ref().is_some_and(|r| {
                    r.versions.peer.number == v2 && r.upgrade.bad.iter().any(|b| b.number == v_bad)
                })
            })
            .then(|| t.elapsed())
    });
    eprintln!(
        "measured: a release that cannot start, taken by all {n} hosts, rolled back everywhere after {:.2} s",
        rolled.as_secs_f64()
    );
    for h in lab.hosts() {
        let log = std::fs::read_to_string(h.prefix.join("state/peer.log")).unwrap_or_default();
        assert!(
            log.contains("did not prove healthy"),
            "{}: its watchdog rolled back",
            h.name
        );
    }
    let (ok, o, _) = run(&[
        "overlay",
        "upgrade",
        "--release",
        &s(&rel_bad),
        "--binary",
        &s(&broken),
        "--peer",
        &peer1,
        "--key",
        &kf,
    ]);
    assert!(!ok && o.contains("marked bad"), "{o}");
    load.check("the rollback");
    drop(load);

    // Online: restarted after kill -9. Offline: stopped everywhere.
    // Ignore: started once, left dead after kill -9.
    let r = reports(&lab, &key);
    let victim = app_pid(r[1].as_ref().unwrap()).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let restarted = wait_for("online: restarted", Duration::from_secs(20), || {
        reports(&lab, &key)[1]
            .as_ref()
            .and_then(app_pid)
            .filter(|p| *p != victim)
    });
    assert!(alive(restarted));
    let (ok, o, e) = run(&[
        "overlay", "app", "state", "web", "offline", "--peer", &peer1, "--key", &kf,
    ]);
    assert!(ok, "{o}{e}");
    let t = Instant::now();
    wait_for("offline everywhere", Duration::from_secs(30), || {
        addrs
            .iter()
            .all(|a| http_get(a, "/index.html").is_none())
            .then_some(())
    });
    eprintln!(
        "measured: offline reached all {n} hosts (app stopped) after {:.2} s",
        t.elapsed().as_secs_f64()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        addrs.iter().all(|a| http_get(a, "/").is_none()),
        "offline stays stopped"
    );
    let (ok, o, e) = run(&[
        "overlay", "app", "state", "web", "ignore", "--peer", &peer1, "--key", &kf,
    ]);
    assert!(ok, "{o}{e}");
    wait_for(
        "ignore: started once everywhere",
        Duration::from_secs(30),
        || {
            addrs
                .iter()
                .all(|a| http_get(a, "/index.html").is_some())
                .then_some(())
        },
    );
    let ignored = wait_for("the ignored app's pid", Duration::from_secs(10), || {
        reports(&lab, &key)[2]
            .as_ref()
            .and_then(|r| r.apps.iter().find(|a| a.name == "web").and_then(|a| a.pid))
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(ignored as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        http_get(&addrs[2], "/index.html").is_none(),
        "ignore: not restarted after kill -9"
    );
    assert!(
        http_get(&addrs[0], "/index.html").is_some(),
        "the others run on"
    );

    // Disable: every peer stops; a peer killed then stays dead; enable at a
    // surviving peer restores healing.
    let t = Instant::now();
    let (ok, o, e) = run(&["overlay", "disable", "--peer", &peer1, "--key", &kf]);
    assert!(ok, "{o}{e}");
    wait_for("every peer off", Duration::from_secs(30), || {
        reports(&lab, &key)
            .iter()
            .all(|r| r.as_ref().is_some_and(|r| !r.versions.livetag.on))
            .then_some(())
    });
    let off = t.elapsed();
    eprintln!(
        "measured: disable reached all {n} peers after {:.2} s ({:.1} intervals; SMON: 6.8 at 117 hosts)",
        off.as_secs_f64(),
        off.as_millis() as f64 / INTERVAL_MS as f64
    );
    let dead = lab.peers(3);
    for p in &dead {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*p),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    }
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        lab.peers(3).is_empty(),
        "a peer killed while disabled stays dead"
    );
    let (ok, o, e) = run(&["overlay", "enable", "--peer", &peer1, "--key", &kf]);
    assert!(ok, "{o}{e}");
    let t = Instant::now();
    wait_for("healing restored", Duration::from_secs(60), || {
        (lab.peers(3).len() == 1).then_some(())
    });
    eprintln!(
        "measured: after enable, the peer killed while disabled was recovered in {:.2} s",
        t.elapsed().as_secs_f64()
    );

    // Disabled again: every peer exits after its quiet period; the apps
    // stay up.
    wait_for("every peer on", Duration::from_secs(30), || {
        reports(&lab, &key)
            .iter()
            .all(|r| r.as_ref().is_some_and(|r| r.versions.livetag.on))
            .then_some(())
    });
    let t = Instant::now();
    let (ok, o, e) = run(&["overlay", "disable", "--peer", &peer1, "--key", &kf]);
    assert!(ok, "{o}{e}");
    let quiet = INTERVAL_MS * shoal_core::overlay::QUIET_INTERVALS;
    wait_for(
        "every peer exited",
        Duration::from_millis(quiet * 3 + 30_000),
        || lab.peers_by_host().iter().all(Vec::is_empty).then_some(()),
    );
    eprintln!(
        "measured: disabled, every peer exited {:.2} s after the disable (quiet period {:.1} s)",
        t.elapsed().as_secs_f64(),
        quiet as f64 / 1000.0
    );
    assert!(
        http_get(&addrs[0], "/index.html").is_some(),
        "apps outlive the overlay"
    );
    netlab::kill_processes_with(&format!("{}/", d.display()), Duration::from_secs(5));
}
