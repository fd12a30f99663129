//! The `shoal` binary: one executable for every role.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "shoal", version, about = "A self-managing cluster manager")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run an L7 dispatcher for a service.
    ///
    /// Example: shoal dispatch --backends 127.0.0.1:8081,127.0.0.1:8082 --listen 127.0.0.1:8080 --algo url-hash
    Dispatch(shoal_dispatch::DispatchArgs),
    /// Explain which backend each URL goes to, and why.
    ///
    /// Example: shoal route --backends a:1,b:2,c:3 --algo url-hash --replicas 2 /prog/x.html /stat/x.html
    Route(shoal_dispatch::RouteArgs),
    /// Simulations that run shoal-core's policies on a virtual clock.
    #[command(subcommand)]
    Sim(SimCmd),
    /// Benchmarks, side by side with peers.
    #[command(subcommand)]
    Bench(BenchCmd),
}

#[derive(Subcommand)]
enum SimCmd {
    /// Locality loss of naive rehash vs subset rebuilding on every single-backend failure.
    ///
    /// Example: shoal sim locality --nodes 10 --replicas 1 --json
    Locality(shoal_sim::locality::LocalityArgs),
    /// Autoscaling policies over a workload.
    ///
    /// Example: shoal sim autoscale --workload lama-audio --policy ar --out /tmp/sim
    Autoscale(shoal_sim::autoscale::AutoscaleArgs),
}

#[derive(Subcommand)]
enum BenchCmd {
    /// shoal's dispatcher vs HAProxy vs nginx, driven by wrk.
    Dispatch(shoal_dispatch::BenchDispatchArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Sim(SimCmd::Locality(a)) => shoal_sim::locality::run(&a),
        Cmd::Sim(SimCmd::Autoscale(a)) => shoal_sim::autoscale::run(&a),
        other => runtime().and_then(|rt| {
            rt.block_on(async move {
                match other {
                    Cmd::Dispatch(a) => shoal_dispatch::run(a).await,
                    Cmd::Route(a) => shoal_dispatch::route(a).await,
                    Cmd::Bench(BenchCmd::Dispatch(a)) => shoal_dispatch::bench(a).await,
                    Cmd::Sim(_) => unreachable!("handled above"),
                }
            })
        }),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}
