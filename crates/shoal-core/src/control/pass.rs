//! The allocation pass: lease expiry, the phases of every allocation, the
//! monitors and policies, rolling updates, the shared pool, and the nodes'
//! desired apps. Each step only gathers the inputs of a shoal-core decision
//! procedure ([`crate::policy`]) and applies its output to the state.

use super::model::*;
use super::monitor::{NodeCounts, dispatch_value};
use super::{
    Command, Controller, Doc, Node, Note, Now, RenderCtx, Service, app_id, render, start_drain,
};
use crate::policy::{Action, PoolMove, PoolService, arbitrate, choose_victim, drain_done};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// What one pass changed, applied at its end in a fixed order: documents
/// first, then backend lists, then desired apps.
#[derive(Default)]
struct Changes {
    notes: Vec<Note>,
    /// Services whose allocation document changed.
    changed: BTreeSet<String>,
    /// Services whose backend list changed.
    relist: BTreeSet<String>,
    /// (node, to, from): drained nodes handed to another service.
    handoffs: Vec<(String, String, String)>,
    /// Nodes that left a service.
    released: Vec<String>,
}

impl Changes {
    fn note(&mut self, node: Option<&str>, service: &str, message: String) {
        self.notes.push(Note {
            kind: "service",
            node: node.map(str::to_string),
            service: Some(service.to_string()),
            message,
        });
    }
}

fn start_timeout_secs(spec: Option<&ServiceSpec>) -> f64 {
    spec.map_or(60.0, |x| (3.0 * x.lead_time_secs).max(60.0))
}

impl Controller {
    /// Lease expiry and, when due, the allocation pass.
    pub fn handle_timeout(&mut self, now: Now) {
        self.expire(now);
        if now.mono_ms >= self.next_pass_ms {
            self.next_pass_ms = now.mono_ms + self.cfg.pass_ms;
            self.pass(now);
            self.sync_bandwidth(now);
        }
    }

    /// Keeps the bandwidth directory's servers in step with the services'
    /// allocations and runs its due rounds. A server keeps its place in
    /// the order while its node is failed (its cap is credited to its
    /// heirs), and gets it back when it serves again; new servers join at
    /// the end, as in the backend list.
    fn sync_bandwidth(&mut self, now: Now) {
        use crate::bandwidth::Member;
        let names: Vec<String> = self.bandwidth.services().map(str::to_string).collect();
        for name in names {
            let keep = self
                .services
                .get(&name)
                .and_then(|s| s.spec.as_ref())
                .is_some_and(|s| s.bandwidth.is_some());
            if !keep {
                self.bandwidth.remove_service(&name);
            }
        }
        for (name, s) in &self.services {
            let Some(spec) = s.spec.as_ref() else {
                continue;
            };
            let Some(bw) = spec.bandwidth.as_ref() else {
                continue;
            };
            // Validated on apply; a stored definition that no longer parses
            // runs unshaped rather than panicking.
            let Ok(settings) = bw.settings(&spec.dispatch) else {
                continue;
            };
            let listed: Vec<&Allocation> = s
                .doc
                .allocs
                .iter()
                .filter(|a| a.phase != AllocPhase::Starting)
                .collect();
            let host_of = |node: &str| {
                self.nodes
                    .get(node)
                    .map(|n| n.record.registration.address.clone())
                    .unwrap_or_default()
            };
            let mut members: Vec<Member> = Vec::new();
            if let Some(st) = self.bandwidth.status(name) {
                for sv in st.servers {
                    let up = listed.iter().any(|a| a.node == sv.server);
                    let failed = self.nodes.get(&sv.server).is_some_and(|n| n.flags.failed);
                    if up || failed {
                        members.push(Member {
                            host: host_of(&sv.server),
                            server: sv.server,
                            up,
                        });
                    }
                }
            }
            for a in &listed {
                if !members.iter().any(|m| m.server == a.node) {
                    members.push(Member {
                        server: a.node.clone(),
                        host: host_of(&a.node),
                        up: true,
                    });
                }
            }
            if members.iter().all(|m| !m.up) {
                self.bandwidth.remove_service(name);
                continue;
            }
            for m in &members {
                let cap = self.nodes.get(&m.server).and_then(|n| {
                    n.record
                        .registration
                        .capacities
                        .get("net_mbps")
                        .map(|mbps| (mbps * 1e6 / 8.0) as u64)
                });
                self.bandwidth.set_host(&m.host, cap);
            }
            self.bandwidth
                .set_service(name, settings, &members, now.mono_ms);
        }
        self.bandwidth.tick(now.mono_ms);
        // Nodes take their caps with every renewal (level-triggered).
        let _ = self.bandwidth.poll_changes();
    }

