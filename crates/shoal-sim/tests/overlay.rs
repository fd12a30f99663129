//! `shoal sim overlay` against SMON's analysis (section IV): every check
//! compares a measurement with a formula of shoal_core::overlay::analysis,
//! or with the paper's Table II, never with a recorded output.

use shoal_core::overlay::analysis::{overhead_limit, rounds_to, y_r};
use shoal_sim::overlay::{DeployTime, OverlayConfig, Report, simulate};

fn run(n: u32, seed: u64, deploy: &str) -> Report {
    let mut c = OverlayConfig::new(n, seed);
    c.deploy_time = deploy.parse().unwrap();
    simulate(&c).unwrap()
}

#[test]
fn the_mean_deployed_fraction_follows_y_r() {
    let n = 1000;
    let runs: Vec<Report> = (1..=30).map(|s| run(n, s, "instant")).collect();
    let mut worst: f64 = 0.0;
    for r in 0..=14 {
        let mean = runs
            .iter()
            .map(|rep| rep.curve.get(r).map_or(1.0, |p| p.deployed))
            .sum::<f64>()
            / runs.len() as f64;
        let want = y_r(f64::from(n), r as f64);
        worst = worst.max((mean - want).abs());
    }
    assert!(worst < 0.05, "mean curve off Y_r by {worst:.3}");
    let half = runs.iter().map(|r| r.rounds_to_50).sum::<f64>() / runs.len() as f64;
    // A single run is shifted in time by its random early growth (seed 1 at
    // 10,000 hosts reaches half 0.64 rounds late); the mean is ln n.
    let want = rounds_to(f64::from(n), 0.5);
    assert!(
        (half - want).abs() < 0.3,
        "rounds to 50 %: {half:.2}, ln n = {want:.2}"
    );
}

#[test]
fn ten_thousand_hosts_reach_99_percent_within_ln_99n_plus_one_rounds() {
    let r = run(10_000, 1, "instant");
    assert!(
        r.rounds_to_99 <= r.rounds_to_99_analysis + 1.0,
        "{} > ln 99n + 1 = {}",
        r.rounds_to_99,
        r.rounds_to_99_analysis + 1.0
    );
    assert!((r.rounds_to_99_analysis - (99.0f64 * 10_000.0).ln()).abs() < 1e-9);
    // The late overhead against E(X') at the same rounds.
    let rel = (r.overhead_late - r.overhead_late_analysis).abs() / r.overhead_late_analysis;
    assert!(
        rel < 0.05,
        "overhead_late {} vs {}",
        r.overhead_late,
        r.overhead_late_analysis
    );
    assert!(r.overhead_late_analysis > 1.5 && r.overhead_late_analysis < overhead_limit());
    // Synchronous rounds grow as log n as well (notes §9: about 23 at 10,000).
    assert!(
        (18..=30).contains(&r.sync_rounds_to_all),
        "{}",
        r.sync_rounds_to_all
    );
}

#[test]
fn the_late_overhead_matches_e_x_prime_over_many_seeds() {
    let runs: Vec<Report> = (1..=20).map(|s| run(2000, s, "instant")).collect();
    let measured = runs.iter().map(|r| r.overhead_late).sum::<f64>() / runs.len() as f64;
    let analysis = runs.iter().map(|r| r.overhead_late_analysis).sum::<f64>() / runs.len() as f64;
    assert!(
        (measured - analysis).abs() / analysis < 0.03,
        "{measured:.4} vs {analysis:.4}"
    );
    // Every round, binned by m: E(X'|m) where enough hosts were new.
    let (mut got, mut want, mut w) = (0.0, 0.0, 0.0);
    for s in runs.iter().flat_map(|r| &r.sync_rounds) {
        if s.new >= 50 && f64::from(s.m) < 0.5 * 2000.0 {
            got += s.overhead * f64::from(s.new);
            want += s.analysis * f64::from(s.new);
            w += f64::from(s.new);
        }
    }
    assert!(w > 0.0);
    assert!(
        (got / w - want / w).abs() < 0.03,
        "early: {} vs {}",
        got / w,
        want / w
    );
}

