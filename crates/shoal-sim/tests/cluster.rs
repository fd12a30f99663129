//! Deterministic simulation testing of the controller: many seeds of a
//! small pool under heavy faults, every invariant checked at every pass, and
//! the same seed reproducing the same command stream bit for bit. A failing
//! seed prints the one command that reproduces it.

use shoal_sim::cluster::{ClusterArgs, Faults, simulate};

fn args(seed: u64) -> ClusterArgs {
    ClusterArgs {
        nodes: 16,
        services: 3,
        duration: 900.0,
        workload: "flash-crowd".parse().unwrap(),
        faults: "crash=1/h,down=3m,restart-manager=6/h,manager-down=3s,lose-report=0.05,app-fail=0.05,update=8/h"
            .parse()
            .unwrap(),
        seed,
        seeds: None,
        policy: shoal_core::control::model::PolicyKind::Predictive,
        lease_ttl: None,
        lead_time: 10.0,
        check_every: None,
        json: false,
        out: None,
    }
}

#[test]
fn seeded_runs_under_faults_hold_every_invariant() {
    let mut failures = Vec::new();
    let (mut crashes, mut restarts, mut updates) = (0, 0, 0);
    for seed in 1..=150 {
        let a = args(seed);
        let r = simulate(&a.config(seed)).unwrap();
        crashes += r.crashes;
        restarts += r.manager_restarts;
        updates += r.updates;
        if !r.invariant_violations.is_empty() {
            failures.push(format!(
                "seed {seed}: {:?}\n  reproduce with: {}",
                r.invariant_violations.iter().take(3).collect::<Vec<_>>(),
                a.repro(seed)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The faults really happened, or the run proved nothing.
    assert!(
        crashes > 300 && restarts > 100 && updates > 100,
        "{crashes} {restarts} {updates}"
    );
}

#[test]
fn a_seed_reproduces_its_trace_and_another_seed_does_not() {
    let a = args(7);
    let one = simulate(&a.config(7)).unwrap();
    let two = simulate(&a.config(7)).unwrap();
    let other = simulate(&a.config(8)).unwrap();
    assert_eq!(one.trace_sha256, two.trace_sha256);
    assert_eq!(one.decisions, two.decisions);
    assert_eq!(one.node_seconds, two.node_seconds);
    assert_ne!(one.trace_sha256, other.trace_sha256);
    assert!(one.decisions > 0 && one.commands > 100, "{one:?}");
}

#[test]
fn fault_specs_parse_and_refuse_clearly() {
    let f: Faults = "default".parse().unwrap();
    assert!(f.crash_per_s > 0.0 && f.lose > 0.0);
    let f: Faults = "crash=2/h,lose-report=0.1".parse().unwrap();
    assert!((f.crash_per_s - 2.0 / 3600.0).abs() < 1e-12);
    assert_eq!(f.lose, 0.1);
    assert_eq!(f.restart_manager_per_s, 0.0);
    let e = "crash=often".parse::<Faults>().unwrap_err();
    assert!(e.contains("crash=often") && e.contains("1/h"), "{e}");
    let e = "lose-report=2".parse::<Faults>().unwrap_err();
    assert!(e.contains("[0, 1]"), "{e}");
    let e = "explode=1/h".parse::<Faults>().unwrap_err();
    assert!(
        e.contains("unknown fault") && e.contains("restart-manager"),
        "{e}"
    );
    // The reproduction command spells the faults exactly.
    let a = args(3);
    let spelled = a.repro(3);
    let faults = spelled
        .split_whitespace()
        .skip_while(|w| *w != "--faults")
        .nth(1)
        .unwrap();
    assert_eq!(faults.parse::<Faults>().unwrap(), a.faults);
}