    /// Declares expired leases failed, durably, and takes the failed nodes
    /// out of every backend list at once.
    fn expire(&mut self, now: Now) {
        let mut failed = self.leases.expire(now.mono_ms);
        // The lease table is a hash map: keep the command stream ordered.
        failed.sort();
        for name in failed {
            let Some(n) = self.nodes.get_mut(&name) else {
                continue;
            };
            n.flags.failed = true;
            let flags = n.flags;
            let holder = n.service.take();
            self.persist(Doc::Flags {
                node: name.clone(),
                flags,
            });
            self.note(
                "failed",
                Some(&name),
                None,
                "lease expired without renewal: node declared failed".into(),
            );
            self.dirty.insert(name.clone());
            if let Some(svc) = holder {
                self.drop_allocation(&svc, &name, "its lease expired");
            }
        }
    }

    /// Removes `node`'s allocation from `svc` at once and commits it.
    pub(super) fn drop_allocation(&mut self, svc: &str, node: &str, why: &str) {
        let Some(s) = self.services.get_mut(svc) else {
            return;
        };
        let Some(i) = s.doc.allocs.iter().position(|a| a.node == node) else {
            return;
        };
        let a = s.doc.allocs.remove(i);
        let listed = a.phase != AllocPhase::Starting;
        if let Some(n) = self.nodes.get_mut(node) {
            n.service = None;
        }
        self.dirty.insert(node.to_string());
        self.note(
            "service",
            Some(node),
            Some(svc),
            format!("{svc}: node {node} removed from the backends at once: {why}"),
        );
        self.commit(svc, listed);
    }

    fn pass(&mut self, now: Now) {
        let mut ch = Changes::default();
        self.phases(now, &mut ch);
        self.hand_over(now, &mut ch);
        let mut want = self.monitors(now, &mut ch);
        let surging = self.rolling_updates(now, &mut want, &mut ch);
        self.pool(now, &want, &surging, &mut ch);
        for name in &surging {
            // No free node came for the surge: update in place, one node at
            // a time, while at least one other node serves.
            let drains = &self.drains;
            let Some(s) = self.services.get_mut(name) else {
                continue;
            };
            if s.doc.surge {
                continue;
            }
            let Some(i) = stale_victim(s, drains) else {
                continue;
            };
            let why = to_replace(s, &s.doc.allocs[i], drains).unwrap_or_default();
            // An operator's drain goes ahead even for the last node; an
            // update waits until another node serves.
            let drained = drains.contains(&s.doc.allocs[i].node);
            if drained || s.count(AllocPhase::Serving) >= 2 {
                let node = start_drain(s, i, now, None);
                ch.note(
                    Some(&node),
                    name,
                    format!(
                        "{name}: no free node to replace {node} first; draining it in place ({why})"
                    ),
                );
                ch.changed.insert(name.clone());
                ch.relist.insert(name.clone());
            }
        }
        self.finish(now, ch);
    }

