//! The client's WebSocket as the pump's two directions share it: one reads messages from it, the
//! other writes frames to it, and each tells the other what it has seen ([`Seen`]).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::Poll;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tungstenite::Error as WsError;

use crate::frames::{self, ClientWs};

/// What the client → backend direction has seen of the client, for the other direction. Both
/// run in one task, so Relaxed is enough; the atomics only make the shared borrow `Send`.
#[derive(Default)]
pub(super) struct Seen {
    /// Mirror framing: whether the client's last data message was text.
    pub(super) last_text: AtomicBool,
    /// The client's stream has ended (its Close, an error, its socket) while the messages read
    /// before that are still being written to the backend. Nothing more goes to the client then:
    /// after its Close, tungstenite may write the reply at any flush, and no data frame may
    /// follow that.
    pub(super) client_ended: AtomicBool,
    /// Writes of either direction that had to wait, counted when they start and when they end
    /// (odd while one waits): the liveness checks read it (`DirectionMeter::counting_stalls`).
    pub(super) stalls: AtomicU64,
}

/// The client's WebSocket, shared by the two directions. They run in one task and never hold it
/// across an await, so the lock is never contended; it is there so the shared borrow is `Send`
/// (as `split`'s lock would be).
pub(super) struct Client<'a, C>(pub(super) Mutex<&'a mut ClientWs<C>>);

impl<C: AsyncRead + AsyncWrite + Unpin> Client<'_, C> {
    pub(super) fn with<R>(&self, f: impl FnOnce(&mut ClientWs<C>) -> R) -> R {
        f(&mut self.0.lock().expect("never held across a panic"))
    }

    /// Writes one frame (from `frames::frame`) to the client, unless the client's stream has
    /// ended before the frame could start (`poll_send` may first have to let tungstenite finish
    /// a write, which may then include its reply to the client's Close): then it never
    /// completes, and the other direction ends the pump.
    pub(super) async fn send(&self, frame: Bytes, seen: &Seen) -> Result<(), WsError> {
        let mut frame = Some(frame);
        std::future::poll_fn(|cx| {
            if frame.is_some() && seen.client_ended.load(Ordering::Relaxed) {
                return Poll::Pending;
            }
            self.with(|ws| frames::poll_send(ws, cx, &mut frame))
        })
        .await
    }
}
