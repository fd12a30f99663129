//! Egress shaping and measurement for unmodified apps (Vibra, thesis
//! 3.4.4-3.4.5): one `tc` htb class per app on the node's egress device,
//! traffic classified by the app's source port, caps changed in place with
//! `tc class change` (which keeps the queue), and demand read every second
//! as the offered rate (sent plus dropped plus queued) from the class's
//! counters. Unclassified traffic (the agent's own, other programs') is
//! not shaped: htb sends it directly.
//!
//! What to cap is decided in `shoal_core::bandwidth`; this only runs `tc`.

use shoal_core::bandwidth::{Counters, offered_rate};
use shoal_net::wire::AppBandwidth;
use std::collections::BTreeMap;
use tokio::process::Command;

/// A `tc` invocation that failed: the command line and what tc said.
#[derive(Debug, thiserror::Error)]
#[error("`{cmd}` failed: {why}")]
pub struct TcError {
    /// The command line.
    pub cmd: String,
    /// tc's message (or why it could not run).
    pub why: String,
}

#[derive(Debug, Clone)]
struct Class {
    minor: u32,
    port: u16,
    cap: Option<u64>,
    last: Option<(f64, Counters)>,
    sample: Option<(f64, f64)>,
}

/// The shaper of one egress device.
#[derive(Debug)]
pub struct Shaper {
    prefix: Vec<String>,
    dev: String,
    ready: bool,
    next_minor: u32,
    classes: BTreeMap<String, Class>,
}

impl Shaper {
    /// A shaper of `dev`. `prefix` runs tc elsewhere, e.g. `["ip", "netns",
    /// "exec", "NS"]`; empty for this namespace.
    pub fn new(dev: &str, prefix: Vec<String>) -> Self {
        Self {
            prefix,
            dev: dev.to_string(),
            ready: false,
            next_minor: 0x10,
            classes: BTreeMap::new(),
        }
    }

    /// The device shaped.
    pub fn dev(&self) -> &str {
        &self.dev
    }