#[test]
fn each_peer_receives_one_ping_per_round() {
    for n in [117, 3000] {
        let r = run(n, 4, "instant");
        // Every live peer sends exactly one ping a round, and in steady state
        // every ping lands: E(p) = 1.
        assert!(
            (r.pings_per_peer_per_round - 1.0).abs() < 1e-9,
            "{n}: {}",
            r.pings_per_peer_per_round
        );
        assert!((r.pings_sent_per_peer_per_round - 1.0).abs() < 0.02, "{n}");
        // Binomial(n-1, 1/(n-1)): about 1/e of peer-rounds see no ping.
        let sd = (r.pings_zero_fraction_analysis * (1.0 - r.pings_zero_fraction_analysis)
            / (f64::from(n) * 20.0))
            .sqrt();
        assert!(
            (r.pings_zero_fraction - r.pings_zero_fraction_analysis).abs() < 4.0 * sd,
            "{n}: {} vs {}",
            r.pings_zero_fraction,
            r.pings_zero_fraction_analysis
        );
    }
}

#[test]
fn a_per_host_deploy_time_gives_table_ii_s_histogram() {
    // Table II, 117 PlanetLab nodes: 72 deployed once, mean 1.88, max 23.
    let runs: Vec<Report> = (1..=40).map(|s| run(117, s, "lognormal:1s,1")).collect();
    let mean = runs.iter().map(|r| r.deployments_mean).sum::<f64>() / runs.len() as f64;
    assert!(
        (mean - 1.88).abs() / 1.88 < 0.15,
        "mean deployments {mean:.3}"
    );
    let once = runs
        .iter()
        .map(|r| f64::from(r.deployments_histogram.get(&1).copied().unwrap_or(0)))
        .sum::<f64>()
        / (117.0 * runs.len() as f64);
    assert!(
        (once - 72.0 / 117.0).abs() < 0.1,
        "deployed once: {once:.3}"
    );
    for r in &runs {
        let mode = r
            .deployments_histogram
            .iter()
            .max_by_key(|(_, c)| **c)
            .map(|(k, _)| *k);
        assert_eq!(mode, Some(1));
        assert_eq!(r.deployments_histogram.values().sum::<u32>(), 117);
    }
    let max = runs
        .iter()
        .filter_map(|r| r.deployments_histogram.keys().max().copied())
        .max()
        .unwrap_or(0);
    assert!(max >= 8, "a long tail of slow hosts, max {max}");
    // Instantaneous asynchronous deployment leaves no simultaneity at all.
    let r = run(117, 1, "instant");
    assert_eq!(r.deployments_mean, 1.0);
}

#[test]
fn a_seed_reproduces_its_run_and_another_does_not() {
    let strip = |mut r: Report| {
        r.wall_s = 0.0;
        serde_json::to_string(&r).unwrap()
    };
    let a = strip(run(500, 7, "uniform:1s..3s"));
    assert_eq!(a, strip(run(500, 7, "uniform:1s..3s")));
    assert_ne!(a, strip(run(500, 8, "uniform:1s..3s")));
}

#[test]
fn deploy_times_parse_and_bad_ones_say_how_to_write_them() {
    assert_eq!("instant".parse::<DeployTime>(), Ok(DeployTime::Instant));
    assert_eq!(
        "lognormal:500ms,1.5".parse::<DeployTime>(),
        Ok(DeployTime::Lognormal {
            median_s: 0.5,
            sigma: 1.5
        })
    );
    assert_eq!(
        "uniform:1s..3s".parse::<DeployTime>(),
        Ok(DeployTime::Uniform {
            lo_s: 1.0,
            hi_s: 3.0
        })
    );
    for bad in [
        "gauss:1s",
        "uniform:3s..1s",
        "lognormal:1s",
        "lognormal:1s,x",
        "fixed:soon",
    ] {
        let e = bad.parse::<DeployTime>().unwrap_err();
        assert!(e.contains(bad) || e.contains("e.g."), "{bad}: {e}");
    }
    assert!(simulate(&OverlayConfig::new(1, 1)).is_err());
}
