//! The notes' vectors (seeds/notes/hsweb.md §3) and the model's own.

use super::*;
use crate::federation::exchange::changed;

fn close(a: f64, b: f64) {
    assert!((a - b).abs() < 1e-6, "{a} != {b}");
}

#[test]
fn uv1_summary_of_three_nodes_and_of_none() {
    assert_eq!(summarize(&[0.2, 0.5, 0.8]), Some((0.5, 0.2, 3)));
    assert_eq!(summarize(&[]), None);
}

#[test]
fn uv2_supercluster_is_node_weighted() {
    let (avg, low, n) = aggregate(&[(0.4, 0.1, 3), (0.8, 0.5, 1)]).unwrap();
    close(avg, 0.5);
    close(low, 0.1);
    assert_eq!(n, 4);
    assert_eq!(aggregate(&[(0.3, 0.3, 0)]), None);
}

fn model() -> Model {
    Model {
        mode: Mode::Cost,
        threshold_ms: 50.0,
        client_mbit: 100.0,
        disk_mbit: 4000.0,
        default_base_ms: 1.0,
    }
}

fn peer(holds: Option<u64>) -> PeerView {
    PeerView {
        cluster: "p".into(),
        dispatcher: "127.0.2.1:80".into(),
        alive: true,
        link: NetPath {
            rtt_ms: 40.0,
            mbit: 10.0,
        },
        client_path: Some(NetPath {
            rtt_ms: 41.0,
            mbit: 20.0,
        }),
        load: 0.0,
        nodes: 2,
        pending: 0.0,
        holds,
        base_ms: None,
        explore: false,
    }
}

fn inputs(local_size: Option<u64>, peers: &[PeerView]) -> CostInputs<'_> {
    CostInputs {
        local_size,
        client: NetPath {
            rtt_ms: 1.0,
            mbit: 100.0,
        },
        local_load: 0.0,
        local_nodes: 2,
        base_ms: None,
        from_peer: false,
        peers,
    }
}

fn candidate<'a>(d: &'a Decision, kind: &str) -> &'a Candidate {
    d.candidates
        .iter()
        .find(|c| c.placement.kind() == kind)
        .unwrap_or_else(|| panic!("no {kind} candidate in {d:?}"))
}

#[test]
fn uv3_data_term_local_disk_and_remote_link() {
    // 1.5 MB on an 80 Mbit/s disk: 150 ms; over a 1.5 Mbit/s link: 8 s.
    let m = Model {
        disk_mbit: 80.0,
        threshold_ms: 0.0,
        ..model()
    };
    let mut p = peer(Some(1_500_000));
    p.link.mbit = 1.5;
    p.link.rtt_ms = 0.0;
    let peers = [p];
    let d = m.decide(&inputs(Some(1_500_000), &peers));
    close(candidate(&d, "local").terms.data, 150.0);
    close(candidate(&d, "fetch").terms.data, 8000.0);
    // Degraded by concurrent load: 3 in flight locally, 1 fetch in flight.
    let mut i = inputs(Some(1_500_000), &peers);
    i.local_load = 3.0;
    let mut p2 = peers[0].clone();
    p2.pending = 1.0;
    let peers2 = [p2];
    i.peers = &peers2;
    let d = m.decide(&i);
    close(candidate(&d, "local").terms.data, 600.0);
    close(candidate(&d, "fetch").terms.data, 16000.0);
}

#[test]
fn uv4_t_client_is_zero_for_unmodified_clients() {
    let peers = [peer(Some(10_000))];
    let d = model().decide(&inputs(None, &peers));
    assert!(d.candidates.iter().all(|c| c.terms.client == 0.0));
}

