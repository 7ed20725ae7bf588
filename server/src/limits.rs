//! The limits that keep one source from taking the server for itself: a
//! token bucket of requests per source, and counts of open TCP connections
//! per source and in all.
//!
//! Like the registry these are pure state machines with the time passed in.
//! A source is an IPv4 address or an IPv6 /64, the block one subscriber
//! usually holds, so that hopping through addresses of one block does not
//! buy a fresh bucket each time.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::time::Duration;

use hashbrown::HashTable;

/// The key limits are counted under.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    V4(u32),
    V6Prefix(u64),
}

impl From<IpAddr> for Source {
    fn from(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(v4) => Source::V4(v4.into()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(v4.into()),
                None => Source::V6Prefix((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

/// Most sources tracked at once; past it new sources are refused until old
/// buckets refill and are forgotten, which bounds memory under a flood of
/// spoofed or rotating addresses.
pub const MAX_TRACKED_SOURCES: usize = 1 << 20;

/// The buckets are split into this many tables by a keyed hash of the
/// source, each with its share of the cap, so that forgetting refilled
/// buckets walks one table per taking of the lock rather than all of them:
/// at a million tracked sources, under 1 ms each instead of about 20 ms
/// for the lot. The key keeps a flood from aiming at one table, which
/// would fill its share and refuse new sources that land there.
pub const SHARDS: usize = 64;

/// Lets a costly step (a walk over a whole table) run at most once per
/// interval, when a flood would otherwise set it off on every request.
#[derive(Debug)]
pub struct Throttle {
    every: Duration,
    last: Option<Duration>,
}

impl Throttle {
    pub const fn new(every: Duration) -> Throttle {
        Throttle { every, last: None }
    }

    /// Whether the step may run at `now`; if so, the interval restarts.
    pub fn ready(&mut self, now: Duration) -> bool {
        let ready = self
            .last
            .is_none_or(|t| now.saturating_sub(t) >= self.every);
        if ready {
            self.last = Some(now);
        }
        ready
    }
}

/// How often a full table may be swept to make room.
pub const FULL_SWEEP_EVERY: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    last: Duration,
}

/// A token bucket per source: `rate` requests a second, `burst` at once.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    shards: Box<[Shard]>,
    hasher: RandomState,
    /// Most buckets in one shard.
    max_per_shard: usize,
}

/// One table of buckets (see [`SHARDS`]).
struct Shard {
    buckets: HashTable<Tracked>,
    full_sweep: Throttle,
}

struct Tracked {
    source: Source,
    bucket: Bucket,
}

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Over the source's rate; retry after this many whole seconds.
    RateLimited { retry_after: u32 },
    /// Too many sources are being tracked (a flood of addresses).
    TooManySources,
}

impl RateLimiter {
    /// `None` when either figure is 0 (the limit is off).
    pub fn new(rate: u32, burst: u32) -> Option<RateLimiter> {
        Self::with_capacity(rate, burst, MAX_TRACKED_SOURCES, SHARDS)
    }

    fn with_capacity(
        rate: u32,
        burst: u32,
        max_tracked: usize,
        shards: usize,
    ) -> Option<RateLimiter> {
        let shards = shards.max(1);
        (rate > 0 && burst > 0).then(|| RateLimiter {
            rate: f64::from(rate),
            burst: f64::from(burst),
            shards: (0..shards)
                .map(|_| Shard {
                    buckets: HashTable::new(),
                    full_sweep: Throttle::new(FULL_SWEEP_EVERY),
                })
                .collect(),
            hasher: RandomState::new(),
            max_per_shard: max_tracked.div_ceil(shards),
        })
    }

    /// How many shards [`RateLimiter::sweep_shard`] takes.
    pub fn shards(&self) -> usize {
        self.shards.len()
    }

    /// Takes one token from `source`'s bucket.
    pub fn check(&mut self, source: Source, now: Duration) -> Result<(), Refusal> {
        let (rate, burst) = (self.rate, self.burst);
        let hash = self.hasher.hash_one(source);
        let hasher = &self.hasher;
        let shard = &mut self.shards[shard_of(hash, self.shards.len())];
        let b = match shard.buckets.find_mut(hash, |t| t.source == source) {
            Some(t) => &mut t.bucket,
            None => {
                if shard.buckets.len() >= self.max_per_shard {
                    if shard.full_sweep.ready(now) {
                        shard.sweep(now, rate, burst);
                    }
                    if shard.buckets.len() >= self.max_per_shard {
                        return Err(Refusal::TooManySources);
                    }
                }
                let tracked = Tracked {
                    source,
                    bucket: Bucket {
                        tokens: burst,
                        last: now,
                    },
                };
                &mut shard
                    .buckets
                    .insert_unique(hash, tracked, |t| hasher.hash_one(t.source))
                    .into_mut()
                    .bucket
            }
        };
        let elapsed = now.saturating_sub(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            // Under one token, refilling at one or more a second: the next
            // is at most a second away, whatever the rate.
            Err(Refusal::RateLimited { retry_after: 1 })
        }
    }

    /// Forgets the sources of shard `shard` whose bucket has refilled:
    /// they are indistinguishable from sources never seen. A shard at a
    /// time, so that the caller can let the lock go in between.
    pub fn sweep_shard(&mut self, shard: usize, now: Duration) {
        let (rate, burst) = (self.rate, self.burst);
        if let Some(s) = self.shards.get_mut(shard) {
            s.sweep(now, rate, burst);
        }
    }

    /// Sources tracked (for tests).
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.shards.iter().map(|s| s.buckets.len()).sum()
    }
}

/// The shard of a source whose keyed hash is `hash`. Bits 32 and up pick
/// it: hashbrown finds a bucket from the low bits, so those still vary
/// within a shard.
fn shard_of(hash: u64, shards: usize) -> usize {
    ((hash >> 32) % shards as u64) as usize
}

impl Shard {
    fn sweep(&mut self, now: Duration, rate: f64, burst: f64) {
        self.buckets.retain(|t| {
            let elapsed = now.saturating_sub(t.bucket.last).as_secs_f64();
            t.bucket.tokens + elapsed * rate < burst
        });
    }
}

/// Open TCP connections, per source and in all.
pub struct ConnLimits {
    max_total: usize,
    max_per_source: u32,
    total: usize,
    per_source: HashMap<Source, u32>,
}

/// Why a connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnRefusal {
    /// `--max-conns` reached: 503.
    ServerFull,
    /// `--per-ip-conns` reached: 429.
    SourceFull,
}

