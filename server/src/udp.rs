//! The UDP transport: one request per datagram, one response per request.
//!
//! Three rules make HTTP over UDP safe to expose:
//! - a retransmitted request (same source, same `Request-Id`) is answered
//!   from the replay cache, never executed twice;
//! - a response is never more than three times the size of its request, so
//!   a spoofed source cannot turn the server into an amplifier; when the
//!   full response is too big the minimal one is sent, and when even that
//!   is, nothing;
//! - a source over its rate limit is dropped silently: answering a flood
//!   with 429s would only feed it;
//! - only what looks like a request is answered: a response, or another
//!   protocol's datagram, gets nothing. Otherwise a forged source could
//!   set two servers (or this one and anything that answers garbage)
//!   answering each other's errors forever;
//! - a REGISTER whose answer could not be sent within the bound is refused
//!   before it is executed: executed and unanswered, its retransmission
//!   would find the id taken under a token the client never saw.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chat_proto::Token;
use chat_proto::rendezvous::{
    Failure, MAX_DATAGRAM, Parsed, Request, RequestHead, Response, ResponseFraming, parse_request,
    request_id_of,
};
use tokio::net::UdpSocket;
use tokio::sync::watch;

use crate::replay::{Kept, ReplayCache};
use crate::state::{State, Via};

/// How long responses are kept for retransmissions: longer than the ~8 s a
/// client retransmits for, with room for a slow path.
pub const REPLAY_TTL: Duration = Duration::from_secs(30);
/// Memory for kept responses, shared out among the workers' sockets.
pub const REPLAY_BYTES: usize = 64 * 1024 * 1024;
/// The amplification bound: response bytes per request byte.
pub const MAX_AMPLIFICATION: usize = 3;

/// Binds a UDP socket. Each worker has one, in a SO_REUSEPORT group; the
/// kernel picks the socket by hashing the source address and port, so a
/// client's retransmissions reach the worker whose replay cache holds the
/// response.
pub fn bind(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    #[cfg(all(
        unix,
        not(any(target_os = "solaris", target_os = "illumos", target_os = "cygwin"))
    ))]
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        let _ = socket.set_only_v6(false);
    }
    // A deeper receive queue rides out bursts instead of dropping them.
    let _ = socket.set_recv_buffer_size(4 << 20);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Serves datagrams until shutdown.
