//! The thesis's worked examples (notes part C.4) and the conservation
//! invariant.

use super::*;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

fn report(used: f64, upstream: &[usize], host_free: f64) -> UnitReport {
    UnitReport {
        used,
        upstream: upstream.to_vec(),
        host_free,
        cap: 1.0,
    }
}

#[test]
fn v5_1_two_busy_units_on_one_cpu_share_in_proportion() {
    // 0.5 and 0.25 shares, both CPU-bound, one CPU: 0.67 and 0.33.
    let got = proportional(1.0, &[(0.5, 1.0), (0.25, 1.0)]);
    assert!((got[0] - 2.0 / 3.0).abs() < 1e-9, "{got:?}");
    assert!((got[1] - 1.0 / 3.0).abs() < 1e-9, "{got:?}");
    // Neither has excess: each uses more than its share.
    assert_eq!(excess(0.5, got[0]), 0.0);
    assert_eq!(excess(0.25, got[1]), 0.0);
}

#[test]
fn proportional_gives_what_a_unit_leaves_to_the_others() {
    // A unit demanding 0.1 keeps 0.1; the other takes the rest.
    let got = proportional(1.0, &[(0.5, 0.1), (0.25, 1.0)]);
    assert!(close(got[0], 0.1) && close(got[1], 0.9), "{got:?}");
    // Nothing demanded, nothing given.
    assert_eq!(proportional(1.0, &[(0.5, 0.0)]), vec![0.0]);
}

#[test]
fn v5_2_excess() {
    assert!(close(excess(0.5, 0.1), 0.4));
    assert_eq!(excess(0.5, 0.67), 0.0);
}

#[test]
fn v5_3_eq_5_1_three_upstreams_withholding_one_quarter() {
    let wh = withhold(3);
    assert!(close(wh, 0.25));
    assert!(close(transfer(0.4, 3, wh), 0.1));

    // The same through the ledger: unit 0 holds 0.5, uses 0.1 and waited
    // on units 1, 2 and 3, which have no excess.
    let mut job = Job::new(4, 2.0, Mode::Distributed).unwrap();
    for u in 1..4 {
        job.report(u, &report(0.9, &[], 1.0));
    }
    let cmds = job.report(0, &report(0.1, &[1, 2, 3], 1.0));
    let offers: Vec<&Offer> = cmds
        .iter()
        .filter_map(|c| match c {
            Command::Offer(o) => Some(o),
            _ => None,
        })
        .collect();
    assert_eq!(offers.len(), 3);
    assert!(offers.iter().all(|o| close(o.amount, 0.1) && o.from == 0));
    // Deducted only after a successful transfer: still enforced at 0.5.
    assert!(close(job.enforced(0), 0.5));
    assert!(close(job.accounted(), 2.0));
    let ids: Vec<u64> = offers.iter().map(|o| o.id).collect();
    for id in &ids {
        job.deliver(*id, 1.0);
    }
    // All transfers successful: it retains 0.2 (0.1 in use, 0.1 withheld).
    assert!(close(job.shares()[0], 0.2), "{:?}", job.shares());
    assert!(close(job.shares()[1], 0.6));
    assert!(close(job.accounted(), 2.0));
}

#[test]
fn v5_3_a_full_host_refuses_and_is_the_bottleneck() {
    let mut job = Job::new(4, 2.0, Mode::Distributed).unwrap();
    for u in 1..4 {
        job.report(u, &report(0.9, &[], 1.0));
    }
    let ids: Vec<u64> = job
        .report(0, &report(0.1, &[1, 2, 3], 1.0))
        .iter()
        .filter_map(|c| match c {
            Command::Offer(o) => Some(o.id),
            _ => None,
        })
        .collect();
    job.deliver(ids[0], 1.0);
    job.deliver(ids[1], 1.0);
    let refused = job.deliver(ids[2], 0.0);
    assert!(refused.contains(&Command::Bottleneck { unit: 3 }));
    // One transfer rejected: the sender keeps 0.3.
    assert!(close(job.shares()[0], 0.3), "{:?}", job.shares());
    assert!(close(job.shares()[3], 0.5));
    // A second delivery of the same offer changes nothing.
    assert!(job.deliver(ids[2], 1.0).is_empty());
    assert!(close(job.accounted(), 2.0));
}

