//! `wsgate probe`: one HTTP GET to the admin listener's `/healthz` (or any plain-HTTP URL),
//! answered by an exit code.
//!
//! It exists so a container image with no shell, curl or wget (the `FROM scratch` image in
//! `deploy/container/`) can still carry a health check: `HEALTHCHECK CMD ["/wsgate", "probe"]`.
//! The request is written by hand over a blocking `std::net::TcpStream`: the answer needs only
//! the status line, so neither a runtime nor an HTTP client is worth starting for it, and every
//! step is bounded by one deadline. Plain HTTP only: an admin listener served over TLS is
//! probed by the orchestrator's own HTTPS check instead (docs/deploy.md, "Container image").

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// What `wsgate probe` asks when given no URL: the admin listener's default address.
pub const DEFAULT_URL: &str = "http://127.0.0.1:9090/healthz";

/// The most of the response that is read looking for the end of the status line.
const MAX_STATUS_LINE: usize = 1024;

/// Why a probe failed; each is one line naming what was asked.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The URL is not `http://host[:port][/path]`.
    #[error("{url}: not a plain http:// URL ({why})")]
    Url {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The host name did not resolve to any address.
    #[error("{authority}: cannot resolve: {source}")]
    Resolve {
        /// `host:port`.
        authority: String,
        /// The resolver's error.
        source: std::io::Error,
    },
    /// No address accepted the connection (refused, unreachable).
    #[error("connect {addr}: {source}")]
    Connect {
        /// The last address tried.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The deadline passed before a status line arrived.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Writing the request or reading the answer failed.
    #[error("{0}")]
    Io(std::io::Error),
    /// The peer did not answer with an HTTP/1.x status line.
    #[error("not an HTTP response: {0:?}")]
    NotHttp(String),
    /// An answer, but not a 2xx.
    #[error("HTTP {status} {reason}")]
    Status {
        /// The status code.
        status: u16,
        /// The reason phrase, printable ASCII only and at most 64 characters: it goes to a
        /// terminal or a health log, so whatever answered must not write escape sequences there.
        reason: String,
    },
}

/// A parsed `http://host[:port][/path]`.
#[derive(Debug, PartialEq, Eq)]
struct Url<'a> {
    /// As written in the URL, brackets included for IPv6 (also what goes in `Host`).
    host: &'a str,
    port: u16,
    path: &'a str,
}

fn parse(url: &str) -> Result<Url<'_>, ProbeError> {
    let bad = |why| ProbeError::Url { url: url.to_string(), why };
    let rest = match url.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
        Some((scheme, _)) if scheme.eq_ignore_ascii_case("https") => {
            return Err(bad("https is not supported by wsgate probe; probe the admin listener over plain HTTP"));
        }
        _ => return Err(bad("expected http://host[:port][/path]")),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.contains('@') {
        return Err(bad("credentials in the URL are not supported"));
    }
    // The path goes into the request line as it is: nothing that would end or split it.
    if url.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(bad("spaces and control characters must be percent-encoded"));
    }
    // `[v6]:port`, `[v6]`, `host:port`, `host`.
    let (host, port) = if let Some(end) = authority.strip_prefix('[').and_then(|a| a.find(']')) {
        let host = &authority[..end + 2];
        match &authority[end + 2..] {
            "" => (host, None),
            p => (host, Some(p.strip_prefix(':').ok_or_else(|| bad("junk after the IPv6 address"))?)),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    let port = match port {
        None => 80,
        Some(p) => p.parse().ok().filter(|&p| p != 0).ok_or_else(|| bad("the port is not 1..=65535"))?,
    };
    Ok(Url { host, port, path })
}

/// GETs `url` and returns the status if it is 2xx; every step (resolve aside: the system
/// resolver has no deadline of its own, and the default URL needs none) within `timeout`.
pub fn probe(url: &str, timeout: Duration) -> Result<u16, ProbeError> {
    let parsed = parse(url)?;
    let deadline = Instant::now() + timeout;
    let left =
        || deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()).ok_or(ProbeError::Timeout(timeout));
    let authority = format!("{}:{}", parsed.host, parsed.port);
    let lookup = parsed.host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = (lookup, parsed.port)
        .to_socket_addrs()
        .map_err(|source| ProbeError::Resolve { authority: authority.clone(), source })?
        .collect();
    let mut last = None;
    let mut stream = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, left()?) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return Err(ProbeError::Timeout(timeout)),
            Err(source) => last = Some(ProbeError::Connect { addr, source }),
        }
    }
    let mut stream = match (stream, last) {
        (Some(s), _) => s,
        (None, Some(e)) => return Err(e),
        (None, None) => {
            let source = std::io::Error::new(std::io::ErrorKind::NotFound, "no addresses");
            return Err(ProbeError::Resolve { authority, source });
        }
    };
    let io = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => ProbeError::Timeout(timeout),
        _ => ProbeError::Io(e),
    };
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: wsgate-probe\r\nConnection: close\r\n\r\n",
        parsed.path, authority
    );
    stream.set_write_timeout(Some(left()?)).map_err(io)?;
    stream.write_all(request.as_bytes()).map_err(io)?;
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 256];
    let line_end = loop {
        if let Some(i) = head.windows(2).position(|w| w == b"\r\n") {
            break i;
        }
        if head.len() >= MAX_STATUS_LINE {
            return Err(ProbeError::NotHttp(String::from_utf8_lossy(&head[..64]).into_owned()));
        }
        stream.set_read_timeout(Some(left()?)).map_err(io)?;
        match stream.read(&mut buf).map_err(io)? {
            0 => return Err(ProbeError::NotHttp(String::from_utf8_lossy(&head).into_owned())),
            n => head.extend_from_slice(&buf[..n]),
        }
    };
    status(&String::from_utf8_lossy(&head[..line_end]))
}

