//! The rendezvous protocol: HTTP/1.1 with the seed verbs as methods.
//!
//! `PROBE`, `REGISTER`, `BRIDGE`, `CHAT` and `QUIT` are HTTP extension
//! methods and the seeds' `REGACK`, `BRIDGEACK`, ... are reason phrases, so
//! that curl, any HTTP library, load generators and reverse proxies speak the
//! protocol unchanged. Over UDP each datagram carries one message, as SSDP
//! carries HTTP, with a `Request-Id` header echoed in the response.
//!
//! Parsing is split in two so that a connection can tell "close after
//! answering" from "answer and carry on": [`parse_request`] returns `Err` for
//! framing failures (the byte stream can no longer be trusted), and a
//! complete head whose `request` is `Err` for requests that were framed
//! correctly but are wrong (unknown method, bad id, missing token).

use std::fmt::{self, Write as _};
use std::net::{IpAddr, SocketAddr};

use crate::crypto::PeerKey;
use crate::{ClientId, Token};

/// The largest request or response head (request line and headers).
pub const MAX_HEAD: usize = 8 * 1024;
/// The largest body the server reads (requests need none; it is skipped).
pub const MAX_BODY: usize = 4 * 1024;
/// The most headers in one message.
pub const MAX_HEADERS: usize = 32;
/// The longest `Request-Id` value.
pub const MAX_REQUEST_ID: usize = 64;
/// The port the server listens on unless told otherwise.
pub const DEFAULT_PORT: u16 = 5555;
/// The largest UDP datagram either side sends or reads.
pub const MAX_DATAGRAM: usize = MAX_HEAD + MAX_BODY;
/// How a 409's reason goes on after the peer's id when the peer named in
/// a BRIDGE is in a chat rather than idle: the server writes it, chatd
/// reads it to tell its user which.
pub const IN_A_CHAT: &str = "is in a chat";

/// One of the five requests the server understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Method {
    Probe,
    Register,
    Bridge,
    Chat,
    Quit,
}

impl Method {
    pub const ALL: [Method; 5] = [
        Method::Probe,
        Method::Register,
        Method::Bridge,
        Method::Chat,
        Method::Quit,
    ];

    /// The method token on the request line.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Probe => "PROBE",
            Method::Register => "REGISTER",
            Method::Bridge => "BRIDGE",
            Method::Chat => "CHAT",
            Method::Quit => "QUIT",
        }
    }

    /// The reason phrase of this method's success response.
    pub fn ack(self) -> &'static str {
        match self {
            Method::Probe => "PROBEACK",
            Method::Register => "REGACK",
            Method::Bridge => "BRIDGEACK",
            Method::Chat => "CHATACK",
            Method::Quit => "QUITACK",
        }
    }

    /// Methods are case-sensitive in HTTP, so `register` is not `REGISTER`.
    pub fn parse(token: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|m| m.as_str() == token)
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The transports a server serves, as its `Transport:` header lists them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Transports {
    pub tcp: bool,
    pub udp: bool,
}

impl Transports {
    fn parse(v: &str) -> Transports {
        let mut t = Transports::default();
        for item in v.split(',').map(str::trim) {
            if item.eq_ignore_ascii_case("tcp") {
                t.tcp = true;
            } else if item.eq_ignore_ascii_case("udp") {
                t.udp = true;
            }
        }
        t
    }
}

impl fmt::Display for Transports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.tcp, self.udp) {
            (true, true) => f.write_str("tcp, udp"),
            (true, false) => f.write_str("tcp"),
            (false, true) => f.write_str("udp"),
            (false, false) => Ok(()),
        }
    }
}

/// A request, as the server acts on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Probe,
    /// Stores the sender's contact; `token` refreshes an existing one.
    Register {
        id: ClientId,
        port: u16,
        token: Option<Token>,
    },
    /// Asks for a peer, or to wait for one.
    Bridge {
        id: ClientId,
        token: Token,
        peer: Option<ClientId>,
    },
    /// Tells the server the caller is now chatting with `peer`.
    Chat {
        id: ClientId,
        token: Token,
        peer: ClientId,
    },
    /// Removes the caller's registration.
    Quit {
        id: ClientId,
        token: Token,
    },
}

impl Request {
    pub fn method(&self) -> Method {
        match self {
            Request::Probe => Method::Probe,
            Request::Register { .. } => Method::Register,
            Request::Bridge { .. } => Method::Bridge,
            Request::Chat { .. } => Method::Chat,
            Request::Quit { .. } => Method::Quit,
        }
    }

    /// Writes the request as HTTP/1.1 into `out`.
    pub fn encode(&self, out: &mut Vec<u8>, framing: &RequestFraming<'_>) {
        let mut w = Writer(out);
        w.request_line(self.method().as_str());
        if let Some(host) = framing.host {
            w.header("Host", host);
        }
        match self {
            Request::Probe => {}
            Request::Register { id, port, token } => {
                w.header("Client-Id", id);
                w.header("Client-Port", port);
                if let Some(t) = token {
                    w.header("Client-Token", t);
                }
            }
            Request::Bridge { id, token, peer } => {
                w.header("Client-Id", id);
                w.header("Client-Token", token);
                if let Some(p) = peer {
                    w.header("Peer-Id", p);
                }
            }
            Request::Chat { id, token, peer } => {
                w.header("Client-Id", id);
                w.header("Client-Token", token);
                w.header("Peer-Id", peer);
            }
            Request::Quit { id, token } => {
                w.header("Client-Id", id);
                w.header("Client-Token", token);
            }
        }
        if let Some(rid) = framing.request_id {
            w.header("Request-Id", rid);
        }
        if framing.close {
            w.header("Connection", "close");
        }
        w.end_head();
    }
}

/// How a request is framed, beside what it says.
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestFraming<'a> {
    /// The `Host` header; HTTP/1.1 clients must send one.
    pub host: Option<&'a str>,
    /// The UDP `Request-Id`.
    pub request_id: Option<&'a str>,
    /// Ask the server to close the connection after answering.
    pub close: bool,
}

/// An error status the server answers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorStatus {
    /// 400: malformed request, bad id, missing header.
    BadRequest,
    /// 401: missing or wrong token.
    Unauthorized,
    /// 404: unknown id.
    NotFound,
    /// 408: the request did not arrive complete in time.
    RequestTimeout,
    /// 409 `REGNACK`: the id is registered under another token.
    RegNack,
    /// 409: the request conflicts with the peer's state.
    Conflict,
    /// 413: body too large.
    ContentTooLarge,
    /// 429: rate limited; comes with `Retry-After`.
    TooManyRequests,
    /// 431: head too large.
    HeadersTooLarge,
    /// 501: unknown method or unsupported framing.
    NotImplemented,
    /// 503: the server is full.
    Unavailable,
    /// Any other status, as a client may meet behind a proxy.
    Other(u16),
}

impl ErrorStatus {
    pub fn code(self) -> u16 {
        match self {
            ErrorStatus::BadRequest => 400,
            ErrorStatus::Unauthorized => 401,
            ErrorStatus::NotFound => 404,
            ErrorStatus::RequestTimeout => 408,
            ErrorStatus::RegNack | ErrorStatus::Conflict => 409,
            ErrorStatus::ContentTooLarge => 413,
            ErrorStatus::TooManyRequests => 429,
            ErrorStatus::HeadersTooLarge => 431,
            ErrorStatus::NotImplemented => 501,
            ErrorStatus::Unavailable => 503,
            ErrorStatus::Other(c) => c,
        }
    }

