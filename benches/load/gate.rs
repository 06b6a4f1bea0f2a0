//! CI's gate: wsgate's instructions per relayed byte, counted by callgrind over the lockstep
//! windows (64 KiB and 64 B messages, metrics on), and the memory of an idle ws and wss session,
//! against a baseline committed in the repository. Instruction counts repeat within about 0.5 %
//! for the same binary (docs/performance.md), which wall-clock figures on shared cores never do,
//! so a rise of more than [`TOLERANCE`] is a real regression in the relay. Idle memory repeats
//! within about 0.3 KiB; a rise of more than [`MEMORY_TOLERANCE_KIB`] means every idle session
//! holds more (a session future grown by a new field kept across the relay, a buffer kept).
//!
//! The counts belong to a toolchain: another rustc, valgrind or glibc, or a CPU with other
//! features (glibc picks its `memcpy` by them) moves them with no change to wsgate. Then the gate reports "re-baseline
//! needed" and passes, rather than blaming the code. A deliberate rise is re-baselined
//! (`scripts/gate --rebaseline`) in the same commit, with the reason in its message.

use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::callgrind::{Instructions, LARGE, SMALL, instructions_per_byte};
use crate::targets::{Setup, start_targets};

/// The largest rise in instructions per relayed byte, at either size, that still passes.
const TOLERANCE: f64 = 0.02;

/// The largest rise in KiB per idle session, ws or wss, that still passes.
const MEMORY_TOLERANCE_KIB: f64 = 0.75;

/// Idle sessions held for the memory figure: the slope of resident memory between the two.
const IDLE_SESSIONS: (usize, usize) = (500, 3000);

/// What the baseline file holds.
#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct Baseline {
    environment: Environment,
    /// Instructions per relayed byte, 64 KiB messages.
    per_byte_64k: f64,
    /// Instructions per relayed byte, 64-byte messages.
    per_byte_64: f64,
    /// KiB of resident memory per idle ws session.
    #[serde(default)]
    idle_kib_ws: Option<f64>,
    /// KiB of resident memory per idle wss session.
    #[serde(default)]
    idle_kib_wss: Option<f64>,
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
    let (idle_kib_ws, idle_kib_wss) = tokio::task::block_in_place(|| idle_memory(&setup));
    let now = Baseline { environment, per_byte_64k: large.all, per_byte_64: small.all, idle_kib_ws, idle_kib_wss };
    if rebaseline {
        let text = format!(
            "# CI's gate baseline (benches/load/gate.rs): wsgate's instructions per relayed byte under\n\
             # callgrind, lockstep echo, metrics on; KiB per idle ws and wss session. Re-take it with\n\
             # `scripts/gate --rebaseline` and say why in the commit message.\n{}",
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
    let mut failed = memory(&base, &now);
    if base.environment != now.environment {
        println!(
            "gate: re-baseline needed: the toolchain differs from the baseline's, so the counts cannot be compared"
        );
        println!("gate:   baseline {:?}", base.environment);
        println!("gate:   this run {:?}", now.environment);
        return if failed { fail() } else { 0 };
    }
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
        return fail();
    }
    println!("gate: passed (tolerance {:.0} %, {MEMORY_TOLERANCE_KIB} KiB)", TOLERANCE * 100.0);
    0
}

/// Says why the gate failed and what to do about a deliberate rise; the exit code of a failure.
fn fail() -> i32 {
    println!(
        "gate: FAILED: instructions per relayed byte rose more than {:.0} %, or idle memory more than \
         {MEMORY_TOLERANCE_KIB} KiB per session; if the rise is deliberate, run `scripts/gate --rebaseline` \
         and give the reason in the commit message",
        TOLERANCE * 100.0
    );
    1
}

/// KiB per idle ws and wss session of wsgate at its defaults, as the benchmark's idle figure
/// measures it, with fewer sessions.
fn idle_memory(setup: &Setup) -> (Option<f64>, Option<f64>) {
    let ca_pem = setup.dir.path().join("ca.pem");
    std::fs::write(&ca_pem, std::fs::read(&setup.cert).unwrap()).unwrap();
    let targets = start_targets(setup, &Some("wsgate-ws,wsgate-wss".into()), "");
    let kib = |name: &str| {
        let t = targets.iter().find(|t| t.name == name)?;
        crate::measure::idle_memory(t, &ca_pem, IDLE_SESSIONS.0, IDLE_SESSIONS.1)
    };
    (kib("wsgate-ws"), kib("wsgate-wss"))
}

/// Compares idle memory when the baseline has it and rustc and glibc are the baseline's (they
/// decide a session's layout and what its allocations cost; the CPU does not). Prints each
/// figure; true on a regression.
fn memory(base: &Baseline, now: &Baseline) -> bool {
    let comparable = base.environment.rustc == now.environment.rustc && base.environment.glibc == now.environment.glibc;
    let mut failed = false;
    for (scheme, was, is) in [("ws", base.idle_kib_ws, now.idle_kib_ws), ("wss", base.idle_kib_wss, now.idle_kib_wss)] {
        match (was, is) {
            (Some(was), Some(is)) if comparable => {
                let regressed = is - was > MEMORY_TOLERANCE_KIB;
                let verdict = if regressed { "REGRESSION" } else { "ok" };
                println!("gate: idle {scheme}: {was:.2} -> {is:.2} KiB per session ({:+.2} KiB): {verdict}", is - was);
                failed |= regressed;
            }
            (_, Some(is)) => println!("gate: idle {scheme}: {is:.2} KiB per session (no comparable baseline)"),
            (_, None) => {
                println!("gate: idle {scheme}: could not be measured");
                failed = true;
            }
        }
    }
    failed
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
