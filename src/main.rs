//! The `wsgate` command: parses arguments, sets up logging, loads the config, runs the gateway
//! until a signal, and turns every failure into one readable line and an exit code.
//!
//! Signals:
//! - SIGTERM (what Kubernetes and systemd send): graceful drain. `/readyz` fails at once,
//!   listeners keep accepting for `shutdown.drain_delay_secs`, then sessions close with 1001
//!   over `shutdown.close_window_secs`; at `shutdown.deadline_secs` the rest are dropped.
//! - SIGINT (Ctrl-C): the same without the drain delay.
//! - A second SIGTERM or SIGINT: exit at once.
//! - SIGHUP: reload the config file and certificates; an invalid file is rejected and the
//!   running config stays.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;
use wsgate::config::{self, Config};
use wsgate::{Reloader, Shutdown};

#[derive(Parser)]
#[command(name = "wsgate", version, about = "WebSocket-to-TCP gateway: wss:// in front, plain TCP services behind")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default when no command is given).
    Run {
        /// Config file; relative paths inside it are relative to its directory.
        #[arg(long, short, default_value = "config.toml")]
        config: PathBuf,
    },
    /// Validate a config file and print a summary; exit 1 with one line per problem if invalid.
    Check {
        /// Config file to check.
        #[arg(default_value = "config.toml")]
        path: PathBuf,
    },
    /// Carry a local port (--listen) or stdio (--stdio) over a ws:// or wss:// session to a
    /// wsgate route. Exit codes: docs/client.md.
    Connect(Box<ConnectArgs>),
    /// GET a plain-HTTP URL (default: the admin listener's /healthz); exit 0 on a 2xx, else 1
    /// with one line on stderr. For health checks in images without a shell.
    Probe {
        /// The URL to GET: http://host[:port][/path].
        #[arg(default_value = wsgate::probe::DEFAULT_URL)]
        url: String,
        /// Give up after this long (connect, request and status line together).
        #[arg(long, default_value_t = 3, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=3600))]
        timeout_secs: u64,
    },
}

