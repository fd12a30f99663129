//! What is happening and why, in a terminal: `shoal events` (the manager's
//! event and decision log, optionally followed live) and `shoal describe`
//! (one service or node with its apps, last errors, decisions and events),
//! built from what the manager's API already returns.

use crate::admin::{AdminTarget, fmt_at_ms, fmt_time_ms, write_stdout};
use shoal_net::wire::*;
use std::fmt::Write;

/// `shoal events` arguments.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Examples:
  shoal events --dir ./c
  shoal events --dir ./c --service web
  shoal events --dir ./c --node n1 --follow
(--dir may be left out when SHOAL_DIR names the cluster directory.)")]
pub struct EventsArgs {
    #[command(flatten)]
    pub target: AdminTarget,
    /// Keep printing events as they happen (Ctrl-C stops).
    #[arg(long, short)]
    pub follow: bool,
    /// Only the events of this service (its decisions, allocations, definition).
    #[arg(long)]
    pub service: Option<String>,
    /// Only the events of this node.
    #[arg(long)]
    pub node: Option<String>,
    /// One JSON object a line: {"seq", "at_ms", "kind", "node", "message"}.
    #[arg(long)]
    pub json: bool,
}

/// Whether `e` concerns service `name`: the manager writes every service
/// event as "NAME: ...".
pub fn about_service(e: &Event, name: &str) -> bool {
    e.message
        .strip_prefix(name)
        .is_some_and(|rest| rest.starts_with(':'))
}

fn keep(a: &EventsArgs, e: &Event) -> bool {
    a.service.as_deref().is_none_or(|s| about_service(e, s))
        && a.node
            .as_deref()
            .is_none_or(|n| e.node.as_deref() == Some(n))
}

fn event_line(e: &Event) -> String {
    format!(
        "{}  {:<10} {:<12} {}\n",
        fmt_at_ms(e.at_ms),
        e.kind,
        e.node.as_deref().unwrap_or("-"),
        e.message
    )
}

fn render_event(a: &EventsArgs, e: &Event) -> String {
    if a.json {
        serde_json::to_string(e).unwrap_or_default() + "\n"
    } else {
        event_line(e)
    }
}

pub async fn events(a: EventsArgs) -> anyhow::Result<()> {
    let client = a.target.client()?;
    if !a.follow {
        let list: Vec<Event> = client.get("/v1/events").await?;
        let mut text = String::new();
        if !a.json {
            let _ = writeln!(
                text,
                "{:<19}  {:<10} {:<12} MESSAGE",
                "TIME", "KIND", "NODE"
            );
        }
        for e in list.iter().filter(|e| keep(&a, e)) {
            text.push_str(&render_event(&a, e));
        }
        return write_stdout(&text);
    }
    // The watch stream: the recent log first, then every new event.
    use futures_util::StreamExt;
    let mut body = client.watch().await?.bytes_stream();
    let mut buf = String::new();
    let mut last_seq = 0u64;
    if !a.json {
        write_stdout(&format!(
            "{:<19}  {:<10} {:<12} MESSAGE\n",
            "TIME", "KIND", "NODE"
        ))?;
    }
    loop {
        tokio::select! {
            chunk = body.next() => {
                let Some(chunk) = chunk else {
                    anyhow::bail!("the manager closed the event stream");
                };
                let chunk = chunk.map_err(|e| anyhow::anyhow!("the event stream broke: {e}"))?;
                buf.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(i) = buf.find('\n') {
                    let line: String = buf.drain(..=i).collect();
                    let Some(data) = line.trim_end().strip_prefix("data:") else {
                        continue;
                    };
                    let Ok(e) = serde_json::from_str::<Event>(data.trim()) else {
                        continue;
                    };
                    if e.seq <= last_seq && last_seq != 0 {
                        continue;
                    }
                    last_seq = e.seq;
                    if keep(&a, &e) {
                        write_stdout(&render_event(&a, &e))?;
                    }
                }
            }
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// `shoal describe` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum DescribeCmd {
    /// A service: definition, allocation, each node's app with its last
    /// error and restarts, the last decisions with reasons, recent events.
    #[command(
        after_help = "Example:\n  shoal describe service web --dir ./c\n(--dir may be left out when SHOAL_DIR names the cluster directory.)"
    )]
    Service(DescribeArgs),
    /// A node: address, lease, roles, load, its apps with their last
    /// error and restarts, the services it serves, recent events.
    #[command(
        after_help = "Example:\n  shoal describe node n1 --dir ./c\n(--dir may be left out when SHOAL_DIR names the cluster directory.)"
    )]
    Node(DescribeArgs),
}

