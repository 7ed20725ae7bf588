//! The load generator: C concurrent clients, each in a loop of requests,
//! over transient TCP, keep-alive TCP or UDP.
//!
//! A transient client reads until the server closes, so the server closes
//! first and keeps the TIME_WAIT state, as the protocol asks. Clients can
//! spread over source addresses 127.0.0.1-127.0.0.254 so that a server's
//! per-address limits can stay on while it is measured.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use chat_proto::id::MAX_ID_LEN;
use chat_proto::rendezvous::{
    MAX_DATAGRAM, MAX_HEADERS, Method, Parsed, Request, RequestFraming, Response,
    headers_body_length, parse_response,
};
use chat_proto::{ClientId, Token};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};
use tokio::time::{Instant, timeout};

use crate::stats::Summary;

/// How each request travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// A new TCP connection per request, closed by the server.
    Transient,
    /// One TCP connection per client, reused.
    Keepalive,
    /// One datagram per request.
    Udp,
}

/// What each client does in a loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Op {
    /// PROBE.
    Probe,
    /// REGISTER of a fresh id each time.
    Register,
    /// REGISTER, BRIDGE, QUIT of a fresh id (three requests).
    Cycle,
    /// `GET <path>` to any HTTP server.
    Get,
}

/// One load run.
#[derive(Clone, Debug)]
pub struct Load {
    pub target: SocketAddr,
    pub mode: Mode,
    pub op: Op,
    pub concurrency: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// Source addresses to spread clients over (1 = the OS picks).
    pub sources: u8,
    pub path: String,
}

/// No request may take longer than this; past it the request counts as an
/// error and the client moves on.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// UDP requests unanswered after this count as errors (no retransmission
/// while measuring: a loss should show, not hide in the latency).
const UDP_TIMEOUT: Duration = Duration::from_secs(1);

/// Runs `load` and returns what it measured (after the warm-up).
pub async fn run(load: &Load) -> anyhow::Result<Summary> {
    if load.op == Op::Get && load.mode == Mode::Udp {
        bail!("GET is for HTTP servers over TCP; use --mode transient or keepalive");
    }
    let load = Arc::new(load.clone());
    let nonce = nonce()?;
    let begin = Instant::now();
    let measure_from = begin + load.warmup;
    let end = measure_from + load.duration;
    let mut tasks = Vec::with_capacity(load.concurrency);
    for i in 0..load.concurrency {
        let load = Arc::clone(&load);
        tasks.push(tokio::spawn(async move {
            let mut c = Client::new(i, load, nonce);
            c.run(measure_from, end).await;
            c.summary
        }));
    }
    let mut parts = Vec::with_capacity(tasks.len());
    for t in tasks {
        parts.push(t.await.context("a client task panicked")?);
    }
    Ok(Summary::merge(parts, load.duration))
}

fn nonce() -> anyhow::Result<u32> {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).context("no randomness for the run's id prefix")?;
    Ok(u32::from_le_bytes(b) & 0xff_ffff)
}

/// A unique id, `PNNNNNN-I-C`, written without `format!`: the load
/// generator shares the cores with the server it measures, so what it
/// spends per request is taken from the server. `None` past 32 characters.
fn fresh_id(prefix: u8, nonce: u32, index: usize, counter: u64) -> Option<ClientId> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    // Room for the prefix, 6 hex digits and two 20-digit numbers.
    let mut buf = [0u8; 64];
    buf[0] = prefix;
    let mut n = 1;
    for shift in (0..6).rev() {
        buf[n] = HEX[((nonce >> (shift * 4)) & 0xf) as usize];
        n += 1;
    }
    for value in [index as u64, counter] {
        buf[n] = b'-';
        n += 1;
        let mut digits = [0u8; 20];
        let digits = decimal(value, &mut digits);
        buf[n..n + digits.len()].copy_from_slice(digits);
        n += digits.len();
    }
    ClientId::from_bytes(&buf[..n]).ok()
}

/// `v` in decimal, written at the end of `buf`.
fn decimal(mut v: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut d = buf.len();
    loop {
        d -= 1;
        buf[d] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            return &buf[d..];
        }
    }
}

/// Client `index`'s fresh REGISTER over TCP as bytes, with only the id's
/// counter to fill in: exactly what `Request::encode` writes (a test
/// checks), without building it each time, as the GET to the reference
/// server is not built each time either.
struct RegisterTemplate {
    /// Up to the counter, which ends the id.
    head: Vec<u8>,
    /// After it.
    tail: Vec<u8>,
    /// Most digits the counter may have before the id is too long.
    room: usize,
}

