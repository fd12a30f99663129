//! The controller's life cycle, driven by hand: each test is a scenario of
//! the reallocation papers (LAMA Fig. 6, Oceano Fig. 1) or an operator's
//! action, with the commands it must produce.

use super::*;

/// A controller with a store it writes to, and a clock.
struct Rig {
    ctl: Controller,
    t: u64,
    store: BTreeMap<String, String>,
    published: Vec<BackendList>,
    notes: Vec<Note>,
    /// Nodes that stopped renewing (crashed).
    down: BTreeSet<String>,
}

const UNIX0: u64 = 1_700_000_000_000;

impl Rig {
    fn new() -> Self {
        Self {
            ctl: Controller::new(Config::default()),
            t: 0,
            store: BTreeMap::new(),
            published: Vec::new(),
            notes: Vec::new(),
            down: BTreeSet::new(),
        }
    }

    fn now(&self) -> Now {
        Now {
            mono_ms: self.t,
            unix_ms: UNIX0 + self.t,
        }
    }

    fn drain(&mut self) -> Vec<Command> {
        let mut v = Vec::new();
        while let Some(c) = self.ctl.poll() {
            match &c {
                Command::Persist(d) => {
                    let key = match d {
                        Doc::Allocation { service, .. } => format!("alloc/{service}"),
                        Doc::Flags { node, .. } => format!("flags/{node}"),
                        Doc::Desired { node, .. } => format!("desired/{node}"),
                        other => format!("{other:?}").chars().take(30).collect(),
                    };
                    self.store.insert(key, format!("{d:?}"));
                }
                Command::Publish(l) => self.published.push(l.clone()),
                Command::Note(n) => self.notes.push(n.clone()),
            }
            v.push(c);
        }
        v
    }

    fn input(&mut self, i: Input) -> Result<Reply, ControlError> {
        let now = self.now();
        let r = self.ctl.handle(now, i);
        self.drain();
        r
    }

    fn node(&mut self, name: &str, address: &str) {
        self.input(Input::Register(Registration {
            name: name.into(),
            address: address.into(),
            roles: vec!["web".into()],
            capacities: BTreeMap::new(),
        }))
        .unwrap();
    }

    /// Every live node renews; apps it is told to run report `state`.
    fn renew_all(&mut self, state: AppState) {
        let now = self.now();
        for n in self.ctl.nodes(now) {
            if self.down.contains(&n.name) {
                continue;
            }
            let apps = n
                .desired
                .iter()
                .map(|a| AppStatus {
                    id: a.id.clone(),
                    adaptor: a.adaptor.clone(),
                    state,
                    pid: None,
                    restarts: 0,
                    endpoint: None,
                    message: None,
                    bandwidth: None,
                    stream: None,
                })
                .collect();
            self.input(Input::Renew {
                node: n.name.clone(),
                load: None,
                apps,
                applied: None,
            })
            .unwrap();
        }
    }

    /// Advances the clock in passes, nodes renewing with running apps.
    fn run(&mut self, ms: u64) {
        let end = self.t + ms;
        while self.t < end {
            self.t += 250;
            self.renew_all(AppState::Running);
            let now = self.now();
            self.ctl.handle_timeout(now);
            self.drain();
            assert_eq!(self.ctl.check_invariants(), Vec::<String>::new());
        }
    }

    fn report(&mut self, service: &str, active: f64) {
        let list = self.ctl.backend_list(service).unwrap();
        let backends = list
            .backends
            .iter()
            .map(|b| BackendLoad {
                address: b.address.clone(),
                active: if b.draining { 0.0 } else { active },
                in_flight: 0,
                rps: 0.0,
            })
            .collect();
        self.input(Input::Report {
            service: service.into(),
            report: DispatchReport {
                dispatcher: "d1".into(),
                version: list.version,
                backends,
                federation: None,
            },
        })
        .unwrap();
    }

    fn serving(&self, s: &str) -> Vec<String> {
        self.ctl.service_status(s).unwrap().serving
    }
}

impl Rig {
    /// The node stops renewing.
    fn crash(&mut self, n: &str) {
        self.down.insert(n.to_string());
    }

    /// Rebuilds the controller from the store, as a restarted manager does.
    fn restart(&mut self, restored: Restored) {
        self.t += 1000;
        let now = self.now();
        self.ctl = Controller::restore(Config::default(), now, restored);
        self.drain();
    }
}

