//! Whether the client is still there and the session within its bounds: the server's pings and
//! their pong timeout, the idle timeout, the session's lifetime and the client's message rate.
//!
//! Nothing here runs per message. The client's [`FrameGate`](crate::frames::FrameGate) counts
//! what crosses its socket ([`Activity`]), and a [`Watch`] compares the counts when its own
//! timer fires: at the next ping, at a ping's deadline, at the end of each one-second rate
//! window, every tenth of the idle timeout, and at the end of the session's lifetime, whichever
//! comes first. Its timer is an alarm of the `clock` thread, not a tokio timer (the module doc
//! there says why). In between, polling a watch costs a waker comparison and an atomic load, and
//! the clock is read only when the alarm has rung.
//!
//! Pings go out through tungstenite as control frames, so the gate keeps them whole between the
//! bridge's data frames. A ping's deadline runs from the moment it has been flushed to the
//! client's socket, not from when it was queued: behind a slow reader's full socket it waits,
//! and a slow reader is not a dead one. Any read from the client that brings bytes after that
//! moment answers it, since a browser's pong can queue behind a large message it is uploading.
//! So does a write of the pump's that had to wait meanwhile, or is waiting (the caller counts
//! them, as `stalls`): while a backend that has stopped reading holds the pump up, it reads
//! nothing from the client, and a ping flushed into a socket that then fills with data reaches
//! a slow reader only after that data, however long it takes.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::SinkExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tungstenite::Message;

use super::End;
use super::clock::{self, Alarm};
use crate::frames::{Activity, ClientWs};

/// The liveness limits a session runs under; `None` turns a check off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// How often a ping is sent to the client.
    pub ping_interval: Option<Duration>,
    /// How long after a ping reached the client's socket something must arrive from the client.
    pub pong_timeout: Duration,
    /// How long a session may carry no data message, either way.
    pub idle_timeout: Option<Duration>,
    /// How long a session may last.
    pub max_session: Option<Duration>,
    /// How many messages and control frames the client may send per second.
    pub max_messages_per_sec: Option<u64>,
}

impl Liveness {
    /// Every check off: no pings, no timer.
    pub const OFF: Liveness = Liveness {
        ping_interval: None,
        pong_timeout: Duration::from_secs(30),
        idle_timeout: None,
        max_session: None,
        max_messages_per_sec: None,
    };

    fn is_off(&self) -> bool {
        self.ping_interval.is_none()
            && self.idle_timeout.is_none()
            && self.max_session.is_none()
            && self.max_messages_per_sec.is_none()
    }
}

/// A liveness limit a session reached, with the configured value its close reason names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// Nothing arrived from the client within this time of a ping reaching its socket.
    PongTimeout(Duration),
    /// No data message either way for this long.
    IdleTimeout(Duration),
    /// The session lasted this long.
    MaxSession(Duration),
    /// The client sent more than this many messages and control frames in a second.
    MessageRate(u64),
}

/// One rate window: the client may send `max_messages_per_sec` in each.
const RATE_WINDOW: Duration = Duration::from_secs(1);

/// The idle timeout is checked this many times over its length, so a session is closed at most
/// a tenth of the timeout after it ran out.
const IDLE_CHECKS: u32 = 10;

/// Where the session's next ping stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ping {
    /// The next ping goes at this time.
    Due(Instant),
    /// Waiting for tungstenite to take the ping (it is still writing something else).
    Queue,
    /// Taken; being flushed to the client's socket. Its deadline has not started.
    Flush,
    /// Flushed at `at`, when the client's `reads` were `reads` and the pump's stalls `stalls`.
    Awaiting { at: Instant, reads: u64, stalls: u64 },
}

/// The checks' state, apart from the timer and the socket: what [`Checks::check`] decides from
/// a time and the counts, so the schedule is testable without waiting.
#[derive(Debug)]
struct Checks {
    limits: Liveness,
    started: Instant,
    ping: Ping,
    /// The current rate window's start, and `frames_in` then.
    rate: (Instant, u64),
    /// When `data` was last seen to change, and its value then.
    idle: (Instant, u64),
    /// When the checks last ran.
    checked: Instant,
}

impl Checks {
    fn new(limits: Liveness, now: Instant) -> Checks {
        let first_ping = limits.ping_interval.map_or(now, |interval| now + interval);
        Checks { limits, started: now, ping: Ping::Due(first_ping), rate: (now, 0), idle: (now, 0), checked: now }
    }

    fn writing(&self) -> bool {
        matches!(self.ping, Ping::Queue | Ping::Flush)
    }

