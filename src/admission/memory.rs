//! The memory budget: new sessions are shed while the process's resident memory is above
//! `limits.max_memory_bytes`, so a crowd of sessions that each stay within their own bounds
//! cannot together take the process to the kernel's OOM killer, which would end every session.
//!
//! The resident size is read from `/proc/self/status` at most every [`SAMPLE_EVERY`], when a
//! session is about to start, so an idle gateway reads nothing. The automatic budget is 80 % of
//! what the process may use: its cgroup's `memory.max` (cgroup v2) when it has one, otherwise
//! the machine's memory.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::MemoryBudget;

/// How stale a reading of the resident size may be.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// The budget check, with its last reading.
#[derive(Debug)]
pub struct Memory {
    last: Mutex<Option<(Instant, u64)>>,
    auto: Option<u64>,
}

impl Memory {
    /// A check with the automatic budget worked out now.
    pub fn new() -> Memory {
        let limit = cgroup_limit().or_else(machine_memory);
        Memory { last: Mutex::new(None), auto: limit.map(|l| l / 5 * 4) }
    }

    /// The budget in bytes under `budget`, if there is one.
    pub fn budget(&self, budget: MemoryBudget) -> Option<u64> {
        match budget {
            MemoryBudget::Auto => self.auto,
            MemoryBudget::Off => None,
            MemoryBudget::Bytes(n) => Some(n),
        }
    }

    /// Whether the process is above `budget` now (within [`SAMPLE_EVERY`]).
    pub fn is_over(&self, budget: MemoryBudget) -> bool {
        let Some(limit) = self.budget(budget) else { return false };
        self.resident(Instant::now()).is_some_and(|rss| rss > limit)
    }

    /// The resident size, read again if the last reading is older than [`SAMPLE_EVERY`].
    pub fn resident(&self, now: Instant) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        match *last {
            Some((at, rss)) if now.saturating_duration_since(at) < SAMPLE_EVERY => Some(rss),
            _ => {
                let rss = resident_bytes()?;
                *last = Some((now, rss));
                Some(rss)
            }
        }
    }
}

impl Default for Memory {
    fn default() -> Self {
        Memory::new()
    }
}

/// `VmRSS` of this process, in bytes.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    kib_field(&status, "VmRSS:")
}

/// The machine's memory (`MemTotal`), in bytes.
fn machine_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    kib_field(&meminfo, "MemTotal:")
}

/// A `Name:   1234 kB` line of a `/proc` file, in bytes.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    let kib: u64 = line[name.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

/// The cgroup v2 `memory.max` of this process, if it is a number (not `max`).
fn cgroup_limit() -> Option<u64> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroups.lines().find_map(|l| l.strip_prefix("0::"))?;
    let max = std::fs::read_to_string(format!("/sys/fs/cgroup{}/memory.max", path.trim_end_matches('/'))).ok()?;
    max.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let memory = Memory::new();
        let rss = memory.resident(Instant::now()).expect("/proc/self/status has VmRSS");
        assert!(rss > 1 << 20, "{rss}");
        assert!(memory.is_over(MemoryBudget::Bytes(1 << 20)));
        assert!(!memory.is_over(MemoryBudget::Bytes(1 << 50)));
        assert!(!memory.is_over(MemoryBudget::Off));
        let auto = memory.budget(MemoryBudget::Auto).expect("this machine reports its memory");
        assert!(auto > rss, "automatic budget {auto} below this test's own {rss}");
    }

    #[test]
    fn parses_kib_fields() {
        assert_eq!(kib_field("VmPeak:\t  100 kB\nVmRSS:\t    2048 kB\n", "VmRSS:"), Some(2048 * 1024));
        assert_eq!(kib_field("VmRSS: x kB\n", "VmRSS:"), None);
    }
}