/// `HTTP/1.1 200 OK` → 200; a non-2xx status is an error carrying it.
fn status(line: &str) -> Result<u16, ProbeError> {
    let not_http = || ProbeError::NotHttp(line.to_string());
    let mut parts = line.splitn(3, ' ');
    if !parts.next().is_some_and(|v| v.starts_with("HTTP/1.")) {
        return Err(not_http());
    }
    let code = parts.next().filter(|c| c.len() == 3).and_then(|c| c.parse::<u16>().ok()).ok_or_else(not_http)?;
    match code {
        200..=299 => Ok(code),
        _ => {
            let reason = parts.next().unwrap_or("").chars().filter(|c| c.is_ascii_graphic() || *c == ' ').take(64);
            Err(ProbeError::Status { status: code, reason: reason.collect() })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(parse(DEFAULT_URL).unwrap(), Url { host: "127.0.0.1", port: 9090, path: "/healthz" });
        assert_eq!(parse("http://gw").unwrap(), Url { host: "gw", port: 80, path: "/" });
        assert_eq!(parse("HTTP://[::1]:9090/readyz").unwrap(), Url { host: "[::1]", port: 9090, path: "/readyz" });
        assert_eq!(parse("http://[::1]/x").unwrap(), Url { host: "[::1]", port: 80, path: "/x" });
        for bad in [
            "https://127.0.0.1:9090/healthz",
            "127.0.0.1:9090",
            "http://:9090/",
            "http://h:0/",
            "http://h:x/",
            "http://u@h/",
        ] {
            assert!(matches!(parse(bad), Err(ProbeError::Url { .. })), "{bad}");
        }
    }

    #[test]
    fn status_lines() {
        assert_eq!(status("HTTP/1.1 200 OK").unwrap(), 200);
        assert_eq!(status("HTTP/1.0 204 No Content").unwrap(), 204);
        assert!(matches!(status("HTTP/1.1 503 Service Unavailable"), Err(ProbeError::Status { status: 503, .. })));
        assert!(matches!(status("HTTP/1.1 301 Moved"), Err(ProbeError::Status { status: 301, .. })));
        let hostile = status("HTTP/1.1 500 \x1b[2J\x1b[31mFAKE\x07").unwrap_err().to_string();
        assert_eq!(hostile, "HTTP 500 [2J[31mFAKE");
        assert!(parse("http://127.0.0.1:9090/a b").is_err());
        assert!(parse("http://127.0.0.1:9090/a\r\nX: y").is_err());
        assert!(matches!(status("SSH-2.0-OpenSSH_9.2"), Err(ProbeError::NotHttp(_))));
        assert!(matches!(status("HTTP/1.1 2000 OK"), Err(ProbeError::NotHttp(_))));
    }
}
