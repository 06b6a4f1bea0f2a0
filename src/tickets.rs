//! TLS session resumption that outlives reloads and scales past a cache.
//!
//! A reload builds new rustls server configs, and rustls keeps its resumption state (the session
//! cache and the ticket keys) in the config: without this module every SIGHUP would make every
//! returning client pay a full handshake, at the moment a fleet is busiest. So the state lives
//! here, per listener, and each new config is handed the same one.
//!
//! Resumption is stateless by default: TLS 1.3 tickets (and TLS 1.2 ones, for clients that ask)
//! sealed with random keys of our own that rustls's rotator replaces every 6 hours, so any number
//! of clients can resume without the server remembering them. Rotating and file keys seal alike
//! (AES-256-GCM-SIV), which costs a handshake less than rustls's own ticketer (AES-256-CBC and
//! HMAC-SHA256; docs/performance.md, issue 19). A fleet shares keys through `tls.ticket_keys`, a file of
//! AES-256-GCM keys (the first seals, all open), so a client resumes on whichever replica the
//! balancer picks. A listener that verifies client certificates gets fresh state at every reload,
//! so a revocation list replaced by the reload applies to every client from then on (its docs say
//! what shared keys change about that).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::aead::{AES_256_GCM_SIV, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::digest;
use rustls::crypto::GetRandomFailed;
use rustls::server::{ProducesTickets, ServerSessionMemoryCache, StoresServerSessions};
use rustls::ticketer::TicketRotator;

use crate::config::TlsFiles;

/// How long a ticket sealed with a file key opens.
const FILE_TICKET_LIFETIME_SECS: u32 = 6 * 60 * 60;
/// How long a rotating key seals new tickets; rustls's rotator keeps it one more period to open
/// them, so their tickets open for twice this (as with rustls's own ticketer).
const ROTATION_SECS: u32 = 6 * 60 * 60;
/// Entries of the stateful cache, for TLS 1.2 clients that resume by session ID (rustls's default).
const SESSION_CACHE_ENTRIES: usize = 256;
/// At most this many keys in a `ticket_keys` file: enough for any rotation, few to try.
const MAX_FILE_KEYS: usize = 16;
/// Bytes naming the key a ticket was sealed with, so opening needs no trial decryption.
const KEY_NAME_LEN: usize = 16;
/// A `ticket_keys` file larger than this is refused unread (16 keys with comments fit many times).
const MAX_FILE_BYTES: u64 = 64 * 1024;
/// Larger tickets are not ours: rustls tries each PSK identity a client offers.
const MAX_TICKET_LEN: usize = 16 * 1024;
/// Replicas' clocks may disagree by this much: a ticket issued "in the future" by so little opens.
const CLOCK_SKEW_SECS: u64 = 60;

/// What a listener's server configs share across reloads.
#[derive(Clone)]
pub struct State {
    /// Seals and opens tickets.
    pub ticketer: Arc<dyn ProducesTickets>,
    /// Sessions resumed by ID (TLS 1.2 clients without tickets).
    pub cache: Arc<dyn StoresServerSessions>,
}

/// The resumption state of every listener, kept by the gateway across reloads.
#[derive(Default)]
pub struct Resumption {
    listeners: Mutex<HashMap<String, Kept>>,
}

struct Kept {
    /// What the state was made from; new state is made when it changes.
    source: Source,
    state: State,
}

#[derive(PartialEq, Eq)]
enum Source {
    Rotating,
    /// The SHA-256 of the key file's keys, never the keys.
    File([u8; 32]),
    Off,
}

/// A `ticket_keys` file that cannot be used; names the file and line, never a key.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // The messages say it; the fields are the file and the line.
pub enum TicketKeysError {
    #[error("ticket_keys file {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("ticket_keys file {}: line {line}: not a key (64 hex digits, e.g. from `openssl rand -hex 32`)", path.display())]
    Malformed { path: PathBuf, line: usize },
    #[error("ticket_keys file {}: no key in the file", path.display())]
    Empty { path: PathBuf },
    #[error("ticket_keys file {}: more than {MAX_FILE_KEYS} keys", path.display())]
    TooMany { path: PathBuf },
    #[error("ticket_keys file {}: not a regular file of at most {MAX_FILE_BYTES} bytes", path.display())]
    NotAKeyFile { path: PathBuf },
    #[error("session tickets: {0}")]
    Crypto(String),
}