    pub fn phrase(self) -> &'static str {
        match self {
            ErrorStatus::BadRequest => "Bad Request",
            ErrorStatus::Unauthorized => "Unauthorized",
            ErrorStatus::NotFound => "Not Found",
            ErrorStatus::RequestTimeout => "Request Timeout",
            ErrorStatus::RegNack => "REGNACK",
            ErrorStatus::Conflict => "Conflict",
            ErrorStatus::ContentTooLarge => "Content Too Large",
            ErrorStatus::TooManyRequests => "Too Many Requests",
            ErrorStatus::HeadersTooLarge => "Request Header Fields Too Large",
            ErrorStatus::NotImplemented => "Not Implemented",
            ErrorStatus::Unavailable => "Service Unavailable",
            // What daemons refuse a peer link with, besides the above.
            ErrorStatus::Other(403) => "Forbidden",
            ErrorStatus::Other(426) => "Upgrade Required",
            // What a proxy in front of a server answers with.
            ErrorStatus::Other(500) => "Internal Server Error",
            ErrorStatus::Other(502) => "Bad Gateway",
            ErrorStatus::Other(504) => "Gateway Timeout",
            ErrorStatus::Other(_) => "Error",
        }
    }

    pub(crate) fn from_code(code: u16, method: Method) -> ErrorStatus {
        match code {
            400 => ErrorStatus::BadRequest,
            401 => ErrorStatus::Unauthorized,
            404 => ErrorStatus::NotFound,
            408 => ErrorStatus::RequestTimeout,
            409 if method == Method::Register => ErrorStatus::RegNack,
            409 => ErrorStatus::Conflict,
            413 => ErrorStatus::ContentTooLarge,
            429 => ErrorStatus::TooManyRequests,
            431 => ErrorStatus::HeadersTooLarge,
            501 => ErrorStatus::NotImplemented,
            503 => ErrorStatus::Unavailable,
            c => ErrorStatus::Other(c),
        }
    }
}

/// An error response: a status and a one-line reason a person can act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub status: ErrorStatus,
    pub reason: String,
    /// Seconds, for 429 and 503.
    pub retry_after: Option<u32>,
}

impl Failure {
    pub fn new(status: ErrorStatus, reason: impl Into<String>) -> Failure {
        Failure {
            status,
            reason: reason.into(),
            retry_after: None,
        }
    }

    pub fn bad_request(reason: impl Into<String>) -> Failure {
        Failure::new(ErrorStatus::BadRequest, reason)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.code(),
            self.status.phrase(),
            self.reason
        )
    }
}

impl std::error::Error for Failure {}

/// A response, as a client acts on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    ProbeAck {
        transports: Transports,
        /// Borrowed when a server answers (its own name, no allocation
        /// per PROBE); owned when a client has parsed it.
        server: std::borrow::Cow<'static, str>,
    },
    RegAck {
        id: ClientId,
        addr: SocketAddr,
        token: Token,
        /// Seconds until the registration lapses unless refreshed.
        expires: u32,
    },
    /// `peer` is `None` when the caller now waits for one; otherwise its
    /// id, its address and the key to call it with
    /// ([`crate::crypto::PeerKey`]).
    BridgeAck {
        peer: Option<(ClientId, SocketAddr, PeerKey)>,
    },
    ChatAck,
    QuitAck,
    Error(Failure),
}

/// How a response is framed, beside what it says.
#[derive(Clone, Copy, Debug, Default)]
pub struct ResponseFraming<'a> {
    /// Tell the client the connection closes after this response.
    pub close: bool,
    /// Tell an HTTP/1.0 client the connection stays open (1.1 assumes it).
    pub keep_alive: bool,
    /// Echo of the request's `Request-Id`.
    pub request_id: Option<&'a str>,
    /// One UDP datagram: no `Content-Length` (the datagram ends the body).
    pub datagram: bool,
    /// Leave out what a client can do without (the error text, `Server`),
    /// so that a UDP response fits the amplification limit.
    pub minimal: bool,
}

impl Response {
    /// The request a success answers (`None` for an error).
    pub fn method(&self) -> Option<Method> {
        Some(match self {
            Response::ProbeAck { .. } => Method::Probe,
            Response::RegAck { .. } => Method::Register,
            Response::BridgeAck { .. } => Method::Bridge,
            Response::ChatAck => Method::Chat,
            Response::QuitAck => Method::Quit,
            Response::Error(_) => return None,
        })
    }

    /// Writes the response as HTTP/1.1 into `out`.
    pub fn encode(&self, out: &mut Vec<u8>, framing: &ResponseFraming<'_>) {
        let mut w = Writer(out);
        let mut body: Option<&str> = None;
        match self {
            Response::Error(f) => {
                w.status(f.status.code(), f.status.phrase());
                if let Some(s) = f.retry_after {
                    w.header("Retry-After", s);
                }
                if !framing.minimal {
                    body = Some(&f.reason);
                }
            }
            Response::ProbeAck { transports, server } => {
                w.status(200, Method::Probe.ack());
                w.header("Transport", transports);
                if !framing.minimal {
                    w.header("Server", server);
                }
            }
            Response::RegAck {
                id,
                addr,
                token,
                expires,
            } => {
                w.status(200, Method::Register.ack());
                w.header("Client-Id", id);
                w.header("Client-Addr", addr);
                w.header("Client-Token", token);
                w.header("Expires", expires);
            }
            Response::BridgeAck { peer } => {
                w.status(200, Method::Bridge.ack());
                if let Some((id, addr, key)) = peer {
                    w.header("Peer-Id", id);
                    w.header("Peer-Addr", addr);
                    w.header("Peer-Key", key);
                }
            }
            Response::ChatAck => w.status(200, Method::Chat.ack()),
            Response::QuitAck => w.status(200, Method::Quit.ack()),
        }
        if let Some(rid) = framing.request_id {
            w.header("Request-Id", rid);
        }
        if !framing.datagram {
            if framing.close {
                w.header("Connection", "close");
            } else if framing.keep_alive {
                w.header("Connection", "keep-alive");
            }
        }
        match body {
            Some(text) => {
                w.header("Content-Type", "text/plain; charset=utf-8");
                if !framing.datagram {
                    w.header("Content-Length", text.len() + 1);
                }
                w.end_head();
                w.0.extend_from_slice(text.as_bytes());
                w.0.push(b'\n');
            }
            None => {
                if !framing.datagram {
                    w.header("Content-Length", 0u32);
                }
                w.end_head();
            }
        }
    }
}

/// Writes an HTTP/1.1 head: the one writer of every head in the system
/// (requests and responses to the server, a daemon's handshake). Headers
/// are written byte by byte rather than through `fmt`, which was a visible
/// share of the server's time per request.
pub(crate) struct Writer<'a>(pub(crate) &'a mut Vec<u8>);

