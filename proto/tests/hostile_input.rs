//! Every codec against input it did not write: valid messages cut at every
//! byte, and valid messages mutated at random.
//!
//! The binaries read these bytes straight from sockets, so a panic here is
//! a remote crash of the server or of a daemon. The mutations are seeded
//! and repeatable; `HOSTILE_ROUNDS=N` runs N rounds (default 3,000 per
//! message) for a longer search, `HOSTILE_SEED=S` another sequence, and a
//! failure prints the seed and the bytes that caused it.

use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};

use chat_proto::crypto::{self, Calling, HANDSHAKE_LEN, Parties, PeerKey};
use chat_proto::frame::{Decoder, encode};
use chat_proto::ipc::{self, ClientFrame, DaemonFrame};
use chat_proto::peer::{self, Answer, PeerFrame, parse_answer, parse_hello};
use chat_proto::rendezvous::{
    ErrorStatus, Failure, Method, Parsed, Request, RequestFraming, Response, ResponseFraming,
    parse_request, parse_response,
};
use chat_proto::{ClientId, Token};

/// xorshift64*: no dependency, and the same sequence on every platform.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn rounds() -> usize {
    std::env::var("HOSTILE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000)
}

/// The seed of one test: its own constant, changed by `HOSTILE_SEED`.
fn seed(constant: u64) -> u64 {
    let extra = std::env::var("HOSTILE_SEED")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    (constant ^ extra.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1
}

fn id(s: &str) -> ClientId {
    s.parse().expect("a valid id")
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("a valid address")
}

const TOKEN: Token = Token::from_bytes([0xa5; 16]);

fn requests() -> Vec<Request> {
    vec![
        Request::Probe,
        Request::Register {
            id: id("alice"),
            port: 4000,
            token: None,
        },
        Request::Register {
            id: id(&"x".repeat(32)),
            port: 65535,
            token: Some(TOKEN),
        },
        Request::Bridge {
            id: id("bob"),
            token: TOKEN,
            peer: None,
        },
        Request::Bridge {
            id: id("bob"),
            token: TOKEN,
            peer: Some(id("a.b_c-9")),
        },
        Request::Chat {
            id: id("bob"),
            token: TOKEN,
            peer: id("alice"),
        },
        Request::Quit {
            id: id("bob"),
            token: TOKEN,
        },
    ]
}

fn encoded_requests() -> Vec<Vec<u8>> {
    let mut all = Vec::new();
    for r in requests() {
        for (host, rid, close) in [
            (None, None, false),
            (Some("127.0.0.1:5555"), None, true),
            (Some("h"), Some("77"), false),
        ] {
            let mut out = Vec::new();
            r.encode(
                &mut out,
                &RequestFraming {
                    host,
                    request_id: rid,
                    close,
                },
            );
            all.push(out);
        }
    }
    all
}

/// Each response with the method it answers.
fn responses() -> Vec<(Response, Method)> {
    vec![
        (
            Response::RegAck {
                id: id("alice"),
                addr: addr("127.0.0.1:4000"),
                token: TOKEN,
                expires: 300,
            },
            Method::Register,
        ),
        (
            Response::RegAck {
                id: id("alice"),
                addr: addr("[::1]:4000"),
                token: TOKEN,
                expires: 1,
            },
            Method::Register,
        ),
        (
            Response::BridgeAck {
                peer: Some((
                    id("bob"),
                    addr("127.0.0.2:9"),
                    chat_proto::crypto::PeerKey::from_bytes([5; 16]),
                )),
            },
            Method::Bridge,
        ),
        (Response::BridgeAck { peer: None }, Method::Bridge),
        (Response::ChatAck, Method::Chat),
        (Response::QuitAck, Method::Quit),
        (
            Response::Error(Failure {
                retry_after: Some(3),
                ..Failure::new(ErrorStatus::TooManyRequests, "slow down: ünïcode too")
            }),
            Method::Register,
        ),
        (
            Response::Error(Failure::new(ErrorStatus::NotFound, "no such id")),
            Method::Bridge,
        ),
    ]
}

fn encode_response(r: &Response, datagram: bool) -> Vec<u8> {
    let mut out = Vec::new();
    r.encode(
        &mut out,
        &ResponseFraming {
            close: !datagram,
            request_id: datagram.then_some("12"),
            datagram,
            minimal: false,
            keep_alive: false,
        },
    );
    out
}

/// One random change: a byte replaced, inserted or removed, a run cut out
/// or repeated, the message truncated, or bytes from a set that parsers
/// treat specially.
fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    const SPECIAL: &[u8] = b"\r\n:\0 \t\x7f\xff0-9aZ/";
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = v.len();
        let at = rng.below(len + 1);
        match rng.below(7) {
            0 if len > 0 => v[at.min(len - 1)] = rng.next() as u8,
            1 => v.insert(at, SPECIAL[rng.below(SPECIAL.len())]),
            2 if at < len => {
                v.remove(at);
            }
            3 => v.truncate(at),
            4 if len > 0 => {
                let from = rng.below(len);
                let to = (from + 1 + rng.below(16)).min(len);
                let run: Vec<u8> = v[from..to].to_vec();
                let most = if rng.below(8) == 0 { 600 } else { 3 };
                let times = 1 + rng.below(most);
                for _ in 0..times {
                    v.splice(at..at, run.iter().copied());
                }
            }
            5 if len > 0 => {
                let to = (at + rng.below(32)).min(len);
                v.drain(at..to);
            }
            _ => v.insert(at, rng.next() as u8),
        }
    }
    v
}

