//! wsgate's load generator: measures, in one run and side by side, direct TCP to an echo
//! backend (the machine's limit), a plain TCP relay built here (what any relay that copies bytes
//! can do), a bare WebSocket→TCP bridge built here from the same libraries (the floor our
//! dependencies allow), wsgate over ws and wss with its default limits and metrics, and peers
//! (websocat, websockify) when they are installed.
//!
//! `cargo bench --bench load` runs everything (about 12 minutes on 2 cores); `-- --quick` is a
//! shorter pass for development. Results: a markdown table on stdout, plus
//! `target/bench/results.md` and `target/bench/chart.svg`. docs/performance.md explains each
//! figure and holds a reference run.
//!
//! Every wall-clock figure is the median of interleaved runs (target A, B, C, A, B, C, ...), so
//! drift in the machine's load hits every target alike, and is shown with the median of its
//! per-run ratios to the bare bridge. Relays under test and the echo backend run in processes of
//! their own; the clients run in this process, except for the idle-memory test, where clients
//! are held by a child process so the 2 descriptors per session stay within limits.
//!
//! The same binary plays helper roles (`bare-bridge`, `tcp-relay`, `backend`, `hold`,
//! `storm-clients`), started by
//! the orchestrator, and `drive`, which measures one figure against any endpoint. With `--gate`
//! it is CI's instruction-count gate instead (`scripts/gate`, [`gate`]).
//!
//! # Layout
//!
//! - `main`: the arguments and the run that measures every target and writes the results.
//! - [`targets`]: the relays under test and where to reach them.
//! - [`client`]: TLS, the upgrade, and the cheap WebSocket client the figures are driven with.
//! - [`measure`]: wall-clock and memory figures.
//! - [`callgrind`]: instruction counts, per relayed byte and per wss handshake.
//! - [`handshake`]: full and resumed wss handshakes, told apart, and resumption across a reload.
//! - [`storm`]: the reconnect storm (5,000 wss clients from 64 addresses at once).
//! - [`gate`]: the instruction counts compared with the committed baseline.
//! - [`roles`]: the helper roles (baselines, backends, the session holder, `drive`).
//! - [`report`]: the table and the chart.

mod callgrind;
mod client;
mod gate;
mod handshake;
mod measure;
mod report;
mod roles;
mod storm;
mod targets;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::callgrind::{HANDSHAKES, LARGE, SMALL, Split, instructions_per_byte, instructions_per_handshake};
use crate::client::*;
use crate::handshake::Handshake;
use crate::measure::*;
use crate::report::{render_chart, render_handshakes, render_table};
use crate::roles::*;
use crate::targets::*;

#[derive(Parser)]
#[command(about = "wsgate load generator: side-by-side throughput, latency, memory and handshake figures")]
struct Args {
    #[command(subcommand)]
    role: Option<Role>,
    /// Shorter runs and fewer repetitions, for development.
    #[arg(long)]
    quick: bool,
    /// Interleaved repetitions per figure (median reported); default 5, or 1 with --quick.
    #[arg(long)]
    runs: Option<usize>,
    /// Skip the valgrind (callgrind) instruction counts.
    #[arg(long)]
    no_callgrind: bool,
    /// Only the callgrind instruction counts (no wall-clock or memory figures).
    #[arg(long)]
    callgrind_only: bool,
    /// callgrind windows per figure (median reported); default 3, or 1 with --quick.
    #[arg(long)]
    callgrind_repeats: Option<usize>,
    /// CI's gate: count wsgate's instructions per relayed byte (64 KiB and 64 B lockstep
    /// messages) and compare them with the baseline in this file; nothing else is measured.
    #[arg(long, value_name = "BASELINE")]
    gate: Option<PathBuf>,
    /// With --gate: write this run's counts and toolchain as the new baseline.
    #[arg(long, requires = "gate")]
    rebaseline: bool,
    /// Only these targets and figures (comma-separated names, e.g. "bare-ws,wsgate-ws"). Target
    /// names alone: every figure of the table for those targets. Figure names ("handshakes",
    /// "storm") run only those figures, for the wss targets named (default: bare-wss and
    /// wsgate-wss). The storm runs in a run without --only, or when named.
    #[arg(long)]
    only: Option<String>,
    /// Clients in the reconnect storm.
    #[arg(long, default_value_t = storm::SHAPE.clients)]
    storm_clients: usize,
    /// Extra `[limits]` lines for the wsgate under test, e.g. "ws_read_buffer_bytes = 4096".
    #[arg(long, default_value = "")]
    wsgate_limits: String,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true, global = true)]
    bench: bool,
}

