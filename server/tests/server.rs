//! The real `chat-server` binary over real TCP and UDP sockets on
//! 127.0.0.1: every request of the protocol, every error status, hostile
//! input, and that the server still answers correctly afterwards.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;

const ZERO_TOKEN: &str = "00000000000000000000000000000000";

fn assert_alive(addr: SocketAddr) {
    let r = request(addr, "PROBE", &[]);
    assert_eq!((r.status, r.phrase.as_str()), (200, "PROBEACK"), "{r:?}");
}

#[test]
fn probe_names_transports_and_server() {
    let s = Server::start(&[]);
    let r = request(s.addr, "PROBE", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.phrase, "PROBEACK");
    assert_eq!(r.header("Transport"), Some("tcp"));
    assert!(r.header("Server").unwrap().starts_with("chat-server/"));

    let both = Server::start(&["--transport", "both"]);
    assert_eq!(
        request(both.addr, "PROBE", &[]).header("Transport"),
        Some("tcp, udp")
    );
}

#[test]
fn the_whole_seed_flow_over_tcp() {
    let s = Server::start(&[]);
    // REGISTER: the address recorded is the one observed, whatever a client
    // claims in a header of its own.
    let r = request(
        s.addr,
        "REGISTER",
        &[
            ("Client-Id", "alice"),
            ("Client-Port", "4000"),
            ("Client-Addr", "203.0.113.9:80"),
        ],
    );
    assert_eq!((r.status, r.phrase.as_str()), (200, "REGACK"));
    assert_eq!(r.header("Client-Id"), Some("alice"));
    assert_eq!(r.header("Client-Addr"), Some("127.0.0.1:4000"));
    assert_eq!(r.header("Expires"), Some("300"));
    let alice = r.header("Client-Token").unwrap().to_owned();
    assert_eq!(alice.len(), 32);
    assert!(alice.bytes().all(|b| b.is_ascii_hexdigit()));

    // The same id under no token or another token: REGNACK.
    let r = request(
        s.addr,
        "REGISTER",
        &[("Client-Id", "alice"), ("Client-Port", "4001")],
    );
    assert_eq!((r.status, r.phrase.as_str()), (409, "REGNACK"));
    // Refresh with the token: same token back.
    let r = request(
        s.addr,
        "REGISTER",
        &[
            ("Client-Id", "alice"),
            ("Client-Port", "4000"),
            ("Client-Token", &alice),
        ],
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Client-Token"), Some(alice.as_str()));

    // BRIDGE with nobody waiting: alice now waits, no peer headers.
    let r = request(
        s.addr,
        "BRIDGE",
        &[("Client-Id", "alice"), ("Client-Token", &alice)],
    );
    assert_eq!((r.status, r.phrase.as_str()), (200, "BRIDGEACK"));
    assert_eq!(r.header("Peer-Id"), None);
    assert_eq!(r.header("Peer-Addr"), None);
    assert_eq!(r.header("Peer-Key"), None);

    // bob BRIDGEs and is handed alice.
    let bob = register(s.addr, "bob", 5000);
    let r = request(
        s.addr,
        "BRIDGE",
        &[("Client-Id", "bob"), ("Client-Token", &bob)],
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Peer-Id"), Some("alice"));
    assert_eq!(r.header("Peer-Addr"), Some("127.0.0.1:4000"));
    // The key bob proves himself to alice with: made from alice's token,
    // for bob alone.
    let key = chat_proto::crypto::PeerKey::derive(&alice.parse().unwrap(), &"bob".parse().unwrap());
    assert_eq!(r.header("Peer-Key"), Some(key.to_string().as_str()));

    // CHAT: both leave the pool; carol then waits instead of getting alice.
    let r = request(
        s.addr,
        "CHAT",
        &[
            ("Client-Id", "bob"),
            ("Client-Token", &bob),
            ("Peer-Id", "alice"),
        ],
    );
    assert_eq!((r.status, r.phrase.as_str()), (200, "CHATACK"));
    let carol = register(s.addr, "carol", 6000);
    let r = request(
        s.addr,
        "BRIDGE",
        &[("Client-Id", "carol"), ("Client-Token", &carol)],
    );
    assert_eq!(r.header("Peer-Id"), None);

    // QUIT removes alice: her id is free again.
    let r = request(
        s.addr,
        "QUIT",
        &[("Client-Id", "alice"), ("Client-Token", &alice)],
    );
    assert_eq!((r.status, r.phrase.as_str()), (200, "QUITACK"));
    let r = request(
        s.addr,
        "BRIDGE",
        &[("Client-Id", "alice"), ("Client-Token", &alice)],
    );
    assert_eq!(r.status, 404);
    register(s.addr, "alice", 4002);
}

#[test]
fn bridge_to_a_named_peer() {
    let s = Server::start(&[]);
    let a = register(s.addr, "a", 1001);
    let b = register(s.addr, "b", 1002);
    let r = request(
        s.addr,
        "BRIDGE",
        &[
            ("Client-Id", "a"),
            ("Client-Token", &a),
            ("Peer-Id", "nobody"),
        ],
    );
    assert_eq!(r.status, 404);
    assert!(r.body.contains("nobody"), "{r:?}");
    let r = request(
        s.addr,
        "BRIDGE",
        &[("Client-Id", "a"), ("Client-Token", &a), ("Peer-Id", "b")],
    );
    assert_eq!(r.status, 409, "b is registered but not waiting");
    let r = request(
        s.addr,
        "BRIDGE",
        &[("Client-Id", "b"), ("Client-Token", &b)],
    );
    assert_eq!(r.header("Peer-Id"), None);
    let r = request(
        s.addr,
        "BRIDGE",
        &[("Client-Id", "a"), ("Client-Token", &a), ("Peer-Id", "b")],
    );
    assert_eq!((r.status, r.header("Peer-Id")), (200, Some("b")));
    assert_eq!(r.header("Peer-Addr"), Some("127.0.0.1:1002"));
}

#[test]
fn error_statuses_with_reasons() {
    let s = Server::start(&[]);
    let a = register(s.addr, "a", 1001);
    let long_id = "x".repeat(33);
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, u16);
    let cases: Vec<Case> = vec![
        ("REGISTER", vec![("Client-Port", "1")], 400),
        (
            "REGISTER",
            vec![("Client-Id", "bad id!"), ("Client-Port", "1")],
            400,
        ),
        (
            "REGISTER",
            vec![("Client-Id", &long_id), ("Client-Port", "1")],
            400,
        ),
        (
            "REGISTER",
            vec![("Client-Id", "b"), ("Client-Port", "0")],
            400,
        ),
        (
            "REGISTER",
            vec![("Client-Id", "b"), ("Client-Port", "http")],
            400,
        ),
        (
            "REGISTER",
            vec![("Client-Id", "b"), ("Client-Port", "+80")],
            400,
        ),
        (
            "REGISTER",
            vec![("Client-Id", ".."), ("Client-Port", "1")],
            400,
        ),
        ("BRIDGE", vec![("Client-Id", "a")], 401),
        (
            "BRIDGE",
            vec![("Client-Id", "a"), ("Client-Token", ZERO_TOKEN)],
            401,
        ),
        (
            "BRIDGE",
            vec![("Client-Id", "a"), ("Client-Token", "nothex")],
            401,
        ),
        (
            "BRIDGE",
            vec![("Client-Id", "zed"), ("Client-Token", ZERO_TOKEN)],
            404,
        ),
        ("CHAT", vec![("Client-Id", "a"), ("Client-Token", &a)], 400),
        (
            "CHAT",
            vec![
                ("Client-Id", "a"),
                ("Client-Token", &a),
                ("Peer-Id", "ghost"),
            ],
            404,
        ),
        (
            "QUIT",
            vec![("Client-Id", "a"), ("Client-Token", ZERO_TOKEN)],
            401,
        ),
        ("GET", vec![], 501),
        (
            "register",
            vec![("Client-Id", "b"), ("Client-Port", "1")],
            501,
        ),
    ];
    for (method, headers, status) in cases {
        let r = request(s.addr, method, &headers);
        assert_eq!(r.status, status, "{method} {headers:?}: {r:?}");
        assert_eq!(r.header("Content-Type"), Some("text/plain; charset=utf-8"));
        assert!(
            !r.body.trim().is_empty() && r.body.lines().count() == 1,
            "one-line reason: {r:?}"
        );
    }
    // None of that touched a's registration.
    let r = request(
        s.addr,
        "BRIDGE",
        &[("Client-Id", "a"), ("Client-Token", &a)],
    );
    assert_eq!(r.status, 200);
}

#[test]
fn malformed_and_oversized_input_is_refused_and_closed() {
    let s = Server::start(&[]);
    let huge_head = format!("PROBE / HTTP/1.1\r\nX-Pad: {}\r\n\r\n", "a".repeat(9000));
    let many_headers: String = (0..40).map(|i| format!("X-{i}: v\r\n")).collect();
    let many_headers = format!("PROBE / HTTP/1.1\r\n{many_headers}\r\n");
    let cases: Vec<(Vec<u8>, u16)> = vec![
        (
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http at all\r\n\r\n".to_vec(),
            400,
        ),
        (
            b"PROBE / HTTP/1.1\r\nContent-Length: 5000\r\n\r\n".to_vec(),
            413,
        ),
        (
            b"PROBE / HTTP/1.1\r\nContent-Length: nope\r\n\r\n".to_vec(),
            400,
        ),
        (
            b"PROBE / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
            501,
        ),
        (huge_head.into_bytes(), 431),
        (many_headers.into_bytes(), 431),
        (
            b"PROBE / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n".to_vec(),
            400,
        ),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(), 400),
    ];
    for (raw, status) in cases {
        // The request has no Connection: close, yet the server closes: the
        // stream cannot be trusted after a framing error.
        let out = exchange(s.addr, &raw);
        let r = Reply::parse(&out);
        assert_eq!(
            r.status,
            status,
            "{:?} -> {out:?}",
            String::from_utf8_lossy(&raw[..raw.len().min(60)])
        );
        assert_eq!(r.header("Connection"), Some("close"));
    }
    // A head that never ends is cut off at the limit, not buffered forever.
    let mut c = connect(s.addr);
    let chunk = vec![b'a'; 1024];
    c.write_all(b"PROBE / HTTP/1.1\r\nX: ").unwrap();
    let mut refused = false;
    for _ in 0..64 {
        if c.write_all(&chunk).is_err() {
            refused = true;
            break;
        }
    }
    let out = read_to_close(&mut c);
    assert!(refused || out.starts_with("HTTP/1.1 431"), "{out:?}");
    assert_alive(s.addr);
}

