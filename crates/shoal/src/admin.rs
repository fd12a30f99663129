//! Administrator commands: init, token, status, node assign.

use anyhow::Context;
use shoal_net::client::ApiClient;
use shoal_net::identity::{ClusterConfig, ClusterDir, Token, validate_node_name};
use shoal_net::wire::*;
use std::path::PathBuf;

/// Where the administrator's cluster directory is.
#[derive(Debug, Clone, clap::Args)]
pub struct AdminTarget {
    /// The cluster directory (holds admin.pem and the manager's address).
    #[arg(long, env = "SHOAL_DIR")]
    pub dir: Option<PathBuf>,
    /// The manager's URL, overriding the one recorded in the directory.
    #[arg(long)]
    pub manager: Option<String>,
}

impl AdminTarget {
    pub fn client(&self) -> anyhow::Result<ApiClient> {
        Ok(ApiClient::admin(
            &ClusterDir::new(cluster_dir(self.dir.as_deref())?),
            self.manager.as_deref(),
        )?)
    }
}

/// The cluster directory from --dir or SHOAL_DIR. Optional in clap so that
/// its absence gets this message, which names both ways to give it, rather
/// than clap's, which names only --dir.
pub fn cluster_dir(dir: Option<&std::path::Path>) -> anyhow::Result<&std::path::Path> {
    dir.ok_or_else(|| {
        anyhow::anyhow!(
            "no cluster directory: pass --dir DIR or set SHOAL_DIR=DIR (the directory `shoal init` wrote, holding admin.pem)"
        )
    })
}

/// A unix-ms time as a UTC wall clock: `2026-12-01 21:40:12`.
pub fn fmt_at_ms(ms: u64) -> String {
    let fmt = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| t.format(&fmt).ok())
        .unwrap_or_else(|| "-".into())
}

/// A unix-ms time for people: `2026-12-01 21:40:12 UTC (8 s ago)`.
pub fn fmt_time_ms(ms: u64) -> String {
    let at = format!("{} UTC", fmt_at_ms(ms));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    match now.checked_sub(ms) {
        Some(ago) => format!("{at} ({} ago)", fmt_secs(ago as f64 / 1000.0)),
        None => at,
    }
}

/// A length of time for people: `8 s`, `3 min 5 s`, `2 h 10 min`.
pub fn fmt_secs(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

/// `shoal init` arguments.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Example:\n  shoal init --dir /var/lib/shoal\n  shoal init --dir ./c --listen 0.0.0.0:7400 --url https://10.0.0.1:7400"
)]
pub struct InitArgs {
    /// Where to write the cluster identity.
    #[arg(long, env = "SHOAL_DIR")]
    pub dir: Option<PathBuf>,
    /// Replace an existing identity (every node must join again).
    #[arg(long)]
    pub force: bool,
    /// Address the manager will listen on.
    #[arg(long, default_value = "127.0.0.1:7400")]
    pub listen: String,
    /// URL agents and administrators use to reach the manager (default:
    /// https://<listen>).
    #[arg(long)]
    pub url: Option<String>,
    /// Lease TTL (e.g. 6s, 1500ms).
    #[arg(long, default_value = "6s", value_parser = shoal_core::duration::parse_positive_secs)]
    pub lease_ttl: f64,
    /// The cluster's name among federated clusters (`shoal federation`);
    /// default: `c` and 8 hex digits of its CA's fingerprint.
    #[arg(long)]
    pub name: Option<String>,
}

pub fn init(a: InitArgs) -> anyhow::Result<()> {
    let sa: std::net::SocketAddr = a
        .listen
        .parse()
        .with_context(|| format!("--listen {:?} must be IP:PORT", a.listen))?;
    let url = a.url.clone().unwrap_or_else(|| {
        let host = if sa.ip().is_unspecified() {
            "127.0.0.1".to_string()
        } else {
            sa.ip().to_string()
        };
        format!("https://{host}:{}", sa.port())
    });
    let cfg = ClusterConfig {
        listen: a.listen.clone(),
        manager_url: url.clone(),
        lease_ttl_secs: a.lease_ttl,
        name: a.name.clone(),
        ..Default::default()
    };
    let dir = cluster_dir(a.dir.as_deref())?;
    let cd = ClusterDir::new(dir);
    let out = cd.init(cfg, a.force)?;
    // The registry exists from the start, with its identity recorded, so a
    // manager never mistakes a lost registry for a new cluster.
    shoal_manager::store_identity::create(&cd)?;
    println!("cluster identity written to {}", dir.display());
    println!(
        "join token: {} (id {}, admits joins for 24 h; more with `shoal token create`)",
        out.token,
        out.token.id()
    );
    println!();
    println!("start the manager:");
    println!("  shoal manager --dir {}", dir.display());
    println!("join a node:");
    println!(
        "  SHOAL_TOKEN={} shoal agent --join {url} --name NODE --dir ./agent-NODE",
        out.token
    );
    Ok(())
}

