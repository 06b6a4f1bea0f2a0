//! What a session moved, counted twice: in the session's own totals (logged when it ends) and in
//! the route's shared metrics (scraped while it runs).
//!
//! The names, used the same way by the bridge, the echo loop and `session`:
//! - [`SessionTotals`]: one session's totals, both directions;
//! - [`DirectionTotals`]: one session's totals for one direction;
//! - [`DirectionMetrics`]: the route's shared handles for one direction (in `metrics`);
//! - [`BridgeMetrics`]: the route's handles for both directions, as a pump is given them;
//! - [`DirectionMeter`]: one direction's totals and metrics, updated together.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use crate::metrics::{Buffered, DirectionMetrics};

/// Bytes and messages moved by one session, per direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SessionTotals {
    /// Client → backend.
    pub to_backend: DirectionTotals,
    /// Backend → client.
    pub to_client: DirectionTotals,
    /// Backend bytes read after the client closed, and so never delivered.
    pub dropped_bytes: u64,
    /// Client message bytes read after the gateway's close frame, and so never delivered.
    pub dropped_client_bytes: u64,
}

/// One direction of one session.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DirectionTotals {
    /// Payload bytes written to the destination.
    pub bytes: u64,
    /// Messages relayed.
    pub messages: u64,
    /// Most bytes held at once (read from one side, not yet written to the other).
    pub peak_buffered: u64,
}

/// The route's metrics for both directions.
#[derive(Debug, Clone, Copy)]
pub struct BridgeMetrics<'a> {
    /// Client → backend.
    pub to_backend: &'a DirectionMetrics,
    /// Backend → client.
    pub to_client: &'a DirectionMetrics,
}

/// One direction's session totals and the route's shared metrics, updated together.
pub(crate) struct DirectionMeter<'a> {
    metrics: &'a DirectionMetrics,
    totals: &'a mut DirectionTotals,
    /// Bumped when a write starts to wait and again when it is done (odd while one waits).
    stalls: Option<&'a AtomicU64>,
}

impl<'a> DirectionMeter<'a> {
    /// Counts into `totals` and `metrics`.
    pub(crate) fn new(metrics: &'a DirectionMetrics, totals: &'a mut DirectionTotals) -> Self {
        DirectionMeter { metrics, totals, stalls: None }
    }

    /// Also counts, in `stalls`, the writes that had to wait: the liveness checks do not blame
    /// the client for silence while the pump is not reading it, or cannot write to it.
    pub(crate) fn counting_stalls(self, stalls: &'a AtomicU64) -> Self {
        DirectionMeter { stalls: Some(stalls), ..self }
    }

    /// `write`, counted: it hands `n` bytes read from one side to the other (the session's peak is
    /// taken now, when the write is made). The route's
    /// buffered-bytes gauge counts them only once the write has to wait, so a write the socket
    /// takes at once (nearly every one) updates no gauge that all the route's sessions share
    /// (docs/performance.md, item 10).
    ///
    /// Also returns whether the write had to wait (the task gave way to the runtime).
    pub(crate) fn write<F: Future>(&mut self, n: usize, write: F) -> Metered<'a, F> {
        self.totals.peak_buffered = self.totals.peak_buffered.max(n as u64);
        Metered { metrics: self.metrics, stalls: self.stalls, n, buffered: None, write }
    }

    /// `messages` messages, `n` bytes in all, were written to their destination. Inlined: on
    /// every message, in every instantiation of the pump (server and client roles).
    #[inline(always)]
    pub(crate) fn relayed(&mut self, n: usize, messages: u64) {
        self.totals.bytes += n as u64;
        self.totals.messages += messages;
        self.metrics.bytes.increment(n as u64);
        self.metrics.messages.increment(messages);
    }
}

pin_project_lite::pin_project! {
    /// A write being counted ([`DirectionMeter::write`]). A future of our own rather than an
    /// `async fn`, which would hold `write` twice, in every session's future.
    #[must_use = "futures do nothing unless polled"]
    pub(crate) struct Metered<'a, F> {
        metrics: &'a DirectionMetrics,
        stalls: Option<&'a AtomicU64>,
        n: usize,
        // Held while the write waits: its bytes in the route's buffered gauge.
        buffered: Option<Buffered<'a>>,
        #[pin]
        write: F,
    }
}

impl<F: Future> Future for Metered<'_, F> {
    type Output = (F::Output, bool);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let stalled = |stalls: Option<&AtomicU64>| stalls.map(|s| s.fetch_add(1, Ordering::Relaxed));
        match this.write.poll(cx) {
            Poll::Ready(done) if this.buffered.is_none() => Poll::Ready((done, false)),
            Poll::Ready(done) => {
                stalled(*this.stalls);
                *this.buffered = None;
                Poll::Ready((done, true))
            }
            Poll::Pending => {
                if this.buffered.is_none() {
                    *this.buffered = Some(this.metrics.buffer(*this.n));
                    stalled(*this.stalls);
                }
                Poll::Pending
            }
        }
    }
}