#[test]
fn random_garbage_never_hurts_the_server() {
    let s = Server::start(&["--transport", "both"]);
    // A fixed-seed generator: the same bytes every run.
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let udp = udp_socket();
    for round in 0..200 {
        let len = (next() % 600) as usize;
        let mut raw: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if round % 3 == 0 {
            // Mostly-valid shapes reach deeper into the parser.
            raw = format!("REGISTER / HTTP/1.1\r\nClient-Id: {}\r\n", round).into_bytes();
            raw.extend((0..len % 50).map(|_| next() as u8));
            raw.extend_from_slice(b"\r\n\r\n");
        }
        let mut c = connect(s.addr);
        let _ = c.write_all(&raw);
        let _ = c.shutdown(std::net::Shutdown::Write);
        let _ = read_to_close(&mut c);
        let _ = udp.send_to(&raw, s.addr);
    }
    assert_alive(s.addr);
    let r = udp_exchange(
        &udp,
        s.addr,
        b"PROBE / HTTP/1.1\r\nHost: t\r\nRequest-Id: final\r\n\r\n",
        WAIT,
    );
    // Earlier garbage may have earned replies still queued; find ours.
    let mut got = r.unwrap_or_default();
    let deadline = Instant::now() + WAIT;
    while !got.contains("Request-Id: final") && Instant::now() < deadline {
        let mut buf = [0u8; 65536];
        if let Ok((n, _)) = udp.recv_from(&mut buf) {
            got = String::from_utf8_lossy(&buf[..n]).into_owned();
        }
    }
    assert!(got.starts_with("HTTP/1.1 200 PROBEACK"), "{got:?}");
}