    /// Starting -> serving (or returned to the pool), draining -> released.
    fn phases(&mut self, now: Now, ch: &mut Changes) {
        let nodes = &self.nodes;
        for (name, s) in self.services.iter_mut() {
            let deleted = s.spec.is_none();
            // Every allocation's node exists (cancel and remove drop it at
            // once, restore drops strays): only phases in motion need a look.
            if !deleted && s.doc.allocs.iter().all(|a| a.phase == AllocPhase::Serving) {
                continue;
            }
            let id = app_id(name);
            let drain_timeout = s.spec.as_ref().map_or(30.0, |x| x.drain_timeout_secs);
            let start_timeout = start_timeout_secs(s.spec.as_ref());
            let views: Vec<(u64, &DispatchReport)> = s
                .reports
                .values()
                .filter(|(at, _)| now.mono_ms.saturating_sub(*at) < super::REPORT_FRESH_MS)
                .map(|(_, r)| (r.version, r))
                .collect();
            let mut keep = Vec::with_capacity(s.doc.allocs.len());
            let mut drain_now = Vec::new();
            let mut surge_failed = false;
            for mut a in std::mem::take(&mut s.doc.allocs) {
                let Some(n) = nodes.get(&a.node) else {
                    ch.note(
                        Some(&a.node),
                        name,
                        format!(
                            "{name}: node {} removed from the backends at once: it is no longer registered",
                            a.node
                        ),
                    );
                    ch.changed.insert(name.clone());
                    if a.phase != AllocPhase::Starting {
                        ch.relist.insert(name.clone());
                    }
                    continue;
                };
                let elapsed = now.unix_ms.saturating_sub(a.since_ms) as f64 / 1000.0;
                match a.phase {
                    AllocPhase::Starting if deleted => {
                        ch.note(
                            Some(&a.node),
                            name,
                            format!("{name}: deleted; start of {} cancelled", a.node),
                        );
                        ch.changed.insert(name.clone());
                        ch.released.push(a.node);
                        continue;
                    }
                    AllocPhase::Starting => {
                        // Only states of the apps the agent was told to
                        // run: an older report may still show the previous
                        // instance of the same app id.
                        let current = n.applied.is_none_or(|g| g >= n.record.generation);
                        let app = n.apps.iter().find(|x| x.id == id).filter(|_| current);
                        match app.map(|x| x.state) {
                            Some(AppState::Running) => {
                                a.phase = AllocPhase::Serving;
                                a.since_ms = now.unix_ms;
                                ch.note(
                                    Some(&a.node),
                                    name,
                                    format!(
                                        "{name}: {} serving at {} after {elapsed:.1} s; added to the backends",
                                        a.node, a.address
                                    ),
                                );
                                ch.changed.insert(name.clone());
                                ch.relist.insert(name.clone());
                            }
                            Some(AppState::Failed) => {
                                ch.note(
                                    Some(&a.node),
                                    name,
                                    format!(
                                        "{name}: app failed on {}: {}; node returned to the pool",
                                        a.node,
                                        app.and_then(|x| x.message.clone()).unwrap_or_default()
                                    ),
                                );
                                ch.changed.insert(name.clone());
                                ch.released.push(a.node);
                                surge_failed = true;
                                continue;
                            }
                            _ if elapsed > start_timeout => {
                                ch.note(
                                    Some(&a.node),
                                    name,
                                    format!(
                                        "{name}: {} not running after {elapsed:.0} s; node returned to the pool",
                                        a.node
                                    ),
                                );
                                ch.changed.insert(name.clone());
                                ch.released.push(a.node);
                                surge_failed = true;
                                continue;
                            }
                            _ => {}
                        }
                    }
                    AllocPhase::Serving if deleted => drain_now.push(keep.len()),
                    AllocPhase::Serving => {}
                    AllocPhase::Draining => {
                        let dv = a.drain_version.unwrap_or(0);
                        let in_flight = views.iter().map(|(v, r)| {
                            let n = r
                                .backends
                                .iter()
                                .filter(|b| b.address == a.address)
                                .map(|b| b.in_flight)
                                .sum::<u32>();
                            (*v, n)
                        });
                        // A streaming server counts its own listeners
                        // (connections no dispatcher sees, as listeners
                        // are redirected to it): it drains until they
                        // have left or moved, or the timeout.
                        let own = n
                            .apps
                            .iter()
                            .find(|x| x.id == id)
                            .and_then(|x| x.stream.as_ref())
                            .map(|st| (dv, st.listeners.min(u64::from(u32::MAX)) as u32));
                        let in_flight = in_flight.chain(own);
                        if let Some(why) = drain_done(elapsed, drain_timeout, dv, in_flight) {
                            ch.note(
                                Some(&a.node),
                                name,
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
                                ch.handoffs.push((a.node.clone(), to, name.clone()));
                            }
                            ch.changed.insert(name.clone());
                            ch.relist.insert(name.clone());
                            ch.released.push(a.node);
                            continue;
                        }
                    }
                }
                keep.push(a);
            }
            s.doc.allocs = keep;
            if surge_failed && s.doc.surge {
                // The replacement never came up: try again from scratch.
                s.doc.surge = false;
            }
            for i in drain_now {
                let node = start_drain(s, i, now, None);
                ch.note(
                    Some(&node),
                    name,
                    format!("{name}: deleted; draining {node}"),
                );
                ch.changed.insert(name.clone());
                ch.relist.insert(name.clone());
            }
        }
        self.settle_released(ch);
    }

    /// Nodes the pass took out of a service hold nothing now.
    fn settle_released(&mut self, ch: &mut Changes) {
        for node in std::mem::take(&mut ch.released) {
            if let Some(n) = self.nodes.get_mut(&node) {
                n.service = None;
            }
            self.dirty.insert(node);
        }
    }

    /// Handed-off nodes go straight to their receiver, so nobody else grabs
    /// them from the pool.
    fn hand_over(&mut self, now: Now, ch: &mut Changes) {
        for (node, to, from) in std::mem::take(&mut ch.handoffs) {
            let fits = self.nodes.get(&node).is_some_and(|n| {
                n.service.is_none()
                    && available(n)
                    && self
                        .services
                        .get(&to)
                        .and_then(|s| s.spec.as_ref())
                        .is_some_and(|spec| fits(n, spec))
            });
            if fits && self.allocate(now, &to, &node, &format!("taken from {from}"), ch) {
                ch.changed.insert(to);
            }
        }
    }

