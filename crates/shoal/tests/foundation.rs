//! Issue 2's "must show": real manager and agent processes on loopback.

mod common;
use common::*;
use serde_json::Value;
use std::time::{Duration, Instant};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn three_agents_register_and_lookup_by_role_is_exact() {
    let c = Cluster::start(2.0);
    let _a = c.agent("a", "web");
    let _b = c.agent("b", "web,db");
    let _d = c.agent("d", "db");
    c.wait_alive(&["a", "b", "d"]);
    let s = c.status();
    let roles = |n: &str| -> Vec<String> {
        s["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == n)
            .unwrap()["roles"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(roles("b"), vec!["web", "db"]);
    // Every node carries the documented JSON fields.
    for n in s["nodes"].as_array().unwrap() {
        for k in [
            "name",
            "state",
            "roles",
            "lease_remaining_ms",
            "load",
            "apps",
        ] {
            assert!(n.get(k).is_some(), "node lacks {k}: {n}");
        }
    }
    assert!(s["services"].as_array().unwrap().is_empty());
    let admin = c.admin();
    let names = |q: &str| -> Vec<String> {
        let v: Vec<Value> = rt().block_on(admin.get(&format!("/v1/lookup{q}"))).unwrap();
        let mut n: Vec<String> = v
            .iter()
            .map(|x| x["name"].as_str().unwrap().to_string())
            .collect();
        n.sort();
        n
    };
    assert_eq!(names("?role=web"), vec!["a", "b"]);
    assert_eq!(names("?role=db"), vec!["b", "d"]);
    assert_eq!(names("?role=web&role=db"), vec!["b"]);
    assert_eq!(names(""), vec!["a", "b", "d"]);
    assert!(names("?role=nothing").is_empty());
    assert_eq!(names("?cap.cpus=1"), vec!["a", "b", "d"]);
    assert!(names("?cap.cpus=100000").is_empty());
    // A wrong attribute type is a clear error.
    let e = rt()
        .block_on(admin.get::<Value>("/v1/lookup?cap.cpus=lots"))
        .unwrap_err();
    assert!(e.to_string().contains("cap.cpus must be a number"), "{e}");
    let e = rt()
        .block_on(admin.get::<Value>("/v1/lookup?colour=red"))
        .unwrap_err();
    assert!(e.to_string().contains("unknown lookup attribute"), "{e}");
}

/// Reads SSE lines from the watch stream in a thread; returns a receiver of
/// (event kind, node, when received).
fn watch_events(c: &Cluster) -> std::sync::mpsc::Receiver<(String, String, Instant)> {
    let (tx, rx) = std::sync::mpsc::channel();
    let admin = c.admin();
    std::thread::spawn(move || {
        rt().block_on(async move {
            use futures_util::StreamExt;
            let mut s = admin.watch().await.unwrap().bytes_stream();
            let mut buf = String::new();
            while let Some(Ok(chunk)) = s.next().await {
                buf.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(i) = buf.find("\n\n") {
                    let ev: String = buf.drain(..i + 2).collect();
                    if let Some(data) = ev.lines().find_map(|l| l.strip_prefix("data: "))
                        && let Ok(v) = serde_json::from_str::<Value>(data)
                    {
                        let _ = tx.send((
                            v["kind"].as_str().unwrap_or("").to_string(),
                            v["node"].as_str().unwrap_or("").to_string(),
                            Instant::now(),
                        ));
                    }
                }
            }
        })
    });
    rx
}

#[test]
fn kill9_of_an_agent_is_detected_within_ttl_plus_one_second_and_watched() {
    let c = Cluster::start(2.0);
    let mut a = c.agent("victim", "web");
    let _b = c.agent("bystander", "web");
    c.wait_alive(&["victim", "bystander"]);
    let events = watch_events(&c);
    // Let the watcher connect and drain the backlog.
    wait_for("watch backlog", Duration::from_secs(10), || {
        events
            .recv_timeout(Duration::from_millis(200))
            .ok()
            .filter(|e| e.0 == "registered")
    });
    while events.try_recv().is_ok() {}
    let killed = Instant::now();
    a.kill9();
    let (_, node, at) = wait_for("failed event", Duration::from_secs(10), || {
        events
            .recv_timeout(Duration::from_millis(100))
            .ok()
            .filter(|e| e.0 == "failed")
    });
    assert_eq!(node, "victim");
    let took = at.duration_since(killed);
    assert!(
        took <= Duration::from_secs_f64(c.ttl + 1.0),
        "detection took {took:?}"
    );
    let v = c.node("victim").unwrap();
    assert_eq!(v["state"], "failed");
    assert_eq!(v["lease_remaining_ms"], 0);
    assert_eq!(c.node("bystander").unwrap()["state"], "alive");
}

#[test]
fn manager_kill9_and_restart_loses_nothing_and_never_fails_a_live_node() {
    let mut c = Cluster::start(2.0);
    let agents: Vec<Proc> = ["r1", "r2", "r3"]
        .iter()
        .map(|n| c.agent(n, "web"))
        .collect();
    c.wait_alive(&["r1", "r2", "r3"]);
    let root = c.tmp.path().join("site");
    write(&root.join("index.html"), "persisted\n");
    let port = free_port();
    let (ok, _, err) = run(&[
        "node",
        "assign",
        "r1",
        "--dir",
        &c.dir_str(),
        "--manager",
        &c.url,
        "--adaptor",
        "www",
        "--param",
        &format!("listen=127.0.0.1:{port}"),
        "--param",
        &format!("root={}", root.display()),
    ]);
    assert!(ok, "{err}");
    let port_before = c.port();
    c.manager.as_mut().unwrap().kill9();
    // Down for longer than a TTL: agents must ride it out.
    std::thread::sleep(Duration::from_secs_f64(c.ttl * 1.5));
    c.start_manager(&format!("127.0.0.1:{port_before}"));
    // For three TTLs after the restart, poll: every node stays registered,
    // never reported failed.
    let until = Instant::now() + Duration::from_secs_f64(c.ttl * 3.0);
    let mut polls = 0;
    while Instant::now() < until {
        let s = c.status();
        let nodes = s["nodes"].as_array().unwrap();
        assert_eq!(nodes.len(), 3, "{s}");
        for n in nodes {
            assert_eq!(
                n["state"], "alive",
                "live node reported failed after restart: {n}"
            );
        }
        assert!(
            s["events"]
                .as_array()
                .unwrap()
                .iter()
                .all(|e| e["kind"] != "failed"),
            "a failure event after restart: {s}"
        );
        polls += 1;
    }
    assert!(polls > 3);
    // Desired state survived too, and agents kept their identity (no re-join).
    let r1 = c.node("r1").unwrap();
    assert_eq!(r1["desired"][0]["adaptor"], "www");
    for a in &agents {
        let out = a.output();
        assert_eq!(out.matches("joined the cluster").count(), 1, "{out}");
    }
    // They really renew with the new manager: leases are refreshed.
    wait_for("renewed leases", Duration::from_secs(10), || {
        let s = c.status();
        s["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["load"].is_object())
            .then_some(())
    });
}

#[test]
fn wrong_token_is_refused_clearly_and_leaves_no_trace() {
    let c = Cluster::start(2.0);
    let good = c.token();
    // Same shape, different secret.
    let mut bad: Vec<char> = good.chars().collect();
    bad[7] = if bad[7] == 'a' { 'b' } else { 'a' };
    let bad: String = bad.into_iter().collect();
    let dir = c.agent_dir("intruder");
    let mut p = Proc::spawn(
        "intruder",
        &[
            "agent",
            "--join",
            &c.url,
            "--token",
            &bad,
            "--name",
            "intruder",
            "--dir",
            dir.to_str().unwrap(),
        ],
    );
    let st = p.wait_exit(Duration::from_secs(20));
    assert!(!st.success());
    let out = p.output();
    assert!(out.contains("wrong join token"), "{out}");
    // A token for another cluster fails before anything is sent: the
    // manager's CA does not match the fingerprint.
    let other = tempfile::tempdir().unwrap();
    let od = other.path().join("c");
    assert!(run(&["init", "--dir", od.to_str().unwrap()]).0);
    let foreign = run(&["token", "--dir", od.to_str().unwrap()]).1;
    let (ok, _, err) = run(&[
        "agent",
        "--join",
        &c.url,
        "--token",
        foreign.trim(),
        "--name",
        "x",
        "--dir",
        c.agent_dir("x").to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("not this cluster's manager"), "{err}");
    // Malformed token.
    let (ok, _, err) = run(&[
        "agent",
        "--join",
        &c.url,
        "--token",
        "garbage",
        "--name",
        "y",
        "--dir",
        c.agent_dir("y").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("malformed join token"), "{err}");
    let s = c.status();
    assert!(s["nodes"].as_array().unwrap().is_empty(), "{s}");
    assert!(!dir.join("node.pem").exists());
}

#[test]
fn a_node_may_only_change_its_own_registration() {
    let c = Cluster::start(2.0);
    let _a = c.agent("self", "web");
    let _b = c.agent("other", "web");
    c.wait_alive(&["self", "other"]);
    let d = c.agent_dir("self");
    let rd = |f: &str| std::fs::read_to_string(d.join(f)).unwrap();
    let node = shoal_net::client::ApiClient::new(
        &c.url,
        &rd("ca.pem"),
        Some((&rd("node.pem"), &rd("node.key"))),
    )
    .unwrap();
    let reg = shoal_net::wire::Registration {
        name: "other".into(),
        address: "127.0.0.1".into(),
        ..Default::default()
    };
    let e = rt()
        .block_on(node.send::<_, Value>(reqwest::Method::PUT, "/v1/nodes/other", &reg))
        .unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
    let e = rt()
        .block_on(node.post::<_, Value>("/v1/nodes/other/renew", &serde_json::json!({})))
        .unwrap_err();
    assert_eq!(e.status(), Some(403));
    // Nodes cannot assign apps: that needs the administrator.
    let e = rt()
        .block_on(node.send::<_, Value>(
            reqwest::Method::PUT,
            "/v1/nodes/self/apps",
            &serde_json::json!({"apps": []}),
        ))
        .unwrap_err();
    assert_eq!(e.status(), Some(403));
    // Malformed input names the field and changes nothing.
    let e = rt()
        .block_on(node.send::<_, Value>(
            reqwest::Method::PUT,
            "/v1/nodes/self",
            &serde_json::json!({"name": "self", "address": "127.0.0.1", "capacities": {"net_mbps": "fast"}}),
        ))
        .unwrap_err();
    assert_eq!(e.status(), Some(400));
    assert!(e.to_string().contains("capacities.net_mbps"), "{e}");
    assert_eq!(c.node("self").unwrap()["state"], "alive");
    // An unauthenticated client gets nothing.
    let anon = shoal_net::client::ApiClient::new(&c.url, &rd("ca.pem"), None).unwrap();
    assert_eq!(
        rt().block_on(anon.status()).unwrap_err().status(),
        Some(401)
    );
}

#[test]
fn init_refuses_to_overwrite_and_reports_bad_config() {
    let c = Cluster::start(2.0);
    let (ok, _, err) = run(&["init", "--dir", &c.dir_str()]);
    assert!(!ok);
    assert!(err.contains("--force"), "{err}");
    let cfg = c.dir().join("config.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("{text}colour = \"red\"\n")).unwrap();
    let (ok, _, err) = run(&["status", "--dir", &c.dir_str()]);
    assert!(!ok);
    assert!(err.contains("colour"), "{err}");
    let (ok, _, err) = run(&["status", "--dir", "/nonexistent/shoal"]);
    assert!(!ok && err.contains("shoal init"), "{err}");
    // A second manager on a directory whose manager runs is refused, by
    // name, before it touches the registry.
    std::fs::write(&cfg, text).unwrap();
    let (ok, _, err) = run(&["manager", "--dir", &c.dir_str(), "--no-discovery"]);
    assert!(
        !ok && err.contains("a manager already runs on") && err.contains("manager.lock"),
        "{err}"
    );
    // A port in use is named.
    let other = c.tmp.path().join("other");
    let (ok, _, err) = run(&["init", "--dir", other.to_str().unwrap()]);
    assert!(ok, "{err}");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (ok, _, err) = run(&[
        "manager",
        "--dir",
        other.to_str().unwrap(),
        "--listen",
        &addr,
        "--no-discovery",
    ]);
    assert!(!ok && err.contains("already in use"), "{err}");
}

fn assign(c: &Cluster, node: &str, adaptor: &str, id: &str, params: &[String]) -> (bool, String) {
    let mut args = vec![
        "node".to_string(),
        "assign".into(),
        node.into(),
        "--dir".into(),
        c.dir_str(),
        "--manager".into(),
        c.url.clone(),
        "--adaptor".into(),
        adaptor.into(),
        "--id".into(),
        id.into(),
    ];
    for p in params {
        args.push("--param".into());
        args.push(p.clone());
    }
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, err) = run(&a);
    (ok, format!("{out}{err}"))
}

fn app(c: &Cluster, node: &str, id: &str) -> Option<Value> {
    c.node(node)?["apps"]
        .as_array()?
        .iter()
        .find(|a| a["id"] == id)
        .cloned()
}

#[test]
fn nginx_adaptor_serves_reloads_docroot_and_restarts_after_kill() {
    assert!(
        std::path::Path::new("/usr/sbin/nginx").exists(),
        "nginx is required: the README's test command installs it (apt-get install -y nginx)"
    );
    let c = Cluster::start(2.0);
    let _a = c.agent("web1", "web");
    c.wait_alive(&["web1"]);
    let r1 = c.tmp.path().join("root1");
    let r2 = c.tmp.path().join("root2");
    write(&r1.join("page.html"), "from root one\n");
    write(&r2.join("page.html"), "from root two\n");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let site_on = |root: &std::path::Path| {
        assign(
            &c,
            "web1",
            "nginx",
            "site",
            &[
                format!("listen={listen}"),
                format!("root={}", root.display()),
            ],
        )
    };
    // Bad parameters are refused by the manager, before any node sees them.
    let (ok, out) = assign(&c, "web1", "nginx", "site", &[format!("listen={listen}")]);
    assert!(!ok && out.contains("needs the parameter root"), "{out}");
    let (ok, out) = site_on(&r1);
    assert!(ok, "{out}");
    wait_for("nginx serves root one", Duration::from_secs(20), || {
        http_get(&listen, "/page.html").filter(|(c, b)| *c == 200 && b.contains("root one"))
    });
    let pid1 = wait_for("nginx running", Duration::from_secs(10), || {
        app(&c, "web1", "site")
            .filter(|a| a["state"] == "running")
            .and_then(|a| a["pid"].as_i64())
    });
    // set: a new DocRoot takes effect (nginx reloads in place: same master).
    let (ok, out) = site_on(&r2);
    assert!(ok, "{out}");
    wait_for("nginx serves root two", Duration::from_secs(20), || {
        http_get(&listen, "/page.html").filter(|(c, b)| *c == 200 && b.contains("root two"))
    });
    assert_eq!(
        app(&c, "web1", "site").unwrap()["pid"].as_i64(),
        Some(pid1),
        "set reloads, not restarts"
    );
    // Killing the app's process gets it restarted.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid1 as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let a = wait_for("nginx restarted", Duration::from_secs(30), || {
        app(&c, "web1", "site").filter(|a| {
            a["state"] == "running"
                && a["pid"].as_i64() != Some(pid1)
                && a["restarts"].as_u64() >= Some(1)
        })
    });
    assert!(a["pid"].as_i64().is_some());
    wait_for("restarted nginx serves", Duration::from_secs(10), || {
        http_get(&listen, "/page.html").filter(|(c, b)| *c == 200 && b.contains("root two"))
    });
    // Removing the assignment stops it.
    let (ok, out, _) = run(&[
        "node",
        "assign",
        "web1",
        "--dir",
        &c.dir_str(),
        "--manager",
        &c.url,
        "--adaptor",
        "nginx",
        "--id",
        "site",
        "--remove",
    ]);
    assert!(ok, "{out}");
    wait_for("nginx stopped", Duration::from_secs(15), || {
        http_get(&listen, "/page.html").is_none().then_some(())
    });
    let pid2 = a["pid"].as_i64().unwrap() as i32;
    wait_for("nginx gone", Duration::from_secs(10), || {
        (!alive(pid2)).then_some(())
    });
}

#[test]
fn a_restarted_or_re_executed_agent_re_adopts_its_running_apps() {
    let c = Cluster::start(2.0);
    let mut a = c.agent("n1", "web");
    c.wait_alive(&["n1"]);
    let root = c.tmp.path().join("site");
    write(&root.join("index.html"), "www here\n");
    let listen = format!("127.0.0.1:{}", free_port());
    let (ok, out) = assign(
        &c,
        "n1",
        "www",
        "www",
        &[
            format!("listen={listen}"),
            format!("root={}", root.display()),
        ],
    );
    assert!(ok, "{out}");
    wait_for("www serves", Duration::from_secs(20), || {
        http_get(&listen, "/").filter(|(c, b)| *c == 200 && b.contains("www here"))
    });
    let running_pid = || {
        app(&c, "n1", "www")
            .filter(|a| a["state"] == "running")
            .and_then(|a| a["pid"].as_i64())
    };
    let old = wait_for("www pid", Duration::from_secs(10), running_pid) as i32;
    // The agent dies; its app lives on (own process group).
    a.kill9();
    assert!(alive(old), "the app outlives the agent's crash");
    // The agent comes back (no token needed: it kept its identity) and
    // takes the running app over instead of restarting it.
    let dir = c.agent_dir("n1");
    let a2 = Proc::spawn("agent-n1-again", &["agent", "--dir", dir.to_str().unwrap()]);
    a2.wait_output("re-adopted the running process", Duration::from_secs(20));
    let after = wait_for("www reported again", Duration::from_secs(20), running_pid) as i32;
    assert_eq!(after, old, "re-adopted, not restarted");
    assert!(http_get(&listen, "/").is_some_and(|(c, _)| c == 200));
    // SIGHUP re-executes the agent in place: same pid, app still adopted.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(a2.pid()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    a2.wait_output("re-executing", Duration::from_secs(10));
    wait_for(
        "adopted after the re-execution",
        Duration::from_secs(20),
        || {
            (a2.output()
                .matches("re-adopted the running process")
                .count()
                >= 2)
                .then_some(())
        },
    );
    assert_eq!(
        wait_for("www reported", Duration::from_secs(20), running_pid) as i32,
        old
    );
    // An adopted app that dies is still supervised: restarted.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let new = wait_for("restarted after kill -9", Duration::from_secs(20), || {
        running_pid().filter(|p| *p as i32 != old)
    });
    assert!(alive(new as i32));
    wait_for("www serves again", Duration::from_secs(10), || {
        http_get(&listen, "/").filter(|(c, _)| *c == 200)
    });
}

