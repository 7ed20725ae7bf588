//! What the transports share: the registry, the limits and the clock.
//!
//! TCP connections and the UDP socket both turn a parsed request into a
//! response here, so the two transports cannot drift apart. Locks are never
//! held across an await. A request holds them for the few hundred
//! nanoseconds a registry call takes. The periodic sweep takes the
//! registry's lock a slice of `SWEEP_SLICE` records at a time, and the
//! rate limiter's a shard at a time, so no worker waits long for either.

use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use chat_proto::Token;
use chat_proto::rendezvous::{ErrorStatus, Failure, Request, RequestHead, Response, Transports};
use crossbeam_utils::CachePadded;

use crate::limits::{ConnLimits, RateLimiter, Refusal, Source};
use crate::proxy::{ProxyLog, TrustedProxies};
use crate::registry::{self, Lookahead, Registry};

/// Records the periodic sweep pops per taking of the registry's lock:
/// about a hundred microseconds of work.
const SWEEP_SLICE: usize = 4096;

/// The server's identity in `PROBEACK`.
pub const SERVER_NAME: &str = concat!("chat-server/", env!("CARGO_PKG_VERSION"));

/// The running server's shared state.
///
/// What requests write (the locks, and what they guard) sits on cache
/// lines of its own, apart from what every request only reads: with the
/// two side by side, each REGISTER one worker made took from the other
/// the line with the clock's origin and the id hasher's keys, which it
/// then waited for at its next request (`perf annotate`: 10–20 ns per
/// request at the origin alone).
pub struct State {
    origin: Instant,
    pub transports: Transports,
    registry: CachePadded<Mutex<Registry>>,
    /// A REGISTER's work that needs no lock (see [`Lookahead`]).
    lookahead: Lookahead,
    /// Buckets for requests over TCP and, apart, over UDP: a datagram's
    /// source is easily forged, and one bucket for both would let forged
    /// datagrams spend an address's allowance for TCP (or fill the table
    /// of sources, which refuses new ones).
    limiter: Option<CachePadded<Mutex<RateLimiter>>>,
    udp_limiter: Option<CachePadded<Mutex<RateLimiter>>>,
    /// The limiter's rate, for refusals, which need not take its lock.
    per_ip_rate: u32,
    /// A registration's lifetime in seconds, as REGACK states it.
    pub expires: u32,
    pub conns: CachePadded<Mutex<ConnLimits>>,
    /// Whose `X-Forwarded-For` to believe, over TCP.
    pub trusted_proxies: TrustedProxies,
    proxy_log: ProxyLog,
}

/// The transport a request came by: each has its own rate buckets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Tcp,
    Udp,
}

/// The limits [`State`] enforces.
#[derive(Clone, Debug)]
pub struct Limits {
    pub registry: registry::Config,
    pub per_ip_rate: u32,
    pub per_ip_burst: u32,
    pub per_ip_conns: u32,
    pub max_conns: usize,
    pub trusted_proxies: TrustedProxies,
}

impl State {
    pub fn new(transports: Transports, limits: &Limits) -> State {
        let registry = Registry::new(limits.registry.clone());
        State {
            origin: Instant::now(),
            transports,
            lookahead: registry.lookahead(),
            registry: CachePadded::new(Mutex::new(registry)),
            limiter: padded_limiter(limits),
            udp_limiter: padded_limiter(limits),
            per_ip_rate: limits.per_ip_rate,
            expires: u32::try_from(limits.registry.expires.as_secs()).unwrap_or(u32::MAX),
            conns: CachePadded::new(Mutex::new(ConnLimits::new(
                limits.max_conns,
                limits.per_ip_conns,
            ))),
            trusted_proxies: limits.trusted_proxies.clone(),
            proxy_log: ProxyLog::default(),
        }
    }

    /// Time since start: the registry's and the limiter's clock.
    pub fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    /// `at` on that clock: a connection passes the time it read a request
    /// at, so that a request costs no clock reading of its own.
    pub fn at(&self, at: Instant) -> Duration {
        at.saturating_duration_since(self.origin)
    }

    /// The client a request over TCP from `peer` speaks for: `peer`, or
    /// the client its `X-Forwarded-For` names if `peer` is a trusted proxy
    /// (see [`TrustedProxies::client`]). `raw` is the request's head.
    /// What an operator should know of is logged, sparingly.
    pub fn client_of(
        &self,
        peer: IpAddr,
        head: &RequestHead,
        raw: &[u8],
    ) -> Result<IpAddr, Failure> {
        if !head.forwarded {
            return Ok(peer);
        }
        if !self.trusted_proxies.contains(peer) {
            self.proxy_log.untrusted(peer, self.now());
            return Ok(peer);
        }
        self.trusted_proxies
            .client(peer, raw)
            .inspect_err(|f| self.proxy_log.bad_header(peer, f, self.now()))
    }

