//! The whole chat, end to end: chat-server, two chatd and chatctl, the
//! real binaries over real sockets on 127.0.0.1.

mod common;

#[cfg(unix)]
use chat_proto::ipc::Hello;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::Instant;

use common::*;

/// JSON lines read from `out` on a thread of their own, so the test can
/// wait for them with a deadline.
fn json_lines(out: impl Read + Send + 'static) -> std::sync::mpsc::Receiver<serde_json::Value> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&line)
                && tx.send(v).is_err()
            {
                return;
            }
        }
    });
    rx
}

/// `chatctl --json tail -n N -f` on `d`: the follower, and its records as
/// they come.
fn follow(d: &Daemon, n: &str) -> (Guard, std::sync::mpsc::Receiver<serde_json::Value>) {
    let mut cmd = d.ctl_cmd(&["--json", "tail", "-n", n, "-f"]);
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::null())
        .stdin(Stdio::null());
    let mut child = Guard::new(cmd.spawn().expect("tail -f"));
    let records = json_lines(child.stdout.take().expect("stdout"));
    (child, records)
}

/// The records `records` brings, until `enough` says so or `WAIT` runs
/// out (the caller's assertions then say what was missing).
fn records_until(
    records: &std::sync::mpsc::Receiver<serde_json::Value>,
    mut enough: impl FnMut(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let mut got = Vec::new();
    let deadline = Instant::now() + WAIT;
    while !enough(&got) {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(v) = records.recv_timeout(left) else {
            break;
        };
        got.push(v);
    }
    got
}

/// The message records `records` brings, until `enough` says so or `WAIT`
/// runs out.
fn messages_until(
    records: &std::sync::mpsc::Receiver<serde_json::Value>,
    mut enough: impl FnMut(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let mut messages = Vec::new();
    records_until(records, |got| {
        if let Some(v) = got.last().filter(|v| v["type"] == "message") {
            messages.push(v.clone());
        }
        enough(&messages)
    });
    messages
}

fn texts(d: &Daemon) -> Vec<String> {
    d.messages().into_iter().map(|(_, _, t)| t).collect()
}

#[test]
fn seed_flow_with_the_first_daemon_waiting() {
    let server = Server::start(&[]);
    let alice = Daemon::start("alice", server.addr, &[]);
    let bob = Daemon::start("bob", server.addr, &[]);
    assert_eq!(alice.ok(&["id"]).trim(), "alice");
    assert_eq!(alice.state(), "idle");
    connect_pair(&alice, &bob);
    assert_eq!(alice.status()["peer"], "bob");
    assert_eq!(bob.status()["peer"], "alice");

    assert!(bob.ok(&["send", "hello", "alice"]).contains("delivered"));
    let sent = bob.ok(&["--json", "history"]);
    let v: serde_json::Value = serde_json::from_str(sent.lines().next().unwrap()).unwrap();
    assert_eq!(
        v["delivered"], true,
        "the sender's history notes the acknowledgement"
    );
    assert!(alice.ok(&["send", "hi bob"]).contains("delivered"));
    assert!(bob.ok(&["send", "how are you?"]).contains("delivered"));
    let expected = vec![
        (
            "bob".to_owned(),
            "alice".to_owned(),
            "hello alice".to_owned(),
        ),
        ("alice".to_owned(), "bob".to_owned(), "hi bob".to_owned()),
        (
            "bob".to_owned(),
            "alice".to_owned(),
            "how are you?".to_owned(),
        ),
    ];
    assert_eq!(alice.messages(), expected);
    assert_eq!(bob.messages(), expected);

    // QUIT: bob leaves the chat and the server; alice is told and can
    // bridge again.
    assert!(
        bob.ok(&["quit"])
            .contains("left the chat with alice and the server")
    );
    assert_eq!(bob.state(), "idle");
    assert!(bob.ok(&["quit"]).contains("nothing to quit"));
    let v: serde_json::Value = serde_json::from_str(&bob.ok(&["--json", "quit"])).unwrap();
    assert_eq!((&v["quit"], &v["was"]), (&true.into(), &"idle".into()));
    alice.wait_for("registered");
    let tail = alice.ok(&["tail", "-n", "5"]);
    assert!(tail.contains("bob left the chat"), "{tail}");
    assert!(alice.ok(&["bridge"]).contains("waiting"));
}

#[test]
fn seed_flow_with_the_second_daemon_waiting() {
    let server = Server::start(&["--transport", "both"]);
    let alice = Daemon::start("alice", server.addr, &[]);
    let bob = Daemon::start("bob", server.addr, &[]);
    connect_pair(&bob, &alice);
    alice.ok(&["send", "first"]);
    bob.ok(&["send", "second"]);
    assert_eq!(texts(&alice), ["first", "second"]);
    assert_eq!(texts(&bob), ["first", "second"]);
    alice.ok(&["quit"]);
    bob.wait_for("registered");
}

#[test]
fn the_rendezvous_works_over_udp() {
    let server = Server::start(&["-u"]);
    let alice = Daemon::start("alice", server.addr, &[]);
    let bob = Daemon::start("bob", server.addr, &[]);
    connect_pair(&alice, &bob);
    bob.ok(&["send", "over udp rendezvous"]);
    assert_eq!(texts(&alice), ["over udp rendezvous"]);
}

/// A server and alice, bob and carol, registered.
fn three_registered() -> (Server, Daemon, Daemon, Daemon) {
    let server = Server::start(&[]);
    let alice = Daemon::start("alice", server.addr, &[]);
    let bob = Daemon::start("bob", server.addr, &[]);
    let carol = Daemon::start("carol", server.addr, &[]);
    for d in [&alice, &bob, &carol] {
        d.ok(&["register"]);
    }
    (server, alice, bob, carol)
}

#[test]
fn bridge_to_a_named_peer() {
    let (_server, alice, bob, carol) = three_registered();
    // carol is registered but not waiting: refused with the reason, in
    // chatctl's words.
    let out = bob.ctl(&["bridge", "carol"]);
    fails_with(
        &out,
        1,
        "carol is not waiting for a peer: ask carol to run `chatctl bridge`",
    );
    let out = bob.ctl(&["bridge", "nobody"]);
    fails_with(&out, 1, "nobody");
    assert!(alice.ok(&["bridge"]).contains("waiting"));
    let out = bob.ok(&["--json", "bridge", "alice"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["peer"], "alice");
    bob.ok(&["chat"]);
    alice.wait_for("chatting");
    // Chatting takes alice out of the pool: carol cannot be handed her,
    // and is told why.
    let out = carol.ctl(&["bridge", "alice"]);
    fails_with(
        &out,
        1,
        "alice is in a chat with someone else: ask alice to run `chatctl bridge`",
    );
}

#[test]
fn a_call_to_a_busy_peer_is_refused_at_once() {
    let (_server, alice, bob, carol) = three_registered();
    assert!(alice.ok(&["bridge"]).contains("waiting"));
    // Both are handed alice; bob calls first.
    for d in [&carol, &bob] {
        assert!(d.ok(&["bridge", "alice"]).contains("alice"));
    }
    bob.ok(&["chat"]);
    alice.wait_for("chatting");
    // alice's id is the lower, so a 409 from her could be her calling
    // carol at the same time; she says busy with a 503 instead, and
    // carol does not wait for a call that will not come.
    let out = carol.ctl(&["chat"]);
    fails_with(&out, 1, "alice is busy in another chat");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("no call from alice"), "{err}");
    assert_eq!(alice.state(), "chatting");
}

#[test]
fn turn_mode_refuses_out_of_turn_sends() {
    let server = Server::start(&[]);
    let alice = Daemon::start("alice", server.addr, &["--turns"]);
    let bob = Daemon::start("bob", server.addr, &["--turns"]);
    connect_pair(&alice, &bob);
    // alice waited, so bob (the initiator) writes first.
    let out = alice.ctl(&["send", "me first?"]);
    fails_with(&out, 1, "not your turn");
    assert_eq!(bob.status()["turn"], "mine");
    bob.ok(&["send", "one"]);
    let out = bob.ctl(&["send", "two"]);
    fails_with(&out, 1, "not your turn");
    alice.ok(&["send", "reply"]);
    bob.ok(&["send", "three"]);
    assert_eq!(texts(&alice), ["one", "reply", "three"]);
}

#[test]
fn two_followers_see_every_message_in_order_and_a_late_tail_sees_history() {
    let (_server, alice, bob) = chatting_pair();
    // Followers print the history first (`-n 1000` covers all of it), then
    // live records: whenever they attached, each message shows up once.
    let followers = vec![follow(&alice, "1000"), follow(&alice, "1000")];
    let count = 50;
    let lines: String = (0..count).map(|i| format!("message {i}\n")).collect();
    let out = bob.ctl_stdin(&["send", "-"], &lines);
    assert!(out.status.success(), "{}", stderr(&out));
    let expected: Vec<String> = (0..count).map(|i| format!("message {i}")).collect();
    for (child, lines) in followers {
        let messages = messages_until(&lines, |got| got.len() >= count);
        let mut got = Vec::new();
        for v in messages {
            assert_eq!(v["from"], "bob");
            assert_eq!(v["to"], "alice");
            assert!(v["time"].as_str().is_some_and(|t| t.ends_with('Z')));
            got.push(v["text"].as_str().unwrap_or_default().to_owned());
        }
        assert_eq!(
            got, expected,
            "each follower sees every message once, in order"
        );
        drop(child);
    }
    // A late `tail -n` sees the earlier messages.
    let late = alice.ok(&["tail", "-n", "3"]);
    let shown: Vec<&str> = late.lines().collect();
    assert_eq!(shown.len(), 3);
    assert!(shown[2].ends_with("bob → alice: message 49"), "{late}");
    assert!(shown[0].ends_with("bob → alice: message 47"), "{late}");
}

#[test]
fn history_survives_a_daemon_restart_and_grep_finds_it() {
    let (_server, mut alice, bob) = chatting_pair();
    bob.ok(&["send", "remember this"]);
    alice.ok(&["send", "and this, 100%"]);
    let status = alice.stop().expect("alice exited");
    assert!(status.success(), "{status:?}");
    assert!(!alice.socket.exists(), "a clean stop removes the socket");
    bob.wait_for("registered");
    alice.spawn();
    assert_eq!(texts(&alice), ["remember this", "and this, 100%"]);
    let out = alice.ok(&["history", "--grep", "100%"]);
    assert_eq!(out.lines().count(), 1, "{out}");
    let out = alice.ok(&["history", "--peer", "bob", "--limit", "1"]);
    assert!(out.contains("and this"), "{out}");
    // Its token was kept: registering again reclaims the id at once,
    // although the old registration has not expired.
    alice.ok(&["register"]);
}

#[test]
fn a_daemon_restarted_after_a_crash_reclaims_its_id() {
    let server = Server::start(&[]);
    let mut alice = Daemon::start("alice", server.addr, &[]);
    alice.ok(&["register"]);
    alice.kill9();
    alice.spawn();
    // The history says the daemon started again, not that it is still
    // registered.
    let tail = alice.ok(&["tail", "-n", "1"]);
    assert!(tail.trim_end().ends_with("[idle]"), "{tail}");
    // The server still holds the registration; the saved token proves
    // it is ours.
    alice.ok(&["register"]);
    // Another daemon with the same id (no token) is refused.
    let impostor = Daemon::start("alice", server.addr, &[]);
    let out = impostor.ctl(&["register"]);
    fails_with(&out, 1, "another client holds this id");
}

#[test]
fn a_killed_peer_is_noticed() {
    let (_server, alice, mut bob) = chatting_pair();
    bob.kill9();
    // The kernel resets bob's connection at once; without that, the
    // heartbeat would end the chat within 10 s.
    alice.wait_for("registered");
    let tail = alice.ok(&["tail", "-n", "3"]);
    assert!(tail.contains("lost bob"), "{tail}");
    let out = alice.ctl(&["send", "anyone?"]);
    fails_with(&out, 1, "not chatting");
}

#[test]
fn a_restarted_server_gets_the_daemons_back() {
    let mut server = Server::start(&["--expires", "2"]);
    let port = server.addr.port();
    let alice = Daemon::start("alice", server.addr, &["--register"]);
    let bob = Daemon::start("bob", server.addr, &[]);
    alice.wait_for("registered");
    bob.ok(&["register"]);
    server.stop();
    let _server = Server::start_on(port, &["--expires", "2"]);
    // The new server knows nobody; the daemons register again by
    // themselves (refreshing at half-life) or when a request meets a 404.
    assert!(alice.ok(&["bridge"]).contains("waiting"));
    let out = bob.ok(&["bridge"]);
    assert!(out.contains("peer alice"), "{out}");
    bob.ok(&["chat"]);
    alice.wait_for("chatting");
}

#[test]
fn a_daemon_waiting_across_a_server_restart_calls_the_peer_it_is_handed() {
    // A lifetime of 20 s: alice's refresh, 10 s on, comes long after bob
    // has bridged at the restarted server, even on a slow machine.
    let mut server = Server::start(&["--expires", "20"]);
    let port = server.addr.port();
    let alice = waiting_alice(&server);
    let bob = Daemon::start("bob", server.addr, &[]);
    server.stop();
    let _server = Server::start_on(port, &["--expires", "20"]);
    // The new server has forgotten alice, so bob waits too.
    bob.ok(&["register"]);
    let out = bob.ok(&["bridge"]);
    assert!(out.contains("waiting"), "{out}");
    // At her refresh alice registers and rejoins, is handed bob, and
    // calls him: neither user runs `chatctl chat`.
    alice.wait_for("chatting");
    bob.wait_for("chatting");
    let tail = alice.ok(&["tail", "-n", "5"]);
    assert!(tail.contains("calling it"), "{tail}");
}

#[test]
fn a_stale_socket_is_replaced_and_a_live_one_is_not() {
    let server = Server::start(&[]);
    let mut alice = Daemon::start("alice", server.addr, &[]);
    // A second daemon on the same socket refuses to start.
    let out = alice.start_again_output();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("already running"), "{}", stderr(&out));
    assert!(
        alice.ok(&["id"]).contains("alice"),
        "the live daemon is untouched"
    );
    // SIGKILL leaves the socket file behind; a new daemon replaces it.
    alice.kill9();
    assert!(alice.socket.exists());
    alice.spawn();
    assert!(alice.ok(&["id"]).contains("alice"));
}

#[test]
#[cfg(unix)] // speaks to the control socket as a Unix socket
fn garbage_on_the_control_socket_ends_only_that_connection() {
    use std::os::unix::net::UnixStream;
    let (_server, alice, bob) = chatting_pair();
    let (follower, records) = follow(&alice, "1000");
    let cases: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        vec![0xff; 64],
        // A length prefix far past the limit.
        u32::MAX.to_le_bytes().to_vec(),
        // A valid hello, then a frame that does not decode.
        {
            let mut v = hello_frame(Hello::ours("chatctl"));
            v.extend_from_slice(&[3, 0, 0, 0, 0xff, 0xff, 0xff]);
            v
        },
        // A hello from a future version.
        hello_frame(Hello {
            protocol: 99,
            software: "chatctl 99".into(),
        }),
    ];
    for bytes in cases {
        let mut s = UnixStream::connect(&alice.socket).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let _ = s.write_all(&bytes);
        // The daemon closes this connection (after at most a short reply).
        let sink = read_to_close(&mut s);
        assert!(sink.len() < 1024);
    }
    // Half a frame, then silence, then close.
    {
        let mut s = UnixStream::connect(&alice.socket).unwrap();
        s.write_all(&[200, 0, 0, 0, 1, 2]).unwrap();
    }
    // The daemon, the chat and the other shell are fine.
    assert_eq!(alice.state(), "chatting");
    bob.ok(&["send", "still here"]);
    let got = messages_until(&records, |got| {
        got.last().is_some_and(|v| v["text"] == "still here")
    });
    let seen = got.last().is_some_and(|v| v["text"] == "still here");
    assert!(seen, "the other shell still follows");
    drop(follower);
}

