//! Serving an axum router over TLS, with the verified client identity of each
//! connection attached to its requests.

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tower::ServiceExt;

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Common name of the verified client certificate, if one was presented.
    pub cn: Option<String>,
    /// SHA-256 of the client certificate's public key, hex.
    pub key_fp: Option<String>,
    /// Remote address.
    pub addr: SocketAddr,
}

impl Peer {
    /// The node name, when the peer is a node.
    pub fn node(&self) -> Option<&str> {
        self.cn
            .as_deref()
            .and_then(|c| c.strip_prefix(crate::identity::NODE_CN_PREFIX))
    }
    /// The service, when the peer is a dispatcher.
    pub fn dispatcher(&self) -> Option<&str> {
        self.cn
            .as_deref()
            .and_then(|c| c.strip_prefix(crate::identity::DISPATCHER_CN_PREFIX))
    }
    /// The peer cluster, when the peer is a federated cluster's manager.
    pub fn federation(&self) -> Option<&str> {
        self.cn
            .as_deref()
            .and_then(|c| c.strip_prefix(crate::identity::FEDERATION_CN_PREFIX))
    }
    /// Whether the peer holds the administrator certificate.
    pub fn is_admin(&self) -> bool {
        self.cn.as_deref() == Some(crate::identity::ADMIN_CN)
    }
}

/// Binds `addr`, with an error that names the address and the fix.
pub async fn bind(addr: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!(
                "cannot listen on {addr}: the address is already in use; stop the other process or pick another address with --listen"
            )
        } else {
            anyhow::anyhow!("cannot listen on {addr}: {e}")
        }
    })
}

/// Serves `router` over TLS until the task is dropped. A failed handshake
/// only drops that connection.
pub async fn serve_tls(listener: TcpListener, tls: Arc<rustls::ServerConfig>, router: Router) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let router = router.clone();
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%addr, "TLS handshake failed: {e}");
                        return;
                    }
                    Err(_) => return,
                };
            let certs = tls.get_ref().1.peer_certificates();
            let cn = certs.and_then(crate::tls::peer_common_name);
            let key_fp = certs
                .and_then(|c| c.first())
                .and_then(|c| crate::tls::cert_key_fingerprint(c.as_ref()));
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            let peer = Peer { cn, key_fp, addr };
            if h2 {
                serve_conn(TokioIo::new(tls), router, peer).await;
            } else {
                serve_h1(TokioIo::new(tls), router, peer).await;
            }
        });
    }
}

/// Serves `router` over plain HTTP (the read-only dashboard on loopback).
pub async fn serve_plain(listener: TcpListener, router: Router) {
    loop {
        let Ok((tcp, addr)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let router = router.clone();
        tokio::spawn(async move {
            serve_conn(
                TokioIo::new(tcp),
                router,
                Peer {
                    cn: None,
                    key_fp: None,
                    addr,
                },
            )
            .await;
        });
    }
}

async fn serve_conn<I>(io: TokioIo<I>, router: Router, peer: Peer)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(peer.clone());
        router.clone().oneshot(req)
    });
    let mut b = Builder::new(TokioExecutor::new());
    b.http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    let _ = b.serve_connection_with_upgrades(io, svc).await;
}

/// HTTP/1.1 only, for connections that negotiated it: agents hold one such
/// connection each, so its idle footprint is what 10,000 agents cost.
async fn serve_h1<I>(io: TokioIo<I>, router: Router, peer: Peer)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(peer.clone());
        router.clone().oneshot(req)
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .serve_connection(io, svc)
        .with_upgrades()
        .await;
}