fn spec(name: &str, min: u32, max: u32, priority: u32) -> ServiceSpec {
    serde_json::from_value(serde_json::json!({
        "name": name, "min_nodes": min, "max_nodes": max, "priority": priority,
        "lead_time_secs": 1.0, "drain_timeout_secs": 5.0, "period_secs": 1.0,
        "app": {"adaptor": "www", "port": 8081,
                "params": {"listen": "{{ node_address }}:{{ port }}", "root": "/srv/{{ service }}"}},
        "metric": {"kind": "dispatch_active", "capacity": 10.0},
    }))
    .unwrap()
}

#[test]
fn a_service_gets_its_floor_and_serves_once_its_app_runs() {
    let mut r = Rig::new();
    for i in 1..=3 {
        r.node(&format!("n{i}"), &format!("10.0.0.{i}"));
    }
    assert_eq!(
        r.input(Input::ApplyService(spec("web", 2, 3, 0))).unwrap(),
        Reply::Applied { created: true }
    );
    r.run(500);
    let st = r.ctl.service_status("web").unwrap();
    assert_eq!(st.serving.len(), 2, "{st:?}");
    // Persisted before it was published: every Publish follows the write
    // of the allocation it lists.
    let list = r.ctl.backend_list("web").unwrap();
    assert_eq!(list.backends.len(), 2);
    assert!(list.backends.iter().all(|b| b.address.ends_with(":8081")));
    let desired = r.ctl.node(&list.backends[0].node, r.now()).unwrap().desired;
    assert_eq!(desired[0].id, "svc-web");
    assert_eq!(desired[0].params["root"], "/srv/web");
}

#[test]
fn an_expired_lease_leaves_the_list_in_the_same_step_and_stays_failed_across_a_restart() {
    let mut r = Rig::new();
    for i in 1..=3 {
        r.node(&format!("n{i}"), &format!("10.0.0.{i}"));
    }
    r.input(Input::ApplyService(spec("web", 2, 2, 0))).unwrap();
    r.run(1000);
    let victim = r.serving("web")[0].clone();
    r.crash(&victim);
    // Just before the TTL nothing changes; at it the node is out at once.
    r.run(5500);
    assert!(r.serving("web").contains(&victim));
    r.t += 750;
    let now = r.now();
    r.ctl.handle_timeout(now);
    let cmds = r.drain();
    let flags_at = cmds
        .iter()
        .position(|c| matches!(c, Command::Persist(Doc::Flags { node, flags }) if *node == victim && flags.failed))
        .expect("failure persisted");
    let publish_at = cmds
        .iter()
        .position(|c| matches!(c, Command::Publish(l) if l.service == "web"))
        .expect("list published");
    assert!(flags_at < publish_at, "{cmds:?}");
    let list = r.ctl.backend_list("web").unwrap();
    assert!(list.backends.iter().all(|b| b.node != victim), "{list:?}");
    // The spare node replaces it.
    r.run(3000);
    assert_eq!(r.serving("web").len(), 2);
    // A restart from the store keeps the failure: no grace lease for it.
    let nodes = r.ctl.nodes(r.now());
    let restored = Restored {
        nodes: nodes
            .iter()
            .map(|n| {
                (
                    NodeRecord {
                        registration: Registration {
                            name: n.name.clone(),
                            address: n.address.clone(),
                            roles: n.roles.clone(),
                            capacities: BTreeMap::new(),
                        },
                        desired: n.desired.clone(),
                        generation: 1,
                    },
                    r.ctl.flags(&n.name).unwrap(),
                )
            })
            .collect(),
        services: vec![r.ctl.spec("web").unwrap().clone()],
        allocations: vec![("web".into(), r.ctl.allocations("web").unwrap().clone())],
        histories: Vec::new(),
    };
    let before = r.ctl.allocations("web").unwrap().clone();
    r.restart(restored);
    assert_eq!(
        r.ctl.node(&victim, r.now()).unwrap().state,
        LeaseState::Failed
    );
    assert_eq!(r.ctl.allocations("web").unwrap(), &before);
    assert!(r.notes.iter().any(|n| n.message.contains("1 still failed")));
    // Until it renews again.
    r.down.clear();
    r.run(500);
    assert_eq!(
        r.ctl.node(&victim, r.now()).unwrap().state,
        LeaseState::Alive
    );
}

