//! The validated types of a route's pool: its members (`backends`), the balancing policy
//! (`balance`) and its health settings (`[routes.NAME.health]`).

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

/// A route's backends, the way a session picks one, and how their health is judged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    /// How a session's backend is picked.
    pub balance: Balance,
    /// The members in the configured order; names unique within the route.
    pub members: Vec<Member>,
    /// Active checks (if any) and passive ejection.
    pub health: Health,
}

/// One backend of a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its configured name: the `backend` metric label and what logs call it.
    pub name: String,
    /// Host name or IP literal (IPv6 without brackets), resolved at connect time.
    pub host: String,
    /// TCP port, never 0.
    pub port: u16,
    /// Its share of new sessions; 0 takes none (drained).
    pub weight: u32,
    /// Sessions it may have open at once (`None`: no cap).
    pub max_sessions: Option<usize>,
    /// Takes no new sessions; its live ones carry on.
    pub drain: bool,
}

impl Member {
    /// Whether it may take new sessions at all (weight above 0, not draining).
    pub fn in_rotation(&self) -> bool {
        self.weight > 0 && !self.drain
    }
}

/// How a pool picks the backend of a new session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// In turn, in proportion to the weights.
    RoundRobin,
    /// The member with the fewest open sessions for its weight.
    LeastSessions,
    /// A consistent hash of the client's address (IPv6 by /64): the same client lands on the
    /// same backend, and a member added or removed moves only about its share of clients.
    ClientHash,
}

impl Balance {
    /// The value as written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round_robin",
            Balance::LeastSessions => "least_sessions",
            Balance::ClientHash => "client_hash",
        }
    }
}

/// A pool's health settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// Active checks, if the route has a `[health]` table with `interval_secs` above 0.
    pub active: Option<ActiveCheck>,
    /// Consecutive failed connects (of sessions) that take a member out of rotation.
    pub eject_after_failures: u32,
    /// Without active checks, how long an ejected member stays out before it is tried again.
    pub eject_for: Duration,
}

/// One active check, repeated per member every `interval`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveCheck {
    /// Time between checks of one member.
    pub interval: Duration,
    /// Bound on one check: connect, send and expect.
    pub timeout: Duration,
    /// Consecutive passes that bring a member that is down back up.
    pub rise: u32,
    /// Consecutive failures that take a member that is up down.
    pub fall: u32,
    /// Bytes written after connecting (after the route's PROXY header, if any).
    pub send: Vec<u8>,
    /// Bytes the backend must send (anywhere in its first 4 KiB) for the check to pass.
    pub expect: Option<Vec<u8>>,
}

impl fmt::Display for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pool of {} ({})", self.members.len(), self.balance.as_str())
    }
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let target = if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        };
        write!(f, "{} {target} weight {}", self.name, self.weight)?;
        if let Some(cap) = self.max_sessions {
            write!(f, ", max_sessions {cap}")?;
        }
        if self.drain || self.weight == 0 {
            f.write_str(", draining")?;
        }
        Ok(())
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.active {
            Some(a) => write!(
                f,
                "checks every {:?} (timeout {:?}, rise {}, fall {}{}{})",
                a.interval,
                a.timeout,
                a.rise,
                a.fall,
                if a.send.is_empty() { "" } else { ", send" },
                if a.expect.is_some() { ", expect" } else { "" },
            )?,
            None => write!(f, "no active checks, ejected members retried after {:?}", self.eject_for)?,
        }
        write!(f, "; eject after {} failed connects", self.eject_after_failures)
    }
}
