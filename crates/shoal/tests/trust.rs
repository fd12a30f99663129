//! Issue 15: trust boundaries, through real manager, agent and CLI
//! processes on loopback. Each test names the review finding it answers.

mod common;

use common::*;
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Starts `shoal agent` joining with the token in `token_file`.
fn agent_with_file(c: &Cluster, name: &str, dir: &Path, token_file: &Path, extra: &[&str]) -> Proc {
    let mut args = vec![
        "agent".to_string(),
        "--join".into(),
        c.url.clone(),
        "--token-file".into(),
        s(token_file),
        "--name".into(),
        name.into(),
        "--dir".into(),
        s(dir),
    ];
    args.extend(extra.iter().map(|x| x.to_string()));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    Proc::spawn(&format!("agent-{name}"), &a)
}

/// Runs an agent that is expected to be refused; returns its output.
fn refused_join(c: &Cluster, name: &str, dir: &Path, token_file: &Path, extra: &[&str]) -> String {
    let mut p = agent_with_file(c, name, dir, token_file, extra);
    let st = p.wait_exit(Duration::from_secs(20));
    assert!(!st.success(), "{name} joined: {}", p.output());
    assert!(!dir.join("node.pem").exists());
    p.output()
}

fn token_create(c: &Cluster, extra: &[&str]) -> (String, String) {
    let mut args = vec!["token", "create", "--dir"];
    let d = c.dir_str();
    args.push(&d);
    args.extend_from_slice(extra);
    args.push("--json");
    let (ok, out, err) = run(&args);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    (
        v["id"].as_str().unwrap().to_string(),
        v["token"].as_str().unwrap().to_string(),
    )
}