/// State made for a config being loaded, kept only once that config is in force (see
/// [`Resumption::keep`]).
#[derive(Default)]
#[must_use = "state made for a config is lost unless kept once that config is in force"]
pub struct Made(Vec<(String, Kept)>);

impl Resumption {
    /// The state `listener`'s new server config uses: the one it had, unless the listener
    /// verifies client certificates (fresh at every reload) or its ticket settings changed.
    /// New state goes into `made`, and is the listener's from then on only once kept.
    pub fn state(&self, listener: &str, files: &TlsFiles, made: &mut Made) -> Result<State, TicketKeysError> {
        let keys = match (&files.ticket_keys, files.session_tickets) {
            (Some(path), true) => Some(read_keys(path)?),
            _ => None,
        };
        let source = match (&keys, files.session_tickets) {
            (Some(keys), _) => Source::File(keys.digest()),
            (None, true) => Source::Rotating,
            (None, false) => Source::Off,
        };
        let listeners = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(kept) = listeners.get(listener)
            && kept.source == source
            && files.client_auth.is_none()
        {
            return Ok(kept.state.clone());
        }
        drop(listeners);
        let ticketer: Arc<dyn ProducesTickets> = match keys {
            Some(keys) => Arc::new(keys.into_ticketer(FILE_TICKET_LIFETIME_SECS)?),
            None if files.session_tickets => Arc::new(
                TicketRotator::new(ROTATION_SECS, rotating_key).map_err(|e| TicketKeysError::Crypto(e.to_string()))?,
            ),
            None => Arc::new(NoTickets),
        };
        let state = State { ticketer, cache: ServerSessionMemoryCache::new(SESSION_CACHE_ENTRIES) };
        made.0.push((listener.to_string(), Kept { source, state: state.clone() }));
        Ok(state)
    }

    /// Keeps the state made for the config now in force. A reload that is refused never gets
    /// here, so the state its clients resume with stays that of the config still serving them.
    pub fn keep(&self, made: Made) {
        self.listeners.lock().unwrap_or_else(|p| p.into_inner()).extend(made.0);
    }
}

/// A fresh random key for [`TicketRotator`], its tickets opening while the rotator keeps it.
fn rotating_key() -> Result<Box<dyn ProducesTickets>, GetRandomFailed> {
    let mut raw = [0u8; 32];
    aws_lc_rs::rand::fill(&mut raw).map_err(|_| GetRandomFailed)?;
    let ticketer = FileKeys(vec![raw]).into_ticketer(2 * ROTATION_SECS).map_err(|_| GetRandomFailed)?;
    Ok(Box::new(ticketer))
}

/// A listener with `session_tickets = false`: resumption by the stateful cache only.
#[derive(Debug)]
struct NoTickets;

impl ProducesTickets for NoTickets {
    fn enabled(&self) -> bool {
        false
    }
    fn lifetime(&self) -> u32 {
        0
    }
    fn encrypt(&self, _: &[u8]) -> Option<Vec<u8>> {
        None
    }
    fn decrypt(&self, _: &[u8]) -> Option<Vec<u8>> {
        None
    }
}

/// Keys read from a `ticket_keys` file, in order.
pub struct FileKeys(Vec<[u8; 32]>);

