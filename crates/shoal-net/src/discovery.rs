//! Keyed discovery (LAMA/JINI): a node finds the manager by UDP multicast,
//! without knowing its address. The probe carries an HMAC over a fresh nonce
//! keyed with the token's secret; the manager stays silent to anyone who
//! cannot produce it, so a node without the key cannot even find the pool.
//! The answer is MACed over the same nonce, so the node does not follow a
//! forged answer either (and the URL it learns is then pinned by the CA
//! fingerprint when it joins).
//!
//! Version 2: the key is derived one-way from a join token's secret (the
//! manager stores only that), the probe names the token's id, and carries a
//! timestamp and a nonce under the MAC. The manager answers a probe only
//! within 30 s of its stamp and only once per nonce, so a probe captured on
//! the LAN is worth nothing later (`shoal_core::trust::ProbeGuard`).

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use socket2::{Domain, Protocol, Socket, Type};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;
use tokio::net::UdpSocket;

/// The multicast group shoal uses (administratively scoped, RFC 2365).
pub const GROUP: Ipv4Addr = Ipv4Addr::new(239, 255, 74, 76);
/// Default discovery port.
pub const DEFAULT_PORT: u16 = 7401;

/// How far a probe's stamp may be from the manager's clock, either way.
pub const PROBE_WINDOW_MS: u64 = 30_000;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Probe {
    v: u8,
    id: String,
    ts: u64,
    nonce: String,
    mac: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Answer {
    v: u8,
    url: String,
    mac: String,
}

fn mac(secret: &[u8; 32], parts: &[&str]) -> String {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    for p in parts {
        m.update(p.as_bytes());
        m.update(b"\n");
    }
    hex::encode(m.finalize().into_bytes())
}

fn verify(secret: &[u8; 32], parts: &[&str], got: &str) -> bool {
    let Ok(got) = hex::decode(got) else {
        return false;
    };
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    for p in parts {
        m.update(p.as_bytes());
        m.update(b"\n");
    }
    m.verify_slice(&got).is_ok()
}

/// IPv4 addresses of the interfaces that can carry multicast.
fn multicast_interfaces() -> Vec<Ipv4Addr> {
    use nix::net::if_::InterfaceFlags;
    let mut out = Vec::new();
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs {
            let up = a.flags.contains(InterfaceFlags::IFF_UP);
            let mc = a.flags.contains(InterfaceFlags::IFF_MULTICAST);
            if let (true, true, Some(sa)) = (up, mc, a.address)
                && let Some(sin) = sa.as_sockaddr_in()
            {
                out.push(sin.ip());
            }
        }
    }
    out
}

/// Answers one datagram: `Some(answer)` for a probe MACed with the key of
/// the token it names (`key_for`), stamped within the window and never seen
/// before; `None` (silence) for anything else. Pure apart from `guard`.
pub fn answer_probe(
    datagram: &[u8],
    now_ms: u64,
    guard: &mut shoal_core::trust::ProbeGuard,
    key_for: &dyn Fn(&str) -> Option<[u8; 32]>,
    url: &dyn Fn() -> String,
) -> Option<Vec<u8>> {
    let p = serde_json::from_slice::<Probe>(datagram).ok()?;
    if p.v != 2 || p.nonce.len() != 32 || p.id.len() > 64 {
        return None;
    }
    let key = key_for(&p.id)?;
    let ts = p.ts.to_string();
    if !verify(&key, &["probe", &p.id, &ts, &p.nonce], &p.mac) {
        return None;
    }
    // Only after the MAC: a stranger cannot fill the nonce memory.
    guard.check(p.ts, &p.nonce, now_ms).ok()?;
    let url = url();
    let a = Answer {
        v: 2,
        mac: mac(&key, &["answer", &p.nonce, &url]),
        url,
    };
    serde_json::to_vec(&a).ok()
}

/// The manager's side: answers valid probes on `port` with `url_for(peer)`,
/// the URL the prober should use; `key_for(id)` is the discovery key of the
/// usable join token with that id. Runs until dropped.
pub async fn respond<F, K>(key_for: K, port: u16, url_for: F) -> anyhow::Result<()>
where
    F: Fn(SocketAddr) -> String + Send + 'static,
    K: Fn(&str) -> Option<[u8; 32]> + Send + 'static,
{
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port).into())
        .map_err(|e| anyhow::anyhow!("discovery: cannot bind UDP port {port}: {e}"))?;
    let mut joined = 0;
    for ifa in multicast_interfaces() {
        if s.join_multicast_v4(&GROUP, &ifa).is_ok() {
            joined += 1;
        }
    }
    if joined == 0 {
        anyhow::bail!(
            "discovery: no interface could join multicast group {GROUP}; agents must use --join URL"
        );
    }
    let sock = UdpSocket::from_std(s.into())?;
    let mut guard = shoal_core::trust::ProbeGuard::new(PROBE_WINDOW_MS, 65_536);
    let mut buf = vec![0u8; 2048];
    loop {
        let (n, from) = sock.recv_from(&mut buf).await?;
        let now = crate::wire::unix_ms();
        let answer = answer_probe(&buf[..n], now, &mut guard, &key_for, &|| url_for(from));
        if let Some(bytes) = answer {
            let _ = sock.send_to(&bytes, from).await;
        }
    }
}

