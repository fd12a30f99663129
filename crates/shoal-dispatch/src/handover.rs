//! Zero-downtime upgrade: a new dispatcher takes over a running one's
//! listening sockets over a Unix socket (SCM_RIGHTS), as HAProxy's
//! `expose-fd listeners` with `-x` does.
//!
//! The old dispatcher offers its sockets to whoever connects (owner only:
//! the socket file is 0600 and the peer's uid is checked). The new one
//! serves on them, takes the socket path over for the next upgrade, and
//! says `ready`; only then does the old one stop accepting and drain. The
//! listening sockets are never closed in between, so a client connecting
//! during the swap waits in the backlog for the new one instead of being
//! refused, and requests already in flight finish on the old one.

use anyhow::Context as _;
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};
use std::io::{IoSlice, IoSliceMut, Write as _};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, Interest};

/// Changes whenever the exchange below does; both ends must agree.
const VERSION: u32 = 1;
/// Descriptors per message: the kernel takes at most 253 (SCM_MAX_FD).
const FDS_PER_MESSAGE: usize = 200;
/// The reply that makes the old dispatcher let go.
const READY: &[u8] = b"ready\n";
/// How long either end waits for the other.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a running dispatcher offers, sent ahead of its descriptors.
#[derive(Debug, Serialize, Deserialize)]
struct Offer {
    version: u32,
    pid: u32,
    /// The address every proxy listener is bound to.
    listen: SocketAddr,
    /// Proxy listeners (one per thread of the old dispatcher), sent first.
    listeners: usize,
    /// The admin listener's address; its descriptor comes last.
    admin: Option<SocketAddr>,
}

/// Sockets taken over from a running dispatcher, which keeps serving on
/// them until [`Taken::release`].
#[derive(Debug)]
pub struct Taken {
    pub pid: u32,
    pub listeners: Vec<std::net::TcpListener>,
    pub admin: Option<(SocketAddr, std::net::TcpListener)>,
    conn: std::os::unix::net::UnixStream,
}

impl Taken {
    /// Tells the old dispatcher that this one accepts on every socket:
    /// it stops accepting, finishes its requests in flight and exits.
    pub fn release(mut self) -> anyhow::Result<u32> {
        self.conn
            .write_all(READY)
            .with_context(|| format!("telling the old dispatcher (pid {}) to stop", self.pid))?;
        Ok(self.pid)
    }
}

/// Takes over the listening sockets of the dispatcher serving `path`, if
/// one does; `None` when none runs there (no socket file, or a stale one).
/// Its proxy listeners must be bound to `listen`.
pub fn take(path: &Path, listen: SocketAddr) -> anyhow::Result<Option<Taken>> {
    use std::io::ErrorKind::{ConnectionRefused, NotFound};
    let conn = match std::os::unix::net::UnixStream::connect(path) {
        Ok(c) => c,
        Err(e) if matches!(e.kind(), NotFound | ConnectionRefused) => return Ok(None),
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "--handover {}: cannot reach a dispatcher there; give a path in a directory this user may write",
                    path.display()
                )
            });
        }
    };
    conn.set_read_timeout(Some(EXCHANGE_TIMEOUT))?;
    conn.set_write_timeout(Some(EXCHANGE_TIMEOUT))?;
    let (offer, mut fds) = receive_offer(&conn).with_context(|| {
        format!(
            "--handover {}: the dispatcher there did not hand over its sockets",
            path.display()
        )
    })?;
    if offer.listen != listen {
        anyhow::bail!(
            "--handover {}: the dispatcher there (pid {}) listens on {}, not {listen}; \
             give --listen {} to take its place, or another --handover path",
            path.display(),
            offer.pid,
            offer.listen,
            offer.listen
        );
    }
    // The admin listener's descriptor comes last (`receive_offer` counted).
    let admin = offer
        .admin
        .and_then(|a| fds.pop().map(|fd| (a, std::net::TcpListener::from(fd))));
    let listeners: Vec<std::net::TcpListener> =
        fds.into_iter().map(std::net::TcpListener::from).collect();
    for l in listeners.iter().chain(admin.iter().map(|(_, l)| l)) {
        l.set_nonblocking(true)?;
    }
    for l in &listeners {
        let at = l.local_addr()?;
        anyhow::ensure!(
            at == listen,
            "--handover {}: a socket handed over is bound to {at}, not {listen}",
            path.display()
        );
    }
    Ok(Some(Taken {
        pid: offer.pid,
        listeners,
        admin,
        conn,
    }))
}

