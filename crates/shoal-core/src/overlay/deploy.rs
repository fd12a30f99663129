//! The decisions of SSH deployment and recovery (SMON II-A-1, II-A-2), apart
//! from the SSH session that carries them out: what a probe of the target
//! found, what an installer on the target does when it finds another copy,
//! and what a remote command's exit status means as an [`Outcome`].
//!
//! Layout of a target's prefix `P`, written by the deployer and its
//! installer (docs/overlay.md, "The deploy path"):
//!
//! - `P/releases/<release>/`: one directory per deployment attempt, so two
//!   deployers never write the same file (SMON's "different directories");
//! - `P/install.lock`: `flock`ed by the installer, common to every copy;
//! - `P/current`: a symlink to the installed release;
//! - `P/installed`: the completion marker, written last (notes §7 item 4);
//! - `P/state/`: the peer's directory (`peer.lock`, `targets.json.gz`);
//! - `P/deploying/`: a deployer's claim while it copies (made with `mkdir`,
//!   which only one can; removed by the installer; stale after a minute).

use super::peer::{Inspection, Outcome};

/// The exit status of an installer or starter that found the peer already
/// installed or running: another deployer won (a duplicate deployment).
pub const EXIT_ALREADY: u32 = 3;
/// The exit status of an installer whose package failed its integrity or
/// signature check.
pub const EXIT_CORRUPT: u32 = 4;

/// The shell command a deployer runs on the target to look (`installed`,
/// `running`), for the prefix `prefix` (absolute, validated by the target
/// list). A held run lock means a peer runs; a lock file alone proves
/// nothing (the kernel drops the lock with the process).
pub fn probe_command(prefix: &str) -> String {
    let p = shell_quote(prefix);
    format!(
        "test -f {p}/installed && echo installed; \
         if [ -e {p}/state/peer.lock ] && ! flock -n {p}/state/peer.lock true; then echo running; fi; \
         {fresh} && echo deploying; \
         echo probed",
        fresh = fresh_claim(&p)
    )
}

/// A deployer's claim on a prefix while it copies the package.
pub const CLAIM: &str = "deploying";
/// How long a claim holds off other deployers: a copy takes seconds; a
/// claim older than this belongs to a deployer that died.
pub const CLAIM_TTL_MIN: u32 = 1;

/// A shell test, true if the quoted prefix `p` holds a claim younger than
/// [`CLAIM_TTL_MIN`] minutes (GNU find's `-mmin`).
fn fresh_claim(p: &str) -> String {
    format!("[ -n \"$(find {p} -maxdepth 1 -name {CLAIM} -mmin -{CLAIM_TTL_MIN} 2>/dev/null)\" ]")
}

/// The shell command that claims the prefix before a deployment copies
/// anything: a stale claim is removed, then `mkdir` makes the claim, which
/// fails if another deployer made one first (exit 1: leave the host to it).
pub fn claim_command(prefix: &str) -> String {
    let p = shell_quote(prefix);
    format!(
        "mkdir -p {p} && {{ {fresh} || rm -rf {p}/{CLAIM}; }} && mkdir {p}/{CLAIM} 2>/dev/null",
        fresh = fresh_claim(&p)
    )
}

/// Reads what [`probe_command`] printed; `None` if it did not complete (a
/// shell without `flock`, a cut session).
pub fn parse_probe(stdout: &str) -> Option<Inspection> {
    let words: Vec<&str> = stdout.split_whitespace().collect();
    if words.last() != Some(&"probed") {
        return None;
    }
    Some(Inspection {
        installed: words.contains(&"installed"),
        running: words.contains(&"running"),
        deploying: words.contains(&CLAIM),
    })
}

/// What an installer on the target does once it tried the install lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstallStep {
    /// It holds the lock and nothing is installed: install, mark, start.
    Install,
    /// Another copy holds the lock or already completed: abort and remove
    /// this copy (the losers of SMON's duplicate deployments).
    Abort,
}

/// The installer's decision, after trying the lock without blocking.
pub fn install_step(lock_taken: bool, marker_present: bool) -> InstallStep {
    if lock_taken && !marker_present {
        InstallStep::Install
    } else {
        InstallStep::Abort
    }
}

/// What a deploy (`recovery == false`) or a recovery ended as, from the
/// remote command's exit status and its output.
pub fn outcome_of(recovery: bool, exit: Option<u32>, stdout: &str, stderr: &str) -> Outcome {
    let detail = || {
        let s = stderr.trim();
        let s = if s.is_empty() { stdout.trim() } else { s };
        s.lines()
            .last()
            .unwrap_or("")
            .chars()
            .take(300)
            .collect::<String>()
    };
    match exit {
        Some(0) if stdout.split_whitespace().any(|w| w == "already-running") => {
            Outcome::AlreadyRunning
        }
        Some(0) if recovery => Outcome::Recovered,
        Some(0) => Outcome::Deployed,
        Some(EXIT_ALREADY) => Outcome::AlreadyRunning,
        Some(EXIT_CORRUPT) => Outcome::Failed(format!("package refused: {}", detail())),
        Some(c) => Outcome::Failed(format!("exit status {c}: {}", detail())),
        None => Outcome::Failed("the remote command ended without an exit status".into()),
    }
}

/// `s` quoted for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_reads_installed_and_running() {
        let i = parse_probe("installed\nrunning\nprobed\n").unwrap();
        assert!(i.installed && i.running);
        let i = parse_probe("probed\n").unwrap();
        assert!(!i.installed && !i.running && !i.deploying);
        assert!(parse_probe("deploying\nprobed\n").unwrap().deploying);
        assert_eq!(
            parse_probe("installed\n"),
            None,
            "a cut probe proves nothing"
        );
        assert!(probe_command("/opt/it's").contains("'/opt/it'\\''s'"));
    }

    #[test]
    fn only_the_lock_holder_of_an_empty_prefix_installs() {
        assert_eq!(install_step(true, false), InstallStep::Install);
        assert_eq!(install_step(true, true), InstallStep::Abort);
        assert_eq!(install_step(false, false), InstallStep::Abort);
        assert_eq!(install_step(false, true), InstallStep::Abort);
    }

    #[test]
    fn exit_statuses_become_outcomes() {
        assert_eq!(
            outcome_of(false, Some(0), "started\n", ""),
            Outcome::Deployed
        );
        assert_eq!(
            outcome_of(true, Some(0), "started\n", ""),
            Outcome::Recovered
        );
        assert_eq!(
            outcome_of(true, Some(0), "already-running\n", ""),
            Outcome::AlreadyRunning
        );
        assert_eq!(outcome_of(false, Some(3), "", ""), Outcome::AlreadyRunning);
        assert!(matches!(
            outcome_of(false, Some(4), "", "sha256 mismatch\n"),
            Outcome::Failed(d) if d.contains("sha256 mismatch")
        ));
        assert!(matches!(
            outcome_of(false, None, "", ""),
            Outcome::Failed(_)
        ));
    }
}
