//! `shoal logs`: an app's output fetched from its node's agent through the
//! manager. Agents only ever call the manager (mutual TLS, their own
//! certificate), so the manager holds each administrator's request until
//! the node's agent collects it on its long poll and posts the answer back.

use shoal_net::wire::{LogChunk, LogRequest};
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{Notify, oneshot};

/// How long an administrator's request waits for the agent.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(10);
/// How long an agent's poll is held open when there is nothing to ask.
pub const POLL_HOLD: Duration = Duration::from_secs(5);

/// Requests waiting for agents, and answers waiting for administrators.
#[derive(Default)]
pub struct LogHub {
    next_id: AtomicU64,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    pending: HashMap<String, Vec<LogRequest>>,
    wakers: HashMap<String, std::sync::Arc<Notify>>,
    waiting: HashMap<u64, (String, oneshot::Sender<LogChunk>)>,
}

/// Why a log request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The agent did not collect or answer the request in time.
    #[error(
        "node {0:?} did not send the output within {1:?}: is its agent running (and of this version)? see `shoal status`"
    )]
    NoAnswer(String, Duration),
}

impl LogHub {
    fn waker(inner: &mut Inner, node: &str) -> std::sync::Arc<Notify> {
        inner.wakers.entry(node.to_string()).or_default().clone()
    }

    /// Asks `node`'s agent for output and waits for its answer.
    pub async fn fetch(
        &self,
        node: &str,
        app: String,
        offset: Option<u64>,
        tail: Option<usize>,
    ) -> Result<LogChunk, LogError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = oneshot::channel();
        let waker = {
            let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            g.pending
                .entry(node.to_string())
                .or_default()
                .push(LogRequest {
                    id,
                    app,
                    offset,
                    tail,
                });
            g.waiting.insert(id, (node.to_string(), tx));
            Self::waker(&mut g, node)
        };
        waker.notify_one();
        let r = tokio::time::timeout(ANSWER_WITHIN, rx).await;
        // Whatever happened, nothing of this request stays behind.
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.waiting.remove(&id);
        if let Some(p) = g.pending.get_mut(node) {
            p.retain(|r| r.id != id);
        }
        match r {
            Ok(Ok(chunk)) => Ok(chunk),
            _ => Err(LogError::NoAnswer(node.to_string(), ANSWER_WITHIN)),
        }
    }

    /// The requests for `node`, waiting up to [`POLL_HOLD`] for one.
    pub async fn poll(&self, node: &str) -> Vec<LogRequest> {
        let waker = {
            let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            let p = g.pending.remove(node).unwrap_or_default();
            if !p.is_empty() {
                return p;
            }
            Self::waker(&mut g, node)
        };
        let _ = tokio::time::timeout(POLL_HOLD, waker.notified()).await;
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.pending.remove(node).unwrap_or_default()
    }

    /// An agent's answer; only `node` may answer its own requests.
    pub fn answer(&self, node: &str, id: u64, chunk: LogChunk) -> bool {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match g.waiting.remove(&id) {
            Some((n, tx)) if n == node => tx.send(chunk).is_ok(),
            Some(other) => {
                g.waiting.insert(id, other);
                false
            }
            None => false,
        }
    }
}
