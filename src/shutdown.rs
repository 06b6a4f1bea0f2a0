//! The shutdown request handed to a running gateway.
//!
//! `main` turns signals into calls on a [`Shutdown`]; tests call it directly. The gateway then
//! drains in order: `/readyz` fails at once, listeners keep accepting for the drain delay (so a
//! load balancer notices first), then stop, sessions close with 1001 spread over the close
//! window, and what is left at the deadline is dropped. [`Shutdown::now`] skips the delay.
//!
//! [`Cancelled`] is how hot loops wait for a stop: a session's task is polled on every message,
//! and `CancellationToken::cancelled()` takes two mutexes each time it is polled.
//!
//! A leaf module: it imports nothing else from wsgate.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

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

pin_project_lite::pin_project! {
    /// Resolves once `token` is cancelled, like `token.cancelled()`, but cheap to poll often.
    ///
    /// A session's task is polled whenever either of its sockets is ready, and each poll polls
    /// every branch of its `select!`s, the stop branches included. `cancelled()` locks the token
    /// and the waiter list on each of those polls (the largest user-space cost per message in a
    /// profile of 50 sessions trading 64-byte messages). `Cancelled` polls the token only after
    /// the token has woken it, and otherwise costs one atomic load.
    #[must_use = "futures do nothing unless polled"]
    pub struct Cancelled<'a> {
        #[pin]
        inner: WaitForCancellationFuture<'a>,
        wake: Arc<WakeFlag>,
        // The task waker last registered in `wake`. A task's waker stays the same from one poll
        // to the next, so registering again (two atomic read-modify-writes on a line the waking
        // thread also writes) is skipped unless it changed. Sound because a wake always sets
        // `woken` before it takes the waker out of `wake.task`, and the poll that clears `woken`
        // registers again; it relies on the token waking us only when cancelled (as tokio-util's
        // does), since a spurious wake consumed on another thread could leave `wake.task` empty.
        registered: Option<Waker>,
    }
}

impl<'a> Cancelled<'a> {
    /// Waits for `token`.
    pub fn new(token: &'a CancellationToken) -> Self {
        let wake = WakeFlag { woken: AtomicBool::new(true), task: AtomicWaker::new() };
        Cancelled { inner: token.cancelled(), wake: Arc::new(wake), registered: None }
    }
}

/// Set when the token wakes the future it was given; then wakes the task.
struct WakeFlag {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for WakeFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl Future for Cancelled<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        // Register first: a wake that lands between this and the check below is then seen
        // either by the check or through the task waker.
        if !this.registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            this.wake.task.register(cx.waker());
            *this.registered = Some(cx.waker().clone());
        }
        // A plain load first: the flag is almost always false, and a swap would write its line.
        if !this.wake.woken.load(Ordering::Acquire) || !this.wake.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        // The wake that set the flag took the task waker out of `wake.task`: put it back before
        // polling the token, so that whatever wakes us next finds it.
        this.wake.task.register(cx.waker());
        let waker = Waker::from(this.wake.clone());
        this.inner.poll(&mut Context::from_waker(&waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    /// Pending until the token is cancelled, however often it is polled; ready (and woken)
    /// once it is, also for a cancel that comes from the parent token.
    #[tokio::test]
    async fn cancelled_resolves_on_cancel_only() {
        let parent = CancellationToken::new();
        let token = parent.child_token();
        let waiting = Cancelled::new(&token);
        tokio::pin!(waiting);
        for _ in 0..3 {
            assert!(waiting.as_mut().now_or_never().is_none());
        }
        let cancel = async {
            tokio::task::yield_now().await;
            parent.cancel();
        };
        let (_, ()) = tokio::time::timeout(Duration::from_secs(5), async { tokio::join!(cancel, waiting.as_mut()) })
            .await
            .expect("the cancel wakes the waiting future");
        assert!(Cancelled::new(&token).now_or_never().is_some(), "already cancelled: ready at once");
    }

    /// Counts its wakes.
    struct Counting(std::sync::atomic::AtomicUsize);

    impl Wake for Counting {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// The waker registration that is skipped while the waker stays the same is not skipped
    /// when it changes: a cancel wakes the waker of the latest poll, also after the future was
    /// polled again (with a registration skipped) and after an earlier wake emptied the slot.
    #[test]
    fn cancel_wakes_the_latest_waker() {
        let token = CancellationToken::new();
        let mut waiting = std::pin::pin!(Cancelled::new(&token));
        let (a, b) = (Arc::new(Counting(0.into())), Arc::new(Counting(0.into())));
        let (wa, wb) = (Waker::from(a.clone()), Waker::from(b.clone()));
        for waker in [&wa, &wa, &wb, &wb] {
            assert!(waiting.as_mut().poll(&mut Context::from_waker(waker)).is_pending());
        }
        token.cancel();
        assert_eq!(b.0.load(Ordering::SeqCst), 1, "the latest waker is woken once");
        assert_eq!(a.0.load(Ordering::SeqCst), 0, "the replaced waker is not");
        assert!(waiting.as_mut().poll(&mut Context::from_waker(&wb)).is_ready());
    }
}