/// `shoal describe service|node NAME`.
#[derive(Debug, Clone, clap::Args)]
pub struct DescribeArgs {
    #[command(flatten)]
    pub target: AdminTarget,
    /// The service's or node's name.
    pub name: String,
    /// Print the gathered JSON: {"detail" | "node", "events", ...}.
    #[arg(long)]
    pub json: bool,
}

fn app_line(o: &mut String, node: &str, app: Option<&AppStatus>) {
    match app {
        Some(a) => {
            let state = format!("{:?}", a.state).to_lowercase();
            let _ = writeln!(
                o,
                "  {:<14} {:<16} {:<9} {:>8}  {}",
                node,
                a.id,
                state,
                a.restarts,
                a.message.as_deref().unwrap_or("-")
            );
        }
        None => {
            let _ = writeln!(
                o,
                "  {node:<14} {:<16} {:<9} {:>8}  not reported by the node yet",
                "-", "-", "-"
            );
        }
    }
}

const APP_HEADER: &str = "  NODE           APP              STATE     RESTARTS  LAST ERROR";

pub async fn describe(cmd: DescribeCmd) -> anyhow::Result<()> {
    match cmd {
        DescribeCmd::Service(a) => describe_service(a).await,
        DescribeCmd::Node(a) => describe_node(a).await,
    }
}

async fn describe_service(a: DescribeArgs) -> anyhow::Result<()> {
    let c = a.target.client()?;
    let d: ServiceDetail = c.get(&format!("/v1/services/{}", a.name)).await?;
    let status = c.status().await?;
    let events: Vec<Event> = c.get("/v1/events").await?;
    let events: Vec<&Event> = events
        .iter()
        .filter(|e| about_service(e, &a.name))
        .collect();
    let app_id = format!("svc-{}", a.name);
    if a.json {
        let apps: Vec<serde_json::Value> = d
            .allocations
            .iter()
            .map(|al| {
                let app = status
                    .nodes
                    .iter()
                    .find(|n| n.name == al.node)
                    .and_then(|n| n.apps.iter().find(|x| x.id == app_id));
                serde_json::json!({"node": al.node, "app": app})
            })
            .collect();
        let v = serde_json::json!({"detail": d, "apps": apps, "events": events});
        return write_stdout(&(serde_json::to_string_pretty(&v)? + "\n"));
    }
    let mut o = String::new();
    let _ = writeln!(o, "Service:   {}", a.name);
    let _ = writeln!(
        o,
        "Policy:    {}{}",
        d.status.policy,
        if d.status.deleting { " (deleting)" } else { "" }
    );
    let _ = writeln!(
        o,
        "Load:      {} observed, {} forecast",
        d.status.usage.map_or("-".into(), |x| format!("{x:.2}")),
        d.status.forecast.map_or("-".into(), |x| format!("{x:.2}"))
    );
    match &d.spec {
        Some(s) => {
            let _ = writeln!(o, "\nDefinition:");
            for l in toml::to_string(s).unwrap_or_default().lines() {
                let _ = writeln!(o, "  {l}");
            }
        }
        None => {
            let _ = writeln!(o, "\nDefinition: deleted; its nodes drain out");
        }
    }
    let _ = writeln!(o, "\nAllocation:");
    if d.allocations.is_empty() {
        let _ = writeln!(o, "  (no nodes)");
    } else {
        let _ = writeln!(o, "  {:<14} {:<22} {:<9} SINCE", "NODE", "BACKEND", "PHASE");
        for al in &d.allocations {
            let phase = serde_json::to_value(al.phase)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            let _ = writeln!(
                o,
                "  {:<14} {:<22} {:<9} {}",
                al.node,
                al.address,
                phase,
                fmt_time_ms(al.since_ms)
            );
        }
    }
    if let Some(bw) = &d.status.bandwidth {
        bandwidth_table(&mut o, bw);
    }
    let _ = writeln!(o, "\nApps:\n{APP_HEADER}");
    for al in &d.allocations {
        let app = status
            .nodes
            .iter()
            .find(|n| n.name == al.node)
            .and_then(|n| n.apps.iter().find(|x| x.id == app_id));
        app_line(&mut o, &al.node, app);
    }
    let _ = writeln!(o, "\nLast decisions:");
    let decisions: Vec<&&Event> = events.iter().filter(|e| e.kind == "decision").collect();
    if decisions.is_empty() {
        let _ = writeln!(o, "  (none yet)");
    }
    for e in decisions.iter().rev().take(5).rev() {
        let _ = write!(o, "  {}", event_line(e));
    }
    let _ = writeln!(o, "\nEvents:");
    if events.is_empty() {
        let _ = writeln!(o, "  (none)");
    }
    for e in events.iter().rev().take(15).rev() {
        let _ = write!(o, "  {}", event_line(e));
    }
    write_stdout(&o)
}

