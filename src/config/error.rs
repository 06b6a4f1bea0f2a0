//! Config problems and how they read: [`ConfigError`] (one problem on one line) and
//! [`ConfigErrors`] (every problem in a file), plus the conversion of a toml parse error.
//!
//! It exists so that both stages report alike: a toml error (syntax, unknown or missing key,
//! wrong type) and a validation problem both come out as `file[:line:col]: key: problem`. The
//! dotted key of a toml error is found in the document's parsed structure by the error's span,
//! never by scanning the text for table headers.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::de::{DeTable, DeValue};

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

/// Turns a toml error into one line, naming the key that the error's span falls on.
pub(super) fn toml_error(err: &toml::de::Error, text: &str, path: &Path) -> ConfigError {
    let problem = err.message().trim().trim_end_matches('.').to_string();
    let Some(span) = err.span() else {
        return ConfigError { file: path.to_path_buf(), position: None, key: String::new(), problem };
    };
    // The recovering parser still yields the keys around a syntax error (an empty value included).
    let (document, _) = DeTable::parse_recoverable(text);
    let mut key = key_path(document.get_ref(), span.start).join(".");
    // A missing field has no span of its own: the error points at the table that lacks it, and
    // only serde's message names the field.
    if let Some((field, _)) = problem.strip_prefix("missing field `").and_then(|r| r.split_once('`')) {
        key = if key.is_empty() { field.to_string() } else { format!("{key}.{field}") };
    }
    ConfigError::at(path, text, span.start, key, problem)
}

/// The dotted key of the error at byte `at`: the key or value whose span holds it or, when none
/// does (a syntax error the parser recovered from by dropping the value, a duplicate key), the
/// key being written, which is the last one that starts before it.
fn key_path(table: &DeTable<'_>, at: usize) -> Vec<String> {
    let held = path_holding(table, at);
    if !held.is_empty() {
        return held;
    }
    last_key_before(table, at).map(|(_, path)| path).unwrap_or_default()
}

/// The keys from the root down to the deepest key or value whose span holds `at`. Every table
/// is searched, not only those whose span holds `at`: a `[header]` table's span covers the
/// header alone, not the keys below it.
fn path_holding(table: &DeTable<'_>, at: usize) -> Vec<String> {
    for (key, value) in table.iter() {
        let inner = match value.get_ref() {
            DeValue::Table(t) => path_holding(t, at),
            _ => Vec::new(),
        };
        if !inner.is_empty() || holds(key.span(), at) || holds(value.span(), at) {
            let mut path = vec![key.get_ref().to_string()];
            path.extend(inner);
            return path;
        }
    }
    Vec::new()
}

/// The path of the key with the greatest start at or before `at`, and that start. Tables are
/// kept in key order, not file order, so every one is searched.
fn last_key_before(table: &DeTable<'_>, at: usize) -> Option<(usize, Vec<String>)> {
    let mut best: Option<(usize, Vec<String>)> = None;
    for (key, value) in table.iter() {
        let mut found = (key.span().start <= at).then(|| (key.span().start, Vec::new()));
        if let DeValue::Table(t) = value.get_ref() {
            found = last_key_before(t, at).or(found);
        }
        if let Some((start, mut path)) = found.filter(|(start, _)| best.as_ref().is_none_or(|(b, _)| start > b)) {
            path.insert(0, key.get_ref().to_string());
            best = Some((start, path));
        }
    }
    best
}

/// Whether `span` holds `at`; an empty span (a value missing after `=`) holds its own start.
fn holds(span: Range<usize>, at: usize) -> bool {
    span.contains(&at) || (span.is_empty() && span.start == at)
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset.min(text.len())).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
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

    /// A syntax error (a value missing after `=`) still names the key it happened at.
    #[test]
    fn syntax_error_names_the_key() {
        let e = err(&format!("{MINIMAL}[limits]\nmax_connections = \n"));
        assert!(e.starts_with("test.toml:8:19: limits.max_connections: "), "{e}");
    }

    /// A syntax error the parser recovers from by dropping the value, and a duplicate key, name
    /// the key being written.
    #[test]
    fn recovered_syntax_errors_name_the_key_being_written() {
        let e = err(&format!("{MINIMAL}x = = 1\n"));
        assert!(e.starts_with("test.toml:7:5: routes.echo.x: "), "{e}");
        let e = err(&format!("{MINIMAL}[limits]\nmax_connections = 1\nmax_connections = 2\n"));
        assert!(e.starts_with("test.toml:9:1: limits.max_connections: duplicate key"), "{e}");
    }

    /// A field missing from an inline table is named below the key that holds the table.
    #[test]
    fn missing_field_of_an_inline_table_names_the_key() {
        let e = err(&format!("{MINIMAL}[listeners.secure]\naddress = \"127.0.0.1:1\"\ntls = {{ cert = \"c.pem\" }}\n"));
        assert!(e.starts_with("test.toml:9:7: listeners.secure.tls.key: missing field `key`"), "{e}");
    }

    /// An unknown table is named itself, and a wrong type inside an array names the array's key.
    #[test]
    fn unknown_table_and_array_items_name_their_key() {
        let e = err(&format!("{MINIMAL}[bogus]\nx = 1\n"));
        assert!(e.starts_with("test.toml:7:2: bogus: unknown field `bogus`"), "{e}");
        let e = err(&format!("{MINIMAL}subprotocols = [\"a\", 5]\n"));
        assert!(e.starts_with("test.toml:7:22: routes.echo.subprotocols: invalid type"), "{e}");
    }
}
