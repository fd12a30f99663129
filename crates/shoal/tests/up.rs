//! Issue 5's must-show: `shoal up` end to end, and the dashboard in a real
//! headless browser.

mod common;
use common::*;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn line_after<'a>(out: &'a str, prefix: &str) -> Option<&'a str> {
    out.lines()
        .find_map(|l| l.trim_start().strip_prefix(prefix))
        .map(str::trim)
}

/// The processes whose command line mentions `needle` (orphans).
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) {
                v.push(format!("{}: {cmd}", e.file_name().to_string_lossy()));
            }
        }
    }
    v
}

/// Starts `shoal up` with `extra` arguments after the common ones; waits
/// until it is ready and returns it with its printed lines.
fn start_up(name: &str, extra: &[&str]) -> (Proc, String, String) {
    let mut args = vec![
        "up",
        "--workload",
        "ramp",
        "--speed",
        "10",
        "--json",
        "--dashboard",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let up = Proc::spawn(name, &args);
    let out = up.wait_output("Ctrl-C stops everything", Duration::from_secs(120));
    let status_cmd = line_after(&out, "status").unwrap();
    let dir = status_cmd
        .split("--dir ")
        .nth(1)
        .unwrap()
        .trim()
        .to_string();
    (up, out, dir)
}

/// The summary JSON `shoal up --json` prints last.
fn summary_of(out: &str) -> serde_json::Value {
    let start = out.find("\n{").expect("summary JSON");
    serde_json::from_str(&out[start..]).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn up_scales_out_and_back_with_no_failed_request_and_a_live_dashboard() {
    let (up, out, dir) = start_up("up", &["--nodes", "4", "--duration", "75s"]);
    let dashboard = line_after(&out, "dashboard").unwrap().to_string();
    let tmp_root = PathBuf::from(&dir).parent().unwrap().display().to_string();

    // A broken app on node1, for the dashboard to show in red with its
    // restarts and reason.
    let (ok, out, err) = run(&[
        "node",
        "assign",
        "node1",
        "--dir",
        &dir,
        "--adaptor",
        "process",
        "--id",
        "broken",
        "--param",
        "command=/nonexistent/program",
    ]);
    assert!(ok, "{out}{err}");
    // The browser test runs against the live system. Its screenshots go to
    // the test's own directory; with SHOAL_UPDATE_SCREENSHOTS=1 they
    // replace the ones in docs/img (a test run leaves the tree as it was).
    let shots = tempfile::tempdir().unwrap();
    let shot_dir = if std::env::var_os("SHOAL_UPDATE_SCREENSHOTS").is_some() {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/img")
    } else {
        shots.path().to_path_buf()
    };
    std::fs::create_dir_all(&shot_dir).unwrap();
    let shot = shot_dir.join("dashboard.png");
    let node_shot = shot_dir.join("dashboard-node.png");
    let browser_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/browser");
    assert!(
        browser_dir.join("node_modules/playwright-core").exists(),
        "playwright-core is missing: scripts/test.sh installs it (npm ci in tests/browser)"
    );
    let browser = std::process::Command::new("node")
        .arg(browser_dir.join("dashboard.mjs"))
        .arg(&dashboard)
        .arg(&shot)
        .arg(&node_shot)
        .output()
        .expect("node");
    let bout = String::from_utf8_lossy(&browser.stdout);
    let berr = String::from_utf8_lossy(&browser.stderr);
    assert!(
        browser.status.success(),
        "browser test failed: {bout}{berr}"
    );
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000);
    assert!(std::fs::metadata(&node_shot).unwrap().len() > 10_000);
    println!("dashboard screenshot: {} ({bout})", shot.display());

    // From `shoal status --json` in another process: the demo service grows
    // and later shrinks.
    let mut max_nodes = 0;
    let mut shrank = false;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(100)
        && up.output().lines().all(|l| l != "stopping the cluster...")
    {
        let o = std::process::Command::new(BIN)
            .args(["status", "--dir", &dir, "--json"])
            .output()
            .unwrap();
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&o.stdout)
            && let Some(svc) = v["services"]
                .as_array()
                .and_then(|s| s.iter().find(|s| s["name"] == "demo"))
        {
            let n = svc["nodes"].as_array().map(|a| a.len()).unwrap_or(0);
            if n < max_nodes {
                shrank = true;
            }
            max_nodes = max_nodes.max(n);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let mut up = up;
    let st = up.wait_exit(Duration::from_secs(60));
    assert!(st.success(), "shoal up failed:\n{}", up.output());
    let out = up.output();
    let summary = summary_of(&out);
    assert!(max_nodes > 1, "status never showed the service grow: {out}");
    assert!(
        shrank,
        "status never showed the service shrink (max {max_nodes}): {out}"
    );
    assert_eq!(summary["errors"], 0, "{summary}");
    assert!(summary["requests"].as_u64().unwrap() > 5000, "{summary}");
    assert!(summary["nodes_max"].as_u64().unwrap() > 1, "{summary}");
    assert!(
        summary["nodes_end"].as_u64().unwrap() < summary["nodes_max"].as_u64().unwrap(),
        "{summary}"
    );
    assert!(summary["reallocations"].as_u64().unwrap() >= 2, "{summary}");
    // Nothing outlives it.
    wait_for("no orphans", Duration::from_secs(10), || {
        processes_mentioning(&tmp_root).is_empty().then_some(())
    });
    assert!(
        !PathBuf::from(&dir).exists(),
        "the throwaway cluster directory is removed"
    );
}

#[test]
fn up_with_netns_makes_real_hosts_sized_on_their_own_interfaces_and_cleans_up() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (network namespaces)"
    );
    let (mut up, _, dir) = start_up(
        "up-netns",
        &["--netns", "--nodes", "3", "--duration", "45s"],
    );
    let prefix = format!("shoal-up-{:x}-", up.pid() as u32 & 0xfffff);
    let tag_ns = || -> Vec<String> {
        let o = std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(tag_ns().len(), 3, "one namespace per node");
    // Every node sits on its own address, and the nodes serving the demo
    // report transmit traffic on their own interface.
    let (addrs, busy) = wait_for("per-node network load", Duration::from_secs(60), || {
        let o = std::process::Command::new(BIN)
            .args(["status", "--dir", &dir, "--json"])
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
        let nodes = v["nodes"].as_array()?;
        let addrs: std::collections::BTreeSet<String> = nodes
            .iter()
            .filter_map(|n| n["address"].as_str().map(str::to_string))
            .collect();
        let busy = nodes
            .iter()
            .filter(|n| n["load"]["net_tx_bps"].as_f64().unwrap_or(0.0) > 100_000.0)
            .count();
        (busy >= 2).then_some((addrs, busy))
    });
    assert_eq!(addrs.len(), 3, "{addrs:?}");
    assert!(addrs.iter().all(|a| a.starts_with("10.214.")), "{addrs:?}");
    assert!(busy >= 2);
    let st = up.wait_exit(Duration::from_secs(120));
    assert!(st.success(), "{}", up.output());
    let out = up.output();
    let summary = summary_of(&out);
    assert_eq!(summary["errors"], 0, "{summary}");
    assert!(summary["nodes_max"].as_u64().unwrap() >= 2, "{summary}");
    assert!(tag_ns().is_empty(), "namespaces left behind");
}

/// A private TMPDIR, so that what `up` leaves behind is visible.
fn private_tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// Asserts `up` left no process and no directory under `tmp`.
fn assert_nothing_left(tmp: &std::path::Path, what: &str) {
    let root = tmp.display().to_string();
    wait_for(
        &format!("no process left ({what})"),
        Duration::from_secs(15),
        || processes_mentioning(&root).is_empty().then_some(()),
    );
    let left: Vec<_> = std::fs::read_dir(tmp)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "{what}: left behind {left:?}");
}