impl ConnLimits {
    /// A limit of 0 is off.
    pub fn new(max_total: usize, max_per_source: u32) -> ConnLimits {
        ConnLimits {
            max_total,
            max_per_source,
            total: 0,
            per_source: HashMap::new(),
        }
    }

    /// Counts a new connection from `source`, or says why it is refused.
    /// `None` counts towards the total only: a trusted proxy, which
    /// carries many clients' connections. Every `Ok` must be paired with
    /// one [`ConnLimits::close`] of the same `source`.
    pub fn open(&mut self, source: Option<Source>) -> Result<(), ConnRefusal> {
        if self.max_total != 0 && self.total >= self.max_total {
            return Err(ConnRefusal::ServerFull);
        }
        if self.max_per_source != 0
            && let Some(source) = source
        {
            let n = self.per_source.entry(source).or_insert(0);
            if *n >= self.max_per_source {
                return Err(ConnRefusal::SourceFull);
            }
            *n += 1;
        }
        self.total += 1;
        Ok(())
    }

    pub fn close(&mut self, source: Option<Source>) {
        self.total = self.total.saturating_sub(1);
        if self.max_per_source != 0
            && let Some(source) = source
            && let Some(n) = self.per_source.get_mut(&source)
        {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&source);
            }
        }
    }

    pub fn total(&self) -> usize {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(s: &str) -> Source {
        s.parse::<IpAddr>().unwrap().into()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn sources_group_ipv6_by_64_and_unmap_ipv4() {
        assert_eq!(src("2001:db8:1:2::1"), src("2001:db8:1:2:ffff::9"));
        assert_ne!(src("2001:db8:1:2::1"), src("2001:db8:1:3::1"));
        assert_eq!(src("::ffff:10.0.0.1"), src("10.0.0.1"));
        assert_ne!(src("10.0.0.1"), src("10.0.0.2"));
    }

    #[test]
    fn zero_turns_the_rate_limit_off() {
        assert!(RateLimiter::new(0, 10).is_none());
        assert!(RateLimiter::new(10, 0).is_none());
    }

    #[test]
    fn burst_then_rate() {
        let mut l = RateLimiter::new(10, 3).unwrap();
        let a = src("10.0.0.1");
        for _ in 0..3 {
            assert_eq!(l.check(a, ms(0)), Ok(()));
        }
        assert_eq!(
            l.check(a, ms(0)),
            Err(Refusal::RateLimited { retry_after: 1 })
        );
        // Another source has its own bucket.
        assert_eq!(l.check(src("10.0.0.2"), ms(0)), Ok(()));
        // 100 ms buys one token at 10/s.
        assert_eq!(l.check(a, ms(100)), Ok(()));
        assert!(l.check(a, ms(100)).is_err());
        // Refills up to the burst, not beyond.
        for _ in 0..3 {
            assert_eq!(l.check(a, ms(10_000)), Ok(()));
        }
        assert!(l.check(a, ms(10_000)).is_err());
    }

    #[test]
    fn retry_after_covers_the_wait_at_slow_rates() {
        let mut l = RateLimiter::new(1, 1).unwrap();
        let a = src("10.0.0.1");
        assert_eq!(l.check(a, ms(0)), Ok(()));
        assert_eq!(
            l.check(a, ms(100)),
            Err(Refusal::RateLimited { retry_after: 1 })
        );
        assert_eq!(l.check(a, ms(1000)), Ok(()));
    }

    #[test]
    fn tracked_sources_are_bounded_and_forgotten_when_full() {
        let mut l = RateLimiter::with_capacity(1, 2, 2, 1).unwrap();
        assert_eq!(l.check(src("10.0.0.1"), ms(0)), Ok(()));
        assert_eq!(l.check(src("10.0.0.2"), ms(0)), Ok(()));
        assert_eq!(
            l.check(src("10.0.0.3"), ms(0)),
            Err(Refusal::TooManySources)
        );
        // Once the first two have refilled they are forgotten.
        assert_eq!(l.check(src("10.0.0.3"), ms(5_000)), Ok(()));
        assert_eq!(l.tracked(), 1);
    }

    #[test]
    fn a_full_table_is_swept_at_most_once_a_second() {
        // Buckets refill in 100 ms, but a flood of new sources must not
        // walk the table on every request.
        let mut l = RateLimiter::with_capacity(10, 2, 2, 1).unwrap();
        assert_eq!(l.check(src("10.0.0.1"), ms(0)), Ok(()));
        assert_eq!(l.check(src("10.0.0.2"), ms(0)), Ok(()));
        assert_eq!(
            l.check(src("10.0.0.3"), ms(0)),
            Err(Refusal::TooManySources)
        );
        assert_eq!(
            l.check(src("10.0.0.3"), ms(500)),
            Err(Refusal::TooManySources)
        );
        assert_eq!(l.tracked(), 2);
        assert_eq!(l.check(src("10.0.0.3"), ms(1_000)), Ok(()));
    }

    /// A source of its own for each `i`.
    fn nth(i: u32) -> Source {
        Source::V4(0x0a00_0000 + i)
    }

    #[test]
    fn the_cap_is_shared_out_over_the_shards() {
        // 4 shards of 2 each: every shard fills to 2, and no further.
        let mut l = RateLimiter::with_capacity(1, 2, 8, 4).unwrap();
        let mut landed = [0usize; 4];
        let mut refused = 0;
        for i in 0..200 {
            landed[shard_of(l.hasher.hash_one(nth(i)), 4)] += 1;
            if l.check(nth(i), ms(0)) == Err(Refusal::TooManySources) {
                refused += 1;
            }
        }
        let kept: Vec<usize> = l.shards.iter().map(|s| s.buckets.len()).collect();
        let want: Vec<usize> = landed.iter().map(|&n| n.min(2)).collect();
        assert_eq!(kept, want);
        assert_eq!(refused, 200 - want.iter().sum::<usize>());
    }

    #[test]
    fn sweeping_goes_a_shard_at_a_time() {
        let mut l = RateLimiter::with_capacity(10, 2, 1 << 20, 4).unwrap();
        for i in 0..1000 {
            assert_eq!(l.check(nth(i), ms(0)), Ok(()));
        }
        // Not refilled yet: nothing is forgotten.
        for shard in 0..l.shards() {
            l.sweep_shard(shard, ms(50));
        }
        assert_eq!(l.tracked(), 1000);
        // Refilled: each shard forgets its own, and only its own.
        l.sweep_shard(0, ms(1_000));
        let left = l.tracked();
        assert!(0 < left && left < 1000, "{left}");
        for shard in 1..l.shards() {
            l.sweep_shard(shard, ms(1_000));
        }
        assert_eq!(l.tracked(), 0);
        l.sweep_shard(l.shards(), ms(1_000)); // out of range: nothing
    }

    #[test]
    fn throttle() {
        let mut t = Throttle::new(Duration::from_secs(1));
        assert!(t.ready(ms(5)));
        assert!(!t.ready(ms(5)));
        assert!(!t.ready(ms(1_004)));
        assert!(t.ready(ms(1_005)));
        // A clock that goes back does not unlock it.
        assert!(!t.ready(ms(0)));
    }

    #[test]
    fn connection_caps() {
        let mut c = ConnLimits::new(3, 2);
        let a = Some(src("10.0.0.1"));
        let b = Some(src("10.0.0.2"));
        assert_eq!(c.open(a), Ok(()));
        assert_eq!(c.open(a), Ok(()));
        assert_eq!(c.open(a), Err(ConnRefusal::SourceFull));
        assert_eq!(c.open(b), Ok(()));
        assert_eq!(c.open(b), Err(ConnRefusal::ServerFull));
        c.close(a);
        assert_eq!(c.open(a), Ok(()));
        c.close(a);
        c.close(a);
        c.close(b);
        assert_eq!(c.total(), 0);
        assert!(c.per_source.is_empty());
        // A trusted proxy is held to the total only.
        for _ in 0..3 {
            assert_eq!(c.open(None), Ok(()));
        }
        assert_eq!(c.open(None), Err(ConnRefusal::ServerFull));
        for _ in 0..3 {
            c.close(None);
        }
        assert_eq!(c.total(), 0);
    }

    #[test]
    fn connection_caps_off() {
        let mut c = ConnLimits::new(0, 0);
        for _ in 0..1000 {
            assert_eq!(c.open(Some(src("10.0.0.1"))), Ok(()));
        }
        assert_eq!(c.total(), 1000);
    }
}
