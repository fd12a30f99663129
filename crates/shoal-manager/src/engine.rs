//! The reallocation engine (LAMA Fig. 6, Oceano's shared pool): every tick
//! it moves allocations through their phases (starting -> serving ->
//! draining -> released), runs each service's monitor and shoal-core
//! policy once per sampling period, arbitrates the shared pool with
//! [`arbitrate`], and reconciles the nodes' desired apps with the
//! allocations through the registry.
//!
//! Every decision procedure is shoal-core's ([`Policy`](shoal_core::policy::Policy)
//! via [`Monitor`](crate::monitor::Monitor), [`choose_victim`],
//! [`arbitrate`], [`drain_done`]); this file only gathers their inputs and
//! applies their outputs. Allocation state is written to the store before
//! the nodes are told, and the node reconcile is level-triggered, so a
//! crash between the two is repaired on the next tick after a restart.

use crate::monitor::{REPORT_FRESH_SECS, node_metric};
use crate::services::{AllocDoc, RenderCtx, Services, Svc, app_id, render};
use crate::state::Registry;
use shoal_core::policy::{Action, PoolMove, PoolService, arbitrate, choose_victim, drain_done};
use shoal_net::wire::*;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

/// Apps whose id starts with this belong to services; the engine owns them.
pub const APP_PREFIX: &str = "svc-";

/// How often the engine looks; each service decides once per its period.
pub const TICK: Duration = Duration::from_millis(250);

/// Runs the engine forever.
pub async fn run(registry: Arc<Registry>, services: Arc<Services>) {
    let mut t = tokio::time::interval(TICK);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        t.tick().await;
        tick(&registry, &services);
    }
}

fn fresh_reports(s: &Svc) -> Vec<&DispatchReport> {
    s.reports
        .values()
        .filter(|r| r.at.elapsed().as_secs_f64() < REPORT_FRESH_SECS)
        .map(|r| &r.report)
        .collect()
}

/// Utilization (0..1) of an allocation's node; NaN when unknown (treated as
/// busy by [`choose_victim`]).
fn utilization(s: &Svc, a: &Allocation, nodes: &BTreeMap<String, NodeStatus>) -> f64 {
    let Some(spec) = &s.spec else {
        return f64::NAN;
    };
    let reports = fresh_reports(s);
    node_metric(
        spec.metric.kind,
        nodes.get(&a.node).and_then(|n| n.load.as_ref()),
        &a.address,
        reports,
    )
    .map(|v| v / spec.metric.capacity)
    .unwrap_or(f64::NAN)
}

/// Starts draining allocation `i` of `s`; returns its node.
fn start_drain(s: &mut Svc, i: usize, now_ms: u64, to: Option<String>) -> String {
    let v = s.doc.version + 1;
    let a = &mut s.doc.allocs[i];
    a.phase = AllocPhase::Draining;
    a.since_ms = now_ms;
    a.drain_version = Some(v);
    a.handoff_to = to;
    a.node.clone()
}