#[test]
fn uv5_large_files_redirected_small_files_fetched() {
    // The data at the peer only; its clients' path (20 Mbit/s) is better
    // than the clusters' shared link (10 Mbit/s), as the paper's KSU link
    // at 95 % use was worse than the clients' own.
    let peers = [peer(Some(1_500_000))];
    let d = model().decide(&inputs(None, &peers));
    let f = candidate(&d, "fetch");
    // 12 Mbit over 10 Mbit/s + one RTT; 1 ms server; streamed on to the
    // client at 100 Mbit/s, faster than the link: its RTT only.
    close(f.total_ms, 1200.0 + 40.0 + 1.0 + 1.0);
    let r = candidate(&d, "redirect");
    // 307 (1 ms) + new connection (41 ms); 3 ms disk; 1 ms server; 12 Mbit
    // at 20 Mbit/s + 41 ms.
    close(r.total_ms, 1.0 + 41.0 + 3.0 + 1.0 + 600.0 + 41.0);
    assert_eq!(d.chosen, Placement::Redirect("p".into()));
    assert!(d.consulted);

    let peers = [peer(Some(10_000))];
    let d = model().decide(&inputs(None, &peers));
    assert_eq!(d.chosen, Placement::Fetch("p".into()), "{d:?}");
    close(candidate(&d, "fetch").total_ms, 8.0 + 40.0 + 1.0 + 1.0);
}

#[test]
fn before_the_peer_measured_our_clients_the_link_stands_for_their_path() {
    let mut p = peer(Some(1_500_000));
    p.client_path = None;
    let peers = [p];
    let d = model().decide(&inputs(None, &peers));
    let r = candidate(&d, "redirect");
    // RTT 1 + 40 = 41 ms, bandwidth min(10, 100) = 10 Mbit/s: the same
    // bytes over the same link, plus the redirect's round trips: fetch.
    close(r.terms.net, 1200.0 + 41.0);
    assert_eq!(d.chosen, Placement::Fetch("p".into()));
}

#[test]
fn local_data_under_the_threshold_never_consults() {
    let peers = [peer(Some(10_000))];
    let d = model().decide(&inputs(Some(10_000), &peers));
    assert_eq!(d.chosen, Placement::Local);
    assert!(!d.consulted);
    assert_eq!(d.candidates.len(), 1);
}

#[test]
fn uv7_threshold_gate_just_under_and_just_over() {
    let peers = [peer(Some(10_000))];
    // Local: 0.02 ms disk + base 1 ms + 0.8 ms + 1 ms = 2.82 ms.
    let m = Model {
        threshold_ms: 2.83,
        ..model()
    };
    assert!(!m.decide(&inputs(Some(10_000), &peers)).consulted);
    let m = Model {
        threshold_ms: 2.81,
        ..model()
    };
    let d = m.decide(&inputs(Some(10_000), &peers));
    assert!(d.consulted);
    // Over the threshold but still the fastest: stays local.
    assert_eq!(d.chosen, Placement::Local);
}

#[test]
fn a_loaded_cluster_sheds_cpu_work_and_stops_when_the_peer_is_loaded_too() {
    let mut i = inputs(Some(100), &[]);
    i.base_ms = Some(200.0);
    i.local_load = 3.0;
    let peers = [peer(Some(100))];
    i.peers = &peers;
    let d = model().decide(&i);
    assert_eq!(d.chosen.kind(), "fetch", "{d:?}");
    let mut busy = peer(Some(100));
    busy.load = 3.0;
    let peers = [busy];
    i.peers = &peers;
    assert_eq!(model().decide(&i).chosen, Placement::Local);
    // Our own requests in flight count on the peer: 6 pending over its 2
    // nodes are as good as a load of 3.
    let mut herded = peer(Some(100));
    herded.pending = 6.0;
    let peers = [herded];
    i.peers = &peers;
    assert_eq!(model().decide(&i).chosen, Placement::Local);
}

#[test]
fn uv8_a_dead_peer_is_no_candidate_until_it_speaks() {
    let mut l = Liveness::default();
    assert!(!l.alive(0));
    l.heard(10_000, 1000);
    assert!(l.alive(14_000));
    assert!(!l.alive(14_001));
    l.heard(20_000, 500);
    assert!(l.alive(22_500));
    assert!(!l.alive(22_501));

    let mut p = peer(Some(1_500_000));
    p.alive = false;
    let peers = [p];
    let d = model().decide(&inputs(None, &peers));
    assert_eq!(d.chosen, Placement::Local);
    assert!(d.candidates.is_empty());
}