    /// Brings `free` up to date for the nodes changed since the last pass.
    fn refresh_free(&mut self) {
        for name in &self.dirty {
            match self.nodes.get(name) {
                Some(n) if n.service.is_none() && available(n) => {
                    self.free.insert(name.clone());
                }
                _ => {
                    self.free.remove(name);
                }
            }
        }
    }

    /// Runs every due monitor and its policy; returns each stepped service's
    /// desired node count.
    fn monitors(&mut self, now: Now, ch: &mut Changes) -> BTreeMap<String, u32> {
        let t = now.secs();
        let mut want = BTreeMap::new();
        let nodes = &self.nodes;
        for (name, s) in self.services.iter_mut() {
            let Some(spec) = s.spec.as_ref() else {
                continue;
            };
            if !s.monitor.as_ref().is_some_and(|m| m.due(t)) {
                continue;
            }
            let mut util = std::mem::take(&mut s.util);
            let usage = measure(s, spec, nodes, now, &mut util);
            s.util = util;
            // A rolling update's extra node is not the policy's: it sees
            // the allocation as it was, so neither the ceiling nor a quiet
            // load releases the surge before it has replaced a stale node.
            let surge = u32::from(s.doc.surge);
            let ready = s.count(AllocPhase::Serving).saturating_sub(surge);
            let allocated = (s.count(AllocPhase::Serving) + s.count(AllocPhase::Starting))
                .saturating_sub(surge);
            let counts = NodeCounts {
                allocated,
                ready,
                min: spec.min_nodes,
                max: spec.max_nodes,
            };
            let Some(m) = s.monitor.as_mut() else {
                continue;
            };
            let d = match m.step(t, now.unix_ms, usage, counts) {
                Ok(d) => d,
                Err(e) => {
                    let why = format!("policy cannot decide: {e}");
                    if s.last_decision.as_deref() != Some(why.as_str()) {
                        ch.note(None, name, format!("{name}: {why}"));
                        s.last_decision = Some(why);
                    }
                    continue;
                }
            };
            if now.mono_ms >= s.history_due_ms {
                s.history_due_ms = now.mono_ms + self.cfg.history_every_ms;
                let skip = m.series().len().saturating_sub(self.cfg.history_len);
                let points = m.series().skip(skip).cloned().collect();
                self.out.push_back(Command::Persist(Doc::History {
                    service: name.clone(),
                    points,
                }));
            }
            let policy = m.policy_name().to_string();
            want.insert(name.clone(), d.apply(allocated));
            if d.action != Action::Hold {
                self.decisions += 1;
                ch.notes.push(Note {
                    kind: "decision",
                    node: None,
                    service: Some(name.clone()),
                    message: format!("{name}: {policy}: {:?}: {}", d.action, d.reason)
                        .to_lowercase(),
                });
                s.last_decision = Some(d.reason.clone());
            }
            if let Action::Release(k) = d.action
                && !s.doc.surge
            {
                for _ in 0..k {
                    // A node still starting serves nobody: cancel it first.
                    if let Some(i) = s
                        .doc
                        .allocs
                        .iter()
                        .rposition(|a| a.phase == AllocPhase::Starting)
                    {
                        let a = s.doc.allocs.remove(i);
                        ch.note(
                            Some(&a.node),
                            name,
                            format!("{name}: start of {} cancelled ({})", a.node, d.reason),
                        );
                        ch.changed.insert(name.clone());
                        ch.released.push(a.node);
                        continue;
                    }
                    // An out-of-date node goes first during a rolling update.
                    let Some(i) = stale_victim(s, &self.drains).or_else(|| victim(s)) else {
                        break;
                    };
                    let u = s
                        .util
                        .get(&s.doc.allocs[i].node)
                        .copied()
                        .unwrap_or(f64::NAN);
                    let node = start_drain(s, i, now, None);
                    ch.note(
                        Some(&node),
                        name,
                        format!(
                            "{name}: draining {node} (least utilized, {:.0}%) before release",
                            u * 100.0
                        ),
                    );
                    ch.changed.insert(name.clone());
                    ch.relist.insert(name.clone());
                }
            }
        }
        self.settle_released(ch);
        want
    }

