//! HTTP/1.1 as the tests speak it to chat-server: built by hand, so that
//! a test can send anything, and read back without trusting the server.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};

use crate::WAIT;

/// A response as the tests look at it.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub phrase: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn parse(raw: &str) -> Reply {
        let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw, ""));
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let mut parts = status_line.splitn(3, ' ');
        assert_eq!(
            parts.next(),
            Some("HTTP/1.1"),
            "status line {status_line:?}"
        );
        let status = parts
            .next()
            .and_then(|s| s.parse().ok())
            .expect("status code");
        let phrase = parts.next().unwrap_or_default().to_owned();
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
            .collect();
        Reply {
            status,
            phrase,
            headers,
            body: body.to_owned(),
        }
    }
}

/// Opens a TCP connection with read and write timeouts.
pub fn connect(addr: SocketAddr) -> TcpStream {
    bounded(TcpStream::connect_timeout(&addr, WAIT).expect("connect"))
}

/// `s`, its reads and writes bounded by [`WAIT`].
fn bounded(s: TcpStream) -> TcpStream {
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.set_write_timeout(Some(WAIT)).unwrap();
    s
}

/// [`connect`] from `source`, another loopback address (127.0.0.2 and up
/// need no setup on Linux): a second client, or a proxy, as the server
/// sees it.
pub fn connect_from(addr: SocketAddr, source: IpAddr) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None).expect("socket");
    s.bind(&SocketAddr::new(source, 0).into())
        .unwrap_or_else(|e| panic!("bind to {source}: {e}"));
    s.connect_timeout(&addr.into(), WAIT).expect("connect");
    bounded(s.into())
}

/// One transient exchange: send `raw`, read until the server closes.
pub fn exchange(addr: SocketAddr, raw: &[u8]) -> String {
    let mut s = connect(addr);
    s.write_all(raw).expect("write request");
    read_to_close(&mut s)
}

/// Reads until the other end closes the connection (a reset counts: it
/// may close with our bytes unread); fails the test if it is still open
/// when the stream's read timeout (`WAIT` from [`connect`]) runs out.
pub fn read_to_close(s: &mut impl Read) -> String {
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the other end did not close the connection: {e}"),
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads exactly one response from a keep-alive connection.
pub fn read_reply(s: &mut TcpStream) -> Reply {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            other => panic!(
                "connection ended mid-response ({other:?}): {:?}",
                String::from_utf8_lossy(&buf)
            ),
        }
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let mut reply = Reply::parse(&head);
    let len: usize = reply
        .header("Content-Length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).expect("read body");
    reply.body = String::from_utf8_lossy(&body).into_owned();
    reply
}

/// A transient request built from a method and headers, with
/// `Connection: close`.
pub fn request(addr: SocketAddr, method: &str, headers: &[(&str, &str)]) -> Reply {
    let raw = build(method, headers, true);
    Reply::parse(&exchange(addr, raw.as_bytes()))
}

pub fn build(method: &str, headers: &[(&str, &str)], close: bool) -> String {
    let mut raw = format!("{method} / HTTP/1.1\r\nHost: test\r\n");
    for (n, v) in headers {
        raw.push_str(&format!("{n}: {v}\r\n"));
    }
    if close {
        raw.push_str("Connection: close\r\n");
    }
    raw.push_str("\r\n");
    raw
}
