//! Two of the controller's decisions end to end with real processes (a
//! manager, agents, dispatchers following services, load generators):
//!
//! - a node whose lease expires under load (its agent, and the `www` app it
//!   serves, killed with SIGKILL: a machine gone) leaves the backend list
//!   within a pass of its lease running out and is replaced from the pool;
//!   no request fails but those in flight on the dead node;
//! - cross-priority pre-emption (Oceano Fig. 1): two services fill the pool;
//!   when the higher-priority one needs more, it takes the lower one's nodes
//!   through drain, and neither service fails a request.

mod common;
use common::load::{CLIENTS, FILE_BYTES, Load};
use common::*;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// The nodes in the manager's published backend list of `name`.
fn listed(c: &Cluster, name: &str) -> Option<Vec<String>> {
    let (ok, out, _) = c.cli(&["service", "show", name, "--json"]);
    if !ok {
        return None;
    }
    let d: serde_json::Value = serde_json::from_str(&out).ok()?;
    Some(
        d["backends"]["backends"]
            .as_array()?
            .iter()
            .filter_map(|b| b["node"].as_str().map(str::to_string))
            .collect(),
    )
}

/// A service file: `www` serving `root`, sized on the dispatcher's
/// requests per second per backend.
#[allow(clippy::too_many_arguments)]
fn spec(
    name: &str,
    priority: u32,
    min: u32,
    max: u32,
    capacity: f64,
    port: u16,
    root: &std::path::Path,
) -> String {
    format!(
        r#"
name = "{name}"
priority = {priority}
min_nodes = {min}
max_nodes = {max}
policy = "threshold"
period_secs = 1
lead_time_secs = 2
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
capacity = {capacity}
[sla]
upper = 0.9
lower = 0.3
"#,
        root.display()
    )
}

fn site(c: &Cluster) -> std::path::PathBuf {
    let site = c.tmp.path().join("site");
    write(&site.join("index.html"), "hello\n");
    std::fs::write(site.join("big.bin"), vec![7u8; FILE_BYTES]).unwrap();
    site
}

fn apply(c: &Cluster, name: &str, toml: &str) {
    let file = c.tmp.path().join(format!("{name}.toml"));
    write(&file, toml);
    let (ok, out, err) = c.cli(&["service", "apply", file.to_str().unwrap()]);
    assert!(ok, "apply {name} failed: {out}{err}");
}

/// A dispatcher following `svc`, serving once its list has a backend.
fn dispatcher(c: &Cluster, svc: &str) -> (Proc, String) {
    let daddr = format!("127.0.0.1:{}", free_port());
    let p = Proc::spawn(
        &format!("dispatch-{svc}"),
        &[
            "dispatch",
            "--manager",
            &c.url,
            "--service",
            svc,
            "--dir",
            &c.dir_str(),
            "--listen",
            &daddr,
            "--drain-timeout",
            "20s",
        ],
    );
    wait_for(
        &format!("the {svc} dispatcher serves"),
        Duration::from_secs(20),
        || http_get(&daddr, "/index.html").filter(|(code, _)| *code == 200),
    );
    (p, daddr)
}

#[test]
fn a_node_whose_lease_expires_under_load_is_replaced_failing_only_its_requests_in_flight() {
    let ttl = 2.0;
    let c = Cluster::start(ttl);
    let mut agents: Vec<(String, Proc)> = (1..=3)
        .map(|i| {
            let n = format!("n{i}");
            let p = c.agent_at(&n, &format!("127.0.0.{}", 30 + i));
            (n, p)
        })
        .collect();
    c.wait_alive(&["n1", "n2", "n3"]);
    let root = site(&c);
    // Two nodes, whatever the load: this test is about replacement.
    apply(
        &c,
        "web",
        &spec("web", 0, 2, 2, 100000.0, free_port(), &root),
    );
    wait_for("two nodes serving", Duration::from_secs(60), || {
        (names(&c.service("web")?, "serving").len() == 2).then_some(())
    });
    let (disp, daddr) = dispatcher(&c, "web");
    let load = Load::start(daddr.clone(), "/big.bin");
    load.level.store(CLIENTS, Relaxed);
    wait_for("load flows", Duration::from_secs(30), || {
        (load.ok.load(Relaxed) > 50).then_some(())
    });

    let s = c.service("web").unwrap();
    let victim = names(&s, "serving")[0].clone();
    let spare = ["n1", "n2", "n3"]
        .into_iter()
        .find(|n| !names(&s, "nodes").iter().any(|x| x == n))
        .unwrap()
        .to_string();
    let killed_at = Instant::now();
    agents
        .iter_mut()
        .find(|(n, _)| *n == victim)
        .unwrap()
        .1
        .kill9();

    // Out of the published list once the lease runs out (TTL, plus the
    // pass that sees it, plus one status round trip).
    wait_for(
        "the dead node leaves the backend list",
        Duration::from_secs(20),
        || (!listed(&c, "web")?.contains(&victim)).then_some(()),
    );
    let out_after = killed_at.elapsed().as_secs_f64();
    wait_for(
        "the spare node replaces it",
        Duration::from_secs(60),
        || {
            let s = c.service("web")?;
            let serving = names(&s, "serving");
            (serving.len() == 2 && serving.contains(&spare) && !serving.contains(&victim))
                .then_some(())
        },
    );
    let replaced_after = killed_at.elapsed().as_secs_f64();
    assert_eq!(c.node(&victim).unwrap()["state"], "failed");
    let events = c.status()["events"].to_string();
    assert!(events.contains(&victim), "{events}");

    let ok_then = load.ok.load(Relaxed);
    wait_for(
        "load flows on the replacement",
        Duration::from_secs(30),
        || (load.ok.load(Relaxed) > ok_then + 50).then_some(()),
    );
    let (ok, failed, failures) = load.finish();
    eprintln!(
        "kill -9 of {victim}: out of the list after {out_after:.1} s (lease TTL {ttl} s), \
         {spare} serving after {replaced_after:.1} s; requests {ok} ok, {failed} failed: {failures:?}"
    );
    assert!(
        out_after < ttl + 3.0,
        "{victim} stayed listed {out_after:.1} s after it died (TTL {ttl} s)"
    );
    // Only requests in flight on the dead node can fail: at most one per
    // client, each cut mid-body (never a 5xx from the dispatcher, which
    // retries a refused connection on another backend).
    assert!(
        failed as usize <= CLIENTS,
        "{failed} requests failed, more than the {CLIENTS} that can be in flight: {failures:?}"
    );
    for f in &failures {
        assert!(
            !f.starts_with("status") && !f.starts_with("connect"),
            "a request failed other than in flight: {f}"
        );
    }
    drop(disp);
}