#[test]
fn keep_alive_serves_many_requests_and_pipelines() {
    let s = Server::start(&[]);
    let mut c = connect(s.addr);
    for _ in 0..3 {
        c.write_all(build("PROBE", &[], false).as_bytes()).unwrap();
        let r = read_reply(&mut c);
        assert_eq!(r.status, 200);
        assert_eq!(r.header("Connection"), None);
    }
    // Two requests in one write, answered in order on the same connection.
    let two = format!(
        "{}{}",
        build(
            "REGISTER",
            &[("Client-Id", "k"), ("Client-Port", "7")],
            false
        ),
        build("PROBE", &[], false)
    );
    c.write_all(two.as_bytes()).unwrap();
    assert_eq!(read_reply(&mut c).phrase, "REGACK");
    assert_eq!(read_reply(&mut c).phrase, "PROBEACK");
    // A request body within the limit is skipped, not taken as a request.
    c.write_all(b"PROBE / HTTP/1.1\r\nContent-Length: 11\r\n\r\nPROBE / x\r\n")
        .unwrap();
    assert_eq!(read_reply(&mut c).phrase, "PROBEACK");
    c.write_all(build("PROBE", &[], true).as_bytes()).unwrap();
    let r = read_reply(&mut c);
    assert_eq!(r.header("Connection"), Some("close"));
    assert_eq!(
        read_to_close(&mut c),
        "",
        "server closes after Connection: close"
    );
}