#[test]
fn a_higher_priority_service_takes_an_idle_node_through_a_drain_when_the_pool_is_empty() {
    // Oceano Fig. 1: two services share a full pool.
    let mut r = Rig::new();
    for i in 1..=4 {
        r.node(&format!("n{i}"), &format!("10.0.0.{i}"));
    }
    r.input(Input::ApplyService(spec("low", 1, 4, 0))).unwrap();
    r.input(Input::ApplyService(spec("high", 1, 4, 5))).unwrap();
    // low grows onto the free nodes while high is quiet.
    for _ in 0..20 {
        r.report("low", 9.5);
        r.report("high", 1.0);
        r.run(1000);
    }
    assert_eq!(r.serving("low").len(), 3, "{:?}", r.ctl.statuses());
    assert_eq!(r.ctl.free_count(), 0);
    // high's demand rises: it takes one of low's nodes, drained first.
    let mut took = false;
    for _ in 0..20 {
        r.report("low", 2.0);
        r.report("high", 9.8);
        r.run(1000);
        took |= r
            .notes
            .iter()
            .any(|n| n.message.contains("to hand it to high"));
        if r.serving("high").len() == 2 {
            break;
        }
    }
    assert!(took, "{:#?}", r.notes);
    assert_eq!(r.serving("high").len(), 2, "{:?}", r.ctl.statuses());
    assert!(r.serving("low").len() <= 2);
}

#[test]
fn a_changed_app_rolls_one_node_at_a_time_new_before_old() {
    let mut r = Rig::new();
    for i in 1..=4 {
        r.node(&format!("n{i}"), &format!("10.0.0.{i}"));
    }
    r.input(Input::ApplyService(spec("web", 2, 2, 0))).unwrap();
    r.run(1000);
    let old: Vec<String> = r.serving("web");
    assert_eq!(old.len(), 2);
    let mut v2 = spec("web", 2, 2, 0);
    v2.app.params.insert("root".into(), "/srv/v2".into());
    r.input(Input::ApplyService(v2)).unwrap();
    let mut min_serving = usize::MAX;
    for _ in 0..80 {
        r.report("web", 1.0);
        r.run(250);
        min_serving = min_serving.min(r.serving("web").len());
    }
    // Never fewer serving than before, and every node runs the new app.
    assert_eq!(min_serving, 2);
    let doc = r.ctl.allocations("web").unwrap();
    assert_eq!(doc.allocs.len(), 2, "{doc:?}");
    assert!(!doc.surge);
    for a in &doc.allocs {
        assert_eq!(a.app.as_ref().unwrap().params["root"], "/srv/v2");
    }
    assert!(
        r.notes
            .iter()
            .any(|n| n.message.contains("rolling update done"))
    );
}

#[test]
fn cordon_drain_and_remove_follow_kubectl() {
    let mut r = Rig::new();
    for i in 1..=3 {
        r.node(&format!("n{i}"), &format!("10.0.0.{i}"));
    }
    r.input(Input::Cordon("n1".into())).unwrap();
    r.input(Input::ApplyService(spec("web", 2, 2, 0))).unwrap();
    r.run(1000);
    let serving = r.serving("web");
    assert!(!serving.contains(&"n1".to_string()), "{serving:?}");
    r.input(Input::Uncordon("n1".into())).unwrap();
    r.input(Input::Drain("n2".into())).unwrap();
    r.run(6000);
    let serving = r.serving("web");
    assert!(!serving.contains(&"n2".to_string()), "{serving:?}");
    assert_eq!(serving.len(), 2);
    assert!(r.ctl.flags("n2").unwrap().cordoned);
    // A failed node is removed and forgotten; an alive one too, with a
    // note that says what that costs.
    r.crash("n2");
    r.run(7000);
    r.input(Input::Remove("n2".into())).unwrap();
    assert!(r.ctl.node("n2", r.now()).is_none());
    let holder = r.serving("web")[0].clone();
    r.input(Input::Remove(holder.clone())).unwrap();
    assert!(!r.serving("web").contains(&holder));
    assert!(
        r.notes
            .iter()
            .any(|n| n.message.contains("removed while alive"))
    );
    assert_eq!(r.ctl.check_invariants(), Vec::<String>::new());
}