impl Writer<'_> {
    pub(crate) fn request_line(&mut self, method: &str) {
        self.0.extend_from_slice(method.as_bytes());
        self.0.extend_from_slice(b" / HTTP/1.1\r\n");
    }

    pub(crate) fn header(&mut self, name: &str, value: impl HeaderValue) {
        self.0.extend_from_slice(name.as_bytes());
        self.0.extend_from_slice(b": ");
        value.append(self.0);
        self.0.extend_from_slice(b"\r\n");
    }

    pub(crate) fn status(&mut self, code: u16, phrase: &str) {
        self.0.extend_from_slice(b"HTTP/1.1 ");
        code.append(self.0);
        self.0.push(b' ');
        self.0.extend_from_slice(phrase.as_bytes());
        self.0.extend_from_slice(b"\r\n");
    }

    pub(crate) fn end_head(&mut self) {
        self.0.extend_from_slice(b"\r\n");
    }
}

/// A header value that writes itself without `fmt` where it can.
pub(crate) trait HeaderValue {
    fn append(&self, out: &mut Vec<u8>);
}

impl HeaderValue for &str {
    fn append(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.as_bytes());
    }
}

impl HeaderValue for &String {
    fn append(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.as_bytes());
    }
}

impl HeaderValue for &std::borrow::Cow<'_, str> {
    fn append(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.as_bytes());
    }
}

impl HeaderValue for &ClientId {
    fn append(&self, out: &mut Vec<u8>) {
        let (bytes, len) = self.padded();
        append_first(out, bytes, len);
    }
}

impl HeaderValue for &Token {
    fn append(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_hex());
    }
}

impl HeaderValue for &PeerKey {
    fn append(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.hex());
    }
}

impl HeaderValue for &SocketAddr {
    fn append(&self, out: &mut Vec<u8>) {
        match self {
            // The common case, in every REGACK: digits, without fmt.
            SocketAddr::V4(v4) => {
                // "255.255.255.255:65535" at most.
                let mut text = [0u8; 21];
                let mut len = 0;
                for octet in v4.ip().octets() {
                    len += decimal(&mut text[len..], u64::from(octet));
                    text[len] = b'.';
                    len += 1;
                }
                text[len - 1] = b':';
                len += decimal(&mut text[len..], u64::from(v4.port()));
                append_first(out, &text, len);
            }
            SocketAddr::V6(_) => {
                let _ = write!(VecWrite(out), "{self}");
            }
        }
    }
}

impl HeaderValue for &Transports {
    fn append(&self, out: &mut Vec<u8>) {
        let _ = write!(VecWrite(out), "{self}");
    }
}

/// Appends `N` bytes of `buf`, of which the first `len` count: a copy of a
/// length known when compiling is a few moves, where one of a length known
/// only at run time is a call to `memcpy`, and a REGACK made a dozen of
/// those (the number, the address, the id; `perf`, docs/BENCHMARKS.md).
fn append_first<const N: usize>(out: &mut Vec<u8>, buf: &[u8; N], len: usize) {
    let at = out.len();
    out.extend_from_slice(buf);
    out.truncate(at + len.min(N));
}

/// Writes `n` in decimal at the start of `buf`; returns how many bytes.
fn decimal(buf: &mut [u8], n: u64) -> usize {
    let len = n.checked_ilog10().map_or(1, |l| l as usize + 1);
    let mut rest = n;
    for d in buf[..len].iter_mut().rev() {
        *d = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    len
}

macro_rules! number_value {
    ($($t:ty),*) => {$(
        impl HeaderValue for $t {
            fn append(&self, out: &mut Vec<u8>) {
                let mut digits = [0u8; 20];
                let len = decimal(&mut digits, *self as u64);
                append_first(out, &digits, len);
            }
        }
        impl HeaderValue for &$t {
            fn append(&self, out: &mut Vec<u8>) {
                (**self).append(out);
            }
        }
    )*};
}

number_value!(u16, u32, usize);

struct VecWrite<'a>(&'a mut Vec<u8>);

impl fmt::Write for VecWrite<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// A request head the server has parsed.
#[derive(Debug)]
pub struct RequestHead {
    /// Bytes of the head, including the blank line.
    pub head_len: usize,
    /// Bytes of body that follow the head (to be skipped).
    pub content_length: usize,
    /// The client wants the connection closed after the response.
    pub close: bool,
    /// The request is HTTP/1.0, whose keep-alive must be said.
    pub http10: bool,
    /// The method, when it was one of ours.
    pub method: Option<Method>,
    /// The UDP `Request-Id`, when present and valid.
    pub request_id: Option<String>,
    /// The head carries `X-Forwarded-For` (read with
    /// [`forwarded_client`], and only from a trusted proxy).
    pub forwarded: bool,
    /// The request, or why it cannot be acted on.
    pub request: Result<Request, Failure>,
}

impl RequestHead {
    /// An HTTP/1.0 client asked to keep the connection: its response must
    /// say `Connection: keep-alive`, or the client takes it as closing.
    pub fn keep_alive_10(&self) -> bool {
        self.http10 && !self.close
    }
}

/// What [`parse_request`] found at the front of a buffer.
#[derive(Debug)]
pub enum Parsed<T> {
    /// More bytes are needed.
    Partial,
    Complete(T),
}

/// Parses one request head from the front of `buf`.
///
/// `Err` means the stream itself is broken (or too large to read on):
/// answer with the failure and close.
pub fn parse_request(buf: &[u8]) -> Result<Parsed<RequestHead>, Failure> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match head_length(req.parse(buf), buf) {
        Ok(Some(n)) => n,
        Ok(None) => return Ok(Parsed::Partial),
        Err(HeadError::TooLarge) => {
            return Err(Failure::new(
                ErrorStatus::HeadersTooLarge,
                format!("request head larger than {MAX_HEAD} bytes"),
            ));
        }
        Err(HeadError::Malformed(httparse::Error::TooManyHeaders)) => {
            return Err(Failure::new(
                ErrorStatus::HeadersTooLarge,
                format!("more than {MAX_HEADERS} header fields"),
            ));
        }
        Err(HeadError::Malformed(e)) => {
            return Err(Failure::bad_request(format!(
                "malformed HTTP request: {}",
                malformed(e)
            )));
        }
    };
    let fields = Fields::collect(req.headers)?;
    let content_length = fields.content_length()?;
    let http10 = req.version == Some(0);
    // `close` wins over `keep-alive` whichever version asks.
    let close = fields.close || (http10 && !fields.keep_alive);
    let request_id = match fields.request_id {
        // Which of two ids to echo is anyone's guess: neither.
        Some(_) if fields.request_id_twice => None,
        Some(v) => match text(v) {
            Some(s) if is_request_id(s) => Some(s.to_owned()),
            _ => {
                return Ok(Parsed::Complete(RequestHead {
                    head_len,
                    content_length,
                    close,
                    http10,
                    method: None,
                    request_id: None,
                    forwarded: fields.forwarded,
                    request: Err(Failure::bad_request(format!(
                        "bad Request-Id header: 1 to {MAX_REQUEST_ID} visible ASCII characters expected"
                    ))),
                }));
            }
        },
        None => None,
    };
    let name = req.method.unwrap_or_default();
    let method = Method::parse(name);
    let request = match method {
        Some(m) => fields.request(m),
        None => Err(unknown_method(name)),
    };
    Ok(Parsed::Complete(RequestHead {
        head_len,
        content_length,
        close,
        http10,
        method,
        request_id,
        forwarded: fields.forwarded,
        request,
    }))
}