/// `replay_bytes` is this socket's share of [`REPLAY_BYTES`].
pub async fn run(
    socket: UdpSocket,
    state: Arc<State>,
    replay_bytes: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut cache = ReplayCache::new(REPLAY_TTL, replay_bytes);
    // One byte more than the largest accepted datagram, to see truncation.
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    loop {
        let (n, from) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(got) => got,
                // ICMP errors from earlier sends surface here on some
                // systems; they concern that peer, not the socket.
                Err(e) => {
                    tracing::debug!("udp receive failed: {e}");
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        crate::busy_poll::served();
        if let Some(reply) = answer(&state, &mut cache, &buf[..n], from)
            && let Err(e) = socket.send_to(&reply, from).await
        {
            tracing::debug!(%from, "udp send failed: {e}");
        }
    }
}

/// The datagram to send back for `datagram` from `from`, if any.
pub fn answer(
    state: &State,
    cache: &mut ReplayCache,
    datagram: &[u8],
    from: SocketAddr,
) -> Option<Vec<u8>> {
    let now = state.now();
    if state.admit(from.ip(), Via::Udp, now).is_err() {
        return None;
    }
    let head = match parse_datagram(datagram) {
        Ok(head) => head,
        Err(_) if !request_line_shaped(datagram) => return None,
        Err(failure) => {
            let rid = request_id_of(datagram);
            return encode(&Response::Error(failure), rid.as_deref(), datagram.len());
        }
    };
    let rid = head.request_id.as_deref();
    if let Some(rid) = rid
        && let Some(kept) = cache.get(from, rid, now)
    {
        return replayed(kept, rid, &head, datagram.len());
    }
    if let Some(refusal) = too_short_to_register(state, &head, from, datagram.len()) {
        return encode(&Response::Error(refusal), rid, datagram.len());
    }
    let response = state.answer(&head, from.ip(), now);
    let reply = encode(&response, rid, datagram.len())?;
    if let Some(rid) = rid {
        cache.insert(from, rid, head.method, reply.clone(), now);
    }
    Some(reply)
}

fn parse_datagram(datagram: &[u8]) -> Result<RequestHead, Failure> {
    if datagram.len() > MAX_DATAGRAM {
        return Err(Failure::new(
            chat_proto::rendezvous::ErrorStatus::ContentTooLarge,
            format!("datagram larger than {MAX_DATAGRAM} bytes"),
        ));
    }
    match parse_request(datagram)? {
        Parsed::Complete(head) => {
            let end = head.head_len + head.content_length;
            match datagram.get(end..) {
                None => Err(Failure::bad_request(
                    "datagram shorter than its Content-Length",
                )),
                // A stray line ending is forgiven; a second request is not
                // dropped unsaid.
                Some(rest) if rest.iter().all(|b| matches!(b, b'\r' | b'\n')) => Ok(head),
                Some(rest) => Err(Failure::bad_request(format!(
                    "{} bytes after the request: send one request per datagram",
                    rest.len()
                ))),
            }
        }
        Parsed::Partial => Err(Failure::bad_request(
            "incomplete request: send one whole request, ending with a blank line, per datagram",
        )),
    }
}

/// The answer to a request whose `Request-Id` (`rid`) is in the cache: the
/// kept response, if this is its retransmission.
fn replayed(kept: &Kept, rid: &str, head: &RequestHead, request_len: usize) -> Option<Vec<u8>> {
    // A true retransmission is as long as the request the response was
    // sized for; a short datagram reusing its id gets nothing, or the
    // cache would be an amplifier for anyone who saw the id.
    if !within_bound(&kept.response, request_len) {
        return None;
    }
    // Another method under the same id is a client's mistake, told as
    // such: a QUIT is not answered with an earlier REGISTER's REGACK.
    if kept.method != head.method {
        let f = Failure::bad_request(format!(
            "Request-Id {rid} already names another request of yours: use a new one for each request"
        ));
        return encode(&Response::Error(f), Some(rid), request_len);
    }
    Some(kept.response.clone())
}

/// Longer than any REGACK can be: a 32-character id, the longest IPv6
/// address with a 5-digit port, a 10-digit lifetime, a 64-character
/// `Request-Id` (a test checks). A REGISTER of a third of this or more
/// needs no size check.
const REGACK_AT_MOST: usize = 300;

/// Why a REGISTER must be refused before it runs: its answer, whose size
/// is known but for the token's value, would not fit the amplification
/// bound, and a REGISTER executed and unanswered would leave its
/// retransmission to find the id taken under a token never seen.
fn too_short_to_register(
    state: &State,
    head: &RequestHead,
    from: SocketAddr,
    request_len: usize,
) -> Option<Failure> {
    let Ok(Request::Register { id, port, .. }) = &head.request else {
        return None;
    };
    if request_len * MAX_AMPLIFICATION >= REGACK_AT_MOST {
        return None;
    }
    let largest = Response::RegAck {
        id: *id,
        // As the registry records it: an IPv4 source as IPv4.
        addr: SocketAddr::new(from.ip().to_canonical(), *port),
        token: Token::from_bytes([0; 16]),
        expires: state.expires,
    };
    encode(&largest, head.request_id.as_deref(), request_len).is_none().then(|| {
        Failure::bad_request(format!(
            "request too short for its answer: over UDP an answer is at most {MAX_AMPLIFICATION} times its request; lengthen it with Host and Request-Id headers"
        ))
    })
}

/// Whether `datagram` starts with `METHOD SP TARGET SP HTTP/d.d`: worth an
/// answer even when it is wrong. A response starts `HTTP/1.1 200 ...`.
fn request_line_shaped(datagram: &[u8]) -> bool {
    let line = datagram.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let tchar = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b);
    !method.is_empty()
        && method.iter().all(tchar)
        && !target.is_empty()
        && matches!(version, [b'H', b'T', b'T', b'P', b'/', d, b'.', e] if d.is_ascii_digit() && e.is_ascii_digit())
}

fn encode(response: &Response, request_id: Option<&str>, request_len: usize) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(256);
    for minimal in [false, true] {
        out.clear();
        let framing = ResponseFraming {
            datagram: true,
            minimal,
            request_id,
            ..ResponseFraming::default()
        };
        response.encode(&mut out, &framing);
        if out.len() <= request_len * MAX_AMPLIFICATION {
            break;
        }
    }
    within_bound(&out, request_len).then_some(out)
}

