//! Counters and their Prometheus text exposition (format 0.0.4), written by
//! hand: a dozen atomics do not need a metrics framework.

use crate::backends::Backends;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of the latency histogram, in seconds.
pub const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Kinds of errors counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Could not connect to a backend.
    Connect,
    /// Backend did not answer within the backend timeout.
    Timeout,
    /// Backend closed or reset before or during its response.
    BackendReset,
    /// No backend available.
    NoBackend,
    /// Malformed request from a client (answered 400 by hyper).
    ClientParse,
    /// Request headers too large (answered 431 by hyper).
    HeaderTooLarge,
    /// Client connection failed or timed out.
    ClientIo,
    /// Client connection idle past the idle timeout.
    IdleTimeout,
    /// Client sent no complete request head within the header timeout.
    HeaderTimeout,
}

impl ErrorKind {
    const ALL: [ErrorKind; 9] = [
        ErrorKind::Connect,
        ErrorKind::Timeout,
        ErrorKind::BackendReset,
        ErrorKind::NoBackend,
        ErrorKind::ClientParse,
        ErrorKind::HeaderTooLarge,
        ErrorKind::ClientIo,
        ErrorKind::IdleTimeout,
        ErrorKind::HeaderTimeout,
    ];
    fn label(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::BackendReset => "backend_reset",
            ErrorKind::NoBackend => "no_backend",
            ErrorKind::ClientParse => "bad_request",
            ErrorKind::HeaderTooLarge => "header_too_large",
            ErrorKind::ClientIo => "client_io",
            ErrorKind::IdleTimeout => "idle_timeout",
            ErrorKind::HeaderTimeout => "header_timeout",
        }
    }
}

const PREFIX: &str = "shoal_dispatch";

/// A metric's HELP and TYPE lines.
fn head(o: &mut String, name: &str, ty: &str, help: &str) {
    let _ = writeln!(o, "# HELP {PREFIX}_{name} {help}");
    let _ = writeln!(o, "# TYPE {PREFIX}_{name} {ty}");
}

/// The dispatcher's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Requests received.
    pub requests: AtomicU64,
    /// Responses by status class (index 1..=5).
    pub responses: [AtomicU64; 6],
    /// Request body bytes forwarded to backends.
    pub bytes_in: AtomicU64,
    /// Response body bytes forwarded to clients.
    pub bytes_out: AtomicU64,
    /// Client connections accepted.
    pub connections: AtomicU64,
    /// Client connections open.
    pub connections_open: AtomicU64,
    /// Requests replayed after a failed attempt.
    pub retries: AtomicU64,
    /// Access-log lines dropped because the writer fell behind.
    pub access_log_dropped: AtomicU64,
    /// Protocol-switched tunnels (WebSocket) open.
    pub tunnels_open: AtomicU64,
    /// The --max-connections limit.
    pub connections_max: AtomicU64,
    errors: [AtomicU64; ErrorKind::ALL.len()],
    latency_buckets: [AtomicU64; BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_us: AtomicU64,
}

impl Metrics {
    /// Counts an error.
    pub fn error(&self, kind: ErrorKind) {
        let i = ErrorKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
        self.errors[i].fetch_add(1, Relaxed);
    }

    /// Errors of a kind so far.
    pub fn errors(&self, kind: ErrorKind) -> u64 {
        let i = ErrorKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
        self.errors[i].load(Relaxed)
    }

    /// Counts a response status.
    pub fn status(&self, code: u16) {
        let class = usize::from(code / 100).min(5);
        self.responses[class].fetch_add(1, Relaxed);
    }

