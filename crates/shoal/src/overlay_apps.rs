//! The overlay's apps on this host (SMON II-D), run through the agent's
//! adaptors: the overlay peer decides which apps the host holds and in
//! which state; this keeps them so, with SMON's rule
//! ([`shoal_core::overlay::apps::supervise`]).

use shoal_agent::adaptor::{Adaptor, Flavor, ProcessApp};
use shoal_core::overlay::Version;
use shoal_core::overlay::apps::{Action, AppState, supervise};
use shoal_core::overlay::report::AppReport;
use shoal_net::wire::AppState as Run;
use shoal_overlay::peer::{AppHost, AppRun};
use std::collections::BTreeMap;
use std::path::Path;

struct Kept {
    run: AppRun,
    app: Option<ProcessApp>,
    /// The pid of an `ignore` app's one start.
    pid: Option<u32>,
    restarts_seen: u32,
    message: Option<String>,
}

/// The host's overlay apps.
pub struct OverlayApps {
    node: String,
    kept: tokio::sync::Mutex<BTreeMap<String, Kept>>,
}

impl OverlayApps {
    /// Apps of the host `node`.
    pub fn new(node: &str) -> Self {
        Self {
            node: node.to_string(),
            kept: tokio::sync::Mutex::new(BTreeMap::new()),
        }
    }
}

fn flavor(adaptor: &str) -> Result<Flavor, String> {
    match adaptor {
        "process" => Ok(Flavor::Process),
        "www" => Ok(Flavor::Www),
        "nginx" => Ok(Flavor::Nginx),
        other => Err(format!(
            "unknown adaptor {other:?} in the app spec; use process, www or nginx"
        )),
    }
}

/// The marker of an `ignore` app's one start under its state version, so
/// that a restarted or upgraded peer does not start it again.
fn started_marker(dir: &Path, v: Version) -> std::path::PathBuf {
    dir.join(format!("started-{}-{:016x}", v.number, v.origin))
}

fn running(s: Run) -> bool {
    matches!(s, Run::Starting | Run::Running | Run::Unhealthy)
}

/// Runs the restart script (SMON: "may include clean up steps") in the
/// package directory, at most 30 s.
async fn restart_script(script: &str, package: &Path) -> Result<(), String> {
    let mut cmd = tokio::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(script)
        .current_dir(package)
        .kill_on_drop(true);
    match tokio::time::timeout(std::time::Duration::from_secs(30), cmd.status()).await {
        Ok(Ok(s)) if s.success() => Ok(()),
        Ok(Ok(s)) => Err(format!("the restart script exited {s}")),
        Ok(Err(e)) => Err(format!("cannot run the restart script: {e}")),
        Err(_) => Err("the restart script ran over 30 s".into()),
    }
}

#[async_trait::async_trait]
impl AppHost for OverlayApps {
    async fn reconcile(&self, runs: Vec<AppRun>) -> Vec<AppReport> {
        let mut kept = self.kept.lock().await;
        let want: BTreeMap<String, AppRun> =
            runs.into_iter().map(|r| (r.name.clone(), r)).collect();
        let gone: Vec<String> = kept
            .keys()
            .filter(|n| !want.contains_key(*n))
            .cloned()
            .collect();
        for n in gone {
            if let Some(mut k) = kept.remove(&n)
                && let Some(app) = k.app.as_mut()
            {
                let _ = app.stop().await;
            }
        }
        let mut out = Vec::new();
        for (name, run) in want {
            let k = kept.entry(name.clone()).or_insert_with(|| Kept {
                run: run.clone(),
                app: None,
                pid: None,
                restarts_seen: 0,
                message: None,
            });
            // Another version or other parameters: a different app.
            let changed = k.run.version != run.version
                || k.run.adaptor != run.adaptor
                || k.run.params != run.params;
            if changed {
                if let Some(app) = k.app.as_mut() {
                    let _ = app.stop().await;
                }
                k.app = None;
                k.pid = None;
                k.message = None;
            }
            k.run = run.clone();
            let _ = std::fs::create_dir_all(&run.dir);
            let mut status = match k.app.as_mut() {
                Some(app) => Some(app.status().await),
                None => None,
            };
            let is_running = status.as_ref().is_some_and(|s| running(s.state));
            let marker = started_marker(&run.dir, run.state.version);
            let started = marker.exists();
            match supervise(run.state.state, is_running, started) {
                Action::Start if k.app.is_some() => {
                    // Online and exited: the adaptor restarts it after its
                    // back-off; the restart script runs once before.
                    let restarts = status.as_ref().map(|s| s.restarts).unwrap_or(0);
                    if let Some(script) = &run.restart
                        && restarts == k.restarts_seen
                        && status.as_ref().is_some_and(|s| s.state == Run::Backoff)
                    {
                        k.message = restart_script(script, &run.package).await.err();
                        k.restarts_seen = restarts + 1;
                    }
                }
                Action::Start => {
                    let created = flavor(&run.adaptor).and_then(|f| {
                        ProcessApp::new(
                            f,
                            name.clone(),
                            run.dir.clone(),
                            self.node.clone(),
                            run.params.clone(),
                        )
                        .map_err(|e| e.to_string())
                    });
                    match created {
                        Ok(mut app) => match app.start().await {
                            Ok(()) => {
                                let s = app.status().await;
                                k.pid = s.pid;
                                status = Some(s);
                                if run.state.state == AppState::Ignore {
                                    // Started once, then left alone: the
                                    // adaptor goes, the process stays.
                                    let _ = std::fs::write(&marker, b"");
                                    let _ = std::fs::remove_file(run.dir.join("pid"));
                                } else {
                                    k.app = Some(app);
                                }
                                k.message = None;
                            }
                            Err(e) => k.message = Some(e.to_string()),
                        },
                        Err(e) => k.message = Some(e),
                    }
                }
                Action::Stop => {
                    if let Some(app) = k.app.as_mut() {
                        let _ = app.stop().await;
                    }
                    k.app = None;
                    status = None;
                }
                Action::Nothing => {
                    if run.state.state == AppState::Offline && k.app.is_some() {
                        k.app = None;
                    }
                }
            }
            if run.state.state != AppState::Ignore {
                let _ = std::fs::remove_file(&marker);
            }
            out.push(AppReport {
                name: name.clone(),
                version: run.version,
                state: run.state.state,
                state_version: run.state.version,
                running: status.as_ref().is_some_and(|s| running(s.state)),
                pid: status.as_ref().and_then(|s| s.pid).or(k.pid),
                restarts: status.as_ref().map(|s| s.restarts).unwrap_or(0),
                message: k
                    .message
                    .clone()
                    .or_else(|| status.as_ref().and_then(|s| s.message.clone()))
                    .or_else(|| {
                        (run.state.state == AppState::Ignore && k.pid.is_some())
                            .then(|| "started once; not monitored (ignore)".to_string())
                    }),
            });
        }
        out
    }
}