impl RegisterTemplate {
    fn new(nonce: u32, index: usize, framing: &RequestFraming<'_>) -> Option<RegisterTemplate> {
        let id = fresh_id(b'b', nonce, index, 0)?;
        let mut out = Vec::new();
        Request::Register {
            id,
            port: 9,
            token: None,
        }
        .encode(&mut out, framing);
        let line = format!("Client-Id: {id}\r\n");
        let at = out.windows(line.len()).position(|w| w == line.as_bytes())?;
        // The id ends in "-0": the counter is its last character.
        let counter = at + line.len() - 3;
        Some(RegisterTemplate {
            head: out[..counter].to_vec(),
            tail: out[counter + 1..].to_vec(),
            room: MAX_ID_LEN - (id.as_str().len() - 1),
        })
    }

    /// Writes the REGISTER of counter `n` to `out`; false if its id would
    /// be too long.
    fn write(&self, n: u64, out: &mut Vec<u8>) -> bool {
        let mut digits = [0u8; 20];
        let digits = decimal(n, &mut digits);
        if digits.len() > self.room {
            return false;
        }
        out.clear();
        out.extend_from_slice(&self.head);
        out.extend_from_slice(digits);
        out.extend_from_slice(&self.tail);
        true
    }
}

/// The source address of client `i`.
pub fn source_ip(i: usize, sources: u8) -> Option<IpAddr> {
    (sources > 1).then(|| {
        IpAddr::V4(Ipv4Addr::new(
            127,
            0,
            0,
            1 + (i % usize::from(sources)) as u8,
        ))
    })
}

struct Client {
    index: usize,
    load: Arc<Load>,
    nonce: u32,
    source: Option<IpAddr>,
    conn: Option<TcpStream>,
    udp: Option<UdpSocket>,
    buf: Vec<u8>,
    out: Vec<u8>,
    counter: u64,
    host: String,
    /// The GET of `--op get`, the same for every request.
    get: Vec<u8>,
    /// `--op register` over TCP.
    register: Option<RegisterTemplate>,
    /// Requests sent: each UDP request's `Request-Id`, so that no two of a
    /// cycle share one (the server would answer the later ones from its
    /// replay cache).
    sent: u64,
    rid: String,
    summary: Summary,
}

impl Client {
    fn new(index: usize, load: Arc<Load>, nonce: u32) -> Client {
        let host = load.target.to_string();
        let conn = if load.mode == Mode::Transient {
            "Connection: close\r\n"
        } else {
            ""
        };
        let get = format!("GET {} HTTP/1.1\r\nHost: {host}\r\n{conn}\r\n", load.path).into_bytes();
        let register = match (load.op, load.mode) {
            (Op::Register, Mode::Transient | Mode::Keepalive) => RegisterTemplate::new(
                nonce,
                index,
                &RequestFraming {
                    host: Some(&host),
                    request_id: None,
                    close: load.mode == Mode::Transient,
                },
            ),
            _ => None,
        };
        Client {
            index,
            source: source_ip(index, load.sources),
            load,
            nonce,
            conn: None,
            udp: None,
            buf: Vec::with_capacity(4096),
            out: Vec::with_capacity(512),
            counter: 0,
            host,
            get,
            register,
            sent: 0,
            rid: String::new(),
            summary: Summary::default(),
        }
    }

