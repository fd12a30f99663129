//! Self-upgrade on the host (SMON II-A-3, with the rollback a fleet needs):
//! a pulled release is verified, staged beside the running one, swapped in
//! with one `rename` of `P/current`, and the process re-executes itself on
//! it, keeping its pid, its identity and its lease, and the apps it runs.
//!
//! The new release is on probation until it proves itself healthy (it
//! heard from a peer, and its agent renewed its lease where the pool has a
//! manager) within [`probation_ms`]; then it commits. If it does not, it
//! rolls back itself; if it cannot even run, the watchdog the old release
//! started before the swap (`shoal overlay watch-upgrade`) rolls back for
//! it. A rolled-back release is marked bad in `P/state/bad.json`, and the
//! mark travels with every ping, so every host that took it rolls back too
//! and none pulls it again.
//!
//! Files under the prefix `P`:
//! - `P/current`, `P/previous`: symlinks to the running and the last
//!   release directory;
//! - `P/state/upgrade.json`: the upgrade on probation ([`Pending`]);
//! - `P/state/bad.json`: every release marked bad;
//! - `P/state/livetag.json`: the livetag, kept across restarts (SMON keeps
//!   it in its SQLite file), so a recovered peer of a disabled pool stays
//!   disabled;
//! - `P/state/peer.pid`: the running peer's pid, for the watchdog.

use crate::release;
use anyhow::Context;
use serde::{Deserialize, Serialize};
use shoal_core::overlay::{Livetag, Version};
use std::path::{Path, PathBuf};

/// An upgrade on probation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// The release swapped out.
    pub from: Version,
    /// The release swapped in.
    pub to: Version,
    /// When the swap was made (Unix ms).
    pub at_ms: u64,
    /// When probation ends.
    pub deadline_ms: u64,
    /// The new release proved healthy.
    pub committed: bool,
}

/// How long a new release has to prove healthy: ten ping intervals, at
/// least 15 s (a lease renewal and a few pings must fit in it).
pub fn probation_ms(interval_ms: u64) -> u64 {
    (interval_ms * 10).max(15_000)
}