#[test]
fn distributed_sends_only_to_upstreams_without_excess() {
    let mut job = Job::new(3, 1.5, Mode::Distributed).unwrap();
    job.report(1, &report(0.1, &[], 1.0)); // unit 1 has excess
    job.report(2, &report(0.9, &[], 1.0));
    let cmds = job.report(0, &report(0.1, &[1, 2], 1.0));
    let to: Vec<usize> = cmds
        .iter()
        .filter_map(|c| match c {
            Command::Offer(o) => Some(o.to),
            _ => None,
        })
        .collect();
    assert_eq!(to, vec![2]);
    // P = 1, wh = 1/2: half of the 0.4 excess goes.
    assert!(close(job.enforced(0) - job.shares()[0], 0.2));
}

#[test]
fn upstream_entries_expire() {
    let mut job = Job::new(2, 1.0, Mode::Distributed).unwrap();
    job.report(0, &report(0.5, &[1], 1.0));
    assert_eq!(job.upstream(0), vec![1]);
    for _ in 0..UPSTREAM_TTL_REPORTS {
        job.report(0, &report(0.5, &[], 1.0));
    }
    assert!(job.upstream(0).is_empty());
}

#[test]
fn v5_4_shortage() {
    assert!((shortage(0.5, 0.67, 1.0) - 0.17).abs() < 1e-9);
    // Limited by the host's remaining share.
    assert!(close(shortage(0.5, 0.67, 0.05), 0.05));
    assert_eq!(shortage(0.5, 0.4, 1.0), 0.0);
}

#[test]
fn v5_5_eq_5_2_is_a_min_not_the_printed_max() {
    // Bank 0.3, total shortage 0.6, a unit short 0.17 receives 0.085.
    assert!((bank_payout(0.17, 0.3, 0.6) - 0.085).abs() < 1e-9);
    // The printed max would give 0.17.
    assert!(bank_payout(0.17, 0.3, 0.6) < 0.17);
    // A rich bank pays the shortage in full, never more.
    assert!(close(bank_payout(0.17, 1.0, 0.6), 0.17));
    assert_eq!(bank_payout(0.17, 0.3, 0.0), 0.0);
}

#[test]
fn v5_5_through_the_ledger_and_the_bank_ends_empty() {
    // Three units at 0.5: unit 0 deposits 0.3; units 1 and 2 are short
    // 0.17 and 0.43 (F = 0.6), hosts with room.
    let mut job = Job::new(3, 1.5, Mode::Bank).unwrap();
    job.report(0, &report(0.2, &[], 1.0));
    assert!(close(job.bank(), 0.3));
    assert!(close(job.shares()[0], 0.2));
    job.report(1, &report(0.67, &[], 1.0));
    job.report(2, &report(0.93, &[], 1.0));
    job.payout();
    assert!((job.shares()[1] - 0.585).abs() < 1e-9, "{:?}", job.shares());
    assert!((job.shares()[2] - 0.715).abs() < 1e-9);
    assert_eq!(job.bank(), 0.0);
    assert!(close(job.accounted(), 1.5));
}

#[test]
fn no_unit_gives_itself_below_the_floor() {
    // W/N = 0.5, floor 0.05: a unit using nothing deposits 0.45, not 0.5.
    let mut job = Job::new(2, 1.0, Mode::Bank).unwrap();
    job.report(0, &report(0.0, &[], 1.0));
    assert!(close(job.shares()[0], MIN_SHARE * 0.5));
    assert!(close(job.bank(), 0.5 - MIN_SHARE * 0.5));
}

#[test]
fn bank_surplus_goes_to_all_units_in_proportion() {
    let mut job = Job::new(2, 1.0, Mode::Bank).unwrap();
    job.report(0, &report(0.1, &[], 1.0)); // deposits 0.4
    job.report(1, &report(0.6, &[], 1.0)); // short 0.1
    job.payout();
    // 0.1 paid, then 0.3 spread over 0.1 and 0.6 in proportion.
    assert!(close(job.shares()[0], 0.1 + 0.3 * 0.1 / 0.7));
    assert!(close(job.shares()[1], 0.6 + 0.3 * 0.6 / 0.7));
    assert_eq!(job.bank(), 0.0);
}

#[test]
fn bank_on_a_full_host_is_a_bottleneck() {
    let mut job = Job::new(2, 1.0, Mode::Bank).unwrap();
    let cmds = job.report(1, &report(0.7, &[], 0.0));
    assert_eq!(cmds, vec![Command::Bottleneck { unit: 1 }]);
}

#[test]
fn static_mode_never_moves_share() {
    let mut job = Job::new(2, 1.0, Mode::Static).unwrap();
    assert!(job.report(0, &report(0.0, &[1], 1.0)).is_empty());
    assert!(job.payout().is_empty());
    assert_eq!(job.shares(), &[0.5, 0.5]);
}

