//! The `shoal` binary: one executable for every role.

use clap::{Parser, Subcommand};

mod admin;
mod bench_agents;
mod bench_dps;
mod bench_federation;
mod bench_overlay;
mod bench_stream;
mod bench_timestamps;
mod bench_vibra;
mod federation;
mod inspect;
mod job;
mod node;
mod overlay;
mod overlay_apps;
mod overlay_utility;
mod service;
mod stream;
mod up;
mod up_selfdeploy;

#[derive(Parser)]
#[command(name = "shoal", version, about = "A self-managing cluster manager")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// A whole local cluster with a demo service, load and the live dashboard.
    ///
    /// Example: shoal up --nodes 4 --workload ramp --duration 60s --speed 10
    Up(up::UpArgs),
    /// Create a cluster identity: CA, manager and administrator certificates, join token.
    Init(admin::InitArgs),
    /// Join tokens: print the first, create, list, revoke.
    Token(admin::TokenArgs),
    /// Run the manager: lookup service with leases, HTTPS API.
    Manager(ManagerCmdArgs),
    /// Run a node agent: join, hold a lease, report load, run assigned apps
    /// (with --overlay, also the host's overlay peer).
    Agent(AgentCmdArgs),
    /// Show nodes, leases, load, apps and services.
    Status(admin::StatusArgs),
    /// The manager's event and decision log, with reasons (--follow for live).
    Events(inspect::EventsArgs),
    /// An app's output on a node, fetched from its agent (--follow for live).
    Logs(inspect::LogsArgs),
    /// One service or node in detail: apps, last errors, decisions, events.
    #[command(subcommand)]
    Describe(inspect::DescribeCmd),
    /// Certificates: dispatchers', the nodes' (listed), revocation.
    #[command(subcommand)]
    Cert(admin::CertCmd),
    /// Node administration.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Services on the shared pool: apply, list, show, delete.
    #[command(subcommand)]
    Service(service::ServiceCmd),
    /// Parallel jobs whose CPU shares follow the critical path (DPS):
    /// run, list, show, stop.
    #[command(subcommand)]
    Job(job::JobCmd),
    /// Federation with clusters in other places (H-SWEB): join, status,
    /// leave. A service with `[federation]` then sends each request where
    /// it finishes first.
    #[command(subcommand)]
    Federation(federation::FederationCmd),
    /// The built-in static file server (the default demo app).
    Www(shoal_agent::www::WwwArgs),
    /// Run an L7 dispatcher for a service.
    ///
    /// Example: shoal dispatch --backends 127.0.0.1:8081,127.0.0.1:8082 --listen 127.0.0.1:8080 --algo url-hash
    Dispatch(Box<shoal_dispatch::DispatchArgs>),
    /// The timestamping UDP relay in front of game servers: each datagram
    /// goes on with the kernel's arrival time in front (docs/timestamps.md).
    ///
    /// Example: shoal relay --listen 127.0.0.1:27960 --backends 127.0.0.1:27961 --admin 127.0.0.1:9190
    Relay(shoal_dispatch::relay::RelayArgs),
    /// The thesis's game server model: opens, digests and seals every
    /// input, sends 20 updates a second, measures both timestamp errors.
    ///
    /// Example: shoal game-server --listen 127.0.0.1:27961 --duration 10s
    GameServer(shoal_dispatch::game::GameServerArgs),
    /// Game clients: 296-byte inputs as a Poisson process, 20 a second each.
    ///
    /// Example: shoal game-client --server 127.0.0.1:27960 --clients 4 --duration 10s
    GameClient(shoal_dispatch::game::GameClientArgs),
    /// Explain which backend each URL goes to, and why.
    ///
    /// Example: shoal route --backends a:1,b:2,c:3 --algo url-hash --replicas 2 /prog/x.html /stat/x.html
    Route(shoal_dispatch::RouteArgs),
    /// The epidemic overlay (SMON): run a peer, set the target list, ask a peer.
    #[command(subcommand)]
    Overlay(overlay::OverlayCmd),
    /// The overlay's auth agent (SMON II-B): holds the SSH key and signs
    /// logins for overlay peers, only for hosts of its target list.
    ///
    /// Example: shoal auth-agent --dir ./agent --key id_ed25519 --listen 10.0.0.100:7947 --targets targets.toml
    AuthAgent(overlay::AuthAgentArgs),
    /// One unit of the built-in BSP benchmark (DPS, thesis §5.5.1): receive
    /// from a neighbour, compute (unit i does 1/i), send 1 KB on.
    Bsp(shoal_agent::bsp::BspArgs),
    /// Simulations that run shoal-core's policies on a virtual clock.
    #[command(subcommand)]
    Sim(SimCmd),
    /// Benchmarks, side by side with peers.
    #[command(subcommand)]
    Bench(BenchCmd),
}

