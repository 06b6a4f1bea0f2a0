//! CI's instruction-count gate: wsgate's instructions per relayed byte, counted by callgrind
//! over the lockstep windows (64 KiB and 64 B messages, metrics on), against a baseline committed
//! in the repository. Instruction counts repeat within about 0.5 % for the same binary
//! (docs/performance.md), which wall-clock figures on shared cores never do, so a rise of more
//! than [`TOLERANCE`] is a real regression in the relay.
//!
//! The counts belong to a toolchain: another rustc, valgrind or glibc, or a CPU with other
//! features (glibc picks its `memcpy` by them) moves them with no change to wsgate. Then the gate reports "re-baseline
//! needed" and passes, rather than blaming the code. A deliberate rise is re-baselined
//! (`scripts/gate --rebaseline`) in the same commit, with the reason in its message.

use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::callgrind::{Instructions, LARGE, SMALL, instructions_per_byte};
use crate::targets::Setup;

/// The largest rise in instructions per relayed byte, at either size, that still passes.
const TOLERANCE: f64 = 0.02;

/// What the baseline file holds.
#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct Baseline {
    environment: Environment,
    /// Instructions per relayed byte, 64 KiB messages.
    per_byte_64k: f64,
    /// Instructions per relayed byte, 64-byte messages.
    per_byte_64: f64,
}

/// What the counts depend on besides wsgate's code.
#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct Environment {
    rustc: String,
    valgrind: String,
    glibc: String,
    cpu: String,
}

/// Runs the gate: 0 when it passes (or a re-baseline is needed), 1 on a regression, 2 when it
/// cannot run. With `rebaseline`, writes this run's figures to `path` instead.
pub(crate) async fn run(path: &Path, rebaseline: bool) -> i32 {
    let environment = Environment::read();
    let (setup, _echo) = Setup::start();
    // The median of three: single 64 KiB windows have come out up to 1.7 % apart (how the
    // scheduler splits a message into reads), too close to the tolerance to trust one.
    let count = |window| tokio::task::block_in_place(|| instructions_per_byte("wsgate-ws", &setup, window, 3, true));
    let (Some(large), Some(small)) = (count(LARGE), count(SMALL)) else {
        eprintln!("gate: cannot count instructions: valgrind (callgrind) is missing or failed");
        return 2;
    };
    let now = Baseline { environment, per_byte_64k: large.all, per_byte_64: small.all };
    if rebaseline {
        let text = format!(
            "# CI's instruction-count baseline (benches/load/gate.rs): wsgate's instructions per relayed\n\
             # byte under callgrind, lockstep echo, metrics on. Re-take it with `scripts/gate --rebaseline`\n\
             # and say why in the commit message.\n{}",
            toml::to_string(&now).expect("plain fields serialise")
        );
        if let Err(e) = std::fs::write(path, text) {
            eprintln!("gate: write {}: {e}", path.display());
            return 2;
        }
        println!("gate: wrote {} ({})", path.display(), figures(&now, large, small));
        return 0;
    }
    let base: Baseline = match std::fs::read_to_string(path).map(|t| toml::from_str(&t)) {
        Ok(Ok(base)) => base,
        Ok(Err(e)) => {
            eprintln!("gate: {}: {}", path.display(), e.message());
            return 2;
        }
        Err(e) => {
            eprintln!("gate: read {}: {e}", path.display());
            return 2;
        }
    };
    println!(
        "gate: baseline {:.4} (64 KiB) and {:.4} (64 B) instructions per relayed byte",
        base.per_byte_64k, base.per_byte_64
    );
    println!("gate: this run {}", figures(&now, large, small));
    if base.environment != now.environment {
        println!(
            "gate: re-baseline needed: the toolchain differs from the baseline's, so the counts cannot be compared"
        );
        println!("gate:   baseline {:?}", base.environment);
        println!("gate:   this run {:?}", now.environment);
        return 0;
    }
    let mut failed = false;
    for (size, was, is) in
        [("64 KiB", base.per_byte_64k, now.per_byte_64k), ("64 B", base.per_byte_64, now.per_byte_64)]
    {
        let change = is / was - 1.0;
        let verdict = if change > TOLERANCE { "REGRESSION" } else { "ok" };
        println!(
            "gate: {size}: {was:.4} -> {is:.4} instructions per relayed byte ({:+.2} %): {verdict}",
            change * 100.0
        );
        failed |= change > TOLERANCE;
    }
    if failed {
        println!(
            "gate: FAILED: instructions per relayed byte rose more than {:.0} %; if the rise is deliberate, run \
             `scripts/gate --rebaseline` and give the reason in the commit message",
            TOLERANCE * 100.0
        );
        return 1;
    }
    println!("gate: passed (tolerance {:.0} %)", TOLERANCE * 100.0);
    0
}

fn figures(now: &Baseline, large: Instructions, small: Instructions) -> String {
    format!(
        "{:.4} (64 KiB) and {:.4} (64 B) instructions per relayed byte; outside memcpy/memset {:.4} and {:.4}",
        now.per_byte_64k, now.per_byte_64, large.outside_mem, small.outside_mem
    )
}

impl Environment {
    fn read() -> Environment {
        let first_line = |program: &str, args: &[&str]| {
            Command::new(program)
                .args(args)
                .output()
                .ok()
                .and_then(|o| String::from_utf8(o.stdout).ok())
                .and_then(|s| s.lines().next().map(|l| l.trim().to_string()))
                .unwrap_or_else(|| "unknown".into())
        };
        let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let field = |name: &str| {
            cpuinfo.lines().find_map(|l| Some(l.strip_prefix(name)?.split_once(':')?.1.trim().to_string()))
        };
        let flags = field("flags").unwrap_or_default();
        // The features glibc's memcpy/memset choice turns on.
        const MEMCPY_FEATURES: [&str; 9] =
            ["sse2", "ssse3", "avx", "avx2", "avx512f", "avx512vl", "avx512bw", "erms", "fsrm"];
        let features: Vec<&str> = flags.split_whitespace().filter(|f| MEMCPY_FEATURES.contains(f)).collect();
        let cpu = format!("{} [{}]", field("model name").as_deref().unwrap_or("unknown"), features.join(" "));
        Environment {
            rustc: first_line(&rustc, &["--version"]),
            valgrind: first_line("valgrind", &["--version"]),
            glibc: first_line("getconf", &["GNU_LIBC_VERSION"]),
            cpu,
        }
    }
}
