//! shoal-dispatch: the L7 dispatcher (placeholder until built).

/// `shoal dispatch` arguments.
#[derive(Debug, clap::Args)]
pub struct DispatchArgs {}
/// `shoal route` arguments.
#[derive(Debug, clap::Args)]
pub struct RouteArgs {}
/// `shoal bench dispatch` arguments.
#[derive(Debug, clap::Args)]
pub struct BenchDispatchArgs {}

/// Runs the dispatcher until interrupted.
pub async fn run(_args: DispatchArgs) -> anyhow::Result<()> {
    anyhow::bail!("the dispatcher is not built yet")
}
/// Explains routing decisions.
pub async fn route(_args: RouteArgs) -> anyhow::Result<()> {
    anyhow::bail!("shoal route is not built yet")
}
/// Runs the dispatch benchmark.
pub async fn bench(_args: BenchDispatchArgs) -> anyhow::Result<()> {
    anyhow::bail!("shoal bench dispatch is not built yet")
}