    /// Runs the checks at `now` on the counts `seen` and the pump's `stalls` (odd while a write
    /// waits): a limit reached, or whether a ping is due.
    fn check(&mut self, now: Instant, seen: Activity, stalls: u64) -> Result<bool, Limit> {
        self.checked = now;
        let l = self.limits;
        if let Some(max) = l.max_session
            && now >= self.started + max
        {
            return Err(Limit::MaxSession(max));
        }
        if let Some(max) = l.max_messages_per_sec
            && now >= self.rate.0 + RATE_WINDOW
        {
            // The window may have run late (a busy task): the allowance grows with it.
            let sent = seen.frames_in - self.rate.1;
            if sent as f64 > max as f64 * (now - self.rate.0).as_secs_f64() {
                return Err(Limit::MessageRate(max));
            }
            self.rate = (now, seen.frames_in);
        }
        if let Some(idle) = l.idle_timeout {
            if seen.data != self.idle.1 {
                self.idle = (now, seen.data);
            } else if now >= self.idle.0 + idle {
                return Err(Limit::IdleTimeout(idle));
            }
        }
        let Some(interval) = l.ping_interval else { return Ok(false) };
        if let Ping::Awaiting { at, reads, stalls: then } = self.ping {
            if seen.reads != reads || stalls != then || stalls % 2 == 1 {
                self.ping = Ping::Due(at + interval);
            } else if now >= at + l.pong_timeout {
                return Err(Limit::PongTimeout(l.pong_timeout));
            }
        }
        Ok(matches!(self.ping, Ping::Due(at) if now >= at))
    }

    /// When the checks must run next, after a run at `self.checked`; `None` while only the
    /// ping's write is awaited (the watch is polled on every wake then).
    fn next(&self) -> Option<Instant> {
        let l = self.limits;
        let now = self.checked;
        let ping = match self.ping {
            _ if l.ping_interval.is_none() => None,
            Ping::Due(at) => Some(at),
            Ping::Queue | Ping::Flush => None,
            Ping::Awaiting { at, .. } => {
                let answer_by = at + l.pong_timeout;
                // Not answered when the next ping was due: it waits for the answer (or the
                // deadline); one ping is outstanding at a time.
                let next_ping = l.ping_interval.map(|i| at + i).filter(|t| *t > now);
                Some(next_ping.map_or(answer_by, |t| t.min(answer_by)))
            }
        };
        let idle = l.idle_timeout.map(|idle| (self.idle.0 + idle).min(now + idle / IDLE_CHECKS));
        [
            ping,
            idle,
            l.max_session.map(|max| self.started + max),
            l.max_messages_per_sec.map(|_| self.rate.0 + RATE_WINDOW),
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

/// A session's liveness checks: the [`Checks`], their timer, and the ping being written.
pub(crate) struct Watch {
    checks: Checks,
    /// `None` when every check is off: the watch then never does anything.
    timer: Option<Timer>,
}

impl Watch {
    /// Starts the session's checks now.
    pub(crate) fn new(limits: Liveness) -> Watch {
        let now = Instant::now();
        let checks = Checks::new(limits, now);
        let timer = (!limits.is_off()).then(|| Timer::new(checks.next().unwrap_or(now)));
        Watch { checks, timer }
    }

    /// Whether [`Watch::run`] has anything to do: `Some(true)` when the timer fired,
    /// `Some(false)` while a ping is being written, `None` otherwise. Cheap: polled on every
    /// wake of the session's task.
    #[inline(always)]
    pub(crate) fn poll_due(&mut self, cx: &mut Context<'_>) -> Option<bool> {
        let timer = self.timer.as_mut()?;
        if timer.poll_fired(cx) {
            return Some(true);
        }
        self.checks.writing().then_some(false)
    }

    /// Runs the checks if the timer `fired`, drives the ping being written, and sets the timer
    /// for the next checks; `stalls` is the pump's count of writes that had to wait (odd while
    /// one waits). Ready with the ending when a limit is reached or a ping's write fails.
    pub(crate) fn run<S>(
        &mut self,
        cx: &mut Context<'_>,
        ws: &mut ClientWs<S>,
        mut fired: bool,
        stalls: u64,
    ) -> Poll<End>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let Some(timer) = self.timer.as_mut() else { return Poll::Pending };
        loop {
            if fired {
                match self.checks.check(Instant::now(), ws.get_ref().activity(), stalls) {
                    Err(limit) => return Poll::Ready(End::Limit(limit)),
                    Ok(true) => self.checks.ping = Ping::Queue,
                    Ok(false) => {}
                }
            }
            if let Err(end) = write_ping(&mut self.checks.ping, cx, ws, stalls) {
                return Poll::Ready(end);
            }
            if let Some(at) = self.checks.next() {
                timer.set(at);
            }
            fired = timer.poll_fired(cx);
            if !fired {
                return Poll::Pending;
            }
        }
    }

    /// [`Watch::poll_due`], then [`Watch::run`] if due.
    pub(crate) fn poll<S>(&mut self, cx: &mut Context<'_>, ws: &mut ClientWs<S>, stalls: u64) -> Poll<End>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        match self.poll_due(cx) {
            None => Poll::Pending,
            Some(fired) => self.run(cx, ws, fired, stalls),
        }
    }
}

/// Moves the ping along: queued with tungstenite once it can take it, then flushed; once
/// flushed, its deadline starts.
fn write_ping<S>(ping: &mut Ping, cx: &mut Context<'_>, ws: &mut ClientWs<S>, stalls: u64) -> Result<(), End>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if *ping == Ping::Queue {
        match ws.poll_ready_unpin(cx) {
            Poll::Pending => return Ok(()),
            Poll::Ready(Err(e)) => return Err(End::ClientWriteFailed(e)),
            Poll::Ready(Ok(())) => {}
        }
        ws.start_send_unpin(Message::Ping(Bytes::new())).map_err(End::ClientWriteFailed)?;
        *ping = Ping::Flush;
    }
    if *ping == Ping::Flush {
        match ws.poll_flush_unpin(cx) {
            Poll::Pending => {}
            Poll::Ready(Err(e)) => return Err(End::ClientWriteFailed(e)),
            Poll::Ready(Ok(())) => {
                *ping = Ping::Awaiting { at: Instant::now(), reads: ws.get_ref().activity().reads, stalls };
            }
        }
    }
    Ok(())
}