/// `shoal token` arguments.
#[derive(Debug, Clone, clap::Args)]
#[command(
    args_conflicts_with_subcommands = true,
    after_help = "Without a subcommand, prints the token `init` printed (if it still admits joins). `shoal token revoke --dir DIR ID` revokes one by the id `token list` shows.\n\nExamples:\n  shoal token --dir ./c\n  shoal token create --dir ./c --ttl 1h --uses 1 --roles web\n  shoal token list --dir ./c"
)]
pub struct TokenArgs {
    /// The cluster directory.
    #[arg(long, env = "SHOAL_DIR", global = true)]
    pub dir: Option<PathBuf>,
    #[command(subcommand)]
    pub cmd: Option<TokenCmd>,
}

/// `shoal token` subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum TokenCmd {
    /// Create a join token and print it (the only time it is shown).
    Create {
        /// How long it admits joins (500ms, 6s, 2m, 1h; default 24h).
        #[arg(long, default_value = "24h", value_parser = shoal_core::duration::parse_positive_duration)]
        ttl: std::time::Duration,
        /// How many joins it admits (default: any number until it expires).
        #[arg(long)]
        uses: Option<u32>,
        /// Node roles a node joining with it may hold, comma-separated
        /// (default: any).
        #[arg(long, value_delimiter = ',')]
        roles: Vec<String>,
        /// Print {"id", "token", "expires_ms", ...} as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the tokens: id, state, expiry, uses left, roles (never secrets).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by id: it admits no join from now on.
    Revoke {
        /// The token's id (from `shoal token list`).
        id: String,
    },
}

pub fn token(a: TokenArgs) -> anyhow::Result<()> {
    let dir = cluster_dir(a.dir.as_deref())?.to_path_buf();
    let cd = ClusterDir::new(&dir);
    cd.ca_pem()?;
    let now = unix_ms();
    match a.cmd {
        None => {
            let t = cd.token()?;
            let tokens = cd.tokens()?;
            match tokens.iter().find(|r| r.id == t.id()) {
                Some(r) => {
                    if let Err(e) = r.usable(now) {
                        anyhow::bail!("the token `init` printed no longer admits joins: {e}");
                    }
                }
                None => anyhow::bail!(
                    "the token `init` printed was deleted; create a new one with `shoal token create --dir {}`",
                    dir.display()
                ),
            }
            println!("{t}");
        }
        Some(TokenCmd::Create {
            ttl,
            uses,
            roles,
            json,
        }) => {
            if uses == Some(0) {
                anyhow::bail!(
                    "--uses 0 would make a token that admits nothing; give 1 or more, or leave it out"
                );
            }
            let t = Token::generate(shoal_net::identity::pem_fingerprint(&cd.ca_pem()?)?);
            let rec = t.record(now, Some(ttl.as_millis() as u64), uses, roles);
            cd.update_tokens(|ts| ts.push(rec.clone()))?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "id": rec.id, "token": t.to_string(), "expires_ms": rec.expires_ms,
                        "uses_left": rec.uses_left, "roles": rec.roles,
                    })
                );
            } else {
                println!("{t}");
                eprintln!(
                    "token {} admits joins for {:?}{}; give it to agents with --token-file or SHOAL_TOKEN",
                    rec.id,
                    ttl,
                    uses.map(|n| format!(", {n} time(s)")).unwrap_or_default()
                );
            }
        }
        Some(TokenCmd::List { json }) => {
            let ts = cd.tokens()?;
            if json {
                let v: Vec<_> = ts
                    .iter()
                    .map(|t| {
                        serde_json::json!({
                            "id": t.id, "state": t.state(now), "created_ms": t.created_ms,
                            "expires_ms": t.expires_ms, "uses_left": t.uses_left, "roles": t.roles,
                            "node": t.name, "minted_by": t.minted_by,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{:<16}  {:<8}  {:>12}  {:>9}  {:<24}  ROLES",
                    "ID", "STATE", "EXPIRES IN", "USES LEFT", "FOR (MINTED BY)"
                );
                for t in &ts {
                    let exp = match t.expires_ms {
                        Some(e) if e > now => format!("{}s", (e - now) / 1000),
                        Some(_) => "-".into(),
                        None => "never".into(),
                    };
                    let owner = match (&t.name, &t.minted_by) {
                        (Some(n), Some(m)) => format!("{n} ({m})"),
                        (Some(n), None) => n.clone(),
                        _ => "any node (admin)".into(),
                    };
                    println!(
                        "{:<16}  {:<8}  {:>12}  {:>9}  {:<24}  {}",
                        t.id,
                        t.state(now),
                        exp,
                        t.uses_left.map(|n| n.to_string()).unwrap_or("any".into()),
                        owner,
                        if t.roles.is_empty() {
                            "any".into()
                        } else {
                            t.roles.join(",")
                        }
                    );
                }
            }
        }
        Some(TokenCmd::Revoke { id }) => {
            let found = cd.update_tokens(|ts| {
                ts.iter_mut()
                    .find(|t| t.id == id)
                    .map(|t| t.revoked = true)
                    .is_some()
            })?;
            if !found {
                anyhow::bail!(
                    "no token has id {id:?}; see `shoal token list --dir {}`",
                    dir.display()
                );
            }
            println!(
                "revoked token {id}; it admits no join from now on (nodes that joined with it keep their certificates)"
            );
        }
    }
    Ok(())
}

/// `shoal status` arguments.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Examples:\n  shoal status --dir ./c\n  shoal status --dir ./c --json | jq '.nodes[].name'\n(--dir may be left out when SHOAL_DIR names the cluster directory.)"
)]
pub struct StatusArgs {
    #[command(flatten)]
    pub target: AdminTarget,
    /// Print JSON: {"nodes": [...], "services": [...], "events": [...]}.
    #[arg(long)]
    pub json: bool,
}

