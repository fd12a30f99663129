//! The target list file an operator writes (TOML), and what a peer keeps in
//! its directory: `overlay.key` (K_E, 64 hex digits, mode 0600) and
//! `targets.json.gz` (the list it holds, compressed, replaced atomically).
//!
//! ```toml
//! version = 2              # a higher version replaces the list everywhere
//! overlay_port = 7946      # optional
//! [[target]]
//! name = "h1"
//! address = "10.0.0.1"
//! ssh_port = 22            # optional
//! user = "root"            # optional
//! prefix = "/opt/shoal"    # optional
//! host_key = "SHA256:..."  # ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub
//! ```

use crate::seal::OverlayKey;
use anyhow::Context;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use shoal_core::overlay::{DEFAULT_OVERLAY_PORT, RawTargetList, Target, TargetList, Version};
use std::io::{Read, Write};
use std::path::Path;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetsFile {
    version: u64,
    #[serde(default)]
    overlay_port: Option<u16>,
    #[serde(default)]
    target: Vec<Target>,
}

/// Parses a target list file. Its version's origin is a digest of its
/// content, so two different lists of one number still order the same way
/// on every peer.
pub fn parse_targets(text: &str) -> anyhow::Result<TargetList> {
    let f: TargetsFile = toml::from_str(text)?;
    let port = f.overlay_port.unwrap_or(DEFAULT_OVERLAY_PORT);
    let digest = Sha256::digest(serde_json::to_vec(&(port, &f.target))?);
    let origin = u64::from_be_bytes(digest[..8].try_into()?);
    Ok(TargetList::new(
        Version::new(f.version, origin),
        port,
        f.target,
    )?)
}

/// Reads and parses the target list file at `path`.
pub fn read_targets(path: &Path) -> anyhow::Result<TargetList> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse_targets(&text).with_context(|| format!("{}", path.display()))
}

/// Reads the key file at `path`.
pub fn read_key(path: &Path) -> anyhow::Result<OverlayKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the overlay key {}", path.display()))?;
    OverlayKey::from_hex(&text).with_context(|| format!("{}", path.display()))
}

/// Writes a new key file at `path`, readable by its owner only; refuses to
/// overwrite one.
pub fn write_new_key(path: &Path) -> anyhow::Result<()> {
    let mut f = create_key_file(path)?;
    writeln!(f, "{}", OverlayKey::generate().to_hex())?;
    Ok(())
}

/// Creates a key file at `path`, 0600, refusing to replace one that exists.
pub fn create_key_file(path: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| {
            format!(
                "cannot create {} (an existing key is never replaced)",
                path.display()
            )
        })
}

/// The list a peer stored in `dir`, if any.
pub fn load_stored(dir: &Path) -> anyhow::Result<Option<TargetList>> {
    let p = dir.join("targets.json.gz");
    let bytes = match std::fs::read(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", p.display())),
    };
    let mut json = Vec::new();
    flate2::read::GzDecoder::new(&bytes[..])
        .read_to_end(&mut json)
        .with_context(|| format!("{} is not gzip", p.display()))?;
    let raw: RawTargetList =
        serde_json::from_slice(&json).with_context(|| format!("{}", p.display()))?;
    Ok(Some(
        TargetList::try_from(raw).with_context(|| format!("{}", p.display()))?,
    ))
}

/// `list` as `targets.json.gz` holds it.
pub fn compressed(list: &TargetList) -> anyhow::Result<Vec<u8>> {
    let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(&serde_json::to_vec(list)?)?;
    Ok(z.finish()?)
}

/// Stores `list` in `dir`, atomically (a crash leaves the old or the new).
pub fn store(dir: &Path, list: &TargetList) -> anyhow::Result<()> {
    let p = dir.join("targets.json.gz");
    let tmp = dir.join(".targets.json.gz.tmp");
    std::fs::write(&tmp, compressed(list)?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &p).with_context(|| format!("cannot replace {}", p.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
version = 3
[[target]]
name = "h1"
address = "127.0.0.11"
host_key = "SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s"
[[target]]
name = "h2"
address = "127.0.0.12"
ssh_port = 2222
host_key = "SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s"
"#;

    #[test]
    fn a_list_file_parses_stores_and_loads_back() {
        let l = parse_targets(FILE).unwrap();
        assert_eq!(l.version().number, 3);
        assert_eq!(l.targets()[1].ssh_port, 2222);
        // Another content with the same number gets another origin.
        let other = parse_targets(&FILE.replace("2222", "2223")).unwrap();
        assert_ne!(other.version(), l.version());
        let d = tempfile::tempdir().unwrap();
        assert!(load_stored(d.path()).unwrap().is_none());
        store(d.path(), &l).unwrap();
        assert_eq!(load_stored(d.path()).unwrap(), Some(l));
    }

    #[test]
    fn a_bad_list_names_the_problem() {
        let e = format!(
            "{:#}",
            parse_targets(&FILE.replace("SHA256:uN", "MD5:uN")).unwrap_err()
        );
        assert!(e.contains("host_key") && e.contains("ssh-keygen"), "{e}");
        let e = format!("{:#}", parse_targets("version = 1\n").unwrap_err());
        assert!(e.contains("empty"), "{e}");
    }

    #[test]
    fn a_key_file_is_private_and_never_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        write_new_key(&p).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let k = read_key(&p).unwrap();
        assert!(write_new_key(&p).is_err());
        assert_eq!(read_key(&p).unwrap().to_hex(), k.to_hex());
    }
}