#[test]
fn http10_clients_are_closed_unless_they_ask_to_keep_alive() {
    let s = Server::start(&[]);
    let out = exchange(s.addr, b"PROBE / HTTP/1.0\r\n\r\n");
    assert!(out.starts_with("HTTP/1.1 200 PROBEACK"), "{out:?}");
    assert!(out.contains("Connection: close"));
    // Asking for both, it is closed: close wins.
    let out = exchange(
        s.addr,
        b"PROBE / HTTP/1.0\r\nConnection: close, keep-alive\r\n\r\n",
    );
    assert!(out.contains("Connection: close"), "{out:?}");
    // Kept open when asked, and told so: an HTTP/1.0 client that is not
    // told takes the connection as closing.
    let mut c = connect(s.addr);
    for _ in 0..2 {
        c.write_all(b"PROBE / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .unwrap();
        let r = read_reply(&mut c);
        assert_eq!(r.phrase, "PROBEACK");
        assert_eq!(r.header("Connection"), Some("keep-alive"));
    }
}

#[test]
fn slow_loris_gets_408_and_idle_connections_close() {
    let s = Server::start(&["--header-timeout", "1", "--idle-timeout", "1"]);
    let mut c = connect(s.addr);
    c.write_all(b"PROBE / HTTP/1.1\r\nHost:").unwrap();
    let started = Instant::now();
    let out = read_to_close(&mut c);
    assert!(out.starts_with("HTTP/1.1 408 Request Timeout"), "{out:?}");
    // The 1 s given, not the default 10 s: on time, even on a loaded
    // machine, and not before the head could have come.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(10),
        "{took:?}"
    );

    // An idle keep-alive connection is closed quietly.
    let mut c = connect(s.addr);
    c.write_all(build("PROBE", &[], false).as_bytes()).unwrap();
    assert_eq!(read_reply(&mut c).status, 200);
    assert_eq!(read_to_close(&mut c), "");
    assert_alive(s.addr);
}

/// A client that sends and never reads fills our send buffer; neither the
/// header nor the idle timeout runs while we write, so the write itself is
/// bounded.
#[cfg(target_os = "linux")]
#[test]
fn a_client_that_never_reads_its_answers_is_cut_off() {
    use std::os::fd::AsRawFd;
    let s = Server::start(&["--header-timeout", "1", "--per-ip-rate", "0"]);
    let c = connect(s.addr);
    // A small receive buffer, so our side fills fast.
    socket2::SockRef::from(&c)
        .set_recv_buffer_size(4096)
        .unwrap();
    let mut w = c.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let batch = build("PROBE", &[], false).repeat(1000);
        // Until the server cuts us off (or 20 MB, far past every buffer).
        for _ in 0..1000 {
            if w.write_all(batch.as_bytes()).is_err() {
                return;
            }
        }
    });
    let started = Instant::now();
    let mut hung_up = false;
    while !hung_up && started.elapsed() < WAIT {
        let mut p = libc::pollfd {
            fd: c.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd, and the count says one.
        let n = unsafe { libc::poll(&mut p, 1, 200) };
        hung_up = n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0;
    }
    // Unblocks the writer whatever happened.
    let _ = c.shutdown(std::net::Shutdown::Both);
    writer.join().unwrap();
    assert!(hung_up, "the server kept a connection that never reads");
    assert_alive(s.addr);
}

#[test]
fn rate_limit_answers_429_with_retry_after() {
    let s = Server::start(&["--per-ip-rate", "1", "--per-ip-burst", "2"]);
    let mut c = connect(s.addr);
    // Twenty pipelined requests arrive together: far past a burst of 2.
    let all: String = (0..20).map(|_| build("PROBE", &[], false)).collect();
    c.write_all(all.as_bytes()).unwrap();
    let replies: Vec<Reply> = (0..20).map(|_| read_reply(&mut c)).collect();
    let limited: Vec<&Reply> = replies.iter().filter(|r| r.status == 429).collect();
    assert!(limited.len() >= 10, "{replies:?}");
    let r = limited[0];
    assert_eq!(r.phrase, "Too Many Requests");
    assert!(
        r.header("Retry-After")
            .and_then(|v| v.parse::<u32>().ok())
            .is_some_and(|v| v >= 1)
    );
    assert!(r.body.contains("rate limited"));
}

