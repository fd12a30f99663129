//! `shoal job`: parallel jobs whose units' CPU shares follow the critical
//! path (DPS, docs/dps.md): run, list, show, stop.

use crate::admin::{AdminTarget, write_stdout};
use anyhow::Context;
use shoal_core::shares::spec::{JobSpec, JobStatus};
use std::path::PathBuf;

const RUN_HELP: &str = "\
Example file, chain.toml (every key: docs/dps.md):
  name = \"chain\"
  units = 4
  max_cpu = 0.8            # W: the job's CPUs, W/N per unit to start
  mode = \"bank\"            # bank | distributed | static
  period = \"5s\"            # T, how often units report
  bank_period = \"5s\"       # B, how often the bank pays out

  [bsp]                    # the built-in benchmark (or [command])
  pattern = \"chain\"        # chain | all-to-all
  iterations = 100
  work = 100               # unit 1's millions of multiply-adds per iteration

Example:
  shoal job run chain.toml --dir ./c
(--dir may be left out when SHOAL_DIR names the cluster directory.)";

/// `shoal job` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum JobCmd {
    /// Place a job's units on nodes and start them (format: docs/dps.md).
    #[command(after_help = RUN_HELP)]
    Run(RunArgs),
    /// Jobs with their units' shares.
    #[command(after_help = "Example:\n  shoal job list --dir ./c --json")]
    List(ListArgs),
    /// One job: units, nodes, shares, use, upstream units, the bank.
    #[command(after_help = "Example:\n  shoal job show chain --dir ./c")]
    Show(NameArgs),
    /// Stop a job: its units leave their nodes.
    #[command(after_help = "Example:\n  shoal job stop chain --dir ./c")]
    Stop(NameArgs),
    /// Move one unit to another node: it restarts there after the last
    /// iteration it reported (the manager also does this by itself on a
    /// full node, unless the job says `migrate = false`).
    #[command(after_help = "Example:\n  shoal job migrate chain 2 --to n5 --dir ./c")]
    Migrate(MigrateArgs),
}

/// `shoal job migrate`.
#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub target: AdminTarget,
    /// Job name.
    pub name: String,
    /// The unit's index (from 0).
    pub unit: usize,
    /// The node to move it to.
    #[arg(long)]
    pub to: String,
}

/// `shoal job run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub target: AdminTarget,
    /// The job definition (TOML).
    pub file: PathBuf,
}

/// `shoal job list`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub target: AdminTarget,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `shoal job show|stop`.
#[derive(Debug, clap::Args)]
pub struct NameArgs {
    #[command(flatten)]
    pub target: AdminTarget,
    /// Job name.
    pub name: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Parses and checks a job file, naming the file and the field.
pub fn parse(file: &std::path::Path) -> anyhow::Result<JobSpec> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let spec: JobSpec = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: {}", file.display(), e.message()))?;
    spec.validate()
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    Ok(spec)
}

fn render(list: &[JobStatus]) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    for j in list {
        let _ = writeln!(
            o,
            "job {}: {} units, W = {} CPUs, {} exchange, bank {:.3}, accounted {:.3}{}",
            j.spec.name,
            j.spec.units,
            j.spec.max_cpu,
            j.spec.mode,
            j.bank,
            j.accounted,
            if j.finished { ", finished" } else { "" }
        );
        let _ = writeln!(
            o,
            "  {:>4} {:<16} {:>7} {:>7} {:>10}  UPSTREAM",
            "UNIT", "NODE", "SHARE", "USED", "ITERATIONS"
        );
        for u in &j.units {
            let _ = writeln!(
                o,
                "  {:>4} {:<16} {:>7.3} {:>7.3} {:>10}  {:?}",
                u.unit,
                u.node,
                u.share,
                u.used,
                u.iterations.map_or("-".into(), |i| i.to_string()),
                u.upstream
            );
        }
        for b in &j.bottlenecks {
            let _ = writeln!(o, "  bottleneck {b}");
        }
        for m in &j.migrations {
            let _ = writeln!(o, "  migrated {m}");
        }
    }
    o
}

/// Runs a `shoal job` subcommand.
pub async fn run(cmd: JobCmd) -> anyhow::Result<()> {
    match cmd {
        JobCmd::Run(a) => {
            let spec = parse(&a.file)?;
            let st: JobStatus = a
                .target
                .client()?
                .send(
                    reqwest::Method::PUT,
                    &format!("/v1/jobs/{}", spec.name),
                    &spec,
                )
                .await?;
            let nodes: Vec<&str> = st.units.iter().map(|u| u.node.as_str()).collect();
            println!("job {} started: units on {}", spec.name, nodes.join(", "));
            Ok(())
        }
        JobCmd::List(a) => {
            let list: Vec<JobStatus> = a.target.client()?.get("/v1/jobs").await?;
            let text = if a.json {
                serde_json::to_string_pretty(&list)? + "\n"
            } else {
                render(&list)
            };
            write_stdout(&text)
        }
        JobCmd::Show(a) => {
            let j: JobStatus = a
                .target
                .client()?
                .get(&format!("/v1/jobs/{}", a.name))
                .await?;
            let text = if a.json {
                serde_json::to_string_pretty(&j)? + "\n"
            } else {
                render(std::slice::from_ref(&j))
            };
            write_stdout(&text)
        }
        JobCmd::Migrate(a) => {
            let j: JobStatus = a
                .target
                .client()?
                .send(
                    reqwest::Method::POST,
                    &format!("/v1/jobs/{}/migrate", a.name),
                    &serde_json::json!({"unit": a.unit, "to": a.to}),
                )
                .await?;
            let last = j.migrations.last().map_or("", String::as_str);
            println!("job {}: {last}", a.name);
            Ok(())
        }
        JobCmd::Stop(a) => {
            let _: serde_json::Value = a
                .target
                .client()?
                .send(
                    reqwest::Method::DELETE,
                    &format!("/v1/jobs/{}", a.name),
                    &(),
                )
                .await?;
            println!("job {} stopped; its units leave their nodes", a.name);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_job_file_with_a_bad_field_names_it() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("j.toml");
        std::fs::write(&p, "name = \"a\"\nunits = 2\nmax_cpu = -1\n[bsp]\n").unwrap();
        let e = super::parse(&p).unwrap_err().to_string();
        assert!(e.contains("max_cpu"), "{e}");
        std::fs::write(
            &p,
            "name = \"a\"\nunits = 2\nmax_cpu = 1\nmode = \"banker\"\n[bsp]\n",
        )
        .unwrap();
        let e = super::parse(&p).unwrap_err().to_string();
        assert!(e.contains("distributed"), "{e}");
    }
}