    /// Rolling updates (one node at a time, the new instance serving before
    /// an old one drains): a service whose app changed asks the pool for
    /// one extra node; once it serves, one out-of-date node drains. Returns
    /// the services asking for a surge node this pass.
    fn rolling_updates(
        &mut self,
        now: Now,
        want: &mut BTreeMap<String, u32>,
        ch: &mut Changes,
    ) -> BTreeSet<String> {
        let mut surging = BTreeSet::new();
        let drains = &self.drains;
        for (name, s) in self.services.iter_mut() {
            if s.spec.is_none() {
                continue;
            }
            let stale = s
                .doc
                .allocs
                .iter()
                .filter(|a| a.phase != AllocPhase::Draining && to_replace(s, a, drains).is_some())
                .count();
            if stale == 0 {
                if s.doc.surge {
                    s.doc.surge = false;
                    ch.changed.insert(name.clone());
                    ch.note(None, name, format!("{name}: rolling update done"));
                }
                continue;
            }
            let busy = s.doc.allocs.iter().any(|a| a.phase != AllocPhase::Serving);
            if busy {
                continue;
            }
            if s.doc.surge {
                if let Some(i) = stale_victim(s, drains) {
                    let why = to_replace(s, &s.doc.allocs[i], drains).unwrap_or_default();
                    let node = start_drain(s, i, now, None);
                    s.doc.surge = false;
                    ch.note(
                        Some(&node),
                        name,
                        if stale == 1 {
                            format!(
                                "{name}: a new instance serves; draining {node} ({why}), the last to replace; rolling update done"
                            )
                        } else {
                            format!(
                                "{name}: rolling update: a new instance serves; draining {node} ({why}; {} left to replace)",
                                stale - 1
                            )
                        },
                    );
                    ch.changed.insert(name.clone());
                    ch.relist.insert(name.clone());
                }
                continue;
            }
            let held = s.doc.allocs.len() as u32;
            let w = want.entry(name.clone()).or_insert(held);
            *w = (*w).max(held + 1);
            surging.insert(name.clone());
        }
        surging
    }

    /// The shared pool: who gets free nodes, who gives one up.
    fn pool(
        &mut self,
        now: Now,
        want: &BTreeMap<String, u32>,
        surging: &BTreeSet<String>,
        ch: &mut Changes,
    ) {
        self.refresh_free();
        let mut incoming: HashMap<&str, u32> = HashMap::new();
        for s in self.services.values() {
            for a in &s.doc.allocs {
                if let Some(to) = a.handoff_to.as_deref() {
                    *incoming.entry(to).or_default() += 1;
                }
            }
        }
        let held = |name: &str, s: &Service| {
            s.doc
                .allocs
                .iter()
                .filter(|a| a.phase != AllocPhase::Draining)
                .count() as u32
                + incoming.get(name).copied().unwrap_or(0)
        };
        let shortfall: u32 = want
            .iter()
            .filter_map(|(n, w)| Some(w.saturating_sub(held(n, self.services.get(n)?))))
            .sum();
        if shortfall == 0 {
            return;
        }
        let free_count = self.free.len();
        // Donors' nodes are only named when the pool cannot cover the need.
        let named = (free_count as u32) < shortfall;
        let pool: Vec<PoolService> = self
            .services
            .iter()
            .filter_map(|(name, s)| {
                let spec = s.spec.as_ref()?;
                let h = held(name, s);
                let mut nodes: Vec<(String, f64)> = Vec::with_capacity(h as usize);
                for a in s
                    .doc
                    .allocs
                    .iter()
                    .filter(|a| a.phase != AllocPhase::Draining)
                {
                    nodes.push(if named && a.phase == AllocPhase::Serving {
                        let u = s.util.get(&a.node).copied().unwrap_or(f64::NAN);
                        (a.node.clone(), u)
                    } else {
                        (String::new(), 0.0)
                    });
                }
                nodes.resize(h as usize, (String::new(), 0.0));
                Some(PoolService {
                    name: name.clone(),
                    priority: spec.priority,
                    desired: want.get(name).copied().unwrap_or(h),
                    min_nodes: spec.min_nodes,
                    nodes,
                })
            })
            .collect();
        let moves = arbitrate(&pool, free_count as u32);
        self.decisions += moves.len() as u64;
        let mut taken: BTreeSet<String> = BTreeSet::new();
        for m in moves {
            match m {
                PoolMove::FromPool { to } => {
                    let Some(spec) = self.services.get(&to).and_then(|s| s.spec.as_ref()) else {
                        continue;
                    };
                    let mut got = false;
                    let mut refused = 0;
                    let names = self.candidates(spec, &taken);
                    let role = spec.role.clone();
                    let how = if surging.contains(&to) {
                        "from the free pool, for a rolling update"
                    } else {
                        "from the free pool"
                    };
                    for n in names {
                        taken.insert(n.clone());
                        if self.allocate(now, &to, &n, how, ch) {
                            got = true;
                            break;
                        }
                        refused += 1;
                    }
                    let Some(s) = self.services.get_mut(&to) else {
                        continue;
                    };
                    if got {
                        ch.changed.insert(to.clone());
                        if surging.contains(&to) {
                            s.doc.surge = true;
                        }
                    } else {
                        let why = format!(
                            "wants a node but no free node fits (role {:?}{})",
                            role.as_deref().unwrap_or("any"),
                            if refused > 0 {
                                format!(", {refused} refused its address")
                            } else {
                                String::new()
                            }
                        );
                        if s.last_decision.as_deref() != Some(why.as_str()) {
                            ch.note(None, &to, format!("{to}: {why}"));
                        }
                        s.last_decision = Some(why);
                    }
                }
                PoolMove::Take {
                    node,
                    from,
                    to,
                    reason,
                } => {
                    let Some(s) = self.services.get_mut(&from) else {
                        continue;
                    };
                    let Some(i) = s.doc.allocs.iter().position(|a| a.node == node) else {
                        continue;
                    };
                    start_drain(s, i, now, Some(to.clone()));
                    ch.note(
                        Some(&node),
                        &from,
                        format!("{from}: draining {node} to hand it to {to}: {reason}"),
                    );
                    ch.changed.insert(from.clone());
                    ch.relist.insert(from);
                }
            }
        }
    }