/// The port `d` listens on for peers.
fn peer_port(d: &Daemon) -> u16 {
    d.status()["port"].as_u64().expect("a peer port") as u16
}

/// alice, registered with `server` and waiting for a peer.
fn waiting_alice(server: &Server) -> Daemon {
    let alice = Daemon::start("alice", server.addr, &[]);
    alice.ok(&["register"]);
    assert!(alice.ok(&["bridge"]).contains("waiting"));
    alice
}

/// A raw connection to the peer port `port` that has sent `bytes`.
fn dial(port: u16, bytes: &[u8]) -> std::net::TcpStream {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    // A daemon may close on a first bad byte, before the rest is written:
    // what it answered is read all the same.
    let _ = s.write_all(bytes);
    s
}

/// A peer's opening call, as `id`, with a key no server gave.
fn peer_hello(id: &str) -> Vec<u8> {
    let key = chat_proto::crypto::PeerKey::from_bytes([0x11; 16]);
    call_with(&key, id, "alice").1
}

/// A call to `callee` as `caller`, proving the introduction with `key`:
/// the caller's handshake and the opening request.
fn call_with(
    key: &chat_proto::crypto::PeerKey,
    caller: &str,
    callee: &str,
) -> (chat_proto::crypto::Calling, Vec<u8>) {
    let parties = chat_proto::crypto::Parties {
        caller: caller.parse().unwrap(),
        callee: callee.parse().unwrap(),
        turns: false,
    };
    let (calling, first) = chat_proto::crypto::Calling::start(key, &parties).unwrap();
    let mut v = Vec::new();
    chat_proto::peer::Hello {
        id: parties.caller,
        turns: false,
    }
    .encode("127.0.0.1", &first, &mut v);
    (calling, v)
}

