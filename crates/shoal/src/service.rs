//! `shoal service`: define, list, show and delete services on the shared pool.

use crate::admin::{AdminTarget, write_stdout};
use anyhow::Context;
use shoal_net::wire::*;
use std::path::PathBuf;

/// Shown by both -h and --help, line for line (a doc comment would be
/// re-wrapped into one paragraph, and hidden from -h).
const APPLY_HELP: &str = "\
Example file, web.toml (every key, its type and default: docs/services.md):
  name = \"web\"
  min_nodes = 1
  max_nodes = 4
  policy = \"threshold\"      # threshold | ar | hpa | predictive

  [app]
  adaptor = \"www\"           # www | nginx | process
  port = 8081
  params = { listen = \"{{ node_address }}:{{ port }}\", root = \"/srv/www\" }

  [metric]
  kind = \"dispatch_rps\"     # net | cpu | dispatch_active | dispatch_rps
  capacity = 100             # one node's capacity in that unit

Example:
  shoal service apply web.toml --dir ./c
(--dir may be left out when SHOAL_DIR names the cluster directory.)";

/// `shoal service` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ServiceCmd {
    /// Define or change a service from a TOML file (format: docs/services.md).
    #[command(after_help = APPLY_HELP)]
    Apply(ApplyArgs),
    /// List services with their nodes.
    #[command(
        after_help = "Example:\n  shoal service list --dir ./c\n  shoal service list --dir ./c --json\n(--dir may be left out when SHOAL_DIR names the cluster directory.)"
    )]
    List(ListArgs),
    /// One service: definition, allocations, backends, monitor series.
    #[command(
        after_help = "Example:\n  shoal service show web --dir ./c\n  shoal service show web --dir ./c --json | jq '.series[-1]'\n(--dir may be left out when SHOAL_DIR names the cluster directory.)"
    )]
    Show(ShowArgs),
    /// Delete a service; its nodes drain and return to the pool.
    #[command(
        after_help = "Example:\n  shoal service delete web --dir ./c\n(--dir may be left out when SHOAL_DIR names the cluster directory.)"
    )]
    Delete(DeleteArgs),
}

/// `shoal service apply`.
#[derive(Debug, clap::Args)]
pub struct ApplyArgs {
    #[command(flatten)]
    pub target: AdminTarget,
    /// The service definition (TOML).
    pub file: PathBuf,
}

/// `shoal service list`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub target: AdminTarget,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `shoal service show`.
#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    #[command(flatten)]
    pub target: AdminTarget,
    /// Service name.
    pub name: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `shoal service delete`.
#[derive(Debug, clap::Args)]
pub struct DeleteArgs {
    #[command(flatten)]
    pub target: AdminTarget,
    /// Service name.
    pub name: String,
}

/// Runs a `shoal service` subcommand.
pub async fn run(cmd: ServiceCmd) -> anyhow::Result<()> {
    match cmd {
        ServiceCmd::Apply(a) => {
            let text = std::fs::read_to_string(&a.file)
                .with_context(|| format!("cannot read {}", a.file.display()))?;
            // Checked here first so the error names the file; the manager
            // checks again before it acknowledges anything.
            let spec = shoal_manager::services::parse_toml(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", a.file.display()))?;
            let r: serde_json::Value = a
                .target
                .client()?
                .send(
                    reqwest::Method::PUT,
                    &format!("/v1/services/{}", spec.name),
                    &spec,
                )
                .await?;
            let created = r["created"].as_bool().unwrap_or(false);
            println!(
                "service {} {}",
                spec.name,
                if created { "created" } else { "updated" }
            );
            Ok(())
        }
        ServiceCmd::List(a) => {
            let list: Vec<ServiceStatus> = a.target.client()?.get("/v1/services").await?;
            let text = if a.json {
                serde_json::to_string_pretty(&list)? + "\n"
            } else {
                render_list(&list)
            };
            write_stdout(&text)
        }
        ServiceCmd::Show(a) => {
            let d: ServiceDetail = a
                .target
                .client()?
                .get(&format!("/v1/services/{}", a.name))
                .await?;
            let text = if a.json {
                serde_json::to_string_pretty(&d)? + "\n"
            } else {
                render_detail(&d)
            };
            write_stdout(&text)
        }
        ServiceCmd::Delete(a) => {
            let _: serde_json::Value = a
                .target
                .client()?
                .send(
                    reqwest::Method::DELETE,
                    &format!("/v1/services/{}", a.name),
                    &(),
                )
                .await?;
            println!(
                "service {} deleted; its nodes drain and return to the pool",
                a.name
            );
            Ok(())
        }
    }
}

/// A metric's name as the service file writes it (`net`, `dispatch_rps`).
pub fn metric_name(k: MetricKind) -> String {
    serde_json::to_value(k)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{x:.1}"))
}

fn render_list(list: &[ServiceStatus]) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<16} {:<11} {:>9} {:>9}  NODES",
        "SERVICE", "POLICY", "LOAD", "FORECAST"
    );
    for s in list {
        let nodes: Vec<String> = s
            .nodes
            .iter()
            .map(|n| {
                if s.starting.contains(n) {
                    format!("{n}(starting)")
                } else if s.draining.contains(n) {
                    format!("{n}(draining)")
                } else {
                    n.clone()
                }
            })
            .collect();
        let _ = writeln!(
            o,
            "{:<16} {:<11} {:>9} {:>9}  {}",
            if s.deleting {
                format!("{} (deleting)", s.name)
            } else {
                s.name.clone()
            },
            s.policy,
            fmt_opt(s.usage),
            fmt_opt(s.forecast),
            if nodes.is_empty() {
                "0".into()
            } else {
                format!("{}: {}", nodes.len(), nodes.join(" "))
            }
        );
    }
    if list.is_empty() {
        let _ = writeln!(
            o,
            "(no services; define one with `shoal service apply FILE.toml`)"
        );
    }
    o
}

fn render_detail(d: &ServiceDetail) -> String {
    use std::fmt::Write;
    let mut o = render_list(std::slice::from_ref(&d.status));
    if let Some(s) = &d.spec {
        let _ = writeln!(
            o,
            "\nmetric {} with capacity {} per node; {} to {} nodes; priority {}; sla upper {} lower {}; lead time {} s; drain timeout {} s",
            metric_name(s.metric.kind),
            s.metric.capacity,
            s.min_nodes,
            s.max_nodes,
            s.priority,
            s.sla.upper,
            s.sla.lower,
            s.lead_time_secs,
            s.drain_timeout_secs
        );
    }
    let _ = writeln!(o, "\nbackends (version {}):", d.backends.version);
    for b in &d.backends.backends {
        let _ = writeln!(
            o,
            "  {:<22} {:<14} weight {}{}",
            b.address,
            b.node,
            b.weight,
            if b.draining { " draining" } else { "" }
        );
    }
    if let Some(r) = &d.status.last_decision {
        let _ = writeln!(o, "\nlast decision: {r}");
    }
    let _ = writeln!(
        o,
        "\nrecent samples:\n  {:<36} {:>9} {:>9} {:>9}",
        "TIME", "OBSERVED", "FORECAST", "ALLOCATED"
    );
    for p in d.series.iter().rev().take(10).rev() {
        let _ = writeln!(
            o,
            "  {:<36} {:>9} {:>9} {:>9}",
            crate::admin::fmt_time_ms(p.at_ms),
            format!("{:.2}", p.observed),
            fmt_opt(p.forecast),
            p.allocated
        );
    }
    o
}
