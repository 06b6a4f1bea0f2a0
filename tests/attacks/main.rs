//! wsgate under attack: floods, slowloris and hostile sessions, each asserting what ordinary
//! clients still get and what memory stays at.
//!
//! A test binary of its own because what these tests assert depends on the machine's cores:
//! cargo runs test binaries one after another, so the attacks never compete with the rest of
//! the suite (tests/e2e) for CPU, and within this binary they run one at a time.

#[path = "../e2e/support/mod.rs"]
mod support;

/// Admission under attack: per-client caps, the handshake pool, route caps, the memory budget.
mod limits;
/// Memory per session under hostile clients, on a gateway process of its own.
mod memory;
/// The handshake queue under attack: waiting for a pool place, a client's share, a connect place.
mod queue;

/// The attacks open thousands of sockets each; one at a time keeps the suite within its
/// file-descriptor limit and gives each attack the machine it is measured on.
static ONE_ATTACK_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