/// Runs `check` on `input`; a panic fails the test with what caused it.
fn survive(what: &str, seed: u64, input: &[u8], check: impl FnOnce(&[u8])) {
    if catch_unwind(AssertUnwindSafe(|| check(input))).is_err() {
        panic!(
            "{what} panicked on input (seed {seed:#x}): {:?}",
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn every_prefix_of_a_request_asks_for_more_and_the_whole_parses_back() {
    for (bytes, request) in encoded_requests().iter().zip(
        requests()
            .into_iter()
            .flat_map(|r| std::iter::repeat_n(r, 3)),
    ) {
        for cut in 0..bytes.len() {
            match parse_request(&bytes[..cut]) {
                Ok(Parsed::Partial) => {}
                other => panic!(
                    "{:?} cut at {cut}: {other:?}",
                    String::from_utf8_lossy(bytes)
                ),
            }
        }
        let Ok(Parsed::Complete(head)) = parse_request(bytes) else {
            panic!("{:?} did not parse", String::from_utf8_lossy(bytes));
        };
        assert_eq!(head.head_len, bytes.len());
        assert_eq!(head.request.as_ref().ok(), Some(&request));
    }
}

#[test]
fn every_prefix_of_a_response_asks_for_more_and_the_whole_parses_back() {
    for (response, method) in responses() {
        let bytes = encode_response(&response, false);
        for cut in 0..bytes.len() {
            match parse_response(&bytes[..cut], method, false) {
                Ok(Parsed::Partial) => {}
                other => panic!(
                    "{:?} cut at {cut}: {other:?}",
                    String::from_utf8_lossy(&bytes)
                ),
            }
        }
        let Ok(Parsed::Complete((head, used))) = parse_response(&bytes, method, false) else {
            panic!("{:?} did not parse", String::from_utf8_lossy(&bytes));
        };
        assert_eq!(used, bytes.len());
        assert_eq!(head.response, response);

        let datagram = encode_response(&response, true);
        let Ok(Parsed::Complete((head, _))) = parse_response(&datagram, method, true) else {
            panic!(
                "datagram {:?} did not parse",
                String::from_utf8_lossy(&datagram)
            );
        };
        assert_eq!(head.response, response);
        assert_eq!(head.request_id.as_deref(), Some("12"));
    }
}

#[test]
fn mutated_requests_never_panic_and_what_parses_encodes_back_the_same() {
    let inputs = encoded_requests();
    let seed = seed(0x5eed_0001);
    let mut rng = Rng(seed);
    for _ in 0..rounds() {
        for input in &inputs {
            let bytes = mutate(&mut rng, input);
            survive("parse_request", seed, &bytes, |b| {
                let Ok(Parsed::Complete(head)) = parse_request(b) else {
                    return;
                };
                assert!(head.head_len <= b.len());
                // Whatever the server acts on, written out again, is read
                // back as the same request: nothing in it depends on
                // bytes the parser skipped.
                if let Ok(request) = head.request {
                    let mut again = Vec::new();
                    request.encode(&mut again, &RequestFraming::default());
                    let Ok(Parsed::Complete(h2)) = parse_request(&again) else {
                        panic!("re-encoded {request:?} did not parse");
                    };
                    assert_eq!(h2.request.ok(), Some(request));
                }
            });
        }
    }
}

#[test]
fn mutated_responses_never_panic() {
    let inputs: Vec<(Vec<u8>, Method, bool)> = responses()
        .into_iter()
        .flat_map(|(r, m)| {
            [
                (encode_response(&r, false), m, false),
                (encode_response(&r, true), m, true),
            ]
        })
        .collect();
    let seed = seed(0x5eed_0002);
    let mut rng = Rng(seed);
    for _ in 0..rounds() {
        for (input, method, datagram) in &inputs {
            let bytes = mutate(&mut rng, input);
            survive("parse_response", seed, &bytes, |b| {
                if let Ok(Parsed::Complete((_, used))) = parse_response(b, *method, *datagram) {
                    assert!(used <= b.len());
                }
            });
        }
    }
}

#[test]
fn mutated_peer_handshakes_never_panic() {
    let mut inputs = Vec::new();
    for turns in [false, true] {
        let mut out = Vec::new();
        peer::Hello {
            id: id("alice"),
            turns,
        }
        .encode("127.0.0.1:4000", &[0x5a; HANDSHAKE_LEN], &mut out);
        inputs.push(out);
    }
    for answer in [
        Answer::Accepted {
            id: id("bob"),
            handshake: vec![0xa5; HANDSHAKE_LEN],
        },
        Answer::Refused {
            status: 503,
            reason: "bob is busy in another chat".into(),
        },
    ] {
        let mut out = Vec::new();
        answer.encode(&mut out);
        inputs.push(out);
    }
    let seed = seed(0x5eed_0003);
    let mut rng = Rng(seed);
    for _ in 0..rounds() {
        for input in &inputs {
            let bytes = mutate(&mut rng, input);
            survive("parse_hello", seed, &bytes, |b| {
                if let Ok(Some(opening)) = parse_hello(b) {
                    assert!(opening.used <= b.len());
                }
            });
            survive("parse_answer", seed, &bytes, |b| {
                if let Ok(Some((_, used))) = parse_answer(b) {
                    assert!(used <= b.len());
                }
            });
        }
    }
}

/// Whatever is done to a link's records on the way (bits flipped, bytes
/// cut, added or moved), the reader neither panics nor yields a byte that
/// was not sent: what opens is a prefix of what was sealed.
#[test]
fn mutated_records_never_open_to_anything_but_what_was_sent() {
    let key = PeerKey::from_bytes([0x42; 16]);
    let parties = Parties {
        caller: id("alice"),
        callee: id("bob"),
        turns: false,
    };
    let seed = seed(0x5eed_0005);
    let mut rng = Rng(seed);
    let sent: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
    for _ in 0..rounds() / 10 {
        let (calling, first) = Calling::start(&key, &parties).unwrap();
        let (callee, reply) = crypto::answer(&key, &parties, &first).unwrap();
        let (mut sealer, _) = calling.finish(&reply).unwrap().split();
        let (_, mut opener) = callee.split();
        let mut wire = Vec::new();
        for piece in sent.chunks(1 + rng.below(1000)) {
            sealer.seal(piece, &mut wire).unwrap();
        }
        let bytes = mutate(&mut rng, &wire);
        survive("Opener::open", seed, &bytes, |b| {
            let mut plain = Vec::new();
            for piece in b.chunks(1 + rng.below(500)) {
                opener.extend(piece);
                if opener.open(&mut plain).is_err() {
                    break;
                }
            }
            assert!(sent.starts_with(&plain), "opened bytes never sent");
        });
    }
}

fn frames<T: serde::Serialize>(values: &[T], max: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for v in values {
        encode(v, max, &mut out).expect("fits in a frame");
    }
    out
}

/// Feeds `bytes` to a decoder in pieces of random size and collects what
/// it yields until the first error.
fn decode_all<T: serde::de::DeserializeOwned>(
    rng: &mut Rng,
    bytes: &[u8],
    max: usize,
) -> (Vec<T>, bool) {
    let mut d = Decoder::new(max);
    let mut got = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let n = (1 + rng.below(40)).min(rest.len());
        d.extend(&rest[..n]);
        rest = &rest[n..];
        loop {
            match d.decode::<T>() {
                Ok(Some(v)) => got.push(v),
                Ok(None) => break,
                Err(_) => return (got, false),
            }
        }
    }
    (got, d.finish().is_ok())
}

fn peer_frames() -> Vec<PeerFrame> {
    vec![
        PeerFrame::Message {
            id: 1,
            sent_ms: 1_700_000_000_000,
            text: "hello, ünïcode 🙂".into(),
        },
        PeerFrame::Ack { id: u64::MAX },
        PeerFrame::Ping,
        PeerFrame::Message {
            id: 2,
            sent_ms: -1,
            text: String::new(),
        },
        PeerFrame::Bye,
    ]
}

fn client_frames() -> Vec<ClientFrame> {
    use ipc::Request as R;
    [
        R::Id,
        R::Status,
        R::Register,
        R::Bridge {
            peer: Some(id("bob")),
        },
        R::Chat,
        R::Send {
            text: "x".repeat(300),
        },
        R::Quit,
        R::Tail {
            last: 10,
            follow: true,
        },
        R::Wait {
            state: ipc::State::ALL[2],
        },
        R::History {
            peer: None,
            grep: Some("%_\\".into()),
            limit: 5,
        },
    ]
    .into_iter()
    .enumerate()
    .map(|(i, request)| ClientFrame {
        id: i as u64,
        request,
    })
    .collect()
}

fn daemon_frames() -> Vec<DaemonFrame> {
    vec![
        DaemonFrame::Reply {
            id: 1,
            result: Ok(ipc::Reply::Bridged {
                peer: Some((id("bob"), addr("[::1]:9"))),
            }),
        },
        DaemonFrame::Reply {
            id: 2,
            result: Err(ipc::Failure::new(
                ipc::FailureKind::State,
                "not registered: run `chatctl register`",
            )),
        },
        DaemonFrame::Dropped {
            reason: "fell behind".into(),
        },
    ]
}

#[test]
fn frames_split_anywhere_decode_to_what_was_sent() {
    let mut rng = Rng(seed(0x5eed_0004));
    for _ in 0..50 {
        let bytes = frames(&peer_frames(), peer::MAX_FRAME);
        assert_eq!(
            decode_all::<PeerFrame>(&mut rng, &bytes, peer::MAX_FRAME),
            (peer_frames(), true)
        );
        let bytes = frames(&client_frames(), ipc::MAX_FRAME);
        assert_eq!(
            decode_all::<ClientFrame>(&mut rng, &bytes, ipc::MAX_FRAME),
            (client_frames(), true)
        );
        let bytes = frames(&daemon_frames(), ipc::MAX_FRAME);
        assert_eq!(
            decode_all::<DaemonFrame>(&mut rng, &bytes, ipc::MAX_FRAME),
            (daemon_frames(), true)
        );
    }
}

#[test]
fn mutated_frames_never_panic_and_never_pass_the_limit() {
    let seed = seed(0x5eed_0005);
    let mut rng = Rng(seed);
    let peer_bytes = frames(&peer_frames(), peer::MAX_FRAME);
    let client_bytes = frames(&client_frames(), ipc::MAX_FRAME);
    let daemon_bytes = frames(&daemon_frames(), ipc::MAX_FRAME);
    for _ in 0..rounds() {
        let b = mutate(&mut rng, &peer_bytes);
        let mut r = Rng(rng.next() | 1);
        survive("PeerFrame decoding", seed, &b, |b| {
            let (got, _) = decode_all::<PeerFrame>(&mut r, b, peer::MAX_FRAME);
            for f in got {
                if let PeerFrame::Message { text, .. } = f {
                    assert!(text.len() <= peer::MAX_FRAME);
                }
            }
        });
        let b = mutate(&mut rng, &client_bytes);
        survive("ClientFrame decoding", seed, &b, |b| {
            decode_all::<ClientFrame>(&mut r, b, ipc::MAX_FRAME);
        });
        let b = mutate(&mut rng, &daemon_bytes);
        survive("DaemonFrame decoding", seed, &b, |b| {
            decode_all::<DaemonFrame>(&mut r, b, ipc::MAX_FRAME);
        });
    }
}
