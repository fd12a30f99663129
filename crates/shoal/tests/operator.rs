//! Issue 14: a newcomer runs a cluster by hand and every failure says why.
//! Each test goes through the real binary and failed before its fix.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// `shoal init` with its config pointing at a free port, and a manager on
/// it, so that commands find the manager through the directory alone, as
/// the --help examples do.
fn cluster_on_free_port(ttl: &str) -> Cluster {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cluster");
    let listen = format!("127.0.0.1:{}", free_port());
    let (ok, _, err) = run(&[
        "init",
        "--dir",
        dir.to_str().unwrap(),
        "--listen",
        &listen,
        "--lease-ttl",
        ttl,
    ]);
    assert!(ok, "init failed: {err}");
    let mut c = Cluster {
        tmp,
        manager: None,
        url: String::new(),
        ttl: 2.0,
    };
    c.start_manager(&listen);
    c
}

/// Runs `shoal ARGS` in `cwd` without SHOAL_DIR; (success, stdout, stderr).
fn run_in(cwd: &Path, args: &[&str]) -> (bool, String, String) {
    let o = Command::new(BIN)
        .args(args)
        .current_dir(cwd)
        .env_remove("SHOAL_DIR")
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn node_roles(c: &Cluster, name: &str) -> Option<Vec<String>> {
    let n = c.try_status()?["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["name"] == name && n["state"] == "alive")?
        .clone();
    Some(
        n["roles"]
            .as_array()?
            .iter()
            .filter_map(|r| r.as_str().map(str::to_string))
            .collect(),
    )
}

fn node_address(c: &Cluster, name: &str) -> Option<String> {
    c.try_status()?["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["name"] == name && n["state"] == "alive")?["address"]
        .as_str()
        .map(str::to_string)
}

#[test]
fn every_time_flag_takes_units_and_a_bad_one_names_the_syntax() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c");
    let d = dir.to_str().unwrap();
    // init and manager: --lease-ttl with a unit; the old --ttl still works.
    let (ok, _, err) = run(&["init", "--dir", d, "--lease-ttl", "6s"]);
    assert!(ok, "{err}");
    let m = Proc::spawn(
        "manager",
        &[
            "manager",
            "--dir",
            d,
            "--listen",
            "127.0.0.1:0",
            "--lease-ttl",
            "1500ms",
            "--no-discovery",
            "--dashboard",
            "off",
        ],
    );
    m.wait_output("listening on https://", Duration::from_secs(20));
    drop(m);
    let (ok, out, err) = run(&["manager", "--dir", d, "--ttl", "6sec"]);
    assert!(!ok, "{out}");
    assert!(
        err.contains("\"6sec\"") && err.contains("500ms, 6s, 2m or 1h"),
        "{err}"
    );
    // bench agents: --duration and --lease-ttl with units, end to end.
    let (ok, out, err) = run(&[
        "bench",
        "agents",
        "--count",
        "2",
        "--lease-ttl",
        "1s",
        "--duration",
        "500ms",
        "--json",
    ]);
    assert!(ok, "bench agents: {out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["ttl_s"], 1.0, "{v}");
    // One name per concept: --lease-ttl is shown, --ttl is a hidden alias.
    for cmd in [
        &["bench", "agents", "--help"][..],
        &["bench", "detection", "--help"],
    ] {
        let (ok, out, _) = run(cmd);
        assert!(ok);
        assert!(out.contains("--lease-ttl"), "{out}");
        assert!(!out.contains("--ttl "), "{out}");
    }
    // The simulator's times and the agent's discovery timeout, too.
    let (ok, out, err) = run(&[
        "sim",
        "autoscale",
        "--workload",
        "diurnal",
        "--policy",
        "threshold",
        "--step",
        "2s",
        "--lead-time",
        "1m",
        "--json",
    ]);
    assert!(ok, "sim: {out}{err}");
    let (ok, _, err) = run(&[
        "agent",
        "--discover",
        "--discover-timeout",
        "forever",
        "--dir",
        tmp.path().join("a").to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("\"forever\""), "{err}");
}

#[test]
fn a_missing_dir_names_shoal_dir_and_help_examples_run_as_printed() {
    let c = cluster_on_free_port("2s");
    let cwd = c.tmp.path();
    std::os::unix::fs::symlink(c.dir(), cwd.join("c")).unwrap();
    // Without --dir or SHOAL_DIR, every admin command names both.
    for cmd in [
        &["status"][..],
        &["service", "list"],
        &["node", "assign", "n1", "--adaptor", "www"],
        &["token"],
        &["manager"],
    ] {
        let (ok, _, err) = run_in(cwd, cmd);
        assert!(!ok, "{cmd:?}");
        assert!(
            err.contains("SHOAL_DIR") && err.contains("--dir"),
            "{cmd:?}: {err}"
        );
    }
    let _agent = c.agent("n1", "web");
    c.wait_alive(&["n1"]);
    let site = cwd.join("site");
    write(&site.join("index.html"), "hi\n");
    let port = free_port();
    write(
        &cwd.join("web.toml"),
        &format!(
            "name = \"web\"\nmin_nodes = 1\nmax_nodes = 1\n[app]\nadaptor = \"www\"\nport = {port}\n[app.params]\nlisten = \"{{{{ node_address }}}}:{{{{ port }}}}\"\nroot = \"{}\"\n[metric]\nkind = \"cpu\"\ncapacity = 1\n",
            site.display()
        ),
    );
    // Every example line of these commands' --help, in the order a user
    // would try them, run as printed from the directory holding ./c.
    for cmd in [
        &["token"][..],
        &["status"],
        &["node", "assign"],
        &["service", "apply"],
        &["service", "list"],
        &["service", "show"],
        &["logs"],
        &["describe", "service"],
        &["describe", "node"],
        &["events"],
        &["service", "delete"],
        &["cert", "list"],
        &["node", "roles"],
    ] {
        let mut help = cmd.to_vec();
        help.push("--help");
        let (ok, out, _) = run_in(cwd, &help);
        assert!(ok);
        let examples: Vec<&str> = out
            .lines()
            .map(str::trim)
            // Usage lines name placeholders (<COMMAND>); examples do not.
            .filter(|l| l.starts_with("shoal ") && !l.contains('<'))
            .collect();
        assert!(!examples.is_empty(), "{cmd:?} --help has no example: {out}");
        for ex in examples {
            // A pipe's right side is the user's tool, not shoal; a
            // follower never ends by itself; an agent is another test's.
            if ex.contains("--follow") || ex.starts_with("shoal agent") {
                continue;
            }
            let ex = ex.split(" | ").next().unwrap();
            let args: Vec<&str> = ex.split_whitespace().skip(1).collect();
            // The service's app may still be starting when its logs are
            // asked for: retry for a while, as a user would.
            let t = Instant::now();
            loop {
                let (ok, out, err) = run_in(cwd, &args);
                if ok {
                    break;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "`{ex}` failed as printed: {out}{err}"
                );
                std::thread::sleep(Duration::from_millis(300));
            }
        }
    }
}

#[test]
fn node_assign_remove_needs_no_adaptor_and_names_a_missing_app() {
    let c = Cluster::start(2.0);
    let _a = c.agent("n1", "");
    c.wait_alive(&["n1"]);
    let d = c.dir_str();
    let port = free_port();
    let listen = format!("listen=127.0.0.1:{port}");
    let root = format!("root={}", c.tmp.path().display());
    let base = ["--dir", &d, "--manager", &c.url];
    let mut args = vec!["node", "assign", "n1", "--adaptor", "www", "--id", "w1"];
    args.extend_from_slice(&["--param", &listen, "--param", &root]);
    args.extend_from_slice(&base);
    let (ok, out, err) = run(&args);
    assert!(ok, "{out}{err}");
    let mut args = vec!["node", "assign", "n1", "--id", "nope", "--remove"];
    args.extend_from_slice(&base);
    let (ok, _, err) = run(&args);
    assert!(
        !ok && err.contains("\"nope\"") && err.contains("w1"),
        "{err}"
    );
    let mut args = vec!["node", "assign", "n1", "--id", "w1", "--remove"];
    args.extend_from_slice(&base);
    let (ok, out, err) = run(&args);
    assert!(ok, "{out}{err}");
    assert!(out.contains("removed w1"), "{out}");
    wait_for("the app gone", Duration::from_secs(20), || {
        c.node("n1")?["apps"].as_array()?.is_empty().then_some(())
    });
}

#[test]
fn agents_on_one_host_register_distinct_addresses_and_a_restart_keeps_roles_and_address() {
    let c = Cluster::start(2.0);
    let mut a1 = c.agent("n1", "web,db");
    let _a2 = c.agent("n2", "web");
    c.wait_alive(&["n1", "n2"]);
    let (ad1, ad2) = wait_for("addresses", Duration::from_secs(10), || {
        Some((node_address(&c, "n1")?, node_address(&c, "n2")?))
    });
    assert_ne!(ad1, ad2, "two agents on one host collide");
    for a in [&ad1, &ad2] {
        let ip: std::net::Ipv4Addr = a.parse().unwrap();
        assert!(ip.is_loopback() && ip.octets()[1] != 0, "{a}");
        // Reachable: something can listen there.
        std::net::TcpListener::bind((a.as_str(), 0)).unwrap();
    }
    assert_eq!(
        node_roles(&c, "n1").unwrap(),
        vec!["web".to_string(), "db".into()]
    );
    // Restarted as documented: `shoal agent --dir DIR`, no token, no roles.
    assert!(a1.terminate().success());
    let _a1 = Proc::spawn(
        "agent-n1-again",
        &["agent", "--dir", c.agent_dir("n1").to_str().unwrap()],
    );
    wait_for("n1 back with its roles", Duration::from_secs(30), || {
        (node_roles(&c, "n1")? == ["web", "db"]).then_some(())
    });
    assert_eq!(node_address(&c, "n1").unwrap(), ad1);
}

#[test]
fn a_join_to_the_wrong_manager_stops_with_the_reason_and_keeps_agent_toml() {
    let c = Cluster::start(2.0);
    let mut a = c.agent("n1", "web");
    c.wait_alive(&["n1"]);
    assert!(a.terminate().success());
    let toml_path = c.agent_dir("n1").join("agent.toml");
    let before = std::fs::read_to_string(&toml_path).unwrap();
    // Another cluster's manager: its certificate is not signed by our CA.
    let other = Cluster::start(2.0);
    let mut wrong = Proc::spawn(
        "agent-wrong",
        &[
            "agent",
            "--dir",
            c.agent_dir("n1").to_str().unwrap(),
            "--join",
            &other.url,
        ],
    );
    let st = wrong.wait_exit(Duration::from_secs(20));
    assert!(!st.success());
    let out = wrong.output();
    assert!(out.contains("certificate"), "{out}");
    assert!(out.contains("join again"), "{out}");
    assert_eq!(
        std::fs::read_to_string(&toml_path).unwrap(),
        before,
        "agent.toml was rewritten by a join that failed"
    );
    // The hint names flags the agent has.
    let dead = format!("https://127.0.0.1:{}", free_port());
    let (ok, _, err) = run(&[
        "agent",
        "--join",
        &dead,
        "--token",
        &c.token(),
        "--name",
        "n9",
        "--dir",
        c.tmp.path().join("agent-n9").to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("--join URL"), "{err}");
    assert!(
        !err.contains("pass the right address with --manager"),
        "{err}"
    );
}

#[test]
fn nginx_runs_under_an_agent_started_with_a_relative_dir() {
    assert!(
        Path::new("/usr/sbin/nginx").exists(),
        "nginx is missing: scripts/test.sh installs it"
    );
    let c = Cluster::start(2.0);
    let cwd = c.tmp.path();
    let a = Proc::spawn_cmd(
        "agent-n2",
        Command::new(BIN).current_dir(cwd).args([
            "agent",
            "--join",
            &c.url,
            "--token",
            &c.token(),
            "--name",
            "n2",
            "--dir",
            "./n2",
        ]),
    );
    c.wait_alive(&["n2"]);
    let site = cwd.join("site");
    write(&site.join("index.html"), "through nginx\n");
    let addr = format!("127.0.0.1:{}", free_port());
    let (ok, out, err) = run(&[
        "node",
        "assign",
        "n2",
        "--dir",
        &c.dir_str(),
        "--manager",
        &c.url,
        "--adaptor",
        "nginx",
        "--id",
        "ng",
        "--param",
        &format!("listen={addr}"),
        "--param",
        &format!("root={}", site.display()),
    ]);
    assert!(ok, "{out}{err}");
    let t = Instant::now();
    wait_for("nginx serving", Duration::from_secs(30), || {
        http_get(&addr, "/index.html")
            .filter(|(code, body)| *code == 200 && body.contains("through nginx"))
    });
    eprintln!("nginx served after {:?}", t.elapsed());
    drop(a);
}

#[test]
fn service_apply_help_shows_a_readable_example_in_h_and_help_and_every_doc_example_applies() {
    for flag in ["-h", "--help"] {
        let (ok, out, _) = run(&["service", "apply", flag]);
        assert!(ok);
        assert!(out.contains("docs/services.md"), "{flag}: {out}");
        // One key a line, as a TOML file is written.
        for line in ["  [app]", "  max_nodes = 4", "  [metric]"] {
            assert!(
                out.lines().any(|l| l == line),
                "{flag}: no line {line:?}: {out}"
            );
        }
    }
    // docs/services.md: every TOML block is a service the manager accepts.
    let doc = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/services.md"),
    )
    .unwrap();
    let blocks: Vec<&str> = doc
        .split("```toml\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap())
        .collect();
    assert!(blocks.len() >= 4, "a short example and one per adaptor");
    for adaptor in ["www", "nginx", "process"] {
        assert!(
            blocks
                .iter()
                .any(|b| b.contains(&format!("adaptor = \"{adaptor}\""))),
            "no complete example for {adaptor}"
        );
    }
    let c = Cluster::start(2.0);
    for (i, b) in blocks.iter().enumerate() {
        let f = c.tmp.path().join(format!("doc{i}.toml"));
        write(&f, b);
        let (ok, out, err) = run(&[
            "service",
            "apply",
            f.to_str().unwrap(),
            "--dir",
            &c.dir_str(),
            "--manager",
            &c.url,
        ]);
        assert!(
            ok,
            "docs/services.md example {i} is refused: {out}{err}\n{b}"
        );
    }
    // Every key of the format is documented.
    for key in [
        "name",
        "min_nodes",
        "max_nodes",
        "priority",
        "policy",
        "lead_time_secs",
        "drain_timeout_secs",
        "period_secs",
        "role",
        "adaptor",
        "port",
        "backend",
        "params",
        "algo",
        "replicas",
        "hash",
        "kind",
        "capacity",
        "upper",
        "lower",
        "k",
        "season_secs",
    ] {
        assert!(doc.contains(&format!("| `{key}` |")), "{key} undocumented");
    }
}

#[test]
fn log_files_hold_no_colour_escapes() {
    // The manager's stderr is a pipe here, as it is a file under `shoal up`
    // or a service manager: not a terminal. A node's lease expiring makes
    // it log a warning.
    let c = Cluster::start(1.0);
    let mut a = c.agent("n1", "");
    c.wait_alive(&["n1"]);
    a.kill9();
    let m = c.manager.as_ref().unwrap();
    let text = m.wait_output("lease expired", Duration::from_secs(20));
    assert!(text.contains("WARN"), "{text}");
    assert!(!text.contains('\x1b'), "colour escapes in a log: {text:?}");
}

#[test]
fn readme_and_docs_link_nothing_outside_the_repository() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let root = root.canonicalize().unwrap();
    let mut files = vec![root.join("README.md")];
    for e in std::fs::read_dir(root.join("docs")).unwrap().flatten() {
        if e.path().extension().is_some_and(|x| x == "md") {
            files.push(e.path());
        }
    }
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for part in text.split("](").skip(1) {
            let target = part.split(')').next().unwrap().split('#').next().unwrap();
            if target.is_empty() || target.contains("://") {
                continue;
            }
            let p = f.parent().unwrap().join(target);
            let p = p
                .canonicalize()
                .unwrap_or_else(|e| panic!("{}: link {target:?} is broken: {e}", f.display()));
            assert!(
                p.starts_with(&root),
                "{}: link {target:?} leaves the repository",
                f.display()
            );
        }
        // Code spans naming files outside the repository count too.
        assert!(!text.contains("../shared/"), "{}", f.display());
    }
}

/// The shell lines of docs/quickstart.md's "On one machine" block.
fn quickstart_one_machine_lines() -> Vec<String> {
    let doc = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/quickstart.md"),
    )
    .unwrap();
    let section = doc
        .split("### On one machine")
        .nth(1)
        .expect("docs/quickstart.md has an \"On one machine\" section");
    let block = section.split("```").nth(1).unwrap();
    block
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

#[test]
fn cluster_by_hand_on_one_host_as_the_quickstart_writes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path();
    let bin_dir = Path::new(BIN).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let ports: Vec<(String, String)> = ["7400", "8000", "8080", "8081"]
        .iter()
        .map(|p| (p.to_string(), free_port().to_string()))
        .collect();
    let port = |p: &str| ports.iter().find(|(a, _)| a == p).unwrap().1.clone();
    let bash = |line: &str| {
        let mut c = Command::new("bash");
        c.arg("-c")
            .arg(line)
            .current_dir(cwd)
            .env("PATH", &path)
            .env_remove("SHOAL_DIR")
            .env_remove("SHOAL_TOKEN");
        c
    };
    let mut background: Vec<Proc> = Vec::new();
    for line in quickstart_one_machine_lines() {
        let mut line = line;
        for (from, to) in &ports {
            line = line.replace(from.as_str(), to);
        }
        if let Some(cmd) = line.strip_suffix('&') {
            // exec: the signal that stops it at the end reaches shoal itself,
            // so an agent stops its apps as it does on Ctrl-C.
            let p = Proc::spawn_cmd(&line, &mut bash(&format!("exec {cmd}")));
            if cmd.contains("shoal manager") {
                p.wait_output("listening on https://", Duration::from_secs(20));
            }
            background.push(p);
            continue;
        }
        // As a user would, run a command again while what it needs is
        // still coming up; every failure says why.
        let t = Instant::now();
        loop {
            let o = bash(&line).output().unwrap();
            if o.status.success() {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(90),
                "`{line}` kept failing: {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    // Every app running: the hand-assigned one and the service on both.
    let dir = cwd.join("c").display().to_string();
    wait_for("every app running", Duration::from_secs(60), || {
        let o = Command::new(BIN)
            .args(["status", "--dir", &dir, "--json"])
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
        let apps: Vec<(String, String, String)> = v["nodes"]
            .as_array()?
            .iter()
            .flat_map(|n| {
                n["apps"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .map(move |a| {
                        (
                            n["name"].as_str().unwrap_or("").to_string(),
                            a["id"].as_str().unwrap_or("").to_string(),
                            a["state"].as_str().unwrap_or("").to_string(),
                        )
                    })
            })
            .collect();
        let running = |node: &str, id: &str| {
            apps.iter()
                .any(|(n, i, s)| n == node && i == id && s == "running")
        };
        (apps.len() == 3
            && running("n1", "www")
            && running("n1", "svc-site")
            && running("n2", "svc-site"))
        .then_some(())
    });
    // Two distinct backends, and the service serving through the dispatcher.
    wait_for(
        "two distinct backends serving",
        Duration::from_secs(30),
        || {
            let (ok, out, _) = run(&["service", "show", "site", "--dir", &dir, "--json"]);
            let d: serde_json::Value = serde_json::from_str(&out).ok().filter(|_| ok)?;
            let backends: std::collections::BTreeSet<String> = d["backends"]["backends"]
                .as_array()?
                .iter()
                .filter(|b| b["draining"] == false)
                .filter_map(|b| b["address"].as_str().map(str::to_string))
                .collect();
            let serving = d["allocations"]
                .as_array()?
                .iter()
                .filter(|a| a["phase"] == "serving")
                .count();
            (backends.len() == 2 && serving == 2).then_some(())
        },
    );
    let daddr = format!("127.0.0.1:{}", port("8000"));
    for _ in 0..20 {
        let (code, body) = http_get(&daddr, "/index.html").expect("the dispatcher answers");
        assert_eq!(code, 200);
        assert!(body.contains("hello from shoal"), "{body}");
    }
    // Stop agents first (they stop their apps), then the rest.
    background.reverse();
    drop(background);
    let root = cwd.display().to_string();
    wait_for("nothing left running", Duration::from_secs(20), || {
        let left = std::fs::read_dir("/proc")
            .ok()?
            .flatten()
            .filter(|e| {
                std::fs::read(e.path().join("cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).contains(&root))
                    .unwrap_or(false)
            })
            .count();
        (left == 0).then_some(())
    });
}

#[test]
fn a_failing_app_says_why_in_status_describe_and_events() {
    let c = Cluster::start(2.0);
    let _a = c.agent("n1", "web");
    c.wait_alive(&["n1"]);
    let d = c.dir_str();
    let m = ["--dir", d.as_str(), "--manager", c.url.as_str()];
    // The port is taken: the app cannot start.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let listen = format!("listen={addr}");
    let root = format!("root={}", c.tmp.path().display());
    let follow = Proc::spawn(
        "events-follow",
        &[&["events", "--follow", "--node", "n1"][..], &m].concat(),
    );
    let (ok, out, err) = run(&[
        &[
            "node",
            "assign",
            "n1",
            "--adaptor",
            "www",
            "--param",
            &listen,
            "--param",
            &root,
        ][..],
        &m,
    ]
    .concat());
    assert!(ok, "{out}{err}");
    let text = wait_for("status naming the cause", Duration::from_secs(30), || {
        let (ok, out, _) = run(&[&["status"][..], &m].concat());
        (ok && out.contains("apps not running") && out.contains("in use")).then_some(out)
    });
    assert!(text.contains("n1 www: backoff"), "{text}");
    let (ok, out, err) = run(&[&["describe", "node", "n1"][..], &m].concat());
    assert!(ok, "{err}");
    for needle in [
        "Address:",
        "Roles:     web",
        "RESTARTS",
        "www",
        "in use",
        "Events:",
    ] {
        assert!(
            out.contains(needle),
            "describe node lacks {needle:?}: {out}"
        );
    }
    // The follower saw the assignment as it happened.
    follow.wait_output("assigned", Duration::from_secs(20));
    drop(follow);
    drop(taken);

    // A service: definition, allocation, apps, decisions and events.
    let site = c.tmp.path().join("site");
    write(&site.join("index.html"), "x\n");
    let file = c.tmp.path().join("web.toml");
    write(
        &file,
        &format!(
            "name = \"web\"\nmin_nodes = 1\nmax_nodes = 1\nperiod_secs = 1\n[app]\nadaptor = \"www\"\nport = {}\n[app.params]\nlisten = \"{{{{ node_address }}}}:{{{{ port }}}}\"\nroot = \"{}\"\n[metric]\nkind = \"cpu\"\ncapacity = 1\n",
            free_port(),
            site.display()
        ),
    );
    let (ok, out, err) = run(&[&["service", "apply", file.to_str().unwrap()][..], &m].concat());
    assert!(ok, "{out}{err}");
    let out = wait_for(
        "describe service with a running app",
        Duration::from_secs(40),
        || {
            let (ok, out, _) = run(&[&["describe", "service", "web"][..], &m].concat());
            (ok && out.contains("svc-web") && out.contains(" running ")).then_some(out)
        },
    );
    for needle in [
        "Definition:",
        "max_nodes = 1",
        "Allocation:",
        "n1",
        "Last decisions:",
        "Events:",
        "web: definition created",
    ] {
        assert!(
            out.contains(needle),
            "describe service lacks {needle:?}: {out}"
        );
    }
    assert!(!out.contains("..="), "{out}");
    // events --service keeps the service's own events only.
    let (ok, out, _) = run(&[&["events", "--service", "web"][..], &m].concat());
    assert!(ok);
    assert!(out.contains("web: definition created"), "{out}");
    assert!(!out.contains("registered"), "{out}");
    // service list: one NODES column; show: times for people, no debug syntax.
    let (ok, out, _) = run(&[&["service", "list"][..], &m].concat());
    assert!(ok);
    assert_eq!(
        out.lines().next().unwrap().matches("NODES").count(),
        1,
        "{out}"
    );
    let out = wait_for("a monitor sample", Duration::from_secs(20), || {
        let (ok, out, _) = run(&[&["service", "show", "web"][..], &m].concat());
        (ok && out.contains(" UTC")).then_some(out)
    });
    assert!(!out.contains("..=") && !out.contains("metric Cpu"), "{out}");
    assert!(out.contains("metric cpu") && out.contains(" UTC"), "{out}");
    let epoch_ms = out
        .split(|c: char| !c.is_ascii_digit())
        .any(|w| w.len() == 13);
    assert!(!epoch_ms, "epoch milliseconds in service show: {out}");
}

#[test]
fn the_manager_serves_prometheus_metrics_that_promtool_accepts() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cluster");
    let d = dir.to_str().unwrap();
    let (ok, _, err) = run(&["init", "--dir", d, "--lease-ttl", "1s"]);
    assert!(ok, "{err}");
    let mut c = Cluster {
        tmp,
        manager: None,
        url: String::new(),
        ttl: 1.0,
    };
    let m = Proc::spawn(
        "manager",
        &[
            "manager",
            "--dir",
            d,
            "--listen",
            "127.0.0.1:0",
            "--no-discovery",
            "--dashboard",
            "off",
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    let out = m.wait_output("metrics at http://", Duration::from_secs(20));
    c.url = out
        .split("listening on ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .into();
    let maddr = out
        .split("metrics at http://")
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    c.manager = Some(m);
    let mut a1 = c.agent("n1", "web");
    let _a2 = c.agent("n2", "web");
    c.wait_alive(&["n1", "n2"]);
    let site = c.tmp.path().join("site");
    write(&site.join("index.html"), "x\n");
    let file = c.tmp.path().join("web.toml");
    write(
        &file,
        &format!(
            "name = \"web\"\nmin_nodes = 1\nmax_nodes = 2\nperiod_secs = 1\n[app]\nadaptor = \"www\"\nport = {}\n[app.params]\nlisten = \"{{{{ node_address }}}}:{{{{ port }}}}\"\nroot = \"{}\"\n[metric]\nkind = \"cpu\"\ncapacity = 1\n",
            free_port(),
            site.display()
        ),
    );
    let (ok, out, err) = run(&[
        "service",
        "apply",
        file.to_str().unwrap(),
        "--dir",
        d,
        "--manager",
        &c.url,
    ]);
    assert!(ok, "{out}{err}");
    a1.kill9();
    let value = |text: &str, series: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))?
            .rsplit(' ')
            .next()?
            .parse()
            .ok()
    };
    let text = wait_for("metrics after an expiry", Duration::from_secs(30), || {
        let (code, body) = http_get(&maddr, "/metrics")?;
        (code == 200
            && value(&body, "shoal_manager_lease_expiries_total")? >= 1.0
            && value(
                &body,
                "shoal_manager_service_nodes{service=\"web\",phase=\"serving\"}",
            )? >= 1.0)
            .then_some(body)
    });
    assert!(
        value(&text, "shoal_manager_registrations_total").unwrap() >= 2.0,
        "{text}"
    );
    assert!(
        value(&text, "shoal_manager_renewals_total").unwrap() >= 1.0,
        "{text}"
    );
    assert_eq!(
        value(&text, "shoal_manager_leases{state=\"failed\"}"),
        Some(1.0),
        "{text}"
    );
    assert!(
        value(&text, "shoal_manager_decisions_total").is_some(),
        "{text}"
    );
    assert!(
        value(&text, "shoal_manager_store_seconds_count{op=\"write\"}").unwrap() >= 1.0,
        "{text}"
    );
    // promtool (Debian's prometheus package; scripts/test.sh installs it).
    let mut p = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is missing: scripts/test.sh installs prometheus");
    use std::io::Write as _;
    p.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let o = p.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "promtool refuses the exposition: {}{}\n{text}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn shoal_logs_fetches_and_follows_an_apps_output_through_the_manager() {
    let c = Cluster::start(2.0);
    let _a = c.agent("n1", "");
    c.wait_alive(&["n1"]);
    let d = c.dir_str();
    let m = ["--dir", d.as_str(), "--manager", c.url.as_str()];
    let (ok, out, err) = run(&[
        &[
            "node",
            "assign",
            "n1",
            "--adaptor",
            "process",
            "--id",
            "ticker",
            "--param",
            "command=sh",
            "--param",
            "args=-c 'i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.2; done'",
        ][..],
        &m,
    ]
    .concat());
    assert!(ok, "{out}{err}");
    // One app on the node: it may be left out.
    let out = wait_for("output", Duration::from_secs(30), || {
        let (ok, out, _) = run(&[&["logs", "n1", "--tail", "3"][..], &m].concat());
        (ok && out.lines().count() == 3 && out.contains("tick ")).then_some(out)
    });
    assert!(out.lines().all(|l| l.starts_with("tick ")), "{out}");
    // A wrong app id is named with the ones there are.
    let (ok, _, err) = run(&[&["logs", "n1", "nope"][..], &m].concat());
    assert!(
        !ok && err.contains("nope") && err.contains("ticker"),
        "{err}"
    );
    // --follow prints new lines as they come.
    let f = Proc::spawn(
        "logs-follow",
        &[&["logs", "n1", "ticker", "--follow", "--tail", "1"][..], &m].concat(),
    );
    let first: u64 = wait_for("a first line", Duration::from_secs(20), || {
        f.output()
            .lines()
            .next()?
            .strip_prefix("tick ")?
            .parse()
            .ok()
    });
    wait_for("later lines", Duration::from_secs(20), || {
        f.output()
            .lines()
            .filter_map(|l| l.strip_prefix("tick ")?.parse::<u64>().ok())
            .any(|n| n >= first + 5)
            .then_some(())
    });
    // Lines arrive in order, none twice.
    let seen: Vec<u64> = f
        .output()
        .lines()
        .filter_map(|l| l.strip_prefix("tick ")?.parse().ok())
        .collect();
    assert!(seen.windows(2).all(|w| w[1] == w[0] + 1), "{seen:?}");
}
