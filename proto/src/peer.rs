//! The peer link between two chatd daemons.
//!
//! It opens the way WebSocket does: the initiator sends an HTTP/1.1 `CHAT`
//! request naming itself, asking to upgrade to `chat-peer/2`; the other side
//! answers `101 Switching Protocols` (or an error status with a reason, and
//! closes). The two carry the handshake of [`crate::crypto`] in
//! `Chat-Handshake` headers. From then on both sides exchange
//! length-prefixed postcard [`PeerFrame`]s (see [`crate::frame`]), sealed
//! in that module's records.
//!
//! Messages carry ids and are acknowledged by the receiving daemon once it
//! has stored them; either side sends pings when it has nothing else to
//! say, so a peer that vanished is noticed by the silence.

use serde::{Deserialize, Serialize};

use crate::ClientId;
use crate::crypto;
use crate::rendezvous::{
    ErrorStatus, Failure, HeadError, MAX_HEAD, MAX_HEADERS, Method, Response, ResponseFraming,
    Writer, headers_body_length,
};

/// The protocol named in `Upgrade`.
pub const UPGRADE: &str = "chat-peer/2";
/// The header carrying a handshake message, as hex.
pub const HANDSHAKE_HEADER: &str = "Chat-Handshake";
/// The largest frame on the link.
pub const MAX_FRAME: usize = 64 * 1024;
/// The longest message text, in bytes of UTF-8.
pub const MAX_TEXT: usize = 16 * 1024;

/// One frame on an upgraded link.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerFrame {
    /// A message; `id` is unique on this link, `sent_ms` is the sender's
    /// clock in milliseconds since the Unix epoch.
    Message { id: u64, sent_ms: i64, text: String },
    /// The message `id` is stored by the receiver.
    Ack { id: u64 },
    /// Nothing to say; still here.
    Ping,
    /// The sender is leaving the chat.
    Bye,
}

/// The initiator's opening request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub id: ClientId,
    /// The initiator keeps the walkie-talkie discipline (it writes first).
    pub turns: bool,
}

impl Hello {
    /// The request, with `handshake`, the caller's first handshake
    /// message ([`crate::crypto::Calling::start`]).
    pub fn encode(&self, host: &str, handshake: &[u8], out: &mut Vec<u8>) {
        let mut w = Writer(out);
        w.request_line(Method::Chat.as_str());
        w.header("Host", host);
        w.header("Client-Id", &self.id);
        w.header("Connection", "Upgrade");
        w.header("Upgrade", UPGRADE);
        if self.turns {
            w.header("Chat-Turns", "on");
        }
        w.header(HANDSHAKE_HEADER, &crate::token::to_hex(handshake));
        w.end_head();
    }
}

/// The answer to a [`Hello`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// `101`: the link is open; `id` is the responder, `handshake` its
    /// answer to the caller's handshake message.
    Accepted { id: ClientId, handshake: Vec<u8> },
    /// Any other status, with its reason.
    Refused { status: u16, reason: String },
}

impl Answer {
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Answer::Accepted { id, handshake } => {
                let mut w = Writer(out);
                w.status(101, "Switching Protocols");
                w.header("Connection", "Upgrade");
                w.header("Upgrade", UPGRADE);
                w.header("Client-Id", id);
                w.header(HANDSHAKE_HEADER, &crate::token::to_hex(handshake));
                w.end_head();
            }
            // Written as the server writes its errors: one format, one
            // table of reason phrases.
            Answer::Refused { status, reason } => Response::Error(Failure::new(
                ErrorStatus::from_code(*status, Method::Chat),
                reason.as_str(),
            ))
            .encode(
                out,
                &ResponseFraming {
                    close: true,
                    ..ResponseFraming::default()
                },
            ),
        }
    }
}

/// Why an opening could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("not a chat-peer handshake: {0}")]
    Malformed(String),
    #[error("handshake larger than {MAX_HEAD} bytes")]
    TooLarge,
}

impl HandshakeError {
    /// The status a daemon refuses such an opening with.
    pub fn status(&self) -> u16 {
        match self {
            HandshakeError::Malformed(_) => 400,
            HandshakeError::TooLarge => 431,
        }
    }
}

/// A handshake to refuse: the status and the reason to send.
pub type Refusal = (u16, String);

/// A complete opening request.
#[derive(Debug)]
pub struct Opening {
    /// The hello and the caller's handshake message, or why to refuse
    /// them.
    pub hello: Result<(Hello, Vec<u8>), Refusal>,
    /// Bytes of `buf` the request took.
    pub used: usize,
}