/// One pass of the engine.
pub fn tick(reg: &Registry, svcs: &Services) {
    let nodes: BTreeMap<String, NodeStatus> = reg
        .nodes()
        .into_iter()
        .map(|n| (n.name.clone(), n))
        .collect();
    let now_ms = unix_ms();
    let t = reg.now_ms() as f64 / 1000.0;
    let mut g = svcs.lock();
    // Services whose backend list changed (version bump + notify) and whose
    // allocation doc changed (persist).
    let mut list_changed: BTreeSet<String> = BTreeSet::new();
    let mut doc_changed: BTreeSet<String> = BTreeSet::new();
    let mut handoffs: Vec<(String, String, String)> = Vec::new();
    let mut events: Vec<(String, Option<String>, String)> = Vec::new();
    let mut ev = |kind: &str, node: Option<&str>, msg: String| {
        events.push((kind.to_string(), node.map(str::to_string), msg));
    };

    // 1. Phases: failures, start-up, drains.
    for (name, s) in g.iter_mut() {
        let id = app_id(name);
        let spec = s.spec.clone();
        let drain_timeout = spec.as_ref().map_or(30.0, |x| x.drain_timeout_secs);
        let start_timeout = spec
            .as_ref()
            .map_or(60.0, |x| (3.0 * x.lead_time_secs).max(60.0));
        let reports: Vec<(u64, DispatchReport)> = fresh_reports(s)
            .into_iter()
            .map(|r| (r.version, r.clone()))
            .collect();
        let mut keep = Vec::with_capacity(s.doc.allocs.len());
        let allocs = std::mem::take(&mut s.doc.allocs);
        let mut drain_now = Vec::new();
        for mut a in allocs {
            let node = nodes.get(&a.node);
            let listed = a.phase != AllocPhase::Starting;
            match node {
                Some(n) if n.state == LeaseState::Alive => {}
                other => {
                    let why = if other.is_some() {
                        "its lease expired"
                    } else {
                        "it is no longer registered"
                    };
                    ev(
                        "service",
                        Some(&a.node),
                        format!(
                            "{name}: node {} removed from the backends at once: {why}",
                            a.node
                        ),
                    );
                    doc_changed.insert(name.clone());
                    if listed {
                        list_changed.insert(name.clone());
                    }
                    continue;
                }
            }
            let n = node.expect("alive checked above");
            let app = n.apps.iter().find(|x| x.id == id);
            let elapsed = now_ms.saturating_sub(a.since_ms) as f64 / 1000.0;
            match a.phase {
                AllocPhase::Starting if spec.is_none() => {
                    ev(
                        "service",
                        Some(&a.node),
                        format!("{name}: deleted; start of {} cancelled", a.node),
                    );
                    doc_changed.insert(name.clone());
                    continue;
                }
                AllocPhase::Starting => match app.map(|x| x.state) {
                    Some(AppState::Running) => {
                        a.phase = AllocPhase::Serving;
                        a.since_ms = now_ms;
                        ev(
                            "service",
                            Some(&a.node),
                            format!(
                                "{name}: {} serving at {} after {elapsed:.1} s; added to the backends",
                                a.node, a.address
                            ),
                        );
                        doc_changed.insert(name.clone());
                        list_changed.insert(name.clone());
                    }
                    Some(AppState::Failed) => {
                        ev(
                            "service",
                            Some(&a.node),
                            format!(
                                "{name}: app failed on {}: {}; node returned to the pool",
                                a.node,
                                app.and_then(|x| x.message.clone()).unwrap_or_default()
                            ),
                        );
                        doc_changed.insert(name.clone());
                        continue;
                    }
                    _ if elapsed > start_timeout => {
                        ev(
                            "service",
                            Some(&a.node),
                            format!(
                                "{name}: {} not running after {elapsed:.0} s; node returned to the pool",
                                a.node
                            ),
                        );
                        doc_changed.insert(name.clone());
                        continue;
                    }
                    _ => {}
                },
                AllocPhase::Serving if spec.is_none() => drain_now.push(keep.len()),
                AllocPhase::Serving => {}
                AllocPhase::Draining => {
                    let dv = a.drain_version.unwrap_or(0);
                    let views = reports.iter().map(|(v, r)| {
                        let inflight = r
                            .backends
                            .iter()
                            .filter(|b| b.address == a.address)
                            .map(|b| b.in_flight)
                            .sum::<u32>();
                        (*v, inflight)
                    });
                    if let Some(why) = drain_done(elapsed, drain_timeout, dv, views) {
                        ev(
                            "service",
                            Some(&a.node),
                            format!(
                                "{name}: {} released after draining {elapsed:.1} s ({why:?}){}",
                                a.node,
                                a.handoff_to
                                    .as_deref()
                                    .map(|t| format!("; handed to {t}"))
                                    .unwrap_or_else(|| "; returned to the pool".into())
                            ),
                        );
                        if let Some(to) = a.handoff_to.take() {
                            handoffs.push((a.node.clone(), to, name.clone()));
                        }
                        doc_changed.insert(name.clone());
                        list_changed.insert(name.clone());
                        continue;
                    }
                }
            }
            keep.push(a);
        }
        s.doc.allocs = keep;
        for i in drain_now {
            let node = start_drain(s, i, now_ms, None);
            ev(
                "service",
                Some(&node),
                format!("{name}: deleted; draining {node}"),
            );
            doc_changed.insert(name.clone());
            list_changed.insert(name.clone());
        }
    }

    // Handed-off nodes go straight to their receiver, so nobody else grabs
    // them from the pool.
    for (node, to, from) in handoffs {
        if let Some(n) = nodes.get(&node)
            && let Some(s) = g.get_mut(&to)
            && let Some(spec) = s.spec.clone()
            && spec.role.as_ref().is_none_or(|r| n.roles.contains(r))
            && allocate(
                &to,
                s,
                &spec,
                n,
                now_ms,
                &mut ev,
                &format!("taken from {from}"),
            )
        {
            doc_changed.insert(to.clone());
        }
    }

    // 2. Monitor and policy, once per sampling period per service.
    let mut want: HashMap<String, u32> = HashMap::new();
    for (name, s) in g.iter_mut() {
        let Some(spec) = s.spec.clone() else { continue };
        if !s.monitor.as_ref().is_some_and(|m| m.due(t)) {
            continue;
        }
        let usage: f64 = s
            .doc
            .allocs
            .iter()
            .filter(|a| a.phase != AllocPhase::Starting)
            .filter_map(|a| {
                node_metric(
                    spec.metric.kind,
                    nodes.get(&a.node).and_then(|n| n.load.as_ref()),
                    &a.address,
                    fresh_reports(s),
                )
            })
            .sum::<f64>()
            + 0.0; // an empty f64 sum is -0.0
        let count = |p: AllocPhase| s.doc.allocs.iter().filter(|a| a.phase == p).count() as u32;
        let ready = count(AllocPhase::Serving);
        let allocated = ready + count(AllocPhase::Starting);
        let Some(m) = s.monitor.as_mut() else {
            continue;
        };
        let d = match m.step(
            t,
            now_ms,
            usage,
            allocated,
            ready,
            spec.min_nodes,
            spec.max_nodes,
        ) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(service = %name, "policy: {e}");
                continue;
            }
        };
        let policy = m.policy_name().to_string();
        want.insert(name.clone(), d.apply(allocated));
        if d.action != Action::Hold {
            ev(
                "decision",
                None,
                format!("{name}: {policy}: {:?}: {}", d.action, d.reason).to_lowercase(),
            );
            s.last_decision = Some(d.reason.clone());
        }
        if let Action::Release(k) = d.action {
            for _ in 0..k {
                // A node still starting serves nobody: cancel it first.
                if let Some(i) = s
                    .doc
                    .allocs
                    .iter()
                    .rposition(|a| a.phase == AllocPhase::Starting)
                {
                    let a = s.doc.allocs.remove(i);
                    ev(
                        "service",
                        Some(&a.node),
                        format!("{name}: start of {} cancelled ({})", a.node, d.reason),
                    );
                    doc_changed.insert(name.clone());
                    continue;
                }
                let victim = choose_victim(
                    s.doc
                        .allocs
                        .iter()
                        .enumerate()
                        .filter(|(_, a)| a.phase == AllocPhase::Serving)
                        .map(|(i, a)| (i, utilization(s, a, &nodes)))
                        .collect::<Vec<_>>(),
                );
                let Some(i) = victim else { break };
                let util = utilization(s, &s.doc.allocs[i], &nodes);
                let node = start_drain(s, i, now_ms, None);
                ev(
                    "service",
                    Some(&node),
                    format!(
                        "{name}: draining {node} (least utilized, {:.0}%) before release",
                        util * 100.0
                    ),
                );
                doc_changed.insert(name.clone());
                list_changed.insert(name.clone());
            }
        }
    }

    // 3. The shared pool: who gets free nodes, who gives one up.
    if !want.is_empty() {
        let used: BTreeSet<&str> = g
            .values()
            .flat_map(|s| s.doc.allocs.iter().map(|a| a.node.as_str()))
            .collect();
        let free: Vec<&NodeStatus> = nodes
            .values()
            .filter(|n| n.state == LeaseState::Alive && !used.contains(n.name.as_str()))
            .collect();
        let incoming: HashMap<&str, usize> = g
            .values()
            .flat_map(|s| s.doc.allocs.iter().filter_map(|a| a.handoff_to.as_deref()))
            .fold(HashMap::new(), |mut m, to| {
                *m.entry(to).or_default() += 1;
                m
            });
        let pool: Vec<PoolService> = g
            .iter()
            .filter_map(|(name, s)| {
                let spec = s.spec.as_ref()?;
                let mut held: Vec<(String, f64)> = s
                    .doc
                    .allocs
                    .iter()
                    .filter(|a| a.phase != AllocPhase::Draining)
                    .map(|a| match a.phase {
                        AllocPhase::Serving => (a.node.clone(), utilization(s, a, &nodes)),
                        _ => (String::new(), 0.0),
                    })
                    .collect();
                held.extend(
                    (0..incoming.get(name.as_str()).copied().unwrap_or(0))
                        .map(|_| (String::new(), 0.0)),
                );
                let desired = want.get(name).copied().unwrap_or(held.len() as u32);
                Some(PoolService {
                    name: name.clone(),
                    priority: spec.priority,
                    desired,
                    min_nodes: spec.min_nodes,
                    nodes: held,
                })
            })
            .collect();
        let moves = arbitrate(&pool, free.len() as u32);
        let mut taken: BTreeSet<String> = BTreeSet::new();
        for m in moves {
            match m {
                PoolMove::FromPool { to } => {
                    let Some(s) = g.get_mut(&to) else { continue };
                    let Some(spec) = s.spec.clone() else { continue };
                    // Best free node: the role fits, then the least loaded.
                    let pick = free
                        .iter()
                        .filter(|n| !taken.contains(&n.name))
                        .filter(|n| spec.role.as_ref().is_none_or(|r| n.roles.contains(r)))
                        .min_by(|a, b| {
                            let la = a.load.as_ref().map_or(0.0, |l| l.cpu);
                            let lb = b.load.as_ref().map_or(0.0, |l| l.cpu);
                            la.total_cmp(&lb).then(a.name.cmp(&b.name))
                        });
                    let Some(n) = pick else {
                        s.last_decision = Some(format!(
                            "wants a node but no free node has role {:?}",
                            spec.role.as_deref().unwrap_or("-")
                        ));
                        continue;
                    };
                    taken.insert(n.name.clone());
                    if allocate(&to, s, &spec, n, now_ms, &mut ev, "from the free pool") {
                        doc_changed.insert(to.clone());
                    }
                }
                PoolMove::Take {
                    node,
                    from,
                    to,
                    reason,
                } => {
                    let Some(s) = g.get_mut(&from) else { continue };
                    let Some(i) = s.doc.allocs.iter().position(|a| a.node == node) else {
                        continue;
                    };
                    start_drain(s, i, now_ms, Some(to.clone()));
                    ev(
                        "service",
                        Some(&node),
                        format!("{from}: draining {node} to hand it to {to}: {reason}"),
                    );
                    doc_changed.insert(from.clone());
                    list_changed.insert(from.clone());
                }
            }
        }
    }

    // Persist before anyone (agents, dispatchers) is told.
    for name in &doc_changed {
        let Some(s) = g.get_mut(name) else { continue };
        if list_changed.contains(name) {
            s.doc.version += 1;
        }
        let doc: AllocDoc = s.doc.clone();
        if let Err(e) = svcs.persist(name, &doc) {
            tracing::error!(service = %name, "cannot persist allocations: {e}");
        }
    }
    // A deleted service that has drained out is forgotten.
    let gone: Vec<String> = g
        .iter()
        .filter(|(_, s)| s.spec.is_none() && s.doc.allocs.is_empty())
        .map(|(n, _)| n.clone())
        .collect();
    for n in gone {
        if svcs.forget(&n).is_ok() {
            g.remove(&n);
            ev("service", None, format!("{n}: deleted and drained out"));
        }
    }

    // 4. Level-triggered node reconcile: every node's desired apps match
    // the allocations (service apps added where allocated, removed where not).
    let assignments = reconcile_nodes(&g, &nodes, &mut ev);
    drop(g);
    for (node, apps) in assignments {
        if let Err(e) = reg.assign(&node, apps) {
            tracing::warn!(node = %node, "assign: {e}");
        }
    }
    for (kind, node, msg) in events {
        reg.event(&kind, node.as_deref(), msg);
    }
    if !list_changed.is_empty() {
        svcs.notify();
    }
}

