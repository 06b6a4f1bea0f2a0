//! The wsgate control channel: in-band signals between `wsgate connect` (or any client that
//! implements `docs/control.md`) and the gateway, beside the session's data.
//!
//! A client asks for it with the request header [`HEADER`]`: 1`; a gateway that speaks it
//! answers with the same header in its 101. From then on the client sends its data as binary
//! messages only, and each text message it sends is one control message: a JSON object whose
//! `type` names the control ([`Control`]). Browsers never send the header and see no change.
//! Pure: the bridge decides what a control does, the client when to send one.

use bytes::{BufMut, Bytes, BytesMut};

/// The request and response header that negotiates the control channel.
pub const HEADER: &str = "wsgate-control";

/// The one version this build speaks, as the header's value.
pub const VERSION: &str = "1";

/// A control message, as the gateway understands it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// The client has no more data: the gateway shuts down the backend's write side
    /// (`shutdown(SHUT_WR)`) and keeps relaying what the backend still sends until its EOF.
    ShutdownWrite,
}

/// The wire form of [`Control::ShutdownWrite`].
const SHUTDOWN_WRITE: &str = r#"{"v":1,"type":"shutdown_write"}"#;

/// Whether a request's `wsgate-control` header value asks for a version this build speaks: a
/// comma-separated list of versions, any of which may be ours.
pub fn is_requested(value: &[u8]) -> bool {
    value.split(|b| *b == b',').any(|v| v.trim_ascii() == VERSION.as_bytes())
}

impl Control {
    /// Reads a control message's text; `None` for a message that is not one this version knows.
    pub fn parse(text: &[u8]) -> Option<Control> {
        #[derive(serde::Deserialize)]
        struct Wire<'a> {
            #[serde(borrow, rename = "type")]
            kind: &'a str,
        }
        match serde_json::from_slice::<Wire<'_>>(text).ok()?.kind {
            "shutdown_write" => Some(Control::ShutdownWrite),
            _ => None,
        }
    }

    /// The message's text.
    pub fn text(self) -> &'static str {
        match self {
            Control::ShutdownWrite => SHUTDOWN_WRITE,
        }
    }

    /// The message as a frame buffer for `frames::frame_masked`: `headroom` bytes, then the text.
    pub fn frame_buffer(self, headroom: usize) -> BytesMut {
        let text = self.text();
        let mut buf = BytesMut::with_capacity(headroom + text.len());
        buf.put_bytes(0, headroom);
        buf.put_slice(text.as_bytes());
        buf
    }

    /// The message's text as bytes.
    pub fn bytes(self) -> Bytes {
        Bytes::from_static(self.text().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wire form reads back; unknown types, other JSON and garbage are not controls.
    #[test]
    fn control_messages_parse() {
        assert_eq!(Control::parse(Control::ShutdownWrite.text().as_bytes()), Some(Control::ShutdownWrite));
        assert_eq!(Control::parse(br#"{"type":"shutdown_write","v":1,"extra":true}"#), Some(Control::ShutdownWrite));
        assert_eq!(Control::parse(br#"{"v":1,"type":"resume"}"#), None);
        assert_eq!(Control::parse(b"shutdown_write"), None);
        assert_eq!(Control::parse(b"{}"), None);
    }

    /// The header asks for version 1 alone or in a list; other versions do not.
    #[test]
    fn header_values() {
        assert!(is_requested(b"1"));
        assert!(is_requested(b"2, 1"));
        assert!(!is_requested(b"2"));
        assert!(!is_requested(b""));
    }
}