/// Reads the offer line and every descriptor it announces.
fn receive_offer(conn: &std::os::unix::net::UnixStream) -> anyhow::Result<(Offer, Vec<OwnedFd>)> {
    let mut bytes = Vec::new();
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut buf = [0u8; 4096];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; FDS_PER_MESSAGE]);
    let mut offer: Option<Offer> = None;
    loop {
        if let Some(o) = &offer
            && fds.len() >= o.listeners + usize::from(o.admin.is_some())
        {
            break;
        }
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            conn.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(std::io::Error::from)
        .context("reading the offer")?;
        let n = msg.bytes;
        for c in msg
            .cmsgs()
            .map_err(|_| anyhow::anyhow!("descriptors were cut short (too many at once)"))?
        {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: the kernel just installed these descriptors in
                // this process; nothing else owns them.
                fds.extend(raw.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
            }
        }
        if n == 0 {
            anyhow::bail!("the connection closed mid-offer");
        }
        bytes.extend_from_slice(&buf[..n]);
        if offer.is_none()
            && let Some(end) = bytes.iter().position(|&b| b == b'\n')
        {
            let o: Offer = serde_json::from_slice(&bytes[..end]).context("a malformed offer")?;
            if o.version != VERSION {
                anyhow::bail!(
                    "the running dispatcher speaks handover version {}, this one {VERSION}; \
                     stop it and start this one instead",
                    o.version
                );
            }
            offer = Some(o);
        } else if offer.is_none() && bytes.len() > 64 * 1024 {
            anyhow::bail!("an offer longer than 64 KiB");
        }
    }
    let offer = offer.expect("loop ends with an offer");
    let want = offer.listeners + usize::from(offer.admin.is_some());
    if fds.len() != want {
        anyhow::bail!("{} descriptors received, {want} announced", fds.len());
    }
    Ok((offer, fds))
}

/// The Unix socket a running dispatcher offers its sockets on. Removes its
/// file on drop if the file is still its own (a successor replaces it).
pub struct Server {
    listener: tokio::net::UnixListener,
    path: PathBuf,
    ino: (u64, u64),
}

impl Server {
    /// Binds `path`, replacing a socket file left there (by a dispatcher
    /// that died, or one being taken over), never any other kind of file.
    pub fn bind(path: &Path) -> anyhow::Result<Server> {
        if let Ok(m) = std::fs::symlink_metadata(path) {
            if !m.file_type().is_socket() {
                anyhow::bail!(
                    "--handover {}: the path exists and is not a socket; give a path of its own \
                     (e.g. /run/shoal/dispatch-web.sock)",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("replacing the socket {}", path.display()))?;
        }
        let listener = tokio::net::UnixListener::bind(path)
            .with_context(|| format!("--handover {}: binding the socket", path.display()))?;
        // Whoever connects can take the listeners: the owner only.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let m = std::fs::symlink_metadata(path)?;
        Ok(Server {
            listener,
            path: path.to_path_buf(),
            ino: (m.dev(), m.ino()),
        })
    }

    /// Offers `listeners` (bound to `listen`) and the admin listener to
    /// every dispatcher that connects, one at a time, until one says it
    /// serves on them; returns then. A connection that fails or gives up
    /// changes nothing: this dispatcher keeps serving.
    pub async fn offer(
        &self,
        listen: SocketAddr,
        listeners: &[OwnedFd],
        admin: Option<(SocketAddr, &OwnedFd)>,
    ) -> u32 {
        let me = nix::unistd::geteuid().as_raw();
        loop {
            let conn = match self.listener.accept().await {
                Ok((c, _)) => c,
                Err(e) => {
                    tracing::warn!("handover socket: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let peer = match conn.peer_cred() {
                Ok(c) if c.uid() == me => c.pid().unwrap_or(0) as u32,
                Ok(c) => {
                    tracing::warn!("handover refused to uid {} (not this user)", c.uid());
                    continue;
                }
                Err(e) => {
                    tracing::warn!("handover: peer credentials: {e}");
                    continue;
                }
            };
            let offer = Offer {
                version: VERSION,
                pid: std::process::id(),
                listen,
                listeners: listeners.len(),
                admin: admin.map(|(a, _)| a),
            };
            let fds: Vec<std::os::fd::RawFd> = listeners
                .iter()
                .chain(admin.map(|(_, fd)| fd))
                .map(AsRawFd::as_raw_fd)
                .collect();
            match tokio::time::timeout(EXCHANGE_TIMEOUT, exchange(conn, &offer, &fds)).await {
                Ok(Ok(())) => {
                    tracing::info!("handed over to pid {peer}: draining");
                    return peer;
                }
                Ok(Err(e)) => {
                    tracing::warn!("handover to pid {peer} abandoned ({e}); still serving")
                }
                Err(_) => tracing::warn!("handover to pid {peer} timed out; still serving"),
            }
        }
    }
}

/// Sends the offer and descriptors, then waits for `ready`.
async fn exchange(
    mut conn: tokio::net::UnixStream,
    offer: &Offer,
    fds: &[std::os::fd::RawFd],
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(offer).map_err(std::io::Error::other)?;
    line.push(b'\n');
    let mut batches = fds.chunks(FDS_PER_MESSAGE);
    // The offer rides with the first batch, a newline with each later one.
    let first = batches.next().unwrap_or(&[]);
    let sent = send_with_fds(&conn, &line, first).await?;
    conn.write_all(&line[sent..]).await?;
    for batch in batches {
        let sent = send_with_fds(&conn, b"\n", batch).await?;
        debug_assert_eq!(sent, 1);
    }
    let mut got = [0u8; READY.len()];
    conn.read_exact(&mut got).await?;
    if got != READY {
        return Err(std::io::Error::other("an unexpected reply"));
    }
    Ok(())
}

/// One sendmsg carrying `fds`; returns how many bytes of `data` went.
async fn send_with_fds(
    conn: &tokio::net::UnixStream,
    data: &[u8],
    fds: &[std::os::fd::RawFd],
) -> std::io::Result<usize> {
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    conn.async_io(Interest::WRITABLE, || {
        sendmsg::<()>(
            conn.as_raw_fd(),
            &[IoSlice::new(data)],
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(std::io::Error::from)
    })
    .await
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path)
            && (m.dev(), m.ino()) == self.ino
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
