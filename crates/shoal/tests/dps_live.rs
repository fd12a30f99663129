//! DPS live in miniature (docs/dps.md): a 2-unit `shoal bsp` chain on two
//! emulated hosts (cgroups capped at 0.3 CPU, a burner booking half of
//! each), static shares then the bank, through `shoal bench dps`. Checks
//! what must hold however loaded the machine is: both runs finish, the
//! job's shares plus the bank stay W in every cycle, the new shares are
//! written within one period, the bank moves share to the unit that holds
//! the other up, and every cgroup is gone afterwards. Root; a few seconds.

mod common;

use serde_json::Value;

fn dps_groups() -> Vec<String> {
    ["cpu", "cpuacct", "cpuset", ""]
        .iter()
        .filter_map(|h| std::fs::read_dir(format!("/sys/fs/cgroup/{h}")).ok())
        .flat_map(|rd| rd.flatten())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("shoal-dps-"))
        .collect()
}

#[test]
fn a_two_unit_chain_under_the_bank_keeps_w_and_cleans_up() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (cgroups)");
        return;
    }
    let before = dps_groups();
    let (ok, out, err) = common::run(&[
        "bench",
        "dps",
        "--hosts",
        "2",
        "--capacity",
        "0.3",
        "--strategies",
        "static,bank",
        "--iterations",
        "30",
        "--target",
        "3",
        "--period",
        "500ms",
        "--bank-period",
        "500ms",
        "--json",
    ]);
    assert!(ok, "bench failed: {err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for r in runs {
        let job = &r["jobs"][0];
        let t = job["response_s"].as_f64().unwrap();
        eprintln!(
            "{}: {t:.2} s, apply {:.2} ms, converged after {}",
            r["strategy"], r["apply_ms_max"], job["converged_cycles"]
        );
        assert!(t > 0.0);
        assert!(r["apply_ms_max"].as_f64().unwrap() < 500.0, "{r}");
        // W = 2 units × 0.1 × 0.3 CPU = Σ shares + bank, in every cycle.
        let banks = job["bank"].as_array().unwrap();
        for (k, shares) in job["shares"].as_array().unwrap().iter().enumerate() {
            let sum: f64 = shares
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_f64().unwrap())
                .sum::<f64>()
                + banks[k].as_f64().unwrap();
            assert!(
                (sum - 0.06).abs() < 1e-6,
                "shares {shares} + bank do not sum to W"
            );
        }
    }
    // Unit 1 (index 0) does twice unit 2's work: on average over the run
    // the bank gives it more share.
    let cycles = runs[1]["jobs"][0]["shares"].as_array().unwrap();
    let mean = |u: usize| {
        cycles.iter().map(|c| c[u].as_f64().unwrap()).sum::<f64>() / cycles.len().max(1) as f64
    };
    assert!(
        mean(0) > mean(1),
        "the heavier unit should hold more share: {} vs {}",
        mean(0),
        mean(1)
    );
    assert_eq!(dps_groups(), before, "cgroups left behind");
}