fn fmt_rate(bps: f64) -> String {
    let mbit = bps * 8.0 / 1e6;
    if mbit >= 10.0 {
        format!("{mbit:.0}Mb/s")
    } else {
        format!("{mbit:.2}Mb/s")
    }
}

pub async fn status(a: StatusArgs) -> anyhow::Result<()> {
    let s = a.target.client()?.status().await?;
    let text = if a.json {
        serde_json::to_string_pretty(&s)? + "\n"
    } else {
        render_status(&s)
    };
    write_stdout(&text)
}

/// Writes to stdout; a closed pipe (`shoal status | head`) is not an error.
pub fn write_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

/// The status table (also used by `shoal up`'s live view).
pub fn render_status(s: &StatusResponse) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<14} {:<7} {:<14} {:>8} {:>6} {:>9} {:>9} {:>7}  APPS",
        "NODE", "STATE", "ROLES", "LEASE", "CPU", "NET-RX", "NET-TX", "MEM"
    );
    for n in &s.nodes {
        let (cpu, rx, tx, mem) = match &n.load {
            Some(l) => (
                format!("{:.0}%", l.cpu * 100.0),
                fmt_rate(l.net_rx_bps),
                fmt_rate(l.net_tx_bps),
                format!(
                    "{:.0}%",
                    100.0 * l.mem_used_bytes as f64 / l.mem_total_bytes.max(1) as f64
                ),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        let apps: Vec<String> = n
            .apps
            .iter()
            .map(|a| format!("{}:{}:{:?}", a.id, a.adaptor, a.state).to_lowercase())
            .collect();
        let state = match n.state {
            LeaseState::Alive => "alive",
            LeaseState::Failed => "FAILED",
        };
        let _ = writeln!(
            o,
            "{:<14} {:<7} {:<14} {:>7.1}s {:>6} {:>9} {:>9} {:>7}  {}",
            n.name,
            state,
            if n.roles.is_empty() {
                "-".to_string()
            } else {
                n.roles.join(",")
            },
            n.lease_remaining_ms as f64 / 1000.0,
            cpu,
            rx,
            tx,
            mem,
            if apps.is_empty() {
                "-".to_string()
            } else {
                apps.join(" ")
            }
        );
    }
    if s.nodes.is_empty() {
        let _ = writeln!(o, "(no nodes registered)");
    }
    for svc in &s.services {
        let _ = writeln!(o, "service {}: {}", svc.name, svc.nodes.join(", "));
    }
    for j in &s.jobs {
        let done = j.units.iter().filter(|u| u.finished).count();
        let _ = writeln!(
            o,
            "job {}: {}/{} units finished, {} exchange, bank {:.2} of W = {} CPUs{}",
            j.spec.name,
            done,
            j.units.len(),
            j.spec.mode,
            j.bank,
            j.spec.max_cpu,
            j.migrations
                .last()
                .map_or(String::new(), |m| format!("; last move: {m}"))
        );
    }
    // Why an app is not running, so that nobody has to read its output.log
    // to find out.
    let mut problems = String::new();
    for n in &s.nodes {
        let in_trouble = |a: &&AppStatus| {
            matches!(
                a.state,
                AppState::Unhealthy | AppState::Backoff | AppState::Failed
            )
        };
        for a in n.apps.iter().filter(in_trouble) {
            let _ = writeln!(
                problems,
                "  {} {}: {}, {} restart(s): {}",
                n.name,
                a.id,
                format!("{:?}", a.state).to_lowercase(),
                a.restarts,
                a.message.as_deref().unwrap_or("no reason reported")
            );
        }
    }
    if !problems.is_empty() {
        let _ = writeln!(
            o,
            "apps not running (more: shoal describe node NODE, shoal events --node NODE):\n{problems}"
        );
    }
    o
}

/// `shoal node assign` arguments.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Examples:\n  shoal node assign n1 --dir ./c --adaptor www --param listen=127.0.0.1:8081 --param root=/srv/www\n  shoal node assign n1 --dir ./c --id www --remove\n(--dir may be left out when SHOAL_DIR names the cluster directory.)"
)]
pub struct AssignArgs {
    #[command(flatten)]
    pub target: AdminTarget,
    /// The node.
    pub node: String,
    /// The adaptor: process, nginx or www (not needed with --remove).
    #[arg(long, required_unless_present = "remove")]
    pub adaptor: Option<String>,
    /// The app id on the node (default: the adaptor's name).
    #[arg(long)]
    pub id: Option<String>,
    /// Control parameters, KEY=VALUE (repeatable).
    #[arg(long = "param", value_parser = parse_param)]
    pub params: Vec<(String, String)>,
    /// Remove this app from the node instead of assigning it.
    #[arg(long)]
    pub remove: bool,
}

