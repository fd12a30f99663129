//! The manager's Prometheus metrics (text exposition format 0.0.4), as the
//! dispatcher serves its own: registrations, renewals, lease expiries,
//! leases by state, decisions, each service's allocation, and the store's
//! latency. Counters are bumped by the API and the expiry tick; gauges are
//! read from the registry and the services when scraped. The store is timed
//! by wrapping it, so no caller changes.

use crate::services::Services;
use crate::state::Registry;
use shoal_net::wire::{AppAssignment, LeaseState, Registration};
use shoal_store::{NodeRecord, Store, StoreError};
use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Upper bounds of the store latency histogram, seconds.
const STORE_BUCKETS: [f64; 10] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0,
];

/// Counters kept by the manager.
#[derive(Default)]
pub struct Metrics {
    /// Registrations accepted.
    pub registrations: AtomicU64,
    /// Registrations refused.
    pub registration_errors: AtomicU64,
    /// Renewals accepted.
    pub renewals: AtomicU64,
    /// Renewals refused (unknown node, store failure).
    pub renewal_errors: AtomicU64,
    /// Leases that ran out.
    pub expiries: AtomicU64,
    /// Allocation decisions (the `decision` events).
    pub decisions: AtomicU64,
    store: StoreTimes,
}

#[derive(Default)]
struct StoreTimes {
    /// Per operation kind (read, write): bucket counts, count, sum in ns.
    read: Histogram,
    write: Histogram,
}

#[derive(Default)]
struct Histogram {
    buckets: [AtomicU64; STORE_BUCKETS.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Histogram {
    fn observe(&self, secs: f64) {
        for (b, le) in self.buckets.iter().zip(STORE_BUCKETS) {
            if secs <= le {
                b.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add((secs * 1e9) as u64, Ordering::Relaxed);
    }
}

/// Writes one metric's HELP and TYPE lines.
fn header(o: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(o, "# HELP {name} {help}");
    let _ = writeln!(o, "# TYPE {name} {kind}");
}

/// A label value, escaped as the exposition format wants.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    /// Counts decisions and lease expiries from the event stream.
    pub fn follow_decisions(self: &Arc<Self>, registry: &Registry) {
        let (_, mut rx) = registry.subscribe();
        let m = self.clone();
        tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                match rx.recv().await {
                    Ok(e) if e.kind == "decision" => {
                        m.decisions.fetch_add(1, Ordering::Relaxed);
                    }
                    // The controller notes every expiry as a `failed` event.
                    Ok(e) if e.kind == "failed" => {
                        m.expiries.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) | Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return,
                }
            }
        });
    }