/// `me` registers with the server at `server` and is handed `to` (which
/// must be waiting): the key the server gives for calling it.
fn introduction(server: std::net::SocketAddr, me: &str, to: &str) -> chat_proto::crypto::PeerKey {
    let r = request(
        server,
        "REGISTER",
        &[("Client-Id", me), ("Client-Port", "9")],
    );
    let token = r.header("Client-Token").expect("registered").to_owned();
    let r = request(
        server,
        "BRIDGE",
        &[("Client-Id", me), ("Client-Token", &token), ("Peer-Id", to)],
    );
    r.header("Peer-Key")
        .unwrap_or_else(|| panic!("{to} handed out with a key: {r:?}"))
        .parse()
        .unwrap()
}

/// A raw caller the server introduced: `me` is introduced to `to` and
/// completes the handshake at its peer port. The open connection and the
/// means to write records on it.
fn introduced_call(
    server: std::net::SocketAddr,
    me: &str,
    to: &Daemon,
) -> (std::net::TcpStream, chat_proto::crypto::Sealer) {
    use chat_proto::peer::{Answer, parse_answer};
    let callee = to.status()["id"].as_str().expect("an id").to_owned();
    let key = introduction(server, me, &callee);
    let (calling, hello) = call_with(&key, me, &callee);
    let mut s = dial(peer_port(to), &hello);
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    // Byte by byte, so that nothing after the head is read.
    let handshake = loop {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "closed: {buf:?}");
        buf.push(byte[0]);
        match parse_answer(&buf).unwrap() {
            Some((Answer::Accepted { handshake, .. }, _)) => break handshake,
            Some((other, _)) => panic!("{other:?}"),
            None => {}
        }
    };
    let (sealer, _) = calling.finish(&handshake).unwrap().split();
    (s, sealer)
}

#[test]
fn garbage_at_the_peer_port_ends_only_that_connection() {
    use std::net::TcpStream;
    // The peer port is the daemon's one face to the network: anyone can
    // connect to it, with anything.
    let (_server, alice, bob) = chatting_pair();
    let (follower, records) = follow(&alice, "1000");
    let port = peer_port(&alice);
    let mut oversized = b"CHAT / HTTP/1.1\r\nX: ".to_vec();
    oversized.extend(std::iter::repeat_n(b'a', 20_000));
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![0xff; 64], "400"),
        (b"GET / HTTP/1.1\r\n\r\n".to_vec(), "400"),
        (oversized, "431"),
        // A well-formed call, but with a key the server did not give: it
        // is refused before alice's state is even looked at.
        (peer_hello("mallory"), "401"),
        // A call in bob's name while bob holds the link: the same.
        (peer_hello("bob"), "401"),
    ];
    // Silence, held open while everything else goes on.
    let silent = TcpStream::connect(("127.0.0.1", port)).unwrap();
    for (bytes, status) in cases {
        let answer = read_to_close(&mut dial(port, &bytes));
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status} ")),
            "{:?} got {answer:?}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(40)])
        );
    }
    assert_eq!(alice.state(), "chatting");
    assert_eq!(alice.status()["peer"], "bob");
    bob.ok(&["send", "still here"]);
    let got = messages_until(&records, |got| {
        got.last().is_some_and(|v| v["text"] == "still here")
    });
    assert!(got.last().is_some_and(|v| v["text"] == "still here"));
    assert!(alice.ok(&["send", "and you?"]).contains("delivered"));
    drop((silent, follower));
}