fn up_cmd(tmp: &std::path::Path, args: &[&str]) -> std::process::Command {
    let mut c = std::process::Command::new(BIN);
    c.arg("up")
        .args(["--dashboard", "127.0.0.1:0"])
        .args(args)
        .env("TMPDIR", tmp);
    c
}

#[test]
fn up_refuses_bad_flags_before_starting_anything() {
    for (args, needle) in [
        (&["--policy", "magic"][..], "policy"),
        (&["--dashboard", "nowhere"], "--dashboard"),
        (&["--duration", "5parsecs"], "5parsecs"),
        (&["--peak-rps", "0"], "--peak-rps"),
    ] {
        let tmp = private_tmp();
        let t = Instant::now();
        let o = up_cmd(tmp.path(), args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{args:?} was refused only after {:?}",
            t.elapsed()
        );
        assert_nothing_left(tmp.path(), &format!("{args:?}"));
    }
}

#[test]
fn up_stops_everything_on_a_signal_at_any_moment_start_up_included() {
    use nix::sys::signal::Signal;
    // (signal, a file or line that marks the moment to send it)
    for (sig, moment) in [
        (Signal::SIGTERM, "cluster/config.toml"),
        (Signal::SIGINT, "node1.log"),
        (Signal::SIGHUP, "dispatcher.log"),
        (Signal::SIGTERM, "Ctrl-C stops everything"),
    ] {
        let tmp = private_tmp();
        let mut up = Proc::spawn_cmd(
            "up",
            &mut up_cmd(tmp.path(), &["--nodes", "2", "--duration", "120s"]),
        );
        let what = format!("{sig} at {moment}");
        wait_for(&what, Duration::from_secs(60), || {
            if moment.contains(' ') {
                return up.output().contains(moment).then_some(());
            }
            std::fs::read_dir(tmp.path())
                .ok()?
                .flatten()
                .any(|d| d.path().join(moment).exists())
                .then_some(())
        });
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(up.pid()), sig);
        up.wait_exit(Duration::from_secs(30));
        assert_nothing_left(tmp.path(), &what);
    }
}

