//! A log line that can repeat once per request, let through at most once per interval: a flood
//! of refused requests, or every client retry during a backend outage, then costs a few lines a
//! minute instead of one each, and the line that does get through says how many were left out.
//!
//! It decides only what is written: the metrics count every event whatever it says. A leaf that
//! knows nothing of logging or of the rest of wsgate; the throttles of a route live in its
//! `metrics::RouteMetrics`, which outlives reloads, so a reload does not start them over.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How often a throttled warning is written at most, per kind and route: often enough that an
/// operator watching the log sees an attack or an outage while it lasts, rarely enough that
/// thousands of requests a second add six lines a minute.
pub const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// One line per interval; the others are counted until the next line is let through.
///
/// Lock-free: many connection tasks ask at once. Two atomics that are not updated together mean
/// an event counted while another task lets its line through may be reported in that line or in
/// the next one; none is lost.
#[derive(Debug)]
pub struct Throttle {
    /// Times are kept as milliseconds since this instant, so they fit an atomic.
    start: Instant,
    interval_ms: u64,
    /// When the next line may be written, in milliseconds since `start`; 0: at once.
    next_ms: AtomicU64,
    /// Lines left out since the last one written.
    suppressed: AtomicU64,
}

impl Throttle {
    /// A throttle that lets the first line through, then one per `interval`.
    pub fn new(interval: Duration) -> Throttle {
        Throttle {
            start: Instant::now(),
            interval_ms: millis(interval),
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether a line may be written now: `Some(n)`, `n` being the lines left out since the last
    /// one written (to be said in this one), or `None`, counting this line as left out.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    /// [`Throttle::allow`] as if the time were `now`.
    pub fn allow_at(&self, now: Instant) -> Option<u64> {
        let now_ms = millis(now.saturating_duration_since(self.start));
        let next = self.next_ms.load(Ordering::Acquire);
        let due = now_ms >= next;
        // Of the tasks that find the line due at once, only the one that moves `next_ms` writes.
        if due
            && self
                .next_ms
                .compare_exchange(next, now_ms.saturating_add(self.interval_ms), Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::AcqRel));
        }
        self.suppressed.fetch_add(1, Ordering::AcqRel);
        None
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first line passes, the next ones within the interval are counted, and the first line
    /// after it says how many were left out.
    #[test]
    fn one_line_per_interval_with_the_count_of_the_rest() {
        let t = Throttle::new(Duration::from_secs(10));
        let at = |secs: f64| t.start + Duration::from_secs_f64(secs);
        assert_eq!(t.allow_at(at(0.0)), Some(0));
        for _ in 0..1999 {
            assert_eq!(t.allow_at(at(5.0)), None);
        }
        assert_eq!(t.allow_at(at(9.999)), None);
        assert_eq!(t.allow_at(at(10.0)), Some(2000));
        assert_eq!(t.allow_at(at(10.5)), None);
        // A quiet spell longer than the interval: the next line passes at once.
        assert_eq!(t.allow_at(at(100.0)), Some(1));
        assert_eq!(t.allow_at(at(100.0)), None);
    }

    /// Many threads at once: exactly one line passes per interval and no event is lost. An
    /// event counted while the line is let through may be reported in that line (its count) or
    /// left for the next (still in `suppressed`): the two together hold every other event.
    #[test]
    fn concurrent_callers_lose_no_count() {
        let t = Throttle::new(Duration::from_secs(3600));
        let (passed, reported) = (AtomicU64::new(0), AtomicU64::new(0));
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..10_000 {
                        if let Some(n) = t.allow() {
                            passed.fetch_add(1, Ordering::Relaxed);
                            reported.fetch_add(n, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(passed.load(Ordering::Relaxed), 1);
        assert_eq!(reported.load(Ordering::Relaxed) + t.suppressed.load(Ordering::Relaxed), 39_999);
    }
}
