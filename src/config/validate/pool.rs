//! A route's backend keys: `backend` (one), or `backends` (a pool) with `balance` and
//! `[routes.NAME.health]`; the pool's defaults and bounds.

use std::sync::Arc;
use std::time::Duration;

use super::super::raw::{Choice, RawHealth, RawMember, Seconds};
use super::super::{ActiveCheck, Backend, Balance, Health, Member, Pool};
use super::Validator;

/// Members per pool: each is a metric label set and a health-check loop.
pub(super) const MAX_MEMBERS: usize = 256;
/// A member's weight: a share, not a count, so a small range is enough.
const MAX_WEIGHT: u64 = 256;
/// Longest member name (a metric label).
const MAX_NAME_BYTES: usize = 64;
/// HAProxy's `inter` default.
const DEFAULT_INTERVAL_SECS: f64 = 2.0;
const DEFAULT_TIMEOUT_SECS: f64 = 1.0;
/// HAProxy's `rise` and `fall` defaults.
const DEFAULT_RISE: u64 = 2;
const DEFAULT_FALL: u64 = 3;
/// Three refusals in a row are an outage, not bad luck (HAProxy's `error-limit` is 10 for all
/// errors; refused connects are a stronger signal).
const DEFAULT_EJECT_AFTER_FAILURES: u64 = 3;
/// Without active checks, an ejected member gets a new session after this long.
const DEFAULT_EJECT_SECS: f64 = 10.0;
/// Longest `send` or `expect`: a greeting or a probe, not a transcript.
const MAX_PROBE_BYTES: usize = 4096;

