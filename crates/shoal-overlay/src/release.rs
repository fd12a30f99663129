//! Releases: the manifest that says which shoal binary the cluster
//! released, signed with the release key (ed25519), so a peer installs and
//! ships only a released binary (SMON checked an MD5 against transfer errors
//! only; notes §7 item 6).
//!
//! The release key is the operator's and stays with them: it is not the
//! overlay key, because every peer holds K_E and so could otherwise release
//! anything. A release directory holds `manifest.json`, `manifest.sig` (hex)
//! and `release.pub` (hex); every package carries it.

use anyhow::Context;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shoal_core::overlay::Version;
use std::io::{Read, Write};
use std::path::Path;

/// The files of a release beside its binary.
pub const FILES: [&str; 3] = ["manifest.json", "manifest.sig", "release.pub"];

/// What a release says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The package version peers announce.
    pub version: Version,
    /// The binary's SHA-256, hex.
    pub binary_sha256: String,
    /// Its size in bytes.
    pub binary_size: u64,
}

/// A release as it travels: the manifest's bytes, their signature, the
/// public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// `manifest.json`, exactly as signed.
    pub manifest: Vec<u8>,
    /// `manifest.sig`: hex.
    pub signature: String,
    /// `release.pub`: hex.
    pub public_key: String,
}

/// The SHA-256 of the file at `path`, hex, and its size.
pub fn sha256_file(path: &Path) -> anyhow::Result<(String, u64)> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((hex::encode(h.finalize()), n))
}

/// Writes a new release key (PKCS#8, hex, mode 0600) and returns its public
/// half, hex. Never overwrites a key.
pub fn write_new_key(path: &Path) -> anyhow::Result<String> {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
        .map_err(|_| anyhow::anyhow!("cannot generate an ed25519 key"))?;
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
        .map_err(|_| anyhow::anyhow!("cannot load the new key"))?;
    let mut f = crate::files::create_key_file(path)?;
    writeln!(f, "{}", hex::encode(pkcs8.as_ref()))?;
    Ok(hex::encode(pair.public_key().as_ref()))
}

fn read_key(path: &Path) -> anyhow::Result<Ed25519KeyPair> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the release key {}", path.display()))?;
    let der = hex::decode(text.trim()).with_context(|| {
        format!(
            "{} is not a release key (hex PKCS#8); make one with `shoal overlay release-key --out FILE`",
            path.display()
        )
    })?;
    Ed25519KeyPair::from_pkcs8(&der).map_err(|_| {
        anyhow::anyhow!(
            "{} is not an ed25519 release key; make one with `shoal overlay release-key --out FILE`",
            path.display()
        )
    })
}

/// Signs a release of `binary` as `version` with the key at `key`, into
/// the directory `out`.
pub fn sign(key: &Path, binary: &Path, version: Version, out: &Path) -> anyhow::Result<Manifest> {
    let pair = read_key(key)?;
    let (binary_sha256, binary_size) = sha256_file(binary)?;
    let m = Manifest {
        version,
        binary_sha256,
        binary_size,
    };
    let bytes = serde_json::to_vec_pretty(&m)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    std::fs::write(out.join("manifest.json"), &bytes)?;
    std::fs::write(
        out.join("manifest.sig"),
        hex::encode(pair.sign(&bytes).as_ref()),
    )?;
    std::fs::write(
        out.join("release.pub"),
        hex::encode(pair.public_key().as_ref()),
    )?;
    Ok(m)
}

/// Reads the release in `dir`.
pub fn read(dir: &Path) -> anyhow::Result<Release> {
    let r = |f: &str| {
        std::fs::read(dir.join(f)).with_context(|| {
            format!(
                "cannot read {}; sign a release with `shoal overlay release`",
                dir.join(f).display()
            )
        })
    };
    Ok(Release {
        manifest: r("manifest.json")?,
        signature: String::from_utf8_lossy(&r("manifest.sig")?)
            .trim()
            .to_string(),
        public_key: String::from_utf8_lossy(&r("release.pub")?)
            .trim()
            .to_string(),
    })
}

impl Release {
    /// Writes it into `dir`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::write(dir.join("manifest.json"), &self.manifest)?;
        std::fs::write(dir.join("manifest.sig"), &self.signature)?;
        std::fs::write(dir.join("release.pub"), &self.public_key)?;
        Ok(())
    }

    /// The manifest, if its signature verifies under `trusted` (hex; the
    /// release's own key when `None`).
    pub fn verify(&self, trusted: Option<&str>) -> anyhow::Result<Manifest> {
        let key = trusted.unwrap_or(&self.public_key);
        if key != self.public_key {
            anyhow::bail!(
                "the release is signed by key {}, not the trusted {key}",
                self.public_key
            );
        }
        let pk = hex::decode(key).context("release.pub is not hex")?;
        let sig = hex::decode(&self.signature).context("manifest.sig is not hex")?;
        UnparsedPublicKey::new(&ED25519, pk)
            .verify(&self.manifest, &sig)
            .map_err(|_| {
                anyhow::anyhow!("the release manifest's signature does not verify: not a release")
            })?;
        serde_json::from_slice(&self.manifest).context("manifest.json")
    }

    /// Checks that `binary` is the released one.
    pub fn check_binary(&self, binary: &Path, trusted: Option<&str>) -> anyhow::Result<Manifest> {
        let m = self.verify(trusted)?;
        let (sum, size) = sha256_file(binary)?;
        if sum != m.binary_sha256 || size != m.binary_size {
            anyhow::bail!(
                "{} (sha256 {sum}, {size} bytes) is not the released binary (sha256 {}, {} bytes)",
                binary.display(),
                m.binary_sha256,
                m.binary_size
            );
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_release_verifies_and_a_changed_one_does_not() {
        let d = tempfile::tempdir().unwrap();
        let key = d.path().join("release.key");
        let pub_hex = write_new_key(&key).unwrap();
        assert!(write_new_key(&key).is_err(), "never overwritten");
        let bin = d.path().join("shoal");
        std::fs::write(&bin, b"the binary").unwrap();
        let out = d.path().join("rel");
        sign(&key, &bin, Version::new(7, 0), &out).unwrap();
        let r = read(&out).unwrap();
        assert_eq!(
            r.check_binary(&bin, Some(&pub_hex)).unwrap().version.number,
            7
        );
        std::fs::write(&bin, b"the binarY").unwrap();
        assert!(
            format!("{:#}", r.check_binary(&bin, None).unwrap_err()).contains("not the released")
        );
        let mut forged = r.clone();
        forged.manifest[5] ^= 1;
        assert!(forged.verify(None).is_err());
        let other = d.path().join("other.key");
        let other_pub = write_new_key(&other).unwrap();
        assert!(
            r.verify(Some(&other_pub)).is_err(),
            "another key is not trusted"
        );
    }
}
