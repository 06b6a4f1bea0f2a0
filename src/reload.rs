//! Reloading a running gateway: on SIGHUP, and when the config file or a file it names changes.
//!
//! Kubernetes updates a mounted ConfigMap or Secret by writing a new timestamped directory and
//! renaming a `..data` symlink over the old one; editors save by writing a new file and renaming
//! it over the old. Neither writes the path the config names, so an inotify watch on it sees
//! nothing. Instead the watcher polls: every `[reload] watch_interval_secs` it `stat`s each file,
//! following symlinks, and compares device, inode, size and modification time with what it saw
//! when that file was last read. A poll of a dozen files every few seconds costs nothing, needs
//! no dependency, and sees every way a file can be replaced. (It can miss a rewrite in place that
//! keeps the size within one tick of the file system's clock; nobody deploys that way.)
//!
//! A change reloads exactly as SIGHUP does ([`Reloader::reload`]), off the runtime's workers,
//! logged and counted (`wsgate_config_reloads_total{trigger}`) the same way. What the watcher
//! compares with (the [`Baseline`]) is taken by every reload, whatever triggered it, just
//! before it reads the files, so a change is reloaded once: a reload that fails is not retried
//! until a file changes again, and a SIGHUP after an edit does not make the watcher reload the
//! same edit. The files watched are those the running config names, recomputed by every reload
//! that applies; after one that fails, also those the refused config names (the fix may be a
//! certificate it expects).
//!
//! Reloads are serialised by the baseline's lock, so a SIGHUP and a file change cannot apply
//! two versions of the files out of order. `[reload]` itself is read from the running config at
//! every tick, so a reload can turn the watcher on or off and change its pace.
//!
//! [`Gateway::run`](crate::Gateway::run) runs [`watch`] until shutdown is requested; `main` calls
//! [`Reloader::reload`] on SIGHUP.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::Reloader;
use crate::config::{Backend, Config, Mechanism, TargetSource};

/// What started a reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// SIGHUP (or a direct call to [`Reloader::reload_file`]).
    Signal,
    /// The watcher saw this file change.
    Watch {
        /// The first watched file found changed (as the config names it).
        changed: PathBuf,
    },
}

impl Trigger {
    /// How log lines start: `SIGHUP` or `file change`.
    fn cause(&self) -> &'static str {
        match self {
            Trigger::Signal => "SIGHUP",
            Trigger::Watch { .. } => "file change",
        }
    }
}

/// A file's identity and version as `stat` sees it through symlinks; `None` in a [`Baseline`]
/// when the file is missing or cannot be read (its appearance is then a change too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    // `metadata` follows symlinks: a swapped `..data` link gives the new file's inode.
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp { dev: m.dev(), ino: m.ino(), size: m.size(), mtime: m.mtime(), mtime_nsec: m.mtime_nsec() })
}

/// Each watched file with its stamp from just before the files were last read. Invariant: no
/// path twice; the config file first.
#[derive(Debug, Default)]
pub(crate) struct Baseline(Vec<(PathBuf, Option<Stamp>)>);

impl Baseline {
    /// Stamps `paths` now.
    pub(crate) fn take(paths: Vec<PathBuf>) -> Baseline {
        Baseline(
            paths
                .into_iter()
                .map(|p| {
                    let s = stamp(&p);
                    (p, s)
                })
                .collect(),
        )
    }

    /// The stamps of `paths`: from `self` for the paths it has, taken now for the others.
    pub(crate) fn extend_to(mut self, paths: Vec<PathBuf>) -> Baseline {
        let known = std::mem::take(&mut self.0);
        let find = |p: &Path| known.iter().find(|(k, _)| k == p).map(|(_, s)| *s);
        Baseline(
            paths
                .into_iter()
                .map(|p| {
                    let s = find(&p).unwrap_or_else(|| stamp(&p));
                    (p, s)
                })
                .collect(),
        )
    }

    /// The watched paths, config file first.
    pub(crate) fn paths(&self) -> Vec<PathBuf> {
        self.0.iter().map(|(p, _)| p.clone()).collect()
    }

    /// The first file whose stamp differs from its baseline now, if any.
    pub(crate) fn changed(&self) -> Option<PathBuf> {
        self.0.iter().find(|(p, s)| stamp(p) != *s).map(|(p, _)| p.clone())
    }
}