#[test]
fn uv9_interval_within_one_percent_of_the_link() {
    let r = IntervalRule::default();
    // 2000 B on a dual T1 (3.088 Mbit/s): 0.518 s.
    close((r.floor(2000, 3.088, 10.0) * 1000.0).round(), 518.0);
    // A fast link: the 0.5 s floor; a long RTT: two of them.
    close(r.floor(2000, 1000.0, 10.0), 0.5);
    close(r.floor(2000, 1000.0, 400.0), 0.8);
    // Unchanged summaries back off to 2 s; a change snaps back.
    let mut t = 0.5;
    for _ in 0..5 {
        t = r.next(t, 2000, 1000.0, 10.0, false);
    }
    close(t, 2.0);
    close(r.next(t, 2000, 1000.0, 10.0, true), 0.5);
    // A link too slow for the budget at 4 s: the budget wins, up to 60 s.
    close(r.next(2.0, 100_000, 0.1, 10.0, false), 60.0);
}

#[test]
fn a_summary_changes_on_load_nodes_and_objects() {
    let a = Summary {
        service: "s".into(),
        nodes: 2,
        avg_load: 1.0,
        lowest_load: 0.5,
        ..Summary::default()
    };
    assert!(changed(None, &a));
    let mut b = a.clone();
    b.avg_load = 1.05;
    assert!(!changed(Some(&a), &b));
    b.avg_load = 1.2;
    assert!(changed(Some(&a), &b));
    let mut c = a.clone();
    c.objects_version = 1;
    assert!(changed(Some(&a), &c));
}

#[test]
fn uv10_a_request_from_a_peer_is_served_where_it_lands() {
    let peers = [peer(Some(1_500_000))];
    let mut i = inputs(None, &peers);
    i.from_peer = true;
    i.local_load = 50.0;
    let d = model().decide(&i);
    assert_eq!(d.chosen, Placement::Local);
    assert!(!d.consulted);
}

#[test]
fn object_keys_ignore_the_query_class_keys_do_not() {
    assert_eq!(object_key("/a/b?x=1"), object_key("/a/b"));
    assert_ne!(
        summary::class_key("/burn?ms=1"),
        summary::class_key("/burn?ms=2")
    );
}

#[test]
fn the_baselines_fetch_or_redirect_whatever_the_costs() {
    let peers = [peer(Some(10_000))];
    let local_only = Model {
        mode: Mode::Local,
        ..model()
    };
    assert_eq!(
        local_only.decide(&inputs(None, &peers)).chosen,
        Placement::Fetch("p".into())
    );
    assert_eq!(
        local_only.decide(&inputs(Some(10), &peers)).chosen,
        Placement::Local
    );
    let always = Model {
        mode: Mode::Redirect,
        ..model()
    };
    assert_eq!(
        always.decide(&inputs(Some(10), &peers)).chosen,
        Placement::Redirect("p".into())
    );
}

#[test]
fn an_unmeasured_client_path_is_explored_now_and_then() {
    let mut p = peer(Some(1_500_000));
    p.client_path = None;
    let d = model().decide(&inputs(None, &[p.clone()]));
    assert_eq!(d.chosen, Placement::Fetch("p".into()));
    p.explore = true;
    let d = model().decide(&inputs(None, &[p.clone()]));
    assert_eq!(d.chosen, Placement::Redirect("p".into()));
    assert!(d.reason.starts_with("exploring"), "{}", d.reason);
    // Too small to measure anything: no exploration.
    p.holds = Some(10_000);
    assert_eq!(
        model().decide(&inputs(None, &[p])).chosen,
        Placement::Fetch("p".into())
    );
    assert!(explore_now(0) && !explore_now(1) && explore_now(EXPLORE_EVERY));
}