/// Adds a starting allocation of `n` to `s`.
fn allocate(
    name: &str,
    s: &mut Svc,
    spec: &ServiceSpec,
    n: &NodeStatus,
    now_ms: u64,
    ev: &mut impl FnMut(&str, Option<&str>, String),
    how: &str,
) -> bool {
    let ctx = render_ctx(name, s, spec, n);
    match render(spec, &ctx) {
        Ok((address, _)) => {
            ev(
                "service",
                Some(&n.name),
                format!("{name}: allocating {} ({how}); backend {address}", n.name),
            );
            s.doc.allocs.push(Allocation {
                node: n.name.clone(),
                address,
                phase: AllocPhase::Starting,
                since_ms: now_ms,
                drain_version: None,
                handoff_to: None,
            });
            true
        }
        Err(e) => {
            ev(
                "service",
                Some(&n.name),
                format!("{name}: cannot render the app for {}: {e}", n.name),
            );
            false
        }
    }
}

fn render_ctx(name: &str, s: &Svc, spec: &ServiceSpec, n: &NodeStatus) -> RenderCtx {
    let mut ctx = RenderCtx {
        node_name: n.name.clone(),
        node_address: n.address.clone(),
        port: spec.app.port,
        service: name.to_string(),
        app_id: app_id(name),
        first_server: String::new(),
    };
    ctx.first_server = s
        .doc
        .allocs
        .iter()
        .find(|a| a.phase == AllocPhase::Serving && a.node != n.name)
        .map(|a| a.address.clone())
        .unwrap_or_else(|| {
            // The first server relays from nobody: itself.
            crate::services::render(spec, &ctx)
                .map(|(b, _)| b)
                .unwrap_or_default()
        });
    ctx
}

