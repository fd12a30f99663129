//! The paper's vectors (notes/smon.md §5) and the peer's step.

use super::analysis::*;
use super::peer::REFUSE_INTERVALS;
use super::*;
use std::sync::Arc;

const FP: &str = "SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s";

struct Lcg(u64);
impl Random for Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

fn target(i: usize) -> Target {
    Target {
        name: format!("h{i}"),
        address: core::net::IpAddr::V4(core::net::Ipv4Addr::new(
            10,
            0,
            (i / 250) as u8,
            (i % 250) as u8 + 1,
        )),
        ssh_port: 22,
        user: "root".into(),
        prefix: "/opt/shoal".into(),
        host_key: FP.into(),
        roles: Vec::new(),
        manager: None,
    }
}

fn list(n: usize, version: u64) -> Arc<TargetList> {
    Arc::new(
        TargetList::new(
            Version::new(version, 0),
            DEFAULT_OVERLAY_PORT,
            (0..n).map(target).collect(),
        )
        .unwrap(),
    )
}

fn peer(name: &str, n: usize) -> Peer {
    Peer::new(
        name,
        list(n, 1),
        Version::new(1, 0),
        Livetag::default(),
        Config {
            interval_ms: 1000,
            timeout_ms: 300,
        },
        0,
    )
}

fn drain(p: &mut Peer) -> Vec<Command> {
    std::iter::from_fn(|| p.poll()).collect()
}

#[test]
fn y_r_matches_the_papers_curve() {
    let n117 = [
        (0, 0.0085),
        (1, 0.0227),
        (2, 0.0594),
        (3, 0.1465),
        (4, 0.3182),
        (5, 0.5592),
        (6, 0.7752),
        (7, 0.9036),
        (8, 0.9622),
        (9, 0.9858),
        (10, 0.9947),
        (12, 0.9993),
    ];
    for (r, y) in n117 {
        assert!((y_r(117.0, r as f64) - y).abs() < 1e-4, "n=117 r={r}");
    }
    let n24 = [
        (0, 0.0400),
        (1, 0.1017),
        (2, 0.2354),
        (3, 0.4556),
        (4, 0.6946),
        (5, 0.8608),
        (6, 0.9439),
        (8, 0.9920),
        (10, 0.9989),
    ];
    for (r, y) in n24 {
        assert!((y_r(24.0, r as f64) - y).abs() < 1e-4, "n=24 r={r}");
    }
}

#[test]
fn rounds_to_reach_a_fraction_match_the_table() {
    let rows = [
        (16.0, 2.773, 4.970, 7.368),
        (24.0, 3.178, 5.375, 7.773),
        (117.0, 4.762, 6.959, 9.357),
        (1000.0, 6.908, 9.105, 11.503),
        (10000.0, 9.210, 11.408, 13.805),
    ];
    for (n, half, ninety, ninety_nine) in rows {
        assert!((rounds_to(n, 0.5) - half).abs() < 1e-3);
        assert!((rounds_to(n, 0.9) - ninety).abs() < 1e-3);
        assert!((rounds_to(n, 0.99) - ninety_nine).abs() < 1e-3);
        // And the inverse holds.
        assert!((y_r(n, rounds_to(n, 0.9)) - 0.9).abs() < 1e-9);
    }
}

#[test]
fn overhead_matches_the_papers_vectors_and_limit() {
    let v = [
        (1.0, 16.0, 1.0),
        (1.0, 10000.0, 1.0),
        (8.0, 16.0, 1.2398),
        (15.0, 16.0, 1.5116),
        (16.0, 16.0, 1.5530),
        (12.0, 24.0, 1.2502),
        (23.0, 24.0, 1.5351),
        (24.0, 24.0, 1.5627),
        (58.0, 117.0, 1.2641),
        (116.0, 117.0, 1.5724),
        (117.0, 117.0, 1.5780),
        (500.0, 1000.0, 1.2703),
        (999.0, 1000.0, 1.5809),
        (10000.0, 10000.0, 1.5819),
    ];
    for (m, n, e) in v {
        assert!((overhead_paper(m, n) - e).abs() < 1e-4, "m={m} n={n}");
    }
    assert!((overhead_limit() - 1.5819767).abs() < 1e-7);
    assert!((zero_pings(117.0, 117.0) - 0.3663).abs() < 1e-4);
}

