//! Application management on the overlay (SMON II-D): app specs, their
//! running states, the epidemic spread of apps between peers, and what the
//! local supervisor does about each app.
//!
//! An app is known by its name (II-D) and, beyond the paper, by a version,
//! so that a changed app replaces the old one everywhere. Its running state
//! is one of SMON's three, and travels as a tuple with its own version, as
//! the livetag does: an operator's `shoal overlay app state NAME offline`
//! given to one peer reaches every peer, the higher state version winning
//! (the paper leaves open whether the state is per machine or global, notes
//! §7 item 12: here it is global, since the operator says it once).
//!
//! The spread is the paper's: every round a peer tells one random peer the
//! name and version of one of its apps (round robin over its apps); a peer
//! that lacks it, or holds an older version, pulls the package from the
//! teller; a failed pull waits for the next notice.

use super::peer::Millis;
use super::version::Version;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// SMON's three running states of an app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AppState {
    /// Kept running: restarted whenever it stops.
    Online,
    /// Kept stopped.
    Offline,
    /// Started once, then left alone: not monitored, not restarted.
    Ignore,
}

impl std::str::FromStr for AppState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "online" => Ok(Self::Online),
            "offline" => Ok(Self::Offline),
            "ignore" => Ok(Self::Ignore),
            _ => Err(format!(
                "unknown app state {s:?}; use online, offline or ignore"
            )),
        }
    }
}

impl core::fmt::Display for AppState {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::Online => "online",
            Self::Offline => "offline",
            Self::Ignore => "ignore",
        })
    }
}

/// An app's running state and the version of that setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateTag {
    /// What the operator asked for.
    pub state: AppState,
    /// Its version: the higher wins.
    pub version: Version,
}

/// One file of an app's package.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppFile {
    /// Its path inside the package, relative, `/`-separated.
    pub path: String,
    /// Its SHA-256, hex.
    pub sha256: String,
    /// Its size in bytes.
    pub size: u64,
}

/// An app as the overlay spreads it: what to run and the package it needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppSpec {
    /// Its name, unique in the overlay.
    pub name: String,
    /// Its version (the operator's number, and a digest of the spec).
    pub version: Version,
    /// The adaptor that runs it (`process`, `www`, `nginx`): the LAMA
    /// contract, as the agent's apps.
    pub adaptor: String,
    /// The adaptor's parameters; `{{ package }}` in a value is the
    /// installed package's directory on the host.
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// A command run before each restart of a stopped app (SMON's restart
    /// script, "may include clean up steps"), in the package directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<String>,
    /// The state it starts in where no operator set one.
    pub state: AppState,
    /// The package's files.
    #[serde(default)]
    pub files: Vec<AppFile>,
}

/// Why a spec is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// A bad name.
    #[error(
        "app name {0:?} must be 1-40 characters of lowercase letters, digits and '-', starting with a letter"
    )]
    Name(String),
    /// A file path that could leave the package directory.
    #[error(
        "file path {0:?} must be relative, without '..', '.' or empty parts; list files under the package directory"
    )]
    Path(String),
    /// Two files with one path.
    #[error("file {0:?} is listed twice")]
    Duplicate(String),
    /// A digest that is not 64 hex digits.
    #[error("file {0:?}: sha256 must be 64 hex digits")]
    Digest(String),
}

impl AppSpec {
    /// Checks what a peer or a utility sent before anything is written.
    pub fn validate(&self) -> Result<(), SpecError> {
        let n = &self.name;
        let ok = (1..=40).contains(&n.len())
            && n.starts_with(|c: char| c.is_ascii_lowercase())
            && n.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !ok {
            return Err(SpecError::Name(n.clone()));
        }
        let mut seen = std::collections::BTreeSet::new();
        for f in &self.files {
            if !is_package_path(&f.path) {
                return Err(SpecError::Path(f.path.clone()));
            }
            if !seen.insert(f.path.as_str()) {
                return Err(SpecError::Duplicate(f.path.clone()));
            }
            if f.sha256.len() != 64 || !f.sha256.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(SpecError::Digest(f.path.clone()));
            }
        }
        Ok(())
    }
}

/// Whether `path` names a file inside a package directory: relative,
/// `/`-separated, without empty, `.` or `..` parts. Every path a peer or a
/// utility names in a package is checked with it before anything is written.
pub fn is_package_path(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && !path.contains('\0')
        && path
            .split('/')
            .all(|p| !p.is_empty() && p != "." && p != "..")
}

/// What a peer tells another about one of its apps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    /// The app's version.
    pub version: Version,
    /// Its running state.
    pub state: StateTag,
}

/// What the local supervisor does about an app now (II-D), from its state,
/// whether it runs and whether it was ever started since it was installed
/// or its state last changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Start it (online and stopped: a restart; ignore: its one start).
    Start,
    /// Stop it (offline and running).
    Stop,
    /// Leave it.
    Nothing,
}

