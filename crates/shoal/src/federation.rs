//! `shoal federation`: link this cluster with others (H-SWEB, docs/federation.md)
//! and see the federation: join, status, leave.

use crate::admin::{AdminTarget, write_stdout};
use shoal_core::federation::wire::{FederationStatus, PeerStatus};
use shoal_manager::federation::JoinBody;

/// `shoal federation` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum FederationCmd {
    /// Federate with another cluster: its manager's URL and a token it
    /// minted with `shoal token create --roles federation`. The two
    /// managers then trade client certificates of their own CAs, each pins
    /// the other's CA, and they exchange summaries from then on.
    #[command(
        after_help = "Example (on cluster west, with a token minted on east):\n  shoal federation join https://10.1.0.1:7400 --token-file east.token --dir ./west"
    )]
    Join(JoinArgs),
    /// The federated clusters: state (alive, presumed dead), last summary,
    /// the link's measured RTT and bandwidth, the exchange's interval and
    /// bytes, and this cluster's decisions per service.
    #[command(after_help = "Example:\n  shoal federation status --dir ./west --json")]
    Status(StatusArgs),
    /// Stop federating with a cluster: forgets it and revokes the
    /// certificate this cluster issued it.
    #[command(after_help = "Example:\n  shoal federation leave east --dir ./west")]
    Leave(LeaveArgs),
}

/// `shoal federation join`.
#[derive(Debug, clap::Args)]
pub struct JoinArgs {
    #[command(flatten)]
    pub target: AdminTarget,
    /// The other cluster's manager URL.
    pub url: String,
    /// Its federation token.
    #[arg(long, conflicts_with = "token_file")]
    pub token: Option<String>,
    /// A file whose first line is the token.
    #[arg(long)]
    pub token_file: Option<std::path::PathBuf>,
}

/// `shoal federation status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub target: AdminTarget,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `shoal federation leave`.
#[derive(Debug, clap::Args)]
pub struct LeaveArgs {
    #[command(flatten)]
    pub target: AdminTarget,
    /// The peer cluster's name.
    pub name: String,
}

pub async fn run(cmd: FederationCmd) -> anyhow::Result<()> {
    match cmd {
        FederationCmd::Join(a) => {
            let token = match (&a.token, &a.token_file) {
                (Some(t), _) => t.clone(),
                (None, Some(f)) => std::fs::read_to_string(f)
                    .map_err(|e| anyhow::anyhow!("--token-file {}: {e}", f.display()))?
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string(),
                (None, None) => anyhow::bail!(
                    "give the other cluster's federation token: --token T or --token-file F (mint one there with `shoal token create --roles federation`)"
                ),
            };
            let p: PeerStatus = a
                .target
                .client()?
                .post(
                    "/v1/federation/join",
                    &JoinBody {
                        url: a.url.clone(),
                        token,
                    },
                )
                .await?;
            println!(
                "federated with cluster {} at {} (certificates good until {})",
                p.cluster,
                p.url,
                crate::admin::fmt_time_ms(p.expires_ms)
            );
            Ok(())
        }
        FederationCmd::Status(a) => {
            let st: FederationStatus = a.target.client()?.get("/v1/federation").await?;
            let text = if a.json {
                serde_json::to_string_pretty(&st)? + "\n"
            } else {
                render(&st)
            };
            write_stdout(&text)
        }
        FederationCmd::Leave(a) => {
            let v: serde_json::Value = a
                .target
                .client()?
                .send(
                    reqwest::Method::DELETE,
                    &format!("/v1/federation/peers/{}", a.name),
                    &serde_json::json!({}),
                )
                .await?;
            println!(
                "left cluster {}; certificate {} revoked",
                a.name,
                v["revoked"].as_str().unwrap_or("?")
            );
            Ok(())
        }
    }
}

/// The human form of `shoal federation status`.
pub fn render(st: &FederationStatus) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(o, "cluster {}", st.cluster);
    if st.peers.is_empty() {
        let _ = writeln!(
            o,
            "no federated cluster (link one with `shoal federation join URL --token-file F`)"
        );
    } else {
        let _ = writeln!(
            o,
            "{:<12} {:<14} {:>9} {:>8} {:>9} {:>9} {:>11} {:>11}",
            "PEER", "STATE", "HEARD", "RTT", "MBIT/S", "INTERVAL", "SENT", "RECEIVED"
        );
        for p in &st.peers {
            let heard = p
                .last_heard_ms_ago
                .map_or("-".to_string(), |ms| format!("{:.1}s ago", ms as f64 / 1e3));
            let _ = writeln!(
                o,
                "{:<12} {:<14} {:>9} {:>6.1}ms {:>9.2} {:>8.1}s {:>11} {:>11}",
                p.cluster,
                p.state,
                heard,
                p.link.rtt_ms,
                p.link.mbit,
                p.interval_ms as f64 / 1e3,
                p.bytes_sent,
                p.bytes_received
            );
            if let Some(e) = &p.last_error {
                let _ = writeln!(o, "  last error: {e}");
            }
            for s in &p.summaries {
                let _ = writeln!(
                    o,
                    "  {:<12} dispatcher {:<21} nodes {:>3}  load avg {:.2} low {:.2}  objects {}",
                    s.service,
                    s.dispatcher,
                    s.nodes,
                    s.avg_load,
                    s.lowest_load,
                    s.objects.len()
                );
            }
        }
    }
    for (svc, d) in &st.decisions {
        let _ = writeln!(
            o,
            "decisions {svc}: local {} (after consulting {}), fetched {}, redirected {}, from peers {}",
            d.local + d.local_consulted,
            d.local_consulted,
            d.fetch,
            d.redirect,
            d.from_peers
        );
    }
    o
}