#[test]
fn remedy_is_fig_2s_decision() {
    let i = |installed, running| Inspection {
        installed,
        running,
        deploying: false,
    };
    assert_eq!(remedy(i(false, false)), Remedy::Deploy);
    assert_eq!(remedy(i(true, false)), Remedy::Recover);
    assert_eq!(remedy(i(true, true)), Remedy::Nothing);
    assert_eq!(remedy(i(false, true)), Remedy::Nothing);
    let claimed = Inspection {
        deploying: true,
        ..i(false, false)
    };
    assert_eq!(remedy(claimed), Remedy::Nothing, "another deployer copies");
    let claimed_but_installed = Inspection {
        deploying: true,
        ..i(true, false)
    };
    assert_eq!(remedy(claimed_but_installed), Remedy::Recover);
}

#[test]
fn versions_order_by_number_then_origin() {
    assert!(Version::new(2, 0) > Version::new(1, u64::MAX));
    assert!(Version::new(2, 5) > Version::new(2, 4));
    let a = Versions::default();
    let mut b = a;
    b.targets = Version::new(1, 0);
    let n = compare(&a, &b);
    assert!(n.targets && !n.peer && !n.livetag);
    assert_eq!(compare(&b, &a), Newer::default());
}

#[test]
fn one_ping_per_interval_to_a_uniform_other_target() {
    let mut p = peer("h3", 10);
    let mut rng = Lcg(7);
    let mut hits = [0u32; 10];
    let mut now = 0;
    for _ in 0..10_000 {
        p.handle_timeout(now, &mut rng);
        let cmds = drain(&mut p);
        let pings: Vec<_> = cmds
            .iter()
            .filter_map(|c| match c {
                Command::Ping { target, seq, .. } => Some((*target, *seq)),
                _ => None,
            })
            .collect();
        assert_eq!(pings.len(), 1, "one ping at {now}");
        let (t, seq) = pings[0];
        hits[t] += 1;
        p.handle_answer(t, seq, &Versions::default(), now + 10);
        // Woken early: nothing happens until the interval is up.
        p.handle_timeout(now + 500, &mut rng);
        assert!(drain(&mut p).is_empty());
        assert_eq!(p.poll_timeout(), Some(now + 1000));
        now += 1000;
    }
    assert_eq!(hits[3], 0, "never itself");
    for (i, h) in hits.iter().enumerate().filter(|(i, _)| *i != 3) {
        assert!((1000..1230).contains(h), "target {i}: {h} of 10000 / 9");
    }
    assert_eq!(p.counters().timeouts, 0);
}

#[test]
fn an_unanswered_ping_becomes_one_contact_and_its_outcome_is_kept() {
    let mut p = peer("h0", 2);
    let mut rng = Lcg(1);
    p.handle_timeout(0, &mut rng);
    let Command::Ping { target, .. } = drain(&mut p)[0] else {
        panic!()
    };
    assert_eq!(target, 1);
    assert_eq!(p.poll_timeout(), Some(300));
    p.handle_timeout(299, &mut rng);
    assert!(drain(&mut p).is_empty());
    p.handle_timeout(300, &mut rng);
    let cmds = drain(&mut p);
    assert_eq!(
        cmds,
        vec![Command::Contact {
            target: 1,
            list: Version::new(1, 0)
        }]
    );
    // Pinging goes on while the contact runs, but no second contact.
    for t in [1000, 1300, 2000, 2300] {
        p.handle_timeout(t, &mut rng);
        assert!(
            drain(&mut p)
                .iter()
                .all(|c| matches!(c, Command::Ping { .. }))
        );
    }
    assert_eq!(p.view(1).unwrap().state, State::Contacting);
    p.handle_outcome(1, Version::new(1, 0), Outcome::Deployed, 2500);
    let v = p.view(1).unwrap();
    assert_eq!(
        (v.state, v.deployed_ms, v.contacts),
        (State::Deployed, Some(2500), 1)
    );
    // An outcome for an older list is dropped.
    p.handle_outcome(1, Version::new(0, 0), Outcome::Failed("x".into()), 2600);
    assert_eq!(p.view(1).unwrap().state, State::Deployed);
}

