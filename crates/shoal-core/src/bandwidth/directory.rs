//! The resource directory (thesis 3.4.2) with the resource-allocation
//! agent (3.3.2) inside it: each service's bound, each server's allocation
//! and measured use, each host's capacity. Every change is validated
//! against the service's bound and the host's capacity before it is in the
//! directory; what is in the directory is what nodes enforce.
//!
//! Level-triggered: a server's entry has the cap granted (what its node
//! must enforce), the cap its node last acknowledged (`applied`) and the
//! target of the running reallocation. A reduction is granted at once; an
//! increase only when the caps in force (the larger of granted and
//! acknowledged, 0 for a failed server) leave room under the bound, so it
//! waits until the reductions it needs are acknowledged. A lost message is
//! repaired by the next report.

use super::{Credit, Settings, Spread, compensate, format_rate, give_back, proportional, smooth};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};

/// A server as the caller lists it: in the dispatcher's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The server's name (a node, or a backend address).
    pub server: String,
    /// The host it runs on (whose capacity bounds it).
    pub host: String,
    /// Alive; a failed server keeps its place in the order.
    pub up: bool,
}

/// A cap that changed in the directory, for the node that enforces it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapChange {
    /// The service.
    pub service: String,
    /// The server.
    pub server: String,
    /// Its host.
    pub host: String,
    /// The new cap, bytes/s.
    pub cap: u64,
}

/// A change the directory refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirectoryError {
    /// No such service with a bandwidth bound.
    #[error("service {0:?} has no [bandwidth] total; add one to its file")]
    UnknownService(String),
    /// No such server in the service.
    #[error("server {server:?} is not one of service {service:?}'s servers")]
    UnknownServer {
        /// The service.
        service: String,
        /// The server.
        server: String,
    },
    /// The caps in force would exceed the service's bound.
    #[error(
        "service {service:?}: the caps in force would sum to {} over its bound {}; lower other servers first (and wait for their acknowledgement)",
        format_rate(*would_be as f64),
        format_rate(*bound as f64)
    )]
    OverBound {
        /// The service.
        service: String,
        /// The sum after the change.
        would_be: u64,
        /// The service's total.
        bound: u64,
    },
    /// The host could not supply it.
    #[error(
        "host {host:?}: its caps would sum to {} over its capacity {}; the host cannot supply this server (move it, or split it into a nested cluster)",
        format_rate(*would_be as f64),
        format_rate(*capacity as f64)
    )]
    OverHost {
        /// The host.
        host: String,
        /// The sum after the change.
        would_be: u64,
        /// The host's capacity.
        capacity: u64,
    },
    /// The server has failed; its cap went to its heirs.
    #[error(
        "server {server:?} of service {service:?} has failed; its cap is credited to the servers that took its work until it returns"
    )]
    Failed {
        /// The service.
        service: String,
        /// The server.
        server: String,
    },
    /// Below the service's floor.
    #[error(
        "service {service:?}: {} is below the floor {}",
        format_rate(*cap as f64),
        format_rate(*floor as f64)
    )]
    BelowFloor {
        /// The service.
        service: String,
        /// The cap asked for.
        cap: u64,
        /// The floor.
        floor: u64,
    },
}

#[derive(Debug, Clone)]
struct Server {
    name: String,
    host: String,
    up: bool,
    granted: u64,
    applied: Option<u64>,
    target: u64,
    demand: f64,
    sum_u: f64,
    n_u: u32,
    offered: Option<f64>,
}

impl Server {
    /// What may be in force now: the larger of granted and acknowledged
    /// (a reduction not yet applied still counts at its old value); a
    /// failed server sends nothing.
    fn in_force(&self) -> u64 {
        if !self.up {
            0
        } else {
            self.granted.max(self.applied.unwrap_or(self.granted))
        }
    }
}

/// What a failed server handed to its heirs: its cap (`amount`, split as
/// `given`) and its demand estimate, moved in the same proportion so that
/// the next rounds of eq. 3.2 keep the heirs' larger share.
#[derive(Debug, Clone)]
struct CreditRec {
    amount: u64,
    given: Vec<(String, u64)>,
    demand: f64,
}

#[derive(Debug, Clone)]
struct Service {
    settings: Settings,
    servers: Vec<Server>,
    /// Failed servers' credits, by the failed server's name.
    credits: BTreeMap<String, CreditRec>,
    next_round_ms: Option<u64>,
    rounds: u64,
    last_change: Option<String>,
}