/// A probe for the token with this id and discovery key, stamped `ts_ms`.
/// Returns (datagram, nonce).
pub fn make_probe(id: &str, key: &[u8; 32], ts_ms: u64) -> (Vec<u8>, String) {
    let mut nonce = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut nonce);
    let nonce = hex::encode(nonce);
    let ts = ts_ms.to_string();
    let probe = Probe {
        v: 2,
        id: id.to_string(),
        ts: ts_ms,
        mac: mac(key, &["probe", id, &ts, &nonce]),
        nonce: nonce.clone(),
    };
    (serde_json::to_vec(&probe).expect("probes serialize"), nonce)
}

/// The local address this host uses to reach `peer`: what the manager should
/// advertise when it listens on every interface.
pub fn local_ip_towards(peer: IpAddr) -> Option<IpAddr> {
    let s = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    s.connect((peer, 9)).ok()?;
    s.local_addr().ok().map(|a| a.ip())
}

/// The node's side: probes every multicast interface until a manager holding
/// the same key answers, or `timeout` passes.
pub async fn discover(
    token: &crate::identity::Token,
    port: u16,
    timeout: Duration,
) -> anyhow::Result<String> {
    let (id, key) = (token.id(), token.discovery_key());
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await?;
    sock.set_multicast_loop_v4(true)?;
    sock.set_multicast_ttl_v4(1)?;
    let raw = socket2::SockRef::from(&sock);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = vec![0u8; 2048];
    loop {
        let (probe, nonce) = make_probe(&id, &key, crate::wire::unix_ms());
        let ifs = multicast_interfaces();
        if ifs.is_empty() {
            anyhow::bail!("discovery: no multicast-capable interface is up; use --join URL");
        }
        for ifa in ifs {
            if raw.set_multicast_if_v4(&ifa).is_ok() {
                let _ = sock.send_to(&probe, (GROUP, port)).await;
            }
        }
        let round_end = (tokio::time::Instant::now() + Duration::from_millis(700)).min(deadline);
        while let Ok(Ok((n, _from))) =
            tokio::time::timeout_at(round_end, sock.recv_from(&mut buf)).await
        {
            if let Ok(a) = serde_json::from_slice::<Answer>(&buf[..n])
                && a.v == 2
                && verify(&key, &["answer", &nonce, &a.url], &a.mac)
            {
                return Ok(a.url);
            }
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "discovery: no manager holding this token answered on {GROUP}:{port} within {timeout:?}; check the token, that the manager runs on this network, or use --join URL"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_bind_key_and_nonce() {
        let k = [1u8; 32];
        let m = mac(&k, &["probe", "abc"]);
        assert!(verify(&k, &["probe", "abc"], &m));
        assert!(!verify(&[2u8; 32], &["probe", "abc"], &m));
        assert!(!verify(&k, &["probe", "abd"], &m));
        assert!(!verify(&k, &["answer", "abc"], &m));
        assert!(!verify(&k, &["probe", "abc"], "zz"));
    }

    #[test]
    fn a_probe_is_answered_once_and_only_while_fresh() {
        let key = [3u8; 32];
        let key_for = |id: &str| (id == "t1").then_some(key);
        let url = || "https://127.0.0.1:7400".to_string();
        let mut g = shoal_core::trust::ProbeGuard::new(PROBE_WINDOW_MS, 16);
        let (p, _) = make_probe("t1", &key, 1_000_000);
        assert!(answer_probe(&p, 1_000_000, &mut g, &key_for, &url).is_some());
        assert!(answer_probe(&p, 1_000_001, &mut g, &key_for, &url).is_none());
        let (late, _) = make_probe("t1", &key, 1_000_000);
        assert!(
            answer_probe(
                &late,
                1_000_000 + PROBE_WINDOW_MS + 1,
                &mut g,
                &key_for,
                &url
            )
            .is_none()
        );
        let (other, _) = make_probe("t2", &key, 1_000_000);
        assert!(answer_probe(&other, 1_000_000, &mut g, &key_for, &url).is_none());
        let (wrong, _) = make_probe("t1", &[4u8; 32], 1_000_000);
        assert!(answer_probe(&wrong, 1_000_000, &mut g, &key_for, &url).is_none());
    }
}
