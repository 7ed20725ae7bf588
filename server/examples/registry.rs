//! Fresh REGISTERs into a registry holding about as many live entries as
//! `bench/compare.sh` leaves in the server (1.3 million: 10 s of
//! registrations at 130,000/s), timed in-process, with no sockets in the
//! way: what the registry alone costs a request.
//!
//! With `two`, two threads take turns as the server's two workers do, each
//! REGISTER under the lock the server keeps the registry behind, with a
//! few microseconds of other work between (a request's parsing and system
//! calls, roughly): what the registry costs when its lock and its state
//! move between cores at every turn. With `one`, a single thread does the
//! same: the difference between the two is that move.
//!
//! `cargo run --release -p chat-server --example registry [rounds] [one|two]`

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use chat_proto::rendezvous::{Request, Response};
use chat_proto::{ClientId, Token};
use chat_server::registry::{Config, Hashed, Lookahead, Registry};
use chat_server::state::lock;
use crossbeam_utils::CachePadded;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Registrations per simulated second, and seconds each lives.
const RATE: u64 = 130_000;
const EXPIRES: u64 = 10;
/// Registrations timed per round.
const ROUND: u64 = 400_000;

/// One fresh REGISTER, made as the server makes it: `hashed` is the id's
/// hash, made with its index line asked for before the call (which the
/// server makes under its lock). True if it was acknowledged.
fn register(reg: &mut Registry, hashed: Hashed, (id, token, now): Fresh) -> bool {
    let r = reg.handle(
        &Request::Register {
            id,
            port: 9,
            token: None,
        },
        Some(hashed),
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        now,
        || Ok::<_, Infallible>(token),
    );
    matches!(r, Response::RegAck { .. })
}

/// A fresh id, its token, and when it registers.
type Fresh = (ClientId, Token, Duration);

/// `count` fresh registrations after the `n` made so far. Made before the
/// clock starts, so that only the registry is timed.
fn batch(n: &mut u64, count: u64) -> Vec<Fresh> {
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
}

fn main() {
    let mut args = std::env::args().skip(1);
    let rounds: u64 = match args.next() {
        None => 5,
        Some(a) => a
            .parse()
            .unwrap_or_else(|_| usage(&format!("rounds `{a}` is not a number"))),
    };
    let workers = match args.next().as_deref() {
        Some("two") => 2,
        Some("one") => 1,
        None => 0,
        Some(other) => usage(&format!("unknown mode `{other}`")),
    };
    let mut reg = Registry::new(Config {
        expires: Duration::from_secs(EXPIRES),
        max_registrations: 0,
    });
    let ahead = reg.lookahead();
    let mut n: u64 = 0;
    // Fill to the steady state, where expiry pops as many as are added.
    for one in batch(&mut n, RATE * (EXPIRES + 1)) {
        register(&mut reg, ahead.register(&one.0), one);
    }
    if workers > 0 {
        return by_turns(workers, reg, &ahead, n, rounds);
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
            ok += u64::from(register(&mut reg, ahead.register(&one.0), one));
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

/// Says what was wrong with the arguments, and how to give them, and
/// stops.
fn usage(wrong: &str) -> ! {
    eprintln!(
        "{wrong}\nusage: cargo run --release -p chat-server --example registry [rounds] [one|two]\n\
         (no mode: the registry alone, without its lock; `one` or `two`: REGISTERs by turns \
         through the lock from that many threads)"
    );
    std::process::exit(2)
}

/// Work between two REGISTERs of one worker: about what the rest of a
/// request costs a worker at keep-alive 16 (a few microseconds), on
/// memory of its own, so that its caches are not the registry's alone.
fn other_work(own: &mut [u64], round: u64) {
    let started = Instant::now();
    let mut i = round as usize;
    while started.elapsed() < Duration::from_micros(3) {
        for _ in 0..64 {
            i = i.wrapping_mul(6364136223846793005).wrapping_add(1);
            let at = i % own.len();
            own[at] = own[at].wrapping_add(1);
        }
    }
}

/// `workers` threads (one or two) registering by turns through the lock
/// the server keeps the registry behind, with other work between; prints
/// the time each REGISTER took under it, lock included, per round.
fn by_turns(workers: usize, reg: Registry, ahead: &Lookahead, mut n: u64, rounds: u64) {
    let reg = CachePadded::new(Mutex::new(reg));
    for round in 1..=rounds {
        // Alternate ids, so the workers' registrations interleave in time
        // as the server's do.
        let all = batch(&mut n, ROUND);
        let mut shares: Vec<Vec<Fresh>> = vec![Vec::new(); workers];
        for (i, one) in all.into_iter().enumerate() {
            shares[i % workers].push(one);
        }
        let turn = AtomicUsize::new(0);
        let spent: Vec<(Duration, u64)> = std::thread::scope(|s| {
            shares
                .into_iter()
                .enumerate()
                .map(|(me, ids)| {
                    let (reg, turn) = (&reg, &turn);
                    s.spawn(move || {
                        let mut own = vec![0u64; 1 << 15];
                        let mut spent = Duration::ZERO;
                        let mut ok = 0;
                        for (k, one) in ids.into_iter().enumerate() {
                            other_work(&mut own, k as u64);
                            // By turns, as a worker's REGISTER follows the
                            // other's when both are busy.
                            while turn.load(Ordering::Acquire) % workers != me {
                                std::hint::spin_loop();
                            }
                            let t = Instant::now();
                            let hashed = ahead.register(&one.0);
                            ok += u64::from(register(&mut lock(reg), hashed, one));
                            spent += t.elapsed();
                            turn.fetch_add(1, Ordering::Release);
                        }
                        (spent, ok)
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|h| h.join().expect("a worker panicked"))
                .collect()
        });
        let total: Duration = spent.iter().map(|(d, _)| *d).sum();
        let ok: u64 = spent.iter().map(|(_, k)| *k).sum();
        println!(
            "round {round}: {} ns/REGISTER under the lock, by turns from {workers} thread(s) ({ok} ok)",
            total.as_nanos() / u128::from(ROUND)
        );
    }
}
