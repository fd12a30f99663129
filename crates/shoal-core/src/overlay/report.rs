//! What peers report of the overlay (`shoal overlay status`), and the
//! pool's view merged from every peer's report (`--all`, the dashboard):
//! each target once, with the freshest news of it and who deployed or
//! recovered it last. One merge serves the CLI and the dashboard.

use super::peer::Counters;
use super::version::{Version, Versions};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One peer's view of the overlay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The peer.
    pub name: String,
    /// Its versions.
    pub versions: Versions,
    /// Its timers.
    pub interval_ms: u64,
    /// Its ping timeout.
    pub timeout_ms: u64,
    /// Its counters.
    pub counters: Counters,
    /// Every target of its list.
    pub targets: Vec<TargetStatus>,
    /// The manager its host runs, if its target names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manager: Option<ManagerReport>,
    /// Its self-upgrade: the last attempt, a release on probation, the
    /// releases it knows to be bad.
    #[serde(default)]
    pub upgrade: UpgradeReport,
    /// The overlay's apps on its host (II-D).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub apps: Vec<AppReport>,
}

/// A peer's self-upgrade, for status.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct UpgradeReport {
    /// The last attempt (a pull, or why it was refused).
    pub last: Option<super::peer::UpgradeNote>,
    /// The release it runs is on probation until this time (Unix ms).
    pub probation_until_ms: Option<u64>,
    /// Every release it knows to be bad.
    pub bad: Vec<Version>,
}

/// One overlay app on one host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppReport {
    /// Its name.
    pub name: String,
    /// Its version.
    pub version: Version,
    /// The state the overlay agreed on.
    pub state: super::apps::AppState,
    /// That state's version.
    #[serde(default)]
    pub state_version: Version,
    /// Whether its process runs.
    pub running: bool,
    /// Its pid, when it runs.
    pub pid: Option<u32>,
    /// Restarts since it was installed here.
    pub restarts: u32,
    /// What went wrong last (a failed start, a failed pull).
    pub message: Option<String>,
}

/// How a peer keeps its host's manager alive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManagerReport {
    /// The manager's cluster directory.
    pub dir: String,
    /// `running`, `started` (the last start, while it runs) or `failed`.
    pub state: String,
    /// When that was seen.
    pub at_ms: Option<u64>,
    /// Why it failed.
    pub detail: Option<String>,
    /// Starts since this peer started.
    pub starts: u64,
}

/// One target in a [`StatusReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetStatus {
    /// Its name.
    pub name: String,
    /// Its address.
    pub address: String,
    /// `self` for the reporting peer; otherwise what it knows.
    pub state: String,
    /// When it last answered or pinged the reporting peer.
    pub last_seen_ms: Option<u64>,
    /// Its package version then.
    pub peer_version: Option<Version>,
    /// Its target list version then.
    pub targets_version: Option<Version>,
    /// When the reporting peer last deployed it.
    pub deployed_ms: Option<u64>,
    /// When the reporting peer last recovered it.
    pub recovered_ms: Option<u64>,
    /// Contacts the reporting peer made.
    pub contacts: u32,
    /// The last contact's detail.
    pub detail: Option<String>,
}

/// One target in the merged view.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolTarget {
    /// Its name.
    pub name: String,
    /// Its address.
    pub address: String,
    /// `alive` (it answered a survey, or a peer heard from it within
    /// `alive_ms`), else the freshest contact state a peer reports
    /// (`contacting`, `deployed`, `recovered`, `unreachable`,
    /// `wrong-host-key`, `failed`), else `unknown`.
    pub state: String,
    /// Its own report answered the survey.
    pub answered: bool,
    /// Its package version (its own report, else the freshest ping).
    pub peer_version: Option<Version>,
    /// Its target list version, likewise.
    pub targets_version: Option<Version>,
    /// When a peer last heard from it.
    pub last_seen_ms: Option<u64>,
    /// The last deployment of it, and the peer that made it.
    pub deployed: Option<(u64, String)>,
    /// The last recovery of it, and the peer that made it.
    pub recovered: Option<(u64, String)>,
    /// Contacts made to it, over every report.
    pub contacts: u64,
    /// The detail of the freshest contact state, and who reported it.
    pub detail: Option<(String, String)>,
}

