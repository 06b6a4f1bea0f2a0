//! The alarms of the sessions' liveness checks, kept by one thread of their own rather than by
//! tokio's timer wheel.
//!
//! While any timer is in tokio's wheel, every time a worker parks it reads the clock, scans the
//! wheel and sleeps with a timeout, and a relay trading small messages parks on nearly every
//! message (docs/performance.md, item 18). The liveness deadlines are seconds apart, so a plain
//! thread keeps them instead: sessions [`arm`] an [`Alarm`] (a heap push under a lock, only when a
//! deadline changes), and the thread sets the alarm's flag and wakes its task when the deadline
//! passes. Deadlines are rounded up to a 10 ms grid, so the thread wakes at most a hundred times a
//! second however many sessions there are, and none is kept more than a minute ahead (a later
//! one is armed again then), so a session that ends leaves entries behind for at most that long.
//!
//! The thread is started on first use and serves every gateway in the process; it holds no
//! configuration and nothing that belongs to a gateway, only the weak handles of the alarms.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, LazyLock, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;

/// Deadlines are rounded up to this grid.
const GRID: Duration = Duration::from_millis(10);

/// No deadline is kept further ahead than this.
const HORIZON: Duration = Duration::from_secs(60);

/// One session's alarm: set when its deadline has passed, and then its task is woken.
#[derive(Debug, Default)]
pub(super) struct Alarm {
    /// Set by the clock when the deadline armed last has passed; cleared by the session.
    pub(super) rung: AtomicBool,
    /// The task to wake.
    pub(super) task: AtomicWaker,
    /// Which arming is current: entries of earlier armings are passed over.
    generation: AtomicU64,
}

/// Arms `alarm` for `at` (replacing its earlier deadline, if any).
pub(super) fn arm(alarm: &Arc<Alarm>, at: Instant) {
    let clock = &*CLOCK;
    RUNNING.get_or_init(|| {
        std::thread::Builder::new()
            .name("wsgate-clock".into())
            .spawn(|| CLOCK.run())
            .expect("start the liveness clock thread");
    });
    let now = Instant::now();
    let at = at.min(now + HORIZON);
    // Rounded up, so the alarm never rings early.
    let grid = GRID.as_nanos();
    let at = clock.base + Duration::from_nanos((at.duration_since(clock.base).as_nanos().div_ceil(grid) * grid) as u64);
    let generation = alarm.generation.fetch_add(1, Ordering::Relaxed) + 1;
    let mut queue = clock.lock();
    let sooner = queue.peek().is_none_or(|Reverse(first)| at < first.at);
    queue.push(Reverse(Entry { at, generation, alarm: Arc::downgrade(alarm) }));
    drop(queue);
    if sooner {
        clock.changed.notify_one();
    }
}

static CLOCK: LazyLock<Clock> =
    LazyLock::new(|| Clock { base: Instant::now(), queue: Mutex::default(), changed: Condvar::new() });

/// Set once the clock's thread runs.
static RUNNING: OnceLock<()> = OnceLock::new();

struct Clock {
    /// The grid's origin.
    base: Instant,
    /// Armed deadlines, soonest first.
    queue: Mutex<BinaryHeap<Reverse<Entry>>>,
    /// Notified when a deadline sooner than every other is armed.
    changed: Condvar,
}

struct Entry {
    at: Instant,
    generation: u64,
    alarm: Weak<Alarm>,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}

impl Eq for Entry {}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Entry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.at.cmp(&other.at)
    }
}

impl Clock {
    fn lock(&self) -> MutexGuard<'_, BinaryHeap<Reverse<Entry>>> {
        // Nothing panics while the lock is held; were it poisoned, the heap is still whole.
        self.queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Rings each alarm when its deadline passes, for the life of the process.
    fn run(&self) {
        let mut due = Vec::new();
        let mut queue = self.lock();
        loop {
            let now = Instant::now();
            while queue.peek().is_some_and(|Reverse(first)| first.at <= now) {
                due.extend(queue.pop().map(|Reverse(entry)| entry));
            }
            if !due.is_empty() {
                // Waking a task schedules it on the runtime: not under the lock sessions arm with.
                drop(queue);
                for entry in due.drain(..) {
                    if let Some(alarm) = entry.alarm.upgrade()
                        && alarm.generation.load(Ordering::Relaxed) == entry.generation
                    {
                        alarm.rung.store(true, Ordering::Release);
                        alarm.task.wake();
                    }
                }
                queue = self.lock();
                continue;
            }
            queue = match queue.peek().map(|Reverse(first)| first.at - now) {
                Some(wait) => self.changed.wait_timeout(queue, wait).unwrap_or_else(|p| p.into_inner()).0,
                None => self.changed.wait(queue).unwrap_or_else(|p| p.into_inner()),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::task::{Wake, Waker};

    /// Reports its wakes on a channel.
    struct Reporting(Mutex<mpsc::Sender<Instant>>);

    impl Wake for Reporting {
        fn wake(self: Arc<Self>) {
            let _ = self.0.lock().unwrap().send(Instant::now());
        }
    }

    /// An alarm rings once its deadline has passed, never before, and for its latest arming.
    #[test]
    fn alarms_ring_at_their_latest_deadline() {
        let (tx, rx) = mpsc::channel();
        let alarm = Arc::new(Alarm::default());
        alarm.task.register(&Waker::from(Arc::new(Reporting(Mutex::new(tx)))));
        let start = Instant::now();
        arm(&alarm, start + Duration::from_secs(3600));
        arm(&alarm, start + Duration::from_millis(50));
        // Another alarm, dropped before its deadline: passed over.
        let gone = Arc::new(Alarm::default());
        arm(&gone, start + Duration::from_millis(20));
        drop(gone);
        let woken = rx.recv_timeout(Duration::from_secs(10)).expect("the alarm rings");
        assert!(woken - start >= Duration::from_millis(50), "rang early: {:?}", woken - start);
        assert!(alarm.rung.load(Ordering::Acquire), "the flag is set before the wake");
    }
}
