//! `shoal up --netns --self-deploy`: SMON's self-deployment to watch. The
//! nodes are namespace hosts running their own sshd (`shoal_overlay::netlab`);
//! `up` prepares what an operator would (overlay key, signed release, target
//! list, the auth agent with the only SSH key), seeds one host with
//! `shoal overlay seed`, and the pool deploys itself onto the rest, then
//! restarts any peer that dies, until Ctrl-C or --duration. Every process,
//! namespace and file it made is removed at the end.

use crate::up::UpArgs;
use anyhow::Context;
use shoal_overlay::netlab::{Lab, Overlay};
use std::time::{Duration, Instant};

/// Runs the demo; `stop` turns true on Ctrl-C or SIGTERM.
pub async fn run(a: UpArgs, stop: tokio::sync::watch::Receiver<bool>) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || run_blocking(&a, &stop)).await?
}

/// `shoal init` and a manager on the lab's bridge address, its dashboard at
/// `dashboard` surveying the overlay from h1, and a single-use seed token
/// (`DIR/seed.token`) that grants the overlay role. Returns the manager,
/// its URL and the dashboard's.
fn start_manager(
    lab: &Lab,
    ov: &Overlay,
    dir: &std::path::Path,
    dashboard: &str,
) -> anyhow::Result<(std::process::Child, String, String)> {
    let exe = &ov.shoal;
    let cluster = dir.join("cluster");
    let listen = format!("{}:7400", lab.bridge_ip());
    let run = |args: &[&std::ffi::OsStr]| -> anyhow::Result<String> {
        let o = std::process::Command::new(exe).args(args).output()?;
        anyhow::ensure!(
            o.status.success(),
            "shoal {:?}: {}",
            args,
            String::from_utf8_lossy(&o.stderr)
        );
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    };
    run(&[
        "init".as_ref(),
        "--dir".as_ref(),
        cluster.as_os_str(),
        "--listen".as_ref(),
        listen.as_ref(),
    ])?;
    let token = run(&[
        "token".as_ref(),
        "create".as_ref(),
        "--dir".as_ref(),
        cluster.as_os_str(),
        "--uses".as_ref(),
        "1".as_ref(),
        "--ttl".as_ref(),
        "10m".as_ref(),
        "--roles".as_ref(),
        "overlay".as_ref(),
    ])?;
    let mut f = shoal_overlay::files::create_key_file(&dir.join("seed.token"))?;
    std::io::Write::write_all(&mut f, token.as_bytes())?;
    let log = std::fs::File::create(dir.join("manager.log"))?;
    let child = std::process::Command::new(exe)
        .arg("manager")
        .arg("--dir")
        .arg(&cluster)
        .args(["--dashboard", dashboard, "--no-discovery"])
        .arg("--overlay-key")
        .arg(&ov.key)
        .args(["--overlay-peer", &lab.hosts()[0].ip.to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("cannot start the manager")?;
    let t = Instant::now();
    let dash = loop {
        let text = std::fs::read_to_string(dir.join("manager.log")).unwrap_or_default();
        if let Some(u) = text
            .lines()
            .find_map(|l| l.split("dashboard (read-only) at ").nth(1))
        {
            break u.trim().to_string();
        }
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(10),
            "the manager did not start within 10 s: {text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok((child, format!("https://{listen}"), dash))
}

fn run_blocking(a: &UpArgs, stop: &tokio::sync::watch::Receiver<bool>) -> anyhow::Result<()> {
    let interval = Duration::from_secs(1);
    let json = a.json;
    let say = |line: &str| {
        if json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    };
    let tmp = tempfile::Builder::new().prefix("shoal-up-").tempdir()?;
    let lab = Lab::create(tmp.path(), a.nodes)?;
    let exe = std::env::current_exe().context("cannot find this binary")?;
    let ov = Overlay::prepare(&lab, &exe, &tmp.path().join("operator"), &[])?;
    let n = lab.hosts().len();
    say(&format!(
        "shoal up --self-deploy: {n} namespace hosts with sshd on bridge {} (10.215.x.0/24), auth agent on {}",
        lab.bridge(),
        ov.agent_addr
    ));
    // A manager on the bridge: the deployed agents join it with deploy
    // tokens, its host's dashboard shows the overlay as it spreads.
    let (mut manager, url, dashboard) = start_manager(&lab, &ov, tmp.path(), &a.dashboard)?;
    say(&format!(
        "  dashboard (the Pool and Overlay panels fill as the pool deploys itself): {dashboard}"
    ));
    say(&format!(
        "  the whole overlay: shoal overlay status --all --peer {} --key {}",
        lab.hosts()[0].ip,
        ov.key.display()
    ));
    say(&format!(
        "  the nodes: shoal status --dir {}",
        tmp.path().join("cluster").display()
    ));
    say(&format!(
        "  kill a peer to watch the pool restart it: kill -9 $(pgrep -f 'agent --overlay {}')",
        lab.hosts()[n - 1].prefix.display()
    ));
    say("  Ctrl-C stops everything");
    let t0 = Instant::now();
    let out = ov
        .seed_command("h1", interval, interval / 2)
        .arg("--join")
        .arg(&url)
        .arg("--token-file")
        .arg(tmp.path().join("seed.token"))
        .output()
        .context("cannot run shoal overlay seed")?;
    if !out.status.success() {
        anyhow::bail!(
            "the seed failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    say(&format!(
        "{:>7.2} s  {}",
        t0.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&out.stdout).trim()
    ));
    let until = a.duration.map(|d| t0 + d);
    let mut pids: Vec<Option<i32>> = vec![None; n];
    let mut gone = vec![false; n];
    let mut all_at = None;
    let mut restarts = 0;
    while !*stop.borrow() && until.is_none_or(|u| Instant::now() < u) {
        let now = lab.peers_by_host();
        let t = t0.elapsed().as_secs_f64();
        for (i, p) in now.iter().enumerate() {
            let name = &lab.hosts()[i].name;
            match (pids[i], p.first()) {
                (None, Some(&pid)) => {
                    pids[i] = Some(pid);
                    let up = pids.iter().flatten().count();
                    say(&format!(
                        "{t:>7.2} s  {name} deployed ({up} of {n}, round {:.1})",
                        t / interval.as_secs_f64()
                    ));
                }
                (Some(old), Some(&pid)) if old != pid => {
                    pids[i] = Some(pid);
                    gone[i] = false;
                    restarts += 1;
                    say(&format!(
                        "{t:>7.2} s  {name}'s peer runs again (pid {old} -> {pid}), restarted by the pool"
                    ));
                }
                (Some(_), None) if !gone[i] => {
                    gone[i] = true;
                    say(&format!("{t:>7.2} s  {name}'s peer is gone"));
                }
                _ => {}
            }
        }
        if all_at.is_none() && pids.iter().all(|p| p.is_some()) {
            all_at = Some(t);
            say(&format!(
                "{t:>7.2} s  all {n} deployed = {:.1} rounds of {} s (ln {n} = {:.2})",
                t / interval.as_secs_f64(),
                interval.as_secs_f64(),
                (n as f64).ln()
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    say("stopping the pool...");
    let logins = ov.logins_signed();
    let _ = manager.kill();
    let _ = manager.wait();
    drop(ov);
    drop(lab);
    drop(tmp);
    let summary = serde_json::json!({
        "hosts": n,
        "interval_s": interval.as_secs_f64(),
        "deployed": pids.iter().filter(|p| p.is_some()).count(),
        "deploy_all_s": all_at,
        "rounds": all_at.map(|t| t / interval.as_secs_f64()),
        "ln_n": (n as f64).ln(),
        "restarts": restarts,
        "logins": logins,
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!("summary:");
        println!("  hosts deployed  {} of {n}", summary["deployed"]);
        match all_at {
            Some(t) => println!(
                "  all deployed    {t:.2} s ({:.1} rounds)",
                t / interval.as_secs_f64()
            ),
            None => println!("  all deployed    not within the run"),
        }
        println!("  restarts        {restarts}");
        println!("  logins signed   {logins}");
    }
    Ok(())
}
