//! `shoal sim locality`: the locality a URL-hashing cluster loses when one
//! backend fails, naive rehash vs subset rebuilding (Vibra thesis 4.3.3).

use shoal_core::select::locality::{LocalityLoss, locality_loss};

/// Arguments of `shoal sim locality`.
#[derive(Debug, clap::Args)]
pub struct LocalityArgs {
    /// Number of backends N (sub-namespaces).
    #[arg(long, default_value_t = 10)]
    pub nodes: usize,
    /// Replication factor R: backends serving each sub-namespace.
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// Print JSON (keys naive_avg, naive_worst, optimal_avg, optimal_worst, as fractions).
    #[arg(long)]
    pub json: bool,
}

/// Computes the losses for the arguments.
pub fn compute(args: &LocalityArgs) -> anyhow::Result<LocalityLoss> {
    Ok(locality_loss(args.nodes, args.replicas)?)
}

/// Runs the simulation and prints a table or JSON.
pub fn run(args: &LocalityArgs) -> anyhow::Result<()> {
    let l = compute(args)?;
    if args.json {
        println!("{}", serde_json::to_string(&l)?);
    } else {
        println!(
            "locality lost when one of N={} backends fails (R={}), each equally likely:",
            l.nodes, l.replicas
        );
        println!("{:<26} {:>9} {:>9}", "", "average", "worst");
        println!(
            "{:<26} {:>8.2}% {:>8.2}%",
            "naive rehash to N-1",
            l.naive_avg * 100.0,
            l.naive_worst * 100.0
        );
        println!(
            "{:<26} {:>8.2}% {:>8.2}%",
            "subset rebuilding (skip)",
            l.optimal_avg * 100.0,
            l.optimal_worst * 100.0
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_keys_and_thesis_values() {
        let l = compute(&LocalityArgs {
            nodes: 10,
            replicas: 1,
            json: true,
        })
        .unwrap();
        let v = serde_json::to_value(l).unwrap();
        for k in ["naive_avg", "naive_worst", "optimal_avg", "optimal_worst"] {
            assert!(v[k].is_f64(), "{k} missing in {v}");
        }
        assert!((v["naive_worst"].as_f64().unwrap() - 0.5).abs() < 1e-9);
        assert!((v["naive_avg"].as_f64().unwrap() - 0.37).abs() < 0.005);
        assert!((v["optimal_avg"].as_f64().unwrap() - 0.1).abs() < 1e-9);
    }

    #[test]
    fn bad_nodes_is_an_error() {
        let e = compute(&LocalityArgs {
            nodes: 1,
            replicas: 1,
            json: false,
        })
        .unwrap_err();
        assert!(e.to_string().contains("--nodes"), "{e}");
    }
}
