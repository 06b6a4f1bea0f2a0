//! Instruction counts from callgrind: repeatable where wall-clock figures are not, so they are
//! what CI's regression gate compares.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::client::*;
use crate::handshake::{self, Handshake};
use crate::median;
use crate::targets::*;

/// Instructions per relayed byte, from callgrind: all of them, and those outside glibc's
/// `memcpy`/`memmove`/`memset`. Those functions copy and fill large buffers with `rep movsb` and
/// `rep stosb`, which callgrind counts as one instruction per byte moved: a zero-filled read
/// buffer then weighs by its size, not by its cost (the bare bridge's 16 KiB zero-fill before each
/// read is 70 % of its count at 64 B and a fraction of a percent of its CPU time in `perf`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Instructions {
    pub(crate) all: f64,
    pub(crate) outside_mem: f64,
}

/// The lockstep windows counted: message size and number of round trips. 64 KiB messages show
/// the cost per byte moved; 64-byte ones the cost per message.
pub(crate) const LARGE: (usize, usize) = (64 * 1024, 256);
/// See [`LARGE`].
pub(crate) const SMALL: (usize, usize) = (64, 4096);

/// Instructions per relayed byte, from callgrind: the relay runs under callgrind, one session
/// warms up, the counters are zeroed (`callgrind_control -z`), `messages` messages of `size`
/// bytes go through in lockstep, and the counters are dumped (`callgrind_control -d`). Counting
/// only that window leaves out start-up and shutdown, whose counts move with wall-clock time
/// (quanta calibrating its clock for metrics-exporter-prometheus runs for a set time, not a set
/// number of instructions), so repeated runs agree within about 0.1 %.
pub(crate) fn instructions_per_byte(
    name: &str,
    setup: &Setup,
    (size, messages): (usize, usize),
    repeats: usize,
    metrics: bool,
) -> Option<Instructions> {
    if !which("valgrind") || !which("callgrind_control") {
        return None;
    }
    let run = || -> Option<Instructions> {
        let out = setup.dir.path().join(format!("callgrind.{name}.{size}.{metrics}"));
        let me = std::env::current_exe().unwrap();
        let mut cmd = Command::new("valgrind");
        cmd.arg("--tool=callgrind").arg(format!("--callgrind-out-file={}", out.display()));
        let tag;
        let from_stdout;
        if name == "wsgate-ws" {
            let config = setup.dir.path().join("callgrind.toml");
            std::fs::write(
                &config,
                format!(
                    "[listeners.plain]\naddress = \"127.0.0.1:0\"\n[routes.bench]\npath = \"/bench\"\nbackend = \"{}\"\n\
                     [admin]\naddress = \"127.0.0.1:0\"\n[shutdown]\ndrain_delay_secs = 0\nclose_window_secs = 0\n\
                     [metrics]\nenabled = {metrics}\n",
                    setup.echo
                ),
            )
            .ok()?;
            wsgate(&mut cmd, &config);
            tag = "listener=plain url=ws://";
            from_stdout = false;
        } else {
            cmd.arg(&me).args(["bare-bridge", "--backend", &setup.echo.to_string()]);
            tag = "listening ";
            from_stdout = true;
        }
        let relay = Counted::start(cmd, tag, from_stdout, out);
        let path = if name == "wsgate-ws" { "/bench" } else { "/" };
        let target = Endpoint::local(Kind::Ws, relay.addr, path);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let tls = client_tls(&setup.ca_der);
            let mut conn = Conn::open(&target, &tls).await;
            let wire = conn.wire(&vec![1u8; size]);
            let mut buf = vec![0u8; 256 * 1024];
            // Lockstep (one message out, its echo back, then the next) so each message meets
            // the same sequence of reads and wake-ups, and the count repeats from run to run.
            let mut round_trips = async |n: usize| {
                for _ in 0..n {
                    conn.round_trip(&wire, size, &mut buf).await;
                }
            };
            round_trips(16).await;
            relay.control("-z");
            round_trips(messages).await;
            relay.control("-d");
        });
        let (text, total) = relay.finish(1)?.pop()?;
        // Each byte crosses the relay twice (to the backend and back).
        let per_byte = |n: f64| n / (2.0 * (size * messages) as f64);
        let mem = mem_function_instructions(&text);
        if mem == 0 {
            // A libc without symbols shows its memcpy/memset as addresses: nothing is subtracted.
            eprintln!("\ncallgrind: no memcpy/memset symbols in the dump; the count outside them is the total");
        }
        Some(Instructions { all: per_byte(total), outside_mem: per_byte(total - mem as f64) })
    };
    let counts: Vec<Instructions> = (0..repeats).map(|_| run()).collect::<Option<_>>()?;
    let all: Vec<f64> = counts.iter().map(|c| c.all).collect();
    let outside: Vec<f64> = counts.iter().map(|c| c.outside_mem).collect();
    Some(Instructions { all: median(&all), outside_mem: median(&outside) })
}