    /// The exposition text.
    pub fn render(&self, registry: &Registry, services: &Services) -> String {
        let mut o = String::new();
        for (name, help, v) in [
            (
                "shoal_manager_registrations_total",
                "Node registrations accepted.",
                &self.registrations,
            ),
            (
                "shoal_manager_registration_errors_total",
                "Node registrations refused.",
                &self.registration_errors,
            ),
            (
                "shoal_manager_renewals_total",
                "Lease renewals accepted (rate() gives renewals per second).",
                &self.renewals,
            ),
            (
                "shoal_manager_renewal_errors_total",
                "Lease renewals refused.",
                &self.renewal_errors,
            ),
            (
                "shoal_manager_lease_expiries_total",
                "Leases that ran out: nodes declared failed.",
                &self.expiries,
            ),
            (
                "shoal_manager_decisions_total",
                "Allocation decisions taken by the services' policies.",
                &self.decisions,
            ),
        ] {
            header(&mut o, name, "counter", help);
            let _ = writeln!(o, "{name} {}", v.load(Ordering::Relaxed));
        }
        let nodes = registry.nodes();
        header(
            &mut o,
            "shoal_manager_leases",
            "gauge",
            "Registered nodes by lease state.",
        );
        for (state, want) in [("alive", LeaseState::Alive), ("failed", LeaseState::Failed)] {
            let n = nodes.iter().filter(|n| n.state == want).count();
            let _ = writeln!(o, "shoal_manager_leases{{state=\"{state}\"}} {n}");
        }
        let statuses = services.statuses();
        header(
            &mut o,
            "shoal_manager_service_nodes",
            "gauge",
            "Nodes allocated to each service, by phase.",
        );
        for s in &statuses {
            let name = label(&s.name);
            for (phase, n) in [
                ("starting", s.starting.len()),
                ("serving", s.serving.len()),
                ("draining", s.draining.len()),
            ] {
                let _ = writeln!(
                    o,
                    "shoal_manager_service_nodes{{service=\"{name}\",phase=\"{phase}\"}} {n}"
                );
            }
        }
        header(
            &mut o,
            "shoal_manager_service_load",
            "gauge",
            "Each service's last observed summed load, in its metric's unit.",
        );
        for s in &statuses {
            if let Some(u) = s.usage.filter(|u| u.is_finite()) {
                let _ = writeln!(
                    o,
                    "shoal_manager_service_load{{service=\"{}\"}} {u}",
                    label(&s.name)
                );
            }
        }
        header(
            &mut o,
            "shoal_manager_store_seconds",
            "histogram",
            "Latency of the manager's durable store, by operation.",
        );
        for (op, h) in [("read", &self.store.read), ("write", &self.store.write)] {
            for (b, le) in h.buckets.iter().zip(STORE_BUCKETS) {
                let _ = writeln!(
                    o,
                    "shoal_manager_store_seconds_bucket{{op=\"{op}\",le=\"{le}\"}} {}",
                    b.load(Ordering::Relaxed)
                );
            }
            let count = h.count.load(Ordering::Relaxed);
            let _ = writeln!(
                o,
                "shoal_manager_store_seconds_bucket{{op=\"{op}\",le=\"+Inf\"}} {count}"
            );
            let _ = writeln!(
                o,
                "shoal_manager_store_seconds_sum{{op=\"{op}\"}} {}",
                h.sum_ns.load(Ordering::Relaxed) as f64 / 1e9
            );
            let _ = writeln!(
                o,
                "shoal_manager_store_seconds_count{{op=\"{op}\"}} {count}"
            );
        }
        o
    }
}

/// A store whose every call is timed into [`Metrics`].
pub struct TimedStore {
    inner: Arc<dyn Store>,
    metrics: Arc<Metrics>,
}

impl TimedStore {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Store>, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }

    fn read<T>(&self, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let r = f();
        self.metrics.store.read.observe(t.elapsed().as_secs_f64());
        r
    }

    fn write<T>(&self, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let r = f();
        self.metrics.store.write.observe(t.elapsed().as_secs_f64());
        r
    }
}

type R<T> = Result<T, StoreError>;

impl Store for TimedStore {
    fn nodes(&self) -> R<Vec<NodeRecord>> {
        self.read(|| self.inner.nodes())
    }
    fn put_registration(&self, reg: &Registration) -> R<()> {
        self.write(|| self.inner.put_registration(reg))
    }
    fn put_desired(&self, node: &str, desired: &[AppAssignment]) -> R<Option<u64>> {
        self.write(|| self.inner.put_desired(node, desired))
    }
    fn delete_node(&self, node: &str) -> R<bool> {
        self.write(|| self.inner.delete_node(node))
    }
    fn get_doc(&self, kind: &str, key: &str) -> R<Option<String>> {
        self.read(|| self.inner.get_doc(kind, key))
    }
    fn put_doc(&self, kind: &str, key: &str, value: &str) -> R<()> {
        self.write(|| self.inner.put_doc(kind, key, value))
    }
    fn delete_doc(&self, kind: &str, key: &str) -> R<bool> {
        self.write(|| self.inner.delete_doc(kind, key))
    }
    fn docs(&self, kind: &str) -> R<Vec<(String, String)>> {
        self.read(|| self.inner.docs(kind))
    }
}