fn token_state(c: &Cluster, id: &str) -> String {
    let (ok, out, err) = run(&["token", "list", "--dir", &c.dir_str(), "--json"]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id)
        .map(|t| t["state"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

fn write_token(c: &Cluster, name: &str, token: &str) -> std::path::PathBuf {
    let f = c.tmp.path().join(name);
    std::fs::write(&f, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
    f
}

/// Finding 1: the token never expired, could be used any number of times,
/// sat on every agent's command line, and a second join as a live `n1`
/// replaced its registration.
#[test]
fn join_tokens_expire_count_their_uses_and_never_take_over_a_name() {
    let c = Cluster::start(1.0);
    let first = write_token(&c, "first.token", &c.token());
    let _n1 = agent_with_file(
        &c,
        "n1",
        &c.agent_dir("n1"),
        &first,
        &["--address", "127.0.0.5"],
    );
    c.wait_alive(&["n1"]);
    // The token is not on the agent's command line.
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", _n1.pid())).unwrap();
    assert!(!String::from_utf8_lossy(&cmdline).contains(&c.token()));
    // Nor in the manager's token store: only its hash.
    let stored = std::fs::read_to_string(c.dir().join("tokens.json")).unwrap();
    let secret = c.token().split('.').nth(1).unwrap().to_string();
    assert!(!stored.contains(&secret), "{stored}");

    // A second join as the live n1, elsewhere: refused, n1 untouched.
    let out = refused_join(
        &c,
        "n1",
        &c.agent_dir("n1-forged"),
        &first,
        &["--address", "127.0.0.66"],
    );
    assert!(out.contains("registered and alive"), "{out}");
    assert_eq!(c.node("n1").unwrap()["address"], "127.0.0.5");

    // A token with one use admits one join.
    let (_, once) = token_create(&c, &["--uses", "1"]);
    let once = write_token(&c, "once.token", &once);
    let _n2 = agent_with_file(&c, "n2", &c.agent_dir("n2"), &once, &[]);
    c.wait_alive(&["n2"]);
    let out = refused_join(&c, "n3", &c.agent_dir("n3"), &once, &[]);
    assert!(out.contains("used as many times as it allowed"), "{out}");

    // An expired token admits nothing.
    let (id, short) = token_create(&c, &["--ttl", "1ms"]);
    wait_for("token expired", Duration::from_secs(5), || {
        (token_state(&c, &id) == "expired").then_some(())
    });
    let short = write_token(&c, "short.token", &short);
    let out = refused_join(&c, "n3", &c.agent_dir("n3"), &short, &[]);
    assert!(out.contains("expired"), "{out}");

    // A revoked one neither.
    let (id, revoked) = token_create(&c, &[]);
    let (ok, _, err) = run(&["token", "revoke", "--dir", &c.dir_str(), &id]);
    assert!(ok, "{err}");
    let revoked = write_token(&c, "revoked.token", &revoked);
    let out = refused_join(&c, "n3", &c.agent_dir("n3"), &revoked, &[]);
    assert!(out.contains("revoked"), "{out}");

    // A token limited to role web does not admit a db node.
    let (_, web) = token_create(&c, &["--roles", "web"]);
    let web = write_token(&c, "web.token", &web);
    let out = refused_join(&c, "n3", &c.agent_dir("n3"), &web, &["--roles", "db"]);
    assert!(out.contains("does not grant role \"db\""), "{out}");

    // SHOAL_TOKEN works as --token-file does.
    let _n4 = Proc::spawn_cmd(
        "agent-n4",
        std::process::Command::new(BIN)
            .env("SHOAL_TOKEN", c.token())
            .args(["agent", "--join", &c.url, "--name", "n4", "--dir"])
            .arg(c.agent_dir("n4")),
    );
    c.wait_alive(&["n4"]);

    // n1 dies: its name still belongs to the key that first joined it.
    let mut n1 = _n1;
    n1.kill9();
    wait_for("n1 failed", Duration::from_secs(10), || {
        (c.node("n1")?["state"] == "failed").then_some(())
    });
    let out = refused_join(&c, "n1", &c.agent_dir("n1-forged"), &first, &[]);
    assert!(
        out.contains("belongs to the key that first joined it"),
        "{out}"
    );
    // Until an administrator removes the node.
    let (ok, out, err) = c.cli(&["node", "remove", "n1"]);
    assert!(ok && out.contains("revoked"), "{out}{err}");
    let _new = agent_with_file(
        &c,
        "n1",
        &c.agent_dir("n1-new"),
        &first,
        &["--address", "127.0.0.7"],
    );
    c.wait_alive(&["n1"]);
    assert_eq!(c.node("n1").unwrap()["address"], "127.0.0.7");
}

/// The node's API client from its agent directory.
fn node_client(c: &Cluster, dir: &Path) -> shoal_net::client::ApiClient {
    let r = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    shoal_net::client::ApiClient::new(&c.url, &r("ca.pem"), Some((&r("node.pem"), &r("node.key"))))
        .unwrap()
}

fn block<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Finding 4: a deleted node's certificate registered again and read
/// `/v1/status`, secrets included; any node read every node's parameters.
#[test]
fn a_removed_node_is_refused_and_a_node_reads_no_other_node() {
    let c = Cluster::start(2.0);
    let _n1 = c.agent("n1", "");
    let _n2 = c.agent("n2", "");
    c.wait_alive(&["n1", "n2"]);
    let (ok, out, err) = c.cli(&[
        "node",
        "assign",
        "n2",
        "--adaptor",
        "process",
        "--id",
        "app",
        "--param",
        "command=sleep",
        "--param",
        "args=600",
        "--param",
        "secret.API_KEY=n2-secret-value",
    ]);
    assert!(ok, "{out}{err}");
    let n1 = node_client(&c, &c.agent_dir("n1"));
    // A node certificate cannot read the pool's status...
    let e = block(n1.status()).unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
    // ...and the lookup service shows it no desired state.
    let nodes: Value = block(n1.get("/v1/lookup")).unwrap();
    assert!(!nodes.to_string().contains("n2-secret-value"), "{nodes}");
    assert!(
        nodes
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["desired"] == serde_json::json!([]))
    );

    // The administrator removes n1: its certificate is refused at once.
    let (ok, out, err) = c.cli(&["node", "remove", "n1"]);
    assert!(ok, "{out}{err}");
    let reg = shoal_net::wire::Registration {
        name: "n1".into(),
        address: "127.0.0.1".into(),
        ..Default::default()
    };
    let e = block(n1.send::<_, Value>(reqwest::Method::PUT, "/v1/nodes/n1", &reg)).unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
    assert!(e.to_string().contains("revoked"), "{e}");
    let e = block(n1.get::<Value>("/v1/lookup")).unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
    // The running agent's renewals are refused too: n1 stays gone.
    let n2 = node_client(&c, &c.agent_dir("n2"));
    let _: Value = block(n2.get("/v1/lookup")).unwrap();
    wait_for("n1's agent refused", Duration::from_secs(10), || {
        _n1.output().contains("revoked").then_some(())
    });
    assert!(c.node("n1").is_none());
}

/// Finding 2 (and the status half of 3's secrets): the dashboard returned
/// every app's `env.*` and `file.*` values, accepted any Host header and
/// bound 0.0.0.0 without a word; status returned secrets.
#[test]
fn the_dashboard_and_status_redact_secrets_and_check_the_host() {
    let c = Cluster::start(2.0);
    let _n1 = c.agent("n1", "");
    c.wait_alive(&["n1"]);
    let (ok, out, err) = c.cli(&[
        "node",
        "assign",
        "n1",
        "--adaptor",
        "process",
        "--id",
        "app",
        "--param",
        "command=/bin/sh",
        "--param",
        "args=-c 'echo \"$API_KEY\" > got-secret; exec sleep 600'",
        "--param",
        "env.PASSWORD=env-value-hunter2",
        "--param",
        "file.app.conf=file-value-hunter2",
        "--param",
        "secret.API_KEY=secret-value-hunter2",
    ]);
    assert!(ok, "{out}{err}");
    // The secret reaches the node that runs the app...
    let got = c.agent_dir("n1").join("apps/app/got-secret");
    wait_for("the app got its secret", Duration::from_secs(20), || {
        std::fs::read_to_string(&got)
            .ok()
            .filter(|s| s.trim() == "secret-value-hunter2")
    });
    // ...and nowhere else: not in status,
    let st = c.status().to_string();
    assert!(!st.contains("secret-value-hunter2"), "{st}");
    assert!(st.contains("secret.API_KEY"), "{st}");
    // ...not on the dashboard, nor the app's environment and files.
    let m = c.manager.as_ref().unwrap();
    let out = m.wait_output("dashboard (read-only) at http://", Duration::from_secs(5));
    let dash = out
        .split("dashboard (read-only) at http://")
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let (code, body) = http_get(&dash, "/api/snapshot").unwrap();
    assert_eq!(code, 200);
    for v in [
        "secret-value-hunter2",
        "env-value-hunter2",
        "file-value-hunter2",
    ] {
        assert!(!body.contains(v), "{v} in {body}");
    }
    assert!(body.contains("\"command\":\"/bin/sh\""), "{body}");
    // A page on another name (DNS rebinding) is refused.
    let raw = |host: &str| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&dash).unwrap();
        write!(
            s,
            "GET /api/snapshot HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut b = String::new();
        s.read_to_string(&mut b).unwrap();
        b
    };
    let port = dash.rsplit(':').next().unwrap();
    assert!(raw(&format!("evil.example:{port}")).starts_with("HTTP/1.1 421"));
    assert!(raw(&format!("localhost:{port}")).starts_with("HTTP/1.1 200"));
    // Editing the node's apps keeps the secret it cannot see.
    let (ok, out, err) = c.cli(&[
        "node",
        "assign",
        "n1",
        "--adaptor",
        "www",
        "--id",
        "web",
        "--param",
        "listen=127.0.0.1:0",
        "--param",
        "root=/tmp",
    ]);
    assert!(ok, "{out}{err}");
    let v: Vec<Value> = block(c.admin().get("/v1/lookup?name=n1")).unwrap();
    let app = v[0]["desired"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == "app")
        .unwrap()
        .clone();
    assert_eq!(app["params"]["secret.API_KEY"], shoal_net::wire::REDACTED);

    // A dashboard on every interface is started with a warning.
    let mut c2 = Cluster::start(2.0);
    drop(c2.manager.take());
    let m = Proc::spawn(
        "manager",
        &[
            "manager",
            "--dir",
            &c2.dir_str(),
            "--listen",
            "127.0.0.1:0",
            "--no-discovery",
            "--dashboard",
            "0.0.0.0:0",
        ],
    );
    let out = m.wait_output("listening on https://", Duration::from_secs(20));
    assert!(
        out.contains("warning: the dashboard at http://0.0.0.0:"),
        "{out}"
    );
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Finding 5: registry.db and its WAL were 0644 with the apps' secrets in
/// them; agents wrote app config files 0644.
#[test]
fn keys_tokens_secrets_and_the_registry_are_private() {
    let c = Cluster::start(2.0);
    let _n1 = c.agent("n1", "");
    c.wait_alive(&["n1"]);
    let (ok, out, err) = c.cli(&[
        "node",
        "assign",
        "n1",
        "--adaptor",
        "process",
        "--id",
        "app",
        "--param",
        "command=sleep",
        "--param",
        "args=600",
        "--param",
        "file.app.conf=password=1",
    ]);
    assert!(ok, "{out}{err}");
    let conf = c.agent_dir("n1").join("apps/app/app.conf");
    wait_for("config file written", Duration::from_secs(20), || {
        conf.exists().then_some(())
    });
    let d = c.dir();
    assert_eq!(mode(&d), 0o700);
    for f in [
        "ca.key",
        "admin.key",
        "token",
        "tokens.json",
        "registry.db",
        "registry.db-wal",
        "store.id",
    ] {
        assert_eq!(mode(&d.join(f)), 0o600, "{f}");
    }
    let a = c.agent_dir("n1");
    assert_eq!(mode(&a), 0o700);
    assert_eq!(mode(&a.join("node.key")), 0o600);
    assert_eq!(mode(&conf), 0o600);
    // A dispatcher's directory too.
    let out_dir = c.tmp.path().join("disp");
    let (ok, _, err) = run(&[
        "cert",
        "dispatcher",
        "--dir",
        &c.dir_str(),
        "--service",
        "web",
        "--out",
        &s(&out_dir),
    ]);
    assert!(ok, "{err}");
    assert_eq!(mode(&out_dir), 0o700);
    assert_eq!(mode(&out_dir.join("dispatcher.key")), 0o600);
}

/// Finding 6: a registry.db truncated to zero bytes or deleted started an
/// empty manager: "0 registrations restored", everything lost, no warning.
#[test]
fn a_lost_or_foreign_registry_stops_the_manager() {
    let mut c = Cluster::start(2.0);
    let _n1 = c.agent("n1", "");
    c.wait_alive(&["n1"]);
    c.manager.take().unwrap().terminate();
    let db = c.dir().join("registry.db");
    let start = |extra: &[&str]| {
        let mut args = vec!["manager", "--dir"];
        let d = c.dir_str();
        args.push(&d);
        args.extend_from_slice(&[
            "--listen",
            "127.0.0.1:0",
            "--no-discovery",
            "--dashboard",
            "off",
        ]);
        args.extend_from_slice(extra);
        run(&args)
    };
    let saved = std::fs::read(&db).unwrap();
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(c.dir().join(format!("registry.db{suffix}")));
    }
    // Truncated.
    std::fs::write(&db, b"").unwrap();
    let (ok, _, err) = start(&[]);
    assert!(!ok, "{err}");
    assert!(
        err.contains("registry.db is empty") && err.contains("--reset-store"),
        "{err}"
    );
    // Deleted.
    std::fs::remove_file(&db).unwrap();
    let (ok, _, err) = start(&[]);
    assert!(
        !ok && err.contains("registry.db is missing") && err.contains("--reset-store"),
        "{err}"
    );
    // Another cluster's.
    let other = tempfile::tempdir().unwrap();
    let od = other.path().join("c");
    assert!(run(&["init", "--dir", &s(&od)]).0);
    std::fs::copy(od.join("registry.db"), &db).unwrap();
    let (ok, _, err) = start(&[]);
    assert!(!ok && err.contains("belongs to another store"), "{err}");
    // The right one, restored from the copy: starts with n1.
    std::fs::write(&db, &saved).unwrap();
    c.start_manager("127.0.0.1:0");
    let m = c.manager.as_ref().unwrap();
    m.wait_output("1 registrations restored", Duration::from_secs(5));
    drop(c.manager.take());
    // --reset-store accepts starting empty.
    std::fs::write(&db, b"").unwrap();
    let m = Proc::spawn(
        "manager",
        &[
            "manager",
            "--dir",
            &c.dir_str(),
            "--listen",
            "127.0.0.1:0",
            "--no-discovery",
            "--dashboard",
            "off",
            "--reset-store",
        ],
    );
    m.wait_output("0 registrations restored", Duration::from_secs(20));
}

/// Finding 7: a probe captured on the LAN was answered every time it was
/// replayed.
#[test]
fn discovery_probes_are_answered_once_and_only_while_fresh() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c");
    assert!(run(&["init", "--dir", &s(&dir)]).0);
    let port = {
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        u.local_addr().unwrap().port()
    };
    let m = Proc::spawn(
        "manager",
        &[
            "manager",
            "--dir",
            &s(&dir),
            "--listen",
            "127.0.0.1:0",
            "--dashboard",
            "off",
            "--discovery-port",
            &port.to_string(),
        ],
    );
    m.wait_output("listening on https://", Duration::from_secs(20));
    let token = run(&["token", "--dir", &s(&dir)]).1;
    let token = shoal_net::Token::parse(&token).unwrap();
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let ask = |probe: &[u8]| -> Option<String> {
        sock.send_to(probe, ("127.0.0.1", port)).unwrap();
        let mut b = [0u8; 2048];
        sock.recv(&mut b)
            .ok()
            .map(|n| String::from_utf8_lossy(&b[..n]).into_owned())
    };
    let now = shoal_net::wire::unix_ms();
    let (probe, _) = shoal_net::discovery::make_probe(&token.id(), &token.discovery_key(), now);
    // The responder may need a moment to bind: retry a fresh probe.
    let first = wait_for("an answer", Duration::from_secs(10), || {
        let (p, _) = shoal_net::discovery::make_probe(
            &token.id(),
            &token.discovery_key(),
            shoal_net::wire::unix_ms(),
        );
        ask(&p)
    });
    assert!(first.contains("https://127.0.0.1:"), "{first}");
    assert!(ask(&probe).is_some(), "a fresh probe is answered");
    assert!(ask(&probe).is_none(), "the same probe again is a replay");
    let (stale, _) =
        shoal_net::discovery::make_probe(&token.id(), &token.discovery_key(), now - 120_000);
    assert!(
        ask(&stale).is_none(),
        "a probe stamped two minutes ago is stale"
    );
    let (fresh, _) = shoal_net::discovery::make_probe(
        &token.id(),
        &token.discovery_key(),
        shoal_net::wire::unix_ms(),
    );
    assert!(
        ask(&fresh).is_some(),
        "the responder still answers fresh probes"
    );
}

/// Finding 9: a dispatcher following a service needed the administrator
/// certificate. Its own certificate reads that service's backends and
/// nothing else, and can be revoked.
#[test]
fn a_dispatcher_certificate_reads_only_its_service() {
    let c = Cluster::start(2.0);
    let out_dir = c.tmp.path().join("disp");
    let (ok, out, err) = run(&[
        "cert",
        "dispatcher",
        "--dir",
        &c.dir_str(),
        "--service",
        "web",
        "--out",
        &s(&out_dir),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("id "), "{out}");
    let d =
        shoal_net::client::ApiClient::for_dir(&shoal_net::ClusterDir::new(&out_dir), Some(&c.url))
            .unwrap();
    // Its service: authorised (the service does not exist yet: 404).
    let e = block(d.get::<Value>("/v1/services/web/backends")).unwrap_err();
    assert_eq!(e.status(), Some(404), "{e}");
    for path in [
        "/v1/services/other/backends",
        "/v1/status",
        "/v1/lookup",
        "/v1/services",
        "/v1/events",
    ] {
        let e = block(d.get::<Value>(path)).unwrap_err();
        assert_eq!(e.status(), Some(403), "{path}: {e}");
    }
    let e = block(d.send::<_, Value>(
        reqwest::Method::PUT,
        "/v1/nodes/x/apps",
        &serde_json::json!({"apps": []}),
    ))
    .unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
    // Revoked: refused from the next request on.
    let (ok, out, err) = c.cli(&["cert", "revoke", &s(&out_dir.join("dispatcher.pem"))]);
    assert!(ok, "{out}{err}");
    let e = block(d.get::<Value>("/v1/services/web/backends")).unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
    assert!(e.to_string().contains("revoked"), "{e}");
}

/// The dashboard's address, from the manager's output.
fn dashboard_addr(m: &Proc) -> String {
    let out = m.wait_output("dashboard (read-only) at http://", Duration::from_secs(5));
    out.split("dashboard (read-only) at http://")
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string()
}

/// A raw HTTP/1.1 GET with extra header lines; returns the whole answer.
fn raw_get(addr: &str, path: &str, host: &str, headers: &[String]) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut b = String::new();
    let _ = s.read_to_string(&mut b);
    b
}

/// Gap left by the first pass on roles: a node that joined with a token
/// granting role `web` could register again claiming `db` (and so be
/// given db's apps and secrets). The roles granted at join bind every
/// later registration, until an administrator widens them.
#[test]
fn a_node_registers_only_with_the_roles_its_join_granted() {
    let c = Cluster::start(1.0);
    let (_, web) = token_create(&c, &["--roles", "web"]);
    let web = write_token(&c, "web.token", &web);
    let dir = c.agent_dir("n1");
    let mut n1 = agent_with_file(&c, "n1", &dir, &web, &["--roles", "web"]);
    c.wait_alive(&["n1"]);
    // The node's own certificate, re-registering with a role more.
    let client = node_client(&c, &dir);
    let reg = shoal_net::wire::Registration {
        name: "n1".into(),
        address: "127.0.0.1".into(),
        roles: vec!["web".into(), "db".into()],
        ..Default::default()
    };
    let e = block(client.send::<_, Value>(reqwest::Method::PUT, "/v1/nodes/n1", &reg)).unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
    let m = e.to_string();
    assert!(
        m.contains("may register only with roles [web]")
            && m.contains("shoal node roles n1 --allow web,db"),
        "{m}"
    );
    assert_eq!(c.node("n1").unwrap()["roles"], serde_json::json!(["web"]));
    // Its agent restarted with --roles web,db stops, saying why.
    n1.terminate();
    let restart =
        |roles: &str| Proc::spawn("agent-n1", &["agent", "--dir", &s(&dir), "--roles", roles]);
    let mut again = restart("web,db");
    assert!(!again.wait_exit(Duration::from_secs(20)).success());
    assert!(
        again
            .output()
            .contains("may register only with roles [web]"),
        "{}",
        again.output()
    );
    // The certificate listing shows what it may hold.
    let (ok, out, err) = c.cli(&["cert", "list", "--json"]);
    assert!(ok, "{err}");
    let certs: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(certs[0]["node"], "n1");
    assert_eq!(certs[0]["roles"], serde_json::json!(["web"]));
    // An administrator widens them; the same agent then registers as db too.
    let (ok, out, err) = c.cli(&["node", "roles", "n1", "--allow", "web,db"]);
    assert!(ok, "{out}{err}");
    let _n1 = restart("web,db");
    wait_for("n1 as web and db", Duration::from_secs(20), || {
        let n = c.node("n1")?;
        (n["state"] == "alive" && n["roles"] == serde_json::json!(["web", "db"])).then_some(())
    });
    // An unknown node has no roles to set.
    let (ok, _, err) = c.cli(&["node", "roles", "nobody", "--any"]);
    assert!(!ok && err.contains("has not joined"), "{err}");
}

/// Node certificates have a lifetime, and an agent replaces its own before
/// it ends, without joining again; the old one is refused once the new one
/// is in use.
#[test]
fn agents_rotate_their_certificates_before_expiry_without_joining_again() {
    let mut c = Cluster::start(2.0);
    c.manager.take().unwrap().terminate();
    c.start_manager_with("127.0.0.1:0", &["--node-cert-ttl", "12s"]);
    let n1 = c.agent("n1", "");
    c.wait_alive(&["n1"]);
    let dir = c.agent_dir("n1");
    let r = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    let (old_cert, old_key, ca) = (r("node.pem"), r("node.key"), r("ca.pem"));
    let (_, old_expiry) = shoal_net::identity::cert_validity_ms(&old_cert).unwrap();
    let now = shoal_net::wire::unix_ms();
    assert!(old_expiry <= now + 12_500, "{old_expiry} vs {now}");
    let old_id = shoal_net::tls::cert_key_fingerprint(
        &shoal_net::identity::first_cert_der(&old_cert).unwrap(),
    )
    .unwrap();
    // Listed with its lifetime.
    let list = || -> Value {
        let (ok, out, err) = c.cli(&["cert", "list", "--json"]);
        assert!(ok, "{err}");
        serde_json::from_str(&out).unwrap()
    };
    let l = list();
    assert_eq!(l[0]["id"], old_id.as_str());
    assert_eq!(l[0]["expires_ms"], old_expiry);
    let (ok, out, _) = c.cli(&["cert", "list"]);
    assert!(
        ok && out.contains("EXPIRES IN") && out.contains(" s "),
        "{out}"
    );

    // The agent rotates at 70-90 % of the lifetime.
    n1.wait_output("rotated the node certificate", Duration::from_secs(20));
    assert_ne!(r("node.pem"), old_cert);
    assert!(!dir.join("node.next.key").exists() && !dir.join("node.next.pem").exists());
    assert_eq!(mode(&dir.join("node.key")), 0o600);
    // Once the new one is used (its next renewal), the old one is refused.
    let old = shoal_net::client::ApiClient::new(&c.url, &ca, Some((&old_cert, &old_key))).unwrap();
    let e = wait_for(
        "the old certificate refused",
        Duration::from_secs(10),
        || {
            block(old.get::<Value>("/v1/lookup"))
                .err()
                .filter(|e| e.status() == Some(403))
        },
    );
    assert!(e.to_string().contains("rotated"), "{e}");
    let l = list();
    assert_ne!(l[0]["id"], old_id.as_str());
    assert!(l[0]["expires_ms"].as_u64().unwrap() > old_expiry);
    assert_eq!(l[0]["next_id"], Value::Null);
    // Past the old certificate's end, n1 is the same node, alive, never
    // joined again.
    wait_for(
        "the old certificate expired",
        Duration::from_secs(15),
        || (shoal_net::wire::unix_ms() > old_expiry + 1000).then_some(()),
    );
    wait_for("n1 renewing", Duration::from_secs(5), || {
        let n = c.node("n1")?;
        (n["state"] == "alive" && n["lease_remaining_ms"].as_u64()? > 0).then_some(())
    });
    assert_eq!(n1.output().matches("joined the cluster").count(), 1);
}

/// Secrets of a service file's `[app.secrets]` table reach the node that
/// runs the app, and nothing else: not status, service show, the lookup
/// service or the dashboard, and not another node's certificate.
#[test]
fn service_secrets_reach_only_the_node_that_runs_the_app() {
    let c = Cluster::start(2.0);
    let _n1 = c.agent("n1", "vault");
    let _n2 = c.agent("n2", "");
    c.wait_alive(&["n1", "n2"]);
    let file = c.tmp.path().join("vault.toml");
    std::fs::write(
        &file,
        r#"name = "vault"
max_nodes = 1
role = "vault"
[app]
adaptor = "process"
port = 9000
[app.params]
command = "/bin/sh"
args = "-c 'echo \"$DB_PASSWORD\" > got-secret; exec sleep 600'"
[app.secrets]
DB_PASSWORD = "svc-secret-hunter2"
[metric]
kind = "cpu"
capacity = 1
"#,
    )
    .unwrap();
    let (ok, out, err) = c.cli(&["service", "apply", &s(&file)]);
    assert!(ok, "{out}{err}");
    let got = c.agent_dir("n1").join("apps/svc-vault/got-secret");
    wait_for("the app got its secret", Duration::from_secs(30), || {
        std::fs::read_to_string(&got)
            .ok()
            .filter(|s| s.trim() == "svc-secret-hunter2")
    });
    let secret = "svc-secret-hunter2";
    let st = c.status().to_string();
    assert!(
        !st.contains(secret) && st.contains("secret.DB_PASSWORD"),
        "{st}"
    );
    let (ok, out, err) = c.cli(&["service", "show", "vault", "--json"]);
    assert!(ok, "{err}");
    assert!(
        !out.contains(secret) && out.contains("secret.DB_PASSWORD"),
        "{out}"
    );
    let v: Value = block(c.admin().get("/v1/lookup?name=n1")).unwrap();
    assert!(!v.to_string().contains(secret), "{v}");
    let dash = dashboard_addr(c.manager.as_ref().unwrap());
    let (code, body) = http_get(&dash, "/api/snapshot").unwrap();
    assert_eq!(code, 200);
    assert!(
        !body.contains(secret) && body.contains("svc-vault"),
        "{body}"
    );
    // Another node's certificate cannot read n1's desired state.
    let n2 = node_client(&c, &c.agent_dir("n2"));
    let renew = shoal_net::wire::RenewRequest {
        load: None,
        apps: vec![],
        applied: None,
    };
    let e = block(n2.post::<_, Value>("/v1/nodes/n1/renew", &renew)).unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
    for path in ["/v1/lookup", "/v1/lookup?name=n1", "/v1/services/vault"] {
        let v: Value = block(n2.get(path)).unwrap();
        assert!(!v.to_string().contains(secret), "{path}: {v}");
    }
    for path in ["/v1/status", "/v1/events"] {
        let e = block(n2.get::<Value>(path)).unwrap_err();
        assert_eq!(e.status(), Some(403), "{path}: {e}");
    }
    // Stored only where the manager's user can read it.
    assert_eq!(mode(&c.dir().join("registry.db")), 0o600);
    assert_eq!(mode(&c.dir()), 0o700);
}

/// The dashboard can require a token (a bearer header, or a cookie set by
/// opening `/?token=` once); without the flag it needs none.
#[test]
fn the_dashboard_can_require_a_token() {
    let mut c = Cluster::start(2.0);
    c.manager.take().unwrap().terminate();
    // Too short a token: refused, with the fix.
    let short = c.tmp.path().join("short.token");
    std::fs::write(&short, "abc\n").unwrap();
    let (ok, _, err) = run(&[
        "manager",
        "--dir",
        &c.dir_str(),
        "--listen",
        "127.0.0.1:0",
        "--no-discovery",
        "--dashboard-token-file",
        &s(&short),
    ]);
    assert!(
        !ok && err.contains("at least 16") && err.contains("openssl rand"),
        "{err}"
    );
    // A missing file gets a fresh random token, mode 0600.
    let file = c.tmp.path().join("dash.token");
    c.start_manager_with("127.0.0.1:0", &["--dashboard-token-file", &s(&file)]);
    let m = c.manager.as_ref().unwrap();
    m.wait_output("wrote a new dashboard token", Duration::from_secs(5));
    m.wait_output("token required", Duration::from_secs(5));
    assert_eq!(mode(&file), 0o600);
    let token = std::fs::read_to_string(&file).unwrap().trim().to_string();
    assert_eq!(token.len(), 64);
    let dash = dashboard_addr(m);
    let get = |path: &str, headers: &[String]| raw_get(&dash, path, &dash, headers);
    let status = |answer: &str| answer.split_whitespace().nth(1).unwrap_or("").to_string();
    // Nothing without the token, the page included.
    for path in ["/", "/api/snapshot", "/api/live"] {
        let a = get(path, &[]);
        assert_eq!(status(&a), "401", "{path}: {a}");
        assert!(a.contains("?token=TOKEN"), "{a}");
    }
    assert_eq!(
        status(&get(
            "/api/snapshot",
            &["Authorization: Bearer wrong-wrong-wrong".into()]
        )),
        "401"
    );
    assert_eq!(status(&get("/?token=wrong-wrong-wrong-wrong", &[])), "401");
    // Scripts: a bearer token.
    let a = get("/api/snapshot", &[format!("Authorization: Bearer {token}")]);
    assert_eq!(status(&a), "200", "{a}");
    assert!(a.contains("\"nodes\""), "{a}");
    // Browsers: the token once, then a cookie, and the token leaves the URL.
    let a = get(&format!("/?token={token}"), &[]);
    assert_eq!(status(&a), "303", "{a}");
    let lower = a.to_ascii_lowercase();
    assert!(lower.contains("\r\nlocation: /\r\n"), "{a}");
    let port = dash.rsplit(':').next().unwrap();
    let set = a
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .unwrap_or_else(|| panic!("no cookie: {a}"));
    assert!(
        set.contains(&format!("shoal_dashboard_{port}="))
            && set.contains("HttpOnly")
            && set.contains("SameSite=Strict")
            && !set.contains(&token),
        "{set}"
    );
    let cookie = set
        .split_once(':')
        .unwrap()
        .1
        .trim()
        .split(';')
        .next()
        .unwrap();
    for path in ["/", "/api/snapshot"] {
        let a = get(path, &[format!("Cookie: {cookie}")]);
        assert_eq!(status(&a), "200", "{path}: {a}");
    }
    // The Host check still comes first.
    let a = raw_get(
        &dash,
        "/api/snapshot",
        &format!("evil.example:{port}"),
        &[format!("Authorization: Bearer {token}")],
    );
    assert_eq!(status(&a), "421", "{a}");
}

/// A node holding the overlay role mints, for a host it deploys, a token
/// that admits that host's name once, with no more roles than its own, and
/// that the operator sees (owner, node) and can revoke; a node without the
/// role mints none, and no node mints one for a name already joined.
#[test]
fn a_deploy_token_admits_one_fresh_host_once_with_its_minters_roles() {
    let c = Cluster::start(2.0);
    let (_, deployer) = token_create(&c, &["--roles", "web,overlay"]);
    let deployer = write_token(&c, "d.token", &deployer);
    let (_, plain) = token_create(&c, &["--roles", "web"]);
    let plain = write_token(&c, "p.token", &plain);
    let d1 = c.agent_dir("d1");
    let _d1 = agent_with_file(&c, "d1", &d1, &deployer, &["--roles", "web"]);
    let p1 = c.agent_dir("p1");
    let _p1 = agent_with_file(&c, "p1", &p1, &plain, &["--roles", "web"]);
    c.wait_alive(&["d1", "p1"]);
    let mint = |dir: &Path, who: &str, node: &str| {
        block(
            node_client(&c, dir).post::<_, shoal_net::wire::DeployTokenResponse>(
                &format!("/v1/nodes/{who}/deploy-token"),
                &shoal_net::wire::DeployTokenRequest { node: node.into() },
            ),
        )
    };

    let e = mint(&p1, "p1", "h2").unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
    assert!(
        e.to_string().contains("did not grant role \"overlay\""),
        "{e}"
    );
    let e = mint(&d1, "d1", "p1").unwrap_err();
    assert!(e.to_string().contains("has already joined"), "{e}");
    let e = mint(&d1, "p1", "h2").unwrap_err();
    assert_eq!(e.status(), Some(403), "another node's name: {e}");

    let t = mint(&d1, "d1", "h2").unwrap();
    let (ok, out, err) = run(&["token", "list", "--dir", &c.dir_str(), "--json"]);
    assert!(ok, "{err}");
    let list: Value = serde_json::from_str(&out).unwrap();
    let rec = list
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == t.id.as_str())
        .expect("the minted token is listed");
    assert_eq!(rec["node"], "h2");
    assert_eq!(rec["minted_by"], "d1");
    assert_eq!(rec["uses_left"], 1);
    assert_eq!(rec["roles"], serde_json::json!(["web", "overlay"]));
    let left = rec["expires_ms"].as_u64().unwrap() - shoal_net::wire::unix_ms();
    assert!((9 * 60_000..=10 * 60_000).contains(&left), "{left} ms");

    let tf = write_token(&c, "h2.token", &t.token);
    let out = refused_join(&c, "h3", &c.agent_dir("h3"), &tf, &[]);
    assert!(out.contains("minted for node \"h2\" only"), "{out}");
    let out = refused_join(&c, "h2", &c.agent_dir("h2x"), &tf, &["--roles", "db"]);
    assert!(out.contains("does not grant role \"db\""), "{out}");
    let _h2 = agent_with_file(&c, "h2", &c.agent_dir("h2"), &tf, &["--roles", "web"]);
    c.wait_alive(&["h2"]);
    assert_eq!(token_state(&c, &t.id), "used-up");
    let out = refused_join(&c, "h2", &c.agent_dir("h2y"), &tf, &[]);
    assert!(out.contains("used as many times"), "{out}");

    // Revocable like any token; the event log names who minted what.
    let t = mint(&d1, "d1", "h4").unwrap();
    let (ok, _, err) = run(&["token", "revoke", &t.id, "--dir", &c.dir_str()]);
    assert!(ok, "{err}");
    let tf = write_token(&c, "h4.token", &t.token);
    let out = refused_join(&c, "h4", &c.agent_dir("h4"), &tf, &[]);
    assert!(out.contains("was revoked"), "{out}");
    let (ok, out, err) = c.cli(&["events", "--json"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("deploy token") && out.contains("minted for node \\\"h2\\\""),
        "{out}"
    );
}