#[derive(Subcommand)]
enum NodeCmd {
    /// Set (or with --remove, drop) an app in a node's desired state.
    Assign(admin::AssignArgs),
    /// The node takes no new allocation.
    Cordon(node::NodeActionArgs),
    /// The node may take allocations again.
    Uncordon(node::NodeActionArgs),
    /// Cordon the node and move its allocation elsewhere through a drain.
    Drain(node::NodeActionArgs),
    /// Forget a failed node (an alive one must be drained and stopped
    /// first): its registration, its name and its certificate.
    Remove(admin::RemoveArgs),
    /// Set the roles a node may register with (its join token's, until
    /// changed here).
    Roles(admin::RolesArgs),
}

#[derive(Subcommand)]
enum SimCmd {
    /// Locality loss of naive rehash vs subset rebuilding on every single-backend failure.
    ///
    /// Example: shoal sim locality --nodes 10 --replicas 1 --json
    Locality(shoal_sim::locality::LocalityArgs),
    /// Autoscaling policies over a workload, run by the controller (one
    /// service through `sim cluster`); --frontier sweeps their settings.
    ///
    /// Example: shoal sim autoscale --workload lama-audio --policy ar --out /tmp/sim
    Autoscale(shoal_sim::autoscale::AutoscaleArgs),
    /// The manager's controller on a virtual clock: a whole pool with
    /// virtual agents and dispatchers, faults and invariants.
    Cluster(shoal_sim::cluster::ClusterArgs),
    /// SMON's self-deployment from one seeded peer, against the paper's
    /// analysis (Y_r, E(X'), one ping per peer per round, Table II).
    ///
    /// Example: shoal sim overlay --hosts 10000 --seed 1 --json
    Overlay(shoal_sim::overlay::OverlayArgs),
    /// DPS (thesis ch. 5) over BSP programs on simulated hosts: static
    /// shares against the exchange, Fig. 5.9 and 5.10.
    ///
    /// Example: shoal sim dps --hosts 16 --instances 1,4,8,10,11,16 --json
    Dps(shoal_sim::dps::DpsArgs),
}

/// `shoal manager`, and the overlay it shows on its dashboard.
#[derive(clap::Args)]
struct ManagerCmdArgs {
    #[command(flatten)]
    manager: shoal_manager::ManagerArgs,
    /// Show the overlay on the dashboard: the overlay key, with which the
    /// manager surveys every peer every 2 s (`shoal overlay status --all`).
    #[arg(long, requires = "overlay_peer")]
    overlay_key: Option<std::path::PathBuf>,
    /// The peer the survey starts from (ADDR or ADDR:PORT).
    #[arg(long, requires = "overlay_key", value_parser = overlay::peer_addr)]
    overlay_peer: Option<std::net::SocketAddr>,
}

