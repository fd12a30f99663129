//! The reallocation engine's clock: it hands the controller
//! ([`shoal_core::control`]) the time whenever a lease may have run out or
//! an allocation pass is due, and the shell executes what it commands.
//! Every decision (lease expiry, allocation phases, monitors, policies,
//! pool arbitration, rolling updates, node reconcile) is the controller's;
//! the simulator (`shoal sim cluster`) drives the same code on a virtual
//! clock.

use crate::state::Shell;
use std::sync::Arc;
use std::time::Duration;

/// How often the controller is offered the time: bounds failure detection
/// at TTL + 0.1 s. The controller runs its allocation pass every 250 ms.
pub const TICK: Duration = Duration::from_millis(100);

/// Runs the engine forever.
pub async fn run(shell: Arc<Shell>) {
    let mut t = tokio::time::interval(TICK);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        t.tick().await;
        shell.tick();
    }
}