#[test]
fn a_wrong_host_key_is_recorded_with_what_was_seen() {
    let mut p = peer("h0", 2);
    let mut rng = Lcg(1);
    p.handle_timeout(0, &mut rng);
    drain(&mut p);
    p.handle_timeout(300, &mut rng);
    drain(&mut p);
    p.handle_outcome(
        1,
        Version::new(1, 0),
        Outcome::WrongHostKey("SHA256:x".into()),
        400,
    );
    let v = p.view(1).unwrap();
    assert_eq!(v.state, State::WrongHostKey);
    assert_eq!(v.detail.as_deref(), Some("SHA256:x"));
    // A later round may contact it again (it may have been fixed); the
    // shell checks the key every time, so it is still never deployed to.
    p.handle_timeout(1000, &mut rng);
    drain(&mut p);
    p.handle_timeout(1300, &mut rng);
    assert!(matches!(
        drain(&mut p)[..],
        [Command::Contact { target: 1, .. }]
    ));
}

#[test]
fn a_newer_list_is_pulled_and_a_newer_livetag_adopted() {
    let mut p = peer("h0", 4);
    let mut theirs = p.versions();
    theirs.targets = Version::new(2, 9);
    theirs.peer = Version::new(3, 0);
    theirs.livetag = Livetag {
        on: false,
        version: Version::new(1, 0),
    };
    let answer = p.handle_ping(2, &theirs, 50);
    assert!(!answer.livetag.on, "the answer carries the adopted livetag");
    // Off: the list is still pulled, but no upgrade (self-management off).
    assert_eq!(drain(&mut p), vec![Command::FetchTargets { from: 2 }]);
    // Livetag off: no pings, but pings are answered; the next wake-up is
    // the quiet period's end.
    let mut rng = Lcg(3);
    p.handle_timeout(5000, &mut rng);
    assert!(drain(&mut p).is_empty());
    assert_eq!(p.poll_timeout(), Some(50 + 30_000));
    assert!(!p.handle_ping(1, &Versions::default(), 6000).livetag.on);
    assert_eq!(p.poll_timeout(), Some(6000 + 30_000), "a ping restarts it");
    // An older livetag does not switch it back; a newer one does.
    assert!(!p.set_livetag(Livetag::default(), 7000));
    assert!(p.set_livetag(
        Livetag {
            on: true,
            version: Version::new(2, 0)
        },
        7000
    ));
    p.handle_timeout(7000, &mut rng);
    assert!(matches!(drain(&mut p)[..], [Command::Ping { .. }]));
}

#[test]
fn a_disabled_peer_exits_after_the_quiet_period_and_only_then() {
    let mut p = peer("h0", 4);
    let mut rng = Lcg(5);
    let off = Livetag {
        on: false,
        version: Version::new(1, 0),
    };
    assert!(p.set_livetag(off, 1000));
    let quiet = p.config().quiet_ms();
    assert_eq!(quiet, QUIET_INTERVALS * 1000);
    p.handle_timeout(1000 + quiet - 1, &mut rng);
    assert!(drain(&mut p).is_empty());
    p.handle_timeout(1000 + quiet, &mut rng);
    assert_eq!(drain(&mut p), vec![Command::Exit]);
    assert!(p.exiting());
    assert_eq!(p.poll_timeout(), None);
    p.handle_timeout(1000 + 2 * quiet, &mut rng);
    assert!(drain(&mut p).is_empty(), "once");
}