#[test]
fn a_caller_that_speaks_garbage_after_the_handshake_is_dropped() {
    let server = Server::start(&[]);
    let alice = waiting_alice(&server);
    let bob = Daemon::start("bob", server.addr, &[]);
    // Introduced by the server, so the handshake passes; then a frame
    // whose length prefix is past the limit, sealed as it should be, and
    // a record that does not open.
    type Garbage = fn(&mut chat_proto::crypto::Sealer) -> Vec<u8>;
    let cases: [Garbage; 2] = [
        |sealer| {
            let mut out = Vec::new();
            sealer.seal(&u32::MAX.to_le_bytes(), &mut out).unwrap();
            out
        },
        |_| {
            let mut out = vec![0, 40];
            out.extend([0x5a; 40]);
            out
        },
    ];
    for (i, garbage) in cases.into_iter().enumerate() {
        let (mut s, mut sealer) = introduced_call(server.addr, &format!("mallory{i}"), &alice);
        s.write_all(&garbage(&mut sealer)).unwrap();
        // The daemon closes the link.
        read_to_close(&mut s);
    }
    // No chat began, so none is shown, and alice is still waiting.
    assert_eq!(alice.state(), "waiting");
    let records = alice.ok(&["--json", "tail", "-n", "100"]);
    assert!(!records.contains("mallory"), "{records}");
    // And a real caller gets through.
    bob.ok(&["register"]);
    assert!(bob.ok(&["bridge"]).contains("alice"));
    bob.ok(&["chat"]);
    assert!(bob.ok(&["send", "hi"]).contains("delivered"));
}

/// A handshake seen on the network and sent again passes the key check,
/// but only the real caller can follow it with a frame. To the daemon a
/// replay looks like this: a valid first message, then silence. The call
/// is dropped unseen, and alice goes on waiting.
#[test]
fn a_replayed_handshake_gets_no_chat() {
    let server = Server::start(&[]);
    let alice = waiting_alice(&server);
    let key = introduction(server.addr, "bob", "alice");
    let (_, hello) = call_with(&key, "bob", "alice");
    let mut s = dial(peer_port(&alice), &hello);
    // The replayer gets its 101, can open nothing, and says nothing; the
    // daemon gives up on it within its answer time (5 s).
    let answer = read_to_close(&mut s);
    assert!(answer.starts_with("HTTP/1.1 101 "), "{answer:?}");
    assert_eq!(alice.state(), "waiting");
    let records = alice.ok(&["--json", "tail", "-n", "100"]);
    assert!(!records.contains("bob"), "{records}");
}

/// A caller with the key the server gave someone else, or in another's
/// name, is refused and changes nothing: alice still waits, and the real
/// caller gets through.
#[test]
fn a_call_without_the_servers_introduction_is_refused() {
    let server = Server::start(&[]);
    let alice = waiting_alice(&server);
    let bob = Daemon::start("bob", server.addr, &[]);
    // mallory is introduced to alice, then calls as bob with her key.
    let key = introduction(server.addr, "mallory", "alice");
    let (_, hello) = call_with(&key, "bob", "alice");
    let answer = read_to_close(&mut dial(peer_port(&alice), &hello));
    assert!(answer.starts_with("HTTP/1.1 401 "), "{answer:?}");
    assert!(
        answer.contains("cannot verify that the server introduced you"),
        "{answer:?}"
    );
    assert_eq!(alice.state(), "waiting");
    bob.ok(&["register"]);
    assert!(bob.ok(&["bridge"]).contains("alice"));
    bob.ok(&["chat"]);
    assert!(bob.ok(&["send", "hi"]).contains("delivered"));
    assert_eq!(
        alice.messages().last().map(|m| m.2.clone()).as_deref(),
        Some("hi")
    );
}

#[cfg(unix)]
#[test]
fn a_daemon_that_says_nothing_is_given_up_on() {
    use std::os::unix::net::UnixListener;
    // What a stopped (SIGSTOP) daemon looks like from outside: the kernel
    // takes the connection, and nothing ever answers.
    let home = tempfile::tempdir().unwrap();
    let sock = home.path().join("mute.sock");
    let _listener = UnixListener::bind(&sock).unwrap();
    let started = Instant::now();
    let out = run_chatctl(&["--socket", sock.to_str().unwrap(), "status"], &[]);
    fails_with(&out, 3, "does not answer");
    // Socket activation keeps a socket that accepts while its daemon
    // fails to start: where to look is named.
    fails_with(&out, 3, "systemctl --user status chatd@mute");
    assert!(started.elapsed() < WAIT);
    // A shorter deadline of the caller's own is the one that applies.
    let out = run_chatctl(
        &[
            "--socket",
            sock.to_str().unwrap(),
            "wait",
            "--timeout",
            "1",
            "registered",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    // Something else that does answer is named for what it is not.
    let other = home.path().join("http.sock");
    let listener = UnixListener::bind(&other).unwrap();
    let server = std::thread::spawn(move || {
        if let Ok((mut c, _)) = listener.accept() {
            let _ = c.write_all(b"HTTP/1.1 200 OK\r\n\r\n");
            let _ = c.read(&mut [0u8; 64]);
        }
    });
    let out = run_chatctl(&["--socket", other.to_str().unwrap(), "status"], &[]);
    fails_with(&out, 1, "does not speak chatd's control protocol");
    server.join().unwrap();
}

#[test]
fn send_without_a_chat_fails_clearly() {
    let server = Server::start(&[]);
    let alice = Daemon::start("alice", server.addr, &[]);
    let out = alice.ctl(&["send", "hello?"]);
    fails_with(&out, 1, "not chatting: run `chatctl register`");
    let out = alice.ctl(&["bridge"]);
    fails_with(&out, 1, "not registered: run `chatctl register`");
    // stdin mode says which lines were not delivered.
    alice.ok(&["register"]);
    let out = alice.ctl_stdin(&["send", "-"], "a\nb\n");
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    // Line 2 may have gone before line 1's answer came back, or not.
    assert!(
        err.contains("line 1 not delivered: not chatting")
            && err.contains("stopped at line 1 (not chatting")
            && err.contains("lines read so far not delivered (lines 1"),
        "{err}"
    );
    // With --json, that last word is JSON too, as every error is.
    let out = alice.ctl_stdin(&["--json", "send", "-"], "a\n");
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    let last: serde_json::Value =
        serde_json::from_str(err.lines().last().unwrap_or_default()).expect("a JSON error");
    assert_eq!(last["exit"], 1);
    assert!(
        last["error"]
            .as_str()
            .is_some_and(|e| e.contains("stopped at line 1")),
        "{err}"
    );
}

/// Waits for a running chatctl to exit 1 and returns what it said.
fn exit_1_and_stderr(chatctl: &mut Guard, what: &str) -> String {
    let mut status = None;
    eventually(what, || {
        status = chatctl.try_wait().unwrap();
        status.is_some()
    });
    assert_eq!(status.and_then(|s| s.code()), Some(1));
    let mut err = String::new();
    chatctl
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    err
}

/// `chatctl send -` on `from`, fed `line N` lines as fast as it takes
/// them (the input outruns the chat, so lines are in flight whenever it
/// ends), once 50 have reached `to`. The feeding thread ends when chatctl
/// does.
fn lines_flowing(
    from: &Daemon,
    to: &Daemon,
    stderr: Stdio,
) -> (Guard, std::thread::JoinHandle<()>) {
    let mut cmd = from.ctl_cmd(&["send", "-"]);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(stderr);
    let mut send = Guard::new(cmd.spawn().unwrap());
    let mut input = send.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        for i in 0..1_000_000 {
            if writeln!(input, "line {i}").is_err() {
                return;
            }
        }
    });
    eventually("lines to arrive", || texts(to).len() >= 50);
    (send, writer)
}