/// The valid `Request-Id` of a whole head in `buf`, if it has one, even
/// when the request is refused: over UDP a refusal must carry it too, or a
/// retransmitting client cannot tell which request was refused.
pub fn request_id_of(buf: &[u8]) -> Option<String> {
    let [only] = header_values(buf, "Request-Id")?[..] else {
        return None;
    };
    text(only).filter(|s| is_request_id(s)).map(str::to_owned)
}

/// The values of every `name` header line of the whole head in `buf`, in
/// order; `None` if `buf` does not hold a whole head. For the rare reads
/// of what [`parse_request`] does not keep: it parses the head again.
fn header_values<'b>(buf: &'b [u8], name: &str) -> Option<Vec<&'b [u8]>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    if !matches!(req.parse(buf), Ok(httparse::Status::Complete(_))) {
        return None;
    }
    let values = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case(name));
    Some(values.map(|h| h.value).collect())
}

/// The client behind a chain of trusted reverse proxies: the address
/// `X-Forwarded-For` names, read from the right (the hop nearest this
/// server) past every address `trusted` accepts. Each proxy appends the
/// address it saw to the list, so entries to the left of the first
/// untrusted one are whatever that client chose to send, and are never
/// read. `None` when there is no such header (a client that reached the
/// server directly). The caller asks only when the connection's own peer
/// is a trusted proxy; otherwise the header means nothing.
///
/// `buf` holds a head [`parse_request`] took whole. Several header lines
/// count as one list, in order. Entries may carry a port (`1.2.3.4:80`,
/// `[::1]:80`), as some proxies write them.
pub fn forwarded_client(
    buf: &[u8],
    trusted: impl Fn(IpAddr) -> bool,
) -> Result<Option<IpAddr>, Failure> {
    let Some(lines) = header_values(buf, "X-Forwarded-For") else {
        return Ok(None);
    };
    let mut client = None;
    for line in lines.into_iter().rev() {
        // Entry by entry from the right, bytes until then: what lies left
        // of the client is the client's to write, text or not.
        let entries = line.rsplit(|&b| b == b',').map(<[u8]>::trim_ascii);
        for entry in entries.filter(|e| !e.is_empty()) {
            let ip = forwarded_ip(entry).ok_or_else(|| bad_forwarded(entry))?;
            client = Some(ip);
            if !trusted(ip) {
                return Ok(client);
            }
        }
    }
    // Every hop trusted: the first one is the client.
    Ok(client)
}

/// One entry of `X-Forwarded-For`: an address, perhaps with a port.
fn forwarded_ip(entry: &[u8]) -> Option<IpAddr> {
    let entry = std::str::from_utf8(entry).ok()?;
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sa) = entry.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    entry.strip_prefix('[')?.strip_suffix(']')?.parse().ok()
}

fn bad_forwarded(entry: &[u8]) -> Failure {
    let shown: String = String::from_utf8_lossy(entry).chars().take(64).collect();
    Failure::bad_request(format!(
        "X-Forwarded-For from a trusted proxy holds {shown:?}, not an address: fix the proxy's configuration"
    ))
}

fn unknown_method(name: &str) -> Failure {
    let shown: String = name.chars().take(32).collect();
    let hint = if Method::parse(&name.to_ascii_uppercase()).is_some() {
        " (methods are case-sensitive)"
    } else {
        ""
    };
    Failure::new(
        ErrorStatus::NotImplemented,
        format!(
            "unknown method {shown:?}{hint}; this server answers PROBE, REGISTER, BRIDGE, CHAT and QUIT"
        ),
    )
}

fn is_request_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_REQUEST_ID && s.bytes().all(|b| b.is_ascii_graphic())
}

/// Characters of another program's error text worth showing.
pub(crate) const MAX_REASON_CHARS: usize = 300;

/// Error text from across a socket (a server's body, a daemon's refusal),
/// made fit to show a person: no control characters, so no terminal
/// escapes and no forged lines, and not a page of it. `fallback` (the
/// reason phrase) stands in for an empty body.
pub(crate) fn shown_reason(body: &[u8], fallback: &str) -> String {
    let clean = |s: &str| -> String {
        s.trim()
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(MAX_REASON_CHARS)
            .collect()
    };
    let reason = clean(&String::from_utf8_lossy(body));
    if reason.is_empty() {
        clean(fallback)
    } else {
        reason
    }
}

/// Header values are bytes in HTTP; ours are all ASCII, and anything else is
/// treated as absent-but-present (a bad value).
fn text(v: &[u8]) -> Option<&str> {
    std::str::from_utf8(v).ok().map(str::trim)
}

/// Why a head could not be taken, whoever sent it.
#[derive(Debug)]
pub(crate) enum HeadError {
    TooLarge,
    Malformed(httparse::Error),
}

/// What httparse found wrong, in words a person reads: its own ("invalid
/// token") mean something else to a user of client tokens.
pub(crate) fn malformed(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::Token => "a byte not allowed in the method or the target",
        httparse::Error::HeaderName => "a malformed header name",
        httparse::Error::HeaderValue => "a malformed header value",
        httparse::Error::NewLine => "a malformed line ending",
        httparse::Error::Version => "not HTTP/1.0 or HTTP/1.1",
        httparse::Error::Status => "a malformed status line",
        httparse::Error::TooManyHeaders => "too many header fields",
    }
}

/// The length of a head httparse has looked at: `None` while it is still
/// arriving. One rule for every HTTP head in the system (requests and
/// responses to the server, a daemon's handshake): at most [`MAX_HEAD`]
/// bytes, whole or not.
pub(crate) fn head_length(
    parsed: httparse::Result<usize>,
    buf: &[u8],
) -> Result<Option<usize>, HeadError> {
    match parsed {
        Ok(httparse::Status::Complete(n)) if n <= MAX_HEAD => Ok(Some(n)),
        Ok(httparse::Status::Complete(_)) => Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(HeadError::Malformed(e)),
    }
}

/// Why a `Content-Length` was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LengthError {
    #[error("bad Content-Length header")]
    Malformed,
    #[error("body larger than {MAX_BODY} bytes")]
    TooLarge,
}

/// A `Content-Length` value, read by the one rule every side uses: ASCII
/// digits only (no sign), at most [`MAX_BODY`].
pub fn body_length(value: &[u8]) -> Result<usize, LengthError> {
    let v = value.trim_ascii();
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return Err(LengthError::Malformed);
    }
    // Only digits: a number that does not parse overflowed, so is too large.
    match std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
    {
        Some(n) if n <= MAX_BODY => Ok(n),
        _ => Err(LengthError::TooLarge),
    }
}

/// The body length a head's headers give: `None` without a
/// `Content-Length`; two of them make the framing ambiguous, so malformed.
pub fn headers_body_length(headers: &[httparse::Header]) -> Result<Option<usize>, LengthError> {
    let mut lengths = headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("Content-Length"));
    let Some(first) = lengths.next() else {
        return Ok(None);
    };
    if lengths.next().is_some() {
        return Err(LengthError::Malformed);
    }
    body_length(first.value).map(Some)
}