#[test]
fn process_adaptor_renders_templates_and_health_checks() {
    let c = Cluster::start(2.0);
    let _a = c.agent("p1", "");
    c.wait_alive(&["p1"]);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    // A config file rendered from the control parameters, read by the app.
    let (ok, out) = assign(
        &c,
        "p1",
        "process",
        "py",
        &[
            "command=python3".into(),
            "args=-m http.server {{ port }} --bind 127.0.0.1 --directory {{ app_dir }}".into(),
            format!("health=tcp:{listen}"),
            "file.greeting.txt=hello from {{ node }}".into(),
            format!("port={port}"),
        ],
    );
    // `port` is not a process parameter: refused with the list of valid ones.
    assert!(!ok && out.contains("unknown parameter \"port\""), "{out}");
    let (ok, out) = assign(
        &c,
        "p1",
        "process",
        "py",
        &[
            "command=python3".into(),
            format!("args=-m http.server {port} --bind 127.0.0.1 --directory {{{{ app_dir }}}}"),
            format!("health=tcp:{listen}"),
            "file.greeting.txt=hello from {{ node }}".into(),
        ],
    );
    assert!(ok, "{out}");
    wait_for("rendered file served", Duration::from_secs(20), || {
        http_get(&listen, "/greeting.txt").filter(|(c, b)| *c == 200 && b == "hello from p1")
    });
    wait_for("healthy", Duration::from_secs(10), || {
        app(&c, "p1", "py").filter(|a| a["state"] == "running")
    });
}