/// SMON's supervision rule.
pub fn supervise(state: AppState, running: bool, started: bool) -> Action {
    match (state, running, started) {
        (AppState::Online, false, _) => Action::Start,
        (AppState::Offline, true, _) => Action::Stop,
        (AppState::Ignore, false, false) => Action::Start,
        _ => Action::Nothing,
    }
}

/// An installed app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Installed {
    /// Its spec.
    pub spec: AppSpec,
    /// Its running state as the overlay last agreed.
    pub state: StateTag,
}

/// The apps a peer holds and the pulls it has under way.
#[derive(Debug, Clone, Default)]
pub struct Apps {
    installed: BTreeMap<String, Installed>,
    /// Pulls under way: the version asked for and when.
    fetching: BTreeMap<String, (Version, Millis)>,
    /// The last failed pull of each app: when and why.
    failed: BTreeMap<String, (Millis, String)>,
    next: usize,
}

/// How long a pull may run before another notice may start a new one.
pub const FETCH_STALE_MS: Millis = 60_000;

/// What handling a notice asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heard {
    /// Pull version `.0` of the app from the teller.
    Fetch(Version),
    /// The app's state changed (a newer state tag was adopted).
    StateChanged,
    /// Nothing new.
    Nothing,
}

impl Apps {
    /// Apps restored from the peer's directory.
    pub fn restore(installed: impl IntoIterator<Item = Installed>) -> Self {
        Self {
            installed: installed
                .into_iter()
                .map(|i| (i.spec.name.clone(), i))
                .collect(),
            ..Self::default()
        }
    }

    /// Every installed app, by name.
    pub fn installed(&self) -> impl Iterator<Item = &Installed> {
        self.installed.values()
    }

    /// One installed app.
    pub fn get(&self, name: &str) -> Option<&Installed> {
        self.installed.get(name)
    }

    /// The last failed pull of `name`.
    pub fn failed(&self, name: &str) -> Option<&(Millis, String)> {
        self.failed.get(name)
    }

    /// The app to tell a peer about this round (round robin), if any.
    pub fn next_notice(&mut self) -> Option<(String, Notice)> {
        if self.installed.is_empty() {
            return None;
        }
        let i = self.next % self.installed.len();
        self.next = self.next.wrapping_add(1);
        self.installed.values().nth(i).map(|a| {
            (
                a.spec.name.clone(),
                Notice {
                    version: a.spec.version,
                    state: a.state,
                },
            )
        })
    }

    /// A teller said it holds `name` at `notice`.
    pub fn heard(&mut self, name: &str, notice: &Notice, now: Millis) -> Heard {
        let mut changed = false;
        if let Some(a) = self.installed.get_mut(name) {
            if notice.state.version > a.state.version {
                a.state = notice.state;
                changed = true;
            }
            if notice.version <= a.spec.version {
                return if changed {
                    Heard::StateChanged
                } else {
                    Heard::Nothing
                };
            }
        }
        let busy = self
            .fetching
            .get(name)
            .is_some_and(|(v, at)| *v >= notice.version && now < at + FETCH_STALE_MS);
        if busy {
            return if changed {
                Heard::StateChanged
            } else {
                Heard::Nothing
            };
        }
        self.fetching
            .insert(name.to_string(), (notice.version, now));
        Heard::Fetch(notice.version)
    }

    /// A pull of `name` ended: `Ok` with the spec whose package the shell
    /// verified and installed, or why it failed. Returns whether the app
    /// changed (installed or replaced).
    pub fn fetched(
        &mut self,
        name: &str,
        result: Result<(AppSpec, StateTag), String>,
        now: Millis,
    ) -> bool {
        self.fetching.remove(name);
        match result {
            Ok((spec, state)) => self.install(spec, state),
            Err(e) => {
                self.failed.insert(name.to_string(), (now, e));
                false
            }
        }
    }

    /// Installs `spec` (with the state `state`, or the one held if newer)
    /// if it is newer than the installed one. Returns whether it was.
    pub fn install(&mut self, spec: AppSpec, state: StateTag) -> bool {
        match self.installed.get_mut(&spec.name) {
            Some(a) if a.spec.version >= spec.version => false,
            Some(a) => {
                if state.version > a.state.version {
                    a.state = state;
                }
                a.spec = spec;
                true
            }
            None => {
                self.failed.remove(&spec.name);
                self.installed
                    .insert(spec.name.clone(), Installed { spec, state });
                true
            }
        }
    }