/// A server's entry, as `shoal describe service` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerStatus {
    /// The server.
    pub server: String,
    /// Its host.
    pub host: String,
    /// Alive.
    pub up: bool,
    /// The cap in the directory, bytes/s.
    pub cap_bps: u64,
    /// The cap its node last said it enforces.
    pub applied_bps: Option<u64>,
    /// Where the running reallocation takes it.
    pub target_bps: u64,
    /// Smoothed demand d (eq. 3.1), bytes/s.
    pub demand_bps: f64,
    /// Last measured offered rate (sent plus dropped), bytes/s.
    pub offered_bps: Option<f64>,
}

/// A service's bandwidth, as `shoal describe service` and `shoal status
/// --json` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceBandwidth {
    /// The bound BW, bytes/s.
    pub total_bps: u64,
    /// Eq. 3.1's alpha.
    pub alpha: f64,
    /// Reallocation interval, ms.
    pub interval_ms: u64,
    /// The floor, bytes/s.
    pub floor_bps: u64,
    /// Where a failed server's cap goes.
    pub spread: String,
    /// The sum of the caps in force (never above the bound).
    pub in_force_bps: u64,
    /// A reallocation is waiting for acknowledgements.
    pub pending: bool,
    /// Reallocation rounds so far.
    pub rounds: u64,
    /// The last change, in a sentence.
    pub last_change: Option<String>,
    /// The servers, in the dispatcher's order.
    pub servers: Vec<ServerStatus>,
}

/// A host's entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostStatus {
    /// The host.
    pub host: String,
    /// Its egress capacity, bytes/s, when known.
    pub capacity_bps: Option<u64>,
    /// The caps in force on it, all services.
    pub allocated_bps: u64,
}

/// The directory: see the module documentation.
#[derive(Debug, Clone, Default)]
pub struct Directory {
    services: BTreeMap<String, Service>,
    hosts: BTreeMap<String, Option<u64>>,
    changes: VecDeque<CapChange>,
}

impl Directory {
    /// An empty directory.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets a host's egress capacity (None: unknown, unbounded).
    pub fn set_host(&mut self, host: &str, capacity: Option<u64>) {
        self.hosts.insert(host.to_string(), capacity);
    }

    /// The services with a bandwidth bound.
    pub fn services(&self) -> impl Iterator<Item = &str> {
        self.services.keys().map(String::as_str)
    }

    /// Forgets a service (deleted, or its `[bandwidth]` removed).
    pub fn remove_service(&mut self, name: &str) {
        self.services.remove(name);
    }