    async fn tc(&self, args: &[&str]) -> Result<String, TcError> {
        let (prog, pre) = match self.prefix.split_first() {
            Some((p, rest)) => (p.as_str(), rest.iter().map(String::as_str).collect()),
            None => ("tc", Vec::new()),
        };
        let mut all: Vec<&str> = pre;
        if !self.prefix.is_empty() {
            all.push("tc");
        }
        all.extend_from_slice(args);
        let cmd = format!("{prog} {}", all.join(" "));
        let out = Command::new(prog)
            .args(&all)
            .output()
            .await
            .map_err(|e| TcError {
                cmd: cmd.clone(),
                why: format!("{e} (is iproute2 installed? apt-get install iproute2)"),
            })?;
        if !out.status.success() {
            return Err(TcError {
                cmd,
                why: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Puts an htb root on the device (replacing what was there).
    pub async fn setup(&mut self) -> Result<(), TcError> {
        self.tc(&[
            "qdisc", "replace", "dev", &self.dev, "root", "handle", "1:", "htb",
        ])
        .await?;
        self.ready = true;
        self.classes.clear();
        Ok(())
    }

    /// Removes the root qdisc and with it every class.
    pub async fn teardown(&mut self) -> Result<(), TcError> {
        self.ready = false;
        self.classes.clear();
        self.tc(&["qdisc", "del", "dev", &self.dev, "root"])
            .await
            .map(|_| ())
    }

    /// Caps the egress of the app serving from source port `port` at
    /// `cap` bytes/s: a new class and filter the first time, `tc class
    /// change` after.
    pub async fn set_cap(&mut self, app: &str, port: u16, cap: u64) -> Result<(), TcError> {
        if !self.ready {
            self.setup().await?;
        }
        let cap = cap.max(1);
        let rate = format!("{cap}bps");
        // A burst of 10 ms at the cap, at least two full frames.
        let burst = format!("{}b", (cap / 100).max(3028));
        let existing = self.classes.get(app).filter(|c| c.port == port).cloned();
        match existing {
            Some(c) if c.cap == Some(cap) => return Ok(()),
            Some(c) => {
                let id = format!("1:{:x}", c.minor);
                self.tc(&[
                    "class", "change", "dev", &self.dev, "parent", "1:", "classid", &id, "htb",
                    "rate", &rate, "ceil", &rate, "burst", &burst, "cburst", &burst,
                ])
                .await?;
                if let Some(c) = self.classes.get_mut(app) {
                    c.cap = Some(cap);
                }
            }
            None => {
                if let Some(old) = self.classes.get(app).cloned() {
                    self.remove_class(old.minor).await;
                }
                let minor = self.next_minor;
                self.next_minor += 1;
                let id = format!("1:{minor:x}");
                self.tc(&[
                    "class", "add", "dev", &self.dev, "parent", "1:", "classid", &id, "htb",
                    "rate", &rate, "ceil", &rate, "burst", &burst, "cburst", &burst,
                ])
                .await?;
                let prio = minor.to_string();
                let sport = port.to_string();
                self.tc(&[
                    "filter", "add", "dev", &self.dev, "parent", "1:", "protocol", "ip", "prio",
                    &prio, "u32", "match", "ip", "sport", &sport, "0xffff", "flowid", &id,
                ])
                .await?;
                self.classes.insert(
                    app.to_string(),
                    Class {
                        minor,
                        port,
                        cap: Some(cap),
                        last: None,
                        sample: None,
                    },
                );
            }
        }
        Ok(())
    }

    async fn remove_class(&self, minor: u32) {
        let prio = minor.to_string();
        let id = format!("1:{minor:x}");
        let _ = self
            .tc(&[
                "filter", "del", "dev", &self.dev, "parent", "1:", "prio", &prio,
            ])
            .await;
        let _ = self
            .tc(&["class", "del", "dev", &self.dev, "classid", &id])
            .await;
    }

    /// Stops shaping an app.
    pub async fn remove(&mut self, app: &str) {
        if let Some(c) = self.classes.remove(app) {
            self.remove_class(c.minor).await;
        }
    }

    /// The apps shaped.
    pub fn apps(&self) -> impl Iterator<Item = &str> {
        self.classes.keys().map(String::as_str)
    }

    /// Reads every class's counters (`tc -s class show`); `now_secs` on
    /// the caller's monotonic clock. Call it about once a second.
    pub async fn sample(&mut self, now_secs: f64) -> Result<(), TcError> {
        if self.classes.is_empty() {
            return Ok(());
        }
        let out = self.tc(&["-s", "class", "show", "dev", &self.dev]).await?;
        let by_minor = parse_class_stats(&out);
        for c in self.classes.values_mut() {
            let Some(cur) = by_minor.get(&c.minor).copied() else {
                continue;
            };
            if let Some((t, prev)) = c.last {
                c.sample = offered_rate(prev, cur, now_secs - t).or(c.sample);
            }
            c.last = Some((now_secs, cur));
        }
        Ok(())
    }

    /// An app's last measured egress and the cap in force.
    pub fn bandwidth(&self, app: &str) -> Option<AppBandwidth> {
        let c = self.classes.get(app)?;
        let (offered, sent) = c.sample.unwrap_or((0.0, 0.0));
        Some(AppBandwidth {
            offered_bps: offered,
            sent_bps: sent,
            cap_bps: c.cap,
        })
    }
}

/// Counters by class minor from `tc -s class show` (text: iproute2 6.1
/// prints no JSON for htb classes). A class reads
/// `class htb 1:10 root prio 0 rate 8Mbit ...`, then
/// ` Sent 123 bytes 4 pkt (dropped 0, overlimits 0 requeues 0)`, then
/// ` backlog 0b 0p requeues 0`.
pub fn parse_class_stats(text: &str) -> BTreeMap<u32, Counters> {
    let mut out = BTreeMap::new();
    let mut cur: Option<u32> = None;
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["class", _, handle, ..] => {
                cur = handle
                    .split_once(':')
                    .and_then(|(_, m)| u32::from_str_radix(m, 16).ok());
                if let Some(m) = cur {
                    out.insert(m, Counters::default());
                }
            }
            ["Sent", bytes, "bytes", pkts, "pkt", "(dropped", drops, ..] => {
                if let Some(c) = cur.and_then(|m| out.get_mut(&m)) {
                    c.bytes = bytes.parse().unwrap_or(0);
                    c.packets = pkts.parse().unwrap_or(0);
                    c.drops = drops.trim_end_matches(',').parse().unwrap_or(0);
                }
            }
            ["backlog", size, ..] => {
                if let Some(c) = cur.and_then(|m| out.get_mut(&m)) {
                    c.backlog = parse_size(size);
                }
            }
            _ => {}
        }
    }
    out
}

/// tc's sizes: `1514b`, `15Kb`, `2Mb` (binary multiples).
fn parse_size(s: &str) -> u64 {
    let (num, mult) = if let Some(n) = s.strip_suffix("Mb") {
        (n, 1 << 20)
    } else if let Some(n) = s.strip_suffix("Kb") {
        (n, 1 << 10)
    } else {
        (s.trim_end_matches('b'), 1)
    };
    num.parse::<f64>()
        .map(|v| (v * mult as f64) as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_stats_parse_from_tc_text() {
        let text = "class htb 1:10 root prio 0 rate 8Mbit ceil 8Mbit burst 1600b cburst 1600b \n Sent 123456 bytes 100 pkt (dropped 3, overlimits 9 requeues 0) \n backlog 15Kb 10p requeues 0\n lended: 0 borrowed: 0 giants: 0\n tokens: 25000 ctokens: 25000\n\nclass htb 1:11 root prio 0 rate 8Mbit ceil 8Mbit burst 1600b cburst 1600b \n Sent 0 bytes 0 pkt (dropped 0, overlimits 0 requeues 0) \n backlog 0b 0p requeues 0\n";
        let m = parse_class_stats(text);
        assert_eq!(
            m[&0x10],
            Counters {
                bytes: 123456,
                packets: 100,
                drops: 3,
                backlog: 15 * 1024
            }
        );
        assert_eq!(m[&0x11], Counters::default());
        assert!(parse_class_stats("garbage").is_empty());
    }
}
