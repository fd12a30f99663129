//! Packages between peers, over TCP on the overlay port: a release (the
//! shoal binary and its signed manifest, II-A-3) or an app's package
//! (II-D). The peer with the lower version pulls from the one that showed
//! the higher; the client utility serves the same way when it hands a
//! release or an app to one peer (II-E: it mimics a peer).
//!
//! The request is one sealed message ([`crate::seal`], the overlay key), so
//! only a holder of K_E is served; the answer is a JSON header naming the
//! files and their sizes, then their bytes. Nothing in the answer is
//! trusted: the puller checks the release's signature and the binary's
//! digest, or the app's digests from its spec, before it uses anything.

use crate::seal::{Opener, OverlayKey, Sealer};
use crate::wire::{self, Body, Message};
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The most a package may hold (a shoal binary is about 30 MB).
pub const MAX_PACKAGE: u64 = 1 << 30;
/// A request or a header larger than this is refused.
const MAX_FRAME: u32 = 1 << 20;
/// How long a whole transfer may take.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(120);

/// What is asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "what", rename_all = "snake_case")]
pub enum What {
    /// The release the server runs.
    Release,
    /// An app's package and spec.
    App {
        /// The app.
        name: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    /// Relative path and size of each file, in the order sent.
    files: Vec<(String, u64)>,
    /// Why nothing is sent.
    error: Option<String>,
}

/// What a server serves: the files of a package, by their relative path
/// in it, or why not.
pub type Catalog = Arc<dyn Fn(&What) -> Result<Vec<(String, PathBuf)>, String> + Send + Sync>;

/// Serves packages on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, key: OverlayKey, catalog: Catalog) {
    loop {
        let Ok((conn, src)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (key, catalog) = (key.clone(), catalog.clone());
        tokio::spawn(async move {
            if let Err(e) =
                tokio::time::timeout(TRANSFER_TIMEOUT, answer(conn, &key, &catalog)).await
            {
                tracing::debug!(%src, "package transfer: {e}");
            }
        });
    }
}

async fn read_frame(c: &mut TcpStream) -> anyhow::Result<Vec<u8>> {
    let n = c.read_u32().await?;
    anyhow::ensure!(n <= MAX_FRAME, "a frame of {n} bytes is too large");
    let mut b = vec![0u8; n as usize];
    c.read_exact(&mut b).await?;
    Ok(b)
}

async fn write_frame(c: &mut TcpStream, b: &[u8]) -> anyhow::Result<()> {
    c.write_u32(b.len() as u32).await?;
    c.write_all(b).await?;
    Ok(())
}

async fn answer(mut conn: TcpStream, key: &OverlayKey, catalog: &Catalog) -> anyhow::Result<()> {
    let sealed = read_frame(&mut conn).await?;
    let plain = Opener::new(key)
        .open(&sealed)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let m = wire::decode(&plain, crate::now_ms())?;
    let Body::Fetch { what } = m.body else {
        anyhow::bail!("not a fetch");
    };
    let files = catalog(&what);
    let (header, paths) = match files {
        Ok(files) => {
            let mut list = Vec::new();
            let mut paths = Vec::new();
            for (name, p) in files {
                let size = std::fs::metadata(&p)
                    .with_context(|| format!("{}", p.display()))?
                    .len();
                list.push((name, size));
                paths.push(p);
            }
            (
                Header {
                    files: list,
                    error: None,
                },
                paths,
            )
        }
        Err(e) => (
            Header {
                files: Vec::new(),
                error: Some(e),
            },
            Vec::new(),
        ),
    };
    write_frame(&mut conn, &serde_json::to_vec(&header)?).await?;
    for (p, (_, size)) in paths.iter().zip(&header.files) {
        let f = tokio::fs::File::open(p).await?;
        // Exactly the size announced, even if the file grew meanwhile.
        let n = tokio::io::copy(&mut f.take(*size), &mut conn).await?;
        anyhow::ensure!(n == *size, "{} shrank while it was sent", p.display());
    }
    conn.shutdown().await?;
    Ok(())
}

/// A path a server named, if it stays inside the package directory.
fn safe(name: &str) -> Option<&Path> {
    shoal_core::overlay::apps::is_package_path(name).then(|| Path::new(name))
}

/// Pulls `what` from the server at `addr` into the directory `into`
/// (created; its files are written as named, relative to it). Returns the
/// names written. Checks only sizes and paths: verifying the content is the
/// caller's.
pub async fn fetch(
    addr: SocketAddr,
    key: &OverlayKey,
    from: &str,
    what: What,
    into: &Path,
) -> anyhow::Result<Vec<String>> {
    tokio::time::timeout(TRANSFER_TIMEOUT, fetch_inner(addr, key, from, what, into))
        .await
        .with_context(|| format!("the transfer from {addr} took over {TRANSFER_TIMEOUT:?}"))?
}

async fn fetch_inner(
    addr: SocketAddr,
    key: &OverlayKey,
    from: &str,
    what: What,
    into: &Path,
) -> anyhow::Result<Vec<String>> {
    let mut c = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .with_context(|| format!("cannot connect to {addr} within 5 s"))?
        .with_context(|| format!("cannot connect to {addr}"))?;
    let m = Message {
        sent_ms: crate::now_ms(),
        from: from.into(),
        body: Body::Fetch { what },
    };
    let sealed = Sealer::new(key).seal(&wire::encode(&m)?);
    write_frame(&mut c, &sealed).await?;
    let header: Header = serde_json::from_slice(&read_frame(&mut c).await?)
        .with_context(|| format!("{addr} sent a malformed package header"))?;
    if let Some(e) = header.error {
        anyhow::bail!("{addr} has no such package: {e}");
    }
    let total: u64 = header.files.iter().map(|(_, s)| s).sum();
    anyhow::ensure!(
        total <= MAX_PACKAGE,
        "{addr} offers a package of {total} bytes, over the {MAX_PACKAGE}-byte limit"
    );
    tokio::fs::create_dir_all(into).await?;
    let mut names = Vec::new();
    for (name, size) in header.files {
        let rel = safe(&name)
            .with_context(|| format!("{addr} named a file {name:?} outside the package"))?;
        let path = into.join(rel);
        if let Some(d) = path.parent() {
            tokio::fs::create_dir_all(d).await?;
        }
        let mut f = tokio::fs::File::create(&path)
            .await
            .with_context(|| format!("cannot write {}", path.display()))?;
        let n = tokio::io::copy(&mut (&mut c).take(size), &mut f).await?;
        anyhow::ensure!(n == size, "{addr} cut the transfer of {name}");
        f.sync_all().await?;
        names.push(name);
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_package_travels_and_a_stranger_is_not_served() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir_all(src.join("www")).unwrap();
        std::fs::write(src.join("shoal"), vec![7u8; 300_000]).unwrap();
        std::fs::write(src.join("www/index.html"), b"hi").unwrap();
        let key = OverlayKey::generate();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let s2 = src.clone();
        let catalog: Catalog = Arc::new(move |w: &What| match w {
            What::Release => Ok(vec![
                ("shoal".into(), s2.join("shoal")),
                ("www/index.html".into(), s2.join("www/index.html")),
            ]),
            What::App { name } => Err(format!("no app {name}")),
        });
        tokio::spawn(serve(l, key.clone(), catalog));
        let into = d.path().join("into");
        let names = fetch(addr, &key, "h1", What::Release, &into).await.unwrap();
        assert_eq!(names, ["shoal", "www/index.html"]);
        assert_eq!(std::fs::read(into.join("shoal")).unwrap().len(), 300_000);
        assert_eq!(std::fs::read(into.join("www/index.html")).unwrap(), b"hi");
        let e = fetch(addr, &key, "h1", What::App { name: "x".into() }, &into)
            .await
            .unwrap_err();
        assert!(format!("{e:#}").contains("no app x"), "{e:#}");
        // Without the overlay key the server hangs up.
        let other = OverlayKey::generate();
        assert!(
            fetch(addr, &other, "h1", What::Release, &d.path().join("x"))
                .await
                .is_err()
        );
        assert!(safe("../x").is_none() && safe("/etc").is_none() && safe("a/b").is_some());
    }
}