    async fn run(&mut self, measure_from: Instant, end: Instant) {
        while Instant::now() < end {
            self.counter += 1;
            let id = match self.load.op {
                Op::Probe | Op::Get => None,
                Op::Register if self.register.is_some() => None,
                Op::Register | Op::Cycle => fresh_id(b'b', self.nonce, self.index, self.counter),
            };
            let steps: &[Method] = match self.load.op {
                Op::Probe | Op::Get => &[Method::Probe],
                Op::Register => &[Method::Register],
                Op::Cycle => &[Method::Register, Method::Bridge, Method::Quit],
            };
            let mut token = None;
            for &method in steps {
                let request = match (method, id) {
                    (Method::Probe, _) => Some(Request::Probe),
                    (Method::Register, Some(id)) => Some(Request::Register {
                        id,
                        port: 9,
                        token: None,
                    }),
                    (Method::Bridge, Some(id)) => token.map(|token| Request::Bridge {
                        id,
                        token,
                        peer: None,
                    }),
                    (Method::Quit, Some(id)) => token.map(|token| Request::Quit { id, token }),
                    _ => None,
                };
                let started = Instant::now();
                let outcome = match (request, &self.register) {
                    (Some(r), _) => self.exchange(&r).await,
                    (None, Some(t)) if method == Method::Register => {
                        if t.write(self.counter, &mut self.out) {
                            self.send(Method::Register).await
                        } else {
                            Err(anyhow::anyhow!("the id has grown too long"))
                        }
                    }
                    (None, _) => Err(anyhow::anyhow!("no token from the REGISTER before")),
                };
                let finished = Instant::now();
                let ok = match outcome {
                    Ok(Some(Response::RegAck { token: t, .. })) => {
                        token = Some(t);
                        true
                    }
                    Ok(Some(Response::Error(_))) | Err(_) => false,
                    Ok(_) => true,
                };
                if started >= measure_from && finished <= end {
                    if ok {
                        self.summary.requests += 1;
                        let us = finished.duration_since(started).as_micros();
                        self.summary
                            .latencies_us
                            .push(us.min(u128::from(u32::MAX)) as u32);
                    } else {
                        self.summary.errors += 1;
                    }
                }
                if !ok {
                    break;
                }
            }
        }
    }

    /// One request and its response. `Ok(None)` for a successful GET.
    async fn exchange(&mut self, request: &Request) -> anyhow::Result<Option<Response>> {
        let close = self.load.mode == Mode::Transient;
        self.out.clear();
        self.sent += 1;
        let udp = self.load.mode == Mode::Udp;
        if self.load.op == Op::Get {
            self.out.extend_from_slice(&self.get);
        } else {
            if udp {
                use std::fmt::Write as _;
                self.rid.clear();
                let _ = write!(self.rid, "{}", self.sent);
            }
            let framing = RequestFraming {
                host: Some(&self.host),
                request_id: udp.then_some(self.rid.as_str()),
                close,
            };
            request.encode(&mut self.out, &framing);
        }
        self.send(request.method()).await
    }

    /// Sends the request in `out` and reads its response.
    async fn send(&mut self, method: Method) -> anyhow::Result<Option<Response>> {
        let close = self.load.mode == Mode::Transient;
        match self.load.mode {
            Mode::Udp => timeout(UDP_TIMEOUT, self.udp_exchange(method))
                .await
                .context("udp request timed out")?
                .map(Some),
            Mode::Transient | Mode::Keepalive => {
                let r = timeout(REQUEST_TIMEOUT, self.tcp_exchange(method, close))
                    .await
                    .context("request timed out");
                if !matches!(r, Ok(Ok(_))) || close {
                    self.conn = None;
                }
                r?
            }
        }
    }

    async fn tcp_exchange(
        &mut self,
        method: Method,
        close: bool,
    ) -> anyhow::Result<Option<Response>> {
        if self.conn.is_none() {
            self.conn = Some(connect(self.load.target, self.source).await?);
        }
        let Some(conn) = self.conn.as_mut() else {
            bail!("no connection");
        };
        conn.write_all(&self.out).await?;
        self.buf.clear();
        // Only a cycle needs what a response says (the token); the other
        // loads check the status, as they do for the reference server, so
        // the load generator spends no more on one server than the other.
        let light = self.load.op != Op::Cycle;
        loop {
            if conn.read_buf(&mut self.buf).await? == 0 {
                bail!("connection closed before a whole response");
            }
            if let Some((response, used)) = parse(&self.buf, method, light)? {
                if close {
                    // Wait for the server's close, so it closes first.
                    let mut rest = [0u8; 256];
                    while conn.read(&mut rest).await? != 0 {}
                } else if used != self.buf.len() {
                    bail!("unexpected bytes after the response");
                }
                return Ok(response);
            }
        }
    }

    async fn udp_exchange(&mut self, method: Method) -> anyhow::Result<Response> {
        if self.udp.is_none() {
            let bind = SocketAddr::new(self.source.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)), 0);
            let s = UdpSocket::bind(bind).await?;
            s.connect(self.load.target).await?;
            self.udp = Some(s);
        }
        let Some(sock) = self.udp.as_ref() else {
            bail!("no socket");
        };
        sock.send(&self.out).await?;
        let mut buf = [0u8; MAX_DATAGRAM];
        loop {
            let n = sock.recv(&mut buf).await?;
            let Parsed::Complete((head, _)) = parse_response(&buf[..n], method, true)? else {
                bail!("partial datagram");
            };
            // A late answer to an earlier, timed-out request: skip it.
            if head.request_id.as_deref() == Some(self.rid.as_str()) {
                return Ok(head.response);
            }
        }
    }
}