    /// Adds a starting allocation of `node` to service `name`. Refuses (with
    /// a note) a node whose rendered backend address another allocation
    /// already has, or whose app does not render.
    fn allocate(&mut self, now: Now, name: &str, node: &str, how: &str, ch: &mut Changes) -> bool {
        let Some(n) = self.nodes.get(node) else {
            return false;
        };
        let Some(s) = self.services.get(name) else {
            return false;
        };
        let Some(spec) = s.spec.as_ref() else {
            return false;
        };
        let ctx = render_ctx(name, s, spec, n);
        let (address, app) = match render(spec, &ctx) {
            Ok(r) => r,
            Err(e) => {
                ch.note(
                    Some(node),
                    name,
                    format!("{name}: cannot render the app for {node}: {e}"),
                );
                return false;
            }
        };
        let host = &n.record.registration.address;
        let clash = if address.contains(host.as_str()) {
            // Only nodes on the same host render the same address.
            self.hosts
                .get(host)
                .into_iter()
                .flatten()
                .filter(|m| m.as_str() != node)
                .filter_map(|m| {
                    let svc = self.nodes.get(m)?.service.as_ref()?;
                    let s = self.services.get(svc)?;
                    Some((svc, s.doc.allocs.iter().find(|a| a.node == *m)?))
                })
                .find(|(_, a)| a.address == address)
        } else {
            self.services
                .iter()
                .flat_map(|(sn, s)| s.doc.allocs.iter().map(move |a| (sn, a)))
                .find(|(_, a)| a.address == address)
        };
        if let Some((other, a)) = clash {
            ch.note(
                Some(node),
                name,
                format!(
                    "{name}: not placing on {node}: its backend {address} is already {other}'s on {} (give each node its own --address)",
                    a.node
                ),
            );
            return false;
        }
        ch.note(
            Some(node),
            name,
            format!("{name}: allocating {node} ({how}); backend {address}"),
        );
        let Some(s) = self.services.get_mut(name) else {
            return false;
        };
        s.doc.allocs.push(Allocation {
            node: node.to_string(),
            address,
            phase: AllocPhase::Starting,
            since_ms: now.unix_ms,
            drain_version: None,
            handoff_to: None,
            app: Some(app),
            app_epoch: s.doc.app_epoch,
        });
        if let Some(n) = self.nodes.get_mut(node) {
            n.service = Some(name.to_string());
        }
        self.dirty.insert(node.to_string());
        true
    }

    /// Writes what the pass changed, forgets drained-out services, and
    /// brings the nodes' desired apps in line with the allocations.
    fn finish(&mut self, now: Now, mut ch: Changes) {
        self.settle_released(&mut ch);
        let notes = std::mem::take(&mut ch.notes);
        self.out.extend(notes.into_iter().map(Command::Note));
        for name in &ch.changed {
            self.commit(name, ch.relist.contains(name));
        }
        for name in ch
            .relist
            .difference(&ch.changed)
            .cloned()
            .collect::<Vec<_>>()
        {
            self.commit(&name, true);
        }
        let gone: Vec<String> = self
            .services
            .iter()
            .filter(|(_, s)| s.spec.is_none() && s.doc.allocs.is_empty())
            .map(|(n, _)| n.clone())
            .collect();
        for n in gone {
            self.services.remove(&n);
            self.persist(Doc::AllocationDeleted(n.clone()));
            self.note(
                "service",
                None,
                Some(&n),
                format!("{n}: deleted and drained out"),
            );
        }
        if now.mono_ms >= self.next_full_ms {
            self.next_full_ms = now.mono_ms + self.cfg.full_reconcile_ms;
            self.dirty.extend(self.nodes.keys().cloned());
        }
        self.refresh_free();
        for node in std::mem::take(&mut self.dirty) {
            self.reconcile(&node);
        }
    }

