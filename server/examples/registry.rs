//! Fresh REGISTERs into a registry holding about as many live entries as
//! `bench/compare.sh` leaves in the server (1.3 million: 10 s of
//! registrations at 130,000/s), timed in-process, with no sockets in the
//! way: what the registry alone costs a request.
//!
//! `cargo run --release -p chat-server --example registry [rounds]`

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use chat_proto::rendezvous::{Request, Response};
use chat_proto::{ClientId, Token};
use chat_server::registry::{Config, Registry};

/// Registrations per simulated second, and seconds each lives.
const RATE: u64 = 130_000;
const EXPIRES: u64 = 10;
/// Registrations timed per round.
const ROUND: u64 = 400_000;

fn main() {
    let rounds: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    let mut reg = Registry::new(Config {
        expires: Duration::from_secs(EXPIRES),
        max_registrations: 0,
    });
    let source = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let mut n: u64 = 0;
    // Ids and tokens are made before the clock starts, so only the
    // registry is timed.
    let batch = |n: &mut u64, count: u64| -> Vec<(ClientId, Token, Duration)> {
        (0..count)
            .map(|_| {
                *n += 1;
                let id: ClientId = format!("bench-{n}").parse().expect("a valid id");
                let mut token = [0u8; 16];
                token[..8].copy_from_slice(&n.to_le_bytes());
                let now = Duration::from_nanos(*n * 1_000_000_000 / RATE);
                (id, Token::from_bytes(token), now)
            })
            .collect()
    };
    let ahead = reg.lookahead();
    // As the server does: the id hashed and its index line asked for
    // before the call (which the server makes under its lock).
    let register = |reg: &mut Registry, (id, token, now): (ClientId, Token, Duration)| {
        let hashed = ahead.register(&id);
        let r = reg.handle(
            &Request::Register {
                id,
                port: 9,
                token: None,
            },
            Some(hashed),
            source,
            now,
            || Ok::<_, Infallible>(token),
        );
        matches!(r, Response::RegAck { .. })
    };
    // Fill to the steady state, where expiry pops as many as are added.
    for one in batch(&mut n, RATE * (EXPIRES + 1)) {
        register(&mut reg, one);
    }
    for round in 1..=rounds {
        let ids = batch(&mut n, ROUND);
        let started = Instant::now();
        let mut ok = 0;
        // The slowest REGISTER: one that purges or grows the index, which
        // holds the registry's lock meanwhile.
        let mut slowest = Duration::ZERO;
        for one in ids {
            let t = Instant::now();
            ok += u64::from(register(&mut reg, one));
            slowest = slowest.max(t.elapsed());
        }
        let ns = started.elapsed().as_nanos() / u128::from(ROUND);
        println!(
            "round {round}: {ns} ns/REGISTER, slowest {:.1} ms ({ok} ok, {} held)",
            slowest.as_secs_f64() * 1e3,
            reg.len()
        );
    }
}