#[test]
fn connection_caps_answer_503_and_429() {
    let s = Server::start(&["--max-conns", "2"]);
    // Two keep-alive connections hold both slots; each has had an answer,
    // so both are surely accepted and counted before the third comes.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = connect(s.addr);
        c.write_all(build("PROBE", &[], false).as_bytes()).unwrap();
        assert_eq!(read_reply(&mut c).status, 200);
        held.push(c);
    }
    let mut c = connect(s.addr);
    c.write_all(build("PROBE", &[], true).as_bytes()).ok();
    let out = read_to_close(&mut c);
    assert!(
        out.starts_with("HTTP/1.1 503") && out.contains("Retry-After:"),
        "{out:?}"
    );
    drop(held);
    eventually("a free slot after the others closed", || {
        let mut c = connect(s.addr);
        c.write_all(build("PROBE", &[], true).as_bytes()).ok();
        read_to_close(&mut c).starts_with("HTTP/1.1 200")
    });

    let p = Server::start(&["--per-ip-conns", "1"]);
    let mut first = connect(p.addr);
    first
        .write_all(build("PROBE", &[], false).as_bytes())
        .unwrap();
    assert_eq!(read_reply(&mut first).status, 200);
    // It sends a request, or, had the worker been busy enough to defer
    // accepts, the kernel would hold it back for the 5 s of
    // TCP_DEFER_ACCEPT.
    let mut second = connect(p.addr);
    second
        .write_all(build("PROBE", &[], true).as_bytes())
        .unwrap();
    let out = read_to_close(&mut second);
    assert!(out.starts_with("HTTP/1.1 429"), "{out:?}");
    assert!(out.contains("Retry-After:"));
}

#[test]
fn max_registrations_answers_503() {
    let s = Server::start(&["--max-registrations", "2"]);
    register(s.addr, "a", 1);
    register(s.addr, "b", 2);
    let r = request(
        s.addr,
        "REGISTER",
        &[("Client-Id", "c"), ("Client-Port", "3")],
    );
    assert_eq!(r.status, 503);
    assert!(r.body.contains("full"), "{r:?}");
}

#[test]
fn registrations_expire() {
    let s = Server::start(&["--expires", "1"]);
    let t = register(s.addr, "short", 1);
    // BRIDGE does not refresh a registration, so asking again and again
    // watches it lapse (after at most 2 s: whole seconds, rounded up).
    let bridge = || {
        request(
            s.addr,
            "BRIDGE",
            &[("Client-Id", "short"), ("Client-Token", &t)],
        )
    };
    assert_eq!(bridge().header("Expires"), None);
    eventually("the registration to lapse", || bridge().status == 404);
    assert_eq!(bridge().status, 404);
    // And a lapsed waiting client is never handed out.
    let u = register(s.addr, "u", 2);
    let r = request(
        s.addr,
        "BRIDGE",
        &[("Client-Id", "u"), ("Client-Token", &u)],
    );
    assert_eq!(r.header("Peer-Id"), None);
}

#[test]
fn udp_serves_every_request_with_request_ids() {
    let s = Server::start(&["-u"]);
    let sock = udp_socket();
    let probe = udp_exchange(
        &sock,
        s.addr,
        b"PROBE / HTTP/1.1\r\nHost: t\r\nRequest-Id: p1\r\n\r\n",
        WAIT,
    )
    .unwrap();
    let r = Reply::parse(&probe);
    assert_eq!(
        (r.status, r.header("Transport"), r.header("Request-Id")),
        (200, Some("udp"), Some("p1"))
    );

    let reg = b"REGISTER / HTTP/1.1\r\nHost: t\r\nClient-Id: dgram\r\nClient-Port: 4444\r\nRequest-Id: r1\r\n\r\n";
    let first = udp_exchange(&sock, s.addr, reg, WAIT).unwrap();
    // A retransmission gets the very same response, not a REGNACK.
    let again = udp_exchange(&sock, s.addr, reg, WAIT).unwrap();
    assert_eq!(first, again);
    let r = Reply::parse(&first);
    assert_eq!(r.phrase, "REGACK");
    let token = r.header("Client-Token").unwrap().to_owned();
    // A new Request-Id is a new request, executed: the id is taken now.
    let other = b"REGISTER / HTTP/1.1\r\nHost: t\r\nClient-Id: dgram\r\nClient-Port: 4444\r\nRequest-Id: r2\r\n\r\n";
    assert_eq!(
        Reply::parse(&udp_exchange(&sock, s.addr, other, WAIT).unwrap()).status,
        409
    );

    // dgram2 waits for a peer, so dgram's BRIDGE is handed it and its CHAT
    // with it is accepted.
    let reg2 = b"REGISTER / HTTP/1.1\r\nHost: t\r\nClient-Id: dgram2\r\nClient-Port: 4445\r\nRequest-Id: r3\r\n\r\n";
    let r2 = Reply::parse(&udp_exchange(&sock, s.addr, reg2, WAIT).unwrap());
    let token2 = r2.header("Client-Token").unwrap().to_owned();
    let wait2 = format!(
        "BRIDGE / HTTP/1.1\r\nHost: t\r\nClient-Id: dgram2\r\nClient-Token: {token2}\r\nRequest-Id: w2\r\n\r\n"
    );
    udp_exchange(&sock, s.addr, wait2.as_bytes(), WAIT).unwrap();
    for (method, extra, phrase) in [
        ("BRIDGE", String::new(), "BRIDGEACK"),
        ("CHAT", "Peer-Id: dgram2\r\n".to_owned(), "CHATACK"),
        ("QUIT", String::new(), "QUITACK"),
    ] {
        let raw = format!(
            "{method} / HTTP/1.1\r\nHost: t\r\nClient-Id: dgram\r\nClient-Token: {token}\r\n{extra}Request-Id: {method}\r\n\r\n"
        );
        let r = Reply::parse(&udp_exchange(&sock, s.addr, raw.as_bytes(), WAIT).unwrap());
        assert_eq!(r.phrase, phrase);
        assert_eq!(r.header("Request-Id"), Some(method));
    }
}