    /// Records a request's duration (until its response body ended).
    pub fn latency(&self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|&b| s <= b) {
            self.latency_buckets[i].fetch_add(1, Relaxed);
        }
        self.latency_count.fetch_add(1, Relaxed);
        self.latency_sum_us
            .fetch_add(d.as_micros().min(u128::from(u64::MAX)) as u64, Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self, backends: &Backends) -> String {
        let mut o = String::with_capacity(4096);
        let p = PREFIX;
        let one = |o: &mut String, name: &str, ty: &str, help: &str, v: u64| {
            head(o, name, ty, help);
            let _ = writeln!(o, "{p}_{name} {v}");
        };
        one(
            &mut o,
            "requests_total",
            "counter",
            "Requests received.",
            self.requests.load(Relaxed),
        );
        head(
            &mut o,
            "responses_total",
            "counter",
            "Responses sent, by status class.",
        );
        for c in 1..=5 {
            let _ = writeln!(
                o,
                "{p}_responses_total{{code=\"{c}xx\"}} {}",
                self.responses[c].load(Relaxed)
            );
        }
        head(&mut o, "bytes_total", "counter", "Body bytes forwarded.");
        for (dir, v) in [("in", &self.bytes_in), ("out", &self.bytes_out)] {
            let _ = writeln!(
                o,
                "{p}_bytes_total{{direction=\"{dir}\"}} {}",
                v.load(Relaxed)
            );
        }
        let singles = [
            (
                "connections_total",
                "counter",
                "Client connections accepted.",
                &self.connections,
            ),
            (
                "connections_open",
                "gauge",
                "Client connections open.",
                &self.connections_open,
            ),
            (
                "connections_max",
                "gauge",
                "Client connections past which accepting pauses.",
                &self.connections_max,
            ),
            (
                "tunnels_open",
                "gauge",
                "Protocol-switched tunnels (WebSocket) open.",
                &self.tunnels_open,
            ),
            (
                "retries_total",
                "counter",
                "Requests replayed after a failed attempt (connect error, or a safe bodiless request whose backend died).",
                &self.retries,
            ),
            (
                "access_log_dropped_total",
                "counter",
                "Access-log lines dropped because the writer fell behind.",
                &self.access_log_dropped,
            ),
        ];
        for (name, ty, help, v) in singles {
            one(&mut o, name, ty, help, v.load(Relaxed));
        }
        head(&mut o, "errors_total", "counter", "Errors, by kind.");
        for (i, k) in ErrorKind::ALL.iter().enumerate() {
            let _ = writeln!(
                o,
                "{p}_errors_total{{kind=\"{}\"}} {}",
                k.label(),
                self.errors[i].load(Relaxed)
            );
        }
        head(
            &mut o,
            "request_duration_seconds",
            "histogram",
            "Time from request to the end of the response body.",
        );
        let mut cum = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cum += self.latency_buckets[i].load(Relaxed);
            let _ = writeln!(o, "{p}_request_duration_seconds_bucket{{le=\"{b}\"}} {cum}");
        }
        let count = self.latency_count.load(Relaxed);
        let _ = writeln!(
            o,
            "{p}_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            o,
            "{p}_request_duration_seconds_sum {}",
            self.latency_sum_us.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(o, "{p}_request_duration_seconds_count {count}");
        let status = backends.status();
        let per = [
            ("backend_active", "gauge", "Requests in flight per backend."),
            (
                "backend_selections_total",
                "counter",
                "Requests sent per backend.",
            ),
            (
                "backend_up",
                "gauge",
                "1 unless ejected by health checking.",
            ),
            ("backend_draining", "gauge", "1 while draining."),
            (
                "backend_ejections_total",
                "counter",
                "Ejections per backend.",
            ),
        ];
        for (name, ty, help) in per {
            head(&mut o, name, ty, help);
            for b in &status {
                let v = match name {
                    "backend_active" => u64::from(b.active),
                    "backend_selections_total" => b.selections,
                    "backend_up" => u64::from(b.healthy),
                    "backend_draining" => u64::from(b.draining),
                    _ => b.ejections,
                };
                let _ = writeln!(o, "{p}_{name}{{backend=\"{}\"}} {v}", escape_label(&b.addr));
            }
        }
        o
    }
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
