//! The shutdown request handed to a running gateway.
//!
//! `main` turns signals into calls on a [`Shutdown`]; tests call it directly. The gateway then
//! drains in order: `/readyz` fails at once, listeners keep accepting for the drain delay (so a
//! load balancer notices first), then stop, sessions close with 1001 spread over the close
//! window, and what is left at the deadline is dropped. [`Shutdown::now`] skips the delay.
//!
//! A leaf module: it imports nothing else from wsgate.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// A cloneable handle that asks one gateway instance to shut down.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    requested: CancellationToken,
    skip_delay: CancellationToken,
}

impl Shutdown {
    /// A handle nobody has used yet.
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Graceful shutdown with the configured drain delay (what SIGTERM does).
    pub fn drain(&self) {
        self.requested.cancel();
    }

    /// Graceful shutdown without the drain delay (what SIGINT does). Also cuts short a delay
    /// already under way.
    pub fn now(&self) {
        self.skip_delay.cancel();
        self.requested.cancel();
    }

    /// Whether a shutdown was asked for.
    pub fn is_requested(&self) -> bool {
        self.requested.is_cancelled()
    }

    /// Resolves once a shutdown is asked for.
    pub async fn requested(&self) {
        self.requested.cancelled().await
    }

    /// Waits out the drain delay, unless [`Shutdown::now`] was (or is) called.
    pub async fn drain_delay(&self, delay: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = self.skip_delay.cancelled() => {}
        }
    }
}
