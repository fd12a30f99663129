//! A coarse millisecond clock, advanced by a ticker task, so that the hot
//! path reads an atomic instead of the system clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Milliseconds since the dispatcher started, within a tick.
#[derive(Debug, Clone)]
pub struct Clock {
    start: Instant,
    now: Arc<AtomicU64>,
}

/// Resolution of the coarse clock.
pub const TICK: Duration = Duration::from_millis(10);

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock {
    /// A clock at 0.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            now: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Coarse now (advanced by [`Clock::run`]).
    pub fn now_ms(&self) -> u64 {
        self.now.load(Relaxed)
    }

    /// Exact now, also advancing the coarse value.
    pub fn precise_ms(&self) -> u64 {
        let ms = self.start.elapsed().as_millis() as u64;
        self.now.fetch_max(ms, Relaxed);
        ms
    }

    /// The instant the clock started.
    pub fn start(&self) -> Instant {
        self.start
    }

    /// Advances the coarse clock forever; spawn it once.
    pub async fn run(self) {
        let mut t = tokio::time::interval(TICK);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            t.tick().await;
            self.precise_ms();
        }
    }
}
