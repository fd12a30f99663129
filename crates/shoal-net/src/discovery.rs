//! Keyed discovery (LAMA/JINI): a node finds the manager by UDP multicast,
//! without knowing its address. The probe carries an HMAC over a fresh nonce
//! keyed with the token's secret; the manager stays silent to anyone who
//! cannot produce it, so a node without the key cannot even find the pool.
//! The answer is MACed over the same nonce, so the node does not follow a
//! forged answer either (and the URL it learns is then pinned by the CA
//! fingerprint when it joins).

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

#[derive(Serialize, Deserialize)]
struct Probe {
    v: u8,
    nonce: String,
    mac: String,
}

#[derive(Serialize, Deserialize)]
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

/// The manager's side: answers valid probes on `port` with `url_for(peer)`,
/// the URL the prober should use. Runs until dropped.
pub async fn respond<F>(secret: [u8; 32], port: u16, url_for: F) -> anyhow::Result<()>
where
    F: Fn(SocketAddr) -> String + Send + 'static,
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
    let mut buf = vec![0u8; 2048];
    loop {
        let (n, from) = sock.recv_from(&mut buf).await?;
        let Ok(p) = serde_json::from_slice::<Probe>(&buf[..n]) else {
            continue;
        };
        if p.v != 1 || p.nonce.len() != 32 || !verify(&secret, &["probe", &p.nonce], &p.mac) {
            // Silence: a prober without the key learns nothing.
            continue;
        }
        let url = url_for(from);
        let a = Answer {
            v: 1,
            mac: mac(&secret, &["answer", &p.nonce, &url]),
            url,
        };
        if let Ok(bytes) = serde_json::to_vec(&a) {
            let _ = sock.send_to(&bytes, from).await;
        }
    }
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
pub async fn discover(secret: [u8; 32], port: u16, timeout: Duration) -> anyhow::Result<String> {
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await?;
    sock.set_multicast_loop_v4(true)?;
    sock.set_multicast_ttl_v4(1)?;
    let raw = socket2::SockRef::from(&sock);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = vec![0u8; 2048];
    loop {
        let mut nonce = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut nonce);
        let nonce = hex::encode(nonce);
        let probe = serde_json::to_vec(&Probe {
            v: 1,
            mac: mac(&secret, &["probe", &nonce]),
            nonce: nonce.clone(),
        })?;
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
                && a.v == 1
                && verify(&secret, &["answer", &nonce, &a.url], &a.mac)
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
}