#[test]
fn udp_retransmitted_quit_is_executed_once() {
    let s = Server::start(&["--transport", "both"]);
    let token = register(s.addr, "once", 1);
    let sock = udp_socket();
    let quit = format!(
        "QUIT / HTTP/1.1\r\nHost: t\r\nClient-Id: once\r\nClient-Token: {token}\r\nRequest-Id: q\r\n\r\n"
    );
    let first = udp_exchange(&sock, s.addr, quit.as_bytes(), WAIT).unwrap();
    // Re-register in between: executing the QUIT again would remove this.
    let token2 = register(s.addr, "once", 2);
    let second = udp_exchange(&sock, s.addr, quit.as_bytes(), WAIT).unwrap();
    assert_eq!(first, second);
    assert!(first.starts_with("HTTP/1.1 200 QUITACK"));
    let r = request(
        s.addr,
        "BRIDGE",
        &[("Client-Id", "once"), ("Client-Token", &token2)],
    );
    assert_eq!(r.status, 200, "the second registration survived: {r:?}");
}

#[test]
fn udp_never_amplifies_and_drops_when_rate_limited() {
    let s = Server::start(&["-u"]);
    let sock = udp_socket();
    // These fit an answer within three times their size, so get one.
    for raw in [
        &b"PROBE / HTTP/1.1\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\n\r\n",
        b"BRIDGE / HTTP/1.1\r\nClient-Id: a\r\n\r\n",
    ] {
        let resp = udp_exchange(&sock, s.addr, raw, WAIT);
        let resp = resp.unwrap_or_else(|| panic!("no answer to {raw:?}"));
        assert!(resp.len() <= 3 * raw.len(), "{raw:?} -> {resp:?}");
    }
    // These do not: silence, or at most an answer within the bound.
    for raw in [&b"x\r\n\r\n"[..], b"\r\n"] {
        if let Some(resp) = udp_exchange(&sock, s.addr, raw, Duration::from_millis(500)) {
            assert!(resp.len() <= 3 * raw.len(), "{raw:?} -> {resp:?}");
        }
    }
    // Over the limit, datagrams go unanswered; the limit is per source.
    let limited = Server::start(&["-u", "--per-ip-rate", "1", "--per-ip-burst", "1"]);
    let probe = b"PROBE / HTTP/1.1\r\nHost: t\r\nRequest-Id: 1\r\n\r\n";
    assert!(udp_exchange(&sock, limited.addr, probe, WAIT).is_some());
    let mut answered = 0;
    let started = Instant::now();
    for i in 0..20 {
        let raw = format!("PROBE / HTTP/1.1\r\nHost: t\r\nRequest-Id: x{i}\r\n\r\n");
        sock.send_to(raw.as_bytes(), limited.addr).unwrap();
    }
    sock.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let mut buf = [0u8; 4096];
    let mut last = started;
    while sock.recv_from(&mut buf).is_ok() {
        answered += 1;
        last = Instant::now();
    }
    // The bucket holds one token and gains one a second: however slowly a
    // loaded machine got through the 20, no more can have been answered.
    let most = 1 + last.duration_since(started).as_secs_f64().ceil() as usize;
    assert!(
        answered <= most,
        "{answered} of 20 answered within {:?}; a burst of 1 at 1/s allows {most}",
        last.duration_since(started)
    );
}