/// The desired-app lists that differ from what the nodes have.
fn reconcile_nodes(
    g: &BTreeMap<String, Svc>,
    nodes: &BTreeMap<String, NodeStatus>,
    ev: &mut impl FnMut(&str, Option<&str>, String),
) -> Vec<(String, Vec<AppAssignment>)> {
    let mut out = Vec::new();
    for n in nodes.values() {
        let mine: Vec<(&String, &Svc)> = g
            .iter()
            .filter(|(_, s)| s.doc.allocs.iter().any(|a| a.node == n.name))
            .collect();
        let ids: BTreeSet<String> = mine.iter().map(|(name, _)| app_id(name)).collect();
        let mut apps: Vec<AppAssignment> = n
            .desired
            .iter()
            .filter(|a| !a.id.starts_with(APP_PREFIX) || ids.contains(&a.id))
            .cloned()
            .collect();
        for (name, s) in mine {
            let id = app_id(name);
            if apps.iter().any(|a| a.id == id) {
                continue;
            }
            let Some(spec) = &s.spec else { continue };
            match render(spec, &render_ctx(name, s, spec, n)) {
                Ok((_, a)) => apps.push(a),
                Err(e) => ev(
                    "service",
                    Some(&n.name),
                    format!("{name}: cannot render the app for {}: {e}", n.name),
                ),
            }
        }
        if apps != n.desired {
            out.push((n.name.clone(), apps));
        }
    }
    out
}