impl FileKeys {
    fn digest(&self) -> [u8; 32] {
        let mut ctx = digest::Context::new(&digest::SHA256);
        for key in &self.0 {
            ctx.update(key);
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }

    /// The ticketer sealing with the first key, opening with any, tickets living `lifetime` seconds.
    fn into_ticketer(self, lifetime: u32) -> Result<KeyTicketer, TicketKeysError> {
        let keys = self
            .0
            .iter()
            .map(|raw| {
                let key = UnboundKey::new(&AES_256_GCM_SIV, raw).map_err(|e| TicketKeysError::Crypto(e.to_string()))?;
                Ok(TicketKey { name: key_name(raw), key: LessSafeKey::new(key) })
            })
            .collect::<Result<Vec<_>, TicketKeysError>>()?;
        Ok(KeyTicketer { keys, lifetime })
    }
}

/// One key per line, 64 hex digits; `#` comments and blank lines skipped. Also what
/// `wsgate check` runs, so a bad file is caught before a reload.
pub fn read_keys(path: &Path) -> Result<FileKeys, TicketKeysError> {
    use std::io::Read;
    let read_err = |source| TicketKeysError::Read { path: path.into(), source };
    // Checked before opening: a FIFO would block the reload, /dev/zero would fill memory.
    let meta = std::fs::metadata(path).map_err(read_err)?;
    if !meta.is_file() || meta.len() > MAX_FILE_BYTES {
        return Err(TicketKeysError::NotAKeyFile { path: path.into() });
    }
    let mut text = String::new();
    std::fs::File::open(path).and_then(|f| f.take(MAX_FILE_BYTES + 1).read_to_string(&mut text)).map_err(read_err)?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(TicketKeysError::NotAKeyFile { path: path.into() });
    }
    let mut keys = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let key = parse_hex_key(line).ok_or(TicketKeysError::Malformed { path: path.into(), line: index + 1 })?;
        keys.push(key);
        if keys.len() > MAX_FILE_KEYS {
            return Err(TicketKeysError::TooMany { path: path.into() });
        }
    }
    if keys.is_empty() {
        return Err(TicketKeysError::Empty { path: path.into() });
    }
    Ok(FileKeys(keys))
}

fn parse_hex_key(text: &str) -> Option<[u8; 32]> {
    let digits = text.as_bytes();
    if digits.len() != 64 {
        return None;
    }
    let mut key = [0u8; 32];
    for (byte, pair) in key.iter_mut().zip(digits.chunks_exact(2)) {
        let hex = |d: u8| (d as char).to_digit(16);
        *byte = (hex(pair[0])? * 16 + hex(pair[1])?) as u8;
    }
    Some(key)
}

/// A key's public name: a domain-separated digest, so the name says nothing about the key.
fn key_name(key: &[u8; 32]) -> [u8; KEY_NAME_LEN] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(b"wsgate ticket key name\0");
    ctx.update(key);
    let mut name = [0u8; KEY_NAME_LEN];
    name.copy_from_slice(&ctx.finish().as_ref()[..KEY_NAME_LEN]);
    name
}

struct TicketKey {
    name: [u8; KEY_NAME_LEN],
    key: LessSafeKey,
}

/// Tickets sealed with the first key and opened with any of the keys (a file's, or one rotating
/// key). A ticket is
/// `name ‖ nonce ‖ AES-256-GCM-SIV(issued-at ‖ session)` with the name as associated data; the
/// issue time inside the seal bounds its life, since rustls leaves that to the ticketer.
/// GCM-SIV because the keys may live long and seal billions of tickets with random nonces: a
/// repeated nonce then reveals only that two tickets were equal, not the key.
struct KeyTicketer {
    keys: Vec<TicketKey>,
    /// Seconds a ticket opens after it was sealed.
    lifetime: u32,
}

impl std::fmt::Debug for KeyTicketer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyTicketer").field("keys", &self.keys.len()).finish()
    }
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl ProducesTickets for KeyTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        self.lifetime
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let sealer = self.keys.first()?;
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).ok()?;
        let mut sealed = Vec::with_capacity(KEY_NAME_LEN + NONCE_LEN + 8 + plain.len() + 16);
        sealed.extend_from_slice(&sealer.name);
        sealed.extend_from_slice(&nonce);
        let mut body = Vec::with_capacity(8 + plain.len() + 16);
        body.extend_from_slice(&now_secs().to_be_bytes());
        body.extend_from_slice(plain);
        sealer
            .key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(&sealer.name), &mut body)
            .ok()?;
        sealed.extend_from_slice(&body);
        Some(sealed)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.decrypt_at(cipher, now_secs())
    }
}

