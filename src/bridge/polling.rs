//! How the pump's one task spends its polls: the two directions take turns at going first, and a
//! direction that has just registered its waker waits for it instead of polling again. The
//! liveness watch goes before both, at the cost of a flag check until its timer fires.

use std::pin::Pin;
use std::task::{Context, Poll};

use super::End;

/// Which directions are still running once the pump's first ending is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Running {
    /// Client → backend (the other direction ended).
    Up,
    /// Backend → client (the other direction ended).
    Down,
    /// Both: the liveness watch ended the pump.
    Both,
}

/// Polls the liveness `watch` and both directions until one ends; returns its ending and what
/// is still running. The directions take turns at going first, so one that is always ready
/// cannot starve the other (what `select!` does with a random number on every poll;
/// docs/performance.md, item 15).
pub(super) async fn first_to_end<U, D, W>(mut up: Pin<&mut U>, mut down: Pin<&mut D>, watch: W) -> (End, Running)
where
    U: Future<Output = End>,
    D: Future<Output = End>,
    W: FnMut(&mut Context<'_>) -> Poll<End>,
{
    let mut watch = watch;
    let mut up_first = false;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(end) = watch(cx) {
            return Poll::Ready((end, Running::Both));
        }
        up_first = !up_first;
        for up_turn in [up_first, !up_first] {
            let polled = match up_turn {
                true => up.as_mut().poll(cx).map(|end| (end, Running::Down)),
                false => down.as_mut().poll(cx).map(|end| (end, Running::Up)),
            };
            if polled.is_ready() {
                return polled;
            }
        }
        Poll::Pending
    })
    .await
}

/// Gives the task back to the runtime once, until one of the wakers it registered wakes it.
///
/// Sound only where a poll in this task has just returned Pending (so a waker is registered)
/// and the task has not given way since (so no wake-up has been spent): a wake-up that comes
/// while the task runs makes the runtime poll it again, and a spurious poll just returns Ready.
/// The task's other wake-up sources must stay registered across such a wait too: the stop
/// check (`Cancelled`) does, until the token is cancelled.
pub(super) async fn until_woken() {
    let mut first = true;
    std::future::poll_fn(|_| match std::mem::take(&mut first) {
        true => Poll::Pending,
        false => Poll::Ready(()),
    })
    .await
}

/// Whether `fut` is ready now, without waiting.
pub(super) async fn is_ready<F: Future + Unpin>(mut fut: F) -> bool {
    std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut fut).poll(cx).is_ready())).await
}