#[test]
fn timeout_term_5_up_leaves_no_process_and_no_directory() {
    let tmp = private_tmp();
    let t = Instant::now();
    let o = std::process::Command::new("timeout")
        .args(["-s", "TERM", "5", BIN, "up", "--dashboard", "127.0.0.1:0"])
        .env("TMPDIR", tmp.path())
        .output()
        .unwrap();
    // timeout's own status 124 says the signal was sent: `up` was still
    // starting or running at 5 s, as this test means.
    assert_eq!(o.status.code(), Some(124), "{o:?}");
    assert!(t.elapsed() < Duration::from_secs(30));
    assert_nothing_left(tmp.path(), "timeout -s TERM 5 shoal up");
}

#[test]
fn two_ups_side_by_side_both_serve_with_no_failed_request_and_json_alone_on_stdout() {
    let tmp = private_tmp();
    let runs: Vec<_> = (0..2)
        .map(|_| {
            let mut c = up_cmd(
                tmp.path(),
                &[
                    "--nodes",
                    "2",
                    "--duration",
                    "15s",
                    "--peak-rps",
                    "100",
                    "--json",
                ],
            );
            std::thread::spawn(move || c.output().unwrap())
        })
        .collect();
    for (i, r) in runs.into_iter().enumerate() {
        let o = r.join().unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "up #{i} failed: {out}{err}");
        let v: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("up #{i}: stdout is not only JSON ({e}): {out}"));
        assert_eq!(v["errors"], 0, "up #{i}: {v}");
        assert!(v["requests"].as_u64().unwrap() > 100, "up #{i}: {v}");
    }
    assert_nothing_left(tmp.path(), "two ups");
}

/// `shoal up --netns --self-deploy`: the demo's hosts are namespaces with
/// sshd; one is seeded and the pool deploys itself onto the rest, every
/// agent joining the demo's manager, whose dashboard shows the overlay;
/// nothing is left afterwards.
#[test]
fn up_self_deploy_seeds_one_host_and_the_dashboard_shows_the_pool_deploy_itself() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (network namespaces, sshd)"
    );
    let tmp = private_tmp();
    let mut cmd = up_cmd(
        tmp.path(),
        &[
            "--netns",
            "--self-deploy",
            "--nodes",
            "3",
            "--duration",
            "25s",
            "--json",
        ],
    );
    let mut up = Proc::spawn_cmd("up-self-deploy", &mut cmd);
    let dash = up
        .wait_output(
            "dashboard (the Pool and Overlay panels",
            Duration::from_secs(30),
        )
        .lines()
        .find_map(|l| {
            l.split("itself): http://")
                .nth(1)
                .map(|u| u.trim_end_matches('/').to_string())
        })
        .expect("the dashboard's address");
    let snap = wait_for(
        "the dashboard shows 3 hosts alive",
        Duration::from_secs(25),
        || {
            let (code, body) = http_get(&dash, "/api/snapshot")?;
            let v: serde_json::Value = serde_json::from_str(&body).ok().filter(|_| code == 200)?;
            let hosts = v["overlay"]["targets"].as_array()?;
            let nodes = v["nodes"].as_array()?;
            (hosts.len() == 3
                && hosts.iter().all(|t| t["state"] == "alive")
                && nodes.iter().filter(|n| n["state"] == "alive").count() == 3)
                .then_some(v)
        },
    );
    assert_eq!(snap["overlay"]["reports"], 3, "{}", snap["overlay"]);
    let st = up.wait_exit(Duration::from_secs(60));
    assert!(st.success(), "{}", up.output());
    let out = up.output();
    let summary = summary_of(&out);
    assert_eq!(summary["deployed"], 3, "{summary}");
    assert_nothing_left(tmp.path(), "up --self-deploy");
}