/// The pool as every answering peer sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolView {
    /// When it was merged.
    pub at_ms: u64,
    /// The peers whose reports it merges.
    pub reports: usize,
    /// The highest target list version among them.
    pub targets_version: Option<Version>,
    /// Every target of the newest list, in its order.
    pub targets: Vec<PoolTarget>,
    /// Managers the overlay keeps alive: host, and its peer's report.
    pub managers: Vec<(String, ManagerReport)>,
    /// Totals of every report's counters.
    pub counters: Counters,
    /// Every overlay app on every answering host: host, and the app.
    #[serde(default)]
    pub apps: Vec<(String, AppReport)>,
    /// Releases any answering peer knows to be bad.
    #[serde(default)]
    pub bad: Vec<Version>,
}

/// Merges peers' reports, taken at `now_ms`: a target heard from within
/// `alive_ms` (three ping intervals is a fair choice) by any peer is
/// alive; otherwise the newest contact news of it wins. Targets are the
/// newest list's (a report on an older list still adds what it knows by
/// name).
pub fn merge(reports: &[StatusReport], now_ms: u64, alive_ms: u64) -> PoolView {
    let newest = reports.iter().max_by_key(|r| r.versions.targets);
    let mut order: Vec<(String, String)> = newest
        .map(|r| {
            r.targets
                .iter()
                .map(|t| (t.name.clone(), t.address.clone()))
                .collect()
        })
        .unwrap_or_default();
    let answered: BTreeMap<&str, &StatusReport> =
        reports.iter().map(|r| (r.name.as_str(), r)).collect();
    let mut by_name: BTreeMap<String, PoolTarget> = order
        .iter()
        .map(|(n, a)| {
            (
                n.clone(),
                PoolTarget {
                    name: n.clone(),
                    address: a.clone(),
                    state: "unknown".into(),
                    answered: answered.contains_key(n.as_str()),
                    peer_version: None,
                    targets_version: None,
                    last_seen_ms: None,
                    deployed: None,
                    recovered: None,
                    contacts: 0,
                    detail: None,
                },
            )
        })
        .collect();
    // The freshest contact news of each target: (when, state, detail, by).
    let mut news: BTreeMap<String, (u64, String, Option<String>, String)> = BTreeMap::new();
    let mut counters = Counters::default();
    for r in reports {
        let c = &r.counters;
        counters.pings_sent += c.pings_sent;
        counters.pings_received += c.pings_received;
        counters.answers += c.answers;
        counters.timeouts += c.timeouts;
        counters.contacts += c.contacts;
        counters.deployed += c.deployed;
        counters.recovered += c.recovered;
        counters.manager_starts += c.manager_starts;
        counters.upgrades += c.upgrades;
        counters.upgrades_refused += c.upgrades_refused;
        counters.app_notices += c.app_notices;
        counters.app_fetches += c.app_fetches;
        for t in &r.targets {
            let Some(p) = by_name.get_mut(&t.name) else {
                continue;
            };
            p.contacts += t.contacts as u64;
            if t.state == "self" {
                p.peer_version = t.peer_version;
                p.targets_version = t.targets_version;
                p.last_seen_ms = Some(now_ms);
                continue;
            }
            if t.last_seen_ms > p.last_seen_ms {
                p.last_seen_ms = t.last_seen_ms;
                if !p.answered {
                    p.peer_version = t.peer_version;
                    p.targets_version = t.targets_version;
                }
            }
            let newer = |cur: &Option<(u64, String)>, at: Option<u64>| {
                at.filter(|a| cur.as_ref().is_none_or(|(c, _)| a > c))
            };
            if let Some(at) = newer(&p.deployed, t.deployed_ms) {
                p.deployed = Some((at, r.name.clone()));
            }
            if let Some(at) = newer(&p.recovered, t.recovered_ms) {
                p.recovered = Some((at, r.name.clone()));
            }
            if !matches!(t.state.as_str(), "alive" | "unknown") {
                let at = [t.deployed_ms, t.recovered_ms, t.last_seen_ms]
                    .into_iter()
                    .flatten()
                    .max()
                    .unwrap_or(0);
                if news.get(&t.name).is_none_or(|n| at >= n.0) {
                    news.insert(
                        t.name.clone(),
                        (at, t.state.clone(), t.detail.clone(), r.name.clone()),
                    );
                }
            }
        }
    }
    for (name, p) in by_name.iter_mut() {
        let heard = p.last_seen_ms.is_some_and(|s| s + alive_ms > now_ms);
        if p.answered || heard {
            p.state = "alive".into();
        } else if let Some((_, state, detail, by)) = news.remove(name) {
            p.state = state;
            p.detail = detail.map(|d| (d, by));
        }
    }
    let managers = reports
        .iter()
        .filter_map(|r| r.manager.clone().map(|m| (r.name.clone(), m)))
        .collect();
    let apps = reports
        .iter()
        .flat_map(|r| r.apps.iter().map(|a| (r.name.clone(), a.clone())))
        .collect();
    let mut bad: Vec<Version> = reports
        .iter()
        .flat_map(|r| r.upgrade.bad.iter().copied())
        .collect();
    bad.sort();
    bad.dedup();
    PoolView {
        apps,
        bad,
        at_ms: now_ms,
        reports: reports.len(),
        targets_version: newest.map(|r| r.versions.targets),
        targets: order
            .drain(..)
            .filter_map(|(n, _)| by_name.remove(&n))
            .collect(),
        managers,
        counters,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, state: &str) -> TargetStatus {
        TargetStatus {
            name: name.into(),
            address: format!("10.0.0.{}", &name[1..]),
            state: state.into(),
            last_seen_ms: None,
            peer_version: None,
            targets_version: None,
            deployed_ms: None,
            recovered_ms: None,
            contacts: 0,
            detail: None,
        }
    }

    fn report(name: &str, list: u64, targets: Vec<TargetStatus>) -> StatusReport {
        StatusReport {
            name: name.into(),
            versions: Versions {
                targets: Version::new(list, 0),
                ..Versions::default()
            },
            interval_ms: 1000,
            timeout_ms: 500,
            counters: Counters {
                pings_sent: 10,
                ..Counters::default()
            },
            targets,
            manager: None,
            upgrade: UpgradeReport::default(),
            apps: Vec::new(),
        }
    }

    #[test]
    fn the_merge_keeps_the_freshest_news_and_who_deployed_or_recovered() {
        // h1 deployed h3 at 100; h2 recovered h3 at 500 and saw it at 600;
        // h4 is unreachable for h2; h5 showed h1 a wrong host key; nobody
        // heard of h6, which only the newer list (h2's) names.
        let mut h3_by_h1 = t("h3", "deployed");
        h3_by_h1.deployed_ms = Some(100);
        h3_by_h1.contacts = 1;
        let mut h3_by_h2 = t("h3", "alive");
        h3_by_h2.recovered_ms = Some(500);
        h3_by_h2.last_seen_ms = Some(600);
        h3_by_h2.contacts = 1;
        let mut h4 = t("h4", "unreachable");
        h4.detail = Some("no answer within 10 s".into());
        let mut h5 = t("h5", "wrong-host-key");
        h5.detail = Some("presented SHA256:x".into());
        let r1 = report(
            "h1",
            1,
            vec![
                t("h1", "self"),
                t("h2", "alive"),
                h3_by_h1,
                t("h4", "unknown"),
                h5,
            ],
        );
        let r2 = report(
            "h2",
            2,
            vec![
                t("h1", "alive"),
                t("h2", "self"),
                h3_by_h2,
                h4,
                t("h5", "unknown"),
                t("h6", "unknown"),
            ],
        );
        let v = merge(&[r1, r2], 1000, 3000);
        assert_eq!(v.reports, 2);
        assert_eq!(v.targets_version, Some(Version::new(2, 0)));
        let names: Vec<_> = v.targets.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            ["h1", "h2", "h3", "h4", "h5", "h6"],
            "the newest list's order"
        );
        let by = |n: &str| v.targets.iter().find(|t| t.name == n).unwrap();
        assert!(by("h1").answered && by("h1").state == "alive");
        assert_eq!(by("h3").state, "alive", "seen 400 ms ago");
        assert!(!by("h3").answered);
        assert_eq!(by("h3").deployed, Some((100, "h1".into())));
        assert_eq!(by("h3").recovered, Some((500, "h2".into())));
        assert_eq!(by("h3").contacts, 2);
        assert_eq!(by("h4").state, "unreachable");
        assert_eq!(
            by("h4").detail,
            Some(("no answer within 10 s".into(), "h2".into()))
        );
        assert_eq!(by("h5").state, "wrong-host-key");
        assert_eq!(by("h6").state, "unknown");
        assert_eq!(v.counters.pings_sent, 20);

        // Later, nobody has heard from h3 for longer than alive_ms: the
        // newest contact news of it stands (its recovery, by h2).
        let mut stale = t("h3", "recovered");
        stale.recovered_ms = Some(500);
        let r = report("h1", 2, vec![t("h1", "self"), stale]);
        let v = merge(&[r], 10_000, 3000);
        assert_eq!(v.targets[1].state, "recovered");
        assert_eq!(merge(&[], 0, 3000).targets.len(), 0);
    }
}
