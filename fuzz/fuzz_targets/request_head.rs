//! A request head (first byte: over TLS or not) through host → route → admission, with the
//! invariants `harness.rs` asserts.

#![no_main]

#[path = "../harness.rs"]
mod harness;

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;

static GATE: LazyLock<harness::Gate> = LazyLock::new(harness::Gate::new);

fuzz_target!(|data: &[u8]| {
    GATE.check_bytes(data);
});