#[test]
fn every_line_in_flight_when_the_chat_ends_is_counted() {
    let (_server, alice, bob) = chatting_pair();
    let (mut send, writer) = lines_flowing(&alice, &bob, Stdio::piped());
    bob.ok(&["quit"]);
    let err = exit_1_and_stderr(&mut send, "chatctl send - to stop");
    let _ = writer.join();
    // Every line alice's daemon did not deliver is named, one by one and
    // in the count at the end.
    let named = err
        .lines()
        .filter(|l| l.contains(" not delivered: "))
        .count();
    // "... (why, which may hold colons): N of the M lines read so far ...",
    // or, when bob's quit came between two lines' answers (the load and
    // the scheduler decide which), "... all M lines sent were delivered".
    let last = err.lines().last().unwrap_or_default();
    // The numbers among the four words before `marker`, last first.
    let count = |marker: &str| -> Vec<usize> {
        last.split_once(marker)
            .map(|(before, _)| {
                before
                    .rsplit(' ')
                    .take(4)
                    .filter_map(|w| w.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    let (read, counted) = match (
        &count(" lines read so far")[..],
        &count(" lines sent were delivered")[..],
    ) {
        (&[read, counted], _) => (read, counted),
        (_, &[sent]) => (sent, 0),
        _ => panic!("no count in: {last}"),
    };
    assert_eq!(named, counted, "{last}");
    // Each line read was delivered or is named: none is left unsaid.
    let delivered = texts(&bob)
        .iter()
        .filter(|t| t.starts_with("line "))
        .count();
    assert_eq!(delivered + named, read, "{last}");
    // Those alice's daemon had taken in are marked so in its history (the
    // others it refused, the chat being over).
    let history = alice.ok(&["history", "--limit", "100000"]);
    let marked = history
        .lines()
        .filter(|l| l.ends_with("(not delivered)"))
        .count();
    assert!(marked <= named, "{marked} marked, {named} named");
}

#[test]
fn a_follow_of_a_long_history_sees_every_record_once_in_order() {
    let (_server, alice, bob) = chatting_pair();
    // Several slices of history (chatd reads 5,000 records per slice, in
    // turns with everything else it does) ...
    let old: String = (0..20_000).map(|i| format!("old {i}\n")).collect();
    let out = bob.ctl_stdin(&["send", "-"], &old);
    assert!(out.status.success(), "{out:?}");
    // ... while messages keep coming, one `chatctl send` at a time, so
    // that some are stored while the snapshot is being read.
    let ticks: Vec<Command> = (0..150)
        .map(|i| bob.ctl_cmd(&["send", &format!("tick {i}")]))
        .collect();
    let sender = std::thread::spawn(move || {
        ticks
            .into_iter()
            .all(|cmd| run_bounded(cmd, None).status.success())
    });
    eventually("the ticks to flow", || {
        alice.ok(&["tail", "-n", "1"]).contains("tick ")
    });

    let (_follower, records) = follow(&alice, "50000");
    let got = records_until(&records, |got| {
        got.last().is_some_and(|v| v["text"] == "tick 149")
    });
    assert!(sender.join().unwrap(), "a chatctl send failed");
    let seqs: Vec<u64> = got.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "records missing, repeated or out of order around {:?}",
        seqs.windows(2).find(|w| w[1] != w[0] + 1)
    );
    let texts: Vec<&str> = got.iter().filter_map(|v| v["text"].as_str()).collect();
    for want in ["old 0", "old 19999", "tick 0", "tick 149"] {
        assert!(
            texts.contains(&want),
            "{want} not among {} records",
            got.len()
        );
    }
}

#[test]
fn a_stream_into_send_stops_when_the_chat_ends() {
    let (_server, alice, bob) = chatting_pair();
    // As `tail -f app.log | chatctl send -`: the input never ends.
    let mut cmd = alice.ctl_cmd(&["send", "-"]);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut send = Guard::new(cmd.spawn().unwrap());
    let mut input = send.stdin.take().unwrap();
    writeln!(input, "first line").unwrap();
    eventually("the first line to arrive", || {
        texts(&bob).contains(&"first line".to_owned())
    });
    bob.ok(&["quit"]);
    // chatctl learns that the chat is over from the daemon and stops, its
    // input still open and no other line written (before, it waited for
    // the next line to fail).
    let err = exit_1_and_stderr(&mut send, "chatctl send - to stop, its input still open");
    assert!(
        err.contains(
            "the chat is over: the one line sent was delivered; any further input is not sent"
        ),
        "{err}"
    );
    drop(input);
}

#[test]
fn no_daemon_is_exit_3_with_a_hint() {
    let home = tempfile::tempdir().unwrap();
    let run = home.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    let out = run_chatctl(&["status"], &[("XDG_RUNTIME_DIR", run.as_path())]);
    assert_eq!(out.status.code(), Some(3));
    let err = stderr(&out);
    assert!(
        err.contains("no chatd is running") && err.contains("chatd --id"),
        "{err}"
    );
    assert!(
        !run.join("chatd").exists(),
        "looking for daemons creates no folder"
    );
    let sock = run.join("nobody.sock");
    let out = run_chatctl(&["--socket", sock.to_str().unwrap(), "status"], &[]);
    fails_with(&out, 3, sock.to_str().unwrap());
    // A socket in the default place is known by its id, and naming it in a
    // hint creates no folder.
    let fresh = home.path().join("fresh");
    std::fs::create_dir_all(&fresh).unwrap();
    let ghost = fresh.join("chatd").join("ghost.sock");
    let out = run_chatctl(
        &["--socket", ghost.to_str().unwrap(), "status"],
        &[("XDG_RUNTIME_DIR", fresh.as_path())],
    );
    fails_with(&out, 3, "systemctl --user start chatd@ghost");
    assert!(!fresh.join("chatd").exists());
    // Usage errors are exit 2.
    let out = run_chatctl(&["wait", "sleeping"], &[]);
    assert_eq!(out.status.code(), Some(2));
    // Under --json, as every other error.
    let out = run_chatctl(&["--json", "frobnicate"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_str(stderr(&out).trim()).unwrap();
    assert_eq!(v["exit"], 2);
    assert!(v["error"].as_str().unwrap().contains("frobnicate"), "{v}");
    // A message on several lines keeps them all.
    let out = run_chatctl(&["--json", "wait"], &[]);
    let v: serde_json::Value = serde_json::from_str(stderr(&out).trim()).unwrap();
    assert!(v["error"].as_str().unwrap().contains("<STATE>"), "{v}");
}

#[test]
fn a_bound_daemon_listens_on_its_address_only() {
    let server = Server::start(&[]);
    let alice = Daemon::start("alice", server.addr, &["--bind", "127.0.0.1"]);
    let port = peer_port(&alice);
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    // Another loopback address reaches every-address listeners, not this.
    assert!(std::net::TcpStream::connect(("127.0.0.2", port)).is_err());
    // The server records the bound address, the one peers are handed.
    let out = alice.ok(&["--json", "register"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["addr"], format!("127.0.0.1:{port}"));
}

#[test]
fn with_several_daemons_one_is_chosen_by_id() {
    let server = Server::start(&[]);
    let alice = Daemon::start("alice", server.addr, &[]);
    // bob's socket beside alice's, as two daemons of one user have.
    let beside = alice.socket.with_file_name("bob.sock");
    let bob_socket = beside.to_str().unwrap();
    let home = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(bin("chatd"));
    isolate(&mut cmd, home.path())
        .args(["--id", "bob", "--port", "0", "--socket", bob_socket])
        .args(["--server", &server.addr.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _bob = Guard::new(cmd.spawn().unwrap());
    let mut status = None;
    eventually("bob to answer by its id", || {
        let out = alice.ctl(&["--json", "--id", "bob", "status"]);
        status = out.status.success().then_some(out.stdout);
        status.is_some()
    });
    let v: serde_json::Value = serde_json::from_slice(&status.unwrap()).unwrap();
    assert_eq!(v["id"], "bob");
    assert!(alice.ok(&["--id", "alice", "id"]).contains("alice"));
    // Without a choice: a usage error that lists how to make one.
    let out = alice.ctl(&["status"]);
    fails_with(&out, 2, "choose one with --id");
    fails_with(&out, 2, "bob: chatctl --id bob");
    // An id not running: unreachable, naming those that are.
    let out = alice.ctl(&["--id", "carol", "status"]);
    fails_with(&out, 3, "no chatd with id carol is running");
    fails_with(&out, 3, "alice: chatctl --id alice");
    fails_with(&out, 3, "chatd --id carol");
    // --id and --socket together are a usage error ...
    let out = alice.ctl(&["--id", "bob", "--socket", bob_socket, "status"]);
    assert_eq!(out.status.code(), Some(2));
    // ... but --id wins over CHATD_SOCKET, and without it that is used.
    let mut cmd = alice.ctl_cmd(&["--id", "alice", "id"]);
    cmd.env("CHATD_SOCKET", bob_socket);
    assert!(stdout(&run_bounded(cmd, None)).contains("alice"));
    let mut cmd = alice.ctl_cmd(&["id"]);
    cmd.env("CHATD_SOCKET", bob_socket);
    assert!(stdout(&run_bounded(cmd, None)).contains("bob"));
}

#[test]
fn the_shell_speaks_the_seed_commands() {
    let server = Server::start(&[]);
    let alice = Daemon::start("alice", server.addr, &[]);
    let bob = Daemon::start("bob", server.addr, &[]);
    alice.ok(&["register"]);
    alice.ok(&["bridge"]);
    let mut shell = bob.ctl_cmd(&["shell"]);
    shell
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut shell = Guard::new(shell.spawn().unwrap());
    let mut input = shell.stdin.take().unwrap();
    writeln!(input, "/id\n/register\n/bridge\n/chat").unwrap();
    alice.wait_for("chatting");
    writeln!(input, "hello from the shell").unwrap();
    eventually("the shell's message to arrive", || {
        texts(&alice).contains(&"hello from the shell".to_owned())
    });
    alice.ok(&["send", "hello shell"]);
    writeln!(input, "/quit").unwrap();
    alice.wait_for("registered");
    drop(input);
    let out = output_bounded(shell.into_inner());
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("bob\n"), "{printed}");
    assert!(printed.contains("peer alice"), "{printed}");
    assert!(printed.contains("alice → bob: hello shell"), "{printed}");
    assert!(out.status.success());
}

#[test]
fn wait_times_out_with_exit_1() {
    let server = Server::start(&[]);
    let alice = Daemon::start("alice", server.addr, &[]);
    let started = Instant::now();
    let out = alice.ctl(&["wait", "chatting", "--timeout", "0.5"]);
    fails_with(&out, 1, "timed out");
    // It waited the half second it was given (and run_bounded bounds the
    // other side).
    assert!(started.elapsed() >= std::time::Duration::from_millis(500));
}

#[test]
fn a_frozen_peer_is_noticed_by_its_silence() {
    let (_server, alice, bob) = chatting_pair();
    // SIGSTOP: bob's socket stays open but nothing comes from it, as when a
    // cable is pulled. Only the heartbeat can tell.
    let frozen = Frozen::new(bob.pid());
    let started = Instant::now();
    // A message sent into the silence: it can only fail, and say so.
    let unheard = alice.ctl(&["send", "are you there?"]);
    alice.wait_for("registered");
    let took = started.elapsed();
    drop(frozen);
    assert_eq!(unheard.status.code(), Some(1));
    assert!(
        stderr(&unheard).contains("not delivered: lost bob"),
        "{}",
        stderr(&unheard)
    );
    let history = alice.ok(&["--json", "history"]);
    let last: serde_json::Value = serde_json::from_str(history.lines().last().unwrap()).unwrap();
    assert_eq!(
        (last["text"].as_str(), last["delivered"].as_bool()),
        (Some("are you there?"), Some(false))
    );
    assert!(
        alice
            .ok(&["history"])
            .contains("are you there?  (not delivered)")
    );
    assert!(took.as_secs() < 20, "noticed after {took:?}");
    let tail = alice.ok(&["tail", "-n", "3"]);
    assert!(tail.contains("lost bob: nothing heard for 9 s"), "{tail}");
}

#[test]
fn the_demo_runs_and_cleans_up() {
    // The demo starts the chat-server and chatd that sit next to chatctl.
    bin("chat-server");
    bin("chatd");
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut demo = std::process::Command::new(chatctl());
    demo.arg("demo").env("TMPDIR", tmp.path());
    let out = run_bounded(demo, None);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let printed = stdout(&out);
    for expected in [
        "alice$ chatctl register",
        "peer alice at 127.0.0.1:",
        "bob: Hi Alice! This went straight from my daemon to yours.",
        "alice: Bye for now!",
        "bob$ chatctl quit\n         left the chat with alice and the server",
    ] {
        assert!(
            printed.contains(expected),
            "missing {expected:?} in:\n{printed}"
        );
    }
    assert!(
        printed.contains("stopping the daemons and the server"),
        "{printed}"
    );
    // Its directory, logs and sockets are gone with it.
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .expect("read the temp dir")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn completions_and_man_pages_come_from_the_definitions() {
    for (shell, marker) in [
        ("bash", "_chatctl()"),
        ("zsh", "#compdef chatctl"),
        ("fish", "complete -c chatctl"),
    ] {
        let out = run_chatctl(&["completions", shell], &[]);
        assert!(out.status.success());
        let script = stdout(&out);
        assert!(
            script.contains(marker) && script.contains("history"),
            "{shell}: {script:.200}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let out = run_chatctl(&["man", dir.path().to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    for (page, option) in [
        ("chat-server", "per\\-ip\\-rate"),
        ("chatd", "data\\-dir"),
        ("chatctl", "json"),
    ] {
        let text = std::fs::read_to_string(dir.path().join(format!("{page}.1"))).unwrap();
        assert!(
            text.starts_with(".ie") || text.contains(".TH"),
            "{page}.1 is not a man page"
        );
        assert!(text.contains(option), "{page}.1 documents --{option}");
    }
}

#[test]
#[cfg(unix)] // speaks to the control socket as a Unix socket
fn a_daemon_of_another_protocol_version_is_named() {
    use std::os::unix::net::UnixListener;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("future.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let fake = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut sink = [0u8; 256];
        let _ = s.read(&mut sink);
        let frame = hello_frame(Hello {
            protocol: 99,
            software: "chatd 9.9.9".into(),
        });
        s.write_all(&frame).unwrap();
    });
    let out = run_chatctl(&["--socket", path.to_str().unwrap(), "status"], &[]);
    fake.join().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("protocol v{}", chat_proto::ipc::VERSION))
            && err.contains("chatd 9.9.9 speaks v99"),
        "{err}"
    );
}

/// `hello` as one control-socket frame.
#[cfg(unix)]
fn hello_frame(hello: Hello) -> Vec<u8> {
    let mut v = Vec::new();
    chat_proto::frame::encode(&hello, chat_proto::ipc::MAX_FRAME, &mut v).unwrap();
    v
}

/// A shell's opening: our hello, then request `id`.
#[cfg(unix)]
fn hello_and(id: u64, request: chat_proto::ipc::Request) -> Vec<u8> {
    let mut v = hello_frame(Hello::ours("test"));
    let frame = chat_proto::ipc::ClientFrame { id, request };
    chat_proto::frame::encode(&frame, chat_proto::ipc::MAX_FRAME, &mut v).unwrap();
    v
}

#[test]
#[cfg(unix)] // speaks to the control socket as a Unix socket
fn a_follower_that_falls_behind_is_dropped_and_nobody_else_notices() {
    use chat_proto::frame::Decoder;
    use chat_proto::ipc::{DaemonFrame, Hello, MAX_FRAME, Request};
    use std::os::unix::net::UnixStream;

    let (_server, alice, bob) = chatting_pair();
    // A follower that will stop reading. It asks for the last record too,
    // and reads that one: then the daemon surely follows it.
    let mut stuck = UnixStream::connect(&alice.socket).unwrap();
    stuck.set_read_timeout(Some(WAIT)).unwrap();
    let out = hello_and(
        1,
        Request::Tail {
            last: 1,
            follow: true,
        },
    );
    stuck.write_all(&out).unwrap();
    let mut decoder = Decoder::new(MAX_FRAME);
    let mut chunk = vec![0u8; 64 * 1024];
    let mut greeted = false;
    let mut followed = false;
    while !followed {
        let n = stuck
            .read(&mut chunk)
            .expect("the daemon answers the follower");
        assert!(n > 0, "the daemon closed the follower");
        decoder.extend(&chunk[..n]);
        if !greeted {
            greeted = matches!(decoder.decode::<Hello>(), Ok(Some(_)));
        }
        if greeted {
            followed = matches!(
                decoder.decode::<DaemonFrame>(),
                Ok(Some(DaemonFrame::Record { .. }))
            );
        }
    }
    // A follower that reads. It asks for the whole history, so that
    // whenever it attaches, it sees every message exactly once.
    let (reader, records) = follow(&alice, "100000");
    // Far more records than the stuck one's queue and socket buffer hold.
    let count = 12_000;
    let lines: String = (0..count).map(|i| format!("m{i}\n")).collect();
    let sent = bob.ctl_stdin(&["send", "-"], &lines);
    assert!(sent.status.success(), "{}", stderr(&sent));
    let messages = messages_until(&records, |got| got.len() >= count);
    for (i, v) in messages.iter().enumerate() {
        assert_eq!(v["text"], format!("m{i}"));
    }
    let got = messages.len();
    assert_eq!(got, count, "the reading follower saw everything, in order");
    drop(reader);
    // The stuck one, reading at last, finds the end of its stream: a
    // Dropped frame saying why, then the close.
    let mut last = None;
    loop {
        match stuck.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => decoder.extend(&chunk[..n]),
        }
        while let Ok(Some(frame)) = decoder.decode::<DaemonFrame>() {
            last = Some(frame);
        }
    }
    match last {
        Some(DaemonFrame::Dropped { reason }) => {
            assert!(reason.contains("fell more than"), "{reason}")
        }
        other => panic!("expected a final Dropped frame, got {other:?}"),
    }
    // The daemon is fine, and a history this long is served whole.
    assert_eq!(alice.state(), "chatting");
    assert_eq!(alice.messages().len(), count);
}

#[test]
#[cfg(unix)] // speaks to the control socket as a Unix socket
fn a_shell_that_asks_and_never_reads_is_no_longer_read() {
    use chat_proto::frame::encode;
    use chat_proto::ipc::{ClientFrame, Hello, MAX_FRAME, Request};
    use std::os::unix::net::UnixStream;

    let server = Server::start(&[]);
    let alice = Daemon::start("alice", server.addr, &[]);
    let mut flood = UnixStream::connect(&alice.socket).unwrap();
    flood
        .set_write_timeout(Some(std::time::Duration::from_secs(2)))
        .unwrap();
    flood.write_all(&hello_frame(Hello::ours("test"))).unwrap();
    // Requests answered at once, their answers never read: the daemon
    // holds at most its window of answers, then stops reading, and the
    // writes here block (the timeout ends them).
    let total = 1_000_000;
    let mut written = 0;
    let mut batch = Vec::new();
    while written < total {
        batch.clear();
        for id in written..written + 1000 {
            let frame = ClientFrame {
                id,
                request: Request::Status,
            };
            encode(&frame, MAX_FRAME, &mut batch).unwrap();
        }
        if flood.write_all(&batch).is_err() {
            break;
        }
        written += 1000;
    }
    assert!(written < total, "all {total} requests were taken in");
    // Its window of answers, and what the socket buffers hold (about
    // 30,000 here), not whatever the machine could read in the meantime.
    assert!(written <= 100_000, "{written} requests were taken in");
    // Everyone else is served as before.
    assert_eq!(alice.state(), "idle");
    let rss_kib: u64 = std::fs::read_to_string(format!("/proc/{}/status", alice.pid()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap();
    assert!(rss_kib < 64 * 1024, "chatd holds {rss_kib} KiB");
}

#[test]
#[cfg(unix)] // speaks to the control socket as a Unix socket
fn a_shell_that_half_closes_still_gets_its_answers() {
    use chat_proto::frame::Decoder;
    use chat_proto::ipc::{DaemonFrame, Hello, MAX_FRAME, Request};
    use std::os::unix::net::UnixStream;

    let (_server, alice, bob) = chatting_pair();
    let mut shell = UnixStream::connect(&alice.socket).unwrap();
    shell.set_read_timeout(Some(WAIT)).unwrap();
    let out = hello_and(
        7,
        Request::Send {
            text: "sent by a half-closing shell".into(),
        },
    );
    shell.write_all(&out).unwrap();
    // As `socat` does at the end of its input.
    shell.shutdown(std::net::Shutdown::Write).unwrap();
    let mut bytes = Vec::new();
    shell.read_to_end(&mut bytes).unwrap();
    let mut decoder = Decoder::new(MAX_FRAME);
    decoder.extend(&bytes);
    assert!(matches!(decoder.decode::<Hello>(), Ok(Some(_))));
    let reply = decoder.decode::<DaemonFrame>();
    assert!(
        matches!(
            reply,
            Ok(Some(DaemonFrame::Reply {
                id: 7,
                result: Ok(_)
            }))
        ),
        "{reply:?}"
    );
    assert!(texts(&bob).contains(&"sent by a half-closing shell".to_owned()));
}

/// A process stopped with SIGSTOP, continued when this drops (even when a
/// test fails half-way, so its other end is not left frozen).
struct Frozen(String);

impl Frozen {
    fn new(pid: u32) -> Frozen {
        let pid = pid.to_string();
        let stopped = std::process::Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .unwrap();
        assert!(stopped.success());
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.0])
            .status();
    }
}

#[test]
fn register_at_start_up_needs_no_shell() {
    let server = Server::start(&[]);
    // Started by hand, not by the harness (which talks to the socket):
    // nothing but --register may make it register.
    let home = tempfile::tempdir().unwrap();
    let mut chatd = std::process::Command::new(bin("chatd"));
    isolate(&mut chatd, home.path())
        .args([
            "--id",
            "early",
            "--port",
            "0",
            "--server",
            &server.addr.to_string(),
            "--register",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut chatd = Guard::new(chatd.spawn().unwrap());
    // A probe client asks the server for "early" by name: 404 until it is
    // registered, then 409 (registered, not waiting).
    let reg = request(
        server.addr,
        "REGISTER",
        &[("Client-Id", "probe"), ("Client-Port", "9")],
    );
    let token = reg.header("Client-Token").unwrap().to_owned();
    let mut answer = None;
    eventually("the server to know \"early\"", || {
        let reply = request(
            server.addr,
            "BRIDGE",
            &[
                ("Client-Id", "probe"),
                ("Client-Token", &token),
                ("Peer-Id", "early"),
            ],
        );
        let known = reply.status != 404;
        answer = Some(reply);
        known
    });
    terminate(&mut chatd);
    let answer = answer.expect("an answer");
    assert_eq!(answer.status, 409, "{answer:?}");
}

#[test]
fn text_from_a_peer_cannot_drive_the_terminal() {
    let (_server, alice, bob) = chatting_pair();
    bob.ok(&["send", "clear\u{1b}[2Jscreen"]);
    let shown = alice.ok(&["tail", "-n", "1"]);
    assert!(!shown.contains('\u{1b}'), "{shown:?}");
    assert!(shown.contains("clear\\u{1b}[2Jscreen"), "{shown:?}");
    // JSON keeps the text as it was, escaped the JSON way.
    let json = alice.ok(&["--json", "tail", "-n", "1"]);
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(v["text"], "clear\u{1b}[2Jscreen");
}

#[test]
fn a_waiting_daemon_that_died_or_restarted_is_not_handed_out_again() {
    let server = Server::start(&[]);
    let alice = Daemon::start("alice", server.addr, &[]);
    let mut bob = Daemon::start("bob", server.addr, &[]);
    let carol = Daemon::start("carol", server.addr, &[]);
    alice.ok(&["register"]);
    bob.ok(&["register"]);
    carol.ok(&["register"]);

    // bob waits, then dies: the server still holds him waiting.
    assert!(bob.ok(&["bridge"]).contains("waiting"));
    bob.kill9();
    assert!(alice.ok(&["bridge"]).contains("bob"));
    let out = alice.ctl(&["chat"]);
    fails_with(
        &out,
        1,
        "its chatd is gone: the server will not hand it out again",
    );
    // Not handed out again: alice waits instead.
    assert!(alice.ok(&["bridge"]).contains("waiting"));
    alice.ok(&["quit"]);
    alice.ok(&["register"]);

    // bob waits again, and is restarted: the new run is not waiting, and
    // the server must not think so (it kept the earlier run's token).
    bob.spawn();
    bob.ok(&["register"]);
    assert!(bob.ok(&["bridge"]).contains("waiting"));
    bob.kill9();
    bob.spawn();
    let registered = bob.ok(&["register"]);
    assert!(registered.starts_with("registered as"), "{registered}");
    assert!(
        carol.ok(&["bridge"]).contains("waiting"),
        "bob was handed out"
    );
}

#[test]
fn messages_in_flight_when_the_sender_crashed_are_settled_at_its_restart() {
    let (_server, mut alice, bob) = chatting_pair();
    let (_send, writer) = lines_flowing(&alice, &bob, Stdio::null());
    alice.kill9();
    let _ = writer.join();
    alice.spawn();
    // Every message alice sent is now known delivered or not: none is
    // left unknown, which would read as delivered.
    let out = alice.ok(&["--json", "history", "--limit", "100000"]);
    let unknown = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("history JSON"))
        .filter(|v| v["from"] == "alice" && v["delivered"].is_null())
        .count();
    assert_eq!(unknown, 0, "{out}");
}