#[derive(clap::Args)]
struct ConnectArgs {
    /// The route's URL: ws://host[:port]/path or wss://host[:port]/path.
    url: String,
    /// Carry stdin/stdout (for `ssh -o ProxyCommand=...`).
    #[arg(long, conflicts_with = "listen", required_unless_present = "listen")]
    stdio: bool,
    /// Accept local connections on ADDR:PORT or unix:/path; each gets a session of its own.
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Allow --listen on an address that is not loopback (opens the route to the network).
    #[arg(long)]
    allow_remote: bool,
    /// Trust only the CA certificates in this PEM file (default: the system's roots).
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Do not verify the gateway's certificate (a warning is printed).
    #[arg(long)]
    insecure: bool,
    /// The name to verify and send as SNI, if not the URL's host.
    #[arg(long, value_name = "NAME")]
    server_name: Option<String>,
    /// Client certificate chain (PEM) for mTLS.
    #[arg(long, value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,
    /// Client private key (PEM) for mTLS.
    #[arg(long, value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,
    /// Send the bearer token held in this environment variable.
    #[arg(long, value_name = "VAR")]
    token_env: Option<String>,
    /// Send the bearer token held in this file (trailing whitespace ignored).
    #[arg(long, value_name = "PATH", conflicts_with = "token_env")]
    token_file: Option<PathBuf>,
    /// Where the token goes: header (Authorization: Bearer), cookie:NAME, query
    /// (?access_token=) or subprotocol:PREFIX; as the route's [auth] accepts it. Default: header.
    #[arg(long, value_name = "CARRIER")]
    token_via: Option<String>,
    /// An extra request header, `Name: value` (repeatable).
    #[arg(long = "header", value_name = "NAME: VALUE")]
    headers: Vec<String>,
    /// Offer this subprotocol (repeatable, in order of preference).
    #[arg(long = "subprotocol", value_name = "NAME")]
    subprotocols: Vec<String>,
    /// HTTP proxy to CONNECT through (default: HTTPS_PROXY / https_proxy, minus NO_PROXY).
    #[arg(long, value_name = "URL")]
    proxy: Option<String>,
    /// Connect directly, whatever HTTPS_PROXY says.
    #[arg(long, conflicts_with = "proxy")]
    no_proxy: bool,
    /// Ping the gateway this often; 0: never.
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    ping_secs: u64,
    /// How long one dial may take; with --listen, also how long a new local connection waits,
    /// retrying with backoff, while the gateway is unreachable.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    connect_timeout_secs: u64,
    /// With --listen: close a local connection at once when the gateway cannot be reached.
    #[arg(long)]
    fail_fast: bool,
    /// Do not ask for the half-close control channel (the local side's EOF then ends the
    /// session).
    #[arg(long)]
    no_half_close: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run { config: PathBuf::from("config.toml") }) {
        Command::Check { path } => check(&path),
        Command::Connect(args) => connect(*args),
        Command::Probe { url, timeout_secs } => probe(&url, timeout_secs),
        Command::Run { config } => {
            match run(&config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    // Our errors carry their causes in their own message (one line naming the
                    // file, listener or address), so the chain is not printed again.
                    eprintln!("wsgate: error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Logs to stderr through a thread of their own: a line is queued, never written by the thread
/// that logs it, so a reader that stops reading (a full pipe to journald or the container
/// runtime) stalls no session. Past `max_buffered_lines` queued, lines are dropped and counted.
/// The guard writes out what is queued when dropped, for at most about a second; a reader still
/// stalled then loses the queue (tracing-appender gives up after 100 ms to queue its stop).
fn init_logging(log: config::Log) -> (WorkerGuard, ErrorCounter) {
    // RUST_LOG takes the usual tracing filter syntax, e.g. `RUST_LOG=wsgate=debug`.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Buffered: the writer thread flushes whenever its queue is empty, one write for many lines.
    let stderr = std::io::BufWriter::with_capacity(64 * 1024, std::io::stderr());
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(log.max_buffered_lines)
        .thread_name("wsgate-log")
        .finish(stderr);
    let dropped = writer.error_counter();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer);
    let _ = match log.format {
        config::LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
        // No colours, on a terminal either: the formatter is built without ANSI styling (Cargo.toml).
        config::LogFormat::Text => builder.try_init(),
    };
    (guard, dropped)
}

fn load(path: &Path) -> Result<Config, config::ConfigErrors> {
    config::load(path)
}

fn check(path: &Path) -> ExitCode {
    match load(path) {
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            ExitCode::FAILURE
        }
        Ok(config) => {
            // The credential files the routes name are read as a start would read them.
            if let Err(errors) = wsgate::auth::load(&config) {
                for e in &errors {
                    eprintln!("{e}");
                }
                return ExitCode::FAILURE;
            }
            // So are the token maps and JWT keys of token-mapped routes.
            let mappings = match wsgate::backend::load_targets(&config) {
                Ok(mappings) => mappings,
                Err(errors) => {
                    for e in &errors {
                        eprintln!("{e}");
                    }
                    return ExitCode::FAILURE;
                }
            };
            // So are the backend TLS files (CA, client certificate and key).
            if let Err(errors) = wsgate::backend::tls::load(&config) {
                for e in &errors {
                    eprintln!("{e}");
                }
                return ExitCode::FAILURE;
            }
            // And the listeners' shared TLS ticket keys.
            for l in &config.listeners {
                if let Some(keys) = l.tls.as_ref().and_then(|t| t.ticket_keys.as_ref())
                    && let Err(e) = wsgate::tickets::read_keys(keys)
                {
                    eprintln!("listener \"{}\": {e}", l.name);
                    return ExitCode::FAILURE;
                }
            }
            println!("{}: ok", path.display());
            for l in &config.listeners {
                print!("listener {:<12} {}://{}", l.name, l.scheme(), l.address);
                if let Some(tls) = &l.tls {
                    let state = if tls.cert.exists() && tls.key.exists() {
                        "present"
                    } else if tls.cert.exists() || tls.key.exists() {
                        "MISSING cert or key (only one exists): start-up will fail"
                    } else if tls.generate_self_signed {
                        "missing: a development pair will be generated at start"
                    } else {
                        "MISSING: start-up will fail"
                    };
                    print!("  cert {} ({state})", tls.cert.display());
                }
                println!();
            }
            for r in &config.routes {
                let host = r.host.as_ref().map(|h| format!("{h} ")).unwrap_or_default();
                let m = if r.path_match == config::PathMatch::Prefix { " (prefix)" } else { "" };
                println!("route    {:<12} {host}{}{m} -> {}{}", r.name, r.path, r.backend, backend_tls_summary(r));
                if let config::Backend::Pool(pool) = &r.backend {
                    for member in &pool.members {
                        println!("  backend  {member}");
                    }
                    println!("  health   {}", pool.health);
                }
                if let (config::Backend::Mapped(t), Some(mapping)) = (&r.backend, mappings.get(&r.name)) {
                    let (by, allow, ports) = (mapping.describe(), &t.allow, &t.allow_ports);
                    println!("targets  {:<12} {by}; allow {allow}; ports {ports}", r.name);
                }
            }
            if let Some(addr) = config.builtin.tcp_echo {
                println!("builtin  tcp_echo     {addr}");
            }
            if let Some(path) = &config.console {
                println!("console               {path} (on every listener)");
            }
            match config.admin {
                Some(addr) => println!("admin                 http://{addr} (/metrics /healthz /readyz)"),
                None => println!("admin                 off"),
            }
            let s = &config.shutdown;
            println!(
                "shutdown              drain delay {:?}, close window {:?}, deadline {:?}",
                s.drain_delay, s.close_window, s.deadline
            );
            ExitCode::SUCCESS
        }
    }
}

/// How `wsgate check` shows a route's backend TLS: what is verified against what, loudly when
/// nothing is.
fn backend_tls_summary(route: &config::Route) -> String {
    let Some(tls) = &route.backend_tls else { return String::new() };
    let name = tls.server_name.as_deref().map(|n| format!(" name {n}")).unwrap_or_default();
    let client = tls.client_cert.as_ref().map(|(c, _)| format!(", client cert {}", c.display())).unwrap_or_default();
    if tls.insecure {
        eprintln!(
            "WARNING: routes.{}.backend_tls.insecure = true: the backend's certificate is NOT verified",
            route.name
        );
        return format!(" (TLS{name}, INSECURE: certificate not verified{client})");
    }
    let ca = tls.ca.as_ref().map_or("bundled web PKI roots".to_string(), |ca| format!("CA {}", ca.display()));
    format!(" (TLS{name}, verified against {ca}{client})")
}

fn run(path: &Path) -> anyhow::Result<()> {
    let config = load(path).map_err(|errors| anyhow::anyhow!("invalid config:\n{errors}"))?;
    let (log_writer, dropped_lines) = init_logging(config.log);
    let runtime = tokio::runtime::Runtime::new().map_err(|e| anyhow::anyhow!("start the async runtime: {e}"))?;
    runtime.block_on(async {
        // Install the handlers before binding, so a signal during start-up (a SIGHUP from a
        // deploy script, say) does not take its default action and kill the process.
        let signals = Signals::install()?;
        let gateway = wsgate::Gateway::bind(config).await?;
        gateway.count_dropped_log_lines(move || dropped_lines.dropped_lines() as u64);
        let shutdown = Shutdown::new();
        // Not awaited: it lives as long as the process; it ends the process itself on a second
        // signal, and is dropped with the runtime when `run` returns (the log writer with it,
        // which writes out what is queued).
        tokio::spawn(watch_signals(signals, shutdown.clone(), gateway.reloader(), path.to_path_buf(), log_writer));
        gateway.run(shutdown).await;
        Ok(())
    })
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        let install =
            |kind: SignalKind, name: &str| signal(kind).map_err(|e| anyhow::anyhow!("install the {name} handler: {e}"));
        Ok(Signals {
            term: install(SignalKind::terminate(), "SIGTERM")?,
            int: install(SignalKind::interrupt(), "SIGINT")?,
            hup: install(SignalKind::hangup(), "SIGHUP")?,
        })
    }
}

/// SIGTERM: drain. SIGINT: drain without the delay. Second of either: exit now (128 + the
/// signal's number, as a shell reports it). SIGHUP: reload.
async fn watch_signals(signals: Signals, shutdown: Shutdown, reloader: Reloader, path: PathBuf, log: WorkerGuard) {
    let Signals { mut term, mut int, mut hup } = signals;
    loop {
        let (name, code) = tokio::select! {
            _ = term.recv() => ("SIGTERM", 143),
            _ = int.recv() => ("SIGINT", 130),
            _ = hup.recv() => {
                // Logged and counted there, exactly as a watched file's change is.
                reloader.reload(&path, wsgate::reload::Trigger::Signal).await;
                continue;
            }
        };
        if shutdown.is_requested() {
            tracing::warn!(signal = name, "second signal: exiting now");
            // `exit` runs no destructors: the log's queue, this line included, is written first.
            drop(log);
            std::process::exit(code);
        }
        tracing::info!(signal = name, "shutdown requested; send it again to exit at once");
        if name == "SIGINT" { shutdown.now() } else { shutdown.drain() }
    }
}

/// `wsgate probe`: silent on success (health checks log their output), one line on failure.
fn probe(url: &str, timeout_secs: u64) -> ExitCode {
    match wsgate::probe::probe(url, std::time::Duration::from_secs(timeout_secs)) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wsgate probe: {url}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `wsgate connect`: the arguments (and the environment they point at) to `client::Options`,
/// then the session(s); every failure is one line and the exit code of its kind.
fn connect(args: ConnectArgs) -> ExitCode {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    let fail = |e: wsgate::client::ClientError| {
        eprintln!("wsgate connect: error: {e}");
        ExitCode::from(e.exit_code())
    };
    let (options, listen) = match connect_options(&args) {
        Ok(parsed) => parsed,
        Err(e) => return fail(e),
    };
    if options.tls.insecure && options.target.secure {
        eprintln!(
            "wsgate connect: WARNING: --insecure: the gateway's certificate is NOT verified; \
             anyone on the network path can read and change this session"
        );
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => return fail(wsgate::client::ClientError::Local(format!("start the async runtime: {e}"))),
    };
    let result = runtime.block_on(async move {
        match listen {
            None => wsgate::client::run_stdio(options).await,
            Some(listen) => {
                let stop = tokio_util::sync::CancellationToken::new();
                let stopping = stop.clone();
                tokio::spawn(async move {
                    let _ = tokio::signal::ctrl_c().await;
                    stopping.cancel();
                });
                wsgate::client::run_listen(options, listen, stop, |bound| {
                    eprintln!("wsgate connect: listening on {bound}");
                })
                .await
            }
        }
    });
    // Not waited for: tokio reads stdin on a blocking thread, which may be inside a read that
    // only the peer's EOF would end.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

fn connect_options(
    args: &ConnectArgs,
) -> Result<(wsgate::client::Options, Option<wsgate::client::Listen>), wsgate::client::ClientError> {
    use wsgate::client::{ClientError, Listen, Options, Proxy, Secret, Target, TlsOptions};
    let target = Target::parse(&args.url)?;
    let listen = args.listen.as_deref().map(|l| Listen::parse(l, args.allow_remote)).transpose()?;
    let token = match (&args.token_env, &args.token_file) {
        (Some(var), _) => Some(Secret(
            std::env::var(var)
                .map_err(|_| ClientError::Usage(format!("--token-env {var}: the variable is not set")))?,
        )),
        (None, Some(path)) => Some(Secret(
            std::fs::read_to_string(path)
                .map_err(|e| ClientError::Usage(format!("--token-file {}: {e}", path.display())))?
                .trim_end()
                .to_string(),
        )),
        (None, None) => None,
    };
    let token_via = match (&args.token_via, &token) {
        (None, _) => wsgate::client::TokenVia::Header,
        (Some(via), Some(_)) => wsgate::client::TokenVia::parse(via)?,
        (Some(_), None) => return Err(ClientError::Usage("--token-via needs --token-env or --token-file".into())),
    };
    let headers = args
        .headers
        .iter()
        .map(|h| match h.split_once(':') {
            Some((name, value)) => Ok((name.trim().to_string(), value.trim().to_string())),
            None => Err(ClientError::Usage(format!("--header {h:?}: not `Name: value`"))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let env = |names: &[&str]| names.iter().find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()));
    let proxy = match (&args.proxy, args.no_proxy) {
        (_, true) => None,
        (Some(url), _) => Some(Proxy::parse(url)?),
        (None, false) => match env(&["HTTPS_PROXY", "https_proxy"]) {
            Some(url)
                if !env(&["NO_PROXY", "no_proxy"]).is_some_and(|np| wsgate::client::is_exempt(&np, &target.host)) =>
            {
                Some(Proxy::parse(&url)?)
            }
            _ => None,
        },
    };
    let system_roots = env(&["SSL_CERT_FILE"]).map(PathBuf::from).or_else(|| {
        ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
    });
    let tls = TlsOptions {
        ca: args.ca.clone(),
        system_roots,
        insecure: args.insecure,
        server_name: args.server_name.clone(),
        identity: args.cert.clone().zip(args.key.clone()),
    };
    let options = Options {
        target,
        tls,
        token,
        token_via,
        headers,
        subprotocols: args.subprotocols.clone(),
        proxy,
        ping_interval: (args.ping_secs > 0).then(|| std::time::Duration::from_secs(args.ping_secs)),
        connect_timeout: std::time::Duration::from_secs(args.connect_timeout_secs.max(1)),
        fail_fast: args.fail_fast,
        control: !args.no_half_close,
    };
    Ok((options, listen))
}