    /// Sets `name`'s state if `tag` is newer; `Err` if no such app.
    pub fn set_state(&mut self, name: &str, tag: StateTag) -> Result<bool, String> {
        let a = self.installed.get_mut(name).ok_or_else(|| {
            format!("no app {name:?} on this peer; install it with `shoal overlay app install`")
        })?;
        if tag.version > a.state.version {
            a.state = tag;
            Ok(true)
        } else {
            Ok(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, v: u64) -> AppSpec {
        AppSpec {
            name: name.into(),
            version: Version::new(v, 7),
            adaptor: "process".into(),
            params: BTreeMap::new(),
            restart: None,
            state: AppState::Online,
            files: vec![AppFile {
                path: "bin/run.sh".into(),
                sha256: "a".repeat(64),
                size: 3,
            }],
        }
    }

    fn tag(state: AppState, v: u64) -> StateTag {
        StateTag {
            state,
            version: Version::new(v, 0),
        }
    }

    #[test]
    fn supervision_is_smons_three_states() {
        use AppState::*;
        assert_eq!(supervise(Online, false, true), Action::Start);
        assert_eq!(supervise(Online, true, true), Action::Nothing);
        assert_eq!(supervise(Offline, true, true), Action::Stop);
        assert_eq!(supervise(Offline, false, false), Action::Nothing);
        assert_eq!(supervise(Ignore, false, false), Action::Start);
        assert_eq!(
            supervise(Ignore, false, true),
            Action::Nothing,
            "started once"
        );
        assert_eq!(supervise(Ignore, true, true), Action::Nothing);
    }

    #[test]
    fn a_missing_or_older_app_is_pulled_once_and_a_failed_pull_waits_for_the_next_notice() {
        let mut a = Apps::default();
        let n = Notice {
            version: Version::new(2, 7),
            state: tag(AppState::Online, 0),
        };
        assert_eq!(a.heard("web", &n, 0), Heard::Fetch(n.version));
        assert_eq!(
            a.heard("web", &n, 10),
            Heard::Nothing,
            "a pull is under way"
        );
        assert!(!a.fetched("web", Err("teller gone".into()), 20));
        assert_eq!(a.failed("web").unwrap().1, "teller gone");
        assert_eq!(a.heard("web", &n, 30), Heard::Fetch(n.version));
        assert!(a.fetched("web", Ok((spec("web", 2), n.state)), 40));
        assert!(a.failed("web").is_none());
        assert_eq!(a.heard("web", &n, 50), Heard::Nothing, "held now");
        let newer = Notice {
            version: Version::new(3, 1),
            ..n
        };
        assert_eq!(a.heard("web", &newer, 60), Heard::Fetch(newer.version));
        // A stale pull no longer blocks.
        assert_eq!(
            a.heard("web", &newer, 60 + FETCH_STALE_MS),
            Heard::Fetch(newer.version)
        );
    }

    #[test]
    fn the_newer_state_tag_wins_whatever_its_value() {
        let mut a = Apps::default();
        assert!(a.install(spec("web", 1), tag(AppState::Online, 0)));
        assert!(
            !a.install(spec("web", 1), tag(AppState::Offline, 9)),
            "same version"
        );
        let off = Notice {
            version: Version::new(1, 7),
            state: tag(AppState::Offline, 3),
        };
        assert_eq!(a.heard("web", &off, 0), Heard::StateChanged);
        assert_eq!(a.get("web").unwrap().state.state, AppState::Offline);
        let old_on = Notice {
            state: tag(AppState::Online, 2),
            ..off
        };
        assert_eq!(a.heard("web", &old_on, 0), Heard::Nothing);
        assert!(a.set_state("web", tag(AppState::Ignore, 4)).unwrap());
        assert!(!a.set_state("web", tag(AppState::Online, 4)).unwrap());
        assert!(a.set_state("nope", tag(AppState::Online, 9)).is_err());
    }

    #[test]
    fn notices_go_round_robin_over_the_apps() {
        let mut a = Apps::default();
        assert!(a.next_notice().is_none());
        a.install(spec("a", 1), tag(AppState::Online, 0));
        a.install(spec("b", 1), tag(AppState::Online, 0));
        let names: Vec<String> = (0..4).map(|_| a.next_notice().unwrap().0).collect();
        assert_eq!(names, ["a", "b", "a", "b"]);
    }

    #[test]
    fn specs_that_could_escape_their_directory_are_refused() {
        assert!(spec("web", 1).validate().is_ok());
        assert!(matches!(spec("Web", 1).validate(), Err(SpecError::Name(_))));
        for p in ["/etc/passwd", "../x", "a/../../x", "a//b", "./a", ""] {
            let mut s = spec("web", 1);
            s.files[0].path = p.into();
            assert!(
                matches!(s.validate(), Err(SpecError::Path(_))),
                "{p:?} accepted"
            );
        }
        let mut s = spec("web", 1);
        s.files.push(s.files[0].clone());
        assert!(matches!(s.validate(), Err(SpecError::Duplicate(_))));
        let mut s = spec("web", 1);
        s.files[0].sha256 = "zz".into();
        assert!(matches!(s.validate(), Err(SpecError::Digest(_))));
    }
}
