//! `shoal job` end to end (docs/dps.md): a 2-unit `shoal bsp` chain as a
//! job on two agents, the manager's banker answering their reports, the
//! job finishing, stopping, and a bad job file refused with its field.

mod common;

use common::{Cluster, wait_for};
use std::time::Duration;

#[test]
fn a_job_runs_on_two_nodes_reports_to_the_banker_and_stops() {
    let c = Cluster::start(3.0);
    let _a = c.agent("n1", "");
    let _b = c.agent("n2", "");
    c.wait_alive(&["n1", "n2"]);
    let port = common::free_port();
    let file = c.dir().join("chain.toml");
    common::write(
        &file,
        &format!(
            "name = \"chain\"\nunits = 2\nmax_cpu = 0.4\nmode = \"bank\"\nperiod = \"500ms\"\n\n[bsp]\npattern = \"chain\"\niterations = 40\nwork = 4\nport = {port}\n"
        ),
    );
    let (ok, out, err) = c.cli(&["job", "run", file.to_str().unwrap()]);
    assert!(ok, "job run failed: {err}");
    assert!(out.contains("job chain started"), "{out}");
    // Both units report (their iterations reach the banker) and finish.
    let job = wait_for("the job to finish", Duration::from_secs(90), || {
        let (ok, out, err) = c.cli(&["job", "show", "chain", "--json"]);
        eprintln!("{out}{err}");
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        (ok && v["finished"] == true).then_some(v)
    });
    let units = job["units"].as_array().unwrap();
    assert_eq!(units.len(), 2);
    let nodes: Vec<&str> = units.iter().map(|u| u["node"].as_str().unwrap()).collect();
    assert_ne!(nodes[0], nodes[1], "one unit per node");
    for u in units {
        assert_eq!(u["iterations"], 40, "{u}");
    }
    assert!(
        (job["accounted"].as_f64().unwrap() - 0.4).abs() < 1e-6,
        "{job}"
    );
    // The same again is refused while it exists.
    let (ok, _, err) = c.cli(&["job", "run", file.to_str().unwrap()]);
    assert!(!ok && err.contains("exists already"), "{err}");
    let (ok, _, err) = c.cli(&["job", "stop", "chain"]);
    assert!(ok, "{err}");
    let (ok, out, _) = c.cli(&["job", "list", "--json"]);
    assert!(ok && out.trim() == "[]", "{out}");
    // A bad definition names its field and changes nothing.
    common::write(&file, "name = \"bad\"\nunits = 2\nmax_cpu = -1\n[bsp]\n");
    let (ok, _, err) = c.cli(&["job", "run", file.to_str().unwrap()]);
    assert!(!ok && err.contains("max_cpu"), "{err}");
}

/// §5.2.2 on real agents: a unit moved to a third node mid-run stops where
/// it ran and starts there after the last iteration it reported; its
/// neighbour, still running, carries on with it and the job finishes.
#[test]
fn a_unit_moved_to_another_node_resumes_there_and_the_job_finishes() {
    let c = Cluster::start(3.0);
    let _a = c.agent("n1", "");
    let _b = c.agent("n2", "");
    let _d = c.agent("n3", "");
    c.wait_alive(&["n1", "n2", "n3"]);
    let port = common::free_port();
    let file = c.dir().join("long.toml");
    common::write(
        &file,
        &format!(
            "name = \"long\"\nunits = 2\nmax_cpu = 0.8\nmode = \"bank\"\nperiod = \"500ms\"\nmigrate = false\n\n[bsp]\npattern = \"chain\"\niterations = 300\nwork = 20\nport = {port}\n"
        ),
    );
    let (ok, _, err) = c.cli(&["job", "run", file.to_str().unwrap()]);
    assert!(ok, "job run failed: {err}");
    let show = || {
        let (ok, out, err) = c.cli(&["job", "show", "long", "--json"]);
        eprintln!("{out}{err}");
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        ok.then_some(v)
    };
    let started = wait_for("unit 1 to report", Duration::from_secs(60), || {
        let v = show()?;
        (v["units"][1]["iterations"].as_u64()? >= 3).then_some(v)
    });
    let used: Vec<&str> = started["units"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["node"].as_str().unwrap())
        .collect();
    let spare = ["n1", "n2", "n3"]
        .into_iter()
        .find(|n| !used.contains(n))
        .unwrap();
    // A node that holds a unit already is refused, naming per_node.
    let (ok, _, err) = c.cli(&["job", "migrate", "long", "1", "--to", used[0]]);
    assert!(!ok && err.contains("per_node"), "{err}");
    let (ok, out, err) = c.cli(&["job", "migrate", "long", "1", "--to", spare]);
    assert!(ok, "migrate failed: {err}");
    assert!(out.contains(&format!("to {spare}")), "{out}");
    let done = wait_for("the moved job to finish", Duration::from_secs(180), || {
        let v = show()?;
        (v["finished"] == true).then_some(v)
    });
    assert_eq!(done["units"][1]["node"], spare, "{done}");
    for u in done["units"].as_array().unwrap() {
        assert_eq!(u["iterations"], 300, "{u}");
    }
    let m = done["migrations"][0].as_str().unwrap();
    assert!(m.contains("unit 1 moved") && m.contains("operator"), "{m}");
    assert!(
        (done["accounted"].as_f64().unwrap() - 0.8).abs() < 1e-6,
        "{done}"
    );
}
