//! Active health checks of pool members, run by one task the gateway owns (spawned by
//! `Gateway::run`, ended at shutdown) rather than by each config snapshot: at every reload it
//! is handed the new pools and checks their members from then on, while each member's state
//! (up, consecutive passes and failures) lives on in `pool::MemberState`.
//!
//! A check connects within `timeout`, writes the route's PROXY header for its own connection
//! (`proxy_protocol::local_header`) where the route sends one, then `send`, then waits for
//! `expect` in what the backend sends; `rise` passes in a row bring a member up, `fall`
//! failures in a row take it down.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::pool::{Pool, Pools};
use crate::config::ActiveCheck;
use crate::proxy_protocol::local_header;

/// Most bytes read while looking for `expect`.
const MAX_EXPECT_READ: usize = 4096;

/// Checks the members of the pools `pools` publishes until `stop`.
pub async fn run(pools: Arc<Pools>, stop: CancellationToken) {
    let mut published = pools.subscribe();
    loop {
        let current = published.borrow_and_update().clone();
        // Dropped (and so aborted) when the pools change: the loops of the new pools replace
        // them, with the members' states carried over.
        let mut checks = JoinSet::new();
        for pool in &current {
            if let Some(active) = &pool.health.active {
                for i in 0..pool.members.len() {
                    checks.spawn(check_member(pool.clone(), i, active.clone()));
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            changed = published.changed() => if changed.is_err() { return },
        }
    }
}

async fn check_member(pool: Arc<Pool>, i: usize, check: ActiveCheck) {
    let slot = &pool.members[i];
    let mut ticks = tokio::time::interval(check.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let result = tokio::time::timeout(check.timeout, probe(&pool, i, &check)).await.unwrap_or(Err("timed out"));
        let why = result.err().unwrap_or_default();
        slot.state.checked(result.is_ok(), &check, &pool.route, &slot.config.name, why);
    }
}

/// One check of member `i`; the error says what failed.
async fn probe(pool: &Pool, i: usize, check: &ActiveCheck) -> Result<(), &'static str> {
    let m = &pool.members[i].config;
    let mut stream =
        super::connect(&m.host, m.port, check.timeout, None, None).await.map_err(|e| e.failure().label())?;
    if let Some(version) = pool.proxy {
        stream.write_all(local_header(version)).await.map_err(|_| "write failed")?;
    }
    if !check.send.is_empty() {
        stream.write_all(&check.send).await.map_err(|_| "write failed")?;
    }
    let Some(expect) = &check.expect else { return Ok(()) };
    let mut got = Vec::with_capacity(256);
    let mut buf = [0u8; 512];
    while got.len() < MAX_EXPECT_READ {
        let n = stream.read(&mut buf).await.map_err(|_| "read failed")?;
        if n == 0 {
            return Err("closed before sending what is expected");
        }
        got.extend_from_slice(&buf[..n]);
        if got.windows(expect.len()).any(|w| w == expect.as_slice()) {
            return Ok(());
        }
    }
    Err("did not send what is expected")
}
