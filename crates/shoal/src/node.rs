//! `shoal node cordon|uncordon|drain NODE`: an operator's actions on
//! a node, decided by the manager's controller.

use crate::admin::AdminTarget;

/// Arguments of a node action.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Examples:
  shoal node cordon n1 --dir ./c     # takes no new allocation
  shoal node drain n1 --dir ./c      # cordon, and move its allocation elsewhere
  shoal node uncordon n1 --dir ./c   # may take allocations again")]
pub struct NodeActionArgs {
    #[command(flatten)]
    pub target: AdminTarget,
    /// The node.
    pub node: String,
}

/// Asks the manager to `action` the node.
pub async fn act(action: &str, a: NodeActionArgs) -> anyhow::Result<()> {
    let c = a.target.client()?;
    let _: serde_json::Value = c
        .post(
            &format!("/v1/nodes/{}/{action}", a.node),
            &serde_json::json!({}),
        )
        .await?;
    let what = match action {
        "cordon" => "cordoned: it takes no new allocation",
        "uncordon" => "uncordoned: it may take allocations again",
        "drain" => {
            "draining: cordoned, and its allocation moves elsewhere through the normal drain (watch `shoal status`)"
        }
        _ => "done",
    };
    println!("{} {what}", a.node);
    Ok(())
}