/// `shoal agent`: the agent, and the overlay peer of a host the overlay
/// deployed.
#[derive(clap::Args)]
struct AgentCmdArgs {
    #[command(flatten)]
    agent: shoal_agent::AgentArgs,
    /// Run as the overlay host installed under PREFIX (how the overlay
    /// starts it: `shoal overlay start`): its peer pings, deploys and
    /// recovers the pool, and, if the pool has a manager, this agent joins
    /// it with the deploy token its deployer shipped, keeping its identity
    /// in PREFIX/agent (--dir and --name are taken from there).
    #[arg(long, value_name = "PREFIX")]
    overlay: Option<std::path::PathBuf>,
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Many virtual agents renewing leases against a real manager.
    Agents(bench_agents::BenchAgentsArgs),
    /// Failure-detection time over repeated kill -9 of real agents.
    Detection(bench_agents::BenchDetectionArgs),
    /// shoal's dispatcher vs HAProxy vs nginx, driven by wrk.
    Dispatch(shoal_dispatch::BenchDispatchArgs),
    /// SMON's self-deployment and recovery over namespace hosts running
    /// sshd, against Ansible and Serf on the same hosts (root).
    ///
    /// Example: shoal bench overlay --hosts 16 --runs 5 --interval 1s --json
    Overlay(bench_overlay::BenchOverlayArgs),
    /// Host-side (relay) against server-side arrival timestamps as game
    /// servers are packed onto one CPU, thesis ch. 6 (root).
    ///
    /// Example: shoal bench timestamps --servers 1,5,10,20,30,40 --duration 8s --json
    Timestamps(bench_timestamps::BenchTimestampsArgs),
    /// DPS live: a 4-unit chain on 4 emulated hosts (cgroups), static
    /// shares against the exchange and the bank, and migration (root).
    ///
    /// Example: shoal bench dps --shares 0.1 --json
    Dps(bench_dps::BenchDpsArgs),
    /// Vibra's bandwidth reallocation and failure compensation on
    /// namespace hosts, against rr, lc, lard and lard-r (root).
    ///
    /// Example: shoal bench vibra --duration 40s --caps 2.4,2.7,3.0 --json
    Vibra(bench_vibra::BenchVibraArgs),
    /// H-SWEB between two real clusters in a private network namespace:
    /// Table 1's decisions, speedups over local-only and always-redirect,
    /// CPU shedding, a dead peer, the exchange's overhead (root).
    ///
    /// Example: shoal bench federation --json
    Federation(bench_federation::BenchFederationArgs),
    /// LAMA's audio-streaming experiment live: icecast relays placed by
    /// the controller on namespace hosts with tc caps, listeners arriving
    /// and leaving as LAMA's workload does (root, icecast2).
    ///
    /// Example: shoal bench stream --saturate --levels 600,700,750,800 --hold 10s
    Stream(bench_stream::BenchStreamArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SHOAL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal: `up`, tests and service managers send
        // stderr to log files, where escapes are noise.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.cmd {
        Cmd::Sim(SimCmd::Locality(a)) => shoal_sim::locality::run(&a),
        Cmd::Sim(SimCmd::Autoscale(a)) => shoal_sim::autoscale::run(&a),
        Cmd::Sim(SimCmd::Cluster(a)) => shoal_sim::cluster::run(&a),
        Cmd::Sim(SimCmd::Overlay(a)) => shoal_sim::overlay::run(&a),
        Cmd::Sim(SimCmd::Dps(a)) => shoal_sim::dps::run(&a),
        Cmd::Bench(BenchCmd::Dps(a)) => bench_dps::run(a),
        Cmd::Bsp(a) => shoal_agent::bsp::run(a),
        // Blocking (processes, namespaces) with its own small runtime.
        Cmd::Bench(BenchCmd::Overlay(a)) => bench_overlay::run(a),
        Cmd::Bench(BenchCmd::Timestamps(a)) => bench_timestamps::run(a),
        Cmd::Bench(BenchCmd::Vibra(a)) => bench_vibra::run(a),
        Cmd::Bench(BenchCmd::Federation(a)) => bench_federation::run(a),
        Cmd::Bench(BenchCmd::Stream(a)) => bench_stream::run(a),
        Cmd::Init(a) => admin::init(a),
        Cmd::Token(a) => admin::token(a),
        Cmd::Cert(admin::CertCmd::Dispatcher(a)) => admin::cert_dispatcher(a),
        Cmd::Www(a) => shoal_agent::www::run(a),
        Cmd::Relay(a) => shoal_dispatch::relay::run(a),
        Cmd::GameServer(a) => shoal_dispatch::game::server(a),
        Cmd::GameClient(a) => shoal_dispatch::game::client(a),
        other => runtime().and_then(|rt| {
            rt.block_on(async move {
                match other {
                    Cmd::Dispatch(a) => shoal_dispatch::run(*a).await,
                    Cmd::Route(a) => shoal_dispatch::route(a).await,
                    Cmd::Bench(BenchCmd::Dispatch(a)) => shoal_dispatch::bench(a).await,
                    Cmd::Manager(a) => {
                        raise_nofile();
                        let mut m = a.manager;
                        if let Some(key) = a.overlay_key {
                            m.overlay = overlay::survey_for_dashboard(key, a.overlay_peer)?;
                        }
                        shoal_manager::run(m).await
                    }
                    Cmd::Agent(a) => match a.overlay {
                        Some(prefix) => overlay::agent_with_overlay(a.agent, prefix).await,
                        None => shoal_agent::run(a.agent).await,
                    },
                    Cmd::Status(a) => admin::status(a).await,
                    Cmd::Events(a) => inspect::events(a).await,
                    Cmd::Logs(a) => inspect::logs(a).await,
                    Cmd::Describe(c) => inspect::describe(c).await,
                    Cmd::Node(NodeCmd::Assign(a)) => admin::assign(a).await,
                    Cmd::Node(NodeCmd::Cordon(a)) => node::act("cordon", a).await,
                    Cmd::Node(NodeCmd::Uncordon(a)) => node::act("uncordon", a).await,
                    Cmd::Node(NodeCmd::Drain(a)) => node::act("drain", a).await,
                    Cmd::Node(NodeCmd::Remove(a)) => admin::remove(a).await,
                    Cmd::Node(NodeCmd::Roles(a)) => admin::node_roles(a).await,
                    Cmd::Cert(admin::CertCmd::List(a)) => admin::cert_list(a).await,
                    Cmd::Cert(admin::CertCmd::Revoke(a)) => admin::cert_revoke(a).await,
                    Cmd::Service(c) => service::run(c).await,
                    Cmd::Job(c) => job::run(c).await,
                    Cmd::Federation(c) => federation::run(c).await,
                    Cmd::Up(a) => up::run(a).await,
                    Cmd::Overlay(c) => overlay::run(c).await,
                    Cmd::AuthAgent(a) => overlay::auth_agent(a).await,
                    Cmd::Bench(BenchCmd::Agents(a)) => bench_agents::run(a).await,
                    Cmd::Bench(BenchCmd::Detection(a)) => bench_agents::detection(a).await,
                    Cmd::Sim(_)
                    | Cmd::Bench(BenchCmd::Overlay(_))
                    | Cmd::Bench(BenchCmd::Timestamps(_))
                    | Cmd::Bench(BenchCmd::Dps(_))
                    | Cmd::Bsp(_)
                    | Cmd::Bench(BenchCmd::Vibra(_))
                    | Cmd::Bench(BenchCmd::Federation(_))
                    | Cmd::Bench(BenchCmd::Stream(_))
                    | Cmd::Init(_)
                    | Cmd::Token(_)
                    | Cmd::Www(_)
                    | Cmd::Relay(_)
                    | Cmd::GameServer(_)
                    | Cmd::GameClient(_)
                    | Cmd::Cert(admin::CertCmd::Dispatcher(_)) => {
                        unreachable!("handled above")
                    }
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
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Servers holding thousands of connections need more than the default soft
/// limit of open files; raise it to the hard limit.
pub(crate) fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}