#[derive(Subcommand)]
enum Role {
    /// A bare bridge: tokio-tungstenite server → TCP, two copy loops, 16 KiB read buffer.
    #[command(hide = true)]
    BareBridge {
        #[arg(long)]
        backend: SocketAddr,
        /// PEM certificate and key: serve wss.
        #[arg(long, num_args = 2)]
        tls: Option<Vec<PathBuf>>,
    },
    /// A plain TCP relay: TCP in, TCP to the backend, two copy loops with 64 KiB buffers.
    #[command(hide = true)]
    TcpRelay {
        #[arg(long)]
        backend: SocketAddr,
    },
    /// Drives load at any endpoint (a deployed wsgate, a peer, a backend) and prints one figure.
    Drive {
        /// `ws://host:port/path`, `wss://host:port/path` or `tcp://host:port`.
        url: String,
        /// What to measure.
        #[arg(long, value_enum, default_value = "echo")]
        mode: Mode,
        /// Concurrent sessions.
        #[arg(long, default_value_t = 1)]
        sessions: usize,
        /// Message size, bytes (TCP: write size).
        #[arg(long, default_value_t = 64 * 1024)]
        size: usize,
        /// Measuring window, seconds (after a warm-up of a fifth of it).
        #[arg(long, default_value_t = 5.0)]
        secs: f64,
        /// PEM CA certificate to trust for wss (the default trusts no one).
        #[arg(long)]
        ca: Option<PathBuf>,
    },
    /// A TCP backend: echo (sends back what it reads), sink (discards), source (sends without end).
    Backend {
        #[arg(value_enum)]
        kind: BackendKind,
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    /// Reconnect storm clients: waits for "go", connects all at once, holds until "close".
    #[command(hide = true)]
    StormClients {
        #[arg(long)]
        url: String,
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        offset: usize,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        sources: usize,
    },
    /// Opens and holds WebSocket sessions until standard input closes.
    #[command(hide = true)]
    Hold {
        #[arg(long)]
        url: String,
        #[arg(long)]
        count: usize,
        /// PEM CA certificate to trust (wss).
        #[arg(long)]
        ca: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
enum Mode {
    /// Send messages as fast as they are taken; count the bytes that come back (echo backend).
    Echo,
    /// Send messages as fast as they are taken; count the bytes sent (sink backend).
    Send,
    /// Send nothing; count the bytes received (source backend).
    Receive,
    /// Round trips: send one message, wait for all of it to come back, repeat (echo backend).
    Rtt,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
enum BackendKind {
    Echo,
    Sink,
    Source,
}

fn main() {
    let args = Args::parse();
    if let Some(Role::StormClients { url, ca, offset, count, sources }) = args.role {
        // One thread per storm process: the figure states how many processes drive it.
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
        return rt.block_on(storm::clients(url, ca, offset, count, sources));
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match args.role {
        Some(Role::StormClients { .. }) => unreachable!("handled above"),
        Some(Role::BareBridge { backend, tls }) => rt.block_on(bare_bridge(backend, tls)),
        Some(Role::TcpRelay { backend }) => rt.block_on(tcp_relay(backend)),
        Some(Role::Hold { url, count, ca }) => rt.block_on(hold(url, count, ca)),
        Some(Role::Drive { url, mode, sessions, size, secs, ca }) => {
            let at = Endpoint::parse(&url).unwrap_or_else(|e| {
                eprintln!("drive: {e}");
                std::process::exit(2)
            });
            rt.block_on(drive(&at, mode, sessions, size, Duration::from_secs_f64(secs), ca.as_deref()))
        }
        Some(Role::Backend { kind, listen }) => rt.block_on(backend(kind, listen)),
        None if args.gate.is_some() => {
            let baseline = args.gate.as_deref().expect("checked");
            std::process::exit(rt.block_on(gate::run(baseline, args.rebaseline)))
        }
        None => rt.block_on(orchestrate(&args)),
    }
}

// ---------------------------------------------------------------------------------------------
// The run

#[derive(Default, Clone)]
pub(crate) struct Row {
    name: &'static str,
    mbps_1x64k: Vec<f64>,
    mbps_50x4k: Vec<f64>,
    rtt1: Vec<[f64; 3]>,
    rtt50: Vec<[f64; 3]>,
    /// wss handshakes per second, full and resumed, one per wall-clock window.
    hs_full: Vec<f64>,
    hs_resumed: Vec<f64>,
    /// Handshakes of the resumed windows that were not resumed (the figure then fails).
    hs_not_resumed: u64,
    /// callgrind instructions per wss session opened and closed, full and resumed.
    hs_instr_full: Option<Split>,
    hs_instr_resumed: Option<Split>,
    cpu_per_gib: Vec<f64>,
    idle_kib: Option<f64>,
    instr_per_byte: Option<f64>,
}

pub(crate) fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[s.len() / 2]
}

pub(crate) fn median3(v: &[[f64; 3]]) -> [f64; 3] {
    let col = |i: usize| median(&v.iter().map(|r| r[i]).collect::<Vec<_>>());
    [col(0), col(1), col(2)]
}

async fn orchestrate(args: &Args) {
    let quick = args.quick;
    let runs = args.runs.unwrap_or(if quick { 1 } else { 5 });
    let secs = if quick { 0.5 } else { 1.0 };
    let dur = Duration::from_secs_f64(secs);
    // Tail latencies need more samples than throughput does: p99.9 of 1 s at one session is a
    // handful of round trips.
    let rtt_dur = dur * 2;
    // `--only` names targets, figures, or both (see its help).
    const FIGURES: [&str; 2] = ["handshakes", "storm"];
    let named: Vec<&str> = args.only.as_deref().map_or(Vec::new(), |o| o.split(',').collect());
    let figures: Vec<&str> = named.iter().copied().filter(|n| FIGURES.contains(n)).collect();
    let table = figures.is_empty();
    let do_handshakes = table || figures.contains(&"handshakes");
    let do_storm = args.only.is_none() || figures.contains(&"storm");
    let target_names: Vec<&str> = named.iter().copied().filter(|n| !FIGURES.contains(n)).collect();
    let only = match (target_names.is_empty(), table) {
        (false, _) => Some(target_names.join(",")),
        (true, true) => None,
        (true, false) => Some("bare-wss,wsgate-wss".to_string()),
    };
    // Handshake windows: 3 s each (5 of them in a full run), the targets taking turns.
    let hs_dur = if quick { Duration::from_secs(1) } else { Duration::from_secs(3) };
    let (setup, _echo) = Setup::start();
    let ca_pem = setup.dir.path().join("ca.pem");
    std::fs::write(&ca_pem, std::fs::read(&setup.cert).unwrap()).unwrap();
    let tls = client_tls(&setup.ca_der);
    let mut targets = start_targets(&setup, &only, &args.wsgate_limits);
    eprintln!(
        "targets: {} ({} interleaved runs of {secs} s per figure)",
        targets.iter().map(|t| t.name).collect::<Vec<_>>().join(", "),
        runs
    );
    let mut rows: Vec<Row> = targets.iter().map(|t| Row { name: t.name, ..Row::default() }).collect();

    for run in 0..if args.callgrind_only { 0 } else { runs } {
        for (t, row) in targets.iter().zip(rows.iter_mut()) {
            if table {
                table_figures(t, row, &tls, dur, rtt_dur, (run, runs)).await;
            }
            if do_handshakes && t.at.kind == Kind::Wss {
                eprint!("\rrun {}/{runs}: {:<11} handshakes      ", run + 1, t.name);
                let full = handshake::window(&t.at, &setup.ca_der, Handshake::Full, hs_dur).await;
                let resumed = handshake::window(&t.at, &setup.ca_der, Handshake::Resumed, hs_dur).await;
                row.hs_full.push(full.per_sec);
                row.hs_resumed.push(resumed.per_sec);
                row.hs_not_resumed += resumed.wrong_kind;
            }
        }
    }
    // The round-trip target (p99 at 50 sessions against the bare bridge) is the noisiest figure
    // on 2 shared cores: one run's p99 moves by ±20 %. It gets paired windows of its own, the two
    // relays alternating (and swapping who goes first), and the median and quartiles of the
    // per-pair ratios are reported.
    let mut rtt_pairs = Vec::new();
    let pair = ["bare-ws", "wsgate-ws"].map(|n| targets.iter().find(|t| t.name == n));
    if let ([Some(bare), Some(gate)], false, true) = (pair, args.callgrind_only, table) {
        let rounds = if quick { 3 } else { 15 };
        for round in 0..rounds {
            eprint!("\rround trips, paired: {}/{rounds}            ", round + 1);
            let p99 = |t: &Target| {
                let at = t.at.clone();
                let tls = tls.clone();
                async move { percentile(&latency(&at, &tls, 50, 64, rtt_dur).await, 0.99).as_secs_f64() }
            };
            let (b, g) = if round % 2 == 0 {
                let b = p99(bare).await;
                (b, p99(gate).await)
            } else {
                let g = p99(gate).await;
                (p99(bare).await, g)
            };
            rtt_pairs.push(g / b);
        }
    }
    for (t, row) in targets.iter_mut().zip(rows.iter_mut()) {
        if t.at.kind == Kind::Tcp || args.callgrind_only || !table {
            continue;
        }
        let (low, high) = if quick { (100, 1000.min(t.max_idle)) } else { (t.max_idle / 8, t.max_idle) };
        eprint!("\ridle memory: {:<11} {low} → {high} sessions      ", t.name);
        row.idle_kib = tokio::task::block_in_place(|| idle_memory(t, &ca_pem, low, high));
    }
    // Metrics on vs. off, per relayed byte: with 64 KiB messages (the table's figure) and with
    // 64-byte ones, where the per-message cost of recording is largest relative to the bytes.
    let mut metrics_cost = Vec::new();
    let mut small_vs_bare = None;
    let mut large_counts = Vec::new();
    if !args.no_callgrind && table {
        let scale = if quick { 4 } else { 1 };
        let (large, small) = ((LARGE.0, LARGE.1 / scale), (SMALL.0, SMALL.1 / scale));
        let repeats = args.callgrind_repeats.unwrap_or(if quick { 1 } else { 3 });
        let count = |name: &str, window: (usize, usize), metrics: bool| {
            eprint!("\rcallgrind: {name:<11} {} B, metrics {}      ", window.0, if metrics { "on" } else { "off" });
            tokio::task::block_in_place(|| instructions_per_byte(name, &setup, window, repeats, metrics))
        };
        for row in rows.iter_mut().filter(|r| r.name == "bare-ws" || r.name == "wsgate-ws") {
            let counted = count(row.name, large, true);
            row.instr_per_byte = counted.map(|c| c.all);
            large_counts.push((row.name, counted));
        }
        if let Some(on) = large_counts.iter().find(|r| r.0 == "wsgate-ws").and_then(|r| r.1) {
            let small_on = count("wsgate-ws", small, true);
            for (window, on) in [(large, Some(on)), (small, small_on)] {
                if let (Some(on), Some(off)) = (on, count("wsgate-ws", window, false)) {
                    metrics_cost.push((window.0, on.all, off.all));
                }
            }
            // The round-trip target is about small messages: the instruction count to set
            // beside its wall-clock figure.
            if rows.iter().any(|r| r.name == "bare-ws") {
                small_vs_bare = small_on.zip(count("bare-ws", small, true));
            }
        }
    }
    let mut extra = String::new();
    if do_handshakes && !args.no_callgrind {
        let (count, repeats) = (
            if quick { HANDSHAKES / 4 } else { HANDSHAKES },
            args.callgrind_repeats.unwrap_or(if quick { 1 } else { 3 }),
        );
        let mut spread = 0.0_f64;
        for row in rows.iter_mut().filter(|r| r.name == "bare-wss" || r.name == "wsgate-wss") {
            for kind in [Handshake::Full, Handshake::Resumed] {
                eprint!("\rcallgrind: {:<11} {count} {kind:?} handshakes      ", row.name);
                let n =
                    tokio::task::block_in_place(|| instructions_per_handshake(row.name, &setup, kind, count, repeats));
                spread = spread.max(n.map_or(0.0, |n| n.1));
                *if kind == Handshake::Full { &mut row.hs_instr_full } else { &mut row.hs_instr_resumed } =
                    n.map(|n| n.0);
            }
        }
        extra += &format!(
            "\n(callgrind: {count} handshakes in lockstep per window, median of {repeats} windows; the windows of \
             each figure within {:.2} % of each other)\n",
            spread * 100.0
        );
    }
    if do_handshakes && !args.callgrind_only && targets.iter().any(|t| t.name == "wsgate-wss") {
        eprint!("\rhandshakes: resumption across a SIGHUP                ");
        extra += &format!("\n{}\n", handshake::resumed_after_reload(&setup, &args.wsgate_limits, 20).await);
    }
    if do_storm && !args.callgrind_only {
        let shape = storm::Shape { clients: args.storm_clients, ..storm::SHAPE };
        let mut storms = String::new();
        for t in targets.iter().filter(|t| t.name == "bare-wss" || t.name == "wsgate-wss") {
            eprint!("\rstorm: {:<11} {} clients                ", t.name, shape.clients);
            let s = tokio::task::block_in_place(|| storm::run(t.name, &setup, &ca_pem, shape, &args.wsgate_limits));
            storms += &s.report();
            for line in &s.refusals {
                extra += &format!("\n{} after the storm: `{line}`", s.name);
            }
        }
        if !storms.is_empty() {
            extra = format!("\n{}{storms}{extra}\n", storm::Storm::header(shape));
        }
    }
    eprintln!("\rdone.                                                     ");
    drop(targets);
    let mut table = if table { render_table(&rows, runs) } else { String::new() };
    if do_handshakes && rows.iter().any(|r| r.name.ends_with("wss")) {
        table += &render_handshakes(&rows, runs);
    }
    table += &extra;
    if !rtt_pairs.is_empty() {
        rtt_pairs.sort_by(f64::total_cmp);
        let q = |p: f64| rtt_pairs[((rtt_pairs.len() - 1) as f64 * p).round() as usize];
        table += &format!(
            "\nwsgate-ws vs. bare-ws, RTT p99 at 50 sessions × 64 B, {} paired {}-s windows: median ratio {:.2}× (quartiles {:.2}-{:.2}×)\n",
            rtt_pairs.len(),
            rtt_dur.as_secs_f64(),
            q(0.5),
            q(0.25),
            q(0.75)
        );
    }
    for (size, on, off) in metrics_cost {
        table += &format!(
            "\nwsgate-ws metrics on vs. off (callgrind, {size} B messages): {on:.4} vs. {off:.4} instructions per relayed byte ({:+.2} %)\n",
            (on / off - 1.0) * 100.0
        );
    }
    let large_of = |name: &str| large_counts.iter().find(|c| c.0 == name).and_then(|c| c.1);
    let large_pair = large_of("wsgate-ws").zip(large_of("bare-ws"));
    for (size, pair) in [("64 KiB", large_pair), ("64 B", small_vs_bare)] {
        if let Some((gate, bare)) = pair {
            table += &format!(
                "\nwsgate-ws vs. bare-ws (callgrind, {size} messages), instructions per relayed byte: {:.2} vs. {:.2} ({:.2}×); outside memcpy/memset: {:.2} vs. {:.2} ({:.2}×)\n",
                gate.all,
                bare.all,
                gate.all / bare.all,
                gate.outside_mem,
                bare.outside_mem,
                gate.outside_mem / bare.outside_mem
            );
        }
    }
    println!("{table}");
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("results.md"), &table).unwrap();
    std::fs::write(out.join("chart.svg"), render_chart(&rows)).unwrap();
    eprintln!("wrote {}/results.md and chart.svg", out.display());
}

/// One run's table figures for one target: throughput (with the relay's CPU), round trips.
async fn table_figures(
    t: &Target,
    row: &mut Row,
    tls: &tokio_rustls::TlsConnector,
    dur: Duration,
    rtt_dur: Duration,
    (run, runs): (usize, usize),
) {
    eprint!("\rrun {}/{runs}: {:<11} throughput      ", run + 1, t.name);
    let cpu0 = t.pid().map(cpu_secs);
    let bps = throughput(&t.at, tls, Mode::Echo, 1, 64 * 1024, dur).await;
    if let (Some(c0), Some(pid)) = (cpu0, t.pid()) {
        // Bytes relayed: the echoed bytes crossed the relay twice.
        let relayed = bps * (dur.as_secs_f64() * 1.2) * 2.0;
        row.cpu_per_gib.push((cpu_secs(pid) - c0) / (relayed / (1u64 << 30) as f64));
    }
    row.mbps_1x64k.push(bps / 1e6);
    row.mbps_50x4k.push(throughput(&t.at, tls, Mode::Echo, 50, 4096, dur).await / 1e6);
    eprint!("\rrun {}/{runs}: {:<11} latency         ", run + 1, t.name);
    let one = latency(&t.at, tls, 1, 64, rtt_dur).await;
    let fifty = latency(&t.at, tls, 50, 64, rtt_dur).await;
    let us = |s: &[Duration]| [0.5, 0.99, 0.999].map(|p| percentile(s, p).as_secs_f64() * 1e6);
    row.rtt1.push(us(&one));
    row.rtt50.push(us(&fifty));
}