/// The instructions a callgrind dump counts in glibc's `memcpy`, `memmove` and `memset` (their
/// own, not their callers'). The format: `fn=` starts a function's lines (`fn=(id) name` the
/// first time a name appears, here or in `cfn=`, then `fn=(id)`); a line of numbers is a
/// position and its cost, except the line after `calls=`, which is the call's inclusive cost.
pub(crate) fn mem_function_instructions(dump: &str) -> u64 {
    let mut names = std::collections::HashMap::new();
    let mut name_of = |spec: &str| -> String {
        match spec.strip_prefix('(').and_then(|s| s.split_once(')')) {
            Some((id, rest)) if !rest.trim().is_empty() => {
                names.insert(id.to_string(), rest.trim().to_string());
                rest.trim().to_string()
            }
            Some((id, _)) => names.get(id).cloned().unwrap_or_default(),
            None => spec.trim().to_string(),
        }
    };
    let (mut in_mem, mut call_cost_next, mut total) = (false, false, 0u64);
    for line in dump.lines() {
        if let Some(spec) = line.strip_prefix("fn=") {
            let name = name_of(spec);
            in_mem = ["__memcpy", "__memmove", "__memset", "__mempcpy"].iter().any(|p| name.starts_with(p));
        } else if let Some(spec) = line.strip_prefix("cfn=") {
            name_of(spec);
        } else if line.starts_with("calls=") {
            call_cost_next = true;
        } else if line.starts_with(|c: char| c.is_ascii_digit() || matches!(c, '+' | '-' | '*')) {
            if std::mem::take(&mut call_cost_next) {
                continue;
            }
            if in_mem {
                total += line.split_whitespace().nth(1).and_then(|c| c.parse::<u64>().ok()).unwrap_or(0);
            }
        }
    }
    total
}

/// wss handshakes counted per figure: full ones are about 40× a relayed 64 KiB message under
/// callgrind's slowdown, so a few hundred keep a window to seconds.
pub(crate) const HANDSHAKES: usize = 200;