fn write_json<T: Serialize>(path: &Path, v: &T) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(v)?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))?;
    Ok(())
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> anyhow::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(
            serde_json::from_slice(&b).with_context(|| format!("{}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// The upgrade on probation in the state directory `state`, if any.
pub fn pending(state: &Path) -> anyhow::Result<Option<Pending>> {
    read_json(&state.join("upgrade.json"))
}

/// Marks the pending upgrade committed.
pub fn commit(state: &Path) -> anyhow::Result<()> {
    if let Some(mut p) = pending(state)? {
        p.committed = true;
        write_json(&state.join("upgrade.json"), &p)?;
    }
    Ok(())
}

/// Every release marked bad on this host.
pub fn load_bad(state: &Path) -> anyhow::Result<Vec<Version>> {
    Ok(read_json(&state.join("bad.json"))?.unwrap_or_default())
}

/// Adds `v` to the releases marked bad.
pub fn add_bad(state: &Path, v: Version) -> anyhow::Result<()> {
    let mut all = load_bad(state)?;
    if !all.contains(&v) {
        all.push(v);
        all.sort();
        write_json(&state.join("bad.json"), &all)?;
    }
    Ok(())
}

/// The livetag kept in `state`.
pub fn load_livetag(state: &Path) -> anyhow::Result<Option<Livetag>> {
    read_json(&state.join("livetag.json"))
}

/// Keeps `l` in `state`.
pub fn store_livetag(state: &Path, l: &Livetag) -> anyhow::Result<()> {
    write_json(&state.join("livetag.json"), l)
}

/// The version of the release in the package directory `pkg` (its signed
/// manifest's).
pub fn release_version(pkg: &Path) -> anyhow::Result<Version> {
    Ok(release::read(pkg)?.verify(None)?.version)
}

/// Checks the release pulled into `dir` against the running package `pkg`
/// and makes `dir` a whole package: the manifest must verify under the
/// running release's key (the release key stays with the operator; a
/// release signed by any other is refused), name version `want`, and the
/// binary must have its digest and size. The running package's
/// configuration (overlay key, peer file, target list, join token) is
/// copied in beside it.
pub fn stage(pkg: &Path, dir: &Path, want: Version) -> anyhow::Result<()> {
    let trusted = release::read(pkg)?.public_key;
    let rel = release::read(dir)?;
    let m = rel.check_binary(&dir.join("shoal"), Some(&trusted))?;
    anyhow::ensure!(
        m.version == want,
        "the release says version {}, not the {want} it was offered as",
        m.version
    );
    for f in [
        "overlay.key",
        "peer.json",
        "targets.json.gz",
        crate::package::JOIN_TOKEN,
    ] {
        let src = pkg.join(f);
        if src.exists() {
            std::fs::copy(&src, dir.join(f))
                .with_context(|| format!("cannot copy {}", src.display()))?;
        }
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.join("shoal"), std::fs::Permissions::from_mode(0o755))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    Ok(())
}

fn relink(prefix: &Path, name: &str, to: &Path) -> anyhow::Result<()> {
    let tmp = prefix.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(to, &tmp)?;
    std::fs::rename(&tmp, prefix.join(name))
        .with_context(|| format!("cannot replace {}", prefix.join(name).display()))?;
    Ok(())
}

/// Swaps the staged release `dir` in: `P/previous` to the running one,
/// `P/current` to `dir` (one atomic rename), probation recorded.
pub fn swap(prefix: &Path, dir: &Path, pending: &Pending) -> anyhow::Result<()> {
    let state = prefix.join("state");
    let running = std::fs::read_link(prefix.join("current"))
        .with_context(|| format!("{} is not a symlink", prefix.join("current").display()))?;
    write_json(&state.join("upgrade.json"), pending)?;
    relink(prefix, "previous", &running)?;
    relink(prefix, "current", dir)?;
    Ok(())
}

/// Goes back to `P/previous`: returns `false` if there is none (a host
/// deployed straight onto the release being left). The upgrade record goes.
pub fn roll_back(prefix: &Path) -> anyhow::Result<bool> {
    let prev = match std::fs::read_link(prefix.join("previous")) {
        Ok(p) if p.join("shoal").exists() => p,
        _ => return Ok(false),
    };
    relink(prefix, "current", &prev)?;
    let _ = std::fs::remove_file(prefix.join("previous"));
    let _ = std::fs::remove_file(prefix.join("state/upgrade.json"));
    Ok(true)
}

/// Replaces this process with `P/current/shoal` and the same arguments: the
/// pid, and with it the apps' parent, stays. Returns only on failure.
pub fn exec_current(prefix: &Path) -> anyhow::Error {
    use std::os::unix::process::CommandExt;
    let bin = prefix.join("current").join("shoal");
    let err = std::process::Command::new(&bin)
        .args(std::env::args_os().skip(1))
        .exec();
    anyhow::anyhow!("cannot execute {}: {err}", bin.display())
}

/// Records this process as the host's peer (for the watchdog).
pub fn write_pid(state: &Path) -> anyhow::Result<()> {
    std::fs::write(state.join("peer.pid"), format!("{}\n", std::process::id()))?;
    Ok(())
}

/// Starts the watchdog of an upgrade from the running (old) binary,
/// detached: `BIN overlay watch-upgrade --prefix P`.
pub fn spawn_watchdog(bin: &Path, prefix: &Path) -> anyhow::Result<()> {
    let log = prefix.join("state").join("peer.log");
    crate::package::spawn_detached(
        bin,
        &[
            "overlay".as_ref(),
            "watch-upgrade".as_ref(),
            "--prefix".as_ref(),
            prefix.as_os_str(),
        ],
        &log,
    )?;
    Ok(())
}

/// `shoal overlay watch-upgrade --prefix P`: waits out the probation of the
/// upgrade recorded in `P/state/upgrade.json`; if it was neither committed
/// nor rolled back by then (the new release could not run, or hung), stops
/// whatever runs as the peer, marks the release bad, goes back to the
/// previous release and starts it.
pub fn watch(prefix: &Path) -> anyhow::Result<String> {
    let state = prefix.join("state");
    let Some(p) = pending(&state)? else {
        return Ok("no upgrade on probation".into());
    };
    // A little past the new release's own deadline, so that one that is
    // merely slow rolls back itself.
    let until = p.deadline_ms + 5_000;
    loop {
        match pending(&state)? {
            None => return Ok("the upgrade was rolled back by the peer".into()),
            Some(q) if q.committed || q.to != p.to => return Ok(format!("{} committed", q.to)),
            Some(_) => {}
        }
        if crate::now_ms() >= until {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    if let Ok(t) = std::fs::read_to_string(state.join("peer.pid"))
        && let Ok(pid) = t.trim().parse::<i32>()
        && pid != std::process::id() as i32
    {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let ours = String::from_utf8_lossy(&cmdline).contains(&*prefix.to_string_lossy());
        if ours {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
    add_bad(&state, p.to)?;
    if !roll_back(prefix)? {
        anyhow::bail!(
            "no previous release under {} to go back to",
            prefix.display()
        );
    }
    let started = crate::package::start(prefix)?;
    Ok(format!(
        "{} did not prove healthy by its deadline: marked bad, rolled back to {} ({started:?})",
        p.to, p.from
    ))
}

/// A fresh directory for a release pulled into `prefix`.
pub fn new_release_dir(prefix: &Path, v: Version, me: &str) -> PathBuf {
    prefix.join("releases").join(format!(
        "{}-up-{me}-{:08x}",
        v.number,
        rand::random::<u32>()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swap_and_roll_back_move_the_links_and_keep_the_record() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        std::fs::create_dir_all(p.join("state")).unwrap();
        for r in ["r1", "r2"] {
            std::fs::create_dir_all(p.join("releases").join(r)).unwrap();
            std::fs::write(p.join("releases").join(r).join("shoal"), r).unwrap();
        }
        relink(p, "current", &p.join("releases/r1")).unwrap();
        let pend = Pending {
            from: Version::new(1, 0),
            to: Version::new(2, 0),
            at_ms: 1,
            deadline_ms: 2,
            committed: false,
        };
        swap(p, &p.join("releases/r2"), &pend).unwrap();
        assert_eq!(
            std::fs::read_to_string(p.join("current/shoal")).unwrap(),
            "r2"
        );
        assert_eq!(pending(&p.join("state")).unwrap(), Some(pend));
        commit(&p.join("state")).unwrap();
        assert!(pending(&p.join("state")).unwrap().unwrap().committed);
        assert!(roll_back(p).unwrap());
        assert_eq!(
            std::fs::read_to_string(p.join("current/shoal")).unwrap(),
            "r1"
        );
        assert!(pending(&p.join("state")).unwrap().is_none());
        assert!(!roll_back(p).unwrap(), "nothing further back");
        add_bad(&p.join("state"), Version::new(2, 0)).unwrap();
        add_bad(&p.join("state"), Version::new(2, 0)).unwrap();
        assert_eq!(load_bad(&p.join("state")).unwrap(), [Version::new(2, 0)]);
        let off = Livetag {
            on: false,
            version: Version::new(4, 0),
        };
        store_livetag(&p.join("state"), &off).unwrap();
        assert_eq!(load_livetag(&p.join("state")).unwrap(), Some(off));
    }
}
