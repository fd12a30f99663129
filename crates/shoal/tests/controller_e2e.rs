//! The controller's life cycle end to end with real processes: a manager,
//! three agents, a dispatcher following a service and a client fetching
//! through it without pause. A rolling update (the service's app changes)
//! replaces every node one at a time, the new instance serving before an
//! old one drains, and an operator's `shoal node drain` moves the service
//! off a node; no request fails during either. The monitor's series
//! survives a manager restart.

mod common;
use common::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// A client fetching `/v.txt` through the dispatcher in a loop, counting
/// answers by body and failures.
struct Client {
    stop: Arc<AtomicBool>,
    ok_v1: Arc<AtomicU64>,
    ok_v2: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    last_failure: Arc<std::sync::Mutex<String>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Client {
    fn start(addr: String) -> Client {
        let stop = Arc::new(AtomicBool::new(false));
        let (ok_v1, ok_v2, failed) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let last_failure = Arc::new(std::sync::Mutex::new(String::new()));
        let (s, a, b, f, l) = (
            stop.clone(),
            ok_v1.clone(),
            ok_v2.clone(),
            failed.clone(),
            last_failure.clone(),
        );
        let thread = std::thread::spawn(move || {
            while !s.load(Relaxed) {
                match http_get(&addr, "/v.txt") {
                    Some((200, body)) if body.trim() == "v1" => {
                        a.fetch_add(1, Relaxed);
                    }
                    Some((200, body)) if body.trim() == "v2" => {
                        b.fetch_add(1, Relaxed);
                    }
                    other => {
                        f.fetch_add(1, Relaxed);
                        *l.lock().unwrap() = format!("{other:?}");
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Client {
            stop,
            ok_v1,
            ok_v2,
            failed,
            last_failure,
            thread: Some(thread),
        }
    }

    fn failures(&self) -> (u64, String) {
        (
            self.failed.load(Relaxed),
            self.last_failure.lock().unwrap().clone(),
        )
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn spec(port: u16, root: &std::path::Path) -> String {
    format!(
        r#"
name = "web"
min_nodes = 1
max_nodes = 1
policy = "threshold"
period_secs = 1
lead_time_secs = 2
drain_timeout_secs = 10
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
"#,
        root.display()
    )
}

#[test]
fn rolling_update_and_node_drain_fail_no_request_and_the_series_survives_a_restart() {
    let mut c = Cluster::start(2.0);
    let _agents: Vec<Proc> = (1..=3)
        .map(|i| c.agent_at(&format!("n{i}"), &format!("127.0.0.{}", 20 + i)))
        .collect();
    c.wait_alive(&["n1", "n2", "n3"]);
    let (v1, v2) = (c.tmp.path().join("v1"), c.tmp.path().join("v2"));
    write(&v1.join("v.txt"), "v1\n");
    write(&v2.join("v.txt"), "v2\n");
    let port = free_port();
    let file = c.tmp.path().join("web.toml");
    let apply = |c: &Cluster, root: &std::path::Path| {
        write(&file, &spec(port, root));
        let (ok, out, err) = c.cli(&["service", "apply", file.to_str().unwrap()]);
        assert!(ok, "apply failed: {out}{err}");
    };
    apply(&c, &v1);
    let first = wait_for("one node serving v1", Duration::from_secs(60), || {
        let s = c.service("web")?;
        let serving = names(&s, "serving");
        (serving.len() == 1).then(|| serving[0].clone())
    });

    let daddr = format!("127.0.0.1:{}", free_port());
    let dispatcher = Proc::spawn(
        "dispatch",
        &[
            "dispatch",
            "--manager",
            &c.url,
            "--service",
            "web",
            "--dir",
            &c.dir_str(),
            "--listen",
            &daddr,
            "--drain-timeout",
            "10s",
        ],
    );
    wait_for("the dispatcher serves v1", Duration::from_secs(20), || {
        http_get(&daddr, "/v.txt").filter(|(code, body)| *code == 200 && body.trim() == "v1")
    });
    let client = Client::start(daddr.clone());
    std::thread::sleep(Duration::from_millis(500));

    // Rolling update: the app's root changes. A new node serves v2 before
    // the old one drains; with max_nodes = 1 the surge holds two for a
    // moment.
    apply(&c, &v2);
    let second = wait_for("the update finishes", Duration::from_secs(60), || {
        let s = c.service("web")?;
        let serving = names(&s, "serving");
        (serving.len() == 1
            && names(&s, "draining").is_empty()
            && names(&s, "starting").is_empty()
            && serving[0] != first)
            .then(|| serving[0].clone())
    });
    wait_for("clients get v2", Duration::from_secs(20), || {
        (client.ok_v2.load(Relaxed) > 10).then_some(())
    });
    let (failed, last) = client.failures();
    assert_eq!(
        failed, 0,
        "requests failed during the rolling update: {last}"
    );
    assert!(client.ok_v1.load(Relaxed) > 0);
    let events = c.status()["events"].to_string();
    assert!(events.contains("rolling update"), "{events}");

    // An operator drains the serving node: the service moves elsewhere.
    let (ok, out, err) = c.cli(&["node", "drain", &second]);
    assert!(ok && out.contains("draining"), "{out}{err}");
    let third = wait_for(
        "the drain moves the service",
        Duration::from_secs(60),
        || {
            let s = c.service("web")?;
            let serving = names(&s, "serving");
            (serving.len() == 1 && names(&s, "draining").is_empty() && serving[0] != second)
                .then(|| serving[0].clone())
        },
    );
    assert_ne!(third, second);
    let before = client.ok_v2.load(Relaxed);
    wait_for(
        "clients served after the drain",
        Duration::from_secs(20),
        || (client.ok_v2.load(Relaxed) > before + 10).then_some(()),
    );
    let (failed, last) = client.failures();
    assert_eq!(
        failed,
        0,
        "requests failed during the drain: {last}; dispatcher: {}",
        dispatcher.output()
    );
    assert_eq!(c.node(&second).unwrap()["cordoned"], true);
    // The drained node, empty now, is removed; its certificate with it.
    let (ok, out, err) = c.cli(&["node", "remove", &second]);
    assert!(ok && out.contains("removed"), "{out}{err}");
    assert!(c.node(&second).is_none());
    drop(client);

    // The monitor's series survives a manager restart: the new manager
    // shows history at once instead of starting cold.
    let series_len = |c: &Cluster| -> usize {
        let (ok, out, _) = c.cli(&["service", "show", "web", "--json"]);
        let d: serde_json::Value = if ok {
            serde_json::from_str(&out).unwrap_or_default()
        } else {
            serde_json::Value::Null
        };
        d["series"].as_array().map_or(0, |a| a.len())
    };
    wait_for("30 s of series persisted", Duration::from_secs(45), || {
        (series_len(&c) >= 5).then_some(())
    });
    let mut m = c.manager.take().unwrap();
    m.terminate();
    c.start_manager(&format!("127.0.0.1:{}", c.port()));
    let restored = series_len(&c);
    assert!(restored >= 5, "series after the restart: {restored} points");
}
