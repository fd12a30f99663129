//! Adaptors: the LAMA contract for controlling an unmodified application,
//! `status`, `start`, `stop` and `set(params)`.
//!
//! Every built-in adaptor runs the application as a supervised process; what
//! differs is how the control parameters become a command line and config
//! files, and what `set` does (nginx and icecast reload their configuration
//! in place; the others restart with the new parameters).

pub mod icecast;
mod process;

pub use icecast::parse_stats as parse_icecast_stats;
pub use process::{Flavor, ProcessApp};

use shoal_net::wire::{AppAssignment, AppStatus, Params};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What can go wrong controlling an app.
#[derive(Debug, thiserror::Error)]
pub enum AdaptorError {
    /// The control parameters are wrong.
    #[error("bad parameters: {0}")]
    Params(String),
    /// The program could not be run.
    #[error("{0}")]
    Spawn(String),
    /// A file could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// The LAMA adaptor contract.
#[async_trait::async_trait]
pub trait Adaptor: Send {
    /// The adaptor's name (`process`, `nginx`, `www`).
    fn kind(&self) -> &'static str;
    /// The application's actual state. Also drives supervision: an exited
    /// process is restarted here once its back-off has passed.
    async fn status(&mut self) -> AppStatus;
    /// Starts the application.
    async fn start(&mut self) -> Result<(), AdaptorError>;
    /// Stops it: SIGTERM to its process group, SIGKILL after a grace period.
    async fn stop(&mut self) -> Result<(), AdaptorError>;
    /// Applies new control parameters.
    async fn set(&mut self, params: Params) -> Result<(), AdaptorError>;
}

/// Creates the adaptor for an assignment; `apps_dir` holds each app's
/// private directory.
pub fn create(
    a: &AppAssignment,
    apps_dir: &Path,
    node: &str,
) -> Result<Box<dyn Adaptor>, AdaptorError> {
    let flavor = match a.adaptor.as_str() {
        "process" => Flavor::Process,
        "nginx" => Flavor::Nginx,
        "www" => Flavor::Www,
        "icecast" => Flavor::Icecast,
        other => {
            return Err(AdaptorError::Params(format!(
                "unknown adaptor {other:?}; use process, nginx, www or icecast"
            )));
        }
    };
    Ok(Box::new(ProcessApp::new(
        flavor,
        a.id.clone(),
        apps_dir.join(&a.id),
        node.to_string(),
        a.params.clone(),
    )?))
}

/// Runs the desired apps, level-triggered: every call to `reconcile`
/// converges the running set onto the desired one, whatever happened before.
pub struct Supervisor {
    apps_dir: PathBuf,
    node: String,
    apps: BTreeMap<String, (AppAssignment, Box<dyn Adaptor>)>,
    /// Assignments that could not even be created, with why.
    rejected: BTreeMap<String, (AppAssignment, String)>,
    /// Processes a previous run left and nobody wants were stopped.
    reaped: bool,
}

impl Supervisor {
    /// A supervisor keeping app directories under `apps_dir`. Processes left
    /// by a previous run of the agent (a restart, a re-execution, an
    /// upgrade, a crash) keep running: the first [`Supervisor::reconcile`]
    /// re-adopts those still desired with the same parameters, and stops
    /// the others.
    pub fn new(apps_dir: PathBuf, node: String) -> Self {
        let _ = std::fs::create_dir_all(&apps_dir);
        Self {
            apps_dir,
            node,
            apps: BTreeMap::new(),
            rejected: BTreeMap::new(),
            reaped: false,
        }
    }

    /// Converges onto `desired`.
    pub async fn reconcile(&mut self, desired: &[AppAssignment]) {
        let want: BTreeMap<&str, &AppAssignment> =
            desired.iter().map(|a| (a.id.as_str(), a)).collect();
        let gone: Vec<String> = self
            .apps
            .keys()
            .filter(|id| !want.contains_key(id.as_str()))
            .cloned()
            .collect();
        for id in gone {
            if let Some((_, mut app)) = self.apps.remove(&id)
                && let Err(e) = app.stop().await
            {
                tracing::warn!(app = %id, "stop: {e}");
            }
        }
        self.rejected
            .retain(|id, (a, _)| want.get(id.as_str()) == Some(&&*a));
        for (id, a) in want {
            match self.apps.get_mut(id) {
                Some((cur, app)) if cur.adaptor == a.adaptor => {
                    if cur.params != a.params {
                        match app.set(a.params.clone()).await {
                            Ok(()) => *cur = a.clone(),
                            Err(e) => {
                                tracing::warn!(app = %id, "set: {e}");
                                *cur = a.clone();
                            }
                        }
                    }
                }
                Some(_) => {
                    // The adaptor changed: a different kind of app.
                    if let Some((_, mut old)) = self.apps.remove(id) {
                        let _ = old.stop().await;
                    }
                    self.launch(a).await;
                }
                None if self.rejected.contains_key(id) => {}
                None => self.launch(a).await,
            }
        }
        if !self.reaped {
            self.reaped = true;
            let keep = self.apps.keys().cloned().collect();
            let n = process::reap_orphans(&self.apps_dir, &keep);
            if n > 0 {
                tracing::info!(
                    "stopped {n} application process(es) a previous agent run left and no assignment wants"
                );
            }
        }
    }

    async fn launch(&mut self, a: &AppAssignment) {
        match create(a, &self.apps_dir, &self.node) {
            Ok(mut app) => {
                if let Err(e) = app.start().await {
                    tracing::warn!(app = %a.id, "start: {e}");
                }
                self.apps.insert(a.id.clone(), (a.clone(), app));
            }
            Err(e) => {
                self.rejected
                    .insert(a.id.clone(), (a.clone(), e.to_string()));
            }
        }
    }

    /// The state of every app (this also restarts exited ones whose
    /// back-off has passed).
    pub async fn statuses(&mut self) -> Vec<AppStatus> {
        let mut out = Vec::new();
        for (_, app) in self.apps.values_mut() {
            out.push(app.status().await);
        }
        for (id, (a, why)) in &self.rejected {
            out.push(AppStatus {
                id: id.clone(),
                adaptor: a.adaptor.clone(),
                state: shoal_net::wire::AppState::Failed,
                pid: None,
                restarts: 0,
                endpoint: None,
                message: Some(why.clone()),
                bandwidth: None,
                stream: None,
            });
        }
        out
    }

    /// Stops everything (agent shutdown).
    pub async fn stop_all(&mut self) {
        for (id, (_, mut app)) in std::mem::take(&mut self.apps) {
            if let Err(e) = app.stop().await {
                tracing::warn!(app = %id, "stop: {e}");
            }
        }
    }
}
