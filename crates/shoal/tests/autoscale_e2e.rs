//! End to end: a manager, four agents, a dispatcher following a service on
//! the shared pool, and a load generator. The service (the `www` adaptor)
//! starts on one node; when many keep-alive clients fetch a large file
//! through the dispatcher, the engine adds nodes through the real agents and
//! the dispatcher's list; when the load falls, it drains and releases them,
//! and no request fails during a release. The allocation survives a manager
//! restart.
//!
//! The metric is `dispatch_rps`: requests per second per backend as the
//! dispatcher counts them. On one machine every agent reads the same
//! loopback counters, so the node-wide `net` metric would charge every node
//! with the whole load; the dispatcher's per-backend count is honest per
//! node. (`dispatch_active`, requests in flight, reads ~0 here: the
//! dispatcher finishes reading a 512 KB body into loopback socket buffers
//! long before the slow client has read it.)

mod common;

use common::load::{CLIENTS, FILE_BYTES, Load};
use common::*;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

fn count(v: &serde_json::Value, field: &str) -> usize {
    v[field].as_array().map_or(0, |a| a.len())
}

#[test]
fn service_scales_out_and_in_through_real_agents_and_dispatcher() {
    let mut c = Cluster::start(2.0);
    let mut agents: Vec<Proc> = (1..=4)
        .map(|i| c.agent_at(&format!("n{i}"), &format!("127.0.0.{}", 10 + i)))
        .collect();
    c.wait_alive(&["n1", "n2", "n3", "n4"]);

    let site = c.tmp.path().join("site");
    write(&site.join("index.html"), "hello\n");
    std::fs::write(site.join("big.bin"), vec![7u8; FILE_BYTES]).unwrap();
    let port = free_port();
    let toml = format!(
        r#"
name = "web"
min_nodes = 1
max_nodes = 3
policy = "threshold"
period_secs = 1
lead_time_secs = 5
drain_timeout_secs = 20
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
capacity = 50
[sla]
upper = 0.9
lower = 0.5
"#,
        site.display()
    );
    let file = c.tmp.path().join("web.toml");
    write(&file, &toml);
    let (ok, out, err) = run(&[
        "service",
        "apply",
        file.to_str().unwrap(),
        "--dir",
        &c.dir_str(),
        "--manager",
        &c.url,
    ]);
    assert!(ok, "apply failed: {out}{err}");

    // A bad definition is refused with the field named, and changes nothing.
    let bad = c.tmp.path().join("bad.toml");
    write(&bad, &toml.replace("capacity = 50", "capacity = -1"));
    let (ok, _, err) = run(&[
        "service",
        "apply",
        bad.to_str().unwrap(),
        "--dir",
        &c.dir_str(),
        "--manager",
        &c.url,
    ]);
    assert!(!ok && err.contains("metric.capacity"), "{err}");

    // min_nodes = 1: one node is allocated and serves.
    let t0 = Instant::now();
    wait_for("first node serving", Duration::from_secs(60), || {
        let s = c.service("web")?;
        (count(&s, "serving") == 1).then_some(())
    });
    eprintln!(
        "first node serving after {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    // The dispatcher follows the service with its own certificate, which
    // reads this service's backends and reports its load, nothing else
    // (issue 15): the scaling below runs on those reports.
    let disp_dir = c.tmp.path().join("dispatcher");
    let (ok, _, err) = run(&[
        "cert",
        "dispatcher",
        "--dir",
        &c.dir_str(),
        "--service",
        "web",
        "--out",
        disp_dir.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(!disp_dir.join("admin.key").exists());
    let dport = free_port();
    let daddr = format!("127.0.0.1:{dport}");
    let dispatcher = Proc::spawn(
        "dispatch",
        &[
            "dispatch",
            "--manager",
            &c.url,
            "--service",
            "web",
            "--dir",
            disp_dir.to_str().unwrap(),
            "--listen",
            &daddr,
            "--admin",
            "127.0.0.1:0",
            "--drain-timeout",
            "20s",
        ],
    );
    let banner = dispatcher.wait_output("listening on", Duration::from_secs(20));
    let admin = banner
        .split_whitespace()
        .skip_while(|w| *w != "admin")
        .nth(1)
        .expect("the dispatcher prints its admin address")
        .to_string();
    wait_for(
        "the dispatcher serves the site",
        Duration::from_secs(20),
        || http_get(&daddr, "/index.html").filter(|(code, _)| *code == 200),
    );

    // `shoal route --service` explains with the service's list and its
    // dispatch settings from the manager (lc, not the default url-hash);
    // `--dispatcher` asks the running dispatcher, which agrees.
    let route = |source: &[&str]| -> serde_json::Value {
        let mut args = vec!["route", "--json"];
        args.extend_from_slice(source);
        args.push("/index.html");
        let (ok, out, err) = run(&args);
        assert!(ok, "shoal route {source:?}: {err}");
        serde_json::from_str(&out).unwrap()
    };
    let offline = route(&[
        "--service",
        "web",
        "--dir",
        &c.dir_str(),
        "--manager",
        &c.url,
    ]);
    assert_eq!(offline[0]["algo"], "lc", "{offline}");
    assert_eq!(
        offline[0]["subset"].as_array().unwrap().len(),
        1,
        "{offline}"
    );
    let live = route(&["--dispatcher", &admin]);
    assert_eq!(live[0]["algo"], "lc", "{live}");
    assert_eq!(live[0]["chosen"], offline[0]["chosen"], "{live} {offline}");
    let (ok, _, err) = run(&["route", "--service", "nope", "--dir", &c.dir_str(), "/x"]);
    assert!(!ok && err.contains("nope"), "{err}");

    // Load rises: the service grows through the pool.
    let load = Load::start(daddr.clone(), "/big.bin");
    load.level.store(CLIENTS, Relaxed);
    let t_up = Instant::now();
    let mut first_add = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = c.service("web");
        if let Some(s) = &s {
            if first_add.is_none() && count(s, "nodes") > 1 {
                first_add = Some(t_up.elapsed());
            }
            if count(s, "serving") >= 2 {
                break;
            }
        }
        if Instant::now() > deadline {
            let (_, out, _) = run(&[
                "service",
                "show",
                "web",
                "--dir",
                &c.dir_str(),
                "--manager",
                &c.url,
            ]);
            let fails: Vec<String> = load
                .failures
                .lock()
                .unwrap()
                .iter()
                .take(3)
                .cloned()
                .collect();
            load.stop.store(true, Relaxed);
            panic!(
                "no scale-out to 2 serving nodes: {s:?}\n{out}\nload ok {} failed {} {fails:?}\ndispatcher: {}",
                load.ok.load(Relaxed),
                load.failed.load(Relaxed),
                dispatcher.output()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let t_out = t_up.elapsed();
    eprintln!(
        "scale-out: second node allocated {:.1} s, 2 serving {:.1} s after the load rose to {CLIENTS} clients",
        first_add.unwrap_or_default().as_secs_f64(),
        t_out.as_secs_f64()
    );
    // The new backends really serve: each node's www app took requests.
    let busy_before = load.ok.load(Relaxed);
    wait_for(
        "requests on the grown service",
        Duration::from_secs(20),
        || (load.ok.load(Relaxed) > busy_before + 50).then_some(()),
    );
    let detail = |c: &Cluster| -> serde_json::Value {
        let (ok, out, err) = run(&[
            "service",
            "show",
            "web",
            "--json",
            "--dir",
            &c.dir_str(),
            "--manager",
            &c.url,
        ]);
        assert!(ok, "{err}");
        serde_json::from_str(&out).unwrap()
    };
    let d = detail(&c);
    let series = d["series"].as_array().unwrap();
    let peak = series
        .iter()
        .filter_map(|p| p["observed"].as_f64())
        .fold(0.0, f64::max);
    eprintln!("peak observed load: {peak:.1} requests/s (capacity 50 per node)");
    assert!(
        peak > 0.9 * 50.0,
        "the monitor never saw the load: {series:?}"
    );

    // Load falls: nodes drain and return to the pool, without a failed request.
    load.level.store(1, Relaxed);
    let t_down = Instant::now();
    wait_for("scale-in to 1 node", Duration::from_secs(120), || {
        let s = c.service("web")?;
        (count(&s, "nodes") == 1 && count(&s, "serving") == 1).then_some(())
    });
    eprintln!(
        "scale-in to 1 node {:.1} s after the load fell",
        t_down.elapsed().as_secs_f64()
    );
    let ok_n = load.ok.load(Relaxed);
    wait_for(
        "requests after the release",
        Duration::from_secs(20),
        || (load.ok.load(Relaxed) > ok_n + 20).then_some(()),
    );
    let failed = load.failed.load(Relaxed);
    eprintln!("requests: {} ok, {failed} failed", load.ok.load(Relaxed));
    assert_eq!(
        failed,
        0,
        "requests failed: {:?}",
        load.failures
            .lock()
            .unwrap()
            .iter()
            .take(5)
            .collect::<Vec<_>>()
    );

    // Every decision is an event with its reason; released nodes run no
    // service app any more.
    let st = c.status();
    let events: Vec<String> = st["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap_or("").to_string())
        .collect();
    let all = events.join("\n");
    assert!(all.contains("web: draining"), "{all}");
    // Released once the dispatcher confirmed the node idle, not by timeout.
    assert!(all.contains("released after draining"), "{all}");
    assert!(all.contains("(Idle)"), "{all}");
    let s = c.service("web").unwrap();
    let kept = s["nodes"][0].as_str().unwrap().to_string();
    for n in st["nodes"].as_array().unwrap() {
        let has = n["desired"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["id"] == "svc-web");
        assert_eq!(has, n["name"] == kept.as_str(), "{n}");
    }

    // The allocation survives a manager restart.
    let listen = c.url.trim_start_matches("https://").to_string();
    c.manager.as_mut().unwrap().terminate();
    c.start_manager(&listen);
    let s = wait_for("service restored", Duration::from_secs(20), || {
        c.service("web")
    });
    assert_eq!(s["nodes"][0].as_str(), Some(kept.as_str()), "{s}");

    load.stop.store(true, Relaxed);
    for t in load.threads {
        let _ = t.join();
    }
    assert_eq!(
        load.failed.load(Relaxed),
        0,
        "{:?}",
        load.failures.lock().unwrap()
    );
    drop(dispatcher);
    for a in agents.iter_mut() {
        a.terminate();
    }
}