#[test]
fn a_newer_release_is_pulled_once_and_a_refused_one_not_again_for_a_while() {
    let mut p = peer("h0", 4);
    let mut theirs = p.versions();
    theirs.peer = Version::new(3, 0);
    p.handle_ping(2, &theirs, 50);
    let up = Command::Upgrade {
        from: Source::Peer(2),
        version: Version::new(3, 0),
    };
    assert_eq!(drain(&mut p), vec![up.clone()]);
    p.handle_answer(3, 9, &theirs, 60);
    assert!(drain(&mut p).is_empty(), "one upgrade at a time");
    p.handle_upgrade_failed(Version::new(3, 0), "bad signature".into(), 100);
    assert_eq!(
        p.last_upgrade().unwrap().error.as_deref(),
        Some("bad signature")
    );
    p.handle_ping(3, &theirs, 200);
    assert!(drain(&mut p).is_empty(), "refused lately");
    let later = 100 + REFUSE_INTERVALS * 1000;
    p.handle_ping(1, &theirs, later);
    assert_eq!(
        drain(&mut p),
        vec![Command::Upgrade {
            from: Source::Peer(1),
            version: Version::new(3, 0),
        }]
    );
    // An older or equal release is never pulled.
    let mut q = peer("h0", 4);
    q.handle_ping(1, &Versions::default(), 0);
    assert!(drain(&mut q).is_empty());
    // The utility's offer is one more source.
    assert!(q.handle_offer(Version::new(2, 0), 0));
    assert_eq!(
        drain(&mut q),
        vec![Command::Upgrade {
            from: Source::Utility,
            version: Version::new(2, 0),
        }]
    );
    let c = q.counters();
    assert_eq!((c.upgrades, c.upgrades_refused), (1, 0));
}

#[test]
fn a_release_marked_bad_is_never_pulled_and_is_rolled_back_where_it_runs() {
    let bad = Version::new(3, 0);
    // A peer on the good release learns of the bad one and refuses it.
    let mut p = peer("h0", 4);
    let mut theirs = p.versions();
    theirs.peer = bad;
    theirs.bad = bad;
    p.handle_ping(2, &theirs, 0);
    assert!(drain(&mut p).is_empty());
    assert_eq!(p.versions().bad, bad, "and spreads the mark");
    assert!(!p.handle_offer(bad, 0));
    // A peer that took it rolls back when it learns.
    let mut q = Peer::new(
        "h1",
        list(4, 1),
        bad,
        Livetag::default(),
        Config::default(),
        0,
    );
    let news = Versions {
        bad,
        ..Versions::default()
    };
    q.handle_answer(0, 1, &news, 10);
    assert_eq!(drain(&mut q), vec![Command::RollBack { version: bad }]);
    q.handle_ping(2, &news, 20);
    assert!(drain(&mut q).is_empty(), "asked once");
    // With no previous release here it pulls any good one, even older.
    q.handle_rollback_failed();
    let good = Versions {
        peer: Version::new(2, 0),
        bad,
        ..Versions::default()
    };
    q.handle_ping(3, &good, 30);
    assert_eq!(
        drain(&mut q),
        vec![Command::Upgrade {
            from: Source::Peer(3),
            version: Version::new(2, 0),
        }]
    );
    // Restored marks at start work the same way.
    let mut r = Peer::new(
        "h2",
        list(4, 1),
        bad,
        Livetag::default(),
        Config::default(),
        0,
    );
    r.mark_bad([bad]);
    assert_eq!(drain(&mut r), vec![Command::RollBack { version: bad }]);
}