#[test]
fn nodes_sharing_a_host_never_publish_one_backend_twice_nor_take_a_used_port() {
    let mut r = Rig::new();
    r.node("a", "127.0.0.1");
    r.node("b", "127.0.0.1");
    r.node("c", "127.0.0.2");
    r.node("d", "127.0.0.3");
    // d runs a hand-assigned app on the service's port.
    let mut p = Params::new();
    p.insert("listen".into(), "127.0.0.3:8081".into());
    p.insert("root".into(), "/srv/x".into());
    r.input(Input::AssignApps {
        node: "d".into(),
        apps: vec![AppAssignment {
            id: "mine".into(),
            adaptor: "www".into(),
            params: p,
        }],
    })
    .unwrap();
    r.input(Input::ApplyService(spec("web", 4, 4, 0))).unwrap();
    r.run(2000);
    let list = r.ctl.backend_list("web").unwrap();
    let mut addrs: Vec<&str> = list.backends.iter().map(|b| b.address.as_str()).collect();
    addrs.sort();
    assert_eq!(addrs, ["127.0.0.1:8081", "127.0.0.2:8081"], "{list:?}");
    assert!(list.backends.iter().all(|b| b.node != "d"));
    assert!(
        r.notes
            .iter()
            .any(|n| n.message.contains("is already web's")),
        "{:#?}",
        r.notes
    );
    // Hand-assigned apps cannot take the services' prefix.
    let e = r
        .input(Input::AssignApps {
            node: "c".into(),
            apps: vec![AppAssignment {
                id: "svc-x".into(),
                adaptor: "www".into(),
                params: Params::new(),
            }],
        })
        .unwrap_err();
    assert!(e.to_string().contains("reserved"), "{e}");
}

#[test]
fn the_invariant_check_fires_on_a_state_it_must_not_accept() {
    // A store holding more allocations than the ceiling (written by hand,
    // or by an older version): the check says so until the policy fixes it.
    let mut r = Rig::new();
    let reg = |n: &str| NodeRecord {
        registration: Registration {
            name: n.into(),
            address: format!("10.1.0.{}", n.len()),
            roles: vec![],
            capacities: BTreeMap::new(),
        },
        desired: vec![],
        generation: 0,
    };
    let alloc = |n: &str| Allocation {
        node: n.into(),
        address: format!("{n}:8081"),
        phase: AllocPhase::Serving,
        since_ms: UNIX0,
        drain_version: None,
        handoff_to: None,
        app: None,
        app_epoch: 0,
    };
    r.restart(Restored {
        nodes: vec![
            (reg("x"), NodeFlags::default()),
            (reg("yy"), NodeFlags::default()),
        ],
        services: vec![spec("web", 1, 1, 0)],
        allocations: vec![(
            "web".into(),
            AllocDoc {
                version: 3,
                allocs: vec![alloc("x"), alloc("yy")],
                app_epoch: 0,
                surge: false,
            },
        )],
        histories: vec![],
    });
    let v = r.ctl.check_invariants();
    assert!(v.iter().any(|x| x.contains("above max_nodes")), "{v:?}");
}

#[test]
fn a_renewal_that_has_applied_the_generation_gets_no_desired_state_back() {
    let mut r = Rig::new();
    r.node("n1", "10.0.0.1");
    r.input(Input::ApplyService(spec("web", 1, 1, 0))).unwrap();
    r.run(500);
    let renew = |r: &mut Rig, applied| match r
        .input(Input::Renew {
            node: "n1".into(),
            load: None,
            apps: Vec::new(),
            applied,
        })
        .unwrap()
    {
        Reply::Renewed(resp) => resp,
        other => panic!("{other:?}"),
    };
    // A fresh agent (nothing applied) and one a generation behind get the
    // whole desired state.
    let full = renew(&mut r, None);
    assert!(!full.unchanged);
    assert_eq!(full.desired.len(), 1);
    let behind = renew(&mut r, Some(full.generation - 1));
    assert!(!behind.unchanged);
    assert_eq!(behind.desired, full.desired);
    // One that applied it gets the lease and the generation only; on the
    // wire the flag is left out when false, so older agents read it.
    let same = renew(&mut r, Some(full.generation));
    assert!(same.unchanged && same.desired.is_empty());
    assert_eq!(same.generation, full.generation);
    let json = serde_json::to_value(&behind).unwrap();
    assert!(json.get("unchanged").is_none(), "{json}");
    // A change of the node's apps brings the new state back at once.
    let mut p = Params::new();
    p.insert("root".into(), "/srv/x".into());
    r.input(Input::AssignApps {
        node: "n1".into(),
        apps: vec![AppAssignment {
            id: "mine".into(),
            adaptor: "www".into(),
            params: p,
        }],
    })
    .unwrap();
    let next = renew(&mut r, Some(full.generation));
    assert!(!next.unchanged && next.generation > full.generation);
    assert_eq!(next.desired.len(), 2);
}