#[test]
fn a_higher_priority_service_takes_a_lower_ones_nodes_through_drain() {
    let c = Cluster::start(2.0);
    let _agents: Vec<Proc> = (1..=4)
        .map(|i| c.agent_at(&format!("n{i}"), &format!("127.0.0.{}", 40 + i)))
        .collect();
    c.wait_alive(&["n1", "n2", "n3", "n4"]);
    let root = site(&c);
    // A node carries 5 requests/s; ten slow clients make either service
    // want its ceiling of three, so together they want more than the pool.
    apply(&c, "low", &spec("low", 0, 1, 3, 5.0, free_port(), &root));
    apply(&c, "high", &spec("high", 10, 1, 3, 5.0, free_port(), &root));
    wait_for("one node each", Duration::from_secs(60), || {
        let (l, h) = (c.service("low")?, c.service("high")?);
        (names(&l, "serving").len() == 1 && names(&h, "serving").len() == 1).then_some(())
    });
    let (_dl, low_addr) = dispatcher(&c, "low");
    let (_dh, high_addr) = dispatcher(&c, "high");
    let low_load = Load::start(low_addr, "/big.bin");
    let high_load = Load::start(high_addr, "/big.bin");

    // The low-priority service grows into the rest of the pool.
    low_load.level.store(CLIENTS, Relaxed);
    wait_for("low holds three nodes", Duration::from_secs(90), || {
        (names(&c.service("low")?, "serving").len() == 3).then_some(())
    });
    let before = names(&c.service("low").unwrap(), "serving");

    // The high-priority service's demand rises: the pool is empty, so it
    // takes nodes of the lower one, each drained first.
    let t0 = Instant::now();
    high_load.level.store(CLIENTS, Relaxed);
    let taken = wait_for(
        "high takes nodes from low",
        Duration::from_secs(120),
        || {
            let (l, h) = (c.service("low")?, c.service("high")?);
            let hs = names(&h, "serving");
            let moved: Vec<String> = hs.iter().filter(|n| before.contains(n)).cloned().collect();
            (hs.len() == 3 && names(&l, "nodes").len() == 1 && moved.len() == 2).then_some(moved)
        },
    );
    let took = t0.elapsed().as_secs_f64();
    let events: Vec<String> = c.status()["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap_or("").to_string())
        .collect();
    let preempted: Vec<&String> = events
        .iter()
        .filter(|e| e.contains("to hand it to high") && e.contains("outranks low"))
        .collect();
    assert_eq!(preempted.len(), 2, "{events:#?}");
    for n in &taken {
        assert!(
            preempted.iter().any(|e| e.contains(n.as_str())),
            "{n} moved without a pre-emption event: {events:#?}"
        );
    }
    // low keeps its floor.
    assert_eq!(names(&c.service("low").unwrap(), "serving").len(), 1);

    // Both keep serving, and no request failed on either side.
    let (lo, hi) = (low_load.ok.load(Relaxed), high_load.ok.load(Relaxed));
    wait_for("both still serve", Duration::from_secs(30), || {
        (low_load.ok.load(Relaxed) > lo + 20 && high_load.ok.load(Relaxed) > hi + 20).then_some(())
    });
    let (lok, lfailed, lf) = low_load.finish();
    let (hok, hfailed, hf) = high_load.finish();
    eprintln!(
        "high took {taken:?} from low in {took:.1} s; low {lok} ok {lfailed} failed, high {hok} ok {hfailed} failed"
    );
    assert_eq!(lfailed, 0, "low: {lf:?}");
    assert_eq!(hfailed, 0, "high: {hf:?}");
}
