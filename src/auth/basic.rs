//! HTTP Basic (RFC 7617) against an htpasswd-style file: `user:hash` per line, the hash bcrypt
//! (`$2y$`, `$2b$`, `$2a$`) or argon2 (`$argon2id$`, `$argon2i$`, `$argon2d$`). Plain text,
//! crypt(3) and Apache MD5 lines are refused when the file is loaded, naming file and line.
//!
//! A hash costs milliseconds of a core by design, so it runs on tokio's blocking pool, at most
//! `limits.max_password_checks` at once gateway-wide ([`PasswordChecks`]); a request finding
//! them all busy is answered 503 with `Retry-After` rather than queued. An unknown user is
//! checked against another user's hash all the same, so the answer's timing does not say which
//! user names exist.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use argon2::{Argon2, PasswordVerifier};
use base64::Engine;
use hyper::HeaderMap;
use hyper::header;

use super::{AuthError, Authenticated, Verdict};
use crate::admission::Shed;
use crate::config::Basic;

/// Password checks in progress, gateway-wide; kept across reloads (the cap comes with each call).
#[derive(Debug, Default)]
pub struct PasswordChecks {
    in_use: AtomicUsize,
}

/// One place among the password checks, given back when dropped.
struct CheckPlace(Arc<PasswordChecks>);

impl Drop for CheckPlace {
    fn drop(&mut self) {
        self.0.in_use.fetch_sub(1, Ordering::AcqRel);
    }
}

impl PasswordChecks {
    fn take(self: &Arc<Self>, cap: usize) -> Option<CheckPlace> {
        self.in_use.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < cap).then_some(n + 1)).ok()?;
        Some(CheckPlace(self.clone()))
    }
}

/// One route's users.
pub(super) struct Users {
    hashes: HashMap<String, Arc<str>>,
    /// Checked for unknown users, so they cost as much as known ones.
    decoy: Arc<str>,
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Users").field("users", &self.hashes.len()).finish_non_exhaustive()
    }
}

impl Users {
    pub(super) fn load(config: &Basic, key: &str) -> Result<Users, Vec<AuthError>> {
        let (path, key) = (&config.htpasswd, format!("{key}.htpasswd"));
        let text = std::fs::read_to_string(path)
            .map_err(|e| vec![AuthError::new(path, None, &key, format!("cannot read: {e}"))])?;
        let (mut hashes, mut errors) = (HashMap::new(), Vec::new());
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fail = |problem: &str| AuthError::new(path, Some(i + 1), &key, problem);
            let Some((user, hash)) = line.split_once(':').filter(|(u, _)| !u.is_empty()) else {
                errors.push(fail("expected user:hash"));
                continue;
            };
            if !is_supported(hash) {
                // The line is not repeated: it may hold a plain-text password.
                errors.push(fail("not a bcrypt ($2y$, $2b$, $2a$) or argon2 ($argon2id$...) hash; plain text and other schemes are refused"));
                continue;
            }
            if hashes.insert(user.to_string(), Arc::from(hash)).is_some() {
                errors.push(fail(&format!("user {user:?} is listed twice")));
            }
        }
        let Some(decoy) = hashes.values().next().cloned() else {
            errors.push(AuthError::new(path, None, &key, "lists no user: every request would be refused"));
            return Err(errors);
        };
        if errors.is_empty() { Ok(Users { hashes, decoy }) } else { Err(errors) }
    }

    /// Checks `password` for `user` on the blocking pool, if a place is free.
    pub(super) async fn check(
        &self,
        user: &str,
        password: &str,
        checks: &Arc<PasswordChecks>,
        cap: usize,
    ) -> Result<Result<Authenticated, Verdict>, Shed> {
        let place = checks.take(cap).ok_or(Shed::PasswordChecks(cap))?;
        let (hash, known) = match self.hashes.get(user) {
            Some(h) => (h.clone(), true),
            None => (self.decoy.clone(), false),
        };
        let password = password.to_string();
        let verified = tokio::task::spawn_blocking(move || {
            let _place = place;
            verify(&password, &hash)
        })
        .await
        .unwrap_or(false);
        Ok(if verified && known {
            Ok(Authenticated { user: Some(user.to_string()), expires: None })
        } else {
            Err(Verdict::Invalid("wrong user name or password".into()))
        })
    }
}

fn is_supported(hash: &str) -> bool {
    ["$2y$", "$2b$", "$2a$", "$argon2id$", "$argon2i$", "$argon2d$"].iter().any(|p| hash.starts_with(p))
}

fn verify(password: &str, hash: &str) -> bool {
    if hash.starts_with("$argon2") {
        Argon2::default().verify_password(password.as_bytes(), hash).is_ok()
    } else {
        bcrypt::verify(password, hash).unwrap_or(false)
    }
}

/// The user and password of an `Authorization: Basic` header: `None` when there is none,
/// `Some(Err)` when it is not base64 of `user:password` in UTF-8.
pub(super) fn credentials(headers: &HeaderMap) -> Option<Result<(String, String), ()>> {
    let value = headers.get_all(header::AUTHORIZATION).iter().find_map(|v| {
        let (scheme, rest) = v.to_str().ok()?.split_once(' ')?;
        scheme.eq_ignore_ascii_case("basic").then_some(rest)
    })?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(value.trim()).map_err(|_| ());
    let pair = decoded.and_then(|b| String::from_utf8(b).map_err(|_| ()));
    Some(pair.and_then(|p| match p.split_once(':') {
        Some((user, password)) if !user.is_empty() => Ok((user.to_string(), password.to_string())),
        _ => Err(()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// bcrypt and argon2 lines load and verify; a plain line names file and line; an unknown user fails.
    #[tokio::test]
    async fn htpasswd_lines() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("users");
        let bcrypt = bcrypt::hash("pw-b", 4).unwrap();
        let argon = {
            use argon2::password_hash::PasswordHasher;
            Argon2::default().hash_password(b"pw-a").unwrap().to_string()
        };
        std::fs::write(&file, format!("# users\nalice:{bcrypt}\nbob:{argon}\n")).unwrap();
        let users = Users::load(&Basic { htpasswd: file.clone() }, "routes.r.auth").unwrap();
        let checks = Arc::new(PasswordChecks::default());
        let ok = |r: Result<Result<Authenticated, Verdict>, Shed>| r.unwrap().ok().and_then(|a| a.user);
        assert_eq!(ok(users.check("alice", "pw-b", &checks, 1).await).as_deref(), Some("alice"));
        assert_eq!(ok(users.check("bob", "pw-a", &checks, 1).await).as_deref(), Some("bob"));
        assert_eq!(ok(users.check("alice", "pw-a", &checks, 1).await), None);
        assert_eq!(ok(users.check("carol", "pw-b", &checks, 1).await), None);
        let _held = checks.take(1).unwrap();
        assert_eq!(users.check("alice", "pw-b", &checks, 1).await.unwrap_err(), Shed::PasswordChecks(1));
        std::fs::write(&file, format!("alice:{bcrypt}\nmallory:hunter2\n")).unwrap();
        let e = Users::load(&Basic { htpasswd: file }, "routes.r.auth").unwrap_err()[0].to_string();
        assert!(e.contains("users:2: routes.r.auth.htpasswd: not a bcrypt") && !e.contains("hunter2"), "{e}");
    }
}