impl Validator<'_> {
    /// Where a route's sessions go: exactly one of `backend` and `backends`; `balance` and
    /// `health` only with `backends`.
    pub(super) fn route_backend(
        &mut self,
        key: &str,
        backend: Option<String>,
        backends: Option<Vec<RawMember>>,
        balance: Option<Choice<Balance>>,
        health: Option<RawHealth>,
    ) -> Option<Backend> {
        if backends.is_none() {
            if balance.is_some() {
                self.fail(format!("{key}.balance"), "only a route with `backends` (a pool) has a balance policy");
            }
            if health.is_some() {
                self.fail(format!("{key}.health"), "only a route with `backends` (a pool) has health checks");
            }
        }
        match (backend, backends) {
            (Some(_), Some(_)) => {
                self.fail(format!("{key}.backends"), "a route has either `backend` or `backends`, not both");
                None
            }
            (Some(value), None) => self.backend(&format!("{key}.backend"), &value),
            (None, Some(members)) => self.pool(key, members, balance, health).map(|p| Backend::Pool(Arc::new(p))),
            (None, None) => {
                self.fail(
                    format!("{key}.backend"),
                    "missing field: every route needs a backend (or `backends`, or a `targets` table)",
                );
                None
            }
        }
    }

    fn pool(
        &mut self,
        key: &str,
        raw: Vec<RawMember>,
        balance: Option<Choice<Balance>>,
        health: Option<RawHealth>,
    ) -> Option<Pool> {
        let balance = self.choice(&format!("{key}.balance"), balance, Balance::RoundRobin);
        let list_key = format!("{key}.backends");
        if raw.is_empty() || raw.len() > MAX_MEMBERS {
            self.fail(&list_key, format!("{} backends: a pool has 1 to {MAX_MEMBERS}", raw.len()));
            return None;
        }
        let mut members: Vec<Member> = Vec::with_capacity(raw.len());
        let mut ok = true;
        for m in raw {
            match self.member(&list_key, m) {
                Some(m) if members.iter().any(|o| o.name == m.name) => {
                    self.fail(&list_key, format!("the name {:?} is used twice: names are unique in a pool", m.name));
                    ok = false;
                }
                Some(m) => members.push(m),
                None => ok = false,
            }
        }
        let health = self.health(&format!("{key}.health"), health);
        ok.then_some(Pool { balance: balance?, members, health })
    }

    fn member(&mut self, list_key: &str, raw: RawMember) -> Option<Member> {
        let name_ok = !raw.name.is_empty()
            && raw.name.len() <= MAX_NAME_BYTES
            && raw.name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !name_ok {
            self.fail(
                format!("{list_key}.name"),
                format!("{:?} must be 1 to {MAX_NAME_BYTES} letters, digits, '-', '_' or '.'", raw.name),
            );
            return None;
        }
        let key = format!("{list_key}.{}", raw.name);
        let (host, port) = match self.backend(&format!("{key}.address"), &raw.address)? {
            Backend::Tcp { host, port } => (host, port),
            _ => {
                self.fail(format!("{key}.address"), format!("{:?}: a pool member is a host:port", raw.address));
                return None;
            }
        };
        let weight = self.count(&format!("{key}.weight"), raw.weight, 1, 0, MAX_WEIGHT);
        let cap = self.count(&format!("{key}.max_sessions"), raw.max_sessions, 0, 0, 1_000_000);
        Some(Member {
            name: raw.name,
            host,
            port,
            weight: weight as u32,
            max_sessions: (cap > 0).then_some(cap),
            drain: raw.drain.unwrap_or(false),
        })
    }

    fn health(&mut self, key: &str, raw: Option<RawHealth>) -> Health {
        let k = |name: &str| format!("{key}.{name}");
        let Some(raw) = raw else {
            return Health {
                active: None,
                eject_after_failures: DEFAULT_EJECT_AFTER_FAILURES as u32,
                eject_for: Duration::from_secs_f64(DEFAULT_EJECT_SECS),
            };
        };
        let eject_after_failures =
            self.count(&k("eject_after_failures"), raw.eject_after_failures, DEFAULT_EJECT_AFTER_FAILURES, 0, 1000)
                as u32;
        let eject_for = self.seconds(&k("eject_secs"), raw.eject_secs, DEFAULT_EJECT_SECS);
        let interval = match raw.interval_secs {
            Some(Seconds::Whole(0)) => None,
            Some(Seconds::Fraction(0.0)) => None,
            other => Some(self.seconds(&k("interval_secs"), other, DEFAULT_INTERVAL_SECS)),
        };
        let timeout = self.seconds(&k("timeout_secs"), raw.timeout_secs, DEFAULT_TIMEOUT_SECS);
        let rise = self.count(&k("rise"), raw.rise, DEFAULT_RISE, 1, 100) as u32;
        let fall = self.count(&k("fall"), raw.fall, DEFAULT_FALL, 1, 100) as u32;
        let send = self.probe(&k("send"), raw.send).unwrap_or_default();
        let expect = self.probe(&k("expect"), raw.expect);
        if expect.as_ref().is_some_and(Vec::is_empty) {
            self.fail(k("expect"), "must not be empty (leave it out to pass on connect)");
        }
        let active = match interval {
            None => {
                if !send.is_empty() || expect.is_some() {
                    self.fail(k("interval_secs"), "is 0 (no active checks), so `send` and `expect` are never used");
                }
                None
            }
            Some(interval) => {
                if timeout > interval {
                    self.fail(k("timeout_secs"), format!("{timeout:?} is longer than interval_secs ({interval:?})"));
                }
                Some(ActiveCheck { interval, timeout, rise, fall, send, expect })
            }
        };
        Health { active, eject_after_failures, eject_for }
    }

    fn probe(&mut self, key: &str, value: Option<String>) -> Option<Vec<u8>> {
        let value = value?;
        if value.len() > MAX_PROBE_BYTES {
            self.fail(key, format!("is {} bytes; at most {MAX_PROBE_BYTES}", value.len()));
        }
        Some(value.into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::{MINIMAL, err as errors, ok};
    use crate::config::{Backend, Balance};

    const POOL: &str = r#"
[listeners.main]
address = "127.0.0.1:0"
[routes.mqtt]
path = "/mqtt"
balance = "least_sessions"
backends = [
  { name = "a", address = "10.0.0.1:1883" },
  { name = "b", address = "[::1]:1883", weight = 3, max_sessions = 50 },
  { name = "c", address = "broker-c:1883", drain = true },
]
[routes.mqtt.health]
interval_secs = 5
expect = "RFB "
"#;

    /// A pool reads with its defaults; each member keeps its order and settings.
    #[test]
    fn a_pool_reads_with_defaults() {
        let c = ok(POOL);
        let Backend::Pool(p) = &c.routes[0].backend else { panic!("not a pool: {:?}", c.routes[0].backend) };
        assert_eq!(p.balance, Balance::LeastSessions);
        let names: Vec<_> = p.members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!((p.members[0].weight, p.members[0].max_sessions, p.members[0].drain), (1, None, false));
        assert_eq!((p.members[1].host.as_str(), p.members[1].weight, p.members[1].max_sessions), ("::1", 3, Some(50)));
        assert!(p.members[2].drain && !p.members[2].in_rotation());
        let active = p.health.active.as_ref().unwrap();
        assert_eq!((active.interval.as_secs(), active.rise, active.fall), (5, 2, 3));
        assert_eq!(active.expect.as_deref(), Some(&b"RFB "[..]));
        assert_eq!(p.health.eject_after_failures, 3);
    }

    /// Each mistake is one line naming its key.
    #[test]
    fn pool_mistakes_name_their_key() {
        let both = MINIMAL.replace("backend = ", "backends = [{ name = \"a\", address = \"h:1\" }]\nbackend = ");
        assert!(
            errors(&both).contains("routes.echo.backends: a route has either `backend` or `backends`"),
            "{}",
            errors(&both)
        );
        let twice = POOL.replace("name = \"b\"", "name = \"a\"");
        assert!(errors(&twice).contains("the name \"a\" is used twice"), "{}", errors(&twice));
        let bad = POOL.replace("10.0.0.1:1883", "10.0.0.1");
        assert!(errors(&bad).contains("routes.mqtt.backends.a.address"), "{}", errors(&bad));
        let policy = POOL.replace("least_sessions", "random");
        assert!(errors(&policy).contains("routes.mqtt.balance"), "{}", errors(&policy));
        let slow = POOL.replace("interval_secs = 5", "interval_secs = 1\ntimeout_secs = 2");
        assert!(errors(&slow).contains("routes.mqtt.health.timeout_secs"), "{}", errors(&slow));
        let lone = MINIMAL.replace("backend = ", "balance = \"client_hash\"\nbackend = ");
        assert!(errors(&lone).contains("routes.echo.balance: only a route with `backends`"), "{}", errors(&lone));
        let empty = POOL.replace("expect = \"RFB \"", "expect = \"\"");
        assert!(errors(&empty).contains("routes.mqtt.health.expect"), "{}", errors(&empty));
    }
}