#[test]
fn sigterm_stops_cleanly() {
    let mut s = Server::start(&["--transport", "both"]);
    assert_alive(s.addr);
    let mut idle = connect(s.addr);
    idle.write_all(build("PROBE", &[], false).as_bytes())
        .unwrap();
    assert_eq!(read_reply(&mut idle).status, 200);
    let started = Instant::now();
    let status = s.stop();
    assert!(status.success(), "{status:?}");
    // It closed the idle connection at once rather than giving it the
    // 5 s a busy one gets to finish.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // The idle keep-alive connection was closed, not left hanging.
    assert_eq!(read_to_close(&mut idle), "");
}

#[test]
fn a_request_in_progress_at_sigterm_is_answered() {
    let mut s = Server::start(&[]);
    let mut busy = connect(s.addr);
    // Half a request: the connection has been read and has waited since.
    busy.write_all(b"PROBE / HTTP/1.1\r\nHost: x\r\n").unwrap();
    assert_alive(s.addr);
    let pid = s.pid().to_string();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(kill.success());
    // Shutdown has begun once the listeners are closed.
    chat_testkit::eventually("the listeners to close", || {
        std::net::TcpStream::connect(s.addr).is_err()
    });
    busy.write_all(b"\r\n").unwrap();
    let r = read_reply(&mut busy);
    assert_eq!((r.status, r.phrase.as_str()), (200, "PROBEACK"));
    // Then the server closes it and exits.
    assert_eq!(read_to_close(&mut busy), "");
    let status = s.stop();
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_bad_configuration_file_is_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.toml");
    std::fs::write(&file, "port = \"five\"\n").unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_chat-server"));
    cmd.args(["--bind", "127.0.0.1", "--config", file.to_str().unwrap()]);
    let out = chat_testkit::run_bounded(cmd, None);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("config.toml"), "{err}");
}