/// Every file `config` makes wsgate read, the config file itself first, each once: listener
/// certificates, keys, client CAs and CRLs; the admin listener's certificate, key and tokens
/// file; routes' token files, JWT keys, JWKS files and htpasswd files; token-mapped routes' map
/// files and JWT keys; backend TLS CAs, client certificates and keys.
pub fn files(config: &Config) -> Vec<PathBuf> {
    let mut files = vec![config.path.clone()];
    for l in &config.listeners {
        if let Some(tls) = &l.tls {
            files.extend([tls.cert.clone(), tls.key.clone()]);
            files.extend(tls.ticket_keys.iter().cloned());
            if let Some(client) = &tls.client_auth {
                files.push(client.ca.clone());
                files.extend(client.crls.iter().cloned());
            }
        }
    }
    if config.admin.is_some() {
        let access = &config.admin_access;
        if let Some(tls) = &access.tls {
            files.extend([tls.cert.clone(), tls.key.clone()]);
        }
        files.extend(access.tokens_file.iter().cloned());
    }
    let jwt_files = |jwt: &crate::config::Jwt| jwt.keys.iter().chain(&jwt.jwks_file).cloned().collect::<Vec<_>>();
    for r in &config.routes {
        match r.auth.as_ref().map(|a| &a.mechanism) {
            Some(Mechanism::Bearer(b)) => files.extend(b.tokens_file.iter().cloned()),
            Some(Mechanism::Jwt(jwt)) => files.extend(jwt_files(jwt)),
            Some(Mechanism::Basic(b)) => files.push(b.htpasswd.clone()),
            None => {}
        }
        if let Backend::Mapped(targets) = &r.backend {
            match &targets.source {
                TargetSource::Map { file, .. } => files.push(file.clone()),
                TargetSource::Jwt(jwt) => files.extend(jwt_files(jwt)),
            }
        }
        if let Some(tls) = &r.backend_tls {
            files.extend(tls.ca.iter().cloned());
            if let Some((cert, key)) = &tls.client_cert {
                files.extend([cert.clone(), key.clone()]);
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    files.retain(|f| seen.insert(f.clone()));
    files
}

impl Reloader {
    /// Reloads `path` as [`reload_file`](Reloader::reload_file) does, off the runtime's workers
    /// (a reload reads and checks certificates, CRLs and credential files, which can be large),
    /// and logs the outcome: one info line when applied, one warn line per problem when
    /// rejected. Returns whether it applied.
    pub async fn reload(&self, path: &Path, trigger: Trigger) -> bool {
        let (reloader, file, why) = (self.clone(), path.to_path_buf(), trigger.clone());
        let outcome =
            tokio::task::spawn_blocking(move || reloader.reload_counted(&file, &why).map_err(|e| e.to_string()))
                .await
                .unwrap_or_else(|e| Err(format!("reload task failed: {e}")));
        let (cause, config) = (trigger.cause(), path.display());
        let changed = match &trigger {
            Trigger::Watch { changed } => Some(changed.display()),
            Trigger::Signal => None,
        };
        match &outcome {
            Ok(()) => match changed {
                Some(file) => info!(%config, %file, "{cause}: config reloaded; new connections use it"),
                None => info!(%config, "{cause}: config reloaded; new connections use it"),
            },
            Err(e) => {
                for line in e.lines() {
                    match &changed {
                        Some(file) => {
                            warn!(%config, %file, "{cause}: reload rejected, the running config stays: {line}")
                        }
                        None => warn!(%config, "{cause}: reload rejected, the running config stays: {line}"),
                    }
                }
            }
        }
        outcome.is_ok()
    }
}

/// Polls the running config's files every `[reload] watch_interval_secs` while `[reload] watch`
/// is on, and reloads when one changed; returns when `stop` is cancelled (an in-flight reload
/// is finished first).
///
/// The wait between checks is a thread of its own, not a tokio timer: a timer pending all the
/// time makes the runtime's time driver work at every park of every worker, which the relay pays
/// per wake-up. It sleeps in short steps, so a reload that shortens the interval (or a stop)
/// takes effect within a step.
pub(crate) async fn watch(reloader: Reloader, stop: CancellationToken) {
    const STEP: Duration = Duration::from_millis(250);
    let tick = Arc::new(tokio::sync::Notify::new());
    let ticker = {
        let (tick, stop, reloader) = (tick.clone(), stop.clone(), reloader.clone());
        std::thread::Builder::new().name("wsgate-watch".into()).spawn(move || {
            let mut waited = Duration::ZERO;
            while !stop.is_cancelled() {
                std::thread::sleep(STEP);
                waited += STEP;
                if waited >= reloader.running().reload.watch_interval {
                    waited = Duration::ZERO;
                    tick.notify_one();
                }
            }
        })
    };
    if let Err(e) = ticker {
        tracing::warn!(error = %e, "file watch: could not start its thread; reload with SIGHUP");
        return;
    }
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.notified() => {}
        }
        if !reloader.running().reload.watch {
            continue;
        }
        // `stat` can block (a hung network mount), so not on a worker either.
        let checking = reloader.clone();
        let Ok(Some(changed)) = tokio::task::spawn_blocking(move || checking.changed_file()).await else { continue };
        let path = reloader.running().path.clone();
        reloader.reload(&path, Trigger::Watch { changed }).await;
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::{Baseline, files};

    /// Every file a config names is watched, once, the config first; relative paths are the
    /// resolved ones the loaders read.
    #[test]
    fn files_lists_every_named_file_once() {
        let text = r#"
[listeners.s]
address = "127.0.0.1:0"
tls = { cert = "c.pem", key = "k.pem", client_ca = "ca.pem", client_crls = ["a.crl", "b.crl"] }
[listeners.t]
address = "127.0.0.1:0"
tls = { cert = "c.pem", key = "k.pem", ticket_keys = "tickets.keys" }
[admin]
address = "127.0.0.1:0"
tls = { cert = "admin.pem", key = "admin.key" }
tokens_file = "admin-tokens"
[routes.b]
path = "/b"
backend = "127.0.0.1:1"
auth = { type = "bearer", tokens_file = "tokens" }
[routes.b.backend_tls]
ca = "backend-ca.pem"
client_cert = "c.pem"
client_key = "client.key"
[routes.j]
path = "/j"
backend = "127.0.0.1:1"
auth = { type = "jwt", keys = ["k1.pem"], jwks_file = "jwks.json", algorithms = ["RS256"] }
[routes.h]
path = "/h"
backend = "127.0.0.1:1"
auth = { type = "basic", htpasswd = "htpasswd" }
[routes.m]
path = "/m/"
match = "prefix"
targets = { map_file = "map.toml", allow = ["127.0.0.0/8"], allow_ports = ["1-65535"] }
"#;
        let config = crate::config::parse(text, Path::new("/etc/wsgate/config.toml")).expect("valid");
        let names: Vec<PathBuf> = files(&config);
        let expected = [
            "config.toml",
            "c.pem",
            "k.pem",
            "ca.pem",
            "a.crl",
            "b.crl",
            "tickets.keys",
            "admin.pem",
            "admin.key",
            "admin-tokens",
            "tokens",
            "backend-ca.pem",
            "client.key",
            "htpasswd",
            "k1.pem",
            "jwks.json",
            "map.toml",
        ];
        let expected: Vec<PathBuf> = expected.iter().map(|f| Path::new("/etc/wsgate").join(f)).collect();
        assert_eq!(names, expected);
    }

    /// A file replaced (new inode), rewritten, removed or created is a change; an untouched
    /// one is not; a baseline extended to new paths keeps the old stamps of the known ones.
    #[test]
    fn baseline_sees_replacement_and_appearance() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, "one").unwrap();
        let base = Baseline::take(vec![a.clone(), b.clone()]);
        assert_eq!(base.changed(), None);
        // Replaced by rename, same size: a new inode.
        let tmp = dir.path().join("a.tmp");
        std::fs::write(&tmp, "two").unwrap();
        std::fs::rename(&tmp, &a).unwrap();
        assert_eq!(base.changed(), Some(a.clone()));
        let base = base.extend_to(vec![a.clone(), b.clone()]);
        assert_eq!(base.changed(), Some(a.clone()), "the known path keeps its old stamp");
        let base = Baseline::take(base.paths());
        std::fs::write(&b, "new").unwrap();
        assert_eq!(base.changed(), Some(b.clone()), "a file appearing is a change");
        let base = Baseline::take(base.paths());
        std::fs::remove_file(&a).unwrap();
        assert_eq!(base.changed(), Some(a));
    }
}
