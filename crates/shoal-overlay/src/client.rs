//! One request to one peer, as the client utility (SMON II-E) makes it:
//! sealed with the overlay key, resent a few times (UDP may drop it), and
//! an error naming the likely cause when no answer comes.

use crate::seal::{Opener, OverlayKey, Sealer};
use crate::wire::{self, Body, Message, StatusReport};
use anyhow::Context;
use shoal_core::overlay::{TargetList, Version};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::UdpSocket;

/// Sends `body` to `peer` and returns the first answer `accept` takes.
pub async fn request<T>(
    peer: SocketAddr,
    key: &OverlayKey,
    body: Body,
    timeout: Duration,
    accept: impl Fn(Body) -> Option<T>,
) -> anyhow::Result<T> {
    request_as(None, "shoal", peer, key, body, timeout, accept).await
}

/// [`request`] sent as target `from`, from its address `bind` (a peer
/// answers some requests only to a listed target at its own address).
pub async fn request_as<T>(
    bind: Option<std::net::IpAddr>,
    from: &str,
    peer: SocketAddr,
    key: &OverlayKey,
    body: Body,
    timeout: Duration,
    accept: impl Fn(Body) -> Option<T>,
) -> anyhow::Result<T> {
    let bind: SocketAddr = match bind {
        Some(ip) => SocketAddr::new(ip, 0),
        None if peer.is_ipv4() => "0.0.0.0:0".parse()?,
        None => "[::]:0".parse()?,
    };
    let sock = UdpSocket::bind(bind)
        .await
        .context("cannot open a UDP socket")?;
    let mut sealer = Sealer::new(key);
    let mut opener = Opener::new(key);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = vec![0u8; wire::MAX_DATAGRAM + 64];
    let tries = 4u32;
    for attempt in 0..tries {
        let m = Message {
            sent_ms: crate::now_ms(),
            from: from.into(),
            body: body.clone(),
        };
        sock.send_to(&sealer.seal(&wire::encode(&m)?), peer)
            .await
            .with_context(|| format!("cannot send to {peer}"))?;
        let until = (tokio::time::Instant::now() + timeout / tries).min(deadline);
        while let Ok(r) = tokio::time::timeout_at(until, sock.recv_from(&mut buf)).await {
            let (n, src) = r?;
            if src != peer {
                continue;
            }
            let Ok(plain) = opener.open(&buf[..n]) else {
                continue;
            };
            let Ok(m) = wire::decode(&plain, crate::now_ms()) else {
                continue;
            };
            if let Some(t) = accept(m.body) {
                return Ok(t);
            }
        }
        if attempt + 1 == tries || tokio::time::Instant::now() >= deadline {
            break;
        }
    }
    anyhow::bail!(
        "no answer from {peer} within {:?}: is an overlay peer running there, with this overlay key?",
        timeout
    )
}

/// `shoal overlay status`: the peer's view.
pub async fn status(
    peer: SocketAddr,
    key: &OverlayKey,
    timeout: Duration,
) -> anyhow::Result<StatusReport> {
    let id: u64 = rand::random();
    request(peer, key, Body::Status { id }, timeout, |b| match b {
        Body::StatusReport { id: i, report } if i == id => Some(*report),
        _ => None,
    })
    .await
}

/// `shoal overlay targets set`: whether the peer adopted `list`, and the
/// version it holds.
pub async fn set_targets(
    peer: SocketAddr,
    key: &OverlayKey,
    list: TargetList,
    timeout: Duration,
) -> anyhow::Result<(bool, Version)> {
    let id: u64 = rand::random();
    request(
        peer,
        key,
        Body::SetTargets { id, list },
        timeout,
        |b| match b {
            Body::TargetsSet {
                id: i,
                adopted,
                version,
            } if i == id => Some((adopted, version)),
            _ => None,
        },
    )
    .await
}

/// `shoal overlay status --all` and the dashboard: asks `peer`, then every
/// other target of its list at once (on the same port), and merges the
/// reports of those that answer within `timeout`
/// ([`shoal_core::overlay::report::merge`]; a target heard from within
/// three of its intervals counts as alive).
pub async fn survey(
    peer: SocketAddr,
    key: &OverlayKey,
    timeout: Duration,
) -> anyhow::Result<shoal_core::overlay::report::PoolView> {
    let first = status(peer, key, timeout).await?;
    let mut asks = tokio::task::JoinSet::new();
    for t in &first.targets {
        let Ok(ip) = t.address.parse::<std::net::IpAddr>() else {
            continue;
        };
        if t.state == "self" || ip == peer.ip() {
            continue;
        }
        let key = key.clone();
        let to = SocketAddr::new(ip, peer.port());
        asks.spawn(async move { status(to, &key, timeout).await.ok() });
    }
    let alive_ms = first.interval_ms * 3 + first.timeout_ms;
    let mut reports = vec![first];
    while let Some(r) = asks.join_next().await {
        if let Ok(Some(r)) = r {
            reports.push(r);
        }
    }
    Ok(shoal_core::overlay::report::merge(
        &reports,
        crate::now_ms(),
        alive_ms,
    ))
}

/// Asks the other targets of `list`, in a random order, for a deploy
/// token admitting target `me` (by name, from its own address): the
/// first peer whose agent has joined the manager mints one.
pub async fn join_token(
    list: &TargetList,
    me: &str,
    key: &OverlayKey,
    timeout: Duration,
) -> anyhow::Result<String> {
    let mine = list
        .index(me)
        .and_then(|i| list.get(i))
        .with_context(|| format!("{me:?} is not in the target list"))?;
    let mut others: Vec<_> = list.targets().iter().filter(|t| t.name != me).collect();
    rand::seq::SliceRandom::shuffle(&mut others[..], &mut rand::thread_rng());
    let mut why = Vec::new();
    for t in others {
        let id: u64 = rand::random();
        let peer = SocketAddr::new(t.address, list.overlay_port());
        let r = request_as(
            Some(mine.address),
            me,
            peer,
            key,
            Body::JoinToken { id },
            timeout,
            |b| match b {
                Body::JoinTokenGranted { id: i, result } if i == id => Some(result),
                _ => None,
            },
        )
        .await;
        match r {
            Ok(Ok(token)) => return Ok(token),
            Ok(Err(e)) => why.push(format!("{}: {e}", t.name)),
            Err(e) => why.push(format!("{}: {e:#}", t.name)),
        }
    }
    anyhow::bail!("no peer could mint a deploy token: {}", why.join("; "))
}