fn parse_param(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("parameter {s:?} must be KEY=VALUE"))
}

pub async fn assign(a: AssignArgs) -> anyhow::Result<()> {
    let c = a.target.client()?;
    let nodes: Vec<NodeStatus> = c.get(&format!("/v1/lookup?name={}", a.node)).await?;
    let Some(n) = nodes.into_iter().next() else {
        anyhow::bail!("node {:?} is not registered; see `shoal status`", a.node);
    };
    let Some(id) = a.id.clone().or_else(|| a.adaptor.clone()) else {
        anyhow::bail!(
            "--remove needs the app: --id ID (or --adaptor NAME when the id is the adaptor's name)"
        );
    };
    if a.remove && !n.desired.iter().any(|x| x.id == id) {
        let ids: Vec<&str> = n.desired.iter().map(|x| x.id.as_str()).collect();
        anyhow::bail!(
            "node {} has no app {id:?} to remove (its apps: {})",
            a.node,
            if ids.is_empty() {
                "none".to_string()
            } else {
                ids.join(", ")
            }
        );
    }
    let mut apps: Vec<AppAssignment> = n.desired.into_iter().filter(|x| x.id != id).collect();
    if let (false, Some(adaptor)) = (a.remove, &a.adaptor) {
        apps.push(AppAssignment {
            id: id.clone(),
            adaptor: adaptor.clone(),
            params: a.params.iter().cloned().collect(),
        });
    }
    let r: serde_json::Value = c
        .send(
            reqwest::Method::PUT,
            &format!("/v1/nodes/{}/apps", a.node),
            &AssignRequest { apps },
        )
        .await?;
    println!(
        "{} {id} on {} (generation {})",
        if a.remove { "removed" } else { "assigned" },
        a.node,
        r["generation"]
    );
    Ok(())
}