/// The header fields this protocol reads, gathered in one pass.
#[derive(Default)]
struct Fields<'a> {
    client_id: Option<&'a [u8]>,
    client_port: Option<&'a [u8]>,
    client_token: Option<&'a [u8]>,
    peer_id: Option<&'a [u8]>,
    request_id: Option<&'a [u8]>,
    content_length: Option<&'a [u8]>,
    transfer_encoding: bool,
    forwarded: bool,
    /// `Connection` options, from every such header (no allocation: this
    /// runs for each request).
    close: bool,
    keep_alive: bool,
    /// The first header given twice (other than Content-Length).
    duplicate: Option<String>,
    request_id_twice: bool,
    /// Only counted: RFC 9112 refuses a request with two.
    host: Option<&'a [u8]>,
}

impl<'a> Fields<'a> {
    fn collect(headers: &[httparse::Header<'a>]) -> Result<Fields<'a>, Failure> {
        let mut f = Fields::default();
        for h in headers {
            let name = h.name;
            let slot = if name.eq_ignore_ascii_case("Host") {
                &mut f.host
            } else if name.eq_ignore_ascii_case("Client-Id") {
                &mut f.client_id
            } else if name.eq_ignore_ascii_case("Client-Port") {
                &mut f.client_port
            } else if name.eq_ignore_ascii_case("Client-Token") {
                &mut f.client_token
            } else if name.eq_ignore_ascii_case("Peer-Id") {
                &mut f.peer_id
            } else if name.eq_ignore_ascii_case("Request-Id") {
                &mut f.request_id
            } else if name.eq_ignore_ascii_case("Content-Length") {
                &mut f.content_length
            } else if name.eq_ignore_ascii_case("Transfer-Encoding") {
                f.transfer_encoding = true;
                continue;
            } else if name.eq_ignore_ascii_case("Connection") {
                for item in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    f.close |= item.eq_ignore_ascii_case(b"close");
                    f.keep_alive |= item.eq_ignore_ascii_case(b"keep-alive");
                }
                continue;
            } else if name.eq_ignore_ascii_case("X-Forwarded-For") {
                f.forwarded = true;
                continue;
            } else {
                continue;
            };
            if slot.replace(h.value).is_some() {
                // Two lengths make the stream's framing ambiguous: that is
                // fatal. Any other duplicate only spoils this request.
                if name.eq_ignore_ascii_case("Content-Length") {
                    return Err(Failure::bad_request("duplicate Content-Length header"));
                }
                f.request_id_twice |= name.eq_ignore_ascii_case("Request-Id");
                f.duplicate.get_or_insert_with(|| name.to_owned());
            }
        }
        if f.transfer_encoding {
            return Err(Failure::new(
                ErrorStatus::NotImplemented,
                "Transfer-Encoding is not supported: these requests take no body",
            ));
        }
        Ok(f)
    }

    fn content_length(&self) -> Result<usize, Failure> {
        let Some(v) = self.content_length else {
            return Ok(0);
        };
        body_length(v).map_err(|e| match e {
            LengthError::Malformed => Failure::bad_request("bad Content-Length header"),
            LengthError::TooLarge => Failure::new(
                ErrorStatus::ContentTooLarge,
                format!("request body larger than {MAX_BODY} bytes"),
            ),
        })
    }

    fn request(&self, method: Method) -> Result<Request, Failure> {
        if let Some(name) = &self.duplicate {
            return Err(Failure::bad_request(format!("duplicate {name} header")));
        }
        Ok(match method {
            Method::Probe => Request::Probe,
            Method::Register => Request::Register {
                id: id_field("Client-Id", self.client_id)?,
                port: port_field(self.client_port)?,
                token: match self.client_token {
                    Some(v) => Some(token_value(v)?),
                    None => None,
                },
            },
            Method::Bridge => Request::Bridge {
                id: id_field("Client-Id", self.client_id)?,
                token: token_field(self.client_token)?,
                peer: match self.peer_id {
                    Some(v) => Some(id_value("Peer-Id", v)?),
                    None => None,
                },
            },
            Method::Chat => Request::Chat {
                id: id_field("Client-Id", self.client_id)?,
                token: token_field(self.client_token)?,
                peer: id_field("Peer-Id", self.peer_id)?,
            },
            Method::Quit => Request::Quit {
                id: id_field("Client-Id", self.client_id)?,
                token: token_field(self.client_token)?,
            },
        })
    }
}

fn missing(name: &str) -> Failure {
    Failure::bad_request(format!("missing {name} header"))
}

fn id_field(name: &str, v: Option<&[u8]>) -> Result<ClientId, Failure> {
    id_value(name, v.ok_or_else(|| missing(name))?)
}

fn id_value(name: &str, v: &[u8]) -> Result<ClientId, Failure> {
    ClientId::from_bytes(v.trim_ascii())
        .map_err(|e| Failure::bad_request(format!("bad {name}: {e}")))
}

fn port_field(v: Option<&[u8]>) -> Result<u16, Failure> {
    let v = v.ok_or_else(|| missing("Client-Port"))?;
    // Digits only: `str::parse` would also take a sign ("+80").
    let digits = text(v).filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()));
    match digits.and_then(|s| s.parse::<u16>().ok()) {
        Some(p) if p != 0 => Ok(p),
        _ => Err(Failure::bad_request(
            "bad Client-Port: a port from 1 to 65535 expected",
        )),
    }
}

fn token_field(v: Option<&[u8]>) -> Result<Token, Failure> {
    match v {
        Some(v) => token_value(v),
        None => Err(Failure::new(
            ErrorStatus::Unauthorized,
            "missing Client-Token header: send the token REGISTER returned",
        )),
    }
}

fn token_value(v: &[u8]) -> Result<Token, Failure> {
    Token::from_hex(v.trim_ascii()).map_err(|_| {
        Failure::new(
            ErrorStatus::Unauthorized,
            "bad Client-Token: 32 hex digits expected, as REGISTER returned",
        )
    })
}

/// A response head a client has parsed.
#[derive(Debug)]
pub struct ResponseHead {
    pub response: Response,
    pub request_id: Option<String>,
    /// The server will close the connection.
    pub close: bool,
}

/// Why a response could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    #[error("malformed HTTP response: {0}")]
    Malformed(String),
    #[error("response head larger than {MAX_HEAD} bytes")]
    TooLarge,
    #[error("{ack} response without a valid {header} header")]
    MissingHeader {
        ack: &'static str,
        header: &'static str,
    },
}