/// Whether `response` may answer a request of `request_len` bytes.
fn within_bound(response: &[u8], request_len: usize) -> bool {
    let ok = response.len() <= request_len * MAX_AMPLIFICATION;
    if !ok {
        tracing::debug!(
            request_len,
            response_len = response.len(),
            "udp response over the amplification bound; not sent"
        );
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::TrustedProxies;
    use chat_proto::rendezvous::Transports;

    fn state(rate: u32) -> State {
        state_with(rate, TrustedProxies::default(), 300)
    }

    fn cache() -> ReplayCache {
        ReplayCache::new(REPLAY_TTL, REPLAY_BYTES)
    }

    fn state_with(rate: u32, trusted_proxies: TrustedProxies, expires: u64) -> State {
        let transports = Transports {
            tcp: false,
            udp: true,
        };
        State::for_tests(transports, rate, trusted_proxies, expires)
    }

    fn from() -> SocketAddr {
        "127.0.0.1:40000".parse().unwrap()
    }

    fn text(b: &[u8]) -> String {
        String::from_utf8_lossy(b).into_owned()
    }

    /// The `Client-Token` a REGACK issued.
    fn token_in(resp: &[u8]) -> String {
        text(resp)
            .lines()
            .find_map(|l| l.strip_prefix("Client-Token: "))
            .expect("a REGACK")
            .to_owned()
    }

    #[test]
    fn udp_never_believes_x_forwarded_for() {
        // A datagram's source is easily forged, so even a trusted proxy's
        // address proves nothing over UDP.
        let proxy = "127.0.0.1".parse().unwrap();
        let s = state_with(0, TrustedProxies::new(vec![proxy]), 300);
        let mut cache = cache();
        let req = b"REGISTER / HTTP/1.1\r\nClient-Id: alice\r\nClient-Port: 4000\r\nRequest-Id: 1\r\nX-Forwarded-For: 127.0.0.77\r\n\r\n";
        let resp = text(&answer(&s, &mut cache, req, from()).unwrap());
        assert!(resp.contains("Client-Addr: 127.0.0.1:4000\r\n"), "{resp}");
    }

    #[test]
    fn retransmission_is_answered_from_the_cache() {
        let s = state(0);
        let mut cache = cache();
        let req = b"REGISTER / HTTP/1.1\r\nHost: 127.0.0.1:5555\r\nClient-Id: alice\r\nClient-Port: 4000\r\nRequest-Id: 1\r\n\r\n";
        let first = answer(&s, &mut cache, req, from()).unwrap();
        let again = answer(&s, &mut cache, req, from()).unwrap();
        assert!(
            text(&first).starts_with("HTTP/1.1 200 REGACK"),
            "{}",
            text(&first)
        );
        assert_eq!(first, again);
        // A new Request-Id executes again, and the id is now taken.
        let req2 = b"REGISTER / HTTP/1.1\r\nHost: 127.0.0.1:5555\r\nClient-Id: alice\r\nClient-Port: 4000\r\nRequest-Id: 2\r\n\r\n";
        let other = answer(&s, &mut cache, req2, from()).unwrap();
        assert!(
            text(&other).starts_with("HTTP/1.1 409 REGNACK"),
            "{}",
            text(&other)
        );
    }

    #[test]
    fn a_response_or_garbage_gets_no_answer_so_no_loop_can_start() {
        let a = state(0);
        let b = state(0);
        let mut cache_a = cache();
        let mut cache_b = cache();
        // A forged datagram makes b answer a, a answer b, and so on, for as
        // long as each answers the other: it ends at the first answer.
        for forged in [
            &b"HTTP/1.1 400 Bad Request\r\n\r\n"[..],
            b"NOT A REQUEST LINE AT ALL\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
            b"PROBE / HTTP/1.1\r\nBad Header\r\n\r\n",
            b"\x00\x01\x02garbage from another protocol\r\n\r\n",
        ] {
            let mut datagram = forged.to_vec();
            let mut hops = 0;
            while let Some(reply) = if hops % 2 == 0 {
                answer(&b, &mut cache_b, &datagram, from())
            } else {
                answer(&a, &mut cache_a, &datagram, from())
            } {
                hops += 1;
                assert!(hops < 3, "a loop: {}", text(&reply));
                datagram = reply;
            }
            assert!(hops <= 1, "{}", text(forged));
        }
        // Request-shaped mistakes are still explained.
        let bad = answer(
            &a,
            &mut cache_a,
            b"PROBE / HTTP/1.1\r\nBad Header\r\n\r\n",
            from(),
        );
        assert!(text(&bad.unwrap()).starts_with("HTTP/1.1 400"));
        assert!(request_line_shaped(b"register / HTTP/1.1\r\n"));
        assert!(!request_line_shaped(b"HTTP/1.1 200 PROBEACK\r\n"));
        assert!(!request_line_shaped(b"PROBE /  HTTP/1.1\r\n"));
    }

    #[test]
    fn forged_datagrams_do_not_spend_an_address_s_tcp_allowance() {
        let s = state(2);
        let mut cache = cache();
        let now = s.now();
        for _ in 0..10 {
            let _ = answer(&s, &mut cache, b"PROBE / HTTP/1.1\r\n\r\n", from());
        }
        assert!(s.admit(from().ip(), Via::Udp, now).is_err(), "udp spent");
        assert!(s.admit(from().ip(), Via::Tcp, now).is_ok(), "tcp untouched");
    }

    #[test]
    fn a_register_whose_answer_would_not_fit_is_refused_before_it_runs() {
        // A long IPv6 source and a ten-digit lifetime make REGACK longer
        // than three times a minimal REGISTER.
        let s = state_with(0, TrustedProxies::default(), u64::from(u32::MAX));
        let mut cache = cache();
        let v6: SocketAddr = "[2001:db8:ffff:ffff:ffff:ffff:ffff:ffff]:40000"
            .parse()
            .unwrap();
        let short = b"REGISTER / HTTP/1.1\r\nClient-Id: a\r\nClient-Port: 1\r\n\r\n";
        let refused = text(&answer(&s, &mut cache, short, v6).unwrap());
        assert!(refused.starts_with("HTTP/1.1 400"), "{refused}");
        // Not executed: the same id registers once asked properly.
        let padded = b"REGISTER / HTTP/1.1\r\nHost: 127.0.0.1:5555\r\nClient-Id: a\r\nClient-Port: 1\r\nRequest-Id: 1\r\n\r\n";
        let ok = text(&answer(&s, &mut cache, padded, v6).unwrap());
        assert!(ok.starts_with("HTTP/1.1 200 REGACK"), "{ok}");
        // From IPv4 a short one fits, as before.
        let short = b"REGISTER / HTTP/1.1\r\nClient-Id: b\r\nClient-Port: 1\r\n\r\n";
        let ok = text(&answer(&s, &mut cache, short, from()).unwrap());
        assert!(ok.starts_with("HTTP/1.1 200 REGACK"), "{ok}");
    }

    #[test]
    fn a_request_id_reused_for_another_method_is_refused_not_replayed() {
        let s = state(0);
        let mut cache = cache();
        let reg = b"REGISTER / HTTP/1.1\r\nHost: x\r\nClient-Id: a\r\nClient-Port: 1\r\nRequest-Id: abc\r\n\r\n";
        let first = answer(&s, &mut cache, reg, from()).unwrap();
        let token = token_in(&first);
        let quit = format!(
            "QUIT / HTTP/1.1\r\nHost: x\r\nClient-Id: a\r\nClient-Token: {token}\r\nRequest-Id: abc\r\n\r\n"
        );
        let r = text(&answer(&s, &mut cache, quit.as_bytes(), from()).unwrap());
        assert!(r.starts_with("HTTP/1.1 400"), "{r}");
        assert!(r.contains("Request-Id: abc\r\n"), "{r}");
        // The retransmitted REGISTER is still replayed.
        assert_eq!(answer(&s, &mut cache, reg, from()).unwrap(), first);
        // An earlier refusal is no answer to another method either.
        let bridge = b"BRIDGE / HTTP/1.1\r\nHost: x\r\nClient-Id: nobody\r\nClient-Token: 00000000000000000000000000000000\r\nRequest-Id: def\r\n\r\n";
        let refused = text(&answer(&s, &mut cache, bridge, from()).unwrap());
        assert!(refused.starts_with("HTTP/1.1 404"), "{refused}");
        let quit = quit.replace("abc", "def");
        let r = text(&answer(&s, &mut cache, quit.as_bytes(), from()).unwrap());
        assert!(r.starts_with("HTTP/1.1 400"), "{r}");
        assert!(r.contains("already names another request"), "{r}");
    }

    #[test]
    fn no_regack_is_longer_than_regack_at_most() {
        let largest = Response::RegAck {
            id: "a".repeat(32).parse().unwrap(),
            addr: "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"
                .parse()
                .unwrap(),
            token: Token::from_bytes([0xff; 16]),
            expires: u32::MAX,
        };
        let mut out = Vec::new();
        largest.encode(
            &mut out,
            &ResponseFraming {
                datagram: true,
                request_id: Some(&"r".repeat(chat_proto::rendezvous::MAX_REQUEST_ID)),
                ..ResponseFraming::default()
            },
        );
        assert!(out.len() <= REGACK_AT_MOST, "{} bytes", out.len());
    }

    #[test]
    fn one_request_per_datagram() {
        let s = state(0);
        let mut cache = cache();
        let two = b"PROBE / HTTP/1.1\r\nHost: x\r\n\r\nPROBE / HTTP/1.1\r\nHost: x\r\n\r\n";
        let r = text(&answer(&s, &mut cache, two, from()).unwrap());
        assert!(r.starts_with("HTTP/1.1 400"), "{r}");
        let trailing = b"PROBE / HTTP/1.1\r\nHost: x\r\n\r\n\r\n";
        let r = text(&answer(&s, &mut cache, trailing, from()).unwrap());
        assert!(r.starts_with("HTTP/1.1 200 PROBEACK"), "{r}");
    }

    /// The largest BRIDGEACK, a 32-character peer at an IPv6 address with
    /// its key, answers the smallest BRIDGE that can get it, within the
    /// bound and whole.
    #[test]
    fn the_largest_bridgeack_stays_within_three_times_the_request() {
        let s = state(0);
        let mut cache = cache();
        let long = "p".repeat(32);
        let far: SocketAddr = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe]:65535"
            .parse()
            .unwrap();
        let reg = |id: &str, rid: &str| {
            format!(
                "REGISTER / HTTP/1.1\r\nClient-Id: {id}\r\nClient-Port: 65535\r\nRequest-Id: {rid}\r\n\r\n"
            )
        };
        let waiting = answer(&s, &mut cache, reg(&long, "1").as_bytes(), far).unwrap();
        let t = token_in(&waiting);
        let bridge = format!(
            "BRIDGE / HTTP/1.1\r\nClient-Id: {long}\r\nClient-Token: {t}\r\nRequest-Id: 2\r\n\r\n"
        );
        let r = answer(&s, &mut cache, bridge.as_bytes(), far).unwrap();
        assert!(text(&r).starts_with("HTTP/1.1 200 BRIDGEACK"));
        let caller = answer(&s, &mut cache, reg("a", "3").as_bytes(), from()).unwrap();
        let t = token_in(&caller);
        // Bare line feeds, no spaces, no Request-Id: as small as a BRIDGE
        // can be.
        let req = format!("BRIDGE / HTTP/1.1\nClient-Id:a\nClient-Token:{t}\n\n");
        let resp = answer(&s, &mut cache, req.as_bytes(), from()).unwrap();
        let resp = text(&resp);
        assert!(resp.contains(&format!("Peer-Id: {long}\r\n")), "{resp}");
        assert!(resp.contains("Peer-Key: "), "{resp}");
        assert!(
            resp.len() <= 3 * req.len(),
            "{} bytes for {}",
            resp.len(),
            req.len()
        );
    }

    #[test]
    fn responses_stay_within_three_times_the_request() {
        let s = state(0);
        let mut cache = cache();
        let mut answered = Vec::new();
        for req in [
            &b"PROBE / HTTP/1.1\r\n\r\n"[..],
            b"X\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
            b"REGISTER / HTTP/1.1\r\nClient-Id: a\r\nClient-Port: 1\r\n\r\n",
            b"BRIDGE / HTTP/1.1\r\nClient-Id: a\r\n\r\n",
            b"\r\n\r\n",
            b"P",
        ] {
            if let Some(resp) = answer(&s, &mut cache, req, from()) {
                assert!(
                    resp.len() <= 3 * req.len(),
                    "{} -> {}",
                    text(req),
                    text(&resp)
                );
                answered.push(text(&resp));
            }
        }
        // Whatever can be answered within the bound is, in its minimal
        // form (no body, no Server); no answer fits three times a 1- or
        // 4-byte datagram, so those get nothing.
        let lines: Vec<&str> = answered
            .iter()
            .map(|r| r.lines().next().unwrap_or(""))
            .collect();
        assert_eq!(
            lines,
            [
                "HTTP/1.1 200 PROBEACK",
                "HTTP/1.1 501 Not Implemented",
                "HTTP/1.1 200 REGACK",
                "HTTP/1.1 401 Unauthorized",
            ]
        );
        assert!(
            answered.iter().all(|r| r.ends_with("\r\n\r\n")),
            "{answered:?}"
        );
        assert!(!answered[0].contains("Server:"), "{}", answered[0]);
    }

    #[test]
    fn a_refused_datagram_still_carries_its_request_id() {
        let s = state(0);
        let mut cache = cache();
        for (req, status) in [
            (
                &b"PROBE / HTTP/1.1\r\nRequest-Id: 5\r\nContent-Length: 10\r\n\r\nab"[..],
                "400",
            ),
            (
                b"PROBE / HTTP/1.1\r\nRequest-Id: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                "501",
            ),
            (
                b"PROBE / HTTP/1.1\r\nRequest-Id: 5\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
                "400",
            ),
        ] {
            let resp = text(&answer(&s, &mut cache, req, from()).unwrap());
            assert!(resp.starts_with(&format!("HTTP/1.1 {status} ")), "{resp}");
            assert!(resp.contains("\r\nRequest-Id: 5\r\n"), "{resp}");
        }
        // Two ids, or a bad one, are not echoed.
        let resp = answer(
            &s,
            &mut cache,
            b"PROBE / HTTP/1.1\r\nRequest-Id: 5\r\nRequest-Id: 6\r\nTransfer-Encoding: x\r\n\r\n",
            from(),
        )
        .unwrap();
        assert!(!text(&resp).contains("Request-Id"), "{}", text(&resp));
    }

    #[test]
    fn a_short_datagram_reusing_an_id_gets_no_kept_response() {
        let s = state(0);
        let mut cache = cache();
        let req = b"REGISTER / HTTP/1.1\r\nHost: 127.0.0.1:5555\r\nClient-Id: alice\r\nClient-Port: 4000\r\nRequest-Id: 1\r\n\r\n";
        let first = answer(&s, &mut cache, req, from()).unwrap();
        let short = b"X / HTTP/1.1\r\nRequest-Id:1\r\n\r\n";
        assert!(first.len() > 3 * short.len());
        assert_eq!(answer(&s, &mut cache, short, from()), None);
        // The real retransmission still gets it.
        assert_eq!(answer(&s, &mut cache, req, from()), Some(first));
    }

    #[test]
    fn minimal_form_is_used_when_the_full_one_is_too_big() {
        let s = state(0);
        let mut cache = cache();
        let resp = answer(&s, &mut cache, b"PROBE / HTTP/1.1\r\n\r\n", from()).unwrap();
        assert_eq!(
            text(&resp),
            "HTTP/1.1 200 PROBEACK\r\nTransport: udp\r\n\r\n"
        );
        let padded = b"PROBE / HTTP/1.1\r\nHost: 127.0.0.1:5555\r\nRequest-Id: 12345\r\n\r\n";
        let resp = answer(&s, &mut cache, padded, from()).unwrap();
        assert!(
            text(&resp).contains("Server: chat-server/"),
            "{}",
            text(&resp)
        );
    }

    #[test]
    fn over_the_rate_limit_is_silent() {
        let s = state(2);
        let mut cache = cache();
        let req = b"PROBE / HTTP/1.1\r\nHost: 127.0.0.1:5555\r\n\r\n";
        assert!(answer(&s, &mut cache, req, from()).is_some());
        assert!(answer(&s, &mut cache, req, from()).is_some());
        assert!(answer(&s, &mut cache, req, from()).is_none());
    }
}
