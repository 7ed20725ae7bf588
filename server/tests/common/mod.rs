//! Starts the real `chat-server` binary on 127.0.0.1 and talks to it over
//! real sockets, with bounded waits everywhere.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Longest any single wait in these tests may take; generous, because CI
/// machines are slow and loaded.
pub const WAIT: Duration = Duration::from_secs(20);

/// A running server, stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
}

impl Server {
    /// Starts the server with `args` on a free port of 127.0.0.1; per-IP
    /// rate limits are off unless `args` sets them, because every test
    /// connects from the same address.
    pub fn start(args: &[&str]) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_chat-server"));
        cmd.args(["--bind", "127.0.0.1", "--port", "0"]);
        if !args.iter().any(|a| a.starts_with("--per-ip-rate")) {
            cmd.args(["--per-ip-rate", "0"]);
        }
        if !args.iter().any(|a| a.starts_with("--per-ip-conns")) {
            cmd.args(["--per-ip-conns", "0"]);
        }
        cmd.args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .env("RUST_LOG", "warn");
        let mut child = cmd.spawn().expect("start chat-server");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the listening line");
        // "listening on 127.0.0.1:PORT (tcp)"
        let addr = line
            .split_whitespace()
            .nth(2)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line from chat-server: {line:?}"));
        Server { child, addr }
    }

    /// Sends SIGTERM and waits for a clean exit; returns the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        terminate(&mut self.child)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            terminate(&mut self.child);
        }
    }
}

fn terminate(child: &mut Child) -> std::process::ExitStatus {
    // SIGTERM first so the server takes its clean path.
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait().expect("wait for chat-server")
}

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
    let s = TcpStream::connect_timeout(&addr, WAIT).expect("connect");
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.set_write_timeout(Some(WAIT)).unwrap();
    s
}

/// One transient exchange: send `raw`, read until the server closes.
pub fn exchange(addr: SocketAddr, raw: &[u8]) -> String {
    let mut s = connect(addr);
    s.write_all(raw).expect("write request");
    read_to_close(&mut s)
}

pub fn read_to_close(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
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

/// Registers `id` and returns its token.
pub fn register(addr: SocketAddr, id: &str, port: u16) -> String {
    let r = request(
        addr,
        "REGISTER",
        &[("Client-Id", id), ("Client-Port", &port.to_string())],
    );
    assert_eq!(r.status, 200, "register {id}: {r:?}");
    r.header("Client-Token").expect("token").to_owned()
}

/// A UDP client socket on 127.0.0.1.
pub fn udp_socket() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").expect("bind udp")
}

/// Sends one datagram and waits up to `wait` for one back.
pub fn udp_exchange(s: &UdpSocket, to: SocketAddr, raw: &[u8], wait: Duration) -> Option<String> {
    s.send_to(raw, to).expect("send datagram");
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 65536];
    match s.recv_from(&mut buf) {
        Ok((n, _)) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Err(_) => None,
    }
}

/// Polls `f` until it returns true or `WAIT` passes.
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}