    /// Takes one request from `source`'s allowance at `now`. The refusal
    /// is cheap: UDP drops it as it is, and only TCP, which answers it,
    /// pays for [`State::refused`].
    pub fn admit(&self, source: IpAddr, via: Via, now: Duration) -> Result<(), Refusal> {
        let limiter = match via {
            Via::Tcp => &self.limiter,
            Via::Udp => &self.udp_limiter,
        };
        match limiter {
            Some(limiter) => lock(limiter).check(Source::from(source), now),
            None => Ok(()),
        }
    }

    /// What a refused client is told.
    pub fn refused(&self, refusal: Refusal) -> Failure {
        match refusal {
            Refusal::RateLimited { retry_after } => {
                let rate = self.per_ip_rate;
                Failure {
                    retry_after: Some(retry_after),
                    ..Failure::new(
                        ErrorStatus::TooManyRequests,
                        format!(
                            "rate limited: more than {rate} requests/s from your address; retry after {retry_after} s"
                        ),
                    )
                }
            }
            Refusal::TooManySources => Failure {
                retry_after: Some(10),
                ..Failure::new(
                    ErrorStatus::Unavailable,
                    "server busy: too many clients at once; retry later",
                )
            },
        }
    }

    /// The response to a parsed request from `source` at `now`, which has
    /// been admitted already.
    pub fn answer(&self, head: &RequestHead, source: IpAddr, now: Duration) -> Response {
        match &head.request {
            Err(f) => Response::Error(f.clone()),
            Ok(Request::Probe) => Response::ProbeAck {
                transports: self.transports,
                server: SERVER_NAME.into(),
            },
            Ok(request @ Request::Register { id, .. }) => {
                // Before the lock: the index line loads while the token
                // is made and the lock is taken, and the lock is held for
                // less. A token made for a refresh (which keeps its old
                // one) or a refused REGISTER is wasted: a few dozen
                // nanoseconds.
                let hashed = self.lookahead.register(id);
                let token = fresh_token();
                lock(&self.registry).handle(request, Some(hashed), source, now, || token)
            }
            Ok(request) => lock(&self.registry).handle(request, None, source, now, fresh_token),
        }
    }

    /// Forgets what has lapsed: registrations and refilled buckets.
    /// Returns how many registrations were dropped.
    pub fn sweep(&self) -> usize {
        let now = self.now();
        for l in [&self.limiter, &self.udp_limiter].into_iter().flatten() {
            let shards = lock(l).shards();
            for i in 0..shards {
                lock(l).sweep_shard(i, now);
            }
        }
        let mut lapsed = 0;
        loop {
            let slice = lock(&self.registry).sweep(now, SWEEP_SLICE);
            lapsed += slice.lapsed;
            if slice.looked < SWEEP_SLICE {
                return lapsed;
            }
        }
    }

    pub fn registrations(&self) -> usize {
        lock(&self.registry).len()
    }
}

#[cfg(test)]
impl State {
    /// A state for unit tests: no caps on connections or registrations,
    /// `rate` requests/s (and as many at once) per address, 0 being off.
    pub fn for_tests(
        transports: Transports,
        rate: u32,
        trusted_proxies: TrustedProxies,
        expires: u64,
    ) -> State {
        State::new(
            transports,
            &Limits {
                registry: registry::Config {
                    expires: Duration::from_secs(expires),
                    max_registrations: 0,
                },
                per_ip_rate: rate,
                per_ip_burst: rate,
                per_ip_conns: 0,
                max_conns: 0,
                trusted_proxies,
            },
        )
    }
}

fn padded_limiter(limits: &Limits) -> Option<CachePadded<Mutex<RateLimiter>>> {
    RateLimiter::new(limits.per_ip_rate, limits.per_ip_burst)
        .map(|l| CachePadded::new(Mutex::new(l)))
}

/// A fresh client token from the thread's CSPRNG (ChaCha, seeded and
/// reseeded from the operating system), which costs no system call per
/// REGISTER. Filled as bytes: `rand::random::<[u8; 16]>()` draws each
/// byte as a word of its own, which made a token cost 16 calls and four
/// times the ChaCha output (`perf`: 65-70 ns per REGISTER, against about
/// 10 filled; docs/BENCHMARKS.md).
fn fresh_token() -> Result<Token, std::convert::Infallible> {
    use rand::Rng as _;
    let mut bytes = [0; 16];
    rand::rng().fill_bytes(&mut bytes);
    Ok(Token::from_bytes(bytes))
}

/// Locks `m`. A panic while it was held cannot leave the registry
/// half-updated (its methods do not panic between related writes), so a
/// poisoned lock is taken over rather than failing every later request.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