/// The bandwidth directory's entries of a service (docs/bandwidth.md).
fn bandwidth_table(o: &mut String, bw: &shoal_core::bandwidth::ServiceBandwidth) {
    use shoal_core::bandwidth::format_rate as r;
    let _ = writeln!(
        o,
        "\nBandwidth: {} total, {} in force{}; alpha {}, every {} ms, floor {}, on failure: {}",
        r(bw.total_bps as f64),
        r(bw.in_force_bps as f64),
        if bw.pending {
            " (waiting for acknowledgements)"
        } else {
            ""
        },
        bw.alpha,
        bw.interval_ms,
        r(bw.floor_bps as f64),
        bw.spread
    );
    if let Some(c) = &bw.last_change {
        let _ = writeln!(o, "  last change: {c}");
    }
    let _ = writeln!(
        o,
        "  {:<14} {:<5} {:>13} {:>13} {:>13} {:>13} {:>13}",
        "SERVER", "UP", "CAP", "APPLIED", "TARGET", "DEMAND", "OFFERED"
    );
    for s in &bw.servers {
        let _ = writeln!(
            o,
            "  {:<14} {:<5} {:>13} {:>13} {:>13} {:>13} {:>13}",
            s.server,
            if s.up { "yes" } else { "no" },
            r(s.cap_bps as f64),
            s.applied_bps.map_or("-".into(), |x| r(x as f64)),
            r(s.target_bps as f64),
            r(s.demand_bps),
            s.offered_bps.map_or("-".into(), r),
        );
    }
}

async fn describe_node(a: DescribeArgs) -> anyhow::Result<()> {
    let c = a.target.client()?;
    let status = c.status().await?;
    let Some(n) = status.nodes.iter().find(|n| n.name == a.name) else {
        let names: Vec<&str> = status.nodes.iter().map(|n| n.name.as_str()).collect();
        anyhow::bail!(
            "node {:?} is not registered (nodes: {}); see `shoal status`",
            a.name,
            if names.is_empty() {
                "none".into()
            } else {
                names.join(", ")
            }
        );
    };
    let events: Vec<Event> = c.get("/v1/events").await?;
    let events: Vec<&Event> = events
        .iter()
        .filter(|e| e.node.as_deref() == Some(&a.name))
        .collect();
    let services: Vec<&str> = status
        .services
        .iter()
        .filter(|s| s.nodes.contains(&a.name))
        .map(|s| s.name.as_str())
        .collect();
    if a.json {
        let v = serde_json::json!({"node": n, "services": services, "events": events});
        return write_stdout(&(serde_json::to_string_pretty(&v)? + "\n"));
    }
    let mut o = String::new();
    let _ = writeln!(o, "Node:      {}", n.name);
    let _ = writeln!(o, "Address:   {}", n.address);
    let _ = writeln!(
        o,
        "State:     {}",
        match n.state {
            LeaseState::Alive => format!(
                "alive, lease {:.1} s left",
                n.lease_remaining_ms as f64 / 1000.0
            ),
            LeaseState::Failed =>
                "FAILED (its lease ran out; it is alive again once it renews)".into(),
        }
    );
    let _ = writeln!(
        o,
        "Roles:     {}",
        if n.roles.is_empty() {
            "-".into()
        } else {
            n.roles.join(", ")
        }
    );
    let caps: Vec<String> = n
        .capacities
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let _ = writeln!(o, "Capacity:  {}", caps.join(", "));
    match &n.load {
        Some(l) => {
            let _ = writeln!(
                o,
                "Load:      cpu {:.0}% of {} cores, net rx {:.2} Mbit/s tx {:.2} Mbit/s, memory {:.0}% (sampled {})",
                l.cpu * 100.0,
                l.cpus,
                l.net_rx_bps * 8.0 / 1e6,
                l.net_tx_bps * 8.0 / 1e6,
                100.0 * l.mem_used_bytes as f64 / l.mem_total_bytes.max(1) as f64,
                fmt_time_ms(l.at_ms)
            );
        }
        None => {
            let _ = writeln!(o, "Load:      not reported yet");
        }
    }
    let _ = writeln!(
        o,
        "Services:  {}",
        if services.is_empty() {
            "-".into()
        } else {
            services.join(", ")
        }
    );
    let _ = writeln!(o, "\nApps:\n{APP_HEADER}");
    if n.desired.is_empty() && n.apps.is_empty() {
        let _ = writeln!(o, "  (none)");
    }
    for d in &n.desired {
        app_line(&mut o, &n.name, n.apps.iter().find(|x| x.id == d.id));
    }
    for x in n
        .apps
        .iter()
        .filter(|x| !n.desired.iter().any(|d| d.id == x.id))
    {
        app_line(&mut o, &n.name, Some(x));
    }
    let _ = writeln!(o, "\nEvents:");
    if events.is_empty() {
        let _ = writeln!(o, "  (none)");
    }
    for e in events.iter().rev().take(15).rev() {
        let _ = write!(o, "  {}", event_line(e));
    }
    write_stdout(&o)
}