/// Instructions per wss session opened and closed, from callgrind, split into its opening (TCP,
/// TLS, the request, route and admission, the dial, the 101 and the session's start) and its
/// closing (the Close, what each relay does to end the session, its log line): `wsgate-wss` or
/// `bare-wss` runs under callgrind, a few handshakes warm it up (and, for resumed ones, fill the
/// client's session store), the counters are zeroed, `count` sessions are opened one after the
/// other and held, the counters are dumped, the sessions are closed one after the other (each
/// close awaited), and the counters are dumped again. Each handshake's kind is checked; `None`
/// when one was not the kind asked for, or when valgrind is missing. The median of `repeats`
/// windows of each part, and how far apart the totals were (largest less smallest, as a
/// fraction of the median).
pub(crate) fn instructions_per_handshake(
    name: &str,
    setup: &Setup,
    kind: Handshake,
    count: usize,
    repeats: usize,
) -> Option<(Split, f64)> {
    if !which("valgrind") || !which("callgrind_control") {
        return None;
    }
    let run = || -> Option<Split> {
        let out = setup.dir.path().join(format!("callgrind.{name}.handshake.{kind:?}"));
        let mut cmd = Command::new("valgrind");
        cmd.arg("--tool=callgrind").arg(format!("--callgrind-out-file={}", out.display()));
        let (tag, from_stdout, path) = if name == "wsgate-wss" {
            let config = setup.dir.path().join("callgrind-wss.toml");
            std::fs::write(
                &config,
                format!(
                    "[listeners.secure]\naddress = \"127.0.0.1:0\"\ntls = {{ cert = {:?}, key = {:?} }}\n\
                     [routes.bench]\npath = \"/bench\"\nbackend = \"{}\"\n[admin]\naddress = \"127.0.0.1:0\"\n\
                     [shutdown]\ndrain_delay_secs = 0\nclose_window_secs = 0\n{PER_CLIENT_OUT_OF_REACH}",
                    setup.cert, setup.key, setup.echo
                ),
            )
            .ok()?;
            wsgate(&mut cmd, &config);
            ("listener=secure url=wss://", false, "/bench")
        } else {
            let me = std::env::current_exe().unwrap();
            cmd.arg(&me).args(["bare-bridge", "--backend", &setup.echo.to_string(), "--tls"]);
            cmd.arg(&setup.cert).arg(&setup.key);
            ("listening ", true, "/")
        };
        let relay = Counted::start(cmd, tag, from_stdout, out);
        let target = Endpoint::local(Kind::Wss, relay.addr, path);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let wrong = rt.block_on(async {
            let tls = handshake::connector(&setup.ca_der, kind);
            // Warm-up; for resumed handshakes it also fills the client's session store.
            handshake::prime(&target, &tls).await;
            relay.control("-z");
            let mut wrong = 0;
            let mut open = Vec::with_capacity(count);
            for _ in 0..count {
                let (ws, seen) = handshake::open(&target, &tls).await;
                wrong += usize::from(!handshake::is(seen, kind));
                open.push(ws);
            }
            relay.control("-d");
            for ws in open {
                handshake::close(ws).await;
            }
            relay.control("-d");
            wrong
        });
        let [(_, opening), (_, closing)] = relay.finish(2)?[..] else { return None };
        if wrong > 0 {
            eprintln!("\ncallgrind: {name}: {wrong} of {count} handshakes were not {kind:?}; no figure");
            return None;
        }
        Some(Split { open: opening / count as f64, close: closing / count as f64 })
    };
    let counts: Vec<Split> = (0..repeats).map(|_| run()).collect::<Option<_>>()?;
    let totals: Vec<f64> = counts.iter().map(Split::total).collect();
    let (lo, hi) = totals.iter().fold((f64::MAX, 0.0_f64), |(lo, hi), c| (lo.min(*c), hi.max(*c)));
    let part = |f: fn(&Split) -> f64| median(&counts.iter().map(f).collect::<Vec<_>>());
    let split = Split { open: part(|s| s.open), close: part(|s| s.close) };
    Some((split, (hi - lo) / median(&totals)))
}

/// Instructions per session, opening and closing apart.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Split {
    pub(crate) open: f64,
    pub(crate) close: f64,
}

impl Split {
    pub(crate) fn total(&self) -> f64 {
        self.open + self.close
    }
}

/// Runs wsgate with `config` (under the command `cmd` starts), logging its session lines as in
/// production.
fn wsgate(cmd: &mut Command, config: &Path) {
    cmd.arg(env!("CARGO_BIN_EXE_wsgate")).args(["run", "--config"]).arg(config).env("RUST_LOG", "warn,wsgate=info");
}

/// A relay running under callgrind, whose counters a window zeroes and dumps.
struct Counted {
    child: Child,
    pid: String,
    addr: SocketAddr,
    out: PathBuf,
}

impl Counted {
    /// Starts `cmd` (valgrind writing to `out`, and the relay) and finds the address it listens
    /// on after `tag` in its stdout or stderr.
    fn start(cmd: Command, tag: &str, from_stdout: bool, out: PathBuf) -> Counted {
        let (child, addr) =
            spawn_and_find(cmd, |l| l.split(tag).nth(1)?.split_whitespace().next()?.parse().ok(), from_stdout);
        Counted { pid: child.id().to_string(), child, addr, out }
    }

    /// `callgrind_control -z` (zero) or `-d` (dump).
    fn control(&self, what: &str) {
        let ok = Command::new("callgrind_control").args([what, &self.pid]).stdout(Stdio::null()).status();
        assert!(ok.is_ok_and(|s| s.success()), "callgrind_control {what} {} failed", self.pid);
    }

    /// Stops the relay; the window's `dumps` (numbered from 1), each with its total.
    fn finish(mut self, dumps: usize) -> Option<Vec<(String, f64)>> {
        let _ = Command::new("kill").args(["-KILL", &self.pid]).status();
        let _ = self.child.wait();
        (1..=dumps)
            .map(|n| {
                let text = std::fs::read_to_string(format!("{}.{n}", self.out.display())).ok()?;
                let total =
                    text.lines().find_map(|l| l.strip_prefix("totals: "))?.split_whitespace().next()?.parse().ok()?;
                Some((text, total))
            })
            .collect()
    }
}
