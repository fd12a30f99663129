//! The overlay with a manager (issue 16, items 5-7), over real OpenSSH
//! servers in network namespaces: the seeded host's peer starts the
//! manager its target names and keeps it alive; every agent the pool
//! deploys joins it with a deploy token minted for its host alone; a
//! manager killed with SIGKILL is started again by its host's peer, and
//! the nodes stay registered; `overlay status --all` and the manager's
//! dashboard show every host, who deployed it, and the manager's restarts.

mod common;
use common::*;
use serde_json::Value;
use shoal_overlay::netlab::{self, Lab, Overlay};
use std::path::Path;
use std::time::{Duration, Instant};

const HOSTS: usize = 4;

#[test]
fn the_pool_joins_its_manager_and_keeps_it_alive() {
    if !root_with_sshd() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::create_dir_all(d.join("lab")).unwrap();
    let lab = Lab::create(&d.join("lab"), HOSTS).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();

    // The manager's cluster directory lives on h1, listening on its address.
    let h1 = &lab.hosts()[0];
    let cluster = h1.dir.join("cluster");
    let cdir = s(&cluster);
    let (ok, _, err) = run(&[
        "init",
        "--dir",
        &cdir,
        "--listen",
        &format!("{}:7400", h1.ip),
    ]);
    assert!(ok, "{err}");
    let (ok, out, err) = run(&[
        "token",
        "create",
        "--dir",
        &cdir,
        "--uses",
        "1",
        "--ttl",
        "10m",
        "--roles",
        "overlay,web",
        "--json",
    ]);
    assert!(ok, "{err}");
    let seed_token: Value = serde_json::from_str(&out).unwrap();
    let token_file = d.join("seed.token");
    write(
        &token_file,
        &format!("{}\n", seed_token["token"].as_str().unwrap()),
    );

    // h1 names the manager; every host registers as web.
    let mut targets = String::from("version = 1\n");
    for (i, h) in lab.hosts().iter().enumerate() {
        targets.push_str(&format!(
            "[[target]]\nname = \"{}\"\naddress = \"{}\"\nprefix = \"{}\"\nhost_key = \"{}\"\nroles = [\"web\"]\n",
            h.name,
            h.ip,
            h.prefix.display(),
            h.host_key
        ));
        if i == 0 {
            targets.push_str(&format!("manager = \"{cdir}\"\n"));
        }
    }
    let o = Overlay::prepare_with(
        &lab,
        Path::new(env!("CARGO_BIN_EXE_shoal")),
        &d.join("op"),
        targets,
    )
    .unwrap();
    let began = Instant::now();
    let seeded = o
        .seed_command("h1", Duration::from_millis(300), Duration::from_millis(200))
        .arg("--join")
        .arg(format!("https://{}:7400", h1.ip))
        .arg("--token-file")
        .arg(&token_file)
        .output()
        .unwrap();
    assert!(
        seeded.status.success(),
        "seed: {}{}",
        String::from_utf8_lossy(&seeded.stdout),
        String::from_utf8_lossy(&seeded.stderr)
    );

    // Every host joins the manager that h1's peer started.
    let status = || -> Option<Value> {
        let (ok, out, _) = run(&["status", "--dir", &cdir, "--json"]);
        ok.then(|| serde_json::from_str(&out).ok()).flatten()
    };
    let names: Vec<String> = lab.hosts().iter().map(|h| h.name.clone()).collect();
    let all_alive = |v: &Value| {
        names.iter().all(|n| {
            v["nodes"].as_array().is_some_and(|ns| {
                ns.iter()
                    .any(|x| x["name"] == n.as_str() && x["state"] == "alive")
            })
        })
    };
    let logs = || {
        let mut t = String::new();
        for h in lab.hosts() {
            let p = h.prefix.join("state/peer.log");
            let l = std::fs::read_to_string(&p).unwrap_or_default();
            let tail: Vec<&str> = l.lines().rev().take(15).collect();
            t.push_str(&format!(
                "--- {}:\n{}\n",
                p.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
        }
        let m = std::fs::read_to_string(cluster.join("manager.log")).unwrap_or_default();
        t.push_str(&format!("--- manager.log:\n{m}\n"));
        t
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !status().is_some_and(|v| all_alive(&v)) {
        assert!(
            Instant::now() < deadline,
            "all 4 hosts did not join within 60 s: {:?}\n{}",
            status(),
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "measured: all {HOSTS} agents deployed and joined {:.2} s after the seed began",
        began.elapsed().as_secs_f64()
    );
    let v = status().unwrap();
    for n in v["nodes"].as_array().unwrap() {
        assert_eq!(n["roles"], serde_json::json!(["web"]), "{n}");
    }

    // h1 joined with the operator's token; h2-h4 with deploy tokens minted
    // for them alone, each spent.
    let (ok, out, err) = run(&["token", "list", "--dir", &cdir, "--json"]);
    assert!(ok, "{err}");
    let tokens: Value = serde_json::from_str(&out).unwrap();
    let minted: Vec<&Value> = tokens
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["minted_by"].is_string())
        .collect();
    for h in &names[1..] {
        let spent = minted
            .iter()
            .filter(|t| t["node"] == h.as_str() && t["state"] == "used-up")
            .count();
        assert_eq!(spent, 1, "one spent deploy token for {h}: {tokens}");
    }
    assert!(
        minted
            .iter()
            .all(|t| t["roles"] == serde_json::json!(["overlay", "web"])),
        "{tokens}"
    );

    // kill -9 the manager: h1's peer starts it again, and the nodes stay.
    let managers = || netlab::processes_with(&format!("manager\0--dir\0{cdir}"));
    let first = managers();
    assert_eq!(first.len(), 1, "one manager: {first:?}");
    let killed = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first[0].0),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let again = wait_for("the manager started again", Duration::from_secs(20), || {
        let m = managers();
        (m.len() == 1 && m[0].0 != first[0].0).then(|| m[0].0)
    });
    eprintln!(
        "measured: manager started again {:.2} s after kill -9",
        killed.elapsed().as_secs_f64()
    );
    wait_for(
        "all 4 alive with the new manager",
        Duration::from_secs(30),
        || status().filter(all_alive),
    );
    assert_eq!(managers().len(), 1);
    assert_eq!(managers()[0].0, again);

    // The merged view, from any peer: every host alive, who deployed it,
    // and the manager's two starts.
    let key = s(&o.key);
    let h3 = lab.hosts()[2].ip.to_string();
    let view = wait_for("the merged view", Duration::from_secs(20), || {
        let (ok, out, _) = run(&[
            "overlay", "status", "--all", "--peer", &h3, "--key", &key, "--json",
        ]);
        let v: Value = serde_json::from_str(&out).ok().filter(|_| ok)?;
        let up = v["targets"]
            .as_array()?
            .iter()
            .all(|t| t["state"] == "alive");
        let starts = v["managers"][0][1]["starts"].as_u64()?;
        // A host's deployment is known once its deployer's report carries
        // it: under load that report can come a survey later than the
        // host's own.
        let deployed = v["targets"].as_array()?[1..]
            .iter()
            .all(|t| t["deployed"][1].as_str().is_some_and(|b| !b.is_empty()));
        (up && deployed && v["reports"] == HOSTS && starts >= 2).then_some(v)
    });
    assert_eq!(view["managers"][0][0], "h1");
    assert_eq!(view["managers"][0][1]["dir"], cdir.as_str());
    for t in &view["targets"].as_array().unwrap()[1..] {
        let by = t["deployed"][1].as_str().unwrap_or("");
        assert!(
            names.iter().any(|n| n == by) && by != t["name"],
            "{}: deployed by {by:?}",
            t["name"]
        );
    }
    let (ok, table, err) = run(&["overlay", "status", "--all", "--peer", &h3, "--key", &key]);
    assert!(ok, "{err}");
    assert!(
        table.contains("manager on h1") && table.contains(" ago by h"),
        "{table}"
    );

    // The manager the overlay started surveys it for its dashboard.
    let snap = wait_for("the dashboard's overlay", Duration::from_secs(20), || {
        let out = lab
            .command(0, "curl")
            .args(["-sf", "http://127.0.0.1:7480/api/snapshot"])
            .output()
            .ok()?;
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        (v["overlay"]["targets"].as_array()?.len() == HOSTS).then_some(v)
    });
    assert!(snap["overlay"]["error"].is_null(), "{}", snap["overlay"]);
    assert_eq!(snap["overlay"]["managers"][0][0], "h1");
}