#[test]
fn bad_jobs_are_refused_with_the_fix() {
    assert!(
        Job::new(0, 1.0, Mode::Bank)
            .unwrap_err()
            .to_string()
            .contains("units")
    );
    assert!(
        Job::new(2, -1.0, Mode::Bank)
            .unwrap_err()
            .to_string()
            .contains("max_cpu")
    );
    assert!(
        "banker"
            .parse::<Mode>()
            .unwrap_err()
            .contains("distributed")
    );
}

#[test]
fn converged_after_counts_cycles() {
    let h = vec![
        vec![0.2, 0.2],
        vec![0.3, 0.1],
        vec![0.4, 0.0999],
        vec![0.4, 0.1],
    ];
    assert_eq!(converged_after(&h, 0.01), Some(2));
    assert_eq!(converged_after(&[], 0.01), None);
}

#[test]
fn migration_moves_the_least_utilized_unit_to_the_least_utilized_host() {
    let units = vec![
        Placement {
            unit: "a1",
            host: "h1",
            used: 0.4,
        },
        Placement {
            unit: "b1",
            host: "h1",
            used: 0.1,
        },
        Placement {
            unit: "a4",
            host: "h4",
            used: 0.1,
        },
    ];
    let hosts = vec![("h1", 1.0), ("h2", 0.9), ("h4", 0.3)];
    assert_eq!(
        choose_migration(&"h1", &units, &hosts, |_, _| false),
        Some(("b1", "h4"))
    );
    // b1's job already has a unit on h4: it goes to the next least
    // utilized host it may use.
    assert_eq!(
        choose_migration(&"h1", &units, &hosts, |u, h| *u == "b1" && *h == "h4"),
        Some(("b1", "h2"))
    );
    // b1 may go nowhere less utilized: the next unit, a1, goes.
    assert_eq!(
        choose_migration(&"h1", &units, &hosts, |u, h| *u == "b1" && *h != "h1"),
        Some(("a1", "h4"))
    );
    // Nowhere less utilized: stay.
    assert_eq!(
        choose_migration(&"h1", &units, &[("h1", 0.95), ("h2", 0.96)], |_, _| false),
        None
    );
    // A host with idle cycles is no bottleneck, however booked.
    assert_eq!(
        choose_migration(&"h1", &units, &[("h1", 0.5), ("h2", 0.1)], |_, _| false),
        None
    );
    // The unit must fit where it goes: b1 (0.1) fits on h2 at 0.85, a1
    // (0.4) would not.
    let units = vec![
        Placement {
            unit: "a1",
            host: "h1",
            used: 0.4,
        },
        Placement {
            unit: "b1",
            host: "h1",
            used: 0.1,
        },
    ];
    assert_eq!(
        choose_migration(&"h1", &units, &[("h1", 1.0), ("h2", 0.85)], |u, _| *u
            == "b1"),
        None
    );
}

mod conservation {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Report(usize, f64, Vec<usize>, f64, f64),
        Deliver(usize, f64),
        Payout,
    }

    fn op(n: usize) -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..n, 0.0..2.0f64, proptest::collection::vec(0..n + 1, 0..4), -0.2..1.0f64, 0.0..1.5f64)
                .prop_map(|(u, used, up, free, cap)| Op::Report(u, used, up, free, cap)),
            2 => (0..8usize, -0.1..1.0f64).prop_map(|(i, free)| Op::Deliver(i, free)),
            1 => Just(Op::Payout),
        ]
    }

    proptest! {
        #[test]
        fn shares_bank_and_flight_always_sum_to_w(
            n in 1usize..6,
            w in 0.1f64..4.0,
            bank in any::<bool>(),
            ops in proptest::collection::vec(op(6), 1..200),
        ) {
            let mode = if bank { Mode::Bank } else { Mode::Distributed };
            let mut job = Job::new(n, w, mode).unwrap();
            for o in ops {
                match o {
                    Op::Report(u, used, up, free, cap) => {
                        job.report(u % n, &UnitReport { used, upstream: up, host_free: free, cap });
                    }
                    Op::Deliver(i, free) => {
                        if let Some(id) = job.in_flight().get(i % 8).map(|o| o.id) {
                            job.deliver(id, free);
                        }
                    }
                    Op::Payout => { job.payout(); }
                }
                prop_assert!((job.accounted() - w).abs() < 1e-9, "accounted {} of {}", job.accounted(), w);
                prop_assert!(job.bank() >= 0.0);
                for u in 0..n {
                    prop_assert!(job.shares()[u] >= -1e-9, "negative share {:?}", job.shares());
                }
            }
        }
    }
}