#[test]
fn apps_are_told_round_robin_pulled_when_missing_and_their_state_spreads() {
    use super::apps::{AppSpec, AppState, Notice, StateTag};
    let spec = AppSpec {
        name: "web".into(),
        version: Version::new(1, 5),
        adaptor: "www".into(),
        params: Default::default(),
        restart: None,
        state: AppState::Online,
        files: Vec::new(),
    };
    let tag0 = StateTag {
        state: AppState::Online,
        version: Version::default(),
    };
    let mut a = peer("h0", 4);
    assert!(a.install_app(spec.clone(), tag0));
    assert_eq!(drain(&mut a), vec![Command::Supervise]);
    let mut rng = Lcg(11);
    a.handle_timeout(0, &mut rng);
    let cmds = drain(&mut a);
    let notice = cmds
        .iter()
        .find_map(|c| match c {
            Command::AppNotice {
                target,
                name,
                notice,
            } => Some((*target, name.clone(), *notice)),
            _ => None,
        })
        .expect("a notice each round");
    assert_ne!(notice.0, 0, "never to itself");
    assert_eq!(notice.1, "web");
    let mut b = peer("h1", 4);
    b.handle_app_notice(Source::Peer(0), "web", &notice.2, 5);
    assert_eq!(
        drain(&mut b),
        vec![Command::FetchApp {
            from: Source::Peer(0),
            name: "web".into(),
            version: spec.version,
        }]
    );
    b.handle_app_fetched("web", Ok((spec.clone(), notice.2.state)), 6);
    assert_eq!(drain(&mut b), vec![Command::Supervise]);
    // An operator's state change at one peer reaches the other by notice.
    let off = StateTag {
        state: AppState::Offline,
        version: Version::new(1, 0),
    };
    assert!(a.set_app_state("web", off).unwrap());
    drain(&mut a);
    b.handle_app_notice(
        Source::Peer(0),
        "web",
        &Notice {
            version: spec.version,
            state: off,
        },
        7,
    );
    assert_eq!(drain(&mut b), vec![Command::Supervise]);
    assert_eq!(b.apps().get("web").unwrap().state, off);
    // A disabled peer tells nobody.
    let mut c = peer("h2", 4);
    c.install_app(spec, tag0);
    c.set_livetag(
        Livetag {
            on: false,
            version: Version::new(1, 0),
        },
        0,
    );
    drain(&mut c);
    c.handle_timeout(5000, &mut rng);
    assert!(drain(&mut c).is_empty());
}

#[test]
fn adopting_a_list_keeps_views_by_name_and_refuses_older_lists() {
    let mut p = peer("h1", 4);
    p.handle_ping(3, &Versions::default(), 10);
    assert_eq!(p.view(3).unwrap().state, State::Alive);
    assert!(!p.adopt_targets(list(4, 1)), "same version");
    // Version 2 drops h0 and h2: h1 moves to index 0, h3 to index 1.
    let l2 = Arc::new(
        TargetList::new(
            Version::new(2, 0),
            7946,
            vec![target(1), target(3), target(5)],
        )
        .unwrap(),
    );
    assert!(p.adopt_targets(l2));
    assert_eq!(p.me(), Some(0));
    assert_eq!(p.versions().targets, Version::new(2, 0));
    assert_eq!(p.view(1).unwrap().last_seen_ms, Some(10));
    assert!(p.view(3).is_none());
}

#[test]
fn a_late_wake_pings_once_without_a_burst() {
    let mut p = peer("h0", 5);
    let mut rng = Lcg(9);
    p.handle_timeout(0, &mut rng);
    drain(&mut p);
    p.handle_timeout(60_000, &mut rng);
    let pings = drain(&mut p)
        .into_iter()
        .filter(|c| matches!(c, Command::Ping { .. }))
        .count();
    assert_eq!(pings, 1);
    assert_eq!(p.poll_timeout(), Some(60_300));
}