/// `shoal logs` arguments.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Examples:
  shoal logs n1 --dir ./c
  shoal logs n1 svc-web --dir ./c --tail 20
  shoal logs n1 svc-web --dir ./c --follow
The output comes from the node's agent, through the manager, over mutual TLS.
(--dir may be left out when SHOAL_DIR names the cluster directory.)")]
pub struct LogsArgs {
    #[command(flatten)]
    pub target: AdminTarget,
    /// The node.
    pub node: String,
    /// The app's id on the node (`shoal describe node NODE` lists them);
    /// may be left out when the node runs one app.
    pub app: Option<String>,
    /// Keep printing new output as the app writes it (Ctrl-C stops).
    #[arg(long, short)]
    pub follow: bool,
    /// Only the last N lines (default: everything, up to the last MiB).
    #[arg(long)]
    pub tail: Option<usize>,
}

pub async fn logs(a: LogsArgs) -> anyhow::Result<()> {
    let c = a.target.client()?;
    let app = match &a.app {
        Some(app) => app.clone(),
        None => {
            let nodes: Vec<NodeStatus> = c.get(&format!("/v1/lookup?name={}", a.node)).await?;
            let Some(n) = nodes.into_iter().next() else {
                anyhow::bail!("node {:?} is not registered; see `shoal status`", a.node);
            };
            let mut ids: Vec<String> = n.desired.iter().map(|d| d.id.clone()).collect();
            for x in &n.apps {
                if !ids.contains(&x.id) {
                    ids.push(x.id.clone());
                }
            }
            match ids.as_slice() {
                [one] => one.clone(),
                [] => anyhow::bail!("node {} runs no app", a.node),
                many => anyhow::bail!(
                    "node {} runs {} apps; name one: shoal logs {} APP (apps: {})",
                    a.node,
                    many.len(),
                    a.node,
                    many.join(", ")
                ),
            }
        }
    };
    let base = format!("/v1/nodes/{}/apps/{app}/log", a.node);
    let first = match a.tail {
        Some(n) => format!("{base}?tail={n}"),
        None => base.clone(),
    };
    let chunk: LogChunk = c.get(&first).await?;
    if let Some(e) = chunk.error {
        anyhow::bail!("{}: {e}", a.node);
    }
    write_stdout(&chunk.data)?;
    if !a.follow {
        return Ok(());
    }
    let mut offset = chunk.next_offset;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        let chunk: LogChunk = c.get(&format!("{base}?offset={offset}")).await?;
        if let Some(e) = chunk.error {
            anyhow::bail!("{}: {e}", a.node);
        }
        if chunk.next_offset < offset {
            write_stdout("--- the log was truncated; from its start ---\n")?;
        }
        offset = chunk.next_offset;
        write_stdout(&chunk.data)?;
    }
}