/// Parses a response. `light` only checks for a 2xx status and gives
/// `None` for the response.
fn parse(
    buf: &[u8],
    method: Method,
    light: bool,
) -> anyhow::Result<Option<(Option<Response>, usize)>> {
    if light {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut r = httparse::Response::new(&mut headers);
        let httparse::Status::Complete(head) = r.parse(buf)? else {
            return Ok(None);
        };
        let len = headers_body_length(r.headers)?.unwrap_or(0);
        if buf.len() < head + len {
            return Ok(None);
        }
        if !(200..300).contains(&r.code.unwrap_or(0)) {
            bail!("status {:?}", r.code);
        }
        return Ok(Some((None, head + len)));
    }
    match parse_response(buf, method, false)? {
        Parsed::Partial => Ok(None),
        Parsed::Complete((head, used)) => Ok(Some((Some(head.response), used))),
    }
}

async fn connect(target: SocketAddr, source: Option<IpAddr>) -> anyhow::Result<TcpStream> {
    let stream = match source {
        None => TcpStream::connect(target).await?,
        Some(ip) => {
            let s = TcpSocket::new_v4()?;
            s.bind(SocketAddr::new(ip, 0))?;
            s.connect(target).await?
        }
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Registers `count` fresh ids over `connections` keep-alive connections,
/// as fast as the server takes them.
pub async fn fill(
    target: SocketAddr,
    count: u64,
    connections: usize,
    sources: u8,
) -> anyhow::Result<u64> {
    let load = Arc::new(Load {
        target,
        mode: Mode::Keepalive,
        op: Op::Register,
        concurrency: connections,
        duration: Duration::ZERO,
        warmup: Duration::ZERO,
        sources,
        path: String::new(),
    });
    let nonce = nonce()?;
    let per = count.div_ceil(connections as u64);
    let mut tasks = Vec::new();
    for i in 0..connections {
        let load = Arc::clone(&load);
        let n = per.min(count.saturating_sub(per * i as u64));
        tasks.push(tokio::spawn(async move {
            let mut c = Client::new(i, load, nonce);
            let mut ok = 0u64;
            for _ in 0..n {
                c.counter += 1;
                let id = fresh_id(b'f', c.nonce, i, c.counter).context("id too long")?;
                let token: Option<Token> = None;
                match c
                    .exchange(&Request::Register { id, port: 9, token })
                    .await?
                {
                    // A light parse has checked the status only.
                    Some(Response::RegAck { .. }) | None => ok += 1,
                    other => bail!("REGISTER refused: {other:?}"),
                }
            }
            anyhow::Ok(ok)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_ids_are_what_format_would_write() {
        assert_eq!(
            fresh_id(b'b', 0xab12cd, 3, 1234).map(|i| i.to_string()),
            Some("bab12cd-3-1234".into())
        );
        assert_eq!(
            fresh_id(b'f', 0, 0, 0).map(|i| i.to_string()),
            Some("f000000-0-0".into())
        );
        assert!(fresh_id(b'b', 0, usize::MAX, u64::MAX).is_none());
    }

    #[test]
    fn a_templated_register_is_what_encode_writes() {
        for close in [false, true] {
            let framing = RequestFraming {
                host: Some("127.0.0.1:5555"),
                request_id: None,
                close,
            };
            for (index, counter) in [
                (0, 1),
                (7, 10),
                (63, 123_456_789),
                (999, u64::MAX),
                (1000, u64::MAX),
            ] {
                let t = RegisterTemplate::new(0xab12cd, index, &framing).expect("a template");
                let mut templated = Vec::new();
                let id = fresh_id(b'b', 0xab12cd, index, counter);
                assert_eq!(t.write(counter, &mut templated), id.is_some());
                let Some(id) = id else { continue };
                let mut encoded = Vec::new();
                Request::Register {
                    id,
                    port: 9,
                    token: None,
                }
                .encode(&mut encoded, &framing);
                assert_eq!(
                    String::from_utf8_lossy(&templated),
                    String::from_utf8_lossy(&encoded)
                );
            }
        }
    }
}
