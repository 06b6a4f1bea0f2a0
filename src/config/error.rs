//! Config problems and how they read: [`ConfigError`] (one problem on one line) and
//! [`ConfigErrors`] (every problem in a file), plus the conversion of a toml parse error.
//!
//! It exists so that both stages report alike: a toml error (syntax, unknown or missing key,
//! wrong type) and a validation problem both come out as `file[:line:col]: key: problem`.

use std::fmt;
use std::path::{Path, PathBuf};

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// 1-based line and column, when the problem has a position in the file.
    pub position: Option<(usize, usize)>,
    /// The dotted key (`routes.vnc.backend`), or empty when the problem is with the whole file.
    pub key: String,
    /// What is wrong, lower-case, no trailing period.
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some((line, col)) = self.position {
            write!(f, ":{line}:{col}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.problem)
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found in a config file; never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl ConfigError {
    /// A problem at byte offset `at` of `text`, the file's contents.
    pub(super) fn at(file: &Path, text: &str, at: usize, key: String, problem: String) -> ConfigError {
        ConfigError { file: file.to_path_buf(), position: Some(line_col(text, at)), key, problem }
    }
}

/// Turns a toml error into one line, naming the key where the file shows it.
pub(super) fn toml_error(err: &toml::de::Error, text: &str, path: &Path) -> ConfigError {
    let message = err.message().trim().trim_end_matches('.').to_string();
    let (position, key) = match err.span() {
        Some(span) => {
            let (line, col) = line_col(text, span.start);
            (Some((line, col)), key_at(text, line, &message))
        }
        None => (None, String::new()),
    };
    ConfigError { file: path.to_path_buf(), position, key, problem: message }
}

pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// The dotted key at 1-based `line`: the nearest table header above it plus the key on the line.
/// For "missing field `x`" the error points at the table, so the field comes from the message.
fn key_at(text: &str, line: usize, message: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let here = lines.get(line.saturating_sub(1)).copied().unwrap_or("").trim();
    let header = |l: &str| -> Option<String> {
        let l = l.trim();
        let inner = l
            .strip_prefix("[[")
            .and_then(|r| r.split_once("]]"))
            .map(|(h, _)| h)
            .or_else(|| l.strip_prefix('[').and_then(|r| r.split_once(']')).map(|(h, _)| h))?;
        Some(inner.trim().replace(['"', '\''], ""))
    };
    let table = lines[..line.saturating_sub(1).min(lines.len())].iter().rev().find_map(|l| header(l));
    let missing = message.strip_prefix("missing field `").and_then(|r| r.split_once('`')).map(|(f, _)| f.to_string());
    let join = |t: Option<String>, k: String| match t {
        Some(t) if !t.is_empty() => format!("{t}.{k}"),
        _ => k,
    };
    if let Some(h) = header(here) {
        return match missing {
            Some(field) => format!("{h}.{field}"),
            None => h,
        };
    }
    if let Some((k, _)) = here.split_once('=') {
        let k = k.trim().replace(['"', '\''], "");
        // A field missing from an inline table (`tls = { cert = ".." }`) is reported there.
        let k = match missing {
            Some(field) => format!("{k}.{field}"),
            None => k,
        };
        return join(table, k);
    }
    match missing {
        Some(field) => join(table, field),
        None => table.unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::{MINIMAL, err};

    /// An unknown key keeps toml's line and column and is named with its table.
    #[test]
    fn unknown_key_keeps_line_and_column_and_names_the_key() {
        let e = err(&format!("{MINIMAL}bogus = 1\n"));
        assert!(e.starts_with("test.toml:7:1: routes.echo.bogus: unknown field `bogus`"), "{e}");
    }

    /// A value of the wrong type names its dotted key.
    #[test]
    fn wrong_type_names_the_key() {
        let e = err(&format!("{MINIMAL}[limits]\nmax_connections = \"many\"\n"));
        assert!(e.starts_with("test.toml:8:"), "{e}");
        assert!(e.contains("limits.max_connections"), "{e}");
    }

    /// A missing required key is named with its table.
    #[test]
    fn missing_field_names_the_key() {
        let e = err("[listeners.plain]\naddress = \"127.0.0.1:1\"\n[routes.echo]\npath = \"/echo\"\n");
        assert!(e.contains("routes.echo.backend") && e.contains("missing field"), "{e}");
    }
}