impl KeyTicketer {
    /// [`ProducesTickets::decrypt`] as if the time were `now` (seconds since the epoch).
    fn decrypt_at(&self, cipher: &[u8], now: u64) -> Option<Vec<u8>> {
        if cipher.len() > MAX_TICKET_LEN {
            return None;
        }
        let (name, rest) = cipher.split_at_checked(KEY_NAME_LEN)?;
        let (nonce, sealed) = rest.split_at_checked(NONCE_LEN)?;
        let opener = self.keys.iter().find(|k| k.name == name)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = sealed.to_vec();
        let plain = opener.key.open_in_place(nonce, Aad::from(&opener.name), &mut body).ok()?;
        let (issued, session) = plain.split_at_checked(8)?;
        let issued = u64::from_be_bytes(issued.try_into().ok()?);
        if issued > now.saturating_add(CLOCK_SKEW_SECS) {
            return None;
        }
        let age = now.saturating_sub(issued);
        (age <= u64::from(self.lifetime)).then(|| session.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ticketer(keys: &[[u8; 32]]) -> KeyTicketer {
        FileKeys(keys.to_vec()).into_ticketer(FILE_TICKET_LIFETIME_SECS).unwrap()
    }

    #[test]
    fn a_ticket_opens_with_the_same_keys_and_with_any_later_file_that_keeps_its_key() {
        let (old, new) = ([1u8; 32], [2u8; 32]);
        let sealed = ticketer(&[old]).encrypt(b"session state").unwrap();
        assert_eq!(ticketer(&[old]).decrypt(&sealed).as_deref(), Some(&b"session state"[..]));
        // Rotation: a new key put first seals, the old one still opens.
        let rotated = ticketer(&[new, old]);
        assert_eq!(rotated.decrypt(&sealed).as_deref(), Some(&b"session state"[..]));
        assert_eq!(rotated.decrypt(&rotated.encrypt(b"x").unwrap()).as_deref(), Some(&b"x"[..]));
        // Once the old key is gone its tickets open no more.
        assert_eq!(ticketer(&[new]).decrypt(&sealed), None);
    }

    #[test]
    fn a_tampered_truncated_or_foreign_ticket_does_not_open() {
        let t = ticketer(&[[7u8; 32]]);
        let sealed = t.encrypt(b"session state").unwrap();
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert_eq!(t.decrypt(&bad), None, "byte {i} flipped");
        }
        for len in 0..sealed.len() {
            assert_eq!(t.decrypt(&sealed[..len]), None, "truncated to {len}");
        }
        assert_eq!(ticketer(&[[8u8; 32]]).decrypt(&sealed), None);
    }

    /// A ticket opens for its lifetime and not a second longer; one from a replica whose clock
    /// runs a little ahead opens, one from far in the future does not.
    #[test]
    fn a_ticket_opens_for_its_lifetime_only() {
        let t = ticketer(&[[5u8; 32]]);
        let sealed = t.encrypt(b"s").unwrap();
        let now = now_secs();
        let life = u64::from(FILE_TICKET_LIFETIME_SECS);
        assert!(t.decrypt_at(&sealed, now + life - 5).is_some());
        assert!(t.decrypt_at(&sealed, now + life + 5).is_none());
        assert!(t.decrypt_at(&sealed, now - 30).is_some(), "skew within 60 s");
        assert!(t.decrypt_at(&sealed, now - 300).is_none(), "issued 5 minutes in the future");
        assert!(t.decrypt(&vec![0u8; MAX_TICKET_LEN + 1]).is_none());
    }

    /// Without `ticket_keys`, tickets are sealed with a rotating key of our own: they open on the
    /// listener that sealed them, for the rotation period twice over, and nowhere else.
    #[test]
    fn rotating_keys_seal_tickets_that_open_for_two_periods_on_their_listener_only() {
        let files = |name: &str| TlsFiles {
            cert: name.into(),
            key: name.into(),
            generate_self_signed: false,
            client_auth: None,
            session_tickets: true,
            ticket_keys: None,
        };
        let resumption = Resumption::default();
        let state = resumption.state("edge", &files("edge"), &mut Made::default()).unwrap();
        let sealed = state.ticketer.encrypt(b"session state").unwrap();
        assert_eq!(state.ticketer.decrypt(&sealed).as_deref(), Some(&b"session state"[..]));
        assert_eq!(state.ticketer.lifetime(), 2 * ROTATION_SECS);
        let other = resumption.state("other", &files("other"), &mut Made::default()).unwrap();
        assert_eq!(other.ticketer.decrypt(&sealed), None);
        let key = rotating_key().unwrap();
        assert_eq!(key.lifetime(), 2 * ROTATION_SECS);
        assert_ne!(key.encrypt(b"same"), rotating_key().unwrap().encrypt(b"same"));
    }

    /// A reload that made new state and was then refused leaves the kept state as it was: the
    /// next reload with the settings in force resumes with the same keys.
    #[test]
    fn state_made_for_a_refused_reload_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        std::fs::write(&keys, format!("{}\n", "ab".repeat(32))).unwrap();
        let files = |ticket_keys: Option<PathBuf>| TlsFiles {
            cert: "c".into(),
            key: "k".into(),
            generate_self_signed: false,
            client_auth: None,
            session_tickets: true,
            ticket_keys,
        };
        let resumption = Resumption::default();
        let mut made = Made::default();
        let running = resumption.state("edge", &files(None), &mut made).unwrap();
        resumption.keep(made);
        let sealed = running.ticketer.encrypt(b"session state").unwrap();
        // A reload to a key file, made and then refused (another file in it failed).
        let refused = resumption.state("edge", &files(Some(keys.clone())), &mut Made::default()).unwrap();
        assert_eq!(refused.ticketer.decrypt(&sealed), None);
        // The next reload, with the running settings, gets the running state.
        let next = resumption.state("edge", &files(None), &mut Made::default()).unwrap();
        assert!(Arc::ptr_eq(&next.ticketer, &running.ticketer));
        assert_eq!(next.ticketer.decrypt(&sealed).as_deref(), Some(&b"session state"[..]));
        // A reload to the key file that is applied keeps its state for the next.
        let mut made = Made::default();
        let applied = resumption.state("edge", &files(Some(keys.clone())), &mut made).unwrap();
        resumption.keep(made);
        let after = resumption.state("edge", &files(Some(keys)), &mut Made::default()).unwrap();
        assert!(Arc::ptr_eq(&after.ticketer, &applied.ticketer));
    }

