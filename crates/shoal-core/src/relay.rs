//! The timestamping UDP relay's flow table (thesis ch. 6): which game
//! server each client flow goes to, and when an idle flow is forgotten.
//!
//! A flow is one client address. Its first datagram assigns it to the
//! server with the fewest flows (ties to the first listed), and it stays
//! there while it is active, because a game server holds the player's
//! state; it expires after `idle` without a datagram either way. A server
//! that leaves the backend list takes its flows with it (their players
//! reconnect and are assigned again); a draining one keeps its flows and
//! takes no new ones.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Duration;

/// Milliseconds on the caller's monotonic clock.
pub type Millis = u64;

/// One flow's assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    /// The server it is relayed to (as listed).
    pub backend: String,
    /// Last datagram either way.
    pub last: Millis,
}

/// What the relay should do with a client's datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// An existing flow: forward to this server.
    Existing(String),
    /// A new flow assigned to this server: open its upstream socket.
    New(String),
    /// No server to send to.
    NoBackend,
}

/// Client flows and their servers.
#[derive(Debug, Clone)]
pub struct FlowTable<K> {
    backends: Vec<String>,
    draining: Vec<String>,
    flows: HashMap<K, Flow>,
    idle: Duration,
    max_flows: usize,
}

impl<K: Hash + Eq + Clone> FlowTable<K> {
    /// A table over `backends` that forgets flows idle for `idle` and
    /// holds at most `max_flows` (a flood of spoofed sources cannot open
    /// sockets without bound).
    pub fn new(backends: Vec<String>, idle: Duration, max_flows: usize) -> Self {
        Self {
            backends,
            draining: Vec::new(),
            flows: HashMap::new(),
            idle,
            max_flows,
        }
    }

    /// Where a datagram from `client` arriving at `now` goes.
    pub fn route(&mut self, client: &K, now: Millis) -> Route {
        if let Some(f) = self.flows.get_mut(client) {
            f.last = now;
            return Route::Existing(f.backend.clone());
        }
        if self.flows.len() >= self.max_flows {
            return Route::NoBackend;
        }
        let mut count: HashMap<&str, usize> = HashMap::new();
        for f in self.flows.values() {
            *count.entry(f.backend.as_str()).or_default() += 1;
        }
        let Some(b) = self
            .backends
            .iter()
            .min_by_key(|b| count.get(b.as_str()).copied().unwrap_or(0))
            .cloned()
        else {
            return Route::NoBackend;
        };
        self.flows.insert(
            client.clone(),
            Flow {
                backend: b.clone(),
                last: now,
            },
        );
        Route::New(b)
    }

    /// A server answered on a flow: it is active.
    pub fn touch(&mut self, client: &K, now: Millis) {
        if let Some(f) = self.flows.get_mut(client) {
            f.last = now;
        }
    }

    /// Removes and returns the flows idle at `now`.
    pub fn expire(&mut self, now: Millis) -> Vec<K> {
        let idle = self.idle.as_millis() as u64;
        let gone: Vec<K> = self
            .flows
            .iter()
            .filter(|(_, f)| now.saturating_sub(f.last) >= idle)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &gone {
            self.flows.remove(k);
        }
        gone
    }

    /// Replaces the server list; returns the flows dropped with the
    /// servers that left.
    pub fn set_backends(&mut self, backends: Vec<String>) -> Vec<K> {
        self.set_backends_draining(backends, Vec::new())
    }

    /// Replaces the server list with `backends` taking new flows and
    /// `draining` keeping only theirs; returns the flows dropped.
    pub fn set_backends_draining(
        &mut self,
        backends: Vec<String>,
        draining: Vec<String>,
    ) -> Vec<K> {
        let gone: Vec<K> = self
            .flows
            .iter()
            .filter(|(_, f)| !backends.contains(&f.backend) && !draining.contains(&f.backend))
            .map(|(k, _)| k.clone())
            .collect();
        for k in &gone {
            self.flows.remove(k);
        }
        self.backends = backends;
        self.draining = draining;
        gone
    }

    /// Forgets one flow (its upstream could not be opened).
    pub fn forget(&mut self, client: &K) {
        self.flows.remove(client);
    }

    /// Flows open.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    /// No flow open.
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// The current server list.
    pub fn backends(&self) -> &[String] {
        &self.backends
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> FlowTable<u32> {
        FlowTable::new(
            vec!["a:1".into(), "b:2".into()],
            Duration::from_secs(30),
            100,
        )
    }

    #[test]
    fn new_flows_spread_and_stick() {
        let t0: Millis = 1_000;
        let mut t = table();
        assert_eq!(t.route(&1, t0), Route::New("a:1".into()));
        assert_eq!(t.route(&2, t0), Route::New("b:2".into()));
        assert_eq!(t.route(&3, t0), Route::New("a:1".into()));
        assert_eq!(t.route(&2, t0), Route::Existing("b:2".into()));
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn idle_flows_expire_and_answers_keep_them() {
        let t0: Millis = 1_000;
        let mut t = table();
        t.route(&1, t0);
        t.route(&2, t0);
        t.touch(&2, t0 + 20_000);
        assert_eq!(t.expire(t0 + 29_000), Vec::<u32>::new());
        assert_eq!(t.expire(t0 + 30_000), vec![1]);
        assert_eq!(t.expire(t0 + 50_000), vec![2]);
        assert!(t.is_empty());
    }

    #[test]
    fn a_leaving_server_takes_its_flows() {
        let t0: Millis = 1_000;
        let mut t = table();
        t.route(&1, t0);
        t.route(&2, t0);
        assert_eq!(t.set_backends(vec!["b:2".into()]), vec![1]);
        assert_eq!(t.route(&1, t0), Route::New("b:2".into()));
        assert_eq!(t.set_backends(vec![]).len(), 2);
        assert_eq!(t.route(&9, t0), Route::NoBackend);
    }

    #[test]
    fn a_draining_server_keeps_its_flows_and_takes_no_new_one() {
        let t0: Millis = 1_000;
        let mut t = table();
        t.route(&1, t0);
        t.route(&2, t0);
        assert!(
            t.set_backends_draining(vec!["b:2".into()], vec!["a:1".into()])
                .is_empty()
        );
        assert_eq!(t.route(&1, t0), Route::Existing("a:1".into()));
        assert_eq!(t.route(&3, t0), Route::New("b:2".into()));
    }

    #[test]
    fn the_flow_limit_holds() {
        let t0: Millis = 1_000;
        let mut t = FlowTable::new(vec!["a:1".into()], Duration::from_secs(1), 2);
        t.route(&1, t0);
        t.route(&2, t0);
        assert_eq!(t.route(&3, t0), Route::NoBackend);
        assert_eq!(t.route(&1, t0), Route::Existing("a:1".into()));
    }
}
