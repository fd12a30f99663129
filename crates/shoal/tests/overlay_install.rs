//! The install lock under a forced race (issue 16, Build 5: "concurrent
//! deployers never corrupt each other: one completes, the others abort;
//! count them"): three deployers' copies of the package, each in its own
//! release directory of one prefix, run `shoal overlay install` at the same
//! instant, many times over. Each time exactly one installs and starts the
//! peer, the others exit 3 (already running: a duplicate deployment) and
//! remove their copies, `current` points at the winner, the marker names
//! it, and one peer runs. No root, no SSH: the race is the installer's.

mod common;
use common::*;
use shoal_core::overlay::{Target, TargetList, Version};
use shoal_overlay::package::{Package, Settings};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Barrier};

const DEPLOYERS: usize = 3;
const ROUNDS: usize = 5;

/// Writes one deployer's copy of the package under `prefix/releases`.
fn copy(pkg: &Package, target: &Target, prefix: &Path, who: usize) -> PathBuf {
    let dir = prefix.join(format!("releases/1-d{who}-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in pkg.files_for(target, None).unwrap() {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    std::fs::copy(&pkg.binary, dir.join("shoal")).unwrap();
    dir
}

#[test]
fn of_three_concurrent_installs_one_wins_and_two_abort() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let key = d.join("overlay.key");
    assert!(run(&["overlay", "key", "--out", &s(&key)]).0);
    let rkey = d.join("release.key");
    assert!(run(&["overlay", "release-key", "--out", &s(&rkey)]).0);
    let rel = d.join("release");
    let (ok, _, err) = run(&[
        "overlay",
        "release",
        "--release-key",
        &s(&rkey),
        "--out",
        &s(&rel),
    ]);
    assert!(ok, "{err}");
    let mut won = 0;
    let mut aborted = 0;
    for round in 0..ROUNDS {
        let prefix = d.join(format!("p{round}"));
        std::fs::create_dir_all(&prefix).unwrap();
        let target = Target {
            name: "h1".into(),
            // A loopback address of its own per round: the peer listens there.
            address: format!("127.0.77.{}", round + 1).parse().unwrap(),
            ssh_port: 22,
            user: "root".into(),
            prefix: s(&prefix),
            host_key: format!("SHA256:{}", "A".repeat(43)),
            roles: Vec::new(),
            manager: None,
        };
        let pkg = Package {
            binary: PathBuf::from(env!("CARGO_BIN_EXE_shoal")),
            overlay_key: std::fs::read_to_string(&key).unwrap(),
            targets: TargetList::new(Version::new(1, 0), 7946, vec![target.clone()]).unwrap(),
            release: shoal_overlay::release::read(&rel).unwrap(),
            settings: Settings {
                interval_ms: 1000,
                timeout_ms: 500,
                auth_agents: vec!["127.0.0.1:9".parse().unwrap()],
                manager: None,
            },
        };
        let copies: Vec<PathBuf> = (0..DEPLOYERS)
            .map(|i| copy(&pkg, &target, &prefix, i))
            .collect();
        let go = Arc::new(Barrier::new(DEPLOYERS));
        let runs: Vec<_> = copies
            .iter()
            .map(|c| {
                let (c, go) = (c.clone(), go.clone());
                std::thread::spawn(move || {
                    go.wait();
                    Command::new(c.join("shoal"))
                        .args(["overlay", "install", "--package"])
                        .arg(&c)
                        .output()
                        .unwrap()
                })
            })
            .collect();
        let outs: Vec<_> = runs.into_iter().map(|t| t.join().unwrap()).collect();
        let codes: Vec<i32> = outs.iter().map(|o| o.status.code().unwrap_or(-1)).collect();
        let winners: Vec<usize> = (0..DEPLOYERS).filter(|&i| codes[i] == 0).collect();
        assert_eq!(
            winners.len(),
            1,
            "round {round}: exit codes {codes:?}: {:?}",
            outs.iter()
                .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                .collect::<Vec<_>>()
        );
        assert_eq!(
            codes.iter().filter(|&&c| c == 3).count(),
            DEPLOYERS - 1,
            "round {round}: the others abort with 3: {codes:?}"
        );
        let w = &copies[winners[0]];
        assert_eq!(
            std::fs::canonicalize(prefix.join("current")).unwrap(),
            std::fs::canonicalize(w).unwrap()
        );
        assert_eq!(
            std::fs::read_to_string(prefix.join("installed"))
                .unwrap()
                .trim(),
            std::fs::canonicalize(w).unwrap().to_str().unwrap()
        );
        for (i, c) in copies.iter().enumerate() {
            assert_eq!(c.exists(), i == winners[0], "round {round}: copy {i}");
        }
        let peers = shoal_overlay::netlab::processes_with(&format!(
            "{}{}",
            shoal_overlay::netlab::PEER_ARGV,
            s(&prefix)
        ));
        assert_eq!(peers.len(), 1, "round {round}: one peer runs: {peers:?}");
        won += 1;
        aborted += DEPLOYERS - 1;
    }
    eprintln!(
        "measured: {ROUNDS} races of {DEPLOYERS} installers: {won} installed, {aborted} aborted as duplicates"
    );
    // The peers started from the prefixes end with the test.
    shoal_overlay::netlab::kill_processes_with(
        &format!("{}/", d.display()),
        std::time::Duration::from_secs(5),
    );
}