/// The length of a complete head, `None` while it is still arriving.
fn head_length(
    parsed: httparse::Result<usize>,
    buf: &[u8],
) -> Result<Option<usize>, HandshakeError> {
    crate::rendezvous::head_length(parsed, buf).map_err(|e| match e {
        HeadError::TooLarge => HandshakeError::TooLarge,
        HeadError::Malformed(e) => {
            HandshakeError::Malformed(crate::rendezvous::malformed(e).into())
        }
    })
}

/// A header's value, trimmed, when it is text.
fn header<'a>(headers: &[httparse::Header<'a>], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .map(str::trim)
}

/// Parses the initiator's request from the front of `buf`: `None` until the
/// whole head has arrived; with it, the bytes consumed. An inner `Err` is a
/// well-formed request to refuse, with the status and reason to send.
pub fn parse_hello(buf: &[u8]) -> Result<Option<Opening>, HandshakeError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let Some(used) = head_length(req.parse(buf), buf)? else {
        return Ok(None);
    };
    let get = |name: &str| header(req.headers, name);
    let hello = (|| {
        if req.method != Some("CHAT") {
            return Err((
                400,
                format!(
                    "expected a CHAT request, got {:?}",
                    req.method.unwrap_or("")
                ),
            ));
        }
        let upgrade = get("Upgrade").unwrap_or("");
        if !upgrade.eq_ignore_ascii_case(UPGRADE) {
            return Err((
                426,
                format!(
                    "send Upgrade: {UPGRADE}; this chatd speaks only the encrypted peer link (is the caller's chatd older?)"
                ),
            ));
        }
        let id = get("Client-Id")
            .ok_or((400, "missing Client-Id header".to_owned()))?
            .parse::<ClientId>()
            .map_err(|e| (400, format!("bad Client-Id: {e}")))?;
        let turns = get("Chat-Turns").is_some_and(|v| v.eq_ignore_ascii_case("on"));
        let handshake = handshake_of(get(HANDSHAKE_HEADER)).ok_or_else(|| {
            (
                400,
                format!(
                    "missing or bad {HANDSHAKE_HEADER} header: {} hex digits",
                    2 * crypto::HANDSHAKE_LEN
                ),
            )
        })?;
        Ok((Hello { id, turns }, handshake))
    })();
    Ok(Some(Opening { hello, used }))
}

/// A handshake message from its header, if it is one.
fn handshake_of(value: Option<&str>) -> Option<Vec<u8>> {
    crate::token::from_hex(value?).filter(|h| h.len() == crypto::HANDSHAKE_LEN)
}

