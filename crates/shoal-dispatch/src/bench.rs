//! `shoal bench dispatch`: shoal vs HAProxy vs nginx, driven by wrk.

/// `shoal bench dispatch` arguments.
#[derive(Debug, clap::Args)]
pub struct BenchDispatchArgs {}

pub async fn run(_args: BenchDispatchArgs) -> anyhow::Result<()> {
    anyhow::bail!("shoal bench dispatch is not built yet")
}