#[test]
fn port_in_use_is_a_clear_error() {
    let s = Server::start(&[]);
    let mut again = std::process::Command::new(env!("CARGO_BIN_EXE_chat-server"));
    again.args(["--bind", "127.0.0.1", "--port", &s.addr.port().to_string()]);
    let out = chat_testkit::run_bounded(again, None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot listen on TCP 127.0.0.1:"), "{err}");
    assert!(err.contains("choose another --port"), "{err}");
}

#[test]
fn a_body_arriving_in_pieces_is_waited_for_and_skipped() {
    let s = Server::start(&[]);
    let mut c = connect(s.addr);
    // A head, then a body of 4000 bytes in three writes with pauses: the
    // server must wait for all of it, then answer.
    let body = vec![b'x'; 4000];
    c.write_all(b"PROBE / HTTP/1.1\r\nContent-Length: 4000\r\n\r\n")
        .unwrap();
    for part in body.chunks(1500) {
        std::thread::sleep(Duration::from_millis(100));
        c.write_all(part).unwrap();
    }
    let r = read_reply(&mut c);
    assert_eq!((r.status, r.phrase.as_str()), (200, "PROBEACK"));
    // The connection goes on.
    c.write_all(build("PROBE", &[], false).as_bytes()).unwrap();
    assert_eq!(read_reply(&mut c).status, 200);
}

#[test]
fn a_duplicate_header_spoils_the_request_not_the_connection() {
    let s = Server::start(&[]);
    let mut c = connect(s.addr);
    c.write_all(b"BRIDGE / HTTP/1.1\r\nClient-Id: a\r\nClient-Id: b\r\n\r\n")
        .unwrap();
    let r = read_reply(&mut c);
    assert_eq!(r.status, 400);
    assert!(r.body.contains("duplicate"), "{r:?}");
    assert_eq!(r.header("Connection"), None);
    c.write_all(build("PROBE", &[], false).as_bytes()).unwrap();
    assert_eq!(read_reply(&mut c).status, 200);
}

/// Requests through a trusted proxy (`--trusted-proxy`), from other
/// loopback addresses: the proxy at 127.0.0.2 speaks for the clients its
/// X-Forwarded-For names; nobody else does.
#[cfg(target_os = "linux")]
#[test]
fn a_trusted_proxy_speaks_for_its_clients() {
    use std::net::IpAddr;
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let s = Server::start(&[
        "--trusted-proxy",
        "127.0.0.2",
        "--per-ip-conns",
        "1",
        "--per-ip-rate",
        "1",
        "--per-ip-burst",
        "2",
    ]);
    let via = |from: &str, client: &str, method: &str, headers: &[(&str, &str)]| {
        let mut h = headers.to_vec();
        h.push(("X-Forwarded-For", client));
        let mut c = connect_from(s.addr, ip(from));
        c.write_all(build(method, &h, true).as_bytes()).unwrap();
        Reply::parse(&read_to_close(&mut c))
    };
    let alice = [("Client-Id", "alice"), ("Client-Port", "4000")];
    let r = via("127.0.0.2", "127.0.0.66, 127.0.0.77", "REGISTER", &alice);
    assert_eq!(r.header("Client-Addr"), Some("127.0.0.77:4000"), "{r:?}");
    // From an address not trusted, the header is the client's own claim.
    let bob = [("Client-Id", "bob"), ("Client-Port", "4001")];
    let r = via("127.0.0.1", "127.0.0.77", "REGISTER", &bob);
    assert_eq!(r.header("Client-Addr"), Some("127.0.0.1:4001"), "{r:?}");
    // A proxy that writes something else gets a 400 saying so, and its
    // connection goes on.
    let mut c = connect_from(s.addr, ip("127.0.0.2"));
    let bad = build("PROBE", &[("X-Forwarded-For", "unknown")], false);
    c.write_all(bad.as_bytes()).unwrap();
    let r = read_reply(&mut c);
    assert_eq!(r.status, 400);
    assert!(r.body.contains("X-Forwarded-For"), "{r:?}");
    let fine = build("PROBE", &[("X-Forwarded-For", "127.0.0.78")], false);
    c.write_all(fine.as_bytes()).unwrap();
    assert_eq!(read_reply(&mut c).status, 200);

    // The proxy is held to --max-conns, not --per-ip-conns: three
    // connections at once, each answered, while a plain client's second
    // connection is refused.
    let mut held = vec![c];
    for n in 0..2 {
        let mut c = connect_from(s.addr, ip("127.0.0.2"));
        let client = format!("127.0.0.{}", 80 + n);
        c.write_all(build("PROBE", &[("X-Forwarded-For", &client)], false).as_bytes())
            .unwrap();
        assert_eq!(read_reply(&mut c).status, 200);
        held.push(c);
    }
    let mut first = connect_from(s.addr, ip("127.0.0.3"));
    first
        .write_all(build("PROBE", &[], false).as_bytes())
        .unwrap();
    assert_eq!(read_reply(&mut first).status, 200);
    let mut second = connect_from(s.addr, ip("127.0.0.3"));
    second
        .write_all(build("PROBE", &[], true).as_bytes())
        .unwrap();
    assert!(read_to_close(&mut second).starts_with("HTTP/1.1 429"));

    // Each client behind the proxy has its own request rate.
    let c = &mut held[0];
    let burst: String = (0..20)
        .map(|_| build("PROBE", &[("X-Forwarded-For", "127.0.0.90")], false))
        .collect();
    c.write_all(burst.as_bytes()).unwrap();
    let limited = (0..20).filter(|_| read_reply(c).status == 429).count();
    assert!(limited >= 10, "{limited} of 20 limited");
    let other = build("PROBE", &[("X-Forwarded-For", "127.0.0.91")], false);
    c.write_all(other.as_bytes()).unwrap();
    assert_eq!(read_reply(c).status, 200, "another client's allowance");
}

/// The server's CPU time so far, in the kernel's clock ticks (100 a
/// second: Linux's `USER_HZ`, fixed in its ABI).
#[cfg(target_os = "linux")]
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command, which is in parentheses and may hold
    // spaces: state, ppid, ... utime is the 12th of them, stime the 13th.
    let after = &stat[stat.rfind(')').unwrap() + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[cfg(target_os = "linux")]
#[test]
fn a_server_whose_requests_stop_stops_polling() {
    // Requests one at a time, as close together as this machine sends
    // them: what busy polling is for (on an idle machine the workers
    // poll; on a busy one they must not, and that is fine here too).
    let s = Server::start(&[]);
    let mut c = connect(s.addr);
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until {
        c.write_all(build("PROBE", &[], false).as_bytes()).unwrap();
        assert_eq!(read_reply(&mut c).status, 200);
    }
    drop(c);
    // A poller stops within its window (0.2 ms) of the last request, and
    // the watcher of the machine within a second of it.
    std::thread::sleep(Duration::from_millis(1500));
    let before = cpu_ticks(s.pid());
    std::thread::sleep(Duration::from_secs(2));
    let spent = cpu_ticks(s.pid()) - before;
    // A worker polling on would spend nearly all of the 200 ticks.
    assert!(spent <= 20, "an idle server spent {spent} ticks in 2 s");
    assert_alive(s.addr);
}
