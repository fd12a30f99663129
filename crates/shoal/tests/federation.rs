//! H-SWEB federation between two real clusters (docs/federation.md): the
//! short version of `shoal bench federation`, in a network namespace of its
//! own with its links shaped by tc, and its figures checked: Table 1's
//! decisions, remote data never slower than local-only, a loaded cluster
//! shedding CPU work and stopping when the other is loaded too, a killed
//! peer presumed dead within its timeout and used again once back, and the
//! exchange within 1 % of the link. About two minutes; needs root.

mod common;
use common::*;
use serde_json::Value;

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64()
        .unwrap_or_else(|| panic!("{k} missing in {v:#}"))
}

#[test]
fn two_clusters_send_each_request_where_it_finishes_first() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: this test needs root (a network namespace, tc, CPU cgroups)");
        return;
    }
    let (ok, out, err) = run(&["bench", "federation", "--quick", "--json"]);
    assert!(ok, "the bench failed: {err}\n{out}");
    let r: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    eprintln!("{r:#}");

    // Table 1: where client and data are at the same site, served locally;
    // a large file at the other site redirected (the clients' own path is
    // the faster one); a small file fetched or redirected, never failed.
    for c in r["table1"].as_array().unwrap() {
        let n = c["requests"].as_u64().unwrap();
        let (local, fetch, redirect) = (
            c["local"].as_u64().unwrap(),
            c["fetch"].as_u64().unwrap(),
            c["redirect"].as_u64().unwrap(),
        );
        assert_eq!(c["failed"].as_u64(), Some(0), "{c}");
        if c["client"] == c["data"] {
            assert!(local * 100 >= n * 95, "same site should stay local: {c}");
        } else if c["size"] == "large" {
            assert!(
                redirect * 10 >= n * 9,
                "a large remote file should be redirected: {c}"
            );
        } else {
            assert_eq!(
                fetch + redirect,
                n,
                "a small remote file goes to its data: {c}"
            );
        }
    }
    // Never slower than local-only by more than 5 %.
    assert!(f(&r, "speedup_small") >= 0.95, "{r:#}");
    assert!(f(&r, "speedup_large") >= 0.95, "{r:#}");
    assert!(f(&r, "speedup_cpu") >= 0.95, "{r:#}");
    // Shedding: much of a loaded cluster's CPU work goes to the idle one,
    // less once that one is loaded too.
    let one = f(&r, "cpu_shed_share_one_loaded");
    let both = f(&r, "cpu_shed_share_both_loaded");
    assert!(one >= 0.2, "one loaded: shed share {one}");
    assert!(both < one, "both loaded: shed share {both} not under {one}");
    // A dead peer: presumed dead within its timeout (plus the sampling
    // slack), sent nothing after, used again once back.
    assert!(
        f(&r, "dead_detected_s") <= f(&r, "dead_timeout_s") + 2.0,
        "{r:#}"
    );
    assert_eq!(r["sent_to_dead_after_timeout"].as_u64(), Some(0), "{r:#}");
    assert_eq!(r["used_again"].as_bool(), Some(true), "{r:#}");
    // The exchange at rest, measured on the link.
    assert!(f(&r, "overhead_share") < 0.01, "{r:#}");
}