/// Nodes renew reporting their service app's egress and the caps their
/// last renewal gave them (as agents with `--shape-dev` do).
fn renew_shaped(r: &mut Rig, caps: &mut BTreeMap<String, u64>, offered: &dyn Fn(&str) -> f64) {
    let now = r.now();
    for n in r.ctl.nodes(now) {
        if r.down.contains(&n.name) {
            continue;
        }
        let apps = n
            .desired
            .iter()
            .map(|a| AppStatus {
                id: a.id.clone(),
                adaptor: a.adaptor.clone(),
                state: AppState::Running,
                pid: None,
                restarts: 0,
                endpoint: None,
                message: None,
                bandwidth: Some(AppBandwidth {
                    offered_bps: offered(&n.name),
                    sent_bps: 0.0,
                    cap_bps: caps.get(&n.name).copied(),
                }),
                stream: None,
            })
            .collect();
        let reply = r
            .input(Input::Renew {
                node: n.name.clone(),
                load: None,
                apps,
                applied: None,
            })
            .unwrap();
        if let Reply::Renewed(resp) = reply
            && let Some(c) = resp.caps.get("svc-web")
        {
            caps.insert(n.name.clone(), *c);
        }
    }
}

#[test]
fn bandwidth_follows_demand_and_a_failed_servers_share_goes_to_the_next_r() {
    let mut r = Rig::new();
    for i in 1..=4 {
        r.node(&format!("n{i}"), &format!("10.0.0.{i}"));
    }
    let mut s = spec("web", 4, 4, 0);
    s.dispatch.replicas = 2;
    s.bandwidth = Some(BandwidthSpec {
        total: "10.8 MB/s".into(),
        alpha: 0.9,
        interval: "3s".into(),
        floor: None,
    });
    r.input(Input::ApplyService(s)).unwrap();
    r.run(1000);
    let mut caps = BTreeMap::new();
    let order: Vec<String> = r
        .ctl
        .service_status("web")
        .unwrap()
        .bandwidth
        .unwrap()
        .servers
        .iter()
        .map(|s| s.server.clone())
        .collect();
    assert_eq!(order.len(), 4);
    let hot = order[0].clone();
    let demand = move |n: &str| if n == hot { 6e6 } else { 1.6e6 };
    for _ in 0..40 {
        r.t += 250;
        renew_shaped(&mut r, &mut caps, &demand);
        let now = r.now();
        r.ctl.handle_timeout(now);
        r.drain();
        let bw = r.ctl.service_status("web").unwrap().bandwidth.unwrap();
        assert!(bw.in_force_bps <= bw.total_bps, "{bw:?}");
        assert!(caps.values().sum::<u64>() <= bw.total_bps, "{caps:?}");
    }
    // The hot server's cap rose above the fair 2.7 MB/s, the total held.
    let bw = r.ctl.service_status("web").unwrap().bandwidth.unwrap();
    assert!(bw.servers[0].cap_bps > 2_900_000, "{bw:?}");
    assert_eq!(
        bw.servers.iter().map(|s| s.target_bps).sum::<u64>(),
        10_800_000
    );
    // The first server fails: within the pass that declares it failed its
    // cap goes half each to the next two, the total unchanged.
    let mut before: Vec<u64> = bw.servers.iter().map(|s| s.target_bps).collect();
    r.crash(&order[0]);
    let mut t_fail = None;
    for _ in 0..40 {
        r.t += 250;
        renew_shaped(&mut r, &mut caps, &demand);
        let now = r.now();
        r.ctl.handle_timeout(now);
        r.drain();
        let bw = r.ctl.service_status("web").unwrap().bandwidth.unwrap();
        if !bw.servers[0].up {
            t_fail = Some(r.t);
            let c: Vec<u64> = bw.servers.iter().map(|s| s.cap_bps).collect();
            let half = before[0] / 2;
            assert_eq!(c[0], 0);
            // Exactly the compensation, or one EMA round after it when a
            // round fell in the same pass.
            let near = |a: u64, b: u64| a.abs_diff(b) <= b / 20;
            assert!(near(c[1], before[1] + half), "{c:?} from {before:?}");
            assert!(near(c[2], before[2] + half), "{c:?} from {before:?}");
            assert!(near(c[3], before[3]), "{c:?} from {before:?}");
            assert_eq!(c.iter().sum::<u64>(), 10_800_000);
            break;
        }
        before = bw.servers.iter().map(|s| s.target_bps).collect();
    }
    assert!(t_fail.is_some(), "the failure was never seen");
}
