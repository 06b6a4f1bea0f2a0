//! Liveness: `TCP_USER_TIMEOUT` on a backend whose packets are dropped (in a network namespace
//! of the test's own).

mod netns;