    /// Level-triggered: the node's desired apps are its hand-assigned apps
    /// plus the app of the service that holds it, if any.
    fn reconcile(&mut self, node: &str) {
        let Some(n) = self.nodes.get(node) else {
            return;
        };
        let mut apps: Vec<AppAssignment> = n
            .record
            .desired
            .iter()
            .filter(|a| !a.id.starts_with(super::APP_PREFIX))
            .cloned()
            .collect();
        if let Some(svc) = n.service.clone() {
            let app = self.service_app(&svc, node);
            apps.extend(app);
        }
        self.set_desired(node, apps);
    }

    /// The app `node` runs for `svc`: rendered when it was allocated (an
    /// allocation restored from an older store is rendered now).
    fn service_app(&mut self, svc: &str, node: &str) -> Option<AppAssignment> {
        let n = self.nodes.get(node)?;
        let s = self.services.get(svc)?;
        let i = s.doc.allocs.iter().position(|a| a.node == node)?;
        if let Some(app) = &s.doc.allocs[i].app {
            return Some(app.clone());
        }
        let spec = s.spec.as_ref()?;
        let rendered = render(spec, &render_ctx(svc, s, spec, n));
        match rendered {
            Ok((_, app)) => {
                let s = self.services.get_mut(svc)?;
                s.doc.allocs[i].app = Some(app.clone());
                s.doc.allocs[i].app_epoch = s.doc.app_epoch;
                Some(app)
            }
            Err(e) => {
                self.note(
                    "service",
                    Some(node),
                    Some(svc),
                    format!("{svc}: cannot render the app for {node}: {e}"),
                );
                None
            }
        }
    }
}

/// How many fitting free nodes the allocator compares by load: bounded so
/// a pass stays cheap on a pool of thousands (every free node is compared
/// while there are fewer).
const CANDIDATES: usize = 64;

impl Controller {
    /// Free nodes that fit `spec` and are not `taken`, best first: the least
    /// loaded of the first [`CANDIDATES`] by name, then the rest by name.
    fn candidates(&self, spec: &ServiceSpec, taken: &BTreeSet<String>) -> Vec<String> {
        let mut c: Vec<(&Node, f64)> = self
            .free
            .iter()
            .filter(|n| !taken.contains(*n))
            .filter_map(|n| self.nodes.get(n))
            .filter(|n| fits(n, spec))
            .take(CANDIDATES)
            .map(|n| (n, n.load.as_ref().map_or(0.0, |l| l.cpu)))
            .collect();
        c.sort_by(|a, b| {
            a.1.total_cmp(&b.1).then(
                a.0.record
                    .registration
                    .name
                    .cmp(&b.0.record.registration.name),
            )
        });
        c.into_iter()
            .map(|(n, _)| n.record.registration.name.clone())
            .collect()
    }
}

/// Whether a node may take a new allocation: not failed (its lease is
/// alive; the controller's invariants check that the two agree) and not
/// cordoned.
pub(super) fn available(n: &Node) -> bool {
    !n.flags.failed && !n.flags.cordoned
}

/// Whether a node's role and ports let it serve `spec`: it holds the role,
/// and none of its hand-assigned apps listens on the service's port.
fn fits(n: &Node, spec: &ServiceSpec) -> bool {
    let reg = &n.record.registration;
    if spec.role.as_ref().is_some_and(|r| !reg.roles.contains(r)) {
        return false;
    }
    let Some(port) = spec.app.port else {
        return true;
    };
    !n.record
        .desired
        .iter()
        .filter(|a| !a.id.starts_with(super::APP_PREFIX))
        .flat_map(|a| a.params.iter())
        .filter(|(k, _)| matches!(k.as_str(), "listen" | "endpoint"))
        .any(|(_, v)| {
            v.rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .is_some_and(|p| p == port)
        })
}

fn render_ctx(name: &str, s: &Service, spec: &ServiceSpec, n: &Node) -> RenderCtx {
    let reg = &n.record.registration;
    let mut ctx = RenderCtx {
        node_name: reg.name.clone(),
        node_address: reg.address.clone(),
        port: spec.app.port,
        service: name.to_string(),
        app_id: app_id(name),
        first_server: String::new(),
    };
    // The first serving node; else the first one starting (nodes
    // allocated in one pass relay from the first of them, not from
    // themselves: icecast's relay retries until its master serves).
    let other = |phase: AllocPhase| {
        s.doc
            .allocs
            .iter()
            .find(|a| a.phase == phase && a.node != reg.name)
    };
    ctx.first_server = other(AllocPhase::Serving)
        .or_else(|| other(AllocPhase::Starting))
        .map(|a| a.address.clone())
        .unwrap_or_else(|| {
            // The first server relays from nobody: itself.
            render(spec, &ctx).map(|(b, _)| b).unwrap_or_default()
        });
    ctx
}

