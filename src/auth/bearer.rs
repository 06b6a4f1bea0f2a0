//! Opaque bearer tokens: the SHA-256 of each accepted token, from the config and from
//! `tokens_file`, compared in constant time with the SHA-256 of what the client sent.
//!
//! Only digests are stored, so the config and the file can be read by more people than the
//! tokens themselves; the comparison runs over every entry whatever matches, so its time says
//! nothing about which digest came close.

use super::AuthError;
use crate::config::{Bearer, TokenHash};

/// The accepted token digests of one route.
#[derive(Debug, Default)]
pub(super) struct Tokens {
    hashes: Vec<TokenHash>,
}

impl Tokens {
    /// The route's inline hashes and those of its `tokens_file` (one per line; blank lines and
    /// lines starting with `#` are skipped).
    pub(super) fn load(config: &Bearer, key: &str) -> Result<Tokens, AuthError> {
        let mut hashes = config.tokens.clone();
        if let Some(path) = &config.tokens_file {
            let key = format!("{key}.tokens_file");
            let text = std::fs::read_to_string(path)
                .map_err(|e| AuthError::new(path, None, &key, format!("cannot read: {e}")))?;
            let listed = TokenHash::parse_lines(&text)
                .map_err(|(line, form)| AuthError::new(path, Some(line), &key, format!("expected {form}")))?;
            hashes.extend(listed);
        }
        if hashes.is_empty() {
            return Err(AuthError::new(
                config.tokens_file.as_deref().unwrap_or(std::path::Path::new("")),
                None,
                format!("{key}.tokens_file"),
                "holds no token hash: every request would be refused",
            ));
        }
        Ok(Tokens { hashes })
    }

    /// `Some(name)` when `token` is accepted (`Some(None)` for an unnamed one).
    pub(super) fn find(&self, token: &str) -> Option<Option<String>> {
        TokenHash::find(&self.hashes, token.as_bytes()).map(|h| h.name.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::digest::{SHA256, digest};

    fn hash_of(token: &str) -> String {
        digest(&SHA256, token.as_bytes()).as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Inline and file hashes are accepted, named ones give their name; a bad file line names file and line.
    #[test]
    fn tokens_match_by_digest() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens.txt");
        std::fs::write(&file, format!("# ops\n\nops=sha256:{}\n", hash_of("t-file"))).unwrap();
        let config = Bearer {
            tokens: vec![TokenHash::parse(&format!("sha256:{}", hash_of("t-inline"))).unwrap()],
            tokens_file: Some(file.clone()),
        };
        let tokens = Tokens::load(&config, "routes.r.auth").unwrap();
        assert_eq!(tokens.find("t-inline"), Some(None));
        assert_eq!(tokens.find("t-file"), Some(Some("ops".into())));
        assert_eq!(tokens.find("t-other"), None);
        std::fs::write(&file, "sha256:abc\n").unwrap();
        let e = Tokens::load(&config, "routes.r.auth").unwrap_err().to_string();
        assert!(e.contains("tokens.txt:1: routes.r.auth.tokens_file: expected"), "{e}");
    }
}