#[test]
fn a_lone_listed_peer_pings_nobody_and_an_unlisted_one_pings_anyone() {
    let mut p = peer("h0", 1);
    p.handle_timeout(0, &mut Lcg(1));
    assert!(drain(&mut p).is_empty());
    let mut seed = peer("operator", 1);
    seed.handle_timeout(0, &mut Lcg(1));
    assert!(matches!(
        drain(&mut seed)[..],
        [Command::Ping { target: 0, .. }]
    ));
}

#[test]
fn target_lists_are_validated() {
    let ok = |ts: Vec<Target>| TargetList::new(Version::default(), 7946, ts);
    assert_eq!(ok(vec![]), Err(TargetError::Empty));
    assert!(matches!(
        ok(vec![target(1), target(1)]),
        Err(TargetError::DuplicateName(_))
    ));
    let mut t = target(2);
    t.name = "other".into();
    assert!(matches!(
        ok(vec![target(2), t]),
        Err(TargetError::DuplicateAddress(..))
    ));
    for (field, f) in [
        (
            "host_key",
            Box::new(|t: &mut Target| t.host_key = "MD5:aa".into()) as Box<dyn Fn(&mut Target)>,
        ),
        (
            "prefix",
            Box::new(|t: &mut Target| t.prefix = "opt/shoal".into()),
        ),
        (
            "prefix",
            Box::new(|t: &mut Target| t.prefix = "/opt/../etc".into()),
        ),
        ("user", Box::new(|t: &mut Target| t.user = "ro ot".into())),
        ("name", Box::new(|t: &mut Target| t.name = "a b".into())),
        ("ssh_port", Box::new(|t: &mut Target| t.ssh_port = 0)),
    ] {
        let mut t = target(1);
        f(&mut t);
        let e = ok(vec![t]).unwrap_err().to_string();
        assert!(e.contains(field), "{field}: {e}");
    }
    // A deserialised list is validated too.
    let json = serde_json::json!({
        "version": {"number": 1, "origin": 0},
        "target": [{"name": "a", "address": "10.0.0.1", "host_key": "nope"}]
    });
    assert!(serde_json::from_value::<TargetList>(json).is_err());
    let json = serde_json::json!({
        "version": {"number": 1, "origin": 0},
        "target": [{"name": "a", "address": "10.0.0.1", "host_key": FP}]
    });
    let l: TargetList = serde_json::from_value(json).unwrap();
    assert_eq!((l.targets()[0].ssh_port, l.overlay_port()), (22, 7946));
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Ev {
        Advance(u64),
        Answer(usize),
        Outcome(usize, u8),
        PingFrom(usize),
    }

    fn ev() -> impl Strategy<Value = Ev> {
        prop_oneof![
            (1u64..2500).prop_map(Ev::Advance),
            (0usize..8).prop_map(Ev::Answer),
            (0usize..8, 0u8..6).prop_map(|(t, o)| Ev::Outcome(t, o)),
            (0usize..8).prop_map(Ev::PingFrom),
        ]
    }

    proptest! {
        /// Whatever arrives in whatever order: at most one ping per interval,
        /// never a self-ping, and never a second contact to a target whose
        /// first has not ended.
        #[test]
        fn pings_are_paced_and_contacts_never_overlap(events in proptest::collection::vec(ev(), 1..300)) {
            let mut p = peer("h2", 8);
            let mut rng = Lcg(11);
            let mut now = 0u64;
            let mut pings = 0u64;
            let mut open: std::collections::BTreeSet<usize> = Default::default();
            let mut last_seq: Vec<(usize, u64)> = Vec::new();
            for e in events {
                match e {
                    Ev::Advance(d) => {
                        now += d;
                        p.handle_timeout(now, &mut rng);
                    }
                    Ev::Answer(t) => {
                        if let Some(&(target, seq)) = last_seq.iter().find(|(x, _)| *x == t) {
                            p.handle_answer(target, seq, &Versions::default(), now);
                        }
                    }
                    Ev::Outcome(t, o) => {
                        let o = match o {
                            0 => Outcome::Deployed,
                            1 => Outcome::Recovered,
                            2 => Outcome::AlreadyRunning,
                            3 => Outcome::Unreachable("x".into()),
                            4 => Outcome::WrongHostKey("x".into()),
                            _ => Outcome::Failed("x".into()),
                        };
                        if open.remove(&t) {
                            p.handle_outcome(t, Version::new(1, 0), o, now);
                        }
                    }
                    Ev::PingFrom(t) => {
                        p.handle_ping(t, &Versions::default(), now);
                    }
                }
                while let Some(c) = p.poll() {
                    match c {
                        Command::Ping { target, seq, .. } => {
                            prop_assert_ne!(target, 2);
                            pings += 1;
                            last_seq.retain(|(x, _)| *x != target);
                            last_seq.push((target, seq));
                        }
                        Command::Contact { target, .. } => {
                            prop_assert!(open.insert(target), "second contact to {}", target);
                        }
                        _ => {}
                    }
                }
                prop_assert!(pings <= now / 1000 + 1, "{} pings by {} ms", pings, now);
            }
        }
    }
}