/// `shoal node remove` arguments.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Removes the node's registration and desired state, frees its name and revokes its\ncertificate (refused from the next request on). To bring the machine back, delete its\nagent directory and join again with a token.\n\nExample:\n  shoal node remove n1 --dir /var/lib/shoal"
)]
pub struct RemoveArgs {
    #[command(flatten)]
    pub target: AdminTarget,
    /// The node.
    pub node: String,
}

pub async fn remove(a: RemoveArgs) -> anyhow::Result<()> {
    let c = a.target.client()?;
    let r: serde_json::Value = c
        .send(
            reqwest::Method::DELETE,
            &format!("/v1/nodes/{}", a.node),
            &serde_json::Value::Null,
        )
        .await?;
    println!(
        "removed node {}{}",
        a.node,
        if r["revoked"] == true {
            "; its certificate is revoked"
        } else {
            ""
        }
    );
    Ok(())
}

/// `shoal cert` subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum CertCmd {
    /// Issue a dispatcher certificate: it reads one service's backend list
    /// and reports that service's load, nothing else.
    #[command(
        after_help = "Example:\n  shoal cert dispatcher --dir /var/lib/shoal --service web --out /etc/shoal-dispatch\n  shoal dispatch --dir /etc/shoal-dispatch --service web --listen 0.0.0.0:80"
    )]
    Dispatcher(DispatcherCertArgs),
    /// Revoke a certificate (by the id `shoal cert dispatcher` printed, or
    /// its PEM file): the manager refuses it from the next request on.
    /// Nodes are revoked with `shoal node remove`.
    #[command(
        after_help = "Example:\n  shoal cert revoke --dir /var/lib/shoal /etc/shoal-dispatch/dispatcher.pem"
    )]
    Revoke(RevokeCertArgs),
    /// List the node certificates the manager accepts: id, expiry, a
    /// rotation in progress, the roles each node may register with.
    #[command(
        after_help = "Agents rotate their certificates at 70-90 % of their lifetime (`shoal manager\n--node-cert-ttl`, 90 days by default); the previous certificate is refused once the new\none is used.\n\nExamples:\n  shoal cert list --dir ./c\n  shoal cert list --dir ./c --json\n(--dir may be left out when SHOAL_DIR names the cluster directory.)"
    )]
    List(CertListArgs),
}

/// `shoal cert list` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct CertListArgs {
    #[command(flatten)]
    pub target: AdminTarget,
    /// Print JSON: [{"node", "id", "expires_ms", "next_id", "roles"}].
    #[arg(long)]
    pub json: bool,
}

pub async fn cert_list(a: CertListArgs) -> anyhow::Result<()> {
    let certs: Vec<NodeCertInfo> = a.target.client()?.get("/v1/certs").await?;
    if a.json {
        return write_stdout(&(serde_json::to_string_pretty(&certs)? + "\n"));
    }
    use std::fmt::Write;
    let now = unix_ms();
    let mut o = format!(
        "{:<14} {:<16} {:<12} {:<9} ROLES\n",
        "NODE", "ID", "EXPIRES IN", "ROTATING"
    );
    for c in &certs {
        let exp = match c.expires_ms {
            Some(e) if e > now => fmt_secs((e - now) as f64 / 1000.0),
            Some(_) => "expired".into(),
            None => "unknown".into(),
        };
        let _ = writeln!(
            o,
            "{:<14} {:<16} {:<12} {:<9} {}",
            c.node,
            &c.id[..c.id.len().min(16)],
            exp,
            if c.next_id.is_some() { "yes" } else { "-" },
            c.roles
                .as_ref()
                .map(|r| if r.is_empty() {
                    "none".into()
                } else {
                    r.join(",")
                })
                .unwrap_or("any".into())
        );
    }
    if certs.is_empty() {
        o.push_str("(no node has joined)\n");
    }
    write_stdout(&o)
}

/// `shoal node roles` arguments.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "A node registers only with the roles its join token granted (`shoal token create\n--roles`); this changes what it may register with from its next registration on.\n\nExamples:\n  shoal node roles n1 --allow web,db --dir ./c\n  shoal node roles n1 --any --dir ./c\n(--dir may be left out when SHOAL_DIR names the cluster directory.)"
)]
pub struct RolesArgs {
    #[command(flatten)]
    pub target: AdminTarget,
    /// The node.
    pub node: String,
    /// The roles it may register with, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        required_unless_present = "any",
        conflicts_with = "any"
    )]
    pub allow: Vec<String>,
    /// Any role at all.
    #[arg(long)]
    pub any: bool,
}