    /// Sets a service's settings and its servers in the dispatcher's order
    /// (level-triggered: call it whenever either may have changed). New
    /// servers get a share by eq. 3.2 at the mean demand; servers gone from
    /// the list give theirs back; a server that fails has its cap credited
    /// to its heirs at once, and a server that returns gets it back.
    pub fn set_service(&mut self, name: &str, settings: Settings, members: &[Member], now_ms: u64) {
        let svc = self
            .services
            .entry(name.to_string())
            .or_insert_with(|| Service {
                settings,
                servers: Vec::new(),
                credits: BTreeMap::new(),
                next_round_ms: None,
                rounds: 0,
                last_change: None,
            });
        let total_changed = svc.settings.total != settings.total;
        if svc.settings != settings {
            svc.settings = settings;
        }
        if svc.next_round_ms.is_none() {
            svc.next_round_ms = Some(now_ms + settings.interval_ms);
        }
        let old: BTreeMap<String, Server> =
            svc.servers.drain(..).map(|s| (s.name.clone(), s)).collect();
        let known_demand: Vec<f64> = old.values().filter(|s| s.up).map(|s| s.demand).collect();
        let fresh_demand = if known_demand.is_empty() {
            settings.total as f64 / members.len().max(1) as f64
        } else {
            known_demand.iter().sum::<f64>() / known_demand.len() as f64
        };
        let mut structural = total_changed;
        let mut went_down = Vec::new();
        let mut came_up = Vec::new();
        for m in members {
            let s = match old.get(&m.server) {
                Some(s) => {
                    let mut s = s.clone();
                    s.host = m.host.clone();
                    if s.up && !m.up {
                        // Its host sends nothing; when it returns it takes
                        // the cap in the directory at its next report (a
                        // node back from a partition may hold its old class
                        // until then).
                        s.applied = None;
                        went_down.push(m.server.clone());
                    } else if !s.up && m.up {
                        came_up.push(m.server.clone());
                    }
                    s.up = m.up;
                    s
                }
                None => {
                    structural = true;
                    Server {
                        name: m.server.clone(),
                        host: m.host.clone(),
                        up: m.up,
                        granted: 0,
                        applied: None,
                        target: 0,
                        demand: fresh_demand,
                        sum_u: 0.0,
                        n_u: 0,
                        offered: None,
                    }
                }
            };
            svc.servers.push(s);
        }
        if old.keys().any(|k| !members.iter().any(|m| &m.server == k)) {
            structural = true;
        }
        svc.credits
            .retain(|from, _| svc.servers.iter().any(|s| &s.name == from));
        if structural {
            // Membership changed: split the total afresh by eq. 3.2 over the
            // live servers (credits are void: the list they were made on
            // is gone).
            svc.credits.clear();
            retarget(svc);
            svc.last_change = Some(format!(
                "{} servers; split {} by demand",
                svc.servers.len(),
                format_rate(svc.settings.total as f64)
            ));
        } else {
            for name in &came_up {
                if let Some(rec) = svc.credits.remove(name) {
                    let idx = |n: &str| svc.servers.iter().position(|s| s.name == n);
                    let Some(from) = idx(name) else { continue };
                    let credit = Credit {
                        from,
                        amount: rec.amount,
                        given: rec
                            .given
                            .iter()
                            .filter_map(|(h, g)| idx(h).map(|i| (i, *g)))
                            .collect(),
                    };
                    for (h, g) in &rec.given {
                        if let Some(s) = svc.servers.iter_mut().find(|s| &s.name == h) {
                            let share = rec.demand * *g as f64 / rec.amount.max(1) as f64;
                            s.demand = (s.demand - share).max(0.0);
                        }
                    }
                    let targets: Vec<u64> = svc.servers.iter().map(|s| s.target).collect();
                    let back = give_back(&targets, &credit, svc.settings.floor);
                    for (s, t) in svc.servers.iter_mut().zip(back) {
                        s.target = t;
                    }
                    svc.last_change = Some(format!(
                        "{name} returned: its heirs give back what they received"
                    ));
                } else {
                    retarget(svc);
                }
            }
            if !went_down.is_empty() {
                // The newly failed servers' targets go to their heirs (those
                // that failed before are at 0 already).
                let targets: Vec<u64> = svc.servers.iter().map(|s| s.target).collect();
                let up: Vec<bool> = svc.servers.iter().map(|s| s.up).collect();
                let (after, credits) = compensate(&targets, &up, svc.settings.spread);
                for c in credits {
                    let from = svc.servers[c.from].name.clone();
                    let demand = svc.servers[c.from].demand;
                    for (i, g) in &c.given {
                        svc.servers[*i].demand += demand * *g as f64 / c.amount.max(1) as f64;
                    }
                    let given = c
                        .given
                        .iter()
                        .map(|(i, g)| (svc.servers[*i].name.clone(), *g))
                        .collect();
                    svc.credits.insert(
                        from,
                        CreditRec {
                            amount: c.amount,
                            given,
                            demand,
                        },
                    );
                }
                for (s, t) in svc.servers.iter_mut().zip(after) {
                    s.target = t;
                }
                svc.last_change = Some(format!(
                    "{} failed: cap moved {}",
                    went_down.join(", "),
                    svc.settings.spread
                ));
            }
        }
        self.advance(name);
    }

    /// A sample from the node that enforces `server`'s cap: the offered
    /// rate (sent plus dropped) over the last second, bytes/s, and the cap
    /// it enforces now (its acknowledgement). Unknown names are ignored:
    /// a report may cross a membership change.
    pub fn observe(
        &mut self,
        service: &str,
        server: &str,
        offered: Option<f64>,
        applied: Option<u64>,
    ) {
        let Some(svc) = self.services.get_mut(service) else {
            return;
        };
        let Some(s) = svc.servers.iter_mut().find(|s| s.name == server) else {
            return;
        };
        if let Some(u) = offered.filter(|u| u.is_finite() && *u >= 0.0) {
            s.sum_u += u;
            s.n_u += 1;
            s.offered = Some(u);
        }
        if applied.is_some() {
            s.applied = applied;
        }
        self.advance(service);
    }

