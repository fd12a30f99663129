//! The overlay from the command line: `shoal sim overlay`'s report keys, its
//! plots, its examples as printed, and its errors.

use std::process::Command;

fn shoal(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn sim_overlay_reports_every_key_and_writes_its_plots() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().to_str().unwrap();
    let (ok, out, err) = shoal(&[
        "sim",
        "overlay",
        "--hosts",
        "300",
        "--deploy-time",
        "lognormal:1s,1",
        "--seed",
        "5",
        "--json",
        "--out",
        out_dir,
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    for key in [
        "rounds_to_50",
        "rounds_to_99",
        "rounds_to_all",
        "overhead_late",
        "overhead_late_analysis",
        "deployments_mean",
        "deployments_histogram",
        "pings_per_peer_per_round",
    ] {
        assert!(v.get(key).is_some_and(|x| !x.is_null()), "{key}: {v}");
    }
    let hist: u64 = v["deployments_histogram"]
        .as_object()
        .unwrap()
        .values()
        .map(|c| c.as_u64().unwrap())
        .sum();
    assert_eq!(hist, 300);
    // The file written is the report printed.
    let file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("overlay-5.json")).unwrap()).unwrap();
    assert_eq!(file["rounds_to_all"], v["rounds_to_all"]);
    for plot in ["curve", "overhead", "deployments"] {
        for ext in ["svg", "png"] {
            let p = dir.path().join(format!("overlay-5-{plot}.{ext}"));
            assert!(
                std::fs::metadata(&p).is_ok_and(|m| m.len() > 1000),
                "{}",
                p.display()
            );
        }
    }
}

#[test]
fn sim_overlay_help_examples_run_as_printed_and_bad_input_is_named() {
    let (ok, help, _) = shoal(&["sim", "overlay", "--help"]);
    assert!(ok);
    let examples: Vec<&str> = help
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("shoal sim overlay "))
        .collect();
    assert!(examples.len() >= 3, "{help}");
    let dir = tempfile::tempdir().unwrap();
    for ex in examples {
        let ex = ex.replace("/tmp/overlay", dir.path().to_str().unwrap());
        let args: Vec<&str> = ex.split_whitespace().skip(1).collect();
        let (ok, out, err) = shoal(&args);
        assert!(ok, "`{ex}` failed as printed: {out}{err}");
    }
    let (ok, _, err) = shoal(&["sim", "overlay", "--deploy-time", "gauss:1s"]);
    assert!(
        !ok && err.contains("gauss:1s") && err.contains("lognormal"),
        "{err}"
    );
    let (ok, _, err) = shoal(&["sim", "overlay", "--hosts", "1"]);
    assert!(!ok && err.contains("--hosts 1"), "{err}");
}