    #[test]
    fn two_tickets_for_the_same_session_differ() {
        let t = ticketer(&[[3u8; 32]]);
        assert_ne!(t.encrypt(b"same").unwrap(), t.encrypt(b"same").unwrap());
    }

    #[test]
    fn key_files_are_read_line_by_line_and_errors_name_the_line_never_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        let good = "ab".repeat(32);
        std::fs::write(&path, format!("# rotated 2026-12-04\n\n{good}\n{}\n", "CD".repeat(32))).unwrap();
        let keys = read_keys(&path).unwrap();
        assert_eq!(keys.0, vec![[0xab; 32], [0xcd; 32]]);

        let secret = "ef".repeat(31);
        std::fs::write(&path, format!("{good}\n{secret}\n")).unwrap();
        let e = read_keys(&path).err().unwrap().to_string();
        assert!(e.ends_with("line 2: not a key (64 hex digits, e.g. from `openssl rand -hex 32`)"), "{e}");
        assert!(!e.contains(&secret), "{e}");

        assert!(matches!(read_keys(Path::new("/dev/zero")), Err(TicketKeysError::NotAKeyFile { .. })));
        assert!(matches!(read_keys(dir.path()), Err(TicketKeysError::NotAKeyFile { .. })));
        std::fs::write(&path, "#".repeat(MAX_FILE_BYTES as usize + 1)).unwrap();
        assert!(matches!(read_keys(&path), Err(TicketKeysError::NotAKeyFile { .. })));
        std::fs::write(&path, "# nothing yet\n").unwrap();
        assert!(read_keys(&path).err().unwrap().to_string().ends_with("no key in the file"));
        std::fs::write(&path, format!("{good}\n").repeat(MAX_FILE_KEYS + 1)).unwrap();
        assert!(read_keys(&path).err().unwrap().to_string().ends_with("more than 16 keys"));
        assert!(parse_hex_key(&"g".repeat(64)).is_none());
        assert!(parse_hex_key(&"+1".repeat(32)).is_none());
    }
}
