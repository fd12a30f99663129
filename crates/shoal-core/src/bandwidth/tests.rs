//! The thesis's vectors (seeds/notes/thesis-ch3-6.md A.5, B.2) and the
//! invariants of the ordering and the floor.

use super::*;
use proptest::prelude::*;

fn mb(v: &[u64]) -> Vec<f64> {
    v.iter().map(|c| *c as f64 / MB).collect()
}

fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
}

const BW: u64 = 10_800_000;

#[test]
fn v3_1_one_update() {
    let d = smooth(0.9, &[1.0, 1.0, 1.0, 1.0], &[3.0, 1.0, 0.5, 0.5]);
    assert!(close(&d, &[1.2, 1.0, 0.95, 0.95], 1e-12), "{d:?}");
    let bw = proportional(BW, &d, 0).unwrap();
    assert_eq!(bw.iter().sum::<u64>(), BW);
    assert!(
        close(&mb(&bw), &[3.1610, 2.6341, 2.5024, 2.5024], 1e-4),
        "{bw:?}"
    );
    // From 2.7 each: servers 2-4 are lowered first, then server 1 raised.
    let p = Plan::between(&[2_700_000; 4], &bw);
    assert_eq!(
        p.reductions.iter().map(|s| s.server).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(
        p.increases.iter().map(|s| s.server).collect::<Vec<_>>(),
        vec![0]
    );
    let mut caps = vec![2_700_000u64; 4];
    for s in p.steps() {
        caps[s.server] = s.to;
        assert!(caps.iter().sum::<u64>() <= BW, "{caps:?}");
    }
}

#[test]
fn v3_2_converges_by_alpha_per_update() {
    let u = [6.0, 2.0, 1.5, 1.3].map(|x| x * MB);
    let mut d = vec![2.7 * MB; 4];
    let want = [
        [3.03, 2.63, 2.58, 2.56],
        [3.327, 2.567, 2.472, 2.434],
        [3.594, 2.510, 2.375, 2.321],
    ];
    for w in want {
        d = smooth(0.9, &d, &u);
        let bw = proportional(BW, &d, 0).unwrap();
        assert!(close(&mb(&bw), &w, 1e-3), "{bw:?} vs {w:?}");
    }
    // The gap to u shrinks by alpha per update: 90 % of the step after
    // ln(0.1)/ln(0.9) = 21.9 updates.
    let gap0 = 6.0 - 2.7;
    let mut d = vec![2.7 * MB; 4];
    let mut n = 0;
    while (6.0 - d[0] / MB) > 0.1 * gap0 {
        d = smooth(0.9, &d, &u);
        n += 1;
    }
    assert_eq!(n, 22);
}

#[test]
fn v3_3_fixed_point_is_proportional_to_use() {
    // Sum u below BW: caps end proportional to u, every server at the
    // same utilization sum u / BW.
    let u = [2.0, 1.0, 0.5, 0.5].map(|x| x * MB);
    let mut d = vec![2.7 * MB; 4];
    for _ in 0..400 {
        d = smooth(0.9, &d, &u);
    }
    let bw = proportional(BW, &d, 0).unwrap();
    let util: Vec<f64> = bw.iter().zip(&u).map(|(b, u)| u / *b as f64).collect();
    for x in &util {
        assert!((x - 4.0 / 10.8).abs() < 1e-6, "{util:?}");
    }
}

#[test]
fn v3_4_degenerate_cases_keep_caps_and_respect_the_floor() {
    assert_eq!(proportional(BW, &[0.0; 4], 1000), None);
    assert_eq!(proportional(BW, &[], 1000), None);
    assert_eq!(proportional(BW, &[f64::NAN, 1.0], 1000), None);
    // d' = 0 for one server would give it 0: the floor keeps it above.
    let floor = 135_000;
    let bw = proportional(BW, &[1.0, 1.0, 1.0, 0.0], floor).unwrap();
    assert_eq!(bw[3], floor);
    assert_eq!(bw.iter().sum::<u64>(), BW);
    assert!(bw[..3].iter().all(|c| *c == (BW - floor) / 3), "{bw:?}");
    // A floor above the fair share is lowered to it.
    let bw = proportional(BW, &[1.0, 0.0], BW).unwrap();
    assert_eq!(bw, vec![BW / 2, BW / 2]);
}

#[test]
fn v4_2_failure_gives_the_next_r_half_each() {
    let caps = [2_700_000u64; 4];
    let (after, credits) = compensate(&caps, &[false, true, true, true], Spread::NextR(2));
    assert_eq!(after, vec![0, 4_050_000, 4_050_000, 2_700_000]);
    assert_eq!(after.iter().sum::<u64>(), BW);
    // Nothing needs lowering: the plan is increases only (and the failed
    // server's entry, which sends nothing).
    let p = Plan::between(&caps, &after);
    assert_eq!(p.reductions.len(), 1);
    assert_eq!(p.reductions[0].server, 0);
    assert_eq!(credits[0].given, vec![(1, 1_350_000), (2, 1_350_000)]);
    // Back when it returns.
    assert_eq!(give_back(&after, &credits[0], 10_000), caps.to_vec());
}

#[test]
fn v4_3_second_server_fails_wraps_and_other_algorithms_spread_evenly() {
    let caps = [2_700_000u64; 4];
    let (after, _) = compensate(&caps, &[true, false, true, true], Spread::NextR(2));
    assert_eq!(after, vec![2_700_000, 0, 4_050_000, 4_050_000]);
    // The last server's heirs wrap to the front.
    let (after, _) = compensate(&caps, &[true, true, true, false], Spread::NextR(2));
    assert_eq!(after, vec![4_050_000, 4_050_000, 2_700_000, 0]);
    // V4.4: with two failed, the next R *live* servers.
    let (after, _) = compensate(&caps, &[false, false, true, true], Spread::NextR(2));
    assert_eq!(after.iter().sum::<u64>(), BW);
    assert_eq!(after, vec![0, 0, 5_400_000, 5_400_000]);
    let (after, _) = compensate(&caps, &[true, false, true, true], Spread::Even);
    assert_eq!(after, vec![3_600_000, 0, 3_600_000, 3_600_000]);
}

#[test]
fn rates_parse_in_decimal_units_and_refuse_bare_numbers() {
    assert_eq!(parse_rate("10.8 MB/s").unwrap(), 10_800_000.0);
    assert_eq!(parse_rate("900KB/s").unwrap(), 900_000.0);
    assert_eq!(parse_rate("21.6 Mbit/s").unwrap(), 2_700_000.0);
    assert_eq!(parse_rate("1 gb/s").unwrap(), 1e9);
    for bad in ["10.8", "", "MB/s", "-1 MB/s", "1 furlong/s", "1.2.3 MB/s"] {
        let e = parse_rate(bad).unwrap_err().to_string();
        assert!(e.contains("e.g. \"10.8 MB/s\""), "{bad}: {e}");
    }
    let e = Settings::parse("10.8", 0.9, "3s", None, Spread::Even).unwrap_err();
    assert_eq!(e.key, "total");
    assert!(
        e.to_string()
            .starts_with("bandwidth.total: invalid rate \"10.8\": no unit"),
        "{e}"
    );
    let e = Settings::parse("10.8 MB/s", 1.0, "3s", None, Spread::Even).unwrap_err();
    assert_eq!(e.key, "alpha");
    let e = Settings::parse("10.8 MB/s", 0.9, "100ms", None, Spread::Even).unwrap_err();
    assert_eq!(e.key, "interval");
    let e = Settings::parse("10.8 MB/s", 0.9, "3s", Some("20 MB/s"), Spread::Even).unwrap_err();
    assert_eq!(e.key, "floor");
    let s = Settings::parse("10.8 MB/s", 0.9, "3s", None, Spread::NextR(2)).unwrap();
    assert_eq!((s.total, s.interval_ms, s.floor), (BW, 3000, 135_000));
}

fn members(n: usize, down: &[usize]) -> Vec<Member> {
    (0..n)
        .map(|i| Member {
            server: format!("b{}", i + 1),
            host: format!("h{}", i + 1),
            up: !down.contains(&i),
        })
        .collect()
}

fn caps_of(d: &Directory) -> Vec<u64> {
    d.status("web")
        .unwrap()
        .servers
        .iter()
        .map(|s| s.cap_bps)
        .collect()
}

fn ack_all(d: &mut Directory) {
    for s in d.status("web").unwrap().servers {
        d.observe("web", &s.server, None, Some(s.cap_bps));
    }
}

fn settings() -> Settings {
    Settings::parse("10.8 MB/s", 0.9, "3s", None, Spread::NextR(2)).unwrap()
}

#[test]
fn directory_starts_fair_and_refuses_a_change_over_the_bound() {
    let mut d = Directory::new();
    d.set_service("web", settings(), &members(4, &[]), 0);
    assert_eq!(caps_of(&d), vec![2_700_000; 4]);
    assert_eq!(d.poll_changes().len(), 4);
    ack_all(&mut d);
    let e = d.change("web", "b1", 2_800_000).unwrap_err();
    assert!(
        matches!(
            e,
            DirectoryError::OverBound {
                would_be: 10_900_000,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("lower other servers first"), "{e}");
    // A reduction is accepted at once, but until it is acknowledged the
    // node may still send at the old cap: the increase still waits.
    d.change("web", "b2", 2_600_000).unwrap();
    assert!(d.change("web", "b1", 2_800_000).is_err());
    d.observe("web", "b2", None, Some(2_600_000));
    d.change("web", "b1", 2_800_000).unwrap();
    let e = d.change("web", "b3", 1).unwrap_err();
    assert!(matches!(e, DirectoryError::BelowFloor { .. }), "{e}");
    assert!(matches!(
        d.change("nope", "b1", 1).unwrap_err(),
        DirectoryError::UnknownService(_)
    ));
}

#[test]
fn directory_refuses_what_a_host_cannot_supply_and_grants_the_rest() {
    let mut d = Directory::new();
    d.set_host("h1", Some(3_000_000));
    d.set_service("web", settings(), &members(4, &[]), 0);
    ack_all(&mut d);
    // b1 carries everything; eq. 3.2 wants to give it most of the total.
    for t in 1..=30u64 {
        for (i, u) in [8e6, 0.5e6, 0.5e6, 0.5e6].iter().enumerate() {
            d.observe("web", &format!("b{}", i + 1), Some(*u), None);
        }
        d.tick(t * 3000);
        ack_all(&mut d);
    }
    let caps = caps_of(&d);
    assert_eq!(caps[0], 3_000_000, "{caps:?}");
    assert!(caps.iter().sum::<u64>() <= BW);
    let e = d.change("web", "b1", 3_000_001).unwrap_err();
    assert!(matches!(e, DirectoryError::OverHost { .. }), "{e}");
    assert_eq!(d.hosts()[0].allocated_bps, 3_000_000);
}

#[test]
fn directory_moves_bandwidth_to_demand_reductions_first() {
    let mut d = Directory::new();
    d.set_service("web", settings(), &members(4, &[]), 0);
    ack_all(&mut d);
    d.poll_changes();
    let u = [6e6, 2e6, 1.5e6, 1.3e6];
    for (i, u) in u.iter().enumerate() {
        d.observe("web", &format!("b{}", i + 1), Some(*u), None);
    }
    d.tick(2999);
    assert!(d.poll_changes().is_empty(), "not due yet");
    d.tick(3000);
    // V3.2's first step: only the reductions go out before they are
    // acknowledged; b1's increase waits.
    let ch = d.poll_changes();
    assert_eq!(
        ch.iter().map(|c| c.server.as_str()).collect::<Vec<_>>(),
        vec!["b2", "b3", "b4"]
    );
    assert_eq!(d.status("web").unwrap().in_force_bps, BW);
    assert!(d.status("web").unwrap().pending);
    d.observe("web", "b2", None, Some(ch[0].cap));
    d.observe("web", "b3", None, Some(ch[1].cap));
    assert!(d.poll_changes().is_empty(), "b4 not yet acknowledged");
    d.observe("web", "b4", None, Some(ch[2].cap));
    let ch = d.poll_changes();
    assert_eq!(ch.len(), 1);
    assert_eq!(ch[0].server, "b1");
    assert!(close(&mb(&caps_of(&d)), &[3.03, 2.63, 2.58, 2.56], 1e-6));
    assert_eq!(caps_of(&d).iter().sum::<u64>(), BW);
}

#[test]
fn directory_credits_a_failed_server_to_the_next_r_within_the_period_and_back() {
    let mut d = Directory::new();
    d.set_service("web", settings(), &members(4, &[]), 0);
    ack_all(&mut d);
    d.poll_changes();
    // Server 1 fails at t = 60 s (V4.2): nothing has to be lowered, so the
    // heirs' increases go out at once, before the next round.
    d.set_service("web", settings(), &members(4, &[0]), 60_000);
    assert_eq!(caps_of(&d), vec![0, 4_050_000, 4_050_000, 2_700_000]);
    let st = d.status("web").unwrap();
    assert_eq!(st.in_force_bps, BW);
    assert!(st.last_change.unwrap().contains("b1 failed"));
    assert_eq!(d.cap("web", "b1"), None);
    assert!(matches!(
        d.change("web", "b1", 1_000_000).unwrap_err(),
        DirectoryError::Failed { .. }
    ));
    ack_all(&mut d);
    // It returns: the heirs give back (reductions first, then b1).
    d.poll_changes();
    d.set_service("web", settings(), &members(4, &[]), 70_000);
    let ch = d.poll_changes();
    assert_eq!(
        ch.iter().map(|c| c.server.as_str()).collect::<Vec<_>>(),
        vec!["b2", "b3"]
    );
    ack_all(&mut d);
    assert_eq!(caps_of(&d), vec![2_700_000; 4]);
}

#[test]
fn directory_resplits_when_servers_join_or_leave() {
    let mut d = Directory::new();
    d.set_service("web", settings(), &members(3, &[]), 0);
    assert_eq!(caps_of(&d), vec![3_600_000; 3]);
    ack_all(&mut d);
    d.set_service("web", settings(), &members(4, &[]), 1000);
    // The new server waits for the others' reductions.
    assert_eq!(caps_of(&d), vec![2_700_000, 2_700_000, 2_700_000, 0]);
    ack_all(&mut d);
    assert_eq!(caps_of(&d), vec![2_700_000; 4]);
    d.set_service("web", settings(), &members(2, &[]), 2000);
    assert_eq!(caps_of(&d), vec![5_400_000; 2]);
}

proptest! {
    /// Every prefix of an ordered change keeps the sum at or below BW and
    /// every cap at or above the floor.
    #[test]
    fn every_prefix_of_a_plan_keeps_the_bound_and_the_floor(
        d0 in proptest::collection::vec(0.0f64..1e7, 1..12),
        d1 in proptest::collection::vec(0.0f64..1e7, 1..12),
        total in 1_000u64..100_000_000,
        floor_frac in 0.0f64..0.2,
    ) {
        let n = d0.len().min(d1.len());
        let floor = (total as f64 * floor_frac / n as f64) as u64;
        let old = proportional(total, &d0[..n], floor).unwrap_or(vec![total / n as u64; n]);
        let new = proportional(total, &d1[..n], floor).unwrap_or(old.clone());
        prop_assert!(old.iter().sum::<u64>() <= total);
        prop_assert!(new.iter().sum::<u64>() <= total);
        let f = floor.min(total / n as u64);
        prop_assert!(new.iter().all(|c| *c >= f));
        let plan = Plan::between(&old, &new);
        let mut caps = old.clone();
        for s in plan.steps() {
            caps[s.server] = s.to;
            prop_assert!(caps.iter().sum::<u64>() <= total, "{:?}", caps);
            prop_assert!(caps.iter().all(|c| *c >= f));
        }
        prop_assert_eq!(caps, new);
    }

    /// Eq. 3.2 hands out exactly the total when it can.
    #[test]
    fn proportional_sums_to_the_total(
        d in proptest::collection::vec(0.0f64..1e9, 1..16),
        total in 1u64..10_000_000_000,
    ) {
        if let Some(c) = proportional(total, &d, total / 100 / d.len() as u64) {
            prop_assert_eq!(c.iter().sum::<u64>(), total);
        }
    }

    /// Driven by random samples, acknowledgements that come late or never,
    /// failures and returns, the caps in force never exceed the bound and
    /// no live server's cap is below the floor.
    #[test]
    fn directory_never_exceeds_the_bound(
        ops in proptest::collection::vec((0u8..4, 0usize..5, 0.0f64..5e6), 1..200),
        r in 1usize..4,
    ) {
        let s = Settings::parse("10.8 MB/s", 0.9, "1s", None, Spread::NextR(r)).unwrap();
        let mut dir = Directory::new();
        let mut down = vec![false; 5];
        let m = |down: &[bool]| -> Vec<Member> {
            (0..5).map(|i| Member { server: format!("b{i}"), host: format!("h{i}"), up: !down[i] }).collect()
        };
        dir.set_service("web", s, &m(&down), 0);
        let mut t = 0;
        for (op, i, u) in ops {
            match op {
                0 => dir.observe("web", &format!("b{i}"), Some(u), None),
                1 => {
                    let c = dir.status("web").unwrap().servers[i].cap_bps;
                    dir.observe("web", &format!("b{i}"), None, Some(c));
                }
                2 => { t += 1000; dir.tick(t); }
                _ => {
                    down[i] = !down[i];
                    if down.iter().all(|d| *d) { down[i] = false; }
                    dir.set_service("web", s, &m(&down), t);
                }
            }
            let st = dir.status("web").unwrap();
            prop_assert!(st.in_force_bps <= st.total_bps, "{:?}", st);
            for sv in &st.servers {
                if sv.up && sv.applied_bps.is_some() {
                    prop_assert!(sv.cap_bps >= st.floor_bps.min(st.total_bps / 5) || sv.cap_bps == 0 || sv.target_bps > sv.cap_bps, "{:?}", st);
                }
            }
        }
    }
}

#[test]
fn offered_rate_counts_drops_at_the_mean_packet_size_and_the_queue() {
    let a = Counters {
        bytes: 1_000_000,
        packets: 1000,
        drops: 0,
        backlog: 0,
    };
    let b = Counters {
        bytes: 3_000_000,
        packets: 3000,
        drops: 100,
        backlog: 50_000,
    };
    let (offered, sent) = offered_rate(a, b, 2.0).unwrap();
    assert_eq!(sent, 1_000_000.0);
    assert_eq!(offered, (2_000_000.0 + 100_000.0 + 50_000.0) / 2.0);
    assert_eq!(offered_rate(b, a, 1.0), None, "counters went back");
    assert_eq!(offered_rate(a, b, 0.0), None);
}
