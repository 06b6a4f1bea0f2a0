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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run { config: PathBuf::from("config.toml") }) {
        Command::Check { path } => check(&path),
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

fn init_logging(format: config::LogFormat) {
    // RUST_LOG takes the usual tracing filter syntax, e.g. `RUST_LOG=wsgate=debug`.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        config::LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
        config::LogFormat::Text => builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).try_init(),
    };
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
    init_logging(config.log_format);
    let runtime = tokio::runtime::Runtime::new().map_err(|e| anyhow::anyhow!("start the async runtime: {e}"))?;
    runtime.block_on(async {
        // Install the handlers before binding, so a signal during start-up (a SIGHUP from a
        // deploy script, say) does not take its default action and kill the process.
        let signals = Signals::install()?;
        let gateway = wsgate::Gateway::bind(config).await?;
        let shutdown = Shutdown::new();
        // Not awaited: it lives as long as the process; it ends the process itself on a second
        // signal, and is dropped with the runtime when `run` returns.
        tokio::spawn(watch_signals(signals, shutdown.clone(), gateway.reloader(), path.to_path_buf()));
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
async fn watch_signals(signals: Signals, shutdown: Shutdown, reloader: Reloader, path: PathBuf) {
    let Signals { mut term, mut int, mut hup } = signals;
    loop {
        let (name, code) = tokio::select! {
            _ = term.recv() => ("SIGTERM", 143),
            _ = int.recv() => ("SIGINT", 130),
            _ = hup.recv() => {
                // Off the runtime's workers: a reload reads the config, certificates, CRLs and
                // credential files, which can be large, and checks them.
                let (reloading, file) = (reloader.clone(), path.clone());
                let reloaded = tokio::task::spawn_blocking(move || reloading.reload_file(&file).map_err(|e| e.to_string()))
                    .await
                    .unwrap_or_else(|e| Err(format!("reload task failed: {e}")));
                match reloaded {
                    Ok(()) => tracing::info!(config = %path.display(), "SIGHUP: config reloaded; new connections use it"),
                    Err(e) => {
                        for line in e.lines() {
                            tracing::warn!(config = %path.display(), "SIGHUP: reload rejected, the running config stays: {line}");
                        }
                    }
                }
                continue;
            }
        };
        if shutdown.is_requested() {
            tracing::warn!(signal = name, "second signal: exiting now");
            std::process::exit(code);
        }
        tracing::info!(signal = name, "shutdown requested; send it again to exit at once");
        if name == "SIGINT" { shutdown.now() } else { shutdown.drain() }
    }
}