/// The summed load of a service's listed nodes; `util` gets each serving
/// node's utilization (0..1; NaN when unknown, which [`choose_victim`]
/// treats as busy).
fn measure(
    s: &Service,
    spec: &ServiceSpec,
    nodes: &BTreeMap<String, Node>,
    now: Now,
    util: &mut BTreeMap<String, f64>,
) -> f64 {
    let kind = spec.metric.kind;
    let by_address: HashMap<&str, f64> = match kind {
        MetricKind::DispatchActive | MetricKind::DispatchRps => {
            let mut m: HashMap<&str, f64> = HashMap::new();
            for r in s.fresh_reports(now) {
                for b in &r.backends {
                    let v = dispatch_value(kind, b);
                    if v.is_finite() && v >= 0.0 {
                        *m.entry(b.address.as_str()).or_default() += v;
                    }
                }
            }
            m
        }
        _ => HashMap::new(),
    };
    let mut usage = 0.0;
    let before = util.len();
    let mut kept = 0;
    for a in s
        .doc
        .allocs
        .iter()
        .filter(|a| a.phase != AllocPhase::Starting)
    {
        let v = match kind {
            MetricKind::DispatchActive | MetricKind::DispatchRps => {
                by_address.get(a.address.as_str()).copied()
            }
            MetricKind::Net | MetricKind::Cpu => {
                let load = nodes.get(&a.node).and_then(|n| n.load.as_ref());
                super::monitor::node_metric(kind, load, &a.address, [])
            }
        };
        if let Some(v) = v {
            usage += v;
        }
        if a.phase == AllocPhase::Serving {
            let u = v.map_or(f64::NAN, |v| v / spec.metric.capacity);
            // Update in place: no allocation per node and step.
            match util.get_mut(&a.node) {
                Some(x) => *x = u,
                None => {
                    util.insert(a.node.clone(), u);
                }
            }
            kept += 1;
        }
    }
    if util.len() != kept || before > kept {
        util.retain(|n, _| {
            s.doc
                .allocs
                .iter()
                .any(|a| a.phase == AllocPhase::Serving && a.node == *n)
        });
    }
    // An empty f64 sum is -0.0.
    usage + 0.0
}

/// The serving node to release: the least utilized. When the app relays
/// from `{{ first_server }}` (LAMA's RelayFrom), a node whose address
/// another allocation's app was rendered with is a source of the others
/// and is not released: those relays would lose the stream. (Allocations
/// are not kept in allocation order, so "the first serving one" is not
/// the master; the rendered parameters say who relays from whom.)
fn victim(s: &Service) -> Option<usize> {
    let relays = s
        .spec
        .as_ref()
        .is_some_and(|spec| spec.app.params.values().any(|v| v.contains("first_server")));
    let is_source = |addr: &str| {
        relays
            && s.doc.allocs.iter().any(|b| {
                b.address != addr
                    && b.app
                        .as_ref()
                        .is_some_and(|app| app.params.values().any(|v| v == addr))
            })
    };
    choose_victim(
        s.doc
            .allocs
            .iter()
            .enumerate()
            .filter(|(_, a)| a.phase == AllocPhase::Serving && !is_source(&a.address))
            .map(|(i, a)| (i, s.util.get(&a.node).copied().unwrap_or(f64::NAN))),
    )
}

/// Why an allocation must be replaced, if it must: its app is out of date
/// (a rolling update), or an operator drains its node.
fn to_replace(s: &Service, a: &Allocation, drains: &BTreeSet<String>) -> Option<&'static str> {
    if !drains.is_empty() && drains.contains(&a.node) {
        Some("drained by an operator")
    } else if a.app_epoch < s.doc.app_epoch {
        Some("its app is out of date")
    } else {
        None
    }
}

/// The least utilized serving node that must be replaced.
fn stale_victim(s: &Service, drains: &BTreeSet<String>) -> Option<usize> {
    choose_victim(
        s.doc
            .allocs
            .iter()
            .enumerate()
            .filter(|(_, a)| a.phase == AllocPhase::Serving && to_replace(s, a, drains).is_some())
            .map(|(i, a)| (i, s.util.get(&a.node).copied().unwrap_or(f64::NAN))),
    )
}