/// The watch's alarm, and the deadline it is armed for.
struct Timer {
    alarm: Arc<Alarm>,
    /// `None` once the alarm has rung (a deadline further than the clock keeps rings early).
    at: Option<Instant>,
    /// The task waker last registered in the alarm (see `shutdown::Cancelled`, which this
    /// follows: registering again is skipped while the task's waker stays the same).
    registered: Option<Waker>,
}

impl Timer {
    fn new(at: Instant) -> Timer {
        let alarm = Arc::new(Alarm::default());
        clock::arm(&alarm, at);
        Timer { alarm, at: Some(at), registered: None }
    }

    /// Whether the alarm has rung since the last call; otherwise the task is woken when it does.
    #[inline(always)]
    fn poll_fired(&mut self, cx: &mut Context<'_>) -> bool {
        // Register first: a ring that lands between this and the check below is then seen
        // either by the check or through the task waker.
        if !self.registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            self.alarm.task.register(cx.waker());
            self.registered = Some(cx.waker().clone());
        }
        // A plain load first: the flag is almost always false, and a swap would write its line.
        if !self.alarm.rung.load(Ordering::Acquire) || !self.alarm.rung.swap(false, Ordering::AcqRel) {
            return false;
        }
        // The ring took the task waker out of the alarm: put it back for the next one.
        self.alarm.task.register(cx.waker());
        self.at = None;
        true
    }

    /// Arms the alarm for `at`, unless it already is.
    fn set(&mut self, at: Instant) {
        if self.at != Some(at) {
            self.at = Some(at);
            clock::arm(&self.alarm, at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Liveness {
        Liveness {
            ping_interval: Some(Duration::from_secs(30)),
            pong_timeout: Duration::from_secs(30),
            idle_timeout: None,
            max_session: None,
            max_messages_per_sec: None,
        }
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn activity(reads: u64, frames_in: u64, data: u64) -> Activity {
        Activity { reads, frames_in, data }
    }

    /// At the defaults a client that goes silent just after answering a ping is closed 60 s
    /// later (the next ping, then its deadline), well within 90 s; pings go every 30 s while
    /// answered.
    #[test]
    fn a_silent_client_is_closed_one_interval_and_one_timeout_after_its_last_answer() {
        let t0 = Instant::now();
        let mut c = Checks::new(limits(), t0);
        assert_eq!(c.next(), Some(t0 + secs(30)), "the first ping");
        assert_eq!(c.check(t0 + secs(30), activity(0, 0, 0), 0), Ok(true));
        c.ping = Ping::Awaiting { at: t0 + secs(30), reads: 0, stalls: 0 };
        assert_eq!(c.next(), Some(t0 + secs(60)));
        // Answered (a pong's bytes): the next ping is due 30 s after the last.
        assert_eq!(c.check(t0 + secs(60), activity(6, 1, 0), 0), Ok(true));
        c.ping = Ping::Awaiting { at: t0 + secs(60), reads: 6, stalls: 0 };
        // Silent from here on.
        assert_eq!(c.check(t0 + secs(89), activity(6, 1, 0), 0), Ok(false));
        assert_eq!(c.next(), Some(t0 + secs(90)));
        assert_eq!(c.check(t0 + secs(90), activity(6, 1, 0), 0), Err(Limit::PongTimeout(secs(30))));
    }

    /// The deadline starts when the ping reaches the socket: while it is being written, no
    /// amount of time closes the session, and the timer leaves the ping to the write.
    #[test]
    fn a_ping_being_written_has_no_deadline() {
        let t0 = Instant::now();
        let mut c = Checks::new(limits(), t0);
        c.ping = Ping::Flush;
        assert_eq!(c.check(t0 + secs(3600), activity(0, 0, 0), 0), Ok(false));
        assert_eq!(c.next(), None);
    }

    /// While a write of the pump's waits (odd stalls), or after one waited, the client's
    /// silence proves nothing: the pump was not reading it.
    #[test]
    fn a_stalled_pump_does_not_blame_the_client() {
        let t0 = Instant::now();
        let mut c = Checks::new(limits(), t0);
        c.ping = Ping::Awaiting { at: t0, reads: 0, stalls: 4 };
        assert_eq!(c.check(t0 + secs(30), activity(0, 0, 0), 5), Ok(true), "waiting now");
        c.ping = Ping::Awaiting { at: t0 + secs(30), reads: 0, stalls: 5 };
        assert_eq!(c.check(t0 + secs(60), activity(0, 0, 0), 6), Ok(true), "waited meanwhile");
        c.ping = Ping::Awaiting { at: t0 + secs(60), reads: 0, stalls: 6 };
        assert_eq!(c.check(t0 + secs(90), activity(0, 0, 0), 6), Err(Limit::PongTimeout(secs(30))));
    }

    /// With pings more often than the timeout, one ping is outstanding at a time: an unanswered
    /// one is waited for until its deadline, then the session closes.
    #[test]
    fn pings_more_often_than_the_timeout_wait_for_the_answer() {
        let l = Liveness { ping_interval: Some(secs(10)), ..limits() };
        let t0 = Instant::now();
        let mut c = Checks::new(l, t0);
        c.ping = Ping::Awaiting { at: t0, reads: 0, stalls: 0 };
        assert_eq!(c.next(), Some(t0 + secs(10)));
        assert_eq!(c.check(t0 + secs(10), activity(0, 0, 0), 0), Ok(false), "not answered: no second ping");
        assert_eq!(c.next(), Some(t0 + secs(30)));
        assert_eq!(c.check(t0 + secs(20), activity(1, 0, 0), 0), Ok(true), "a late answer: the next ping at once");
    }

    /// Idle: data either way keeps the session; pings and pongs (bytes, frames) do not. The
    /// close comes at most a tenth of the timeout late.
    #[test]
    fn idle_counts_data_only() {
        let l = Liveness { ping_interval: None, idle_timeout: Some(secs(100)), ..limits() };
        let t0 = Instant::now();
        let mut c = Checks::new(l, t0);
        assert_eq!(c.next(), Some(t0 + secs(10)));
        assert_eq!(c.check(t0 + secs(10), activity(0, 0, 1), 0), Ok(false));
        // Last data seen at 10 s (it came after the check at 0 s).
        let closed = loop {
            let t = c.next().unwrap();
            match c.check(t, activity(500, 40, 1), 0) {
                Ok(_) => assert!(t < t0 + secs(110)),
                Err(limit) => {
                    assert_eq!(limit, Limit::IdleTimeout(secs(100)));
                    break t;
                }
            }
        };
        assert_eq!(closed, t0 + secs(110));
    }

    /// The lifetime ends the session at its deadline, whatever the traffic.
    #[test]
    fn lifetime() {
        let l = Liveness { ping_interval: None, max_session: Some(secs(3600)), ..limits() };
        let t0 = Instant::now();
        let mut c = Checks::new(l, t0);
        assert_eq!(c.next(), Some(t0 + secs(3600)));
        assert_eq!(c.check(t0 + secs(3599), activity(9, 9, 9), 0), Ok(false));
        assert_eq!(c.check(t0 + secs(3600), activity(9, 9, 9), 0), Err(Limit::MaxSession(secs(3600))));
    }

    /// The rate is measured over one-second windows; a late window allows proportionally more.
    #[test]
    fn message_rate_per_window() {
        let l = Liveness { ping_interval: None, max_messages_per_sec: Some(100), ..limits() };
        let t0 = Instant::now();
        let mut c = Checks::new(l, t0);
        assert_eq!(c.next(), Some(t0 + secs(1)));
        assert_eq!(c.check(t0 + secs(1), activity(0, 100, 100), 0), Ok(false), "at the cap");
        assert_eq!(c.check(t0 + secs(2), activity(0, 200, 200), 0), Ok(false));
        assert_eq!(c.check(t0 + secs(4), activity(0, 390, 390), 0), Ok(false), "a late window of 2 s");
        assert_eq!(c.check(t0 + secs(5), activity(0, 491, 391), 0), Err(Limit::MessageRate(100)));
    }
}