pub async fn node_roles(a: RolesArgs) -> anyhow::Result<()> {
    let roles = (!a.any).then(|| a.allow.clone());
    let _: serde_json::Value = a
        .target
        .client()?
        .send(
            reqwest::Method::PUT,
            &format!("/v1/nodes/{}/roles", a.node),
            &RolesRequest {
                roles: roles.clone(),
            },
        )
        .await?;
    println!(
        "{} may register with roles {} (from its next registration: restart its agent with --roles to use them)",
        a.node,
        roles
            .map(|r| format!("[{}]", r.join(",")))
            .unwrap_or("of any name".into())
    );
    Ok(())
}

/// `shoal cert dispatcher` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct DispatcherCertArgs {
    /// The cluster directory (holds the CA key).
    #[arg(long, env = "SHOAL_DIR")]
    pub dir: PathBuf,
    /// The service the dispatcher fronts.
    #[arg(long)]
    pub service: String,
    /// Where to write ca.pem, dispatcher.pem, dispatcher.key and config.toml
    /// (created mode 0700); give it to `shoal dispatch --dir`.
    #[arg(long)]
    pub out: PathBuf,
    /// How long the certificate lives (default 19800h, 825 days). To rotate
    /// it, issue a new one into another directory, restart the dispatcher
    /// with it, and `shoal cert revoke` the old one.
    #[arg(long, default_value = "19800h", value_parser = shoal_core::duration::parse_positive_duration)]
    pub ttl: std::time::Duration,
}

/// `shoal cert revoke` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct RevokeCertArgs {
    #[command(flatten)]
    pub target: AdminTarget,
    /// The certificate's id (64 hex digits) or its PEM file.
    pub cert: String,
}

pub fn cert_dispatcher(a: DispatcherCertArgs) -> anyhow::Result<()> {
    validate_node_name(&a.service).map_err(|e| anyhow::anyhow!("--service: {e}"))?;
    let cd = ClusterDir::new(&a.dir);
    let ca = cd.ca()?;
    let cfg = cd.config()?;
    let (cert, key) = ca.issue_client(
        &format!("{}{}", shoal_net::identity::DISPATCHER_CN_PREFIX, a.service),
        a.ttl,
    )?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("--out {}", a.out.display()))?;
    shoal_net::identity::make_private_dir(&a.out)?;
    let out = ClusterDir::new(&a.out);
    shoal_net::identity::write_file(&a.out.join("ca.pem"), &ca.pem, false)?;
    shoal_net::identity::write_file(
        &a.out.join(shoal_net::identity::dispatcher_files::CERT),
        &cert,
        false,
    )?;
    shoal_net::identity::write_file(
        &a.out.join(shoal_net::identity::dispatcher_files::KEY),
        &key,
        true,
    )?;
    out.write_config(&cfg)?;
    let expires = shoal_net::identity::cert_validity_ms(&cert)
        .map(|(_, na)| fmt_at_ms(na) + " UTC")
        .unwrap_or("?".into());
    println!(
        "dispatcher certificate for service {} written to {} (id {}, expires {expires})",
        a.service,
        a.out.display(),
        cert_id(&cert)?
    );
    Ok(())
}

fn cert_id(pem: &str) -> anyhow::Result<String> {
    let der = shoal_net::identity::first_cert_der(pem)?;
    shoal_net::tls::cert_key_fingerprint(&der)
        .ok_or_else(|| anyhow::anyhow!("cannot read the certificate's public key"))
}

pub async fn cert_revoke(a: RevokeCertArgs) -> anyhow::Result<()> {
    let id = if std::path::Path::new(&a.cert).exists() {
        cert_id(&shoal_net::identity::read_file(std::path::Path::new(
            &a.cert,
        ))?)?
    } else {
        a.cert.to_ascii_lowercase()
    };
    let _: serde_json::Value = a
        .target
        .client()?
        .send(
            reqwest::Method::PUT,
            &format!("/v1/revoked/{id}"),
            &serde_json::Value::Null,
        )
        .await?;
    println!("revoked certificate {id}: the manager refuses it from now on");
    Ok(())
}