    /// When [`Directory::tick`] next has work.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.services.values().filter_map(|s| s.next_round_ms).min()
    }

    /// Runs every reallocation round that is due: eq. 3.1 on the mean
    /// offered rate of the round (a server without samples keeps its
    /// estimate), eq. 3.2 over the live servers, then the reductions.
    pub fn tick(&mut self, now_ms: u64) {
        let names: Vec<String> = self.services.keys().cloned().collect();
        for name in names {
            let svc = self.services.get_mut(&name).expect("listed");
            let Some(due) = svc.next_round_ms else {
                continue;
            };
            if now_ms < due {
                continue;
            }
            svc.next_round_ms = Some(now_ms + svc.settings.interval_ms);
            svc.rounds += 1;
            let d: Vec<f64> = svc.servers.iter().map(|s| s.demand).collect();
            let u: Vec<f64> = svc
                .servers
                .iter()
                .map(|s| {
                    if s.n_u > 0 {
                        s.sum_u / s.n_u as f64
                    } else {
                        s.demand
                    }
                })
                .collect();
            let d2 = smooth(svc.settings.alpha, &d, &u);
            for (s, d) in svc.servers.iter_mut().zip(d2) {
                if s.up {
                    s.demand = d;
                }
                s.sum_u = 0.0;
                s.n_u = 0;
            }
            let before: Vec<u64> = svc.servers.iter().map(|s| s.target).collect();
            retarget(svc);
            if svc.servers.iter().zip(&before).any(|(s, b)| s.target != *b) {
                svc.last_change = Some(format!("round {}: caps follow demand", svc.rounds));
            }
            self.advance(&name);
        }
    }

    /// Edits one server's cap, validated against the service's bound (the
    /// caps in force of the others plus this one) and its host's capacity,
    /// and against the floor. On success the cap is in the directory (and
    /// is the server's target until the next round) and a [`CapChange`] is
    /// queued for its node.
    pub fn change(&mut self, service: &str, server: &str, cap: u64) -> Result<(), DirectoryError> {
        self.grant(service, server, cap)?;
        let svc = self.services.get_mut(service).expect("granted");
        if let Some(s) = svc.servers.iter_mut().find(|s| s.name == server) {
            s.target = cap;
        }
        Ok(())
    }

    /// Validates and grants one cap (see [`Directory::change`]) without
    /// touching the target.
    fn grant(&mut self, service: &str, server: &str, cap: u64) -> Result<(), DirectoryError> {
        let svc = self
            .services
            .get(service)
            .ok_or_else(|| DirectoryError::UnknownService(service.to_string()))?;
        let i = svc
            .servers
            .iter()
            .position(|s| s.name == server)
            .ok_or_else(|| DirectoryError::UnknownServer {
                service: service.to_string(),
                server: server.to_string(),
            })?;
        let floor = svc
            .settings
            .floor
            .min(svc.settings.total / svc.servers.len() as u64);
        if cap < floor && svc.servers[i].up {
            return Err(DirectoryError::BelowFloor {
                service: service.to_string(),
                cap,
                floor,
            });
        }
        let s = &svc.servers[i];
        if !s.up && cap > 0 {
            return Err(DirectoryError::Failed {
                service: service.to_string(),
                server: server.to_string(),
            });
        }
        // In force after the change: an increase counts at once; a
        // reduction still counts at what the node enforces until it
        // acknowledges.
        let mine_after = if cap > s.granted {
            cap.max(s.applied.unwrap_or(0))
        } else {
            s.in_force()
        };
        let others: u64 = svc
            .servers
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, s)| s.in_force())
            .sum();
        let would_be = others + mine_after;
        if cap > s.granted && would_be > svc.settings.total {
            return Err(DirectoryError::OverBound {
                service: service.to_string(),
                would_be,
                bound: svc.settings.total,
            });
        }
        if cap > s.granted
            && let Some(Some(capacity)) = self.hosts.get(&s.host)
        {
            let host = s.host.clone();
            let on_host = self.host_in_force(&host) - s.in_force() + mine_after;
            if on_host > *capacity {
                return Err(DirectoryError::OverHost {
                    host,
                    would_be: on_host,
                    capacity: *capacity,
                });
            }
        }
        let svc = self.services.get_mut(service).expect("checked");
        let s = &mut svc.servers[i];
        if s.granted != cap {
            s.granted = cap;
            self.changes.push_back(CapChange {
                service: service.to_string(),
                server: s.name.clone(),
                host: s.host.clone(),
                cap,
            });
        }
        Ok(())
    }

    fn host_in_force(&self, host: &str) -> u64 {
        self.services
            .values()
            .flat_map(|svc| svc.servers.iter())
            .filter(|s| s.host == host)
            .map(Server::in_force)
            .sum()
    }

    /// Moves granted caps toward their targets: every reduction at once,
    /// every increase as far as the directory accepts it (the bound waits
    /// for acknowledgements; a host short of capacity gets what it has
    /// room for, the rest is refused).
    fn advance(&mut self, service: &str) {
        let Some(svc) = self.services.get(service) else {
            return;
        };
        let steps: Vec<(String, u64, u64, bool)> = svc
            .servers
            .iter()
            .map(|s| (s.name.clone(), s.granted, s.target, s.up))
            .collect();
        for (name, granted, target, up) in &steps {
            if target < granted || (!up && *granted != 0) {
                let t = if *up { *target } else { 0 };
                // A reduction: always within the bound; a failed server's
                // entry is dropped to 0 (its host sends nothing).
                let svc = self.services.get_mut(service).expect("present");
                let s = svc
                    .servers
                    .iter_mut()
                    .find(|s| &s.name == name)
                    .expect("present");
                s.granted = t;
                self.changes.push_back(CapChange {
                    service: service.to_string(),
                    server: name.clone(),
                    host: s.host.clone(),
                    cap: t,
                });
            }
        }
        for (name, granted, target, up) in steps {
            if !up || target <= granted {
                continue;
            }
            match self.grant(service, &name, target) {
                Ok(()) => {}
                Err(DirectoryError::OverHost {
                    would_be, capacity, ..
                }) => {
                    let short = would_be - capacity;
                    let partial = target.saturating_sub(short);
                    if partial > granted {
                        let _ = self.grant(service, &name, partial);
                    }
                }
                Err(_) => {} // waits for acknowledgements
            }
        }
    }

    /// Caps that changed since the last call, oldest first.
    pub fn poll_changes(&mut self) -> Vec<CapChange> {
        self.changes.drain(..).collect()
    }

    /// The cap a server must enforce now, if it has one.
    pub fn cap(&self, service: &str, server: &str) -> Option<u64> {
        self.services
            .get(service)?
            .servers
            .iter()
            .find(|s| s.name == server && s.up)
            .map(|s| s.granted)
    }

    /// A service's bandwidth entries.
    pub fn status(&self, service: &str) -> Option<ServiceBandwidth> {
        let svc = self.services.get(service)?;
        let st = &svc.settings;
        Some(ServiceBandwidth {
            total_bps: st.total,
            alpha: st.alpha,
            interval_ms: st.interval_ms,
            floor_bps: st.floor,
            spread: match st.spread {
                Spread::NextR(r) => format!("next-{r}"),
                Spread::Even => "even".into(),
            },
            in_force_bps: svc.servers.iter().map(Server::in_force).sum(),
            pending: svc.servers.iter().any(|s| {
                s.up && (s.granted != s.target || s.applied.is_some_and(|a| a != s.granted))
            }),
            rounds: svc.rounds,
            last_change: svc.last_change.clone(),
            servers: svc
                .servers
                .iter()
                .map(|s| ServerStatus {
                    server: s.name.clone(),
                    host: s.host.clone(),
                    up: s.up,
                    cap_bps: s.granted,
                    applied_bps: s.applied,
                    target_bps: s.target,
                    demand_bps: s.demand,
                    offered_bps: s.offered,
                })
                .collect(),
        })
    }

    /// Every host's entry.
    pub fn hosts(&self) -> Vec<HostStatus> {
        let mut names: Vec<&String> = self.hosts.keys().collect();
        for svc in self.services.values() {
            for s in &svc.servers {
                if !names.contains(&&s.host) {
                    names.push(&s.host);
                }
            }
        }
        names.sort();
        names
            .into_iter()
            .map(|h| HostStatus {
                host: h.clone(),
                capacity_bps: self.hosts.get(h).copied().flatten(),
                allocated_bps: self.host_in_force(h),
            })
            .collect()
    }
}

/// Eq. 3.2 over the live servers at their current estimates; failed
/// servers' targets are 0. Keeps the targets when the demand is all zero.
fn retarget(svc: &mut Service) {
    let live: Vec<usize> = (0..svc.servers.len())
        .filter(|i| svc.servers[*i].up)
        .collect();
    let d: Vec<f64> = live.iter().map(|i| svc.servers[*i].demand).collect();
    let Some(caps) = proportional(svc.settings.total, &d, svc.settings.floor) else {
        return;
    };
    for s in svc.servers.iter_mut() {
        if !s.up {
            s.target = 0;
        }
    }
    for (i, c) in live.into_iter().zip(caps) {
        svc.servers[i].target = c;
    }
}
