//! The icecast adaptor's two halves that are not process supervision: the
//! private configuration rendered from the control parameters (LAMA's
//! S-CP, with RelayFrom as `relay_from`), and the reading of icecast's own
//! statistics (`/admin/stats`) for `status`.
//!
//! Debian's `icecast2` runs unmodified. As root it must drop privileges
//! (`<changeowner>`, it refuses to run as root otherwise), and it re-reads
//! its configuration on SIGHUP as that user, so the configuration file is
//! given to that user (mode 0600) in a directory of its own under
//! /run/shoal-icecast (the agent's directory may be closed to others): the
//! source password stays readable by icecast and root only. Both of its
//! logs go to stderr, the app's output.log.

use super::AdaptorError;
use shoal_net::wire::{MountStats, Params, StreamStats};
use std::collections::BTreeMap;
use std::path::Path;

/// Where Debian's package puts the program and its admin and web pages.
pub const PROGRAM: &str = "/usr/bin/icecast2";
const SHARE: &str = "/usr/share/icecast2";
/// The unprivileged user icecast switches to when started as root.
pub const RUN_AS: (&str, &str) = ("nobody", "nogroup");

/// Where icecast's configuration lives: the app directory, or as root a
/// directory the unprivileged icecast can reach, named after the app
/// directory (FNV-1a of its path).
pub fn home(app_dir: &Path, as_root: bool) -> std::path::PathBuf {
    if !as_root {
        return app_dir.to_path_buf();
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in app_dir.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    Path::new("/run/shoal-icecast").join(format!("{h:016x}"))
}

/// The configuration, checked parameters in, icecast.xml out.
#[derive(Clone, PartialEq)]
pub struct Config {
    /// IP:PORT icecast listens on.
    pub listen: std::net::SocketAddr,
    /// Mount points it serves.
    pub mounts: Vec<String>,
    /// The most listeners it admits (per mount, and in total).
    pub max_listeners: u64,
    /// The burst a new listener gets at once, bytes (its start-up buffer).
    pub burst_bytes: u64,
    /// How far a listener may fall behind before icecast drops it, bytes.
    pub queue_bytes: u64,
    /// The master to relay every mount from, when this server is a relay.
    pub relay_from: Option<std::net::SocketAddr>,
    source_password: String,
    admin_password: String,
}

// By hand: the passwords stay out of any debug output.
impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("mounts", &self.mounts)
            .field("max_listeners", &self.max_listeners)
            .field("burst_bytes", &self.burst_bytes)
            .field("queue_bytes", &self.queue_bytes)
            .field("relay_from", &self.relay_from)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// Reads the control parameters (already checked by
    /// `shoal_net::wire::check_params`).
    pub fn from_params(params: &Params) -> Result<Self, AdaptorError> {
        let bad = |m: String| AdaptorError::Params(m);
        let addr = |k: &str| -> Result<Option<std::net::SocketAddr>, AdaptorError> {
            params
                .get(k)
                .filter(|v| !v.is_empty())
                .map(|v| {
                    v.parse()
                        .map_err(|_| bad(format!("{k} must be IP:PORT, got {v:?}")))
                })
                .transpose()
        };
        let listen = addr("listen")?.ok_or_else(|| {
            bad("the icecast adaptor needs the parameter listen (--param listen=IP:PORT)".into())
        })?;
        // `{{ first_server }}` renders to the node's own address on the
        // service's first node: that one is the master.
        let relay_from = addr("relay_from")?.filter(|a| *a != listen);
        let source_password = params
            .get("secret.source_password")
            .cloned()
            .unwrap_or_default();
        let admin_password = params
            .get("secret.admin_password")
            .cloned()
            .unwrap_or_else(|| source_password.clone());
        let num = |k: &str, d: u64| -> u64 {
            params
                .get(k)
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(d)
        };
        Ok(Self {
            listen,
            mounts: params
                .get("mounts")
                .map(String::as_str)
                .unwrap_or("/stream")
                .split(',')
                .map(|m| m.trim().to_string())
                .collect(),
            max_listeners: num("max_listeners", 1000),
            burst_bytes: num("burst_kb", 64) * 1024,
            queue_bytes: num("queue_kb", 512) * 1024,
            relay_from,
            source_password,
            admin_password,
        })
    }

    /// The admin user and password `status` reads the statistics with.
    pub fn admin(&self) -> (&str, &str) {
        ("admin", &self.admin_password)
    }

    /// icecast.xml. `home` must be reachable by the user icecast runs as;
    /// `as_root` adds the `<changeowner>` icecast insists on as root.
    pub fn render(&self, home: &Path, as_root: bool) -> String {
        use std::fmt::Write;
        let mut x = String::new();
        let ip = self.listen.ip();
        let port = self.listen.port();
        let _ = writeln!(
            x,
            "<!-- Written by the shoal agent; edits are overwritten by `set`. -->\n<icecast>"
        );
        let _ = writeln!(x, "  <location>shoal</location><admin>shoal</admin>");
        // Clients: every listener, plus sources, relays and admin requests.
        let _ = writeln!(
            x,
            "  <limits><clients>{}</clients><sources>{}</sources><queue-size>{}</queue-size>\
             <client-timeout>30</client-timeout><header-timeout>15</header-timeout>\
             <source-timeout>10</source-timeout><burst-on-connect>1</burst-on-connect>\
             <burst-size>{}</burst-size></limits>",
            self.max_listeners + 16,
            self.mounts.len() + 2,
            self.queue_bytes,
            self.burst_bytes
        );
        let _ = writeln!(
            x,
            "  <authentication><source-password>{sp}</source-password>\
             <relay-password>{sp}</relay-password><admin-user>admin</admin-user>\
             <admin-password>{ap}</admin-password></authentication>",
            sp = self.source_password,
            ap = self.admin_password
        );
        let _ = writeln!(x, "  <hostname>{ip}</hostname>");
        let _ = writeln!(
            x,
            "  <listen-socket><port>{port}</port><bind-address>{ip}</bind-address></listen-socket>"
        );
        // Relays retry a lost master this often (seconds).
        let _ = writeln!(x, "  <master-update-interval>2</master-update-interval>");
        for m in &self.mounts {
            let _ = writeln!(
                x,
                "  <mount type=\"normal\"><mount-name>{m}</mount-name>\
                 <max-listeners>{}</max-listeners><burst-size>{}</burst-size></mount>",
                self.max_listeners, self.burst_bytes
            );
            if let Some(up) = self.relay_from {
                let _ = writeln!(
                    x,
                    "  <relay><server>{}</server><port>{}</port><mount>{m}</mount>\
                     <local-mount>{m}</local-mount><on-demand>0</on-demand>\
                     <relay-shoutcast-metadata>0</relay-shoutcast-metadata></relay>",
                    up.ip(),
                    up.port()
                );
            }
        }
        let _ = writeln!(x, "  <fileserve>1</fileserve>");
        let _ = writeln!(
            x,
            "  <paths><basedir>{d}</basedir><logdir>{d}</logdir>\
             <webroot>{SHARE}/web</webroot><adminroot>{SHARE}/admin</adminroot></paths>",
            d = home.display()
        );
        // Both logs to stderr: the app's output.log.
        let _ = writeln!(
            x,
            "  <logging><accesslog>-</accesslog><errorlog>-</errorlog>\
             <loglevel>3</loglevel></logging>"
        );
        let owner = if as_root {
            format!(
                "<changeowner><user>{}</user><group>{}</group></changeowner>",
                RUN_AS.0, RUN_AS.1
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            x,
            "  <security><chroot>0</chroot>{owner}</security>\n</icecast>"
        );
        x
    }
}

/// Parses icecast's `/admin/stats` XML: `<icestats>` with one
/// `<source mount="...">` per mount.
pub fn parse_stats(xml: &str) -> Result<StreamStats, String> {
    use quick_xml::events::Event;
    let mut r = quick_xml::Reader::from_str(xml);
    let mut mounts: BTreeMap<String, MountStats> = BTreeMap::new();
    let mut source: Option<String> = None;
    let mut field: Option<String> = None;
    let mut depth_in_source = 0usize;
    let mut seen_root = false;
    loop {
        match r.read_event() {
            Err(e) => return Err(format!("icecast's stats are not XML: {e}")),
            Ok(Event::Eof) => break,
            Ok(Event::Start(e)) => {
                let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                if name == "icestats" {
                    seen_root = true;
                } else if name == "source" && source.is_none() {
                    let mount = e
                        .try_get_attribute("mount")
                        .ok()
                        .flatten()
                        .and_then(|a| a.unescape_value().ok().map(|v| v.into_owned()))
                        .ok_or("a <source> without a mount attribute")?;
                    mounts.entry(mount.clone()).or_default();
                    source = Some(mount);
                    depth_in_source = 0;
                } else if source.is_some() {
                    depth_in_source += 1;
                    field = (depth_in_source == 1).then_some(name);
                }
            }
            Ok(Event::End(e)) => {
                if source.is_some() {
                    if e.name().as_ref() == b"source" && depth_in_source == 0 {
                        source = None;
                    } else {
                        depth_in_source = depth_in_source.saturating_sub(1);
                    }
                }
                field = None;
            }
            Ok(Event::Text(t)) => {
                if let (Some(m), Some(f)) = (&source, &field) {
                    let v = t.unescape().map_err(|e| e.to_string())?;
                    let n = v.trim().parse::<u64>().ok();
                    let s = mounts.entry(m.clone()).or_default();
                    match (f.as_str(), n) {
                        ("listeners", Some(n)) => s.listeners = n,
                        ("total_bytes_sent", Some(n)) => s.bytes_sent = n,
                        ("slow_listeners", Some(n)) => s.slow_listeners = n,
                        ("source_ip", _) | ("stream_start_iso8601", _) => s.live = true,
                        _ => {}
                    }
                }
            }
            Ok(_) => {}
        }
    }
    if !seen_root {
        return Err("icecast's stats have no <icestats> element".into());
    }
    Ok(StreamStats {
        listeners: mounts.values().map(|m| m.listeners).sum(),
        mounts,
    })
}

/// Reads the statistics of the icecast at `cfg.listen`.
pub async fn fetch_stats(cfg: &Config) -> Result<StreamStats, String> {
    let c = reqwest::Client::builder()
        .timeout(std::time::Duration::from_millis(800))
        .build()
        .map_err(|e| e.to_string())?;
    let (u, p) = cfg.admin();
    let r = c
        .get(format!("http://{}/admin/stats", cfg.listen))
        .basic_auth(u, Some(p))
        .send()
        .await
        .map_err(|e| format!("icecast's /admin/stats: {e}"))?;
    if !r.status().is_success() {
        return Err(format!("icecast's /admin/stats answered {}", r.status()));
    }
    parse_stats(&r.text().await.map_err(|e| e.to_string())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(kv: &[(&str, &str)]) -> Params {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_first_server_is_the_master_the_others_relay_from_it() {
        let p = params(&[
            ("listen", "10.0.0.1:8000"),
            ("relay_from", "10.0.0.1:8000"),
            ("secret.source_password", "s3cret"),
        ]);
        let master = Config::from_params(&p).unwrap();
        assert_eq!(master.relay_from, None);
        assert!(!master.render(Path::new("/x"), true).contains("<relay>"));
        let mut p2 = p.clone();
        p2.insert("listen".into(), "10.0.0.2:8000".into());
        let relay = Config::from_params(&p2).unwrap();
        let xml = relay.render(Path::new("/x"), true);
        assert!(
            xml.contains("<relay><server>10.0.0.1</server><port>8000</port><mount>/stream</mount>")
        );
        assert!(xml.contains("<bind-address>10.0.0.2</bind-address>"));
        assert!(xml.contains("<changeowner>"));
        assert!(xml.contains("<source-password>s3cret</source-password>"));
        assert_eq!(relay.admin(), ("admin", "s3cret"));
    }

    #[test]
    fn stats_give_listeners_per_mount_and_bytes_sent() {
        let xml = r#"<?xml version="1.0"?>
<icestats><admin>shoal</admin><clients>5</clients><listeners>3</listeners>
<source mount="/a"><listeners>2</listeners><slow_listeners>1</slow_listeners>
<source_ip>127.0.0.1</source_ip><total_bytes_sent>12345</total_bytes_sent></source>
<source mount="/b"><listeners>1</listeners><total_bytes_sent>7</total_bytes_sent></source>
</icestats>"#;
        let s = parse_stats(xml).unwrap();
        assert_eq!(s.listeners, 3);
        assert_eq!(s.mounts["/a"].bytes_sent, 12345);
        assert_eq!(s.mounts["/a"].slow_listeners, 1);
        assert!(s.mounts["/a"].live);
        assert!(!s.mounts["/b"].live);
        assert!(parse_stats("<html>no</html>").is_err());
        assert!(parse_stats("<icestats><source>").is_err());
    }
}