/// Parses the response to a `method` request from the front of `buf`.
///
/// On a stream, `Partial` asks for more bytes; with `datagram`, the whole of
/// `buf` is the message and its body is whatever follows the head.
/// `Complete` carries the bytes consumed.
pub fn parse_response(
    buf: &[u8],
    method: Method,
    datagram: bool,
) -> Result<Parsed<(ResponseHead, usize)>, ResponseError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match head_length(resp.parse(buf), buf) {
        Ok(Some(n)) => n,
        Ok(None) if datagram => {
            return Err(ResponseError::Malformed("incomplete datagram".into()));
        }
        Ok(None) => return Ok(Parsed::Partial),
        Err(HeadError::TooLarge) => return Err(ResponseError::TooLarge),
        Err(HeadError::Malformed(e)) => return Err(ResponseError::Malformed(e.to_string())),
    };
    let get = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| text(h.value))
    };
    let content_length = match headers_body_length(resp.headers) {
        Ok(Some(n)) => n,
        Ok(None) if datagram => buf.len() - head_len,
        Ok(None) => 0,
        Err(e) => return Err(ResponseError::Malformed(e.to_string())),
    };
    let total = head_len + content_length;
    if buf.len() < total {
        return if datagram {
            Err(ResponseError::Malformed(
                "datagram shorter than Content-Length".into(),
            ))
        } else {
            Ok(Parsed::Partial)
        };
    }
    let close = get("Connection").is_some_and(|v| {
        v.split(',')
            .any(|item| item.trim().eq_ignore_ascii_case("close"))
    });
    let request_id = get("Request-Id").map(str::to_owned);
    let code = resp.code.unwrap_or(0);
    let response = if code == 200 {
        let ack = method.ack();
        fn need<'v>(
            v: Option<&'v str>,
            ack: &'static str,
            header: &'static str,
        ) -> Result<&'v str, ResponseError> {
            v.ok_or(ResponseError::MissingHeader { ack, header })
        }
        match method {
            Method::Probe => Response::ProbeAck {
                transports: Transports::parse(need(get("Transport"), ack, "Transport")?),
                server: get("Server").unwrap_or_default().to_owned().into(),
            },
            Method::Register => {
                let id = need(get("Client-Id"), ack, "Client-Id")?;
                let addr = need(get("Client-Addr"), ack, "Client-Addr")?;
                let token = need(get("Client-Token"), ack, "Client-Token")?;
                let expires = need(get("Expires"), ack, "Expires")?;
                let bad = |header| ResponseError::MissingHeader { ack, header };
                Response::RegAck {
                    id: id.parse().map_err(|_| bad("Client-Id"))?,
                    addr: addr.parse().map_err(|_| bad("Client-Addr"))?,
                    token: token.parse().map_err(|_| bad("Client-Token"))?,
                    expires: expires.parse().map_err(|_| bad("Expires"))?,
                }
            }
            Method::Bridge => {
                let (id, addr, key) = (get("Peer-Id"), get("Peer-Addr"), get("Peer-Key"));
                if id.is_none() && addr.is_none() && key.is_none() {
                    Response::BridgeAck { peer: None }
                } else {
                    let id = need(id, ack, "Peer-Id")?;
                    let addr = need(addr, ack, "Peer-Addr")?;
                    let key = need(key, ack, "Peer-Key")?;
                    let bad = |header| ResponseError::MissingHeader { ack, header };
                    Response::BridgeAck {
                        peer: Some((
                            id.parse().map_err(|_| bad("Peer-Id"))?,
                            addr.parse().map_err(|_| bad("Peer-Addr"))?,
                            key.parse().map_err(|_| bad("Peer-Key"))?,
                        )),
                    }
                }
            }
            Method::Chat => Response::ChatAck,
            Method::Quit => Response::QuitAck,
        }
    } else {
        let reason = shown_reason(&buf[head_len..total], resp.reason.unwrap_or_default());
        Response::Error(Failure {
            status: ErrorStatus::from_code(code, method),
            reason,
            retry_after: get("Retry-After").and_then(|v| v.parse().ok()),
        })
    };
    Ok(Parsed::Complete((
        ResponseHead {
            response,
            request_id,
            close,
        },
        total,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn appended(value: impl HeaderValue) -> String {
        // After other bytes, as in a head: the value must land after them.
        let mut out = b"x: ".to_vec();
        value.append(&mut out);
        String::from_utf8(out).unwrap()
    }

    /// Numbers, addresses and ids are written with fixed-size copies cut
    /// to length: every length, the longest and the shortest included.
    #[test]
    fn header_values_are_written_exactly() {
        for n in [0, 7, 9, 10, 99, 100, 65_535, u32::MAX as usize, usize::MAX] {
            assert_eq!(appended(n), format!("x: {n}"));
        }
        assert_eq!(appended(0u16), "x: 0");
        assert_eq!(appended(u32::MAX), "x: 4294967295");
        for a in [
            "0.0.0.0:0",
            "1.2.3.4:5",
            "127.0.0.1:5555",
            "10.200.30.255:40000",
            "255.255.255.255:65535",
            "[::1]:9",
            "[2001:db8::ff00:42:8329]:65535",
        ] {
            let addr: SocketAddr = a.parse().unwrap();
            assert_eq!(appended(&addr), format!("x: {a}"));
        }
        for id in ["a", "alice.b_c-9", &"z".repeat(crate::id::MAX_ID_LEN)] {
            let parsed: ClientId = id.parse().unwrap();
            assert_eq!(appended(&parsed), format!("x: {id}"));
        }
    }

    #[test]
    fn every_side_reads_a_content_length_alike() {
        assert_eq!(body_length(b"12"), Ok(12));
        assert_eq!(body_length(b" 0 "), Ok(0));
        for bad in [&b"+3"[..], b"-1", b"", b"1 2", b"0x10", b"\xff"] {
            assert_eq!(body_length(bad), Err(LengthError::Malformed), "{bad:?}");
        }
        assert_eq!(body_length(b"4097"), Err(LengthError::TooLarge));
        assert_eq!(
            body_length(b"99999999999999999999999"),
            Err(LengthError::TooLarge)
        );
        // A response with two lengths is refused, as a request with two is.
        let twice = b"HTTP/1.1 200 QUITACK\r\nContent-Length: 0\r\nContent-Length: 5\r\n\r\n";
        assert!(matches!(
            parse_response(twice, Method::Quit, false),
            Err(ResponseError::Malformed(_))
        ));
        let signed = b"HTTP/1.1 200 QUITACK\r\nContent-Length: +0\r\n\r\n";
        assert!(parse_response(signed, Method::Quit, false).is_err());
    }

    #[test]
    fn the_forwarded_client_is_the_nearest_untrusted_hop() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // Proxies at 10.0.0.1 and 10.0.0.2 are trusted.
        let trusted = |a: IpAddr| a == ip("10.0.0.1") || a == ip("10.0.0.2");
        let of = |headers: &str| {
            let head = format!("REGISTER / HTTP/1.1\r\n{headers}\r\n");
            forwarded_client(head.as_bytes(), trusted)
        };
        assert_eq!(of(""), Ok(None), "no header: the peer itself");
        assert_eq!(
            of("X-Forwarded-For: 192.0.2.7\r\n"),
            Ok(Some(ip("192.0.2.7")))
        );
        // The client's own claim is left of what the proxy saw: not read.
        assert_eq!(
            of("X-Forwarded-For: 6.6.6.6, 192.0.2.7\r\n"),
            Ok(Some(ip("192.0.2.7")))
        );
        assert_eq!(
            of("x-forwarded-for: garbage, 192.0.2.7\r\n"),
            Ok(Some(ip("192.0.2.7"))),
            "what lies past the client is never parsed"
        );
        let head = b"PROBE / HTTP/1.1\r\nX-Forwarded-For: \xff\xfe, 192.0.2.7\r\n\r\n";
        assert_eq!(
            forwarded_client(head, trusted),
            Ok(Some(ip("192.0.2.7"))),
            "nor is it read as text"
        );
        // Through two trusted proxies, over two header lines.
        assert_eq!(
            of("X-Forwarded-For: 6.6.6.6, 2001:db8::9\r\nX-Forwarded-For: 10.0.0.2 ,10.0.0.1\r\n"),
            Ok(Some(ip("2001:db8::9")))
        );
        // Every hop trusted: the first is the client.
        assert_eq!(
            of("X-Forwarded-For: 10.0.0.2, 10.0.0.1\r\n"),
            Ok(Some(ip("10.0.0.2")))
        );
        // Ports, brackets and empty entries, as some proxies write them.
        for (value, want) in [
            ("192.0.2.7:4711", "192.0.2.7"),
            ("[2001:db8::9]:4711", "2001:db8::9"),
            ("[2001:db8::9]", "2001:db8::9"),
            ("192.0.2.7, , ", "192.0.2.7"),
        ] {
            let got = of(&format!("X-Forwarded-For: {value}\r\n"));
            assert_eq!(got, Ok(Some(ip(want))), "{value}");
        }
        // A trusted hop that wrote something else is the proxy's fault.
        for bad in ["unknown", "10.0.0.1, 192.0.2.7:x", "300.1.2.3", "[::1"] {
            let got = of(&format!("X-Forwarded-For: {bad}\r\n"));
            let Err(f) = got else {
                panic!("{bad}: {got:?}")
            };
            assert_eq!(f.status, ErrorStatus::BadRequest);
            assert!(f.reason.contains("X-Forwarded-For"), "{}", f.reason);
        }
    }

    fn id(s: &str) -> ClientId {
        s.parse().unwrap()
    }

    fn complete(buf: &[u8]) -> RequestHead {
        match parse_request(buf) {
            Ok(Parsed::Complete(h)) => h,
            other => panic!("expected a complete head, got {other:?}"),
        }
    }

    #[test]
    fn every_request_round_trips() {
        let t = Token::from_bytes([7; 16]);
        let requests = [
            Request::Probe,
            Request::Register {
                id: id("a"),
                port: 4000,
                token: None,
            },
            Request::Register {
                id: id("a"),
                port: 1,
                token: Some(t),
            },
            Request::Bridge {
                id: id("a"),
                token: t,
                peer: None,
            },
            Request::Bridge {
                id: id("a"),
                token: t,
                peer: Some(id("b")),
            },
            Request::Chat {
                id: id("a"),
                token: t,
                peer: id("b"),
            },
            Request::Quit {
                id: id("a"),
                token: t,
            },
        ];
        for r in requests {
            let mut buf = Vec::new();
            let framing = RequestFraming {
                host: Some("h:1"),
                request_id: Some("r-1"),
                close: true,
            };
            r.encode(&mut buf, &framing);
            let head = complete(&buf);
            assert_eq!(head.head_len, buf.len());
            assert_eq!(head.request, Ok(r.clone()));
            assert_eq!(head.method, Some(r.method()));
            assert_eq!(head.request_id.as_deref(), Some("r-1"));
            assert!(head.close);
        }
    }

    #[test]
    fn every_response_round_trips_on_stream_and_datagram() {
        let t = Token::from_bytes([9; 16]);
        let cases = [
            (
                Method::Probe,
                Response::ProbeAck {
                    transports: Transports {
                        tcp: true,
                        udp: true,
                    },
                    server: "chat-server/1".into(),
                },
            ),
            (
                Method::Register,
                Response::RegAck {
                    id: id("x"),
                    addr: "127.0.0.1:9".parse().unwrap(),
                    token: t,
                    expires: 300,
                },
            ),
            (
                Method::Register,
                Response::RegAck {
                    id: id("x"),
                    addr: "[::1]:9".parse().unwrap(),
                    token: t,
                    expires: 1,
                },
            ),
            (Method::Bridge, Response::BridgeAck { peer: None }),
            (
                Method::Bridge,
                Response::BridgeAck {
                    peer: Some((
                        id("y"),
                        "10.0.0.1:5".parse().unwrap(),
                        PeerKey::from_bytes([9; 16]),
                    )),
                },
            ),
            (Method::Chat, Response::ChatAck),
            (Method::Quit, Response::QuitAck),
            (
                Method::Register,
                Response::Error(Failure::new(ErrorStatus::RegNack, "id x is in use")),
            ),
            (
                Method::Bridge,
                Response::Error(Failure {
                    status: ErrorStatus::TooManyRequests,
                    reason: "slow down".into(),
                    retry_after: Some(2),
                }),
            ),
        ];
        for (method, resp) in cases {
            for datagram in [false, true] {
                let mut buf = Vec::new();
                resp.encode(
                    &mut buf,
                    &ResponseFraming {
                        datagram,
                        request_id: Some("7"),
                        ..Default::default()
                    },
                );
                let Parsed::Complete((head, used)) =
                    parse_response(&buf, method, datagram).unwrap()
                else {
                    panic!("partial");
                };
                assert_eq!(used, buf.len());
                assert_eq!(head.response, resp);
                assert_eq!(head.request_id.as_deref(), Some("7"));
            }
        }
    }

    #[test]
    fn wire_text_is_plain_http() {
        let mut buf = Vec::new();
        Response::ProbeAck {
            transports: Transports {
                tcp: true,
                udp: false,
            },
            server: "chat-server/0.1.0".into(),
        }
        .encode(&mut buf, &ResponseFraming::default());
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            "HTTP/1.1 200 PROBEACK\r\nTransport: tcp\r\nServer: chat-server/0.1.0\r\nContent-Length: 0\r\n\r\n"
        );
        let mut buf = Vec::new();
        Response::Error(Failure::new(ErrorStatus::NotFound, "no client bob")).encode(
            &mut buf,
            &ResponseFraming {
                close: true,
                ..Default::default()
            },
        );
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            "HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 14\r\n\r\nno client bob\n"
        );
    }

    #[test]
    fn curl_style_request_parses() {
        let buf = b"REGISTER / HTTP/1.1\r\nHost: 127.0.0.1:5555\r\nUser-Agent: curl/8\r\nAccept: */*\r\nclient-id: alice\r\nCLIENT-PORT:  4000 \r\n\r\n";
        let head = complete(buf);
        assert_eq!(
            head.request,
            Ok(Request::Register {
                id: id("alice"),
                port: 4000,
                token: None
            })
        );
        assert!(!head.close);
    }

    #[test]
    fn partial_until_the_blank_line() {
        let full = b"PROBE / HTTP/1.1\r\nHost: x\r\n\r\n";
        for cut in 0..full.len() {
            assert!(
                matches!(parse_request(&full[..cut]), Ok(Parsed::Partial)),
                "cut at {cut}"
            );
        }
        assert!(matches!(parse_request(full), Ok(Parsed::Complete(_))));
    }

    #[test]
    fn http10_closes_unless_keep_alive() {
        let h = complete(b"PROBE / HTTP/1.0\r\n\r\n");
        assert!(h.close && !h.keep_alive_10());
        let h = complete(b"PROBE / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n");
        assert!(!h.close && h.keep_alive_10());
        // Close wins, in a list or over two lines, in either version.
        for both in [
            &b"PROBE / HTTP/1.0\r\nConnection: close, keep-alive\r\n\r\n"[..],
            b"PROBE / HTTP/1.0\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n",
            b"PROBE / HTTP/1.1\r\nConnection: keep-alive, close\r\n\r\n",
        ] {
            let h = complete(both);
            assert!(
                h.close && !h.keep_alive_10(),
                "{}",
                String::from_utf8_lossy(both)
            );
        }
        assert!(!complete(b"PROBE / HTTP/1.1\r\n\r\n").keep_alive_10());
        assert!(complete(b"PROBE / HTTP/1.1\r\nConnection: foo, close\r\n\r\n").close);
        assert!(
            complete(b"PROBE / HTTP/1.1\r\nConnection: foo\r\nConnection: Close\r\n\r\n").close
        );
        assert!(!complete(b"PROBE / HTTP/1.1\r\nConnection: closed\r\n\r\n").close);
    }

    #[test]
    fn semantic_errors_keep_the_connection() {
        let cases: [(&[u8], u16); 13] = [
            (b"GET / HTTP/1.1\r\n\r\n", 501),
            (b"register / HTTP/1.1\r\n\r\n", 501),
            (b"REGISTER / HTTP/1.1\r\nClient-Port: 1\r\n\r\n", 400),
            (b"REGISTER / HTTP/1.1\r\nClient-Id: a b\r\nClient-Port: 1\r\n\r\n", 400),
            (b"REGISTER / HTTP/1.1\r\nClient-Id: a\r\nClient-Port: 0\r\n\r\n", 400),
            (b"REGISTER / HTTP/1.1\r\nClient-Id: a\r\nClient-Port: 70000\r\n\r\n", 400),
            (b"REGISTER / HTTP/1.1\r\nClient-Id: a\r\nClient-Port: +80\r\n\r\n", 400),
            (b"REGISTER / HTTP/1.1\r\nClient-Id: ..\r\nClient-Port: 1\r\n\r\n", 400),
            (b"REGISTER / HTTP/1.1\r\nClient-Id: a\r\nClient-Port: 1\r\nClient-Token: zz\r\n\r\n", 401),
            (b"BRIDGE / HTTP/1.1\r\nClient-Id: a\r\n\r\n", 401),
            (b"CHAT / HTTP/1.1\r\nClient-Id: a\r\nClient-Token: 00000000000000000000000000000000\r\n\r\n", 400),
            (b"QUIT / HTTP/1.1\r\nClient-Token: 00000000000000000000000000000000\r\n\r\n", 400),
            (b"PROBE / HTTP/1.1\r\nRequest-Id: a b\r\n\r\n", 400),
        ];
        for (buf, code) in cases {
            let head = complete(buf);
            let err = head.request.expect_err("should be refused");
            assert_eq!(
                err.status.code(),
                code,
                "{:?}: {}",
                String::from_utf8_lossy(buf),
                err.reason
            );
        }
    }

    #[test]
    fn framing_errors_close_the_connection() {
        let big_header = format!("PROBE / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X{i}: 1\r\n")).collect();
        let many = format!("PROBE / HTTP/1.1\r\n{many}\r\n");
        let cases: [(&[u8], u16); 7] = [
            (b"\x00\x01\x02garbage\r\n\r\n", 400),
            (b"PROBE / HTTP/1.1\r\nContent-Length: 4097\r\n\r\n", 413),
            (
                b"PROBE / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
                413,
            ),
            (b"PROBE / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
            (
                b"PROBE / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                501,
            ),
            (big_header.as_bytes(), 431),
            (many.as_bytes(), 431),
        ];
        for (buf, code) in cases {
            let err = parse_request(buf).expect_err("should fail framing");
            assert_eq!(err.status.code(), code, "{}", err.reason);
        }
        // A head that never ends is refused once it passes the limit.
        let endless = format!("PROBE / HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEAD + 1));
        assert_eq!(
            parse_request(endless.as_bytes()).unwrap_err().status.code(),
            431
        );
        // Two lengths: the framing itself is in doubt.
        let two_lengths = b"PROBE / HTTP/1.1\r\nContent-Length: 1\r\ncontent-length: 2\r\n\r\n";
        assert_eq!(parse_request(two_lengths).unwrap_err().status.code(), 400);
        // Any other duplicate spoils only the request.
        let dup = b"BRIDGE / HTTP/1.1\r\nClient-Id: a\r\nclient-id: b\r\n\r\n";
        let head = complete(dup);
        assert_eq!(
            head.request.unwrap_err().reason,
            "duplicate client-id header"
        );
        // Two hosts: refused, as RFC 9112 asks.
        let two_hosts = b"PROBE / HTTP/1.1\r\nHost: a\r\nHOST: b\r\n\r\n";
        assert_eq!(
            complete(two_hosts).request.unwrap_err().reason,
            "duplicate HOST header"
        );
        // Two request ids: refused, and neither is echoed.
        let two_ids = b"PROBE / HTTP/1.1\r\nRequest-Id: 5\r\nRequest-Id: 6\r\n\r\n";
        let head = complete(two_ids);
        assert_eq!(head.request_id, None);
        assert_eq!(request_id_of(two_ids), None);
        assert!(head.request.is_err());
    }

    #[test]
    fn body_length_is_reported_for_skipping() {
        let head = complete(b"PROBE / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello");
        assert_eq!(head.content_length, 5);
    }

    #[test]
    fn minimal_datagram_drops_the_extras() {
        let mut buf = Vec::new();
        Response::Error(Failure::new(ErrorStatus::NotFound, "long text ".repeat(20))).encode(
            &mut buf,
            &ResponseFraming {
                datagram: true,
                minimal: true,
                request_id: Some("1"),
                ..Default::default()
            },
        );
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            "HTTP/1.1 404 Not Found\r\nRequest-Id: 1\r\n\r\n"
        );
    }

    #[test]
    fn responses_missing_fields_are_errors() {
        let r = b"HTTP/1.1 200 REGACK\r\nClient-Id: a\r\nContent-Length: 0\r\n\r\n";
        assert!(matches!(
            parse_response(r, Method::Register, false),
            Err(ResponseError::MissingHeader {
                header: "Client-Addr",
                ..
            })
        ));
        assert!(matches!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Len", Method::Chat, false),
            Ok(Parsed::Partial)
        ));
        assert!(parse_response(b"garbage\r\n\r\n", Method::Chat, false).is_err());
    }

    #[test]
    fn a_servers_error_text_cannot_drive_the_terminal() {
        let long = "x".repeat(1000);
        for (body, shown) in [
            ("in use\x1b[2J\r\nforged line", "in use [2J  forged line"),
            ("", "REGNACK"),
            (long.as_str(), &long[..MAX_REASON_CHARS]),
        ] {
            let r = format!(
                "HTTP/1.1 409 REGNACK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let Ok(Parsed::Complete((head, _))) =
                parse_response(r.as_bytes(), Method::Register, false)
            else {
                panic!("not parsed: {r:?}");
            };
            let Response::Error(f) = head.response else {
                panic!("not an error: {:?}", head.response);
            };
            assert_eq!(f.reason, shown);
        }
    }
}