#[test]
fn a_manager_host_keeps_its_manager_once_a_round_while_the_livetag_is_on() {
    let mut ts: Vec<Target> = (0..3).map(target).collect();
    ts[1].manager = Some("/var/lib/shoal".into());
    let list = Arc::new(TargetList::new(Version::new(1, 0), DEFAULT_OVERLAY_PORT, ts).unwrap());
    let cfg = Config {
        interval_ms: 1000,
        timeout_ms: 300,
    };
    let keeps = |p: &mut Peer| {
        drain(p)
            .into_iter()
            .filter(|c| matches!(c, Command::KeepManager { dir } if dir == "/var/lib/shoal"))
            .count()
    };
    let mut rng = Lcg(3);
    let mut h1 = Peer::new(
        "h1",
        list.clone(),
        Version::new(1, 0),
        Livetag::default(),
        cfg,
        0,
    );
    let mut h0 = Peer::new(
        "h0",
        list.clone(),
        Version::new(1, 0),
        Livetag::default(),
        cfg,
        0,
    );
    for r in 0..5 {
        h1.handle_timeout(r * 1000, &mut rng);
        assert_eq!(keeps(&mut h1), 1, "round {r}");
        h1.handle_timeout(r * 1000 + 500, &mut rng);
        assert_eq!(keeps(&mut h1), 0, "once a round");
        h0.handle_timeout(r * 1000, &mut rng);
        assert_eq!(keeps(&mut h0), 0, "only on the manager's host");
    }
    // The last start stays on show while it runs; a failure until it runs.
    h1.handle_manager(ManagerOutcome::Running, 10);
    assert_eq!(h1.manager(), Some(&(10, ManagerOutcome::Running)));
    h1.handle_manager(ManagerOutcome::Started, 20);
    h1.handle_manager(ManagerOutcome::Running, 30);
    assert_eq!(h1.manager(), Some(&(20, ManagerOutcome::Started)));
    h1.handle_manager(ManagerOutcome::Failed("no binary".into()), 40);
    h1.handle_manager(ManagerOutcome::Running, 50);
    assert_eq!(h1.manager(), Some(&(50, ManagerOutcome::Running)));
    assert_eq!(h1.counters().manager_starts, 1);

    // Livetag off: the pool stops maintaining itself, the manager included.
    let off = Livetag {
        on: false,
        ..Livetag::default()
    };
    let mut h1 = Peer::new("h1", list, Version::new(1, 0), off, cfg, 0);
    h1.handle_timeout(0, &mut rng);
    assert_eq!(keeps(&mut h1), 0);
}
