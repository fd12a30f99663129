//! Placeholder until this simulation is built.

/// Arguments of this simulation.
#[derive(Debug, clap::Args)]
pub struct AutoscaleArgs {}

/// Runs the simulation.
pub fn run(_args: &AutoscaleArgs) -> anyhow::Result<()> {
    anyhow::bail!("this simulation is not built yet")
}