/// Parses the responder's answer from the front of `buf`.
pub fn parse_answer(buf: &[u8]) -> Result<Option<(Answer, usize)>, HandshakeError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let Some(head) = head_length(resp.parse(buf), buf)? else {
        return Ok(None);
    };
    let get = |name: &str| header(resp.headers, name);
    let status = resp.code.unwrap_or(0);
    if status == 101 {
        let id = get("Client-Id")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| HandshakeError::Malformed("101 without a valid Client-Id".into()))?;
        let handshake = handshake_of(get(HANDSHAKE_HEADER)).ok_or_else(|| {
            HandshakeError::Malformed(format!("101 without a valid {HANDSHAKE_HEADER}"))
        })?;
        return Ok(Some((Answer::Accepted { id, handshake }, head)));
    }
    let len = headers_body_length(resp.headers)
        .map_err(|e| HandshakeError::Malformed(e.to_string()))?
        .unwrap_or(0);
    if buf.len() < head + len {
        return Ok(None);
    }
    let reason =
        crate::rendezvous::shown_reason(&buf[head..head + len], resp.reason.unwrap_or("refused"));
    Ok(Some((Answer::Refused { status, reason }, head + len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handshake_head_is_held_to_the_limit_even_when_whole() {
        let mut buf = b"CHAT / HTTP/1.1\r\nUpgrade: chat-peer/2\r\nClient-Id: a\r\n".to_vec();
        buf.extend_from_slice(format!("X-Pad: {}\r\n\r\n", "p".repeat(MAX_HEAD)).as_bytes());
        assert!(matches!(parse_hello(&buf), Err(HandshakeError::TooLarge)));
        // A refusal's body is read by the same rule as the server's.
        let answer = b"HTTP/1.1 409 Conflict\r\nContent-Length: abc\r\n\r\nbusy";
        assert!(matches!(
            parse_answer(answer),
            Err(HandshakeError::Malformed(_))
        ));
    }

    #[test]
    fn handshake_round_trip() {
        let hello = Hello {
            id: "alice".parse().unwrap(),
            turns: true,
        };
        let mut buf = Vec::new();
        let handshake = [7u8; crypto::HANDSHAKE_LEN];
        hello.encode("127.0.0.1:4000", &handshake, &mut buf);
        buf.extend_from_slice(b"\x05\x00"); // the first frame may follow at once
        let Opening { hello: got, used } = parse_hello(&buf).unwrap().unwrap();
        assert_eq!(got, Ok((hello, handshake.to_vec())));
        assert_eq!(&buf[used..], b"\x05\x00");

        for answer in [
            Answer::Accepted {
                id: "bob".parse().unwrap(),
                handshake: vec![9; crypto::HANDSHAKE_LEN],
            },
            Answer::Refused {
                status: 409,
                reason: "bob is busy in another chat".into(),
            },
        ] {
            let mut buf = Vec::new();
            answer.encode(&mut buf);
            let (got, used) = parse_answer(&buf).unwrap().unwrap();
            assert_eq!(got, answer);
            assert_eq!(used, buf.len());
        }
    }

    #[test]
    fn a_refusal_is_written_like_a_server_error() {
        let mut out = Vec::new();
        Answer::Refused {
            status: 426,
            reason: "send Upgrade: chat-peer/2".into(),
        }
        .encode(&mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 426 Upgrade Required\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 26\r\n\r\nsend Upgrade: chat-peer/2\n"
        );
    }

    #[test]
    fn an_endless_head_is_refused_as_too_large() {
        let mut buf = b"CHAT / HTTP/1.1\r\nX-Pad: ".to_vec();
        buf.resize(MAX_HEAD + 1, b'a');
        let e = parse_hello(&buf).unwrap_err();
        assert_eq!((e.clone(), e.status()), (HandshakeError::TooLarge, 431));
        assert_eq!(parse_hello(b"\x00\x01\r\n\r\n").unwrap_err().status(), 400);
    }

    #[test]
    fn bad_openings_are_refused_with_a_reason() {
        let Opening { hello: r, .. } = parse_hello(b"GET / HTTP/1.1\r\n\r\n").unwrap().unwrap();
        assert_eq!(r.unwrap_err().0, 400);
        let Opening { hello: r, .. } = parse_hello(b"CHAT / HTTP/1.1\r\nClient-Id: a\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(r.unwrap_err().0, 426);
        let Opening { hello: r, .. } =
            parse_hello(b"CHAT / HTTP/1.1\r\nUpgrade: chat-peer/2\r\nClient-Id: a b\r\n\r\n")
                .unwrap()
                .unwrap();
        assert_eq!(r.unwrap_err().0, 400);
        // An older caller, and one without a whole handshake message.
        let Opening { hello: r, .. } =
            parse_hello(b"CHAT / HTTP/1.1\r\nUpgrade: chat-peer/1\r\nClient-Id: a\r\n\r\n")
                .unwrap()
                .unwrap();
        assert_eq!(r.unwrap_err().0, 426);
        for value in ["", "abc", &"ab".repeat(47), &"zz".repeat(48)] {
            let head = format!(
                "CHAT / HTTP/1.1\r\nUpgrade: chat-peer/2\r\nClient-Id: a\r\nChat-Handshake: {value}\r\n\r\n"
            );
            let Opening { hello: r, .. } = parse_hello(head.as_bytes()).unwrap().unwrap();
            let (status, reason) = r.unwrap_err();
            assert_eq!(status, 400);
            assert!(reason.contains("Chat-Handshake"), "{reason}");
        }
        assert!(parse_hello(b"\x00\x01garbage\r\n\r\n").is_err());
        assert!(parse_hello(b"CHAT / HTTP/1.1\r\n").unwrap().is_none());
        let long = vec![b'a'; MAX_HEAD + 1];
        assert!(parse_hello(&long).is_err());
    }

    #[test]
    fn frames_round_trip() {
        let frames = [
            PeerFrame::Message {
                id: 1,
                sent_ms: 1_700_000_000_000,
                text: "héllo".into(),
            },
            PeerFrame::Ack { id: 1 },
            PeerFrame::Ping,
            PeerFrame::Bye,
        ];
        let mut wire = Vec::new();
        for f in &frames {
            crate::frame::encode(f, MAX_FRAME, &mut wire).unwrap();
        }
        let mut d = crate::frame::Decoder::new(MAX_FRAME);
        d.extend(&wire);
        for f in frames {
            assert_eq!(d.decode::<PeerFrame>().unwrap(), Some(f));
        }
    }
}
