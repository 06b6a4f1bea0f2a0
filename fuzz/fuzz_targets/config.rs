//! Config text through `wsgate::config::parse`: no panic, one line per problem.

#![no_main]

#[path = "../harness.rs"]
mod harness;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    harness::check_config(data);
});
